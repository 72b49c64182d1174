//! DNS lookups for the SMTP client: MX records and host addresses.
//!
//! [`Lookup`] is what the rest of the agent sees; [`Resolver`] implements
//! it with hickory-resolver 0.26, which has no synchronous API: it runs on
//! a current-thread tokio runtime owned by the resolver, used for DNS only.
//! Name servers come from `dns_resolver_addresses` (Postern-only: `host`
//! or `host:port` items) or else from /etc/resolv.conf; each query waits
//! `dns_resolver_timeout`.
//!
//! Errors keep Postfix's wording: `Host or domain name not found. Name
//! service error for name=NAME type=TYPE: TEXT`, where TEXT is `Host not
//! found` (NXDOMAIN), `Host found but no data record of requested type`
//! (no record of that type), or `Host not found, try again` (SERVFAIL,
//! REFUSED, time-out, no answer).

use hickory_resolver::net::{DnsError as HDnsError, NetError};
use hickory_resolver::proto::op::ResponseCode;
use hickory_resolver::proto::rr::{Name, RData, RecordType};
use hickory_resolver::TokioResolver;
use postern_common::dns::BlockingResolver;
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

    fn lookup(
        &self,
        name: &str,
        rtype: RecordType,
        tname: &'static str,
    ) -> Result<Vec<RData>, DnsError> {
        let q = Self::fqdn(name, tname)?;
        let res = self
            .rt
            .block_on(async { self.resolver.lookup(q, rtype).await });
        match res {
            Ok(l) => Ok(l
                .answers()
                .iter()
                .filter(|r| r.record_type() == rtype)
                .map(|r| r.data.clone())
                .collect()),
            Err(e) => Err(DnsError::new(classify(&e), name, tname)),
        }
    }
}

/// Maps hickory's error to Postfix's three outcomes.
fn classify(e: &NetError) -> ErrorKind {
    match e {
        NetError::Dns(HDnsError::NoRecordsFound(nr)) => match nr.response_code {
            ResponseCode::NXDomain => ErrorKind::NotFound,
            ResponseCode::NoError => ErrorKind::NoData,
            _ => ErrorKind::TryAgain,
        },
        _ => ErrorKind::TryAgain,
    }
}

impl Lookup for Resolver {
    fn mx(&self, name: &str) -> Result<Vec<Mx>, DnsError> {
        let v = self.lookup(name, RecordType::MX, "MX")?;
        let mx: Vec<Mx> = v
            .into_iter()
            .filter_map(|d| match d {
                RData::MX(mx) => Some(Mx {
                    preference: mx.preference,
                    exchange: if mx.exchange.is_root() {
                        ".".to_string()
                    } else {
                        mx.exchange.to_utf8().trim_end_matches('.').to_string()
                    },
                }),
                _ => None,
            })
            .collect();
        if mx.is_empty() {
            return Err(DnsError::new(ErrorKind::NoData, name, "MX"));
        }
        Ok(mx)
    }

    fn addrs(&self, name: &str, v6: bool) -> Result<Vec<IpAddr>, DnsError> {
        let (rtype, tname) = if v6 {
            (RecordType::AAAA, "AAAA")
        } else {
            (RecordType::A, "A")
        };
        let v: Vec<IpAddr> = self
            .lookup(name, rtype, tname)?
            .into_iter()
            .filter_map(|d| match d {
                RData::A(a) => Some(IpAddr::V4(a.0)),
                RData::AAAA(a) => Some(IpAddr::V6(a.0)),
                _ => None,
            })
            .collect();
        if v.is_empty() {
            return Err(DnsError::new(ErrorKind::NoData, name, tname));
        }
        Ok(v)
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
