//! The mail transaction: MAIL FROM, RCPT TO, DATA (or BDAT, see
//! [`super::content`]) and the replies to the end of the content.

use super::content::Trouble;
use super::session::Session;
use super::{stage, End, Extensions, Transaction};
use crate::nexthop::Failure;
use postern_common::dsn;
use postern_common::info;
use postern_common::ipc::Outcome;
use postern_common::smtputf8::Flags;

/// `<address>` for MAIL FROM / RCPT TO, with the local part quoted when
/// it is not a dot-atom (RFC 5321 section 4.1.2).
pub fn smtp_address(addr: &str) -> String {
    if addr.is_empty() {
        return "<>".into();
    }
    format!("<{}>", postern_common::addr::quote_address(addr))
}

/// MAIL FROM with SIZE, BODY=8BITMIME, SMTPUTF8, and with DSN the
/// message's RET and ENVID, as far as the server offers them; REQUIRETLS
/// for a message that has it (checked offered before).
fn mail_command<T: Transaction>(
    txn: &mut T,
    ext: &Extensions,
    size: u64,
    eight_bit: bool,
    flags: Flags,
) -> String {
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
    if ext.requiretls && txn.requiretls() {
        mail.push_str(" REQUIRETLS");
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
    mail
}

/// RCPT TO for each recipient, with DSN its NOTIFY and ORCPT.
fn rcpt_commands<T: Transaction>(txn: &T, ext: &Extensions, flags: Flags) -> Vec<String> {
    txn.recipients()
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
                let utf8_message = flags != Flags::default();
                if let Some(o) = dsn::format_orcpt(&orcpt, utf8_message) {
                    cmd.push_str(&format!(" ORCPT={o}"));
                }
            }
            cmd
        })
        .collect()
}

impl Session<'_, '_> {
    /// MAIL, RCPT, DATA, content, end of data. Sends QUIT when the server
    /// is still talking.
    pub(super) fn transaction<T: Transaction>(&mut self, txn: &mut T, ext: &Extensions) -> End {
        if let Some((cipher, protocol)) = &self.tls_used {
            txn.tls_used(cipher, protocol);
        }
        let size = txn.content_size();
        let (flags, eight_bit) = match self.check_server_takes(txn, ext, size) {
            Ok(fit) => fit,
            Err(end) => return end,
        };
        if let Err(end) = self.xforward(txn, ext) {
            return end;
        }
        let mail = mail_command(txn, ext, size, eight_bit, flags);
        let rcpts = rcpt_commands(txn, ext, flags);

        let pipelined = ext.pipelining;
        // CHUNKING (RFC 3030): BDAT instead of DATA.
        let bdat = ext.chunking;
        let probe = txn.verify_only();
        if pipelined {
            if let Err(end) = self.send_pipelined(&mail, &rcpts, bdat || probe) {
                return end;
            }
        }
        let accepted = match self.mail_and_rcpt_replies(txn, &mail, &rcpts, pipelined) {
            Ok(accepted) => accepted,
            Err(end) => return end,
        };
        if probe {
            // Outcomes recorded from the RCPT replies: no content goes.
            self.done();
            return End::Complete;
        }
        if accepted.is_empty() && (!pipelined || bdat) {
            self.done();
            return End::Complete;
        }
        if bdat {
            return self.send_bdat(txn, &accepted);
        }
        self.data(txn, &accepted, pipelined)
    }

