//! Messages between Postern's programs, and how they travel.
//!
//! Every message is a 4-byte little-endian length followed by that many
//! bytes of postcard-encoded serde data, over a Unix stream socket in
//! `queue_directory/private` or `public`. Each protocol is one request
//! enum and one reply enum defined here, and nowhere else:
//!
//! - cleanup (`public/cleanup`, see `QueueTree::cleanup_socket`):
//!   [`CleanupRequest`] / [`CleanupReply`]; clients are smtpd, pickup, and
//!   qmgr and local when they send notifications or forward mail.
//! - delivery agents (`private/smtp`, `private/relay`, `private/local`):
//!   one [`DeliveryRequest`] answered by one [`DeliveryReply`]; or a batch
//!   of requests for one destination, each but the last flagged
//!   [`DeliveryRequest::MORE`], answered by one reply per request, in
//!   order, once all are done.
//! - anvil (`private/anvil`): [`AnvilRequest`] / [`AnvilReply`], smtpd's
//!   client counts and rates, one connection per smtpd process.
//! - wake-ups (`public/qmgr`, `public/pickup`): a connection that writes
//!   [`Wakeup`] bytes and closes; no framing, no reply.

use serde::{de::DeserializeOwned, Deserialize, Serialize};
use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use crate::qfile::Recipient;

/// A reader of a Unix stream socket that waits for input in poll(2)
/// rather than asleep in recv(2). Linux wakes a task asleep in a Unix
/// stream recv whenever the peer reads what this side wrote (the
/// socket's write-space wake-up, which that wait does not filter): an
/// exchange of request and reply cost the asker two wake-ups, the second
/// one for nothing. poll waits for POLLIN alone. For the blocking waits
/// of the request-reply exchanges between daemons (qmgr and its agents,
/// cleanup and its clients); `timeout` bounds each wait, as SO_RCVTIMEO would (an
/// expired wait is `WouldBlock`, as from a timed-out recv).
pub struct PolledReader<'a> {
    sock: &'a UnixStream,
    timeout: Option<Duration>,
}

impl<'a> PolledReader<'a> {
    pub fn new(sock: &'a UnixStream, timeout: Option<Duration>) -> PolledReader<'a> {
        PolledReader { sock, timeout }
    }
}

impl Read for PolledReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        use nix::errno::Errno;
        use nix::poll::{PollFd, PollFlags, PollTimeout};
        use nix::sys::socket::MsgFlags;
        use std::os::fd::{AsFd, AsRawFd};
        let wait = match self.timeout {
            Some(t) => PollTimeout::try_from(t).unwrap_or(PollTimeout::MAX),
            None => PollTimeout::NONE,
        };
        loop {
            match nix::sys::socket::recv(self.sock.as_raw_fd(), buf, MsgFlags::MSG_DONTWAIT) {
                Ok(n) => return Ok(n),
                Err(Errno::EAGAIN | Errno::EINTR) => {}
                Err(e) => return Err(e.into()),
            }
            let mut fds = [PollFd::new(self.sock.as_fd(), PollFlags::POLLIN)];
            match nix::poll::poll(&mut fds, wait) {
                Ok(0) => return Err(io::ErrorKind::WouldBlock.into()),
                // Readable, closed or failed: the recv tells which.
                Ok(_) | Err(Errno::EINTR) => {}
                Err(e) => return Err(e.into()),
            }
        }
    }
}

/// Largest message a reader accepts.
pub const MAX_MESSAGE: u32 = 16 << 20;

/// Writes one framed message.
pub fn send<W: Write, T: Serialize>(w: &mut W, msg: &T) -> io::Result<()> {
    let body =
        postcard::to_stdvec(msg).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
    let mut frame = Vec::with_capacity(4 + body.len());
    frame.extend_from_slice(&(body.len() as u32).to_le_bytes());
    frame.extend_from_slice(&body);
    w.write_all(&frame)?;
    w.flush()
}

/// Reads one framed message. A closed connection is `UnexpectedEof`.
pub fn recv<R: Read, T: DeserializeOwned>(r: &mut R) -> io::Result<T> {
    recv_limited(r, MAX_MESSAGE)
}

