//! postdrop: the set-gid (`setgid_group`) program that puts a local
//! user's message into `maildrop/`, as Postfix's postdrop(1).
//!
//! `postdrop [-c config_dir] [-v]` reads [`DropRecord`]s from standard
//! input (sendmail writes them when it may not write `maildrop/` itself),
//! checks them, and writes the maildrop file as the real user with the
//! group privilege it was installed with. It trusts nothing of its
//! caller: the configuration directory must pass
//! [`maildrop::check_config_dir`], the environment is not read beyond
//! `MAIL_CONFIG`, every record is checked, and a stream that ends before
//! `End` leaves no file. Exit codes are sysexits.h's; the reason is one
//! line on stderr.

use crate::die;
use crate::maildrop::{self, DropRecord, Fail};
use crate::sysexits::*;
use postern_common::ipc;
use std::path::PathBuf;

const NAME: &str = "postdrop";

pub fn main() -> ! {
    // Files we create must not inherit a hostile umask's openness or
    // narrowness beyond what queue files want.
    nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o022));
    let mut config: Option<PathBuf> = None;
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        match a.as_str() {
            "-c" => match it.next() {
                Some(d) => config = Some(d.into()),
                None => die(NAME, EX_USAGE, "-c requires a directory"),
            },
            "-v" | "-r" => {}
            other => die(
                NAME,
                EX_USAGE,
                format_args!(
                    "unexpected argument \"{other}\"; usage: postdrop [-c config_dir] [-v]"
                ),
            ),
        }
    }
    let dir = postern_conf::config_dir(config.as_deref());
    if let Err(e) = maildrop::check_config_dir(&dir) {
        die(NAME, EX_NOPERM, e);
    }
    let cfg = crate::load_config(NAME, Some(&dir));
    let mut input = std::io::BufReader::with_capacity(64 * 1024, std::io::stdin().lock());
    let sub = match ipc::recv::<_, DropRecord>(&mut input) {
        Ok(DropRecord::Envelope(s)) => s,
        Ok(_) => die(NAME, EX_DATAERR, "expected the envelope first"),
        Err(e) => die(NAME, EX_DATAERR, format_args!("read envelope: {e}")),
    };
    let mut d = maildrop::Drop::open(&cfg, &sub, false).unwrap_or_else(|f| fail(f));
    loop {
        match ipc::recv::<_, DropRecord>(&mut input) {
            Ok(DropRecord::Content(c)) => d.content(&c).unwrap_or_else(|f| fail(f)),
            Ok(DropRecord::End) => break,
            Ok(DropRecord::Envelope(_)) => {
                d.abort();
                die(NAME, EX_DATAERR, "unexpected envelope record")
            }
            Err(e) => {
                d.abort();
                die(
                    NAME,
                    EX_DATAERR,
                    format_args!("message input ended early: {e}"),
                )
            }
        }
    }
    d.finish().unwrap_or_else(|f| fail(f));
    std::process::exit(EX_OK)
}

fn fail(f: Fail) -> ! {
    die(NAME, f.code, f.reason)
}
