//! Sending identities (sources) and pools, as qmgr sees them.
//!
//! A source is a master.cf transport of the `smtp` program with an
//! identity of its own: `-o smtp_bind_address=`, `smtp_bind_address6`,
//! `smtp_helo_name` (and perhaps `smtp_tls_*`), or a warm-up
//! (`smtp_warmup_schedule` with `smtp_warmup_start`) — Postfix's way of
//! writing a PowerMTA virtual MTA. Site state (connections, rates,
//! backoff, suspensions, warm-up counts) is kept per (source, site):
//! [`site_key`] is the one place that key is made. Other transports
//! share the plain site, as before sources existed.
//!
//! A pool (`randmap:{a,b}`, `weighted:{a=3,b=1}`: [`Pool`], defined in
//! `common::dict::randmap`) is where a transport is chosen; qmgr picks
//! a member per message and destination ([`crate::schedule::Scheduler`]),
//! passing over members that may not send to the site now (suspended for
//! it, or over today's warm-up quota): their share overflows to the
//! others, and the message waits only when no member has room.
//!
//! Time for warm-up days is the wall clock; debug builds (the tests) add
//! `POSTERN_TEST_CLOCK_OFFSET` seconds when it is set, so a test can run
//! "tomorrow".

use postern_common::dict::randmap::Pool;
use postern_common::warning;
use postern_conf::Config;
use std::collections::HashMap;
use std::rc::Rc;

/// The key of the state of `source` for `site` ("" = no source: the
/// site's own state). The only place the per-source key is made.
pub fn site_key(source: &str, site: &str) -> String {
    if source.is_empty() {
        site.to_string()
    } else {
        format!("{source}->{site}")
    }
}

/// The parameters that make a transport a source when it sets them.
pub const IDENTITY_PARAMS: &[&str] = &[
    "smtp_bind_address",
    "smtp_bind_address6",
    "smtp_helo_name",
    "smtp_warmup_schedule",
    "smtp_warmup_start",
];

/// One source's warm-up.
#[derive(Debug, Clone, Default)]
pub struct Warmup {
    /// Messages per site per day on day 1, 2, ...
    pub schedule: Vec<u64>,
    /// Day 1 starts then (unix seconds); None: not warming up.
    pub start: Option<u64>,
}

/// The sources of master.cf, and the pools seen so far.
#[derive(Default)]
pub struct Sources {
    sources: HashMap<String, Warmup>,
    /// The transports of the `smtp` program (a header's pool replaces
    /// only these).
    smtp: std::collections::HashSet<String>,
    /// `pool_maps`: names of pools for the X-Postern-Pool header.
    pool_names: postern_common::maps::Tables,
    pools: HashMap<String, Rc<Pool>>,
    clock_offset: i64,
}

impl Sources {
    pub fn from_config(cfg: &Config, services: &[postern_conf::master_cf::Service]) -> Sources {
        let mut sources = HashMap::new();
        let mut smtp = std::collections::HashSet::new();
        for s in services {
            let program = s.command.rsplit('/').next().unwrap_or("");
            if program != "smtp" || s.args.iter().any(|a| a == "lmtp") {
                continue;
            }
            smtp.insert(s.name.clone());
            let own = s
                .overrides
                .iter()
                .any(|(n, _)| IDENTITY_PARAMS.contains(&n.as_str()));
            let mut c = cfg.clone();
            c.set_overrides(s.overrides.clone());
            let schedule = match postern_common::delivery_policy::parse_schedule(
                &c.get("smtp_warmup_schedule"),
            ) {
                Ok(v) => v,
                Err(e) => {
                    warning!("{}: smtp_warmup_schedule: {e}", s.name);
                    Vec::new()
                }
            };
            let start_text = c.get("smtp_warmup_start");
            let start = match parse_start(&start_text) {
                Ok(v) => v,
                Err(e) => {
                    warning!("{}: smtp_warmup_start: {e}", s.name);
                    None
                }
            };
            if own || (start.is_some() && !schedule.is_empty()) {
                sources.insert(s.name.clone(), Warmup { schedule, start });
            }
        }
        let (pool_names, bad) = postern_common::maps::Tables::open_list(&cfg.get("pool_maps"));
        for e in bad {
            warning!("pool_maps: {e}");
        }
        Sources {
            sources,
            smtp,
            pool_names,
            pools: HashMap::new(),
            clock_offset: clock_offset(),
        }
    }

