//! Sites: the unit receivers throttle, and qmgr's per-site state
//! (`delivery_policy_maps`).
//!
//! A site is the set of MX hosts a next-hop domain resolves to. qmgr
//! learns the MX hosts itself, through `common::dns` with a cache
//! ([`MX_TTL`]), when a destination's queue is created — not per
//! message — and only for transports that have a `delivery_policy_maps`
//! (main.cf, or `-o` on the transport's master.cf line): the policy key
//! and the site must be known before the first delivery, which the smtp
//! agent could only report after it. A next hop in brackets
//! (`[host]:port`) is its own MX host.
//!
//! The policy is the value of the first of [`lookup_keys`] found in the
//! tables. Domains whose MX hosts match the same `mx:` key share one site
//! named after that key (`mx:.google.com`); otherwise the site is the
//! sorted set of MX host names, so domains with the same MX hosts share
//! one site (MX rollup) and a domain with other MX hosts does not. The
//! first domain to create a site gives it its policy.
//!
//! State per site ([`Site`]): requests in flight (each holds one
//! connection), the message and connection rate limiters (GCRA), the
//! consecutive connection failures, and a suspension. Suspensions and the
//! limiters' state are written to `data_directory/qmgr-sites` when they
//! change and when qmgr exits (a `postern reload` replaces the qmgr
//! process): the new qmgr takes them all back when master is the same
//! process (a reload), and only the suspensions after a restart.

use postern_common::accounting;
use postern_common::delivery_policy::{lookup_keys, Gcra, Policy, Rate, ReplyRule};
use postern_common::dns::{BlockingResolver, TxtError};
use postern_common::maps::Tables;
use postern_common::{info, warning};
use postern_conf::Config;
use std::cell::RefCell;
use std::collections::{BTreeSet, HashMap, HashSet};
use std::path::PathBuf;
use std::rc::Rc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// How long qmgr keeps a domain's MX hosts (a failed lookup: a minute).
pub const MX_TTL: Duration = Duration::from_secs(600);
const MX_FAIL_TTL: Duration = Duration::from_secs(60);

/// The file in `data_directory`.
pub const STATE_FILE: &str = "qmgr-sites";

/// Why and until when a site takes no deliveries.
#[derive(Debug, Clone, PartialEq)]
pub struct Suspension {
    pub until: SystemTime,
    pub reason: String,
    /// Only this source's state for the site (`suspend_source=`,
    /// `postern suspend -s`): the site's other sources carry on.
    pub source_only: bool,
}

/// What the sources of one site share: the site-wide caps of
/// `site_max_connections` and `site_max_message_rate` over the sum of
/// their connections and messages.
#[derive(Debug, Default)]
pub struct Total {
    pub in_flight: usize,
    pub max_connections: Option<usize>,
    pub msg_rate: Option<Gcra>,
}

/// One site's state.
#[derive(Debug)]
pub struct Site {
    pub name: String,
    /// The source (a master.cf transport with its own identity) whose
    /// state for the site this is; "" = the site's own (no source).
    pub source: String,
    /// [`crate::sources::site_key`] of source and name.
    pub id: String,
    /// Shared by all sources of the site when it has site-wide caps.
    pub total: Option<Rc<RefCell<Total>>>,
    /// Warm-up: (start of the day counted, messages assigned that day).
    pub warm: (u64, u64),
    /// The key its policy came from.
    pub key: String,
    pub policy: Policy,
    pub domains: BTreeSet<String>,
    pub mx: Vec<String>,
    /// Requests in flight (each holds one connection).
    pub in_flight: usize,
    pub msg_rate: Option<Gcra>,
    pub conn_rate: Option<Gcra>,
    /// Consecutive requests that could not reach the site.
    pub connect_failures: u32,
    pub suspended: Option<Suspension>,
    /// The last reply that was not a success (for `postern queues`).
    pub last_reply: String,
    /// (transport index, destination key) of the queues that feed it.
    pub members: HashSet<(usize, String)>,
    /// In backoff: how it got there and how far it has recovered.
    pub backoff: Option<Backoff>,
    /// Connections allowed now (the configured limit, or less in
    /// backoff); None: no limit of the site's.
    pub cur_connections: Option<usize>,
    /// `after=N/PERIOD` rules: recent matches per rule.
    pub hits: HashMap<String, std::collections::VecDeque<Instant>>,
}

pub type SiteRef = Rc<RefCell<Site>>;

impl Site {
    pub fn new(name: &str, key: &str, policy: Policy, mx: Vec<String>) -> Site {
        Site {
            name: name.to_string(),
            source: String::new(),
            id: name.to_string(),
            total: None,
            warm: (0, 0),
            key: key.to_string(),
            msg_rate: policy.max_message_rate.as_ref().map(Gcra::new),
            conn_rate: policy.max_connection_rate.as_ref().map(Gcra::new),
            policy,
            domains: BTreeSet::new(),
            mx,
            in_flight: 0,
            connect_failures: 0,
            suspended: None,
            last_reply: String::new(),
            members: HashSet::new(),
            backoff: None,
            cur_connections: None,
            hits: HashMap::new(),
        }
    }

