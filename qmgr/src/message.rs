//! A message in the active queue, as qmgr keeps it in memory: its
//! envelope and where each recipient stands in this delivery round.
//!
//! No file stays open: the queue file is opened when it is needed, so
//! `qmgr_message_active_limit` messages do not mean as many descriptors.

use postern_common::ipc::{DeliveryRecipient, DeliveryRequest, Outcome, RecipientResult};
use postern_common::qfile::Envelope;
use std::time::{SystemTime, UNIX_EPOCH};

/// Where one recipient stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RcptState {
    /// Done before this round, or sent or bounced in it.
    Done,
    /// In a scheduler entry, not yet dispatched.
    Queued,
    /// In a request an agent is working on.
    InFlight,
    /// Deferred in this round: waits for the next one.
    Deferred,
}

#[derive(Debug)]
pub struct Message {
    pub id: String,
    pub env: Envelope,
    /// One per `env.recipients`, same order.
    pub state: Vec<RcptState>,
    /// Scheduler entries not yet dispatched.
    pub queued: usize,
    /// Requests at delivery agents.
    pub in_flight: usize,
    /// Being finished (a notice is on its way to cleanup): nothing more
    /// may happen to it until that is answered.
    pub finishing: bool,
    /// Whether, when finishing, every recipient turned out done.
    pub all_done: bool,
    /// What an administrator asked for (postsuper), done as soon as no
    /// request of the message is in flight.
    pub admin: Option<AdminAction>,
    /// The notices being sent include this message's delay warning.
    pub warned_now: bool,
    /// The round's end found no bounce, defer or success log and had no
    /// notice to send: there is no log to remove ([`crate::notices::Plan::any_log`]).
    pub no_logs: bool,
    /// Where the next slice of recipients starts in the queue file, when
    /// `env.recipients` holds only some (`qmgr_message_recipient_limit`).
    pub more: Option<u64>,
    /// Expired by the administrator (`postsuper -e`/`-f`): returned to
    /// the sender in this round instead of being delivered.
    pub force_expire: bool,
    /// This round deferred recipients only because their site is
    /// suspended, the earliest suspension ending then (unix seconds): the
    /// retry waits for it. None once a recipient was deferred otherwise.
    pub site_wait: Option<u64>,
    /// A recipient was deferred for another reason this round.
    pub other_defer: bool,
    /// Recipients were deferred by a site in backoff with
    /// `backoff_retry_after`: the earliest retry time that gives (unix
    /// seconds).
    pub backoff_retry: Option<u64>,
    /// A recipient was deferred where no `backoff_retry_after` applies.
    pub plain_defer: bool,
}

/// An administrator's request for an active message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AdminAction {
    Delete,
    Hold,
    Release,
}

impl Message {
    pub fn new(id: &str, env: Envelope) -> Message {
        let state = env
            .recipients
            .iter()
            .map(|r| {
                if r.done {
                    RcptState::Done
                } else {
                    RcptState::Deferred
                }
            })
            .collect();
        Message {
            id: id.to_string(),
            env,
            state,
            queued: 0,
            in_flight: 0,
            finishing: false,
            all_done: false,
            admin: None,
            warned_now: false,
            no_logs: false,
            more: None,
            force_expire: false,
            site_wait: None,
            other_defer: false,
            backoff_retry: None,
            plain_defer: false,
        }
    }

    /// Nothing queued and nothing in flight: the round is over.
    pub fn idle(&self) -> bool {
        self.queued == 0 && self.in_flight == 0 && !self.finishing
    }

    /// Seconds since arrival.
    pub fn age(&self) -> f64 {
        let arrival = UNIX_EPOCH
            + std::time::Duration::new(self.env.arrival_secs, self.env.arrival_usecs * 1000);
        SystemTime::now()
            .duration_since(arrival)
            .unwrap_or_default()
            .as_secs_f64()
    }

    /// A delivery request for some of the recipients (envelope indexes).
    pub fn request(&self, transport: &str, nexthop: &str, indexes: &[usize]) -> DeliveryRequest {
        DeliveryRequest {
            queue: "active".into(),
            queue_id: self.id.clone(),
            transport: transport.to_string(),
            nexthop: nexthop.to_string(),
            sender: self.env.sender.clone(),
            arrival_secs: self.env.arrival_secs,
            arrival_usecs: self.env.arrival_usecs,
            content_offset: self.env.content_offset,
            content_size: self.env.content_size,
            recipients: indexes
                .iter()
                .map(|&i| DeliveryRecipient {
                    offset: self.env.recipients[i].offset,
                    rcpt: self.env.recipients[i].rcpt.clone(),
                })
                .collect(),
            queue_wait: self.age(),
            flags: if self.env.attr(postern_common::qfile::attr::TRACE_FLAGS)
                == Some(postern_common::verify::PROBE)
            {
                DeliveryRequest::VERIFY
            } else {
                0
            },
            site: None,
            pool: String::new(),
            selection: String::new(),
        }
    }

    /// Applies the results for recipients `indexes`: sent and bounced ones
    /// are done; deferred ones, and any the results do not mention, wait
    /// for the next round.
    pub fn apply(&mut self, indexes: &[usize], results: &[RecipientResult]) {
        for &i in indexes {
            let offset = self.env.recipients[i].offset;
            let outcome = results
                .iter()
                .rev()
                .find(|r| r.offset == offset)
                .map(|r| r.outcome);
            self.state[i] = match outcome {
                Some(Outcome::Sent) | Some(Outcome::Bounced) => RcptState::Done,
                _ => RcptState::Deferred,
            };
        }
    }

    pub fn set(&mut self, indexes: &[usize], state: RcptState) {
        for &i in indexes {
            self.state[i] = state;
        }
    }
}
