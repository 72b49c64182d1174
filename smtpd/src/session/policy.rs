//! What the restrictions, DNS and anvil decide: the [`Request`] the
//! restrictions see, the DNS answers they wait for, the rate limits, and
//! Postfix's reject log line.

use super::{verb_index, Done, Session, State};
use crate::anvil::Event;
use crate::dns::{Answer, NameStatus, PeerName, Query};
use crate::restrictions::Request;
use postern_common::smtp_command::Verb;
use postern_common::{info, warning};

impl Session {
    /// DNS lookups the restrictions need.
    pub fn take_dns_requests(&mut self) -> Vec<Query> {
        std::mem::take(&mut self.dns_requests)
    }

    /// A DNS answer: when the command that waited has all it needs, it
    /// runs again.
    pub fn dns_answer(&mut self, q: Query, a: Answer) {
        if !self.dns_pending.remove(&q) {
            // Asked by an earlier session in this slot.
            return;
        }
        if let Query::Peer(_) = q {
            let names = match a {
                Answer::Peer(p) => p,
                _ => PeerName::unknown(NameStatus::TryAgain),
            };
            self.client.names = names;
            if matches!(self.state, State::WaitPeerName) {
                self.state = State::Command;
                self.connected();
                self.process();
            }
            return;
        }
        self.dns.insert(q, a);
        if matches!(self.state, State::WaitDnsConnect) {
            self.state = State::Command;
            self.greet();
            self.process();
            return;
        }
        if matches!(self.state, State::WaitDns(_)) {
            let State::WaitDns(line) = std::mem::replace(&mut self.state, State::Command) else {
                return;
            };
            self.command(&line);
            self.check_error_limit();
            self.process();
        }
    }

    /// Counts one `event` against this client's rate limit; over it, logs
    /// Postfix's warning (`WHAT rate limit exceeded: ...`), answers
    /// `450 4.7.1 Error: TEXT from IP` as Postfix, and returns true.
    pub(super) fn over_rate_limit(&mut self, event: Event, what: &str, text: &str) -> bool {
        if self.sleep.done.get() > 0 || self.verify_rerun {
            // Run again after a sleep: counted the first time.
            return false;
        }
        let rate = self.anvil.borrow_mut().event(self.client.addr, event);
        let Err(n) = rate else { return false };
        warning!(
            "{what} rate limit exceeded: {n} from {} for service {}",
            self.namaddr,
            self.cfg.service
        );
        let ip = self.client.addr;
        self.reply(&format!("450 4.7.1 Error: {text} from {ip}"));
        true
    }

    /// Asks for the DNS answers in `needed` that the session does not
    /// have yet (once each); true when there are any.
    pub(super) fn request_dns(&mut self, needed: Vec<Query>) -> bool {
        let missing: Vec<Query> = needed
            .into_iter()
            .filter(|q| !self.dns.contains_key(q))
            .collect();
        for q in &missing {
            if self.dns_pending.insert(q.clone()) {
                self.dns_requests.push(q.clone());
            }
        }
        !missing.is_empty()
    }

    /// [`Session::request_dns`] for a command: true when answers are
    /// missing; the command (`verb`) then waits in [`State::WaitDns`] and
    /// runs again when they are in.
    pub(super) fn await_dns(&mut self, needed: Vec<Query>, verb: Verb) -> bool {
        if !self.request_dns(needed) {
            return false;
        }
        self.state = State::WaitDns(std::mem::take(&mut self.current_line));
        // Counted when the command runs again.
        self.counts[verb_index(verb)].total -= 1;
        true
    }

    /// `reject_unverified_*` stopped the restrictions of the command
    /// (`verb`) to ask the verify service about an address: the command
    /// waits in [`State::WaitDns`] (taking no input) and runs again with
    /// the answer. False: nothing asked. Called before
    /// [`Session::await_sleep`], which would forget the sleeps done.
    pub(super) fn await_verify(&mut self, verb: Verb) -> bool {
        let Some(address) = self.verify_wanted.take() else {
            return false;
        };
        // The sleeps met are counted again when the command runs again.
        self.sleep.seen.set(0);
        self.sleep.secs.set(0);
        self.verify_rerun = true;
        // Its first run's PREPEND headers come again.
        let mark = self.prepend_mark;
        self.access_prepend.borrow_mut().truncate(mark);
        let asked = self.await_dns(vec![Query::Verify(address)], verb);
        if !asked {
            // An answer is in already (cannot happen: the check asks only
            // for a missing one); run on without it rather than loop.
            warning!("verify answer present but not used");
        }
        asked
    }

    /// The command is done: a later command asks the verify service
    /// again (its answer may have changed: a probe came back), and policy
    /// servers again.
    pub(super) fn command_done(&mut self) {
        self.verify_rerun = false;
        self.policy_memo.borrow_mut().clear();
        self.verify_wanted.replace(None);
        self.dns
            .retain(|q, _| !matches!(q, Query::Verify(_) | Query::Milter(_)));
    }

    /// `sleep SECONDS` stopped the restrictions of the command (`verb`;
    /// None: the client list at connect): the session holds its input and
    /// output that long, then runs the command again
    /// ([`Session::resume_after_sleep`]), the sleep done. False: no pause.
    pub(super) fn await_sleep(&mut self, verb: Option<Verb>) -> bool {
        let secs = self.sleep.secs.take();
        let seen = self.sleep.seen.take();
        if secs == 0 || self.hangup {
            self.sleep.done.set(0);
            return false;
        }
        self.delay += std::time::Duration::from_secs(secs);
        self.sleep.done.set(seen);
        self.sleeping = true;
        match verb {
            Some(v) => {
                self.state = State::WaitDns(std::mem::take(&mut self.current_line));
                self.counts[verb_index(v)].total -= 1;
            }
            None => self.state = State::WaitDnsConnect,
        }
        true
    }

