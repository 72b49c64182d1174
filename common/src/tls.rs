//! TLS configuration shared by Postern's servers: certificates and keys
//! from PEM files, a rustls [`ServerConfig`] built with the `aws-lc-rs`
//! provider (never `ServerConfig::builder()`, which panics when two
//! providers are compiled in), and the names Postfix logs for what was
//! negotiated.
//!
//! Client-side certificate verification is the SMTP client's business and
//! does not live here.

use rustls::crypto::aws_lc_rs;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::sign;
use rustls::{ProtocolVersion, ServerConfig, SupportedCipherSuite};
use std::sync::Arc;

pub use rustls;

/// The crypto provider every Postern TLS configuration uses: aws-lc-rs,
/// whose X25519 and RSA signatures cost about half of ring's here
/// (`bench/results/tls-e.md`: X25519 key pair and agreement 0.039 ms
/// against 0.063–0.075, RSA-2048 PSS signature 0.31 against 0.64–0.69;
/// ECDSA P-256 the same). Its key exchange groups are limited to those
/// ring's provider offered (X25519, P-256, P-384; not aws-lc-rs's default
/// X25519MLKEM768 hybrid): what peers negotiate, and what is logged, stays
/// as it was.
///
/// Its TLS 1.3 suites come in BoringSSL's order (Chrome's, Go's):
/// AES-128-GCM first, then AES-256-GCM and ChaCha20. The SMTP client offers
/// them so, and a receiver that follows its client's order (OpenSSL's
/// default, Postfix's) answers with AES-128-GCM, whose SHA-256 costs
/// less than AES-256-GCM's SHA-384 on either side (see
/// [`ServerTls::config_for`]). The TLS 1.2 suites keep aws-lc-rs's order.
pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    use aws_lc_rs::kx_group;
    let mut cipher_suites = aws_lc_rs::default_provider().cipher_suites;
    // A stable sort: only TLS_AES_128_GCM_SHA256 moves, to the front.
    cipher_suites.sort_by_key(|s| s.suite() != rustls::CipherSuite::TLS13_AES_128_GCM_SHA256);
    Arc::new(rustls::crypto::CryptoProvider {
        kx_groups: vec![kx_group::X25519, kx_group::SECP256R1, kx_group::SECP384R1],
        cipher_suites,
        ..aws_lc_rs::default_provider()
    })
}

/// One certificate chain and its key.
pub struct CertifiedKey {
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
}

/// Certificates and the private key read from PEM files the way Postfix
/// reads `*_tls_cert_file` and `*_tls_key_file`: `cert_file` holds the
/// server certificate first, then any intermediates; `key_file` (when
/// empty, `cert_file`) holds the key. Errors name the file and the cause.
pub fn load_cert_and_key(cert_file: &str, key_file: &str) -> Result<CertifiedKey, String> {
    let key_file = if key_file.is_empty() {
        cert_file
    } else {
        key_file
    };
    let chain = load_certs(cert_file).map_err(|e| format!("{cert_file}: {e}"))?;
    let key = load_key(key_file).map_err(|e| format!("{key_file}: {e}"))?;
    Ok(CertifiedKey { chain, key })
}

/// The certificates of a PEM file; the error is the cause alone.
pub fn load_certs(file: &str) -> Result<Vec<CertificateDer<'static>>, String> {
    let data = std::fs::read(file).map_err(|e| format!("cannot read certificate: {e}"))?;
    let certs: Vec<_> = CertificateDer::pem_slice_iter(&data)
        .collect::<Result<_, _>>()
        .map_err(|e| format!("cannot parse certificate: {e}"))?;
    if certs.is_empty() {
        return Err("no certificate in the file".into());
    }
    Ok(certs)
}

/// The (first) private key of a PEM file; the error is the cause alone.
fn load_key(file: &str) -> Result<PrivateKeyDer<'static>, String> {
    let data = std::fs::read(file).map_err(|e| format!("cannot read private key: {e}"))?;
    PrivateKeyDer::from_pem_slice(&data).map_err(|e| match e {
        rustls::pki_types::pem::Error::NoItemsFound => "no private key in the file".to_string(),
        e => format!("cannot parse private key: {e}"),
    })
}

/// A server configuration offering TLS 1.2 and 1.3 with `key`, asking
/// for no client certificate (tests and simple callers).
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

/// smtpd's TLS configurations (see [`smtpd_server_config`]): the one
/// main.cf describes and, beside it, the same with only AES-128-GCM
/// among the TLS 1.3 suites, for the clients that [`ServerTls::config_for`]
/// gives it.
#[derive(Clone, Debug)]
pub struct ServerTls {
    /// What main.cf describes: every client the others do not serve.
    pub config: Arc<ServerConfig>,
    /// TLS 1.3 with TLS_AES_128_GCM_SHA256 only (None where main.cf
    /// leaves out either AES-GCM suite or TLS 1.3, or the server's order
    /// rules, `tls_preempt_cipherlist = yes`).
    aes128: Option<Arc<ServerConfig>>,
}

impl ServerTls {
    /// One configuration for every client (tests, simple callers).
    pub fn single(config: Arc<ServerConfig>) -> ServerTls {
        ServerTls {
            config,
            aes128: None,
        }
    }

