//! The event loop: one process serves many SMTP sessions on mio.
//!
//! The listeners are the TCP sockets master passed (fd 3, and fd 5 and up
//! when the service listens on several addresses), or the Unix socket of
//! a `pass` service, where postscreen hands over its clients
//! ([`crate::listener`]). Each session
//! has its client socket and, from the first accepted RCPT TO (when the
//! queue file is opened) until cleanup's answer to the final dot, a Unix
//! socket to `queue_directory/public/cleanup`; both are registered in
//! the same poll ([`crate::cleanup_conn`]), so nothing ever blocks waiting for cleanup. mio is
//! edge-triggered: a socket is read until it would block, unless the
//! session does not want input (it waits for cleanup) or the output
//! side is backed up (back-pressure: a slow cleanup slows the client
//! down instead of filling memory); a flag remembers that there may be
//! more to read.
//!
//! The process reports busy to master when it holds
//! `smtpd_client_session_limit` sessions (and stops accepting), available
//! when below; also when accept() fails for want of descriptors (EMFILE,
//! ENFILE): the connection waits in the kernel's queue, master gives it
//! to another smtpd, and this one tries accepting again when a session
//! ends or a second later, never spinning on the readable listener. It
//! exits after `max_idle` without any session. Timeouts
//! (`smtpd_timeout` for the client, `ipc_timeout` for cleanup) are
//! checked about once a second.

use crate::anvil::Anvil;
use crate::cleanup_conn::{CleanupLink, CleanupPool, CONNECT_RETRY};
use crate::dns::Dns;
use crate::listener::Listener;
use crate::outbuf::OutBuf;
use crate::proxy::{Event as ProxyEvent, ProxyLink, Request as ProxyRequest};
use crate::sasl::{AuthConn, Delivery};
use crate::session::{Client, Session};
use crate::settings::Settings;
use crate::tls::{ReadOutcome, TlsConn};
use mio::net::{TcpStream, UnixStream};
use mio::{Events, Interest, Poll, Registry, Token};
use postern_common::ipc;
use postern_common::queue::QueueTree;
use postern_common::service::Status;
use postern_common::{fatal, info, warning};
use std::cell::RefCell;
use std::io::{self, Read, Write};
use std::ops::ControlFlow;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The first listener; further ones count down from below `DNS_WAKE`.
const LISTENER: Token = Token(0);
/// Most listeners one process serves.
const MAX_LISTENERS: usize = 64;

fn listener_token(i: usize) -> Token {
    if i == 0 {
        LISTENER
    } else {
        Token(usize::MAX - 1 - i)
    }
}

fn is_listener(t: Token) -> bool {
    t == LISTENER || (t.0 < DNS_WAKE.0 && t.0 >= usize::MAX - 1 - MAX_LISTENERS)
}
/// The connection to the SASL auth server (one per process).
const AUTH: Token = Token(usize::MAX);
/// The DNS helper threads' wake-ups.
const DNS_WAKE: Token = Token(usize::MAX - 1);
/// The connection to anvil (below the listeners' tokens).
const ANVIL: Token = Token(usize::MAX - 2 - MAX_LISTENERS);
/// master's drain signal (reload): finish the sessions, accept no more.
const DRAIN: Token = Token(usize::MAX - 3 - MAX_LISTENERS);
/// The before-queue filter helpers' wake-ups.
const PROXY_WAKE: Token = Token(usize::MAX - 4 - MAX_LISTENERS);
const READ_CHUNK: usize = 64 * 1024;
/// Stop reading a client while this much of our output to it is unsent.
const CLIENT_OUT_HIGH: usize = 256 * 1024;
/// Stop reading a client while this much of its content waits for cleanup.
const CLEANUP_OUT_HIGH: usize = 1024 * 1024;
/// Reads from one client before the loop turns to the others.
const READS_PER_TURN: usize = 16;
/// How often timeouts are checked.
const TICK: Duration = Duration::from_secs(1);

fn client_token(idx: usize) -> Token {
    Token(1 + 2 * idx)
}

fn cleanup_token(idx: usize) -> Token {
    Token(2 + 2 * idx)
}

struct Slot {
    session: Session,
    sock: TcpStream,
    out: OutBuf,
    /// There may be bytes to read.
    readable: bool,
    /// The client's side is closed (or in error): read until EOF, a
    /// short read is no sign that the socket is drained of its news.
    read_closed: bool,
    eof: bool,
    /// A write failed: the client is gone.
    broken: bool,
    /// Close after one last attempt to send (timeout).
    kill: bool,
    last_io: Instant,
    /// The connection to cleanup, or an Open waiting to connect.
    cleanup: CleanupLink,
    /// The TLS layer, after STARTTLS (or from the start in wrapper mode).
    tls: Option<Box<TlsConn>>,
    /// Tarpit (smtpd_error_sleep_time): neither write nor read until then.
    hold_until: Option<Instant>,
    /// The connection to the before-queue filter (`smtpd_proxy_filter`).
    proxy: Option<ProxyLink>,
}

