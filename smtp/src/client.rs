//! The SMTP client conversation with one server, over any byte stream.
//!
//! [`deliver_with`] reads the greeting, says EHLO (HELO when EHLO is
//! refused; LHLO in LMTP mode), starts TLS as [`Security::tls`] says
//! (STARTTLS, or at once in wrapper mode, then EHLO again), authenticates
//! as [`Security::sasl`] says (AUTH PLAIN or LOGIN), sends MAIL FROM (SIZE,
//! BODY, SMTPUTF8, RET, ENVID), one RCPT TO per recipient (NOTIFY, ORCPT
//! when the server offers DSN) and DATA, streams the content with CRLF
//! line ends and dot-stuffing ([`DataEncoder`]), reads the reply to the
//! end of the data (in LMTP one per accepted recipient), and ends with
//! QUIT — or, with [`Settings::keep`], hands the session back as [`Idle`]
//! for [`deliver_again`] (RSET, then the next transaction; with
//! PIPELINING the RSET goes out with the MAIL, RCPT and DATA commands and
//! its reply is read first). With
//! PIPELINING the MAIL, RCPT and DATA commands go out in one write and
//! their replies are read in order (RFC 2920). When the server offers
//! CHUNKING (RFC 3030) the content goes as `BDAT n` chunks of at most 64
//! KiB of queue file (CRLF line ends, no dot-stuffing), the last `BDAT n
//! LAST`, instead of DATA. EHLO keywords in [`Settings::discard`]
//! (`smtp_discard_ehlo_keywords`) are ignored.
//!
//! What the conversation needs from the delivery is behind
//! [`Transaction`]: the envelope, the content, and a place to record each
//! recipient's outcome as soon as it is known. A failure that leaves
//! recipients without an outcome before any content was sent (refused
//! greeting or handshake, 421, 4xx to MAIL FROM, lost connection, time-out)
//! ends the session with [`End::TryNext`]: the caller tries the next
//! server or defers them. Once content has been sent, every recipient gets
//! an outcome here.
//!
//! The stream is anything [`Stream`]: a TCP connection, a Unix-domain
//! socket (LMTP), or either wrapped in TLS ([`crate::tls::TlsStream`]).

use crate::nexthop::{Failure, Server};
use crate::reply::{LineReader, Reply};
use postern_common::dsn;
use postern_common::ipc::Outcome;
use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::time::Duration;

/// A byte stream to a server whose I/O can be given a time limit.
pub trait Stream: Read + Write {
    /// Limits each following read and write to `t` (zero: no limit).
    fn set_timeout(&mut self, t: Duration) -> io::Result<()>;
}

impl<S: Stream + ?Sized> Stream for Box<S> {
    fn set_timeout(&mut self, t: Duration) -> io::Result<()> {
        (**self).set_timeout(t)
    }
}

impl<S: Stream + ?Sized> Stream for &mut S {
    fn set_timeout(&mut self, t: Duration) -> io::Result<()> {
        (**self).set_timeout(t)
    }
}

impl Stream for std::os::unix::net::UnixStream {
    fn set_timeout(&mut self, t: Duration) -> io::Result<()> {
        let t = (!t.is_zero()).then_some(t);
        self.set_read_timeout(t)?;
        self.set_write_timeout(t)
    }
}

impl Stream for TcpStream {
    fn set_timeout(&mut self, t: Duration) -> io::Result<()> {
        let t = (!t.is_zero()).then_some(t);
        self.set_read_timeout(t)?;
        self.set_write_timeout(t)
    }
}

/// Time limits of each stage (`smtp_*_timeout`).
#[derive(Debug, Clone)]
pub struct Timeouts {
    pub helo: Duration,
    pub mail: Duration,
    pub rcpt: Duration,
    pub data_init: Duration,
    pub data_xfer: Duration,
    pub data_done: Duration,
    pub quit: Duration,
}

/// How the client behaves.
#[derive(Debug, Clone)]
pub struct Settings {
    /// The name sent with EHLO/HELO (`smtp_helo_name`; LHLO:
    /// `lmtp_lhlo_name`).
    pub helo_name: String,
    pub timeouts: Timeouts,
    /// Speak LMTP (RFC 2033): LHLO, and one reply per accepted recipient
    /// after the content.
    pub lmtp: bool,
    /// Keep a session that ended well for another transaction (the
    /// connection cache) instead of saying QUIT.
    pub keep: bool,
    /// EHLO keywords to ignore, lower-case (`smtp_discard_ehlo_keywords`;
    /// LMTP: `lmtp_discard_lhlo_keywords`). `silent-discard` drops the
    /// log line that names them.
    pub discard: Vec<String>,
    /// The longest line sent, without its CRLF; longer ones are broken
    /// with CRLF SPACE (`smtp_line_length_limit`; LMTP:
    /// `lmtp_line_length_limit`). 0 = no limit.
    pub line_limit: usize,
}

/// Who a session talks to, as reasons and the `relay=` field name it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerId {
    /// The host name (MX host, next-hop host; `myhostname` for a Unix
    /// socket, as Postfix's lmtp).
    pub name: String,
    /// `name[addr]` (`name[path]` for a Unix socket).
    pub namaddr: String,
    /// `name[addr]:port` (`name[path]` for a Unix socket).
    pub relay: String,
}

impl From<&Server> for PeerId {
    fn from(s: &Server) -> PeerId {
        PeerId {
            name: s.name.clone(),
            namaddr: s.namaddr(),
            relay: s.relay(),
        }
    }
}

impl PeerId {
    /// A Unix-domain socket `path` on this host (`myhostname`).
    pub fn unix(myhostname: &str, path: &str) -> PeerId {
        let namaddr = format!("{myhostname}[{path}]");
        PeerId {
            name: myhostname.to_string(),
            relay: namaddr.clone(),
            namaddr,
        }
    }
}

/// What a server's EHLO reply offers.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Extensions {
    /// Said EHLO (false after a fallback to HELO).
    pub esmtp: bool,
    pub pipelining: bool,
    /// SIZE: `Some(0)` when offered without a limit.
    pub size: Option<u64>,
    pub eight_bit_mime: bool,
    pub smtputf8: bool,
    pub dsn: bool,
    pub starttls: bool,
    pub chunking: bool,
    /// AUTH mechanisms, upper-case.
    pub auth: Vec<String>,
}

impl Extensions {
    /// Parses an EHLO reply (every line but the first names an extension).
    pub fn parse(r: &Reply) -> Extensions {
        let mut e = Extensions {
            esmtp: true,
            ..Default::default()
        };
        for t in r.texts().skip(1) {
            let mut words = t.split_whitespace();
            let Some(kw) = words.next() else { continue };
            let kw = kw.to_ascii_uppercase();
            let (kw, first) = match kw.split_once('=') {
                // Old "AUTH=LOGIN PLAIN" form.
                Some((k, v)) => (k.to_string(), Some(v.to_string())),
                None => (kw, None),
            };
            match kw.as_str() {
                "PIPELINING" => e.pipelining = true,
                "SIZE" => e.size = Some(words.next().and_then(|n| n.parse().ok()).unwrap_or(0)),
                "8BITMIME" => e.eight_bit_mime = true,
                "SMTPUTF8" => e.smtputf8 = true,
                "DSN" => e.dsn = true,
                "STARTTLS" => e.starttls = true,
                "CHUNKING" => e.chunking = true,
                "AUTH" => {
                    for m in first.into_iter().chain(words.map(str::to_string)) {
                        let m = m.to_ascii_uppercase();
                        if !e.auth.contains(&m) {
                            e.auth.push(m);
                        }
                    }
                }
                _ => {}
            }
        }
        e
    }

    /// Forgets what `keywords` (lower-case) name; returns the names of
    /// the offered extensions forgotten, upper-case.
    pub fn discard(&mut self, keywords: &[String]) -> Vec<&'static str> {
        let mut gone = Vec::new();
        let has = |k: &str| keywords.iter().any(|w| w == k);
        let mut off = |on: &mut bool, name: &'static str| {
            if *on && has(&name.to_ascii_lowercase()) {
                *on = false;
                gone.push(name);
            }
        };
        off(&mut self.pipelining, "PIPELINING");
        off(&mut self.eight_bit_mime, "8BITMIME");
        off(&mut self.smtputf8, "SMTPUTF8");
        off(&mut self.dsn, "DSN");
        off(&mut self.starttls, "STARTTLS");
        off(&mut self.chunking, "CHUNKING");
        if self.size.is_some() && has("size") {
            self.size = None;
            gone.push("SIZE");
        }
        if !self.auth.is_empty() && has("auth") {
            self.auth.clear();
            gone.push("AUTH");
        }
        gone
    }
}

/// The delivery as the conversation sees it. Recipients are numbered
/// from 0 in the order they are sent.
pub trait Transaction {
    /// The envelope sender, "" for the null sender.
    fn sender(&self) -> &str;
    fn recipients(&self) -> &[String];
    /// Content size in bytes (for SIZE=).
    fn content_size(&self) -> u64;
    /// Whether the content has bytes above 127 (for BODY=8BITMIME).
    fn eight_bit(&mut self) -> io::Result<bool>;
    /// The content: LF-terminated lines, as queued.
    fn content(&mut self) -> io::Result<Box<dyn Read + '_>>;
    /// The connection is up and the server greeted and answered EHLO/HELO.
    fn connected(&mut self);
    /// Records recipient `i`'s outcome. Called at most once per recipient.
    fn record(&mut self, i: usize, outcome: Outcome, dsn: &str, reason: &str);
    /// RFC 3461 RET (`FULL`/`HDRS`) and ENVID (decoded) of the message.
    fn dsn_envelope(&mut self) -> (Option<String>, Option<String>) {
        (None, None)
    }
    /// The message's SMTPUTF8 flags (RFC 6531).
    fn smtputf8(&mut self) -> postern_common::smtputf8::Flags {
        Default::default()
    }
    /// RFC 3461 NOTIFY bits and ORCPT (`type;address`, decoded) of
    /// recipient `i`.
    fn dsn_recipient(&self, _i: usize) -> (u8, String) {
        (0, String::new())
    }
    /// The queue ID, for log lines about the content.
    fn queue_id(&self) -> &str {
        ""
    }
}

/// How a session ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum End {
    /// Every recipient of the transaction has an outcome.
    Complete,
    /// Nothing was sent: the recipients without an outcome may try the
    /// next server, or be deferred with `failure` when none is left.
    /// `handshake` says whether the server got as far as EHLO/HELO.
    TryNext { failure: Failure, handshake: bool },
}

/// Converts queued content (LF line ends) to SMTP DATA: CRLF line ends
/// (a CR already before the LF is kept as is), a dot doubled at the start
/// of a line, a final CRLF when the content lacks one, and the `.` line.
/// Lines longer than the line length limit (`smtp_line_length_limit`,
/// `lmtp_line_length_limit`; 0 = none) are broken with CRLF SPACE, as
/// Postfix's smtp does, so that a receiver enforcing RFC 5321's 1,000
/// octets takes them and no octet is lost (the inserted space makes the
/// break a header continuation or, in a body, harmless to MIME). Unlike
/// Postfix, a doubled dot counts against the limit: it is on the wire.
/// Works chunk by chunk: a line may span any number of chunks. For BDAT
/// ([`DataEncoder::bdat`]) the same without the dots: BDAT carries the
/// octets as they are.
#[derive(Debug, Clone)]
pub struct DataEncoder {
    /// Octets on the output line so far, not counting its CRLF.
    column: usize,
    /// The last input octet was a CR, not yet written: it belongs to the
    /// line end when an LF follows, to the line otherwise.
    pending_cr: bool,
    /// DATA: dot-stuffing and the final `.` line.
    dots: bool,
    /// The longest output line, without its CRLF; 0 = no limit.
    limit: usize,
    /// Some line was broken.
    folded: bool,
}

