//! DNS lookups for the SMTP client: MX records and host addresses.
//!
//! [`Lookup`] is what the rest of the agent sees; [`Resolver`] implements
//! it with hickory-resolver 0.26, which has no synchronous API: it runs on
//! a current-thread tokio runtime owned by the resolver, used for DNS only.
//! Name servers come from `dns_resolver_addresses` (Postern-only: `host`
//! or `host:port` items) or else from /etc/resolv.conf; each query waits
//! `dns_resolver_timeout`.
//!
//! What an answer means is decided by pure functions of its records
//! ([`mx_answer`], [`addr_answer`], [`rcode_kind`]), which the fuzz target
//! `dns_answer` feeds with DNS messages straight from the wire.
//!
//! Errors keep Postfix's wording: `Host or domain name not found. Name
//! service error for name=NAME type=TYPE: TEXT`, where TEXT is `Host not
//! found` (NXDOMAIN), `Host found but no data record of requested type`
//! (no record of that type), or `Host not found, try again` (SERVFAIL,
//! REFUSED, time-out, no answer).

use hickory_resolver::net::{DnsError as HDnsError, NetError};
use hickory_resolver::proto::op::ResponseCode;
use hickory_resolver::proto::rr::{Name, RData, Record, RecordType};
use hickory_resolver::TokioResolver;
use postern_common::dns::BlockingResolver;
use postern_common::hostname;
use postern_common::warning;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

/// Why a lookup gave no answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The name does not exist (NXDOMAIN): permanent.
    NotFound,
    /// The name exists but has no record of the type asked: permanent.
    NoData,
    /// The name server failed or did not answer: temporary.
    TryAgain,
    /// Not a valid domain name: permanent.
    Invalid,
    /// Records of the type asked, none of them usable (an MX host that is
    /// not a valid host name): permanent.
    Malformed,
}

/// A failed lookup of one name and type.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DnsError {
    pub kind: ErrorKind,
    pub name: String,
    /// "MX", "A", "AAAA".
    pub rtype: &'static str,
}

impl DnsError {
    pub fn new(kind: ErrorKind, name: &str, rtype: &'static str) -> DnsError {
        DnsError {
            kind,
            name: name.trim_end_matches('.').to_string(),
            rtype,
        }
    }

    /// Whether trying again later may help.
    pub fn is_temporary(&self) -> bool {
        self.kind == ErrorKind::TryAgain
    }

    /// Postfix's text for the error.
    pub fn text(&self) -> String {
        let what = match self.kind {
            ErrorKind::NotFound => "Host not found",
            ErrorKind::NoData => "Host found but no data record of requested type",
            ErrorKind::TryAgain => "Host not found, try again",
            ErrorKind::Malformed => "Malformed or unexpected name server reply",
            ErrorKind::Invalid => {
                return format!(
                    "Name service error for {}: invalid host or domain name",
                    self.name
                )
            }
        };
        format!(
            "Host or domain name not found. Name service error for name={} type={}: {}",
            self.name, self.rtype, what
        )
    }
}

/// One MX record. `exchange` is "." for the root (a null MX).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mx {
    pub preference: u16,
    pub exchange: String,
}

/// The lookups the next-hop code needs; [`Resolver`] asks DNS, tests
/// use a table.
pub trait Lookup {
    /// The MX records of `name`.
    fn mx(&self, name: &str) -> Result<Vec<Mx>, DnsError>;
    /// The IPv4 (`v6` false, type A) or IPv6 (type AAAA) addresses of `name`.
    fn addrs(&self, name: &str, v6: bool) -> Result<Vec<IpAddr>, DnsError>;
}

/// A DNS resolver on its own current-thread tokio runtime.
pub struct Resolver {
    rt: tokio::runtime::Runtime,
    resolver: TokioResolver,
}

impl Resolver {
    /// A resolver asking `servers` (UDP, then TCP for truncated answers),
    /// or the servers of /etc/resolv.conf when `servers` is empty, waiting
    /// `timeout` for each answer.
    pub fn new(servers: &[SocketAddr], timeout: Duration) -> Result<Resolver, String> {
        let BlockingResolver { rt, resolver } = BlockingResolver::new(servers, timeout)?;
        Ok(Resolver { rt, resolver })
    }

    /// A fully qualified name, so that no search domain is appended.
    fn fqdn(name: &str, rtype: &'static str) -> Result<Name, DnsError> {
        let invalid = || DnsError::new(ErrorKind::Invalid, name, rtype);
        if name.is_empty() || name.starts_with('.') || name.contains("..") {
            return Err(invalid());
        }
        let mut n = Name::from_utf8(name).map_err(|_| invalid())?;
        n.set_fqdn(true);
        Ok(n)
    }

    /// The answer records of `name`'s `rtype` query; a failed lookup as
    /// [`rcode_kind`] classifies it.
    fn lookup(
        &self,
        name: &str,
        rtype: RecordType,
        tname: &'static str,
    ) -> Result<Vec<Record>, DnsError> {
        let q = Self::fqdn(name, tname)?;
        let res = self
            .rt
            .block_on(async { self.resolver.lookup(q, rtype).await });
        match res {
            Ok(l) => Ok(l.answers().to_vec()),
            Err(e) => Err(DnsError::new(classify(&e), name, tname)),
        }
    }
}

