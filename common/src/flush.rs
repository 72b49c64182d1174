//! Per-domain logs of deferred mail ("fast flush" logs, after Postfix's
//! flush(8)), and one site's deferred mail made due now from its log:
//! `postqueue -s site`, the SMTP `ETRN site` command (RFC 1985) and
//! `postern resume` all ask for it.
//!
//! The logs live in `flush/` of the queue tree, one file per recipient
//! domain (its lower-case name), one queue ID per line. qmgr appends the
//! ID to the log of every domain a message still has recipients in when
//! it moves the message to `deferred/` ([`add`]); `mkqueue` does the same
//! for the deferred files it writes. [`flush_site`] reads the log, reads
//! the envelope of only the messages listed there, and moves each that
//! is still in `deferred/` with a recipient to deliver in the domain to
//! `incoming/` (Postfix's flush does the same), where qmgr's next scan of
//! `incoming/` takes it at once; then the log is rewritten without them:
//! if qmgr defers one again, it appends it again. So a site's mail is
//! found without reading every deferred envelope (a million deferred
//! messages took 40 minutes to scan), and qmgr's index of `deferred/`
//! needs no new listing (an old entry for a moved file is dropped when it
//! comes up: the file is not there).
//!
//! A log is a hint, not the queue: appends are whole lines with
//! `O_APPEND` and are not fsync'd. A line lost in a crash, a message
//! deferred when it could not be logged, or recipients that only a later
//! slice of a very big message holds (qmgr reads
//! `qmgr_message_recipient_limit` at a time), only mean that such a
//! message waits for its normal retry time; `postqueue -f` flushes the
//! whole deferred queue whatever the logs say. A domain without a log has
//! no deferred mail that Postern knows of: flushing it does nothing and
//! is no error (ETRN answers 250, as Postfix does for an eligible domain
//! without a log).
//!
//! Unlike Postfix, every domain gets a log, not only those of
//! `fast_flush_domains` (which stays what ETRN may ask for): `postern
//! resume` and `postqueue -s` work for any site.
//!
//! Writers and rewriters agree through `flock` on the log file itself:
//! an appender locks the file it opened and writes only if that is still
//! the file under the log's name (a rewrite replaces it by a rename);
//! otherwise it opens the name again. A rewrite reads the log under the
//! lock, lets it go while it reads envelopes and moves files (qmgr's
//! appends must not wait for that), then takes the lock again, keeps
//! whatever was appended meanwhile, and renames a new file over the log.
//!
//! Upkeep ([`refresh`], run by qmgr): a non-empty log not read for
//! `fast_flush_refresh_time` is compacted (each ID once, only those still
//! in `deferred/`), so that a message deferred again and again does not
//! make its log grow; Postfix's refresh delivers the listed mail instead,
//! which would undo retry times and suspensions. An empty log not written
//! for `fast_flush_purge_time` is removed.

use crate::qfile;
use crate::queue::{self, Queue, QueueTree};
use std::collections::HashSet;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, SystemTime};

/// The directory of the logs, below `queue_directory`.
pub const FLUSH_DIR: &str = "flush";

/// The site as flush compares it: lower case, without the `[]` of an
/// address literal. None: not a site (empty, or with `/` or a space).
pub fn normalize_site(site: &str) -> Option<String> {
    let site = site
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_ascii_lowercase();
    (!site.is_empty() && !site.contains(['/', ' '])).then_some(site)
}

/// The domain of an address, lower case.
pub fn domain_of(addr: &str) -> Option<String> {
    addr.rsplit_once('@').map(|(_, d)| d.to_ascii_lowercase())
}

/// The log of `site` (any spelling [`normalize_site`] accepts). None for
/// what cannot name a log: names starting with a dot are the rewriters'
/// temporary files (and `.`/`..`).
pub fn log_path(tree: &QueueTree, site: &str) -> Option<PathBuf> {
    let name = normalize_site(site)?;
    (!name.starts_with('.') && !name.contains('\0')).then(|| tree.root().join(FLUSH_DIR).join(name))
}