impl Default for DataEncoder {
    fn default() -> Self {
        Self::new()
    }
}

impl DataEncoder {
    pub fn new() -> DataEncoder {
        DataEncoder {
            column: 0,
            pending_cr: false,
            dots: true,
            limit: 0,
            folded: false,
        }
    }

    /// For BDAT chunks: CRLF line ends only, no dot-stuffing, no `.` line.
    pub fn bdat() -> DataEncoder {
        DataEncoder {
            dots: false,
            ..DataEncoder::new()
        }
    }

    /// Breaks lines longer than `limit` octets (without the CRLF); 0 = no
    /// limit. A limit of 1 is taken as 2: a continuation line holds its
    /// space and at least one octet.
    pub fn line_limit(mut self, limit: usize) -> DataEncoder {
        self.limit = if limit == 1 { 2 } else { limit };
        self
    }

    /// Whether some line was broken.
    pub fn folded(&self) -> bool {
        self.folded
    }

    /// Appends the encoding of `input` to `out`.
    pub fn feed(&mut self, input: &[u8], out: &mut Vec<u8>) {
        let mut rest = input;
        if self.pending_cr && !rest.is_empty() {
            self.pending_cr = false;
            if rest[0] == b'\n' {
                out.extend_from_slice(b"\r\n");
                self.column = 0;
                rest = &rest[1..];
            } else {
                self.text(b"\r", out);
            }
        }
        while !rest.is_empty() {
            match rest.iter().position(|&b| b == b'\n') {
                Some(p) => {
                    // A CR before the LF is part of the line end.
                    let line = rest[..p].strip_suffix(b"\r").unwrap_or(&rest[..p]);
                    self.text(line, out);
                    out.extend_from_slice(b"\r\n");
                    self.column = 0;
                    rest = &rest[p + 1..];
                }
                None => {
                    let (line, cr) = match rest.strip_suffix(b"\r") {
                        Some(l) => (l, true),
                        None => (rest, false),
                    };
                    self.text(line, out);
                    self.pending_cr = cr;
                    rest = &[];
                }
            }
        }
    }

    /// Writes octets of a line (no line end among them), doubling a dot
    /// that starts it and breaking it at the limit.
    fn text(&mut self, mut data: &[u8], out: &mut Vec<u8>) {
        if data.is_empty() {
            return;
        }
        if self.dots && self.column == 0 && data[0] == b'.' {
            out.push(b'.');
            self.column = 1;
        }
        if self.limit > 0 {
            // A line exactly at the limit is left alone: it is broken
            // only when one more octet comes.
            while self.column + data.len() > self.limit {
                let room = self.limit - self.column;
                out.extend_from_slice(&data[..room]);
                out.extend_from_slice(b"\r\n ");
                self.column = 1;
                self.folded = true;
                data = &data[room..];
            }
        }
        out.extend_from_slice(data);
        self.column += data.len();
    }

    /// Appends the end: a CRLF if the last line lacks one, then `.` CRLF.
    pub fn finish(&mut self, out: &mut Vec<u8>) {
        if self.pending_cr || self.column > 0 {
            out.extend_from_slice(b"\r\n");
            self.pending_cr = false;
            self.column = 0;
        }
        if self.dots {
            out.extend_from_slice(b".\r\n");
        }
    }
}

/// `<address>` for MAIL FROM / RCPT TO, with the local part quoted when
/// it is not a dot-atom (RFC 5321 section 4.1.2).
pub fn smtp_address(addr: &str) -> String {
    if addr.is_empty() {
        return "<>".into();
    }
    let (local, domain) = match addr.rfind('@') {
        Some(i) => (&addr[..i], Some(&addr[i..])),
        None => (addr, None),
    };
    let atext =
        |c: char| c.is_ascii_alphanumeric() || "!#$%&'*+-/=?^_`{|}~".contains(c) || !c.is_ascii();
    let dot_atom = !local.is_empty()
        && local
            .split('.')
            .all(|w| !w.is_empty() && w.chars().all(atext));
    let quoted = local.len() >= 2 && local.starts_with('"') && local.ends_with('"');
    let local = if dot_atom || quoted {
        local.to_string()
    } else {
        let mut q = String::from("\"");
        for c in local.chars() {
            if c == '"' || c == '\\' {
                q.push('\\');
            }
            q.push(c);
        }
        q.push('"');
        q
    };
    format!("<{}{}>", local, domain.unwrap_or(""))
}

/// The failure reason of a TLS handshake that did not complete; at level
/// `may` the caller may try the same server again in plaintext.
pub const TLS_HANDSHAKE_FAILURE: &str = "Cannot start TLS: handshake failure";

/// Stands in for the connection while STARTTLS wraps it.
struct Closed;

impl Read for Closed {
    fn read(&mut self, _: &mut [u8]) -> io::Result<usize> {
        Err(io::ErrorKind::NotConnected.into())
    }
}

impl Write for Closed {
    fn write(&mut self, _: &[u8]) -> io::Result<usize> {
        Err(io::ErrorKind::NotConnected.into())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Stream for Closed {
    fn set_timeout(&mut self, _: Duration) -> io::Result<()> {
        Ok(())
    }
}

/// Postfix's words for a stage of the conversation, in "lost connection
/// with HOST while ..." and "conversation with HOST timed out while ...".
mod stage {
    pub const GREETING: &str = "receiving the initial server greeting";
    pub const EHLO: &str = "performing the EHLO handshake";
    pub const LHLO: &str = "performing the LHLO handshake";
    pub const STARTTLS: &str = "receiving the STARTTLS response";
    pub const HELO: &str = "performing the HELO handshake";
    pub const MAIL: &str = "sending MAIL FROM";
    pub const RCPT: &str = "sending RCPT TO";
    pub const DATA: &str = "sending DATA command";
    pub const BODY: &str = "sending message body";
    pub const DOT: &str = "sending end of data -- message may be sent more than once";
    pub const BDAT: &str = "sending BDAT command";
}

/// Runs one mail transaction with `peer` over `stream`. See the module doc.
#[cfg(test)]
pub fn deliver<'a, S: Stream + Send + 'a, T: Transaction>(
    stream: S,
    peer: impl Into<PeerId>,
    settings: &'a Settings,
    txn: &mut T,
) -> End {
    deliver_with(stream, peer, settings, Security::default(), txn).0
}

/// Another transaction over a kept session: RSET first (which also shows
/// that the server is still there; pipelined with the transaction's
/// commands when the server offers PIPELINING). `None` when the session is
/// no longer usable; no content was sent then, no recipient has an
/// outcome, and the caller connects afresh.
pub fn deliver_again<'a, 'c, T: Transaction>(
    idle: Idle<'c>,
    peer: impl Into<PeerId>,
    settings: &'a Settings,
    sec: Security<'a>,
    txn: &mut T,
) -> Option<(End, Option<Idle<'c>>)> {
    let mut s = Session {
        conn: idle.conn,
        tls: sec.tls,
        sasl: sec.sasl,
        encrypted: idle.encrypted,
        reusable: false,
        ext: Some(idle.ext.clone()),
        rd: LineReader::new(),
        wbuf: Vec::with_capacity(4096),
        peer: peer.into(),
        settings,
        handshake: true,
        time_limit: None,
        rset_queued: false,
        stale: false,
    };
    if idle.ext.pipelining {
        // Sent with the transaction's commands rather than a round trip
        // of its own: its reply still comes before any content is sent.
        s.queue("RSET");
        s.rset_queued = true;
    } else {
        s.timeout(settings.timeouts.helo);
        match s.command(Some("RSET")) {
            Ok(r) if r.class() == 2 => {}
            _ => return None,
        }
    }
    txn.connected();
    let end = s.transaction(txn, &idle.ext);
    if s.stale {
        return None;
    }
    Some(s.finish(end))
}

/// STARTTLS and AUTH for one session.
#[derive(Debug, Clone, Copy, Default)]
pub struct Security<'a> {
    /// None: never STARTTLS.
    pub tls: Option<&'a crate::tls::Client>,
    /// None: never AUTH.
    pub sasl: Option<&'a crate::sasl::Auth>,
}

/// A session kept open after a transaction (`Settings::keep`), ready for
/// another one with [`deliver_again`].
pub struct Idle<'c> {
    conn: Box<dyn Stream + Send + 'c>,
    ext: Extensions,
    encrypted: bool,
}

impl Idle<'_> {
    /// Ends the session politely.
    pub fn quit(mut self, timeout: Duration) {
        let _ = self.conn.set_timeout(timeout);
        if self.conn.write_all(b"QUIT\r\n").is_ok() && self.conn.flush().is_ok() {
            let _ = LineReader::new().read_reply(&mut self.conn);
        }
    }
}

/// Runs one mail transaction with `peer` over `stream`, with STARTTLS
/// and AUTH as `sec` says (see the module doc). With `settings.keep`, a
/// session that ended well comes back as [`Idle`].
pub fn deliver_with<'a, 'c, S: Stream + Send + 'c, T: Transaction>(
    stream: S,
    peer: impl Into<PeerId>,
    settings: &'a Settings,
    sec: Security<'a>,
    txn: &mut T,
) -> (End, Option<Idle<'c>>) {
    let mut s = Session {
        tls: sec.tls,
        sasl: sec.sasl,
        encrypted: false,
        reusable: false,
        ext: None,
        conn: Box::new(stream),
        peer: peer.into(),
        rd: LineReader::new(),
        wbuf: Vec::with_capacity(4096),
        settings,
        handshake: false,
        time_limit: None,
        rset_queued: false,
        stale: false,
    };
    let end = s.run(txn);
    s.finish(end)
}

struct Session<'a, 'c> {
    conn: Box<dyn Stream + Send + 'c>,
    /// The transaction ended well and `settings.keep` is set.
    reusable: bool,
    /// What the server offered (after STARTTLS, when used).
    ext: Option<Extensions>,
    tls: Option<&'a crate::tls::Client>,
    sasl: Option<&'a crate::sasl::Auth>,
    /// STARTTLS succeeded.
    encrypted: bool,
    rd: LineReader,
    wbuf: Vec<u8>,
    peer: PeerId,
    settings: &'a Settings,
    handshake: bool,
    /// The limit last set on `conn`: a stage with the same limit as the
    /// one before costs no system calls.
    time_limit: Option<Duration>,
    /// A kept session's RSET waits in `wbuf` to go out with the MAIL,
    /// RCPT and DATA commands (PIPELINING); its reply comes first.
    rset_queued: bool,
    /// That RSET was not answered 2xx (or the session was gone): nothing
    /// was delivered, and the caller starts a new session.
    stale: bool,
}

impl<'a, 'c> Session<'a, 'c> {
    fn timeout(&mut self, t: Duration) {
        if self.time_limit == Some(t) {
            return;
        }
        // A stream that cannot take a time limit still works.
        self.time_limit = self.conn.set_timeout(t).ok().map(|_| t);
    }

    fn queue(&mut self, cmd: &str) {
        if postern_common::log::verbose() {
            postern_common::debug!("> {}: {}", self.peer.namaddr, cmd);
        }
        self.wbuf.extend_from_slice(cmd.as_bytes());
        self.wbuf.extend_from_slice(b"\r\n");
    }

