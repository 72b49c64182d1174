//! The notices a message's round calls for, and the thread that queues
//! them: what Postfix's `bounce` daemon decides when qmgr asks it to
//! flush a message's logs. [`bounce`] composes each notice and hands it
//! to cleanup; this module decides which go, from the message's bounce,
//! success and defer logs, and keeps the marks that let a round cut
//! short by a crash send each notice once.
//!
//! The manager calls [`plan`] when a message's round is over, [`start`]
//! to queue what it planned (the thread reports back with an
//! [`Event::Notice`]), and [`done`] once they are queued (or need not be).

use crate::bounce::{self, Kind, NotQueued, Notice, Returned, Settings};
use crate::event::Event;
use postern_common::delivery::{self, LogEntry};
use postern_common::qfile;
use postern_common::queue::{MessageLog, Queue, QueueTree};
use postern_common::time::now_secs;
use postern_common::{info, warning};
use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::sync::mpsc::Sender;
use std::time::Duration;

/// The `action` of the success-log entry that notes a delay warning.
const WARNED: &str = "warned";

/// Removes a message log; one that is not there is no error.
pub fn remove_log(tree: &QueueTree, log: MessageLog, id: &str) {
    if let Err(e) = std::fs::remove_file(tree.log_path(log, id)) {
        if e.kind() != io::ErrorKind::NotFound {
            warning!("{id}: remove {} log: {e}", log.name());
        }
    }
}

/// What [`plan`] found to send.
pub struct Plan {
    pub notices: Vec<Notice>,
    /// A delay warning is due in this round (whether or not a notice
    /// carries it: [`done`] notes it so that it goes once).
    pub warned_now: bool,
    /// The message has a bounce, defer or success log. Without one, and
    /// with no notice and no warning due, the round's end has no log to
    /// note in or remove (qmgr skips [`done`] and the removals: six
    /// failed system calls per message).
    pub any_log: bool,
}

/// The notices a message's round calls for, from its bounce, success and
/// defer logs. A notice that an earlier, unfinished attempt at this round
/// already queued (its mark is in the success log) reports only what was
/// added to its log since.
pub fn plan(
    tree: &QueueTree,
    st: &Settings,
    id: &str,
    env: &qfile::Envelope,
    all_done: bool,
) -> io::Result<Plan> {
    let failed_log = delivery::read_log_if_any(tree, MessageLog::Bounce, id)?;
    let defer_log = delivery::read_log_if_any(tree, MessageLog::Defer, id)?;
    let trace = delivery::read_log_if_any(tree, MessageLog::Success, id)?;
    let any_log = failed_log.is_some() || defer_log.is_some() || trace.is_some();
    let (failed_log, defer_log, trace) = (
        failed_log.unwrap_or_default(),
        defer_log.unwrap_or_default(),
        trace.unwrap_or_default(),
    );
    let marks = bounce::marks(&trace);
    let warned = trace.iter().any(|e| e.action == WARNED);
    // What the agents wrote: successes (not the marks qmgr adds).
    let success_log: Vec<LogEntry> = trace
        .into_iter()
        .filter(|e| e.action != WARNED && e.action != bounce::NOTIFIED)
        .collect();
    let round = Round::new(st, id, env, marks);
    let mut out = Vec::new();
    if !failed_log.is_empty() {
        round.failure_notices(&failed_log, &mut out);
    }
    round.success_notice(&success_log, &mut out);
    let age = now_secs().saturating_sub(env.arrival_secs);
    let warn_now = !all_done
        && st.delay_warning > 0
        && !warned
        && !round.from_postern
        && age >= st.delay_warning;
    if warn_now {
        round.delay_notices(&defer_log, env.arrival_secs, &mut out);
    }
    // notify_classes resource, software: the postmaster hears of
    // recipients deferred or bounced for a mail system problem (never
    // for a notice's own trouble: no notices about notices).
    if !round.from_postern {
        round.problem_notices(&defer_log, &failed_log, &mut out);
    }
    Ok(Plan {
        notices: out,
        warned_now: warn_now,
        any_log,
    })
}

