//! Forwarding: a new message through cleanup to remote alias targets and
//! to `luser_relay`, with the original sender and a `Delivered-To:` line
//! naming the recipient it was forwarded for (what loop detection finds
//! when the mail comes back).

use crate::status::Status;
use postern_common::ipc::{self, cleanup_flags, CleanupReply, CleanupRequest, NewMessage};
use postern_common::qfile::Recipient;
use std::io::Read;
use std::path::Path;
use std::time::Duration;

/// One forwarded message.
pub struct Forward<'a> {
    /// cleanup's socket (`QueueTree::cleanup_socket`).
    pub cleanup: &'a Path,
    pub timeout: Duration,
    /// The original envelope sender.
    pub sender: &'a str,
    pub recipients: Vec<Recipient>,
    /// Prepended as `Delivered-To: ...` when set.
    pub delivered_to: Option<&'a str>,
    /// The original asked for SMTPUTF8: so does the forwarded copy (as
    /// Postfix keeps the request through aliases and `.forward`).
    pub smtputf8: bool,
    /// The original came with REQUIRETLS (RFC 8689): the forwarded copy
    /// keeps it, so that it too leaves only over authenticated TLS.
    pub requiretls: bool,
}

impl Forward<'_> {
    /// Submits the message; sent as `forwarded as ID` once cleanup has
    /// queued it.
    pub fn submit(&self, content: &mut dyn Read) -> Status {
        let fail = |e: std::io::Error| {
            Status::defer(
                "4.3.0",
                format!(
                    "cannot forward: mail system is down: {}",
                    crate::status::strip_os_error(&e)
                ),
            )
        };
        let mut s = match ipc::connect(self.cleanup, self.timeout) {
            Ok(s) => s,
            Err(e) => return fail(e),
        };
        let envelope = NewMessage {
            sender: self.sender.to_string(),
            recipients: self.recipients.clone(),
            attrs: {
                let mut attrs = Vec::new();
                if self.smtputf8 {
                    let flags = postern_common::smtputf8::Flags {
                        requested: true,
                        ..Default::default()
                    };
                    attrs.push((postern_common::qfile::attr::SMTPUTF8.into(), flags.value()));
                }
                if self.requiretls {
                    attrs.push((postern_common::qfile::attr::REQUIRETLS.into(), "yes".into()));
                }
                attrs
            },
            flags: cleanup_flags::NO_HEADER_FIXUP,
            origin: "local".into(),
        };
        if let Err(e) = ipc::send_open(&mut s, envelope) {
            return fail(e);
        }
        match ipc::recv_polled::<CleanupReply>(&s, self.timeout) {
            Ok(CleanupReply::Opened { .. }) => {}
            Ok(other) => return refused(other),
            Err(e) => return fail(e),
        }
        if let Some(d) = self.delivered_to {
            let line = format!("Delivered-To: {}\n", d.replace(['\n', '\r'], " "));
            if let Err(e) = ipc::send(&mut s, &CleanupRequest::Content(line.into_bytes())) {
                return fail(e);
            }
        }
        let mut buf = vec![0u8; postern_common::qfile::CHUNK];
        loop {
            let n = match content.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    let _ = ipc::send(&mut s, &CleanupRequest::Abort);
                    return Status::defer(
                        "4.3.0",
                        format!(
                            "cannot read queue file: {}",
                            crate::status::strip_os_error(&e)
                        ),
                    );
                }
            };
            if let Err(e) = ipc::send(&mut s, &CleanupRequest::Content(buf[..n].to_vec())) {
                return fail(e);
            }
        }
        if let Err(e) = ipc::send(&mut s, &CleanupRequest::Close) {
            return fail(e);
        }
        match ipc::recv_polled::<CleanupReply>(&s, self.timeout) {
            Ok(CleanupReply::Queued { queue_id }) => {
                Status::sent(format!("forwarded as {queue_id}"))
            }
            Ok(other) => refused(other),
            Err(e) => fail(e),
        }
    }
}

