//! The server's side of a full TLS 1.3 handshake alone, in one process:
//! smtpd's own TLS layer ([`postern_smtpd::tls::TlsConn`] over the
//! `ServerConfig` smtpd builds from main.cf) against a rustls client in
//! memory, no sockets, no SMTP. Only the server's calls are timed, in
//! CPU time of this thread; beside them, the same cryptography alone
//! through the same provider (Postern's: aws-lc-rs): one X25519 key pair and shared
//! secret and one signature with the certificate's key.
//!
//! The client offers the TLS 1.3 suites in OpenSSL's order (AES-256-GCM,
//! ChaCha20, AES-128-GCM), as the clients of `bench/tls` do, so smtpd
//! answers as it answers them (`ServerTls::config_for`).
//!
//! `bench/tls` runs it (its "handshake alone" table) to tell what the
//! handshake costs from what the connection around it costs (the
//! STARTTLS round trip, the second EHLO, record encryption, the kernel):
//!
//!     cargo run --release -p postern-smtpd --example tls_handshake -- \
//!         KEY.pem CERT.pem [HANDSHAKES] [DIR] [SUITE]
//!
//! Prints one line: `handshake_ms=… x25519_ms=… sign_ms=… floor_ms=… ratio=…`
//! (ms of CPU per handshake or per operation). `DIR` (default a temporary
//! directory) gets main.cf and the ticket key, as smtpd's would. `SUITE`
//! (a TLS 1.3 suite by its OpenSSL name, `TLS_AES_256_GCM_SHA384`) is the
//! only one the client offers: the transcript hash and key schedule then
//! use that suite's hash, which tells the hash's share of the handshake
//! (aws-lc computes SHA-384 without SIMD on AMD CPUs).

use postern_common::tls::rustls;
use postern_smtpd::tls::{ReadOutcome, TlsConn};
use std::io::{self, Read, Write};
use std::sync::Arc;

/// One direction of the in-memory connection.
#[derive(Default)]
struct Pipe {
    buf: Vec<u8>,
    pos: usize,
}

