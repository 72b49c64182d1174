//! Handing one maildrop file to cleanup.

use postern_common::dsn;
use postern_common::info;
use postern_common::ipc::{self, cleanup_flags, CleanupReply, CleanupRequest, NewMessage};
use postern_common::qfile::{self, attr, ContentReader};
use postern_common::queue::QueueTree;
use postern_conf::Config;
use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::time::Duration;

pub struct Settings {
    timeout: Duration,
    /// `content_filter`, recorded for each message (as Postfix's pickup).
    content_filter: String,
    /// `receive_override_options`: the cleanup flags it sets.
    override_flags: u32,
    /// `cleanup_service_name`: the cleanup service's socket in `public/`.
    cleanup_service: String,
}

impl Settings {
    pub fn from_config(cfg: &Config) -> Settings {
        let overrides = postern_common::receive_override::ReceiveOverride::parse(
            &cfg.get("receive_override_options"),
        )
        .unwrap_or_else(|e| {
            postern_common::warning!("{e}");
            Default::default()
        });
        Settings {
            timeout: Duration::from_secs(cfg.get_time("ipc_timeout").unwrap_or(3600)),
            content_filter: cfg.get("content_filter").trim().to_string(),
            override_flags: overrides.cleanup_flags,
            cleanup_service: cfg.get("cleanup_service_name").trim().to_string(),
        }
    }
}

/// Local submission has no recipient count limit (as in Postfix); the
/// envelope must only fit in one message to cleanup, with room to spare
/// for the encoding.
fn envelope_fits(env: &qfile::Envelope) -> bool {
    let bytes: usize = env
        .recipients
        .iter()
        .map(|r| r.rcpt.address.len() + r.rcpt.orcpt.len() + 16)
        .sum();
    bytes < (ipc::MAX_MESSAGE / 2) as usize
}

pub enum Outcome {
    Queued,
    /// cleanup refused it for good (no recipients, too big, ...).
    Rejected(String),
    Corrupt(String),
    TryLater(String),
}

/// Submits one complete maildrop file.
pub fn submit(tree: &QueueTree, s: &Settings, file: &std::fs::File) -> Outcome {
    let env = match qfile::read_envelope(file) {
        Ok(e) => e,
        Err(qfile::ReadError::Incomplete) => return Outcome::TryLater("incomplete".into()),
        Err(e) => return Outcome::Corrupt(e.to_string()),
    };
    let (mut new, uid) = match new_message(&env, file) {
        Ok(m) => m,
        Err(refused) => return refused,
    };
    new.flags |= s.override_flags;
    if !s.content_filter.is_empty() {
        new.attrs
            .push((attr::FILTER.to_string(), s.content_filter.clone()));
    }
    let path = tree.socket(false, &s.cleanup_service);
    let mut conn = match ipc::connect(&path, s.timeout) {
        Ok(c) => c,
        Err(e) => return Outcome::TryLater(format!("cleanup unavailable: {e}")),
    };
    let io_err = |e: std::io::Error| Outcome::TryLater(format!("cleanup: {e}"));
    if let Err(e) = ipc::send_open(&mut conn, new) {
        return io_err(e);
    }
    let queue_id = match ipc::recv_polled::<CleanupReply>(&conn, s.timeout) {
        Ok(CleanupReply::Opened { queue_id }) => queue_id,
        Ok(CleanupReply::Failed {
            temporary: false,
            reason,
            ..
        }) => return Outcome::Rejected(reason),
        Ok(other) => return Outcome::TryLater(format!("cleanup: {other:?}")),
        Err(e) => return io_err(e),
    };
    info!("{queue_id}: uid={uid} from=<{}>", env.sender);
    let mut content = match ContentReader::new(file, env.content_offset) {
        Ok(c) => c,
        Err(e) => return Outcome::Corrupt(e.to_string()),
    };
    let mut buf = vec![0u8; qfile::CHUNK];
    loop {
        let n = match content.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) => {
                let _ = ipc::send(&mut conn, &CleanupRequest::Abort);
                return Outcome::Corrupt(e.to_string());
            }
        };
        if let Err(e) = ipc::send(&mut conn, &CleanupRequest::Content(buf[..n].to_vec())) {
            return io_err(e);
        }
    }
    if let Err(e) = ipc::send(&mut conn, &CleanupRequest::Close) {
        return io_err(e);
    }
    match ipc::recv_polled::<CleanupReply>(&conn, s.timeout) {
        Ok(CleanupReply::Queued { .. }) => Outcome::Queued,
        Ok(CleanupReply::Failed {
            temporary: false,
            reason,
            ..
        }) => Outcome::Rejected(reason),
        Ok(CleanupReply::Failed { reason, .. }) => Outcome::TryLater(reason),
        Ok(other) => Outcome::TryLater(format!("cleanup: unexpected {other:?}")),
        Err(e) => io_err(e),
    }
}

