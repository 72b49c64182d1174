//! Per-site delivery policy: the values of `delivery_policy_maps` (one
//! parser for qmgr, which enforces them, and `postern check`, which
//! reports bad ones), the keys a site's policy is looked up under, and
//! the GCRA rate limiter qmgr keeps per site.
//!
//! A value is a list of `name=value` settings separated by white space
//! or commas, as `smtp_tls_policy_maps` values are:
//! `max_connections=3 max_message_rate=20/s,burst=5 idle_timeout=30s`.
//! A `burst=N` item belongs to the rate setting written just before it.
//! Rates are `N/s`, `N/m`, `N/h`, `N/d` (also `sec`, `min`, `hour`,
//! `day`, and a count of units: `N/5m`). An unknown name is an error.
//!
//! Lookup keys, in order ([`lookup_keys`]): the recipient domain, its
//! parents as `.parent.domain`, then `mx:` + each MX host of the site and
//! its parents (`mx:.google.com` covers `gmail-smtp-in.l.google.com`),
//! then `*`. The first key with a value gives the whole policy.

use std::time::{Duration, Instant};

/// A rate: `count` per `period`, with a burst of `burst` (at least 1).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rate {
    pub count: f64,
    pub period: Duration,
    /// How many may go back to back after a quiet time. Default 1: never
    /// more than `count` in any window of `period` (a receiver that
    /// counts per window never sees more than it allows).
    pub burst: u32,
}

impl Rate {
    /// `N/s`, `N/5m`, `N/hour`, ...
    pub fn parse(s: &str) -> Result<Rate, String> {
        let (n, unit) = s
            .split_once('/')
            .ok_or_else(|| format!("bad rate \"{s}\": expected N/s, N/m, N/h or N/d"))?;
        let count: f64 = n
            .trim()
            .replace(['_', ','], "")
            .parse()
            .map_err(|_| format!("bad rate \"{s}\": bad count"))?;
        if count <= 0.0 || !count.is_finite() {
            return Err(format!("bad rate \"{s}\": the count must be positive"));
        }
        let unit = unit.trim();
        let digits = unit
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(unit.len());
        let mult: u64 = if digits == 0 {
            1
        } else {
            unit[..digits]
                .parse()
                .map_err(|_| format!("bad rate \"{s}\""))?
        };
        let secs = match &unit[digits..] {
            "s" | "sec" | "second" => 1,
            "m" | "min" | "minute" => 60,
            "h" | "hr" | "hour" => 3600,
            "d" | "day" => 86400,
            _ => return Err(format!("bad rate \"{s}\": unit must be s, m, h or d")),
        };
        if mult == 0 {
            return Err(format!("bad rate \"{s}\": zero period"));
        }
        Ok(Rate {
            count,
            period: Duration::from_secs(secs * mult),
            burst: 1,
        })
    }

    /// Per second.
    pub fn per_sec(&self) -> f64 {
        self.count / self.period.as_secs_f64()
    }

    /// As written, with the period in its unit (for `postern queues`).
    pub fn display(per_sec: f64) -> String {
        if per_sec >= 1.0 {
            format!("{}/s", trim(per_sec))
        } else if per_sec * 60.0 >= 1.0 {
            format!("{}/m", trim(per_sec * 60.0))
        } else if per_sec * 3600.0 >= 1.0 {
            format!("{}/h", trim(per_sec * 3600.0))
        } else {
            format!("{}/d", trim(per_sec * 86400.0))
        }
    }
}

fn trim(v: f64) -> String {
    let s = format!("{v:.2}");
    s.trim_end_matches('0').trim_end_matches('.').to_string()
}

