//! Client certificates in smtpd (`smtpd_tls_ask_ccert`): asking every
//! client for one and taking any, or none ([`AnyClientCert`]: the client
//! must still prove it holds the certificate's key); whether one chains
//! to `smtpd_tls_CAfile` ([`trust_verifier`]); and its fingerprints in
//! `smtpd_tls_fingerprint_digest` as Postfix prints them (`AB:CD:...`),
//! of the whole certificate and of its public key (the DER
//! SubjectPublicKeyInfo), which `permit_tls_clientcerts`
//! (`relay_clientcerts`) and `check_ccert_access` look up.

use rustls::client::danger::HandshakeSignatureValid;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{DigitallySignedStruct, DistinguishedName, SignatureScheme};
use std::sync::Arc;

/// A digest algorithm (ring's).
pub type DigestAlgorithm = ring::digest::Algorithm;

/// What smtpd knows of a client's certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientCert {
    /// Fingerprint of the certificate.
    pub cert_fingerprint: String,
    /// Fingerprint of its public key ("" when it cannot be found).
    pub pkey_fingerprint: String,
    /// It chains to a CA of `smtpd_tls_CAfile`.
    pub trusted: bool,
    /// The subject's and the issuer's common name (the issuer's
    /// organization when it has no CN), as Postfix's `peer_CN` and
    /// `issuer_CN` (the milter macros `{cert_subject}`, `{cert_issuer}`).
    pub subject_cn: String,
    pub issuer_cn: String,
}

/// The digests `smtpd_tls_fingerprint_digest` may name here.
pub fn digest_of(name: &str) -> Result<&'static ring::digest::Algorithm, String> {
    match name.trim().to_ascii_lowercase().as_str() {
        "sha256" => Ok(&ring::digest::SHA256),
        "sha1" => Ok(&ring::digest::SHA1_FOR_LEGACY_USE_ONLY),
        "sha384" => Ok(&ring::digest::SHA384),
        "sha512" => Ok(&ring::digest::SHA512),
        other => Err(format!(
            "smtpd_tls_fingerprint_digest = {other}: not offered by Postern \
             (sha256, sha1, sha384 or sha512; fingerprints in tables must use the same)"
        )),
    }
}

