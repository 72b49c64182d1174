//! `check_policy_service inet:host:port | unix:path`: the request is
//! Postfix 3.7's attribute set (SMTPD_POLICY_README), the answer an
//! access(5) action worded for the list's stage, as a table's would be.
//! A server that cannot be asked answers
//! `smtpd_policy_service_default_action` (`451 4.3.5`).

use super::{Item, Request, Restrictions, Stage, Verdict};
use crate::policy_client::PolicyClient;
use postern_common::warning;
use postern_conf::Config;

impl Restrictions {
    /// The client for every `check_policy_service` server of the lists:
    /// a server that cannot be used stops smtpd at start rather than
    /// answering every RCPT 451.
    pub(super) fn policy_client(&self, cfg: &Config) -> Result<PolicyClient, String> {
        PolicyClient::from_config(
            cfg,
            self.all_items()
                .filter(|i| i.name == "check_policy_service")
                .filter_map(|i| i.arg.as_deref()),
        )
    }

    /// Whether any list (or class) asks a policy server: the session then
    /// gathers the attributes only a policy server needs.
    pub fn uses_policy(&self) -> bool {
        self.all_items().any(|i| i.name == "check_policy_service")
    }

    fn all_items(&self) -> impl Iterator<Item = &Item> {
        [
            &self.client,
            &self.helo,
            &self.sender,
            &self.relay,
            &self.recipient,
            &self.data,
        ]
        .into_iter()
        .chain(self.classes.values())
        .flat_map(|l| l.iter())
    }

    pub(super) fn check_policy_service(
        &self,
        item: &Item,
        stage: Stage,
        req: &Request<'_>,
    ) -> Verdict {
        let spec = item.arg.as_deref().unwrap_or_default();
        let attrs = self.policy_attributes(spec, req);
        let key: String = std::iter::once(format!("{spec}\n"))
            .chain(attrs.iter().map(|(k, v)| format!("{k}={v}\n")))
            .collect();
        let memo = req.policy_memo.and_then(|m| {
            m.borrow()
                .iter()
                .find(|(k, _)| *k == key)
                .map(|(_, a)| a.clone())
        });
        let action = match memo {
            Some(a) => a,
            None => {
                let a = match self.policy.query(spec, &attrs) {
                    Some(a) => a,
                    None => self.policy.settings_of(spec).default_action.clone(),
                };
                if let Some(m) = req.policy_memo {
                    m.borrow_mut().push((key, a.clone()));
                }
                a
            }
        };
        if action.is_empty() {
            warning!("{spec}: empty policy action");
            return Verdict::Reject("451 4.3.5 Server configuration error".into());
        }
        self.action(&action, stage, req, spec)
    }

    /// The request, in SMTPD_POLICY_README's order; what the restriction
    /// request does not carry comes from the session
    /// ([`Request::session_attrs`]).
    fn policy_attributes(&self, spec: &str, req: &Request<'_>) -> Vec<(&'static str, String)> {
        let from_session = |name: &str| {
            req.session_attrs
                .iter()
                .find(|(k, _)| *k == name)
                .map(|(_, v)| v.clone())
                .unwrap_or_default()
        };
        let mut a: Vec<(&'static str, String)> = vec![
            ("request", "smtpd_access_policy".into()),
            ("protocol_state", req.command.to_string()),
            (
                "protocol_name",
                if req.esmtp { "ESMTP" } else { "SMTP" }.into(),
            ),
            ("helo_name", req.helo.unwrap_or_default().into()),
            ("queue_id", from_session("queue_id")),
            ("sender", req.sender.unwrap_or_default().into()),
            ("recipient", req.recipient.unwrap_or_default().into()),
            ("recipient_count", from_session("recipient_count")),
            (
                "client_address",
                req.client_addr.map(|a| a.to_string()).unwrap_or_default(),
            ),
            ("client_name", req.client_name.into()),
            ("client_port", from_session("client_port")),
            ("reverse_client_name", req.client_reverse_name.into()),
            ("server_address", from_session("server_address")),
            ("server_port", from_session("server_port")),
            ("instance", from_session("instance")),
            ("sasl_method", from_session("sasl_method")),
            (
                "sasl_username",
                req.sasl_username.unwrap_or_default().into(),
            ),
            ("sasl_sender", from_session("sasl_sender")),
            ("size", from_session("size")),
            // Postern's smtpd does not ask for client certificates.
            ("ccert_subject", String::new()),
            ("ccert_issuer", String::new()),
            ("ccert_fingerprint", String::new()),
            ("ccert_pubkey_fingerprint", String::new()),
            ("encryption_protocol", from_session("encryption_protocol")),
            ("encryption_cipher", from_session("encryption_cipher")),
            ("encryption_keysize", from_session("encryption_keysize")),
            ("etrn_domain", req.etrn_domain.unwrap_or_default().into()),
            ("stress", String::new()),
            (
                "compatibility_level",
                self.policy.settings.compatibility_level.clone(),
            ),
            ("mail_version", self.policy.settings.mail_version.clone()),
        ];
        a.push((
            "policy_context",
            self.policy.settings_of(spec).policy_context.clone(),
        ));
        a
    }
}
