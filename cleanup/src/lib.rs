//! cleanup: canonicalizes a new message and writes its queue file.
//!
//! Who talks to it: smtpd, pickup, and qmgr and local (notifications,
//! forwarded mail) connect to `public/cleanup` and speak
//! `ipc::CleanupRequest` / `ipc::CleanupReply`: Open, Content..., Close.
//! What it does: creates the queue file in `incoming/` at Open and answers
//! with the queue ID; qualifies bare addresses with `myorigin`; buffers the
//! header section (bounded by `header_size_limit`), extracts recipients
//! for `sendmail -t`, drops `message_drop_headers` (Bcc among them), adds
//! Message-Id, Date and From where missing; streams the body; at Close
//! marks the file complete, fsyncs it and its directory, answers Queued,
//! and only then wakes qmgr (`public/qmgr`). A client may open its next
//! message on the same connection (smtpd does). A client that closes
//! before Close, or a refusal, leaves nothing in the queue.
//! What it may touch: `incoming/` and `hold/` only. It runs as `mail_owner`.
//!
//! Address rewriting (canonical, masquerade, virtual alias) and
//! `header_checks`/`body_checks` (REJECT, DISCARD, HOLD, IGNORE, WARN,
//! REPLACE, PREPEND) are [`rewrite`]'s; a HOLD message is written to
//! `hold/`, a DISCARD one is answered as queued and removed.
//!
//! Modules: [`message`] (one message, Open to Close), [`headers`] (header
//! section parsing and address extraction), [`rewrite`] (address mapping
//! and content checks), [`server`] (the connection, one message after
//! another).

pub mod dkim;
pub mod headers;
pub mod message;
pub mod milter;
pub mod rewrite;
pub mod server;
