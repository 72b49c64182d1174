//! The scheduler: per-transport, per-destination queues of pending
//! deliveries, and the choice of which one to dispatch next.
//!
//! A message entering the active queue has its pending recipients grouped
//! by (transport, destination) into [`Entry`]s of at most
//! `TRANSPORT_destination_recipient_limit` recipients each; every entry
//! waits in its destination's queue. [`Scheduler::pick`] hands out
//! entries round-robin, first across transports, then across the
//! destinations of a transport, so that one busy destination does not
//! starve the others, then across the messages waiting for that
//! destination (one entry of each in turn, see `Rotation`), so that a
//! small message queued after a bulk one with thousands of recipients is
//! not kept behind all of the bulk message's entries; and never more than
//! `TRANSPORT_destination_concurrency_limit` requests in flight per
//! destination, nor more than the overall limit.
//!
//! A destination is the request's next hop, except for a transport whose
//! recipient limit is 1 (`local`): there, as in Postfix, each recipient is
//! its own destination, so the concurrency limit applies per mailbox.
//!
//! Only destinations that can take a request now sit in a transport's
//! ready ring, so a pick costs O(1) however many destinations are at their
//! limit.
//!
//! Concurrency feedback, as Postfix's: a destination starts with a window
//! of `initial_destination_concurrency` requests in flight; each request
//! that reached the destination widens it by
//! `TRANSPORT_destination_concurrency_positive_feedback` (default
//! `1/concurrency`: one more per window's worth of successes), up to the
//! transport's concurrency limit; each that could not reach it
//! (`DeliveryReply::destination_failed`) narrows it by the negative
//! feedback, down to 1, and counts 1/window of a failed pseudo-cohort.
//! When `TRANSPORT_destination_concurrency_failed_cohort_limit` cohorts
//! failed without a success between them, the destination is dead until
//! `transport_retry_time` has passed: its waiting entries, and any that
//! arrive meanwhile, are handed back ([`Scheduler::take_suspended`]) to
//! be deferred without a connection attempt, so a dead destination never
//! holds up a live one. `TRANSPORT_destination_rate_delay` > 0 allows one
//! request in flight at a time per destination, the next no sooner than
//! that delay after the last one ended ([`Scheduler::next_wakeup`]).

use crate::sites::{SiteRef, Sites, Suspension};
use postern_common::accounting;
use postern_common::ipc::SiteHint;
use postern_common::{info, warning};
use postern_conf::Config;
use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, VecDeque};
use std::rc::Rc;
use std::time::{Duration, Instant};

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
            warning!("{e}");
            None
        }
    }
}

/// A concurrency feedback amount: `N/concurrency` (N divided by the
/// current window) or a fixed number.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Feedback {
    PerWindow(f64),
    Fixed(f64),
}

impl Feedback {
    pub fn parse(s: &str) -> Option<Feedback> {
        let s = s.trim();
        if let Some(n) = s.strip_suffix("/concurrency") {
            return n.trim().parse().ok().map(Feedback::PerWindow);
        }
        if let Some((a, b)) = s.split_once('/') {
            let (a, b): (f64, f64) = (a.trim().parse().ok()?, b.trim().parse().ok()?);
            return (b > 0.0).then_some(Feedback::Fixed(a / b));
        }
        s.parse().ok().map(Feedback::Fixed)
    }

    fn value(self, window: f64) -> f64 {
        match self {
            Feedback::PerWindow(n) => n / window.max(1.0),
            Feedback::Fixed(v) => v,
        }
    }
}

fn transport_text(cfg: &Config, transport: &str, suffix: &str) -> String {
    let specific = format!("{transport}_{suffix}");
    if cfg.raw(&specific).is_some() {
        cfg.get(&specific)
    } else {
        cfg.get(&format!("default_{suffix}"))
    }
}

/// The limits of one transport.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Limits {
    /// Requests in flight per destination; 0 = no limit of its own.
    pub concurrency: usize,
    /// Recipients per request (at least 1; `usize::MAX` = no limit).
    pub recipients: usize,
    /// The window a destination starts with.
    pub initial: usize,
    pub positive: Feedback,
    pub negative: Feedback,
    /// Failed pseudo-cohorts after which a destination is dead (0: never).
    pub cohort_limit: f64,
    /// How long a dead destination stays dead.
    pub retry_time: Duration,
    /// Pause between deliveries to one destination (0: none).
    pub rate_delay: Duration,
    /// Entries (messages) per request when more wait than the window
    /// lets go (`*_delivery_batch_limit`; at least 1).
    pub batch: usize,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            concurrency: 20,
            recipients: 50,
            initial: 5,
            positive: Feedback::PerWindow(1.0),
            negative: Feedback::PerWindow(1.0),
            cohort_limit: 1.0,
            retry_time: Duration::from_secs(60),
            rate_delay: Duration::ZERO,
            batch: 1,
        }
    }
}

impl Limits {
    pub fn from_config(cfg: &Config, transport: &str) -> Limits {
        let d = Limits::default();
        let feedback = |suffix: &str, dflt: Feedback| {
            let text = transport_text(cfg, transport, suffix);
            Feedback::parse(&text).unwrap_or_else(|| {
                warning!("bad {suffix} value \"{text}\"; using 1/concurrency");
                dflt
            })
        };
        let time = |suffix: &str, dflt: Duration| {
            let specific = format!("{transport}_{suffix}");
            let name = if cfg.raw(&specific).is_some() {
                specific
            } else {
                format!("default_{suffix}")
            };
            cfg.get_time(&name).map(Duration::from_secs).unwrap_or(dflt)
        };
        Limits {
            initial: cfg
                .get_u64("initial_destination_concurrency")
                .unwrap_or(5)
                .max(1) as usize,
            positive: feedback("destination_concurrency_positive_feedback", d.positive),
            negative: feedback("destination_concurrency_negative_feedback", d.negative),
            cohort_limit: transport_param(
                cfg,
                transport,
                "destination_concurrency_failed_cohort_limit",
            )
            .unwrap_or(1) as f64,
            retry_time: Duration::from_secs(cfg.get_time("transport_retry_time").unwrap_or(60)),
            rate_delay: time("destination_rate_delay", Duration::ZERO),
            concurrency: transport_param(cfg, transport, "destination_concurrency_limit")
                .unwrap_or(20) as usize,
            batch: transport_param(cfg, transport, "delivery_batch_limit")
                .unwrap_or(1)
                .clamp(1, postern_common::ipc::DeliveryRequest::MAX_BATCH as u64)
                as usize,
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
    /// The pool the transport was chosen from, and why this member (for
    /// the accounting log); None: no pool.
    pub selection: Option<std::rc::Rc<(String, String)>>,
}

/// What to dispatch: an entry and where it goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dispatch {
    pub transport: String,
    /// The destination key, to hand back to [`Scheduler::done`].
    pub destination: String,
    pub nexthop: String,
    pub entry: Entry,
    /// More entries for the same destination, sent in the same request
    /// (a batch): taken only from a backlog the window could not
    /// dispatch now anyway.
    pub more: Vec<Entry>,
    /// The site's name and connection limits, for the agent's
    /// connection cache (`delivery_policy_maps`).
    pub site: Option<SiteHint>,
}

/// The entries waiting for one destination, taken message by message in
/// turn: each pick takes the next entry of the message at the head of the
/// rotation and puts that message at its tail, so a message queued after
/// a bulk one has its first entry dispatched after at most one entry of
/// each message already waiting, not after all of the bulk message's.
#[derive(Debug, Default)]
struct Rotation {
    /// Message → its entries, in the order they were queued.
    by_message: HashMap<String, VecDeque<Entry>>,
    /// Messages with entries, in turn order (each exactly once).
    turn: VecDeque<String>,
    len: usize,
}

impl Rotation {
    fn push(&mut self, entry: Entry) {
        self.len += 1;
        match self.by_message.get_mut(&entry.message) {
            Some(q) => q.push_back(entry),
            None => {
                self.turn.push_back(entry.message.clone());
                self.by_message
                    .insert(entry.message.clone(), VecDeque::from([entry]));
            }
        }
    }

