//! postqueue (and mailq, `sendmail -bp`): lists the mail queue in
//! Postfix's formats and asks qmgr to deliver deferred mail now.
//!
//! - `-p` (mailq): the Sendmail-compatible listing of Postfix's
//!   `postqueue -p`, byte for byte in layout: the header line
//!   `-Queue ID-  --Size-- ----Arrival Time---- -Sender/Recipient-------`,
//!   one block per message (`*` after the ID: active; `!`: on hold), the
//!   deferral reason of each recipient from the message's defer log as a
//!   `(reason)` line right-aligned to column 78, each block followed by a
//!   blank line, and the trailer `-- N Kbytes in M Requests.`; or
//!   `Mail queue is empty`.
//! - `-j`: one JSON object per message, as Postfix 3.1+ (`queue_name`,
//!   `queue_id`, `arrival_time`, `message_size`, `forced_expire`,
//!   `sender`, `recipients` with `address` and `delay_reason`, and
//!   Postern's `bounce_class` of the deferral).
//! - `-f`: wakes qmgr with `F` (deliver all deferred mail now, whatever
//!   the flush logs say);
//!   `-s site`: the deferred messages that the site's flush log lists
//!   and that still have a recipient in `site` go to `incoming/`, and
//!   qmgr is woken to scan it ([`postern_common::flush`]); `-i ID`: one
//!   message made due (its retry time set to now) and qmgr woken.
//!
//! Postern has no showq daemon: postqueue reads the queue directories
//! itself, so it runs as root or as `mail_owner`. It only reads queue
//! files; `-s` moves files from `deferred/` to `incoming/` and rewrites
//! the site's flush log, `-i` changes the retry time (mtime) of a file in
//! `deferred/`, which qmgr reads before it takes a file.

use crate::die;
use crate::sysexits::*;
use postern_common::delivery;
use postern_common::flush;
use postern_common::ipc::{self, Wakeup};
use postern_common::qfile::{self, Envelope};
use postern_common::queue::{MessageLog, Queue, QueueTree};
use std::collections::HashMap;
use std::fs::File;
use std::io::{self, Write};
use std::path::PathBuf;

/// The queues listed, in Postfix's order.
pub const LISTED: [Queue; 5] = [
    Queue::Maildrop,
    Queue::Hold,
    Queue::Incoming,
    Queue::Active,
    Queue::Deferred,
];

/// One message as listed.
#[derive(Debug, Clone)]
pub struct Listed {
    pub queue: Queue,
    pub id: String,
    pub arrival: u64,
    pub size: u64,
    pub sender: String,
    /// Pending recipients and their deferral reasons ("" = none).
    pub recipients: Vec<(String, String)>,
    /// The bounce class of each recipient's last deferral, in the order
    /// of `recipients` ("" = none).
    pub classes: Vec<String>,
}

/// Reads one queue file for listing. `None`: gone, incomplete or
/// unreadable (skipped, as Postfix's showq skips files it cannot use), or
/// finished: a message in `active/` with every recipient done, whose file
/// qmgr's retire thread has not yet emptied, is not in the queue any more
/// (Postfix's qmgr removes it at once).
pub fn read_listed(tree: &QueueTree, q: Queue, id: &str) -> Option<Listed> {
    let f = File::open(tree.path(q, id)).ok()?;
    let env = qfile::read_envelope(&f).ok()?;
    if q == Queue::Active && env.pending().next().is_none() {
        return None;
    }
    Some(listed_from(tree, q, id, &env))
}

fn listed_from(tree: &QueueTree, q: Queue, id: &str, env: &Envelope) -> Listed {
    let mut reasons: HashMap<(u64, String), (String, String)> = HashMap::new();
    for e in delivery::read_log(tree, MessageLog::Defer, id).unwrap_or_default() {
        reasons.insert((e.offset, e.recipient.clone()), (e.reason, e.class));
    }
    let (recipients, classes) = env
        .pending()
        .map(|r| {
            let (reason, class) = reasons
                .get(&(r.offset, r.rcpt.address.clone()))
                .cloned()
                .unwrap_or_default();
            ((r.rcpt.address.clone(), reason), class)
        })
        .unzip();
    Listed {
        queue: q,
        id: id.to_string(),
        arrival: env.arrival_secs,
        size: env.content_size,
        sender: env.sender.clone(),
        recipients,
        classes,
    }
}

/// Every listed message, queue by queue (each sorted by ID = arrival).
/// Calls `each` as it goes, so a big queue is never held in memory.
pub fn scan(tree: &QueueTree, mut each: impl FnMut(&Listed) -> io::Result<()>) -> io::Result<()> {
    for q in LISTED {
        let ids = match tree.list(q) {
            Ok(ids) => ids,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(io::Error::new(e.kind(), format!("{}: {e}", q.name()))),
        };
        for id in ids {
            if let Some(l) = read_listed(tree, q, &id) {
                each(&l)?;
            }
        }
    }
    Ok(())
}

