//! Lookup tables, named as Postfix names them: `type:name`.
//!
//! - `hash:/path`, `btree:/path` (file `/path.db`), `cdb:/path`
//!   (`/path.cdb`), `lmdb:/path` (`/path.lmdb`): an indexed file compiled
//!   from `/path` by `postmap` (or `postalias`, `newaliases`). All four are
//!   CDB files ([`crate::cdb`]), the format of Postfix's `cdb:` tables,
//!   looked up by key without reading the file into memory. A Berkeley DB
//!   or LMDB file left by Postfix is refused with the command that
//!   rebuilds it ([`foreign_format`]).
//! - `texthash:/path`: the source file read directly (postmap format).
//! - `static:value`: every key finds `value`.
//! - `inline:{ key=value, ... }`: the table written in place.
//! - tables answered by a server or a program ([`crate::dict`]).
//!
//! A lookup can fail (a file that cannot be read, a server that does not
//! answer): [`Table::lookup`] says so ([`LookupError`]) and the caller
//! defers, as Postfix does; it never takes the failure for "not found".
//! A table that cannot be opened is kept as one whose every lookup fails
//! ([`Table::open_or_unavailable`], Postfix's surrogate table).
//!
//! Keys are matched case-insensitively (stored lower-case), as Postfix does
//! for its indexed tables.

pub use crate::dict::LookupError;
use crate::warning;
use std::borrow::Cow;
use std::collections::HashMap;
use std::io::{self, BufRead, Read};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// Header of the `hash:` files of Postern before CDB, still read so an
/// existing aliases.db keeps working until the next `newaliases`.
const HASH_MAGIC: &[u8] = b"postern-hash-1\n";

/// One opened table.
#[derive(Debug, Clone)]
pub enum Table {
    Entries {
        spec: String,
        map: HashMap<String, String>,
    },
    Static(String),
    /// `regexp:/path`: ordered patterns (see [`crate::regexp`]); the
    /// first matching rule's result with `$N` filled in. (`pcre:` is a
    /// [`Table::Dict`], [`crate::dict::pcre`].)
    Regexp {
        spec: String,
        rules: Vec<crate::regexp::Rule>,
    },
    /// `cidr:/path`: lines `network/bits result`, first match wins; the
    /// key is an IP address (see [`parse_cidr_table`]).
    Cidr(Vec<(crate::cidr::Cidr, String)>),
    /// `hash:`, `btree:`, `cdb:`, `lmdb:`: a CDB file, read by key.
    Indexed {
        spec: String,
        db: Arc<IndexedTable>,
    },
    /// A table answered by a server or a program (`socketmap:`, `tcp:`,
    /// `mysql:`, ...), or one that could not be opened
    /// ([`crate::dict::unavailable::Unavailable`]).
    Dict {
        spec: String,
        dict: Arc<dyn crate::dict::Dict>,
    },
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

    /// Opens `type:name`; a table that cannot be opened is kept as one
    /// whose every lookup fails, so that the mail needing it is deferred
    /// (Postfix's surrogate table). The second value is the open error,
    /// for the log.
    pub fn open_or_unavailable(spec: &str) -> (Table, Option<String>) {
        match Table::open(spec) {
            Ok(t) => (t, None),
            Err(e) => (Table::unavailable(spec, &e), Some(e)),
        }
    }

    /// The table that stands for `spec` when it could not be opened.
    pub fn unavailable(spec: &str, reason: &str) -> Table {
        Table::Dict {
            spec: spec.into(),
            dict: Arc::new(crate::dict::unavailable::Unavailable::new(spec, reason)),
        }
    }

    /// Why this table could not be opened, when it stands for one that
    /// could not be.
    pub fn unavailable_reason(&self) -> Option<&str> {
        match self {
            Table::Dict { dict, .. } => dict.unavailable(),
            _ => None,
        }
    }

    /// A table of patterns (`regexp:`, `pcre:`, `cidr:`): asked only for
    /// whole keys, not for the partial forms of an address.
    pub fn is_pattern(&self) -> bool {
        match self {
            Table::Regexp { .. } | Table::Cidr(_) => true,
            Table::Dict { dict, .. } => dict.is_pattern(),
            Table::Entries { .. } | Table::Static(_) | Table::Indexed { .. } => false,
        }
    }

