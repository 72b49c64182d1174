//! Delivery status notifications (RFC 3464), composed and queued through
//! cleanup: failure notices ("Undelivered Mail Returned to Sender"),
//! delay warnings ("Delayed Mail (still being retried)", after
//! `delay_warning_time`) and success notices ("Successful Mail Delivery
//! Report", DSN NOTIFY=SUCCESS), each only to the recipients' liking
//! (NOTIFY=NEVER: none; see [`wanted`]); and the postmaster's copies
//! (`notify_classes`: `bounce`, `delay`), double bounces (`2bounce`) and
//! notices of mail system problems to `error_notice_recipient`
//! (`resource`, `software`: see [`problem_of`]). A success is reported
//! as "relayed" or "delivered" ([`success_action`]). Each notice queued
//! is marked in the message's success log ([`mark`]), so that a round
//! retried after a later notice failed does not send it twice.
//!
//! A notice is a `multipart/report; report-type=delivery-status`
//! message from `MAILER-DAEMON@$myhostname` in three parts, as Postfix
//! writes it: a human-readable text, the `message/delivery-status`
//! report (per message: `Reporting-MTA`, `Original-Envelope-Id`,
//! `Arrival-Date`; per recipient: `Final-Recipient`,
//! `Original-Recipient` from ORCPT, `Action`, `Status`, `Remote-MTA`,
//! `Diagnostic-Code`, `X-Postern-Bounce-Class` (the failure's bounce class),
//! `Will-Retry-Until`), and the original message:
//! whole as `message/rfc822` (RET=FULL; for failures without RET, up to
//! `bounce_size_limit` bytes), or its headers as `text/rfc822-headers`
//! — streamed from the queue file, never held whole in memory.
//!
//! The sender's notices come from the null sender; postmaster notices
//! from `double_bounce_sender`. Every notice is submitted with the
//! [`cleanup_flags::NOTIFICATION`] flag and a `notification=` attribute
//! (`bounce`, `delay`, `success`, `2bounce`): a notice that fails goes
//! to the postmaster once, as a double bounce, and a double bounce that
//! fails is dropped — never a loop.

use postern_common::delivery::LogEntry;
use postern_common::ipc::{self, cleanup_flags, CleanupReply, CleanupRequest, NewMessage};
use postern_common::qfile::{self, ContentReader, Recipient};
use postern_common::queue::QueueTree;
use postern_common::smtputf8;
use std::collections::HashMap;
use std::fs::File;
use std::io::{self, Read};
use std::time::Duration;

/// Most bytes of the original headers that a notice carries.
pub const HEADER_LIMIT: usize = 100 * 1024;

/// What a notice reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Recipients that failed for good ("Undelivered Mail Returned to Sender").
    Failure,
    /// Recipients still being retried (DSN NOTIFY=DELAY, `delay_warning_time`).
    Delay,
    /// Recipients delivered (DSN NOTIFY=SUCCESS).
    Success,
}

/// A mail system problem reported to `error_notice_recipient`
/// (`notify_classes`: `resource`, `software`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Problem {
    /// Out of disk space, memory, file handles: RFC 3463 `X.3.1`, or a
    /// reason saying so.
    Resource,
    /// A delivery agent that crashed or could not be run, a configuration
    /// error: the other `X.3.Y` mail system statuses.
    Software,
}

impl Problem {
    /// The `notify_classes` name.
    pub fn class(self) -> &'static str {
        match self {
            Problem::Resource => "resource",
            Problem::Software => "software",
        }
    }
}

/// What problem of this mail system, if any, a logged deferral or bounce
/// reports: only `X.3.Y` statuses (RFC 3463 "mail system status") that
/// Postern itself wrote count; `X.3.1` (mail system full) and reasons
/// that name a shortage are resource problems, the rest software
/// problems. A status that another server replied ("host H[A] said: 451
/// 4.3.0 ...", its `Diagnostic-Code: smtp`) is that server's trouble, not
/// ours: the postmaster is not paged on every retry of a busy next hop
/// (Postfix's delivery agents never report `resource` or `software`).
pub fn problem_of(e: &LogEntry) -> Option<Problem> {
    // A command's exit status (pipe(8), mailbox_command: `x-unix`) is
    // that message's delivery problem, as Postfix's pipe reports it.
    if remote_reply(&e.reason).is_some() || e.diag_type == "x-unix" {
        return None;
    }
    let mut parts = e.status.split('.');
    let (class, subject) = (parts.next()?, parts.next()?);
    if !matches!(class, "4" | "5") || subject != "3" {
        return None;
    }
    const SHORTAGES: [&str; 6] = [
        "no space left",
        "disk quota exceeded",
        "insufficient system storage",
        "cannot allocate memory",
        "too many open files",
        "file too large",
    ];
    let reason = e.reason.to_ascii_lowercase();
    if parts.next() == Some("1") || SHORTAGES.iter().any(|s| reason.contains(s)) {
        Some(Problem::Resource)
    } else {
        Some(Problem::Software)
    }
}

/// How much of the original message a notice returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Returned {
    /// Its header section, as `text/rfc822-headers` (RET=HDRS).
    Headers,
    /// The whole message as `message/rfc822`, cut at a line end after
    /// this many bytes when given (`bounce_size_limit`; RET=FULL: none).
    Full(Option<u64>),
}

