//! The connections: each client's Open / Envelope / Content / Close
//! exchange, on a thread of its own, up to [`CONNECTIONS_PER_PROCESS`] at
//! once. A connection whose message was queued may carry the client's
//! next message (smtpd keeps it a while: `ipc::CLEANUP_IDLE`), unless
//! this process is leaving.

use crate::message::{Message, Settings};
use postern_common::ipc::{self, CleanupReply, CleanupRequest, Wakeup};
use postern_common::queue::QueueTree;
use postern_common::warning;
use postern_conf::Config;
use std::time::Duration;

/// How many clients one cleanup process serves at once. Every message in
/// flight from smtpd holds a cleanup connection; serving them from one
/// process's threads instead of a process each keeps a hundred concurrent
/// SMTP sessions to one or two cleanup processes (Postfix runs one per
/// message in flight).
pub const CONNECTIONS_PER_PROCESS: usize = 64;

pub fn run(cfg: &Config) -> ! {
    let settings = Settings::from_config(cfg);
    let tree = QueueTree::configured(postern_common::service::queue_directory(cfg), cfg);
    let timeout = Duration::from_secs(cfg.get_time("ipc_timeout").unwrap_or(3600));
    // One kept connection to qmgr for the wake-ups of all this process's
    // messages.
    let qmgr = std::sync::Arc::new(ipc::Waker::new(&tree.qmgr_socket()));
    // A connection carries at most max_use messages: serve_threaded counts
    // connections toward max_use, and a kept one could otherwise carry
    // every message a busy smtpd receives, and the process never renew.
    let per_connection = postern_common::service::max_use(cfg);
    postern_common::service::serve_threaded(
        cfg,
        CONNECTIONS_PER_PROCESS,
        move |conn| {
            let _ = conn.set_write_timeout(Some(timeout));
            // Requests are read through a buffer: a frame's length and body,
            // and often the next frame, in one read. Each wait is in poll
            // (see ipc::PolledReader), `ipc_timeout` at most.
            let polled = ipc::PolledReader::new(&conn, Some(timeout));
            let mut requests = std::io::BufReader::with_capacity(16 * 1024, polled);
            let mut messages = 0;
            // One message after another: smtpd keeps a connection whose
            // message is queued for its next message (ipc::CLEANUP_IDLE).
            loop {
                if messages > 0
                    && (messages >= per_connection || !next_request_comes(&mut requests, &conn))
                {
                    return;
                }
                match ipc::recv::<_, CleanupRequest>(&mut requests) {
                    Ok(CleanupRequest::Open) => {}
                    Ok(other) => {
                        warning!("unexpected request before Open: {other:?}");
                        return;
                    }
                    Err(_) => return,
                }
                if messages > 0 && postern_common::service::leaving() {
                    // Drained (postern reload) or worn out: this process
                    // makes no more files. The connection closes before
                    // any answer, and smtpd sends the Open again on a new
                    // one, which a fresh process takes (with the new
                    // configuration, and the accounting file reopened).
                    return;
                }
                messages += 1;
                if !one_message(&settings, &tree, &qmgr, &mut requests, &conn) {
                    return;
                }
            }
        },
        || {},
    )
}

/// How often a kept connection's wait for the next request looks
/// whether the process is leaving.
const LEAVING_CHECK: Duration = Duration::from_millis(100);

/// Waits, on a kept connection, for the first byte of the client's next
/// request: at most [`ipc::CLEANUP_IDLE`], and no longer once the process
/// is leaving. True if it came. The wait polls the socket in steps of
/// [`LEAVING_CHECK`]; the waits within a message are `requests`' own
/// (`ipc_timeout` each).
fn next_request_comes(
    requests: &mut std::io::BufReader<ipc::PolledReader<'_>>,
    conn: &std::os::unix::net::UnixStream,
) -> bool {
    use nix::poll::{PollFd, PollFlags, PollTimeout};
    use std::io::BufRead;
    use std::os::fd::AsFd;
    if !requests.buffer().is_empty() {
        return true;
    }
    let check = PollTimeout::try_from(LEAVING_CHECK).unwrap_or(PollTimeout::MAX);
    let since = std::time::Instant::now();
    loop {
        if postern_common::service::leaving() {
            return false;
        }
        let mut fds = [PollFd::new(conn.as_fd(), PollFlags::POLLIN)];
        match nix::poll::poll(&mut fds, check) {
            // Readable, or closed (then nothing is read: false).
            Ok(n) if n > 0 => return requests.fill_buf().is_ok_and(|b| !b.is_empty()),
            Ok(_) | Err(nix::errno::Errno::EINTR) if since.elapsed() < ipc::CLEANUP_IDLE => {}
            _ => return false,
        }
    }
}

