//! DNS lookups off the event loop: the client's host name at connect
//! (`smtpd_peername_lookup`, [`PeerName`]) and the facts restrictions
//! need (`reject_unknown_sender_domain`, `reject_unknown_recipient_domain`,
//! `reject_unknown_helo_hostname`, `reject_rbl_client`).
//!
//! hickory-resolver has no synchronous API, and a lookup can take
//! seconds: a few helper threads, each with its own current-thread tokio
//! runtime and resolver, take [`Query`]s from a shared channel and send
//! back [`Answer`]s, waking the mio loop with a [`mio::Waker`]. They are
//! started at the first query (smtpd never runs as root, so there are no
//! privileges to drop first). Name servers: `dns_resolver_addresses`
//! (Postern-only) or /etc/resolv.conf, after /etc/hosts (as the C
//! library's name service would: in a chroot, the copy master keeps in
//! the queue directory); each query waits `dns_resolver_timeout`.
//!
//! What an answer means is decided by pure functions of its records
//! ([`rbl_answer`], [`has_records`], [`rcode_answer`], [`ptr_name`],
//! [`confirm`]), which the fuzz
//! target `dns_answer` feeds with DNS messages straight from the wire.
//!
//! A session asks for the facts its restriction lists will need before it
//! evaluates them, waits (taking no input), and evaluates once every
//! answer is in; answers are kept for the rest of the session.

use hickory_resolver::net::{DnsError as HDnsError, NetError};
use hickory_resolver::proto::op::ResponseCode;
use hickory_resolver::proto::rr::{Name, RData, Record, RecordType};
use hickory_resolver::TokioResolver;
use postern_common::dns::BlockingResolver;
use postern_common::hostname;
use postern_common::warning;
use std::net::{IpAddr, SocketAddr};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Helper threads (lookups in flight at once).
const WORKERS: usize = 4;

/// The most hosts of a [`Query::Servers`] answer looked at (Postfix's
/// `dns_rr_list_limit` is about records; this bounds the lookups).
const SERVER_LIMIT: usize = 100;

/// A fact a restriction needs.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Query {
    /// Whether a mail domain (or a HELO name) exists: an MX, A or AAAA
    /// record.
    Domain(String),
    /// The A records of a DNS list name (`4.3.2.1.zen.example`).
    Rbl(String),
    /// The client's names: its PTR, confirmed by the name's addresses.
    Peer(IpAddr),
    /// The hosts that serve a domain, with their addresses
    /// (`check_*_{a,mx,ns}_access`, `permit_mx_backup`).
    Servers(ServerKind, String),
    /// What the verify service knows of an address
    /// (`reject_unverified_recipient`, `reject_unverified_sender`): not
    /// DNS, but asked and waited for the same way ([`crate::verify_lookup`]).
    Verify(String),
    /// The session's milters at an SMTP stage (`smtpd_milters`): not DNS,
    /// asked on a thread of its own and waited for the same way
    /// ([`crate::milter`]).
    Milter(crate::milter::Ask),
}

/// Which hosts [`Query::Servers`] asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ServerKind {
    /// The domain itself, as a host (`check_*_a_access`).
    A,
    /// Its MX hosts; a domain without MX records is its own
    /// (`check_*_mx_access`, as the SMTP client would).
    Mx,
    /// Its MX hosts only: NotFound without MX records (`permit_mx_backup`).
    MxOnly,
    /// Its name servers, or its closest parent's (`check_*_ns_access`).
    Ns,
}

/// One host of a [`Query::Servers`] answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Server {
    /// MX preference (0 for the others).
    pub pref: u16,
    /// Lower case, without the final dot.
    pub name: String,
    pub addrs: Vec<IpAddr>,
    /// Its addresses could not be looked up for now.
    pub addrs_failed: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    /// The name has records (for Rbl: these addresses).
    Found(Vec<IpAddr>),
    /// NXDOMAIN, or no record of any type asked.
    NotFound,
    /// The name servers did not answer.
    TryAgain,
    /// The answer to [`Query::Peer`].
    Peer(PeerName),
    /// The answer to [`Query::Servers`] (empty: a null MX).
    Servers(Vec<Server>),
    /// The answer to [`Query::Verify`]: the status and its text, or why
    /// the verify service could not answer.
    Verify(Result<(postern_common::verify::Status, String), String>),
    /// The milters' answer to [`Query::Milter`].
    Milter(postern_common::milter::Outcome),
}

