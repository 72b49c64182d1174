//! The scheduler: per-transport, per-destination queues of pending
//! deliveries, and the choice of which one to dispatch next.
//!
//! A message entering the active queue has its pending recipients grouped
//! by (transport, destination) into [`Entry`]s of at most
//! `TRANSPORT_destination_recipient_limit` recipients each; every entry
//! waits in its destination's FIFO queue. [`Scheduler::pick`] hands out
//! entries round-robin, first across transports, then across the
//! destinations of a transport, so that one busy destination does not
//! starve the others, and never more than
//! `TRANSPORT_destination_concurrency_limit` requests in flight per
//! destination, nor more than the overall limit.
//!
//! A destination is the request's next hop, except for a transport whose
//! recipient limit is 1 (`local`): there, as in Postfix, each recipient is
//! its own destination, so the concurrency limit applies per mailbox.
//!
//! Only destinations that can take a request now sit in a transport's
//! ready ring, so a pick costs O(1) however many destinations are at their
//! limit. The per-destination state ([`Destination`]) is where later
//! scheduling features belong: a concurrency window moved by feedback from
//! [`Scheduler::done`], a dead flag and its retry time, rate delays.

use postern_conf::Config;
use std::collections::{HashMap, VecDeque};

/// A per-transport parameter: `TRANSPORT_NAME` when that is set (or has a
/// default of its own, as `local_destination_concurrency_limit`), else
/// `default_NAME`. `suffix` is the name without its prefix, e.g.
/// "destination_concurrency_limit".
pub fn transport_param(cfg: &Config, transport: &str, suffix: &str) -> Option<u64> {
    let specific = format!("{transport}_{suffix}");
    let name = if cfg.raw(&specific).is_some() {
        specific
    } else {
        format!("default_{suffix}")
    };
    match cfg.get_u64(&name) {
        Ok(v) => Some(v),
        Err(e) => {
            postern_common::warning!("{e}");
            None
        }
    }
}

/// The limits of one transport.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Requests in flight per destination; 0 = no limit of its own.
    pub concurrency: usize,
    /// Recipients per request (at least 1; `usize::MAX` = no limit).
    pub recipients: usize,
}

impl Limits {
    pub fn from_config(cfg: &Config, transport: &str) -> Limits {
        Limits {
            concurrency: transport_param(cfg, transport, "destination_concurrency_limit")
                .unwrap_or(20) as usize,
            // 0 = no limit, as in Postfix.
            recipients: match transport_param(cfg, transport, "destination_recipient_limit")
                .unwrap_or(50)
            {
                0 => usize::MAX,
                n => n as usize,
            },
        }
    }
}

/// Where one pending recipient goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// Index of the recipient in its message's envelope.
    pub index: usize,
    pub transport: String,
    pub nexthop: String,
    /// The recipient address (the destination key when the transport's
    /// recipient limit is 1).
    pub address: String,
}

/// A batch of one message's recipients for one destination.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub message: String,
    /// Indexes into the message's envelope recipients.
    pub recipients: Vec<usize>,
}

/// What to dispatch: an entry and where it goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dispatch {
    pub transport: String,
    /// The destination key, to hand back to [`Scheduler::done`].
    pub destination: String,
    pub nexthop: String,
    pub entry: Entry,
}

/// One destination of one transport.
#[derive(Debug)]
struct Destination {
    nexthop: String,
    entries: VecDeque<Entry>,
    in_flight: usize,
    /// Requests allowed in flight now (0 = no limit). Today the
    /// transport's limit; room for a feedback-driven window.
    window: usize,
    /// Whether the key is in the transport's ready ring.
    in_ring: bool,
}

impl Destination {
    fn ready(&self) -> bool {
        !self.entries.is_empty() && (self.window == 0 || self.in_flight < self.window)
    }
}

#[derive(Debug)]
struct Transport {
    name: String,
    limits: Limits,
    destinations: HashMap<String, Destination>,
    /// Destinations that can take a request now, in round-robin order.
    ring: VecDeque<String>,
    in_flight: usize,
}

impl Transport {
    fn make_ready(&mut self, key: &str) {
        if let Some(d) = self.destinations.get_mut(key) {
            if !d.in_ring && d.ready() {
                d.in_ring = true;
                self.ring.push_back(key.to_string());
            }
        }
    }

