//! One SMTP session as a state machine, with no I/O of its own.
//!
//! The event loop hands it the client's bytes ([`Session::receive`]) and
//! cleanup's answers ([`Session::cleanup_reply`], [`Session::cleanup_lost`]),
//! and takes from it the bytes to send to the client
//! ([`Session::take_output`]) and the requests to send to cleanup
//! ([`Session::take_requests`]). A [`CleanupRequest::Open`] there means
//! "connect to cleanup and send this"; after `Abort`, or after cleanup has
//! answered `Queued` or `Failed`, that connection is finished.
//!
//! Commands are taken from the input in order, as many as there are
//! (PIPELINING); their replies collect in the output, which the loop
//! sends when the input is used up. While the session waits for cleanup
//! (after DATA, and after the final dot) it takes no input: what the
//! client pipelined stays buffered until the answer comes.
//!
//! Where things are:
//! - this file: the [`Session`] type and its state, the loop's side (input,
//!   output, timeout, end), reading command lines and dispatching them
//!   (`command`), the replies (`reply`, and `fail` for a
//!   command that failed) and the per-command statistics.
//! - `greeting`: the connection's start (logging, anvil, the greeting or
//!   the `smtpd_delay_reject = no` refusal), HELO and EHLO.
//! - `transaction`: MAIL, RCPT, DATA and RSET; address syntax and
//!   SMTPUTF8; the end of a transaction.
//! - `cleanup`: the queue file through cleanup: opening it, the envelope,
//!   the content and the Received header, the end of DATA, and the
//!   replies made of cleanup's answers.
//! - `auth`: AUTH and the exchange with the auth server.
//! - `tls`: STARTTLS and what the session forgets when TLS starts.
//! - `vrfy`: VRFY.
//! - `etrn`: ETRN (RFC 1985), `fast_flush_domains` and the flush.
//! - `policy`: what the restrictions see and decide, the DNS answers they
//!   wait for, the anvil rate limits, the reject log line (`reject`).
//! - `tests/`: the unit tests, one file per concern above.

mod auth;
mod cleanup;
mod command_filter;
mod ehlo_discard;
mod etrn;
mod greeting;
mod milter;
mod policy;
mod proxy;
#[cfg(test)]
mod tests;
mod tls;
mod transaction;
mod vrfy;
mod xforward;

use crate::anvil::Anvil;
use crate::data::Decoder;
use crate::dns::{Answer, NameStatus, PeerName, Query};
use crate::sasl::SaslRequest;
use crate::settings::{Settings, TlsLevel};
use postern_common::ipc::CleanupRequest;
use postern_common::qfile::Recipient;
use postern_common::smtp_command::{self as protocol, Verb};
use postern_common::tls::Negotiated;
use postern_common::{info, warning};
use std::cell::RefCell;
use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::ops::ControlFlow;
use std::rc::Rc;
use std::sync::Arc;

/// Postfix's smtpd_junk_command_limit default: HELO, NOOP, RSET, VRFY ...
/// beyond this many count as errors.
const JUNK_COMMAND_LIMIT: u32 = 100;

/// Who is on the other end.
#[derive(Debug, Clone)]
pub struct Client {
    /// Its host names, verified and as the PTR record gives them.
    pub names: PeerName,
    pub addr: IpAddr,
    /// The client's port, when known.
    pub port: Option<u16>,
    /// Our end of the connection, when known.
    pub local: Option<SocketAddr>,
    /// The connection's socket, to see whether the client talked before
    /// the greeting (None in tests without one).
    pub socket: Option<std::os::fd::RawFd>,
}

impl Client {
    /// A client at `addr` whose name is not known (yet: with
    /// `smtpd_peername_lookup` the session looks it up before it logs
    /// the connection).
    pub fn new(addr: IpAddr) -> Client {
        let addr = postern_common::cidr::normalize(addr);
        Client {
            names: PeerName::unknown(NameStatus::NotFound),
            addr,
            port: None,
            local: None,
            socket: None,
        }
    }

