//! `postern tls-report send [-d YYYY-MM-DD]`: the TLS-RPT (RFC 8460)
//! aggregate reports of one UTC day (yesterday by default), built from
//! what smtp recorded under `data_directory/tls-rpt/DAY/` and sent to
//! each policy domain's `rua=` addresses.
//!
//! Why a command (run daily from cron, like Postfix sites run their log
//! reports) and not a qmgr job: a report needs DNS (`_smtp._tls.DOMAIN`
//! TXT), HTTPS (`rua=https:`) and a message submission, none of which
//! qmgr does or should wait on; a command can be run again by hand for a
//! day that failed, and a day's report is sent once (a `.sent-DOMAIN`
//! mark next to the day's file).
//!
//! For each domain with results: the JSON report
//! (`postern_common::tls_rpt::report_json`, organization
//! `smtp_tls_report_organization`, contact `smtp_tls_report_contact`),
//! gzipped; for `mailto:` a multipart/report message (RFC 8460 section
//! 5.3: `TLS-Report-Domain`, `TLS-Report-Submitter`, the
//! `application/tlsrpt+gzip` attachment named
//! `SUBMITTER!DOMAIN!BEGIN!END.json.gz`) submitted through
//! `command_directory/sendmail`, from the contact address; for `https:`
//! a POST with content type `application/tlsrpt+gzip`.

use crate::die;
use crate::sysexits::*;
use postern_common::dns::BlockingResolver;
use postern_common::tls_rpt::{self, Attempt};
use postern_conf::Config;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

const NAME: &str = "postern";

/// `postern tls-report ARGS`.
pub fn main(cfg: &Config, args: &[String]) -> ! {
    let mut day = None;
    let mut it = args.iter();
    let mut send = false;
    while let Some(a) = it.next() {
        match a.as_str() {
            "send" => send = true,
            "-d" => day = it.next().cloned(),
            other => die(
                NAME,
                EX_USAGE,
                format_args!("tls-report: unexpected argument \"{other}\"; usage: postern tls-report send [-d YYYY-MM-DD]"),
            ),
        }
    }
    if !send {
        die(
            NAME,
            EX_USAGE,
            "usage: postern tls-report send [-d YYYY-MM-DD]",
        );
    }
    let now = postern_common::time::now_secs();
    let day = day.unwrap_or_else(|| tls_rpt::utc_day(now.saturating_sub(86400)));
    if day.len() != 10 || !day.bytes().all(|b| b.is_ascii_digit() || b == b'-') {
        die(
            NAME,
            EX_USAGE,
            format_args!("tls-report: bad day \"{day}\""),
        );
    }
    let dir = PathBuf::from(cfg.get("data_directory"))
        .join("tls-rpt")
        .join(&day);
    let Ok(rd) = std::fs::read_dir(&dir) else {
        eprintln!("{NAME}: tls-report: no results for {day}");
        std::process::exit(EX_OK);
    };
    let mut domains: Vec<String> = rd
        .flatten()
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| !n.starts_with('.'))
        .collect();
    domains.sort();
    let dns = BlockingResolver::new(
        &postern_common::dns::servers_from_config(cfg),
        Duration::from_secs(cfg.get_time("dns_resolver_timeout").unwrap_or(5)),
    )
    .unwrap_or_else(|e| die(NAME, EX_TEMPFAIL, format_args!("tls-report: {e}")));
    let mut failed = 0;
    for domain in domains {
        if dir.join(format!(".sent-{domain}")).exists() {
            continue;
        }
        match report_domain(cfg, &dns, &dir, &day, &domain) {
            Ok(n) => {
                eprintln!("{NAME}: tls-report: {day} {domain}: sent to {n} address(es)");
                let _ = std::fs::write(dir.join(format!(".sent-{domain}")), b"");
            }
            Err(e) => {
                eprintln!("{NAME}: tls-report: {day} {domain}: {e}");
                failed += 1;
            }
        }
    }
    std::process::exit(if failed > 0 { EX_TEMPFAIL } else { EX_OK })
}

/// Builds and sends the report of `domain`; the number of addresses it
/// went to.
fn report_domain(
    cfg: &Config,
    dns: &BlockingResolver,
    dir: &Path,
    day: &str,
    domain: &str,
) -> Result<usize, String> {
    let text = std::fs::read_to_string(dir.join(domain)).map_err(|e| e.to_string())?;
    let attempts: Vec<Attempt> = text
        .lines()
        .filter_map(|l| Attempt::parse(domain, l))
        .collect();
    if attempts.is_empty() {
        return Ok(0);
    }
    let rua = match dns.txt(&format!("_smtp._tls.{domain}")) {
        Ok(recs) => tls_rpt::parse_rua(&recs),
        Err(postern_common::dns::TxtError::NotFound) => Vec::new(),
        Err(postern_common::dns::TxtError::TryAgain(e)) => return Err(e),
    };
    if rua.is_empty() {
        // No one to tell: done, as RFC 8460 section 3 has it.
        return Ok(0);
    }
    let submitter = cfg.get("myhostname");
    let org = cfg.get("smtp_tls_report_organization");
    let contact = cfg.get("smtp_tls_report_contact");
    let report_id = format!("{day}_{domain}_{}@{submitter}", std::process::id());
    let json = tls_rpt::report_json(&org, &contact, &report_id, day, domain, &attempts);
    let gz = tls_rpt::gzip(json.as_bytes());
    let (begin, end) = day_bounds(day)?;
    let filename = format!("{submitter}!{domain}!{begin}!{end}.json.gz");
    let mut sent = 0;
    let mut errors = Vec::new();
    for uri in &rua {
        let r = if let Some(to) = uri.strip_prefix("mailto:") {
            let msg = message(&submitter, &contact, to, domain, &report_id, &filename, &gz);
            submit(cfg, &contact, to, &msg)
        } else {
            post(dns, uri, &gz, cfg)
        };
        match r {
            Ok(()) => sent += 1,
            Err(e) => errors.push(format!("{uri}: {e}")),
        }
    }
    if !errors.is_empty() && sent == 0 {
        return Err(errors.join("; "));
    }
    for e in errors {
        eprintln!("{NAME}: tls-report: {day} {domain}: {e}");
    }
    Ok(sent)
}

