//! qshape: the shape of the queue, as Postfix's qshape(1): for each
//! recipient (or, with `-s`, sender) domain, how many addresses wait, by
//! age. The report is Postfix's, column for column, so that the
//! troubleshooting guides' readings apply unchanged.
//!
//! `qshape [-s] [-p] [-m min_subdomains] [-b bucket_count] [-t bucket_time]
//! [-l] [-w terminal_width] [-N batch_msg_count] [-n batch_top_domains]
//! [-c config_directory] [queue...]`
//!
//! - Queues (default `incoming active`) are directories under
//!   `queue_directory`, or absolute paths, walked with their
//!   subdirectories. A file counts when its name is 6 or more letters and
//!   digits and it is a complete queue file with a pending recipient
//!   (each pending recipient counts once).
//! - Domain: the address lower-cased, `MAILER-DAEMON` for the null
//!   sender, the part after the last `@`, `..` collapsed, one leading and
//!   one trailing dot dropped. With `-p` each parent domain (not a
//!   top-level one) is counted too, as `.example.com`, and shown when at
//!   least `min_subdomains` (5) of its subdomains are.
//! - Ages: bucket `i` holds messages whose age in units of `bucket_time`
//!   minutes (5) is in [0,1), [1,2), [2,4), [4,8), ... (`-l`: [0,1),
//!   [1,2), [2,3), ...), the last one (of `bucket_count`, 10) everything
//!   older; the headings are each bucket's upper bound, `T` the total.
//! - Rows: `TOTAL` and the domains by count, most first, then shorter
//!   names first (Postfix leaves further ties in hash order; here they
//!   are alphabetical). Column widths follow the totals; the domain
//!   column gets what `terminal_width` (80, larger with `-w`) leaves, at
//!   least 18 characters, a longer name cut on the left behind `+`.
//! - When standard output is a terminal, the screen is cleared and the
//!   `batch_top_domains` (20) first rows printed every `batch_msg_count`
//!   (1000) messages and at the end; otherwise (as Postfix's) `-N` and
//!   `-n` do nothing and every row is printed once.

use crate::die;
use crate::sysexits::*;
use postern_common::qfile;
use std::collections::HashMap;
use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};

const NAME: &str = "qshape";

const USAGE: &str = "Usage: qshape [ -s ] [ -p ] [ -m <min_subdomains> ] [ -l ]
\t[ -b <bucket_count> ] [ -t <bucket_time> ] [ -w <terminal_width> ]
\t[ -N <batch_msg_count> ] [ -n <batch_top_domains> ]
\t[ -c <config_directory> ] [ <queue_name> ... ]
The 's' option shows sender domain counts.
The 'p' option shows address counts by for parent domains.
Parent domains are shown with a leading '.' before the domain name.
Parent domains are only shown if the domain is not a TLD, and at
least <min_subdomains> (default 5) subdomains are shown in the output.

The bucket age ranges in units of <bucket_time> minutes are
[0,1), [1,2), [2,4), [4,8), [8, 16), ... i.e.:
\tthe first bucket is [0, bucket_time) minutes
\tthe second bucket is [bucket_time, 2*bucket_time) minutes
\tthe third bucket is [2*bucket_time, 4*bucket_time) minutes...
'-l' makes the ages linear, the number of buckets shown is <bucket_count>

The default summary is for the incoming and active queues. An explicit
list of queue names can be given on the command line. Non-absolute queue
names are interpreted relative to the Postern queue directory. Use
<config_directory> to specify a non-default Postern instance.
";

fn usage(problem: Option<String>) -> ! {
    if let Some(p) = problem {
        eprintln!("{NAME}: {p}");
    }
    eprint!("{USAGE}");
    std::process::exit(EX_USAGE)
}

