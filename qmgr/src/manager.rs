//! The queue manager proper: the state of the active queue, owned by one
//! thread, and the loop that moves it along.
//!
//! The main thread waits on one channel of [`Event`]s, fed by the
//! wake-up thread (`public/qmgr`, and the `queue_run_delay` timer), by the
//! delivery threads ([`deliver`]) and by the notice threads ([`notices`]).
//! Between events it takes messages in from the scans ([`scan`]),
//! resolves and queues their recipients ([`crate::resolve`],
//! [`crate::schedule`]), dispatches what the scheduler allows, and
//! finishes each message whose round is over: it bounces expired
//! recipients, sends the notices the round calls for (non-delivery,
//! delay, success: [`notices`]), and removes the file or puts it in
//! `deferred/` with its retry time ([`retry`]).
//!
//! Everything on disk changes by a rename, an append to a message log, or
//! a done mark: a qmgr killed at any instant loses nothing, and the next
//! one takes `active/` back at start-up.

use crate::bounce::{self, NotQueued};
use crate::deliver::{self, Completion, Part};
use crate::event::Event;
use crate::message::{AdminAction, Message, RcptState};
use crate::notices::{self, remove_log};
use crate::record::{self, Item};
use crate::resolve::{Resolution, Resolver};
use crate::retire::Retirer;
use crate::retry;
use crate::scan::{self, DeferredScan, Scan, Taken};
use crate::schedule::{Limits, Scheduler, Target};
use postern_common::accounting;
use postern_common::fatal;
use postern_common::ipc::{
    AdminReply, AdminRequest, AdminStatus, DeliveryRecipient, Outcome, Wakeup,
};
use postern_common::pool::Pool;
use postern_common::qfile::{self, QueuedRecipient, ReadError};
use postern_common::queue::{self, MessageLog, Queue, QueueTree};
use postern_common::time::now_secs;
use postern_common::{debug, info, warning};
use postern_conf::Config;
use std::collections::HashMap;
use std::fs::{File, OpenOptions, TryLockError};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::time::{Duration, Instant};

/// How long a draining qmgr waits for the deliveries in flight before it
/// exits anyway. Waiting lets the message of each come to its end here
/// (sent, deferred or bounced) instead of being left in `active/` while
/// its agent still holds it, which the next qmgr could only defer; not
/// waiting longer keeps a reload from holding up the queue behind one
/// slow destination (the new qmgr starts once this one has exited).
pub const DRAIN_GRACE: Duration = Duration::from_secs(10);

/// How recent a flush request must be for a draining qmgr to pass it on.
const FLUSH_HANDOVER: Duration = Duration::from_secs(60);

/// How often the flush logs' upkeep may run (on the `queue_run_delay`
/// timer): Postfix's master.cf wakes its flush service every 1000 s.
const FLUSH_UPKEEP: Duration = Duration::from_secs(1000);

/// Messages taken in per round of work, before events are looked at again.
const TAKE_BATCH: usize = 100;
/// Queue files looked at per round of work.
const LOOK_BATCH: usize = 2000;

pub struct Manager {
    tree: QueueTree,
    notice_settings: bounce::Settings,
    timeout: Duration,
    active_limit: usize,
    /// `qmgr_message_recipient_limit`: no more messages are taken in
    /// while the active ones hold this many recipients in memory.
    recipient_limit: usize,
    /// Recipients of the active messages, in memory.
    recipients_in_memory: usize,
    resolver: Resolver,
    /// master.cf's `error`/`discard` services, delivered by qmgr itself.
    behaviours: crate::transports::Behaviours,
    sched: Scheduler,
    retry: retry::Policy,
    messages: HashMap<String, Message>,
    incoming: Scan,
    /// `deferred/`, indexed by retry time.
    deferred: DeferredScan,
    /// Which scan goes first next: they alternate, as in Postfix.
    incoming_turn: bool,
    tx: Sender<Event>,
    rx: Receiver<Event>,
    /// Removes finished files on its own thread (see [`crate::retire`]).
    retirer: Retirer,
    /// The threads that carry delivery requests to the agents.
    workers: Pool,
    /// Draining since master's signal: exit once nothing is in flight,
    /// or at this instant.
    drain_deadline: Option<Instant>,
    /// When the last flush request (`postqueue -f`) came.
    last_flush: Option<Instant>,
    /// Counters for the status daemon.
    stats: crate::stats::Stats,
    /// `fast_flush_refresh_time`, `fast_flush_purge_time`.
    flush_times: (Duration, Duration),
    /// When the flush logs' upkeep last started.
    flush_upkeep_at: Option<Instant>,
}

impl Manager {
    pub fn new(cfg: &Config) -> Manager {
        let (tx, rx) = channel();
        let limits_cfg = cfg.clone();
        let max_in_flight = cfg.get_u64("default_process_limit").unwrap_or(100);
        let max_in_flight = if max_in_flight == 0 {
            100
        } else {
            max_in_flight
        };
        let resolver = Resolver::new(cfg);
        let behaviours = crate::transports::Behaviours::from_config(cfg);
        let notice_settings = bounce::Settings::from_config(cfg);
        // delivery_policy_maps may be readable by root only: opened here.
        let sites = crate::sites::Sites::from_config(cfg);
        // All that qmgr reads from outside the queue is read (tables
        // perhaps readable by root only): drop to mail_owner, chrooted
        // when master.cf says so, before its first thread starts.
        postern_common::service::drop_privileges(cfg);
        let queue = postern_common::service::queue_directory(cfg);
        Manager {
            tree: QueueTree::configured(&queue, cfg),
            notice_settings,
            timeout: Duration::from_secs(cfg.get_time("ipc_timeout").unwrap_or(3600).max(1)),
            recipient_limit: cfg
                .get_u64("qmgr_message_recipient_limit")
                .unwrap_or(20000)
                .max(1) as usize,
            recipients_in_memory: 0,
            active_limit: cfg
                .get_u64("qmgr_message_active_limit")
                .unwrap_or(20000)
                .max(1) as usize,
            resolver,
            behaviours,
            sched: {
                let mut s = Scheduler::new(max_in_flight as usize, move |t| {
                    Limits::from_config(&limits_cfg, t)
                });
                s.sites = sites;
                s
            },
            retry: retry::Policy::from_config(cfg),
            messages: HashMap::new(),
            incoming: Scan::new(Queue::Incoming),
            deferred: DeferredScan::new(Duration::from_secs(
                cfg.get_time("qmgr_deferred_rescan_time")
                    .unwrap_or(3600)
                    .max(1),
            )),
            incoming_turn: false,
            retirer: Retirer::new(QueueTree::configured(&queue, cfg)),
            // As many as deliveries may be in flight; started on demand.
            workers: Pool::new("deliver", max_in_flight as usize),
            tx,
            rx,
            drain_deadline: None,
            last_flush: None,
            stats: crate::stats::Stats::new(),
            flush_times: (
                Duration::from_secs(cfg.get_time("fast_flush_refresh_time").unwrap_or(43200)),
                Duration::from_secs(cfg.get_time("fast_flush_purge_time").unwrap_or(604800)),
            ),
            flush_upkeep_at: None,
        }
    }