/// Everything a notice says.
#[derive(Debug, Clone)]
pub struct Notice {
    pub myhostname: String,
    pub kind: Kind,
    /// A copy for the postmaster (or a double bounce) rather than the
    /// sender's notice: other wording, sent from `double_bounce_sender`.
    pub postmaster: bool,
    /// The queue ID of the message reported on.
    pub queue_id: String,
    /// Its envelope sender.
    pub sender: String,
    /// Who gets the notice: the sender, or a postmaster address.
    pub to: String,
    /// The notice's envelope sender: "" (the null sender), or
    /// `double_bounce_sender` for postmaster notices, whose failure is
    /// never reported again.
    pub from: String,
    pub arrival_secs: u64,
    /// RFC 3461 ENVID of the original message ("" = none).
    pub envid: String,
    /// For delay notices: when the retries end.
    pub retry_until: Option<u64>,
    /// One entry per recipient reported.
    pub entries: Vec<LogEntry>,
    pub returned: Returned,
    /// Where the original content starts in its queue file.
    pub content_offset: u64,
    /// For a postmaster notice about a mail system problem: which one.
    pub problem: Option<Problem>,
    /// What to append to the message's success log once the notice is
    /// queued, so that a round whose later notices fail does not send
    /// this one again (see [`mark`]).
    pub mark: Option<LogEntry>,
    /// The original message asked for SMTPUTF8: the notice is an RFC 6533
    /// one (`message/global-delivery-status`, `utf-8` address types, the
    /// message returned as `message/global`) and asks for SMTPUTF8 itself.
    pub smtputf8: bool,
}

impl Notice {
    /// The `notification` attribute of the notice's own queue file.
    pub fn notification(&self) -> &'static str {
        if self.postmaster {
            "2bounce"
        } else {
            match self.kind {
                Kind::Failure => "bounce",
                Kind::Delay => "delay",
                Kind::Success => "success",
            }
        }
    }

    fn subject(&self) -> &'static str {
        match self.problem {
            Some(Problem::Resource) => {
                return "Postmaster Warning: Mail Not Delivered (resource problem)"
            }
            Some(Problem::Software) => {
                return "Postmaster Warning: Mail Not Delivered (software problem)"
            }
            None => {}
        }
        match (self.kind, self.postmaster) {
            (Kind::Failure, false) => "Undelivered Mail Returned to Sender",
            (Kind::Failure, true) => "Postmaster Copy: Undelivered Mail",
            (Kind::Delay, false) => "Delayed Mail (still being retried)",
            (Kind::Delay, true) => "Postmaster Warning: Delayed Mail",
            (Kind::Success, _) => "Successful Mail Delivery Report",
        }
    }

    fn what(&self) -> &'static str {
        match self.kind {
            Kind::Failure => "Undelivered",
            Kind::Delay => "Delayed",
            Kind::Success => "Delivered",
        }
    }
}

/// The parameters that decide which notices go where.
#[derive(Debug, Clone)]
pub struct Settings {
    pub myhostname: String,
    /// `notify_classes`, lower case.
    pub classes: Vec<String>,
    pub bounce_rcpt: String,
    pub twobounce_rcpt: String,
    pub delay_rcpt: String,
    /// `error_notice_recipient`: resource and software problems.
    pub error_rcpt: String,
    pub double_bounce_sender: String,
    /// `delay_warning_time` in seconds; 0: no delay warnings.
    pub delay_warning: u64,
    /// `bounce_size_limit`.
    pub size_limit: u64,
    /// `maximal_queue_lifetime`, for Will-Retry-Until.
    pub max_lifetime: u64,
}

impl Settings {
    pub fn from_config(cfg: &postern_conf::Config) -> Settings {
        Settings {
            myhostname: cfg.get("myhostname"),
            classes: cfg
                .get("notify_classes")
                .split(|c: char| c == ',' || c.is_whitespace())
                .filter(|w| !w.is_empty())
                .map(|w| w.to_ascii_lowercase())
                .collect(),
            bounce_rcpt: cfg.get("bounce_notice_recipient"),
            twobounce_rcpt: cfg.get("2bounce_notice_recipient"),
            delay_rcpt: cfg.get("delay_notice_recipient"),
            error_rcpt: cfg.get("error_notice_recipient"),
            double_bounce_sender: cfg.get("double_bounce_sender"),
            delay_warning: cfg.get_time("delay_warning_time").unwrap_or(0),
            size_limit: cfg.get_u64("bounce_size_limit").unwrap_or(50000),
            max_lifetime: cfg.get_time("maximal_queue_lifetime").unwrap_or(5 * 86400),
        }
    }

    pub fn class(&self, name: &str) -> bool {
        self.classes.iter().any(|c| c == name)
    }

    /// Whether `sender` is the double-bounce address (bare or qualified).
    pub fn is_double_bounce(&self, sender: &str) -> bool {
        let local = sender.split('@').next().unwrap_or("");
        !sender.is_empty() && local.eq_ignore_ascii_case(&self.double_bounce_sender)
    }
}

/// The `action` of a success-log entry that notes a notice already
/// queued in the current round (see [`mark`]).
pub const NOTIFIED: &str = "notified";

/// The mark that says notice `key` was queued, having reported the
/// first `upto` entries of `log` (the log as read when the notice was
/// planned). Its `reason` holds the last of those entries' identity, so
/// that a mark is only honoured for the very log it was made from.
pub fn mark(key: &str, log: &[LogEntry]) -> LogEntry {
    LogEntry {
        recipient: key.to_string(),
        action: NOTIFIED.to_string(),
        offset: log.len() as u64,
        reason: log.last().map(fingerprint).unwrap_or_default(),
        ..Default::default()
    }
}