    fn pop(&mut self) -> Option<Entry> {
        let message = self.turn.pop_front()?;
        let q = self.by_message.get_mut(&message)?;
        let entry = q.pop_front();
        if q.is_empty() {
            self.by_message.remove(&message);
        } else {
            self.turn.push_back(message);
        }
        if entry.is_some() {
            self.len -= 1;
        }
        entry
    }

    /// As [`Rotation::pop`], but the entry of a message not in `taken`:
    /// the others are passed over (to the tail of the rotation). A batch
    /// takes one entry per message, so that a message with many entries
    /// for one destination cannot fill a batch and keep a message queued
    /// after it waiting behind all of them.
    fn pop_other(&mut self, taken: &[&str]) -> Option<Entry> {
        for _ in 0..self.turn.len() {
            let front = self.turn.front()?;
            if taken.contains(&front.as_str()) {
                self.turn.rotate_left(1);
                continue;
            }
            return self.pop();
        }
        None
    }

    fn is_empty(&self) -> bool {
        self.len == 0
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.len
    }

    /// Takes out every entry of `message`; returns how many.
    fn remove_message(&mut self, message: &str) -> usize {
        let Some(q) = self.by_message.remove(message) else {
            return 0;
        };
        self.turn.retain(|m| m != message);
        self.len -= q.len();
        q.len()
    }

    /// Takes out every entry, in turn order.
    fn drain(&mut self) -> Vec<Entry> {
        let mut out = Vec::with_capacity(self.len);
        while let Some(e) = self.pop() {
            out.push(e);
        }
        out
    }
}

/// One destination of one transport.
#[derive(Debug)]
struct Destination {
    nexthop: String,
    entries: Rotation,
    in_flight: usize,
    /// The concurrency window (feedback-driven), between 1 and `limit`.
    window: f64,
    /// The transport's concurrency limit (0 = none: no window).
    limit: usize,
    /// Failed pseudo-cohorts since the last success.
    fail_cohorts: f64,
    /// Positive and negative feedback not yet turned into a whole step
    /// of the window (Postfix's hysteresis).
    success: f64,
    failure: f64,
    /// Dead until then: entries are suspended, not dispatched.
    dead_until: Option<Instant>,
    /// The last failure's status and reason, for suspended entries.
    last_failure: (String, String),
    /// With a rate delay: no request before then.
    next_at: Option<Instant>,
    /// With a rate delay: one request at a time.
    one_at_a_time: bool,
    /// Whether the key is in the transport's ready ring.
    in_ring: bool,
    /// The site it feeds (`delivery_policy_maps`), whose connection and
    /// rate limits hold across all its destinations.
    site: Option<SiteRef>,
}

impl Destination {
    fn new(nexthop: String, limits: &Limits) -> Destination {
        Destination {
            nexthop,
            entries: Rotation::default(),
            in_flight: 0,
            window: initial_window(limits),
            limit: limits.concurrency,
            fail_cohorts: 0.0,
            success: 0.0,
            failure: 0.0,
            dead_until: None,
            last_failure: (String::new(), String::new()),
            next_at: None,
            one_at_a_time: !limits.rate_delay.is_zero(),
            in_ring: false,
            site: None,
        }
    }

    /// Requests allowed in flight now.
    fn allowed(&self) -> usize {
        if self.one_at_a_time {
            1
        } else if self.limit == 0 {
            usize::MAX
        } else {
            (self.window.floor() as usize).clamp(1, self.limit)
        }
    }

    /// Whether the window is as wide as it may get: a concurrency limit,
    /// reached, and no rate delay.
    fn full_grown(&self) -> bool {
        !self.one_at_a_time && self.limit > 0 && self.allowed() >= self.limit
    }

    fn ready(&self) -> bool {
        !self.entries.is_empty()
            && self.dead_until.is_none()
            && self.next_at.is_none_or(|t| t <= Instant::now())
            && self.in_flight < self.allowed()
            && self.site.as_ref().is_none_or(|s| {
                let s = s.borrow();
                s.in_flight < s.max_connections()
                    && s.total_allows()
                    && s.suspended
                        .as_ref()
                        .is_none_or(|x| x.until <= std::time::SystemTime::now())
            })
    }

    /// The window, in whole requests (for tests and logs).
    #[cfg(test)]
    fn window(&self) -> usize {
        self.allowed()
    }
}

fn initial_window(limits: &Limits) -> f64 {
    if limits.concurrency == 0 {
        limits.initial as f64
    } else {
        limits.initial.min(limits.concurrency) as f64
    }
}

/// A pool member as written (`vmta1`, or Postfix's `smtp1:[relay]`):
/// its transport, and its next hop or else `nexthop`.
fn member_target(member: &str, nexthop: &str) -> (String, String) {
    let (t, n) = postern_common::resolve::split_transport(member);
    (t, if n.is_empty() { nexthop.to_string() } else { n })
}

/// Why and until when (unix seconds) a source may not send to a site.
#[derive(Debug, Clone, Default)]
struct Wait {
    until: u64,
    site: String,
    reason: String,
}

/// An entry that was not dispatched because its destination is dead,
/// with the status and reason to defer its recipients with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Suspended {
    pub entry: Entry,
    pub dsn: String,
    pub reason: String,
    /// Bounce rather than defer (`postern bounce DOMAIN`).
    pub bounce: bool,
    /// The site's suspension ends then (unix seconds): no retry sooner.
    pub site_until: Option<u64>,
    /// The site's name, when the destination has one (for the
    /// accounting records).
    pub site: String,
    /// (pool, next hop): the entry's source was suspended for the site
    /// alone; another member of its pool takes it
    /// ([`Scheduler::add_message`] again) instead of it waiting.
    pub reroute: Option<(String, String)>,
}