    /// The configuration for a client whose ClientHello offers `suites`.
    ///
    /// As Postfix (`tls_preempt_cipherlist = no`), smtpd follows the
    /// client's order, with one exception, which Go's TLS servers and
    /// BoringSSL's make too: where the client's first TLS 1.3 choice is
    /// TLS_AES_256_GCM_SHA384 and it also offers TLS_AES_128_GCM_SHA256
    /// (every TLS 1.3 client must, RFC 8446 9.1), it gets AES-128-GCM.
    /// Both are AEADs of OpenSSL's HIGH class; beside an X25519 or P-256
    /// key exchange (128-bit strength) the longer key adds nothing, while
    /// the suite's SHA-384 (transcript hash and key schedule) costs a
    /// third of a P-256 handshake's CPU on CPUs where aws-lc has no SIMD
    /// SHA-512 (`bench/results/tls-l.md`, "in process"). OpenSSL's
    /// clients, Postfix's and Python's among them, put AES-256-GCM
    /// first; a client that puts ChaCha20 first (no AES instructions) is
    /// followed. (testssl.sh still finds no server order: its two
    /// ClientHellos get ChaCha20 and AES-128-GCM.)
    pub fn config_for(&self, suites: &[rustls::CipherSuite]) -> &Arc<ServerConfig> {
        use rustls::CipherSuite as C;
        let Some(aes128) = &self.aes128 else {
            return &self.config;
        };
        // The client's first choice among the TLS 1.3 suites smtpd has.
        let ours = &self.config.crypto_provider().cipher_suites;
        let first_tls13 = suites.iter().find(|s| {
            ours.iter()
                .any(|o| matches!(o, SupportedCipherSuite::Tls13(_)) && o.suite() == **s)
        });
        if first_tls13 == Some(&C::TLS13_AES_256_GCM_SHA384)
            && suites.contains(&C::TLS13_AES_128_GCM_SHA256)
        {
            aes128
        } else {
            &self.config
        }
    }
}

/// smtpd's TLS configuration, as Postfix's smtpd builds it from
/// postconf(5)'s parameters:
/// - keys: `smtpd_tls_chain_files`, else `smtpd_tls_cert_file`/`key_file`
///   and `smtpd_tls_eccert_file`/`eckey_file` (an RSA and an ECDSA
///   certificate side by side, each client served the one it can check);
///   a key that does not match its certificate is an error;
/// - `smtpd_tls_mandatory_protocols` and `smtpd_tls_mandatory_ciphers`
///   (with `smtpd_tls_mandatory_exclude_ciphers`) at level `encrypt`,
///   else `smtpd_tls_protocols` and `smtpd_tls_ciphers`; with
///   `smtpd_tls_exclude_ciphers` always;
/// - `tls_preempt_cipherlist`: the server's cipher order wins (else the
///   client's, but for [`ServerTls::config_for`]'s one exception);
/// - `smtpd_tls_session_cache_timeout`: 0 turns off session resumption
///   (session IDs and tickets), else both are on, with tickets every smtpd
///   process can decrypt (crate::tls_tickets), unless
///   `tls_session_ticket_cipher` is empty.
///
/// smtpd reads the files as root, before it drops its privileges;
/// `postern check` reads them the same way to report a missing, unusable
/// or mismatched key before a client finds STARTTLS gone.
pub fn smtpd_server_config(cfg: &postern_conf::Config) -> Result<ServerTls, String> {
    let keys: Arc<dyn rustls::server::ResolvesServerCert> = Arc::new(KeysBySignature {
        keys: smtpd_keys(cfg)?,
    });
    let mandatory = cfg
        .get("smtpd_tls_security_level")
        .trim()
        .eq_ignore_ascii_case("encrypt");
    let Profile { versions, provider } = profile(cfg, "smtpd", mandatory)?;
    let ask_ccert = cfg
        .get_bool("smtpd_tls_ask_ccert")
        .map_err(|e| e.to_string())?;
    let preempt = cfg.get_bool("tls_preempt_cipherlist").unwrap_or(false);
    let build = |provider: Arc<rustls::crypto::CryptoProvider>| -> Result<ServerConfig, String> {
        let builder = ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&versions)
            .map_err(|e| {
                format!("TLS configuration (smtpd_tls_*protocols, smtpd_tls_*ciphers): {e}")
            })?;
        // smtpd_tls_ask_ccert: any certificate (or none) is taken; whether it
        // is trusted, and its fingerprints, are for the restrictions.
        let builder = if ask_ccert {
            builder
                .with_client_cert_verifier(Arc::new(crate::tls_ccert::AnyClientCert { provider }))
        } else {
            builder.with_no_client_auth()
        };
        let mut config = builder.with_cert_resolver(keys.clone());
        config.ignore_client_order = preempt;
        Ok(config)
    };
    let mut config = build(provider.clone())?;
    let timeout = cfg
        .get_time("smtpd_tls_session_cache_timeout")
        .map_err(|e| e.to_string())?;
    if timeout == 0 {
        config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
        config.send_tls13_tickets = 0;
    } else {
        // Clients come back to whichever smtpd process master gives
        // them: tickets sealed with keys every smtpd shares
        // (crate::tls_tickets) resume there, as Postfix's tlsmgr keys do.
        // A TLS 1.2 client without tickets resumes by session ID with
        // the process that served it (no shared cache database).
        config.session_storage = rustls::server::ServerSessionMemoryCache::new(1024);
        if !cfg.get("tls_session_ticket_cipher").trim().is_empty() {
            // One ticket per full handshake, as Postfix's smtpd sends.
            config.send_tls13_tickets = 1;
            let path = crate::tls_tickets::secret_path(cfg);
            config.ticketer = match crate::tls_tickets::load_or_create_secret(&path) {
                Ok(secret) => Arc::new(crate::tls_tickets::SharedTicketer::new(secret, timeout)),
                Err(e) => {
                    crate::warning!("TLS session ticket key {e}: tickets of this process only");
                    Arc::new(TicketLifetime {
                        inner: aws_lc_rs::Ticketer::new()
                            .map_err(|e| format!("TLS session tickets: {e}"))?,
                        lifetime: timeout.min(7 * 86400) as u32,
                    })
                }
            };
        }
        // Postfix: an empty tls_session_ticket_cipher turns tickets off
        // (rustls's default ticketer issues none).
    }
    use rustls::CipherSuite as C;
    let has = |c: C| provider.cipher_suites.iter().any(|s| s.suite() == c);
    let tls13 = versions
        .iter()
        .any(|v| v.version == ProtocolVersion::TLSv1_3);
    let aes128 = if !preempt
        && tls13
        && has(C::TLS13_AES_128_GCM_SHA256)
        && has(C::TLS13_AES_256_GCM_SHA384)
    {
        let only_aes128 = rustls::crypto::CryptoProvider {
            cipher_suites: provider
                .cipher_suites
                .iter()
                .copied()
                .filter(|s| {
                    !matches!(s, SupportedCipherSuite::Tls13(_))
                        || s.suite() == C::TLS13_AES_128_GCM_SHA256
                })
                .collect(),
            ..(*provider).clone()
        };
        let mut second = build(Arc::new(only_aes128))?;
        // The same sessions and tickets: a client resumes with either.
        second.session_storage = config.session_storage.clone();
        second.ticketer = config.ticketer.clone();
        second.send_tls13_tickets = config.send_tls13_tickets;
        Some(Arc::new(second))
    } else {
        None
    };
    Ok(ServerTls {
        config: Arc::new(config),
        aes128,
    })
}

