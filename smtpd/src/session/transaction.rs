//! The mail transaction's commands: MAIL, RCPT, DATA and RSET, the
//! address syntax (SMTPUTF8 included), and the end of a transaction.

use super::{Done, Opening, Session, State, Transaction};
use crate::anvil::Event;
use crate::restrictions::Stage;
use postern_common::qfile::Recipient;
use postern_common::smtp_command::{self as protocol, Offered, Token, Verb};
use postern_common::smtputf8;
use postern_common::warning;

/// Postfix's smtpd_recipient_overshoot_limit default: RCPTs refused with
/// 452 for being over smtpd_recipient_limit before they count as errors.
const RECIPIENT_OVERSHOOT_LIMIT: u32 = 1000;

/// Below this much free space in the queue file system no new message is
/// started: a queue file needs a few blocks even for a short message.
const MIN_FREE: u64 = 64 * 1024;

impl Session {
    /// Whether the queue file system can take a message of `size` bytes
    /// (the MAIL FROM SIZE, 0 if not given), as Postfix checks it: at least
    /// `queue_minfree` free, and 1.5 times the announced size; and never a
    /// file system that is full.
    fn enough_storage(&self, size: u64) -> bool {
        match postern_common::queue::free_space(&self.cfg.queue_directory) {
            Ok(free) => {
                free >= self.cfg.queue_minfree
                    && free >= size.saturating_mul(3) / 2
                    && free >= MIN_FREE
            }
            Err(_) => true, // cannot tell: cleanup will say if it fails
        }
    }

    pub(super) fn mail(&mut self, args: &[Token]) -> Done {
        if self.cfg.helo_required && self.helo.is_none() {
            return self.fail("503 5.5.1 Error: send HELO/EHLO first");
        }
        if self.tx.is_some() {
            return self.fail("503 5.5.1 Error: nested MAIL command");
        }
        if let Some(done) = self.milter_denied() {
            return done;
        }
        let Some((path, params)) = protocol::path_command(args, "from:") else {
            return self.fail("501 5.5.4 Syntax: MAIL FROM:<address>");
        };
        // SMTPUTF8 decides the sender's syntax: taken before it.
        let smtputf8 = self.smtputf8_requested(&args[3..]);
        let sender = match self.address(path) {
            Some(a) if self.utf8_syntax_ok(path, &a, smtputf8) => a,
            _ => return self.fail("501 5.1.7 Bad sender address syntax"),
        };
        let offered = Offered {
            auth: self.cfg.sasl.is_some(),
            smtputf8: self.cfg.smtputf8_enable && !self.discarded("smtputf8"),
            requiretls: self.requiretls_offered(),
        };
        let options = match protocol::mail_params(&params, offered) {
            Ok(o) => o,
            Err(e) => return self.fail(&e.reply()),
        };
        if self.discarded("dsn") && (options.envid.is_some() || options.ret.is_some()) {
            return self.fail("501 5.7.1 DSN support is disabled");
        }
        let size = options.size;
        let sasl_sender = match &options.auth {
            Some(a) if self.sasl_username.is_some() && a != "<>" => {
                postern_common::dsn::xtext_decode(a)
            }
            _ => None,
        };
        let tx = Transaction {
            sender,
            smtputf8,
            requiretls: options.requiretls,
            envid: options.envid,
            ret: options.ret.map(str::to_string),
            sasl_sender,
            size,
            instance: super::policy::next_instance(),
            ..Default::default()
        };
        let limit = self.cfg.message_size_limit;
        if limit > 0 && size > limit {
            let reply = "552 5.3.4 Message size exceeds fixed limit";
            return self.reject(reply, Some(&tx.sender), None);
        }
        if self.strict_smtputf8_refuses(&tx.sender, smtputf8) {
            return Done::Failed;
        }
        // A before-queue filter without speed_adjust uses no queue space
        // here (as Postfix, which then skips the check).
        let storage_matters = !self.proxied() || self.proxy_speed_adjust();
        if storage_matters && !self.enough_storage(size) {
            let reply = "452 4.3.1 Insufficient system storage";
            warning!(
                "not enough free space in the queue file system for {}",
                self.namaddr
            );
            return self.reject(reply, Some(&tx.sender), None);
        }
        let needed = {
            let mut req = self.request(None, self.where_);
            req.sender = Some(&tx.sender);
            self.cfg.restrictions.dns_needed(Stage::Sender, &req)
        };
        if self.await_dns(needed, Verb::Mail) {
            return Done::Pending;
        }
        if self.over_rate_limit(Event::Message, "Message delivery request", "too much mail") {
            return Done::Failed;
        }
        let earlier = self.defer_permit_helo.clone();
        self.defers
            .set_permit(earlier.or_else(|| self.defer_permit_client.clone()));
        let refused = {
            let mut req = self.request(None, self.where_);
            req.sender = Some(&tx.sender);
            self.cfg.restrictions.check_sender(&req)
        };
        if self.await_verify(Verb::Mail) || self.await_sleep(Some(Verb::Mail)) {
            return Done::Pending;
        }
        if let Some(reply) = refused {
            return self.reject(&reply, Some(&tx.sender), None);
        }
        if self.milters.is_some() {
            let params: Vec<String> = params.iter().map(|p| p.to_string()).collect();
            let stage = crate::milter::Stage::Mail(tx.sender.clone(), params);
            match self.milter_step(stage, Verb::Mail) {
                None => return Done::Pending,
                Some(o) => {
                    self.milter_discard = false;
                    if let Some(done) = self.milter_verdict(o, "MAIL") {
                        return done;
                    }
                }
            }
        }
        self.tx = Some(tx);
        if self.proxied() {
            let line = String::from_utf8_lossy(&self.current_line).into_owned();
            if let Some(tx) = &mut self.tx {
                tx.proxy_mail = line;
            }
            if !self.cfg.delay_open_until_valid_rcpt {
                return self.proxy_mail();
            }
        }
        if !self.cfg.delay_open_until_valid_rcpt {
            self.open_queue_file(Opening::Mail);
            return Done::Pending;
        }
        self.reply("250 2.1.0 Ok");
        Done::Ok
    }