    /// The name in logs and reports: the site, and the source if any.
    pub fn label(&self) -> String {
        if self.source.is_empty() {
            self.name.clone()
        } else {
            format!("{} (source {})", self.name, self.source)
        }
    }

    /// Whether the site-wide caps let one more connection start.
    pub fn total_allows(&self) -> bool {
        self.total.as_ref().is_none_or(|t| {
            let t = t.borrow();
            t.max_connections.is_none_or(|m| t.in_flight < m.max(1))
        })
    }

    /// The configured message rate (per second), if any.
    pub fn configured_rate(&self) -> Option<f64> {
        self.policy.max_message_rate.as_ref().map(|r| r.per_sec())
    }

    /// A throttling signal (a reply matched by a `backoff` rule): the
    /// allowed rate and connections are cut by `backoff_factor` (default
    /// 0.5), down to `backoff_min_rate` / `backoff_min_connections`, or
    /// set to PowerMTA's fixed `backoff_message_rate` /
    /// `backoff_max_connections`. Signals less than a second apart are
    /// one signal (the replies of one burst).
    pub fn enter_backoff(&mut self, rule: &str, reply: &str) {
        let now = Instant::now();
        if let Some(b) = &mut self.backoff {
            if now.duration_since(b.last_signal) < Duration::from_secs(1) {
                return;
            }
            b.last_signal = now;
            b.successes = 0;
            b.rule = rule.to_string();
            b.reply = reply.to_string();
        } else {
            self.backoff = Some(Backoff {
                rule: rule.to_string(),
                reply: reply.to_string(),
                since: now,
                last_signal: now,
                successes: 0,
            });
        }
        let factor = self.policy.backoff_factor.unwrap_or(0.5);
        let before_rate = self.msg_rate.as_ref().map(|g| g.per_sec);
        if let Some(fixed) = &self.policy.backoff_message_rate {
            match self.msg_rate.as_mut() {
                Some(g) => g.per_sec = fixed.per_sec(),
                None => self.msg_rate = Some(Gcra::new(fixed)),
            }
        } else if let Some(g) = self.msg_rate.as_mut() {
            let min = self
                .policy
                .backoff_min_rate
                .as_ref()
                .map_or(1.0 / 60.0, |r| r.per_sec());
            g.per_sec = (g.per_sec * factor).max(min);
        }
        let cur = self
            .cur_connections
            .or(self.policy.max_connections)
            .unwrap_or(self.in_flight.max(1));
        let conns = match self.policy.backoff_max_connections {
            Some(n) => n.max(1),
            None => {
                let min = self.policy.backoff_min_connections.unwrap_or(1).max(1);
                ((cur as f64 * factor).floor() as usize).max(min)
            }
        };
        self.cur_connections = Some(conns);
        info!(
            "site {}: backoff: rate {} -> {}, connections {cur} -> {conns} (rule \"{rule}\", reply \"{reply}\")",
            self.name,
            before_rate.map_or("-".into(), Rate::display),
            self.msg_rate.as_ref().map_or("-".into(), |g| Rate::display(g.per_sec)),
        );
        accounting::site_mode_change(&self.name, "backoff", rule, reply, 0);
    }

    /// A delivery went well: in backoff, every `backoff_recover_after`
    /// (default 10) successes give back a step (additive: a tenth of the
    /// configured rate, one connection) until the configured limits are
    /// reached; `backoff_to_normal_after` after the last signal, all at
    /// once.
    pub fn success(&mut self) {
        let Some(b) = &mut self.backoff else { return };
        b.successes += 1;
        let to_normal = self
            .policy
            .backoff_to_normal_after
            .is_some_and(|t| b.last_signal.elapsed() >= t);
        let every = self.policy.backoff_recover_after.unwrap_or(10).max(1);
        if !to_normal && b.successes < every {
            return;
        }
        b.successes = 0;
        let conf_rate = self.configured_rate();
        let conf_conns = self.policy.max_connections;
        let mut done = true;
        if let Some(g) = self.msg_rate.as_mut() {
            match conf_rate {
                Some(c) if !to_normal => {
                    g.per_sec = (g.per_sec + c / 10.0).min(c);
                    done &= g.per_sec >= c - 1e-9;
                }
                Some(c) => g.per_sec = c,
                None => {
                    // Only backoff_message_rate limited it.
                    if to_normal {
                        self.msg_rate = None;
                    } else {
                        done = false;
                    }
                }
            }
        }
        if let Some(cur) = self.cur_connections {
            match conf_conns {
                Some(target) => {
                    let next = if to_normal {
                        target
                    } else {
                        (cur + 1).min(target)
                    };
                    done &= next >= target;
                    self.cur_connections = Some(next);
                }
                // No configured limit: one more per step until the rate
                // is back, then none.
                None => self.cur_connections = Some(cur + 1),
            }
        }
        if done {
            info!("site {}: backoff over: back to normal", self.name);
            accounting::site_mode_change(&self.name, "normal", "backoff over", "", 0);
            self.backoff = None;
            self.cur_connections = None;
        }
    }

