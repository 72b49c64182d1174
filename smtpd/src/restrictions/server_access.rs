//! The restrictions that look at the hosts serving a name:
//! `check_{client,reverse_client_hostname,helo,sender,recipient}_{a,mx,ns}_access`
//! (the name's own addresses, its MX hosts, its name servers, looked up in
//! an access(5) table: host names first, then addresses), and
//! `permit_mx_backup` (this machine is a backup MX of the recipient's
//! domain). The hosts come from [`Query::Servers`] answers the session
//! fetched first ([`Restrictions::server_queries`]).
//!
//! An access table may not answer `OK` to these (anyone can point a name
//! at a listed host): Postfix, and Postern, answer `451 4.3.5 Server
//! configuration error` then; `DUNNO` is the way to make an exception.

use super::access::{client_keys, domain_keys};
use super::dns_checks::is_address_literal;
use super::{Item, Request, Restrictions, Stage, Verdict};
use crate::dns::{Answer, Query, ServerKind};
use postern_common::{addr, warning};
use std::net::IpAddr;

/// Whether `name` is one of the `check_*_{a,mx,ns}_access` restrictions.
pub(super) fn is_server_access(name: &str) -> bool {
    parse(name).is_some()
}

/// Whose name a server check looks at.
#[derive(Clone, Copy)]
enum Subject {
    Client,
    ReverseClient,
    Helo,
    Sender,
    Recipient,
}

fn parse(name: &str) -> Option<(Subject, ServerKind)> {
    let rest = name.strip_prefix("check_")?.strip_suffix("_access")?;
    let (who, kind) = rest.rsplit_once('_')?;
    let kind = match kind {
        "a" => ServerKind::A,
        "mx" => ServerKind::Mx,
        "ns" => ServerKind::Ns,
        _ => return None,
    };
    let who = match who {
        "client" => Subject::Client,
        "reverse_client_hostname" => Subject::ReverseClient,
        "helo" => Subject::Helo,
        "sender" => Subject::Sender,
        "recipient" => Subject::Recipient,
        _ => return None,
    };
    Some((who, kind))
}

/// The name a check looks at, None when there is none (an unknown
/// client name, no HELO yet, the null sender).
fn target<'a>(who: Subject, req: &Request<'a>) -> Option<&'a str> {
    let t = match who {
        Subject::Client => Some(req.client_name),
        Subject::ReverseClient => Some(req.client_reverse_name),
        Subject::Helo => req.helo,
        Subject::Sender => req.sender,
        Subject::Recipient => req.recipient,
    }?;
    (!t.is_empty() && !t.eq_ignore_ascii_case("unknown")).then_some(t)
}

/// The domain part of an address (the whole of a host name).
fn domain_of(name: &str) -> String {
    match name.rsplit_once('@') {
        Some((_, d)) => d.to_string(),
        None => name.to_string(),
    }
    .trim_end_matches('.')
    .to_ascii_lowercase()
}

/// The address of an address literal domain (`[1.2.3.4]`,
/// `[IPv6:...]`).
fn literal_addr(domain: &str) -> Option<IpAddr> {
    let inner = domain.strip_prefix('[')?.strip_suffix(']')?;
    let inner = inner
        .strip_prefix("IPv6:")
        .or_else(|| inner.strip_prefix("ipv6:"))
        .unwrap_or(inner);
    inner.parse().ok()
}

impl Restrictions {
    /// The [`Query::Servers`] the restriction `item` needs for `req`.
    pub(super) fn server_query(&self, item: &Item, req: &Request<'_>) -> Option<Query> {
        if item.name == "permit_mx_backup" {
            let rcpt = req.recipient?;
            let domain = domain_of(&addr::domain(rcpt));
            if domain.is_empty() || is_address_literal(&domain) || self.final_or_relay(rcpt) {
                return None;
            }
            return Some(Query::Servers(ServerKind::MxOnly, domain));
        }
        let (who, kind) = parse(&item.name)?;
        let domain = domain_of(target(who, req)?);
        if domain.is_empty() || is_address_literal(&domain) {
            return None;
        }
        Some(Query::Servers(kind, domain))
    }

    /// Mail for `rcpt` is ours or relayed by us (nothing to look up for
    /// permit_mx_backup).
    fn final_or_relay(&self, rcpt: &str) -> bool {
        self.auth_destination(rcpt).unwrap_or(true)
    }

