//! Client limits, smtpd's side of Postfix's anvil(8):
//! `smtpd_client_connection_count_limit` (simultaneous sessions),
//! `smtpd_client_connection_rate_limit`, `smtpd_client_message_rate_limit`,
//! `smtpd_client_recipient_rate_limit` and `smtpd_client_auth_rate_limit`
//! (events per `anvil_rate_time_unit`), per service and client address,
//! except for `smtpd_client_event_limit_exceptions` (default
//! `$mynetworks`).
//!
//! The counts are kept by the `anvil` server (`private/anvil`), for all
//! smtpd processes: each process has one connection to it, and asks
//! synchronously, as Postfix's smtpd does (a local round trip is a few
//! microseconds), with a short time limit. The same counting
//! ([`postern_common::anvil::Table`]) also runs here for this process's
//! own sessions, and decides whenever anvil cannot: no `anvil` service in
//! master.cf, anvil down, or slow. Then smtpd logs one warning, counts in
//! this process only, and tries anvil again later, so no client ever
//! waits for more than the time limit. When smtpd connects to a new
//! anvil (after a restart), it first tells it the sessions it already has
//! open, so that counting goes on across processes. The connection is
//! registered in the event loop, which calls [`Anvil::check`] when it
//! becomes readable: a closed connection (anvil died) is replaced at once.
//!
//! The table is shared with the sessions of the event loop's thread
//! (`Rc<RefCell<Anvil>>`).

use mio::unix::SourceFd;
use mio::{Interest, Registry, Token};
use nix::errno::Errno;
use nix::sys::socket::{recv, MsgFlags};
pub use postern_common::anvil::Event;
use postern_common::anvil::Table;
use postern_common::ipc::{self, AnvilReply, AnvilRequest, ANVIL_MAX_MESSAGE};
use postern_common::match_list::MatchList;
use postern_common::warning;
use std::io;
use std::net::IpAddr;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// Time limit for an answer on a connection that has answered before.
const REPLY_TIMEOUT: Duration = Duration::from_millis(500);
/// Time limit for the first answer on a new connection: master may have
/// to start anvil first.
const FIRST_REPLY_TIMEOUT: Duration = Duration::from_secs(2);
/// After anvil could not be reached, count here alone this long before
/// trying again (doubling after each time-out, up to [`MAX_RETRY`]).
const RETRY: Duration = Duration::from_secs(10);
const MAX_RETRY: Duration = Duration::from_secs(300);
/// The local table's owner.
const LOCAL: u64 = 0;

/// The limits (0 = none).
#[derive(Debug, Clone, Default)]
pub struct Limits {
    pub connection_count: u32,
    pub connection_rate: u32,
    pub message_rate: u32,
    pub recipient_rate: u32,
    pub auth_rate: u32,
    pub time_unit: Duration,
    pub exceptions: MatchList,
}

impl Limits {
    fn any(&self) -> bool {
        self.connection_count > 0
            || self.connection_rate > 0
            || self.message_rate > 0
            || self.recipient_rate > 0
            || self.auth_rate > 0
    }

    fn rate(&self, e: Event) -> u32 {
        match e {
            Event::Connection => self.connection_rate,
            Event::Message => self.message_rate,
            Event::Recipient => self.recipient_rate,
            Event::Auth => self.auth_rate,
        }
    }
}

/// The connection to anvil.
struct Remote {
    path: PathBuf,
    conn: Option<UnixStream>,
    /// No answer on this connection yet.
    fresh: bool,
    /// Not before this, after a failure.
    retry_at: Option<Instant>,
    backoff: Duration,
    /// A warning was logged for the present trouble.
    warned: bool,
    /// Where readiness of the connection is reported.
    registry: Option<(Registry, Token)>,
}

impl Remote {
    fn trouble(&mut self, what: &str, timed_out: bool) {
        self.drop_conn();
        if !self.warned {
            warning!(
                "{}: {what}; counting client limits in this smtpd process only",
                self.path.display()
            );
            self.warned = true;
        }
        let wait = if timed_out {
            let w = self.backoff;
            self.backoff = (self.backoff * 2).min(MAX_RETRY);
            w
        } else {
            RETRY
        };
        self.retry_at = Some(Instant::now() + wait);
    }

    fn drop_conn(&mut self) {
        if let Some(c) = self.conn.take() {
            if let Some((r, _)) = &self.registry {
                let _ = r.deregister(&mut SourceFd(&c.as_raw_fd()));
            }
        }
    }

