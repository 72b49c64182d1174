//! TLS-RPT (RFC 8460): counting the outcomes of outbound TLS per policy
//! domain, and the daily aggregate report built from them.
//!
//! [`Store::record`] appends one line per TLS attempt to
//! `DIR/YYYY-MM-DD/DOMAIN` (UTC day; one `write` of one line to a file
//! opened with O_APPEND, so smtp processes writing at once never mix
//! their lines). [`report_json`] aggregates a day's lines into the RFC
//! 8460 JSON (policies, summary counts, failure details), [`gzip`] wraps
//! it for the `application/tlsrpt+gzip` attachment, and [`parse_rua`]
//! reads the `_smtp._tls.DOMAIN` TXT record's `rua=` addresses.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::PathBuf;

/// One TLS attempt with an MX host of `domain`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attempt {
    /// The policy domain (the recipient domain).
    pub domain: String,
    /// `sts`, `tlsa` or `no-policy-found`.
    pub policy_type: String,
    /// The policy's lines (RFC 8460 `policy-string`).
    pub policy_string: Vec<String>,
    /// The policy's MX patterns (`mx-host`).
    pub mx_host: Vec<String>,
    /// None: success; else the RFC 8460 result type.
    pub result: Option<String>,
    pub receiving_mx_hostname: String,
    pub receiving_ip: String,
    /// A short reason (`failure-reason-code`).
    pub reason: String,
}

fn enc(s: &str) -> String {
    s.replace('%', "%25")
        .replace('\t', "%09")
        .replace('\n', "%0A")
        .replace('\r', "%0D")
}

fn dec(s: &str) -> String {
    s.replace("%0D", "\r")
        .replace("%0A", "\n")
        .replace("%09", "\t")
        .replace("%25", "%")
}

impl Attempt {
    /// The stored line (tab-separated, fields percent-escaped).
    pub fn line(&self) -> String {
        format!(
            "1\t{}\t{}\t{}\t{}\t{}\t{}\t{}\n",
            enc(&self.policy_type),
            enc(&self.policy_string.join("\n")),
            enc(&self.mx_host.join("\n")),
            enc(self.result.as_deref().unwrap_or("success")),
            enc(&self.receiving_mx_hostname),
            enc(&self.receiving_ip),
            enc(&self.reason)
        )
    }

    /// An attempt of `domain` read back from its line.
    pub fn parse(domain: &str, line: &str) -> Option<Attempt> {
        let f: Vec<String> = line.trim_end_matches('\n').split('\t').map(dec).collect();
        if f.len() != 8 || f[0] != "1" {
            return None;
        }
        let list = |s: &str| -> Vec<String> {
            s.split('\n')
                .filter(|x| !x.is_empty())
                .map(str::to_string)
                .collect()
        };
        Some(Attempt {
            domain: domain.to_string(),
            policy_type: f[1].clone(),
            policy_string: list(&f[2]),
            mx_host: list(&f[3]),
            result: (f[4] != "success").then(|| f[4].clone()),
            receiving_mx_hostname: f[5].clone(),
            receiving_ip: f[6].clone(),
            reason: f[7].clone(),
        })
    }
}

/// `YYYY-MM-DD` of the UTC day of `secs`.
pub fn utc_day(secs: u64) -> String {
    let (y, m, d) = crate::time::civil_from_days((secs / 86400) as i64);
    format!("{y:04}-{m:02}-{d:02}")
}

/// The day files under a directory (`data_directory/tls-rpt`).
pub struct Store {
    pub dir: PathBuf,
}

impl Store {
    /// Appends `a` to its domain's file of the UTC day of `now`.
    pub fn record(&self, a: &Attempt, now: u64) -> std::io::Result<()> {
        let domain = a.domain.trim_end_matches('.').to_ascii_lowercase();
        if !crate::hostname::valid_hostname(&domain) {
            return Ok(());
        }
        let day = self.dir.join(utc_day(now));
        std::fs::create_dir_all(&day)?;
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(day.join(domain))?;
        f.write_all(a.line().as_bytes())
    }
}

use crate::json::string as json_str;

fn json_list(v: &[String]) -> String {
    format!(
        "[{}]",
        v.iter().map(|s| json_str(s)).collect::<Vec<_>>().join(",")
    )
}

