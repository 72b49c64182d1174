//! The connection's start and HELO/EHLO: logging and counting the
//! client, the greeting (or the refusal of `smtpd_delay_reject = no`),
//! and the EHLO reply that lists what is on offer.

use super::{Done, Session, State};
use crate::restrictions::Stage;
use crate::sasl::SaslRequest;
use postern_common::smtp_command::{self as protocol, Token, Verb};
use postern_common::{info, warning};

impl Session {
    /// The client's name is known: logs the connection, counts it, and
    /// greets (with `smtpd_tls_wrappermode`, once the handshake is done).
    pub(super) fn connected(&mut self) {
        self.namaddr = self.client.namaddr();
        // As Postfix's debug_peer_check, once the name is known; from
        // here this session's work logs verbosely (crate::server::turn).
        self.debug_level = self
            .cfg
            .debug_peer
            .level_for(&self.client.names.name, Some(self.client.addr));
        let _verbose = postern_common::log::raise_verbosity(self.debug_level);
        info!("connect from {}", self.namaddr);
        self.choose_ehlo_discard();
        if self.talked_first() && self.cfg.forbid_unauth_pipelining {
            self.reply("554 5.5.0 Error: SMTP protocol synchronization");
            self.hangup = true;
            return;
        }
        let ip = self.client.addr;
        let limited = self.anvil.borrow_mut().connect(ip);
        match limited {
            Ok(()) => self.anvil_counted = true,
            Err((what, n)) => {
                warning!(
                    "{what} exceeded: {n} from {} for service {}",
                    self.namaddr,
                    self.cfg.service
                );
                let host = self.cfg.myhostname.clone();
                self.reply(&format!(
                    "421 4.7.0 {host} Error: too many connections from {ip}"
                ));
                return;
            }
        }
        // With smtpd_tls_wrappermode the greeting waits for the handshake.
        if !self.cfg.tls_wrappermode || self.tls.is_some() {
            self.greet();
        }
    }

    /// Whether the client sent something before the greeting (not with
    /// `smtpd_tls_wrappermode`, where the client speaks first): logged
    /// as Postfix does, with what it sent (fail2ban's postfix filter
    /// matches the line).
    fn talked_first(&mut self) -> bool {
        let Some(fd) = self.client.socket else {
            return false;
        };
        if self.cfg.tls_wrappermode {
            return false;
        }
        let mut buf = [0u8; 100];
        let flags = nix::sys::socket::MsgFlags::MSG_PEEK | nix::sys::socket::MsgFlags::MSG_DONTWAIT;
        let n = match nix::sys::socket::recv(fd, &mut buf, flags) {
            Ok(n) if n > 0 => n,
            _ => return false,
        };
        info!(
            "improper command pipelining after CONNECT from {}: {}",
            self.namaddr,
            escape(&buf[..n])
        );
        self.ill_pipelining = true;
        true
    }

    /// Input behind a command after which a client must wait for the
    /// reply (HELO, EHLO, DATA, NOOP, VRFY; any command before EHLO):
    /// logged once as Postfix does; true when
    /// `smtpd_forbid_unauth_pipelining` then ends the session.
    pub(super) fn pipelined_too_early(&mut self, verb: Verb) -> bool {
        let last = matches!(
            verb,
            Verb::Helo | Verb::Ehlo | Verb::Data | Verb::Noop | Verb::Vrfy
        );
        if self.ill_pipelining || (!last && self.esmtp) {
            return false;
        }
        let Some(pending) = self.pending_at.and_then(|at| self.input.get(at..)) else {
            return false;
        };
        if pending.is_empty() {
            return false;
        }
        let shown = escape(&pending[..pending.len().min(100)]);
        info!(
            "improper command pipelining after {} from {}: {shown}",
            self.where_, self.namaddr
        );
        self.ill_pipelining = true;
        if self.cfg.forbid_unauth_pipelining {
            self.reply("554 5.5.0 Error: SMTP protocol synchronization");
            self.hangup = true;
            return true;
        }
        false
    }

    pub(super) fn greet(&mut self) {
        // smtpd_delay_reject = no: the client list decides now, with the
        // DNS answers it needs (the greeting waits for them).
        let needed = {
            let req = self.request(None, "CONNECT");
            self.cfg.restrictions.dns_needed(Stage::Client, &req)
        };
        if self.request_dns(needed) {
            self.state = State::WaitDnsConnect;
            return;
        }
        self.defers.set_permit(None);
        let refused = {
            let req = self.request(None, "CONNECT");
            self.cfg.restrictions.check_connect(&req)
        };
        self.defer_permit_client = self.defers.permit_reply();
        if self.await_sleep(None) {
            return;
        }
        if let Some(reply) = refused {
            self.log_reject(&reply, None, None);
            self.reply(&reply);
            self.access_denied = true;
            self.error_count += 1;
            return;
        }
        if self.milters.is_some() {
            let addr = self.client.port.map(|p| (self.client.addr, p));
            let ask = crate::milter::Ask {
                stage: crate::milter::Stage::Connect(self.client.names.name.clone(), addr),
                macros: self.milter_macros_now(),
            };
            let q = crate::dns::Query::Milter(ask);
            match self.dns.remove(&q) {
                Some(crate::dns::Answer::Milter(o)) => match o {
                    postern_common::milter::Outcome::Continue => {}
                    postern_common::milter::Outcome::Discard => self.milter_discard = true,
                    // As Postfix: a 421 (or a milter shutting down)
                    // ends the session at the greeting; another refusal
                    // answers MAIL, RCPT and DATA, and a 5xx one also
                    // changes the greeting.
                    postern_common::milter::Outcome::Shutdown(r) => {
                        info!("milter-reject: CONNECT from {}: {r}", self.namaddr);
                        let host = self.cfg.myhostname.clone();
                        self.reply(&format!("421 {host} Service unavailable - try again later"));
                        self.hangup = true;
                        return;
                    }
                    postern_common::milter::Outcome::Reject(r)
                    | postern_common::milter::Outcome::Tempfail(r) => {
                        info!("milter-reject: CONNECT from {}: {r}", self.namaddr);
                        if r.starts_with("421") {
                            let host = self.cfg.myhostname.clone();
                            self.reply(&format!(
                                "421 {host} Service unavailable - try again later"
                            ));
                            self.hangup = true;
                            return;
                        }
                        let reject = r.starts_with('5');
                        self.milter_denied = Some(r);
                        if reject {
                            let host = self.cfg.myhostname.clone();
                            self.reply(&format!("554 {host} ESMTP not accepting connections"));
                            return;
                        }
                    }
                },
                _ => {
                    if self.request_dns(vec![q]) {
                        self.state = State::WaitDnsConnect;
                        return;
                    }
                }
            }
        }
        let banner = self.cfg.banner.clone();
        self.reply(&format!("220 {banner}"));
    }

