//! sendmail: reads a message from standard input and drops it into the
//! `maildrop` queue, from where pickup hands it to cleanup.
//!
//! It exits 0 only once the maildrop file and its directory entry are on
//! disk, then wakes pickup (`public/pickup`); if pickup is not running the
//! file waits for it. When the caller may not write `maildrop/` the
//! message goes through the set-gid `postdrop` (see [`crate::maildrop`]).
//! Flags as Postfix's sendmail: `-t -i -oi -f -r -F -C -bi -bm -bs -bv -q`,
//! DSN `-N notify -R ret -V envid`, `-B type`; `-X -v -m -n -U -G -I -c
//! -x -L -O -e -h -p` and other `-o` options accepted and ignored as
//! Postfix ignores them. `-bs` speaks SMTP on standard input and output
//! ([`crate::stdio_smtp`]); `-bv` reports what would happen to each
//! recipient without sending ([`crate::verify`]). Called as `newaliases`
//! it rebuilds the aliases (`-bi`).

use crate::maildrop::{self, Drop, Fail, Submission};
use crate::sysexits::*;
use crate::{aliases, die};
use postern_common::dsn;
use postern_common::ipc::{self, Wakeup};
use postern_common::qfile::{attr, Recipient};
use postern_common::queue::QueueTree;
use std::io::{BufRead, BufReader, Read};
use std::path::PathBuf;

#[derive(Debug, Default)]
struct Opts {
    config: Option<PathBuf>,
    mode: String,
    extract: bool,
    ignore_dots: bool,
    sender: Option<String>,
    full_name: Option<String>,
    recipients: Vec<String>,
    /// -N: DSN NOTIFY bits for every command-line recipient.
    notify: u8,
    /// -R: RET (FULL or HDRS).
    ret: Option<String>,
    /// -V: ENVID.
    envid: Option<String>,
    /// -v: with -bv, the resolver's answer for each address too.
    verbose: bool,
    /// A usage error found while parsing, reported once the mode is known.
    error: Option<(i32, String)>,
}

/// Options that take a value ("-f sender" or "-fsender").
const WITH_VALUE: &str = "BCFLNORVXbefhopr";
/// Options that are flags.
const FLAGS: &str = "GIUcimntvxq";

fn parse(name: &str, args: Vec<String>) -> Opts {
    let mut o = Opts {
        mode: if name == "newaliases" {
            "i".into()
        } else {
            "m".into()
        },
        ..Default::default()
    };
    let mut it = args.into_iter();
    while let Some(a) = it.next() {
        if a == "--" {
            o.recipients.extend(it.by_ref());
            break;
        }
        if !a.starts_with('-') || a == "-" {
            o.recipients.push(a);
            o.recipients.extend(it.by_ref());
            break;
        }
        for (i, c) in a[1..].char_indices() {
            if WITH_VALUE.contains(c) {
                let rest = &a[1 + i + c.len_utf8()..];
                let value = if !rest.is_empty() {
                    rest.to_string()
                } else {
                    match it.next() {
                        Some(v) => v,
                        None => die(
                            name,
                            EX_USAGE,
                            format_args!("option requires an argument -- '{c}'"),
                        ),
                    }
                };
                match c {
                    'C' => o.config = Some(PathBuf::from(value)),
                    'b' => o.mode = value,
                    'f' | 'r' => o.sender = Some(value),
                    'F' => o.full_name = Some(value),
                    'o' if value == "i" => o.ignore_dots = true,
                    'N' => match dsn::parse_notify(&value) {
                        Some(bits) => o.notify = bits,
                        None => o.error = Some((EX_USAGE, format!("bad -N option value: {value}"))),
                    },
                    'R' => match dsn::parse_ret(&value) {
                        Some(r) => o.ret = Some(r.into()),
                        None => o.error = Some((EX_USAGE, format!("bad -R option value: {value}"))),
                    },
                    'V' => {
                        // Postfix also takes the older form "-V vENVID".
                        if dsn::valid_envid(&value) {
                            o.envid = Some(value)
                        } else {
                            o.error = Some((EX_USAGE, format!("bad -V option value: {value}")))
                        }
                    }
                    'B' if !["7bit", "8bitmime", "binarymime"]
                        .contains(&value.to_ascii_lowercase().as_str()) =>
                    {
                        o.error = Some((EX_USAGE, format!("bad -B option value: {value}")))
                    }
                    _ => {} // -X -L -O -e -h -p -o...: accepted and ignored
                }
                break;
            } else if FLAGS.contains(c) {
                match c {
                    't' => o.extract = true,
                    'v' => o.verbose = true,
                    'i' => o.ignore_dots = true,
                    'q' => {
                        o.mode = "q".into();
                        break;
                    }
                    _ => {}
                }
            } else {
                die(name, EX_USAGE, format_args!("invalid option -- '{c}'"));
            }
        }
    }
    o
}