fn fingerprint(e: &LogEntry) -> String {
    format!("{} {} {} {}", e.offset, e.action, e.status, e.reason)
}

/// The marks of a success log, by notice key.
pub fn marks(trace: &[LogEntry]) -> HashMap<String, LogEntry> {
    trace
        .iter()
        .filter(|e| e.action == NOTIFIED)
        .map(|e| (e.recipient.clone(), e.clone()))
        .collect()
}

/// How many of `log`'s first entries notice `key` already reported (0
/// when it has no mark, or its mark is for another log).
pub fn reported(marks: &HashMap<String, LogEntry>, key: &str, log: &[LogEntry]) -> usize {
    let Some(m) = marks.get(key) else {
        return 0;
    };
    let upto = m.offset as usize;
    if upto == 0 || upto > log.len() || fingerprint(&log[upto - 1]) != m.reason {
        return 0;
    }
    upto
}

/// The last entry of each recipient (a log may hold several, from
/// retries or from an agent that restarted).
pub fn last_per_recipient(entries: Vec<LogEntry>) -> Vec<LogEntry> {
    let mut last: HashMap<(u64, String), usize> = HashMap::new();
    let mut out: Vec<LogEntry> = Vec::new();
    for e in entries {
        let key = (e.offset, e.recipient.clone());
        match last.get(&key) {
            Some(&i) => out[i] = e,
            None => {
                last.insert(key, out.len());
                out.push(e);
            }
        }
    }
    out
}

/// Whether a recipient's DSN NOTIFY asks for this kind of notice: never
/// with NEVER; failure and delay notices when NOTIFY was not given or
/// names them; success notices only when asked for.
pub fn wanted(kind: Kind, notify: u8) -> bool {
    if notify & qfile::NOTIFY_NEVER != 0 {
        return false;
    }
    match kind {
        Kind::Failure => notify == 0 || notify & qfile::NOTIFY_FAILURE != 0,
        Kind::Delay => notify == 0 || notify & qfile::NOTIFY_DELAY != 0,
        Kind::Success => notify & qfile::NOTIFY_SUCCESS != 0,
    }
}

/// The entries a failure notice reports: the last entry of each
/// recipient, for recipients whose DSN NOTIFY allows failure notices.
#[cfg(test)]
pub fn reportable(entries: Vec<LogEntry>) -> Vec<LogEntry> {
    let mut out = last_per_recipient(entries);
    out.retain(|e| wanted(Kind::Failure, e.notify));
    out
}

/// The header section of a queued message: its content up to the first
/// empty line, at most [`HEADER_LIMIT`] bytes, cut at a line end.
pub fn original_headers(file: &File, content_offset: u64) -> io::Result<Vec<u8>> {
    let mut r = ContentReader::new(file, content_offset)?.take(HEADER_LIMIT as u64 + 1);
    let mut buf = Vec::new();
    r.read_to_end(&mut buf)?;
    if buf.first() == Some(&b'\n') {
        return Ok(Vec::new());
    }
    if let Some(i) = buf.windows(2).position(|w| w == b"\n\n") {
        buf.truncate(i + 1);
    } else if buf.len() > HEADER_LIMIT {
        buf.truncate(HEADER_LIMIT);
        match buf.iter().rposition(|&b| b == b'\n') {
            Some(i) => buf.truncate(i + 1),
            None => buf.clear(),
        }
    }
    if !buf.is_empty() && !buf.ends_with(b"\n") {
        buf.push(b'\n');
    }
    Ok(buf)
}

/// The remote host named in a `relay=` value ("mx.test[192.0.2.1]:25").
fn remote_host(relay: &str) -> Option<&str> {
    let i = relay.find('[')?;
    let host = &relay[..i];
    (!host.is_empty()).then_some(host)
}

/// The reply of another server inside a reason: the SMTP and LMTP
/// clients write "host H[A] said: 451 4.3.0 text (in reply to end of DATA
/// command)" (and "SASL authentication failed; server H said: ...").
fn remote_reply(reason: &str) -> Option<&str> {
    reason.find(" said: ").and_then(|_| smtp_reply(reason))
}

/// The SMTP reply inside a reason, when there is one: agents write
/// "host H[A] said: 550 5.1.1 text (in reply to RCPT TO command)".
fn smtp_reply(reason: &str) -> Option<&str> {
    let text = match reason.find(" said: ") {
        Some(i) => &reason[i + 7..],
        None => reason,
    };
    let b = text.as_bytes();
    let looks = b.len() >= 3
        && matches!(b[0], b'2' | b'4' | b'5')
        && b[1].is_ascii_digit()
        && b[2].is_ascii_digit()
        && (b.len() == 3 || b[3] == b' ' || b[3] == b'-');
    if !looks {
        return None;
    }
    let text = match text.rfind(" (in reply to ") {
        Some(i) if text.ends_with(')') => &text[..i],
        _ => text,
    };
    Some(text.trim())
}

/// The DSN action of a success (RFC 3464 §2.3.3, RFC 3461 §6.2.3.1): what
/// the agent said when it said "relayed" or "expanded"; "relayed" for a
/// recipient handed to another server (SMTP, or LMTP: Postfix's
/// `lmtp_assume_final = no`), whose `relay=` names a peer `host[addr]`;
/// "delivered" for final delivery here (local, virtual).
pub fn success_action(e: &LogEntry) -> &'static str {
    match e.action.as_str() {
        "relayed" => "relayed",
        "expanded" => "expanded",
        _ if e.relay.contains('[') => "relayed",
        _ => "delivered",
    }
}

