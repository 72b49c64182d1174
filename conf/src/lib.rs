//! Postern's configuration: `main.cf` and `master.cf` in Postfix's syntax.
//!
//! Every program reads its parameters through [`Config`]: the settings of
//! `main.cf` in the configuration directory (`-c DIR`, `MAIL_CONFIG`, or
//! `/etc/postern`), then the `-o name=value` overrides master passes from
//! master.cf, then the defaults of the one parameter table in [`params`].
//! Values are expanded (`$name`, `${name}`, `$(name)`, `${name?text}`,
//! `${name:text}`, Postfix 3's `${name?{text}:{text}}` and
//! `${{text} OP {text} ? {text} : {text}}` with `==`, `!=`, `<`, `<=`,
//! `>=`, `>` and their `level` forms for `compatibility_level`) when read,
//! so a change to `myhostname` reaches every parameter that refers to it.
//! Parameter names are Postfix's: letters, digits, `_` and `-` (a
//! master.cf service `smtp-amavis` has `smtp-amavis_destination_recipient_limit`).

pub mod main_cf;
pub mod master_cf;
pub mod master_cf_edit;
pub mod params;
pub mod postfix_params;

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};

/// The longest a parameter value may grow by expansion.
const MAX_EXPANSION: usize = 64 * 1024;

/// The default configuration directory.
pub const DEFAULT_CONFIG_DIR: &str = "/etc/postern";

/// A configuration that cannot be used.
#[derive(Debug)]
pub enum ConfError {
    /// A file could not be read.
    Io { file: String, err: std::io::Error },
    /// A malformed line: Postfix's form, `FILE, line N: reason`.
    Syntax {
        file: String,
        line: usize,
        reason: String,
    },
    /// A value of the wrong kind: `name = value: reason`.
    Value {
        name: String,
        value: String,
        reason: String,
    },
}

impl fmt::Display for ConfError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConfError::Io { file, err } => write!(f, "open {file}: {err}"),
            ConfError::Syntax { file, line, reason } => write!(f, "{file}, line {line}: {reason}"),
            ConfError::Value {
                name,
                value,
                reason,
            } => {
                write!(f, "bad parameter value: {name} = {value}: {reason}")
            }
        }
    }
}

impl std::error::Error for ConfError {}

/// The configuration directory a command should use: `-c DIR` if given,
/// else `MAIL_CONFIG`, else `/etc/postern`.
pub fn config_dir(cli: Option<&Path>) -> PathBuf {
    if let Some(d) = cli {
        return d.to_path_buf();
    }
    match std::env::var_os("MAIL_CONFIG") {
        Some(d) if !d.is_empty() => PathBuf::from(d),
        _ => PathBuf::from(DEFAULT_CONFIG_DIR),
    }
}

/// The parameters in force for one program.
#[derive(Debug, Clone)]
pub struct Config {
    dir: PathBuf,
    /// From main.cf: the last setting of each name.
    main: HashMap<String, String>,
    /// From master.cf `-o` (or a command's own `-o`): these win over main.cf.
    overrides: HashMap<String, String>,
    /// Machine-dependent defaults computed once.
    computed: HashMap<&'static str, String>,
    /// main.cf settings of names Postern does not know (warned about).
    unknown: Vec<(String, usize)>,
    /// The main.cf line of each setting (its last).
    lines: HashMap<String, usize>,
}

impl Config {
    /// Reads `DIR/main.cf`. A missing main.cf is an error: Postfix's
    /// commands refuse to run without one too.
    pub fn load(dir: &Path) -> Result<Config, ConfError> {
        let file = dir.join("main.cf");
        let text = std::fs::read_to_string(&file).map_err(|err| ConfError::Io {
            file: file.display().to_string(),
            err,
        })?;
        Self::from_text(dir, &text, &file)
    }

