//! Client session counts and event rates, as Postfix's anvil(8) keeps
//! them: the one definition of the counting, used by the `anvil` daemon
//! (for all smtpd processes) and by smtpd itself when anvil cannot be
//! reached (for its own sessions only).
//!
//! Everything is keyed by an `ident`, a (service, client) pair that the
//! caller spells as it likes (smtpd: `SERVICE:ADDRESS`). Per ident the
//! table keeps the number of open sessions and, for each [`Event`], the
//! events in the current time unit: a window opens at the first event and
//! is over `unit` later, when the count starts from zero again (Postfix's
//! fixed windows, constant memory per client). The limits themselves are
//! the caller's business: the table only counts and answers numbers.
//!
//! Sessions are counted per `owner` (anvil: one per client connection,
//! i.e. per smtpd process), so that when an owner goes away
//! ([`Table::drop_owner`]) its sessions are no longer counted, and an
//! owner can only end sessions it started. Entries with no session and no
//! event in the current unit are dropped as time goes by.

use std::collections::HashMap;
use std::time::{Duration, Instant};

/// What is counted per time unit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Event {
    /// A new session (`smtpd_client_connection_rate_limit`).
    Connection,
    /// A MAIL FROM (`smtpd_client_message_rate_limit`).
    Message,
    /// A RCPT TO (`smtpd_client_recipient_rate_limit`).
    Recipient,
    /// An AUTH command (`smtpd_client_auth_rate_limit`).
    Auth,
}

impl Event {
    pub const ALL: [Event; 4] = [
        Event::Connection,
        Event::Message,
        Event::Recipient,
        Event::Auth,
    ];

    fn index(self) -> usize {
        self as usize
    }

    /// Postfix's word for it in anvil's statistics.
    pub fn name(self) -> &'static str {
        match self {
            Event::Connection => "connection",
            Event::Message => "message",
            Event::Recipient => "recipient",
            Event::Auth => "auth",
        }
    }
}

#[derive(Debug, Clone, Copy, Default)]
struct Window {
    start: Option<Instant>,
    count: u32,
}

impl Window {
    fn live(&self, now: Instant, unit: Duration) -> bool {
        self.start.is_some_and(|s| now.duration_since(s) < unit)
    }

    fn add(&mut self, now: Instant, unit: Duration) -> u32 {
        if !self.live(now, unit) {
            self.start = Some(now);
            self.count = 0;
        }
        self.count = self.count.saturating_add(1);
        self.count
    }
}

#[derive(Debug, Default)]
struct Client {
    sessions: u32,
    windows: [Window; 4],
}

/// The counts of every client.
#[derive(Debug)]
pub struct Table {
    unit: Duration,
    clients: HashMap<String, Client>,
    /// Open sessions per owner and ident.
    owners: HashMap<u64, HashMap<String, u32>>,
    last_prune: Option<Instant>,
}

impl Table {
    /// A table whose rates are per `unit` (`anvil_rate_time_unit`).
    pub fn new(unit: Duration) -> Table {
        Table {
            unit: unit.max(Duration::from_secs(1)),
            clients: HashMap::new(),
            owners: HashMap::new(),
            last_prune: None,
        }
    }

    pub fn unit(&self) -> Duration {
        self.unit
    }

    /// A new session of `ident` for `owner`: returns the open sessions
    /// (this one included) and the connections in this time unit (this
    /// one included). The session counts until [`Table::disconnect`] or
    /// [`Table::drop_owner`], whether the caller accepts it or not.
    pub fn connect(&mut self, owner: u64, ident: &str, now: Instant) -> (u32, u32) {
        self.prune(now);
        let unit = self.unit;
        let c = self.clients.entry(ident.to_string()).or_default();
        c.sessions = c.sessions.saturating_add(1);
        let rate = c.windows[Event::Connection.index()].add(now, unit);
        let sessions = c.sessions;
        *self
            .owners
            .entry(owner)
            .or_default()
            .entry(ident.to_string())
            .or_insert(0) += 1;
        (sessions, rate)
    }

    /// Sessions `owner` already has open (counted again after anvil
    /// restarted): they count as sessions, not as new connections.
    pub fn add_sessions(&mut self, owner: u64, ident: &str, n: u32) {
        if n == 0 {
            return;
        }
        let c = self.clients.entry(ident.to_string()).or_default();
        c.sessions = c.sessions.saturating_add(n);
        *self
            .owners
            .entry(owner)
            .or_default()
            .entry(ident.to_string())
            .or_insert(0) += n;
    }