fn status_of(e: &LogEntry, kind: Kind) -> &str {
    if !e.status.is_empty() {
        &e.status
    } else {
        match kind {
            Kind::Failure => "5.0.0",
            Kind::Delay => "4.0.0",
            Kind::Success => "2.0.0",
        }
    }
}

fn hours(secs: u64) -> String {
    let h = secs / 3600;
    format!("{h} hour{}", if h == 1 { "" } else { "s" })
}

/// Composes the notice, with LF line ends, as cleanup stores content:
/// everything before the returned message (`head`) and after it
/// (`tail`); [`returned_content`] streams what goes between. `new_id` is
/// the notice's own queue ID (for its Message-Id), `now` the time it is
/// written.
pub fn compose(n: &Notice, new_id: &str, now: u64) -> (Vec<u8>, Vec<u8>) {
    let host = &n.myhostname;
    let boundary = format!("{}.{}/{}", n.queue_id, now, host);
    let ascii = n
        .entries
        .iter()
        .all(|e| e.reason.is_ascii() && e.recipient.is_ascii() && e.original.is_ascii())
        && n.sender.is_ascii();
    let mut m = String::new();
    m.push_str(&format!(
        "Date: {}\n",
        postern_common::time::rfc5322_date(now)
    ));
    m.push_str(&format!(
        "From: MAILER-DAEMON@{host} (Mail Delivery System)\n"
    ));
    m.push_str(&format!("Subject: {}\n", n.subject()));
    m.push_str(&format!("To: <{}>\n", n.to));
    m.push_str("Auto-Submitted: auto-replied\n");
    m.push_str(&format!("Message-Id: <{new_id}.{now}@{host}>\n"));
    m.push_str("MIME-Version: 1.0\n");
    m.push_str(&format!(
        "Content-Type: multipart/report; report-type=delivery-status;\n\tboundary=\"{boundary}\"\n"
    ));
    m.push_str("Content-Transfer-Encoding: 8bit\n");
    m.push('\n');
    m.push_str("This is a MIME-encapsulated message.\n\n");
    human_part(&mut m, n, &boundary, ascii, now);
    report_part(&mut m, n, &boundary);
    returned_part(&mut m, n, &boundary);
    (m.into_bytes(), format!("\n--{boundary}--\n").into_bytes())
}

/// The part for people: who writes, why, and each recipient's reason.
fn human_part(m: &mut String, n: &Notice, boundary: &str, ascii: bool, now: u64) {
    let host = &n.myhostname;
    let charset = if ascii { "us-ascii" } else { "utf-8" };
    m.push_str(&format!("--{boundary}\n"));
    m.push_str("Content-Description: Notification\n");
    m.push_str(&format!("Content-Type: text/plain; charset={charset}\n"));
    if !ascii {
        m.push_str("Content-Transfer-Encoding: 8bit\n");
    }
    m.push('\n');
    m.push_str(&format!("This is the mail system at host {host}.\n\n"));
    explanation(m, n, now);
    m.push_str("                   The mail system\n\n");
    for e in &n.entries {
        if !e.original.is_empty() && e.original != e.recipient {
            m.push_str(&format!(
                "<{}> (expanded from <{}>): {}\n",
                e.recipient, e.original, e.reason
            ));
        } else {
            m.push_str(&format!("<{}>: {}\n", e.recipient, e.reason));
        }
    }
    m.push('\n');
}

/// The paragraph of the part for people that says what happened.
fn explanation(m: &mut String, n: &Notice, now: u64) {
    if let Some(p) = n.problem {
        m.push_str(&format!(
            "Mail from <{}> could not be delivered because of a {} problem\n\
             of this mail system. Recipients reported as delayed will be tried\n\
             again; the reasons are below.\n\n",
            n.sender,
            p.class()
        ));
    } else {
        match n.kind {
            Kind::Failure if n.postmaster => m.push_str(&format!(
                "Enclosed is the mail delivery report that was sent to <{}>\n\
             (or could not be, if that is empty).\n\n",
                n.sender
            )),
            Kind::Failure => m.push_str(
                "I'm sorry to have to inform you that your message could not\n\
             be delivered to one or more recipients. It's attached below.\n\n\
             For further assistance, please send mail to postmaster.\n\n\
             If you do so, please include this problem report. You can\n\
             delete your own text from the attached returned message.\n\n",
            ),
            Kind::Delay => {
                m.push_str(
                    "####################################################################\n\
                 # THIS IS A WARNING ONLY.  YOU DO NOT NEED TO RESEND YOUR MESSAGE. #\n\
                 ####################################################################\n\n",
                );
                m.push_str(&format!(
                    "Your message could not be delivered for more than {}.\n",
                    hours(now.saturating_sub(n.arrival_secs))
                ));
                if let Some(until) = n.retry_until {
                    m.push_str(&format!(
                        "It will be retried until it is {} old.\n",
                        hours(until.saturating_sub(n.arrival_secs))
                    ));
                }
                m.push_str(
                    "\nFor further assistance, please send mail to postmaster.\n\n\
                 If you do so, please include this problem report. You can\n\
                 delete your own text from the attached returned message.\n\n",
                );
            }
            Kind::Success => m.push_str(
                "Your message was successfully delivered to the destination(s)\n\
             listed below. If the message was delivered to mailbox you will\n\
             receive no further notifications. Otherwise you may still receive\n\
             notifications of mail delivery errors from other systems.\n\n",
            ),
        }
    }
}

