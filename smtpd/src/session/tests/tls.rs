//! STARTTLS.

use super::*;

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
    // RFC 8689: REQUIRETLS only over TLS.
    assert!(!r.iter().any(|l| l.contains("REQUIRETLS")), "{r:?}");
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
        server_signature: None,
        peer_certs: Vec::new(),
    });
    // The transaction and the pipelined RCPT are gone.
    assert_eq!(
        send(&mut s, "RCPT TO:<u@mx.example>\r\n"),
        ["503 5.5.1 Error: need MAIL command"]
    );
    let r = send(&mut s, "EHLO c\r\n");
    assert!(!r.iter().any(|l| l.contains("STARTTLS")), "{r:?}");
    assert!(r.iter().any(|l| &l[4..] == "REQUIRETLS"), "{r:?}");
    assert_eq!(
        send(&mut s, "MAIL FROM:<a@b> REQUIRETLS\r\n"),
        ["250 2.1.0 Ok"]
    );
    send(&mut s, "RSET\r\n");
    assert_eq!(
        send(&mut s, "STARTTLS\r\n"),
        ["554 5.5.1 Error: TLS already active"]
    );
    assert_eq!(s.protocol(), "ESMTPS");
}

const TEST_KEY: &[u8] = &[
    0x30, 0x81, 0x87, 0x02, 0x01, 0x00, 0x30, 0x13, 0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02,
    0x01, 0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07, 0x04, 0x6d, 0x30, 0x6b, 0x02,
    0x01, 0x01, 0x04, 0x20, 0x9e, 0xc0, 0x61, 0xfc, 0x74, 0x75, 0x32, 0xae, 0x57, 0x27, 0x84, 0x45,
    0x36, 0x96, 0x36, 0xa1, 0xfa, 0xcb, 0xd2, 0x7d, 0x7e, 0x62, 0x31, 0x8d, 0xb6, 0x5e, 0x77, 0x8f,
    0x1d, 0x72, 0x0a, 0xbf, 0xa1, 0x44, 0x03, 0x42, 0x00, 0x04, 0xeb, 0x08, 0xef, 0x71, 0x8d, 0xcb,
    0xd0, 0x07, 0x38, 0xfb, 0x8a, 0x15, 0xa5, 0xd6, 0x07, 0xc6, 0x25, 0xae, 0x08, 0xce, 0x4a, 0x31,
    0xe0, 0x00, 0x93, 0x2e, 0x9c, 0x60, 0x5d, 0x6d, 0x4e, 0xc4, 0xf0, 0x4d, 0xa2, 0x4c, 0x05, 0xb4,
    0x27, 0x06, 0x9d, 0x9e, 0x50, 0xb1, 0x38, 0x9c, 0xf9, 0x4a, 0xb1, 0xef, 0xd0, 0x2c, 0xa0, 0xd3,
    0xf7, 0xff, 0x7d, 0x95, 0x08, 0xd9, 0x7c, 0xc2, 0xe3, 0x41,
];

