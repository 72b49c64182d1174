//! pipe(8): delivery to an external command named in master.cf, as
//! Postfix's `pipe` agent. A service such as
//!
//! ```text
//! dovecot unix - n n - - pipe
//!   flags=DRhu user=vmail:vmail argv=/usr/lib/dovecot/deliver -f ${sender} -d ${recipient}
//! ```
//!
//! gets the recipients qmgr resolves to transport `dovecot` (through
//! `transport_maps` or a `*_transport` parameter), at most
//! `dovecot_destination_recipient_limit` per request. The command runs
//! once per request, with the message on its standard input, as the
//! `user=` account: never as root (uid or gid 0) nor as `mail_owner`.
//!
//! Attributes (before `argv=`): `flags=` (`B D F O R X h q u . >`),
//! `user=name[:group]`, `size=` (larger messages bounce), `eol=` (line
//! end, `\n` by default; `\r\n` and other backslash escapes), `directory=`
//! (working directory, default `queue_directory`), `null_sender=` (what
//! `${sender}`, `From ` and `Return-Path:` say for `<>`, default
//! `MAILER-DAEMON`). `argv=` takes the rest of the line; an element in
//! `{ }` may hold spaces.
//!
//! Macros in argv: `$name`, `${name}`, `$(name)`, `${name?text}` (text
//! when not empty), `${name:text}` (text when empty), `$$`. Elements
//! that name a recipient macro (`recipient`, `original_recipient`,
//! `user`, `extension`, `mailbox`, `domain`) are repeated once per
//! recipient of the request. The envelope's `client_*` and `sasl_*`
//! values come from the queue file's attributes (smtpd records them).
//!
//! Outcome, as Postfix's: exit 0 delivered; a `<sysexits.h>` status per
//! its table (75, EX_TEMPFAIL, defers; the others bounce), or any other
//! status bounces, with the command's output in the reason (and so in
//! the notice); death by a signal defers; `TRANSPORT_time_limit`
//! (default `command_time_limit`) kills the command and bounces, as
//! Postfix does. A configuration error (bad `user=`, unknown macro)
//! defers every recipient with 4.3.5, logged as an error.
//!
//! The agent runs as root only to become `user=`: it reads nothing from
//! the network, only qmgr's requests and the queue file.

use crate::message::{from_line, Prefix};
use crate::pipe::Command;
use crate::status::Status;
use postern_common::delivery::Job;
use postern_common::ipc::{DeliveryRecipient, Outcome};
use postern_common::qfile::attr;
use postern_common::{error, privs, warning};
use postern_conf::Config;
use std::io::{self, BufRead, BufReader, Read};
use std::path::PathBuf;
use std::time::Duration;

/// The `flags=` letters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Flags {
    /// B: a blank line at the end of the message.
    pub blank: bool,
    /// D: `Delivered-To: recipient` first.
    pub delivered_to: bool,
    /// F: a `From sender date` line first.
    pub from_line: bool,
    /// O: `X-Original-To: original recipient` first.
    pub original_to: bool,
    /// R: `Return-Path: <sender>` first.
    pub return_path: bool,
    /// X: final delivery (accepted; the outcome is logged as delivered).
    pub final_delivery: bool,
    /// h: domains of addresses, `${domain}` and `${nexthop}` lower-cased.
    pub fold_host: bool,
    /// q: address local parts quoted as RFC 5322 needs.
    pub quote: bool,
    /// u: local parts (and `${user}`, `${extension}`, `${mailbox}`) lower-cased.
    pub fold_user: bool,
    /// `.`: lines that start with `.` get another.
    pub dot: bool,
    /// `>`: lines that start with `From ` get `>` before.
    pub quote_from: bool,
}

impl Flags {
    pub fn parse(s: &str) -> Result<Flags, String> {
        let mut f = Flags::default();
        for c in s.chars() {
            match c {
                'B' => f.blank = true,
                'D' => f.delivered_to = true,
                'F' => f.from_line = true,
                'O' => f.original_to = true,
                'R' => f.return_path = true,
                'X' => f.final_delivery = true,
                'h' => f.fold_host = true,
                'q' => f.quote = true,
                'u' => f.fold_user = true,
                '.' => f.dot = true,
                '>' => f.quote_from = true,
                other => return Err(format!("unknown flag \"{other}\" in flags={s}")),
            }
        }
        Ok(f)
    }
}

