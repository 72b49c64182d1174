//! What every database table type shares (Postfix's cfg_parser and
//! db_common): the `.cf` file that configures a `mysql:`, `pgsql:`,
//! `sqlite:` or `ldap:` table, the `query` and `result_format` templates
//! with their `%s %u %d %[1-9] %S %U %D %%` expansions, the `domain`
//! filter, `expansion_limit`, and the list of servers (`hosts`) tried in
//! turn with a pause for the ones that failed.
//!
//! The `.cf` file is read when the table is opened, which a daemon does
//! as root before it drops its privileges: the file holds the database
//! password and is commonly mode 0640 `root:postfix` or 0600 root.

use std::collections::HashMap;
use std::time::{Duration, Instant};

/// A parsed `.cf` file: `name = value` lines, `#` comments, a line that
/// starts with white space continues the one before (as main.cf).
#[derive(Debug, Clone)]
pub struct CfFile {
    /// The file's path, for messages.
    pub path: String,
    entries: HashMap<String, String>,
}

impl CfFile {
    /// Reads and parses the file at `path`.
    pub fn read(path: &str) -> Result<CfFile, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("open {path}: {e}"))?;
        CfFile::parse(path, &text)
    }

    pub fn parse(path: &str, text: &str) -> Result<CfFile, String> {
        let mut logical: Vec<(usize, String)> = Vec::new();
        for (i, line) in text.lines().enumerate() {
            let trimmed = line.trim();
            if trimmed.is_empty() || trimmed.starts_with('#') {
                continue;
            }
            match logical.last_mut() {
                Some((_, prev)) if line.starts_with([' ', '\t']) => {
                    prev.push(' ');
                    prev.push_str(trimmed);
                }
                _ => logical.push((i + 1, trimmed.to_string())),
            }
        }
        let mut entries = HashMap::new();
        for (line, text) in logical {
            let (name, value) = text
                .split_once('=')
                .ok_or_else(|| format!("{path}, line {line}: expected name = value"))?;
            let name = name.trim();
            if name.is_empty() {
                return Err(format!("{path}, line {line}: missing name before '='"));
            }
            entries.insert(name.to_string(), value.trim().to_string());
        }
        Ok(CfFile {
            path: path.to_string(),
            entries,
        })
    }

    /// The value of `name` as written, if the file sets it.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.entries.get(name).map(String::as_str)
    }

    /// The value of `name`, or `default`.
    pub fn str_or(&self, name: &str, default: &str) -> String {
        self.get(name).unwrap_or(default).to_string()
    }

    /// A value that must not be empty when set (`result_format`, ...).
    pub fn nonempty_or(&self, name: &str, default: &str) -> Result<String, String> {
        match self.get(name) {
            Some("") => Err(format!("{}: {name}: empty value", self.path)),
            Some(v) => Ok(v.to_string()),
            None => Ok(default.to_string()),
        }
    }

    /// A whole number of at least `min`.
    pub fn int_or(&self, name: &str, default: i64, min: i64) -> Result<i64, String> {
        let Some(v) = self.get(name) else {
            return Ok(default);
        };
        match v.parse::<i64>() {
            Ok(n) if n >= min => Ok(n),
            Ok(n) => Err(format!(
                "{}: {name} = {n}: must be at least {min}",
                self.path
            )),
            Err(_) => Err(format!("{}: {name} = {v}: not a number", self.path)),
        }
    }

    /// `yes`/`no` (also `true`/`false`, `1`/`0`, any case).
    pub fn bool_or(&self, name: &str, default: bool) -> Result<bool, String> {
        let Some(v) = self.get(name) else {
            return Ok(default);
        };
        match v.to_ascii_lowercase().as_str() {
            "yes" | "true" | "1" => Ok(true),
            "no" | "false" | "0" => Ok(false),
            _ => Err(format!("{}: {name} = {v}: expected yes or no", self.path)),
        }
    }

    /// The `query`, or the one Postfix builds from the older
    /// `select_field`, `table`, `where_field` and `additional_conditions`.
    pub fn sql_query(&self) -> Result<String, String> {
        if let Some(q) = self.get("query") {
            return Ok(q.to_string());
        }
        let need = |name: &str| {
            self.get(name)
                .filter(|v| !v.is_empty())
                .ok_or_else(|| format!("{}: neither query nor {name} is set", self.path))
        };
        Ok(format!(
            "SELECT {} FROM {} WHERE {}='%s' {}",
            need("select_field")?,
            need("table")?,
            need("where_field")?,
            self.get("additional_conditions").unwrap_or("")
        ))
    }
}

