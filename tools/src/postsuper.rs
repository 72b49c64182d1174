//! postsuper: the administrator's queue operations, as Postfix's
//! `postsuper`: `-d ID|ALL|-` delete, `-h` put on hold, `-H` release from
//! hold, `-r` requeue, `-s` structure check and repair, `-p` purge
//! temporary files; optional queue names after the options limit what is
//! looked at (`postsuper -d ALL deferred`). Each message changed is
//! logged as Postfix does (`postsuper[PID]: ID: removed`, `placed on
//! hold`, `released from hold`, `requeued`), and a summary goes to stderr
//! (`postsuper: Deleted: 3 messages`). It runs as root or `mail_owner`.
//!
//! **Expire** (`-e`, `-f`, Postfix 3.5's): the queue file gets the
//! group-execute bit ([`qfile::MODE_EXPIRE_BIT`]) where it is, in any
//! queue, `active/` included (a mode bit races with nothing); qmgr
//! returns such a message to the sender at its next delivery attempt,
//! with the reason it was last deferred for, or "message is
//! administratively expired". `-f` also releases it from hold.
//!
//! **No race with a delivery.** postsuper changes a file in `incoming/`,
//! `deferred/` or `hold/` only by one `rename(2)` or `unlink(2)` of its
//! name: qmgr takes a file by renaming it into `active/`, so exactly one
//! of the two wins, and a postsuper step that fails with ENOENT means
//! qmgr took the message — postsuper then asks qmgr. A message in
//! `active/` is never touched directly while qmgr runs: postsuper sends
//! an [`AdminRequest`] to `private/qmgr-admin`, and qmgr deletes, holds
//! or releases the message when no delivery request of it is in flight
//! (at once, or when the last one returns). When qmgr is not running,
//! postsuper acts on an active file itself, unless a delivery agent still
//! holds its lock.
//!
//! **Requeue** (`-r`) sends the message through cleanup again, so that
//! address rewriting and header processing are re-run, as Postfix's
//! requeue does (Postfix moves the file to `maildrop/` for pickup;
//! Postern's pickup accepts only what sendmail writes, so postsuper
//! talks to cleanup itself): the file is first claimed by a rename to
//! `.requeue.ID` in its directory (invisible to qmgr's scans) and locked,
//! its pending recipients, sender, attributes and content are submitted
//! to `public/cleanup`, and the claimed file is removed only once cleanup
//! answered Queued. If postsuper dies in between, `postsuper -s` moves
//! the stranded `.requeue.ID` file to `hold/` for the administrator to
//! look at (it may or may not have been queued again): no message is
//! ever lost or silently delivered twice.

use crate::die;
use crate::sysexits::*;
use postern_common::debug;
use postern_common::ipc::{
    self, cleanup_flags, AdminReply, AdminRequest, AdminStatus, CleanupReply, CleanupRequest,
    NewMessage, Wakeup,
};
use postern_common::qfile::{self, ContentReader, ReadError};
use postern_common::queue::{self, is_queue_id, MessageLog, Queue, QueueTree};
use postern_common::{info, warning};
use std::fs::{File, TryLockError};
use std::io::{self, BufRead, Read};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

/// Prefix of a file being requeued (see the module doc).
pub const REQUEUE_PREFIX: &str = ".requeue.";

/// The login name of the real user.
pub fn login() -> String {
    let uid = nix::unistd::getuid().as_raw();
    postern_common::privs::user_by_uid(uid)
        .map(|a| a.name)
        .unwrap_or_else(|| format!("uid{uid}"))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    Delete,
    Hold,
    Release,
    Requeue,
    /// `-e`: expire.
    Expire,
    /// `-f`: expire, and release from hold.
    ExpireRelease,
}

impl Op {
    /// The queues an operation looks at when none are named (Postfix's).
    fn default_queues(self) -> &'static [Queue] {
        match self {
            Op::Delete | Op::Requeue | Op::Expire | Op::ExpireRelease => {
                &[Queue::Hold, Queue::Incoming, Queue::Active, Queue::Deferred]
            }
            Op::Hold => &[Queue::Incoming, Queue::Active, Queue::Deferred],
            // Active: to cancel a hold qmgr has not done yet.
            Op::Release => &[Queue::Hold, Queue::Active],
        }
    }

    fn summary(self) -> &'static str {
        match self {
            Op::Delete => "Deleted",
            Op::Hold => "Placed on hold",
            Op::Release => "Released from hold",
            Op::Requeue => "Requeued",
            Op::Expire | Op::ExpireRelease => "Force-expired",
        }
    }
}

