//! A table that could not be opened: an unknown type, a missing or
//! unreadable file, a foreign index format. The daemon keeps it in its
//! place, and every lookup in it fails (temporarily), as Postfix's
//! surrogate table does: mail that needs it is deferred (451 4.3.0 at
//! RCPT, deferred in cleanup, qmgr and the delivery agents) instead of
//! being refused or delivered as if the table did not exist.

use super::{Dict, LookupError};

/// The stand-in for a table that failed to open.
#[derive(Debug)]
pub struct Unavailable {
    /// `type:name` as configured.
    pub spec: String,
    /// Why it could not be opened (the open error).
    pub reason: String,
}

impl Unavailable {
    pub fn new(spec: impl Into<String>, reason: impl Into<String>) -> Unavailable {
        Unavailable {
            spec: spec.into(),
            reason: reason.into(),
        }
    }
}

impl Dict for Unavailable {
    fn lookup(&self, _key: &str) -> Result<Option<String>, LookupError> {
        // Postfix's words: "hash:/etc/postfix/x is unavailable. open
        // database /etc/postfix/x.db: No such file or directory".
        Err(LookupError::new(
            self.spec.clone(),
            format!("table is unavailable. {}", self.reason),
        ))
    }

    fn unavailable(&self) -> Option<&str> {
        Some(&self.reason)
    }

    /// Asked for every key, so that every lookup fails (as Postfix's
    /// surrogate table, which says it is one of patterns).
    fn is_pattern(&self) -> bool {
        true
    }
}

/// `nis:` on a host without NIS, as Postfix finds it when no NIS domain
/// is set: every key is not found (Postfix's `alias_maps` default names
/// `nis:mail.aliases` on systems built with NIS).
#[derive(Debug)]
pub struct NoNis;

impl Dict for NoNis {
    fn lookup(&self, _key: &str) -> Result<Option<String>, LookupError> {
        Ok(None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_lookup_fails() {
        let d = Unavailable::new("hash:/x", "open database /x.db: No such file");
        let e = d.lookup("a").unwrap_err();
        assert_eq!(e.table, "hash:/x");
        assert!(e.reason.contains("/x.db"));
    }
}
