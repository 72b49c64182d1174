//! postcat: prints a queue file, as Postfix's `postcat`.
//!
//! `postcat [-c dir] [-e] [-h] [-b] [-q] file...`: with `-q` the
//! arguments are queue IDs, looked for in `maildrop incoming active
//! deferred hold corrupt`; otherwise they are file names. `-e` prints the
//! envelope records (and the `*** ... ***` section markers), `-h` the
//! message headers (up to the first line that is not a header), `-b` the
//! body (from that line on); with none of them, all three. The content is
//! streamed from the file, never held whole in memory. It only reads.

use crate::die;
use crate::postqueue::asctime;
use crate::sysexits::*;
use postern_common::qfile::{self, ContentReader};
use postern_common::queue::{is_queue_id, Queue, QueueTree};
use std::fs::File;
use std::io::{self, BufRead, BufReader, Write};
use std::path::PathBuf;

const ENVELOPE: u8 = 1;
const HEADERS: u8 = 2;
const BODY: u8 = 4;

/// Whether a line starts a header field ("Name:" with a printable name).
fn is_header_start(line: &[u8]) -> bool {
    match line.iter().position(|&b| b == b':') {
        Some(i) if i > 0 => line[..i].iter().all(|&b| (33..=126).contains(&b)),
        _ => false,
    }
}

fn print_file(out: &mut impl Write, file: &File, label: &str, what: u8) -> io::Result<()> {
    let env = qfile::read_envelope(file).map_err(|e| io::Error::other(format!("{label}: {e}")))?;
    let marks = what & ENVELOPE != 0;
    if marks {
        writeln!(out, "*** ENVELOPE RECORDS {label} ***")?;
        writeln!(
            out,
            "message_size: {:>15} {:>15} {:>15} {:>15} {:>15}",
            env.content_size,
            env.content_offset,
            env.recipients.len(),
            0,
            env.content_size
        )?;
        writeln!(out, "message_arrival_time: {}", asctime(env.arrival_secs))?;
        writeln!(out, "sender: {}", env.sender)?;
        for (n, v) in &env.attrs {
            match n.as_str() {
                qfile::attr::ENVID => writeln!(out, "dsn_envelope_id: {v}")?,
                qfile::attr::RET => writeln!(out, "dsn_ret_flags: {v}")?,
                _ => writeln!(out, "named_attribute: {n}={v}")?,
            }
        }
        for r in &env.recipients {
            if !r.rcpt.original.is_empty() {
                writeln!(out, "original_recipient: {}", r.rcpt.original)?;
            }
            if !r.rcpt.orcpt.is_empty() {
                writeln!(out, "dsn_orig_rcpt: {}", r.rcpt.orcpt)?;
            }
            if r.rcpt.notify != 0 {
                writeln!(out, "dsn_notify_flags: {}", r.rcpt.notify)?;
            }
            let kind = if r.done {
                "done_recipient"
            } else {
                "recipient"
            };
            writeln!(out, "{kind}: {}", r.rcpt.address)?;
        }
        writeln!(out, "*** MESSAGE CONTENTS {label} ***")?;
    }
    if what & (HEADERS | BODY) != 0 {
        let mut r = BufReader::new(ContentReader::new(file, env.content_offset)?);
        let mut in_headers = true;
        let mut line = Vec::new();
        loop {
            line.clear();
            if r.read_until(b'\n', &mut line)? == 0 {
                break;
            }
            if in_headers {
                let cont = matches!(line.first(), Some(b' ' | b'\t'));
                if !(is_header_start(&line) || cont) {
                    in_headers = false;
                }
            }
            let show = if in_headers { HEADERS } else { BODY };
            if what & show != 0 {
                out.write_all(&line)?;
            } else if !in_headers && what & BODY == 0 {
                break;
            }
        }
    }
    if marks {
        writeln!(out, "*** HEADER EXTRACTED {label} ***")?;
        writeln!(out, "*** MESSAGE FILE END {label} ***")?;
    }
    Ok(())
}

fn usage(name: &str) -> ! {
    die(
        name,
        EX_USAGE,
        "usage: postcat [-bdehoqv] [-c config_dir] [files...]",
    )
}

/// The entry point of `postcat`.
pub fn main() -> ! {
    let name = "postcat";
    let mut args = std::env::args().skip(1);
    let mut config: Option<PathBuf> = None;
    let mut what = 0u8;
    let mut by_id = false;
    let mut names = Vec::new();
    while let Some(a) = args.next() {
        let Some(flags) = a.strip_prefix('-').filter(|f| !f.is_empty()) else {
            names.push(a);
            names.extend(args.by_ref());
            break;
        };
        for (i, c) in flags.char_indices() {
            match c {
                'c' => {
                    let rest = &flags[i + 1..];
                    config = Some(PathBuf::from(if rest.is_empty() {
                        args.next().unwrap_or_else(|| usage(name))
                    } else {
                        rest.to_string()
                    }));
                    break;
                }
                'e' => what |= ENVELOPE,
                'h' => what |= HEADERS,
                'b' => what |= BODY,
                'q' => by_id = true,
                'd' | 'o' | 'v' | 'r' | 's' => {}
                _ => usage(name),
            }
        }
    }
    if what == 0 {
        what = ENVELOPE | HEADERS | BODY;
    }
    if names.is_empty() {
        usage(name);
    }
    let tree = if by_id {
        let cfg = crate::load_config(name, config.as_deref());
        Some(QueueTree::configured(cfg.get("queue_directory"), &cfg))
    } else {
        None
    };
    let stdout = io::stdout();
    let mut out = io::BufWriter::new(stdout.lock());
    let mut status = EX_OK;
    for n in names {
        let opened = match &tree {
            Some(tree) => {
                if !is_queue_id(&n) {
                    Err(io::Error::other(format!("invalid queue id: {n}")))
                } else {
                    Queue::ALL
                        .into_iter()
                        .find_map(|q| {
                            // Labelled as Postfix's postcat: the path
                            // below queue_directory, hash subdirectories
                            // included (deferred/6/ID).
                            let path = tree.locate(q, &n)?;
                            let label = path
                                .strip_prefix(tree.root())
                                .unwrap_or(&path)
                                .display()
                                .to_string();
                            File::open(&path).ok().map(|f| (f, label))
                        })
                        .ok_or_else(|| {
                            io::Error::other(format!(
                                "open queue file {n}: No such file or directory"
                            ))
                        })
                }
            }
            None => File::open(&n)
                .map(|f| (f, n.clone()))
                .map_err(|e| io::Error::other(format!("open {n}: {e}"))),
        };
        let res = opened.and_then(|(f, label)| print_file(&mut out, &f, &label, what));
        if let Err(e) = res {
            let _ = out.flush();
            if e.kind() == io::ErrorKind::BrokenPipe {
                std::process::exit(EX_OK);
            }
            eprintln!("{name}: fatal: {e}");
            status = 1;
        }
    }
    let _ = out.flush();
    std::process::exit(status)
}
