//! Dispatching a delivery request: one pooled thread per request in
//! flight, which connects to the transport's socket `private/TRANSPORT`,
//! sends the [`DeliveryRequest`] (or a batch of them for one destination,
//! flagged [`DeliveryRequest::MORE`]), waits for one [`DeliveryReply`] per
//! request and hands the outcome back to the main thread.
//!
//! The agent records every recipient (log line, defer or bounce log, done
//! mark) before it answers. When there is no agent to ask (no socket: the
//! transport is not in master.cf), or it cannot be reached, or it goes away
//! without an answer, the agent recorded nothing for the recipients it did
//! not finish, so qmgr defers and records them itself
//! ([`record::agent_failed`]).

use crate::record;
use postern_common::ipc::{self, DeliveryReply, DeliveryRequest, RecipientResult};
use postern_common::pool::Pool;
use postern_common::queue::QueueTree;
use postern_common::warning;
use std::io;
use std::time::Duration;

/// What became of one message's part of a request.
#[derive(Debug)]
pub struct Part {
    pub message: String,
    /// The recipients' indexes in the message's envelope.
    pub indexes: Vec<usize>,
    pub results: Vec<RecipientResult>,
}

/// What became of one dispatched request (a batch: one part per message).
#[derive(Debug)]
pub struct Completion {
    pub transport: String,
    /// The scheduler's destination key.
    pub destination: String,
    pub parts: Vec<Part>,
    /// The next hop could not be reached at all (for the scheduler).
    pub destination_failed: bool,
}

/// A name usable as a socket in `private/`.
fn valid_transport(name: &str) -> bool {
    !name.is_empty() && name != "." && name != ".." && !name.contains('/') && !name.contains('\0')
}

/// Asks the agent, one reply per request of `batch` (all for the same
/// transport; each but the last is flagged [`DeliveryRequest::MORE`]
/// here); never fails: trouble becomes deferred recipients.
pub fn deliver(
    tree: &QueueTree,
    timeout: Duration,
    batch: &mut [DeliveryRequest],
) -> Vec<DeliveryReply> {
    let last = batch.len().saturating_sub(1);
    for req in &mut batch[..last] {
        req.flags |= DeliveryRequest::MORE;
    }
    let batch = &*batch;
    let failed = |req: &DeliveryRequest, reason: &str| DeliveryReply {
        results: record::agent_failed(tree, req, reason),
        destination_failed: false,
    };
    let all_failed = |reason: &str| batch.iter().map(|r| failed(r, reason)).collect();
    let Some(first) = batch.first() else {
        return Vec::new();
    };
    let (id, transport) = (&first.queue_id, &first.transport);
    let path = tree.socket(true, transport);
    if !valid_transport(transport) {
        return all_failed("mail transport unavailable");
    }
    // The agent answers a batch at its end: the wait is `ipc_timeout`
    // per request.
    let wait = timeout.saturating_mul(batch.len().try_into().unwrap_or(u32::MAX));
    let mut conn = match ipc::connect(&path, wait) {
        Ok(c) => c,
        // No socket: the transport is not in master.cf.
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return all_failed("mail transport unavailable");
        }
        Err(e) => {
            warning!("{id}: {e}");
            return all_failed("delivery agent unavailable");
        }
    };
    for req in batch {
        if let Err(e) = ipc::send(&mut conn, req) {
            warning!(
                "{}: send request to transport {transport}: {e}",
                req.queue_id
            );
            return all_failed("delivery agent unavailable");
        }
    }
    let mut replies = Vec::with_capacity(batch.len());
    let mut answers = io::BufReader::with_capacity(8192, &conn);
    for req in batch {
        match ipc::recv::<_, DeliveryReply>(&mut answers) {
            Ok(reply) => replies.push(reply),
            Err(e) => {
                let what = match e.kind() {
                    io::ErrorKind::UnexpectedEof => "the agent went away".to_string(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => {
                        "timed out waiting for the agent".to_string()
                    }
                    _ => e.to_string(),
                };
                warning!("{}: transport {transport}: no reply: {what}", req.queue_id);
                // This request and those after it: the agent may have
                // finished some recipients (done marks), which the next
                // round skips; the rest are deferred here.
                let rest = &batch[replies.len()..];
                replies.extend(
                    rest.iter()
                        .map(|r| failed(r, "unknown mail transport error")),
                );
                break;
            }
        }
    }
    replies
}

/// Runs the request (a batch: each message's recipient indexes and its
/// request) on a thread of `pool` and calls `done` with the outcome.
/// Fails only when no thread can be started.
pub fn start(
    pool: &Pool,
    tree: QueueTree,
    timeout: Duration,
    destination: String,
    batch: Vec<(Vec<usize>, DeliveryRequest)>,
    done: impl FnOnce(Completion) + Send + 'static,
) -> io::Result<()> {
    pool.submit(move || {
        let (indexes, mut reqs): (Vec<Vec<usize>>, Vec<DeliveryRequest>) =
            batch.into_iter().unzip();
        let replies = deliver(&tree, timeout, &mut reqs);
        let destination_failed = replies.iter().any(|r| r.destination_failed);
        let transport = reqs
            .first()
            .map(|r| r.transport.clone())
            .unwrap_or_default();
        let parts = indexes
            .into_iter()
            .zip(reqs)
            .zip(replies)
            .map(|((indexes, req), reply)| Part {
                message: req.queue_id,
                indexes,
                results: reply.results,
            })
            .collect();
        done(Completion {
            transport,
            destination,
            parts,
            destination_failed,
        });
    })
    .map_err(|(e, _)| e)
}
