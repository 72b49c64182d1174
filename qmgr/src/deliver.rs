//! Dispatching a delivery request: one thread per request in flight, which
//! connects to the transport's socket `private/TRANSPORT`, sends the
//! [`DeliveryRequest`], waits for the [`DeliveryReply`] and hands the
//! outcome back to the main thread.
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

/// What became of one dispatched request.
#[derive(Debug)]
pub struct Completion {
    pub message: String,
    pub transport: String,
    /// The scheduler's destination key.
    pub destination: String,
    /// The recipients' indexes in the message's envelope.
    pub indexes: Vec<usize>,
    pub results: Vec<RecipientResult>,
    /// The next hop could not be reached at all (for the scheduler).
    pub destination_failed: bool,
}

/// A name usable as a socket in `private/`.
fn valid_transport(name: &str) -> bool {
    !name.is_empty() && name != "." && name != ".." && !name.contains('/') && !name.contains('\0')
}

/// Asks the agent; never fails: trouble becomes deferred recipients.
pub fn deliver(tree: &QueueTree, timeout: Duration, req: &DeliveryRequest) -> DeliveryReply {
    let failed = |reason: &str| DeliveryReply {
        results: record::agent_failed(tree, req, reason),
        destination_failed: false,
    };
    let path = tree.socket(true, &req.transport);
    if !valid_transport(&req.transport) || !path.exists() {
        return failed("mail transport unavailable");
    }
    let mut conn = match ipc::connect(&path, timeout) {
        Ok(c) => c,
        Err(e) => {
            warning!("{}: {e}", req.queue_id);
            return failed("delivery agent unavailable");
        }
    };
    if let Err(e) = ipc::send(&mut conn, req) {
        warning!(
            "{}: send request to transport {}: {e}",
            req.queue_id,
            req.transport
        );
        return failed("delivery agent unavailable");
    }
    match ipc::recv::<_, DeliveryReply>(&mut conn) {
        Ok(reply) => reply,
        Err(e) => {
            let what = match e.kind() {
                io::ErrorKind::UnexpectedEof => "the agent went away".to_string(),
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => {
                    "timed out waiting for the agent".to_string()
                }
                _ => e.to_string(),
            };
            warning!(
                "{}: transport {}: no reply: {what}",
                req.queue_id,
                req.transport
            );
            failed("unknown mail transport error")
        }
    }
}

/// Runs the request on a thread of `pool` and calls `done` with the
/// outcome. Fails only when no thread can be started.
pub fn start(
    pool: &Pool,
    tree: QueueTree,
    timeout: Duration,
    destination: String,
    indexes: Vec<usize>,
    req: DeliveryRequest,
    done: impl FnOnce(Completion) + Send + 'static,
) -> io::Result<()> {
    pool.submit(move || {
        let reply = deliver(&tree, timeout, &req);
        done(Completion {
            message: req.queue_id,
            transport: req.transport,
            destination,
            indexes,
            results: reply.results,
            destination_failed: reply.destination_failed,
        });
    })
    .map_err(|(e, _)| e)
}
