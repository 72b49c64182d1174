//! Mail addresses as the envelope carries them: `local@domain`, stored
//! without angle brackets, the null sender as "".

/// Splits at the last `@` into local part and domain.
pub fn split(addr: &str) -> (&str, Option<&str>) {
    match addr.rfind('@') {
        Some(i) => (&addr[..i], Some(&addr[i + 1..])),
        None => (addr, None),
    }
}

/// The domain, lower-cased, without a trailing dot; "" when there is none.
pub fn domain(addr: &str) -> String {
    split(addr)
        .1
        .map(|d| d.trim_end_matches('.').to_ascii_lowercase())
        .unwrap_or_default()
}

/// Completes a bare local name with `@origin` (`myorigin`), leaving the
/// null sender and full addresses alone.
pub fn qualify(addr: &str, origin: &str) -> String {
    if addr.is_empty() || addr.contains('@') {
        addr.to_string()
    } else {
        format!("{addr}@{origin}")
    }
}

/// A local part as RFC 5321 and 5322 write it (Postfix's
/// quote_822_local): as it is when it is a dot-atom (UTF-8 letters
/// allowed, RFC 6531) or already quoted; otherwise in double quotes, with
/// `"` and `\` escaped.
pub fn quote_local_part(local: &str) -> String {
    let atext =
        |c: char| c.is_ascii_alphanumeric() || "!#$%&'*+-/=?^_`{|}~".contains(c) || !c.is_ascii();
    let dot_atom = !local.is_empty()
        && local
            .split('.')
            .all(|w| !w.is_empty() && w.chars().all(atext));
    let quoted = local.len() >= 2 && local.starts_with('"') && local.ends_with('"');
    if dot_atom || quoted {
        return local.to_string();
    }
    let mut q = String::with_capacity(local.len() + 2);
    q.push('"');
    for c in local.chars() {
        if c == '"' || c == '\\' {
            q.push('\\');
        }
        q.push(c);
    }
    q.push('"');
    q
}

/// `addr` with its local part quoted where RFC 5322 requires it
/// (`a b@x` → `"a b"@x`).
pub fn quote_address(addr: &str) -> String {
    match addr.rfind('@') {
        Some(i) => format!("{}{}", quote_local_part(&addr[..i]), &addr[i..]),
        None => quote_local_part(addr),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splitting_and_lists() {
        assert_eq!(split("a@b@c.test"), ("a@b", Some("c.test")));
        assert_eq!(domain("x@EXAMPLE.test."), "example.test");
        assert_eq!(qualify("root", "h.test"), "root@h.test");
        assert_eq!(qualify("", "h.test"), "");
    }

    #[test]
    fn local_parts_are_quoted_only_when_they_must_be() {
        assert_eq!(quote_address("a.b@x"), "a.b@x");
        assert_eq!(quote_address("a b@x"), "\"a b\"@x");
        assert_eq!(quote_address("a\"b@x"), "\"a\\\"b\"@x");
        assert_eq!(quote_address(".a@x"), "\".a\"@x");
        assert_eq!(quote_address("postmaster"), "postmaster");
        assert_eq!(quote_address("\"a b\"@x"), "\"a b\"@x");
        assert_eq!(quote_address("jörg@x"), "jörg@x");
        assert_eq!(quote_local_part("a.b+c"), "a.b+c");
        assert_eq!(quote_local_part(""), "\"\"");
    }
}
