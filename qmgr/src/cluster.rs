//! Cluster-wide site limits on Redis (`delivery_policy_redis =
//! host:port`): several Postern nodes delivering for the same domains
//! share each site's connection count, its message and connection rate
//! limiters, and its suspensions, so that `max_connections=20` for
//! Gmail holds for the whole cluster. Without the parameter nothing here
//! runs and every limit is the node's own.
//!
//! What Redis holds, per site (keys `postern:{SITE}:...`, the site's
//! name as a hash tag so that one site's keys sit together):
//! - `conns`: a hash, node → the connections (requests in flight) it
//!   holds; `alive`: a sorted set, node → when its leases expire. A node
//!   refreshes its expiry every [`HEARTBEAT`] while it holds connections
//!   ([`LEASE`] ahead); a node that dies stops refreshing, and the next
//!   node to ask drops its count: its connections are released by expiry.
//! - `msg` and `connrate`: the "theoretical arrival time" of a GCRA
//!   limiter (the same algorithm as [`postern_common::delivery_policy::Gcra`]).
//!
//! One Lua script ([`ACQUIRE`]) takes a connection and a place in both
//! rates at once, or answers why not (the cluster's connections are all
//! taken, or how long the rate asks to wait): the counting is atomic in
//! Redis, and the time is Redis's own (`TIME`), not the nodes'. A node
//! gives a connection back ([`RELEASE`]) when its request ends.
//!
//! Suspensions (by a reply rule, by `max_connect_failures`, or by
//! `postern suspend`/`resume`) are written to the hash
//! `postern:suspensions` and published on the channel of the same name;
//! a thread of every node is subscribed and hands them to the main
//! thread ([`crate::event::Event::Cluster`]), which applies them at once.
//! A node that (re)connects reads the hash first.
//!
//! qmgr's main thread never waits for Redis longer than
//! `delivery_policy_redis_timeout`: after a failed call it stops asking
//! and keeps to its local share of each limit (the limit divided by
//! `delivery_policy_cluster_size`, at least one connection) and logs so,
//! while the helper thread connects again every second; the new
//! connection is handed over, the node's counts are written back (Redis
//! may have restarted empty, or have counted releases it never got), and
//! the limits are shared again, which is logged too. Mail keeps flowing
//! throughout. The helper thread also refreshes the leases; a third
//! thread is the subscriber.
//!
//! A connection that a smtp agent keeps open between requests would
//! hold a place of the shared limit that no other node can see: with a
//! cluster, a site's requests tell the agent to close the connection at
//! the end of each request.

use crate::event::Event;
use crate::sites::{Site, Suspension};
use postern_common::delivery_policy::{Gcra, Rate};
use postern_common::resp::{self, Conn, Reply};
use postern_common::{info, warning};
use postern_conf::Config;
use std::collections::HashMap;
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// How long a node's connections count after its last refresh.
pub const LEASE: Duration = Duration::from_secs(10);
/// How often the helper thread refreshes the leases (and tries to
/// connect again while Redis is unreachable).
pub const HEARTBEAT: Duration = Duration::from_secs(1);
/// A destination whose site has all the cluster's connections asks
/// again after this long (the connection that frees one is another
/// node's: nothing tells this one).
pub const FULL_POLL: Duration = Duration::from_millis(50);

/// The hash and channel of suspensions.
const SUSPENSIONS: &str = "postern:suspensions";

/// Takes a connection and a place in the site's rates, all or nothing.
/// KEYS: conns, alive, msg, connrate. ARGV: node, max connections (0:
/// none), lease (ms), message interval and tolerance (ms, 0: no rate),
/// connection interval and tolerance. Returns {1, 0, total} when taken,
/// {0, -1, total} when the cluster's connections are all in use, {0, ms,
/// total} when a rate says to wait.
const ACQUIRE: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local node, limit, lease = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
for _, n in ipairs(redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now)) do
  redis.call('HDEL', KEYS[1], n)
  redis.call('ZREM', KEYS[2], n)
end
local total = 0
for _, v in ipairs(redis.call('HVALS', KEYS[1])) do total = total + (tonumber(v) or 0) end
if limit > 0 and total >= limit then return {0, -1, total} end
local function gcra(key, interval, tau)
  if interval <= 0 then return nil, 0 end
  local tat = tonumber(redis.call('GET', key) or '0') or 0
  local ready = math.max(tat, now) - tau
  if ready > now then return nil, ready - now end
  if tat + interval <= now then tat = now end
  return tat + interval, 0