    /// `type:name` as configured (None for `static:` and `cidr:`, which
    /// cannot fail).
    pub fn spec(&self) -> Option<&str> {
        match self {
            Table::Entries { spec, .. }
            | Table::Regexp { spec, .. }
            | Table::Indexed { spec, .. }
            | Table::Dict { spec, .. } => Some(spec),
            Table::Static(_) | Table::Cidr(_) => None,
        }
    }

    fn read(spec: &str) -> Result<Table, String> {
        let (kind, name) = spec
            .split_once(':')
            .ok_or_else(|| format!("table {spec}: expected type:name"))?;
        match kind {
            "hash" | "btree" | "lmdb" | "cdb" => open_indexed(spec, kind, name),
            "texthash" => {
                let text =
                    std::fs::read_to_string(name).map_err(|e| format!("open {name}: {e}"))?;
                // As Postfix: a malformed line is skipped with a warning.
                let map = source_entries(&text, false, |line, e| {
                    warning!("{name}, line {line}: {e}");
                    Ok::<(), String>(())
                })?
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
            "pcre" => Ok(Table::Dict {
                spec: spec.into(),
                dict: Arc::new(crate::dict::pcre::Pcre::open(name)?),
            }),
            "regexp" => {
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
                // Items are separated by commas; as Postfix's dict_inline,
                // `{ key = text, with commas }` keeps one whole.
                let name = name.trim();
                let inner = name
                    .strip_prefix('{')
                    .and_then(|n| n.strip_suffix('}'))
                    .unwrap_or(name);
                let mut items = vec![String::new()];
                let mut depth = 0i32;
                for c in inner.chars() {
                    match c {
                        '{' => depth += 1,
                        '}' => depth -= 1,
                        ',' if depth == 0 => {
                            items.push(String::new());
                            continue;
                        }
                        _ => {}
                    }
                    items.last_mut().expect("never empty").push(c);
                }
                let map = items
                    .iter()
                    .map(|item| {
                        let item = item.trim();
                        item.strip_prefix('{')
                            .and_then(|i| i.strip_suffix('}'))
                            .unwrap_or(item)
                            .to_string()
                    })
                    .filter_map(|kv| {
                        kv.split_once('=')
                            .map(|(k, v)| (k.trim().to_lowercase(), v.trim().to_string()))
                    })
                    .collect();
                Ok(Table::Entries {
                    spec: spec.into(),
                    map,
                })
            }
            "ldap" => Ok(Table::Dict {
                spec: spec.into(),
                dict: Arc::new(crate::dict::ldap::LdapDict::open(name)?),
            }),
            "mysql" => Ok(Table::Dict {
                spec: spec.into(),
                dict: Arc::new(crate::dict::mysql::MysqlDict::open(name)?),
            }),
            "pgsql" => Ok(Table::Dict {
                spec: spec.into(),
                dict: Arc::new(crate::dict::pgsql::PgsqlDict::open(name)?),
            }),
            "proxy" if crate::dict::proxy::through_proxymap() => Ok(Table::Dict {
                spec: spec.into(),
                dict: Arc::new(crate::dict::proxy::ProxyDict::open(name)?),
            }),
            // A command: the table itself (dict::proxy::through_proxymap).
            "proxy" => Table::read(name),
            "sqlite" => Ok(Table::Dict {
                spec: spec.into(),
                dict: Arc::new(crate::dict::sqlite::SqliteDict::open(name)?),
            }),
            "socketmap" => Ok(Table::Dict {
                spec: spec.into(),
                dict: Arc::new(crate::dict::socketmap::Socketmap::open(spec, name)?),
            }),
            "tcp" => Ok(Table::Dict {
                spec: spec.into(),
                dict: Arc::new(crate::dict::tcp::Tcp::open(spec, name)?),
            }),
            "unionmap" => Ok(Table::Dict {
                spec: spec.into(),
                dict: Arc::new(crate::dict::unionmap::Unionmap::open(spec, name)?),
            }),
            "pipemap" => Ok(Table::Dict {
                spec: spec.into(),
                dict: Arc::new(crate::dict::pipemap::Pipemap::open(spec, name)?),
            }),
            "randmap" | "weighted" => Ok(Table::Dict {
                spec: spec.into(),
                dict: Arc::new(crate::dict::randmap::PoolDict(
                    crate::dict::randmap::Pool::parse(spec)?,
                )),
            }),
            "unix" => Ok(Table::Dict {
                spec: spec.into(),
                dict: Arc::new(crate::dict::unix::Unix::open(name)?),
            }),
            // Postfix's NIS tables on a host without a NIS domain: every
            // key is not found (`alias_maps = hash:/etc/aliases,
            // nis:mail.aliases`, Postfix's default where NIS is built in).
            "nis" => {
                warning!("dict_nis_init: NIS domain name not set - NIS lookups disabled");
                Ok(Table::Dict {
                    spec: spec.into(),
                    dict: Arc::new(crate::dict::unavailable::NoNis),
                })
            }
            other => Err(format!(
                "table {spec}: unsupported dictionary type: {other}"
            )),
        }
    }

    /// The value of `key`: borrowed from a table held in memory, owned
    /// when read from an indexed table's file or a server. A key whose
    /// domain is internationalized is tried in its other IDNA form too
    /// (A-label or U-label), so a table may list the name either way.
    /// Err: the table could not answer (logged here, with the table and
    /// the cause, as Postfix's maps_find); the caller must defer.
    pub fn lookup(&self, key: &str) -> Result<Option<Cow<'_, str>>, LookupError> {
        let found = self.lookup_as_given(key).and_then(|v| match v {
            Some(v) => Ok(Some(v)),
            None => {
                if key.is_ascii() && !key.contains("xn--") && !key.contains("XN--") {
                    return Ok(None);
                }
                match crate::smtputf8::other_idna_form(key) {
                    Some(other) => self.lookup_as_given(&other),
                    None => Ok(None),
                }
            }
        });
        if let Err(e) = &found {
            warning!("{}: {}", e.table, e.reason);
            warning!("{} lookup error for \"{key}\"", e.table);
        }
        found
    }

