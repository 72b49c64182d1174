//! Finding work in the queue directories: start-up recovery of `active/`,
//! and the incoming and deferred scans that feed the active queue.
//!
//! A scan lists its directory once (sorted: oldest first) and hands out
//! one queue ID at a time, so that qmgr can interleave taking messages in
//! with dispatching and with answers from agents. A scan requested while
//! one is under way is remembered and runs when that one ends.
//!
//! Taking a message in is a rename into `active/`. An incoming file must
//! be complete (owner-execute bit and an end record); one that is not is still
//! being written and is skipped, unless it is over a day old, when it is
//! the remains of a crashed writer and is removed. A deferred file is
//! taken only when its mtime, the retry time, has come (or on a flush):
//! its envelope is not read to decide.
//!
//! The deferred queue is not listed at every run ([`DeferredScan`]): a
//! listing fills the [`Index`] (retry time, ID) once, a stat per file,
//! a batch at a time between other work; then qmgr takes what the index
//! says is due, O(log n) each, and sleeps until the next retry time.

use crate::index::Index;
use postern_common::queue::{Queue, QueueTree};
use postern_common::{info, warning};
use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::MetadataExt;
use std::time::{Duration, Instant, SystemTime};

/// One queue directory's scan.
#[derive(Debug)]
pub struct Scan {
    queue: Queue,
    pending: VecDeque<String>,
    /// The current listing ignores retry times (flush).
    ignore_time: bool,
    /// Another scan was asked for (and whether it ignores retry times).
    wanted: Option<bool>,
}

impl Scan {
    pub fn new(queue: Queue) -> Scan {
        Scan {
            queue,
            pending: VecDeque::new(),
            ignore_time: false,
            wanted: None,
        }
    }

    pub fn queue(&self) -> Queue {
        self.queue
    }

    /// Asks for a scan; `ignore_time` takes deferred mail whatever its
    /// retry time.
    pub fn request(&mut self, ignore_time: bool) {
        self.wanted = Some(self.wanted.unwrap_or(false) || ignore_time);
    }

    /// Whether there is anything left to hand out or a scan to start.
    pub fn busy(&self) -> bool {
        !self.pending.is_empty() || self.wanted.is_some()
    }

    /// The next queue ID, and whether it is to be taken regardless of its
    /// retry time.
    pub fn next(&mut self, tree: &QueueTree) -> Option<(String, bool)> {
        if self.pending.is_empty() {
            let ignore = self.wanted.take()?;
            match tree.list(self.queue) {
                Ok(ids) => self.pending = ids.into(),
                Err(e) => warning!("scan {}: {e}", tree.dir(self.queue).display()),
            }
            self.ignore_time = ignore;
        }
        self.pending.pop_front().map(|id| (id, self.ignore_time))
    }
}

/// Files stat'ed per call of [`DeferredScan::next`] while the index is
/// filled from a listing: the main loop looks at its events between
/// batches.
const STAT_BATCH: usize = 1000;

/// The deferred queue: an index by retry time, filled from listings.
pub struct DeferredScan {
    index: Index,
    /// A flush's listing: taken whatever the retry time.
    pending: VecDeque<String>,
    /// A listing being indexed (last = oldest), one stat per file.
    listing: Vec<String>,
    /// Another listing was asked for (and whether it is a flush).
    wanted: Option<bool>,
    /// When the last listing was made.
    listed_at: Option<Instant>,
    /// `qmgr_deferred_rescan_time`.
    rescan: Duration,
    /// The listing under way: (files listed, when).
    indexing: Option<(usize, Instant)>,
}

impl DeferredScan {
    pub fn new(rescan: Duration) -> DeferredScan {
        DeferredScan {
            index: Index::new(),
            pending: VecDeque::new(),
            listing: Vec::new(),
            wanted: None,
            listed_at: None,
            rescan,
            indexing: None,
        }
    }

