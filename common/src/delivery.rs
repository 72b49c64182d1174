//! The delivery agents' side of a delivery request: opening the queue
//! file, reading the content, and recording each recipient's outcome.
//!
//! Recording an outcome does three things, in this order, before the
//! agent answers qmgr: the delivery line is logged (`to=<...>, relay=...,
//! delay=..., delays=a/b/c/d, dsn=..., status=...`), the reason is
//! appended to the message's `defer/` or `bounce/` log (fsync'd), and a
//! sent or bounced recipient is marked done in the queue file. A qmgr
//! that dies meanwhile thus never causes a second delivery to a recipient
//! that was recorded.

use crate::ipc::{DeliveryRecipient, DeliveryReply, DeliveryRequest, Outcome, RecipientResult};
use crate::qfile::{self, ContentReader, Recipient};
use crate::queue::{MessageLog, Queue, QueueTree};
use crate::{info, warning};
use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::time::Instant;

/// One delivery request being worked on.
pub struct Job {
    pub req: DeliveryRequest,
    pub file: File,
    tree: QueueTree,
    started: Instant,
    connected: Option<Instant>,
    results: Vec<RecipientResult>,
    destination_failed: bool,
    /// The next hop announced DSN and was handed the recipients' NOTIFY:
    /// it sends the success notices itself, so a success is not noted in
    /// the success log for a "relayed" notice (Postfix's smtp_rcpt_done).
    /// Set by the SMTP/LMTP client for the transaction under way.
    pub dsn_passed_on: bool,
    /// For the accounting log: the local address the delivery came from,
    /// and the TLS cipher and protocol of the session (set by the agent).
    pub egress_source: String,
    pub tls_cipher: String,
    pub tls_protocol_version: String,
    /// For the next [`Job::record`] only, set by the caller: the bounce
    /// class instead of `bounce_classifier_maps`' (a reply rule's
    /// `class=NAME`, [`crate::delivery_policy::adjust_outcome`]); it goes
    /// into the bounce/defer log entry (the DSN, `postqueue -j`), the
    /// logged `bounce_class=` and the accounting record.
    pub reply_class: Option<String>,
    /// For every record of this job: the accounting record type instead
    /// of the outcome's (qmgr: `AdminBounce` for mail `postern bounce`
    /// or a `bounce=` rule fails, `Delayed` for mail held back without an
    /// attempt).
    pub account_kind: Option<crate::accounting::Kind>,
    /// The queue file's envelope, read once for the job's questions about
    /// the message's attributes ([`Job::envelope`]).
    envelope: std::cell::OnceCell<Option<qfile::Envelope>>,
}

