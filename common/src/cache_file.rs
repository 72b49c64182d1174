//! The text file behind a cache map (`postscreen_cache_map`,
//! `address_verify_map`). Postern does not use Postfix's `btree:` or
//! `lmdb:` for these: each cache is one line per entry in a text file at
//! the map's path, read whole when the daemon starts (as root, before any
//! chroot: the file is in `data_directory`) and rewritten in place
//! through the same descriptor after each change. The line format is the
//! cache's own; this module only opens, reads and rewrites.

use std::fs::File;
use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};

pub struct CacheFile {
    path: PathBuf,
    file: File,
    /// The parameter that names the file, for log lines.
    param: &'static str,
}

impl CacheFile {
    /// Opens (creating) the file at `path` and reads it: the file and its
    /// text. Without a path, or when it cannot be opened (logged with
    /// `param`), there is no file and the cache lives in memory only.
    pub fn open(path: Option<&Path>, param: &'static str) -> (Option<CacheFile>, String) {
        let Some(path) = path else {
            return (None, String::new());
        };
        let opened = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path);
        let mut file = match opened {
            Ok(f) => f,
            Err(e) => {
                crate::warning!("{param} {}: {e}", path.display());
                return (None, String::new());
            }
        };
        let mut text = String::new();
        if let Err(e) = file.read_to_string(&mut text) {
            crate::warning!("{param} {}: {e}", path.display());
            text.clear();
        }
        let cache = CacheFile {
            path: path.to_path_buf(),
            file,
            param,
        };
        (Some(cache), text)
    }

    /// Replaces the file's contents with `text`; a failure is logged (the
    /// cache goes on in memory).
    pub fn rewrite(&mut self, text: &str) {
        let f = &mut self.file;
        let r = f
            .rewind()
            .and_then(|_| f.write_all(text.as_bytes()))
            .and_then(|_| f.set_len(text.len() as u64));
        if let Err(e) = r {
            crate::warning!("{} {}: {e}", self.param, self.path.display());
        }
    }
}
