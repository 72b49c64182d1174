//! Noticing that a lookup table's file changed under a running daemon.
//!
//! A daemon reads its tables as root, before it drops to `mail_owner`
//! (see [`crate::service`]): a `sasl_passwd` or an access table may be
//! readable by root only, and a chrooted daemon cannot see the file at
//! all. Such a daemon cannot read a table again after a `postmap`. As
//! Postfix's daemons do, it notices the change ([`changed`]), finishes
//! what it has in hand and exits, and master starts a fresh process, which
//! reads the new file as root. A daemon that reopens its tables itself
//! (qmgr's `transport_maps`) asks only whether that failed ([`stale`]).
//!
//! A file that did not exist (a table never built) is remembered by name:
//! its appearance is a change too.
//!
//! Each file [`crate::maps::Table::open`] reads is remembered with an open
//! descriptor: `fstat` on it tells that the file was rewritten in place
//! (mtime or size) or replaced by a rename (no link left), in a chroot and
//! without the right to open it, at no cost but one descriptor per file.

use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// A table file as it was when read.
struct Watched {
    file: File,
    mtime: (i64, i64),
    size: u64,
}

/// Every table file this process read, by path; a table read again
/// replaces its entry.
static WATCHED: Mutex<Option<HashMap<PathBuf, Watched>>> = Mutex::new(None);

/// Table files that did not exist when this process wanted them (a
/// `hash:` table never built): the table stands in as one whose lookups
/// fail, and the file appearing (`postmap`) is a change.
static MISSING: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());

/// When [`changed`] last looked, and what it found: it looks at most
/// once a second.
type LastLook = Mutex<Option<(Instant, Option<PathBuf>)>>;
static LAST_CHANGED: LastLook = Mutex::new(None);

/// How often [`changed`] looks at the files.
const LOOK_INTERVAL: Duration = Duration::from_secs(1);

/// Opens `path` to watch it: called just before the table is read, so a
/// file replaced between the two is seen as changed (a restart too many,
/// never a change missed). A file that cannot be opened is not watched
/// (the table's own open fails and says why).
pub fn watch(path: &Path) {
    let Some(entry) = Watched::open(path) else {
        if !path.exists() {
            let mut m = MISSING.lock().unwrap_or_else(|e| e.into_inner());
            if !m.iter().any(|p| p == path) {
                m.push(path.to_path_buf());
            }
        }
        return;
    };
    let mut w = WATCHED.lock().unwrap_or_else(|e| e.into_inner());
    w.get_or_insert_with(HashMap::new)
        .insert(path.to_path_buf(), entry);
}

impl Watched {
    fn open(path: &Path) -> Option<Watched> {
        let file = File::open(path).ok()?;
        let meta = file.metadata().ok()?;
        Some(Watched {
            mtime: (meta.mtime(), meta.mtime_nsec()),
            size: meta.len(),
            file,
        })
    }
}

fn has_changed(w: &Watched) -> bool {
    match w.file.metadata() {
        Ok(m) => m.nlink() == 0 || (m.mtime(), m.mtime_nsec()) != w.mtime || m.len() != w.size,
        Err(_) => true,
    }
}

/// A table file that changed since this process read it, if any. Looks
/// at most once a second (and answers as last time in between).
pub fn changed() -> Option<PathBuf> {
    let mut last = LAST_CHANGED.lock().unwrap_or_else(|e| e.into_inner());
    if let Some((at, answer)) = &*last {
        if at.elapsed() < LOOK_INTERVAL {
            return answer.clone();
        }
    }
    let answer = {
        let w = WATCHED.lock().unwrap_or_else(|e| e.into_inner());
        w.as_ref()
            .and_then(|m| {
                m.iter()
                    .find(|(_, w)| has_changed(w))
                    .map(|(p, _)| p.clone())
            })
            .or_else(appeared)
    };
    *last = Some((Instant::now(), answer.clone()));
    answer
}

/// A table file that was missing and now exists.
fn appeared() -> Option<PathBuf> {
    let m = MISSING.lock().unwrap_or_else(|e| e.into_inner());
    m.iter().find(|p| p.exists()).cloned()
}

/// A table file that changed and that this process cannot read again:
/// it may no longer open it (a file readable by root only, or out of
/// sight in a chroot). A daemon that reopens changed tables itself
/// restarts for these. Looks every time (an fstat per file): a daemon
/// that has just failed to reopen a table must not go on with what it
/// has left of it.
///
/// A file that was missing and has appeared counts too: what a process
/// opened without it (a domain list, a surrogate table) is opened again
/// by a fresh process.
pub fn stale() -> Option<PathBuf> {
    let w = WATCHED.lock().unwrap_or_else(|e| e.into_inner());
    w.as_ref()
        .and_then(|m| {
            m.iter()
                .find(|(p, w)| has_changed(w) && File::open(p).is_err())
                .map(|(p, _)| p.clone())
        })
        .or_else(appeared)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_file_that_appears_is_a_change() {
        let dir = std::env::temp_dir().join(format!("ptwatch-m-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("later.db");
        watch(&f);
        // (Other tests' files may have appeared: this one's is asked for.)
        let seen = || MISSING.lock().unwrap().contains(&f) && f.exists();
        assert!(!seen() && appeared() != Some(f.clone()));
        std::fs::write(&f, "x").unwrap();
        assert!(seen() && appeared().is_some());
        assert!(stale().is_some());
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_rewrite_or_a_replacement_is_a_change() {
        let dir = std::env::temp_dir().join(format!("ptwatch-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let a = dir.join("a");
        let b = dir.join("b");
        std::fs::write(&a, "k v\n").unwrap();
        std::fs::write(&b, "k v\n").unwrap();
        let wa = Watched::open(&a).unwrap();
        let wb = Watched::open(&b).unwrap();
        assert!(!has_changed(&wa) && !has_changed(&wb));
        // Replaced by a rename, as postmap does.
        let tmp = dir.join("b.tmp");
        std::fs::write(&tmp, "k w\n").unwrap();
        std::fs::rename(&tmp, &b).unwrap();
        assert!(has_changed(&wb));
        assert!(!has_changed(&Watched::open(&b).unwrap()));
        // Rewritten in place, longer.
        std::fs::write(&a, "k v\nl w\n").unwrap();
        assert!(has_changed(&wa));
        // Through the process's list: changed, but readable again (not
        // stale) until it is gone.
        watch(&b);
        std::fs::write(&tmp, "k x\n").unwrap();
        std::fs::rename(&tmp, &b).unwrap();
        *LAST_CHANGED.lock().unwrap() = None;
        let changed_b = || {
            let w = WATCHED.lock().unwrap();
            has_changed(&w.as_ref().unwrap()[&b])
        };
        assert!(changed_b());
        assert!(changed().is_some());
        assert_ne!(stale(), Some(b.clone()));
        std::fs::remove_file(&b).unwrap();
        let stale_now = {
            let w = WATCHED.lock().unwrap();
            let w = &w.as_ref().unwrap()[&b];
            has_changed(w) && File::open(&b).is_err()
        };
        assert!(stale_now);
        std::fs::remove_dir_all(dir).unwrap();
    }
}