/// The first and last second of UTC day `YYYY-MM-DD`.
fn day_bounds(day: &str) -> Result<(u64, u64), String> {
    let mut p = day.split('-').map(|x| x.parse::<i64>());
    let (Some(Ok(y)), Some(Ok(m)), Some(Ok(d))) = (p.next(), p.next(), p.next()) else {
        return Err(format!("bad day {day}"));
    };
    let days = postern_common::time::days_from_civil(y, m, d);
    let begin = (days * 86400) as u64;
    Ok((begin, begin + 86399))
}

/// The RFC 8460 section 5.3 message.
fn message(
    submitter: &str,
    from: &str,
    to: &str,
    domain: &str,
    report_id: &str,
    filename: &str,
    gz: &[u8],
) -> Vec<u8> {
    let boundary = format!("tlsrpt-{}-{}", std::process::id(), gz.len());
    let b64 = postern_common::base64::encode(gz);
    let mut body = String::new();
    for chunk in b64.as_bytes().chunks(76) {
        body.push_str(std::str::from_utf8(chunk).unwrap_or(""));
        body.push('\n');
    }
    format!(
        "From: {from}\n\
         To: {to}\n\
         Date: {date}\n\
         Subject: Report Domain: {domain} Submitter: {submitter} Report-ID: <{report_id}>\n\
         TLS-Report-Domain: {domain}\n\
         TLS-Report-Submitter: {submitter}\n\
         MIME-Version: 1.0\n\
         Content-Type: multipart/report; report-type=\"tlsrpt\";\n\tboundary=\"{boundary}\"\n\
         \n\
         This is a multipart message in MIME format.\n\
         \n\
         --{boundary}\n\
         Content-Type: text/plain; charset=\"us-ascii\"\n\
         Content-Transfer-Encoding: 7bit\n\
         \n\
         This is an aggregate TLS report from {submitter}\n\
         \n\
         --{boundary}\n\
         Content-Type: application/tlsrpt+gzip\n\
         Content-Transfer-Encoding: base64\n\
         Content-Disposition: attachment;\n\tfilename=\"{filename}\"\n\
         \n\
         {body}\n\
         --{boundary}--\n",
        date = postern_common::time::rfc5322_date(postern_common::time::now_secs()),
    )
    .into_bytes()
}

/// Submits `msg` through `command_directory/sendmail`.
fn submit(cfg: &Config, from: &str, to: &str, msg: &[u8]) -> Result<(), String> {
    let sendmail = PathBuf::from(cfg.get("command_directory")).join("sendmail");
    let mut cmd = Command::new(&sendmail);
    cmd.arg("-C").arg(cfg.dir());
    let mut child = cmd
        .args(["-i", "-f", from, "--", to])
        .stdin(Stdio::piped())
        .spawn()
        .map_err(|e| format!("{}: {e}", sendmail.display()))?;
    child
        .stdin
        .take()
        .ok_or("no pipe to sendmail")?
        .write_all(msg)
        .map_err(|e| format!("sendmail: {e}"))?;
    let st = child.wait().map_err(|e| format!("sendmail: {e}"))?;
    if !st.success() {
        return Err(format!("sendmail exited with {st}"));
    }
    Ok(())
}

/// POSTs the report to an `https:` address (RFC 8460 section 5.4).
fn post(dns: &BlockingResolver, uri: &str, gz: &[u8], cfg: &Config) -> Result<(), String> {
    let rest = uri.strip_prefix("https://").ok_or("not an https URI")?;
    let (hostport, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let (host, port) = match hostport.rsplit_once(':') {
        Some((h, p)) => (h, p.parse().map_err(|_| "bad port")?),
        None => (hostport, 443),
    };
    let addrs = dns.addrs(host).map_err(|e| format!("{host}: {e:?}"))?;
    let roots =
        postern_common::https::web_roots(&cfg.get("smtp_tls_CAfile"), &cfg.get("smtp_tls_CApath"));
    let req = postern_common::https::Request {
        method: "POST",
        host,
        port,
        path,
        body: Some(("application/tlsrpt+gzip", gz)),
        limit: 64 * 1024,
        timeout: Duration::from_secs(30),
    };
    let r = postern_common::https::request(&req, &addrs, std::sync::Arc::new(roots))?;
    if !(200..300).contains(&r.status) {
        return Err(format!("HTTP status {}", r.status));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn days() {
        assert_eq!(day_bounds("1970-01-02").unwrap(), (86400, 172_799));
        let (b, _) = day_bounds("2026-12-06").unwrap();
        assert_eq!(tls_rpt::utc_day(b), "2026-12-06");
        assert_eq!(tls_rpt::utc_day(b - 1), "2026-12-05");
    }
}
