//! `/metrics`: the Prometheus text exposition format (version 0.0.4):
//! `# HELP` and `# TYPE` once per family, then its samples, label values
//! escaped. Names follow postfix_exporter where the quantity is the same
//! (`postfix_up`, `postfix_showq_message_size_bytes{queue}`,
//! `postfix_smtp_messages_processed_total{status}`); the rest are
//! `postern_*`.

use crate::collect::Snapshot;
use std::collections::BTreeMap;
use std::fmt::Write;

/// The content type Prometheus asks for.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// postfix_exporter's buckets for `postfix_showq_message_size_bytes`.
pub const SIZE_BUCKETS: [f64; 7] = [1e3, 1e4, 1e5, 1e6, 1e7, 1e8, 1e9];

/// A label value, escaped (backslash, double quote, line feed).
pub fn escape(v: &str) -> String {
    let mut out = String::with_capacity(v.len());
    for c in v.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out
}

fn labels(pairs: &[(&str, &str)]) -> String {
    if pairs.is_empty() {
        return String::new();
    }
    let inner: Vec<String> = pairs
        .iter()
        .map(|(k, v)| format!("{k}=\"{}\"", escape(v)))
        .collect();
    format!("{{{}}}", inner.join(","))
}

/// A number as the format writes it.
fn num(v: f64) -> String {
    if v.is_nan() {
        "NaN".into()
    } else if v.is_infinite() {
        if v > 0.0 { "+Inf" } else { "-Inf" }.into()
    } else if v.fract() == 0.0 && v.abs() < 1e15 {
        format!("{}", v as i64)
    } else {
        format!("{v}")
    }
}

struct Out {
    text: String,
}

impl Out {
    fn family(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.text, "# HELP {name} {help}");
        let _ = writeln!(self.text, "# TYPE {name} {kind}");
    }

    fn sample(&mut self, name: &str, l: &[(&str, &str)], v: f64) {
        let _ = writeln!(self.text, "{name}{} {}", labels(l), num(v));
    }
}

/// The site's label value: its name (and its source's, when the site's
/// state is kept per source).
fn site_labels(s: &postern_common::ipc::SiteStatus) -> Vec<(&str, &str)> {
    let mut l = vec![("site", s.name.as_str())];
    if let Some(src) = &s.source {
        l.push(("source", src.as_str()));
    }
    l
}

