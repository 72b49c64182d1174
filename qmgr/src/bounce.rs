//! Non-delivery notices: composing the RFC 3464 report for the sender of a
//! message whose bounce log has entries, and queueing it through cleanup.
//!
//! The notice is a `multipart/report; report-type=delivery-status`
//! message from `MAILER-DAEMON@$myhostname` with the null sender, in three
//! parts, as Postfix writes it: a human-readable text, the
//! `message/delivery-status` report (one block per message, one per
//! failed recipient), and the original message's headers as
//! `text/rfc822-headers`. It is submitted with the
//! [`cleanup_flags::NOTIFICATION`] flag and the `notification=bounce`
//! attribute, so that a notice that itself fails is never answered with
//! another notice.

use postern_common::delivery::LogEntry;
use postern_common::ipc::{self, cleanup_flags, CleanupReply, CleanupRequest, NewMessage};
use postern_common::qfile::{self, ContentReader, Recipient};
use postern_common::queue::QueueTree;
use std::collections::HashMap;
use std::fs::File;
use std::io::{self, Read};
use std::time::Duration;

/// Most bytes of the original headers that a notice carries.
pub const HEADER_LIMIT: usize = 100 * 1024;

/// Everything a notice says.
#[derive(Debug, Clone)]
pub struct Notice {
    pub myhostname: String,
    /// The queue ID of the message that failed.
    pub queue_id: String,
    /// Its envelope sender: the notice's recipient.
    pub sender: String,
    pub arrival_secs: u64,
    /// One entry per failed recipient.
    pub entries: Vec<LogEntry>,
    /// The failed message's header section, LF line ends.
    pub headers: Vec<u8>,
}