    pub(super) fn rcpt(&mut self, args: &[Token]) -> Done {
        if self.tx.is_none() {
            return self.fail("503 5.5.1 Error: need MAIL command");
        }
        if let Some(done) = self.milter_denied() {
            return done;
        }
        let Some((path, params)) = protocol::path_command(args, "to:") else {
            return self.fail("501 5.5.4 Syntax: RCPT TO:<address>");
        };
        let smtputf8 = self.tx.as_ref().is_some_and(|t| t.smtputf8);
        let address = match self.address(path) {
            Some(a) if !a.is_empty() && self.utf8_syntax_ok(path, &a, smtputf8) => a,
            _ => return self.fail("501 5.1.3 Bad recipient address syntax"),
        };
        let options = match protocol::rcpt_params(&params) {
            Ok(o) => o,
            Err(e) => return self.fail(&e.reply()),
        };
        if self.discarded("dsn") && (options.notify != 0 || !options.orcpt.is_empty()) {
            return self.fail("501 5.7.1 DSN support is disabled");
        }
        let rcpt = Recipient {
            notify: options.notify,
            orcpt: options.orcpt,
            ..Recipient::new(&address)
        };
        let limit = self.cfg.recipient_limit;
        if let Some(tx) = &mut self.tx {
            if limit > 0 && tx.recipients.len() >= limit {
                tx.overshoot += 1;
                let over = tx.overshoot > RECIPIENT_OVERSHOOT_LIMIT;
                self.reply("452 4.5.3 Error: too many recipients");
                return if over { Done::Failed } else { Done::Ok };
            }
        }
        if self.strict_smtputf8_refuses(&address, smtputf8) {
            return Done::Failed;
        }
        let needed = {
            let req = self.request(Some(&address), self.where_);
            self.cfg.restrictions.dns_needed(Stage::Recipient, &req)
        };
        if self.await_dns(needed, Verb::Rcpt) {
            return Done::Pending;
        }
        if self.over_rate_limit(Event::Recipient, "Recipient address", "too many recipients") {
            return Done::Failed;
        }
        let refused = self.check_recipient(&address);
        if self.await_verify(Verb::Rcpt) || self.await_sleep(Some(Verb::Rcpt)) {
            return Done::Pending;
        }
        if let Some(reply) = refused {
            if self.milters.is_some() {
                // Shown to the milters that ask for refused recipients
                // (SMFIP_RCPT_REJ), as Postfix does; the refusal stands.
                let params: Vec<String> = params.iter().map(|p| p.to_string()).collect();
                let stage =
                    crate::milter::Stage::RcptRejected(address.clone(), params, reply.clone());
                if self.milter_step(stage, Verb::Rcpt).is_none() {
                    return Done::Pending;
                }
            }
            let sender = self.tx.as_ref().map(|t| t.sender.clone());
            return self.reject(&reply, sender.as_deref(), Some(&address));
        }
        if self.milters.is_some() {
            let params: Vec<String> = params.iter().map(|p| p.to_string()).collect();
            let stage = crate::milter::Stage::Rcpt(address.clone(), params);
            match self.milter_step(stage, Verb::Rcpt) {
                None => return Done::Pending,
                Some(o) => {
                    if let Some(done) = self.milter_verdict(o, "RCPT") {
                        return done;
                    }
                }
            }
        }
        if self.proxied() {
            return self.proxy_rcpt(rcpt);
        }
        if let Some(tx) = &mut self.tx {
            tx.recipients.push(rcpt);
        }
        if !self.cleanup_open {
            // The first recipient accepted: the queue file is made now,
            // while the client goes on to DATA (Postfix's
            // smtpd_delay_open_until_valid_rcpt), not after it.
            self.open_queue_file(Opening::Rcpt);
            return Done::Pending;
        }
        self.reply("250 2.1.5 Ok");
        Done::Ok
    }