    pub(super) fn helo(&mut self, ehlo: bool, args: &[Token]) -> Done {
        if args.len() < 2 {
            return self.fail(if ehlo {
                "501 Syntax: EHLO hostname"
            } else {
                "501 Syntax: HELO hostname"
            });
        }
        let name: Vec<&str> = args[1..].iter().map(|t| t.text.as_str()).collect();
        let name = protocol::neuter(&name.join(" "));
        let needed = {
            let mut req = self.request(None, self.where_);
            req.helo = Some(&name);
            self.cfg.restrictions.dns_needed(Stage::Helo, &req)
        };
        let verb = if ehlo { Verb::Ehlo } else { Verb::Helo };
        if self.await_dns(needed, verb) {
            return Done::Pending;
        }
        self.defers.set_permit(self.defer_permit_client.clone());
        let refused = {
            let mut req = self.request(None, self.where_);
            req.helo = Some(&name);
            self.cfg.restrictions.check_helo(&req)
        };
        self.defer_permit_helo = self.defers.permit_reply();
        if self.await_sleep(Some(verb)) {
            return Done::Pending;
        }
        if let Some(reply) = refused {
            return self.reject(&reply, None, None);
        }
        match self.milter_step(crate::milter::Stage::Helo(name.clone()), verb) {
            None => return Done::Pending,
            Some(o) => {
                if let Some(done) = self.milter_verdict(o, verb_name(ehlo)) {
                    return done;
                }
            }
        }
        self.helo = Some(name);
        self.end_transaction();
        if ehlo {
            self.esmtp = true;
            if self.auth_offered() && self.mechs.is_none() {
                // The reply waits for the auth server's mechanism list.
                self.sasl_requests.push(SaslRequest::Mechs);
                self.state = State::WaitMechs;
                return Done::Ok;
            }
            self.ehlo_reply();
        } else {
            let host = self.cfg.myhostname.clone();
            self.reply(&format!("250 {host}"));
        }
        Done::Ok
    }

    pub(super) fn ehlo_reply(&mut self) {
        let mut lines = vec![self.cfg.myhostname.clone(), "PIPELINING".to_string()];
        lines.push(match self.cfg.message_size_limit {
            0 => "SIZE".to_string(),
            n => format!("SIZE {n}"),
        });
        if !self.cfg.disable_vrfy {
            lines.push("VRFY".into());
        }
        lines.push("ETRN".into());
        if self.starttls_offered() && self.cfg.tls.is_some() {
            lines.push("STARTTLS".into());
        }
        if self.auth_offered() {
            let mechs = self.mechs.clone().unwrap_or_default();
            if !mechs.is_empty() {
                let list = mechs.join(" ");
                lines.push(format!("AUTH {list}"));
                if self.cfg.broken_sasl_auth_clients {
                    lines.push(format!("AUTH={list}"));
                }
            }
        }
        if self.xforward_allowed() {
            lines.push(super::xforward::KEYWORD.into());
        }
        lines.push("ENHANCEDSTATUSCODES".into());
        lines.push("8BITMIME".into());
        lines.push("DSN".into());
        if self.cfg.smtputf8_enable {
            lines.push("SMTPUTF8".into());
        }
        if self.requiretls_offered() {
            lines.push("REQUIRETLS".into());
        }
        let lines = self.discard_ehlo_lines(lines);
        let last = lines.len() - 1;
        for (i, l) in lines.iter().enumerate() {
            let sep = if i == last { ' ' } else { '-' };
            self.reply(&format!("250{sep}{l}"));
        }
    }
}

fn verb_name(ehlo: bool) -> &'static str {
    if ehlo {
        "EHLO"
    } else {
        "HELO"
    }
}

/// Bytes as Postfix's escape() shows them in a log line: C escapes for
/// the usual control characters, octal for the others.
fn escape(bytes: &[u8]) -> String {
    let mut out = String::new();
    for &b in bytes {
        match b {
            b'\\' => out.push_str("\\\\"),
            b'\r' => out.push_str("\\r"),
            b'\n' => out.push_str("\\n"),
            b'\t' => out.push_str("\\t"),
            0x20..=0x7e => out.push(b as char),
            _ => out.push_str(&format!("\\{b:03o}")),
        }
    }
    out
}