/// The length of a frame whose header is `header`, or an error when it
/// is over `max` bytes.
fn frame_length(header: [u8; 4], max: u32) -> io::Result<u32> {
    let len = u32::from_le_bytes(header);
    if len > max {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("IPC message of {len} bytes"),
        ));
    }
    Ok(len)
}

/// Takes one whole framed message off the front of `buf`, the input a
/// non-blocking reader has gathered so far: `Ok(None)` while the frame is
/// incomplete, else the message and the number of bytes it took. A frame
/// over `max` bytes, or one that does not decode, is an error.
pub fn take_frame<T: DeserializeOwned>(buf: &[u8], max: u32) -> io::Result<Option<(T, usize)>> {
    let Some(header) = buf.first_chunk::<4>() else {
        return Ok(None);
    };
    let end = 4 + frame_length(*header, max)? as usize;
    if buf.len() < end {
        return Ok(None);
    }
    let msg = postcard::from_bytes(&buf[4..end])
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
    Ok(Some((msg, end)))
}

/// Reads one framed message of at most `max` bytes (`recv` with a
/// tighter limit, for protocols whose messages are small).
pub fn recv_limited<R: Read, T: DeserializeOwned>(r: &mut R, max: u32) -> io::Result<T> {
    let mut len = [0u8; 4];
    r.read_exact(&mut len)?;
    let len = frame_length(len, max)?;
    // Read into spare capacity rather than a zeroed buffer: content
    // frames are up to 64 KiB.
    let mut body = Vec::with_capacity(len as usize);
    r.take(len as u64).read_to_end(&mut body)?;
    if body.len() != len as usize {
        return Err(io::ErrorKind::UnexpectedEof.into());
    }
    postcard::from_bytes(&body).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}

/// Reads one framed message from `sock`, each wait in poll
/// ([`PolledReader`]) `timeout` at most: for the replies of cleanup to
/// its other clients (pickup, qmgr's notices, local's forwarding).
pub fn recv_polled<T: DeserializeOwned>(sock: &UnixStream, timeout: Duration) -> io::Result<T> {
    recv(&mut PolledReader::new(sock, Some(timeout)))
}

/// Starts a message whose envelope is known: `Open` and `Envelope` in one
/// write. The reply to read next is cleanup's answer to `Open`.
pub fn send_open<W: Write>(w: &mut W, envelope: NewMessage) -> io::Result<()> {
    let mut frames = Vec::new();
    send(&mut frames, &CleanupRequest::Open)?;
    send(&mut frames, &CleanupRequest::Envelope(envelope))?;
    w.write_all(&frames)?;
    w.flush()
}

/// Connects to a service socket with a time limit on each read and write.
pub fn connect(path: &Path, timeout: Duration) -> io::Result<UnixStream> {
    let s = UnixStream::connect(path)
        .map_err(|e| io::Error::new(e.kind(), format!("connect to {}: {e}", path.display())))?;
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))?;
    Ok(s)
}

/// Whether the other end of `conn` has closed it (nothing is read: a
/// peek that does not wait). A delivery agent asks before it delivers
/// (the qmgr that asked is gone: drop the request, never deliver twice);
/// qmgr before it reuses an agent's connection.
pub fn peer_gone(conn: &impl std::os::fd::AsRawFd) -> bool {
    use nix::sys::socket::MsgFlags;
    let mut b = [0u8; 1];
    let peeked = nix::sys::socket::recv(
        conn.as_raw_fd(),
        &mut b,
        MsgFlags::MSG_PEEK | MsgFlags::MSG_DONTWAIT,
    );
    match peeked {
        Ok(n) => n == 0,
        Err(e) => e == nix::errno::Errno::ECONNRESET,
    }
}

// ---------------------------------------------------------------- cleanup

/// How long cleanup waits on a connection, its message done, for the
/// client's next `Open` before it closes it: smtpd keeps a connection
/// whose message is queued for the next message of any of its sessions.
pub const CLEANUP_IDLE: Duration = Duration::from_secs(5);

/// How long smtpd keeps such a connection: well inside [`CLEANUP_IDLE`].
/// An Open that still meets a closing cleanup (one that is leaving) finds
/// the connection gone before any answer, and smtpd sends it again on a
/// new connection: nothing was made for it.
pub const CLEANUP_REUSE_WITHIN: Duration = Duration::from_secs(1);

