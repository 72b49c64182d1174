//! MTA-STS (RFC 8461): a destination domain's policy for mail sent to it.
//!
//! The smtp client asks [`Sts::lookup`] for the domain of a delivery by MX
//! (never for a next hop in brackets, a relayhost or an LMTP destination:
//! RFC 8461 applies to the recipient domain's MX hosts, as
//! postfix-mta-sts-resolver applies it). The course, as RFC 8461 sections
//! 3 and 5 set it:
//! - the TXT record `_mta-sts.DOMAIN` (`v=STSv1; id=...`) says that there
//!   is a policy and which version ([`parse_txt`]);
//! - the policy is fetched from
//!   `https://mta-sts.DOMAIN/.well-known/mta-sts.txt`
//!   ([`crate::https`]: WebPKI with the system roots and `smtp_tls_CAfile`,
//!   no redirects, at most 64 KiB, [`FETCH_TIMEOUT`]), and parsed
//!   ([`parse_policy`]: `version: STSv1`, `mode`, `mx`, `max_age`);
//! - it is kept until `max_age` runs out: in this process's memory and in
//!   `data_directory/mta-sts/DOMAIN` (written to a temporary file and
//!   renamed, so that every smtp process and a restart read a whole one);
//!   a TXT record with another `id` makes it fetched again; a fetch that
//!   fails keeps the cached policy (and is a failure for TLS-RPT); a
//!   domain whose TXT record went away keeps its cached policy until it
//!   expires (RFC 8461 section 5.1).
//!
//! What a policy means for delivery is the client's: `enforce` delivers
//! only to an MX host the policy lists ([`Policy::lists`]) over TLS with a
//! certificate valid for that host name by WebPKI; `testing` delivers as
//! before and reports; `none` is no policy.

use crate::dns::{BlockingResolver, TxtError};
use crate::hostname::valid_hostname;
use crate::https;
use crate::tls::rustls::RootCertStore;
use std::collections::HashMap;
use std::io::Write;
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// The longest policy accepted (RFC 8461 section 3.3: 64 KiB).
pub const POLICY_LIMIT: usize = 64 * 1024;
/// The time a policy fetch may take, connection to body.
pub const FETCH_TIMEOUT: Duration = Duration::from_secs(15);
/// The largest `max_age` (RFC 8461 section 3.2: 31557600 seconds).
pub const MAX_AGE_LIMIT: u64 = 31_557_600;

/// A policy's mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Enforce,
    Testing,
    None,
}

impl Mode {
    pub fn name(self) -> &'static str {
        match self {
            Mode::Enforce => "enforce",
            Mode::Testing => "testing",
            Mode::None => "none",
        }
    }
}

/// A domain's policy, as fetched.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    /// The policy domain.
    pub domain: String,
    /// The `id` of the TXT record it was fetched for.
    pub id: String,
    pub mode: Mode,
    /// `mx` patterns (lower case): `host.domain` or `*.domain`.
    pub mx: Vec<String>,
    pub max_age: u64,
    /// Seconds since the epoch when it expires.
    pub expires: u64,
    /// The policy's text, for TLS-RPT's `policy-string`.
    pub text: String,
}

impl Policy {
    /// Whether `host` (an MX host name) is listed: equal to a pattern, or
    /// one label more than a `*.` pattern (RFC 8461 section 4.1).
    pub fn lists(&self, host: &str) -> bool {
        self.mx.iter().any(|p| mx_matches(p, host))
    }

    /// The policy's lines, for TLS-RPT's `policy-string`.
    pub fn lines(&self) -> Vec<String> {
        self.text
            .lines()
            .map(|l| l.trim_end_matches('\r').to_string())
            .filter(|l| !l.trim().is_empty())
            .collect()
    }
}

/// Whether MX host `host` matches `pattern` (RFC 8461 section 4.1): the
/// same name, or for `*.rest` a name of one label more ending in `.rest`.
/// Case and a final dot do not count.
pub fn mx_matches(pattern: &str, host: &str) -> bool {
    let p = pattern.trim_end_matches('.').to_ascii_lowercase();
    let h = host.trim_end_matches('.').to_ascii_lowercase();
    match p.strip_prefix("*.") {
        Some(rest) => match h.split_once('.') {
            Some((first, tail)) => !first.is_empty() && tail == rest,
            None => false,
        },
        None => p == h,
    }
}

