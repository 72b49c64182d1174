//! Access restrictions: Postfix's `smtpd_*_restrictions` language.
//!
//! A restriction list is a sequence of names, some followed by an
//! argument (`check_sender_access hash:/etc/postern/access`), evaluated in
//! order; each one answers [`Verdict::Permit`] (stop: this list accepts),
//! [`Verdict::Reject`] (stop: refuse with an SMTP reply) or
//! [`Verdict::Dunno`] (no opinion: go on). A list that runs out accepts.
//!
//! There is one list per stage ([`Stage`]): client, HELO, sender,
//! recipient (`smtpd_relay_restrictions` then
//! `smtpd_recipient_restrictions`) and DATA. A permit ends only its own
//! list; a reject anywhere refuses. With `smtpd_delay_reject = yes` (the
//! default) the client, HELO and sender lists are evaluated at each RCPT
//! TO, before the recipient lists, so that the log shows whom the mail
//! was for; with `no` each at its own command (the client's at connect).
//!
//! Restrictions: `permit`, `reject`, `defer`, `permit_mynetworks`,
//! `permit_sasl_authenticated`, `permit_auth_destination`,
//! `reject_unauth_destination`, `defer_unauth_destination`,
//! `reject_non_fqdn_sender`, `reject_non_fqdn_recipient`,
//! `reject_non_fqdn_helo_hostname`, `reject_invalid_helo_hostname`,
//! `reject_unauth_pipelining`, `reject_unlisted_recipient`,
//! `reject_unlisted_sender`, `reject_sender_login_mismatch` and its
//! `authenticated`/`unauthenticated` halves (with
//! `smtpd_sender_login_maps`), and `check_client_access`,
//! `check_helo_access`, `check_sender_access`, `check_recipient_access`
//! with a lookup table whose results are Postfix's access(5) actions
//! (`OK`, `REJECT [text]`, `DEFER [text]`, `DUNNO`, `4NN text`,
//! `5NN text`, or a restriction name), and the DNS ones
//! `reject_unknown_sender_domain`, `reject_unknown_recipient_domain` and
//! `reject_rbl_client`, which read answers the session fetched first
//! ([`Restrictions::dns_needed`], [`crate::dns`]). Any other name is a configuration
//! error: logged, and the request gets `451 4.3.5 Server configuration
//! error`, as Postfix does.

use crate::dns::{self, Answer, NameStatus, Query};
use postern_common::addr;
use postern_common::cidr::CidrList;
use postern_common::hostname;
use postern_common::maps::{Table, Tables};
use postern_common::resolve::{Class, Resolved, Resolver};
use postern_common::{info, warning};
use postern_conf::Config;
use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;

/// The outcome of one restriction or of a whole list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Permit,
    Dunno,
    /// The complete SMTP reply, e.g. `554 5.7.1 <a@b>: Relay access denied`.
    Reject(String),
}

/// Where in the dialogue a list applies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    Client,
    Helo,
    Sender,
    Recipient,
    Data,
}

/// What the restrictions look at.
#[derive(Debug, Clone, Default)]
pub struct Request<'a> {
    pub client_addr: Option<IpAddr>,
    /// The client's verified host name (`unknown` without one).
    pub client_name: &'a str,
    /// Its PTR name, verified or not (`unknown` without one).
    pub client_reverse_name: &'a str,
    pub name_status: NameStatus,
    pub reverse_status: NameStatus,
    pub helo: Option<&'a str>,
    /// The envelope sender (None before MAIL; Some("") for `<>`).
    pub sender: Option<&'a str>,
    /// The envelope recipient in internal form (at RCPT TO).
    pub recipient: Option<&'a str>,
    /// The SASL login, when the client has authenticated.
    pub sasl_username: Option<&'a str>,
    /// The client said EHLO.
    pub esmtp: bool,
    /// More input was waiting behind the current command.
    pub pipelined: bool,
    /// The command being checked (`RCPT`, `DATA`, ...), for replies.
    pub command: &'a str,
    /// DNS answers the session has (see [`Restrictions::dns_needed`]).
    pub dns: Option<&'a HashMap<Query, Answer>>,
}

impl Request<'_> {
    fn ip(&self) -> IpAddr {
        self.client_addr
            .unwrap_or(IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED))
    }
}

/// One item of a list: a name and, for those that take one, its argument.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Item {
    pub name: String,
    pub arg: Option<String>,
}

/// Restrictions whose next list element is their argument.
const TAKES_ARG: [&str; 5] = [
    "reject_rbl_client",
    "check_client_access",
    "check_helo_access",
    "check_sender_access",
    "check_recipient_access",
];

/// Parses a list value into items.
pub fn parse_list(words: &[String]) -> Vec<Item> {
    let mut out = Vec::new();
    let mut it = words.iter();
    while let Some(w) = it.next() {
        let name = w.to_ascii_lowercase();
        let arg = if TAKES_ARG.contains(&name.as_str()) {
            it.next().cloned()
        } else {
            None
        };
        out.push(Item { name, arg });
    }
    out
}

