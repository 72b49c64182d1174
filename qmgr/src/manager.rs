//! The queue manager proper: the state of the active queue, owned by one
//! thread, and the loop that moves it along.
//!
//! The main thread waits on one channel of [`Event`]s, fed by the
//! wake-up thread (`public/qmgr`, and the `queue_run_delay` timer), by the
//! delivery threads ([`deliver`]) and by the notice threads ([`bounce`]).
//! Between events it takes messages in from the scans ([`scan`]),
//! resolves and queues their recipients ([`resolve`], [`schedule`]),
//! dispatches what the scheduler allows, and finishes each message whose
//! round is over: it sends a non-delivery notice for bounced recipients,
//! bounces expired ones, and removes the file or puts it in `deferred/`
//! with its retry time ([`retry`]).
//!
//! Everything on disk changes by a rename, an append to a message log, or
//! a done mark: a qmgr killed at any instant loses nothing, and the next
//! one takes `active/` back at start-up.

use crate::bounce::{self, NotQueued, Notice};
use crate::deliver::{self, Completion};
use crate::message::{Message, RcptState};
use crate::record::{self, Item};
use crate::resolve::{Resolution, Resolver};
use crate::retry;
use crate::scan::{self, Scan};
use crate::schedule::{Limits, Scheduler, Target};
use postern_common::delivery;
use postern_common::ipc::{DeliveryRecipient, Outcome, Wakeup};
use postern_common::qfile::{self, QueuedRecipient, ReadError};
use postern_common::queue::{self, MessageLog, Queue, QueueTree};
use postern_common::time::now_secs;
use postern_common::{debug, info, warning};
use postern_conf::Config;
use std::collections::HashMap;
use std::fs::{File, OpenOptions, TryLockError};
use std::io;
use std::sync::mpsc::{channel, Receiver, Sender};
use std::time::Duration;

/// What the main thread waits for.
#[derive(Debug)]
pub enum Event {
    /// Wake-up bytes from `public/qmgr` ([`Wakeup`]); empty: the timer.
    Wakeup(Vec<u8>),
    /// A delivery request is finished.
    Delivered(Completion),
    /// A notice was queued (its queue ID) or not (why).
    Notice {
        id: String,
        result: Result<String, NotQueued>,
    },
}

/// Messages taken in per round of work, before events are looked at again.
const TAKE_BATCH: usize = 100;
/// Queue files looked at per round of work.
const LOOK_BATCH: usize = 2000;

pub struct Manager {
    tree: QueueTree,
    myhostname: String,
    timeout: Duration,
    active_limit: usize,
    resolver: Resolver,
    sched: Scheduler,
    retry: retry::Policy,
    messages: HashMap<String, Message>,
    incoming: Scan,
    deferred: Scan,
    /// Which scan goes first next: they alternate, as in Postfix.
    incoming_turn: bool,
    tx: Sender<Event>,
    rx: Receiver<Event>,
}

