//! The peak values anvil logs every `anvil_status_update_time` and when
//! it exits, in Postfix's words:
//!
//! ```text
//! statistics: max connection rate 3/60s for (smtp:192.0.2.1) at Nov 22 17:00:01
//! statistics: max connection count 2 for (smtp:192.0.2.1) at Nov 22 17:00:01
//! statistics: max cache size 4 at Nov 22 17:00:01
//! ```

use postern_common::anvil::Event;
use postern_common::info;

#[derive(Debug, Default, Clone)]
struct Peak {
    value: u32,
    ident: String,
    when: u64,
}

impl Peak {
    fn update(&mut self, value: u32, ident: &str) {
        if value > self.value {
            self.value = value;
            if self.ident != ident {
                self.ident = ident.to_string();
            }
            self.when = postern_common::time::now_secs();
        }
    }
}

#[derive(Debug, Default)]
pub struct Stats {
    count: Peak,
    rates: [Peak; 4],
    cache: Peak,
}

use postern_common::time::ctime15;

impl Stats {
    pub fn count(&mut self, value: u32, ident: &str) {
        self.count.update(value, ident);
    }

    pub fn rate(&mut self, event: Event, value: u32, ident: &str) {
        let i = Event::ALL.iter().position(|e| *e == event).unwrap_or(0);
        self.rates[i].update(value, ident);
    }

    pub fn cache(&mut self, size: usize) {
        self.cache.update(size.min(u32::MAX as usize) as u32, "");
    }

    /// The lines to log, and a fresh start.
    pub fn take(&mut self, unit_secs: u64) -> Vec<String> {
        let mut lines = Vec::new();
        let rate = |p: &Peak, name: &str| {
            format!(
                "statistics: max {name} rate {}/{unit_secs}s for ({}) at {}",
                p.value,
                p.ident,
                ctime15(p.when)
            )
        };
        let conn = &self.rates[0];
        if conn.value > 0 {
            lines.push(rate(conn, "connection"));
        }
        if self.count.value > 0 {
            lines.push(format!(
                "statistics: max connection count {} for ({}) at {}",
                self.count.value,
                self.count.ident,
                ctime15(self.count.when)
            ));
        }
        for (i, e) in Event::ALL.iter().enumerate().skip(1) {
            if self.rates[i].value > 0 {
                lines.push(rate(&self.rates[i], e.name()));
            }
        }
        if self.cache.value > 0 {
            lines.push(format!(
                "statistics: max cache size {} at {}",
                self.cache.value,
                ctime15(self.cache.when)
            ));
        }
        *self = Stats::default();
        lines
    }

    /// Logs what [`Stats::take`] gives.
    pub fn log(&mut self, unit_secs: u64) {
        for l in self.take(unit_secs) {
            info!("{l}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peaks() {
        let mut s = Stats::default();
        assert!(s.take(60).is_empty());
        s.rate(Event::Connection, 2, "smtp:192.0.2.1");
        s.rate(Event::Connection, 1, "smtp:192.0.2.2");
        s.count(2, "smtp:192.0.2.1");
        s.rate(Event::Auth, 5, "smtp:192.0.2.3");
        s.cache(3);
        let lines = s.take(60);
        assert_eq!(lines.len(), 4);
        assert!(
            lines[0].starts_with("statistics: max connection rate 2/60s for (smtp:192.0.2.1) at ")
        );
        assert!(lines[1].starts_with("statistics: max connection count 2 for (smtp:192.0.2.1) at "));
        assert!(lines[2].starts_with("statistics: max auth rate 5/60s for (smtp:192.0.2.3) at "));
        assert!(lines[3].starts_with("statistics: max cache size 3 at "));
        assert!(s.take(60).is_empty());
        assert_eq!(ctime15(0).len(), 15);
    }
}