    /// Where wake-ups and results are to be sent.
    pub fn sender(&self) -> Sender<Event> {
        self.tx.clone()
    }

    /// Start-up: takes back what a previous qmgr left in `active/` and
    /// asks for both scans.
    pub fn start(&mut self) {
        scan::recover(&self.tree);
        self.incoming.request(false);
        self.deferred.request(false);
    }

    /// Runs until drained.
    pub fn run(mut self) -> ! {
        loop {
            if let Some(deadline) = self.drain_deadline {
                if self.drained() {
                    self.exit_drained();
                }
                if Instant::now() >= deadline {
                    info!(
                        "reload: exiting with {} deliveries in flight",
                        self.sched.in_flight()
                    );
                    self.exit_drained();
                }
            }
            let more = self.work();
            let first = if more {
                self.rx.try_recv().ok()
            } else if let Some(deadline) = self.drain_deadline {
                self.rx
                    .recv_timeout(deadline.saturating_duration_since(Instant::now()))
                    .ok()
            } else if let Some(at) = self.next_wakeup() {
                // A destination waits out its rate delay, or a deferred
                // file's retry time is ahead.
                let wait = at.saturating_duration_since(std::time::Instant::now());
                self.rx.recv_timeout(wait).ok()
            } else {
                self.rx.recv().ok()
            };
            if let Some(ev) = first {
                self.handle(ev);
                while let Ok(ev) = self.rx.try_recv() {
                    self.handle(ev);
                }
            }
        }
    }