    fn flush(&mut self) -> io::Result<()> {
        let r = self
            .conn
            .write_all(&self.wbuf)
            .and_then(|_| self.conn.flush());
        self.wbuf.clear();
        r
    }

    fn read(&mut self) -> io::Result<Reply> {
        let r = self.rd.read_reply(&mut self.conn)?;
        if postern_common::log::verbose() {
            postern_common::debug!("< {}: {}", self.peer.namaddr, r.text());
        }
        Ok(r)
    }

    /// Sends `cmd` (unless already sent in a pipelined batch) and reads
    /// its reply.
    fn command(&mut self, cmd: Option<&str>) -> io::Result<Reply> {
        if let Some(c) = cmd {
            self.queue(c);
            self.flush()?;
        }
        self.read()
    }

    /// The failure for an I/O error at a stage.
    fn io_failure(&self, e: &io::Error, stage: &str) -> Failure {
        let timed_out = matches!(
            e.kind(),
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
        );
        Failure {
            dsn: "4.4.2".into(),
            reason: if timed_out {
                format!(
                    "conversation with {} timed out while {stage}",
                    self.peer.namaddr
                )
            } else {
                format!("lost connection with {} while {stage}", self.peer.namaddr)
            },
        }
    }

    fn try_next(&self, failure: Failure) -> End {
        End::TryNext {
            failure,
            handshake: self.handshake,
        }
    }

    /// The outcome, DSN and reason for a failed reply to `what`
    /// ("RCPT TO command"): 4xx deferred, 5xx bounced, anything else a
    /// protocol error (deferred).
    fn said(&self, r: &Reply, what: &str) -> (Outcome, String, String) {
        let text = format!(
            "host {} said: {} (in reply to {what})",
            self.peer.namaddr,
            r.text()
        );
        match r.class() {
            5 => (Outcome::Bounced, r.dsn(), text),
            4 => (Outcome::Deferred, r.dsn(), text),
            _ => (
                Outcome::Deferred,
                "4.5.0".into(),
                format!("Protocol error: {text}"),
            ),
        }
    }

    fn refused(&self, r: &Reply) -> Failure {
        Failure {
            dsn: r.dsn(),
            reason: format!(
                "host {} refused to talk to me: {}",
                self.peer.namaddr,
                r.text()
            ),
        }
    }

    /// The transaction is over and the server still talking: keep the
    /// session for the next request when `settings.keep`, else QUIT.
    fn done(&mut self) {
        if self.settings.keep {
            self.reusable = true;
        } else {
            self.quit();
        }
    }

    /// Sends QUIT and reads its reply, ignoring any trouble.
    fn quit(&mut self) {
        self.timeout(self.settings.timeouts.quit);
        self.queue("QUIT");
        if self.flush().is_ok() {
            let _ = self.read();
        }
    }

    fn record_all<T: Transaction>(
        txn: &mut T,
        which: &[usize],
        outcome: Outcome,
        dsn: &str,
        reason: &str,
    ) {
        for &i in which {
            txn.record(i, outcome, dsn, reason);
        }
    }

    fn run<T: Transaction>(&mut self, txn: &mut T) -> End {
        let t = self.settings.timeouts.clone();
        self.timeout(t.helo);
        if let Some(tls) = self.tls.filter(|t| t.wrapper) {
            // smtp_tls_wrappermode: TLS before the greeting (SMTPS).
            if let Err(end) = self.tls_handshake(tls) {
                return end;
            }
        }
        let greeting = match self.read() {
            Ok(r) => r,
            Err(e) => return self.try_next(self.io_failure(&e, stage::GREETING)),
        };
        if greeting.class() != 2 {
            // As Postfix with smtp_skip_5xx_greeting: a refusal to talk is
            // never final for this destination.
            let mut f = self.refused(&greeting);
            if f.dsn.starts_with('5') {
                f.dsn.replace_range(0..1, "4");
            }
            if greeting.code != 421 {
                self.quit();
            }
            return self.try_next(f);
        }
        let (verb, ehlo_stage) = if self.settings.lmtp {
            ("LHLO", stage::LHLO)
        } else {
            ("EHLO", stage::EHLO)
        };
        let ehlo = format!("{verb} {}", self.settings.helo_name);
        let ext = match self.command(Some(&ehlo)) {
            Err(e) => return self.try_next(self.io_failure(&e, ehlo_stage)),
            Ok(r) if r.class() == 2 => self.extensions(&r),
            Ok(r) if r.code == 421 || self.settings.lmtp => {
                // LMTP has no HELO to fall back to.
                return self.try_next(self.refused(&r));
            }
            Ok(_) => {
                let helo = format!("HELO {}", self.settings.helo_name);
                match self.command(Some(&helo)) {
                    Err(e) => return self.try_next(self.io_failure(&e, stage::HELO)),
                    Ok(r) if r.class() == 2 => Extensions::default(),
                    Ok(r) => {
                        let f = self.refused(&r);
                        if r.class() == 5 {
                            self.quit();
                            let all: Vec<usize> = (0..txn.recipients().len()).collect();
                            Self::record_all(txn, &all, Outcome::Bounced, &f.dsn, &f.reason);
                            return End::Complete;
                        }
                        if r.code != 421 {
                            self.quit();
                        }
                        return self.try_next(f);
                    }
                }
            }
        };
        self.handshake = true;
        let ext = match self.start_tls(ext, &ehlo, ehlo_stage) {
            Ok(e) => e,
            Err(end) => return end,
        };
        if let Some(auth) = self.sasl {
            if !ext.auth.is_empty() {
                if let Err(end) = self.authenticate(auth, &ext) {
                    return end;
                }
            }
        }
        txn.connected();
        self.ext = Some(ext.clone());
        self.transaction(txn, &ext)
    }

    /// What an EHLO/LHLO reply offers, less the discarded keywords
    /// (logged as Postfix does unless `silent-discard` is set).
    fn extensions(&self, r: &Reply) -> Extensions {
        let mut ext = Extensions::parse(r);
        let gone = ext.discard(&self.settings.discard);
        if !gone.is_empty() && !self.settings.discard.iter().any(|k| k == "silent-discard") {
            postern_common::info!("discarding EHLO keywords: {}", gone.join(" "));
        }
        ext
    }

    /// The session's end, and the session itself when it may be reused.
    fn finish(self, end: End) -> (End, Option<Idle<'c>>) {
        match (self.reusable, self.ext) {
            (true, Some(ext)) if end == End::Complete => (
                end,
                Some(Idle {
                    conn: self.conn,
                    ext,
                    encrypted: self.encrypted,
                }),
            ),
            _ => (end, None),
        }
    }

    /// AUTH with the first allowed mechanism the server offers.
    fn authenticate(&mut self, auth: &crate::sasl::Auth, ext: &Extensions) -> Result<(), End> {
        use crate::sasl::{plain_response, Mechanism};
        use postern_common::base64;
        let Some(mech) = auth.choose(&ext.auth, self.encrypted) else {
            let f = Failure {
                dsn: "4.7.0".into(),
                reason: format!(
                    "SASL authentication failed; cannot authenticate to server {}: no mechanism available",
                    self.peer.namaddr
                ),
            };
            postern_common::warning!("{}", f.reason);
            self.quit();
            return Err(self.try_next(f));
        };
        let stage = "performing the AUTH handshake";
        let step = |s: &mut Self, cmd: String| {
            s.command(Some(&cmd))
                .map_err(|e| s.try_next(s.io_failure(&e, stage)))
        };
        let r = match mech {
            Mechanism::Plain => step(self, format!("AUTH PLAIN {}", plain_response(&auth.creds)))?,
            Mechanism::Login => {
                let mut r = step(self, "AUTH LOGIN".into())?;
                if r.code == 334 {
                    r = step(self, base64::encode(auth.creds.user.as_bytes()))?;
                }
                if r.code == 334 {
                    r = step(self, base64::encode(auth.creds.pass.as_bytes()))?;
                }
                r
            }
        };
        if r.class() == 2 {
            return Ok(());
        }
        // As Postfix with smtp_sasl_auth_soft_bounce = yes: never a bounce.
        let mut dsn = r.dsn();
        if !dsn.starts_with('4') {
            dsn.replace_range(0..1, "4");
        }
        let f = Failure {
            dsn,
            reason: format!(
                "SASL authentication failed; server {} said: {}",
                self.peer.namaddr,
                r.text()
            ),
        };
        postern_common::warning!("{}", f.reason);
        if r.code != 421 {
            self.quit();
        }
        Err(self.try_next(f))
    }

    /// The TLS handshake over the connection (after 220 to STARTTLS, or
    /// at once in wrapper mode), its log line, and the certificate check
    /// the level asks for.
    fn tls_handshake(&mut self, tls: &crate::tls::Client) -> Result<(), End> {
        use crate::tls::Trust;
        // Nothing the server sent before the handshake may count after it.
        self.rd = LineReader::new();
        let sock = std::mem::replace(&mut self.conn, Box::new(Closed));
        let est = match tls.handshake(sock, &self.peer.name) {
            Ok(est) => est,
            Err(e) => {
                postern_common::info!("SSL_connect error to {}: {e}", self.peer.relay);
                return Err(self.try_next(Failure {
                    dsn: "4.7.5".into(),
                    reason: TLS_HANDSHAKE_FAILURE.into(),
                }));
            }
        };
        let stream: Box<dyn Stream + Send + 'c> = Box::new(est.stream);
        self.conn = stream;
        // A new stream over the socket: set its limits anew.
        self.time_limit = None;
        self.encrypted = true;
        let level = tls.policy.level;
        let kind = match &est.trust {
            Trust::Verified if level.checks_certificate() => "Verified",
            Trust::Verified | Trust::Trusted => "Trusted",
            Trust::Untrusted(_) => "Untrusted",
        };
        if tls.loglevel >= 1 {
            let what = est
                .negotiated
                .as_ref()
                .map(|n| {
                    let mut t = n.summary();
                    if let Some(kx) = &n.kx {
                        t.push_str(&format!(" key-exchange {kx}"));
                    }
                    t
                })
                .unwrap_or_default();
            postern_common::info!(
                "{kind} TLS connection established to {}: {what}",
                self.peer.relay
            );
        }
        if level.checks_certificate() && est.trust != Trust::Verified {
            let (detail, reason) = match &est.trust {
                Trust::Untrusted(d) => (d.clone(), "Server certificate not trusted"),
                _ => (
                    format!("certificate does not match {}", tls.names.join(", ")),
                    "Server certificate not verified",
                ),
            };
            postern_common::info!(
                "server certificate verification failed for {}: {detail}",
                self.peer.relay
            );
            // Say nothing more to a server we do not trust.
            return Err(self.try_next(Failure {
                dsn: "4.7.5".into(),
                reason: reason.into(),
            }));
        }
        Ok(())
    }

