//! DKIM signing of our users' mail and the SPF/DKIM/DMARC checks of mail
//! from outside, with their RFC 8601 Authentication-Results header.
//!
//! Both need the whole message: a message they apply to is held in
//! memory (bounded by `message_size_limit`) from the end of its header
//! section to Close, where the DKIM-Signature or Authentication-Results
//! header is put on top and the content written ([`crate::message`]).
//! Signing happens there, after every rewrite (canonical, masquerade,
//! header and body checks, the headers cleanup adds), so the signature
//! covers what is sent. A message on its way to an after-queue content
//! filter is signed and checked when it comes back, not before.
//!
//! Which mail: the class of its client ([`Class`]): `dkim_sign_classes`
//! (mynetworks, authenticated, local) are signed; mail from an SMTP
//! client that is none of them is checked (`authentication_checks`).
//! Mail cleanup makes itself (bounces, forwarded copies, probes) is
//! neither. Back from a content filter, the class is the original
//! client's (XFORWARD ADDR, SOURCE=LOCAL for sendmail's mail); XFORWARD
//! carries no SASL login, so an authenticated client's mail that passes
//! a content filter is signed only if its address is in `mynetworks`.
//!
//! Keys: every key file `dkim_signing_table` names is read while cleanup
//! is still root (0600 files, like smtpd's TLS keys); RSA (PKCS#1 or
//! PKCS#8) signs with rsa-sha256, Ed25519 with ed25519-sha256 (RFC
//! 8463); relaxed/relaxed. A key file is PEM (what `postern dkim-keygen`
//! and opendkim-genkey write, and the one form OpenDKIM 2.11 reads for
//! Ed25519), binary DER (which OpenDKIM also reads), or for Ed25519 the
//! raw forms other DKIM signers keep: the base64 of the 32-byte seed
//! (dkimpy's `dknewkey --ktype ed25519`) or of the 64-byte seed and
//! public key (rspamd's `rspamadm dkim_keygen -t ed25519`). DNS for the checks goes
//! through Postern's resolver (`dns_resolver_addresses` or
//! /etc/resolv.conf), started at first use, after the privilege drop.
//! The cryptography, canonicalization and the three checks are
//! mail-auth's.

use postern_common::dkim_table::{self, KeyRef, SigningTable};
use postern_common::dns::BlockingResolver;
use postern_common::ipc::NewMessage;
use postern_common::match_list::{Kind, MatchList};
use postern_common::qfile;
use postern_common::{info, warning};
use postern_conf::Config;

use mail_auth::common::crypto::{Ed25519Key, RsaKey, Sha256};
use mail_auth::common::headers::HeaderWriter;
use mail_auth::dkim::{Canonicalization, DkimError, DkimSigner, Done};
use mail_auth::dmarc::verify::DmarcParameters;
use mail_auth::dmarc::Policy;
use mail_auth::spf::verify::SpfParameters;
use mail_auth::{
    AuthenticatedMessage, AuthenticationResults, DkimOutput, DkimResult, DmarcResult,
    MessageAuthenticator,
};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::PrivateKeyDer;
use std::collections::HashMap;
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

/// Where a message comes from, for signing and checking.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    /// `sendmail` (through pickup).
    Local,
    /// An SMTP client that authenticated.
    Authenticated,
    /// An SMTP client in `mynetworks`.
    Mynetworks,
    /// Any other SMTP client: the outside.
    Remote,
    /// Mail Postern makes itself (bounces, forwarded copies, probes).
    Internal,
}

/// `smtpd_reject_dmarc_failures`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DmarcAction {
    No,
    Quarantine,
    Reject,
}

/// What the checks found that changes the message's fate.
#[derive(Debug, Default)]
pub struct Outcome {
    /// Headers to put on top, LF line ends.
    pub prepend: Vec<String>,
    /// Put the message on hold (a DMARC quarantine), with the reason.
    pub hold: Option<String>,
    /// Refuse it for good (a DMARC reject), with the reason.
    pub reject: Option<String>,
}

/// What applies to one message, decided at the end of its headers.
#[derive(Debug, Clone, Default)]
pub struct Plan {
    pub sign: Option<KeyRef>,
    pub check: bool,
}

impl Plan {
    pub fn any(&self) -> bool {
        self.sign.is_some() || self.check
    }
}

enum Signer {
    Rsa(DkimSigner<RsaKey<Sha256>, Done>),
    Ed25519(DkimSigner<Ed25519Key, Done>),
}