/// How a client name lookup ended, as Postfix's `SMTPD_PEER_CODE_*`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum NameStatus {
    Ok,
    /// The name servers did not answer: a restriction defers (450).
    TryAgain,
    /// No name, or one that does not resolve back to the address.
    #[default]
    NotFound,
}

/// What smtpd knows of a client's host name. `name` is the verified
/// name (the PTR name whose A/AAAA records include the address), the one
/// logs, Received headers and `check_client_access` use;
/// `reverse_name` is the PTR name whether or not it resolves back.
/// Either is `unknown` when it is not known.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerName {
    pub name: String,
    pub name_status: NameStatus,
    pub reverse_name: String,
    pub reverse_status: NameStatus,
}

/// Postfix's word for a name it does not know.
pub const UNKNOWN: &str = "unknown";

impl PeerName {
    /// No name known, for `status`'s reason (a lookup that is off, or
    /// that failed).
    pub fn unknown(status: NameStatus) -> PeerName {
        PeerName {
            name: UNKNOWN.into(),
            name_status: status,
            reverse_name: UNKNOWN.into(),
            reverse_status: status,
        }
    }
}

pub use postern_common::dns::rbl_name;

/// The reverse-lookup (PTR) name of `ip`: `1.2.0.192.in-addr.arpa`.
pub fn arpa_name(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(_) => rbl_name(ip, "in-addr.arpa"),
        IpAddr::V6(_) => rbl_name(ip, "ip6.arpa"),
    }
}

/// The host name a PTR answer gives: of the PTR records' names that are
/// valid host names (not all-numeric, which would pass for an address),
/// the first in sorted order, lower case, without the final dot; None
/// when there is none. (A lookup through /etc/hosts may give several.)
pub fn ptr_name(answers: &[Record]) -> Option<String> {
    let mut names: Vec<String> = answers
        .iter()
        .filter_map(|r| match &r.data {
            RData::PTR(p) => Some(p.0.to_ascii().trim_end_matches('.').to_ascii_lowercase()),
            _ => None,
        })
        .filter(|n| hostname::valid_hostname(n))
        .collect();
    names.sort();
    names.into_iter().next()
}

/// Whether the forward lookups of a PTR name (its A and AAAA answers,
/// or why each failed) confirm `ip`: `Ok` when one of the addresses is
/// `ip`, `TryAgain` when none is but a lookup failed for now, else
/// `NotFound`.
pub fn confirm(ip: IpAddr, forward: &[Result<Vec<Record>, Answer>]) -> NameStatus {
    let mut temp = false;
    for f in forward {
        match f {
            Ok(records) => {
                if records.iter().any(|r| r.data.ip_addr() == Some(ip)) {
                    return NameStatus::Ok;
                }
            }
            Err(Answer::TryAgain) => temp = true,
            Err(_) => {}
        }
    }
    if temp {
        NameStatus::TryAgain
    } else {
        NameStatus::NotFound
    }
}

/// The helper threads.
pub struct Dns {
    tx: Sender<(usize, Query)>,
    rx: Receiver<(usize, Query, Answer)>,
    /// Where [`Query::Verify`] answers go, and how they are asked.
    done_tx: Sender<(usize, Query, Answer)>,
    waker: Arc<mio::Waker>,
    verify: crate::verify_lookup::VerifyLookup,
}

