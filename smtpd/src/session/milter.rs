//! The session's side of `smtpd_milters` (see [`crate::milter`]): the
//! question for a stage, the wait for its answer, and what the answer
//! does to the command.

use super::{Done, Session};
use crate::dns::{Answer, Query};
use crate::milter::{Ask, Link, Stage};
use postern_common::info;
use postern_common::milter::Outcome;
use postern_common::smtp_command::Verb;

impl Session {
    /// The session's milter connections (made at the first question).
    pub fn milter_link(&mut self) -> Option<Link> {
        let settings = self.milters.clone()?;
        Some(
            self.milter
                .get_or_insert_with(|| Link::new(settings))
                .clone(),
        )
    }

    /// The macro values the session knows now (Postfix's names; which
    /// are sent at which stage is `milter_*_macros`'s or the milter's
    /// choice).
    pub(super) fn milter_macros_now(&self) -> Vec<(String, String)> {
        self.milter_macros()
    }

    fn milter_macros(&self) -> Vec<(String, String)> {
        let Some(s) = self.milters.as_deref() else {
            return Vec::new();
        };
        let name = self.client.names.name.clone();
        let addr = self.client.addr.to_string();
        let mut m = vec![
            ("j".to_string(), s.myhostname.clone()),
            ("v".to_string(), s.macro_v.clone()),
            ("daemon_name".to_string(), s.daemon_name.clone()),
            ("_".to_string(), format!("{name} [{addr}]")),
            ("client_addr".to_string(), addr),
            ("client_name".to_string(), name),
        ];
        if let Some(p) = self.client.port {
            m.push(("client_port".into(), p.to_string()));
        }
        if let Some(l) = self.client.local {
            m.push(("daemon_addr".into(), l.ip().to_string()));
        }
        if let Some(t) = &self.tls {
            m.push(("tls_version".into(), t.protocol.clone()));
            m.push(("cipher".into(), t.cipher.clone()));
            m.push(("cipher_bits".into(), t.bits.to_string()));
        }
        if let Some(c) = &self.client_cert {
            m.push(("cert_subject".into(), c.subject_cn.clone()));
            m.push(("cert_issuer".into(), c.issuer_cn.clone()));
        }
        if let Some(a) = &self.sasl_method {
            m.push(("auth_type".into(), a.clone()));
        }
        if let Some(u) = &self.sasl_username {
            m.push(("auth_authen".into(), u.clone()));
        }
        if let Some(tx) = &self.tx {
            m.extend(self.sender_macros(&tx.sender, tx.sasl_sender.as_deref()));
            if let Some(id) = &tx.queue_id {
                m.push(("i".into(), id.clone()));
            }
        }
        m
    }

    /// `{mail_addr}`, `{mail_host}`, `{mail_mailer}` and `{auth_author}`
    /// (MAIL FROM's AUTH= of an authenticated client).
    fn sender_macros(&self, sender: &str, author: Option<&str>) -> Vec<(String, String)> {
        let mut m = vec![("mail_addr".to_string(), sender.to_string())];
        if let Some(r) = self.cfg.restrictions.resolver() {
            m.extend(postern_common::milter::route_macros(r, "mail", sender));
        }
        if let Some(a) = author {
            m.push(("auth_author".into(), a.to_string()));
        }
        m
    }

    /// The session-level macro values cleanup's own milter connection
    /// cannot know (the server address, TLS, the client certificate):
    /// recorded in the queue file for its replay of the connect and HELO
    /// stages (`attr::MILTER_MACRO_PREFIX`).
    pub(super) fn milter_session_macros(&self) -> Vec<(String, String)> {
        if self.milters.is_none() {
            return Vec::new();
        }
        const KEPT: &[&str] = &[
            "daemon_addr",
            "tls_version",
            "cipher",
            "cipher_bits",
            "cert_subject",
            "cert_issuer",
        ];
        self.milter_macros()
            .into_iter()
            .filter(|(n, _)| KEPT.contains(&n.as_str()))
            .collect()
    }

