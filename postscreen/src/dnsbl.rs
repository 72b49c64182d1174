//! `postscreen_dnsbl_sites`: DNS allow- and blocklists, each with an
//! optional `=` filter on the answer and a `*weight` (negative for an
//! allowlist), summed into the client's score (Postfix's
//! POSTSCREEN_README, "Tests before the 220 SMTP server greeting").

use hickory_resolver::net::{DnsError as HDnsError, NetError};
use hickory_resolver::proto::rr::{Name, RData, RecordType};
use postern_common::dns::{dnsbl_answer_matches, rbl_name, BlockingResolver};
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

/// One `domain[=filter][*weight]` item.
#[derive(Debug, Clone, PartialEq)]
pub struct Site {
    /// As written, without the weight: the key of
    /// `postscreen_dnsbl_reply_map`.
    pub spec: String,
    pub domain: String,
    pub filter: Option<String>,
    pub weight: i64,
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct Sites(pub Vec<Site>);

/// A client's DNSBL result.
#[derive(Debug, Clone, PartialEq)]
pub struct Score {
    pub score: i64,
    /// The listing site with the largest weight (as written, without the
    /// weight), for the reply.
    pub name: Option<String>,
    /// The smallest TTL of the answers that make the score (None: no
    /// answer had one, as when nothing listed the client).
    pub ttl: Option<u64>,
}

impl Sites {
    pub fn parse(value: &str) -> Result<Sites, String> {
        let mut out = Vec::new();
        for item in postern_conf::split_list(value) {
            let (spec, weight) = match item.rsplit_once('*') {
                Some((s, w)) => {
                    let w: i64 = w.trim().parse().map_err(|_| {
                        format!("postscreen_dnsbl_sites: \"{item}\": bad weight \"{w}\"")
                    })?;
                    (s.to_string(), w)
                }
                None => (item.clone(), 1),
            };
            let (domain, filter) = match spec.split_once('=') {
                Some((d, f)) => (d.to_string(), Some(f.to_string())),
                None => (spec.clone(), None),
            };
            if domain.is_empty() {
                return Err(format!("postscreen_dnsbl_sites: \"{item}\": no domain"));
            }
            out.push(Site {
                spec,
                domain: domain.to_ascii_lowercase(),
                filter,
                weight,
            });
        }
        Ok(Sites(out))
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Looks `ip` up in every site (each domain once) and sums the
    /// weights of the sites whose filter matches an answer.
    pub fn score(&self, servers: &[SocketAddr], timeout: Duration, ip: IpAddr) -> Score {
        let mut result = Score {
            score: 0,
            name: None,
            ttl: None,
        };
        let resolver = match BlockingResolver::new(servers, timeout) {
            Ok(r) => r,
            Err(e) => {
                postern_common::warning!("DNSBL lookups: {e}");
                return result;
            }
        };
        let mut answers: Vec<(String, Vec<(IpAddr, u64)>)> = Vec::new();
        let mut best: Option<i64> = None;
        for site in &self.0 {
            if !answers.iter().any(|(d, _)| *d == site.domain) {
                let found = lookup(&resolver, &rbl_name(ip, &site.domain));
                answers.push((site.domain.clone(), found));
            }
            let found = &answers.iter().find(|(d, _)| *d == site.domain).unwrap().1;
            let hits: Vec<u64> = found
                .iter()
                .filter(|(a, _)| {
                    site.filter
                        .as_deref()
                        .is_none_or(|f| dnsbl_answer_matches(f, *a))
                })
                .map(|(_, ttl)| *ttl)
                .collect();
            if hits.is_empty() {
                continue;
            }
            result.score += site.weight;
            let ttl = hits.iter().copied().min().unwrap_or(0);
            result.ttl = Some(result.ttl.map_or(ttl, |t| t.min(ttl)));
            if site.weight > 0 && best.is_none_or(|b| site.weight > b) {
                best = Some(site.weight);
                result.name = Some(site.spec.clone());
            }
        }
        result
    }
}

/// The A records (address, TTL) of `name`; none when it is not listed
/// or the lookup fails (a list that does not answer scores nothing, as
/// in Postfix).
fn lookup(r: &BlockingResolver, name: &str) -> Vec<(IpAddr, u64)> {
    let Ok(mut n) = Name::from_utf8(name) else {
        return Vec::new();
    };
    n.set_fqdn(true);
    match r.rt.block_on(r.resolver.lookup(n, RecordType::A)) {
        Ok(l) => l
            .answers()
            .iter()
            .filter_map(|rec| match &rec.data {
                RData::A(a) => Some((IpAddr::V4(a.0), u64::from(rec.ttl))),
                _ => None,
            })
            .collect(),
        Err(NetError::Dns(HDnsError::NoRecordsFound(_))) => Vec::new(),
        Err(e) => {
            postern_common::warning!("DNSBL lookup {name}: {e}");
            Vec::new()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sites_with_filters_and_weights() {
        let s = Sites::parse(
            "zen.example=127.0.0.[2..11]*3, list.dnswl.example=127.0.[0..255].[1..3]*-2 bl.example",
        )
        .unwrap();
        assert_eq!(s.0[0].domain, "zen.example");
        assert_eq!(s.0[0].filter.as_deref(), Some("127.0.0.[2..11]"));
        assert_eq!(s.0[0].weight, 3);
        assert_eq!(s.0[0].spec, "zen.example=127.0.0.[2..11]");
        assert_eq!(s.0[1].weight, -2);
        assert_eq!(s.0[2].weight, 1);
        assert_eq!(s.0[2].filter, None);
        assert!(Sites::parse("x.example*y").is_err());
    }
}
