//! SASL authentication through Dovecot's auth server
//! (`smtpd_sasl_type = dovecot`), without blocking the event loop.
//!
//! One smtpd process keeps **one** connection to the auth server
//! (`smtpd_sasl_path`: `private/auth` relative to `queue_directory`, an
//! absolute socket path, or `inet:host:port`), registered in the same mio
//! poll as the clients. Dovecot's protocol multiplexes: every `AUTH`
//! carries a request ID, so the sessions of the process share the
//! connection and the loop hands each answer to the session whose ID it
//! carries ([`AuthConn::pump`]). The connection is made when a session
//! first needs it (its EHLO needs the mechanism list) and again after it
//! is lost; a session waiting for it takes no input meanwhile.
//!
//! The protocol (Dovecot's auth-client protocol 1.x): we send
//! `VERSION\t1\t0` and `CPID\tPID`; the server answers `VERSION`, one
//! `MECH\tNAME\tflags...` per mechanism, ..., `DONE`. A request is
//! `AUTH\tID\tMECH\tservice=smtp\tnologin\tlip=IP\trip=IP\tlport=N\trport=N[\tsecured][\tresp=B64]`
//! (the local and remote address and port, as far as known);
//! answers are `OK\tID\tuser=NAME`, `CONT\tID\tB64` (we answer
//! `CONT\tID\tB64`) and `FAIL\tID\t[reason=...]\t[temp]`.

use mio::event::Source;
use mio::net::{TcpStream, UnixStream};
use mio::{Interest, Registry, Token};
use postern_common::poll::WriteInterest;
use postern_common::warning;
use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::{IpAddr, SocketAddr, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Longest line accepted from the auth server.
const MAX_LINE: usize = 16 * 1024;
/// Don't try to reconnect more often than this after a failure.
const RECONNECT_DELAY: Duration = Duration::from_secs(1);

/// Where the auth server listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuthTarget {
    Unix(PathBuf),
    Inet(SocketAddr),
}

impl std::fmt::Display for AuthTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AuthTarget::Unix(p) => write!(f, "{}", p.display()),
            AuthTarget::Inet(a) => write!(f, "inet:{a}"),
        }
    }
}

/// `smtpd_sasl_path` as Postfix reads it for Dovecot: `inet:host:port`,
/// an absolute path, or a path relative to `queue_directory`.
pub fn parse_path(path: &str, queue_directory: &Path) -> Result<AuthTarget, String> {
    if let Some(hp) = path.strip_prefix("inet:") {
        let (host, port) = hp
            .rsplit_once(':')
            .ok_or_else(|| format!("smtpd_sasl_path {path}: need inet:host:port"))?;
        let host = host.trim_start_matches('[').trim_end_matches(']');
        let port: u16 = port
            .parse()
            .map_err(|_| format!("smtpd_sasl_path {path}: bad port"))?;
        let addr = (host, port)
            .to_socket_addrs()
            .map_err(|e| format!("smtpd_sasl_path {path}: {e}"))?
            .next()
            .ok_or_else(|| format!("smtpd_sasl_path {path}: host not found"))?;
        return Ok(AuthTarget::Inet(addr));
    }
    let path = path.strip_prefix("unix:").unwrap_or(path);
    let p = Path::new(path);
    Ok(AuthTarget::Unix(if p.is_absolute() {
        p.to_path_buf()
    } else {
        queue_directory.join(p)
    }))
}

/// One line from the auth server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Line {
    Version(u32),
    /// A mechanism and whether it is usable by us (not `private`).
    Mech(String, bool),
    Done,
    Ok {
        id: u32,
        user: Option<String>,
    },
    Cont {
        id: u32,
        data: String,
    },
    Fail {
        id: u32,
        user: Option<String>,
        reason: Option<String>,
        temp: bool,
    },
    Other,
}