/// C's asctime() of local time: "Thu Mar  2 07:10:58 2017".
pub fn asctime(secs: u64) -> String {
    const DAYS: [&str; 7] = ["Sun", "Mon", "Tue", "Wed", "Thu", "Fri", "Sat"];
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let t = secs as libc::time_t;
    // SAFETY: localtime_r writes into the zeroed struct we own.
    let mut tm: libc::tm = unsafe { std::mem::zeroed() };
    let ok = unsafe { !libc::localtime_r(&t, &mut tm).is_null() };
    if !ok {
        return "??".into();
    }
    format!(
        "{} {}{:3} {:02}:{:02}:{:02} {}",
        DAYS[tm.tm_wday.rem_euclid(7) as usize],
        MONTHS[tm.tm_mon.rem_euclid(12) as usize],
        tm.tm_mday,
        tm.tm_hour,
        tm.tm_min,
        tm.tm_sec,
        tm.tm_year + 1900
    )
}

/// Non-printable characters replaced by '?', as Postfix's printable().
fn printable(s: &str) -> String {
    s.chars()
        .map(|c| if c.is_control() { '?' } else { c })
        .collect()
}

/// The `postqueue -p` block of one message, with its trailing blank line.
pub fn format_message(l: &Listed) -> String {
    let status = match l.queue {
        Queue::Active => '*',
        Queue::Hold => '!',
        _ => ' ',
    };
    let sender = if l.sender.is_empty() {
        "MAILER-DAEMON".to_string()
    } else {
        printable(&l.sender)
    };
    let mut out = format!(
        "{:<11} {:>7} {:20.20} {}\n",
        format!("{}{status}", l.id),
        l.size,
        // asctime() ends in a newline that %20.20s cuts off with the year.
        format!("{}\n", asctime(l.arrival)),
        sender
    );
    let mut last_reason = "";
    for (addr, reason) in &l.recipients {
        if !reason.is_empty() && reason != last_reason {
            let r = printable(reason);
            let pad = 76usize.saturating_sub(r.chars().count());
            out.push_str(&format!("{:pad$}({r})\n", ""));
            last_reason = reason;
        }
        out.push_str(&format!("{:41}{}\n", "", printable(addr)));
    }
    out.push('\n');
    out
}

/// Postfix's JSON string quoting.
fn json_str(s: &str) -> String {
    let mut o = String::with_capacity(s.len() + 2);
    o.push('"');
    for c in s.chars() {
        match c {
            '"' => o.push_str("\\\""),
            '\\' => o.push_str("\\\\"),
            '\u{8}' => o.push_str("\\b"),
            '\u{c}' => o.push_str("\\f"),
            '\n' => o.push_str("\\n"),
            '\r' => o.push_str("\\r"),
            '\t' => o.push_str("\\t"),
            c if (c as u32) < 0x20 || c as u32 == 0x7f => {
                o.push_str(&format!("\\u{:04X}", c as u32))
            }
            c => o.push(c),
        }
    }
    o.push('"');
    o
}

/// The `postqueue -j` line of one message.
pub fn format_json(l: &Listed) -> String {
    let rcpts: Vec<String> = l
        .recipients
        .iter()
        .zip(
            l.classes
                .iter()
                .map(String::as_str)
                .chain(std::iter::repeat("")),
        )
        .map(|((a, r), class)| {
            // Postfix's fields, then Postern's bounce class of the
            // deferral (bounce_classifier_maps).
            let class = if class.is_empty() {
                String::new()
            } else {
                format!(", \"bounce_class\": {}", json_str(class))
            };
            if r.is_empty() {
                format!("{{\"address\": {}{class}}}", json_str(a))
            } else {
                format!(
                    "{{\"address\": {}, \"delay_reason\": {}{class}}}",
                    json_str(a),
                    json_str(r)
                )
            }
        })
        .collect();
    format!(
        "{{\"queue_name\": {}, \"queue_id\": {}, \"arrival_time\": {}, \"message_size\": {}, \"forced_expire\": false, \"sender\": {}, \"recipients\": [{}]}}\n",
        json_str(l.queue.name()),
        json_str(&l.id),
        l.arrival,
        l.size,
        json_str(&l.sender),
        rcpts.join(", ")
    )
}