    /// STARTTLS as the TLS level says, then EHLO again over TLS. Returns
    /// the extensions to use, or how the session ended.
    fn start_tls(
        &mut self,
        ext: Extensions,
        ehlo: &str,
        ehlo_stage: &str,
    ) -> Result<Extensions, End> {
        use crate::tls::Level;
        let Some(tls) = self.tls.filter(|t| t.policy.level != Level::None) else {
            return Ok(ext);
        };
        if self.encrypted {
            // Wrapper mode: TLS from the start.
            return Ok(ext);
        }
        let level = tls.policy.level;
        if !ext.starttls {
            if level.required() {
                let f = Failure {
                    dsn: "4.7.4".into(),
                    reason: format!(
                        "TLS is required, but was not offered by host {}",
                        self.peer.namaddr
                    ),
                };
                self.quit();
                return Err(self.try_next(f));
            }
            return Ok(ext);
        }
        let r = match self.command(Some("STARTTLS")) {
            Ok(r) => r,
            Err(e) => return Err(self.try_next(self.io_failure(&e, stage::STARTTLS))),
        };
        if r.class() != 2 {
            if !level.required() {
                // Opportunistic: carry on in plaintext.
                return Ok(ext);
            }
            let mut dsn = r.dsn();
            if !dsn.starts_with('4') {
                dsn.replace_range(0..1, "4");
            }
            let f = Failure {
                dsn,
                reason: format!(
                    "TLS is required, but host {} refused to start TLS: {}",
                    self.peer.namaddr,
                    r.text()
                ),
            };
            if r.code != 421 {
                self.quit();
            }
            return Err(self.try_next(f));
        }
        self.tls_handshake(tls)?;
        match self.command(Some(ehlo)) {
            Ok(r) if r.class() == 2 => Ok(self.extensions(&r)),
            Ok(r) => {
                let f = self.refused(&r);
                self.quit();
                Err(self.try_next(f))
            }
            Err(e) => Err(self.try_next(self.io_failure(&e, ehlo_stage))),
        }
    }

    /// MAIL, RCPT, DATA, content, end of data. Sends QUIT when the server
    /// is still talking.
    fn transaction<T: Transaction>(&mut self, txn: &mut T, ext: &Extensions) -> End {
        let t = self.settings.timeouts.clone();
        let n = txn.recipients().len();
        let all: Vec<usize> = (0..n).collect();

        // Refuse what the server cannot take before saying MAIL FROM.
        let size = txn.content_size();
        if let Some(limit) = ext.size.filter(|&l| l > 0 && size > l) {
            let reason = format!(
                "message size {size} exceeds size limit {limit} of server {}",
                self.peer.namaddr
            );
            Self::record_all(txn, &all, Outcome::Bounced, "5.3.4", &reason);
            self.quit();
            return End::Complete;
        }
        // RFC 6531, as Postfix: SMTPUTF8 only for a message whose sender
        // asked for it; to a server without it, such a message goes only
        // when nothing in this transaction needs it.
        let flags = txn.smtputf8();
        let needed =
            flags.delivery_requires(txn.sender(), txn.recipients().iter().map(String::as_str));
        if needed && !ext.smtputf8 {
            let reason = format!(
                "SMTPUTF8 is required, but was not offered by host {}",
                self.peer.namaddr
            );
            Self::record_all(txn, &all, Outcome::Bounced, "5.6.7", &reason);
            self.quit();
            return End::Complete;
        }
        let eight_bit = match txn.eight_bit() {
            Ok(b) => b,
            Err(e) => return self.local_error(txn, &all, &e),
        };
        // As Postfix: a server that offers SMTPUTF8 takes 8-bit content,
        // whether it says 8BITMIME or not.
        let eight_bit_mime = ext.eight_bit_mime || ext.smtputf8;
        if eight_bit && !ext.eight_bit_mime && ext.smtputf8 {
            postern_common::info!(
                "host {} offers SMTPUTF8 support, but not 8BITMIME",
                self.peer.namaddr
            );
        }
        if eight_bit && !eight_bit_mime {
            // RFC 6152: 8-bit content only to a server that announced
            // 8BITMIME. Postern does not convert to 7-bit MIME (Postfix
            // can), so the sender learns why rather than the message
            // arriving mangled.
            let reason = format!(
                "message has 8-bit content, but host {} did not offer 8BITMIME, and conversion to 7-bit is not supported",
                self.peer.namaddr
            );
            Self::record_all(txn, &all, Outcome::Bounced, "5.6.3", &reason);
            self.quit();
            return End::Complete;
        }
        let mut mail = format!("MAIL FROM:{}", smtp_address(txn.sender()));
        if ext.size.is_some() {
            mail.push_str(&format!(" SIZE={size}"));
        }
        if eight_bit {
            mail.push_str(" BODY=8BITMIME");
        }
        if flags.requested && ext.smtputf8 {
            mail.push_str(" SMTPUTF8");
        }
        if ext.dsn {
            let (ret, envid) = txn.dsn_envelope();
            if let Some(r) = ret.filter(|r| !r.is_empty()) {
                mail.push_str(&format!(" RET={r}"));
            }
            if let Some(e) = envid.filter(|e| !e.is_empty()) {
                mail.push_str(&format!(" ENVID={}", dsn::xtext_encode(&e)));
            }
        }
        let rcpts: Vec<String> = txn
            .recipients()
            .iter()
            .enumerate()
            .map(|(i, r)| {
                let mut cmd = format!("RCPT TO:{}", smtp_address(r));
                if ext.dsn {
                    let (bits, orcpt) = txn.dsn_recipient(i);
                    let notify = dsn::format_notify(bits);
                    if !notify.is_empty() {
                        cmd.push_str(&format!(" NOTIFY={notify}"));
                    }
                    let utf8_message = flags != postern_common::smtputf8::Flags::default();
                    if let Some(o) = dsn::format_orcpt(&orcpt, utf8_message) {
                        cmd.push_str(&format!(" ORCPT={o}"));
                    }
                }
                cmd
            })
            .collect();

        let pipelined = ext.pipelining;
        // CHUNKING (RFC 3030): BDAT instead of DATA.
        let bdat = ext.chunking;
        if pipelined {
            self.timeout(t.mail);
            self.queue(&mail);
            for r in &rcpts {
                self.queue(r);
            }
            if !bdat {
                self.queue("DATA");
            }
            let flushed = self.flush();
            if std::mem::take(&mut self.rset_queued) {
                // A kept session that does not answer its RSET well was
                // not used: no recipient gets an outcome from it, no
                // content goes out, the caller connects afresh.
                let answered = flushed.is_ok() && self.read().is_ok_and(|r| r.class() == 2);
                if !answered {
                    self.stale = true;
                    return End::Complete;
                }
            }
            if let Err(e) = flushed {
                return self.try_next(self.io_failure(&e, stage::MAIL));
            }
        }
        let unsent = |c: &str| (!pipelined).then(|| c.to_string());

        // MAIL FROM.
        self.timeout(t.mail);
        let r = match self.command(unsent(&mail).as_deref()) {
            Ok(r) => r,
            Err(e) => return self.try_next(self.io_failure(&e, stage::MAIL)),
        };
        if r.class() != 2 {
            let (outcome, dsn, reason) = self.said(&r, "MAIL FROM command");
            if r.code == 421 {
                return self.try_next(Failure { dsn, reason });
            }
            self.quit();
            if outcome == Outcome::Bounced {
                Self::record_all(txn, &all, outcome, &dsn, &reason);
                return End::Complete;
            }
            return self.try_next(Failure { dsn, reason });
        }

        // RCPT TO, one reply each.
        let mut accepted = Vec::with_capacity(n);
        self.timeout(t.rcpt);
        for (i, cmd) in rcpts.iter().enumerate() {
            let r = match self.command(unsent(cmd).as_deref()) {
                Ok(r) => r,
                Err(e) => return self.try_next(self.io_failure(&e, stage::RCPT)),
            };
            if r.class() == 2 {
                accepted.push(i);
                continue;
            }
            let (outcome, dsn, reason) = self.said(&r, "RCPT TO command");
            if r.code == 421 {
                return self.try_next(Failure { dsn, reason });
            }
            txn.record(i, outcome, &dsn, &reason);
        }
        if accepted.is_empty() && (!pipelined || bdat) {
            self.done();
            return End::Complete;
        }
        if bdat {
            return self.send_bdat(txn, &accepted);
        }

        // DATA.
        self.timeout(t.data_init);
        let r = match self.command(unsent("DATA").as_deref()) {
            Ok(r) => r,
            // Every recipient has its outcome: nothing is lost.
            Err(_) if accepted.is_empty() => return End::Complete,
            Err(e) => return self.try_next(self.io_failure(&e, stage::DATA)),
        };
        if r.class() != 3 {
            if accepted.is_empty() {
                self.done();
                return End::Complete;
            }
            let (outcome, dsn, reason) = self.said(&r, "DATA command");
            if r.code == 421 {
                return self.try_next(Failure { dsn, reason });
            }
            Self::record_all(txn, &accepted, outcome, &dsn, &reason);
            self.done();
            return End::Complete;
        }
        if accepted.is_empty() {
            // A server that wants content for no recipient: give it none.
            self.timeout(t.data_done);
            self.queue(".");
            if self.flush().is_ok() {
                let _ = self.read();
            }
            self.done();
            return End::Complete;
        }

        // The content. From here on a failure may leave a copy at the
        // server: every accepted recipient gets an outcome now.
        self.timeout(t.data_xfer);
        match self.send_content(txn) {
            Ok(()) => {}
            Err(Trouble::Local(e)) => {
                // Do not send the final dot: drop the connection so that
                // the server discards the partial message.
                return self.local_error(txn, &accepted, &e);
            }
            Err(Trouble::Io(e)) => {
                let f = self.io_failure(&e, stage::BODY);
                Self::record_all(txn, &accepted, Outcome::Deferred, &f.dsn, &f.reason);
                return End::Complete;
            }
            Err(Trouble::Refused(r)) => {
                // DATA content has no reply before its end; kept for
                // completeness.
                let (outcome, dsn, reason) = self.said(&r, "end of DATA command");
                Self::record_all(txn, &accepted, outcome, &dsn, &reason);
                return End::Complete;
            }
        }
        self.end_of_data(txn, &accepted)
    }

    /// Reads the reply (LMTP: the replies) to the end of the content and
    /// records each accepted recipient's outcome.
    fn end_of_data<T: Transaction>(&mut self, txn: &mut T, accepted: &[usize]) -> End {
        self.timeout(self.settings.timeouts.data_done);
        let r = match self.read() {
            Ok(r) => r,
            Err(e) => {
                let f = self.io_failure(&e, stage::DOT);
                Self::record_all(txn, accepted, Outcome::Deferred, &f.dsn, &f.reason);
                return End::Complete;
            }
        };
        if self.settings.lmtp {
            // RFC 2033: one reply per accepted recipient, in RCPT order;
            // the first was read above.
            let mut r = r;
            for (k, &i) in accepted.iter().enumerate() {
                if k > 0 {
                    r = match self.read() {
                        Ok(r) => r,
                        Err(e) => {
                            let f = self.io_failure(&e, stage::DOT);
                            Self::record_all(
                                txn,
                                &accepted[k..],
                                Outcome::Deferred,
                                &f.dsn,
                                &f.reason,
                            );
                            return End::Complete;
                        }
                    };
                }
                if r.class() == 2 {
                    txn.record(i, Outcome::Sent, &r.dsn(), &r.text());
                } else {
                    let (outcome, dsn, reason) = self.said(&r, "end of DATA command");
                    txn.record(i, outcome, &dsn, &reason);
                }
            }
        } else if r.class() == 2 {
            Self::record_all(txn, accepted, Outcome::Sent, &r.dsn(), &r.text());
        } else {
            let (outcome, dsn, reason) = self.said(&r, "end of DATA command");
            Self::record_all(txn, accepted, outcome, &dsn, &reason);
            if r.code == 421 {
                return End::Complete;
            }
        }
        self.done();
        End::Complete
    }

