//! `qmgr`: the queue manager. One long-running process (master.cf
//! `qmgr unix n - n 300 1 qmgr`) that moves mail from `incoming/` and
//! `deferred/` into `active/`, decides where each recipient goes, hands
//! deliveries to the agents, and removes, defers, expires or bounces each
//! message when its round is over.
//!
//! Who talks to it: master starts it with the `public/qmgr` listener on
//! fd 3, on which cleanup, `postqueue -f`/`sendmail -q` and master itself
//! write one-byte wake-ups (`W`/`I` scan incoming, `D` scan deferred, `F`
//! or `A` flush: deferred mail regardless of retry time). It takes each
//! deferred file when its retry time comes, from an index of `deferred/`
//! by retry time (listed at start, on `D`, and every
//! `qmgr_deferred_rescan_time`). It talks to the delivery agents at
//! `private/TRANSPORT` (one `DeliveryRequest`, one `DeliveryReply` per
//! connection, or a batch of them for a destination with a backlog:
//! `*_delivery_batch_limit`) and to cleanup at `public/cleanup` to queue non-delivery
//! notices.
//!
//! What it may touch: the queue directories `incoming active deferred
//! hold corrupt` (renames, removal of finished files, retry times as mtimes),
//! the message logs in `defer/` and `bounce/`, and the in-place done marks
//! of recipients it fails or expires itself.
//!
//! The modules split the work by data structure and stage, as Postfix
//! splits its qmgr (its counterpart files in parentheses):
//! - [`manager`]: the state of the active queue and the main loop
//!   (`qmgr.c`, `qmgr_active.c`);
//! - [`event`]: what the main loop waits for, from the other threads;
//! - [`scan`]: start-up recovery and the incoming and deferred scans
//!   (`qmgr_scan.c`, `qmgr_move.c`); [`index`]: the deferred files by
//!   retry time, so that a deferred scan reads only what is due;
//! - [`message`]: one active message and its recipients' states
//!   (`qmgr_message.c`);
//! - [`resolve`]: recipient → (transport, next hop);
//! - [`transports`]: transports qmgr delivers itself (master.cf `error`,
//!   `discard` services, whatever their name);
//! - [`schedule`]: per-transport, per-destination queues and limits,
//!   concurrency feedback, dead destinations, rate delays
//!   (`qmgr_transport.c`, `qmgr_queue.c`, `qmgr_entry.c`, `qmgr_feedback.c`);
//! - [`sites`]: sites (the MX host sets receivers throttle) and their
//!   `delivery_policy_maps` state: connections, rates, suspensions;
//! - [`cluster`]: those limits and suspensions shared by several nodes
//!   through Redis (`delivery_policy_redis`);
//! - [`deliver`]: one thread per request to a delivery agent
//!   (`qmgr_deliver.c`);
//! - [`record`]: outcomes qmgr records itself (error/retry transports,
//!   unreachable agents, expiry) (`qmgr_defer.c`, `qmgr_bounce.c`,
//!   `qmgr_error.c`);
//! - [`notices`]: which notices a message's round calls for, from its
//!   message logs, and the thread that queues them (what Postfix's
//!   `bounce` daemon decides when qmgr asks it to flush a log);
//! - [`bounce`]: delivery status notices (failure, delay, success,
//!   postmaster copies, double bounces), composed and queued via cleanup
//!   (Postfix's `bounce` daemon, which Postern does not run);
//! - [`retry`]: backoff and queue lifetime;
//! - [`retire`]: finished files emptied into `spare/` (or removed) on a
//!   thread of their own;
//! - [`admin`]: `private/qmgr-admin`, postsuper's requests for active
//!   messages (delete, hold, release), applied when none is in flight,
//!   `postern queues|suspend|resume|bounce`, and the status daemon's
//!   read-only `Status` question;
//! - [`stats`]: what the status daemon is told: recipients per minute,
//!   by (status, class, source), per site.
//!
//! `e2e` (tests only) runs the whole manager on a real queue directory
//! with fake agents and a fake cleanup.

pub mod admin;
pub mod bounce;
pub mod cluster;
pub mod deliver;
#[cfg(test)]
mod e2e;
pub mod event;
pub mod index;
pub mod manager;
pub mod message;
pub mod notices;
pub mod record;
pub mod resolve;
pub mod retire;
pub mod retry;
pub mod scan;
pub mod schedule;
pub mod sites;
pub mod sources;
pub mod stats;
pub mod transports;
