//! sendmail: reads a message from standard input and drops it into the
//! `maildrop` queue, from where pickup hands it to cleanup.
//!
//! It exits 0 only once the maildrop file and its directory entry are on
//! disk, then wakes pickup (`public/pickup`); if pickup is not running the
//! file waits for it. Flags as Postfix's sendmail: `-t -i -oi -f -r -F -C
//! -bi -bm`, `-o` options and `-B -N -R -V -X -v -m -n -U -G -I -c -x` accepted
//! (and ignored where Postfix ignores them). Called as `newaliases` it
//! rebuilds the aliases (`-bi`).

use crate::sysexits::*;
use crate::{aliases, die};
use postern_common::ipc::{self, Wakeup};
use postern_common::qfile::{self, attr, Recipient};
use postern_common::queue::{self, Queue, QueueTree};
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
                    _ => {} // -B -N -R -V -X -L -O -e -h -p: accepted
                }
                break;
            } else if FLAGS.contains(c) {
                match c {
                    't' => o.extract = true,
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
    let cfg = crate::load_config(name, o.config.as_deref());
    postern_common::log::init(
        "sendmail",
        &cfg.get("syslog_name"),
        &cfg.get("maillog_file"),
        true,
        false,
    );
    match o.mode.as_str() {
        "i" => match aliases::newaliases(&cfg) {
            Ok(()) => std::process::exit(EX_OK),
            Err(e) => die(name, EX_CANTCREAT, e),
        },
        "m" => submit(name, &cfg, o),
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
        die(name, EX_USAGE, "no recipients specified");
    }
    for r in &o.recipients {
        if r.bytes().any(|b| b < 32 || b == 127) || r.contains(['<', '>']) {
            die(
                name,
                EX_DATAERR,
                format_args!("bad recipient address syntax: {r}"),
            );
        }
    }
    let sender = o.sender.clone().unwrap_or_else(login_name);
    let sender = sender
        .trim_start_matches('<')
        .trim_end_matches('>')
        .to_string();
    if sender.bytes().any(|b| b < 32 || b == 127) {
        die(name, EX_DATAERR, "bad sender address syntax");
    }
    let limit = cfg.get_u64("message_size_limit").unwrap_or(10240000);
    let tree = QueueTree::new(cfg.get("queue_directory"));
    let nf = match tree.create(Queue::Maildrop) {
        Ok(f) => f,
        Err(e) => die(
            name,
            EX_TEMPFAIL,
            format_args!(
                "queue file write error: {}: {e}",
                tree.dir(Queue::Maildrop).display()
            ),
        ),
    };
    let path = nf.path.clone();
    // pickup runs as mail_owner and must read what a local user wrote;
    // maildrop/ (mode 0730) keeps other users out, as in Postfix.
    let _ = nf
        .file
        .set_permissions(std::os::unix::fs::PermissionsExt::from_mode(0o644));
    // Run as root, give the file to mail_owner so that pickup (which runs
    // as mail_owner) can read and remove it.
    if let Ok(Some(owner)) = postern_common::privs::queue_owner(cfg) {
        let _ = std::os::unix::fs::chown(&path, Some(owner.uid), Some(owner.gid));
    }
    let fail = |code: i32, why: String| -> ! {
        let _ = std::fs::remove_file(&path);
        die(name, code, why)
    };
    let mut w = match qfile::Writer::new(nf.file) {
        Ok(w) => w,
        Err(e) => fail(EX_TEMPFAIL, format!("queue file write error: {e}")),
    };
    let (secs, usecs) = queue::now();
    let res = (|| -> std::io::Result<()> {
        w.arrival(secs, usecs)?;
        w.sender(&sender)?;
        w.attribute(attr::SUBMITTER, &nix::unistd::getuid().as_raw().to_string())?;
        if o.extract {
            w.attribute(attr::EXTRACT_RECIPIENTS, "yes")?;
        }
        if let Some(f) = &o.full_name {
            w.attribute(attr::FULL_NAME, f)?;
        }
        for r in &o.recipients {
            w.recipient(&Recipient::new(r))?;
        }
        w.begin_content()
    })();
    if let Err(e) = res {
        fail(EX_TEMPFAIL, format!("queue file write error: {e}"));
    }
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
            Err(e) => fail(EX_IOERR, format!("error reading input: {e}")),
        }
        if line.ends_with(b"\r\n") {
            line.truncate(line.len() - 2);
            line.push(b'\n');
        }
        if !o.ignore_dots && (line == b".\n" || line == b".") {
            break;
        }
        ends_in_newline = line.ends_with(b"\n");
        if let Err(e) = w.content(&line) {
            fail(EX_TEMPFAIL, format!("queue file write error: {e}"));
        }
        if limit > 0 && w.content_size() > limit {
            fail(EX_DATAERR, "message file too big".into());
        }
    }
    if !ends_in_newline {
        // A message whose last line lacks its newline gets one.
        if let Err(e) = w.content(b"\n") {
            fail(EX_TEMPFAIL, format!("queue file write error: {e}"));
        }
    }
    let res = w
        .finish()
        .and_then(|file| match queue::sync_dir(&tree.dir(Queue::Maildrop)) {
            // An unprivileged user may write into maildrop (mode 0730) but not
            // open it; syncing the whole file system makes the new name durable
            // all the same.
            Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
                // SAFETY: syncfs on a descriptor we own.
                match unsafe { libc::syncfs(std::os::fd::AsRawFd::as_raw_fd(&file)) } {
                    0 => Ok(()),
                    _ => Err(std::io::Error::last_os_error()),
                }
            }
            other => other,
        });
    if let Err(e) = res {
        fail(EX_TEMPFAIL, format!("queue file write error: {e}"));
    }
    // The message is safe. Waking pickup is a courtesy: it also scans
    // maildrop on its own timer.
    let _ = ipc::wake(&tree.pickup_socket(), &[Wakeup::Wake]);
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
}
