//! The accounting log (`accounting_log_file`, `accounting_log_format`):
//! one record per event, for tools that read KumoMTA's or PowerMTA's logs.
//!
//! Events and who writes them (the daemon that saw the event):
//!
//! | event | JSON `type` | CSV `type` | written by |
//! |---|---|---|---|
//! | a message queued (one record per recipient) | `Reception` | `r` | cleanup, when the file is durable (for smtpd, pickup, sendmail, notices and forwarded mail alike) |
//! | delivered | `Delivery` | `d` | the delivery agent (smtp, lmtp, local, virtual, pipe), [`crate::delivery::Job::record`] |
//! | deferred | `TransientFailure` | `t` | the delivery agent, or qmgr for what it defers itself |
//! | bounced | `Bounce` | `b` | the delivery agent, cleanup or qmgr |
//! | expired (`maximal_queue_lifetime`) | `Expiration` | `b` | qmgr |
//! | deleted by the administrator (`postsuper -d`) | `AdminBounce` | `b` | postsuper, or qmgr for an active message |
//! | held back without an attempt (a site's limits) | `Delayed` | `tq` | qmgr (the site model), through [`write`] |
//! | a site's mode changed (backoff, suspended, ...) | `SiteModeChange` | `m` | qmgr, through [`site_mode_change`] |
//!
//! JSON records are KumoMTA's log records, one object per line, with its
//! field names (`type`, `id`, `sender`, `recipient`, `queue`, `site`,
//! `size`, `response` {`code`, `enhanced_code` {`class`, `subject`,
//! `detail`}, `content`, `command`}, `peer_address` {`name`, `addr`},
//! `timestamp`, `created`, `num_attempts`, `bounce_classification`,
//! `egress_pool`, `egress_source`, `tls_cipher`, `tls_protocol_version`).
//! CSV records are PowerMTA's accounting file: a header line, then the
//! record type first, with PowerMTA's field names ([`CSV_FIELDS`]).
//!
//! Writing: the file is opened with `O_APPEND` and each record is ONE
//! `write(2)` of a whole line, so that many processes append without
//! ever tearing or interleaving a line (the kernel serializes appends to
//! a regular file). The file is created by master (as root, at start and
//! at `postern reload`) owned by `mail_owner`, mode 0640, so that the
//! unprivileged daemons can append; a process that finds the file
//! renamed away (logrotate) opens the new one, checked at most once a
//! second, and every daemon is restarted by `postern reload` anyway.
//! The CSV header is written by whoever creates the file (the one
//! `O_EXCL` create that succeeds).

use crate::bounce_class::Reply;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::sync::{Mutex, OnceLock};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

/// PowerMTA's accounting fields, in order (the CSV header line).
pub const CSV_FIELDS: &[&str] = &[
    "type",
    "timeLogged",
    "timeQueued",
    "orig",
    "rcpt",
    "orcpt",
    "dsnAction",
    "dsnStatus",
    "dsnDiag",
    "dsnMta",
    "bounceCat",
    "srcMta",
    "dlvSourceIp",
    "dlvDestinationIp",
    "dlvEsmtpAvailable",
    "dlvSize",
    "vmta",
    "jobId",
    "envId",
];

/// What happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Kind {
    #[default]
    Reception,
    Delivery,
    TransientFailure,
    Bounce,
    Expiration,
    AdminBounce,
    /// Held back without an attempt (a site's rate or connection limit,
    /// a suspension): for the site model in qmgr.
    Delayed,
    SiteModeChange,
}

