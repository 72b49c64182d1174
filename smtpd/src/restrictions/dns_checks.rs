//! The restrictions that read DNS answers: `reject_unknown_client_hostname`,
//! `reject_unknown_reverse_client_hostname`, `reject_unknown_helo_hostname`,
//! `reject_unknown_sender_domain`, `reject_unknown_recipient_domain` and
//! `reject_rbl_client`; and [`Restrictions::dns_needed`], the answers
//! the session fetches ([`crate::dns`]) before it runs a check.

use super::{dsn_for, Item, Request, Restrictions, Stage, Verdict};
use crate::dns::{self, Answer, NameStatus, Query};
use postern_common::{addr, warning};
use std::net::IpAddr;

impl Restrictions {
    /// The DNS facts the checks of `stage` will look at for `req`: at
    /// RCPT TO ([`Stage::Recipient`]) the relay and recipient lists', and
    /// with `smtpd_delay_reject = yes` the client, HELO and sender lists'
    /// too; with `no`, each of those at its own stage (connect, HELO/EHLO,
    /// MAIL FROM). The session fetches them before it runs the check.
    pub fn dns_needed(&self, stage: Stage, req: &Request<'_>) -> Vec<Query> {
        let mut lists: Vec<&Vec<Item>> = Vec::new();
        match stage {
            Stage::Recipient => {
                lists.extend([&self.relay, &self.recipient]);
                if self.delay_reject {
                    lists.extend([&self.client, &self.helo, &self.sender]);
                }
            }
            Stage::Etrn => {
                lists.push(&self.etrn);
                if self.delay_reject {
                    lists.extend([&self.client, &self.helo]);
                }
            }
            Stage::Client if !self.delay_reject => lists.push(&self.client),
            Stage::Helo if !self.delay_reject => lists.push(&self.helo),
            Stage::Sender if !self.delay_reject => lists.push(&self.sender),
            _ => {}
        }
        // The lists of restriction classes they name count too (a class
        // never reaches itself: refused at start).
        let mut items: Vec<&Item> = lists.into_iter().flatten().collect();
        let mut i = 0;
        while i < items.len() {
            if let Some(class) = self.classes.get(&items[i].name) {
                items.extend(class.iter());
            }
            i += 1;
        }
        let mut out = Vec::new();
        for item in items {
            let q = match item.name.as_str() {
                "reject_unknown_sender_domain" => req
                    .sender
                    .filter(|s| !s.is_empty())
                    .map(|s| Query::Domain(addr::domain(s))),
                "reject_unknown_recipient_domain" => req
                    .recipient
                    .filter(|r| !self.final_destination(r))
                    .map(|r| Query::Domain(addr::domain(r))),
                "reject_rbl_client" | "permit_dnswl_client" => item.arg.as_ref().map(|a| {
                    let domain = a.split_once('=').map(|(d, _)| d).unwrap_or(a);
                    Query::Rbl(dns::rbl_name(req.ip(), domain))
                }),
                n if n.starts_with("reject_rhsbl_") || n == "permit_rhswl_client" => {
                    Self::rhs_query(item, req)
                }
                "reject_unknown_helo_hostname" => req
                    .helo
                    .filter(|h| !is_address_literal(h))
                    .map(|h| Query::Domain(h.trim_end_matches('.').to_ascii_lowercase())),
                _ => self.server_query(item, req),
            };
            if let Some(q) = q {
                if !matches!(&q, Query::Domain(d) if d.is_empty()) && !out.contains(&q) {
                    out.push(q);
                }
            }
        }
        out
    }

    /// The answer the session fetched for `q`, if any.
    fn dns_answer<'b>(req: &'b Request<'_>, q: &Query) -> Option<&'b Answer> {
        req.dns.and_then(|m| m.get(q))
    }

