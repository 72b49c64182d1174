//! The client side of STARTTLS: security levels, per-destination policy,
//! certificate checks, and the TLS stream.
//!
//! Levels, as Postfix's `smtp_tls_security_level` (and the level of an
//! `smtp_tls_policy_maps` entry, looked up by the next hop as given —
//! `[host]:port`, `domain` — then by its bare host or domain, then by its
//! parent domains as `.parent`):
//! - `none`: never STARTTLS;
//! - `may`: STARTTLS when offered, any certificate accepted; plaintext
//!   when not offered or refused. A failed handshake defers ("Cannot start
//!   TLS: handshake failure"); a later attempt, once the message has waited
//!   `minimal_backoff_time`, reconnects in plaintext (Postfix's rule);
//! - `encrypt`: STARTTLS required, any certificate accepted;
//! - `verify`, `secure`: STARTTLS required and the certificate must chain
//!   to a trusted root (`smtp_tls_CAfile`, `smtp_tls_CApath`, else the
//!   system bundle) and match a name: `verify` the server's host name (MX
//!   host or next-hop host), `secure` the next-hop domain or a subdomain
//!   of it (Postfix's `nexthop, dot-nexthop`); a policy entry's
//!   `match=name1:name2` (with `hostname`, `nexthop`, `dot-nexthop` as
//!   words, and `.domain` for any subdomain) overrides.
//!
//! With `smtp_tls_wrappermode = yes` the handshake comes first, before the
//! server's greeting (SMTPS, port 465), at level `encrypt` or above.
//!
//! - `dane`, `dane-only`: decided per server from DNSSEC-validated DNS
//!   answers ([`crate::dane`]); a server with usable TLSA records gets
//!   mandatory TLS and its certificate must match them
//!   ([`crate::tls_dane`]); otherwise `may` (`dane-only`: no delivery).
//!
//! The certificate is checked by [`Recorder`], a rustls verifier that
//! accepts every certificate during the handshake (signatures are still
//! verified) but records how far it could be trusted; the level then
//! decides. The result is logged as Postfix does (`Verified`, `Trusted` or
//! `Untrusted TLS connection established to HOST[ADDR]:PORT: TLSv1.3 with
//! cipher ...`) when `smtp_tls_loglevel` is 1 or more.

use postern_common::tls::{provider, rustls, Negotiated};
use postern_common::warning;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{
    CertificateError, ClientConfig, ClientConnection, DigitallySignedStruct, RootCertStore,
    SignatureScheme,
};
use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// `smtp_tls_security_level` values Postern implements.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    None,
    May,
    Encrypt,
    /// `dane`: per server, as its DNSSEC-validated TLSA records say
    /// (`crate::dane`); a session at this level has usable records to
    /// authenticate the server with ([`Client::dane`]).
    Dane,
    /// `dane-only`: as `dane`, but a server without usable TLSA records
    /// gets no mail.
    DaneOnly,
    Verify,
    Secure,
}

impl Level {
    /// Parses a level name; "" is `none`.
    pub fn parse(s: &str) -> Option<Level> {
        Some(match s.trim().to_ascii_lowercase().as_str() {
            "" | "none" => Level::None,
            "may" => Level::May,
            "encrypt" => Level::Encrypt,
            "dane" => Level::Dane,
            "dane-only" => Level::DaneOnly,
            "verify" => Level::Verify,
            "secure" => Level::Secure,
            _ => return None,
        })
    }

    pub fn required(self) -> bool {
        self >= Level::Encrypt
    }

    pub fn checks_certificate(self) -> bool {
        self >= Level::Dane
    }

    /// `dane` or `dane-only`: decided per server from DNSSEC answers.
    pub fn is_dane(self) -> bool {
        matches!(self, Level::Dane | Level::DaneOnly)
    }

    /// The level's name in main.cf.
    pub fn name(self) -> &'static str {
        match self {
            Level::None => "none",
            Level::May => "may",
            Level::Encrypt => "encrypt",
            Level::Dane => "dane",
            Level::DaneOnly => "dane-only",
            Level::Verify => "verify",
            Level::Secure => "secure",
        }
    }
}

/// The TLS policy of one destination.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    pub level: Level,
    /// `match=` names (lower case); empty: the level's default.
    pub matches: Vec<String>,
}

