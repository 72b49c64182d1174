//! The client side of Postfix's policy delegation protocol
//! (SMTPD_POLICY_README), for `check_policy_service`.
//!
//! A request is `name=value` lines ended by an empty line; the server
//! answers `action=...` lines ended by an empty line, on the same
//! connection, which stays open for the next request. The endpoint is
//! `inet:host:port` or `unix:path` (a relative path is under the queue
//! directory, as `private/policy`); Postfix 3.7's `{ endpoint,
//! name=value, ... }` form overrides the settings below for that server.
//!
//! One connection per endpoint is kept by the process and reused by its
//! sessions, until it has been idle `smtpd_policy_service_max_idle`, is
//! older than `smtpd_policy_service_max_ttl`, or has carried
//! `smtpd_policy_service_request_limit` requests (0: no limit). Every
//! read and write waits at most `smtpd_policy_service_timeout`. A request
//! that fails (connect, I/O, a reply without `action=`) is tried again on
//! a fresh connection after `smtpd_policy_service_retry_delay`, up to
//! `smtpd_policy_service_try_limit` attempts; then the caller applies
//! `smtpd_policy_service_default_action`.
//!
//! The exchange is synchronous: while a policy server thinks, this
//! smtpd process's other sessions wait (a local policy server such as
//! postgrey answers in milliseconds; the timeout bounds the rest).

use postern_common::warning;
use postern_conf::Config;
use std::collections::HashMap;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Longest reply accepted (Postfix limits attribute values similarly).
const MAX_REPLY: usize = 64 * 1024;

/// The `smtpd_policy_service_*` settings.
#[derive(Debug, Clone)]
pub struct PolicySettings {
    pub timeout: Duration,
    pub max_idle: Duration,
    pub max_ttl: Duration,
    pub request_limit: u64,
    pub try_limit: u64,
    pub retry_delay: Duration,
    pub default_action: String,
    pub policy_context: String,
    /// Told to the server (`compatibility_level`, `mail_version`).
    pub compatibility_level: String,
    pub mail_version: String,
    /// Where relative `unix:` names are found.
    pub queue_directory: PathBuf,
}

impl Default for PolicySettings {
    fn default() -> Self {
        PolicySettings {
            timeout: Duration::from_secs(100),
            max_idle: Duration::from_secs(300),
            max_ttl: Duration::from_secs(1000),
            request_limit: 0,
            try_limit: 2,
            retry_delay: Duration::from_secs(1),
            default_action: "451 4.3.5 Server configuration problem".into(),
            policy_context: String::new(),
            compatibility_level: String::new(),
            mail_version: String::new(),
            queue_directory: PathBuf::from("/var/spool/postern"),
        }
    }
}

impl PolicySettings {
    pub fn from_config(cfg: &Config) -> Result<PolicySettings, String> {
        let time = |n: &str| {
            cfg.get_time(n)
                .map(Duration::from_secs)
                .map_err(|e| e.to_string())
        };
        let num = |n: &str| cfg.get_u64(n).map_err(|e| e.to_string());
        Ok(PolicySettings {
            timeout: time("smtpd_policy_service_timeout")?,
            max_idle: time("smtpd_policy_service_max_idle")?,
            max_ttl: time("smtpd_policy_service_max_ttl")?,
            request_limit: num("smtpd_policy_service_request_limit")?,
            try_limit: num("smtpd_policy_service_try_limit")?.max(1),
            retry_delay: time("smtpd_policy_service_retry_delay")?,
            default_action: cfg.get("smtpd_policy_service_default_action"),
            policy_context: cfg.get("smtpd_policy_service_policy_context"),
            compatibility_level: cfg.get("compatibility_level"),
            mail_version: cfg.get("mail_version"),
            queue_directory: postern_common::service::queue_directory(cfg),
        })
    }
}

/// Where a policy server listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    Inet(String),
    Unix(PathBuf),
}

impl Endpoint {
    /// `inet:host:port` (`[v6]:port` too) or `unix:path`.
    pub fn parse(spec: &str, queue_directory: &std::path::Path) -> Result<Endpoint, String> {
        if let Some(hp) = spec.strip_prefix("inet:") {
            let ok = hp
                .rsplit_once(':')
                .is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok());
            if !ok {
                return Err(format!("{spec}: expected inet:host:port"));
            }
            let hp = hp.replace(['[', ']'], "");
            let hp = match hp.rsplit_once(':') {
                Some((h, p)) if h.contains(':') => format!("[{h}]:{p}"),
                _ => hp,
            };
            return Ok(Endpoint::Inet(hp));
        }
        if let Some(p) = spec.strip_prefix("unix:") {
            if p.is_empty() {
                return Err(format!("{spec}: expected unix:pathname"));
            }
            let path = PathBuf::from(p);
            return Ok(Endpoint::Unix(if path.is_absolute() {
                path
            } else {
                queue_directory.join(path)
            }));
        }
        Err(format!("{spec}: expected inet:host:port or unix:pathname"))
    }
}

