//! Pools of transports: `randmap:{a, b, c}` (Postfix 3.0: every lookup
//! answers one member at random; a member written twice is chosen twice
//! as often) and `weighted:{a=3, b=1}` (Postern: every lookup answers
//! the next member of a smooth weighted round-robin, so that `a` gets
//! exactly 3 of every 4 lookups, spread out: a a b a, not a a a b).
//!
//! As a table (`sender_dependent_default_transport_maps = randmap:{...}`,
//! `sender_dependent_relayhost_maps = randmap:{[h1], [h2]}`) the key is
//! not looked at. Where a transport is chosen, qmgr keeps the whole pool
//! instead ([`Pool`]; `common::resolve` hands the spec on): it picks the
//! member per message, and can skip members that may not send to a site
//! now (a suspended source, a warm-up quota that is used up).
//!
//! One definition of the syntax ([`Pool::parse`], [`is_pool_spec`]) for
//! the tables, the resolver and qmgr.

use super::{Dict, LookupError};
use std::sync::Mutex;

/// Whether `spec` is a pool: `randmap:{...}` or `weighted:{...}`.
pub fn is_pool_spec(spec: &str) -> bool {
    let s = spec.trim();
    (s.starts_with("randmap:{") || s.starts_with("weighted:{")) && s.ends_with('}')
}

/// Splits `POOL:nexthop` (a pool spec followed by an optional next hop)
/// at the colon after the closing brace. None when `v` is no pool.
pub fn split_pool_value(v: &str) -> Option<(String, String)> {
    let v = v.trim();
    if !(v.starts_with("randmap:{") || v.starts_with("weighted:{")) {
        return None;
    }
    let close = v.find('}')?;
    let (pool, rest) = v.split_at(close + 1);
    let nexthop = rest.strip_prefix(':').unwrap_or(rest).trim();
    Some((pool.trim().to_string(), nexthop.to_string()))
}

/// A parsed pool, with its round-robin (or random) state.
#[derive(Debug)]
pub struct Pool {
    /// As written (`weighted:{a=3,b=1}`): the pool's name in logs and
    /// accounting records.
    pub spec: String,
    /// (member, weight), in the order written; a repeated member of a
    /// `randmap:` adds to its weight.
    pub members: Vec<(String, u32)>,
    random: bool,
    state: Mutex<State>,
}

#[derive(Debug)]
struct State {
    /// Smooth weighted round-robin: each member's current value.
    current: Vec<i64>,
    /// xorshift state for `randmap:`.
    seed: u64,
}