/// The settings and keys, once per process.
pub struct Dkim {
    table: SigningTable,
    headers: Vec<String>,
    sign_classes: Vec<Class>,
    mynetworks: MatchList,
    /// Key files as read at start (as root): the PEM text, or why not.
    keys: HashMap<PathBuf, Result<Vec<u8>, String>>,
    signers: Mutex<HashMap<KeyRef, Arc<Signer>>>,
    spf: bool,
    dkim: bool,
    dmarc: bool,
    pub dmarc_action: DmarcAction,
    myhostname: String,
    dns_servers: Vec<std::net::SocketAddr>,
    dns_timeout: Duration,
    resolver: OnceLock<Result<BlockingResolver, String>>,
}

impl Dkim {
    /// Reads the parameters and every key file the signing table names
    /// (cleanup is root here).
    pub fn from_config(cfg: &Config) -> Dkim {
        let (table, bad) = SigningTable::open(&cfg.get("dkim_signing_table"));
        for e in bad {
            warning!("dkim_signing_table: {e}");
        }
        let mut keys = HashMap::new();
        for f in table.key_files() {
            let k = dkim_table::read_key_file(&f).and_then(|pem| {
                parse_key(&pem)?;
                Ok(pem)
            });
            if let Err(e) = &k {
                warning!("dkim_signing_table: cannot use key {}: {e}", f.display());
            }
            keys.insert(f, k);
        }
        let headers = cfg
            .get_list("dkim_sign_headers")
            .into_iter()
            .filter(|h| !h.is_empty())
            .collect();
        let mut sign_classes = Vec::new();
        for c in cfg.get_list("dkim_sign_classes") {
            match c.to_ascii_lowercase().as_str() {
                "mynetworks" => sign_classes.push(Class::Mynetworks),
                "authenticated" | "sasl_authenticated" => sign_classes.push(Class::Authenticated),
                "local" | "sendmail" => sign_classes.push(Class::Local),
                "" => {}
                other => warning!("dkim_sign_classes: unknown class \"{other}\""),
            }
        }
        let (mut spf, mut dkim, mut dmarc) = (false, false, false);
        for c in cfg.get_list("authentication_checks") {
            match c.to_ascii_lowercase().as_str() {
                "spf" => spf = true,
                "dkim" => dkim = true,
                "dmarc" => dmarc = true,
                "" => {}
                other => warning!("authentication_checks: unknown check \"{other}\""),
            }
        }
        let dmarc_action = match cfg.get("smtpd_reject_dmarc_failures").trim() {
            "reject" => DmarcAction::Reject,
            "quarantine" => DmarcAction::Quarantine,
            "no" | "" => DmarcAction::No,
            other => {
                warning!("smtpd_reject_dmarc_failures: unknown value \"{other}\"; using no");
                DmarcAction::No
            }
        };
        let mynetworks =
            MatchList::from_config(cfg, "mynetworks", Kind::Address).unwrap_or_else(|e| {
                warning!("mynetworks: {e}");
                MatchList::default()
            });
        Dkim {
            table,
            headers,
            sign_classes,
            mynetworks,
            keys,
            signers: Mutex::new(HashMap::new()),
            spf,
            dkim,
            dmarc,
            dmarc_action,
            myhostname: cfg.get("myhostname"),
            dns_servers: postern_common::dns::servers_from_config(cfg),
            dns_timeout: Duration::from_secs(cfg.get_time("dns_resolver_timeout").unwrap_or(5)),
            resolver: OnceLock::new(),
        }
    }

    /// Whether signing or any check is configured at all.
    pub fn enabled(&self) -> bool {
        !self.table.is_empty() || self.checks_on()
    }

    /// Whether any check of mail from outside is on.
    pub fn checks_on(&self) -> bool {
        self.spf || self.dkim || self.dmarc
    }

