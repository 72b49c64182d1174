//! The client side of smtpd → cleanup: a Unix connection to
//! `queue_directory/public/cleanup` per message in flight, non-blocking
//! on the event loop of [`crate::server`]. A connection whose message
//! was queued goes to the process's [`CleanupPool`] and carries the next
//! message of any session, within `ipc::CLEANUP_REUSE_WITHIN`: no
//! connect, and no accept or thread hand-off in cleanup.
//!
//! The session asks for it with [`CleanupRequest::Open`] (at the first
//! accepted RCPT TO); the envelope and content follow as requests, framed
//! as `common/src/ipc.rs` frames, and cleanup answers `Opened`, then
//! `Queued` or `Failed` after the final dot. When cleanup's backlog is
//! full the Open waits (`PendingOpen`) and is tried again every
//! `CONNECT_RETRY`, up to the smaller of `ipc_timeout` and
//! `smtpd_timeout`.

use crate::outbuf::OutBuf;
use crate::session::Session;
use crate::settings::Settings;
use mio::event::Source;
use mio::net::UnixStream;
use mio::{Interest, Registry, Token};
use postern_common::ipc::{self, CleanupReply, CleanupRequest};
use postern_common::poll::WriteInterest;
use postern_common::warning;
use std::io::{self, Read};
use std::time::{Duration, Instant};

/// Wait before trying again to connect to a cleanup whose backlog is full.
pub(crate) const CONNECT_RETRY: Duration = Duration::from_millis(100);

/// The most connections a process keeps for its next messages.
const POOL_MAX: usize = 16;

/// Connections to cleanup whose last message was queued, kept for the
/// next message of any session of this process.
#[derive(Default)]
pub(crate) struct CleanupPool {
    idle: Vec<(UnixStream, Instant)>,
}

impl CleanupPool {
    /// A kept connection, young enough and still open at cleanup's end.
    fn take(&mut self) -> Option<UnixStream> {
        self.idle
            .retain(|(_, since)| since.elapsed() < ipc::CLEANUP_REUSE_WITHIN);
        while let Some((sock, _)) = self.idle.pop() {
            if !ipc::peer_gone(&sock) {
                return Some(sock);
            }
        }
        None
    }

    /// Keeps a connection (deregistered) for the next message.
    fn put(&mut self, sock: UnixStream) {
        self.idle
            .retain(|(_, since)| since.elapsed() < ipc::CLEANUP_REUSE_WITHIN);
        if self.idle.len() < POOL_MAX {
            self.idle.push((sock, Instant::now()));
        }
    }
}

/// The connection to cleanup for the message being received.
pub(crate) struct CleanupConn {
    pub(crate) sock: UnixStream,
    pub(crate) out: OutBuf,
    inbuf: Vec<u8>,
    pub(crate) readable: bool,
    /// WRITABLE only while output waits for room (see [`WriteInterest`]).
    writable: WriteInterest,
    token: Token,
    /// The envelope is queued and held back until content follows (or
    /// Close, or Abort): cleanup gets both in one read. DATA's envelope
    /// sent alone cost cleanup a wake-up per message, a client round
    /// trip before the content.
    holding_envelope: bool,
    /// Abort sent: flush it and close; cleanup's answers no longer matter.
    pub(crate) closing: bool,
    pub(crate) last_io: Instant,
    /// Taken from the pool, and cleanup has not answered on it yet: the
    /// Open, kept here, goes again on a new connection if this one turns
    /// out closed (cleanup left between its last reply and our Open).
    reused_open: Option<Vec<u8>>,
}

impl CleanupConn {
    fn new(sock: UnixStream, token: Token, open: Vec<u8>, reused: bool) -> CleanupConn {
        let mut out = OutBuf::default();
        out.push(&open);
        CleanupConn {
            sock,
            out,
            inbuf: Vec::new(),
            readable: true,
            writable: WriteInterest::default(),
            token,
            holding_envelope: false,
            closing: false,
            last_io: Instant::now(),
            reused_open: reused.then_some(open),
        }
    }
}

/// An Open that could not connect yet (cleanup's backlog was full).
pub(crate) struct PendingOpen {
    frame: Vec<u8>,
    since: Instant,
    next_try: Instant,
}

/// One session's side of cleanup: the connection, or the Open waiting
/// to connect.
#[derive(Default)]
pub(crate) struct CleanupLink {
    pub(crate) conn: Option<CleanupConn>,
    pub(crate) pending_open: Option<PendingOpen>,
}

impl CleanupLink {
    /// Drops the connection (deregistering it).
    pub(crate) fn drop_conn(&mut self, registry: &Registry) {
        if let Some(mut c) = self.conn.take() {
            let _ = c.sock.deregister(registry);
        }
    }

    /// Requests wait to be written to cleanup (not held back on purpose):
    /// the session waits on cleanup, under `ipc_timeout`.
    pub(crate) fn sending(&self) -> bool {
        self.conn
            .as_ref()
            .is_some_and(|c| !c.closing && !c.holding_envelope && c.out.pending() > 0)
    }

