//! qmgr's own recording of outcomes, for recipients that no delivery agent
//! recorded: those it fails or defers itself (`error:` and `retry:`
//! transports, an unreachable or crashed agent) and those that expire.
//!
//! Wherever it can, this goes through the agents' own code
//! ([`delivery::Job::record`]), so that the log line, the defer or bounce
//! log entry and the in-place done mark are exactly the agents'.

use postern_common::accounting;
use postern_common::delivery::{self, Job, LogEntry};
use postern_common::ipc::{DeliveryRecipient, DeliveryRequest, Outcome, RecipientResult};
use postern_common::qfile::{self, QueuedRecipient};
use postern_common::queue::{MessageLog, Queue, QueueTree};
use postern_common::warning;
use std::collections::HashSet;
use std::fs::File;

/// One recipient's outcome to record.
pub struct Item {
    pub rcpt: DeliveryRecipient,
    pub outcome: Outcome,
    pub dsn: String,
    pub reason: String,
}

/// Records each item's outcome with `relay=none`. `req` says which
/// message; its recipient list is replaced by the items'. A recipient
/// that could not be recorded comes back deferred (and is tried again).
pub fn record(tree: &QueueTree, req: DeliveryRequest, items: Vec<Item>) -> Vec<RecipientResult> {
    record_as(tree, req, items, None)
}

/// [`record`], with the accounting record type `kind` instead of the
/// outcome's ([`Job::account_kind`]).
pub fn record_as(
    tree: &QueueTree,
    mut req: DeliveryRequest,
    items: Vec<Item>,
    kind: Option<accounting::Kind>,
) -> Vec<RecipientResult> {
    req.recipients = items.iter().map(|i| i.rcpt.clone()).collect();
    let id = req.queue_id.clone();
    match Job::open(tree, req) {
        Ok(mut job) => {
            job.account_kind = kind;
            for i in &items {
                job.record(&i.rcpt, i.outcome, &i.dsn, "none", &i.reason);
            }
            job.finish().results
        }
        Err(e) => {
            warning!("{id}: open queue file: {e}");
            items
                .into_iter()
                .map(|i| RecipientResult {
                    offset: i.rcpt.offset,
                    outcome: Outcome::Deferred,
                    dsn: "4.3.0".into(),
                    reason: i.reason,
                })
                .collect()
        }
    }
}

/// The request could not be delivered because the agent could not be
/// reached, or went away before it answered. Recipients the agent had
/// already recorded as done (it records before it answers) count as done;
/// every other one is deferred with `reason`, logged and written to the
/// defer log here, since the agent recorded nothing for it.
pub fn agent_failed(tree: &QueueTree, req: &DeliveryRequest, reason: &str) -> Vec<RecipientResult> {
    let done: HashSet<u64> = File::open(tree.path(Queue::Active, &req.queue_id))
        .ok()
        .and_then(|f| qfile::read_envelope(&f).ok())
        .map(|env| {
            env.recipients
                .iter()
                .filter(|r| r.done)
                .map(|r| r.offset)
                .collect()
        })
        .unwrap_or_default();
    let mut results = Vec::new();
    let mut items = Vec::new();
    for r in &req.recipients {
        if done.contains(&r.offset) {
            results.push(RecipientResult {
                offset: r.offset,
                outcome: Outcome::Sent,
                dsn: "2.0.0".into(),
                reason: "recorded by the delivery agent".into(),
            });
        } else {
            items.push(Item {
                rcpt: r.clone(),
                outcome: Outcome::Deferred,
                dsn: "4.3.0".into(),
                reason: reason.to_string(),
            });
        }
    }
    if !items.is_empty() {
        results.extend(record(tree, req.clone(), items));
    }
    results
}

/// Fails the pending recipients of a message that stayed too long in the
/// queue: each gets a bounce log entry with the last reason it was
/// deferred for (from the defer log of this last attempt) and is marked
/// done. Returns the offsets of the recipients so recorded.
pub fn expire(
    tree: &QueueTree,
    id: &str,
    file: &File,
    env: &qfile::Envelope,
    pending: &[QueuedRecipient],
) -> HashSet<u64> {
    let deferrals = delivery::read_log(tree, MessageLog::Defer, id).unwrap_or_else(|e| {
        warning!("{id}: read defer log: {e}");
        Vec::new()
    });
    let mut done = HashSet::new();
    for r in pending {
        let last = deferrals
            .iter()
            .rev()
            .find(|e| e.offset == r.offset && e.recipient == r.rcpt.address);
        let (status, relay, reason) = match last {
            Some(e) => (
                if e.status.is_empty() {
                    "4.0.0".to_string()
                } else {
                    e.status.clone()
                },
                if e.relay.is_empty() {
                    "none".to_string()
                } else {
                    e.relay.clone()
                },
                e.reason.clone(),
            ),
            None => (
                "4.0.0".to_string(),
                "none".to_string(),
                "delivery temporarily suspended".to_string(),
            ),
        };
        let mut entry = LogEntry::new(r.offset, &r.rcpt, &status, "failed", &relay, &reason);
        entry.class = postern_common::bounce_class::classify_expired(&reason);
        delivery::log_class(id, &r.rcpt.address, &status, &entry.class);
        if accounting::enabled() {
            let reply = postern_common::bounce_class::parse_reason(&status, &reason);
            let mut rec = accounting::message_record(
                accounting::Kind::Expiration,
                id,
                env,
                &r.rcpt,
                Some(&reply),
                &entry.class,
            );
            let (name, addr) = accounting::split_relay(&relay);
            if !addr.is_empty() {
                (rec.peer_name, rec.peer_addr) = (name, addr);
            }
            rec.num_attempts = delivery::attempts_of(tree, id, r.offset);
            accounting::write(&rec);
        }
        if let Err(e) = delivery::append_log(tree, MessageLog::Bounce, id, &entry) {
            warning!("{id}: append bounce log: {e}");
            continue;
        }
        match qfile::mark_done(file, r.offset) {
            Ok(()) => {
                done.insert(r.offset);
            }
            Err(e) => warning!("{id}: mark recipient done: {e}"),
        }
    }
    done
}