/// The entry point of `sendmail` and `newaliases`.
pub fn main_as(name: &str) -> ! {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let o = parse(name, args);
    if let Some((code, why)) = &o.error {
        die(name, *code, why);
    }
    let dir = postern_conf::config_dir(o.config.as_deref());
    if let Err(e) = maildrop::check_config_dir(&dir) {
        die(name, EX_NOPERM, e);
    }
    let cfg = crate::load_config(name, Some(&dir));
    // A user who may not append to maillog_file logs to syslog instead of
    // being warned about it on every submission.
    let maillog = cfg.get("maillog_file");
    let maillog = if maillog.is_empty()
        || nix::unistd::access(maillog.as_str(), nix::unistd::AccessFlags::W_OK).is_ok()
    {
        maillog
    } else {
        String::new()
    };
    postern_common::log::init("sendmail", &cfg.get("syslog_name"), &maillog, true, false);
    match o.mode.as_str() {
        "i" => match aliases::newaliases(&cfg) {
            Ok(()) => std::process::exit(EX_OK),
            Err(e) => die(name, EX_CANTCREAT, e),
        },
        "m" => submit(name, &cfg, o),
        "s" => {
            let sender = o.sender.clone().unwrap_or_else(login_name);
            crate::stdio_smtp::run(&cfg, &sender)
        }
        "v" => crate::verify::run(
            name,
            &cfg,
            &o.recipients,
            o.extract,
            o.sender.as_deref(),
            o.verbose,
        ),
        // -bp: mailq, the same listing as postqueue -p.
        "p" => crate::postqueue::show(name, &cfg, false),
        "q" => {
            let tree = QueueTree::new(cfg.get("queue_directory"));
            match ipc::wake(&tree.qmgr_socket(), &[Wakeup::Flush]) {
                Ok(()) => std::process::exit(EX_OK),
                Err(e) => die(
                    name,
                    EX_UNAVAILABLE,
                    format_args!("cannot flush the queue: {e}"),
                ),
            }
        }
        other => die(name, EX_USAGE, format_args!("-b{other}: unsupported mode")),
    }
}

/// The login name of the real user: the default sender.
fn login_name() -> String {
    let uid = nix::unistd::getuid().as_raw();
    postern_common::privs::user_by_uid(uid)
        .map(|a| a.name)
        .unwrap_or_else(|| format!("uid{uid}"))
}

