//! The before-queue content filter (`smtpd_proxy_filter`, Postfix's
//! SMTPD_PROXY_README): smtpd's side of the SMTP conversation with the
//! filter, one connection per mail transaction.
//!
//! The conversation runs on a helper thread per connection, never on
//! the event loop: each read and write of the filter's socket blocks the
//! helper alone, for at most `smtpd_proxy_timeout`, while the loop serves
//! the process's other sessions. The session ([`crate::session`]) says
//! what to send as [`Step`]s; the loop hands them to the connection's
//! [`ProxyLink`], and the helper sends back an [`Event`] (through a
//! channel, waking the loop with a [`mio::Waker`]) for each step the
//! session waits on. Message content goes as it arrives; the loop stops
//! reading the client while more than [`CONTENT_HIGH`] bytes wait for the
//! filter (back-pressure), and the helper says when it has caught up.
//!
//! The exchange is Postfix's (smtpd_proxy.c): the greeting, `EHLO
//! $smtpd_proxy_ehlo`, XFORWARD with the client's attributes when the
//! filter announces it, the client's MAIL FROM, then each RCPT TO and
//! DATA as the client sent them, the content (with smtpd's Received
//! header) dot-stuffed with CRLF line ends, and the final dot, whose
//! reply is the client's. A filter that cannot be reached, breaks,
//! times out, or answers 2xx/3xx where it should not, gets the client
//! Postfix's made-up `451 4.3.0 Error: queue file write error` (and one of
//! Postfix's warnings); a filter's 4xx/5xx reply goes to the client as
//! it is (but a refused greeting, EHLO or XFORWARD is made up as well).
//! When the connection is dropped (the transaction ended) the helper
//! sends QUIT, closes, and exits.

use mio::Waker;
use postern_common::proxy_filter::{Endpoint, Options};
use postern_common::{info, warning};
use std::io::{self, Read, Write};

use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::Arc;
use std::time::Duration;

/// Content bytes waiting for the filter above which the client is not
/// read.
pub const CONTENT_HIGH: usize = 1024 * 1024;

/// Postfix's reply when the filter fails (CLEANUP_STAT_PROXY).
pub const PROXY_ERROR: &str = "451 4.3.0 Error: queue file write error";

/// The XFORWARD payload limit (Postfix's: a 512-byte command line).
const XFORWARD_PAYLOAD: usize = 512 - "250 XFORWARD\r\n".len();

/// The `smtpd_proxy_*` settings.
#[derive(Debug, Clone)]
pub struct ProxySettings {
    /// `smtpd_proxy_filter` as written (logs name the filter so).
    pub service: String,
    pub endpoint: Endpoint,
    pub timeout: Duration,
    pub ehlo: String,
    pub options: Options,
    /// Most bytes of a reply kept (`line_length_limit`).
    pub line_limit: usize,
}

/// What the session asks the filter connection to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Connect, read the greeting, EHLO, XFORWARD these attributes if the
    /// filter announces them (None: `[UNAVAILABLE]`), then send `mail`.
    Open {
        xforward: Vec<(&'static str, Option<String>)>,
        mail: String,
        report: bool,
    },
    /// A command line whose reply should begin with `expect`.
    Command {
        line: String,
        expect: u8,
        report: bool,
    },
    /// Message content: lines ending in LF, as received (not dot-stuffed).
    Content(Vec<u8>),
    /// The final dot; its reply is always reported.
    End,
}

/// What the loop asks of a session's proxy connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    /// A new connection (any old one is dropped).
    Start,
    Step(Step),
    /// Drop the connection (QUIT, close).
    Close,
}

/// What the helper tells the session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// The outcome of a reported step: `ok` (the reply it expected),
    /// the reply for the client, and whether the connection can go on.
    Reply {
        ok: bool,
        usable: bool,
        text: String,
    },
    /// Content went out: the client may be read again.
    Drained,
}

/// Events for the loop: (session slot, connection id, event).
pub type EventSender = Sender<(usize, u64, Event)>;