/// The `id` of a domain's STS TXT record among the TXT records of
/// `_mta-sts.DOMAIN` (RFC 8461 section 3.1): the records that start with
/// `v=STSv1`; Ok(None) when there is none, Err when there are several or
/// it has no valid `id` (both: "no policy").
pub fn parse_txt(records: &[String]) -> Result<Option<String>, String> {
    let sts: Vec<&String> = records
        .iter()
        .filter(|r| r.split(';').next().is_some_and(|f| f.trim() == "v=STSv1"))
        .collect();
    let rec = match sts.as_slice() {
        [] => return Ok(None),
        [one] => *one,
        _ => return Err("more than one v=STSv1 TXT record".into()),
    };
    for field in rec.split(';').skip(1) {
        let Some((k, v)) = field.trim().split_once('=') else {
            continue;
        };
        if k.trim() == "id" {
            let v = v.trim();
            if v.is_empty() || v.len() > 32 || !v.bytes().all(|b| b.is_ascii_alphanumeric()) {
                return Err(format!("invalid id \"{v:.40}\""));
            }
            return Ok(Some(v.to_string()));
        }
    }
    Err("no id in the v=STSv1 TXT record".into())
}

/// The mode, MX patterns and `max_age` of a policy's text (RFC 8461
/// section 3.2): `key: value` lines; `version: STSv1` required, unknown
/// keys ignored; `mx` required unless the mode is `none`.
pub fn parse_policy(text: &str) -> Result<(Mode, Vec<String>, u64), String> {
    let mut version = None;
    let mut mode = None;
    let mut max_age = None;
    let mut mx = Vec::new();
    for line in text.lines() {
        let line = line.trim_end_matches('\r');
        if line.trim().is_empty() {
            continue;
        }
        let Some((k, v)) = line.split_once(':') else {
            return Err(format!("malformed line \"{line:.60}\""));
        };
        let (k, v) = (k.trim(), v.trim());
        match k {
            "version" => version = Some(v.to_string()),
            "mode" => {
                mode = Some(match v {
                    "enforce" => Mode::Enforce,
                    "testing" => Mode::Testing,
                    "none" => Mode::None,
                    _ => return Err(format!("invalid mode \"{v:.40}\"")),
                })
            }
            "max_age" => {
                let n: u64 = v
                    .parse()
                    .ok()
                    .filter(|_| v.len() <= 10 && v.bytes().all(|b| b.is_ascii_digit()))
                    .ok_or_else(|| format!("invalid max_age \"{v:.40}\""))?;
                max_age = Some(n.min(MAX_AGE_LIMIT));
            }
            "mx" => {
                let host = v.strip_prefix("*.").unwrap_or(v);
                if !valid_hostname(host) {
                    return Err(format!("invalid mx \"{v:.80}\""));
                }
                mx.push(v.to_ascii_lowercase());
            }
            _ => {}
        }
    }
    if version.as_deref() != Some("STSv1") {
        return Err("no \"version: STSv1\"".into());
    }
    let mode = mode.ok_or("no mode")?;
    let max_age = max_age.ok_or("no max_age")?;
    if mx.is_empty() && mode != Mode::None {
        return Err("no mx".into());
    }
    Ok((mode, mx, max_age))
}

/// The lookups [`Sts::lookup`] needs (DNS in the programs, a table in
/// unit tests).
pub trait Dns {
    fn txt(&self, name: &str) -> Result<Vec<String>, TxtError>;
    fn addrs(&self, name: &str) -> Result<Vec<IpAddr>, TxtError>;
}

impl Dns for BlockingResolver {
    fn txt(&self, name: &str) -> Result<Vec<String>, TxtError> {
        BlockingResolver::txt(self, name)
    }
    fn addrs(&self, name: &str) -> Result<Vec<IpAddr>, TxtError> {
        BlockingResolver::addrs(self, name)
    }
}

/// The RFC 8460 result types of a failed policy lookup.
pub const FETCH_ERROR: &str = "sts-policy-fetch-error";
pub const POLICY_INVALID: &str = "sts-policy-invalid";
pub const WEBPKI_INVALID: &str = "sts-webpki-invalid";

/// What [`Sts::lookup`] found.
#[derive(Debug, Clone, Default)]
pub struct Found {
    /// The policy in force (fresh or cached); None: no policy.
    pub policy: Option<Policy>,
    /// A policy that could not be fetched: its RFC 8460 result type and
    /// the reason.
    pub failure: Option<(&'static str, String)>,
}

/// The policies of a process: a memory cache over the shared one in
/// `data_directory/mta-sts`.
pub struct Sts {
    dir: Option<PathBuf>,
    roots: Arc<RootCertStore>,
    mem: Mutex<HashMap<String, Policy>>,
    /// The port of the policy host (443; tests may not change it).
    port: u16,
}

impl Sts {
    /// Policies cached under `dir` (None: in memory only), fetched
    /// trusting `roots`.
    pub fn new(dir: Option<PathBuf>, roots: RootCertStore) -> Sts {
        Sts {
            dir,
            roots: Arc::new(roots),
            mem: Mutex::new(HashMap::new()),
            port: 443,
        }
    }

