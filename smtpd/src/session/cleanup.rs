//! The queue file, through cleanup: opening it (at MAIL, RCPT or DATA),
//! the envelope and the content with our Received header, the end of
//! DATA, and the replies built from cleanup's answers.

use super::{DataState, Opening, Session, State};
use crate::data::Decoder;
use crate::received::Received;
use postern_common::ipc::{CleanupReply, CleanupRequest, NewMessage};
use postern_common::qfile::attr;
use postern_common::smtp_command::{self as protocol, Verb};
use postern_common::smtputf8;
use postern_common::{info, warning};
use std::ops::ControlFlow;

/// Content goes to cleanup in pieces of about this size.
const CONTENT_CHUNK: usize = 64 * 1024;

pub(super) const WRITE_ERROR: &str = "451 4.3.0 Error: queue file write error";

impl Session {
    /// Whether the session waits for cleanup (the client's timeout does
    /// not run meanwhile; cleanup's does).
    pub fn waiting_on_cleanup(&self) -> bool {
        matches!(self.state, State::WaitOpened(_) | State::WaitQueued)
    }

    /// An answer from cleanup.
    pub fn cleanup_reply(&mut self, reply: CleanupReply) {
        let state = std::mem::replace(&mut self.state, State::Command);
        match (state, reply) {
            (State::WaitOpened(opening), CleanupReply::Opened { queue_id }) => {
                match (&self.sasl_method, &self.sasl_username) {
                    (Some(m), Some(u)) => info!(
                        "{queue_id}: client={}, sasl_method={m}, sasl_username={u}",
                        self.namaddr
                    ),
                    _ => match (&self.xforward.ident, self.xforward.namaddr()) {
                        // Mail back from a content filter (XFORWARD).
                        (ident, Some(orig)) => info!(
                            "{queue_id}: client={}{}, orig_client={orig}",
                            self.namaddr,
                            ident
                                .as_ref()
                                .map(|i| format!(", orig_queue_id={i}"))
                                .unwrap_or_default()
                        ),
                        _ => info!("{queue_id}: client={}", self.namaddr),
                    },
                }
                if let Some(tx) = &mut self.tx {
                    tx.queue_id = Some(queue_id);
                }
                match opening {
                    Opening::Mail => {
                        self.reply("250 2.1.0 Ok");
                        self.count_ok(Verb::Mail);
                    }
                    Opening::Rcpt => {
                        self.reply("250 2.1.5 Ok");
                        self.count_ok(Verb::Rcpt);
                    }
                    Opening::Data => self.start_data(),
                }
            }
            (
                State::Data(mut ds),
                CleanupReply::Failed {
                    temporary,
                    dsn,
                    reason,
                },
            ) => {
                // cleanup gave up early: read to the end, then say why.
                self.cleanup_open = false;
                ds.failure = Some(failure_reply(temporary, &dsn, &reason));
                ds.content.clear();
                self.state = State::Data(ds);
            }
            (State::WaitQueued, CleanupReply::Queued { queue_id }) => {
                self.cleanup_open = false;
                self.reply(&format!("250 2.0.0 Ok: queued as {queue_id}"));
                self.count_ok(Verb::Data);
                // A message made it: forgive earlier errors, as Postfix.
                self.error_count = 0;
                self.junk = 0;
                self.tx = None;
                self.xforward = Default::default();
                self.access_filter.take();
                self.access_prepend.take();
            }
            (
                state @ (State::WaitOpened(_) | State::WaitQueued),
                CleanupReply::Failed {
                    temporary,
                    dsn,
                    reason,
                },
            ) => {
                let reply = failure_reply(temporary, &dsn, &reason);
                self.waited_in_vain(&state, &reply);
            }
            (state, other) => {
                warning!("{}: unexpected reply from cleanup: {other:?}", self.namaddr);
                self.state = state;
                if self.cleanup_open {
                    self.cleanup_lost();
                } else {
                    // A connection the session no longer uses: close it,
                    // and cleanup gives its file up.
                    self.requests.push(CleanupRequest::Abort);
                }
                return;
            }
        }
        self.process();
    }

    /// Whether the session has given up the cleanup connection the loop
    /// still holds (its next request is Abort): then the loss of that
    /// connection is no news to it, and must not fail the file it asks
    /// for next.
    pub fn gave_up_cleanup(&self) -> bool {
        matches!(self.requests.first(), Some(CleanupRequest::Abort))
    }

