//! `dkim_signing_table`: which key signs mail from a domain, the one
//! definition of its lookup and of its value.
//!
//! The table is keyed by the sender's domain (the From: header's, as
//! OpenDKIM's SigningTable), asked for the domain itself, then for each
//! parent as `.parent` (`.example.com` for `mail.example.com`), then for
//! `*`. A table of patterns (`regexp:`, `pcre:`) is asked for the domain
//! only. The value is OpenDKIM's KeyTable form, `DOMAIN:SELECTOR:KEYFILE`
//! (`%` in DOMAIN: the sender's domain), so an OpenDKIM user copies the
//! lines over.
//!
//! The key files are private (0600, root): cleanup reads every key file
//! the table names while it is still root ([`key_files`]), as smtpd reads
//! its TLS keys, and signs with what it read. The cryptography is
//! cleanup's (`cleanup/src/dkim.rs`); `postern check` reports unreadable
//! key files the same way.

use crate::maps::{LookupError, Table, Tables};
use std::path::PathBuf;

/// One KeyTable value: who signs (`d=`), with which selector (`s=`) and
/// which private key file.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct KeyRef {
    pub domain: String,
    pub selector: String,
    pub key_file: PathBuf,
}

impl KeyRef {
    /// Parses `DOMAIN:SELECTOR:KEYFILE`; `%` as DOMAIN stands for
    /// `sender_domain`.
    pub fn parse(value: &str, sender_domain: &str) -> Result<KeyRef, String> {
        let mut it = value.trim().splitn(3, ':');
        let (Some(d), Some(s), Some(f)) = (it.next(), it.next(), it.next()) else {
            return Err(format!(
                "\"{value}\": expected DOMAIN:SELECTOR:KEYFILE (OpenDKIM's KeyTable form)"
            ));
        };
        let (d, s, f) = (d.trim(), s.trim(), f.trim());
        if d.is_empty() || s.is_empty() || f.is_empty() {
            return Err(format!(
                "\"{value}\": expected DOMAIN:SELECTOR:KEYFILE, none of them empty"
            ));
        }
        let domain = if d == "%" {
            sender_domain.to_ascii_lowercase()
        } else {
            d.to_ascii_lowercase()
        };
        Ok(KeyRef {
            domain,
            selector: s.to_string(),
            key_file: PathBuf::from(f),
        })
    }
}

/// The opened `dkim_signing_table`.
#[derive(Debug, Clone, Default)]
pub struct SigningTable {
    tables: Tables,
}

impl SigningTable {
    /// Opens the tables of `dkim_signing_table` (none: nothing is
    /// signed). Tables that cannot be opened are returned as errors for
    /// the log; their lookups fail (the mail is deferred, not sent
    /// unsigned).
    pub fn open(value: &str) -> (SigningTable, Vec<String>) {
        let (tables, bad) = Tables::open_list(value);
        (SigningTable { tables }, bad)
    }

    pub fn is_empty(&self) -> bool {
        self.tables.is_empty()
    }

    /// The key for mail from `domain`: the domain, its parents as
    /// `.parent`, then `*`.
    pub fn lookup(&self, domain: &str) -> Result<Option<KeyRef>, LookupError> {
        let domain = domain.trim_end_matches('.').to_ascii_lowercase();
        if domain.is_empty() {
            return Ok(None);
        }
        for key in lookup_keys(&domain) {
            for t in &self.tables.0 {
                if t.is_pattern() && key != domain {
                    continue;
                }
                if let Some(v) = t.lookup(&key)? {
                    return KeyRef::parse(&v, &domain).map(Some).map_err(|e| {
                        LookupError::new(
                            t.spec().unwrap_or("dkim_signing_table"),
                            format!("bad value for {key}: {e}"),
                        )
                    });
                }
            }
        }
        Ok(None)
    }

    /// Every key file the table names, for reading as root at start
    /// (tables that can be listed: files, `hash:`/`cdb:`, `inline:`,
    /// `static:`; a database table's files are read when first needed,
    /// and must then be readable by `mail_owner`).
    pub fn key_files(&self) -> Vec<PathBuf> {
        let mut out: Vec<PathBuf> = Vec::new();
        for t in &self.tables.0 {
            for v in values(t) {
                if let Ok(k) = KeyRef::parse(&v, "example.invalid") {
                    if !out.contains(&k.key_file) {
                        out.push(k.key_file);
                    }
                }
            }
        }
        out
    }
}

/// The keys asked for `domain`, in order: `a.b.c`, `.b.c`, `.c`, `*`.
pub fn lookup_keys(domain: &str) -> Vec<String> {
    let mut keys = vec![domain.to_string()];
    let mut rest = domain;
    while let Some((_, parent)) = rest.split_once('.') {
        keys.push(format!(".{parent}"));
        rest = parent;
    }
    keys.push("*".to_string());
    keys
}

/// The values of a table that can be listed.
fn values(t: &Table) -> Vec<String> {
    match t {
        Table::Entries { map, .. } => map.values().cloned().collect(),
        Table::Static(v) => vec![v.clone()],
        Table::Indexed { db, .. } => db
            .entries()
            .filter_map(|e| e.ok())
            .map(|(_, v)| String::from_utf8_lossy(&v).into_owned())
            .collect(),
        Table::Regexp { .. } | Table::Cidr(_) | Table::Dict { .. } => Vec::new(),
    }
}

/// Reads a private key file as it must be: a regular file not readable
/// or writable by others (OpenDKIM's RequireSafeKeys, which refuses a key
/// any other user could read). Returns its bytes (PEM).
pub fn read_key_file(path: &std::path::Path) -> Result<Vec<u8>, String> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(path).map_err(|e| format!("{}: {e}", path.display()))?;
    if !meta.is_file() {
        return Err(format!("{}: not a regular file", path.display()));
    }
    if meta.mode() & 0o007 != 0 {
        return Err(format!(
            "{}: the private key is accessible to other users (mode {:o}); chmod 600 it",
            path.display(),
            meta.mode() & 0o7777
        ));
    }
    std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_and_values() {
        assert_eq!(
            lookup_keys("mail.example.com"),
            vec!["mail.example.com", ".example.com", ".com", "*"]
        );
        let k = KeyRef::parse("%:sel:/etc/k.pem", "Example.COM").unwrap();
        assert_eq!(k.domain, "example.com");
        assert_eq!(k.selector, "sel");
        assert!(KeyRef::parse("example.com:sel", "x").is_err());
    }

    #[test]
    fn parent_and_star() {
        let (t, bad) = SigningTable::open(
            "inline:{ .example.com=example.com:sub:/k1, *=other.test:s:/k2, a.test=a.test:a:/k3 }",
        );
        assert!(bad.is_empty(), "{bad:?}");
        assert_eq!(t.lookup("a.test").unwrap().unwrap().selector, "a");
        assert_eq!(t.lookup("x.example.com").unwrap().unwrap().selector, "sub");
        assert_eq!(t.lookup("example.com").unwrap().unwrap().selector, "s");
        assert_eq!(t.key_files().len(), 3);
    }
}
