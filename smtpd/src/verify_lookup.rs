//! Asking the verify(8) service for `reject_unverified_recipient` and
//! `reject_unverified_sender`, off the event loop.
//!
//! Postfix's smtpd asks the service and, while the answer is "in
//! progress", asks again up to `address_verify_poll_count` times,
//! `address_verify_poll_delay` apart, sleeping in between: one Postfix
//! smtpd serves one client. Postern's smtpd serves many clients in one
//! loop, so the poll ([`postern_common::verify::poll`]) runs in a thread
//! of its own per query, and its answer comes back as a
//! [`crate::dns::Answer::Verify`] through the DNS answers' channel: the
//! session waits for it as it waits for a DNS answer (taking no input),
//! and runs the command again when it is in.

use crate::dns::{Answer, Query};
use postern_common::queue::QueueTree;
use postern_common::warning;
use postern_conf::Config;
use std::path::PathBuf;
use std::sync::mpsc::Sender;
use std::sync::Arc;
use std::time::Duration;

/// Where the verify service is and how it is polled.
#[derive(Debug, Clone)]
pub struct VerifyLookup {
    /// `private/verify` under the queue directory.
    pub socket: PathBuf,
    /// `address_verify_poll_count` (at least one query).
    pub poll_count: u64,
    /// `address_verify_poll_delay`.
    pub poll_delay: Duration,
    /// How long one exchange with the service may take (`ipc_timeout`).
    pub timeout: Duration,
}

impl VerifyLookup {
    pub fn from_config(cfg: &Config) -> Result<VerifyLookup, String> {
        let e = |e: postern_conf::ConfError| e.to_string();
        Ok(VerifyLookup {
            socket: QueueTree::new(postern_common::service::queue_directory(cfg))
                .socket(true, postern_common::verify::SOCKET),
            poll_count: cfg.get_u64("address_verify_poll_count").map_err(e)?,
            poll_delay: Duration::from_secs(cfg.get_time("address_verify_poll_delay").map_err(e)?),
            timeout: Duration::from_secs(cfg.get_time("ipc_timeout").map_err(e)?.max(1)),
        })
    }

    /// Polls the service for `address` in a new thread; the answer goes
    /// to `done` for session `slot`, and `waker` wakes the loop.
    pub fn submit(
        &self,
        slot: usize,
        address: String,
        done: Sender<(usize, Query, Answer)>,
        waker: Arc<mio::Waker>,
    ) {
        let me = self.clone();
        let (done2, waker2, address2) = (done.clone(), waker.clone(), address.clone());
        let started = std::thread::Builder::new()
            .name("verify".into())
            .spawn(move || {
                let answer = me.ask(&address);
                let _ = done.send((slot, Query::Verify(address), Answer::Verify(answer)));
                let _ = waker.wake();
            });
        if let Err(e) = started {
            warning!("cannot start a verify thread: {e}");
            let answer = Answer::Verify(Err(e.to_string()));
            let _ = done2.send((slot, Query::Verify(address2), answer));
            let _ = waker2.wake();
        }
    }

    /// Postfix's poll; a service that cannot answer is logged as
    /// Postfix's "verify service failure".
    pub fn ask(&self, address: &str) -> Result<(postern_common::verify::Status, String), String> {
        let answer = postern_common::verify::poll(
            &self.socket,
            address,
            self.poll_count,
            self.poll_delay,
            self.timeout,
        );
        if let Err(e) = &answer {
            warning!("{} service failure", postern_common::verify::SOCKET);
            postern_common::info!("verify service {}: {e}", self.socket.display());
        }
        answer
    }
}