/// What became of one message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    Done,
    /// Not in any of the queues looked at.
    NotFound,
    /// Could not be done now (reported).
    Failed,
}

struct Ctx {
    name: &'static str,
    tree: QueueTree,
    timeout: Duration,
    /// Messages `-f` released from hold.
    released: std::cell::Cell<usize>,
    /// Directories where files were removed, fsync'd once at the end.
    emptied: std::cell::RefCell<std::collections::BTreeSet<PathBuf>>,
}

fn plural(n: usize) -> &'static str {
    if n == 1 {
        ""
    } else {
        "s"
    }
}

fn remove_logs(tree: &QueueTree, id: &str) {
    for log in [MessageLog::Defer, MessageLog::Bounce, MessageLog::Success] {
        let _ = std::fs::remove_file(tree.log_path(log, id));
    }
}

fn is_enoent(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::NotFound
}

impl Ctx {
    /// One step on a file outside `active/`, in the first of `queues`
    /// that holds it.
    fn direct(&self, op: Op, id: &str, queues: &[Queue]) -> Step {
        for &q in queues {
            if matches!(op, Op::Expire | Op::ExpireRelease) {
                match self.expire(op, q, id) {
                    Ok(()) => return Step::Done,
                    Err(e) if is_enoent(&e) => continue,
                    Err(e) => {
                        warning!("expire file {}/{id}: {e}", q.name());
                        return Step::Failed;
                    }
                }
            }
            if q == Queue::Active {
                continue;
            }
            let path = self.tree.path(q, id);
            let res = match op {
                // The directories are fsync'd once at the end (run_ops).
                Op::Delete => self.remove_accounted(q, id).map(|()| {
                    remove_logs(&self.tree, id);
                    info!("{id}: removed");
                }),
                Op::Hold if q != Queue::Hold => self.tree.move_to(id, q, Queue::Hold).map(|()| {
                    info!("{id}: placed on hold");
                }),
                Op::Hold => continue,
                Op::Release => {
                    if q != Queue::Hold {
                        continue;
                    }
                    // Due now: the next deferred scan takes it.
                    let path = self.tree.locate(q, id).unwrap_or(path);
                    match queue::set_mtime(&path, postern_common::time::now_secs()) {
                        Err(e) if is_enoent(&e) => continue,
                        _ => {}
                    }
                    self.tree
                        .move_to(id, Queue::Hold, Queue::Deferred)
                        .map(|()| info!("{id}: released from hold"))
                }
                Op::Requeue => self.requeue(q, id),
                Op::Expire | Op::ExpireRelease => unreachable!("handled above"),
            };
            match res {
                Ok(()) => return Step::Done,
                Err(e) if is_enoent(&e) => continue,
                Err(e) => {
                    warning!("{id}: {}: {e}", q.name());
                    return Step::Failed;
                }
            }
        }
        Step::NotFound
    }

    /// Marks `q/id` expired; with `-f`, a held message is also released.
    fn expire(&self, op: Op, q: Queue, id: &str) -> io::Result<()> {
        use std::os::unix::fs::PermissionsExt;
        let path = self.tree.path(q, id);
        let mode = std::fs::metadata(&path)?.permissions().mode() & 0o7777;
        if mode & qfile::MODE_COMPLETE_BIT == 0 {
            // Still being written: it cannot be expired yet, as Postfix.
            return Err(io::Error::other("the queue file is incomplete"));
        }
        std::fs::set_permissions(
            &path,
            std::fs::Permissions::from_mode(mode | qfile::MODE_EXPIRE_BIT),
        )?;
        info!("{id}: expired");
        if op == Op::ExpireRelease && q == Queue::Hold {
            // Due now: the next deferred scan takes it, and bounces it.
            queue::set_mtime(&path, postern_common::time::now_secs())?;
            self.tree.move_to(id, Queue::Hold, Queue::Deferred)?;
            info!("{id}: released from hold");
            self.released.set(self.released.get() + 1);
        }
        Ok(())
    }