    /// A session of `owner` ended. Ignored unless that owner has one open
    /// for `ident`.
    pub fn disconnect(&mut self, owner: u64, ident: &str) {
        let Some(mine) = self.owners.get_mut(&owner) else {
            return;
        };
        let Some(n) = mine.get_mut(ident) else {
            return;
        };
        *n -= 1;
        if *n == 0 {
            mine.remove(ident);
            if mine.is_empty() {
                self.owners.remove(&owner);
            }
        }
        if let Some(c) = self.clients.get_mut(ident) {
            c.sessions = c.sessions.saturating_sub(1);
        }
    }

    /// `owner` went away: none of its sessions count any more. Rates are
    /// kept until their time unit is over.
    pub fn drop_owner(&mut self, owner: u64) {
        let Some(mine) = self.owners.remove(&owner) else {
            return;
        };
        for (ident, n) in mine {
            if let Some(c) = self.clients.get_mut(&ident) {
                c.sessions = c.sessions.saturating_sub(n);
            }
        }
    }

    /// The sessions `owner` has open, per ident.
    pub fn sessions_of(&self, owner: u64) -> Vec<(String, u32)> {
        self.owners
            .get(&owner)
            .map(|m| m.iter().map(|(i, n)| (i.clone(), *n)).collect())
            .unwrap_or_default()
    }

    /// Counts one `event` of `ident`; returns the events in this time
    /// unit (this one included).
    pub fn event(&mut self, ident: &str, event: Event, now: Instant) -> u32 {
        self.prune(now);
        let unit = self.unit;
        let c = self.clients.entry(ident.to_string()).or_default();
        c.windows[event.index()].add(now, unit)
    }

    /// How many clients the table holds.
    pub fn len(&self) -> usize {
        self.clients.len()
    }

    pub fn is_empty(&self) -> bool {
        self.clients.is_empty()
    }

    /// Drops clients with no session and no event in the current unit
    /// (at most once a second, or once per unit when that is shorter).
    fn prune(&mut self, now: Instant) {
        let every = self.unit.min(Duration::from_secs(1));
        if self
            .last_prune
            .is_some_and(|t| now.duration_since(t) < every)
        {
            return;
        }
        self.last_prune = Some(now);
        let unit = self.unit;
        self.clients
            .retain(|_, c| c.sessions > 0 || c.windows.iter().any(|w| w.live(now, unit)));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_and_rates() {
        let t0 = Instant::now();
        let mut t = Table::new(Duration::from_secs(60));
        assert_eq!(t.connect(1, "smtp:192.0.2.1", t0), (1, 1));
        assert_eq!(t.connect(2, "smtp:192.0.2.1", t0), (2, 2));
        assert_eq!(t.connect(2, "submission:192.0.2.1", t0), (1, 1));
        // Another owner cannot end owner 1's session.
        t.disconnect(3, "smtp:192.0.2.1");
        assert_eq!(t.connect(3, "smtp:192.0.2.1", t0), (3, 3));
        t.disconnect(3, "smtp:192.0.2.1");
        // Owner 2 goes away: its sessions no longer count; rates stay.
        assert_eq!(t.sessions_of(2).len(), 2);
        t.drop_owner(2);
        assert_eq!(t.connect(1, "smtp:192.0.2.1", t0), (2, 4));
        // Sessions added after a restart do not count as connections.
        t.add_sessions(4, "smtp:192.0.2.1", 2);
        assert_eq!(t.connect(1, "smtp:192.0.2.1", t0), (5, 5));
        // Events per unit; a new unit starts from zero.
        assert_eq!(t.event("smtp:192.0.2.1", Event::Message, t0), 1);
        assert_eq!(t.event("smtp:192.0.2.1", Event::Message, t0), 2);
        assert_eq!(t.event("smtp:192.0.2.1", Event::Auth, t0), 1);
        let later = t0 + Duration::from_secs(61);
        assert_eq!(t.event("smtp:192.0.2.1", Event::Message, later), 1);
        assert_eq!(t.connect(1, "smtp:192.0.2.1", later), (6, 1));
    }

    #[test]
    fn forgets_idle_clients() {
        let t0 = Instant::now();
        let mut t = Table::new(Duration::from_secs(2));
        t.connect(1, "a", t0);
        t.disconnect(1, "a");
        t.event("b", Event::Recipient, t0);
        t.connect(1, "c", t0);
        assert_eq!(t.len(), 3);
        t.event("d", Event::Message, t0 + Duration::from_secs(3));
        // a and b expired; c has a session; d is new.
        assert_eq!(t.len(), 2);
    }
}