/// The entries a notice reports: the last entry of each recipient, for
/// recipients whose DSN NOTIFY allows failure notices (not given, or
/// containing FAILURE).
pub fn reportable(entries: Vec<LogEntry>) -> Vec<LogEntry> {
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
    out.retain(|e| {
        e.notify == 0
            || (e.notify & qfile::NOTIFY_FAILURE != 0 && e.notify & qfile::NOTIFY_NEVER == 0)
    });
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

fn status_of(e: &LogEntry) -> &str {
    if e.status.is_empty() {
        "5.0.0"
    } else {
        &e.status
    }
}

/// Composes the notice, with LF line ends, as cleanup stores content.
/// `new_id` is the notice's own queue ID (for its Message-Id), `now` the
/// time it is written.
pub fn compose(n: &Notice, new_id: &str, now: u64) -> Vec<u8> {
    let host = &n.myhostname;
    let boundary = format!("{}.{}/{}", n.queue_id, now, host);
    let ascii = n
        .entries
        .iter()
        .all(|e| e.reason.is_ascii() && e.recipient.is_ascii());
    let charset = if ascii { "us-ascii" } else { "utf-8" };
    let mut m = String::new();
    m.push_str(&format!(
        "Date: {}\n",
        postern_common::time::rfc5322_date(now)
    ));
    m.push_str(&format!(
        "From: MAILER-DAEMON@{host} (Mail Delivery System)\n"
    ));
    m.push_str("Subject: Undelivered Mail Returned to Sender\n");
    m.push_str(&format!("To: <{}>\n", n.sender));
    m.push_str("Auto-Submitted: auto-replied\n");
    m.push_str(&format!("Message-Id: <{new_id}.{now}@{host}>\n"));
    m.push_str("MIME-Version: 1.0\n");
    m.push_str(&format!(
        "Content-Type: multipart/report; report-type=delivery-status;\n\tboundary=\"{boundary}\"\n"
    ));
    m.push_str("Content-Transfer-Encoding: 8bit\n");
    m.push('\n');
    m.push_str("This is a MIME-encapsulated message.\n\n");

    // The part for people.
    m.push_str(&format!("--{boundary}\n"));
    m.push_str("Content-Description: Notification\n");
    m.push_str(&format!("Content-Type: text/plain; charset={charset}\n"));
    if !ascii {
        m.push_str("Content-Transfer-Encoding: 8bit\n");
    }
    m.push('\n');
    m.push_str(&format!("This is the mail system at host {host}.\n\n"));
    m.push_str(
        "I'm sorry to have to inform you that your message could not\n\
         be delivered to one or more recipients. It's attached below.\n\n\
         For further assistance, please send mail to postmaster.\n\n\
         If you do so, please include this problem report. You can\n\
         delete your own text from the attached returned message.\n\n\
         \x20                  The mail system\n\n",
    );
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

    // The report for programs (RFC 3464).
    m.push_str(&format!("--{boundary}\n"));
    m.push_str("Content-Description: Delivery report\n");
    m.push_str("Content-Type: message/delivery-status\n\n");
    m.push_str(&format!("Reporting-MTA: dns; {host}\n"));
    m.push_str(&format!("X-Postern-Queue-ID: {}\n", n.queue_id));
    m.push_str(&format!("X-Postern-Sender: rfc822; {}\n", n.sender));
    if n.arrival_secs > 0 {
        m.push_str(&format!(
            "Arrival-Date: {}\n",
            postern_common::time::rfc5322_date(n.arrival_secs)
        ));
    }
    for e in &n.entries {
        m.push('\n');
        m.push_str(&format!("Final-Recipient: rfc822; {}\n", e.recipient));
        if !e.orcpt.is_empty() {
            if e.orcpt.contains(';') {
                m.push_str(&format!("Original-Recipient: {}\n", e.orcpt));
            } else {
                m.push_str(&format!("Original-Recipient: rfc822; {}\n", e.orcpt));
            }
        } else if !e.original.is_empty() && e.original != e.recipient {
            m.push_str(&format!("Original-Recipient: rfc822; {}\n", e.original));
        }
        m.push_str("Action: failed\n");
        m.push_str(&format!("Status: {}\n", status_of(e)));
        if let Some(h) = remote_host(&e.relay) {
            m.push_str(&format!("Remote-MTA: dns; {h}\n"));
        }
        match smtp_reply(&e.reason) {
            Some(reply) => m.push_str(&format!("Diagnostic-Code: smtp; {reply}\n")),
            None => m.push_str(&format!("Diagnostic-Code: X-Postern; {}\n", e.reason)),
        }
    }
    m.push('\n');

    // The returned headers.
    m.push_str(&format!("--{boundary}\n"));
    m.push_str("Content-Description: Undelivered Message Headers\n");
    m.push_str("Content-Type: text/rfc822-headers\n");
    m.push_str("Content-Transfer-Encoding: 8bit\n\n");
    let mut out = m.into_bytes();
    out.extend_from_slice(&n.headers);
    out.extend_from_slice(format!("\n--{boundary}--\n").as_bytes());
    out
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

/// Queues the notice through cleanup (`public/cleanup`) and returns the
/// notice's queue ID.
pub fn send(tree: &QueueTree, timeout: Duration, n: &Notice) -> Result<String, NotQueued> {
    let path = tree.cleanup_socket();
    let mut s = ipc::connect(&path, timeout).map_err(|e| temporary(e.to_string()))?;
    let io = |e: io::Error| temporary(format!("cleanup service: {e}"));
    ipc::send(
        &mut s,
        &CleanupRequest::Open(NewMessage {
            sender: String::new(),
            recipients: vec![Recipient::new(&n.sender)],
            attrs: vec![(qfile::attr::NOTIFICATION.to_string(), "bounce".to_string())],
            flags: cleanup_flags::NOTIFICATION,
            origin: "qmgr".to_string(),
        }),
    )
    .map_err(io)?;
    let new_id = match ipc::recv::<_, CleanupReply>(&mut s).map_err(io)? {
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
    let body = compose(n, &new_id, postern_common::time::now_secs());
    for chunk in body.chunks(qfile::CHUNK) {
        ipc::send(&mut s, &CleanupRequest::Content(chunk.to_vec())).map_err(io)?;
    }
    ipc::send(&mut s, &CleanupRequest::Close).map_err(io)?;
    match ipc::recv::<_, CleanupReply>(&mut s).map_err(io)? {
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
            queue_id: "ABCDEF0123456789".into(),
            sender: "alice@example.test".into(),
            arrival_secs: 1_700_000_000,
            entries: vec![e1, e2],
            headers: b"Subject: hello\nFrom: alice@example.test\n".to_vec(),
        };
        let raw = String::from_utf8(compose(&n, "NEWID0123456789", 1_700_000_100)).unwrap();
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
