//! STARTTLS (RFC 3207) and `smtpd_tls_wrappermode`: the session asks
//! the loop to start TLS, and forgets what it learned in plaintext once
//! the handshake is done.

use super::{Done, Session, State};
use crate::settings::TlsLevel;
use postern_common::info;
use postern_common::smtp_command::Token;
use postern_common::tls::Negotiated;

impl Session {
    /// Whether the client's STARTTLS was accepted: once the `220` is
    /// sent, the loop starts TLS and calls [`Session::tls_started`].
    pub fn starttls_requested(&self) -> bool {
        self.starttls_pending
    }

    /// The loop switched the connection to TLS (handshake under way).
    pub fn tls_started(&mut self) {
        self.starttls_pending = false;
        self.tls_setting_up();
    }

    /// At `smtpd_tls_loglevel` 2, the lines Postfix logs before a
    /// handshake (what rustls has of them): the connection and the
    /// cipher list on offer, in the server's order.
    pub fn tls_setting_up(&self) {
        if self.cfg.tls_loglevel < 2 {
            return;
        }
        info!("setting up TLS connection from {}", self.namaddr);
        if let Some(c) = &self.cfg.tls {
            let list: Vec<&str> = c
                .config
                .crypto_provider()
                .cipher_suites
                .iter()
                .map(|s| postern_common::tls::cipher_name(*s))
                .collect();
            info!("{}: TLS cipher list \"{}\"", self.namaddr, list.join(":"));
        }
    }

    /// At `smtpd_tls_loglevel` 2, Postfix's line for a session ticket
    /// issued or decrypted.
    pub fn tls_ticket(&self, e: postern_common::tls_tickets::TicketEvent) {
        use postern_common::tls_tickets::TicketEvent;
        if self.cfg.tls_loglevel < 2 {
            return;
        }
        let (what, expiration) = match e {
            TicketEvent::Issued(t) => ("Issuing", t),
            TicketEvent::Decrypted(t) => ("Decrypting", t),
        };
        info!(
            "{}: {what} session ticket, key expiration: {expiration}",
            self.namaddr
        );
    }

    /// How the handshake that just completed began: at
    /// `smtpd_tls_loglevel` 2, Postfix's line for a resumed session.
    pub fn tls_resumed(&self, resumed: Option<bool>) {
        if self.cfg.tls_loglevel < 2 {
            return;
        }
        match resumed {
            Some(true) => info!(
                "{}: Reusing old session (RFC 5077 session ticket)",
                self.namaddr
            ),
            Some(false) => info!("{}: Reusing old session", self.namaddr),
            None => {}
        }
    }

    /// The TLS handshake is complete. As RFC 3207 demands, the session
    /// forgets everything it learned before (HELO, transaction, SASL).
    pub fn tls_established(&mut self, n: Negotiated) {
        self.client_cert = self.cfg.ccert.as_ref().and_then(|c| {
            postern_common::tls_ccert::client_cert(&n.peer_certs, c.digest, c.trust.as_ref())
        });
        if self.cfg.tls_loglevel >= 1 {
            // As Postfix: whether the client showed a certificate, and
            // whether it chains to smtpd_tls_CAfile.
            let how = match &self.client_cert {
                None => "Anonymous",
                Some(c) if c.trusted => "Trusted",
                Some(_) => "Untrusted",
            };
            info!(
                "{how} TLS connection established from {}: {}",
                self.namaddr,
                n.log_summary()
            );
        }
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

    pub(super) fn starttls_offered(&self) -> bool {
        self.cfg.tls_level != TlsLevel::None
            && self.tls.is_none()
            && !self.cfg.tls_wrappermode
            && !self.discarded("starttls")
    }

    pub(super) fn starttls(&mut self, args: &[Token]) -> Done {
        if args.len() != 1 {
            return self.fail("501 5.5.4 Syntax: STARTTLS");
        }
        if self.tls.is_some() {
            return self.fail("554 5.5.1 Error: TLS already active");
        }
        if !self.starttls_offered() {
            return self.fail("502 5.5.1 Error: command not implemented");
        }
        if self.cfg.tls.is_none() {
            return self.fail("454 4.7.0 TLS not available due to local problem");
        }
        self.reply("220 2.0.0 Ready to start TLS");
        self.starttls_pending = true;
        Done::Ok
    }
}
