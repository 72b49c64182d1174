//! The configuration gate of `postern check` and `postern start`: what
//! would fail, or quietly mean something else than in Postfix, at run
//! time is refused here, each problem one line with its file, line and
//! name:
//! - a `daemon_directory` that holds Postfix's programs (Postern always
//!   runs its own daemons: it never starts Postfix's);
//! - master.cf services Postern cannot honour (`Service::unsupported`);
//! - restriction lists, in main.cf and in every smtpd service's `-o`
//!   overrides, that name an unknown restriction, lack an argument, or
//!   use one Postern's smtpd does not carry out
//!   (`postern_common::restriction`);
//! - match lists (`mynetworks`, `relay_domains`, ...) whose file, table or
//!   network cannot be read (`postern_common::match_list`);
//! - a parameter Postern does not offer, set (in main.cf or by `-o`) to
//!   something else than Postfix's default (the TLS settings rustls does
//!   not take are warnings);
//! - `receive_override_options` values Postfix does not know;
//! - a before-queue filter (`smtpd_proxy_filter`) smtpd could not reach
//!   for its form, or `smtpd_proxy_options` it does not know: smtpd
//!   would refuse every message.
//! - a milter list (`smtpd_milters`, `non_smtpd_milters`) or milter
//!   setting smtpd and cleanup could not use;
//! - (a warning) `reject_unverified_*` without a `verify` service in
//!   master.cf: every address would get "address verification problem".

use postern_common::match_list::{Kind, MatchList};
use postern_common::restriction;
use postern_conf::master_cf::{Service, ServiceType};
use postern_conf::postfix_params::{self, Status};
use postern_conf::{split_braced, Config};
use std::path::Path;

/// Errors (which fail the check) and warnings.
#[derive(Debug, Default)]
pub struct Findings {
    pub errors: Vec<String>,
    pub warnings: Vec<String>,
}

/// Files that only Postfix's daemon directory has.
const POSTFIX_ONLY: &[&str] = &["trivial-rewrite", "postfix-script", "showq", "tlsmgr"];

/// The match lists of main.cf, and what each holds.
pub const MATCH_LISTS: &[(&str, Kind)] = &[
    ("mydestination", Kind::String),
    ("virtual_alias_domains", Kind::String),
    ("virtual_mailbox_domains", Kind::String),
    ("relay_domains", Kind::Domain),
    ("mynetworks", Kind::Address),
    ("smtpd_client_event_limit_exceptions", Kind::NameAddress),
    ("permit_mx_backup_networks", Kind::NameAddress),
    ("debug_peer_list", Kind::NameAddress),
    ("fast_flush_domains", Kind::Domain),
    ("smtpd_authorized_xforward_hosts", Kind::NameAddress),
    ("masquerade_exceptions", Kind::String),
    ("smtp_sasl_mechanism_filter", Kind::String),
    ("lmtp_sasl_mechanism_filter", Kind::String),
];

/// Settings that only tune a feature another parameter turns on (an
/// error comes from that one): warnings.
const TUNING: &[&str] = &[
    "smtpd_upstream_proxy_timeout",
    "default_filter_nexthop",
    "internal_mail_filter_classes",
];

/// Everything the gate finds in `cfg` and its master.cf `services`.
pub fn check(cfg: &Config, services: &[Service]) -> Findings {
    let mut f = Findings::default();
    let dir = cfg.dir().display().to_string();
    let main_at = |name: &str| match cfg.main_cf_line(name) {
        Some(l) => format!("{dir}/main.cf, line {l}: {name}"),
        None => format!("{dir}/main.cf: {name}"),
    };
    // Postfix's programs in daemon_directory.
    let daemon_dir = cfg.get("daemon_directory");
    if let Some(marker) = POSTFIX_ONLY
        .iter()
        .find(|m| Path::new(&daemon_dir).join(m).exists())
    {
        f.errors.push(format!(
            "{} = {daemon_dir}: holds Postfix's programs ({marker}), not Postern's: \
             Postern always runs its own daemons (remove the setting to use Postern's default)",
            main_at("daemon_directory")
        ));
    }
    // Services.
    for s in services {
        if let Some(why) = s.unsupported() {
            f.errors.push(format!(
                "{dir}/master.cf, line {}: service {}/{} ({}): {why}",
                s.line,
                s.name,
                s.kind.word(),
                s.command
            ));
        }
    }
    // main.cf.
    for (name, e) in restriction::check_config(cfg) {
        f.errors.push(format!("{}: {e}", main_at(&name)));
    }
    if !services.iter().any(|s| s.program() == Some("verify")) {
        for name in uses_verify(cfg) {
            f.warnings.push(format!(
                "{}: reject_unverified_*: no verify service in master.cf \
                 (verify unix - - y - 1 verify): every address would get \
                 450 address verification problem",
                main_at(&name)
            ));
        }
    }
    for (name, kind) in MATCH_LISTS {
        if let Err(e) = MatchList::parse(
            &cfg.get(name),
            *kind,
            postern_common::match_list::parent_style(cfg, name),
        ) {
            f.errors.push(format!("{}: {e}", main_at(name)));
        }
    }
    for name in cfg.explicit_names() {
        let Some(v) = cfg.raw(&name).map(|(v, _)| v.to_string()) else {
            continue;
        };
        if let Some((bad, why)) = not_honoured(cfg, &name, &v) {
            let line = format!("{}: {why}", main_at(&name));
            if bad {
                f.errors.push(line);
            } else {
                f.warnings.push(line);
            }
        }
    }
    // master.cf `-o` overrides, with the service's view of main.cf.
    let main_errors = restriction::check_config(cfg);
    for s in services.iter().filter(|s| !s.overrides.is_empty()) {
        let at = |n: &str| {
            format!(
                "{dir}/master.cf, line {}: service {}/{}: -o {n}",
                s.line,
                s.name,
                s.kind.word()
            )
        };
        let mut scfg = cfg.clone();
        scfg.set_overrides(s.overrides.clone());
        // A `pass` service's overrides are smtpd's (see master_cf::runnable).
        if s.program() == Some("smtpd") || s.kind == ServiceType::Pass {
            for (name, e) in restriction::check_config(&scfg) {
                if !main_errors.iter().any(|(n, m)| *n == name && *m == e) {
                    f.errors.push(format!("{}: {e}", at(&name)));
                }
            }
        }
        for (n, v) in &s.overrides {
            if !postern_conf::params::is_known(n) && postfix_params::status_of(n).is_none() {
                f.warnings.push(format!("{}: unused parameter", at(n)));
                continue;
            }
            if let Some((bad, why)) = not_honoured(&scfg, n, v) {
                let line = format!("{}: {why}", at(n));
                if bad {
                    f.errors.push(line);
                } else {
                    f.warnings.push(line);
                }
            }
        }
    }
    f
}

