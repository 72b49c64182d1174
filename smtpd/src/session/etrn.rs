//! ETRN (RFC 1985): a client asks for the deferred mail of a domain to be
//! delivered now, as Postfix's smtpd does it (`etrn_cmd`).
//!
//! The order of Postfix 3.7: HELO/EHLO first when `smtpd_helo_required`;
//! not inside a mail transaction (503); exactly one argument (500); an
//! optional `@` or `#` before the domain is dropped; a host name or an
//! address literal (501); `smtpd_etrn_restrictions` (after the client and
//! HELO lists with `smtpd_delay_reject`), the domain their subject; a
//! domain not in `fast_flush_domains` is refused with RFC 1985's 459.
//! Postern has no flush(8) service: smtpd reads the domain's flush log
//! itself ([`postern_common::flush`], what `postqueue -s` does; smtpd
//! runs as `mail_owner`, who owns the queue tree), moves the listed
//! messages that still have a recipient there to `incoming/`, and wakes
//! qmgr to scan `incoming/`. A domain without a log has no deferred mail
//! Postern knows of: 250 all the same, as Postfix answers.

use super::{Done, Session};
use crate::restrictions::Stage;
use postern_common::hostname;
use postern_common::ipc::{self, Wakeup};
use postern_common::smtp_command::{Token, Verb};
use postern_common::{flush, warning};

impl Session {
    pub(super) fn etrn(&mut self, args: &[Token]) -> Done {
        if self.cfg.helo_required && self.helo.is_none() {
            return self.fail("503 Error: send HELO/EHLO first");
        }
        if self.tx.is_some() {
            return self.fail("503 Error: MAIL transaction in progress");
        }
        if args.len() != 2 {
            return self.fail("500 Syntax: ETRN domain");
        }
        let given = args[1].text.as_str();
        let domain = given
            .strip_prefix('@')
            .or_else(|| given.strip_prefix('#'))
            .unwrap_or(given)
            .to_string();
        if !hostname::valid_hostname(&domain) && !hostname::valid_address_literal(&domain) {
            return self.fail("501 Error: invalid parameter syntax");
        }
        let needed = {
            let mut req = self.request(None, self.where_);
            req.etrn_domain = Some(&domain);
            self.cfg.restrictions.dns_needed(Stage::Etrn, &req)
        };
        if self.await_dns(needed, Verb::Etrn) {
            return Done::Pending;
        }
        let refused = {
            let mut req = self.request(None, self.where_);
            req.etrn_domain = Some(&domain);
            self.cfg.restrictions.check_etrn(&req)
        };
        if self.await_verify(Verb::Etrn) || self.await_sleep(Some(Verb::Etrn)) {
            return Done::Pending;
        }
        if let Some(reply) = refused {
            return self.reject(&reply, None, None);
        }
        match self.cfg.fast_flush_domains.matches_name(&domain) {
            Ok(true) => {}
            Ok(false) => {
                warning!("reject: ETRN {:.100}... from {}", domain, self.namaddr);
                return self.fail(&format!("459 <{domain}>: service unavailable"));
            }
            Err(_) => {
                warning!("unable to talk to fast flush service");
                return self.fail("458 Unable to queue messages");
            }
        }
        let Some(site) = flush::normalize_site(&domain) else {
            warning!("bad ETRN {:.100}... from {}", domain, self.namaddr);
            return self.fail("458 Unable to queue messages");
        };
        match flush::flush_site(&self.cfg.queue, &site) {
            Ok(f) if f.due > 0 => {
                // qmgr also scans incoming/ on its own timer when it
                // cannot be woken.
                if let Err(e) = ipc::wake(&self.cfg.queue.qmgr_socket(), &[Wakeup::Incoming]) {
                    warning!("ETRN {site}: cannot wake qmgr: {e}");
                }
            }
            Ok(_) => {}
            Err(e) => {
                warning!("unable to talk to fast flush service: flush log of {site}: {e}");
                return self.fail("458 Unable to queue messages");
            }
        }
        self.reply("250 Queuing started");
        Done::Ok
    }
}
