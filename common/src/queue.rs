//! The queue tree under `queue_directory`, queue IDs, and moves between
//! queues.
//!
//! A message lives in exactly one of `maildrop incoming active deferred
//! hold corrupt` at a time and moves by `rename(2)`. A move that must
//! survive a crash ([`QueueTree::move_to`]) fsyncs the directories on both
//! sides; qmgr's own moves between the queues it scans
//! ([`QueueTree::shift`]) need not, and save two fsyncs per message. Per-message logs of
//! deferral and bounce reasons live in `defer/` and `bounce/` under the
//! message's queue ID.
//!
//! **Hashing.** The directories named in `hash_queue_names` (Postfix's
//! default: `deferred`, `defer`) are split into `hash_queue_depth` levels
//! of one-character subdirectories, as Postfix splits them: the characters
//! are those of the queue ID from its microseconds on (upper-case hex),
//! so `deferred/6/00000000635A1F2B6C1` at depth 1 — see [`Hashing`]. A
//! directory of a million names is slow to create in and to look up in;
//! sixteen (or 256) of 65,000 (4,000) are not. Subdirectories are made
//! when first needed ([`QueueTree::place`]), owned as their queue
//! directory, and their creation is fsync'd at once. Every reader walks
//! the whole tree whatever its depth ([`QueueTree::walk`]), so that after
//! a change of the two parameters nothing is lost: [`QueueTree::list`]
//! puts a misplaced file where it belongs, a move finds it where it is,
//! and `postsuper -s` (run by `postern start` and `reload`) moves the
//! rest and removes the subdirectories no longer needed.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

/// The queues a message can be in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Queue {
    /// Local submissions written by sendmail, read by pickup.
    Maildrop,
    /// Written by cleanup; complete files wait here for qmgr.
    Incoming,
    /// Being delivered: owned by qmgr.
    Active,
    /// Waiting for a retry; the file's mtime is the next retry time.
    Deferred,
    /// Put aside by the administrator (postsuper -h): never retried.
    Hold,
    /// Unreadable files, kept for the administrator.
    Corrupt,
}

impl Queue {
    pub const ALL: [Queue; 6] = [
        Queue::Maildrop,
        Queue::Incoming,
        Queue::Active,
        Queue::Deferred,
        Queue::Hold,
        Queue::Corrupt,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Queue::Maildrop => "maildrop",
            Queue::Incoming => "incoming",
            Queue::Active => "active",
            Queue::Deferred => "deferred",
            Queue::Hold => "hold",
            Queue::Corrupt => "corrupt",
        }
    }

    pub fn from_name(s: &str) -> Option<Queue> {
        Queue::ALL.into_iter().find(|q| q.name() == s)
    }
}

/// The per-message logs that feed notifications.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MessageLog {
    /// Reasons for recipients that will be retried.
    Defer,
    /// Reasons for recipients that failed for good.
    Bounce,
    /// Recipients delivered that asked for a success notice (DSN
    /// NOTIFY=SUCCESS), in `trace/` as Postfix; qmgr also notes there that
    /// a delay warning was sent.
    Success,
}

impl MessageLog {
    pub fn name(self) -> &'static str {
        match self {
            MessageLog::Defer => "defer",
            MessageLog::Bounce => "bounce",
            MessageLog::Success => "trace",
        }
    }
}

/// Directories below `queue_directory`, with their modes. `maildrop` and
/// `public` are group-accessible so that the set-gid submission programs
/// (group `setgid_group`) can use them, as in Postfix.
pub const TREE: &[(&str, u32)] = &[
    ("maildrop", 0o1730),
    ("incoming", 0o700),
    ("active", 0o700),
    ("deferred", 0o700),
    ("hold", 0o700),
    ("corrupt", 0o700),
    ("defer", 0o700),
    ("bounce", 0o700),
    ("trace", 0o700),
    // Per-domain logs of deferred mail (crate::flush).
    ("flush", 0o700),
    ("spare", 0o700),
    ("private", 0o700),
    ("public", 0o710),
    ("pid", 0o755),
];

/// Directories that may be hashed: Postfix's list less `flush` (its
/// per-domain logs stay in one flat directory). `maildrop` must not be
/// (postdrop writes it as the submitting user), nor `corrupt`, `spare`
/// and the socket directories.
pub const HASHABLE: [&str; 7] = [
    "incoming", "active", "deferred", "hold", "defer", "bounce", "trace",
];

/// The deepest hashing accepted (`hash_queue_depth`), and the deepest a
/// walk looks for files.
pub const MAX_HASH_DEPTH: usize = 8;

/// Which queue and log directories are split into subdirectories, and
/// how deep (`hash_queue_names`, `hash_queue_depth`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hashing {
    names: Vec<&'static str>,
    depth: usize,
}

impl Default for Hashing {
    /// Postfix's defaults: `deferred, defer` at depth 1.
    fn default() -> Hashing {
        Hashing {
            names: vec!["deferred", "defer"],
            depth: 1,
        }
    }
}

impl Hashing {
    /// No directory hashed (`hash_queue_names =`).
    pub fn flat() -> Hashing {
        Hashing {
            names: Vec::new(),
            depth: 1,
        }
    }

    /// Hashing of `names` at `depth`. Names Postern has no directory for
    /// (`flush`) are ignored, as Postfix ignores names it does not hash.
    pub fn new<S: AsRef<str>>(names: &[S], depth: usize) -> Result<Hashing, String> {
        if !(1..=MAX_HASH_DEPTH).contains(&depth) {
            return Err(format!(
                "bad parameter value: hash_queue_depth = {depth} (1 to {MAX_HASH_DEPTH})"
            ));
        }
        let mut v = Vec::new();
        for n in names {
            let n = n.as_ref().to_ascii_lowercase();
            if let Some(h) = HASHABLE.iter().find(|h| **h == n) {
                v.push(*h);
            } else if matches!(n.as_str(), "maildrop" | "corrupt") {
                return Err(format!("hash_queue_names: {n} queue must not be hashed"));
            }
        }
        Ok(Hashing { names: v, depth })
    }

    /// `hash_queue_names` and `hash_queue_depth` of `cfg`.
    pub fn from_config(cfg: &postern_conf::Config) -> Result<Hashing, String> {
        let raw = cfg.get("hash_queue_depth");
        let depth = raw.trim().parse::<usize>().map_err(|_| {
            format!("bad parameter value: hash_queue_depth = {raw} (1 to {MAX_HASH_DEPTH})")
        })?;
        Hashing::new(&cfg.get_list("hash_queue_names"), depth)
    }

    /// How many subdirectory levels directory `name` has (0: flat).
    pub fn depth_of(&self, name: &str) -> usize {
        if self.names.contains(&name) {
            self.depth
        } else {
            0
        }
    }
}

/// The subdirectory names of `id` in a directory hashed `depth` deep:
/// its characters from the microseconds on (Postfix's short queue IDs
/// begin with them), `_` past its end, as Postfix's `dir_forest`.
fn hash_chars(id: &str, depth: usize) -> impl Iterator<Item = u8> + '_ {
    let tail = id.as_bytes().get(8..).unwrap_or_default();
    (0..depth).map(move |i| tail.get(i).copied().unwrap_or(b'_'))
}