impl Job {
    /// Opens the request's queue file for reading and for marking
    /// recipients done.
    pub fn open(tree: &QueueTree, req: DeliveryRequest) -> io::Result<Job> {
        let q = Queue::from_name(&req.queue)
            .filter(|q| matches!(q, Queue::Active))
            .ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("bad queue {}", req.queue),
                )
            })?;
        if !crate::queue::is_queue_id(&req.queue_id) {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "bad queue id"));
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(tree.path(q, &req.queue_id))?;
        // Held (shared) while the job lives: a qmgr restarted meanwhile
        // sees it (its exclusive try-lock fails) and does not hand the
        // message out a second time while this delivery is under way.
        let _ = file.lock_shared();
        Ok(Job {
            req,
            file,
            tree: tree.clone(),
            started: Instant::now(),
            connected: None,
            results: Vec::new(),
            destination_failed: false,
            dsn_passed_on: false,
            egress_source: String::new(),
            tls_cipher: String::new(),
            tls_protocol_version: String::new(),
            reply_class: None,
            account_kind: None,
            envelope: std::cell::OnceCell::new(),
        })
    }

    /// The message's envelope (None: the file cannot be read as one),
    /// read from the queue file the first time it is asked for. For its
    /// attributes: the recipients' done marks in it are those of that
    /// moment. The SMTP client asks several times per message (REQUIRETLS,
    /// SMTPUTF8, DSN, XFORWARD), and each reading of the file cost a
    /// `stat`, a `pread`, a seek and a read.
    pub fn envelope(&self) -> Option<&qfile::Envelope> {
        self.envelope
            .get_or_init(|| qfile::read_envelope(&self.file).ok())
            .as_ref()
    }

    /// The message content, streamed from the queue file.
    pub fn content(&self) -> io::Result<ContentReader<'_>> {
        ContentReader::sized(&self.file, self.req.content_offset, self.req.content_size)
    }

    /// Notes that the connection to the next hop is set up (for `delays=`).
    pub fn connected(&mut self) {
        self.connected = Some(Instant::now());
    }

    /// Notes that the destination could not be reached at all.
    pub fn destination_failed(&mut self) {
        self.destination_failed = true;
    }

    /// Recipients that have no outcome yet.
    pub fn unfinished(&self) -> Vec<DeliveryRecipient> {
        self.req
            .recipients
            .iter()
            .filter(|r| !self.results.iter().any(|x| x.offset == r.offset))
            .cloned()
            .collect()
    }

    /// Records one recipient's outcome (see the module doc). `relay` is
    /// Postfix's `relay=` field: "host[addr]:port", "local", "none".
    pub fn record(
        &mut self,
        r: &DeliveryRecipient,
        outcome: Outcome,
        dsn: &str,
        relay: &str,
        reason: &str,
    ) {
        self.record_diagnosed(r, outcome, dsn, relay, reason, "");
    }

    /// [`Job::record`], with the kind of diagnostic the reason is
    /// ([`LogEntry::diag_type`]: `x-unix` for a command's exit status).
    pub fn record_diagnosed(
        &mut self,
        r: &DeliveryRecipient,
        outcome: Outcome,
        dsn: &str,
        relay: &str,
        reason: &str,
        diag_type: &str,
    ) {
        if self.results.iter().any(|x| x.offset == r.offset) {
            return;
        }
        let orig = if r.rcpt.original.is_empty() {
            &r.rcpt.address
        } else {
            &r.rcpt.original
        };
        self.log_delivery(&r.rcpt.address, orig, outcome, dsn, relay, reason);
        self.record_logged_diagnosed(r, outcome, dsn, relay, reason, diag_type);
    }

    /// The delivery line of one address, as Postfix's: `to=<address>`,
    /// and `orig_to=<orig>` when the address came from another (an
    /// alias or `.forward` member names the alias it expanded).
    pub fn log_delivery(
        &self,
        address: &str,
        orig: &str,
        outcome: Outcome,
        dsn: &str,
        relay: &str,
        reason: &str,
    ) {
        let now = Instant::now();
        let arrival = std::time::UNIX_EPOCH
            + std::time::Duration::new(self.req.arrival_secs, self.req.arrival_usecs * 1000);
        let delay = std::time::SystemTime::now()
            .duration_since(arrival)
            .unwrap_or_default()
            .as_secs_f64();
        let conn = self.connected.unwrap_or(now);
        let c = conn.duration_since(self.started).as_secs_f64();
        let d = now.duration_since(conn).as_secs_f64();
        let orig = if orig.is_empty() || orig == address {
            String::new()
        } else {
            format!(" orig_to=<{orig}>,")
        };
        info!(
            "{}: to=<{}>,{} relay={}, delay={}, delays={}/{}/{}/{}, dsn={}, status={} ({})",
            self.req.queue_id,
            address,
            orig,
            relay,
            fmt_delay(delay),
            fmt_delay(self.req.queue_wait),
            fmt_delay(0.0),
            fmt_delay(c),
            fmt_delay(d),
            dsn,
            if self.is_probe() {
                probe_word(outcome)
            } else {
                outcome.word()
            },
            reason
        );
    }

    /// The request is an address verification probe
    /// ([`DeliveryRequest::VERIFY`]).
    pub fn is_probe(&self) -> bool {
        self.req.flags & DeliveryRequest::VERIFY != 0
    }

    /// A probe's outcome goes to the verify service (the original address
    /// and, when aliasing changed it, the address too, as Postfix's
    /// `verify_append`), never to a defer or bounce log; the recipient is
    /// then done whatever the outcome, so the probe leaves the queue. When
    /// the service cannot take it the recipient is deferred (not done).
    fn record_probe(&mut self, r: &DeliveryRecipient, outcome: Outcome, dsn: &str, reason: &str) {
        let status = match outcome {
            Outcome::Sent => crate::verify::Status::Ok,
            Outcome::Deferred => crate::verify::Status::Defer,
            Outcome::Bounced => crate::verify::Status::Bounce,
        };
        let socket = self.tree.socket(true, crate::verify::SOCKET);
        let timeout = std::time::Duration::from_secs(30);
        let mut addrs = vec![r.rcpt.original_or_address().to_string()];
        if !r.rcpt.address.eq_ignore_ascii_case(&addrs[0]) {
            addrs.push(r.rcpt.address.clone());
        }
        let mut ok = true;
        for a in &addrs {
            if let Err(e) = crate::verify::update(&socket, a, status, reason, timeout) {
                warning!("{}: verify service failure: {e}", self.req.queue_id);
                ok = false;
                break;
            }
        }
        let outcome = if ok {
            match qfile::mark_done(&self.file, r.offset) {
                Ok(()) => Outcome::Sent,
                Err(e) => {
                    warning!("{}: mark recipient done: {e}", self.req.queue_id);
                    Outcome::Deferred
                }
            }
        } else {
            Outcome::Deferred
        };
        self.results.push(RecipientResult {
            offset: r.offset,
            outcome,
            dsn: dsn.to_string(),
            reason: reason.to_string(),
        });
    }

    /// Records one recipient's outcome whose delivery lines were logged
    /// already (one per alias member, by [`Job::log_delivery`]): the
    /// message logs, the done mark and the reply, without a line of its
    /// own, as Postfix's local does for an expanded alias.
    pub fn record_logged(
        &mut self,
        r: &DeliveryRecipient,
        outcome: Outcome,
        dsn: &str,
        relay: &str,
        reason: &str,
    ) {
        self.record_logged_diagnosed(r, outcome, dsn, relay, reason, "");
    }

    /// [`Job::record_logged`], with the kind of diagnostic the reason is.
    pub fn record_logged_diagnosed(
        &mut self,
        r: &DeliveryRecipient,
        outcome: Outcome,
        dsn: &str,
        relay: &str,
        reason: &str,
        diag_type: &str,
    ) {
        let reply_class = self.reply_class.take();
        if self.results.iter().any(|x| x.offset == r.offset) {
            return;
        }
        if self.is_probe() {
            self.record_probe(r, outcome, dsn, reason);
            return;
        }
        let log = match outcome {
            Outcome::Sent => None,
            Outcome::Deferred => Some(MessageLog::Defer),
            Outcome::Bounced => Some(MessageLog::Bounce),
        };
        let mut ok = true;
        let mut class = String::new();
        if let Some(log) = log {
            let action = if outcome == Outcome::Bounced {
                "failed"
            } else {
                "delayed"
            };
            let mut entry = LogEntry::new(r.offset, &r.rcpt, dsn, action, relay, reason);
            entry.diag_type = diag_type.to_string();
            if let Some(c) = reply_class.filter(|c| !c.is_empty()) {
                entry.class = c;
            }
            class = entry.class.clone();
            log_class(&self.req.queue_id, &r.rcpt.address, dsn, &class);
            if let Err(e) = append_log(&self.tree, log, &self.req.queue_id, &entry) {
                warning!("{}: append {} log: {e}", self.req.queue_id, log.name());
                ok = false;
            }
        }
        if crate::accounting::enabled() {
            self.account(r, outcome, dsn, relay, reason, &class);
        }
        if outcome == Outcome::Sent
            && r.rcpt.notify & qfile::NOTIFY_SUCCESS != 0
            && !self.dsn_passed_on
        {
            record_success(&self.tree, &self.req.queue_id, r, dsn, relay, reason);
        }
        let outcome = if outcome != Outcome::Deferred && ok {
            match qfile::mark_done(&self.file, r.offset) {
                Ok(()) => outcome,
                Err(e) => {
                    warning!("{}: mark recipient done: {e}", self.req.queue_id);
                    // Not recorded as done: qmgr will offer it again, which
                    // may deliver twice but never loses it.
                    outcome
                }
            }
        } else if !ok && outcome == Outcome::Bounced {
            // Without a bounce log entry no notice could be sent: retry.
            Outcome::Deferred
        } else {
            outcome
        };
        self.results.push(RecipientResult {
            offset: r.offset,
            outcome,
            dsn: dsn.to_string(),
            reason: reason.to_string(),
        });
    }

    /// Writes the accounting record of one recipient's outcome
    /// ([`crate::accounting`]): `Delivery`, `TransientFailure` or `Bounce`.
    fn account(
        &self,
        r: &DeliveryRecipient,
        outcome: Outcome,
        dsn: &str,
        relay: &str,
        reason: &str,
        class: &str,
    ) {
        use crate::accounting::{self, Kind, Record};
        let (peer_name, peer_addr) = accounting::split_relay(relay);
        let attempts = attempts_of(&self.tree, &self.req.queue_id, r.offset);
        let kind = match (outcome, self.account_kind) {
            (Outcome::Sent, _) => Kind::Delivery,
            (_, Some(k)) => k,
            (Outcome::Deferred, None) => Kind::TransientFailure,
            (Outcome::Bounced, None) => Kind::Bounce,
        };
        // The site: the name qmgr gave it (delivery_policy_maps), else the
        // next hop's domain, else (qmgr's own records) the recipient's.
        let site = match &self.req.site {
            Some(s) if !s.name.is_empty() => s.name.clone(),
            _ => match accounting::site_of_nexthop(&self.req.nexthop) {
                s if s.is_empty() || s == "none" => accounting::domain_of(&r.rcpt.address),
                s => s,
            },
        };
        let response = crate::bounce_class::parse_reason(dsn, reason);
        accounting::write(&Record {
            kind,
            id: self.req.queue_id.clone(),
            sender: self.req.sender.clone(),
            recipient: r.rcpt.address.clone(),
            orcpt: accounting::orcpt_of(&r.rcpt),
            queue: accounting::domain_of(&r.rcpt.address),
            site,
            size: self.req.content_size,
            response: Some(response),
            peer_name,
            peer_addr,
            created: self.req.arrival_secs,
            // This attempt and the deferrals before it, in this round
            // and the earlier ones (their count carried over in the
            // defer log: `carry_attempts`). A deferral of this attempt
            // is in the log already.
            num_attempts: if outcome == Outcome::Deferred {
                attempts.max(1)
            } else {
                attempts + 1
            },
            bounce_classification: class.to_string(),
            egress_pool: self.req.transport.clone(),
            egress_source: self.egress_source.clone(),
            pool: self.req.pool.clone(),
            source_selection: self.req.selection.clone(),
            tls_cipher: self.tls_cipher.clone(),
            tls_protocol_version: self.tls_protocol_version.clone(),
            ..Default::default()
        });
    }

    /// Takes an outcome that another agent already recorded (local hands a
    /// recipient to its `mailbox_transport`, whose agent logs it and marks
    /// it done): counted in the reply, not recorded again.
    pub fn adopt(&mut self, result: RecipientResult) {
        if !self.results.iter().any(|x| x.offset == result.offset) {
            self.results.push(result);
        }
    }

    /// Records the same outcome for every recipient not yet recorded.
    /// [`Job::reply_class`] holds for each of them.
    pub fn record_rest(&mut self, outcome: Outcome, dsn: &str, relay: &str, reason: &str) {
        let class = self.reply_class.take();
        for r in self.unfinished() {
            self.reply_class = class.clone();
            self.record(&r, outcome, dsn, relay, reason);
        }
        self.reply_class = None;
    }

    /// The reply for qmgr. Recipients without an outcome are deferred.
    pub fn finish(mut self) -> DeliveryReply {
        self.record_rest(Outcome::Deferred, "4.3.0", "none", "delivery incomplete");
        DeliveryReply {
            results: self.results,
            destination_failed: self.destination_failed,
            serves_more: false,
        }
    }
}

