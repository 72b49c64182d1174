//! The TLS layer of one client connection (STARTTLS, RFC 3207, and
//! `smtpd_tls_wrappermode`), driven by the event loop.
//!
//! rustls does no I/O of its own: [`TlsConn::read`] pulls TLS records
//! from the (non-blocking) socket into rustls and hands back plaintext,
//! [`TlsConn::flush`] pushes what rustls wants to send. mio is
//! edge-triggered, so `read` drains the socket until it would block, and
//! remembers ([`TlsConn::has_plaintext`]) that rustls still holds
//! decrypted bytes the session has not taken (it may not want input
//! while it waits for cleanup).
//!
//! STARTTLS itself is the session's: it answers `220 2.0.0 Ready to start
//! TLS`, drops whatever the client pipelined after the command, and takes
//! no more input; the loop switches the connection to TLS once that reply
//! is entirely on the wire, and tells the session when the handshake is
//! complete ([`TlsConn::take_established`]), at which point the session
//! forgets its earlier state.
//!
//! Until the ClientHello is complete the connection is a rustls
//! `Acceptor`: which of smtpd's configurations serves the client depends
//! on the suites it offers (`ServerTls::config_for`).

use postern_common::tls::rustls::server::{Acceptor, ServerConnection};
use postern_common::tls::{Negotiated, ServerTls};
use std::io::{self, Read, Write};
use std::sync::Arc;

/// Where the handshake is.
enum Stage {
    /// Reading the ClientHello.
    Hello(Acceptor, Arc<ServerTls>),
    /// The configuration chosen: rustls's connection.
    Conn(ServerConnection),
    /// The ClientHello was refused: only the alert (if any) is left to send.
    Refused,
}

pub struct TlsConn {
    stage: Stage,
    /// Bytes to send before any of rustls's: the alert for a refused
    /// ClientHello.
    alert: Vec<u8>,
    /// rustls holds plaintext not yet read.
    plain_pending: bool,
    /// The session has been told that the handshake completed.
    reported: bool,
    /// close_notify queued.
    closing: bool,
    /// What the certificate chosen for this client signs with (for the
    /// log line and Received header).
    server_signature: Option<String>,
    /// The session was resumed from a session ticket.
    ticketed: bool,
    /// What the ticketer did for this connection, not yet logged.
    ticket_events: Vec<postern_common::tls_tickets::TicketEvent>,
    /// The TLS 1.3 session ticket that follows the client's Finished is
    /// held back to leave with the next reply (one write, one segment,
    /// instead of two): the client sends its first command without
    /// waiting for the ticket. Released by any plaintext, close or error.
    hold: bool,
}

/// A reader that notes a short read: the socket had no more bytes at
/// that moment, so the loop need not ask again until the next readiness
/// event (epoll reports every arrival; tokio relies on the same).
pub struct NoteShort<'a, R> {
    pub inner: &'a mut R,
    pub short: bool,
}

impl<R: Read> Read for NoteShort<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        if n < buf.len() {
            self.short = true;
        }
        Ok(n)
    }
}

/// Where reading the ClientHello stands.
enum HelloOutcome {
    /// rustls's connection had it before this call.
    Done,
    /// rustls's connection has it now, and its answer to send.
    Answered,
    /// More bytes are needed.
    Wait,
    Eof,
    /// Refused: the alert is queued.
    Error(String),
}

/// What a read produced.
#[derive(Debug)]
pub enum ReadOutcome {
    Data(usize),
    /// Nothing more until the socket is readable again.
    WouldBlock,
    /// The client closed the connection.
    Eof,
    /// A TLS protocol error (the alert is queued; flush once, then close).
    Error(String),
}

impl TlsConn {
    pub fn new(cfg: Arc<ServerTls>) -> TlsConn {
        TlsConn {
            stage: Stage::Hello(Acceptor::default(), cfg),
            alert: Vec::new(),
            plain_pending: false,
            reported: false,
            closing: false,
            server_signature: None,
            ticketed: false,
            ticket_events: Vec::new(),
            hold: false,
        }
    }

    /// rustls's connection, once the ClientHello has chosen it.
    fn conn(&self) -> Option<&ServerConnection> {
        match &self.stage {
            Stage::Conn(c) => Some(c),
            _ => None,
        }
    }

