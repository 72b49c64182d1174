//! Tables answered by a server or a program rather than a file: the
//! interface every such table type implements (`mysql:`, `pgsql:`,
//! `sqlite:`, `ldap:`, `socketmap:`, `tcp:`, `pipemap:`, `unionmap:`,
//! `randmap:`, `weighted:`,
//! `proxy:`), as Postfix's `dict_*` modules share one interface.
//!
//! The one rule that matters for mail: a table that cannot answer is a
//! *temporary* failure ([`LookupError`]), never "not found". A caller that
//! gets an error defers (SMTP 451 4.3.0 at RCPT, a deferred delivery in
//! cleanup, qmgr and the delivery agents) so that an unreachable database
//! never turns into a bounce or "Relay access denied".

use std::fmt;

pub mod db_config;
pub mod dynlib;
pub mod ldap;
pub mod mysql;
pub mod pgsql;
pub mod proxy;
pub mod sqlite;

/// Why a table could not answer: the server is down, a query failed or
/// timed out, a file could not be read. `table` is the table's
/// `type:name` for the log; `reason` says what went wrong. Neither is
/// shown to an SMTP client (Postfix's generic "Temporary lookup failure"
/// is).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LookupError {
    pub table: String,
    pub reason: String,
}

impl LookupError {
    pub fn new(table: impl Into<String>, reason: impl Into<String>) -> LookupError {
        LookupError {
            table: table.into(),
            reason: reason.into(),
        }
    }
}

impl fmt::Display for LookupError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} lookup error: {}", self.table, self.reason)
    }
}

impl std::error::Error for LookupError {}

/// A table whose lookups can fail. Implementations keep their connection
/// (or child process) between lookups and re-open it after a failure.
pub trait Dict: Send + Sync + fmt::Debug {
    /// `Ok(Some(value))`: found; `Ok(None)`: not found; `Err`: could not
    /// look, the caller must defer.
    fn lookup(&self, key: &str) -> Result<Option<String>, LookupError>;

    /// Why the table could not be opened, for a stand-in whose every
    /// lookup fails ([`unavailable::Unavailable`]); None for a real table.
    fn unavailable(&self) -> Option<&str> {
        None
    }

    /// A table of patterns (`pcre:`), asked only for whole addresses, not
    /// for the partial keys (`user`, `@domain`, parent domains) that
    /// fixed-key tables are asked for (Postfix's DICT_FLAG_PATTERN).
    fn is_pattern(&self) -> bool {
        false
    }
}

pub mod pcre;
pub mod pipemap;
pub mod randmap;
pub mod socketmap;
pub mod tcp;
pub mod unavailable;
pub mod unionmap;
pub mod unix;