end
local mi, ci = tonumber(ARGV[4]), tonumber(ARGV[6])
local m, mw = gcra(KEYS[3], mi, tonumber(ARGV[5]))
if mi > 0 and not m then return {0, math.max(1, math.ceil(mw)), total} end
local c, cw = gcra(KEYS[4], ci, tonumber(ARGV[7]))
if ci > 0 and not c then return {0, math.max(1, math.ceil(cw)), total} end
if m then redis.call('SET', KEYS[3], string.format('%.3f', m), 'PX', math.ceil(m - now) + 60000) end
if c then redis.call('SET', KEYS[4], string.format('%.3f', c), 'PX', math.ceil(c - now) + 60000) end
redis.call('HINCRBY', KEYS[1], node, 1)
redis.call('ZADD', KEYS[2], now + lease, node)
redis.call('PEXPIRE', KEYS[1], 2 * lease)
redis.call('PEXPIRE', KEYS[2], 2 * lease)
return {1, 0, total + 1}
"#;

/// Gives a connection back. KEYS: conns. ARGV: node.
const RELEASE: &str = r#"
local c = redis.call('HINCRBY', KEYS[1], ARGV[1], -1)
if c <= 0 then redis.call('HDEL', KEYS[1], ARGV[1]) end
return c
"#;

/// A node's count for a site: written as it is (ARGV[4] = "set", after
/// a reconnection) or only put back if Redis has lost the node (a
/// refresh: Redis restarted, or another node took it for dead; while
/// Redis knows the node, its main thread's own counting stands), and its
/// lease renewed. KEYS: conns, alive. ARGV: node, count, lease (ms),
/// mode.
const SYNC: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local node, n, lease = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
if n <= 0 then
  if ARGV[4] == 'set' then redis.call('HDEL', KEYS[1], node) end
  return 0
end
if ARGV[4] == 'set' or redis.call('ZSCORE', KEYS[2], node) == false then
  redis.call('HSET', KEYS[1], node, n)
end
redis.call('ZADD', KEYS[2], now + lease, node)
redis.call('PEXPIRE', KEYS[1], 2 * lease)
redis.call('PEXPIRE', KEYS[2], 2 * lease)
return n
"#;

fn key(site: &str, what: &str) -> String {
    format!("postern:{{{site}}}:{what}")
}

/// A suspension or a resumption another node published.
#[derive(Debug, Clone, PartialEq)]
pub enum ClusterEvent {
    Suspend {
        site: String,
        /// Unix seconds.
        until: u64,
        node: String,
        rule: String,
        reason: String,
    },
    Resume {
        site: String,
        node: String,
        rule: String,
    },
}

impl ClusterEvent {
    /// From a published message (tab-separated).
    fn parse(text: &str) -> Option<ClusterEvent> {
        let f: Vec<&str> = text.splitn(6, '\t').collect();
        match f.as_slice() {
            ["suspend", site, until, node, rule, reason] => Some(ClusterEvent::Suspend {
                site: site.to_string(),
                until: until.parse().ok()?,
                node: node.to_string(),
                rule: rule.to_string(),
                reason: reason.to_string(),
            }),
            ["resume", site, node, rule] => Some(ClusterEvent::Resume {
                site: site.to_string(),
                node: node.to_string(),
                rule: rule.to_string(),
            }),
            _ => None,
        }
    }

    fn node(&self) -> &str {
        match self {
            ClusterEvent::Suspend { node, .. } | ClusterEvent::Resume { node, .. } => node,
        }
    }
}

fn clean(s: &str) -> String {
    s.replace(['\t', '\n', '\r'], " ")
}

/// What a site may do now, by the cluster's count.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Admit {
    /// Go: a connection is taken (give it back with [`Cluster::release`]).
    Go,
    /// Ask again then (a rate, or the cluster's connections all in use).
    Wait(Instant),
    /// This node's share of connections is in use (Redis unreachable):
    /// the end of one of its requests makes the site ready again.
    Blocked,
}

