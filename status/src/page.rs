//! The status page: one HTML document with its style inline and its one
//! picture an inline SVG (no scripts, no external assets; the response's
//! Content-Security-Policy allows nothing else). It refreshes itself
//! every [`REFRESH`] seconds. Every text from elsewhere (site names,
//! domains, remote replies) is escaped.

use crate::collect::Snapshot;
use postern_common::ipc::{MinuteCount, SiteStatus};
use std::fmt::Write;

/// Seconds between the page's reloads.
pub const REFRESH: u32 = 10;

/// Text made safe for HTML content and attribute values.
pub fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// A rate in messages per second, as people read it.
pub fn rate(per_sec: f64) -> String {
    if per_sec >= 1.0 {
        format!("{}/s", trim(per_sec))
    } else if per_sec * 60.0 >= 1.0 {
        format!("{}/min", trim(per_sec * 60.0))
    } else {
        format!("{}/h", trim(per_sec * 3600.0))
    }
}

fn trim(v: f64) -> String {
    let s = format!("{v:.2}");
    s.trim_end_matches('0').trim_end_matches('.').to_string()
}

fn utc(t: u64) -> String {
    postern_common::time::rfc5322_date(t)
}

const STYLE: &str = "body{font-family:sans-serif;margin:1.5em;color:#222}\
h1{font-size:1.4em}h2{font-size:1.15em;margin-top:1.5em}\
table{border-collapse:collapse}th,td{border:1px solid #ccc;padding:.25em .5em;text-align:left;vertical-align:top}\
th{background:#f0f0f0}td.n{text-align:right}\
tr.suspended td{background:#fde2e2}tr.backoff td{background:#fff3cd}\
.mode{font-weight:bold}.muted{color:#777}.reply{font-family:monospace;font-size:.9em}\
.legend span{margin-right:1em}.d{color:#2e7d32}.f{color:#e69500}.b{color:#c62828}";

/// The sparkline: recipients delivered, deferred and bounced per minute.
pub fn sparkline(minutes: &[MinuteCount]) -> String {
    let (w, h, pad) = (600.0f64, 80.0f64, 4.0f64);
    let max = minutes
        .iter()
        .map(|m| m.delivered.max(m.deferred).max(m.bounced))
        .max()
        .unwrap_or(0)
        .max(1) as f64;
    let n = minutes.len().max(2) as f64;
    let line = |f: &dyn Fn(&MinuteCount) -> u64| -> String {
        minutes
            .iter()
            .enumerate()
            .map(|(i, m)| {
                let x = pad + (w - 2.0 * pad) * i as f64 / (n - 1.0);
                let y = h - pad - (h - 2.0 * pad) * f(m) as f64 / max;
                format!("{x:.1},{y:.1}")
            })
            .collect::<Vec<_>>()
            .join(" ")
    };
    let total = |f: &dyn Fn(&MinuteCount) -> u64| minutes.iter().map(f).sum::<u64>();
    let mut s = String::new();
    let _ = write!(
        s,
        "<svg id=\"sparkline\" xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" \
         viewBox=\"0 0 {w} {h}\" role=\"img\" aria-label=\"deliveries and deferrals per minute\">\
         <rect x=\"0\" y=\"0\" width=\"{w}\" height=\"{h}\" fill=\"#fafafa\" stroke=\"#ddd\"/>"
    );
    for (class, color, f) in [
        (
            "delivered",
            "#2e7d32",
            &(|m: &MinuteCount| m.delivered) as &dyn Fn(&MinuteCount) -> u64,
        ),
        ("deferred", "#e69500", &|m: &MinuteCount| m.deferred),
        ("bounced", "#c62828", &|m: &MinuteCount| m.bounced),
    ] {
        let _ = write!(
            s,
            "<polyline class=\"{class}\" fill=\"none\" stroke=\"{color}\" stroke-width=\"1.5\" points=\"{}\"/>",
            line(f)
        );
    }
    s.push_str("</svg>");
    let _ = write!(
        s,
        "<div class=\"legend\"><span class=\"d\">&#9632; delivered {}</span>\
         <span class=\"f\">&#9632; deferred {}</span><span class=\"b\">&#9632; bounced {}</span>\
         <span class=\"muted\">last {} minutes, peak {} per minute</span></div>",
        total(&|m| m.delivered),
        total(&|m| m.deferred),
        total(&|m| m.bounced),
        minutes.len(),
        max as u64
    );
    s
}

fn limit(v: Option<u64>) -> String {
    v.map_or("&#8734;".into(), |n| n.to_string())
}

