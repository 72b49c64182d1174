//! The allowlist cache (`postscreen_cache_map`): for each client address,
//! until when each test it passed counts as passed. A client whose every
//! enabled test is still passed is let through at once (`PASS OLD`).
//!
//! Postern keeps it as a text file at the map's path (the `btree:` or
//! `lmdb:` type is not used): one line per client, `address TAB
//! pregreet;dnsbl;pipelining;non_smtp_command;bare_newline` (expiry
//! times, seconds since the epoch, in Postfix's order; 0 = not passed). It is opened at start, as root and before the chroot (it is
//! in `data_directory`), and rewritten through that descriptor after
//! each change. Every `postscreen_cache_cleanup_interval` (0: never), at
//! the first change after it has passed, the entries expired longer than
//! `postscreen_cache_retention_time` are dropped and the count logged as
//! Postfix logs its cleanup.

use postern_common::cache_file::CacheFile;
use std::collections::HashMap;
use std::net::IpAddr;
use std::path::PathBuf;

/// The tests with an expiry in the cache.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Expiry {
    pub pregreet: u64,
    pub dnsbl: u64,
    pub pipelining: u64,
    pub non_smtp_command: u64,
    pub bare_newline: u64,
}

impl Expiry {
    fn latest(&self) -> u64 {
        [
            self.pregreet,
            self.dnsbl,
            self.pipelining,
            self.non_smtp_command,
            self.bare_newline,
        ]
        .into_iter()
        .max()
        .unwrap_or(0)
    }
}

pub struct Cache {
    file: Option<CacheFile>,
    /// The map's name for the log (`postscreen_cache_map`).
    name: String,
    retention: u64,
    cleanup_interval: u64,
    /// When the next cleanup is due (0 with no cleanup).
    next_cleanup: u64,
    entries: HashMap<IpAddr, Expiry>,
}

pub fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl Cache {
    /// Opens (creating) the cache file; without one (no map, or it
    /// cannot be opened: logged) nothing is remembered.
    pub fn open(path: Option<PathBuf>, name: &str, retention: u64, cleanup_interval: u64) -> Cache {
        let name = name.to_string();
        let mut entries = HashMap::new();
        let (file, text) = CacheFile::open(path.as_deref(), "postscreen_cache_map");
        for line in text.lines() {
            let Some((addr, times)) = line.split_once('\t') else {
                continue;
            };
            let mut t = times
                .split(';')
                .map(|x| x.trim().parse::<u64>().unwrap_or(0));
            if let Ok(ip) = addr.parse() {
                entries.insert(
                    ip,
                    Expiry {
                        pregreet: t.next().unwrap_or(0),
                        dnsbl: t.next().unwrap_or(0),
                        pipelining: t.next().unwrap_or(0),
                        non_smtp_command: t.next().unwrap_or(0),
                        bare_newline: t.next().unwrap_or(0),
                    },
                );
            }
        }
        Cache {
            file,
            name,
            retention,
            cleanup_interval,
            next_cleanup: if cleanup_interval > 0 {
                now() + cleanup_interval
            } else {
                0
            },
            entries,
        }
    }

    pub fn get(&self, ip: IpAddr) -> Option<Expiry> {
        self.entries.get(&ip).copied()
    }

    pub fn put(&mut self, ip: IpAddr, e: Expiry) {
        self.entries.insert(ip, e);
        self.save(now());
    }

    fn save(&mut self, now: u64) {
        let Some(f) = self.file.as_mut() else {
            return;
        };
        if self.next_cleanup > 0 && now >= self.next_cleanup {
            let horizon = now.saturating_sub(self.retention);
            let before = self.entries.len();
            self.entries.retain(|_, e| e.latest() >= horizon);
            postern_common::info!(
                "cache {} full cleanup: retained={} dropped={} entries",
                self.name,
                self.entries.len(),
                before - self.entries.len()
            );
            self.next_cleanup = now + self.cleanup_interval;
        }
        let mut text = String::new();
        for (ip, e) in &self.entries {
            text.push_str(&format!(
                "{ip}\t{};{};{};{};{}\n",
                e.pregreet, e.dnsbl, e.pipelining, e.non_smtp_command, e.bare_newline
            ));
        }
        f.rewrite(&text);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn survives_a_restart_and_forgets_what_is_long_expired() {
        let dir = std::env::temp_dir().join(format!("ps-cache-{}", std::process::id()));
        let _ = std::fs::remove_file(&dir);
        let t = now();
        {
            let mut c = Cache::open(Some(dir.clone()), "btree:x", 3600, 600);
            let fresh = Expiry {
                pregreet: t + 100,
                dnsbl: t + 50,
                ..Default::default()
            };
            c.put("192.0.2.1".parse().unwrap(), fresh);
            let stale = Expiry {
                pregreet: t - 7200,
                ..Default::default()
            };
            c.put("192.0.2.2".parse().unwrap(), stale);
            // Not yet: the cleanup interval has not passed.
            assert_eq!(c.get("192.0.2.2".parse().unwrap()), Some(stale));
            c.save(t + 600);
        }
        let c = Cache::open(Some(dir.clone()), "btree:x", 3600, 600);
        assert_eq!(c.get("192.0.2.1".parse().unwrap()).unwrap().dnsbl, t + 50);
        assert_eq!(c.get("192.0.2.2".parse().unwrap()), None);
        // postscreen_cache_cleanup_interval = 0: never cleaned.
        let mut c = Cache::open(Some(dir.clone()), "btree:x", 3600, 0);
        let stale = Expiry {
            pregreet: t - 7200,
            ..Default::default()
        };
        c.put("192.0.2.3".parse().unwrap(), stale);
        c.save(t + 100_000);
        assert_eq!(c.get("192.0.2.3".parse().unwrap()), Some(stale));
        let _ = std::fs::remove_file(&dir);
    }
}