/// Maps hickory's error to Postfix's three outcomes.
fn classify(e: &NetError) -> ErrorKind {
    match e {
        NetError::Dns(HDnsError::NoRecordsFound(nr)) => rcode_kind(nr.response_code),
        _ => ErrorKind::TryAgain,
    }
}

/// What a response code with no usable record means: NXDOMAIN is "not
/// found", NOERROR "no data", anything else (SERVFAIL, REFUSED, ...) a
/// temporary failure.
pub fn rcode_kind(rc: ResponseCode) -> ErrorKind {
    match rc {
        ResponseCode::NXDomain => ErrorKind::NotFound,
        ResponseCode::NoError => ErrorKind::NoData,
        _ => ErrorKind::TryAgain,
    }
}

/// The MX records among the answer records of an MX query for `name`
/// (other types, such as the CNAMEs of a chain, are skipped). A root
/// exchange is kept as "." (a null MX, for [`crate::nexthop`] to judge);
/// an exchange that is not a valid host name is skipped with a warning, as
/// Postfix's dns_lookup does; none left is "no data", or "malformed" when
/// every MX record was skipped.
pub fn mx_answer(name: &str, answers: &[Record]) -> Result<Vec<Mx>, DnsError> {
    let mut mx = Vec::new();
    let mut skipped = false;
    for r in answers {
        let RData::MX(m) = &r.data else { continue };
        let exchange = if m.exchange.is_root() {
            ".".to_string()
        } else {
            m.exchange.to_utf8().trim_end_matches('.').to_string()
        };
        if exchange != "." && !mx_name_ok(&exchange) {
            warning!(
                "malformed domain name in resource data of MX record for {}: {:.100}",
                name.trim_end_matches('.'),
                exchange
            );
            skipped = true;
            continue;
        }
        mx.push(Mx {
            preference: m.preference,
            exchange,
        });
    }
    if mx.is_empty() {
        let kind = if skipped {
            ErrorKind::Malformed
        } else {
            ErrorKind::NoData
        };
        return Err(DnsError::new(kind, name, "MX"));
    }
    Ok(mx)
}

/// The addresses among the answer records of an A (`v6` false) or AAAA
/// query for `name`; none is "no data".
pub fn addr_answer(name: &str, answers: &[Record], v6: bool) -> Result<Vec<IpAddr>, DnsError> {
    let v: Vec<IpAddr> = answers
        .iter()
        .filter_map(|r| match &r.data {
            RData::A(a) if !v6 => Some(IpAddr::V4(a.0)),
            RData::AAAA(a) if v6 => Some(IpAddr::V6(a.0)),
            _ => None,
        })
        .collect();
    if v.is_empty() {
        return Err(DnsError::new(
            ErrorKind::NoData,
            name,
            if v6 { "AAAA" } else { "A" },
        ));
    }
    Ok(v)
}

/// An MX host as Postfix takes it from DNS: a valid host name, or an
/// IPv4 address in name form (`10.0.0.1`), which Postfix uses as the
/// address.
fn mx_name_ok(name: &str) -> bool {
    hostname::valid_hostname(name) || hostname::valid_ipv4_hostaddr(name)
}

impl Lookup for Resolver {
    fn mx(&self, name: &str) -> Result<Vec<Mx>, DnsError> {
        mx_answer(name, &self.lookup(name, RecordType::MX, "MX")?)
    }

