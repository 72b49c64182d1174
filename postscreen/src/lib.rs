//! postscreen: Postern's SMTP triage server (Postfix's postscreen(8)).
//!
//! master runs it on the master.cf line `smtp inet n - y - 1 postscreen`.
//! It accepts each client, runs its tests, and hands a client that passes
//! to the `smtpd pass` service: it connects to
//! `queue_directory/private/$smtpd_service_name` and passes the client's
//! descriptor (SCM_RIGHTS, `postern_common::pass_fd`); smtpd then talks
//! to the client as if it had accepted it itself. A client that fails is
//! dropped (521) or kept in a dummy SMTP dialogue that rejects every
//! recipient (enforce), as Postfix does. It parses network input, so it
//! runs as `mail_owner` (unpriv = y), like smtpd. It is its own crate:
//! no daemon crate depends on another, and it shares nothing with smtpd
//! but `common/`.
//!
//! Modules:
//! - [`settings`]: the `postscreen_*` parameters it reads.
//! - [`server`]: the listeners, one thread per client, master's status.
//! - [`screen`]: one client's screening: access list, cache, pregreet and
//!   DNSBL tests, the verdict, the hand-off; Postfix's log lines.
//! - [`cache`]: the allowlist cache (`postscreen_cache_map`): per client,
//!   until when each passed test stays passed.
//! - [`dnsbl`]: `postscreen_dnsbl_sites` lookups and their score.
//! - [`dummy_smtp`]: postscreen's own SMTP dialogue: with a client that
//!   failed under `enforce`, and the deep protocol tests.

pub mod cache;
pub mod dnsbl;
pub mod dummy_smtp;
pub mod screen;
pub mod server;
pub mod settings;