/// The before-queue filter connections' helpers: how they report back.
struct ProxyHub {
    events_tx: std::sync::mpsc::Sender<(usize, u64, ProxyEvent)>,
    events: std::sync::mpsc::Receiver<(usize, u64, ProxyEvent)>,
    /// Made at the first connection.
    waker: Option<Arc<mio::Waker>>,
    next_id: u64,
}

impl ProxyHub {
    fn new() -> ProxyHub {
        let (events_tx, events) = std::sync::mpsc::channel();
        ProxyHub {
            events_tx,
            events,
            waker: None,
            next_id: 0,
        }
    }
}

enum Turn {
    /// Nothing more to do until an event.
    Idle,
    /// More input may be waiting; come back soon.
    Again,
    /// The session is over.
    Close,
}

/// Runs the server until idle for `max_idle`. Never returns.
pub fn run(cfg: Settings) -> ! {
    let cfg_anvil = cfg.anvil.clone();
    let cfg = Arc::new(cfg);
    let poll = match Poll::new() {
        Ok(p) => p,
        Err(e) => fatal!("poll: {e}"),
    };
    let mut listeners = Vec::new();
    for (i, fd) in postern_common::service::listen_fds()
        .into_iter()
        .take(MAX_LISTENERS)
        .enumerate()
    {
        // SAFETY: master put the listening sockets on these descriptors for
        // us, and nothing else in this process owns them.
        let mut listener = match unsafe { Listener::from_fd(fd) } {
            Ok(l) => l,
            Err(e) => fatal!("no listener from master on fd {fd}: {e}"),
        };
        if let Err(e) =
            poll.registry()
                .register(&mut listener, listener_token(i), Interest::READABLE)
        {
            fatal!("register listener: {e}");
        }
        listeners.push(listener);
    }
    let anvil_socket = QueueTree::new(&cfg.queue_directory).socket(true, ipc::ANVIL_SOCKET);
    let registry = poll.registry().try_clone().ok().map(|r| (r, ANVIL));
    let anvil = Rc::new(RefCell::new(Anvil::with_server(
        cfg_anvil,
        &cfg.service,
        anvil_socket,
        registry,
    )));
    // Before the first accept: a reload from now on lets every session
    // we take finish.
    let mut drain = UnixStream::from_std(postern_common::service::drain_notifier_or_die());
    if let Err(e) = poll
        .registry()
        .register(&mut drain, DRAIN, Interest::READABLE)
    {
        fatal!("register drain signal: {e}");
    }
    let mut status = Status::new();
    status.available();
    let mut server = Server {
        cfg,
        poll,
        listeners,
        slots: Vec::new(),
        free: Vec::new(),
        count: 0,
        status,
        busy: false,
        idle_since: Instant::now(),
        again: Vec::new(),
        buf: vec![0u8; READ_CHUNK],
        last_tick: Instant::now(),
        auth: None,
        dns: None,
        anvil,
        fd_starved: false,
        drain,
        proxies: ProxyHub::new(),
        cleanup_pool: CleanupPool::default(),
    };
    if let Some(target) = &server.cfg.sasl {
        server.auth = Some(AuthConn::new(
            target.clone(),
            server.cfg.sasl_service.clone(),
            AUTH,
        ));
    }
    // master started us because a connection is waiting: take it now.
    let mut first = Vec::new();
    server.accept_all(&mut first);
    for idx in first {
        server.drive(idx);
    }
    server.run()
}

struct Server {
    cfg: Arc<Settings>,
    poll: Poll,
    listeners: Vec<Listener>,
    slots: Vec<Option<Slot>>,
    free: Vec<usize>,
    count: usize,
    status: Status,
    busy: bool,
    idle_since: Instant,
    /// Sessions to drive again without waiting for an event.
    again: Vec<usize>,
    buf: Vec<u8>,
    last_tick: Instant,
    auth: Option<AuthConn>,
    /// Started at the first DNS query.
    dns: Option<Dns>,
    /// Client limits, shared with the sessions.
    anvil: Rc<RefCell<Anvil>>,
    /// accept() failed for want of a descriptor (EMFILE, ENFILE, ENOBUFS,
    /// ENOMEM): reported busy so that master starts another smtpd for the
    /// connections waiting; accepting is tried again when a session ends
    /// and once a second.
    fd_starved: bool,
    /// Readable once master asks this process to drain; the listeners
    /// are then closed and the process exits after its last session.
    drain: UnixStream,
    proxies: ProxyHub,
    /// Connections to cleanup kept for the next message.
    cleanup_pool: CleanupPool,
}