    /// Counts a match of `rule` for `after=N/PERIOD`: whether this is
    /// the Nth within the period (then the count starts again).
    pub fn trigger(&mut self, rule: &str, after: Option<(u32, Duration)>) -> bool {
        let Some((n, period)) = after else {
            return true;
        };
        let now = Instant::now();
        let q = self.hits.entry(rule.to_string()).or_default();
        q.push_back(now);
        while q.front().is_some_and(|t| now.duration_since(*t) > period) {
            q.pop_front();
        }
        if q.len() as u32 >= n {
            q.clear();
            true
        } else {
            false
        }
    }

    /// The site's mode now, for `postern queues` and the status page:
    /// `suspended` (until when, why), `backoff` (the rule and the reply
    /// that set it) or `normal`. An expired suspension is dropped first.
    pub fn mode_now(&mut self) -> ModeNow {
        if self.is_suspended() {
            let x = self.suspended.as_ref().expect("suspended");
            return ModeNow {
                mode: "suspended",
                until: x
                    .until
                    .duration_since(UNIX_EPOCH)
                    .map_or(0, |d| d.as_secs()),
                reason: x.reason.clone(),
                ..Default::default()
            };
        }
        match &self.backoff {
            Some(b) => ModeNow {
                mode: "backoff",
                rule: b.rule.clone(),
                reply: b.reply.clone(),
                ..Default::default()
            },
            None => ModeNow {
                mode: "normal",
                ..Default::default()
            },
        }
    }

    /// Suspended now (an expired suspension is dropped).
    pub fn is_suspended(&mut self) -> bool {
        match &self.suspended {
            Some(s) if s.until > SystemTime::now() => true,
            Some(_) => {
                info!("site {}: resumed (suspension over)", self.name);
                accounting::site_mode_change(&self.name, "resumed", "suspension over", "", 0);
                self.suspended = None;
                self.connect_failures = 0;
                false
            }
            None => false,
        }
    }

    /// Connections (requests in flight) allowed now.
    pub fn max_connections(&self) -> usize {
        self.cur_connections
            .or(self.policy.max_connections)
            .unwrap_or(usize::MAX)
            .max(1)
    }

    /// Whether one more request may start now (connections and
    /// suspension; rates are asked at the pick).
    pub fn can_start(&mut self) -> bool {
        !self.is_suspended() && self.in_flight < self.max_connections() && self.total_allows()
    }

    /// The earliest instant the rate limiters let one more go (the
    /// source's own, and the site-wide one).
    pub fn rate_ready_at(&self, now: Instant) -> Instant {
        let a = self.msg_rate.as_ref().map_or(now, |g| g.ready_at(now));
        let b = self.conn_rate.as_ref().map_or(now, |g| g.ready_at(now));
        let c = self.total.as_ref().map_or(now, |t| {
            t.borrow()
                .msg_rate
                .as_ref()
                .map_or(now, |g| g.ready_at(now))
        });
        a.max(b).max(c)
    }

    /// A request starts: counted against the source's limits and the
    /// site-wide ones.
    pub fn take(&mut self, now: Instant) {
        if let Some(g) = self.msg_rate.as_mut() {
            let _ = g.take(now);
        }
        // Every request may open a connection: counted per request, an
        // upper bound of the connections made.
        if let Some(g) = self.conn_rate.as_mut() {
            let _ = g.take(now);
        }
        self.in_flight += 1;
        if let Some(t) = &self.total {
            let mut t = t.borrow_mut();
            t.in_flight += 1;
            if let Some(g) = t.msg_rate.as_mut() {
                let _ = g.take(now);
            }
        }
    }

    /// A request ended.
    pub fn release(&mut self) {
        self.in_flight = self.in_flight.saturating_sub(1);
        if let Some(t) = &self.total {
            let mut t = t.borrow_mut();
            t.in_flight = t.in_flight.saturating_sub(1);
        }
    }

    /// Whether a message with a rate counts one per request (no batch).
    pub fn rated(&self) -> bool {
        self.msg_rate.is_some()
            || self
                .total
                .as_ref()
                .is_some_and(|t| t.borrow().msg_rate.is_some())
    }
}

/// A table-list parameter that master.cf may override per transport:
/// opened once per distinct value.
#[derive(Default)]
struct PerTransport {
    param: &'static str,
    main: String,
    overrides: HashMap<String, String>,
    opened: HashMap<String, Rc<Tables>>,
}