/// The `query` and `result_format` templates of a table, the `domain`
/// filter and `expansion_limit`: how a lookup key becomes a query and the
/// server's answers become the table's value.
#[derive(Debug)]
pub struct Templates {
    /// `type:name`, for messages.
    pub table: String,
    pub query: String,
    pub result_format: String,
    /// What the templates use: they decide which keys are looked up at all
    /// (a query with `%d` is not run for a key without a domain).
    key_user: bool,
    key_domain: bool,
    value_user: bool,
    value_domain: bool,
    /// The highest `%1`..`%9` used: keys whose domain has fewer labels
    /// are not looked up.
    nparts: usize,
    domain: Option<DomainFilter>,
    /// 0: no limit; otherwise more results than this are an error.
    pub expansion_limit: usize,
}

impl Templates {
    /// From the `.cf` settings; `query` is the type's query (SQL, or an
    /// LDAP filter) and `result_format` its result template.
    pub fn new(
        table: &str,
        cf: &CfFile,
        query: String,
        result_format: String,
    ) -> Result<Templates, String> {
        let mut t = Templates {
            table: table.to_string(),
            query,
            result_format,
            key_user: false,
            key_domain: false,
            value_user: false,
            value_domain: false,
            nparts: 0,
            domain: None,
            expansion_limit: cf.int_or("expansion_limit", 0, 0)? as usize,
        };
        let (q, r) = (t.query.clone(), t.result_format.clone());
        t.scan(&q, true)
            .map_err(|e| format!("{}: invalid query template {q}: {e}", cf.path))?;
        t.scan(&r, false)
            .map_err(|e| format!("{}: invalid result template {r}: {e}", cf.path))?;
        if let Some(list) = cf.get("domain").filter(|v| !v.trim().is_empty()) {
            t.domain =
                Some(DomainFilter::new(list).map_err(|e| format!("{}: domain: {e}", cf.path))?);
        }
        Ok(t)
    }

    /// Another template expanded with the lookup key (LDAP's
    /// `search_base`): what it uses decides which keys are looked up too.
    pub fn add_key_template(&mut self, template: &str) -> Result<(), String> {
        self.scan(template, true)
            .map_err(|e| format!("{}: invalid template {template}: {e}", self.table))
    }

    /// Notes what a template uses (db_common_parse).
    fn scan(&mut self, template: &str, is_query: bool) -> Result<(), String> {
        let mut chars = template.chars();
        while let Some(c) = chars.next() {
            if c != '%' {
                continue;
            }
            match chars.next() {
                Some('%') | Some('s') | Some('S') => {}
                Some('u') if is_query => self.key_user = true,
                Some('u') => self.value_user = true,
                Some('d') if is_query => self.key_domain = true,
                Some('d') => self.value_domain = true,
                Some('U') => self.key_user = true,
                Some('D') => self.key_domain = true,
                Some(d @ '1'..='9') => {
                    self.nparts = self.nparts.max(d as usize - '0' as usize);
                    self.key_domain = true;
                }
                Some(other) => return Err(format!("unknown %{other}")),
                None => return Err("% at the end".into()),
            }
        }
        Ok(())
    }

    /// Whether `key` passes the `domain` filter (db_common_check_domain):
    /// with a filter, only addresses in its domains are looked up.
    pub fn domain_allows(&self, key: &str) -> bool {
        let Some(filter) = &self.domain else {
            return true;
        };
        match key.rfind('@') {
            Some(i) if i > 0 => filter.matches(&key[i + 1..]),
            _ => false,
        }
    }

    /// The query for `key`, each inserted piece passed through `quote`
    /// (the server's string escaping); None when the key cannot be looked
    /// up (no domain part where the query needs one, too few labels): not
    /// found, without asking the server.
    pub fn expand_query(
        &self,
        key: &str,
        quote: &mut dyn FnMut(&str, &mut String),
    ) -> Option<String> {
        self.expand_key_template(&self.query, key, quote)
    }

    /// Like [`Templates::expand_query`] for another template of the key
    /// (one given to [`Templates::add_key_template`]).
    pub fn expand_key_template(
        &self,
        template: &str,
        key: &str,
        quote: &mut dyn FnMut(&str, &mut String),
    ) -> Option<String> {
        if key.is_empty() {
            crate::warning!("table \"{}\": empty query string -- ignored", self.table);
            return None;
        }
        let mut out = String::new();
        self.expand(template, key, None, quote, &mut out)
            .then_some(out)
    }

    /// Starts collecting the values the server returned for `key`.
    pub fn results<'a>(&'a self, key: &'a str) -> Results<'a> {
        Results {
            templates: self,
            key,
            value: String::new(),
            count: 0,
        }
    }