impl Server {
    fn run(&mut self) -> ! {
        let mut events = Events::with_capacity(1024);
        let mut touched: Vec<usize> = Vec::new();
        loop {
            if let Err(e) = self.poll.poll(&mut events, Some(self.poll_timeout())) {
                if e.kind() != io::ErrorKind::Interrupted {
                    fatal!("poll: {e}");
                }
                continue;
            }
            touched.clear();
            touched.append(&mut self.again);
            if self.dispatch(&events, &mut touched) {
                self.accept_all(&mut touched);
            }
            self.due(&mut touched);
            if self.last_tick.elapsed() >= TICK {
                self.last_tick = Instant::now();
                self.check_timeouts(&mut touched);
                if self.fd_starved {
                    // Descriptors may have come back without a session
                    // ending (a cleanup connection closed).
                    self.accept_all(&mut touched);
                }
            }
            touched.sort_unstable();
            touched.dedup();
            let mut closed = false;
            for &idx in &touched {
                closed |= self.drive(idx);
            }
            closed |= self.pump_auth();
            closed |= self.pump_dns();
            closed |= self.pump_proxy();
            if closed && !self.busy {
                // Connections may have waited while we were full.
                let mut more = Vec::new();
                self.accept_all(&mut more);
                for idx in more {
                    self.drive(idx);
                }
            }
            if self.count == 0
                && (self.listeners.is_empty() || self.idle_since.elapsed() >= self.cfg.max_idle)
            {
                std::process::exit(0);
            }
        }
    }

    /// How long the next poll may wait: not at all when sessions are to
    /// be driven again, CONNECT_RETRY while an Open waits for cleanup,
    /// else until the next tick or the end of a tarpit delay.
    fn poll_timeout(&self) -> Duration {
        if !self.again.is_empty() {
            Duration::ZERO
        } else if self
            .slots
            .iter()
            .flatten()
            .any(|s| s.cleanup.pending_open.is_some())
        {
            CONNECT_RETRY
        } else {
            let tick = TICK.saturating_sub(self.last_tick.elapsed());
            let now = Instant::now();
            self.slots
                .iter()
                .flatten()
                .filter_map(|s| s.hold_until)
                .map(|t| t.saturating_duration_since(now))
                .fold(tick, Duration::min)
        }
    }

    /// Handles the poll's events: marks the sockets readable and adds
    /// their sessions to `touched`, checks anvil, drains on master's
    /// signal; true if a listener is ready.
    fn dispatch(&mut self, events: &Events, touched: &mut Vec<usize>) -> bool {
        let mut accept = false;
        for ev in events.iter() {
            let t = ev.token();
            if is_listener(t) {
                accept = true;
                continue;
            }
            if t == ANVIL {
                self.anvil.borrow_mut().check();
                continue;
            }
            if t == AUTH || t == DNS_WAKE || t == PROXY_WAKE {
                continue; // pumped below, every turn
            }
            if t == DRAIN {
                if postern_common::service::drain_requested(&self.drain) {
                    self.stop_accepting();
                }
                continue;
            }
            let idx = (t.0 - 1) / 2;
            let Some(Some(slot)) = self.slots.get_mut(idx) else {
                continue;
            };
            let readable = ev.is_readable() || ev.is_read_closed() || ev.is_error();
            if (t.0 - 1) % 2 == 1 {
                if let Some(c) = &mut slot.cleanup.conn {
                    c.readable |= readable;
                }
            } else {
                slot.readable |= readable;
                slot.read_closed |= ev.is_read_closed() || ev.is_error();
            }
            touched.push(idx);
        }
        accept
    }

    /// Adds to `touched` the sessions whose time has come without an
    /// event: an Open to retry, a tarpit delay over.
    fn due(&mut self, touched: &mut Vec<usize>) {
        if self
            .slots
            .iter()
            .flatten()
            .any(|s| s.cleanup.pending_open.is_some())
        {
            for (i, s) in self.slots.iter().enumerate() {
                if s.as_ref().is_some_and(|s| s.cleanup.pending_open.is_some()) {
                    touched.push(i);
                }
            }
        }
        let now = Instant::now();
        for (i, s) in self.slots.iter_mut().enumerate() {
            if let Some(s) = s {
                if s.hold_until.is_some_and(|t| t <= now) {
                    s.hold_until = None;
                    s.last_io = now;
                    touched.push(i);
                }
            }
        }
    }