trait Stream: Read + Write + Send {}
impl<T: Read + Write + Send> Stream for T {}

struct Conn {
    stream: Box<dyn Stream>,
    opened: Instant,
    last_used: Instant,
    requests: u64,
}

/// The process's policy connections, one per server (as named in the
/// restriction, so that a `{ endpoint, name=value }` form has its own).
#[derive(Default)]
pub struct PolicyClient {
    /// The `smtpd_policy_service_*` parameters.
    pub settings: PolicySettings,
    /// Per server named in a list: its endpoint and its settings (the
    /// parameters with the `{ }` form's overrides).
    servers: HashMap<String, (String, PolicySettings)>,
    conns: Mutex<HashMap<String, Conn>>,
}

impl std::fmt::Debug for PolicyClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PolicyClient")
            .field("settings", &self.settings)
            .finish()
    }
}

impl Clone for PolicyClient {
    /// A copy with the same settings and no open connection.
    fn clone(&self) -> Self {
        PolicyClient {
            settings: self.settings.clone(),
            servers: self.servers.clone(),
            conns: Mutex::default(),
        }
    }
}

impl PolicyClient {
    /// The client for the servers `specs` (the arguments of the lists'
    /// `check_policy_service`); Err: one that cannot be used.
    pub fn from_config<'a>(
        cfg: &Config,
        specs: impl Iterator<Item = &'a str>,
    ) -> Result<PolicyClient, String> {
        let settings = PolicySettings::from_config(cfg)?;
        let mut servers = HashMap::new();
        for spec in specs {
            let (endpoint, overrides) = postern_common::restriction::policy_server(spec)
                .map_err(|e| format!("check_policy_service: {e}"))?;
            Endpoint::parse(&endpoint, &settings.queue_directory)
                .map_err(|e| format!("check_policy_service: {e}"))?;
            let own = if overrides.is_empty() {
                settings.clone()
            } else {
                let mut c = cfg.clone();
                c.set_overrides(
                    overrides
                        .into_iter()
                        .map(|(n, v)| (format!("smtpd_policy_service_{n}"), v)),
                );
                PolicySettings::from_config(&c).map_err(|e| format!("{spec}: {e}"))?
            };
            servers.insert(spec.to_string(), (endpoint, own));
        }
        Ok(PolicyClient {
            settings,
            servers,
            conns: Mutex::default(),
        })
    }

    /// The settings that apply to server `spec`.
    pub fn settings_of(&self, spec: &str) -> &PolicySettings {
        self.servers
            .get(spec)
            .map(|(_, s)| s)
            .unwrap_or(&self.settings)
    }

    /// Sends `attrs` to the server `spec` and returns its action (the
    /// value of `action=`); None: the server could not be asked (logged),
    /// the caller applies the default action.
    pub fn query(&self, spec: &str, attrs: &[(&str, String)]) -> Option<String> {
        let mut request = String::new();
        for (k, v) in attrs {
            // A value never carries a line break (it would end the request).
            let v: String = v.chars().filter(|c| *c != '\n' && *c != '\r').collect();
            request.push_str(&format!("{k}={v}\n"));
        }
        request.push('\n');
        let s = self.settings_of(spec);
        let mut conns = self.conns.lock().unwrap_or_else(|e| e.into_inner());
        for attempt in 0..s.try_limit {
            if attempt > 0 {
                std::thread::sleep(s.retry_delay);
            }
            let now = Instant::now();
            let stale = conns.get(spec).is_some_and(|c| {
                now.duration_since(c.last_used) >= s.max_idle
                    || now.duration_since(c.opened) >= s.max_ttl
                    || (s.request_limit > 0 && c.requests >= s.request_limit)
            });
            if stale {
                conns.remove(spec);
            }
            if !conns.contains_key(spec) {
                match self.connect(spec) {
                    Ok(stream) => {
                        conns.insert(
                            spec.to_string(),
                            Conn {
                                stream,
                                opened: now,
                                last_used: now,
                                requests: 0,
                            },
                        );
                    }
                    Err(e) => {
                        warning!("problem talking to server {spec}: {e}");
                        continue;
                    }
                }
            }
            let conn = conns.get_mut(spec).expect("inserted above");
            match exchange(conn.stream.as_mut(), request.as_bytes()) {
                Ok(reply) => {
                    conn.requests += 1;
                    conn.last_used = Instant::now();
                    match action_of(&reply) {
                        Some(a) => return Some(a),
                        None => {
                            warning!("{spec}: missing or bad action in policy server reply");
                            conns.remove(spec);
                        }
                    }
                }
                Err(e) => {
                    warning!("problem talking to server {spec}: {e}");
                    conns.remove(spec);
                }
            }
        }
        warning!(
            "access policy server {spec} could not be reached after {} attempts",
            s.try_limit
        );
        None
    }

    fn connect(&self, spec: &str) -> std::io::Result<Box<dyn Stream>> {
        let s = self.settings_of(spec);
        let t = s.timeout;
        let name = self
            .servers
            .get(spec)
            .map(|(e, _)| e.as_str())
            .unwrap_or(spec);
        let endpoint = Endpoint::parse(name, &s.queue_directory).map_err(std::io::Error::other)?;
        Ok(match endpoint {
            Endpoint::Inet(hp) => Box::new(postern_common::tcp::connect(hp.as_str(), t)?),
            Endpoint::Unix(p) => {
                let s = UnixStream::connect(&p)
                    .map_err(|e| std::io::Error::new(e.kind(), format!("{}: {e}", p.display())))?;
                s.set_read_timeout(Some(t))?;
                s.set_write_timeout(Some(t))?;
                Box::new(s)
            }
        })
    }
}

