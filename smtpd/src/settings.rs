//! The parameters smtpd reads, once, at start.

use crate::restrictions::Restrictions;
use crate::sasl::{self, AuthTarget};
use postern_common::error;
use postern_common::queue::QueueTree;
use postern_common::tls::{self, ServerTls};
use postern_common::warning;
use postern_conf::Config;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

/// Everything the sessions and the event loop need from the configuration.
#[derive(Debug, Clone)]
pub struct Settings {
    pub myhostname: String,
    pub mail_name: String,
    /// The text after `220 ` in the greeting.
    pub banner: String,
    /// 0 = no limit.
    pub message_size_limit: u64,
    /// Where the queue is, for the free-space check at MAIL FROM.
    pub queue_directory: PathBuf,
    /// `queue_minfree`: bytes that must stay free in the queue file system.
    pub queue_minfree: u64,
    /// 0 = no limit.
    pub recipient_limit: usize,
    pub hard_error_limit: u32,
    /// `smtpd_soft_error_limit`: from this many errors on, every reply
    /// waits `error_sleep` (Postfix's tarpit).
    pub soft_error_limit: u32,
    pub error_sleep: Duration,
    pub helo_required: bool,
    pub disable_vrfy: bool,
    /// `fast_flush_domains`: the domains ETRN may flush (459 otherwise).
    pub fast_flush_domains: postern_common::match_list::MatchList,
    /// The queue, as this process sees it (`/` in a chroot jail): ETRN
    /// makes deferred files due and wakes qmgr here.
    pub queue: QueueTree,
    /// Longest command line; content lines longer than this are passed on
    /// in pieces.
    pub line_limit: usize,
    pub restrictions: Restrictions,
    /// Every read from and write to a client.
    pub timeout: Duration,
    /// Waiting for cleanup's answer.
    pub ipc_timeout: Duration,
    /// Exit after this long without a session.
    pub max_idle: Duration,
    /// Sessions one process serves at once.
    pub session_limit: usize,
    /// cleanup's socket (`queue_directory/public/cleanup`, as Postfix's
    /// master.cf declares cleanup public).
    pub cleanup_socket: PathBuf,
    /// `smtpd_tls_security_level`.
    pub tls_level: TlsLevel,
    /// The server's TLS configuration; None when TLS is off, or when the
    /// certificate could not be loaded (STARTTLS then answers 454).
    pub tls: Option<Arc<ServerTls>>,
    /// `smtpd_tls_wrappermode`: TLS from the first byte (port 465).
    pub tls_wrappermode: bool,
    /// `smtpd_tls_auth_only` (implied by level `encrypt`).
    pub tls_auth_only: bool,
    /// `smtpd_tls_received_header`.
    pub tls_received_header: bool,
    /// `smtpd_tls_loglevel`: 1 and up log each established TLS session.
    pub tls_loglevel: u64,
    /// `smtpd_sasl_auth_enable` with `smtpd_sasl_type = dovecot`: where
    /// the auth server is.
    pub sasl: Option<AuthTarget>,
    /// `smtpd_sasl_service`.
    pub sasl_service: String,
    /// `smtpd_sasl_authenticated_header`.
    pub sasl_authenticated_header: bool,
    /// `broken_sasl_auth_clients`: also announce `AUTH=MECHS`.
    pub broken_sasl_auth_clients: bool,
    /// `dns_resolver_addresses` (Postern-only; empty: /etc/resolv.conf).
    pub dns_servers: Vec<std::net::SocketAddr>,
    /// `dns_resolver_timeout`.
    pub dns_timeout: Duration,
    /// The verify service, for `reject_unverified_*`.
    pub verify: crate::verify_lookup::VerifyLookup,
    /// `smtpd_peername_lookup`: look up the client's host name at connect.
    pub peername_lookup: bool,
    /// `smtpd_delay_open_until_valid_rcpt`: the queue file is opened at
    /// the first accepted RCPT TO (yes) or at MAIL FROM (no).
    pub delay_open_until_valid_rcpt: bool,
    /// The client limits (`smtpd_client_*_limit`, `anvil_rate_time_unit`).
    pub anvil: crate::anvil::Limits,
    /// The master.cf service name, for log lines.
    pub service: String,
    /// `smtputf8_enable`: EHLO offers SMTPUTF8 and MAIL FROM takes it.
    pub smtputf8_enable: bool,
    /// `smtpd_requiretls_enable` (Postern): EHLO over TLS offers
    /// REQUIRETLS (RFC 8689) and MAIL FROM takes it there.
    pub requiretls_enable: bool,
    /// `strict_smtputf8`: a non-ASCII address only in an SMTPUTF8
    /// transaction (553 5.6.7 otherwise).
    pub strict_smtputf8: bool,
    /// `smtpd_forbid_unauth_pipelining`: hang up on a client that talks
    /// before the greeting (RFC 5321 4.3.1), instead of only logging it.
    pub forbid_unauth_pipelining: bool,
    /// `content_filter`: the after-queue filter (`transport:nexthop`)
    /// recorded for each message ("" on a reinjection service).
    pub content_filter: String,
    /// `receive_override_options`.
    pub receive_override: postern_common::receive_override::ReceiveOverride,
    /// `smtpd_authorized_xforward_hosts`.
    pub xforward_hosts: postern_common::match_list::MatchList,
    /// `debug_peer_list`, `debug_peer_level`: the clients whose sessions
    /// log verbosely.
    pub debug_peer: postern_common::debug_peer::DebugPeer,
    /// `smtpd_tls_ask_ccert`: the digest of `smtpd_tls_fingerprint_digest`
    /// and the verifier of `smtpd_tls_CAfile` for client certificates.
    pub ccert: Option<Ccert>,
    /// `smtpd_command_filter`.
    pub command_filter: Option<postern_common::maps::Table>,
    /// `smtpd_discard_ehlo_keywords`.
    pub ehlo_discard: String,
    /// `smtpd_discard_ehlo_keyword_address_maps` (by client address).
    pub ehlo_discard_maps: Option<postern_common::maps::Tables>,
    /// `smtpd_milters` and the `milter_*` settings, when milters are set.
    pub milters: Option<Arc<postern_common::milter::Settings>>,
    /// `smtpd_milter_maps` (by client address), with the `milter_*`
    /// settings its answers are read with.
    pub milter_maps: Option<(
        postern_common::maps::Tables,
        Arc<postern_common::milter::Settings>,
    )>,
    /// `smtpd_proxy_filter` and its settings, when one is set.
    pub proxy: Option<Arc<crate::proxy::ProxySettings>>,
}