/// One message's round, as the notices see it.
struct Round<'a> {
    st: &'a Settings,
    id: &'a str,
    /// The success log's marks of notices already queued, by key.
    marks: HashMap<String, LogEntry>,
    /// What every notice of the message shares.
    base: Notice,
    /// The message is a notice, or from the null sender.
    from_postern: bool,
    /// The message is a double bounce (or from its sender).
    double: bool,
    /// The envelope's `RET`.
    ret: &'a str,
    /// The message came with REQUIRETLS (RFC 8689).
    requiretls: bool,
}

impl<'a> Round<'a> {
    fn new(
        st: &'a Settings,
        id: &'a str,
        env: &'a qfile::Envelope,
        marks: HashMap<String, LogEntry>,
    ) -> Round<'a> {
        let notification = env.attr(qfile::attr::NOTIFICATION);
        Round {
            st,
            id,
            marks,
            from_postern: env.sender.is_empty() || notification.is_some(),
            double: notification == Some("2bounce") || st.is_double_bounce(&env.sender),
            requiretls: env.attr(qfile::attr::REQUIRETLS).is_some(),
            // RFC 8689 section 4.2.2 (non-delivery of a REQUIRETLS
            // message): as if RET=HDRS, whatever RET said; such a notice
            // carries no content and goes without REQUIRETLS.
            ret: match env.attr(qfile::attr::REQUIRETLS) {
                Some(_) => "HDRS",
                None => env.attr(qfile::attr::RET).unwrap_or(""),
            },
            base: Notice {
                myhostname: st.myhostname.clone(),
                kind: Kind::Failure,
                postmaster: false,
                queue_id: id.to_string(),
                sender: env.sender.clone(),
                to: env.sender.clone(),
                from: String::new(),
                arrival_secs: env.arrival_secs,
                envid: env.attr(qfile::attr::ENVID).unwrap_or("").to_string(),
                retry_until: None,
                entries: Vec::new(),
                returned: Returned::Headers,
                content_offset: env.content_offset,
                problem: None,
                mark: None,
                smtputf8: postern_common::smtputf8::Flags::of_envelope(env).requested,
            },
        }
    }

    /// The entries of `log` that notice `key` has not reported yet, the
    /// last of each recipient.
    fn unreported(&self, key: &str, log: &[LogEntry]) -> Vec<LogEntry> {
        bounce::last_per_recipient(log[bounce::reported(&self.marks, key, log)..].to_vec())
    }

    /// `n`, with the mark that says it reported `log` as notice `key`.
    fn marked(mut n: Notice, key: &str, log: &[LogEntry]) -> Notice {
        n.mark = Some(bounce::mark(key, log));
        n
    }

    /// A notice to the postmaster (`to`), from the double-bounce sender.
    fn postmaster(&self, to: &str, entries: Vec<LogEntry>, kind: Kind) -> Notice {
        Notice {
            kind,
            postmaster: true,
            to: to.to_string(),
            from: self.st.double_bounce_sender.clone(),
            entries,
            returned: Returned::Headers,
            ..self.base.clone()
        }
    }

    /// What the success and delay notices return of the message.
    fn returned(&self) -> Returned {
        if self.ret == "FULL" {
            Returned::Full(None)
        } else {
            Returned::Headers
        }
    }

    /// For failed recipients: the non-delivery notice to the sender and
    /// its postmaster copy, or a double bounce for a failed notice.
    fn failure_notices(&self, failed_log: &[LogEntry], out: &mut Vec<Notice>) {
        let (st, id) = (self.st, self.id);
        if self.double {
            warning!("{id}: undeliverable postmaster notification discarded");
        } else if self.from_postern {
            // A notice (or mail from the null sender) that failed: a
            // double bounce to the postmaster, if notify_classes says so.
            if st.class("2bounce") || st.class("bounce") {
                let failed = self.unreported("2bounce", failed_log);
                if !failed.is_empty() {
                    let mut n = self.postmaster(&st.twobounce_rcpt, failed, Kind::Failure);
                    if !self.requiretls {
                        n.returned = Returned::Full(Some(st.size_limit));
                    }
                    out.push(Self::marked(n, "2bounce", failed_log));
                }
            } else {
                info!("{id}: undeliverable notification discarded");
            }
        } else {
            let report: Vec<LogEntry> = self
                .unreported("bounce", failed_log)
                .into_iter()
                .filter(|e| bounce::wanted(Kind::Failure, e.notify))
                .collect();
            if !report.is_empty() {
                let n = Notice {
                    entries: report,
                    returned: match self.ret {
                        "HDRS" => Returned::Headers,
                        "FULL" => Returned::Full(None),
                        _ => Returned::Full(Some(st.size_limit)),
                    },
                    ..self.base.clone()
                };
                out.push(Self::marked(n, "bounce", failed_log));
            }
            if st.class("bounce") {
                let failed = self.unreported("bounce-copy", failed_log);
                if !failed.is_empty() {
                    let n = self.postmaster(&st.bounce_rcpt, failed, Kind::Failure);
                    out.push(Self::marked(n, "bounce-copy", failed_log));
                }
            }
        }
    }

    /// The delivery status notice for recipients delivered with
    /// `NOTIFY=SUCCESS`.
    fn success_notice(&self, success_log: &[LogEntry], out: &mut Vec<Notice>) {
        let delivered: Vec<LogEntry> = self
            .unreported("success", success_log)
            .into_iter()
            .filter(|e| matches!(e.action.as_str(), "delivered" | "relayed" | "expanded"))
            .filter(|e| bounce::wanted(Kind::Success, e.notify))
            .collect();
        if !delivered.is_empty() && !self.from_postern {
            let n = Notice {
                kind: Kind::Success,
                entries: delivered,
                returned: self.returned(),
                ..self.base.clone()
            };
            out.push(Self::marked(n, "success", success_log));
        }
    }

    /// The delay warning to the sender and its postmaster copy, for this
    /// round's deferrals (the recipients still pending).
    fn delay_notices(&self, defer_log: &[LogEntry], arrival_secs: u64, out: &mut Vec<Notice>) {
        let st = self.st;
        let deferred: Vec<LogEntry> = bounce::last_per_recipient(defer_log.to_vec());
        let wanted: Vec<LogEntry> = deferred
            .iter()
            .filter(|e| bounce::wanted(Kind::Delay, e.notify))
            .cloned()
            .collect();
        let retry_until = Some(arrival_secs + st.max_lifetime);
        // A delay warning goes once: a mark says it already went.
        if !wanted.is_empty() && !self.marks.contains_key("delay") {
            let n = Notice {
                kind: Kind::Delay,
                entries: wanted,
                retry_until,
                returned: self.returned(),
                ..self.base.clone()
            };
            out.push(Self::marked(n, "delay", &[]));
        }
        if st.class("delay") && !deferred.is_empty() && !self.marks.contains_key("delay-copy") {
            let mut n = self.postmaster(&st.delay_rcpt, deferred, Kind::Delay);
            n.retry_until = retry_until;
            out.push(Self::marked(n, "delay-copy", &[]));
        }
    }

    /// The postmaster's notices of resource and software problems
    /// (`notify_classes`), from the deferred and failed recipients.
    fn problem_notices(
        &self,
        defer_log: &[LogEntry],
        failed_log: &[LogEntry],
        out: &mut Vec<Notice>,
    ) {
        let st = self.st;
        let log: Vec<LogEntry> = defer_log.iter().chain(failed_log.iter()).cloned().collect();
        for p in [bounce::Problem::Resource, bounce::Problem::Software] {
            if !st.class(p.class()) {
                continue;
            }
            let entries: Vec<LogEntry> = self
                .unreported(p.class(), &log)
                .into_iter()
                .filter(|e| bounce::problem_of(e) == Some(p))
                .collect();
            if !entries.is_empty() {
                let mut n = self.postmaster(&st.error_rcpt, entries, Kind::Delay);
                n.problem = Some(p);
                out.push(Self::marked(n, p.class(), &log));
            }
        }
    }
}