impl Policy {
    /// Parses a policy table value: `LEVEL [match=a:b] [other=...]`.
    pub fn parse(v: &str) -> Result<Policy, String> {
        let mut words = v.split_whitespace();
        let first = words.next().unwrap_or("");
        let level =
            Level::parse(first).ok_or_else(|| format!("invalid TLS security level \"{first}\""))?;
        let mut matches = Vec::new();
        for w in words {
            if let Some(m) = w.strip_prefix("match=") {
                matches.extend(
                    m.split(':')
                        .filter(|x| !x.is_empty())
                        .map(|x| x.to_ascii_lowercase()),
                );
            }
        }
        Ok(Policy { level, matches })
    }

    /// Whether a session under this policy has authenticated TLS or none
    /// at all (RFC 8689's condition for a REQUIRETLS message): the
    /// server's certificate is checked against its TLSA records (`dane`,
    /// `dane-only`, a level a server keeps only with usable records) or
    /// against trusted roots and the expected names (`verify`, `secure`).
    /// A session at such a level that did not verify the server never
    /// gets as far as MAIL FROM. A policy that MTA-STS `enforce` sets
    /// counts here too once that policy is one of these levels.
    pub fn authenticated(&self) -> bool {
        self.level.checks_certificate()
    }

    /// The names a certificate must match for this session: `host` is the
    /// server's name, `nexthop` the destination's host or domain. Names
    /// that start with a dot stand for any subdomain.
    pub fn names(&self, host: &str, nexthop: &str) -> Vec<String> {
        let words: Vec<String> = if self.matches.is_empty() {
            match self.level {
                Level::Secure => vec!["nexthop".into(), "dot-nexthop".into()],
                // RFC 7672 section 3.2.3: the TLSA base domain (the
                // server's name) and the next-hop domain, for DANE-TA.
                Level::Dane | Level::DaneOnly => vec!["hostname".into(), "nexthop".into()],
                _ => vec!["hostname".into()],
            }
        } else {
            self.matches.clone()
        };
        let mut out: Vec<String> = Vec::new();
        for w in words {
            let name = match w.as_str() {
                "hostname" => host.to_string(),
                "nexthop" => nexthop.to_string(),
                "dot-nexthop" if !nexthop.is_empty() => format!(".{nexthop}"),
                "dot-nexthop" => continue,
                other => other.to_string(),
            };
            let name = name.trim_end_matches('.').to_ascii_lowercase();
            if !name.is_empty() && name != "." && !out.contains(&name) {
                out.push(name);
            }
        }
        out
    }
}

/// How far a server certificate could be trusted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Trust {
    /// Chain not trusted (the reason, for the log).
    Untrusted(String),
    /// Chain trusted, no name matched.
    Trusted,
    /// Chain trusted and a name matched.
    Verified,
}

/// Trust anchors, read once per process.
pub struct Roots {
    verifier: Option<Arc<WebPkiServerVerifier>>,
    provider: Arc<CryptoProvider>,
}

impl Roots {
    /// Anchors from a store made elsewhere (MTA-STS's WebPKI roots:
    /// `postern_common::https::web_roots`).
    pub fn from_store(store: RootCertStore) -> Roots {
        let provider = provider();
        let verifier = if store.is_empty() {
            None
        } else {
            WebPkiServerVerifier::builder_with_provider(Arc::new(store), provider.clone())
                .build()
                .ok()
        };
        Roots { verifier, provider }
    }

    /// From `smtp_tls_CAfile`/`smtp_tls_CApath`, else the system bundle.
    pub fn load(ca_file: &str, ca_path: &str) -> Roots {
        use postern_common::https;
        let mut files = https::ca_files(ca_file, ca_path);
        if files.is_empty() {
            files.push(https::SYSTEM_BUNDLE.into());
        }
        Roots::from_store(https::root_store(&files, &mut |f, e| {
            warning!("cannot load CA certificates from {f}: {e}")
        }))
    }
}

/// The verifier of a server's sessions: accepts the handshake, records
/// [`Trust`] for the thread whose handshake it checked (one verifier
/// serves every session with the server that may resume another: rustls
/// resumes only under the verifier that made the session).
#[derive(Debug)]
pub struct Recorder {
    verifier: Option<Arc<WebPkiServerVerifier>>,
    /// DANE: the usable TLSA records that authenticate the server
    /// instead of the trust anchors (`crate::tls_dane`).
    dane: Option<Arc<Vec<postern_common::dane::Tlsa>>>,
    provider: Arc<CryptoProvider>,
    names: Vec<String>,
    result: Mutex<HashMap<std::thread::ThreadId, Checked>>,
}