/// Flags for a message submitted to cleanup.
pub mod cleanup_flags {
    /// Take recipients from To/Cc/Bcc (sendmail -t).
    pub const EXTRACT_RECIPIENTS: u32 = 1;
    /// The message is a notification generated by Postern (a bounce): it
    /// must not itself cause a notification when it fails.
    pub const NOTIFICATION: u32 = 2;
    /// Do not add missing headers (forwarded mail keeps its form).
    pub const NO_HEADER_FIXUP: u32 = 4;
    /// A permanent refusal is not answered as a refusal but turned into a
    /// bounce to the sender (local submission: sendmail has already exited
    /// 0, nobody is left to hear a refusal).
    pub const BOUNCE_ON_REFUSAL: u32 = 8;
    /// `receive_override_options = no_header_body_checks`: no header or
    /// body check of any class.
    pub const NO_HEADER_BODY_CHECKS: u32 = 16;
    /// `receive_override_options = no_address_mappings`: no canonical
    /// mapping, masquerading, virtual aliasing or automatic bcc.
    pub const NO_ADDRESS_MAPPINGS: u32 = 32;
    /// A milter said DISCARD at an SMTP stage (smtpd): the message is
    /// answered as queued and thrown away.
    pub const MILTER_DISCARD: u32 = 64;
    /// `receive_override_options = no_milters`: no milter sees the
    /// message.
    pub const NO_MILTERS: u32 = 128;
}

/// What a client tells cleanup about a new message, before its content.
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
pub struct NewMessage {
    pub sender: String,
    pub recipients: Vec<Recipient>,
    /// `A` records for the queue file (client, protocol, envid, ret, ...).
    pub attrs: Vec<(String, String)>,
    /// [`cleanup_flags`] bits.
    pub flags: u32,
    /// Name for log lines: "smtpd", "pickup", "qmgr" ...
    pub origin: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum CleanupRequest {
    /// Starts a message: cleanup creates its queue file and answers
    /// [`CleanupReply::Opened`] with the queue ID, or `Failed`. smtpd sends
    /// it at the first accepted RCPT TO, as Postfix's smtpd opens its queue
    /// file (`smtpd_delay_open_until_valid_rcpt`), so the file is made
    /// while the client is still naming recipients, not after DATA; other
    /// clients send it together with the envelope ([`send_open`]).
    Open,
    /// Who the message is from and for: once, after `Open` and before any
    /// content. Not answered: an envelope cleanup refuses (an unusable
    /// address, a table that cannot be read) is reported at `Close`, as a
    /// refused content is.
    Envelope(NewMessage),
    /// The next piece of content: header and body lines with LF ends, as
    /// the message will be stored (no SMTP dot-stuffing, no CRs added).
    Content(#[serde(with = "content_bytes")] Vec<u8>),
    /// End of content; answered by `Queued` (the file and its directory
    /// entry are on disk) or `Failed` (nothing was queued).
    Close,
    /// The client gives up: cleanup removes what it wrote. No answer.
    Abort,
}

/// Content travels as one byte string (postcard: a length, then the
/// bytes), the same encoding serde gives a `Vec<u8>`, but copied whole
/// instead of element by element, which cost cleanup a call per byte.
mod content_bytes {
    use serde::{de, Deserializer, Serializer};
    use std::fmt;

    pub fn serialize<S: Serializer>(v: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(v)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        struct Bytes;
        impl<'de> de::Visitor<'de> for Bytes {
            type Value = Vec<u8>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a byte string")
            }
            fn visit_bytes<E: de::Error>(self, v: &[u8]) -> Result<Vec<u8>, E> {
                Ok(v.to_vec())
            }
            fn visit_byte_buf<E: de::Error>(self, v: Vec<u8>) -> Result<Vec<u8>, E> {
                Ok(v)
            }
        }
        d.deserialize_byte_buf(Bytes)
    }
}

/// The `dsn` of a [`CleanupReply::Failed`] whose reason is a milter's
/// SMTP reply.
pub const MILTER_REPLY_DSN: &str = "milter";

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub enum CleanupReply {
    Opened {
        queue_id: String,
    },
    Queued {
        queue_id: String,
    },
    /// Not queued. `temporary` selects 4xx/EX_TEMPFAIL over 5xx. With
    /// `dsn` [`MILTER_REPLY_DSN`], `reason` is a milter's whole SMTP reply
    /// (code, enhanced code, text; a multi-line reply's lines joined by
    /// CRLF), which smtpd gives the client as it is.
    Failed {
        temporary: bool,
        dsn: String,
        reason: String,
    },
}

// ---------------------------------------------------------------- delivery

/// One recipient of a delivery request.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DeliveryRecipient {
    /// Where the recipient's record starts in the queue file.
    pub offset: u64,
    pub rcpt: Recipient,
}