    /// XFORWARD (`smtp_send_xforward_command`, to a server that offers
    /// it): the original client's attributes the server asked for, in two
    /// commands as Postfix sends them (the client's identity, then the
    /// queue ID and source), each answered before MAIL FROM. A refusal
    /// gives every recipient the server's answer.
    fn xforward<T: Transaction>(&mut self, txn: &mut T, ext: &Extensions) -> Result<(), End> {
        if !self.settings.send_xforward || ext.xforward.is_empty() {
            return Ok(());
        }
        let attrs = txn.xforward();
        let value = |name: &str| {
            attrs
                .iter()
                .find(|(n, _)| *n == name)
                .map(|(_, v)| dsn::xtext_encode(v))
                .unwrap_or_else(|| "[UNAVAILABLE]".into())
        };
        let offered = |names: &[&str]| -> Vec<String> {
            names
                .iter()
                .filter(|n| ext.xforward.iter().any(|o| o == *n))
                .map(|n| format!("{n}={}", value(n)))
                .collect()
        };
        if std::mem::take(&mut self.rset_queued) {
            // A kept session's RSET, queued for the pipelined batch:
            // answered before anything else is said.
            let answered = self.flush().is_ok() && self.read().is_ok_and(|r| r.class() == 2);
            if !answered {
                self.stale = true;
                return Err(End::Complete);
            }
        }
        self.timeout(self.settings.xforward_timeout);
        for group in [
            offered(&["NAME", "ADDR", "PORT", "PROTO", "HELO"]),
            offered(&["IDENT", "SOURCE"]),
        ] {
            if group.is_empty() {
                continue;
            }
            let cmd = format!("XFORWARD {}", group.join(" "));
            let r = match self.command(Some(&cmd)) {
                Ok(r) => r,
                Err(e) => return Err(self.try_next(self.io_failure(&e, stage::XFORWARD))),
            };
            if r.class() != 2 {
                let (outcome, dsn, reason) = self.said(&r, "initial XFORWARD command");
                let all: Vec<usize> = (0..txn.recipients().len()).collect();
                Self::record_all(txn, &all, outcome, &dsn, &reason);
                self.quit();
                return Err(End::Complete);
            }
        }
        Ok(())
    }

    /// Refuses what the server cannot take before saying MAIL FROM: too
    /// large, SMTPUTF8 needed but not offered, 8-bit content without
    /// 8BITMIME (every recipient bounced, QUIT). Returns the message's
    /// SMTPUTF8 flags and whether its content is 8-bit.
    fn check_server_takes<T: Transaction>(
        &mut self,
        txn: &mut T,
        ext: &Extensions,
        size: u64,
    ) -> Result<(Flags, bool), End> {
        self.check_requiretls(txn, ext)?;
        let all: Vec<usize> = (0..txn.recipients().len()).collect();
        if let Some(limit) = ext.size.filter(|&l| l > 0 && size > l) {
            let reason = format!(
                "message size {size} exceeds size limit {limit} of server {}",
                self.peer.namaddr
            );
            Self::record_all(txn, &all, Outcome::Bounced, "5.3.4", &reason);
            self.quit();
            return Err(End::Complete);
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
            return Err(End::Complete);
        }
        let eight_bit = match txn.eight_bit() {
            Ok(b) => b,
            Err(e) => return Err(self.local_error(txn, &all, &e)),
        };
        // As Postfix: a server that offers SMTPUTF8 takes 8-bit content,
        // whether it says 8BITMIME or not.
        let eight_bit_mime = ext.eight_bit_mime || ext.smtputf8;
        if eight_bit && !ext.eight_bit_mime && ext.smtputf8 {
            info!(
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
            return Err(End::Complete);
        }
        Ok((flags, eight_bit))
    }

    /// RFC 8689: a REQUIRETLS message goes only over TLS that
    /// authenticated the server (5.7.10 otherwise) and only to a server
    /// that announced REQUIRETLS after STARTTLS (5.7.30 otherwise). Nothing
    /// of the message is said; QUIT, and the next server may be tried
    /// (the caller bounces when none is left).
    fn check_requiretls<T: Transaction>(
        &mut self,
        txn: &mut T,
        ext: &Extensions,
    ) -> Result<(), End> {
        if !txn.requiretls() {
            return Ok(());
        }
        let authenticated = self.encrypted && self.tls.is_some_and(|t| t.policy.authenticated());
        let failure = if !authenticated {
            Failure {
                dsn: super::REQUIRETLS_UNAUTHENTICATED.into(),
                reason: format!(
                    "REQUIRETLS needs authenticated TLS, but the TLS session with host {} is not authenticated",
                    self.peer.namaddr
                ),
            }
        } else if !ext.requiretls {
            Failure {
                dsn: super::REQUIRETLS_UNSUPPORTED.into(),
                reason: format!(
                    "REQUIRETLS support required, but was not offered by host {}",
                    self.peer.namaddr
                ),
            }
        } else {
            return Ok(());
        };
        self.quit();
        Err(self.try_next(failure))
    }

    /// With PIPELINING: MAIL, every RCPT and (without CHUNKING) DATA in
    /// one write, after a kept session's queued RSET, whose reply is read
    /// here.
    fn send_pipelined(&mut self, mail: &str, rcpts: &[String], bdat: bool) -> Result<(), End> {
        self.timeout(self.settings.timeouts.mail);
        self.queue(mail);
        for r in rcpts {
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
                return Err(End::Complete);
            }
        }
        if let Err(e) = flushed {
            return Err(self.try_next(self.io_failure(&e, stage::MAIL)));
        }
        Ok(())
    }