/// The RFC 8460 aggregate report of `domain` for UTC day `day` from its
/// attempts.
pub fn report_json(
    org: &str,
    contact: &str,
    report_id: &str,
    day: &str,
    domain: &str,
    attempts: &[Attempt],
) -> String {
    type Key = (String, Vec<String>, Vec<String>);
    type Detail = (String, String, String, String);
    let mut by_policy: BTreeMap<Key, (u64, u64, BTreeMap<Detail, u64>)> = BTreeMap::new();
    for a in attempts {
        let e = by_policy
            .entry((
                a.policy_type.clone(),
                a.policy_string.clone(),
                a.mx_host.clone(),
            ))
            .or_default();
        match &a.result {
            None => e.0 += 1,
            Some(r) => {
                e.1 += 1;
                *e.2.entry((
                    r.clone(),
                    a.receiving_mx_hostname.clone(),
                    a.receiving_ip.clone(),
                    a.reason.clone(),
                ))
                .or_default() += 1;
            }
        }
    }
    let policies: Vec<String> = by_policy
        .iter()
        .map(|((ptype, pstr, mx), (ok, bad, details))| {
            let mut p = format!(
                "{{\"policy-type\":{},\"policy-domain\":{}",
                json_str(ptype),
                json_str(domain)
            );
            if !pstr.is_empty() {
                p.push_str(&format!(",\"policy-string\":{}", json_list(pstr)));
            }
            if !mx.is_empty() {
                p.push_str(&format!(",\"mx-host\":{}", json_list(mx)));
            }
            p.push('}');
            let d: Vec<String> = details
                .iter()
                .map(|((r, host, ip, why), n)| {
                    let mut s = format!("{{\"result-type\":{}", json_str(r));
                    if !host.is_empty() {
                        s.push_str(&format!(",\"receiving-mx-hostname\":{}", json_str(host)));
                    }
                    if !ip.is_empty() {
                        s.push_str(&format!(",\"receiving-ip\":{}", json_str(ip)));
                    }
                    s.push_str(&format!(",\"failed-session-count\":{n}"));
                    if !why.is_empty() {
                        s.push_str(&format!(",\"failure-reason-code\":{}", json_str(why)));
                    }
                    s.push('}');
                    s
                })
                .collect();
            format!(
                "{{\"policy\":{p},\"summary\":{{\"total-successful-session-count\":{ok},\"total-failure-session-count\":{bad}}},\"failure-details\":[{}]}}",
                d.join(",")
            )
        })
        .collect();
    format!(
        "{{\"organization-name\":{},\"date-range\":{{\"start-datetime\":{},\"end-datetime\":{}}},\"contact-info\":{},\"report-id\":{},\"policies\":[{}]}}",
        json_str(org),
        json_str(&format!("{day}T00:00:00Z")),
        json_str(&format!("{day}T23:59:59Z")),
        json_str(contact),
        json_str(report_id),
        policies.join(",")
    )
}

/// The `rua=` addresses of the `_smtp._tls` TXT records (RFC 8460
/// section 3): the one record that starts with `v=TLSRPTv1`.
pub fn parse_rua(records: &[String]) -> Vec<String> {
    let rpt: Vec<&String> = records
        .iter()
        .filter(|r| {
            r.split(';')
                .next()
                .is_some_and(|f| f.trim() == "v=TLSRPTv1")
        })
        .collect();
    let [rec] = rpt.as_slice() else {
        return Vec::new();
    };
    rec.split(';')
        .filter_map(|f| f.trim().strip_prefix("rua="))
        .flat_map(|v| v.split(','))
        .map(|u| u.trim().to_string())
        .filter(|u| u.starts_with("mailto:") || u.starts_with("https:"))
        .collect()
}

fn crc32(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in data {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0xEDB8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

/// `data` as a gzip file (RFC 1952) of stored deflate blocks: valid for
/// every gunzip, not compressed (no deflate crate in the workspace).
pub fn gzip(data: &[u8]) -> Vec<u8> {
    let mut out = vec![0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 0xff];
    let mut chunks = data.chunks(65535).peekable();
    if data.is_empty() {
        out.extend_from_slice(&[1, 0, 0, 0xff, 0xff]);
    }
    while let Some(c) = chunks.next() {
        out.push(u8::from(chunks.peek().is_none()));
        let n = c.len() as u16;
        out.extend_from_slice(&n.to_le_bytes());
        out.extend_from_slice(&(!n).to_le_bytes());
        out.extend_from_slice(c);
    }
    out.extend_from_slice(&crc32(data).to_le_bytes());
    out.extend_from_slice(&(data.len() as u32).to_le_bytes());
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_days_and_reports() {
        assert_eq!(utc_day(0), "1970-01-01");
        assert_eq!(utc_day(1_796_515_200), "2026-12-06");
        let a = Attempt {
            domain: "example.com".into(),
            policy_type: "sts".into(),
            policy_string: vec!["version: STSv1".into(), "mode: testing".into()],
            mx_host: vec!["*.example.com".into()],
            result: Some("certificate-not-trusted".into()),
            receiving_mx_hostname: "mx.example.com".into(),
            receiving_ip: "192.0.2.1".into(),
            reason: "untrusted\tissuer".into(),
        };
        assert_eq!(Attempt::parse("example.com", &a.line()), Some(a.clone()));
        let ok = Attempt {
            result: None,
            ..a.clone()
        };
        let j = report_json("Org", "pm@x", "id1", "2026-12-06", "example.com", &[a, ok]);
        assert!(j.contains("\"total-successful-session-count\":1"));
        assert!(j.contains("\"failed-session-count\":1"));
        assert!(j.contains("\"start-datetime\":\"2026-12-06T00:00:00Z\""));
        assert!(j.contains("untrusted\\tissuer"));
        assert_eq!(
            parse_rua(&["v=TLSRPTv1; rua=mailto:a@b.test,https://r.test/x".into()]),
            vec!["mailto:a@b.test", "https://r.test/x"]
        );
        assert!(crc32(b"123456789") == 0xCBF4_3926);
        let g = gzip(b"hello");
        assert_eq!(&g[..3], &[0x1f, 0x8b, 8]);
    }
}
