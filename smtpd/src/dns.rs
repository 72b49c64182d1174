//! DNS lookups for the restrictions that need them
//! (`reject_unknown_sender_domain`, `reject_unknown_recipient_domain`,
//! `reject_rbl_client`), off the event loop.
//!
//! hickory-resolver has no synchronous API, and a lookup can take
//! seconds: a few helper threads, each with its own current-thread tokio
//! runtime and resolver, take [`Query`]s from a shared channel and send
//! back [`Answer`]s, waking the mio loop with a [`mio::Waker`]. They are
//! started at the first query (smtpd never runs as root, so there are no
//! privileges to drop first). Name servers: `dns_resolver_addresses`
//! (Postern-only) or /etc/resolv.conf; each query waits
//! `dns_resolver_timeout`.
//!
//! What an answer means is decided by pure functions of its records
//! ([`rbl_answer`], [`has_records`], [`rcode_answer`]), which the fuzz
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
use postern_common::warning;
use std::net::{IpAddr, SocketAddr};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Helper threads (lookups in flight at once).
const WORKERS: usize = 4;

/// A fact a restriction needs.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Query {
    /// Whether a mail domain exists: an MX, A or AAAA record.
    Domain(String),
    /// The A records of a DNS list name (`4.3.2.1.zen.example`).
    Rbl(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    /// The name has records (for Rbl: these addresses).
    Found(Vec<IpAddr>),
    /// NXDOMAIN, or no record of any type asked.
    NotFound,
    /// The name servers did not answer.
    TryAgain,
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

/// The helper threads.
pub struct Dns {
    tx: Sender<(usize, Query)>,
    rx: Receiver<(usize, Query, Answer)>,
}

impl Dns {
    /// Starts the workers; `wake` is called after each answer.
    pub fn start(
        servers: Vec<SocketAddr>,
        timeout: Duration,
        waker: Arc<mio::Waker>,
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
        Ok(Dns { tx, rx })
    }

    pub fn submit(&self, slot: usize, q: Query) {
        let _ = self.tx.send((slot, q));
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
        }
    }
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
    fn names() {
        assert_eq!(
            rbl_name("192.0.2.1".parse().unwrap(), "zen.example"),
            "1.2.0.192.zen.example"
        );
        assert!(rbl_name("2001:db8::1".parse().unwrap(), "x.example")
            .starts_with("1.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.8.b.d.0.1.0.0.2."));
    }
}
