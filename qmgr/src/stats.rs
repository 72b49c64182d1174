//! What qmgr counts for the status daemon (`AdminRequest::Status`):
//! recipients per minute for the last hour, recipients by (status,
//! class, source) since qmgr started, and per site. Counted when a
//! delivery request returns ([`Stats::record`]); nothing is kept on
//! disk (a new qmgr starts from zero, as Prometheus counters may).

use postern_common::bounce_class;
use postern_common::ipc::{
    DeliveryCount, MinuteCount, Outcome, QmgrStatus, RecipientResult, SiteStatus, STATUS_MINUTES,
};
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::time::{SystemTime, UNIX_EPOCH};

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

#[derive(Default)]
struct SiteCounts {
    delivered: u64,
    deferred: u64,
    bounced: u64,
    /// Deliveries of the last minute: (second, count).
    recent: VecDeque<(u64, u64)>,
}

/// The counters.
pub struct Stats {
    started: u64,
    minutes: VecDeque<MinuteCount>,
    deliveries: BTreeMap<(String, String, String), u64>,
    sites: HashMap<String, SiteCounts>,
}

impl Default for Stats {
    fn default() -> Self {
        Stats::new()
    }
}

impl Stats {
    pub fn new() -> Stats {
        Stats {
            started: unix_now(),
            minutes: VecDeque::new(),
            deliveries: BTreeMap::new(),
            sites: HashMap::new(),
        }
    }

    /// The minute of `now`, created (with the empty ones before it).
    fn minute(&mut self, now: u64) -> &mut MinuteCount {
        let start = now - now % 60;
        let last = self.minutes.back().map(|m| m.start);
        match last {
            Some(l) if l >= start => {}
            _ => {
                let mut next = last.map_or(start, |l| {
                    (l + 60).max(start.saturating_sub(60 * STATUS_MINUTES as u64))
                });
                while next <= start {
                    self.minutes.push_back(MinuteCount {
                        start: next,
                        ..Default::default()
                    });
                    next += 60;
                }
                while self.minutes.len() > STATUS_MINUTES {
                    self.minutes.pop_front();
                }
            }
        }
        self.minutes.back_mut().expect("just made")
    }

    /// The results of one delivery request of `transport`, for `site`.
    pub fn record(&mut self, transport: &str, site: Option<&str>, results: &[RecipientResult]) {
        self.record_at(unix_now(), transport, site, results)
    }

    fn record_at(
        &mut self,
        now: u64,
        transport: &str,
        site: Option<&str>,
        results: &[RecipientResult],
    ) {
        for r in results {
            let m = self.minute(now);
            let class = match r.outcome {
                Outcome::Sent => {
                    m.delivered += 1;
                    String::new()
                }
                Outcome::Deferred => {
                    m.deferred += 1;
                    bounce_class::classify(&r.dsn, &r.reason)
                }
                Outcome::Bounced => {
                    m.bounced += 1;
                    bounce_class::classify(&r.dsn, &r.reason)
                }
            };
            *self
                .deliveries
                .entry((r.outcome.word().to_string(), class, transport.to_string()))
                .or_default() += 1;
            if let Some(site) = site {
                let s = self.sites.entry(site.to_string()).or_default();
                match r.outcome {
                    Outcome::Sent => {
                        s.delivered += 1;
                        match s.recent.back_mut() {
                            Some((t, n)) if *t == now => *n += 1,
                            _ => s.recent.push_back((now, 1)),
                        }
                    }
                    Outcome::Deferred => s.deferred += 1,
                    Outcome::Bounced => s.bounced += 1,
                }
            }
        }
    }

    /// Adds the counters of each site to its status.
    pub fn fill_site(&mut self, s: &mut SiteStatus, now: u64) {
        let Some(c) = self.sites.get_mut(&s.name) else {
            return;
        };
        while c.recent.front().is_some_and(|(t, _)| *t + 60 <= now) {
            c.recent.pop_front();
        }
        s.delivered = c.delivered;
        s.deferred = c.deferred;
        s.bounced = c.bounced;
        s.delivered_last_minute = c.recent.iter().map(|(_, n)| n).sum();
    }

    /// The last [`STATUS_MINUTES`] minutes up to `now`'s, those before
    /// qmgr started as zeros.
    fn last_hour(&mut self, now: u64) -> Vec<MinuteCount> {
        let current = self.minute(now).start;
        let first = current.saturating_sub(60 * (STATUS_MINUTES as u64 - 1));
        (0..STATUS_MINUTES as u64)
            .map(|i| first + 60 * i)
            .map(|start| {
                self.minutes
                    .iter()
                    .find(|m| m.start == start)
                    .copied()
                    .unwrap_or(MinuteCount {
                        start,
                        ..Default::default()
                    })
            })
            .collect()
    }

