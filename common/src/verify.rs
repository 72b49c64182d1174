//! Address verification (Postfix's verify(8) protocol), the one
//! definition: the requests the `verify` service answers on
//! `private/verify`, the status of an address, and the client that smtpd
//! (`reject_unverified_*`: [`query`]) and the delivery agents (a probe's
//! result: [`update`], from [`crate::delivery::Job`]) use.
//!
//! A probe is a message cleanup queues with the queue attribute
//! [`crate::qfile::attr::TRACE_FLAGS`] = [`PROBE`]: qmgr hands its
//! recipients out with [`crate::ipc::DeliveryRequest::VERIFY`], every
//! agent goes only as far as it must to know the answer (the SMTP client
//! to RCPT TO; local and virtual resolve the address; pipe names the
//! command), and the outcome goes to the verify service instead of a
//! bounce or defer log: the probe is never delivered and leaves no trace
//! in the queue.

use crate::ipc;
use serde::{Deserialize, Serialize};
use std::path::Path;
use std::time::Duration;

/// The value of the `trace_flags` queue attribute that makes a message an
/// address verification probe (Postfix's `DEL_REQ_FLAG_MTA_VRFY`).
pub const PROBE: &str = "verify";

/// The service's socket name under `private/`.
pub const SOCKET: &str = "verify";

/// How a probe ended, or what is known of an address (Postfix's
/// `DEL_RCPT_STAT_*`).
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub enum Status {
    /// Deliverable.
    Ok,
    /// The probe was deferred (a temporary failure).
    Defer,
    /// Undeliverable.
    Bounce,
    /// Nothing known yet: a probe is on its way.
    Todo,
}

impl Status {
    /// The name in the cache file.
    pub fn name(self) -> &'static str {
        match self {
            Status::Ok => "ok",
            Status::Defer => "defer",
            Status::Bounce => "bounce",
            Status::Todo => "todo",
        }
    }

    pub fn from_name(s: &str) -> Option<Status> {
        Some(match s {
            "ok" => Status::Ok,
            "defer" => Status::Defer,
            "bounce" => Status::Bounce,
            "todo" => Status::Todo,
            _ => return None,
        })
    }
}

/// One request to the verify service; one [`VerifyReply`] answers it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub enum VerifyRequest {
    /// What is known of the address; sends a probe when nothing is, or
    /// what is known is due for a refresh.
    Query { address: String },
    /// A probe's result, from the delivery agent that found it.
    Update {
        address: String,
        status: Status,
        reason: String,
    },
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub enum VerifyReply {
    /// The answer to a query: the status and its text ("Address
    /// verification in progress", the next hop's reply, ...).
    Status { status: Status, reason: String },
    /// An update was taken.
    Updated,
    /// The request was malformed.
    Bad,
}

/// The largest request or reply.
pub const MAX_MESSAGE: u32 = 16 * 1024;

fn exchange(socket: &Path, req: &VerifyRequest, timeout: Duration) -> std::io::Result<VerifyReply> {
    let mut s = ipc::connect(socket, timeout)?;
    ipc::send(&mut s, req)?;
    ipc::recv_limited(&mut s, MAX_MESSAGE)
}

/// Asks the service at `socket` what it knows of `address`. An error
/// means the service could not answer (Postfix: "address verification
/// problem").
pub fn query(socket: &Path, address: &str, timeout: Duration) -> Result<(Status, String), String> {
    let req = VerifyRequest::Query {
        address: address.to_string(),
    };
    match exchange(socket, &req, timeout) {
        Ok(VerifyReply::Status { status, reason }) => Ok((status, reason)),
        Ok(other) => Err(format!("unexpected verify reply {other:?}")),
        Err(e) => Err(e.to_string()),
    }
}

/// Postfix's `reject_unverified_*` poll: asks up to `count` times while
/// the answer is [`Status::Todo`], `delay` apart.
pub fn poll(
    socket: &Path,
    address: &str,
    count: u64,
    delay: Duration,
    timeout: Duration,
) -> Result<(Status, String), String> {
    let mut n = 0;
    loop {
        let answer = query(socket, address, timeout)?;
        n += 1;
        if answer.0 != Status::Todo || n >= count.max(1) {
            return Ok(answer);
        }
        std::thread::sleep(delay);
    }
}

/// Reports a probe's result for `address`.
pub fn update(
    socket: &Path,
    address: &str,
    status: Status,
    reason: &str,
    timeout: Duration,
) -> Result<(), String> {
    let req = VerifyRequest::Update {
        address: address.to_string(),
        status,
        reason: reason.to_string(),
    };
    match exchange(socket, &req, timeout) {
        Ok(VerifyReply::Updated) => Ok(()),
        Ok(other) => Err(format!("unexpected verify reply {other:?}")),
        Err(e) => Err(e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_names_round_trip() {
        for s in [Status::Ok, Status::Defer, Status::Bounce, Status::Todo] {
            assert_eq!(Status::from_name(s.name()), Some(s));
        }
        assert_eq!(Status::from_name("x"), None);
    }
}
