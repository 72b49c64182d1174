//! `reject_unverified_recipient` and `reject_unverified_sender`: what the
//! verify(8) service knows of the address decides, worded as Postfix
//! 3.7's smtpd_check.c (ADDRESS_VERIFICATION_README, postconf(5)).
//!
//! The answer is asked lazily: a list that reaches one of these without
//! an answer for the address names it in [`Request::verify`] and stops
//! (as `sleep` does); the session asks the service
//! ([`crate::verify_lookup`], with `address_verify_poll_count` and
//! `address_verify_poll_delay`), waits, and runs the command again with
//! the answer among its [`Request::dns`] facts. So an address a list
//! permits before it gets to these (`permit_mynetworks`, ...) is never
//! probed, as in Postfix.
//!
//! - deliverable: no opinion (the next restriction decides);
//! - undeliverable: `unverified_*_reject_code`; a 5xx code says
//!   "undeliverable address: <why>", a 4xx code "unverified address:
//!   <why>" (with `unverified_*_tempfail_action`), a 2xx code nothing;
//! - still in progress after the poll, or deferred:
//!   `unverified_*_defer_code` with "unverified address: <why>";
//! - the service could not answer: 450 "address verification problem",
//!   with the tempfail action.
//!
//! `<why>` is the service's text (the next hop's reply, "Address
//! verification in progress") or `unverified_*_reject_reason` when set.
//! The tempfail action `defer_if_permit` (Postfix's default, through
//! `reject_tempfail_action`) raises defer_if_permit instead of refusing
//! at once; `defer` refuses at once. The enhanced status code is x.1.1
//! for a recipient, x.1.7 for a sender, its class that of the reply code.

use super::{dsn_for, Item, Request, Restrictions, Verdict};
use crate::dns::{Answer, Query};
use postern_common::verify::Status;
use postern_conf::Config;

/// The `unverified_recipient_*` or `unverified_sender_*` settings.
#[derive(Debug, Clone)]
pub struct Unverified {
    /// `unverified_*_reject_code`: an undeliverable address.
    reject_code: u16,
    /// `unverified_*_defer_code`: in progress, or a probe that was
    /// deferred.
    defer_code: u16,
    /// `unverified_*_reject_reason` (empty: the service's text).
    reason: String,
    /// `unverified_*_tempfail_action` is `defer_if_permit` (else `defer`).
    defer_if_permit: bool,
}

impl Default for Unverified {
    /// Postfix's defaults.
    fn default() -> Self {
        Unverified {
            reject_code: 450,
            defer_code: 450,
            reason: String::new(),
            defer_if_permit: true,
        }
    }
}

impl Unverified {
    /// `kind` is `recipient` or `sender`.
    pub fn from_config(cfg: &Config, kind: &str) -> Result<Unverified, String> {
        let code = |what: &str| {
            let name = format!("unverified_{kind}_{what}_code");
            let v = cfg.get(&name);
            match v.trim().parse::<u16>() {
                Ok(c) if (200..600).contains(&c) => Ok(c),
                _ => Err(format!("{name}: expected a reply code, not \"{v}\"")),
            }
        };
        let action_name = format!("unverified_{kind}_tempfail_action");
        let action = cfg.get(&action_name);
        let defer_if_permit = match action.trim() {
            // $reject_tempfail_action, when nothing sets it, is Postfix's
            // default.
            "" | "defer_if_permit" => true,
            "defer" => false,
            other => {
                return Err(format!(
                    "{action_name}: expected defer or defer_if_permit, not \"{other}\""
                ))
            }
        };
        Ok(Unverified {
            reject_code: code("reject")?,
            defer_code: code("defer")?,
            reason: cfg.get(&format!("unverified_{kind}_reject_reason")),
            defer_if_permit,
        })
    }
}

/// At most `n` bytes of `s`, cut at a character boundary (Postfix's
/// `%.250s`).
fn truncated(s: &str, n: usize) -> &str {
    if s.len() <= n {
        return s;
    }
    let mut end = n;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

impl Restrictions {
    /// `reject_unverified_recipient` / `reject_unverified_sender`.
    pub(super) fn unverified(&self, item: &Item, req: &Request<'_>) -> Verdict {
        let sender = item.name == "reject_unverified_sender";
        let (address, what, settings, detail) = if sender {
            (
                req.sender,
                "Sender address",
                &self.unverified_sender,
                ".1.7",
            )
        } else {
            (
                req.recipient,
                "Recipient address",
                &self.unverified_recipient,
                ".1.1",
            )
        };
        let Some(address) = address.filter(|a| !a.is_empty()) else {
            return Verdict::Dunno;
        };
        let q = Query::Verify(address.to_string());
        let answer = match req.dns.and_then(|m| m.get(&q)) {
            Some(Answer::Verify(a)) => a,
            _ => {
                // Asked now; the command runs again with the answer.
                if let Some(w) = req.verify {
                    w.replace(Some(address.to_string()));
                }
                return Verdict::Dunno;
            }
        };
        let (status, why) = match answer {
            Ok(a) => a,
            Err(_) => {
                let text = format!("<{address}>: {what} rejected: address verification problem");
                return Self::tempfail(settings, req, 450, &dsn_for(450, detail), &text);
            }
        };
        let code = match status {
            Status::Ok => return Verdict::Dunno,
            Status::Todo | Status::Defer => settings.defer_code,
            Status::Bounce => settings.reject_code,
        };
        let why = if settings.reason.is_empty() {
            why.as_str()
        } else {
            settings.reason.as_str()
        };
        let dsn = dsn_for(code, detail);
        match code / 100 {
            2 => Verdict::Dunno,
            4 => {
                let text = format!(
                    "<{address}>: {what} rejected: unverified address: {}",
                    truncated(why, 250)
                );
                Self::tempfail(settings, req, code, &dsn, &text)
            }
            _ => Verdict::Reject(Self::reply_line(
                code,
                &dsn,
                &format!("<{address}>: {what} rejected: undeliverable address: {why}"),
            )),
        }
    }

    /// A temporary refusal: with `defer_if_permit` raised as that flag
    /// (the lists go on), else answered at once.
    fn tempfail(
        settings: &Unverified,
        req: &Request<'_>,
        code: u16,
        dsn: &str,
        text: &str,
    ) -> Verdict {
        let reply = Self::reply_line(code, dsn, text);
        match req.defers {
            Some(d) if settings.defer_if_permit => {
                d.raise_permit(reply);
                Verdict::Dunno
            }
            _ => Verdict::Reject(reply),
        }
    }

    /// `code dsn text`, at most 510 bytes and printable, as Postfix's
    /// smtpd_check_reject.
    fn reply_line(code: u16, dsn: &str, text: &str) -> String {
        let line = format!("{code} {dsn} {text}");
        truncated(&line, 510)
            .chars()
            .map(|c| if c.is_control() { ' ' } else { c })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::truncated;

    #[test]
    fn truncation_keeps_whole_characters() {
        assert_eq!(truncated("abc", 250), "abc");
        assert_eq!(truncated("aé", 2), "a");
        assert_eq!(truncated(&"x".repeat(300), 250).len(), 250);
    }
}