    /// When the main loop must wake up without an event: a rate delay
    /// ends, or the next deferred file is due (when there is room to
    /// take it in: a full active queue waits for a message to finish).
    fn next_wakeup(&self) -> Option<Instant> {
        let deferred = self.deferred.next_due().filter(|_| self.room());
        match (self.sched.next_wakeup(), deferred) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Waits up to `timeout` for events and handles them. Returns whether
    /// one came.
    #[cfg(test)]
    pub fn poll(&mut self, timeout: Duration) -> bool {
        match self.rx.recv_timeout(timeout) {
            Ok(ev) => {
                self.handle(ev);
                while let Ok(ev) = self.rx.try_recv() {
                    self.handle(ev);
                }
                true
            }
            Err(_) => false,
        }
    }

    /// Whether nothing is going on: no message active, no scan pending.
    #[cfg(test)]
    pub fn is_idle(&self) -> bool {
        self.messages.is_empty() && !self.incoming.busy() && !self.deferred.busy()
    }

    pub fn handle(&mut self, ev: Event) {
        match ev {
            Event::Wakeup(bytes) => self.wakeup(&bytes),
            Event::Delivered(c) => self.delivered(c),
            Event::Notice { id, result } => self.notice_done(&id, result),
            Event::Drain => self.drain(),
            Event::Admin { req, reply } => {
                let r = self.admin(req);
                let _ = reply.send(r);
            }
            Event::Cluster(ev) => self.cluster_event(ev),
        }
    }

    /// Another node suspended or resumed a site: so does this one (the
    /// cluster is taken aside meanwhile, so as not to publish it again).
    fn cluster_event(&mut self, ev: crate::cluster::ClusterEvent) {
        use crate::cluster::ClusterEvent;
        let cluster = self.sched.sites.cluster.take();
        match ev {
            ClusterEvent::Suspend {
                site,
                until,
                node,
                rule,
                reason,
            } => {
                let until_t = std::time::UNIX_EPOCH + Duration::from_secs(until);
                let left = until_t
                    .duration_since(std::time::SystemTime::now())
                    .unwrap_or_default();
                if left.is_zero() {
                    // Over already.
                } else if let Some(s) = self.sched.sites.sites.get(&site).cloned() {
                    let already = s
                        .borrow()
                        .suspended
                        .as_ref()
                        .is_some_and(|x| x.until >= until_t);
                    if !already {
                        info!("site {site}: suspension from cluster node {node}");
                        // A source's own suspension (the key names it)
                        // is the source's alone, as on the node that set it.
                        let source_only = !s.borrow().source.is_empty();
                        self.sched.suspend_site(
                            &s,
                            left,
                            &reason,
                            &format!("{rule} (node {node})"),
                            "",
                            source_only,
                        );
                        self.defer_suspended();
                    }
                } else {
                    info!("site {site}: suspension from cluster node {node} (no mail for it here yet)");
                    self.sched.sites.pend_suspension(
                        &site,
                        Some(crate::sites::Suspension {
                            until: until_t,
                            reason,
                            source_only: site.contains("->"),
                        }),
                    );
                    self.sched.sites.save();
                }
            }
            ClusterEvent::Resume { site, node, rule } => {
                if let Some(s) = self.sched.sites.sites.get(&site).cloned() {
                    if s.borrow().suspended.is_some() {
                        info!("site {site}: resumed by cluster node {node}");
                        self.resume(&s, &format!("{rule} (node {node})"));
                    }
                } else {
                    self.sched.sites.pend_suspension(&site, None);
                    self.sched.sites.save();
                }
            }
        }
        self.sched.sites.cluster = cluster;
    }

    /// Lifts a site's suspension; its deferred mail waits for the
    /// suspension's end: due now (a scan of deferred/, as ETRN's).
    fn resume(&mut self, s: &crate::sites::SiteRef, rule: &str) {
        let name = s.borrow().label();
        self.sched.resume_site(s, rule);
        // The site's mail is found through its domains' flush logs
        // (postern_common::flush: only the listed envelopes are read,
        // the due ones moved to incoming/), on a thread of its own so
        // that a big site never holds qmgr up; then an incoming scan.
        let domains: Vec<String> = s.borrow().domains.iter().cloned().collect();
        let tree = self.tree.clone();
        let tx = self.tx.clone();
        let who = name.clone();
        let spawned = std::thread::Builder::new()
            .name("resume".into())
            .spawn(move || {
                let (mut due, mut listed) = (0, 0);
                for d in &domains {
                    match postern_common::flush::flush_site(&tree, d) {
                        Ok(f) => {
                            due += f.due;
                            listed += f.listed;
                        }
                        Err(e) => warning!("resume {who}: flush log of {d}: {e}"),
                    }
                }
                info!(
                    "resume {who}: {due} deferred message(s) due now, from the flush logs of {} domain(s) ({listed} listed)",
                    domains.len()
                );
                let _ = tx.send(Event::Wakeup(vec![Wakeup::Incoming as u8]));
            });
        if let Err(e) = spawned {
            warning!("resume {name}: cannot start a thread: {e}");
            self.deferred.request(false);
        }
    }

    /// The upkeep of the flush logs ([`postern_common::flush::refresh`]),
    /// on a thread of its own, at most every [`FLUSH_UPKEEP`] (Postfix's
    /// master wakes its flush service as often).
    fn flush_upkeep(&mut self) {
        if self
            .flush_upkeep_at
            .is_some_and(|t| t.elapsed() < FLUSH_UPKEEP)
        {
            return;
        }
        self.flush_upkeep_at = Some(Instant::now());
        let tree = self.tree.clone();
        let (refresh, purge) = self.flush_times;
        let _ = std::thread::Builder::new()
            .name("flush-upkeep".into())
            .spawn(move || match postern_common::flush::refresh(&tree, refresh, purge) {
                Ok(r) => {
                    if let Some((log, e)) = &r.failed {
                        warning!("flush log of {log}: {e}");
                    }
                    if r.compacted + r.purged > 0 {
                        info!(
                            "flush logs: {} compacted ({} queue ID(s) dropped), {} empty one(s) removed",
                            r.compacted, r.dropped, r.purged
                        );
                    }
                }
                Err(e) => warning!("flush logs: {e}"),
            });
    }

    /// master's drain signal: no more messages are taken in and no more
    /// requests dispatched; [`Manager::run`] exits once those in flight
    /// and the notices on their way are back, or at [`DRAIN_GRACE`].
    /// What stays in `active/` is taken back by the next qmgr.
    fn drain(&mut self) {
        if self.drain_deadline.is_none() {
            self.drain_deadline = Some(Instant::now() + DRAIN_GRACE);
            if !self.drained() {
                info!(
                    "reload: finishing {} deliveries in flight",
                    self.sched.in_flight()
                );
            }
        }
    }

    /// The end of a drain. A flush that came shortly before (`postern
    /// reload; postqueue -f`) may have reached this qmgr, which scheduled
    /// it with the old configuration or not at all: it is passed on to
    /// the next qmgr, whose wake-up socket holds it until it starts.
    fn exit_drained(&mut self) -> ! {
        self.retirer.finish();
        // Site state for the next qmgr (a reload keeps it).
        self.sched.sites.save();
        if self
            .last_flush
            .is_some_and(|t| t.elapsed() < FLUSH_HANDOVER)
        {
            let path = self.tree.socket(false, "qmgr");
            match postern_common::ipc::wake(&path, &[Wakeup::Flush]) {
                Ok(()) => info!("reload: flush request passed on to the next queue manager"),
                Err(e) => warning!("reload: pass the flush request on: {e}"),
            }
        }
        std::process::exit(0)
    }

    /// Whether a draining qmgr may exit: nothing it started is still out.
    fn drained(&self) -> bool {
        self.sched.in_flight() == 0 && !self.messages.values().any(|m| m.finishing)
    }

    /// postsuper's request for active messages: each is taken out of the
    /// scheduler's queues at once, and deleted, held or released when no
    /// request of it is in flight (now, or when the last one returns).
    pub fn admin(&mut self, req: AdminRequest) -> AdminReply {
        if req == AdminRequest::Status {
            let active = self.messages.len() as u64;
            let status = crate::stats::status(&self.sched, &mut self.stats, active);
            return AdminReply {
                results: Vec::new(),
                text: String::new(),
                ok: true,
                status: Some(Box::new(status)),
            };
        }
        let unhold = matches!(req, AdminRequest::Unhold(_));
        let (action, ids) = match req {
            AdminRequest::Delete(v) => (AdminAction::Delete, v),
            AdminRequest::Hold(v) => (AdminAction::Hold, v),
            AdminRequest::Release(v) | AdminRequest::Unhold(v) => (AdminAction::Release, v),
            other => {
                let (ok, text) = self.site_admin(other);
                // What was bounced or deferred now is recorded now.
                self.defer_suspended();
                return AdminReply {
                    results: Vec::new(),
                    text,
                    ok,
                    status: None,
                };
            }
        };
        let mut results = Vec::with_capacity(ids.len());
        for id in ids {
            let Some(msg) = self.messages.get_mut(&id) else {
                results.push(AdminStatus::NotActive);
                continue;
            };
            if unhold && msg.admin != Some(AdminAction::Hold) {
                results.push(AdminStatus::Unchanged);
                continue;
            }
            // The last request wins, except that a deletion stays.
            if msg.admin != Some(AdminAction::Delete) {
                msg.admin = Some(action);
            }
            let removed = self.sched.remove_message(&id);
            msg.queued = msg.queued.saturating_sub(removed);
            if msg.in_flight == 0 && !msg.finishing {
                self.apply_admin(&id);
                results.push(AdminStatus::Done);
            } else {
                results.push(AdminStatus::Pending);
            }
        }
        AdminReply {
            results,
            text: String::new(),
            ok: true,
            status: None,
        }
    }

    /// `postern queues`, `suspend`, `resume`, `bounce`: (ok, text).
    fn site_admin(&mut self, req: AdminRequest) -> (bool, String) {
        match req {
            AdminRequest::Sites { json } => (true, crate::sites::report(&self.sched, json)),
            AdminRequest::Suspend {
                site,
                seconds,
                reason,
                source,
            } => {
                let found = if source.is_empty() {
                    // A domain qmgr has not seen yet: routed and made a site.
                    let v = self.sched.sites.find_all(&site, None);
                    if v.is_empty() {
                        self.site_named(&site).into_iter().collect()
                    } else {
                        v
                    }
                } else {
                    self.sched
                        .sites
                        .source_site(&source, &site)
                        .into_iter()
                        .collect()
                };
                if found.is_empty() {
                    return (false, no_site_of(&site, &source));
                }
                let mut names = Vec::new();
                for s in &found {
                    let label = s.borrow().label();
                    info!("admin: suspend site {label} for {seconds}s: {reason}");
                    self.sched.suspend_site(
                        s,
                        Duration::from_secs(seconds),
                        &reason,
                        &admin_rule("suspend", &reason),
                        "",
                        !source.is_empty(),
                    );
                    names.push(label);
                }
                (
                    true,
                    format!("site {} suspended for {seconds}s", names.join(", ")),
                )
            }
            AdminRequest::Resume { site, source } => {
                let mut found = self
                    .sched
                    .sites
                    .find_all(&site, (!source.is_empty()).then_some(source.as_str()));
                if found.is_empty() && source.is_empty() {
                    found = self.site_named(&site).into_iter().collect();
                }
                if found.is_empty() {
                    return (false, no_site_of(&site, &source));
                }
                let mut names = Vec::new();
                for s in &found {
                    let label = s.borrow().label();
                    info!("admin: resume site {label}");
                    self.resume(s, "postern resume");
                    names.push(label);
                }
                (true, format!("site {} resumed", names.join(", ")))
            }
            AdminRequest::Bounce {
                domain,
                seconds,
                reason,
            } => {
                let until = std::time::SystemTime::now() + Duration::from_secs(seconds);
                let n = self.sched.bounce_domain(&domain, until, &reason);
                info!("admin: bounce mail for {domain} for {seconds}s ({n} queued now): {reason}");
                // The domain's mode; each message bounced gets its
                // AdminBounce record (defer_suspended).
                accounting::site_mode_change(
                    &domain.trim_end_matches('.').to_ascii_lowercase(),
                    "bounce",
                    &admin_rule("bounce", &reason),
                    "",
                    unix_secs(until),
                );
                (
                    true,
                    format!("{n} queued deliveries for {domain} bounced; new mail for {seconds}s"),
                )
            }
            _ => (false, "unexpected request".into()),
        }
    }

    /// The site a name or domain of `postern suspend/resume` denotes: one
    /// qmgr knows, or, for a domain it has not seen mail for yet, the
    /// site its mail would go to (routed as a recipient there, its MX
    /// hosts looked up, `delivery_policy_maps` asked), made now, so that
    /// a suspension holds the first message already.
    fn site_named(&mut self, what: &str) -> Option<crate::sites::SiteRef> {
        if let Some(s) = self.sched.sites.find(what) {
            return Some(s);
        }
        let domain = what.trim().trim_end_matches('.').to_ascii_lowercase();
        if domain.is_empty() || domain.contains(['@', ',', ' ', ':', '/']) {
            return None;
        }
        match self
            .resolver
            .resolve_from(None, &format!("postmaster@{domain}"))
        {
            Resolution::Deliver { transport, nexthop } => {
                self.sched.sites.site_for(&transport, &nexthop)
            }
            _ => None,
        }
    }

    /// Carries out the administrator's request for a message that has no
    /// request in flight.
    fn apply_admin(&mut self, id: &str) {
        let Some(msg) = self.forget(id) else {
            return;
        };
        match msg.admin {
            Some(AdminAction::Delete) => {
                if accounting::enabled() {
                    accounting::message_event(
                        accounting::Kind::AdminBounce,
                        id,
                        &msg.env,
                        Some(&accounting::admin_delete_reply()),
                        "",
                    );
                }
                match std::fs::remove_file(self.tree.path(Queue::Active, id)) {
                    Ok(()) => info!("{id}: removed"),
                    Err(e) => warning!("{id}: remove active queue file: {e}"),
                }
                let _ = queue::sync_dir(&self.tree.parent(Queue::Active, id));
                remove_log(&self.tree, MessageLog::Defer, id);
                remove_log(&self.tree, MessageLog::Bounce, id);
                remove_log(&self.tree, MessageLog::Success, id);
            }
            Some(AdminAction::Hold) => match self.tree.move_to(id, Queue::Active, Queue::Hold) {
                Ok(()) => info!("{id}: placed on hold"),
                Err(e) => warning!("{id}: move from active to hold: {e}"),
            },
            Some(AdminAction::Release) => {
                let now = now_secs();
                let _ = queue::set_mtime(&self.tree.path(Queue::Active, id), now);
                match self.tree.move_to(id, Queue::Active, Queue::Deferred) {
                    Ok(()) => self.deferred.deferred(id, now),
                    Err(e) => warning!("{id}: move from active to deferred: {e}"),
                }
            }
            None => {
                self.remember(id, msg);
            }
        }
    }

    /// Adds a message to the active set.
    fn remember(&mut self, id: &str, msg: Message) {
        self.recipients_in_memory += msg.env.recipients.len();
        self.messages.insert(id.to_string(), msg);
    }

    /// Takes a message out of the active set.
    fn forget(&mut self, id: &str) -> Option<Message> {
        let msg = self.messages.remove(id)?;
        self.recipients_in_memory = self
            .recipients_in_memory
            .saturating_sub(msg.env.recipients.len());
        Some(msg)
    }

    /// Whether another message may be taken in: fewer than
    /// `qmgr_message_active_limit` messages, and fewer than
    /// `qmgr_message_recipient_limit` recipients in memory (one message
    /// is always allowed, however many recipients it has).
    fn room(&self) -> bool {
        self.messages.len() < self.active_limit
            && (self.messages.is_empty() || self.recipients_in_memory < self.recipient_limit)
    }

    fn wakeup(&mut self, bytes: &[u8]) {
        if bytes.is_empty() {
            // queue_run_delay: what is due comes from the index; the
            // directory is listed every qmgr_deferred_rescan_time.
            self.deferred.tick();
            self.flush_upkeep();
            return;
        }
        for &b in bytes {
            match Wakeup::from_byte(b) {
                Some(Wakeup::Wake) | Some(Wakeup::Incoming) => self.incoming.request(false),
                Some(Wakeup::Deferred) => self.deferred.request(false),
                Some(Wakeup::Flush) => {
                    self.last_flush = Some(Instant::now());
                    // Postfix's F: dead destinations are tried again now,
                    // not after transport_retry_time.
                    let revived = self.sched.revive_dead();
                    if revived > 0 {
                        info!("flush: {revived} dead destination(s) revived");
                    }
                    self.deferred.request(true);
                    self.incoming.request(false);
                }
                None => debug!("ignoring wake-up request {:?}", b as char),
            }
        }
    }

    /// Takes messages in and dispatches what may go now. Returns whether
    /// there is more to take in right away.
    pub fn work(&mut self) -> bool {
        if self.drain_deadline.is_some() {
            return false;
        }
        self.resolver.refresh();
        if let Some(table) = postern_common::table_watch::stale() {
            // A table qmgr cannot read again (root's only, or out of
            // sight in a chroot): a fresh qmgr reads it, before this one
            // routes anything with the old one.
            postern_common::service::restart_for_table(&table);
            self.drain();
            return false;
        }
        let (mut taken, mut looked) = (0, 0);
        while taken < TAKE_BATCH && looked < LOOK_BATCH && self.room() {
            let Some((q, id, ignore_time)) = self.next_file() else {
                break;
            };
            looked += 1;
            if self.messages.contains_key(&id) {
                continue;
            }
            let file = match q {
                Queue::Incoming => scan::take_incoming(&self.tree, &id),
                _ => match scan::take_deferred(&self.tree, &id, ignore_time) {
                    Taken::File(f) => Some(f),
                    Taken::Later(at) => {
                        // Its retry time was moved on: indexed again.
                        self.deferred.deferred(&id, at);
                        None
                    }
                    Taken::No => None,
                },
            };
            if let Some(file) = file {
                taken += 1;
                self.activate(&id, file);
                self.dispatch();
            }
        }
        self.dispatch();
        self.room() && (self.incoming.busy() || self.deferred.busy())
    }

    fn next_file(&mut self) -> Option<(Queue, String, bool)> {
        for _ in 0..2 {
            self.incoming_turn = !self.incoming_turn;
            let next = if self.incoming_turn {
                self.incoming.next(&self.tree).map(|x| (Queue::Incoming, x))
            } else {
                self.deferred.next(&self.tree).map(|x| (Queue::Deferred, x))
            };
            if let Some((q, (id, ignore))) = next {
                return Some((q, id, ignore));
            }
        }
        None
    }

    /// A message just moved into `active/`: read it, resolve its pending
    /// recipients and queue them.
    fn activate(&mut self, id: &str, file: File) {
        // An agent that an earlier qmgr started may still be delivering
        // this message (agents hold a shared lock while they work): leave
        // it alone for now rather than deliver it twice.
        match file.try_lock() {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => {
                info!("{id}: still being delivered by an earlier request; will retry");
                self.defer_file(id, 0, 0);
                return;
            }
            Err(TryLockError::Error(e)) => warning!("{id}: lock queue file: {e}"),
        }
        let slice = match qfile::read_envelope_slice(&file, 0, self.recipient_limit) {
            Ok(slice) => slice,
            Err(ReadError::Io(e)) => {
                warning!("{id}: read queue file: {e}");
                drop(file);
                self.defer_file(id, 0, 0);
                return;
            }
            Err(e) => {
                drop(file);
                scan::to_corrupt(&self.tree, id, Queue::Active, &e.to_string());
                return;
            }
        };
        let force_expire = slice.mode & qfile::MODE_EXPIRE_BIT != 0;
        drop(file);
        // A new round: the defer log is for the reasons of this one; the
        // count of earlier deferrals stays (num_attempts). An expired
        // message keeps it: its return says why it was delayed.
        if !force_expire {
            if let Err(e) = postern_common::delivery::carry_attempts(&self.tree, id) {
                warning!("{id}: defer log: {e}");
            }
        }
        info!(
            "{id}: from=<{}>, size={}, nrcpt={} (queue active)",
            slice.env.sender, slice.env.content_size, slice.total
        );
        let mut msg = Message::new(id, slice.env);
        msg.more = slice.next;
        msg.force_expire = force_expire;
        self.schedule_recipients(id, msg);
    }

    /// Resolves the pending recipients of (a slice of) an active message
    /// and queues them.
    fn schedule_recipients(&mut self, id: &str, mut msg: Message) {
        let mut targets = Vec::new();
        let mut items = Vec::new();
        let mut item_indexes = Vec::new();
        let deferred_before: Vec<u64> = if msg.force_expire {
            postern_common::delivery::read_log(&self.tree, MessageLog::Defer, id)
                .unwrap_or_default()
                .iter()
                .map(|e| e.offset)
                .collect()
        } else {
            Vec::new()
        };
        for (i, r) in msg.env.recipients.iter().enumerate() {
            if r.done {
                continue;
            }
            if msg.force_expire {
                // No delivery: finish() returns it. A recipient never
                // deferred gets Postfix's reason for its return.
                if !deferred_before.contains(&r.offset) {
                    item_indexes.push(i);
                    items.push(Item {
                        rcpt: DeliveryRecipient {
                            offset: r.offset,
                            rcpt: r.rcpt.clone(),
                        },
                        outcome: Outcome::Deferred,
                        dsn: "4.7.0".into(),
                        reason: "message is administratively expired".into(),
                    });
                }
                continue;
            }
            let sender = Some(msg.env.sender.as_str());
            let filter = msg.env.attr(postern_common::qfile::attr::FILTER);
            let resolution = self
                .resolver
                .resolve_filtered(sender, &r.rcpt.address, filter);
            let (outcome, dsn, reason) = match self.behaviours.apply(resolution) {
                Resolution::Deliver {
                    mut transport,
                    nexthop,
                } => {
                    // X-Postern-Pool/X-Virtual-MTA (a trusted client's,
                    // cleanup saw to that): its pool or source replaces
                    // the SMTP transport.
                    if let Some(name) = msg.env.attr(postern_common::qfile::attr::POOL) {
                        let sources = &self.sched.sites.sources;
                        if sources.is_smtp(&transport) {
                            if let Some(t) = sources.header_pool(name) {
                                transport = t;
                            }
                        }
                    }
                    targets.push(Target {
                        index: i,
                        transport,
                        nexthop,
                        address: r.rcpt.address.clone(),
                    });
                    continue;
                }
                Resolution::Bounce { dsn, text } => (Outcome::Bounced, dsn, text),
                Resolution::Defer { dsn, text } => (Outcome::Deferred, dsn, text),
                Resolution::Discard { text } => (Outcome::Sent, "2.0.0".to_string(), text),
            };
            item_indexes.push(i);
            items.push(Item {
                rcpt: DeliveryRecipient {
                    offset: r.offset,
                    rcpt: r.rcpt.clone(),
                },
                outcome,
                dsn,
                reason,
            });
        }
        if !items.is_empty() {
            let results = record::record(&self.tree, msg.request("none", "", &[]), items);
            msg.apply(&item_indexes, &results);
        }
        let indexes: Vec<usize> = targets.iter().map(|t| t.index).collect();
        msg.set(&indexes, RcptState::Queued);
        msg.queued = self.sched.add_message(id, &targets);
        self.remember(id, msg);
        self.record_held();
        self.defer_suspended();
        if self.messages.get(id).is_some_and(|m| m.idle()) {
            self.finish(id);
        }
    }

    /// A Delayed accounting record for each recipient queued behind its
    /// site's connection limit or message rate (KumoMTA's record for mail
    /// held back by a throttle): written once, when it starts to wait.
    fn record_held(&mut self) {
        let held = self.sched.take_held();
        if held.is_empty() || !accounting::enabled() {
            return;
        }
        for h in held {
            let Some(msg) = self.messages.get(&h.entry.message) else {
                continue;
            };
            let reply = postern_common::bounce_class::Reply {
                code: 451,
                enhanced: "4.4.5".into(),
                content: h.why.clone(),
                ..Default::default()
            };
            for &i in &h.entry.recipients {
                let mut rec = accounting::message_record(
                    accounting::Kind::Delayed,
                    &h.entry.message,
                    &msg.env,
                    &msg.env.recipients[i].rcpt,
                    Some(&reply),
                    "",
                );
                rec.site = h.site.clone();
                accounting::write(&rec);
            }
        }
    }

    /// Defers the recipients of entries whose destination is dead (no
    /// connection attempt), and finishes messages left with nothing to do.
    fn defer_suspended(&mut self) {
        // Rerouting may hand back more (no member of the pool has room).
        for _ in 0..4 {
            let taken = self.sched.take_suspended();
            if taken.is_empty() {
                break;
            }
            self.defer_these(taken);
        }
    }

    fn defer_these(&mut self, taken: Vec<crate::schedule::Suspended>) {
        for s in taken {
            let id = s.entry.message.clone();
            let Some(msg) = self.messages.get_mut(&id) else {
                continue;
            };
            msg.queued = msg.queued.saturating_sub(1);
            if let Some((pool, nexthop)) = &s.reroute {
                // Its source was suspended for the site: another member
                // of the pool takes it.
                let targets: Vec<Target> = s
                    .entry
                    .recipients
                    .iter()
                    .map(|&i| Target {
                        index: i,
                        transport: pool.clone(),
                        nexthop: nexthop.clone(),
                        address: msg.env.recipients[i].rcpt.address.clone(),
                    })
                    .collect();
                let n = self.sched.add_message(&id, &targets);
                if let Some(msg) = self.messages.get_mut(&id) {
                    msg.queued += n;
                }
                continue;
            }
            match s.site_until {
                Some(t) => msg.site_wait = Some(msg.site_wait.map_or(t, |w| w.min(t))),
                None if !s.bounce => {
                    msg.other_defer = true;
                    msg.plain_defer = true;
                }
                None => {}
            }
            let items: Vec<Item> = s
                .entry
                .recipients
                .iter()
                .map(|&i| Item {
                    rcpt: DeliveryRecipient {
                        offset: msg.env.recipients[i].offset,
                        rcpt: msg.env.recipients[i].rcpt.clone(),
                    },
                    outcome: if s.bounce {
                        Outcome::Bounced
                    } else {
                        Outcome::Deferred
                    },
                    dsn: s.dsn.clone(),
                    reason: s.reason.clone(),
                })
                .collect();
            // Never attempted: AdminBounce for what `postern bounce` or a
            // `bounce=` rule fails, Delayed for what waits.
            let kind = if s.bounce {
                accounting::Kind::AdminBounce
            } else {
                accounting::Kind::Delayed
            };
            let mut req = msg.request("none", "", &[]);
            if !s.site.is_empty() {
                req.site = Some(postern_common::ipc::SiteHint {
                    name: s.site.clone(),
                    ..Default::default()
                });
            }
            let results = record::record_as(&self.tree, req, items, Some(kind));
            // Deferred or bounced without an attempt: counted as qmgr
            // logs them, relay "none".
            let site = (!s.site.is_empty()).then_some(s.site.as_str());
            self.stats.record("none", site, &results);
            msg.apply(&s.entry.recipients, &results);
            if msg.admin.is_some() && msg.in_flight == 0 && !msg.finishing {
                self.apply_admin(&id);
            } else if msg.idle() {
                self.finish(&id);
            }
        }
    }

    /// Dispatches every request the scheduler lets go now (each a batch
    /// of one or more messages' entries for one destination).
    fn dispatch(&mut self) {
        while let Some(d) = self.sched.pick() {
            let mut batch = Vec::with_capacity(1 + d.more.len());
            for entry in std::iter::once(d.entry).chain(d.more) {
                let Some(msg) = self.messages.get_mut(&entry.message) else {
                    continue;
                };
                msg.queued = msg.queued.saturating_sub(1);
                msg.in_flight += 1;
                msg.set(&entry.recipients, RcptState::InFlight);
                let mut req = msg.request(&d.transport, &d.nexthop, &entry.recipients);
                req.site = d.site.clone();
                if let Some(sel) = &entry.selection {
                    req.pool = sel.0.clone();
                    req.selection = sel.1.clone();
                }
                batch.push((entry.recipients, req));
            }
            if batch.is_empty() {
                self.sched.done(&d.transport, &d.destination, None);
                continue;
            }
            let tx = self.tx.clone();
            let kept = batch.clone();
            let started = deliver::start(
                &self.workers,
                self.tree.clone(),
                self.timeout,
                d.destination.clone(),
                batch,
                move |c| {
                    let _ = tx.send(Event::Delivered(c));
                },
            );
            if let Err(e) = started {
                let parts = kept
                    .into_iter()
                    .map(|(indexes, req)| {
                        warning!("{}: cannot start a delivery thread: {e}", req.queue_id);
                        let results =
                            record::agent_failed(&self.tree, &req, "delivery agent unavailable");
                        Part {
                            message: req.queue_id,
                            indexes,
                            results,
                        }
                    })
                    .collect();
                self.delivered(Completion {
                    transport: d.transport,
                    destination: d.destination,
                    parts,
                    destination_failed: false,
                });
            }
        }
    }

    fn delivered(&mut self, mut c: Completion) {
        let failure: Option<(String, String)> = c.destination_failed.then(|| {
            c.parts
                .iter()
                .flat_map(|p| &p.results)
                .find(|r| r.outcome == Outcome::Deferred)
                .map(|r| (r.dsn.clone(), r.reason.clone()))
                .unwrap_or(("4.4.1".into(), "destination unreachable".into()))
        });
        let failure = failure.as_ref().map(|(d, r)| (d.as_str(), r.as_str()));
        let site = self.sched.site_of(&c.transport, &c.destination);
        let site_name = site.as_ref().map(|s| s.borrow().name.clone());
        for part in &c.parts {
            self.stats
                .record(&c.transport, site_name.as_deref(), &part.results);
        }
        if let Some(site) = &site {
            let bounce = self.site_replies(site, &c);
            self.bounce_now(&mut c, bounce);
        }
        // PowerMTA's backoff_retry_after: what a site in backoff defers
        // is retried after that time, not the usual backoff.
        let backoff_retry = site.as_ref().and_then(|s| {
            let s = s.borrow();
            s.backoff.as_ref()?;
            s.policy
                .backoff_retry_after
                .map(|d| now_secs() + d.as_secs())
        });
        self.sched.done(&c.transport, &c.destination, failure);
        self.defer_suspended();
        for part in c.parts {
            let Some(msg) = self.messages.get_mut(&part.message) else {
                continue;
            };
            msg.in_flight = msg.in_flight.saturating_sub(1);
            if part.results.iter().any(|r| r.outcome == Outcome::Deferred) {
                msg.other_defer = true;
                match backoff_retry {
                    Some(t) => msg.backoff_retry = Some(msg.backoff_retry.map_or(t, |w| w.min(t))),
                    None => msg.plain_defer = true,
                }
            }
            msg.apply(&part.indexes, &part.results);
            if msg.admin.is_some() && msg.in_flight == 0 && !msg.finishing {
                self.apply_admin(&part.message);
            } else if msg.idle() {
                self.finish(&part.message);
            }
        }
    }

    /// What a site's replies mean: successes let a site in backoff
    /// recover; a remote reply (never one Postern wrote itself) that
    /// matches `delivery_reply_rules` acts on the site.
    ///
    /// A rule with `after=N/PERIOD` and `bounce` or `defer` decides the
    /// outcome here, where the matches are counted: returns the deferred
    /// recipients to bounce now, (message, offset, dsn, reason) — under
    /// `bounce` those of the Nth match (a 4xx made final), under `defer`
    /// those of the other matches (a 5xx the smtp agent deferred, as
    /// `delivery_policy::adjust_outcome` does for such a rule, made final
    /// again: only the Nth is treated as temporary).
    fn site_replies(
        &mut self,
        site: &crate::sites::SiteRef,
        c: &Completion,
    ) -> Vec<(String, u64, String, String)> {
        use postern_common::delivery_policy::remote_reply;
        let mut bounce = Vec::new();
        // Each distinct reply counts once per completion; its decision
        // holds for every recipient that got it.
        let mut decided: HashMap<String, bool> = HashMap::new();
        for part in &c.parts {
            if part.results.iter().any(|r| r.outcome == Outcome::Sent) {
                site.borrow_mut().success();
            }
            for r in part.results.iter().filter(|r| r.outcome != Outcome::Sent) {
                let Some(reply) = remote_reply(&r.reason, &r.dsn) else {
                    continue;
                };
                site.borrow_mut().last_reply = reply.clone();
                let final_dsn = || {
                    let mut d = r.dsn.clone();
                    if d.len() > 1 {
                        d.replace_range(..1, "5");
                    }
                    d
                };
                if let Some(&b) = decided.get(&reply) {
                    if b && r.outcome == Outcome::Deferred {
                        bounce.push((
                            part.message.clone(),
                            r.offset,
                            final_dsn(),
                            r.reason.clone(),
                        ));
                    }
                    continue;
                }
                let found = {
                    let s = site.borrow();
                    self.sched.sites.reply_rule(&c.transport, &s, &reply)
                };
                let Some((text, rule)) = found else {
                    decided.insert(reply, false);
                    continue;
                };
                let fired = site.borrow_mut().trigger(&text, rule.after);
                let bounce_now = rule.after.is_some()
                    && r.outcome == Outcome::Deferred
                    && ((fired && rule.bounce.is_some())
                        || (!fired && rule.defer && reply.starts_with('5')));
                decided.insert(reply.clone(), bounce_now);
                if bounce_now {
                    bounce.push((
                        part.message.clone(),
                        r.offset,
                        final_dsn(),
                        r.reason.clone(),
                    ));
                }
                if !fired {
                    continue;
                }
                let name = site.borrow().name.clone();
                info!(
                    "{}: site {name}: reply \"{reply}\" matched rule \"{text}\"",
                    part.message
                );
                // A rule's class=NAME went into the records of this
                // delivery already: the smtp agent applies it.
                if rule.backoff {
                    site.borrow_mut().enter_backoff(&text, &reply);
                }
                if let Some(d) = rule.suspend {
                    // The whole site: every source's state for it.
                    let all = self.sched.sites.find_all(&name, None);
                    for s in all {
                        if !s.borrow_mut().is_suspended() {
                            self.sched.suspend_site(
                                &s,
                                d,
                                &format!("rule \"{text}\" matched \"{reply}\""),
                                &text,
                                &reply,
                                false,
                            );
                        }
                    }
                }
                if let Some(d) = rule.suspend_source {
                    // This source only: the others of its pool carry on.
                    if !site.borrow_mut().is_suspended() {
                        self.sched.suspend_site(
                            site,
                            d,
                            &format!("rule \"{text}\" matched \"{reply}\""),
                            &text,
                            &reply,
                            true,
                        );
                    }
                }
                if let Some(d) = rule.bounce.filter(|d| !d.is_zero()) {
                    let until = std::time::SystemTime::now() + d;
                    accounting::site_mode_change(&name, "bounce", &text, &reply, unix_secs(until));
                    let domains: Vec<String> = site.borrow().domains.iter().cloned().collect();
                    for dom in domains {
                        self.sched.bounce_domain(
                            &dom,
                            until,
                            &format!("rule \"{text}\" matched \"{reply}\""),
                        );
                    }
                }
            }
        }
        bounce
    }

    /// Bounces deferred recipients of a completion now (what
    /// [`Manager::site_replies`] decided), recording the bounce as an
    /// agent would and adding its result to the part's results.
    fn bounce_now(&mut self, c: &mut Completion, bounce: Vec<(String, u64, String, String)>) {
        for (message, offset, dsn, reason) in bounce {
            let Some(msg) = self.messages.get(&message) else {
                continue;
            };
            let Some(r) = msg.env.recipients.iter().find(|r| r.offset == offset) else {
                continue;
            };
            info!("{message}: a reply rule's after= count makes the failure final: {reason}");
            let item = Item {
                rcpt: DeliveryRecipient {
                    offset,
                    rcpt: r.rcpt.clone(),
                },
                outcome: Outcome::Bounced,
                dsn,
                reason,
            };
            let results = record::record(&self.tree, msg.request("none", "", &[]), vec![item]);
            if let Some(part) = c.parts.iter_mut().find(|p| p.message == message) {
                // The last result for a recipient is what counts.
                part.results.extend(results);
            }
        }
    }

    /// The round of a message is over: expire it if it is too old, send a
    /// notice for its bounced recipients, then remove or defer it.
    fn finish(&mut self, id: &str) {
        let Some(msg) = self.messages.get_mut(id) else {
            return;
        };
        if let Some(from) = msg.more {
            // The next slice of recipients (qmgr_message_recipient_limit),
            // in the same round.
            let slice = File::open(self.tree.path(Queue::Active, id))
                .map_err(ReadError::Io)
                .and_then(|f| qfile::read_envelope_slice(&f, from, self.recipient_limit));
            match slice {
                Ok(slice) if !slice.env.recipients.is_empty() => {
                    let Some(old) = self.forget(id) else { return };
                    let mut msg = Message::new(id, slice.env);
                    msg.more = slice.next;
                    msg.admin = old.admin;
                    msg.force_expire = old.force_expire;
                    self.schedule_recipients(id, msg);
                    return;
                }
                Ok(_) => msg.more = None,
                Err(e) => {
                    warning!("{id}: read queue file: {e}");
                    msg.more = None;
                }
            }
        }
        let Some(msg) = self.messages.get_mut(id) else {
            return;
        };
        msg.finishing = true;
        let force_expire = msg.force_expire;
        let file = match OpenOptions::new()
            .read(true)
            .write(true)
            .open(self.tree.path(Queue::Active, id))
        {
            Ok(f) => f,
            Err(e) => {
                warning!("{id}: open active queue file: {e}");
                self.forget(id);
                return;
            }
        };
        // The file, not memory, says who is done: an agent that went away
        // may have recorded some before it did. It is read a slice at a
        // time; expired recipients are failed slice by slice.
        let now = now_secs();
        let mut env: Option<qfile::Envelope> = None;
        let mut pending = 0usize;
        let mut from = 0;
        let mut expired_logged = false;
        loop {
            let mut slice = match qfile::read_envelope_slice(&file, from, self.recipient_limit) {
                Ok(s) => s,
                Err(ReadError::Io(e)) => {
                    warning!("{id}: read queue file: {e}");
                    self.complete(id, false);
                    return;
                }
                Err(e) => {
                    drop(file);
                    scan::to_corrupt(&self.tree, id, Queue::Active, &e.to_string());
                    self.forget(id);
                    return;
                }
            };
            let rcpts: Vec<QueuedRecipient> = std::mem::take(&mut slice.env.recipients);
            let mut left = rcpts.len();
            if left > 0
                && (force_expire
                    || self
                        .retry
                        .expired(now, slice.env.arrival_secs, slice.env.sender.is_empty()))
            {
                if !expired_logged {
                    info!(
                        "{id}: from=<{}>, status=expired, returned to sender",
                        slice.env.sender
                    );
                    expired_logged = true;
                }
                left -= record::expire(&self.tree, id, &file, &slice.env, &rcpts).len();
            }
            pending += left;
            env.get_or_insert(slice.env);
            match slice.next {
                Some(n) => from = n,
                None => break,
            }
        }
        drop(file);
        let env = env.unwrap_or_default();
        let all_done = pending == 0;
        if let Some(msg) = self.messages.get_mut(id) {
            msg.all_done = all_done;
        }
        let plan = match notices::plan(&self.tree, &self.notice_settings, id, &env, all_done) {
            Ok(p) => p,
            Err(e) => {
                warning!("{id}: read message logs: {e}");
                self.complete(id, false);
                return;
            }
        };
        if let Some(m) = self.messages.get_mut(id) {
            m.warned_now = plan.warned_now;
        }
        if plan.notices.is_empty() {
            if plan.any_log || plan.warned_now {
                self.notices_done(id);
            } else if let Some(m) = self.messages.get_mut(id) {
                // No log, nothing to note in one: nothing for done() or
                // complete() to read or remove (most messages).
                m.no_logs = true;
            }
            self.complete(id, all_done);
            return;
        }
        if !notices::start(&self.tree, self.timeout, self.tx.clone(), id, plan.notices) {
            self.complete(id, false);
        }
    }

    /// The notices of the round are queued, or need not be (see
    /// [`notices::done`]).
    fn notices_done(&mut self, id: &str) {
        let warned_now = self.messages.get(id).is_some_and(|m| m.warned_now);
        notices::done(&self.tree, id, warned_now);
    }

    fn notice_done(&mut self, id: &str, result: Result<String, NotQueued>) {
        let Some(all_done) = self.messages.get(id).map(|m| m.all_done) else {
            return;
        };
        match result {
            Ok(_) => {
                self.notices_done(id);
                self.complete(id, all_done);
            }
            Err(e) if e.permanent => {
                // Asking again would be refused again.
                warning!("{id}: notification discarded: {}", e.reason);
                self.notices_done(id);
                self.complete(id, all_done);
            }
            Err(e) => {
                warning!("{id}: cannot send notification: {}; will retry", e.reason);
                self.complete(id, false);
            }
        }
    }

    /// The end of a round: remove the message (`remove`) or defer it.
    fn complete(&mut self, id: &str, remove: bool) {
        if !remove && self.messages.get(id).is_some_and(|m| m.admin.is_some()) {
            if let Some(m) = self.messages.get_mut(id) {
                m.finishing = false;
            }
            self.apply_admin(id);
            return;
        }
        let Some(msg) = self.forget(id) else {
            return;
        };
        if remove {
            if !msg.no_logs {
                remove_log(&self.tree, MessageLog::Defer, id);
                remove_log(&self.tree, MessageLog::Bounce, id);
                remove_log(&self.tree, MessageLog::Success, id);
            }
            self.retirer.retire(id);
        } else {
            // Deferred only for suspended sites: not back before the
            // first suspension ends (a suspended site costs no retries).
            let not_before = msg.site_wait.filter(|_| !msg.other_defer).unwrap_or(0);
            // Deferred only by sites in backoff with backoff_retry_after
            // (and perhaps suspended ones): their retry time.
            let exact = msg
                .backoff_retry
                .filter(|_| !msg.plain_defer)
                .map(|t| t.max(not_before));
            // The domains its deferred recipients are in: their flush
            // logs list it (postqueue -s, ETRN, postern resume).
            let sites = postern_common::flush::sites_of(
                msg.env
                    .recipients
                    .iter()
                    .zip(&msg.state)
                    .filter(|(_, s)| **s != RcptState::Done)
                    .map(|(r, _)| r.rcpt.address.as_str()),
            );
            self.defer_at(id, msg.env.arrival_secs, not_before, exact, &sites);
        }
    }

    /// Moves a message from `active/` to `deferred/`, its mtime set first
    /// to the time of the next attempt (so a deferred scan never sees it
    /// with an old time).
    fn defer_file(&mut self, id: &str, arrival: u64, not_before: u64) {
        self.defer_at(id, arrival, not_before, None, &[]);
    }

    /// [`Manager::defer_file`] with the retry time `exact` when given,
    /// its queue ID added to the flush logs of `sites`.
    fn defer_at(
        &mut self,
        id: &str,
        arrival: u64,
        not_before: u64,
        exact: Option<u64>,
        sites: &[String],
    ) {
        let now = now_secs();
        let at = exact.unwrap_or_else(|| (now + self.retry.backoff(now, arrival)).max(not_before));
        let path = self.tree.path(Queue::Active, id);
        if let Err(e) = queue::set_mtime(&path, at) {
            warning!("{id}: set retry time: {e}");
        }
        match self.tree.shift(id, Queue::Active, Queue::Deferred) {
            Ok(()) => {
                self.deferred.deferred(id, at);
                for site in sites {
                    if let Err(e) = postern_common::flush::add(&self.tree, site, id) {
                        warning!("{id}: flush log of {site}: {e}");
                    }
                }
            }
            Err(e) => warning!("{id}: move from active to deferred: {e}"),
        }
    }
}

/// The answer to `postern suspend/resume` for what is no site.
fn no_site_of(what: &str, source: &str) -> String {
    if source.is_empty() {
        format!(
            "no site for \"{what}\": not a site's name, and no delivery_policy_maps entry for its mail"
        )
    } else {
        format!("no site known for \"{what}\" (source {source})")
    }
}

/// The `rule` of an accounting record for an operator's command.
fn admin_rule(command: &str, reason: &str) -> String {
    if reason.trim().is_empty() {
        format!("postern {command}")
    } else {
        format!("postern {command}: {}", reason.trim())
    }
}

fn unix_secs(t: std::time::SystemTime) -> u64 {
    t.duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The qmgr daemon: the wake-up thread, start-up recovery, the main loop.
pub fn run(cfg: &Config) -> ! {
    let mut m = Manager::new(cfg);
    let tx = m.sender();
    let period = Duration::from_secs(cfg.get_time("queue_run_delay").unwrap_or(300).max(1));
    let own_socket = m.tree.qmgr_socket();
    // The wake-up thread reports to master that this (only) process is
    // busy, and turns every connection's bytes and every timer tick into
    // an event.
    std::thread::Builder::new()
        .name("wakeup".into())
        .spawn(move || {
            let drained = tx.clone();
            postern_common::service::serve_triggers(period, &own_socket, move |bytes| {
                let _ = tx.send(Event::Wakeup(bytes.to_vec()));
            });
            let _ = drained.send(Event::Drain);
        })
        .unwrap_or_else(|e| fatal!("cannot start the wake-up thread: {e}"));
    crate::admin::listen(&m.tree, m.sender());
    // Privileges are dropped: the cluster's threads may start.
    let tx = m.sender();
    if let Some(c) = m.sched.sites.cluster.as_mut() {
        c.start(tx);
    }
    m.start();
    m.run()
}