/// One site's policy; `None` = not set (the Postfix parameters of the
/// transport decide).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Policy {
    pub max_connections: Option<usize>,
    pub max_message_rate: Option<Rate>,
    pub max_connection_rate: Option<Rate>,
    pub max_messages_per_connection: Option<u32>,
    pub max_recipients_per_message: Option<usize>,
    pub idle_timeout: Option<Duration>,
    pub retry_after: Option<Duration>,
    pub max_connect_failures: Option<u32>,
    // Adaptive backoff (AIMD) and PowerMTA's two-mode names.
    pub backoff_factor: Option<f64>,
    pub backoff_min_rate: Option<Rate>,
    pub backoff_min_connections: Option<usize>,
    pub backoff_recover_after: Option<u32>,
    pub backoff_message_rate: Option<Rate>,
    pub backoff_max_connections: Option<usize>,
    pub backoff_retry_after: Option<Duration>,
    pub backoff_to_normal_after: Option<Duration>,
    // Sending identities (sources): the limits above hold per (source,
    // site); these cap the sum over the site's sources.
    pub site_max_connections: Option<usize>,
    pub site_max_message_rate: Option<Rate>,
    /// Messages per day a source sends to the site on day 1, 2, ... of
    /// its warm-up (overrides the transport's `smtp_warmup_schedule`).
    pub warmup_schedule: Option<Vec<u64>>,
}

/// Every setting name a policy value may hold.
pub const NAMES: &[&str] = &[
    "max_connections",
    "max_message_rate",
    "max_connection_rate",
    "max_messages_per_connection",
    "max_recipients_per_message",
    "idle_timeout",
    "retry_after",
    "max_connect_failures",
    "backoff_factor",
    "backoff_min_rate",
    "backoff_min_connections",
    "backoff_recover_after",
    "backoff_message_rate",
    "backoff_max_connections",
    "backoff_retry_after",
    "backoff_to_normal_after",
    "site_max_connections",
    "site_max_message_rate",
    "warmup_schedule",
];

fn time(name: &str, v: &str) -> Result<Duration, String> {
    postern_conf::parse_time(v)
        .map(Duration::from_secs)
        .ok_or_else(|| format!("{name}: bad time value \"{v}\""))
}

fn num<T: std::str::FromStr>(name: &str, v: &str) -> Result<T, String> {
    v.replace('_', "")
        .parse()
        .map_err(|_| format!("{name}: bad number \"{v}\""))
}

impl Policy {
    /// Parses a `delivery_policy_maps` value.
    pub fn parse(value: &str) -> Result<Policy, String> {
        let mut p = Policy::default();
        // The rate setting a following `burst=` belongs to.
        let mut last_rate: Option<&'static str> = None;
        for item in value
            .split(|c: char| c.is_whitespace() || c == ',')
            .filter(|s| !s.is_empty())
        {
            // `warmup_schedule=50,100,200`: the numbers after it (split
            // off by the commas) belong to it.
            if !item.contains('=') && last_rate == Some("warmup_schedule") {
                let n: u64 = num("warmup_schedule", item)?;
                if let Some(v) = p.warmup_schedule.as_mut() {
                    v.push(n);
                }
                continue;
            }
            let (name, v) = item
                .split_once('=')
                .ok_or_else(|| format!("\"{item}\": expected name=value"))?;
            let (name, v) = (name.trim(), v.trim());
            if name == "burst" || name == "max_burst" {
                let burst: u32 = num(name, v)?;
                let rate = match last_rate {
                    Some("max_message_rate") => p.max_message_rate.as_mut(),
                    Some("max_connection_rate") => p.max_connection_rate.as_mut(),
                    Some("backoff_message_rate") => p.backoff_message_rate.as_mut(),
                    Some("backoff_min_rate") => p.backoff_min_rate.as_mut(),
                    Some("site_max_message_rate") => p.site_max_message_rate.as_mut(),
                    _ => None,
                }
                .ok_or_else(|| format!("\"{item}\": burst= must follow a rate setting"))?;
                rate.burst = burst.max(1);
                continue;
            }
            last_rate = None;
            match name {
                "max_connections" => p.max_connections = Some(num(name, v)?),
                "max_message_rate" => {
                    p.max_message_rate = Some(Rate::parse(v)?);
                    last_rate = Some("max_message_rate");
                }
                "max_connection_rate" => {
                    p.max_connection_rate = Some(Rate::parse(v)?);
                    last_rate = Some("max_connection_rate");
                }
                "max_messages_per_connection" => {
                    p.max_messages_per_connection = Some(num(name, v)?)
                }
                "max_recipients_per_message" => p.max_recipients_per_message = Some(num(name, v)?),
                "idle_timeout" => p.idle_timeout = Some(time(name, v)?),
                "retry_after" => p.retry_after = Some(time(name, v)?),
                "max_connect_failures" => p.max_connect_failures = Some(num(name, v)?),
                "backoff_factor" => {
                    let f: f64 = num(name, v)?;
                    if !(f > 0.0 && f <= 1.0) {
                        return Err(format!("backoff_factor: \"{v}\" is not in (0, 1]"));
                    }
                    p.backoff_factor = Some(f);
                }
                "backoff_min_rate" => {
                    p.backoff_min_rate = Some(Rate::parse(v)?);
                    last_rate = Some("backoff_min_rate");
                }
                "backoff_min_connections" => p.backoff_min_connections = Some(num(name, v)?),
                "backoff_recover_after" => p.backoff_recover_after = Some(num(name, v)?),
                "backoff_message_rate" => {
                    p.backoff_message_rate = Some(Rate::parse(v)?);
                    last_rate = Some("backoff_message_rate");
                }
                "backoff_max_connections" => p.backoff_max_connections = Some(num(name, v)?),
                "backoff_retry_after" => p.backoff_retry_after = Some(time(name, v)?),
                "backoff_to_normal_after" => p.backoff_to_normal_after = Some(time(name, v)?),
                "site_max_connections" => p.site_max_connections = Some(num(name, v)?),
                "site_max_message_rate" => {
                    p.site_max_message_rate = Some(Rate::parse(v)?);
                    last_rate = Some("site_max_message_rate");
                }
                "warmup_schedule" => {
                    p.warmup_schedule = Some(parse_schedule(v)?);
                    last_rate = Some("warmup_schedule");
                }
                _ => {
                    return Err(format!(
                        "unknown setting \"{name}\" (known: {})",
                        NAMES.join(", ")
                    ))
                }
            }
        }
        Ok(p)
    }

