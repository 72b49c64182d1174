//! Dispatching a delivery request: one pooled thread per request in
//! flight, which connects to the transport's socket `private/TRANSPORT`,
//! sends the [`DeliveryRequest`] (or a batch of them for one destination,
//! flagged [`DeliveryRequest::MORE`]), waits for one [`DeliveryReply`] per
//! request and hands the outcome back to the main thread. A connection
//! whose replies all came, saying that the agent reads another request
//! on it ([`DeliveryReply::serves_more`]: smtp and lmtp,
//! [`postern_common::delivery::serve_concurrently`]), is kept for the next
//! request to the transport, for [`AGENT_REUSE_WITHIN`]: no connect,
//! accept or thread hand-off for it.
//!
//! The agent records every recipient (log line, defer or bounce log, done
//! mark) before it answers. When there is no agent to ask (no socket: the
//! transport is not in master.cf), or it cannot be reached, or it goes away
//! without an answer, the agent recorded nothing for the recipients it did
//! not finish, so qmgr defers and records them itself
//! ([`record::agent_failed`]).

use crate::record;
use postern_common::delivery::AGENT_REUSE_WITHIN;
use postern_common::ipc::{self, DeliveryReply, DeliveryRequest, RecipientResult};
use postern_common::pool::Pool;
use postern_common::queue::QueueTree;
use postern_common::warning;
use std::io;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// An agent's connection kept for the next request to its transport.
struct Kept {
    path: PathBuf,
    conn: UnixStream,
    /// The time limit set on it.
    wait: Duration,
    /// When its last reply came.
    since: Instant,
}

/// The connections kept, at most [`KEPT_MAX`].
static KEPT: Mutex<Vec<Kept>> = Mutex::new(Vec::new());
const KEPT_MAX: usize = 256;

/// A kept connection to the agent at `path`, young enough and still open
/// at the agent's end.
fn kept(path: &Path) -> Option<(UnixStream, Duration)> {
    loop {
        let k = {
            let mut kept = KEPT.lock().unwrap_or_else(|e| e.into_inner());
            kept.retain(|k| k.since.elapsed() < AGENT_REUSE_WITHIN);
            let i = kept.iter().rposition(|k| k.path == path)?;
            kept.swap_remove(i)
        };
        // Looked at without the lock: the other delivery threads need it
        // for their own connections meanwhile.
        if !ipc::peer_gone(&k.conn) {
            return Some((k.conn, k.wait));
        }
    }
}

/// Keeps `conn`, every reply of its last request in, for the next request.
fn keep(path: PathBuf, conn: UnixStream, wait: Duration) {
    let mut kept = KEPT.lock().unwrap_or_else(|e| e.into_inner());
    if kept.len() >= KEPT_MAX {
        kept.remove(0);
    }
    kept.push(Kept {
        path,
        conn,
        wait,
        since: Instant::now(),
    });
}

/// Sends every request of `batch` on `conn`.
fn send_batch(conn: &mut UnixStream, batch: &[DeliveryRequest]) -> Result<(), (String, io::Error)> {
    for req in batch {
        ipc::send(&mut *conn, req).map_err(|e| (req.queue_id.clone(), e))?;
    }
    Ok(())
}

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
        serves_more: false,
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
    // A kept connection first. Its agent said it reads another batch, so
    // a send fails only if the agent died meanwhile: nothing of the batch
    // was read, and a new connection takes it.
    let mut sent = None;
    if let Some((mut conn, set)) = kept(&path) {
        let limits = if set == wait {
            Ok(())
        } else {
            conn.set_read_timeout(Some(wait))
                .and_then(|_| conn.set_write_timeout(Some(wait)))
        };
        if limits.is_ok() && send_batch(&mut conn, batch).is_ok() {
            sent = Some(conn);
        }
    }
    let conn = match sent {
        Some(c) => c,
        None => {
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
            if let Err((qid, e)) = send_batch(&mut conn, batch) {
                warning!("{qid}: send request to transport {transport}: {e}");
                return all_failed("delivery agent unavailable");
            }
            conn
        }
    };
    let mut replies = Vec::with_capacity(batch.len());
    // Waited for in poll: see ipc::PolledReader.
    let mut answers = io::BufReader::with_capacity(8192, ipc::PolledReader::new(&conn, Some(wait)));
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
                return replies;
            }
        }
    }
    drop(answers);
    if replies.last().is_some_and(|r| r.serves_more) {
        keep(path, conn, wait);
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixListener;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    fn request(id: &str, transport: &str) -> DeliveryRequest {
        DeliveryRequest {
            queue: "active".into(),
            queue_id: id.into(),
            transport: transport.into(),
            nexthop: "h".into(),
            ..Default::default()
        }
    }

    /// An agent on `private/NAME` that answers every request (no
    /// recipients: an empty reply), `per_connection` of them on each
    /// connection (0: until qmgr closes it, saying so in its replies);
    /// counts its accepts.
    fn agent(tree: &QueueTree, name: &str, per_connection: usize) -> Arc<AtomicUsize> {
        let l = UnixListener::bind(tree.socket(true, name)).unwrap();
        let accepts = Arc::new(AtomicUsize::new(0));
        let counted = accepts.clone();
        std::thread::spawn(move || {
            for conn in l.incoming() {
                let Ok(mut conn) = conn else { return };
                counted.fetch_add(1, Ordering::SeqCst);
                let mut served = 0;
                while let Ok(_req) = ipc::recv::<_, DeliveryRequest>(&mut conn) {
                    let reply = DeliveryReply {
                        results: Vec::new(),
                        destination_failed: false,
                        serves_more: per_connection == 0,
                    };
                    if ipc::send(&mut conn, &reply).is_err() {
                        break;
                    }
                    served += 1;
                    if served == per_connection {
                        break;
                    }
                }
            }
        });
        accepts
    }

    #[test]
    fn a_connection_is_kept_for_the_next_request_when_the_agent_serves_more() {
        let root = std::env::temp_dir().join(format!("qmgr-kept-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let tree = QueueTree::new(&root);
        tree.create_dirs(None, None).unwrap();
        let timeout = Duration::from_secs(10);
        // smtp's way: requests one after another on one connection.
        let kept_open = agent(&tree, "keeps", 0);
        for i in 0..3 {
            let replies = deliver(&tree, timeout, &mut [request(&format!("K{i}"), "keeps")]);
            assert_eq!(replies.len(), 1);
        }
        assert_eq!(
            kept_open.load(Ordering::SeqCst),
            1,
            "one connection for three requests"
        );
        // local's way: one request per connection, which its replies
        // say: nothing is kept, every request has a connection of its own.
        let one_each = agent(&tree, "closes", 1);
        for i in 0..3 {
            let replies = deliver(&tree, timeout, &mut [request(&format!("C{i}"), "closes")]);
            assert_eq!(replies.len(), 1);
            assert!(replies[0].results.is_empty(), "{:?}", replies[0].results);
        }
        assert_eq!(one_each.load(Ordering::SeqCst), 3);
        // Past AGENT_REUSE_WITHIN a kept connection is not used.
        std::thread::sleep(AGENT_REUSE_WITHIN + Duration::from_millis(100));
        deliver(&tree, timeout, &mut [request("K3", "keeps")]);
        assert_eq!(kept_open.load(Ordering::SeqCst), 2);
        let _ = std::fs::remove_dir_all(&root);
    }
}
