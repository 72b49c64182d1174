//! The message as delivered: what is known of its header section, and the
//! lines put in front of each delivered copy.
//!
//! The header section is read once per request, bounded by
//! [`MAX_HEADER_SECTION`]; the body is never held in memory: each delivery
//! streams the content again from the queue file.

use std::collections::HashSet;
use std::io::{self, Read};

/// The most of the header section read for loop detection.
pub const MAX_HEADER_SECTION: usize = 1 << 20;

/// Reads the header section (up to and including the empty line that ends
/// it, or at most `limit` bytes).
pub fn read_header_section(r: &mut dyn Read, limit: usize) -> io::Result<Vec<u8>> {
    let mut out = Vec::new();
    let mut buf = [0u8; 8192];
    loop {
        let n = r.read(&mut buf)?;
        if n == 0 {
            break;
        }
        out.extend_from_slice(&buf[..n]);
        if let Some(end) = header_end(&out) {
            out.truncate(end.min(limit));
            break;
        }
        if out.len() >= limit {
            out.truncate(limit);
            break;
        }
    }
    Ok(out)
}

/// Where the header section ends: after the first empty line.
fn header_end(data: &[u8]) -> Option<usize> {
    if data.starts_with(b"\n") {
        return Some(1);
    }
    data.windows(2).position(|w| w == b"\n\n").map(|p| p + 2)
}

/// The addresses of every `Delivered-To:` header, lower-cased.
pub fn delivered_to(section: &[u8]) -> HashSet<String> {
    let text = String::from_utf8_lossy(section);
    let mut out = HashSet::new();
    let mut current: Option<String> = None;
    let finish = |v: Option<String>, out: &mut HashSet<String>| {
        if let Some(v) = v {
            let a = v
                .trim()
                .trim_start_matches('<')
                .trim_end_matches('>')
                .trim()
                .to_lowercase();
            if !a.is_empty() {
                out.insert(a);
            }
        }
    };
    for line in text.split('\n') {
        if line.is_empty() {
            break;
        }
        if line.starts_with([' ', '\t']) {
            if let Some(v) = current.as_mut() {
                v.push(' ');
                v.push_str(line.trim());
            }
            continue;
        }
        finish(current.take(), &mut out);
        if let Some((name, value)) = line.split_once(':') {
            if name.trim_end().eq_ignore_ascii_case("delivered-to") {
                current = Some(value.to_string());
            }
        }
    }
    finish(current, &mut out);
    out
}

/// The header lines put before a delivered copy.
pub struct Prefix<'a> {
    /// The envelope sender, "" for the null sender.
    pub sender: &'a str,
    /// `X-Original-To:` value, when wanted.
    pub original: Option<&'a str>,
    /// `Delivered-To:` value, when wanted.
    pub delivered: Option<&'a str>,
}

impl Prefix<'_> {
    /// `Return-Path:`, `X-Original-To:`, `Delivered-To:`, LF ends.
    pub fn headers(&self) -> Vec<u8> {
        let mut s = format!("Return-Path: <{}>\n", clean(self.sender));
        if let Some(o) = self.original.filter(|o| !o.is_empty()) {
            s.push_str(&format!("X-Original-To: {}\n", clean(o)));
        }
        if let Some(d) = self.delivered.filter(|d| !d.is_empty()) {
            s.push_str(&format!("Delivered-To: {}\n", clean(d)));
        }
        s.into_bytes()
    }
}

/// No line breaks inside a header value.
fn clean(s: &str) -> String {
    s.replace(['\n', '\r'], " ")
}

/// The mbox envelope line: `From SENDER  Sat Nov 22 14:11:42 2025` (two
/// spaces, as Postfix writes it), sender `MAILER-DAEMON` for `<>`.
pub fn from_line(sender: &str, secs: u64) -> String {
    let who = if sender.is_empty() {
        "MAILER-DAEMON".to_string()
    } else {
        sender.replace([' ', '\t', '\n', '\r'], "_")
    };
    format!("From {who}  {}\n", asctime(secs))
}

use postern_common::time::asctime;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_section_and_delivered_to() {
        let msg = b"Received: x\nDelivered-To: Alice@Host.test\nSubject: s\nDelivered-To:\n <b@h>\n\nDelivered-To: body@h\n";
        let mut r = &msg[..];
        let h = read_header_section(&mut r, 1 << 20).unwrap();
        assert!(h.ends_with(b"<b@h>\n\n"));
        let d = delivered_to(&h);
        assert_eq!(d.len(), 2);
        assert!(d.contains("alice@host.test") && d.contains("b@h"));
        let mut r = &msg[..];
        assert_eq!(read_header_section(&mut r, 10).unwrap().len(), 10);
        let mut r = &b"\nbody"[..];
        assert_eq!(read_header_section(&mut r, 100).unwrap(), b"\n");
    }

    #[test]
    fn prefix_lines() {
        let p = Prefix {
            sender: "",
            original: Some("Orig@h"),
            delivered: Some("a@h"),
        };
        assert_eq!(
            p.headers(),
            b"Return-Path: <>\nX-Original-To: Orig@h\nDelivered-To: a@h\n"
        );
        let l = from_line("", 1_700_000_000);
        assert!(l.starts_with("From MAILER-DAEMON  "), "{l}");
        assert!(l.ends_with(" 2023\n"), "{l}");
        assert_eq!(
            l.len(),
            "From MAILER-DAEMON  Tue Nov 14 22:13:20 2023\n".len()
        );
    }
}
