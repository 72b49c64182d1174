//! Address rewriting and content checks, as Postfix's cleanup(8) does
//! them:
//!
//! - canonical mapping: `sender_canonical_maps` (senders) or
//!   `recipient_canonical_maps` (recipients) first, then `canonical_maps`,
//!   each looked up by `user@domain`, then `user` (when the domain is
//!   `myorigin` or in `mydestination`), then `@domain`; a result
//!   `@other` from the `@domain` form keeps the user part. Applied to the
//!   classes in `canonical_classes` (`envelope_sender`,
//!   `envelope_recipient`, `header_sender`, `header_recipient`).
//! - masquerading: an address in a subdomain of one of
//!   `masquerade_domains` becomes `user@domain` (`!name` stops at that
//!   name); users in `masquerade_exceptions` are left alone; for the
//!   classes in `masquerade_classes`.
//! - virtual aliasing: each envelope recipient is looked up in
//!   `virtual_alias_maps` (`user@domain`, then `@domain`) and replaced by
//!   the comma-separated result, recursively (an address that maps to
//!   itself stays), at most [`VIRTUAL_DEPTH`] deep and
//!   [`VIRTUAL_EXPANSION`] addresses wide.
//! - `header_checks`, `mime_header_checks`, `nested_header_checks` (one
//!   logical header at a time, unfolded, by its class) and `body_checks`
//!   (one body line at a time): the first matching rule's action
//!   (`postern_common::header_checks`).
//! - automatic bcc: `sender_bcc_maps` by the sender, `recipient_bcc_maps`
//!   by each recipient, in Postfix's address forms.
//!
//! A table that cannot answer ([`LookupError`]) stops the message: cleanup
//! defers it (4.3.0) rather than queue it unrewritten or unchecked.

use postern_common::addr;
use postern_common::maps::{LookupError, Tables};
use postern_common::warning;
use postern_conf::Config;

/// How deep virtual aliases nest (Postfix's virtual_alias_recursion_limit).
pub const VIRTUAL_DEPTH: usize = 1000;
/// How many addresses one recipient may become (virtual_alias_expansion_limit).
pub const VIRTUAL_EXPANSION: usize = 1000;

pub use postern_common::header_checks::{Action, CheckTables, HeaderClass};

/// What cleanup rewrites, opened once per process.
pub struct Rewriter {
    canonical: Tables,
    sender_canonical: Tables,
    recipient_canonical: Tables,
    canonical_classes: Vec<String>,
    sender_canonical_classes: Vec<String>,
    recipient_canonical_classes: Vec<String>,
    masquerade_domains: Vec<String>,
    masquerade_classes: Vec<String>,
    /// `masquerade_exceptions`: a match list (Postfix's string_list) of
    /// user names; None: the list could not be read, no address is
    /// masqueraded.
    masquerade_exceptions: Option<postern_common::match_list::MatchList>,
    virtual_alias: Tables,
    /// The header and body tables of every class.
    pub checks: CheckTables,
    sender_bcc: Tables,
    recipient_bcc: Tables,
    local_domains: Vec<String>,
    /// Which domains are this machine's (the one resolver's answer).
    domains: postern_common::resolve::Resolver,
}

/// Why virtual alias expansion of a recipient stopped.
#[derive(Debug)]
pub enum AliasError {
    /// Too deep or too wide: the message is refused (5.4.6).
    Limit(String),
    /// A table could not answer: the message is deferred.
    Lookup(LookupError),
}

impl From<LookupError> for AliasError {
    fn from(e: LookupError) -> AliasError {
        AliasError::Lookup(e)
    }
}

fn lower_list(cfg: &Config, name: &str) -> Vec<String> {
    cfg.get_list(name)
        .into_iter()
        .map(|s| s.to_ascii_lowercase())
        .collect()
}

impl Rewriter {
    pub fn from_config(cfg: &Config) -> Rewriter {
        // A table that cannot be opened stays, failing every lookup:
        // the messages that need it are deferred.
        let open = |name: &str| {
            let (t, bad) = Tables::open_list(&cfg.get(name));
            for e in bad {
                warning!("{name}: {e}");
            }
            t
        };
        let canonical = open("canonical_maps");
        let sender_canonical = open("sender_canonical_maps");
        let recipient_canonical = open("recipient_canonical_maps");
        let virtual_alias = open("virtual_alias_maps");
        let sender_bcc = open("sender_bcc_maps");
        let recipient_bcc = open("recipient_bcc_maps");
        let (checks, bad) = CheckTables::open(|n| cfg.get(n), "");
        for e in bad {
            warning!("{e}");
        }
        let mut local_domains = lower_list(cfg, "mydestination");
        local_domains.push(cfg.get("myorigin").to_ascii_lowercase());
        Rewriter {
            canonical,
            sender_canonical,
            recipient_canonical,
            canonical_classes: lower_list(cfg, "canonical_classes"),
            sender_canonical_classes: lower_list(cfg, "sender_canonical_classes"),
            recipient_canonical_classes: lower_list(cfg, "recipient_canonical_classes"),
            masquerade_domains: lower_list(cfg, "masquerade_domains"),
            masquerade_classes: lower_list(cfg, "masquerade_classes"),
            masquerade_exceptions: postern_common::match_list::MatchList::from_config(
                cfg,
                "masquerade_exceptions",
                postern_common::match_list::Kind::String,
            )
            .map_err(|e| {
                // Nothing is masqueraded rather than a listed user.
                warning!("{e}; no address is masqueraded");
            })
            .ok(),
            virtual_alias,
            checks,
            sender_bcc,
            recipient_bcc,
            local_domains,
            domains: postern_common::resolve::Resolver::domains_only(cfg),
        }
    }