/// The sites (recipient domains) of `addresses`, each once, as [`add`]
/// names their logs.
pub fn sites_of<'a>(addresses: impl IntoIterator<Item = &'a str>) -> Vec<String> {
    let mut seen = HashSet::new();
    addresses
        .into_iter()
        .filter_map(|a| normalize_site(&domain_of(a)?))
        .filter(|s| seen.insert(s.clone()))
        .collect()
}

/// Whether `f` is still the file called `path` (a rewrite renames a new
/// one over it; an upkeep removes an empty one).
fn is_current(f: &File, path: &Path) -> io::Result<bool> {
    let open = f.metadata()?;
    match fs::metadata(path) {
        Ok(m) => Ok(m.dev() == open.dev() && m.ino() == open.ino()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(e),
    }
}

/// Opens (creating it if need be) and locks the file called `path`,
/// the one that is there once the lock is held.
fn open_locked(path: &Path) -> io::Result<File> {
    for _ in 0..100 {
        let f = OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .mode(0o600)
            .open(path)?;
        f.lock()?;
        if is_current(&f, path)? {
            give_to_dir_owner(&f, path)?;
            return Ok(f);
        }
    }
    Err(io::Error::other(format!(
        "{}: replaced again and again",
        path.display()
    )))
}

/// A log that root made (postqueue, mkqueue) belongs to the owner of
/// `flush/` (mail_owner), so that qmgr can append to it.
fn give_to_dir_owner(f: &File, path: &Path) -> io::Result<()> {
    if !nix::unistd::geteuid().is_root() {
        return Ok(());
    }
    let dir = fs::metadata(path.parent().unwrap_or(Path::new(".")))?;
    let m = f.metadata()?;
    if (m.uid(), m.gid()) != (dir.uid(), dir.gid()) {
        std::os::unix::fs::fchown(f, Some(dir.uid()), Some(dir.gid()))?;
    }
    Ok(())
}

/// Appends `id` to the log of `site`: qmgr has left the message in
/// `deferred/` with recipients in that domain. One `O_APPEND` write of a
/// whole line, not fsync'd (see the module's doc: a lost line only means
/// the message waits for its retry time). Nothing for a site that cannot
/// name a log.
pub fn add(tree: &QueueTree, site: &str, id: &str) -> io::Result<()> {
    let Some(path) = log_path(tree, site) else {
        return Ok(());
    };
    let f = open_locked(&path)?;
    (&f).write_all(format!("{id}\n").as_bytes())
}

/// A log as read under its lock.
struct LogRead {
    ids: Vec<String>,
    /// Lines read (repeated IDs included).
    lines: usize,
    dev: u64,
    ino: u64,
    len: u64,
}

/// Reads the log at `path`: its queue IDs, each once, in order. None: no
/// log.
fn read_log(path: &Path) -> io::Result<Option<LogRead>> {
    if !path.exists() {
        return Ok(None);
    }
    let mut f = open_locked(path)?;
    let mut bytes = Vec::new();
    f.read_to_end(&mut bytes)?;
    let m = f.metadata()?;
    let mut seen = HashSet::new();
    let text = String::from_utf8_lossy(&bytes);
    let ids = text
        .lines()
        .map(str::trim)
        .filter(|l| queue::is_queue_id(l) && seen.insert(l.to_string()))
        .map(str::to_string)
        .collect();
    Ok(Some(LogRead {
        ids,
        lines: text.lines().count(),
        dev: m.dev(),
        ino: m.ino(),
        len: bytes.len() as u64,
    }))
}

/// Temporary names in `flush/` made by this process.
static TEMP_SEQ: AtomicUsize = AtomicUsize::new(0);

/// Replaces the log at `path`, which was `before` when read, by `keep`
/// and whatever was appended since: under the log's lock, a new file
/// renamed over it.
fn rewrite(path: &Path, before: &LogRead, keep: &[String]) -> io::Result<()> {
    let mut cur = open_locked(path)?;
    let mut bytes = Vec::new();
    cur.read_to_end(&mut bytes)?;
    let m = cur.metadata()?;
    let appended =
        if (m.dev(), m.ino()) == (before.dev, before.ino) && bytes.len() as u64 >= before.len {
            &bytes[before.len as usize..]
        } else {
            // Replaced meanwhile (another flush of the same site): what is
            // there now is all new to this rewrite.
            &bytes[..]
        };
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("log");
    let temp = dir.join(format!(
        ".{name}.{}.{}",
        std::process::id(),
        TEMP_SEQ.fetch_add(1, Ordering::Relaxed)
    ));
    let written = (|| {
        let mut t = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&temp)?;
        let mut out = Vec::with_capacity(keep.len() * 17 + appended.len());
        for id in keep {
            out.extend_from_slice(id.as_bytes());
            out.push(b'\n');
        }
        out.extend_from_slice(appended);
        t.write_all(&out)?;
        give_to_dir_owner(&t, &temp)?;
        fs::rename(&temp, path)
    })();
    if written.is_err() {
        let _ = fs::remove_file(&temp);
    }
    // The lock goes with `cur`, after the rename: an appender waiting
    // for it finds the new file under the name and opens that.
    drop(cur);
    written
}