impl Dns {
    /// Starts the workers; `wake` is called after each answer.
    pub fn start(
        servers: Vec<SocketAddr>,
        timeout: Duration,
        waker: Arc<mio::Waker>,
        verify: crate::verify_lookup::VerifyLookup,
    ) -> Result<Dns, String> {
        let (tx, work_rx) = channel::<(usize, Query)>();
        let (done_tx, rx) = channel();
        let work_rx = Arc::new(Mutex::new(work_rx));
        for i in 0..WORKERS {
            let work_rx = work_rx.clone();
            let done_tx = done_tx.clone();
            let waker = waker.clone();
            let servers = servers.clone();
            std::thread::Builder::new()
                .name(format!("dns{i}"))
                .spawn(move || {
                    // Made here: the runtime and resolver stay on this thread.
                    let resolver = Worker::new(&servers, timeout);
                    if let Err(e) = &resolver {
                        if i == 0 {
                            warning!("{e}");
                        }
                    }
                    loop {
                        let next = match work_rx.lock() {
                            Ok(rx) => rx.recv(),
                            Err(_) => return,
                        };
                        let Ok((slot, q)) = next else { return };
                        let a = match &resolver {
                            Ok(r) => r.answer(&q),
                            Err(_) => Answer::TryAgain,
                        };
                        if done_tx.send((slot, q, a)).is_err() {
                            return;
                        }
                        let _ = waker.wake();
                    }
                })
                .map_err(|e| format!("cannot start DNS thread: {e}"))?;
        }
        Ok(Dns {
            tx,
            rx,
            done_tx,
            waker,
            verify,
        })
    }

    pub fn submit(&self, slot: usize, q: Query) {
        if let Query::Verify(address) = &q {
            // Its own thread: a poll may wait address_verify_poll_delay
            // several times, and must not hold up DNS lookups.
            self.verify.submit(
                slot,
                address.clone(),
                self.done_tx.clone(),
                self.waker.clone(),
            );
            return;
        }
        let _ = self.tx.send((slot, q));
    }

    /// Asks the session's milters on a thread of its own: the milters
    /// may take `milter_command_timeout` per stage.
    pub fn submit_milter(&self, slot: usize, q: Query, link: crate::milter::Link) {
        let Query::Milter(ask) = &q else {
            return;
        };
        let ask = ask.clone();
        let (done, waker) = (self.done_tx.clone(), self.waker.clone());
        let q2 = q.clone();
        let started = std::thread::Builder::new()
            .name("milter".into())
            .spawn(move || {
                let outcome = link.ask(&ask);
                let _ = done.send((slot, q, Answer::Milter(outcome)));
                let _ = waker.wake();
            });
        if let Err(e) = started {
            warning!("cannot start a milter thread: {e}");
            let a = Answer::Milter(postern_common::milter::Outcome::Tempfail(
                postern_common::milter::TEMPFAIL_TEXT.into(),
            ));
            let _ = self.done_tx.send((slot, q2, a));
            let _ = self.waker.wake();
        }
    }

    /// Answers that came in.
    pub fn drain(&self) -> Vec<(usize, Query, Answer)> {
        self.rx.try_iter().collect()
    }
}

struct Worker {
    rt: tokio::runtime::Runtime,
    resolver: TokioResolver,
}

impl Worker {
    fn new(servers: &[SocketAddr], timeout: Duration) -> Result<Worker, String> {
        let BlockingResolver { rt, resolver } = BlockingResolver::new(servers, timeout)?;
        Ok(Worker { rt, resolver })
    }

    /// The answer records of `name`'s `rtype` query, or what a failure
    /// means ([`rcode_answer`]).
    fn lookup(&self, name: &str, rtype: RecordType) -> Result<Vec<Record>, Answer> {
        let mut n = Name::from_utf8(name).map_err(|_| Answer::NotFound)?;
        n.set_fqdn(true);
        match self.rt.block_on(self.resolver.lookup(n, rtype)) {
            Ok(l) => Ok(l.answers().to_vec()),
            Err(NetError::Dns(HDnsError::NoRecordsFound(nr))) => {
                Err(rcode_answer(nr.response_code))
            }
            Err(_) => Err(Answer::TryAgain),
        }
    }