/// `AB:CD:...` of `data`.
pub fn fingerprint(alg: &'static ring::digest::Algorithm, data: &[u8]) -> String {
    ring::digest::digest(alg, data)
        .as_ref()
        .iter()
        .map(|b| format!("{b:02X}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// One DER element at the start of `d`: (tag, header + content length,
/// header length).
fn der_element(d: &[u8]) -> Option<(u8, usize, usize)> {
    let tag = *d.first()?;
    let first = *d.get(1)? as usize;
    let (len, head) = if first < 0x80 {
        (first, 2)
    } else {
        let n = first & 0x7f;
        if n == 0 || n > 4 {
            return None;
        }
        let mut len = 0usize;
        for i in 0..n {
            len = (len << 8) | *d.get(2 + i)? as usize;
        }
        (len, 2 + n)
    };
    (head + len <= d.len()).then_some((tag, head + len, head))
}

/// The DER SubjectPublicKeyInfo of a certificate: the seventh element of
/// tbsCertificate, or the sixth without the optional `[0]` version.
pub fn spki(cert: &[u8]) -> Option<&[u8]> {
    let (_, _, h) = der_element(cert)?;
    let tbs_all = &cert[h..];
    let (_, tbs_len, tbs_head) = der_element(tbs_all)?;
    let mut rest = &tbs_all[tbs_head..tbs_len];
    let mut index = 0;
    while !rest.is_empty() {
        let (tag, len, _) = der_element(rest)?;
        if index == 0 && tag != 0xa0 {
            index = 1; // no version: the serial number comes first
        }
        if index == 6 {
            return (tag == 0x30).then_some(&rest[..len]);
        }
        rest = &rest[len..];
        index += 1;
    }
    None
}

/// The issuer and subject Names (DER) of a certificate: the third and
/// fifth elements of tbsCertificate after the optional `[0]` version.
fn issuer_and_subject(cert: &[u8]) -> Option<(&[u8], &[u8])> {
    let (_, _, h) = der_element(cert)?;
    let tbs_all = &cert[h..];
    let (_, tbs_len, tbs_head) = der_element(tbs_all)?;
    let mut rest = &tbs_all[tbs_head..tbs_len];
    let mut index = 0;
    let mut issuer = None;
    while !rest.is_empty() {
        let (tag, len, _) = der_element(rest)?;
        if index == 0 && tag != 0xa0 {
            index = 1;
        }
        match index {
            3 => issuer = Some(&rest[..len]),
            5 => return Some((issuer?, &rest[..len])),
            _ => {}
        }
        rest = &rest[len..];
        index += 1;
    }
    None
}

/// The last attribute of type `oid` (DER content of the OID) in a Name:
/// SEQUENCE OF SET OF SEQUENCE { type, value }.
fn name_attribute(name: &[u8], oid: &[u8]) -> Option<String> {
    let (_, len, head) = der_element(name)?;
    let mut rdns = &name[head..len];
    let mut found = None;
    while !rdns.is_empty() {
        let (_, set_len, set_head) = der_element(rdns)?;
        let mut atvs = &rdns[set_head..set_len];
        while !atvs.is_empty() {
            let (_, atv_len, atv_head) = der_element(atvs)?;
            let atv = &atvs[atv_head..atv_len];
            let (otag, olen, ohead) = der_element(atv)?;
            if otag == 0x06 && &atv[ohead..olen] == oid {
                let v = &atv[olen..];
                let (_, vlen, vhead) = der_element(v)?;
                found = Some(String::from_utf8_lossy(&v[vhead..vlen]).into_owned());
            }
            atvs = &atvs[atv_len..];
        }
        rdns = &rdns[set_len..];
    }
    found
}

const OID_CN: &[u8] = &[0x55, 0x04, 0x03];
const OID_O: &[u8] = &[0x55, 0x04, 0x0a];

/// The subject's CN and the issuer's CN (else O) of a certificate.
pub fn peer_and_issuer_cn(cert: &[u8]) -> (String, String) {
    let Some((issuer, subject)) = issuer_and_subject(cert) else {
        return (String::new(), String::new());
    };
    let subject_cn = name_attribute(subject, OID_CN).unwrap_or_default();
    let issuer_cn = name_attribute(issuer, OID_CN)
        .or_else(|| name_attribute(issuer, OID_O))
        .unwrap_or_default();
    (subject_cn, issuer_cn)
}

/// Asks for a client certificate and takes any, or none; the signature
/// that proves the client holds its key is checked as usual.
#[derive(Debug)]
pub struct AnyClientCert {
    pub provider: Arc<CryptoProvider>,
}

impl ClientCertVerifier for AnyClientCert {
    fn offer_client_auth(&self) -> bool {
        true
    }
    fn client_auth_mandatory(&self) -> bool {
        false
    }
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }
    fn verify_client_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        Ok(ClientCertVerified::assertion())
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

/// A verifier of client certificates against `smtpd_tls_CAfile` (None:
/// no CA file, no certificate is trusted).
pub fn trust_verifier(
    cfg: &postern_conf::Config,
) -> Result<Option<Arc<dyn ClientCertVerifier>>, String> {
    let file = cfg.get("smtpd_tls_CAfile");
    let file = file.trim();
    if file.is_empty() {
        return Ok(None);
    }
    let mut roots = rustls::RootCertStore::empty();
    let certs = super::tls::load_certs(file)?;
    for c in certs {
        roots
            .add(c)
            .map_err(|e| format!("smtpd_tls_CAfile {file}: {e}"))?;
    }
    let v = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots),
        super::tls::provider(),
    )
    .build()
    .map_err(|e| format!("smtpd_tls_CAfile {file}: {e}"))?;
    Ok(Some(v))
}

/// The client's certificate, from its chain as the handshake gave it.
pub fn client_cert(
    chain: &[CertificateDer<'static>],
    alg: &'static ring::digest::Algorithm,
    trust: Option<&Arc<dyn ClientCertVerifier>>,
) -> Option<ClientCert> {
    let (end, intermediates) = chain.split_first()?;
    let trusted = trust.is_some_and(|v| {
        v.verify_client_cert(end, intermediates, UnixTime::now())
            .is_ok()
    });
    let (subject_cn, issuer_cn) = peer_and_issuer_cn(end.as_ref());
    Some(ClientCert {
        subject_cn,
        issuer_cn,
        cert_fingerprint: fingerprint(alg, end.as_ref()),
        pkey_fingerprint: spki(end.as_ref())
            .map(|k| fingerprint(alg, k))
            .unwrap_or_default(),
        trusted,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprints_as_postfix_prints_them() {
        assert_eq!(
            fingerprint(digest_of("SHA1").unwrap(), b"abc"),
            "A9:99:3E:36:47:06:81:6A:BA:3E:25:71:78:50:C2:6C:9C:D0:D8:9D"
        );
        assert!(digest_of("md5").is_err());
    }

    #[test]
    fn der_walk_finds_the_key_or_nothing() {
        assert_eq!(spki(b""), None);
        assert_eq!(spki(&[0x30, 0x03, 0x30, 0x01, 0x02]), None);
        // tbsCertificate with version, serial, sigalg, issuer, validity,
        // subject, then the key.
        let tbs_items: Vec<u8> = [
            &[0xa0, 0x00][..],
            &[0x02, 0x01, 0x01],
            &[0x30, 0x00],
            &[0x30, 0x00],
            &[0x30, 0x00],
            &[0x30, 0x00],
            &[0x30, 0x02, 0x05, 0x00],
        ]
        .concat();
        let mut tbs = vec![0x30, tbs_items.len() as u8];
        tbs.extend(&tbs_items);
        let mut cert = vec![0x30, tbs.len() as u8];
        cert.extend(&tbs);
        assert_eq!(spki(&cert), Some(&[0x30, 0x02, 0x05, 0x00][..]));
    }
}