impl PerTransport {
    fn new(
        cfg: &Config,
        services: &[postern_conf::master_cf::Service],
        param: &'static str,
    ) -> Self {
        let overrides = services
            .iter()
            .filter_map(|s| {
                let v = s
                    .overrides
                    .iter()
                    .rev()
                    .find(|(n, _)| n == param)?
                    .1
                    .clone();
                Some((s.name.clone(), v))
            })
            .collect();
        let mut p = PerTransport {
            param,
            main: cfg.get(param),
            overrides,
            opened: HashMap::new(),
        };
        // Opened now, before qmgr drops its privileges (a table may be
        // readable by root only).
        let transports: Vec<String> = p.overrides.keys().cloned().collect();
        for t in transports {
            p.get(&t);
        }
        p.get("");
        p
    }

    fn get(&mut self, transport: &str) -> Rc<Tables> {
        let spec = self
            .overrides
            .get(transport)
            .cloned()
            .unwrap_or_else(|| self.main.clone());
        if let Some(t) = self.opened.get(&spec) {
            return t.clone();
        }
        let (tables, bad) = Tables::open_list(&spec);
        for e in bad {
            warning!("{}: {e}", self.param);
        }
        let t = Rc::new(tables);
        self.opened.insert(spec, t.clone());
        t
    }
}

/// What [`Site::mode_now`] says.
#[derive(Debug, Default)]
pub struct ModeNow {
    pub mode: &'static str,
    /// A suspension's end, unix seconds (0: not suspended).
    pub until: u64,
    /// Why it is suspended.
    pub reason: String,
    /// In backoff: the rule and the reply that set it.
    pub rule: String,
    pub reply: String,
}

/// Backoff state of a site (adaptive: AIMD).
#[derive(Debug, Clone)]
pub struct Backoff {
    /// The rule (its reply pattern's value) and the reply that set it.
    pub rule: String,
    pub reply: String,
    pub since: Instant,
    /// The last throttling signal.
    pub last_signal: Instant,
    /// Successes since the last step.
    pub successes: u32,
}

/// Every site, and what qmgr needs to find a destination's site.
pub struct Sites {
    policies: PerTransport,
    rules: PerTransport,
    resolver: Option<BlockingResolver>,
    dns_servers: Vec<std::net::SocketAddr>,
    dns_timeout: Duration,
    mx_cache: HashMap<String, (Instant, Vec<String>)>,
    pub sites: HashMap<String, SiteRef>,
    /// The sources of master.cf and the pools (`crate::sources`).
    pub sources: crate::sources::Sources,
    /// Site name → what its sources share (site-wide caps).
    totals: HashMap<String, Rc<RefCell<Total>>>,
    /// Saved warm-up counts of sites not created yet: id → (day, count).
    pending_warm: HashMap<String, (u64, u64)>,
    /// Saved state of sites not created yet: name → (suspension, rate
    /// limiters ahead in seconds).
    pending: HashMap<String, (Option<Suspension>, f64, f64)>,
    state_path: Option<PathBuf>,
    default_retry: Duration,
    /// `delivery_policy_redis`: limits and suspensions shared by a
    /// cluster of nodes ([`crate::cluster`]).
    pub cluster: Option<crate::cluster::Cluster>,
    /// Tests: next hop → site name.
    #[cfg(test)]
    test_routes: HashMap<String, String>,
}

impl Sites {
    /// From main.cf and master.cf (the `-o delivery_policy_maps` of each
    /// transport). Reads the saved state.
    pub fn from_config(cfg: &Config) -> Sites {
        let services = cfg.master_services().unwrap_or_default();
        let data = cfg.get("data_directory");
        let mut s = Sites {
            policies: PerTransport::new(cfg, &services, "delivery_policy_maps"),
            rules: PerTransport::new(cfg, &services, "delivery_reply_rules"),
            resolver: None,
            dns_servers: postern_common::dns::servers_from_config(cfg),
            dns_timeout: Duration::from_secs(cfg.get_time("dns_resolver_timeout").unwrap_or(5)),
            mx_cache: HashMap::new(),
            sites: HashMap::new(),
            sources: crate::sources::Sources::from_config(cfg, &services),
            totals: HashMap::new(),
            pending_warm: HashMap::new(),
            pending: HashMap::new(),
            state_path: (!data.is_empty()).then(|| PathBuf::from(data).join(STATE_FILE)),
            default_retry: Duration::from_secs(cfg.get_time("transport_retry_time").unwrap_or(60)),
            cluster: crate::cluster::Cluster::from_config(cfg),
            #[cfg(test)]
            test_routes: HashMap::new(),
        };
        s.load();
        s
    }