    /// [`Ctx::remove`], with the accounting log's `AdminBounce` records
    /// of the message's pending recipients (read before it goes).
    fn remove_accounted(&self, q: Queue, id: &str) -> io::Result<()> {
        let file = postern_common::accounting::enabled()
            .then(|| {
                let path = self
                    .tree
                    .locate(q, id)
                    .unwrap_or_else(|| self.tree.path(q, id));
                File::open(path).ok()
            })
            .flatten();
        self.remove(q, id)?;
        if let Some(f) = file {
            account_delete(&f, id);
        }
        Ok(())
    }

    /// Removes `q/id`, where it belongs or where it was misplaced; notes
    /// its directory for the final fsync.
    fn remove(&self, q: Queue, id: &str) -> io::Result<()> {
        let path = self.tree.path(q, id);
        let path = match std::fs::remove_file(&path) {
            Err(e) if is_enoent(&e) => {
                let Some(other) = self.tree.misplaced(q.name(), id) else {
                    return Err(e);
                };
                std::fs::remove_file(&other)?;
                other
            }
            r => r.map(|()| path)?,
        };
        if let Some(dir) = path.parent() {
            self.emptied.borrow_mut().insert(dir.to_path_buf());
        }
        Ok(())
    }

    /// Requeues `q/id` through cleanup (see the module doc). ENOENT: not
    /// there; `Interrupted`: there, but taken away meanwhile.
    fn requeue(&self, q: Queue, id: &str) -> io::Result<()> {
        let path = self
            .tree
            .locate(q, id)
            .ok_or_else(|| io::Error::from(io::ErrorKind::NotFound))?;
        // Beside the file, in its (hash sub)directory.
        let dir = path.parent().unwrap_or(self.tree.root()).to_path_buf();
        let claim = dir.join(format!("{REQUEUE_PREFIX}{id}"));
        std::fs::rename(&path, &claim)?;
        let put_back = |why: String| -> io::Error {
            if let Err(e) = std::fs::rename(&claim, &path) {
                warning!(
                    "{id}: cannot put {} back: {e}; run postsuper -s",
                    claim.display()
                );
            }
            io::Error::other(why)
        };
        let file = File::options()
            .read(true)
            .write(true)
            .open(&claim)
            .map_err(|e| put_back(format!("open: {e}")))?;
        match file.try_lock() {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => {
                return Err(put_back(
                    "a delivery agent is still working on it; try again later".into(),
                ))
            }
            Err(TryLockError::Error(e)) => return Err(put_back(format!("lock: {e}"))),
        }
        let env = match qfile::read_envelope(&file) {
            Ok(env) => env,
            Err(ReadError::Incomplete) => {
                return Err(put_back("the queue file is incomplete".into()))
            }
            Err(e) => return Err(put_back(e.to_string())),
        };
        let pending: Vec<qfile::Recipient> = env.pending().map(|r| r.rcpt.clone()).collect();
        if pending.is_empty() {
            std::fs::remove_file(&claim)?;
            remove_logs(&self.tree, id);
            info!("{id}: removed");
            return Ok(());
        }
        let new = NewMessage {
            sender: env.sender.clone(),
            recipients: pending,
            attrs: env.attrs.clone(),
            flags: if env.attr(qfile::attr::NOTIFICATION).is_some() {
                cleanup_flags::NOTIFICATION
            } else {
                0
            },
            origin: "postsuper".into(),
        };
        match self.submit(&file, new, env.content_offset) {
            Ok(new_id) => {
                std::fs::remove_file(&claim)?;
                let _ = queue::sync_dir(&dir);
                remove_logs(&self.tree, id);
                info!("{id}: requeued");
                debug!("{id}: requeued as {new_id}");
                Ok(())
            }
            Err(e) => Err(put_back(format!("cannot requeue: {e}"))),
        }
    }