impl Kind {
    /// KumoMTA's record type.
    pub fn json_name(self) -> &'static str {
        match self {
            Kind::Reception => "Reception",
            Kind::Delivery => "Delivery",
            Kind::TransientFailure => "TransientFailure",
            Kind::Bounce => "Bounce",
            Kind::Expiration => "Expiration",
            Kind::AdminBounce => "AdminBounce",
            Kind::Delayed => "Delayed",
            Kind::SiteModeChange => "SiteModeChange",
        }
    }

    /// PowerMTA's record type.
    pub fn csv_type(self) -> &'static str {
        match self {
            Kind::Reception => "r",
            Kind::Delivery => "d",
            Kind::TransientFailure => "t",
            Kind::Bounce | Kind::Expiration | Kind::AdminBounce => "b",
            Kind::Delayed => "tq",
            Kind::SiteModeChange => "m",
        }
    }

    /// The DSN action word (PowerMTA's `dsnAction`).
    fn dsn_action(self) -> &'static str {
        match self {
            Kind::Reception => "",
            Kind::Delivery => "relayed",
            Kind::TransientFailure | Kind::Delayed => "delayed",
            Kind::Bounce | Kind::Expiration | Kind::AdminBounce => "failed",
            Kind::SiteModeChange => "",
        }
    }
}

/// One record. Empty strings are written as `null` (JSON) or empty
/// fields (CSV).
#[derive(Debug, Clone, Default)]
pub struct Record {
    pub kind: Kind,
    /// The queue ID.
    pub id: String,
    pub sender: String,
    pub recipient: String,
    /// The original recipient (DSN ORCPT, or the address before aliasing).
    pub orcpt: String,
    /// The scheduled queue: the recipient's domain.
    pub queue: String,
    /// The site (the next hop's domain until sites are MX sets).
    pub site: String,
    pub size: u64,
    pub response: Option<Reply>,
    /// The server: its name and address ("host[addr]:port" split).
    pub peer_name: String,
    pub peer_addr: String,
    /// For a reception: the client ("name[addr]") or "local".
    pub source: String,
    /// Seconds since the epoch; now when 0.
    pub timestamp: u64,
    /// The message's arrival.
    pub created: u64,
    pub num_attempts: u32,
    pub bounce_classification: String,
    /// The transport (Postern's "virtual MTA").
    pub egress_pool: String,
    pub egress_source: String,
    /// The pool the transport was chosen from (`weighted:{...}`), and
    /// why this member ("chosen", "overflow: ..."): JSON only.
    pub pool: String,
    pub source_selection: String,
    pub tls_cipher: String,
    pub tls_protocol_version: String,
    pub env_id: String,
    /// ESMTP was offered by the server ("yes"/"no"/"").
    pub esmtp: String,
    /// A site mode change: the new mode, the rule that caused it, until when.
    pub mode: String,
    pub rule: String,
    pub until: u64,
}

/// The format of the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Json,
    Csv,
}

impl Format {
    pub fn parse(v: &str) -> Result<Format, String> {
        match v.trim().to_ascii_lowercase().as_str() {
            "json" | "" => Ok(Format::Json),
            "csv" => Ok(Format::Csv),
            other => Err(format!(
                "accounting_log_format: unknown format \"{other}\" (json or csv)"
            )),
        }
    }
}

struct Open {
    file: File,
    dev: u64,
    ino: u64,
    checked: Instant,
}

struct Writer {
    path: String,
    format: Format,
    owner: Option<(u32, u32)>,
    open: Mutex<Option<Open>>,
}

static WRITER: OnceLock<Option<Writer>> = OnceLock::new();

/// Reads `accounting_log_file` and `accounting_log_format` (once per
/// process). Called by every daemon's [`crate::service::start`] and by
/// the commands that write records (postsuper).
pub fn init(cfg: &postern_conf::Config) {
    let _ = WRITER.get_or_init(|| {
        let path = cfg.get("accounting_log_file");
        if path.trim().is_empty() {
            return None;
        }
        let format = match Format::parse(&cfg.get("accounting_log_format")) {
            Ok(f) => f,
            Err(e) => {
                crate::warning!("{e}; using json");
                Format::Json
            }
        };
        let owner = crate::privs::queue_owner(cfg)
            .ok()
            .flatten()
            .map(|o| (o.uid, o.gid));
        Some(Writer {
            path: path.trim().to_string(),
            format,
            owner,
            open: Mutex::new(None),
        })
    });
}