const TEST_CERT: &[u8] = &[
    0x30, 0x82, 0x01, 0x75, 0x30, 0x82, 0x01, 0x1b, 0xa0, 0x03, 0x02, 0x01, 0x02, 0x02, 0x14, 0x18,
    0xff, 0x56, 0xec, 0x59, 0x46, 0x62, 0x14, 0xd3, 0x0c, 0xa7, 0x8e, 0x83, 0x56, 0xce, 0xec, 0xde,
    0x08, 0x9e, 0xf8, 0x30, 0x0a, 0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x03, 0x02, 0x30,
    0x0f, 0x31, 0x0d, 0x30, 0x0b, 0x06, 0x03, 0x55, 0x04, 0x03, 0x0c, 0x04, 0x74, 0x65, 0x73, 0x74,
    0x30, 0x20, 0x17, 0x0d, 0x32, 0x36, 0x31, 0x31, 0x32, 0x32, 0x31, 0x34, 0x35, 0x35, 0x34, 0x31,
    0x5a, 0x18, 0x0f, 0x32, 0x31, 0x32, 0x36, 0x31, 0x30, 0x32, 0x39, 0x31, 0x34, 0x35, 0x35, 0x34,
    0x31, 0x5a, 0x30, 0x0f, 0x31, 0x0d, 0x30, 0x0b, 0x06, 0x03, 0x55, 0x04, 0x03, 0x0c, 0x04, 0x74,
    0x65, 0x73, 0x74, 0x30, 0x59, 0x30, 0x13, 0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01,
    0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07, 0x03, 0x42, 0x00, 0x04, 0xeb, 0x08,
    0xef, 0x71, 0x8d, 0xcb, 0xd0, 0x07, 0x38, 0xfb, 0x8a, 0x15, 0xa5, 0xd6, 0x07, 0xc6, 0x25, 0xae,
    0x08, 0xce, 0x4a, 0x31, 0xe0, 0x00, 0x93, 0x2e, 0x9c, 0x60, 0x5d, 0x6d, 0x4e, 0xc4, 0xf0, 0x4d,
    0xa2, 0x4c, 0x05, 0xb4, 0x27, 0x06, 0x9d, 0x9e, 0x50, 0xb1, 0x38, 0x9c, 0xf9, 0x4a, 0xb1, 0xef,
    0xd0, 0x2c, 0xa0, 0xd3, 0xf7, 0xff, 0x7d, 0x95, 0x08, 0xd9, 0x7c, 0xc2, 0xe3, 0x41, 0xa3, 0x53,
    0x30, 0x51, 0x30, 0x1d, 0x06, 0x03, 0x55, 0x1d, 0x0e, 0x04, 0x16, 0x04, 0x14, 0x28, 0xbe, 0x60,
    0x76, 0x00, 0xaa, 0xfa, 0x3c, 0x48, 0x76, 0xcc, 0x21, 0x96, 0xb7, 0xe3, 0x4b, 0xd4, 0xdb, 0xf5,
    0xd9, 0x30, 0x1f, 0x06, 0x03, 0x55, 0x1d, 0x23, 0x04, 0x18, 0x30, 0x16, 0x80, 0x14, 0x28, 0xbe,
    0x60, 0x76, 0x00, 0xaa, 0xfa, 0x3c, 0x48, 0x76, 0xcc, 0x21, 0x96, 0xb7, 0xe3, 0x4b, 0xd4, 0xdb,
    0xf5, 0xd9, 0x30, 0x0f, 0x06, 0x03, 0x55, 0x1d, 0x13, 0x01, 0x01, 0xff, 0x04, 0x05, 0x30, 0x03,
    0x01, 0x01, 0xff, 0x30, 0x0a, 0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x03, 0x02, 0x03,
    0x48, 0x00, 0x30, 0x45, 0x02, 0x21, 0x00, 0xd5, 0xa7, 0x17, 0xf5, 0x48, 0x8d, 0xf0, 0x48, 0x4a,
    0xd9, 0xa5, 0xc4, 0x60, 0x2b, 0x9e, 0x34, 0x87, 0x24, 0xe1, 0x12, 0x10, 0xe7, 0xde, 0x6c, 0xcc,
    0xb6, 0x67, 0xe4, 0xc9, 0x8c, 0x00, 0xb8, 0x02, 0x20, 0x27, 0x3c, 0x0a, 0x75, 0x1d, 0xf8, 0xa7,
    0xa5, 0xb2, 0x24, 0x5d, 0x55, 0xe5, 0x9e, 0xde, 0x29, 0xca, 0xb2, 0x05, 0x0c, 0x3f, 0x84, 0x0e,
    0xbd, 0x52, 0xff, 0x7e, 0xc9, 0xe1, 0xec, 0x4a, 0xc6,
];

/// A server configuration from a throwaway key and certificate
/// (made with `openssl req -x509 -newkey ec`).
fn test_tls_config() -> Arc<postern_common::tls::ServerTls> {
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
    .map(|c| Arc::new(postern_common::tls::ServerTls::single(Arc::new(c))))
    .unwrap_or_else(|e| panic!("{e}"))
}

/// A TLS client that accepts any server (the server's side is tested).
#[derive(Debug)]
struct AnyServer(Arc<postern_common::tls::rustls::crypto::CryptoProvider>);

