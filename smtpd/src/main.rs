//! smtpd: Postern's SMTP server (RFC 5321), started by master for an
//! `inet` service in master.cf.
//!
//! The program is a thin shell: everything is in the library
//! (`src/lib.rs`), where the crate documentation lists the modules.

use postern_common::{fatal, warning};

fn main() {
    let (cfg, args) = postern_common::service::start("smtpd");
    let mut settings = match postern_smtpd::settings::Settings::from_config(&cfg) {
        Ok(s) => s,
        Err(e) => fatal!("{e}"),
    };
    settings.service = args.service;
    if postern_common::service::jailed() {
        // The recipient check by account name must outlive the chroot.
        let n = postern_common::privs::remember_account_names();
        if n == 0 {
            warning!(
                "chroot: the name service lists no accounts; unix:passwd.byname \
                 accepts every local name (run smtpd without chroot to check them)"
            );
        }
    }
    // Certificates, keys (readable by root only, as distributions
    // install them) and tables are loaded: drop to mail_owner (chrooted
    // when master.cf says so) before the first client.
    postern_common::service::drop_privileges(&cfg);
    postern_smtpd::server::run(settings)
}