    fn lookup_as_given(&self, key: &str) -> Result<Option<Cow<'_, str>>, LookupError> {
        Ok(match self {
            Table::Static(v) => Some(Cow::Borrowed(v)),
            // `$N` filled in, as every caller wants.
            Table::Regexp { rules, .. } => crate::regexp::lookup(rules, key).map(Cow::Owned),
            Table::Entries { map, .. } => map
                .get(&key.to_lowercase())
                .map(|s| Cow::Borrowed(s.as_str())),
            Table::Indexed { spec, db } => db
                .lookup(key)
                .map_err(|e| LookupError::new(spec.clone(), e))?
                .map(Cow::Owned),
            // Keys of fixed-key tables are folded (Postfix's
            // DICT_FLAG_FOLD_FIX); patterns see the key as it is.
            Table::Dict { dict, .. } if dict.is_pattern() => dict.lookup(key)?.map(Cow::Owned),
            Table::Dict { dict, .. } => dict.lookup(&key.to_lowercase())?.map(Cow::Owned),
            Table::Cidr(rules) => {
                let Ok(ip) = key.trim_matches(['[', ']']).parse::<std::net::IpAddr>() else {
                    return Ok(None);
                };
                rules
                    .iter()
                    .find(|(net, _)| net.contains(ip))
                    .map(|(_, v)| Cow::Borrowed(v.as_str()))
            }
        })
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
    pub fn lookup_expanded(&self, key: &str) -> Result<Option<String>, LookupError> {
        match self {
            Table::Regexp { rules, .. } => Ok(crate::regexp::lookup(rules, key)),
            other => Ok(other.lookup(key)?.map(Cow::into_owned)),
        }
    }
}

/// Several tables searched in order (`alias_maps = hash:a, hash:b`).
#[derive(Debug, Clone, Default)]
pub struct Tables(pub Vec<Table>);