/// What the check of a server certificate found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checked {
    pub trust: Trust,
    /// The certificate as Postfix logs it at level 2
    /// (`postern_common::tls::certificate_summary`).
    pub summary: Option<String>,
}

impl Recorder {
    fn check(&self, ee: &CertificateDer<'_>, inter: &[CertificateDer<'_>], now: UnixTime) -> Trust {
        if let Some(records) = &self.dane {
            return crate::tls_dane::check(records, &self.names, &self.provider, ee, inter, now);
        }
        let Some(v) = &self.verifier else {
            return Trust::Untrusted("no trust anchors".into());
        };
        let mut names: Vec<ServerName<'static>> = self
            .names
            .iter()
            .filter(|n| !n.starts_with('.'))
            .filter_map(|n| ServerName::try_from(n.clone()).ok())
            .collect();
        let suffixes: Vec<&str> = self
            .names
            .iter()
            .filter(|n| n.starts_with('.'))
            .map(String::as_str)
            .collect();
        // With no exact name to match, a name no certificate has still
        // tells whether the chain is trusted.
        let probe = names.is_empty();
        if probe {
            names.push(ServerName::try_from("invalid.invalid").expect("valid name"));
        }
        let mut trust = Trust::Untrusted("unknown".into());
        for n in &names {
            match v.verify_server_cert(ee, inter, n, &[], now) {
                Ok(_) if !probe => return Trust::Verified,
                Ok(_) => trust = Trust::Trusted,
                Err(rustls::Error::InvalidCertificate(
                    CertificateError::NotValidForName
                    | CertificateError::NotValidForNameContext { .. },
                )) => trust = Trust::Trusted,
                Err(e) => return Trust::Untrusted(describe(&e)),
            }
        }
        if trust == Trust::Trusted && !suffixes.is_empty() {
            // dot-nexthop: a DNS name of the (trusted) certificate that is
            // a subdomain of the next hop, as Postfix matches it.
            if let Ok(cert) = webpki::EndEntityCert::try_from(ee) {
                let hit = cert.valid_dns_names().any(|d| {
                    let d = d.trim_end_matches('.').to_ascii_lowercase();
                    suffixes
                        .iter()
                        .any(|s| d.ends_with(*s) && d.len() > s.len())
                });
                if hit {
                    return Trust::Verified;
                }
            }
        }
        trust
    }

    /// What this thread's last handshake found (once).
    pub fn checked(&self) -> Option<Checked> {
        self.result
            .lock()
            .ok()
            .and_then(|mut g| g.remove(&std::thread::current().id()))
    }
}

fn describe(e: &rustls::Error) -> String {
    match e {
        rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer) => {
            "untrusted issuer".into()
        }
        rustls::Error::InvalidCertificate(CertificateError::Expired)
        | rustls::Error::InvalidCertificate(CertificateError::ExpiredContext { .. }) => {
            "certificate has expired".into()
        }
        rustls::Error::InvalidCertificate(c) => format!("{c:?}"),
        other => other.to_string(),
    }
}

