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
//!
//! Here: [`Agent`] and the request's course (next hop, servers, sessions
//! in turn, what is left deferred). `config` reads the agent's
//! parameters and looks up a destination's TLS policy and SASL
//! credentials, `connect` opens the TCP connections, and
//! `job_transaction` is the request as the client conversation sees it.

mod config;
mod connect;
mod job_transaction;
/// `smtp_sasl_password_maps` could not answer: the recipients are
/// deferred, never sent without the credentials they may need.
fn defer_for_credentials(job: &mut Job, e: &postern_common::maps::LookupError) {
    warning!(
        "{}: smtp_sasl_password_maps: {} lookup error",
        job.req.queue_id,
        e.table
    );
    job.record_rest(
        Outcome::Deferred,
        "4.3.0",
        "none",
        "Temporary lookup failure",
    );
}

#[cfg(test)]
mod tests;

pub use config::param;
pub use connect::Bind;

use crate::cache::Cache;
use crate::client::{self, End, PeerId, Settings};
use crate::dns::Resolver;
use crate::nexthop::{self, Failure, LmtpHop, NextHop, Server};
use crate::sasl;
use crate::tls;
use connect::{connect, strerror};
use job_transaction::JobTransaction;
use postern_common::delivery::Job;
use postern_common::header_checks::CheckTables;
use postern_common::ipc::Outcome;
use postern_common::maps::Tables;
use postern_common::{info, warning};
use std::net::SocketAddr;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// What the message itself asks of TLS (RFC 8689), from its queue file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MessageTls {
    /// Nothing: the destination's policy decides.
    Default,
    /// REQUIRETLS: authenticated TLS to a server that offers REQUIRETLS.
    Required,
    /// `TLS-Required: No`: no policy stops the delivery (level `may`).
    Optional,
}

/// What a server gets for TLS: its policy and, at the `dane` levels,
/// its usable TLSA records, or the MTA-STS policy it is under.
#[derive(Debug, Clone)]
pub struct Plan {
    pub policy: tls::Policy,
    pub dane: Option<Arc<Vec<postern_common::dane::Tlsa>>>,
    /// The MTA-STS policy (`enforce` or `testing`) the session is under
    /// ([`crate::sts`]): WebPKI roots, the outcome told to TLS-RPT.
    pub sts: Option<Arc<postern_common::mta_sts::Policy>>,
}

impl Plan {
    /// Only `policy`.
    pub fn of(policy: tls::Policy) -> Plan {
        Plan {
            policy,
            dane: None,
            sts: None,
        }
    }
}

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
    /// `smtp_dns_support_level = dnssec`: DNSSEC lookups, which the
    /// `dane` levels need.
    dnssec: bool,
    /// `smtp_tls_dane_insecure_mx_policy`.
    dane_insecure_mx: postern_common::dane::InsecureMx,
    /// `tls_dane_digests`.
    dane_digests: postern_common::dane::Digests,
    ca_file: String,
    ca_path: String,
    tls_loglevel: u32,
    /// `smtp_tls_session_cache_timeout`, seconds.
    tls_session_cache_timeout: u64,
    /// `smtp_tls_wrappermode`.
    tls_wrapper: bool,
    /// Protocols and ciphers for opportunistic TLS (`smtp_tls_protocols`,
    /// `smtp_tls_ciphers`) and for mandatory TLS, levels `encrypt` and up
    /// (`smtp_tls_mandatory_*`).
    tls_profiles: [Arc<postern_common::tls::Profile>; 2],
    /// `minimal_backoff_time`: after a failed handshake at level `may`, a
    /// message that waited this long is sent in plaintext.
    min_backoff: Duration,
    /// `smtp_sasl_auth_enable`.
    sasl_enable: bool,
    /// `smtp_sasl_password_maps`.
    sasl_maps: Tables,
    sasl_plain_opts: sasl::SecurityOptions,
    sasl_tls_opts: sasl::SecurityOptions,
    /// `smtp_sasl_mechanism_filter`.
    sasl_filter: postern_common::match_list::MatchList,
    /// `smtp_sender_dependent_authentication`.
    sender_dependent: bool,
    /// Sessions kept between requests (`smtp_connection_cache_on_demand`).
    cache: Cache,
    /// `smtp_bind_address`, `smtp_bind_address6`.
    bind: Bind,
    /// `smtp_header_checks`, `smtp_mime_header_checks`,
    /// `smtp_nested_header_checks`, `smtp_body_checks`; Err: a table
    /// that could not be opened (deliveries are deferred, never sent
    /// unchecked).
    content_checks: Result<CheckTables, String>,
    /// `delivery_reply_rules`: the `defer` and `bounce` actions.
    pub(crate) reply_rules: postern_common::maps::Tables,
    /// `debug_peer_list`, `debug_peer_level`: the next hops and servers
    /// whose sessions log verbosely.
    debug_peer: postern_common::debug_peer::DebugPeer,
    /// MTA-STS (`smtp_mta_sts_enable`); None when off or for LMTP.
    sts: Option<crate::sts::StsClient>,
    /// The TLS-RPT store (`smtp_tls_report_enable`), for DANE sessions.
    tls_rpt: Option<postern_common::tls_rpt::Store>,
}

