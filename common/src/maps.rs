//! Lookup tables, named as Postfix names them: `type:name`.
//!
//! - `hash:/path`: Postern's own indexed file `/path.db`, compiled from
//!   `/path` by `postmap` (or by `newaliases` for aliases). It is not
//!   Berkeley DB; its format is [`write_hash_db`]'s.
//! - `texthash:/path`: the source file read directly (postmap format).
//! - `static:value`: every key finds `value`.
//! - `inline:{ key=value, ... }`: the table written in place.
//!
//! Keys are matched case-insensitively (stored lower-case), as Postfix does
//! for its indexed tables.

use std::collections::HashMap;
use std::io;
use std::path::{Path, PathBuf};

/// Header of a compiled `hash:` file.
const HASH_MAGIC: &[u8] = b"postern-hash-1\n";

/// One opened table.
#[derive(Debug, Clone)]
pub enum Table {
    Entries {
        spec: String,
        map: HashMap<String, String>,
    },
    Static(String),
    /// `regexp:/path` or `pcre:/path`: ordered patterns (see
    /// [`crate::regexp`]). [`Table::lookup`] gives the first matching
    /// rule's result as written; [`Table::lookup_expanded`] fills in `$N`.
    Regexp {
        spec: String,
        rules: Vec<crate::regexp::Rule>,
    },
    /// `cidr:/path`: lines `network/bits result`, first match wins; the
    /// key is an IP address (see [`parse_cidr_table`]).
    Cidr(Vec<(crate::cidr::Cidr, String)>),
}

/// The file a table reads, for the types that read one: the compiled
/// file of an indexed table, the source of the others.
pub fn table_file(spec: &str) -> Option<PathBuf> {
    let (kind, name) = spec.split_once(':')?;
    match kind {
        "hash" | "btree" | "lmdb" | "cdb" => Some(db_path(Path::new(name))),
        "texthash" | "cidr" | "regexp" | "pcre" => Some(PathBuf::from(name)),
        _ => None,
    }
}

impl Table {
    /// Opens `type:name`. The file it reads is watched for changes
    /// ([`crate::table_watch`]): a daemon that read it as root restarts
    /// when it changes.
    pub fn open(spec: &str) -> Result<Table, String> {
        if let Some(file) = table_file(spec) {
            crate::table_watch::watch(&file);
        }
        Table::read(spec)
    }

    fn read(spec: &str) -> Result<Table, String> {
        let (kind, name) = spec
            .split_once(':')
            .ok_or_else(|| format!("table {spec}: expected type:name"))?;
        match kind {
            "hash" | "btree" | "lmdb" | "cdb" => {
                let db = db_path(Path::new(name));
                let data = std::fs::read(&db)
                    .map_err(|e| format!("open database {}: {e}", db.display()))?;
                let map =
                    read_hash_db(&data).map_err(|e| format!("database {}: {e}", db.display()))?;
                Ok(Table::Entries {
                    spec: spec.into(),
                    map,
                })
            }
            "texthash" => {
                let text =
                    std::fs::read_to_string(name).map_err(|e| format!("open {name}: {e}"))?;
                let map = parse_source(&text, false)
                    .map_err(|(line, e)| format!("{name}, line {line}: {e}"))?
                    .into_iter()
                    .collect();
                Ok(Table::Entries {
                    spec: spec.into(),
                    map,
                })
            }
            "cidr" => {
                let text =
                    std::fs::read_to_string(name).map_err(|e| format!("open {name}: {e}"))?;
                parse_cidr_table(&text)
                    .map(Table::Cidr)
                    .map_err(|(line, e)| format!("{name}, line {line}: {e}"))
            }
            "regexp" | "pcre" => {
                let text =
                    std::fs::read_to_string(name).map_err(|e| format!("open {name}: {e}"))?;
                let rules = crate::regexp::parse(&text).map_err(|e| format!("{name}, {e}"))?;
                Ok(Table::Regexp {
                    spec: spec.into(),
                    rules,
                })
            }
            "static" => Ok(Table::Static(
                name.trim_start_matches('{')
                    .trim_end_matches('}')
                    .trim()
                    .into(),
            )),
            "inline" => {
                let inner = name.trim().trim_start_matches('{').trim_end_matches('}');
                let map = inner
                    .split(',')
                    .filter_map(|kv| kv.split_once('='))
                    .map(|(k, v)| (k.trim().to_lowercase(), v.trim().to_string()))
                    .collect();
                Ok(Table::Entries {
                    spec: spec.into(),
                    map,
                })
            }
            other => Err(format!(
                "table {spec}: unsupported dictionary type: {other}"
            )),
        }
    }