    /// Our content waiting for cleanup is at least `high` bytes.
    pub(crate) fn backed_up(&self, high: usize) -> bool {
        self.conn.as_ref().is_some_and(|c| c.out.pending() >= high)
    }

    /// Queues the session's requests for cleanup (connecting at Open),
    /// and retries a pending Open when its time has come; true if
    /// anything moved.
    pub(crate) fn send_requests(
        &mut self,
        session: &mut Session,
        token: Token,
        registry: &Registry,
        cfg: &Settings,
        pool: &mut CleanupPool,
    ) -> bool {
        let mut progress = false;
        for req in session.take_requests() {
            progress = true;
            match req {
                CleanupRequest::Open => {
                    self.drop_conn(registry);
                    self.pending_open = None;
                    let now = Instant::now();
                    self.connect(session, token, registry, cfg, frame(&req), now, Some(pool));
                }
                CleanupRequest::Abort => {
                    self.pending_open = None;
                    if let Some(c) = &mut self.conn {
                        c.out.push(&frame(&req));
                        c.holding_envelope = false;
                        c.closing = true;
                    }
                }
                _ => {
                    if let Some(c) = &mut self.conn {
                        if !c.closing {
                            c.out.push(&frame(&req));
                            c.holding_envelope = matches!(req, CleanupRequest::Envelope(_));
                        }
                    }
                }
            }
        }
        if let Some(p) = self.pending_open.take() {
            if Instant::now() >= p.next_try {
                progress = true;
                self.connect(session, token, registry, cfg, p.frame, p.since, Some(pool));
            } else {
                self.pending_open = Some(p);
            }
        }
        progress
    }

    /// Writes what is queued, reads what cleanup sent, hands whole
    /// replies to the session and tells it of a lost connection;
    /// `last_io` is the session's, renewed when cleanup answers. True if
    /// anything moved.
    pub(crate) fn exchange(
        &mut self,
        session: &mut Session,
        registry: &Registry,
        cfg: &Settings,
        buf: &mut [u8],
        last_io: &mut Instant,
        pool: &mut CleanupPool,
    ) -> bool {
        let mut progress = false;
        let (finished, mut lost) = match &mut self.conn {
            Some(c) => {
                let moved = c.transfer(cfg, buf);
                match c.interest_fits(registry) {
                    Err(e) if !moved.1 => {
                        warning!(
                            "reregister connection to {}: {e}",
                            cfg.cleanup_socket.display()
                        );
                        (moved.0, true)
                    }
                    _ => moved,
                }
            }
            None => (false, false),
        };
        // Deliver whole replies, even when the connection closed after them.
        while let Some(c) = &mut self.conn {
            match next_reply(&mut c.inbuf) {
                Ok(Some(reply)) => {
                    progress = true;
                    c.reused_open = None;
                    let last = matches!(
                        reply,
                        CleanupReply::Queued { .. } | CleanupReply::Failed { .. }
                    );
                    if last {
                        let queued = matches!(reply, CleanupReply::Queued { .. });
                        self.finish_conn(registry, queued && !lost, pool);
                        lost = false;
                    }
                    session.cleanup_reply(reply);
                    *last_io = Instant::now();
                }
                Ok(None) => break,
                Err(e) => {
                    warning!("read from {}: {e}", cfg.cleanup_socket.display());
                    lost = true;
                    break;
                }
            }
        }
        if lost && !finished {
            // A kept connection that cleanup closed before it answered our
            // Open: the Open goes again, on a new connection.
            let again = self
                .conn
                .as_mut()
                .filter(|c| !c.closing)
                .and_then(|c| c.reused_open.take().map(|f| (f, c.token)));
            if let Some((open, token)) = again {
                self.drop_conn(registry);
                self.connect(session, token, registry, cfg, open, Instant::now(), None);
                return true;
            }
        }
        if finished || lost {
            let closing = self.conn.as_ref().is_none_or(|c| c.closing);
            if self.conn.is_some() {
                self.drop_conn(registry);
                progress = true;
                // A reply just handed over may have let the session go on
                // (pipelined RSET, MAIL, RCPT): the loss is then of a
                // connection it has given up, not of the one it asks for.
                if lost && !closing && !session.gave_up_cleanup() {
                    session.cleanup_lost();
                    *last_io = Instant::now();
                }
            }
        }
        progress
    }

    /// The message's reply came: the connection goes to the pool when
    /// the message was queued and nothing else is on it, else it closes.
    fn finish_conn(&mut self, registry: &Registry, queued: bool, pool: &mut CleanupPool) {
        let Some(mut c) = self.conn.take() else {
            return;
        };
        let _ = c.sock.deregister(registry);
        if queued && !c.closing && c.out.pending() == 0 && c.inbuf.is_empty() {
            pool.put(c.sock);
        }
    }

