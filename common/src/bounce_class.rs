//! Bounce classification (`bounce_classifier_maps`): every failure a
//! recipient meets — a remote server's reply, or one of Postern's own
//! (DNS failure, connection refused, TLS failure, expiry) — gets a class
//! name such as `bad-mailbox` or `quota-issues` (PowerMTA's 17 bounce
//! categories and KumoMTA's extra ones; `conf/etc/bounce_classes`).
//!
//! The input of the table is one line, `"<code> <enhanced> <text>"`, as
//! KumoMTA's classifier and the reply rules see it: for a remote reply
//! the reply itself (from Postern's reason `host H[A] said: 550 5.1.1
//! text (in reply to RCPT TO command)`), for Postern's own failure a code
//! made from the status (4.x.x → 451, 5.x.x → 550) and the reason. The
//! first pattern that matches wins; nothing matching is `other`.
//!
//! With `bounce_classifier_maps` empty (the default) the rules shipped in
//! `conf/etc/bounce_classes` are used, compiled in: every failure has a
//! class whether or not the administrator configured a table. A table
//! that cannot be looked up gives `other` (logged).
//!
//! Who calls it: [`crate::delivery::LogEntry::new`] (every defer and
//! bounce log entry, written by the delivery agents, cleanup and qmgr)
//! and the accounting log ([`crate::accounting`]). [`init`] is called by
//! every daemon's [`crate::service::start`], as root, before the
//! privilege drop (the table may be readable by root only). It touches
//! nothing but the table.

use crate::maps::Tables;
use crate::regexp;
use std::sync::OnceLock;

/// The rules shipped in `conf/etc/bounce_classes`, used when
/// `bounce_classifier_maps` is empty.
pub const BUILTIN_RULES: &str = include_str!("../../conf/etc/bounce_classes");

/// The class of a failure nothing matched.
pub const OTHER: &str = "other";

/// The class names Postern ships rules for: PowerMTA's 17 categories,
/// then KumoMTA's extra ones.
pub const CLASSES: &[&str] = &[
    "bad-mailbox",
    "inactive-mailbox",
    "quota-issues",
    "bad-domain",
    "routing-errors",
    "no-answer-from-host",
    "bad-connection",
    "relaying-issues",
    "policy-related",
    "spam-related",
    "virus-related",
    "content-related",
    "protocol-errors",
    "bad-configuration",
    "invalid-sender",
    "message-expired",
    "other",
    "dns-failure",
    "too-many-recipients",
    "authentication-failed",
    "auto-reply",
];

enum Classifier {
    Builtin(Vec<regexp::Rule>),
    Tables(Tables),
}

static CLASSIFIER: OnceLock<Classifier> = OnceLock::new();

fn builtin() -> Vec<regexp::Rule> {
    regexp::parse(BUILTIN_RULES).expect("conf/etc/bounce_classes parses")
}

/// Opens `bounce_classifier_maps` (once per process; later calls do
/// nothing). Called as root before the privilege drop.
pub fn init(cfg: &postern_conf::Config) {
    let spec = cfg.get("bounce_classifier_maps");
    let _ = CLASSIFIER.get_or_init(|| {
        if spec.trim().is_empty() {
            return Classifier::Builtin(builtin());
        }
        let (tables, problems) = Tables::open_list(&spec);
        for p in problems {
            crate::warning!("bounce_classifier_maps: {p}");
        }
        Classifier::Tables(tables)
    });
}

/// A failure as the classifier and the accounting log see it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Reply {
    /// The SMTP reply code (for Postern's own failures: 451 or 550).
    pub code: u16,
    /// The enhanced status code, "5.1.1".
    pub enhanced: String,
    /// The reply text (without code and enhanced code), or Postern's reason.
    pub content: String,
    /// The command the reply answered ("RCPT TO", "end of DATA"), if remote.
    pub command: String,
    /// Whether a remote server said it.
    pub remote: bool,
}

impl Reply {
    /// The one line the classifier (and the reply rules) match:
    /// `"<code> <enhanced> <text>"`.
    pub fn line(&self) -> String {
        format!("{} {} {}", self.code, self.enhanced, self.content)
    }
}