    fn answer(&self, q: &Query) -> Answer {
        match q {
            Query::Domain(d) => {
                if d.is_empty() || d.starts_with('.') || d.contains("..") {
                    return Answer::NotFound;
                }
                let mut temp = false;
                for rtype in [RecordType::MX, RecordType::A, RecordType::AAAA] {
                    match self.lookup(d, rtype) {
                        Ok(v) if has_records(&v, rtype) => return Answer::Found(Vec::new()),
                        Ok(_) => {}
                        Err(Answer::TryAgain) => temp = true,
                        Err(_) => {}
                    }
                }
                if temp {
                    Answer::TryAgain
                } else {
                    Answer::NotFound
                }
            }
            Query::Rbl(name) => match self.lookup(name, RecordType::A) {
                Ok(v) => rbl_answer(&v),
                Err(a) => a,
            },
            Query::Peer(ip) => Answer::Peer(self.peer_name(*ip)),
            Query::Servers(kind, domain) => self.servers(*kind, domain),
            // Answered by the verify service (Dns::submit), never here.
            Query::Verify(_) => Answer::Verify(Err("not a DNS query".into())),
            Query::Milter(_) => Answer::Milter(postern_common::milter::Outcome::Tempfail(
                postern_common::milter::TEMPFAIL_TEXT.into(),
            )),
        }
    }

    /// The hosts of a [`Query::Servers`], each with its A and AAAA
    /// addresses (at most [`SERVER_LIMIT`] hosts).
    fn servers(&self, kind: ServerKind, domain: &str) -> Answer {
        let domain = domain.trim_end_matches('.').to_ascii_lowercase();
        if domain.is_empty() || domain.starts_with('.') || domain.contains("..") {
            return Answer::NotFound;
        }
        let mut names: Vec<(u16, String)> = Vec::new();
        match kind {
            ServerKind::A => names.push((0, domain.clone())),
            ServerKind::Mx | ServerKind::MxOnly => match self.lookup(&domain, RecordType::MX) {
                Ok(v) => names.extend(v.iter().filter_map(|r| {
                    match &r.data {
                        RData::MX(mx) => Some((
                            mx.preference,
                            mx.exchange
                                .to_ascii()
                                .trim_end_matches('.')
                                .to_ascii_lowercase(),
                        )),
                        _ => None,
                    }
                })),
                Err(Answer::NotFound) if kind == ServerKind::Mx => names.push((0, domain.clone())),
                Err(a) => return a,
            },
            ServerKind::Ns => {
                let mut d = domain.as_str();
                loop {
                    match self.lookup(d, RecordType::NS) {
                        Ok(v) if has_records(&v, RecordType::NS) => {
                            names.extend(v.iter().filter_map(|r| match &r.data {
                                RData::NS(ns) => Some((
                                    0,
                                    ns.0.to_ascii().trim_end_matches('.').to_ascii_lowercase(),
                                )),
                                _ => None,
                            }));
                            break;
                        }
                        Ok(_) | Err(Answer::NotFound) => match d.split_once('.') {
                            Some((_, parent)) if !parent.is_empty() => d = parent,
                            _ => return Answer::NotFound,
                        },
                        Err(a) => return a,
                    }
                }
            }
        }
        // A null MX (RFC 7505): one record, for the root.
        if names.len() == 1 && names[0].1.is_empty() {
            return Answer::Servers(Vec::new());
        }
        names.sort();
        names.truncate(SERVER_LIMIT);
        let servers = names
            .into_iter()
            .map(|(pref, name)| {
                let mut addrs = Vec::new();
                let mut addrs_failed = false;
                if let Ok(ip) = name.parse::<IpAddr>() {
                    addrs.push(ip);
                } else {
                    for t in [RecordType::A, RecordType::AAAA] {
                        match self.lookup(&name, t) {
                            Ok(v) => addrs.extend(v.iter().filter_map(|r| r.data.ip_addr())),
                            Err(Answer::TryAgain) => addrs_failed = true,
                            Err(_) => {}
                        }
                    }
                }
                Server {
                    pref,
                    name,
                    addrs,
                    addrs_failed,
                }
            })
            .collect();
        Answer::Servers(servers)
    }

