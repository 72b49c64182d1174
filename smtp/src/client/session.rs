//! One session with a server: its I/O, the failures it reports, and its
//! start (greeting, EHLO/LHLO or HELO, then STARTTLS and AUTH as the
//! security settings say) before the mail transaction.

use super::{stage, End, Extensions, Idle, PeerId, Settings, Stream, Transaction};
use crate::nexthop::Failure;
use crate::reply::{LineReader, Reply};
use postern_common::ipc::Outcome;
use postern_common::{debug, info};
use std::io;
use std::time::Duration;

/// One conversation's state; the stages live in sibling modules
/// ([`super::auth`], [`super::starttls`], [`super::transaction`],
/// [`super::content`]).
pub(super) struct Session<'a, 'c> {
    pub(super) conn: Box<dyn Stream + Send + 'c>,
    /// The transaction ended well and `settings.keep` is set.
    pub(super) reusable: bool,
    /// What the server offered (after STARTTLS, when used).
    pub(super) ext: Option<Extensions>,
    pub(super) tls: Option<&'a crate::tls::Client>,
    pub(super) sasl: Option<&'a crate::sasl::Auth>,
    /// STARTTLS succeeded.
    pub(super) encrypted: bool,
    /// The TLS cipher and protocol version STARTTLS negotiated (for the
    /// accounting log, [`super::Transaction::tls_used`]).
    pub(super) tls_used: Option<(String, String)>,
    pub(super) rd: LineReader,
    pub(super) wbuf: Vec<u8>,
    pub(super) peer: PeerId,
    pub(super) settings: &'a Settings,
    pub(super) handshake: bool,
    /// The limit last set on `conn`: a stage with the same limit as the
    /// one before costs no system calls.
    pub(super) time_limit: Option<Duration>,
    /// A kept session's RSET waits in `wbuf` to go out with the MAIL,
    /// RCPT and DATA commands (PIPELINING); its reply comes first.
    pub(super) rset_queued: bool,
    /// That RSET was not answered 2xx (or the session was gone): nothing
    /// was delivered, and the caller starts a new session.
    pub(super) stale: bool,
}

impl<'a, 'c> Session<'a, 'c> {
    pub(super) fn timeout(&mut self, t: Duration) {
        if self.time_limit == Some(t) {
            return;
        }
        // A stream that cannot take a time limit still works.
        self.time_limit = self.conn.set_timeout(t).ok().map(|_| t);
    }

    pub(super) fn queue(&mut self, cmd: &str) {
        if postern_common::log::verbose() {
            debug!("> {}: {}", self.peer.namaddr, cmd);
        }
        self.wbuf.extend_from_slice(cmd.as_bytes());
        self.wbuf.extend_from_slice(b"\r\n");
    }

    pub(super) fn flush(&mut self) -> io::Result<()> {
        let r = self
            .conn
            .write_all(&self.wbuf)
            .and_then(|_| self.conn.flush());
        self.wbuf.clear();
        r
    }

    pub(super) fn read(&mut self) -> io::Result<Reply> {
        let r = self.rd.read_reply(&mut self.conn)?;
        if postern_common::log::verbose() {
            debug!("< {}: {}", self.peer.namaddr, r.text());
        }
        Ok(r)
    }

    /// Sends `cmd` (unless already sent in a pipelined batch) and reads
    /// its reply.
    pub(super) fn command(&mut self, cmd: Option<&str>) -> io::Result<Reply> {
        if let Some(c) = cmd {
            self.queue(c);
            self.flush()?;
        }
        self.read()
    }

    /// The failure for an I/O error at a stage.
    pub(super) fn io_failure(&self, e: &io::Error, stage: &str) -> Failure {
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

    pub(super) fn try_next(&self, failure: Failure) -> End {
        End::TryNext {
            failure,
            handshake: self.handshake,
        }
    }

    /// The outcome, DSN and reason for a failed reply to `what`
    /// ("RCPT TO command"): 4xx deferred, 5xx bounced, anything else a
    /// protocol error (deferred).
    pub(super) fn said(&self, r: &Reply, what: &str) -> (Outcome, String, String) {
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

    pub(super) fn refused(&self, r: &Reply) -> Failure {
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
    pub(super) fn done(&mut self) {
        if self.settings.keep {
            self.reusable = true;
        } else {
            self.quit();
        }
    }

    /// Sends QUIT and, unless `smtp_skip_quit_response`, reads its
    /// reply, ignoring any trouble.
    pub(super) fn quit(&mut self) {
        self.timeout(self.settings.timeouts.quit);
        self.queue("QUIT");
        if self.flush().is_ok() && !self.settings.skip_quit_response {
            let _ = self.read();
        }
    }

    pub(super) fn record_all<T: Transaction>(
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

    pub(super) fn run<T: Transaction>(&mut self, txn: &mut T) -> End {
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
    pub(super) fn extensions(&self, r: &Reply) -> Extensions {
        let mut ext = Extensions::parse(r);
        let gone = ext.discard(&self.settings.discard);
        if !gone.is_empty() && !self.settings.discard.iter().any(|k| k == "silent-discard") {
            info!("discarding EHLO keywords: {}", gone.join(" "));
        }
        ext
    }

    /// The session's end, and the session itself when it may be reused.
    pub(super) fn finish(self, end: End) -> (End, Option<Idle<'c>>) {
        match (self.reusable, self.ext) {
            (true, Some(ext)) if end == End::Complete => (
                end,
                Some(Idle {
                    conn: self.conn,
                    ext,
                    encrypted: self.encrypted,
                    tls_used: self.tls_used,
                    skip_quit_response: self.settings.skip_quit_response,
                }),
            ),
            _ => (end, None),
        }
    }
}