    /// A client connected from `peer` to our `local` address.
    pub fn connected(peer: SocketAddr, local: Option<SocketAddr>) -> Client {
        let mut c = Client::new(peer.ip());
        c.port = Some(peer.port());
        c.local = local.map(|l| SocketAddr::new(postern_common::cidr::normalize(l.ip()), l.port()));
        c
    }

    /// `name[addr]`, as logs show a client.
    pub fn namaddr(&self) -> String {
        format!("{}[{}]", self.names.name, self.addr)
    }
}

#[derive(Debug, Default, Clone, Copy)]
struct Count {
    ok: u32,
    total: u32,
}

/// The envelope being built between MAIL and the end of DATA.
#[derive(Debug, Default)]
struct Transaction {
    sender: String,
    recipients: Vec<Recipient>,
    envid: Option<String>,
    ret: Option<String>,
    overshoot: u32,
    queue_id: Option<String>,
    /// MAIL FROM had SMTPUTF8 (RFC 6531).
    smtputf8: bool,
    /// MAIL FROM had REQUIRETLS (RFC 8689), over TLS.
    requiretls: bool,
    /// MAIL FROM's AUTH= mailbox (RFC 4954), xtext-decoded, kept only
    /// from an authenticated client and not `<>`, as Postfix's smtpd
    /// (pipe(8)'s `${sasl_sender}`).
    sasl_sender: Option<String>,
    /// MAIL FROM's SIZE= (0 without one), for a policy server.
    size: u64,
    /// The client's MAIL FROM line, for a before-queue filter.
    proxy_mail: String,
    /// speed_adjust: the accepted RCPT TO lines and the content, sent
    /// to the filter after the final dot.
    proxy_rcpts: Vec<String>,
    proxy_content: Vec<u8>,
    /// This transaction's name for policy servers (`instance`), unique
    /// in the process's life.
    instance: String,
}

#[derive(Debug)]
struct DataState {
    decoder: Decoder,
    /// Bytes received so far, as the client sent them.
    size: u64,
    too_big: bool,
    /// The reply to give at the end instead of sending Close.
    failure: Option<String>,
    /// Content not yet handed to cleanup.
    content: Vec<u8>,
}

#[derive(Debug)]
enum State {
    /// Reading commands.
    Command,
    /// The queue file is being opened: the reply to MAIL, RCPT or DATA
    /// waits for cleanup's Opened.
    WaitOpened(Opening),
    /// Reading message content.
    Data(Box<DataState>),
    /// The final dot seen, Close sent; waiting for Queued.
    WaitQueued,
    /// EHLO needs the auth server's mechanism list; the reply waits.
    WaitMechs,
    /// AUTH sent to the auth server; waiting for its answer.
    WaitAuth,
    /// A 334 challenge sent; the next line is the client's answer.
    AuthResponse,
    /// The restrictions need DNS answers; this command line runs again
    /// when they are in.
    WaitDns(Vec<u8>),
    /// The client restrictions (`smtpd_delay_reject = no`) need DNS
    /// answers before the greeting.
    WaitDnsConnect,
    /// The before-queue filter's reply is awaited.
    WaitProxy(proxy::ProxyWait),
    /// The client's host name is being looked up
    /// (`smtpd_peername_lookup`); the connection is logged, counted and
    /// greeted once it is known.
    WaitPeerName,
}

/// The command whose reply waits for cleanup's Opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Opening {
    /// `smtpd_delay_open_until_valid_rcpt = no`: opened at MAIL FROM.
    Mail,
    /// The first accepted recipient (the default).
    Rcpt,
    /// The file went away between RCPT and DATA (cleanup timed out or
    /// broke): DATA opens another.
    Data,
}

/// What a command handler did, for the per-command statistics.
enum Done {
    Ok,
    Failed,
    /// Decided later (DATA: when cleanup answers).
    Pending,
}

