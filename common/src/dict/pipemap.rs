//! `pipemap:{type:name, type:name, ...}` (Postfix's pipemap): the key is
//! looked up in the first table, its result in the second, and so on;
//! the last table's result is the answer. Not found as soon as a table
//! does not know what it is asked; an error of any table is the lookup's
//! error.

use super::unionmap::open_members;
use super::{Dict, LookupError};
use crate::maps::Table;

/// An open `pipemap:` table.
#[derive(Debug)]
pub struct Pipemap {
    tables: Vec<Table>,
}

impl Pipemap {
    /// `{type:name, ...}` (the part after `pipemap:`).
    pub fn open(spec: &str, braced: &str) -> Result<Pipemap, String> {
        Ok(Pipemap {
            tables: open_members(spec, braced)?,
        })
    }
}

impl Dict for Pipemap {
    fn lookup(&self, key: &str) -> Result<Option<String>, LookupError> {
        let mut query = key.to_string();
        for t in &self.tables {
            match t.lookup_expanded(&query)? {
                Some(v) => query = v,
                None => return Ok(None),
            }
        }
        Ok(Some(query))
    }

    fn is_pattern(&self) -> bool {
        self.tables.iter().any(Table::is_pattern)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn results_feed_the_next_table() {
        let t = Table::open("pipemap:{inline:{a=b, x=y}, inline:{b=final}}").unwrap();
        assert_eq!(t.lookup("a").unwrap().as_deref(), Some("final"));
        assert_eq!(t.lookup("x").unwrap(), None);
        assert_eq!(t.lookup("q").unwrap(), None);
    }
}
