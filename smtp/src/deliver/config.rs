//! What the agent reads from main.cf (the `smtp_*` parameters, for LMTP
//! the `lmtp_*` forms), and what it looks up per destination: the TLS
//! policy (`smtp_tls_policy_maps`) and the SASL credentials
//! (`smtp_sasl_password_maps`).

use super::{Agent, Bind};
use crate::cache::Cache;
use crate::client::{Settings, Timeouts};
use crate::nexthop;
use crate::sasl;
use crate::tls;
use postern_common::maps::{LookupError, Tables};
use postern_common::{error, warning};
use postern_conf::Config;
use std::sync::Mutex;
use std::time::Duration;

/// The parameter that configures `smtp_NAME` in this mode (see
/// [`postern_conf::params::smtp_client_param`]).
pub fn param(lmtp: bool, smtp_name: &str) -> String {
    postern_conf::params::smtp_client_param(lmtp, smtp_name)
}

/// A time parameter, with its default when the setting is unusable.
fn time(cfg: &Config, name: &str) -> Duration {
    let secs = cfg.get_time(name).unwrap_or_else(|e| {
        warning!("{e}; using the default");
        postern_conf::params::default_of(name)
            .and_then(postern_conf::parse_time)
            .unwrap_or(300)
    });
    Duration::from_secs(secs)
}

/// An address parameter; None when empty (or unusable, with a warning).
fn bind_address(cfg: &Config, name: &str) -> Option<std::net::IpAddr> {
    let v = cfg.get(name);
    let v = v.trim().trim_start_matches('[').trim_end_matches(']');
    if v.is_empty() {
        return None;
    }
    match v.parse() {
        Ok(a) => Some(a),
        Err(_) => {
            warning!("{name}: \"{v}\" is not an IP address; ignored");
            None
        }
    }
}

fn number(cfg: &Config, name: &str) -> usize {
    cfg.get_u64(name).unwrap_or_else(|e| {
        warning!("{e}; using the default");
        postern_conf::params::default_of(name)
            .and_then(|d| d.parse().ok())
            .unwrap_or(0)
    }) as usize
}