    /// db_common_expand: `value` is the key (query) or one result (with
    /// `key` the lookup key); false when this value is skipped.
    fn expand(
        &self,
        template: &str,
        value: &str,
        key: Option<&str>,
        quote: &mut dyn FnMut(&str, &mut String),
        out: &mut String,
    ) -> bool {
        let at = |s: &str| s.rfind('@').map(|i| i + 1);
        let (value_user_wanted, value_domain_wanted) = match key {
            Some(_) => (self.value_user, self.value_domain),
            None => (self.key_user, self.key_domain),
        };
        // The domain part (after the last '@') of the value.
        let vdomain = if value_user_wanted || value_domain_wanted {
            at(value)
        } else {
            None
        };
        let unusable = |d: Option<usize>, s: &str, user: bool, domain: bool| {
            (domain && d.is_none_or(|i| i == s.len())) || (user && d == Some(1))
        };
        if unusable(vdomain, value, value_user_wanted, value_domain_wanted) {
            return false;
        }
        let kdomain = match key {
            Some(k) if self.key_user || self.key_domain => {
                let d = at(k);
                if unusable(d, k, self.key_user, self.key_domain) {
                    crate::warning!("{}: lookup key '{k}' skipped after query", self.table);
                    return false;
                }
                d
            }
            _ => None,
        };
        // The labels %1..%9 count from the right of the key's domain.
        let labels: Vec<&str> = if self.nparts > 0 {
            let domain = match key {
                Some(k) => kdomain.map(|i| &k[i..]),
                None => vdomain.map(|i| &value[i..]),
            }
            .unwrap_or("");
            let labels: Vec<&str> = domain.split('.').collect();
            if labels.len() < self.nparts
                || labels.iter().rev().take(self.nparts).any(|l| l.is_empty())
            {
                return false;
            }
            labels
        } else {
            Vec::new()
        };
        if !out.is_empty() {
            out.push(',');
        }
        let user_of = |s: &'_ str, d: Option<usize>| -> String {
            match d {
                Some(i) => s[..i - 1].to_string(),
                None => s.to_string(),
            }
        };
        let mut chars = template.chars();
        while let Some(c) = chars.next() {
            if c != '%' {
                out.push(c);
                continue;
            }
            match chars.next() {
                Some('%') => out.push('%'),
                Some('s') => quote(value, out),
                Some('u') => quote(&user_of(value, vdomain), out),
                Some('d') => quote(vdomain.map_or("", |i| &value[i..]), out),
                Some('S') => quote(key.unwrap_or(value), out),
                Some('U') => match key {
                    Some(k) => quote(&user_of(k, kdomain), out),
                    None => quote(&user_of(value, vdomain), out),
                },
                Some('D') => match key {
                    Some(k) => quote(kdomain.map_or("", |i| &k[i..]), out),
                    None => quote(vdomain.map_or("", |i| &value[i..]), out),
                },
                Some(d @ '1'..='9') => {
                    let n = d as usize - '0' as usize;
                    quote(labels[labels.len() - n], out)
                }
                // Refused when the table was opened (scan).
                _ => {}
            }
        }
        true
    }
}

/// The values found for one key, joined with commas as Postfix joins
/// several rows (and columns, and LDAP attribute values).
#[derive(Debug)]
pub struct Results<'a> {
    templates: &'a Templates,
    key: &'a str,
    value: String,
    count: usize,
}

impl Results<'_> {
    /// Adds one value from the server (None: SQL NULL, skipped) through
    /// `result_format`; Err when this passes `expansion_limit`.
    pub fn add(&mut self, value: Option<&str>) -> Result<(), String> {
        let Some(value) = value else {
            return Ok(());
        };
        let t = self.templates;
        if value.is_empty() {
            crate::warning!(
                "table \"{}\": empty lookup result for: \"{}\" -- ignored",
                t.table,
                self.key
            );
            return Ok(());
        }
        let mut verbatim = |s: &str, out: &mut String| out.push_str(s);
        if t.expand(
            &t.result_format,
            value,
            Some(self.key),
            &mut verbatim,
            &mut self.value,
        ) {
            self.count += 1;
            if t.expansion_limit > 0 && self.count > t.expansion_limit {
                return Err(format!("expansion limit exceeded for key: '{}'", self.key));
            }
        }
        Ok(())
    }

    /// The table's value: None when nothing was found.
    pub fn finish(self) -> Option<String> {
        (!self.value.is_empty()).then_some(self.value)
    }
}

/// The `domain` setting: the domains whose addresses are looked up (names,
/// `!name` to exclude, or `type:name` tables whose keys are domains).
#[derive(Debug)]
struct DomainFilter {
    /// (negated, name or table), first match decides.
    items: Vec<(bool, DomainItem)>,
}

#[derive(Debug)]
enum DomainItem {
    Name(String),
    Table(crate::maps::Table),
}

impl DomainFilter {
    fn new(list: &str) -> Result<DomainFilter, String> {
        let mut items = Vec::new();
        for item in crate::maps::split_specs(list) {
            let (negated, item) = match item.strip_prefix('!') {
                Some(rest) => (true, rest.to_string()),
                None => (false, item),
            };
            let is_table = item.split_once(':').is_some_and(|(k, _)| {
                !k.is_empty() && k.bytes().all(|b| b.is_ascii_alphanumeric())
            });
            let entry = if is_table {
                DomainItem::Table(crate::maps::Table::open(&item)?)
            } else {
                DomainItem::Name(item.to_ascii_lowercase())
            };
            items.push((negated, entry));
        }
        Ok(DomainFilter { items })
    }

