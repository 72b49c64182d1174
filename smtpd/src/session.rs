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

use crate::anvil::{Anvil, Event};
use crate::data::Decoder;
use crate::dns::{Answer, NameStatus, PeerName, Query};
use crate::received::Received;
use crate::restrictions::{Request, Stage};
use crate::sasl::{SaslReply, SaslRequest};
use crate::settings::{Settings, TlsLevel};
use postern_common::ipc::{CleanupReply, CleanupRequest, NewMessage};
use postern_common::qfile::{attr, Recipient};
use postern_common::smtp_command::{self as protocol, Offered, Token, Verb};
use postern_common::smtputf8;
use postern_common::tls::Negotiated;
use postern_common::{info, warning};
use std::cell::RefCell;
use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::rc::Rc;
use std::sync::Arc;

/// Content goes to cleanup in pieces of about this size.
const CONTENT_CHUNK: usize = 64 * 1024;
/// Postfix's smtpd_junk_command_limit default: HELO, NOOP, RSET, VRFY ...
/// beyond this many count as errors.
const JUNK_COMMAND_LIMIT: u32 = 100;
/// Postfix's smtpd_recipient_overshoot_limit default: RCPTs refused with
/// 452 for being over smtpd_recipient_limit before they count as errors.
const RECIPIENT_OVERSHOOT_LIMIT: u32 = 1000;

