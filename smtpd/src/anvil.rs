//! Client rate limits, as Postfix's anvil(8) keeps them:
//! `smtpd_client_connection_count_limit` (simultaneous sessions),
//! `smtpd_client_connection_rate_limit`, `smtpd_client_message_rate_limit`
//! and `smtpd_client_recipient_rate_limit` (events per
//! `anvil_rate_time_unit`), per client address, except for
//! `smtpd_client_event_limit_exceptions` (default `$mynetworks`).
//!
//! Postfix counts in one anvil server for all smtpd processes; Postern
//! counts in each smtpd process. One process serves up to
//! `smtpd_client_session_limit` sessions, so the counts are whole unless
//! master had to start more than one process for the service.
//!
//! The table lives in the event loop's thread and is shared with the
//! sessions (`Rc<RefCell<Anvil>>`); entries of clients with no session
//! and no recent event are dropped as time goes by.

use postern_common::cidr::CidrList;
use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;
use std::time::{Duration, Instant};

/// The limits (0 = none).
#[derive(Debug, Clone, Default)]
pub struct Limits {
    pub connection_count: u32,
    pub connection_rate: u32,
    pub message_rate: u32,
    pub recipient_rate: u32,
    pub time_unit: Duration,
    pub exceptions: CidrList,
}

#[derive(Debug, Default)]
struct Client {
    sessions: u32,
    connections: VecDeque<Instant>,
    messages: VecDeque<Instant>,
    recipients: VecDeque<Instant>,
}

/// Which event a rate is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    Message,
    Recipient,
}

#[derive(Debug, Default)]
pub struct Anvil {
    limits: Limits,
    clients: HashMap<IpAddr, Client>,
    last_prune: Option<Instant>,
}

/// Counts `now` in a window and returns the events in the last `unit`.
fn count(q: &mut VecDeque<Instant>, now: Instant, unit: Duration) -> u32 {
    while q.front().is_some_and(|t| now.duration_since(*t) >= unit) {
        q.pop_front();
    }
    q.push_back(now);
    q.len() as u32
}

impl Anvil {
    pub fn new(limits: Limits) -> Anvil {
        Anvil {
            limits,
            ..Default::default()
        }
    }

    fn exempt(&self, ip: IpAddr) -> bool {
        self.limits.exceptions.matches(ip)
    }

    /// A new session from `ip`: Err((what, count)) when it is over a
    /// limit (the caller refuses it, and must not call [`Anvil::disconnect`]).
    pub fn connect(&mut self, ip: IpAddr) -> Result<(), (&'static str, u32)> {
        let now = Instant::now();
        self.prune(now);
        if self.exempt(ip) {
            return Ok(());
        }
        let unit = self.limits.time_unit;
        let (count_limit, rate_limit) = (self.limits.connection_count, self.limits.connection_rate);
        let c = self.clients.entry(ip).or_default();
        let rate = count(&mut c.connections, now, unit);
        if count_limit > 0 && c.sessions + 1 > count_limit {
            return Err(("Connection concurrency limit", c.sessions + 1));
        }
        if rate_limit > 0 && rate > rate_limit {
            return Err(("Connection rate limit", rate));
        }
        c.sessions += 1;
        Ok(())
    }

    /// A session accepted by [`Anvil::connect`] ended.
    pub fn disconnect(&mut self, ip: IpAddr) {
        if let Some(c) = self.clients.get_mut(&ip) {
            c.sessions = c.sessions.saturating_sub(1);
        }
    }

    /// A MAIL FROM or RCPT TO from `ip`: Err(rate) when over the limit.
    pub fn event(&mut self, ip: IpAddr, e: Event) -> Result<(), u32> {
        let limit = match e {
            Event::Message => self.limits.message_rate,
            Event::Recipient => self.limits.recipient_rate,
        };
        if limit == 0 || self.exempt(ip) {
            return Ok(());
        }
        let now = Instant::now();
        let unit = self.limits.time_unit;
        let c = self.clients.entry(ip).or_default();
        let q = match e {
            Event::Message => &mut c.messages,
            Event::Recipient => &mut c.recipients,
        };
        let n = count(q, now, unit);
        if n > limit {
            Err(n)
        } else {
            Ok(())
        }
    }

    /// Drops clients with no session and nothing in the window.
    fn prune(&mut self, now: Instant) {
        if self.last_prune.is_some_and(|t| {
            now.duration_since(t) < self.limits.time_unit.min(Duration::from_secs(60))
        }) {
            return;
        }
        self.last_prune = Some(now);
        let unit = self.limits.time_unit;
        let recent =
            |q: &VecDeque<Instant>| q.back().is_some_and(|t| now.duration_since(*t) < unit);
        self.clients.retain(|_, c| {
            c.sessions > 0 || recent(&c.connections) || recent(&c.messages) || recent(&c.recipients)
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn anvil(count: u32, rate: u32, msg: u32) -> Anvil {
        Anvil::new(Limits {
            connection_count: count,
            connection_rate: rate,
            message_rate: msg,
            recipient_rate: 0,
            time_unit: Duration::from_secs(60),
            exceptions: CidrList::parse(&["127.0.0.1"]).unwrap(),
        })
    }

    #[test]
    fn limits() {
        let ip: IpAddr = "192.0.2.1".parse().unwrap();
        let mut a = anvil(2, 0, 0);
        assert!(a.connect(ip).is_ok());
        assert!(a.connect(ip).is_ok());
        assert_eq!(a.connect(ip), Err(("Connection concurrency limit", 3)));
        a.disconnect(ip);
        assert!(a.connect(ip).is_ok());
        // Exempt.
        let lo: IpAddr = "127.0.0.1".parse().unwrap();
        for _ in 0..10 {
            assert!(a.connect(lo).is_ok());
        }
        let mut a = anvil(0, 2, 1);
        assert!(a.connect(ip).is_ok());
        assert!(a.connect(ip).is_ok());
        assert_eq!(a.connect(ip), Err(("Connection rate limit", 3)));
        assert!(a.event(ip, Event::Message).is_ok());
        assert_eq!(a.event(ip, Event::Message), Err(2));
        assert!(a.event(ip, Event::Recipient).is_ok());
    }
}
