//! SMTPUTF8 (RFC 6531) as Postfix 3.7 does it: which addresses need it,
//! which mail sources get it by autodetection
//! (`smtputf8_autodetect_classes`), and the flags a queue file keeps.
//!
//! The flags are stored as one `A` record, `smtputf8=...` ([`ATTR`]):
//! a comma-separated list of
//! - `requested`: the sender asked for SMTPUTF8 (`MAIL FROM ... SMTPUTF8`),
//!   or autodetection found UTF-8 in a message of an autodetected class.
//!   Once set it stays set when the mail is forwarded or bounced.
//! - `header`: a header of the message contains non-ASCII text.
//! - `sender`: the envelope sender contains UTF-8.
//!
//! A delivery requires SMTPUTF8 when it was requested *and* something in
//! it is not ASCII (a header, the sender, or one of the transaction's own
//! recipients): only then is a next hop without SMTPUTF8 refused
//! (5.6.7); otherwise the message goes as it is, as Postfix's
//! `DELIVERY_REQUIRES_SMTPUTF8` decides.

/// The queue-file attribute that holds the flags.
pub const ATTR: &str = crate::qfile::attr::SMTPUTF8;

/// The SMTPUTF8 flags of one message.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Flags {
    pub requested: bool,
    pub header: bool,
    pub sender: bool,
}

impl Flags {
    /// Parses an attribute value (unknown words are ignored).
    pub fn parse(value: &str) -> Flags {
        let mut f = Flags::default();
        for w in value.split(',').map(str::trim) {
            match w {
                "requested" => f.requested = true,
                "header" => f.header = true,
                "sender" => f.sender = true,
                _ => {}
            }
        }
        f
    }

    /// The flags of a message from its attributes (none when absent; the
    /// last record wins, as for every attribute).
    pub fn from_attrs<'a>(attrs: impl Iterator<Item = (&'a str, &'a str)>) -> Flags {
        attrs
            .filter(|(n, _)| *n == ATTR)
            .last()
            .map(|(_, v)| Flags::parse(v))
            .unwrap_or_default()
    }

    /// The flags of a queued message.
    pub fn of_envelope(env: &crate::qfile::Envelope) -> Flags {
        env.attr(ATTR).map(Flags::parse).unwrap_or_default()
    }

    /// The attribute value; "" when no flag is set (no record needed).
    pub fn value(&self) -> String {
        let mut w = Vec::new();
        if self.requested {
            w.push("requested");
        }
        if self.header {
            w.push("header");
        }
        if self.sender {
            w.push("sender");
        }
        w.join(",")
    }

    /// Whether a delivery of this message from `sender` to `recipients`
    /// needs a next hop that offers SMTPUTF8.
    pub fn delivery_requires<'a>(
        &self,
        sender: &str,
        mut recipients: impl Iterator<Item = &'a str>,
    ) -> bool {
        self.requested
            && (self.header || is_utf8_address(sender) || recipients.any(is_utf8_address))
    }
}

/// Whether an address is non-ASCII (and so needs SMTPUTF8 to travel).
/// Addresses are Rust strings: valid UTF-8 by construction.
pub fn is_utf8_address(addr: &str) -> bool {
    !addr.is_ascii()
}

/// Whether the domain part of an address is non-ASCII: Postfix refuses
/// such an address from a client that did not ask for SMTPUTF8 (UTF-8
/// in the local part has always been accepted).
pub fn has_utf8_domain(addr: &str) -> bool {
    crate::addr::split(addr).1.is_some_and(|d| !d.is_ascii())
}

/// Whether a non-ASCII domain is a usable internationalized domain name:
/// it converts to its A-label form (IDNA, UTS #46 non-transitional with
/// the hyphen and STD3 checks, as Postfix through ICU since 3.2 with
/// `enable_idna2003_compatibility = no`) and that form is a valid host
/// name. Address literals and ASCII domains are left
/// to the other checks (true).
pub fn valid_utf8_domain(domain: &str) -> bool {
    if domain.is_ascii() || domain.starts_with('[') {
        return true;
    }
    match idna::domain_to_ascii_strict(domain.trim_end_matches('.')) {
        Ok(ascii) => crate::hostname::valid_hostname(&ascii),
        Err(_) => false,
    }
}