impl Tables {
    /// Opens every `type:name` in a list value. A table that cannot be
    /// opened (an unknown type, a missing or unreadable file) stays in
    /// the list as one whose lookups fail
    /// ([`Table::open_or_unavailable`]); its error is returned in the
    /// second list, for the log.
    pub fn open_list(value: &str) -> (Tables, Vec<String>) {
        let mut tables = Vec::new();
        let mut bad = Vec::new();
        for spec in split_specs(value) {
            let (t, e) = Table::open_or_unavailable(&spec);
            tables.push(t);
            bad.extend(e);
        }
        (Tables(tables), bad)
    }

    /// The first table's answer, in order; Err at the first table that
    /// cannot answer (as Postfix's maps_find: a later table is not asked).
    pub fn lookup(&self, key: &str) -> Result<Option<Cow<'_, str>>, LookupError> {
        for t in &self.0 {
            if let Some(v) = t.lookup(key)? {
                return Ok(Some(v));
            }
        }
        Ok(None)
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// Splits a list of table specs on commas and white space, keeping
/// `{ ... }` groups whole.
pub fn split_specs(value: &str) -> Vec<String> {
    postern_conf::split_braced(value, true)
}

/// The compiled file of a `hash:` table (`SOURCE.db`).
pub fn db_path(source: &Path) -> PathBuf {
    let mut s = source.as_os_str().to_owned();
    s.push(".db");
    PathBuf::from(s)
}

/// The file an indexed table `kind:name` lives in, named as Postfix names
/// it: `name.db` for `hash:` and `btree:`, `name.cdb`, `name.lmdb`; None
/// for a type that is not an indexed file.
pub fn indexed_file(kind: &str, name: &str) -> Option<PathBuf> {
    let ext = match kind {
        "hash" | "btree" => ".db",
        "cdb" => ".cdb",
        "lmdb" => ".lmdb",
        _ => return None,
    };
    let mut s = std::ffi::OsString::from(name);
    s.push(ext);
    Some(PathBuf::from(s))
}

/// The file whose change means a table must be opened again: the indexed
/// file, or the source of a table read from its text.
pub fn table_file(spec: &str) -> Option<PathBuf> {
    let (kind, name) = spec.split_once(':')?;
    match kind {
        "texthash" | "regexp" | "pcre" | "cidr" => Some(PathBuf::from(name)),
        // The .cf file of a database table.
        "mysql" | "pgsql" | "sqlite" | "ldap" => Some(PathBuf::from(name)),
        _ => indexed_file(kind, name),
    }
}

/// What `postern check` finds wrong with the table `spec`: it cannot be
/// opened (an unknown type, a missing or unreadable file, a file in a
/// foreign format), or its indexed file is older than its source. The
/// message names the file and, for an indexed table, the command that
/// fixes it (`builder` is `postmap`, or `postalias` for aliases).
pub fn check_spec(spec: &str, builder: &str) -> Result<(), String> {
    let (kind, name) = spec
        .split_once(':')
        .ok_or_else(|| format!("table {spec}: expected type:name"))?;
    let indexed = indexed_file(kind, name);
    if let Err(e) = Table::read(spec) {
        return Err(match &indexed {
            Some(_) if !e.contains("postmap") => format!("{e}; run: {builder} {kind}:{name}"),
            _ => e,
        });
    }
    if let Some(db) = indexed {
        let mtime = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
        if let (Some(source), Some(index)) = (mtime(Path::new(name)), mtime(&db)) {
            if source > index {
                return Err(format!(
                    "database {} is older than source file {name}; run: {builder} {kind}:{name}",
                    db.display()
                ));
            }
        }
    }
    Ok(())
}

/// What a file is when it is the Berkeley DB or LMDB file of Postfix's
/// `hash:`/`btree:`/`lmdb:` tables (from its first bytes), so the error
/// can say so.
pub fn foreign_format(head: &[u8]) -> Option<&'static str> {
    let word = |at: usize| -> Option<[u8; 4]> { head.get(at..at + 4)?.try_into().ok() };
    // Berkeley DB keeps its magic number at offset 12 of the meta page,
    // in the byte order of the machine that wrote it.
    if let Some(w) = word(12) {
        for magic in [u32::from_le_bytes(w), u32::from_be_bytes(w)] {
            match magic {
                0x0006_1561 => return Some("Berkeley DB hash"),
                0x0005_3162 => return Some("Berkeley DB btree"),
                0x0004_2253 => return Some("Berkeley DB queue"),
                _ => {}
            }
        }
    }
    // LMDB: the meta page's magic follows its 16-byte page header.
    match word(16).map(u32::from_le_bytes) {
        Some(0xBEEF_C0DE) => Some("LMDB"),
        _ => None,
    }
}