    fn addrs(&self, name: &str, v6: bool) -> Result<Vec<IpAddr>, DnsError> {
        let (rtype, tname) = if v6 {
            (RecordType::AAAA, "AAAA")
        } else {
            (RecordType::A, "A")
        };
        addr_answer(name, &self.lookup(name, rtype, tname)?, v6)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_texts() {
        assert_eq!(
            DnsError::new(ErrorKind::NotFound, "nx.test.", "MX").text(),
            "Host or domain name not found. Name service error for name=nx.test type=MX: Host not found"
        );
        assert_eq!(
            DnsError::new(ErrorKind::TryAgain, "x.test", "MX").text(),
            "Host or domain name not found. Name service error for name=x.test type=MX: Host not found, try again"
        );
    }

    fn rec(name: &str, data: RData) -> Record {
        Record::from_rdata(Name::from_utf8(name).unwrap(), 300, data)
    }

    #[test]
    fn answers_to_mx_and_addresses() {
        use hickory_resolver::proto::rr::rdata::{A, AAAA, CNAME, MX};
        let answers = vec![
            rec(
                "alias.test.",
                RData::CNAME(CNAME(Name::from_utf8("real.test.").unwrap())),
            ),
            rec(
                "real.test.",
                RData::MX(MX::new(20, Name::from_utf8("mx2.real.test.").unwrap())),
            ),
            rec(
                "real.test.",
                RData::MX(MX::new(10, Name::from_utf8("mx1.real.test.").unwrap())),
            ),
            rec(
                "real.test.",
                RData::MX(MX::new(
                    5,
                    Name::from_labels(vec![b"bad name" as &[u8], b"test"]).unwrap(),
                )),
            ),
        ];
        let mx = mx_answer("alias.test", &answers).unwrap();
        assert_eq!(
            mx.iter()
                .map(|m| (m.preference, m.exchange.as_str()))
                .collect::<Vec<_>>(),
            vec![(20, "mx2.real.test"), (10, "mx1.real.test")]
        );
        assert_eq!(
            mx_answer("alias.test", &answers[3..]).unwrap_err().text(),
            "Host or domain name not found. Name service error for name=alias.test \
             type=MX: Malformed or unexpected name server reply"
        );
        let null = vec![rec("n.test.", RData::MX(MX::new(0, Name::root())))];
        assert_eq!(mx_answer("n.test", &null).unwrap()[0].exchange, ".");
        assert_eq!(
            mx_answer("x.test", &[]).unwrap_err().kind,
            ErrorKind::NoData
        );
        let addrs = vec![
            rec("h.test.", RData::A(A::new(127, 0, 0, 9))),
            rec("h.test.", RData::AAAA(AAAA::new(0, 0, 0, 0, 0, 0, 0, 1))),
        ];
        assert_eq!(
            addr_answer("h.test", &addrs, false).unwrap(),
            vec!["127.0.0.9".parse::<IpAddr>().unwrap()]
        );
        assert_eq!(
            addr_answer("h.test", &addrs, true).unwrap(),
            vec!["::1".parse::<IpAddr>().unwrap()]
        );
        assert_eq!(rcode_kind(ResponseCode::NXDomain), ErrorKind::NotFound);
        assert_eq!(rcode_kind(ResponseCode::ServFail), ErrorKind::TryAgain);
        assert!(mx_name_ok("mx-1.example_x.test"));
        assert!(mx_name_ok("10.0.0.1"));
        assert!(!mx_name_ok("123"));
        assert!(!mx_name_ok("-a.test"));
        assert!(!mx_name_ok("a..test"));
    }

    /// Runs dnsmasq on a free loopback port and checks every answer shape
    /// against it. `cargo test -p postern-smtp -- --ignored` (needs
    /// dnsmasq: `apt-get install dnsmasq-base`).
    #[test]
    #[ignore]
    fn against_dnsmasq() {
        let port = {
            let s = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
            s.local_addr().unwrap().port()
        };
        /// Stops dnsmasq however the test ends.
        struct Kill(std::process::Child);
        impl Drop for Kill {
            fn drop(&mut self) {
                let _ = self.0.kill();
                let _ = self.0.wait();
            }
        }
        let _child = Kill(
            std::process::Command::new("dnsmasq")
                .args([
                    "--no-daemon",
                    &format!("--port={port}"),
                    "--listen-address=127.0.0.1",
                    "--bind-interfaces",
                    "--no-resolv",
                    "--no-hosts",
                    "--mx-host=example.test,mx1.example.test,10",
                    "--mx-host=example.test,mx2.example.test,20",
                    "--address=/mx1.example.test/127.0.0.9",
                    "--address=/mx2.example.test/127.0.0.10",
                    "--host-record=only-a.test,127.0.0.7",
                    "--mx-host=nullmx.test,.,0",
                    "--local=/test/",
                    "--server=/servfail.test/127.0.0.1#1",
                ])
                .stdin(std::process::Stdio::null())
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()
                .expect("dnsmasq"),
        );
        std::thread::sleep(Duration::from_millis(500));
        let r = Resolver::new(
            &[format!("127.0.0.1:{port}").parse().unwrap()],
            Duration::from_secs(1),
        )
        .unwrap();
        let mut mx = r.mx("example.test").unwrap();
        mx.sort_by_key(|m| m.preference);
        assert_eq!(
            mx,
            vec![
                Mx {
                    preference: 10,
                    exchange: "mx1.example.test".into()
                },
                Mx {
                    preference: 20,
                    exchange: "mx2.example.test".into()
                }
            ]
        );
        assert_eq!(
            r.addrs("mx1.example.test", false).unwrap(),
            vec!["127.0.0.9".parse::<IpAddr>().unwrap()]
        );
        assert_eq!(r.mx("nullmx.test").unwrap()[0].exchange, ".");
        assert_eq!(r.mx("only-a.test").unwrap_err().kind, ErrorKind::NoData);
        assert_eq!(
            r.addrs("only-a.test", true).unwrap_err().kind,
            ErrorKind::NoData
        );
        assert_eq!(r.mx("nosuch.test").unwrap_err().kind, ErrorKind::NotFound);
        assert_eq!(
            r.mx("a.servfail.test").unwrap_err().kind,
            ErrorKind::TryAgain
        );
        // The system configuration can be read.
        assert!(Resolver::new(&[], Duration::from_secs(1)).is_ok());
    }
}