    pub fn lookup(&self, key: &str) -> Option<&str> {
        match self {
            Table::Static(v) => Some(v),
            Table::Regexp { rules, .. } => rules
                .iter()
                .find(|r| r.re.is_match(key) != r.negate)
                .map(|r| r.result.as_str()),
            Table::Entries { map, .. } => map.get(&key.to_lowercase()).map(|s| s.as_str()),
            Table::Cidr(rules) => {
                let ip: std::net::IpAddr = key.trim_matches(['[', ']']).parse().ok()?;
                rules
                    .iter()
                    .find(|(net, _)| net.contains(ip))
                    .map(|(_, v)| v.as_str())
            }
        }
    }
}

/// The rules of a `cidr:` table: `network/bits result` per line (a bare
/// address for one host), `#` comments; Err((line number, why)).
pub fn parse_cidr_table(text: &str) -> Result<Vec<(crate::cidr::Cidr, String)>, (usize, String)> {
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let t = line.trim();
        if t.is_empty() || t.starts_with('#') {
            continue;
        }
        let (net, result) = t
            .split_once(char::is_whitespace)
            .ok_or((i + 1, format!("no result after {t}")))?;
        let net = crate::cidr::Cidr::parse(net).map_err(|e| (i + 1, e))?;
        out.push((net, result.trim().to_string()));
    }
    Ok(out)
}

impl Table {
    /// Like [`Table::lookup`], with `$N` in a `regexp:`/`pcre:` result
    /// replaced by the match's groups.
    pub fn lookup_expanded(&self, key: &str) -> Option<String> {
        match self {
            Table::Regexp { rules, .. } => crate::regexp::lookup(rules, key),
            other => other.lookup(key).map(str::to_string),
        }
    }
}

/// Several tables searched in order (`alias_maps = hash:a, hash:b`).
#[derive(Debug, Clone, Default)]
pub struct Tables(pub Vec<Table>);

impl Tables {
    /// Opens every `type:name` in a list value. Names Postern does not
    /// serve (such as `nis:mail.aliases` or `proxy:unix:passwd.byname`)
    /// are returned in the second list so the caller can decide.
    pub fn open_list(value: &str) -> (Tables, Vec<String>) {
        let mut ok = Vec::new();
        let mut bad = Vec::new();
        for spec in split_specs(value) {
            match Table::open(&spec) {
                Ok(t) => ok.push(t),
                Err(e) => bad.push(e),
            }
        }
        (Tables(ok), bad)
    }

