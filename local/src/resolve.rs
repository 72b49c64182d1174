//! From a recipient address to the places its mail goes: mailboxes of
//! local accounts, files, commands, and remote addresses to forward to.
//!
//! This is pure: the alias tables, the account database and include files
//! come in through [`Resolver`]'s fields, so that it is tested without
//! root and without a password database.
//!
//! Rules, as Postfix's local(8):
//! - The local part is lower-cased. With `recipient_delimiter` set, the
//!   full local part `user+ext` is looked up in the aliases first, then
//!   `user`; the mailbox is `user`'s, with extension `ext`.
//! - An alias value is a comma-separated list of targets (quotes are
//!   stripped): `|command`, `/file` (ending in `/`: a Maildir),
//!   `:include:/file` (more targets, one list per line), `\name` (that
//!   account's mailbox, no further aliasing), `name` or `name@domain`
//!   with a domain in `mydestination` (local again, looked up in the
//!   aliases again), or any other address (forwarded).
//! - A target naming the alias being expanded means its own mailbox. A
//!   name met again further down (`a: b`, `b: a`) is delivered to its
//!   mailbox when it has one, else bounced as a loop (5.4.6). Expansion
//!   deeper than [`MAX_DEPTH`] is a loop too.
//! - A name that is neither an alias nor an account goes to
//!   `luser_relay` when set, else bounces `unknown user: "name"` (5.1.1).
//! - An account's mail goes where its `.forward` file (the first of
//!   `forward_path` that exists, read as the user) says, in the alias
//!   value syntax; `\\user` there, or the user's own name, means its
//!   mailbox. Commands and files named in it run as the user.

use crate::status::Status;
use postern_common::addr;
use postern_common::dupfilter::DupFilter;
use postern_common::maps::Tables;
use postern_common::warning;
use std::io;
use std::path::{Path, PathBuf};

/// How deep aliases may nest before it is called a loop.
pub const MAX_DEPTH: usize = 100;
/// The largest `:include:` file read.
pub const MAX_INCLUDE: usize = 1 << 20;

/// A local address, split the way delivery needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalName {
    /// `local@domain` as delivered (for `Delivered-To:`).
    pub address: String,
    /// The local part, lower-cased, extension included.
    pub local: String,
    /// The local part without the extension: the account or alias name.
    pub user: String,
    pub extension: Option<String>,
    pub domain: String,
}

/// Where the extension's delimiter is in a local part: the first of the
/// `recipient_delimiter` characters, not at the start; `owner-x` and
/// `x-request` are not split at `-`, as Postfix.
pub fn extension_at(local: &str, delimiters: &str) -> Option<usize> {
    if delimiters.is_empty() {
        return None;
    }
    let lower = local.to_ascii_lowercase();
    let dash_special = lower.starts_with("owner-") || lower.ends_with("-request");
    local
        .char_indices()
        .find(|(i, c)| delimiters.contains(*c) && *i > 0 && !(*c == '-' && dash_special))
        .map(|(i, _)| i)
}

impl LocalName {
    /// Splits `local` (any case) at the first of the delimiter characters.
    /// `owner-x` and `x-request` are not split at `-`, as Postfix.
    pub fn new(local: &str, domain: &str, delimiters: &str) -> LocalName {
        let lower = local.to_lowercase();
        let mut user = lower.clone();
        let mut extension = None;
        if let Some(i) = extension_at(&lower, delimiters) {
            user = lower[..i].to_string();
            extension = Some(lower[i + 1..].to_string());
        }
        LocalName {
            address: if domain.is_empty() {
                lower.clone()
            } else {
                format!("{lower}@{domain}")
            },
            local: lower,
            user,
            extension,
            domain: domain.to_string(),
        }
    }
}

/// Where a piece of mail goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Dest {
    /// The mailbox of the account `LocalName::user`.
    Mailbox,
    /// Append to a file (mbox format), or a Maildir when it ends in `/`.
    File(PathBuf),
    /// Run `/bin/sh -c command` with the message on its input.
    Command(String),
    /// Resubmit to this remote address.
    Forward(String),
}

/// Where a target was found; decides what `allow_mail_to_commands` and
/// `allow_mail_to_files` permit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    /// The recipient itself (its mailbox).
    Direct,
    /// An alias value.
    Alias,
    /// An `:include:` file.
    Include,
    /// `luser_relay`.
    Relay,
    /// A `.forward` file.
    Forward,
}

