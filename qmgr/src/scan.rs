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

use postern_common::queue::{Queue, QueueTree};
use postern_common::{info, warning};
use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::io;
use std::time::SystemTime;

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

/// Takes a deferred message into `active/` if its retry time has come (or
/// `ignore_time`). Returns the open file.
pub fn take_deferred(tree: &QueueTree, id: &str, ignore_time: bool) -> Option<File> {
    let path = tree.path(Queue::Deferred, id);
    if !ignore_time {
        let due = match std::fs::metadata(&path).and_then(|m| m.modified()) {
            Ok(t) => t <= SystemTime::now(),
            Err(e) if e.kind() == io::ErrorKind::NotFound => return None,
            Err(e) => {
                warning!("{id}: stat deferred queue file: {e}");
                return None;
            }
        };
        if !due {
            return None;
        }
    }
    let file = open(tree, Queue::Deferred, id)?;
    match tree.shift(id, Queue::Deferred, Queue::Active) {
        Ok(()) => Some(file),
        Err(e) => {
            if e.kind() != io::ErrorKind::NotFound {
                warning!("{id}: move from deferred to active: {e}");
            }
            None
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
}
