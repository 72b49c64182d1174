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
//! `smtpd_recipient_restrictions`), DATA and ETRN
//! (`smtpd_etrn_restrictions`, the ETRN domain their subject, looked up
//! by `check_etrn_access`). A permit ends only its own
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
//! `reject_rbl_client`, `permit_dnswl_client`, `reject_rhsbl_*` and
//! `permit_rhswl_client`, which read answers the session fetched first
//! ([`Restrictions::dns_needed`], [`crate::dns`]);
//! `reject_unverified_recipient` and `reject_unverified_sender`, with the
//! verify service's answer (`unverified`); `check_sasl_access`,
//! `warn_if_reject`, and the lists of `smtpd_restriction_classes` by
//! name. Every list is parsed at start by `postern_common::restriction`
//! (the grammar `postern check` uses too): an unknown name, a missing
//! argument or a restriction Postern does not carry out stops smtpd at
//! start, never a run-time reply. Only a restriction named by an access
//! table's answer is met at run time; an unknown one there answers `451
//! 4.3.5 Server configuration error`, as Postfix does.
//!
//! Here: the types, the lists read from the configuration and the
//! checks the session calls at each stage. Beside it:
//! - `eval`: evaluating a list, one restriction after the other, and
//!   the wording of replies;
//! - `checks`: the client, HELO, sender and recipient checks that need
//!   no lookup (FQDN and syntax, pipelining, relay control, unlisted
//!   addresses, sender login maps);
//! - `dns_checks`: the checks that read DNS answers (unknown client,
//!   HELO, sender and recipient domains, RBLs), and which answers they
//!   need;
//! - `access`: `check_*_access` tables and their access(5) actions;
//! - `server_access`: `check_*_{a,mx,ns}_access`,
//!   `check_reverse_client_hostname_access` and `permit_mx_backup`;
//! - `defer_flags`: `defer_if_permit` and `defer_if_reject`;
//! - `unverified`: `reject_unverified_recipient` and
//!   `reject_unverified_sender`, with the verify(8) service's answer
//!   (asked when a list gets to them: [`Request::verify`]).
//!
//! Also carried out: `reject_plaintext_session`, `permit_inet_interfaces`,
//! `check_relay_domains`, `reject_multi_recipient_bounce`,
//! `reject_known_sender_login_mismatch` (in `checks`), `sleep` (a
//! [`Pause`] the session takes) and `smtpd_end_of_data_restrictions`.

mod access;
mod checks;
mod defer_flags;
pub use defer_flags::Defers;
mod dns_checks;
mod eval;
mod policy_service;
mod server_access;
#[cfg(test)]
mod tests;
mod unverified;

use crate::dns::{Answer, NameStatus, Query};
use postern_common::maps::{Table, Tables};
use postern_common::match_list::{Kind, MatchList};
use postern_common::resolve::{Resolved, Resolver};
use postern_common::restriction;
use postern_common::warning;
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
    /// ETRN (`smtpd_etrn_restrictions`): the subject is the ETRN domain.
    Etrn,
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
    /// The domain of an ETRN command (at ETRN only).
    pub etrn_domain: Option<&'a str>,
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
    /// Where an access table's FILTER action puts its `transport:nexthop`
    /// (the message's content filter; the last one wins).
    pub filter: Option<&'a std::cell::RefCell<Option<String>>>,
    /// Where an access table's or policy server's PREPEND action puts its
    /// header (`name: value`), added above the Received header.
    pub prepend: Option<&'a std::cell::RefCell<Vec<String>>>,
    /// What a policy server is told beyond the fields above, as the
    /// session knows it (`queue_id`, `instance`, `size`, `encryption_*`,
    /// ...; see `policy_service`); empty unless a list has
    /// `check_policy_service`.
    pub session_attrs: Vec<(&'static str, String)>,
    /// The session is encrypted (STARTTLS or wrapper mode).
    pub tls: bool,
    /// Recipients accepted so far in this transaction.
    pub rcpt_count: usize,
    /// defer_if_permit and defer_if_reject raised by the lists evaluated
    /// so far (set by the check that evaluates them).
    pub defers: Option<&'a defer_flags::Defers>,
    /// Who a reply names instead of the stage's subject (Postfix's
    /// "Unverified Client host" for the reverse client name checks).
    pub reply_subject: Option<(&'a str, &'static str)>,
    /// Where `sleep SECONDS` asks the session to pause (None: sleep is a
    /// no-op).
    pub pause: Option<&'a Pause>,
    /// The client's TLS certificate, when it showed one
    /// (`smtpd_tls_ask_ccert`).
    pub client_cert: Option<&'a postern_common::tls_ccert::ClientCert>,
    /// Where `reject_unverified_*` names the address whose verify answer
    /// it needs and does not have yet: the lists stop, the session asks
    /// and runs the command again (None: no asking; such a check has no
    /// opinion).
    pub verify: Option<&'a std::cell::RefCell<Option<String>>>,
    /// Policy servers' answers in this command, by request: a command
    /// run again (after a verify answer or a `sleep`) does not ask the
    /// same question twice, as Postfix, which runs the lists once.
    pub policy_memo: Option<&'a std::cell::RefCell<Vec<(String, String)>>>,
}

