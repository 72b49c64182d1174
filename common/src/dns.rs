//! The DNS resolver the daemons share: hickory-resolver on a
//! current-thread tokio runtime (hickory has no blocking API), asking the
//! name servers of `dns_resolver_addresses` (Postern-only: for tests, or a
//! host with a dedicated resolver) or those of /etc/resolv.conf, waiting
//! `dns_resolver_timeout` for an answer. What is asked, and what an
//! answer means, stays with each daemon (MX routing in smtp, DNS
//! restrictions in smtpd).

use crate::warning;
use hickory_resolver::config::{ConnectionConfig, NameServerConfig, ResolverConfig};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::TokioResolver;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

/// One `dns_resolver_addresses` item: `1.2.3.4`, `1.2.3.4:5353`, `[::1]:53`.
pub fn parse_server(item: &str) -> Option<SocketAddr> {
    if let Ok(sa) = item.parse::<SocketAddr>() {
        return Some(sa);
    }
    let bare = item.trim_start_matches('[').trim_end_matches(']');
    bare.parse::<IpAddr>()
        .ok()
        .map(|ip| SocketAddr::new(ip, 53))
}

/// The servers named in `dns_resolver_addresses`; an item that is not an
/// address is skipped with a warning. Empty: use /etc/resolv.conf.
pub fn servers_from_config(cfg: &postern_conf::Config) -> Vec<SocketAddr> {
    cfg.get_list("dns_resolver_addresses")
        .iter()
        .filter_map(|item| {
            let sa = parse_server(item);
            if sa.is_none() {
                warning!(
                    "dns_resolver_addresses: ignoring \"{item}\": expected address or address:port"
                );
            }
            sa
        })
        .collect()
}

/// A resolver with the runtime that drives it: `rt.block_on(resolver...)`.
pub struct BlockingResolver {
    pub rt: tokio::runtime::Runtime,
    pub resolver: TokioResolver,
}

impl BlockingResolver {
    /// A resolver asking `servers` (UDP, then TCP for truncated answers),
    /// or the servers of /etc/resolv.conf when `servers` is empty, waiting
    /// `timeout` (at least a second) for each answer. Start it after the
    /// process has dropped privileges: the runtime is a thread of its own.
    pub fn new(servers: &[SocketAddr], timeout: Duration) -> Result<BlockingResolver, String> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| format!("cannot start DNS runtime: {e}"))?;
        let guard = rt.enter();
        let mut builder = if servers.is_empty() {
            TokioResolver::builder_tokio()
                .map_err(|e| format!("cannot read resolver configuration: {e}"))?
        } else {
            let ns = servers
                .iter()
                .map(|sa| {
                    let mut udp = ConnectionConfig::udp();
                    udp.port = sa.port();
                    let mut tcp = ConnectionConfig::tcp();
                    tcp.port = sa.port();
                    NameServerConfig::new(sa.ip(), true, vec![udp, tcp])
                })
                .collect();
            TokioResolver::builder_with_config(
                ResolverConfig::from_name_servers(ns),
                TokioRuntimeProvider::default(),
            )
        };
        builder.options_mut().timeout = timeout.max(Duration::from_secs(1));
        let resolver = builder
            .with_tls_config(no_dns_over_tls()?)
            .build()
            .map_err(|e| format!("cannot set up DNS resolver: {e}"))?;
        drop(guard);
        Ok(BlockingResolver { rt, resolver })
    }
}

/// The resolver's TLS configuration. Postern asks DNS over UDP and TCP
/// only, but hickory (its TLS feature on, as mail-auth needs it) builds a
/// TLS client when the resolver is built, from the system's CA store
/// unless it is given one — and a chrooted daemon has no CA store. This
/// one trusts nothing: it is never used.
fn no_dns_over_tls() -> Result<rustls::ClientConfig, String> {
    rustls::ClientConfig::builder_with_provider(crate::tls::provider())
        .with_safe_default_protocol_versions()
        .map(|b| {
            b.with_root_certificates(rustls::RootCertStore::empty())
                .with_no_client_auth()
        })
        .map_err(|e| format!("cannot set up DNS resolver: {e}"))
}

/// Why a TXT or address lookup of [`BlockingResolver`] gave nothing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TxtError {
    /// NXDOMAIN or no record of the type: an answer, "none".
    NotFound,
    /// The name server failed or did not answer (the text, for logs).
    TryAgain(String),
}

impl BlockingResolver {
    fn answers(
        &self,
        name: &str,
        rtype: hickory_resolver::proto::rr::RecordType,
    ) -> Result<Vec<hickory_resolver::proto::rr::Record>, TxtError> {
        use hickory_resolver::net::{DnsError as HDnsError, NetError};
        use hickory_resolver::proto::op::ResponseCode;
        let mut n = hickory_resolver::proto::rr::Name::from_utf8(name)
            .map_err(|e| TxtError::TryAgain(format!("invalid name {name}: {e}")))?;
        n.set_fqdn(true);
        match self.rt.block_on(self.resolver.lookup(n, rtype)) {
            Ok(l) => Ok(l.answers().to_vec()),
            Err(NetError::Dns(HDnsError::NoRecordsFound(nr)))
                if matches!(
                    nr.response_code,
                    ResponseCode::NXDomain | ResponseCode::NoError
                ) =>
            {
                Err(TxtError::NotFound)
            }
            Err(e) => Err(TxtError::TryAgain(format!("{name} {rtype}: {e}"))),
        }
    }