pub struct Session {
    cfg: Arc<Settings>,
    client: Client,
    namaddr: String,
    /// The verbosity `debug_peer_list` adds to this session (0: none),
    /// decided once the client's name is known.
    debug_level: u32,
    input: Vec<u8>,
    output: Vec<u8>,
    requests: Vec<CleanupRequest>,
    state: State,
    helo: Option<String>,
    esmtp: bool,
    tx: Option<Transaction>,
    /// The last command, for "... after RCPT from ..." log lines.
    where_: &'static str,
    /// Why the session ended abnormally ("timeout", "lost connection", ...).
    reason: Option<&'static str>,
    error_count: u32,
    junk: u32,
    /// Per verb in [`Verb::ALL`] order, then unknown commands.
    counts: [Count; Verb::ALL.len() + 1],
    /// Discarding the rest of an over-long command line.
    skip_long: bool,
    /// The session is over once the output is sent.
    hangup: bool,
    /// A cleanup connection is in use for the current message.
    cleanup_open: bool,
    /// Arrival date for the Received header, set at DATA.
    date: String,
    finished: bool,
    /// What TLS negotiated, once the handshake is done.
    tls: Option<Negotiated>,
    /// STARTTLS answered 220: the loop starts TLS once that is sent.
    starttls_pending: bool,
    /// The auth server's mechanisms, once known.
    mechs: Option<Vec<String>>,
    /// More input was waiting behind the command being handled.
    pipelined: bool,
    /// Where the input behind the command being handled starts (None
    /// when the command runs again after a wait).
    pending_at: Option<usize>,
    /// "improper command pipelining" was logged (once per session, as
    /// Postfix's SMTPD_FLAG_ILL_PIPELINING).
    ill_pipelining: bool,
    /// How long the loop must wait before sending the output.
    delay: std::time::Duration,
    /// `sleep SECONDS`: the pause asked for, and the sleeps done (see
    /// [`Session::await_sleep`]).
    sleep: crate::restrictions::Pause,
    /// Held by a `sleep`: the loop resumes the session after the hold.
    sleeping: bool,
    /// The address `reject_unverified_*` wants the verify service's
    /// answer for (see [`Session::await_verify`]).
    verify_wanted: std::cell::RefCell<Option<String>>,
    /// The command runs again with a verify answer: rate limits were
    /// counted the first time.
    verify_rerun: bool,
    /// How many PREPEND headers there were before the command: those its
    /// first run added are added again when it runs again.
    prepend_mark: usize,
    /// Policy servers' answers within the command being run (see
    /// [`crate::restrictions::Request::policy_memo`]).
    policy_memo: std::cell::RefCell<Vec<(String, String)>>,
    /// defer_if_permit / defer_if_reject raised by the connect, HELO and
    /// MAIL checks (`smtpd_delay_reject = no`).
    defers: crate::restrictions::Defers,
    /// defer_if_permit as the connect and HELO checks left it.
    defer_permit_client: Option<String>,
    defer_permit_helo: Option<String>,
    /// The client's TLS certificate (smtpd_tls_ask_ccert).
    client_cert: Option<postern_common::tls_ccert::ClientCert>,
    /// EHLO keywords not announced to this client (lower case).
    ehlo_discard: Vec<String>,
    /// DNS answers for the restrictions, kept for the session.
    dns: HashMap<Query, Answer>,
    dns_pending: HashSet<Query>,
    dns_requests: Vec<Query>,
    /// The command line being handled (to run it again after DNS).
    current_line: Vec<u8>,
    anvil: Rc<RefCell<Anvil>>,
    /// Counted in the anvil's sessions (to be released at the end).
    anvil_counted: bool,
    /// The client restrictions refused at connect (`smtpd_delay_reject =
    /// no`): every command but QUIT is answered 503.
    access_denied: bool,
    /// The session's milter list (`smtpd_milter_maps`, else
    /// `smtpd_milters`; None: no milters).
    milters: Option<std::sync::Arc<postern_common::milter::Settings>>,
    /// The milters' connections, made at connect.
    milter: Option<crate::milter::Link>,
    /// The milters refused the connection (or failed under
    /// `milter_default_action`): MAIL, RCPT and DATA get this reply.
    milter_denied: Option<String>,
    /// A milter said DISCARD during this transaction.
    milter_discard: bool,
    sasl_requests: Vec<SaslRequest>,
    /// The mechanism of the AUTH in progress, or of the successful one.
    sasl_method: Option<String>,
    sasl_username: Option<String>,
    /// What an authorized content filter forwarded with XFORWARD, for
    /// the next transaction.
    xforward: xforward::Forwarded,
    /// The last FILTER action of an access table in this transaction
    /// (overrides `content_filter`).
    access_filter: std::cell::RefCell<Option<String>>,
    /// Headers of PREPEND actions in this transaction (access tables,
    /// policy servers), added above the Received header.
    access_prepend: std::cell::RefCell<Vec<String>>,
    /// What the loop is to do with the before-queue filter connection.
    proxy_requests: Vec<crate::proxy::Request>,
    /// A filter connection is in use for this transaction.
    proxy_open: bool,
    /// The content being received goes to the filter.
    proxy_data: bool,
}
impl Session {
    /// A session with a table of its own (tests).
    #[cfg(test)]
    pub fn new(cfg: Arc<Settings>, client: Client) -> Session {
        Session::with_anvil(cfg, client, Rc::new(RefCell::new(Anvil::default())))
    }

