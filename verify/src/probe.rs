//! A probe: a message without content through cleanup, from
//! `address_verify_sender` (an empty value: the null sender) to the
//! address, flagged `trace_flags=verify` and submitted as a notification
//! (no header checks, no automatic bcc: Postfix's
//! `CLEANUP_FLAG_MASK_INTERNAL`), its recipient with NOTIFY=NEVER.

use postern_common::ipc::{self, cleanup_flags, CleanupReply, CleanupRequest, NewMessage};
use postern_common::qfile::{self, Recipient};
use postern_conf::Config;
use std::time::Duration;

/// Queues a probe for `address`; returns its queue ID.
pub fn send(cfg: &Config, address: &str) -> Result<String, String> {
    let tree = postern_common::queue::QueueTree::new(postern_common::service::queue_directory(cfg));
    let timeout = Duration::from_secs(cfg.get_time("ipc_timeout").unwrap_or(3600).max(1));
    let mut s = ipc::connect(&tree.cleanup_socket(), timeout).map_err(|e| e.to_string())?;
    let io = |e: std::io::Error| format!("cleanup service: {e}");
    let sender = cfg.get("address_verify_sender");
    let sender = match sender.trim() {
        "<>" => String::new(),
        s => s.to_string(),
    };
    let rcpt = Recipient {
        notify: qfile::NOTIFY_NEVER,
        ..Recipient::new(address)
    };
    ipc::send_open(
        &mut s,
        NewMessage {
            sender,
            recipients: vec![rcpt],
            attrs: vec![(
                qfile::attr::TRACE_FLAGS.to_string(),
                postern_common::verify::PROBE.to_string(),
            )],
            flags: cleanup_flags::NOTIFICATION,
            origin: "verify".to_string(),
        },
    )
    .map_err(io)?;
    match ipc::recv::<_, CleanupReply>(&mut s).map_err(io)? {
        CleanupReply::Opened { .. } => {}
        other => return Err(format!("cleanup refused the probe: {other:?}")),
    }
    ipc::send(&mut s, &CleanupRequest::Close).map_err(io)?;
    match ipc::recv::<_, CleanupReply>(&mut s).map_err(io)? {
        CleanupReply::Queued { queue_id } => Ok(queue_id),
        other => Err(format!("cleanup refused the probe: {other:?}")),
    }
}