    /// Sends a message to cleanup; returns its new queue ID.
    fn submit(&self, file: &File, new: NewMessage, content_offset: u64) -> io::Result<String> {
        let mut s = ipc::connect(&self.tree.cleanup_socket(), self.timeout)?;
        ipc::send_open(&mut s, new)?;
        let refused = |what: &str, dsn: String, reason: String| {
            io::Error::other(format!("{what}: {dsn} {reason}"))
        };
        match ipc::recv::<_, CleanupReply>(&mut s)? {
            CleanupReply::Opened { .. } => {}
            CleanupReply::Failed { dsn, reason, .. } => {
                return Err(refused("cleanup refused it", dsn, reason))
            }
            other => return Err(io::Error::other(format!("cleanup said {other:?}"))),
        }
        let mut content = ContentReader::new(file, content_offset)?;
        let mut buf = vec![0u8; qfile::CHUNK];
        loop {
            let n = content.read(&mut buf)?;
            if n == 0 {
                break;
            }
            ipc::send(&mut s, &CleanupRequest::Content(buf[..n].to_vec()))?;
        }
        ipc::send(&mut s, &CleanupRequest::Close)?;
        match ipc::recv::<_, CleanupReply>(&mut s)? {
            CleanupReply::Queued { queue_id } => Ok(queue_id),
            CleanupReply::Failed { dsn, reason, .. } => {
                Err(refused("cleanup did not queue it", dsn, reason))
            }
            other => Err(io::Error::other(format!("cleanup said {other:?}"))),
        }
    }

    /// Asks qmgr about messages in `active/`. `None`: qmgr is not running.
    fn ask_qmgr(&self, op: Op, ids: &[String]) -> Option<AdminReply> {
        let path = self.tree.socket(true, ipc::QMGR_ADMIN_SOCKET);
        let mut s = match ipc::connect(&path, self.timeout) {
            Ok(s) => s,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused
                ) =>
            {
                return None
            }
            Err(e) => die(self.name, EX_UNAVAILABLE, format_args!("{e}")),
        };
        let v = ids.to_vec();
        let req = match op {
            Op::Delete => AdminRequest::Delete(v),
            Op::Hold => AdminRequest::Hold(v),
            Op::Release => AdminRequest::Unhold(v),
            Op::Requeue => AdminRequest::Release(v),
            // Done on the file itself (Ctx::expire).
            Op::Expire | Op::ExpireRelease => return None,
        };
        let reply = ipc::send(&mut s, &req).and_then(|()| ipc::recv::<_, AdminReply>(&mut s));
        match reply {
            Ok(r) if r.results.len() == ids.len() => Some(r),
            Ok(_) => die(self.name, EX_SOFTWARE, "qmgr answered for other messages"),
            Err(e) => die(
                self.name,
                EX_UNAVAILABLE,
                format_args!("no answer from the queue manager: {e}"),
            ),
        }
    }

    /// With qmgr not running: acts on `active/id` itself, unless a
    /// delivery agent holds the file's lock.
    fn active_without_qmgr(&self, op: Op, id: &str) -> Step {
        let path = self.tree.path(Queue::Active, id);
        let Ok(file) = File::open(&path) else {
            return Step::NotFound;
        };
        match file.try_lock() {
            Ok(()) => {}
            Err(_) => {
                warning!("{id}: a delivery agent is still working on it; try again later");
                return Step::Failed;
            }
        }
        let res = match op {
            Op::Delete => std::fs::remove_file(&path).map(|()| {
                account_delete(&file, id);
                remove_logs(&self.tree, id);
                info!("{id}: removed");
            }),
            Op::Hold => self
                .tree
                .move_to(id, Queue::Active, Queue::Hold)
                .map(|()| info!("{id}: placed on hold")),
            // Without qmgr no hold can be pending: nothing to release.
            Op::Release => return Step::NotFound,
            Op::Requeue => self.tree.move_to(id, Queue::Active, Queue::Deferred),
            Op::Expire | Op::ExpireRelease => return Step::NotFound,
        };
        match res {
            Ok(()) if op == Op::Requeue => Step::NotFound, // requeued from deferred next
            Ok(()) => Step::Done,
            Err(e) if is_enoent(&e) => Step::NotFound,
            Err(e) => {
                warning!("{id}: active: {e}");
                Step::Failed
            }
        }
    }

    /// Runs `op` on `ids` within `queues`; returns how many messages it
    /// changed (or qmgr will change once their delivery returns).
    fn run(&self, op: Op, ids: Vec<String>, queues: &[Queue]) -> usize {
        let mut count = 0;
        let mut todo = ids;
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut waiting_for_qmgr: Vec<String> = Vec::new();
        for round in 0.. {
            let mut ask = Vec::new();
            for id in std::mem::take(&mut todo) {
                match self.direct(op, &id, queues) {
                    Step::Done => count += 1,
                    Step::Failed => {}
                    Step::NotFound => {
                        if queues.contains(&Queue::Active)
                            && self.tree.path(Queue::Active, &id).exists()
                        {
                            ask.push(id);
                        } else if round < 20
                            && self
                                .tree
                                .find(&id)
                                .is_some_and(|q| q != Queue::Active && queues.contains(&q))
                        {
                            // qmgr took it and put it back meanwhile: again.
                            todo.push(id);
                        } else if waiting_for_qmgr.contains(&id) && Instant::now() < deadline {
                            // qmgr has not released it yet.
                            todo.push(id);
                        } else if waiting_for_qmgr.contains(&id) {
                            warning!("{id}: still being delivered; not requeued");
                        }
                    }
                }
            }
            if !ask.is_empty() {
                match self.ask_qmgr(op, &ask) {
                    Some(reply) => {
                        for (id, st) in ask.into_iter().zip(reply.results) {
                            match (st, op) {
                                // Released to deferred: requeue it from there.
                                (AdminStatus::Done | AdminStatus::Pending, Op::Requeue) => {
                                    if !waiting_for_qmgr.contains(&id) {
                                        waiting_for_qmgr.push(id.clone());
                                    }
                                    todo.push(id)
                                }
                                (AdminStatus::Done | AdminStatus::Pending, Op::Release) => {
                                    info!("{id}: released from hold");
                                    count += 1
                                }
                                (AdminStatus::Done | AdminStatus::Pending, _) => count += 1,
                                // Moved meanwhile: look again.
                                (AdminStatus::NotActive, _) if round < 20 => todo.push(id),
                                _ => {}
                            }
                        }
                    }
                    None => {
                        for id in ask {
                            match self.active_without_qmgr(op, &id) {
                                Step::Done => count += 1,
                                Step::NotFound if round < 20 => todo.push(id),
                                _ => {}
                            }
                        }
                    }
                }
            }
            if todo.is_empty() {
                break;
            }
            std::thread::sleep(Duration::from_millis(if round < 5 { 20 } else { 200 }));
        }
        count
    }

    /// The IDs of every message in `queues`.
    /// Directories are listed one after the other while qmgr moves
    /// messages between them: a message can leave the one not yet listed
    /// for one already listed. Three passes, in alternating order, make
    /// that unlikely (a message that keeps moving is also found by the
    /// per-message retries of [`Ctx::run`] only if listed once).
    fn all(&self, queues: &[Queue]) -> Vec<String> {
        let mut ids = Vec::new();
        for pass in 0..3 {
            let order: Vec<Queue> = if pass % 2 == 0 {
                queues.to_vec()
            } else {
                queues.iter().rev().copied().collect()
            };
            for q in order {
                match self.tree.list(q) {
                    Ok(v) => ids.extend(v),
                    Err(e) => die(self.name, EX_NOPERM, format_args!("{}: {e}", q.name())),
                }
            }
        }
        ids.sort();
        ids.dedup();
        ids
    }
}

