//! Postfix's match lists, the one implementation: the parameters whose
//! value is a list of patterns that a domain, a client name or a client
//! address is matched against (`mydestination`, `relay_domains`,
//! `virtual_alias_domains`, `virtual_mailbox_domains`, `mynetworks`,
//! `permit_mx_backup_networks`, `smtpd_client_event_limit_exceptions`,
//! `debug_peer_list`, ...).
//!
//! A list is items separated by commas and/or white space, tried in
//! order; the first that matches decides:
//! - `name`: the name itself (case-insensitive; an internationalized name
//!   matches in its U-label and A-label forms alike). In a domain list
//!   (`relay_domains`, a client name) `.name` matches its subdomains, and
//!   with the parameter listed in `parent_domain_matches_subdomains` so
//!   does `name`;
//! - `net/bits`, `[addr]`, `addr`: network blocks (address lists);
//! - `type:table`: a key of the table (any type [`crate::maps`] opens;
//!   for a domain, also its parents as `.parent` or `parent`, except in
//!   `regexp:`, `pcre:` and `cidr:` tables); for an address, the address;
//! - `/file/name`: the items of the file (several per line, `#` comments);
//! - `!item`: an item that matches ends the search with "no match".
//!
//! Lists are read once, when the daemon starts; a table or file that
//! cannot be read is an error the caller reports with the parameter name.
//! A table that cannot answer a lookup makes the match an error
//! ([`LookupError`]): the caller defers, as Postfix does, and never takes
//! it for "not in the list".

use crate::cidr::Cidr;
use crate::maps::{LookupError, Table};
use postern_conf::Config;
use std::net::IpAddr;

/// What a list holds and what it is matched against (Postfix's
/// string_list, domain_list, addr_match_list and namadr_list).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Names compared whole (`mydestination`, `virtual_*_domains`).
    String,
    /// Host or domain names: `.parent` and parent matching (`relay_domains`).
    Domain,
    /// Client addresses (`mynetworks`).
    Address,
    /// A client's name or address (`permit_mx_backup_networks`,
    /// `smtpd_client_event_limit_exceptions`, `debug_peer_list`).
    NameAddress,
}

#[derive(Debug, Clone)]
enum Pattern {
    /// Lower-cased, in A-label form.
    Name(String),
    Net(Cidr),
    Table {
        table: Table,
        /// Keys are fixed strings (not patterns): parents are looked up.
        fixed: bool,
    },
}

#[derive(Debug, Clone)]
struct Entry {
    negate: bool,
    pattern: Pattern,
}

/// One parsed list.
#[derive(Debug, Clone)]
pub struct MatchList {
    kind: Kind,
    /// The parameter is in `parent_domain_matches_subdomains`.
    parent: bool,
    entries: Vec<Entry>,
    /// The `type:name` of each table, for `postern check`.
    specs: Vec<String>,
}

impl Default for MatchList {
    fn default() -> Self {
        MatchList {
            kind: Kind::String,
            parent: false,
            entries: Vec::new(),
            specs: Vec::new(),
        }
    }
}

/// Whether a list item names a table: `type:name` with a type of letters
/// and digits (so that `::1` and `[::1]/128` are addresses).
pub fn is_table(item: &str) -> bool {
    matches!(item.split_once(':'), Some((kind, _)) if !kind.is_empty() && kind.bytes().all(|b| b.is_ascii_alphanumeric()))
}

/// Whether parameter `name` is listed in `parent_domain_matches_subdomains`.
pub fn parent_style(cfg: &Config, name: &str) -> bool {
    cfg.get_list("parent_domain_matches_subdomains")
        .iter()
        .any(|p| p.eq_ignore_ascii_case(name))
}

fn name_form(s: &str) -> String {
    crate::smtputf8::ascii_domain(&s.trim_end_matches('.').to_lowercase())
}

impl MatchList {
    /// The list parameter `name` of `cfg` (expanded), with its parent
    /// style from `parent_domain_matches_subdomains`.
    pub fn from_config(cfg: &Config, name: &str, kind: Kind) -> Result<MatchList, String> {
        Self::parse(&cfg.get(name), kind, parent_style(cfg, name))
            .map_err(|e| format!("{name}: {e}"))
    }

    /// A list from its value.
    pub fn parse(value: &str, kind: Kind, parent: bool) -> Result<MatchList, String> {
        let mut list = MatchList {
            kind,
            parent,
            entries: Vec::new(),
            specs: Vec::new(),
        };
        list.add_items(value, 0)?;
        Ok(list)
    }

