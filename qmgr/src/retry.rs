//! When to try a deferred message again, and when to give up on it.
//!
//! As Postfix: the next attempt comes after the message's age in the
//! queue, bounded below by `minimal_backoff_time` and above by
//! `maximal_backoff_time` (the lower bound wins if they cross), so that
//! retries spread out as a message gets older. A message whose age
//! reaches `maximal_queue_lifetime` (`bounce_queue_lifetime` for the null
//! sender) is returned to its sender.

use postern_common::warning;
use postern_conf::Config;

/// The retry parameters, read once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Policy {
    pub min_backoff: u64,
    pub max_backoff: u64,
    pub max_lifetime: u64,
    pub bounce_lifetime: u64,
}

fn time_param(cfg: &Config, name: &str, fallback: u64) -> u64 {
    cfg.get_time(name).unwrap_or_else(|e| {
        warning!("{e}; using {fallback}s");
        fallback
    })
}

impl Policy {
    pub fn from_config(cfg: &Config) -> Policy {
        Policy {
            min_backoff: time_param(cfg, "minimal_backoff_time", 300),
            max_backoff: time_param(cfg, "maximal_backoff_time", 4000),
            max_lifetime: time_param(cfg, "maximal_queue_lifetime", 5 * 86400),
            bounce_lifetime: time_param(cfg, "bounce_queue_lifetime", 5 * 86400),
        }
    }

    /// Seconds to wait before the next attempt for a message that arrived
    /// at `arrival` (seconds since the epoch; 0 = unknown).
    pub fn backoff(&self, now: u64, arrival: u64) -> u64 {
        if arrival == 0 {
            return self.min_backoff;
        }
        now.saturating_sub(arrival)
            .min(self.max_backoff)
            .max(self.min_backoff)
    }

    /// Whether a message has been queued too long to try again.
    pub fn expired(&self, now: u64, arrival: u64, null_sender: bool) -> bool {
        let lifetime = if null_sender {
            self.bounce_lifetime
        } else {
            self.max_lifetime
        };
        now >= arrival.saturating_add(lifetime)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn policy(text: &str) -> Policy {
        Policy::from_config(
            &Config::from_text(Path::new("/nonexistent"), text, Path::new("main.cf")).unwrap(),
        )
    }

    #[test]
    fn backoff_is_the_age_clamped() {
        let p = policy("");
        assert_eq!(p.backoff(1000, 990), 300);
        assert_eq!(p.backoff(10_000, 8_000), 2000);
        assert_eq!(p.backoff(100_000, 1), 4000);
        assert_eq!(p.backoff(100, 200), 300, "clock went back");
        assert_eq!(p.backoff(100, 0), 300, "unknown arrival");
        let p = policy("minimal_backoff_time = 2s\nmaximal_backoff_time = 4s\n");
        assert_eq!(p.backoff(1000, 999), 2);
        assert_eq!(p.backoff(1000, 997), 3);
        assert_eq!(p.backoff(1000, 900), 4);
        let p = policy("minimal_backoff_time = 1h\nmaximal_backoff_time = 10m\n");
        assert_eq!(p.backoff(1000, 1), 3600, "the lower bound wins");
    }

    #[test]
    fn expiry() {
        let p = policy("maximal_queue_lifetime = 1d\nbounce_queue_lifetime = 1h\n");
        assert!(!p.expired(1000 + 3599, 1000, true));
        assert!(p.expired(1000 + 3600, 1000, true));
        assert!(!p.expired(1000 + 3600, 1000, false));
        assert!(p.expired(1000 + 86400, 1000, false));
        let p = policy("maximal_queue_lifetime = 0\n");
        assert!(p.expired(5, 5, false), "0 = one attempt only");
    }
}