    /// reject_unknown_sender_domain: the sender's domain has no records.
    pub(super) fn unknown_sender_domain(req: &Request<'_>) -> Verdict {
        match req.sender {
            Some(s) if !s.is_empty() && !addr::domain(s).is_empty() => {
                match Self::dns_answer(req, &Query::Domain(addr::domain(s))) {
                    Some(Answer::NotFound) | Some(Answer::TryAgain) => {
                        Self::reject(Stage::Sender, req, "450", "4.1.8", "Domain not found")
                    }
                    _ => Verdict::Dunno,
                }
            }
            _ => Verdict::Dunno,
        }
    }

    /// reject_unknown_recipient_domain: the recipient's domain, when it
    /// is not ours, has no records.
    pub(super) fn unknown_recipient_domain(&self, req: &Request<'_>) -> Verdict {
        match req.recipient {
            Some(r) if !self.final_destination(r) => {
                match Self::dns_answer(req, &Query::Domain(addr::domain(r))) {
                    Some(Answer::NotFound) | Some(Answer::TryAgain) => {
                        Self::reject(Stage::Recipient, req, "450", "4.1.2", "Domain not found")
                    }
                    _ => Verdict::Dunno,
                }
            }
            _ => Verdict::Dunno,
        }
    }

    /// reject_unknown_helo_hostname for HELO name `h` (not an address
    /// literal): no records (`unknown_hostname_reject_code`), or a lookup
    /// that failed for now (450).
    pub(super) fn unknown_helo_hostname(&self, req: &Request<'_>, h: &str) -> Verdict {
        let q = Query::Domain(h.trim_end_matches('.').to_ascii_lowercase());
        let code = match Self::dns_answer(req, &q) {
            Some(Answer::NotFound) => self.unknown_hostname_code,
            Some(Answer::TryAgain) => 450,
            _ => return Verdict::Dunno,
        };
        let (code, dsn) = (code.to_string(), dsn_for(code, ".7.1"));
        Self::reject(Stage::Helo, req, &code, &dsn, "Host not found")
    }

    /// reject_rbl_client `domain[=address]`: the client is listed (with
    /// that address, if one is given).
    pub(super) fn rbl_client(item: &Item, req: &Request<'_>) -> Verdict {
        let Some(arg) = &item.arg else {
            warning!("restriction reject_rbl_client requires a DNS list domain");
            return Verdict::Reject("451 4.3.5 Server configuration error".into());
        };
        let domain = arg.split_once('=').map(|(d, _)| d).unwrap_or(arg);
        let q = Query::Rbl(dns::rbl_name(req.ip(), domain));
        match Self::dns_answer(req, &q) {
            Some(Answer::Found(ips)) if Self::listed(item, ips) => Verdict::Reject(format!(
                "554 5.7.1 Service unavailable; Client host [{}] blocked using {domain}",
                req.ip()
            )),
            _ => Verdict::Dunno,
        }
    }

    /// `permit_dnswl_client domain[=address]` (the client's address in
    /// the list) and `permit_rhswl_client` (its name): listed permits.
    pub(super) fn dns_whitelist(item: &Item, req: &Request<'_>) -> Verdict {
        let q = if item.name == "permit_dnswl_client" {
            let Some(arg) = &item.arg else {
                return Verdict::Dunno;
            };
            let domain = arg.split_once('=').map(|(d, _)| d).unwrap_or(arg);
            Query::Rbl(dns::rbl_name(req.ip(), domain))
        } else {
            match Self::rhs_query(item, req) {
                Some(q) => q,
                None => return Verdict::Dunno,
            }
        };
        match Self::dns_answer(req, &q) {
            Some(Answer::Found(ips)) if Self::listed(item, ips) => Verdict::Permit,
            _ => Verdict::Dunno,
        }
    }

