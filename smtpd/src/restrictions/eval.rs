//! Evaluating a restriction list: each restriction in order, the first
//! Permit or Reject decides; and the wording of the replies.

use super::dns_checks::is_address_literal;
use super::{Item, Request, Restrictions, Stage, Verdict};
use postern_common::warning;

impl Restrictions {
    /// Evaluates one list: the first Permit or Reject decides.
    pub fn eval_list(&self, list: &[Item], stage: Stage, req: &Request<'_>) -> Verdict {
        for (i, item) in list.iter().enumerate() {
            let v = self.eval_one(item, stage, req);
            if v != Verdict::Dunno {
                if let Some(next) = list.get(i + 1) {
                    if matches!(item.name.as_str(), "permit" | "reject" | "defer") {
                        warning!(
                            "restriction `{}' after `{}' is ignored",
                            next.name,
                            item.name
                        );
                    }
                }
                return v;
            }
        }
        Verdict::Dunno
    }

    /// `<key>: What rejected` for a stage, as Postfix words its replies.
    pub(super) fn subject(stage: Stage, req: &Request<'_>) -> (String, &'static str) {
        match stage {
            Stage::Client => (format!("{}[{}]", req.client_name, req.ip()), "Client host"),
            Stage::Helo => (req.helo.unwrap_or_default().to_string(), "Helo command"),
            Stage::Sender => (req.sender.unwrap_or_default().to_string(), "Sender address"),
            Stage::Recipient => (
                req.recipient.unwrap_or_default().to_string(),
                "Recipient address",
            ),
            Stage::Data => (req.command.to_string(), "Data command"),
        }
    }

    pub(super) fn reject(
        stage: Stage,
        req: &Request<'_>,
        code: &str,
        dsn: &str,
        text: &str,
    ) -> Verdict {
        let (key, what) = Self::subject(stage, req);
        Verdict::Reject(format!("{code} {dsn} <{key}>: {what} rejected: {text}"))
    }

    /// One restriction, by name; an unknown name is a configuration
    /// error (`451 4.3.5`).
    pub(super) fn eval_one(&self, item: &Item, stage: Stage, req: &Request<'_>) -> Verdict {
        let rcpt = req.recipient.unwrap_or_default();
        let flag = |b: bool| if b { Verdict::Permit } else { Verdict::Dunno };
        match item.name.as_str() {
            "permit" => Verdict::Permit,
            "reject" => Self::reject(stage, req, "554", "5.7.1", "Access denied"),
            "defer" => Self::reject(stage, req, "450", "4.7.1", "Try again later"),
            "permit_mynetworks" => flag(self.in_mynetworks(req.ip())),
            "permit_sasl_authenticated" => flag(req.sasl_username.is_some()),
            "permit_auth_destination" if req.recipient.is_some() => {
                match self.auth_destination(rcpt) {
                    Ok(b) => flag(b),
                    Err(_) => Self::lookup_failure(rcpt),
                }
            }
            "reject_unauth_destination" if req.recipient.is_some() => {
                self.unauth_destination(rcpt, "554 5.7.1")
            }
            "defer_unauth_destination" if req.recipient.is_some() => {
                self.unauth_destination(rcpt, "454 4.7.1")
            }
            "permit_auth_destination"
            | "reject_unauth_destination"
            | "defer_unauth_destination" => Verdict::Dunno,
            "reject_non_fqdn_sender" => Self::non_fqdn_sender(req),
            "reject_non_fqdn_recipient" => Self::non_fqdn_recipient(req),
            "reject_non_fqdn_helo_hostname" => Self::non_fqdn_helo(req),
            "reject_invalid_helo_hostname" => Self::invalid_helo(req),
            "reject_unauth_pipelining" => Self::unauth_pipelining(stage, req),
            "reject_unlisted_recipient" => match req.recipient {
                Some(r) => self.unlisted(r, req.sender, "Recipient address"),
                None => Verdict::Dunno,
            },
            "reject_unlisted_sender" => match req.sender {
                Some(s) if !s.is_empty() => self.unlisted(s, req.recipient, "Sender address"),
                _ => Verdict::Dunno,
            },
            "reject_unknown_sender_domain" => Self::unknown_sender_domain(req),
            "reject_unknown_recipient_domain" => self.unknown_recipient_domain(req),
            "reject_unknown_client_hostname" | "reject_unknown_client" => {
                self.unknown_client(req, req.name_status, "hostname")
            }
            "reject_unknown_reverse_client_hostname" => {
                self.unknown_client(req, req.reverse_status, "reverse hostname")
            }
            "reject_unknown_helo_hostname" => match req.helo {
                Some(h) if !is_address_literal(h) => self.unknown_helo_hostname(req, h),
                _ => Verdict::Dunno,
            },
            "reject_rbl_client" => Self::rbl_client(item, req),
            "reject_sender_login_mismatch" => self.login_mismatch(req, true, true),
            "reject_authenticated_sender_login_mismatch" => self.login_mismatch(req, true, false),
            "reject_unauthenticated_sender_login_mismatch" => self.login_mismatch(req, false, true),
            "check_client_access"
            | "check_helo_access"
            | "check_sender_access"
            | "check_recipient_access" => self.check_access(item, stage, req),
            name => {
                warning!("unknown smtpd restriction: \"{name}\"");
                Verdict::Reject("451 4.3.5 Server configuration error".into())
            }
        }
    }
}
