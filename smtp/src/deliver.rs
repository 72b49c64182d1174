//! One delivery request, from next hop to recorded outcomes.
//!
//! [`Agent::deliver`] parses the request's next hop, finds the servers to
//! try ([`crate::nexthop`], with DNS from [`crate::dns`]), connects to
//! each address in turn within `smtp_connect_timeout`, and runs the SMTP
//! conversation ([`crate::client`]) until every recipient has an outcome.
//! A server that cannot be reached, or that ends the session before any
//! content was sent, passes the recipients still without an outcome on to
//! the next address; at most `smtp_mx_session_limit` servers that got as
//! far as EHLO are tried. What is left when no address remains is
//! deferred with the last reason, and when no server even completed the
//! handshake the destination is reported as failed.

use crate::cache::Cache;
use crate::client::{self, End, PeerId, Settings, Timeouts, Transaction};
use crate::dns::Resolver;
use crate::nexthop::{self, Failure, LmtpHop, NextHop, Server};
use crate::sasl;
use crate::tls;
use postern_common::delivery::Job;
use postern_common::ipc::{DeliveryRecipient, Outcome};
use postern_common::maps::Tables;
use postern_conf::Config;
use std::io::{self, Read};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// The agent's settings and its DNS resolver, made once per process.
pub struct Agent {
    settings: Settings,
    connect_timeout: Duration,
    options: nexthop::Options,
    /// Most sessions per request that got past EHLO; 0 = no limit.
    session_limit: usize,
    dns_servers: Vec<SocketAddr>,
    dns_timeout: Duration,
    /// Started on first use: a delivery to `[address]` needs no DNS.
    /// Shared by the process's delivery threads.
    resolver: Mutex<Option<Arc<Resolver>>>,
    /// LMTP mode (the `lmtp` program): next hops `unix:PATH` and
    /// `inet:host:port`, LHLO, a reply per recipient.
    lmtp: bool,
    /// Where relative `unix:` paths start (`queue_directory`).
    queue_dir: PathBuf,
    /// The name a Unix-socket peer is given in logs (`myhostname`).
    myhostname: String,
    /// `smtp_tls_security_level` (for LMTP `lmtp_tls_security_level`).
    tls_level: tls::Level,
    /// `smtp_tls_policy_maps`.
    tls_policy_maps: Tables,
    ca_file: String,
    ca_path: String,
    tls_loglevel: u32,
    /// `smtp_tls_wrappermode`.
    tls_wrapper: bool,
    /// `minimal_backoff_time`: after a failed handshake at level `may`, a
    /// message that waited this long is sent in plaintext.
    min_backoff: Duration,
    /// `smtp_sasl_auth_enable`.
    sasl_enable: bool,
    /// `smtp_sasl_password_maps`.
    sasl_maps: Tables,
    sasl_plain_opts: sasl::SecurityOptions,
    sasl_tls_opts: sasl::SecurityOptions,
    sasl_filter: Vec<String>,
    /// `smtp_sender_dependent_authentication`.
    sender_dependent: bool,
    /// Sessions kept between requests (`smtp_connection_cache_on_demand`).
    cache: Cache,
    /// `smtp_bind_address`, `smtp_bind_address6`.
    bind: Bind,
}

/// The parameter that configures `smtp_NAME` in this mode (see
/// [`postern_conf::params::smtp_client_param`]).
pub fn param(lmtp: bool, smtp_name: &str) -> String {
    postern_conf::params::smtp_client_param(lmtp, smtp_name)
}

/// A time parameter, with its default when the setting is unusable.
fn time(cfg: &Config, name: &str) -> Duration {
    let secs = cfg.get_time(name).unwrap_or_else(|e| {
        postern_common::warning!("{e}; using the default");
        postern_conf::params::default_of(name)
            .and_then(postern_conf::parse_time)
            .unwrap_or(300)
    });
    Duration::from_secs(secs)
}

/// An address parameter; None when empty (or unusable, with a warning).
fn bind_address(cfg: &Config, name: &str) -> Option<std::net::IpAddr> {
    let v = cfg.get(name);
    let v = v.trim().trim_start_matches('[').trim_end_matches(']');
    if v.is_empty() {
        return None;
    }
    match v.parse() {
        Ok(a) => Some(a),
        Err(_) => {
            postern_common::warning!("{name}: \"{v}\" is not an IP address; ignored");
            None
        }
    }
}

fn number(cfg: &Config, name: &str) -> usize {
    cfg.get_u64(name).unwrap_or_else(|e| {
        postern_common::warning!("{e}; using the default");
        postern_conf::params::default_of(name)
            .and_then(|d| d.parse().ok())
            .unwrap_or(0)
    }) as usize
}