/// A pipe service's master.cf attributes.
#[derive(Debug, Clone)]
pub struct Settings {
    pub flags: Flags,
    pub uid: u32,
    pub gid: u32,
    pub argv: Vec<String>,
    pub size_limit: Option<u64>,
    pub eol: Vec<u8>,
    pub directory: Option<PathBuf>,
    pub null_sender: String,
}

/// `\r`, `\n`, `\t`, `\\` and `\ooo` (octal) in `eol=`.
fn unescape(s: &str) -> Vec<u8> {
    let b = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 1 < b.len() {
            i += 1;
            match b[i] {
                b'n' => out.push(b'\n'),
                b'r' => out.push(b'\r'),
                b't' => out.push(b'\t'),
                b'0'..=b'7' => {
                    let mut v: u32 = 0;
                    let mut n = 0;
                    while n < 3 && i < b.len() && (b'0'..=b'7').contains(&b[i]) {
                        v = v * 8 + (b[i] - b'0') as u32;
                        i += 1;
                        n += 1;
                    }
                    out.push(v as u8);
                    continue;
                }
                c => out.push(c),
            }
        } else {
            out.push(b[i]);
        }
        i += 1;
    }
    out
}

/// `{ text }` → `text`.
fn unbrace(s: &str) -> &str {
    match s.strip_prefix('{').and_then(|r| r.strip_suffix('}')) {
        Some(inner) => inner.trim(),
        None => s,
    }
}

impl Settings {
    /// Parses the arguments after the command name in master.cf.
    /// `mail_owner` is refused as `user=`, as is root.
    pub fn parse(args: &[String], mail_owner: Option<u32>) -> Result<Settings, String> {
        let mut flags = Flags::default();
        let mut user: Option<(u32, u32)> = None;
        let mut size_limit = None;
        let mut eol = b"\n".to_vec();
        let mut directory = None;
        let mut null_sender = "MAILER-DAEMON".to_string();
        let mut argv: Option<Vec<String>> = None;
        for a in args {
            if let Some(v) = &mut argv {
                v.push(unbrace(a).to_string());
                continue;
            }
            let a = unbrace(a);
            let Some((name, value)) = a.split_once('=') else {
                return Err(format!("bad attribute \"{a}\": expected name=value"));
            };
            match name {
                "flags" => flags = Flags::parse(value)?,
                "user" => {
                    user = Some(crate::pipe::command_user(value, mail_owner)?);
                }
                "size" => {
                    size_limit = Some(value.parse().map_err(|_| format!("bad size={value}"))?);
                }
                "eol" => eol = unescape(value),
                "directory" => directory = Some(PathBuf::from(value)),
                "null_sender" => null_sender = value.to_string(),
                "argv" => {
                    let mut v = Vec::new();
                    if !value.is_empty() {
                        v.push(value.to_string());
                    }
                    argv = Some(v);
                }
                other => return Err(format!("unknown attribute {other}=")),
            }
        }
        let argv = argv
            .filter(|v| !v.is_empty())
            .ok_or("missing argv= attribute")?;
        let (uid, gid) = user.ok_or("missing user= attribute")?;
        // Every macro must be known now, not at the first delivery.
        for a in &argv {
            expand(a, &|n: &str| known_macro(n).then(String::new))?;
        }
        Ok(Settings {
            flags,
            uid,
            gid,
            argv,
            size_limit,
            eol,
            directory,
            null_sender,
        })
    }
}

/// Macros that take one value per recipient.
const RECIPIENT_MACROS: &[&str] = &[
    "recipient",
    "original_recipient",
    "user",
    "extension",
    "mailbox",
    "domain",
];

/// Macros of the whole request.
const MESSAGE_MACROS: &[&str] = &[
    "sender",
    "nexthop",
    "size",
    "queue_id",
    "client_address",
    "client_hostname",
    "client_helo",
    "client_port",
    "client_protocol",
    "sasl_method",
    "sasl_username",
    "sasl_sender",
];

fn known_macro(n: &str) -> bool {
    RECIPIENT_MACROS.contains(&n) || MESSAGE_MACROS.contains(&n)
}

