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
//!
//! Here: the interface (the stream, settings, [`Transaction`], how a
//! session ends, [`deliver_with`] and [`deliver_again`]). The stages, in
//! the order a session meets them: `session` (the session's I/O and
//! failures; greeting, EHLO/LHLO or HELO), [`Extensions`] (what EHLO
//! offers), `starttls`, `auth`, `transaction` (MAIL, RCPT, DATA, the
//! replies to the end of the content), `content` (the content after
//! DATA, or as BDAT chunks), [`DataEncoder`] (the content's wire form).

mod auth;
pub(crate) mod content;
mod data_encoder;
mod extensions;
mod session;
mod starttls;
#[cfg(test)]
mod tests;
mod transaction;

pub use data_encoder::DataEncoder;
pub use extensions::Extensions;
pub use starttls::TLS_HANDSHAKE_FAILURE;
pub use transaction::smtp_address;

use crate::nexthop::{Failure, Server};
use crate::reply::LineReader;
use postern_common::ipc::Outcome;
use session::Session;
use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::time::Duration;

/// A byte stream to a server whose I/O can be given a time limit.
pub trait Stream: Read + Write {
    /// Limits each following read and write to `t` (zero: no limit).
    fn set_timeout(&mut self, t: Duration) -> io::Result<()>;
    /// Acknowledges what was received now, not after the delayed-ACK
    /// timer ([`postern_common::tcp::ack_now`]); TCP only.
    fn ack_now(&mut self) {}
}

impl<S: Stream + ?Sized> Stream for Box<S> {
    fn set_timeout(&mut self, t: Duration) -> io::Result<()> {
        (**self).set_timeout(t)
    }
    fn ack_now(&mut self) {
        (**self).ack_now()
    }
}

impl<S: Stream + ?Sized> Stream for &mut S {
    fn set_timeout(&mut self, t: Duration) -> io::Result<()> {
        (**self).set_timeout(t)
    }
    fn ack_now(&mut self) {
        (**self).ack_now()
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
    fn ack_now(&mut self) {
        postern_common::tcp::ack_now(&*self)
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
    /// `smtp_send_xforward_command`: tell a server that offers XFORWARD
    /// who the message's original client was (to a content filter's
    /// reinjection smtpd, through the filter).
    pub send_xforward: bool,
    /// `smtp_xforward_timeout`.
    pub xforward_timeout: Duration,
    /// `smtp_skip_quit_response` (LMTP: `lmtp_skip_quit_response`): send
    /// QUIT and close without waiting for its reply. The transaction is
    /// over by then; waiting only costs the agent a round trip and a
    /// wake-up per session.
    pub skip_quit_response: bool,
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
    /// The session is encrypted with this cipher and protocol version
    /// (told before the transaction's outcomes are recorded).
    fn tls_used(&mut self, _cipher: &str, _protocol: &str) {}
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
    /// The message came with REQUIRETLS (RFC 8689) and this delivery
    /// relays it: only over authenticated TLS to a server that offers
    /// REQUIRETLS, with MAIL FROM's REQUIRETLS. Never for final delivery
    /// (LMTP).
    fn requiretls(&mut self) -> bool {
        false
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
    /// XFORWARD's attributes of the message's original client (`NAME`,
    /// `ADDR`, `PORT`, `PROTO`, `HELO`, `IDENT`, `SOURCE`), as known.
    fn xforward(&mut self) -> Vec<(&'static str, String)> {
        Vec::new()
    }
    /// An address verification probe: the transaction ends after the
    /// RCPT TO replies (each recipient's outcome is its RCPT reply), no
    /// DATA, as Postfix's `smtp_address_verify_target = rcpt`.
    fn verify_only(&self) -> bool {
        false
    }
}

/// RFC 8689's status for a REQUIRETLS message that would go over TLS
/// that does not authenticate the server (or none).
pub const REQUIRETLS_UNAUTHENTICATED: &str = "5.7.10";
/// RFC 8689's status for a REQUIRETLS message whose next hop does not
/// offer REQUIRETLS ("REQUIRETLS support required").
pub const REQUIRETLS_UNSUPPORTED: &str = "5.7.30";

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
    pub const XFORWARD: &str = "sending XFORWARD command";
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
        tls_used: idle.tls_used,
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
    tls_used: Option<(String, String)>,
    /// `Settings::skip_quit_response` of the session it was.
    skip_quit_response: bool,
}

impl Idle<'_> {
    /// Ends the session politely: QUIT, and its reply unless
    /// `smtp_skip_quit_response`.
    pub fn quit(mut self, timeout: Duration) {
        let _ = self.conn.set_timeout(timeout);
        if self.conn.write_all(b"QUIT\r\n").is_ok()
            && self.conn.flush().is_ok()
            && !self.skip_quit_response
        {
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
        tls_used: None,
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