/// The protocol versions and cipher suites one side offers.
pub struct Profile {
    pub versions: Vec<&'static rustls::SupportedProtocolVersion>,
    pub provider: Arc<rustls::crypto::CryptoProvider>,
}

/// Postfix's protocol and cipher settings of `side` (`smtpd`, `smtp`,
/// `lmtp`): `SIDE_tls_mandatory_protocols`, `SIDE_tls_mandatory_ciphers`
/// and `SIDE_tls_mandatory_exclude_ciphers` where TLS is `mandatory`,
/// `SIDE_tls_protocols` and `SIDE_tls_ciphers` otherwise, and
/// `SIDE_tls_exclude_ciphers` always. A parameter missing from the table
/// (`lmtp_`) is read under its `smtp_` name.
pub fn profile(cfg: &postern_conf::Config, side: &str, mandatory: bool) -> Result<Profile, String> {
    let name = |rest: &str| {
        let n = format!("{side}_{rest}");
        if side == "smtpd" {
            n
        } else {
            postern_conf::params::smtp_client_param(side == "lmtp", &format!("smtp_{rest}"))
        }
    };
    let (proto_param, grade_param) = if mandatory {
        (
            name("tls_mandatory_protocols"),
            name("tls_mandatory_ciphers"),
        )
    } else {
        (name("tls_protocols"), name("tls_ciphers"))
    };
    let versions =
        parse_protocols(&cfg.get(&proto_param)).map_err(|e| format!("{proto_param}: {e}"))?;
    let mut exclude = cfg.get_list(&name("tls_exclude_ciphers"));
    if mandatory {
        exclude.extend(cfg.get_list(&name("tls_mandatory_exclude_ciphers")));
    }
    let suites = cipher_suites(&cfg.get(&grade_param), &exclude)
        .map_err(|e| format!("{grade_param}: {e}"))?;
    let tls13 = suites
        .iter()
        .any(|s| matches!(s, SupportedCipherSuite::Tls13(_)));
    let tls12 = suites
        .iter()
        .any(|s| matches!(s, SupportedCipherSuite::Tls12(_)));
    let versions: Vec<_> = versions
        .into_iter()
        .filter(|v| match v.version {
            ProtocolVersion::TLSv1_3 => tls13,
            _ => tls12,
        })
        .collect();
    if versions.is_empty() {
        return Err(format!(
            "{proto_param} and the cipher exclusions leave no usable protocol"
        ));
    }
    Ok(Profile {
        versions,
        provider: Arc::new(rustls::crypto::CryptoProvider {
            cipher_suites: suites,
            ..(*provider()).clone()
        }),
    })
}