/// The `status=` word of a probe's delivery line (Postfix's
/// `verify_append`: "deliverable", else "undeliverable").
pub fn probe_word(outcome: Outcome) -> &'static str {
    match outcome {
        Outcome::Sent => "deliverable",
        _ => "undeliverable",
    }
}

/// Notes a delivered recipient that asked for a success notice (DSN
/// NOTIFY=SUCCESS) in the message's success log (`trace/ID`), from which
/// qmgr sends the "delivered" notice. A failure here is logged and does
/// not undo the delivery (no notice rather than a second delivery).
fn record_success(
    tree: &QueueTree,
    id: &str,
    r: &DeliveryRecipient,
    dsn: &str,
    relay: &str,
    reason: &str,
) {
    let entry = LogEntry::new(r.offset, &r.rcpt, dsn, "delivered", relay, reason);
    if let Err(e) = append_log(tree, MessageLog::Success, id, &entry) {
        warning!("{id}: append {} log: {e}", MessageLog::Success.name());
    }
}

/// Postfix prints delays with two decimals below 10 s, as a whole number above.
pub fn fmt_delay(s: f64) -> String {
    if s < 0.005 {
        "0".into()
    } else if s < 10.0 {
        format!("{s:.2}")
    } else {
        format!("{s:.0}")
    }
}