    /// Without tables (tests of the scheduler).
    pub fn none() -> Sites {
        Sites {
            policies: PerTransport::default(),
            rules: PerTransport::default(),
            resolver: None,
            dns_servers: Vec::new(),
            dns_timeout: Duration::from_secs(5),
            mx_cache: HashMap::new(),
            sites: HashMap::new(),
            sources: Default::default(),
            totals: HashMap::new(),
            pending_warm: HashMap::new(),
            pending: HashMap::new(),
            state_path: None,
            default_retry: Duration::from_secs(60),
            cluster: None,
            #[cfg(test)]
            test_routes: HashMap::new(),
        }
    }

    /// Tests: next hop `nexthop` belongs to site `name` with `policy`,
    /// without tables or DNS.
    #[cfg(test)]
    pub fn test_route(&mut self, nexthop: &str, name: &str, policy: Policy) {
        self.sites
            .entry(name.to_string())
            .or_insert_with(|| Rc::new(RefCell::new(Site::new(name, "*", policy, Vec::new()))));
        self.test_routes
            .insert(nexthop.to_string(), name.to_string());
    }

    pub fn retry_after(&self, site: &Site) -> Duration {
        site.policy.retry_after.unwrap_or(self.default_retry)
    }

    /// The MX hosts of `domain`, from the cache or DNS.
    fn mx_hosts(&mut self, domain: &str) -> Vec<String> {
        let now = Instant::now();
        if let Some((exp, hosts)) = self.mx_cache.get(domain) {
            if *exp > now {
                return hosts.clone();
            }
        }
        if self.resolver.is_none() {
            match BlockingResolver::new(&self.dns_servers, self.dns_timeout) {
                Ok(r) => self.resolver = Some(r),
                Err(e) => warning!("delivery_policy_maps: {e}"),
            }
        }
        let (hosts, ttl) = match self.resolver.as_ref().map(|r| r.mx_hosts(domain)) {
            Some(Ok(h)) => (h, MX_TTL),
            // No MX: the domain is its own host (as SMTP routes it).
            Some(Err(TxtError::NotFound)) => (vec![domain.to_string()], MX_TTL),
            Some(Err(TxtError::TryAgain(e))) => {
                info!("delivery_policy_maps: MX lookup: {e}");
                (vec![domain.to_string()], MX_FAIL_TTL)
            }
            None => (vec![domain.to_string()], MX_FAIL_TTL),
        };
        self.mx_cache
            .insert(domain.to_string(), (now + ttl, hosts.clone()));
        hosts
    }

    /// The site of a destination of `transport` with next hop `nexthop`,
    /// or None when the transport has no policy tables or no key matches.
    pub fn site_for(&mut self, transport: &str, nexthop: &str) -> Option<SiteRef> {
        #[cfg(test)]
        if let Some(name) = self.test_routes.get(nexthop) {
            return self.sites.get(name).cloned();
        }
        let tables = self.policies.get(transport);
        if tables.is_empty() {
            return None;
        }
        // LMTP and other local sockets are no site.
        if nexthop.starts_with("unix:") || nexthop.contains('/') {
            return None;
        }
        // "[host]:port" is its own host; "domain:port" is a domain.
        let literal = nexthop.trim().starts_with('[');
        let domain = crate::schedule::nexthop_domain(nexthop);
        if domain.is_empty() {
            return None;
        }
        let mx = if literal {
            vec![domain.clone()]
        } else {
            self.mx_hosts(&domain)
        };
        if mx.is_empty() {
            // A null MX: nothing to shape; smtp bounces it.
            return None;
        }
        let mut found = None;
        for key in lookup_keys(&domain, &mx) {
            match tables.lookup(&key) {
                Ok(Some(v)) => {
                    found = Some((key, v.into_owned()));
                    break;
                }
                Ok(None) => {}
                Err(e) => {
                    warning!("delivery_policy_maps: lookup of {key}: {e:?}");
                    return None;
                }
            }
        }
        let (key, value) = found?;
        let policy = match Policy::parse(&value) {
            Ok(p) => p,
            Err(e) => {
                warning!("delivery_policy_maps: {key}: {e}; no policy for {domain}");
                return None;
            }
        };
        let mut sorted = mx.clone();
        sorted.sort();
        sorted.dedup();
        let name = match key.strip_prefix("mx:") {
            Some(_) => key.clone(),
            None => sorted.join(","),
        };
        let source = self.sources.source_of(transport).to_string();
        let id = crate::sources::site_key(&source, &name);
        let site = match self.sites.get(&id) {
            Some(s) => s.clone(),
            None => {
                let mut site = Site::new(&name, &key, policy, sorted);
                site.source = source;
                site.id = id.clone();
                if site.policy.site_max_connections.is_some()
                    || site.policy.site_max_message_rate.is_some()
                {
                    let total = self.totals.entry(name.clone()).or_insert_with(|| {
                        Rc::new(RefCell::new(Total {
                            in_flight: 0,
                            max_connections: site.policy.site_max_connections,
                            msg_rate: site.policy.site_max_message_rate.as_ref().map(Gcra::new),
                        }))
                    });
                    site.total = Some(total.clone());
                }
                // A suspension of the whole site holds for a source that
                // comes to it later.
                site.suspended = self
                    .sites
                    .values()
                    .filter(|o| o.borrow().name == name)
                    .filter_map(|o| o.borrow().suspended.clone())
                    .find(|x| !x.source_only && x.until > SystemTime::now());
                if let Some(w) = self.pending_warm.remove(&id) {
                    site.warm = w;
                }
                if let Some((susp, msg, conn)) = self.pending.remove(&id) {
                    if susp.is_some() {
                        site.suspended = susp;
                    }
                    let now = Instant::now();
                    if let Some(g) = site.msg_rate.as_mut() {
                        g.set_ahead(now, msg);
                    }
                    if let Some(g) = site.conn_rate.as_mut() {
                        g.set_ahead(now, conn);
                    }
                }
                let site = Rc::new(RefCell::new(site));
                self.sites.insert(id, site.clone());
                site
            }
        };
        site.borrow_mut().domains.insert(domain);
        Some(site)
    }

