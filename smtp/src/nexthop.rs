//! From a delivery request's next hop to the list of servers to try.
//!
//! Next-hop syntax, as Postfix's smtp(8): `[host]:port` and `[host]` name
//! one host (an IP literal, `[ipv6:...]` accepted, or a name looked up as
//! A/AAAA, no MX lookup); `host:port` and `host` are a domain whose MX
//! hosts are looked up (then their A/AAAA records), falling back to the
//! domain's own addresses when it has no MX record. The port is a number
//! or a service name (`smtp`, `submission`, ...); the default is 25.
//!
//! MX hosts are sorted by preference, equal preferences shuffled; the
//! addresses of each host follow in order, IPv4 before IPv6 (as
//! `inet_protocols` allows), and the list is cut at
//! `smtp_mx_address_limit` addresses. A null MX (RFC 7505) and a domain
//! that does not exist fail for good; a name-server failure is temporary.
//! The lookups themselves are in [`crate::dns`]; nothing here is specific
//! to a DNS library or to SMTP.

use crate::dns::{DnsError, ErrorKind, Lookup};
use postern_common::warning;
use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};
use std::net::IpAddr;

/// A parsed next hop.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NextHop {
    /// Host or domain, without brackets.
    pub host: String,
    pub port: u16,
    /// Look up MX records (no brackets were given).
    pub mx: bool,
}

/// Ports for the service names a next hop may use.
fn service_port(s: &str) -> Option<u16> {
    if let Ok(n) = s.parse::<u16>() {
        return (n != 0).then_some(n);
    }
    match s.to_ascii_lowercase().as_str() {
        "smtp" => Some(25),
        "lmtp" => Some(24),
        "submission" => Some(587),
        "smtps" | "submissions" => Some(465),
        _ => None,
    }
}

/// Parses `[host]:port`, `[host]`, `host:port`, `host`. An IP address
/// without brackets is taken as if bracketed (there is no MX to look up).
pub fn parse(s: &str) -> Result<NextHop, String> {
    parse_with_port(s, 25)
}

/// Where an LMTP client connects (Postfix's lmtp(8) next hops).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LmtpHop {
    /// `unix:PATH`; a relative path is relative to `queue_directory`.
    Unix(String),
    /// `inet:host:port`, `inet:[host]:port`, `host:port`, ...: the
    /// host's own addresses (LMTP never looks up MX records); port 24
    /// when none is given.
    Inet(NextHop),
}

/// Parses an LMTP next hop (see [`LmtpHop`]).
pub fn parse_lmtp(s: &str) -> Result<LmtpHop, String> {
    let s = s.trim();
    if let Some(path) = s.strip_prefix("unix:") {
        if path.is_empty() {
            return Err(format!("bad next-hop destination: \"{s}\""));
        }
        return Ok(LmtpHop::Unix(path.to_string()));
    }
    let rest = s.strip_prefix("inet:").unwrap_or(s);
    let mut hop = parse_with_port(rest, 24)?;
    hop.mx = false;
    Ok(LmtpHop::Inet(hop))
}

fn parse_with_port(s: &str, default_port: u16) -> Result<NextHop, String> {
    let s = s.trim();
    let bad = || format!("bad next-hop destination: \"{s}\"");
    if let Some(rest) = s.strip_prefix('[') {
        let close = rest.find(']').ok_or_else(bad)?;
        let mut host = &rest[..close];
        // `get`: byte 5 may fall inside a UTF-8 character (found by the
        // dns_answer fuzz target).
        if host.len() > 5
            && host
                .get(..5)
                .is_some_and(|p| p.eq_ignore_ascii_case("ipv6:"))
        {
            host = &host[5..];
        }
        let port = match &rest[close + 1..] {
            "" => default_port,
            p => service_port(p.strip_prefix(':').ok_or_else(bad)?).ok_or_else(bad)?,
        };
        if host.is_empty() {
            return Err(bad());
        }
        return Ok(NextHop {
            host: host.to_string(),
            port,
            mx: false,
        });
    }
    if s.parse::<IpAddr>().is_ok() {
        // A bare IPv6 address: its colons are not a port.
        return Ok(NextHop {
            host: s.to_string(),
            port: default_port,
            mx: false,
        });
    }
    let (host, port) = match s.rsplit_once(':') {
        Some((h, p)) => (h, service_port(p).ok_or_else(bad)?),
        None => (s, default_port),
    };
    let host = host.trim_end_matches('.');
    if host.is_empty() || host.contains(['[', ']', ' ', '@']) {
        return Err(bad());
    }
    let mx = host.parse::<IpAddr>().is_err();
    Ok(NextHop {
        host: host.to_string(),
        port,
        mx,
    })
}