    fn add_items(&mut self, value: &str, depth: usize) -> Result<(), String> {
        for item in postern_conf::split_braced(value, true) {
            let mut negate = false;
            let mut item = item.as_str();
            while let Some(rest) = item.strip_prefix('!') {
                negate = !negate;
                item = rest.trim_start();
            }
            if item.is_empty() {
                continue;
            }
            if item.starts_with('/') {
                if negate {
                    return Err(format!("{item}: a file cannot be negated"));
                }
                if depth > 10 {
                    return Err(format!("{item}: files include each other too deeply"));
                }
                let text =
                    std::fs::read_to_string(item).map_err(|e| format!("open {item}: {e}"))?;
                crate::table_watch::watch(std::path::Path::new(item));
                for line in text.lines() {
                    let t = line.trim();
                    if t.is_empty() || t.starts_with('#') {
                        continue;
                    }
                    self.add_items(t, depth + 1)?;
                }
                continue;
            }
            let pattern = if is_table(item) {
                // A table that cannot be opened stays, failing every
                // lookup: the mail that needs the list is deferred (and
                // `postern check` names the table and its fix).
                let (table, error) = Table::open_or_unavailable(item);
                if let Some(e) = error {
                    crate::warning!("{e}");
                }
                let kind = item.split_once(':').map(|(k, _)| k).unwrap_or("");
                self.specs.push(item.to_string());
                Pattern::Table {
                    table,
                    fixed: !matches!(kind, "regexp" | "pcre" | "cidr"),
                }
            } else {
                match self.kind {
                    Kind::String | Kind::Domain => Pattern::Name(name_form(item)),
                    Kind::Address => Pattern::Net(Cidr::parse(item)?),
                    Kind::NameAddress => match Cidr::parse(item) {
                        Ok(net) => Pattern::Net(net),
                        Err(e) if looks_like_address(item) => return Err(e),
                        Err(_) => Pattern::Name(name_form(item)),
                    },
                }
            };
            self.entries.push(Entry { negate, pattern });
        }
        Ok(())
    }

    /// No items.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The tables the list consults (`type:name`).
    pub fn tables(&self) -> &[String] {
        &self.specs
    }

    /// Whether a domain or name is in a [`Kind::String`] or
    /// [`Kind::Domain`] list (a trailing dot ignored).
    pub fn matches_name(&self, name: &str) -> Result<bool, LookupError> {
        let bare = name.trim_end_matches('.');
        if bare.is_empty() {
            return Ok(false);
        }
        let folded = bare.to_lowercase();
        let ascii = crate::smtputf8::ascii_domain(&folded);
        self.decide(|p| self.name_matches(p, &folded, &ascii))
    }

    /// Whether a client address is in a [`Kind::Address`] list (or a
    /// [`Kind::NameAddress`] list, by address alone).
    pub fn matches_addr(&self, ip: IpAddr) -> Result<bool, LookupError> {
        let ip = crate::cidr::normalize(ip);
        self.decide(|p| Self::addr_matches(p, ip))
    }

    /// Whether a client, by its name (`unknown` without one) or address,
    /// is in a [`Kind::NameAddress`] list.
    pub fn matches_client(&self, name: &str, ip: IpAddr) -> Result<bool, LookupError> {
        let ip = crate::cidr::normalize(ip);
        let folded = name.trim_end_matches('.').to_lowercase();
        let ascii = crate::smtputf8::ascii_domain(&folded);
        let named = !folded.is_empty() && folded != "unknown";
        self.decide(|p| {
            Ok((named && self.name_matches(p, &folded, &ascii)?) || Self::addr_matches(p, ip)?)
        })
    }

    /// The first entry that matches decides; none: no match.
    fn decide(
        &self,
        mut hit: impl FnMut(&Pattern) -> Result<bool, LookupError>,
    ) -> Result<bool, LookupError> {
        for e in &self.entries {
            if hit(&e.pattern)? {
                return Ok(!e.negate);
            }
        }
        Ok(false)
    }

    fn name_matches(&self, p: &Pattern, folded: &str, ascii: &str) -> Result<bool, LookupError> {
        let domain_rules = self.kind != Kind::String;
        match p {
            Pattern::Name(pat) => {
                if pat == ascii {
                    return Ok(true);
                }
                if !domain_rules {
                    return Ok(false);
                }
                Ok(if self.parent {
                    // `example.com` matches `a.example.com`.
                    ascii.len() > pat.len()
                        && ascii.ends_with(pat.as_str())
                        && ascii.as_bytes()[ascii.len() - pat.len() - 1] == b'.'
                } else {
                    pat.starts_with('.') && ascii.len() > pat.len() && ascii.ends_with(pat.as_str())
                })
            }
            Pattern::Table { table, fixed } => {
                if table.lookup(folded)?.is_some()
                    || (ascii != folded && table.lookup(ascii)?.is_some())
                {
                    return Ok(true);
                }
                if !domain_rules || !fixed {
                    return Ok(false);
                }
                let mut rest = ascii;
                while let Some(dot) = rest[1..].find('.').map(|i| i + 1) {
                    let key = if self.parent {
                        &rest[dot + 1..]
                    } else {
                        &rest[dot..]
                    };
                    if key.is_empty() || key == "." {
                        break;
                    }
                    if table.lookup(key)?.is_some() {
                        return Ok(true);
                    }
                    rest = &rest[dot..];
                }
                Ok(false)
            }
            Pattern::Net(_) => Ok(false),
        }
    }