/// A number as Perl reads one: its leading numeric part, else 0.
fn perl_number(s: &str) -> f64 {
    let s = s.trim_start();
    let mut end = 0;
    let b = s.as_bytes();
    let mut seen_dot = false;
    while end < b.len() {
        match b[end] {
            b'0'..=b'9' => {}
            b'.' if !seen_dot => seen_dot = true,
            b'+' | b'-' if end == 0 => {}
            _ => break,
        }
        end += 1;
    }
    s[..end].parse().unwrap_or(0.0)
}

/// A number as Perl prints one (`%.15g`).
fn perl_format(v: f64) -> String {
    if v == 0.0 {
        return "0".into();
    }
    let sci = format!("{v:.14e}");
    let exp: i32 = sci
        .rsplit_once('e')
        .and_then(|(_, e)| e.parse().ok())
        .unwrap_or(0);
    if !(-5..15).contains(&exp) {
        let (mant, _) = sci.split_once('e').unwrap_or((&sci, ""));
        let mant = mant.trim_end_matches('0').trim_end_matches('.');
        return format!("{mant}e{}{:02}", if exp < 0 { '-' } else { '+' }, exp.abs());
    }
    let fixed = format!("{:.*}", (14 - exp).max(0) as usize, v);
    if fixed.contains('.') {
        fixed
            .trim_end_matches('0')
            .trim_end_matches('.')
            .to_string()
    } else {
        fixed
    }
}

/// The report's settings.
#[derive(Debug, Clone)]
pub struct Shape {
    pub senders: bool,
    pub parents: bool,
    pub linear: bool,
    /// Number of age buckets (`-b`).
    pub buckets: usize,
    /// Minutes per bucket unit (`-t`).
    pub tick: f64,
    pub width: usize,
    pub min_subdomains: f64,
    pub batch_msg_count: u64,
    pub batch_top_domains: u64,
    /// Printed before each report in batch mode (clears a terminal).
    pub clear: &'static str,
}

impl Default for Shape {
    fn default() -> Shape {
        Shape {
            senders: false,
            parents: false,
            linear: false,
            buckets: 10,
            tick: 5.0,
            width: 80,
            min_subdomains: 5.0,
            batch_msg_count: 0,
            batch_top_domains: 0,
            clear: "",
        }
    }
}

/// The domain an address is counted under (see the module doc).
pub fn domain_of(address: &[u8]) -> Vec<u8> {
    let mut a = address.to_ascii_lowercase();
    if a.is_empty() {
        a = b"MAILER-DAEMON".to_vec();
    }
    if let Some(at) = a.iter().rposition(|&c| c == b'@') {
        a.drain(..=at);
    }
    // ".." -> ".", left to right, not overlapping.
    let mut d = Vec::with_capacity(a.len());
    let mut i = 0;
    while i < a.len() {
        if a[i] == b'.' && a.get(i + 1) == Some(&b'.') {
            d.push(b'.');
            i += 2;
        } else {
            d.push(a[i]);
            i += 1;
        }
    }
    let start = usize::from(d.len() >= 2 && d[0] == b'.');
    let rest = &d[start..];
    let end = if rest.len() >= 2 && rest.ends_with(b".") {
        rest.len() - 1
    } else {
        rest.len()
    };
    rest[..end].to_vec()
}

/// The parent of a domain as `-p` counts it (`a.b.example.com` ->
/// `.b.example.com` -> `.example.com`), `None` at the top.
pub fn parent_of(domain: &[u8]) -> Option<Vec<u8>> {
    let s = domain.strip_prefix(b".").unwrap_or(domain);
    let dot = s.iter().position(|&c| c == b'.')?;
    if dot == 0 {
        return None;
    }
    let rest = &s[dot + 1..];
    if !rest.contains(&b'.') {
        return None;
    }
    let mut p = b".".to_vec();
    p.extend_from_slice(rest);
    Some(p)
}

/// Counts by domain and age bucket.
pub struct Counts {
    shape: Shape,
    now: u64,
    /// Index 0: all ages; 1..=buckets: one bucket each.
    rows: HashMap<Vec<u8>, Vec<u64>>,
    /// Parent domain -> subdomains counted under it.
    subdomains: HashMap<Vec<u8>, u64>,
    messages: u64,
}