/// Expands `$name`, `${name}`, `$(name)`, `${name?text}`,
/// `${name:text}` and `$$` in `s`; `value` answers a name (None: not a
/// macro, an error).
pub fn expand(s: &str, value: &dyn Fn(&str) -> Option<String>) -> Result<String, String> {
    let mut out = String::new();
    let mut rest = s;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        rest = &rest[i + 1..];
        if let Some(r) = rest.strip_prefix('$') {
            out.push('$');
            rest = r;
            continue;
        }
        let close = match rest.chars().next() {
            Some('{') => Some('}'),
            Some('(') => Some(')'),
            _ => None,
        };
        let (inner, after) = match close {
            Some(c) => {
                let end = rest
                    .find(c)
                    .ok_or_else(|| format!("unbalanced macro in \"{s}\""))?;
                (&rest[1..end], &rest[end + 1..])
            }
            None => {
                let end = rest
                    .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                    .unwrap_or(rest.len());
                (&rest[..end], &rest[end..])
            }
        };
        let (name, cond) = match inner.find(['?', ':']) {
            Some(j) if close.is_some() => (&inner[..j], Some((&inner[j..j + 1], &inner[j + 1..]))),
            _ => (inner, None),
        };
        if name.is_empty() {
            return Err(format!("bad macro in \"{s}\""));
        }
        let v = value(name).ok_or_else(|| format!("unknown macro ${{{name}}} in \"{s}\""))?;
        match cond {
            None => out.push_str(&v),
            Some(("?", text)) if !v.is_empty() => out.push_str(&expand(text, value)?),
            Some((":", text)) if v.is_empty() => out.push_str(&expand(text, value)?),
            Some(_) => {}
        }
        rest = after;
    }
    out.push_str(rest);
    Ok(out)
}

/// Whether `s` names one of the recipient macros.
fn uses_recipient(s: &str) -> bool {
    let used = std::cell::Cell::new(false);
    let _ = expand(s, &|n: &str| {
        if RECIPIENT_MACROS.contains(&n) {
            used.set(true);
        }
        Some(String::new())
    });
    used.get()
}