/// What [`flush_site`] did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Flushed {
    /// Queue IDs in the log (each once).
    pub listed: usize,
    /// Messages moved to `incoming/`: due now.
    pub due: usize,
}

/// What became of one listed message.
enum Listed {
    Due,
    /// Not in `deferred/` any more, or nothing left for the site.
    Dropped,
    /// Could not be moved: stays listed.
    Kept,
}

fn flush_one(tree: &QueueTree, id: &str, site: &str) -> Listed {
    let Some(path) = tree.locate(Queue::Deferred, id) else {
        return Listed::Dropped;
    };
    let env = match File::open(&path).map(|f| qfile::read_envelope(&f)) {
        Ok(Ok(env)) => env,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Listed::Dropped,
        // Unreadable now (being written? corrupt?): qmgr judges it when
        // its retry time comes.
        _ => return Listed::Kept,
    };
    let wanted = env.pending().any(|r| {
        domain_of(&r.rcpt.address)
            .and_then(|d| normalize_site(&d))
            .as_deref()
            == Some(site)
    });
    if !wanted {
        return Listed::Dropped;
    }
    match tree.shift(id, Queue::Deferred, Queue::Incoming) {
        Ok(()) => Listed::Due,
        Err(e) if e.kind() == io::ErrorKind::NotFound => Listed::Dropped,
        Err(_) => Listed::Kept,
    }
}

/// Makes the deferred mail of `site` (any spelling [`normalize_site`]
/// accepts) due now: every message its log lists that is still in
/// `deferred/` with a recipient to deliver in the domain is moved to
/// `incoming/`; the caller then wakes qmgr
/// ([`crate::ipc::Wakeup::Incoming`]). The log keeps only what could not
/// be moved (and what was appended meanwhile). No log: nothing to do.
/// Err: the log cannot be read or rewritten. Callers need write access
/// to the queue tree: root (postqueue) or `mail_owner` (qmgr, smtpd).
pub fn flush_site(tree: &QueueTree, site: &str) -> io::Result<Flushed> {
    let Some(site) = normalize_site(site) else {
        return Ok(Flushed::default());
    };
    let Some(path) = log_path(tree, &site) else {
        return Ok(Flushed::default());
    };
    let Some(log) = read_log(&path)? else {
        return Ok(Flushed::default());
    };
    let mut done = Flushed {
        listed: log.ids.len(),
        due: 0,
    };
    let mut keep = Vec::new();
    for id in &log.ids {
        match flush_one(tree, id, &site) {
            Listed::Due => done.due += 1,
            Listed::Dropped => {}
            Listed::Kept => keep.push(id.clone()),
        }
    }
    rewrite(&path, &log, &keep)?;
    Ok(done)
}

/// Makes a deferred message due now (its retry time, the queue file's
/// mtime, set to now; the caller wakes qmgr with a `D`). Returns false
/// when it is not in `deferred/` (any more) or its retry time cannot be
/// changed.
pub fn make_due(tree: &QueueTree, id: &str) -> bool {
    let Some(path) = tree.locate(Queue::Deferred, id) else {
        return false;
    };
    let f = match File::options().write(true).open(path) {
        Ok(f) => f,
        Err(_) => return false,
    };
    f.set_modified(SystemTime::now()).is_ok()
}

