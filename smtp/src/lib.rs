//! smtp: the SMTP delivery agent (master.cf services `smtp` and `relay`),
//! and under the name `lmtp` the LMTP delivery agent (service `lmtp`).
//!
//! LMTP mode (RFC 2033), chosen by the program's name as Postfix's
//! lmtp(8): the next hop is `unix:PATH` (relative to `queue_directory`,
//! e.g. `lmtp:unix:private/dovecot-lmtp`) or `inet:host[:port]` (port 24,
//! no MX lookup); the client says LHLO and reads one reply per accepted
//! recipient after the content, so each recipient has its own outcome.
//! It reads the `lmtp_*` form of a parameter where Postern has one, else
//! the `smtp_*` one.
//!
//! Who talks to it: qmgr connects to `private/smtp` or `private/relay`
//! (one process serves up to 32 such connections at once, a thread each)
//! and sends one `ipc::DeliveryRequest` per connection (or, with
//! `smtp_delivery_batch_limit` above 1, a batch from a destination's
//! backlog, delivered one after another): a message, a next
//! hop (`[host]:port`, `[host]`, `domain:port`, `domain`) and a batch of
//! recipients; it answers one `ipc::DeliveryReply` after every recipient
//! is recorded through `postern_common::delivery::Job::record` (delivery
//! log line, defer/bounce log, done mark in the queue file).
//! What it does: looks up the next hop's MX hosts and addresses in DNS,
//! connects to each address in turn, and speaks SMTP (EHLO, PIPELINING,
//! SIZE, 8BITMIME) to hand the message over, recording each recipient as
//! sent, deferred or bounced with the server's reply, as Postfix's smtp(8).
//! What it may touch: the queue file of the request (read, and done marks)
//! and the message's `defer/` and `bounce/` logs; outbound TCP and DNS;
//! HTTPS to `mta-sts.DOMAIN` for MTA-STS policies, cached under
//! `data_directory/mta-sts`, and TLS-RPT results under
//! `data_directory/tls-rpt`.
//! It runs as `mail_owner`.
//!
//! The programs `smtp` and `lmtp` (`src/main.rs`, `src/bin/lmtp.rs`) are
//! thin shells around [`run`]; everything else is in this library.
//!
//! Modules:
//! - [`deliver`]: one request: next hop, servers in turn, outcomes
//!   recorded; the agent's parameters, TLS policy and SASL credentials
//!   per destination (`deliver/config.rs`), TCP connect
//!   (`deliver/connect.rs`).
//! - [`nexthop`]: next-hop syntax, MX ordering, the server list.
//! - [`dns`]: MX and address lookups with hickory-resolver.
//! - [`client`]: the SMTP/LMTP conversation over any stream, by stage:
//!   greeting and EHLO (`client/session.rs`), STARTTLS, AUTH, the mail
//!   transaction, the content after DATA or as BDAT chunks, and its wire
//!   form ([`client::DataEncoder`]).
//! - [`reply`]: server replies.
//! - [`tls`]: STARTTLS: levels, policy, certificate checks.
//! - [`dane`], [`tls_dane`]: DANE routes and TLSA certificate checks.
//! - [`sts`]: MTA-STS policies applied per MX host, and what each TLS
//!   session tells TLS-RPT.
//! - [`sasl`]: AUTH: credentials, mechanisms, security options.
//! - [`cache`]: sessions kept open between requests.

pub mod cache;
pub mod client;
pub mod content_checks;
pub mod dane;
pub mod deliver;
pub mod dns;
pub mod nexthop;
pub mod reply;
pub mod sasl;
pub mod sts;
pub mod tls;
pub mod tls_dane;

/// Runs the delivery agent, started by master: SMTP, or LMTP when the
/// program's name is `lmtp` (see the crate doc).
pub fn run() -> ! {
    // One program, two names: `lmtp` speaks LMTP (see the crate doc).
    let lmtp = std::env::args_os()
        .next()
        .and_then(|a| std::path::Path::new(&a).file_name().map(|f| f == "lmtp"))
        .unwrap_or(false);
    let name = if lmtp { "lmtp" } else { "smtp" };
    let (cfg, _args) = postern_common::service::start(name);
    let agent = std::sync::Arc::new(deliver::Agent::from_config(&cfg, lmtp));
    // Read before the drop to mail_owner (and the chroot, if any): the CA
    // files may be out of sight or readable by root only afterwards.
    agent.load_tls_roots();
    let at_exit = agent.clone();
    postern_common::delivery::serve_concurrently(
        &cfg,
        REQUESTS_PER_PROCESS,
        move |job| agent.deliver(job),
        move || at_exit.close_cached(),
    )
}

/// Deliveries one process runs at once, a thread each. qmgr bounds the
/// concurrency per destination; this only decides how many processes
/// carry it: twenty parallel deliveries are one process sharing its
/// settings, TLS configuration, resolver and connection cache, not twenty.
const REQUESTS_PER_PROCESS: usize = 32;