    /// The client's names, and Postfix's warnings when they do not add
    /// up.
    fn peer_name(&self, ip: IpAddr) -> PeerName {
        // /etc/hosts first, in its own order (the resolver's answer from
        // it has lost the order of the names).
        let from_hosts = hosts_name(hosts_text(), ip);
        let reverse = match from_hosts.map(|n| Ok(Some(n))).unwrap_or_else(|| {
            self.lookup(&arpa_name(ip), RecordType::PTR)
                .map(|v| ptr_name(&v))
        }) {
            Ok(v) => v,
            Err(Answer::TryAgain) => return PeerName::unknown(NameStatus::TryAgain),
            Err(_) => None,
        };
        let Some(reverse) = reverse else {
            return PeerName::unknown(NameStatus::NotFound);
        };
        let forward: Vec<Result<Vec<Record>, Answer>> = [RecordType::A, RecordType::AAAA]
            .iter()
            .map(|&t| self.lookup(&reverse, t))
            .collect();
        verified(ip, reverse, &forward)
    }
}

/// The client's names once its PTR name is known and looked up forward
/// (`forward`: the A and AAAA answers), with Postfix's warnings when the
/// name does not lead back to `ip`.
fn verified(ip: IpAddr, reverse: String, forward: &[Result<Vec<Record>, Answer>]) -> PeerName {
    let status = confirm(ip, forward);
    match status {
        NameStatus::Ok => {}
        NameStatus::TryAgain => {
            warning!("{ip}: hostname {reverse} verification failed: Temporary failure in name resolution")
        }
        NameStatus::NotFound => {
            if forward
                .iter()
                .any(|f| f.as_ref().is_ok_and(|v| !v.is_empty()))
            {
                warning!("hostname {reverse} does not resolve to address {ip}")
            } else {
                warning!("hostname {reverse} does not resolve to address {ip}: Name or service not known")
            }
        }
    }
    PeerName {
        name: if status == NameStatus::Ok {
            reverse.clone()
        } else {
            UNKNOWN.into()
        },
        name_status: status,
        reverse_name: reverse,
        reverse_status: NameStatus::Ok,
    }
}

/// /etc/hosts, read once per process (as the resolver reads it; in a
/// chroot, the copy master keeps in the queue directory).
fn hosts_text() -> &'static str {
    static TEXT: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    TEXT.get_or_init(|| std::fs::read_to_string("/etc/hosts").unwrap_or_default())
}

/// The name /etc/hosts (`text`) gives `ip`, as the C library's
/// getnameinfo takes it: the first name on the first line for that
/// address, when it is a valid host name.
pub fn hosts_name(text: &str, ip: IpAddr) -> Option<String> {
    text.lines()
        .map(|l| l.split('#').next().unwrap_or(""))
        .find_map(|l| {
            let mut words = l.split_whitespace();
            let addr: IpAddr = words.next()?.parse().ok()?;
            if postern_common::cidr::normalize(addr) != ip {
                return None;
            }
            words.next().map(str::to_ascii_lowercase)
        })
        .filter(|n| hostname::valid_hostname(n))
}

/// The addresses /etc/hosts (`text`) gives host name `name`.
pub fn hosts_addrs(text: &str, name: &str) -> Vec<IpAddr> {
    text.lines()
        .map(|l| l.split('#').next().unwrap_or(""))
        .filter_map(|l| {
            let mut words = l.split_whitespace();
            let addr: IpAddr = words.next()?.parse().ok()?;
            words
                .any(|w| w.eq_ignore_ascii_case(name))
                .then(|| postern_common::cidr::normalize(addr))
        })
        .collect()
}