    pub fn is_handshaking(&self) -> bool {
        self.conn().is_none_or(|c| c.is_handshaking())
    }

    /// Reads the ClientHello; once it is whole, chooses the configuration
    /// and goes on as rustls's connection (which answers it).
    fn read_hello<R: Read>(&mut self, sock: &mut R, sock_readable: &mut bool) -> HelloOutcome {
        let Stage::Hello(acceptor, tls) = &mut self.stage else {
            return HelloOutcome::Done;
        };
        loop {
            match acceptor.accept() {
                Ok(Some(accepted)) => {
                    let cfg = tls
                        .config_for(accepted.client_hello().cipher_suites())
                        .clone();
                    let made = accepted.into_connection(cfg);
                    // The certificate choice (and any ticket decrypted)
                    // happened on this thread, in into_connection.
                    self.note_handshake_events();
                    return match made {
                        Ok(mut conn) => {
                            // Replies are small and the loop stops reading
                            // a client whose output backs up, so rustls
                            // need not limit what it buffers.
                            conn.set_buffer_limit(None);
                            self.stage = Stage::Conn(conn);
                            HelloOutcome::Answered
                        }
                        Err((e, alert)) => self.refuse(e, alert),
                    };
                }
                Ok(None) => {}
                Err((e, alert)) => return self.refuse(e, alert),
            }
            if !*sock_readable {
                return HelloOutcome::Wait;
            }
            match acceptor.read_tls(sock) {
                Ok(0) => return HelloOutcome::Eof,
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    *sock_readable = false;
                    return HelloOutcome::Wait;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return HelloOutcome::Eof,
            }
        }
    }

    fn refuse(
        &mut self,
        e: postern_common::tls::rustls::Error,
        mut alert: postern_common::tls::rustls::server::AcceptedAlert,
    ) -> HelloOutcome {
        let _ = alert.write_all(&mut self.alert);
        self.stage = Stage::Refused;
        HelloOutcome::Error(e.to_string())
    }

    /// Decrypted bytes wait in rustls.
    pub fn has_plaintext(&self) -> bool {
        self.plain_pending
    }

    /// Reads plaintext into `buf`, taking TLS records from `sock` as
    /// needed. `sock_readable` is the loop's "the socket may have bytes"
    /// flag: cleared when the socket would block.
    pub fn read<R: Read>(
        &mut self,
        sock: &mut R,
        buf: &mut [u8],
        sock_readable: &mut bool,
    ) -> ReadOutcome {
        match self.read_hello(sock, sock_readable) {
            HelloOutcome::Done => {}
            // Handshake records only, as below: the caller flushes the
            // answer and comes back when the client has more.
            HelloOutcome::Answered | HelloOutcome::Wait => return ReadOutcome::WouldBlock,
            HelloOutcome::Eof => return ReadOutcome::Eof,
            HelloOutcome::Error(e) => return ReadOutcome::Error(e),
        }
        loop {
            let Stage::Conn(conn) = &mut self.stage else {
                return ReadOutcome::Eof;
            };
            match conn.reader().read(buf) {
                Ok(0) => return ReadOutcome::Eof,
                Ok(n) => return ReadOutcome::Data(n),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => self.plain_pending = false,
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return ReadOutcome::Eof,
                Err(e) => return ReadOutcome::Error(e.to_string()),
            }
            if !*sock_readable {
                return ReadOutcome::WouldBlock;
            }
            match conn.read_tls(sock) {
                Ok(0) => return ReadOutcome::Eof,
                Ok(_) => match self.process_packets() {
                    Ok(st) => {
                        self.plain_pending = st.plaintext_bytes_to_read() > 0;
                        if st.peer_has_closed() && !self.plain_pending {
                            return ReadOutcome::Eof;
                        }
                        if !self.plain_pending {
                            // Handshake records only: the caller flushes
                            // our answer and comes back.
                            return ReadOutcome::WouldBlock;
                        }
                    }
                    Err(e) => {
                        // The alert goes out, with anything held.
                        self.hold = false;
                        return ReadOutcome::Error(e.to_string());
                    }
                },
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    *sock_readable = false;
                    return ReadOutcome::WouldBlock;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return ReadOutcome::Eof,
            }
        }
    }