const TOTAL: &[u8] = b"TOTAL";

impl Counts {
    pub fn new(shape: Shape, now: u64) -> Counts {
        Counts {
            shape,
            now,
            rows: HashMap::new(),
            subdomains: HashMap::new(),
            messages: 0,
        }
    }

    fn bucket(&self, arrival: u64) -> usize {
        let m = (self.now as f64 - arrival as f64) / (60.0 * self.shape.tick);
        if m < 1.0 {
            return 1;
        }
        let b = if self.shape.linear {
            (m + 1.0).floor() as usize
        } else {
            2 + (m.ln() / 2f64.ln()).floor() as usize
        };
        b.min(self.shape.buckets)
    }

    fn bump(&mut self, key: &[u8], bucket: usize) -> bool {
        let n = self.shape.buckets + 1;
        let row = self.rows.entry(key.to_vec()).or_insert_with(|| vec![0; n]);
        row[0] += 1;
        row[bucket] += 1;
        row[0] > 1
    }

    /// Counts one message's addresses.
    pub fn add(&mut self, arrival: u64, addresses: &[&[u8]]) {
        let b = self.bucket(arrival);
        for a in addresses {
            self.bump(TOTAL, b);
            let mut d = domain_of(a);
            let mut new = false;
            loop {
                let old = self.bump(&d, b);
                if new {
                    *self.subdomains.entry(d.clone()).or_insert(0) += 1;
                }
                new = !old;
                if !self.shape.parents {
                    break;
                }
                match parent_of(&d) {
                    Some(p) => d = p,
                    None => break,
                }
            }
        }
        self.messages += 1;
    }

    /// Whether a batch report is due after the message just added.
    pub fn batch_due(&self) -> bool {
        self.shape.batch_msg_count > 0 && self.messages.is_multiple_of(self.shape.batch_msg_count)
    }

    /// The report.
    pub fn report(&mut self) -> Vec<u8> {
        let s = &self.shape;
        let n = s.buckets + 1;
        let total = self
            .rows
            .entry(TOTAL.to_vec())
            .or_insert_with(|| vec![0; n])
            .clone();
        let mut heads: Vec<String> = Vec::new();
        let mut widths: Vec<usize> = Vec::new();
        let mut dw = s.width as i64;
        let mut t: f64 = 0.0;
        let mut t_label: Option<String> = None;
        for (i, count) in total.iter().enumerate() {
            let count_len = count.to_string().len();
            let h = if i == 0 {
                "T".to_string()
            } else {
                t_label.clone().unwrap_or_else(|| perl_format(t))
            };
            let l = h.len().max(count_len);
            let l = if l > 2 { l + 1 } else { 3 };
            heads.push(h);
            widths.push(l);
            dw -= l as i64;
            if i + 1 < s.buckets {
                t += if t != 0.0 && !s.linear { t } else { s.tick };
            } else {
                t_label = Some(format!(
                    "{}+",
                    t_label.clone().unwrap_or_else(|| perl_format(t))
                ));
            }
        }
        let dw = dw.max(18) as usize;
        let mut out = Vec::new();
        out.extend_from_slice(s.clear.as_bytes());
        let line = |out: &mut Vec<u8>, d: &[u8], cells: &[String]| {
            if d.len() > dw {
                if d.starts_with(b".") {
                    out.extend_from_slice(b".+");
                    out.extend_from_slice(&d[d.len() - (dw - 2)..]);
                } else {
                    out.push(b'+');
                    out.extend_from_slice(&d[d.len() - (dw - 1)..]);
                }
            } else {
                out.resize(out.len() + dw - d.len(), b' ');
                out.extend_from_slice(d);
            }
            for (c, w) in cells.iter().zip(&widths) {
                out.extend_from_slice(format!("{c:>w$}").as_bytes());
            }
            out.push(b'\n');
        };
        line(&mut out, b"", &heads);
        let mut keys: Vec<&Vec<u8>> = self.rows.keys().collect();
        keys.sort_by(|a, b| {
            self.rows[*b][0]
                .cmp(&self.rows[*a][0])
                .then(a.len().cmp(&b.len()))
                .then(a.cmp(b))
        });
        let mut shown = 0u64;
        for d in keys {
            if d.starts_with(b".")
                && (self.subdomains.get(d).copied().unwrap_or(0) as f64) < s.min_subdomains
            {
                continue;
            }
            shown += 1;
            if s.batch_top_domains > 0 && shown > s.batch_top_domains {
                break;
            }
            let cells: Vec<String> = self.rows[d].iter().map(|c| c.to_string()).collect();
            line(&mut out, d, &cells);
        }
        out
    }
}