/// The restriction lists and the tables they consult, read once at start.
#[derive(Debug, Clone, Default)]
pub struct Restrictions {
    client: Vec<Item>,
    helo: Vec<Item>,
    sender: Vec<Item>,
    relay: Vec<Item>,
    recipient: Vec<Item>,
    data: Vec<Item>,
    pub delay_reject: bool,
    /// `smtpd_reject_unlisted_recipient`.
    reject_unlisted: bool,
    /// `unknown_client_hostname_reject_code`: a client without a
    /// (verified) name.
    unknown_client_code: u16,
    /// `unknown_hostname_reject_code`: a HELO name without records.
    unknown_hostname_code: u16,
    mynetworks: CidrList,
    /// Address classes and recipient tables: the one resolver.
    resolver: Option<Arc<Resolver>>,
    /// Access tables named in the lists, opened at start (Err: why not).
    tables: HashMap<String, Result<Table, String>>,
    sender_login_maps: Option<Tables>,
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

fn list(cfg: &Config, name: &str) -> Vec<Item> {
    parse_list(&cfg.get_list(name))
}

/// A `*_reject_code` parameter: a 4xx or 5xx reply code.
fn reject_code(cfg: &Config, name: &str) -> Result<u16, String> {
    let v = cfg.get(name);
    match v.trim().parse::<u16>() {
        Ok(c) if (400..600).contains(&c) => Ok(c),
        _ => Err(format!(
            "{name}: expected a 4xx or 5xx reply code, not \"{v}\""
        )),
    }
}

/// The enhanced status code for reply `code` with detail `.x.y`.
fn dsn_for(code: u16, detail: &str) -> String {
    format!("{}{detail}", if code < 500 { '4' } else { '5' })
}

impl Restrictions {
    /// Reads the `smtpd_*_restrictions` lists and what they consult. An
    /// error is a configuration the server must not run with.
    pub fn from_config(cfg: &Config) -> Result<Restrictions, String> {
        let mynetworks =
            CidrList::parse(&cfg.get_list("mynetworks")).map_err(|e| format!("mynetworks: {e}"))?;
        let mut r = Restrictions::with_resolver(
            list(cfg, "smtpd_relay_restrictions"),
            list(cfg, "smtpd_recipient_restrictions"),
            mynetworks,
            Resolver::with_recipient_checks(cfg),
        )?;
        for name in postern_common::resolve::RECIPIENT_CODES {
            reject_code(cfg, name)?;
        }
        r.client = list(cfg, "smtpd_client_restrictions");
        r.helo = list(cfg, "smtpd_helo_restrictions");
        r.sender = list(cfg, "smtpd_sender_restrictions");
        r.data = list(cfg, "smtpd_data_restrictions");
        r.delay_reject = cfg
            .get_bool("smtpd_delay_reject")
            .map_err(|e| e.to_string())?;
        r.reject_unlisted = cfg
            .get_bool("smtpd_reject_unlisted_recipient")
            .map_err(|e| e.to_string())?;
        r.unknown_client_code = reject_code(cfg, "unknown_client_hostname_reject_code")?;
        r.unknown_hostname_code = reject_code(cfg, "unknown_hostname_reject_code")?;
        r.open_tables();
        let logins = cfg.get("smtpd_sender_login_maps");
        if !logins.trim().is_empty() {
            let (t, errors) = Tables::open_list(&logins);
            for e in &errors {
                warning!("smtpd_sender_login_maps: {e}");
            }
            r.sender_login_maps = Some(t);
        }
        Ok(r)
    }

    /// Lists built by hand, with a resolver that knows only these local
    /// and relay domains (tests).
    pub fn new(
        relay: Vec<Item>,
        recipient: Vec<Item>,
        mynetworks: CidrList,
        mydestination: Vec<String>,
        relay_domains: Vec<String>,
    ) -> Result<Restrictions, String> {
        let text = format!(
            "myhostname = {}\nmydestination = {}\nrelay_domains = {}\nlocal_recipient_maps =\n",
            mydestination
                .first()
                .map(String::as_str)
                .unwrap_or("localhost"),
            mydestination.join(", "),
            relay_domains.join(", ")
        );
        let cfg = Config::from_text(
            std::path::Path::new("/nonexistent"),
            &text,
            std::path::Path::new("main.cf"),
        )
        .map_err(|e| e.to_string())?;
        Self::with_resolver(relay, recipient, mynetworks, Resolver::new(&cfg))
    }

