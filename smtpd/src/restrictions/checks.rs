//! The client, HELO, sender and recipient checks that need no lookup
//! of their own: fully-qualified names and HELO syntax, pipelining,
//! relay control (`permit_auth_destination`,
//! `reject_unauth_destination`), unlisted addresses and the SASL owners
//! of sender addresses (`smtpd_sender_login_maps`).

use super::{dsn_for, Request, Restrictions, Stage, Verdict};
use postern_common::resolve::Class;
use postern_common::{addr, hostname, info};
use std::net::IpAddr;

impl Restrictions {
    /// reject_non_fqdn_sender.
    pub(super) fn non_fqdn_sender(req: &Request<'_>) -> Verdict {
        match req.sender {
            Some(s) if !s.is_empty() && !hostname::fqdn_domain(&addr::domain(s)) => Self::reject(
                Stage::Sender,
                req,
                "504",
                "5.5.2",
                "need fully-qualified address",
            ),
            _ => Verdict::Dunno,
        }
    }

    /// reject_non_fqdn_recipient.
    pub(super) fn non_fqdn_recipient(req: &Request<'_>) -> Verdict {
        match req.recipient {
            Some(r) if !hostname::fqdn_domain(&addr::domain(r)) => Self::reject(
                Stage::Recipient,
                req,
                "504",
                "5.5.2",
                "need fully-qualified address",
            ),
            _ => Verdict::Dunno,
        }
    }

    /// reject_non_fqdn_helo_hostname.
    pub(super) fn non_fqdn_helo(req: &Request<'_>) -> Verdict {
        match req.helo {
            Some(h) if h.starts_with('[') && !hostname::valid_helo_name(h) => {
                Self::reject(Stage::Helo, req, "501", "5.5.2", "Invalid ip address")
            }
            Some(h) if !h.starts_with('[') && !hostname::fqdn_helo_name(h) => Self::reject(
                Stage::Helo,
                req,
                "504",
                "5.5.2",
                "need fully-qualified hostname",
            ),
            _ => Verdict::Dunno,
        }
    }

    /// reject_invalid_helo_hostname.
    pub(super) fn invalid_helo(req: &Request<'_>) -> Verdict {
        match req.helo {
            Some(h) if !hostname::valid_helo_name(h) => {
                let text = if h.starts_with('[') {
                    "Invalid ip address"
                } else {
                    "Invalid name"
                };
                Self::reject(Stage::Helo, req, "501", "5.5.2", text)
            }
            _ => Verdict::Dunno,
        }
    }

    /// reject_unauth_pipelining: input waiting behind a command, from a
    /// client that did not say EHLO, or behind DATA.
    pub(super) fn unauth_pipelining(stage: Stage, req: &Request<'_>) -> Verdict {
        if req.pipelined && (!req.esmtp || req.command == "DATA") {
            info!(
                "improper command pipelining after {} from {}[{}]",
                req.command,
                req.client_name,
                req.ip()
            );
            let (key, what) = match stage {
                Stage::Data => (req.command.to_string(), "Data command"),
                _ => Self::subject(stage, req),
            };
            Verdict::Reject(format!(
                "503 5.5.0 <{key}>: {what} rejected: Improper use of SMTP command pipelining"
            ))
        } else {
            Verdict::Dunno
        }
    }

    // ------------------------------------------------------------ SASL owners

    pub(super) fn login_mismatch(
        &self,
        req: &Request<'_>,
        authed: bool,
        unauthed: bool,
    ) -> Verdict {
        let Some(sender) = req.sender.filter(|s| !s.is_empty()) else {
            return Verdict::Dunno;
        };
        if self.sender_login_maps.is_none() {
            return Verdict::Dunno;
        }
        let owners = match self.sender_owners(sender) {
            Ok(o) => o,
            Err(v) => return v,
        };
        match (req.sasl_username, owners) {
            (Some(login), owners) if authed => {
                let owned = owners
                    .as_ref()
                    .is_some_and(|o| o.iter().any(|x| x.eq_ignore_ascii_case(login)));
                if owned {
                    Verdict::Dunno
                } else {
                    Self::reject(
                        Stage::Sender,
                        req,
                        "553",
                        "5.7.1",
                        &format!("not owned by user {login}"),
                    )
                }
            }
            (None, Some(_)) if unauthed => {
                Self::reject(Stage::Sender, req, "553", "5.7.1", "not logged in")
            }
            _ => Verdict::Dunno,
        }
    }

    /// The owners `smtpd_sender_login_maps` gives `sender` (None: not
    /// listed); Err: the verdict for a table that could not answer.
    fn sender_owners(&self, sender: &str) -> Result<Option<Vec<String>>, Verdict> {
        let Some(maps) = &self.sender_login_maps else {
            return Ok(None);
        };
        // Postfix looks up the address, then `@domain`.
        let keys = [
            sender.to_ascii_lowercase(),
            format!("@{}", addr::domain(sender)),
        ];
        for k in &keys {
            match maps.lookup(k) {
                Ok(Some(v)) => {
                    return Ok(Some(
                        v.split([',', ' ', '\t'])
                            .filter(|s| !s.is_empty())
                            .map(|s| s.to_string())
                            .collect(),
                    ))
                }
                Ok(None) => {}
                Err(_) => return Err(Self::lookup_failure(sender)),
            }
        }
        Ok(None)
    }