/// The node's side of the cluster (in [`crate::sites::Sites`]).
pub struct Cluster {
    addr: String,
    /// This qmgr process's name in Redis.
    node: String,
    size: usize,
    timeout: Duration,
    /// The main thread's connection; None: Redis unreachable, local
    /// shares.
    conn: Option<Conn>,
    /// Connections the helper thread made.
    handover: Option<Receiver<Conn>>,
    /// Asks the helper thread for a connection.
    want: Option<Sender<()>>,
    /// Connections (requests in flight) per site on this node, for the
    /// refreshes and for writing them back after a reconnection.
    held: Arc<Mutex<HashMap<String, usize>>>,
    /// Local share limiters (message, connection rate) per site.
    local: HashMap<String, (Option<Gcra>, Option<Gcra>)>,
    /// Suspensions and resumptions not published yet (Redis was
    /// unreachable): site → message.
    unpublished: HashMap<String, (String, Option<String>)>,
    /// After a reconnection: the local shares still hold until then
    /// (counted in Redis meanwhile), so that every other node has
    /// written its connections back before Redis's count is trusted.
    grace_until: Option<Instant>,
}

/// The name a site's state has in Redis: the site, with its source when
/// it has one (limits hold per (source, site), as on one node).
fn site_id(site: &Site) -> String {
    crate::sources::site_key(&site.source, &site.name)
}

/// `delivery_policy_redis_timeout`: seconds, or milliseconds as `250ms`.
pub fn parse_timeout(v: &str) -> Option<Duration> {
    let v = v.trim();
    match v.strip_suffix("ms") {
        Some(ms) => ms.trim().parse().ok().map(Duration::from_millis),
        None => postern_conf::parse_time(v).map(Duration::from_secs),
    }
    .filter(|d| !d.is_zero())
}