    /// A configuration from main.cf text alone, with no configuration
    /// directory behind it (tests).
    pub fn from_main_cf_text(text: &str) -> Result<Config, ConfError> {
        Self::from_text(Path::new("/nonexistent"), text, Path::new("main.cf"))
    }

    /// Builds a configuration from main.cf text (tests, and `postconf -d`
    /// with an empty text).
    pub fn from_text(dir: &Path, text: &str, file: &Path) -> Result<Config, ConfError> {
        let settings = main_cf::parse(text, file)?;
        let mut main = HashMap::new();
        let mut unknown = Vec::new();
        let mut lines = HashMap::new();
        for s in settings {
            lines.insert(s.name.clone(), s.line);
            if !params::is_known(&s.name) {
                unknown.retain(|(n, _)| *n != s.name);
                unknown.push((s.name.clone(), s.line));
            }
            main.insert(s.name, s.value);
        }
        if !unknown.is_empty() {
            let used = user_parameters_in_use(&main, &dir.join("master.cf"));
            unknown.retain(|(n, _)| !used.contains(n));
        }
        let mut cfg = Config {
            dir: dir.to_path_buf(),
            main,
            overrides: HashMap::new(),
            computed: HashMap::new(),
            unknown,
            lines,
        };
        cfg.compute_defaults();
        Ok(cfg)
    }

    fn compute_defaults(&mut self) {
        let host = nix::unistd::gethostname()
            .ok()
            .and_then(|h| h.into_string().ok())
            .unwrap_or_else(|| "localhost".into());
        let host = if host.contains('.') {
            host
        } else {
            format!("{host}.localdomain")
        };
        self.computed.insert("myhostname", host);
        let myhostname = self.get("myhostname");
        let domain = match myhostname.split_once('.') {
            Some((_, d)) if d.contains('.') || !d.is_empty() => d.to_string(),
            _ => "localdomain".to_string(),
        };
        self.computed.insert("mydomain", domain);
        let style = self.get("mynetworks_style");
        self.computed
            .insert("mynetworks", mynetworks_of_style(style.trim()));
        self.computed
            .insert("config_directory", self.dir.display().to_string());
    }

    /// The configuration directory this was read from.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// main.cf names that are not Postern parameters, with their line, for
    /// the warning each program logs at start.
    pub fn unknown_parameters(&self) -> &[(String, usize)] {
        &self.unknown
    }

    /// The main.cf line that sets `name` (the last setting), if any.
    pub fn main_cf_line(&self, name: &str) -> Option<usize> {
        self.lines.get(name).copied()
    }

    /// Applies `-o name=value` overrides (from master.cf or the command line).
    pub fn set_overrides<I: IntoIterator<Item = (String, String)>>(&mut self, it: I) {
        for (n, v) in it {
            self.overrides.insert(n, v);
        }
    }

    /// The value before `$name` expansion, and whether it was set explicitly.
    pub fn raw(&self, name: &str) -> Option<(&str, bool)> {
        if name == "config_directory" {
            return self.computed.get(name).map(|v| (v.as_str(), true));
        }
        if let Some(v) = self.overrides.get(name) {
            return Some((v, true));
        }
        if let Some(v) = self.main.get(name) {
            return Some((v, true));
        }
        self.default_raw(name).map(|v| (v, false))
    }

    /// The default, before expansion: computed, from the table, or for a
    /// per-transport name the value of its `default_*` form.
    pub fn default_raw(&self, name: &str) -> Option<&str> {
        if let Some(v) = self.computed.get(name) {
            return Some(v);
        }
        params::default_of(name)
    }

    /// The expanded value of a parameter; "" for an unknown unset name.
    pub fn get(&self, name: &str) -> String {
        self.get_in(name, &mut Vec::new())
    }

    /// `stack` holds the names being expanded: a name that refers to
    /// itself, directly or through others, expands to nothing there
    /// (Postfix refuses such a "recursive macro").
    fn get_in(&self, name: &str, stack: &mut Vec<String>) -> String {
        if stack.iter().any(|n| n == name) {
            return String::new();
        }
        match self.raw(name) {
            Some((v, _)) => {
                let v = v.to_string();
                stack.push(name.to_string());
                let out = self.expand_in(&v, stack);
                stack.pop();
                out
            }
            None => String::new(),
        }
    }