    fn pick(&mut self) -> Option<Dispatch> {
        while let Some(key) = self.ring.pop_front() {
            let Some(d) = self.destinations.get_mut(&key) else {
                continue;
            };
            d.in_ring = false;
            if !d.ready() {
                continue;
            }
            let entry = d
                .entries
                .pop_front()
                .expect("ready destination has entries");
            d.in_flight += 1;
            let nexthop = d.nexthop.clone();
            self.in_flight += 1;
            self.make_ready(&key);
            return Some(Dispatch {
                transport: self.name.clone(),
                destination: key,
                nexthop,
                entry,
            });
        }
        None
    }
}

/// Every transport's destination queues.
pub struct Scheduler {
    transports: Vec<Transport>,
    index: HashMap<String, usize>,
    /// The transport to try first at the next pick.
    next: usize,
    in_flight: usize,
    max_in_flight: usize,
    limits_of: Box<dyn Fn(&str) -> Limits>,
}

impl Scheduler {
    /// `max_in_flight`: requests in flight over all transports.
    /// `limits_of`: the limits of a transport, asked once per transport.
    pub fn new(max_in_flight: usize, limits_of: impl Fn(&str) -> Limits + 'static) -> Scheduler {
        Scheduler {
            transports: Vec::new(),
            index: HashMap::new(),
            next: 0,
            in_flight: 0,
            max_in_flight: max_in_flight.max(1),
            limits_of: Box::new(limits_of),
        }
    }

    fn transport(&mut self, name: &str) -> usize {
        if let Some(&i) = self.index.get(name) {
            return i;
        }
        let limits = (self.limits_of)(name);
        self.transports.push(Transport {
            name: name.to_string(),
            limits,
            destinations: HashMap::new(),
            ring: VecDeque::new(),
            in_flight: 0,
        });
        let i = self.transports.len() - 1;
        self.index.insert(name.to_string(), i);
        i
    }

    /// Queues a message's pending recipients. Returns the number of
    /// entries queued (the requests the message will need).
    pub fn add_message(&mut self, message: &str, targets: &[Target]) -> usize {
        // Group by (transport, destination) in order of first appearance.
        let mut groups: Vec<(usize, String, String, Vec<usize>)> = Vec::new();
        let mut at: HashMap<(usize, String), usize> = HashMap::new();
        for t in targets {
            let ti = self.transport(&t.transport);
            let limits = self.transports[ti].limits;
            let key = if limits.recipients == 1 {
                t.address.to_ascii_lowercase()
            } else {
                t.nexthop.to_ascii_lowercase()
            };
            match at.get(&(ti, key.clone())) {
                Some(&g) => groups[g].3.push(t.index),
                None => {
                    at.insert((ti, key.clone()), groups.len());
                    groups.push((ti, key, t.nexthop.clone(), vec![t.index]));
                }
            }
        }
        let mut count = 0;
        for (ti, key, nexthop, rcpts) in groups {
            let t = &mut self.transports[ti];
            let limit = t.limits.recipients;
            let window = t.limits.concurrency;
            let d = t
                .destinations
                .entry(key.clone())
                .or_insert_with(|| Destination {
                    nexthop,
                    entries: VecDeque::new(),
                    in_flight: 0,
                    window,
                    in_ring: false,
                });
            for chunk in rcpts.chunks(limit) {
                d.entries.push_back(Entry {
                    message: message.to_string(),
                    recipients: chunk.to_vec(),
                });
                count += 1;
            }
            t.make_ready(&key);
        }
        count
    }

    /// The next request to dispatch, if any may go now.
    pub fn pick(&mut self) -> Option<Dispatch> {
        if self.in_flight >= self.max_in_flight {
            return None;
        }
        let n = self.transports.len();
        for k in 0..n {
            let ti = (self.next + k) % n;
            if let Some(d) = self.transports[ti].pick() {
                self.next = (ti + 1) % n;
                self.in_flight += 1;
                return Some(d);
            }
        }
        None
    }

    /// A dispatched request has finished. `destination_ok` is false when
    /// the destination itself could not be reached (for feedback).
    pub fn done(&mut self, transport: &str, destination: &str, _destination_ok: bool) {
        let Some(&ti) = self.index.get(transport) else {
            return;
        };
        let t = &mut self.transports[ti];
        let Some(d) = t.destinations.get_mut(destination) else {
            return;
        };
        if d.in_flight == 0 {
            return;
        }
        d.in_flight -= 1;
        t.in_flight -= 1;
        self.in_flight -= 1;
        if d.entries.is_empty() && d.in_flight == 0 {
            t.destinations.remove(destination);
        } else {
            t.make_ready(destination);
        }
    }