/// One recipient's entry in a message's defer or bounce log.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LogEntry {
    pub recipient: String,
    pub original: String,
    pub orcpt: String,
    pub notify: u8,
    pub offset: u64,
    /// Enhanced status code.
    pub status: String,
    /// "failed", "delayed", "delivered".
    pub action: String,
    pub relay: String,
    pub reason: String,
    /// What kind of diagnostic the reason is, as the DSN's
    /// `Diagnostic-Code` type: `x-unix` for the exit status of a command
    /// (pipe(8), `mailbox_command`, a `|command` alias), which is that
    /// message's delivery problem and never a problem of the mail system
    /// (`notify_classes`); "" for Postern's own text or a server's reply.
    pub diag_type: String,
    /// The failure's bounce class ([`crate::bounce_class`]) for a
    /// "failed" or "delayed" entry; "" otherwise.
    pub class: String,
}

impl LogEntry {
    /// The entry for the recipient whose record is at `offset`.
    pub fn new(
        offset: u64,
        rcpt: &Recipient,
        status: &str,
        action: &str,
        relay: &str,
        reason: &str,
    ) -> LogEntry {
        LogEntry {
            recipient: rcpt.address.clone(),
            original: rcpt.original.clone(),
            orcpt: rcpt.orcpt.clone(),
            notify: rcpt.notify,
            offset,
            status: status.to_string(),
            action: action.to_string(),
            relay: relay.to_string(),
            reason: reason.to_string(),
            diag_type: String::new(),
            class: if action == "failed" || action == "delayed" {
                crate::bounce_class::classify(status, reason)
            } else {
                String::new()
            },
        }
    }
}

fn clean(s: &str) -> String {
    s.replace(['\n', '\r'], " ")
}