impl Class {
    /// The word in `allow_mail_to_commands` / `allow_mail_to_files`.
    pub fn word(self) -> &'static str {
        match self {
            Class::Direct => "direct",
            Class::Alias => "alias",
            Class::Include => "include",
            Class::Relay => "relay",
            Class::Forward => "forward",
        }
    }
}

/// One place to deliver to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub dest: Dest,
    /// For a mailbox, its owner's address; for a file, a command or a
    /// forward, the local address whose alias named it.
    pub name: LocalName,
    pub class: Class,
    /// The account whose `.forward` named this target: commands and files
    /// run as that user (else as `default_privs`).
    pub owner: Option<String>,
}

impl Target {
    /// What makes two targets the same delivery, as Postfix's local keys
    /// its duplicate filter: a mailbox by its account, a forward by its
    /// address, a file or a command by its name.
    fn key(&self) -> String {
        match &self.dest {
            Dest::Mailbox => format!("mailbox {}", self.name.user),
            Dest::File(p) => format!("file {}", p.display()),
            Dest::Command(c) => format!("command {c}"),
            Dest::Forward(a) => format!("indirect {a}"),
        }
    }
}

/// The places one recipient's mail goes, and the parts of it that failed.
#[derive(Debug, Clone, Default)]
pub struct Expansion {
    pub targets: Vec<Target>,
    /// (address, outcome) of expanded names that cannot be delivered.
    pub failures: Vec<(String, Status)>,
    /// The targets met so far: one delivery for a target reached twice
    /// (two aliases, an alias and a `.forward`, an `:include:` list).
    dups: DupFilter,
}

impl Expansion {
    fn add(&mut self, t: Target) {
        if !self.dups.been_here(&t.key()) {
            self.targets.push(t);
        }
    }
}

/// Everything resolution needs to know about the system.
pub struct Resolver<'a> {
    pub aliases: &'a Tables,
    /// Whether a domain is this machine's (`mydestination`, interface
    /// address literals): the one resolver's answer
    /// (`postern_common::resolve::Resolver::is_local_domain`).
    pub is_local_domain: &'a dyn Fn(&str) -> bool,
    /// `myorigin`: the domain of bare names.
    pub myorigin: &'a str,
    /// `recipient_delimiter`: each character is a delimiter.
    pub delimiter: &'a str,
    /// `luser_relay` before expansion; "" = none.
    pub luser_relay: &'a str,
    /// Expands the `$parameters` left in `luser_relay` after the
    /// per-recipient ones (`$user`, `$extension`, ...) are replaced.
    pub expand: &'a dyn Fn(&str) -> String,
    /// Whether an account of this name exists.
    pub has_account: &'a dyn Fn(&str) -> bool,
    /// Reads an `:include:` file.
    pub read_include: &'a dyn Fn(&Path) -> io::Result<String>,
    /// The contents of the user's `.forward` (first of `forward_path`),
    /// `None` when there is none.
    pub read_forward: &'a dyn Fn(&LocalName) -> Option<String>,
    /// `duplicate_filter_limit`: targets remembered per recipient for
    /// duplicate elimination (0 = no limit).
    pub duplicate_filter_limit: usize,
}

impl<'a> Resolver<'a> {
    /// Resolves one recipient address (local part and an optional domain,
    /// which is one of `mydestination`).
    pub fn resolve(&self, address: &str) -> Expansion {
        let (local, domain) = addr::split(address);
        let domain = match domain {
            Some(d) if !d.is_empty() => d.to_string(),
            _ => self.myorigin.to_string(),
        };
        let name = LocalName::new(local, &domain, self.delimiter);
        let mut exp = Expansion {
            dups: DupFilter::new(self.duplicate_filter_limit),
            ..Expansion::default()
        };
        let mut chain = Vec::new();
        self.expand_local(&name, &mut chain, 0, Class::Direct, &mut exp);
        exp
    }

