//! Evaluating a restriction list: each restriction in order, the first
//! Permit or Reject decides; and the wording of the replies.

use super::dns_checks::is_address_literal;
use super::{Item, Request, Restrictions, Stage, Verdict};
use postern_common::{info, warning};

impl Restrictions {
    /// Evaluates one list: the first Permit or Reject decides.
    pub fn eval_list(&self, list: &[Item], stage: Stage, req: &Request<'_>) -> Verdict {
        let mut warn_only = false;
        for (i, item) in list.iter().enumerate() {
            if item.name == "warn_if_reject" {
                warn_only = true;
                continue;
            }
            let mut v = if warn_only && item.name.starts_with("reject_unverified_") {
                // Postfix's DEFER_IF_PERMIT under warn_if_reject: the
                // reply is logged as a reject_warning, never raised as
                // defer_if_permit.
                let plain = Request {
                    defers: None,
                    ..req.clone()
                };
                self.eval_one(item, stage, &plain)
            } else {
                self.eval_one(item, stage, req)
            };
            let warned = warn_only;
            if let (false, Some(d)) = (warned, req.defers) {
                v = d.soften(v);
            }
            if std::mem::take(&mut warn_only) {
                // warn_if_reject: the next restriction's reject is logged,
                // not answered (Postfix's "reject_warning").
                if let Verdict::Reject(reply) = &v {
                    info!(
                        "NOQUEUE: reject_warning: {} from {}[{}]: {reply}",
                        req.command,
                        req.client_name,
                        req.ip()
                    );
                    v = Verdict::Dunno;
                }
            }
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
            if req.defers.is_some_and(|d| d.both_raised()) || req.paused() {
                break;
            }
        }
        Verdict::Dunno
    }