/// Whether an SMTP server takes `addr` (from MAIL FROM, RCPT TO) in a
/// transaction with (`smtputf8`) or without the SMTPUTF8 parameter, as
/// Postfix's smtpd does with `smtputf8_enable = yes`: a non-ASCII domain
/// only with SMTPUTF8, and then only a valid internationalized one;
/// UTF-8 in the local part either way (Postfix always took it; see
/// `strict_smtputf8` for the stricter rule). False is answered as bad
/// address syntax (501 5.1.7 / 5.1.3).
pub fn address_syntax_ok(addr: &str, smtputf8: bool) -> bool {
    match crate::addr::split(addr).1 {
        Some(d) if !d.is_ascii() => smtputf8 && valid_utf8_domain(d),
        _ => true,
    }
}

/// The other IDNA form of a table key's domain, for a lookup that missed
/// in the form it was asked in: `user@bücher.example` ↔
/// `user@xn--bcher-kva.example` (also a bare domain, a `.domain` and an
/// `@domain` key), so that a table lists an internationalized name in
/// either form (issue #16 point 5; Postfix 3.7 wants both forms listed).
/// None when the key has no internationalized domain or IDNA cannot
/// convert it.
pub fn other_idna_form(key: &str) -> Option<String> {
    let (head, domain) = match key.rfind('@') {
        Some(i) => key.split_at(i + 1),
        None => key.split_at(usize::from(key.starts_with('.'))),
    };
    let other = if !domain.is_ascii() {
        idna::domain_to_ascii(domain).ok()?
    } else if domain
        .split('.')
        .any(|l| l.len() > 4 && l[..4].eq_ignore_ascii_case("xn--"))
    {
        let (unicode, r) = idna::domain_to_unicode(domain);
        r.ok()?;
        unicode
    } else {
        return None;
    };
    (other != domain).then(|| format!("{head}{other}"))
}

/// A domain (or a `.domain` list entry) in the form lists compare: lower
/// case, and an internationalized name as its A-label (`xn--...`) form,
/// so that the U-label and A-label forms of one name are equal. A name
/// IDNA cannot convert is compared as it is (lower-cased).
pub fn ascii_domain(domain: &str) -> String {
    if domain.is_ascii() {
        return domain.to_ascii_lowercase();
    }
    let (dot, name) = match domain.strip_prefix('.') {
        Some(rest) => (".", rest),
        None => ("", domain),
    };
    match idna::domain_to_ascii(name) {
        Ok(a) => format!("{dot}{a}"),
        Err(_) => domain.to_lowercase(),
    }
}

/// A mail source class of `smtputf8_autodetect_classes`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// `sendmail` submissions (through pickup).
    Sendmail,
    /// Mail received by smtpd.
    Smtpd,
    /// Mail forwarded by local (aliases, `.forward`).
    Forward,
    /// Bounce (and delay, success) notices.
    Bounce,
    /// Other notices to the postmaster.
    Notify,
    /// Address verification probes.
    Verify,
}

impl Source {
    /// The class of a message submitted to cleanup, by the client's
    /// origin name (`NewMessage::origin`). None for requeued mail
    /// (`postsuper -r`), whose flag is already in its attributes.
    pub fn of_origin(origin: &str) -> Option<Source> {
        Some(match origin {
            "pickup" | "sendmail" => Source::Sendmail,
            "smtpd" => Source::Smtpd,
            "local" => Source::Forward,
            "qmgr" => Source::Bounce,
            "verify" => Source::Verify,
            _ => return None,
        })
    }

    fn name(self) -> &'static str {
        match self {
            Source::Sendmail => "sendmail",
            Source::Smtpd => "smtpd",
            Source::Forward => "forward",
            Source::Bounce => "bounce",
            Source::Notify => "notify",
            Source::Verify => "verify",
        }
    }
}

/// The classes of `smtputf8_autodetect_classes` (Postfix's default:
/// `sendmail, verify`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Autodetect {
    all: bool,
    classes: Vec<Source>,
}