impl Agent {
    /// Reads the `smtp_*` (for LMTP, `lmtp_*` where Postern has them),
    /// `inet_protocols` and `dns_resolver_*` parameters.
    pub fn from_config(cfg: &Config, lmtp: bool) -> Agent {
        let p = |n: &str| param(lmtp, n);
        let dns_servers = postern_common::dns::servers_from_config(cfg);
        Agent {
            settings: Settings {
                helo_name: cfg.get(&p("smtp_helo_name")),
                timeouts: Timeouts {
                    helo: time(cfg, &p("smtp_helo_timeout")),
                    mail: time(cfg, &p("smtp_mail_timeout")),
                    rcpt: time(cfg, &p("smtp_rcpt_timeout")),
                    data_init: time(cfg, &p("smtp_data_init_timeout")),
                    data_xfer: time(cfg, &p("smtp_data_xfer_timeout")),
                    data_done: time(cfg, &p("smtp_data_done_timeout")),
                    quit: time(cfg, &p("smtp_quit_timeout")),
                },
                lmtp,
                keep: cfg
                    .get_bool(&p("smtp_connection_cache_on_demand"))
                    .unwrap_or(true),
                discard: cfg
                    .get_list(&p("smtp_discard_ehlo_keywords"))
                    .iter()
                    .map(|k| k.to_ascii_lowercase())
                    .collect(),
                line_limit: number(cfg, &p("smtp_line_length_limit")),
            },
            connect_timeout: time(cfg, &p("smtp_connect_timeout")),
            options: nexthop::Options::protocols(
                &cfg.get_list("inet_protocols"),
                number(cfg, &p("smtp_mx_address_limit")),
            ),
            session_limit: number(cfg, &p("smtp_mx_session_limit")),
            dns_servers,
            dns_timeout: time(cfg, "dns_resolver_timeout"),
            resolver: Mutex::new(None),
            lmtp,
            queue_dir: postern_common::service::queue_directory(cfg),
            myhostname: cfg.get("myhostname"),
            tls_level: {
                let name = p("smtp_tls_security_level");
                let v = cfg.get(&name);
                tls::Level::parse(&v).unwrap_or_else(|| {
                    postern_common::warning!(
                        "{name}: invalid TLS security level \"{v}\"; using \"may\""
                    );
                    tls::Level::May
                })
            },
            tls_policy_maps: {
                let (t, errors) = Tables::open_list(&cfg.get(&p("smtp_tls_policy_maps")));
                for e in errors {
                    postern_common::error!("{}: {e}", p("smtp_tls_policy_maps"));
                }
                t
            },
            ca_file: cfg.get(&p("smtp_tls_CAfile")),
            ca_path: cfg.get(&p("smtp_tls_CApath")),
            tls_loglevel: number(cfg, &p("smtp_tls_loglevel")) as u32,
            tls_wrapper: cfg.get_bool(&p("smtp_tls_wrappermode")).unwrap_or(false),
            min_backoff: time(cfg, "minimal_backoff_time"),
            sasl_enable: cfg.get_bool(&p("smtp_sasl_auth_enable")).unwrap_or(false),
            sasl_maps: {
                let (t, errors) = Tables::open_list(&cfg.get(&p("smtp_sasl_password_maps")));
                for e in errors {
                    // Every delivery through an AUTH smarthost fails until
                    // it is fixed.
                    postern_common::error!("{}: {e}", p("smtp_sasl_password_maps"));
                }
                t
            },
            sasl_plain_opts: sasl::SecurityOptions::parse(
                &cfg.get_list(&p("smtp_sasl_security_options")),
            ),
            sasl_tls_opts: sasl::SecurityOptions::parse(
                &cfg.get_list(&p("smtp_sasl_tls_security_options")),
            ),
            sasl_filter: cfg
                .get_list(&p("smtp_sasl_mechanism_filter"))
                .iter()
                .map(|m| m.to_ascii_uppercase())
                .collect(),
            sender_dependent: cfg
                .get_bool(&p("smtp_sender_dependent_authentication"))
                .unwrap_or(false),
            bind: Bind {
                v4: bind_address(cfg, &p("smtp_bind_address")),
                v6: bind_address(cfg, &p("smtp_bind_address6")),
            },
            cache: Cache::new(
                time(cfg, &p("smtp_connection_cache_time_limit")),
                time(cfg, &p("smtp_connection_reuse_time_limit")),
                time(cfg, &p("smtp_quit_timeout")),
            ),
        }
    }

    /// The credentials for a session, if AUTH is enabled and the table
    /// has an entry (see [`crate::sasl`] for the lookup order).
    fn sasl_auth(&self, sender: &str, dest: &str, host: &str) -> Option<sasl::Auth> {
        if !self.sasl_enable || self.sasl_maps.is_empty() {
            return None;
        }
        let mut keys: Vec<String> = Vec::new();
        if self.sender_dependent && !sender.is_empty() {
            keys.push(sender.to_ascii_lowercase());
            if let Some(at) = sender.rfind('@') {
                keys.push(sender[at..].to_ascii_lowercase());
            }
        }
        keys.push(dest.trim().to_ascii_lowercase());
        keys.push(host.to_ascii_lowercase());
        let value = keys.iter().find_map(|k| self.sasl_maps.lookup(k))?;
        let Some(creds) = sasl::Credentials::parse(value) else {
            postern_common::warning!(
                "smtp_sasl_password_maps: entry for {host} is not in username:password form"
            );
            return None;
        };
        Some(sasl::Auth {
            creds,
            plain_opts: self.sasl_plain_opts,
            tls_opts: self.sasl_tls_opts,
            filter: self.sasl_filter.clone(),
        })
    }

    /// The TLS policy of a destination: `smtp_tls_policy_maps` by the
    /// next hop as given, then by its host or domain, then by each parent
    /// domain as `.parent`; else the level.
    fn tls_policy(&self, dest: &str, host: &str) -> tls::Policy {
        let mut keys = vec![dest.trim().to_ascii_lowercase(), host.to_ascii_lowercase()];
        // As Postfix: ".example.com" matches the subdomains of example.com.
        let mut rest = host.to_ascii_lowercase();
        while let Some(i) = rest.find('.') {
            rest = rest[i + 1..].to_string();
            if rest.is_empty() {
                break;
            }
            keys.push(format!(".{rest}"));
        }
        for k in &keys {
            if let Some(v) = self.tls_policy_maps.lookup(k) {
                match tls::Policy::parse(v) {
                    Ok(p) => return p,
                    Err(e) => {
                        postern_common::warning!(
                            "smtp_tls_policy_maps: {k}: {e}; using \"encrypt\""
                        );
                        return tls::Policy {
                            level: tls::Level::Encrypt,
                            matches: Vec::new(),
                        };
                    }
                }
            }
        }
        tls::Policy {
            level: self.tls_level,
            matches: Vec::new(),
        }
    }