    /// Asks for a listing of `deferred/`: `flush` takes every file
    /// whatever its retry time; otherwise the index is filled again.
    pub fn request(&mut self, flush: bool) {
        self.wanted = Some(self.wanted.unwrap_or(false) || flush);
    }

    /// The `queue_run_delay` timer: a listing only when the last is
    /// `qmgr_deferred_rescan_time` old (what is due comes from the index).
    pub fn tick(&mut self) {
        if self.listed_at.is_none_or(|t| t.elapsed() >= self.rescan) {
            self.request(false);
        }
    }

    /// A file qmgr put in `deferred/` with retry time `at`.
    pub fn deferred(&mut self, id: &str, at: u64) {
        self.index.push(at, id);
    }

    /// Whether there is something to take or index now.
    pub fn busy(&self) -> bool {
        !self.pending.is_empty()
            || self.wanted.is_some()
            || !self.listing.is_empty()
            || self
                .index
                .next_due()
                .is_some_and(|t| t <= postern_common::time::now_secs())
    }

    /// When the next indexed file is due (for the main loop's sleep).
    pub fn next_due(&self) -> Option<Instant> {
        let at = SystemTime::UNIX_EPOCH + Duration::from_secs(self.index.next_due()?);
        Some(Instant::now() + at.duration_since(SystemTime::now()).unwrap_or_default())
    }

    /// Files in the index.
    pub fn indexed(&self) -> usize {
        self.index.len()
    }