fn site_row(out: &mut String, s: &SiteStatus, deferred: u64, truncated: bool) {
    let source = match &s.source {
        Some(x) => esc(x),
        None => s
            .queued_by_source
            .iter()
            .map(|(t, _)| esc(t))
            .collect::<Vec<_>>()
            .join(", "),
    };
    let mut queued = if s.queued_by_source.len() > 1 {
        let parts: Vec<String> = s
            .queued_by_source
            .iter()
            .map(|(t, n)| format!("{}: {n}", esc(t)))
            .collect();
        format!(
            "{} <span class=\"muted\">({})</span>",
            s.queued,
            parts.join(", ")
        )
    } else {
        s.queued.to_string()
    };
    let _ = write!(
        queued,
        " / <span class=\"deferred\">{}{deferred}</span>",
        if truncated { "&#8805;" } else { "" }
    );
    let mut why = String::new();
    if !s.reason.is_empty() {
        let _ = write!(why, "<div class=\"reason\">{}</div>", esc(&s.reason));
    }
    if s.suspended_until > 0 {
        let _ = write!(
            why,
            "<div class=\"muted\">until {}</div>",
            esc(&utc(s.suspended_until))
        );
    }
    let rates = match (s.rate, s.configured_rate) {
        (Some(r), Some(c)) if (r - c).abs() > 1e-9 => {
            format!("{} <span class=\"muted\">of {}</span>", rate(r), rate(c))
        }
        (Some(r), _) => rate(r),
        (None, _) => "&#8734;".into(),
    };
    let conns = match (s.max_connections, s.configured_connections) {
        (Some(a), Some(c)) if a != c => format!(
            "{} / {} <span class=\"muted\">of {c}</span>",
            s.connections, a
        ),
        _ => format!("{} / {}", s.connections, limit(s.max_connections)),
    };
    let warm = match &s.warmup {
        Some(w) => format!(
            "day {}: {} of {} <progress max=\"{}\" value=\"{}\"></progress>",
            w.day,
            w.sent_today,
            w.quota,
            w.quota.max(1),
            w.sent_today.min(w.quota)
        ),
        None => "<span class=\"muted\">&#8212;</span>".into(),
    };
    let _ = write!(
        out,
        "<tr class=\"site {mode}\" data-site=\"{name}\"><td>{name}<div class=\"muted\">{key}</div></td>\
         <td>{source}</td><td>{domains}</td><td class=\"n queued\">{queued}</td>\
         <td><span class=\"mode\">{mode}</span>{why}</td><td class=\"reply\">{reply}</td>\
         <td class=\"n\">{conns}</td><td class=\"n\">{last_min}/min <span class=\"muted\">allowed {rates}</span></td>\
         <td class=\"n\">{delivered} / {deferred} / {bounced}</td><td>{warm}</td></tr>",
        mode = esc(&s.mode),
        name = esc(&s.name),
        key = esc(&s.key),
        domains = esc(&s.domains.join(", ")),
        reply = esc(&s.last_reply),
        last_min = s.delivered_last_minute,
        delivered = s.delivered,
        deferred = s.deferred,
        bounced = s.bounced,
    );
}