/// Appends an entry to a message log and fsyncs it.
pub fn append_log(tree: &QueueTree, log: MessageLog, id: &str, e: &LogEntry) -> io::Result<()> {
    let diag_type = if e.diag_type.is_empty() {
        String::new()
    } else {
        format!("diag_type={}\n", clean(&e.diag_type))
    };
    let class = if e.class.is_empty() {
        String::new()
    } else {
        format!("bounce_class={}\n", clean(&e.class))
    };
    let text = format!(
        "recipient={}\noriginal_recipient={}\ndsn_orig_rcpt={}\nnotify_flags={}\noffset={}\nstatus={}\naction={}\nrelay={}\n{diag_type}{class}reason={}\n\n",
        clean(&e.recipient),
        clean(&e.original),
        clean(&e.orcpt),
        e.notify,
        e.offset,
        clean(&e.status),
        clean(&e.action),
        clean(&e.relay),
        clean(&e.reason)
    );
    let path = tree.log_path(log, id);
    // An agent running as root (local) makes the log as the owner of its
    // directory: qmgr, running as mail_owner, reads it, and the other
    // agents append to it. Made as root and given away after, it was
    // root's for an instant in which smtp, appending to the same
    // message's log, was refused (and its entry lost).
    let _owner = if crate::privs::is_root() {
        use std::os::unix::fs::MetadataExt;
        let m = std::fs::metadata(tree.root().join(log.name()))?;
        Some(crate::privs::FsIdentity::assume(m.uid(), m.gid()))
    } else {
        None
    };
    let open = || {
        OpenOptions::new()
            .append(true)
            .create(true)
            .mode(0o600)
            .open(&path)
    };
    let mut f = match open() {
        // The first log in its hash subdirectory: make it.
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            if let Some(dir) = path.parent() {
                tree.make_subdirs(log.name(), dir)?;
            }
            open()?
        }
        r => r?,
    };
    f.write_all(text.as_bytes())?;
    f.sync_data()
}

/// Logs a failed or deferred recipient's bounce class, on a line of its
/// own after the delivery line (`ID: bounce_class=CLASS, recipient=<ADDR>,
/// dsn=X.Y.Z`): Postfix's delivery line stays byte for byte what log
/// tools (pflogsumm, fail2ban, postfix_exporter) parse, and this line
/// matches none of their patterns (it has no `to=<`, `status=` or `reject:`).
pub fn log_class(id: &str, address: &str, dsn: &str, class: &str) {
    if !class.is_empty() {
        info!("{id}: bounce_class={class}, recipient=<{address}>, dsn={dsn}");
    }
}

/// The `action` of a defer log block that carries the deferrals of
/// earlier rounds (`offset=`, `attempts=`): no entry of this round, and
/// skipped by [`read_log`].
const CARRY: &str = "attempts";

/// The deferrals of the recipient at `offset` so far: those of this
/// round's defer log and those carried over from earlier rounds.
pub fn attempts_of(tree: &QueueTree, id: &str, offset: u64) -> u32 {
    let text = std::fs::read_to_string(tree.log_path(MessageLog::Defer, id)).unwrap_or_default();
    carried(&text).get(&offset).copied().unwrap_or(0)
}

/// Per recipient offset: carried deferrals plus this round's entries.
fn carried(text: &str) -> std::collections::HashMap<u64, u32> {
    let mut n = std::collections::HashMap::new();
    for block in text.split("\n\n") {
        let (mut offset, mut action, mut attempts) = (None, "", 0u32);
        for line in block.lines() {
            match line.split_once('=') {
                Some(("offset", v)) => offset = v.parse::<u64>().ok(),
                Some(("action", v)) => action = v,
                Some(("attempts", v)) => attempts = v.parse().unwrap_or(0),
                _ => {}
            }
        }
        let Some(offset) = offset else { continue };
        *n.entry(offset).or_insert(0) += if action == CARRY { attempts } else { 1 };
    }
    n
}

/// The start of a delivery round (qmgr): the defer log is for the
/// reasons of this round, so its entries go; what stays is each
/// recipient's count of deferrals so far, one `action=attempts` block
/// each, for the accounting log's `num_attempts`. Replaced in one
/// rename; removed when there is nothing to carry.
pub fn carry_attempts(tree: &QueueTree, id: &str) -> io::Result<()> {
    let path = tree.log_path(MessageLog::Defer, id);
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    let counts = carried(&text);
    if counts.is_empty() {
        return std::fs::remove_file(&path);
    }
    let mut offsets: Vec<_> = counts.into_iter().collect();
    offsets.sort();
    let out: String = offsets
        .iter()
        .map(|(o, n)| format!("offset={o}\naction={CARRY}\nattempts={n}\n\n"))
        .collect();
    let tmp = path.with_file_name(format!(".carry.{id}"));
    std::fs::write(&tmp, out)?;
    std::fs::rename(&tmp, &path)
}

/// A message log's entries; none when the message has no such log.
pub fn read_log(tree: &QueueTree, log: MessageLog, id: &str) -> io::Result<Vec<LogEntry>> {
    read_log_if_any(tree, log, id).map(Option::unwrap_or_default)
}

/// A message log's entries, or None when there is no such file, neither
/// where it belongs nor where an earlier hashing put it (a log with only
/// carried counts is a file without entries: Some, empty).
pub fn read_log_if_any(
    tree: &QueueTree,
    log: MessageLog,
    id: &str,
) -> io::Result<Option<Vec<LogEntry>>> {
    let text = match std::fs::read_to_string(tree.log_path(log, id)) {
        Ok(t) => t,
        // Perhaps where an earlier hashing put it (postsuper -s moves it).
        Err(e) if e.kind() == io::ErrorKind::NotFound => match tree.misplaced(log.name(), id) {
            Some(p) => std::fs::read_to_string(p)?,
            None => return Ok(None),
        },
        Err(e) => return Err(e),
    };
    Ok(Some(parse_log(&text)))
}

