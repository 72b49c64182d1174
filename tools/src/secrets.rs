//! `postern check`'s look at the secrets the daemons read as root before
//! they drop to `mail_owner`: smtpd's TLS certificates and keys (for
//! every smtpd service of master.cf, with its `-o` overrides; a key that
//! does not match its certificate, or protocol and cipher settings that
//! leave nothing, are problems too), and smtp's and lmtp's
//! `*_sasl_password_maps`, `*_tls_policy_maps` and TLS protocol and
//! cipher settings, and cleanup's DKIM keys (`dkim_signing_table`: each
//! key file readable and private). Read as the
//! daemons read them, so that a missing, unreadable or unusable file is
//! reported before a client finds STARTTLS gone or a smarthost refuses
//! every delivery.
//!
//! Each problem is one `postern: error: ...` line naming the service,
//! the parameter, its file and the cause. `postern check`, `start` and
//! `start-fg` then exit 1 (nothing started: a silently missing STARTTLS
//! is worse than a refusal the administrator sees at once), and `postern
//! reload` refuses a key problem, leaving the running daemons with what
//! they read. A
//! key that goes bad while the system runs is logged by the smtpd that
//! cannot read it, which then runs without STARTTLS.

use postern_conf::master_cf::Service;
use postern_conf::Config;

/// How many problems [`check`] found, by kind: a key or certificate
/// smtpd or smtp cannot use stops a start or reload (the mail system
/// would run without TLS); a root-only table that cannot be opened stops
/// `postern check` and `start`, as every other table, but not a reload
/// (the running daemons already defer the mail that needs it).
#[derive(Debug, Default, Clone, Copy)]
pub struct Problems {
    pub keys: usize,
    pub tables: usize,
}

impl Problems {
    pub fn total(&self) -> usize {
        self.keys + self.tables
    }
}

/// Reports every problem with the secrets the services of `services`
/// read.
pub fn check(name: &str, cfg: &Config, services: &[Service]) -> Problems {
    let mut problems = Vec::new();
    let mut table_problems = Vec::new();
    // As master runs them (none for what Postern
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
            // postscreen's STARTTLS uses smtpd's keys.
            "postscreen"
                if !matches!(
                    scfg.get("postscreen_tls_security_level").trim(),
                    "" | "none"
                ) =>
            {
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
                        if let Err(e) = postern_common::maps::check_spec(&spec, "postmap") {
                            table_problems.push(format!("{what}: {t}: {e}"));
                        }
                    }
                }
            }
            // DKIM keys, read by cleanup as root at start.
            "cleanup" => {
                let (table, bad) =
                    postern_common::dkim_table::SigningTable::open(&scfg.get("dkim_signing_table"));
                for e in bad {
                    table_problems.push(format!("{what}: dkim_signing_table: {e}"));
                }
                for f in table.key_files() {
                    if let Err(e) = postern_common::dkim_table::read_key_file(&f) {
                        problems.push(format!(
                            "{what}: dkim_signing_table: cannot use DKIM key: {e}"
                        ));
                    }
                }
            }
            _ => {}
        }
    }
    for list in [&mut problems, &mut table_problems] {
        list.sort();
        list.dedup();
        for p in list.iter() {
            eprintln!("{name}: error: {p}");
        }
    }
    Problems {
        keys: problems.len(),
        tables: table_problems.len(),
    }
}