/// Undoes Dovecot's tab escaping (`\001` followed by a code character).
fn unescape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut it = s.chars();
    while let Some(c) = it.next() {
        if c == '\x01' {
            match it.next() {
                Some('1') => out.push('\x01'),
                Some('t') => out.push('\t'),
                Some('r') => out.push('\r'),
                Some('n') => out.push('\n'),
                Some(o) => out.push(o),
                None => {}
            }
        } else {
            out.push(c);
        }
    }
    out
}

pub fn parse_line(line: &str) -> Line {
    let f: Vec<&str> = line.split('\t').collect();
    let id = || f.get(1).and_then(|s| s.parse::<u32>().ok());
    let param = |name: &str| {
        f.iter().skip(2).find_map(|p| {
            p.strip_prefix(name)
                .and_then(|r| r.strip_prefix('='))
                .map(unescape)
        })
    };
    match f[0] {
        "VERSION" => match f.get(1).and_then(|s| s.parse().ok()) {
            Some(v) => Line::Version(v),
            None => Line::Other,
        },
        "MECH" if f.len() >= 2 => {
            Line::Mech(f[1].to_ascii_uppercase(), !f[2..].contains(&"private"))
        }
        "DONE" => Line::Done,
        "OK" => match id() {
            Some(id) => Line::Ok {
                id,
                user: param("user"),
            },
            None => Line::Other,
        },
        "CONT" => match id() {
            Some(id) => Line::Cont {
                id,
                data: f.get(2).map(|s| s.to_string()).unwrap_or_default(),
            },
            None => Line::Other,
        },
        "FAIL" => match id() {
            Some(id) => Line::Fail {
                id,
                user: param("user"),
                reason: param("reason"),
                temp: f.iter().skip(2).any(|p| *p == "temp"),
            },
            None => Line::Other,
        },
        _ => Line::Other,
    }
}

/// What a session asks of the auth server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SaslRequest {
    /// The mechanism list (for EHLO).
    Mechs,
    /// `AUTH MECH [initial-response]`.
    Start {
        mech: String,
        resp: Option<String>,
        secured: bool,
        rip: IpAddr,
        /// The client's port.
        rport: Option<u16>,
        /// The local end of the client's connection.
        local: Option<SocketAddr>,
    },
    /// The client's answer to a challenge (base64).
    Continue(String),
    /// The client gave up (`*`), or the session ended.
    Abort,
}

/// The auth server's answer to a session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SaslReply {
    /// A challenge (base64) for a `334` reply.
    Cont(String),
    /// Authenticated as this user.
    Ok(String),
    /// Refused (535); the reason as Postfix reports it, and the login
    /// name the auth server saw (`user=` of its FAIL line), which the
    /// warning names as Postfix's does.
    Fail(String, Option<String>),
    /// The server could not decide (454).
    Temp(String),
}

/// What the loop delivers to a session.
#[derive(Debug)]
pub enum Delivery {
    Mechs(Option<Vec<String>>),
    Reply(SaslReply),
}

enum Stream {
    Unix(UnixStream),
    Tcp(TcpStream),
}

impl Stream {
    fn source(&mut self) -> &mut dyn Source {
        match self {
            Stream::Unix(s) => s,
            Stream::Tcp(s) => s,
        }
    }
}

