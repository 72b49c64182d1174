//! The transaction through a before-queue content filter
//! (`smtpd_proxy_filter`, see [`crate::proxy`]): no queue file here; the
//! filter gets the client's MAIL FROM, each RCPT TO and DATA when the
//! session has accepted them, the content with our Received header, and
//! its reply to the final dot is the client's. With `smtpd_proxy_options
//! = speed_adjust` the recipients are answered here and everything goes
//! to the filter at once after the final dot (the content waits in
//! memory, at most `message_size_limit`).
//!
//! The session asks for the connection's steps ([`Session::take_proxy_requests`])
//! and waits, taking no input, for the replies it needs
//! ([`Session::proxy_event`]).

use super::{Session, State};
use crate::proxy::{Event, Request, Step, PROXY_ERROR};
use postern_common::qfile::Recipient;
use postern_common::smtp_command::Verb;

/// The reply the session waits for from the filter.
#[derive(Debug)]
pub(super) enum ProxyWait {
    /// The connection opened at MAIL FROM
    /// (`smtpd_delay_open_until_valid_rcpt = no`).
    Mail,
    /// RCPT TO for this recipient.
    Rcpt(Recipient),
    /// DATA.
    Data,
    /// The final dot.
    End,
}

impl Session {
    /// Whether this session's mail goes through a before-queue filter.
    pub(super) fn proxied(&self) -> bool {
        self.cfg.proxy.is_some()
    }

    pub(super) fn proxy_speed_adjust(&self) -> bool {
        self.cfg
            .proxy
            .as_ref()
            .is_some_and(|p| p.options.speed_adjust)
    }

    /// What the loop is to do with the filter connection.
    pub fn take_proxy_requests(&mut self) -> Vec<Request> {
        std::mem::take(&mut self.proxy_requests)
    }

    /// Whether the session waits for the filter (the client's timeout
    /// does not run meanwhile; the filter's does).
    pub fn waiting_on_proxy(&self) -> bool {
        matches!(self.state, State::WaitProxy(_))
    }

    /// The steps that open the connection: EHLO, XFORWARD and the
    /// client's MAIL FROM.
    fn open_step(&self, report: bool) -> Step {
        let xf = &self.xforward;
        let name = xf.name.clone().or_else(|| {
            let n = &self.client.names.name;
            (n != crate::dns::UNKNOWN).then(|| n.clone())
        });
        let addr = xf.addr.unwrap_or(self.client.addr);
        let addr = match addr {
            std::net::IpAddr::V6(a) => format!("IPv6:{a}"),
            a => a.to_string(),
        };
        let port = xf.port.or(self.client.port).map(|p| p.to_string());
        let attrs = vec![
            ("NAME", name),
            ("ADDR", Some(addr)),
            ("PORT", port),
            ("HELO", xf.helo.clone().or_else(|| self.helo.clone())),
            ("IDENT", xf.ident.clone()),
            (
                "PROTO",
                Some(xf.proto.clone().unwrap_or_else(|| self.protocol())),
            ),
            (
                "SOURCE",
                Some(xf.source.clone().unwrap_or_else(|| "REMOTE".into())),
            ),
        ];
        Step::Open {
            xforward: attrs,
            mail: self
                .tx
                .as_ref()
                .map(|t| t.proxy_mail.clone())
                .unwrap_or_default(),
            report,
        }
    }

    fn proxy_start(&mut self, report_open: bool) {
        self.proxy_requests.push(Request::Start);
        let open = self.open_step(report_open);
        self.proxy_requests.push(Request::Step(open));
        self.proxy_open = true;
    }

    /// Drops the filter connection (QUIT) of a transaction that ended.
    pub(super) fn proxy_close(&mut self) {
        if std::mem::take(&mut self.proxy_open) {
            self.proxy_requests.push(Request::Close);
        }
        self.proxy_data = false;
    }

    /// MAIL FROM accepted with `smtpd_delay_open_until_valid_rcpt = no`:
    /// the filter is connected now (unless speed_adjust).
    pub(super) fn proxy_mail(&mut self) -> super::Done {
        if self.proxy_speed_adjust() {
            self.reply("250 2.1.0 Ok");
            return super::Done::Ok;
        }
        self.proxy_start(true);
        self.state = State::WaitProxy(ProxyWait::Mail);
        super::Done::Pending
    }

    /// A recipient our restrictions accepted: the filter's turn.
    pub(super) fn proxy_rcpt(&mut self, rcpt: Recipient) -> super::Done {
        let line = String::from_utf8_lossy(&self.current_line).into_owned();
        if self.proxy_speed_adjust() {
            if let Some(tx) = &mut self.tx {
                tx.recipients.push(rcpt);
                tx.proxy_rcpts.push(line);
            }
            self.reply("250 2.1.5 Ok");
            return super::Done::Ok;
        }
        if !self.proxy_open {
            // The filter took recipients on a connection since broken:
            // Postfix's answer to every command that follows (a new
            // connection would lose them).
            if self.tx.as_ref().is_some_and(|t| !t.recipients.is_empty()) {
                return self.fail(PROXY_ERROR);
            }
            self.proxy_start(false);
        }
        self.proxy_requests.push(Request::Step(Step::Command {
            line,
            expect: b'2',
            report: true,
        }));
        self.state = State::WaitProxy(ProxyWait::Rcpt(rcpt));
        super::Done::Pending
    }