/// How smtpd reads client certificates.
#[derive(Clone)]
pub struct Ccert {
    pub digest: &'static postern_common::tls_ccert::DigestAlgorithm,
    pub trust:
        Option<std::sync::Arc<dyn postern_common::tls::rustls::server::danger::ClientCertVerifier>>,
}

impl std::fmt::Debug for Ccert {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ccert")
            .field("trust", &self.trust.is_some())
            .finish()
    }
}

/// `smtpd_tls_security_level`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsLevel {
    None,
    May,
    Encrypt,
}

impl TlsLevel {
    pub fn parse(v: &str) -> Result<TlsLevel, String> {
        match v.trim().to_ascii_lowercase().as_str() {
            "" | "none" => Ok(TlsLevel::None),
            "may" => Ok(TlsLevel::May),
            "encrypt" => Ok(TlsLevel::Encrypt),
            other => Err(format!(
                "invalid smtpd_tls_security_level value: \"{other}\""
            )),
        }
    }
}

impl Settings {
    /// The milters of a session from `addr` (`smtpd_milter_maps`, else
    /// `smtpd_milters`). A `DISABLE` answer: none. A table that cannot
    /// answer, or an answer that is no milter list: `smtpd_milters`, with
    /// a warning.
    pub fn milters_for(
        &self,
        addr: std::net::IpAddr,
    ) -> Option<Arc<postern_common::milter::Settings>> {
        let Some((maps, base)) = &self.milter_maps else {
            return self.milters.clone();
        };
        let key = addr.to_string();
        match maps.lookup(&key) {
            Ok(None) => self.milters.clone(),
            Ok(Some(v)) if v.trim().eq_ignore_ascii_case("DISABLE") => None,
            Ok(Some(v)) => match base.with_list(&v, "smtpd_milter_maps") {
                Ok(s) if s.milters.is_empty() => None,
                Ok(s) => Some(Arc::new(s)),
                Err(e) => {
                    warning!("smtpd_milter_maps: {key}: {e}");
                    self.milters.clone()
                }
            },
            Err(e) => {
                warning!("smtpd_milter_maps: {key}: {e}");
                self.milters.clone()
            }
        }
    }