/// What [`refresh`] did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Refreshed {
    /// Logs compacted.
    pub compacted: usize,
    /// Queue IDs dropped from them (repeated, or gone from `deferred/`).
    pub dropped: usize,
    /// Empty logs removed.
    pub purged: usize,
    /// Logs that could not be read or rewritten (the last error).
    pub failed: Option<(String, String)>,
}

/// The upkeep of `flush/`: a non-empty log not read (rewritten) for
/// `refresh_after` is compacted; an empty log not written for
/// `purge_after` is removed; a rewriter's temporary file left for a day
/// (a crash) is removed. A log that cannot be kept up is passed over
/// (and named in [`Refreshed::failed`]); Err: `flush/` cannot be read.
pub fn refresh(
    tree: &QueueTree,
    refresh_after: Duration,
    purge_after: Duration,
) -> io::Result<Refreshed> {
    let dir = tree.root().join(FLUSH_DIR);
    let mut done = Refreshed::default();
    let now = SystemTime::now();
    let older = |t: io::Result<SystemTime>, d: Duration| {
        t.is_ok_and(|t| now.duration_since(t).is_ok_and(|age| age >= d))
    };
    for entry in fs::read_dir(&dir)? {
        let entry = entry?;
        let Ok(name) = entry.file_name().into_string() else {
            continue;
        };
        let path = entry.path();
        let Ok(m) = fs::symlink_metadata(&path) else {
            continue;
        };
        if !m.is_file() {
            continue;
        }
        if name.starts_with('.') {
            if older(m.modified(), Duration::from_secs(86400)) {
                let _ = fs::remove_file(&path);
            }
            continue;
        }
        if let Err(e) = keep_up(
            tree,
            &path,
            &m,
            &older,
            refresh_after,
            purge_after,
            &mut done,
        ) {
            done.failed = Some((name, e.to_string()));
        }
    }
    Ok(done)
}