const WRITE_ERROR: &str = "451 4.3.0 Error: queue file write error";

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
    /// How long the loop must wait before sending the output.
    delay: std::time::Duration,
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
    sasl_requests: Vec<SaslRequest>,
    /// The mechanism of the AUTH in progress, or of the successful one.
    sasl_method: Option<String>,
    sasl_username: Option<String>,
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
            mechs: None,
            pipelined: false,
            delay: std::time::Duration::ZERO,
            dns: HashMap::new(),
            dns_pending: HashSet::new(),
            dns_requests: Vec::new(),
            current_line: Vec::new(),
            anvil,
            anvil_counted: false,
            access_denied: false,
            sasl_requests: Vec::new(),
            sasl_method: None,
            sasl_username: None,
        };
        if s.cfg.peername_lookup {
            s.request_dns(vec![Query::Peer(s.client.addr)]);
            s.state = State::WaitPeerName;
        } else {
            s.connected();
        }
        s
    }

    /// The client's name is known: logs the connection, counts it, and
    /// greets (with `smtpd_tls_wrappermode`, once the handshake is done).
    fn connected(&mut self) {
        self.namaddr = self.client.namaddr();
        info!("connect from {}", self.namaddr);
        let ip = self.client.addr;
        let limited = self.anvil.borrow_mut().connect(ip);
        match limited {
            Ok(()) => self.anvil_counted = true,
            Err((what, n)) => {
                warning!(
                    "{what} exceeded: {n} from {} for service {}",
                    self.namaddr,
                    self.cfg.service
                );
                let host = self.cfg.myhostname.clone();
                self.reply(&format!(
                    "421 4.7.0 {host} Error: too many connections from {ip}"
                ));
                return;
            }
        }
        // With smtpd_tls_wrappermode the greeting waits for the handshake.
        if !self.cfg.tls_wrappermode || self.tls.is_some() {
            self.greet();
        }
    }

    fn greet(&mut self) {
        // smtpd_delay_reject = no: the client list decides now, with the
        // DNS answers it needs (the greeting waits for them).
        let needed = {
            let req = self.request(None, "CONNECT");
            self.cfg.restrictions.dns_needed(Stage::Client, &req)
        };
        if self.request_dns(needed) {
            self.state = State::WaitDnsConnect;
            return;
        }
        let refused = {
            let req = self.request(None, "CONNECT");
            self.cfg.restrictions.check_connect(&req)
        };
        if let Some(reply) = refused {
            self.log_reject(&reply, None, None);
            self.reply(&reply);
            self.access_denied = true;
            self.error_count += 1;
            return;
        }
        let banner = self.cfg.banner.clone();
        self.reply(&format!("220 {banner}"));
    }

    /// Whether the client's STARTTLS was accepted: once the `220` is
    /// sent, the loop starts TLS and calls [`Session::tls_started`].
    pub fn starttls_requested(&self) -> bool {
        self.starttls_pending
    }

    /// The loop switched the connection to TLS (handshake under way).
    pub fn tls_started(&mut self) {
        self.starttls_pending = false;
    }

    /// The TLS handshake is complete. As RFC 3207 demands, the session
    /// forgets everything it learned before (HELO, transaction, SASL).
    pub fn tls_established(&mut self, n: Negotiated) {
        let mut line = format!(
            "Anonymous TLS connection established from {}: {}",
            self.namaddr,
            n.summary()
        );
        if let Some(kx) = &n.kx {
            line.push_str(&format!(" key-exchange {kx}"));
        }
        info!("{line}");
        self.tls = Some(n);
        self.helo = None;
        self.esmtp = false;
        self.end_transaction();
        self.sasl_username = None;
        self.sasl_method = None;
        self.input.clear();
        if self.cfg.tls_wrappermode && !matches!(self.state, State::WaitPeerName) {
            self.greet();
        }
    }

    /// The TLS layer failed (handshake or record error): the session ends.
    pub fn tls_failed(&mut self) {
        if !self.hangup {
            self.reason = Some("lost connection");
            self.hangup = true;
        }
        self.abort_cleanup();
    }

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

    /// Requests for the auth server.
    pub fn take_sasl_requests(&mut self) -> Vec<SaslRequest> {
        std::mem::take(&mut self.sasl_requests)
    }

    /// The auth server's mechanisms (None: it cannot be reached).
    pub fn sasl_mechs(&mut self, mechs: Option<Vec<String>>) {
        self.mechs = Some(mechs.unwrap_or_default());
        if matches!(self.state, State::WaitMechs) {
            self.state = State::Command;
            self.ehlo_reply();
            self.process();
        }
    }

    /// The auth server's answer to the AUTH in progress.
    pub fn sasl_reply(&mut self, reply: SaslReply) {
        if !matches!(self.state, State::WaitAuth) {
            return;
        }
        self.state = State::Command;
        let mech = self.sasl_method.clone().unwrap_or_default();
        match reply {
            SaslReply::Cont(data) => {
                self.reply(&format!("334 {data}"));
                self.state = State::AuthResponse;
            }
            SaslReply::Ok(user) => {
                self.sasl_username = Some(user);
                self.reply("235 2.7.0 Authentication successful");
                self.count_ok(Verb::Auth);
            }
            SaslReply::Fail(why) => {
                warning!("{}: SASL {mech} authentication failed: {why}", self.namaddr);
                self.sasl_method = None;
                self.reply(&format!("535 5.7.8 Error: authentication failed: {why}"));
                self.error_count += 1;
                self.check_error_limit();
            }
            SaslReply::Temp(why) => {
                warning!("{}: SASL {mech} authentication failed: {why}", self.namaddr);
                self.sasl_method = None;
                self.reply(&format!(
                    "454 4.7.0 Temporary authentication failure: {why}"
                ));
                self.error_count += 1;
                self.check_error_limit();
            }
        }
        self.process();
    }

    pub fn namaddr(&self) -> &str {
        &self.namaddr
    }

    // ------------------------------------------------------------ the loop's side

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
            && matches!(
                self.state,
                State::Command | State::Data(_) | State::AuthResponse
            )
    }

    /// Whether the session waits for cleanup (the client's timeout does
    /// not run meanwhile; cleanup's does).
    pub fn waiting_on_cleanup(&self) -> bool {
        matches!(self.state, State::WaitOpened(_) | State::WaitQueued)
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

    /// An answer from cleanup.
    pub fn cleanup_reply(&mut self, reply: CleanupReply) {
        let state = std::mem::replace(&mut self.state, State::Command);
        match (state, reply) {
            (State::WaitOpened(opening), CleanupReply::Opened { queue_id }) => {
                match (&self.sasl_method, &self.sasl_username) {
                    (Some(m), Some(u)) => info!(
                        "{queue_id}: client={}, sasl_method={m}, sasl_username={u}",
                        self.namaddr
                    ),
                    _ => info!("{queue_id}: client={}", self.namaddr),
                }
                if let Some(tx) = &mut self.tx {
                    tx.queue_id = Some(queue_id);
                }
                match opening {
                    Opening::Mail => {
                        self.reply("250 2.1.0 Ok");
                        self.count_ok(Verb::Mail);
                    }
                    Opening::Rcpt => {
                        self.reply("250 2.1.5 Ok");
                        self.count_ok(Verb::Rcpt);
                    }
                    Opening::Data => self.start_data(),
                }
            }
            (
                State::Data(mut ds),
                CleanupReply::Failed {
                    temporary,
                    dsn,
                    reason,
                },
            ) => {
                // cleanup gave up early: read to the end, then say why.
                self.cleanup_open = false;
                ds.failure = Some(failure_reply(temporary, &dsn, &reason));
                ds.content.clear();
                self.state = State::Data(ds);
            }
            (State::WaitQueued, CleanupReply::Queued { queue_id }) => {
                self.cleanup_open = false;
                self.reply(&format!("250 2.0.0 Ok: queued as {queue_id}"));
                self.count_ok(Verb::Data);
                // A message made it: forgive earlier errors, as Postfix.
                self.error_count = 0;
                self.junk = 0;
                self.tx = None;
            }
            (
                state @ (State::WaitOpened(_) | State::WaitQueued),
                CleanupReply::Failed {
                    temporary,
                    dsn,
                    reason,
                },
            ) => {
                let reply = failure_reply(temporary, &dsn, &reason);
                self.waited_in_vain(&state, &reply);
            }
            (state, other) => {
                warning!("{}: unexpected reply from cleanup: {other:?}", self.namaddr);
                self.state = state;
                if self.cleanup_open {
                    self.cleanup_lost();
                } else {
                    // A connection the session no longer uses: close it,
                    // and cleanup gives its file up.
                    self.requests.push(CleanupRequest::Abort);
                }
                return;
            }
        }
        self.process();
    }

    /// Whether the session has given up the cleanup connection the loop
    /// still holds (its next request is Abort): then the loss of that
    /// connection is no news to it, and must not fail the file it asks
    /// for next.
    pub fn gave_up_cleanup(&self) -> bool {
        matches!(self.requests.first(), Some(CleanupRequest::Abort))
    }

    /// The cleanup connection could not be made, broke, or timed out.
    pub fn cleanup_lost(&mut self) {
        if !self.cleanup_open {
            return;
        }
        self.cleanup_open = false;
        match &mut self.state {
            State::WaitOpened(_) | State::WaitQueued => {
                let state = std::mem::replace(&mut self.state, State::Command);
                self.waited_in_vain(&state, WRITE_ERROR);
                self.process();
            }
            State::Data(ds) => {
                ds.content.clear();
                ds.failure.get_or_insert_with(|| WRITE_ERROR.to_string());
            }
            _ => {
                // Opened at RCPT, lost before DATA (cleanup's own time
                // limit, a crash): DATA opens another file.
                if let Some(tx) = &mut self.tx {
                    tx.queue_id = None;
                }
            }
        }
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
        if let Some(reason) = self.reason {
            // A client that leaves right after the final dot is normal.
            if !(self.where_ == "END-OF-MESSAGE" && reason == "lost connection") {
                info!("{reason} after {} from {}", self.where_, self.namaddr);
            }
        }
        info!("disconnect from {}{}", self.namaddr, self.stats());
    }

    // ------------------------------------------------------------ input

    fn process(&mut self) {
        let mut pos = 0;
        while !self.hangup {
            match &mut self.state {
                State::Command => {
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
                        break;
                    };
                    let mut line = rest[..i].to_vec();
                    pos += i + 1;
                    if line.last() == Some(&b'\r') {
                        line.pop();
                    }
                    if std::mem::take(&mut self.skip_long) || line.len() > self.cfg.line_limit {
                        let host = self.cfg.myhostname.clone();
                        self.reply(&format!("500 5.5.2 {host} Error: command too long"));
                        self.error_count += 1;
                    } else {
                        self.pipelined = pos < self.input.len();
                        self.command(&line);
                    }
                    self.check_error_limit();
                    if self.starttls_pending {
                        break;
                    }
                }
                State::Data(ds) => {
                    let fed = ds.decoder.feed(&self.input[pos..], &mut ds.content);
                    pos += fed.consumed;
                    ds.size += fed.size;
                    let limit = self.cfg.message_size_limit;
                    if limit > 0 && ds.size > limit && !ds.too_big {
                        ds.too_big = true;
                        let qid = self
                            .tx
                            .as_ref()
                            .and_then(|t| t.queue_id.clone())
                            .unwrap_or_else(|| "NOQUEUE".into());
                        warning!("{qid}: queue file size limit exceeded");
                    }
                    if ds.too_big || ds.failure.is_some() {
                        ds.content.clear();
                        if ds.too_big {
                            self.abort_cleanup();
                        }
                    } else if ds.content.len() >= CONTENT_CHUNK {
                        let chunk = std::mem::take(&mut ds.content);
                        self.requests.push(CleanupRequest::Content(chunk));
                    }
                    if !fed.end {
                        break;
                    }
                    self.end_of_data();
                    self.check_error_limit();
                }
                State::AuthResponse => {
                    let rest = &self.input[pos..];
                    let Some(i) = rest.iter().position(|&b| b == b'\n') else {
                        if rest.len() > 12 * 1024 {
                            pos = self.input.len();
                            self.state = State::Command;
                            self.sasl_requests.push(SaslRequest::Abort);
                            self.reply("500 5.5.6 Authentication exchange line is too long");
                            self.error_count += 1;
                            self.check_error_limit();
                        }
                        break;
                    };
                    let mut line = rest[..i].to_vec();
                    pos += i + 1;
                    if line.last() == Some(&b'\r') {
                        line.pop();
                    }
                    self.auth_response(&line);
                }
                State::WaitOpened(_)
                | State::WaitQueued
                | State::WaitMechs
                | State::WaitAuth
                | State::WaitDns(_)
                | State::WaitDnsConnect
                | State::WaitPeerName => break,
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
            if ds.size > 0 && !ds.content.is_empty() && self.cleanup_open {
                let chunk = std::mem::take(&mut ds.content);
                self.requests.push(CleanupRequest::Content(chunk));
            }
        }
    }

    fn end_of_data(&mut self) {
        let State::Data(mut ds) = std::mem::replace(&mut self.state, State::Command) else {
            return;
        };
        self.where_ = "END-OF-MESSAGE";
        let failure = if ds.too_big {
            Some("552 5.3.4 Error: message file too big".to_string())
        } else if ds.failure.is_some() {
            ds.failure.take()
        } else if !self.cleanup_open {
            Some(WRITE_ERROR.to_string())
        } else {
            None
        };
        match failure {
            Some(reply) => {
                self.abort_cleanup();
                self.reply(&reply);
                self.transaction_failed();
            }
            None => {
                if !ds.content.is_empty() {
                    self.requests
                        .push(CleanupRequest::Content(std::mem::take(&mut ds.content)));
                }
                self.requests.push(CleanupRequest::Close);
                self.state = State::WaitQueued;
            }
        }
    }

    fn check_error_limit(&mut self) {
        if !self.hangup && self.error_count >= self.cfg.hard_error_limit {
            self.reason = Some("too many errors");
            let host = self.cfg.myhostname.clone();
            self.reply(&format!("421 4.7.0 {host} Error: too many errors"));
        }
    }

    // ------------------------------------------------------------ commands

    fn command(&mut self, line: &[u8]) {
        self.current_line = line.to_vec();
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
            self.unknown_command("500 5.5.2 Error: command not recognized");
            return;
        };
        self.where_ = verb.name();
        self.counts[verb_index(verb)].total += 1;
        let done = if !verb.implemented() {
            self.reply("502 5.5.1 Error: command not implemented");
            Done::Failed
        } else if self.access_denied && verb != Verb::Quit {
            let n = self.namaddr.clone();
            self.reply(&format!("503 5.7.0 Error: access denied for {n}"));
            Done::Failed
        } else if self.cfg.tls_level == TlsLevel::Encrypt
            && self.tls.is_none()
            && !matches!(
                verb,
                Verb::Helo | Verb::Ehlo | Verb::StartTls | Verb::Rset | Verb::Noop | Verb::Quit
            )
        {
            self.reply("530 5.7.0 Must issue a STARTTLS command first");
            Done::Failed
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
                Verb::Bdat | Verb::Etrn => unreachable!(),
            }
        };
        match done {
            Done::Ok => self.count_ok(verb),
            Done::Failed => self.error_count += 1,
            Done::Pending => {}
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

    fn helo(&mut self, ehlo: bool, args: &[Token]) -> Done {
        if args.len() < 2 {
            self.reply(if ehlo {
                "501 Syntax: EHLO hostname"
            } else {
                "501 Syntax: HELO hostname"
            });
            return Done::Failed;
        }
        let name: Vec<&str> = args[1..].iter().map(|t| t.text.as_str()).collect();
        let name = protocol::neuter(&name.join(" "));
        let needed = {
            let mut req = self.request(None, self.where_);
            req.helo = Some(&name);
            self.cfg.restrictions.dns_needed(Stage::Helo, &req)
        };
        let verb = if ehlo { Verb::Ehlo } else { Verb::Helo };
        if self.await_dns(needed, verb) {
            return Done::Pending;
        }
        let refused = {
            let mut req = self.request(None, self.where_);
            req.helo = Some(&name);
            self.cfg.restrictions.check_helo(&req)
        };
        if let Some(reply) = refused {
            self.log_reject(&reply, None, None);
            self.reply(&reply);
            return Done::Failed;
        }
        self.helo = Some(name);
        self.end_transaction();
        if ehlo {
            self.esmtp = true;
            if self.auth_offered() && self.mechs.is_none() {
                // The reply waits for the auth server's mechanism list.
                self.sasl_requests.push(SaslRequest::Mechs);
                self.state = State::WaitMechs;
                return Done::Ok;
            }
            self.ehlo_reply();
        } else {
            let host = self.cfg.myhostname.clone();
            self.reply(&format!("250 {host}"));
        }
        Done::Ok
    }

    /// Whether AUTH is on offer now (SASL enabled, and TLS active when
    /// smtpd_tls_auth_only says so).
    fn auth_offered(&self) -> bool {
        self.cfg.sasl.is_some() && (self.tls.is_some() || !self.cfg.tls_auth_only)
    }

    fn starttls_offered(&self) -> bool {
        self.cfg.tls_level != TlsLevel::None && self.tls.is_none() && !self.cfg.tls_wrappermode
    }

    fn ehlo_reply(&mut self) {
        let mut lines = vec![self.cfg.myhostname.clone(), "PIPELINING".to_string()];
        lines.push(match self.cfg.message_size_limit {
            0 => "SIZE".to_string(),
            n => format!("SIZE {n}"),
        });
        if !self.cfg.disable_vrfy {
            lines.push("VRFY".into());
        }
        if self.starttls_offered() && self.cfg.tls.is_some() {
            lines.push("STARTTLS".into());
        }
        if self.auth_offered() {
            let mechs = self.mechs.clone().unwrap_or_default();
            if !mechs.is_empty() {
                let list = mechs.join(" ");
                lines.push(format!("AUTH {list}"));
                if self.cfg.broken_sasl_auth_clients {
                    lines.push(format!("AUTH={list}"));
                }
            }
        }
        lines.push("ENHANCEDSTATUSCODES".into());
        lines.push("8BITMIME".into());
        lines.push("DSN".into());
        if self.cfg.smtputf8_enable {
            lines.push("SMTPUTF8".into());
        }
        let last = lines.len() - 1;
        for (i, l) in lines.iter().enumerate() {
            let sep = if i == last { ' ' } else { '-' };
            self.reply(&format!("250{sep}{l}"));
        }
    }

    fn starttls(&mut self, args: &[Token]) -> Done {
        if args.len() != 1 {
            self.reply("501 5.5.4 Syntax: STARTTLS");
            return Done::Failed;
        }
        if self.tls.is_some() {
            self.reply("554 5.5.1 Error: TLS already active");
            return Done::Failed;
        }
        if !self.starttls_offered() {
            self.reply("502 5.5.1 Error: command not implemented");
            return Done::Failed;
        }
        if self.cfg.tls.is_none() {
            self.reply("454 4.7.0 TLS not available due to local problem");
            return Done::Failed;
        }
        self.reply("220 2.0.0 Ready to start TLS");
        self.starttls_pending = true;
        Done::Ok
    }

    fn auth(&mut self, args: &[Token]) -> Done {
        // smtpd_client_auth_rate_limit comes first, as in Postfix.
        if self.over_rate_limit(Event::Auth, "AUTH command", "too many AUTH commands") {
            return Done::Failed;
        }
        if !self.auth_offered() {
            self.reply("503 5.5.1 Error: authentication not enabled");
            return Done::Failed;
        }
        if self.helo.is_none() || !self.esmtp {
            self.reply("503 5.5.1 Error: send HELO/EHLO first");
            return Done::Failed;
        }
        if self.sasl_username.is_some() {
            self.reply("503 5.5.1 Error: already authenticated");
            return Done::Failed;
        }
        if self.tx.is_some() {
            self.reply("503 5.5.1 Error: MAIL transaction in progress");
            return Done::Failed;
        }
        if args.len() < 2 || args.len() > 3 {
            self.reply("501 5.5.4 Syntax: AUTH mechanism");
            return Done::Failed;
        }
        let mech = args[1].text.to_ascii_uppercase();
        let known = self.mechs.as_ref().is_some_and(|m| m.contains(&mech));
        if !known {
            let why = "Invalid authentication mechanism";
            warning!("{}: SASL {mech} authentication failed: {why}", self.namaddr);
            self.reply(&format!("535 5.7.8 Error: authentication failed: {why}"));
            return Done::Failed;
        }
        let resp = match args.get(2).map(|t| t.text.as_str()) {
            None => None,
            // RFC 4954: "=" is an empty initial response.
            Some("=") => Some(String::new()),
            Some(r) => {
                if postern_common::base64::decode(r).is_none() {
                    self.reply("501 5.5.2 Error: invalid base64 in initial response");
                    return Done::Failed;
                }
                Some(r.to_string())
            }
        };
        self.sasl_method = Some(mech.clone());
        self.sasl_requests.push(SaslRequest::Start {
            mech,
            resp,
            secured: self.tls.is_some(),
            rip: self.client.addr,
            rport: self.client.port,
            local: self.client.local,
        });
        self.state = State::WaitAuth;
        // Counted when the auth server answers.
        Done::Pending
    }

    /// The client's line after a 334 challenge.
    fn auth_response(&mut self, line: &[u8]) {
        self.state = State::Command;
        let text = String::from_utf8_lossy(line).trim().to_string();
        if text == "*" {
            self.sasl_requests.push(SaslRequest::Abort);
            self.sasl_method = None;
            self.reply("501 5.7.0 Authentication aborted");
            self.error_count += 1;
            self.check_error_limit();
            return;
        }
        if postern_common::base64::decode(&text).is_none() {
            self.sasl_requests.push(SaslRequest::Abort);
            let mech = self.sasl_method.take().unwrap_or_default();
            let why = "Invalid base64 data in continued response";
            warning!("{}: SASL {mech} authentication failed: {why}", self.namaddr);
            self.reply(&format!("535 5.7.8 Error: authentication failed: {why}"));
            self.error_count += 1;
            self.check_error_limit();
            return;
        }
        self.sasl_requests.push(SaslRequest::Continue(text));
        self.state = State::WaitAuth;
    }

    /// Whether the queue file system can take a message of `size` bytes
    /// (the MAIL FROM SIZE, 0 if not given), as Postfix checks it: at least
    /// `queue_minfree` free, and 1.5 times the announced size; and never a
    /// file system that is full.
    fn enough_storage(&self, size: u64) -> bool {
        match postern_common::queue::free_space(&self.cfg.queue_directory) {
            Ok(free) => {
                free >= self.cfg.queue_minfree
                    && free >= size.saturating_mul(3) / 2
                    && free >= MIN_FREE
            }
            Err(_) => true, // cannot tell: cleanup will say if it fails
        }
    }

    /// Counts one `event` against this client's rate limit; over it, logs
    /// Postfix's warning (`WHAT rate limit exceeded: ...`), answers
    /// `450 4.7.1 Error: TEXT from IP` as Postfix, and returns true.
    fn over_rate_limit(&mut self, event: Event, what: &str, text: &str) -> bool {
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

    fn mail(&mut self, args: &[Token]) -> Done {
        if self.cfg.helo_required && self.helo.is_none() {
            self.reply("503 5.5.1 Error: send HELO/EHLO first");
            return Done::Failed;
        }
        if self.tx.is_some() {
            self.reply("503 5.5.1 Error: nested MAIL command");
            return Done::Failed;
        }
        let Some((path, params)) = protocol::path_command(args, "from:") else {
            self.reply("501 5.5.4 Syntax: MAIL FROM:<address>");
            return Done::Failed;
        };
        // SMTPUTF8 decides the sender's syntax: taken before it.
        let smtputf8 = self.smtputf8_requested(&args[3..]);
        let sender = match self.address(path) {
            Some(a) if self.utf8_syntax_ok(path, &a, smtputf8) => a,
            _ => {
                self.reply("501 5.1.7 Bad sender address syntax");
                return Done::Failed;
            }
        };
        let offered = Offered {
            auth: self.cfg.sasl.is_some(),
            smtputf8: self.cfg.smtputf8_enable,
        };
        let options = match protocol::mail_params(&params, offered) {
            Ok(o) => o,
            Err(e) => {
                self.reply(&e.reply());
                return Done::Failed;
            }
        };
        let size = options.size;
        let tx = Transaction {
            sender,
            smtputf8,
            envid: options.envid,
            ret: options.ret.map(str::to_string),
            ..Default::default()
        };
        let limit = self.cfg.message_size_limit;
        if limit > 0 && size > limit {
            let reply = "552 5.3.4 Message size exceeds fixed limit";
            self.log_reject(reply, Some(&tx.sender), None);
            self.reply(reply);
            return Done::Failed;
        }
        if self.strict_smtputf8_refuses(&tx.sender, smtputf8) {
            return Done::Failed;
        }
        if !self.enough_storage(size) {
            let reply = "452 4.3.1 Insufficient system storage";
            warning!(
                "not enough free space in the queue file system for {}",
                self.namaddr
            );
            self.log_reject(reply, Some(&tx.sender), None);
            self.reply(reply);
            return Done::Failed;
        }
        let needed = {
            let mut req = self.request(None, self.where_);
            req.sender = Some(&tx.sender);
            self.cfg.restrictions.dns_needed(Stage::Sender, &req)
        };
        if self.await_dns(needed, Verb::Mail) {
            return Done::Pending;
        }
        if self.over_rate_limit(Event::Message, "Message delivery request", "too much mail") {
            return Done::Failed;
        }
        let refused = {
            let mut req = self.request(None, self.where_);
            req.sender = Some(&tx.sender);
            self.cfg.restrictions.check_sender(&req)
        };
        if let Some(reply) = refused {
            self.log_reject(&reply, Some(&tx.sender), None);
            self.reply(&reply);
            return Done::Failed;
        }
        self.tx = Some(tx);
        if !self.cfg.delay_open_until_valid_rcpt {
            self.open_queue_file(Opening::Mail);
            return Done::Pending;
        }
        self.reply("250 2.1.0 Ok");
        Done::Ok
    }

    fn rcpt(&mut self, args: &[Token]) -> Done {
        if self.tx.is_none() {
            self.reply("503 5.5.1 Error: need MAIL command");
            return Done::Failed;
        }
        let Some((path, params)) = protocol::path_command(args, "to:") else {
            self.reply("501 5.5.4 Syntax: RCPT TO:<address>");
            return Done::Failed;
        };
        let smtputf8 = self.tx.as_ref().is_some_and(|t| t.smtputf8);
        let address = match self.address(path) {
            Some(a) if !a.is_empty() && self.utf8_syntax_ok(path, &a, smtputf8) => a,
            _ => {
                self.reply("501 5.1.3 Bad recipient address syntax");
                return Done::Failed;
            }
        };
        let options = match protocol::rcpt_params(&params) {
            Ok(o) => o,
            Err(e) => {
                self.reply(&e.reply());
                return Done::Failed;
            }
        };
        let rcpt = Recipient {
            notify: options.notify,
            orcpt: options.orcpt,
            ..Recipient::new(&address)
        };
        let limit = self.cfg.recipient_limit;
        if let Some(tx) = &mut self.tx {
            if limit > 0 && tx.recipients.len() >= limit {
                tx.overshoot += 1;
                let over = tx.overshoot > RECIPIENT_OVERSHOOT_LIMIT;
                self.reply("452 4.5.3 Error: too many recipients");
                return if over { Done::Failed } else { Done::Ok };
            }
        }
        if self.strict_smtputf8_refuses(&address, smtputf8) {
            return Done::Failed;
        }
        let needed = {
            let req = self.request(Some(&address), self.where_);
            self.cfg.restrictions.dns_needed(Stage::Recipient, &req)
        };
        if self.await_dns(needed, Verb::Rcpt) {
            return Done::Pending;
        }
        if self.over_rate_limit(Event::Recipient, "Recipient address", "too many recipients") {
            return Done::Failed;
        }
        if let Some(reply) = self.check_recipient(&address) {
            let sender = self.tx.as_ref().map(|t| t.sender.clone());
            self.log_reject(&reply, sender.as_deref(), Some(&address));
            self.reply(&reply);
            return Done::Failed;
        }
        if let Some(tx) = &mut self.tx {
            tx.recipients.push(rcpt);
        }
        if !self.cleanup_open {
            // The first recipient accepted: the queue file is made now,
            // while the client goes on to DATA (Postfix's
            // smtpd_delay_open_until_valid_rcpt), not after it.
            self.open_queue_file(Opening::Rcpt);
            return Done::Pending;
        }
        self.reply("250 2.1.5 Ok");
        Done::Ok
    }

    fn data(&mut self, args: &[Token]) -> Done {
        let Some(tx) = &self.tx else {
            self.reply("503 5.5.1 Error: need RCPT command");
            return Done::Failed;
        };
        if tx.recipients.is_empty() {
            self.reply("554 5.5.1 Error: no valid recipients");
            return Done::Failed;
        }
        if args.len() != 1 {
            self.reply("501 5.5.4 Syntax: DATA");
            return Done::Failed;
        }
        let refused = self
            .cfg
            .restrictions
            .check_data(&self.request(None, "DATA"));
        if let Some(reply) = refused {
            let sender = tx.sender.clone();
            self.log_reject(&reply, Some(&sender), None);
            self.reply(&reply);
            return Done::Failed;
        }
        let opened = self.tx.as_ref().is_some_and(|t| t.queue_id.is_some());
        if self.cleanup_open && opened {
            self.start_data();
        } else {
            self.open_queue_file(Opening::Data);
        }
        Done::Pending
    }

    /// Asks cleanup for a queue file; the reply to `opening` waits for
    /// its answer.
    fn open_queue_file(&mut self, opening: Opening) {
        self.abort_cleanup();
        self.requests.push(CleanupRequest::Open);
        self.cleanup_open = true;
        self.state = State::WaitOpened(opening);
    }

    /// DATA with the queue file open: sends the envelope, answers 354 and
    /// starts on the content, which begins with our Received header.
    fn start_data(&mut self) {
        let Some(tx) = &self.tx else {
            return;
        };
        let mut attrs = vec![
            (attr::CLIENT.to_string(), self.namaddr.clone()),
            (attr::PROTOCOL.to_string(), self.protocol()),
        ];
        if let Some(h) = &self.helo {
            attrs.push((attr::HELO.to_string(), h.clone()));
        }
        if let Some(e) = &tx.envid {
            attrs.push((attr::ENVID.to_string(), e.clone()));
        }
        if let Some(r) = &tx.ret {
            attrs.push((attr::RET.to_string(), r.clone()));
        }
        if tx.smtputf8 {
            let flags = smtputf8::Flags {
                requested: true,
                ..Default::default()
            };
            attrs.push((attr::SMTPUTF8.to_string(), flags.value()));
        }
        // What pipe(8)'s ${client_port} and ${sasl_*} macros show.
        if let Some(p) = self.client.port {
            attrs.push((attr::CLIENT_PORT.to_string(), p.to_string()));
        }
        if let (Some(m), Some(u)) = (&self.sasl_method, &self.sasl_username) {
            attrs.push((attr::SASL_METHOD.to_string(), m.clone()));
            attrs.push((attr::SASL_USERNAME.to_string(), u.clone()));
        }
        let msg = NewMessage {
            sender: tx.sender.clone(),
            recipients: tx.recipients.clone(),
            attrs,
            flags: 0,
            origin: "smtpd".to_string(),
        };
        let queue_id = tx.queue_id.clone().unwrap_or_default();
        self.requests.push(CleanupRequest::Envelope(msg));
        self.date = postern_common::time::rfc5322_date(postern_common::time::now_secs());
        let header = self.received_header(&queue_id);
        self.reply("354 End data with <CR><LF>.<CR><LF>");
        self.where_ = "DATA";
        self.state = State::Data(Box::new(DataState {
            decoder: Decoder::new(self.cfg.line_limit),
            size: 0,
            too_big: false,
            failure: None,
            content: header.into_bytes(),
        }));
    }

    /// cleanup refused, or was lost, while the reply to a command waited
    /// for it (`state`): that reply is `reply`.
    fn waited_in_vain(&mut self, state: &State, reply: &str) {
        self.cleanup_open = false;
        self.state = State::Command;
        self.reply(reply);
        match state {
            State::WaitOpened(opening) => self.open_failed(*opening),
            _ => self.transaction_failed(),
        }
    }

    /// cleanup could not open a queue file for `opening`: its reply (sent
    /// already) is a failure.
    fn open_failed(&mut self, opening: Opening) {
        match opening {
            // The transaction never started.
            Opening::Mail => self.tx = None,
            // The recipient was not taken; the next one tries again.
            Opening::Rcpt => {
                if let Some(tx) = &mut self.tx {
                    tx.recipients.pop();
                }
            }
            Opening::Data => return self.transaction_failed(),
        }
        self.error_count += 1;
        self.check_error_limit();
    }

    fn rset(&mut self, args: &[Token]) -> Done {
        if args.len() != 1 {
            self.reply("501 5.5.4 Syntax: RSET");
            return Done::Failed;
        }
        self.end_transaction();
        self.reply("250 2.0.0 Ok");
        Done::Ok
    }

    fn vrfy(&mut self, args: &[Token]) -> Done {
        if self.cfg.disable_vrfy {
            self.reply("502 5.5.1 VRFY command is disabled");
            return Done::Failed;
        }
        if args.len() < 2 {
            self.reply("501 5.5.4 Syntax: VRFY address");
            return Done::Failed;
        }
        // RFC 6531: `VRFY address SMTPUTF8`.
        let (args, smtputf8) = match args.split_last() {
            Some((last, rest))
                if rest.len() > 1 && self.smtputf8_requested(std::slice::from_ref(last)) =>
            {
                (rest, true)
            }
            _ => (args, false),
        };
        let words: Vec<&str> = args[1..].iter().map(|t| t.text.as_str()).collect();
        let given = words.join(" ");
        let address = match protocol::extract_address(&given) {
            Ok(a)
                if !a.is_empty()
                    && !args.iter().any(|t| t.unterminated)
                    && self.utf8_syntax_ok(&args[1], &a, smtputf8) =>
            {
                a
            }
            _ => {
                self.reply("501 5.1.3 Bad recipient address syntax");
                return Done::Failed;
            }
        };
        if let Some(reply) = self.check_recipient(&address) {
            let sender = self.tx.as_ref().map(|t| t.sender.clone());
            self.log_reject(&reply, sender.as_deref(), Some(&address));
            self.reply(&reply);
            return Done::Failed;
        }
        self.reply(&format!("252 2.0.0 {given}"));
        Done::Ok
    }

    // ------------------------------------------------------------ helpers

    fn reply(&mut self, text: &str) {
        // Slow down a client that makes many errors (Postfix sleeps
        // before any reply once the soft limit is reached).
        if self.error_count >= self.cfg.soft_error_limit && self.error_count > 0 {
            self.delay += self.cfg.error_sleep;
        }
        self.output.extend_from_slice(text.as_bytes());
        self.output.extend_from_slice(b"\r\n");
        if text.starts_with("421") {
            self.hangup = true;
        }
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

    // ------------------------------------------------------------ SMTPUTF8

    /// Whether MAIL FROM's parameters ask for SMTPUTF8 and it is on offer.
    fn smtputf8_requested(&self, params: &[Token]) -> bool {
        self.cfg.smtputf8_enable
            && params
                .iter()
                .any(|t| t.text.eq_ignore_ascii_case("SMTPUTF8"))
    }

    /// Postfix's rule for non-ASCII domains (see
    /// [`smtputf8::address_syntax_ok`]); a refusal is logged as bad syntax.
    fn utf8_syntax_ok(&self, tok: &Token, addr: &str, smtputf8: bool) -> bool {
        if !self.cfg.smtputf8_enable || smtputf8::address_syntax_ok(addr, smtputf8) {
            return true;
        }
        warning!(
            "Illegal address syntax from {} in {} command: {}",
            self.namaddr,
            self.where_,
            protocol::printable(tok.text.as_bytes(), 200)
        );
        false
    }

    /// `strict_smtputf8`: a non-ASCII address outside an SMTPUTF8
    /// transaction is refused (replied here).
    fn strict_smtputf8_refuses(&mut self, addr: &str, smtputf8: bool) -> bool {
        let refused = self.cfg.smtputf8_enable
            && self.cfg.strict_smtputf8
            && !smtputf8
            && smtputf8::is_utf8_address(addr);
        if refused {
            self.reply("553 5.6.7 Must declare SMTPUTF8 to send unicode address");
        }
        refused
    }

    /// The `with` word of our Received header: `UTF8SMTP` (and its RFC
    /// 3848 `S`/`A` suffixes) for an SMTPUTF8 transaction, as Postfix.
    fn received_protocol(&self) -> String {
        let p = self.protocol();
        if self.tx.as_ref().is_some_and(|t| t.smtputf8) {
            let rest = p.strip_prefix('E').unwrap_or(&p);
            format!("UTF8{rest}")
        } else {
            p
        }
    }

    /// The address in a MAIL FROM/RCPT TO word, or None (logged).
    fn address(&self, tok: &Token) -> Option<String> {
        let a = if tok.unterminated {
            None
        } else {
            protocol::extract_address(&tok.text).ok()
        };
        if a.is_none() {
            warning!(
                "Illegal address syntax from {} in {} command: {}",
                self.namaddr,
                self.where_,
                protocol::printable(tok.text.as_bytes(), 200)
            );
        }
        a
    }

    /// Asks for the DNS answers in `needed` that the session does not
    /// have yet (once each); true when there are any.
    fn request_dns(&mut self, needed: Vec<Query>) -> bool {
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
    fn await_dns(&mut self, needed: Vec<Query>, verb: Verb) -> bool {
        if !self.request_dns(needed) {
            return false;
        }
        self.state = State::WaitDns(std::mem::take(&mut self.current_line));
        // Counted when the command runs again.
        self.counts[verb_index(verb)].total -= 1;
        true
    }

    /// What the restrictions see now.
    fn request<'a>(&'a self, rcpt: Option<&'a str>, command: &'a str) -> Request<'a> {
        Request {
            client_addr: Some(self.client.addr),
            client_name: &self.client.names.name,
            client_reverse_name: &self.client.names.reverse_name,
            name_status: self.client.names.name_status,
            reverse_status: self.client.names.reverse_status,
            helo: self.helo.as_deref(),
            sender: self.tx.as_ref().map(|t| t.sender.as_str()),
            recipient: rcpt,
            sasl_username: self.sasl_username.as_deref(),
            esmtp: self.esmtp,
            pipelined: self.pipelined,
            command,
            dns: Some(&self.dns),
        }
    }

    fn check_recipient(&self, rcpt: &str) -> Option<String> {
        let req = self.request(Some(rcpt), self.where_);
        self.cfg.restrictions.check_recipient(&req)
    }

    /// Postfix's reject log line.
    fn log_reject(&self, reply: &str, sender: Option<&str>, rcpt: Option<&str>) {
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

    fn received_header(&self, queue_id: &str) -> String {
        let tls = self
            .tls
            .as_ref()
            .filter(|_| self.cfg.tls_received_header)
            .map(|n| n.summary());
        let rcpts: Vec<&str> = self
            .tx
            .as_ref()
            .map(|t| t.recipients.iter().map(|r| r.address.as_str()).collect())
            .unwrap_or_default();
        Received {
            helo: self.helo.as_deref(),
            client_name: &self.client.names.name,
            client_addr: self.client.addr,
            myhostname: &self.cfg.myhostname,
            mail_name: &self.cfg.mail_name,
            protocol: &self.received_protocol(),
            queue_id,
            recipients: &rcpts,
            date: &self.date,
            tls: tls.as_deref(),
            auth_sender: if self.cfg.sasl_authenticated_header {
                self.sasl_username.as_deref()
            } else {
                None
            },
        }
        .render()
    }

    fn abort_cleanup(&mut self) {
        if self.cleanup_open {
            self.cleanup_open = false;
            self.requests.push(CleanupRequest::Abort);
        }
    }

    /// Forgets the transaction (RSET, HELO, STARTTLS, a failure) and the
    /// queue file opened for it, which cleanup gives back to `spare/`.
    fn end_transaction(&mut self) {
        self.abort_cleanup();
        self.tx = None;
    }

    fn transaction_failed(&mut self) {
        self.end_transaction();
        self.state = State::Command;
        self.error_count += 1;
        self.check_error_limit();
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

fn verb_index(v: Verb) -> usize {
    Verb::ALL
        .iter()
        .position(|x| *x == v)
        .unwrap_or(Verb::ALL.len())
}

/// The reply for a message cleanup would not take.
/// Below this much free space in the queue file system no new message is
/// started: a queue file needs a few blocks even for a short message.
const MIN_FREE: u64 = 64 * 1024;

fn failure_reply(temporary: bool, dsn: &str, reason: &str) -> String {
    let valid = |d: &str, class: char| {
        d.starts_with(class)
            && d.split('.').count() == 3
            && d.split('.')
                .all(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()))
    };
    let (code, dsn, default) = if temporary {
        let dsn = if valid(dsn, '4') { dsn } else { "4.3.0" };
        if dsn == "4.3.1" {
            // Postfix's answer for a full queue file system.
            return "452 4.3.1 Insufficient system storage".to_string();
        }
        (451, dsn, "queue file write error")
    } else {
        let dsn = if valid(dsn, '5') { dsn } else { "5.3.0" };
        let code = if dsn == "5.3.4" { 552 } else { 554 };
        (code, dsn, "message not accepted")
    };
    let reason = protocol::printable(reason.as_bytes(), 400);
    let reason = if reason.trim().is_empty() {
        default.to_string()
    } else {
        reason
    };
    format!("{code} {dsn} Error: {reason}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::restrictions::Restrictions;
    use postern_common::cidr::CidrList;
    use std::path::PathBuf;
    use std::time::Duration;

    fn settings() -> Settings {
        let split = |s: &str| postern_conf::split_list(s);
        Settings {
            myhostname: "mx.example".into(),
            mail_name: "Postern".into(),
            banner: "mx.example ESMTP Postern".into(),
            message_size_limit: 1000,
            queue_directory: std::env::temp_dir(),
            queue_minfree: 0,
            recipient_limit: 3,
            hard_error_limit: 5,
            soft_error_limit: 3,
            error_sleep: Duration::ZERO,
            helo_required: false,
            disable_vrfy: false,
            line_limit: 2048,
            restrictions: Restrictions::new(
                crate::restrictions::parse_list(&split(
                    "permit_mynetworks, permit_sasl_authenticated, reject_unauth_destination",
                )),
                vec![],
                CidrList::parse(&["127.0.0.0/8"]).unwrap(),
                split("mx.example, localhost"),
                vec![],
            )
            .unwrap(),
            timeout: Duration::from_secs(300),
            ipc_timeout: Duration::from_secs(300),
            max_idle: Duration::from_secs(100),
            session_limit: 10,
            cleanup_socket: PathBuf::from("/nonexistent"),
            tls_level: TlsLevel::None,
            tls: None,
            tls_wrappermode: false,
            tls_auth_only: false,
            tls_received_header: false,
            sasl: None,
            sasl_service: "smtp".into(),
            sasl_authenticated_header: false,
            broken_sasl_auth_clients: false,
            dns_servers: vec![],
            dns_timeout: Duration::from_secs(5),
            peername_lookup: false,
            delay_open_until_valid_rcpt: true,
            anvil: Default::default(),
            service: "smtp".into(),
            smtputf8_enable: true,
            strict_smtputf8: false,
        }
    }

    fn session_with(s: Settings, ip: &str) -> Session {
        let mut s = Session::new(Arc::new(s), Client::new(ip.parse().unwrap()));
        let greeting = out(&mut s);
        assert_eq!(greeting, ["220 mx.example ESMTP Postern"]);
        s
    }

    fn session() -> Session {
        session_with(settings(), "127.0.0.1")
    }

    fn out(s: &mut Session) -> Vec<String> {
        let o = String::from_utf8(s.take_output()).unwrap();
        o.split_terminator("\r\n").map(|l| l.to_string()).collect()
    }

    fn send(s: &mut Session, text: &str) -> Vec<String> {
        s.receive(text.as_bytes());
        out(s)
    }

    /// As [`send`], with cleanup answering Open at once: for tests about
    /// something else than the opening of the queue file.
    fn send_opening(s: &mut Session, text: &str) -> Vec<String> {
        s.receive(text.as_bytes());
        let mut o = out(s);
        while matches!(s.state, State::WaitOpened(_)) {
            o.extend(opened(s));
        }
        o
    }

    /// Content requests sent so far, concatenated; asserts the order of
    /// the other requests.
    fn requests(s: &mut Session) -> (Vec<&'static str>, Vec<u8>) {
        let mut kinds = Vec::new();
        let mut content = Vec::new();
        for r in s.take_requests() {
            match r {
                CleanupRequest::Open => kinds.push("open"),
                CleanupRequest::Envelope(_) => kinds.push("envelope"),
                CleanupRequest::Content(c) => {
                    kinds.push("content");
                    content.extend(c);
                }
                CleanupRequest::Close => kinds.push("close"),
                CleanupRequest::Abort => kinds.push("abort"),
            }
        }
        kinds.dedup();
        (kinds, content)
    }

    fn opened(s: &mut Session) -> Vec<String> {
        s.cleanup_reply(CleanupReply::Opened {
            queue_id: "QID1".into(),
        });
        out(s)
    }

    fn queued(s: &mut Session) -> Vec<String> {
        s.cleanup_reply(CleanupReply::Queued {
            queue_id: "QID1".into(),
        });
        out(s)
    }

    #[test]
    fn ehlo_offers_what_is_implemented() {
        let mut s = session();
        assert_eq!(
            send(&mut s, "EHLO client.example\r\n"),
            [
                "250-mx.example",
                "250-PIPELINING",
                "250-SIZE 1000",
                "250-VRFY",
                "250-ENHANCEDSTATUSCODES",
                "250-8BITMIME",
                "250-DSN",
                "250 SMTPUTF8"
            ]
        );
        assert_eq!(send(&mut s, "HELO x\r\n"), ["250 mx.example"]);
        assert_eq!(send(&mut s, "EHLO\r\n"), ["501 Syntax: EHLO hostname"]);
    }

    #[test]
    fn whole_transaction() {
        let mut s = session();
        let r = send(
            &mut s,
            "EHLO client.example\r\nMAIL FROM:<a@b.example> SIZE=100 BODY=8BITMIME\r\nRCPT TO:<u@mx.example> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;u+40mx.example\r\nDATA\r\n",
        );
        // The first recipient opens the queue file: its 250 waits for
        // cleanup, and the DATA behind it too.
        assert_eq!(r.last().unwrap(), "250 2.1.0 Ok");
        assert_eq!(requests(&mut s).0, ["open"]);
        assert!(s.waiting_on_cleanup());
        assert!(!s.wants_input());
        assert_eq!(
            opened(&mut s),
            ["250 2.1.5 Ok", "354 End data with <CR><LF>.<CR><LF>"]
        );
        // DATA sent the envelope.
        let reqs = s.take_requests();
        assert_eq!(reqs.len(), 1);
        let CleanupRequest::Envelope(m) = &reqs[0] else {
            panic!("{reqs:?}")
        };
        assert_eq!(m.sender, "a@b.example");
        assert_eq!(m.recipients[0].address, "u@mx.example");
        assert_eq!(m.recipients[0].notify, 3);
        assert_eq!(m.recipients[0].orcpt, "rfc822;u@mx.example");
        assert_eq!(m.origin, "smtpd");
        assert!(m
            .attrs
            .contains(&("client".into(), "unknown[127.0.0.1]".into())));
        assert!(m.attrs.contains(&("protocol".into(), "ESMTP".into())));
        assert!(m.attrs.contains(&("helo".into(), "client.example".into())));
        assert!(s.wants_input());
        assert_eq!(
            send(&mut s, "Subject: hi\r\n\r\n..dot\r\n"),
            Vec::<String>::new()
        );
        assert_eq!(send(&mut s, "end\r\n.\r\n"), Vec::<String>::new());
        let (kinds, content) = requests(&mut s);
        assert_eq!(kinds, ["content", "close"]);
        let content = String::from_utf8(content).unwrap();
        assert!(
            content.starts_with(
                "Received: from client.example (unknown [127.0.0.1])\n\tby mx.example (Postern) with ESMTP id QID1\n\tfor <u@mx.example>; "
            ),
            "{content}"
        );
        assert!(
            content.ends_with("\nSubject: hi\n\n.dot\nend\n"),
            "{content}"
        );
        assert_eq!(queued(&mut s), ["250 2.0.0 Ok: queued as QID1"]);
        assert_eq!(send(&mut s, "QUIT\r\n"), ["221 2.0.0 Bye"]);
        assert!(s.is_done());
        assert_eq!(s.stats(), " ehlo=1 mail=1 rcpt=1 data=1 quit=1 commands=5");
    }

    #[test]
    fn pipelining_in_order_and_paused_while_waiting() {
        let mut s = session();
        // Everything at once, including the content and the next commands.
        let r = send(
            &mut s,
            "EHLO c\r\nMAIL FROM:<>\r\nRCPT TO:<x@far.example>\r\nRCPT TO:<u@mx.example>\r\nDATA\r\nbody\r\n.\r\nRSET\r\nQUIT\r\n",
        );
        assert_eq!(&r[8..], ["250 2.1.0 Ok"]);
        let (kinds, _) = requests(&mut s);
        assert_eq!(kinds, ["open"]);
        // The rest waited for the queue file; the RSET and QUIT then for
        // the 250.
        assert_eq!(
            opened(&mut s),
            [
                "250 2.1.5 Ok",
                "250 2.1.5 Ok",
                "354 End data with <CR><LF>.<CR><LF>"
            ]
        );
        let (kinds, content) = requests(&mut s);
        assert_eq!(kinds, ["envelope", "content", "close"]);
        assert!(content.ends_with(b"\nbody\n"));
        assert_eq!(
            queued(&mut s),
            [
                "250 2.0.0 Ok: queued as QID1",
                "250 2.0.0 Ok",
                "221 2.0.0 Bye"
            ]
        );
        assert!(s.is_done());
    }

    #[test]
    fn pipelined_replies_keep_order() {
        let mut s = session();
        let r = send(
            &mut s,
            "HELO c\r\nRCPT TO:<a@b>\r\nMAIL FROM:<a@b>\r\nMAIL FROM:<a@b>\r\nNOOP\r\nXYZZY\r\nRSET\r\n",
        );
        assert_eq!(
            r,
            [
                "250 mx.example",
                "503 5.5.1 Error: need MAIL command",
                "250 2.1.0 Ok",
                "503 5.5.1 Error: nested MAIL command",
                "250 2.0.0 Ok",
                "500 5.5.2 Error: command not recognized",
                "250 2.0.0 Ok"
            ]
        );
        // A command split over two reads.
        assert_eq!(send(&mut s, "NO"), Vec::<String>::new());
        assert_eq!(send(&mut s, "OP\r"), Vec::<String>::new());
        assert_eq!(send(&mut s, "\n"), ["250 2.0.0 Ok"]);
        // Bare LF ends a command too.
        assert_eq!(send(&mut s, "NOOP\n"), ["250 2.0.0 Ok"]);
    }

    #[test]
    fn relay_denied_and_logged_shape() {
        let mut s = session_with(settings(), "192.0.2.7");
        assert_eq!(s.namaddr(), "unknown[192.0.2.7]");
        let r = send(
            &mut s,
            "EHLO c\r\nMAIL FROM:<s@x>\r\nRCPT TO:<a@far.example>\r\nRCPT TO:<u@MX.example>\r\nRCPT TO:<postmaster>\r\nDATA\r\n",
        );
        assert_eq!(
            &r[8..],
            [
                "250 2.1.0 Ok",
                "554 5.7.1 <a@far.example>: Relay access denied"
            ]
        );
        assert_eq!(requests(&mut s).0, ["open"]);
        assert_eq!(
            opened(&mut s),
            [
                "250 2.1.5 Ok",
                "250 2.1.5 Ok",
                "354 End data with <CR><LF>.<CR><LF>"
            ]
        );
        let reqs = s.take_requests();
        let CleanupRequest::Envelope(m) = &reqs[0] else {
            panic!()
        };
        assert_eq!(m.recipients.len(), 2);
    }

    #[test]
    fn data_errors() {
        let mut s = session();
        assert_eq!(
            send(&mut s, "DATA\r\n"),
            ["503 5.5.1 Error: need RCPT command"]
        );
        send(&mut s, "MAIL FROM:<a@b>\r\n");
        assert_eq!(
            send(&mut s, "DATA\r\n"),
            ["554 5.5.1 Error: no valid recipients"]
        );
        send_opening(&mut s, "RCPT TO:<u@mx.example>\r\n");
        assert_eq!(send(&mut s, "DATA x\r\n"), ["501 5.5.4 Syntax: DATA"]);
    }

    #[test]
    fn size_limit() {
        let mut s = session();
        assert_eq!(
            send(&mut s, "MAIL FROM:<a@b> SIZE=1001\r\n"),
            ["552 5.3.4 Message size exceeds fixed limit"]
        );
        assert_eq!(
            send(&mut s, "MAIL FROM:<a@b> SIZE=x\r\n"),
            ["501 5.5.4 Bad message size syntax"]
        );
        send(
            &mut s,
            "MAIL FROM:<a@b> SIZE=1000\r\nRCPT TO:<u@mx.example>\r\nDATA\r\n",
        );
        s.take_requests();
        opened(&mut s);
        let line = "x".repeat(98) + "\r\n";
        for _ in 0..9 {
            assert!(send(&mut s, &line).is_empty());
        }
        let (kinds, _) = requests(&mut s);
        assert_eq!(kinds, ["envelope", "content"]);
        // Over the limit: aborted at once, read to the end, then refused.
        assert!(send(&mut s, &(line.clone() + &line)).is_empty());
        let (kinds, _) = requests(&mut s);
        assert_eq!(kinds, ["abort"]);
        assert!(send(&mut s, &line).is_empty());
        assert!(requests(&mut s).0.is_empty());
        assert_eq!(
            send(&mut s, ".\r\n"),
            ["552 5.3.4 Error: message file too big"]
        );
        assert!(requests(&mut s).0.is_empty());
        // The session goes on.
        assert_eq!(send(&mut s, "MAIL FROM:<a@b>\r\n"), ["250 2.1.0 Ok"]);
    }

    #[test]
    fn too_many_recipients() {
        let mut s = session();
        send(&mut s, "MAIL FROM:<a@b>\r\n");
        for i in 0..3 {
            assert_eq!(
                send_opening(&mut s, &format!("RCPT TO:<u{i}@mx.example>\r\n")),
                ["250 2.1.5 Ok"]
            );
        }
        assert_eq!(
            send(&mut s, "RCPT TO:<u9@mx.example>\r\n"),
            ["452 4.5.3 Error: too many recipients"]
        );
        assert_eq!(s.error_count, 0);
    }

    #[test]
    fn error_limit_hangs_up() {
        let mut s = session();
        let r = send(&mut s, "A\r\nB\r\nC\r\nD\r\nE\r\nF\r\n");
        assert_eq!(r.len(), 6);
        assert_eq!(r[5], "421 4.7.0 mx.example Error: too many errors");
        assert!(s.is_done());
        assert_eq!(s.reason, Some("too many errors"));
        assert_eq!(s.stats(), " unknown=0/5 commands=0/5");
    }

    #[test]
    fn bad_commands() {
        let mut cfg = settings();
        cfg.hard_error_limit = 20;
        let mut s = session_with(cfg, "127.0.0.1");
        assert_eq!(send(&mut s, "NOOP\0x\r\n"), ["500 5.5.2 Error: bad syntax"]);
        assert_eq!(send(&mut s, "\r\n"), ["500 5.5.2 Error: bad syntax"]);
        s.receive(b"NOOP \xff\r\n");
        assert_eq!(out(&mut s), ["500 5.5.2 Error: bad UTF-8 syntax"]);
        let long = "NOOP ".to_string() + &"x".repeat(3000) + "\r\n";
        assert_eq!(
            send(&mut s, &long),
            ["500 5.5.2 mx.example Error: command too long"]
        );
        // Arriving in pieces, longer than the limit before its end.
        assert!(send(&mut s, &"y".repeat(2500)).is_empty());
        assert!(send(&mut s, &"y".repeat(2500)).is_empty());
        assert_eq!(
            send(&mut s, "y\r\nNOOP\r\n"),
            [
                "500 5.5.2 mx.example Error: command too long",
                "250 2.0.0 Ok"
            ]
        );
        assert_eq!(
            send(&mut s, "STARTTLS\r\n"),
            ["502 5.5.1 Error: command not implemented"]
        );
        assert_eq!(s.error_count, 6);
    }

    #[test]
    fn header_as_command_ends_session() {
        let mut s = session();
        assert_eq!(
            send(&mut s, "Subject: hello\r\nNOOP\r\n"),
            ["221 2.7.0 Error: I can break rules, too. Goodbye."]
        );
        assert!(s.is_done());
    }

    #[test]
    fn address_syntax() {
        let mut cfg = settings();
        cfg.hard_error_limit = 20;
        let mut s = session_with(cfg, "127.0.0.1");
        assert_eq!(
            send(&mut s, "MAIL FROM:<a b@c>\r\n"),
            ["501 5.1.7 Bad sender address syntax"]
        );
        assert_eq!(
            send(&mut s, "MAIL FROM:<a@c\r\n"),
            ["501 5.1.7 Bad sender address syntax"]
        );
        assert_eq!(
            send(&mut s, "MAIL FROM <a@c>\r\n"),
            ["501 5.5.4 Syntax: MAIL FROM:<address>"]
        );
        assert_eq!(
            send(&mut s, "MAIL FROM:<a@c> FOO=1\r\n"),
            ["555 5.5.4 Unsupported option: FOO=1"]
        );
        assert_eq!(send(&mut s, "mail from: <a@c>\r\n"), ["250 2.1.0 Ok"]);
        assert_eq!(
            send(&mut s, "RCPT TO:<>\r\n"),
            ["501 5.1.3 Bad recipient address syntax"]
        );
        assert_eq!(
            send(&mut s, "RCPT TO:<u@mx.example> NOTIFY=NEVER,DELAY\r\n"),
            ["501 5.5.4 Error: Bad NOTIFY parameter syntax"]
        );
        assert_eq!(
            send(&mut s, "RCPT TO:<u@mx.example> FOO\r\n"),
            ["555 5.5.4 Unsupported option: FOO"]
        );
        assert_eq!(
            send_opening(&mut s, "RCPT TO:u@mx.example\r\n"),
            ["250 2.1.5 Ok"]
        );
    }

    #[test]
    fn helo_required_and_vrfy() {
        let mut cfg = settings();
        cfg.helo_required = true;
        let mut s = session_with(cfg.clone(), "127.0.0.1");
        assert_eq!(
            send(&mut s, "MAIL FROM:<a@b>\r\n"),
            ["503 5.5.1 Error: send HELO/EHLO first"]
        );
        assert_eq!(
            send(&mut s, "VRFY <u@mx.example>\r\n"),
            ["252 2.0.0 <u@mx.example>"]
        );
        assert_eq!(send(&mut s, "VRFY\r\n"), ["501 5.5.4 Syntax: VRFY address"]);
        cfg.disable_vrfy = true;
        let mut s = session_with(cfg, "127.0.0.1");
        assert_eq!(
            send(&mut s, "VRFY u\r\n"),
            ["502 5.5.1 VRFY command is disabled"]
        );
        let r = send(&mut s, "EHLO c\r\n");
        assert!(!r.iter().any(|l| l.contains("VRFY")));
    }

    #[test]
    fn smuggled_dot_does_not_end_data() {
        let mut s = session();
        send(
            &mut s,
            "EHLO c\r\nMAIL FROM:<a@b>\r\nRCPT TO:<u@mx.example>\r\nDATA\r\n",
        );
        s.take_requests();
        opened(&mut s);
        let r = send(
            &mut s,
            "x\n.\nMAIL FROM:<evil@x>\r\nRCPT TO:<v@mx.example>\r\nDATA\r\nevil\r\n",
        );
        assert!(r.is_empty(), "{r:?}");
        assert!(s.wants_input());
        assert_eq!(send(&mut s, ".\r\n"), Vec::<String>::new());
        let (kinds, content) = requests(&mut s);
        assert_eq!(kinds, ["envelope", "content", "close"]);
        assert!(content.ends_with(b"\nx\nMAIL FROM:<evil@x>\nRCPT TO:<v@mx.example>\nDATA\nevil\n"));
    }

    #[test]
    fn end_of_data_split_across_reads() {
        let mut s = session();
        send(
            &mut s,
            "EHLO c\r\nMAIL FROM:<a@b>\r\nRCPT TO:<u@mx.example>\r\nDATA\r\n",
        );
        s.take_requests();
        opened(&mut s);
        for piece in ["text\r", "\n", ".", "\r", "\nNO", "OP\r\n"] {
            assert!(send(&mut s, piece).is_empty());
        }
        let (kinds, content) = requests(&mut s);
        assert_eq!(kinds, ["envelope", "content", "close"]);
        assert!(content.ends_with(b"\ntext\n"));
        assert_eq!(
            queued(&mut s),
            ["250 2.0.0 Ok: queued as QID1", "250 2.0.0 Ok"]
        );
    }

    #[test]
    fn cleanup_failures() {
        // Unreachable at the first RCPT: the recipient is refused, and
        // the pipelined DATA with it.
        let mut s = session();
        send(
            &mut s,
            "MAIL FROM:<a@b>\r\nRCPT TO:<u@mx.example>\r\nDATA\r\nRSET\r\n",
        );
        assert_eq!(requests(&mut s).0, ["open"]);
        s.cleanup_lost();
        assert_eq!(
            out(&mut s),
            [
                WRITE_ERROR,
                "554 5.5.1 Error: no valid recipients",
                "250 2.0.0 Ok"
            ]
        );
        // Refused by cleanup at the first RCPT: the next one tries again.
        send(&mut s, "MAIL FROM:<a@b>\r\nRCPT TO:<u@mx.example>\r\n");
        s.take_requests();
        s.cleanup_reply(CleanupReply::Failed {
            temporary: true,
            dsn: "4.3.1".into(),
            reason: "Insufficient system storage".into(),
        });
        assert_eq!(out(&mut s), ["452 4.3.1 Insufficient system storage"]);
        send(&mut s, "RCPT TO:<v@mx.example>\r\n");
        assert_eq!(requests(&mut s).0, ["open"]);
        assert_eq!(opened(&mut s), ["250 2.1.5 Ok"]);
        // Lost between RCPT and DATA: DATA opens another file.
        s.cleanup_lost();
        assert!(out(&mut s).is_empty());
        assert!(send(&mut s, "DATA\r\n").is_empty());
        assert_eq!(requests(&mut s).0, ["open"]);
        assert_eq!(opened(&mut s), ["354 End data with <CR><LF>.<CR><LF>"]);
        let reqs = s.take_requests();
        let CleanupRequest::Envelope(m) = &reqs[0] else {
            panic!("{reqs:?}")
        };
        let rcpts: Vec<_> = m.recipients.iter().map(|r| r.address.as_str()).collect();
        assert_eq!(rcpts, ["v@mx.example"]);
        // Lost during the content: read to the end, then 451.
        send(&mut s, "a\r\n");
        s.cleanup_lost();
        assert!(send(&mut s, "b\r\n").is_empty());
        assert_eq!(send(&mut s, ".\r\n"), [WRITE_ERROR]);
        // Refused at the end (the errors so far forgiven, not to reach the
        // hard limit).
        s.error_count = 0;
        send(
            &mut s,
            "MAIL FROM:<a@b>\r\nRCPT TO:<u@mx.example>\r\nDATA\r\n",
        );
        assert_eq!(
            opened(&mut s),
            ["250 2.1.5 Ok", "354 End data with <CR><LF>.<CR><LF>"]
        );
        send(&mut s, "a\r\n.\r\n");
        s.cleanup_reply(CleanupReply::Failed {
            temporary: false,
            dsn: "5.4.6".into(),
            reason: "too many hops".into(),
        });
        assert_eq!(out(&mut s), ["554 5.4.6 Error: too many hops"]);
        assert_eq!(
            failure_reply(true, "", ""),
            "451 4.3.0 Error: queue file write error"
        );
        assert_eq!(
            failure_reply(false, "5.3.4", "message file too big"),
            "552 5.3.4 Error: message file too big"
        );
    }

    #[test]
    fn queue_file_opened_at_mail_without_delay_and_given_up_by_rset() {
        let mut cfg = settings();
        cfg.delay_open_until_valid_rcpt = false;
        let mut s = session_with(cfg, "192.0.2.7");
        assert!(send(&mut s, "MAIL FROM:<a@b>\r\n").is_empty());
        assert_eq!(requests(&mut s).0, ["open"]);
        assert_eq!(opened(&mut s), ["250 2.1.0 Ok"]);
        // Recipients, refused or not, no longer wait for cleanup.
        assert_eq!(
            send(
                &mut s,
                "RCPT TO:<x@far.example>\r\nRCPT TO:<u@mx.example>\r\n"
            ),
            [
                "554 5.7.1 <x@far.example>: Relay access denied",
                "250 2.1.5 Ok"
            ]
        );
        assert!(requests(&mut s).0.is_empty());
        // RSET gives the file up, and so does a new EHLO.
        assert_eq!(send(&mut s, "RSET\r\n"), ["250 2.0.0 Ok"]);
        assert_eq!(requests(&mut s).0, ["abort"]);
        send(&mut s, "MAIL FROM:<a@b>\r\n");
        opened(&mut s);
        send(&mut s, "EHLO c\r\n");
        assert_eq!(requests(&mut s).0, ["open", "abort"]);
    }

    #[test]
    fn a_session_that_went_on_has_given_its_connection_up() {
        let mut s = session();
        send(
            &mut s,
            "MAIL FROM:<a@b>\r\nRCPT TO:<u@mx.example>\r\nRSET\r\nMAIL FROM:<a@b>\r\nRCPT TO:<v@mx.example>\r\n",
        );
        s.take_requests();
        assert!(!s.gave_up_cleanup());
        // Opened, and the pipelined commands run: RSET gives this file up
        // and the next RCPT asks for another, on a new connection. The old
        // one closing now must not fail the new request.
        assert_eq!(
            opened(&mut s),
            ["250 2.1.5 Ok", "250 2.0.0 Ok", "250 2.1.0 Ok"]
        );
        assert!(s.gave_up_cleanup());
        assert_eq!(requests(&mut s).0, ["abort", "open"]);
        assert!(s.waiting_on_cleanup());
    }

    #[test]
    fn a_refused_recipient_opens_nothing() {
        let mut s = session_with(settings(), "192.0.2.7");
        assert_eq!(
            send(
                &mut s,
                "MAIL FROM:<a@b>\r\nRCPT TO:<x@far.example>\r\nQUIT\r\n"
            ),
            [
                "250 2.1.0 Ok",
                "554 5.7.1 <x@far.example>: Relay access denied",
                "221 2.0.0 Bye"
            ]
        );
        s.finish();
        assert!(requests(&mut s).0.is_empty());
    }

    #[test]
    fn a_client_that_leaves_after_rcpt_gives_the_file_up() {
        let mut s = session();
        send_opening(&mut s, "MAIL FROM:<a@b>\r\nRCPT TO:<u@mx.example>\r\n");
        s.take_requests();
        s.client_eof();
        s.finish();
        assert_eq!(requests(&mut s).0, ["abort"]);
    }

    #[test]
    fn client_leaves_mid_data() {
        let mut s = session();
        send(
            &mut s,
            "MAIL FROM:<a@b>\r\nRCPT TO:<u@mx.example>\r\nDATA\r\n",
        );
        s.take_requests();
        opened(&mut s);
        send(&mut s, "partial\r\n");
        s.take_requests();
        s.client_eof();
        let (kinds, _) = requests(&mut s);
        assert_eq!(kinds, ["abort"]);
        assert!(s.is_done());
        assert_eq!(s.where_, "DATA");
        assert_eq!(s.reason, Some("lost connection"));
        s.finish();
    }

    #[test]
    fn timeout_reply() {
        let mut s = session();
        s.timeout();
        assert_eq!(
            out(&mut s),
            ["421 4.4.2 mx.example Error: timeout exceeded"]
        );
        assert!(s.is_done());
    }

    fn sasl_settings() -> Settings {
        let mut cfg = settings();
        cfg.sasl = Some(crate::sasl::AuthTarget::Unix("/nonexistent".into()));
        cfg.hard_error_limit = 20;
        cfg
    }

    #[test]
    fn auth_exchange_and_relay() {
        let mut s = session_with(sasl_settings(), "192.0.2.7");
        // EHLO waits for the mechanism list.
        assert!(send(&mut s, "EHLO c\r\nNOOP\r\n").is_empty());
        assert_eq!(s.take_sasl_requests(), [SaslRequest::Mechs]);
        assert!(!s.wants_input());
        s.sasl_mechs(Some(vec!["PLAIN".into(), "LOGIN".into()]));
        let r = out(&mut s);
        assert!(r.contains(&"250-AUTH PLAIN LOGIN".to_string()), "{r:?}");
        assert_eq!(r.last().unwrap(), "250 2.0.0 Ok");
        // Unknown mechanism.
        assert_eq!(
            send(&mut s, "AUTH CRAM-MD5\r\n"),
            ["535 5.7.8 Error: authentication failed: Invalid authentication mechanism"]
        );
        // LOGIN: two challenges, the client's lines go to the server.
        assert!(send(&mut s, "AUTH LOGIN\r\n").is_empty());
        let reqs = s.take_sasl_requests();
        assert!(
            matches!(&reqs[..], [SaslRequest::Start { mech, resp: None, secured: false, .. }] if mech == "LOGIN")
        );
        s.sasl_reply(SaslReply::Cont("VXNlcm5hbWU6".into()));
        assert_eq!(out(&mut s), ["334 VXNlcm5hbWU6"]);
        assert!(send(&mut s, "YWxpY2U=\r\n").is_empty());
        assert_eq!(
            s.take_sasl_requests(),
            [SaslRequest::Continue("YWxpY2U=".into())]
        );
        s.sasl_reply(SaslReply::Cont("UGFzc3dvcmQ6".into()));
        assert_eq!(out(&mut s), ["334 UGFzc3dvcmQ6"]);
        assert_eq!(send(&mut s, "*\r\n"), ["501 5.7.0 Authentication aborted"]);
        assert_eq!(s.take_sasl_requests(), [SaslRequest::Abort]);
        // Failure, then success; relaying only after.
        send(&mut s, "AUTH PLAIN AGFsaWNlAGJhZA==\r\n");
        s.take_sasl_requests();
        s.sasl_reply(SaslReply::Fail(String::new()));
        assert_eq!(out(&mut s), ["535 5.7.8 Error: authentication failed: "]);
        let r = send(
            &mut s,
            "MAIL FROM:<a@b> AUTH=<>\r\nRCPT TO:<x@far.example>\r\nRSET\r\n",
        );
        assert_eq!(r[1], "554 5.7.1 <x@far.example>: Relay access denied");
        send(&mut s, "AUTH PLAIN AGFsaWNlAGdvb2Q=\r\n");
        s.take_sasl_requests();
        s.sasl_reply(SaslReply::Ok("alice".into()));
        assert_eq!(out(&mut s), ["235 2.7.0 Authentication successful"]);
        assert_eq!(
            send(&mut s, "AUTH PLAIN AGFsaWNlAGdvb2Q=\r\n"),
            ["503 5.5.1 Error: already authenticated"]
        );
        let r = send_opening(&mut s, "MAIL FROM:<a@b>\r\nRCPT TO:<x@far.example>\r\n");
        assert_eq!(r, ["250 2.1.0 Ok", "250 2.1.5 Ok"]);
        assert_eq!(s.protocol(), "ESMTPA");
    }

    #[test]
    fn auth_not_offered() {
        let mut s = session();
        assert_eq!(
            send(&mut s, "EHLO c\r\nAUTH PLAIN\r\n").last().unwrap(),
            "503 5.5.1 Error: authentication not enabled"
        );
        let mut cfg = sasl_settings();
        cfg.tls_auth_only = true;
        let mut s = session_with(cfg, "127.0.0.1");
        let r = send(&mut s, "EHLO c\r\n");
        assert!(!r.iter().any(|l| l.contains("AUTH")), "{r:?}");
        assert!(s.take_sasl_requests().is_empty());
    }

    #[test]
    fn starttls_state() {
        let mut cfg = settings();
        cfg.tls_level = TlsLevel::Encrypt;
        let mut s = session_with(cfg, "127.0.0.1");
        // No certificate loaded: not offered, a local problem.
        let r = send(&mut s, "EHLO c\r\nMAIL FROM:<a@b>\r\nSTARTTLS\r\n");
        assert!(!r.iter().any(|l| l.starts_with("250-STARTTLS")), "{r:?}");
        assert_eq!(
            &r[r.len() - 2..],
            [
                "530 5.7.0 Must issue a STARTTLS command first",
                "454 4.7.0 TLS not available due to local problem"
            ]
        );
    }

    #[test]
    fn starttls_discards_pipelined_input_and_resets() {
        let mut cfg = settings();
        cfg.tls_level = TlsLevel::May;
        // Any certificate will do: the session only needs to know TLS is on.
        cfg.tls = Some(test_tls_config());
        let mut s = session_with(cfg, "127.0.0.1");
        let r = send(
            &mut s,
            "EHLO c\r\nMAIL FROM:<a@b>\r\nSTARTTLS\r\nRCPT TO:<u@mx.example>\r\n",
        );
        assert!(r.contains(&"250-STARTTLS".to_string()));
        assert_eq!(
            &r[r.len() - 2..],
            ["250 2.1.0 Ok", "220 2.0.0 Ready to start TLS"]
        );
        assert!(s.starttls_requested());
        assert!(!s.wants_input());
        assert!(send(&mut s, "NOOP\r\n").is_empty());
        s.tls_started();
        s.tls_established(Negotiated {
            protocol: "TLSv1.3".into(),
            cipher: "TLS_AES_256_GCM_SHA384".into(),
            bits: 256,
            kx: None,
        });
        // The transaction and the pipelined RCPT are gone.
        assert_eq!(
            send(&mut s, "RCPT TO:<u@mx.example>\r\n"),
            ["503 5.5.1 Error: need MAIL command"]
        );
        let r = send(&mut s, "EHLO c\r\n");
        assert!(!r.iter().any(|l| l.contains("STARTTLS")), "{r:?}");
        assert_eq!(
            send(&mut s, "STARTTLS\r\n"),
            ["554 5.5.1 Error: TLS already active"]
        );
        assert_eq!(s.protocol(), "ESMTPS");
    }

    const TEST_KEY: &[u8] = &[
        0x30, 0x81, 0x87, 0x02, 0x01, 0x00, 0x30, 0x13, 0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d,
        0x02, 0x01, 0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07, 0x04, 0x6d, 0x30,
        0x6b, 0x02, 0x01, 0x01, 0x04, 0x20, 0x9e, 0xc0, 0x61, 0xfc, 0x74, 0x75, 0x32, 0xae, 0x57,
        0x27, 0x84, 0x45, 0x36, 0x96, 0x36, 0xa1, 0xfa, 0xcb, 0xd2, 0x7d, 0x7e, 0x62, 0x31, 0x8d,
        0xb6, 0x5e, 0x77, 0x8f, 0x1d, 0x72, 0x0a, 0xbf, 0xa1, 0x44, 0x03, 0x42, 0x00, 0x04, 0xeb,
        0x08, 0xef, 0x71, 0x8d, 0xcb, 0xd0, 0x07, 0x38, 0xfb, 0x8a, 0x15, 0xa5, 0xd6, 0x07, 0xc6,
        0x25, 0xae, 0x08, 0xce, 0x4a, 0x31, 0xe0, 0x00, 0x93, 0x2e, 0x9c, 0x60, 0x5d, 0x6d, 0x4e,
        0xc4, 0xf0, 0x4d, 0xa2, 0x4c, 0x05, 0xb4, 0x27, 0x06, 0x9d, 0x9e, 0x50, 0xb1, 0x38, 0x9c,
        0xf9, 0x4a, 0xb1, 0xef, 0xd0, 0x2c, 0xa0, 0xd3, 0xf7, 0xff, 0x7d, 0x95, 0x08, 0xd9, 0x7c,
        0xc2, 0xe3, 0x41,
    ];
    const TEST_CERT: &[u8] = &[
        0x30, 0x82, 0x01, 0x75, 0x30, 0x82, 0x01, 0x1b, 0xa0, 0x03, 0x02, 0x01, 0x02, 0x02, 0x14,
        0x18, 0xff, 0x56, 0xec, 0x59, 0x46, 0x62, 0x14, 0xd3, 0x0c, 0xa7, 0x8e, 0x83, 0x56, 0xce,
        0xec, 0xde, 0x08, 0x9e, 0xf8, 0x30, 0x0a, 0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04,
        0x03, 0x02, 0x30, 0x0f, 0x31, 0x0d, 0x30, 0x0b, 0x06, 0x03, 0x55, 0x04, 0x03, 0x0c, 0x04,
        0x74, 0x65, 0x73, 0x74, 0x30, 0x20, 0x17, 0x0d, 0x32, 0x36, 0x31, 0x31, 0x32, 0x32, 0x31,
        0x34, 0x35, 0x35, 0x34, 0x31, 0x5a, 0x18, 0x0f, 0x32, 0x31, 0x32, 0x36, 0x31, 0x30, 0x32,
        0x39, 0x31, 0x34, 0x35, 0x35, 0x34, 0x31, 0x5a, 0x30, 0x0f, 0x31, 0x0d, 0x30, 0x0b, 0x06,
        0x03, 0x55, 0x04, 0x03, 0x0c, 0x04, 0x74, 0x65, 0x73, 0x74, 0x30, 0x59, 0x30, 0x13, 0x06,
        0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01, 0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d,
        0x03, 0x01, 0x07, 0x03, 0x42, 0x00, 0x04, 0xeb, 0x08, 0xef, 0x71, 0x8d, 0xcb, 0xd0, 0x07,
        0x38, 0xfb, 0x8a, 0x15, 0xa5, 0xd6, 0x07, 0xc6, 0x25, 0xae, 0x08, 0xce, 0x4a, 0x31, 0xe0,
        0x00, 0x93, 0x2e, 0x9c, 0x60, 0x5d, 0x6d, 0x4e, 0xc4, 0xf0, 0x4d, 0xa2, 0x4c, 0x05, 0xb4,
        0x27, 0x06, 0x9d, 0x9e, 0x50, 0xb1, 0x38, 0x9c, 0xf9, 0x4a, 0xb1, 0xef, 0xd0, 0x2c, 0xa0,
        0xd3, 0xf7, 0xff, 0x7d, 0x95, 0x08, 0xd9, 0x7c, 0xc2, 0xe3, 0x41, 0xa3, 0x53, 0x30, 0x51,
        0x30, 0x1d, 0x06, 0x03, 0x55, 0x1d, 0x0e, 0x04, 0x16, 0x04, 0x14, 0x28, 0xbe, 0x60, 0x76,
        0x00, 0xaa, 0xfa, 0x3c, 0x48, 0x76, 0xcc, 0x21, 0x96, 0xb7, 0xe3, 0x4b, 0xd4, 0xdb, 0xf5,
        0xd9, 0x30, 0x1f, 0x06, 0x03, 0x55, 0x1d, 0x23, 0x04, 0x18, 0x30, 0x16, 0x80, 0x14, 0x28,
        0xbe, 0x60, 0x76, 0x00, 0xaa, 0xfa, 0x3c, 0x48, 0x76, 0xcc, 0x21, 0x96, 0xb7, 0xe3, 0x4b,
        0xd4, 0xdb, 0xf5, 0xd9, 0x30, 0x0f, 0x06, 0x03, 0x55, 0x1d, 0x13, 0x01, 0x01, 0xff, 0x04,
        0x05, 0x30, 0x03, 0x01, 0x01, 0xff, 0x30, 0x0a, 0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d,
        0x04, 0x03, 0x02, 0x03, 0x48, 0x00, 0x30, 0x45, 0x02, 0x21, 0x00, 0xd5, 0xa7, 0x17, 0xf5,
        0x48, 0x8d, 0xf0, 0x48, 0x4a, 0xd9, 0xa5, 0xc4, 0x60, 0x2b, 0x9e, 0x34, 0x87, 0x24, 0xe1,
        0x12, 0x10, 0xe7, 0xde, 0x6c, 0xcc, 0xb6, 0x67, 0xe4, 0xc9, 0x8c, 0x00, 0xb8, 0x02, 0x20,
        0x27, 0x3c, 0x0a, 0x75, 0x1d, 0xf8, 0xa7, 0xa5, 0xb2, 0x24, 0x5d, 0x55, 0xe5, 0x9e, 0xde,
        0x29, 0xca, 0xb2, 0x05, 0x0c, 0x3f, 0x84, 0x0e, 0xbd, 0x52, 0xff, 0x7e, 0xc9, 0xe1, 0xec,
        0x4a, 0xc6,
    ];

    /// A server configuration from a throwaway key and certificate
    /// (made with `openssl req -x509 -newkey ec`).
    fn test_tls_config() -> Arc<postern_common::tls::rustls::ServerConfig> {
        use postern_common::tls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
        // A P-256 key (PKCS#8) and its self-signed certificate.
        let key = PrivateKeyDer::try_from(TEST_KEY.to_vec()).unwrap();
        let cert = CertificateDer::from(TEST_CERT.to_vec());
        postern_common::tls::rustls::ServerConfig::builder_with_provider(
            postern_common::tls::provider(),
        )
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![cert], key)
        .map(Arc::new)
        .unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn rcpt_waits_for_dns_and_keeps_order() {
        let mut cfg = settings();
        let split = |s: &str| postern_conf::split_list(s);
        cfg.restrictions = Restrictions::new(
            crate::restrictions::parse_list(&split("permit_mynetworks, reject_unauth_destination")),
            crate::restrictions::parse_list(&split("reject_unknown_recipient_domain")),
            CidrList::parse(&["127.0.0.0/8"]).unwrap(),
            split("mx.example"),
            vec![],
        )
        .unwrap();
        let mut s = session_with(cfg, "127.0.0.1");
        let r = send(
            &mut s,
            "MAIL FROM:<a@b>\r\nRCPT TO:<x@gone.example>\r\nRCPT TO:<u@mx.example>\r\nNOOP\r\n",
        );
        assert_eq!(r, ["250 2.1.0 Ok"]);
        assert_eq!(
            s.take_dns_requests(),
            [Query::Domain("gone.example".into())]
        );
        assert!(!s.wants_input());
        s.dns_answer(Query::Domain("gone.example".into()), Answer::NotFound);
        assert_eq!(
            out(&mut s),
            ["450 4.1.2 <x@gone.example>: Recipient address rejected: Domain not found"]
        );
        // The accepted recipient opens the queue file; then the NOOP.
        assert_eq!(opened(&mut s), ["250 2.1.5 Ok", "250 2.0.0 Ok"]);
        // The answer is kept: no second lookup.
        assert_eq!(
            send(&mut s, "RCPT TO:<y@gone.example>\r\n")[0],
            "450 4.1.2 <y@gone.example>: Recipient address rejected: Domain not found"
        );
        assert!(s.take_dns_requests().is_empty());
        assert!(s.stats().contains("rcpt=1/3"), "{}", s.stats());
    }

    #[test]
    fn greeting_waits_for_the_client_name() {
        let mut cfg = settings();
        cfg.peername_lookup = true;
        let mut s = Session::new(Arc::new(cfg), Client::new("192.0.2.1".parse().unwrap()));
        assert_eq!(
            s.take_dns_requests(),
            [Query::Peer("192.0.2.1".parse().unwrap())]
        );
        // Nothing is said, and early input waits.
        assert!(send(&mut s, "HELO c\r\n").is_empty());
        // An answer to a question this session did not ask is ignored.
        s.dns_answer(Query::Peer("192.0.2.9".parse().unwrap()), Answer::TryAgain);
        assert!(out(&mut s).is_empty());
        s.dns_answer(
            Query::Peer("192.0.2.1".parse().unwrap()),
            Answer::Peer(PeerName {
                name: "mail.example".into(),
                name_status: NameStatus::Ok,
                reverse_name: "mail.example".into(),
                reverse_status: NameStatus::Ok,
            }),
        );
        assert_eq!(
            out(&mut s),
            ["220 mx.example ESMTP Postern", "250 mx.example"]
        );
        assert_eq!(s.namaddr(), "mail.example[192.0.2.1]");
    }

    #[test]
    fn greeting_waits_for_dns_without_delay_reject() {
        let mut cfg = settings();
        let split = |s: &str| postern_conf::split_list(s);
        cfg.restrictions.delay_reject = false;
        cfg.restrictions.set_list(
            Stage::Client,
            crate::restrictions::parse_list(&split("reject_rbl_client rbl.example")),
        );
        cfg.restrictions.set_list(
            Stage::Sender,
            crate::restrictions::parse_list(&split("reject_unknown_sender_domain")),
        );
        let cfg = Arc::new(cfg);
        // Listed: the greeting is the refusal.
        let mut s = Session::new(cfg.clone(), Client::new("192.0.2.1".parse().unwrap()));
        assert!(out(&mut s).is_empty());
        assert!(!s.wants_input());
        let q = Query::Rbl("1.2.0.192.rbl.example".into());
        assert_eq!(s.take_dns_requests(), std::slice::from_ref(&q));
        s.dns_answer(q, Answer::Found(vec!["127.0.0.2".parse().unwrap()]));
        assert_eq!(
            out(&mut s),
            ["554 5.7.1 Service unavailable; Client host [192.0.2.1] blocked using rbl.example"]
        );
        assert_eq!(
            send(&mut s, "HELO c\r\n"),
            ["503 5.7.0 Error: access denied for unknown[192.0.2.1]"]
        );
        // Not listed: greeted; the sender's domain is looked up at MAIL.
        let mut s = Session::new(cfg, Client::new("192.0.2.2".parse().unwrap()));
        let q = Query::Rbl("2.2.0.192.rbl.example".into());
        assert_eq!(s.take_dns_requests(), std::slice::from_ref(&q));
        s.dns_answer(q, Answer::NotFound);
        assert_eq!(out(&mut s), ["220 mx.example ESMTP Postern"]);
        assert_eq!(
            send(&mut s, "HELO c\r\nMAIL FROM:<a@gone.example>\r\n"),
            ["250 mx.example"]
        );
        let q = Query::Domain("gone.example".into());
        assert_eq!(s.take_dns_requests(), std::slice::from_ref(&q));
        s.dns_answer(q, Answer::NotFound);
        assert_eq!(
            out(&mut s),
            ["450 4.1.8 <a@gone.example>: Sender address rejected: Domain not found"]
        );
        assert!(s.stats().contains("mail=0/1"), "{}", s.stats());
    }

    #[test]
    fn multiple_recipients_received_has_no_for() {
        let mut s = session();
        send(&mut s, "HELO c\r\nMAIL FROM:<a@b>\r\nRCPT TO:<u@mx.example>\r\nRCPT TO:<v@mx.example>\r\nDATA\r\n");
        s.take_requests();
        opened(&mut s);
        send(&mut s, ".\r\n");
        let (_, content) = requests(&mut s);
        let content = String::from_utf8(content).unwrap();
        assert!(content.starts_with("Received: from c (unknown [127.0.0.1])\n\tby mx.example (Postern) with SMTP id QID1;\n\t"), "{content}");
        assert!(!content.contains("for <"));
    }

    #[test]
    fn smtputf8_parameter_and_addresses() {
        let mut s = session();
        send(&mut s, "EHLO client.example\r\n");
        // A UTF-8 domain needs SMTPUTF8; a UTF-8 local part never did.
        assert_eq!(
            send(&mut s, "MAIL FROM:<a@bücher.example>\r\n"),
            ["501 5.1.7 Bad sender address syntax"]
        );
        assert_eq!(
            send(&mut s, "MAIL FROM:<jörg@b.example>\r\n"),
            ["250 2.1.0 Ok"]
        );
        assert_eq!(
            send(&mut s, "RCPT TO:<u@bücher.example>\r\n"),
            ["501 5.1.3 Bad recipient address syntax"]
        );
        send(&mut s, "RSET\r\n");
        assert_eq!(
            send(&mut s, "MAIL FROM:<jörg@bücher.example> SMTPUTF8\r\n"),
            ["250 2.1.0 Ok"]
        );
        assert_eq!(
            send(&mut s, "RCPT TO:<ü@bü..example>\r\n"),
            ["501 5.1.3 Bad recipient address syntax"]
        );
        assert_eq!(
            send(&mut s, "RCPT TO:<ü@mx.example>\r\n"),
            Vec::<String>::new()
        );
        assert_eq!(opened(&mut s), ["250 2.1.5 Ok"]);
        assert_eq!(
            send(&mut s, "DATA\r\n"),
            ["354 End data with <CR><LF>.<CR><LF>"]
        );
        let reqs = s.take_requests();
        let Some(CleanupRequest::Envelope(m)) = reqs.last() else {
            panic!("{reqs:?}")
        };
        assert_eq!(m.sender, "jörg@bücher.example");
        assert!(m.attrs.contains(&("smtputf8".into(), "requested".into())));
        send(&mut s, "Subject: x\r\n\r\nbody\r\n.\r\n");
        let (_, content) = requests(&mut s);
        let content = String::from_utf8(content).unwrap();
        assert!(content.contains("with UTF8SMTP id QID1"), "{content}");
        // Malformed UTF-8 is refused whatever the parameters.
        let mut s = session();
        s.receive(b"MAIL FROM:<j\xf6rg@b.example> SMTPUTF8\r\n");
        assert_eq!(out(&mut s), ["500 5.5.2 Error: bad UTF-8 syntax"]);
    }

    #[test]
    fn smtputf8_disabled_and_strict() {
        let mut cfg = settings();
        cfg.smtputf8_enable = false;
        let mut s = session_with(cfg, "127.0.0.1");
        let ehlo = send(&mut s, "EHLO client.example\r\n");
        assert!(!ehlo.iter().any(|l| l.contains("SMTPUTF8")), "{ehlo:?}");
        assert_eq!(
            send(&mut s, "MAIL FROM:<a@b.example> SMTPUTF8\r\n"),
            ["555 5.5.4 Unsupported option: SMTPUTF8"]
        );
        let mut cfg = settings();
        cfg.strict_smtputf8 = true;
        let mut s = session_with(cfg, "127.0.0.1");
        send(&mut s, "EHLO client.example\r\n");
        assert_eq!(
            send(&mut s, "MAIL FROM:<jörg@b.example>\r\n"),
            ["553 5.6.7 Must declare SMTPUTF8 to send unicode address"]
        );
        assert_eq!(
            send(&mut s, "MAIL FROM:<a@b.example>\r\n"),
            ["250 2.1.0 Ok"]
        );
        assert_eq!(
            send(&mut s, "RCPT TO:<ü@mx.example>\r\n"),
            ["553 5.6.7 Must declare SMTPUTF8 to send unicode address"]
        );
    }
}