    /// Expands `$name` references in `text`.
    pub fn expand(&self, text: &str) -> String {
        self.expand_in(text, &mut Vec::new())
    }

    fn expand_in(&self, text: &str, stack: &mut Vec<String>) -> String {
        if !text.contains('$') {
            return text.to_string();
        }
        let b = text.as_bytes();
        let mut out = String::with_capacity(text.len());
        let mut i = 0;
        while i < b.len() {
            if out.len() >= MAX_EXPANSION {
                // Names that double each other (a = $b$b, b = $c$c, ...)
                // grow exponentially: stop rather than exhaust memory.
                break;
            }
            if b[i] != b'$' {
                let next = text[i..].find('$').map(|p| i + p).unwrap_or(b.len());
                out.push_str(&text[i..next]);
                i = next;
                continue;
            }
            // b[i] == '$'
            if i + 1 >= b.len() {
                out.push('$');
                break;
            }
            let c = b[i + 1];
            if c == b'$' {
                out.push('$');
                i += 2;
            } else if c == b'{' || c == b'(' {
                // `${...}` may hold Postfix 3's `{text}` groups: match
                // the braces; `$(...)` ends at the first `)`.
                let end = if c == b'{' {
                    matching_brace(text, i + 1)
                } else {
                    text[i + 2..].find(')').map(|p| i + 2 + p)
                };
                let Some(end) = end else {
                    out.push_str(&text[i..]);
                    break;
                };
                let inner = &text[i + 2..end];
                let relational = c == b'{' && inner.trim_start().starts_with('{');
                let (val, op) = if relational {
                    // `${{left} OP {right} ? {then} : {else}}`: the
                    // comparison stands for a value, non-empty when true.
                    match self.relational(inner.trim_start(), stack) {
                        Some((true, rest)) => ("true".to_string(), rest),
                        Some((false, rest)) => (String::new(), rest),
                        None => (String::new(), None),
                    }
                } else {
                    let (name, op) = match inner.find(['?', ':']) {
                        Some(p) => (&inner[..p], Some((inner.as_bytes()[p], &inner[p + 1..]))),
                        None => (inner, None),
                    };
                    (self.get_in(name.trim(), stack), op)
                };
                match op {
                    None => out.push_str(&val),
                    Some((b'?', t)) => {
                        let (then, otherwise) = conditional_texts(t);
                        if !val.is_empty() {
                            out.push_str(&self.expand_in(then, stack));
                        } else if let Some(e) = otherwise {
                            out.push_str(&self.expand_in(e, stack));
                        }
                    }
                    Some((b':', t)) if val.is_empty() => {
                        out.push_str(&self.expand_in(conditional_texts(t).0, stack))
                    }
                    _ => {}
                }
                i = end + 1;
            } else if c.is_ascii_alphanumeric() || c == b'_' {
                let mut end = i + 1;
                while end < b.len() && (b[end].is_ascii_alphanumeric() || b[end] == b'_') {
                    end += 1;
                }
                out.push_str(&self.get_in(&text[i + 1..end], stack));
                i = end;
            } else {
                out.push('$');
                i += 1;
            }
        }
        if out.len() > MAX_EXPANSION {
            let mut cut = MAX_EXPANSION;
            while !out.is_char_boundary(cut) {
                cut -= 1;
            }
            out.truncate(cut);
        }
        out
    }