    /// What a session with `server` (named `name`) needs for TLS.
    fn tls_client(&self, policy: &tls::Policy, name: &str, nexthop: &str) -> Option<tls::Client> {
        let mut policy = policy.clone();
        if self.tls_wrapper && policy.level < tls::Level::Encrypt {
            // Wrapper mode is TLS or nothing.
            policy.level = tls::Level::Encrypt;
        }
        if policy.level == tls::Level::None {
            return None;
        }
        Some(tls::Client {
            wrapper: self.tls_wrapper,
            policy: policy.clone(),
            names: policy.names(name, nexthop),
            roots: tls::roots(&self.ca_file, &self.ca_path),
            loglevel: self.tls_loglevel,
        })
    }

    /// Reads the CA certificates (kept for the process's life).
    pub fn load_tls_roots(&self) {
        let _ = tls::roots(&self.ca_file, &self.ca_path);
    }

    fn resolver(&self) -> Result<Arc<Resolver>, String> {
        let mut r = self.resolver.lock().map_err(|_| "resolver lock poisoned")?;
        if r.is_none() {
            *r = Some(Arc::new(Resolver::new(
                &self.dns_servers,
                self.dns_timeout,
            )?));
        }
        Ok(r.as_ref().expect("just set").clone())
    }

    /// The servers for a next hop.
    fn servers(&self, hop: &NextHop) -> Result<Vec<Server>, Failure> {
        let options = self.options.clone();
        if !hop.mx {
            if let Ok(addr) = hop.host.parse() {
                return Ok(vec![Server {
                    name: hop.host.clone(),
                    addr,
                    port: hop.port,
                }]);
            }
        }
        match self.resolver() {
            Ok(r) => nexthop::servers(hop, &*r, &options),
            Err(e) => {
                postern_common::warning!("{e}");
                Err(Failure {
                    dsn: "4.3.0".into(),
                    reason: format!("DNS resolver unavailable: {e}"),
                })
            }
        }
    }

    /// Before the process ends: QUIT to every kept session.
    pub fn close_cached(&self) {
        self.cache.close_all();
    }

    /// Delivers one request: every recipient gets an outcome. Called from
    /// several threads at once (see `main`).
    pub fn deliver(&self, job: &mut Job) {
        if job.unfinished().is_empty() {
            return;
        }
        let dest = if job.req.nexthop.trim().is_empty() {
            postern_common::addr::domain(&job.req.recipients[0].rcpt.address)
        } else {
            job.req.nexthop.clone()
        };
        let parsed = if self.lmtp {
            nexthop::parse_lmtp(&dest)
        } else {
            nexthop::parse(&dest).map(LmtpHop::Inet)
        };
        let hop = match parsed {
            Ok(LmtpHop::Inet(h)) => h,
            Ok(LmtpHop::Unix(path)) => {
                let policy = self.tls_policy(&dest, &path);
                let auth = self.sasl_auth(&job.req.sender.clone(), &dest, &self.myhostname);
                return self.deliver_unix(job, &path, &policy, auth.as_ref());
            }
            Err(reason) => {
                postern_common::warning!("{}: {reason}", job.req.queue_id);
                job.record_rest(Outcome::Deferred, "4.3.5", "none", &reason);
                return;
            }
        };
        let policy = self.tls_policy(&dest, &hop.host);
        match self.servers(&hop) {
            Ok(list) => self.try_servers_with(job, &list, &policy, &dest, &hop.host),
            Err(f) => {
                if f.is_permanent() {
                    job.record_rest(Outcome::Bounced, &f.dsn, "none", &f.reason);
                } else {
                    job.destination_failed();
                    job.record_rest(Outcome::Deferred, &f.dsn, "none", &f.reason);
                }
            }
        }
    }

    /// Delivers over the Unix-domain socket `path` (LMTP).
    fn deliver_unix(
        &self,
        job: &mut Job,
        path: &str,
        policy: &tls::Policy,
        auth: Option<&sasl::Auth>,
    ) {
        let full = self.queue_dir.join(path);
        let peer = PeerId::unix(&self.myhostname, path);
        let mut eight_bit = None;
        let tls = self.tls_client(policy, &self.myhostname, &self.myhostname);
        let sec = client::Security {
            tls: tls.as_ref(),
            sasl: auth,
        };
        let key = format!(
            "unix:{path} {} {:?}",
            auth.map(|a| a.creds.user.as_str()).unwrap_or(""),
            policy.level
        );
        let end = match self.cached_session(&key, job, peer.clone(), sec, &mut eight_bit) {
            Some(end) => end,
            None => {
                match self.unix_session(job, &full, path, &key, peer.clone(), sec, &mut eight_bit) {
                    Some(end) => end,
                    None => return,
                }
            }
        };
        if let End::TryNext { failure, handshake } = end {
            if !handshake {
                job.destination_failed();
            }
            let mut dsn = failure.dsn;
            if !dsn.starts_with('4') {
                dsn.replace_range(0..1, "4");
            }
            job.record_rest(Outcome::Deferred, &dsn, &peer.relay, &failure.reason);
        }
    }

    /// A new connection to the socket `full` and a session over it; the
    /// session is kept under `key` when it ends well. None when the
    /// connection failed (the recipients are deferred then).
    #[allow(clippy::too_many_arguments)]
    fn unix_session(
        &self,
        job: &mut Job,
        full: &std::path::Path,
        path: &str,
        key: &str,
        peer: PeerId,
        sec: client::Security<'_>,
        eight_bit: &mut Option<bool>,
    ) -> Option<End> {
        let stream = match UnixStream::connect(full) {
            Ok(s) => s,
            Err(e) => {
                let reason = format!("connect to {path}: {}", strerror(&e));
                job.destination_failed();
                job.record_rest(Outcome::Deferred, "4.4.1", "none", &reason);
                return None;
            }
        };
        let created = std::time::Instant::now();
        let (end, idle) = self.session(job, stream, peer, sec, eight_bit);
        if let Some(idle) = idle {
            self.cache.put(key.to_string(), idle, created);
        }
        Some(end)
    }