// ------------------------------------------------------------ -s and -p

fn age(meta: &std::fs::Metadata) -> Duration {
    meta.modified()
        .ok()
        .and_then(|t| SystemTime::now().duration_since(t).ok())
        .unwrap_or_default()
}

fn pid_alive(pid: i32) -> bool {
    // No signal: only checks for the process.
    let r = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None);
    r != Err(nix::errno::Errno::ESRCH)
}

/// `-p`: removes temporary files (`.tmp.PID.N`) whose writer is gone.
fn purge(ctx: &Ctx) -> usize {
    let mut n = 0;
    for q in Queue::ALL {
        let _ = ctx.tree.walk(q.name(), |dir, _, e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let Some(rest) = name.strip_prefix(".tmp.") else {
                return;
            };
            let pid: i32 = rest
                .split('.')
                .next()
                .and_then(|p| p.parse().ok())
                .unwrap_or(0);
            let Ok(meta) = e.metadata() else { return };
            if (pid > 0 && pid_alive(pid)) || age(&meta) < Duration::from_secs(10) {
                return;
            }
            if std::fs::remove_file(dir.join(&name)).is_ok() {
                info!("removed temporary file {}/{name}", q.name());
                n += 1;
            }
        });
    }
    n
}

/// Whether message `id` is in some queue (asked twice, so that a file
/// moving between two queues during the first look is still found).
fn exists_anywhere(tree: &QueueTree, id: &str) -> bool {
    tree.find(id).is_some() || {
        std::thread::sleep(Duration::from_millis(50));
        tree.find(id).is_some()
    }
}

