//! smtp: the SMTP delivery agent (master.cf services `smtp` and `relay`).
//!
//! Who talks to it: qmgr connects to `private/smtp` or `private/relay`
//! and sends one `ipc::DeliveryRequest` per connection: a message, a next
//! hop (`[host]:port`, `[host]`, `domain:port`, `domain`) and a batch of
//! recipients; it answers one `ipc::DeliveryReply` after every recipient
//! is recorded through `postern_common::delivery::Job::record` (delivery
//! log line, defer/bounce log, done mark in the queue file).
//! What it does: looks up the next hop's MX hosts and addresses in DNS,
//! connects to each address in turn, and speaks SMTP (EHLO, PIPELINING,
//! SIZE, 8BITMIME) to hand the message over, recording each recipient as
//! sent, deferred or bounced with the server's reply, as Postfix's smtp(8).
//! What it may touch: the queue file of the request (read, and done marks)
//! and the message's `defer/` and `bounce/` logs; outbound TCP and DNS.
//! It runs as `mail_owner`.
//!
//! Modules: [`nexthop`] (next-hop syntax, MX ordering, the server list),
//! [`dns`] (MX and address lookups with hickory-resolver), [`client`] (the
//! SMTP conversation over any stream, DATA encoding), [`reply`] (server
//! replies), [`deliver`] (one request: servers in turn, outcomes recorded).

mod client;
mod deliver;
mod dns;
mod nexthop;
mod reply;

fn main() {
    let (cfg, _args) = postern_common::service::start("smtp");
    let mut agent = deliver::Agent::from_config(&cfg);
    postern_common::delivery::serve(&cfg, |job| agent.deliver(job))
}