    /// `<key>: What rejected` for a stage, as Postfix words its replies.
    pub(super) fn subject(stage: Stage, req: &Request<'_>) -> (String, &'static str) {
        if let Some((key, what)) = req.reply_subject {
            return (key.to_string(), what);
        }
        match stage {
            Stage::Client => (format!("{}[{}]", req.client_name, req.ip()), "Client host"),
            Stage::Helo => (req.helo.unwrap_or_default().to_string(), "Helo command"),
            Stage::Sender => (req.sender.unwrap_or_default().to_string(), "Sender address"),
            Stage::Recipient => (
                req.recipient.unwrap_or_default().to_string(),
                "Recipient address",
            ),
            Stage::Data if req.command == "END-OF-MESSAGE" => {
                (req.command.to_string(), "End-of-data")
            }
            Stage::Data => (req.command.to_string(), "Data command"),
            Stage::Etrn => (
                req.etrn_domain.unwrap_or_default().to_string(),
                "Etrn command",
            ),
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

    /// One restriction, by name. Lists were parsed at start
    /// (`postern_common::restriction::parse_list`), so every name here is
    /// one smtpd carries out or a restriction class; a name an access
    /// table answers with is not checked before, and an unknown one there
    /// is a configuration error (`451 4.3.5`), as in Postfix.
    pub(super) fn eval_one(&self, item: &Item, stage: Stage, req: &Request<'_>) -> Verdict {
        let rcpt = req.recipient.unwrap_or_default();
        let flag = |b: bool| if b { Verdict::Permit } else { Verdict::Dunno };
        match item.name.as_str() {
            "permit" => Verdict::Permit,
            "reject" => Self::reject(stage, req, "554", "5.7.1", "Access denied"),
            "defer" => Self::reject(stage, req, "450", "4.7.1", "Try again later"),
            "permit_mynetworks" => match self.in_mynetworks(req.ip()) {
                Ok(b) => flag(b),
                // Postfix defers when mynetworks cannot answer.
                Err(_) => Verdict::Reject("451 4.3.0 Temporary lookup failure".into()),
            },
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
            "reject_non_fqdn_helo_hostname" | "reject_non_fqdn_hostname" => {
                Self::non_fqdn_helo(req)
            }
            "reject_invalid_helo_hostname" | "reject_invalid_hostname" => Self::invalid_helo(req),
            "reject_unauth_pipelining" => Self::unauth_pipelining(stage, req),
            "reject_unlisted_recipient" | "check_recipient_maps" => match req.recipient {
                Some(r) => self.unlisted(r, req.sender, "Recipient address"),
                None => Verdict::Dunno,
            },
            "reject_unlisted_sender" => match req.sender {
                Some(s) if !s.is_empty() => self.unlisted(s, req.recipient, "Sender address"),
                _ => Verdict::Dunno,
            },
            "reject_unknown_sender_domain" => Self::unknown_sender_domain(req),
            "reject_unknown_recipient_domain" => self.unknown_recipient_domain(req),
            "reject_unverified_recipient" | "reject_unverified_sender" => {
                self.unverified(item, req)
            }
            "reject_unknown_client_hostname" | "reject_unknown_client" => {
                self.unknown_client(req, req.name_status, "hostname")
            }
            "reject_unknown_reverse_client_hostname" => {
                self.unknown_client(req, req.reverse_status, "reverse hostname")
            }
            "reject_unknown_helo_hostname" | "reject_unknown_hostname" => match req.helo {
                Some(h) if !is_address_literal(h) => self.unknown_helo_hostname(req, h),
                _ => Verdict::Dunno,
            },
            "reject_rbl_client" => Self::rbl_client(item, req),
            "permit_dnswl_client" | "permit_rhswl_client" => Self::dns_whitelist(item, req),
            "reject_rhsbl_client"
            | "reject_rhsbl_reverse_client"
            | "reject_rhsbl_sender"
            | "reject_rhsbl_helo"
            | "reject_rhsbl_recipient" => Self::rhsbl(item, req),
            "check_sasl_access" => self.check_sasl_access(item, req),
            "reject_sender_login_mismatch" => self.login_mismatch(req, true, true),
            "reject_authenticated_sender_login_mismatch" => self.login_mismatch(req, true, false),
            "reject_unauthenticated_sender_login_mismatch" => self.login_mismatch(req, false, true),
            "check_client_access"
            | "check_helo_access"
            | "check_sender_access"
            | "check_recipient_access"
            | "check_etrn_access" => self.check_access(item, stage, req),
            "check_policy_service" => self.check_policy_service(item, stage, req),
            "defer_if_permit" | "defer_if_reject" => {
                let text = format!("{} requested", item.name);
                Self::raise_defer(&item.name, stage, req, "450", "4.7.0", &text)
            }
            "reject_plaintext_session" => self.plaintext_session(req),
            "sleep" => {
                // The session pauses (without holding up the others) and
                // runs the command again; then sleep has been done.
                if let Some(p) = req.pause {
                    let n = p.seen.get();
                    p.seen.set(n + 1);
                    if n >= p.done.get() {
                        p.secs.set(
                            item.arg
                                .as_deref()
                                .and_then(|a| a.parse().ok())
                                .unwrap_or(0),
                        );
                    }
                }
                Verdict::Dunno
            }
            "permit_inet_interfaces" => flag(self.own_address(req.ip())),
            "check_relay_domains" => self.relay_domains_check(req),
            "reject_multi_recipient_bounce" => self.multi_recipient_bounce(stage, req),
            "reject_known_sender_login_mismatch" => self.known_login_mismatch(req),
            "check_reverse_client_hostname_access" => self.reverse_client_access(item, req),
            "permit_mx_backup" => self.mx_backup(req),
            "permit_tls_clientcerts" | "permit_tls_all_clientcerts" | "check_ccert_access" => {
                self.client_cert_check(item, req)
            }
            name if super::server_access::is_server_access(name) => {
                self.check_server_access(item, req)
            }
            name if self.classes.contains_key(name) => {
                self.eval_list(&self.classes[name], stage, req)
            }
            name => {
                warning!("unknown smtpd restriction: \"{name}\"");
                Verdict::Reject("451 4.3.5 Server configuration error".into())
            }
        }
    }
}