impl Cluster {
    /// From main.cf; None without `delivery_policy_redis`.
    pub fn from_config(cfg: &Config) -> Option<Cluster> {
        let addr = cfg.get("delivery_policy_redis").trim().to_string();
        if addr.is_empty() {
            return None;
        }
        let size = cfg
            .get_u64("delivery_policy_cluster_size")
            .unwrap_or(1)
            .max(1) as usize;
        let tv = cfg.get("delivery_policy_redis_timeout");
        let timeout = parse_timeout(&tv).unwrap_or_else(|| {
            warning!("delivery_policy_redis_timeout: bad time \"{tv}\"; using 500ms");
            Duration::from_millis(500)
        });
        let started = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis());
        Some(Cluster {
            node: format!("{}:{}:{started}", cfg.get("myhostname"), std::process::id()),
            addr,
            size,
            timeout,
            conn: None,
            handover: None,
            want: None,
            held: Arc::new(Mutex::new(HashMap::new())),
            local: HashMap::new(),
            unpublished: HashMap::new(),
            grace_until: None,
        })
    }

    /// Connects, and starts the helper and subscriber threads (after
    /// qmgr has dropped its privileges): suspensions come to `tx`.
    pub fn start(&mut self, tx: Sender<Event>) {
        let (want_tx, want_rx) = channel();
        let (conn_tx, conn_rx) = channel();
        self.want = Some(want_tx);
        self.handover = Some(conn_rx);
        match connect(&self.addr, self.timeout) {
            Ok(c) => {
                info!(
                    "delivery_policy_redis {}: site limits shared by the cluster (node {})",
                    self.addr, self.node
                );
                self.conn = Some(c);
            }
            Err(e) => {
                self.fall_back(&e);
            }
        }
        let (addr, timeout, node, held) = (
            self.addr.clone(),
            self.timeout,
            self.node.clone(),
            self.held.clone(),
        );
        let helper = std::thread::Builder::new()
            .name("cluster".into())
            .spawn(move || helper(addr, timeout, node, held, want_rx, conn_tx));
        if let Err(e) = helper {
            warning!("cannot start the cluster thread: {e}");
        }
        let (addr, timeout, node) = (self.addr.clone(), self.timeout, self.node.clone());
        let sub = std::thread::Builder::new()
            .name("cluster-sub".into())
            .spawn(move || subscriber(addr, timeout, node, tx));
        if let Err(e) = sub {
            warning!("cannot start the cluster subscriber thread: {e}");
        }
    }

    /// Whether the limits are shared now (Redis answers).
    pub fn shared(&self) -> bool {
        self.conn.is_some()
    }

    /// Redis did not answer: local shares until the helper thread has a
    /// new connection.
    fn fall_back(&mut self, e: &resp::Error) {
        self.conn = None;
        warning!(
            "delivery_policy_redis {}: {e}: each site keeps to its local share \
             (1/{} of its limits) until Redis answers again",
            self.addr,
            self.size
        );
        if let Some(w) = &self.want {
            let _ = w.send(());
        }
    }

    /// Takes a connection the helper thread made, if there is one, and
    /// writes this node's counts and unpublished suspensions to Redis.
    fn take_handover(&mut self) {
        if self.conn.is_some() {
            return;
        }
        let Some(mut c) = self.handover.as_ref().and_then(|r| r.try_recv().ok()) else {
            return;
        };
        let held: Vec<(String, usize)> = self
            .held
            .lock()
            .map(|h| h.iter().map(|(k, v)| (k.clone(), *v)).collect())
            .unwrap_or_default();
        let lease = LEASE.as_millis().to_string();
        for (site, n) in &held {
            let r = c.cmd(&[
                "EVAL",
                SYNC,
                "2",
                &key(site, "conns"),
                &key(site, "alive"),
                &self.node,
                &n.to_string(),
                &lease,
                "set",
            ]);
            if let Err(e) = r {
                self.fall_back(&e);
                return;
            }
        }
        for (site, (msg, value)) in std::mem::take(&mut self.unpublished) {
            if let Err(e) = publish(&mut c, &site, &msg, value.as_deref()) {
                self.fall_back(&e);
                return;
            }
        }
        info!(
            "delivery_policy_redis {}: Redis answers again: site limits shared by the cluster",
            self.addr
        );
        // The other nodes' helper threads write their connections back
        // within a heartbeat of Redis's return.
        self.grace_until = Some(Instant::now() + 2 * HEARTBEAT);
        self.conn = Some(c);
    }

    fn held_add(&self, site: &str, up: bool) {
        if let Ok(mut h) = self.held.lock() {
            let n = h.entry(site.to_string()).or_insert(0);
            *n = if up { *n + 1 } else { n.saturating_sub(1) };
        }
    }

    /// Whether one more request of `site` may start now: the cluster's
    /// count in Redis, or this node's share when Redis is unreachable.
    /// `Go` takes the connection.
    pub fn admit(&mut self, site: &Site, now: Instant) -> Admit {
        self.take_handover();
        let limit = match site.max_connections() {
            usize::MAX => 0,
            n => n,
        };
        if self.grace_until.is_some_and(|t| Instant::now() < t) && self.conn.is_some() {
            let a = self.admit_local(site, limit, now);
            if a == Admit::Go {
                // Counted in Redis, limited by the share.
                let r = self.acquire(site, 0, ("0".into(), "0".into()), ("0".into(), "0".into()));
                if let Err(e) = r {
                    self.fall_back(&e);
                }
            }
            return a;
        }
        self.grace_until = None;
        if self.conn.is_some() {
            let m = gcra_args(site.msg_rate.as_ref());
            let c = gcra_args(site.conn_rate.as_ref());
            let r = self.acquire(site, limit, m, c);
            match r {
                Ok(r) => {
                    let v: Vec<i64> = r.items().iter().filter_map(Reply::as_int).collect();
                    return match v.as_slice() {
                        [1, ..] => {
                            self.held_add(&site_id(site), true);
                            Admit::Go
                        }
                        [0, -1, ..] => Admit::Wait(now + FULL_POLL),
                        [0, ms, ..] => Admit::Wait(now + Duration::from_millis(*ms as u64)),
                        _ => {
                            self.fall_back(&resp::Error::Protocol(format!(
                                "unexpected answer {r:?}"
                            )));
                            self.admit_local(site, limit, now)
                        }
                    };
                }
                Err(e) => self.fall_back(&e),
            }
        }
        self.admit_local(site, limit, now)
    }

    /// [`ACQUIRE`] for `site`: `limit` connections (0: none), message
    /// and connection rates as [`gcra_args`] gives them.
    fn acquire(
        &mut self,
        site: &Site,
        limit: usize,
        (mi, mt): (String, String),
        (ci, ct): (String, String),
    ) -> Result<Reply, resp::Error> {
        let Some(c) = self.conn.as_mut() else {
            return Err(resp::Error::Protocol("not connected".into()));
        };
        c.cmd(&[
            "EVAL",
            ACQUIRE,
            "4",
            &key(&site_id(site), "conns"),
            &key(&site_id(site), "alive"),
            &key(&site_id(site), "msg"),
            &key(&site_id(site), "connrate"),
            &self.node,
            &limit.to_string(),
            &LEASE.as_millis().to_string(),
            &mi,
            &mt,
            &ci,
            &ct,
        ])
    }

    /// This node's share of the site's limits.
    fn admit_local(&mut self, site: &Site, limit: usize, now: Instant) -> Admit {
        if limit > 0 && site.in_flight >= (limit / self.size).max(1) {
            return Admit::Blocked;
        }
        let size = self.size as f64;
        let share = |g: Option<&Gcra>, mine: &mut Option<Gcra>| match g {
            None => *mine = None,
            Some(g) => {
                let per_sec = g.per_sec / size;
                let burst = g.burst.div_ceil(self.size as u32).max(1);
                match mine {
                    Some(m) => {
                        m.per_sec = per_sec;
                        m.burst = burst;
                    }
                    None => {
                        *mine = Some(Gcra::new(&Rate {
                            count: per_sec,
                            period: Duration::from_secs(1),
                            burst,
                        }))
                    }
                }
            }
        };
        let (m, c) = self.local.entry(site_id(site)).or_default();
        share(site.msg_rate.as_ref(), m);
        share(site.conn_rate.as_ref(), c);
        let at = [m.as_ref(), c.as_ref()]
            .into_iter()
            .flatten()
            .map(|g| g.ready_at(now))
            .max()
            .unwrap_or(now);
        if at > now {
            return Admit::Wait(at);
        }
        for g in [m.as_mut(), c.as_mut()].into_iter().flatten() {
            let _ = g.take(now);
        }
        self.held_add(&site_id(site), true);
        Admit::Go
    }

    /// A request that [`Cluster::admit`] let go has ended.
    pub fn release(&mut self, site: &str) {
        // A new connection writes back the count with this request in
        // it, then gives it back.
        self.take_handover();
        self.held_add(site, false);
        if let Some(c) = self.conn.as_mut() {
            if let Err(e) = c.cmd(&["EVAL", RELEASE, "1", &key(site, "conns"), &self.node]) {
                self.fall_back(&e);
            }
        }
    }

    /// A suspension set on this node, for every node.
    pub fn publish_suspend(&mut self, site: &str, s: &Suspension, rule: &str) {
        let until = s
            .until
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let value = format!(
            "{until}\t{}\t{}\t{}",
            self.node,
            clean(rule),
            clean(&s.reason)
        );
        let msg = format!("suspend\t{}\t{value}", clean(site));
        self.send(site, msg, Some(value));
    }

    /// A suspension lifted on this node, for every node.
    pub fn publish_resume(&mut self, site: &str, rule: &str) {
        let msg = format!("resume\t{}\t{}\t{}", clean(site), self.node, clean(rule));
        self.send(site, msg, None);
    }

    fn send(&mut self, site: &str, msg: String, value: Option<String>) {
        self.take_handover();
        if let Some(c) = self.conn.as_mut() {
            match publish(c, site, &msg, value.as_deref()) {
                Ok(()) => return,
                Err(e) => self.fall_back(&e),
            }
        }
        self.unpublished.insert(site.to_string(), (msg, value));
    }
}