    /// Starts a session counted in the process's client limits
    /// ([`Anvil`]): looks up the client's name (`smtpd_peername_lookup`),
    /// then logs the connection and queues the greeting (or the refusal,
    /// over a limit).
    pub fn with_anvil(cfg: Arc<Settings>, client: Client, anvil: Rc<RefCell<Anvil>>) -> Session {
        let namaddr = client.namaddr();
        let mut s = Session {
            cfg,
            client,
            namaddr,
            debug_level: 0,
            input: Vec::new(),
            output: Vec::new(),
            requests: Vec::new(),
            state: State::Command,
            helo: None,
            esmtp: false,
            tx: None,
            where_: "CONNECT",
            reason: None,
            error_count: 0,
            junk: 0,
            counts: Default::default(),
            skip_long: false,
            hangup: false,
            cleanup_open: false,
            date: String::new(),
            finished: false,
            tls: None,
            starttls_pending: false,
            ehlo_discard: Vec::new(),
            client_cert: None,
            verify_wanted: Default::default(),
            verify_rerun: false,
            prepend_mark: 0,
            policy_memo: Default::default(),
            defers: Default::default(),
            defer_permit_client: None,
            defer_permit_helo: None,
            sleep: Default::default(),
            sleeping: false,
            mechs: None,
            pipelined: false,
            pending_at: None,
            ill_pipelining: false,
            delay: std::time::Duration::ZERO,
            dns: HashMap::new(),
            dns_pending: HashSet::new(),
            dns_requests: Vec::new(),
            current_line: Vec::new(),
            anvil,
            anvil_counted: false,
            access_denied: false,
            milters: None,
            milter: None,
            milter_denied: None,
            milter_discard: false,
            sasl_requests: Vec::new(),
            sasl_method: None,
            sasl_username: None,
            xforward: Default::default(),
            access_filter: Default::default(),
            access_prepend: Default::default(),
            proxy_requests: Vec::new(),
            proxy_open: false,
            proxy_data: false,
        };
        s.milters = s.cfg.milters_for(s.client.addr);
        if s.cfg.peername_lookup {
            s.request_dns(vec![Query::Peer(s.client.addr)]);
            s.state = State::WaitPeerName;
        } else {
            s.connected();
        }
        s
    }

    pub fn namaddr(&self) -> &str {
        &self.namaddr
    }

    /// The verbosity `debug_peer_list` adds while this session's work is
    /// done ([`postern_common::log::raise_verbosity`]).
    pub fn debug_level(&self) -> u32 {
        self.debug_level
    }

    /// Bytes from the client.
    pub fn receive(&mut self, bytes: &[u8]) {
        if self.hangup || self.starttls_pending {
            // Nothing in plaintext counts between STARTTLS and TLS.
            return;
        }
        self.input.extend_from_slice(bytes);
        self.process();
    }

    /// Whether the session takes client input now (not while it waits for
    /// cleanup, not after it decided to hang up).
    pub fn wants_input(&self) -> bool {
        !self.hangup
            && !self.starttls_pending
            && (self.sleeping
                || matches!(
                    self.state,
                    State::Command | State::Data(_) | State::AuthResponse
                ))
    }