    /// The transport value (a pool or a source) that the name in a
    /// message's X-Postern-Pool/X-Virtual-MTA header denotes: its
    /// `pool_maps` entry, else the name itself when it is a source or a
    /// pool. None (logged): unknown.
    pub fn header_pool(&self, name: &str) -> Option<String> {
        let name = name.trim();
        match self.pool_names.lookup(&name.to_ascii_lowercase()) {
            Ok(Some(v)) => return Some(v.trim().to_string()),
            Ok(None) => {}
            Err(e) => warning!("pool_maps: {e:?}"),
        }
        if self.sources.contains_key(name)
            || self.smtp.contains(name)
            || postern_common::dict::randmap::is_pool_spec(name)
        {
            return Some(name.to_string());
        }
        warning!("X-Postern-Pool/X-Virtual-MTA: no pool or source \"{name}\" (pool_maps); ignored");
        None
    }

    /// Whether mail for `transport` goes out by SMTP (a header's pool
    /// may replace it).
    pub fn is_smtp(&self, transport: &str) -> bool {
        self.smtp.contains(transport) || postern_common::dict::randmap::is_pool_spec(transport)
    }

    /// The source a transport is ("" when it is none).
    pub fn source_of<'a>(&self, transport: &'a str) -> &'a str {
        if self.sources.contains_key(transport) {
            transport
        } else {
            ""
        }
    }

    pub fn warmup(&self, source: &str) -> Option<&Warmup> {
        self.sources.get(source).filter(|w| w.start.is_some())
    }

    /// The pool a transport value denotes, parsed once (None: no pool,
    /// or a bad one, which is logged).
    pub fn pool(&mut self, spec: &str) -> Option<Rc<Pool>> {
        if !postern_common::dict::randmap::is_pool_spec(spec) {
            return None;
        }
        if let Some(p) = self.pools.get(spec) {
            return Some(p.clone());
        }
        match Pool::parse(spec) {
            Ok(p) => {
                let p = Rc::new(p);
                self.pools.insert(spec.to_string(), p.clone());
                Some(p)
            }
            Err(e) => {
                warning!("transport pool: {e}");
                None
            }
        }
    }

    /// Now, in unix seconds (with the test clock offset).
    pub fn now(&self) -> u64 {
        (postern_common::time::now_secs() as i64 + self.clock_offset).max(0) as u64
    }

    /// A time of the test clock as a time of the real one.
    pub fn to_real(&self, t: u64) -> u64 {
        (t as i64 - self.clock_offset).max(0) as u64
    }

    /// The warm-up day of `source` now: (day, 1 = the first; the start of
    /// that day, unix seconds). None: not warming up.
    pub fn day(&self, source: &str) -> Option<(u64, u64)> {
        let start = self.warmup(source)?.start?;
        let now = self.now();
        if now < start {
            return Some((1, start));
        }
        let day = (now - start) / 86400;
        Some((day + 1, start + day * 86400))
    }
}

/// `smtp_warmup_start`: `YYYY-MM-DD` (midnight UTC) or unix seconds;
/// empty: none.
pub fn parse_start(v: &str) -> Result<Option<u64>, String> {
    let v = v.trim();
    if v.is_empty() {
        return Ok(None);
    }
    if let Ok(n) = v.parse::<u64>() {
        return Ok(Some(n));
    }
    let parts: Vec<&str> = v.split('-').collect();
    let bad = || format!("\"{v}\": expected YYYY-MM-DD or unix seconds");
    if parts.len() != 3 {
        return Err(bad());
    }
    let y: i64 = parts[0].parse().map_err(|_| bad())?;
    let m: i64 = parts[1].parse().map_err(|_| bad())?;
    let d: i64 = parts[2].parse().map_err(|_| bad())?;
    if !(1..=12).contains(&m) || !(1..=31).contains(&d) || y < 1970 {
        return Err(bad());
    }
    let days = postern_common::time::days_from_civil(y, m, d);
    Ok(Some((days * 86400) as u64))
}

/// Debug builds: `POSTERN_TEST_CLOCK_OFFSET` seconds added to the clock
/// of warm-up days (tests run "tomorrow" without waiting a day).
fn clock_offset() -> i64 {
    if cfg!(debug_assertions) {
        std::env::var("POSTERN_TEST_CLOCK_OFFSET")
            .ok()
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0)
    } else {
        0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn start_dates() {
        assert_eq!(parse_start("1970-01-02").unwrap(), Some(86400));
        assert_eq!(parse_start("2026-12-07").unwrap(), Some(1796601600));
        assert_eq!(parse_start("").unwrap(), None);
        assert_eq!(parse_start("12345").unwrap(), Some(12345));
        assert!(parse_start("yesterday").is_err());
        assert_eq!(site_key("", "mx:.google.com"), "mx:.google.com");
        assert_eq!(site_key("ip1", "mx:.google.com"), "ip1->mx:.google.com");
    }
}