impl Read for Pipe {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        if self.pos == self.buf.len() {
            self.buf.clear();
            self.pos = 0;
            return Err(io::ErrorKind::WouldBlock.into());
        }
        let n = out.len().min(self.buf.len() - self.pos);
        out[..n].copy_from_slice(&self.buf[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

impl Write for Pipe {
    fn write(&mut self, b: &[u8]) -> io::Result<usize> {
        self.buf.extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

fn cpu_ns() -> u64 {
    let mut t = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: t is a valid timespec for the call to fill.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut t) };
    t.tv_sec as u64 * 1_000_000_000 + t.tv_nsec as u64
}

/// The client checks nothing (the server's cost is measured).
#[derive(Debug)]
struct AnyServer(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for AnyServer {
    fn verify_server_cert(
        &self,
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &[rustls::pki_types::CertificateDer<'_>],
        _: &rustls::pki_types::ServerName<'_>,
        _: &[u8],
        _: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
    }
    fn verify_tls13_signature(
        &self,
        _: &[u8],
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
    }
    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

fn fail(msg: String) -> ! {
    eprintln!("tls_handshake: {msg}");
    std::process::exit(1);
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.len() < 2 {
        fail("usage: tls_handshake KEY.pem CERT.pem [HANDSHAKES] [DIR] [SUITE]".into());
    }
    let n: u64 = args
        .get(2)
        .map(|s| s.parse().unwrap_or_else(|_| fail(format!("bad count {s}"))))
        .unwrap_or(2000);
    let dir = match args.get(3) {
        Some(d) => std::path::PathBuf::from(d),
        None => {
            let d = std::env::temp_dir().join(format!("tls_handshake.{}", std::process::id()));
            std::fs::create_dir_all(&d).unwrap_or_else(|e| fail(format!("{}: {e}", d.display())));
            d
        }
    };
    let text = format!(
        "smtpd_tls_chain_files = {}, {}\nsmtpd_tls_security_level = may\ndata_directory = {}\n",
        args[0],
        args[1],
        dir.display()
    );
    let file = dir.join("main.cf");
    std::fs::write(&file, &text).unwrap_or_else(|e| fail(format!("{}: {e}", file.display())));
    let cfg =
        postern_conf::Config::from_text(&dir, &text, &file).unwrap_or_else(|e| fail(e.to_string()));
    let server_cfg = Arc::new(
        postern_common::tls::smtpd_server_config(&cfg).unwrap_or_else(|e| fail(e.to_string())),
    );

    // The client: X25519 first and the TLS 1.3 suites in OpenSSL's order
    // (AES-256-GCM, ChaCha20, AES-128-GCM), or only SUITE; no resumption.
    let provider = postern_common::tls::provider();
    let mut client_provider = (*provider).clone();
    let openssl_rank = |s: &rustls::SupportedCipherSuite| match s.suite() {
        rustls::CipherSuite::TLS13_AES_256_GCM_SHA384 => 0,
        rustls::CipherSuite::TLS13_CHACHA20_POLY1305_SHA256 => 1,
        rustls::CipherSuite::TLS13_AES_128_GCM_SHA256 => 2,
        _ => 3,
    };
    client_provider.cipher_suites.sort_by_key(openssl_rank);
    if let Some(suite) = args.get(4) {
        client_provider
            .cipher_suites
            .retain(|s| postern_common::tls::cipher_name(*s) == suite);
        if client_provider.cipher_suites.is_empty() {
            fail(format!("no such TLS 1.3 suite: {suite}"));
        }
    }
    let mut client_cfg = rustls::ClientConfig::builder_with_provider(Arc::new(client_provider))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap_or_else(|e| fail(e.to_string()))
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyServer(provider.clone())))
        .with_no_client_auth();
    client_cfg.resumption = rustls::client::Resumption::disabled();
    let client_cfg = Arc::new(client_cfg);
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();

    let handshake = |timed: &mut u64| {
        let mut to_server = Pipe::default();
        let mut to_client = Pipe::default();
        let mut client = rustls::ClientConnection::new(client_cfg.clone(), name.clone())
            .unwrap_or_else(|e| fail(e.to_string()));
        let t0 = cpu_ns();
        let mut server = TlsConn::new(server_cfg.clone());
        *timed += cpu_ns() - t0;
        let mut buf = [0u8; 4096];
        for _ in 0..10 {
            while client.wants_write() {
                client.write_tls(&mut to_server).unwrap();
            }
            let t0 = cpu_ns();
            let mut readable = true;
            match server.read(&mut to_server, &mut buf, &mut readable) {
                ReadOutcome::WouldBlock => {}
                other => fail(format!("server read: {other:?}")),
            }
            server.flush(&mut to_client).unwrap();
            let done = server.take_established();
            *timed += cpu_ns() - t0;
            if done.is_some() {
                return;
            }
            client.read_tls(&mut to_client).unwrap();
            client
                .process_new_packets()
                .unwrap_or_else(|e| fail(e.to_string()));
        }
        fail("handshake did not complete".into());
    };

    // Warm-up, then the measured handshakes.
    let mut timed = 0;
    for _ in 0..50 {
        handshake(&mut timed);
    }
    let mut timed = 0;
    for _ in 0..n {
        handshake(&mut timed);
    }
    // The clock's own cost (four readings per handshake round, two rounds).
    let t0 = cpu_ns();
    for _ in 0..n * 4 {
        std::hint::black_box(cpu_ns());
    }
    let clock = cpu_ns() - t0;
    let handshake_ms = (timed.saturating_sub(clock)) as f64 / n as f64 / 1e6;

    // The cryptography alone, through the same provider.
    let kx = provider.kx_groups[0];
    let reps = n.max(200);
    let t0 = cpu_ns();
    for _ in 0..reps {
        let a = kx.start().unwrap();
        let peer = a.pub_key().to_vec();
        std::hint::black_box(a.complete(&peer).unwrap());
    }
    // One start and one complete per iteration: 2 operations.
    let x25519_ms = (cpu_ns() - t0) as f64 / reps as f64 / 2.0 / 1e6;
    let key = postern_common::tls::load_cert_and_key(&args[1], &args[0])
        .unwrap_or_else(|e| fail(e))
        .key;
    let signing = provider
        .key_provider
        .load_private_key(key)
        .unwrap_or_else(|e| fail(e.to_string()));
    let schemes = [
        rustls::SignatureScheme::ECDSA_NISTP256_SHA256,
        rustls::SignatureScheme::RSA_PSS_SHA256,
    ];
    let signer = signing
        .choose_scheme(&schemes)
        .unwrap_or_else(|| fail("no signature scheme".into()));
    let msg = [7u8; 130];
    let t0 = cpu_ns();
    for _ in 0..reps {
        std::hint::black_box(signer.sign(&msg).unwrap());
    }
    let sign_ms = (cpu_ns() - t0) as f64 / reps as f64 / 1e6;
    let floor_ms = 2.0 * x25519_ms + sign_ms;
    println!(
        "handshakes={n} handshake_ms={handshake_ms:.4} x25519_ms={x25519_ms:.4} \
         sign_ms={sign_ms:.4} floor_ms={floor_ms:.4} ratio={:.2}",
        handshake_ms / floor_ms
    );
}