/// Moves a file of `dir` (in queue `q`) that is not a usable queue file
/// to `corrupt/`.
fn to_corrupt(tree: &QueueTree, q: Queue, dir: &Path, name: &str, why: &str) -> bool {
    warning!(
        "saving corrupt file \"{name}\" from queue \"{}\" to queue \"corrupt\": {why}",
        q.name()
    );
    std::fs::rename(dir.join(name), tree.dir(Queue::Corrupt).join(name)).is_ok()
}

/// `-s`: structure check and repair of `incoming deferred hold` (and of
/// `active` when qmgr is not running): files put where the hashing
/// (`hash_queue_names`, `hash_queue_depth`) wants them and subdirectories
/// no longer needed removed, names matched to inode numbers, unreadable
/// files to `corrupt/`, interrupted requeues to `hold/`, logs of messages
/// that are no more removed. Returns the number of repairs.
fn repair(ctx: &Ctx) -> usize {
    let tree = &ctx.tree;
    let qmgr_up =
        std::os::unix::net::UnixStream::connect(tree.socket(true, ipc::QMGR_ADMIN_SOCKET)).is_ok();
    let mut fixed = tree.rehash(!qmgr_up);
    let mut queues = vec![Queue::Incoming, Queue::Deferred, Queue::Hold];
    if !qmgr_up {
        queues.push(Queue::Active);
    }
    for q in queues {
        let _ = tree.walk(q.name(), |dir, chain, e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let Ok(meta) = e.metadata() else { return };
            if !meta.is_file() || name.starts_with(".tmp.") {
                return;
            }
            if let Some(orig) = name.strip_prefix(REQUEUE_PREFIX) {
                if is_queue_id(orig)
                    && age(&meta) > Duration::from_secs(60)
                    && tree.place(Queue::Hold.name(), &dir.join(&name), orig).is_ok()
                {
                    warning!(
                        "{orig}: an interrupted requeue left it in {}: moved to hold; \
                         it may have been queued again: check before releasing it",
                        q.name()
                    );
                    fixed += 1;
                }
                return;
            }
            if !is_queue_id(&name) {
                if to_corrupt(tree, q, dir, &name, "not a queue file name") {
                    fixed += 1;
                }
                return;
            }
            // Where it belongs (rehash moved it, unless it came meanwhile).
            let mut path = dir.join(&name);
            if !tree.in_place(q.name(), chain, &name) {
                match tree.place(q.name(), &path, &name) {
                    Ok(p) => {
                        fixed += 1;
                        path = p;
                    }
                    Err(_) => return,
                }
            }
            // The name must end in the file's inode number.
            let ino = format!("{:X}", meta.ino());
            let mut id = name.clone();
            if name.len() <= 13 || name[13..] != ino {
                let new = format!("{}{ino}", &name[..13.min(name.len())]);
                if is_queue_id(&new) && tree.find(&new).is_none() {
                    if let Ok(p) = tree.place(q.name(), &path, &new) {
                        for log in [MessageLog::Defer, MessageLog::Bounce, MessageLog::Success] {
                            let _ = tree.place(log.name(), &tree.log_path(log, &name), &new);
                        }
                        warning!(
                            "{name}: renamed to {new}: the name did not match the file's inode number"
                        );
                        fixed += 1;
                        id = new;
                        path = p;
                    }
                }
            }
            let Ok(f) = File::open(&path) else {
                return;
            };
            match qfile::read_envelope(&f) {
                Ok(_) => {}
                // cleanup may still be writing it (it holds the file's
                // lock meanwhile), in incoming/ or, for a message a check
                // put on hold, in hold/ before it is complete.
                Err(ReadError::Incomplete) if matches!(q, Queue::Incoming | Queue::Hold) => {
                    if postern_common::queue::abandoned(&f) && std::fs::remove_file(&path).is_ok()
                    {
                        warning!("{id}: removed incomplete queue file older than one day");
                        fixed += 1;
                    }
                }
                Err(ReadError::Io(_)) => {}
                Err(e) => {
                    let at = path.parent().unwrap_or(tree.root()).to_path_buf();
                    if to_corrupt(tree, q, &at, &id, &e.to_string()) {
                        fixed += 1;
                    }
                }
            }
        });
    }
    // Logs of messages that are no more.
    for log in [MessageLog::Defer, MessageLog::Bounce, MessageLog::Success] {
        let _ = tree.walk(log.name(), |dir, _, e| {
            let name = e.file_name().to_string_lossy().into_owned();
            if is_queue_id(&name)
                && !exists_anywhere(tree, &name)
                && std::fs::remove_file(dir.join(&name)).is_ok()
            {
                warning!(
                    "{name}: removed {} log of a message that is no more",
                    log.name()
                );
                fixed += 1;
            }
        });
    }
    fixed
}