/// qmgr asks a delivery agent to deliver one message to some recipients
/// that share a transport and next hop.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct DeliveryRequest {
    /// Queue the file is in (always "active" today).
    pub queue: String,
    pub queue_id: String,
    /// The master.cf service the request goes to ("smtp", "relay", "local").
    pub transport: String,
    /// Where to: "[host]:port", "host:port", "domain", or for local the
    /// domain of the recipients.
    pub nexthop: String,
    pub sender: String,
    pub arrival_secs: u64,
    pub arrival_usecs: u32,
    pub content_offset: u64,
    pub content_size: u64,
    pub recipients: Vec<DeliveryRecipient>,
    /// Seconds spent before this delivery (queue wait), for `delays=`.
    pub queue_wait: f64,
    /// [`DeliveryRequest::MORE`], or 0.
    pub flags: u32,
    /// The site the next hop belongs to (`delivery_policy_maps`), when
    /// it has one: the agent keeps connections under the site's name, so
    /// that the site's domains share them, and honours its limits.
    pub site: Option<SiteHint>,
    /// The pool (`weighted:{...}`, `randmap:{...}`) the transport was
    /// chosen from, or "" (for the accounting log).
    pub pool: String,
    /// Why qmgr chose this member of the pool ("chosen", "overflow:
    /// ..."), or "".
    pub selection: String,
}

/// What an agent needs to know of a site ([`DeliveryRequest::site`]).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct SiteHint {
    pub name: String,
    /// Messages per connection; 0 = no limit of the site's.
    pub max_messages_per_connection: u32,
    /// Seconds an idle connection is kept; 0 = the transport's
    /// `smtp_connection_cache_time_limit`.
    pub idle_timeout_secs: u32,
    /// Close the connection after the request instead of keeping it
    /// idle: the site's connections are capped across sources
    /// (`site_max_connections`), which are other agent processes, whose
    /// idle connections qmgr could not count.
    pub no_reuse: bool,
}

impl DeliveryRequest {
    /// Flag: another request of the same batch follows on this
    /// connection. qmgr batches requests for one destination when more
    /// wait than its concurrency lets go (`*_delivery_batch_limit`); the
    /// agent answers them all at the end, which lets it make several
    /// deliveries durable at once.
    pub const MORE: u32 = 1;
    /// Flag: the message is an address verification probe
    /// ([`crate::verify`]): find out whether the recipient is deliverable,
    /// deliver nothing, and report to the verify service
    /// ([`crate::delivery::Job::record`] does).
    pub const VERIFY: u32 = 2;
    /// The most requests an agent reads as one batch (each holds its
    /// queue file open until the batch ends).
    pub const MAX_BATCH: usize = 100;
}

/// What happened to one recipient.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub enum Outcome {
    /// Delivered (or accepted by the next hop).
    Sent,
    /// Try again later.
    Deferred,
    /// Failed for good; a notice goes to the sender.
    Bounced,
}

