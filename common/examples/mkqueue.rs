//! bench/hashqueue's helper: fills the deferred queue of a stopped
//! Postern with N real queue files, written as cleanup writes them
//! (`QueueTree::create`, `qfile::Writer`, the file and its directory
//! fsync'd), placed by the configured hashing (`hash_queue_names`,
//! `hash_queue_depth`), owned by `mail_owner` when run as root, with a
//! retry time in the future; or times one listing of the deferred queue
//! as qmgr's scan makes it (`QueueTree::list`).
//!
//!     mkqueue -c CONFIG_DIR -n N [-j THREADS] [-l SIZE] [-r RETRY_SECS]
//!     mkqueue -c CONFIG_DIR --list
//!
//! Prints one line: `queued N in S s` or `listed N in S s`.

use postern_common::qfile::{Recipient, Writer};
use postern_common::queue::{self, Queue, QueueTree};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

fn usage() -> ! {
    eprintln!(
        "usage: mkqueue -c CONFIG_DIR (-n N [-j THREADS] [-l SIZE] [-r RETRY_SECS] | --list)"
    );
    std::process::exit(64)
}

fn main() {
    let mut config: Option<PathBuf> = None;
    let (mut n, mut threads, mut size, mut retry) = (0usize, 4usize, 1024usize, 3600u64);
    let mut list = false;
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
    let t0 = Instant::now();
    std::thread::scope(|s| {
        for _ in 0..threads.max(1) {
            s.spawn(|| {
                while next.fetch_add(1, Ordering::Relaxed) < n {
                    if let Err(e) = one(&tree, &body, retry, ids) {
                        eprintln!("mkqueue: {e}");
                        std::process::exit(1)
                    }
                }
            });
        }
    });
    println!("queued {n} in {:.3} s", t0.elapsed().as_secs_f64());
}

/// Writes one message as cleanup does and defers it.
fn one(
    tree: &QueueTree,
    body: &[u8],
    retry: u64,
    owner: Option<(u32, u32)>,
) -> std::io::Result<()> {
    let nf = tree.create(Queue::Deferred)?;
    let mut w = Writer::new(nf.file)?;
    let (secs, usecs) = queue::now();
    w.arrival(secs, usecs)?;
    w.sender("from@x.test")?;
    w.attribute("protocol", "ESMTP")?;
    w.recipient(&Recipient::new("to@remote.test"))?;
    w.begin_content()?;
    w.content(body)?;
    let file = w.finish()?;
    if let Some((uid, gid)) = owner {
        std::os::unix::fs::fchown(&file, Some(uid), Some(gid))?;
    }
    file.set_modified(std::time::SystemTime::now() + std::time::Duration::from_secs(retry))?;
    queue::sync_dir_grouped(&tree.parent(Queue::Deferred, &nf.id))
}
