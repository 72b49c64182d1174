//! TLS session tickets every smtpd process can decrypt, so that a client
//! resumes its TLS session whichever smtpd serves it next (master starts
//! smtpd processes on demand; a per-process cache, or rustls's own
//! `Ticketer`, with keys of its own, would resume only with the same
//! process). This is what Postfix's tlsmgr does for its smtpd processes:
//! it hands them the current ticket key and keeps the previous ones for
//! decryption.
//!
//! The secret: 32 random bytes in `data_directory/smtpd_ticket.key`, mode
//! 0600, owned by the user that runs the mail system (root). `postern
//! start` makes a new one at every start (as tlsmgr's keys live as long as
//! the mail system); smtpd makes it when it is missing (master started by
//! hand). smtpd reads it as root, before it drops its privileges.
//!
//! Rotation, as tlsmgr's: the key that encrypts changes every half of
//! `smtpd_tls_session_cache_timeout` (keys derived from the secret and the
//! period's number with HKDF-SHA256), and a ticket is accepted for
//! `smtpd_tls_session_cache_timeout` after it was issued, then never
//! again. A ticket is `1 | issued (u64, big-endian seconds) | nonce (12) |
//! AES-256-GCM(session state)`, the first 9 bytes authenticated too.

use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM, NONCE_LEN};
use ring::hkdf::{Salt, HKDF_SHA256};
use ring::rand::{SecureRandom, SystemRandom};
use std::io::{Read, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

const SECRET_LEN: usize = 32;
const VERSION: u8 = 1;
const HEADER_LEN: usize = 1 + 8;

/// Where the shared ticket secret lives.
pub fn secret_path(cfg: &postern_conf::Config) -> PathBuf {
    PathBuf::from(cfg.get("data_directory")).join("smtpd_ticket.key")
}

/// Writes a new secret (at `postern start`): a temporary file, mode 0600,
/// renamed over the old one.
pub fn renew_secret(path: &Path) -> Result<(), String> {
    let tmp = write_temp(path)?;
    std::fs::rename(&tmp, path).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        format!("{}: {e}", path.display())
    })
}

/// The secret of `path`, made first when there is none (a link, so that
/// processes that race each make theirs and all read the one that won).
pub fn load_or_create_secret(path: &Path) -> Result<[u8; SECRET_LEN], String> {
    match read_secret(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let tmp = write_temp(path)?;
            let linked = std::fs::hard_link(&tmp, path);
            let _ = std::fs::remove_file(&tmp);
            match linked {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(format!("{}: {e}", path.display())),
            }
            read_secret(path).map_err(|e| format!("{}: {e}", path.display()))
        }
        r => r.map_err(|e| format!("{}: {e}", path.display())),
    }
}

fn write_temp(path: &Path) -> Result<PathBuf, String> {
    let mut secret = [0u8; SECRET_LEN];
    SystemRandom::new()
        .fill(&mut secret)
        .map_err(|_| "no random numbers for the TLS ticket key".to_string())?;
    let tmp = path.with_extension(format!("tmp.{}", std::process::id()));
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&tmp)
        .map_err(|e| format!("{}: {e}", tmp.display()))?;
    f.write_all(&secret)
        .and_then(|_| f.sync_all())
        .map_err(|e| format!("{}: {e}", tmp.display()))?;
    Ok(tmp)
}

/// The secret, from a regular file of ours, mode 0600, not a link.
fn read_secret(path: &Path) -> std::io::Result<[u8; SECRET_LEN]> {
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)?;
    let m = f.metadata()?;
    let bad = |why: &str| std::io::Error::new(std::io::ErrorKind::InvalidData, why.to_string());
    if !m.is_file() {
        return Err(bad("not a regular file"));
    }
    if m.uid() != nix::unistd::geteuid().as_raw() || m.mode() & 0o077 != 0 {
        return Err(bad("not a mode 0600 file of the mail system's owner"));
    }
    let mut secret = [0u8; SECRET_LEN];
    f.read_exact(&mut secret)?;
    Ok(secret)
}

/// Tickets sealed with the shared, rotating keys (see the module doc).
pub struct SharedTicketer {
    secret: [u8; SECRET_LEN],
    /// Seconds a ticket stays valid (`smtpd_tls_session_cache_timeout`).
    lifetime: u64,
    rng: SystemRandom,
    /// The key of the last period asked for (derived once per period,
    /// not once per ticket).
    last: std::sync::Mutex<Option<(u64, std::sync::Arc<LessSafeKey>)>>,
}

impl std::fmt::Debug for SharedTicketer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedTicketer")
            .field("lifetime", &self.lifetime)
            .finish_non_exhaustive()
    }
}

impl SharedTicketer {
    pub fn new(secret: [u8; SECRET_LEN], lifetime: u64) -> SharedTicketer {
        SharedTicketer {
            secret,
            lifetime: lifetime.max(1),
            rng: SystemRandom::new(),
            last: std::sync::Mutex::new(None),
        }
    }

    /// Seconds a key encrypts: half the lifetime, as tlsmgr rotates.
    fn period(&self) -> u64 {
        (self.lifetime / 2).max(1)
    }

    /// When the key of the period `issued` falls in stops opening
    /// tickets: a lifetime after its last ticket.
    fn key_expiration(&self, issued: u64) -> u64 {
        (issued / self.period() + 1) * self.period() + self.lifetime
    }

    /// The key of the period `issued` falls in.
    fn key(&self, issued: u64) -> Option<std::sync::Arc<LessSafeKey>> {
        let period = issued / self.period();
        let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((p, k)) = &*last {
            if *p == period {
                return Some(k.clone());
            }
        }
        let k = std::sync::Arc::new(self.derive(period)?);
        *last = Some((period, k.clone()));
        Some(k)
    }