    fn matches(&self, domain: &str) -> bool {
        let domain = domain.to_ascii_lowercase();
        for (negated, item) in &self.items {
            let hit = match item {
                DomainItem::Name(n) => *n == domain,
                DomainItem::Table(t) => matches!(t.lookup(&domain), Ok(Some(_))),
            };
            if hit {
                return !negated;
            }
        }
        false
    }
}

/// One server of the `hosts` list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DbHost {
    /// `unix:/path` (or a name starting with `/`): a Unix socket (for
    /// PostgreSQL, the directory that holds it).
    Unix(String),
    /// `inet:host:port`, `host:port` or `host` (port None: the default).
    Inet { host: String, port: Option<u16> },
    /// A connection URI (`postgresql://...`), given to the client library
    /// as it is.
    Uri(String),
}

impl DbHost {
    /// The `hosts` setting (default `localhost`). A single server is
    /// listed twice, as Postfix lists it, so that a connection the server
    /// closed (a restart) is opened again at once rather than after
    /// `retry_interval`.
    pub fn parse_list(value: Option<&str>, allow_uri: bool) -> Result<Vec<DbHost>, String> {
        let mut hosts = Vec::new();
        for word in value
            .unwrap_or("")
            .split([',', ' ', '\t'])
            .filter(|w| !w.is_empty())
        {
            hosts.push(DbHost::parse(word, allow_uri)?);
        }
        if hosts.is_empty() {
            hosts.push(DbHost::Inet {
                host: "localhost".into(),
                port: None,
            });
        }
        if hosts.len() == 1 {
            hosts.push(hosts[0].clone());
        }
        Ok(hosts)
    }

    fn parse(word: &str, allow_uri: bool) -> Result<DbHost, String> {
        if allow_uri && (word.starts_with("postgresql://") || word.starts_with("postgres://")) {
            return Ok(DbHost::Uri(word.to_string()));
        }
        if let Some(path) = word.strip_prefix("unix:") {
            return Ok(DbHost::Unix(path.to_string()));
        }
        let rest = word.strip_prefix("inet:").unwrap_or(word);
        if rest.starts_with('/') {
            return Ok(DbHost::Unix(rest.to_string()));
        }
        // [v6]:port, host:port, host.
        let (host, port) = if let Some(r) = rest.strip_prefix('[') {
            match r.split_once(']') {
                Some((h, tail)) => (h, tail.strip_prefix(':')),
                None => return Err(format!("hosts: bad address {word}")),
            }
        } else {
            match rest.rsplit_once(':') {
                Some((h, p)) if !h.contains(':') => (h, Some(p)),
                _ => (rest, None),
            }
        };
        let port = match port {
            Some(p) => Some(
                p.parse::<u16>()
                    .map_err(|_| format!("hosts: bad port in {word}"))?,
            ),
            None => None,
        };
        Ok(DbHost::Inet {
            host: host.to_string(),
            port,
        })
    }

    pub fn is_unix(&self) -> bool {
        matches!(self, DbHost::Unix(_))
    }
}

impl std::fmt::Display for DbHost {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DbHost::Unix(p) => write!(f, "unix:{p}"),
            DbHost::Inet {
                host,
                port: Some(p),
            } => write!(f, "inet:{host}:{p}"),
            DbHost::Inet { host, port: None } => write!(f, "inet:{host}"),
            DbHost::Uri(u) => f.write_str(u),
        }
    }
}

/// The servers of a table and a connection to each, kept between
/// lookups. A lookup uses an open connection if there is one (Unix
/// sockets first), else opens one to each server in turn; a server that
/// fails is left alone for `retry_interval`.
#[derive(Debug)]
pub struct HostPool<C> {
    slots: Vec<Slot<C>>,
    retry_interval: Duration,
}

#[derive(Debug)]
struct Slot<C> {
    host: DbHost,
    conn: Option<C>,
    /// When the server failed, not before this instant again.
    failed_until: Option<Instant>,
}

/// At most this many connection attempts for one lookup.
const MAX_ATTEMPTS: usize = 100;

impl<C> HostPool<C> {
    pub fn new(hosts: Vec<DbHost>, retry_interval: Duration) -> HostPool<C> {
        HostPool {
            slots: hosts
                .into_iter()
                .map(|host| Slot {
                    host,
                    conn: None,
                    failed_until: None,
                })
                .collect(),
            retry_interval,
        }
    }

