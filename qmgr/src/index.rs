//! The deferred queue's index: every file of `deferred/` by retry time,
//! so that qmgr finds the next one due in O(log n) without listing the
//! directory (issue #19 point 7: a million deferred messages).
//!
//! The queue files stay the truth. A file's mtime is its retry time
//! (Postfix's rule); the index is a min-heap of (retry time, queue ID),
//! filled from a listing of `deferred/` (one `stat` per file) when qmgr
//! starts, when another program changed `deferred/` (its `D` wake-up:
//! `postsuper -H/-r`, `postqueue -i`) and every
//! `qmgr_deferred_rescan_time` (files moved in by hand), and kept between
//! listings by qmgr's own moves (a deferral pushes the file with its new
//! retry time). An entry can only be stale in a harmless way: its file
//! is gone (deleted, held) and the entry is dropped when it comes up, or
//! its file's retry time was moved later and it is pushed again with the
//! time its mtime says ([`crate::scan::take_deferred`] checks the mtime
//! of every file it takes). Whatever made a file due sooner comes with
//! a wake-up: a flush (`F`) or `postqueue -i` (`D`) lists the directory
//! again; `postqueue -s`, ETRN and `postern resume` move the site's files
//! to `incoming/` (`postern_common::flush`) and wake an incoming scan, and
//! their entries here are dropped when they come up.
//!
//! Memory: an entry is 32 bytes (the retry time and the ID packed as
//! nibbles in place, no allocation), so a million deferred messages cost
//! 32 MB of heap, at most twice that while the vector grows.

use std::cmp::Reverse;
use std::collections::BinaryHeap;

/// The longest queue ID, in hex digits (`queue::is_queue_id`).
const MAX_LEN: usize = 40;

/// A queue ID (upper-case hex, at most 40 digits) packed in 21 bytes.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug)]
pub struct Id {
    nibbles: [u8; MAX_LEN / 2],
    len: u8,
}

impl Id {
    /// None for what is not a queue ID.
    pub fn new(s: &str) -> Option<Id> {
        if s.is_empty() || s.len() > MAX_LEN {
            return None;
        }
        let mut nibbles = [0u8; MAX_LEN / 2];
        for (i, b) in s.bytes().enumerate() {
            let v = match b {
                b'0'..=b'9' => b - b'0',
                b'A'..=b'F' => b - b'A' + 10,
                _ => return None,
            };
            nibbles[i / 2] |= if i % 2 == 0 { v << 4 } else { v };
        }
        Some(Id {
            nibbles,
            len: s.len() as u8,
        })
    }

    pub fn as_string(&self) -> String {
        const HEX: &[u8; 16] = b"0123456789ABCDEF";
        (0..self.len as usize)
            .map(|i| {
                let b = self.nibbles[i / 2];
                let v = if i % 2 == 0 { b >> 4 } else { b & 0xf };
                HEX[v as usize] as char
            })
            .collect()
    }
}

/// Deferred files by retry time (seconds since the epoch).
#[derive(Default)]
pub struct Index {
    heap: BinaryHeap<Reverse<(u64, Id)>>,
}

impl Index {
    pub fn new() -> Index {
        Index::default()
    }

    /// Adds a file due at `at`. An ID that is not a queue ID is not kept
    /// (the listing never yields one).
    pub fn push(&mut self, at: u64, id: &str) {
        if let Some(id) = Id::new(id) {
            self.heap.push(Reverse((at, id)));
        }
    }

    /// The earliest retry time.
    pub fn next_due(&self) -> Option<u64> {
        self.heap.peek().map(|Reverse((t, _))| *t)
    }

    /// The ID of a file due at `now`, taken out (earliest first).
    pub fn pop_due(&mut self, now: u64) -> Option<String> {
        if self.next_due()? > now {
            return None;
        }
        self.heap.pop().map(|Reverse((_, id))| id.as_string())
    }

    pub fn len(&self) -> usize {
        self.heap.len()
    }

    pub fn is_empty(&self) -> bool {
        self.heap.is_empty()
    }

    /// Forgets everything (before the index is filled from a listing);
    /// the memory of a bigger past is given back.
    pub fn clear(&mut self) {
        self.heap.clear();
        self.heap.shrink_to(1024);
    }

    /// Bytes held (for the log line of a listing).
    pub fn bytes(&self) -> usize {
        self.heap.capacity() * std::mem::size_of::<Reverse<(u64, Id)>>()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_pack_and_unpack() {
        for s in [
            "6935A2F10ABCD1F",
            "0000000000000000000000000000000000000009",
            "ABCDEF0123456789A",
        ] {
            assert_eq!(Id::new(s).unwrap().as_string(), s);
        }
        assert!(Id::new("abc").is_none());
        assert!(Id::new("").is_none());
        assert!(Id::new(&"A".repeat(41)).is_none());
        assert_eq!(std::mem::size_of::<Reverse<(u64, Id)>>(), 32);
    }

    #[test]
    fn due_in_retry_time_order() {
        let mut ix = Index::new();
        ix.push(300, "3000000000000000");
        ix.push(100, "1000000000000000");
        ix.push(200, "2000000000000000");
        ix.push(100, "1000000000000001");
        assert_eq!(ix.next_due(), Some(100));
        assert_eq!(ix.pop_due(50), None);
        assert_eq!(ix.pop_due(150).as_deref(), Some("1000000000000000"));
        assert_eq!(ix.pop_due(150).as_deref(), Some("1000000000000001"));
        assert_eq!(ix.pop_due(150), None);
        assert_eq!(ix.len(), 2);
        assert_eq!(ix.pop_due(1000).as_deref(), Some("2000000000000000"));
        assert_eq!(ix.pop_due(1000).as_deref(), Some("3000000000000000"));
        assert!(ix.is_empty());
        assert_eq!(ix.next_due(), None);
    }

    #[test]
    fn a_million_entries_stay_small_and_come_out_in_order() {
        // 1,000,000 IDs as the queue makes them (time, microseconds,
        // inode), retry times spread over a day, in random order.
        let mut ix = Index::new();
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
        for i in 0..1_000_000u64 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let id = postern_common::queue::make_id(
                std::time::UNIX_EPOCH + std::time::Duration::from_micros(1_765_000_000_000_000 + i),
                1_000_000 + i,
            );
            ix.push(1_000 + x % 86_400, &id);
        }
        assert_eq!(ix.len(), 1_000_000);
        // 32 bytes an entry; the vector at most doubled.
        assert!(ix.bytes() <= 2 * 32 * 1_048_576, "{} bytes", ix.bytes());
        // What is due after an hour comes out in order, and nothing else.
        let mut last = 0;
        let mut n = 0;
        while ix.next_due().is_some_and(|t| t <= 1_000 + 3_600) {
            let t = ix.next_due().unwrap();
            assert!(t >= last);
            last = t;
            assert!(ix.pop_due(1_000 + 3_600).is_some());
            n += 1;
        }
        assert!((40_000..=44_000).contains(&n), "{n} due in the first hour");
        assert_eq!(ix.pop_due(1_000 + 3_600), None);
        assert_eq!(ix.len(), 1_000_000 - n);
    }
}