    /// The cleanup connection could not be made, broke, or timed out.
    pub fn cleanup_lost(&mut self) {
        if !self.cleanup_open {
            return;
        }
        self.cleanup_open = false;
        match &mut self.state {
            State::WaitOpened(_) | State::WaitQueued => {
                let state = std::mem::replace(&mut self.state, State::Command);
                self.waited_in_vain(&state, WRITE_ERROR);
                self.process();
            }
            State::Data(ds) => {
                ds.content.clear();
                ds.failure.get_or_insert_with(|| WRITE_ERROR.to_string());
            }
            _ => {
                // Opened at RCPT, lost before DATA (cleanup's own time
                // limit, a crash): DATA opens another file.
                if let Some(tx) = &mut self.tx {
                    tx.queue_id = None;
                }
            }
        }
    }

    /// Feeds the input from `pos` to the DATA decoder, and the content to
    /// cleanup in chunks (nothing more once over the size limit or failed);
    /// breaks when the input is used up before the final dot.
    pub(super) fn feed_content(&mut self, mut pos: usize) -> ControlFlow<usize, usize> {
        let State::Data(ds) = &mut self.state else {
            return ControlFlow::Break(pos);
        };
        let fed = ds.decoder.feed(&self.input[pos..], &mut ds.content);
        pos += fed.consumed;
        ds.size += fed.size;
        let limit = self.cfg.message_size_limit;
        if limit > 0 && ds.size > limit && !ds.too_big {
            ds.too_big = true;
            let qid = self
                .tx
                .as_ref()
                .and_then(|t| t.queue_id.clone())
                .unwrap_or_else(|| "NOQUEUE".into());
            warning!("{qid}: queue file size limit exceeded");
        }
        if ds.too_big || ds.failure.is_some() {
            ds.content.clear();
            if ds.too_big {
                self.abort_cleanup();
            }
        } else if ds.content.len() >= CONTENT_CHUNK {
            let chunk = std::mem::take(&mut ds.content);
            self.push_content(chunk);
        }
        if !fed.end {
            return ControlFlow::Break(pos);
        }
        self.end_of_data();
        self.check_error_limit();
        ControlFlow::Continue(pos)
    }

    fn end_of_data(&mut self) {
        let State::Data(mut ds) = std::mem::replace(&mut self.state, State::Command) else {
            return;
        };
        self.where_ = "END-OF-MESSAGE";
        let failure = if ds.too_big {
            Some("552 5.3.4 Error: message file too big".to_string())
        } else if ds.failure.is_some() {
            ds.failure.take()
        } else if self.proxy_data && !self.proxy_open && !self.proxy_speed_adjust() {
            Some(crate::proxy::PROXY_ERROR.to_string())
        } else if !self.proxy_data && !self.cleanup_open {
            Some(WRITE_ERROR.to_string())
        } else {
            None
        };
        let refused = match failure {
            None if self.cfg.restrictions.has_end_of_data() => self.end_of_data_refusal(),
            _ => None,
        };
        if let Some(reply) = refused {
            // smtpd_end_of_data_restrictions refused the whole message: it
            // is never queued.
            let sender = self.tx.as_ref().map(|t| t.sender.clone());
            let only = match self.tx.as_ref().map(|t| &t.recipients[..]) {
                Some([one]) => Some(one.address.clone()),
                _ => None,
            };
            self.abort_cleanup();
            self.log_reject(&reply, sender.as_deref(), only.as_deref());
            self.reply(&reply);
            self.transaction_failed();
            return;
        }
        match failure {
            Some(reply) => {
                self.abort_cleanup();
                self.reply(&reply);
                self.transaction_failed();
            }
            None if self.proxy_data => self.proxy_end(std::mem::take(&mut ds.content)),
            None => {
                if !ds.content.is_empty() {
                    self.requests
                        .push(CleanupRequest::Content(std::mem::take(&mut ds.content)));
                }
                self.requests.push(CleanupRequest::Close);
                self.state = State::WaitQueued;
            }
        }
    }

    /// A piece of content for cleanup, or for the before-queue filter.
    pub(super) fn push_content(&mut self, chunk: Vec<u8>) {
        if self.proxy_data {
            self.proxy_content(chunk);
        } else {
            self.requests.push(CleanupRequest::Content(chunk));
        }
    }

    /// Asks cleanup for a queue file; the reply to `opening` waits for
    /// its answer.
    pub(super) fn open_queue_file(&mut self, opening: Opening) {
        self.abort_cleanup();
        self.requests.push(CleanupRequest::Open);
        self.cleanup_open = true;
        self.state = State::WaitOpened(opening);
    }