/// The names of a loopback client, answered on the event loop. The C
/// library's resolver, which Postfix asks, answers loopback addresses
/// from /etc/hosts, and a name server answers "no such name" for the rest
/// of 127.in-addr.arpa (a locally served zone, RFC 6303): such a client
/// is `unknown`, with nothing logged, as with Postfix. (The DNS library
/// of the helper threads would invent `localhost` for every 127.0.0.0/8
/// address instead.) This also spares a trip through the helper threads,
/// which would cost more than the rest of a one-message session from a
/// local web application. None: not a loopback address, or a name from
/// /etc/hosts that leads back to it only through the DNS (the helper
/// threads take it then).
pub fn loopback_peer(ip: IpAddr) -> Option<PeerName> {
    if !ip.is_loopback() {
        return None;
    }
    let text = hosts_text();
    let Some(reverse) = hosts_name(text, ip) else {
        return Some(PeerName::unknown(NameStatus::NotFound));
    };
    let mut addrs = hosts_addrs(text, &reverse);
    if reverse == "localhost" || reverse.ends_with(".localhost") {
        if !addrs.iter().any(IpAddr::is_ipv4) {
            addrs.push(std::net::Ipv4Addr::LOCALHOST.into());
        }
        if !addrs.iter().any(IpAddr::is_ipv6) {
            addrs.push(std::net::Ipv6Addr::LOCALHOST.into());
        }
    } else if !addrs.contains(&ip) {
        return None;
    }
    let owner = Name::from_ascii(&reverse).ok()?;
    let records = addrs
        .into_iter()
        .map(|a| {
            let data = match a {
                IpAddr::V4(v4) => RData::A(v4.into()),
                IpAddr::V6(v6) => RData::AAAA(v6.into()),
            };
            Record::from_rdata(owner.clone(), 0, data)
        })
        .collect();
    Some(verified(ip, reverse, &[Ok(records)]))
}

/// What a response code with no usable record means: NXDOMAIN and
/// NOERROR (no data) are "not found", anything else a temporary failure.
pub fn rcode_answer(rc: ResponseCode) -> Answer {
    match rc {
        ResponseCode::NXDomain | ResponseCode::NoError => Answer::NotFound,
        _ => Answer::TryAgain,
    }
}

/// Whether the answer records of an `rtype` query hold one of that type
/// (not only the CNAMEs of a chain).
pub fn has_records(answers: &[Record], rtype: RecordType) -> bool {
    answers.iter().any(|r| r.record_type() == rtype)
}

