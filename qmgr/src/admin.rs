//! qmgr's administration socket, `private/qmgr-admin`
//! ([`ipc::QMGR_ADMIN_SOCKET`]): where postsuper asks for messages in
//! `active/` to be deleted, held or released, `postern queues` and its
//! siblings act on sites, and the status daemon asks for a read-only
//! snapshot ([`AdminRequest::Status`]). qmgr binds it itself
//! (mode 0600, owner `mail_owner`: root and `mail_owner` may connect).
//!
//! One thread accepts connections one at a time, reads one
//! [`AdminRequest`], hands it to the main thread as an [`Event::Admin`]
//! and sends back the `AdminReply`. The main thread alone touches the
//! active queue, so a request never races a delivery: a message with a
//! request in flight is acted on when that request returns.

use crate::event::Event;
use postern_common::ipc::{self, AdminRequest};
use postern_common::queue::QueueTree;
use postern_common::warning;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixListener;
use std::sync::mpsc::{channel, Sender};
use std::time::Duration;

/// How long a client may take to send its request, and the main thread
/// to answer it.
const TIMEOUT: Duration = Duration::from_secs(30);

/// Binds the socket and starts the thread. Without the socket qmgr still
/// works; postsuper then reports that it cannot reach qmgr.
pub fn listen(tree: &QueueTree, tx: Sender<Event>) {
    let path = tree.socket(true, ipc::QMGR_ADMIN_SOCKET);
    // qmgr runs as a single process (master.cf maxproc 1): a socket left
    // here is a previous qmgr's.
    let _ = std::fs::remove_file(&path);
    let listener = match UnixListener::bind(&path) {
        Ok(l) => l,
        Err(e) => {
            warning!("bind {}: {e}", path.display());
            return;
        }
    };
    let _ = std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600));
    let started = std::thread::Builder::new()
        .name("admin".into())
        .spawn(move || {
            for conn in listener.incoming() {
                let Ok(mut conn) = conn else { continue };
                let _ = conn.set_read_timeout(Some(TIMEOUT));
                let _ = conn.set_write_timeout(Some(TIMEOUT));
                let req: AdminRequest = match ipc::recv(&mut conn) {
                    Ok(r) => r,
                    Err(e) => {
                        warning!("admin request: {e}");
                        continue;
                    }
                };
                let (rtx, rrx) = channel();
                if tx.send(Event::Admin { req, reply: rtx }).is_err() {
                    return;
                }
                match rrx.recv_timeout(TIMEOUT) {
                    Ok(reply) => {
                        let _ = ipc::send(&mut conn, &reply);
                    }
                    Err(_) => warning!("admin request: no answer from the main thread"),
                }
            }
        });
    if let Err(e) = started {
        warning!("cannot start the admin thread: {e}");
    }
}