    /// Whether the policy limits anything qmgr schedules by.
    pub fn is_empty(&self) -> bool {
        *self == Policy::default()
    }
}

/// A warm-up schedule: messages per day on day 1, 2, ... (`50, 100,
/// 200` or `50:100:200`); empty: none.
pub fn parse_schedule(v: &str) -> Result<Vec<u64>, String> {
    v.split(|c: char| c == ',' || c == ':' || c.is_whitespace())
        .filter(|s| !s.is_empty())
        .map(|n| num("warmup_schedule", n))
        .collect()
}

/// A source's quota for day `day` (1 = the first) of `schedule`: None
/// once the schedule is over (no limit: the source is warm).
pub fn warmup_quota(schedule: &[u64], day: u64) -> Option<u64> {
    if day == 0 {
        return schedule.first().copied();
    }
    schedule.get(day as usize - 1).copied()
}

/// The keys a domain's policy is looked up under, in order: the domain,
/// its parents as `.parent`, `mx:` + each MX host and its parents, `*`.
pub fn lookup_keys(domain: &str, mx_hosts: &[String]) -> Vec<String> {
    let domain = domain.trim_end_matches('.').to_ascii_lowercase();
    let mut keys = vec![domain.clone()];
    let mut rest = domain.as_str();
    while let Some((_, parent)) = rest.split_once('.') {
        keys.push(format!(".{parent}"));
        rest = parent;
    }
    for mx in mx_hosts {
        let mx = mx.trim_end_matches('.').to_ascii_lowercase();
        keys.push(format!("mx:{mx}"));
        let mut rest = mx.as_str();
        while let Some((_, parent)) = rest.split_once('.') {
            keys.push(format!("mx:.{parent}"));
            rest = parent;
        }
    }
    keys.push("*".into());
    let mut seen = std::collections::HashSet::new();
    keys.retain(|k| seen.insert(k.clone()));
    keys
}

/// A GCRA limiter (the generic cell rate algorithm: a token bucket kept
/// as one "theoretical arrival time"): `take` says now or when.
#[derive(Debug, Clone)]
pub struct Gcra {
    /// Allowed per second (backoff lowers it).
    pub per_sec: f64,
    pub burst: u32,
    tat: Option<Instant>,
}

impl Gcra {
    pub fn new(rate: &Rate) -> Gcra {
        Gcra {
            per_sec: rate.per_sec(),
            burst: rate.burst.max(1),
            tat: None,
        }
    }