/// One address to try.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Server {
    /// The host name (MX exchange, or the next hop's host); for an IP
    /// literal, the address itself.
    pub name: String,
    pub addr: IpAddr,
    pub port: u16,
}

impl Server {
    /// `name[addr]`, as Postfix names a peer in reasons.
    pub fn namaddr(&self) -> String {
        format!("{}[{}]", self.name, self.addr)
    }

    /// `name[addr]:port`, the `relay=` field.
    pub fn relay(&self) -> String {
        format!("{}[{}]:{}", self.name, self.addr, self.port)
    }
}

/// Why no server could be found: deliver nothing, record this for every
/// recipient (bounced when `dsn` starts with 5, else deferred).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    pub dsn: String,
    pub reason: String,
}

impl Failure {
    pub fn is_permanent(&self) -> bool {
        self.dsn.starts_with('5')
    }
}

/// `dsn` with class 4 (temporary) whatever its class, for a failure that
/// must never bounce.
pub fn temporary_dsn(mut dsn: String) -> String {
    if !dsn.starts_with('4') {
        dsn.replace_range(0..1, "4");
    }
    dsn
}

/// How to build the list.
#[derive(Debug, Clone)]
pub struct Options {
    /// Most addresses to return; 0 = no limit (`smtp_mx_address_limit`).
    pub address_limit: usize,
    pub ipv4: bool,
    pub ipv6: bool,
}

impl Options {
    /// From `inet_protocols` (`all`, `ipv4`, `ipv6`, `ipv4, ipv6`).
    pub fn protocols(list: &[String], address_limit: usize) -> Options {
        let has = |w: &str| list.iter().any(|x| x.eq_ignore_ascii_case(w));
        let all = list.is_empty() || has("all");
        Options {
            address_limit,
            ipv4: all || has("ipv4"),
            ipv6: all || has("ipv6"),
        }
    }
}

/// A small random source for shuffling equal-preference MX hosts.
struct Shuffle(u64);

impl Shuffle {
    fn new() -> Shuffle {
        let mut h = RandomState::new().build_hasher();
        h.write_u32(std::process::id());
        Shuffle(h.finish() | 1)
    }

    fn below(&mut self, n: usize) -> usize {
        // xorshift64*
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        (self.0.wrapping_mul(0x2545_F491_4F6C_DD1D) % n as u64) as usize
    }
}

/// Sorts MX records by preference and shuffles each group of equal
/// preference.
fn sort_mx(mx: &mut [crate::dns::Mx]) {
    mx.sort_by_key(|m| m.preference);
    let mut rng = Shuffle::new();
    let mut i = 0;
    while i < mx.len() {
        let mut j = i + 1;
        while j < mx.len() && mx[j].preference == mx[i].preference {
            j += 1;
        }
        let group = &mut mx[i..j];
        for k in (1..group.len()).rev() {
            group.swap(k, rng.below(k + 1));
        }
        i = j;
    }
}

/// The addresses of one host, A then AAAA as allowed. A host with some
/// addresses ignores the failure of the other type; when both fail, a
/// temporary failure wins over a permanent one.
fn host_addrs(dns: &dyn Lookup, host: &str, opt: &Options) -> Result<Vec<IpAddr>, DnsError> {
    if let Ok(ip) = host.parse::<IpAddr>() {
        return Ok(vec![ip]);
    }
    let mut out = Vec::new();
    let mut err: Option<DnsError> = None;
    for v6 in [false, true] {
        if (v6 && !opt.ipv6) || (!v6 && !opt.ipv4) {
            continue;
        }
        match dns.addrs(host, v6) {
            Ok(a) => out.extend(a.into_iter().filter(|ip| ip.is_ipv6() == v6)),
            Err(e) => {
                if !err.as_ref().is_some_and(|p| p.is_temporary()) {
                    err = Some(e);
                }
            }
        }
    }
    if out.is_empty() {
        return Err(err.unwrap_or_else(|| DnsError::new(ErrorKind::NoData, host, "A")));
    }
    Ok(out)
}