/// Calls `each` for every file below `dir` (depth first), as File::Find.
fn walk(dir: &Path, each: &mut dyn FnMut(&Path)) {
    let mut entries: Vec<PathBuf> = match std::fs::read_dir(dir) {
        Ok(rd) => rd.flatten().map(|e| e.path()).collect(),
        Err(e) => {
            eprintln!("{NAME}: Can't opendir({}): {e}", dir.display());
            return;
        }
    };
    entries.sort();
    for p in entries {
        match std::fs::symlink_metadata(&p) {
            Ok(m) if m.is_dir() => walk(&p, each),
            Ok(m) if m.is_file() => each(&p),
            _ => {}
        }
    }
}

/// Whether a file name is a queue ID as qshape takes one.
fn queue_file_name(p: &Path) -> bool {
    p.file_name()
        .and_then(|n| n.to_str())
        .is_some_and(|n| n.len() >= 6 && n.bytes().all(|c| c.is_ascii_alphanumeric()))
}

/// The arrival time and counted addresses of a queue file, if it counts.
fn read_message(p: &Path, senders: bool) -> Option<(u64, Vec<Vec<u8>>)> {
    let f = std::fs::File::open(p).ok()?;
    let env = qfile::read_envelope(&f).ok()?;
    let pending: Vec<Vec<u8>> = env
        .pending()
        .map(|r| r.rcpt.address.as_bytes().to_vec())
        .collect();
    if pending.is_empty() {
        return None;
    }
    let addresses = if senders {
        vec![env.sender.as_bytes().to_vec()]
    } else {
        pending
    };
    Some((env.arrival_secs, addresses))
}