    fn interval(&self) -> Duration {
        Duration::from_secs_f64(1.0 / self.per_sec.max(1e-9))
    }

    /// When the next one may go (now or later), without taking it.
    pub fn ready_at(&self, now: Instant) -> Instant {
        let tat = self.tat.unwrap_or(now).max(now);
        let tau = self.interval() * (self.burst - 1);
        tat.checked_sub(tau).unwrap_or(now).max(now)
    }

    /// Takes one if allowed now; otherwise the instant it will be.
    pub fn take(&mut self, now: Instant) -> Result<(), Instant> {
        let at = self.ready_at(now);
        if at > now {
            return Err(at);
        }
        // Late by less than one interval (the scheduler woke a little
        // after the instant it was told): keep to the schedule, so that
        // wake-up latency does not lower the rate. Later than that, the
        // time was idle and is not made up (no burst beyond `burst`).
        let interval = self.interval();
        let tat = match self.tat {
            Some(t) if t + interval > now => t,
            _ => now,
        };
        self.tat = Some(tat + interval);
        Ok(())
    }

    /// Seconds of "theoretical arrival time" ahead of `now` (to carry the
    /// limiter over a reload).
    pub fn ahead(&self, now: Instant) -> f64 {
        self.tat
            .map(|t| t.saturating_duration_since(now).as_secs_f64())
            .unwrap_or(0.0)
    }

    pub fn set_ahead(&mut self, now: Instant, secs: f64) {
        if secs > 0.0 && secs.is_finite() {
            self.tat = Some(now + Duration::from_secs_f64(secs.min(86400.0)));
        }
    }
}

/// What a `delivery_reply_rules` entry says to do when a reply matches.
/// The value is a list of items (white space or commas):
/// `backoff`, `suspend=DURATION`, `suspend_source=DURATION`, `defer`,
/// `bounce` or `bounce=DURATION`, `class=NAME`, `after=N/PERIOD`, and
/// `site=SUFFIX` (only for sites whose name or an MX host ends so).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ReplyRule {
    pub backoff: bool,
    pub suspend: Option<Duration>,
    pub suspend_source: Option<Duration>,
    pub defer: bool,
    /// `bounce`: Some(ZERO) = this reply only; a duration: the site's
    /// queue too, for that long.
    pub bounce: Option<Duration>,
    pub class: Option<String>,
    /// Act on the Nth match within the period.
    pub after: Option<(u32, Duration)>,
    pub site: Option<String>,
}

impl ReplyRule {
    pub fn parse(value: &str) -> Result<ReplyRule, String> {
        let mut r = ReplyRule::default();
        let mut any = false;
        for item in value
            .split(|c: char| c.is_whitespace() || c == ',')
            .filter(|s| !s.is_empty())
        {
            let (name, v) = match item.split_once('=') {
                Some((n, v)) => (n.trim(), Some(v.trim())),
                None => (item.trim(), None),
            };
            fn need<'a>(name: &str, v: Option<&'a str>) -> Result<&'a str, String> {
                v.ok_or_else(|| format!("{name}: needs a value"))
            }
            match name {
                "action" => {
                    // `action=backoff` is accepted for `backoff`.
                    let sub = ReplyRule::parse(need(name, v)?)?;
                    r.backoff |= sub.backoff;
                    r.defer |= sub.defer;
                    r.bounce = r.bounce.or(sub.bounce);
                }
                "backoff" => r.backoff = true,
                "defer" => r.defer = true,
                "suspend" => r.suspend = Some(time(name, need(name, v)?)?),
                "suspend_source" => r.suspend_source = Some(time(name, need(name, v)?)?),
                "bounce" => {
                    r.bounce = Some(match v {
                        Some(v) => time(name, v)?,
                        None => Duration::ZERO,
                    })
                }
                "class" => r.class = Some(need(name, v)?.to_string()),
                "site" => r.site = Some(need(name, v)?.to_ascii_lowercase()),
                "after" => {
                    let rate = Rate::parse(need(name, v)?)?;
                    r.after = Some((rate.count.max(1.0) as u32, rate.period));
                }
                _ => {
                    return Err(format!(
                        "unknown reply rule item \"{name}\" (known: backoff, suspend=, \
                         suspend_source=, defer, bounce, class=, after=N/PERIOD, site=)"
                    ))
                }
            }
            any = true;
        }
        if !any {
            return Err("empty reply rule".into());
        }
        Ok(r)
    }
}