/// The values of one request's macros.
struct Values {
    message: Vec<(&'static str, String)>,
    /// One set per recipient.
    recipients: Vec<Vec<(&'static str, String)>>,
}

impl Agent {
    fn address(&self, a: &str) -> String {
        let (local, domain) = match a.rfind('@') {
            Some(i) => (&a[..i], Some(&a[i + 1..])),
            None => (a, None),
        };
        let f = self.settings.as_ref().map(|s| s.flags).unwrap_or_default();
        let mut local = if f.fold_user {
            local.to_lowercase()
        } else {
            local.to_string()
        };
        if f.quote {
            local = postern_common::addr::quote_local_part(&local);
        }
        match domain {
            Some(d) if f.fold_host => format!("{local}@{}", d.to_lowercase()),
            Some(d) => format!("{local}@{d}"),
            None => local,
        }
    }

    fn values(&self, job: &Job, attrs: &[(String, String)]) -> Values {
        let f = self.settings.as_ref().map(|s| s.flags).unwrap_or_default();
        let null_sender = self
            .settings
            .as_ref()
            .map(|s| s.null_sender.clone())
            .unwrap_or_default();
        let get = |n: &str| {
            attrs
                .iter()
                .find(|(k, _)| k == n)
                .map(|(_, v)| v.clone())
                .unwrap_or_default()
        };
        // `client` is "hostname[address]".
        let client = get(attr::CLIENT);
        let (hostname, address) = match client.split_once('[') {
            Some((h, a)) => (h.to_string(), a.trim_end_matches(']').to_string()),
            None => (String::new(), String::new()),
        };
        let sender = if job.req.sender.is_empty() {
            null_sender
        } else {
            self.address(&job.req.sender)
        };
        let nexthop = if f.fold_host {
            job.req.nexthop.to_lowercase()
        } else {
            job.req.nexthop.clone()
        };
        let message = vec![
            ("sender", sender),
            ("nexthop", nexthop),
            ("size", job.req.content_size.to_string()),
            ("queue_id", job.req.queue_id.clone()),
            ("client_address", address),
            ("client_hostname", hostname),
            ("client_helo", get(attr::HELO)),
            ("client_port", get(attr::CLIENT_PORT)),
            ("client_protocol", get(attr::PROTOCOL)),
            ("sasl_method", get(attr::SASL_METHOD)),
            ("sasl_username", get(attr::SASL_USERNAME)),
            ("sasl_sender", get(attr::SASL_SENDER)),
        ];
        let recipients = job
            .req
            .recipients
            .iter()
            .map(|r| {
                let a = &r.rcpt.address;
                let (local, domain) = match a.rfind('@') {
                    Some(i) => (&a[..i], &a[i + 1..]),
                    None => (a.as_str(), ""),
                };
                let local = if f.fold_user {
                    local.to_lowercase()
                } else {
                    local.to_string()
                };
                let (user, extension) = match crate::resolve::extension_at(&local, &self.delimiter)
                {
                    Some(i) => (local[..i].to_string(), local[i + 1..].to_string()),
                    None => (local.clone(), String::new()),
                };
                vec![
                    ("recipient", self.address(a)),
                    (
                        "original_recipient",
                        self.address(r.rcpt.original_or_address()),
                    ),
                    ("user", user),
                    ("extension", extension),
                    ("mailbox", local.clone()),
                    (
                        "domain",
                        if f.fold_host {
                            domain.to_lowercase()
                        } else {
                            domain.to_string()
                        },
                    ),
                ]
            })
            .collect();
        Values {
            message,
            recipients,
        }
    }
}

/// The command's argument vector for one request.
fn command_argv(template: &[String], v: &Values) -> Result<Vec<String>, String> {
    fn lookup<'v>(
        v: &'v Values,
        rcpt: Option<&'v [(&'static str, String)]>,
    ) -> impl Fn(&str) -> Option<String> + 'v {
        move |n: &str| {
            v.message
                .iter()
                .chain(rcpt.into_iter().flatten())
                .find(|(k, _)| *k == n)
                .map(|(_, x)| x.clone())
                .or_else(|| RECIPIENT_MACROS.contains(&n).then(String::new))
        }
    }
    let mut out = Vec::new();
    for a in template {
        if uses_recipient(a) {
            for r in &v.recipients {
                out.push(expand(a, &lookup(v, Some(r)))?);
            }
        } else {
            out.push(expand(a, &lookup(v, None))?);
        }
    }
    Ok(out)
}

/// The message as the command reads it: LF line ends made `eol`,
/// `.` and `From ` lines quoted as the flags say, a blank line at the
/// end with `B`.
struct Transformed<R> {
    inner: R,
    flags: Flags,
    eol: Vec<u8>,
    out: Vec<u8>,
    pos: usize,
    line: Vec<u8>,
    last_blank: bool,
    done: bool,
}