    /// The replies to MAIL FROM and to each RCPT TO (the commands sent
    /// here one at a time unless `pipelined`); each refused recipient's
    /// outcome is recorded. Returns the accepted recipients.
    fn mail_and_rcpt_replies<T: Transaction>(
        &mut self,
        txn: &mut T,
        mail: &str,
        rcpts: &[String],
        pipelined: bool,
    ) -> Result<Vec<usize>, End> {
        let t = self.settings.timeouts.clone();
        let unsent = |c: &str| (!pipelined).then(|| c.to_string());

        // MAIL FROM.
        self.timeout(t.mail);
        let r = match self.command(unsent(mail).as_deref()) {
            Ok(r) => r,
            Err(e) => return Err(self.try_next(self.io_failure(&e, stage::MAIL))),
        };
        if r.class() != 2 {
            let (outcome, dsn, reason) = self.said(&r, "MAIL FROM command");
            if r.code == 421 {
                return Err(self.try_next(Failure { dsn, reason }));
            }
            self.quit();
            if outcome == Outcome::Bounced {
                let all: Vec<usize> = (0..txn.recipients().len()).collect();
                Self::record_all(txn, &all, outcome, &dsn, &reason);
                return Err(End::Complete);
            }
            return Err(self.try_next(Failure { dsn, reason }));
        }

        // RCPT TO, one reply each.
        let mut accepted = Vec::with_capacity(rcpts.len());
        self.timeout(t.rcpt);
        for (i, cmd) in rcpts.iter().enumerate() {
            let r = match self.command(unsent(cmd).as_deref()) {
                Ok(r) => r,
                Err(e) => return Err(self.try_next(self.io_failure(&e, stage::RCPT))),
            };
            if r.class() == 2 {
                if txn.verify_only() {
                    txn.record(i, Outcome::Sent, &r.dsn(), &r.text());
                }
                accepted.push(i);
                continue;
            }
            let (outcome, dsn, reason) = self.said(&r, "RCPT TO command");
            if r.code == 421 {
                return Err(self.try_next(Failure { dsn, reason }));
            }
            txn.record(i, outcome, &dsn, &reason);
        }
        Ok(accepted)
    }

    /// DATA (already sent when `pipelined`), the content and the reply to
    /// its end, for the `accepted` recipients.
    fn data<T: Transaction>(&mut self, txn: &mut T, accepted: &[usize], pipelined: bool) -> End {
        let t = self.settings.timeouts.clone();
        let unsent = |c: &str| (!pipelined).then(|| c.to_string());
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
            Self::record_all(txn, accepted, outcome, &dsn, &reason);
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
                return self.local_error(txn, accepted, &e);
            }
            Err(Trouble::Io(e)) => {
                let f = self.io_failure(&e, stage::BODY);
                Self::record_all(txn, accepted, Outcome::Deferred, &f.dsn, &f.reason);
                return End::Complete;
            }
            Err(Trouble::Refused(r)) => {
                // DATA content has no reply before its end; kept for
                // completeness.
                let (outcome, dsn, reason) = self.said(&r, "end of DATA command");
                Self::record_all(txn, accepted, outcome, &dsn, &reason);
                return End::Complete;
            }
        }
        self.end_of_data(txn, accepted)
    }

    /// Reads the reply (LMTP: the replies) to the end of the content and
    /// records each accepted recipient's outcome.
    pub(super) fn end_of_data<T: Transaction>(&mut self, txn: &mut T, accepted: &[usize]) -> End {
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
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
