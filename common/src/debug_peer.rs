//! `debug_peer_list` and `debug_peer_level`, as Postfix's debug_peer: a
//! session with a peer in the list (smtpd: the client, by name or
//! address; smtp and lmtp: the next-hop destination, then each server by
//! name or address) logs as if its program had `debug_peer_level` more
//! `-v` flags, and only that session: the verbosity goes back when it
//! ends ([`crate::log::raise_verbosity`]). The list is a match list
//! ([`crate::match_list`], `Kind::NameAddress`, with
//! `parent_domain_matches_subdomains`); a table that cannot answer is
//! logged and taken for "no match" (only log lines depend on it).

use crate::log::{raise_verbosity, VerbosityGuard};
use crate::match_list::{Kind, MatchList};
use postern_conf::Config;
use std::net::IpAddr;

/// The list and level of one process.
#[derive(Debug, Clone, Default)]
pub struct DebugPeer {
    list: MatchList,
    level: u32,
}

impl DebugPeer {
    /// `debug_peer_list` and `debug_peer_level` of `cfg` (a level that is
    /// not a number above 0 is an error, as Postfix's fatal one).
    pub fn from_config(cfg: &Config) -> Result<DebugPeer, String> {
        let list = MatchList::from_config(cfg, "debug_peer_list", Kind::NameAddress)?;
        let level = cfg.get("debug_peer_level");
        let level = match level.trim().parse::<u32>() {
            Ok(n) if n > 0 => n,
            _ => {
                return Err(format!(
                    "debug_peer_level = {level}: expected a number above 0"
                ))
            }
        };
        Ok(DebugPeer { list, level })
    }

    /// The verbosity to add for the peer `name` (`unknown` or "" without
    /// one) with address `addr` (None: a destination not yet resolved):
    /// `debug_peer_level` when it is listed, else 0.
    pub fn level_for(&self, name: &str, addr: Option<IpAddr>) -> u32 {
        if self.list.is_empty() {
            return 0;
        }
        let found = match addr {
            Some(ip) => self.list.matches_client(name, ip),
            None => self.list.matches_name(name),
        };
        match found {
            Ok(true) => self.level,
            Ok(false) => 0,
            Err(e) => {
                crate::warning!("debug_peer_list: {}: {}", e.table, e.reason);
                0
            }
        }
    }

    /// Raises this thread's verbosity when the peer is listed
    /// ([`DebugPeer::level_for`]), until the guard is dropped.
    pub fn check(&self, name: &str, addr: Option<IpAddr>) -> VerbosityGuard {
        raise_verbosity(self.level_for(name, addr))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(list: &str, level: &str) -> Config {
        Config::from_text(
            std::path::Path::new("/nonexistent"),
            &format!("debug_peer_list = {list}\ndebug_peer_level = {level}\n"),
            std::path::Path::new("main.cf"),
        )
        .unwrap()
    }

    #[test]
    fn listed_peers_raise_this_thread_only_until_the_guard_goes() {
        let d = DebugPeer::from_config(&cfg("!10.0.0.9, 10.0.0.0/8, example.com", "2")).unwrap();
        let ip = |s: &str| Some(s.parse().unwrap());
        assert_eq!(d.level_for("unknown", ip("10.1.2.3")), 2);
        assert_eq!(d.level_for("unknown", ip("10.0.0.9")), 0);
        assert_eq!(d.level_for("mx.example.com", ip("192.0.2.1")), 2);
        assert_eq!(d.level_for("example.org", None), 0);
        assert!(!crate::log::verbose());
        {
            let g = d.check("unknown", ip("10.1.2.3"));
            assert!(g.raised() && crate::log::verbose());
            // A second raise while one is in force does nothing.
            let inner = d.check("mx.example.com", ip("192.0.2.1"));
            assert!(!inner.raised());
            drop(inner);
            assert!(crate::log::verbose());
            assert!(!std::thread::spawn(crate::log::verbose).join().unwrap());
        }
        assert!(!crate::log::verbose());
        assert!(DebugPeer::from_config(&cfg("", "0")).is_err());
    }
}
