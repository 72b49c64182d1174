//! The certificate check at level `dane`/`dane-only` (RFC 7672 section
//! 3.1): what the server sent against its usable TLSA records, in place
//! of the trust anchors. Called by [`crate::tls::Recorder`] during the
//! handshake (signatures are verified by rustls as always).
//!
//! - DANE-EE (usage 3): the end-entity certificate matches a record;
//!   names and validity dates are not checked (RFC 7672 section 3.1.1).
//! - DANE-TA (usage 2): a certificate of the chain the server sent (or,
//!   for `2 0 0`, the record's own certificate) matches a record; it is
//!   then the only trust anchor of an ordinary X.509 path check of the
//!   end-entity certificate, which must also name the server (the MX
//!   host name, or the next-hop domain: RFC 7672 section 3.2.3).
//!
//! The result is [`Trust::Verified`] or [`Trust::Untrusted`] with the
//! reason logged in `server certificate verification failed for ...`.

use crate::tls::Trust;
use postern_common::dane::Tlsa;
use rustls::client::danger::ServerCertVerifier;
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::RootCertStore;
use std::sync::Arc;

/// Checks the server's chain (`ee`, then `inter` as sent) against
/// `records`; `names` are the reference identifiers for DANE-TA.
pub fn check(
    records: &[Tlsa],
    names: &[String],
    provider: &Arc<CryptoProvider>,
    ee: &CertificateDer<'_>,
    inter: &[CertificateDer<'_>],
    now: UnixTime,
) -> Trust {
    if records
        .iter()
        .any(|t| t.usage == 3 && t.matches_cert(ee.as_ref()))
    {
        return Trust::Verified;
    }
    let ta: Vec<&Tlsa> = records.iter().filter(|t| t.usage == 2).collect();
    if ta.is_empty() {
        return Trust::Untrusted("no TLSA record matches the server certificate".into());
    }
    // Candidate anchors: certificates of the chain that match a DANE-TA
    // record, and full certificates given in `2 0 0` records.
    let mut anchors: Vec<CertificateDer<'static>> = inter
        .iter()
        .filter(|c| ta.iter().any(|t| t.matches_cert(c.as_ref())))
        .map(|c| c.clone().into_owned())
        .collect();
    anchors.extend(
        ta.iter()
            .filter(|t| t.selector == 0 && t.mtype == 0)
            .map(|t| CertificateDer::from(t.data.clone())),
    );
    if anchors.is_empty() {
        return Trust::Untrusted("no TLSA record matches a certificate of the chain".into());
    }
    let mut store = RootCertStore::empty();
    for a in anchors {
        let _ = store.add(a);
    }
    if store.is_empty() {
        return Trust::Untrusted("TLSA trust anchor is not a usable certificate".into());
    }
    let Ok(verifier) =
        WebPkiServerVerifier::builder_with_provider(Arc::new(store), provider.clone()).build()
    else {
        return Trust::Untrusted("TLSA trust anchor is not usable".into());
    };
    let mut why = "no reference identifier".to_string();
    for n in names.iter().filter(|n| !n.starts_with('.')) {
        let Ok(name) = ServerName::try_from(n.clone()) else {
            continue;
        };
        match verifier.verify_server_cert(ee, inter, &name, &[], now) {
            Ok(_) => return Trust::Verified,
            Err(e) => why = format!("{e}"),
        }
    }
    Trust::Untrusted(why)
}