/// Whether the queue file at `path` has the owner-execute bit of a
/// complete file (its writer is done with it).
fn is_marked_complete(path: &Path) -> bool {
    fs::symlink_metadata(path).is_ok_and(|m| m.mode() & crate::qfile::MODE_COMPLETE_BIT != 0)
}

/// Whether a one-character name can be a hash subdirectory.
fn is_hash_char(b: u8) -> bool {
    b.is_ascii_digit() || (b'A'..=b'F').contains(&b) || b == b'_'
}

/// A handle on the queue directory.
#[derive(Debug, Clone)]
pub struct QueueTree {
    root: PathBuf,
    hashing: Hashing,
}

/// A newly created, still incomplete queue file and its ID.
pub struct NewFile {
    pub id: String,
    pub path: PathBuf,
    pub file: File,
}

static SEQ: AtomicU32 = AtomicU32::new(0);

impl QueueTree {
    /// The tree at `root`, hashed as Postfix's defaults say
    /// ([`Hashing::default`]); programs use [`QueueTree::configured`].
    pub fn new(root: impl Into<PathBuf>) -> QueueTree {
        QueueTree {
            root: root.into(),
            hashing: Hashing::default(),
        }
    }

    /// The tree at `root` hashed as `cfg` says. A bad setting (which
    /// `postern check` refuses) is warned about and Postfix's default used.
    pub fn configured(root: impl Into<PathBuf>, cfg: &postern_conf::Config) -> QueueTree {
        let hashing = Hashing::from_config(cfg).unwrap_or_else(|e| {
            crate::warning!("{e}: using hash_queue_names = deferred, defer and depth 1");
            Hashing::default()
        });
        QueueTree::new(root).with_hashing(hashing)
    }

    pub fn with_hashing(mut self, hashing: Hashing) -> QueueTree {
        self.hashing = hashing;
        self
    }