/// Whether records are written at all (to spare the work of making one).
pub fn enabled() -> bool {
    matches!(WRITER.get(), Some(Some(_)))
}

/// Creates the file when missing, owned by `mail_owner` (`owner`), mode
/// 0640, with the CSV header line for `csv`. master calls this as root
/// at start and at reload, so that the daemons, which run as
/// `mail_owner`, can append to it.
pub fn prepare(cfg: &postern_conf::Config, owner: Option<(u32, u32)>) -> Result<(), String> {
    let path = cfg.get("accounting_log_file");
    let path = path.trim();
    if path.is_empty() {
        return Ok(());
    }
    let format = Format::parse(&cfg.get("accounting_log_format"))?;
    create(path, format, owner)
        .map(|_| ())
        .map_err(|e| format!("accounting_log_file {path}: {e}"))
}

/// Opens `path` for appending; creates it (with the header, owner and
/// mode) when it does not exist.
fn create(path: &str, format: Format, owner: Option<(u32, u32)>) -> std::io::Result<File> {
    match OpenOptions::new()
        .append(true)
        .create_new(true)
        .mode(0o640)
        .open(path)
    {
        Ok(mut f) => {
            if crate::privs::is_root() {
                if let Some((uid, gid)) = owner {
                    let _ = std::os::unix::fs::fchown(&f, Some(uid), Some(gid));
                }
            }
            if format == Format::Csv {
                f.write_all(format!("{}\n", CSV_FIELDS.join(",")).as_bytes())?;
            }
            Ok(f)
        }
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            OpenOptions::new().append(true).open(path)
        }
        Err(e) => Err(e),
    }
}

impl Writer {
    fn opened(&self, slot: &mut Option<Open>) -> std::io::Result<()> {
        // A file renamed away (logrotate): open the one now at the path.
        if let Some(o) = slot.as_mut() {
            if o.checked.elapsed().as_secs() < 1 {
                return Ok(());
            }
            o.checked = Instant::now();
            match std::fs::metadata(&self.path) {
                Ok(m) if m.dev() == o.dev && m.ino() == o.ino => return Ok(()),
                _ => *slot = None,
            }
        }
        let file = create(&self.path, self.format, self.owner)?;
        let m = file.metadata()?;
        *slot = Some(Open {
            file,
            dev: m.dev(),
            ino: m.ino(),
            checked: Instant::now(),
        });
        Ok(())
    }

    fn write_line(&self, line: &str) {
        let mut slot = self.open.lock().unwrap_or_else(|e| e.into_inner());
        if let Err(e) = self.opened(&mut slot) {
            crate::warning!("accounting_log_file {}: {e}", self.path);
            return;
        }
        let Some(o) = slot.as_mut() else { return };
        if let Err(e) = write_once(&o.file, line.as_bytes()) {
            crate::warning!("accounting_log_file {}: {e}", self.path);
            *slot = None;
        }
    }
}

/// One `write(2)` of the whole line (`O_APPEND`: the kernel puts it at
/// the end in one piece). A short write (disk full) is reported, never
/// completed by a second write that another writer's line could precede.
pub fn write_once(f: &File, bytes: &[u8]) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    loop {
        // SAFETY: a valid descriptor and buffer for the length given.
        let n = unsafe { libc::write(f.as_raw_fd(), bytes.as_ptr().cast(), bytes.len()) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if n as usize != bytes.len() {
            return Err(std::io::Error::other(format!(
                "short write ({n} of {} bytes)",
                bytes.len()
            )));
        }
        return Ok(());
    }
}

/// Writes one record (when `accounting_log_file` is set).
pub fn write(rec: &Record) {
    let Some(Some(w)) = WRITER.get() else { return };
    let mut rec = rec.clone();
    if rec.timestamp == 0 {
        rec.timestamp = now();
    }
    let line = match w.format {
        Format::Json => json_line(&rec),
        Format::Csv => csv_line(&rec),
    };
    w.write_line(&line);
}