    /// Connects and tells anvil the sessions this process has open.
    fn connect(&mut self, open: &[(String, u32)]) -> bool {
        if self.conn.is_some() {
            return true;
        }
        if self.retry_at.is_some_and(|t| Instant::now() < t) {
            return false;
        }
        let c = match UnixStream::connect(&self.path) {
            Ok(c) => c,
            Err(e) => {
                self.trouble(&format!("connect: {e}"), false);
                return false;
            }
        };
        let _ = c.set_write_timeout(Some(REPLY_TIMEOUT));
        if let Some((r, t)) = &self.registry {
            let _ = r.register(&mut SourceFd(&c.as_raw_fd()), *t, Interest::READABLE);
        }
        self.conn = Some(c);
        self.fresh = true;
        for (ident, count) in open {
            let req = AnvilRequest::Sessions {
                ident: ident.clone(),
                count: *count,
            };
            if let Err(e) = self.send(&req) {
                self.trouble(&format!("write: {e}"), false);
                return false;
            }
        }
        true
    }

    fn send(&mut self, req: &AnvilRequest) -> io::Result<()> {
        match &mut self.conn {
            Some(c) => ipc::send(c, req),
            None => Err(io::ErrorKind::NotConnected.into()),
        }
    }

    fn round_trip(&mut self, req: &AnvilRequest) -> io::Result<AnvilReply> {
        self.send(req)?;
        let timeout = if self.fresh {
            FIRST_REPLY_TIMEOUT
        } else {
            REPLY_TIMEOUT
        };
        let Some(c) = &mut self.conn else {
            return Err(io::ErrorKind::NotConnected.into());
        };
        c.set_read_timeout(Some(timeout))?;
        ipc::recv_limited(c, ANVIL_MAX_MESSAGE)
    }

    /// Asks anvil; None when it cannot answer now (the caller counts
    /// alone). `open`: this process's sessions, for a new connection.
    fn ask(&mut self, req: &AnvilRequest, open: &[(String, u32)]) -> Option<AnvilReply> {
        for attempt in 0..2 {
            if !self.connect(open) {
                return None;
            }
            let was_fresh = self.fresh;
            match self.round_trip(req) {
                Ok(r) => {
                    self.fresh = false;
                    self.warned = false;
                    self.backoff = RETRY;
                    self.retry_at = None;
                    return Some(r);
                }
                Err(e) => {
                    let timed_out = matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    );
                    if timed_out {
                        self.trouble("timeout waiting for an answer", true);
                        return None;
                    }
                    if was_fresh || attempt == 1 {
                        self.trouble(&e.to_string(), false);
                        return None;
                    }
                    // anvil went away since the last answer: master starts
                    // a new one. Once more, on a new connection.
                    self.drop_conn();
                }
            }
        }
        None
    }
}

/// Client limits for one smtpd process.
pub struct Anvil {
    limits: Limits,
    service: String,
    local: Table,
    remote: Option<Remote>,
}

impl Default for Anvil {
    fn default() -> Anvil {
        Anvil::new(Limits::default())
    }
}

impl Anvil {
    /// Counting in this process only (tests; smtpd without anvil).
    pub fn new(limits: Limits) -> Anvil {
        Anvil {
            local: Table::new(limits.time_unit),
            limits,
            service: "smtpd".into(),
            remote: None,
        }
    }

    /// Counting with the anvil server at `socket` for the master.cf
    /// service `service`. Readiness of the connection to anvil is
    /// registered in `registry` as `token`: call [`Anvil::check`] then.
    pub fn with_server(
        limits: Limits,
        service: &str,
        socket: PathBuf,
        registry: Option<(Registry, Token)>,
    ) -> Anvil {
        let mut a = Anvil::new(limits);
        a.service = service.to_string();
        if a.limits.any() {
            a.remote = Some(Remote {
                path: socket,
                conn: None,
                fresh: false,
                retry_at: None,
                backoff: RETRY,
                warned: false,
                registry,
            });
        }
        a
    }

    fn counted(&self, ip: IpAddr) -> bool {
        // An exception list that cannot answer: the limits apply.
        self.limits.any() && !self.limits.exceptions.matches_addr(ip).unwrap_or(false)
    }

    fn ident(&self, ip: IpAddr) -> String {
        format!("{}:{ip}", self.service)
    }