    /// The `delivery_reply_rules` entry a remote reply matches, for a
    /// site's transport: (the rule's text, the rule).
    pub fn reply_rule(
        &mut self,
        transport: &str,
        site: &Site,
        reply: &str,
    ) -> Option<(String, ReplyRule)> {
        let tables = self.rules.get(transport);
        if tables.is_empty() {
            return None;
        }
        let value = match tables.lookup(reply) {
            Ok(Some(v)) => v.into_owned(),
            Ok(None) => return None,
            Err(e) => {
                warning!("delivery_reply_rules: {e:?}");
                return None;
            }
        };
        let rule = match ReplyRule::parse(&value) {
            Ok(r) => r,
            Err(e) => {
                warning!("delivery_reply_rules: \"{value}\": {e}");
                return None;
            }
        };
        if let Some(suffix) = &rule.site {
            let hit = site.name.ends_with(suffix.as_str())
                || site.mx.iter().any(|h| h.ends_with(suffix.as_str()));
            if !hit {
                return None;
            }
        }
        Some((value, rule))
    }

    /// A suspension for a site not created yet (another node's, through
    /// the cluster): it holds when the site is; None lifts it.
    pub fn pend_suspension(&mut self, name: &str, s: Option<Suspension>) {
        let e = self
            .pending
            .entry(name.to_string())
            .or_insert((None, 0.0, 0.0));
        e.0 = s;
    }

    /// The site a name or domain denotes (`postern suspend SITE|DOMAIN`).
    pub fn find(&self, what: &str) -> Option<SiteRef> {
        self.find_all(what, None).into_iter().next()
    }

    /// The states of the site a name or domain denotes: one per source
    /// (all of them, or that of `source`), sorted by source.
    pub fn find_all(&self, what: &str, source: Option<&str>) -> Vec<SiteRef> {
        let what = what.to_ascii_lowercase();
        let name = match self.sites.get(&what) {
            Some(s) => s.borrow().name.clone(),
            None => match self
                .sites
                .values()
                .find(|s| s.borrow().domains.contains(&what) || s.borrow().name == what)
            {
                Some(s) => s.borrow().name.clone(),
                None => return Vec::new(),
            },
        };
        let mut out: Vec<SiteRef> = self
            .sites
            .values()
            .filter(|s| {
                let s = s.borrow();
                s.name == name && source.is_none_or(|src| s.source == src)
            })
            .cloned()
            .collect();
        out.sort_by_key(|s| s.borrow().id.clone());
        out
    }

    /// The state of `source` for the site of `what` (a domain or site
    /// name), created (MX lookup, policy) when no mail went there yet.
    pub fn source_site(&mut self, source: &str, what: &str) -> Option<SiteRef> {
        if let Some(s) = self.find_all(what, Some(source)).into_iter().next() {
            return Some(s);
        }
        let domain = what.strip_prefix("mx:").unwrap_or(what);
        self.site_for(source, domain.trim_start_matches('.'))
    }

    /// Suspensions saved by an earlier qmgr for sites not created since
    /// (still running), sorted by site name.
    pub fn pending_suspensions(&self) -> Vec<(String, Suspension)> {
        let now = SystemTime::now();
        let mut v: Vec<(String, Suspension)> = self
            .pending
            .iter()
            .filter_map(|(n, (s, _, _))| Some((n.clone(), s.clone()?)))
            .filter(|(_, s)| s.until > now)
            .collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }

