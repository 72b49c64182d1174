//! TLS configuration shared by Postern's servers: certificates and keys
//! from PEM files, a rustls [`ServerConfig`] built with the `ring`
//! provider (never `ServerConfig::builder()`, which panics when two
//! providers are compiled in), and the names Postfix logs for what was
//! negotiated.
//!
//! Client-side certificate verification is the SMTP client's business and
//! does not live here.

use rustls::crypto::ring;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::{ProtocolVersion, ServerConfig, SupportedCipherSuite};
use std::sync::Arc;

pub use rustls;

/// The crypto provider every Postern TLS configuration uses.
pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(ring::default_provider())
}

/// One certificate chain and its key.
pub struct CertifiedKey {
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
}

/// Certificates and the private key read from PEM files the way Postfix
/// reads `*_tls_cert_file` and `*_tls_key_file`: `cert_file` holds the
/// server certificate first, then any intermediates; `key_file` (when
/// empty, `cert_file`) holds the key.
pub fn load_cert_and_key(cert_file: &str, key_file: &str) -> Result<CertifiedKey, String> {
    let key_file = if key_file.is_empty() {
        cert_file
    } else {
        key_file
    };
    let chain = load_certs(cert_file)?;
    let key = PrivateKeyDer::from_pem_file(key_file)
        .map_err(|e| format!("cannot load private key from {key_file}: {e}"))?;
    Ok(CertifiedKey { chain, key })
}

/// Postfix's `*_tls_chain_files`: each file holds a private key and its
/// certificate chain (server certificate first), in any order of PEM
/// blocks; the first file that yields a key and a chain is used (rustls
/// serves one certificate per configuration).
pub fn load_chain_files(files: &[String]) -> Result<CertifiedKey, String> {
    let mut errors = Vec::new();
    for f in files {
        let certs = match load_certs(f) {
            Ok(c) => c,
            Err(e) => {
                errors.push(e);
                continue;
            }
        };
        match PrivateKeyDer::from_pem_file(f) {
            Ok(key) => return Ok(CertifiedKey { chain: certs, key }),
            Err(e) => errors.push(format!("cannot load private key from {f}: {e}")),
        }
    }
    if errors.is_empty() {
        Err("no files in the chain file list".into())
    } else {
        Err(errors.join("; "))
    }
}

fn load_certs(file: &str) -> Result<Vec<CertificateDer<'static>>, String> {
    let iter = CertificateDer::pem_file_iter(file)
        .map_err(|e| format!("cannot load certificate from {file}: {e}"))?;
    let certs: Vec<_> = iter
        .collect::<Result<_, _>>()
        .map_err(|e| format!("cannot load certificate from {file}: {e}"))?;
    if certs.is_empty() {
        return Err(format!("no certificate in {file}"));
    }
    Ok(certs)
}

/// A server configuration offering TLS 1.2 and 1.3 with `key`, asking
/// for no client certificate.
pub fn server_config(key: CertifiedKey) -> Result<Arc<ServerConfig>, String> {
    let config = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| format!("TLS configuration: {e}"))?
        .with_no_client_auth()
        .with_single_cert(key.chain, key.key)
        .map_err(|e| format!("certificate or key not usable: {e}"))?;
    Ok(Arc::new(config))
}

/// Whether smtpd (with `cfg`, a service's overrides applied) serves TLS:
/// a `smtpd_tls_security_level` other than none, or `smtpd_tls_wrappermode`.
pub fn smtpd_tls_wanted(cfg: &postern_conf::Config) -> bool {
    let level = cfg.get("smtpd_tls_security_level");
    !matches!(level.trim().to_ascii_lowercase().as_str(), "" | "none")
        || cfg.get_bool("smtpd_tls_wrappermode").unwrap_or(false)
}

/// smtpd's TLS configuration from its certificate and key: from
/// `smtpd_tls_chain_files`, or `smtpd_tls_cert_file` and
/// `smtpd_tls_key_file`. smtpd reads them as root, before it drops its
/// privileges; `postern check` reads them the same way to report a
/// missing or unusable key before a client finds STARTTLS gone.
pub fn smtpd_server_config(cfg: &postern_conf::Config) -> Result<Arc<ServerConfig>, String> {
    let chain = cfg.get_list("smtpd_tls_chain_files");
    let key = if !chain.is_empty() {
        load_chain_files(&chain)?
    } else {
        let cert = cfg.get("smtpd_tls_cert_file");
        if cert.is_empty() {
            return Err("no certificate: set smtpd_tls_cert_file or smtpd_tls_chain_files".into());
        }
        load_cert_and_key(&cert, &cfg.get("smtpd_tls_key_file"))?
    };
    server_config(key)
}