    /// The class of a message, from its origin and client attributes.
    pub fn class(&self, new: &NewMessage) -> Class {
        let attr = |name: &str| {
            new.attrs
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, v)| v.as_str())
        };
        match new.origin.as_str() {
            "pickup" | "sendmail" => return Class::Local,
            "smtpd" => {}
            _ => return Class::Internal,
        }
        // sendmail's mail back from an after-queue content filter
        // (XFORWARD SOURCE=LOCAL, which pickup's attribute becomes).
        if attr(qfile::attr::SOURCE) == Some("LOCAL") {
            return Class::Local;
        }
        if attr(qfile::attr::SASL_USERNAME).is_some_and(|u| !u.is_empty()) {
            return Class::Authenticated;
        }
        if let Some(ip) = attr(qfile::attr::CLIENT).and_then(client_ip) {
            match self.mynetworks.matches_addr(ip) {
                Ok(true) => return Class::Mynetworks,
                Ok(false) => {}
                Err(e) => warning!("mynetworks: {e}"),
            }
        }
        Class::Remote
    }

    /// What applies to a message of `class` whose From: domain is
    /// `from_domain`. Err: the signing table could not answer.
    pub fn plan(&self, class: Class, from_domain: &str) -> Result<Plan, String> {
        let mut plan = Plan::default();
        if class == Class::Remote {
            plan.check = self.checks_on();
        } else if self.sign_classes.contains(&class) && !self.table.is_empty() {
            plan.sign = self
                .table
                .lookup(from_domain)
                .map_err(|e| format!("dkim_signing_table: {}: {}", e.table, e.reason))?;
        }
        Ok(plan)
    }

    /// Whether an Authentication-Results header claims to be ours
    /// (authserv-id = `myhostname`): a forgery from outside, removed.
    pub fn is_our_results(&self, value: &str) -> bool {
        let id = value
            .split(';')
            .next()
            .unwrap_or("")
            .split_whitespace()
            .next()
            .unwrap_or("");
        id.eq_ignore_ascii_case(&self.myhostname)
    }

    /// Signs and checks the held `content` (LF line ends, the whole
    /// message as it will be queued). Err: a temporary failure (a key
    /// that cannot be used); the message is deferred, never sent unsigned.
    pub fn finish(
        &self,
        id: &str,
        plan: &Plan,
        new: &NewMessage,
        content: &[u8],
    ) -> Result<Outcome, String> {
        let mut out = Outcome::default();
        let crlf = to_crlf(content);
        if let Some(k) = &plan.sign {
            let signer = self.signer(k)?;
            let sig = match &*signer {
                Signer::Rsa(s) => s.sign(&crlf),
                Signer::Ed25519(s) => s.sign(&crlf),
            }
            .map_err(|e| format!("DKIM signing failed: {e}"))?;
            info!(
                "{id}: DKIM-Signature field added (s={}, d={})",
                k.selector, k.domain
            );
            out.prepend.push(from_crlf(&sig.to_header()));
        }
        if plan.check {
            self.check(id, new, &crlf, &mut out);
        }
        Ok(out)
    }

    fn signer(&self, k: &KeyRef) -> Result<Arc<Signer>, String> {
        if let Some(s) = self.signers.lock().unwrap().get(k) {
            return Ok(s.clone());
        }
        let pem = match self.keys.get(&k.key_file) {
            Some(Ok(pem)) => pem.clone(),
            Some(Err(e)) => return Err(format!("DKIM key unusable: {e}")),
            // Named by a table that cannot be listed: read now (it must
            // be readable by mail_owner).
            None => dkim_table::read_key_file(&k.key_file)
                .map_err(|e| format!("DKIM key unusable: {e}"))?,
        };
        let key = parse_key(&pem).map_err(|e| format!("DKIM key unusable: {e}"))?;
        let headers = self.headers.clone();
        let signer = Arc::new(match key {
            Key::Rsa(r) => Signer::Rsa(
                DkimSigner::from_key(r)
                    .domain(&k.domain)
                    .selector(&k.selector)
                    .headers(headers)
                    .header_canonicalization(Canonicalization::Relaxed)
                    .body_canonicalization(Canonicalization::Relaxed),
            ),
            Key::Ed25519(e) => Signer::Ed25519(
                DkimSigner::from_key(e)
                    .domain(&k.domain)
                    .selector(&k.selector)
                    .headers(headers)
                    .header_canonicalization(Canonicalization::Relaxed)
                    .body_canonicalization(Canonicalization::Relaxed),
            ),
        });
        self.signers
            .lock()
            .unwrap()
            .insert(k.clone(), signer.clone());
        Ok(signer)
    }

    fn resolver(&self) -> Result<&BlockingResolver, String> {
        self.resolver
            .get_or_init(|| BlockingResolver::new(&self.dns_servers, self.dns_timeout))
            .as_ref()
            .map_err(|e| e.clone())
    }

    fn check(&self, id: &str, new: &NewMessage, crlf: &[u8], out: &mut Outcome) {
        let attr = |name: &str| {
            new.attrs
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, v)| v.as_str())
        };
        let res = match self.resolver() {
            Ok(r) => r,
            Err(e) => {
                warning!("{id}: authentication checks skipped: {e}");
                return;
            }
        };
        let Some(msg) = AuthenticatedMessage::parse(crlf) else {
            warning!("{id}: authentication checks skipped: message not parsable");
            return;
        };
        let auth = MessageAuthenticator(res.resolver.clone());
        let ip = attr(qfile::attr::CLIENT).and_then(client_ip);
        let helo = attr(qfile::attr::HELO).unwrap_or("").to_string();
        let sender = new.sender.as_str();
        let host = self.myhostname.as_str();
        let mut ar = AuthenticationResults::new(host);
        let dkim_out = if self.dkim || self.dmarc {
            res.rt.block_on(auth.verify_dkim(&msg))
        } else {
            Vec::new()
        };
        if self.dkim {
            // A body that does not match its signature's hash is a failed
            // signature (RFC 6376 section 6.1.3, RFC 8601 "fail");
            // mail-auth calls it neutral.
            let shown: Vec<DkimOutput> = dkim_out
                .iter()
                .map(|o| match (o.result(), o.signature()) {
                    (
                        DkimResult::Neutral(
                            e @ mail_auth::Error::Dkim(DkimError::FailedBodyHashMatch),
                        ),
                        Some(sig),
                    ) => DkimOutput::fail(e.clone()).with_signature(sig),
                    _ => o.clone(),
                })
                .collect();
            ar = ar.with_dkim_results(&shown, msg.from());
        }
        let spf_out = match ip {
            Some(ip) if self.spf || self.dmarc => {
                let helo_domain = if helo.is_empty() { "unknown" } else { &helo };
                Some(res.rt.block_on(auth.verify_spf(SpfParameters::verify(
                    ip,
                    helo_domain,
                    host,
                    sender,
                ))))
            }
            _ => None,
        };
        if self.spf {
            if let (Some(spf), Some(ip)) = (&spf_out, ip) {
                ar = ar.with_spf_mailfrom_result(spf, ip, sender, &helo);
            }
        }
        if self.dmarc {
            if let Some(spf) = &spf_out {
                let mail_from_domain = sender
                    .rsplit_once('@')
                    .map(|(_, d)| d)
                    .unwrap_or(helo.as_str());
                let dmarc = res.rt.block_on(auth.verify_dmarc(DmarcParameters::new(
                    &msg,
                    &dkim_out,
                    mail_from_domain,
                    spf,
                )));
                ar = ar.with_dmarc_result(&dmarc);
                // The domain has a policy and neither SPF nor DKIM gave
                // an aligned pass (a DNS failure is no DMARC failure).
                if matches!(dmarc.result(), DmarcResult::Fail(_)) {
                    let why = format!(
                        "DMARC policy of {} not met (p={})",
                        dmarc.domain(),
                        policy_name(dmarc.policy())
                    );
                    match (self.dmarc_action, dmarc.policy()) {
                        (DmarcAction::Reject, Policy::Reject) => out.reject = Some(why),
                        (DmarcAction::Reject, Policy::Quarantine)
                        | (DmarcAction::Quarantine, Policy::Reject | Policy::Quarantine) => {
                            out.hold = Some(why)
                        }
                        _ => {}
                    }
                }
            }
        }
        let mut header = from_crlf(&ar.to_header());
        if self.dkim && dkim_out.is_empty() {
            // No signature: say so (RFC 8601 "none").
            header = match header.strip_suffix("; none\n") {
                Some(h) => format!("{h};\n\tdkim=none\n"),
                None => format!("{};\n\tdkim=none\n", header.trim_end_matches('\n')),
            };
        }
        let summary: Vec<&str> = header
            .lines()
            .skip(1)
            .filter_map(|l| l.split_whitespace().next())
            .collect();
        info!("{id}: authentication results: {}", summary.join(" "));
        out.prepend.push(header);
    }
}