/// Splits Postern's reason (as in the defer/bounce log and the delivery
/// line) into the reply it reports. `dsn` is the recipient's status.
pub fn parse_reason(dsn: &str, reason: &str) -> Reply {
    // A remote reply: "host H[A] said: REPLY (in reply to C command)" for
    // a failure, the bare reply for a delivery ("250 2.0.0 Ok: queued").
    let said = reason.find(" said: ").map(|at| at + 7).or_else(|| {
        let b = reason.as_bytes();
        (b.len() >= 4 && b[..3].iter().all(u8::is_ascii_digit) && matches!(b[3], b' ' | b'-'))
            .then_some(0)
    });
    if let Some(at) = said {
        let mut rest = reason[at..].trim();
        let mut command = String::new();
        if let Some(open) = rest.rfind(" (in reply to ") {
            if rest.ends_with(" command)") {
                command = rest[open + 14..rest.len() - 9].to_string();
                rest = rest[..open].trim_end();
            }
        }
        let code_ok = rest.len() >= 3 && rest.as_bytes()[..3].iter().all(u8::is_ascii_digit);
        if code_ok {
            let code: u16 = rest[..3].parse().unwrap_or(0);
            let after = rest[3..].trim_start_matches(['-', ' ']);
            let (enhanced, content) = match after.split_once(' ') {
                Some((e, t)) if is_enhanced(e) => (e.to_string(), t.to_string()),
                None if is_enhanced(after) => (after.to_string(), String::new()),
                _ => (dsn.to_string(), after.to_string()),
            };
            return Reply {
                code,
                enhanced,
                content,
                command,
                remote: true,
            };
        }
    }
    let code = match dsn.as_bytes().first() {
        Some(b'2') => 250,
        Some(b'5') => 550,
        _ => 451,
    };
    Reply {
        code,
        enhanced: if dsn.is_empty() {
            "4.0.0".into()
        } else {
            dsn.to_string()
        },
        content: reason.to_string(),
        command: String::new(),
        remote: false,
    }
}

/// "5.1.1", "4.7.26": an RFC 3463 enhanced status code.
pub fn is_enhanced(s: &str) -> bool {
    let parts: Vec<&str> = s.split('.').collect();
    parts.len() == 3
        && matches!(parts[0], "2" | "4" | "5")
        && parts[1..]
            .iter()
            .all(|p| !p.is_empty() && p.len() <= 3 && p.bytes().all(|b| b.is_ascii_digit()))
}

/// The class of one reply line `"<code> <enhanced> <text>"`.
pub fn classify_line(line: &str) -> String {
    let c = CLASSIFIER.get_or_init(|| Classifier::Builtin(builtin()));
    let found = match c {
        Classifier::Builtin(rules) => regexp::lookup(rules, line),
        Classifier::Tables(t) => match t.lookup(line) {
            Ok(v) => v.map(|v| v.into_owned()),
            Err(e) => {
                crate::warning!("bounce_classifier_maps lookup error: {e}");
                None
            }
        },
    };
    match found {
        Some(v) => {
            let v = v.trim();
            // Only the first word: a class is a name.
            match v.split_whitespace().next() {
                Some(w) => w.to_string(),
                None => OTHER.to_string(),
            }
        }
        None => OTHER.to_string(),
    }
}

/// The class of a recipient's failure, from its status and Postern's
/// reason (see [`parse_reason`]).
pub fn classify(dsn: &str, reason: &str) -> String {
    classify_line(&parse_reason(dsn, reason).line())
}