    /// The TXT records of `name`, each its character-strings joined (as
    /// RFC 8461 and 8460 read them); none is [`TxtError::NotFound`].
    pub fn txt(&self, name: &str) -> Result<Vec<String>, TxtError> {
        use hickory_resolver::proto::rr::{RData, RecordType};
        let v: Vec<String> = self
            .answers(name, RecordType::TXT)?
            .iter()
            .filter_map(|r| match &r.data {
                RData::TXT(t) => Some(
                    t.txt_data
                        .iter()
                        .map(|s| String::from_utf8_lossy(s).into_owned())
                        .collect::<String>(),
                ),
                _ => None,
            })
            .collect();
        if v.is_empty() {
            return Err(TxtError::NotFound);
        }
        Ok(v)
    }

    /// The MX host names of `name` (without the trailing dot), lowest
    /// preference first; a null MX gives an empty list. qmgr asks this to
    /// learn a domain's site (`delivery_policy_maps`); the smtp client
    /// routes with its own lookup.
    pub fn mx_hosts(&self, name: &str) -> Result<Vec<String>, TxtError> {
        use hickory_resolver::proto::rr::{RData, RecordType};
        let mut v: Vec<(u16, String)> = self
            .answers(name, RecordType::MX)?
            .iter()
            .filter_map(|r| match &r.data {
                RData::MX(m) => Some((
                    m.preference,
                    m.exchange
                        .to_ascii()
                        .trim_end_matches('.')
                        .to_ascii_lowercase(),
                )),
                _ => None,
            })
            .collect();
        v.sort();
        Ok(v.into_iter()
            .map(|(_, h)| h)
            .filter(|h| !h.is_empty())
            .collect())
    }

    /// The IPv4 then IPv6 addresses of `name`.
    pub fn addrs(&self, name: &str) -> Result<Vec<IpAddr>, TxtError> {
        use hickory_resolver::proto::rr::{RData, RecordType};
        let mut out = Vec::new();
        let mut last = TxtError::NotFound;
        for rtype in [RecordType::A, RecordType::AAAA] {
            match self.answers(name, rtype) {
                Ok(rs) => out.extend(rs.iter().filter_map(|r| match &r.data {
                    RData::A(a) => Some(IpAddr::V4(a.0)),
                    RData::AAAA(a) => Some(IpAddr::V6(a.0)),
                    _ => None,
                })),
                Err(e @ TxtError::TryAgain(_)) => last = e,
                Err(TxtError::NotFound) => {}
            }
        }
        if out.is_empty() {
            return Err(last);
        }
        Ok(out)
    }
}

/// The reversed-address name of `ip` in DNS list `domain`.
pub fn rbl_name(ip: IpAddr, domain: &str) -> String {
    match ip {
        IpAddr::V4(v4) => {
            let o = v4.octets();
            format!("{}.{}.{}.{}.{domain}", o[3], o[2], o[1], o[0])
        }
        IpAddr::V6(v6) => {
            let mut s = String::new();
            for b in v6.octets().iter().rev() {
                s.push_str(&format!("{:x}.{:x}.", b & 0xf, b >> 4));
            }
            s.push_str(domain);
            s
        }
    }
}

/// Whether a DNS list answer matches the `=d.d.d.d` of a restriction's
/// argument, where an octet may be Postfix's `[a..b;c]` (ranges and single
/// values), as in `zen.spamhaus.org=127.0.0.[2..11]`.
pub fn dnsbl_answer_matches(pattern: &str, ip: IpAddr) -> bool {
    let IpAddr::V4(v4) = ip else {
        return pattern.parse::<IpAddr>().is_ok_and(|p| p == ip);
    };
    // Octets are separated by dots outside brackets (`[2..11]` has its own).
    let mut parts: Vec<&str> = Vec::new();
    let (mut depth, mut start) = (0, 0);
    for (i, c) in pattern.char_indices() {
        match c {
            '[' => depth += 1,
            ']' => depth -= 1,
            '.' if depth == 0 => {
                parts.push(&pattern[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    parts.push(&pattern[start..]);
    if parts.len() != 4 {
        return false;
    }
    parts.iter().zip(v4.octets()).all(|(p, o)| {
        let o = u32::from(o);
        match p.strip_prefix('[').and_then(|p| p.strip_suffix(']')) {
            Some(set) => set.split(';').any(|r| match r.split_once("..") {
                Some((a, b)) => match (a.trim().parse::<u32>(), b.trim().parse::<u32>()) {
                    (Ok(a), Ok(b)) => (a..=b).contains(&o),
                    _ => false,
                },
                None => r.trim().parse::<u32>() == Ok(o),
            }),
            None => p.parse::<u32>() == Ok(o),
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_items() {
        assert_eq!(
            parse_server("127.0.0.1"),
            Some("127.0.0.1:53".parse().unwrap())
        );
        assert_eq!(
            parse_server("127.0.0.1:5353"),
            Some("127.0.0.1:5353".parse().unwrap())
        );
        assert_eq!(parse_server("::1"), Some("[::1]:53".parse().unwrap()));
        assert_eq!(
            parse_server("[::1]:5353"),
            Some("[::1]:5353".parse().unwrap())
        );
        assert_eq!(parse_server("dns.example"), None);
    }
}