/// What was negotiated, as Postfix names it in its log lines and in the
/// Received header: `TLSv1.3 with cipher TLS_AES_256_GCM_SHA384 (256/256 bits)`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Negotiated {
    /// `TLSv1.2`, `TLSv1.3`.
    pub protocol: String,
    /// The cipher's OpenSSL name (what Postfix logs).
    pub cipher: String,
    /// Secret bits of the cipher.
    pub bits: u32,
    /// Key exchange group (`X25519`), when known.
    pub kx: Option<String>,
}

impl Negotiated {
    /// From a connection whose handshake is complete.
    pub fn of(conn: &rustls::CommonState) -> Option<Negotiated> {
        let version = conn.protocol_version()?;
        let suite = conn.negotiated_cipher_suite()?;
        let kx = conn
            .negotiated_key_exchange_group()
            .map(|g| format!("{:?}", g.name()));
        Some(Negotiated {
            protocol: protocol_name(version),
            cipher: cipher_name(suite).to_string(),
            bits: cipher_bits(suite),
            kx,
        })
    }

    /// `TLSv1.3 with cipher TLS_AES_256_GCM_SHA384 (256/256 bits)`
    pub fn summary(&self) -> String {
        format!(
            "{} with cipher {} ({}/{} bits)",
            self.protocol, self.cipher, self.bits, self.bits
        )
    }
}

/// `TLSv1.2`, `TLSv1.3`, as OpenSSL and Postfix write them.
pub fn protocol_name(v: ProtocolVersion) -> String {
    match v {
        ProtocolVersion::TLSv1_3 => "TLSv1.3".into(),
        ProtocolVersion::TLSv1_2 => "TLSv1.2".into(),
        ProtocolVersion::TLSv1_1 => "TLSv1.1".into(),
        ProtocolVersion::TLSv1_0 => "TLSv1".into(),
        other => format!("{other:?}"),
    }
}

/// The OpenSSL name of a cipher suite (TLS 1.3 suites keep their IANA
/// names, as OpenSSL does).
pub fn cipher_name(s: SupportedCipherSuite) -> &'static str {
    use rustls::CipherSuite as C;
    match s.suite() {
        C::TLS13_AES_256_GCM_SHA384 => "TLS_AES_256_GCM_SHA384",
        C::TLS13_AES_128_GCM_SHA256 => "TLS_AES_128_GCM_SHA256",
        C::TLS13_CHACHA20_POLY1305_SHA256 => "TLS_CHACHA20_POLY1305_SHA256",
        C::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384 => "ECDHE-ECDSA-AES256-GCM-SHA384",
        C::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256 => "ECDHE-ECDSA-AES128-GCM-SHA256",
        C::TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256 => "ECDHE-ECDSA-CHACHA20-POLY1305",
        C::TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384 => "ECDHE-RSA-AES256-GCM-SHA384",
        C::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256 => "ECDHE-RSA-AES128-GCM-SHA256",
        C::TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256 => "ECDHE-RSA-CHACHA20-POLY1305",
        other => other.as_str().unwrap_or("unknown"),
    }
}

/// Secret bits of a suite's bulk cipher.
pub fn cipher_bits(s: SupportedCipherSuite) -> u32 {
    let name = format!("{:?}", s.suite());
    if name.contains("AES_128") {
        128
    } else {
        256
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        let p = ring::default_provider();
        let names: Vec<_> = p.cipher_suites.iter().map(|s| cipher_name(*s)).collect();
        assert!(names.contains(&"TLS_AES_256_GCM_SHA384"));
        assert!(names.contains(&"ECDHE-RSA-AES128-GCM-SHA256"));
        for s in &p.cipher_suites {
            let bits = cipher_bits(*s);
            assert!(bits == 128 || bits == 256);
            if cipher_name(*s).contains("AES128") || cipher_name(*s).contains("AES_128") {
                assert_eq!(bits, 128);
            }
        }
        assert_eq!(protocol_name(ProtocolVersion::TLSv1_3), "TLSv1.3");
    }

    #[test]
    fn missing_files() {
        let e = load_cert_and_key("/nonexistent/cert.pem", "")
            .err()
            .unwrap();
        assert!(e.contains("/nonexistent/cert.pem"), "{e}");
        assert!(load_chain_files(&[]).is_err());
    }
}