    /// Delivers to a local name: its alias, else its mailbox, else
    /// `luser_relay`. `chain` holds the aliases being expanded, outermost
    /// first.
    fn expand_local(
        &self,
        name: &LocalName,
        chain: &mut Vec<String>,
        depth: usize,
        class: Class,
        exp: &mut Expansion,
    ) {
        if depth > MAX_DEPTH {
            warning!("alias database loop for {}", name.local);
            exp.failures.push((
                name.address.clone(),
                Status::bounce(
                    "5.4.6",
                    format!("mail forwarding loop for {}", name.address),
                ),
            ));
            return;
        }
        let found = match self.alias(name) {
            Ok(found) => found,
            Err(_) => {
                // Logged by the table; deferred, as Postfix's local does.
                exp.failures.push((
                    name.address.clone(),
                    Status::defer("4.3.0", "alias database unavailable"),
                ));
                return;
            }
        };
        match found {
            Some((key, value)) if !chain.contains(&key) => {
                chain.push(key);
                for t in split_targets(&value) {
                    self.expand_target(&t, name, chain, depth + 1, Class::Alias, exp);
                }
                chain.pop();
            }
            Some((key, _)) if chain.last() != Some(&key) => {
                // Met again further down: its mailbox, if it has one.
                if (self.has_account)(&name.user) {
                    exp.add(self.mailbox(name, class));
                } else {
                    exp.failures.push((
                        name.address.clone(),
                        Status::bounce(
                            "5.4.6",
                            format!("mail forwarding loop for {}", name.address),
                        ),
                    ));
                }
            }
            // Not an alias, or the alias naming itself: the mailbox (or
            // the account's .forward).
            _ => self.account(name, class, chain, depth, true, exp),
        }
    }

