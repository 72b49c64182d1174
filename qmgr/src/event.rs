//! What qmgr's main thread waits for: one channel of [`Event`]s, fed by
//! the other threads (wake-ups, deliveries, notices, administration,
//! master's drain signal). Its own module so that the threads that send
//! events ([`crate::admin`], the wake-up and notice threads) and the
//! loop that receives them ([`crate::manager`]) need not import each other.

use crate::bounce::NotQueued;
use crate::deliver::Completion;
use postern_common::ipc::{AdminReply, AdminRequest};
use std::sync::mpsc::Sender;

/// What the main thread waits for.
#[derive(Debug)]
pub enum Event {
    /// Wake-up bytes from `public/qmgr` ([`postern_common::ipc::Wakeup`]); empty: the timer.
    Wakeup(Vec<u8>),
    /// A delivery request is finished.
    Delivered(Completion),
    /// A notice was queued (its queue ID) or not (why).
    Notice {
        id: String,
        result: Result<String, NotQueued>,
    },
    /// An administrator's request from `private/qmgr-admin` ([`crate::admin`]).
    Admin {
        req: AdminRequest,
        reply: Sender<AdminReply>,
    },
    /// master's drain signal (reload): take nothing new in, let the
    /// requests in flight come back, then exit and let the new qmgr take
    /// over the queue as after any restart ([`crate::manager::DRAIN_GRACE`]).
    Drain,
    /// A suspension or resumption another node of the cluster published
    /// ([`crate::cluster`]).
    Cluster(crate::cluster::ClusterEvent),
}