/// The API for the site model (qmgr): a site entered or left a mode —
/// `backoff`, `normal`, `suspended`, `resumed`, `bounce` — because of
/// `rule` (the matched reply rule, or the operator's command) and
/// `reply` (the reply that matched, "" for none); `until` is when a
/// suspension ends (seconds since the epoch, 0 for none).
pub fn site_mode_change(site: &str, mode: &str, rule: &str, reply: &str, until: u64) {
    let response = (!reply.is_empty())
        .then(|| crate::bounce_class::parse_reason("", &format!("host {site} said: {reply}")));
    write(&Record {
        kind: Kind::SiteModeChange,
        site: site.to_string(),
        queue: site.to_string(),
        mode: mode.to_string(),
        rule: rule.to_string(),
        until,
        response,
        ..Default::default()
    });
}

/// One record per recipient of a message, for the events that concern
/// a whole message: `Reception` (every recipient), `AdminBounce` (those
/// still pending). `reply` and `class` go into each record.
pub fn message_event(
    kind: Kind,
    id: &str,
    env: &crate::qfile::Envelope,
    reply: Option<&Reply>,
    class: &str,
) {
    if !enabled() {
        return;
    }
    for r in &env.recipients {
        if kind != Kind::Reception && r.done {
            continue;
        }
        write(&message_record(kind, id, env, &r.rcpt, reply, class));
    }
}

/// The record of one recipient of a message (`env` gives the sender,
/// size, arrival and client).
pub fn message_record(
    kind: Kind,
    id: &str,
    env: &crate::qfile::Envelope,
    rcpt: &crate::qfile::Recipient,
    reply: Option<&Reply>,
    class: &str,
) -> Record {
    Record {
        kind,
        id: id.to_string(),
        sender: env.sender.clone(),
        recipient: rcpt.address.clone(),
        orcpt: orcpt_of(rcpt),
        queue: domain_of(&rcpt.address),
        site: if kind == Kind::Reception {
            String::new()
        } else {
            domain_of(&rcpt.address)
        },
        size: env.content_size,
        response: reply.cloned(),
        source: if kind == Kind::Reception {
            env.attr("client")
                .filter(|c| !c.is_empty())
                .unwrap_or("local")
                .to_string()
        } else {
            String::new()
        },
        created: env.arrival_secs,
        bounce_classification: class.to_string(),
        env_id: env.attr("envid").unwrap_or("").to_string(),
        ..Default::default()
    }
}