/// Prints the queue as `postqueue -p` does (also `mailq`, `sendmail -bp`)
/// and exits.
pub fn show(name: &str, cfg: &postern_conf::Config, json: bool) -> ! {
    let tree = QueueTree::configured(cfg.get("queue_directory"), cfg);
    let out = io::stdout();
    let mut out = io::BufWriter::new(out.lock());
    let mut count = 0u64;
    let mut bytes = 0u64;
    let res = scan(&tree, |l| {
        if json {
            out.write_all(format_json(l).as_bytes())
        } else {
            if count == 0 {
                out.write_all(
                    format!(
                        "{:<11} {:>7} {:<20} {}\n",
                        "-Queue ID-",
                        "--Size--",
                        "----Arrival Time----",
                        "-Sender/Recipient-------"
                    )
                    .as_bytes(),
                )?;
            }
            count += 1;
            bytes += l.size;
            out.write_all(format_message(l).as_bytes())
        }
    });
    let res = res.and_then(|()| {
        if json {
            Ok(())
        } else if count == 0 {
            out.write_all(b"Mail queue is empty\n")
        } else {
            out.write_all(
                format!(
                    "-- {} Kbytes in {} Request{}.\n",
                    bytes / 1024,
                    count,
                    if count == 1 { "" } else { "s" }
                )
                .as_bytes(),
            )
        }
    });
    match res.and_then(|()| out.flush()) {
        Ok(()) => std::process::exit(EX_OK),
        Err(e) if e.kind() == io::ErrorKind::PermissionDenied => die(
            name,
            EX_NOPERM,
            format_args!(
                "User {}({}) is not allowed to view the mail queue: {e}",
                crate::postsuper::login(),
                nix::unistd::getuid()
            ),
        ),
        Err(e) if e.kind() == io::ErrorKind::BrokenPipe => std::process::exit(EX_OK),
        Err(e) => die(name, EX_IOERR, format_args!("queue scan: {e}")),
    }
}

/// Wakes qmgr, or exits with Postfix's complaint.
fn wake(name: &str, tree: &QueueTree, what: Wakeup) -> ! {
    match ipc::wake(&tree.qmgr_socket(), &[what]) {
        Ok(()) => std::process::exit(EX_OK),
        Err(e) => die(
            name,
            EX_UNAVAILABLE,
            format_args!("Cannot flush mail queue - mail system is down ({e})"),
        ),
    }
}

fn flush_site(name: &str, tree: &QueueTree, site: &str) -> ! {
    let Some(site) = flush::normalize_site(site) else {
        let shown = site
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_ascii_lowercase();
        die(
            name,
            EX_USAGE,
            format_args!("Cannot flush mail queue - invalid destination: \"{shown}\""),
        );
    };
    // The site's flush log names its deferred mail; what is due goes to
    // incoming/ (postern_common::flush).
    flush::flush_site(tree, &site)
        .unwrap_or_else(|e| die(name, EX_NOPERM, format_args!("flush log of {site}: {e}")));
    wake(name, tree, Wakeup::Incoming)
}

fn flush_id(name: &str, tree: &QueueTree, id: &str) -> ! {
    if !postern_common::queue::is_queue_id(id) {
        die(
            name,
            EX_USAGE,
            format_args!("Cannot flush queue ID - invalid name: \"{id}\""),
        );
    }
    if !flush::make_due(tree, id) {
        eprintln!("{name}: warning: {id}: no such message in the deferred queue");
    }
    wake(name, tree, Wakeup::Deferred)
}

fn usage(name: &str) -> ! {
    die(
        name,
        EX_USAGE,
        "usage: postqueue -f | -i queue_id | -j | -p | -s site",
    )
}