impl Agent {
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
                warning!("{e}");
                Err(Failure {
                    dsn: "4.3.0".into(),
                    reason: format!("DNS resolver unavailable: {e}"),
                })
            }
        }
    }

    /// What the message asks of TLS (the queue file's `requiretls` and
    /// `tls_required` attributes); in LMTP mode (final delivery) nothing.
    pub fn message_tls(&self, job: &Job) -> MessageTls {
        use postern_common::qfile::attr;
        if self.lmtp {
            return MessageTls::Default;
        }
        match job.envelope() {
            Some(env) if env.attr(attr::REQUIRETLS).is_some() => MessageTls::Required,
            Some(env) if env.attr(attr::TLS_REQUIRED) == Some("no") => MessageTls::Optional,
            // Unreadable (qmgr read it to make the request): the content
            // cannot be read either, and the delivery fails on that.
            Some(_) | None => MessageTls::Default,
        }
    }

    /// Before the process ends: QUIT to every kept session.
    pub fn close_cached(&self) {
        self.cache.close_all();
    }

    /// Delivers one request: every recipient gets an outcome. Called from
    /// several threads at once (see [`crate::run`]).
    pub fn deliver(&self, job: &mut Job) {
        if job.unfinished().is_empty() {
            return;
        }
        // The accounting log's egress_source: the local address asked for.
        if let Some(a) = self.bind.v4.or(self.bind.v6) {
            job.egress_source = a.to_string();
        }
        let dest = if job.req.nexthop.trim().is_empty() {
            postern_common::addr::domain(&job.req.recipients[0].rcpt.address)
        } else {
            job.req.nexthop.clone()
        };
        // As Postfix's smtp: the next hop listed in debug_peer_list makes
        // the whole delivery verbose (each server is tried too, below).
        let _verbose = self.debug_peer.check(&dest, None);
        let parsed = if self.lmtp {
            nexthop::parse_lmtp(&dest)
        } else {
            nexthop::parse(&dest).map(LmtpHop::Inet)
        };
        let hop = match parsed {
            Ok(LmtpHop::Inet(h)) => h,
            Ok(LmtpHop::Unix(path)) => {
                let Some((policy, _)) = self.policy_or_defer(job, &dest, &path) else {
                    return;
                };
                let auth = match self.sasl_auth(&job.req.sender.clone(), &dest, &self.myhostname) {
                    Ok(a) => a,
                    Err(e) => return defer_for_credentials(job, &e),
                };
                return self.deliver_unix(job, &path, &policy, auth.as_ref());
            }
            Err(reason) => {
                warning!("{}: {reason}", job.req.queue_id);
                job.record_rest(Outcome::Deferred, "4.3.5", "none", &reason);
                return;
            }
        };
        let Some((mut policy, explicit)) = self.policy_or_defer(job, &dest, &hop.host) else {
            return;
        };
        let tls_optional = self.message_tls(job) == MessageTls::Optional;
        if tls_optional && policy.level > tls::Level::May {
            // RFC 8689 section 5: TLS-Required: No. TLS when the server
            // offers it, its certificate unchecked, else plaintext.
            info!(
                "{}: TLS-Required: No: TLS security level {} for {dest} lowered to may",
                job.req.queue_id,
                policy.level.name()
            );
            policy.level = tls::Level::May;
        }
        // MTA-STS: a destination by MX lookup, with no policy entry of
        // its own, at a level that does not authenticate by itself; not
        // for a message with `TLS-Required: No` (RFC 8689 section 5).
        let sts = match &self.sts {
            Some(c)
                if !explicit
                    && !tls_optional
                    && hop.mx
                    && hop.host.parse::<std::net::IpAddr>().is_err()
                    && policy.level < tls::Level::Verify =>
            {
                c.policy(&hop.host)
            }
            _ => None,
        };
        if policy.level.is_dane() {
            match self.dane_usable(&dest, &hop, &policy) {
                Ok(true) => return self.deliver_dane(job, &hop, &policy, &dest, sts),
                Ok(false) => policy.level = tls::Level::May,
                Err(f) => {
                    job.record_rest(Outcome::Deferred, &f.dsn, "none", &f.reason);
                    return;
                }
            }
        }
        match self.servers(&hop) {
            Ok(list) => match (&sts, &self.sts) {
                (Some(p), Some(c)) => {
                    let qid = job.req.queue_id.clone();
                    let plan = |srv: &Server| c.plan(&qid, p, srv, Plan::of(policy.clone()));
                    self.try_servers_planned(job, &list, &plan, &dest, &hop.host)
                }
                _ => self.try_servers_with(job, &list, &policy, &dest, &hop.host),
            },
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

    /// Whether DANE can apply to `hop` at all (Postfix's dane_init):
    /// not with DNSSEC lookups disabled (a warning; `dane` is then `may`,
    /// `dane-only` defers) nor to an IP address (no TLSA base domain).
    fn dane_usable(
        &self,
        dest: &str,
        hop: &NextHop,
        policy: &tls::Policy,
    ) -> Result<bool, Failure> {
        let only = policy.level == tls::Level::DaneOnly;
        let why = if !self.dnssec {
            warning!(
                "{dest}: {} configured with dnssec lookups disabled",
                policy.level.name()
            );
            "client TLS configuration problem"
        } else if hop.host.parse::<std::net::IpAddr>().is_ok() {
            "no TLSA records found"
        } else {
            return Ok(true);
        };
        if only {
            Err(Failure {
                dsn: "4.7.5".into(),
                reason: why.into(),
            })
        } else {
            Ok(false)
        }
    }

    /// Delivery at level `dane`/`dane-only`: the servers and their TLS
    /// from DNSSEC-validated answers (`crate::dane::route`); a server
    /// without usable TLSA records is under the MTA-STS policy `sts`, if
    /// there is one (DANE wins where both apply).
    fn deliver_dane(
        &self,
        job: &mut Job,
        hop: &NextHop,
        policy: &tls::Policy,
        dest: &str,
        sts: Option<Arc<postern_common::mta_sts::Policy>>,
    ) {
        let dns = postern_common::dane::SecureDns::new(
            &self.dns_servers,
            "/etc/resolv.conf",
            self.dns_timeout,
        );
        let settings = crate::dane::Settings {
            dns: &dns,
            options: &self.options,
            insecure_mx: self.dane_insecure_mx,
            digests: self.dane_digests,
        };
        let only = policy.level == tls::Level::DaneOnly;
        let route = match crate::dane::route(hop, only, &settings) {
            Ok(r) => r,
            Err(f) => {
                if f.is_permanent() {
                    job.record_rest(Outcome::Bounced, &f.dsn, "none", &f.reason);
                } else {
                    job.destination_failed();
                    job.record_rest(Outcome::Deferred, &f.dsn, "none", &f.reason);
                }
                return;
            }
        };
        let servers: Vec<Server> = route.iter().map(|(s, _)| s.clone()).collect();
        let qid = job.req.queue_id.clone();
        let plan = |srv: &Server| -> Result<Plan, Failure> {
            use postern_common::dane::Decision;
            let d = route
                .iter()
                .find(|(s, _)| s == srv)
                .map(|(_, d)| d.clone())
                .unwrap_or(Decision::May);
            let with = |level| tls::Policy {
                level,
                matches: policy.matches.clone(),
            };
            let other = |level| match (&sts, &self.sts) {
                (Some(p), Some(c)) => c.plan(&qid, p, srv, Plan::of(with(level))),
                _ => Ok(Plan::of(with(level))),
            };
            match d {
                Decision::Dane(records) => Ok(Plan {
                    policy: with(policy.level),
                    dane: Some(Arc::new(records)),
                    sts: None,
                }),
                Decision::Encrypt => other(tls::Level::Encrypt),
                Decision::May => other(tls::Level::May),
                Decision::Defer(reason) => Err(Failure {
                    dsn: "4.7.5".into(),
                    reason,
                }),
            }
        };
        self.try_servers_planned(job, &servers, &plan, dest, &hop.host);
    }

    /// The TLS policy of the destination, and whether an
    /// `smtp_tls_policy_maps` entry gave it; None when the table could
    /// not answer: the recipients are deferred (Postfix's "client TLS
    /// configuration problem"), never sent without their policy.
    fn policy_or_defer(
        &self,
        job: &mut Job,
        dest: &str,
        host: &str,
    ) -> Option<(tls::Policy, bool)> {
        match self.tls_policy_entry(dest, host) {
            Ok(Some(p)) => Some((p, true)),
            Ok(None) => Some((self.default_tls_policy(), false)),
            Err(e) => {
                warning!(
                    "{}: smtp_tls_policy_maps: {} lookup error for \"{dest}\": policy table lookup error",
                    job.req.queue_id,
                    e.table
                );
                job.record_rest(
                    Outcome::Deferred,
                    "4.7.5",
                    "none",
                    "client TLS configuration problem",
                );
                None
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
        let tls = self.tls_client(
            &Plan::of(policy.clone()),
            &self.myhostname,
            &self.myhostname,
            None,
        );
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
            let dsn = nexthop::temporary_dsn(failure.dsn);
            self.rule_class(job, &dsn, &failure.reason, &peer.relay);
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
            let site = job.req.site.clone();
            self.cache
                .put(key.to_string(), idle, created, 1, site.as_ref());
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
        let requiretls = self.message_tls(job) == MessageTls::Required;
        let mut txn = JobTransaction::new(
            job,
            peer.relay.clone(),
            eight_bit,
            &self.content_checks,
            requiretls,
            &self.reply_rules,
        );
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
        let (idle, created, uses) = self.cache.take(key)?;
        let site = job.req.site.clone();
        let requiretls = self.message_tls(job) == MessageTls::Required;
        let mut txn = JobTransaction::new(
            job,
            peer.relay.clone(),
            eight_bit,
            &self.content_checks,
            requiretls,
            &self.reply_rules,
        );
        let (end, idle) = client::deliver_again(idle, peer, &self.settings, sec, &mut txn)?;
        if let Some(idle) = idle {
            self.cache
                .put(key.to_string(), idle, created, uses + 1, site.as_ref());
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
        self.try_servers_planned(
            job,
            servers,
            &|_| Ok(Plan::of(policy.clone())),
            dest,
            nexthop,
        )
    }

    /// As [`Agent::try_servers_with`], with the TLS policy (and DANE
    /// records) of each server from `plan`; a server whose plan is a
    /// failure is skipped with it as the reason.
    pub fn try_servers_planned(
        &self,
        job: &mut Job,
        servers: &[Server],
        plan: &dyn Fn(&Server) -> Result<Plan, Failure>,
        dest: &str,
        nexthop: &str,
    ) {
        let mut last: Option<(Failure, String)> = None;
        let mut sessions = 0;
        let mut eight_bit = None;
        let requiretls = self.message_tls(job) == MessageTls::Required;
        for (k, srv) in servers.iter().enumerate() {
            if job.unfinished().is_empty() {
                break;
            }
            if self.session_limit > 0 && sessions >= self.session_limit {
                break;
            }
            let more = k + 1 < servers.len();
            let planned = match plan(srv) {
                Ok(p) => p,
                Err(f) => {
                    if more {
                        info!("{}: {}", job.req.queue_id, f.reason);
                    }
                    last = Some((f, srv.relay()));
                    continue;
                }
            };
            if requiretls && !planned.policy.authenticated() {
                // RFC 8689: not even a connection where TLS would not
                // authenticate the server.
                let f = Failure {
                    dsn: client::REQUIRETLS_UNAUTHENTICATED.into(),
                    reason: format!(
                        "REQUIRETLS needs authenticated TLS, but the TLS security level for {} is {}",
                        srv.namaddr(),
                        planned.policy.level.name()
                    ),
                };
                if more {
                    info!("{}: {}", job.req.queue_id, f.reason);
                }
                last = Some((f, srv.relay()));
                continue;
            }
            let policy = &planned.policy;
            // A server listed in debug_peer_list: its session is verbose.
            let _verbose = self.debug_peer.check(&srv.name, Some(srv.addr));
            let observe = (planned.sts.is_some()
                || (planned.dane.is_some() && self.tls_rpt.is_some()))
            .then(|| Arc::new(Mutex::new(None)));
            let tls = self.tls_client(&planned, &srv.name, nexthop, observe.clone());
            let auth = match self.sasl_auth(&job.req.sender.clone(), dest, &srv.name) {
                Ok(a) => a,
                Err(e) => return defer_for_credentials(job, &e),
            };
            let sec = client::Security {
                tls: tls.as_ref(),
                sasl: auth.as_ref(),
            };
            // A site's domains share its connections.
            let owner = match &job.req.site {
                Some(s) => format!("site:{}", s.name),
                None => dest.to_string(),
            };
            let key = format!(
                "{owner} {} {} {:?}{}",
                srv.relay(),
                auth.as_ref().map(|a| a.creds.user.as_str()).unwrap_or(""),
                policy.level,
                if planned.sts.is_some() { " sts" } else { "" }
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
            let end = self.new_session(job, srv, key, policy, sec, &mut eight_bit);
            let seen = observe
                .as_ref()
                .and_then(|o| o.lock().ok().and_then(|mut g| g.take()));
            if let (Some(p), Some(c)) = (&planned.sts, &self.sts) {
                c.outcome(&job.req.queue_id, p, srv, seen);
            } else if let Some(records) = &planned.dane {
                if let Some(a) = crate::sts::dane_attempt(nexthop, records, srv, seen) {
                    crate::sts::record(self.tls_rpt.as_ref(), &a);
                }
            }
            let end = match end {
                Ok(end) => end,
                Err(f) => {
                    if more {
                        info!("{}: {}", job.req.queue_id, f.reason);
                    }
                    last = Some((f, "none".into()));
                    continue;
                }
            };
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
                        info!("{}: {}", job.req.queue_id, failure.reason);
                    }
                    last = Some((failure, srv.relay()));
                }
            }
        }
        if let Some((f, relay)) = &last {
            self.rule_class(job, &f.dsn, &f.reason, relay);
        }
        Self::defer_rest(job, last, sessions, requiretls);
    }

    /// A new connection to `srv` and a session over it, kept under `key`
    /// when it ends well; after a failed TLS handshake, perhaps once more
    /// in plaintext ([`Agent::plaintext_fallback`]). `Err` when the
    /// connection failed.
    fn new_session(
        &self,
        job: &mut Job,
        srv: &Server,
        key: String,
        policy: &tls::Policy,
        sec: client::Security<'_>,
        eight_bit: &mut Option<bool>,
    ) -> Result<End, Failure> {
        let stream = connect(srv, self.connect_timeout, &self.bind).map_err(|e| Failure {
            dsn: "4.4.1".into(),
            reason: format!(
                "connect to {}:{}: {}",
                srv.namaddr(),
                srv.port,
                strerror(&e)
            ),
        })?;
        let created = std::time::Instant::now();
        let (mut end, idle) = self.session(job, stream, PeerId::from(srv), sec, eight_bit);
        if let Some(idle) = idle {
            let site = job.req.site.clone();
            self.cache.put(key, idle, created, 1, site.as_ref());
        }
        // Never in plaintext with credentials to send.
        if sec.sasl.is_none() && self.plaintext_fallback(job, policy, &end) {
            info!(
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
                    eight_bit,
                );
                if let Some(idle) = idle {
                    idle.quit(self.settings.timeouts.quit);
                }
                end = e;
            }
        }
        Ok(end)
    }

    /// A session-wide failure (a server's reply to the greeting or to
    /// MAIL FROM) that a `delivery_reply_rules` entry with `class=NAME`
    /// matches: NAME is the class of the records of what is left
    /// ([`Job::record_rest`]).
    fn rule_class(&self, job: &mut Job, dsn: &str, reason: &str, relay: &str) {
        let site = job
            .req
            .site
            .as_ref()
            .map(|s| s.name.clone())
            .unwrap_or_default();
        job.reply_class = postern_common::delivery_policy::adjust_outcome(
            &self.reply_rules,
            Outcome::Deferred,
            dsn,
            reason,
            &site,
            relay,
        )
        .class;
    }

    /// Defers the recipients still without an outcome once no server is
    /// left, with the `last` failure and the relay it came from; with no
    /// session at all, the destination failed. A REQUIRETLS message that
    /// no server could take for want of authenticated TLS or of
    /// REQUIRETLS support bounces (RFC 8689): waiting changes neither.
    fn defer_rest(
        job: &mut Job,
        last: Option<(Failure, String)>,
        sessions: usize,
        requiretls: bool,
    ) {
        if job.unfinished().is_empty() {
            return;
        }
        if let Some((f, relay)) = &last {
            let refused = [
                client::REQUIRETLS_UNAUTHENTICATED,
                client::REQUIRETLS_UNSUPPORTED,
            ];
            if requiretls && refused.contains(&f.dsn.as_str()) {
                job.record_rest(Outcome::Bounced, &f.dsn, relay, &f.reason);
                return;
            }
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
        let dsn = nexthop::temporary_dsn(f.dsn);
        job.record_rest(Outcome::Deferred, &dsn, &relay, &f.reason);
    }

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
