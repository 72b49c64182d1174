//! AUTH (RFC 4954) through the auth server: the mechanism list for
//! EHLO, the AUTH command, the 334 challenge exchange.

use super::{Done, Session, State};
use crate::anvil::Event;
use crate::sasl::{SaslReply, SaslRequest};
use postern_common::smtp_command::{Token, Verb};
use postern_common::warning;
use std::ops::ControlFlow;

impl Session {
    /// Requests for the auth server.
    pub fn take_sasl_requests(&mut self) -> Vec<SaslRequest> {
        std::mem::take(&mut self.sasl_requests)
    }

    /// The auth server's mechanisms (None: it cannot be reached).
    pub fn sasl_mechs(&mut self, mechs: Option<Vec<String>>) {
        self.mechs = Some(mechs.unwrap_or_default());
        if matches!(self.state, State::WaitMechs) {
            self.state = State::Command;
            self.ehlo_reply();
            self.process();
        }
    }

    /// The auth server's answer to the AUTH in progress.
    pub fn sasl_reply(&mut self, reply: SaslReply) {
        if !matches!(self.state, State::WaitAuth) {
            return;
        }
        self.state = State::Command;
        let mech = self.sasl_method.clone().unwrap_or_default();
        match reply {
            SaslReply::Cont(data) => {
                self.reply(&format!("334 {data}"));
                self.state = State::AuthResponse;
            }
            SaslReply::Ok(user) => {
                self.sasl_username = Some(user);
                self.reply("235 2.7.0 Authentication successful");
                self.count_ok(Verb::Auth);
            }
            SaslReply::Fail(why, user) => {
                self.log_auth_failed(&mech, &why, user.as_deref());
                self.sasl_method = None;
                self.error_reply(&format!("535 5.7.8 Error: authentication failed: {why}"));
            }
            SaslReply::Temp(why) => {
                self.log_auth_failed(&mech, &why, None);
                self.sasl_method = None;
                self.error_reply(&format!(
                    "454 4.7.0 Temporary authentication failure: {why}"
                ));
            }
        }
        self.process();
    }

    /// The warning of a failed AUTH, worded as Postfix's (fail2ban's
    /// postfix filter in mode `auth` matches it): an empty reason and an
    /// unknown login name are spelled out.
    fn log_auth_failed(&self, mech: &str, why: &str, user: Option<&str>) {
        let why = if why.is_empty() {
            "(reason unavailable)"
        } else {
            why
        };
        let user = user.unwrap_or("(unavailable)");
        warning!(
            "{}: SASL {mech} authentication failed: {why}, sasl_username={user}",
            self.namaddr
        );
    }

    /// Whether AUTH is on offer now (SASL enabled, and TLS active when
    /// smtpd_tls_auth_only says so).
    pub(super) fn auth_offered(&self) -> bool {
        self.cfg.sasl.is_some() && (self.tls.is_some() || !self.cfg.tls_auth_only)
    }

    pub(super) fn auth(&mut self, args: &[Token]) -> Done {
        // smtpd_client_auth_rate_limit comes first, as in Postfix.
        if self.over_rate_limit(Event::Auth, "AUTH command", "too many AUTH commands") {
            return Done::Failed;
        }
        if !self.auth_offered() {
            return self.fail("503 5.5.1 Error: authentication not enabled");
        }
        if self.helo.is_none() || !self.esmtp {
            return self.fail("503 5.5.1 Error: send HELO/EHLO first");
        }
        if self.sasl_username.is_some() {
            return self.fail("503 5.5.1 Error: already authenticated");
        }
        if self.tx.is_some() {
            return self.fail("503 5.5.1 Error: MAIL transaction in progress");
        }
        if args.len() < 2 || args.len() > 3 {
            return self.fail("501 5.5.4 Syntax: AUTH mechanism");
        }
        let mech = args[1].text.to_ascii_uppercase();
        let known = self.mechs.as_ref().is_some_and(|m| m.contains(&mech));
        if !known {
            let why = "Invalid authentication mechanism";
            self.log_auth_failed(&mech, why, None);
            return self.fail(&format!("535 5.7.8 Error: authentication failed: {why}"));
        }
        let resp = match args.get(2).map(|t| t.text.as_str()) {
            None => None,
            // RFC 4954: "=" is an empty initial response.
            Some("=") => Some(String::new()),
            Some(r) => {
                if postern_common::base64::decode(r).is_none() {
                    return self.fail("501 5.5.2 Error: invalid base64 in initial response");
                }
                Some(r.to_string())
            }
        };
        self.sasl_method = Some(mech.clone());
        self.sasl_requests.push(SaslRequest::Start {
            mech,
            resp,
            secured: self.tls.is_some(),
            rip: self.client.addr,
            rport: self.client.port,
            local: self.client.local,
        });
        self.state = State::WaitAuth;
        // Counted when the auth server answers.
        Done::Pending
    }

    /// The client's line after a 334 challenge.
    fn auth_response(&mut self, line: &[u8]) {
        self.state = State::Command;
        let text = String::from_utf8_lossy(line).trim().to_string();
        if text == "*" {
            self.sasl_requests.push(SaslRequest::Abort);
            let mech = self.sasl_method.take().unwrap_or_default();
            warning!("{}: SASL {mech} authentication aborted", self.namaddr);
            self.error_reply("501 5.7.0 Authentication aborted");
            return;
        }
        if postern_common::base64::decode(&text).is_none() {
            self.sasl_requests.push(SaslRequest::Abort);
            let mech = self.sasl_method.take().unwrap_or_default();
            let why = "Invalid base64 data in continued response";
            self.log_auth_failed(&mech, why, None);
            self.error_reply(&format!("535 5.7.8 Error: authentication failed: {why}"));
            return;
        }
        self.sasl_requests.push(SaslRequest::Continue(text));
        self.state = State::WaitAuth;
    }

    /// Takes the client's line after a 334 challenge from the input at
    /// `pos`; breaks when there is no whole line.
    pub(super) fn auth_line(&mut self, mut pos: usize) -> ControlFlow<usize, usize> {
        let rest = &self.input[pos..];
        let Some(i) = rest.iter().position(|&b| b == b'\n') else {
            if rest.len() > 12 * 1024 {
                pos = self.input.len();
                self.state = State::Command;
                self.sasl_requests.push(SaslRequest::Abort);
                self.error_reply("500 5.5.6 Authentication exchange line is too long");
            }
            return ControlFlow::Break(pos);
        };
        let mut line = rest[..i].to_vec();
        pos += i + 1;
        if line.last() == Some(&b'\r') {
            line.pop();
        }
        self.auth_response(&line);
        ControlFlow::Continue(pos)
    }
}
