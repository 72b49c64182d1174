//! `postern dkim-keygen [-D DIR] [-b BITS] DOMAIN SELECTOR [rsa|ed25519]`:
//! makes a DKIM key pair for `dkim_signing_table`.
//!
//! Writes `DIR/SELECTOR.private` (PEM, mode 0600: RSA as PKCS#1
//! `RSA PRIVATE KEY`, as opendkim-genkey writes it; Ed25519 as PKCS#8)
//! and `DIR/SELECTOR.txt` (the DNS record), and prints the record:
//! `SELECTOR._domainkey.DOMAIN. IN TXT "v=DKIM1; k=rsa; p=..."`, the
//! value cut into strings of at most 255 characters as DNS needs, and on
//! stderr the `dkim_signing_table` line that uses the key. DIR defaults
//! to the current directory; an existing key file is never overwritten.
//! RSA keys are 2048 bits unless `-b` says otherwise (1024 to 4096).

use crate::die;
use crate::sysexits::*;
use mail_auth::dkim::generate::DkimKeyPair;
use postern_common::base64;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;

const NAME: &str = "postern";
const USAGE: &str =
    "usage: postern dkim-keygen [-D directory] [-b bits] DOMAIN SELECTOR [rsa|ed25519]";

pub fn main(args: &[String]) -> ! {
    let mut dir = PathBuf::from(".");
    let mut bits: usize = 2048;
    let mut words: Vec<String> = Vec::new();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "-D" => {
                dir = it
                    .next()
                    .unwrap_or_else(|| die(NAME, EX_USAGE, USAGE))
                    .into()
            }
            "-b" => {
                bits = it
                    .next()
                    .and_then(|b| b.parse().ok())
                    .filter(|b| (1024..=4096).contains(b))
                    .unwrap_or_else(|| die(NAME, EX_USAGE, "-b: 1024 to 4096 bits"))
            }
            w if !w.starts_with('-') => words.push(w.to_string()),
            other => die(
                NAME,
                EX_USAGE,
                format_args!("unexpected argument \"{other}\"; {USAGE}"),
            ),
        }
    }
    let (domain, selector, kind) = match words.as_slice() {
        [d, s] => (d, s, "rsa"),
        [d, s, k] => (d, s, k.as_str()),
        _ => die(NAME, EX_USAGE, USAGE),
    };
    let domain = domain.trim_end_matches('.').to_ascii_lowercase();
    let valid = |s: &str| {
        !s.is_empty()
            && s.split('.')
                .all(|l| !l.is_empty() && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-'))
    };
    if !valid(&domain) || !valid(selector) {
        die(
            NAME,
            EX_USAGE,
            "DOMAIN and SELECTOR must be DNS names (letters, digits, '-', '.')",
        );
    }
    let (pem, record) = match kind {
        "rsa" => {
            let pair = DkimKeyPair::generate_rsa(bits)
                .unwrap_or_else(|e| die(NAME, EX_SOFTWARE, format_args!("RSA key: {e}")));
            (
                pem("RSA PRIVATE KEY", pair.private_key()),
                format!(
                    "v=DKIM1; k=rsa; p={}",
                    base64::encode(&rsa_spki(pair.public_key()))
                ),
            )
        }
        "ed25519" => {
            let pair = DkimKeyPair::generate_ed25519()
                .unwrap_or_else(|e| die(NAME, EX_SOFTWARE, format_args!("Ed25519 key: {e}")));
            (
                pem("PRIVATE KEY", pair.private_key()),
                format!(
                    "v=DKIM1; k=ed25519; p={}",
                    base64::encode(pair.public_key())
                ),
            )
        }
        other => die(
            NAME,
            EX_USAGE,
            format_args!("unknown key type \"{other}\": rsa or ed25519"),
        ),
    };
    let key_path = dir.join(format!("{selector}.private"));
    let txt_path = dir.join(format!("{selector}.txt"));
    let line = format!("{selector}._domainkey.{domain}. IN TXT {}", quoted(&record));
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&key_path)
        .unwrap_or_else(|e| {
            die(
                NAME,
                EX_CANTCREAT,
                format_args!("{}: {e}", key_path.display()),
            )
        });
    if let Err(e) = f.write_all(pem.as_bytes()).and_then(|_| f.sync_all()) {
        let _ = std::fs::remove_file(&key_path);
        die(NAME, EX_IOERR, format_args!("{}: {e}", key_path.display()));
    }
    if let Err(e) = std::fs::write(&txt_path, format!("{line}\n")) {
        die(NAME, EX_IOERR, format_args!("{}: {e}", txt_path.display()));
    }
    let abs = std::fs::canonicalize(&key_path).unwrap_or(key_path.clone());
    println!("{line}");
    eprintln!(
        "{NAME}: wrote {} (mode 0600) and {}; in dkim_signing_table: {domain} {domain}:{selector}:{}",
        key_path.display(),
        txt_path.display(),
        abs.display()
    );
    std::process::exit(EX_OK)
}

/// PEM armour, 64 characters a line.
fn pem(label: &str, der: &[u8]) -> String {
    let b = base64::encode(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for chunk in b.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(chunk).unwrap_or(""));
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

/// A TXT value as DNS zone strings: `"..." "..."`, each at most 255
/// characters (RFC 1035 character-strings).
fn quoted(value: &str) -> String {
    value
        .as_bytes()
        .chunks(255)
        .map(|c| format!("\"{}\"", std::str::from_utf8(c).unwrap_or("")))
        .collect::<Vec<_>>()
        .join(" ")
}

/// A DER length.
fn der_len(n: usize, out: &mut Vec<u8>) {
    if n < 0x80 {
        out.push(n as u8);
    } else {
        let bytes: Vec<u8> = n
            .to_be_bytes()
            .iter()
            .copied()
            .skip_while(|&b| b == 0)
            .collect();
        out.push(0x80 | bytes.len() as u8);
        out.extend(bytes);
    }
}

/// The SubjectPublicKeyInfo of a PKCS#1 RSAPublicKey: the form DKIM's
/// `p=` has for `k=rsa` (RFC 6376 section 3.6.1), as OpenDKIM publishes.
fn rsa_spki(pkcs1: &[u8]) -> Vec<u8> {
    // SEQUENCE { OID rsaEncryption, NULL }
    const ALG: &[u8] = &[
        0x30, 0x0d, 0x06, 0x09, 0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x01, 0x05, 0x00,
    ];
    let mut bit_string = vec![0x03];
    der_len(pkcs1.len() + 1, &mut bit_string);
    bit_string.push(0);
    bit_string.extend_from_slice(pkcs1);
    let mut out = vec![0x30];
    der_len(ALG.len() + bit_string.len(), &mut out);
    out.extend_from_slice(ALG);
    out.extend(bit_string);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn record_strings_are_short() {
        let v = "x".repeat(600);
        let q = quoted(&v);
        assert_eq!(q.matches('"').count(), 6);
    }

    #[test]
    fn der_lengths() {
        let mut v = Vec::new();
        der_len(0x7f, &mut v);
        der_len(0x80, &mut v);
        der_len(0x10e, &mut v);
        assert_eq!(v, [0x7f, 0x81, 0x80, 0x82, 0x01, 0x0e]);
    }
}