    /// Runs `query` on a connection (opened with `connect` when needed).
    /// A failure closes that connection and moves on to the next server;
    /// Err when every server failed, with their reasons.
    pub fn run<T>(
        &mut self,
        connect: &mut dyn FnMut(&DbHost) -> Result<C, String>,
        query: &mut dyn FnMut(&mut C) -> Result<T, String>,
    ) -> Result<T, String> {
        let mut reasons: Vec<String> = Vec::new();
        // Servers whose kept connection failed in this lookup: a
        // connection the server closed (a restart, its idle timeout) is
        // opened again at once, once.
        let mut stale: Vec<usize> = Vec::new();
        for _ in 0..MAX_ATTEMPTS {
            let now = Instant::now();
            let Some(i) = self.pick(now) else { break };
            let slot = &mut self.slots[i];
            let reused = slot.conn.is_some();
            if !reused {
                match connect(&slot.host) {
                    Ok(c) => slot.conn = Some(c),
                    Err(e) => {
                        reasons.push(format!("{}: {e}", slot.host));
                        slot.failed_until = Some(now + self.retry_interval);
                        continue;
                    }
                }
            }
            let conn = slot.conn.as_mut().expect("connected above");
            match query(conn) {
                Ok(v) => {
                    slot.failed_until = None;
                    return Ok(v);
                }
                Err(e) => {
                    reasons.push(format!("{}: {e}", slot.host));
                    slot.conn = None;
                    if reused && !stale.contains(&i) {
                        stale.push(i);
                    } else {
                        slot.failed_until = Some(now + self.retry_interval);
                    }
                }
            }
        }
        if reasons.is_empty() {
            reasons.push(format!(
                "no server available (all failed within the last {} s)",
                self.retry_interval.as_secs()
            ));
        }
        reasons.dedup();
        Err(reasons.join("; "))
    }

    /// The server to use next: one with an open connection (Unix sockets
    /// first), else one not tried or whose pause is over.
    fn pick(&self, now: Instant) -> Option<usize> {
        let open = |unix: bool| {
            self.slots
                .iter()
                .position(|s| s.conn.is_some() && s.host.is_unix() == unix)
        };
        let usable = |unix: bool| {
            self.slots.iter().position(|s| {
                s.conn.is_none()
                    && s.host.is_unix() == unix
                    && s.failed_until.is_none_or(|t| t <= now)
            })
        };
        open(true)
            .or_else(|| open(false))
            .or_else(|| usable(true))
            .or_else(|| usable(false))
    }

    /// Closes connections (a server's idle timeout is not waited for).
    pub fn close_all(&mut self) {
        for s in &mut self.slots {
            s.conn = None;
        }
    }
}

/// How many connections (to each server) a table opens in this process
/// at most: 1 unless the process serves many clients at once (proxymap
/// sets `proxymap_connection_limit`), before the tables are opened.
static CONNECTION_LIMIT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(1);

/// Sets [`CONNECTION_LIMIT`] for the tables opened after this (at least 1).
pub fn set_connection_limit(n: usize) {
    CONNECTION_LIMIT.store(n.max(1), std::sync::atomic::Ordering::Relaxed);
}

/// A table's [`HostPool`]s: one per lookup in progress, at most
/// [`CONNECTION_LIMIT`] (read when the table is opened); a lookup beyond
/// that waits for one to be free. The pool used last is taken first, so
/// that a second connection is opened only when lookups overlap.
#[derive(Debug)]
pub struct HostPools<C> {
    hosts: Vec<DbHost>,
    retry_interval: Duration,
    limit: usize,
    state: std::sync::Mutex<PoolsState<C>>,
    freed: std::sync::Condvar,
}

#[derive(Debug)]
struct PoolsState<C> {
    idle: Vec<HostPool<C>>,
    /// Pools in use by a lookup.
    busy: usize,
}

impl<C> HostPools<C> {
    pub fn new(hosts: Vec<DbHost>, retry_interval: Duration) -> HostPools<C> {
        Self::with_limit(
            hosts,
            retry_interval,
            CONNECTION_LIMIT.load(std::sync::atomic::Ordering::Relaxed),
        )
    }

    pub fn with_limit(hosts: Vec<DbHost>, retry_interval: Duration, limit: usize) -> HostPools<C> {
        HostPools {
            hosts,
            retry_interval,
            limit: limit.max(1),
            state: std::sync::Mutex::new(PoolsState {
                idle: Vec::new(),
                busy: 0,
            }),
            freed: std::sync::Condvar::new(),
        }
    }