    /// Drains: the listeners close (master keeps them open for the new
    /// processes), the sessions in hand go on to their end.
    fn stop_accepting(&mut self) {
        for mut l in self.listeners.drain(..) {
            let _ = self.poll.registry().deregister(&mut l);
        }
        if self.count > 0 {
            info!(
                "reload: finishing {} sessions, accepting no more",
                self.count
            );
        }
    }

    /// Moves the auth server's bytes and hands its answers to the
    /// sessions (which may ask more: hence the loop); true if a session
    /// closed.
    fn pump_auth(&mut self) -> bool {
        let mut closed = false;
        for _ in 0..64 {
            let Some(auth) = &mut self.auth else {
                return closed;
            };
            let deliveries = auth.pump(self.poll.registry());
            if deliveries.is_empty() {
                break;
            }
            for (idx, d) in deliveries {
                let Some(Some(slot)) = self.slots.get_mut(idx) else {
                    continue;
                };
                match d {
                    Delivery::Mechs(m) => slot.session.sasl_mechs(m),
                    Delivery::Reply(r) => slot.session.sasl_reply(r),
                }
                slot.last_io = Instant::now();
                closed |= self.drive(idx);
            }
        }
        closed
    }

    /// Hands DNS answers to the sessions that asked.
    fn pump_dns(&mut self) -> bool {
        let mut closed = false;
        let answers = match &self.dns {
            Some(d) => d.drain(),
            None => return false,
        };
        for (idx, q, a) in answers {
            let Some(Some(slot)) = self.slots.get_mut(idx) else {
                continue;
            };
            slot.session.dns_answer(q, a);
            slot.last_io = Instant::now();
            closed |= self.drive(idx);
        }
        closed
    }

    /// Hands the before-queue filter's answers to the sessions that
    /// asked (an answer for a connection since dropped is ignored).
    fn pump_proxy(&mut self) -> bool {
        let mut closed = false;
        let events: Vec<_> = self.proxies.events.try_iter().collect();
        for (idx, id, ev) in events {
            let Some(Some(slot)) = self.slots.get_mut(idx) else {
                continue;
            };
            if slot.proxy.as_ref().map(|p| p.id) != Some(id) {
                continue;
            }
            slot.session.proxy_event(ev);
            slot.last_io = Instant::now();
            closed |= self.drive(idx);
        }
        closed
    }