    pub(super) fn data(&mut self, args: &[Token]) -> Done {
        let Some(tx) = &self.tx else {
            return self.fail("503 5.5.1 Error: need RCPT command");
        };
        if tx.recipients.is_empty() {
            return self.fail("554 5.5.1 Error: no valid recipients");
        }
        if args.len() != 1 {
            return self.fail("501 5.5.4 Syntax: DATA");
        }
        if let Some(done) = self.milter_denied() {
            return done;
        }
        let refused = self
            .cfg
            .restrictions
            .check_data(&self.request(None, "DATA"));
        if self.await_verify(Verb::Data) || self.await_sleep(Some(Verb::Data)) {
            return Done::Pending;
        }
        let Some(tx) = &self.tx else {
            return self.fail("503 5.5.1 Error: need RCPT command");
        };
        if let Some(reply) = refused {
            let sender = tx.sender.clone();
            // Postfix names the recipient when there is only one: the
            // refusal concerns all of them alike.
            let only = match &tx.recipients[..] {
                [one] => Some(one.address.clone()),
                _ => None,
            };
            return self.reject(&reply, Some(&sender), only.as_deref());
        }
        match self.milter_step(crate::milter::Stage::Data, Verb::Data) {
            None => return Done::Pending,
            Some(o) => {
                if let Some(done) = self.milter_verdict(o, "DATA") {
                    return done;
                }
            }
        }
        if self.proxied() {
            return self.proxy_data_cmd();
        }
        let opened = self.tx.as_ref().is_some_and(|t| t.queue_id.is_some());
        if self.cleanup_open && opened {
            self.start_data();
        } else {
            self.open_queue_file(Opening::Data);
        }
        Done::Pending
    }

    pub(super) fn rset(&mut self, args: &[Token]) -> Done {
        if args.len() != 1 {
            return self.fail("501 5.5.4 Syntax: RSET");
        }
        self.end_transaction();
        self.reply("250 2.0.0 Ok");
        Done::Ok
    }

    /// Whether REQUIRETLS (RFC 8689) is on offer: only over TLS (after
    /// STARTTLS, or in wrapper mode), never in clear text, where the
    /// parameter is unknown (555 5.5.4).
    pub(super) fn requiretls_offered(&self) -> bool {
        self.cfg.requiretls_enable && self.tls.is_some() && !self.discarded("requiretls")
    }

    /// Whether MAIL FROM's parameters ask for SMTPUTF8 and it is on offer.
    pub(super) fn smtputf8_requested(&self, params: &[Token]) -> bool {
        self.cfg.smtputf8_enable
            && !self.discarded("smtputf8")
            && params
                .iter()
                .any(|t| t.text.eq_ignore_ascii_case("SMTPUTF8"))
    }

    /// Postfix's rule for non-ASCII domains (see
    /// [`smtputf8::address_syntax_ok`]); a refusal is logged as bad syntax.
    pub(super) fn utf8_syntax_ok(&self, tok: &Token, addr: &str, smtputf8: bool) -> bool {
        if !self.cfg.smtputf8_enable || smtputf8::address_syntax_ok(addr, smtputf8) {
            return true;
        }
        warning!(
            "Illegal address syntax from {} in {} command: {}",
            self.namaddr,
            self.where_,
            protocol::printable(tok.text.as_bytes(), 200)
        );
        false
    }

    /// `strict_smtputf8`: a non-ASCII address outside an SMTPUTF8
    /// transaction is refused (replied here).
    fn strict_smtputf8_refuses(&mut self, addr: &str, smtputf8: bool) -> bool {
        let refused = self.cfg.smtputf8_enable
            && self.cfg.strict_smtputf8
            && !smtputf8
            && smtputf8::is_utf8_address(addr);
        if refused {
            self.reply("553 5.6.7 Must declare SMTPUTF8 to send unicode address");
        }
        refused
    }

    /// The address in a MAIL FROM/RCPT TO word, or None (logged).
    fn address(&self, tok: &Token) -> Option<String> {
        let a = if tok.unterminated {
            None
        } else {
            protocol::extract_address(&tok.text).ok()
        };
        if a.is_none() {
            warning!(
                "Illegal address syntax from {} in {} command: {}",
                self.namaddr,
                self.where_,
                protocol::printable(tok.text.as_bytes(), 200)
            );
        }
        a
    }

    /// Forgets the transaction (RSET, HELO, STARTTLS, a failure) and the
    /// queue file opened for it, which cleanup gives back to `spare/`.
    pub(super) fn end_transaction(&mut self) {
        self.abort_cleanup();
        self.proxy_close();
        self.tx = None;
        self.xforward = Default::default();
        self.access_filter.take();
        self.access_prepend.take();
    }

    pub(super) fn transaction_failed(&mut self) {
        self.end_transaction();
        self.state = State::Command;
        self.error_count += 1;
        self.check_error_limit();
    }
}
