//! `postern check`'s look at the secrets the daemons read as root before
//! they drop to `mail_owner`: smtpd's TLS certificates and keys (for
//! every smtpd service of master.cf, with its `-o` overrides; a key that
//! does not match its certificate, or protocol and cipher settings that
//! leave nothing, are problems too), and smtp's and lmtp's
//! `*_sasl_password_maps`, `*_tls_policy_maps` and TLS protocol and
//! cipher settings. Read as the
//! daemons read them, so that a missing, unreadable or unusable file is
//! reported before a client finds STARTTLS gone or a smarthost refuses
//! every delivery.
//!
//! Each problem is one `postern: error: ...` line naming the service,
//! the parameter, its file and the cause. `postern check`, `start` and
//! `start-fg` then exit 1 (nothing started: a silently missing STARTTLS
//! is worse than a refusal the administrator sees at once), and `postern
//! reload` refuses, leaving the running daemons with what they read. A
//! key that goes bad while the system runs is logged by the smtpd that
//! cannot read it, which then runs without STARTTLS.

use postern_common::maps::Table;
use postern_conf::master_cf::Service;
use postern_conf::Config;

/// Reports every problem with the secrets the services of `services`
/// read; returns how many there were.
pub fn check(name: &str, cfg: &Config, services: &[Service]) -> usize {
    let mut problems = Vec::new();
    // As master runs them (smtpd for postscreen; none for what Postern
    // does elsewhere).
    for s in &postern_conf::master_cf::runnable(services.to_vec()) {
        let mut scfg = cfg.clone();
        scfg.set_overrides(s.overrides.clone());
        let command = s.command.rsplit('/').next().unwrap_or(&s.command);
        let what = format!("service {} (master.cf line {})", s.name, s.line);
        match command {
            "smtpd" if postern_common::tls::smtpd_tls_wanted(&scfg) => {
                if let Err(e) = postern_common::tls::smtpd_server_config(&scfg) {
                    problems.push(format!("{what}: cannot load TLS certificate and key: {e}"));
                }
            }
            "smtp" | "lmtp" => {
                let p = |n: &str| postern_conf::params::smtp_client_param(command == "lmtp", n);
                for mandatory in [false, true] {
                    if let Err(e) = postern_common::tls::profile(&scfg, command, mandatory) {
                        problems.push(format!("{what}: {e}"));
                    }
                }
                let mut tables = vec![p("smtp_tls_policy_maps")];
                if scfg.get_bool(&p("smtp_sasl_auth_enable")).unwrap_or(false) {
                    tables.push(p("smtp_sasl_password_maps"));
                }
                for t in tables {
                    for spec in postern_common::maps::split_specs(&scfg.get(&t)) {
                        if let Err(e) = Table::open(&spec) {
                            problems.push(format!("{what}: {t}: {e}"));
                        }
                    }
                }
            }
            _ => {}
        }
    }
    problems.sort();
    problems.dedup();
    for p in &problems {
        eprintln!("{name}: error: {p}");
    }
    problems.len()
}