/// Writes one request and reads the reply up to its empty line.
fn exchange(stream: &mut dyn Stream, request: &[u8]) -> std::io::Result<String> {
    stream.write_all(request)?;
    stream.flush()?;
    let mut reply = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        if reply.starts_with(b"\n") || reply.windows(2).any(|w| w == b"\n\n") {
            break;
        }
        if reply.len() > MAX_REPLY {
            return Err(std::io::Error::other("reply too long"));
        }
        let n = stream.read(&mut buf)?;
        if n == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "connection closed",
            ));
        }
        reply.extend_from_slice(&buf[..n]);
    }
    Ok(String::from_utf8_lossy(&reply).replace('\r', ""))
}

/// The value of the reply's `action=` attribute.
pub fn action_of(reply: &str) -> Option<String> {
    reply
        .lines()
        .take_while(|l| !l.is_empty())
        .find_map(|l| l.strip_prefix("action="))
        .map(|a| a.trim().to_string())
        .filter(|a| !a.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints() {
        let q = std::path::Path::new("/q");
        assert_eq!(
            Endpoint::parse("inet:127.0.0.1:10023", q).unwrap(),
            Endpoint::Inet("127.0.0.1:10023".into())
        );
        assert_eq!(
            Endpoint::parse("inet:[::1]:10023", q).unwrap(),
            Endpoint::Inet("[::1]:10023".into())
        );
        assert_eq!(
            Endpoint::parse("unix:private/policy", q).unwrap(),
            Endpoint::Unix("/q/private/policy".into())
        );
        assert_eq!(
            Endpoint::parse("unix:/run/p.sock", q).unwrap(),
            Endpoint::Unix("/run/p.sock".into())
        );
        assert!(Endpoint::parse("inet:host", q).is_err());
        assert!(Endpoint::parse("private/policy", q).is_err());
    }

    #[test]
    fn the_action_of_a_reply() {
        assert_eq!(
            action_of("action=DEFER_IF_PERMIT Greylisted\n\n").as_deref(),
            Some("DEFER_IF_PERMIT Greylisted")
        );
        assert_eq!(
            action_of("foo=1\naction=dunno\n\n").as_deref(),
            Some("dunno")
        );
        assert_eq!(action_of("\n"), None);
    }
}

#[cfg(test)]
mod braced_tests {
    use super::*;

    #[test]
    fn a_braced_server_has_its_own_settings() {
        let cfg = Config::from_text(
            std::path::Path::new("/nonexistent"),
            "smtpd_policy_service_policy_context = global\n",
            std::path::Path::new("main.cf"),
        )
        .unwrap();
        let spec = "{ inet:127.0.0.1:1, retry_delay=0s, { default_action = DUNNO } }";
        let c = PolicyClient::from_config(&cfg, [spec].into_iter()).unwrap();
        assert_eq!(c.settings_of(spec).default_action, "DUNNO");
        assert_eq!(c.settings_of(spec).retry_delay, Duration::ZERO);
        assert_eq!(c.settings_of(spec).policy_context, "global");
    }
}