/// The loop's handle on one connection's helper thread.
pub struct ProxyLink {
    pub id: u64,
    tx: Sender<Step>,
    pending: Arc<AtomicUsize>,
}

impl ProxyLink {
    /// Starts the helper for session `idx`; it connects at the first step.
    pub fn start(
        settings: Arc<ProxySettings>,
        idx: usize,
        id: u64,
        events: EventSender,
        waker: Arc<Waker>,
    ) -> io::Result<ProxyLink> {
        let (tx, rx) = channel();
        let pending = Arc::new(AtomicUsize::new(0));
        let p = pending.clone();
        std::thread::Builder::new()
            .name("proxy".into())
            .spawn(move || {
                let mut w = Worker {
                    settings,
                    conn: None,
                    failure: None,
                    broken: false,
                    in_data: false,
                    line_start: true,
                    pending: p,
                    notify: Box::new(move |ev| {
                        let _ = events.send((idx, id, ev));
                        let _ = waker.wake();
                    }),
                };
                w.run(rx);
            })?;
        Ok(ProxyLink { id, tx, pending })
    }

    pub fn send(&self, step: Step) {
        if let Step::Content(c) = &step {
            self.pending.fetch_add(c.len(), Ordering::SeqCst);
        }
        let _ = self.tx.send(step);
    }

    /// Too much content waits for the filter: stop reading the client.
    pub fn backed_up(&self) -> bool {
        self.pending.load(Ordering::SeqCst) >= CONTENT_HIGH
    }
}

trait Stream: Read + Write + Send {}
impl<T: Read + Write + Send> Stream for T {}

/// Why the conversation broke.
enum Broke {
    /// Postfix's SMTP_ERR_TIME.
    Timeout,
    /// SMTP_ERR_EOF (or another I/O error).
    Lost,
}

struct Worker {
    settings: Arc<ProxySettings>,
    conn: Option<(Box<dyn Stream>, Vec<u8>)>,
    /// The reply owed to the next reported step (a step that was not
    /// reported failed, or the connection broke).
    failure: Option<String>,
    /// The connection is unusable.
    broken: bool,
    /// DATA was accepted and the final dot not sent: a QUIT now would be
    /// content.
    in_data: bool,
    /// The content sent so far ends with a line end.
    line_start: bool,
    pending: Arc<AtomicUsize>,
    notify: Box<dyn Fn(Event) + Send>,
}

impl Worker {
    fn run(&mut self, rx: Receiver<Step>) {
        while let Ok(step) = rx.recv() {
            self.step(step);
        }
        // Dropped: the transaction is over. In the middle of the content
        // (the client left) the connection just closes, and the filter
        // sees no final dot.
        if !self.broken && !self.in_data {
            if let Some((s, _)) = &mut self.conn {
                let _ = s.write_all(b"QUIT\r\n");
                let _ = s.flush();
            }
        }
    }

    fn step(&mut self, step: Step) {
        match step {
            Step::Content(c) => {
                let before = self.pending.fetch_sub(c.len(), Ordering::SeqCst);
                if self.failure.is_none() {
                    let mut out = Vec::with_capacity(c.len() + c.len() / 40 + 2);
                    for &b in &c {
                        if self.line_start && b == b'.' {
                            out.push(b'.');
                        }
                        if b == b'\n' {
                            out.push(b'\r');
                        }
                        out.push(b);
                        self.line_start = b == b'\n';
                    }
                    if let Err(b) = self.write(&out) {
                        self.broke(b);
                    }
                }
                if before >= CONTENT_HIGH && before - c.len() < CONTENT_HIGH {
                    (self.notify)(Event::Drained);
                }
            }
            Step::Open {
                xforward,
                mail,
                report,
            } => {
                let outcome = match &self.failure {
                    Some(f) => Err(f.clone()),
                    None => self.open(&xforward, &mail),
                };
                self.finish(outcome, report);
            }
            Step::Command {
                line,
                expect,
                report,
            } => {
                let outcome = match &self.failure {
                    Some(f) => Err(f.clone()),
                    None => self.command(&line, expect),
                };
                self.in_data = expect == b'3' && outcome.is_ok();
                self.finish(outcome, report);
            }
            Step::End => {
                let (ok, text) = match self.failure.take() {
                    Some(f) => (false, f),
                    None => {
                        let end: &[u8] = if self.line_start {
                            b".\r\n"
                        } else {
                            b"\r\n.\r\n"
                        };
                        match self.write(end).and_then(|_| self.reply()) {
                            Ok(r) => (r.starts_with('2'), r),
                            Err(b) => {
                                self.broke(b);
                                (false, self.failure.take().unwrap_or_default())
                            }
                        }
                    }
                };
                // Nothing follows but QUIT (the session drops the link).
                self.in_data = false;
                (self.notify)(Event::Reply {
                    ok,
                    usable: false,
                    text,
                });
            }
        }
    }