/// What `postern start` and `reload` run before the system (re)starts,
/// as Postfix's start runs `postsuper`: files put where the hashing wants
/// them (`active/` too when `with_active`: nothing runs yet) and
/// subdirectories no longer needed removed. Returns how many files moved.
pub fn rehash_queue(cfg: &postern_conf::Config, with_active: bool) -> usize {
    let tree = QueueTree::configured(cfg.get("queue_directory"), cfg);
    let moved = tree.rehash(with_active);
    if moved > 0 {
        eprintln!("postsuper: moved {moved} queue file(s) to where hash_queue_names and hash_queue_depth want them");
    }
    moved
}

// ------------------------------------------------------------ main

fn usage(name: &str) -> ! {
    die(
        name,
        EX_USAGE,
        "usage: postsuper [-c config_dir] [-d queue_id (delete)] [-e queue_id (expire)] [-f queue_id (expire and/or un-hold)] [-h queue_id (hold)] [-H queue_id (un-hold)] [-p (purge temporary files)] [-r queue_id (requeue)] [-s (structure fix)] [-v (verbose)] [queue...]",
    )
}

/// Reads queue IDs from standard input, one per line (`-d -`).
fn ids_from_stdin() -> Vec<String> {
    io::stdin()
        .lock()
        .lines()
        .map_while(Result::ok)
        .filter_map(|l| l.split_whitespace().next().map(str::to_string))
        .collect()
}

/// What the command line asks.
#[derive(Default)]
struct Command {
    config: Option<PathBuf>,
    /// Each operation with its argument (a queue ID, `ALL` or `-`), in
    /// command-line order.
    ops: Vec<(Op, String)>,
    repair: bool,
    purge: bool,
    /// The queues named on the command line (none: each operation's own).
    queues: Vec<Queue>,
}

fn parse_args(name: &str) -> Command {
    let mut args = std::env::args().skip(1).peekable();
    let mut cmd = Command::default();
    while let Some(a) = args.next() {
        let Some(flags) = a.strip_prefix('-').filter(|f| !f.is_empty()) else {
            match Queue::from_name(&a) {
                Some(q) => cmd.queues.push(q),
                None => die(name, EX_USAGE, format_args!("invalid directory name: {a}")),
            }
            continue;
        };
        for (i, c) in flags.char_indices() {
            match c {
                'c' | 'd' | 'e' | 'f' | 'h' | 'H' | 'r' => {
                    let rest = &flags[i + 1..];
                    let v = if rest.is_empty() {
                        args.next().unwrap_or_else(|| usage(name))
                    } else {
                        rest.to_string()
                    };
                    match c {
                        'c' => cmd.config = Some(PathBuf::from(v)),
                        'd' => cmd.ops.push((Op::Delete, v)),
                        'e' => cmd.ops.push((Op::Expire, v)),
                        'f' => cmd.ops.push((Op::ExpireRelease, v)),
                        'h' => cmd.ops.push((Op::Hold, v)),
                        'H' => cmd.ops.push((Op::Release, v)),
                        _ => cmd.ops.push((Op::Requeue, v)),
                    }
                    break;
                }
                's' => cmd.repair = true,
                'p' => cmd.purge = true,
                'v' => {}
                _ => usage(name),
            }
        }
    }
    if cmd.ops.is_empty() && !cmd.repair && !cmd.purge {
        // Postfix's default: the structure check and the purge of
        // temporary files (what its start-up runs).
        cmd.repair = true;
        cmd.purge = true;
    }
    cmd
}