    /// `{left} OP {right}` at the start of `t`: whether it holds, and the
    /// `?`/`:` operator with its text after it. `None` for a malformed
    /// expression (Postfix warns and expands it to nothing).
    fn relational<'t>(
        &self,
        t: &'t str,
        stack: &mut Vec<String>,
    ) -> Option<(bool, Option<(u8, &'t str)>)> {
        let close = matching_brace(t, 0)?;
        let left = self.expand_in(&t[1..close], stack);
        let rest = t[close + 1..].trim_start();
        let op_len = rest.bytes().take_while(|b| b"<>!=".contains(b)).count();
        let op = &rest[..op_len];
        let rest = &rest[op_len..];
        let suffix_len = rest
            .bytes()
            .take_while(|b| b.is_ascii_alphanumeric())
            .count();
        let suffix = &rest[..suffix_len];
        let rest = rest[suffix_len..].trim_start();
        if !rest.starts_with('{') {
            return None;
        }
        let rclose = matching_brace(rest, 0)?;
        let right = self.expand_in(&rest[1..rclose], stack);
        let after = rest[rclose + 1..].trim_start();
        let ord = match suffix {
            "" => {
                let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
                if digits(&left) && digits(&right) {
                    left.parse::<u128>().ok()?.cmp(&right.parse::<u128>().ok()?)
                } else {
                    left.as_str().cmp(right.as_str())
                }
            }
            "level" => compat_level(&left)?.cmp(&compat_level(&right)?),
            _ => return None,
        };
        use std::cmp::Ordering::*;
        let holds = match op {
            "==" => ord == Equal,
            "!=" => ord != Equal,
            "<" => ord == Less,
            "<=" => ord != Greater,
            ">=" => ord != Less,
            ">" => ord == Greater,
            _ => return None,
        };
        let op = match after.as_bytes().first() {
            Some(&o @ (b'?' | b':')) => Some((o, &after[1..])),
            _ => None,
        };
        Some((holds, op))
    }

    /// A yes/no parameter.
    pub fn get_bool(&self, name: &str) -> Result<bool, ConfError> {
        let v = self.get(name);
        match v.to_ascii_lowercase().as_str() {
            "yes" | "true" | "1" | "on" => Ok(true),
            "no" | "false" | "0" | "off" | "" => Ok(false),
            _ => Err(self.bad(name, &v, "expected yes or no")),
        }
    }

    /// A whole-number parameter.
    pub fn get_u64(&self, name: &str) -> Result<u64, ConfError> {
        let v = self.get(name);
        v.trim()
            .parse()
            .map_err(|_| self.bad(name, &v, "expected a whole number"))
    }

    /// A time parameter in seconds: a number with an optional unit
    /// `s m h d w` (seconds when none, as Postfix).
    pub fn get_time(&self, name: &str) -> Result<u64, ConfError> {
        let v = self.get(name);
        parse_time(&v).ok_or_else(|| self.bad(name, &v, "expected a time such as 300s, 5m, 1h, 5d"))
    }

    /// A list parameter: items separated by commas and/or white space.
    pub fn get_list(&self, name: &str) -> Vec<String> {
        split_list(&self.get(name))
    }

    fn bad(&self, name: &str, value: &str, reason: &str) -> ConfError {
        ConfError::Value {
            name: name.into(),
            value: value.into(),
            reason: reason.into(),
        }
    }

    /// Every parameter name with an explicit setting (main.cf or override).
    pub fn explicit_names(&self) -> Vec<String> {
        let mut v: Vec<String> = self
            .main
            .keys()
            .chain(self.overrides.keys())
            .cloned()
            .collect();
        v.sort();
        v.dedup();
        v
    }

    /// A path parameter relative to `queue_directory` unless absolute (as
    /// Postfix treats `smtpd_sasl_path`, `process_id_directory`, ...).
    pub fn queue_path(&self, name: &str) -> PathBuf {
        let v = PathBuf::from(self.get(name));
        if v.is_absolute() {
            v
        } else {
            PathBuf::from(self.get("queue_directory")).join(v)
        }
    }

    /// Reads master.cf from the configuration directory.
    pub fn master_services(&self) -> Result<Vec<master_cf::Service>, ConfError> {
        let file = self.dir.join("master.cf");
        let text = std::fs::read_to_string(&file).map_err(|err| ConfError::Io {
            file: file.display().to_string(),
            err,
        })?;
        let limit = self.get_u64("default_process_limit")? as u32;
        master_cf::parse(&text, &file, limit)
    }
}

