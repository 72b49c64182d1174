//! Access restrictions: Postfix's `smtpd_*_restrictions` language.
//!
//! A restriction list is a sequence of names evaluated in order; each one
//! answers [`Verdict::Permit`] (stop: this list accepts), [`Verdict::Reject`]
//! (stop: refuse with an SMTP reply) or [`Verdict::Dunno`] (no opinion: go
//! on). A list that runs out accepts. At RCPT TO, Postfix evaluates
//! `smtpd_relay_restrictions` and then `smtpd_recipient_restrictions`; a
//! reject in either refuses the recipient.
//!
//! Known today: `permit`, `reject`, `defer`, `permit_mynetworks`,
//! `permit_sasl_authenticated` (never matches until SASL exists),
//! `permit_auth_destination`, `reject_unauth_destination`,
//! `defer_unauth_destination`. Any other name is a configuration error:
//! it is logged and the request gets `451 4.3.5 Server configuration
//! error`, as Postfix does. Restrictions that take an argument (access
//! maps, `check_policy_service`, ...) and the client, HELO, sender and
//! DATA stages are for later; [`Restrictions::eval_list`] is where they
//! go.

use postern_common::addr;
use postern_common::cidr::CidrList;
use postern_common::warning;
use postern_conf::Config;
use std::net::IpAddr;

/// The outcome of one restriction or of a whole list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Permit,
    Dunno,
    /// The complete SMTP reply, e.g. `554 5.7.1 <a@b>: Relay access denied`.
    Reject(String),
}

/// What the restrictions look at.
#[derive(Debug, Clone)]
pub struct Request<'a> {
    pub client_addr: IpAddr,
    /// The envelope recipient in internal form.
    pub recipient: &'a str,
    /// Whether the client has authenticated with SASL (always false today).
    pub sasl_authenticated: bool,
}

/// The restriction lists and the tables they consult, read once at start.
#[derive(Debug, Clone)]
pub struct Restrictions {
    relay: Vec<String>,
    recipient: Vec<String>,
    mynetworks: CidrList,
    mydestination: Vec<String>,
    relay_domains: Vec<String>,
}

/// Restrictions that refuse mail by default; one of them must appear in
/// the relay or recipient restrictions, or Postfix refuses to start (an
/// open relay is too easy to build by mistake).
const RCPT_REQUIRED: [&str; 6] = [
    "reject_unauth_destination",
    "defer_unauth_destination",
    "reject",
    "defer",
    "defer_if_permit",
    "check_relay_domains",
];

/// Names and their places in a restriction list, with the comma/space
/// separation Postfix allows.
fn list(cfg: &Config, name: &str) -> Vec<String> {
    cfg.get_list(name)
        .into_iter()
        .map(|s| s.to_ascii_lowercase())
        .collect()
}

impl Restrictions {
    /// Reads `smtpd_relay_restrictions`, `smtpd_recipient_restrictions`,
    /// `mynetworks`, `mydestination`, `relay_domains`. An error is a
    /// configuration the server must not run with.
    pub fn from_config(cfg: &Config) -> Result<Restrictions, String> {
        let mynetworks =
            CidrList::parse(&cfg.get_list("mynetworks")).map_err(|e| format!("mynetworks: {e}"))?;
        Restrictions::new(
            list(cfg, "smtpd_relay_restrictions"),
            list(cfg, "smtpd_recipient_restrictions"),
            mynetworks,
            cfg.get_list("mydestination"),
            cfg.get_list("relay_domains"),
        )
    }

    pub fn new(
        relay: Vec<String>,
        recipient: Vec<String>,
        mynetworks: CidrList,
        mydestination: Vec<String>,
        relay_domains: Vec<String>,
    ) -> Result<Restrictions, String> {
        let has_required = |l: &[String]| l.iter().any(|r| RCPT_REQUIRED.contains(&r.as_str()));
        if !has_required(&relay) && !has_required(&recipient) {
            return Err(format!(
                "in parameter smtpd_relay_restrictions or smtpd_recipient_restrictions, \
                 specify at least one working instance of: {}",
                "reject_unauth_destination, defer_unauth_destination, reject, defer, \
                 defer_if_permit or check_relay_domains"
            ));
        }
        Ok(Restrictions {
            relay,
            recipient,
            mynetworks,
            mydestination,
            relay_domains,
        })
    }

