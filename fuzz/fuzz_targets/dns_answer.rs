//! DNS answers from the wire, through the code that decides what they
//! mean: a DNS message (any bytes, parsed by hickory-proto as the resolver
//! parses a reply) is taken as the answer to every query the SMTP client's
//! next-hop code makes (MX, then A/AAAA of each exchange) and to smtpd's
//! DNSBL, domain and client-name (PTR, then A/AAAA) queries.
//!
//! The smtp client's `dns` and `nexthop` modules come from its library,
//! with a [`dns::Lookup`] that serves the message's records.
//!
//! Invariants checked: a null MX alone fails with 5.1.10; the server list
//! is never empty on success, respects `smtp_mx_address_limit`, never names
//! the root exchange and keeps MX preference order; a client name taken
//! from a PTR answer is a valid host name.
#![no_main]
use hickory_resolver::proto::op::{Message, ResponseCode};
use hickory_resolver::proto::rr::{Record, RecordType};
use libfuzzer_sys::fuzz_target;
use postern_smtp::{dns, nexthop};
use std::net::IpAddr;

/// Serves every query from one message.
struct Wire<'a> {
    rcode: ResponseCode,
    answers: &'a [Record],
    /// The records of the answer and additional sections together, as
    /// addresses of the MX hosts often come.
    all: Vec<Record>,
}

impl dns::Lookup for Wire<'_> {
    fn mx(&self, name: &str) -> Result<Vec<dns::Mx>, dns::DnsError> {
        if !self
            .answers
            .iter()
            .any(|r| r.record_type() == RecordType::MX)
        {
            let kind = dns::rcode_kind(self.rcode);
            return Err(dns::DnsError::new(kind, name, "MX"));
        }
        dns::mx_answer(name, self.answers)
    }

    fn addrs(&self, name: &str, v6: bool) -> Result<Vec<IpAddr>, dns::DnsError> {
        let t = if v6 { RecordType::AAAA } else { RecordType::A };
        if !self.all.iter().any(|r| r.record_type() == t) {
            let kind = dns::rcode_kind(self.rcode);
            return Err(dns::DnsError::new(
                kind,
                name,
                if v6 { "AAAA" } else { "A" },
            ));
        }
        dns::addr_answer(name, &self.all, v6)
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&limit, wire)) = data.split_first() else {
        return;
    };
    let Ok(msg) = Message::from_vec(wire) else {
        return;
    };
    let rcode = msg.metadata.response_code;

    // smtpd: DNSBL verdicts and domain checks.
    let verdict = postern_smtpd::dns::rbl_answer(&msg.answers);
    if let postern_smtpd::dns::Answer::Found(ips) = &verdict {
        assert!(!ips.is_empty());
        assert!(ips.iter().all(|ip| ip.is_ipv4()));
    }
    let _ = postern_smtpd::dns::has_records(&msg.answers, RecordType::MX);
    let _ = postern_smtpd::dns::rcode_answer(rcode);
    if let Some(name) = postern_smtpd::dns::ptr_name(&msg.answers) {
        assert!(!name.is_empty() && !name.ends_with('.'));
        assert!(!name.bytes().all(|b| b.is_ascii_digit() || b == b'.'));
    }
    let ip: IpAddr = [127, 0, 0, limit].into();
    let _ = postern_smtpd::dns::confirm(ip, &[Ok(msg.answers.clone())]);

    // smtp: next hops.
    let mut all = msg.answers.clone();
    all.extend(msg.additionals.iter().cloned());
    let lookup = Wire {
        rcode,
        answers: &msg.answers,
        all,
    };
    let domain = msg
        .queries
        .first()
        .map(|q| q.name().to_utf8())
        .unwrap_or_else(|| "example.test".into());
    let Ok(hop) = nexthop::parse(domain.trim_end_matches('.')) else {
        return;
    };
    let opt = nexthop::Options {
        address_limit: usize::from(limit % 8),
        ipv4: limit & 0x40 == 0,
        ipv6: limit & 0x80 == 0,
    };
    let mx = dns::Lookup::mx(&lookup, &hop.host);
    match nexthop::servers(&hop, &lookup, &opt) {
        Ok(list) => {
            assert!(!list.is_empty());
            if opt.address_limit > 0 {
                assert!(list.len() <= opt.address_limit);
            }
            assert!(list.iter().all(|s| s.name != "." && s.port == hop.port));
            if hop.mx {
                if let Some(mx) = mx.as_ref().ok().filter(|mx| {
                    let mut names: Vec<&str> = mx.iter().map(|m| m.exchange.as_str()).collect();
                    names.sort_unstable();
                    names.windows(2).all(|w| w[0] != w[1])
                }) {
                    // Preference order: each server's exchange's best
                    // preference never goes down along the list.
                    let pref = |name: &str| {
                        mx.iter()
                            .filter(|m| m.exchange == name)
                            .map(|m| m.preference)
                            .min()
                    };
                    let prefs: Vec<_> = list.iter().filter_map(|s| pref(&s.name)).collect();
                    assert!(prefs.windows(2).all(|w| w[0] <= w[1]), "{prefs:?}");
                }
            }
        }
        Err(f) => {
            assert!(f.dsn.starts_with('4') || f.dsn.starts_with('5'));
            if let Ok(mx) = &mx {
                if hop.mx && mx.len() == 1 && mx[0].exchange == "." {
                    assert_eq!(f.dsn, "5.1.10");
                }
            }
        }
    }
});