/// A `compatibility_level` value (`0`, `2`, `3.6`, `3.6.1`) as numbers to
/// compare, as Postfix's `<level` operators do.
pub fn compat_level(v: &str) -> Option<(u64, u64, u64)> {
    let mut parts = v.trim().split('.');
    let mut num = |required: bool| -> Option<u64> {
        match parts.next() {
            Some(p) if !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()) => p.parse().ok(),
            None if !required => Some(0),
            _ => None,
        }
    };
    let level = (num(true)?, num(false)?, num(false)?);
    parts.next().is_none().then_some(level)
}

/// The names a value refers to with `$name`, `${name...}` or `$(name...)`,
/// nested ones included.
pub fn referenced_names(value: &str) -> Vec<String> {
    let b = value.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        if b[i] != b'$' {
            i += 1;
            continue;
        }
        let mut j = i + 1;
        if j < b.len() && b[j] == b'$' {
            i = j + 1;
            continue;
        }
        if j < b.len() && (b[j] == b'{' || b[j] == b'(') {
            j += 1;
        }
        let start = j;
        while j < b.len() && (b[j].is_ascii_alphanumeric() || b[j] == b'_') {
            j += 1;
        }
        if j > start {
            out.push(value[start..j].to_string());
        }
        i = j.max(i + 1);
    }
    out
}

/// The main.cf names outside Postern's and Postfix's tables that are in
/// use all the same, as Postfix's postconf counts them: referred to with
/// `$name` by a main.cf value, a default, or a master.cf `-o` value, or
/// named in `smtpd_restriction_classes`.
fn user_parameters_in_use(main: &HashMap<String, String>, master_cf: &Path) -> Vec<String> {
    let mut used = Vec::new();
    for v in main.values() {
        used.extend(referenced_names(v));
    }
    for (_, d) in params::PARAMS {
        used.extend(referenced_names(d));
    }
    for r in postfix_params::all() {
        used.extend(referenced_names(r.postfix_default));
    }
    if let Ok(text) = std::fs::read_to_string(master_cf) {
        if let Ok(services) = master_cf::parse(&text, master_cf, 100) {
            for s in &services {
                for (_, v) in &s.overrides {
                    used.extend(referenced_names(v));
                }
            }
        }
    }
    if let Some(classes) = main.get("smtpd_restriction_classes") {
        used.extend(split_list(classes));
        used.extend(referenced_names(classes));
    }
    used.sort();
    used.dedup();
    used
}

/// The default of `mynetworks` for a `mynetworks_style`: `host` (and
/// anything else) the loopback networks, `subnet` and `class` also the
/// networks of this machine's interfaces (their subnets, or the class A,
/// B or C networks around their IPv4 addresses), as Postfix computes it.
fn mynetworks_of_style(style: &str) -> String {
    let mut nets = vec!["127.0.0.0/8".to_string(), "[::1]/128".to_string()];
    let style = style.to_ascii_lowercase();
    if style != "subnet" && style != "class" {
        return nets.join(" ");
    }
    let Ok(addrs) = nix::ifaddrs::getifaddrs() else {
        return nets.join(" ");
    };
    for a in addrs {
        let (Some(addr), Some(mask)) = (a.address, a.netmask) else {
            continue;
        };
        let net = if let (Some(ip), Some(m)) = (addr.as_sockaddr_in(), mask.as_sockaddr_in()) {
            let ip = u32::from(ip.ip());
            let m = if style == "class" {
                match ip >> 24 {
                    0..=127 => 0xff00_0000,
                    128..=191 => 0xffff_0000,
                    192..=223 => 0xffff_ff00,
                    _ => continue,
                }
            } else {
                u32::from(m.ip())
            };
            format!("{}/{}", std::net::Ipv4Addr::from(ip & m), m.count_ones())
        } else if let (Some(ip), Some(m)) = (addr.as_sockaddr_in6(), mask.as_sockaddr_in6()) {
            let (ip, m) = (u128::from(ip.ip()), u128::from(m.ip()));
            let net = std::net::Ipv6Addr::from(ip & m);
            if net.segments()[0] & 0xffc0 == 0xfe80 {
                // Link-local: Postfix leaves these out too.
                continue;
            }
            format!("[{net}]/{}", m.count_ones())
        } else {
            continue;
        };
        if !nets.contains(&net) {
            nets.push(net);
        }
    }
    nets.join(" ")
}