/// A DNS list's verdict from the answer records of its A query: listed
/// with these addresses (`Found`, in answer order, without repeats) or not
/// listed. Records of other types (a CNAME chain, a stray TXT) are
/// skipped.
pub fn rbl_answer(answers: &[Record]) -> Answer {
    let mut ips: Vec<IpAddr> = Vec::new();
    for r in answers {
        if let RData::A(a) = &r.data {
            let ip = IpAddr::V4(a.0);
            if !ips.contains(&ip) {
                ips.push(ip);
            }
        }
    }
    if ips.is_empty() {
        Answer::NotFound
    } else {
        Answer::Found(ips)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rbl_answers() {
        use hickory_resolver::proto::rr::rdata::{CNAME, TXT};
        let n = |s: &str| Name::from_utf8(s).unwrap();
        let a = |ip: &str| {
            let ip: std::net::Ipv4Addr = ip.parse().unwrap();
            Record::from_rdata(n("2.0.0.127.zen.test."), 60, RData::A(ip.into()))
        };
        let chain = vec![
            Record::from_rdata(
                n("2.0.0.127.x.test."),
                60,
                RData::CNAME(CNAME(n("2.0.0.127.zen.test."))),
            ),
            a("127.0.0.2"),
            Record::from_rdata(
                n("2.0.0.127.zen.test."),
                60,
                RData::TXT(TXT::new(vec!["listed".into()])),
            ),
            a("127.0.0.4"),
            a("127.0.0.2"),
        ];
        assert_eq!(
            rbl_answer(&chain),
            Answer::Found(vec![
                "127.0.0.2".parse().unwrap(),
                "127.0.0.4".parse().unwrap()
            ])
        );
        assert_eq!(rbl_answer(&chain[..1]), Answer::NotFound);
        assert!(has_records(&chain, RecordType::A));
        assert!(!has_records(&chain[..1], RecordType::MX));
        assert_eq!(rcode_answer(ResponseCode::ServFail), Answer::TryAgain);
        assert_eq!(rcode_answer(ResponseCode::NXDomain), Answer::NotFound);
    }

    #[test]
    fn peer_names() {
        use hickory_resolver::proto::rr::rdata::PTR;
        let n = |s: &str| Name::from_ascii(s).unwrap();
        let ptr =
            |s: &str| Record::from_rdata(n("1.0.0.127.in-addr.arpa."), 60, RData::PTR(PTR(n(s))));
        // Several names (as /etc/hosts gives them): the first sorted;
        // an all-numeric name is not a host name.
        let answers = [ptr("vm."), ptr("Localhost."), ptr("192.0.2.1.")];
        assert_eq!(ptr_name(&answers).as_deref(), Some("localhost"));
        assert_eq!(ptr_name(&answers[2..]), None);
        assert_eq!(ptr_name(&[]), None);

        let ip: IpAddr = "127.0.0.1".parse().unwrap();
        let a = |s: &str| {
            let v4: std::net::Ipv4Addr = s.parse().unwrap();
            Record::from_rdata(n("localhost."), 60, RData::A(v4.into()))
        };
        assert_eq!(
            confirm(ip, &[Ok(vec![a("127.0.0.2"), a("127.0.0.1")])]),
            NameStatus::Ok
        );
        assert_eq!(
            confirm(ip, &[Ok(vec![a("127.0.0.2")]), Err(Answer::NotFound)]),
            NameStatus::NotFound
        );
        assert_eq!(
            confirm(ip, &[Ok(vec![a("127.0.0.2")]), Err(Answer::TryAgain)]),
            NameStatus::TryAgain
        );
        assert_eq!(
            confirm(ip, &[Err(Answer::TryAgain), Ok(vec![a("127.0.0.1")])]),
            NameStatus::Ok
        );
        assert_eq!(arpa_name(ip), "1.0.0.127.in-addr.arpa");
        assert!(arpa_name("::1".parse().unwrap()).ends_with(".0.0.0.ip6.arpa"));
    }

    #[test]
    fn hosts_file() {
        let text = "# comment\n127.0.0.1\tlocalhost runsc\n::1 localhost ip6-localhost # v6\n\
                    127.0.1.1 VM.example vm\n127.0.1.1 second\n10.0.0.1 999\n";
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert_eq!(
            hosts_name(text, ip("127.0.0.1")).as_deref(),
            Some("localhost")
        );
        assert_eq!(hosts_name(text, ip("::1")).as_deref(), Some("localhost"));
        assert_eq!(
            hosts_name(text, ip("127.0.1.1")).as_deref(),
            Some("vm.example")
        );
        assert_eq!(hosts_name(text, ip("127.0.0.9")), None);
        assert_eq!(hosts_name(text, ip("10.0.0.1")), None, "numeric");
        assert_eq!(hosts_addrs(text, "localhost"), [ip("127.0.0.1"), ip("::1")]);
        assert_eq!(hosts_addrs(text, "vm"), [ip("127.0.1.1")]);
        assert!(hosts_addrs(text, "v6").is_empty(), "comments are not names");
    }

    #[test]
    fn names() {
        assert_eq!(
            rbl_name("192.0.2.1".parse().unwrap(), "zen.example"),
            "1.2.0.192.zen.example"
        );
        assert!(rbl_name("2001:db8::1".parse().unwrap(), "x.example")
            .starts_with("1.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.8.b.d.0.1.0.0.2."));
    }
}