    /// The session is over: close once the output is sent.
    pub fn is_done(&self) -> bool {
        self.hangup
    }

    pub fn take_output(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.output)
    }

    /// The tarpit delay owed before the output goes out (taken once).
    pub fn take_delay(&mut self) -> std::time::Duration {
        std::mem::take(&mut self.delay)
    }

    pub fn has_output(&self) -> bool {
        !self.output.is_empty()
    }

    pub fn take_requests(&mut self) -> Vec<CleanupRequest> {
        std::mem::take(&mut self.requests)
    }

    /// The client closed the connection (or it broke).
    pub fn client_eof(&mut self) {
        if !self.hangup {
            self.reason = Some("lost connection");
            self.hangup = true;
        }
        self.abort_cleanup();
        self.proxy_close();
        if matches!(self.state, State::WaitAuth | State::AuthResponse) {
            self.sasl_requests.push(SaslRequest::Abort);
        }
    }

    /// The client was silent for longer than smtpd_timeout.
    pub fn timeout(&mut self) {
        if self.hangup {
            return;
        }
        self.reason = Some("timeout");
        let host = self.cfg.myhostname.clone();
        self.reply(&format!("421 4.4.2 {host} Error: timeout exceeded"));
        self.abort_cleanup();
    }

    /// Logs the end of the session. Call once, when the connection closes.
    pub fn finish(&mut self) {
        if self.finished {
            return;
        }
        self.finished = true;
        if std::mem::take(&mut self.anvil_counted) {
            self.anvil.borrow_mut().disconnect(self.client.addr);
        }
        self.abort_cleanup();
        self.proxy_close();
        if let Some(reason) = self.reason {
            // A client that leaves right after the final dot is normal.
            if !(self.where_ == "END-OF-MESSAGE" && reason == "lost connection") {
                info!("{reason} after {} from {}", self.where_, self.namaddr);
            }
        }
        info!("disconnect from {}{}", self.namaddr, self.stats());
    }

    /// Takes from the input what the state allows: command lines, DATA
    /// content, AUTH responses; nothing while waiting on cleanup, DNS or the
    /// auth server. Each step says where the input it used up ends, and
    /// whether to go on.
    fn process(&mut self) {
        let mut pos = 0;
        while !self.hangup {
            let step = match &self.state {
                State::Command => self.command_line(pos),
                State::Data(_) => self.feed_content(pos),
                State::AuthResponse => self.auth_line(pos),
                State::WaitOpened(_)
                | State::WaitQueued
                | State::WaitMechs
                | State::WaitAuth
                | State::WaitDns(_)
                | State::WaitDnsConnect
                | State::WaitProxy(_)
                | State::WaitPeerName => ControlFlow::Break(pos),
            };
            match step {
                ControlFlow::Continue(p) => pos = p,
                ControlFlow::Break(p) => {
                    pos = p;
                    break;
                }
            }
        }
        self.input.drain(..pos.min(self.input.len()));
        if self.hangup || self.starttls_pending {
            // After STARTTLS, plaintext the client sent along must not be
            // taken as if it came over TLS (CVE-2011-0411).
            self.input.clear();
        }
        if let State::Data(ds) = &mut self.state {
            // Nothing of the message yet: the Received header alone waits
            // to go with the first content, one request to cleanup less.
            if ds.size > 0 && !ds.content.is_empty() && (self.cleanup_open || self.proxy_data) {
                let chunk = std::mem::take(&mut ds.content);
                self.push_content(chunk);
            }
        }
    }

    /// Takes one command line from the input at `pos` and runs it; breaks
    /// when there is no whole line, or when STARTTLS stops the input.
    fn command_line(&mut self, mut pos: usize) -> ControlFlow<usize, usize> {
        let rest = &self.input[pos..];
        let Some(i) = rest.iter().position(|&b| b == b'\n') else {
            if rest.len() > self.cfg.line_limit + 1 {
                if !self.skip_long {
                    warning!(
                        "{}: request longer than {}: {}...",
                        self.namaddr,
                        self.cfg.line_limit,
                        protocol::printable(rest, 30)
                    );
                }
                self.skip_long = true;
                pos = self.input.len();
            }
            return ControlFlow::Break(pos);
        };
        let mut line = rest[..i].to_vec();
        pos += i + 1;
        if line.last() == Some(&b'\r') {
            line.pop();
        }
        if postern_common::log::verbose() {
            postern_common::debug!("< {}: {}", self.namaddr, String::from_utf8_lossy(&line));
        }
        if std::mem::take(&mut self.skip_long) || line.len() > self.cfg.line_limit {
            let host = self.cfg.myhostname.clone();
            self.reply(&format!("500 5.5.2 {host} Error: command too long"));
            self.error_count += 1;
        } else {
            self.pipelined = pos < self.input.len();
            self.pending_at = Some(pos);
            if let command_filter::Filtered::Line(line) = self.filter_command(line) {
                self.command(&line);
            }
            self.pending_at = None;
        }
        self.check_error_limit();
        if self.starttls_pending {
            return ControlFlow::Break(pos);
        }
        ControlFlow::Continue(pos)
    }

    fn check_error_limit(&mut self) {
        if !self.hangup && self.error_count >= self.cfg.hard_error_limit {
            self.reason = Some("too many errors");
            let host = self.cfg.myhostname.clone();
            self.reply(&format!("421 4.7.0 {host} Error: too many errors"));
        }
    }

    fn command(&mut self, line: &[u8]) {
        self.current_line = line.to_vec();
        if !self.verify_rerun {
            self.prepend_mark = self.access_prepend.borrow().len();
        }
        if line.contains(&0) {
            self.unknown_command("500 5.5.2 Error: bad syntax");
            return;
        }
        let Ok(text) = std::str::from_utf8(line) else {
            self.unknown_command("500 5.5.2 Error: bad UTF-8 syntax");
            return;
        };
        let args = protocol::tokenize(text);
        let Some(first) = args.first() else {
            self.unknown_command("500 5.5.2 Error: bad syntax");
            return;
        };
        if first.text.eq_ignore_ascii_case("XFORWARD") {
            // Not in Verb: a server-side extension of smtpd alone
            // (sendmail -bs does not offer it).
            self.where_ = "XFORWARD";
            if let Done::Failed = self.xforward(&args) {
                self.error_count += 1;
            }
            return;
        }
        let Some(verb) = Verb::parse(&first.text) else {
            if protocol::is_header(&first.text) {
                self.where_ = "UNKNOWN";
                self.counts[Verb::ALL.len()].total += 1;
                warning!(
                    "non-SMTP command from {}: {}",
                    self.namaddr,
                    protocol::printable(line, 100)
                );
                self.reply("221 2.7.0 Error: I can break rules, too. Goodbye.");
                self.hangup = true;
                return;
            }
            if let Some(reply) = self.milter_unknown(line) {
                match reply {
                    Some(r) => self.unknown_command(&r),
                    None => self.unknown_command("500 5.5.2 Error: command not recognized"),
                }
            }
            return;
        };
        self.where_ = verb.name();
        if self.pipelined_too_early(verb) {
            return;
        }
        self.counts[verb_index(verb)].total += 1;
        let done = if !verb.implemented() {
            self.fail("502 5.5.1 Error: command not implemented")
        } else if self.access_denied && verb != Verb::Quit {
            let n = self.namaddr.clone();
            self.fail(&format!("503 5.7.0 Error: access denied for {n}"))
        } else if self.cfg.tls_level == TlsLevel::Encrypt
            && self.tls.is_none()
            && !matches!(
                verb,
                Verb::Helo | Verb::Ehlo | Verb::StartTls | Verb::Rset | Verb::Noop | Verb::Quit
            )
        {
            self.fail("530 5.7.0 Must issue a STARTTLS command first")
        } else {
            match verb {
                Verb::Helo | Verb::Ehlo => self.helo(verb == Verb::Ehlo, &args),
                Verb::Mail => self.mail(&args),
                Verb::Rcpt => self.rcpt(&args),
                Verb::Data => self.data(&args),
                Verb::Rset => self.rset(&args),
                Verb::Noop => {
                    self.reply("250 2.0.0 Ok");
                    Done::Ok
                }
                Verb::Vrfy => self.vrfy(&args),
                Verb::Etrn => self.etrn(&args),
                Verb::Quit => {
                    self.reply("221 2.0.0 Bye");
                    self.hangup = true;
                    Done::Ok
                }
                Verb::Help => {
                    self.reply(
                        "214 2.0.0 Commands: DATA EHLO HELO HELP MAIL NOOP QUIT RCPT RSET VRFY",
                    );
                    Done::Ok
                }
                Verb::StartTls => self.starttls(&args),
                Verb::Auth => self.auth(&args),
                Verb::Bdat => unreachable!(),
            }
        };
        match done {
            Done::Ok => self.count_ok(verb),
            Done::Failed => self.error_count += 1,
            Done::Pending => {}
        }
        if !matches!(self.state, State::WaitDns(_)) {
            self.command_done();
        }
        if verb.is_junk() {
            if self.junk > JUNK_COMMAND_LIMIT {
                self.error_count += 1;
            }
            self.junk += 1;
        }
    }

    fn unknown_command(&mut self, reply: &str) {
        self.where_ = "UNKNOWN";
        self.counts[Verb::ALL.len()].total += 1;
        self.reply(reply);
        self.error_count += 1;
    }

    fn reply(&mut self, text: &str) {
        // Slow down a client that makes many errors (Postfix sleeps
        // before any reply once the soft limit is reached).
        if self.error_count >= self.cfg.soft_error_limit && self.error_count > 0 {
            self.delay += self.cfg.error_sleep;
        }
        if postern_common::log::verbose() {
            for l in text.split("\r\n") {
                postern_common::debug!("> {}: {l}", self.namaddr);
            }
        }
        self.output.extend_from_slice(text.as_bytes());
        self.output.extend_from_slice(b"\r\n");
        if text.starts_with("421") {
            self.hangup = true;
        }
    }

    /// Answers a command that failed with `reply`: the dispatcher
    /// ([`Session::command`]) counts the error.
    fn fail(&mut self, reply: &str) -> Done {
        self.reply(reply);
        Done::Failed
    }

    /// Answers `reply` to a line outside the dispatcher of commands (the
    /// AUTH exchange, the auth server's verdict) and counts the error.
    fn error_reply(&mut self, reply: &str) {
        self.reply(reply);
        self.error_count += 1;
        self.check_error_limit();
    }

    /// `SMTP`, `ESMTP`, with `S` for TLS and `A` for SASL (RFC 3848).
    fn protocol(&self) -> String {
        let mut p = if self.esmtp { "ESMTP" } else { "SMTP" }.to_string();
        if self.tls.is_some() {
            p.push('S');
        }
        if self.sasl_username.is_some() {
            p.push('A');
        }
        p
    }

    fn count_ok(&mut self, verb: Verb) {
        self.counts[verb_index(verb)].ok += 1;
    }

    /// ` ehlo=1 mail=1 rcpt=1/2 data=1 quit=1 commands=5/6`
    fn stats(&self) -> String {
        let mut s = String::new();
        let (mut ok, mut total) = (0, 0);
        let names = Verb::ALL.iter().map(|v| v.name()).chain(["unknown"]);
        for (name, c) in names.zip(self.counts.iter()) {
            if c.total == 0 {
                continue;
            }
            s.push_str(&format!(" {}={}", name.to_ascii_lowercase(), c.ok));
            if c.ok != c.total {
                s.push_str(&format!("/{}", c.total));
            }
            ok += c.ok;
            total += c.total;
        }
        s.push_str(&format!(" commands={ok}"));
        if ok != total || total == 0 {
            s.push_str(&format!("/{total}"));
        }
        s
    }
}

pub(super) fn verb_index(v: Verb) -> usize {
    Verb::ALL
        .iter()
        .position(|x| *x == v)
        .unwrap_or(Verb::ALL.len())
}