/// The index of the `}` that closes the `{` at `open`.
fn matching_brace(text: &str, open: usize) -> Option<usize> {
    let mut depth = 0usize;
    for (k, ch) in text.bytes().enumerate().skip(open) {
        match ch {
            b'{' => depth += 1,
            b'}' => {
                depth -= 1;
                if depth == 0 {
                    return Some(k);
                }
            }
            _ => {}
        }
    }
    None
}

/// The texts of `${name?TEXT}`/`${name:TEXT}` after the operator: plain
/// text (Postfix 2), or Postfix 3's `{then}` and `{then}:{else}`.
fn conditional_texts(t: &str) -> (&str, Option<&str>) {
    let t = t.trim();
    if !t.starts_with('{') {
        return (t, None);
    }
    let Some(close) = matching_brace(t, 0) else {
        return (t, None);
    };
    // Postfix strips the white space inside the braces.
    let then = t[1..close].trim();
    let rest = t[close + 1..].trim_start();
    if let Some(e) = rest.strip_prefix(':') {
        let e = e.trim();
        if e.starts_with('{') && matching_brace(e, 0) == Some(e.len() - 1) {
            return (then, Some(e[1..e.len() - 1].trim()));
        }
    }
    (then, None)
}

/// Seconds from a Postfix time value (`300`, `300s`, `5m`, `1h`, `2d`,
/// `1w`), read as Postfix's conv_time() reads it: the number, then the
/// unit letter (none: seconds); what follows the unit letter is ignored.
/// Postfix's own defaults rely on that: `postscreen_dnsbl_max_ttl =
/// ${postscreen_dnsbl_ttl?{$postscreen_dnsbl_ttl}:{1}}h` is `5mh`, five
/// minutes, when a main.cf sets `postscreen_dnsbl_ttl = 5m`.
pub fn parse_time(v: &str) -> Option<u64> {
    let v = v.trim();
    let digits = v.find(|c: char| !c.is_ascii_digit()).unwrap_or(v.len());
    let n: u64 = v[..digits].parse().ok()?;
    let mult = match v[digits..].chars().next() {
        None | Some('s') => 1,
        Some('m') => 60,
        Some('h') => 3600,
        Some('d') => 86400,
        Some('w') => 604800,
        Some(_) => return None,
    };
    n.checked_mul(mult)
}

/// Splits on white space (and on commas when `commas`), keeping `{ ... }`
/// groups whole: Postfix 3's syntax for values with spaces in master.cf
/// and in lookup-table lists (`inline:{ a=b, c=d }`).
pub fn split_braced(v: &str, commas: bool) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut depth = 0i32;
    for c in v.chars() {
        match c {
            '{' => depth += 1,
            '}' => depth -= 1,
            _ => {}
        }
        if depth == 0 && (c.is_whitespace() || (commas && c == ',')) {
            if !cur.is_empty() {
                out.push(std::mem::take(&mut cur));
            }
        } else {
            cur.push(c);
        }
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    out
}

/// Splits a list value on commas and white space, dropping empty items.
pub fn split_list(v: &str) -> Vec<String> {
    v.split(|c: char| c == ',' || c.is_whitespace())
        .filter(|s| !s.is_empty())
        .map(|s| s.to_string())
        .collect()
}