    /// DATA, after the data restrictions: the filter's turn.
    pub(super) fn proxy_data_cmd(&mut self) -> super::Done {
        if self.proxy_speed_adjust() {
            self.proxy_start_data();
            return super::Done::Pending;
        }
        if !self.proxy_open {
            // The connection was lost after the recipients.
            return self.fail(PROXY_ERROR);
        }
        let line = String::from_utf8_lossy(&self.current_line).into_owned();
        self.proxy_requests.push(Request::Step(Step::Command {
            line,
            expect: b'3',
            report: true,
        }));
        self.state = State::WaitProxy(ProxyWait::Data);
        super::Done::Pending
    }

    /// 354, and the content begins, for the filter.
    fn proxy_start_data(&mut self) {
        self.proxy_data = true;
        self.begin_content(None);
    }

    /// Message content for the filter (kept until the end with
    /// speed_adjust).
    pub(super) fn proxy_content(&mut self, chunk: Vec<u8>) {
        if self.proxy_speed_adjust() {
            if let Some(tx) = &mut self.tx {
                tx.proxy_content.extend_from_slice(&chunk);
            }
        } else if self.proxy_open {
            self.proxy_requests
                .push(Request::Step(Step::Content(chunk)));
        }
    }

    /// The final dot of content that passed our own checks: the filter
    /// decides. `rest` is the content not yet sent.
    pub(super) fn proxy_end(&mut self, rest: Vec<u8>) {
        if self.proxy_speed_adjust() {
            // The whole transaction now, as it would have gone.
            let Some(tx) = &mut self.tx else { return };
            let mut content = std::mem::take(&mut tx.proxy_content);
            content.extend_from_slice(&rest);
            let rcpts = std::mem::take(&mut tx.proxy_rcpts);
            self.proxy_start(false);
            for line in rcpts {
                self.proxy_requests.push(Request::Step(Step::Command {
                    line,
                    expect: b'2',
                    report: false,
                }));
            }
            self.proxy_requests.push(Request::Step(Step::Command {
                line: "DATA".into(),
                expect: b'3',
                report: false,
            }));
            self.proxy_requests
                .push(Request::Step(Step::Content(content)));
        } else {
            if !rest.is_empty() {
                self.proxy_requests.push(Request::Step(Step::Content(rest)));
            }
        }
        self.proxy_requests.push(Request::Step(Step::End));
        self.state = State::WaitProxy(ProxyWait::End);
    }

    /// The connection broke before the session asked anything of it
    /// (the helper could not start).
    pub fn proxy_lost(&mut self) {
        self.proxy_event(Event::Reply {
            ok: false,
            usable: false,
            text: PROXY_ERROR.to_string(),
        });
    }

    /// What the filter answered.
    pub fn proxy_event(&mut self, ev: Event) {
        let Event::Reply { ok, usable, text } = ev else {
            return; // Drained: the loop reads the client again
        };
        if !usable {
            self.proxy_close();
        }
        let State::WaitProxy(wait) = std::mem::replace(&mut self.state, State::Command) else {
            return;
        };
        match wait {
            ProxyWait::Mail => {
                if ok {
                    self.reply("250 2.1.0 Ok");
                    self.count_ok(Verb::Mail);
                } else {
                    self.reply(&text);
                    self.tx = None;
                    self.proxy_close();
                    self.error_count += 1;
                    self.check_error_limit();
                }
            }
            ProxyWait::Rcpt(rcpt) => {
                if ok {
                    if let Some(tx) = &mut self.tx {
                        tx.recipients.push(rcpt);
                    }
                    self.reply("250 2.1.5 Ok");
                    self.count_ok(Verb::Rcpt);
                } else {
                    self.reply(&text);
                    self.error_count += 1;
                    self.check_error_limit();
                }
            }
            ProxyWait::Data => {
                if ok {
                    self.proxy_start_data();
                } else {
                    self.reply(&text);
                    self.error_count += 1;
                    self.check_error_limit();
                }
            }
            ProxyWait::End => {
                self.where_ = "END-OF-MESSAGE";
                crate::proxy::log_end(ok, &text, &self.whatsup());
                self.reply(&text);
                self.proxy_close();
                if ok {
                    self.count_ok(Verb::Data);
                    self.error_count = 0;
                    self.junk = 0;
                    self.tx = None;
                    self.xforward = Default::default();
                    self.access_filter.take();
                    self.access_prepend.take();
                } else {
                    self.transaction_failed();
                }
            }
        }
        self.process();
    }

    /// Postfix's `smtpd_whatsup`: ` from=<...> to=<...> proto=... helo=<...>`.
    fn whatsup(&self) -> String {
        let mut s = String::new();
        if let Some(tx) = &self.tx {
            s.push_str(&format!(" from=<{}>", tx.sender));
            if let Some(r) = tx.recipients.first() {
                s.push_str(&format!(" to=<{}>", r.address));
            }
        }
        s.push_str(&format!(" proto={}", self.protocol()));
        if let Some(h) = &self.helo {
            s.push_str(&format!(" helo=<{h}>"));
        }
        if let Some(u) = &self.sasl_username {
            s.push_str(&format!(" sasl_username=<{u}>"));
        }
        s
    }
}