    /// The alias entry of `name` (by its local part, then without its
    /// extension) and the key that found it; Err: a table could not
    /// answer.
    fn alias(
        &self,
        name: &LocalName,
    ) -> Result<Option<(String, std::borrow::Cow<'a, str>)>, postern_common::maps::LookupError>
    {
        if let Some(v) = self.aliases.lookup(&name.local)? {
            return Ok(Some((name.local.clone(), v)));
        }
        if name.extension.is_some() {
            if let Some(v) = self.aliases.lookup(&name.user)? {
                return Ok(Some((name.user.clone(), v)));
            }
        }
        Ok(None)
    }

    fn mailbox(&self, name: &LocalName, class: Class) -> Target {
        Target {
            dest: Dest::Mailbox,
            name: name.clone(),
            class,
            owner: None,
        }
    }

    /// An account's mail: its `.forward` when `forward` and it has one
    /// (and is not already being expanded), else its mailbox; `luser_relay`
    /// or unknown when there is no such account.
    fn account(
        &self,
        name: &LocalName,
        class: Class,
        chain: &mut Vec<String>,
        depth: usize,
        forward: bool,
        exp: &mut Expansion,
    ) {
        if (self.has_account)(&name.user) {
            let key = format!(".forward:{}", name.user);
            if forward && !chain.contains(&key) && depth <= MAX_DEPTH {
                if let Some(text) = (self.read_forward)(name) {
                    let targets: Vec<String> = text
                        .lines()
                        .map(str::trim)
                        .filter(|l| !l.is_empty() && !l.starts_with('#'))
                        .flat_map(split_targets)
                        .collect();
                    if !targets.is_empty() {
                        chain.push(key);
                        let before = exp.targets.len();
                        for t in targets {
                            self.expand_target(&t, name, chain, depth + 1, Class::Forward, exp);
                        }
                        for t in &mut exp.targets[before..] {
                            if t.class == Class::Forward && t.owner.is_none() {
                                t.owner = Some(name.user.clone());
                            }
                        }
                        chain.pop();
                        return;
                    }
                }
            }
            exp.add(self.mailbox(name, class));
        } else if let Some(to) = self.luser_relay(name) {
            exp.add(Target {
                dest: Dest::Forward(to),
                name: name.clone(),
                class: Class::Relay,
                owner: None,
            });
        } else {
            exp.failures.push((
                name.address.clone(),
                Status::bounce("5.1.1", format!("unknown user: \"{}\"", name.user)),
            ));
        }
    }

    /// `luser_relay` for this name, completed with `@myorigin`.
    fn luser_relay(&self, name: &LocalName) -> Option<String> {
        if self.luser_relay.trim().is_empty() {
            return None;
        }
        let ext = name.extension.clone().unwrap_or_default();
        let vars: [(&str, &str); 6] = [
            ("user", &name.user),
            ("extension", &ext),
            ("local", &name.local),
            ("domain", &name.domain),
            ("recipient", &name.address),
            ("recipient_delimiter", self.delimiter),
        ];
        let text = substitute(self.luser_relay, &vars);
        let to = (self.expand)(&text).trim().to_string();
        if to.is_empty() {
            return None;
        }
        Some(addr::qualify(&to, self.myorigin))
    }

    /// Delivers to one target of `alias`'s value.
    fn expand_target(
        &self,
        raw: &str,
        alias: &LocalName,
        chain: &mut Vec<String>,
        depth: usize,
        class: Class,
        exp: &mut Expansion,
    ) {
        let t = unquote(raw.trim());
        if t.is_empty() {
            return;
        }
        if let Some(cmd) = t.strip_prefix('|') {
            exp.add(Target {
                dest: Dest::Command(cmd.trim().to_string()),
                name: alias.clone(),
                class,
                owner: None,
            });
        } else if t.len() > 9 && t[..9].eq_ignore_ascii_case(":include:") {
            self.include(t[9..].trim(), alias, chain, depth, exp);
        } else if t.starts_with('/') {
            exp.add(Target {
                dest: Dest::File(PathBuf::from(t)),
                name: alias.clone(),
                class,
                owner: None,
            });
        } else if let Some(user) = t.strip_prefix('\\') {
            // \name: that account's mailbox, no more aliasing.
            let (local, domain) = addr::split(user);
            let name = LocalName::new(local, domain.unwrap_or(&alias.domain), self.delimiter);
            self.account(&name, class, chain, depth, false, exp);
        } else {
            let (local, domain) = addr::split(&t);
            match domain {
                Some(d) if !(self.is_local_domain)(d) => {
                    exp.add(Target {
                        dest: Dest::Forward(t.to_string()),
                        name: alias.clone(),
                        class,
                        owner: None,
                    });
                }
                _ => {
                    let d = match domain {
                        Some(d) if !d.is_empty() => d,
                        _ => self.myorigin,
                    };
                    let name = LocalName::new(local, d, self.delimiter);
                    self.expand_local(&name, chain, depth, class, exp);
                }
            }
        }
    }

    fn include(
        &self,
        path: &str,
        alias: &LocalName,
        chain: &mut Vec<String>,
        depth: usize,
        exp: &mut Expansion,
    ) {
        let key = format!(":include:{path}");
        if chain.contains(&key) || depth > MAX_DEPTH {
            exp.failures.push((
                alias.address.clone(),
                Status::bounce(
                    "5.4.6",
                    format!("mail forwarding loop for {}", alias.address),
                ),
            ));
            return;
        }
        let text = match (self.read_include)(Path::new(path)) {
            Ok(t) => t,
            Err(e) => {
                warning!(
                    "cannot open include file {path}: {}",
                    crate::status::strip_os_error(&e)
                );
                exp.failures.push((
                    alias.address.clone(),
                    Status::bounce("5.3.5", "mail system configuration error"),
                ));
                return;
            }
        };
        chain.push(key);
        for line in text.lines() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            for t in split_targets(line) {
                self.expand_target(&t, alias, chain, depth + 1, Class::Include, exp);
            }
        }
        chain.pop();
    }
}

/// Splits an alias value at commas outside double quotes.
pub fn split_targets(value: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut quoted = false;
    let mut escaped = false;
    for c in value.chars() {
        if escaped {
            cur.push(c);
            escaped = false;
            continue;
        }
        match c {
            '\\' if quoted => {
                cur.push(c);
                escaped = true;
            }
            '"' => {
                quoted = !quoted;
                cur.push(c);
            }
            ',' if !quoted => {
                if !cur.trim().is_empty() {
                    out.push(cur.trim().to_string());
                }
                cur.clear();
            }
            c => cur.push(c),
        }
    }
    if !cur.trim().is_empty() {
        out.push(cur.trim().to_string());
    }
    out
}

/// `"|cmd a, b"` → `|cmd a, b`; `"a b"@x` → `a b@x`.
fn unquote(t: &str) -> String {
    if !t.contains('"') {
        return t.to_string();
    }
    let mut out = String::with_capacity(t.len());
    let mut quoted = false;
    let mut chars = t.chars();
    while let Some(c) = chars.next() {
        match c {
            '"' => quoted = !quoted,
            '\\' if quoted => {
                if let Some(n) = chars.next() {
                    out.push(n);
                }
            }
            c => out.push(c),
        }
    }
    out
}