#[cfg(test)]
mod tests {

    #[test]
    fn times_as_postfix_conv_time_reads_them() {
        use super::parse_time;
        assert_eq!(parse_time("300"), Some(300));
        assert_eq!(parse_time("300s"), Some(300));
        assert_eq!(parse_time("5m"), Some(300));
        assert_eq!(parse_time("1h"), Some(3600));
        assert_eq!(parse_time("2d"), Some(172800));
        assert_eq!(parse_time("1w"), Some(604800));
        // After the unit letter, nothing counts (postscreen_dnsbl_max_ttl
        // made from postscreen_dnsbl_ttl = 5m).
        assert_eq!(parse_time("5mh"), Some(300));
        assert_eq!(parse_time("1h"), Some(3600));
        assert_eq!(parse_time("5x"), None);
        assert_eq!(parse_time("m"), None);
        assert_eq!(parse_time(""), None);
        assert_eq!(parse_time("-5s"), None);
    }
    use super::*;

    fn cfg(text: &str) -> Config {
        Config::from_text(Path::new("/etc/postern"), text, Path::new("main.cf")).unwrap()
    }

    #[test]
    fn expansion_and_defaults() {
        let c = cfg("myhostname = mx.example.com\nfoo_x = 1\n");
        assert_eq!(c.get("mydomain"), "example.com");
        assert_eq!(
            c.get("mydestination"),
            "mx.example.com, localhost.example.com, localhost"
        );
        assert_eq!(c.get("smtpd_banner"), "mx.example.com ESMTP Postern");
        assert_eq!(c.expand("${myhostname?yes}${relayhost:none}$$"), "yesnone$");
        assert_eq!(c.unknown_parameters(), &[("foo_x".to_string(), 2)]);
    }

    #[test]
    fn postfix3_conditional_groups() {
        let c = cfg("a_x = yes\nb_x = 2\n");
        assert_eq!(c.expand("${a_x?{on}:{off}}s"), "ons");
        assert_eq!(c.expand("${no_x?{on}:{off}}s"), "offs");
        assert_eq!(
            c.expand("${no_x?{on}}|${no_x:{unset}}|${a_x?{$b_x}}"),
            "|unset|2"
        );
        assert_eq!(c.expand("${a_x?plain}${no_x:old}"), "plainold");
    }

    #[test]
    fn last_wins_and_overrides() {
        let mut c = cfg("relayhost = a\nrelayhost = b\n");
        assert_eq!(c.get("relayhost"), "b");
        c.set_overrides([("relayhost".to_string(), "c".to_string())]);
        assert_eq!(c.get("relayhost"), "c");
    }

    #[test]
    fn times_and_lists() {
        let c = cfg("maximal_backoff_time = 2h\n");
        assert_eq!(c.get_time("maximal_backoff_time").unwrap(), 7200);
        assert_eq!(c.get_time("smtpd_timeout").unwrap(), 300);
        assert_eq!(split_list("a, b  c,,d"), vec!["a", "b", "c", "d"]);
        assert!(params::is_known("relay_destination_concurrency_limit"));
    }

    #[test]
    fn self_reference_does_not_loop() {
        let c = cfg("a_b = $a_b x\nc_d = ${e_f} y\ne_f = $c_d z\n");
        assert_eq!(c.get("a_b"), " x");
        assert_eq!(c.get("c_d"), " z y");
    }

    #[test]
    fn doubling_chain_is_bounded() {
        // Found by the main_cf fuzz target: 2^30 bytes without the cap.
        let mut text = String::new();
        for i in 0..30 {
            text.push_str(&format!("p{i} = $p{n}$p{n}\n", n = i + 1));
        }
        text.push_str("p30 = xy\n");
        let c = cfg(&text);
        assert!(c.get("p0").len() <= MAX_EXPANSION);
    }
}