    /// Reports a step's outcome, or keeps a failure for the next
    /// reported step.
    fn finish(&mut self, outcome: Result<(), String>, report: bool) {
        match outcome {
            Ok(()) if report => (self.notify)(Event::Reply {
                ok: true,
                usable: true,
                text: String::new(),
            }),
            Ok(()) => {}
            Err(text) if report => {
                (self.notify)(Event::Reply {
                    ok: false,
                    usable: !self.broken,
                    text,
                });
            }
            Err(text) => {
                self.failure.get_or_insert(text);
            }
        }
    }

    /// The connection is lost: Postfix's warning, and its made-up reply
    /// for every step that follows.
    fn broke(&mut self, why: Broke) {
        let name = &self.settings.service;
        match why {
            Broke::Timeout => warning!("timeout talking to proxy {name}"),
            Broke::Lost => warning!("lost connection with proxy {name}"),
        }
        self.broken = true;
        self.failure = Some(PROXY_ERROR.to_string());
    }

    /// Connects and opens the transaction (smtpd_proxy_connect).
    fn open(
        &mut self,
        xforward: &[(&'static str, Option<String>)],
        mail: &str,
    ) -> Result<(), String> {
        match self.connect() {
            Ok(s) => self.conn = Some((s, Vec::new())),
            Err(e) => {
                warning!(
                    "connect to proxy filter {}: {}",
                    self.settings.service,
                    strerror(&e)
                );
                self.broken = true;
                return Err(PROXY_ERROR.to_string());
            }
        }
        // A refused greeting, EHLO or XFORWARD: our own reply, since the
        // client is at MAIL FROM or RCPT TO.
        let made_up = |w: &mut Worker, r: Result<String, String>| {
            r.map_err(|_| {
                w.broken = true;
                PROXY_ERROR.to_string()
            })
        };
        let r = self.expect("", b'2');
        made_up(self, r)?;
        let r = self.expect(&format!("EHLO {}", self.settings.ehlo), b'2');
        let ehlo = made_up(self, r)?;
        let offered = xforward_offered(&ehlo);
        if !offered.is_empty() {
            let mut payload = String::new();
            for (name, value) in xforward {
                if !offered.iter().any(|o| o.eq_ignore_ascii_case(name)) {
                    continue;
                }
                let v = match value {
                    Some(v) => postern_common::dsn::xtext_encode(v),
                    None => "[UNAVAILABLE]".to_string(),
                };
                let attr = format!(" {name}={v}");
                if attr.len() > XFORWARD_PAYLOAD {
                    warning!(
                        "XFORWARD command payload {name}={:.10}... exceeds SMTP protocol limit",
                        v
                    );
                    continue;
                }
                if !payload.is_empty() && payload.len() + attr.len() > XFORWARD_PAYLOAD {
                    let r = self.expect(&format!("XFORWARD{payload}"), b'2');
                    made_up(self, r)?;
                    payload.clear();
                }
                payload.push_str(&attr);
            }
            if !payload.is_empty() {
                let r = self.expect(&format!("XFORWARD{payload}"), b'2');
                made_up(self, r)?;
            }
        }
        // The client's MAIL FROM, which the filter should take: its
        // refusal goes to the client.
        match self.expect(mail, b'2') {
            Ok(_) => Ok(()),
            Err(r) => {
                self.broken = true;
                Err(r)
            }
        }
    }

    fn connect(&self) -> io::Result<Box<dyn Stream>> {
        let t = self.settings.timeout;
        Ok(match &self.settings.endpoint {
            Endpoint::Inet(host, port) => {
                Box::new(postern_common::tcp::connect((host.as_str(), *port), t)?)
            }
            Endpoint::Unix(p) => {
                let s = UnixStream::connect(p)?;
                s.set_read_timeout(Some(t))?;
                s.set_write_timeout(Some(t))?;
                Box::new(s)
            }
        })
    }

    /// Sends `line` (nothing when empty: the greeting) and reads the
    /// reply; Ok(reply) when it begins with `expect`, else Err(the reply
    /// for the client), with Postfix's warnings.
    fn command(&mut self, line: &str, expect: u8) -> Result<(), String> {
        self.expect(line, expect).map(|_| ())
    }

    fn expect(&mut self, line: &str, expect: u8) -> Result<String, String> {
        let sent = if line.is_empty() {
            Ok(())
        } else {
            self.write(format!("{line}\r\n").as_bytes())
        };
        let reply = match sent.and_then(|_| self.reply()) {
            Ok(r) => r,
            Err(b) => {
                self.broke(b);
                return Err(PROXY_ERROR.to_string());
            }
        };
        if reply.as_bytes().first() == Some(&expect) {
            return Ok(reply);
        }
        let what = if line.is_empty() {
            "connection request"
        } else {
            line
        };
        warning!(
            "proxy {} rejected \"{what}\": \"{reply}\"",
            self.settings.service
        );
        if matches!(reply.as_bytes().first(), Some(b'2' | b'3')) {
            // Not passed on (Postfix 2.6 and later): a protocol error.
            self.broken = true;
            self.failure = Some(PROXY_ERROR.to_string());
            return Err(PROXY_ERROR.to_string());
        }
        Err(reply)
    }

    fn write(&mut self, bytes: &[u8]) -> Result<(), Broke> {
        let Some((s, _)) = &mut self.conn else {
            return Err(Broke::Lost);
        };
        s.write_all(bytes).and_then(|_| s.flush()).map_err(broke_of)
    }

    /// One reply, its lines joined by CRLF (non-printable characters as
    /// `?`, at most `line_length_limit` bytes kept).
    fn reply(&mut self) -> Result<String, Broke> {
        let limit = self.settings.line_limit;
        let name = self.settings.service.clone();
        let Some((s, inbuf)) = &mut self.conn else {
            return Err(Broke::Lost);
        };
        let mut reply = String::new();
        loop {
            let line = read_line(s.as_mut(), inbuf, limit, &name)?;
            if reply.len() < limit {
                if !reply.is_empty() {
                    reply.push_str("\r\n");
                }
                reply.push_str(&line);
            }
            let digits = line.bytes().take_while(u8::is_ascii_digit).count();
            if digits == 3 {
                match line.as_bytes().get(3) {
                    Some(b'-') => continue,
                    None | Some(b' ') => return Ok(reply),
                    _ => {}
                }
            }
            warning!("received garbage from proxy {name}: {:.100}", line);
        }
    }
}

/// One line of the filter's reply, without its line end.
fn read_line(
    s: &mut dyn Stream,
    inbuf: &mut Vec<u8>,
    limit: usize,
    name: &str,
) -> Result<String, Broke> {
    let mut buf = [0u8; 4096];
    loop {
        if let Some(i) = inbuf.iter().position(|&b| b == b'\n') {
            let mut line: Vec<u8> = inbuf.drain(..=i).collect();
            line.pop();
            if line.last() == Some(&b'\r') {
                line.pop();
            }
            if line.len() > limit {
                warning!(
                    "{name}: response longer than {limit}: {:.30}...",
                    String::from_utf8_lossy(&line)
                );
                line.truncate(limit);
            }
            return Ok(printable(&line));
        }
        if inbuf.len() > 64 * limit.max(1024) {
            return Err(Broke::Lost);
        }
        match s.read(&mut buf) {
            Ok(0) => return Err(Broke::Lost),
            Ok(n) => inbuf.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(broke_of(e)),
        }
    }
}

/// An error as C's `%m` shows it (without Rust's "(os error N)").
fn strerror(e: &io::Error) -> String {
    let s = e.to_string();
    match s.find(" (os error ") {
        Some(i) => s[..i].to_string(),
        None => s,
    }
}

fn broke_of(e: io::Error) -> Broke {
    if matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    ) {
        Broke::Timeout
    } else {
        Broke::Lost
    }
}

/// Postfix's `printable(buf, '?')`.
fn printable(line: &[u8]) -> String {
    line.iter()
        .map(|&b| {
            if (0x20..0x7f).contains(&b) {
                b as char
            } else {
                '?'
            }
        })
        .collect()
}

/// The attribute names of the EHLO reply's XFORWARD line.
fn xforward_offered(ehlo: &str) -> Vec<String> {
    let mut names = Vec::new();
    for line in ehlo.split("\r\n") {
        let rest = line.get(4..).unwrap_or("");
        let mut words = rest.split([' ', '\t']).filter(|w| !w.is_empty());
        if words
            .next()
            .is_some_and(|w| w.eq_ignore_ascii_case("XFORWARD"))
        {
            names.extend(words.map(str::to_ascii_uppercase));
        }
    }
    names
}

/// Postfix's log line for the filter's end-of-data reply.
pub fn log_end(accepted: bool, reply: &str, whatsup: &str) {
    info!(
        "proxy-{}: END-OF-MESSAGE: {reply};{whatsup}",
        if accepted { "accept" } else { "reject" }
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn xforward_names() {
        let ehlo = "250-filter.test\r\n250-PIPELINING\r\n250-XFORWARD NAME ADDR PROTO HELO\r\n250 8BITMIME";
        assert_eq!(xforward_offered(ehlo), ["NAME", "ADDR", "PROTO", "HELO"]);
        assert!(xforward_offered("250 filter.test").is_empty());
    }

    /// Content as the session gives it (LF ends, dots undone, a long
    /// line in pieces) goes out dot-stuffed with CRLF ends, then the dot;
    /// the filter's reply to it is reported.
    #[test]
    fn content_is_dot_stuffed() {
        let (ours, mut filter) = UnixStream::pair().unwrap();
        filter.write_all(b"250 2.0.0 Ok: filtered\r\n").unwrap();
        let events = Arc::new(std::sync::Mutex::new(Vec::new()));
        let seen = events.clone();
        let mut w = Worker {
            settings: Arc::new(ProxySettings {
                service: "test".into(),
                endpoint: Endpoint::Unix("/nonexistent".into()),
                timeout: Duration::from_secs(5),
                ehlo: "postern.test".into(),
                options: Options::default(),
                line_limit: 2048,
            }),
            conn: Some((Box::new(ours), Vec::new())),
            failure: None,
            broken: false,
            in_data: true,
            line_start: true,
            pending: Arc::new(AtomicUsize::new(0)),
            notify: Box::new(move |ev| seen.lock().unwrap().push(ev)),
        };
        let (tx, rx) = channel();
        for piece in [&b".a\nb"[..], b".c\n", b".\n", b"end"] {
            w.pending.fetch_add(piece.len(), Ordering::SeqCst);
            tx.send(Step::Content(piece.to_vec())).unwrap();
        }
        tx.send(Step::End).unwrap();
        drop(tx); // the session dropped the link: QUIT
        w.run(rx);
        drop(w);
        let mut sent = Vec::new();
        filter.read_to_end(&mut sent).unwrap();
        assert_eq!(sent, b"..a\r\nb.c\r\n..\r\nend\r\n.\r\nQUIT\r\n");
        assert_eq!(
            *events.lock().unwrap(),
            [Event::Reply {
                ok: true,
                usable: false,
                text: "250 2.0.0 Ok: filtered".into()
            }]
        );
    }

    #[test]
    fn printable_replies() {
        assert_eq!(
            printable(b"550 5.7.1 bad\x01thing\xff"),
            "550 5.7.1 bad?thing?"
        );
    }
}
