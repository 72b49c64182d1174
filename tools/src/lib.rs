//! The commands people and programs run. Each binary in `src/bin/` is a
//! thin `main` over a module here:
//!
//! - [`control`]: `postern` (start, start-fg, stop, abort, reload, status,
//!   check, flush).
//! - [`dkim_keygen`]: `postern dkim-keygen`, a DKIM key pair and the DNS
//!   record that publishes it.
//! - [`upkeep`]: `postern set-permissions`, `upgrade-configuration`,
//!   `logrotate`.
//! - [`postlog`]: `postlog`, logs a script's lines as Postern's.
//! - [`postkick`]: `postkick`, sends a request to a trigger service.
//! - [`qshape`]: `qshape`, the queue's shape by domain and age.
//! - [`gate`]: what `postern check` and `postern start` refuse (unknown
//!   restrictions, services and settings Postern cannot honour, Postfix's
//!   daemon directory), with file, line and name.
//! - [`secrets`]: `postern check`'s test of the TLS keys and password
//!   tables the daemons read as root.
//! - [`postconf`]: `postconf`, prints and edits main.cf parameters.
//! - [`sendmail`]: `sendmail`, the Sendmail-compatible submission command
//!   (and `sendmail -bp`, `-bi`, `-bs`, `-bv`, `-q` through the modules
//!   below).
//! - [`stdio_smtp`]: `sendmail -bs`, an SMTP session on standard input
//!   and output.
//! - [`verify`]: `sendmail -bv`, what would become of each recipient.
//! - [`maildrop`]: writes a message into `maildrop/`, directly or through
//!   `postdrop` (used by `sendmail` and `sendmail -bs`).
//! - [`postdrop`]: `postdrop`, the set-gid program that writes a local
//!   user's message into `maildrop/`.
//! - [`postqueue`]: `postqueue` (and `mailq`, `sendmail -bp`), lists the
//!   queue and has qmgr retry deferred mail.
//! - [`postsuper`]: `postsuper`, deletes, holds, releases, requeues and
//!   repairs queued mail.
//! - [`postcat`]: `postcat`, prints a queue file.
//! - [`postmap`]: `postmap` and `postalias`, build, query, list and
//!   update lookup tables.
//! - [`aliases`]: `newaliases` (`sendmail -bi`), rebuilds every table of
//!   `alias_database`.
//! - [`sysexits`]: the exit codes of `sysexits.h`.
//!
//! Every command takes the configuration directory as `-c DIR` (`-C DIR`
//! for sendmail, as Postfix) or from `MAIL_CONFIG`, and reports a failure
//! as one line on stderr (`NAME: fatal: reason`) with an exit code from
//! `sysexits.h`.

pub mod aliases;
pub mod control;
pub mod dkim_keygen;
pub mod gate;
pub mod maildrop;
pub mod postcat;
pub mod postconf;
pub mod postdrop;
pub mod postkick;
pub mod postlog;
pub mod postmap;
pub mod postqueue;
pub mod postsuper;
pub mod qshape;
pub mod secrets;
pub mod sendmail;
pub mod sites;
pub mod stdio_smtp;
pub mod sysexits;
pub mod tls_report;
pub mod upkeep;
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