    /// One session over a connected stream, for the recipients still
    /// without an outcome.
    fn session<S: client::Stream + Send + 'static>(
        &self,
        job: &mut Job,
        stream: S,
        peer: PeerId,
        sec: client::Security<'_>,
        eight_bit: &mut Option<bool>,
    ) -> (End, Option<client::Idle<'static>>) {
        let rcpts = job.unfinished();
        let mut txn = JobTransaction {
            addrs: rcpts.iter().map(|r| r.rcpt.address.clone()).collect(),
            rcpts,
            relay: peer.relay.clone(),
            eight_bit,
            job,
        };
        client::deliver_with(stream, peer, &self.settings, sec, &mut txn)
    }

    /// A transaction over a cached session for `key`, if there is one
    /// that still answers.
    fn cached_session(
        &self,
        key: &str,
        job: &mut Job,
        peer: PeerId,
        sec: client::Security<'_>,
        eight_bit: &mut Option<bool>,
    ) -> Option<End> {
        let (idle, created) = self.cache.take(key)?;
        let rcpts = job.unfinished();
        let mut txn = JobTransaction {
            addrs: rcpts.iter().map(|r| r.rcpt.address.clone()).collect(),
            rcpts,
            relay: peer.relay.clone(),
            eight_bit,
            job,
        };
        let (end, idle) = client::deliver_again(idle, peer, &self.settings, sec, &mut txn)?;
        if let Some(idle) = idle {
            self.cache.put(key.to_string(), idle, created);
        }
        Some(end)
    }

    /// Tries each server in turn until every recipient has an outcome
    /// (TLS as `smtp_tls_security_level` says).
    #[cfg(test)]
    pub fn try_servers(&self, job: &mut Job, servers: &[Server]) {
        let policy = tls::Policy {
            level: self.tls_level,
            matches: Vec::new(),
        };
        self.try_servers_with(job, servers, &policy, "", "")
    }

    /// Tries each server in turn until every recipient has an outcome;
    /// `dest` is the next hop as written, `nexthop` its host or domain
    /// (for TLS names and SASL credentials).
    pub fn try_servers_with(
        &self,
        job: &mut Job,
        servers: &[Server],
        policy: &tls::Policy,
        dest: &str,
        nexthop: &str,
    ) {
        let mut last: Option<(Failure, String)> = None;
        let mut sessions = 0;
        let mut eight_bit = None;
        for (k, srv) in servers.iter().enumerate() {
            if job.unfinished().is_empty() {
                break;
            }
            if self.session_limit > 0 && sessions >= self.session_limit {
                break;
            }
            let more = k + 1 < servers.len();
            let tls = self.tls_client(policy, &srv.name, nexthop);
            let auth = self.sasl_auth(&job.req.sender.clone(), dest, &srv.name);
            let sec = client::Security {
                tls: tls.as_ref(),
                sasl: auth.as_ref(),
            };
            let key = format!(
                "{dest} {} {} {:?}",
                srv.relay(),
                auth.as_ref().map(|a| a.creds.user.as_str()).unwrap_or(""),
                policy.level
            );
            if let Some(end) =
                self.cached_session(&key, job, PeerId::from(srv), sec, &mut eight_bit)
            {
                match end {
                    End::Complete => {
                        sessions += 1;
                        last = None;
                    }
                    End::TryNext { failure, .. } => {
                        sessions += 1;
                        last = Some((failure, srv.relay()));
                    }
                }
                continue;
            }
            let stream = match connect(srv, self.connect_timeout, &self.bind) {
                Ok(s) => s,
                Err(e) => {
                    let f = Failure {
                        dsn: "4.4.1".into(),
                        reason: format!(
                            "connect to {}:{}: {}",
                            srv.namaddr(),
                            srv.port,
                            strerror(&e)
                        ),
                    };
                    if more {
                        postern_common::info!("{}: {}", job.req.queue_id, f.reason);
                    }
                    last = Some((f, "none".into()));
                    continue;
                }
            };
            let created = std::time::Instant::now();
            let (mut end, idle) = self.session(job, stream, PeerId::from(srv), sec, &mut eight_bit);
            if let Some(idle) = idle {
                self.cache.put(key, idle, created);
            }
            // Never in plaintext with credentials to send.
            if auth.is_none() && self.plaintext_fallback(job, policy, &end) {
                postern_common::info!(
                    "{}: TLS handshake with {} failed; trying again without TLS",
                    job.req.queue_id,
                    srv.relay()
                );
                if let Ok(s) = connect(srv, self.connect_timeout, &self.bind) {
                    let (e, idle) = self.session(
                        job,
                        s,
                        PeerId::from(srv),
                        client::Security::default(),
                        &mut eight_bit,
                    );
                    if let Some(idle) = idle {
                        idle.quit(self.settings.timeouts.quit);
                    }
                    end = e;
                }
            }
            match end {
                End::Complete => {
                    sessions += 1;
                    last = None;
                }
                End::TryNext { failure, handshake } => {
                    if handshake {
                        sessions += 1;
                    }
                    if more {
                        postern_common::info!("{}: {}", job.req.queue_id, failure.reason);
                    }
                    last = Some((failure, srv.relay()));
                }
            }
        }
        if job.unfinished().is_empty() {
            return;
        }
        let (f, relay) = last.unwrap_or_else(|| {
            (
                Failure {
                    dsn: "4.4.0".into(),
                    reason: "no server to deliver to".into(),
                },
                "none".into(),
            )
        });
        if sessions == 0 {
            job.destination_failed();
        }
        // What is left may succeed later: never a bounce.
        let mut dsn = f.dsn;
        if !dsn.starts_with('4') {
            dsn.replace_range(0..1, "4");
        }
        job.record_rest(Outcome::Deferred, &dsn, &relay, &f.reason);
    }
}

