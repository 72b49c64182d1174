//! The commands people and programs run: `postern` (start, stop, reload,
//! status, check), `sendmail` (and its other names `newaliases`), and
//! `postconf`. Each binary in `src/bin/` is a thin `main` over a module
//! here. The queue commands: [`postqueue`] (also `mailq`, `sendmail
//! -bp`), [`postsuper`], [`postcat`]. The table commands: [`postmap`]
//! (also `postalias`, and `newaliases` through [`aliases`]).
//!
//! Every command takes the configuration directory as `-c DIR` (`-C DIR`
//! for sendmail, as Postfix) or from `MAIL_CONFIG`, and reports a failure
//! as one line on stderr (`NAME: fatal: reason`) with an exit code from
//! `sysexits.h`.

pub mod aliases;
pub mod control;
pub mod maildrop;
pub mod postcat;
pub mod postconf;
pub mod postdrop;
pub mod postmap;
pub mod postqueue;
pub mod postsuper;
pub mod secrets;
pub mod sendmail;
pub mod stdio_smtp;
pub mod sysexits;
pub mod verify;

use postern_conf::Config;
use std::path::Path;

/// Prints `NAME: fatal: reason` and exits with `code`.
pub fn die(name: &str, code: i32, reason: impl std::fmt::Display) -> ! {
    eprintln!("{name}: fatal: {reason}");
    std::process::exit(code)
}

/// Loads main.cf from `-c DIR`/`MAIL_CONFIG`/the default, or exits
/// (EX_CONFIG) with the reason.
pub fn load_config(name: &str, dir: Option<&Path>) -> Config {
    let dir = postern_conf::config_dir(dir);
    match Config::load(&dir) {
        Ok(c) => c,
        Err(e) => die(name, sysexits::EX_CONFIG, e),
    }
}