/// The one-line form rules are matched against, `"<code> <enhanced>
/// <text>"`, of a remote server's reply as the smtp client reports it
/// (`host H[A] said: 421 4.7.0 text (in reply to MAIL FROM command)`);
/// None for a reason Postern wrote itself (a connection that failed, a
/// timeout, a DNS answer), which never triggers a rule.
pub fn remote_reply(reason: &str, dsn: &str) -> Option<String> {
    let (_, said) = reason.split_once(" said: ")?;
    let text = match said.rfind(" (in reply to ") {
        Some(i) => &said[..i],
        None => said,
    };
    let text = text.trim();
    let code = text.get(..3)?;
    if !code.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let rest = text[3..].trim_start_matches(['-', ' ']);
    let first = rest.split_whitespace().next().unwrap_or("");
    let enhanced = first.split('.').count() == 3
        && first
            .split('.')
            .all(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()));
    Some(if enhanced {
        format!("{code} {rest}")
    } else {
        format!("{code} {dsn} {rest}")
    })
}

/// The smtp agent's part of `delivery_reply_rules`: `defer` makes a
/// remote 5xx for a recipient temporary, `bounce` makes a 4xx final,
/// before the outcome is recorded; `class=NAME` is the bounce class of
/// the reply (instead of `bounce_classifier_maps`'), for the records of
/// that recipient. `relay` is the server's name, for a rule's `site=`;
/// the actions of a rule with `after=` are qmgr's only (it counts), its
/// `class=` holds for every match.
pub fn adjust_outcome(
    tables: &crate::maps::Tables,
    outcome: crate::ipc::Outcome,
    dsn: &str,
    reason: &str,
    site: &str,
    relay: &str,
) -> Adjusted {
    use crate::ipc::Outcome;
    let same = Adjusted {
        outcome,
        dsn: dsn.to_string(),
        class: None,
    };
    if outcome == Outcome::Sent || tables.is_empty() {
        return same;
    }
    let Some(reply) = remote_reply(reason, dsn) else {
        return same;
    };
    let Ok(Some(value)) = tables.lookup(&reply) else {
        return same;
    };
    let Ok(rule) = ReplyRule::parse(&value) else {
        return same;
    };
    if let Some(suffix) = &rule.site {
        let host = relay.split('[').next().unwrap_or("").to_ascii_lowercase();
        if !site.ends_with(suffix.as_str()) && !host.ends_with(suffix.as_str()) {
            return same;
        }
    }
    let class = rule.class.clone().filter(|c| !c.is_empty());
    let with_class = |c: char| -> String {
        let mut d = dsn.to_string();
        if d.len() > 1 {
            d.replace_range(..1, &c.to_string());
        }
        d
    };
    if rule.after.is_some() {
        // qmgr counts the matches and decides (Manager::site_replies):
        // a 5xx under `defer` is deferred here, never lost, and qmgr
        // bounces it unless it is the Nth match; a 4xx under `bounce`
        // stays deferred and qmgr bounces it if it is.
        if outcome == Outcome::Bounced && rule.defer {
            return Adjusted {
                outcome: Outcome::Deferred,
                dsn: with_class('4'),
                class,
            };
        }
        return Adjusted { class, ..same };
    }
    let (outcome, dsn) = match outcome {
        Outcome::Bounced if rule.defer => (Outcome::Deferred, with_class('4')),
        Outcome::Deferred if rule.bounce.is_some() => (Outcome::Bounced, with_class('5')),
        _ => (outcome, dsn.to_string()),
    };
    Adjusted {
        outcome,
        dsn,
        class,
    }
}

/// What [`adjust_outcome`] makes of a recipient's outcome.
#[derive(Debug, Clone, PartialEq)]
pub struct Adjusted {
    pub outcome: crate::ipc::Outcome,
    pub dsn: String,
    /// A matching rule's `class=NAME`.
    pub class: Option<String>,
}