/// smtpd's certificates and keys, each checked against its certificate.
/// An error names the parameter, its file and the cause
/// (`smtpd_tls_key_file = /etc/ssl/k.pem: cannot read private key: ...`).
fn smtpd_keys(cfg: &postern_conf::Config) -> Result<Vec<Arc<sign::CertifiedKey>>, String> {
    let chain = cfg.get_list("smtpd_tls_chain_files");
    let mut keys = Vec::new();
    if !chain.is_empty() {
        for (file, k) in
            load_chain_keys(&chain).map_err(|e| format!("smtpd_tls_chain_files: {e}"))?
        {
            keys.push(certified(k, &format!("smtpd_tls_chain_files = {file}"))?);
        }
    } else {
        let cert = cfg.get("smtpd_tls_cert_file");
        let eccert = cfg.get("smtpd_tls_eccert_file");
        if cert.is_empty() && eccert.is_empty() {
            return Err("no certificate: set smtpd_tls_cert_file or smtpd_tls_chain_files".into());
        }
        for (cert_param, key_param) in [
            ("smtpd_tls_cert_file", "smtpd_tls_key_file"),
            ("smtpd_tls_eccert_file", "smtpd_tls_eckey_file"),
        ] {
            let c = cfg.get(cert_param);
            if c.is_empty() {
                continue;
            }
            let k = cfg.get(key_param);
            // An empty key file: the key is in the certificate file.
            let (key_param, k) = if k.is_empty() {
                (cert_param, c.clone())
            } else {
                (key_param, k)
            };
            let chain = load_certs(&c).map_err(|e| format!("{cert_param} = {c}: {e}"))?;
            let key = load_key(&k).map_err(|e| format!("{key_param} = {k}: {e}"))?;
            let what = if k == c {
                format!("{cert_param} = {c}")
            } else {
                format!("{key_param} = {k}, {cert_param} = {c}")
            };
            keys.push(certified(CertifiedKey { chain, key }, &what)?);
        }
    }
    Ok(keys)
}

/// A chain and key as rustls signs with them; an error when the key is
/// not the certificate's (`what` names the parameters and files).
fn certified(k: CertifiedKey, what: &str) -> Result<Arc<sign::CertifiedKey>, String> {
    let signing = provider()
        .key_provider
        .load_private_key(k.key)
        .map_err(|e| format!("{what}: unusable private key: {e}"))?;
    let ck = sign::CertifiedKey::new(k.chain, Arc::new(ClientOrder(signing)));
    match ck.keys_match() {
        Ok(()) => Ok(Arc::new(ck)),
        Err(rustls::Error::InconsistentKeys(_)) => Err(format!(
            "{what}: private key does not match public key in certificate"
        )),
        Err(e) => Err(format!("{what}: certificate or key not usable: {e}")),
    }
}

/// A key that signs with the first scheme of the client's list it can
/// use, as OpenSSL does for Postfix (rustls's own keys prefer their own
/// order: SHA-512 before SHA-256), so that `server-digest` is Postfix's.
#[derive(Debug)]
struct ClientOrder(Arc<dyn sign::SigningKey>);

impl sign::SigningKey for ClientOrder {
    fn choose_scheme(&self, offered: &[rustls::SignatureScheme]) -> Option<Box<dyn sign::Signer>> {
        offered
            .iter()
            .find_map(|s| self.0.choose_scheme(std::slice::from_ref(s)))
    }
    fn public_key(&self) -> Option<rustls::pki_types::SubjectPublicKeyInfoDer<'_>> {
        self.0.public_key()
    }
    fn algorithm(&self) -> rustls::SignatureAlgorithm {
        self.0.algorithm()
    }
}

/// Every key of `files` with the certificates that follow it (Postfix's
/// `*_tls_chain_files`: "one or more private keys directly followed by a
/// corresponding certificate chain"). The files are read as one sequence,
/// as Postfix does: a key in one file and its chain in the next
/// (`key.pem cert.pem`) is one pair. Certificates before the only key are
/// taken too.
pub fn load_chain_keys(files: &[String]) -> Result<Vec<(String, CertifiedKey)>, String> {
    use rustls::pki_types::pem::SectionKind;
    // (file of the key, key, chain)
    let mut groups: Vec<(String, PrivateKeyDer<'static>, Vec<CertificateDer<'static>>)> =
        Vec::new();
    let mut leading: Vec<CertificateDer<'static>> = Vec::new();
    for f in files {
        let data = std::fs::read(f).map_err(|e| format!("{f}: cannot read: {e}"))?;
        for item in <(SectionKind, Vec<u8>)>::pem_slice_iter(&data) {
            let (kind, der) = item.map_err(|e| format!("{f}: cannot parse: {e}"))?;
            let key = match kind {
                SectionKind::Certificate => {
                    match groups.last_mut() {
                        Some((_, _, certs)) => certs.push(CertificateDer::from(der)),
                        None => leading.push(CertificateDer::from(der)),
                    }
                    continue;
                }
                SectionKind::PrivateKey => PrivateKeyDer::Pkcs8(der.into()),
                SectionKind::RsaPrivateKey => PrivateKeyDer::Pkcs1(der.into()),
                SectionKind::EcPrivateKey => PrivateKeyDer::Sec1(der.into()),
                _ => continue,
            };
            groups.push((f.clone(), key, Vec::new()));
        }
    }
    if groups.len() == 1 && groups[0].2.is_empty() && !leading.is_empty() {
        groups[0].2 = std::mem::take(&mut leading);
    }
    if groups.is_empty() {
        return Err(match files {
            [] => "no files in the chain file list".into(),
            _ => format!("{}: no private key in the file", files.join(", ")),
        });
    }
    let mut out = Vec::new();
    for (n, (f, key, chain)) in groups.into_iter().enumerate() {
        if chain.is_empty() {
            return Err(format!("{f}: no certificate after private key {}", n + 1));
        }
        out.push((f, CertifiedKey { chain, key }));
    }
    Ok(out)
}