/// The whole page.
pub fn render(snap: &Snapshot, hostname: &str) -> String {
    let mut o = String::new();
    let _ = write!(
        o,
        "<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta http-equiv=\"refresh\" content=\"{REFRESH}\">\
         <title>Postern status: {h}</title><style>{STYLE}</style></head><body>\
         <h1>Postern on {h}</h1><p class=\"muted\">{now} &#8212; refreshes every {REFRESH} s; \
         <a href=\"/metrics\">metrics</a></p>",
        h = esc(hostname),
        now = esc(&utc(snap.now)),
    );
    o.push_str("<h2>Queues</h2><table id=\"queues\"><tr>");
    for q in &snap.queues {
        let _ = write!(o, "<th>{}</th>", q.name);
    }
    o.push_str("</tr><tr>");
    for q in &snap.queues {
        match &q.error {
            Some(e) => {
                let _ = write!(o, "<td class=\"n\" title=\"{}\">?</td>", esc(e));
            }
            None => {
                let _ = write!(
                    o,
                    "<td class=\"n\" id=\"queue-{}\">{}</td>",
                    q.name,
                    q.sizes.len()
                );
            }
        }
    }
    o.push_str("</tr></table>");
    match &snap.qmgr {
        Err(e) => {
            let _ = write!(
                o,
                "<p id=\"qmgr-down\" class=\"b\">The queue manager did not answer: {}</p>",
                esc(e)
            );
        }
        Ok(st) => {
            let _ = write!(
                o,
                "<p class=\"muted\">queue manager up since {}: {} messages active, {} deliveries in flight</p>",
                esc(&utc(st.started)),
                st.active_messages,
                st.in_flight
            );
            o.push_str("<h2>Deliveries per minute</h2>");
            o.push_str(&sparkline(&st.minutes));
            o.push_str("<h2>Sites</h2>");
            if st.sites.is_empty() {
                o.push_str("<p id=\"no-sites\" class=\"muted\">No sites yet (a site appears with its first message under <code>delivery_policy_maps</code>).</p>");
            } else {
                o.push_str(
                    "<table id=\"sites\"><tr><th>site <span class=\"muted\">(policy key)</span></th>\
                     <th>source</th><th>domains</th><th>queued: active / deferred</th><th>mode, rule</th>\
                     <th>last reply</th><th>connections</th><th>rate</th>\
                     <th>delivered / deferred / bounced</th><th>warm-up</th></tr>",
                );
                for s in &st.sites {
                    let deferred = crate::collect::site_deferred(snap, &s.domains);
                    site_row(&mut o, s, deferred, snap.deferred_truncated);
                }
                o.push_str("</table>");
            }
            if !st.deliveries.is_empty() {
                o.push_str(
                    "<h2>Deliveries by status, class and source</h2><table id=\"deliveries\">\
                     <tr><th>status</th><th>class</th><th>source</th><th>recipients</th></tr>",
                );
                for d in &st.deliveries {
                    let _ = write!(
                        o,
                        "<tr><td>{}</td><td>{}</td><td>{}</td><td class=\"n\">{}</td></tr>",
                        esc(&d.status),
                        esc(&d.class),
                        esc(&d.source),
                        d.count
                    );
                }
                o.push_str("</table>");
            }
        }
    }
    o.push_str("</body></html>\n");
    o
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escaping_and_rates() {
        assert_eq!(
            esc("<a href=\"x\">&'"),
            "&lt;a href=&quot;x&quot;&gt;&amp;&#39;"
        );
        assert_eq!(rate(20.0), "20/s");
        assert_eq!(rate(0.5), "30/min");
        assert_eq!(rate(1.0 / 3600.0), "1/h");
    }

    #[test]
    fn outside_text_is_escaped_and_warmup_shown() {
        use crate::collect::Snapshot;
        use postern_common::ipc::{QmgrStatus, Warmup};
        let site = SiteStatus {
            name: "mx.<b>".into(),
            source: Some("ip-2".into()),
            mode: "suspended".into(),
            reason: "rule \"/x/ suspend=1h\" matched \"421 <script>\"".into(),
            last_reply: "421 4.7.0 <script>alert(1)</script>".into(),
            warmup: Some(Warmup {
                day: 3,
                quota: 200,
                sent_today: 50,
            }),
            ..Default::default()
        };
        let snap = Snapshot {
            qmgr: Ok(QmgrStatus {
                sites: vec![site],
                ..Default::default()
            }),
            queues: Vec::new(),
            deferred_by_domain: Default::default(),
            deferred_truncated: false,
            now: 0,
        };
        let html = render(&snap, "host<&>");
        assert!(!html.contains("<script"), "{html}");
        assert!(html.contains("&lt;script&gt;alert(1)&lt;/script&gt;"));
        assert!(html.contains("host&lt;&amp;&gt;"));
        assert!(html.contains("<tr class=\"site suspended\" data-site=\"mx.&lt;b&gt;\">"));
        assert!(html.contains("<td>ip-2</td>"));
        assert!(html.contains("day 3: 50 of 200"));
        let down = Snapshot {
            qmgr: Err("connect: <refused>".into()),
            queues: Vec::new(),
            deferred_by_domain: Default::default(),
            deferred_truncated: false,
            now: 0,
        };
        assert!(render(&down, "h").contains("did not answer: connect: &lt;refused&gt;"));
    }

    #[test]
    fn sparkline_has_one_line_per_series() {
        let m: Vec<MinuteCount> = (0..5)
            .map(|i| MinuteCount {
                start: i * 60,
                delivered: i,
                deferred: 1,
                bounced: 0,
            })
            .collect();
        let s = sparkline(&m);
        assert_eq!(s.matches("<polyline").count(), 3);
        assert!(s.contains("delivered 10"), "{s}");
    }
}