    /// Requests in flight over all transports.
    #[cfg(test)]
    pub fn in_flight(&self) -> usize {
        self.in_flight
    }

    /// Entries waiting to be dispatched.
    #[cfg(test)]
    pub fn queued(&self) -> usize {
        self.transports
            .iter()
            .flat_map(|t| t.destinations.values())
            .map(|d| d.entries.len())
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn target(index: usize, transport: &str, nexthop: &str, address: &str) -> Target {
        Target {
            index,
            transport: transport.into(),
            nexthop: nexthop.into(),
            address: address.into(),
        }
    }

    fn limits(t: &str) -> Limits {
        match t {
            "local" => Limits {
                concurrency: 2,
                recipients: 1,
            },
            _ => Limits {
                concurrency: 2,
                recipients: 3,
            },
        }
    }

    #[test]
    fn per_transport_parameters() {
        let cfg = Config::from_text(
            Path::new("/nonexistent"),
            "smtp_destination_recipient_limit = 7\ndefault_destination_concurrency_limit = 9\n",
            Path::new("main.cf"),
        )
        .unwrap();
        assert_eq!(
            Limits::from_config(&cfg, "smtp"),
            Limits {
                concurrency: 9,
                recipients: 7
            }
        );
        assert_eq!(
            Limits::from_config(&cfg, "local"),
            Limits {
                concurrency: 2,
                recipients: 1
            }
        );
        assert_eq!(
            Limits::from_config(&cfg, "relay"),
            Limits {
                concurrency: 9,
                recipients: 50
            }
        );
    }

    #[test]
    fn grouping_and_recipient_limit() {
        let mut s = Scheduler::new(100, limits);
        let targets: Vec<Target> = (0..7)
            .map(|i| target(i, "smtp", "a.test", &format!("u{i}@a.test")))
            .chain([target(7, "smtp", "B.test", "x@b.test")])
            .chain([
                target(8, "local", "h", "alice@h"),
                target(9, "local", "h", "bob@h"),
            ])
            .collect();
        // a.test: 7 recipients in batches of 3 -> 3; b.test -> 1; local: one
        // per recipient -> 2.
        assert_eq!(s.add_message("M1", &targets), 6);
        let mut got = Vec::new();
        while let Some(d) = s.pick() {
            got.push(d);
        }
        // a.test stops at its concurrency of 2; everything else goes.
        assert_eq!(got.len(), 5);
        let a: Vec<_> = got.iter().filter(|d| d.destination == "a.test").collect();
        assert_eq!(a.len(), 2);
        assert_eq!(a[0].entry.recipients, vec![0, 1, 2]);
        assert_eq!(a[1].entry.recipients, vec![3, 4, 5]);
        assert!(got
            .iter()
            .any(|d| d.destination == "b.test" && d.nexthop == "B.test"));
        let locals: Vec<_> = got.iter().filter(|d| d.transport == "local").collect();
        assert_eq!(locals.len(), 2);
        assert!(locals.iter().all(|d| d.entry.recipients.len() == 1));
        assert_eq!(s.in_flight(), 5);
        assert_eq!(s.queued(), 1);
        s.done("smtp", "a.test", true);
        let d = s.pick().unwrap();
        assert_eq!(d.entry.recipients, vec![6]);
        assert!(s.pick().is_none());
    }

    #[test]
    fn round_robin_does_not_starve() {
        let mut s = Scheduler::new(100, |_| Limits {
            concurrency: 0,
            recipients: 2,
        });
        // A big message for one destination, then a small one elsewhere.
        let big: Vec<Target> = (0..50)
            .map(|i| target(i, "smtp", "big.test", "x"))
            .collect();
        s.add_message("BIG", &big);
        s.add_message("SMALL", &[target(0, "smtp", "small.test", "y")]);
        let first: Vec<String> = (0..2).map(|_| s.pick().unwrap().destination).collect();
        assert!(first.contains(&"small.test".to_string()), "{first:?}");
    }

    #[test]
    fn overall_limit() {
        let mut s = Scheduler::new(3, |_| Limits {
            concurrency: 0,
            recipients: 2,
        });
        let t: Vec<Target> = (0..10)
            .map(|i| target(i, "smtp", &format!("d{i}"), "x"))
            .collect();
        s.add_message("M", &t);
        assert!(s.pick().is_some() && s.pick().is_some() && s.pick().is_some());
        assert!(s.pick().is_none());
        s.done("smtp", "d0", true);
        assert!(s.pick().is_some());
        assert!(s.pick().is_none());
    }
}
