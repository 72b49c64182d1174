//! The parameters postscreen reads (see man/postscreen.8), read once at
//! start, as root, before privileges are dropped.

use postern_common::maps::Table;
use postern_common::match_list::{Kind, MatchList};
use postern_conf::Config;
use std::path::PathBuf;
use std::time::Duration;

/// What to do with a client that fails a test (Postfix's
/// `postscreen_*_action` values).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Let the client through this time (the test is not recorded as
    /// passed).
    Ignore,
    /// Keep the client in a dummy SMTP dialogue that rejects every
    /// recipient with the test's 550 reply.
    Enforce,
    /// Send the test's 521 reply and hang up.
    Drop,
}

impl Action {
    fn parse(cfg: &Config, name: &str) -> Result<Action, String> {
        let v = cfg.get(name);
        match v.trim().to_ascii_lowercase().as_str() {
            "ignore" => Ok(Action::Ignore),
            "enforce" => Ok(Action::Enforce),
            "drop" => Ok(Action::Drop),
            other => Err(format!(
                "{name} = {other}: expected ignore, enforce or drop"
            )),
        }
    }
}

/// One `postscreen_access_list` item.
#[derive(Debug, Clone)]
pub enum AccessItem {
    PermitMynetworks,
    /// A table (cidr: as Postfix recommends) looked up by client address;
    /// `permit`, `reject` or `dunno`.
    Table(Table),
}

#[derive(Debug, Clone)]
pub struct Settings {
    pub queue_directory: PathBuf,
    /// The `pass` service clients are handed to (`private/NAME`).
    pub smtpd_service_name: String,
    pub myhostname: String,
    pub smtpd_banner: String,
    pub mynetworks: MatchList,
    pub access_list: Vec<AccessItem>,
    pub denylist_action: Action,
    /// "" = no `220-` teaser (the pregreet test still runs).
    pub greet_banner: String,
    pub greet_wait: Duration,
    pub greet_action: Action,
    pub greet_ttl: u64,
    /// The cache file; `None` when `postscreen_cache_map` is empty.
    pub cache_file: Option<PathBuf>,
    /// `postscreen_cache_map` as written, the cache's name in the log.
    pub cache_map: String,
    pub cache_retention: u64,
    /// `postscreen_cache_cleanup_interval`: how often expired entries are
    /// dropped from the cache (0: never).
    pub cache_cleanup_interval: u64,
    /// `postscreen_discard_ehlo_keywords`: EHLO keywords the dialogue
    /// does not offer (upper case).
    pub ehlo_discard: Vec<String>,
    pub command_count_limit: u64,
    /// Connections one client may have in postscreen at once (0: no
    /// limit).
    pub client_connection_count_limit: u64,
    /// Clients in the tests at once (0: no limit).
    pub pre_queue_limit: u64,
    pub command_time_limit: Duration,
    pub dnsbl: crate::dnsbl::Sites,
    pub dnsbl_threshold: i64,
    pub dnsbl_allowlist_threshold: i64,
    pub dnsbl_action: Action,
    pub dnsbl_reply_map: Option<Table>,
    pub dnsbl_min_ttl: u64,
    pub dnsbl_max_ttl: u64,
    pub dnsbl_timeout: Duration,
    pub dns_servers: Vec<std::net::SocketAddr>,
    /// The deep protocol tests (after the 220 greeting), each
    /// (enabled, action, ttl).
    pub pipelining: DeepTest,
    pub non_smtp_command: DeepTest,
    pub bare_newline: DeepTest,
    /// `postscreen_forbidden_commands`: names, and tables the command is
    /// looked up in.
    pub forbidden_commands: Vec<String>,
    pub forbidden_tables: Vec<Table>,
    /// Inline `regexp:{{/re/ result}, ...}` items (Postfix's default has
    /// one: `regexp:{{/^[^A-Z]/ Bogus}}`).
    pub forbidden_patterns: Vec<Vec<postern_common::regexp::Rule>>,
    /// STARTTLS in postscreen's own dialogue
    /// (`postscreen_tls_security_level` may or encrypt), with smtpd's
    /// keys and settings.
    pub tls: Option<std::sync::Arc<rustls::ServerConfig>>,
    /// `encrypt`: no MAIL before STARTTLS.
    pub tls_required: bool,
}