impl Agent {
    /// Reads the `smtp_*` (for LMTP, `lmtp_*` where Postern has them),
    /// `inet_protocols` and `dns_resolver_*` parameters.
    pub fn from_config(cfg: &Config, lmtp: bool) -> Agent {
        let p = |n: &str| param(lmtp, n);
        let dns_servers = postern_common::dns::servers_from_config(cfg);
        Agent {
            settings: Settings {
                helo_name: cfg.get(&p("smtp_helo_name")),
                timeouts: Timeouts {
                    helo: time(cfg, &p("smtp_helo_timeout")),
                    mail: time(cfg, &p("smtp_mail_timeout")),
                    rcpt: time(cfg, &p("smtp_rcpt_timeout")),
                    data_init: time(cfg, &p("smtp_data_init_timeout")),
                    data_xfer: time(cfg, &p("smtp_data_xfer_timeout")),
                    data_done: time(cfg, &p("smtp_data_done_timeout")),
                    quit: time(cfg, &p("smtp_quit_timeout")),
                },
                lmtp,
                keep: cfg
                    .get_bool(&p("smtp_connection_cache_on_demand"))
                    .unwrap_or(true),
                discard: cfg
                    .get_list(&p("smtp_discard_ehlo_keywords"))
                    .iter()
                    .map(|k| k.to_ascii_lowercase())
                    .collect(),
                line_limit: number(cfg, &p("smtp_line_length_limit")),
                send_xforward: cfg
                    .get_bool(&p("smtp_send_xforward_command"))
                    .unwrap_or(false),
                xforward_timeout: time(cfg, &p("smtp_xforward_timeout")),
                skip_quit_response: cfg.get_bool(&p("smtp_skip_quit_response")).unwrap_or(!lmtp),
            },
            connect_timeout: time(cfg, &p("smtp_connect_timeout")),
            options: nexthop::Options::protocols(
                &cfg.get_list("inet_protocols"),
                number(cfg, &p("smtp_mx_address_limit")),
            ),
            session_limit: number(cfg, &p("smtp_mx_session_limit")),
            dns_servers,
            dns_timeout: time(cfg, "dns_resolver_timeout"),
            resolver: Mutex::new(None),
            lmtp,
            queue_dir: postern_common::service::queue_directory(cfg),
            myhostname: cfg.get("myhostname"),
            tls_level: {
                let name = p("smtp_tls_security_level");
                let v = cfg.get(&name);
                tls::Level::parse(&v).unwrap_or_else(|| {
                    warning!("{name}: invalid TLS security level \"{v}\"; using \"may\"");
                    tls::Level::May
                })
            },
            tls_policy_maps: {
                let (t, errors) = Tables::open_list(&cfg.get(&p("smtp_tls_policy_maps")));
                for e in errors {
                    error!("{}: {e}", p("smtp_tls_policy_maps"));
                }
                t
            },
            dnssec: {
                let v = cfg.get(&p("smtp_dns_support_level"));
                match v.trim() {
                    "dnssec" => true,
                    "" | "enabled" | "disabled" => false,
                    other => {
                        warning!(
                            "{}: unknown value \"{other}\"; using \"enabled\"",
                            p("smtp_dns_support_level")
                        );
                        false
                    }
                }
            },
            dane_insecure_mx: {
                let name = p("smtp_tls_dane_insecure_mx_policy");
                let v = cfg.get(&name);
                postern_common::dane::InsecureMx::parse(&v).unwrap_or_else(|| {
                    warning!("{name}: invalid value \"{v}\"; using \"may\"");
                    postern_common::dane::InsecureMx::May
                })
            },
            dane_digests: {
                let (d, bad) =
                    postern_common::dane::Digests::parse(&cfg.get_list("tls_dane_digests"));
                for w in bad {
                    warning!("tls_dane_digests: unsupported digest \"{w}\"; ignored");
                }
                d
            },
            ca_file: cfg.get(&p("smtp_tls_CAfile")),
            ca_path: cfg.get(&p("smtp_tls_CApath")),
            tls_loglevel: number(cfg, &p("smtp_tls_loglevel")) as u32,
            tls_session_cache_timeout: cfg
                .get_time(&p("smtp_tls_session_cache_timeout"))
                .unwrap_or(3600),
            tls_wrapper: cfg.get_bool(&p("smtp_tls_wrappermode")).unwrap_or(false),
            tls_profiles: [false, true].map(|mandatory| {
                let side = if lmtp { "lmtp" } else { "smtp" };
                let prof = postern_common::tls::profile(cfg, side, mandatory).unwrap_or_else(|e| {
                    error!("{e}; using every protocol and cipher");
                    postern_common::tls::Profile {
                        versions: vec![
                            &postern_common::tls::rustls::version::TLS13,
                            &postern_common::tls::rustls::version::TLS12,
                        ],
                        provider: postern_common::tls::provider(),
                    }
                });
                std::sync::Arc::new(prof)
            }),
            min_backoff: time(cfg, "minimal_backoff_time"),
            sasl_enable: cfg.get_bool(&p("smtp_sasl_auth_enable")).unwrap_or(false),
            sasl_maps: {
                let (t, errors) = Tables::open_list(&cfg.get(&p("smtp_sasl_password_maps")));
                for e in errors {
                    // Every delivery through an AUTH smarthost fails until
                    // it is fixed.
                    error!("{}: {e}", p("smtp_sasl_password_maps"));
                }
                t
            },
            sasl_plain_opts: sasl::SecurityOptions::parse(
                &cfg.get_list(&p("smtp_sasl_security_options")),
            ),
            sasl_tls_opts: sasl::SecurityOptions::parse(
                &cfg.get_list(&p("smtp_sasl_tls_security_options")),
            ),
            sasl_filter: postern_common::match_list::MatchList::from_config(
                cfg,
                &p("smtp_sasl_mechanism_filter"),
                postern_common::match_list::Kind::String,
            )
            .unwrap_or_else(|e| {
                // A list that cannot be read allows no mechanism (never
                // one the administrator filtered out).
                error!("{e}");
                postern_common::match_list::MatchList::parse(
                    "!*",
                    postern_common::match_list::Kind::String,
                    false,
                )
                .unwrap_or_default()
            }),
            sender_dependent: cfg
                .get_bool(&p("smtp_sender_dependent_authentication"))
                .unwrap_or(false),
            bind: Bind {
                v4: bind_address(cfg, &p("smtp_bind_address")),
                v6: bind_address(cfg, &p("smtp_bind_address6")),
                enforce: cfg
                    .get_bool(&p("smtp_bind_address_enforce"))
                    .unwrap_or(false),
            },
            debug_peer: postern_common::debug_peer::DebugPeer::from_config(cfg).unwrap_or_else(
                |e| {
                    warning!("{e}");
                    Default::default()
                },
            ),
            content_checks: {
                let (checks, errors) =
                    postern_common::header_checks::CheckTables::open(|n| cfg.get(&p(n)), "smtp_");
                for e in &errors {
                    error!("{e}; deliveries are deferred until it is fixed");
                }
                match errors.into_iter().next() {
                    Some(e) => Err(e),
                    None => Ok(checks),
                }
            },
            reply_rules: {
                let (t, bad) =
                    postern_common::maps::Tables::open_list(&cfg.get("delivery_reply_rules"));
                for e in bad {
                    warning!("delivery_reply_rules: {e}");
                }
                t
            },
            sts: crate::sts::StsClient::from_config(cfg, lmtp),
            tls_rpt: crate::sts::report_store(cfg),
            cache: Cache::new(
                time(cfg, &p("smtp_connection_cache_time_limit")),
                time(cfg, &p("smtp_connection_reuse_time_limit")),
                time(cfg, &p("smtp_quit_timeout")),
            ),
        }
    }

