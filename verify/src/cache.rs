//! The address status cache, with Postfix verify(8)'s rules: an entry is
//! `status, probed, updated, text`; a query of an unknown, malformed or
//! expired entry answers "Address verification in progress" (TODO); a
//! probe goes out when the entry is due for a refresh and no probe is
//! outstanding (one is taken as lost after [`PROBE_TTL`] seconds); a
//! failed probe never overwrites a deliverable entry before it expires.
//!
//! The file: one line per address, `address TAB status TAB probed TAB
//! updated TAB text`, rewritten whole after each change through the
//! descriptor opened at start.

use postern_common::cache_file::CacheFile;
use postern_common::verify::Status;
use std::collections::HashMap;
use std::path::PathBuf;

/// Seconds after which an outstanding probe is taken as lost.
pub const PROBE_TTL: u64 = 1000;

/// The time parameters, in seconds.
#[derive(Debug, Clone, Copy)]
pub struct Policy {
    pub positive_expire: u64,
    pub positive_refresh: u64,
    pub negative_cache: bool,
    pub negative_expire: u64,
    pub negative_refresh: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Entry {
    status: Status,
    probed: u64,
    updated: u64,
    text: String,
}

/// The answer to a query, and whether a probe must go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    pub status: Status,
    pub reason: String,
    pub probe: bool,
}

pub struct Cache {
    file: Option<CacheFile>,
    policy: Policy,
    entries: HashMap<String, Entry>,
}

/// Addresses are keyed case-folded.
fn key(address: &str) -> String {
    address.to_lowercase()
}

impl Cache {
    /// Opens (creating) the cache file; without one (no map, or it cannot
    /// be opened: logged) the cache lives in memory only.
    pub fn open(path: Option<PathBuf>, policy: Policy) -> Cache {
        let mut entries = HashMap::new();
        let (file, text) = CacheFile::open(path.as_deref(), "address_verify_map");
        for line in text.lines() {
            let mut p = line.splitn(5, '\t');
            let (Some(a), Some(s), Some(pr), Some(up), Some(t)) =
                (p.next(), p.next(), p.next(), p.next(), p.next())
            else {
                continue;
            };
            let (Some(status), Ok(probed), Ok(updated)) =
                (Status::from_name(s), pr.parse(), up.parse())
            else {
                continue;
            };
            entries.insert(
                key(a),
                Entry {
                    status,
                    probed,
                    updated,
                    text: t.to_string(),
                },
            );
        }
        Cache {
            file,
            policy,
            entries,
        }
    }

    fn expired(&self, e: &Entry, now: u64) -> bool {
        if e.status == Status::Ok {
            e.updated + self.policy.positive_expire < now
        } else {
            e.updated + self.policy.negative_expire < now
        }
    }

    fn refresh_due(&self, status: Status, updated: u64, now: u64) -> bool {
        if status == Status::Ok {
            updated + self.policy.positive_refresh < now
        } else {
            updated + self.policy.negative_refresh < now
        }
    }

    /// What is known of `address` (Postfix's `verify_query_service`).
    pub fn query(&mut self, address: &str, now: u64) -> Answer {
        let k = key(address);
        let found = self.entries.get(&k).cloned();
        let usable = found.as_ref().filter(|e| {
            // An entry without a probe result or a probe in flight is
            // malformed; an expired one counts once no probe is out.
            let malformed = e.status == Status::Todo && e.probed == 0 && e.updated == 0
                || (e.status != Status::Todo && e.updated == 0);
            let lost_and_expired = now.saturating_sub(e.probed) > PROBE_TTL && self.expired(e, now);
            !(malformed || lost_and_expired)
        });
        let (status, probed, updated, reason) = match usable {
            Some(e) => (e.status, e.probed, e.updated, e.text.clone()),
            None => {
                if found.is_some() && !self.policy.negative_cache {
                    self.entries.remove(&k);
                    self.save();
                }
                (
                    Status::Todo,
                    0,
                    0,
                    "Address verification in progress".to_string(),
                )
            }
        };
        let probe =
            now.saturating_sub(probed) > PROBE_TTL && self.refresh_due(status, updated, now);
        Answer {
            status,
            reason,
            probe,
        }
    }

