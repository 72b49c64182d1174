//! STARTTLS (or TLS from the start in wrapper mode), the certificate
//! check the TLS level asks for, and EHLO again over TLS.

use super::session::Session;
use super::{stage, End, Extensions, Stream};
use crate::nexthop::{temporary_dsn, Failure};
use crate::reply::LineReader;
use postern_common::info;
use std::io::{self, Read, Write};
use std::time::Duration;

/// The failure reason of a TLS handshake that did not complete; at level
/// `may` the caller may try the same server again in plaintext.
pub const TLS_HANDSHAKE_FAILURE: &str = "Cannot start TLS: handshake failure";

/// Stands in for the connection while STARTTLS wraps it.
struct Closed;

impl Read for Closed {
    fn read(&mut self, _: &mut [u8]) -> io::Result<usize> {
        Err(io::ErrorKind::NotConnected.into())
    }
}

impl Write for Closed {
    fn write(&mut self, _: &[u8]) -> io::Result<usize> {
        Err(io::ErrorKind::NotConnected.into())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Stream for Closed {
    fn set_timeout(&mut self, _: Duration) -> io::Result<()> {
        Ok(())
    }
}

impl<'c> Session<'_, 'c> {
    /// The TLS handshake over the connection (after 220 to STARTTLS, or
    /// at once in wrapper mode), its log line, and the certificate check
    /// the level asks for.
    pub(super) fn tls_handshake(&mut self, tls: &crate::tls::Client) -> Result<(), End> {
        use crate::tls::Trust;
        // Nothing the server sent before the handshake may count after it.
        self.rd = LineReader::new();
        let sock = std::mem::replace(&mut self.conn, Box::new(Closed));
        if tls.loglevel >= 2 {
            // What Postfix logs before the handshake at level 2 (as far
            // as rustls has it).
            info!("setting up TLS connection to {}", self.peer.relay);
            let list: Vec<&str> = tls
                .profile
                .provider
                .cipher_suites
                .iter()
                .map(|s| postern_common::tls::cipher_name(*s))
                .collect();
            info!(
                "{}: TLS cipher list \"{}\"",
                self.peer.relay,
                list.join(":")
            );
        }
        let est = match tls.handshake(sock, &self.peer.name, &self.peer.relay) {
            Ok(est) => est,
            Err(e) => {
                tls.observed(crate::tls::Observed::HandshakeFailed(e.to_string()));
                match &e {
                    // Postfix's two lines: OpenSSL's return code, then
                    // the library's reason.
                    crate::tls::HandshakeError::Tls(why) => {
                        info!("SSL_connect error to {}: -1", self.peer.relay);
                        postern_common::warning!("TLS library problem: {why}");
                    }
                    other => info!("SSL_connect error to {}: {other}", self.peer.relay),
                }
                return Err(self.try_next(Failure {
                    dsn: "4.7.5".into(),
                    reason: TLS_HANDSHAKE_FAILURE.into(),
                }));
            }
        };
        let stream: Box<dyn Stream + Send + 'c> = Box::new(est.stream);
        self.conn = stream;
        // A new stream over the socket: set its limits anew.
        self.time_limit = None;
        self.encrypted = true;
        self.tls_used = est
            .negotiated
            .as_ref()
            .map(|n| (n.cipher.clone(), n.protocol.clone()));
        let level = tls.policy.level;
        if tls.loglevel >= 2 {
            if est.resumed {
                info!("{}: Reusing old session", self.peer.relay);
            }
            if let Some(summary) = &est.summary {
                info!("{}: {summary}", self.peer.relay);
            }
        }
        tls.observed(crate::tls::Observed::Established(est.trust.clone()));
        let kind = match &est.trust {
            Trust::Verified if level.checks_certificate() => "Verified",
            Trust::Verified | Trust::Trusted => "Trusted",
            Trust::Untrusted(_) => "Untrusted",
        };
        if tls.loglevel >= 1 {
            let what = est
                .negotiated
                .as_ref()
                .map(|n| n.log_summary())
                .unwrap_or_default();
            info!(
                "{kind} TLS connection established to {}: {what}",
                self.peer.relay
            );
        }
        if level.checks_certificate() && est.trust != Trust::Verified {
            // Every level that checks the certificate is one of Postfix's
            // TLS_MUST_MATCH levels (above `encrypt`): an untrusted chain
            // and a name that does not match both defer with its text.
            let detail = match &est.trust {
                Trust::Untrusted(d) => d.clone(),
                _ => format!("certificate does not match {}", tls.names.join(", ")),
            };
            let reason = "Server certificate not verified";
            info!(
                "server certificate verification failed for {}: {detail}",
                self.peer.relay
            );
            // Say nothing more to a server we do not trust.
            return Err(self.try_next(Failure {
                dsn: "4.7.5".into(),
                reason: reason.into(),
            }));
        }
        Ok(())
    }

    /// STARTTLS as the TLS level says, then EHLO again over TLS. Returns
    /// the extensions to use, or how the session ended.
    pub(super) fn start_tls(
        &mut self,
        ext: Extensions,
        ehlo: &str,
        ehlo_stage: &str,
    ) -> Result<Extensions, End> {
        use crate::tls::Level;
        let Some(tls) = self.tls.filter(|t| t.policy.level != Level::None) else {
            return Ok(ext);
        };
        if self.encrypted {
            // Wrapper mode: TLS from the start.
            return Ok(ext);
        }
        let level = tls.policy.level;
        if !ext.starttls {
            tls.observed(crate::tls::Observed::NoStarttls);
            if level.required() {
                let f = Failure {
                    dsn: "4.7.4".into(),
                    reason: format!(
                        "TLS is required, but was not offered by host {}",
                        self.peer.namaddr
                    ),
                };
                self.quit();
                return Err(self.try_next(f));
            }
            return Ok(ext);
        }
        let r = match self.command(Some("STARTTLS")) {
            Ok(r) => r,
            Err(e) => return Err(self.try_next(self.io_failure(&e, stage::STARTTLS))),
        };
        if r.class() != 2 {
            tls.observed(crate::tls::Observed::NoStarttls);
            if !level.required() {
                // Opportunistic: carry on in plaintext.
                return Ok(ext);
            }
            let f = Failure {
                dsn: temporary_dsn(r.dsn()),
                reason: format!(
                    "TLS is required, but host {} refused to start TLS: {}",
                    self.peer.namaddr,
                    r.text()
                ),
            };
            if r.code != 421 {
                self.quit();
            }
            return Err(self.try_next(f));
        }
        self.tls_handshake(tls)?;
        match self.command(Some(ehlo)) {
            Ok(r) if r.class() == 2 => Ok(self.extensions(&r)),
            Ok(r) => {
                let f = self.refused(&r);
                self.quit();
                Err(self.try_next(f))
            }
            Err(e) => Err(self.try_next(self.io_failure(&e, ehlo_stage))),
        }
    }
}
