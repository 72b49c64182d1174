//! The route of a destination at level `dane` or `dane-only`: its
//! servers found with DNSSEC-aware lookups, and for each the TLS it gets
//! (`postern_common::dane::decide`, from the security of the MX and
//! address answers and from the server's TLSA records).
//!
//! The lookups go through [`SecureLookup`], a [`Lookup`] over
//! `postern_common::dane::SecureDns` that remembers which answers the
//! resolver validated; the list of servers is then built by
//! [`crate::nexthop::servers`] exactly as for any other level.

use crate::dns::{addr_answer, mx_answer, rcode_kind, DnsError, ErrorKind, Lookup, Mx};
use crate::nexthop::{self, Failure, NextHop, Server};
use hickory_resolver::proto::op::ResponseCode;
use hickory_resolver::proto::rr::RecordType;
use postern_common::dane::{self, Decision, Digests, InsecureMx, SecureDns, TlsaLookup};
use postern_common::warning;
use std::cell::RefCell;
use std::collections::HashMap;
use std::net::IpAddr;

/// Lookups that record whether each answer was validated.
pub struct SecureLookup<'a> {
    dns: &'a SecureDns,
    /// (name, type) → secure.
    seen: RefCell<HashMap<(String, &'static str), bool>>,
    /// An MX lookup found records (the servers are MX hosts).
    mx_found: std::cell::Cell<bool>,
}

impl<'a> SecureLookup<'a> {
    pub fn new(dns: &'a SecureDns) -> SecureLookup<'a> {
        SecureLookup {
            dns,
            seen: RefCell::new(HashMap::new()),
            mx_found: std::cell::Cell::new(false),
        }
    }

    /// Whether the answer for `name`'s `rtype` was validated (None: not
    /// asked).
    pub fn secure(&self, name: &str, rtype: &'static str) -> Option<bool> {
        self.seen
            .borrow()
            .get(&(name.to_ascii_lowercase(), rtype))
            .copied()
    }

    fn ask(
        &self,
        name: &str,
        rtype: RecordType,
        tname: &'static str,
    ) -> Result<Vec<hickory_resolver::proto::rr::Record>, DnsError> {
        let a = self.dns.query(name, rtype).map_err(|e| {
            warning!("DNS lookup of {name} type {tname}: {e}");
            DnsError::new(ErrorKind::TryAgain, name, tname)
        })?;
        self.seen
            .borrow_mut()
            .insert((name.to_ascii_lowercase(), tname), a.secure);
        if a.rcode != ResponseCode::NoError {
            return Err(DnsError::new(rcode_kind(a.rcode), name, tname));
        }
        Ok(a.records)
    }
}

impl Lookup for SecureLookup<'_> {
    fn mx(&self, name: &str) -> Result<Vec<Mx>, DnsError> {
        let mx = mx_answer(name, &self.ask(name, RecordType::MX, "MX")?)?;
        self.mx_found.set(true);
        Ok(mx)
    }

    fn addrs(&self, name: &str, v6: bool) -> Result<Vec<IpAddr>, DnsError> {
        let (rtype, tname) = if v6 {
            (RecordType::AAAA, "AAAA")
        } else {
            (RecordType::A, "A")
        };
        addr_answer(name, &self.ask(name, rtype, tname)?, v6)
    }
}

/// What the DANE route needs from the agent's settings.
pub struct Settings<'a> {
    pub dns: &'a SecureDns,
    pub options: &'a nexthop::Options,
    pub insecure_mx: InsecureMx,
    pub digests: Digests,
}

/// The servers of `hop` with the TLS each gets at level `dane` (`only`
/// false) or `dane-only`.
pub fn route(
    hop: &NextHop,
    only: bool,
    s: &Settings<'_>,
) -> Result<Vec<(Server, Decision)>, Failure> {
    let lookup = SecureLookup::new(s.dns);
    let servers = nexthop::servers(hop, &lookup, s.options)?;
    // MX answer security; None when the destination had no MX record
    // (its own addresses were used) or was a host.
    let mx_secure = if lookup.mx_found.get() {
        lookup.secure(&hop.host, "MX")
    } else {
        None
    };
    let mut tlsa: HashMap<(String, u16), TlsaLookup> = HashMap::new();
    let mut out = Vec::new();
    for srv in servers {
        let rtype = if srv.addr.is_ipv6() { "AAAA" } else { "A" };
        let addr_secure = lookup.secure(&srv.name, rtype).unwrap_or(false);
        let relay = format!("{}:{}", srv.name, srv.port);
        let found = if addr_secure {
            Some(
                tlsa.entry((srv.name.to_ascii_lowercase(), srv.port))
                    .or_insert_with(|| {
                        let t = s.dns.tlsa(&srv.name, srv.port);
                        if t == TlsaLookup::Error {
                            warning!("TLSA lookup error for {relay}");
                        }
                        t
                    })
                    .clone(),
            )
        } else {
            None
        };
        let d = dane::decide(
            only,
            mx_secure,
            s.insecure_mx,
            addr_secure,
            found.as_ref(),
            s.digests,
            &relay,
        );
        out.push((srv, d));
    }
    Ok(out)
}