impl postern_common::tls::rustls::client::danger::ServerCertVerifier for AnyServer {
    fn verify_server_cert(
        &self,
        _: &postern_common::tls::rustls::pki_types::CertificateDer<'_>,
        _: &[postern_common::tls::rustls::pki_types::CertificateDer<'_>],
        _: &postern_common::tls::rustls::pki_types::ServerName<'_>,
        _: &[u8],
        _: postern_common::tls::rustls::pki_types::UnixTime,
    ) -> Result<
        postern_common::tls::rustls::client::danger::ServerCertVerified,
        postern_common::tls::rustls::Error,
    > {
        Ok(postern_common::tls::rustls::client::danger::ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &postern_common::tls::rustls::pki_types::CertificateDer<'_>,
        _: &postern_common::tls::rustls::DigitallySignedStruct,
    ) -> Result<
        postern_common::tls::rustls::client::danger::HandshakeSignatureValid,
        postern_common::tls::rustls::Error,
    > {
        Ok(postern_common::tls::rustls::client::danger::HandshakeSignatureValid::assertion())
    }
    fn verify_tls13_signature(
        &self,
        _: &[u8],
        _: &postern_common::tls::rustls::pki_types::CertificateDer<'_>,
        _: &postern_common::tls::rustls::DigitallySignedStruct,
    ) -> Result<
        postern_common::tls::rustls::client::danger::HandshakeSignatureValid,
        postern_common::tls::rustls::Error,
    > {
        Ok(postern_common::tls::rustls::client::danger::HandshakeSignatureValid::assertion())
    }
    fn supported_verify_schemes(&self) -> Vec<postern_common::tls::rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// Runs a handshake in memory between smtpd's TLS layer and a rustls
/// client offering `version`; returns both once the server is done.
fn handshake_in_memory(
    version: &'static postern_common::tls::rustls::SupportedProtocolVersion,
) -> (
    crate::tls::TlsConn,
    postern_common::tls::rustls::ClientConnection,
) {
    use crate::tls::{ReadOutcome, TlsConn};
    use postern_common::tls::rustls;
    let provider = postern_common::tls::provider();
    let cfg = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[version])
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyServer(provider)))
        .with_no_client_auth();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let mut client = rustls::ClientConnection::new(Arc::new(cfg), name).unwrap();
    let mut server = TlsConn::new(test_tls_config());
    let mut buf = [0u8; 4096];
    for _ in 0..10 {
        let mut wire = Vec::new();
        while client.wants_write() {
            client.write_tls(&mut wire).unwrap();
        }
        let mut readable = true;
        let mut src = &wire[..];
        match server.read(&mut src, &mut buf, &mut readable) {
            ReadOutcome::WouldBlock | ReadOutcome::Eof => {}
            other => panic!("{other:?}"),
        }
        if !server.is_handshaking() {
            return (server, client);
        }
        let mut back = Vec::new();
        server.flush(&mut back).unwrap();
        client.read_tls(&mut &back[..]).unwrap();
        client.process_new_packets().unwrap();
    }
    panic!("no handshake");
}

#[test]
fn tls13_ticket_leaves_with_the_first_reply() {
    use std::io::Read;
    let (mut server, mut client) =
        handshake_in_memory(&postern_common::tls::rustls::version::TLS13);
    // The session ticket waits: nothing to send, reading goes on.
    assert!(!server.wants_write());
    let mut wire = Vec::new();
    assert_eq!(server.flush(&mut wire).unwrap(), 0);
    // The first reply takes it along, in one write.
    server.write_plain(b"250 ok\r\n").unwrap();
    assert!(server.wants_write());
    server.flush(&mut wire).unwrap();
    client.read_tls(&mut &wire[..]).unwrap();
    client.process_new_packets().unwrap();
    let mut got = [0u8; 16];
    let n = client.reader().read(&mut got).unwrap();
    assert_eq!(&got[..n], b"250 ok\r\n");
    // The ticket came too: the client can resume.
    assert!(
        client.tls13_tickets_received() > 0,
        "no ticket with the reply"
    );
}

#[test]
fn tls12_finished_is_not_held() {
    let (server, _client) = handshake_in_memory(&postern_common::tls::rustls::version::TLS12);
    // The server's Finished follows the client's: the client waits for it.
    assert!(server.wants_write());
}