/// The reply of an `AdminBounce` record (`postsuper -d`).
pub fn admin_delete_reply() -> Reply {
    Reply {
        code: 550,
        enhanced: "5.0.0".into(),
        content: "message deleted by the administrator (postsuper -d)".into(),
        command: String::new(),
        remote: false,
    }
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

pub use crate::json::string as json_str;

fn json_opt(s: &str) -> String {
    if s.is_empty() {
        "null".into()
    } else {
        json_str(s)
    }
}

fn enhanced_json(e: &str) -> String {
    let p: Vec<&str> = e.split('.').collect();
    if p.len() == 3 {
        if let (Ok(a), Ok(b), Ok(c)) = (
            p[0].parse::<u16>(),
            p[1].parse::<u16>(),
            p[2].parse::<u16>(),
        ) {
            return format!("{{\"class\":{a},\"subject\":{b},\"detail\":{c}}}");
        }
    }
    "null".into()
}

/// The record as KumoMTA's JSON log record (one line, with its newline).
pub fn json_line(r: &Record) -> String {
    let response = match &r.response {
        Some(x) => format!(
            "{{\"code\":{},\"enhanced_code\":{},\"content\":{},\"command\":{}}}",
            x.code,
            enhanced_json(&x.enhanced),
            json_str(&x.content),
            json_opt(&x.command)
        ),
        None => "{\"code\":250,\"enhanced_code\":null,\"content\":\"\",\"command\":null}".into(),
    };
    let peer = if r.peer_name.is_empty() && r.peer_addr.is_empty() {
        "null".to_string()
    } else {
        format!(
            "{{\"name\":{},\"addr\":{}}}",
            json_str(&r.peer_name),
            json_str(&r.peer_addr)
        )
    };
    let mut s = format!(
        "{{\"type\":{},\"id\":{},\"sender\":{},\"recipient\":{},\"queue\":{},\"site\":{},\"size\":{},\"response\":{},\"peer_address\":{},\"timestamp\":{},\"created\":{},\"num_attempts\":{},\"bounce_classification\":{},\"egress_pool\":{},\"egress_source\":{},\"tls_cipher\":{},\"tls_protocol_version\":{}",
        json_str(r.kind.json_name()),
        json_str(&r.id),
        json_str(&r.sender),
        json_str(&r.recipient),
        json_str(&r.queue),
        json_str(&r.site),
        r.size,
        response,
        peer,
        r.timestamp,
        r.created,
        r.num_attempts,
        json_str(if r.bounce_classification.is_empty() {
            "Uncategorized"
        } else {
            &r.bounce_classification
        }),
        json_opt(&r.egress_pool),
        json_opt(&r.egress_source),
        json_opt(&r.tls_cipher),
        json_opt(&r.tls_protocol_version),
    );
    if !r.source.is_empty() {
        s.push_str(&format!(
            ",\"reception_protocol\":\"ESMTP\",\"source\":{}",
            json_str(&r.source)
        ));
    }
    if !r.orcpt.is_empty() {
        s.push_str(&format!(",\"orcpt\":{}", json_str(&r.orcpt)));
    }
    if !r.pool.is_empty() || !r.source_selection.is_empty() {
        s.push_str(&format!(
            ",\"pool\":{},\"source_selection\":{}",
            json_opt(&r.pool),
            json_opt(&r.source_selection)
        ));
    }
    if r.kind == Kind::SiteModeChange {
        s.push_str(&format!(
            ",\"mode\":{},\"rule\":{},\"until\":{}",
            json_str(&r.mode),
            json_str(&r.rule),
            if r.until == 0 {
                "null".to_string()
            } else {
                r.until.to_string()
            }
        ));
    }
    s.push_str("}\n");
    s
}

/// A CSV field (RFC 4180): quoted when it holds a comma, quote or line end.
fn csv_field(s: &str) -> String {
    let s = s.replace(['\n', '\r'], " ");
    if s.contains([',', '"']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s
    }
}

/// PowerMTA's time format for `timeLogged`/`timeQueued`:
/// "2026-12-06 21:15:59+0000".
fn csv_time(t: u64) -> String {
    if t == 0 {
        return String::new();
    }
    // SAFETY: gmtime_r with valid pointers.
    let tm = unsafe {
        let tt = t as libc::time_t;
        let mut tm: libc::tm = std::mem::zeroed();
        libc::gmtime_r(&tt, &mut tm);
        tm
    };
    format!(
        "{:04}-{:02}-{:02} {:02}:{:02}:{:02}+0000",
        tm.tm_year + 1900,
        tm.tm_mon + 1,
        tm.tm_mday,
        tm.tm_hour,
        tm.tm_min,
        tm.tm_sec
    )
}

/// The record as a PowerMTA accounting line (with its newline).
pub fn csv_line(r: &Record) -> String {
    let (status, diag) = match &r.response {
        Some(x) => (
            x.enhanced.clone(),
            if x.remote {
                format!("smtp;{} {} {}", x.code, x.enhanced, x.content)
            } else {
                format!("x-postern;{}", x.content)
            },
        ),
        None if r.kind == Kind::Delivery => ("2.0.0".into(), String::new()),
        None => (String::new(), String::new()),
    };
    let (action, dsn_mta, src_mta) = if r.kind == Kind::SiteModeChange {
        (r.mode.clone(), r.site.clone(), r.rule.clone())
    } else {
        (
            r.kind.dsn_action().to_string(),
            if r.peer_name.is_empty() {
                String::new()
            } else {
                format!("{} ({})", r.peer_name, r.peer_addr)
            },
            r.source.clone(),
        )
    };
    let fields = [
        r.kind.csv_type().to_string(),
        csv_time(r.timestamp),
        csv_time(r.created),
        r.sender.clone(),
        r.recipient.clone(),
        r.orcpt.clone(),
        action,
        status,
        diag,
        dsn_mta,
        r.bounce_classification.clone(),
        src_mta,
        r.egress_source.clone(),
        r.peer_addr.clone(),
        r.esmtp.clone(),
        if r.size > 0 {
            r.size.to_string()
        } else {
            String::new()
        },
        r.egress_pool.clone(),
        r.site.clone(),
        r.env_id.clone(),
    ];
    let line: Vec<String> = fields.iter().map(|f| csv_field(f)).collect();
    let mut s = line.join(",");
    s.push('\n');
    s
}

/// Splits Postfix's `relay=` value "host[addr]:port" into name and
/// address ("none", "local": the name alone).
pub fn split_relay(relay: &str) -> (String, String) {
    match relay.find('[') {
        Some(open) => {
            let name = relay[..open].to_string();
            let rest = &relay[open + 1..];
            let addr = rest.split(']').next().unwrap_or("").to_string();
            (name, addr)
        }
        None => (relay.to_string(), String::new()),
    }
}

/// The original recipient of a record: the DSN ORCPT as given
/// ("rfc822;user@example"), else the address before rewriting and
/// aliasing.
pub fn orcpt_of(rcpt: &crate::qfile::Recipient) -> String {
    if rcpt.orcpt.is_empty() {
        rcpt.original_or_address().to_string()
    } else {
        rcpt.orcpt.clone()
    }
}

/// The domain of an address ("" for none).
pub fn domain_of(addr: &str) -> String {
    addr.rsplit_once('@')
        .map(|(_, d)| d.to_ascii_lowercase())
        .unwrap_or_default()
}

/// The site of a next hop for now: its domain ("[host]:port" → host).
/// The site model (MX sets) refines this.
pub fn site_of_nexthop(nexthop: &str) -> String {
    let h = nexthop.trim();
    let h = h
        .strip_prefix('[')
        .map(|r| r.split(']').next().unwrap_or(r))
        .unwrap_or_else(|| {
            // "host:port" (a port after the only colon; IPv6 is bracketed)
            match h.rsplit_once(':') {
                Some((host, port))
                    if port.bytes().all(|b| b.is_ascii_digit()) && !host.contains(':') =>
                {
                    host
                }
                _ => h,
            }
        });
    h.to_ascii_lowercase()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn failure() -> Record {
        Record {
            kind: Kind::Bounce,
            id: "67890ABCDE1234".into(),
            sender: "s@a.test".into(),
            recipient: "r@b.test".into(),
            queue: "b.test".into(),
            site: "b.test".into(),
            size: 1234,
            response: Some(crate::bounce_class::parse_reason(
                "5.1.1",
                "host mx.b.test[127.0.0.1] said: 550 5.1.1 \"no\", such user (in reply to RCPT TO command)",
            )),
            peer_name: "mx.b.test".into(),
            peer_addr: "127.0.0.1".into(),
            timestamp: 1_800_000_000,
            created: 1_799_999_000,
            num_attempts: 1,
            bounce_classification: "bad-mailbox".into(),
            egress_pool: "smtp".into(),
            ..Default::default()
        }
    }

    #[test]
    fn json_has_kumomta_fields() {
        let l = json_line(&failure());
        assert!(l.ends_with("}\n") && !l[..l.len() - 1].contains('\n'));
        assert!(l.contains("\"type\":\"Bounce\""));
        assert!(l.contains("\"enhanced_code\":{\"class\":5,\"subject\":1,\"detail\":1}"));
        assert!(l.contains("\"content\":\"\\\"no\\\", such user\""));
        assert!(l.contains("\"command\":\"RCPT TO\""));
        assert!(l.contains("\"bounce_classification\":\"bad-mailbox\""));
        assert!(l.contains("\"peer_address\":{\"name\":\"mx.b.test\",\"addr\":\"127.0.0.1\"}"));
    }

    #[test]
    fn csv_quotes_and_orders_fields() {
        let l = csv_line(&failure());
        assert!(l.starts_with("b,2027-01-15 08:00:00+0000,"), "{l}");
        assert!(l.contains(",s@a.test,r@b.test,,failed,5.1.1,\"smtp;550 5.1.1 \"\"no\"\", such user\",mx.b.test (127.0.0.1),bad-mailbox,"), "{l}");
        assert_eq!(CSV_FIELDS.len(), 19);
    }

    /// 20 writers, each with its own open file description (as 20
    /// processes have), append 100 lines of 48 KiB each at once: every
    /// line comes out whole, none cut by another.
    #[test]
    fn twenty_writers_never_tear_a_line() {
        let dir = std::env::temp_dir().join(format!("postern-acct-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("acct.log");
        let _ = std::fs::remove_file(&path);
        let (writers, lines, len) = (20usize, 100usize, 48 * 1024);
        let threads: Vec<_> = (0..writers)
            .map(|w| {
                let path = path.clone();
                std::thread::spawn(move || {
                    let f = create(path.to_str().unwrap(), Format::Json, None).unwrap();
                    let c = b'a' + w as u8;
                    for i in 0..lines {
                        let mut line = format!("{w:02} {i:04} ").into_bytes();
                        line.resize(len - 1, c);
                        line.push(b'\n');
                        write_once(&f, &line).unwrap();
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let text = std::fs::read(&path).unwrap();
        let _ = std::fs::remove_dir_all(&dir);
        let got: Vec<&[u8]> = text
            .split(|b| *b == b'\n')
            .filter(|l| !l.is_empty())
            .collect();
        assert_eq!(got.len(), writers * lines);
        let mut seen = std::collections::HashSet::new();
        for l in got {
            assert_eq!(l.len(), len - 1);
            let w: usize = std::str::from_utf8(&l[..2]).unwrap().parse().unwrap();
            let c = b'a' + w as u8;
            assert!(
                l[8..].iter().all(|b| *b == c),
                "a torn line from writer {w}"
            );
            assert!(seen.insert(l[..7].to_vec()), "a line twice");
        }
    }

    #[test]
    fn site_mode_changes() {
        let r = Record {
            kind: Kind::SiteModeChange,
            site: "gmail.com".into(),
            queue: "gmail.com".into(),
            mode: "suspended".into(),
            rule: "/TS04/ suspend=2h".into(),
            until: 1_800_007_200,
            timestamp: 1_800_000_000,
            response: Some(crate::bounce_class::parse_reason(
                "",
                "host gmail.com said: 421 4.7.0 [TS04] Messages temporarily deferred",
            )),
            ..Default::default()
        };
        let j = json_line(&r);
        assert!(j.contains("\"type\":\"SiteModeChange\""), "{j}");
        assert!(
            j.contains(
                "\"mode\":\"suspended\",\"rule\":\"/TS04/ suspend=2h\",\"until\":1800007200"
            ),
            "{j}"
        );
        assert!(j.contains("\"code\":421"), "{j}");
        let c = csv_line(&r);
        assert!(c.starts_with("m,2027-01-15 08:00:00+0000,,,,,suspended,4.7.0,smtp;421 4.7.0 [TS04] Messages temporarily deferred,gmail.com,,/TS04/ suspend=2h,"), "{c}");
        assert_eq!(Kind::Delayed.csv_type(), "tq");
    }

    #[test]
    fn sites_and_relays() {
        assert_eq!(site_of_nexthop("[127.0.0.1]:2525"), "127.0.0.1");
        assert_eq!(site_of_nexthop("Example.COM"), "example.com");
        assert_eq!(site_of_nexthop("mx.example.com:25"), "mx.example.com");
        assert_eq!(
            split_relay("mx.b.test[127.0.0.1]:25"),
            ("mx.b.test".into(), "127.0.0.1".into())
        );
        assert_eq!(split_relay("none"), ("none".into(), String::new()));
    }
}
