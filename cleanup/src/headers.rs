//! The header section: split into logical headers, edited, and mined for
//! recipients (`sendmail -t`).

/// One logical header: its name and the whole text, folded lines included,
/// ending in LF.
#[derive(Debug, Clone, PartialEq)]
pub struct Header {
    pub name: String,
    pub text: Vec<u8>,
}

impl Header {
    /// The value after the colon, unfolded, trimmed.
    pub fn value(&self) -> String {
        let s = String::from_utf8_lossy(&self.text);
        let v = s.split_once(':').map(|(_, v)| v).unwrap_or("");
        v.replace(['\r', '\n'], "").trim().to_string()
    }

    pub fn is(&self, name: &str) -> bool {
        self.name.eq_ignore_ascii_case(name)
    }
}

/// The name of a header line (`Name: ...`), or None when the line is not
/// a header. RFC 5322 field names are printable ASCII other than colon.
pub fn header_name(line: &[u8]) -> Option<&str> {
    let colon = line.iter().position(|&b| b == b':')?;
    let name = &line[..colon];
    let name_trimmed = trim_end_ws(name);
    if name_trimmed.is_empty() || !name_trimmed.iter().all(|&b| (33..=126).contains(&b)) {
        return None;
    }
    std::str::from_utf8(name_trimmed).ok()
}

fn trim_end_ws(b: &[u8]) -> &[u8] {
    let mut e = b.len();
    while e > 0 && (b[e - 1] == b' ' || b[e - 1] == b'\t') {
        e -= 1;
    }
    &b[..e]
}

/// Addresses in an address-list header value (To, Cc, Bcc): display
/// names, quoted strings, comments and groups are understood; the result
/// is the bare addr-specs.
pub fn addresses(value: &str) -> Vec<String> {
    // Remove comments (outside quoted strings), keep everything else.
    let mut s = String::with_capacity(value.len());
    let mut depth = 0;
    let mut quoted = false;
    let mut escaped = false;
    for c in value.chars() {
        if escaped {
            if depth == 0 {
                s.push(c);
            }
            escaped = false;
            continue;
        }
        match c {
            '\\' => {
                escaped = true;
                if depth == 0 {
                    s.push(c);
                }
            }
            '"' if depth == 0 => {
                quoted = !quoted;
                s.push(c);
            }
            '(' if !quoted => depth += 1,
            ')' if !quoted && depth > 0 => depth -= 1,
            c if depth == 0 => s.push(c),
            _ => {}
        }
    }
    // Split at top-level commas, colons (group start) and semicolons
    // (group end), outside quotes and angle brackets.
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut quoted = false;
    let mut angle = false;
    let mut escaped = false;
    let flush = |cur: &mut String, out: &mut Vec<String>| {
        let item = std::mem::take(cur);
        if let Some(a) = item_address(&item) {
            out.push(a);
        }
    };
    for c in s.chars() {
        if escaped {
            cur.push(c);
            escaped = false;
            continue;
        }
        match c {
            '\\' => {
                escaped = true;
                cur.push(c)
            }
            '"' if !angle => {
                quoted = !quoted;
                cur.push(c)
            }
            '<' if !quoted => {
                angle = true;
                cur.push(c)
            }
            '>' if !quoted => {
                angle = false;
                cur.push(c)
            }
            ',' | ';' if !quoted && !angle => flush(&mut cur, &mut out),
            ':' if !quoted && !angle => cur.clear(), // group display name
            c => cur.push(c),
        }
    }
    flush(&mut cur, &mut out);
    out
}

fn item_address(item: &str) -> Option<String> {
    let item = item.trim();
    if item.is_empty() {
        return None;
    }
    if let (Some(l), Some(r)) = (item.rfind('<'), item.rfind('>')) {
        if l < r {
            let inner = item[l + 1..r].trim();
            // Source routes (@a,@b:user@c) keep only the mailbox.
            let inner = inner.rsplit(':').next().unwrap_or(inner).trim();
            return (!inner.is_empty()).then(|| inner.to_string());
        }
    }
    let a: String = item.split_whitespace().collect::<Vec<_>>().join("");
    (!a.is_empty()).then_some(a)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn address_lists() {
        assert_eq!(
            addresses("\"Doe, John\" <john@x.test>, jane@y.test (Jane), Undisclosed:;"),
            vec!["john@x.test", "jane@y.test"]
        );
        assert_eq!(
            addresses("friends: a@x.test, b@x.test;, c@x.test"),
            vec!["a@x.test", "b@x.test", "c@x.test"]
        );
        assert_eq!(addresses("root"), vec!["root"]);
        assert_eq!(addresses("<@relay.test:u@x.test>"), vec!["u@x.test"]);
    }

    #[test]
    fn names() {
        assert_eq!(header_name(b"Subject: x"), Some("Subject"));
        assert_eq!(header_name(b"From x@y Mon"), None);
        assert_eq!(header_name(b"X-A : y"), Some("X-A"));
    }
}