    /// reject_known_sender_login_mismatch: an authenticated client may
    /// not use a sender address `smtpd_sender_login_maps` gives to others
    /// (an address it does not list is anyone's); an unauthenticated one
    /// may not use a listed address.
    pub(super) fn known_login_mismatch(&self, req: &Request<'_>) -> Verdict {
        if req.sasl_username.is_none() {
            return self.login_mismatch(req, false, true);
        }
        match req
            .sender
            .filter(|s| !s.is_empty())
            .map(|s| self.sender_owners(s))
        {
            Some(Ok(Some(_))) => self.login_mismatch(req, true, false),
            Some(Err(v)) => v,
            _ => Verdict::Dunno,
        }
    }

    /// reject_plaintext_session: the session is not encrypted.
    pub(super) fn plaintext_session(&self, req: &Request<'_>) -> Verdict {
        if req.tls {
            return Verdict::Dunno;
        }
        let code = self.plaintext_code;
        Verdict::Reject(format!(
            "{code} {} Session encryption is required",
            dsn_for(code, ".7.1")
        ))
    }

    /// permit_inet_interfaces: the client is this machine (an address of
    /// `inet_interfaces`, or of any interface with `all`).
    pub(super) fn own_address(&self, ip: IpAddr) -> bool {
        self.resolver.as_ref().is_some_and(|r| r.is_own_address(ip))
    }

    /// check_relay_domains (deprecated by Postfix since 2.2, still in
    /// 3.7): permits a client whose name matches `relay_domains` and mail
    /// for our own and relay domains; refuses the rest with
    /// `relay_domains_reject_code`.
    pub(super) fn relay_domains_check(&self, req: &Request<'_>) -> Verdict {
        static ONCE: std::sync::Once = std::sync::Once::new();
        ONCE.call_once(|| {
            postern_common::warning!(
                "support for restriction \"check_relay_domains\" will be removed; \
                 use \"reject_unauth_destination\" instead"
            )
        });
        let Some(rcpt) = req.recipient else {
            return Verdict::Dunno;
        };
        if let Some(l) = &self.relay_domains {
            if l.matches_name(req.client_name).unwrap_or(false) {
                return Verdict::Permit;
            }
        }
        match self.auth_destination(rcpt) {
            Ok(true) => Verdict::Permit,
            Ok(false) => {
                let code = self.relay_domains_code;
                Self::reject(
                    Stage::Recipient,
                    req,
                    &code.to_string(),
                    &dsn_for(code, ".7.1"),
                    "Relay access denied",
                )
            }
            Err(_) => Self::lookup_failure(rcpt),
        }
    }

    /// reject_multi_recipient_bounce: a null sender with more than one
    /// recipient (at RCPT TO: one accepted before this one).
    pub(super) fn multi_recipient_bounce(&self, stage: Stage, req: &Request<'_>) -> Verdict {
        let before = usize::from(req.command != "RCPT");
        if req.sender == Some("") && req.rcpt_count > before {
            let code = self.multi_bounce_code;
            return Self::reject(
                stage,
                req,
                &code.to_string(),
                &dsn_for(code, ".5.3"),
                "Multi-recipient bounce",
            );
        }
        Verdict::Dunno
    }

    // ------------------------------------------------------------ destinations

    pub(super) fn unauth_destination(&self, rcpt: &str, code: &str) -> Verdict {
        match self.auth_destination(rcpt) {
            Ok(true) => Verdict::Dunno,
            Ok(false) => Verdict::Reject(format!("{code} <{rcpt}>: Relay access denied")),
            // Never "Relay access denied" because a table was unreadable.
            Err(_) => Self::lookup_failure(rcpt),
        }
    }

    /// Whether mail for `rcpt` is ours to take from anyone, as Postfix's
    /// permit_auth_destination: the resolver puts it in a final class
    /// (local, virtual alias, virtual mailbox) or in `relay_domains`
    /// (subdomains included through parent_domain_matches_subdomains),
    /// and its local part does not route further (`a%b@local`,
    /// `b!a@local`, `a@b@local`: allow_untrusted_routing = no).
    /// Err: a table could not answer (logged by the table).
    pub fn auth_destination(&self, rcpt: &str) -> Result<bool, String> {
        match self.resolved(rcpt)? {
            Some(r) => Ok(!r.routed && (r.class.is_final() || r.class == Class::Relay)),
            None => Ok(false),
        }
    }

    /// reject_unlisted_recipient / _sender: an address that no table of
    /// its class knows, as Postfix's smtpd checks it (see
    /// [`postern_common::resolve::Resolver::check_listed`]).
    pub(super) fn unlisted(&self, address: &str, sender: Option<&str>, what: &str) -> Verdict {
        let Some(resolver) = &self.resolver else {
            return Verdict::Dunno;
        };
        if self.no_unknown_recipient_checks && !what.starts_with("Sender") {
            return Verdict::Dunno;
        }
        match resolver.check_listed(sender, address, what.starts_with("Sender")) {
            Ok(()) => Verdict::Dunno,
            Err(f) if f.lookup_failure => {
                Verdict::Reject(format!("{} {} <{address}>: {}", f.code, f.dsn, f.text))
            }
            Err(f) => Verdict::Reject(format!(
                "{} {} <{address}>: {what} rejected: {}",
                f.code, f.dsn, f.text
            )),
        }
    }
}