    fn accept_all(&mut self, touched: &mut Vec<usize>) {
        if !self.listeners.is_empty() {
            if let Some(table) = postern_common::table_watch::changed() {
                // A fresh smtpd reads the new file (as root, if it must);
                // this one finishes its sessions with the old one.
                postern_common::service::restart_for_table(&table);
                self.stop_accepting();
                if !self.busy {
                    self.busy = true;
                    self.status.busy();
                }
                return;
            }
        }
        // Edge-triggered: drain every listener, whichever woke us.
        for l in 0..self.listeners.len() {
            while self.count < self.cfg.session_limit {
                match self.listeners[l].accept() {
                    Ok((sock, peer)) => {
                        if let Some(idx) = self.add(sock, peer) {
                            touched.push(idx);
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e)
                        if matches!(
                            e.kind(),
                            io::ErrorKind::Interrupted | io::ErrorKind::ConnectionAborted
                        ) => {}
                    Err(e) if out_of_descriptors(&e) => {
                        // The connection stays in the kernel's queue: no
                        // busy loop (mio is edge-triggered), and master
                        // gives it to another smtpd once we say busy.
                        if !self.fd_starved {
                            warning!(
                                "accept connection: {e}: not accepting more \
                                 until descriptors are free ({} sessions)",
                                self.count
                            );
                        }
                        self.fd_starved = true;
                        if !self.busy {
                            self.busy = true;
                            self.status.busy();
                        }
                        return;
                    }
                    Err(e) => {
                        warning!("accept connection: {e}");
                        break;
                    }
                }
            }
        }
        self.fd_starved = false;
        if self.count >= self.cfg.session_limit && !self.busy {
            self.busy = true;
            self.status.busy();
        }
    }

    fn add(&mut self, mut sock: TcpStream, peer: std::net::SocketAddr) -> Option<usize> {
        // Master now knows this process started well (a crash later does
        // not throttle the service as a bad start-up would).
        self.status.took_work();
        let _ = sock.set_nodelay(true);
        let idx = self.free.pop().unwrap_or_else(|| {
            self.slots.push(None);
            self.slots.len() - 1
        });
        if let Err(e) = self.poll.registry().register(
            &mut sock,
            client_token(idx),
            Interest::READABLE | Interest::WRITABLE,
        ) {
            warning!("register connection from {}: {e}", peer.ip());
            self.free.push(idx);
            return None;
        }
        let tls = if self.cfg.tls_wrappermode {
            let made = match &self.cfg.tls {
                Some(c) => Ok(TlsConn::new(c.clone())),
                None => Err("no certificate loaded"),
            };
            match made {
                Ok(t) => Some(Box::new(t)),
                Err(e) => {
                    warning!("cannot start TLS for {}: {e}", peer.ip());
                    let _ = self.poll.registry().deregister(&mut sock);
                    self.free.push(idx);
                    return None;
                }
            }
        } else {
            None
        };
        let mut client = Client::connected(peer, sock.local_addr().ok());
        client.socket = Some(std::os::fd::AsRawFd::as_raw_fd(&sock));
        let mut session = Session::with_anvil(self.cfg.clone(), client, self.anvil.clone());
        if let Some(m) = self.auth.as_ref().and_then(|a| a.mechs()) {
            session.sasl_mechs(Some(m));
        }
        self.slots[idx] = Some(Slot {
            session,
            sock,
            out: OutBuf::default(),
            readable: true,
            read_closed: false,
            eof: false,
            broken: false,
            kill: false,
            last_io: Instant::now(),
            cleanup: CleanupLink::default(),
            tls,
            hold_until: None,
            proxy: None,
        });
        self.count += 1;
        Some(idx)
    }

    /// Runs one session until it has nothing more to do; true if closed.
    fn drive(&mut self, idx: usize) -> bool {
        let Some(Some(slot)) = self.slots.get_mut(idx) else {
            return false;
        };
        match turn(
            slot,
            idx,
            self.poll.registry(),
            &self.cfg,
            &mut self.buf,
            Helpers {
                auth: self.auth.as_mut(),
                dns: &mut self.dns,
                proxies: &mut self.proxies,
                cleanup_pool: &mut self.cleanup_pool,
            },
        ) {
            Turn::Idle => false,
            Turn::Again => {
                self.again.push(idx);
                false
            }
            Turn::Close => {
                self.close(idx);
                true
            }
        }
    }

    fn close(&mut self, idx: usize) {
        let Some(mut slot) = self.slots[idx].take() else {
            return;
        };
        slot.session.finish();
        if let Some(a) = &mut self.auth {
            a.forget(idx);
        }
        let registry = self.poll.registry();
        let _ = registry.deregister(&mut slot.sock);
        slot.cleanup.drop_conn(registry);
        drop(slot);
        self.free.push(idx);
        self.count -= 1;
        // Without listeners (drained) it stays busy: master starts others.
        if self.busy && self.count < self.cfg.session_limit && !self.listeners.is_empty() {
            self.busy = false;
            self.status.available();
        }
        if self.count == 0 {
            self.idle_since = Instant::now();
        }
    }

    fn check_timeouts(&mut self, touched: &mut Vec<usize>) {
        let now = Instant::now();
        for (idx, slot) in self.slots.iter_mut().enumerate() {
            let Some(slot) = slot else { continue };
            let cleanup_busy = slot.cleanup.sending()
                || slot
                    .cleanup
                    .conn
                    .as_ref()
                    .is_some_and(|c| !c.closing && slot.session.waiting_on_cleanup());
            if cleanup_busy {
                let c = slot.cleanup.conn.as_ref().map(|c| c.last_io).unwrap_or(now);
                if now.duration_since(c) > self.cfg.ipc_timeout {
                    warning!(
                        "{}: timeout talking to {}",
                        slot.session.namaddr(),
                        self.cfg.cleanup_socket.display()
                    );
                    slot.cleanup.drop_conn(self.poll.registry());
                    slot.session.cleanup_lost();
                    slot.last_io = now;
                    touched.push(idx);
                }
            } else if slot.cleanup.pending_open.is_none()
                && !slot.session.waiting_on_proxy()
                && now.duration_since(slot.last_io) > self.cfg.timeout
            {
                slot.session.timeout();
                slot.kill = true;
                touched.push(idx);
            }
        }
    }
}

/// Plaintext into a TLS connection, as a Write for OutBuf.
struct PlainWriter<'a>(&'a mut TlsConn);

impl Write for PlainWriter<'_> {
    fn write(&mut self, b: &[u8]) -> io::Result<usize> {
        self.0.write_plain(b)
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Whether a failed accept() means the process or system is out of
/// descriptors or socket memory (the connection waits in the kernel).
fn out_of_descriptors(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
    )
}

