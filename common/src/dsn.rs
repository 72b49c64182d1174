//! RFC 3461 delivery status notification parameters, defined once for
//! every program that reads or writes them: smtpd and `sendmail -bs`
//! (MAIL/RCPT parameters), `sendmail -N/-V/-R`, pickup (what a user put
//! in `maildrop/`), and the smtp client (passing them on).
//!
//! - xtext (RFC 3461 section 4): `+XX` for `+`, `=` and anything outside
//!   `!`..`~`.
//! - unitext (RFC 6533, `ORCPT=utf-8;...`): `\x{HEX}` for a code point.
//! - `NOTIFY=` (`NEVER` alone, or any of `SUCCESS,FAILURE,DELAY`),
//!   `RET=FULL|HDRS`, `ENVID=` (xtext, printable, at most 100 octets),
//!   `ORCPT=addr-type;xtext`.
//!
//! Decoded values are kept in the queue file: `envid` and `ret`
//! attributes, a recipient's notify bits and `addr-type;address` ORCPT.

use crate::qfile::{NOTIFY_DELAY, NOTIFY_FAILURE, NOTIFY_NEVER, NOTIFY_SUCCESS};

/// Longest ENVID, in octets once decoded (RFC 3461 section 4.4).
pub const ENVID_MAX: usize = 100;

/// Encodes text as RFC 3461 xtext.
pub fn xtext_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if (b'!'..=b'~').contains(&b) && b != b'+' && b != b'=' {
            out.push(b as char);
        } else {
            out.push_str(&format!("+{b:02X}"));
        }
    }
    out
}

/// Decodes RFC 3461 xtext (`+2B` for `+`). As Postfix, it takes what
/// strict xtext would not but means no harm: lower-case hex digits and
/// `=` as itself. `None` when a `+` is not followed by two hex digits,
/// for anything outside `!`..`~`, when the result is not UTF-8, and when
/// it holds control characters (a decoded value ends up in DSN headers).
pub fn xtext_decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => {
                let hex = s.get(i + 1..i + 3)?;
                if !hex.bytes().all(|h| h.is_ascii_hexdigit()) {
                    return None;
                }
                out.push(u8::from_str_radix(hex, 16).ok()?);
                i += 3;
            }
            c if (b'!'..=b'~').contains(&c) => {
                out.push(c);
                i += 1;
            }
            _ => return None,
        }
    }
    let s = String::from_utf8(out).ok()?;
    s.chars().all(|c| !c.is_control() || c == '\t').then_some(s)
}

/// Encodes an address as RFC 6533 utf-8-addr-xtext: printable ASCII as
/// itself except `+`, `=` and `\`, everything else as `\x{HEX}`. The
/// result is ASCII, so it may go to a server without SMTPUTF8.
pub fn unitext_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if c.is_ascii_graphic() && !matches!(c, '+' | '=' | '\\') {
            out.push(c);
        } else {
            out.push_str(&format!("\\x{{{:X}}}", c as u32));
        }
    }
    out
}

/// Decodes RFC 6533 utf-8-addr-xtext or utf-8-addr-unitext: `\x{HEX}`
/// (1 to 6 hex digits, a Unicode scalar value) for a code point, UTF-8
/// as itself. `None` when malformed or when the result holds control
/// characters or white space.
pub fn unitext_decode(s: &str) -> Option<String> {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(p) = rest.find('\\') {
        out.push_str(&rest[..p]);
        let after = rest[p..].strip_prefix("\\x{")?;
        let end = after.find('}')?;
        let hex = &after[..end];
        if hex.is_empty() || hex.len() > 6 || !hex.bytes().all(|h| h.is_ascii_hexdigit()) {
            return None;
        }
        out.push(char::from_u32(u32::from_str_radix(hex, 16).ok()?)?);
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    out.chars()
        .all(|c| !c.is_control() && !c.is_whitespace())
        .then_some(out)
}

/// `NOTIFY=` words as queue-file bits: `NEVER`, or any of `SUCCESS`,
/// `FAILURE`, `DELAY`, case-insensitive, separated by commas (white
/// space and empty words are skipped, as Postfix's `dsn_notify_mask`).
/// `None` for an unknown word, for nothing at all, and for `NEVER` with
/// anything else.
pub fn parse_notify(v: &str) -> Option<u8> {
    let mut mask = 0u8;
    for word in v
        .split([',', ' ', '\t', '\r', '\n'])
        .filter(|w| !w.is_empty())
    {
        mask |= match word.to_ascii_uppercase().as_str() {
            "SUCCESS" => NOTIFY_SUCCESS,
            "FAILURE" => NOTIFY_FAILURE,
            "DELAY" => NOTIFY_DELAY,
            "NEVER" => NOTIFY_NEVER,
            _ => return None,
        };
    }
    if mask == 0 || (mask & NOTIFY_NEVER != 0 && mask != NOTIFY_NEVER) {
        return None;
    }
    Some(mask)
}

/// The `NOTIFY=` value for queue-file bits ("" when none were given).
pub fn format_notify(bits: u8) -> String {
    if bits & NOTIFY_NEVER != 0 {
        return "NEVER".into();
    }
    [
        (NOTIFY_SUCCESS, "SUCCESS"),
        (NOTIFY_FAILURE, "FAILURE"),
        (NOTIFY_DELAY, "DELAY"),
    ]
    .into_iter()
    .filter(|(bit, _)| bits & bit != 0)
    .map(|(_, name)| name)
    .collect::<Vec<_>>()
    .join(",")
}

/// `RET=FULL` or `RET=HDRS`, case-insensitive, as the queue keeps it
/// (upper case).
pub fn parse_ret(v: &str) -> Option<&'static str> {
    if v.eq_ignore_ascii_case("FULL") {
        Some("FULL")
    } else if v.eq_ignore_ascii_case("HDRS") {
        Some("HDRS")
    } else {
        None
    }
}

