//! DANE for SMTP (RFC 7672, RFC 7671) as Postfix 3.7 does it: DNSSEC
//! answers, TLSA records, how a certificate matches them, and the TLS
//! decision for one destination and server.
//!
//! **Validated answers.** Postern does not validate DNSSEC itself: as
//! Postfix, it trusts the AD bit of the resolver it is configured to ask
//! ([`SecureDns`]): the servers of `dns_resolver_addresses` (Postern-only:
//! trusted), else the `nameserver`s of /etc/resolv.conf, whose AD bit is
//! trusted only with `options trust-ad` (glibc's rule, which Postfix
//! inherits). Each query asks for DNSSEC (EDNS0 with DO, and AD set); an
//! answer is "secure" only when it comes back with AD set.
//!
//! **TLSA records.** Usages 2 (DANE-TA) and 3 (DANE-EE), selectors 0
//! (full certificate) and 1 (SubjectPublicKeyInfo), matching types 0
//! (exact), 1 (SHA-256) and 2 (SHA-512), each digest only when
//! `tls_dane_digests` lists it ([`Digests`]). PKIX-TA and PKIX-EE (0, 1)
//! are unusable for SMTP (RFC 7672 section 3.1.3), as in Postfix. A
//! DANE-EE record matches the server's certificate whatever its names and
//! dates; a DANE-TA record matches a certificate of the chain the server
//! sent, which then serves as the trust anchor of that chain, whose end
//! certificate must name the server (the smtp client checks that: it owns
//! the X.509 verifier).
//!
//! **The decision** ([`decide`]) for one server, from the security of the
//! MX and address answers and the TLSA lookup, as Postfix's
//! smtp_tls_policy.c: usable TLSA records mean mandatory TLS
//! authenticated by them; an insecure answer or no TLSA record means
//! `may`, only unusable records `encrypt` (at `dane-only` each of these
//! defers); a failed TLSA lookup defers ("TLSA lookup error for
//! HOST:PORT").

use crate::tls_ccert::spki;
use hickory_resolver::proto::op::{Edns, Message, Query, ResponseCode};
use hickory_resolver::proto::rr::{Name, RData, Record, RecordType};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::time::{Duration, Instant};

/// One TLSA record (RFC 6698), as numbers and data.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Tlsa {
    pub usage: u8,
    pub selector: u8,
    pub mtype: u8,
    pub data: Vec<u8>,
}

/// The digests `tls_dane_digests` enables (`sha256`, `sha512`; Postfix's
/// `name=number` form names the matching type explicitly).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Digests {
    pub sha256: bool,
    pub sha512: bool,
}

impl Digests {
    /// From the words of `tls_dane_digests`; an unknown word is returned
    /// in Err for a warning, the rest still counts.
    pub fn parse(words: &[String]) -> (Digests, Vec<String>) {
        let mut d = Digests {
            sha256: false,
            sha512: false,
        };
        let mut bad = Vec::new();
        for w in words {
            let name = w.split('=').next().unwrap_or("").to_ascii_lowercase();
            match name.as_str() {
                "sha256" => d.sha256 = true,
                "sha512" => d.sha512 = true,
                _ => bad.push(w.clone()),
            }
        }
        (d, bad)
    }
}

impl Default for Digests {
    fn default() -> Digests {
        Digests {
            sha256: true,
            sha512: true,
        }
    }
}

impl Tlsa {
    /// Whether Postern (as Postfix) can use the record for SMTP.
    pub fn usable(&self, digests: Digests) -> bool {
        matches!(self.usage, 2 | 3)
            && matches!(self.selector, 0 | 1)
            && match self.mtype {
                0 => !self.data.is_empty(),
                1 => digests.sha256 && self.data.len() == 32,
                2 => digests.sha512 && self.data.len() == 64,
                _ => false,
            }
    }

    /// Whether the DER certificate `cert` matches the record's selector
    /// and matching type (the usage is the caller's business).
    pub fn matches_cert(&self, cert: &[u8]) -> bool {
        let selected: &[u8] = match self.selector {
            0 => cert,
            1 => match spki(cert) {
                Some(s) => s,
                None => return false,
            },
            _ => return false,
        };
        match self.mtype {
            0 => selected == self.data.as_slice(),
            1 => ring::digest::digest(&ring::digest::SHA256, selected).as_ref() == self.data,
            2 => ring::digest::digest(&ring::digest::SHA512, selected).as_ref() == self.data,
            _ => false,
        }
    }

    /// `usage selector mtype hexdata`, as Postfix logs a record.
    pub fn text(&self) -> String {
        let hex: String = self.data.iter().map(|b| format!("{b:02x}")).collect();
        format!("{} {} {} {hex}", self.usage, self.selector, self.mtype)
    }
}