    fn with_resolver(
        relay: Vec<Item>,
        recipient: Vec<Item>,
        mynetworks: CidrList,
        resolver: Resolver,
    ) -> Result<Restrictions, String> {
        let has_required = |l: &[Item]| l.iter().any(|r| RCPT_REQUIRED.contains(&r.name.as_str()));
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
            resolver: Some(Arc::new(resolver)),
            delay_reject: true,
            unknown_client_code: 450,
            unknown_hostname_code: 450,
            ..Default::default()
        })
    }

    /// Sets a stage's list (tests, and lists built by hand).
    #[cfg(test)]
    pub fn set_list(&mut self, stage: Stage, items: Vec<Item>) {
        match stage {
            Stage::Client => self.client = items,
            Stage::Helo => self.helo = items,
            Stage::Sender => self.sender = items,
            Stage::Recipient => self.recipient = items,
            Stage::Data => self.data = items,
        }
        self.open_tables();
    }

    fn open_tables(&mut self) {
        let all = [
            &self.client,
            &self.helo,
            &self.sender,
            &self.relay,
            &self.recipient,
            &self.data,
        ];
        let specs: Vec<String> = all
            .iter()
            .flat_map(|l| l.iter())
            .filter_map(|i| i.arg.clone())
            .collect();
        for spec in specs {
            if self.tables.contains_key(&spec) {
                continue;
            }
            let t = Table::open(&spec);
            if let Err(e) = &t {
                warning!("{e}");
            }
            self.tables.insert(spec, t);
        }
    }

    /// Whether the client is in `mynetworks`.
    pub fn in_mynetworks(&self, ip: IpAddr) -> bool {
        self.mynetworks.matches(ip)
    }

    /// The checks at connect (only with smtpd_delay_reject = no).
    pub fn check_connect(&self, req: &Request<'_>) -> Option<String> {
        if self.delay_reject {
            return None;
        }
        self.reject_of(Stage::Client, req)
    }

    /// The checks of HELO/EHLO (only with smtpd_delay_reject = no).
    pub fn check_helo(&self, req: &Request<'_>) -> Option<String> {
        if self.delay_reject {
            return None;
        }
        self.reject_of(Stage::Helo, req)
    }

    /// The checks of MAIL FROM (only with smtpd_delay_reject = no).
    pub fn check_sender(&self, req: &Request<'_>) -> Option<String> {
        if self.delay_reject {
            return None;
        }
        self.reject_of(Stage::Sender, req)
    }

    /// The checks of RCPT TO (and VRFY): `None` accepts, `Some(reply)`
    /// refuses. The bare name `postmaster` is always accepted (RFC 5321
    /// section 4.5.1).
    pub fn check_recipient(&self, req: &Request<'_>) -> Option<String> {
        let rcpt = req.recipient.unwrap_or_default();
        // Postfix's smtpd_check_addr(), before any restriction: an
        // address the resolver cannot use (a bad domain or address
        // literal, a local part starting with `-`).
        if self.resolved(rcpt).is_some_and(|r| r.bad_syntax) {
            return Some("501 5.1.3 Bad recipient address syntax".into());
        }
        if rcpt.eq_ignore_ascii_case("postmaster") {
            return None;
        }
        if self.delay_reject {
            for stage in [Stage::Client, Stage::Helo, Stage::Sender] {
                if let Some(r) = self.reject_of(stage, req) {
                    return Some(r);
                }
            }
        }
        for l in [&self.relay, &self.recipient] {
            if let Verdict::Reject(reply) = self.eval_list(l, Stage::Recipient, req) {
                return Some(reply);
            }
        }
        if self.reject_unlisted {
            if let Verdict::Reject(r) = self.unlisted(rcpt, req.sender, "Recipient address") {
                return Some(r);
            }
        }
        None
    }

    /// The DNS facts the checks of `stage` will look at for `req`: at
    /// RCPT TO ([`Stage::Recipient`]) the relay and recipient lists', and
    /// with `smtpd_delay_reject = yes` the client, HELO and sender lists'
    /// too; with `no`, each of those at its own stage (connect, HELO/EHLO,
    /// MAIL FROM). The session fetches them before it runs the check.
    pub fn dns_needed(&self, stage: Stage, req: &Request<'_>) -> Vec<Query> {
        let mut lists: Vec<&Vec<Item>> = Vec::new();
        match stage {
            Stage::Recipient => {
                lists.extend([&self.relay, &self.recipient]);
                if self.delay_reject {
                    lists.extend([&self.client, &self.helo, &self.sender]);
                }
            }
            Stage::Client if !self.delay_reject => lists.push(&self.client),
            Stage::Helo if !self.delay_reject => lists.push(&self.helo),
            Stage::Sender if !self.delay_reject => lists.push(&self.sender),
            _ => {}
        }
        let mut out = Vec::new();
        for item in lists.into_iter().flatten() {
            let q = match item.name.as_str() {
                "reject_unknown_sender_domain" => req
                    .sender
                    .filter(|s| !s.is_empty())
                    .map(|s| Query::Domain(addr::domain(s))),
                "reject_unknown_recipient_domain" => req
                    .recipient
                    .filter(|r| !self.final_destination(r))
                    .map(|r| Query::Domain(addr::domain(r))),
                "reject_rbl_client" => item.arg.as_ref().map(|a| {
                    let domain = a.split_once('=').map(|(d, _)| d).unwrap_or(a);
                    Query::Rbl(dns::rbl_name(req.ip(), domain))
                }),
                "reject_unknown_helo_hostname" => req
                    .helo
                    .filter(|h| !is_address_literal(h))
                    .map(|h| Query::Domain(h.trim_end_matches('.').to_ascii_lowercase())),
                _ => None,
            };
            if let Some(q) = q {
                if !matches!(&q, Query::Domain(d) if d.is_empty()) && !out.contains(&q) {
                    out.push(q);
                }
            }
        }
        out
    }

    /// Mail for `rcpt` ends here (local, virtual alias or virtual
    /// mailbox class).
    fn final_destination(&self, rcpt: &str) -> bool {
        self.resolved(rcpt).is_some_and(|r| r.class.is_final())
    }

    fn resolved(&self, rcpt: &str) -> Option<Resolved> {
        self.resolver.as_ref()?.resolve(None, rcpt).ok()
    }

    fn dns_answer<'b>(req: &'b Request<'_>, q: &Query) -> Option<&'b Answer> {
        req.dns.and_then(|m| m.get(q))
    }

    /// The checks of DATA.
    pub fn check_data(&self, req: &Request<'_>) -> Option<String> {
        self.reject_of(Stage::Data, req)
    }

    fn reject_of(&self, stage: Stage, req: &Request<'_>) -> Option<String> {
        let l = match stage {
            Stage::Client => &self.client,
            Stage::Helo => &self.helo,
            Stage::Sender => &self.sender,
            Stage::Recipient => &self.recipient,
            Stage::Data => &self.data,
        };
        match self.eval_list(l, stage, req) {
            Verdict::Reject(r) => Some(r),
            _ => None,
        }
    }

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
    fn subject(stage: Stage, req: &Request<'_>) -> (String, &'static str) {
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

    fn reject(stage: Stage, req: &Request<'_>, code: &str, dsn: &str, text: &str) -> Verdict {
        let (key, what) = Self::subject(stage, req);
        Verdict::Reject(format!("{code} {dsn} <{key}>: {what} rejected: {text}"))
    }

    fn eval_one(&self, item: &Item, stage: Stage, req: &Request<'_>) -> Verdict {
        let rcpt = req.recipient.unwrap_or_default();
        let flag = |b: bool| if b { Verdict::Permit } else { Verdict::Dunno };
        match item.name.as_str() {
            "permit" => Verdict::Permit,
            "reject" => Self::reject(stage, req, "554", "5.7.1", "Access denied"),
            "defer" => Self::reject(stage, req, "450", "4.7.1", "Try again later"),
            "permit_mynetworks" => flag(self.in_mynetworks(req.ip())),
            "permit_sasl_authenticated" => flag(req.sasl_username.is_some()),
            "permit_auth_destination" if req.recipient.is_some() => {
                flag(self.auth_destination(rcpt))
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
            "reject_non_fqdn_sender" => match req.sender {
                Some(s) if !s.is_empty() && !hostname::fqdn_domain(&addr::domain(s)) => {
                    Self::reject(
                        Stage::Sender,
                        req,
                        "504",
                        "5.5.2",
                        "need fully-qualified address",
                    )
                }
                _ => Verdict::Dunno,
            },
            "reject_non_fqdn_recipient" => match req.recipient {
                Some(r) if !hostname::fqdn_domain(&addr::domain(r)) => Self::reject(
                    Stage::Recipient,
                    req,
                    "504",
                    "5.5.2",
                    "need fully-qualified address",
                ),
                _ => Verdict::Dunno,
            },
            "reject_non_fqdn_helo_hostname" => match req.helo {
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
            },
            "reject_invalid_helo_hostname" => match req.helo {
                Some(h) if !hostname::valid_helo_name(h) => {
                    let text = if h.starts_with('[') {
                        "Invalid ip address"
                    } else {
                        "Invalid name"
                    };
                    Self::reject(Stage::Helo, req, "501", "5.5.2", text)
                }
                _ => Verdict::Dunno,
            },
            "reject_unauth_pipelining" => {
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
            "reject_unlisted_recipient" => match req.recipient {
                Some(r) => self.unlisted(r, req.sender, "Recipient address"),
                None => Verdict::Dunno,
            },
            "reject_unlisted_sender" => match req.sender {
                Some(s) if !s.is_empty() => self.unlisted(s, req.recipient, "Sender address"),
                _ => Verdict::Dunno,
            },
            "reject_unknown_sender_domain" => match req.sender {
                Some(s) if !s.is_empty() && !addr::domain(s).is_empty() => {
                    match Self::dns_answer(req, &Query::Domain(addr::domain(s))) {
                        Some(Answer::NotFound) | Some(Answer::TryAgain) => {
                            Self::reject(Stage::Sender, req, "450", "4.1.8", "Domain not found")
                        }
                        _ => Verdict::Dunno,
                    }
                }
                _ => Verdict::Dunno,
            },
            "reject_unknown_recipient_domain" => match req.recipient {
                Some(r) if !self.final_destination(r) => {
                    match Self::dns_answer(req, &Query::Domain(addr::domain(r))) {
                        Some(Answer::NotFound) | Some(Answer::TryAgain) => {
                            Self::reject(Stage::Recipient, req, "450", "4.1.2", "Domain not found")
                        }
                        _ => Verdict::Dunno,
                    }
                }
                _ => Verdict::Dunno,
            },
            "reject_unknown_client_hostname" | "reject_unknown_client" => {
                self.unknown_client(req, req.name_status, "hostname")
            }
            "reject_unknown_reverse_client_hostname" => {
                self.unknown_client(req, req.reverse_status, "reverse hostname")
            }
            "reject_unknown_helo_hostname" => match req.helo {
                Some(h) if !is_address_literal(h) => {
                    let q = Query::Domain(h.trim_end_matches('.').to_ascii_lowercase());
                    let code = match Self::dns_answer(req, &q) {
                        Some(Answer::NotFound) => self.unknown_hostname_code,
                        Some(Answer::TryAgain) => 450,
                        _ => return Verdict::Dunno,
                    };
                    let (code, dsn) = (code.to_string(), dsn_for(code, ".7.1"));
                    Self::reject(Stage::Helo, req, &code, &dsn, "Host not found")
                }
                _ => Verdict::Dunno,
            },
            "reject_rbl_client" => {
                let Some(arg) = &item.arg else {
                    warning!("restriction reject_rbl_client requires a DNS list domain");
                    return Verdict::Reject("451 4.3.5 Server configuration error".into());
                };
                let (domain, filter) = match arg.split_once('=') {
                    Some((d, f)) => (d, f.parse::<IpAddr>().ok()),
                    None => (arg.as_str(), None),
                };
                let q = Query::Rbl(dns::rbl_name(req.ip(), domain));
                match Self::dns_answer(req, &q) {
                    Some(Answer::Found(ips))
                        if filter.is_none_or(|f| ips.contains(&f)) =>
                    {
                        Verdict::Reject(format!(
                            "554 5.7.1 Service unavailable; Client host [{}] blocked using {domain}",
                            req.ip()
                        ))
                    }
                    _ => Verdict::Dunno,
                }
            }
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

    /// `reject_unknown_client_hostname` (`what` "hostname") and
    /// `reject_unknown_reverse_client_hostname` ("reverse hostname"),
    /// worded as Postfix's: a lookup that failed for now always defers.
    fn unknown_client(&self, req: &Request<'_>, status: NameStatus, what: &str) -> Verdict {
        let code = match status {
            NameStatus::Ok => return Verdict::Dunno,
            NameStatus::TryAgain => 450,
            NameStatus::NotFound => self.unknown_client_code,
        };
        Verdict::Reject(format!(
            "{code} {} Client host rejected: cannot find your {what}, [{}]",
            dsn_for(code, ".7.25"),
            req.ip()
        ))
    }

    // ------------------------------------------------------------ access maps

    fn check_access(&self, item: &Item, stage: Stage, req: &Request<'_>) -> Verdict {
        let Some(spec) = &item.arg else {
            warning!("restriction {} requires a table argument", item.name);
            return Verdict::Reject("451 4.3.5 Server configuration error".into());
        };
        let table = match self.tables.get(spec) {
            Some(Ok(t)) => t,
            _ => {
                warning!("{}: table {spec} is not available", item.name);
                return Verdict::Reject("451 4.3.5 Server configuration error".into());
            }
        };
        // The stage whose words a reject uses: the thing looked up.
        let (kind, keys) = match item.name.as_str() {
            "check_client_access" => (Stage::Client, client_keys(req.client_name, req.ip())),
            "check_helo_access" => match req.helo {
                Some(h) => (Stage::Helo, domain_keys(h)),
                None => return Verdict::Dunno,
            },
            "check_sender_access" => match req.sender {
                Some(s) => (Stage::Sender, address_keys(s)),
                None => return Verdict::Dunno,
            },
            _ => match req.recipient {
                Some(r) => (Stage::Recipient, address_keys(r)),
                None => return Verdict::Dunno,
            },
        };
        let _ = stage;
        for key in keys {
            if let Some(action) = table.lookup_expanded(&key) {
                return self.action(&action, kind, req, spec);
            }
        }
        Verdict::Dunno
    }

    /// An access(5) result.
    fn action(&self, action: &str, stage: Stage, req: &Request<'_>, spec: &str) -> Verdict {
        let action = action.trim();
        let (word, text) = match action.split_once(char::is_whitespace) {
            Some((w, t)) => (w, t.trim()),
            None => (action, ""),
        };
        let upper = word.to_ascii_uppercase();
        match upper.as_str() {
            "OK" => Verdict::Permit,
            "DUNNO" => Verdict::Dunno,
            "REJECT" => Self::reject(
                stage,
                req,
                "554",
                "5.7.1",
                if text.is_empty() {
                    "Access denied"
                } else {
                    text
                },
            ),
            "DEFER" | "DEFER_IF_PERMIT" | "DEFER_IF_REJECT" => Self::reject(
                stage,
                req,
                "450",
                "4.7.1",
                if text.is_empty() {
                    "Try again later"
                } else {
                    text
                },
            ),
            "WARN" | "INFO" => {
                let (key, what) = Self::subject(stage, req);
                info!(
                    "NOQUEUE: {}: {} from {}[{}]: <{key}>: {what} triggers {}: {text}",
                    upper.to_ascii_lowercase(),
                    req.command,
                    req.client_name,
                    req.ip(),
                    upper
                );
                Verdict::Dunno
            }
            _ if word.len() == 3 && word.bytes().all(|b| b.is_ascii_digit()) => {
                match word.as_bytes()[0] {
                    b'4' | b'5' => {
                        let class = word.as_bytes()[0] as char;
                        // An enhanced status code at the start of the text
                        // is used; else X.7.1.
                        let (dsn, rest) = match text.split_once(' ') {
                            Some((d, r)) if is_dsn(d, class) => (d.to_string(), r),
                            _ if is_dsn(text, class) => (text.to_string(), ""),
                            _ => (format!("{class}.7.1"), text),
                        };
                        let rest = if rest.is_empty() {
                            "Access denied"
                        } else {
                            rest
                        };
                        Self::reject(stage, req, word, &dsn, rest)
                    }
                    // All-numerical results are OK (Postfix's rule).
                    _ => Verdict::Permit,
                }
            }
            _ if !word.is_empty() && word.bytes().all(|b| b.is_ascii_digit()) => Verdict::Permit,
            _ => {
                let name = word.to_ascii_lowercase();
                if matches!(
                    name.as_str(),
                    "discard" | "hold" | "redirect" | "filter" | "prepend" | "bcc"
                ) {
                    warning!("access table {spec}: action {word} is not supported; ignored");
                    return Verdict::Dunno;
                }
                // A restriction name (permit_mynetworks, reject_..., ...).
                self.eval_one(
                    &Item {
                        name,
                        arg: (!text.is_empty()).then(|| text.to_string()),
                    },
                    stage,
                    req,
                )
            }
        }
    }

    // ------------------------------------------------------------ SASL owners

    fn login_mismatch(&self, req: &Request<'_>, authed: bool, unauthed: bool) -> Verdict {
        let Some(sender) = req.sender.filter(|s| !s.is_empty()) else {
            return Verdict::Dunno;
        };
        let Some(maps) = &self.sender_login_maps else {
            return Verdict::Dunno;
        };
        // Postfix looks up the address, then `@domain`.
        let keys = [
            sender.to_ascii_lowercase(),
            format!("@{}", addr::domain(sender)),
        ];
        let owners: Option<Vec<String>> = keys
            .iter()
            .find_map(|k| maps.lookup(k).map(|v| v.to_string()))
            .map(|v| {
                v.split([',', ' ', '\t'])
                    .filter(|s| !s.is_empty())
                    .map(|s| s.to_string())
                    .collect()
            });
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

    // ------------------------------------------------------------ destinations

    fn unauth_destination(&self, rcpt: &str, code: &str) -> Verdict {
        if self.auth_destination(rcpt) {
            Verdict::Dunno
        } else {
            Verdict::Reject(format!("{code} <{rcpt}>: Relay access denied"))
        }
    }

    /// Whether mail for `rcpt` is ours to take from anyone, as Postfix's
    /// permit_auth_destination: the resolver puts it in a final class
    /// (local, virtual alias, virtual mailbox) or in `relay_domains`
    /// (subdomains included through parent_domain_matches_subdomains),
    /// and its local part does not route further (`a%b@local`,
    /// `b!a@local`, `a@b@local`: allow_untrusted_routing = no).
    pub fn auth_destination(&self, rcpt: &str) -> bool {
        match self.resolved(rcpt) {
            Some(r) => !r.routed && (r.class.is_final() || r.class == Class::Relay),
            None => false,
        }
    }

    /// reject_unlisted_recipient / _sender: an address that no table of
    /// its class knows, as Postfix's smtpd checks it (see
    /// [`Resolver::check_listed`]).
    fn unlisted(&self, address: &str, sender: Option<&str>, what: &str) -> Verdict {
        let Some(resolver) = &self.resolver else {
            return Verdict::Dunno;
        };
        match resolver.check_listed(sender, address, what.starts_with("Sender")) {
            Ok(()) => Verdict::Dunno,
            Err(f) => Verdict::Reject(format!(
                "{} {} <{address}>: {what} rejected: {}",
                f.code, f.dsn, f.text
            )),
        }
    }
}

fn is_address_literal(h: &str) -> bool {
    h.starts_with('[') && h.ends_with(']')
}

fn is_dsn(d: &str, class: char) -> bool {
    d.starts_with(class)
        && d.split('.').count() == 3
        && d.split('.')
            .all(|p| !p.is_empty() && p.len() <= 3 && p.bytes().all(|b| b.is_ascii_digit()))
}

/// Keys for a host name: itself and its parent domains.
fn domain_keys(name: &str) -> Vec<String> {
    let name = name.trim_end_matches('.').to_ascii_lowercase();
    let mut out = vec![name.clone()];
    let mut d = name.as_str();
    while let Some((_, parent)) = d.split_once('.') {
        out.push(parent.to_string());
        d = parent;
    }
    out
}

/// Keys for an address, in access(5) order: the address, its domain and
/// parent domains, `user@`; `<>` for the null address.
fn address_keys(a: &str) -> Vec<String> {
    if a.is_empty() {
        return vec!["<>".into()];
    }
    let mut out = vec![a.to_ascii_lowercase()];
    let (local, domain) = addr::split(a);
    if let Some(d) = domain {
        out.extend(domain_keys(d));
    }
    out.push(format!("{}@", local.to_ascii_lowercase()));
    out
}

/// Keys for a client: host name and parents (if known), the address,
/// and for IPv4 its shorter prefixes (`1.2.3`, `1.2`, `1`).
fn client_keys(name: &str, ip: IpAddr) -> Vec<String> {
    let mut out = Vec::new();
    if name != "unknown" {
        out.extend(domain_keys(name));
    }
    out.push(ip.to_string());
    if let IpAddr::V4(v4) = ip {
        let o = v4.octets();
        out.push(format!("{}.{}.{}", o[0], o[1], o[2]));
        out.push(format!("{}.{}", o[0], o[1]));
        out.push(format!("{}", o[0]));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn items(s: &str) -> Vec<Item> {
        parse_list(&postern_conf::split_list(s))
    }

    fn r(relay: &str, rcpt: &str) -> Restrictions {
        Restrictions::new(
            items(relay),
            items(rcpt),
            CidrList::parse(&["127.0.0.0/8", "[::1]/128"]).unwrap(),
            postern_conf::split_list("mx.example, localhost"),
            postern_conf::split_list("relay.example"),
        )
        .unwrap()
    }

    fn req(ip: &str, rcpt: &'static str) -> Request<'static> {
        Request {
            client_addr: Some(ip.parse().unwrap()),
            client_name: "unknown",
            recipient: Some(rcpt),
            sender: Some("s@sender.example"),
            helo: Some("client.example"),
            esmtp: true,
            command: "RCPT",
            ..Default::default()
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
        let mut authed = req("192.0.2.1", "a@far.example");
        authed.sasl_username = Some("alice");
        assert_eq!(p.check_recipient(&authed), None);
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
            Some("450 4.7.1 <a@far.example>: Recipient address rejected: Try again later")
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
    fn stages_and_delay() {
        let mut p = r(DEFAULT, "");
        p.set_list(Stage::Client, items("permit_mynetworks, reject"));
        p.set_list(Stage::Sender, items("reject_non_fqdn_sender"));
        // Delayed: the client list refuses at RCPT, with the client words.
        assert_eq!(
            p.check_recipient(&req("192.0.2.1", "a@mx.example"))
                .as_deref(),
            Some("554 5.7.1 <unknown[192.0.2.1]>: Client host rejected: Access denied")
        );
        assert_eq!(p.check_connect(&req("192.0.2.1", "a@mx.example")), None);
        // A permit in the client list does not skip the sender list.
        let mut q = req("127.0.0.1", "a@mx.example");
        q.sender = Some("joe@localhost");
        assert_eq!(
            p.check_recipient(&q).as_deref(),
            Some(
                "504 5.5.2 <joe@localhost>: Sender address rejected: need fully-qualified address"
            )
        );
        q.sender = Some("");
        assert_eq!(p.check_recipient(&q), None);
        p.delay_reject = false;
        assert!(p.check_connect(&req("192.0.2.1", "x")).is_some());
        assert!(p.check_sender(&q).is_none());
    }

    #[test]
    fn helo_and_fqdn_checks() {
        let mut p = r(DEFAULT, "reject_non_fqdn_recipient");
        p.set_list(
            Stage::Helo,
            items("reject_invalid_helo_hostname, reject_non_fqdn_helo_hostname"),
        );
        let mut q = req("127.0.0.1", "a@mx.example");
        assert_eq!(p.check_recipient(&q), None);
        q.helo = Some("bad..name");
        assert_eq!(
            p.check_recipient(&q).as_deref(),
            Some("501 5.5.2 <bad..name>: Helo command rejected: Invalid name")
        );
        q.helo = Some("localhost");
        assert_eq!(
            p.check_recipient(&q).as_deref(),
            Some("504 5.5.2 <localhost>: Helo command rejected: need fully-qualified hostname")
        );
        q.helo = Some("[127.0.0.1]");
        assert_eq!(p.check_recipient(&q), None);
        q.recipient = Some("user");
        assert_eq!(
            p.check_recipient(&q).as_deref(),
            Some("504 5.5.2 <user>: Recipient address rejected: need fully-qualified address")
        );
    }

    #[test]
    fn pipelining() {
        let mut p = r(DEFAULT, "");
        p.set_list(Stage::Data, items("reject_unauth_pipelining"));
        let mut q = req("127.0.0.1", "a@mx.example");
        q.command = "DATA";
        q.recipient = None;
        assert_eq!(p.check_data(&q), None);
        q.pipelined = true;
        assert_eq!(
            p.check_data(&q).as_deref(),
            Some(
                "503 5.5.0 <DATA>: Data command rejected: Improper use of SMTP command pipelining"
            )
        );
    }

    #[test]
    fn access_actions() {
        let dir = std::env::temp_dir().join(format!("postern-access-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let cidr = dir.join("clients.cidr");
        std::fs::write(
            &cidr,
            "# comment\n192.0.2.0/24 REJECT go away\n198.51.100.7 OK\n203.0.113.0/24 450 4.7.25 later\n",
        )
        .unwrap();
        let senders = dir.join("senders");
        std::fs::write(
            &senders,
            "spam.example REJECT\nfriend@spam.example OK\n<> 550 5.7.1 no bounces here\nwarn.example DUNNO\nrestr.example reject_non_fqdn_recipient\nbad@ 553 bad local part\n",
        )
        .unwrap();
        let mut p = r(DEFAULT, "");
        p.set_list(
            Stage::Client,
            items(&format!("check_client_access cidr:{}", cidr.display())),
        );
        p.set_list(
            Stage::Sender,
            items(&format!(
                "check_sender_access texthash:{}",
                senders.display()
            )),
        );
        let q = req("192.0.2.9", "a@mx.example");
        assert_eq!(
            p.check_recipient(&q).as_deref(),
            Some("554 5.7.1 <unknown[192.0.2.9]>: Client host rejected: go away")
        );
        let q = req("203.0.113.1", "a@mx.example");
        assert_eq!(
            p.check_recipient(&q).as_deref(),
            Some("450 4.7.25 <unknown[203.0.113.1]>: Client host rejected: later")
        );
        // OK in the client list; the sender list still runs.
        let mut q = req("198.51.100.7", "a@far.example");
        q.sender = Some("x@sub.spam.example");
        assert_eq!(
            p.check_recipient(&q).as_deref(),
            Some("554 5.7.1 <x@sub.spam.example>: Sender address rejected: Access denied")
        );
        q.sender = Some("friend@spam.example");
        // OK in the sender list does not open the relay.
        assert_eq!(
            p.check_recipient(&q).as_deref(),
            Some("554 5.7.1 <a@far.example>: Relay access denied")
        );
        q.sender = Some("");
        assert_eq!(
            p.check_recipient(&q).as_deref(),
            Some("550 5.7.1 <>: Sender address rejected: no bounces here")
        );
        q.sender = Some("bad@anything.example");
        assert_eq!(
            p.check_recipient(&q).as_deref(),
            Some("553 5.7.1 <bad@anything.example>: Sender address rejected: bad local part")
        );
        q.sender = Some("a@restr.example");
        q.recipient = Some("user");
        assert!(p
            .check_recipient(&q)
            .unwrap()
            .starts_with("504 5.5.2 <user>: Recipient address rejected"));
        // A table that cannot be opened is a configuration error.
        p.set_list(Stage::Helo, items("check_helo_access hash:/nonexistent/x"));
        assert_eq!(
            p.check_recipient(&req("127.0.0.1", "a@mx.example"))
                .as_deref(),
            Some("451 4.3.5 Server configuration error")
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn sender_login_mismatch() {
        let mut p = r(DEFAULT, "");
        p.sender_login_maps = Some(Tables(vec![Table::open(
            "inline:{ alice@example.test=alice@example.test, @shared.example=alice@example.test bob@example.test }",
        )
        .unwrap()]));
        p.set_list(Stage::Sender, items("reject_sender_login_mismatch"));
        let mut q = req("127.0.0.1", "a@mx.example");
        q.sender = Some("alice@example.test");
        assert_eq!(
            p.check_recipient(&q).as_deref(),
            Some("553 5.7.1 <alice@example.test>: Sender address rejected: not logged in")
        );
        q.sasl_username = Some("alice@example.test");
        assert_eq!(p.check_recipient(&q), None);
        q.sasl_username = Some("bob@example.test");
        assert_eq!(
            p.check_recipient(&q).as_deref(),
            Some("553 5.7.1 <alice@example.test>: Sender address rejected: not owned by user bob@example.test")
        );
        q.sender = Some("anyone@shared.example");
        assert_eq!(p.check_recipient(&q), None);
        q.sender = Some("someone@else.example");
        assert!(p.check_recipient(&q).is_some());
        q.sasl_username = None;
        assert_eq!(p.check_recipient(&q), None);
    }

    #[test]
    fn keys() {
        assert_eq!(
            address_keys("U@Sub.Example.COM"),
            [
                "u@sub.example.com",
                "sub.example.com",
                "example.com",
                "com",
                "u@"
            ]
        );
        assert_eq!(address_keys(""), ["<>"]);
        assert_eq!(
            client_keys("unknown", "192.0.2.1".parse().unwrap()),
            ["192.0.2.1", "192.0.2", "192.0", "192"]
        );
        assert!(is_dsn("5.7.25", '5'));
        assert!(!is_dsn("4.7.1", '5'));
    }

    #[test]
    fn open_relay_refused() {
        let e = Restrictions::new(
            items("permit_mynetworks"),
            items("permit_auth_destination"),
            CidrList::default(),
            vec![],
            vec![],
        )
        .unwrap_err();
        assert!(e.contains("specify at least one working instance"), "{e}");
    }
}