impl Read for Stream {
    fn read(&mut self, b: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Unix(s) => s.read(b),
            Stream::Tcp(s) => s.read(b),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, b: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Unix(s) => s.write(b),
            Stream::Tcp(s) => s.write(b),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ConnState {
    Down,
    Handshake,
    Ready,
}

/// One request in flight: whose it is.
struct Pending {
    slot: usize,
}

/// The process's connection to the auth server.
pub struct AuthConn {
    target: AuthTarget,
    service: String,
    token: Token,
    sock: Option<Stream>,
    /// WRITABLE only while a request waits for room.
    writable: WriteInterest,
    state: ConnState,
    out: Vec<u8>,
    inbuf: Vec<u8>,
    mechs: Vec<String>,
    next_id: u32,
    pending: HashMap<u32, Pending>,
    /// The request ID of each slot's current authentication.
    by_slot: HashMap<usize, u32>,
    waiting_mechs: Vec<usize>,
    last_failure: Option<Instant>,
    /// Answers decided without the server (connect failures).
    ready_deliveries: Vec<(usize, Delivery)>,
}

impl AuthConn {
    pub fn new(target: AuthTarget, service: String, token: Token) -> AuthConn {
        AuthConn {
            target,
            service,
            token,
            sock: None,
            writable: WriteInterest::default(),
            state: ConnState::Down,
            out: Vec::new(),
            inbuf: Vec::new(),
            mechs: Vec::new(),
            next_id: 1,
            pending: HashMap::new(),
            by_slot: HashMap::new(),
            waiting_mechs: Vec::new(),
            last_failure: None,
            ready_deliveries: Vec::new(),
        }
    }

    /// The mechanism list, once the handshake is done.
    pub fn mechs(&self) -> Option<Vec<String>> {
        (self.state == ConnState::Ready).then(|| self.mechs.clone())
    }

    fn connect(&mut self, registry: &Registry) {
        if self.state != ConnState::Down {
            return;
        }
        if self
            .last_failure
            .is_some_and(|t| t.elapsed() < RECONNECT_DELAY)
        {
            self.fail_all("Connection lost to authentication server", registry);
            return;
        }
        let sock = match &self.target {
            AuthTarget::Unix(p) => UnixStream::connect(p).map(Stream::Unix),
            AuthTarget::Inet(a) => TcpStream::connect(*a).map(Stream::Tcp),
        };
        let mut sock = match sock {
            Ok(s) => s,
            Err(e) => {
                warning!("SASL: Connect to {} failed: {e}", self.target);
                self.last_failure = Some(Instant::now());
                self.fail_all("Connection lost to authentication server", registry);
                return;
            }
        };
        // WRITABLE only when a write is held up (see `pump`): the
        // server is written to on every turn.
        if let Err(e) = registry.register(sock.source(), self.token, Interest::READABLE) {
            warning!("SASL: register connection to {}: {e}", self.target);
            self.last_failure = Some(Instant::now());
            self.fail_all("Connection lost to authentication server", registry);
            return;
        }
        self.sock = Some(sock);
        self.writable = WriteInterest::default();
        self.state = ConnState::Handshake;
        self.mechs.clear();
        self.inbuf.clear();
        self.out.clear();
        self.out
            .extend_from_slice(format!("VERSION\t1\t0\nCPID\t{}\n", std::process::id()).as_bytes());
    }

    /// Drops the connection; every request in flight fails temporarily.
    fn fail_all(&mut self, why: &str, registry: &Registry) {
        if let Some(mut s) = self.sock.take() {
            let _ = registry.deregister(s.source());
        }
        self.state = ConnState::Down;
        self.out.clear();
        self.inbuf.clear();
        for idx in self.waiting_mechs.drain(..) {
            self.ready_deliveries.push((idx, Delivery::Mechs(None)));
        }
        for (_, p) in self.pending.drain() {
            self.ready_deliveries
                .push((p.slot, Delivery::Reply(SaslReply::Temp(why.to_string()))));
        }
        self.by_slot.clear();
    }

    /// Takes a session's request.
    pub fn submit(&mut self, slot: usize, req: SaslRequest, registry: &Registry) {
        match req {
            SaslRequest::Mechs => {
                if self.state == ConnState::Ready {
                    self.ready_deliveries
                        .push((slot, Delivery::Mechs(Some(self.mechs.clone()))));
                } else {
                    self.waiting_mechs.push(slot);
                    self.connect(registry);
                }
            }
            SaslRequest::Start {
                mech,
                resp,
                secured,
                rip,
                rport,
                local,
            } => {
                if let Some(id) = self.by_slot.remove(&slot) {
                    self.pending.remove(&id);
                }
                if self.state == ConnState::Down {
                    self.connect(registry);
                }
                if self.state == ConnState::Down {
                    self.ready_deliveries.push((
                        slot,
                        Delivery::Reply(SaslReply::Temp(
                            "Connection lost to authentication server".into(),
                        )),
                    ));
                    return;
                }
                let id = self.next_id;
                self.next_id = self.next_id.wrapping_add(1).max(1);
                let mut line = format!("AUTH\t{id}\t{mech}\tservice={}\tnologin", self.service);
                if let Some(l) = local {
                    line.push_str(&format!("\tlip={}", l.ip()));
                }
                line.push_str(&format!("\trip={rip}"));
                if let Some(l) = local {
                    line.push_str(&format!("\tlport={}", l.port()));
                }
                if let Some(p) = rport {
                    line.push_str(&format!("\trport={p}"));
                }
                if secured {
                    line.push_str("\tsecured");
                }
                if let Some(r) = resp {
                    line.push_str("\tresp=");
                    line.push_str(&r);
                }
                line.push('\n');
                self.out.extend_from_slice(line.as_bytes());
                self.pending.insert(id, Pending { slot });
                self.by_slot.insert(slot, id);
            }
            SaslRequest::Continue(data) => {
                if let Some(id) = self.by_slot.get(&slot) {
                    self.out
                        .extend_from_slice(format!("CONT\t{id}\t{data}\n").as_bytes());
                } else {
                    self.ready_deliveries.push((
                        slot,
                        Delivery::Reply(SaslReply::Temp(
                            "Connection lost to authentication server".into(),
                        )),
                    ));
                }
            }
            SaslRequest::Abort => self.forget(slot),
        }
    }

    /// The slot is gone or gave up: its answers no longer matter.
    pub fn forget(&mut self, slot: usize) {
        if let Some(id) = self.by_slot.remove(&slot) {
            self.pending.remove(&id);
        }
        self.waiting_mechs.retain(|&s| s != slot);
        // Not for a later session in the same slot.
        self.ready_deliveries.retain(|(s, _)| *s != slot);
    }

    /// Moves bytes both ways and returns what the sessions get.
    pub fn pump(&mut self, registry: &Registry) -> Vec<(usize, Delivery)> {
        if self.sock.is_some() {
            if let Err(e) = self.io().and_then(|_| self.interest_fits(registry)) {
                warning!("SASL: connection to {}: {e}", self.target);
                self.last_failure = Some(Instant::now());
                self.fail_all("Connection lost to authentication server", registry);
            }
        }
        std::mem::take(&mut self.ready_deliveries)
    }

    /// Registers for WRITABLE while a request is left unwritten, and
    /// drops it once all went.
    fn interest_fits(&mut self, registry: &Registry) -> io::Result<()> {
        let pending = !self.out.is_empty();
        match &mut self.sock {
            Some(sock) => self
                .writable
                .fit(registry, sock.source(), self.token, pending),
            None => Ok(()),
        }
    }

    fn io(&mut self) -> io::Result<()> {
        let Some(sock) = &mut self.sock else {
            return Ok(());
        };
        while !self.out.is_empty() {
            match sock.write(&self.out) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => {
                    self.out.drain(..n);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::NotConnected => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        let mut buf = [0u8; 4096];
        loop {
            match sock.read(&mut buf) {
                Ok(0) => return Err(io::Error::other("connection closed by the server")),
                Ok(n) => self.inbuf.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::NotConnected => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        while let Some(i) = self.inbuf.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = self.inbuf.drain(..=i).collect();
            let line = String::from_utf8_lossy(&line[..i]).into_owned();
            self.line(&line)?;
        }
        if self.inbuf.len() > MAX_LINE {
            return Err(io::Error::other("line too long from the server"));
        }
        Ok(())
    }

    fn line(&mut self, line: &str) -> io::Result<()> {
        match parse_line(line) {
            Line::Version(major) if self.state == ConnState::Handshake && major != 1 => {
                return Err(io::Error::other(format!(
                    "authentication server protocol version {major} is not 1"
                )));
            }
            Line::Mech(name, true) if self.state == ConnState::Handshake => {
                self.mechs.push(name);
            }
            Line::Done if self.state == ConnState::Handshake => {
                self.state = ConnState::Ready;
                self.last_failure = None;
                for idx in self.waiting_mechs.drain(..) {
                    self.ready_deliveries
                        .push((idx, Delivery::Mechs(Some(self.mechs.clone()))));
                }
            }
            Line::Ok { id, user } => {
                if let Some(p) = self.pending.remove(&id) {
                    self.by_slot.remove(&p.slot);
                    let reply = match user {
                        Some(u) if !u.is_empty() => SaslReply::Ok(u),
                        _ => {
                            warning!("SASL: authentication server sent OK without user name");
                            SaslReply::Temp("Internal authentication server error".into())
                        }
                    };
                    self.ready_deliveries.push((p.slot, Delivery::Reply(reply)));
                }
            }
            Line::Cont { id, data } => {
                if let Some(p) = self.pending.get_mut(&id) {
                    self.ready_deliveries
                        .push((p.slot, Delivery::Reply(SaslReply::Cont(data))));
                }
            }
            Line::Fail {
                id,
                user,
                reason,
                temp,
            } => {
                if let Some(p) = self.pending.remove(&id) {
                    self.by_slot.remove(&p.slot);
                    // No reason from Dovecot (a wrong password): Postfix
                    // 3.7 says so in the reply and the log.
                    let why = reason.unwrap_or_else(|| "(reason unavailable)".into());
                    let reply = if temp {
                        SaslReply::Temp(why)
                    } else {
                        SaslReply::Fail(why, user)
                    };
                    self.ready_deliveries.push((p.slot, Delivery::Reply(reply)));
                }
            }
            _ => {}
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths() {
        let q = Path::new("/var/spool/postern");
        assert_eq!(
            parse_path("private/auth", q).unwrap(),
            AuthTarget::Unix("/var/spool/postern/private/auth".into())
        );
        assert_eq!(
            parse_path("/run/dovecot/auth-client", q).unwrap(),
            AuthTarget::Unix("/run/dovecot/auth-client".into())
        );
        assert_eq!(
            parse_path("inet:127.0.0.1:12345", q).unwrap(),
            AuthTarget::Inet("127.0.0.1:12345".parse().unwrap())
        );
        assert_eq!(
            parse_path("inet:[::1]:12345", q).unwrap(),
            AuthTarget::Inet("[::1]:12345".parse().unwrap())
        );
        assert!(parse_path("inet:127.0.0.1", q).is_err());
    }

    #[test]
    fn lines() {
        assert_eq!(parse_line("VERSION\t1\t2"), Line::Version(1));
        assert_eq!(
            parse_line("MECH\tPLAIN\tplaintext"),
            Line::Mech("PLAIN".into(), true)
        );
        assert_eq!(
            parse_line("MECH\tgssapi\tprivate"),
            Line::Mech("GSSAPI".into(), false)
        );
        assert_eq!(parse_line("DONE"), Line::Done);
        assert_eq!(
            parse_line("OK\t7\tuser=alice@example.test"),
            Line::Ok {
                id: 7,
                user: Some("alice@example.test".into())
            }
        );
        assert_eq!(
            parse_line("CONT\t3\tVXNlcm5hbWU6"),
            Line::Cont {
                id: 3,
                data: "VXNlcm5hbWU6".into()
            }
        );
        assert_eq!(
            parse_line("FAIL\t2\tuser=a\treason=bad\x01tthing\ttemp"),
            Line::Fail {
                id: 2,
                user: Some("a".into()),
                reason: Some("bad\tthing".into()),
                temp: true
            }
        );
        assert_eq!(
            parse_line("FAIL\t2\tuser=a"),
            Line::Fail {
                id: 2,
                user: Some("a".into()),
                reason: None,
                temp: false
            }
        );
        assert_eq!(parse_line("SPID\t1"), Line::Other);
    }
}