    /// Connects for `frame` (an Open): a kept connection from `pool` if
    /// there is one, else a new one.
    #[allow(clippy::too_many_arguments)]
    fn connect(
        &mut self,
        session: &mut Session,
        token: Token,
        registry: &Registry,
        cfg: &Settings,
        frame: Vec<u8>,
        since: Instant,
        pool: Option<&mut CleanupPool>,
    ) {
        if let Some(mut sock) = pool.and_then(|p| p.take()) {
            if registry
                .register(&mut sock, token, Interest::READABLE)
                .is_ok()
            {
                self.conn = Some(CleanupConn::new(sock, token, frame, true));
                return;
            }
        }
        let path = &cfg.cleanup_socket;
        match UnixStream::connect(path) {
            Ok(mut sock) => {
                // WRITABLE only when a write is held up
                // (CleanupConn::interest_fits).
                if let Err(e) = registry.register(&mut sock, token, Interest::READABLE) {
                    warning!("register connection to {}: {e}", path.display());
                    session.cleanup_lost();
                    return;
                }
                self.conn = Some(CleanupConn::new(sock, token, frame, false));
            }
            Err(e)
                if e.kind() == io::ErrorKind::WouldBlock
                    && since.elapsed() < cfg.ipc_timeout.min(cfg.timeout) =>
            {
                // cleanup's backlog is full: master is starting more of them.
                // The client waits for its reply at most smtpd_timeout.
                self.pending_open = Some(PendingOpen {
                    frame,
                    since,
                    next_try: Instant::now() + CONNECT_RETRY,
                });
            }
            Err(e) => {
                warning!("connect to {}: {e}", path.display());
                session.cleanup_lost();
            }
        }
    }
}

impl CleanupConn {
    /// Registers for WRITABLE while output is left over (the socket was
    /// full; not while the envelope is held back), and drops it once all
    /// went.
    fn interest_fits(&mut self, registry: &Registry) -> io::Result<()> {
        let pending = self.out.pending() > 0 && !self.holding_envelope;
        self.writable
            .fit(registry, &mut self.sock, self.token, pending)
    }

    /// Writes until done or the socket is full, then (unless closing
    /// with nothing left to send) reads until it would block; returns
    /// (finished: an Abort went out in full, lost: the connection failed
    /// or closed).
    fn transfer(&mut self, cfg: &Settings, buf: &mut [u8]) -> (bool, bool) {
        let written = if self.holding_envelope {
            Ok(0)
        } else {
            self.out.write_to(&mut self.sock)
        };
        match written {
            Ok(n) if n > 0 => self.last_io = Instant::now(),
            Ok(_) => {}
            Err(e) => {
                if !self.closing {
                    warning!("write to {}: {e}", cfg.cleanup_socket.display());
                }
                return (false, true);
            }
        }
        if self.closing && self.out.pending() == 0 {
            return (true, false);
        }
        if !self.readable {
            return (false, false);
        }
        loop {
            match self.sock.read(buf) {
                Ok(0) => return (false, true),
                Ok(n) => {
                    self.last_io = Instant::now();
                    if !self.closing {
                        self.inbuf.extend_from_slice(&buf[..n]);
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.readable = false;
                    return (false, false);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return (false, true),
            }
        }
    }
}

/// Encodes one request as a frame.
fn frame(req: &CleanupRequest) -> Vec<u8> {
    let mut v = Vec::new();
    // Writing into a Vec cannot fail, and our messages always encode.
    let _ = ipc::send(&mut v, req);
    v
}

/// Takes one whole reply frame off the front of `inbuf`, if there is one.
fn next_reply(inbuf: &mut Vec<u8>) -> io::Result<Option<CleanupReply>> {
    let Some((reply, used)) = ipc::take_frame(inbuf, ipc::MAX_MESSAGE)? else {
        return Ok(None);
    };
    inbuf.drain(..used);
    Ok(Some(reply))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_in_pieces() {
        let mut bytes = Vec::new();
        for r in [
            CleanupReply::Opened {
                queue_id: "ABC".into(),
            },
            CleanupReply::Queued {
                queue_id: "ABC".into(),
            },
        ] {
            ipc::send(&mut bytes, &r).unwrap();
        }
        let mut inbuf = Vec::new();
        let mut got = Vec::new();
        for b in bytes {
            inbuf.push(b);
            while let Some(r) = next_reply(&mut inbuf).unwrap() {
                got.push(r);
            }
        }
        assert_eq!(
            got,
            [
                CleanupReply::Opened {
                    queue_id: "ABC".into()
                },
                CleanupReply::Queued {
                    queue_id: "ABC".into()
                }
            ]
        );
        assert!(inbuf.is_empty());
        let mut huge = (ipc::MAX_MESSAGE + 1).to_le_bytes().to_vec();
        assert!(next_reply(&mut huge).is_err());
        // Requests encode as ipc frames.
        let f = frame(&CleanupRequest::Close);
        let mut r = &f[..];
        assert!(matches!(
            ipc::recv::<_, CleanupRequest>(&mut r).unwrap(),
            CleanupRequest::Close
        ));
    }
}