fn dns_failure(e: &DnsError) -> Failure {
    let dsn = match e.kind {
        ErrorKind::TryAgain => "4.4.3",
        _ => "5.4.4",
    };
    Failure {
        dsn: dsn.into(),
        reason: e.text(),
    }
}

/// The servers to try for `hop`, best first.
pub fn servers(hop: &NextHop, dns: &dyn Lookup, opt: &Options) -> Result<Vec<Server>, Failure> {
    let mut out: Vec<Server> = Vec::new();
    let limit = |v: &mut Vec<Server>| {
        if opt.address_limit > 0 {
            v.truncate(opt.address_limit);
        }
    };
    let direct = |out: &mut Vec<Server>| -> Result<(), Failure> {
        let addrs = host_addrs(dns, &hop.host, opt).map_err(|e| dns_failure(&e))?;
        out.extend(addrs.into_iter().map(|addr| Server {
            name: hop.host.clone(),
            addr,
            port: hop.port,
        }));
        Ok(())
    };
    if !hop.mx {
        direct(&mut out)?;
        limit(&mut out);
        return Ok(out);
    }
    let mut mx = match dns.mx(&hop.host) {
        Ok(mx) => mx,
        Err(e) if e.kind == ErrorKind::NoData => {
            direct(&mut out)?;
            limit(&mut out);
            return Ok(out);
        }
        Err(e) => return Err(dns_failure(&e)),
    };
    if mx.len() == 1 && mx[0].exchange == "." {
        return Err(Failure {
            dsn: "5.1.10".into(),
            reason: format!("Domain {} does not accept mail (nullMX)", hop.host),
        });
    }
    mx.retain(|m| m.exchange != ".");
    sort_mx(&mut mx);
    let mut err: Option<DnsError> = None;
    for m in &mx {
        if opt.address_limit > 0 && out.len() >= opt.address_limit {
            break;
        }
        match host_addrs(dns, &m.exchange, opt) {
            Ok(addrs) => out.extend(addrs.into_iter().map(|addr| Server {
                name: m.exchange.clone(),
                addr,
                port: hop.port,
            })),
            Err(e) => {
                if !err.as_ref().is_some_and(|p| p.is_temporary()) {
                    err = Some(e);
                }
            }
        }
    }
    if out.is_empty() {
        warning!("no MX host for {} has a valid address record", hop.host);
        let e = err.unwrap_or_else(|| DnsError::new(ErrorKind::NoData, &hop.host, "MX"));
        return Err(dns_failure(&e));
    }
    limit(&mut out);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dns::Mx;
    use std::collections::HashMap;

    #[test]
    fn lmtp_next_hops() {
        assert_eq!(
            parse_lmtp("unix:private/dovecot-lmtp"),
            Ok(LmtpHop::Unix("private/dovecot-lmtp".into()))
        );
        assert_eq!(
            parse_lmtp("unix:/run/dovecot/lmtp"),
            Ok(LmtpHop::Unix("/run/dovecot/lmtp".into()))
        );
        let inet = |h: &str, port| {
            Ok(LmtpHop::Inet(NextHop {
                host: h.into(),
                port,
                mx: false,
            }))
        };
        assert_eq!(parse_lmtp("inet:127.0.0.1:2424"), inet("127.0.0.1", 2424));
        assert_eq!(parse_lmtp("inet:mail.test"), inet("mail.test", 24));
        assert_eq!(parse_lmtp("[mail.test]:25"), inet("mail.test", 25));
        assert_eq!(parse_lmtp("mail.test"), inet("mail.test", 24));
        assert!(parse_lmtp("unix:").is_err());
        assert!(parse_lmtp("inet:[x").is_err());
    }

    #[test]
    fn parsing() {
        let p = |s: &str| parse(s).unwrap();
        assert_eq!(
            p("[127.0.0.1]:2525"),
            NextHop {
                host: "127.0.0.1".into(),
                port: 2525,
                mx: false
            }
        );
        assert_eq!(p("[mail.example.test]").port, 25);
        assert!(!p("[mail.example.test]").mx);
        assert_eq!(p("[ipv6:::1]:26").host, "::1");
        assert_eq!(p("[::1]").host, "::1");
        assert_eq!(
            p("example.test:587"),
            NextHop {
                host: "example.test".into(),
                port: 587,
                mx: true
            }
        );
        assert_eq!(p("Example.test.").host, "Example.test");
        assert_eq!(p("example.test:smtp").port, 25);
        assert!(!p("10.1.2.3").mx);
        assert!(!p("10.1.2.3:26").mx);
        assert!(!p("::1").mx);
        assert!(parse("[x").is_err());
        assert!(parse("[x]26").is_err());
        assert!(parse("x:bogus").is_err());
        assert!(parse("").is_err());
        assert!(parse("[]").is_err());
    }

    /// Regression (fuzz/corpus/dns_answer/regress_utf8_bracketed_hop): a
    /// bracketed host with a multi-byte character across byte 5 panicked.
    #[test]
    fn bracketed_utf8_host() {
        assert_eq!(
            parse("[ca\u{488}\u{482}.]").unwrap().host,
            "ca\u{488}\u{482}."
        );
        assert_eq!(parse("[ipv6\u{e9}x]").unwrap().host, "ipv6\u{e9}x");
        assert!(parse_lmtp("inet:[\u{e9}\u{e9}\u{e9}]:24").is_ok());
    }

    #[derive(Default)]
    struct Table {
        mx: HashMap<String, Result<Vec<Mx>, ErrorKind>>,
        a: HashMap<String, Result<Vec<IpAddr>, ErrorKind>>,
        aaaa: HashMap<String, Result<Vec<IpAddr>, ErrorKind>>,
    }

    impl Lookup for Table {
        fn mx(&self, name: &str) -> Result<Vec<Mx>, DnsError> {
            match self.mx.get(name) {
                Some(Ok(v)) => Ok(v.clone()),
                Some(Err(k)) => Err(DnsError::new(*k, name, "MX")),
                None => Err(DnsError::new(ErrorKind::NotFound, name, "MX")),
            }
        }
        fn addrs(&self, name: &str, v6: bool) -> Result<Vec<IpAddr>, DnsError> {
            let (t, n) = if v6 {
                (&self.aaaa, "AAAA")
            } else {
                (&self.a, "A")
            };
            match t.get(name) {
                Some(Ok(v)) => Ok(v.clone()),
                Some(Err(k)) => Err(DnsError::new(*k, name, n)),
                None => Err(DnsError::new(ErrorKind::NoData, name, n)),
            }
        }
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn mx(p: u16, e: &str) -> Mx {
        Mx {
            preference: p,
            exchange: e.into(),
        }
    }

    const ALL: Options = Options {
        address_limit: 0,
        ipv4: true,
        ipv6: true,
    };

    #[test]
    fn mx_order_and_addresses() {
        let mut t = Table::default();
        t.mx.insert(
            "ex.test".into(),
            Ok(vec![
                mx(20, "b.ex.test"),
                mx(10, "a1.ex.test"),
                mx(10, "a2.ex.test"),
            ]),
        );
        t.a.insert("a1.ex.test".into(), Ok(vec![ip("127.0.0.1")]));
        t.aaaa.insert("a1.ex.test".into(), Ok(vec![ip("::1")]));
        t.a.insert("a2.ex.test".into(), Ok(vec![ip("127.0.0.2")]));
        t.a.insert("b.ex.test".into(), Ok(vec![ip("127.0.0.3")]));
        let hop = parse("ex.test").unwrap();
        let mut seen_first = std::collections::HashSet::new();
        for _ in 0..50 {
            let s = servers(&hop, &t, &ALL).unwrap();
            assert_eq!(s.len(), 4);
            assert_eq!(s[3].name, "b.ex.test");
            assert_eq!(s[3].port, 25);
            seen_first.insert(s[0].name.clone());
            // Each host's addresses stay together, IPv4 first.
            if s[0].name == "a1.ex.test" {
                assert_eq!((s[0].addr, s[1].addr), (ip("127.0.0.1"), ip("::1")));
            } else {
                assert_eq!(s[1].addr, ip("127.0.0.1"));
            }
        }
        assert_eq!(seen_first.len(), 2, "equal preferences are shuffled");
        let limited = servers(
            &hop,
            &t,
            &Options {
                address_limit: 2,
                ..ALL
            },
        )
        .unwrap();
        assert_eq!(limited.len(), 2);
        let v4 = servers(&hop, &t, &Options::protocols(&["ipv4".into()], 0)).unwrap();
        assert!(v4.iter().all(|s| s.addr.is_ipv4()));
    }

    #[test]
    fn fallbacks_and_failures() {
        let mut t = Table::default();
        t.mx.insert("noma.test".into(), Err(ErrorKind::NoData));
        t.a.insert("noma.test".into(), Ok(vec![ip("127.0.0.7")]));
        t.mx.insert("null.test".into(), Ok(vec![mx(0, ".")]));
        t.mx.insert("fail.test".into(), Err(ErrorKind::TryAgain));
        t.mx.insert("bad.test".into(), Ok(vec![mx(10, "gone.test")]));
        t.a.insert("gone.test".into(), Err(ErrorKind::NotFound));
        t.aaaa.insert("gone.test".into(), Err(ErrorKind::NotFound));
        t.mx.insert(
            "half.test".into(),
            Ok(vec![mx(10, "soft.test"), mx(20, "gone.test")]),
        );
        t.a.insert("soft.test".into(), Err(ErrorKind::TryAgain));

        let s = servers(&parse("noma.test:2525").unwrap(), &t, &ALL).unwrap();
        assert_eq!(
            s,
            vec![Server {
                name: "noma.test".into(),
                addr: ip("127.0.0.7"),
                port: 2525
            }]
        );
        assert_eq!(
            servers(&parse("[noma.test]").unwrap(), &t, &ALL).unwrap()[0].addr,
            ip("127.0.0.7")
        );
        let s = servers(&parse("[127.0.0.5]:26").unwrap(), &t, &ALL).unwrap();
        assert_eq!(s[0].namaddr(), "127.0.0.5[127.0.0.5]");
        assert_eq!(s[0].relay(), "127.0.0.5[127.0.0.5]:26");

        let f = servers(&parse("null.test").unwrap(), &t, &ALL).unwrap_err();
        assert_eq!(f.dsn, "5.1.10");
        assert_eq!(f.reason, "Domain null.test does not accept mail (nullMX)");
        let f = servers(&parse("nx.test").unwrap(), &t, &ALL).unwrap_err();
        assert_eq!(
            (f.dsn.as_str(), f.reason.as_str()),
            ("5.4.4", "Host or domain name not found. Name service error for name=nx.test type=MX: Host not found")
        );
        let f = servers(&parse("fail.test").unwrap(), &t, &ALL).unwrap_err();
        assert_eq!(f.dsn, "4.4.3");
        assert!(f.reason.ends_with("type=MX: Host not found, try again"));
        let f = servers(&parse("bad.test").unwrap(), &t, &ALL).unwrap_err();
        assert!(f.is_permanent());
        assert!(f.reason.contains("name=gone.test"));
        // A temporary failure of one MX host makes the whole failure temporary.
        let f = servers(&parse("half.test").unwrap(), &t, &ALL).unwrap_err();
        assert_eq!(f.dsn, "4.4.3");
        assert!(f.reason.contains("name=soft.test type=A"));
        let f = servers(&parse("[nohost.test]").unwrap(), &t, &ALL).unwrap_err();
        assert_eq!(f.dsn, "5.4.4");
    }
}