    /// The content as BDAT chunks (RFC 3030) of at most 64 KiB of queue
    /// file each (CRLF line ends, no dot-stuffing), the last one `BDAT n
    /// LAST`; each chunk but the last has its reply read before the next
    /// goes out. Then the reply (LMTP: replies) to the end of the content.
    fn send_bdat<T: Transaction>(&mut self, txn: &mut T, accepted: &[usize]) -> End {
        // From here on a failure may leave a copy at the server: every
        // accepted recipient gets an outcome now.
        self.timeout(self.settings.timeouts.data_xfer);
        match self.bdat_chunks(txn) {
            Ok(()) => self.end_of_data(txn, accepted),
            // Drop the connection without BDAT LAST: the server discards
            // the partial message.
            Err(Trouble::Local(e)) => self.local_error(txn, accepted, &e),
            Err(Trouble::Io(e)) => {
                let f = self.io_failure(&e, stage::BDAT);
                Self::record_all(txn, accepted, Outcome::Deferred, &f.dsn, &f.reason);
                End::Complete
            }
            Err(Trouble::Refused(r)) => {
                let (outcome, dsn, reason) = self.said(&r, "BDAT command");
                Self::record_all(txn, accepted, outcome, &dsn, &reason);
                if r.code != 421 {
                    // A kept session starts the next transaction with RSET.
                    self.done();
                }
                End::Complete
            }
        }
    }

    /// Sends the BDAT chunks; see [`Session::send_bdat`].
    fn bdat_chunks<T: Transaction>(&mut self, txn: &mut T) -> Result<(), Trouble> {
        const CHUNK: usize = 64 * 1024;
        let mut content = txn.content().map_err(Trouble::Local)?;
        let mut enc = DataEncoder::bdat().line_limit(self.settings.line_limit);
        let mut inbuf = vec![0u8; CHUNK];
        let mut pending: Vec<u8> = Vec::with_capacity(CHUNK + CHUNK / 2);
        let mut next: Vec<u8> = Vec::with_capacity(CHUNK + CHUNK / 2);
        let mut started = false;
        loop {
            // A whole chunk's worth, however the content reads.
            let mut n = 0;
            while n < CHUNK {
                match content.read(&mut inbuf[n..]) {
                    Ok(0) => break,
                    Ok(k) => n += k,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(Trouble::Local(e)),
                }
            }
            if n == 0 {
                break;
            }
            next.clear();
            enc.feed(&inbuf[..n], &mut next);
            if started {
                // A chunk that is not the last: send it, read its reply.
                self.queue(&format!("BDAT {}", pending.len()));
                self.wbuf.extend_from_slice(&pending);
                self.flush().map_err(Trouble::Io)?;
                let r = self.read().map_err(Trouble::Io)?;
                if r.class() != 2 {
                    return Err(Trouble::Refused(r));
                }
            }
            std::mem::swap(&mut pending, &mut next);
            started = true;
        }
        drop(content);
        enc.finish(&mut pending);
        self.log_folded(txn, &enc);
        self.queue(&format!("BDAT {} LAST", pending.len()));
        self.wbuf.extend_from_slice(&pending);
        self.flush().map_err(Trouble::Io)
    }

    /// A problem reading our own queue file: defer, and drop the
    /// connection without finishing the transaction.
    fn local_error<T: Transaction>(&mut self, txn: &mut T, which: &[usize], e: &io::Error) -> End {
        postern_common::warning!("read message content: {e}");
        let reason = format!("local data error while talking to {}", self.peer.namaddr);
        Self::record_all(txn, which, Outcome::Deferred, "4.3.0", &reason);
        End::Complete
    }

    /// Streams the content, encoded, and the final dot.
    fn send_content<T: Transaction>(&mut self, txn: &mut T) -> Result<(), Trouble> {
        const CHUNK: usize = 64 * 1024;
        let mut content = txn.content().map_err(Trouble::Local)?;
        let mut enc = DataEncoder::new().line_limit(self.settings.line_limit);
        let mut inbuf = vec![0u8; CHUNK];
        let mut out = Vec::with_capacity(CHUNK + CHUNK / 2);
        loop {
            let n = match content.read(&mut inbuf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(Trouble::Local(e)),
            };
            out.clear();
            enc.feed(&inbuf[..n], &mut out);
            self.conn.write_all(&out).map_err(Trouble::Io)?;
        }
        drop(content);
        out.clear();
        enc.finish(&mut out);
        self.log_folded(txn, &enc);
        self.conn.write_all(&out).map_err(Trouble::Io)?;
        self.conn.flush().map_err(Trouble::Io)
    }

    /// Says once per transaction that long lines were broken, as
    /// Postfix's smtp does.
    fn log_folded<T: Transaction>(&self, txn: &T, enc: &DataEncoder) {
        if enc.folded() {
            postern_common::info!(
                "{}: breaking line > {} bytes with <CR><LF>SPACE",
                txn.queue_id(),
                self.settings.line_limit
            );
        }
    }
}

/// Why sending the content stopped.
enum Trouble {
    /// Reading our queue file failed.
    Local(io::Error),
    /// Writing to the server failed.
    Io(io::Error),
    /// The server refused a BDAT chunk.
    Refused(Reply),
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;
    use std::net::{IpAddr, TcpListener};

    fn enc_chunks(chunks: &[&[u8]]) -> Vec<u8> {
        let mut e = DataEncoder::new();
        let mut out = Vec::new();
        for c in chunks {
            e.feed(c, &mut out);
        }
        e.finish(&mut out);
        out
    }

    #[test]
    fn data_encoding() {
        assert_eq!(enc_chunks(&[]), b".\r\n");
        assert_eq!(enc_chunks(&[b"a\nb\n"]), b"a\r\nb\r\n.\r\n");
        assert_eq!(enc_chunks(&[b"a\r\nb"]), b"a\r\nb\r\n.\r\n");
        assert_eq!(enc_chunks(&[b".\n..x\n.y"]), b"..\r\n...x\r\n..y\r\n.\r\n");
        assert_eq!(enc_chunks(&[b"a.b\n x.\n"]), b"a.b\r\n x.\r\n.\r\n");
        assert_eq!(enc_chunks(&[b"\n\n"]), b"\r\n\r\n.\r\n");
        assert_eq!(enc_chunks(&[b"bare\rcr\n"]), b"bare\rcr\r\n.\r\n");
        assert_eq!(enc_chunks(&[b"end\r"]), b"end\r\n.\r\n");
    }

    #[test]
    fn data_encoding_across_chunk_boundaries() {
        let whole: &[u8] = b"Subject: x\n\n.dot\nline\r\n..two\nlast.\n.";
        let expect = enc_chunks(&[whole]);
        assert_eq!(
            expect,
            b"Subject: x\r\n\r\n..dot\r\nline\r\n...two\r\nlast.\r\n..\r\n.\r\n".to_vec()
        );
        // Every way of cutting it in two or three gives the same bytes.
        for i in 0..=whole.len() {
            for j in i..=whole.len() {
                let got = enc_chunks(&[&whole[..i], &whole[i..j], &whole[j..]]);
                assert_eq!(got, expect, "cut at {i},{j}");
            }
        }
        // A CR at the end of one chunk and its LF at the start of the next.
        assert_eq!(enc_chunks(&[b"a\r", b"\nb\n"]), b"a\r\nb\r\n.\r\n");
        // A dot after a newline that ended the previous chunk.
        assert_eq!(enc_chunks(&[b"a\n", b".b\n"]), b"a\r\n..b\r\n.\r\n");
    }

    /// Encodes `chunks` with a line limit.
    fn enc_limited(limit: usize, dots: bool, chunks: &[&[u8]]) -> (Vec<u8>, bool) {
        let e = if dots {
            DataEncoder::new()
        } else {
            DataEncoder::bdat()
        };
        let mut e = e.line_limit(limit);
        let mut out = Vec::new();
        for c in chunks {
            e.feed(c, &mut out);
        }
        e.finish(&mut out);
        (out, e.folded())
    }

    #[test]
    fn long_lines_are_broken_with_crlf_space() {
        // As Postfix's smtp_text_out: a line of exactly the limit is kept;
        // one octet more and it is broken, the rest after a space.
        assert_eq!(
            enc_limited(4, true, &[b"abcd\n"]),
            (b"abcd\r\n.\r\n".to_vec(), false)
        );
        assert_eq!(
            enc_limited(4, true, &[b"abcde\n"]),
            (b"abcd\r\n e\r\n.\r\n".to_vec(), true)
        );
        assert_eq!(
            enc_limited(4, false, &[b"abcdefghij\nxy\n"]),
            (b"abcd\r\n efg\r\n hij\r\nxy\r\n".to_vec(), true)
        );
        // A CR before the LF is the line end, not an octet of the line; a
        // bare CR is.
        assert_eq!(enc_limited(4, false, &[b"abcd\r\n"]).0, b"abcd\r\n");
        assert_eq!(
            enc_limited(4, false, &[b"abcd\rx\n"]).0,
            b"abcd\r\n \rx\r\n"
        );
        assert_eq!(enc_limited(4, false, &[b"abcd\r"]).0, b"abcd\r\n");
        // The doubled dot is on the wire and counts; a continuation line
        // starting with a dot is not stuffed (it starts with the space).
        assert_eq!(
            enc_limited(4, true, &[b".abcd\n"]).0,
            b"..ab\r\n cd\r\n.\r\n"
        );
        assert_eq!(
            enc_limited(4, true, &[b"abcd.x\n"]).0,
            b"abcd\r\n .x\r\n.\r\n"
        );
        // No limit.
        assert_eq!(enc_limited(0, false, &[&[b'x'; 5000]]).0.len(), 5002);
    }

    #[test]
    fn long_lines_keep_every_octet_across_chunks() {
        // 3,000 octets in one line, lines of 998, 999 and 1,995, a CR at
        // every possible place: unfolding gives back the CRLF form.
        let mut text = Vec::new();
        for (i, n) in [3000usize, 998, 999, 1995, 997, 1].iter().enumerate() {
            text.extend((0..*n).map(|k| b'a' + ((k + i) % 26) as u8));
            text.extend_from_slice(if i % 2 == 0 { b"\n" } else { b"\r\n" });
        }
        text.extend_from_slice(b"x\ry\n.dotted\n");
        let crlf = {
            let (plain, _) = enc_limited(0, false, &[&text]);
            plain
        };
        let (whole, folded) = enc_limited(998, false, &[&text]);
        assert!(folded);
        for line in whole.split(|&b| b == b'\n') {
            assert!(line.len() <= 999, "line of {} octets", line.len());
        }
        let unfolded = String::from_utf8_lossy(&whole).replace("\r\n ", "");
        assert_eq!(unfolded.as_bytes(), &crlf[..]);
        for cut in [1, 7, 997, 998, 999, 1000, 2999, 3000, 3001, 4000] {
            let (a, b) = text.split_at(cut.min(text.len()));
            assert_eq!(enc_limited(998, false, &[a, b]).0, whole, "cut at {cut}");
        }
        for size in [1, 2, 3, 10, 999] {
            let chunks: Vec<&[u8]> = text.chunks(size).collect();
            assert_eq!(
                enc_limited(998, false, &chunks).0,
                whole,
                "chunks of {size}"
            );
        }
    }