fn policy_name(p: Policy) -> &'static str {
    match p {
        Policy::None => "none",
        Policy::Quarantine => "quarantine",
        Policy::Reject => "reject",
        Policy::Unspecified => "unspecified",
    }
}

enum Key {
    Rsa(RsaKey<Sha256>),
    Ed25519(Ed25519Key),
}

/// The PKCS#8 (v1, RFC 8410) form of an Ed25519 seed.
fn ed25519_pkcs8(seed: &[u8]) -> Vec<u8> {
    let mut der = vec![
        0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22, 0x04,
        0x20,
    ];
    der.extend_from_slice(seed);
    der
}

/// A private key file (see the module doc for its forms): RSA (PKCS#1
/// or PKCS#8) or Ed25519.
fn parse_key(data: &[u8]) -> Result<Key, String> {
    let text = std::str::from_utf8(data).unwrap_or("").trim();
    if text.starts_with("-----BEGIN") {
        let der = PrivateKeyDer::from_pem_slice(data).map_err(|e| format!("not a PEM key: {e}"))?;
        return parse_der(der);
    }
    if !text.is_empty() && !text.contains(char::is_whitespace) {
        if let Some(raw) = postern_common::base64::decode(text) {
            return match raw.len() {
                32 => Ed25519Key::from_pkcs8_maybe_unchecked_der(&ed25519_pkcs8(&raw))
                    .map(Key::Ed25519)
                    .map_err(|e| format!("bad Ed25519 seed: {e}")),
                64 => Ed25519Key::from_seed_and_public_key(&raw[..32], &raw[32..])
                    .map(Key::Ed25519)
                    .map_err(|e| format!("bad Ed25519 key (seed and public key): {e}")),
                n => Err(format!(
                    "base64 of {n} bytes: neither an Ed25519 seed (32) nor seed and public \
                     key (64)"
                )),
            };
        }
    }
    // Binary DER, PKCS#8 or PKCS#1 (OpenDKIM reads it too).
    if data.first() == Some(&0x30) {
        let p8 = PrivateKeyDer::Pkcs8(data.to_vec().into());
        if let Ok(k) = parse_der(p8) {
            return Ok(k);
        }
        return parse_der(PrivateKeyDer::Pkcs1(data.to_vec().into()));
    }
    Err("not a key: PEM, DER, or an Ed25519 seed in base64".into())
}

