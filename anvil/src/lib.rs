//! anvil: Postern's client session count and request rate server, as
//! Postfix's anvil(8).
//!
//! Who talks to it: every smtpd process, over one connection each to
//! `queue_directory/private/anvil` (a master.cf `unix` service with one
//! process), with [`postern_common::ipc::AnvilRequest`]s: a new session,
//! its end, a MAIL FROM, a RCPT TO, an AUTH. anvil answers with the
//! client's open sessions and its events in the current
//! `anvil_rate_time_unit`; smtpd compares them with its
//! `smtpd_client_*_limit`s. The counting is
//! [`postern_common::anvil::Table`], the one definition smtpd also uses
//! when anvil cannot be reached. Sessions are counted per connection, so
//! those of an smtpd process that dies stop counting when its connection
//! closes. What it may touch: nothing but its sockets; it runs as
//! `mail_owner` with no privileges, and keeps nothing on disk. Every
//! `anvil_status_update_time`, and when it exits (after `max_idle` without
//! a client, or on SIGTERM), it logs the peak counts and rates.
//!
//! Modules: [`server`] (the event loop and the protocol), [`stats`] (the
//! peak values it logs).

pub mod server;
pub mod stats;