/// Opens the CDB file of `kind:name`.
fn open_indexed(spec: &str, kind: &str, name: &str) -> Result<Table, String> {
    let path = indexed_file(kind, name).ok_or_else(|| format!("{kind}: not an indexed type"))?;
    match open_cdb(&path, kind, name, 0)? {
        Opened::Cdb(file) => Ok(Table::Indexed {
            spec: spec.into(),
            db: Arc::new(IndexedTable {
                path,
                kind: kind.into(),
                name: name.into(),
                file: Mutex::new(Arc::new(file)),
                checked: Mutex::new((std::time::Instant::now(), None)),
            }),
        }),
        Opened::Legacy(map) => Ok(Table::Entries {
            spec: spec.into(),
            map,
        }),
    }
}

enum Opened {
    Cdb(CdbFile),
    /// A `postern-hash-1` table, read whole.
    Legacy(HashMap<String, String>),
}

fn open_cdb(path: &Path, kind: &str, name: &str, generation: u64) -> Result<Opened, String> {
    use std::os::unix::fs::MetadataExt;
    let fail = |e: &dyn std::fmt::Display| format!("open database {}: {e}", path.display());
    let file = std::fs::File::open(path).map_err(|e| fail(&e))?;
    let meta = file.metadata().map_err(|e| fail(&e))?;
    let mut head = Vec::with_capacity(crate::cdb::HEADER_LEN as usize);
    (&file)
        .take(crate::cdb::HEADER_LEN)
        .read_to_end(&mut head)
        .map_err(|e| fail(&e))?;
    if head.starts_with(HASH_MAGIC) {
        let mut data = head;
        (&file).read_to_end(&mut data).map_err(|e| fail(&e))?;
        return Ok(Opened::Legacy(read_hash_db(&data).map_err(|e| fail(&e))?));
    }
    match crate::cdb::Reader::from_header(file, &head, meta.len()) {
        Ok(reader) => Ok(Opened::Cdb(CdbFile {
            reader: Arc::new(reader),
            id: (meta.dev(), meta.ino()),
            generation,
            nul: std::sync::atomic::AtomicU8::new(NUL_UNKNOWN),
        })),
        Err(e) => Err(fail(&match foreign_format(&head) {
            Some(what) => format!(
                "a {what} file, made by Postfix's postmap; Postern reads CDB \
                 files: rebuild the table with Postern's postmap {kind}:{name}"
            ),
            None => format!("{e}; rebuild it with postmap {kind}:{name}"),
        })),
    }
}

const NUL_UNKNOWN: u8 = 0;
const NUL_WITHOUT: u8 = 1;
const NUL_WITH: u8 = 2;

/// How often a table's path is compared with the file open.
const RECHECK: std::time::Duration = std::time::Duration::from_secs(1);

/// One CDB file of an indexed table.
struct CdbFile {
    reader: Arc<crate::cdb::Reader>,
    /// (device, inode): a new `postmap` renames a new file into place.
    id: (u64, u64),
    /// Counts the files opened for this table.
    generation: u64,
    /// Whether keys carry a terminating null byte (postmap -N), learnt
    /// from the first key found, as Postfix does.
    nul: std::sync::atomic::AtomicU8,
}

/// An open indexed table: a CDB file looked up by key, two `pread`s a
/// lookup; nothing of the file is held in memory. When `postmap` replaces
/// the file, the table opens the new one (checked at most once a second),
/// as Postfix's daemons restart when a table changes; one that cannot be
/// opened (a process without the rights it had at start) leaves the old
/// one in use, with a warning.
pub struct IndexedTable {
    path: PathBuf,
    kind: String,
    name: String,
    file: Mutex<Arc<CdbFile>>,
    /// When the path was last checked, and a replacement that could not
    /// be opened (warned about once).
    checked: Mutex<(std::time::Instant, Option<(u64, u64)>)>,
}