/// The process's helpers a session's requests go to.
struct Helpers<'a> {
    auth: Option<&'a mut AuthConn>,
    dns: &'a mut Option<Dns>,
    proxies: &'a mut ProxyHub,
    cleanup_pool: &'a mut CleanupPool,
}

/// One turn of a session: moves bytes between the client, the session
/// and cleanup until nothing moves. Each pass runs the phases in order:
/// DNS, auth and before-queue filter requests, cleanup, output to the client, STARTTLS,
/// input from the client, the end of the session.
fn turn(
    slot: &mut Slot,
    idx: usize,
    registry: &Registry,
    cfg: &Settings,
    buf: &mut [u8],
    helpers: Helpers,
) -> Turn {
    let Helpers {
        mut auth,
        dns,
        proxies,
        cleanup_pool,
    } = helpers;
    let mut reads = 0;
    // The session's own verbosity (debug_peer_list) while its work is done.
    let mut _verbose = postern_common::log::raise_verbosity(slot.session.debug_level());
    loop {
        if !_verbose.raised() && slot.session.debug_level() > 0 {
            _verbose = postern_common::log::raise_verbosity(slot.session.debug_level());
        }
        submit_dns(slot, idx, registry, cfg, dns);
        submit_auth(slot, idx, registry, auth.as_deref_mut());
        let mut progress = submit_proxy(slot, idx, registry, cfg, proxies);
        progress |= slot.cleanup.send_requests(
            &mut slot.session,
            cleanup_token(idx),
            registry,
            cfg,
            cleanup_pool,
        );
        progress |= slot.cleanup.exchange(
            &mut slot.session,
            registry,
            cfg,
            buf,
            &mut slot.last_io,
            cleanup_pool,
        );
        if tarpit(slot) {
            return Turn::Idle;
        }
        progress |= write_output(slot);
        progress |= start_tls(slot, cfg);
        match read_input(slot, buf, &mut reads) {
            ControlFlow::Break(t) => return t,
            ControlFlow::Continue(p) => progress |= p,
        }
        // A `sleep` restriction's pause is over (and what the client sent
        // meanwhile is read): its command runs again.
        progress |= slot.session.resume_after_sleep();
        match session_end(slot) {
            ControlFlow::Break(t) => return t,
            ControlFlow::Continue(true) => continue,
            ControlFlow::Continue(false) if !progress => return Turn::Idle,
            ControlFlow::Continue(false) => {}
        }
    }
}

/// DNS lookups (answers come through pump_dns). An answer given here can
/// make the session ask again (the client name, then what the client
/// restrictions need).
fn submit_dns(
    slot: &mut Slot,
    idx: usize,
    registry: &Registry,
    cfg: &Settings,
    dns: &mut Option<Dns>,
) {
    loop {
        let requests = slot.session.take_dns_requests();
        if requests.is_empty() {
            break;
        }
        for q in requests {
            if let crate::dns::Query::Peer(ip) = q {
                if let Some(names) = crate::dns::loopback_peer(ip) {
                    slot.session.dns_answer(q, crate::dns::Answer::Peer(names));
                    continue;
                }
            }
            if dns.is_none() {
                let started = mio::Waker::new(registry, DNS_WAKE)
                    .map_err(|e| e.to_string())
                    .and_then(|w| {
                        Dns::start(
                            cfg.dns_servers.clone(),
                            cfg.dns_timeout,
                            Arc::new(w),
                            cfg.verify.clone(),
                        )
                    });
                match started {
                    Ok(d) => *dns = Some(d),
                    Err(e) => {
                        warning!("DNS lookups are not available: {e}");
                        slot.session.dns_answer(q, crate::dns::Answer::TryAgain);
                        continue;
                    }
                }
            }
            if let Some(d) = dns {
                if let crate::dns::Query::Milter(_) = &q {
                    match slot.session.milter_link() {
                        Some(link) => d.submit_milter(idx, q, link),
                        None => slot.session.dns_answer(
                            q,
                            crate::dns::Answer::Milter(postern_common::milter::Outcome::Continue),
                        ),
                    }
                } else {
                    d.submit(idx, q);
                }
            }
        }
    }
}