/// Replaces `$name` and `${name}` for the given names; leaves every other
/// `$` reference as it is.
pub fn substitute(text: &str, vars: &[(&str, &str)]) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        let after = &rest[i + 1..];
        let (name, len) = if let Some(inner) = after.strip_prefix('{') {
            match inner.find('}') {
                Some(e) => (&inner[..e], e + 2),
                None => ("", 0),
            }
        } else {
            let e = after
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(after.len());
            (&after[..e], e)
        };
        match vars.iter().find(|(n, _)| *n == name) {
            Some((_, v)) if len > 0 => {
                out.push_str(v);
                rest = &after[len..];
            }
            _ => {
                out.push('$');
                rest = after;
            }
        }
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use postern_common::ipc::Outcome;

    const ACCOUNTS: &[&str] = &["alice", "bob", "carol", "dave", "root"];

    fn resolve_with(aliases: &str, relay: &str, delim: &str, addr: &str) -> Expansion {
        let (tables, bad) = Tables::open_list(aliases);
        assert!(bad.is_empty(), "{bad:?}");
        let dest = ["host.test", "localhost"];
        let r = Resolver {
            aliases: &tables,
            is_local_domain: &|d| dest.iter().any(|x| x.eq_ignore_ascii_case(d)),
            myorigin: "host.test",
            delimiter: delim,
            luser_relay: relay,
            expand: &|s| s.replace("$myhostname", "host.test"),
            has_account: &|u| ACCOUNTS.contains(&u),
            read_include: &|p| {
                if p == Path::new("/lists/staff") {
                    Ok("# staff\nalice, \"|/bin/log staff\"\n\n/var/log/staff\n".into())
                } else if p == Path::new("/lists/self") {
                    Ok(":include:/lists/self\n".into())
                } else {
                    Err(io::Error::from_raw_os_error(libc::ENOENT))
                }
            },
            duplicate_filter_limit: 1000,
            read_forward: &|n| match n.user.as_str() {
                "dave" => {
                    Some("# elsewhere\ndave@remote.test, \\dave\n\"|/bin/vacation\"\n".into())
                }
                "bob" if n.extension.as_deref() == Some("loop") => Some("bob\n".into()),
                _ => None,
            },
        };
        r.resolve(addr)
    }

    fn resolve(aliases: &str, addr: &str) -> Expansion {
        resolve_with(aliases, "", "+", addr)
    }

    /// A `hash:` table compiled from aliases(5) text in a fresh directory.
    fn hash_table(name: &str, text: &str) -> (String, PathBuf) {
        let dir = std::env::temp_dir().join(format!("plocal-res-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let src = dir.join("aliases");
        let entries = postern_common::maps::parse_source(text, true).unwrap();
        postern_common::maps::write_hash_db(&src, &entries).unwrap();
        (format!("hash:{}", src.display()), dir)
    }

    fn dests(e: &Expansion) -> Vec<String> {
        e.targets
            .iter()
            .map(|t| match &t.dest {
                Dest::Mailbox => format!("mailbox {}", t.name.address),
                Dest::File(p) => format!("file {}", p.display()),
                Dest::Command(c) => format!("command {c}"),
                Dest::Forward(a) => format!("forward {a}"),
            })
            .collect()
    }

    #[test]
    fn plain_users_and_extensions() {
        let e = resolve("inline:{x=y}", "Alice@host.test");
        assert_eq!(dests(&e), ["mailbox alice@host.test"]);
        assert_eq!(e.targets[0].class, Class::Direct);
        let e = resolve("inline:{x=y}", "bob+lists@host.test");
        assert_eq!(dests(&e), ["mailbox bob+lists@host.test"]);
        assert_eq!(e.targets[0].name.user, "bob");
        assert_eq!(e.targets[0].name.extension.as_deref(), Some("lists"));
        let e = resolve("inline:{x=y}", "carol");
        assert_eq!(dests(&e), ["mailbox carol@host.test"]);
        // Without a delimiter, "bob+x" is a name of its own.
        let e = resolve_with("inline:{x=y}", "", "", "bob+x@host.test");
        assert!(e.targets.is_empty());
        assert_eq!(e.failures[0].1.reason, "unknown user: \"bob+x\"");
    }

    #[test]
    fn unknown_users_and_luser_relay() {
        let e = resolve("inline:{x=y}", "nobody-here@host.test");
        assert!(e.targets.is_empty());
        assert_eq!(e.failures.len(), 1);
        let s = &e.failures[0].1;
        assert_eq!((s.outcome, s.dsn.as_str()), (Outcome::Bounced, "5.1.1"));
        assert_eq!(s.reason, "unknown user: \"nobody-here\"");

        let e = resolve_with("inline:{x=y}", "catchall", "+", "zed@host.test");
        assert_eq!(dests(&e), ["forward catchall@host.test"]);
        assert_eq!(e.targets[0].class, Class::Relay);
        let e = resolve_with(
            "inline:{x=y}",
            "${user}+lost@relay.test, $myhostname",
            "+",
            "Zed+tag@host.test",
        );
        assert_eq!(dests(&e), ["forward zed+lost@relay.test, host.test"]);
        let e = resolve_with("inline:{x=y}", "$local@other.test", "+", "zed+q@host.test");
        assert_eq!(dests(&e), ["forward zed+q@other.test"]);
    }

    #[test]
    fn aliases_expand_recursively() {
        let (t, dir) = hash_table(
            "rec",
            "postmaster: root\nstaff: alice, bob\nteam: staff\n\
             ext: carol+x\nfar: friend@remote.test\n",
        );
        let t = t.as_str();
        assert_eq!(
            dests(&resolve(t, "Postmaster@host.test")),
            ["mailbox root@host.test"]
        );
        assert_eq!(
            dests(&resolve(t, "team@localhost")),
            ["mailbox alice@host.test", "mailbox bob@host.test"]
        );
        let e = resolve(t, "ext@host.test");
        assert_eq!(dests(&e), ["mailbox carol+x@host.test"]);
        assert_eq!(e.targets[0].class, Class::Alias);
        assert_eq!(
            dests(&resolve(t, "far@host.test")),
            ["forward friend@remote.test"]
        );
        // The full local part is looked up first, then without extension.
        assert_eq!(
            dests(&resolve(t, "team+x@host.test")),
            ["mailbox alice@host.test", "mailbox bob@host.test"]
        );
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn alias_values_from_a_file() {
        let (t, dir) = hash_table(
            "file",
            "list: alice, \"|/usr/bin/x -a, -b\", /var/mail/archive, \
             bob@localhost, out@remote.test, alice\n\
             local-list: \\alice, maildir/\n",
        );
        let e = resolve(&t, "list@host.test");
        assert_eq!(
            dests(&e),
            [
                "mailbox alice@host.test",
                "command /usr/bin/x -a, -b",
                "file /var/mail/archive",
                "mailbox bob@localhost",
                "forward out@remote.test",
            ]
        );
        assert_eq!(e.targets[1].name.address, "list@host.test");
        assert!(e.failures.is_empty());
        // "maildir/" is a local name, not a path: unknown.
        let e = resolve(&t, "local-list@host.test");
        assert_eq!(dests(&e), ["mailbox alice@host.test"]);
        assert_eq!(e.failures.len(), 1);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn duplicates_in_an_expansion_are_delivered_once() {
        // Two aliases to one account, the account by another name and in
        // another case, a forward in two cases, a .forward naming it.
        let (t, dir) = hash_table(
            "dups",
            "both: a1, a2, Bob, \\bob, x@Remote.test, x@remote.TEST\n\
             a1: bob\na2: BOB@localhost\nd2: dave, alice\n",
        );
        let e = resolve(&t, "both@host.test");
        assert_eq!(
            dests(&e),
            ["mailbox bob@host.test", "forward x@Remote.test"]
        );
        let e = resolve(&t, "d2@host.test");
        assert_eq!(
            dests(&e),
            [
                "forward dave@remote.test",
                "mailbox dave@host.test",
                "command /bin/vacation",
                "mailbox alice@host.test"
            ]
        );
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn duplicate_filter_limit_bounds_what_is_remembered() {
        let (t, dir) = hash_table("dlimit", "l: a@r.test, b@r.test, a@r.test, b@r.test\n");
        let (tables, _) = Tables::open_list(&t);
        let resolver = |limit| Resolver {
            aliases: &tables,
            is_local_domain: &|d| d.eq_ignore_ascii_case("host.test"),
            myorigin: "host.test",
            delimiter: "",
            luser_relay: "",
            expand: &|s| s.to_string(),
            has_account: &|_| false,
            read_include: &|_| Err(io::Error::from_raw_os_error(libc::ENOENT)),
            read_forward: &|_| None,
            duplicate_filter_limit: limit,
        };
        // Past the limit a target is let through again: a duplicate at
        // worst, never a lost copy.
        assert_eq!(resolver(1).resolve("l").targets.len(), 3);
        assert_eq!(resolver(0).resolve("l").targets.len(), 2);
        assert_eq!(resolver(2).resolve("l").targets.len(), 2);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn self_reference_and_loops() {
        // An alias naming itself means its own mailbox.
        let (t, dir) = hash_table(
            "self",
            "alice: alice, alice@remote.test\nall: a, c, alice\n",
        );
        let e = resolve(&t, "alice@host.test");
        assert_eq!(
            dests(&e),
            ["mailbox alice@host.test", "forward alice@remote.test"]
        );
        // A loop through accounts ends at their mailboxes.
        let e = resolve("inline:{alice=bob, bob=alice}", "alice@host.test");
        assert_eq!(dests(&e), ["mailbox alice@host.test"]);
        // A loop without mailboxes bounces.
        let e = resolve("inline:{la=lb, lb=la}", "la@host.test");
        assert!(e.targets.is_empty());
        let s = &e.failures[0].1;
        assert_eq!((s.outcome, s.dsn.as_str()), (Outcome::Bounced, "5.4.6"));
        assert_eq!(s.reason, "mail forwarding loop for la@host.test");
        // An alias naming itself without an account is an unknown user.
        let e = resolve("inline:{ghost=ghost}", "ghost@host.test");
        assert_eq!(e.failures[0].1.dsn, "5.1.1");
        // Duplicates are delivered once.
        let tables = format!("inline:{{a=b, b=alice, c=alice}} {t}");
        let e = resolve(&tables, "all@host.test");
        assert_eq!(
            dests(&e),
            ["mailbox alice@host.test", "forward alice@remote.test"]
        );
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn includes() {
        let e = resolve("inline:{staff=:include:/lists/staff}", "staff@host.test");
        assert_eq!(
            dests(&e),
            [
                "mailbox alice@host.test",
                "command /bin/log staff",
                "file /var/log/staff"
            ]
        );
        assert_eq!(e.targets[1].class, Class::Include);
        let e = resolve("inline:{x=:include:/lists/missing}", "x@host.test");
        assert_eq!(e.failures[0].1.dsn, "5.3.5");
        let e = resolve("inline:{x=:include:/lists/self}", "x@host.test");
        assert_eq!(e.failures[0].1.dsn, "5.4.6");
    }

    #[test]
    fn forward_files() {
        let e = resolve("inline:{x=y}", "dave@host.test");
        assert_eq!(
            dests(&e),
            [
                "forward dave@remote.test",
                "mailbox dave@host.test",
                "command /bin/vacation"
            ]
        );
        assert!(e.targets.iter().all(|t| t.class == Class::Forward));
        assert_eq!(e.targets[2].owner.as_deref(), Some("dave"));
        // Through an alias too; a .forward naming its own user is its mailbox.
        let e = resolve("inline:{d=dave, b=bob+loop}", "d@host.test");
        assert_eq!(dests(&e)[1], "mailbox dave@host.test");
        let e = resolve("inline:{x=y}", "bob+loop@host.test");
        assert_eq!(dests(&e), ["mailbox bob@host.test"]);
        assert!(e.failures.is_empty());
    }

    #[test]
    fn splitting_and_names() {
        assert_eq!(
            split_targets(" a, \"|b c, d\" ,, e "),
            ["a", "\"|b c, d\"", "e"]
        );
        assert_eq!(unquote("\"|b c, d\""), "|b c, d");
        assert_eq!(unquote("\"a b\"@x"), "a b@x");
        let n = LocalName::new("Owner-List", "h", "-");
        assert_eq!((n.user.as_str(), n.extension), ("owner-list", None));
        let n = LocalName::new("a-b-c", "h", "+-");
        assert_eq!(
            (n.user.as_str(), n.extension.as_deref()),
            ("a", Some("b-c"))
        );
        let n = LocalName::new("+x", "h", "+");
        assert_eq!(n.user, "+x");
        assert_eq!(
            substitute(
                "$user.${extension}$$x$other",
                &[("user", "u"), ("extension", "e")]
            ),
            "u.e$$x$other"
        );
    }
}