/// What a query found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    pub rcode: ResponseCode,
    /// The answer section (CNAMEs of a chain included).
    pub records: Vec<Record>,
    /// The resolver validated it (AD set, and its AD bit is trusted).
    pub secure: bool,
}

/// A stub resolver that asks for DNSSEC and reports the AD bit (see the
/// module doc). Blocking; one query at a time per call.
#[derive(Debug, Clone)]
pub struct SecureDns {
    pub servers: Vec<SocketAddr>,
    /// Whether the servers' AD bit is believed.
    pub trust_ad: bool,
    pub timeout: Duration,
}

impl SecureDns {
    /// The servers of `dns_resolver_addresses` (`configured`, trusted), or
    /// else those of `resolv_conf` (trusted with `options trust-ad`).
    pub fn new(configured: &[SocketAddr], resolv_conf: &str, timeout: Duration) -> SecureDns {
        if !configured.is_empty() {
            return SecureDns {
                servers: configured.to_vec(),
                trust_ad: true,
                timeout,
            };
        }
        let text = std::fs::read_to_string(resolv_conf).unwrap_or_default();
        let (servers, trust_ad) = parse_resolv_conf(&text);
        SecureDns {
            servers,
            trust_ad,
            timeout,
        }
    }

    /// Asks the servers in turn for `name`'s `rtype` records. Err: no
    /// server answered (a temporary failure).
    pub fn query(&self, name: &str, rtype: RecordType) -> Result<Answer, String> {
        let mut qname = Name::from_utf8(name).map_err(|e| format!("{name}: {e}"))?;
        qname.set_fqdn(true);
        let mut last = "no name server".to_string();
        for sa in &self.servers {
            match self.ask(*sa, &qname, rtype) {
                Ok(m) => {
                    let rcode = m.metadata.response_code;
                    if matches!(rcode, ResponseCode::ServFail | ResponseCode::Refused)
                        && self.servers.len() > 1
                    {
                        last = format!("{sa}: {rcode}");
                        continue;
                    }
                    return Ok(Answer {
                        rcode,
                        secure: self.trust_ad && m.metadata.authentic_data,
                        records: m.answers,
                    });
                }
                Err(e) => last = format!("{sa}: {e}"),
            }
        }
        Err(last)
    }

    fn ask(&self, sa: SocketAddr, qname: &Name, rtype: RecordType) -> Result<Message, String> {
        let mut msg = Message::query();
        msg.add_query(Query::query(qname.clone(), rtype));
        msg.metadata.recursion_desired = true;
        msg.metadata.authentic_data = true;
        let mut edns = Edns::new();
        edns.set_dnssec_ok(true);
        edns.set_max_payload(1232);
        msg.set_edns(edns);
        let id = msg.metadata.id;
        let wire = msg.to_vec().map_err(|e| e.to_string())?;
        let deadline = Instant::now() + self.timeout.max(Duration::from_secs(1));
        let bind: SocketAddr = if sa.is_ipv4() {
            "0.0.0.0:0".parse().expect("address")
        } else {
            "[::]:0".parse().expect("address")
        };
        let sock = UdpSocket::bind(bind).map_err(|e| e.to_string())?;
        sock.connect(sa).map_err(|e| e.to_string())?;
        sock.send(&wire).map_err(|e| e.to_string())?;
        let mut buf = vec![0u8; 65535];
        let reply = loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err("timed out".into());
            }
            sock.set_read_timeout(Some(left))
                .map_err(|e| e.to_string())?;
            let n = sock.recv(&mut buf).map_err(|e| e.to_string())?;
            let Ok(m) = Message::from_vec(&buf[..n]) else {
                continue;
            };
            if m.metadata.id == id {
                break m;
            }
        };
        if !reply.metadata.truncation {
            return Ok(reply);
        }
        // Truncated: the same question over TCP.
        let left = deadline.saturating_duration_since(Instant::now());
        let mut tcp = TcpStream::connect_timeout(&sa, left.max(Duration::from_millis(100)))
            .map_err(|e| e.to_string())?;
        tcp.set_read_timeout(Some(left.max(Duration::from_millis(100))))
            .map_err(|e| e.to_string())?;
        let mut framed = (wire.len() as u16).to_be_bytes().to_vec();
        framed.extend_from_slice(&wire);
        tcp.write_all(&framed).map_err(|e| e.to_string())?;
        let mut len = [0u8; 2];
        tcp.read_exact(&mut len).map_err(|e| e.to_string())?;
        let mut body = vec![0u8; u16::from_be_bytes(len) as usize];
        tcp.read_exact(&mut body).map_err(|e| e.to_string())?;
        let m = Message::from_vec(&body).map_err(|e| e.to_string())?;
        if m.metadata.id != id {
            return Err("reply for another query".into());
        }
        Ok(m)
    }

    /// The TLSA records of `_PORT._tcp.HOST` (RFC 7672 section 2.2).
    pub fn tlsa(&self, host: &str, port: u16) -> TlsaLookup {
        let qname = format!("_{port}._tcp.{}", host.trim_end_matches('.'));
        match self.query(&qname, RecordType::TLSA) {
            Err(_) => TlsaLookup::Error,
            Ok(a) => tlsa_answer(&a),
        }
    }
}