impl Autodetect {
    /// Parses the parameter's value; Err names a word that is not a class
    /// (Postfix warns "bad input" and ignores the setting).
    pub fn parse(value: &str) -> Result<Autodetect, String> {
        let mut a = Autodetect::default();
        let all = [
            Source::Sendmail,
            Source::Smtpd,
            Source::Forward,
            Source::Bounce,
            Source::Notify,
            Source::Verify,
        ];
        for w in value
            .split(|c: char| c == ',' || c.is_whitespace())
            .filter(|w| !w.is_empty())
        {
            let w = w.to_ascii_lowercase();
            if w == "all" {
                a.all = true;
            } else if let Some(s) = all.iter().find(|s| s.name() == w) {
                a.classes.push(*s);
            } else {
                return Err(w);
            }
        }
        Ok(a)
    }

    /// Whether mail from `source` is autodetected.
    pub fn covers(&self, source: Source) -> bool {
        self.all || self.classes.contains(&source)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_round_trip() {
        let f = Flags {
            requested: true,
            header: false,
            sender: true,
        };
        assert_eq!(f.value(), "requested,sender");
        assert_eq!(Flags::parse(&f.value()), f);
        assert_eq!(Flags::default().value(), "");
        assert_eq!(
            Flags::from_attrs([("client", "x"), ("smtputf8", "header")].into_iter()),
            Flags {
                header: true,
                ..Flags::default()
            }
        );
    }

    #[test]
    fn delivery_requirement() {
        let req = Flags {
            requested: true,
            ..Flags::default()
        };
        assert!(!req.delivery_requires("a@b.test", ["c@d.test"].into_iter()));
        assert!(req.delivery_requires("a@b.test", ["c@d.test", "ü@d.test"].into_iter()));
        assert!(req.delivery_requires("ä@b.test", std::iter::empty()));
        let hdr = Flags {
            header: true,
            ..req
        };
        assert!(hdr.delivery_requires("a@b.test", ["c@d.test"].into_iter()));
        // Not requested: legacy 8-bit local parts go as they are.
        assert!(!Flags::default().delivery_requires("ä@b.test", ["ü@x"].into_iter()));
    }

    #[test]
    fn addresses_and_domains() {
        assert!(is_utf8_address("jörg@example.test"));
        assert!(!is_utf8_address("joerg@example.test"));
        assert!(has_utf8_domain("a@bücher.test"));
        assert!(!has_utf8_domain("jörg@example.test"));
        assert!(valid_utf8_domain("bücher.test"));
        assert!(valid_utf8_domain("example.test"));
        assert!(!valid_utf8_domain("bü..test"));
        assert!(!valid_utf8_domain("bü cher.test"));
        assert!(!valid_utf8_domain("bü-.test"));
        assert!(address_syntax_ok("jörg@example.test", false));
        assert!(!address_syntax_ok("a@bücher.test", false));
        assert!(address_syntax_ok("a@bücher.test", true));
        assert!(!address_syntax_ok("a@bü..test", true));
        assert!(address_syntax_ok("", false));
    }

    #[test]
    fn autodetect_classes() {
        let d = Autodetect::parse("sendmail, verify").unwrap();
        assert!(d.covers(Source::Sendmail) && d.covers(Source::Verify));
        assert!(!d.covers(Source::Smtpd));
        let all = Autodetect::parse("all").unwrap();
        assert!(all.covers(Source::Smtpd) && all.covers(Source::Forward));
        assert!(!Autodetect::parse("").unwrap().covers(Source::Sendmail));
        assert_eq!(Autodetect::parse("sendmail bogus"), Err("bogus".into()));
        assert_eq!(Source::of_origin("pickup"), Some(Source::Sendmail));
        assert_eq!(Source::of_origin("postsuper"), None);
    }

    #[test]
    fn table_keys_in_the_other_idna_form() {
        assert_eq!(
            other_idna_form("u@b\u{fc}cher.example").as_deref(),
            Some("u@xn--bcher-kva.example")
        );
        assert_eq!(
            other_idna_form("@xn--bcher-kva.example").as_deref(),
            Some("@b\u{fc}cher.example")
        );
        assert_eq!(
            other_idna_form(".b\u{fc}cher.example").as_deref(),
            Some(".xn--bcher-kva.example")
        );
        assert_eq!(other_idna_form("u@example.com"), None);
        assert_eq!(other_idna_form("alias"), None);
    }
}