/// One message, its Open read: the queue file, the envelope and content
/// into it, the reply. True if the connection may carry another.
fn one_message(
    settings: &Settings,
    tree: &QueueTree,
    qmgr: &ipc::Waker,
    requests: &mut impl std::io::Read,
    mut conn: &std::os::unix::net::UnixStream,
) -> bool {
    let mut msg = match Message::create(settings, tree) {
        Ok(m) => m,
        Err(r) => {
            warning!("message not queued: {}", r.reason);
            let _ = ipc::send(&mut conn, &r.reply());
            return false;
        }
    };
    if ipc::send(
        &mut conn,
        &CleanupReply::Opened {
            queue_id: msg.id.clone(),
        },
    )
    .is_err()
    {
        msg.discard();
        return false;
    }
    // smtpd opens at the first RCPT TO: the envelope comes with
    // DATA, a client round trip or more later. The new name's fsync runs
    // meanwhile, on this thread.
    msg.sync_name();
    match ipc::recv::<_, CleanupRequest>(requests) {
        Ok(CleanupRequest::Envelope(new)) => msg.envelope(new),
        Ok(CleanupRequest::Abort) | Err(_) => {
            msg.discard();
            return false;
        }
        Ok(other) => {
            warning!("{}: expected the envelope, got {other:?}", msg.id);
            msg.discard();
            return false;
        }
    }
    let origin = msg.origin().to_string();
    loop {
        match ipc::recv::<_, CleanupRequest>(requests) {
            Ok(CleanupRequest::Content(data)) => msg.content(&data),
            Ok(CleanupRequest::Close) => break,
            Ok(CleanupRequest::Abort) | Err(_) => {
                // The client gave up or vanished: it was never told the
                // message is queued, so nothing may stay behind.
                msg.discard();
                return false;
            }
            Ok(other @ (CleanupRequest::Open | CleanupRequest::Envelope(_))) => {
                warning!("{}: unexpected {other:?}", msg.id);
                msg.discard();
                return false;
            }
        }
    }
    let id = msg.id.clone();
    let reply = match msg.close() {
        Ok(id) => CleanupReply::Queued { queue_id: id },
        Err(r) => {
            warning!("{id}: {}: message not queued: {}", origin, r.reason);
            r.reply()
        }
    };
    let queued = matches!(reply, CleanupReply::Queued { .. });
    let told = ipc::send(&mut conn, &reply).is_ok();
    if queued && !told {
        // The client is gone before it heard "queued", so nobody told
        // the sender 250: withdraw the message rather than deliver
        // mail its sender believes failed. If qmgr already took it,
        // it is delivered (a duplicate at worst, never a loss).
        let path = tree.path(postern_common::queue::Queue::Incoming, &id);
        if std::fs::remove_file(&path).is_ok() {
            warning!("{id}: client went away before the reply; message withdrawn");
            return false;
        }
    }
    if queued {
        // From here on a client that vanished was told the message is
        // queued: it will be delivered.
        let _ = qmgr.wake(&[Wakeup::Incoming]);
    }
    queued && told
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::unix::net::UnixStream;
    use std::time::Instant;

    /// A kept connection's next request is taken when it comes; once the
    /// process is leaving (a drain, max_use), the wait ends within
    /// LEAVING_CHECK instead of CLEANUP_IDLE.
    #[test]
    fn a_kept_connection_waits_for_the_next_request_until_the_process_leaves() {
        let (ours, mut client) = UnixStream::pair().unwrap();
        let mut requests = std::io::BufReader::new(ipc::PolledReader::new(&ours, None));
        client.write_all(b"\x01\x00\x00\x00\x00").unwrap();
        assert!(next_request_comes(&mut requests, &ours));
        assert!(matches!(
            ipc::recv::<_, CleanupRequest>(&mut requests),
            Ok(CleanupRequest::Open)
        ));
        // A client that closes its kept connection ends the wait at once.
        let (closed, client_gone) = UnixStream::pair().unwrap();
        drop(client_gone);
        let t = Instant::now();
        let mut gone = std::io::BufReader::new(ipc::PolledReader::new(&closed, None));
        assert!(!next_request_comes(&mut gone, &closed));
        assert!(t.elapsed() < ipc::CLEANUP_IDLE / 2, "{:?}", t.elapsed());
        // Nothing comes, and the process starts leaving (the flag is
        // this test process's; no other test of this crate reads it).
        postern_common::service::leave();
        let t = Instant::now();
        assert!(!next_request_comes(&mut requests, &ours));
        assert!(t.elapsed() < ipc::CLEANUP_IDLE / 2, "{:?}", t.elapsed());
    }
}