    pub fn hashing(&self) -> &Hashing {
        &self.hashing
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn dir(&self, q: Queue) -> PathBuf {
        self.root.join(q.name())
    }

    fn dir_named(&self, name: &str) -> PathBuf {
        self.root.join(name)
    }

    /// The directory of `id` in directory `name` (queue or log): the
    /// hash subdirectory when `name` is hashed.
    fn dir_for(&self, name: &str, id: &str) -> PathBuf {
        let mut p = self.root.join(name);
        for c in hash_chars(id, self.hashing.depth_of(name)) {
            p.push(std::str::from_utf8(&[c]).unwrap_or("_"));
        }
        p
    }

    /// The directory that holds (or will hold) message `id` of queue `q`:
    /// the one to fsync after a name change.
    pub fn parent(&self, q: Queue, id: &str) -> PathBuf {
        self.dir_for(q.name(), id)
    }

    pub fn path(&self, q: Queue, id: &str) -> PathBuf {
        self.dir_for(q.name(), id).join(id)
    }

    pub fn log_path(&self, log: MessageLog, id: &str) -> PathBuf {
        self.dir_for(log.name(), id).join(id)
    }

    /// Where `id` is in directory `name` when not where it belongs (the
    /// hashing was changed since it was put there): flat, or at another
    /// depth. Looks level by level and stops at the first hash
    /// subdirectory that does not exist, as none below it can: qmgr asks
    /// this for every message log it does not find (most messages have
    /// none), and a lookup at all eight depths cost it some thirty failed
    /// `stat`s per message.
    pub fn misplaced(&self, name: &str, id: &str) -> Option<PathBuf> {
        let want = self.hashing.depth_of(name);
        let mut dir = self.root.join(name);
        let mut chars = hash_chars(id, MAX_HASH_DEPTH);
        for depth in 0..=MAX_HASH_DEPTH {
            if depth != want {
                let p = dir.join(id);
                if p.symlink_metadata().is_ok() {
                    return Some(p);
                }
            }
            let Some(c) = chars.next() else {
                break;
            };
            dir.push(std::str::from_utf8(&[c]).unwrap_or("_"));
            if !dir.is_dir() {
                break;
            }
        }
        None
    }

    /// Where message `id` of queue `q` is: where it belongs, or where it
    /// was misplaced; None when it is in neither.
    pub fn locate(&self, q: Queue, id: &str) -> Option<PathBuf> {
        let p = self.path(q, id);
        if p.symlink_metadata().is_ok() {
            return Some(p);
        }
        self.misplaced(q.name(), id)
    }

    /// Where the log `log` of message `id` is, as [`QueueTree::locate`].
    pub fn locate_log(&self, log: MessageLog, id: &str) -> Option<PathBuf> {
        let p = self.log_path(log, id);
        if p.symlink_metadata().is_ok() {
            return Some(p);
        }
        self.misplaced(log.name(), id)
    }

    /// Makes the missing hash subdirectories of `dir`, below the queue or
    /// log directory `name`: mode and (when running as root) owner of
    /// `name` itself, so that `mail_owner` can use one made by root; each
    /// creation is fsync'd in its parent before the first file goes in.
    pub fn make_subdirs(&self, name: &str, dir: &Path) -> io::Result<()> {
        let top = self.root.join(name);
        let Ok(rel) = dir.strip_prefix(&top) else {
            return Ok(());
        };
        let meta = fs::metadata(&top)?;
        let mut cur = top;
        for comp in rel.components() {
            let parent = cur.clone();
            cur.push(comp);
            match fs::create_dir(&cur) {
                Ok(()) => {
                    fs::set_permissions(&cur, fs::Permissions::from_mode(meta.mode() & 0o7777))?;
                    if crate::privs::is_root() {
                        std::os::unix::fs::chown(&cur, Some(meta.uid()), Some(meta.gid()))?;
                    }
                    sync_dir(&parent)?;
                }
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Renames `from` to `to`, a name in directory `name` (queue or log),
    /// making the missing hash subdirectories of `to` when the rename
    /// says there are some. `noreplace`: never over an existing file.
    fn rename_into(&self, from: &Path, name: &str, to: &Path, noreplace: bool) -> io::Result<()> {
        let go = || {
            if noreplace {
                rename_noreplace(from, to)
            } else {
                fs::rename(from, to)
            }
        };
        match go() {
            // A subdirectory missing, or the source gone. Made whether or
            // not it was already there: another process (or thread) may
            // have made it since the rename failed.
            Err(e) if e.kind() == io::ErrorKind::NotFound => match to.parent() {
                Some(dir) => {
                    self.make_subdirs(name, dir)?;
                    go()
                }
                None => Err(e),
            },
            r => r,
        }
    }

    /// Puts file `id`, found at `from` in directory `name` (queue or
    /// log), where it belongs under the current hashing; never over
    /// another file. Not fsync'd: the rename is atomic, and the file is
    /// found in either place. Returns its new path.
    pub fn place(&self, name: &str, from: &Path, id: &str) -> io::Result<PathBuf> {
        let to = self.dir_for(name, id).join(id);
        if to != from {
            self.rename_into(from, name, &to, true)?;
        }
        Ok(to)
    }

    /// Walks directory `name` (queue or log) and its hash subdirectories,
    /// whatever depth they were made with, calling `each(dir, chain,
    /// entry)` for every entry that is not a hash subdirectory; `chain`
    /// is the subdirectory names from `name` down to `dir` ("" at the
    /// top). An entry may be renamed or removed by `each`. Only the top
    /// directory's failure to open is an error.
    pub fn walk(
        &self,
        name: &str,
        mut each: impl FnMut(&Path, &str, &fs::DirEntry),
    ) -> io::Result<()> {
        let top = self.root.join(name);
        // Only a directory that may be hashed has subdirectories to look
        // in (`maildrop/` is written by every local user's postdrop).
        let recurse = HASHABLE.contains(&name);
        let mut stack = vec![(top, String::new())];
        let mut first = true;
        while let Some((dir, chain)) = stack.pop() {
            let rd = match fs::read_dir(&dir) {
                Ok(rd) => rd,
                Err(e) if first => return Err(e),
                Err(_) => continue,
            };
            first = false;
            for e in rd.flatten() {
                let fname = e.file_name();
                let b = std::os::unix::ffi::OsStrExt::as_bytes(fname.as_os_str());
                if recurse
                    && b.len() == 1
                    && is_hash_char(b[0])
                    && chain.len() < MAX_HASH_DEPTH
                    && e.file_type().is_ok_and(|t| t.is_dir())
                {
                    let mut c = chain.clone();
                    c.push(b[0] as char);
                    stack.push((dir.join(&fname), c));
                } else {
                    each(&dir, &chain, &e);
                }
            }
        }
        Ok(())
    }

    /// Whether `id`, found under the subdirectories `chain` of directory
    /// `name`, is where it belongs.
    pub fn in_place(&self, name: &str, chain: &str, id: &str) -> bool {
        chain
            .bytes()
            .eq(hash_chars(id, self.hashing.depth_of(name)))
    }

    /// Removes the empty subdirectories of directory `name` that are
    /// deeper than its hashing wants (all of them when it is no longer
    /// hashed), as Postfix's postsuper does. Returns how many.
    pub fn prune_subdirs(&self, name: &str) -> usize {
        fn prune(dir: &Path, level: usize, want: usize) -> usize {
            let Ok(rd) = fs::read_dir(dir) else {
                return 0;
            };
            let mut n = 0;
            for e in rd.flatten() {
                let fname = e.file_name();
                let b = std::os::unix::ffi::OsStrExt::as_bytes(fname.as_os_str());
                if b.len() == 1 && is_hash_char(b[0]) && e.file_type().is_ok_and(|t| t.is_dir()) {
                    let sub = dir.join(&fname);
                    n += prune(&sub, level + 1, want);
                    if level + 1 > want && fs::remove_dir(&sub).is_ok() {
                        n += 1;
                    }
                }
            }
            n
        }
        let top = self.root.join(name);
        let n = prune(&top, 0, self.hashing.depth_of(name));
        if n > 0 {
            let _ = sync_dir(&top);
        }
        n
    }

    /// Puts every misplaced file of every hashable directory where it
    /// belongs and removes the subdirectories no longer needed (after a
    /// change of `hash_queue_names` or `hash_queue_depth`). `active/`
    /// only when `with_active` (nobody delivers from it). Returns how
    /// many files moved.
    pub fn rehash(&self, with_active: bool) -> usize {
        let mut moved = 0;
        // The logs first, as Postfix: a later fix of a message's name
        // renames its logs where they belong.
        let mut names: Vec<&str> = HASHABLE.iter().rev().copied().collect();
        if !with_active {
            names.retain(|n| *n != "active");
        }
        for name in names {
            let mut wrong = Vec::new();
            let _ = self.walk(name, |dir, chain, e| {
                if let Ok(id) = e.file_name().into_string() {
                    if is_queue_id(&id) && !self.in_place(name, chain, &id) {
                        wrong.push(dir.join(&id));
                    }
                }
            });
            for from in wrong {
                let id = from
                    .file_name()
                    .and_then(|n| n.to_str())
                    .unwrap_or_default()
                    .to_string();
                // While the system runs, cleanup may still be writing an
                // incoming file under its old name: complete ones only.
                if name == "incoming" && !with_active && !is_marked_complete(&from) {
                    continue;
                }
                if self.place(name, &from, &id).is_ok() {
                    moved += 1;
                }
            }
            self.prune_subdirs(name);
        }
        moved
    }

    /// A service socket: `private/NAME` or `public/NAME`.
    pub fn socket(&self, private: bool, name: &str) -> PathBuf {
        self.root
            .join(if private { "private" } else { "public" })
            .join(name)
    }

    /// cleanup's socket. Postfix's master.cf declares cleanup, qmgr and
    /// pickup public (`private` = n), so their clients find them in
    /// `public/`; delivery agents are private.
    pub fn cleanup_socket(&self) -> PathBuf {
        self.socket(false, "cleanup")
    }

    /// qmgr's wake-up socket (see [`QueueTree::cleanup_socket`]).
    pub fn qmgr_socket(&self) -> PathBuf {
        self.socket(false, "qmgr")
    }

    /// pickup's wake-up socket (see [`QueueTree::cleanup_socket`]).
    pub fn pickup_socket(&self) -> PathBuf {
        self.socket(false, "pickup")
    }

    /// Creates a new queue file in `q` with a fresh queue ID: first under a
    /// temporary name (O_EXCL, mode 0600), then renamed to an ID made of
    /// the arrival time and the file's inode number, which is unique on
    /// the file system for as long as the file exists. The file is locked
    /// (the writer's lock, see [`abandoned`]) until
    /// [`crate::qfile::Writer::finish`] or the handle is closed.
    pub fn create(&self, q: Queue) -> io::Result<NewFile> {
        let dir = self.dir(q);
        loop {
            let tmp = dir.join(format!(
                ".tmp.{}.{}",
                std::process::id(),
                SEQ.fetch_add(1, Ordering::Relaxed)
            ));
            let file = match OpenOptions::new()
                .read(true)
                .write(true)
                .create_new(true)
                .mode(crate::qfile::MODE_WRITING)
                .open(&tmp)
            {
                Ok(f) => f,
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(e),
            };
            // The umask may have narrowed the mode; set it exactly. The
            // writer's lock is taken here (see `abandoned`); on a file
            // system without locks the file goes without.
            let _ = file.try_lock();
            let prepared = file
                .set_permissions(fs::Permissions::from_mode(crate::qfile::MODE_WRITING))
                .and_then(|_| file.metadata());
            let ino = match prepared {
                Ok(meta) => meta.ino(),
                Err(e) => {
                    let _ = fs::remove_file(&tmp);
                    return Err(e);
                }
            };
            let id = make_id(SystemTime::now(), ino);
            let path = self.path(q, &id);
            if path.exists() {
                // Same microsecond and a reused inode: try again.
                fs::remove_file(&tmp)?;
                continue;
            }
            if let Err(e) = self.rename_into(&tmp, q.name(), &path, false) {
                let _ = fs::remove_file(&tmp);
                return Err(e);
            }
            return Ok(NewFile { id, path, file });
        }
    }

    /// Creates a new queue file in `q` as [`QueueTree::create`] does, but
    /// takes the inode of a finished message from `spare/` when there is
    /// one ([`QueueTree::retire`]): renamed in under its new ID and made
    /// private again, instead of allocated. Its data blocks stay: the new
    /// message is written over the old one from the start, and
    /// [`crate::qfile::Writer::finish`] cuts what is left of the old one
    /// before it marks the file complete, so a message no longer than the
    /// last one allocates no block, and frees none (no discard). Creating and deleting a file per message
    /// is the queue's main cost in the kernel; on ext4 without a journal
    /// every new inode is also checked against every recently deleted one
    /// (`recently_deleted()`), which grows with the delivery rate.
    pub fn create_recycled(&self, q: Queue) -> io::Result<NewFile> {
        // A bounded number of tries: a spare another taker holds locked
        // keeps its name until that taker renames it, and may be listed
        // again meanwhile.
        for _ in 0..16 {
            let Some((name, ino)) = spare_name(&self.dir_named(SPARE)) else {
                break;
            };
            // The ID needs the inode number, which the directory listing
            // gave with the name: no stat. The file is locked before it is
            // claimed, so that it is never seen unlocked in `q` while
            // incomplete (see `abandoned`); of several takers that
            // opened it, one gets the lock. It is claimed and named in one
            // rename (atomic: a taker that locked it after the winner had
            // finished with it sees ENOENT), never over an existing file.
            // A spare's name is the ID it had, never reused, so the inode
            // listed is the one renamed.
            let from = self.dir_named(SPARE).join(&name);
            let file = match OpenOptions::new().read(true).write(true).open(&from) {
                Ok(f) => f,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(_) => break,
            };
            match file.try_lock() {
                Ok(()) => {}
                // Another taker holds it.
                Err(std::fs::TryLockError::WouldBlock) => continue,
                // No locks on this file system: claimed by the rename alone.
                Err(std::fs::TryLockError::Error(_)) => {}
            }
            let id = make_id(SystemTime::now(), ino);
            let path = self.path(q, &id);
            match self.rename_into(&from, q.name(), &path, true) {
                Ok(()) => {}
                // Another taker won it, or the name is in use: next one.
                Err(e) if matches!(e.raw_os_error(), Some(libc::ENOENT | libc::EEXIST)) => {
                    continue;
                }
                // The file system (or a seccomp filter) refuses the flag,
                // or something else is wrong: make a new file instead of
                // trying the same names forever.
                Err(_) => break,
            }
            // Not complete and private before anything is written (qmgr
            // made it so when it retired it; a crash may have come in
            // between). The old content stays until overwritten or cut.
            match file.set_permissions(fs::Permissions::from_mode(crate::qfile::MODE_WRITING)) {
                Ok(()) => return Ok(NewFile { id, path, file }),
                Err(_) => {
                    let _ = fs::remove_file(&path);
                    continue;
                }
            }
        }
        self.create(q)
    }

    /// Retires the file of a finished message in `q`: moved to `spare/`
    /// for [`QueueTree::create_recycled`], or removed when `spare/` holds
    /// enough already (or cannot take it). Its blocks are kept up to
    /// [`SPARE_KEEP_BYTES`] (the next message is written over them); a
    /// bigger file is emptied, so `spare/` never holds much disk. Not
    /// fsync'd, as a removal is not: after a crash the message may come
    /// back and be delivered again, never lost.
    pub fn retire(&self, q: Queue, id: &str) -> io::Result<()> {
        let path = self.path(q, id);
        if spare_room(&self.dir_named(SPARE)) {
            let emptied = OpenOptions::new().write(true).open(&path).and_then(|f| {
                if f.metadata()?.len() > SPARE_KEEP_BYTES {
                    f.set_len(0)?;
                }
                // Not complete (no owner-execute bit), whatever happens.
                f.set_permissions(fs::Permissions::from_mode(crate::qfile::MODE_WRITING))
            });
            if emptied.is_ok() && fs::rename(&path, self.dir_named(SPARE).join(id)).is_ok() {
                return Ok(());
            }
        }
        fs::remove_file(&path)
    }

    /// Moves message `id` from one queue to another and makes the move
    /// durable (both directories fsync'd).
    pub fn move_to(&self, id: &str, from: Queue, to: Queue) -> io::Result<()> {
        let (was, is) = self.relocate(id, from, to)?;
        sync_dir(is.parent().unwrap_or(&self.root))?;
        sync_dir(was.parent().unwrap_or(&self.root))
    }

    /// Renames message `id` from queue `from` to queue `to`, from where
    /// it belongs or, failing that, from where it was misplaced; returns
    /// (old path, new path). Not fsync'd.
    fn relocate(&self, id: &str, from: Queue, to: Queue) -> io::Result<(PathBuf, PathBuf)> {
        let src = self.path(from, id);
        let dst = self.path(to, id);
        match self.rename_into(&src, to.name(), &dst, false) {
            Ok(()) => Ok((src, dst)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                match self.misplaced(from.name(), id) {
                    Some(other) => {
                        self.rename_into(&other, to.name(), &dst, false)?;
                        Ok((other, dst))
                    }
                    None => Err(e),
                }
            }
            Err(e) => Err(e),
        }
    }

    /// Moves message `id` between any two queues without fsyncing the
    /// directories: for a caller that fsyncs them itself (cleanup puts a
    /// message on hold before it is complete).
    pub fn rename(&self, id: &str, from: Queue, to: Queue) -> io::Result<()> {
        self.relocate(id, from, to).map(|_| ())
    }

    /// Moves message `id` between `incoming`, `active` and `deferred`
    /// without fsyncing the directories. Safe because the file itself is
    /// already durable and rename is atomic: after a crash the message is
    /// under its old name or its new one, and qmgr scans all three queues
    /// at start-up (active back to incoming). This is what Postfix's qmgr
    /// does too; it spares qmgr's single thread two directory fsyncs (two
    /// journal commits) per message on its way in and again on a deferral.
    pub fn shift(&self, id: &str, from: Queue, to: Queue) -> io::Result<()> {
        debug_assert!([from, to]
            .iter()
            .all(|q| matches!(q, Queue::Incoming | Queue::Active | Queue::Deferred)));
        self.relocate(id, from, to).map(|_| ())
    }

    /// Queue IDs in `q` (all its hash subdirectories), sorted (= by
    /// arrival). Temporary names are skipped. A file found where it does
    /// not belong (the hashing changed) is put where it belongs, so that
    /// [`QueueTree::path`] finds it; in `incoming/` only a complete one
    /// (cleanup may still be writing the other under its old name).
    pub fn list(&self, q: Queue) -> io::Result<Vec<String>> {
        let name = q.name();
        let mut v = Vec::new();
        let mut wrong = Vec::new();
        self.walk(name, |dir, chain, e| {
            let Ok(id) = e.file_name().into_string() else {
                return;
            };
            if !is_queue_id(&id) {
                return;
            }
            if !self.in_place(name, chain, &id) {
                wrong.push(dir.join(&id));
            }
            v.push(id);
        })?;
        for from in wrong {
            if q != Queue::Incoming || is_marked_complete(&from) {
                if let Some(id) = from.file_name().and_then(|n| n.to_str()) {
                    let _ = self.place(name, &from, id);
                }
            }
        }
        v.sort();
        v.dedup();
        Ok(v)
    }

    /// Which queue holds `id`, if any (where it belongs or misplaced).
    pub fn find(&self, id: &str) -> Option<Queue> {
        if !is_queue_id(id) {
            return None;
        }
        Queue::ALL
            .into_iter()
            .find(|q| self.locate(*q, id).is_some())
    }

    /// Creates every directory of the tree that is missing, with its mode,
    /// owned by `owner` (uid, gid) when given; `maildrop` and `public`
    /// get group `setgid_gid` when given. Directories that exist are left
    /// as they are: [`QueueTree::check_dirs`] judges them.
    pub fn create_dirs(
        &self,
        owner: Option<(u32, u32)>,
        setgid_gid: Option<u32>,
    ) -> io::Result<()> {
        if !self.root.exists() {
            fs::create_dir_all(&self.root)?;
            fs::set_permissions(&self.root, fs::Permissions::from_mode(0o755))?;
        }
        for (name, mode) in TREE {
            let p = self.root.join(name);
            if p.exists() {
                continue;
            }
            fs::create_dir(&p)?;
            fs::set_permissions(&p, fs::Permissions::from_mode(*mode))?;
            if let Some((uid, gid)) = owner {
                let (uid, gid) = match (*name, setgid_gid) {
                    // Only master (root) writes its pid file and lock.
                    ("pid", _) => (0, 0),
                    ("maildrop" | "public", Some(g)) => (uid, g),
                    _ => (uid, gid),
                };
                std::os::unix::fs::chown(&p, Some(uid), Some(gid))?;
            }
        }
        Ok(())
    }

    /// What is wrong with the tree's ownership and modes, one line per
    /// problem. `owner_uid` is mail_owner's uid when master runs as root,
    /// else the uid everything runs as. Postern refuses to start on a tree
    /// that another user could write to: that user could forge or read mail.
    pub fn check_dirs(&self, owner_uid: u32, as_root: bool) -> Vec<String> {
        let mut problems = Vec::new();
        let mut check = |p: &Path, want_uid: u32, want_mode: Option<u32>| match fs::metadata(p) {
            Ok(m) => {
                let mode = m.permissions().mode() & 0o7777;
                if m.uid() != want_uid {
                    problems.push(format!(
                        "{}: owned by uid {}, expected uid {want_uid}",
                        p.display(),
                        m.uid()
                    ));
                }
                match want_mode {
                    // The sticky bit of maildrop/ (Postfix's 1730) is
                    // not required: a tree made before it was set is safe.
                    Some(w) if mode & !0o1000 != w & !0o1000 => problems.push(format!(
                        "{}: mode {mode:04o}, expected {w:04o}",
                        p.display()
                    )),
                    None if mode & 0o022 != 0 => problems.push(format!(
                        "{}: mode {mode:04o} is writable by others",
                        p.display()
                    )),
                    _ => {}
                }
            }
            Err(e) => problems.push(format!("{}: {e}", p.display())),
        };
        // The queue directory itself: root's when master is root (as
        // Postfix's), and never writable by group or others.
        let root_owner = if as_root { 0 } else { owner_uid };
        check(&self.root, root_owner, None);
        for (name, mode) in TREE {
            let uid = if *name == "pid" {
                root_owner
            } else {
                owner_uid
            };
            check(&self.root.join(name), uid, Some(*mode));
        }
        problems
    }
}

/// A queue ID from a time and an inode number: 8 hex digits of seconds, 5
/// of microseconds, then the inode in hex. IDs sort by arrival, are safe as
/// file names, and are unique while their file exists.
pub fn make_id(t: SystemTime, ino: u64) -> String {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    format!("{:08X}{:05X}{:X}", d.as_secs(), d.subsec_micros(), ino)
}

/// Whether `s` has the form of a queue ID (upper-case hex, 14 or more).
pub fn is_queue_id(s: &str) -> bool {
    s.len() >= 14
        && s.len() <= 40
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'A'..=b'F').contains(&b))
}

/// The directory of emptied queue files kept for reuse.
const SPARE: &str = "spare";
/// How many files `spare/` may hold: enough for a burst of arrivals.
const SPARE_LIMIT: usize = 2000;
/// A spare file keeps its data blocks up to this size: at most
/// [`SPARE_LIMIT`] × this much disk (32 MiB) sits in `spare/`.
pub const SPARE_KEEP_BYTES: u64 = 16 * 1024;

/// How long `spare/`, found empty, is not read again. Short: a new inode
/// costs far more than reading a directory (on ext4 without a journal,
/// `recently_deleted()` walks the inode table past every file deleted in
/// the last seconds: a fifth of cleanup's CPU in a burst), and a burst on
/// an empty queue finds spares within milliseconds, as the first
/// messages are delivered. With a second here, a burst of 1,000 messages
/// made a new file for each, and cleanup spent 0.6 ms per message where
/// it now spends 0.3 (bench/results/tls-f.md).
const SPARE_EMPTY_RECHECK: std::time::Duration = std::time::Duration::from_millis(20);

/// This process's view of `spare/`: names read from it, not yet taken,
/// and how full it looked.
struct SparePool {
    names: Vec<(String, u64)>,
    /// Do not read `spare/` again before this: it was empty.
    empty_until: Option<std::time::Instant>,
    /// Files this process put there since it last counted them.
    added: usize,
    counted: usize,
    /// Do not count `spare/` again before this: it was full. Counting
    /// reads the whole directory; doing so for every retired file while
    /// nothing takes spares (mail delivered but none arriving) cost
    /// qmgr's retire thread more than the retiring.
    full_until: Option<std::time::Instant>,
}

impl SparePool {
    const fn new() -> SparePool {
        SparePool {
            names: Vec::new(),
            empty_until: None,
            added: 0,
            // Counted at the first use.
            counted: SPARE_LIMIT,
            full_until: None,
        }
    }
}

/// One pool per `spare/` directory: a daemon has one queue, but a test
/// process has many, and one queue's empty `spare/` must not hide
/// another's spares.
static SPARES: std::sync::Mutex<Vec<(PathBuf, SparePool)>> = std::sync::Mutex::new(Vec::new());

/// Runs `f` on the pool of `dir` (made on first use); None when the lock
/// is poisoned.
fn with_spare_pool<T>(dir: &Path, f: impl FnOnce(&mut SparePool) -> T) -> Option<T> {
    let mut pools = SPARES.lock().ok()?;
    let at = match pools.iter().position(|(d, _)| d == dir) {
        Some(at) => at,
        None => {
            pools.push((dir.to_path_buf(), SparePool::new()));
            pools.len() - 1
        }
    };
    Some(f(&mut pools[at].1))
}

/// Renames `from` to `to` unless `to` exists (renameat2 RENAME_NOREPLACE).
fn rename_noreplace(from: &Path, to: &Path) -> io::Result<()> {
    use nix::fcntl::{renameat2, RenameFlags, AT_FDCWD};
    renameat2(AT_FDCWD, from, AT_FDCWD, to, RenameFlags::RENAME_NOREPLACE)?;
    Ok(())
}

/// A name in `spare/` to try, with its inode number, reading the directory
/// (256 names at a time) when this process has none left; None when it is
/// empty.
fn spare_name(dir: &Path) -> Option<(String, u64)> {
    with_spare_pool(dir, |pool| read_spare_name(pool, dir)).flatten()
}

fn read_spare_name(pool: &mut SparePool, dir: &Path) -> Option<(String, u64)> {
    if let Some(name) = pool.names.pop() {
        return Some(name);
    }
    let now = std::time::Instant::now();
    if pool.empty_until.is_some_and(|t| now < t) {
        return None;
    }
    pool.names = fs::read_dir(dir)
        .ok()?
        .filter_map(|e| {
            let e = e.ok()?;
            let name = e.file_name().into_string().ok()?;
            is_queue_id(&name).then(|| (name, std::os::unix::fs::DirEntryExt::ino(&e)))
        })
        .take(256)
        .collect();
    if pool.names.is_empty() {
        pool.empty_until = Some(now + SPARE_EMPTY_RECHECK);
    }
    pool.names.pop()
}

/// Whether `spare/` may take one more file: counted again (a directory
/// read) only when this process's estimate reaches the limit.
fn spare_room(dir: &Path) -> bool {
    with_spare_pool(dir, |pool| count_spare_room(pool, dir)).unwrap_or(false)
}

fn count_spare_room(pool: &mut SparePool, dir: &Path) -> bool {
    if pool.counted + pool.added >= SPARE_LIMIT {
        let now = std::time::Instant::now();
        if pool.full_until.is_some_and(|t| now < t) {
            return false;
        }
        pool.counted = match fs::read_dir(dir) {
            Ok(d) => d.count(),
            Err(_) => return false,
        };
        pool.added = 0;
        if pool.counted >= SPARE_LIMIT {
            pool.full_until = Some(now + std::time::Duration::from_secs(1));
            return false;
        }
    }
    pool.added += 1;
    true
}

/// How long an incomplete queue file may stay unchanged before it is
/// taken for abandoned by its writer.
pub const INCOMPLETE_MAX_AGE: std::time::Duration = std::time::Duration::from_secs(86400);

/// Whether nobody writes the incomplete queue file `file`: its writer
/// (cleanup) holds an exclusive lock on it from before its name appears
/// in `incoming/` until it is complete or given up, however long the
/// client takes; a writer that died released it. Takes the lock when it
/// is free. A file system without locks says "still written".
fn writer_is_gone(file: &File) -> bool {
    file.try_lock().is_ok()
}

/// Whether the incomplete queue file `file` was abandoned and may be
/// removed (qmgr, `postsuper -s`): nobody holds the writer's lock and,
/// looked at again once the lock is taken (its writer may have finished
/// just before), it is still not marked complete and has not changed
/// for [`INCOMPLETE_MAX_AGE`], counting its status change too: the claim
/// of a spare renames and chmods it, while its content keeps the times
/// of its previous message until the first write.
pub fn abandoned(file: &File) -> bool {
    if !writer_is_gone(file) {
        return false;
    }
    let Ok(meta) = file.metadata() else {
        return false;
    };
    if meta.permissions().mode() & crate::qfile::MODE_COMPLETE_BIT != 0 {
        return false;
    }
    let changed = meta.mtime().max(meta.ctime());
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    now - changed > INCOMPLETE_MAX_AGE.as_secs() as i64
}

/// fsyncs a directory, so that names created, renamed or removed in it
/// survive a crash.
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Group commit of directory fsyncs among the threads of one process.
#[derive(Default)]
struct DirSyncs {
    dirs: std::collections::HashMap<PathBuf, DirSync>,
}

#[derive(Default)]
struct DirSync {
    /// Callers so far; a caller's ticket is the count before it came.
    arrivals: u64,
    /// Every caller with a ticket below this is covered by a finished fsync.
    covered: u64,
    running: bool,
    /// Every change with a ticket below this was covered by an fsync that
    /// failed. They stay failed: Linux reports a writeback error to one
    /// fsync only, so a later fsync that succeeds says nothing of them.
    failed_below: u64,
    /// The directory, kept open: opening it by path for every fsync
    /// walked the whole path again for each message (the queue's
    /// directories are made by `postern check` and never replaced while
    /// the system runs). Only the caller running the fsync holds it
    /// meanwhile.
    handle: Option<File>,
}

type DirSyncsGuard = std::sync::MutexGuard<'static, Option<DirSyncs>>;

static DIR_SYNCS: std::sync::Mutex<Option<DirSyncs>> = std::sync::Mutex::new(None);
static DIR_SYNCED: std::sync::Condvar = std::sync::Condvar::new();

/// A name change made in a directory, waiting for an fsync of it
/// ([`dir_changed`], [`sync_dir_wait`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DirChange(u64);

fn dir_syncs() -> io::Result<DirSyncsGuard> {
    DIR_SYNCS
        .lock()
        .map_err(|_| io::Error::other("directory sync lock poisoned"))
}

/// Counts a name change just made in `dir`.
fn arrive(g: &mut DirSyncsGuard, dir: &Path) -> DirChange {
    let d = g
        .get_or_insert_with(Default::default)
        .dirs
        .entry(dir.to_path_buf())
        .or_default();
    d.arrivals += 1;
    DirChange(d.arrivals - 1)
}

/// Runs one fsync of `dir` for every change counted so far, without the
/// lock held during the I/O; wakes the waiters when it ends.
fn run_dir_sync(mut g: DirSyncsGuard, dir: &Path) -> (DirSyncsGuard, io::Result<()>) {
    let (upto, handle) = {
        let d = g
            .as_mut()
            .and_then(|s| s.dirs.get_mut(dir))
            .expect("changes counted before a sync");
        d.running = true;
        (d.arrivals, d.handle.take())
    };
    drop(g);
    let handle = match handle {
        Some(h) => Ok(h),
        None => File::open(dir),
    };
    let result = handle.and_then(|h| h.sync_all().map(|_| h));
    let mut g = DIR_SYNCS
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    let d = g
        .as_mut()
        .and_then(|s| s.dirs.get_mut(dir))
        .expect("changes counted before a sync");
    d.running = false;
    let result = match result {
        Ok(h) => {
            d.covered = d.covered.max(upto);
            d.handle = Some(h);
            Ok(())
        }
        // Opened anew next time.
        Err(e) => {
            d.failed_below = d.failed_below.max(upto);
            Err(e)
        }
    };
    // The waiters are woken with the lock let go: woken under it, each
    // would run only to sleep again on the lock (a switch and two futex
    // calls more per message, `bench/tls --trace`).
    drop(g);
    DIR_SYNCED.notify_all();
    let g = DIR_SYNCS
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    (g, result)
}

/// As [`sync_dir`], for threads that finish files in the same directory
/// at the same time (cleanup's): a caller whose name change happened
/// before an fsync of the directory *started* is covered when that fsync
/// ends, so one fsync serves every caller that arrived while the previous
/// one ran. With many sessions ending at once this turns N directory
/// fsyncs into a few, and each caller still returns only once its entry
/// is on disk.
pub fn sync_dir_grouped(dir: &Path) -> io::Result<()> {
    let change = arrive(&mut dir_syncs()?, dir);
    sync_dir_wait(dir, change)
}

/// Counts a name change just made in `dir`, for a later
/// [`sync_dir_wait`] in the same group commit as [`sync_dir_grouped`].
/// cleanup names a message's file in `incoming/` when the message opens,
/// answers the Open, and only then waits for the directory's fsync: it
/// runs while the client sends the content, and the end of data waits
/// only for the file's own syncs. (A background thread that started the
/// fsync at once cost a wake-up of its own per message.)
pub fn dir_changed(dir: &Path) -> io::Result<DirChange> {
    Ok(arrive(&mut dir_syncs()?, dir))
}

/// Waits until `change` in `dir` is on disk, running the fsync itself
/// when none that covers it is under way.
pub fn sync_dir_wait(dir: &Path, change: DirChange) -> io::Result<()> {
    let mut g = dir_syncs()?;
    loop {
        let d = g
            .as_mut()
            .and_then(|s| s.dirs.get_mut(dir))
            .expect("change counted before the wait");
        if d.failed_below > change.0 {
            return Err(io::Error::other(format!(
                "fsync of {} failed",
                dir.display()
            )));
        }
        if d.covered > change.0 {
            return Ok(());
        }
        if !d.running {
            return run_dir_sync(g, dir).1;
        }
        g = DIR_SYNCED
            .wait(g)
            .map_err(|_| io::Error::other("directory sync lock poisoned"))?;
    }
}

/// Bytes an unprivileged process may still write on the file system that
/// holds `dir`.
pub fn free_space(dir: &Path) -> io::Result<u64> {
    let st = nix::sys::statvfs::statvfs(dir)?;
    Ok(st.blocks_available() as u64 * st.fragment_size() as u64)
}

/// The current time as (seconds, microseconds) since the epoch.
pub fn now() -> (u64, u32) {
    let d = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    (d.as_secs(), d.subsec_micros())
}

/// Sets a file's modification time (the retry time of a deferred message).
pub fn set_mtime(path: &Path, secs: u64) -> io::Result<()> {
    let f = File::options().write(true).open(path)?;
    f.set_modified(UNIX_EPOCH + std::time::Duration::from_secs(secs))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_sort_and_validate() {
        let a = make_id(
            UNIX_EPOCH + std::time::Duration::from_micros(1_700_000_000_000_001),
            99,
        );
        let b = make_id(
            UNIX_EPOCH + std::time::Duration::from_micros(1_700_000_000_000_002),
            5,
        );
        assert!(a < b);
        assert!(is_queue_id(&a));
        assert!(!is_queue_id("../etc/passwd"));
        assert!(!is_queue_id(".tmp.1.2"));
    }

    #[test]
    fn create_and_move() {
        let root = std::env::temp_dir().join(format!("pqt-{}", std::process::id()));
        let t = QueueTree::new(&root);
        t.create_dirs(None, None).unwrap();
        let nf = t.create(Queue::Incoming).unwrap();
        assert_eq!(t.find(&nf.id), Some(Queue::Incoming));
        t.move_to(&nf.id, Queue::Incoming, Queue::Active).unwrap();
        assert_eq!(t.list(Queue::Active).unwrap(), vec![nf.id.clone()]);
        fs::remove_dir_all(root).unwrap();
    }

    #[test]
    fn hashed_places_follow_postfix_dir_forest() {
        let t = QueueTree::new("/q");
        // Depth 1 (the default) for deferred and defer; the others flat.
        let id = "692E1A3B4F2C1A9";
        assert_eq!(
            t.path(Queue::Deferred, id),
            Path::new("/q/deferred/4").join(id)
        );
        assert_eq!(
            t.log_path(MessageLog::Defer, id),
            Path::new("/q/defer/4").join(id)
        );
        assert_eq!(
            t.path(Queue::Incoming, id),
            Path::new("/q/incoming").join(id)
        );
        assert_eq!(
            t.log_path(MessageLog::Bounce, id),
            Path::new("/q/bounce").join(id)
        );
        let deep = QueueTree::new("/q").with_hashing(
            Hashing::new(&["incoming", "deferred", "maildrop-not", "flush"], 2).unwrap(),
        );
        assert_eq!(
            deep.path(Queue::Incoming, id),
            Path::new("/q/incoming/4/F").join(id)
        );
        assert_eq!(
            deep.parent(Queue::Deferred, id),
            Path::new("/q/deferred/4/F")
        );
        assert_eq!(deep.path(Queue::Hold, id), Path::new("/q/hold").join(id));
        // Past the end of the ID: underscores, as Postfix's dir_forest.
        let eight = QueueTree::new("/q").with_hashing(Hashing::new(&["deferred"], 8).unwrap());
        assert_eq!(
            eight.parent(Queue::Deferred, "692E1A3B4F2C1A9"),
            Path::new("/q/deferred/4/F/2/C/1/A/9/_")
        );
        assert!(Hashing::new(&["maildrop"], 1).is_err());
        assert!(Hashing::new(&["deferred"], 0).is_err());
        assert!(Hashing::new(&["deferred"], MAX_HASH_DEPTH + 1).is_err());
        assert_eq!(
            Hashing::new(&["DEFERRED"], 1).unwrap(),
            Hashing {
                names: vec!["deferred"],
                depth: 1
            }
        );
    }

    #[test]
    fn a_new_hashing_is_applied_by_list_moves_and_rehash() {
        let root = std::env::temp_dir().join(format!("pqhash-{}", std::process::id()));
        let flat = QueueTree::new(&root).with_hashing(Hashing::flat());
        flat.create_dirs(None, None).unwrap();
        let mut ids = Vec::new();
        for _ in 0..5 {
            let mut nf = flat.create(Queue::Deferred).unwrap();
            std::io::Write::write_all(&mut nf.file, b"x").unwrap();
            nf.file
                .set_permissions(fs::Permissions::from_mode(0o700))
                .unwrap();
            fs::write(flat.log_path(MessageLog::Defer, &nf.id), b"reason").unwrap();
            assert_eq!(nf.path, root.join("deferred").join(&nf.id));
            ids.push(nf.id);
        }
        ids.sort();
        // Depth 2 now: found where they are, by a move too.
        let deep = QueueTree::new(&root)
            .with_hashing(Hashing::new(&["deferred", "defer", "hold"], 2).unwrap());
        assert_eq!(deep.find(&ids[0]), Some(Queue::Deferred));
        assert!(deep.locate(Queue::Deferred, &ids[0]).is_some());
        deep.move_to(&ids[0], Queue::Deferred, Queue::Hold).unwrap();
        assert!(deep.path(Queue::Hold, &ids[0]).exists());
        assert!(deep.locate_log(MessageLog::Defer, &ids[0]).is_some());
        // The listing finds every one and puts it in place.
        assert_eq!(deep.list(Queue::Deferred).unwrap(), ids[1..].to_vec());
        for id in &ids[1..] {
            assert!(deep.path(Queue::Deferred, id).exists(), "{id}");
        }
        // rehash moves the logs; back to flat, it removes the subdirectories.
        assert_eq!(deep.rehash(true), 5);
        for id in &ids {
            assert!(deep.log_path(MessageLog::Defer, id).exists(), "{id}");
        }
        assert!(flat.rehash(true) >= 9);
        assert_eq!(flat.list(Queue::Deferred).unwrap(), ids[1..].to_vec());
        for name in ["deferred", "defer", "hold"] {
            let dirs = fs::read_dir(root.join(name))
                .unwrap()
                .flatten()
                .filter(|e| e.file_type().unwrap().is_dir())
                .count();
            assert_eq!(dirs, 0, "{name}");
        }
        fs::remove_dir_all(root).unwrap();
    }

    #[test]
    fn grouped_directory_syncs_return_for_every_caller() {
        let root = std::env::temp_dir().join(format!("pqg-{}", std::process::id()));
        fs::create_dir_all(&root).unwrap();
        let threads: Vec<_> = (0..16)
            .map(|i| {
                let root = root.clone();
                std::thread::spawn(move || {
                    for j in 0..20 {
                        fs::write(root.join(format!("{i}-{j}")), b"x").unwrap();
                        sync_dir_grouped(&root).unwrap();
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let g = DIR_SYNCS.lock().unwrap();
        let d = &g.as_ref().unwrap().dirs[&root];
        assert_eq!(d.arrivals, 320);
        assert!(!d.running);
        drop(g);
        fs::remove_dir_all(root).unwrap();
    }

    #[test]
    fn a_change_counted_early_is_covered_by_its_wait_and_later_waits_share_fsyncs() {
        let root = std::env::temp_dir().join(format!("pqs-{}", std::process::id()));
        fs::create_dir_all(&root).unwrap();
        fs::write(root.join("first"), b"x").unwrap();
        let first = dir_changed(&root).unwrap();
        // Counted, not synced: nothing runs until somebody waits (no
        // background thread takes it meanwhile).
        let covered = || DIR_SYNCS.lock().unwrap().as_ref().unwrap().dirs[&root].covered;
        std::thread::sleep(std::time::Duration::from_millis(50));
        assert!(covered() <= first.0);
        sync_dir_wait(&root, first).unwrap();
        assert!(covered() > first.0);
        // Changes from many threads, each waited for later: every wait
        // returns, and the counts add up.
        let threads: Vec<_> = (0..8)
            .map(|i| {
                let root = root.clone();
                std::thread::spawn(move || {
                    for j in 0..20 {
                        fs::write(root.join(format!("{i}-{j}")), b"x").unwrap();
                        let c = dir_changed(&root).unwrap();
                        sync_dir_wait(&root, c).unwrap();
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let g = DIR_SYNCS.lock().unwrap();
        let d = &g.as_ref().unwrap().dirs[&root];
        assert_eq!(d.arrivals, 161);
        assert!(d.covered == 161 && !d.running);
        drop(g);
        fs::remove_dir_all(root).unwrap();
    }

    #[test]
    fn a_change_covered_by_a_failed_fsync_stays_failed() {
        let root = std::env::temp_dir().join(format!("pqf-{}", std::process::id()));
        fs::create_dir_all(&root).unwrap();
        let change = arrive(&mut dir_syncs().unwrap(), &root);
        // The fsync cannot even open the directory.
        fs::remove_dir(&root).unwrap();
        assert!(sync_dir_wait(&root, change).is_err());
        // A later fsync that succeeds covers later changes only.
        fs::create_dir_all(&root).unwrap();
        sync_dir_grouped(&root).unwrap();
        assert!(sync_dir_wait(&root, change).is_err());
        fs::remove_dir_all(root).unwrap();
    }

    #[test]
    fn a_retired_file_comes_back_private_and_not_complete() {
        let root = std::env::temp_dir().join(format!("pqr-{}", std::process::id()));
        let t = QueueTree::new(&root);
        t.create_dirs(None, None).unwrap();
        let mut nf = t.create(Queue::Incoming).unwrap();
        std::io::Write::write_all(&mut nf.file, b"an old message").unwrap();
        nf.file
            .set_permissions(fs::Permissions::from_mode(0o700))
            .unwrap();
        let ino = nf.file.metadata().unwrap().ino();
        // Its writer is done with it.
        let id = nf.id.clone();
        drop(nf);
        t.move_to(&id, Queue::Incoming, Queue::Active).unwrap();
        t.retire(Queue::Active, &id).unwrap();
        assert_eq!(t.find(&id), None, "no longer in any queue");
        let spare = root.join(SPARE).join(&id);
        // A small file keeps its blocks (the next message is written over
        // them and Writer::finish cuts the rest), but is never complete.
        let m = fs::metadata(&spare).unwrap();
        assert_eq!(
            (m.len(), m.mode() & 0o777),
            (14, crate::qfile::MODE_WRITING)
        );

        let again = t.create_recycled(Queue::Incoming).unwrap();
        let m = again.file.metadata().unwrap();
        assert_eq!(m.ino(), ino, "the same inode, reused");
        assert_eq!(m.mode() & 0o777, crate::qfile::MODE_WRITING);
        assert_ne!(again.id, id);
        assert_eq!(t.find(&again.id), Some(Queue::Incoming));
        assert!(!spare.exists());
        // With spare/ empty, a new file is made.
        let mut fresh = t.create_recycled(Queue::Incoming).unwrap();
        assert_ne!(fresh.file.metadata().unwrap().ino(), ino);
        // Both are locked while their writer holds them, and only then.
        for nf in [&again, &fresh] {
            let other = File::open(&nf.path).unwrap();
            assert!(!writer_is_gone(&other), "{}", nf.id);
        }
        let again_path = again.path.clone();
        drop(again);
        assert!(writer_is_gone(&File::open(&again_path).unwrap()));
        // Unlocked and incomplete, with the times of its last message (two
        // days old): not abandoned, its status changed when it was taken.
        let old = SystemTime::now() - std::time::Duration::from_secs(2 * 86400);
        let f = File::options().write(true).open(&again_path).unwrap();
        f.set_times(fs::FileTimes::new().set_modified(old).set_accessed(old))
            .unwrap();
        assert!(!abandoned(&f));
        // Held by its writer: never.
        assert!(!abandoned(&File::open(&fresh.path).unwrap()));
        // A big one is emptied: spare/ never holds much disk.
        std::io::Write::write_all(&mut fresh.file, &vec![b'x'; 20_000]).unwrap();
        t.retire(Queue::Incoming, &fresh.id).unwrap();
        let m = fs::metadata(root.join(SPARE).join(&fresh.id)).unwrap();
        assert_eq!(m.len(), 0);
        fs::remove_dir_all(root).unwrap();
    }

    #[test]
    fn spare_dir_found_empty_is_read_again_soon() {
        let root = std::env::temp_dir().join(format!("pqe-{}", std::process::id()));
        let t = QueueTree::new(&root);
        t.create_dirs(None, None).unwrap();
        // spare/ is empty: a new file, and spare/ is not read again for a while.
        let nf = t.create_recycled(Queue::Incoming).unwrap();
        let ino = nf.file.metadata().unwrap().ino();
        let id = nf.id.clone();
        drop(nf);
        t.retire(Queue::Incoming, &id).unwrap();
        // A burst on an empty queue takes the first delivered message's
        // file within a few of its arrivals, not a second later.
        let start = std::time::Instant::now();
        let mut taken = false;
        while !taken && start.elapsed() < std::time::Duration::from_millis(300) {
            let nf = t.create_recycled(Queue::Incoming).unwrap();
            taken = nf.file.metadata().unwrap().ino() == ino;
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        assert!(taken, "the spare was not taken within 300 ms");
        fs::remove_dir_all(root).unwrap();
    }

    #[test]
    fn a_spare_another_taker_holds_is_not_taken() {
        let root = std::env::temp_dir().join(format!("pqh-{}", std::process::id()));
        let t = QueueTree::new(&root);
        t.create_dirs(None, None).unwrap();
        let nf = t.create(Queue::Incoming).unwrap();
        let id = nf.id.clone();
        drop(nf);
        t.retire(Queue::Incoming, &id).unwrap();
        // Another taker opened and locked it, and is about to rename it:
        // this one makes a new file instead of waiting or spinning.
        let held = File::open(root.join(SPARE).join(&id)).unwrap();
        held.try_lock().unwrap();
        let other = t.create_recycled(Queue::Incoming).unwrap();
        assert_ne!(
            other.file.metadata().unwrap().ino(),
            held.metadata().unwrap().ino()
        );
        assert!(root.join(SPARE).join(&id).exists(), "the spare stayed");
        fs::remove_dir_all(root).unwrap();
    }
}
