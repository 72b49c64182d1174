//! `unionmap:{type:name, type:name, ...}` (Postfix's unionmap): every
//! table is asked; the results found are joined with commas, in the
//! order of the tables. Not found when no table knows the key; an error
//! of any table is the lookup's error.

use super::{Dict, LookupError};
use crate::maps::Table;

/// An open `unionmap:` table.
#[derive(Debug)]
pub struct Unionmap {
    tables: Vec<Table>,
}

impl Unionmap {
    /// `{type:name, ...}` (the part after `unionmap:`); each table is
    /// opened, and one that cannot be is an error of the whole.
    pub fn open(spec: &str, braced: &str) -> Result<Unionmap, String> {
        Ok(Unionmap {
            tables: open_members(spec, braced)?,
        })
    }
}

impl Dict for Unionmap {
    fn lookup(&self, key: &str) -> Result<Option<String>, LookupError> {
        let mut out: Option<String> = None;
        for t in &self.tables {
            if let Some(v) = t.lookup_expanded(key)? {
                match &mut out {
                    Some(o) => {
                        o.push(',');
                        o.push_str(&v);
                    }
                    None => out = Some(v),
                }
            }
        }
        Ok(out)
    }

    fn is_pattern(&self) -> bool {
        self.tables.iter().any(Table::is_pattern)
    }
}

/// The tables of `{type:name, ...}`, opened; shared with `pipemap:`.
pub fn open_members(spec: &str, braced: &str) -> Result<Vec<Table>, String> {
    let inner = braced
        .trim()
        .strip_prefix('{')
        .and_then(|s| s.strip_suffix('}'))
        .ok_or_else(|| format!("table {spec}: expected {{type:name, ...}}"))?;
    let members = crate::maps::split_specs(inner);
    if members.is_empty() {
        return Err(format!("table {spec}: no tables between the braces"));
    }
    members
        .iter()
        .map(|m| Table::open(m).map_err(|e| format!("table {spec}: {e}")))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn results_are_joined() {
        let t = Table::open("unionmap:{inline:{a=1, b=2}, inline:{a=3}, static:s}").unwrap();
        assert_eq!(t.lookup("a").unwrap().as_deref(), Some("1,3,s"));
        assert_eq!(t.lookup("b").unwrap().as_deref(), Some("2,s"));
        let t = Table::open("unionmap:{inline:{a=1}}").unwrap();
        assert_eq!(t.lookup("z").unwrap(), None);
        assert!(Table::open("unionmap:{nosuch:x}").is_err());
        assert!(Table::open("unionmap:inline:{a=1}").is_err());
        assert!(Table::open("unionmap:{}").is_err());
    }
}