    /// DATA with the queue file open: sends the envelope, answers 354 and
    /// starts on the content, which begins with our Received header.
    pub(super) fn start_data(&mut self) {
        let Some(tx) = &self.tx else {
            return;
        };
        // The original client of mail back from a content filter.
        let xf = &self.xforward;
        let mut attrs = vec![
            (
                attr::CLIENT.to_string(),
                xf.namaddr().unwrap_or_else(|| self.namaddr.clone()),
            ),
            (
                attr::PROTOCOL.to_string(),
                xf.proto.clone().unwrap_or_else(|| self.protocol()),
            ),
            (
                attr::SOURCE.to_string(),
                xf.source.clone().unwrap_or_else(|| "REMOTE".into()),
            ),
        ];
        if let Some(h) = xf.helo.as_ref().or(self.helo.as_ref()) {
            attrs.push((attr::HELO.to_string(), h.clone()));
        }
        // An access table's FILTER wins over content_filter (an empty
        // content_filter, as on a reinjection service, is none).
        let filter = self
            .access_filter
            .borrow()
            .clone()
            .unwrap_or_else(|| self.cfg.content_filter.clone());
        if !filter.is_empty() {
            attrs.push((attr::FILTER.to_string(), filter));
        }
        if let Some(e) = &tx.envid {
            attrs.push((attr::ENVID.to_string(), e.clone()));
        }
        if let Some(r) = &tx.ret {
            attrs.push((attr::RET.to_string(), r.clone()));
        }
        if tx.requiretls {
            attrs.push((attr::REQUIRETLS.to_string(), "yes".to_string()));
        }
        if tx.smtputf8 {
            let flags = smtputf8::Flags {
                requested: true,
                ..Default::default()
            };
            attrs.push((attr::SMTPUTF8.to_string(), flags.value()));
        }
        // What pipe(8)'s ${client_port} and ${sasl_*} macros show.
        if let Some(p) = self.xforward.port.or(self.client.port) {
            attrs.push((attr::CLIENT_PORT.to_string(), p.to_string()));
        }
        if let (Some(m), Some(u)) = (&self.sasl_method, &self.sasl_username) {
            attrs.push((attr::SASL_METHOD.to_string(), m.clone()));
            attrs.push((attr::SASL_USERNAME.to_string(), u.clone()));
        }
        if let Some(s) = &tx.sasl_sender {
            attrs.push((attr::SASL_SENDER.to_string(), s.clone()));
        }
        for (n, v) in self.milter_session_macros() {
            attrs.push((format!("{}{n}", attr::MILTER_MACRO_PREFIX), v));
        }
        let msg = NewMessage {
            sender: tx.sender.clone(),
            recipients: tx.recipients.clone(),
            attrs,
            flags: self.cfg.receive_override.cleanup_flags
                | if self.milter_discard {
                    postern_common::ipc::cleanup_flags::MILTER_DISCARD
                } else {
                    0
                },
            origin: "smtpd".to_string(),
        };
        let queue_id = tx.queue_id.clone().unwrap_or_default();
        self.requests.push(CleanupRequest::Envelope(msg));
        self.begin_content(Some(&queue_id));
    }

    /// The date, 354, and the content begins: PREPEND headers, then our
    /// Received header (`queue_id` None: no queue file here, a
    /// before-queue filter gets the message).
    pub(super) fn begin_content(&mut self, queue_id: Option<&str>) {
        self.date = postern_common::time::rfc5322_date(postern_common::time::now_secs());
        let mut header: String = self
            .access_prepend
            .borrow()
            .iter()
            .map(|h| format!("{h}\n"))
            .collect();
        // Before a filter, a client that told us the original client
        // (XFORWARD) makes us an intermediate proxy: Postfix adds no
        // Received header then.
        if queue_id.is_some() || self.xforward == Default::default() {
            header.push_str(&self.received_header(queue_id.unwrap_or("")));
        }
        self.reply("354 End data with <CR><LF>.<CR><LF>");
        self.where_ = "DATA";
        self.state = State::Data(Box::new(DataState {
            decoder: Decoder::new(self.cfg.line_limit),
            size: 0,
            too_big: false,
            failure: None,
            content: header.into_bytes(),
        }));
    }

    /// cleanup refused, or was lost, while the reply to a command waited
    /// for it (`state`): that reply is `reply`.
    fn waited_in_vain(&mut self, state: &State, reply: &str) {
        self.cleanup_open = false;
        self.state = State::Command;
        self.reply(reply);
        match state {
            State::WaitOpened(opening) => self.open_failed(*opening),
            _ => self.transaction_failed(),
        }
    }