impl std::fmt::Debug for IndexedTable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "IndexedTable({})", self.path.display())
    }
}

fn relock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl IndexedTable {
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The file in use, after opening a new one if `postmap` replaced it.
    fn current(&self) -> Arc<CdbFile> {
        use std::os::unix::fs::MetadataExt;
        let cur = relock(&self.file).clone();
        {
            let mut checked = relock(&self.checked);
            if checked.0.elapsed() < RECHECK {
                return cur;
            }
            checked.0 = std::time::Instant::now();
            let id = match std::fs::metadata(&self.path) {
                Ok(m) => (m.dev(), m.ino()),
                Err(_) => return cur,
            };
            if id == cur.id || checked.1 == Some(id) {
                return cur;
            }
            match open_cdb(&self.path, &self.kind, &self.name, cur.generation + 1) {
                Ok(Opened::Cdb(new)) => {
                    checked.1 = None;
                    let new = Arc::new(new);
                    *relock(&self.file) = new.clone();
                    return new;
                }
                Ok(Opened::Legacy(_)) => {}
                Err(e) => warning!("{e}; the table as it was is still used"),
            }
            checked.1 = Some(id);
        }
        cur
    }

    /// The reader of the file in use.
    pub fn reader(&self) -> Arc<crate::cdb::Reader> {
        self.current().reader.clone()
    }

    /// The value of `key` as given (no case folding), tried without and
    /// with a terminating null byte as Postfix does; the value without
    /// its null byte.
    pub fn get(&self, key: &[u8]) -> io::Result<Option<Vec<u8>>> {
        IndexedTable::get_in(&self.current(), key)
    }

    fn get_in(file: &CdbFile, key: &[u8]) -> io::Result<Option<Vec<u8>>> {
        use std::sync::atomic::Ordering::Relaxed;
        let mode = file.nul.load(Relaxed);
        if mode != NUL_WITH {
            if let Some(v) = file.reader.get(key)? {
                file.nul.store(NUL_WITHOUT, Relaxed);
                return Ok(Some(strip_nul(v)));
            }
        }
        if mode != NUL_WITHOUT {
            let mut k = Vec::with_capacity(key.len() + 1);
            k.extend_from_slice(key);
            k.push(0);
            if let Some(v) = file.reader.get(&k)? {
                file.nul.store(NUL_WITH, Relaxed);
                return Ok(Some(strip_nul(v)));
            }
        }
        Ok(None)
    }

    /// Every entry in file order, without terminating null bytes.
    pub fn entries(&self) -> impl Iterator<Item = io::Result<(Vec<u8>, Vec<u8>)>> {
        crate::cdb::Records::new(self.reader())
            .map(|r| r.map(|(k, v)| (strip_nul(k), strip_nul(v))))
    }

    /// The value of `key`, folded to lower case. Err: the file could not
    /// be read (the caller defers).
    pub fn lookup(&self, key: &str) -> Result<Option<String>, String> {
        let key = key.to_lowercase();
        match IndexedTable::get_in(&self.current(), key.as_bytes()) {
            Ok(v) => Ok(v.map(|v| String::from_utf8_lossy(&v).into_owned())),
            Err(e) => Err(format!("read {}: {e}", self.path.display())),
        }
    }
}

fn strip_nul(mut v: Vec<u8>) -> Vec<u8> {
    if v.last() == Some(&0) {
        v.pop();
    }
    v
}

/// A table source read as Postfix's postmap reads one: logical lines (a
/// line that starts with white space continues the one before, appended
/// as it is), blank lines and lines whose first non-blank character is
/// `#` skipped. Bytes, not text: a source may hold any encoding.
pub struct SourceReader<R> {
    input: R,
    lineno: usize,
    pending: Option<(usize, Vec<u8>)>,
}

impl<R: BufRead> SourceReader<R> {
    pub fn new(input: R) -> SourceReader<R> {
        SourceReader {
            input,
            lineno: 0,
            pending: None,
        }
    }