    /// `sender_bcc_maps`' copy address for `sender`.
    pub fn sender_bcc(&self, sender: &str) -> Result<Option<String>, LookupError> {
        self.map_one(&self.sender_bcc, sender)
    }

    /// `recipient_bcc_maps`' copy address for `recipient`.
    pub fn recipient_bcc(&self, recipient: &str) -> Result<Option<String>, LookupError> {
        self.map_one(&self.recipient_bcc, recipient)
    }

    /// One table lookup of Postfix's address forms; `None`: not found.
    fn map_one(&self, t: &Tables, address: &str) -> Result<Option<String>, LookupError> {
        if t.is_empty() || address.is_empty() {
            return Ok(None);
        }
        let (user, domain) = addr::split(address);
        let domain = domain.unwrap_or("");
        if let Some(v) = t.lookup(address)? {
            return Ok(Some(v.trim().to_string()));
        }
        // Postfix's mail_addr_find: the bare user when the domain is
        // `myorigin` or local.
        let local = !domain.is_empty()
            && (self
                .local_domains
                .last()
                .is_some_and(|o| o.eq_ignore_ascii_case(domain))
                || self.domains.is_local_domain(domain));
        if local {
            if let Some(v) = t.lookup(user)? {
                return Ok(Some(addr::qualify(v.trim(), domain)));
            }
        }
        if !domain.is_empty() {
            if let Some(v) = t.lookup(&format!("@{domain}"))? {
                let v = v.trim();
                return Ok(Some(match v.strip_prefix('@') {
                    Some(d) => format!("{user}@{d}"),
                    None => v.to_string(),
                }));
            }
        }
        Ok(None)
    }

    fn masquerade(&self, address: &str) -> String {
        let (user, Some(domain)) = addr::split(address) else {
            return address.to_string();
        };
        let excepted = match &self.masquerade_exceptions {
            None => true,
            Some(l) => {
                // A table that cannot answer: the address is left alone.
                !l.is_empty() && l.matches_name(user).unwrap_or(true)
            }
        };
        if excepted {
            return address.to_string();
        }
        let d = domain.to_ascii_lowercase();
        for m in &self.masquerade_domains {
            if let Some(stop) = m.strip_prefix('!') {
                if d == *stop || d.ends_with(&format!(".{stop}")) {
                    return address.to_string();
                }
                continue;
            }
            if d.ends_with(&format!(".{m}")) {
                return format!("{user}@{m}");
            }
        }
        address.to_string()
    }

    fn class(&self, list: &[String], name: &str) -> bool {
        list.iter().any(|c| c == name)
    }

    /// Rewrites an address of the given class (`envelope_sender`,
    /// `envelope_recipient`, `header_sender`, `header_recipient`).
    /// Err: a canonical table could not answer.
    pub fn address(&self, address: &str, class: &str) -> Result<String, LookupError> {
        let sender = class.ends_with("sender");
        let mut a = address.to_string();
        // As Postfix's cleanup: the sender or recipient table first, each
        // for the classes its own parameter names, then canonical_maps.
        let (own, own_classes) = if sender {
            (&self.sender_canonical, &self.sender_canonical_classes)
        } else {
            (&self.recipient_canonical, &self.recipient_canonical_classes)
        };
        if self.class(own_classes, class) {
            a = self.map_one(own, &a)?.unwrap_or(a);
        }
        if self.class(&self.canonical_classes, class) {
            a = self.map_one(&self.canonical, &a)?.unwrap_or(a);
        }
        if !self.masquerade_domains.is_empty() && self.class(&self.masquerade_classes, class) {
            a = self.masquerade(&a);
        }
        Ok(a)
    }

    /// The recipients `address` becomes through `virtual_alias_maps`.
    pub fn virtual_alias(&self, address: &str) -> Result<Vec<String>, AliasError> {
        if self.virtual_alias.is_empty() {
            return Ok(vec![address.to_string()]);
        }
        let mut out = Vec::new();
        self.expand(address, 0, &mut Vec::new(), &mut out)?;
        Ok(out)
    }