impl Agent {
    /// Postfix's rule for opportunistic TLS: after a failed handshake at
    /// level `may`, a message that has already waited at least
    /// `minimal_backoff_time` is sent in plaintext over a new connection
    /// (a fresh message is deferred, so that a passing problem does not
    /// downgrade it at once).
    fn plaintext_fallback(&self, job: &Job, policy: &tls::Policy, end: &End) -> bool {
        matches!(end, End::TryNext { failure, .. } if failure.reason == client::TLS_HANDSHAKE_FAILURE)
            && policy.level == tls::Level::May
            && !self.tls_wrapper
            && job.req.queue_wait >= self.min_backoff.as_secs_f64()
    }
}

/// Connects within `timeout` (zero: the system's own limit), from the
/// `bind` address of the server's family when one is set.
fn connect(srv: &Server, timeout: Duration, bind: &Bind) -> io::Result<TcpStream> {
    let sa = SocketAddr::new(srv.addr, srv.port);
    let from = match srv.addr {
        std::net::IpAddr::V4(_) => bind.v4,
        std::net::IpAddr::V6(_) => bind.v6,
    };
    let stream = if let Some(from) = from {
        connect_from(from, sa, timeout)?
    } else if timeout.is_zero() {
        TcpStream::connect(sa)?
    } else {
        TcpStream::connect_timeout(&sa, timeout)?
    };
    // The client writes whole commands (a pipelined group, the content,
    // the end of data) and then waits for replies: Nagle's algorithm would
    // hold the last small write until the server's delayed ACK, some 40 ms
    // per exchange.
    let _ = stream.set_nodelay(true);
    Ok(stream)
}

/// `smtp_bind_address` and `smtp_bind_address6`.
#[derive(Debug, Clone, Copy, Default)]
pub struct Bind {
    pub v4: Option<std::net::IpAddr>,
    pub v6: Option<std::net::IpAddr>,
}

/// A TCP connection from the local address `from` (port chosen by the
/// system), within `timeout` (zero: no limit of ours).
fn connect_from(
    from: std::net::IpAddr,
    to: SocketAddr,
    timeout: Duration,
) -> io::Result<TcpStream> {
    use nix::sys::socket::{
        bind, connect, getsockopt, socket, sockopt, AddressFamily, SockFlag, SockType,
        SockaddrStorage,
    };
    use std::os::fd::{AsFd, AsRawFd, OwnedFd};
    let family = if to.is_ipv4() {
        AddressFamily::Inet
    } else {
        AddressFamily::Inet6
    };
    let fd: OwnedFd = socket(
        family,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
        None,
    )?;
    bind(
        fd.as_raw_fd(),
        &SockaddrStorage::from(SocketAddr::new(from, 0)),
    )?;
    match connect(fd.as_raw_fd(), &SockaddrStorage::from(to)) {
        Ok(()) => {}
        Err(nix::errno::Errno::EINPROGRESS) => {
            use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
            let limit = if timeout.is_zero() {
                PollTimeout::NONE
            } else {
                PollTimeout::try_from(timeout).unwrap_or(PollTimeout::MAX)
            };
            let mut writable = [PollFd::new(fd.as_fd(), PollFlags::POLLOUT)];
            if poll(&mut writable, limit)? == 0 {
                return Err(io::Error::from(io::ErrorKind::TimedOut));
            }
            let err = getsockopt(&fd, sockopt::SocketError)?;
            if err != 0 {
                return Err(io::Error::from_raw_os_error(err));
            }
        }
        Err(e) => return Err(e.into()),
    }
    let stream = TcpStream::from(fd);
    stream.set_nonblocking(false)?;
    Ok(stream)
}

/// The system's text for an error ("Connection refused"), as Postfix's %m.
fn strerror(e: &io::Error) -> String {
    match e.raw_os_error() {
        Some(n) => nix::errno::Errno::from_raw(n).desc().to_string(),
        None if e.kind() == io::ErrorKind::TimedOut => "Connection timed out".into(),
        None => e.to_string(),
    }
}

/// A delivery request as one session sees it: the recipients still
/// without an outcome when the session started.
struct JobTransaction<'a> {
    job: &'a mut Job,
    rcpts: Vec<DeliveryRecipient>,
    addrs: Vec<String>,
    relay: String,
    /// Whether the content has 8-bit bytes, once looked at.
    eight_bit: &'a mut Option<bool>,
}

impl Drop for JobTransaction<'_> {
    fn drop(&mut self) {
        // The next session (another server) may not announce DSN.
        self.job.dsn_passed_on = false;
    }
}