    /// Runs `f` with a pool of its own (waiting for one if `limit` are
    /// in use).
    pub fn with<T>(&self, f: impl FnOnce(&mut HostPool<C>) -> T) -> T {
        let mut pool = {
            let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
            loop {
                if let Some(p) = st.idle.pop() {
                    st.busy += 1;
                    break p;
                }
                if st.busy < self.limit {
                    st.busy += 1;
                    break HostPool::new(self.hosts.clone(), self.retry_interval);
                }
                st = self.freed.wait(st).unwrap_or_else(|p| p.into_inner());
            }
        };
        // Given back even if `f` panics (a worker thread's panic must not
        // shrink the pool).
        struct Back<'a, C> {
            pools: &'a HostPools<C>,
            pool: Option<HostPool<C>>,
        }
        impl<C> Drop for Back<'_, C> {
            fn drop(&mut self) {
                let mut st = self.pools.state.lock().unwrap_or_else(|p| p.into_inner());
                st.busy -= 1;
                if let Some(p) = self.pool.take() {
                    st.idle.push(p);
                }
                self.pools.freed.notify_one();
            }
        }
        let mut back = Back {
            pools: self,
            pool: None,
        };
        let out = f(&mut pool);
        back.pool = Some(pool);
        out
    }

    /// (pools idle, pools in use by a lookup now).
    pub fn counts(&self) -> (usize, usize) {
        let st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        (st.idle.len(), st.busy)
    }
}

/// Why a query gave no answer: the server's failure (try the next
/// server) or the result's (expansion limit: the same on every server).
pub enum QueryError {
    Server(String),
    Result(String),
}

/// What a SQL connection does for a lookup (`mysql:`, `pgsql:`).
pub trait SqlConnection {
    /// The server's escaping of `value`; a failure goes to `failed` so
    /// that no query is sent with a value missing.
    fn quote(&self, value: &str, out: &mut String, failed: &mut Option<String>);
    /// Runs `sql`; every column of every row goes to `value`.
    fn run_query(
        &mut self,
        sql: &str,
        value: &mut dyn FnMut(Option<&str>) -> Result<(), String>,
    ) -> Result<(), QueryError>;
}