/// [`refresh`] of one log, `m` its metadata.
fn keep_up(
    tree: &QueueTree,
    path: &Path,
    m: &fs::Metadata,
    older: &dyn Fn(io::Result<SystemTime>, Duration) -> bool,
    refresh_after: Duration,
    purge_after: Duration,
    done: &mut Refreshed,
) -> io::Result<()> {
    if m.len() == 0 {
        if older(m.modified(), purge_after) {
            // Under the lock, and only if still empty: an appender that
            // opened it finds the name gone and makes a new one.
            let f = open_locked(path)?;
            if f.metadata()?.len() == 0 {
                fs::remove_file(path)?;
                done.purged += 1;
            }
        }
        return Ok(());
    }
    if older(m.accessed(), refresh_after) {
        let Some(log) = read_log(path)? else {
            return Ok(());
        };
        let keep: Vec<String> = log
            .ids
            .iter()
            .filter(|id| tree.locate(Queue::Deferred, id).is_some())
            .cloned()
            .collect();
        done.dropped += log.lines.saturating_sub(keep.len());
        rewrite(path, &log, &keep)?;
        done.compacted += 1;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::qfile::{Recipient, Writer};

    fn tree(name: &str) -> QueueTree {
        let root = std::env::temp_dir().join(format!("flush-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&root);
        let tree = QueueTree::new(&root);
        tree.create_dirs(None, None).unwrap();
        tree
    }

    /// A complete deferred queue file for `rcpts`, as cleanup writes it.
    fn deferred(tree: &QueueTree, rcpts: &[&str]) -> String {
        let nf = tree.create(Queue::Deferred).unwrap();
        let mut w = Writer::new(nf.file).unwrap();
        w.arrival(1, 0).unwrap();
        w.sender("s@x.test").unwrap();
        for r in rcpts {
            w.recipient(&Recipient::new(r)).unwrap();
        }
        w.begin_content().unwrap();
        w.content(b"Subject: t\n\nx\n").unwrap();
        w.finish().unwrap();
        nf.id
    }

    fn log_of(tree: &QueueTree, site: &str) -> Vec<String> {
        fs::read_to_string(log_path(tree, site).unwrap())
            .unwrap()
            .lines()
            .map(str::to_string)
            .collect()
    }

    #[test]
    fn a_flush_moves_only_the_listed_mail_of_the_site() {
        let tree = tree("site");
        let a = deferred(&tree, &["u@A.test"]);
        let b = deferred(&tree, &["v@a.test", "w@b.test"]);
        let only_b = deferred(&tree, &["w@b.test"]);
        let unlisted = deferred(&tree, &["x@a.test"]);
        let gone = "0123456789ABCDEF";
        for id in [&a, &b, &a, &only_b] {
            add(&tree, "a.TEST", id).unwrap();
        }
        add(&tree, "a.test", gone).unwrap();
        add(&tree, "b.test", &b).unwrap();
        assert_eq!(
            sites_of(["u@A.test", "v@a.test", "w@b.test"]),
            ["a.test", "b.test"]
        );
        let done = flush_site(&tree, "[A.test]").unwrap();
        // a, b, only_b and the gone one, each once; two had mail for a.test.
        assert_eq!(done, Flushed { listed: 4, due: 2 });
        let incoming = tree.list(Queue::Incoming).unwrap();
        assert!(
            incoming.contains(&a) && incoming.contains(&b),
            "{incoming:?}"
        );
        let left = tree.list(Queue::Deferred).unwrap();
        assert!(
            left.contains(&only_b) && left.contains(&unlisted),
            "{left:?}"
        );
        assert!(log_of(&tree, "a.test").is_empty());
        // b.test's log still lists b (gone from deferred/: dropped then).
        assert_eq!(log_of(&tree, "b.test"), [b]);
        assert_eq!(
            flush_site(&tree, "b.test").unwrap(),
            Flushed { listed: 1, due: 0 }
        );
        // No log: nothing known, no error.
        assert_eq!(flush_site(&tree, "none.test").unwrap(), Flushed::default());
        assert!(log_path(&tree, "..").is_none() && log_path(&tree, "a/b").is_none());
        fs::remove_dir_all(tree.root()).unwrap();
    }

    #[test]
    fn appends_during_a_rewrite_are_kept() {
        let tree = tree("race");
        let ids: Vec<String> = (0..200).map(|i| format!("{:016X}", i + 1)).collect();
        add(&tree, "r.test", "FFFFFFFFFFFFFFF0").unwrap();
        let path = log_path(&tree, "r.test").unwrap();
        std::thread::scope(|s| {
            s.spawn(|| {
                for id in &ids {
                    add(&tree, "r.test", id).unwrap();
                }
            });
            for _ in 0..50 {
                let log = read_log(&path).unwrap().unwrap();
                // Keep what was read, as a flush keeps what it could not move.
                rewrite(&path, &log, &log.ids).unwrap();
            }
        });
        let mut got = log_of(&tree, "r.test");
        got.sort();
        got.dedup();
        assert_eq!(got.len(), 201, "lost appends");
        fs::remove_dir_all(tree.root()).unwrap();
    }

    #[test]
    fn refresh_compacts_old_logs_and_purges_old_empty_ones() {
        let tree = tree("refresh");
        let a = deferred(&tree, &["u@c.test"]);
        for _ in 0..3 {
            add(&tree, "c.test", &a).unwrap();
        }
        add(&tree, "c.test", "0123456789ABCDEF").unwrap();
        add(&tree, "e.test", &a).unwrap();
        fs::write(log_path(&tree, "e.test").unwrap(), "").unwrap();
        // Fresh logs are left alone.
        let day = Duration::from_secs(86400);
        assert_eq!(refresh(&tree, day, day).unwrap(), Refreshed::default());
        let done = refresh(&tree, Duration::ZERO, Duration::ZERO).unwrap();
        assert_eq!(
            done,
            Refreshed {
                compacted: 1,
                dropped: 3,
                purged: 1,
                failed: None,
            }
        );
        assert_eq!(log_of(&tree, "c.test"), [a]);
        assert!(!log_path(&tree, "e.test").unwrap().exists());
        fs::remove_dir_all(tree.root()).unwrap();
    }
}