    /// The domain a `reject_rhsbl_*`/`permit_rhswl_client` restriction
    /// looks up, with what Postfix's reply calls it.
    fn rhs_domain(item: &Item, req: &Request<'_>) -> Option<(String, &'static str)> {
        let known = |n: &str| (n != "unknown" && !n.is_empty()).then(|| n.to_ascii_lowercase());
        let (d, what) = match item.name.as_str() {
            "reject_rhsbl_client" | "permit_rhswl_client" => {
                (known(req.client_name)?, "Client host")
            }
            "reject_rhsbl_reverse_client" => {
                (known(req.client_reverse_name)?, "Unverified Client host")
            }
            "reject_rhsbl_helo" => (
                req.helo
                    .filter(|h| !is_address_literal(h))?
                    .trim_end_matches('.')
                    .to_ascii_lowercase(),
                "Helo command",
            ),
            "reject_rhsbl_sender" => (addr::domain(req.sender?), "Sender address"),
            "reject_rhsbl_recipient" => (addr::domain(req.recipient?), "Recipient address"),
            _ => return None,
        };
        (!d.is_empty()).then_some((d, what))
    }

    fn rhs_query(item: &Item, req: &Request<'_>) -> Option<Query> {
        let list = item.arg.as_ref()?;
        let list = list.split_once('=').map(|(d, _)| d).unwrap_or(list);
        let (d, _) = Self::rhs_domain(item, req)?;
        Some(Query::Rbl(format!("{d}.{list}")))
    }

    /// The answer lists the name (with the `=address` the argument asks
    /// for, if any).
    fn listed(item: &Item, ips: &[IpAddr]) -> bool {
        match item.arg.as_ref().and_then(|a| a.split_once('=')) {
            Some((_, pattern)) => ips.iter().any(|ip| answer_matches(pattern, *ip)),
            None => true,
        }
    }

    /// `reject_rhsbl_client`, `_reverse_client`, `_helo`, `_sender`,
    /// `_recipient` `domain[=address]`: that name is in the list.
    pub(super) fn rhsbl(item: &Item, req: &Request<'_>) -> Verdict {
        let (Some(q), Some((d, what))) = (Self::rhs_query(item, req), Self::rhs_domain(item, req))
        else {
            return Verdict::Dunno;
        };
        let list = item.arg.as_deref().unwrap_or_default();
        let list = list.split_once('=').map(|(l, _)| l).unwrap_or(list);
        match Self::dns_answer(req, &q) {
            Some(Answer::Found(ips)) if Self::listed(item, ips) => Verdict::Reject(format!(
                "554 5.7.1 Service unavailable; {what} [{d}] blocked using {list}"
            )),
            _ => Verdict::Dunno,
        }
    }

    /// `reject_unknown_client_hostname` (`what` "hostname") and
    /// `reject_unknown_reverse_client_hostname` ("reverse hostname"),
    /// worded as Postfix's: a lookup that failed for now always defers.
    pub(super) fn unknown_client(
        &self,
        req: &Request<'_>,
        status: NameStatus,
        what: &str,
    ) -> Verdict {
        let code = match status {
            NameStatus::Ok => return Verdict::Dunno,
            NameStatus::TryAgain => 450,
            NameStatus::NotFound => self.unknown_client_code,
        };
        Verdict::Reject(format!(
            "{code} {} Client host rejected: cannot find your {what}, [{}]",
            dsn_for(code, ".7.25"),
            req.ip()
        ))
    }
}

pub(super) fn is_address_literal(h: &str) -> bool {
    h.starts_with('[') && h.ends_with(']')
}

// Shared with postscreen (postscreen_dnsbl_sites filters).
use postern_common::dns::dnsbl_answer_matches as answer_matches;

#[cfg(test)]
mod answer_tests {
    #[test]
    fn answer_patterns() {
        let m = |p: &str, ip: &str| super::answer_matches(p, ip.parse().unwrap());
        assert!(m("127.0.0.2", "127.0.0.2"));
        assert!(!m("127.0.0.2", "127.0.0.3"));
        assert!(m("127.0.0.[2..11]", "127.0.0.11"));
        assert!(!m("127.0.0.[2..11]", "127.255.255.254"));
        assert!(m("127.0.0.[2;14;13]", "127.0.0.14"));
        assert!(m("127.0.[0..255].[2..3]", "127.0.9.3"));
    }
}