    /// The next logical line, trimmed, with the number of its first line.
    pub fn next_line(&mut self) -> io::Result<Option<(usize, Vec<u8>)>> {
        let mut line = Vec::new();
        loop {
            line.clear();
            if self.input.read_until(b'\n', &mut line)? == 0 {
                return Ok(self.pending.take().map(|(n, l)| (n, trim(&l).to_vec())));
            }
            self.lineno += 1;
            let body = trim(&line);
            if body.is_empty() || body[0] == b'#' {
                continue;
            }
            if line[0] == b' ' || line[0] == b'\t' {
                if let Some((_, p)) = self.pending.as_mut() {
                    p.extend_from_slice(trim_end(&line));
                    continue;
                }
            }
            let this = (self.lineno, body.to_vec());
            if let Some(done) = self.pending.replace(this) {
                return Ok(Some(done));
            }
        }
    }
}

fn trim_end(b: &[u8]) -> &[u8] {
    let end = b
        .iter()
        .rposition(|c| !c.is_ascii_whitespace())
        .map_or(0, |i| i + 1);
    &b[..end]
}

fn trim(b: &[u8]) -> &[u8] {
    let b = trim_end(b);
    let start = b
        .iter()
        .position(|c| !c.is_ascii_whitespace())
        .unwrap_or(b.len());
    &b[start..]
}

/// Splits a logical line into key and value: postmap's `key whitespace
/// value` (a key may be a "quoted string", kept as written) or, for
/// `aliases`, postalias's `name: value` (the name may be quoted; the
/// quotes go). Err: the warning Postfix gives for the line.
pub fn split_entry(line: &[u8], aliases: bool) -> Result<(Vec<u8>, Vec<u8>), &'static str> {
    if aliases {
        if let Some(rest) = line.strip_prefix(b"\"") {
            let end = rest
                .iter()
                .position(|&c| c == b'"')
                .ok_or("need name:value pair")?;
            let after = trim(&rest[end + 1..]);
            let value = after.strip_prefix(b":").ok_or("need name:value pair")?;
            return Ok((rest[..end].to_vec(), address_list(value)));
        }
        let colon = line
            .iter()
            .position(|&c| c == b':')
            .ok_or("need name:value pair")?;
        let key = trim(&line[..colon]);
        if key.is_empty() {
            return Err("need name:value pair");
        }
        return Ok((key.to_vec(), address_list(&line[colon + 1..])));
    }
    // The key ends at the first white space outside double quotes.
    let mut quoted = false;
    let mut i = 0;
    while i < line.len() {
        match line[i] {
            b'\\' if quoted => i += 1,
            b'"' => quoted = !quoted,
            c if !quoted && c.is_ascii_whitespace() => break,
            _ => {}
        }
        i += 1;
    }
    let i = i.min(line.len());
    let value = trim(&line[i..]);
    if value.is_empty() {
        return Err("expected format: key whitespace value");
    }
    Ok((line[..i].to_vec(), value.to_vec()))
}

/// An alias value as postalias stores it: its comma-separated items
/// trimmed and joined by ", " (commas inside quotes, comments or angle
/// brackets are not separators).
fn address_list(value: &[u8]) -> Vec<u8> {
    let mut items: Vec<&[u8]> = Vec::new();
    let (mut quoted, mut depth, mut start, mut i) = (false, 0i32, 0, 0);
    while i < value.len() {
        match value[i] {
            b'\\' => i += 1,
            b'"' => quoted = !quoted,
            b'(' | b'<' if !quoted => depth += 1,
            b')' | b'>' if !quoted => depth -= 1,
            b',' if !quoted && depth <= 0 => {
                items.push(&value[start..i]);
                start = i + 1;
            }
            _ => {}
        }
        i += 1;
    }
    items.push(&value[start.min(value.len())..]);
    let items: Vec<&[u8]> = items
        .into_iter()
        .map(trim)
        .filter(|t| !t.is_empty())
        .collect();
    items.join(&b", "[..])
}

/// A key folded to lower case, as indexed tables store and look keys up.
pub fn fold_key(key: &[u8]) -> Vec<u8> {
    match std::str::from_utf8(key) {
        Ok(s) => s.to_lowercase().into_bytes(),
        Err(_) => key.to_ascii_lowercase(),
    }
}