/// Chooses among smtpd's certificates (RSA, ECDSA) the one the client can
/// verify: the first whose key can sign with a signature scheme the client
/// offered and, for TLS 1.2, that an offered cipher suite can use.
/// ECDSA comes first, as OpenSSL chooses for Postfix.
#[derive(Debug)]
struct KeysBySignature {
    keys: Vec<Arc<sign::CertifiedKey>>,
}

impl rustls::server::ResolvesServerCert for KeysBySignature {
    fn resolve(&self, hello: rustls::server::ClientHello<'_>) -> Option<Arc<sign::CertifiedKey>> {
        // Runs once per full handshake: no allocation but the log words.
        let offered = hello.signature_schemes();
        let suites = hello.cipher_suites();
        // TLS 1.3 suites are 0x13XX (RFC 8446, B.4).
        let tls13 = suites.iter().any(|s| u16::from(*s) >> 8 == 0x13);
        let usable = |k: &&Arc<sign::CertifiedKey>| {
            let Some(signer) = k.key.choose_scheme(offered) else {
                return false;
            };
            drop(signer);
            let auth = match k.key.algorithm() {
                rustls::SignatureAlgorithm::ECDSA => "-ECDSA-",
                _ => "-RSA-",
            };
            tls13
                || aws_lc_rs::DEFAULT_CIPHER_SUITES
                    .iter()
                    .any(|s| cipher_name(*s).contains(auth) && suites.contains(&s.suite()))
        };
        // ECDSA first, as OpenSSL chooses for Postfix.
        let is_ecdsa =
            |k: &&Arc<sign::CertifiedKey>| k.key.algorithm() == rustls::SignatureAlgorithm::ECDSA;
        let chosen = self
            .keys
            .iter()
            .filter(is_ecdsa)
            .chain(self.keys.iter().filter(|k| !is_ecdsa(k)))
            .find(usable)?;
        let signature = chosen
            .key
            .choose_scheme(offered)
            .map(|s| server_signature(chosen, s.scheme()));
        CHOSEN_SIGNATURE.with(|c| *c.borrow_mut() = signature);
        Some(chosen.clone())
    }
}

thread_local! {
    /// What the last certificate choice on this thread will sign with.
    /// smtpd's loop drives one handshake at a time on its thread: right
    /// after rustls processed a ClientHello it takes the value for that
    /// connection ([`take_server_signature`]); rustls says nothing of
    /// the key it used.
    static CHOSEN_SIGNATURE: std::cell::RefCell<Option<String>> = const { std::cell::RefCell::new(None) };
}

/// Postfix's ` server-signature RSA-PSS (2048 bits) server-digest SHA256`
/// words for the certificate chosen last on this thread, once.
pub fn take_server_signature() -> Option<String> {
    CHOSEN_SIGNATURE.with(|c| c.borrow_mut().take())
}

/// `RSA-PSS (2048 bits) server-digest SHA512`, `ECDSA (prime256v1) server-digest SHA256`.
fn server_signature(key: &sign::CertifiedKey, scheme: rustls::SignatureScheme) -> String {
    use rustls::SignatureScheme as S;
    let digest = match scheme {
        S::RSA_PSS_SHA256 | S::RSA_PKCS1_SHA256 | S::ECDSA_NISTP256_SHA256 => "SHA256",
        S::RSA_PSS_SHA384 | S::RSA_PKCS1_SHA384 | S::ECDSA_NISTP384_SHA384 => "SHA384",
        S::RSA_PSS_SHA512 | S::RSA_PKCS1_SHA512 | S::ECDSA_NISTP521_SHA512 => "SHA512",
        _ => "",
    };
    let what = match key.key.algorithm() {
        rustls::SignatureAlgorithm::RSA => {
            let bits = key
                .key
                .public_key()
                .and_then(|spki| rsa_modulus_bits(spki.as_ref()));
            match bits {
                Some(b) => format!("RSA-PSS ({b} bits)"),
                None => "RSA-PSS".into(),
            }
        }
        rustls::SignatureAlgorithm::ECDSA => match scheme {
            S::ECDSA_NISTP256_SHA256 => "ECDSA (prime256v1)".into(),
            S::ECDSA_NISTP384_SHA384 => "ECDSA (secp384r1)".into(),
            S::ECDSA_NISTP521_SHA512 => "ECDSA (secp521r1)".into(),
            _ => "ECDSA".into(),
        },
        rustls::SignatureAlgorithm::ED25519 => "ED25519".into(),
        other => format!("{other:?}"),
    };
    if digest.is_empty() {
        what
    } else {
        format!("{what} server-digest {digest}")
    }
}

/// One DER element: (tag, contents, the rest).
fn der(b: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, b) = b.split_first()?;
    let (&l0, mut b) = b.split_first()?;
    let len = if l0 < 0x80 {
        l0 as usize
    } else {
        let n = (l0 & 0x7f) as usize;
        if n == 0 || n > 4 || b.len() < n {
            return None;
        }
        let len = b[..n].iter().fold(0usize, |a, &x| (a << 8) | x as usize);
        b = &b[n..];
        len
    };
    if b.len() < len {
        return None;
    }
    Some((tag, &b[..len], &b[len..]))
}