/// The entry point of `postqueue` and `mailq` (which is `postqueue -p`).
pub fn main_as(name: &str) -> ! {
    let mut args = std::env::args().skip(1);
    let mut config: Option<PathBuf> = None;
    let mut mode: Option<(char, String)> = if name == "mailq" {
        Some(('p', String::new()))
    } else {
        None
    };
    while let Some(a) = args.next() {
        let Some(flags) = a.strip_prefix('-').filter(|f| !f.is_empty()) else {
            usage(name)
        };
        for (i, c) in flags.char_indices() {
            match c {
                'c' | 's' | 'i' => {
                    let rest = &flags[i + 1..];
                    let v = if rest.is_empty() {
                        args.next().unwrap_or_else(|| usage(name))
                    } else {
                        rest.to_string()
                    };
                    if c == 'c' {
                        config = Some(PathBuf::from(v));
                    } else {
                        mode = Some((c, v));
                    }
                    break;
                }
                'p' | 'j' | 'f' => mode = Some((c, String::new())),
                'v' => {}
                _ => usage(name),
            }
        }
    }
    let Some((mode, value)) = mode else {
        usage(name)
    };
    let cfg = crate::load_config(name, config.as_deref());
    postern_common::log::init(
        "postqueue",
        &cfg.get("syslog_name"),
        &cfg.get("maillog_file"),
        true,
        false,
    );
    let tree = QueueTree::configured(cfg.get("queue_directory"), &cfg);
    match mode {
        'p' => show(name, &cfg, false),
        'j' => show(name, &cfg, true),
        'f' => wake(name, &tree, Wakeup::Flush),
        's' => flush_site(name, &tree, &value),
        'i' => flush_id(name, &tree, &value),
        _ => usage(name),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn listed(queue: Queue, rcpts: &[(&str, &str)]) -> Listed {
        Listed {
            queue,
            id: "6921A3B2012345A1B2".into(),
            arrival: 1_700_000_000,
            size: 943,
            sender: "full@example.net".into(),
            recipients: rcpts
                .iter()
                .map(|(a, r)| (a.to_string(), r.to_string()))
                .collect(),
            classes: Vec::new(),
        }
    }

    /// A finished message still in `active/` (every recipient done, its
    /// file not yet retired by qmgr) is not listed; one with a recipient
    /// left is.
    #[test]
    fn a_finished_message_in_active_is_not_listed() {
        let root = std::env::temp_dir().join(format!("pql-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let tree = QueueTree::new(&root);
        tree.create_dirs(None, None).unwrap();
        let ids: Vec<String> = ["done@y.test", "left@y.test"]
            .iter()
            .map(|rcpt| {
                let nf = tree.create(Queue::Active).unwrap();
                let mut w = qfile::Writer::new(nf.file).unwrap();
                w.arrival(1_700_000_000, 0).unwrap();
                w.sender("s@x.test").unwrap();
                w.recipient(&qfile::Recipient::new(rcpt)).unwrap();
                w.begin_content().unwrap();
                w.content(b"Subject: t\r\n\r\nbody\r\n").unwrap();
                w.finish().unwrap();
                nf.id
            })
            .collect();
        let listed_ids = || {
            let mut got = Vec::new();
            scan(&tree, |l| {
                got.push(l.id.clone());
                Ok(())
            })
            .unwrap();
            got.sort();
            got
        };
        let mut both = ids.clone();
        both.sort();
        assert_eq!(listed_ids(), both);
        let f = File::options()
            .read(true)
            .write(true)
            .open(tree.path(Queue::Active, &ids[0]))
            .unwrap();
        let env = qfile::read_envelope(&f).unwrap();
        qfile::mark_done(&f, env.recipients[0].offset).unwrap();
        assert_eq!(listed_ids(), vec![ids[1].clone()]);
        std::fs::remove_dir_all(root).unwrap();
    }

    #[test]
    fn postfix_layout() {
        std::env::set_var("TZ", "UTC");
        let l = listed(
            Queue::Deferred,
            &[
                (
                    "a@x.test",
                    "connect to mail.example.net[192.0.2.26]:25: Connection refused",
                ),
                (
                    "b@x.test",
                    "connect to mail.example.net[192.0.2.26]:25: Connection refused",
                ),
                ("c@x.test", ""),
            ],
        );
        let text = format_message(&l);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(
            lines[0],
            "6921A3B2012345A1B2      943 Tue Nov 14 22:13:20  full@example.net"
        );
        assert_eq!(
            lines[1],
            "              (connect to mail.example.net[192.0.2.26]:25: Connection refused)"
        );
        assert_eq!(lines[1].len(), 78);
        assert_eq!(lines[2], format!("{:41}a@x.test", ""));
        assert_eq!(lines[3], format!("{:41}b@x.test", ""));
        assert_eq!(lines[4], format!("{:41}c@x.test", ""));
        assert_eq!(lines[5], "");
        let mut short = l.clone();
        short.id = "4E4D83AF8E".into();
        short.queue = Queue::Active;
        assert!(format_message(&short).starts_with("4E4D83AF8E*     943 Tue Nov 14 22:13:20  full"));
    }

    #[test]
    fn json_line() {
        let l = listed(
            Queue::Hold,
            &[("a@x.test", "say \"hi\"\n"), ("b@x.test", "")],
        );
        assert_eq!(
            format_json(&l),
            "{\"queue_name\": \"hold\", \"queue_id\": \"6921A3B2012345A1B2\", \"arrival_time\": 1700000000, \"message_size\": 943, \"forced_expire\": false, \"sender\": \"full@example.net\", \"recipients\": [{\"address\": \"a@x.test\", \"delay_reason\": \"say \\\"hi\\\"\\n\"}, {\"address\": \"b@x.test\"}]}\n"
        );
    }
}