    /// rustls's `process_new_packets`, keeping what the handshake's
    /// callbacks noted on this thread ([`TlsConn::note_handshake_events`]).
    fn process_packets(
        &mut self,
    ) -> Result<postern_common::tls::rustls::IoState, postern_common::tls::rustls::Error> {
        let Stage::Conn(conn) = &mut self.stage else {
            return Err(postern_common::tls::rustls::Error::HandshakeNotComplete);
        };
        postern_common::tls_tickets::allow_issuing(!self.ticketed);
        let was_handshaking = conn.is_handshaking();
        let processed = conn.process_new_packets();
        // TLS 1.3 only: in 1.2 what follows the client's Finished is the
        // server's own Finished, which the client waits for.
        if was_handshaking
            && !conn.is_handshaking()
            && processed.is_ok()
            && conn.wants_write()
            && conn.protocol_version()
                == Some(postern_common::tls::rustls::ProtocolVersion::TLSv1_3)
        {
            self.hold = true;
        }
        self.note_handshake_events();
        processed
    }

    /// Keeps the certificate choice and the ticketer's work that the
    /// packets just processed led to (noted on the loop's thread, taken
    /// here before another connection's handshake can run).
    fn note_handshake_events(&mut self) {
        let chosen = postern_common::tls::take_server_signature();
        if self.server_signature.is_none() {
            self.server_signature = chosen;
        }
        use postern_common::tls_tickets::{take_ticket_events, TicketEvent};
        let events = take_ticket_events();
        self.ticketed |= events
            .iter()
            .any(|e| matches!(e, TicketEvent::Decrypted(_)));
        self.ticket_events.extend(events);
    }

    /// Hands plaintext to rustls (all of it: no buffer limit).
    pub fn write_plain(&mut self, data: &[u8]) -> io::Result<usize> {
        self.hold = false;
        match &mut self.stage {
            Stage::Conn(conn) => conn.writer().write(data),
            _ => Err(io::ErrorKind::NotConnected.into()),
        }
    }

    /// Whether there are records to send now (not a held ticket).
    pub fn wants_write(&self) -> bool {
        !self.alert.is_empty() || (!self.hold && self.conn().is_some_and(|c| c.wants_write()))
    }

    /// Sends what there is until done or the socket is full; Ok(bytes).
    pub fn flush<W: Write>(&mut self, sock: &mut W) -> io::Result<usize> {
        let mut n = 0;
        while !self.alert.is_empty() {
            match sock.write(&self.alert) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(k) => {
                    self.alert.drain(..k);
                    n += k;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(n),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        while self.wants_write() {
            let Stage::Conn(conn) = &mut self.stage else {
                break;
            };
            match conn.write_tls(sock) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(k) => n += k,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(n)
    }

    /// What was negotiated, once, when the handshake has completed.
    pub fn take_established(&mut self) -> Option<Negotiated> {
        if self.reported || self.is_handshaking() {
            return None;
        }
        self.reported = true;
        let mut n = Negotiated::of(self.conn()?)?;
        if n.kx.is_some() {
            // Postfix reports the signature for TLS 1.3 only.
            n.server_signature = self.server_signature.take();
        }
        Some(n)
    }

    /// What the ticketer did for this connection since the last call.
    pub fn take_ticket_events(&mut self) -> Vec<postern_common::tls_tickets::TicketEvent> {
        std::mem::take(&mut self.ticket_events)
    }

    /// How the completed handshake resumed a session: `None` (a full
    /// handshake), `Some(true)` from a session ticket, `Some(false)` from
    /// the session cache.
    pub fn resumed(&self) -> Option<bool> {
        use postern_common::tls::rustls::HandshakeKind;
        let resumed = self
            .conn()
            .is_some_and(|c| c.handshake_kind() == Some(HandshakeKind::Resumed));
        resumed.then_some(self.ticketed)
    }

    /// Queues close_notify (once); true if it was queued now.
    pub fn close(&mut self) -> bool {
        if self.closing {
            return false;
        }
        self.closing = true;
        self.hold = false;
        match &mut self.stage {
            Stage::Conn(conn) => conn.send_close_notify(),
            // Nothing to close before the ClientHello is answered.
            _ => return false,
        }
        true
    }
}