/// The restriction lists (and classes) of main.cf that name
/// `reject_unverified_recipient` or `reject_unverified_sender`.
fn uses_verify(cfg: &Config) -> Vec<String> {
    let classes = restriction::classes(cfg);
    restriction::LIST_PARAMETERS
        .iter()
        .map(|s| s.to_string())
        .chain(classes)
        .filter(|name| {
            restriction::words(&cfg.get(name)).iter().any(|w| {
                w.eq_ignore_ascii_case("reject_unverified_recipient")
                    || w.eq_ignore_ascii_case("reject_unverified_sender")
            })
        })
        .collect()
}

/// For a setting `name = value`: (true: an error, false: a warning; why)
/// when Postern does not honour it, `None` when it does or when the value
/// is Postfix's default (nothing asked of Postern).
fn not_honoured(cfg: &Config, name: &str, value: &str) -> Option<(bool, String)> {
    if name == "receive_override_options" {
        return postern_common::receive_override::ReceiveOverride::parse(&cfg.expand(value))
            .err()
            .map(|e| (true, e));
    }
    // A content filter without a transport would send mail nowhere, or
    // past its filter: refused like an unknown setting.
    if name == "content_filter" {
        let filter = cfg.expand(value);
        let filter = filter.trim();
        let transport = filter.split(':').next().unwrap_or("");
        return (!filter.is_empty() && transport.trim().is_empty()).then(|| {
            (
                true,
                format!("content_filter = {filter}: no transport (expected transport:nexthop)"),
            )
        });
    }
    if name == "smtpd_proxy_filter" {
        let spec = cfg.expand(value);
        if spec.trim().is_empty() {
            return None;
        }
        let queue = postern_common::service::queue_directory(cfg);
        return postern_common::proxy_filter::Endpoint::parse(&spec, &queue)
            .err()
            .map(|e| (true, e));
    }
    // A milter list (or milter setting) smtpd and cleanup could not use:
    // cleanup would refuse every message it applies to.
    if name == "smtpd_milters" || name == "non_smtpd_milters" {
        return postern_common::milter::Settings::from_config(cfg, name)
            .err()
            .map(|e| (true, e));
    }
    if matches!(
        name,
        "milter_default_action"
            | "milter_protocol"
            | "milter_connect_timeout"
            | "milter_command_timeout"
            | "milter_content_timeout"
    ) {
        return postern_common::milter::Settings::from_config(cfg, "smtpd_milters")
            .err()
            .map(|e| (true, e));
    }
    if name == "smtpd_proxy_options" {
        return postern_common::proxy_filter::Options::parse(&cfg.expand(value))
            .err()
            .map(|e| (true, e));
    }
    let (status, why) = postfix_params::status_of(name)?;
    if status != Status::Unsupported {
        return None;
    }
    let norm = |v: &str| split_braced(&cfg.expand(v), true).join(" ");
    let dflt = postfix_params::find(name)
        .map(|r| r.postfix_default)
        .unwrap_or("");
    if norm(value) == norm(dflt) {
        return None;
    }
    // TLS settings rustls does not take, and the milter settings that
    // only tune milters (an error comes from smtpd_milters or
    // non_smtpd_milters naming one), change nothing that is asked for.
    let tuning = why.starts_with("this TLS setting")
        || name.starts_with("milter_")
        || TUNING.contains(&name);
    Some((!tuning, format!("not honoured by Postern: {why}")))
}