impl ServerCertVerifier for Recorder {
    fn verify_server_cert(
        &self,
        ee: &CertificateDer<'_>,
        inter: &[CertificateDer<'_>],
        _name: &ServerName<'_>,
        _ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let checked = Checked {
            trust: self.check(ee, inter, now),
            summary: postern_common::tls::certificate_summary(ee.as_ref()),
        };
        if let Ok(mut g) = self.result.lock() {
            g.insert(std::thread::current().id(), checked);
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// What a session needs to start TLS.
#[derive(Clone)]
pub struct Client {
    pub policy: Policy,
    /// Names the certificate must match (for `verify`/`secure`).
    pub names: Vec<String>,
    pub roots: Arc<Roots>,
    /// `smtp_tls_loglevel`.
    pub loglevel: u32,
    /// `smtp_tls_session_cache_timeout` in seconds: how long a session is
    /// resumed with the same server; 0: never.
    pub session_cache_timeout: u64,
    /// `smtp_tls_wrappermode`: TLS from the first byte (SMTPS, port 465),
    /// no STARTTLS.
    pub wrapper: bool,
    /// Protocols and cipher suites (`smtp_tls_protocols`, `smtp_tls_ciphers`
    /// or their `mandatory` forms, by the level).
    pub profile: Arc<postern_common::tls::Profile>,
    /// At level `dane`/`dane-only`: the server's usable TLSA records,
    /// which alone decide whether its certificate is verified.
    pub dane: Option<Arc<Vec<postern_common::dane::Tlsa>>>,
    /// Where the session says how its TLS went (for MTA-STS `testing`
    /// and TLS-RPT); None: nobody asks.
    pub observe: Option<Arc<Mutex<Option<Observed>>>>,
}

/// How a session's TLS went, as TLS-RPT (RFC 8460) tells results apart.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Observed {
    /// The server did not offer STARTTLS, or refused it.
    NoStarttls,
    /// The handshake failed (the reason).
    HandshakeFailed(String),
    /// A handshake, and how far the certificate was trusted.
    Established(Trust),
}

impl Client {
    /// Tells [`Client::observe`] what happened.
    pub fn observed(&self, what: Observed) {
        if let Some(o) = &self.observe {
            if let Ok(mut g) = o.lock() {
                *g = Some(what);
            }
        }
    }
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("policy", &self.policy)
            .field("names", &self.names)
            .field("dane", &self.dane)
            .finish()
    }
}

/// The TLS stream over a session's connection.
pub struct TlsStream<S: crate::client::Stream> {
    pub inner: rustls::StreamOwned<ClientConnection, S>,
}

impl<S: crate::client::Stream> Read for TlsStream<S> {
    /// As rustls's `Stream` reads (pending writes first, then TLS records
    /// until there is plaintext, the end, or an error), with one step
    /// more: a read that brought records but no data (an OpenSSL server
    /// sends its TLS 1.3 session tickets right after the handshake, in a
    /// write of their own) is acknowledged at once before the next. The
    /// server's reply to EHLO waited behind the tickets (Nagle) for that
    /// ACK: 40 ms per delivery to Postfix over TLS.
    fn read(&mut self, b: &mut [u8]) -> io::Result<usize> {
        let s = &mut self.inner;
        let mut reads = 0;
        loop {
            match s.conn.reader().read(b) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                done => return done,
            }
            if reads > 0 {
                s.sock.ack_now();
            }
            let (read, written) = s.conn.complete_io(&mut s.sock)?;
            if read == 0 && written == 0 {
                // Nothing more to come (complete_io reads until it has
                // something): whatever the reader says now is final.
                return match s.conn.reader().read(b) {
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        Err(io::ErrorKind::UnexpectedEof.into())
                    }
                    done => done,
                };
            }
            // Records came in (a write alone, of a queued flight, is no
            // reason to acknowledge).
            reads += usize::from(read > 0);
        }
    }
}

impl<S: crate::client::Stream> Write for TlsStream<S> {
    /// The plaintext and whatever TLS records wait before it (the
    /// client's Finished after [`Client::handshake`]) in one write.
    fn write(&mut self, b: &[u8]) -> io::Result<usize> {
        let s = &mut self.inner;
        if s.conn.is_handshaking() {
            return s.write(b);
        }
        let n = s.conn.writer().write(b)?;
        while s.conn.wants_write() {
            match s.conn.write_tls(&mut s.sock) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

impl<S: crate::client::Stream> crate::client::Stream for TlsStream<S> {
    fn set_timeout(&mut self, t: Duration) -> io::Result<()> {
        self.inner.sock.set_timeout(t)
    }
}

/// Why a handshake failed, as Postfix tells the cases apart in its
/// `SSL_connect error to ...` line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HandshakeError {
    /// TLS said no (logged with `TLS library problem: REASON`).
    Tls(String),
    /// The server closed the connection.
    Lost,
    /// A system error (a timeout).
    System(String),
}

impl std::fmt::Display for HandshakeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            HandshakeError::Tls(e) | HandshakeError::System(e) => f.write_str(e),
            HandshakeError::Lost => f.write_str("lost connection"),
        }
    }
}