impl Request<'_> {
    /// A `sleep` stopped the lists: their outcome does not count yet.
    pub fn paused(&self) -> bool {
        self.pause.is_some_and(|p| p.secs.get() > 0)
            || self.verify.is_some_and(|v| v.borrow().is_some())
    }
}

/// `sleep SECONDS` in a session: a sleep not done yet stops the lists and
/// asks for its pause; the session then runs the command again, and the
/// sleeps done so far go by.
#[derive(Debug, Default)]
pub struct Pause {
    /// The pause asked for (0: none).
    pub secs: std::cell::Cell<u64>,
    /// Sleeps met in this evaluation.
    pub seen: std::cell::Cell<usize>,
    /// Sleeps already done for the command being run again.
    pub done: std::cell::Cell<usize>,
}

impl Request<'_> {
    fn ip(&self) -> IpAddr {
        self.client_addr
            .unwrap_or(IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED))
    }
}

/// One item of a list: a name and, for those that take one, its argument
/// (the grammar is `postern_common::restriction`, shared with `postern check`).
pub use postern_common::restriction::Item;

/// Parses list words as smtpd does at start (tests); panics on a list
/// that `postern check` refuses.
#[cfg(test)]
pub fn parse_list(words: &[String]) -> Vec<Item> {
    restriction::parse_list(words, &[]).unwrap()
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
    /// `smtpd_etrn_restrictions`.
    etrn: Vec<Item>,
    pub delay_reject: bool,
    /// `smtpd_reject_unlisted_recipient`.
    reject_unlisted: bool,
    /// `smtpd_reject_unlisted_sender`: checked with each recipient, where
    /// Postfix (smtpd_delay_reject) answers it.
    reject_unlisted_sender: bool,
    /// `unknown_client_hostname_reject_code`: a client without a
    /// (verified) name.
    unknown_client_code: u16,
    /// `unknown_hostname_reject_code`: a HELO name without records.
    unknown_hostname_code: u16,
    mynetworks: MatchList,
    /// Address classes and recipient tables: the one resolver.
    resolver: Option<Arc<Resolver>>,
    /// Access tables named in the lists, opened at start (Err: why not).
    tables: HashMap<String, Result<Table, String>>,
    sender_login_maps: Option<Tables>,
    /// `receive_override_options = no_unknown_recipient_checks`: no
    /// recipient is refused as unlisted (mail back from a content filter).
    no_unknown_recipient_checks: bool,
    /// `smtpd_restriction_classes`: each class's list, by name.
    classes: HashMap<String, Vec<Item>>,
    /// `check_policy_service`: the connections and their settings.
    policy: crate::policy_client::PolicyClient,
    /// `smtpd_end_of_data_restrictions`: after the final dot.
    end_of_data: Vec<Item>,
    /// `plaintext_reject_code` (reject_plaintext_session).
    plaintext_code: u16,
    /// `multi_recipient_bounce_reject_code`.
    multi_bounce_code: u16,
    /// `relay_domains_reject_code` (check_relay_domains).
    relay_domains_code: u16,
    /// `relay_domains`, matched against the client's name
    /// (check_relay_domains).
    relay_domains: Option<MatchList>,
    /// `permit_mx_backup_networks` (empty: any primary MX).
    mx_backup_networks: Option<MatchList>,
    /// `relay_clientcerts` (permit_tls_clientcerts).
    relay_clientcerts: Option<Tables>,
    /// `smtpd_tls_ask_ccert` (a warning when a certificate restriction
    /// runs without it).
    ask_ccert: bool,
    /// `unverified_recipient_*` (reject_unverified_recipient).
    unverified_recipient: unverified::Unverified,
    /// `unverified_sender_*` (reject_unverified_sender).
    unverified_sender: unverified::Unverified,
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

/// The list parameter `name`, parsed; Err names the parameter and the
/// restriction that fails (`postern check` reports the same, with the
/// file and line).
fn list(cfg: &Config, name: &str, classes: &[String]) -> Result<Vec<Item>, String> {
    restriction::parse_list(&restriction::words(&cfg.get(name)), classes)
        .map_err(|e| format!("{name}: {e}"))
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
        let mynetworks = MatchList::from_config(cfg, "mynetworks", Kind::Address)?;
        let class_names = restriction::classes(cfg);
        let mut r = Restrictions::with_resolver(
            list(cfg, "smtpd_relay_restrictions", &class_names)?,
            list(cfg, "smtpd_recipient_restrictions", &class_names)?,
            mynetworks,
            Resolver::with_recipient_checks(cfg),
        )?;
        for name in postern_common::resolve::RECIPIENT_CODES {
            reject_code(cfg, name)?;
        }
        r.client = list(cfg, "smtpd_client_restrictions", &class_names)?;
        r.helo = list(cfg, "smtpd_helo_restrictions", &class_names)?;
        r.sender = list(cfg, "smtpd_sender_restrictions", &class_names)?;
        r.data = list(cfg, "smtpd_data_restrictions", &class_names)?;
        r.end_of_data = list(cfg, "smtpd_end_of_data_restrictions", &class_names)?;
        r.etrn = list(cfg, "smtpd_etrn_restrictions", &class_names)?;
        r.plaintext_code = reject_code(cfg, "plaintext_reject_code")?;
        r.multi_bounce_code = reject_code(cfg, "multi_recipient_bounce_reject_code")?;
        r.relay_domains_code = reject_code(cfg, "relay_domains_reject_code")?;
        r.relay_domains = Some(MatchList::from_config(cfg, "relay_domains", Kind::Domain)?);
        let backup = MatchList::from_config(cfg, "permit_mx_backup_networks", Kind::NameAddress)?;
        r.mx_backup_networks = (!backup.is_empty()).then_some(backup);
        let ccerts = cfg.get("relay_clientcerts");
        if !ccerts.trim().is_empty() {
            let (t, errors) = Tables::open_list(&ccerts);
            for e in &errors {
                warning!("relay_clientcerts: {e}");
            }
            r.relay_clientcerts = Some(t);
        }
        r.ask_ccert = cfg
            .get_bool("smtpd_tls_ask_ccert")
            .map_err(|e| e.to_string())?;
        if let Some(c) = restriction::class_loop(cfg) {
            return Err(format!("{c}: the restriction class refers to itself"));
        }
        if let Some(e) = restriction::end_of_data_problem(cfg) {
            return Err(format!("smtpd_end_of_data_restrictions: {e}"));
        }
        for c in &class_names {
            let l = list(cfg, c, &class_names)?;
            r.classes.insert(c.clone(), l);
        }
        r.delay_reject = cfg
            .get_bool("smtpd_delay_reject")
            .map_err(|e| e.to_string())?;
        r.reject_unlisted = cfg
            .get_bool("smtpd_reject_unlisted_recipient")
            .map_err(|e| e.to_string())?;
        r.reject_unlisted_sender = cfg
            .get_bool("smtpd_reject_unlisted_sender")
            .map_err(|e| e.to_string())?;
        r.no_unknown_recipient_checks = postern_common::receive_override::ReceiveOverride::parse(
            &cfg.get("receive_override_options"),
        )?
        .no_unknown_recipient_checks;
        r.unknown_client_code = reject_code(cfg, "unknown_client_hostname_reject_code")?;
        r.unknown_hostname_code = reject_code(cfg, "unknown_hostname_reject_code")?;
        r.unverified_recipient = unverified::Unverified::from_config(cfg, "recipient")?;
        r.unverified_sender = unverified::Unverified::from_config(cfg, "sender")?;
        r.open_tables();
        r.policy = r.policy_client(cfg)?;
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
        mynetworks: MatchList,
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
        mynetworks: MatchList,
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
            plaintext_code: 450,
            multi_bounce_code: 550,
            relay_domains_code: 554,
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
            Stage::Etrn => self.etrn = items,
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
            &self.end_of_data,
            &self.etrn,
        ];
        let specs: Vec<String> = all
            .into_iter()
            .chain(self.classes.values())
            .flat_map(|l| l.iter())
            // A policy server's `inet:host:port` is not a table.
            .filter(|i| i.name != "check_policy_service")
            .filter_map(|i| i.arg.clone())
            .filter(|a| postern_common::match_list::is_table(a))
            .collect();
        for spec in specs {
            if self.tables.contains_key(&spec) {
                continue;
            }
            // One that cannot be opened answers every lookup with an
            // error (451 4.3.5), as Postfix's surrogate table.
            let (t, e) = Table::open_or_unavailable(&spec);
            if let Some(e) = e {
                warning!("{e}");
            }
            self.tables.insert(spec, Ok(t));
        }
    }

    /// `receive_override_options = no_unknown_recipient_checks`: no
    /// `smtpd_reject_unlisted_recipient` (a content filter's re-injection
    /// port).
    pub fn skip_unlisted_recipient_checks(&mut self) {
        self.reject_unlisted = false;
    }

    /// Whether the client is in `mynetworks`.
    /// Err: a table of the list could not answer.
    pub fn in_mynetworks(&self, ip: IpAddr) -> Result<bool, postern_common::maps::LookupError> {
        self.mynetworks.matches_addr(ip)
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
        let defers = defer_flags::Defers::default();
        if let (false, Some(earlier)) = (self.delay_reject, req.defers) {
            defers.carry_permit_from(earlier);
        }
        let req = &Request {
            defers: Some(&defers),
            ..req.clone()
        };
        let rcpt = req.recipient.unwrap_or_default();
        // Postfix's smtpd_check_addr(), before any restriction: an
        // address the resolver cannot use (a bad domain or address
        // literal, a local part starting with `-`).
        if matches!(self.resolved(rcpt), Ok(Some(r)) if r.bad_syntax) {
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
                if req.paused() {
                    return None;
                }
            }
        }
        defers.new_stage();
        for l in [&self.relay, &self.recipient] {
            if let Verdict::Reject(reply) = self.eval_list(l, Stage::Recipient, req) {
                return Some(reply);
            }
            if req.paused() {
                return None;
            }
        }
        if let Some(reply) = defers.finish(None) {
            return Some(reply);
        }
        if self.reject_unlisted_sender {
            if let Some(sender) = req.sender.filter(|s| !s.is_empty()) {
                if let Verdict::Reject(r) = self.unlisted(sender, Some(rcpt), "Sender address") {
                    return Some(r);
                }
            }
        }
        if self.reject_unlisted {
            if let Verdict::Reject(r) = self.unlisted(rcpt, req.sender, "Recipient address") {
                return Some(r);
            }
        }
        None
    }

    /// Mail for `rcpt` ends here (local, virtual alias or virtual
    /// mailbox class).
    fn final_destination(&self, rcpt: &str) -> bool {
        matches!(self.resolved(rcpt), Ok(Some(r)) if r.class.is_final())
    }

    /// The one resolver (address classes, transports, next hops).
    pub fn resolver(&self) -> Option<&Resolver> {
        self.resolver.as_deref()
    }

    /// The resolver's answer (None: no resolver); Err: a table could not
    /// answer, the caller answers 451 4.3.0.
    fn resolved(&self, rcpt: &str) -> Result<Option<Resolved>, String> {
        match &self.resolver {
            // A table's error is logged by the table.
            Some(r) => r.resolve(None, rcpt).map(Some),
            None => Ok(None),
        }
    }

    /// Postfix's reject_dict_retry: a table could not answer.
    pub(super) fn lookup_failure(address: &str) -> Verdict {
        Verdict::Reject(format!("451 4.3.0 <{address}>: Temporary lookup failure"))
    }

    /// The checks of DATA.
    pub fn check_data(&self, req: &Request<'_>) -> Option<String> {
        let defers = defer_flags::Defers::default();
        let req = &Request {
            defers: Some(&defers),
            ..req.clone()
        };
        defers.finish(self.reject_of(Stage::Data, req))
    }

    /// The checks after the final dot of DATA, before the message is
    /// accepted (`smtpd_end_of_data_restrictions`), worded as the DATA
    /// checks with the command `END-OF-MESSAGE`.
    pub fn check_end_of_data(&self, req: &Request<'_>) -> Option<String> {
        if self.end_of_data.is_empty() {
            return None;
        }
        let defers = defer_flags::Defers::default();
        // No pause after the final dot: sleep is a no-op there, and
        // reject_unverified_* (refused in this list at start) has no
        // answer to wait for.
        let req = &Request {
            defers: Some(&defers),
            pause: None,
            verify: None,
            ..req.clone()
        };
        let outcome = match self.eval_list(&self.end_of_data, Stage::Data, req) {
            Verdict::Reject(r) => Some(r),
            _ => None,
        };
        defers.finish(outcome)
    }

    /// The checks of `ETRN domain` (Postfix's smtpd_check_etrn): with
    /// `smtpd_delay_reject = yes` the client and HELO lists first, then
    /// `smtpd_etrn_restrictions` with the domain as subject. `None`
    /// accepts (the domain may still not be eligible for a flush:
    /// `fast_flush_domains`), `Some(reply)` refuses.
    pub fn check_etrn(&self, req: &Request<'_>) -> Option<String> {
        let defers = defer_flags::Defers::default();
        if let Some(earlier) = req.defers {
            defers.carry_permit_from(earlier);
        }
        let req = &Request {
            defers: Some(&defers),
            ..req.clone()
        };
        if self.delay_reject {
            for stage in [Stage::Client, Stage::Helo] {
                if let Some(r) = self.reject_of(stage, req) {
                    return Some(r);
                }
                if req.paused() {
                    return None;
                }
            }
        }
        let outcome = self.reject_of(Stage::Etrn, req);
        if req.paused() {
            return None;
        }
        defers.finish(outcome)
    }

    /// Whether there is an end-of-data list to apply.
    pub fn has_end_of_data(&self) -> bool {
        !self.end_of_data.is_empty()
    }

    fn reject_of(&self, stage: Stage, req: &Request<'_>) -> Option<String> {
        if let Some(d) = req.defers {
            d.new_stage();
        }
        let l = match stage {
            Stage::Client => &self.client,
            Stage::Helo => &self.helo,
            Stage::Sender => &self.sender,
            Stage::Recipient => &self.recipient,
            Stage::Data => &self.data,
            Stage::Etrn => &self.etrn,
        };
        match self.eval_list(l, stage, req) {
            Verdict::Reject(r) => Some(r),
            _ => None,
        }
    }
}