/// The rules of an inline pattern table `regexp:{{rule}, {rule}}` (or
/// `pcre:`), one per line, as a regexp file would hold them.
fn inline_patterns(item: &str) -> Option<String> {
    let body = item
        .strip_prefix("regexp:")
        .or_else(|| item.strip_prefix("pcre:"))?
        .trim()
        .strip_prefix('{')?
        .strip_suffix('}')?;
    let mut rules = String::new();
    let mut rest = body.trim();
    while let Some(r) = rest.strip_prefix('{') {
        let end = r.find('}')?;
        rules.push_str(r[..end].trim());
        rules.push('\n');
        rest = r[end + 1..].trim_start_matches([',', ' ', '\t']);
    }
    rest.is_empty().then_some(rules)
}

/// One deep protocol test's settings.
#[derive(Debug, Clone, Copy)]
pub struct DeepTest {
    pub enabled: bool,
    pub action: Action,
    pub ttl: u64,
}

impl DeepTest {
    fn from_config(cfg: &Config, test: &str) -> Result<DeepTest, String> {
        let n = |what: &str| format!("postscreen_{test}_{what}");
        Ok(DeepTest {
            enabled: cfg.get_bool(&n("enable")).map_err(|e| e.to_string())?,
            action: Action::parse(cfg, &n("action"))?,
            ttl: cfg.get_time(&n("ttl")).map_err(|e| e.to_string())?,
        })
    }
}

