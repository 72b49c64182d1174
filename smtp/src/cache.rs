//! The connection cache: SMTP sessions kept open inside one agent process
//! between delivery requests, as Postfix's `smtp_connection_cache_*`.
//!
//! With `smtp_connection_cache_on_demand = yes` a session whose
//! transaction ended well is not closed but kept here, under a key made
//! of the next hop, the server and the credentials used; the next request
//! for the same destination that this process gets (qmgr still sends one
//! request per connection to the agent) takes it, says RSET, and runs its
//! transaction over it. LMTP sessions (TCP or Unix socket) are kept the
//! same way. A session idle for `smtp_connection_cache_time_limit`
//! is closed with QUIT by a small reaper thread, and one older than
//! `smtp_connection_reuse_time_limit` is closed instead of being kept.
//! Before the process ends (after `max_use` requests) every kept session
//! is closed with QUIT.
//!
//! A request for a site of `delivery_policy_maps` carries the site
//! (`DeliveryRequest::site`): its sessions are kept under the site's name
//! (every domain of the site shares them, so the connections the site
//! sees stay within qmgr's `max_connections`), closed after
//! `max_messages_per_connection` messages, and kept idle for the site's
//! `idle_timeout` instead of `smtp_connection_cache_time_limit`.

use crate::client::Idle;
use postern_common::ipc::SiteHint;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

struct Entry {
    key: String,
    idle: Idle<'static>,
    /// When the connection was made.
    created: Instant,
    /// When it was put here.
    since: Instant,
    /// Transactions done over it so far.
    uses: u32,
    /// How long it may stay idle here.
    idle_limit: Duration,
}

#[derive(Default)]
struct Inner {
    entries: Vec<Entry>,
    reaper: bool,
}

/// Sessions of this process, by destination.
pub struct Cache {
    inner: Arc<Mutex<Inner>>,
    idle_limit: Duration,
    reuse_limit: Duration,
    quit_timeout: Duration,
}

impl Cache {
    pub fn new(idle_limit: Duration, reuse_limit: Duration, quit_timeout: Duration) -> Cache {
        Cache {
            inner: Arc::new(Mutex::new(Inner::default())),
            idle_limit,
            reuse_limit,
            quit_timeout,
        }
    }

    /// A kept session for `key`, with the time its connection was made
    /// and the transactions done over it.
    pub fn take(&self, key: &str) -> Option<(Idle<'static>, Instant, u32)> {
        let mut g = self.inner.lock().ok()?;
        let i = g.entries.iter().position(|e| e.key == key)?;
        let e = g.entries.swap_remove(i);
        if e.since.elapsed() >= e.idle_limit {
            drop(g);
            e.idle.quit(self.quit_timeout);
            return None;
        }
        Some((e.idle, e.created, e.uses))
    }

    /// Keeps a session that has done `uses` transactions, or closes it
    /// when it is too old to reuse or has done as many as its site
    /// allows.
    pub fn put(
        &self,
        key: String,
        idle: Idle<'static>,
        created: Instant,
        uses: u32,
        site: Option<&SiteHint>,
    ) {
        let max_uses = site.map_or(0, |s| s.max_messages_per_connection);
        if created.elapsed() >= self.reuse_limit
            || (max_uses > 0 && uses >= max_uses)
            || site.is_some_and(|s| s.no_reuse)
        {
            idle.quit(self.quit_timeout);
            return;
        }
        let idle_limit = match site.map_or(0, |s| s.idle_timeout_secs) {
            0 => self.idle_limit,
            n => Duration::from_secs(n as u64),
        };
        let start_reaper = {
            let Ok(mut g) = self.inner.lock() else { return };
            g.entries.push(Entry {
                key,
                idle,
                created,
                since: Instant::now(),
                uses,
                idle_limit,
            });
            !std::mem::replace(&mut g.reaper, true)
        };
        if start_reaper {
            let inner = self.inner.clone();
            let quit = self.quit_timeout;
            let spawned = std::thread::Builder::new()
                .name("connection-cache".into())
                .spawn(move || reap(inner, quit));
            if spawned.is_err() {
                if let Ok(mut g) = self.inner.lock() {
                    g.reaper = false;
                }
            }
        }
    }
}

impl Cache {
    /// Closes every kept session (QUIT).
    pub fn close_all(&self) {
        let all = match self.inner.lock() {
            Ok(mut g) => std::mem::take(&mut g.entries),
            Err(_) => return,
        };
        for e in all {
            e.idle.quit(self.quit_timeout);
        }
    }
}

/// Closes sessions idle for their limit; ends when the cache is empty.
fn reap(inner: Arc<Mutex<Inner>>, quit: Duration) {
    loop {
        let tick = inner
            .lock()
            .ok()
            .and_then(|g| g.entries.iter().map(|e| e.idle_limit).min())
            .unwrap_or(Duration::from_millis(200));
        std::thread::sleep(Duration::from_millis(200).min(tick));
        let expired: Vec<Entry> = {
            let Ok(mut g) = inner.lock() else { return };
            let (old, keep): (Vec<Entry>, Vec<Entry>) = std::mem::take(&mut g.entries)
                .into_iter()
                .partition(|e| e.since.elapsed() >= e.idle_limit);
            g.entries = keep;
            if g.entries.is_empty() && old.is_empty() {
                g.reaper = false;
                return;
            }
            old
        };
        for e in expired {
            e.idle.quit(quit);
        }
    }
}