impl<R: BufRead> Read for Transformed<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.pos == self.out.len() && !self.done {
            self.out.clear();
            self.pos = 0;
            while self.out.len() < 64 * 1024 {
                self.line.clear();
                let n = self.inner.read_until(b'\n', &mut self.line)?;
                if n == 0 {
                    if self.flags.blank && !self.last_blank {
                        self.out.extend_from_slice(&self.eol);
                    }
                    self.done = true;
                    break;
                }
                if self.line.last() == Some(&b'\n') {
                    self.line.pop();
                }
                if self.flags.dot && self.line.first() == Some(&b'.') {
                    self.out.push(b'.');
                }
                if self.flags.quote_from && self.line.starts_with(b"From ") {
                    self.out.push(b'>');
                }
                self.out.extend_from_slice(&self.line);
                self.out.extend_from_slice(&self.eol);
                self.last_blank = self.line.is_empty();
            }
        }
        let n = buf.len().min(self.out.len() - self.pos);
        buf[..n].copy_from_slice(&self.out[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

/// The pipe agent of one master.cf service.
pub struct Agent {
    /// The service name: the transport, and `relay=` in the log.
    service: String,
    settings: Result<Settings, String>,
    time_limit: Duration,
    delimiter: String,
    queue_directory: PathBuf,
}

impl Agent {
    pub fn new(cfg: &Config, service: &str, args: &[String]) -> Agent {
        let mail_owner = privs::user(&cfg.get("mail_owner")).map(|a| a.uid);
        let settings = Settings::parse(args, mail_owner);
        if let Err(e) = &settings {
            error!("service {service}: {e}; deferring its mail");
        }
        let limit_name = format!("{service}_time_limit");
        let limit = if cfg.raw(&limit_name).is_some() {
            cfg.get_time(&limit_name)
        } else {
            cfg.get_time("command_time_limit")
        };
        let time_limit = limit.unwrap_or_else(|e| {
            warning!("{e}; using 1000s");
            1000
        });
        Agent {
            service: service.to_string(),
            settings,
            time_limit: Duration::from_secs(time_limit.max(1)),
            delimiter: cfg.get("recipient_delimiter"),
            queue_directory: postern_common::service::queue_directory(cfg),
        }
    }

    pub fn deliver(&self, job: &mut Job) {
        let s = if job.is_probe() {
            // An address verification probe: the command is not run
            // (Postfix's pipe: "delivers to command: ARGV0").
            match &self.settings {
                Ok(st) => Status::sent(format!(
                    "delivers to command: {}",
                    st.argv.first().map(String::as_str).unwrap_or("")
                )),
                Err(e) => Status::defer("4.3.5", format!("mail system configuration error: {e}")),
            }
        } else {
            self.status(job)
        };
        for r in job.req.recipients.clone() {
            job.record_diagnosed(&r, s.outcome, &s.dsn, &self.service, &s.reason, s.diag_type);
        }
    }

    /// One command for the whole request, one outcome for every recipient.
    fn status(&self, job: &Job) -> Status {
        let settings = match &self.settings {
            Ok(s) => s,
            Err(e) => {
                return Status::defer("4.3.5", format!("mail system configuration error: {e}"))
            }
        };
        let f = settings.flags;
        let rcpts: &[DeliveryRecipient] = &job.req.recipients;
        if (f.delivered_to || f.original_to) && rcpts.len() > 1 {
            let flag = if f.delivered_to { 'D' } else { 'O' };
            error!(
                "service {}: flag {flag} requires {}_destination_recipient_limit = 1",
                self.service, self.service
            );
            return Status::defer("4.3.5", "mail system configuration error");
        }
        if let Some(limit) = settings.size_limit {
            if job.req.content_size > limit {
                return Status::bounce("5.2.3", "message too large");
            }
        }
        let attrs = match postern_common::qfile::read_envelope(&job.file) {
            Ok(env) => env.attrs,
            Err(e) => return Status::defer("4.3.0", format!("cannot read queue file: {e}")),
        };
        let values = self.values(job, &attrs);
        let argv = match command_argv(&settings.argv, &values) {
            Ok(a) => a,
            Err(e) => {
                return Status::defer("4.3.5", format!("mail system configuration error: {e}"))
            }
        };
        // The lines before the message, in Postfix's order.
        let sender = if job.req.sender.is_empty() {
            settings.null_sender.as_str()
        } else {
            job.req.sender.as_str()
        };
        let mut prefix = Vec::new();
        if f.from_line {
            prefix.extend_from_slice(from_line(sender, postern_common::queue::now().0).as_bytes());
        }
        let first = rcpts.first().map(|r| &r.rcpt);
        // Delivered-To is lower-cased, as Postfix writes it (loop checks
        // compare it so).
        let delivered = first.map(|r| r.address.to_lowercase());
        let headers = Prefix {
            sender,
            original: first
                .filter(|_| f.original_to)
                .map(|r| r.original_or_address()),
            delivered: delivered.as_deref().filter(|_| f.delivered_to),
        }
        .headers();
        if f.return_path {
            prefix.extend_from_slice(&headers);
        } else {
            // Only X-Original-To and Delivered-To.
            let text = String::from_utf8_lossy(&headers);
            for l in text.lines().filter(|l| !l.starts_with("Return-Path:")) {
                prefix.extend_from_slice(l.as_bytes());
                prefix.push(b'\n');
            }
        }
        // Header lines take the line end too.
        let prefix = if settings.eol == b"\n" {
            prefix
        } else {
            let mut p = Vec::new();
            for l in prefix.split(|&b| b == b'\n').filter(|l| !l.is_empty()) {
                p.extend_from_slice(l);
                p.extend_from_slice(&settings.eol);
            }
            p
        };
        let content = match job.content() {
            Ok(c) => c,
            Err(e) => return Status::io(&e, "cannot read queue file"),
        };
        let mut input = Transformed {
            inner: BufReader::with_capacity(64 * 1024, content),
            flags: f,
            eol: settings.eol.clone(),
            out: Vec::new(),
            pos: 0,
            line: Vec::new(),
            last_blank: false,
            done: false,
        };
        let mut env = vec![("PATH".to_string(), "/usr/bin:/bin".to_string())];
        for name in ["TZ", "LANG", "MAIL_CONFIG"] {
            if let Ok(v) = std::env::var(name) {
                env.push((name.into(), v));
            }
        }
        let shown = argv.join(" ");
        let dir = settings
            .directory
            .clone()
            .unwrap_or_else(|| self.queue_directory.clone());
        let c = Command {
            command: &shown,
            argv: Some(&argv),
            env,
            run_as: Some((settings.uid, settings.gid)),
            home: &dir,
            time_limit: self.time_limit,
        };
        let s = c.run(&prefix, &mut input);
        if s.outcome == Outcome::Sent {
            Status::sent(format!("delivered via {} service", self.service))
        } else {
            s
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(s: &str) -> Vec<String> {
        postern_conf::split_braced(s, false)
    }

    #[test]
    fn attributes() {
        let s = Settings::parse(
            &args("flags=DRhu. user=nobody size=100 eol=\\r\\n argv=/bin/x -f ${sender} { a b } $recipient"),
            None,
        )
        .unwrap();
        assert!(s.flags.delivered_to && s.flags.return_path && s.flags.dot && s.flags.fold_host);
        assert!(!s.flags.from_line);
        assert_eq!(s.eol, b"\r\n");
        assert_eq!(s.size_limit, Some(100));
        assert_eq!(
            s.argv,
            vec!["/bin/x", "-f", "${sender}", "a b", "$recipient"]
        );
        let e = Settings::parse(&args("user=root argv=/bin/true"), None).unwrap_err();
        assert!(e.contains("root"), "{e}");
        let nobody = privs::user("nobody").unwrap().uid;
        let e = Settings::parse(&args("user=nobody argv=/bin/true"), Some(nobody)).unwrap_err();
        assert!(e.contains("mail_owner"), "{e}");
        let e = Settings::parse(&args("user=nobody argv=/bin/x ${nosuch}"), None).unwrap_err();
        assert!(e.contains("unknown macro"), "{e}");
        assert!(Settings::parse(&args("user=nobody"), None).is_err());
        assert!(Settings::parse(&args("flags=Z user=nobody argv=/bin/true"), None).is_err());
    }

    #[test]
    fn macros() {
        let v = |n: &str| match n {
            "a" => Some("A".to_string()),
            "e" => Some(String::new()),
            _ => None,
        };
        assert_eq!(expand("x$a-${a}$(a)$$", &v).unwrap(), "xA-AA$");
        assert_eq!(
            expand("${a?yes}${e?no}${e:empty}${a:no}", &v).unwrap(),
            "yesempty"
        );
        assert!(expand("$zz", &v).is_err());
        assert!(uses_recipient("-d ${recipient}") && !uses_recipient("${sender}"));
        let vals = Values {
            message: vec![("sender", "s@h".into())],
            recipients: vec![
                vec![("recipient", "a@h".into()), ("user", "a".into())],
                vec![("recipient", "b@h".into()), ("user", "b".into())],
            ],
        };
        let t: Vec<String> = ["-f", "$sender", "--", "${recipient}"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        assert_eq!(
            command_argv(&t, &vals).unwrap(),
            vec!["-f", "s@h", "--", "a@h", "b@h"]
        );
    }

    #[test]
    fn transform() {
        let msg = b"Subject: x\n\n.dot\nFrom me\nlast";
        let mut t = Transformed {
            inner: &msg[..],
            flags: Flags::parse(".>B").unwrap(),
            eol: b"\r\n".to_vec(),
            out: Vec::new(),
            pos: 0,
            line: Vec::new(),
            last_blank: false,
            done: false,
        };
        let mut out = Vec::new();
        t.read_to_end(&mut out).unwrap();
        assert_eq!(
            out,
            b"Subject: x\r\n\r\n..dot\r\n>From me\r\nlast\r\n\r\n".to_vec()
        );
    }
}