pub fn main() -> ! {
    let mut shape = Shape::default();
    let mut config: Option<PathBuf> = None;
    let mut queues: Vec<String> = Vec::new();
    let (mut batch_n, mut batch_top): (Option<f64>, Option<f64>) = (None, None);
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        if a == "--" {
            queues.extend(args.by_ref());
            break;
        }
        let Some(flags) = a.strip_prefix('-').filter(|f| !f.is_empty()) else {
            queues.push(a);
            queues.extend(args.by_ref());
            break;
        };
        for (i, c) in flags.char_indices() {
            match c {
                's' => shape.senders = true,
                'p' => shape.parents = true,
                'l' => shape.linear = true,
                'h' => usage(None),
                'c' | 'w' | 'b' | 't' | 'm' | 'n' | 'N' => {
                    let rest = &flags[i + 1..];
                    let v = if rest.is_empty() {
                        args.next().unwrap_or_else(|| {
                            usage(Some(format!("Option {c} requires an argument")))
                        })
                    } else {
                        rest.to_string()
                    };
                    let x = perl_number(&v);
                    match c {
                        'c' => config = Some(v.into()),
                        'w' if x > 80.0 => shape.width = x as usize,
                        'b' if x >= 1.0 => shape.buckets = x as usize,
                        't' if x > 0.0 => shape.tick = x,
                        'm' if x > 0.0 => shape.min_subdomains = x,
                        'N' => batch_n = Some(x),
                        'n' => batch_top = Some(x),
                        _ => {}
                    }
                    break;
                }
                other => usage(Some(format!("Unknown option: {other}"))),
            }
        }
    }
    if queues.is_empty() {
        queues = vec!["incoming".into(), "active".into()];
    }
    let root = if queues.iter().all(|q| q.starts_with('/')) {
        PathBuf::new()
    } else {
        let cfg = crate::load_config(NAME, config.as_deref());
        PathBuf::from(cfg.get("queue_directory"))
    };
    let tty = std::io::stdout().is_terminal();
    if tty {
        shape.batch_msg_count = batch_n.unwrap_or(1000.0).max(0.0) as u64;
        shape.batch_top_domains = batch_top.unwrap_or(20.0).max(0.0) as u64;
        if shape.batch_msg_count > 0 {
            shape.clear = "\x1b[H\x1b[2J\x1b[3J";
        }
    }
    let senders = shape.senders;
    let now = postern_common::time::now_secs();
    let mut counts = Counts::new(shape, now);
    let mut stdout = std::io::stdout().lock();
    let mut print = |report: Vec<u8>| {
        if let Err(e) = stdout.write_all(&report).and_then(|()| stdout.flush()) {
            if e.kind() == std::io::ErrorKind::BrokenPipe {
                std::process::exit(EX_OK);
            }
            die(NAME, EX_IOERR, format_args!("write: {e}"));
        }
    };
    for q in &queues {
        let dir = root.join(q);
        if !dir.exists() {
            eprintln!("{NAME}: Can't stat {q}: No such file or directory");
            continue;
        }
        walk(&dir, &mut |p: &Path| {
            if !queue_file_name(p) {
                return;
            }
            if let Some((arrival, addresses)) = read_message(p, senders) {
                let refs: Vec<&[u8]> = addresses.iter().map(|a| a.as_slice()).collect();
                counts.add(arrival, &refs);
                if counts.batch_due() {
                    print(counts.report());
                }
            }
        });
    }
    print(counts.report());
    std::process::exit(EX_OK)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn domains_as_postfix_qshape_counts_them() {
        assert_eq!(domain_of(b"User@Example.COM"), b"example.com");
        assert_eq!(domain_of(b""), b"MAILER-DAEMON");
        assert_eq!(domain_of(b"a@b@c.test."), b"c.test");
        assert_eq!(domain_of(b"x@.a..b.test"), b"a.b.test");
        assert_eq!(domain_of(b"local"), b"local");
        assert_eq!(domain_of(b"x@."), b".");
        assert_eq!(parent_of(b"a.b.example.com").unwrap(), b".b.example.com");
        assert_eq!(parent_of(b".b.example.com").unwrap(), b".example.com");
        assert_eq!(parent_of(b".example.com"), None);
        assert_eq!(parent_of(b"com"), None);
    }

    #[test]
    fn numbers_as_perl_prints_them() {
        assert_eq!(perl_format(5.0), "5");
        assert_eq!(perl_format(1280.0), "1280");
        assert_eq!(perl_format(0.04 + 0.02), "0.06");
        assert_eq!(perl_format(2.5), "2.5");
        assert_eq!(perl_format(1e20), "1e+20");
    }

    #[test]
    fn the_report_of_postfix_qshape() {
        let now = 1_000_000;
        let a = |s: &'static str| s.as_bytes();
        let mut c = Counts::new(Shape::default(), now);
        c.add(now, &[a("a@x.test"), a("b@x.test")]);
        c.add(now - 7 * 60, &[a("c@yy.test")]);
        c.add(now - 10 * 86400, &[a("d@x.test")]);
        let text = String::from_utf8(c.report()).unwrap();
        let want = concat!(
            "                                         T  5 10 20 40 80 160 320 640 1280 1280+\n",
            "                                  TOTAL  4  2  1  0  0  0   0   0   0    0     1\n",
            "                                 x.test  3  2  0  0  0  0   0   0   0    0     1\n",
            "                                yy.test  1  0  1  0  0  0   0   0   0    0     0\n",
        );
        assert_eq!(text, want);
    }
}