/// The report for programs (RFC 3464): the message's fields, then each
/// recipient's.
fn report_part(m: &mut String, n: &Notice, boundary: &str) {
    let host = &n.myhostname;
    m.push_str(&format!("--{boundary}\n"));
    m.push_str("Content-Description: Delivery report\n");
    let global = if n.smtputf8 { "global-" } else { "" };
    m.push_str(&format!("Content-Type: message/{global}delivery-status\n"));
    if n.smtputf8 {
        m.push_str("Content-Transfer-Encoding: 8bit\n");
    }
    m.push('\n');
    // RFC 6533: "utf-8" as the address type of a UTF-8 address, only in
    // a notice about an SMTPUTF8 message (as Postfix).
    let kind = |a: &str| {
        if n.smtputf8 && smtputf8::is_utf8_address(a) {
            "utf-8"
        } else {
            "rfc822"
        }
    };
    m.push_str(&format!("Reporting-MTA: dns; {host}\n"));
    m.push_str(&format!("X-Postern-Queue-ID: {}\n", n.queue_id));
    m.push_str(&format!(
        "X-Postern-Sender: {}; {}\n",
        kind(&n.sender),
        n.sender
    ));
    if !n.envid.is_empty() {
        m.push_str(&format!("Original-Envelope-Id: {}\n", n.envid));
    }
    if n.arrival_secs > 0 {
        m.push_str(&format!(
            "Arrival-Date: {}\n",
            postern_common::time::rfc5322_date(n.arrival_secs)
        ));
    }
    for e in &n.entries {
        m.push('\n');
        m.push_str(&format!(
            "Final-Recipient: {}; {}\n",
            kind(&e.recipient),
            e.recipient
        ));
        if !e.orcpt.is_empty() {
            if e.orcpt.contains(';') {
                m.push_str(&format!("Original-Recipient: {}\n", e.orcpt));
            } else {
                m.push_str(&format!("Original-Recipient: rfc822; {}\n", e.orcpt));
            }
        } else if !e.original.is_empty() && e.original != e.recipient {
            m.push_str(&format!(
                "Original-Recipient: {}; {}\n",
                kind(&e.original),
                e.original
            ));
        }
        let action = match n.kind {
            Kind::Failure => "failed",
            Kind::Delay if e.action == "failed" => "failed",
            Kind::Delay => "delayed",
            Kind::Success => success_action(e),
        };
        m.push_str(&format!("Action: {action}\n"));
        m.push_str(&format!("Status: {}\n", status_of(e, n.kind)));
        if let Some(h) = remote_host(&e.relay) {
            m.push_str(&format!("Remote-MTA: dns; {h}\n"));
        }
        match smtp_reply(&e.reason) {
            Some(reply) => m.push_str(&format!("Diagnostic-Code: smtp; {reply}\n")),
            None if e.diag_type == "x-unix" => {
                m.push_str(&format!("Diagnostic-Code: x-unix; {}\n", e.reason))
            }
            None => m.push_str(&format!("Diagnostic-Code: X-Postern; {}\n", e.reason)),
        }
        // The failure's bounce class (bounce_classifier_maps): an
        // extension field (RFC 3464 section 2.4: X- names are free).
        if !e.class.is_empty() && n.kind != Kind::Success {
            m.push_str(&format!("X-Postern-Bounce-Class: {}\n", e.class));
        }
        if n.kind == Kind::Delay {
            if let Some(until) = n.retry_until {
                m.push_str(&format!(
                    "Will-Retry-Until: {}\n",
                    postern_common::time::rfc5322_date(until)
                ));
            }
        }
    }
    m.push('\n');
}

/// The header of the last part: the returned message or its headers.
fn returned_part(m: &mut String, n: &Notice, boundary: &str) {
    m.push_str(&format!("--{boundary}\n"));
    match n.returned {
        Returned::Headers => {
            m.push_str(&format!(
                "Content-Description: {} Message Headers\n",
                n.what()
            ));
            m.push_str(if n.smtputf8 {
                "Content-Type: message/global-headers\n"
            } else {
                "Content-Type: text/rfc822-headers\n"
            });
        }
        Returned::Full(_) => {
            m.push_str(&format!("Content-Description: {} Message\n", n.what()));
            m.push_str(if n.smtputf8 {
                "Content-Type: message/global\n"
            } else {
                "Content-Type: message/rfc822\n"
            });
        }
    }
    m.push_str("Content-Transfer-Encoding: 8bit\n\n");
}

/// Streams what a notice returns of the original message to `out`, in
/// pieces, ending with a line end.
pub fn returned_content(
    file: &File,
    content_offset: u64,
    returned: Returned,
    mut out: impl FnMut(&[u8]) -> io::Result<()>,
) -> io::Result<()> {
    match returned {
        Returned::Headers => out(&original_headers(file, content_offset)?),
        Returned::Full(limit) => {
            let mut r = ContentReader::new(file, content_offset)?;
            let mut buf = vec![0u8; qfile::CHUNK];
            let mut sent = 0u64;
            let mut last = b'\n';
            loop {
                let n = r.read(&mut buf)?;
                if n == 0 {
                    break;
                }
                let mut piece = &buf[..n];
                if let Some(limit) = limit {
                    if sent + n as u64 > limit {
                        // Cut at the last line end within the limit.
                        let room = limit.saturating_sub(sent) as usize;
                        let cut = piece[..room]
                            .iter()
                            .rposition(|&b| b == b'\n')
                            .map_or(0, |i| i + 1);
                        piece = &piece[..cut];
                        if !piece.is_empty() {
                            out(piece)?;
                            last = b'\n';
                        }
                        break;
                    }
                }
                out(piece)?;
                sent += n as u64;
                last = piece[piece.len() - 1];
            }
            if last != b'\n' {
                out(b"\n")?;
            }
            Ok(())
        }
    }
}

