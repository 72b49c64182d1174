//! The allowlist cache (`postscreen_cache_map`): for each client address,
//! until when each test it passed counts as passed. A client whose every
//! enabled test is still passed is let through at once (`PASS OLD`).
//!
//! Postern keeps it as a text file at the map's path (the `btree:` or
//! `lmdb:` type is not used): one line per client, `address TAB
//! pregreet;dnsbl;pipelining;non_smtp_command;bare_newline` (expiry
//! times, seconds since the epoch, in Postfix's order; 0 = not passed). It is opened at start, as root and before the chroot (it is
//! in `data_directory`), and rewritten through that descriptor after
//! each change; entries expired longer than
//! `postscreen_cache_retention_time` are dropped then.

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
    retention: u64,
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
    pub fn open(path: Option<PathBuf>, retention: u64) -> Cache {
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
            retention,
            entries,
        }
    }

    pub fn get(&self, ip: IpAddr) -> Option<Expiry> {
        self.entries.get(&ip).copied()
    }

    pub fn put(&mut self, ip: IpAddr, e: Expiry) {
        self.entries.insert(ip, e);
        self.save();
    }

    fn save(&mut self) {
        let Some(f) = self.file.as_mut() else {
            return;
        };
        let horizon = now().saturating_sub(self.retention);
        self.entries.retain(|_, e| e.latest() >= horizon);
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
            let mut c = Cache::open(Some(dir.clone()), 3600);
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
        }
        let c = Cache::open(Some(dir.clone()), 3600);
        assert_eq!(c.get("192.0.2.1".parse().unwrap()).unwrap().dnsbl, t + 50);
        assert_eq!(c.get("192.0.2.2".parse().unwrap()), None);
        let _ = std::fs::remove_file(&dir);
    }
}