/// The whole exposition. `smtp_transports`: the master.cf services whose
/// program is smtp (what postfix_exporter's `postfix_smtp_*` count).
pub fn render(snap: &Snapshot, admin_socket: &str, smtp_transports: &[String]) -> String {
    let mut o = Out {
        text: String::new(),
    };
    o.family(
        "postfix_up",
        "gauge",
        "Whether the queue manager answered on its admin socket (1) or not (0).",
    );
    o.sample(
        "postfix_up",
        &[("path", admin_socket)],
        if snap.qmgr.is_ok() { 1.0 } else { 0.0 },
    );

    o.family(
        "postfix_showq_message_size_bytes",
        "histogram",
        "Size of the messages in each queue directory, in bytes.",
    );
    for q in &snap.queues {
        for b in SIZE_BUCKETS {
            // Cumulative: every message at most this size.
            let n = q.sizes.iter().filter(|&&s| (s as f64) <= b).count();
            o.sample(
                "postfix_showq_message_size_bytes_bucket",
                &[("queue", q.name), ("le", &num(b))],
                n as f64,
            );
        }
        o.sample(
            "postfix_showq_message_size_bytes_bucket",
            &[("queue", q.name), ("le", "+Inf")],
            q.sizes.len() as f64,
        );
        o.sample(
            "postfix_showq_message_size_bytes_sum",
            &[("queue", q.name)],
            q.sizes.iter().sum::<u64>() as f64,
        );
        o.sample(
            "postfix_showq_message_size_bytes_count",
            &[("queue", q.name)],
            q.sizes.len() as f64,
        );
    }
    o.family(
        "postern_queue_messages",
        "gauge",
        "Messages in each queue directory.",
    );
    for q in &snap.queues {
        o.sample(
            "postern_queue_messages",
            &[("queue", q.name)],
            q.sizes.len() as f64,
        );
    }

    let Ok(st) = &snap.qmgr else {
        return o.text;
    };
    o.family(
        "postern_qmgr_start_time_seconds",
        "gauge",
        "When the queue manager started, Unix time.",
    );
    o.sample("postern_qmgr_start_time_seconds", &[], st.started as f64);
    o.family(
        "postern_qmgr_active_messages",
        "gauge",
        "Messages in the queue manager's active queue (in memory).",
    );
    o.sample(
        "postern_qmgr_active_messages",
        &[],
        st.active_messages as f64,
    );
    o.family(
        "postern_deliveries_in_flight",
        "gauge",
        "Delivery requests out to the delivery agents (each holds a connection).",
    );
    o.sample("postern_deliveries_in_flight", &[], st.in_flight as f64);

    o.family(
        "postern_deliveries_total",
        "counter",
        "Recipients whose delivery attempt ended, by status (sent, deferred, bounced), bounce class and source (transport), since the queue manager started.",
    );
    for d in &st.deliveries {
        o.sample(
            "postern_deliveries_total",
            &[
                ("status", &d.status),
                ("class", &d.class),
                ("source", &d.source),
            ],
            d.count as f64,
        );
    }
    o.family(
        "postfix_smtp_messages_processed_total",
        "counter",
        "Recipients handled by the smtp delivery agent, by status (as postfix_exporter counts status= log fields).",
    );
    let mut smtp: BTreeMap<&str, u64> = ["sent", "deferred", "bounced"]
        .into_iter()
        .map(|s| (s, 0))
        .collect();
    for d in &st.deliveries {
        if smtp_transports.contains(&d.source) {
            if let Some(n) = smtp.get_mut(d.status.as_str()) {
                *n += d.count;
            }
        }
    }
    for (status, n) in smtp {
        o.sample(
            "postfix_smtp_messages_processed_total",
            &[("status", status)],
            n as f64,
        );
    }

    let gauge = |o: &mut Out,
                 name: &str,
                 help: &str,
                 f: &dyn Fn(&postern_common::ipc::SiteStatus) -> Option<f64>| {
        let rows: Vec<_> = st.sites.iter().filter_map(|s| Some((s, f(s)?))).collect();
        o.family(name, "gauge", help);
        for (s, v) in rows {
            o.sample(name, &site_labels(s), v);
        }
    };
    o.family(
        "postern_site_queued",
        "gauge",
        "Deliveries waiting in the queue manager for each site, by source (transport).",
    );
    for s in &st.sites {
        for (src, n) in &s.queued_by_source {
            o.sample(
                "postern_site_queued",
                &[("site", &s.name), ("source", src)],
                *n as f64,
            );
        }
    }
    o.family(
        "postern_site_deferred_recipients",
        "gauge",
        "Recipients waiting in the deferred queue directory for each site (those of its domains).",
    );
    for s in &st.sites {
        o.sample(
            "postern_site_deferred_recipients",
            &site_labels(s),
            crate::collect::site_deferred(snap, &s.domains) as f64,
        );
    }
    gauge(
        &mut o,
        "postern_site_connections",
        "Connections open to each site (deliveries in flight).",
        &|s| Some(s.connections as f64),
    );
    gauge(
        &mut o,
        "postern_site_connections_limit",
        "Connections allowed to each site now (less than configured in backoff).",
        &|s| s.max_connections.map(|n| n as f64),
    );
    gauge(
        &mut o,
        "postern_site_connections_configured",
        "Connections configured for each site (max_connections).",
        &|s| s.configured_connections.map(|n| n as f64),
    );
    gauge(
        &mut o,
        "postern_site_message_rate_limit",
        "Messages per second allowed to each site now.",
        &|s| s.rate,
    );
    gauge(
        &mut o,
        "postern_site_message_rate_configured",
        "Messages per second configured for each site (max_message_rate).",
        &|s| s.configured_rate,
    );
    gauge(
        &mut o,
        "postern_site_delivered_last_minute",
        "Recipients delivered to each site in the last 60 seconds.",
        &|s| Some(s.delivered_last_minute as f64),
    );
    gauge(
        &mut o,
        "postern_site_backoff",
        "Whether each site is in backoff (1) or not (0).",
        &|s| Some(if s.mode == "backoff" { 1.0 } else { 0.0 }),
    );
    gauge(
        &mut o,
        "postern_site_suspended",
        "Whether each site is suspended (1) or not (0).",
        &|s| Some(if s.mode == "suspended" { 1.0 } else { 0.0 }),
    );
    gauge(
        &mut o,
        "postern_site_suspended_until_seconds",
        "End of each suspended site's suspension, Unix time.",
        &|s| (s.suspended_until > 0).then_some(s.suspended_until as f64),
    );
    gauge(
        &mut o,
        "postern_site_connect_failures",
        "Consecutive deliveries that could not reach each site.",
        &|s| Some(s.connect_failures as f64),
    );
    gauge(
        &mut o,
        "postern_site_warmup_day",
        "Day of each source's warm-up schedule at the site.",
        &|s| s.warmup.as_ref().map(|w| w.day as f64),
    );
    gauge(
        &mut o,
        "postern_site_warmup_quota",
        "Today's warm-up quota of each source at the site.",
        &|s| s.warmup.as_ref().map(|w| w.quota as f64),
    );
    gauge(
        &mut o,
        "postern_site_warmup_sent_today",
        "Messages sent today by each warming source at the site.",
        &|s| s.warmup.as_ref().map(|w| w.sent_today as f64),
    );
    o.family(
        "postern_site_mode",
        "gauge",
        "Each site's mode: 1 for the one it is in (normal, backoff, suspended).",
    );
    for s in &st.sites {
        for mode in ["normal", "backoff", "suspended"] {
            let mut l = site_labels(s);
            l.push(("mode", mode));
            o.sample(
                "postern_site_mode",
                &l,
                if s.mode == mode { 1.0 } else { 0.0 },
            );
        }
    }
    o.family(
        "postern_site_deliveries_total",
        "counter",
        "Recipients of each site's deliveries by status, since the queue manager started.",
    );
    for s in &st.sites {
        for (status, n) in [
            ("sent", s.delivered),
            ("deferred", s.deferred),
            ("bounced", s.bounced),
        ] {
            let mut l = site_labels(s);
            l.push(("status", status));
            o.sample("postern_site_deliveries_total", &l, n as f64);
        }
    }
    o.text
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::collect::QueueCount;
    use postern_common::ipc::{DeliveryCount, QmgrStatus, SiteStatus, Warmup};

    fn snapshot() -> Snapshot {
        let site = |name: &str, mode: &str| SiteStatus {
            name: name.into(),
            mode: mode.into(),
            queued: 3,
            queued_by_source: vec![("smtp".into(), 1), ("ip2".into(), 2)],
            max_connections: Some(2),
            configured_connections: Some(4),
            rate: Some(0.5),
            ..Default::default()
        };
        let mut warm = site("mx.b\"q", "backoff");
        warm.source = Some("ip2".into());
        warm.warmup = Some(Warmup {
            day: 2,
            quota: 100,
            sent_today: 40,
        });
        Snapshot {
            qmgr: Ok(QmgrStatus {
                sites: vec![site("mx.a", "normal"), warm],
                deliveries: vec![DeliveryCount {
                    status: "deferred".into(),
                    class: "policy-related".into(),
                    source: "smtp".into(),
                    count: 2,
                }],
                ..Default::default()
            }),
            queues: vec![QueueCount {
                name: "deferred",
                sizes: vec![500, 5000, 2_000_000],
                error: None,
            }],
            deferred_by_domain: Default::default(),
            deferred_truncated: false,
            now: 0,
        }
    }

    #[test]
    fn every_sample_follows_its_family_header_once() {
        let text = render(&snapshot(), "/q/private/qmgr-admin", &["smtp".to_string()]);
        let mut seen = std::collections::HashSet::new();
        let mut family = String::new();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                family = rest.split(' ').next().unwrap().to_string();
                assert!(seen.insert(family.clone()), "{family} twice");
                continue;
            }
            if line.starts_with('#') {
                continue;
            }
            let name = line.split(['{', ' ']).next().unwrap();
            let base = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| name.strip_suffix(s))
                .filter(|b| *b == family)
                .unwrap_or(name);
            assert_eq!(base, family, "{line}");
        }
        assert!(text.contains(
            "postfix_showq_message_size_bytes_bucket{queue=\"deferred\",le=\"1000\"} 1\n"
        ));
        assert!(text.contains(
            "postfix_showq_message_size_bytes_bucket{queue=\"deferred\",le=\"+Inf\"} 3\n"
        ));
        assert!(text.contains("postfix_smtp_messages_processed_total{status=\"deferred\"} 2\n"));
        assert!(text.contains("postern_site_queued{site=\"mx.a\",source=\"ip2\"} 2\n"));
        // A source's own site state and warm-up, the label escaped.
        assert!(text.contains("postern_site_warmup_quota{site=\"mx.b\\\"q\",source=\"ip2\"} 100\n"));
        assert!(text.contains("postern_site_message_rate_limit{site=\"mx.a\"} 0.5\n"));
        // qmgr down: the queue counts only.
        let mut down = snapshot();
        down.qmgr = Err("connect: refused".into());
        let text = render(&down, "/q", &[]);
        assert!(text.contains("postfix_up{path=\"/q\"} 0\n"));
        assert!(text.contains("postern_queue_messages{queue=\"deferred\"} 3\n"));
        assert!(!text.contains("postern_site_"));
    }

    #[test]
    fn escaping_and_numbers() {
        assert_eq!(escape("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
        assert_eq!(num(3.0), "3");
        assert_eq!(num(0.5), "0.5");
        assert_eq!(num(f64::INFINITY), "+Inf");
        assert_eq!(labels(&[("a", "x\"")]), "{a=\"x\\\"\"}");
    }
}