fn parse_der(der: PrivateKeyDer<'_>) -> Result<Key, String> {
    match &der {
        PrivateKeyDer::Pkcs8(p8) => {
            if let Ok(e) = Ed25519Key::from_pkcs8_maybe_unchecked_der(p8.secret_pkcs8_der()) {
                return Ok(Key::Ed25519(e));
            }
            RsaKey::<Sha256>::from_key_der(der.clone_key())
                .map(Key::Rsa)
                .map_err(|e| format!("neither an RSA nor an Ed25519 key: {e}"))
        }
        PrivateKeyDer::Pkcs1(_) => RsaKey::<Sha256>::from_key_der(der.clone_key())
            .map(Key::Rsa)
            .map_err(|e| format!("bad RSA key: {e}")),
        _ => Err("unsupported key type (RSA or Ed25519 only)".into()),
    }
}

/// The address in a `client` attribute, `name[address]`.
fn client_ip(client: &str) -> Option<IpAddr> {
    let inner = client.rsplit_once('[')?.1.strip_suffix(']')?;
    let inner = inner.strip_prefix("IPv6:").unwrap_or(inner);
    inner.parse().ok()
}

/// LF line ends to CRLF (the form DKIM signs and SMTP sends).
pub fn to_crlf(lf: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(lf.len() + lf.len() / 32 + 2);
    let mut prev = 0u8;
    for &b in lf {
        if b == b'\n' && prev != b'\r' {
            out.push(b'\r');
        }
        out.push(b);
        prev = b;
    }
    out
}

fn from_crlf(s: &str) -> String {
    s.replace("\r\n", "\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_addresses() {
        assert_eq!(
            client_ip("host.example[192.0.2.1]"),
            Some("192.0.2.1".parse().unwrap())
        );
        assert_eq!(client_ip("unknown[IPv6:::1]"), Some("::1".parse().unwrap()));
        assert_eq!(client_ip("local"), None);
    }

    #[test]
    fn raw_ed25519_keys() {
        let seed = postern_common::base64::encode(&[7u8; 32]);
        assert!(matches!(parse_key(seed.as_bytes()), Ok(Key::Ed25519(_))));
        // Seed and a public key that is not its own: refused.
        let wrong = postern_common::base64::encode(&[7u8; 64]);
        assert!(parse_key(wrong.as_bytes()).is_err());
        let short = postern_common::base64::encode(&[7u8; 10]);
        assert!(parse_key(short.as_bytes()).is_err());
        assert!(parse_key(b"hello world").is_err());
    }

    #[test]
    fn crlf() {
        assert_eq!(to_crlf(b"a\nb\r\nc\n"), b"a\r\nb\r\nc\r\n");
    }
}