/// The message to open at cleanup for the maildrop file `file`, whose
/// envelope is `env`, and the uid of its submitter; or why not.
fn new_message(env: &qfile::Envelope, file: &std::fs::File) -> Result<(NewMessage, u32), Outcome> {
    // A maildrop file comes from an unprivileged user: take only what
    // sendmail writes, and nothing that would pass as a done recipient or
    // a notification.
    if env.recipients.iter().any(|r| r.done) {
        return Err(Outcome::Corrupt("done recipient in maildrop file".into()));
    }
    if !envelope_fits(env) {
        return Err(Outcome::Rejected(format!(
            "too many recipients ({})",
            env.recipients.len()
        )));
    }
    let bad = |v: &str| v.bytes().any(|b| b < 32 || b == 127);
    if bad(&env.sender)
        || env
            .recipients
            .iter()
            .any(|r| bad(&r.rcpt.address) || r.rcpt.address.is_empty())
    {
        return Err(Outcome::Corrupt("control characters in an address".into()));
    }
    // sendmail has exited 0 already: a refusal must reach the sender as
    // a bounce, not just a log line.
    let mut flags = cleanup_flags::BOUNCE_ON_REFUSAL;
    let mut attrs = Vec::new();
    for (n, v) in &env.attrs {
        match n.as_str() {
            attr::EXTRACT_RECIPIENTS => flags |= cleanup_flags::EXTRACT_RECIPIENTS,
            attr::FULL_NAME if !bad(v) => attrs.push((n.clone(), v.clone())),
            // DSN from sendmail -R/-V and -bs.
            attr::ENVID if dsn::valid_envid(v) => attrs.push((n.clone(), v.clone())),
            attr::RET if dsn::parse_ret(v) == Some(v.as_str()) => {
                attrs.push((n.clone(), v.clone()))
            }
            _ => {}
        }
    }
    // The file's owner is who wrote it, unless it is mail_owner (us): a
    // sendmail run by root hands its file to mail_owner, and then the uid
    // it recorded is the one to believe.
    let owner = file.metadata().map(|m| m.uid()).unwrap_or(u32::MAX);
    let recorded = env
        .attr(attr::SUBMITTER)
        .and_then(|v| v.parse::<u32>().ok());
    let uid = match recorded {
        Some(u) if owner == nix::unistd::geteuid().as_raw() => u,
        _ => owner,
    };
    attrs.push((attr::CLIENT.to_string(), "local".to_string()));
    attrs.push((attr::PROTOCOL.to_string(), "sendmail".to_string()));
    attrs.push((attr::SOURCE.to_string(), "LOCAL".to_string()));
    attrs.push((attr::SUBMITTER.to_string(), format!("uid={uid}")));
    let recipients = env
        .recipients
        .iter()
        .map(|r| qfile::Recipient {
            // DSN NOTIFY (sendmail -N) and ORCPT (-bs) are the user's to
            // set; the original address is not.
            notify: r.rcpt.notify & 0x0f,
            orcpt: if bad(&r.rcpt.orcpt) {
                String::new()
            } else {
                r.rcpt.orcpt.clone()
            },
            ..qfile::Recipient::new(&r.rcpt.address)
        })
        .collect();
    let new = NewMessage {
        sender: env.sender.clone(),
        recipients,
        attrs,
        flags,
        origin: "pickup".into(),
    };
    Ok((new, uid))
}
