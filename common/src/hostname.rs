//! Host name and address syntax, as Postfix's `valid_hostname()`,
//! `valid_hostaddr()` and smtpd's HELO checks judge it, defined once for
//! smtpd (`reject_invalid_helo_hostname`, `reject_non_fqdn_helo_hostname`,
//! names from reverse DNS), smtp (MX names) and `postern check`
//! (`myhostname`, `smtp_helo_name`).

/// Longest host name, in octets.
pub const HOSTNAME_MAX: usize = 255;
/// Longest label of a host name, in octets.
pub const LABEL_MAX: usize = 63;

/// One label of a host name: letters, digits, `-` and `_` (which Postfix
/// tolerates, as real names have it), 1 to 63 of them, not starting or
/// ending with `-`.
pub fn valid_label(l: &str) -> bool {
    !l.is_empty()
        && l.len() <= LABEL_MAX
        && !l.starts_with('-')
        && !l.ends_with('-')
        && l.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// A host name: valid labels separated by single dots, no dot at either
/// end, at most 255 octets, and not all numeric (`1.2.3.4` is an
/// address, not a name).
pub fn valid_hostname(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= HOSTNAME_MAX
        && name.split('.').all(valid_label)
        && !name.bytes().all(|b| b.is_ascii_digit() || b == b'.')
}

/// An IPv4 address in dotted-quad form: four decimal octets of at most
/// 255, and no first octet 0 unless the whole address is `0.0.0.0`.
pub fn valid_ipv4_hostaddr(addr: &str) -> bool {
    let parts: Vec<&str> = addr.split('.').collect();
    if parts.len() != 4 {
        return false;
    }
    for p in &parts {
        if p.is_empty() || !p.bytes().all(|b| b.is_ascii_digit()) {
            return false;
        }
        // Leading zeros are harmless to the value; only its size matters.
        let digits = p.trim_start_matches('0');
        if digits.len() > 3 || digits.parse::<u32>().unwrap_or(0) > 255 {
            return false;
        }
    }
    let first_is_zero = parts[0].bytes().all(|b| b == b'0');
    !first_is_zero || addr.bytes().all(|b| b == b'0' || b == b'.')
}

/// An IPv6 address without the `IPv6:` prefix: hex fields of at most 4
/// digits separated by `:`, at most one `::`, eight fields in all (or
/// fewer with `::`), optionally ending in a dotted-quad IPv4 address.
pub fn valid_ipv6_hostaddr(addr: &str) -> bool {
    // An IPv4 tail stands for two fields; the colon before it stays with
    // the hex part only when it is half of a "::".
    let (hex, tail_fields) = match addr.rfind(':') {
        Some(i) if addr[i + 1..].contains('.') => {
            if !valid_ipv4_hostaddr(&addr[i + 1..]) {
                return false;
            }
            let h = &addr[..=i];
            (if h.ends_with("::") { h } else { &h[..i] }, 2)
        }
        Some(_) => (addr, 0),
        None => return false,
    };
    match hex.split_once("::") {
        Some((left, right)) => {
            if right.contains("::") {
                return false;
            }
            match (count_fields(left), count_fields(right)) {
                (Some(l), Some(r)) => l + r + tail_fields <= 7,
                _ => false,
            }
        }
        None => count_fields(hex).map(|n| n + tail_fields) == Some(8),
    }
}

/// Number of hex fields in a `:`-separated run, or `None` when one is
/// malformed ("" is zero fields).
fn count_fields(run: &str) -> Option<usize> {
    if run.is_empty() {
        return Some(0);
    }
    let mut n = 0;
    for f in run.split(':') {
        if f.is_empty() || f.len() > 4 || !f.bytes().all(|b| b.is_ascii_hexdigit()) {
            return None;
        }
        n += 1;
    }
    Some(n)
}

/// An IPv4 or IPv6 address (as Postfix's `valid_hostaddr`).
pub fn valid_hostaddr(addr: &str) -> bool {
    if addr.contains(':') {
        valid_ipv6_hostaddr(addr)
    } else {
        valid_ipv4_hostaddr(addr)
    }
}

/// An RFC 5321 address literal: `[1.2.3.4]` or `[IPv6:...]` (the prefix
/// in any case).
pub fn valid_address_literal(s: &str) -> bool {
    let Some(inner) = s.strip_prefix('[').and_then(|r| r.strip_suffix(']')) else {
        return false;
    };
    match inner.get(..5) {
        Some(p) if p.eq_ignore_ascii_case("IPv6:") => valid_ipv6_hostaddr(&inner[5..]),
        _ => valid_ipv4_hostaddr(inner),
    }
}

/// `name` with one trailing dot removed (`host.example.` as
/// `host.example`), but not two: Postfix tests HELO names so.
pub fn strip_root_dot(name: &str) -> &str {
    match name.strip_suffix('.') {
        Some(n) if !n.ends_with('.') => n,
        _ => name,
    }
}

/// What `reject_invalid_helo_hostname` accepts: a host name (a trailing
/// dot allowed), an address literal, or, as Postfix, a bare address.
pub fn valid_helo_name(name: &str) -> bool {
    if name.starts_with('[') {
        return valid_address_literal(name);
    }
    let n = strip_root_dot(name);
    valid_hostname(n) || valid_hostaddr(n)
}

/// What `reject_non_fqdn_helo_hostname` accepts: an address literal, or
/// a valid host name with at least two labels.
pub fn fqdn_helo_name(name: &str) -> bool {
    let n = strip_root_dot(name);
    valid_address_literal(n) || (valid_hostname(n) && n.contains('.'))
}

/// Whether the domain of an envelope address is acceptable at all (as
/// Postfix's smtpd checks MAIL FROM and RCPT TO addresses): an address
/// literal (its syntax is the address parser's), or a host name (one
/// trailing dot allowed). A UTF-8 domain is judged by its dots only: its
/// labels are for the SMTPUTF8 (IDNA) rules.
pub fn valid_address_domain(d: &str) -> bool {
    if d.starts_with('[') && d.ends_with(']') {
        return true;
    }
    let n = strip_root_dot(d);
    if n.is_ascii() {
        valid_hostname(n)
    } else {
        n.split('.').all(|l| !l.is_empty())
    }
}

/// What `reject_non_fqdn_sender` and `reject_non_fqdn_recipient` accept
/// as an address's domain: an address literal, or a valid domain of two
/// labels or more.
pub fn fqdn_domain(d: &str) -> bool {
    valid_address_domain(d) && (d.starts_with('[') || strip_root_dot(d).contains('.'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hostnames() {
        for good in [
            "mail.example.com",
            "a",
            "mx-1.example_x.test",
            "123.example.test",
            "a.b-c.d",
            &format!("{}.test", "a".repeat(63)),
        ] {
            assert!(valid_hostname(good), "{good}");
        }
        for bad in [
            "",
            "-bad.example",
            "bad-.example",
            "a..test",
            ".a.test",
            "a.test.",
            "1.2.3.4",
            "123",
            "a b.test",
            "a/b.test",
            "j\u{f6}rg.test",
            &format!("{}.test", "a".repeat(64)),
            &format!("{}a", "a.".repeat(128)),
        ] {
            assert!(!valid_hostname(bad), "{bad}");
        }
        assert_eq!(format!("{}a", "a.".repeat(127)).len(), 255);
        assert!(valid_hostname(&format!("{}a", "a.".repeat(127))));
    }

    #[test]
    fn addresses() {
        for good in ["1.2.3.4", "0.0.0.0", "255.255.255.255", "127.000.0.1"] {
            assert!(valid_ipv4_hostaddr(good), "{good}");
        }
        for bad in [
            "1.2.3",
            "1.2.3.4.5",
            "256.1.1.1",
            "0.1.2.3",
            "1..2.3",
            "1.2.3.4.",
            "a.b.c.d",
            "",
        ] {
            assert!(!valid_ipv4_hostaddr(bad), "{bad}");
        }
        for good in [
            "::1",
            "::",
            "2001:db8::1",
            "1:2:3:4:5:6:7:8",
            "::ffff:1.2.3.4",
            "1:2:3:4:5:6:1.2.3.4",
            "fe80::",
        ] {
            assert!(valid_ipv6_hostaddr(good), "{good}");
        }
        for bad in [
            "1:2:3:4:5:6:7",
            "1:2:3:4:5:6:7:8:9",
            "1::2::3",
            "12345::1",
            "g::1",
            "1.2.3.4",
            "::1.2.3",
            ":1:2:3:4:5:6:7",
        ] {
            assert!(!valid_ipv6_hostaddr(bad), "{bad}");
        }
        assert!(valid_hostaddr("::1") && valid_hostaddr("10.0.0.1"));
    }

    #[test]
    fn helo_names() {
        for good in [
            "client.example",
            "client.example.",
            "localhost",
            "[127.0.0.1]",
            "[IPv6:::1]",
            "[ipv6:2001:db8::1]",
            "1.2.3.4",
            "::1",
            "host.123",
        ] {
            assert!(valid_helo_name(good), "{good}");
        }
        for bad in [
            "client..example",
            "client.example..",
            "-x.example",
            "123",
            "999.1.2.3",
            "[1.2.3]",
            "[::1]",
            "[IPv6:1.2.3.4]",
            "127.0.0.1]",
            "[host.example]",
            "under?score",
        ] {
            assert!(!valid_helo_name(bad), "{bad}");
        }
        assert!(fqdn_helo_name("a.example"));
        assert!(fqdn_helo_name("[10.0.0.1]"));
        assert!(!fqdn_helo_name("localhost"));
        assert!(!fqdn_helo_name("bad..name"));
        assert!(!fqdn_helo_name("1.2.3.4"));
        assert!(fqdn_domain("example.org") && fqdn_domain("example.org."));
        assert!(fqdn_domain("[192.0.2.1]") && fqdn_domain("b\u{fc}cher.test"));
        for bad in [
            "example",
            "bad..example",
            "-x.example",
            "",
            ".example.org",
            "1.2.3.4",
        ] {
            assert!(!fqdn_domain(bad), "{bad}");
        }
        assert!(valid_address_domain("localhost") && valid_address_domain("x_.test"));
        assert!(!valid_address_domain("a..b") && !valid_address_domain("1.2.3.4"));
        assert_eq!(strip_root_dot("a.b."), "a.b");
        assert_eq!(strip_root_dot("a.b.."), "a.b..");
    }
}