fn submit(name: &str, cfg: &postern_conf::Config, o: Opts) -> ! {
    if o.recipients.is_empty() && !o.extract {
        die(
            name,
            EX_USAGE,
            "no recipients specified: recipient addresses must be given on the command line or with -t",
        );
    }
    let mut sub = Submission::default();
    for r in &o.recipients {
        if r.bytes().any(|b| b < 32 || b == 127) || r.contains(['<', '>']) || r.is_empty() {
            die(
                name,
                EX_DATAERR,
                format_args!("bad recipient address syntax: {r}"),
            );
        }
        sub.recipients.push(Recipient {
            notify: o.notify,
            ..Recipient::new(r)
        });
    }
    let sender = o.sender.clone().unwrap_or_else(login_name);
    sub.sender = sender
        .trim_start_matches('<')
        .trim_end_matches('>')
        .to_string();
    if o.extract {
        sub.attrs
            .push((attr::EXTRACT_RECIPIENTS.into(), "yes".into()));
    }
    if let Some(f) = &o.full_name {
        sub.attrs.push((attr::FULL_NAME.into(), f.clone()));
    }
    if let Some(r) = &o.ret {
        sub.attrs.push((attr::RET.into(), r.clone()));
    }
    if let Some(e) = &o.envid {
        sub.attrs.push((attr::ENVID.into(), e.clone()));
    }
    let fail = |f: Fail| -> std::convert::Infallible { die(name, f.code, f.reason) };
    let mut d = match Drop::open(cfg, &sub, true) {
        Ok(d) => d,
        Err(f) => match fail(f) {},
    };
    // Copy standard input: CRLF or LF in, LF stored; a lone "." ends the
    // message unless -i/-oi.
    let mut input = BufReader::with_capacity(64 * 1024, std::io::stdin().lock());
    let mut line = Vec::with_capacity(1024);
    let mut ends_in_newline = true;
    loop {
        line.clear();
        match input.by_ref().take(1 << 20).read_until(b'\n', &mut line) {
            Ok(0) => break,
            Ok(_) => {}
            Err(e) => {
                d.abort();
                die(
                    name,
                    EX_IOERR,
                    format_args!("error reading the message from standard input: {e}"),
                )
            }
        }
        if line.ends_with(b"\r\n") {
            line.truncate(line.len() - 2);
            line.push(b'\n');
        }
        if !o.ignore_dots && (line == b".\n" || line == b".") {
            break;
        }
        ends_in_newline = line.ends_with(b"\n");
        if let Err(f) = d.content(&line) {
            match fail(f) {}
        }
    }
    if !ends_in_newline {
        // A message whose last line lacks its newline gets one.
        if let Err(f) = d.content(b"\n") {
            match fail(f) {}
        }
    }
    if let Err(f) = d.finish() {
        match fail(f) {}
    }
    std::process::exit(EX_OK)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(v: &[&str]) -> Opts {
        parse("sendmail", v.iter().map(|s| s.to_string()).collect())
    }

    #[test]
    fn flags() {
        let o = p(&["-t", "-oi", "-fme@x.test", "-C", "/etc/x", "a@b"]);
        assert!(o.extract && o.ignore_dots);
        assert_eq!(o.sender.as_deref(), Some("me@x.test"));
        assert_eq!(o.config, Some(PathBuf::from("/etc/x")));
        assert_eq!(o.recipients, vec!["a@b"]);
        let o = p(&["-ti", "-f", "s", "-bi"]);
        assert!(o.extract && o.ignore_dots);
        assert_eq!(o.mode, "i");
        let o = p(&["-bs"]);
        assert_eq!(o.mode, "s");
        assert_eq!(
            p(&["-F", "Full Name", "x"]).full_name.as_deref(),
            Some("Full Name")
        );
    }

    #[test]
    fn dsn_flags() {
        let o = p(&[
            "-N",
            "success,delay",
            "-Rhdrs",
            "-V",
            "id-1",
            "-B",
            "8BITMIME",
            "a@b",
        ]);
        assert_eq!(
            o.notify,
            postern_common::qfile::NOTIFY_SUCCESS | postern_common::qfile::NOTIFY_DELAY
        );
        assert_eq!(o.ret.as_deref(), Some("HDRS"));
        assert_eq!(o.envid.as_deref(), Some("id-1"));
        assert!(o.error.is_none());
        assert_eq!(
            p(&["-N", "never", "a"]).notify,
            postern_common::qfile::NOTIFY_NEVER
        );
        assert!(p(&["-N", "never,success", "a"]).error.is_some());
        assert!(p(&["-R", "some", "a"]).error.is_some());
        assert!(p(&["-V", "a\tb", "a"]).error.is_some());
        assert!(p(&["-V", &"x".repeat(101), "a"]).error.is_some());
        assert!(
            p(&["-V", "a b", "a"]).error.is_none(),
            "printable, as Postfix"
        );
        assert!(p(&["-B", "9bit", "a"]).error.is_some());
        // cron's invocation.
        let o = p(&["-FCronDaemon", "-i", "-B8BITMIME", "-oem", "u"]);
        assert!(o.error.is_none() && o.ignore_dots);
        assert_eq!(o.recipients, vec!["u"]);
    }
}