impl Outcome {
    /// The word in `status=` log fields.
    pub fn word(self) -> &'static str {
        match self {
            Outcome::Sent => "sent",
            Outcome::Deferred => "deferred",
            Outcome::Bounced => "bounced",
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RecipientResult {
    pub offset: u64,
    pub outcome: Outcome,
    /// Enhanced status code, "2.0.0", "4.4.1", "5.1.1".
    pub dsn: String,
    /// The next hop's reply or the local reason.
    pub reason: String,
}

/// The agent's answer. Per-recipient results are already recorded in the
/// queue file and message logs by the agent when this is sent.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DeliveryReply {
    pub results: Vec<RecipientResult>,
    /// The destination itself failed (no connection, no greeting): qmgr
    /// counts it against the destination's concurrency.
    pub destination_failed: bool,
    /// The agent reads a further request on this connection (smtp, lmtp:
    /// [`crate::delivery::serve_concurrently`]), so qmgr may keep it; an
    /// agent that says false closes it after its replies.
    pub serves_more: bool,
}

// ---------------------------------------------------------------- queue admin

/// qmgr's administration socket, `private/qmgr-admin`, which qmgr binds
/// itself: postsuper asks there for what it must not do to a file in
/// `active/` on its own. One [`AdminRequest`], one [`AdminReply`].
pub const QMGR_ADMIN_SOCKET: &str = "qmgr-admin";

/// What postsuper asks qmgr to do to messages in the active queue. qmgr
/// acts on a message only when no delivery request of it is in flight
/// (at once, or when the last one returns).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub enum AdminRequest {
    /// Remove the messages (and their defer and bounce logs).
    Delete(Vec<String>),
    /// Move them to `hold/`.
    Hold(Vec<String>),
    /// Move them to `deferred/`, due now (postsuper then requeues them).
    Release(Vec<String>),
    /// Cancel a hold asked for earlier and not yet done (`postsuper -H`):
    /// the message goes to `deferred/`, due now, instead.
    Unhold(Vec<String>),
    /// `postern queues [-j]`: one line (or JSON object) per site.
    Sites { json: bool },
    /// `postern suspend SITE|DOMAIN [DURATION]`: no deliveries to the
    /// site for `seconds`. With `-s SOURCE`, only that source's state for the site.
    Suspend {
        site: String,
        seconds: u64,
        reason: String,
        /// `-s SOURCE`, or "" (every source).
        source: String,
    },
    /// `postern resume [-s SOURCE] SITE|DOMAIN`.
    Resume { site: String, source: String },
    /// `postern bounce DOMAIN [REASON]`: bounce what qmgr holds for the
    /// domain, and new mail for it for `seconds`.
    Bounce {
        domain: String,
        seconds: u64,
        reason: String,
    },
    /// The status daemon's read-only question: answered with
    /// [`AdminReply::status`] (every site and the delivery counters).
    Status,
}

/// qmgr's answer: one status per requested ID, in order; for the site
/// commands, `text` (the listing, or what was done or why not) and
/// `ok`; for [`AdminRequest::Status`], `status`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct AdminReply {
    pub results: Vec<AdminStatus>,
    pub text: String,
    pub ok: bool,
    pub status: Option<Box<QmgrStatus>>,
}

/// What qmgr tells the status daemon (`AdminRequest::Status`): its sites
/// and what it counted since it started. Nothing secret: names, counts,
/// limits and remote replies.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct QmgrStatus {
    /// When qmgr answered and when it started (Unix seconds).
    pub now: u64,
    pub started: u64,
    /// Messages in qmgr's active queue, and delivery requests out.
    pub active_messages: u64,
    pub in_flight: u64,
    /// Sorted by name (then source).
    pub sites: Vec<SiteStatus>,
    /// Recipients per minute for the last [`STATUS_MINUTES`] minutes,
    /// oldest first, the current minute last (always that many; minutes
    /// before qmgr started are zeros).
    pub minutes: Vec<MinuteCount>,
    /// Recipients by (status, class, source) since qmgr started.
    pub deliveries: Vec<DeliveryCount>,
}

/// How many minutes [`QmgrStatus::minutes`] covers.
pub const STATUS_MINUTES: usize = 60;

