//! Where an address goes and whether it exists, decided once: Postfix's
//! trivial-rewrite `resolve` (address class, transport, next hop, final
//! recipient) and smtpd's `smtpd_reject_unlisted_recipient` table checks.
//! smtpd (relay control, recipient validation), qmgr (routing),
//! `sendmail -bv` and local all ask this one [`Resolver`].
//!
//! Resolution, as trivial-rewrite does it:
//! 1. The recipient is cleaned up: a trailing dot of the domain goes; a
//!    local domain (`mydestination`, or an address literal of
//!    `inet_interfaces`/`proxy_interfaces`) is stripped and what is left is
//!    looked at again, so `user%remote@local` (`allow_percent_hack`) and
//!    `remote!user@local` (`swap_bangpath`) and `user@remote@local` name
//!    `user@remote`; an empty local part is `empty_address_recipient`; an
//!    address without a domain gets `@$myhostname`.
//! 2. The class of the domain: local (`local_transport`, next hop the
//!    domain), virtual alias (`error:5.1.1 User unknown in virtual alias
//!    table`), virtual mailbox (`virtual_transport`, the domain),
//!    relay (`relay_transport`; `relay_domains` matches subdomains when
//!    listed in `parent_domain_matches_subdomains`) or default
//!    (`sender_dependent_default_transport_maps`, else
//!    `default_transport`). For relay and default the next hop is
//!    `sender_dependent_relayhost_maps`' answer, else `relayhost`, else
//!    the domain. A `transport:nexthop` setting's next hop wins over these.
//! 3. `transport_maps`, by the full address, the address without its
//!    `recipient_delimiter` extension, the domain and its parents
//!    (`.parent`, or `parent` when `transport_maps` is in
//!    `parent_domain_matches_subdomains`), then `*`: `transport:nexthop`
//!    replaces both; an empty transport keeps the class's; a transport
//!    without a next hop resets it to the domain (so `example.com smtp:`
//!    goes around `relayhost`, as in Postfix). Not for the virtual alias
//!    class.
//! 4. `relocated_maps`: a moved user becomes `error:5.1.6 User has moved
//!    to ...`.
//!
//! Domain names are compared with their case folded (UTF-8 too); in the
//! domain lists (`mydestination`, `relay_domains`, `virtual_*_domains`)
//! an internationalized name matches in its U-label and A-label forms
//! alike, as `match_list::MatchList` compares them (Postfix 3.7 wants both listed;
//! issue #16 asks for either). Table keys are not converted.

use crate::addr;
use crate::maps::{self, LookupError};
use crate::match_list::{Kind, MatchList};
use crate::warning;
use postern_conf::Config;
use std::net::IpAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime};

/// The address classes of trivial-rewrite.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    /// `mydestination`, `inet_interfaces`, `proxy_interfaces`.
    Local,
    /// `virtual_alias_domains`.
    Alias,
    /// `virtual_mailbox_domains`.
    Virtual,
    /// `relay_domains`.
    Relay,
    /// Anything else.
    Default,
}

impl Class {
    pub fn name(self) -> &'static str {
        match self {
            Class::Local => "local",
            Class::Alias => "alias",
            Class::Virtual => "virtual",
            Class::Relay => "relay",
            Class::Default => "default",
        }
    }

    /// Mail for this class ends here (Postfix's RESOLVE_CLASS_FINAL).
    pub fn is_final(self) -> bool {
        matches!(self, Class::Local | Class::Alias | Class::Virtual)
    }
}

/// The answer for one address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resolved {
    pub class: Class,
    pub transport: String,
    pub nexthop: String,
    /// The address after step 1 (`user@domain`, always with a domain).
    pub recipient: String,
    /// The local part routes further (`a%b@c`, `b!a@c`, `a@b@c`):
    /// Postfix's RESOLVE_FLAG_ROUTED, not relayed for strangers.
    pub routed: bool,
    /// Bad syntax (an invalid domain or address literal, a local part
    /// starting with `-`): Postfix's RESOLVE_FLAG_ERROR.
    pub bad_syntax: bool,
}

/// A refusal of an address by the recipient checks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub code: u16,
    pub dsn: String,
    /// Without the `<address>: Recipient address rejected: ` prefix.
    pub text: String,
    /// A table could not answer: the text follows `<address>: ` directly
    /// (`451 4.3.0 <a@b>: Temporary lookup failure`, Postfix's
    /// reject_dict_retry), without `Recipient address rejected:`.
    pub lookup_failure: bool,
}

impl Refusal {
    /// `451 4.3.0 <address>: Temporary lookup failure`.
    pub fn temporary_lookup_failure() -> Refusal {
        Refusal {
            code: 451,
            dsn: "4.3.0".into(),
            text: "Temporary lookup failure".into(),
            lookup_failure: true,
        }
    }
}

/// A domain list of the resolver: a [`MatchList`] (string list for
/// `mydestination` and `virtual_*_domains`, domain list for
/// `relay_domains`), empty when it could not be read (the error is kept
/// in `domain_errors`, and every resolution defers).
fn domains(cfg: &Config, name: &str, kind: Kind, errors: &mut Vec<String>) -> MatchList {
    MatchList::from_config(cfg, name, kind).unwrap_or_else(|e| {
        errors.push(e);
        MatchList::default()
    })
}