fn refused(r: CleanupReply) -> Status {
    match r {
        CleanupReply::Failed {
            temporary,
            dsn,
            reason,
        } => {
            let reason = format!("cannot forward: {reason}");
            if temporary {
                Status::defer(if dsn.starts_with('4') { &dsn } else { "4.3.0" }, reason)
            } else {
                Status::bounce(if dsn.starts_with('5') { &dsn } else { "5.3.0" }, reason)
            }
        }
        other => Status::defer(
            "4.3.0",
            format!("cannot forward: unexpected reply from cleanup: {other:?}"),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use postern_common::ipc::Outcome;
    use std::os::unix::net::UnixListener;

    /// A cleanup that answers one message and returns what it was sent.
    fn fake_cleanup(
        sock: &Path,
        final_reply: CleanupReply,
    ) -> std::thread::JoinHandle<(NewMessage, Vec<u8>)> {
        let l = UnixListener::bind(sock).unwrap();
        std::thread::spawn(move || {
            let (mut c, _) = l.accept().unwrap();
            let CleanupRequest::Open = ipc::recv::<_, CleanupRequest>(&mut c).unwrap() else {
                panic!("no Open");
            };
            let m = match ipc::recv::<_, CleanupRequest>(&mut c).unwrap() {
                CleanupRequest::Envelope(m) => m,
                other => panic!("{other:?}"),
            };
            ipc::send(
                &mut c,
                &CleanupReply::Opened {
                    queue_id: "X".into(),
                },
            )
            .unwrap();
            let mut data = Vec::new();
            loop {
                match ipc::recv::<_, CleanupRequest>(&mut c).unwrap() {
                    CleanupRequest::Content(b) => data.extend_from_slice(&b),
                    CleanupRequest::Close => break,
                    other => panic!("{other:?}"),
                }
            }
            ipc::send(&mut c, &final_reply).unwrap();
            (m, data)
        })
    }

    #[test]
    fn forwards_through_cleanup() {
        let dir = std::env::temp_dir().join(format!("plocal-fwd-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let sock = dir.join("cleanup");
        let t = fake_cleanup(
            &sock,
            CleanupReply::Queued {
                queue_id: "ABCDEF0123456789".into(),
            },
        );
        let f = Forward {
            cleanup: &sock,
            timeout: Duration::from_secs(10),
            sender: "s@x.test",
            recipients: vec![Recipient::new("a@r.test"), Recipient::new("b@r.test")],
            delivered_to: Some("list@h.test"),
            smtputf8: false,
            requiretls: false,
        };
        let s = f.submit(&mut &b"Subject: hi\n\nbody\n"[..]);
        assert_eq!(s, Status::sent("forwarded as ABCDEF0123456789"));
        let (m, data) = t.join().unwrap();
        assert_eq!(m.sender, "s@x.test");
        assert_eq!(m.recipients.len(), 2);
        assert_eq!(m.flags, cleanup_flags::NO_HEADER_FIXUP);
        assert_eq!(m.origin, "local");
        assert_eq!(data, b"Delivered-To: list@h.test\nSubject: hi\n\nbody\n");

        std::fs::remove_file(&sock).unwrap();
        let t = fake_cleanup(
            &sock,
            CleanupReply::Failed {
                temporary: false,
                dsn: "5.7.1".into(),
                reason: "no".into(),
            },
        );
        let s = f.submit(&mut &b"x\n"[..]);
        assert_eq!((s.outcome, s.dsn.as_str()), (Outcome::Bounced, "5.7.1"));
        t.join().unwrap();

        std::fs::remove_file(&sock).unwrap();
        let s = f.submit(&mut &b"x\n"[..]);
        assert_eq!((s.outcome, s.dsn.as_str()), (Outcome::Deferred, "4.3.0"));
        std::fs::remove_dir_all(dir).unwrap();
    }
}