/// One site's state (`delivery_policy_maps`), as `postern queues -j`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct SiteStatus {
    pub name: String,
    /// The policy key that matched (`mx:.google.com`, a domain, `*`).
    pub key: String,
    /// The sending identity, when the site's state is kept per source;
    /// None: one state for every source.
    pub source: Option<String>,
    pub domains: Vec<String>,
    /// Deliveries waiting in qmgr's queues, and how they split by
    /// source (the transport that will carry them).
    pub queued: u64,
    pub queued_by_source: Vec<(String, u64)>,
    /// Connections open (requests in flight), allowed now (less than
    /// configured in backoff) and configured; None: no limit.
    pub connections: u64,
    pub max_connections: Option<u64>,
    pub configured_connections: Option<u64>,
    /// Message rate allowed now and configured (per second).
    pub rate: Option<f64>,
    pub configured_rate: Option<f64>,
    /// `normal`, `backoff`, `suspended`.
    pub mode: String,
    /// End of a suspension (Unix seconds), 0: none.
    pub suspended_until: u64,
    /// Why the site is in its mode (the suspension's reason, or the
    /// backoff rule and reply).
    pub reason: String,
    /// The `delivery_reply_rules` entry behind a backoff.
    pub rule: String,
    /// The last reply that was not a success.
    pub last_reply: String,
    pub connect_failures: u32,
    /// Recipients delivered, deferred and bounced by the site's
    /// deliveries since qmgr started, and delivered in the last minute.
    pub delivered: u64,
    pub deferred: u64,
    pub bounced: u64,
    pub delivered_last_minute: u64,
    /// Warm-up progress of the source at this site, when it has a
    /// schedule.
    pub warmup: Option<Warmup>,
}

/// A source's warm-up at a site (`smtp_warmup_schedule`).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Warmup {
    /// Day of the schedule (1 = the first day).
    pub day: u32,
    /// Today's quota and what was sent today.
    pub quota: u64,
    pub sent_today: u64,
}

/// Recipients whose delivery ended in one minute.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct MinuteCount {
    /// Unix time of the minute's start.
    pub start: u64,
    pub delivered: u64,
    pub deferred: u64,
    pub bounced: u64,
}

/// A delivery counter: recipients by outcome (`sent`, `deferred`,
/// `bounced`), bounce class (empty for `sent`) and source (the transport;
/// `none` for what qmgr deferred or bounced without an attempt, as its
/// `relay=none` log lines).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct DeliveryCount {
    pub status: String,
    pub class: String,
    pub source: String,
    pub count: u64,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub enum AdminStatus {
    /// Done now.
    Done,
    /// A delivery is in flight: qmgr does it when that returns.
    Pending,
    /// Not in qmgr's active queue (look in the queue directories).
    NotActive,
    /// Delivered and removed meanwhile: nothing left to do.
    Gone,
    /// Active, but there was nothing to undo (`Unhold` without a hold).
    Unchanged,
}

// ---------------------------------------------------------------- anvil

/// The client-limit server's socket, `private/anvil` (a master.cf `unix`
/// service with one process, as Postfix's `anvil unix - - y - 1 anvil`).
pub const ANVIL_SOCKET: &str = "anvil";

/// Largest anvil message either side accepts.
pub const ANVIL_MAX_MESSAGE: u32 = 4096;

/// What smtpd tells anvil, many requests over one connection per smtpd
/// process. `ident` names a (service, client) pair (smtpd sends
/// `SERVICE:ADDRESS`); anvil does not look inside. Sessions registered on
/// a connection stop counting when it closes.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub enum AnvilRequest {
    /// A new session: answered with [`AnvilReply::Count`].
    Connect(String),
    /// A session registered with `Connect` ended. No reply.
    Disconnect(String),
    /// A MAIL FROM: answered with [`AnvilReply::Rate`].
    Message(String),
    /// A RCPT TO: answered with [`AnvilReply::Rate`].
    Recipient(String),
    /// An AUTH command: answered with [`AnvilReply::Rate`].
    Auth(String),
    /// Sessions this smtpd already has open (sent when it connects to a
    /// new anvil): they count as sessions, not as new connections. No
    /// reply.
    Sessions { ident: String, count: u32 },
}

/// anvil's answer to a request that has one.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub enum AnvilReply {
    /// Open sessions and connections in this time unit, the new one
    /// included.
    Count { count: u32, rate: u32 },
    /// Events in this time unit, this one included.
    Rate(u32),
}

// ---------------------------------------------------------------- wake-ups

