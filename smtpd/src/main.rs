//! smtpd: Postern's SMTP server (RFC 5321), started by master for an
//! `inet` service in master.cf.
//!
//! Talks to: SMTP clients on the TCP listener master passes on fd 3 (many
//! sessions per process, on one event loop); `cleanup` through
//! `queue_directory/public/cleanup`, one connection per message, to
//! which it streams the envelope and the content; master through the
//! status pipe on fd 4 (busy when `smtpd_client_session_limit` sessions
//! are open). It touches no files: the queue file is cleanup's.
//!
//! Modules:
//! - [`server`]: the mio event loop, sockets, timeouts, master status.
//! - [`session`]: one SMTP session as a state machine without I/O.
//! - [`protocol`]: command words, `<path>` addresses, ESMTP parameters.
//! - [`data`]: the DATA content: end detection, dot-unstuffing, CRLF.
//! - [`restrictions`]: `smtpd_relay_restrictions` and
//!   `smtpd_recipient_restrictions`.
//! - [`received`]: the Received: header.
//! - [`settings`]: the parameters smtpd reads.

mod data;
mod protocol;
mod received;
mod restrictions;
mod server;
mod session;
mod settings;

fn main() {
    let (cfg, _args) = postern_common::service::start("smtpd");
    let settings = match settings::Settings::from_config(&cfg) {
        Ok(s) => s,
        Err(e) => postern_common::fatal!("{e}"),
    };
    server::run(settings)
}