/// `nameserver` addresses of a resolv.conf text, and whether it says
/// `options trust-ad`.
pub fn parse_resolv_conf(text: &str) -> (Vec<SocketAddr>, bool) {
    let mut servers = Vec::new();
    let mut trust_ad = false;
    for line in text.lines() {
        let mut w = line.split_whitespace();
        match w.next() {
            Some("nameserver") => {
                if let Some(ip) = w.next().and_then(|a| a.parse::<std::net::IpAddr>().ok()) {
                    servers.push(SocketAddr::new(ip, 53));
                }
            }
            Some("options") if w.any(|o| o == "trust-ad") => trust_ad = true,
            _ => {}
        }
    }
    (servers, trust_ad)
}

/// What the TLSA lookup of one server found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TlsaLookup {
    /// Validated records (all of them; [`Tlsa::usable`] sorts them).
    Secure(Vec<Tlsa>),
    /// A validated answer that there is no TLSA record.
    SecureNone,
    /// An answer the resolver did not validate.
    Insecure,
    /// No answer (SERVFAIL, time-out): "TLSA lookup error".
    Error,
}

/// What a TLSA answer means.
pub fn tlsa_answer(a: &Answer) -> TlsaLookup {
    match a.rcode {
        ResponseCode::NoError | ResponseCode::NXDomain => {}
        _ => return TlsaLookup::Error,
    }
    if !a.secure {
        return TlsaLookup::Insecure;
    }
    let recs: Vec<Tlsa> = a
        .records
        .iter()
        .filter_map(|r| match &r.data {
            RData::TLSA(t) => Some(Tlsa {
                usage: u8::from(t.cert_usage),
                selector: u8::from(t.selector),
                mtype: u8::from(t.matching),
                data: t.cert_data.clone(),
            }),
            _ => None,
        })
        .collect();
    if recs.is_empty() {
        TlsaLookup::SecureNone
    } else {
        TlsaLookup::Secure(recs)
    }
}

/// `smtp_tls_dane_insecure_mx_policy`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InsecureMx {
    May,
    Encrypt,
    Dane,
}

impl InsecureMx {
    pub fn parse(s: &str) -> Option<InsecureMx> {
        Some(match s.trim().to_ascii_lowercase().as_str() {
            "may" => InsecureMx::May,
            "encrypt" => InsecureMx::Encrypt,
            "dane" => InsecureMx::Dane,
            _ => return None,
        })
    }
}

/// The TLS a server gets at level `dane` or `dane-only`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Mandatory TLS, the certificate authenticated by these usable
    /// records.
    Dane(Vec<Tlsa>),
    /// Mandatory TLS, any certificate (insecure MX, policy `encrypt`).
    Encrypt,
    /// Opportunistic TLS.
    May,
    /// No delivery to this server now: the reason (temporary, 4.7.5).
    Defer(String),
}