    /// `check_*_{a,mx,ns}_access type:table`.
    pub(super) fn check_server_access(&self, item: &Item, req: &Request<'_>) -> Verdict {
        let Some((who, kind)) = parse(&item.name) else {
            return Verdict::Dunno;
        };
        let Some(name) = target(who, req) else {
            return Verdict::Dunno;
        };
        let Some(spec) = &item.arg else {
            return Verdict::Dunno;
        };
        let Some(Ok(table)) = self.tables.get(spec) else {
            warning!("{}: table {spec} is not available", item.name);
            return Verdict::Reject("451 4.3.5 Server configuration error".into());
        };
        let stage = match who {
            Subject::Client | Subject::ReverseClient => Stage::Client,
            Subject::Helo => Stage::Helo,
            Subject::Sender => Stage::Sender,
            Subject::Recipient => Stage::Recipient,
        };
        let reverse;
        let req = if matches!(who, Subject::ReverseClient) {
            reverse = Request {
                reply_subject: Some((req.client_reverse_name, "Unverified Client host")),
                ..req.clone()
            };
            &reverse
        } else {
            req
        };
        let domain = domain_of(name);
        // An address literal is its own A and MX host; it has no NS.
        let mut lookups: Vec<Vec<String>> = Vec::new();
        if let Some(ip) = literal_addr(&domain) {
            if matches!(kind, ServerKind::Ns) {
                return Verdict::Dunno;
            }
            lookups.push(client_keys("unknown", ip));
        } else {
            let q = Query::Servers(kind, domain.clone());
            match req.dns.and_then(|m| m.get(&q)) {
                Some(Answer::Servers(servers)) => {
                    for s in servers {
                        // Host names first (not for A: the name is the
                        // subject itself), then the host's addresses.
                        if !matches!(kind, ServerKind::A) {
                            lookups.push(domain_keys(&s.name));
                        }
                        lookups.extend(s.addrs.iter().map(|ip| client_keys("unknown", *ip)));
                    }
                }
                Some(Answer::NotFound) | None => return Verdict::Dunno,
                _ => {
                    warning!("Unable to look up {kind:?} host for {domain}");
                    return Verdict::Dunno;
                }
            }
        }
        for keys in lookups {
            for key in keys {
                let v = match table.lookup_expanded(&key) {
                    Ok(Some(action)) => self.action(&action, stage, req, spec),
                    Ok(None) => continue,
                    Err(_) => self.action("451 4.3.5 Server configuration error", stage, req, spec),
                };
                return forbid_ok(&item.name, name, v);
            }
        }
        Verdict::Dunno
    }

    /// `check_reverse_client_hostname_access type:table`: the client's
    /// name whether or not it resolves back to its address, then the
    /// address, as check_client_access; an `OK` is refused.
    pub(super) fn reverse_client_access(&self, item: &Item, req: &Request<'_>) -> Verdict {
        let Some(spec) = &item.arg else {
            return Verdict::Dunno;
        };
        let Some(Ok(table)) = self.tables.get(spec) else {
            warning!("{}: table {spec} is not available", item.name);
            return Verdict::Reject("451 4.3.5 Server configuration error".into());
        };
        let req = &Request {
            reply_subject: Some((req.client_reverse_name, "Unverified Client host")),
            ..req.clone()
        };
        for key in client_keys(req.client_reverse_name, req.ip()) {
            let v = match table.lookup_expanded(&key) {
                Ok(Some(action)) => self.action(&action, Stage::Client, req, spec),
                Ok(None) => continue,
                Err(_) => self.action(
                    "451 4.3.5 Server configuration error",
                    Stage::Client,
                    req,
                    spec,
                ),
            };
            return forbid_ok(&item.name, req.client_reverse_name, v);
        }
        Verdict::Dunno
    }

    /// permit_mx_backup: mail for our own and relay domains, and for a
    /// domain whose MX hosts list this machine (by name in
    /// `mydestination`, or by address) below the best ones, which with
    /// `permit_mx_backup_networks` must all be in those networks.
    pub(super) fn mx_backup(&self, req: &Request<'_>) -> Verdict {
        static ONCE: std::sync::Once = std::sync::Once::new();
        ONCE.call_once(|| {
            warning!(
                "support for restriction \"permit_mx_backup\" will be removed; \
                 instead, specify \"relay_domains\""
            )
        });
        let Some(rcpt) = req.recipient else {
            return Verdict::Dunno;
        };
        match self.resolved(rcpt) {
            Err(_) => return Self::lookup_failure(rcpt),
            Ok(Some(r)) if r.routed => return Verdict::Dunno,
            Ok(Some(r))
                if r.class.is_final() || r.class == postern_common::resolve::Class::Relay =>
            {
                return Verdict::Permit
            }
            _ => {}
        }
        let item = Item {
            name: "permit_mx_backup".into(),
            arg: None,
        };
        let Some(q) = self.server_query(&item, req) else {
            return Verdict::Dunno;
        };
        let servers = match req.dns.and_then(|m| m.get(&q)) {
            Some(Answer::Servers(s)) if !s.is_empty() => s,
            Some(Answer::TryAgain) => {
                return Self::raise_defer(
                    "defer_if_reject",
                    Stage::Recipient,
                    req,
                    "450",
                    "4.4.4",
                    "Unable to look up mail exchanger information",
                )
            }
            _ => return Verdict::Dunno,
        };
        let best = servers.iter().map(|s| s.pref).min().unwrap_or(0);
        let (primary, backup): (Vec<_>, Vec<_>) = servers.iter().partition(|s| s.pref == best);
        let me = |list: &[&crate::dns::Server]| {
            let resolver = self.resolver.as_ref();
            list.iter().any(|s| {
                resolver.is_some_and(|r| r.is_local_domain(&s.name))
                    || s.addrs.iter().any(|ip| self.own_address(*ip))
            })
        };
        if me(&primary) || backup.is_empty() || !me(&backup) {
            return Verdict::Dunno;
        }
        if let Some(nets) = &self.mx_backup_networks {
            let inside = primary.iter().all(|s| {
                !s.addrs.is_empty()
                    && s.addrs
                        .iter()
                        .all(|ip| nets.matches_addr(*ip).unwrap_or(false))
            });
            if !inside {
                return Verdict::Dunno;
            }
        }
        Verdict::Permit
    }
}

/// Postfix's forbid_allowlist: these checks may not permit.
fn forbid_ok(restriction: &str, target: &str, v: Verdict) -> Verdict {
    if v != Verdict::Permit {
        return v;
    }
    warning!("restriction {restriction} returns OK for {target}");
    warning!("this is not allowed for security reasons");
    warning!("use DUNNO instead of OK if you want to make an exception");
    Verdict::Reject("451 4.3.5 Server configuration error".into())
}