    /// The credentials for a session, if AUTH is enabled and the table
    /// has an entry (see [`crate::sasl`] for the lookup order). Err: the
    /// table could not answer; the mail is deferred, never sent without
    /// the credentials it may need.
    pub(super) fn sasl_auth(
        &self,
        sender: &str,
        dest: &str,
        host: &str,
    ) -> Result<Option<sasl::Auth>, LookupError> {
        if !self.sasl_enable || self.sasl_maps.is_empty() {
            return Ok(None);
        }
        let mut keys: Vec<String> = Vec::new();
        if self.sender_dependent && !sender.is_empty() {
            keys.push(sender.to_ascii_lowercase());
            if let Some(at) = sender.rfind('@') {
                keys.push(sender[at..].to_ascii_lowercase());
            }
        }
        keys.push(dest.trim().to_ascii_lowercase());
        keys.push(host.to_ascii_lowercase());
        let mut value = None;
        for k in &keys {
            if let Some(v) = self.sasl_maps.lookup(k)? {
                value = Some(v);
                break;
            }
        }
        let Some(value) = value else {
            return Ok(None);
        };
        let Some(creds) = sasl::Credentials::parse(&value) else {
            warning!("smtp_sasl_password_maps: entry for {host} is not in username:password form");
            return Ok(None);
        };
        Ok(Some(sasl::Auth {
            creds,
            plain_opts: self.sasl_plain_opts,
            tls_opts: self.sasl_tls_opts,
            filter: self.sasl_filter.clone(),
        }))
    }

    /// The `smtp_tls_policy_maps` entry of a destination: by the next hop
    /// as given, then by its host or domain, then by each parent domain
    /// as `.parent`; None: no entry (the level applies). Err: the table
    /// could not answer; the mail is deferred, never sent without its
    /// policy.
    pub(super) fn tls_policy_entry(
        &self,
        dest: &str,
        host: &str,
    ) -> Result<Option<tls::Policy>, LookupError> {
        let mut keys = vec![dest.trim().to_ascii_lowercase(), host.to_ascii_lowercase()];
        // As Postfix: ".example.com" matches the subdomains of example.com.
        let mut rest = host.to_ascii_lowercase();
        while let Some(i) = rest.find('.') {
            rest = rest[i + 1..].to_string();
            if rest.is_empty() {
                break;
            }
            keys.push(format!(".{rest}"));
        }
        for k in &keys {
            if let Some(v) = self.tls_policy_maps.lookup(k)? {
                match tls::Policy::parse(&v) {
                    Ok(p) => return Ok(Some(p)),
                    Err(e) => {
                        warning!("smtp_tls_policy_maps: {k}: {e}; using \"encrypt\"");
                        return Ok(Some(tls::Policy {
                            level: tls::Level::Encrypt,
                            matches: Vec::new(),
                        }));
                    }
                }
            }
        }
        Ok(None)
    }

    /// The policy of a destination without a policy table entry:
    /// `smtp_tls_security_level`.
    pub(super) fn default_tls_policy(&self) -> tls::Policy {
        tls::Policy {
            level: self.tls_level,
            matches: Vec::new(),
        }
    }

    /// What a session with `server` (named `name`) needs for TLS, as
    /// `plan` says; `observe` is told how the TLS went.
    pub(super) fn tls_client(
        &self,
        plan: &super::Plan,
        name: &str,
        nexthop: &str,
        observe: Option<std::sync::Arc<Mutex<Option<tls::Observed>>>>,
    ) -> Option<tls::Client> {
        let mut policy = plan.policy.clone();
        if self.tls_wrapper && policy.level < tls::Level::Encrypt {
            // Wrapper mode is TLS or nothing.
            policy.level = tls::Level::Encrypt;
        }
        if policy.level == tls::Level::None {
            return None;
        }
        Some(tls::Client {
            wrapper: self.tls_wrapper,
            policy: policy.clone(),
            names: policy.names(name, nexthop),
            // MTA-STS: WebPKI, the system's roots with the configured ones.
            roots: if plan.sts.is_some() {
                tls::web_roots(&self.ca_file, &self.ca_path)
            } else {
                tls::roots(&self.ca_file, &self.ca_path)
            },
            loglevel: self.tls_loglevel,
            session_cache_timeout: self.tls_session_cache_timeout,
            profile: self.tls_profiles[usize::from(policy.level.required())].clone(),
            dane: plan.dane.clone(),
            observe,
        })
    }

    /// Reads the CA certificates (kept for the process's life).
    pub fn load_tls_roots(&self) {
        let _ = tls::roots(&self.ca_file, &self.ca_path);
        if self.sts.is_some() {
            let _ = tls::web_roots(&self.ca_file, &self.ca_path);
        }
    }
}