    /// Whether the client is in `mynetworks`.
    pub fn in_mynetworks(&self, ip: IpAddr) -> bool {
        self.mynetworks.matches(ip)
    }

    /// The checks of RCPT TO (and VRFY): `None` accepts, `Some(reply)`
    /// refuses. The bare name `postmaster` is always accepted (RFC 5321
    /// section 4.5.1).
    pub fn check_recipient(&self, req: &Request<'_>) -> Option<String> {
        if req.recipient.eq_ignore_ascii_case("postmaster") {
            return None;
        }
        for l in [&self.relay, &self.recipient] {
            if let Verdict::Reject(reply) = self.eval_list(l, req) {
                return Some(reply);
            }
        }
        None
    }

    /// Evaluates one list: the first Permit or Reject decides.
    pub fn eval_list(&self, list: &[String], req: &Request<'_>) -> Verdict {
        for (i, name) in list.iter().enumerate() {
            let v = self.eval_one(name, req);
            if v != Verdict::Dunno {
                if let Some(next) = list.get(i + 1) {
                    if matches!(name.as_str(), "permit" | "reject" | "defer") {
                        warning!("restriction `{next}' after `{name}' is ignored");
                    }
                }
                return v;
            }
        }
        Verdict::Dunno
    }

    fn eval_one(&self, name: &str, req: &Request<'_>) -> Verdict {
        let rcpt = req.recipient;
        match name {
            "permit" => Verdict::Permit,
            "reject" => Verdict::Reject(format!(
                "554 5.7.1 <{rcpt}>: Recipient address rejected: Access denied"
            )),
            "defer" => Verdict::Reject(format!(
                "450 4.3.2 <{rcpt}>: Recipient address rejected: Try again later"
            )),
            "permit_mynetworks" => {
                if self.in_mynetworks(req.client_addr) {
                    Verdict::Permit
                } else {
                    Verdict::Dunno
                }
            }
            "permit_sasl_authenticated" => {
                if req.sasl_authenticated {
                    Verdict::Permit
                } else {
                    Verdict::Dunno
                }
            }
            "permit_auth_destination" => {
                if self.auth_destination(rcpt) {
                    Verdict::Permit
                } else {
                    Verdict::Dunno
                }
            }
            "reject_unauth_destination" => self.unauth_destination(rcpt, "554 5.7.1"),
            "defer_unauth_destination" => self.unauth_destination(rcpt, "454 4.7.1"),
            _ => {
                warning!("unknown smtpd restriction: \"{name}\"");
                Verdict::Reject("451 4.3.5 Server configuration error".into())
            }
        }
    }

    fn unauth_destination(&self, rcpt: &str, code: &str) -> Verdict {
        if self.auth_destination(rcpt) {
            Verdict::Dunno
        } else {
            Verdict::Reject(format!("{code} <{rcpt}>: Relay access denied"))
        }
    }