/// A one-byte request to a trigger service (qmgr, pickup), as Postfix.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wakeup {
    /// Something new in incoming (qmgr) or maildrop (pickup).
    Wake = b'W' as isize,
    /// Scan incoming now.
    Incoming = b'I' as isize,
    /// Scan deferred now.
    Deferred = b'D' as isize,
    /// Ignore retry times: deliver everything deferred now (flush).
    Flush = b'F' as isize,
}

impl Wakeup {
    pub fn from_byte(b: u8) -> Option<Wakeup> {
        match b {
            b'W' => Some(Wakeup::Wake),
            b'I' => Some(Wakeup::Incoming),
            b'D' => Some(Wakeup::Deferred),
            b'F' | b'A' => Some(Wakeup::Flush),
            _ => None,
        }
    }
}

/// Sends wake-up bytes to a trigger service. Failure is not fatal to the
/// caller: the service also wakes up by itself on a timer.
pub fn wake(path: &Path, what: &[Wakeup]) -> io::Result<()> {
    let mut s = UnixStream::connect(path)?;
    s.set_write_timeout(Some(Duration::from_secs(5)))?;
    s.write_all(&wakeup_bytes(what))
}

fn wakeup_bytes(what: &[Wakeup]) -> Vec<u8> {
    what.iter().map(|w| *w as u8).collect()
}

/// A kept connection to a trigger service, for a process that wakes it
/// for every message (cleanup wakes qmgr for each one it queues): one
/// connection for all of them, where [`wake`] made a socket, a connect
/// and an accept per message. The service keeps the connection and
/// reads it as it comes ([`crate::service::serve_triggers`]).
///
/// The bytes go without waiting: when the connection's buffer is full,
/// the service has not yet read the wake-ups already in it, and reading
/// them wakes it as this one would have. A connection the service closed
/// (it ended, or was reloaded) fails at once (a Unix socket knows its
/// peer is gone, and the service shuts its reading side before it reads
/// the rest): the bytes go again on a new connection, which the listener
/// holds for the next process of the service.
pub struct Waker {
    path: std::path::PathBuf,
    conn: std::sync::Mutex<Option<UnixStream>>,
}

impl Waker {
    pub fn new(path: &Path) -> Waker {
        Waker {
            path: path.to_path_buf(),
            conn: std::sync::Mutex::new(None),
        }
    }