    /// The milters' answer for `stage` of the command `verb`: `Some` when
    /// it is in (or there are no milters), `None` when it was asked for:
    /// the command waits and runs again with it.
    pub(super) fn milter_step(&mut self, stage: Stage, verb: Verb) -> Option<Outcome> {
        if self.milters.is_none() || self.milter_denied.is_some() {
            // No milters, or they refused the session at connect (MAIL,
            // RCPT and DATA get that refusal; HELO is not theirs then).
            return Some(Outcome::Continue);
        }
        let mut macros = self.milter_macros();
        match &stage {
            Stage::Mail(sender, params) => {
                // The transaction starts after this answer.
                let author = params.iter().find_map(|p| {
                    let (k, v) = p.split_once('=')?;
                    (k.eq_ignore_ascii_case("AUTH") && v != "<>" && self.sasl_username.is_some())
                        .then(|| postern_common::dsn::xtext_decode(v))
                        .flatten()
                });
                macros.extend(self.sender_macros(sender, author.as_deref()));
            }
            Stage::Rcpt(r, _) => {
                macros.push(("rcpt_addr".into(), r.clone()));
                if let Some(res) = self.cfg.restrictions.resolver() {
                    macros.extend(postern_common::milter::route_macros(res, "rcpt", r));
                }
            }
            Stage::RcptRejected(_, _, reply) => {
                macros.extend(postern_common::milter::rejected_rcpt_macros(reply));
            }
            _ => {}
        }
        let q = Query::Milter(Ask { stage, macros });
        if let Some(Answer::Milter(o)) = self.dns.remove(&q) {
            return Some(o);
        }
        // As for the verify service: the command runs again, and what
        // its first run counted is not counted twice.
        self.sleep.seen.set(0);
        self.sleep.secs.set(0);
        self.verify_rerun = true;
        let mark = self.prepend_mark;
        self.access_prepend.borrow_mut().truncate(mark);
        if !self.await_dns(vec![q], verb) {
            return Some(Outcome::Continue);
        }
        None
    }

    /// An unknown command shown to the milters (`milter_unknown_command_macros`):
    /// `None` while their answer is asked for (the line runs again with
    /// it), else the reply a milter gave instead of smtpd's own (`Some(None)`:
    /// smtpd's own).
    pub(super) fn milter_unknown(&mut self, line: &[u8]) -> Option<Option<String>> {
        if self.milters.is_none() || self.milter_denied.is_some() {
            return Some(None);
        }
        let text = String::from_utf8_lossy(line).into_owned();
        let q = Query::Milter(Ask {
            stage: Stage::Unknown(text),
            macros: self.milter_macros(),
        });
        match self.dns.remove(&q) {
            Some(Answer::Milter(Outcome::Reject(r) | Outcome::Tempfail(r))) => Some(Some(r)),
            Some(_) => Some(None),
            None => {
                if self.request_dns(vec![q]) {
                    self.state = super::State::WaitDns(std::mem::take(&mut self.current_line));
                    None
                } else {
                    Some(None)
                }
            }
        }
    }

    /// What the milters' answer does to a command: `None` to go on;
    /// a refusal is answered here as the milter gave it.
    pub(super) fn milter_verdict(&mut self, o: Outcome, what: &str) -> Option<Done> {
        match o {
            Outcome::Continue => None,
            Outcome::Discard => {
                info!(
                    "milter-discard: {what} from {}: milter triggers DISCARD action",
                    self.namaddr
                );
                self.milter_discard = true;
                None
            }
            Outcome::Reject(r) | Outcome::Tempfail(r) => {
                info!("milter-reject: {what} from {}: {r}", self.namaddr);
                self.reply(&r);
                Some(Done::Failed)
            }
            Outcome::Shutdown(r) => {
                info!("milter-reject: {what} from {}: {r}", self.namaddr);
                self.reply(&r);
                self.hangup = true;
                Some(Done::Failed)
            }
        }
    }

    /// The refusal left by the milters at connect (a reject or a
    /// failure under `milter_default_action`): MAIL, RCPT and DATA get it.
    pub(super) fn milter_denied(&mut self) -> Option<Done> {
        let r = self.milter_denied.clone()?;
        self.reply(&r);
        Some(Done::Failed)
    }
}