    pub fn lookup(&self, key: &str) -> Option<&str> {
        self.0.iter().find_map(|t| t.lookup(key))
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// A list parameter of domains whose items may also be tables, as
/// `virtual_mailbox_domains = example.com, hash:/etc/postern/vdomains`:
/// a domain is in the list when it is one of the names (case-insensitive)
/// or a key of one of the tables.
#[derive(Debug, Clone, Default)]
pub struct DomainList {
    names: Vec<String>,
    tables: Tables,
}

impl DomainList {
    /// From the items of a list parameter. Tables that cannot be opened
    /// are reported in the second value.
    pub fn new(items: &[String]) -> (DomainList, Vec<String>) {
        let mut names = Vec::new();
        let mut specs = Vec::new();
        for i in items {
            match i.split_once(':') {
                Some((kind, _))
                    if !kind.is_empty() && kind.bytes().all(|b| b.is_ascii_alphanumeric()) =>
                {
                    specs.push(i.clone())
                }
                _ => names.push(i.trim_end_matches('.').to_ascii_lowercase()),
            }
        }
        let (tables, errors) = Tables::open_list(&specs.join(" "));
        (DomainList { names, tables }, errors)
    }

    pub fn contains(&self, domain: &str) -> bool {
        let d = domain.trim_end_matches('.').to_ascii_lowercase();
        !d.is_empty() && (self.names.contains(&d) || self.tables.lookup(&d).is_some())
    }

    pub fn is_empty(&self) -> bool {
        self.names.is_empty() && self.tables.is_empty()
    }
}

/// Splits a list of table specs on commas and white space, keeping
/// `{ ... }` groups whole.
pub fn split_specs(value: &str) -> Vec<String> {
    postern_conf::split_braced(value, true)
}

/// The compiled file of a `hash:` table.
pub fn db_path(source: &Path) -> PathBuf {
    let mut s = source.as_os_str().to_owned();
    s.push(".db");
    PathBuf::from(s)
}

/// Parses a table source. `aliases` selects the aliases(5) form
/// (`name: value`) over postmap's (`key whitespace value`). Lines starting
/// with white space continue the previous entry; `#` lines are comments.
/// Keys are lower-cased. A later duplicate key replaces an earlier one.
pub fn parse_source(text: &str, aliases: bool) -> Result<Vec<(String, String)>, (usize, String)> {
    let mut entries: Vec<(String, String, usize)> = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let lineno = i + 1;
        let t = line.trim();
        if t.is_empty() || t.starts_with('#') {
            continue;
        }
        if line.starts_with([' ', '\t']) {
            match entries.last_mut() {
                Some(e) => {
                    e.1.push(' ');
                    e.1.push_str(t);
                    continue;
                }
                None => return Err((lineno, "continuation line without an entry".into())),
            }
        }
        let (k, v) = if aliases {
            match split_alias_key(t) {
                Some(kv) => kv,
                None => return Err((lineno, format!("missing colon in \"{t}\""))),
            }
        } else {
            match t.split_once(char::is_whitespace) {
                Some((k, v)) => (k, v.trim()),
                None => {
                    return Err((
                        lineno,
                        format!("expected \"key whitespace value\": \"{t}\""),
                    ))
                }
            }
        };
        entries.push((k.to_lowercase(), v.to_string(), lineno));
    }
    let mut map: Vec<(String, String)> = Vec::new();
    let mut index: HashMap<String, usize> = HashMap::new();
    for (k, v, _) in entries {
        match index.get(&k) {
            Some(&i) => map[i].1 = v,
            None => {
                index.insert(k.clone(), map.len());
                map.push((k, v));
            }
        }
    }
    Ok(map)
}

/// `name: value`, where name may be quoted ("a b": ...).
fn split_alias_key(t: &str) -> Option<(&str, &str)> {
    if let Some(rest) = t.strip_prefix('"') {
        let end = rest.find('"')?;
        let after = rest[end + 1..].trim_start().strip_prefix(':')?;
        return Some((&rest[..end], after.trim()));
    }
    let (k, v) = t.split_once(':')?;
    Some((k.trim(), v.trim()))
}

/// Writes a compiled table atomically: `DB.tmp` then rename, so a daemon
/// never reads half a table.
pub fn write_hash_db(source: &Path, entries: &[(String, String)]) -> io::Result<PathBuf> {
    let db = db_path(source);
    let tmp = db.with_extension(format!("db.tmp.{}", std::process::id()));
    let mut out = Vec::with_capacity(
        64 + entries
            .iter()
            .map(|(k, v)| k.len() + v.len() + 8)
            .sum::<usize>(),
    );
    out.extend_from_slice(HASH_MAGIC);
    out.extend_from_slice(&(entries.len() as u32).to_le_bytes());
    for (k, v) in entries {
        out.extend_from_slice(&(k.len() as u32).to_le_bytes());
        out.extend_from_slice(k.as_bytes());
        out.extend_from_slice(&(v.len() as u32).to_le_bytes());
        out.extend_from_slice(v.as_bytes());
    }
    std::fs::write(&tmp, &out)?;
    std::fs::File::open(&tmp)?.sync_all()?;
    std::fs::rename(&tmp, &db)?;
    Ok(db)
}

fn read_hash_db(data: &[u8]) -> Result<HashMap<String, String>, String> {
    let rest = data
        .strip_prefix(HASH_MAGIC)
        .ok_or("not a postern hash file (run postmap)")?;
    let mut p = 0usize;
    let mut take = |n: usize| -> Result<&[u8], String> {
        let s = rest.get(p..p + n).ok_or("file cut short")?;
        p += n;
        Ok(s)
    };
    let u32_at = |b: &[u8]| u32::from_le_bytes(b.try_into().unwrap()) as usize;
    let count = u32_at(take(4)?);
    let mut map = HashMap::with_capacity(count.min(1 << 20));
    for _ in 0..count {
        let kl = u32_at(take(4)?);
        let k = String::from_utf8_lossy(take(kl)?).into_owned();
        let vl = u32_at(take(4)?);
        let v = String::from_utf8_lossy(take(vl)?).into_owned();
        map.insert(k, v);
    }
    Ok(map)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aliases_round_trip() {
        let dir = std::env::temp_dir().join(format!("pmaps-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let src = dir.join("aliases");
        let text = "# c\npostmaster: root\nWebmaster: alice,\n  bob\n\"x y\": z\n";
        let e = parse_source(text, true).unwrap();
        write_hash_db(&src, &e).unwrap();
        let t = Table::open(&format!("hash:{}", src.display())).unwrap();
        assert_eq!(t.lookup("POSTMASTER"), Some("root"));
        assert_eq!(t.lookup("webmaster"), Some("alice, bob"));
        assert_eq!(t.lookup("x y"), Some("z"));
        assert_eq!(t.lookup("nobody"), None);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn specs_and_static() {
        assert_eq!(
            split_specs("hash:/a, texthash:/b inline:{a=b, c=d}"),
            vec!["hash:/a", "texthash:/b", "inline:{a=b, c=d}"]
        );
        let t = Table::open("inline:{a=b, c=d}").unwrap();
        assert_eq!(t.lookup("C"), Some("d"));
        assert_eq!(Table::open("static:x").unwrap().lookup("q"), Some("x"));
    }
}