/// An entry queued behind its site's connection limit or message rate
/// (for the accounting log's Delayed record).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Held {
    pub entry: Entry,
    pub site: String,
    pub why: String,
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

    /// `waits`: destinations held back by their site's rate, and when
    /// they may go.
    /// `cluster`: the site limits a cluster shares ([`crate::cluster`]).
    fn pick(
        &mut self,
        waits: &mut Vec<(Instant, String)>,
        mut cluster: Option<&mut crate::cluster::Cluster>,
    ) -> Option<Dispatch> {
        while let Some(key) = self.ring.pop_front() {
            let Some(d) = self.destinations.get_mut(&key) else {
                continue;
            };
            d.in_ring = false;
            if !d.ready() {
                continue;
            }
            let mut hint = None;
            if let Some(site) = &d.site {
                let mut s = site.borrow_mut();
                let now = Instant::now();
                let at = s.rate_ready_at(now);
                if at > now {
                    d.next_at = Some(at);
                    waits.push((at, key));
                    continue;
                }
                if let Some(c) = cluster.as_deref_mut() {
                    match c.admit(&s, now) {
                        crate::cluster::Admit::Go => {}
                        crate::cluster::Admit::Wait(at) => {
                            d.next_at = Some(at);
                            waits.push((at, key));
                            continue;
                        }
                        crate::cluster::Admit::Blocked => continue,
                    }
                }
                s.take(now);
                hint = Some(SiteHint {
                    name: s.name.clone(),
                    // A connection kept open between requests would hold
                    // a place of a cluster's limit no other node sees.
                    max_messages_per_connection: if cluster.is_some() {
                        1
                    } else {
                        s.policy.max_messages_per_connection.unwrap_or(0)
                    },
                    idle_timeout_secs: s
                        .policy
                        .idle_timeout
                        .map_or(0, |t| t.as_secs().max(1) as u32),
                    no_reuse: s
                        .total
                        .as_ref()
                        .is_some_and(|t| t.borrow().max_connections.is_some()),
                });
            }
            let entry = d.entries.pop().expect("ready destination has entries");
            d.in_flight += 1;
            // Batch only what would wait anyway: the entries beyond those
            // the free places of the window take, once the window has
            // grown to its limit (until then, success widens it, and
            // parallel requests are the faster way through a backlog). A
            // rate delay spaces deliveries out, which a batch would undo.
            let mut more = Vec::new();
            // A site with a message rate counts one message per request.
            let rated = d.site.as_ref().is_some_and(|s| s.borrow().rated());
            if self.limits.batch > 1 && d.full_grown() && !rated {
                let free = d.allowed().saturating_sub(d.in_flight);
                let extra = d
                    .entries
                    .len
                    .saturating_sub(free)
                    .min(self.limits.batch - 1);
                while more.len() < extra {
                    let taken: Vec<&str> = std::iter::once(entry.message.as_str())
                        .chain(more.iter().map(|e: &Entry| e.message.as_str()))
                        .collect();
                    let Some(e) = d.entries.pop_other(&taken) else {
                        break;
                    };
                    more.push(e);
                }
            }
            let nexthop = d.nexthop.clone();
            self.in_flight += 1;
            self.make_ready(&key);
            return Some(Dispatch {
                transport: self.name.clone(),
                destination: key,
                nexthop,
                entry,
                more,
                site: hint,
            });
        }
        None
    }
}

/// The reason to bounce mail for a next hop's domain, while an
/// administrator's bounce for it lasts.
fn bounce_reason(
    bounced: &mut HashMap<String, (std::time::SystemTime, String)>,
    nexthop: &str,
) -> Option<String> {
    if bounced.is_empty() {
        return None;
    }
    let domain = nexthop_domain(nexthop);
    let now = std::time::SystemTime::now();
    bounced.retain(|_, (until, _)| *until > now);
    bounced
        .get(&domain)
        .map(|(_, r)| format!("delivery canceled by the administrator: {r}"))
}

/// The domain of a next hop: `[host]:port` → host, `domain:port` →
/// domain, lower case.
pub fn nexthop_domain(nexthop: &str) -> String {
    let n = nexthop.trim().to_ascii_lowercase();
    let d = if let Some(rest) = n.strip_prefix('[') {
        rest.split(']').next().unwrap_or("").to_string()
    } else {
        match n.rsplit_once(':') {
            Some((d, p)) if p.chars().all(|c| c.is_ascii_digit()) => d.to_string(),
            _ => n.clone(),
        }
    };
    d.trim_end_matches('.').to_string()
}

fn site_suspended(entry: Entry, site: &str, s: &Suspension) -> Suspended {
    let until = s
        .until
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    Suspended {
        entry,
        dsn: "4.4.5".into(),
        reason: format!(
            "delivery temporarily suspended: site {site} suspended until {}: {}",
            postern_common::time::rfc5322_date(until),
            s.reason
        ),
        bounce: false,
        site_until: Some(until),
        site: site.to_string(),
        reroute: None,
    }
}