    /// Whether mail for `rcpt` is ours to take from anyone: its domain is
    /// local (`mydestination`; no domain at all means local) or one we
    /// relay for (`relay_domains`, subdomains included as Postfix's
    /// parent_domain_matches_subdomains does). An address with
    /// sender-specified routing in its local part (`a%b@local`,
    /// `b!a@local`, `a@b@local`) is not: Postfix's
    /// allow_untrusted_routing = no.
    pub fn auth_destination(&self, rcpt: &str) -> bool {
        let (local, domain) = addr::split(rcpt);
        if local.contains(['@', '%', '!']) {
            return false;
        }
        let Some(_) = domain else {
            return true;
        };
        let domain = addr::domain(rcpt);
        if addr::domain_in_list(&domain, &self.mydestination) {
            return true;
        }
        if addr::domain_in_list(&domain, &self.relay_domains) {
            return true;
        }
        // A plain `example.com` in relay_domains also covers its subdomains.
        let mut d = domain.as_str();
        while let Some((_, parent)) = d.split_once('.') {
            if self
                .relay_domains
                .iter()
                .any(|r| r.trim_end_matches('.').eq_ignore_ascii_case(parent))
            {
                return true;
            }
            d = parent;
        }
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(relay: &str, rcpt: &str) -> Restrictions {
        let split = |s: &str| postern_conf::split_list(s);
        Restrictions::new(
            split(relay),
            split(rcpt),
            CidrList::parse(&["127.0.0.0/8", "[::1]/128"]).unwrap(),
            split("mx.example, localhost"),
            split("relay.example"),
        )
        .unwrap()
    }

    fn req(ip: &str, rcpt: &'static str) -> Request<'static> {
        Request {
            client_addr: ip.parse().unwrap(),
            recipient: rcpt,
            sasl_authenticated: false,
        }
    }

    const DEFAULT: &str = "permit_mynetworks, permit_sasl_authenticated, reject_unauth_destination";

    #[test]
    fn relay_control() {
        let p = r(DEFAULT, "");
        assert_eq!(p.check_recipient(&req("127.0.0.1", "a@far.example")), None);
        assert_eq!(
            p.check_recipient(&req("::ffff:127.0.0.1", "a@far.example")),
            None
        );
        assert_eq!(
            p.check_recipient(&req("192.0.2.1", "a@far.example"))
                .as_deref(),
            Some("554 5.7.1 <a@far.example>: Relay access denied")
        );
        assert_eq!(p.check_recipient(&req("192.0.2.1", "a@MX.example.")), None);
        assert_eq!(
            p.check_recipient(&req("192.0.2.1", "a@relay.example")),
            None
        );
        assert_eq!(
            p.check_recipient(&req("192.0.2.1", "a@sub.relay.example")),
            None
        );
        assert_eq!(p.check_recipient(&req("192.0.2.1", "user")), None);
        assert_eq!(p.check_recipient(&req("192.0.2.1", "Postmaster")), None);
        assert!(p
            .check_recipient(&req("192.0.2.1", "a%far.example@mx.example"))
            .is_some());
        assert!(p
            .check_recipient(&req("192.0.2.1", "far!a@mx.example"))
            .is_some());
        assert!(p
            .check_recipient(&req("192.0.2.1", "a@notrelay.example"))
            .is_some());
    }

    #[test]
    fn other_restrictions() {
        let p = r("permit_mynetworks defer_unauth_destination", "");
        assert_eq!(
            p.check_recipient(&req("192.0.2.1", "a@far.example"))
                .as_deref(),
            Some("454 4.7.1 <a@far.example>: Relay access denied")
        );
        // Relay restrictions permit; recipient restrictions still apply.
        let p = r(DEFAULT, "reject");
        assert_eq!(
            p.check_recipient(&req("127.0.0.1", "a@mx.example"))
                .as_deref(),
            Some("554 5.7.1 <a@mx.example>: Recipient address rejected: Access denied")
        );
        let p = r(DEFAULT, "permit_auth_destination, defer");
        assert_eq!(p.check_recipient(&req("127.0.0.1", "a@mx.example")), None);
        assert_eq!(
            p.check_recipient(&req("127.0.0.1", "a@far.example"))
                .as_deref(),
            Some("450 4.3.2 <a@far.example>: Recipient address rejected: Try again later")
        );
        let p = r(DEFAULT, "no_such_thing");
        assert_eq!(
            p.check_recipient(&req("127.0.0.1", "a@mx.example"))
                .as_deref(),
            Some("451 4.3.5 Server configuration error")
        );
        let p = r("permit_sasl_authenticated reject_unauth_destination", "");
        assert!(p
            .check_recipient(&req("127.0.0.1", "a@far.example"))
            .is_some());
    }

    #[test]
    fn open_relay_refused() {
        let split = |s: &str| postern_conf::split_list(s);
        let e = Restrictions::new(
            split("permit_mynetworks"),
            split("permit_auth_destination"),
            CidrList::default(),
            vec![],
            vec![],
        )
        .unwrap_err();
        assert!(e.contains("specify at least one working instance"), "{e}");
    }
}