/// Why a notice was not queued.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NotQueued {
    /// cleanup refused it for good (a retry would be refused again).
    pub permanent: bool,
    pub reason: String,
}

fn temporary(reason: String) -> NotQueued {
    NotQueued {
        permanent: false,
        reason,
    }
}

fn refused(what: &str, temp: bool, dsn: &str, reason: &str) -> NotQueued {
    NotQueued {
        permanent: !temp,
        reason: format!("{what}: {dsn} {reason}"),
    }
}

/// Queues the notice through cleanup (`public/cleanup`), with the
/// original message streamed from `file`, and returns the notice's queue
/// ID.
pub fn send(
    tree: &QueueTree,
    timeout: Duration,
    n: &Notice,
    file: &File,
) -> Result<String, NotQueued> {
    let path = tree.cleanup_socket();
    let mut s = ipc::connect(&path, timeout).map_err(|e| temporary(e.to_string()))?;
    let io = |e: io::Error| temporary(format!("cleanup service: {e}"));
    let mut attrs = vec![(
        qfile::attr::NOTIFICATION.to_string(),
        n.notification().to_string(),
    )];
    if !n.envid.is_empty() && n.postmaster {
        attrs.push((qfile::attr::ENVID.to_string(), n.envid.clone()));
    }
    if n.smtputf8 {
        // Postfix: the request stays with the mail when it is bounced.
        let flags = smtputf8::Flags {
            requested: true,
            ..Default::default()
        };
        attrs.push((qfile::attr::SMTPUTF8.to_string(), flags.value()));
    }
    ipc::send_open(
        &mut s,
        NewMessage {
            sender: n.from.clone(),
            recipients: vec![Recipient::new(&n.to)],
            attrs,
            flags: cleanup_flags::NOTIFICATION,
            origin: "qmgr".to_string(),
        },
    )
    .map_err(io)?;
    let new_id = match ipc::recv_polled::<CleanupReply>(&s, timeout).map_err(io)? {
        CleanupReply::Opened { queue_id } => queue_id,
        CleanupReply::Failed {
            temporary: t,
            dsn,
            reason,
        } => return Err(refused("cleanup refused the notice", t, &dsn, &reason)),
        other => {
            return Err(temporary(format!(
                "unexpected answer from cleanup: {other:?}"
            )))
        }
    };
    let (head, tail) = compose(n, &new_id, postern_common::time::now_secs());
    let mut chunk = |data: &[u8]| -> io::Result<()> {
        for c in data.chunks(qfile::CHUNK) {
            ipc::send(&mut s, &CleanupRequest::Content(c.to_vec()))?;
        }
        Ok(())
    };
    chunk(&head).map_err(io)?;
    returned_content(file, n.content_offset, n.returned, &mut chunk).map_err(io)?;
    chunk(&tail).map_err(io)?;
    ipc::send(&mut s, &CleanupRequest::Close).map_err(io)?;
    match ipc::recv_polled::<CleanupReply>(&s, timeout).map_err(io)? {
        CleanupReply::Queued { queue_id } => Ok(queue_id),
        CleanupReply::Failed {
            temporary: t,
            dsn,
            reason,
        } => Err(refused(
            "cleanup did not queue the notice",
            t,
            &dsn,
            &reason,
        )),
        other => Err(temporary(format!(
            "unexpected answer from cleanup: {other:?}"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(rcpt: &str, status: &str, relay: &str, reason: &str) -> LogEntry {
        LogEntry {
            recipient: rcpt.into(),
            offset: rcpt.len() as u64,
            status: status.into(),
            action: "failed".into(),
            relay: relay.into(),
            reason: reason.into(),
            ..Default::default()
        }
    }

    /// Header fields of a block of `Name: value` lines (unfolded).
    fn fields(block: &str) -> Vec<(String, String)> {
        let mut out: Vec<(String, String)> = Vec::new();
        for line in block.lines() {
            if line.starts_with([' ', '\t']) {
                if let Some(l) = out.last_mut() {
                    l.1.push(' ');
                    l.1.push_str(line.trim());
                }
            } else if let Some((n, v)) = line.split_once(':') {
                out.push((n.to_ascii_lowercase(), v.trim().to_string()));
            }
        }
        out
    }

    fn get<'a>(f: &'a [(String, String)], name: &str) -> Vec<&'a str> {
        f.iter()
            .filter(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
            .collect()
    }

    #[test]
    fn smtputf8_notice_is_rfc_6533() {
        let mut e = entry("jörg@bücher.test", "5.6.7", "none", "SMTPUTF8 is required");
        e.original = "ali@example.test".into();
        let n = |smtputf8: bool, returned: Returned| Notice {
            myhostname: "mx.example.test".into(),
            kind: Kind::Failure,
            postmaster: false,
            queue_id: "ABCDEF0123456789".into(),
            sender: "ålice@example.test".into(),
            to: "ålice@example.test".into(),
            from: String::new(),
            arrival_secs: 0,
            envid: String::new(),
            retry_until: None,
            entries: vec![e.clone()],
            returned,
            content_offset: 0,
            problem: None,
            mark: None,
            smtputf8,
        };
        let text = |n: &Notice| String::from_utf8(compose(n, "N", 1_700_000_100).0).unwrap();
        let t = text(&n(true, Returned::Full(None)));
        assert!(
            t.contains("Content-Type: message/global-delivery-status\n"),
            "{t}"
        );
        assert!(t.contains("X-Postern-Sender: utf-8; ålice@example.test\n"));
        assert!(t.contains("Final-Recipient: utf-8; jörg@bücher.test\n"));
        assert!(t.contains("Original-Recipient: rfc822; ali@example.test\n"));
        assert!(t.contains("Content-Type: message/global\n"));
        let t = text(&n(true, Returned::Headers));
        assert!(t.contains("Content-Type: message/global-headers\n"));
        // Without SMTPUTF8, the RFC 3464 forms.
        let t = text(&n(false, Returned::Full(None)));
        assert!(t.contains("Content-Type: message/delivery-status\n"));
        assert!(t.contains("Final-Recipient: rfc822; jörg@bücher.test\n"));
        assert!(t.contains("Content-Type: message/rfc822\n"));
    }

    #[test]
    fn notice_parses_back() {
        let mut e1 = entry(
            "gone@remote.test",
            "5.1.1",
            "mx.remote.test[192.0.2.1]:25",
            "host mx.remote.test[192.0.2.1] said: 550 5.1.1 no such user (in reply to RCPT TO command)",
        );
        e1.orcpt = "rfc822;Gone@Remote.test".into();
        let mut e2 = entry("x@h.test", "5.0.0", "none", "no way");
        e2.original = "alias@h.test".into();
        let n = Notice {
            myhostname: "mx.example.test".into(),
            kind: Kind::Failure,
            postmaster: false,
            queue_id: "ABCDEF0123456789".into(),
            sender: "alice@example.test".into(),
            to: "alice@example.test".into(),
            from: String::new(),
            arrival_secs: 1_700_000_000,
            envid: String::new(),
            retry_until: None,
            entries: vec![e1, e2],
            returned: Returned::Headers,
            content_offset: 0,
            problem: None,
            mark: None,
            smtputf8: false,
        };
        let (head, tail) = compose(&n, "NEWID0123456789", 1_700_000_100);
        let mut raw = head;
        raw.extend_from_slice(b"Subject: hello\nFrom: alice@example.test\n");
        raw.extend_from_slice(&tail);
        let raw = String::from_utf8(raw).unwrap();
        assert!(!raw.contains('\r'));
        let (head, body) = raw.split_once("\n\n").unwrap();
        let h = fields(head);
        assert_eq!(
            get(&h, "from"),
            ["MAILER-DAEMON@mx.example.test (Mail Delivery System)"]
        );
        assert_eq!(get(&h, "to"), ["<alice@example.test>"]);
        assert_eq!(get(&h, "subject"), ["Undelivered Mail Returned to Sender"]);
        assert_eq!(get(&h, "auto-submitted"), ["auto-replied"]);
        let ct = get(&h, "content-type")[0];
        assert!(ct.starts_with("multipart/report; report-type=delivery-status;"));
        let boundary = ct
            .split("boundary=\"")
            .nth(1)
            .unwrap()
            .trim_end_matches('"');
        assert_eq!(boundary, "ABCDEF0123456789.1700000100/mx.example.test");

        let parts: Vec<&str> = body.split(&format!("--{boundary}")).collect();
        // preamble, three parts, and the closing "--".
        assert_eq!(parts.len(), 5, "{body}");
        assert!(parts[4].starts_with("--"));
        let part = |i: usize| {
            let p = parts[i].trim_start_matches('\n');
            let (h, b) = p.split_once("\n\n").unwrap();
            (fields(h), b.to_string())
        };
        let (h1, text) = part(1);
        assert_eq!(get(&h1, "content-type"), ["text/plain; charset=us-ascii"]);
        assert!(text.contains("This is the mail system at host mx.example.test."));
        assert!(text.contains(
            "<gone@remote.test>: host mx.remote.test[192.0.2.1] said: 550 5.1.1 no such user"
        ));
        assert!(text.contains("<x@h.test> (expanded from <alias@h.test>): no way"));

        let (h2, report) = part(2);
        assert_eq!(get(&h2, "content-type"), ["message/delivery-status"]);
        let blocks: Vec<Vec<(String, String)>> = report.trim().split("\n\n").map(fields).collect();
        assert_eq!(blocks.len(), 3);
        assert_eq!(get(&blocks[0], "reporting-mta"), ["dns; mx.example.test"]);
        assert_eq!(get(&blocks[0], "x-postern-queue-id"), ["ABCDEF0123456789"]);
        assert_eq!(
            get(&blocks[0], "x-postern-sender"),
            ["rfc822; alice@example.test"]
        );
        assert!(get(&blocks[0], "arrival-date")[0].contains("2023"));
        let r1 = &blocks[1];
        assert_eq!(get(r1, "final-recipient"), ["rfc822; gone@remote.test"]);
        assert_eq!(get(r1, "original-recipient"), ["rfc822;Gone@Remote.test"]);
        assert_eq!(get(r1, "action"), ["failed"]);
        assert_eq!(get(r1, "status"), ["5.1.1"]);
        assert_eq!(get(r1, "remote-mta"), ["dns; mx.remote.test"]);
        assert_eq!(get(r1, "diagnostic-code"), ["smtp; 550 5.1.1 no such user"]);
        let r2 = &blocks[2];
        assert_eq!(get(r2, "final-recipient"), ["rfc822; x@h.test"]);
        assert_eq!(get(r2, "original-recipient"), ["rfc822; alias@h.test"]);
        assert_eq!(get(r2, "status"), ["5.0.0"]);
        assert!(get(r2, "remote-mta").is_empty());
        assert_eq!(get(r2, "diagnostic-code"), ["X-Postern; no way"]);

        let (h3, headers) = part(3);
        assert_eq!(get(&h3, "content-type"), ["text/rfc822-headers"]);
        assert!(headers.starts_with("Subject: hello\nFrom: alice@example.test\n"));
    }

    #[test]
    fn reportable_entries() {
        let mut a = entry("a@x", "5.0.0", "none", "first");
        let mut a2 = a.clone();
        a2.reason = "second".into();
        let mut never = entry("never@x", "5.0.0", "none", "r");
        never.notify = qfile::NOTIFY_NEVER;
        let mut success_only = entry("s@x", "5.0.0", "none", "r");
        success_only.notify = qfile::NOTIFY_SUCCESS;
        a.notify = 0;
        let mut failure = entry("f@x", "5.0.0", "none", "r");
        failure.notify = qfile::NOTIFY_FAILURE | qfile::NOTIFY_DELAY;
        let got = reportable(vec![a, never, success_only, a2, failure]);
        let names: Vec<_> = got
            .iter()
            .map(|e| (e.recipient.as_str(), e.reason.as_str()))
            .collect();
        assert_eq!(names, [("a@x", "second"), ("f@x", "r")]);
    }

    #[test]
    fn problems_actions_and_marks() {
        let e = |status: &str, reason: &str| entry("x@y", status, "none", reason);
        assert_eq!(problem_of(&e("4.3.1", "x")), Some(Problem::Resource));
        assert_eq!(
            problem_of(&e("4.3.0", "write: No space left on device")),
            Some(Problem::Resource)
        );
        assert_eq!(
            problem_of(&e("4.3.0", "unknown mail transport error")),
            Some(Problem::Software)
        );
        assert_eq!(problem_of(&e("5.3.5", "config")), Some(Problem::Software));
        // Another server's X.3.Y reply is not our problem.
        let remote = "host mx.test[192.0.2.1] said: 451 4.3.0 try again later \
                      (in reply to end of DATA command)";
        assert_eq!(problem_of(&e("4.3.0", remote)), None);
        let full = "host mx.test[192.0.2.1] said: 452 4.3.1 Insufficient system storage \
                    (in reply to MAIL FROM command)";
        assert_eq!(problem_of(&e("4.3.1", full)), None);
        let lmtp = "host me.test[private/lmtp] said: 451 4.3.0 Internal error \
                    (in reply to end of DATA command)";
        assert_eq!(problem_of(&e("4.3.0", lmtp)), None);
        assert_eq!(problem_of(&e("4.4.1", "connect: refused")), None);
        // A command that exited EX_TEMPFAIL or EX_SOFTWARE.
        let mut cmd = e("4.3.0", "temporary failure. Command output: busy");
        cmd.diag_type = "x-unix".into();
        assert_eq!(problem_of(&cmd), None);
        cmd.status = "5.3.0".into();
        assert_eq!(problem_of(&cmd), None);
        assert_eq!(problem_of(&e("5.1.1", "no such user")), None);

        let mut s = entry("x@y", "2.0.0", "mx.test[192.0.2.1]:25", "250 ok");
        s.action = "delivered".into();
        assert_eq!(success_action(&s), "relayed");
        s.relay = "local".into();
        assert_eq!(success_action(&s), "delivered");
        s.relay = "mx.test[private/dovecot-lmtp]".into();
        assert_eq!(success_action(&s), "relayed");
        s.action = "expanded".into();
        assert_eq!(success_action(&s), "expanded");

        let log = vec![e("5.0.0", "a"), e("5.0.0", "b")];
        let m = mark("bounce", &log);
        let ms = marks(&[m.clone(), entry("z", "", "", "")]);
        assert_eq!(reported(&ms, "bounce", &log), 2);
        assert_eq!(reported(&ms, "bounce-copy", &log), 0);
        let mut longer = log.clone();
        longer.push(e("5.0.0", "c"));
        assert_eq!(reported(&ms, "bounce", &longer), 2);
        // Another log (a new round's): the mark does not apply.
        assert_eq!(reported(&ms, "bounce", &[e("5.0.0", "c")]), 0);
        assert_eq!(
            reported(&ms, "bounce", &[e("5.0.0", "c"), e("5.0.0", "d")]),
            0
        );
    }

    #[test]
    fn replies_in_reasons() {
        assert_eq!(smtp_reply("550 5.1.1 no"), Some("550 5.1.1 no"));
        assert_eq!(
            smtp_reply("host h[1.2.3.4] said: 554 go away (in reply to end of DATA command)"),
            Some("554 go away")
        );
        assert_eq!(smtp_reply("mailbox full"), None);
        assert_eq!(remote_host("h.test[1.2.3.4]:25"), Some("h.test"));
        assert_eq!(remote_host("none"), None);
        assert_eq!(remote_host("local"), None);
    }
}