/// Case folding of names: UTF-8 aware, as Postfix's casefold.
fn fold(s: &str) -> String {
    s.to_lowercase()
}

/// `transport:nexthop` (the next hop may hold more colons). The
/// transport may be a pool, `randmap:{a,b}` or `weighted:{a=3,b=1}`
/// (`crate::dict::randmap`), which qmgr resolves to one member per
/// message.
pub fn split_transport(v: &str) -> (String, String) {
    if let Some(p) = crate::dict::randmap::split_pool_value(v) {
        return p;
    }
    match v.trim().split_once(':') {
        Some((t, n)) => (t.trim().to_string(), n.trim().to_string()),
        None => (v.trim().to_string(), String::new()),
    }
}

/// Splits an optional leading enhanced status code off a reason text:
/// "5.1.1 no such user" → ("5.1.1", "no such user"); the class digit of
/// `default` wins.
pub fn dsn_split(text: &str, default: &str) -> (String, String) {
    let text = text.trim();
    let (first, rest) = text.split_once(' ').unwrap_or((text, ""));
    let parts: Vec<&str> = first.split('.').collect();
    let is_code = parts.len() == 3
        && matches!(parts[0], "2" | "4" | "5")
        && parts[1..]
            .iter()
            .all(|p| !p.is_empty() && p.len() <= 3 && p.bytes().all(|b| b.is_ascii_digit()));
    if is_code {
        let code = format!("{}.{}.{}", &default[..1], parts[1], parts[2]);
        (code, rest.trim().to_string())
    } else {
        (default.to_string(), text.to_string())
    }
}

/// Tables behind one parameter, and the files to watch for changes.
#[derive(Debug, Clone, Default)]
struct Maps {
    spec: String,
    tables: maps::Tables,
    /// `unix:passwd.byname` (through `proxy:` or not): the account database.
    passwd: bool,
    /// It chooses a transport: a pool table answers the pool itself.
    transports: bool,
    errors: Vec<String>,
    files: Vec<(PathBuf, Option<SystemTime>)>,
}

impl Maps {
    /// Opens the tables of `name`; the errors of tables that cannot be
    /// opened are logged unless they are those of `before` (a table
    /// tried again each second while it stays broken is logged once).
    fn open(name: &'static str, spec: String, before: &[String]) -> Maps {
        let mut rest = Vec::new();
        let mut passwd = false;
        for s in crate::maps::split_specs(&spec) {
            // Other proxy: tables are asked of proxymap (maps::Table).
            if s.strip_prefix("proxy:").unwrap_or(&s) == "unix:passwd.byname" {
                passwd = true;
            } else {
                rest.push(s);
            }
        }
        let joined = rest.join(" ");
        let (tables, errors) = maps::Tables::open_list(&joined);
        if errors != before {
            for e in &errors {
                warning!("{name}: {e}");
            }
        }
        Maps {
            files: files_of(&joined),
            transports: matches!(
                name,
                "transport_maps" | "sender_dependent_default_transport_maps"
            ),
            spec,
            tables,
            passwd,
            errors,
        }
    }

    fn is_empty(&self) -> bool {
        self.spec.trim().is_empty()
    }

    fn changed(&self) -> bool {
        // A file this process may not even stat (root-only directory)
        // is not taken for changed: the table watch restarts the daemon.
        !self.errors.is_empty()
            || self
                .files
                .iter()
                .any(|(p, t)| mtime(p).is_some_and(|now| Some(now) != *t))
    }

    /// One key: `full` keys are seen by every table, the others only by
    /// tables of fixed keys (not regexp/pcre/cidr), as Postfix's
    /// maps_find(..., PARTIAL).
    /// Err: a table could not answer (the caller defers).
    fn find(&self, key: &str, full: bool) -> Result<Option<String>, LookupError> {
        for t in &self.tables.0 {
            if !full && t.is_pattern() {
                continue;
            }
            // A pool where a transport is chosen (transport_maps,
            // sender_dependent_default_transport_maps): the whole pool,
            // for qmgr to pick a member per message.
            if self.transports {
                if let Some(spec) = t.spec().filter(|s| crate::dict::randmap::is_pool_spec(s)) {
                    return Ok(Some(spec.to_string()));
                }
            }
            if let Some(v) = t.lookup_expanded(key)? {
                return Ok(Some(v));
            }
        }
        if self.passwd && !key.contains('@') && crate::privs::account_exists(&fold(key)) {
            return Ok(Some(key.to_string()));
        }
        Ok(None)
    }
}

fn file_of(spec: &str) -> Option<PathBuf> {
    maps::table_file(spec)
}

fn mtime(p: &PathBuf) -> Option<SystemTime> {
    std::fs::metadata(p).and_then(|m| m.modified()).ok()
}