/// The entry point of `postsuper`.
/// The accounting log's `AdminBounce` records of a deleted message (its
/// pending recipients), from its file (still open after the unlink).
fn account_delete(file: &File, id: &str) {
    use postern_common::accounting;
    if !accounting::enabled() {
        return;
    }
    if let Ok(env) = qfile::read_envelope(file) {
        accounting::message_event(
            accounting::Kind::AdminBounce,
            id,
            &env,
            Some(&accounting::admin_delete_reply()),
            "",
        );
    }
}

pub fn main() -> ! {
    let name = "postsuper";
    let cmd = parse_args(name);
    let cfg = crate::load_config(name, cmd.config.as_deref());
    postern_common::log::init(
        "postsuper",
        &cfg.get("syslog_name"),
        &cfg.get("maillog_file"),
        true,
        false,
    );
    postern_common::accounting::init(&cfg);
    let ctx = Ctx {
        name,
        tree: QueueTree::configured(cfg.get("queue_directory"), &cfg),
        timeout: Duration::from_secs(cfg.get_time("ipc_timeout").unwrap_or(3600).clamp(1, 60)),
        released: std::cell::Cell::new(0),
        emptied: Default::default(),
    };
    if !ctx.tree.root().is_dir() {
        die(
            name,
            EX_CONFIG,
            format_args!("{}: no queue directory", ctx.tree.root().display()),
        );
    }
    if cmd.purge {
        let n = purge(&ctx);
        if n > 0 {
            eprintln!("{name}: Deleted: {n} temporary file{}", plural(n));
        }
    }
    if cmd.repair {
        let n = repair(&ctx);
        if n > 0 {
            eprintln!("{name}: Repaired: {n} file{}", plural(n));
        }
    }
    if run_ops(&ctx, &cmd.ops, &cmd.queues) {
        let _ = ipc::wake(&ctx.tree.qmgr_socket(), &[Wakeup::Deferred]);
    }
    std::process::exit(EX_OK)
}

/// Runs the operations, in the order delete, expire, hold, release, requeue, each
/// on its own default queues (those of `queues` when some are named).
/// Returns whether a message was released from hold.
fn run_ops(ctx: &Ctx, ops: &[(Op, String)], queues: &[Queue]) -> bool {
    let name = ctx.name;
    let mut stdin_ids: Option<Vec<String>> = None;
    let mut released = false;
    for op in [
        Op::Delete,
        Op::Expire,
        Op::ExpireRelease,
        Op::Hold,
        Op::Release,
        Op::Requeue,
    ] {
        let args: Vec<&String> = ops
            .iter()
            .filter(|(o, _)| *o == op)
            .map(|(_, v)| v)
            .collect();
        if args.is_empty() {
            continue;
        }
        let qs: Vec<Queue> = op
            .default_queues()
            .iter()
            .copied()
            .filter(|q| queues.is_empty() || queues.contains(q))
            .collect();
        let mut ids = Vec::new();
        for a in args {
            if a == "ALL" {
                ids.extend(ctx.all(&qs));
            } else if a == "-" {
                ids.extend(stdin_ids.get_or_insert_with(ids_from_stdin).iter().cloned());
            } else if is_queue_id(a) {
                ids.push(a.clone());
            } else {
                warning!("invalid queue id: {a}");
            }
        }
        ids.sort();
        ids.dedup();
        let n = ctx.run(op, ids, &qs);
        if op == Op::Delete {
            for dir in std::mem::take(&mut *ctx.emptied.borrow_mut()) {
                let _ = queue::sync_dir(&dir);
            }
        }
        if n > 0 {
            info!("{}: {n} message{}", op.summary(), plural(n));
            eprintln!("{name}: {}: {n} message{}", op.summary(), plural(n));
            released |= op == Op::Release;
        }
        if op == Op::ExpireRelease && ctx.released.get() > 0 {
            let r = ctx.released.get();
            info!("Released from hold: {r} message{}", plural(r));
            eprintln!("{name}: Released from hold: {r} message{}", plural(r));
            released = true;
        }
    }
    released
}