/// Interval and tolerance (ms) of a limiter, for [`ACQUIRE`].
fn gcra_args(g: Option<&Gcra>) -> (String, String) {
    match g {
        Some(g) if g.per_sec > 0.0 => {
            let interval = 1000.0 / g.per_sec;
            (
                format!("{interval:.3}"),
                format!("{:.3}", interval * (g.burst.max(1) - 1) as f64),
            )
        }
        _ => ("0".into(), "0".into()),
    }
}

/// Writes a suspension (or removes it: `value` None) and publishes it.
fn publish(c: &mut Conn, site: &str, msg: &str, value: Option<&str>) -> Result<(), resp::Error> {
    match value {
        Some(v) => c.cmd(&["HSET", SUSPENSIONS, site, v])?,
        None => c.cmd(&["HDEL", SUSPENSIONS, site])?,
    };
    c.cmd(&["PUBLISH", SUSPENSIONS, msg])?;
    Ok(())
}

/// A connection that answers.
fn connect(addr: &str, timeout: Duration) -> Result<Conn, resp::Error> {
    let mut c = Conn::connect(addr, timeout)?;
    c.cmd(&["PING"])?;
    Ok(c)
}

/// The helper thread: refreshes this node's leases every [`HEARTBEAT`]
/// on a connection of its own, and makes the main thread a new
/// connection when it asks (every second until Redis answers).
fn helper(
    addr: String,
    timeout: Duration,
    node: String,
    held: Arc<Mutex<HashMap<String, usize>>>,
    want: Receiver<()>,
    give: Sender<Conn>,
) {
    let mut own: Option<Conn> = None;
    let mut wanted = false;
    let lease = LEASE.as_millis().to_string();
    loop {
        match want.recv_timeout(HEARTBEAT) {
            Ok(()) => wanted = true,
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => return,
        }
        while want.try_recv().is_ok() {}
        if wanted {
            if let Ok(c) = connect(&addr, timeout) {
                if give.send(c).is_err() {
                    return;
                }
                wanted = false;
            }
        }
        let sites: Vec<(String, usize)> = held
            .lock()
            .map(|h| {
                h.iter()
                    .filter(|(_, n)| **n > 0)
                    .map(|(k, v)| (k.clone(), *v))
                    .collect()
            })
            .unwrap_or_default();
        if sites.is_empty() {
            continue;
        }
        if own.is_none() {
            own = connect(&addr, timeout).ok();
        }
        let Some(c) = own.as_mut() else { continue };
        for (site, n) in sites {
            let r = c.cmd(&[
                "EVAL",
                SYNC,
                "2",
                &key(&site, "conns"),
                &key(&site, "alive"),
                &node,
                &n.to_string(),
                &lease,
                "keep",
            ]);
            if r.is_err() {
                own = None;
                break;
            }
        }
    }
}