/// What Postfix logs of a peer certificate at `*_tls_loglevel` 2:
/// `subject_CN=mx.example.com, issuer_CN=R3, fingerprint=AB:..,
/// pkey_fingerprint=CD:..` (SHA-256 of the certificate and of its public
/// key, as `*_tls_fingerprint_digest` is by default in Postfix 3.7).
pub fn certificate_summary(cert: &[u8]) -> Option<String> {
    let (_, c, _) = der(cert)?; // Certificate
    let (_, tbs, _) = der(c)?; // TBSCertificate
    let (tag, _, mut rest) = der(tbs)?;
    if tag == 0xa0 {
        (_, _, rest) = der(rest)?; // version, then the serial number
    }
    let (_, _, rest) = der(rest)?; // signature algorithm
    let (_, issuer, rest) = der(rest)?;
    let (_, _, rest) = der(rest)?; // validity
    let (_, subject, rest) = der(rest)?;
    let spki_len = rest.len() - der(rest)?.2.len();
    let spki = &rest[..spki_len];
    Some(format!(
        "subject_CN={}, issuer_CN={}, fingerprint={}, pkey_fingerprint={}",
        common_name(subject).unwrap_or_default(),
        common_name(issuer).unwrap_or_default(),
        fingerprint(cert),
        fingerprint(spki)
    ))
}

/// The (first) commonName of an X.501 Name's contents.
fn common_name(mut name: &[u8]) -> Option<String> {
    while !name.is_empty() {
        let (_, set, rest) = der(name)?;
        name = rest;
        let mut set = set;
        while !set.is_empty() {
            let (_, atv, more) = der(set)?;
            set = more;
            let (_, oid, value) = der(atv)?;
            if oid == [0x55, 0x04, 0x03] {
                let (tag, v, _) = der(value)?;
                return Some(match tag {
                    // BMPString: UTF-16BE.
                    0x1e => String::from_utf16_lossy(
                        &v.chunks(2)
                            .map(|p| u16::from_be_bytes([p[0], *p.get(1).unwrap_or(&0)]))
                            .collect::<Vec<_>>(),
                    ),
                    _ => String::from_utf8_lossy(v).into_owned(),
                });
            }
        }
    }
    None
}

