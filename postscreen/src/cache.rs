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

use std::collections::HashMap;
use std::fs::File;
use std::io::{Read, Seek, Write};
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
    path: Option<PathBuf>,
    file: Option<File>,
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
        let mut file = path.as_ref().and_then(|p| {
            std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(p)
                .map_err(|e| postern_common::warning!("postscreen_cache_map {}: {e}", p.display()))
                .ok()
        });
        let mut text = String::new();
        if let Some(f) = file.as_mut() {
            let _ = f.read_to_string(&mut text);
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
        }
        Cache {
            path,
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
        if let Err(err) = self.save() {
            postern_common::warning!(
                "postscreen_cache_map {}: {err}",
                self.path
                    .as_ref()
                    .map(|f| f.display().to_string())
                    .unwrap_or_default()
            );
        }
    }

    fn save(&mut self) -> std::io::Result<()> {
        let Some(f) = self.file.as_mut() else {
            return Ok(());
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
        f.rewind()?;
        f.write_all(text.as_bytes())?;
        f.set_len(text.len() as u64)
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