/// The subscriber thread: reads the suspensions Redis holds, then every
/// one published, and hands them to the main thread; connects again
/// every second when the connection fails.
fn subscriber(addr: String, timeout: Duration, node: String, tx: Sender<Event>) {
    loop {
        if let Ok(mut c) = connect(&addr, timeout) {
            // Ok: the main thread is gone.
            if subscribed(&mut c, &addr, timeout, &node, &tx).is_ok() {
                return;
            }
        }
        std::thread::sleep(HEARTBEAT);
    }
}

/// One subscribed connection, until it fails.
fn subscribed(
    c: &mut Conn,
    addr: &str,
    timeout: Duration,
    node: &str,
    tx: &Sender<Event>,
) -> Result<(), resp::Error> {
    // Subscribe first, then read what is there: nothing published in
    // between is missed.
    c.send(&["SUBSCRIBE", SUSPENSIONS])?;
    let first = c.read()?;
    if first.items().first().and_then(Reply::as_str).as_deref() != Some("subscribe") {
        return Err(resp::Error::Protocol(format!(
            "unexpected answer {first:?}"
        )));
    }
    let mut reader = connect(addr, timeout)?;
    let all = reader.cmd(&["HGETALL", SUSPENSIONS])?;
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    for pair in all.items().chunks(2) {
        let (Some(site), Some(value)) = (
            pair.first().and_then(Reply::as_str),
            pair.get(1).and_then(Reply::as_str),
        ) else {
            continue;
        };
        let Some(ev) = ClusterEvent::parse(&format!("suspend\t{site}\t{value}")) else {
            continue;
        };
        match ev {
            ClusterEvent::Suspend { until, .. } if until <= now => {
                let _ = reader.cmd(&["HDEL", SUSPENSIONS, &site]);
            }
            ev => {
                if tx.send(Event::Cluster(ev)).is_err() {
                    return Ok(());
                }
            }
        }
    }
    drop(reader);
    // A silent server is noticed: after a quiet read timeout, a PING
    // must be answered within the next.
    c.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut pinged = false;
    loop {
        let r = match c.read() {
            Ok(r) => r,
            Err(resp::Error::Io(e))
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) && !pinged =>
            {
                c.send(&["PING"])?;
                pinged = true;
                continue;
            }
            Err(e) => return Err(e),
        };
        pinged = false;
        let items = r.items();
        if items.first().and_then(Reply::as_str).as_deref() != Some("message") {
            continue;
        }
        let Some(text) = items.get(2).and_then(Reply::as_str) else {
            continue;
        };
        let Some(ev) = ClusterEvent::parse(&text) else {
            warning!("delivery_policy_redis: unexpected message \"{text}\"");
            continue;
        };
        if ev.node() == node {
            continue;
        }
        if tx.send(Event::Cluster(ev)).is_err() {
            return Ok(());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_round_trip() {
        let ev = ClusterEvent::parse(
            "suspend\tmx:.google.com\t1700000000\tn1\tpostern suspend\tmaintenance\twindow",
        );
        assert_eq!(
            ev,
            Some(ClusterEvent::Suspend {
                site: "mx:.google.com".into(),
                until: 1700000000,
                node: "n1".into(),
                rule: "postern suspend".into(),
                reason: "maintenance\twindow".into(),
            })
        );
        assert_eq!(
            ClusterEvent::parse("resume\ts\tn2\tpostern resume"),
            Some(ClusterEvent::Resume {
                site: "s".into(),
                node: "n2".into(),
                rule: "postern resume".into()
            })
        );
        assert_eq!(ClusterEvent::parse("nonsense"), None);
    }

    fn unreachable(size: usize) -> Cluster {
        Cluster {
            addr: "127.0.0.1:1".into(),
            node: "n".into(),
            size,
            timeout: Duration::from_millis(100),
            conn: None,
            handover: None,
            want: None,
            held: Arc::new(Mutex::new(HashMap::new())),
            local: HashMap::new(),
            unpublished: HashMap::new(),
            grace_until: None,
        }
    }

    #[test]
    fn without_redis_each_node_keeps_to_its_share() {
        let policy = postern_common::delivery_policy::Policy::parse(
            "max_connections=5 max_message_rate=20/s",
        )
        .unwrap();
        let mut site = Site::new("s", "*", policy, Vec::new());
        let mut c = unreachable(2);
        let now = Instant::now();
        // 20/s shared by two: 10/s here, one every 100 ms.
        assert_eq!(c.admit(&site, now), Admit::Go);
        site.in_flight += 1;
        match c.admit(&site, now) {
            Admit::Wait(at) => assert!(at >= now + Duration::from_millis(99)),
            other => panic!("{other:?}"),
        }
        let later = now + Duration::from_millis(100);
        assert_eq!(c.admit(&site, later), Admit::Go);
        site.in_flight += 1;
        // 5 connections shared by two: 2 here.
        assert_eq!(
            c.admit(&site, later + Duration::from_secs(1)),
            Admit::Blocked
        );
        assert_eq!(c.held.lock().unwrap()["s"], 2);
        c.release("s");
        assert_eq!(c.held.lock().unwrap()["s"], 1);
        // What could not be published waits for Redis.
        c.publish_resume("s", "postern resume");
        assert!(c.unpublished.contains_key("s"));
    }

    #[test]
    fn timeouts_in_seconds_or_milliseconds() {
        assert_eq!(parse_timeout("250ms"), Some(Duration::from_millis(250)));
        assert_eq!(parse_timeout("2s"), Some(Duration::from_secs(2)));
        assert_eq!(parse_timeout("1"), Some(Duration::from_secs(1)));
        assert_eq!(parse_timeout("0ms"), None);
        assert_eq!(parse_timeout("x"), None);
    }

    #[test]
    fn gcra_arguments_in_milliseconds() {
        let g = Gcra::new(&Rate::parse("20/s").unwrap());
        assert_eq!(gcra_args(Some(&g)), ("50.000".into(), "0.000".into()));
        let mut r = Rate::parse("10/s").unwrap();
        r.burst = 3;
        let g = Gcra::new(&r);
        assert_eq!(gcra_args(Some(&g)), ("100.000".into(), "200.000".into()));
        assert_eq!(gcra_args(None), ("0".into(), "0".into()));
    }
}