fn parse_log(text: &str) -> Vec<LogEntry> {
    let mut out = Vec::new();
    for block in text.split("\n\n") {
        let mut e = LogEntry::default();
        let mut any = false;
        for line in block.lines() {
            let Some((k, v)) = line.split_once('=') else {
                continue;
            };
            any = true;
            match k {
                "recipient" => e.recipient = v.into(),
                "original_recipient" => e.original = v.into(),
                "dsn_orig_rcpt" => e.orcpt = v.into(),
                "notify_flags" => e.notify = v.parse().unwrap_or(0),
                "offset" => e.offset = v.parse().unwrap_or(0),
                "status" => e.status = v.into(),
                "action" => e.action = v.into(),
                "relay" => e.relay = v.into(),
                "reason" => e.reason = v.into(),
                "diag_type" => e.diag_type = v.into(),
                "bounce_class" => e.class = v.into(),
                _ => {}
            }
        }
        if any && e.action != CARRY {
            out.push(e);
        }
    }
    out
}

/// Serves a delivery agent's socket: one request (or one batch, delivered
/// in order) per connection, answered once every recipient is recorded;
/// one connection at a time (local and virtual change their user per
/// delivery, which is per process).
pub fn serve(cfg: &postern_conf::Config, mut deliver: impl FnMut(&mut Job)) -> ! {
    serve_batches(cfg, |jobs| jobs.iter_mut().for_each(&mut deliver))
}

/// As [`serve`], but the agent is handed each batch of requests
/// ([`DeliveryRequest::MORE`]) whole, to finish them together (local
/// makes the Maildir deliveries of a batch durable with one directory
/// sync). Every job must be recorded when `deliver` returns.
pub fn serve_batches(cfg: &postern_conf::Config, mut deliver: impl FnMut(&mut [Job])) -> ! {
    let tree = QueueTree::configured(crate::service::queue_directory(cfg), cfg);
    let timeout = std::time::Duration::from_secs(cfg.get_time("ipc_timeout").unwrap_or(3600));
    crate::service::serve_one_at_a_time(cfg, |conn| {
        handle_request(&tree, &conn, timeout, false, false, |jobs| deliver(jobs));
    })
}

/// How long an agent of [`serve_concurrently`] waits on a connection for
/// qmgr's next request before it closes it.
pub const AGENT_IDLE: std::time::Duration = std::time::Duration::from_secs(5);

/// How long qmgr keeps an agent's connection for the next request: well
/// inside [`AGENT_IDLE`], so that no request is ever on its way on a
/// connection its agent is closing (the request would find no reader,
/// and its recipients would be deferred).
pub const AGENT_REUSE_WITHIN: std::time::Duration = std::time::Duration::from_secs(1);

/// As [`serve`], but up to `slots` connections at once, each on a thread
/// ([`crate::service::serve_threaded`]): for agents whose deliveries share
/// nothing but read-only settings and a thread-safe cache (smtp, lmtp).
/// A connection serves one request (or batch) after another until qmgr
/// closes it, it is idle [`AGENT_IDLE`], or the process is leaving: qmgr
/// keeps it for the next request to the transport, which then costs no
/// connect, accept or thread hand-off.
/// `before_exit` runs when the process leaves (to close cached sessions).
pub fn serve_concurrently(
    cfg: &postern_conf::Config,
    slots: usize,
    deliver: impl Fn(&mut Job) + Send + Sync + 'static,
    before_exit: impl FnOnce(),
) -> ! {
    let tree = QueueTree::configured(crate::service::queue_directory(cfg), cfg);
    let timeout = std::time::Duration::from_secs(cfg.get_time("ipc_timeout").unwrap_or(3600));
    // A connection carries at most max_use requests: serve_threaded
    // counts connections toward max_use, and one that qmgr keeps could
    // otherwise carry every request, and the process never renew.
    let per_connection = crate::service::max_use(cfg);
    crate::service::serve_threaded(
        cfg,
        slots,
        move |conn| {
            let mut kept = false;
            let mut requests = 0;
            // Each batch's replies say whether another is read (not when
            // the process is leaving): then it is, even if the process
            // starts leaving meanwhile, so that qmgr never sends a request
            // to a connection its agent is closing.
            loop {
                requests += 1;
                let more = requests < per_connection;
                let wait = if kept { AGENT_IDLE } else { timeout };
                if !handle_request(&tree, &conn, wait, kept, more, |jobs| {
                    jobs.iter_mut().for_each(&deliver)
                }) {
                    break;
                }
                kept = true;
            }
        },
        before_exit,
    )
}

/// Reads one batch of requests: one, or several while each says
/// [`DeliveryRequest::MORE`]. The flag is cleared in what is returned: it
/// describes this connection only, and a request that an agent hands on
/// (local's `mailbox_transport`) must not carry it.
fn read_batch(conn: &mut impl io::Read) -> io::Result<Vec<DeliveryRequest>> {
    let mut batch = Vec::new();
    loop {
        let mut req: DeliveryRequest = crate::ipc::recv(conn)?;
        let more = req.flags & DeliveryRequest::MORE != 0;
        req.flags &= !DeliveryRequest::MORE;
        batch.push(req);
        if !more {
            return Ok(batch);
        }
        if batch.len() >= DeliveryRequest::MAX_BATCH {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "more than MAX_BATCH requests in one batch",
            ));
        }
    }
}

