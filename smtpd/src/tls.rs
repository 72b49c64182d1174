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

use postern_common::tls::rustls::{ServerConfig, ServerConnection};
use postern_common::tls::Negotiated;
use std::io::{self, Read, Write};
use std::sync::Arc;

pub struct TlsConn {
    conn: ServerConnection,
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
    pub fn new(cfg: Arc<ServerConfig>) -> Result<TlsConn, String> {
        let mut conn = ServerConnection::new(cfg).map_err(|e| e.to_string())?;
        // Replies are small and the loop stops reading a client whose
        // output backs up, so rustls need not limit what it buffers.
        conn.set_buffer_limit(None);
        Ok(TlsConn {
            conn,
            plain_pending: false,
            reported: false,
            closing: false,
            server_signature: None,
            ticketed: false,
            ticket_events: Vec::new(),
            hold: false,
        })
    }

    pub fn is_handshaking(&self) -> bool {
        self.conn.is_handshaking()
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
        loop {
            match self.conn.reader().read(buf) {
                Ok(0) => return ReadOutcome::Eof,
                Ok(n) => return ReadOutcome::Data(n),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => self.plain_pending = false,
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return ReadOutcome::Eof,
                Err(e) => return ReadOutcome::Error(e.to_string()),
            }
            if !*sock_readable {
                return ReadOutcome::WouldBlock;
            }
            match self.conn.read_tls(sock) {
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

    /// rustls's `process_new_packets`, keeping the certificate choice
    /// that a ClientHello among the packets led to (taken here, on the
    /// loop's thread, before another connection's handshake can run).
    fn process_packets(
        &mut self,
    ) -> Result<postern_common::tls::rustls::IoState, postern_common::tls::rustls::Error> {
        postern_common::tls_tickets::allow_issuing(!self.ticketed);
        let was_handshaking = self.conn.is_handshaking();
        let processed = self.conn.process_new_packets();
        // TLS 1.3 only: in 1.2 what follows the client's Finished is the
        // server's own Finished, which the client waits for.
        if was_handshaking
            && !self.conn.is_handshaking()
            && processed.is_ok()
            && self.conn.wants_write()
            && self.conn.protocol_version()
                == Some(postern_common::tls::rustls::ProtocolVersion::TLSv1_3)
        {
            self.hold = true;
        }
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
        processed
    }

    /// Hands plaintext to rustls (all of it: no buffer limit).
    pub fn write_plain(&mut self, data: &[u8]) -> io::Result<usize> {
        self.hold = false;
        self.conn.writer().write(data)
    }

    /// Whether rustls has records to send now (not a held ticket).
    pub fn wants_write(&self) -> bool {
        !self.hold && self.conn.wants_write()
    }

    /// Sends what rustls has until done or the socket is full; Ok(bytes).
    pub fn flush<W: Write>(&mut self, sock: &mut W) -> io::Result<usize> {
        let mut n = 0;
        while self.wants_write() {
            match self.conn.write_tls(sock) {
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
        if self.reported || self.conn.is_handshaking() {
            return None;
        }
        self.reported = true;
        let mut n = Negotiated::of(&self.conn)?;
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
        (self.conn.handshake_kind() == Some(HandshakeKind::Resumed)).then_some(self.ticketed)
    }

    /// Queues close_notify (once); true if it was queued now.
    pub fn close(&mut self) -> bool {
        if self.closing {
            return false;
        }
        self.closing = true;
        self.hold = false;
        self.conn.send_close_notify();
        true
    }
}