    /// The next queue ID to take, and whether regardless of its retry
    /// time. None: nothing due now (or a batch of the listing was
    /// indexed and there is more: [`DeferredScan::busy`]).
    pub fn next(&mut self, tree: &QueueTree) -> Option<(String, bool)> {
        if let Some(id) = self.pending.pop_front() {
            return Some((id, true));
        }
        if let Some(flush) = self.wanted.take() {
            self.list(tree, flush);
            if let Some(id) = self.pending.pop_front() {
                return Some((id, true));
            }
        }
        let now = postern_common::time::now_secs();
        if let Some(id) = self.index.pop_due(now) {
            return Some((id, false));
        }
        for _ in 0..STAT_BATCH {
            let Some(id) = self.listing.pop() else { break };
            match std::fs::metadata(tree.path(Queue::Deferred, &id)) {
                Ok(m) => {
                    let at = m.mtime().max(0) as u64;
                    if at <= now {
                        return Some((id, false));
                    }
                    self.index.push(at, &id);
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => warning!("{id}: stat deferred queue file: {e}"),
            }
        }
        if self.listing.is_empty() {
            if let Some((n, t0)) = self.indexing.take() {
                self.listing = Vec::new();
                info!(
                    "deferred queue indexed: {n} file(s) listed in {:.3}s, {} waiting, next retry {}",
                    t0.elapsed().as_secs_f64(),
                    self.index.len(),
                    self.index
                        .next_due()
                        .map_or("none".into(), |t| format!(
                            "in {}s",
                            t.saturating_sub(now)
                        )),
                );
            }
        }
        None
    }

    /// Lists `deferred/`: a flush hands every file out; otherwise the
    /// listing is indexed anew, a batch at a time.
    fn list(&mut self, tree: &QueueTree, flush: bool) {
        let t0 = Instant::now();
        let ids = match tree.list(Queue::Deferred) {
            Ok(ids) => ids,
            Err(e) => {
                warning!("scan {}: {e}", tree.dir(Queue::Deferred).display());
                return;
            }
        };
        self.listed_at = Some(t0);
        self.index.clear();
        self.listing = Vec::new();
        self.indexing = None;
        if flush {
            self.pending = ids.into();
        } else {
            self.indexing = Some((ids.len(), t0));
            self.listing = ids;
            self.listing.reverse();
        }
    }
}

/// Moves everything in `active/` back to `incoming/`: files that a
/// previous qmgr was working on when it stopped. Returns how many.
pub fn recover(tree: &QueueTree) -> usize {
    let ids = match tree.list(Queue::Active) {
        Ok(ids) => ids,
        Err(e) => {
            warning!("scan {}: {e}", tree.dir(Queue::Active).display());
            return 0;
        }
    };
    let mut n = 0;
    for id in ids {
        match tree.shift(&id, Queue::Active, Queue::Incoming) {
            Ok(()) => n += 1,
            Err(e) => warning!("{id}: move from active to incoming: {e}"),
        }
    }
    if n > 0 {
        info!("recovered {n} message(s) left in the active queue");
    }
    n
}

fn open(tree: &QueueTree, q: Queue, id: &str) -> Option<File> {
    match OpenOptions::new()
        .read(true)
        .write(true)
        .open(tree.path(q, id))
    {
        Ok(f) => Some(f),
        Err(e) if e.kind() == io::ErrorKind::NotFound => None,
        Err(e) => {
            warning!("{id}: open {} queue file: {e}", q.name());
            None
        }
    }
}

/// Takes an incoming message into `active/` if it is complete. Returns the
/// open file.
pub fn take_incoming(tree: &QueueTree, id: &str) -> Option<File> {
    let file = open(tree, Queue::Incoming, id)?;
    match postern_common::qfile::is_complete(&file) {
        Ok(true) => {}
        Ok(false) => {
            // A client may take its time between RCPT TO (when the file
            // is made) and the end of its data: the writer's lock says
            // whether anybody still writes the file.
            if postern_common::queue::abandoned(&file) {
                warning!("{id}: removing incomplete queue file older than one day");
                if let Err(e) = std::fs::remove_file(tree.path(Queue::Incoming, id)) {
                    warning!("{id}: remove incoming queue file: {e}");
                }
            }
            return None;
        }
        Err(e) => {
            warning!("{id}: read incoming queue file: {e}");
            return None;
        }
    }
    match tree.shift(id, Queue::Incoming, Queue::Active) {
        Ok(()) => Some(file),
        Err(e) => {
            if e.kind() != io::ErrorKind::NotFound {
                warning!("{id}: move from incoming to active: {e}");
            }
            None
        }
    }
}

/// What [`take_deferred`] did.
#[derive(Debug)]
pub enum Taken {
    /// Moved into `active/`: the open file.
    File(File),
    /// Not due: its retry time (seconds since the epoch).
    Later(u64),
    /// Gone, or it could not be taken.
    No,
}

/// Takes a deferred message into `active/` if its retry time has come (or
/// `ignore_time`).
pub fn take_deferred(tree: &QueueTree, id: &str, ignore_time: bool) -> Taken {
    let path = tree.path(Queue::Deferred, id);
    if !ignore_time {
        let at = match std::fs::metadata(&path) {
            Ok(m) => m.mtime().max(0) as u64,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Taken::No,
            Err(e) => {
                warning!("{id}: stat deferred queue file: {e}");
                return Taken::No;
            }
        };
        if at > postern_common::time::now_secs() {
            return Taken::Later(at);
        }
    }
    let Some(file) = open(tree, Queue::Deferred, id) else {
        return Taken::No;
    };
    match tree.shift(id, Queue::Deferred, Queue::Active) {
        Ok(()) => Taken::File(file),
        Err(e) => {
            if e.kind() != io::ErrorKind::NotFound {
                warning!("{id}: move from deferred to active: {e}");
            }
            Taken::No
        }
    }
}

/// Puts a message that cannot be read aside in `corrupt/`.
pub fn to_corrupt(tree: &QueueTree, id: &str, from: Queue, why: &str) {
    warning!(
        "saving corrupt file \"{id}\" from queue \"{}\" to queue \"corrupt\": {why}",
        from.name()
    );
    if let Err(e) = tree.move_to(id, from, Queue::Corrupt) {
        warning!("{id}: move to corrupt: {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_coalesce() {
        let root = std::env::temp_dir().join(format!("qmgr-scan-{}", std::process::id()));
        let tree = QueueTree::new(&root);
        tree.create_dirs(None, None).unwrap();
        let a = tree.create(Queue::Deferred).unwrap();
        let mut s = Scan::new(Queue::Deferred);
        assert!(!s.busy());
        assert!(s.next(&tree).is_none());
        s.request(false);
        s.request(true);
        assert!(s.busy());
        assert_eq!(s.next(&tree), Some((a.id.clone(), true)));
        assert!(s.next(&tree).is_none());
        assert!(!s.busy());
        std::fs::remove_dir_all(root).unwrap();
    }

    /// A deferred file made by cleanup's code, due at `at`.
    fn deferred_file(tree: &QueueTree, at: u64) -> String {
        let nf = tree.create(Queue::Deferred).unwrap();
        let f = std::fs::File::options()
            .write(true)
            .open(tree.path(Queue::Deferred, &nf.id))
            .unwrap();
        f.set_modified(SystemTime::UNIX_EPOCH + Duration::from_secs(at))
            .unwrap();
        nf.id
    }

    fn drain(s: &mut DeferredScan, tree: &QueueTree) -> Vec<(String, bool)> {
        let mut out = Vec::new();
        for _ in 0..100 {
            match s.next(tree) {
                Some(x) => out.push(x),
                None if s.busy() => {}
                None => break,
            }
        }
        out
    }

    #[test]
    fn the_deferred_index_hands_out_only_what_is_due() {
        let root = std::env::temp_dir().join(format!("qmgr-dscan-{}", std::process::id()));
        let tree = QueueTree::new(&root);
        tree.create_dirs(None, None).unwrap();
        let now = postern_common::time::now_secs();
        let due = deferred_file(&tree, now - 10);
        let later = deferred_file(&tree, now + 3600);
        let gone = deferred_file(&tree, now + 2);
        let mut s = DeferredScan::new(Duration::from_secs(3600));
        assert!(!s.busy());
        // Start: one listing, one stat each; the due one comes out.
        s.request(false);
        assert_eq!(drain(&mut s, &tree), vec![(due.clone(), false)]);
        assert_eq!(s.indexed(), 2);
        assert!(!s.busy());
        let wake = s.next_due().unwrap();
        assert!(wake <= Instant::now() + Duration::from_secs(3));
        // The timer does not list the directory again within
        // qmgr_deferred_rescan_time: a file put there by hand waits.
        let by_hand = deferred_file(&tree, now - 5);
        s.tick();
        assert!(drain(&mut s, &tree).is_empty());
        // qmgr's own deferral is indexed without a listing; a file
        // removed meanwhile comes up and is dropped by the taker.
        s.deferred(&due, now - 1);
        std::fs::remove_file(tree.path(Queue::Deferred, &gone)).unwrap();
        assert_eq!(drain(&mut s, &tree), vec![(due.clone(), false)]);
        std::thread::sleep(Duration::from_millis(2100));
        let out = drain(&mut s, &tree);
        assert_eq!(out, vec![(gone.clone(), false)]);
        assert!(matches!(take_deferred(&tree, &gone, false), Taken::No));
        // A file whose retry time was moved on is "later", with its time.
        match take_deferred(&tree, &later, false) {
            Taken::Later(t) => assert!(t >= now + 3600),
            other => panic!("{other:?}"),
        }
        // Another program's D wake-up: listed again, the hand-made file
        // found.
        s.request(false);
        let out = drain(&mut s, &tree);
        assert!(out.contains(&(by_hand.clone(), false)), "{out:?}");
        assert_eq!(s.indexed(), 1);
        // A flush takes everything, whatever its retry time.
        s.request(true);
        let out = drain(&mut s, &tree);
        assert!(out.contains(&(later.clone(), true)), "{out:?}");
        assert_eq!(s.indexed(), 0);
        std::fs::remove_dir_all(root).unwrap();
    }
}