/// The notices of a round are queued (or need not be): the success
/// log keeps only the note that a delay warning was sent (the marks
/// of the notices queued go with the rest), then the bounce log goes.
/// In that order: a crash in between sends a notice twice, never not
/// at all. `warned_now`: this round's [`Plan::warned_now`].
pub fn done(tree: &QueueTree, id: &str, warned_now: bool) {
    let trace = delivery::read_log(tree, MessageLog::Success, id).unwrap_or_default();
    let warned = warned_now || trace.iter().any(|e| e.action == WARNED);
    let other = trace.iter().any(|e| e.action != WARNED);
    if other || (warned && trace.is_empty()) {
        remove_log(tree, MessageLog::Success, id);
        if warned {
            let mark = LogEntry {
                action: WARNED.into(),
                ..Default::default()
            };
            if let Err(e) = delivery::append_log(tree, MessageLog::Success, id, &mark) {
                warning!("{id}: note the delay warning: {e}");
            }
        }
    }
    remove_log(tree, MessageLog::Bounce, id);
}

/// Sends notices on their own thread, which reports with an
/// [`Event::Notice`] on `tx`. Returns whether it started. Each notice
/// queued (or refused for good) has its mark appended to the success log
/// at once, before the next is tried.
pub fn start(
    tree: &QueueTree,
    timeout: Duration,
    tx: Sender<Event>,
    id: &str,
    notices: Vec<Notice>,
) -> bool {
    let tree = tree.clone();
    let id = id.to_string();
    let started = std::thread::Builder::new()
        .name("notice".into())
        .spawn(move || {
            let result = match File::open(tree.path(Queue::Active, &id)) {
                Ok(file) => send_all(&tree, timeout, &id, &notices, &file),
                Err(e) => Err(NotQueued {
                    permanent: false,
                    reason: format!("open queue file: {e}"),
                }),
            };
            let _ = tx.send(Event::Notice { id, result });
        });
    match started {
        Ok(_) => true,
        Err(e) => {
            warning!("cannot start a notice thread: {e}");
            false
        }
    }
}