    fn derive(&self, period: u64) -> Option<LessSafeKey> {
        let prk = Salt::new(HKDF_SHA256, b"postern smtpd ticket key").extract(&self.secret);
        let info = period.to_be_bytes();
        let info = [&info[..]];
        let okm = prk.expand(&info, &AES_256_GCM).ok()?;
        Some(LessSafeKey::new(UnboundKey::from(okm)))
    }
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl rustls::server::ProducesTickets for SharedTicketer {
    fn enabled(&self) -> bool {
        true
    }

    fn lifetime(&self) -> u32 {
        // RFC 8446 4.6.1: at most 7 days.
        self.lifetime.min(7 * 86400) as u32
    }

    fn encrypt(&self, plain: &[u8]) -> Option<Vec<u8>> {
        if !ISSUING.with(|i| i.get()) {
            return None;
        }
        let issued = now();
        let key = self.key(issued)?;
        let mut nonce = [0u8; NONCE_LEN];
        self.rng.fill(&mut nonce).ok()?;
        let mut out = Vec::with_capacity(HEADER_LEN + NONCE_LEN + plain.len() + 16);
        out.push(VERSION);
        out.extend_from_slice(&issued.to_be_bytes());
        let mut sealed = plain.to_vec();
        key.seal_in_place_append_tag(
            Nonce::assume_unique_for_key(nonce),
            Aad::from(&out[..HEADER_LEN]),
            &mut sealed,
        )
        .ok()?;
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&sealed);
        note(TicketEvent::Issued(self.key_expiration(issued)));
        Some(out)
    }

    fn decrypt(&self, cipher: &[u8]) -> Option<Vec<u8>> {
        if cipher.len() < HEADER_LEN + NONCE_LEN + 16 || cipher[0] != VERSION {
            return None;
        }
        let issued = u64::from_be_bytes(cipher[1..HEADER_LEN].try_into().ok()?);
        let now = now();
        // Expired, or from a clock far ahead of ours.
        if issued > now + 60 || now.saturating_sub(issued) > self.lifetime {
            return None;
        }
        let key = self.key(issued)?;
        let nonce =
            Nonce::try_assume_unique_for_key(&cipher[HEADER_LEN..HEADER_LEN + NONCE_LEN]).ok()?;
        let mut sealed = cipher[HEADER_LEN + NONCE_LEN..].to_vec();
        let plain = key
            .open_in_place(nonce, Aad::from(&cipher[..HEADER_LEN]), &mut sealed)
            .ok()?;
        note(TicketEvent::Decrypted(self.key_expiration(issued)));
        Some(plain.to_vec())
    }
}

/// What the ticketer did, for Postfix's `smtpd_tls_loglevel` 2 lines
/// ("Issuing session ticket, key expiration: T", "Decrypting ...").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TicketEvent {
    /// A ticket was sealed with the key that expires at this time.
    Issued(u64),
    /// A ticket was opened (the session resumes from it).
    Decrypted(u64),
}

thread_local! {
    /// The ticketer's work on this thread since the last
    /// [`take_ticket_events`] (smtpd drives one handshake at a time on its
    /// thread; rustls says nothing of how a session was resumed).
    static TICKET_EVENTS: std::cell::RefCell<Vec<TicketEvent>> = const { std::cell::RefCell::new(Vec::new()) };
}

thread_local! {
    /// Whether the connection being processed on this thread may get new
    /// tickets ([`allow_issuing`]).
    static ISSUING: std::cell::Cell<bool> = const { std::cell::Cell::new(true) };
}

/// Says whether the connection whose packets this thread processes next
/// may get new tickets: a session resumed from a ticket gets none, as
/// Postfix's smtpd (OpenSSL) issues none then; the client keeps its ticket.
pub fn allow_issuing(yes: bool) {
    ISSUING.with(|i| i.set(yes));
}

fn note(e: TicketEvent) {
    TICKET_EVENTS.with(|t| t.borrow_mut().push(e));
}

/// What the ticketer did on this thread since the last call.
pub fn take_ticket_events() -> Vec<TicketEvent> {
    TICKET_EVENTS.with(|t| std::mem::take(&mut *t.borrow_mut()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::server::ProducesTickets;

    #[test]
    fn two_processes_share_tickets() {
        let a = SharedTicketer::new([7; SECRET_LEN], 3600);
        let b = SharedTicketer::new([7; SECRET_LEN], 3600);
        let t = a.encrypt(b"session state").unwrap();
        assert_eq!(b.decrypt(&t).unwrap(), b"session state");
        let other = SharedTicketer::new([8; SECRET_LEN], 3600);
        assert!(other.decrypt(&t).is_none());
        let mut forged = t.clone();
        forged[8] ^= 1; // another issue time
        assert!(b.decrypt(&forged).is_none());
    }

    #[test]
    fn expired_tickets_are_refused() {
        let a = SharedTicketer::new([7; SECRET_LEN], 3600);
        let old = now() - 3601;
        let key = a.key(old).unwrap();
        let mut t = vec![VERSION];
        t.extend_from_slice(&old.to_be_bytes());
        let nonce = [0u8; NONCE_LEN];
        let mut sealed = b"x".to_vec();
        key.seal_in_place_append_tag(
            Nonce::assume_unique_for_key(nonce),
            Aad::from(&t[..HEADER_LEN]),
            &mut sealed,
        )
        .unwrap();
        t.extend_from_slice(&nonce);
        t.extend_from_slice(&sealed);
        assert!(a.decrypt(&t).is_none());
        // A different period's key for a fresh ticket.
        assert_ne!(
            a.encrypt(b"x").unwrap()[..HEADER_LEN],
            t[..HEADER_LEN],
            "issue time is in the ticket"
        );
    }
}
