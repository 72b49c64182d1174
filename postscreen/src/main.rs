//! postscreen: Postern's SMTP triage server (Postfix's postscreen(8)),
//! started by master for a master.cf `postscreen` inet service.
//!
//! The program is a thin shell: everything is in the library
//! (`src/lib.rs`), where the crate documentation lists the modules.

use postern_common::fatal;

fn main() {
    let (cfg, _args) = postern_common::service::start("postscreen");
    let settings = match postern_postscreen::settings::Settings::from_config(&cfg) {
        Ok(s) => s,
        Err(e) => fatal!("{e}"),
    };
    // Tables (readable by root only, perhaps) are open: drop to
    // mail_owner before the first client.
    postern_common::service::drop_privileges(&cfg);
    postern_postscreen::server::run(settings)
}