/// Runs the handshake until the client is done, leaving its last
/// flight (Finished) queued: the first write of the session sends it
/// with the first command ([`TlsStream`]), and a first read flushes it
/// (rustls's `Stream`). Errors as rustls's `complete_io` gives them: a
/// TLS error inside an `InvalidData` error, its alert sent.
fn drive_handshake<S: Read + Write>(conn: &mut ClientConnection, sock: &mut S) -> io::Result<()> {
    while conn.is_handshaking() {
        while conn.wants_write() {
            match conn.write_tls(sock) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        match conn.read_tls(sock) {
            Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
        if let Err(e) = conn.process_new_packets() {
            // The alert rustls queued goes out, once.
            let _ = conn.write_tls(sock);
            return Err(io::Error::new(io::ErrorKind::InvalidData, e));
        }
    }
    Ok(())
}

/// A finished handshake.
pub struct Established<S: crate::client::Stream> {
    pub stream: TlsStream<S>,
    pub trust: Trust,
    /// The server certificate as Postfix logs it at level 2.
    pub summary: Option<String>,
    pub negotiated: Option<Negotiated>,
    /// The session was resumed (no certificate was sent).
    pub resumed: bool,
}

impl Client {
    /// Runs the handshake over `sock` (the server said 220 to STARTTLS)
    /// with `host`, reached as `relay` (`HOST[ADDR]:PORT`), resuming the
    /// last session with it when there is one ([`Resumable`]).
    pub fn handshake<S: crate::client::Stream>(
        &self,
        mut sock: S,
        host: &str,
        relay: &str,
    ) -> Result<Established<S>, HandshakeError> {
        // One configuration (verifier included) per server and policy:
        // rustls resumes a session only under the configuration's
        // verifier and client-certificate resolver that made it.
        let (config, recorder, resumable) =
            match self.resumable(relay).map_err(HandshakeError::Tls)? {
                Some(r) => (r.config.clone(), r.recorder.clone(), Some(r)),
                None => {
                    let recorder = self.recorder();
                    let config = self
                        .config(recorder.clone(), None)
                        .map_err(HandshakeError::Tls)?;
                    (config, recorder, None)
                }
            };
        let name = ServerName::try_from(host.to_string())
            .or_else(|_| ServerName::try_from("localhost"))
            .map_err(|e| HandshakeError::Tls(e.to_string()))?;
        let mut conn = ClientConnection::new(config, name.to_owned())
            .map_err(|e| HandshakeError::Tls(e.to_string()))?;
        if let Err(e) = drive_handshake(&mut conn, &mut sock) {
            return Err(
                match e.get_ref().and_then(|x| x.downcast_ref::<rustls::Error>()) {
                    Some(t) => HandshakeError::Tls(t.to_string()),
                    None if matches!(
                        e.kind(),
                        io::ErrorKind::UnexpectedEof
                            | io::ErrorKind::ConnectionReset
                            | io::ErrorKind::BrokenPipe
                    ) =>
                    {
                        HandshakeError::Lost
                    }
                    None => HandshakeError::System(e.to_string()),
                },
            );
        }
        let negotiated = Negotiated::of(&conn);
        let resumed = conn.handshake_kind() == Some(rustls::HandshakeKind::Resumed);
        let checked = match (&resumable, recorder.checked()) {
            // No certificate in a resumed session: it is the one the
            // session was made with, checked then under the same policy.
            (Some(r), None) if resumed => r.checked.lock().ok().and_then(|t| t.clone()),
            (_, t) => t,
        }
        .unwrap_or(Checked {
            trust: Trust::Untrusted("no certificate".into()),
            summary: None,
        });
        if let (Some(r), false) = (&resumable, resumed) {
            if let Ok(mut t) = r.checked.lock() {
                *t = Some(checked.clone());
            }
        }
        Ok(Established {
            stream: TlsStream {
                inner: rustls::StreamOwned::new(conn, sock),
            },
            trust: checked.trust,
            summary: checked.summary,
            negotiated,
            resumed,
        })
    }

    /// The configuration of a session: this policy's protocols and
    /// ciphers, `recorder` to check the certificate, no SNI (as Postfix
    /// with smtp_tls_servername empty), and sessions kept in `store`
    /// (none: no resumption).
    fn config(
        &self,
        recorder: Arc<Recorder>,
        store: Option<Arc<rustls::client::ClientSessionMemoryCache>>,
    ) -> Result<Arc<ClientConfig>, String> {
        let mut config = ClientConfig::builder_with_provider(self.profile.provider.clone())
            .with_protocol_versions(&self.profile.versions)
            .map_err(|e| e.to_string())?
            .dangerous()
            .with_custom_certificate_verifier(recorder)
            .with_no_client_auth();
        config.enable_sni = false;
        config.resumption = match store {
            Some(s) => rustls::client::Resumption::store(s),
            None => rustls::client::Resumption::disabled(),
        };
        Ok(Arc::new(config))
    }

    /// A verifier for this policy's names and trust anchors.
    fn recorder(&self) -> Arc<Recorder> {
        Arc::new(Recorder {
            verifier: self.roots.verifier.clone(),
            dane: self.dane.clone(),
            provider: self.roots.provider.clone(),
            names: self.names.clone(),
            result: Mutex::new(HashMap::new()),
        })
    }

    /// The sessions to resume with `relay` under this policy, or none
    /// when `smtp_tls_session_cache_timeout` is 0. Kept in the process's
    /// memory, per server, port, level, names to match and protocols (as
    /// Postfix keys its smtp session cache), and forgotten once the
    /// timeout has passed since the first of them was stored.
    fn resumable(&self, relay: &str) -> Result<Option<Arc<Resumable>>, String> {
        static SESSIONS: OnceLock<Mutex<HashMap<String, Arc<Resumable>>>> = OnceLock::new();
        if self.session_cache_timeout == 0 {
            return Ok(None);
        }
        let key = format!(
            "{relay} {:p} {:?} {:?} {:?} {:?} {:?}",
            Arc::as_ptr(&self.roots),
            self.policy.level,
            self.names,
            self.dane
                .as_ref()
                .map(|d| d.iter().map(|t| t.text()).collect::<Vec<_>>()),
            self.profile.versions,
            self.profile
                .provider
                .cipher_suites
                .iter()
                .map(|s| s.suite())
                .collect::<Vec<_>>()
        );
        let timeout = Duration::from_secs(self.session_cache_timeout);
        let mut all = SESSIONS
            .get_or_init(Default::default)
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        all.retain(|_, r| r.made.elapsed() < timeout);
        if let Some(r) = all.get(&key) {
            return Ok(Some(r.clone()));
        }
        let recorder = self.recorder();
        let store = Arc::new(rustls::client::ClientSessionMemoryCache::new(4));
        let r = Arc::new(Resumable {
            config: self.config(recorder.clone(), Some(store))?,
            recorder,
            made: Instant::now(),
            checked: Mutex::new(None),
        });
        all.insert(key, r.clone());
        Ok(Some(r))
    }
}

/// The TLS sessions of one server (see [`Client::resumable`]).
struct Resumable {
    /// The configuration its sessions are made and resumed with.
    config: Arc<ClientConfig>,
    /// The configuration's verifier.
    recorder: Arc<Recorder>,
    made: Instant,
    /// What the check of the full handshake's certificate found.
    checked: Mutex<Option<Checked>>,
}

/// MTA-STS's trust anchors (WebPKI: the system bundle and
/// `smtp_tls_CAfile`/`smtp_tls_CApath`), shared by the process.
pub fn web_roots(ca_file: &str, ca_path: &str) -> Arc<Roots> {
    static ROOTS: OnceLock<Arc<Roots>> = OnceLock::new();
    ROOTS
        .get_or_init(|| {
            Arc::new(Roots::from_store(postern_common::https::web_roots(
                ca_file, ca_path,
            )))
        })
        .clone()
}

/// Trust anchors shared by every session of the process.
pub fn roots(ca_file: &str, ca_path: &str) -> Arc<Roots> {
    static ROOTS: OnceLock<Arc<Roots>> = OnceLock::new();
    ROOTS
        .get_or_init(|| Arc::new(Roots::load(ca_file, ca_path)))
        .clone()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn levels_and_policies() {
        assert_eq!(Level::parse("MAY"), Some(Level::May));
        assert_eq!(Level::parse(""), Some(Level::None));
        assert_eq!(Level::parse("bogus"), None);
        assert!(Level::Encrypt.required() && !Level::May.required());
        assert!(Level::Secure.checks_certificate() && !Level::Encrypt.checks_certificate());
        let p = Policy::parse("verify match=hostname:Mail.Example.test").unwrap();
        assert_eq!(p.level, Level::Verify);
        assert_eq!(
            p.names("mx.b.test", "b.test"),
            vec!["mx.b.test", "mail.example.test"]
        );
        let p = Policy::parse("secure").unwrap();
        assert_eq!(p.names("mx.b.test", "b.test"), vec!["b.test", ".b.test"]);
        assert!(Policy::parse("sometimes").is_err());
    }
}