    /// The snapshot without the sites.
    pub fn snapshot(&mut self) -> QmgrStatus {
        let now = unix_now();
        QmgrStatus {
            now,
            started: self.started,
            minutes: self.last_hour(now),
            deliveries: self
                .deliveries
                .iter()
                .map(|((status, class, source), &count)| DeliveryCount {
                    status: status.clone(),
                    class: class.clone(),
                    source: source.clone(),
                    count,
                })
                .collect(),
            ..Default::default()
        }
    }
}

/// `AdminRequest::Status`: the counters and every site.
pub fn status(sched: &crate::schedule::Scheduler, stats: &mut Stats, active: u64) -> QmgrStatus {
    let mut st = stats.snapshot();
    st.active_messages = active;
    st.in_flight = sched.in_flight() as u64;
    let mut names: Vec<&String> = sched.sites.sites.keys().collect();
    names.sort();
    for name in names {
        let site = &sched.sites.sites[name];
        let queued = sched.site_queued(site) as u64;
        let by_source = sched.site_queued_by_transport(site);
        let mut s = site.borrow_mut();
        let m = s.mode_now();
        let (mode, until, rule) = (m.mode, m.until, m.rule);
        let reason = if mode == "backoff" {
            format!("rule \"{rule}\" matched \"{}\"", m.reply)
        } else {
            m.reason
        };
        let mut row = SiteStatus {
            name: s.name.clone(),
            key: s.key.clone(),
            source: (!s.source.is_empty()).then(|| s.source.clone()),
            domains: s.domains.iter().cloned().collect(),
            queued,
            queued_by_source: by_source,
            connections: s.in_flight as u64,
            max_connections: s
                .cur_connections
                .or(s.policy.max_connections)
                .map(|n| n as u64),
            configured_connections: s.policy.max_connections.map(|n| n as u64),
            rate: s.msg_rate.as_ref().map(|g| g.per_sec),
            configured_rate: s.configured_rate(),
            mode: mode.to_string(),
            suspended_until: until,
            reason,
            rule,
            last_reply: s.last_reply.clone(),
            connect_failures: s.connect_failures,
            warmup: sched.warmup_status(&s),
            ..Default::default()
        };
        stats.fill_site(&mut row, st.now);
        st.sites.push(row);
    }
    // Suspensions an earlier qmgr saved, for sites not seen since.
    for (name, susp) in sched.sites.pending_suspensions() {
        st.sites.push(SiteStatus {
            name,
            mode: "suspended".into(),
            suspended_until: susp
                .until
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
            reason: susp.reason,
            ..Default::default()
        });
    }
    st
}

#[cfg(test)]
mod tests {
    use super::*;

    fn result(outcome: Outcome, dsn: &str, reason: &str) -> RecipientResult {
        RecipientResult {
            offset: 0,
            outcome,
            dsn: dsn.into(),
            reason: reason.into(),
        }
    }

    #[test]
    fn minutes_roll_and_counters_add_up() {
        let mut s = Stats::new();
        // A minute's start (1_800_000_000 is one).
        let t0: u64 = 1_800_000_000;
        let sent = result(Outcome::Sent, "2.0.0", "250 ok");
        let deferred = result(
            Outcome::Deferred,
            "4.7.0",
            "host x said: 421 4.7.0 [TS04] later",
        );
        s.record_at(t0 + 5, "smtp", Some("site"), &[sent.clone(), sent.clone()]);
        s.record_at(t0 + 130, "gmail-ip1", Some("site"), &[deferred, sent]);
        let m: Vec<(u64, u64, u64)> = s
            .minutes
            .iter()
            .map(|m| (m.start - t0, m.delivered, m.deferred))
            .collect();
        assert_eq!(m, vec![(0, 2, 0), (60, 0, 0), (120, 1, 1)]);
        let sent_smtp = s.deliveries[&("sent".into(), String::new(), "smtp".into())];
        assert_eq!(sent_smtp, 2);
        assert_eq!(
            s.deliveries
                .iter()
                .filter(|((st, _, src), _)| st == "deferred" && src == "gmail-ip1")
                .count(),
            1
        );
        let mut row = SiteStatus {
            name: "site".into(),
            ..Default::default()
        };
        s.fill_site(&mut row, t0 + 150);
        assert_eq!(
            (row.delivered, row.deferred, row.delivered_last_minute),
            (3, 1, 1)
        );
        let hour = s.last_hour(t0 + 150);
        assert_eq!(hour.len(), STATUS_MINUTES);
        assert_eq!((hour[59].start, hour[59].deferred), (t0 + 120, 1));
        assert_eq!((hour[57].start, hour[57].delivered), (t0, 2));
        assert_eq!(hour[0].delivered + hour[56].delivered, 0);
        // An hour later: at most STATUS_MINUTES minutes are kept.
        s.record_at(
            t0 + 7200,
            "smtp",
            None,
            &[result(Outcome::Bounced, "5.1.1", "550 5.1.1 no")],
        );
        assert_eq!(s.minutes.len(), STATUS_MINUTES);
        assert_eq!(s.minutes.back().unwrap().bounced, 1);
        assert_eq!(s.minutes.front().unwrap().start, t0 + 7200 - 60 * 59);
    }
}