/// The values of the table `spec` that `postern check` can read without
/// a server (inline, texthash, and the sources of hash/btree/cdb/lmdb,
/// regexp and pcre tables), each with where it was found; database tables
/// are not read here (their values are checked when qmgr reads them:
/// a bad one is logged, and that site gets no policy).
pub fn table_values(spec: &str) -> Vec<(String, String)> {
    let Some((kind, name)) = spec.split_once(':') else {
        return Vec::new();
    };
    let mut out = Vec::new();
    match kind {
        "inline" => {
            let inner = name.trim().trim_start_matches('{').trim_end_matches('}');
            for item in postern_conf::split_braced(inner, true) {
                let item = item.trim().trim_start_matches('{').trim_end_matches('}');
                if let Some((k, v)) = item.split_once('=') {
                    out.push((format!("{spec}: {}", k.trim()), v.trim().to_string()));
                }
            }
        }
        "texthash" | "hash" | "btree" | "cdb" | "lmdb" => {
            if let Ok(text) = std::fs::read_to_string(name) {
                if let Ok(entries) = crate::maps::parse_source(&text, false) {
                    for (k, v) in entries {
                        out.push((format!("{name}: {k}"), v));
                    }
                }
            }
        }
        "regexp" | "pcre" => {
            if let Ok(text) = std::fs::read_to_string(name) {
                for (i, line) in text.lines().enumerate() {
                    let t = line.trim_start();
                    if t.is_empty() || t.starts_with('#') || line.starts_with(char::is_whitespace) {
                        continue;
                    }
                    let lower = t.to_ascii_lowercase();
                    if lower.starts_with("if ") || lower.starts_with("endif") {
                        continue;
                    }
                    // /pattern/flags value (or !/pattern/).
                    let body = t.trim_start_matches('!');
                    let Some(delim) = body.chars().next() else {
                        continue;
                    };
                    let Some(end) = body[delim.len_utf8()..].find(delim) else {
                        continue;
                    };
                    let rest = &body[delim.len_utf8() + end + delim.len_utf8()..];
                    let value = rest
                        .trim_start_matches(|c: char| c.is_ascii_alphabetic())
                        .trim();
                    out.push((format!("{name}, line {}", i + 1), value.to_string()));
                }
            }
        }
        _ => {}
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn source_settings_and_warmup_schedules() {
        let p = Policy::parse(
            "max_connections=2 site_max_connections=5 site_max_message_rate=100/m,burst=3 \
             warmup_schedule=50,100,200",
        )
        .unwrap();
        assert_eq!(p.site_max_connections, Some(5));
        assert_eq!(p.site_max_message_rate.unwrap().burst, 3);
        assert_eq!(p.warmup_schedule, Some(vec![50, 100, 200]));
        assert_eq!(warmup_quota(&[50, 100], 1), Some(50));
        assert_eq!(warmup_quota(&[50, 100], 2), Some(100));
        assert_eq!(warmup_quota(&[50, 100], 3), None, "warm");
        assert!(Policy::parse("warmup_schedule=50,x").is_err());
        let r = ReplyRule::parse("/x/ suspend_source=1h").unwrap_err();
        assert!(r.contains("unknown"), "{r}");
        assert_eq!(
            ReplyRule::parse("suspend_source=1h")
                .unwrap()
                .suspend_source,
            Some(Duration::from_secs(3600))
        );
    }

    #[test]
    fn parses_settings() {
        let p = Policy::parse(
            "max_connections=3 max_message_rate=20/s,burst=5, idle_timeout=30s retry_after=5m \
             max_connection_rate=100/5m max_messages_per_connection=50",
        )
        .unwrap();
        assert_eq!(p.max_connections, Some(3));
        let r = p.max_message_rate.unwrap();
        assert_eq!(
            (r.count, r.period, r.burst),
            (20.0, Duration::from_secs(1), 5)
        );
        assert_eq!(
            p.max_connection_rate.unwrap().period,
            Duration::from_secs(300)
        );
        assert_eq!(p.idle_timeout, Some(Duration::from_secs(30)));
        assert_eq!(p.retry_after, Some(Duration::from_secs(300)));
        assert_eq!(p.max_messages_per_connection, Some(50));
        assert!(Policy::parse("max_conections=3")
            .unwrap_err()
            .contains("unknown setting"));
        assert!(Policy::parse("burst=3").is_err());
        assert!(Policy::parse("max_message_rate=20/fortnight").is_err());
        assert!(Policy::parse("max_connections=x").is_err());
        assert_eq!(
            Rate::parse("1,000/hour").unwrap().per_sec(),
            1000.0 / 3600.0
        );
        assert!(Policy::parse("").unwrap().is_empty());
    }

    #[test]
    fn adjust_outcome_gives_a_rules_class() {
        use crate::ipc::Outcome;
        let dir = std::env::temp_dir().join(format!("postern-adj-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("rules");
        std::fs::write(
            &path,
            "/disabled/ defer class=owner-disabled\n/TS04/ suspend=1h class=throttled after=3/1h\n",
        )
        .unwrap();
        let (t, bad) = crate::maps::Tables::open_list(&format!("regexp:{}", path.display()));
        assert!(bad.is_empty(), "{bad:?}");
        let said =
            |r: &str| format!("host mx.z.test[127.0.0.1] said: {r} (in reply to RCPT TO command)");
        let a = adjust_outcome(
            &t,
            Outcome::Bounced,
            "5.2.1",
            &said("550 5.2.1 mailbox disabled"),
            "z",
            "mx.z.test[127.0.0.1]:25",
        );
        assert_eq!(
            (a.outcome, a.dsn.as_str(), a.class.as_deref()),
            (Outcome::Deferred, "4.2.1", Some("owner-disabled"))
        );
        // after=: the action is qmgr's, the class holds for every match.
        let a = adjust_outcome(
            &t,
            Outcome::Deferred,
            "4.7.0",
            &said("421 4.7.0 [TS04] deferred"),
            "z",
            "",
        );
        assert_eq!(
            (a.outcome, a.class.as_deref()),
            (Outcome::Deferred, Some("throttled"))
        );
        let a = adjust_outcome(
            &t,
            Outcome::Deferred,
            "4.4.1",
            "connect to h[1.2.3.4]:25: Connection refused",
            "z",
            "",
        );
        assert_eq!(a.class, None);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn reply_rules_and_remote_replies() {
        let r = ReplyRule::parse("suspend=2h class=throttled after=3/10m").unwrap();
        assert_eq!(r.suspend, Some(Duration::from_secs(7200)));
        assert_eq!(r.after, Some((3, Duration::from_secs(600))));
        assert!(ReplyRule::parse("action=backoff").unwrap().backoff);
        assert!(ReplyRule::parse("slow_down").is_err());
        assert_eq!(
            remote_reply(
                "host mx.y.test[127.0.0.1] said: 421 4.7.0 [TS04] Messages temporarily deferred (in reply to MAIL FROM command)",
                "4.7.0"
            )
            .as_deref(),
            Some("421 4.7.0 [TS04] Messages temporarily deferred")
        );
        assert_eq!(
            remote_reply(
                "host h[1.2.3.4] said: 451 slow down (in reply to end of DATA command)",
                "4.0.0"
            )
            .as_deref(),
            Some("451 4.0.0 slow down")
        );
        assert_eq!(
            remote_reply("connect to h[1.2.3.4]:25: Connection refused", "4.4.1"),
            None
        );
    }

    #[test]
    fn keys_in_order() {
        let k = lookup_keys("Mail.Example.com", &["gmail-smtp-in.l.google.com.".into()]);
        assert_eq!(
            k,
            [
                "mail.example.com",
                ".example.com",
                ".com",
                "mx:gmail-smtp-in.l.google.com",
                "mx:.l.google.com",
                "mx:.google.com",
                "mx:.com",
                "*"
            ]
        );
    }

    #[test]
    fn gcra_spaces_and_bursts() {
        let t0 = Instant::now();
        let mut g = Gcra::new(&Rate::parse("10/s").unwrap());
        assert!(g.take(t0).is_ok());
        let next = g.take(t0).unwrap_err();
        assert_eq!(next - t0, Duration::from_millis(100));
        assert!(g.take(next).is_ok());
        let mut b = Gcra::new(&Rate {
            burst: 3,
            ..Rate::parse("10/s").unwrap()
        });
        assert!(b.take(t0).is_ok() && b.take(t0).is_ok() && b.take(t0).is_ok());
        assert!(b.take(t0).is_err());
    }
}