    /// cleanup could not open a queue file for `opening`: its reply (sent
    /// already) is a failure.
    fn open_failed(&mut self, opening: Opening) {
        match opening {
            // The transaction never started.
            Opening::Mail => self.tx = None,
            // The recipient was not taken; the next one tries again.
            Opening::Rcpt => {
                if let Some(tx) = &mut self.tx {
                    tx.recipients.pop();
                }
            }
            Opening::Data => return self.transaction_failed(),
        }
        self.error_count += 1;
        self.check_error_limit();
    }

    /// The `with` word of our Received header: `UTF8SMTP` (and its RFC
    /// 3848 `S`/`A` suffixes) for an SMTPUTF8 transaction, as Postfix.
    fn received_protocol(&self) -> String {
        let p = self.protocol();
        if self.tx.as_ref().is_some_and(|t| t.smtputf8) {
            let rest = p.strip_prefix('E').unwrap_or(&p);
            format!("UTF8{rest}")
        } else {
            p
        }
    }

    fn received_header(&self, queue_id: &str) -> String {
        let tls = self
            .tls
            .as_ref()
            .filter(|_| self.cfg.tls_received_header)
            .map(|n| (n.summary(), n.details()));
        let rcpts: Vec<&str> = self
            .tx
            .as_ref()
            .map(|t| t.recipients.iter().map(|r| r.address.as_str()).collect())
            .unwrap_or_default();
        // The client that connected, XFORWARD or not, as Postfix: the
        // trace shows each hop as it was.
        Received {
            helo: self.helo.as_deref(),
            client_name: &self.client.names.name,
            client_addr: self.client.addr,
            myhostname: &self.cfg.myhostname,
            mail_name: &self.cfg.mail_name,
            protocol: &self.received_protocol(),
            queue_id,
            recipients: &rcpts,
            date: &self.date,
            tls: tls.as_ref().map(|(s, _)| s.as_str()),
            tls_details: tls.as_ref().map(|(_, d)| d.as_str()).unwrap_or(""),
            auth_sender: if self.cfg.sasl_authenticated_header {
                self.sasl_username.as_deref()
            } else {
                None
            },
        }
        .render()
    }

    /// `smtpd_end_of_data_restrictions`, after the final dot: the reply
    /// that refuses the message, if any.
    fn end_of_data_refusal(&self) -> Option<String> {
        let req = self.request(None, "END-OF-MESSAGE");
        self.cfg.restrictions.check_end_of_data(&req)
    }

    pub(super) fn abort_cleanup(&mut self) {
        if self.cleanup_open {
            self.cleanup_open = false;
            self.requests.push(CleanupRequest::Abort);
        }
    }
}

/// The reply for a message cleanup would not take.
pub(super) fn failure_reply(temporary: bool, dsn: &str, reason: &str) -> String {
    if dsn == postern_common::ipc::MILTER_REPLY_DSN {
        // A milter's own reply, as the milter gave it (checked to be a
        // 4xx/5xx reply, lines joined by CRLF).
        let class = if temporary { '4' } else { '5' };
        let ok = reason.len() >= 4
            && reason.starts_with(class)
            && reason.as_bytes()[..3].iter().all(u8::is_ascii_digit)
            && matches!(reason.as_bytes()[3], b' ' | b'-');
        if ok && !reason.contains('\0') {
            return reason.to_string();
        }
    }
    let valid = |d: &str, class: char| {
        d.starts_with(class)
            && d.split('.').count() == 3
            && d.split('.')
                .all(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()))
    };
    let (code, dsn, default) = if temporary {
        let dsn = if valid(dsn, '4') { dsn } else { "4.3.0" };
        if dsn == "4.3.1" {
            // Postfix's answer for a full queue file system.
            return "452 4.3.1 Insufficient system storage".to_string();
        }
        (451, dsn, "queue file write error")
    } else {
        let dsn = if valid(dsn, '5') { dsn } else { "5.3.0" };
        if dsn.starts_with("5.7.") && !reason.trim().is_empty() {
            // Content rejected (header_checks, body_checks): Postfix
            // answers with the rule's text alone (CLEANUP_STAT_CONT).
            return format!("550 {dsn} {}", protocol::printable(reason.as_bytes(), 400));
        }
        let code = if dsn == "5.3.4" { 552 } else { 554 };
        (code, dsn, "message not accepted")
    };
    let reason = protocol::printable(reason.as_bytes(), 400);
    let reason = if reason.trim().is_empty() {
        default.to_string()
    } else {
        reason
    };
    format!("{code} {dsn} Error: {reason}")
}