/// One lookup of a SQL table, as Postfix's dict_mysql/dict_pgsql make
/// it: the domain filter, the query expanded and quoted by the server's
/// own function, the servers tried in turn, the rows joined by
/// `result_format`. An error is the table's (temporary) lookup error.
pub fn sql_lookup<C: SqlConnection>(
    table: &str,
    templates: &Templates,
    hosts: &HostPools<C>,
    connect: &mut dyn FnMut(&DbHost) -> Result<C, String>,
    key: &str,
) -> Result<Option<String>, super::LookupError> {
    let key = key.to_lowercase();
    if !templates.domain_allows(&key) {
        return Ok(None);
    }
    // Whether the key is looked up at all (quoting needs a connection).
    if templates
        .expand_query(&key, &mut |v, out| out.push_str(v))
        .is_none()
    {
        return Ok(None);
    }
    let mut result_error = None;
    let found = hosts.with(|hosts| {
        hosts.run(connect, &mut |conn: &mut C| {
            let mut failed = None;
            let sql = templates
                .expand_query(&key, &mut |v, out| conn.quote(v, out, &mut failed))
                .unwrap_or_default();
            if let Some(e) = failed {
                return Err(e);
            }
            let mut results = templates.results(&key);
            match conn.run_query(&sql, &mut |v| results.add(v)) {
                Ok(()) => Ok(results.finish()),
                Err(QueryError::Server(e)) => Err(e),
                Err(QueryError::Result(e)) => {
                    result_error = Some(e);
                    Ok(None)
                }
            }
        })
    });
    match (found, result_error) {
        (_, Some(e)) | (Err(e), None) => Err(super::LookupError::new(table, e)),
        (Ok(v), None) => Ok(v),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn templates(query: &str, result: &str, extra: &str) -> Templates {
        let cf = CfFile::parse("t.cf", extra).unwrap();
        Templates::new("mysql:t.cf", &cf, query.into(), result.into()).unwrap()
    }

    fn q(t: &Templates, key: &str) -> Option<String> {
        // The quoting of MySQL's mysql_real_escape_string for the test.
        let mut quote = |s: &str, out: &mut String| {
            for c in s.chars() {
                if c == '\'' || c == '\\' {
                    out.push('\\');
                }
                out.push(c);
            }
        };
        t.expand_query(key, &mut quote)
    }

    fn result(t: &Templates, key: &str, values: &[Option<&str>]) -> Result<Option<String>, String> {
        let mut r = t.results(key);
        for v in values {
            r.add(*v)?;
        }
        Ok(r.finish())
    }

    #[test]
    fn cf_file_lines_comments_continuations() {
        let cf = CfFile::parse(
            "x.cf",
            "# comment\nhosts = inet:db1:3306\n   unix:/run/db.sock\nuser=postfix\n\npassword = a=b c \nquery = SELECT goto FROM alias\n  WHERE address='%s'\n",
        )
        .unwrap();
        assert_eq!(cf.get("hosts"), Some("inet:db1:3306 unix:/run/db.sock"));
        assert_eq!(cf.get("user"), Some("postfix"));
        assert_eq!(cf.get("password"), Some("a=b c"));
        assert_eq!(
            cf.get("query"),
            Some("SELECT goto FROM alias WHERE address='%s'")
        );
        assert!(CfFile::parse("x.cf", "novalue\n")
            .unwrap_err()
            .contains("line 1"));
        assert!(cf.int_or("expansion_limit", 0, 0).unwrap() == 0);
        assert!(CfFile::parse("x", "expansion_limit = x")
            .unwrap()
            .int_or("expansion_limit", 0, 0)
            .is_err());
    }

    #[test]
    fn legacy_query_is_built_as_postfix_builds_it() {
        let cf = CfFile::parse(
            "x.cf",
            "table = mxaliases\nselect_field = forw_addr\nwhere_field = alias\nadditional_conditions = and status = 'paid'\n",
        )
        .unwrap();
        assert_eq!(
            cf.sql_query().unwrap(),
            "SELECT forw_addr FROM mxaliases WHERE alias='%s' and status = 'paid'"
        );
        assert!(CfFile::parse("x.cf", "table = t\n")
            .unwrap()
            .sql_query()
            .is_err());
    }

    /// The examples of mysql_table(5).
    #[test]
    fn query_expansion_as_mysql_table_5() {
        let t = templates(
            "SELECT replacement FROM aliases WHERE mailbox = '%s'",
            "%s",
            "",
        );
        assert_eq!(
            q(&t, "o'brien@example.com").unwrap(),
            r"SELECT replacement FROM aliases WHERE mailbox = 'o\'brien@example.com'"
        );
        // %u and %d: the query is not run for a key without a domain, nor
        // for one with an empty local part when %u is used.
        let t = templates(
            "SELECT forw_addr FROM mxaliases WHERE alias='%u' AND domain='%d'",
            "%s",
            "",
        );
        assert_eq!(
            q(&t, "user@example.com").unwrap(),
            "SELECT forw_addr FROM mxaliases WHERE alias='user' AND domain='example.com'"
        );
        assert_eq!(q(&t, "user"), None);
        assert_eq!(q(&t, "@example.com"), None);
        // %u alone: a bare name is the whole key.
        let t = templates("SELECT x FROM t WHERE u='%u'", "%s", "");
        assert_eq!(q(&t, "user").unwrap(), "SELECT x FROM t WHERE u='user'");
        assert_eq!(q(&t, "a@b").unwrap(), "SELECT x FROM t WHERE u='a'");
        // %[1-9]: labels from the right; too few labels: no query.
        let t = templates("SELECT x FROM t WHERE tld='%1' AND sld='%2'", "%s", "");
        assert_eq!(
            q(&t, "user@mail.example.com").unwrap(),
            "SELECT x FROM t WHERE tld='com' AND sld='example'"
        );
        assert_eq!(q(&t, "user@localhost"), None);
        assert_eq!(q(&t, "user@example..com"), None);
        // %% and the uppercase forms (the key, in a query the same).
        let t = templates("SELECT '%%' || '%S' || '%U' || '%D'", "%s", "");
        assert_eq!(
            q(&t, "u@d.test").unwrap(),
            "SELECT '%' || 'u@d.test' || 'u' || 'd.test'"
        );
        // An unknown escape is refused when the table is opened.
        let cf = CfFile::parse("t.cf", "").unwrap();
        assert!(Templates::new("mysql:t.cf", &cf, "x='%x'".into(), "%s".into()).is_err());
        assert!(Templates::new("mysql:t.cf", &cf, "x".into(), "%s%".into()).is_err());
        assert_eq!(q(&templates("x='%s'", "%s", ""), ""), None);
    }

    #[test]
    fn result_format_and_rows_joined_with_commas() {
        // result_format = %u@%D: "the local part of the value, at the
        // domain of the key", and %s and literal text.
        let t = templates("SELECT dest FROM t WHERE a='%s'", "%u@%D", "");
        assert_eq!(
            result(
                &t,
                "alias@example.com",
                &[Some("joe@other.test"), Some("ann")]
            )
            .unwrap(),
            Some("joe@example.com,ann@example.com".into())
        );
        let t = templates("q '%s'", "smtp:[%s]", "");
        assert_eq!(
            result(&t, "k", &[Some("mx1"), None, Some(""), Some("mx2")]).unwrap(),
            Some("smtp:[mx1],smtp:[mx2]".into())
        );
        assert_eq!(result(&t, "k", &[None]).unwrap(), None);
        // %d in result_format: values without a domain are skipped.
        let t = templates("q '%s'", "%d", "");
        assert_eq!(
            result(&t, "k", &[Some("nodomain"), Some("a@b.test")]).unwrap(),
            Some("b.test".into())
        );
    }

    #[test]
    fn expansion_limit_is_an_error() {
        let t = templates("q '%s'", "%s", "expansion_limit = 2\n");
        assert!(result(&t, "k", &[Some("a"), Some("b")]).is_ok());
        assert!(result(&t, "k", &[Some("a"), Some("b"), Some("c")]).is_err());
    }

    #[test]
    fn domain_filter_skips_other_keys() {
        let t = templates(
            "q '%s'",
            "%s",
            "domain = example.com, !bad.example.com other.test\n",
        );
        assert!(t.domain_allows("user@example.com"));
        assert!(t.domain_allows("user@OTHER.test"));
        assert!(!t.domain_allows("user@bad.example.com"));
        assert!(!t.domain_allows("user@elsewhere.test"));
        assert!(!t.domain_allows("example.com"));
        assert!(!t.domain_allows("@example.com"));
        assert!(templates("q '%s'", "%s", "").domain_allows("example.com"));
    }

    #[test]
    fn hosts_list() {
        assert_eq!(
            DbHost::parse_list(
                Some("inet:db1:3307, unix:/run/mysqld/mysqld.sock db2 [::1]:5432 /tmp"),
                true
            )
            .unwrap(),
            vec![
                DbHost::Inet {
                    host: "db1".into(),
                    port: Some(3307)
                },
                DbHost::Unix("/run/mysqld/mysqld.sock".into()),
                DbHost::Inet {
                    host: "db2".into(),
                    port: None
                },
                DbHost::Inet {
                    host: "::1".into(),
                    port: Some(5432)
                },
                DbHost::Unix("/tmp".into()),
            ]
        );
        // One server is listed twice; none means localhost.
        assert_eq!(DbHost::parse_list(None, false).unwrap().len(), 2);
        assert_eq!(
            DbHost::parse_list(Some("postgresql://u@h/db"), true).unwrap()[0],
            DbHost::Uri("postgresql://u@h/db".into())
        );
        assert!(DbHost::parse_list(Some("db:notaport"), false).is_err());
    }

    #[test]
    fn host_pool_tries_in_turn_and_pauses_failed_servers() {
        let hosts = DbHost::parse_list(Some("inet:a:1 inet:b:2"), false).unwrap();
        let mut pool: HostPool<String> = HostPool::new(hosts, Duration::from_secs(60));
        let mut connects = Vec::new();
        let r = pool.run(
            &mut |h| {
                connects.push(h.to_string());
                match h {
                    DbHost::Inet { host, .. } if host == "a" => Err("refused".into()),
                    h => Ok(h.to_string()),
                }
            },
            &mut |c: &mut String| Ok(c.clone()),
        );
        assert_eq!(r.unwrap(), "inet:b:2");
        // The open connection is used again; a is not retried yet.
        let r = pool.run(&mut |_| Err("no".into()), &mut |c: &mut String| {
            Ok(c.clone())
        });
        assert_eq!(r.unwrap(), "inet:b:2");
        assert_eq!(connects, vec!["inet:a:1", "inet:b:2"]);
        // A kept connection that fails (the server restarted) is opened
        // again at once.
        let mut first = true;
        let r = pool.run(&mut |h| Ok(format!("new {h}")), &mut |c: &mut String| {
            if std::mem::take(&mut first) {
                Err("server has gone away".into())
            } else {
                Ok(c.clone())
            }
        });
        assert_eq!(r.unwrap(), "new inet:b:2");
        // A failed query on a new connection closes it; with every server
        // paused the lookup fails with the reasons.
        let e = pool
            .run(&mut |_| Err("refused".into()), &mut |_: &mut String| {
                Err::<(), _>("gone".into())
            })
            .unwrap_err();
        assert!(e.contains("inet:b:2: gone"), "{e}");
    }

    #[test]
    fn host_pools_cap_overlapping_lookups_and_reuse_the_last() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        let hosts = DbHost::parse_list(Some("inet:a:1"), false).unwrap();
        let pools: HostPools<usize> = HostPools::with_limit(hosts, Duration::from_secs(60), 2);
        let connects = AtomicUsize::new(0);
        let (now, peak) = (AtomicUsize::new(0), AtomicUsize::new(0));
        let lookup = || {
            pools.with(|p| {
                p.run(
                    &mut |_| Ok(connects.fetch_add(1, Ordering::SeqCst)),
                    &mut |_| {
                        let n = now.fetch_add(1, Ordering::SeqCst) + 1;
                        peak.fetch_max(n, Ordering::SeqCst);
                        std::thread::sleep(Duration::from_millis(5));
                        now.fetch_sub(1, Ordering::SeqCst);
                        Ok(())
                    },
                )
            })
        };
        // One at a time: one connection, used again.
        for _ in 0..5 {
            lookup().unwrap();
        }
        assert_eq!(connects.load(Ordering::SeqCst), 1);
        // Eight threads at once: a second connection, never a third.
        std::thread::scope(|s| {
            for _ in 0..8 {
                s.spawn(|| {
                    for _ in 0..10 {
                        lookup().unwrap();
                    }
                });
            }
        });
        assert_eq!(connects.load(Ordering::SeqCst), 2);
        assert_eq!(peak.load(Ordering::SeqCst), 2);
        assert_eq!(pools.counts(), (2, 0));
    }
}