    fn ask(&mut self, req: AnvilRequest) -> Option<AnvilReply> {
        let open = self.local.sessions_of(LOCAL);
        self.remote.as_mut()?.ask(&req, &open)
    }

    /// A new session from `ip`: Err((what, count)) when it is over a
    /// limit (the caller refuses it, and must not call
    /// [`Anvil::disconnect`]).
    pub fn connect(&mut self, ip: IpAddr) -> Result<(), (&'static str, u32)> {
        if !self.counted(ip) {
            return Ok(());
        }
        let ident = self.ident(ip);
        // anvil first: a new connection to it carries the sessions open
        // before this one.
        let remote = self.ask(AnvilRequest::Connect(ident.clone()));
        let (lc, lr) = self.local.connect(LOCAL, &ident, Instant::now());
        let (count, rate) = match remote {
            Some(AnvilReply::Count { count, rate }) => (count, rate),
            _ => (lc, lr),
        };
        let l = &self.limits;
        let over = if l.connection_count > 0 && count > l.connection_count {
            Some(("Connection concurrency limit", count))
        } else if l.connection_rate > 0 && rate > l.connection_rate {
            Some(("Connection rate limit", rate))
        } else {
            None
        };
        match over {
            Some(o) => {
                self.disconnect(ip);
                Err(o)
            }
            None => Ok(()),
        }
    }

    /// A session accepted by [`Anvil::connect`] ended.
    pub fn disconnect(&mut self, ip: IpAddr) {
        if !self.counted(ip) {
            return;
        }
        let ident = self.ident(ip);
        self.local.disconnect(LOCAL, &ident);
        // Only on the connection that counted it; a new connection was
        // told only of the sessions still open.
        if let Some(r) = &mut self.remote {
            if r.conn.is_some() {
                if let Err(e) = r.send(&AnvilRequest::Disconnect(ident)) {
                    r.trouble(&format!("write: {e}"), false);
                }
            }
        }
    }

    /// A MAIL FROM, RCPT TO or AUTH from `ip`: Err(rate) when over the
    /// limit.
    pub fn event(&mut self, ip: IpAddr, e: Event) -> Result<(), u32> {
        let limit = self.limits.rate(e);
        if limit == 0 || !self.counted(ip) {
            return Ok(());
        }
        let ident = self.ident(ip);
        let req = match e {
            Event::Message => AnvilRequest::Message(ident.clone()),
            Event::Recipient => AnvilRequest::Recipient(ident.clone()),
            Event::Auth => AnvilRequest::Auth(ident.clone()),
            Event::Connection => return Ok(()),
        };
        let remote = self.ask(req);
        let local = self.local.event(&ident, e, Instant::now());
        let n = match remote {
            Some(AnvilReply::Rate(n)) => n,
            _ => local,
        };
        if n > limit {
            Err(n)
        } else {
            Ok(())
        }
    }