/// Queues `notices` of message `id` (its queue file open as `file`) one
/// after the other, up to the first that fails for now. Returns the
/// queue IDs of the notices queued, space-separated.
fn send_all(
    tree: &QueueTree,
    timeout: Duration,
    id: &str,
    notices: &[Notice],
    file: &File,
) -> Result<String, NotQueued> {
    let note = |n: &Notice| {
        if let Some(m) = &n.mark {
            if let Err(e) = delivery::append_log(tree, MessageLog::Success, id, m) {
                warning!("{id}: note the notification: {e}");
            }
        }
    };
    let mut ids = Vec::new();
    for n in notices {
        match bounce::send(tree, timeout, n, file) {
            Ok(new_id) => {
                info!(
                    "{id}: {} notification: {new_id}",
                    match (n.kind, n.postmaster) {
                        (_, true) => "postmaster",
                        (Kind::Failure, _) => "sender non-delivery",
                        (Kind::Delay, _) => "sender delay",
                        (Kind::Success, _) => "sender delivery status",
                    }
                );
                note(n);
                ids.push(new_id);
            }
            Err(e) if e.permanent => {
                // Asking again would be refused again.
                warning!("{id}: notification discarded: {}", e.reason);
                note(n);
            }
            Err(e) => return Err(e),
        }
    }
    Ok(ids.join(" "))
}