/// The reply for a request whose queue file could not be opened.
fn not_opened(req: &DeliveryRequest, e: &io::Error) -> DeliveryReply {
    warning!("{}: open queue file: {e}", req.queue_id);
    DeliveryReply {
        results: req
            .recipients
            .iter()
            .map(|r| RecipientResult {
                offset: r.offset,
                outcome: Outcome::Deferred,
                dsn: "4.3.0".into(),
                reason: format!("cannot open queue file: {e}"),
            })
            .collect(),
        destination_failed: false,
        serves_more: false,
    }
}

/// One batch of requests from qmgr on `conn`, waited for `wait` at most:
/// the deliveries, one reply per request. `kept`: a further batch
/// on a connection qmgr kept, whose end or idle time is no error.
/// `serves_more`: the agent reads further batches on a connection unless
/// its process is leaving. True when the replies went out saying that
/// it does ([`DeliveryReply::serves_more`]): the caller reads the next.
fn handle_request(
    tree: &QueueTree,
    mut conn: &std::os::unix::net::UnixStream,
    wait: std::time::Duration,
    kept: bool,
    serves_more: bool,
    deliver: impl FnOnce(&mut [Job]),
) -> bool {
    // Buffered: a request's length and body (a batch's requests) in one
    // read. qmgr sends nothing more before it has every reply, so the
    // buffer never holds a part of the next batch.
    // Waited for in poll (crate::ipc::PolledReader), `wait` at most.
    let polled = crate::ipc::PolledReader::new(conn, Some(wait));
    let batch = match read_batch(&mut io::BufReader::with_capacity(8192, polled)) {
        Ok(b) => b,
        // qmgr closed a kept connection, or left it idle: the end of it.
        Err(e)
            if kept
                && matches!(
                    e.kind(),
                    io::ErrorKind::UnexpectedEof
                        | io::ErrorKind::WouldBlock
                        | io::ErrorKind::TimedOut
                ) =>
        {
            return false;
        }
        Err(e) => {
            warning!("read delivery request: {e}");
            return false;
        }
    };
    // Each reply in the request's place: opened jobs are delivered
    // together, the others already have their answer.
    let mut replies: Vec<Option<DeliveryReply>> = Vec::with_capacity(batch.len());
    let mut jobs = Vec::with_capacity(batch.len());
    for req in batch {
        match Job::open(tree, req.clone()) {
            Ok(job) => {
                jobs.push(job);
                replies.push(None);
            }
            Err(e) => replies.push(Some(not_opened(&req, &e))),
        }
    }
    // The queue files are locked now. A qmgr that died after it sent
    // this batch is replaced by one that takes active/ back and hands the
    // messages out again (unless it sees these locks): deliver only if
    // the qmgr that asked is still there, so that no message is ever
    // delivered twice.
    if !jobs.is_empty() && crate::ipc::peer_gone(conn) {
        for job in &jobs {
            warning!(
                "{}: the queue manager went away; request dropped",
                job.req.queue_id
            );
        }
        return false;
    }
    deliver(&mut jobs);
    let more = serves_more && !crate::service::leaving();
    let mut done = jobs.into_iter().map(Job::finish);
    for reply in replies {
        let mut reply = match reply {
            Some(r) => r,
            None => done.next().expect("one job per unanswered request"),
        };
        reply.serves_more = more;
        if let Err(e) = crate::ipc::send(&mut conn, &reply) {
            warning!("send delivery reply: {e}");
            return false;
        }
    }
    more
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(id: &str, flags: u32) -> DeliveryRequest {
        DeliveryRequest {
            queue: "active".into(),
            queue_id: id.into(),
            transport: "local".into(),
            nexthop: "h".into(),
            flags,
            ..Default::default()
        }
    }

    /// A probe's outcomes go to the verify service (both addresses of an
    /// aliased recipient), are marked done whatever they are, and leave
    /// no defer or bounce log.
    #[test]
    fn a_probe_reports_to_the_verify_service_and_logs_nothing_else() {
        use std::os::unix::net::UnixListener;
        let root = std::env::temp_dir().join(format!("postern-probe-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let tree = QueueTree::new(&root);
        tree.create_dirs(None, None).unwrap();
        let id = "6A1B2C3D1234500ABC";
        let path = tree.path(Queue::Active, id);
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        let mut w = qfile::Writer::new(f).unwrap();
        w.sender("double-bounce@h.test").unwrap();
        w.recipient(&Recipient::new("good@b.test")).unwrap();
        let mut aliased = Recipient::new("target@b.test");
        aliased.original = "alias@b.test".into();
        w.recipient(&aliased).unwrap();
        w.begin_content().unwrap();
        w.finish().unwrap();
        let env = qfile::read_envelope(&File::open(&path).unwrap()).unwrap();

        let listener = UnixListener::bind(tree.socket(true, crate::verify::SOCKET)).unwrap();
        let server = std::thread::spawn(move || {
            let mut got = Vec::new();
            for _ in 0..3 {
                let (mut c, _) = listener.accept().unwrap();
                let req: crate::verify::VerifyRequest = crate::ipc::recv(&mut c).unwrap();
                crate::ipc::send(&mut c, &crate::verify::VerifyReply::Updated).unwrap();
                got.push(req);
            }
            got
        });
        let mut req = request(id, DeliveryRequest::VERIFY);
        req.recipients = env
            .recipients
            .iter()
            .map(|r| DeliveryRecipient {
                offset: r.offset,
                rcpt: r.rcpt.clone(),
            })
            .collect();
        let rcpts = req.recipients.clone();
        let mut job = Job::open(&tree, req).unwrap();
        assert!(job.is_probe());
        job.record(&rcpts[0], Outcome::Sent, "2.1.5", "h", "250 2.1.5 Ok");
        job.record(
            &rcpts[1],
            Outcome::Bounced,
            "5.1.1",
            "h",
            "550 5.1.1 unknown",
        );
        let reply = job.finish();
        assert!(reply.results.iter().all(|r| r.outcome == Outcome::Sent));
        use crate::verify::{Status, VerifyRequest::Update};
        let got = server.join().unwrap();
        let update = |a: &str, s, r: &str| Update {
            address: a.into(),
            status: s,
            reason: r.into(),
        };
        assert_eq!(
            got,
            vec![
                update("good@b.test", Status::Ok, "250 2.1.5 Ok"),
                update("alias@b.test", Status::Bounce, "550 5.1.1 unknown"),
                update("target@b.test", Status::Bounce, "550 5.1.1 unknown"),
            ]
        );
        let env = qfile::read_envelope(&File::open(&path).unwrap()).unwrap();
        assert!(env.recipients.iter().all(|r| r.done));
        assert!(read_log(&tree, MessageLog::Bounce, id)
            .unwrap_or_default()
            .is_empty());
        assert!(read_log(&tree, MessageLog::Defer, id)
            .unwrap_or_default()
            .is_empty());
        let _ = std::fs::remove_dir_all(&root);
    }

    #[test]
    fn a_batch_ends_at_the_request_without_more_and_loses_the_flag() {
        let mut wire = Vec::new();
        for (id, flags) in [
            ("A", DeliveryRequest::MORE),
            ("B", DeliveryRequest::MORE),
            ("C", 0),
        ] {
            crate::ipc::send(&mut wire, &request(id, flags)).unwrap();
        }
        crate::ipc::send(&mut wire, &request("NEXT", 0)).unwrap();
        let mut r = &wire[..];
        let batch = read_batch(&mut r).unwrap();
        let got: Vec<(&str, u32)> = batch
            .iter()
            .map(|q| (q.queue_id.as_str(), q.flags))
            .collect();
        assert_eq!(got, [("A", 0), ("B", 0), ("C", 0)]);
        // The next request on the wire is not part of it.
        assert_eq!(read_batch(&mut r).unwrap()[0].queue_id, "NEXT");
    }

    #[test]
    fn a_log_is_absent_or_has_entries_or_only_carried_counts() {
        let root = std::env::temp_dir().join(format!("postern-logs-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let tree = QueueTree::new(&root);
        tree.create_dirs(None, None).unwrap();
        let id = "6B16A0F17E3B498C747";
        // No file: None, which lets qmgr skip the round's log upkeep.
        assert!(read_log_if_any(&tree, MessageLog::Defer, id)
            .unwrap()
            .is_none());
        assert!(read_log(&tree, MessageLog::Defer, id).unwrap().is_empty());
        let entry = LogEntry {
            recipient: "a@example.org".into(),
            offset: 42,
            status: "4.4.1".into(),
            action: "delayed".into(),
            ..Default::default()
        };
        append_log(&tree, MessageLog::Defer, id, &entry).unwrap();
        let got = read_log_if_any(&tree, MessageLog::Defer, id)
            .unwrap()
            .unwrap();
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].recipient, "a@example.org");
        // A new round keeps only the count: a file without entries, which
        // still has to be found (and removed with the message).
        carry_attempts(&tree, id).unwrap();
        let got = read_log_if_any(&tree, MessageLog::Defer, id).unwrap();
        assert_eq!(got.map(|e| e.len()), Some(0));
        let _ = std::fs::remove_dir_all(&root);
    }

    #[test]
    fn a_batch_cut_short_is_an_error() {
        let mut wire = Vec::new();
        crate::ipc::send(&mut wire, &request("A", DeliveryRequest::MORE)).unwrap();
        assert!(read_batch(&mut &wire[..]).is_err());
        let mut wire = Vec::new();
        for _ in 0..=DeliveryRequest::MAX_BATCH {
            crate::ipc::send(&mut wire, &request("A", DeliveryRequest::MORE)).unwrap();
        }
        assert!(read_batch(&mut &wire[..]).is_err(), "too long a batch");
    }
}
