//! The outcome of one delivery attempt (a mailbox, a file, a command, a
//! forwarded copy), and how several of them make one recipient's outcome.

use postern_common::ipc::Outcome;
use std::io;

/// What happened to one delivery: what `job.record` takes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Status {
    pub outcome: Outcome,
    /// Enhanced status code ("2.0.0", "4.2.0", "5.1.1").
    pub dsn: String,
    pub reason: String,
    /// `x-unix` when the reason is a command's exit status (see
    /// `postern_common::delivery::LogEntry::diag_type`), else "".
    pub diag_type: &'static str,
}

impl Status {
    pub fn sent(reason: impl Into<String>) -> Status {
        Status {
            outcome: Outcome::Sent,
            dsn: "2.0.0".into(),
            reason: reason.into(),
            diag_type: "",
        }
    }

    pub fn defer(dsn: &str, reason: impl Into<String>) -> Status {
        Status {
            outcome: Outcome::Deferred,
            dsn: dsn.into(),
            reason: reason.into(),
            diag_type: "",
        }
    }

    pub fn bounce(dsn: &str, reason: impl Into<String>) -> Status {
        Status {
            outcome: Outcome::Bounced,
            dsn: dsn.into(),
            reason: reason.into(),
            diag_type: "",
        }
    }

    /// A system error while writing mail. Nothing is lost: every error is
    /// temporary except a file that would grow too large (EFBIG).
    /// Problems of the mailbox itself (permissions, quota, locks) are
    /// 4.2.0; problems of the system (disk full, I/O) 4.3.0.
    pub fn io(e: &io::Error, context: &str) -> Status {
        let text = format!("{context}: {}", strip_os_error(e));
        match e.raw_os_error() {
            Some(libc::EFBIG) => Status::bounce("5.2.2", text),
            Some(
                libc::EACCES
                | libc::EPERM
                | libc::EDQUOT
                | libc::EAGAIN
                | libc::ENOENT
                | libc::ENOTDIR
                | libc::ELOOP
                | libc::EEXIST
                | libc::EROFS,
            ) => Status::defer("4.2.0", text),
            _ => Status::defer("4.3.0", text),
        }
    }

    /// This status is what a command's exit said (a deferral or bounce of
    /// the message, not a problem of the mail system).
    pub fn from_command(mut self) -> Status {
        if self.outcome != Outcome::Sent {
            self.diag_type = "x-unix";
        }
        self
    }

    #[cfg(test)]
    pub fn is_sent(&self) -> bool {
        self.outcome == Outcome::Sent
    }
}

/// `No such file or directory` rather than Rust's `... (os error 2)`.
pub fn strip_os_error(e: &io::Error) -> String {
    let s = e.to_string();
    match s.find(" (os error ") {
        Some(i) if s.ends_with(')') => s[..i].to_string(),
        _ => s,
    }
}

/// One recipient's outcome from the outcomes of every destination its
/// address expanded to: deferred if any was deferred (the recipient will
/// be tried again), else bounced if any bounced, else sent. The reason is
/// the first deciding one; the reasons of several successes are joined.
pub fn combine(all: &[Status]) -> Status {
    if let Some(d) = all.iter().find(|s| s.outcome == Outcome::Deferred) {
        return d.clone();
    }
    if let Some(b) = all.iter().find(|s| s.outcome == Outcome::Bounced) {
        return b.clone();
    }
    let mut reasons: Vec<&str> = Vec::new();
    for s in all {
        if !reasons.contains(&s.reason.as_str()) {
            reasons.push(&s.reason);
        }
    }
    if reasons.is_empty() {
        return Status::bounce("5.3.5", "mail system configuration error: empty alias");
    }
    Status::sent(reasons.join("; "))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn combining() {
        let a = Status::sent("delivered to mailbox");
        let b = Status::sent("forwarded as ABC");
        let c = Status::bounce("5.1.1", "unknown user: \"x\"");
        let d = Status::defer("4.2.0", "locked");
        assert_eq!(
            combine(&[a.clone(), b.clone(), a.clone()]).reason,
            "delivered to mailbox; forwarded as ABC"
        );
        assert_eq!(combine(&[a.clone(), c.clone()]), c);
        assert_eq!(combine(&[c, a, d.clone()]), d);
        assert_eq!(combine(&[]).outcome, Outcome::Bounced);
        let e = io::Error::from_raw_os_error(libc::EACCES);
        let s = Status::io(&e, "open x");
        assert_eq!((s.outcome, s.dsn.as_str()), (Outcome::Deferred, "4.2.0"));
        assert_eq!(s.reason, "open x: Permission denied");
        let s = Status::io(&io::Error::from_raw_os_error(libc::ENOSPC), "w");
        assert_eq!(s.dsn, "4.3.0");
    }
}
