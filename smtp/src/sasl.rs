//! SMTP AUTH as a client (RFC 4954), as Postfix's `smtp_sasl_*`: which
//! credentials to use and which mechanism is allowed.
//!
//! Credentials come from `smtp_sasl_password_maps` (`username:password`),
//! looked up by the sender address and then its `@domain` (with
//! `smtp_sender_dependent_authentication = yes`), then by the next hop as
//! written (`[host]:port`, `domain`), then by the server's host name.
//! Postern speaks the PLAIN and LOGIN mechanisms, both plaintext
//! mechanisms: `noplaintext` in `smtp_sasl_security_options` (the default,
//! for unencrypted sessions) or `smtp_sasl_tls_security_options` (for TLS
//! sessions) rules them out. `smtp_sasl_mechanism_filter`, when set,
//! limits the server's list to the names in it.

use postern_common::base64;
use postern_common::match_list::MatchList;

/// `username:password` from the password table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Credentials {
    pub user: String,
    pub pass: String,
}

impl Credentials {
    /// Splits `user:password` at the first colon.
    pub fn parse(v: &str) -> Option<Credentials> {
        let (u, p) = v.trim().split_once(':')?;
        Some(Credentials {
            user: u.to_string(),
            pass: p.to_string(),
        })
    }
}

/// `smtp_sasl_*security_options`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SecurityOptions {
    pub noplaintext: bool,
    pub noanonymous: bool,
}

impl SecurityOptions {
    pub fn parse(list: &[String]) -> SecurityOptions {
        let has = |w: &str| list.iter().any(|x| x.eq_ignore_ascii_case(w));
        SecurityOptions {
            noplaintext: has("noplaintext"),
            noanonymous: has("noanonymous"),
        }
    }
}

/// What one session needs to authenticate.
#[derive(Debug, Clone)]
pub struct Auth {
    pub creds: Credentials,
    /// For sessions without TLS.
    pub plain_opts: SecurityOptions,
    /// For sessions with TLS.
    pub tls_opts: SecurityOptions,
    /// `smtp_sasl_mechanism_filter` (a match list, as Postfix's
    /// string_list: names, `/file/name`, `type:table`, `!`); empty: no
    /// filter.
    pub filter: MatchList,
}

/// A mechanism Postern can speak.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mechanism {
    Plain,
    Login,
}

impl Auth {
    /// The mechanism to use among those the server offers (upper case),
    /// or None when none is allowed.
    pub fn choose(&self, offered: &[String], encrypted: bool) -> Option<Mechanism> {
        let opts = if encrypted {
            self.tls_opts
        } else {
            self.plain_opts
        };
        if opts.noplaintext {
            // PLAIN and LOGIN are all Postern has.
            return None;
        }
        let usable = |m: &str| {
            offered.iter().any(|o| o == m)
                && (self.filter.is_empty()
                    // A table that cannot answer allows nothing (the
                    // delivery defers for want of a mechanism).
                    || self.filter.matches_name(m).unwrap_or(false))
        };
        if usable("PLAIN") {
            Some(Mechanism::Plain)
        } else if usable("LOGIN") {
            Some(Mechanism::Login)
        } else {
            None
        }
    }
}

/// The PLAIN initial response: base64 of `\0user\0password`.
pub fn plain_response(c: &Credentials) -> String {
    let mut raw = Vec::with_capacity(c.user.len() + c.pass.len() + 2);
    raw.push(0);
    raw.extend_from_slice(c.user.as_bytes());
    raw.push(0);
    raw.extend_from_slice(c.pass.as_bytes());
    base64::encode(&raw)
}

#[cfg(test)]
mod tests {
    use super::*;
    use postern_common::match_list::Kind;

    fn auth(plain: &str, tls: &str) -> Auth {
        let l = |s: &str| postern_conf::split_list(s);
        Auth {
            creds: Credentials::parse("u@x.test:p:w").unwrap(),
            plain_opts: SecurityOptions::parse(&l(plain)),
            tls_opts: SecurityOptions::parse(&l(tls)),
            filter: MatchList::default(),
        }
    }

    #[test]
    fn credentials_and_mechanisms() {
        let a = auth("noplaintext, noanonymous", "noanonymous");
        assert_eq!(a.creds.user, "u@x.test");
        assert_eq!(a.creds.pass, "p:w");
        let both = vec!["LOGIN".to_string(), "PLAIN".to_string()];
        assert_eq!(a.choose(&both, false), None);
        assert_eq!(a.choose(&both, true), Some(Mechanism::Plain));
        assert_eq!(a.choose(&["LOGIN".into()], true), Some(Mechanism::Login));
        assert_eq!(a.choose(&["CRAM-MD5".into()], true), None);
        let mut f = auth("", "");
        f.filter = MatchList::parse("login", Kind::String, false).unwrap();
        assert_eq!(f.choose(&both, false), Some(Mechanism::Login));
        assert_eq!(
            plain_response(&Credentials::parse("a:b").unwrap()),
            base64::encode(b"\0a\0b")
        );
    }
}