/// SHA-256 in Postfix's form: upper-case hex pairs separated by colons.
fn fingerprint(data: &[u8]) -> String {
    let d = ::ring::digest::digest(&::ring::digest::SHA256, data);
    d.as_ref()
        .iter()
        .map(|b| format!("{b:02X}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// The size of an RSA SubjectPublicKeyInfo's modulus.
fn rsa_modulus_bits(spki: &[u8]) -> Option<usize> {
    let (_, spki, _) = der(spki)?; // SEQUENCE
    let (_, _, rest) = der(spki)?; // AlgorithmIdentifier
    let (_, bits, _) = der(rest)?; // BIT STRING
    let (_, rsa, _) = der(bits.get(1..)?)?; // RSAPublicKey
    let (_, n, _) = der(rsa)?;
    let n: &[u8] = {
        let mut n = n;
        while let [0, rest @ ..] = n {
            n = rest;
        }
        n
    };
    let first = *n.first()?;
    Some((n.len() - 1) * 8 + (8 - first.leading_zeros() as usize))
}

/// rustls's ticketer, telling clients the lifetime Postfix's
/// `smtpd_tls_session_cache_timeout` sets.
#[derive(Debug)]
struct TicketLifetime {
    inner: Arc<dyn rustls::server::ProducesTickets>,
    lifetime: u32,
}

impl rustls::server::ProducesTickets for TicketLifetime {
    fn enabled(&self) -> bool {
        self.inner.enabled()
    }
    fn lifetime(&self) -> u32 {
        self.lifetime.min(self.inner.lifetime())
    }
    fn encrypt(&self, plain: &[u8]) -> Option<Vec<u8>> {
        self.inner.encrypt(plain)
    }
    fn decrypt(&self, cipher: &[u8]) -> Option<Vec<u8>> {
        self.inner.decrypt(cipher)
    }
}

/// The protocol versions a Postfix protocol list allows (postconf(5),
/// `smtpd_tls_protocols`): names to include (`TLSv1.2, TLSv1.3`), names
/// to exclude (`!SSLv2, !SSLv3, !TLSv1, !TLSv1.1`), or bounds
/// (`>=TLSv1.2`, `<=TLSv1.3`), separated by commas, colons or spaces.
/// rustls speaks TLS 1.2 and 1.3 only: older names are accepted and have
/// nothing to turn off; an empty result is an error.
pub fn parse_protocols(
    list: &str,
) -> Result<Vec<&'static rustls::SupportedProtocolVersion>, String> {
    const NAMES: [&str; 6] = ["SSLv2", "SSLv3", "TLSv1", "TLSv1.1", "TLSv1.2", "TLSv1.3"];
    let index = |name: &str| {
        NAMES
            .iter()
            .position(|n| n.eq_ignore_ascii_case(name))
            .ok_or_else(|| format!("unknown TLS protocol \"{name}\""))
    };
    let mut include: Option<Vec<bool>> = None;
    let mut allowed = [true; 6];
    for word in list
        .split(|c: char| c == ',' || c == ':' || c.is_whitespace())
        .filter(|w| !w.is_empty())
    {
        if let Some(n) = word.strip_prefix(">=") {
            let i = index(n)?;
            allowed.iter_mut().take(i).for_each(|a| *a = false);
        } else if let Some(n) = word.strip_prefix("<=") {
            let i = index(n)?;
            allowed.iter_mut().skip(i + 1).for_each(|a| *a = false);
        } else if let Some(n) = word.strip_prefix('!') {
            allowed[index(n)?] = false;
        } else {
            let i = index(word)?;
            include.get_or_insert_with(|| vec![false; 6])[i] = true;
        }
    }
    if let Some(inc) = include {
        for (a, i) in allowed.iter_mut().zip(inc) {
            *a &= i;
        }
    }
    let mut v = Vec::new();
    if allowed[5] {
        v.push(&rustls::version::TLS13);
    }
    if allowed[4] {
        v.push(&rustls::version::TLS12);
    }
    if v.is_empty() {
        return Err(format!(
            "\"{}\" leaves neither TLSv1.2 nor TLSv1.3 (the only protocols Postern speaks)",
            list.trim()
        ));
    }
    Ok(v)
}

/// The cipher suites of a Postfix cipher grade (`smtpd_tls_ciphers`:
/// `export`, `low`, `medium`, `high`, `null`) less the exclusions
/// (`smtpd_tls_exclude_ciphers`: OpenSSL cipher names or the aliases
/// `AES`, `AES128`, `AES256`, `AESGCM`, `CHACHA20`, `ECDSA`/`aECDSA`,
/// `RSA`/`aRSA`, `ECDHE`/`kECDHE`/`EECDH`, `SHA256`, `SHA384`), in the
/// server's order. Every suite rustls has is an AEAD cipher of OpenSSL's
/// HIGH class, so `export` to `high` give them all; `null` (no
/// encryption) none. As OpenSSL's cipher list for Postfix, aliases leave
/// the TLS 1.3 suites alone; a TLS 1.3 suite's own name excludes it.
pub fn cipher_suites(grade: &str, exclude: &[String]) -> Result<Vec<SupportedCipherSuite>, String> {
    match grade.trim().to_ascii_lowercase().as_str() {
        "export" | "low" | "medium" | "high" => {}
        "null" => {
            return Err(
                "grade \"null\" asks for ciphers without encryption, which Postern does not have"
                    .into(),
            )
        }
        other => return Err(format!("invalid cipher grade \"{other}\"")),
    }
    let suites: Vec<SupportedCipherSuite> = provider()
        .cipher_suites
        .iter()
        .copied()
        .filter(|s| !exclude.iter().any(|x| cipher_matches(*s, x)))
        .collect();
    if suites.is_empty() {
        return Err("every cipher is excluded".into());
    }
    Ok(suites)
}

/// Whether OpenSSL's cipher name or alias `x` names suite `s`.
fn cipher_matches(s: SupportedCipherSuite, x: &str) -> bool {
    let name = cipher_name(s);
    let x = x.trim().trim_start_matches('!');
    if x.eq_ignore_ascii_case(name)
        || s.suite()
            .as_str()
            .is_some_and(|n| n.eq_ignore_ascii_case(x))
    {
        return true;
    }
    if matches!(s, SupportedCipherSuite::Tls13(_)) {
        return false;
    }
    match x.to_ascii_uppercase().as_str() {
        "AES" => name.contains("AES"),
        "AES128" => name.contains("AES128"),
        "AES256" => name.contains("AES256"),
        "AESGCM" => name.contains("GCM"),
        "CHACHA20" => name.contains("CHACHA20"),
        "ECDSA" | "AECDSA" => name.contains("-ECDSA-"),
        "RSA" | "ARSA" => name.contains("-RSA-"),
        "ECDHE" | "KECDHE" | "EECDH" | "ECDH" | "KEECDH" | "AECDH" => name.starts_with("ECDHE-"),
        "SHA256" => name.ends_with("SHA256") || name.ends_with("POLY1305"),
        "SHA384" => name.ends_with("SHA384"),
        "SHA2" => true,
        _ => false,
    }
}

/// What was negotiated, as Postfix names it in its log lines and in the
/// Received header: `TLSv1.3 with cipher TLS_AES_256_GCM_SHA384 (256/256 bits)`,
/// and for TLS 1.3 `key-exchange X25519 server-signature RSA-PSS (2048 bits)
/// server-digest SHA256`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Negotiated {
    /// `TLSv1.2`, `TLSv1.3`.
    pub protocol: String,
    /// The cipher's OpenSSL name (what Postfix logs).
    pub cipher: String,
    /// Secret bits of the cipher.
    pub bits: u32,
    /// Key exchange as Postfix names it (`X25519`, `ECDHE (prime256v1)`),
    /// TLS 1.3 only (Postfix reports it for TLS 1.3 only).
    pub kx: Option<String>,
    /// The server's signature (`RSA-PSS (2048 bits) server-digest SHA256`),
    /// TLS 1.3 only, when known (smtpd: [`take_server_signature`]).
    pub server_signature: Option<String>,
    /// The certificate chain the client sent (smtpd_tls_ask_ccert).
    pub peer_certs: Vec<CertificateDer<'static>>,
}

impl Negotiated {
    /// From a connection whose handshake is complete.
    pub fn of(conn: &rustls::CommonState) -> Option<Negotiated> {
        let version = conn.protocol_version()?;
        let suite = conn.negotiated_cipher_suite()?;
        let kx = conn
            .negotiated_key_exchange_group()
            .filter(|_| version == ProtocolVersion::TLSv1_3)
            .map(|g| kx_name(g.name()));
        Some(Negotiated {
            protocol: protocol_name(version),
            cipher: cipher_name(suite).to_string(),
            bits: cipher_bits(suite),
            kx,
            server_signature: None,
            peer_certs: conn
                .peer_certificates()
                .map(|c| c.iter().map(|c| c.clone().into_owned()).collect())
                .unwrap_or_default(),
        })
    }

    /// `TLSv1.3 with cipher TLS_AES_256_GCM_SHA384 (256/256 bits)`
    pub fn summary(&self) -> String {
        format!(
            "{} with cipher {} ({}/{} bits)",
            self.protocol, self.cipher, self.bits, self.bits
        )
    }

    /// What Postfix adds after the summary (TLS 1.3):
    /// `key-exchange X25519 server-signature RSA-PSS (2048 bits) server-digest SHA256`;
    /// empty when nothing is known.
    pub fn details(&self) -> String {
        let mut words = Vec::new();
        if let Some(k) = &self.kx {
            words.push(format!("key-exchange {k}"));
        }
        if let Some(s) = &self.server_signature {
            words.push(format!("server-signature {s}"));
        }
        words.join(" ")
    }

    /// The summary and the details, as Postfix's log line has them.
    pub fn log_summary(&self) -> String {
        let d = self.details();
        if d.is_empty() {
            self.summary()
        } else {
            format!("{} {d}", self.summary())
        }
    }
}

/// A key exchange group as Postfix 3.7 with OpenSSL 3 names it.
fn kx_name(g: rustls::NamedGroup) -> String {
    use rustls::NamedGroup as G;
    match g {
        G::X25519 => "X25519".into(),
        G::X448 => "X448".into(),
        G::secp256r1 => "ECDHE (prime256v1)".into(),
        G::secp384r1 => "ECDHE (secp384r1)".into(),
        G::secp521r1 => "ECDHE (secp521r1)".into(),
        other => format!("{other:?}"),
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
        let p = provider();
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
        assert!(load_chain_keys(&[]).is_err());
    }

    #[test]
    fn protocol_lists() {
        let names = |l: &str| -> Vec<String> {
            parse_protocols(l)
                .unwrap()
                .iter()
                .map(|v| protocol_name(v.version))
                .collect()
        };
        assert_eq!(names(">=TLSv1"), ["TLSv1.3", "TLSv1.2"]);
        assert_eq!(names(">=TLSv1.3"), ["TLSv1.3"]);
        assert_eq!(
            names("!SSLv2, !SSLv3, !TLSv1, !TLSv1.1"),
            ["TLSv1.3", "TLSv1.2"]
        );
        assert_eq!(names("!SSLv2:!TLSv1.3"), ["TLSv1.2"]);
        assert_eq!(names("TLSv1.2"), ["TLSv1.2"]);
        assert_eq!(names("<=TLSv1.2"), ["TLSv1.2"]);
        assert!(parse_protocols("<=TLSv1.1").is_err());
        assert!(parse_protocols("TLSv9").unwrap_err().contains("TLSv9"));
    }

    #[test]
    fn grades_and_exclusions() {
        let all = cipher_suites("medium", &[]).unwrap();
        assert_eq!(all.len(), provider().cipher_suites.len());
        assert!(cipher_suites("null", &[]).is_err());
        assert!(cipher_suites("bogus", &[]).is_err());
        let names = |x: &[&str]| -> Vec<&str> {
            let x: Vec<String> = x.iter().map(|s| s.to_string()).collect();
            cipher_suites("high", &x)
                .unwrap()
                .into_iter()
                .map(cipher_name)
                .collect()
        };
        let n = names(&["AES256", "CHACHA20"]);
        assert!(n.contains(&"TLS_AES_256_GCM_SHA384"), "{n:?}");
        assert!(n.contains(&"ECDHE-RSA-AES128-GCM-SHA256"));
        assert!(!n
            .iter()
            .any(|c| c.contains("AES256") || c.contains("CHACHA20-POLY")));
        let n = names(&[
            "TLS_CHACHA20_POLY1305_SHA256",
            "ECDHE-RSA-AES128-GCM-SHA256",
        ]);
        assert!(!n.contains(&"TLS_CHACHA20_POLY1305_SHA256"));
        assert!(!n.contains(&"ECDHE-RSA-AES128-GCM-SHA256"));
    }

    #[test]
    fn rsa_bits() {
        // A 16-bit toy modulus 0xC001, exponent 3, in an SPKI.
        let spki = [
            0x30, 0x17, 0x30, 0x0d, 0x06, 0x09, 0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01,
            0x01, 0x05, 0x00, 0x03, 0x06, 0x00, 0x30, 0x03, 0x02, 0x01, 0x03,
        ];
        assert_eq!(rsa_modulus_bits(&spki), Some(2));
        let spki2 = [
            0x30, 0x19, 0x30, 0x0d, 0x06, 0x09, 0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01,
            0x01, 0x05, 0x00, 0x03, 0x08, 0x00, 0x30, 0x05, 0x02, 0x03, 0x00, 0xc0, 0x01,
        ];
        assert_eq!(rsa_modulus_bits(&spki2), Some(16));
    }
}
