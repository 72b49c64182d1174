//! postlog: logs a script's text as a line of Postern's log, as Postfix's
//! postlog(1).
//!
//! `postlog [-iv] [-c config_dir] [-p priority] [-t tag] [text...]`. The
//! text given on the command line is one record; without text, each line
//! of standard input is one. Lines go where Postern's own go
//! (`maillog_file`, else syslog), in the same format, tagged `tag[PID]:`
//! (default `syslog_name/postlog`); `warn`, `error`, `fatal` and `panic`
//! records say so after the tag, as Postfix's. When standard error is a
//! terminal each record is also printed there (`tag: text`). After a
//! `fatal` or `panic` record postlog pauses one second, as Postfix's
//! programs do, and exits 0 as Postfix's postlog does.

use crate::die;
use crate::sysexits::*;
use postern_common::log::{self, Level};
use std::io::{BufRead, IsTerminal};
use std::path::PathBuf;

const NAME: &str = "postlog";

fn usage() -> ! {
    die(
        NAME,
        EX_USAGE,
        "usage: postlog [-iv] [-c config_dir] [-p priority] [-t tag] [text...]",
    )
}

/// The severity named by `-p` (Postfix's names).
pub fn priority(name: &str) -> Option<Level> {
    match name {
        "info" => Some(Level::Info),
        "warn" | "warning" => Some(Level::Warning),
        "error" => Some(Level::Error),
        "fatal" => Some(Level::Fatal),
        "panic" => Some(Level::Panic),
        _ => None,
    }
}

pub fn main() -> ! {
    let mut config: Option<PathBuf> = None;
    let mut tag: Option<String> = None;
    let mut level = Level::Info;
    let mut words: Vec<String> = Vec::new();
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        if a == "--" {
            words.extend(args.by_ref());
            break;
        }
        let Some(flags) = a.strip_prefix('-').filter(|f| !f.is_empty()) else {
            words.push(a);
            words.extend(args.by_ref());
            break;
        };
        for (i, c) in flags.char_indices() {
            match c {
                'i' | 'v' => {}
                'c' | 'p' | 't' => {
                    let rest = &flags[i + 1..];
                    let v = if rest.is_empty() {
                        args.next().unwrap_or_else(|| usage())
                    } else {
                        rest.to_string()
                    };
                    match c {
                        'c' => config = Some(v.into()),
                        'p' => {
                            level = priority(&v).unwrap_or_else(|| {
                                die(NAME, 1, format_args!("unknown priority value: {v}"))
                            })
                        }
                        _ => tag = Some(v),
                    }
                    break;
                }
                other => {
                    eprintln!("{NAME}: invalid option -- '{other}'");
                    usage()
                }
            }
        }
    }
    let cfg = crate::load_config(NAME, config.as_deref());
    let tag = tag.unwrap_or_else(|| format!("{}/postlog", cfg.get("syslog_name")));
    log::init_ident(NAME, &tag, &cfg.get("maillog_file"), false, false);
    let tty = std::io::stderr().is_terminal();
    let record = |text: &str| {
        log::write(level, format_args!("{text}"));
        if tty {
            let prefix = match level {
                Level::Warning => "warning: ",
                Level::Error => "error: ",
                Level::Fatal => "fatal: ",
                Level::Panic => "panic: ",
                _ => "",
            };
            eprintln!("{tag}: {prefix}{text}");
        }
    };
    if words.is_empty() {
        for line in std::io::stdin().lock().split(b'\n') {
            match line {
                Ok(l) => record(String::from_utf8_lossy(&l).trim_end_matches('\r')),
                Err(e) => die(NAME, EX_IOERR, format_args!("read standard input: {e}")),
            }
        }
    } else {
        record(&words.join(" "));
    }
    if matches!(level, Level::Fatal | Level::Panic) {
        std::thread::sleep(std::time::Duration::from_secs(1));
    }
    std::process::exit(EX_OK)
}
