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

/// Whether `domain` is one of the names in a list parameter such as
/// `mydestination` (case-insensitive; `.example.com` entries match
/// subdomains, as Postfix's parent_domain_matches_subdomains does for
/// relay_domains). An internationalized name matches in its U-label
/// (`bücher.example`) and A-label (`xn--bcher-kva.example`) forms alike,
/// whichever of the two the list or the address uses.
pub fn domain_in_list(domain: &str, list: &[String]) -> bool {
    let d = crate::smtputf8::ascii_domain(domain.trim_end_matches('.'));
    list.iter().any(|item| {
        let item = crate::smtputf8::ascii_domain(item);
        if let Some(parent) = item.strip_prefix('.') {
            d.ends_with(&format!(".{parent}"))
        } else {
            d == item
        }
    })
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splitting_and_lists() {
        assert_eq!(split("a@b@c.test"), ("a@b", Some("c.test")));
        assert_eq!(domain("x@EXAMPLE.test."), "example.test");
        let l = vec!["example.test".to_string(), ".sub.test".to_string()];
        assert!(domain_in_list("Example.Test", &l));
        assert!(domain_in_list("a.sub.test", &l));
        assert!(!domain_in_list("sub.test", &l));
        let idn = vec!["bücher.test".to_string(), ".xn--mller-kva.test".to_string()];
        assert!(domain_in_list("xn--bcher-kva.test", &idn));
        assert!(domain_in_list("BÜCHER.test", &idn));
        assert!(domain_in_list("a.müller.test", &idn));
        assert!(!domain_in_list("buecher.test", &idn));
        assert_eq!(qualify("root", "h.test"), "root@h.test");
        assert_eq!(qualify("", "h.test"), "");
    }
}