    fn expand(
        &self,
        address: &str,
        depth: usize,
        chain: &mut Vec<String>,
        out: &mut Vec<String>,
    ) -> Result<(), AliasError> {
        if depth > VIRTUAL_DEPTH {
            return Err(AliasError::Limit(format!(
                "virtual alias recursion limit exceeded for {address}"
            )));
        }
        let key = address.to_ascii_lowercase();
        let found = if chain.contains(&key) {
            None
        } else {
            self.map_one(&self.virtual_alias, address)?
        };
        match found {
            None => {
                if !out.iter().any(|o: &String| o.eq_ignore_ascii_case(address)) {
                    if out.len() >= VIRTUAL_EXPANSION {
                        return Err(AliasError::Limit(format!(
                            "virtual alias expansion limit exceeded for {address}"
                        )));
                    }
                    out.push(address.to_string());
                }
                Ok(())
            }
            Some(v) => {
                chain.push(key);
                for t in v
                    .split([',', ' ', '\t'])
                    .map(str::trim)
                    .filter(|t| !t.is_empty())
                {
                    let t = addr::qualify(
                        t,
                        self.local_domains.last().map(String::as_str).unwrap_or(""),
                    );
                    self.expand(&t, depth + 1, chain, out)?;
                }
                chain.pop();
                Ok(())
            }
        }
    }
}

/// Headers whose addresses are senders (`header_sender`) or recipients
/// (`header_recipient`), as Postfix's cleanup rewrites them.
pub fn header_class(name: &str) -> Option<&'static str> {
    const SENDERS: &[&str] = &[
        "from",
        "sender",
        "reply-to",
        "errors-to",
        "return-receipt-to",
        "resent-from",
        "resent-sender",
        "resent-reply-to",
    ];
    const RECIPIENTS: &[&str] = &["to", "cc", "bcc", "resent-to", "resent-cc", "resent-bcc"];
    let n = name.to_ascii_lowercase();
    if SENDERS.contains(&n.as_str()) {
        Some("header_sender")
    } else if RECIPIENTS.contains(&n.as_str()) {
        Some("header_recipient")
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rw(text: &str) -> Rewriter {
        let cfg = Config::from_text(
            std::path::Path::new("/nonexistent"),
            &format!("myhostname = h.test\nmydestination = h.test\n{text}"),
            std::path::Path::new("main.cf"),
        )
        .unwrap();
        Rewriter::from_config(&cfg)
    }

    #[test]
    fn canonical_and_masquerade() {
        let r = rw("sender_canonical_maps = inline:{root=admin@example.test}\n\
                    canonical_maps = inline:{@old.test=@new.test, admin@example.test=Admin@Example.test}\n\
                    masquerade_domains = !keep.example.test, example.test\n\
                    masquerade_exceptions = root\n");
        assert_eq!(
            r.address("root@h.test", "envelope_sender").unwrap(),
            "Admin@Example.test"
        );
        assert_eq!(
            r.address("root@h.test", "envelope_recipient").unwrap(),
            "root@h.test"
        );
        assert_eq!(
            r.address("u@old.test", "header_recipient").unwrap(),
            "u@new.test"
        );
        assert_eq!(
            r.address("u@a.b.example.test", "envelope_sender").unwrap(),
            "u@example.test"
        );
        assert_eq!(
            r.address("u@a.b.example.test", "envelope_recipient")
                .unwrap(),
            "u@a.b.example.test"
        );
        assert_eq!(
            r.address("u@x.keep.example.test", "header_sender").unwrap(),
            "u@x.keep.example.test"
        );
        assert_eq!(
            r.address("root@a.example.test", "header_sender").unwrap(),
            "root@a.example.test"
        );
    }

    #[test]
    fn virtual_aliases() {
        let r = rw(
            "virtual_alias_maps = inline:{info@v.test=a@x.test b@v.test, \
                    b@v.test=b@v.test c@y.test, @w.test=catch@x.test, loop@v.test=loop2@v.test, \
                    loop2@v.test=loop@v.test}\n",
        );
        assert_eq!(
            r.virtual_alias("info@v.test").unwrap(),
            ["a@x.test", "b@v.test", "c@y.test"]
        );
        assert_eq!(r.virtual_alias("any@w.test").unwrap(), ["catch@x.test"]);
        assert_eq!(r.virtual_alias("z@z.test").unwrap(), ["z@z.test"]);
        assert_eq!(r.virtual_alias("loop@v.test").unwrap(), ["loop@v.test"]);
    }

    #[test]
    fn header_classes() {
        assert_eq!(header_class("Reply-To"), Some("header_sender"));
        assert_eq!(header_class("Subject"), None);
    }
}