    pub fn from_config(cfg: &Config) -> Result<Settings, String> {
        let e = |e: postern_conf::ConfError| e.to_string();
        let tls_level = TlsLevel::parse(&cfg.get("smtpd_tls_security_level"))?;
        let tls_wrappermode = cfg.get_bool("smtpd_tls_wrappermode").map_err(e)?;
        let tls = if tls_level != TlsLevel::None || tls_wrappermode {
            match tls::smtpd_server_config(cfg) {
                Ok(c) => Some(Arc::new(c)),
                Err(why) => {
                    // An error, not a warning: clients lose STARTTLS
                    // (and with `encrypt` every mail) until it is fixed.
                    error!("cannot load TLS certificate and key: {why}");
                    warning!("TLS is not available");
                    None
                }
            }
        } else {
            None
        };
        let sasl = if cfg.get_bool("smtpd_sasl_auth_enable").map_err(e)? {
            let kind = cfg.get("smtpd_sasl_type");
            if kind != "dovecot" {
                return Err(format!("unsupported SASL server implementation: {kind}"));
            }
            let queue = postern_common::service::queue_directory(cfg);
            Some(sasl::parse_path(&cfg.get("smtpd_sasl_path"), &queue)?)
        } else {
            None
        };
        let restrictions = Restrictions::from_config(cfg)?;
        // receive_override_options = no_milters (a content filter's
        // reinjection smtpd): no milters at all.
        let no_milters = postern_common::receive_override::ReceiveOverride::parse(
            &cfg.get("receive_override_options"),
        )
        .is_ok_and(|r| r.cleanup_flags & postern_common::ipc::cleanup_flags::NO_MILTERS != 0);
        let milter_settings = if no_milters {
            None
        } else {
            Some(postern_common::milter::Settings::from_config(
                cfg,
                "smtpd_milters",
            )?)
        };
        Ok(Settings {
            myhostname: cfg.get("myhostname"),
            mail_name: cfg.get("mail_name"),
            banner: cfg.get("smtpd_banner"),
            message_size_limit: cfg.get_u64("message_size_limit").map_err(e)?,
            queue_directory: postern_common::service::queue_directory(cfg),
            queue_minfree: cfg.get_u64("queue_minfree").map_err(e)?,
            recipient_limit: cfg.get_u64("smtpd_recipient_limit").map_err(e)? as usize,
            hard_error_limit: cfg.get_u64("smtpd_hard_error_limit").map_err(e)?.max(1) as u32,
            soft_error_limit: cfg.get_u64("smtpd_soft_error_limit").map_err(e)? as u32,
            error_sleep: Duration::from_secs(cfg.get_time("smtpd_error_sleep_time").map_err(e)?),
            helo_required: cfg.get_bool("smtpd_helo_required").map_err(e)?,
            disable_vrfy: cfg.get_bool("disable_vrfy_command").map_err(e)?,
            fast_flush_domains: postern_common::match_list::MatchList::from_config(
                cfg,
                "fast_flush_domains",
                postern_common::match_list::Kind::Domain,
            )?,
            queue: QueueTree::configured(postern_common::service::queue_directory(cfg), cfg),
            line_limit: (cfg.get_u64("line_length_limit").map_err(e)? as usize).max(512),
            restrictions,
            verify: crate::verify_lookup::VerifyLookup::from_config(cfg)?,
            timeout: Duration::from_secs(cfg.get_time("smtpd_timeout").map_err(e)?.max(1)),
            ipc_timeout: Duration::from_secs(cfg.get_time("ipc_timeout").map_err(e)?.max(1)),
            max_idle: Duration::from_secs(cfg.get_time("max_idle").map_err(e)?.max(1)),
            session_limit: cfg.get_u64("smtpd_client_session_limit").map_err(e)?.max(1) as usize,
            // `cleanup_service_name` (a master.cf `-o` gives submission
            // its own, header-scrubbing cleanup): public/NAME, as Postfix.
            cleanup_socket: QueueTree::new(postern_common::service::queue_directory(cfg))
                .socket(false, cfg.get("cleanup_service_name").trim()),
            tls_auth_only: tls_level == TlsLevel::Encrypt
                || cfg.get_bool("smtpd_tls_auth_only").map_err(e)?,
            tls_level,
            tls,
            tls_wrappermode,
            tls_received_header: cfg.get_bool("smtpd_tls_received_header").map_err(e)?,
            tls_loglevel: cfg.get_u64("smtpd_tls_loglevel").map_err(e)?,
            sasl,
            sasl_service: cfg.get("smtpd_sasl_service"),
            sasl_authenticated_header: cfg
                .get_bool("smtpd_sasl_authenticated_header")
                .map_err(e)?,
            broken_sasl_auth_clients: cfg.get_bool("broken_sasl_auth_clients").map_err(e)?,
            dns_servers: postern_common::dns::servers_from_config(cfg),
            dns_timeout: Duration::from_secs(cfg.get_time("dns_resolver_timeout").map_err(e)?),
            peername_lookup: cfg.get_bool("smtpd_peername_lookup").map_err(e)?,
            delay_open_until_valid_rcpt: cfg
                .get_bool("smtpd_delay_open_until_valid_rcpt")
                .map_err(e)?,
            anvil: crate::anvil::Limits {
                connection_count: cfg
                    .get_u64("smtpd_client_connection_count_limit")
                    .map_err(e)? as u32,
                connection_rate: cfg
                    .get_u64("smtpd_client_connection_rate_limit")
                    .map_err(e)? as u32,
                message_rate: cfg.get_u64("smtpd_client_message_rate_limit").map_err(e)? as u32,
                recipient_rate: cfg
                    .get_u64("smtpd_client_recipient_rate_limit")
                    .map_err(e)? as u32,
                auth_rate: cfg.get_u64("smtpd_client_auth_rate_limit").map_err(e)? as u32,
                time_unit: Duration::from_secs(
                    cfg.get_time("anvil_rate_time_unit").map_err(e)?.max(1),
                ),
                exceptions: postern_common::match_list::MatchList::from_config(
                    cfg,
                    "smtpd_client_event_limit_exceptions",
                    postern_common::match_list::Kind::NameAddress,
                )?,
            },
            service: "smtpd".into(),
            smtputf8_enable: cfg.get_bool("smtputf8_enable").map_err(e)?,
            strict_smtputf8: cfg.get_bool("strict_smtputf8").map_err(e)?,
            requiretls_enable: cfg.get_bool("smtpd_requiretls_enable").map_err(e)?,
            forbid_unauth_pipelining: cfg.get_bool("smtpd_forbid_unauth_pipelining").map_err(e)?,
            content_filter: cfg.get("content_filter").trim().to_string(),
            receive_override: postern_common::receive_override::ReceiveOverride::parse(
                &cfg.get("receive_override_options"),
            )?,
            xforward_hosts: postern_common::match_list::MatchList::from_config(
                cfg,
                "smtpd_authorized_xforward_hosts",
                postern_common::match_list::Kind::NameAddress,
            )?,
            debug_peer: postern_common::debug_peer::DebugPeer::from_config(cfg)?,
            ccert: if tls_level != TlsLevel::None || tls_wrappermode {
                if cfg.get_bool("smtpd_tls_ask_ccert").map_err(e)? {
                    Some(Ccert {
                        digest: postern_common::tls_ccert::digest_of(
                            &cfg.get("smtpd_tls_fingerprint_digest"),
                        )?,
                        trust: postern_common::tls_ccert::trust_verifier(cfg)?,
                    })
                } else {
                    None
                }
            } else {
                None
            },
            command_filter: {
                let spec = cfg.get("smtpd_command_filter");
                let spec = spec.trim();
                (!spec.is_empty()).then(|| {
                    let (t, e) = postern_common::maps::Table::open_or_unavailable(spec);
                    if let Some(e) = e {
                        postern_common::warning!("smtpd_command_filter: {e}");
                    }
                    t
                })
            },
            milters: match &milter_settings {
                Some(s) if !s.milters.is_empty() => Some(Arc::new(s.clone())),
                _ => None,
            },
            milter_maps: {
                let spec = cfg.get("smtpd_milter_maps");
                match &milter_settings {
                    Some(s) if !spec.trim().is_empty() => {
                        let (t, errors) = postern_common::maps::Tables::open_list(&spec);
                        for e in errors {
                            warning!("smtpd_milter_maps: {e}");
                        }
                        Some((t, Arc::new(s.clone())))
                    }
                    _ => None,
                }
            },
            proxy: {
                let spec = cfg.get("smtpd_proxy_filter");
                let spec = spec.trim();
                if spec.is_empty() {
                    None
                } else {
                    let queue = postern_common::service::queue_directory(cfg);
                    Some(Arc::new(crate::proxy::ProxySettings {
                        service: spec.to_string(),
                        endpoint: postern_common::proxy_filter::Endpoint::parse(spec, &queue)?,
                        timeout: Duration::from_secs(
                            cfg.get_time("smtpd_proxy_timeout").map_err(e)?.max(1),
                        ),
                        ehlo: cfg.get("smtpd_proxy_ehlo").trim().to_string(),
                        options: postern_common::proxy_filter::Options::parse(
                            &cfg.get("smtpd_proxy_options"),
                        )?,
                        line_limit: (cfg.get_u64("line_length_limit").map_err(e)? as usize)
                            .max(512),
                    }))
                }
            },
            ehlo_discard: cfg.get("smtpd_discard_ehlo_keywords"),
            ehlo_discard_maps: {
                let spec = cfg.get("smtpd_discard_ehlo_keyword_address_maps");
                (!spec.trim().is_empty()).then(|| {
                    let (t, errors) = postern_common::maps::Tables::open_list(&spec);
                    for e in &errors {
                        postern_common::warning!("smtpd_discard_ehlo_keyword_address_maps: {e}");
                    }
                    t
                })
            },
        })
    }
}