fn files_of(spec: &str) -> Vec<(PathBuf, Option<SystemTime>)> {
    crate::maps::split_specs(spec)
        .iter()
        .filter_map(|s| file_of(s))
        .map(|p| {
            let t = mtime(&p);
            (p, t)
        })
        .collect()
}

/// Postfix's mail_addr_find() lookup forms.
#[derive(Clone, Copy)]
struct Strategy {
    /// user+ext@domain, user@domain.
    full: bool,
    /// user+ext, user when the domain is local or `myorigin`.
    localpart_if_local: bool,
    /// @domain.
    at_domain: bool,
    /// domain, then parents (`parents`: as `parent`, else `.parent`).
    domain: Option<bool>,
}

const DEFAULT_STRATEGY: Strategy = Strategy {
    full: true,
    localpart_if_local: true,
    at_domain: true,
    domain: None,
};

/// The resolver's view of the configuration, with its tables open.
pub struct Resolver {
    myhostname: String,
    myorigin: String,
    mydestination: MatchList,
    interfaces: Vec<IpAddr>,
    all_interfaces: bool,
    virtual_alias_domains: MatchList,
    virtual_mailbox_domains: MatchList,
    relay_domains: MatchList,
    local_transport: String,
    virtual_transport: String,
    relay_transport: String,
    default_transport: String,
    relayhost: String,
    delimiter: String,
    percent_hack: bool,
    swap_bangpath: bool,
    allow_min_user: bool,
    empty_address: String,
    null_sender_xport_key: String,
    null_sender_relay_key: String,
    show_table: bool,
    double_bounce: String,
    transport_parents: bool,
    transport_maps: Maps,
    sender_transport: Maps,
    sender_relay: Maps,
    relocated: Maps,
    // What smtpd checks recipients against.
    local_recipient_maps: Maps,
    virtual_alias_maps: Maps,
    virtual_mailbox_maps: Maps,
    relay_recipient_maps: Maps,
    canonical_maps: Maps,
    recipient_canonical_maps: Maps,
    sender_canonical_maps: Maps,
    local_code: u16,
    alias_code: u16,
    virtual_code: u16,
    relay_code: u16,
    /// Tables of domain lists that could not be opened (logged at start;
    /// a lookup that reaches one fails, and resolution defers).
    domain_errors: Vec<String>,
    cfg_text: ConfigCopy,
    checked: Instant,
    /// The last answer, as Postfix's resolve_clnt keeps it: smtpd asks
    /// for the same address several times in one RCPT (the syntax check,
    /// relay control, the unlisted-recipient check), and each answer may
    /// cost database queries (`proxy:mysql:` domain lists).
    last: std::sync::Mutex<Option<LastAnswer>>,
}

/// [`Resolver::resolve`]'s last answer, for [`LAST_ANSWER_TTL`].
struct LastAnswer {
    sender: Option<String>,
    address: String,
    at: Instant,
    answer: Resolved,
}

/// How long the last answer is given again without asking the tables: a
/// changed table is seen at most this late (one RCPT's checks take far
/// less).
const LAST_ANSWER_TTL: Duration = Duration::from_secs(1);

impl std::fmt::Debug for Resolver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Resolver")
            .field("myhostname", &self.myhostname)
            .finish_non_exhaustive()
    }
}