impl Transaction for JobTransaction<'_> {
    fn sender(&self) -> &str {
        &self.job.req.sender
    }

    fn recipients(&self) -> &[String] {
        &self.addrs
    }

    fn content_size(&self) -> u64 {
        self.job.req.content_size
    }

    fn eight_bit(&mut self) -> io::Result<bool> {
        if let Some(b) = *self.eight_bit {
            return Ok(b);
        }
        let mut r = self.job.content()?;
        let mut buf = vec![0u8; 64 * 1024];
        let found = loop {
            let n = r.read(&mut buf)?;
            if n == 0 {
                break false;
            }
            if buf[..n].iter().any(|&b| b >= 0x80) {
                break true;
            }
        };
        *self.eight_bit = Some(found);
        Ok(found)
    }

    fn content(&mut self) -> io::Result<Box<dyn Read + '_>> {
        Ok(Box::new(self.job.content()?))
    }

    fn connected(&mut self) {
        self.job.connected();
    }

    fn record(&mut self, i: usize, outcome: Outcome, dsn: &str, reason: &str) {
        self.job
            .record(&self.rcpts[i], outcome, dsn, &self.relay, reason);
    }

    fn dsn_envelope(&mut self) -> (Option<String>, Option<String>) {
        use postern_common::qfile::{self, attr};
        // Asked only of a server that announced DSN: the recipients'
        // NOTIFY goes with them, and that server reports success itself.
        self.job.dsn_passed_on = true;
        match qfile::read_envelope(&self.job.file) {
            Ok(env) => (
                env.attr(attr::RET).map(str::to_string),
                env.attr(attr::ENVID).map(str::to_string),
            ),
            Err(_) => (None, None),
        }
    }

    fn smtputf8(&mut self) -> postern_common::smtputf8::Flags {
        match postern_common::qfile::read_envelope(&self.job.file) {
            Ok(env) => postern_common::smtputf8::Flags::of_envelope(&env),
            Err(_) => Default::default(),
        }
    }

    fn dsn_recipient(&self, i: usize) -> (u8, String) {
        // As Postfix: without an ORCPT, the original recipient address.
        let r = &self.rcpts[i].rcpt;
        let orcpt = if !r.orcpt.is_empty() {
            r.orcpt.clone()
        } else if !r.original.is_empty() {
            format!("rfc822;{}", r.original)
        } else {
            String::new()
        };
        (r.notify, orcpt)
    }

    fn queue_id(&self) -> &str {
        &self.job.req.queue_id
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use postern_common::ipc::DeliveryRequest;
    use postern_common::qfile::{self, Recipient};
    use postern_common::queue::{MessageLog, Queue, QueueTree};
    use std::io::{BufRead, BufReader, Write};
    use std::net::{IpAddr, TcpListener};
    use std::path::PathBuf;

    fn tmpdir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("postern-smtp-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    /// A queue tree with one message in `active/`, and a job for it.
    fn make_job(dir: &PathBuf, rcpts: &[&str], body: &[u8], nexthop: &str) -> (QueueTree, Job) {
        let tree = QueueTree::new(dir);
        tree.create_dirs(None, None).unwrap();
        let nf = tree.create(Queue::Active).unwrap();
        let mut w = qfile::Writer::new(nf.file).unwrap();
        w.arrival(1_700_000_000, 0).unwrap();
        w.sender("from@a.test").unwrap();
        for r in rcpts {
            w.recipient(&Recipient::new(r)).unwrap();
        }
        w.begin_content().unwrap();
        w.content(body).unwrap();
        let f = w.finish().unwrap();
        let env = qfile::read_envelope(&f).unwrap();
        let req = DeliveryRequest {
            queue: "active".into(),
            queue_id: nf.id.clone(),
            transport: "smtp".into(),
            nexthop: nexthop.into(),
            sender: env.sender.clone(),
            arrival_secs: env.arrival_secs,
            arrival_usecs: env.arrival_usecs,
            content_offset: env.content_offset,
            content_size: env.content_size,
            recipients: env
                .recipients
                .iter()
                .map(|r| DeliveryRecipient {
                    offset: r.offset,
                    rcpt: r.rcpt.clone(),
                })
                .collect(),
            queue_wait: 0.0,
            flags: 0,
        };
        let job = Job::open(&tree, req).unwrap();
        (tree, job)
    }

    fn agent() -> Agent {
        let cfg = Config::from_text(
            std::path::Path::new("/nonexistent"),
            "smtp_helo_name = client.test\nsmtp_connect_timeout = 2s\nsmtp_helo_timeout = 5s\n",
            std::path::Path::new("main.cf"),
        )
        .unwrap();
        Agent::from_config(&cfg, false)
    }

    /// The lines of a DATA section up to the final dot, as sent.
    fn read_data(r: &mut impl BufRead) -> Vec<u8> {
        let mut msg = Vec::new();
        loop {
            let mut l = Vec::new();
            r.read_until(b'\n', &mut l).unwrap();
            if l == b".\r\n" {
                return msg;
            }
            msg.extend_from_slice(&l);
        }
    }

    /// A server that answers each command in turn; RCPT TO addresses
    /// listed in `reject` get a 550. Returns the message it received.
    fn sink(l: TcpListener, reject: &'static [&'static str]) -> std::thread::JoinHandle<Vec<u8>> {
        std::thread::spawn(move || {
            let (c, _) = l.accept().unwrap();
            let mut w = c.try_clone().unwrap();
            let mut r = BufReader::new(c);
            w.write_all(b"220 sink ESMTP\r\n").unwrap();
            let mut msg = Vec::new();
            loop {
                let mut line = String::new();
                if r.read_line(&mut line).unwrap() == 0 {
                    break;
                }
                let up = line.to_ascii_uppercase();
                let reply: &[u8] = if up.starts_with("EHLO") {
                    b"250-sink\r\n250-PIPELINING\r\n250 8BITMIME\r\n"
                } else if up.starts_with("RCPT") {
                    if reject.iter().any(|x| line.contains(x)) {
                        b"550 5.1.1 no such user\r\n"
                    } else {
                        b"250 2.1.5 Ok\r\n"
                    }
                } else if up.starts_with("DATA") {
                    w.write_all(b"354 go\r\n").unwrap();
                    msg.extend(read_data(&mut r));
                    b"250 2.0.0 Ok: queued as SINK1\r\n"
                } else if up.starts_with("QUIT") {
                    w.write_all(b"221 bye\r\n").unwrap();
                    break;
                } else {
                    b"250 2.1.0 Ok\r\n"
                };
                w.write_all(reply).unwrap();
            }
            msg
        })
    }

    fn free_port() -> u16 {
        TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    }

    fn server(port: u16) -> Server {
        Server {
            name: "127.0.0.1".into(),
            addr: "127.0.0.1".parse::<IpAddr>().unwrap(),
            port,
        }
    }

    #[test]
    fn delivers_and_records_each_recipient() {
        let dir = tmpdir("ok");
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let srv = sink(l, &["bad@"]);
        let (tree, mut job) = make_job(
            &dir,
            &["good@b.test", "bad@b.test"],
            b"Subject: hi\n\n.dot\n",
            &format!("[127.0.0.1]:{port}"),
        );
        let id = job.req.queue_id.clone();
        let offsets: Vec<u64> = job.req.recipients.iter().map(|r| r.offset).collect();
        let a = agent();
        a.deliver(&mut job);
        let reply = job.finish();
        assert_eq!(srv.join().unwrap(), b"Subject: hi\r\n\r\n..dot\r\n");
        assert!(!reply.destination_failed);
        let by = |o: u64| {
            reply
                .results
                .iter()
                .find(|r| r.offset == o)
                .unwrap()
                .clone()
        };
        let good = by(offsets[0]);
        assert_eq!(good.outcome, Outcome::Sent);
        assert_eq!(good.reason, "250 2.0.0 Ok: queued as SINK1");
        let bad = by(offsets[1]);
        assert_eq!(bad.outcome, Outcome::Bounced);
        assert_eq!(bad.dsn, "5.1.1");
        assert_eq!(
            bad.reason,
            "host 127.0.0.1[127.0.0.1] said: 550 5.1.1 no such user (in reply to RCPT TO command)"
        );
        // Both are marked done in the queue file; the bounce is logged.
        let f = std::fs::File::open(tree.path(Queue::Active, &id)).unwrap();
        let env = qfile::read_envelope(&f).unwrap();
        assert!(env.recipients.iter().all(|r| r.done));
        let log = postern_common::delivery::read_log(&tree, MessageLog::Bounce, &id).unwrap();
        assert_eq!(log.len(), 1);
        assert_eq!(log[0].relay, format!("127.0.0.1[127.0.0.1]:{port}"));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// Delivers "first", then "second" to a@b.test through one agent,
    /// each expected sent; the agent keeps its cached session.
    fn deliver_first_and_second(dir: &std::path::Path, port: u16) -> Agent {
        let a = agent();
        for (i, body) in [&b"first\n"[..], &b"second\n"[..]].iter().enumerate() {
            let (_tree, mut job) =
                make_job(&dir.join(i.to_string()), &["a@b.test"], body, "b.test");
            a.try_servers(&mut job, &[server(port)]);
            let reply = job.finish();
            assert_eq!(
                reply.results[0].outcome,
                Outcome::Sent,
                "{:?}",
                reply.results
            );
        }
        a
    }

    #[test]
    fn second_request_reuses_the_session() {
        let dir = tmpdir("reuse");
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        // The sink takes one connection only: the second message must
        // come over it (after RSET), and QUIT when the cache lets go.
        let srv = sink(l, &[]);
        // Kept to the end: its cache holds the session.
        let _agent = deliver_first_and_second(&dir, port);
        // The reaper closes the idle session after smtp_connection_cache_time_limit.
        assert_eq!(srv.join().unwrap(), b"first\r\nsecond\r\n");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_kept_session_that_refuses_its_rset_is_replaced() {
        let dir = tmpdir("stale");
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        // The first session takes one message, then answers the next
        // transaction's RSET (pipelined with MAIL, RCPT and DATA) with 421
        // and closes, as a server that dropped an idle session does. The
        // second message must come whole over a new session.
        let srv = std::thread::spawn(move || {
            let (c, _) = l.accept().unwrap();
            let mut w = c.try_clone().unwrap();
            let mut r = BufReader::new(c);
            w.write_all(b"220 sink ESMTP\r\n").unwrap();
            let mut first = Vec::new();
            let mut messages = 0;
            loop {
                let mut line = String::new();
                if r.read_line(&mut line).unwrap() == 0 {
                    break;
                }
                let up = line.to_ascii_uppercase();
                if up.starts_with("EHLO") {
                    w.write_all(b"250-sink\r\n250 PIPELINING\r\n").unwrap();
                } else if up.starts_with("RSET") {
                    w.write_all(b"421 4.4.2 sink Error: timeout exceeded\r\n")
                        .unwrap();
                    break;
                } else if up.starts_with("DATA") {
                    w.write_all(b"354 go\r\n").unwrap();
                    first.extend(read_data(&mut r));
                    messages += 1;
                    w.write_all(b"250 2.0.0 Ok\r\n").unwrap();
                } else {
                    w.write_all(b"250 2.1.0 Ok\r\n").unwrap();
                }
            }
            drop((w, r));
            (messages, first, sink(l, &[]).join().unwrap())
        });
        let a = deliver_first_and_second(&dir, port);
        a.close_cached();
        let (messages, first, second) = srv.join().unwrap();
        assert_eq!((messages, &first[..]), (1, &b"first\r\n"[..]));
        assert_eq!(second, b"second\r\n");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn next_address_after_a_refused_connection() {
        let dir = tmpdir("next");
        let dead = free_port();
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let srv = sink(l, &[]);
        let (_tree, mut job) = make_job(&dir, &["a@b.test"], b"x\n", "b.test");
        agent().try_servers(&mut job, &[server(dead), server(port)]);
        let reply = job.finish();
        srv.join().unwrap();
        assert_eq!(reply.results[0].outcome, Outcome::Sent);
        assert!(!reply.destination_failed);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn every_address_refused() {
        let dir = tmpdir("dead");
        let (a, b) = (free_port(), free_port());
        let (tree, mut job) = make_job(&dir, &["a@b.test", "c@b.test"], b"x\n", "b.test");
        let id = job.req.queue_id.clone();
        agent().try_servers(&mut job, &[server(a), server(b)]);
        let reply = job.finish();
        assert!(reply.destination_failed);
        assert_eq!(reply.results.len(), 2);
        for r in &reply.results {
            assert_eq!(r.outcome, Outcome::Deferred);
            assert_eq!(r.dsn, "4.4.1");
            assert_eq!(
                r.reason,
                format!("connect to 127.0.0.1[127.0.0.1]:{b}: Connection refused")
            );
        }
        let log = postern_common::delivery::read_log(&tree, MessageLog::Defer, &id).unwrap();
        assert_eq!(log[0].relay, "none");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// Kills a helper process however the test ends.
    struct Kill(std::process::Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }

    fn spawn(cmd: &str, args: &[String]) -> Kill {
        Kill(
            std::process::Command::new(cmd)
                .args(args)
                .stdin(std::process::Stdio::null())
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()
                .expect(cmd),
        )
    }

    /// MX lookup through dnsmasq, a first MX (smtp-sink) that answers 421
    /// to MAIL FROM, and delivery to the second one. Run with
    /// `cargo test -p postern-smtp -- --ignored` (needs dnsmasq-base and
    /// postfix's smtp-sink, and root for smtp-sink's -u).
    #[test]
    #[ignore]
    fn mx_lookup_and_backup_mx_with_real_peers() {
        let dns_port = {
            let s = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
            s.local_addr().unwrap().port()
        };
        let port = free_port();
        let dir = tmpdir("real");
        std::fs::create_dir_all(dir.join("dump")).unwrap();
        // smtp-sink writes its dumps as nobody.
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir.join("dump"), std::fs::Permissions::from_mode(0o777)).unwrap();
        let _dns = spawn(
            "dnsmasq",
            &[
                "--no-daemon".into(),
                format!("--port={dns_port}"),
                "--listen-address=127.0.0.1".into(),
                "--bind-interfaces".into(),
                "--no-resolv".into(),
                "--no-hosts".into(),
                "--local=/test/".into(),
                "--mx-host=example.test,mx1.example.test,10".into(),
                "--mx-host=example.test,mx2.example.test,20".into(),
                "--host-record=mx1.example.test,127.0.0.9".into(),
                "--host-record=mx2.example.test,127.0.0.10".into(),
                "--mx-host=nullmx.test,.,0".into(),
            ],
        );
        let _mx1 = spawn(
            "smtp-sink",
            &[
                "-u".into(),
                "nobody".into(),
                "-Q".into(),
                "MAIL".into(),
                format!("127.0.0.9:{port}"),
                "10".into(),
            ],
        );
        let _mx2 = spawn(
            "smtp-sink",
            &[
                "-u".into(),
                "nobody".into(),
                "-d".into(),
                format!("{}/dump/%M.", dir.display()),
                format!("127.0.0.10:{port}"),
                "10".into(),
            ],
        );
        std::thread::sleep(Duration::from_millis(700));
        let cfg = Config::from_text(
            std::path::Path::new("/nonexistent"),
            &format!(
                "smtp_helo_name = client.test\ndns_resolver_addresses = 127.0.0.1:{dns_port}\ndns_resolver_timeout = 2s\n"
            ),
            std::path::Path::new("main.cf"),
        )
        .unwrap();
        let agent = Agent::from_config(&cfg, false);
        let (_tree, mut job) = make_job(
            &dir,
            &["a@example.test", "b@example.test"],
            b"Subject: real\n\n.dot line\n",
            &format!("example.test:{port}"),
        );
        agent.deliver(&mut job);
        let reply = job.finish();
        for r in &reply.results {
            assert_eq!(r.outcome, Outcome::Sent, "{r:?}");
            assert_eq!(r.reason, "250 2.0.0 Ok", "{r:?}");
        }
        let dumps: Vec<_> = std::fs::read_dir(dir.join("dump")).unwrap().collect();
        assert_eq!(dumps.len(), 1);
        let dump = std::fs::read(dumps[0].as_ref().unwrap().path()).unwrap();
        let dump = String::from_utf8_lossy(&dump);
        assert!(
            dump.contains("..dot line\r\n") || dump.contains(".dot line"),
            "{dump}"
        );

        // A null MX bounces without a connection.
        let (_tree, mut job) = make_job(&dir.join("n"), &["a@nullmx.test"], b"x\n", "nullmx.test");
        agent.deliver(&mut job);
        let reply = job.finish();
        assert_eq!(reply.results[0].outcome, Outcome::Bounced);
        assert_eq!(reply.results[0].dsn, "5.1.10");
        // An unknown domain bounces too.
        let (_tree, mut job) = make_job(&dir.join("x"), &["a@nosuch.test"], b"x\n", "nosuch.test");
        agent.deliver(&mut job);
        let reply = job.finish();
        assert_eq!(reply.results[0].dsn, "5.4.4");
        assert_eq!(
            reply.results[0].reason,
            "Host or domain name not found. Name service error for name=nosuch.test type=MX: Host not found"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn bad_next_hop_and_literal_address() {
        let dir = tmpdir("hop");
        let (_tree, mut job) = make_job(&dir, &["a@b.test"], b"x\n", "[broken");
        agent().deliver(&mut job);
        let reply = job.finish();
        assert_eq!(reply.results[0].dsn, "4.3.5");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