    /// A probe for `address` went out at `now`: recorded so that no second
    /// one goes while it is outstanding (an address never seen is recorded
    /// only with negative caching, as Postfix).
    pub fn probed(&mut self, address: &str, now: u64) {
        let k = key(address);
        match self.entries.get_mut(&k) {
            Some(e) if e.updated != 0 || self.policy.negative_cache => e.probed = now,
            Some(_) => {}
            None if self.policy.negative_cache => {
                self.entries.insert(
                    k,
                    Entry {
                        status: Status::Todo,
                        probed: now,
                        updated: 0,
                        text: "Address verification in progress".into(),
                    },
                );
            }
            None => return,
        }
        self.save();
    }

    /// A probe's result (Postfix's `verify_update_service`): a failure
    /// does not replace a deliverable entry; without negative caching a
    /// failure is not kept.
    pub fn update(&mut self, address: &str, status: Status, text: &str, now: u64) {
        let k = key(address);
        if status != Status::Ok {
            if !self.policy.negative_cache {
                return;
            }
            if self
                .entries
                .get(&k)
                .is_some_and(|e| e.status == Status::Ok && !self.expired(e, now))
            {
                return;
            }
        }
        let text: String = text
            .chars()
            .map(|c| if c.is_control() { '?' } else { c })
            .collect();
        self.entries.insert(
            k,
            Entry {
                status,
                probed: 0,
                updated: now,
                text,
            },
        );
        self.save();
    }

    /// Drops expired entries (`address_verify_cache_cleanup_interval`).
    pub fn cleanup(&mut self, now: u64) {
        let before = self.entries.len();
        let keep: HashMap<String, Entry> = self
            .entries
            .drain()
            .filter(|(_, e)| {
                e.status == Status::Todo
                    || e.updated + self.policy.positive_expire.max(self.policy.negative_expire)
                        >= now
            })
            .collect();
        self.entries = keep;
        if self.entries.len() != before {
            self.save();
        }
    }

    fn save(&mut self) {
        let Some(f) = self.file.as_mut() else {
            return;
        };
        let mut text = String::new();
        for (a, e) in &self.entries {
            text.push_str(&format!(
                "{a}\t{}\t{}\t{}\t{}\n",
                e.status.name(),
                e.probed,
                e.updated,
                e.text.replace(['\t', '\n'], " ")
            ));
        }
        f.rewrite(&text);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> Policy {
        Policy {
            positive_expire: 100,
            positive_refresh: 50,
            negative_cache: true,
            negative_expire: 30,
            negative_refresh: 10,
        }
    }

    #[test]
    fn unknown_then_probed_then_answered_and_kept_across_a_restart() {
        let path =
            std::env::temp_dir().join(format!("postern-verify-cache-{}", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let mut c = Cache::open(Some(path.clone()), policy());
        let t = 10_000;
        let a = c.query("U@b.test", t);
        assert_eq!(a.status, Status::Todo);
        assert!(a.probe);
        c.probed("u@b.test", t);
        // Outstanding probe: no second one.
        let a = c.query("u@b.test", t + 1);
        assert_eq!(a.status, Status::Todo);
        assert!(!a.probe);
        c.update("u@b.test", Status::Bounce, "550 5.1.1 unknown", t + 2);
        let a = c.query("u@b.test", t + 3);
        assert_eq!(
            (a.status, a.reason.as_str(), a.probe),
            (Status::Bounce, "550 5.1.1 unknown", false)
        );
        drop(c);
        let mut c = Cache::open(Some(path.clone()), policy());
        assert_eq!(c.query("u@b.test", t + 4).status, Status::Bounce);
        // Due for a refresh: the old answer, and a probe.
        let a = c.query("u@b.test", t + 2 + 11);
        assert_eq!((a.status, a.probe), (Status::Bounce, true));
        // Expired (no probe out): in progress again.
        assert_eq!(c.query("u@b.test", t + 2 + 31).status, Status::Todo);
        let _ = std::fs::remove_file(&path);
    }

    #[test]
    fn a_failed_probe_does_not_replace_a_deliverable_address() {
        let mut c = Cache::open(None, policy());
        c.update("a@b.test", Status::Ok, "250 2.1.5 Ok", 1000);
        c.update("a@b.test", Status::Defer, "451 try later", 1001);
        assert_eq!(c.query("a@b.test", 1002).status, Status::Ok);
    }

    #[test]
    fn without_negative_caching_failures_are_not_kept() {
        let mut c = Cache::open(
            None,
            Policy {
                negative_cache: false,
                ..policy()
            },
        );
        c.update("a@b.test", Status::Bounce, "550", 1000);
        assert_eq!(c.query("a@b.test", 1001).status, Status::Todo);
    }
}