    #[test]
    fn addresses() {
        assert_eq!(smtp_address(""), "<>");
        assert_eq!(smtp_address("a.b+c@x.test"), "<a.b+c@x.test>");
        assert_eq!(smtp_address("a b@x.test"), "<\"a b\"@x.test>");
        assert_eq!(smtp_address("\"a b\"@x.test"), "<\"a b\"@x.test>");
        assert_eq!(smtp_address(".a@x.test"), "<\".a\"@x.test>");
        assert_eq!(smtp_address("postmaster"), "<postmaster>");
        assert_eq!(smtp_address("jö@x.test"), "<jö@x.test>");
    }

    #[test]
    fn extensions() {
        let r = LineReader::new()
            .read_reply(
                &mut &b"250-mx.test Hello\r\n250-PIPELINING\r\n250-SIZE 1000\r\n250-8BITMIME\r\n250-AUTH PLAIN login\r\n250-AUTH=LOGIN\r\n250 STARTTLS\r\n"[..],
            )
            .unwrap();
        let e = Extensions::parse(&r);
        assert!(e.esmtp && e.pipelining && e.eight_bit_mime && e.starttls);
        assert!(!e.smtputf8 && !e.dsn);
        assert_eq!(e.size, Some(1000));
        assert_eq!(e.auth, vec!["PLAIN", "LOGIN"]);
        let r = LineReader::new()
            .read_reply(&mut &b"250-x\r\n250 size\r\n"[..])
            .unwrap();
        assert_eq!(Extensions::parse(&r).size, Some(0));
    }

    // ------------------------------------------------------------------
    // Scripted servers.

    /// An in-memory server: every reply is there from the start; what the
    /// client writes is kept, one entry per write call.
    struct Scripted {
        input: Cursor<Vec<u8>>,
        writes: Vec<Vec<u8>>,
    }

    impl Scripted {
        fn new(replies: &str) -> Scripted {
            Scripted {
                input: Cursor::new(replies.as_bytes().to_vec()),
                writes: Vec::new(),
            }
        }
    }

    impl Read for Scripted {
        fn read(&mut self, b: &mut [u8]) -> io::Result<usize> {
            self.input.read(b)
        }
    }

    impl Write for Scripted {
        fn write(&mut self, b: &[u8]) -> io::Result<usize> {
            self.writes.push(b.to_vec());
            Ok(b.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    impl Stream for Scripted {
        fn set_timeout(&mut self, _: Duration) -> io::Result<()> {
            Ok(())
        }
    }

    struct TestTxn {
        sender: String,
        rcpts: Vec<String>,
        content: Vec<u8>,
        /// Read the content this many bytes at a time.
        chunk: usize,
        connected: bool,
        recorded: Vec<(usize, Outcome, String, String)>,
        smtputf8: postern_common::smtputf8::Flags,
    }

    impl TestTxn {
        fn new(rcpts: &[&str], content: &[u8]) -> TestTxn {
            TestTxn {
                sender: "from@a.test".into(),
                rcpts: rcpts.iter().map(|s| s.to_string()).collect(),
                content: content.to_vec(),
                chunk: 7,
                connected: false,
                recorded: Vec::new(),
                smtputf8: Default::default(),
            }
        }

        fn outcome(&self, i: usize) -> Option<(Outcome, &str, &str)> {
            self.recorded
                .iter()
                .find(|r| r.0 == i)
                .map(|r| (r.1, r.2.as_str(), r.3.as_str()))
        }
    }

    /// Returns at most `n` bytes per read.
    struct Trickle<'a>(&'a [u8], usize);

    impl Read for Trickle<'_> {
        fn read(&mut self, b: &mut [u8]) -> io::Result<usize> {
            let n = self.0.len().min(b.len()).min(self.1);
            b[..n].copy_from_slice(&self.0[..n]);
            self.0 = &self.0[n..];
            Ok(n)
        }
    }

    impl Transaction for TestTxn {
        fn sender(&self) -> &str {
            &self.sender
        }
        fn recipients(&self) -> &[String] {
            &self.rcpts
        }
        fn content_size(&self) -> u64 {
            self.content.len() as u64
        }
        fn eight_bit(&mut self) -> io::Result<bool> {
            Ok(self.content.iter().any(|&b| b >= 0x80))
        }
        fn content(&mut self) -> io::Result<Box<dyn Read + '_>> {
            Ok(Box::new(Trickle(&self.content, self.chunk)))
        }
        fn connected(&mut self) {
            self.connected = true;
        }
        fn record(&mut self, i: usize, outcome: Outcome, dsn: &str, reason: &str) {
            assert!(self.outcome(i).is_none(), "recipient {i} recorded twice");
            self.recorded.push((i, outcome, dsn.into(), reason.into()));
        }
        fn smtputf8(&mut self) -> postern_common::smtputf8::Flags {
            self.smtputf8
        }
    }

    fn peer() -> Server {
        Server {
            name: "mx.b.test".into(),
            addr: "127.0.0.1".parse::<IpAddr>().unwrap(),
            port: 25,
        }
    }

    fn settings(t: u64) -> Settings {
        let d = Duration::from_secs(t);
        Settings {
            helo_name: "client.test".into(),
            timeouts: Timeouts {
                helo: d,
                mail: d,
                rcpt: d,
                data_init: d,
                data_xfer: d,
                data_done: d,
                quit: d,
            },
            lmtp: false,
            keep: false,
            discard: Vec::new(),
            line_limit: 998,
        }
    }

    fn sent_text(s: &Scripted) -> String {
        String::from_utf8(s.writes.concat()).unwrap()
    }

    #[test]
    fn pipelined_per_recipient_results() {
        let mut srv = Scripted::new(
            "220 mx.b.test ESMTP\r\n\
             250-mx.b.test\r\n250-PIPELINING\r\n250-SIZE 100000\r\n250 8BITMIME\r\n\
             250 2.1.0 Ok\r\n\
             250 2.1.5 Ok\r\n\
             450 4.2.0 <b@b.test>: Recipient address rejected: Greylisted\r\n\
             550 5.1.1 <c@b.test>: Recipient address rejected: User unknown\r\n\
             250 2.1.5 Ok\r\n\
             354 End data with <CR><LF>.<CR><LF>\r\n\
             250 2.0.0 Ok: queued as ABC\r\n\
             221 2.0.0 Bye\r\n",
        );
        let content = b"Subject: t\n\n.hello\nw\xc3\xb6rld\n";
        let mut txn = TestTxn::new(&["a@b.test", "b@b.test", "c@b.test", "d@b.test"], content);
        let end = deliver(&mut srv, &peer(), &settings(5), &mut txn);
        assert_eq!(end, End::Complete);
        assert!(txn.connected);
        // EHLO alone, then MAIL + RCPTs + DATA in one write.
        assert_eq!(srv.writes[0], b"EHLO client.test\r\n");
        assert_eq!(
            String::from_utf8(srv.writes[1].clone()).unwrap(),
            format!(
                "MAIL FROM:<from@a.test> SIZE={} BODY=8BITMIME\r\nRCPT TO:<a@b.test>\r\nRCPT TO:<b@b.test>\r\nRCPT TO:<c@b.test>\r\nRCPT TO:<d@b.test>\r\nDATA\r\n",
                content.len()
            )
        );
        let all = sent_text(&srv);
        assert!(all.ends_with("Subject: t\r\n\r\n..hello\r\nwörld\r\n.\r\nQUIT\r\n"));
        assert_eq!(
            txn.outcome(0),
            Some((Outcome::Sent, "2.0.0", "250 2.0.0 Ok: queued as ABC"))
        );
        assert_eq!(
            txn.outcome(1),
            Some((
                Outcome::Deferred,
                "4.2.0",
                "host mx.b.test[127.0.0.1] said: 450 4.2.0 <b@b.test>: Recipient address rejected: Greylisted (in reply to RCPT TO command)"
            ))
        );
        assert_eq!(
            txn.outcome(2),
            Some((
                Outcome::Bounced,
                "5.1.1",
                "host mx.b.test[127.0.0.1] said: 550 5.1.1 <c@b.test>: Recipient address rejected: User unknown (in reply to RCPT TO command)"
            ))
        );
        assert_eq!(txn.outcome(3).unwrap().0, Outcome::Sent);
        // Rejections are recorded before the content is sent.
        assert_eq!(txn.recorded[0].0, 1);
        assert_eq!(txn.recorded[1].0, 2);
    }

    #[test]
    fn chunking_sends_bdat_without_dot_stuffing() {
        let mut srv = Scripted::new(
            "220 mx.b.test ESMTP\r\n\
             250-mx.b.test\r\n250-PIPELINING\r\n250-CHUNKING\r\n250 8BITMIME\r\n\
             250 2.1.0 Ok\r\n\
             250 2.1.5 Ok\r\n\
             550 5.1.1 <b@b.test>: Recipient address rejected: User unknown\r\n\
             250 2.0.0 Ok: queued as ABC\r\n\
             221 2.0.0 Bye\r\n",
        );
        let content = b"Subject: t\n\n.hello\r\n.\nend";
        let mut txn = TestTxn::new(&["a@b.test", "b@b.test"], content);
        assert_eq!(
            deliver(&mut srv, &peer(), &settings(5), &mut txn),
            End::Complete
        );
        // MAIL and RCPTs pipelined, without DATA.
        assert_eq!(
            String::from_utf8(srv.writes[1].clone()).unwrap(),
            "MAIL FROM:<from@a.test>\r\nRCPT TO:<a@b.test>\r\nRCPT TO:<b@b.test>\r\n"
        );
        // One chunk: CRLF line ends, dots as they are, a final CRLF added.
        let body = "Subject: t\r\n\r\n.hello\r\n.\r\nend\r\n";
        assert_eq!(
            sent_text(&srv),
            format!(
                "EHLO client.test\r\n{}BDAT {} LAST\r\n{body}QUIT\r\n",
                String::from_utf8(srv.writes[1].clone()).unwrap(),
                body.len()
            )
        );
        assert_eq!(
            txn.outcome(0),
            Some((Outcome::Sent, "2.0.0", "250 2.0.0 Ok: queued as ABC"))
        );
        assert_eq!(txn.outcome(1).unwrap().0, Outcome::Bounced);
    }

    #[test]
    fn chunking_large_content_in_bounded_chunks() {
        // 200,000 bytes of lines "x...x\n" (99 x's): 2,000 lines.
        let line = format!("{}\n", "x".repeat(99));
        let content = line.repeat(2000).into_bytes();
        let mut srv = Scripted::new(
            "220 mx.b.test ESMTP\r\n\
             250-mx.b.test\r\n250 CHUNKING\r\n\
             250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n\
             250 2.0.0 chunk\r\n250 2.0.0 chunk\r\n250 2.0.0 chunk\r\n\
             250 2.0.0 Ok: queued as XYZ\r\n221 Bye\r\n",
        );
        let mut txn = TestTxn::new(&["a@b.test"], &content);
        txn.chunk = 1000;
        assert_eq!(
            deliver(&mut srv, &peer(), &settings(5), &mut txn),
            End::Complete
        );
        let all = sent_text(&srv);
        // Reassemble the chunks; each is at most 64 KiB of queue file.
        let mut rest = &all[all.find("BDAT").unwrap()..];
        let mut got = String::new();
        let mut sizes = Vec::new();
        loop {
            let eol = rest.find("\r\n").unwrap();
            let cmd = &rest[..eol];
            let mut w = cmd.split(' ');
            assert_eq!(w.next(), Some("BDAT"));
            let n: usize = w.next().unwrap().parse().unwrap();
            let last = w.next() == Some("LAST");
            got.push_str(&rest[eol + 2..eol + 2 + n]);
            sizes.push(n);
            rest = &rest[eol + 2 + n..];
            if last {
                break;
            }
        }
        assert_eq!(rest, "QUIT\r\n");
        assert_eq!(got, line.replace('\n', "\r\n").repeat(2000));
        assert_eq!(sizes.len(), 4);
        assert!(sizes.iter().all(|&n| n <= 64 * 1024 * 2));
        assert_eq!(
            txn.outcome(0),
            Some((Outcome::Sent, "2.0.0", "250 2.0.0 Ok: queued as XYZ"))
        );
    }