impl Settings {
    pub fn from_config(cfg: &Config) -> Result<Settings, String> {
        let time = |n: &str| cfg.get_time(n).map_err(|e| e.to_string());
        let mut access_list = Vec::new();
        for item in postern_common::maps::split_specs(&cfg.get("postscreen_access_list")) {
            if item.eq_ignore_ascii_case("permit_mynetworks") {
                access_list.push(AccessItem::PermitMynetworks);
            } else if item.contains(':') {
                let t = Table::open(&item).map_err(|e| format!("postscreen_access_list: {e}"))?;
                access_list.push(AccessItem::Table(t));
            } else {
                return Err(format!(
                    "postscreen_access_list: \"{item}\": expected permit_mynetworks or type:table"
                ));
            }
        }
        let cache_map = cfg.get("postscreen_cache_map");
        let cache_file = match cache_map.trim() {
            "" => None,
            m => Some(PathBuf::from(m.split_once(':').map_or(m, |(_, p)| p))),
        };
        let reply_map = cfg.get("postscreen_dnsbl_reply_map");
        let dnsbl_reply_map = match reply_map.trim() {
            "" => None,
            m => Some(Table::open(m).map_err(|e| format!("postscreen_dnsbl_reply_map: {e}"))?),
        };
        let (mut forbidden_commands, mut forbidden_tables) = (Vec::new(), Vec::new());
        let mut forbidden_patterns = Vec::new();
        // Its default is `$smtpd_forbidden_commands`, a parameter of
        // Postfix's smtpd that Postern's does not read (so has no default
        // of its own): Postfix's default stands in for it.
        let mut with_smtpd = cfg.clone();
        if cfg.raw("smtpd_forbidden_commands").is_none() {
            if let Some(r) = postern_conf::postfix_params::find("smtpd_forbidden_commands") {
                with_smtpd.set_overrides([(
                    "smtpd_forbidden_commands".to_string(),
                    r.postfix_default.to_string(),
                )]);
            }
        }
        let forbidden = with_smtpd.get("postscreen_forbidden_commands");
        for item in postern_common::maps::split_specs(&forbidden) {
            if let Some(rules) = inline_patterns(&item) {
                let rules = postern_common::regexp::parse(&rules)
                    .map_err(|e| format!("postscreen_forbidden_commands: {item}: {e}"))?;
                forbidden_patterns.push(rules);
            } else if item.contains(':') {
                let t = Table::open(&item)
                    .map_err(|e| format!("postscreen_forbidden_commands: {e}"))?;
                forbidden_tables.push(t);
            } else {
                forbidden_commands.push(item.to_ascii_uppercase());
            }
        }
        let level = cfg
            .get("postscreen_tls_security_level")
            .trim()
            .to_ascii_lowercase();
        let tls = match level.as_str() {
            "" | "none" => None,
            "may" | "encrypt" => Some(
                postern_common::tls::smtpd_server_config(cfg)
                    .map(|t| t.config)
                    .map_err(|e| format!("postscreen_tls_security_level = {level}: {e}"))?,
            ),
            other => {
                return Err(format!(
                    "postscreen_tls_security_level = {other}: expected none, may or encrypt"
                ))
            }
        };
        let int = |n: &str| -> Result<i64, String> {
            let v = cfg.get(n);
            v.trim()
                .parse()
                .map_err(|_| format!("{n} = {v}: expected a whole number"))
        };
        Ok(Settings {
            // `/` in the chroot jail.
            queue_directory: postern_common::service::queue_directory(cfg),
            smtpd_service_name: cfg.get("smtpd_service_name"),
            myhostname: cfg.get("myhostname"),
            smtpd_banner: cfg.get("smtpd_banner"),
            mynetworks: MatchList::from_config(cfg, "mynetworks", Kind::Address)?,
            access_list,
            denylist_action: Action::parse(cfg, "postscreen_denylist_action")?,
            greet_banner: cfg.get("postscreen_greet_banner"),
            greet_wait: Duration::from_secs(time("postscreen_greet_wait")?),
            greet_action: Action::parse(cfg, "postscreen_greet_action")?,
            greet_ttl: time("postscreen_greet_ttl")?,
            cache_file,
            cache_map: cache_map.trim().to_string(),
            cache_retention: time("postscreen_cache_retention_time")?,
            cache_cleanup_interval: time("postscreen_cache_cleanup_interval")?,
            ehlo_discard: cfg
                .get("postscreen_discard_ehlo_keywords")
                .split(|c: char| c == ',' || c.is_whitespace())
                .filter(|w| !w.is_empty())
                .map(|w| w.to_ascii_uppercase())
                .collect(),
            command_count_limit: cfg
                .get_u64("postscreen_command_count_limit")
                .map_err(|e| e.to_string())?,
            client_connection_count_limit: cfg
                .get_u64("postscreen_client_connection_count_limit")
                .map_err(|e| e.to_string())?,
            pre_queue_limit: cfg
                .get_u64("postscreen_pre_queue_limit")
                .map_err(|e| e.to_string())?,
            command_time_limit: Duration::from_secs(time("postscreen_command_time_limit")?),
            dnsbl: crate::dnsbl::Sites::parse(&cfg.get("postscreen_dnsbl_sites"))?,
            dnsbl_threshold: int("postscreen_dnsbl_threshold")?,
            dnsbl_allowlist_threshold: int("postscreen_dnsbl_allowlist_threshold")?,
            dnsbl_action: Action::parse(cfg, "postscreen_dnsbl_action")?,
            dnsbl_reply_map,
            dnsbl_min_ttl: time("postscreen_dnsbl_min_ttl")?,
            dnsbl_max_ttl: time("postscreen_dnsbl_max_ttl")?,
            dnsbl_timeout: Duration::from_secs(time("postscreen_dnsbl_timeout")?),
            dns_servers: postern_common::dns::servers_from_config(cfg),
            pipelining: DeepTest::from_config(cfg, "pipelining")?,
            non_smtp_command: DeepTest::from_config(cfg, "non_smtp_command")?,
            bare_newline: DeepTest::from_config(cfg, "bare_newline")?,
            forbidden_commands,
            forbidden_tables,
            forbidden_patterns,
            tls,
            tls_required: level == "encrypt",
        })
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn inline_pattern_tables() {
        assert_eq!(
            super::inline_patterns("regexp:{{/^[^A-Z]/ Bogus}}").as_deref(),
            Some("/^[^A-Z]/ Bogus\n")
        );
        assert_eq!(
            super::inline_patterns("pcre:{{/^GET/ x}, {/^POST/ y}}").as_deref(),
            Some("/^GET/ x\n/^POST/ y\n")
        );
        assert_eq!(super::inline_patterns("regexp:/etc/x"), None);
        assert_eq!(super::inline_patterns("CONNECT"), None);
    }
}