    /// As [`wake`], on the kept connection.
    pub fn wake(&self, what: &[Wakeup]) -> io::Result<()> {
        let bytes = wakeup_bytes(what);
        let mut conn = self.conn.lock().unwrap_or_else(|p| p.into_inner());
        let mut last = None;
        for _ in 0..2 {
            if conn.is_none() {
                let s = UnixStream::connect(&self.path)?;
                s.set_nonblocking(true)?;
                *conn = Some(s);
            }
            let s = conn.as_mut().expect("connected above");
            match s.write(&bytes) {
                // Part of them is enough: one byte wakes the service, and
                // it scans all it was asked for by anyone.
                Ok(n) if n > 0 => return Ok(()),
                Ok(_) => last = Some(io::Error::from(io::ErrorKind::WriteZero)),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) => last = Some(e),
            }
            *conn = None;
        }
        Err(last.expect("a failed attempt"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// This thread's voluntary context switches so far.
    fn voluntary_switches() -> u64 {
        std::fs::read_to_string("/proc/thread-self/status")
            .unwrap()
            .lines()
            .find_map(|l| l.strip_prefix("voluntary_ctxt_switches:"))
            .map(|v| v.trim().parse().unwrap())
            .unwrap()
    }

    /// The asker of a request waits once for the reply: the peer reading
    /// the request (a write-space wake-up of the asker's socket) does not
    /// wake it, as it would a task asleep in recv. Then the reply, its
    /// end, and a wait that runs out.
    #[test]
    fn a_polled_reader_wakes_for_the_reply_only() {
        let (asker, mut answerer) = UnixStream::pair().unwrap();
        let t = std::thread::spawn(move || {
            (&asker).write_all(b"request").unwrap();
            let before = voluntary_switches();
            let mut buf = [0u8; 16];
            let n = PolledReader::new(&asker, None).read(&mut buf).unwrap();
            let woken = voluntary_switches() - before;
            assert_eq!(&buf[..n], b"reply");
            // Nothing more within the time limit.
            let e = PolledReader::new(&asker, Some(Duration::from_millis(50)))
                .read(&mut buf)
                .unwrap_err();
            assert_eq!(e.kind(), io::ErrorKind::WouldBlock);
            woken
        });
        // The asker is asleep when the request is read, and when the
        // reply comes.
        std::thread::sleep(Duration::from_millis(100));
        let mut req = [0u8; 7];
        answerer.read_exact(&mut req).unwrap();
        std::thread::sleep(Duration::from_millis(100));
        answerer.write_all(b"reply").unwrap();
        let woken = t.join().unwrap();
        // A plain recv wakes twice (2); a reader not yet asleep when the
        // reply came, on a loaded machine, not at all (0).
        assert!(woken <= 1, "{woken} wake-ups while waiting for the reply");
        // The peer's end: end of file.
        let (asker, answerer) = UnixStream::pair().unwrap();
        drop(answerer);
        assert_eq!(
            PolledReader::new(&asker, None).read(&mut [0u8; 4]).unwrap(),
            0
        );
    }

    #[test]
    fn frames_taken_from_a_buffer_in_pieces() {
        let mut buf = Vec::new();
        send(&mut buf, &CleanupRequest::Close).unwrap();
        send(&mut buf, &CleanupRequest::Abort).unwrap();
        let first_len = buf.len() / 2;
        for cut in 0..first_len {
            let got = take_frame::<CleanupRequest>(&buf[..cut], MAX_MESSAGE).unwrap();
            assert!(got.is_none(), "{cut}");
        }
        let (m, used) = take_frame::<CleanupRequest>(&buf, MAX_MESSAGE)
            .unwrap()
            .unwrap();
        assert!(matches!(m, CleanupRequest::Close));
        let (m, rest) = take_frame::<CleanupRequest>(&buf[used..], MAX_MESSAGE)
            .unwrap()
            .unwrap();
        assert!(matches!(m, CleanupRequest::Abort));
        assert_eq!(used + rest, buf.len());
        let big = (MAX_MESSAGE + 1).to_le_bytes();
        assert!(take_frame::<CleanupRequest>(&big, MAX_MESSAGE).is_err());
        assert!(take_frame::<CleanupRequest>(&[1, 0, 0, 0, 0xff], MAX_MESSAGE).is_err());
        assert!(recv_limited::<_, CleanupRequest>(&mut &buf[..], 0).is_err());
    }

    #[test]
    fn framing_round_trip() {
        let mut buf = Vec::new();
        let m = NewMessage {
            sender: "a@b".into(),
            recipients: vec![Recipient::new("c@d")],
            ..Default::default()
        };
        send_open(&mut buf, m).unwrap();
        send(&mut buf, &CleanupRequest::Close).unwrap();
        let mut r = &buf[..];
        assert!(matches!(
            recv::<_, CleanupRequest>(&mut r).unwrap(),
            CleanupRequest::Open
        ));
        match recv::<_, CleanupRequest>(&mut r).unwrap() {
            CleanupRequest::Envelope(n) => assert_eq!(n.recipients[0].address, "c@d"),
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            recv::<_, CleanupRequest>(&mut r).unwrap(),
            CleanupRequest::Close
        ));
        assert_eq!(
            recv::<_, CleanupRequest>(&mut r).unwrap_err().kind(),
            io::ErrorKind::UnexpectedEof
        );
    }

    #[test]
    fn content_is_a_byte_string_encoded_as_a_byte_vector() {
        let data: Vec<u8> = (0..=255u8).cycle().take(70_000).collect();
        let mut buf = Vec::new();
        send(&mut buf, &CleanupRequest::Content(data.clone())).unwrap();
        // The encoding of an enum variant holding a plain Vec<u8>: what a
        // client built before this change sends, and still understood.
        #[derive(Serialize)]
        enum Plain {
            _Open,
            _Envelope,
            Content(Vec<u8>),
        }
        let plain = postcard::to_stdvec(&Plain::Content(data.clone())).unwrap();
        assert_eq!(&buf[4..], &plain[..]);
        match recv::<_, CleanupRequest>(&mut &buf[..]).unwrap() {
            CleanupRequest::Content(got) => assert_eq!(got, data),
            other => panic!("{other:?}"),
        }
    }
}