    /// The policy of `domain` at time `now` (see the module doc).
    pub fn lookup(&self, domain: &str, dns: &dyn Dns, now: u64) -> Found {
        let domain = domain.trim_end_matches('.').to_ascii_lowercase();
        if !valid_hostname(&domain) || !domain.contains('.') {
            return Found::default();
        }
        let cached = self.cached(&domain, now);
        let id = match dns.txt(&format!("_mta-sts.{domain}")) {
            Ok(recs) => match parse_txt(&recs) {
                Ok(id) => id,
                Err(e) => {
                    crate::info!("MTA-STS: _mta-sts.{domain}: {e}; taken as no record");
                    None
                }
            },
            Err(TxtError::NotFound) => None,
            Err(TxtError::TryAgain(e)) => {
                crate::info!("MTA-STS: TXT lookup for _mta-sts.{domain} failed: {e}");
                None
            }
        };
        let Some(id) = id else {
            return Found {
                policy: cached,
                failure: None,
            };
        };
        if let Some(c) = &cached {
            if c.id == id {
                return Found {
                    policy: cached,
                    failure: None,
                };
            }
        }
        match self.fetch(&domain, dns) {
            Ok(text) => match parse_policy(&text) {
                Ok((mode, mx, max_age)) => {
                    let p = Policy {
                        domain: domain.clone(),
                        id,
                        mode,
                        mx,
                        max_age,
                        expires: now.saturating_add(max_age),
                        text,
                    };
                    crate::info!(
                        "MTA-STS: policy for {domain} fetched: id={} mode={} max_age={}",
                        p.id,
                        mode.name(),
                        max_age
                    );
                    self.store(&p);
                    Found {
                        policy: Some(p),
                        failure: None,
                    }
                }
                Err(e) => {
                    crate::warning!("MTA-STS: invalid policy for {domain}: {e}");
                    Found {
                        policy: cached,
                        failure: Some((POLICY_INVALID, e)),
                    }
                }
            },
            Err((kind, e)) => {
                crate::warning!("MTA-STS: cannot fetch the policy of {domain}: {e}");
                Found {
                    policy: cached,
                    failure: Some((kind, e)),
                }
            }
        }
    }

    /// Fetches the policy text of `domain`.
    fn fetch(&self, domain: &str, dns: &dyn Dns) -> Result<String, (&'static str, String)> {
        let host = format!("mta-sts.{domain}");
        let addrs = dns.addrs(&host).map_err(|e| {
            let why = match e {
                TxtError::NotFound => format!("{host}: host not found"),
                TxtError::TryAgain(e) => e,
            };
            (FETCH_ERROR, why)
        })?;
        let req = https::Request {
            method: "GET",
            host: &host,
            port: self.port,
            path: "/.well-known/mta-sts.txt",
            body: None,
            limit: POLICY_LIMIT,
            timeout: FETCH_TIMEOUT,
        };
        let r = https::request(&req, &addrs, self.roots.clone()).map_err(|e| {
            // rustls says "invalid peer certificate: ..." for a
            // certificate WebPKI refused.
            let kind = if e.contains("invalid peer certificate") {
                WEBPKI_INVALID
            } else {
                FETCH_ERROR
            };
            (kind, e)
        })?;
        if r.status != 200 {
            return Err((FETCH_ERROR, format!("{host}: HTTP status {}", r.status)));
        }
        String::from_utf8(r.body).map_err(|_| (POLICY_INVALID, format!("{host}: not UTF-8")))
    }

    /// The cached policy of `domain` that has not expired: from memory,
    /// else from the shared file.
    fn cached(&self, domain: &str, now: u64) -> Option<Policy> {
        let mut mem = self.mem.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(p) = mem.get(domain) {
            if p.expires > now {
                // Another process may have fetched a newer one: the file
                // wins when it differs.
                if let Some(f) = self.read_file(domain) {
                    if f.expires > now && f != *p {
                        mem.insert(domain.to_string(), f.clone());
                        return Some(f);
                    }
                }
                return Some(p.clone());
            }
            mem.remove(domain);
        }
        let f = self.read_file(domain).filter(|f| f.expires > now)?;
        mem.insert(domain.to_string(), f.clone());
        Some(f)
    }