/// Whether a decoded envelope ID may be kept: 1 to 100 printable ASCII
/// characters, the space included as Postfix includes it (the queue
/// file, DSNs and `sendmail -V` take it as is).
pub fn valid_envid(v: &str) -> bool {
    !v.is_empty() && v.len() <= ENVID_MAX && v.bytes().all(|b| (32..=126).contains(&b))
}

/// `ENVID=` as sent in MAIL FROM (xtext), decoded.
pub fn parse_envid(xtext: &str) -> Option<String> {
    xtext_decode(xtext).filter(|e| valid_envid(e))
}

/// `ORCPT=addr-type;xtext` decoded to `addr-type;address`, as the queue
/// keeps it (an empty address is taken, as Postfix takes it). The address type is an atom (letters, digits, `-`); for
/// `utf-8` the address is unitext (RFC 6533), otherwise xtext.
pub fn parse_orcpt(v: &str) -> Option<String> {
    let (kind, coded) = v.split_once(';')?;
    if kind.is_empty() || !kind.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-') {
        return None;
    }
    let addr = if kind.eq_ignore_ascii_case("utf-8") {
        unitext_decode(coded)?
    } else {
        xtext_decode(coded)?
    };
    Some(format!("{kind};{addr}"))
}

/// The `ORCPT=` value for a queue-file `addr-type;address`, or `None`
/// when it has no address type. As Postfix sends it: a `utf-8` one, and a
/// UTF-8 address of a message with SMTPUTF8 flags (`utf8_message`), as
/// `utf-8;` utf-8-addr-xtext (RFC 6533; ASCII, so any server can read
/// it); anything else as xtext under its own type.
pub fn format_orcpt(stored: &str, utf8_message: bool) -> Option<String> {
    let (kind, addr) = stored.split_once(';')?;
    if kind.eq_ignore_ascii_case("utf-8") || (utf8_message && !addr.is_ascii()) {
        Some(format!("utf-8;{}", unitext_encode(addr)))
    } else {
        Some(format!("{kind};{}", xtext_encode(addr)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn xtext_round_trip() {
        assert_eq!(xtext_encode("id+1 x=y"), "id+2B1+20x+3Dy");
        assert_eq!(xtext_decode("id+2B1+20x+3Dy").as_deref(), Some("id+1 x=y"));
        assert_eq!(xtext_decode("abc+3Ddef").as_deref(), Some("abc=def"));
        assert_eq!(xtext_decode("a=b+2b").as_deref(), Some("a=b+"));
        for bad in ["a+zz", "a+2", "a+", "a b", "a+0Ab", "a+0a", "\u{e9}"] {
            assert_eq!(xtext_decode(bad), None, "{bad}");
        }
        for s in ["plain", "a+b=c", "tab\there", "j\u{f6}rg"] {
            assert_eq!(xtext_decode(&xtext_encode(s)).as_deref(), Some(s));
        }
    }

    #[test]
    fn unitext_round_trip() {
        assert_eq!(unitext_encode("j\u{f6}rg+x@b"), "j\\x{F6}rg\\x{2B}x@b");
        assert_eq!(
            unitext_encode("a+b=c\\d e"),
            "a\\x{2B}b\\x{3D}c\\x{5C}d\\x{20}e"
        );
        assert_eq!(unitext_encode("\u{65e5}@x"), "\\x{65E5}@x");
        assert_eq!(
            unitext_decode("j\\x{F6}rg@c").as_deref(),
            Some("j\u{f6}rg@c")
        );
        assert_eq!(
            unitext_decode("j\u{f6}rg@c").as_deref(),
            Some("j\u{f6}rg@c")
        );
        for bad in [
            "a\\x{}",
            "a\\x{110000}",
            "a\\x{D800}",
            "a\\y",
            "a\\x{41",
            "a\\x{0A}b",
            "a b",
        ] {
            assert_eq!(unitext_decode(bad), None, "{bad}");
        }
        let s = "\u{4f60}\u{597d}+1@\u{4f8b}.test";
        assert_eq!(unitext_decode(&unitext_encode(s)).as_deref(), Some(s));
    }

    #[test]
    fn notify() {
        assert_eq!(
            parse_notify("success,FAILURE"),
            Some(NOTIFY_SUCCESS | NOTIFY_FAILURE)
        );
        assert_eq!(parse_notify("NEVER"), Some(NOTIFY_NEVER));
        assert_eq!(
            parse_notify("delay, failure"),
            Some(NOTIFY_DELAY | NOTIFY_FAILURE)
        );
        assert_eq!(
            parse_notify("SUCCESS,,DELAY"),
            Some(NOTIFY_SUCCESS | NOTIFY_DELAY)
        );
        assert_eq!(parse_notify("NEVER,DELAY"), None);
        assert_eq!(parse_notify("SUCCESS,NEVER"), None);
        assert_eq!(parse_notify("SOMETIMES"), None);
        assert_eq!(parse_notify(""), None);
        assert_eq!(parse_notify(","), None);
        assert_eq!(format_notify(NOTIFY_NEVER | NOTIFY_SUCCESS), "NEVER");
        assert_eq!(
            format_notify(NOTIFY_SUCCESS | NOTIFY_DELAY),
            "SUCCESS,DELAY"
        );
        assert_eq!(format_notify(0), "");
        for bits in [1, 2, 3, 4, 5, 6, 7, 8] {
            assert_eq!(parse_notify(&format_notify(bits)), Some(bits));
        }
    }

    #[test]
    fn ret_and_envid() {
        assert_eq!(parse_ret("hdrs"), Some("HDRS"));
        assert_eq!(parse_ret("Full"), Some("FULL"));
        assert_eq!(parse_ret("some"), None);
        assert_eq!(parse_envid("env+2B1").as_deref(), Some("env+1"));
        assert_eq!(parse_envid(&"x".repeat(100)).map(|e| e.len()), Some(100));
        assert_eq!(parse_envid(&"x".repeat(101)), None);
        assert_eq!(parse_envid("a+20b").as_deref(), Some("a b"));
        assert_eq!(parse_envid("a+09b"), None, "a tab is not printable");
        assert_eq!(parse_envid(""), None);
        assert_eq!(parse_envid("a+zz"), None);
        assert!(valid_envid("abc"));
        assert!(!valid_envid("a\u{e9}"));
    }

    #[test]
    fn orcpt() {
        assert_eq!(
            parse_orcpt("rfc822;a+2Bb@c").as_deref(),
            Some("rfc822;a+b@c")
        );
        assert_eq!(
            parse_orcpt("utf-8;j\\x{F6}rg@c").as_deref(),
            Some("utf-8;j\u{f6}rg@c")
        );
        assert_eq!(parse_orcpt("rfc822;").as_deref(), Some("rfc822;"));
        for bad in [
            "rfc822",
            ";a@b",
            "rfc 822;a@b",
            "rfc822;a+2",
            "rfc822;a+0Ab",
            "utf-8;a\\y",
        ] {
            assert_eq!(parse_orcpt(bad), None, "{bad}");
        }
        assert_eq!(
            format_orcpt("rfc822;Orig=x@b.test", false).as_deref(),
            Some("rfc822;Orig+3Dx@b.test")
        );
        assert_eq!(
            format_orcpt("utf-8;j\u{f6}rg@c", false).as_deref(),
            Some("utf-8;j\\x{F6}rg@c")
        );
        // A UTF-8 address goes as utf-8 only in SMTPUTF8 mail.
        assert_eq!(
            format_orcpt("rfc822;m\u{fc}ller@x.test", true).as_deref(),
            Some("utf-8;m\\x{FC}ller@x.test")
        );
        assert_eq!(
            format_orcpt("rfc822;a+b@x.test", true).as_deref(),
            Some("rfc822;a+2Bb@x.test")
        );
        assert_eq!(
            format_orcpt("rfc822;m\u{fc}ller@x.test", false).as_deref(),
            Some("rfc822;m+C3+BCller@x.test")
        );
        assert_eq!(format_orcpt("no-type", false), None);
        for stored in [
            "rfc822;a+b=c@d",
            "utf-8;\u{4f60}@\u{4f8b}.test",
            "rfc822;m\u{fc}@x",
        ] {
            for utf8 in [false, true] {
                assert_eq!(
                    parse_orcpt(&format_orcpt(stored, utf8).unwrap()).map(|o| o
                        .split_once(';')
                        .unwrap()
                        .1
                        .to_string()),
                    Some(stored.split_once(';').unwrap().1.to_string())
                );
            }
        }
    }
}