/// Parses a table source (for `texthash:` and tests). `aliases` selects
/// the aliases(5) form (`name: value`) over postmap's (`key whitespace
/// value`); the lines are read as [`SourceReader`] reads them. Keys are
/// lower-cased. A later duplicate key replaces an earlier one.
pub fn parse_source(text: &str, aliases: bool) -> Result<Vec<(String, String)>, (usize, String)> {
    source_entries(text, aliases, |line, e| Err((line, e)))
}

/// The entries of a source; `bad` decides what a malformed line does
/// (Err stops the parse with that error).
fn source_entries<E>(
    text: &str,
    aliases: bool,
    mut bad: impl FnMut(usize, String) -> Result<(), E>,
) -> Result<Vec<(String, String)>, E> {
    let mut src = SourceReader::new(text.as_bytes());
    let mut map: Vec<(String, String)> = Vec::new();
    let mut index: HashMap<String, usize> = HashMap::new();
    // Reading a &[u8] cannot fail.
    while let Ok(Some((lineno, line))) = src.next_line() {
        let (k, v) = match split_entry(&line, aliases) {
            Ok(kv) => kv,
            Err(e) => {
                bad(
                    lineno,
                    format!("{e}: \"{}\"", String::from_utf8_lossy(&line)),
                )?;
                continue;
            }
        };
        let k = String::from_utf8_lossy(&fold_key(&k)).into_owned();
        let v = String::from_utf8_lossy(&v).into_owned();
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

/// Writes the `hash:` table of `source` (`SOURCE.db`, a CDB file) from
/// entries, atomically: a daemon never reads half a table.
pub fn write_hash_db(source: &Path, entries: &[(String, String)]) -> io::Result<PathBuf> {
    let db = db_path(source);
    let mut w = crate::cdb::Writer::create(&db, 0o644)?;
    for (k, v) in entries {
        w.add(k.as_bytes(), v.as_bytes())?;
    }
    w.commit(crate::cdb::Duplicates::KeepLast)?;
    Ok(db)
}

/// Reads a `postern-hash-1` file, Postern's format before CDB.
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
        assert_eq!(t.lookup("POSTMASTER").unwrap().as_deref(), Some("root"));
        assert_eq!(
            t.lookup("webmaster").unwrap().as_deref(),
            Some("alice, bob")
        );
        assert_eq!(t.lookup("x y").unwrap().as_deref(), Some("z"));
        assert_eq!(t.lookup("nobody").unwrap().as_deref(), None);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_rebuilt_table_is_reopened() {
        let dir = std::env::temp_dir().join(format!("pmaps-re-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let src = dir.join("access");
        write_hash_db(&src, &[("a".into(), "old".into())]).unwrap();
        let t = Table::open(&format!("hash:{}", src.display())).unwrap();
        let before = t.lookup("A").unwrap().unwrap();
        assert_eq!(before, "old");
        write_hash_db(
            &src,
            &[("a".into(), "new".into()), ("b".into(), "2".into())],
        )
        .unwrap();
        std::thread::sleep(RECHECK + std::time::Duration::from_millis(100));
        assert_eq!(t.lookup("a").unwrap().as_deref(), Some("new"));
        assert_eq!(t.lookup("b").unwrap().as_deref(), Some("2"));
        assert_eq!(before, "old"); // still valid
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn specs_and_static() {
        assert_eq!(
            split_specs("hash:/a, texthash:/b inline:{a=b, c=d}"),
            vec!["hash:/a", "texthash:/b", "inline:{a=b, c=d}"]
        );
        let t = Table::open("inline:{a=b, c=d}").unwrap();
        let braced = Table::open("inline:{ { k = v, with comma }, x=y z }").unwrap();
        assert_eq!(
            braced.lookup("k").unwrap().as_deref(),
            Some("v, with comma")
        );
        assert_eq!(braced.lookup("x").unwrap().as_deref(), Some("y z"));
        assert_eq!(t.lookup("C").unwrap().as_deref(), Some("d"));
        assert_eq!(
            Table::open("static:x")
                .unwrap()
                .lookup("q")
                .unwrap()
                .as_deref(),
            Some("x")
        );
    }
}