    #[test]
    fn chunking_refused_chunk_and_lmtp_replies() {
        // A refused first chunk: no more chunks, outcome from its reply.
        let content = "y\n".repeat(40_000).into_bytes();
        let mut srv = Scripted::new(
            "220 mx.b.test ESMTP\r\n\
             250-mx.b.test\r\n250 CHUNKING\r\n\
             250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n\
             552 5.3.4 Message too big\r\n221 Bye\r\n",
        );
        let mut txn = TestTxn::new(&["a@b.test"], &content);
        txn.chunk = 4096;
        deliver(&mut srv, &peer(), &settings(5), &mut txn);
        let all = sent_text(&srv);
        assert_eq!(all.matches("BDAT").count(), 1);
        assert!(all.ends_with("QUIT\r\n"));
        assert_eq!(
            txn.outcome(0),
            Some((
                Outcome::Bounced,
                "5.3.4",
                "host mx.b.test[127.0.0.1] said: 552 5.3.4 Message too big (in reply to BDAT command)"
            ))
        );

        // LMTP: one reply per accepted recipient after BDAT LAST.
        let mut srv = Scripted::new(
            "220 lmtp.test LMTP\r\n\
             250-lmtp.test\r\n250-PIPELINING\r\n250 CHUNKING\r\n\
             250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n250 2.1.5 Ok\r\n\
             250 2.0.0 <a@b.test> Saved\r\n\
             452 4.2.2 <c@b.test> Quota exceeded\r\n221 Bye\r\n",
        );
        let mut txn = TestTxn::new(&["a@b.test", "c@b.test"], b".x\n");
        let mut st = settings(5);
        st.lmtp = true;
        let unix = PeerId::unix("me.test", "private/lmtp");
        assert_eq!(deliver(&mut srv, unix, &st, &mut txn), End::Complete);
        assert!(sent_text(&srv).ends_with("BDAT 4 LAST\r\n.x\r\nQUIT\r\n"));
        assert_eq!(txn.outcome(0).unwrap().0, Outcome::Sent);
        assert_eq!(
            txn.outcome(1),
            Some((
                Outcome::Deferred,
                "4.2.2",
                "host me.test[private/lmtp] said: 452 4.2.2 <c@b.test> Quota exceeded (in reply to end of DATA command)"
            ))
        );
    }

    #[test]
    fn discarded_chunking_uses_data() {
        let mut srv = Scripted::new(
            "220 mx.b.test ESMTP\r\n\
             250-mx.b.test\r\n250-PIPELINING\r\n250 CHUNKING\r\n\
             250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n354 go\r\n250 2.0.0 Ok\r\n221 Bye\r\n",
        );
        let mut txn = TestTxn::new(&["a@b.test"], b".x\n");
        let mut st = settings(5);
        st.discard = vec!["chunking".into(), "silent-discard".into()];
        assert_eq!(deliver(&mut srv, &peer(), &st, &mut txn), End::Complete);
        let all = sent_text(&srv);
        assert!(!all.contains("BDAT"));
        assert!(all.ends_with("DATA\r\n..x\r\n.\r\nQUIT\r\n"));
        assert_eq!(txn.outcome(0).unwrap().0, Outcome::Sent);
    }

    #[test]
    fn lmtp_one_reply_per_recipient() {
        let mut srv = Scripted::new(
            "220 lmtp.test LMTP ready\r\n\
             250-lmtp.test\r\n250-PIPELINING\r\n250 ENHANCEDSTATUSCODES\r\n\
             250 2.1.0 Ok\r\n\
             250 2.1.5 Ok\r\n\
             550 5.1.1 <b@b.test> User doesn't exist: b@b.test\r\n\
             250 2.1.5 Ok\r\n\
             354 OK\r\n\
             250 2.0.0 <a@b.test> Saved\r\n\
             452 4.2.2 <c@b.test> Quota exceeded\r\n\
             221 2.0.0 Bye\r\n",
        );
        let mut txn = TestTxn::new(&["a@b.test", "b@b.test", "c@b.test"], b"x\n");
        let mut st = settings(5);
        st.lmtp = true;
        let unix = PeerId::unix("me.test", "private/lmtp");
        assert_eq!(deliver(&mut srv, unix, &st, &mut txn), End::Complete);
        assert_eq!(srv.writes[0], b"LHLO client.test\r\n");
        assert_eq!(
            txn.outcome(0),
            Some((Outcome::Sent, "2.0.0", "250 2.0.0 <a@b.test> Saved"))
        );
        assert_eq!(txn.outcome(1).unwrap().0, Outcome::Bounced);
        assert_eq!(
            txn.outcome(2),
            Some((
                Outcome::Deferred,
                "4.2.2",
                "host me.test[private/lmtp] said: 452 4.2.2 <c@b.test> Quota exceeded (in reply to end of DATA command)"
            ))
        );
        assert!(sent_text(&srv).ends_with(".\r\nQUIT\r\n"));

        // LHLO refused: no HELO fallback.
        let mut srv = Scripted::new("220 x\r\n500 what\r\n221 bye\r\n");
        let mut txn = TestTxn::new(&["a@b.test"], b"x\n");
        assert!(matches!(
            deliver(&mut srv, &peer(), &st, &mut txn),
            End::TryNext { .. }
        ));
        assert!(!sent_text(&srv).contains("HELO "));
    }