    fn read_file(&self, domain: &str) -> Option<Policy> {
        let path = self.dir.as_ref()?.join(domain);
        let text = std::fs::read_to_string(path).ok()?;
        let (first, body) = text.split_once('\n')?;
        let mut w = first.split_whitespace();
        let id = w.next()?.to_string();
        let expires: u64 = w.next()?.parse().ok()?;
        let (mode, mx, max_age) = parse_policy(body).ok()?;
        Some(Policy {
            domain: domain.to_string(),
            id,
            mode,
            mx,
            max_age,
            expires,
            text: body.to_string(),
        })
    }

    /// Keeps `p` in memory and in the shared file (a temporary file
    /// renamed over the old one: readers see the old or the new).
    fn store(&self, p: &Policy) {
        self.mem
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(p.domain.clone(), p.clone());
        let Some(dir) = &self.dir else { return };
        let write = || -> std::io::Result<()> {
            std::fs::create_dir_all(dir)?;
            let tmp = dir.join(format!(".{}.{}", p.domain, std::process::id()));
            let mut f = std::fs::File::create(&tmp)?;
            f.write_all(format!("{} {}\n{}", p.id, p.expires, p.text).as_bytes())?;
            f.sync_all()?;
            std::fs::rename(&tmp, dir.join(&p.domain))
        };
        if let Err(e) = write() {
            crate::warning!(
                "MTA-STS: cannot save the policy of {} under {}: {e}",
                p.domain,
                dir.display()
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn txt_records() {
        let r = |v: &[&str]| parse_txt(&v.iter().map(|s| s.to_string()).collect::<Vec<_>>());
        assert_eq!(
            r(&["v=STSv1; id=20260101T00"]),
            Ok(Some("20260101T00".into()))
        );
        assert_eq!(r(&["v=spf1 -all"]), Ok(None));
        assert!(r(&["v=STSv1; id=a", "v=STSv1; id=b"]).is_err());
        assert!(r(&["v=STSv1;"]).is_err());
        assert!(r(&["v=STSv1; id=bad-id"]).is_err());
    }

    #[test]
    fn policies_and_patterns() {
        let (m, mx, age) = parse_policy(
            "version: STSv1\r\nmode: enforce\r\nmx: mail.example.com\r\nmx: *.example.net\r\nmax_age: 604800\r\n",
        )
        .unwrap();
        assert_eq!(m, Mode::Enforce);
        assert_eq!(age, 604800);
        let p = Policy {
            domain: "example.com".into(),
            id: "1".into(),
            mode: m,
            mx,
            max_age: age,
            expires: 0,
            text: String::new(),
        };
        assert!(p.lists("MAIL.example.com."));
        assert!(p.lists("mx1.example.net"));
        assert!(!p.lists("a.b.example.net"));
        assert!(!p.lists("example.net"));
        assert!(!p.lists("other.example.com"));
        assert!(parse_policy("version: STSv1\nmode: enforce\nmax_age: 1\n").is_err());
        assert!(parse_policy("mode: testing\nmx: a.b\nmax_age: 1\n").is_err());
        assert!(parse_policy("version: STSv1\nmode: bogus\nmx: a.b\nmax_age: 1\n").is_err());
        assert_eq!(
            parse_policy("version: STSv1\nmode: none\nmax_age: 9999999999\n")
                .unwrap()
                .2,
            MAX_AGE_LIMIT
        );
    }

    struct NoDns;
    impl Dns for NoDns {
        fn txt(&self, _: &str) -> Result<Vec<String>, TxtError> {
            Ok(vec!["v=STSv1; id=abc".into()])
        }
        fn addrs(&self, _: &str) -> Result<Vec<IpAddr>, TxtError> {
            Err(TxtError::NotFound)
        }
    }

    #[test]
    fn cache_survives_processes_and_expires() {
        let dir = std::env::temp_dir().join(format!("sts-test-{}", std::process::id()));
        let a = Sts::new(Some(dir.clone()), RootCertStore::empty());
        let p = Policy {
            domain: "example.com".into(),
            id: "abc".into(),
            mode: Mode::Testing,
            mx: vec!["mx.example.com".into()],
            max_age: 100,
            expires: 1100,
            text: "version: STSv1\nmode: testing\nmx: mx.example.com\nmax_age: 100\n".into(),
        };
        a.store(&p);
        // Another process: same id in DNS, no fetch needed.
        let b = Sts::new(Some(dir.clone()), RootCertStore::empty());
        let f = b.lookup("example.com", &NoDns, 1000);
        assert_eq!(f.policy.as_ref(), Some(&p));
        assert!(f.failure.is_none());
        // Expired: fetched again, which fails here.
        let f = b.lookup("example.com", &NoDns, 1200);
        assert!(f.policy.is_none());
        assert_eq!(f.failure.map(|x| x.0), Some(FETCH_ERROR));
        let _ = std::fs::remove_dir_all(dir);
    }
}