/// What one server of a destination at level `dane` (`only` false) or
/// `dane-only` gets, as Postfix's smtp_tls_policy.c decides it.
/// `mx_secure`: the MX answer was validated (None: no MX lookup, the
/// host was the next hop); `addr_secure`: the server's address answer
/// was; `tlsa`: the TLSA lookup, done only when the address was secure
/// (None otherwise); `relay`: `HOST:PORT` for reasons. At `dane-only`
/// every case without usable records defers with Postfix's text (`non
/// DNSSEC destination`, `no TLSA records found`, `TLSA records
/// unusable`); at `dane` they are `may`, except unusable records, which
/// still mean mandatory (unauthenticated) TLS.
pub fn decide(
    only: bool,
    mx_secure: Option<bool>,
    insecure_mx: InsecureMx,
    addr_secure: bool,
    tlsa: Option<&TlsaLookup>,
    digests: Digests,
    relay: &str,
) -> Decision {
    let incompatible = |why: &str, cantauth: bool| {
        if only {
            Decision::Defer(why.to_string())
        } else if cantauth {
            Decision::Encrypt
        } else {
            Decision::May
        }
    };
    if mx_secure == Some(false) && (only || insecure_mx == InsecureMx::May) {
        return incompatible("non DNSSEC destination", false);
    }
    let all = match (addr_secure, tlsa) {
        (_, Some(TlsaLookup::Error)) => {
            return Decision::Defer(format!("TLSA lookup error for {relay}"))
        }
        (true, Some(TlsaLookup::Secure(all))) => all,
        _ => return incompatible("no TLSA records found", false),
    };
    let usable: Vec<Tlsa> = all.iter().filter(|t| t.usable(digests)).cloned().collect();
    if usable.is_empty() {
        return incompatible("TLSA records unusable", true);
    }
    if mx_secure == Some(false) && insecure_mx == InsecureMx::Encrypt {
        return Decision::Encrypt;
    }
    Decision::Dane(usable)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(u: u8, s: u8, m: u8, len: usize) -> Tlsa {
        Tlsa {
            usage: u,
            selector: s,
            mtype: m,
            data: vec![1; len],
        }
    }

    #[test]
    fn usable_records() {
        let d = Digests::default();
        assert!(t(3, 1, 1, 32).usable(d));
        assert!(t(2, 0, 2, 64).usable(d));
        assert!(t(3, 0, 0, 10).usable(d));
        assert!(!t(1, 1, 1, 32).usable(d), "PKIX-EE");
        assert!(!t(0, 1, 1, 32).usable(d), "PKIX-TA");
        assert!(!t(3, 2, 1, 32).usable(d));
        assert!(!t(3, 1, 1, 31).usable(d), "short digest");
        let (only512, bad) = Digests::parse(&["sha512".into(), "md5".into()]);
        assert_eq!(bad, vec!["md5".to_string()]);
        assert!(!t(3, 1, 1, 32).usable(only512));
    }

    #[test]
    fn decisions() {
        let d = Digests::default();
        let good = TlsaLookup::Secure(vec![t(3, 1, 1, 32), t(1, 1, 1, 32)]);
        assert_eq!(
            decide(
                false,
                Some(true),
                InsecureMx::Dane,
                true,
                Some(&good),
                d,
                "mx:25"
            ),
            Decision::Dane(vec![t(3, 1, 1, 32)])
        );
        assert_eq!(
            decide(
                false,
                Some(false),
                InsecureMx::May,
                true,
                Some(&good),
                d,
                "mx:25"
            ),
            Decision::May
        );
        assert_eq!(
            decide(
                false,
                Some(false),
                InsecureMx::Encrypt,
                true,
                Some(&good),
                d,
                "mx:25"
            ),
            Decision::Encrypt
        );
        assert_eq!(
            decide(
                false,
                Some(true),
                InsecureMx::Dane,
                true,
                Some(&TlsaLookup::SecureNone),
                d,
                "mx:25"
            ),
            Decision::May
        );
        assert_eq!(
            decide(
                true,
                Some(true),
                InsecureMx::Dane,
                true,
                Some(&TlsaLookup::SecureNone),
                d,
                "mx:25"
            ),
            Decision::Defer("no TLSA records found".into())
        );
        let unusable = TlsaLookup::Secure(vec![t(1, 1, 1, 32)]);
        assert_eq!(
            decide(
                false,
                Some(true),
                InsecureMx::Dane,
                true,
                Some(&unusable),
                d,
                "mx:25"
            ),
            Decision::Encrypt
        );
        assert_eq!(
            decide(
                true,
                Some(false),
                InsecureMx::Dane,
                true,
                Some(&good),
                d,
                "mx:25"
            ),
            Decision::Defer("non DNSSEC destination".into())
        );
        assert_eq!(
            decide(
                false,
                None,
                InsecureMx::Dane,
                true,
                Some(&TlsaLookup::Error),
                d,
                "mx:25"
            ),
            Decision::Defer("TLSA lookup error for mx:25".into())
        );
        assert_eq!(
            decide(false, Some(true), InsecureMx::Dane, false, None, d, "mx:25"),
            Decision::May
        );
    }

    #[test]
    fn resolv_conf() {
        let (s, ad) = parse_resolv_conf("nameserver 127.0.0.53\noptions edns0 trust-ad\n");
        assert_eq!(s, vec!["127.0.0.53:53".parse().unwrap()]);
        assert!(ad);
        assert!(!parse_resolv_conf("nameserver 1.1.1.1\n").1);
    }

    #[test]
    fn spki_of_garbage_is_none() {
        assert_eq!(spki(&[]), None);
        assert_eq!(spki(&[0x30, 0x84, 0xff, 0xff, 0xff, 0xff]), None);
        assert_eq!(spki(&[0x30, 0x03, 0x30, 0x01, 0x00]), None);
    }
}