    /// The pause of a `sleep` is over (the loop calls this once the held
    /// output may go, after reading what the client sent meanwhile): the
    /// command runs again; what came meanwhile counts as pipelined.
    pub fn resume_after_sleep(&mut self) -> bool {
        if !std::mem::take(&mut self.sleeping) {
            return false;
        }
        self.pipelined = !self.input.is_empty();
        match std::mem::replace(&mut self.state, State::Command) {
            State::WaitDnsConnect => self.greet(),
            State::WaitDns(line) => {
                self.command(&line);
                self.check_error_limit();
            }
            other => self.state = other,
        }
        self.process();
        true
    }

    /// What the restrictions see now.
    pub(super) fn request<'a>(&'a self, rcpt: Option<&'a str>, command: &'a str) -> Request<'a> {
        Request {
            client_addr: Some(self.client.addr),
            client_name: &self.client.names.name,
            client_reverse_name: &self.client.names.reverse_name,
            name_status: self.client.names.name_status,
            reverse_status: self.client.names.reverse_status,
            helo: self.helo.as_deref(),
            sender: self.tx.as_ref().map(|t| t.sender.as_str()),
            recipient: rcpt,
            etrn_domain: None,
            sasl_username: self.sasl_username.as_deref(),
            esmtp: self.esmtp,
            pipelined: self.pipelined,
            command,
            dns: Some(&self.dns),
            filter: Some(&self.access_filter),
            prepend: Some(&self.access_prepend),
            session_attrs: if self.cfg.restrictions.uses_policy() {
                self.policy_attrs()
            } else {
                Vec::new()
            },
            tls: self.tls.is_some(),
            rcpt_count: self.tx.as_ref().map_or(0, |t| t.recipients.len()),
            defers: Some(&self.defers),
            reply_subject: None,
            pause: Some(&self.sleep),
            client_cert: self.client_cert.as_ref(),
            verify: Some(&self.verify_wanted),
            policy_memo: Some(&self.policy_memo),
        }
    }

    /// What a policy server is told that [`Request`] does not carry
    /// (`check_policy_service`, SMTPD_POLICY_README).
    fn policy_attrs(&self) -> Vec<(&'static str, String)> {
        let tx = self.tx.as_ref();
        let mut a = vec![
            (
                "queue_id",
                tx.and_then(|t| t.queue_id.clone()).unwrap_or_default(),
            ),
            (
                "recipient_count",
                tx.map(|t| t.recipients.len()).unwrap_or(0).to_string(),
            ),
            (
                "client_port",
                self.client.port.map(|p| p.to_string()).unwrap_or_default(),
            ),
            (
                "server_address",
                self.client
                    .local
                    .map(|l| l.ip().to_string())
                    .unwrap_or_default(),
            ),
            (
                "server_port",
                self.client
                    .local
                    .map(|l| l.port().to_string())
                    .unwrap_or_default(),
            ),
            (
                "instance",
                tx.map(|t| t.instance.clone()).unwrap_or_default(),
            ),
            ("sasl_method", self.sasl_method.clone().unwrap_or_default()),
            (
                "sasl_sender",
                tx.and_then(|t| t.sasl_sender.clone()).unwrap_or_default(),
            ),
            ("size", tx.map(|t| t.size).unwrap_or(0).to_string()),
        ];
        if let Some(t) = &self.tls {
            a.push(("encryption_protocol", t.protocol.clone()));
            a.push(("encryption_cipher", t.cipher.clone()));
            a.push(("encryption_keysize", t.bits.to_string()));
        }
        if self.sasl_username.is_none() {
            // Only after a successful AUTH (an AUTH in progress has a
            // method but no login yet).
            a.retain(|(k, _)| *k != "sasl_method");
        }
        a
    }

    pub(super) fn check_recipient(&self, rcpt: &str) -> Option<String> {
        let req = self.request(Some(rcpt), self.where_);
        self.cfg.restrictions.check_recipient(&req)
    }

    /// A refusal by the restrictions (or a limit): logged as Postfix
    /// does, and answered; the command failed.
    pub(super) fn reject(&mut self, reply: &str, sender: Option<&str>, rcpt: Option<&str>) -> Done {
        self.log_reject(reply, sender, rcpt);
        self.fail(reply)
    }

    /// Postfix's reject log line.
    pub(super) fn log_reject(&self, reply: &str, sender: Option<&str>, rcpt: Option<&str>) {
        // Postfix names the queue file once there is one (a recipient
        // refused after another was accepted).
        let queue_id = self.tx.as_ref().and_then(|t| t.queue_id.as_deref());
        let mut line = format!(
            "{}: reject: {} from {}: {};",
            queue_id.unwrap_or("NOQUEUE"),
            self.where_,
            self.namaddr,
            reply
        );
        if let Some(s) = sender {
            line.push_str(&format!(" from=<{s}>"));
        }
        if let Some(r) = rcpt {
            line.push_str(&format!(" to=<{r}>"));
        }
        line.push_str(&format!(" proto={}", self.protocol()));
        if let Some(h) = &self.helo {
            line.push_str(&format!(" helo=<{h}>"));
        }
        info!("{line}");
    }
}

/// A new transaction's `instance` for policy servers: the process, the
/// time and a counter, as Postfix's (unique while the process lives).
pub(super) fn next_instance() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNT: AtomicU64 = AtomicU64::new(0);
    let n = COUNT.fetch_add(1, Ordering::Relaxed);
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    format!("{:x}.{t:x}.{n:x}", std::process::id())
}