impl Pool {
    /// `randmap:{a, b, a}` or `weighted:{a=3, b=1}` (a member without
    /// `=N` weighs 1; members are separated by commas or white space).
    pub fn parse(spec: &str) -> Result<Pool, String> {
        let spec = spec.trim();
        let (kind, rest) = spec
            .split_once(':')
            .ok_or_else(|| format!("\"{spec}\": expected randmap:{{...}} or weighted:{{...}}"))?;
        let random = match kind {
            "randmap" => true,
            "weighted" => false,
            _ => {
                return Err(format!(
                    "\"{spec}\": expected randmap:{{...}} or weighted:{{...}}"
                ))
            }
        };
        let inner = rest
            .trim()
            .strip_prefix('{')
            .and_then(|r| r.strip_suffix('}'))
            .ok_or_else(|| format!("\"{spec}\": the members must be in braces"))?;
        let mut members: Vec<(String, u32)> = Vec::new();
        for item in inner
            .split(|c: char| c == ',' || c.is_whitespace())
            .filter(|s| !s.is_empty())
        {
            let (name, weight) = match item.split_once('=') {
                Some((n, w)) if !random => {
                    let w: u32 = w
                        .trim()
                        .parse()
                        .map_err(|_| format!("\"{spec}\": bad weight \"{w}\" of {n}"))?;
                    (n.trim(), w)
                }
                Some(_) => {
                    return Err(format!(
                        "\"{spec}\": randmap members have no weight (repeat a member instead)"
                    ))
                }
                None => (item, 1),
            };
            if name.is_empty() {
                return Err(format!("\"{spec}\": empty member"));
            }
            match members.iter_mut().find(|(m, _)| m == name) {
                Some((_, w)) => *w += weight,
                None => members.push((name.to_string(), weight)),
            }
        }
        members.retain(|(_, w)| *w > 0);
        if members.is_empty() {
            return Err(format!("\"{spec}\": no member"));
        }
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64)
            ^ ((std::process::id() as u64) << 32)
            | 1;
        Ok(Pool {
            spec: spec.to_string(),
            members,
            random,
            state: Mutex::new(State {
                current: Vec::new(),
                seed,
            }),
        }
        .init())
    }

    fn init(self) -> Pool {
        let n = self.members.len();
        self.state.lock().unwrap_or_else(|p| p.into_inner()).current = vec![0; n];
        self
    }

    /// The member names.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.members.iter().map(|(m, _)| m.as_str())
    }

    /// The next member among those `eligible` allows (None: none is).
    /// Members left out do not fall behind: the round-robin counts only
    /// the members that could be chosen, so a member that comes back
    /// gets its share from then on, not a catch-up burst.
    pub fn choose(&self, eligible: impl Fn(&str) -> bool) -> Option<String> {
        let ok: Vec<bool> = self.members.iter().map(|(m, _)| eligible(m)).collect();
        let total: i64 = self
            .members
            .iter()
            .zip(&ok)
            .filter(|(_, ok)| **ok)
            .map(|((_, w), _)| *w as i64)
            .sum();
        if total == 0 {
            return None;
        }
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if self.random {
            let mut x = st.seed;
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            st.seed = x;
            let mut r = (x % total as u64) as i64;
            for (i, (m, w)) in self.members.iter().enumerate() {
                if !ok[i] {
                    continue;
                }
                if r < *w as i64 {
                    return Some(m.clone());
                }
                r -= *w as i64;
            }
            return None;
        }
        let mut best: Option<usize> = None;
        for (i, (_, w)) in self.members.iter().enumerate() {
            if !ok[i] {
                continue;
            }
            st.current[i] += *w as i64;
            if best.is_none_or(|b| st.current[i] > st.current[b]) {
                best = Some(i);
            }
        }
        let b = best?;
        st.current[b] -= total;
        Some(self.members[b].0.clone())
    }
}

/// An open `randmap:`/`weighted:` table: every key finds a member.
#[derive(Debug)]
pub struct PoolDict(pub Pool);

impl Dict for PoolDict {
    fn lookup(&self, _key: &str) -> Result<Option<String>, LookupError> {
        Ok(self.0.choose(|_| true))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weighted_is_exact_and_spread_out() {
        let p = Pool::parse("weighted:{a=3, b=1, c=1}").unwrap();
        let picks: Vec<String> = (0..10).map(|_| p.choose(|_| true).unwrap()).collect();
        let n = |x: &str| picks.iter().filter(|p| *p == x).count();
        assert_eq!((n("a"), n("b"), n("c")), (6, 2, 2), "{picks:?}");
        assert_ne!(picks[..3], ["a", "a", "a"], "spread out: {picks:?}");
        // b left out: a and c share, 3:1.
        let picks: Vec<String> = (0..8).map(|_| p.choose(|m| m != "b").unwrap()).collect();
        assert_eq!(picks.iter().filter(|p| *p == "a").count(), 6, "{picks:?}");
        assert_eq!(p.choose(|_| false), None);
    }

    #[test]
    fn randmap_repetition_weighs_and_bad_specs_are_errors() {
        let p = Pool::parse("randmap:{a, b, a}").unwrap();
        assert_eq!(p.members, vec![("a".to_string(), 2), ("b".to_string(), 1)]);
        let a = (0..3000)
            .filter(|_| p.choose(|_| true).unwrap() == "a")
            .count();
        assert!((1800..2200).contains(&a), "{a}");
        assert!(Pool::parse("weighted:{a=x}").is_err());
        assert!(Pool::parse("weighted:{}").is_err());
        assert!(Pool::parse("randmap:{a=2}").is_err());
        assert!(is_pool_spec(" weighted:{a=1} "));
        assert!(!is_pool_spec("smtp"));
        assert_eq!(
            split_pool_value("weighted:{a=1,b=2}:[relay]:25"),
            Some(("weighted:{a=1,b=2}".into(), "[relay]:25".into()))
        );
        assert_eq!(split_pool_value("smtp:x"), None);
    }
}
