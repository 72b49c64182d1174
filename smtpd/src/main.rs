//! smtpd: Postern's SMTP server (RFC 5321), started by master for an
//! `inet` service in master.cf.
//!
//! The program is a thin shell: everything is in the library
//! (`src/lib.rs`), where the crate documentation lists the modules.

fn main() {
    let (cfg, args) = postern_common::service::start("smtpd");
    let mut settings = match postern_smtpd::settings::Settings::from_config(&cfg) {
        Ok(s) => s,
        Err(e) => postern_common::fatal!("{e}"),
    };
    settings.service = args.service;
    postern_smtpd::server::run(settings)
}
