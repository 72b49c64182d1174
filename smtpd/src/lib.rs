//! smtpd: Postern's SMTP server (RFC 5321), started by master for an
//! `inet` service in master.cf.
//!
//! Talks to: SMTP clients on the TCP listener master passes on fd 3 (many
//! sessions per process, on one event loop); `cleanup` through
//! `queue_directory/public/cleanup`, a connection per message in
//! flight (kept a second for the next message once it is queued), to
//! which it streams the envelope and the content; master through the
//! status pipe on fd 4 (busy when `smtpd_client_session_limit` sessions
//! are open); `anvil` through `queue_directory/private/anvil`, one
//! connection per process, for the client limits. It touches no files:
//! the queue file is cleanup's.
//!
//! Modules:
//! - [`server`]: the mio event loop, sockets, timeouts, master status;
//!   each session's turn, one function per phase (DNS, auth, cleanup,
//!   output, STARTTLS, input, end).
//! - [`cleanup_conn`]: the connection to cleanup for one message
//!   (connect or take a kept one, retry on a full backlog, requests out,
//!   replies in) and the process's kept connections.
//! - [`listener`]: the TCP listener, or a `pass` service's socket where
//!   postscreen hands over the clients it lets through.
//! - [`outbuf`]: bytes waiting for a non-blocking socket.
//! - [`session`]: one SMTP session as a state machine without I/O, split
//!   by concern: `session/mod.rs` (the state, command dispatch),
//!   `greeting` (connect, HELO/EHLO), `transaction` (MAIL/RCPT/DATA/RSET),
//!   `cleanup` (the queue file, content, cleanup's replies), `auth`,
//!   `tls` (STARTTLS), `vrfy`, `policy` (restrictions, DNS, rate limits).
//! - [`data`]: the DATA content: end detection, dot-unstuffing, CRLF.
//! - [`restrictions`]: Postfix's restriction language
//!   (`smtpd_{client,helo,sender,relay,recipient,data}_restrictions`):
//!   the lists and per-stage checks in `restrictions/mod.rs`, list
//!   evaluation in `eval.rs`, the checks without lookups (FQDN, HELO
//!   syntax, pipelining, relay control, unlisted, sender login maps) in
//!   `checks.rs`, the DNS and RBL checks in `dns_checks.rs`, access
//!   tables in `access.rs`.
//! - [`received`]: the Received: header.
//! - [`tls`]: STARTTLS and `smtpd_tls_wrappermode` on the event loop
//!   (rustls), and what the session learns of the handshake.
//! - [`anvil`]: client connection, message, recipient and AUTH limits,
//!   counted by the `anvil` server (`private/anvil`) for all smtpd
//!   processes, or in this process when it cannot answer.
//! - [`dns`]: DNS lookups for the restrictions that need them, on
//!   helper threads.
//! - [`verify_lookup`]: `reject_unverified_*`'s questions to the verify
//!   service (with Postfix's poll), on a thread each, answered like DNS.
//! - [`sasl`]: SASL AUTH through Dovecot's auth server, one shared
//!   non-blocking connection per process.
//! - [`proxy`]: the before-queue content filter (`smtpd_proxy_filter`):
//!   the SMTP conversation with it, on a helper thread per connection.
//! - [`settings`]: the parameters smtpd reads.

pub mod anvil;
pub mod cleanup_conn;
pub mod data;
pub mod dns;
pub mod listener;
pub mod milter;
pub mod outbuf;
pub mod policy_client;
pub mod proxy;
pub mod received;
pub mod restrictions;
pub mod sasl;
pub mod server;
pub mod session;
pub mod settings;
pub mod tls;
pub mod verify_lookup;