/// The session's requests for its before-queue filter connection: a new
/// helper at Start, the steps to it, dropped at Close (answers come
/// through pump_proxy); true if there were any.
fn submit_proxy(
    slot: &mut Slot,
    idx: usize,
    registry: &Registry,
    cfg: &Settings,
    proxies: &mut ProxyHub,
) -> bool {
    let requests = slot.session.take_proxy_requests();
    if requests.is_empty() {
        return false;
    }
    for req in requests {
        match req {
            ProxyRequest::Start => {
                slot.proxy = None;
                let Some(settings) = cfg.proxy.clone() else {
                    continue;
                };
                if proxies.waker.is_none() {
                    match mio::Waker::new(registry, PROXY_WAKE) {
                        Ok(w) => proxies.waker = Some(Arc::new(w)),
                        Err(e) => warning!("proxy filter wake-ups: {e}"),
                    }
                }
                proxies.next_id += 1;
                let started = match &proxies.waker {
                    Some(w) => ProxyLink::start(
                        settings,
                        idx,
                        proxies.next_id,
                        proxies.events_tx.clone(),
                        w.clone(),
                    )
                    .map_err(|e| e.to_string()),
                    None => Err("no wake-up".to_string()),
                };
                match started {
                    Ok(link) => slot.proxy = Some(link),
                    Err(e) => warning!("cannot start proxy filter connection: {e}"),
                }
            }
            ProxyRequest::Step(step) => {
                if let Some(link) = &slot.proxy {
                    link.send(step);
                } else if slot.session.waiting_on_proxy() {
                    slot.session.proxy_lost();
                }
            }
            ProxyRequest::Close => slot.proxy = None,
        }
    }
    true
}

/// Requests for the auth server (answers come through pump_auth).
fn submit_auth(slot: &mut Slot, idx: usize, registry: &Registry, auth: Option<&mut AuthConn>) {
    let requests = slot.session.take_sasl_requests();
    if let Some(a) = auth {
        for req in requests {
            a.submit(idx, req, registry);
        }
    }
}

/// Starts the tarpit delay the session asked for (smtpd_error_sleep_time);
/// true while the session is held (and not being killed).
fn tarpit(slot: &mut Slot) -> bool {
    let delay = slot.session.take_delay();
    if !delay.is_zero() {
        let base = slot.hold_until.unwrap_or_else(Instant::now);
        slot.hold_until = Some(base + delay);
    }
    slot.hold_until.is_some() && !slot.kill
}

/// Replies to the client, through TLS once it is on; true if the client
/// turned out gone.
fn write_output(slot: &mut Slot) -> bool {
    if slot.session.has_output() {
        let o = slot.session.take_output();
        if !slot.broken {
            slot.out.push(&o);
        }
    }
    if slot.broken {
        return false;
    }
    let written = match &mut slot.tls {
        None if slot.out.pending() > 0 => slot.out.write_to(&mut slot.sock),
        None => Ok(0),
        Some(t) => {
            // Plaintext goes to rustls only when it has sent what
            // it had (handshake, tickets, earlier replies): slot.out
            // stays the measure of the backlog.
            t.flush(&mut slot.sock).and_then(|n| {
                if slot.out.pending() > 0 && !t.wants_write() {
                    let mut w = PlainWriter(t);
                    let _ = slot.out.write_to(&mut w);
                    // The session's last reply (the 221 to QUIT) takes
                    // the close_notify along: one write and one segment
                    // instead of two.
                    if slot.out.pending() == 0
                        && slot.session.is_done()
                        && !slot.session.has_output()
                        && !slot.kill
                        && !slot.eof
                    {
                        t.close();
                    }
                    Ok(n + t.flush(&mut slot.sock)?)
                } else {
                    Ok(n)
                }
            })
        }
    };
    match written {
        Ok(n) if n > 0 => slot.last_io = Instant::now(),
        Ok(_) => {}
        Err(_) => {
            slot.broken = true;
            slot.out = OutBuf::default();
            slot.session.client_eof();
            return true;
        }
    }
    false
}

/// STARTTLS: the 220 is on the wire; what follows is TLS. True if started
/// (or failed to).
fn start_tls(slot: &mut Slot, cfg: &Settings) -> bool {
    if !(slot.session.starttls_requested() && slot.out.pending() == 0 && !slot.broken) {
        return false;
    }
    slot.session.tls_started();
    let made = match cfg.tls.clone() {
        Some(c) => Ok(TlsConn::new(c)),
        None => Err("no certificate loaded"),
    };
    match made {
        Ok(t) => slot.tls = Some(Box::new(t)),
        Err(e) => {
            warning!("cannot start TLS for {}: {e}", slot.session.namaddr());
            slot.session.tls_failed();
        }
    }
    true
}