    /// The connection to anvil became readable: it can only have closed
    /// (answers are read as they are asked for). Then a new one is made
    /// at once, carrying this process's open sessions.
    pub fn check(&mut self) {
        let open = self.local.sessions_of(LOCAL);
        let Some(r) = &mut self.remote else { return };
        let Some(c) = &r.conn else { return };
        let mut b = [0u8; 1];
        match recv(
            c.as_raw_fd(),
            &mut b,
            MsgFlags::MSG_PEEK | MsgFlags::MSG_DONTWAIT,
        ) {
            Ok(n) if n > 0 => {
                // A stray answer (one that came after its time limit).
                r.trouble("unexpected data", false);
                return;
            }
            Err(Errno::EAGAIN) => return,
            _ => {}
        }
        // Closed: anvil went away. One that never answered is not asked
        // again at once (no loop with an anvil that dies at start).
        if r.fresh {
            r.trouble("connection closed", false);
            return;
        }
        r.drop_conn();
        r.connect(&open);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(count: u32, rate: u32, msg: u32) -> Limits {
        Limits {
            connection_count: count,
            connection_rate: rate,
            message_rate: msg,
            recipient_rate: 0,
            auth_rate: 1,
            time_unit: Duration::from_secs(60),
            exceptions: MatchList::parse(
                "127.0.0.1",
                postern_common::match_list::Kind::NameAddress,
                false,
            )
            .unwrap(),
        }
    }

    #[test]
    fn local_limits() {
        let ip: IpAddr = "192.0.2.1".parse().unwrap();
        let mut a = Anvil::new(limits(2, 0, 0));
        assert!(a.connect(ip).is_ok());
        assert!(a.connect(ip).is_ok());
        assert_eq!(a.connect(ip), Err(("Connection concurrency limit", 3)));
        a.disconnect(ip);
        assert!(a.connect(ip).is_ok());
        // Exempt.
        let lo: IpAddr = "127.0.0.1".parse().unwrap();
        for _ in 0..10 {
            assert!(a.connect(lo).is_ok());
        }
        let mut a = Anvil::new(limits(0, 2, 1));
        assert!(a.connect(ip).is_ok());
        assert!(a.connect(ip).is_ok());
        assert_eq!(a.connect(ip), Err(("Connection rate limit", 3)));
        assert!(a.event(ip, Event::Message).is_ok());
        assert_eq!(a.event(ip, Event::Message), Err(2));
        assert!(a.event(ip, Event::Recipient).is_ok());
        assert!(a.event(ip, Event::Auth).is_ok());
        assert_eq!(a.event(ip, Event::Auth), Err(2));
    }

    #[test]
    fn no_server_means_local_counting_without_delay() {
        let ip: IpAddr = "192.0.2.1".parse().unwrap();
        let dir = std::env::temp_dir().join(format!("anvil-test-{}", std::process::id()));
        let mut a = Anvil::with_server(limits(1, 0, 0), "smtp", dir.join("none"), None);
        let t = Instant::now();
        assert!(a.connect(ip).is_ok());
        assert_eq!(a.connect(ip), Err(("Connection concurrency limit", 2)));
        assert!(t.elapsed() < Duration::from_secs(1));
    }

    #[test]
    fn server_counts_across_clients_and_forgets_closed_ones() {
        use postern_common::anvil::Table;
        use std::os::unix::net::UnixListener;
        let dir = std::env::temp_dir().join(format!("anvil-srv-{}", std::process::id()));
        let _ = std::fs::create_dir_all(&dir);
        let path = dir.join("anvil");
        let _ = std::fs::remove_file(&path);
        let l = UnixListener::bind(&path).unwrap();
        // A minimal anvil: one table, each connection an owner, served
        // on a thread.
        std::thread::spawn(move || {
            let table =
                std::sync::Arc::new(std::sync::Mutex::new(Table::new(Duration::from_secs(60))));
            for (owner, c) in l.incoming().enumerate() {
                let mut c = c.unwrap();
                let table = table.clone();
                std::thread::spawn(move || loop {
                    let req: AnvilRequest = match ipc::recv(&mut c) {
                        Ok(r) => r,
                        Err(_) => {
                            table.lock().unwrap().drop_owner(owner as u64);
                            return;
                        }
                    };
                    let now = Instant::now();
                    let mut t = table.lock().unwrap();
                    let reply = match req {
                        AnvilRequest::Connect(i) => {
                            let (count, rate) = t.connect(owner as u64, &i, now);
                            Some(AnvilReply::Count { count, rate })
                        }
                        AnvilRequest::Disconnect(i) => {
                            t.disconnect(owner as u64, &i);
                            None
                        }
                        AnvilRequest::Sessions { ident, count } => {
                            t.add_sessions(owner as u64, &ident, count);
                            None
                        }
                        AnvilRequest::Message(i) => {
                            Some(AnvilReply::Rate(t.event(&i, Event::Message, now)))
                        }
                        _ => None,
                    };
                    drop(t);
                    if let Some(r) = reply {
                        ipc::send(&mut c, &r).unwrap();
                    }
                });
            }
        });
        let ip: IpAddr = "192.0.2.7".parse().unwrap();
        let mut a = Anvil::with_server(limits(2, 0, 2), "smtp", path.clone(), None);
        let mut b = Anvil::with_server(limits(2, 0, 2), "smtp", path.clone(), None);
        assert!(a.connect(ip).is_ok());
        assert!(b.connect(ip).is_ok());
        // The third, in either process, is one too many.
        assert_eq!(a.connect(ip), Err(("Connection concurrency limit", 3)));
        assert!(a.event(ip, Event::Message).is_ok());
        assert!(b.event(ip, Event::Message).is_ok());
        assert_eq!(a.event(ip, Event::Message), Err(3));
        // b's process goes away: its session no longer counts.
        drop(b);
        let mut ok = false;
        for _ in 0..100 {
            if a.connect(ip).is_ok() {
                ok = true;
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(ok);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