    #[test]
    fn dsn_parameters_when_offered() {
        struct Dsn(TestTxn);
        impl Transaction for Dsn {
            fn sender(&self) -> &str {
                self.0.sender()
            }
            fn recipients(&self) -> &[String] {
                self.0.recipients()
            }
            fn content_size(&self) -> u64 {
                self.0.content_size()
            }
            fn eight_bit(&mut self) -> io::Result<bool> {
                self.0.eight_bit()
            }
            fn content(&mut self) -> io::Result<Box<dyn Read + '_>> {
                self.0.content()
            }
            fn connected(&mut self) {}
            fn record(&mut self, i: usize, o: Outcome, d: &str, r: &str) {
                self.0.record(i, o, d, r)
            }
            fn dsn_envelope(&mut self) -> (Option<String>, Option<String>) {
                (Some("HDRS".into()), Some("id+1 x".into()))
            }
            fn dsn_recipient(&self, i: usize) -> (u8, String) {
                if i == 0 {
                    (3, "rfc822;Orig=x@b.test".into())
                } else {
                    (8, String::new())
                }
            }
        }
        let replies = "220 x\r\n250-x\r\n250 DSN\r\n250 Ok\r\n250 Ok\r\n250 Ok\r\n354 go\r\n250 Ok\r\n221 bye\r\n";
        let mut srv = Scripted::new(replies);
        let mut txn = Dsn(TestTxn::new(&["a@b.test", "b@b.test"], b"x\n"));
        deliver(&mut srv, &peer(), &settings(5), &mut txn);
        let all = sent_text(&srv);
        assert!(
            all.contains("MAIL FROM:<from@a.test> RET=HDRS ENVID=id+2B1+20x\r\n"),
            "{all}"
        );
        assert!(
            all.contains(
                "RCPT TO:<a@b.test> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;Orig+3Dx@b.test\r\n"
            ),
            "{all}"
        );
        assert!(all.contains("RCPT TO:<b@b.test> NOTIFY=NEVER\r\n"), "{all}");
        // Not offered: not sent.
        let mut srv = Scripted::new(&replies.replace("250-x\r\n250 DSN", "250 x"));
        let mut txn = Dsn(TestTxn::new(&["a@b.test", "b@b.test"], b"x\n"));
        deliver(&mut srv, &peer(), &settings(5), &mut txn);
        assert!(!sent_text(&srv).contains("NOTIFY"));
    }

    #[test]
    fn one_at_a_time_without_pipelining() {
        let mut srv = Scripted::new(
            "220 mx ESMTP\r\n250 mx\r\n250 Ok\r\n550 no\r\n250 Ok\r\n354 go\r\n451 4.3.0 try later\r\n221 bye\r\n",
        );
        let mut txn = TestTxn::new(&["a@b.test", "b@b.test"], b"x\n");
        let end = deliver(&mut srv, &peer(), &settings(5), &mut txn);
        assert_eq!(end, End::Complete);
        let w: Vec<String> = srv
            .writes
            .iter()
            .map(|w| String::from_utf8(w.clone()).unwrap())
            .collect();
        assert_eq!(
            &w[..5],
            &[
                "EHLO client.test\r\n",
                "MAIL FROM:<from@a.test>\r\n",
                "RCPT TO:<a@b.test>\r\n",
                "RCPT TO:<b@b.test>\r\n",
                "DATA\r\n"
            ]
        );
        assert_eq!(
            txn.outcome(0).unwrap(),
            (
                Outcome::Bounced,
                "5.0.0",
                "host mx.b.test[127.0.0.1] said: 550 no (in reply to RCPT TO command)"
            )
        );
        assert_eq!(
            txn.outcome(1).unwrap(),
            (
                Outcome::Deferred,
                "4.3.0",
                "host mx.b.test[127.0.0.1] said: 451 4.3.0 try later (in reply to end of DATA command)"
            )
        );
    }

    #[test]
    fn no_recipient_accepted_skips_data() {
        let mut srv = Scripted::new("220 mx\r\n250 mx\r\n250 Ok\r\n550 5.1.1 no\r\n221 bye\r\n");
        let mut txn = TestTxn::new(&["a@b.test"], b"x\n");
        assert_eq!(
            deliver(&mut srv, &peer(), &settings(5), &mut txn),
            End::Complete
        );
        let all = sent_text(&srv);
        assert!(!all.contains("DATA"));
        assert!(all.ends_with("QUIT\r\n"));
        assert_eq!(txn.outcome(0).unwrap().0, Outcome::Bounced);

        // Pipelined: DATA was sent with the rest; its error is ignored.
        let mut srv = Scripted::new(
            "220 mx\r\n250-mx\r\n250 PIPELINING\r\n250 Ok\r\n550 5.1.1 no\r\n554 5.5.1 no valid recipients\r\n221 bye\r\n",
        );
        let mut txn = TestTxn::new(&["a@b.test"], b"x\n");
        assert_eq!(
            deliver(&mut srv, &peer(), &settings(5), &mut txn),
            End::Complete
        );
        assert_eq!(txn.recorded.len(), 1);
        assert!(!sent_text(&srv).contains("\r\nx\r\n"));
    }

    #[test]
    fn helo_fallback_and_refusals() {
        let mut srv = Scripted::new(
            "220 old\r\n502 what\r\n250 old\r\n250 Ok\r\n250 Ok\r\n354 go\r\n250 Ok\r\n221 bye\r\n",
        );
        let mut txn = TestTxn::new(&["a@b.test"], b"x\n");
        assert_eq!(
            deliver(&mut srv, &peer(), &settings(5), &mut txn),
            End::Complete
        );
        assert_eq!(srv.writes[1], b"HELO client.test\r\n");
        assert_eq!(txn.outcome(0).unwrap(), (Outcome::Sent, "2.0.0", "250 Ok"));

        // A refused greeting: try the next server, whatever the code.
        let mut srv = Scripted::new("554 5.7.1 go away\r\n221 bye\r\n");
        let mut txn = TestTxn::new(&["a@b.test"], b"x\n");
        let end = deliver(&mut srv, &peer(), &settings(5), &mut txn);
        assert_eq!(
            end,
            End::TryNext {
                failure: Failure {
                    dsn: "4.7.1".into(),
                    reason: "host mx.b.test[127.0.0.1] refused to talk to me: 554 5.7.1 go away"
                        .into()
                },
                handshake: false
            }
        );
        assert!(txn.recorded.is_empty() && !txn.connected);

        // HELO refused for good: bounce.
        let mut srv = Scripted::new("220 x\r\n500 no\r\n550 5.7.1 no\r\n221 bye\r\n");
        let mut txn = TestTxn::new(&["a@b.test", "c@b.test"], b"x\n");
        assert_eq!(
            deliver(&mut srv, &peer(), &settings(5), &mut txn),
            End::Complete
        );
        assert_eq!(txn.recorded.len(), 2);
        assert_eq!(txn.outcome(1).unwrap().0, Outcome::Bounced);
    }

    #[test]
    fn service_closing_and_lost_connection() {
        // 421 to a RCPT: nothing sent yet, so the rest may go elsewhere.
        let mut srv = Scripted::new(
            "220 x\r\n250-x\r\n250 PIPELINING\r\n250 Ok\r\n550 5.1.1 no\r\n421 4.3.2 shutting down\r\n",
        );
        let mut txn = TestTxn::new(&["a@b.test", "b@b.test", "c@b.test"], b"x\n");
        match deliver(&mut srv, &peer(), &settings(5), &mut txn) {
            End::TryNext { failure, handshake } => {
                assert!(handshake);
                assert_eq!(failure.dsn, "4.3.2");
                assert_eq!(
                    failure.reason,
                    "host mx.b.test[127.0.0.1] said: 421 4.3.2 shutting down (in reply to RCPT TO command)"
                );
            }
            e => panic!("{e:?}"),
        }
        assert_eq!(txn.recorded.len(), 1);

        // Lost before the MAIL reply.
        let mut srv = Scripted::new("220 x\r\n250 x\r\n");
        let mut txn = TestTxn::new(&["a@b.test"], b"x\n");
        match deliver(&mut srv, &peer(), &settings(5), &mut txn) {
            End::TryNext { failure, .. } => assert_eq!(
                failure.reason,
                "lost connection with mx.b.test[127.0.0.1] while sending MAIL FROM"
            ),
            e => panic!("{e:?}"),
        }

        // Lost after the content: deferred here, not retried elsewhere.
        let mut srv = Scripted::new("220 x\r\n250 x\r\n250 Ok\r\n250 Ok\r\n354 go\r\n");
        let mut txn = TestTxn::new(&["a@b.test"], b"x\n");
        assert_eq!(
            deliver(&mut srv, &peer(), &settings(5), &mut txn),
            End::Complete
        );
        assert_eq!(
            txn.outcome(0).unwrap(),
            (
                Outcome::Deferred,
                "4.4.2",
                "lost connection with mx.b.test[127.0.0.1] while sending end of data -- message may be sent more than once"
            )
        );

        // MAIL FROM refused for good: every recipient bounces.
        let mut srv = Scripted::new("220 x\r\n250 x\r\n553 5.1.8 bad sender\r\n221 bye\r\n");
        let mut txn = TestTxn::new(&["a@b.test", "b@b.test"], b"x\n");
        assert_eq!(
            deliver(&mut srv, &peer(), &settings(5), &mut txn),
            End::Complete
        );
        assert_eq!(txn.outcome(1).unwrap().1, "5.1.8");
        assert!(txn
            .outcome(1)
            .unwrap()
            .2
            .ends_with("(in reply to MAIL FROM command)"));
    }

    #[test]
    fn size_limit_and_smtputf8() {
        let mut srv = Scripted::new("220 x\r\n250-x\r\n250 SIZE 3\r\n221 bye\r\n");
        let mut txn = TestTxn::new(&["a@b.test"], b"four\n");
        assert_eq!(
            deliver(&mut srv, &peer(), &settings(5), &mut txn),
            End::Complete
        );
        assert_eq!(
            txn.outcome(0).unwrap(),
            (
                Outcome::Bounced,
                "5.3.4",
                "message size 5 exceeds size limit 3 of server mx.b.test[127.0.0.1]"
            )
        );
        // SMTPUTF8 requested and a UTF-8 recipient: refused by a server
        // without SMTPUTF8.
        let mut srv = Scripted::new("220 x\r\n250 x\r\n221 bye\r\n");
        let mut txn = TestTxn::new(&["jö@b.test"], b"x\n");
        txn.smtputf8.requested = true;
        deliver(&mut srv, &peer(), &settings(5), &mut txn);
        assert_eq!(
            txn.outcome(0).unwrap(),
            (
                Outcome::Bounced,
                "5.6.7",
                "SMTPUTF8 is required, but was not offered by host mx.b.test[127.0.0.1]"
            )
        );
        // Requested, but all ASCII: sent without the parameter.
        let mut srv =
            Scripted::new("220 x\r\n250 x\r\n250 ok\r\n250 ok\r\n354 go\r\n250 ok\r\n221 bye\r\n");
        let mut txn = TestTxn::new(&["a@b.test"], b"x\n");
        txn.smtputf8.requested = true;
        deliver(&mut srv, &peer(), &settings(5), &mut txn);
        assert_eq!(txn.outcome(0).unwrap().0, Outcome::Sent);
        let said = String::from_utf8(srv.writes.concat()).unwrap();
        assert!(said.contains("MAIL FROM:<from@a.test>\r\n"), "{said}");
        // Not requested: a legacy UTF-8 local part goes as it is.
        let mut srv =
            Scripted::new("220 x\r\n250 x\r\n250 ok\r\n250 ok\r\n354 go\r\n250 ok\r\n221 bye\r\n");
        let mut txn = TestTxn::new(&["jö@b.test"], b"x\n");
        deliver(&mut srv, &peer(), &settings(5), &mut txn);
        assert_eq!(txn.outcome(0).unwrap().0, Outcome::Sent);
        // Requested, offered: MAIL FROM carries SMTPUTF8.
        let mut srv = Scripted::new(
            "220 x\r\n250-x\r\n250 SMTPUTF8\r\n250 ok\r\n250 ok\r\n354 go\r\n250 ok\r\n221 bye\r\n",
        );
        let mut txn = TestTxn::new(&["jö@b.test"], b"x\n");
        txn.smtputf8.requested = true;
        deliver(&mut srv, &peer(), &settings(5), &mut txn);
        assert_eq!(txn.outcome(0).unwrap().0, Outcome::Sent);
        let said = String::from_utf8(srv.writes.concat()).unwrap();
        assert!(
            said.contains("MAIL FROM:<from@a.test> SMTPUTF8\r\n"),
            "{said}"
        );
        // SMTPUTF8 without 8BITMIME: 8-bit content goes (as Postfix).
        let mut srv = Scripted::new(
            "220 x\r\n250-x\r\n250 SMTPUTF8\r\n250 ok\r\n250 ok\r\n354 go\r\n250 ok\r\n221 bye\r\n",
        );
        let mut txn = TestTxn::new(&["a@b.test"], "Subject: ä\n\nö\n".as_bytes());
        deliver(&mut srv, &peer(), &settings(5), &mut txn);
        assert_eq!(txn.outcome(0).unwrap().0, Outcome::Sent);
        // 8-bit content to a server without 8BITMIME: bounced, not sent.
        let mut srv = Scripted::new("220 x\r\n250 x\r\n221 bye\r\n");
        let mut txn = TestTxn::new(&["a@b.test"], "Subject: x\n\nsmörgåsbord\n".as_bytes());
        deliver(&mut srv, &peer(), &settings(5), &mut txn);
        let (outcome, dsn, reason) = txn.outcome(0).unwrap();
        assert_eq!((outcome, dsn), (Outcome::Bounced, "5.6.3"));
        assert!(reason.contains("did not offer 8BITMIME"), "{reason}");
    }

    /// A real socket: a server thread that answers each command as it
    /// comes and checks the client's bytes.
    #[test]
    fn over_loopback_tcp() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let body: Vec<u8> = (0..20_000)
            .flat_map(|i| format!(".line {i}\n").into_bytes())
            .collect();
        let expect: Vec<u8> = (0..20_000)
            .flat_map(|i| format!("..line {i}\r\n").into_bytes())
            .collect();
        let server = std::thread::spawn(move || {
            let (c, _) = l.accept().unwrap();
            let mut w = c.try_clone().unwrap();
            let mut r = io::BufReader::new(c);
            use std::io::BufRead;
            let mut line = String::new();
            let mut next = |r: &mut io::BufReader<TcpStream>| {
                line.clear();
                r.read_line(&mut line).unwrap();
                line.clone()
            };
            w.write_all(b"220 loop ESMTP\r\n").unwrap();
            assert_eq!(next(&mut r), "EHLO client.test\r\n");
            w.write_all(b"250-loop\r\n250 PIPELINING\r\n").unwrap();
            assert!(next(&mut r).starts_with("MAIL FROM:<from@a.test>"));
            assert_eq!(next(&mut r), "RCPT TO:<a@b.test>\r\n");
            assert_eq!(next(&mut r), "DATA\r\n");
            w.write_all(b"250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n354 go\r\n")
                .unwrap();
            let mut got = Vec::new();
            loop {
                let mut l = Vec::new();
                r.read_until(b'\n', &mut l).unwrap();
                if l == b".\r\n" {
                    break;
                }
                got.extend_from_slice(&l);
            }
            w.write_all(b"250 2.0.0 Ok: queued as LOOP1\r\n").unwrap();
            assert_eq!(next(&mut r), "QUIT\r\n");
            w.write_all(b"221 bye\r\n").unwrap();
            got
        });
        let s = TcpStream::connect(("127.0.0.1", port)).unwrap();
        let mut txn = TestTxn::new(&["a@b.test"], &body);
        txn.chunk = 4000;
        let p = Server { port, ..peer() };
        assert_eq!(deliver(s, &p, &settings(5), &mut txn), End::Complete);
        assert_eq!(
            txn.outcome(0).unwrap(),
            (Outcome::Sent, "2.0.0", "250 2.0.0 Ok: queued as LOOP1")
        );
        assert_eq!(server.join().unwrap(), expect);
    }

    #[test]
    fn greeting_timeout() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let server = std::thread::spawn(move || {
            let (c, _) = l.accept().unwrap();
            std::thread::sleep(Duration::from_millis(1500));
            drop(c);
        });
        let s = TcpStream::connect(("127.0.0.1", port)).unwrap();
        let mut txn = TestTxn::new(&["a@b.test"], b"x\n");
        let end = deliver(s, &peer(), &settings(1), &mut txn);
        server.join().unwrap();
        match end {
            End::TryNext { failure, handshake } => {
                assert!(!handshake);
                assert_eq!(failure.dsn, "4.4.2");
                assert_eq!(
                    failure.reason,
                    "conversation with mx.b.test[127.0.0.1] timed out while receiving the initial server greeting"
                );
            }
            e => panic!("{e:?}"),
        }
    }
}