/// Input from the client, unless the session does not want it or the
/// output side is backed up; Break(Again) after READS_PER_TURN reads,
/// else Continue(whether anything was read).
fn read_input(slot: &mut Slot, buf: &mut [u8], reads: &mut usize) -> ControlFlow<Turn, bool> {
    let cleanup_backed_up = slot.cleanup.backed_up(CLEANUP_OUT_HIGH)
        || slot.proxy.as_ref().is_some_and(|p| p.backed_up());
    let tls_plain = slot.tls.as_ref().is_some_and(|t| t.has_plaintext());
    let tls_backed_up = slot.tls.as_ref().is_some_and(|t| t.wants_write());
    let handshaking = slot.tls.as_ref().is_some_and(|t| t.is_handshaking());
    if !((slot.readable || tls_plain)
        && !slot.eof
        && !slot.broken
        && (slot.session.wants_input() || handshaking)
        && slot.out.pending() < CLIENT_OUT_HIGH
        && !cleanup_backed_up
        && (!tls_backed_up || handshaking))
    {
        return ControlFlow::Continue(false);
    }
    if *reads >= READS_PER_TURN {
        return ControlFlow::Break(Turn::Again);
    }
    if slot.tls.is_some() {
        read_tls(slot, buf, reads);
    } else {
        match slot.sock.read(buf) {
            Ok(0) => {
                slot.eof = true;
                slot.session.client_eof();
            }
            Ok(n) => {
                *reads += 1;
                // Short: drained for now; the next arrival is an event.
                if n < buf.len() && !slot.read_closed {
                    slot.readable = false;
                }
                slot.last_io = Instant::now();
                slot.session.receive(&buf[..n]);
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => slot.readable = false,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => {
                slot.eof = true;
                slot.session.client_eof();
            }
        }
    }
    ControlFlow::Continue(true)
}

/// One read through the TLS layer (handshake records included).
fn read_tls(slot: &mut Slot, buf: &mut [u8], reads: &mut usize) {
    let Some(t) = &mut slot.tls else {
        return;
    };
    let handshaking = t.is_handshaking();
    let mut sock = crate::tls::NoteShort {
        inner: &mut slot.sock,
        short: false,
    };
    let outcome = t.read(&mut sock, buf, &mut slot.readable);
    if sock.short && !slot.read_closed {
        slot.readable = false;
    }
    for e in t.take_ticket_events() {
        slot.session.tls_ticket(e);
    }
    if let Some(n) = t.take_established() {
        slot.session.tls_resumed(t.resumed());
        slot.session.tls_established(n);
        if matches!(outcome, ReadOutcome::WouldBlock) && !t.wants_write() {
            // The client's EHLO waits behind its Finished for our ACK
            // (Nagle), and we have nothing to send (the ticket leaves with
            // the EHLO reply; a resumed session gets none): without this,
            // 40 ms per STARTTLS session.
            postern_common::tcp::ack_now(&slot.sock);
        }
    }
    match outcome {
        ReadOutcome::Data(n) => {
            *reads += 1;
            slot.last_io = Instant::now();
            slot.session.receive(&buf[..n]);
        }
        ReadOutcome::WouldBlock => slot.last_io = Instant::now(),
        ReadOutcome::Eof => {
            if handshaking && t.is_handshaking() {
                // As Postfix: the handshake's end, then the session's
                // ("lost connection after STARTTLS from ...").
                info!(
                    "SSL_accept error from {}: lost connection",
                    slot.session.namaddr()
                );
            }
            slot.eof = true;
            slot.session.client_eof();
        }
        ReadOutcome::Error(e) => {
            if t.is_handshaking() {
                // Postfix's two lines: OpenSSL's return code, then the
                // library's reason.
                info!("SSL_accept error from {}: -1", slot.session.namaddr());
                warning!("TLS library problem: {e}");
            } else {
                warning!("TLS read error from {}: {e}", slot.session.namaddr());
            }
            // Send the alert rustls queued, once.
            let _ = t.flush(&mut slot.sock);
            slot.eof = true;
            slot.session.tls_failed();
        }
    }
}

/// The end of the session: its TLS close_notify, then Break(Close) when
/// all is said (or the client is gone); Continue(true) to go round again
/// at once, Continue(false) if the session goes on.
fn session_end(slot: &mut Slot) -> ControlFlow<Turn, bool> {
    // Requests left at the end can only be an Abort; closing the
    // cleanup connection with the session says the same.
    let session_over = slot.session.is_done() && !slot.session.has_output();
    if session_over && slot.out.pending() == 0 && !slot.broken && !slot.kill && !slot.eof {
        if let Some(t) = &mut slot.tls {
            if t.close() {
                return ControlFlow::Continue(true);
            }
            if t.wants_write() {
                return ControlFlow::Break(Turn::Idle);
            }
        }
    }
    if slot.broken || slot.kill || (session_over && slot.out.pending() == 0) {
        return ControlFlow::Break(Turn::Close);
    }
    ControlFlow::Continue(false)
}