fn remove_log(tree: &QueueTree, log: MessageLog, id: &str) {
    if let Err(e) = std::fs::remove_file(tree.log_path(log, id)) {
        if e.kind() != io::ErrorKind::NotFound {
            warning!("{id}: remove {} log: {e}", log.name());
        }
    }
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
        Manager {
            tree: QueueTree::new(cfg.get("queue_directory")),
            myhostname: cfg.get("myhostname"),
            timeout: Duration::from_secs(cfg.get_time("ipc_timeout").unwrap_or(3600).max(1)),
            active_limit: cfg
                .get_u64("qmgr_message_active_limit")
                .unwrap_or(20000)
                .max(1) as usize,
            resolver: Resolver::new(cfg),
            sched: Scheduler::new(max_in_flight as usize, move |t| {
                Limits::from_config(&limits_cfg, t)
            }),
            retry: retry::Policy::from_config(cfg),
            messages: HashMap::new(),
            incoming: Scan::new(Queue::Incoming),
            deferred: Scan::new(Queue::Deferred),
            incoming_turn: false,
            tx,
            rx,
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

    /// Runs forever.
    pub fn run(mut self) -> ! {
        loop {
            let more = self.work();
            let first = if more {
                self.rx.try_recv().ok()
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
        }
    }

    fn wakeup(&mut self, bytes: &[u8]) {
        if bytes.is_empty() {
            self.deferred.request(false);
            return;
        }
        for &b in bytes {
            match Wakeup::from_byte(b) {
                Some(Wakeup::Wake) | Some(Wakeup::Incoming) => self.incoming.request(false),
                Some(Wakeup::Deferred) => self.deferred.request(false),
                Some(Wakeup::Flush) => {
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
        self.resolver.refresh();
        let (mut taken, mut looked) = (0, 0);
        while taken < TAKE_BATCH && looked < LOOK_BATCH && self.messages.len() < self.active_limit {
            let Some((q, id, ignore_time)) = self.next_file() else {
                break;
            };
            looked += 1;
            if self.messages.contains_key(&id) {
                continue;
            }
            let file = match q {
                Queue::Incoming => scan::take_incoming(&self.tree, &id),
                _ => scan::take_deferred(&self.tree, &id, ignore_time),
            };
            if let Some(file) = file {
                taken += 1;
                self.activate(&id, file);
                self.dispatch();
            }
        }
        self.dispatch();
        self.messages.len() < self.active_limit && (self.incoming.busy() || self.deferred.busy())
    }

    fn next_file(&mut self) -> Option<(Queue, String, bool)> {
        for _ in 0..2 {
            self.incoming_turn = !self.incoming_turn;
            let scan = if self.incoming_turn {
                &mut self.incoming
            } else {
                &mut self.deferred
            };
            if let Some((id, ignore)) = scan.next(&self.tree) {
                return Some((scan.queue(), id, ignore));
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
                self.to_deferred(id, 0);
                return;
            }
            Err(TryLockError::Error(e)) => warning!("{id}: lock queue file: {e}"),
        }
        let env = match qfile::read_envelope(&file) {
            Ok(env) => env,
            Err(ReadError::Io(e)) => {
                warning!("{id}: read queue file: {e}");
                drop(file);
                self.to_deferred(id, 0);
                return;
            }
            Err(e) => {
                drop(file);
                scan::to_corrupt(&self.tree, id, Queue::Active, &e.to_string());
                return;
            }
        };
        drop(file);
        // A new round: the defer log is for the reasons of this one.
        remove_log(&self.tree, MessageLog::Defer, id);
        info!(
            "{id}: from=<{}>, size={}, nrcpt={} (queue active)",
            env.sender,
            env.content_size,
            env.recipients.len()
        );
        let mut msg = Message::new(id, env);
        let mut targets = Vec::new();
        let mut items = Vec::new();
        let mut item_indexes = Vec::new();
        for (i, r) in msg.env.recipients.iter().enumerate() {
            if r.done {
                continue;
            }
            let (outcome, dsn, reason) = match self.resolver.resolve(&r.rcpt.address) {
                Resolution::Deliver { transport, nexthop } => {
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
        let idle = msg.idle();
        self.messages.insert(id.to_string(), msg);
        if idle {
            self.finish(id);
        }
    }

    /// Dispatches every request the scheduler lets go now.
    fn dispatch(&mut self) {
        while let Some(d) = self.sched.pick() {
            let Some(msg) = self.messages.get_mut(&d.entry.message) else {
                self.sched.done(&d.transport, &d.destination, true);
                continue;
            };
            msg.queued = msg.queued.saturating_sub(1);
            msg.in_flight += 1;
            msg.set(&d.entry.recipients, RcptState::InFlight);
            let req = msg.request(&d.transport, &d.nexthop, &d.entry.recipients);
            let tx = self.tx.clone();
            let started = deliver::start(
                self.tree.clone(),
                self.timeout,
                d.destination.clone(),
                d.entry.recipients.clone(),
                req.clone(),
                move |c| {
                    let _ = tx.send(Event::Delivered(c));
                },
            );
            if let Err(e) = started {
                warning!("{}: cannot start a delivery thread: {e}", req.queue_id);
                let results = record::agent_failed(&self.tree, &req, "delivery agent unavailable");
                self.delivered(Completion {
                    message: req.queue_id,
                    transport: d.transport,
                    destination: d.destination,
                    indexes: d.entry.recipients,
                    results,
                    destination_failed: false,
                });
            }
        }
    }

    fn delivered(&mut self, c: Completion) {
        self.sched
            .done(&c.transport, &c.destination, !c.destination_failed);
        let Some(msg) = self.messages.get_mut(&c.message) else {
            return;
        };
        msg.in_flight = msg.in_flight.saturating_sub(1);
        msg.apply(&c.indexes, &c.results);
        if msg.idle() {
            self.finish(&c.message);
        }
    }

    /// The round of a message is over: expire it if it is too old, send a
    /// notice for its bounced recipients, then remove or defer it.
    fn finish(&mut self, id: &str) {
        let Some(msg) = self.messages.get_mut(id) else {
            return;
        };
        msg.finishing = true;
        let file = match OpenOptions::new()
            .read(true)
            .write(true)
            .open(self.tree.path(Queue::Active, id))
        {
            Ok(f) => f,
            Err(e) => {
                warning!("{id}: open active queue file: {e}");
                self.messages.remove(id);
                return;
            }
        };
        // The file, not memory, says who is done: an agent that went away
        // may have recorded some before it did.
        let env = match qfile::read_envelope(&file) {
            Ok(env) => env,
            Err(ReadError::Io(e)) => {
                warning!("{id}: read queue file: {e}");
                self.complete(id, false);
                return;
            }
            Err(e) => {
                drop(file);
                scan::to_corrupt(&self.tree, id, Queue::Active, &e.to_string());
                self.messages.remove(id);
                return;
            }
        };
        let mut pending: Vec<QueuedRecipient> = env.pending().cloned().collect();
        let now = now_secs();
        if !pending.is_empty()
            && self
                .retry
                .expired(now, env.arrival_secs, env.sender.is_empty())
        {
            info!(
                "{id}: from=<{}>, status=expired, returned to sender",
                env.sender
            );
            let done = record::expire(&self.tree, id, &file, &pending);
            pending.retain(|r| !done.contains(&r.offset));
        }
        drop(file);
        let all_done = pending.is_empty();
        if let Some(msg) = self.messages.get_mut(id) {
            msg.all_done = all_done;
        }
        let entries = match delivery::read_log(&self.tree, MessageLog::Bounce, id) {
            Ok(e) => e,
            Err(e) => {
                warning!("{id}: read bounce log: {e}");
                self.complete(id, false);
                return;
            }
        };
        if !entries.is_empty() {
            if env.sender.is_empty() || env.attr(qfile::attr::NOTIFICATION).is_some() {
                // Postfix sends these to 2bounce_notice_recipient; not yet.
                warning!(
                    "{id}: undeliverable {}: {} failed recipient(s) not reported",
                    if env.sender.is_empty() {
                        "mail from the null sender"
                    } else {
                        "notification"
                    },
                    entries.len()
                );
                remove_log(&self.tree, MessageLog::Bounce, id);
            } else {
                let report = bounce::reportable(entries);
                if report.is_empty() {
                    remove_log(&self.tree, MessageLog::Bounce, id);
                } else {
                    let notice = Notice {
                        myhostname: self.myhostname.clone(),
                        queue_id: id.to_string(),
                        sender: env.sender.clone(),
                        arrival_secs: env.arrival_secs,
                        entries: report,
                        headers: Vec::new(),
                    };
                    if self.start_notice(notice, env.content_offset) {
                        return;
                    }
                    self.complete(id, false);
                    return;
                }
            }
        }
        self.complete(id, all_done);
    }

    /// Sends a notice on its own thread. Returns whether it started.
    fn start_notice(&self, mut notice: Notice, content_offset: u64) -> bool {
        let tree = self.tree.clone();
        let timeout = self.timeout;
        let tx = self.tx.clone();
        let started = std::thread::Builder::new()
            .name("notice".into())
            .spawn(move || {
                let id = notice.queue_id.clone();
                match File::open(tree.path(Queue::Active, &id))
                    .and_then(|f| bounce::original_headers(&f, content_offset))
                {
                    Ok(h) => notice.headers = h,
                    Err(e) => warning!("{id}: read message headers: {e}"),
                }
                let result = bounce::send(&tree, timeout, &notice);
                let _ = tx.send(Event::Notice { id, result });
            });
        match started {
            Ok(_) => true,
            Err(e) => {
                warning!("cannot start a notice thread: {e}");
                false
            }
        }
    }

    fn notice_done(&mut self, id: &str, result: Result<String, NotQueued>) {
        let Some(all_done) = self.messages.get(id).map(|m| m.all_done) else {
            return;
        };
        match result {
            Ok(new_id) => {
                info!("{id}: sender non-delivery notification: {new_id}");
                remove_log(&self.tree, MessageLog::Bounce, id);
                self.complete(id, all_done);
            }
            Err(e) if e.permanent => {
                // Asking again would be refused again.
                warning!(
                    "{id}: sender non-delivery notification discarded: {}",
                    e.reason
                );
                remove_log(&self.tree, MessageLog::Bounce, id);
                self.complete(id, all_done);
            }
            Err(e) => {
                warning!(
                    "{id}: cannot send non-delivery notification: {}; will retry",
                    e.reason
                );
                self.complete(id, false);
            }
        }
    }

    /// The end of a round: remove the message (`remove`) or defer it.
    fn complete(&mut self, id: &str, remove: bool) {
        let Some(msg) = self.messages.remove(id) else {
            return;
        };
        if remove {
            remove_log(&self.tree, MessageLog::Defer, id);
            remove_log(&self.tree, MessageLog::Bounce, id);
            match std::fs::remove_file(self.tree.path(Queue::Active, id)) {
                Ok(()) => info!("{id}: removed"),
                Err(e) => warning!("{id}: remove active queue file: {e}"),
            }
        } else {
            self.to_deferred(id, msg.env.arrival_secs);
        }
    }

    /// Moves a message from `active/` to `deferred/`, its mtime set first
    /// to the time of the next attempt (so a deferred scan never sees it
    /// with an old time).
    fn to_deferred(&self, id: &str, arrival: u64) {
        let now = now_secs();
        let at = now + self.retry.backoff(now, arrival);
        let path = self.tree.path(Queue::Active, id);
        if let Err(e) = queue::set_mtime(&path, at) {
            warning!("{id}: set retry time: {e}");
        }
        if let Err(e) = self.tree.move_to(id, Queue::Active, Queue::Deferred) {
            warning!("{id}: move from active to deferred: {e}");
        }
    }
}

/// The qmgr daemon: the wake-up thread, start-up recovery, the main loop.
pub fn run(cfg: &Config) -> ! {
    let mut m = Manager::new(cfg);
    let tx = m.sender();
    let period = Duration::from_secs(cfg.get_time("queue_run_delay").unwrap_or(300).max(1));
    // The wake-up thread reports to master that this (only) process is
    // busy, and turns every connection's bytes and every timer tick into
    // an event.
    std::thread::Builder::new()
        .name("wakeup".into())
        .spawn(move || {
            postern_common::service::serve_triggers(period, move |bytes| {
                let _ = tx.send(Event::Wakeup(bytes.to_vec()));
            })
        })
        .unwrap_or_else(|e| postern_common::fatal!("cannot start the wake-up thread: {e}"));
    m.start();
    m.run()
}