    /// Writes suspensions and rate limiters to `data_directory`.
    pub fn save(&self) {
        let Some(path) = &self.state_path else { return };
        let now = Instant::now();
        let mut out = format!("master {}\n", std::os::unix::process::parent_id());
        let mut names: Vec<&String> = self.sites.keys().collect();
        names.sort();
        for name in names {
            let s = self.sites[name].borrow();
            let until = s
                .suspended
                .as_ref()
                .and_then(|x| x.until.duration_since(UNIX_EPOCH).ok())
                .map_or(0, |d| d.as_secs());
            let reason = s
                .suspended
                .as_ref()
                .map(|x| x.reason.replace(['\t', '\n'], " "))
                .unwrap_or_default();
            let msg = s.msg_rate.as_ref().map_or(0.0, |g| g.ahead(now));
            let conn = s.conn_rate.as_ref().map_or(0.0, |g| g.ahead(now));
            if s.warm.1 > 0 {
                out.push_str(&format!("warm\t{name}\t{}\t{}\n", s.warm.0, s.warm.1));
            }
            if until == 0 && msg == 0.0 && conn == 0.0 {
                continue;
            }
            let only = s.suspended.as_ref().is_some_and(|x| x.source_only) as u8;
            out.push_str(&format!(
                "site\t{name}\t{until}\t{msg:.3}\t{conn:.3}\t{reason}\t{only}\n"
            ));
        }
        for (name, (susp, msg, conn)) in &self.pending {
            let until = susp
                .as_ref()
                .and_then(|x| x.until.duration_since(UNIX_EPOCH).ok())
                .map_or(0, |d| d.as_secs());
            let reason = susp.as_ref().map(|x| x.reason.clone()).unwrap_or_default();
            let only = susp.as_ref().is_some_and(|x| x.source_only) as u8;
            out.push_str(&format!(
                "site\t{name}\t{until}\t{msg:.3}\t{conn:.3}\t{reason}\t{only}\n"
            ));
        }
        for (name, (day, count)) in &self.pending_warm {
            out.push_str(&format!("warm\t{name}\t{day}\t{count}\n"));
        }
        let tmp = path.with_extension("tmp");
        if let Err(e) = std::fs::write(&tmp, out).and_then(|_| std::fs::rename(&tmp, path)) {
            warning!("cannot save site state in {}: {e}", path.display());
        }
    }

    /// Reads what [`Sites::save`] wrote: suspensions still running, and,
    /// after a reload (the same master), the rate limiters.
    fn load(&mut self) {
        let Some(path) = &self.state_path else { return };
        let Ok(text) = std::fs::read_to_string(path) else {
            return;
        };
        let mut same_master = false;
        let now = SystemTime::now();
        for line in text.lines() {
            let f: Vec<&str> = line.split('\t').collect();
            if let Some(pid) = line.strip_prefix("master ") {
                same_master = pid.trim() == std::os::unix::process::parent_id().to_string();
                continue;
            }
            if f.len() == 4 && f[0] == "warm" {
                let (day, count) = (f[2].parse().unwrap_or(0), f[3].parse().unwrap_or(0));
                self.pending_warm.insert(f[1].to_string(), (day, count));
                continue;
            }
            if f.len() < 6 || f[0] != "site" {
                continue;
            }
            let until: u64 = f[2].parse().unwrap_or(0);
            let until = UNIX_EPOCH + Duration::from_secs(until);
            let susp = (until > now).then(|| Suspension {
                until,
                reason: f[5].to_string(),
                source_only: f.get(6) == Some(&"1"),
            });
            let (msg, conn) = if same_master {
                (f[3].parse().unwrap_or(0.0), f[4].parse().unwrap_or(0.0))
            } else {
                (0.0, 0.0)
            };
            if susp.is_some() || msg > 0.0 || conn > 0.0 {
                self.pending.insert(f[1].to_string(), (susp, msg, conn));
            }
        }
    }
}