/// The class of a message that expired: "Message expired" and the last
/// reason it was deferred for (Postern's own failure, class
/// `message-expired` with the shipped rules).
pub fn classify_expired(last_reason: &str) -> String {
    let (code, enh) = (550, "4.4.7");
    classify_line(&format!("{code} {enh} Message expired: {last_reason}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn class(dsn: &str, reason: &str) -> String {
        let rules = builtin();
        regexp::lookup(&rules, &parse_reason(dsn, reason).line()).unwrap()
    }

    #[test]
    fn the_shipped_rules_parse_and_name_known_classes() {
        let rules = builtin();
        for r in &rules {
            assert!(CLASSES.contains(&r.result.as_str()), "{}", r.result);
        }
        for c in CLASSES {
            assert!(rules.iter().any(|r| r.result == *c), "no rule gives {c}");
        }
    }

    #[test]
    fn remote_replies() {
        let r = parse_reason(
            "5.1.1",
            "host mx.b.test[127.0.0.1] said: 550 5.1.1 <c@b.test>: Recipient address rejected: User unknown (in reply to RCPT TO command)",
        );
        assert_eq!(r.code, 550);
        assert_eq!(r.enhanced, "5.1.1");
        assert_eq!(r.command, "RCPT TO");
        assert!(r.remote);
        assert_eq!(
            r.content,
            "<c@b.test>: Recipient address rejected: User unknown"
        );
        assert_eq!(
            class("5.1.1", "host h[1.2.3.4] said: 550 5.1.1 <c@b.test>: Recipient address rejected: User unknown (in reply to RCPT TO command)"),
            "bad-mailbox"
        );
        assert_eq!(
            class(
                "5.2.2",
                "host h[1.2.3.4] said: 552 5.2.2 mailbox full (in reply to RCPT TO command)"
            ),
            "quota-issues"
        );
        assert_eq!(
            class(
                "4.7.1",
                "host h[1.2.3.4] said: 451 4.7.1 rate limited (in reply to MAIL FROM command)"
            ),
            "policy-related"
        );
        // Text before codes: "blocked" in a 5.1.1 reply is spam-related.
        assert_eq!(
            class("5.1.1", "host h[1.2.3.4] said: 550 5.1.1 sender blocked by Spamhaus (in reply to RCPT TO command)"),
            "spam-related"
        );
        assert_eq!(
            class("5.7.26", "host h[1.2.3.4] said: 550 5.7.26 Unauthenticated email is not accepted (in reply to end of DATA command)"),
            "authentication-failed"
        );
        assert_eq!(
            class(
                "5.5.3",
                "host h[1.2.3.4] said: 452 4.5.3 Too many recipients (in reply to RCPT TO command)"
            ),
            "too-many-recipients"
        );
        let r = parse_reason("2.0.0", "250 2.0.0 Ok: queued as X");
        assert_eq!(
            (r.code, r.enhanced.as_str(), r.content.as_str()),
            (250, "2.0.0", "Ok: queued as X")
        );
        assert!(r.remote);
        // No enhanced code in the reply: the recipient's status stands in.
        let r = parse_reason(
            "5.0.0",
            "host h[1.2.3.4] said: 550 no (in reply to RCPT TO command)",
        );
        assert_eq!(
            (r.code, r.enhanced.as_str(), r.content.as_str()),
            (550, "5.0.0", "no")
        );
    }

    #[test]
    fn own_failures() {
        assert_eq!(
            class(
                "4.4.1",
                "connect to 127.0.0.1[127.0.0.1]:25: Connection refused"
            ),
            "bad-connection"
        );
        assert_eq!(
            class("5.4.4", "Host or domain name not found. Name service error for name=nx.test type=MX: Host not found"),
            "dns-failure"
        );
        assert_eq!(
            class("4.4.3", "Host or domain name not found. Name service error for name=x.test type=MX: Host not found, try again"),
            "dns-failure"
        );
        assert_eq!(
            class("4.4.2", "conversation with h[1.2.3.4] timed out while receiving the initial server greeting"),
            "no-answer-from-host"
        );
        let rules = builtin();
        assert_eq!(
            regexp::lookup(
                &rules,
                "550 4.4.7 Message expired: connect to h[1.2.3.4]:25: Connection refused"
            )
            .unwrap(),
            "message-expired"
        );
        assert_eq!(class("5.1.1", "unknown user: \"nobody\""), "bad-mailbox");
        assert_eq!(class("4.3.0", "zzz"), "other");
    }
}