/// What [`Resolver::refresh`] needs to open the tables again.
struct ConfigCopy(Vec<(&'static str, String)>);

const TABLE_PARAMS: [&str; 11] = [
    "transport_maps",
    "sender_dependent_default_transport_maps",
    "sender_dependent_relayhost_maps",
    "relocated_maps",
    "local_recipient_maps",
    "virtual_alias_maps",
    "virtual_mailbox_maps",
    "relay_recipient_maps",
    "canonical_maps",
    "recipient_canonical_maps",
    "sender_canonical_maps",
];

/// Which tables a resolver opens.
enum Opened {
    None,
    Routing,
    All,
}

/// The tables every resolver opens; the others only
/// [`Resolver::with_recipient_checks`].
const ROUTING_TABLES: [&str; 4] = [
    "transport_maps",
    "sender_dependent_default_transport_maps",
    "sender_dependent_relayhost_maps",
    "relocated_maps",
];

/// A `*_reject_code` parameter: a 4xx or 5xx reply code.
pub fn reject_code(cfg: &Config, name: &str) -> Result<u16, String> {
    let v = cfg.get(name);
    match v.trim().parse::<u16>() {
        Ok(c) if (400..600).contains(&c) => Ok(c),
        _ => Err(format!(
            "{name}: expected a 4xx or 5xx reply code, not \"{v}\""
        )),
    }
}

/// The reply codes of the recipient checks.
pub const RECIPIENT_CODES: [&str; 4] = [
    "unknown_local_recipient_reject_code",
    "unknown_virtual_alias_reject_code",
    "unknown_virtual_mailbox_reject_code",
    "unknown_relay_recipient_reject_code",
];

fn code(cfg: &Config, name: &str) -> u16 {
    reject_code(cfg, name).unwrap_or_else(|e| {
        warning!("{e}; using 550");
        550
    })
}

fn yes(cfg: &Config, name: &str) -> bool {
    cfg.get_bool(name).unwrap_or(false)
}

impl Resolver {
    /// Reads the configuration and opens the tables. Tables that cannot
    /// be opened are logged and make the lookups that need them fail for
    /// now; a bad reject code is logged and taken as 550 (smtpd refuses
    /// to start with one: [`RECIPIENT_CODES`]).
    pub fn new(cfg: &Config) -> Resolver {
        Self::build(cfg, Opened::Routing)
    }

    /// A resolver with no table open, for [`Resolver::is_local_domain`]
    /// alone (local, cleanup).
    pub fn domains_only(cfg: &Config) -> Resolver {
        Self::build(cfg, Opened::None)
    }

    /// [`Resolver::new`] with the tables of the recipient checks open
    /// too (`local_recipient_maps`, `virtual_alias_maps`,
    /// `virtual_mailbox_maps`, `relay_recipient_maps`, the canonical
    /// maps): for smtpd and `sendmail -bv`.
    pub fn with_recipient_checks(cfg: &Config) -> Resolver {
        Self::build(cfg, Opened::All)
    }

    fn build(cfg: &Config, tables: Opened) -> Resolver {
        let parents: Vec<String> = cfg
            .get_list("parent_domain_matches_subdomains")
            .into_iter()
            .map(|s| s.to_ascii_lowercase())
            .collect();
        let pdms = |n: &str| parents.iter().any(|p| p == n);
        let mut domain_errors = Vec::new();
        let mut interfaces = Vec::new();
        let mut all_interfaces = false;
        for name in ["inet_interfaces", "proxy_interfaces"] {
            for i in cfg.get_list(name) {
                match i.to_ascii_lowercase().as_str() {
                    "all" => all_interfaces = true,
                    "loopback-only" => interfaces.extend([
                        IpAddr::from([127, 0, 0, 1]),
                        IpAddr::from(std::net::Ipv6Addr::LOCALHOST),
                    ]),
                    _ => match i.trim_matches(['[', ']']).parse::<IpAddr>() {
                        Ok(ip) => interfaces.push(ip),
                        Err(_) => {
                            // A host name: its addresses, as Postfix.
                            use std::net::ToSocketAddrs;
                            if let Ok(a) = (i.as_str(), 0).to_socket_addrs() {
                                interfaces.extend(a.map(|s| s.ip()));
                            }
                        }
                    },
                }
            }
        }
        let spec = |n: &str| {
            let open = match tables {
                Opened::All => true,
                Opened::Routing => ROUTING_TABLES.contains(&n),
                Opened::None => false,
            };
            if open {
                cfg.get(n)
            } else {
                String::new()
            }
        };
        let open = |n: &'static str| Maps::open(n, spec(n), &[]);
        let r = Resolver {
            myhostname: fold(&cfg.get("myhostname")),
            myorigin: fold(&cfg.get("myorigin")),
            mydestination: domains(cfg, "mydestination", Kind::String, &mut domain_errors),
            interfaces,
            all_interfaces,
            virtual_alias_domains: domains(
                cfg,
                "virtual_alias_domains",
                Kind::String,
                &mut domain_errors,
            ),
            virtual_mailbox_domains: domains(
                cfg,
                "virtual_mailbox_domains",
                Kind::String,
                &mut domain_errors,
            ),
            relay_domains: domains(cfg, "relay_domains", Kind::Domain, &mut domain_errors),
            local_transport: cfg.get("local_transport").trim().to_string(),
            virtual_transport: cfg.get("virtual_transport").trim().to_string(),
            relay_transport: cfg.get("relay_transport").trim().to_string(),
            default_transport: cfg.get("default_transport").trim().to_string(),
            relayhost: cfg.get("relayhost").trim().to_string(),
            delimiter: cfg.get("recipient_delimiter"),
            percent_hack: yes(cfg, "allow_percent_hack"),
            swap_bangpath: yes(cfg, "swap_bangpath"),
            allow_min_user: yes(cfg, "allow_min_user"),
            empty_address: cfg.get("empty_address_recipient"),
            null_sender_xport_key: cfg.get("empty_address_default_transport_maps_lookup_key"),
            null_sender_relay_key: cfg.get("empty_address_relayhost_maps_lookup_key"),
            show_table: yes(cfg, "show_user_unknown_table_name"),
            double_bounce: cfg.get("double_bounce_sender"),
            transport_parents: pdms("transport_maps"),
            transport_maps: open("transport_maps"),
            sender_transport: open("sender_dependent_default_transport_maps"),
            sender_relay: open("sender_dependent_relayhost_maps"),
            relocated: open("relocated_maps"),
            local_recipient_maps: open("local_recipient_maps"),
            virtual_alias_maps: open("virtual_alias_maps"),
            virtual_mailbox_maps: open("virtual_mailbox_maps"),
            relay_recipient_maps: open("relay_recipient_maps"),
            canonical_maps: open("canonical_maps"),
            recipient_canonical_maps: open("recipient_canonical_maps"),
            sender_canonical_maps: open("sender_canonical_maps"),
            local_code: code(cfg, "unknown_local_recipient_reject_code"),
            alias_code: code(cfg, "unknown_virtual_alias_reject_code"),
            virtual_code: code(cfg, "unknown_virtual_mailbox_reject_code"),
            relay_code: code(cfg, "unknown_relay_recipient_reject_code"),
            domain_errors,
            cfg_text: ConfigCopy(TABLE_PARAMS.iter().map(|n| (*n, spec(n))).collect()),
            checked: Instant::now(),
            last: std::sync::Mutex::new(None),
        };
        for e in &r.domain_errors {
            warning!("{e}");
        }
        r
    }

    fn all_maps_mut(&mut self) -> [&mut Maps; 11] {
        [
            &mut self.transport_maps,
            &mut self.sender_transport,
            &mut self.sender_relay,
            &mut self.relocated,
            &mut self.local_recipient_maps,
            &mut self.virtual_alias_maps,
            &mut self.virtual_mailbox_maps,
            &mut self.relay_recipient_maps,
            &mut self.canonical_maps,
            &mut self.recipient_canonical_maps,
            &mut self.sender_canonical_maps,
        ]
    }

    /// Opens again the tables whose files changed (a new `postmap`) or
    /// could not be opened last time. At most one check a second; none
    /// inside a chroot jail, where the files are out of sight.
    pub fn refresh(&mut self) {
        if self.checked.elapsed() < Duration::from_secs(1) || crate::service::jailed() {
            return;
        }
        self.checked = Instant::now();
        *self.last.get_mut().unwrap_or_else(|p| p.into_inner()) = None;
        let specs: Vec<(&'static str, String)> = self.cfg_text.0.clone();
        for (m, (name, spec)) in self.all_maps_mut().into_iter().zip(specs) {
            if m.changed() {
                *m = Maps::open(name, spec, &m.errors);
            }
        }
    }

    /// Whether `domain` is this machine's: `mydestination`, or an address
    /// literal of `inet_interfaces`/`proxy_interfaces` (Postfix's
    /// resolve_local()).
    /// A table of `mydestination` that cannot answer counts as "not
    /// local" here; resolution ([`Resolver::resolve`]) defers instead.
    pub fn is_local_domain(&self, domain: &str) -> bool {
        self.local_domain(domain).unwrap_or(false)
    }

    /// [`Resolver::is_local_domain`]; Err: a table of `mydestination`
    /// could not answer.
    fn local_domain(&self, domain: &str) -> Result<bool, LookupError> {
        let d = domain.strip_suffix('.').unwrap_or(domain);
        if d.is_empty() || d.ends_with('.') {
            return Ok(false);
        }
        if self.mydestination.matches_name(d)? {
            return Ok(true);
        }
        Ok(self.literal_is_local(d))
    }

    /// Whether `ip` is one of this machine's: an address of
    /// `inet_interfaces`/`proxy_interfaces`, or with `all` any address of
    /// its interfaces (Postfix's own_inet_addr() and proxy_inet_addr()).
    pub fn is_own_address(&self, ip: IpAddr) -> bool {
        let ip = crate::cidr::normalize(ip);
        // `all`: any address of this host, which is one we can bind.
        self.interfaces.contains(&ip)
            || (self.all_interfaces && std::net::UdpSocket::bind((ip, 0)).is_ok())
    }

    /// An address literal of `inet_interfaces`/`proxy_interfaces`.
    fn literal_is_local(&self, d: &str) -> bool {
        let Some(inner) = d.strip_prefix('[').and_then(|x| x.strip_suffix(']')) else {
            return false;
        };
        let inner = inner
            .strip_prefix("IPv6:")
            .or_else(|| inner.strip_prefix("ipv6:"))
            .unwrap_or(inner);
        let Ok(ip) = inner.parse::<IpAddr>() else {
            return false;
        };
        if self.interfaces.contains(&ip) {
            return true;
        }
        // `all`: any address of this host, which is one we can bind.
        self.all_interfaces && std::net::UdpSocket::bind((ip, 0)).is_ok()
    }

    /// Step 1: the address as trivial-rewrite leaves it, and whether its
    /// domain is a remote one (None: local).
    fn canonical(&self, address: &str) -> Result<(String, bool), LookupError> {
        let mut a = address.to_string();
        let mut saved: Option<String> = None;
        let mut remote = false;
        for _ in 0..address.len() + 100 {
            // A trailing dot, not dot-dot or at-dot.
            if a.contains('@') && a.ends_with('.') && !a.ends_with("..") && !a.ends_with("@.") {
                a.pop();
            }
            if let Some(at) = a.rfind('@') {
                let dom = &a[at + 1..];
                if !dom.is_empty() && !self.local_domain(dom)? {
                    remote = true;
                    break;
                }
                saved = Some(dom.to_string());
                a.truncate(at);
            }
            if a.contains('@') {
                continue;
            }
            if self.swap_bangpath && a.contains('!') {
                let (site, user) = a.split_once('!').unwrap();
                a = format!("{user}@{site}");
                continue;
            }
            if self.percent_hack && a.contains('%') {
                let i = a.rfind('%').unwrap();
                a.replace_range(i..i + 1, "@");
                continue;
            }
            if a.is_empty() || a == "\"\"" {
                a = self.empty_address.clone();
                continue;
            }
            if saved.is_none() {
                a = format!("{a}@{}", self.myhostname);
                continue;
            }
            break;
        }
        if !remote {
            let d = saved.unwrap_or_else(|| self.myhostname.clone());
            a = format!("{a}@{d}");
        }
        Ok((a, remote))
    }

    /// Resolves `address` for mail from `sender` (None: no sender is
    /// known). Err: a table or domain list could not be read (defer).
    /// The same question asked again within [`LAST_ANSWER_TTL`] gets the
    /// last answer (an error is not kept).
    pub fn resolve(&self, sender: Option<&str>, address: &str) -> Result<Resolved, String> {
        let last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(l) = last.as_ref() {
            // The sender counts only outside the final classes (the
            // sender_dependent_* tables): smtpd asks once without it.
            if l.address == address
                && (l.answer.class.is_final() || l.sender.as_deref() == sender)
                && l.at.elapsed() < LAST_ANSWER_TTL
            {
                return Ok(l.answer.clone());
            }
        }
        // Not held while the tables answer: threads sharing a resolver
        // (qmgr's) ask at the same time.
        drop(last);
        let answer = self.resolve_uncached(sender, address)?;
        *self.last.lock().unwrap_or_else(|p| p.into_inner()) = Some(LastAnswer {
            sender: sender.map(str::to_string),
            address: address.to_string(),
            at: Instant::now(),
            answer: answer.clone(),
        });
        Ok(answer)
    }

    fn resolve_uncached(&self, sender: Option<&str>, address: &str) -> Result<Resolved, String> {
        let (recipient, remote) = self.canonical(address).map_err(|e| e.to_string())?;
        let (_, dom) = addr::split(&recipient);
        let domain = fold(dom.unwrap_or_default());
        let mut out = Resolved {
            class: Class::Default,
            transport: self.default_transport.clone(),
            nexthop: domain.clone(),
            recipient: recipient.clone(),
            routed: false,
            bad_syntax: false,
        };
        if !valid_domain(&domain) || (!self.allow_min_user && recipient.starts_with('-')) {
            out.bad_syntax = true;
            let (t, _) = split_transport(&out.transport);
            out.transport = t;
            return Ok(out);
        }
        let first_op = recipient.find(['@', '!', '%']).unwrap_or(recipient.len());
        out.routed = recipient.get(first_op + 1..) != Some(dom.unwrap_or_default());
        self.classify(&mut out, sender, &domain, remote)
            .map_err(|e| e.to_string())?;
        // A main.cf `transport:nexthop` setting's next hop wins.
        let (t, n) = split_transport(&out.transport);
        out.transport = t;
        if !n.is_empty() {
            out.nexthop = n;
        }
        if out.transport.is_empty() {
            return Err(format!(
                "null transport is not allowed (the {} class's transport parameter)",
                out.class.name()
            ));
        }
        self.apply_transport_maps(&mut out, &recipient, &domain)
            .map_err(|e| e.to_string())?;
        self.apply_relocated(&mut out, &recipient)
            .map_err(|e| e.to_string())?;
        Ok(out)
    }

    /// The address class of `domain` and the transport and next hop its
    /// class parameters give (with the sender-dependent tables for the
    /// default class), as trivial-rewrite's resolve_addr.
    fn classify(
        &self,
        out: &mut Resolved,
        sender: Option<&str>,
        domain: &str,
        remote: bool,
    ) -> Result<(), LookupError> {
        let sender_key = |empty_key: &str| -> Option<String> {
            sender.map(|s| {
                if s.is_empty() {
                    empty_key.to_string()
                } else {
                    s.to_string()
                }
            })
        };
        if !remote {
            out.class = Class::Local;
            out.transport = self.local_transport.clone();
        } else if self.virtual_alias_domains.matches_name(domain)? {
            out.class = Class::Alias;
            out.transport = "error".into();
            out.nexthop = format!(
                "5.1.1 User unknown{}",
                if self.show_table {
                    " in virtual alias table"
                } else {
                    ""
                }
            );
        } else if self.virtual_mailbox_domains.matches_name(domain)? {
            out.class = Class::Virtual;
            out.transport = self.virtual_transport.clone();
        } else {
            if self.relay_domains.matches_name(domain)? {
                out.class = Class::Relay;
                out.transport = self.relay_transport.clone();
            } else {
                out.class = Class::Default;
                if let Some(key) = sender_key(&self.null_sender_xport_key) {
                    match self.addr_find(&self.sender_transport, &key, DEFAULT_STRATEGY)? {
                        Some(x)
                            if !x.trim().is_empty() && !x.trim().eq_ignore_ascii_case("DUNNO") =>
                        {
                            out.transport = x.trim().to_string()
                        }
                        _ => {}
                    }
                }
            }
            let mut relay = None;
            if let Some(key) = sender_key(&self.null_sender_relay_key) {
                relay = self
                    .addr_find(&self.sender_relay, &key, DEFAULT_STRATEGY)?
                    .map(|v| v.trim().to_string())
                    .filter(|v| !v.is_empty() && !v.eq_ignore_ascii_case("DUNNO"));
            }
            if let Some(r) = relay {
                out.nexthop = r;
            } else if !self.relayhost.is_empty() {
                out.nexthop = self.relayhost.clone();
            }
        }
        Ok(())
    }

    /// `transport_maps`: the entry for the recipient (full address, then
    /// its domain and parents, then `*`) overrides the class's transport
    /// and next hop; an empty next hop means the recipient's domain.
    fn apply_transport_maps(
        &self,
        out: &mut Resolved,
        recipient: &str,
        domain: &str,
    ) -> Result<(), LookupError> {
        if out.class != Class::Alias && !self.transport_maps.is_empty() {
            let strategy = Strategy {
                full: true,
                localpart_if_local: false,
                at_domain: false,
                domain: Some(self.transport_parents),
            };
            let found = match self.addr_find(&self.transport_maps, recipient, strategy)? {
                Some(v) => Some(v),
                None => self.transport_maps.find("*", true)?,
            };
            if let Some(v) = found {
                let (t, n) = split_transport(&v);
                if !t.is_empty() {
                    out.transport = t;
                    out.nexthop = if !n.is_empty() {
                        n
                    } else if out.transport == "error" || out.transport == "retry" {
                        "Address is undeliverable".into()
                    } else {
                        domain.to_string()
                    };
                } else if !n.is_empty() {
                    out.nexthop = n;
                }
            }
        }
        Ok(())
    }

    /// `relocated_maps`: a moved user's mail bounces with the new address.
    fn apply_relocated(&self, out: &mut Resolved, recipient: &str) -> Result<(), LookupError> {
        if !self.relocated.is_empty() {
            let noext = Strategy { ..DEFAULT_STRATEGY };
            if let Some(v) = self.addr_find(&self.relocated, recipient, noext)? {
                out.transport = "error".into();
                out.nexthop = format!("5.1.6 User has moved to {}", v.trim());
            }
        }
        Ok(())
    }

    /// `user+ext` → (`user`, Some(`ext`)), as Postfix's split_addr:
    /// postmaster, the double-bounce name and, with `-` a delimiter,
    /// `owner-*` and `*-request` keep their names.
    pub fn strip_extension<'a>(&self, local: &'a str) -> (&'a str, Option<&'a str>) {
        if self.delimiter.is_empty()
            || local.eq_ignore_ascii_case("postmaster")
            || local.eq_ignore_ascii_case(&self.double_bounce)
        {
            return (local, None);
        }
        let lower = local.to_ascii_lowercase();
        if self.delimiter.contains('-')
            && (lower.starts_with("owner-") || lower.ends_with("-request"))
        {
            return (local, None);
        }
        match local.find(|c| self.delimiter.contains(c)) {
            Some(i) if i > 0 => (&local[..i], Some(&local[i + 1..])),
            _ => (local, None),
        }
    }

    /// Postfix's mail_addr_find(): the first lookup form that a table
    /// knows, in the order of the strategy.
    fn addr_find(
        &self,
        maps: &Maps,
        address: &str,
        s: Strategy,
    ) -> Result<Option<String>, LookupError> {
        if maps.is_empty() {
            return Ok(None);
        }
        let (local, domain) = addr::split(address);
        let (bare, ext) = self.strip_extension(local);
        let with = |l: &str| match domain {
            Some(d) => format!("{l}@{d}"),
            None => l.to_string(),
        };
        if s.full {
            if let Some(v) = maps.find(&with(local), true)? {
                return Ok(Some(v));
            }
            if ext.is_some() {
                if let Some(v) = maps.find(&with(bare), false)? {
                    return Ok(Some(v));
                }
            }
        }
        let Some(domain) = domain else {
            return Ok(None);
        };
        if s.localpart_if_local && (fold(domain) == self.myorigin || self.local_domain(domain)?) {
            if let Some(v) = maps.find(local, false)? {
                return Ok(Some(v));
            }
            if ext.is_some() {
                if let Some(v) = maps.find(bare, false)? {
                    return Ok(Some(v));
                }
            }
        }
        if s.at_domain {
            if let Some(v) = maps.find(&format!("@{domain}"), false)? {
                return Ok(Some(v));
            }
        }
        if let Some(parents) = s.domain {
            let mut name = domain.to_string();
            loop {
                if let Some(v) = maps.find(&name, false)? {
                    return Ok(Some(v));
                }
                // Next: "b.c" from "a.b.c" (parent style) or ".b.c".
                let from = usize::from(name.starts_with('.'));
                match name[from..].find('.') {
                    Some(i) => {
                        let next = &name[from + i..];
                        name = if parents {
                            next[1..].to_string()
                        } else {
                            next.to_string()
                        };
                        if name.is_empty() || name == "." {
                            break;
                        }
                    }
                    None => break,
                }
            }
        }
        Ok(None)
    }

    /// `virtual_alias_maps`' answer for `address` (the full address,
    /// without extension, the local part when the domain is local, then
    /// `@domain`), as cleanup looks it up.
    pub fn virtual_alias(&self, address: &str) -> Result<Option<String>, LookupError> {
        self.addr_find(&self.virtual_alias_maps, address, DEFAULT_STRATEGY)
    }

    /// `virtual_mailbox_maps`' answer for `address`.
    pub fn virtual_mailbox(&self, address: &str) -> Result<Option<String>, LookupError> {
        self.addr_find(&self.virtual_mailbox_maps, address, DEFAULT_STRATEGY)
    }

    /// The transport name of `local_transport` (`local`).
    pub fn local_transport(&self) -> &str {
        self.local_transport.split(':').next().unwrap_or("").trim()
    }

    /// The transport name of `virtual_transport` (`virtual`).
    pub fn virtual_transport(&self) -> &str {
        self.virtual_transport
            .split(':')
            .next()
            .unwrap_or("")
            .trim()
    }

    /// `smtpd_reject_unlisted_recipient` (`sender` false) or
    /// `reject_unlisted_sender` (`sender` true) for `address` in mail
    /// from `envelope_sender`: Ok when some table knows the address (or
    /// the class has no table), else the refusal Postfix's smtpd gives.
    pub fn check_listed(
        &self,
        envelope_sender: Option<&str>,
        address: &str,
        sender: bool,
    ) -> Result<(), Refusal> {
        let r = match self.resolve(envelope_sender, address) {
            Ok(r) => r,
            Err(e) => {
                warning!("{e}");
                return Err(Refusal::temporary_lookup_failure());
            }
        };
        let rcpt = r.recipient.as_str();
        let known = |m: &Maps| match self.addr_find(m, rcpt, DEFAULT_STRATEGY) {
            Ok(v) => Ok(v.is_some()),
            Err(_) => Err(Refusal::temporary_lookup_failure()),
        };
        // cleanup will rewrite these: they are someone.
        if known(&self.recipient_canonical_maps)?
            || (sender && known(&self.sender_canonical_maps)?)
            || known(&self.canonical_maps)?
            || known(&self.virtual_alias_maps)?
        {
            return Ok(());
        }
        let unknown_dsn = if sender { "5.1.0" } else { "5.1.1" };
        let table = |name: &str| {
            if self.show_table {
                format!("User unknown in {name} table")
            } else {
                "User unknown".to_string()
            }
        };
        if r.transport == "error" || r.transport == "retry" {
            let error = r.transport == "error";
            let default = match (error, sender) {
                (true, true) => "5.1.0",
                (true, false) => "5.1.1",
                (false, true) => "4.1.0",
                (false, false) => "4.1.1",
            };
            let (dsn, text) = dsn_split(&r.nexthop, default);
            let code = match (error, r.class) {
                (true, Class::Alias) => self.alias_code,
                (true, _) => 550,
                (false, _) => 450,
            };
            return Err(Refusal {
                code,
                dsn: fix_dsn(&dsn, code),
                text,
                lookup_failure: false,
            });
        }
        let local_name = addr::split(rcpt).0;
        let (code, name) = match r.class {
            Class::Local => {
                let m = &self.local_recipient_maps;
                if m.is_empty()
                    || local_name.eq_ignore_ascii_case(&self.double_bounce)
                    || local_name.eq_ignore_ascii_case("postmaster")
                    || local_name.eq_ignore_ascii_case("MAILER-DAEMON")
                    || known(m)?
                {
                    return Ok(());
                }
                (self.local_code, "local recipient")
            }
            Class::Virtual => {
                let m = &self.virtual_mailbox_maps;
                if m.is_empty() || known(m)? {
                    return Ok(());
                }
                (self.virtual_code, "virtual mailbox")
            }
            Class::Relay => {
                let m = &self.relay_recipient_maps;
                if m.is_empty() || known(m)? {
                    return Ok(());
                }
                (self.relay_code, "relay recipient")
            }
            _ => return Ok(()),
        };
        Err(Refusal {
            code,
            dsn: fix_dsn(unknown_dsn, code),
            text: table(name),
            lookup_failure: false,
        })
    }
}

/// The enhanced code's class follows the reply code's (a 450 reject
/// code gives 4.1.1).
fn fix_dsn(dsn: &str, code: u16) -> String {
    let class = if code < 500 { '4' } else { '5' };
    format!("{class}{}", &dsn[1..])
}

/// A domain Postfix's resolver takes: an address literal, or a host
/// name ([`crate::hostname`]); an internationalized name by the same
/// rules with its non-ASCII letters allowed.
fn valid_domain(d: &str) -> bool {
    if d.starts_with('[') {
        return crate::hostname::valid_address_literal(d);
    }
    if d.is_ascii() {
        return crate::hostname::valid_hostname(d);
    }
    d.len() <= crate::hostname::HOSTNAME_MAX
        && d.split('.').all(|l| {
            // Each non-ASCII character stands for a letter.
            let ascii: String = l
                .chars()
                .map(|c| if c.is_ascii() { c } else { 'x' })
                .collect();
            crate::hostname::valid_label(&ascii)
        })
}

#[cfg(test)]
mod tests;