/// `postern queues`: one line, or one JSON object, per site (sorted by
/// name).
pub fn report(sched: &crate::schedule::Scheduler, json: bool) -> String {
    let mut names: Vec<&String> = sched.sites.sites.keys().collect();
    names.sort();
    let mut out = String::new();
    for name in names {
        let site = &sched.sites.sites[name];
        let queued = sched.site_queued(site);
        let mut s = site.borrow_mut();
        let rate = s.msg_rate.as_ref().map(|g| Rate::display(g.per_sec));
        let conf_rate = s
            .policy
            .max_message_rate
            .as_ref()
            .map(|r| Rate::display(r.per_sec()));
        let m = s.mode_now();
        let (mode, until) = (m.mode, m.until);
        let why = if mode == "backoff" {
            format!("rule \"{}\", reply \"{}\"", m.rule, m.reply)
        } else {
            m.reason
        };
        let domains: Vec<String> = s.domains.iter().cloned().collect();
        let max_conn = s.cur_connections.or(s.policy.max_connections);
        if json {
            out.push_str(&format!(
                "{{\"site\":{},\"source\":{},\"warmup_sent_today\":{},\"key\":{},\"domains\":[{}],\"queued\":{queued},\"active_connections\":{},\"max_connections\":{},\"rate\":{},\"configured_rate\":{},\"mode\":\"{mode}\",\"suspended_until\":{},\"reason\":{},\"last_reply\":{}}}\n",
                json_str(&s.name),
                if s.source.is_empty() { "null".into() } else { json_str(&s.source) },
                s.warm.1,
                json_str(&s.key),
                domains.iter().map(|d| json_str(d)).collect::<Vec<_>>().join(","),
                s.in_flight,
                max_conn.map_or("null".into(), |n| n.to_string()),
                rate.as_deref().map_or("null".into(), json_str),
                conf_rate.as_deref().map_or("null".into(), json_str),
                if until > 0 { until.to_string() } else { "null".into() },
                json_str(&why),
                json_str(&s.last_reply),
            ));
        } else {
            let mut line = format!(
                "{}{} domains={} queued={queued} connections={}/{} rate={} mode={mode}",
                s.name,
                if s.source.is_empty() {
                    String::new()
                } else {
                    format!(" source={} warmup_sent_today={}", s.source, s.warm.1)
                },
                domains.join(","),
                s.in_flight,
                max_conn.map_or("-".into(), |n| n.to_string()),
                match (&rate, &conf_rate) {
                    (Some(r), Some(c)) if r != c => format!("{r}(configured {c})"),
                    (Some(r), _) => r.clone(),
                    _ => "-".into(),
                },
            );
            if until > 0 {
                line.push_str(&format!(
                    " until={} reason=\"{why}\"",
                    postern_common::time::rfc5322_date(until)
                ));
            } else if !why.is_empty() {
                line.push_str(&format!(" {why}"));
            }
            if !s.last_reply.is_empty() {
                line.push_str(&format!(" last_reply=\"{}\"", s.last_reply));
            }
            out.push_str(&line);
            out.push('\n');
        }
    }
    // Suspensions saved by an earlier qmgr for sites not seen since.
    let mut pending: Vec<(&String, &Suspension)> = sched
        .sites
        .pending
        .iter()
        .filter_map(|(n, (s, _, _))| Some((n, s.as_ref()?)))
        .filter(|(_, s)| s.until > std::time::SystemTime::now())
        .collect();
    pending.sort_by(|a, b| a.0.cmp(b.0));
    for (name, s) in pending {
        let until = s
            .until
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        if json {
            out.push_str(&format!(
                "{{\"site\":{},\"domains\":[],\"queued\":0,\"active_connections\":0,\"mode\":\"suspended\",\"suspended_until\":{until},\"reason\":{}}}\n",
                json_str(name),
                json_str(&s.reason)
            ));
        } else {
            out.push_str(&format!(
                "{name} domains= queued=0 connections=0/- rate=- mode=suspended until={} reason=\"{}\"\n",
                postern_common::time::rfc5322_date(until),
                s.reason
            ));
        }
    }
    out
}

use postern_common::json::string as json_str;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_cuts_by_the_factor_and_recovers_additively() {
        let policy = Policy::parse(
            "max_connections=8 max_message_rate=20/s backoff_recover_after=5 backoff_min_rate=2/s",
        )
        .unwrap();
        let mut s = Site::new("s", "*", policy, Vec::new());
        s.enter_backoff("/rate/ backoff", "451 4.7.1 rate limited");
        assert_eq!(s.max_connections(), 4);
        assert!((s.msg_rate.as_ref().unwrap().per_sec - 10.0).abs() < 1e-9);
        // A second signal within a second is the same burst.
        s.enter_backoff("/rate/ backoff", "451 4.7.1 rate limited");
        assert_eq!(s.max_connections(), 4);
        // Recovery: +2/s (a tenth of 20/s) and +1 connection per 5
        // successes, until the configured limits are back.
        for _ in 0..5 {
            s.success();
        }
        assert_eq!(s.max_connections(), 5);
        assert!((s.msg_rate.as_ref().unwrap().per_sec - 12.0).abs() < 1e-9);
        for _ in 0..100 {
            s.success();
        }
        assert!(s.backoff.is_none(), "back to normal");
        assert_eq!(s.max_connections(), 8);
        assert!((s.msg_rate.as_ref().unwrap().per_sec - 20.0).abs() < 1e-9);
    }

    #[test]
    fn powermta_fixed_backoff_and_after_n() {
        let policy = Policy::parse(
            "max_connections=10 backoff_max_connections=2 backoff_message_rate=1/s \
             backoff_to_normal_after=1h",
        )
        .unwrap();
        let mut s = Site::new("s", "*", policy, Vec::new());
        s.enter_backoff("r", "421 x");
        assert_eq!(s.max_connections(), 2);
        assert!((s.msg_rate.as_ref().unwrap().per_sec - 1.0).abs() < 1e-9);
        let period = Some((3, Duration::from_secs(60)));
        assert!(!s.trigger("r", period) && !s.trigger("r", period));
        assert!(s.trigger("r", period), "the third match within the period");
        assert!(!s.trigger("r", period), "counting starts again");
    }
}