fn suspend(entry: Entry, failure: &(String, String)) -> Suspended {
    let (dsn, reason) = failure;
    Suspended {
        entry,
        dsn: if dsn.is_empty() {
            "4.4.1".into()
        } else {
            dsn.clone()
        },
        reason: format!("delivery temporarily suspended: {reason}"),
        bounce: false,
        site_until: None,
        site: String::new(),
        reroute: None,
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
    /// Entries of dead destinations, for the manager to defer.
    suspended: Vec<Suspended>,
    /// Entries queued behind a site's limit, for the manager to record.
    held: Vec<Held>,
    /// Destinations waiting out a rate delay or their site's rate: a
    /// min-heap of (when, order of arrival, transport, key), so that the
    /// next wake-up and each destination that may go again cost O(log n)
    /// however many destinations wait (first come, first out at the
    /// same instant).
    waiting: BinaryHeap<Reverse<(Instant, u64, usize, String)>>,
    /// Arrivals in `waiting` so far.
    waits: u64,
    /// The sites of `delivery_policy_maps`.
    pub sites: Sites,
    /// `postern bounce DOMAIN`: domain → (until, reason).
    bounced: HashMap<String, (std::time::SystemTime, String)>,
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
            suspended: Vec::new(),
            held: Vec::new(),
            waiting: BinaryHeap::new(),
            waits: 0,
            sites: Sites::none(),
            bounced: HashMap::new(),
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
        let (targets, notes, waiting) = self.choose_sources(message, targets);
        let targets = &targets[..];
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
        let mut count = waiting;
        let now = Instant::now();
        for (ti, key, nexthop, rcpts) in groups {
            let selection = notes
                .get(&(
                    self.transports[ti].name.clone(),
                    nexthop.to_ascii_lowercase(),
                ))
                .cloned();
            let t = &mut self.transports[ti];
            let limits = t.limits;
            if !t.destinations.contains_key(&key) {
                let mut d = Destination::new(nexthop.clone(), &limits);
                // Sites group next hops; a transport that delivers per
                // recipient (local) has none.
                if limits.recipients != 1 {
                    d.site = self.sites.site_for(&t.name, &nexthop);
                    if let Some(s) = &d.site {
                        s.borrow_mut().members.insert((ti, key.clone()));
                    }
                }
                t.destinations.insert(key.clone(), d);
            }
            let d = t.destinations.get_mut(&key).expect("just inserted");
            let site_suspension = d.site.as_ref().and_then(|s| {
                let mut s = s.borrow_mut();
                s.is_suspended()
                    .then(|| (s.name.clone(), s.suspended.clone().expect("suspended")))
            });
            let bounce_reason = bounce_reason(&mut self.bounced, &d.nexthop);
            // Mail that will wait for the site's connection limit or
            // message rate (not for a suspension: deferred below).
            let site_limit = d
                .site
                .as_ref()
                .filter(|_| site_suspension.is_none())
                .and_then(|s| {
                    let s = s.borrow();
                    let why = if s.in_flight >= s.max_connections() {
                        format!(
                            "waiting for site {}: at its connection limit ({})",
                            s.name,
                            s.max_connections()
                        )
                    } else if s.rate_ready_at(now) > now {
                        format!("waiting for site {}: at its message rate", s.name)
                    } else {
                        return None;
                    };
                    Some((s.name.clone(), why))
                });
            let chunk_size = d
                .site
                .as_ref()
                .and_then(|s| s.borrow().policy.max_recipients_per_message)
                .map_or(limits.recipients, |m| m.clamp(1, limits.recipients));
            if d.dead_until.is_some_and(|until| until <= now) {
                // transport_retry_time has passed: try it again.
                d.dead_until = None;
                d.fail_cohorts = 0.0;
                d.window = initial_window(&limits);
            }
            for chunk in rcpts.chunks(chunk_size) {
                let entry = Entry {
                    message: message.to_string(),
                    recipients: chunk.to_vec(),
                    selection: selection.clone(),
                };
                if let Some(reason) = &bounce_reason {
                    self.suspended.push(Suspended {
                        entry,
                        dsn: "5.0.0".into(),
                        reason: reason.clone(),
                        bounce: true,
                        site_until: None,
                        site: String::new(),
                        reroute: None,
                    });
                } else if let Some((name, susp)) = &site_suspension {
                    self.suspended.push(site_suspended(entry, name, susp));
                } else if d.dead_until.is_some() {
                    self.suspended.push(suspend(entry, &d.last_failure));
                } else {
                    if let Some((site, why)) = &site_limit {
                        self.held.push(Held {
                            entry: entry.clone(),
                            site: site.clone(),
                            why: why.clone(),
                        });
                    }
                    d.entries.push(entry);
                }
                count += 1;
            }
            t.make_ready(&key);
        }
        count
    }

    /// Pools and warm-up: each target whose transport is a pool gets the
    /// member chosen for its message and next hop, passing over members
    /// that may not send to the site now (suspended for it, or at
    /// today's warm-up quota); a target whose transport is a source at
    /// its quota, or whose pool has no member with room, waits (handed
    /// back by [`Scheduler::take_suspended`], deferred until the
    /// earliest time a member has room). Returns the targets to queue,
    /// (chosen transport, next hop) → (pool, why), and the number of
    /// entries that wait.
    #[allow(clippy::type_complexity)]
    fn choose_sources(
        &mut self,
        message: &str,
        targets: &[Target],
    ) -> (
        Vec<Target>,
        HashMap<(String, String), std::rc::Rc<(String, String)>>,
        usize,
    ) {
        let mut out = Vec::with_capacity(targets.len());
        let mut notes = HashMap::new();
        // (transport value, next hop) → the member chosen, or the wait.
        let mut chosen: HashMap<(String, String), Result<String, usize>> = HashMap::new();
        let mut waits: Vec<(Vec<usize>, Wait)> = Vec::new();
        for t in targets {
            let pool = self.sites.sources.pool(&t.transport);
            let warming = pool.is_none() && self.sites.sources.warmup(&t.transport).is_some();
            if pool.is_none() && !warming {
                out.push(t.clone());
                continue;
            }
            let nexthop = t.nexthop.to_ascii_lowercase();
            let gk = (t.transport.clone(), nexthop.clone());
            if !chosen.contains_key(&gk) {
                let members: Vec<String> = match &pool {
                    Some(p) => p.names().map(str::to_string).collect(),
                    None => vec![t.transport.clone()],
                };
                let rooms: HashMap<String, Result<(), Wait>> = members
                    .iter()
                    .map(|m| {
                        let (mt, mn) = member_target(m, &t.nexthop);
                        (m.clone(), self.source_room(&mt, &mn))
                    })
                    .collect();
                let pick = match &pool {
                    Some(p) => p.choose(|m| rooms.get(m).is_some_and(|r| r.is_ok())),
                    None => rooms[&t.transport].is_ok().then(|| t.transport.clone()),
                };
                let skipped: Vec<String> = members
                    .iter()
                    .filter_map(|m| Some(format!("{m}: {}", rooms[m].as_ref().err()?.reason)))
                    .collect();
                match pick {
                    Some(m) => {
                        let (mt, mn) = member_target(&m, &t.nexthop);
                        self.count_warm(&mt, &mn);
                        let why = if skipped.is_empty() {
                            "chosen".to_string()
                        } else {
                            format!("overflow: {}", skipped.join("; "))
                        };
                        let pool_name = pool.as_ref().map_or(String::new(), |p| p.spec.clone());
                        if pool.is_some() || !skipped.is_empty() {
                            notes.insert(
                                (mt.clone(), mn.to_ascii_lowercase()),
                                std::rc::Rc::new((pool_name, why)),
                            );
                        }
                        chosen.insert(gk.clone(), Ok(m));
                    }
                    None => {
                        let first = members
                            .iter()
                            .filter_map(|m| rooms[m].as_ref().err())
                            .min_by_key(|w| w.until)
                            .cloned()
                            .unwrap_or_default();
                        let wait = Wait {
                            until: first.until,
                            site: first.site,
                            reason: format!(
                                "delivery temporarily suspended: no source of {} may send to the site now ({})",
                                pool.as_ref().map_or(t.transport.as_str(), |p| p.spec.as_str()),
                                skipped.join("; ")
                            ),
                        };
                        waits.push((Vec::new(), wait));
                        chosen.insert(gk.clone(), Err(waits.len() - 1));
                    }
                }
            }
            match &chosen[&gk] {
                Ok(m) => {
                    let (transport, nexthop) = member_target(m, &t.nexthop);
                    out.push(Target {
                        transport,
                        nexthop,
                        ..t.clone()
                    })
                }
                Err(w) => waits[*w].0.push(t.index),
            }
        }
        let n = waits.len();
        for (rcpts, w) in waits {
            info!("{message}: {}", w.reason);
            self.suspended.push(Suspended {
                entry: Entry {
                    message: message.to_string(),
                    recipients: rcpts,
                    selection: None,
                },
                dsn: "4.7.0".into(),
                reason: w.reason,
                bounce: false,
                site_until: Some(w.until),
                site: w.site,
                reroute: None,
            });
        }
        (out, notes, n)
    }

    /// Whether `source` may send to the site of `nexthop` now: Err says
    /// until when it may not, and why.
    fn source_room(&mut self, source: &str, nexthop: &str) -> Result<(), Wait> {
        let Some(site) = self.sites.site_for(source, nexthop) else {
            return Ok(());
        };
        let mut s = site.borrow_mut();
        if s.is_suspended() {
            let x = s.suspended.clone().expect("suspended");
            let until = x
                .until
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs());
            return Err(Wait {
                until,
                site: s.name.clone(),
                reason: format!("suspended for site {} ({})", s.name, x.reason),
            });
        }
        let sources = &self.sites.sources;
        let Some((day, day_start, quota)) = warm_quota(sources, source, &s) else {
            return Ok(());
        };
        if s.warm.0 != day_start {
            s.warm = (day_start, 0);
        }
        if s.warm.1 >= quota {
            return Err(Wait {
                until: sources.to_real(day_start + 86400),
                site: s.name.clone(),
                reason: format!(
                    "warm-up day {day}: today's quota of {quota} messages for site {} reached",
                    s.name
                ),
            });
        }
        Ok(())
    }

    /// A source's warm-up at a site now (for the status page): its day,
    /// today's quota and what was sent today; None without a schedule.
    pub fn warmup_status(&self, s: &crate::sites::Site) -> Option<postern_common::ipc::Warmup> {
        let (day, day_start, quota) = warm_quota(&self.sites.sources, &s.source, s)?;
        Some(postern_common::ipc::Warmup {
            day: u32::try_from(day).unwrap_or(u32::MAX),
            quota,
            sent_today: if s.warm.0 == day_start { s.warm.1 } else { 0 },
        })
    }

    /// A message goes to the site of `nexthop` from `source`: counted
    /// against its warm-up quota.
    fn count_warm(&mut self, source: &str, nexthop: &str) {
        let Some((_, day_start)) = self.sites.sources.day(source) else {
            return;
        };
        if let Some(site) = self.sites.site_for(source, nexthop) {
            let mut s = site.borrow_mut();
            if s.warm.0 != day_start {
                s.warm = (day_start, 0);
            }
            s.warm.1 += 1;
        }
    }

    /// The members of `site`, and with site-wide caps those of its
    /// other sources too.
    fn sibling_members(
        &self,
        site: &SiteRef,
        mut members: Vec<(usize, String)>,
    ) -> Vec<(usize, String)> {
        if site.borrow().total.is_none() {
            return members;
        }
        let name = site.borrow().name.clone();
        for other in self.sites.sites.values() {
            if Rc::ptr_eq(other, site) {
                continue;
            }
            let o = other.borrow();
            if o.name == name {
                members.extend(o.members.iter().cloned());
            }
        }
        members
    }

    /// Entries of dead destinations, taken out of the queues: the caller
    /// defers their recipients (they still count in what
    /// [`Scheduler::add_message`] returned).
    pub fn take_suspended(&mut self) -> Vec<Suspended> {
        std::mem::take(&mut self.suspended)
    }

    /// Entries queued behind a site's limit since the last call: the
    /// caller writes a Delayed accounting record for each recipient.
    pub fn take_held(&mut self) -> Vec<Held> {
        std::mem::take(&mut self.held)
    }

    /// When a destination waiting out its rate delay can go.
    pub fn next_wakeup(&self) -> Option<Instant> {
        self.waiting.peek().map(|Reverse((t, _, _, _))| *t)
    }

    /// Puts destinations whose rate delay has passed back in their rings.
    fn promote_waiting(&mut self) {
        let now = Instant::now();
        while self
            .waiting
            .peek()
            .is_some_and(|Reverse((t, _, _, _))| *t <= now)
        {
            let Some(Reverse((_, _, ti, key))) = self.waiting.pop() else {
                break;
            };
            let t = &mut self.transports[ti];
            if let Some(d) = t.destinations.get_mut(&key) {
                d.next_at = None;
                if d.entries.is_empty() && d.in_flight == 0 && d.dead_until.is_none() {
                    t.destinations.remove(&key);
                    continue;
                }
            }
            t.make_ready(&key);
        }
    }

    /// The next request to dispatch, if any may go now.
    pub fn pick(&mut self) -> Option<Dispatch> {
        if self.in_flight >= self.max_in_flight {
            return None;
        }
        self.promote_waiting();
        let n = self.transports.len();
        let mut waits = Vec::new();
        let mut found = None;
        for k in 0..n {
            let ti = (self.next + k) % n;
            let picked = self.transports[ti].pick(&mut waits, self.sites.cluster.as_mut());
            for (at, key) in waits.drain(..) {
                self.waits += 1;
                self.waiting.push(Reverse((at, self.waits, ti, key)));
            }
            if let Some(d) = picked {
                self.next = (ti + 1) % n;
                self.in_flight += 1;
                found = Some(d);
                break;
            }
        }
        found
    }

    /// A dispatched request has finished. `failure`: the destination
    /// itself could not be reached, with the status and reason (negative
    /// feedback); `None`: it was reached (positive feedback).
    pub fn done(&mut self, transport: &str, destination: &str, failure: Option<(&str, &str)>) {
        let Some(&ti) = self.index.get(transport) else {
            return;
        };
        let t = &mut self.transports[ti];
        let limits = t.limits;
        let Some(d) = t.destinations.get_mut(destination) else {
            return;
        };
        if d.in_flight == 0 {
            return;
        }
        d.in_flight -= 1;
        t.in_flight -= 1;
        self.in_flight -= 1;
        let now = Instant::now();
        let site = d.site.clone();
        match failure {
            None => {
                d.fail_cohorts = 0.0;
                if d.dead_until.is_some() {
                    d.dead_until = None;
                    d.window = initial_window(&limits);
                } else if d.limit > 0 {
                    d.success += limits.positive.value(d.window);
                    if d.success >= 1.0 - 1e-9 {
                        let step = (d.success + 1e-9).floor();
                        d.success = (d.success - step).max(0.0);
                        d.window = (d.window + step).min(d.limit as f64);
                    }
                }
            }
            Some((dsn, reason)) => {
                d.last_failure = (dsn.to_string(), reason.to_string());
                d.fail_cohorts += 1.0 / d.window.max(1.0);
                if d.dead_until.is_none()
                    && limits.cohort_limit > 0.0
                    && d.fail_cohorts >= limits.cohort_limit
                {
                    info!(
                        "{transport} destination {destination}: dead for {}s after failed connections ({reason})",
                        limits.retry_time.as_secs()
                    );
                    d.dead_until = Some(now + limits.retry_time);
                    let failure = d.last_failure.clone();
                    self.suspended
                        .extend(d.entries.drain().into_iter().map(|e| suspend(e, &failure)));
                } else {
                    d.failure += limits.negative.value(d.window);
                    if d.failure >= 1.0 - 1e-9 {
                        let step = (d.failure + 1e-9).floor();
                        d.failure = (d.failure - step).max(0.0);
                        d.window = (d.window - step).max(1.0);
                    }
                }
            }
        }
        if !limits.rate_delay.is_zero() {
            d.next_at = Some(now + limits.rate_delay);
            self.waits += 1;
            self.waiting.push(Reverse((
                now + limits.rate_delay,
                self.waits,
                ti,
                destination.to_string(),
            )));
        } else if d.entries.is_empty() && d.in_flight == 0 && d.dead_until.is_none() {
            t.destinations.remove(destination);
        } else {
            t.make_ready(destination);
        }
        if let Some(site) = site {
            self.site_done(&site, failure);
        }
    }

    /// `postern bounce DOMAIN`: what waits for the domain is bounced now
    /// (handed back by [`Scheduler::take_suspended`]), and new mail for
    /// it until `until`. Returns how many entries were bounced now.
    pub fn bounce_domain(
        &mut self,
        domain: &str,
        until: std::time::SystemTime,
        reason: &str,
    ) -> usize {
        let domain = domain.trim_end_matches('.').to_ascii_lowercase();
        self.bounced
            .insert(domain.clone(), (until, reason.to_string()));
        let text = format!("delivery canceled by the administrator: {reason}");
        let mut n = 0;
        for t in &mut self.transports {
            for d in t.destinations.values_mut() {
                if nexthop_domain(&d.nexthop) != domain {
                    continue;
                }
                for entry in d.entries.drain() {
                    n += 1;
                    self.suspended.push(Suspended {
                        entry,
                        dsn: "5.0.0".into(),
                        reason: text.clone(),
                        bounce: true,
                        site_until: None,
                        site: String::new(),
                        reroute: None,
                    });
                }
            }
        }
        n
    }

    /// A request of a site has ended: its connection is free, and the
    /// site's other queues may go; `max_connect_failures` failures in a
    /// row suspend the site for `retry_after`.
    fn site_done(&mut self, site: &SiteRef, failure: Option<(&str, &str)>) {
        let members: Vec<(usize, String)> = {
            let mut s = site.borrow_mut();
            s.release();
            if let Some(c) = self.sites.cluster.as_mut() {
                c.release(&crate::sources::site_key(&s.source, &s.name));
            }
            match failure {
                None => s.connect_failures = 0,
                Some((dsn, reason)) => {
                    s.connect_failures += 1;
                    s.last_reply = format!("{dsn} {reason}");
                }
            }
            s.members.iter().cloned().collect()
        };
        // With site-wide caps, a connection freed here may let another
        // source of the site go.
        let members = self.sibling_members(site, members);
        let limit = site.borrow().policy.max_connect_failures;
        let failed = site.borrow().connect_failures;
        if let (Some(limit), Some((_, reason))) = (limit, failure) {
            if limit > 0 && failed >= limit && !site.borrow_mut().is_suspended() {
                let retry = self.sites.retry_after(&site.borrow());
                let source_only = !site.borrow().source.is_empty();
                self.suspend_site(
                    site,
                    retry,
                    &format!("{failed} consecutive connection failures ({reason})"),
                    &format!("max_connect_failures={limit}"),
                    reason,
                    source_only,
                );
                return;
            }
        }
        for (ti, key) in members {
            if let Some(t) = self.transports.get_mut(ti) {
                t.make_ready(&key);
            }
        }
    }

    /// Suspends a site for `duration`: what waits for it is deferred
    /// without a connection attempt (the caller takes it with
    /// [`Scheduler::take_suspended`]), and so is new mail for it until
    /// then. Saved in `data_directory`. Written to the accounting log
    /// as a `SiteModeChange` with `rule` (the reply rule, or the
    /// operator's command) and `reply` (what matched, or "").
    pub fn suspend_site(
        &mut self,
        site: &SiteRef,
        duration: Duration,
        reason: &str,
        rule: &str,
        reply: &str,
        source_only: bool,
    ) {
        let members: Vec<(usize, String)> = {
            let mut s = site.borrow_mut();
            let until = std::time::SystemTime::now() + duration;
            s.suspended = Some(Suspension {
                until,
                reason: reason.to_string(),
                source_only,
            });
            info!(
                "site {}: suspended for {}s: {reason}",
                s.label(),
                duration.as_secs()
            );
            let until_secs = until
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs());
            accounting::site_mode_change(&s.name, "suspended", rule, reply, until_secs);
            s.members.iter().cloned().collect()
        };
        let (name, susp) = {
            let s = site.borrow();
            (s.name.clone(), s.suspended.clone().expect("just set"))
        };
        if let Some(c) = self.sites.cluster.as_mut() {
            let s = site.borrow();
            c.publish_suspend(&crate::sources::site_key(&s.source, &s.name), &susp, rule);
        }
        for (ti, key) in members {
            if let Some(d) = self
                .transports
                .get_mut(ti)
                .and_then(|t| t.destinations.get_mut(&key))
            {
                let nexthop = d.nexthop.clone();
                self.suspended
                    .extend(d.entries.drain().into_iter().map(|e| {
                        let pool = e
                            .selection
                            .as_ref()
                            .map(|x| x.0.clone())
                            .filter(|p| source_only && !p.is_empty());
                        let mut x = site_suspended(e, &name, &susp);
                        x.reroute = pool.map(|p| (p, nexthop.clone()));
                        x
                    }));
            }
        }
        self.sites.save();
    }

    /// Lifts a site's suspension; its queues may go at once. `rule`
    /// says why, for the accounting log.
    pub fn resume_site(&mut self, site: &SiteRef, rule: &str) {
        let members: Vec<(usize, String)> = {
            let mut s = site.borrow_mut();
            s.suspended = None;
            s.connect_failures = 0;
            info!("site {}: resumed", s.label());
            accounting::site_mode_change(&s.name, "resumed", rule, "", 0);
            if let Some(c) = self.sites.cluster.as_mut() {
                c.publish_resume(&crate::sources::site_key(&s.source, &s.name), rule);
            }
            s.members.iter().cloned().collect()
        };
        for (ti, key) in members {
            if let Some(t) = self.transports.get_mut(ti) {
                t.make_ready(&key);
            }
        }
        self.sites.save();
    }

    /// The site of a destination, if it has one.
    pub fn site_of(&self, transport: &str, destination: &str) -> Option<SiteRef> {
        let ti = *self.index.get(transport)?;
        self.transports[ti]
            .destinations
            .get(destination)?
            .site
            .clone()
    }

    /// Entries waiting for each site (for `postern queues`).
    pub fn site_queued(&self, site: &SiteRef) -> usize {
        site.borrow()
            .members
            .iter()
            .filter_map(|(ti, key)| self.transports.get(*ti)?.destinations.get(key))
            .map(|d| d.entries.len)
            .sum()
    }

    /// Entries waiting for a site, by the transport (source) that will
    /// carry them, sorted by transport (for the status daemon); every
    /// transport that fed the site is listed.
    pub fn site_queued_by_transport(&self, site: &SiteRef) -> Vec<(String, u64)> {
        let mut by: std::collections::BTreeMap<String, u64> = Default::default();
        for (ti, key) in site.borrow().members.iter() {
            let Some(t) = self.transports.get(*ti) else {
                continue;
            };
            // A transport that fed the site shows, with nothing queued.
            let n = by.entry(t.name.clone()).or_default();
            if let Some(d) = t.destinations.get(key) {
                *n += d.entries.len as u64;
            }
        }
        by.into_iter().collect()
    }

    /// Forgets every dead destination (Postfix's `F` trigger, "purge all
    /// information about dead transports and destinations", which
    /// `postqueue -f` sends): each is tried again at once, with the
    /// initial window, as if `transport_retry_time` had passed. Returns
    /// how many were dead.
    pub fn revive_dead(&mut self) -> usize {
        let mut revived = 0;
        for t in &mut self.transports {
            let limits = t.limits;
            let mut idle = Vec::new();
            let mut ready = Vec::new();
            for (key, d) in t.destinations.iter_mut() {
                if d.dead_until.take().is_none() {
                    continue;
                }
                revived += 1;
                d.fail_cohorts = 0.0;
                d.success = 0.0;
                d.failure = 0.0;
                d.window = initial_window(&limits);
                if d.entries.is_empty() && d.in_flight == 0 && d.next_at.is_none() {
                    idle.push(key.clone());
                } else {
                    ready.push(key.clone());
                }
            }
            for key in idle {
                t.destinations.remove(&key);
            }
            for key in ready {
                t.make_ready(&key);
            }
        }
        revived
    }

    /// Takes every entry of `message` out of the queues (an administrator
    /// deleted or held it). Returns how many entries were removed.
    pub fn remove_message(&mut self, message: &str) -> usize {
        let mut removed = 0;
        for t in &mut self.transports {
            let mut empty = Vec::new();
            for (key, d) in t.destinations.iter_mut() {
                removed += d.entries.remove_message(message);
                if d.entries.is_empty() && d.in_flight == 0 {
                    empty.push(key.clone());
                }
            }
            for key in empty {
                // A key left in the ring is skipped by pick().
                t.destinations.remove(&key);
            }
        }
        removed
    }

    /// Requests in flight over all transports.
    pub fn in_flight(&self) -> usize {
        self.in_flight
    }

    /// The window of a destination (tests).
    #[cfg(test)]
    pub fn window(&self, transport: &str, destination: &str) -> Option<usize> {
        let t = &self.transports[*self.index.get(transport)?];
        t.destinations.get(destination).map(|d| d.window())
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

/// `source`'s warm-up at site `s` today: (day of the schedule, start of
/// the day, today's quota); None when it has no schedule (or is warm).
/// The site's `warmup_schedule=` wins over the source's
/// `smtp_warmup_schedule`.
fn warm_quota(
    sources: &crate::sources::Sources,
    source: &str,
    s: &crate::sites::Site,
) -> Option<(u64, u64, u64)> {
    let (day, day_start) = sources.day(source)?;
    let schedule = match &s.policy.warmup_schedule {
        Some(v) => v.clone(),
        None => sources
            .warmup(source)
            .map(|w| w.schedule.clone())
            .unwrap_or_default(),
    };
    let quota = postern_common::delivery_policy::warmup_quota(&schedule, day)?;
    Some((day, day_start, quota))
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
                ..Limits::default()
            },
            _ => Limits {
                concurrency: 2,
                recipients: 3,
                ..Limits::default()
            },
        }
    }

    #[test]
    fn per_transport_parameters() {
        let cfg = Config::from_text(
            Path::new("/nonexistent"),
            "smtp_destination_recipient_limit = 7\ndefault_destination_concurrency_limit = 9\n\
             lmtp_delivery_batch_limit = 5\n",
            Path::new("main.cf"),
        )
        .unwrap();
        let l = |t: &str| {
            let l = Limits::from_config(&cfg, t);
            (l.concurrency, l.recipients)
        };
        assert_eq!(l("smtp"), (9, 7));
        let b = |t: &str| Limits::from_config(&cfg, t).batch;
        assert_eq!((b("local"), b("lmtp"), b("smtp")), (10, 5, 1));
        assert_eq!(l("local"), (2, 1));
        assert_eq!(l("relay"), (9, 50));
        assert_eq!(
            Limits::from_config(&cfg, "smtp"),
            Limits {
                concurrency: 9,
                recipients: 7,
                ..Limits::default()
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
        s.done("smtp", "a.test", None);
        let d = s.pick().unwrap();
        assert_eq!(d.entry.recipients, vec![6]);
        assert!(s.pick().is_none());
    }

    #[test]
    fn a_batch_takes_only_what_the_window_leaves_waiting() {
        let mut s = Scheduler::new(100, |_| Limits {
            concurrency: 2,
            initial: 2,
            recipients: 1,
            batch: 4,
            ..Limits::default()
        });
        let alice = [target(0, "local", "h", "alice@h")];
        // Two messages, two free places: one each, no batch.
        for m in ["M1", "M2"] {
            s.add_message(m, &alice);
        }
        let a = s.pick().unwrap();
        let b = s.pick().unwrap();
        assert!(a.more.is_empty() && b.more.is_empty());
        assert!(s.pick().is_none());
        // Seven wait while both places are taken: the next request takes
        // four (the batch limit), the one after the other three.
        for i in 0..7 {
            s.add_message(&format!("W{i}"), &alice);
        }
        s.done("local", "alice@h", None);
        let c = s.pick().unwrap();
        assert_eq!(c.entry.message, "W0");
        let more: Vec<_> = c.more.iter().map(|e| e.message.as_str()).collect();
        assert_eq!(more, ["W1", "W2", "W3"]);
        s.done("local", "alice@h", None);
        let d = s.pick().unwrap();
        assert_eq!(d.more.len(), 2);
        assert_eq!(s.queued(), 0);
        assert_eq!(s.in_flight(), 2, "a batch is one request in flight");
    }

    #[test]
    fn no_batch_while_the_window_may_still_grow() {
        let mut s = Scheduler::new(100, |_| Limits {
            concurrency: 20,
            initial: 2,
            batch: 10,
            ..Limits::default()
        });
        for i in 0..1000 {
            s.add_message(
                &format!("M{i}"),
                &[target(0, "smtp", "far.test", "x@far.test")],
            );
        }
        // A window of 2 of 20: two requests of one message each.
        let picked: Vec<Dispatch> = std::iter::from_fn(|| s.pick()).collect();
        assert_eq!(picked.len(), 2);
        assert!(picked.iter().all(|d| d.more.is_empty()));
        // Successes widen the window to its limit, one message per request
        // all the way; from then on what waits beyond the free places goes
        // in batches.
        loop {
            s.done("smtp", "far.test", None);
            if s.window("smtp", "far.test") == Some(20) {
                break;
            }
            let d = s.pick().expect("entries left");
            assert!(d.more.is_empty());
        }
        let picked: Vec<Dispatch> = std::iter::from_fn(|| s.pick()).collect();
        assert!(picked.iter().any(|d| !d.more.is_empty()), "{picked:?}");
        assert!(picked.iter().all(|d| d.more.len() <= 9));
        assert_eq!(s.in_flight(), 20);
    }

    #[test]
    fn a_batch_takes_one_entry_per_message() {
        let mut s = Scheduler::new(100, |_| Limits {
            concurrency: 1,
            initial: 1,
            recipients: 1,
            batch: 10,
            ..Limits::default()
        });
        // One destination (recipient limit 1 keys it by address): a bulk
        // message with 30 entries for it, then two small messages.
        let bulk: Vec<Target> = (0..30).map(|i| target(i, "local", "h", "list@h")).collect();
        s.add_message("BULK", &bulk);
        let first = s.pick().unwrap();
        assert!(
            first.more.is_empty(),
            "only BULK waits: nothing to batch with"
        );
        s.add_message("S1", &[target(0, "local", "h", "list@h")]);
        s.add_message("S2", &[target(0, "local", "h", "list@h")]);
        s.done("local", "list@h", None);
        let d = s.pick().unwrap();
        let mut ids: Vec<&str> = std::iter::once(&d.entry)
            .chain(&d.more)
            .map(|e| e.message.as_str())
            .collect();
        ids.sort();
        assert_eq!(ids, ["BULK", "S1", "S2"]);
    }

    #[test]
    fn round_robin_does_not_starve() {
        let mut s = Scheduler::new(100, |_| Limits {
            concurrency: 0,
            recipients: 2,
            ..Limits::default()
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
    fn messages_take_turns_within_a_destination() {
        let mut s = Scheduler::new(100, |_| Limits {
            concurrency: 1,
            initial: 1,
            recipients: 2,
            ..Limits::default()
        });
        // A bulk message of 50 entries, then two small ones, all for one
        // destination that takes one request at a time.
        let big: Vec<Target> = (0..100).map(|i| target(i, "smtp", "d.test", "x")).collect();
        assert_eq!(s.add_message("BULK", &big), 50);
        assert_eq!(s.pick().unwrap().entry.message, "BULK");
        s.add_message("SMALL1", &[target(0, "smtp", "d.test", "y")]);
        s.add_message("SMALL2", &[target(0, "smtp", "d.test", "z")]);
        let mut order = Vec::new();
        for _ in 0..6 {
            s.done("smtp", "d.test", None);
            order.push(s.pick().unwrap().entry.message);
        }
        assert_eq!(order, ["BULK", "SMALL1", "SMALL2", "BULK", "BULK", "BULK"]);
        // Deleting a message takes all its entries out of the rotation.
        assert_eq!(s.remove_message("BULK"), 45);
        assert_eq!(s.queued(), 0);
        s.done("smtp", "d.test", None);
        assert!(s.pick().is_none());
    }

    #[test]
    fn overall_limit() {
        let mut s = Scheduler::new(3, |_| Limits {
            concurrency: 0,
            recipients: 2,
            ..Limits::default()
        });
        let t: Vec<Target> = (0..10)
            .map(|i| target(i, "smtp", &format!("d{i}"), "x"))
            .collect();
        s.add_message("M", &t);
        assert!(s.pick().is_some() && s.pick().is_some() && s.pick().is_some());
        assert!(s.pick().is_none());
        s.done("smtp", "d0", None);
        assert!(s.pick().is_some());
        assert!(s.pick().is_none());
    }

    fn feedback_limits(_: &str) -> Limits {
        Limits {
            concurrency: 8,
            recipients: 2,
            ..Limits::default()
        }
    }

    #[test]
    fn window_grows_with_success_and_shrinks_with_failure() {
        let mut s = Scheduler::new(1000, feedback_limits);
        let t: Vec<Target> = (0..400)
            .map(|i| target(i, "smtp", "d.test", &format!("u{i}")))
            .collect();
        s.add_message("M", &t);
        let mut out = Vec::new();
        while let Some(d) = s.pick() {
            out.push(d);
        }
        assert_eq!(out.len(), 5, "the initial window");
        // One window's worth of successes: one more.
        for _ in 0..5 {
            s.done("smtp", "d.test", None);
        }
        assert_eq!(s.window("smtp", "d.test"), Some(6));
        while s.pick().is_some() {}
        for _ in 0..40 {
            s.done("smtp", "d.test", None);
            while s.pick().is_some() {}
        }
        assert_eq!(s.window("smtp", "d.test"), Some(8), "capped at the limit");
        assert_eq!(s.in_flight(), 8);
        // A window's worth of failures narrows it by one; a success in
        // between keeps it from being declared dead.
        for _ in 0..7 {
            s.done("smtp", "d.test", Some(("4.4.1", "refused")));
        }
        s.done("smtp", "d.test", None);
        while s.pick().is_some() {}
        s.done("smtp", "d.test", Some(("4.4.1", "refused")));
        assert_eq!(s.window("smtp", "d.test"), Some(7));
        assert!(s.take_suspended().is_empty());
    }

    #[test]
    fn a_failed_cohort_kills_the_destination_not_others() {
        let mut s = Scheduler::new(1000, feedback_limits);
        let t: Vec<Target> = (0..20)
            .map(|i| target(i, "smtp", "dead.test", "x"))
            .chain((20..25).map(|i| target(i, "smtp", "live.test", "y")))
            .collect();
        s.add_message("M", &t);
        let mut dead_in_flight = 0;
        while let Some(d) = s.pick() {
            if d.destination == "dead.test" {
                dead_in_flight += 1;
            }
        }
        assert_eq!(dead_in_flight, 5);
        for _ in 0..5 {
            s.done("smtp", "dead.test", Some(("4.4.1", "connect: refused")));
        }
        let sus = s.take_suspended();
        assert_eq!(sus.len(), 5, "the rest is deferred without a try");
        assert_eq!(
            sus[0].reason,
            "delivery temporarily suspended: connect: refused"
        );
        assert!(s.pick().is_none(), "nothing more for the dead one");
        // New mail for the dead destination is suspended at once.
        s.add_message("N", &[target(0, "smtp", "dead.test", "x")]);
        assert_eq!(s.take_suspended().len(), 1);
        // The live one goes on.
        for _ in 0..5 {
            s.done("smtp", "live.test", None);
        }
        s.add_message("O", &[target(0, "smtp", "live.test", "y")]);
        assert_eq!(s.pick().unwrap().destination, "live.test");
    }

    #[test]
    fn a_flush_revives_a_dead_destination() {
        let mut s = Scheduler::new(1000, feedback_limits);
        // Five requests (the initial window), all failed: one cohort.
        let t: Vec<Target> = (0..10)
            .map(|i| target(i, "smtp", "dead.test", "x"))
            .collect();
        s.add_message("M", &t);
        let mut picked = 0;
        while s.pick().is_some() {
            picked += 1;
        }
        assert_eq!(picked, 5);
        for _ in 0..5 {
            s.done("smtp", "dead.test", Some(("4.4.1", "connect: refused")));
        }
        s.add_message("N", &[target(0, "smtp", "dead.test", "x")]);
        assert_eq!(s.take_suspended().len(), 1, "dead: suspended");
        assert_eq!(s.revive_dead(), 1);
        assert_eq!(s.revive_dead(), 0, "nothing dead any more");
        // Mail for it goes at once, with the initial window.
        s.add_message("O", &[target(0, "smtp", "dead.test", "x")]);
        assert!(s.take_suspended().is_empty());
        let d = s.pick().expect("dispatched after the flush");
        assert_eq!(d.destination, "dead.test");
        assert_eq!(d.entry.message, "O");
    }

    #[test]
    fn a_site_caps_connections_across_its_destinations_and_paces_its_rate() {
        use postern_common::delivery_policy::Policy;
        let mut s = Scheduler::new(1000, |_| Limits {
            concurrency: 20,
            initial: 20,
            recipients: 1000,
            ..Limits::default()
        });
        let policy = Policy::parse("max_connections=2 max_message_rate=10/s").unwrap();
        s.sites.test_route("a.test", "shared", policy.clone());
        s.sites.test_route("b.test", "shared", policy);
        for i in 0..5 {
            s.add_message(&format!("A{i}"), &[target(0, "smtp", "a.test", "x@a.test")]);
            s.add_message(&format!("B{i}"), &[target(0, "smtp", "b.test", "x@b.test")]);
        }
        // The first goes; the second is held by the rate (10/s: 100 ms).
        let first = s.pick().expect("one may go");
        assert_eq!(first.site.as_ref().unwrap().name, "shared");
        assert!(s.pick().is_none(), "the rate holds the next one back");
        let wake = s.next_wakeup().expect("a wake-up for the rate");
        let wait = wake.saturating_duration_since(Instant::now());
        assert!(wait <= Duration::from_millis(100), "{wait:?}");
        std::thread::sleep(wait + Duration::from_millis(5));
        let second = s.pick().expect("after 100 ms");
        assert_ne!(
            first.destination, second.destination,
            "both domains, one site"
        );
        // Two connections in flight: the cap, whatever the rate allows.
        std::thread::sleep(Duration::from_millis(150));
        assert!(
            s.pick().is_none(),
            "max_connections=2 across a.test and b.test"
        );
        s.done(&first.transport, &first.destination, None);
        std::thread::sleep(Duration::from_millis(5));
        assert!(s.pick().is_some(), "a connection is free again");
    }

    #[test]
    fn connect_failures_suspend_a_site_and_its_mail_waits() {
        use postern_common::delivery_policy::Policy;
        let mut s = Scheduler::new(1000, feedback_limits);
        let policy = Policy::parse("max_connect_failures=2 retry_after=10m").unwrap();
        s.sites.test_route("a.test", "down", policy);
        let t: Vec<Target> = (0..6).map(|i| target(i, "smtp", "a.test", "x")).collect();
        s.add_message("M", &t);
        let a = s.pick().unwrap();
        let b = s.pick().unwrap();
        s.done(
            &a.transport,
            &a.destination,
            Some(("4.4.1", "connect: refused")),
        );
        s.done(
            &b.transport,
            &b.destination,
            Some(("4.4.1", "connect: refused")),
        );
        let site = s.sites.find("down").unwrap();
        assert!(site.borrow_mut().is_suspended());
        assert!(!s.take_suspended().is_empty(), "what waited is deferred");
        s.add_message("N", &[target(0, "smtp", "a.test", "x")]);
        let sus = s.take_suspended();
        assert_eq!(sus.len(), 1);
        assert!(
            sus[0].reason.contains("site down suspended"),
            "{}",
            sus[0].reason
        );
        s.resume_site(&site, "test");
        s.add_message("O", &[target(0, "smtp", "a.test", "x")]);
        assert!(s.take_suspended().is_empty());
    }

    #[test]
    fn a_pool_member_is_chosen_per_message_and_may_carry_a_next_hop() {
        let mut s = Scheduler::new(100, limits);
        for i in 0..8 {
            let id = format!("m{i}");
            let n = s.add_message(
                &id,
                &[target(
                    0,
                    "weighted:{a=3, b:[relay]:25=1}",
                    "x.test",
                    "u@x.test",
                )],
            );
            assert_eq!(n, 1);
        }
        let mut by: HashMap<(String, String), usize> = HashMap::new();
        while let Some(d) = s.pick() {
            let sel = d.entry.selection.clone().expect("from a pool");
            assert_eq!(sel.0, "weighted:{a=3, b:[relay]:25=1}");
            assert_eq!(sel.1, "chosen");
            *by.entry((d.transport.clone(), d.nexthop.clone()))
                .or_default() += 1;
            s.done(&d.transport, &d.destination, None);
        }
        assert_eq!(by[&("a".to_string(), "x.test".to_string())], 6, "{by:?}");
        assert_eq!(
            by[&("b".to_string(), "[relay]:25".to_string())],
            2,
            "{by:?}"
        );
    }
}