    fn addr_matches(p: &Pattern, ip: IpAddr) -> Result<bool, LookupError> {
        match p {
            Pattern::Net(net) => Ok(net.contains(ip)),
            Pattern::Table { table, .. } => Ok(table.lookup(&ip.to_string())?.is_some()),
            Pattern::Name(_) => Ok(false),
        }
    }
}

/// An item meant as an address or network (a typo in it is an error, not
/// a host name).
fn looks_like_address(item: &str) -> bool {
    item.starts_with('[')
        || item.contains('/')
        || item.bytes().all(|b| b.is_ascii_digit() || b == b'.')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn names_negation_and_parents() {
        let l = MatchList::parse(
            "!bad.example.com, example.com .sub.test",
            Kind::Domain,
            false,
        )
        .unwrap();
        assert!(l.matches_name("Example.COM.").unwrap());
        assert!(!l.matches_name("bad.example.com").unwrap());
        assert!(!l.matches_name("a.example.com").unwrap());
        assert!(l.matches_name("a.sub.test").unwrap());
        assert!(!l.matches_name("sub.test").unwrap());
        let p = MatchList::parse("example.com", Kind::Domain, true).unwrap();
        assert!(p.matches_name("a.b.example.com").unwrap());
        assert!(!p.matches_name("xexample.com").unwrap());
        let s = MatchList::parse(".sub.test example.com", Kind::String, true).unwrap();
        assert!(!s.matches_name("a.sub.test").unwrap());
        assert!(!s.matches_name("a.example.com").unwrap());
        let idn = MatchList::parse("bücher.test", Kind::String, false).unwrap();
        assert!(idn.matches_name("xn--bcher-kva.test").unwrap());
        assert!(idn.matches_name("BÜCHER.test").unwrap());
        assert!(!idn.matches_name("buecher.test").unwrap());
        let sub = MatchList::parse(".xn--mller-kva.test", Kind::Domain, false).unwrap();
        assert!(sub.matches_name("a.müller.test").unwrap());
    }

    #[test]
    fn files_and_tables() {
        let dir = std::env::temp_dir().join(format!("postern-ml-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("domains");
        std::fs::write(
            &f,
            "# hosted\none.test two.test,three.test\n\n!four.test\nfour.test\n",
        )
        .unwrap();
        let l = MatchList::parse(
            &format!("{} inline:{{ five.test=x, .six.test=y }}", f.display()),
            Kind::Domain,
            false,
        )
        .unwrap();
        for d in [
            "one.test",
            "two.test",
            "three.test",
            "five.test",
            "a.six.test",
        ] {
            assert!(l.matches_name(d).unwrap(), "{d}");
        }
        assert!(!l.matches_name("four.test").unwrap());
        assert!(!l.matches_name("six.test").unwrap());
        assert_eq!(
            l.tables(),
            &["inline:{ five.test=x, .six.test=y }".to_string()]
        );
        let e = MatchList::parse("/nonexistent/file", Kind::String, false).unwrap_err();
        assert!(e.contains("/nonexistent/file"), "{e}");
        // A table that cannot be opened stays, failing every lookup.
        let t = MatchList::parse("hash:/nonexistent/t", Kind::String, false).unwrap();
        assert!(t.matches_name("any.test").is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn addresses_and_clients() {
        let l = MatchList::parse(
            "!127.0.0.2 127.0.0.0/8 [::1]/128 [2001:db8::]/32",
            Kind::Address,
            false,
        )
        .unwrap();
        assert!(l.matches_addr(ip("127.0.0.1")).unwrap());
        assert!(l.matches_addr(ip("::ffff:127.0.0.1")).unwrap());
        assert!(!l.matches_addr(ip("127.0.0.2")).unwrap());
        assert!(l.matches_addr(ip("2001:db8::5")).unwrap());
        assert!(!l.matches_addr(ip("10.0.0.1")).unwrap());
        assert!(MatchList::parse("10.0.0.1/8", Kind::Address, false).is_err());
        let c = MatchList::parse(
            "10.0.0.0/8, .trusted.test, inline:{ 192.0.2.1=ok }",
            Kind::NameAddress,
            false,
        )
        .unwrap();
        assert!(c.matches_client("unknown", ip("10.1.2.3")).unwrap());
        assert!(c
            .matches_client("mx.trusted.test", ip("192.0.2.9"))
            .unwrap());
        assert!(c.matches_client("unknown", ip("192.0.2.1")).unwrap());
        assert!(!c.matches_client("unknown", ip("192.0.2.9")).unwrap());
    }
}
