//! bench/hashqueue's helper: fills the deferred queue of a stopped
//! Postern with N real queue files, written as cleanup writes them
//! (`QueueTree::create`, `qfile::Writer`, the file and its directory
//! fsync'd), placed by the configured hashing (`hash_queue_names`,
//! `hash_queue_depth`), owned by `mail_owner` when run as root, with a
//! retry time in the future; or times one listing of the deferred queue
//! as qmgr's scan makes it (`QueueTree::list`). Also bench/bigqueue's
//! and tests/test_bigqueue.py's: a queue for many sites.
//!
//!     mkqueue -c CONFIG_DIR -n N [-j THREADS] [-l SIZE] [-r RETRY_SECS]
//!             [--spread SECS] [--domain DOMAIN] [--sites S]
//!     mkqueue -c CONFIG_DIR --list
//!
//! Message i goes to `u<i>@DOMAIN` (default `remote.test`), or with
//! `--sites S` to `u<i>@site<i mod S>.DOMAIN`; its retry time is
//! RETRY_SECS from now, plus i/N of `--spread` (spread evenly). Its
//! queue ID is appended to the flush log of its recipient's domain
//! (`flush/DOMAIN`, `postern_common::flush::add`), as qmgr appends it
//! when it defers a message, so that `postqueue -s`, ETRN and `postern
//! resume` find it.
//!
//! Prints one line: `queued N in S s (flush logs: F s)` (F: the time the
//! threads spent appending to the flush logs, summed) or `listed N in S s`.

use postern_common::qfile::{Recipient, Writer};
use postern_common::queue::{self, Queue, QueueTree};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

fn usage() -> ! {
    eprintln!(
        "usage: mkqueue -c CONFIG_DIR (-n N [-j THREADS] [-l SIZE] [-r RETRY_SECS] \
         [--spread SECS] [--domain DOMAIN] [--sites S] | --list)"
    );
    std::process::exit(64)
}

fn main() {
    let mut config: Option<PathBuf> = None;
    let (mut n, mut threads, mut size, mut retry) = (0usize, 4usize, 1024usize, 3600u64);
    let mut list = false;
    let (mut spread, mut sites) = (0u64, 0usize);
    let mut domain = "remote.test".to_string();
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut value = || args.next().unwrap_or_else(|| usage());
        match a.as_str() {
            "-c" => config = Some(value().into()),
            "-n" => n = value().parse().unwrap_or_else(|_| usage()),
            "-j" => threads = value().parse().unwrap_or_else(|_| usage()),
            "-l" => size = value().parse().unwrap_or_else(|_| usage()),
            "-r" => retry = value().parse().unwrap_or_else(|_| usage()),
            "--list" => list = true,
            "--spread" => spread = value().parse().unwrap_or_else(|_| usage()),
            "--sites" => sites = value().parse().unwrap_or_else(|_| usage()),
            "--domain" => domain = value(),
            _ => usage(),
        }
    }
    let Some(config) = config else { usage() };
    let cfg = postern_conf::Config::load(&config).unwrap_or_else(|e| {
        eprintln!("mkqueue: {e}");
        std::process::exit(1)
    });
    let tree = QueueTree::configured(cfg.get("queue_directory"), &cfg);
    if list {
        let t0 = Instant::now();
        let ids = tree.list(Queue::Deferred).unwrap_or_else(|e| {
            eprintln!("mkqueue: deferred: {e}");
            std::process::exit(1)
        });
        println!(
            "listed {} in {:.3} s",
            ids.len(),
            t0.elapsed().as_secs_f64()
        );
        return;
    }
    let owner = postern_common::privs::queue_owner(&cfg).unwrap_or_else(|e| {
        eprintln!("mkqueue: {e}");
        std::process::exit(1)
    });
    let ids = owner.map(|o| (o.uid, o.gid));
    // A body of `size` bytes in lines of 76.
    let mut body = b"Subject: bench\nFrom: from@x.test\nTo: to@remote.test\n\n".to_vec();
    while body.len() < size {
        let line = 76.min(size - body.len());
        body.extend(std::iter::repeat_n(b'x', line.saturating_sub(1)));
        body.push(b'\n');
    }
    let next = AtomicUsize::new(0);
    let log_ns = std::sync::atomic::AtomicU64::new(0);
    let t0 = Instant::now();
    let start = std::time::SystemTime::now() + std::time::Duration::from_secs(retry);
    std::thread::scope(|s| {
        for _ in 0..threads.max(1) {
            s.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= n {
                    break;
                }
                let rcpt = if sites > 0 {
                    format!("u{i}@site{}.{domain}", i % sites)
                } else {
                    format!("u{i}@{domain}")
                };
                let at =
                    start + std::time::Duration::from_secs(spread * i as u64 / n.max(1) as u64);
                if let Err(e) = one(&tree, &body, &rcpt, at, ids, &log_ns) {
                    eprintln!("mkqueue: {e}");
                    std::process::exit(1)
                }
            });
        }
    });
    println!(
        "queued {n} in {:.3} s (flush logs: {:.3} s)",
        t0.elapsed().as_secs_f64(),
        log_ns.load(Ordering::Relaxed) as f64 / 1e9
    );
}

/// Writes one message to `rcpt` as cleanup does and defers it until `at`.
fn one(
    tree: &QueueTree,
    body: &[u8],
    rcpt: &str,
    at: std::time::SystemTime,
    owner: Option<(u32, u32)>,
    log_ns: &std::sync::atomic::AtomicU64,
) -> std::io::Result<()> {
    let nf = tree.create(Queue::Deferred)?;
    let mut w = Writer::new(nf.file)?;
    let (secs, usecs) = queue::now();
    w.arrival(secs, usecs)?;
    w.sender("from@x.test")?;
    w.attribute("protocol", "ESMTP")?;
    w.recipient(&Recipient::new(rcpt))?;
    w.begin_content()?;
    w.content(body)?;
    let file = w.finish()?;
    if let Some((uid, gid)) = owner {
        std::os::unix::fs::fchown(&file, Some(uid), Some(gid))?;
    }
    file.set_modified(at)?;
    queue::sync_dir_grouped(&tree.parent(Queue::Deferred, &nf.id))?;
    // As qmgr does when it defers a message.
    if let Some(domain) = postern_common::flush::domain_of(rcpt) {
        let t = Instant::now();
        postern_common::flush::add(tree, &domain, &nf.id)?;
        log_ns.fetch_add(t.elapsed().as_nanos() as u64, Ordering::Relaxed);
    }
    Ok(())
}
