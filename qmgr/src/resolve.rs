//! Where a recipient goes: (transport, next hop), as Postfix's
//! trivial-rewrite resolves it.
//!
//! First the address class picks a default: a domain-less address or one
//! whose domain is in `mydestination` → `local_transport`
//! (`local:$myhostname`); a domain in `relay_domains` → `relay_transport`;
//! anything else → `default_transport`. Then `transport_maps`, looked up by
//! the full address (and without its `recipient_delimiter` extension), the
//! domain, each parent as `.parent`, and `*`, may replace either part: a
//! value is `transport:nexthop`, where an empty transport keeps the
//! class's and an empty next hop means the usual one.
//!
//! The usual next hop: `local_transport`'s (or `$myhostname`) for the
//! local transport; for any other transport the class default's when the
//! transport is the class's own, else `relayhost` when set, else the
//! recipient's domain. Before `relayhost` and the domain,
//! `sender_dependent_relayhost_maps` is searched by the envelope sender
//! (the full address, then `@domain`; `<>` for the null sender): a result
//! other than `DUNNO` is the next hop ([`Resolver::resolve_from`]). A
//! next hop from `transport_maps` or from the class's transport setting
//! is never overridden, as in Postfix.
//!
//! Three transports are handled by qmgr itself, as Postfix's `error`,
//! `retry` and `discard` agents would: `error:TEXT` bounces at once,
//! `retry:TEXT` defers, `discard:TEXT` drops the recipient as delivered.
//! TEXT may start with an enhanced status code (`error:5.1.1 no such user`).

use postern_common::addr;
use postern_common::maps::{self, Tables};
use postern_conf::Config;
use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime};

/// What to do with one recipient.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Resolution {
    /// Hand it to the delivery agent at `private/TRANSPORT`.
    Deliver { transport: String, nexthop: String },
    /// Fail it now (`error` transport).
    Bounce { dsn: String, text: String },
    /// Try again later (`retry` transport, table trouble).
    Defer { dsn: String, text: String },
    /// Drop it as delivered (`discard` transport).
    Discard { text: String },
}

/// The resolver's view of the configuration, with `transport_maps` open.
pub struct Resolver {
    myhostname: String,
    mydestination: Vec<String>,
    relay_domains: Vec<String>,
    relayhost: String,
    delimiter: String,
    local: (String, String),
    relay: (String, String),
    /// `virtual_mailbox_domains` → `virtual_transport` (Postfix's virtual
    /// mailbox class, after mydestination and before relay_domains).
    virtual_domains: maps::DomainList,
    virtual_: (String, String),
    /// `virtual_alias_domains`: cleanup expanded every known address of
    /// these domains, so one still here is unknown (Postfix's virtual
    /// alias class, whose transport is `error`).
    virtual_alias_domains: maps::DomainList,
    default: (String, String),
    maps_spec: String,
    maps: Tables,
    map_errors: Vec<String>,
    /// The files behind `transport_maps`, with the mtime they had when
    /// opened, to notice a `postmap`.
    map_files: Vec<(PathBuf, Option<SystemTime>)>,
    /// `sender_dependent_relayhost_maps`, its open errors and files.
    snd_relay_spec: String,
    snd_relay: Tables,
    snd_relay_errors: Vec<String>,
    snd_relay_files: Vec<(PathBuf, Option<SystemTime>)>,
    checked: Instant,
}

/// Splits `transport:nexthop` (the next hop may hold more colons).
fn split_value(v: &str) -> (String, String) {
    match v.trim().split_once(':') {
        Some((t, n)) => (t.trim().to_string(), n.trim().to_string()),
        None => (v.trim().to_string(), String::new()),
    }
}

/// Splits an optional leading enhanced status code off a reason text:
/// "5.1.1 no such user" → ("5.1.1", "no such user").
pub fn dsn_split(text: &str, default: &str) -> (String, String) {
    let text = text.trim();
    let (first, rest) = text.split_once(' ').unwrap_or((text, ""));
    let parts: Vec<&str> = first.split('.').collect();
    let is_code = parts.len() == 3
        && matches!(parts[0], "2" | "4" | "5")
        && parts[1..]
            .iter()
            .all(|p| !p.is_empty() && p.len() <= 3 && p.bytes().all(|b| b.is_ascii_digit()));
    if is_code {
        // The class of the transport wins: error: is permanent, retry: is not.
        let code = format!("{}.{}.{}", &default[..1], parts[1], parts[2]);
        (code, rest.trim().to_string())
    } else {
        (default.to_string(), text.to_string())
    }
}

fn file_of(spec: &str) -> Option<PathBuf> {
    maps::table_file(spec)
}

fn mtime(p: &PathBuf) -> Option<SystemTime> {
    std::fs::metadata(p).and_then(|m| m.modified()).ok()
}

/// The files behind a list of tables, with their mtimes now.
fn files_of(spec: &str) -> Vec<(PathBuf, Option<SystemTime>)> {
    maps::split_specs(spec)
        .iter()
        .filter_map(|s| file_of(s))
        .map(|p| {
            let t = mtime(&p);
            (p, t)
        })
        .collect()
}

impl Resolver {
    pub fn new(cfg: &Config) -> Resolver {
        let myhostname = cfg.get("myhostname").to_ascii_lowercase();
        let mut r = Resolver {
            mydestination: cfg.get_list("mydestination"),
            relay_domains: cfg.get_list("relay_domains"),
            relayhost: cfg.get("relayhost").trim().to_string(),
            delimiter: cfg.get("recipient_delimiter"),
            local: split_value(&cfg.get("local_transport")),
            relay: split_value(&cfg.get("relay_transport")),
            virtual_domains: maps::DomainList::new(&cfg.get_list("virtual_mailbox_domains")).0,
            virtual_: split_value(&cfg.get("virtual_transport")),
            virtual_alias_domains: maps::DomainList::new(&cfg.get_list("virtual_alias_domains")).0,
            default: split_value(&cfg.get("default_transport")),
            maps_spec: cfg.get("transport_maps"),
            maps: Tables::default(),
            map_errors: Vec::new(),
            map_files: Vec::new(),
            snd_relay_spec: cfg.get("sender_dependent_relayhost_maps"),
            snd_relay: Tables::default(),
            snd_relay_errors: Vec::new(),
            snd_relay_files: Vec::new(),
            checked: Instant::now(),
            myhostname,
        };
        r.open_maps();
        r
    }

    fn open_maps(&mut self) {
        let (tables, errors) = Tables::open_list(&self.maps_spec);
        for e in &errors {
            postern_common::warning!("transport_maps: {e}");
        }
        self.maps = tables;
        self.map_errors = errors;
        self.map_files = files_of(&self.maps_spec);
        let (tables, errors) = Tables::open_list(&self.snd_relay_spec);
        for e in &errors {
            postern_common::warning!("sender_dependent_relayhost_maps: {e}");
        }
        self.snd_relay = tables;
        self.snd_relay_errors = errors;
        self.snd_relay_files = files_of(&self.snd_relay_spec);
    }

    /// Re-opens `transport_maps` when one of its files changed (a new
    /// `postmap`) or could not be opened last time. Cheap: at most one
    /// check a second.
    pub fn refresh(&mut self) {
        // Chrooted, the files are out of sight: the tables read at start
        // stay until `postern reload` starts a new qmgr.
        if self.checked.elapsed() < Duration::from_secs(1) || postern_common::service::jailed() {
            return;
        }
        self.checked = Instant::now();
        let changed = !self.map_errors.is_empty()
            || !self.snd_relay_errors.is_empty()
            || self
                .map_files
                .iter()
                .chain(&self.snd_relay_files)
                // A file qmgr may not even stat (in a directory only
                // root may search) is not taken for changed: the table
                // watch says whether it did, and qmgr then restarts
                // (manager.rs, table_watch::stale).
                .any(|(p, t)| mtime(p).is_some_and(|now| Some(now) != *t));
        if changed {
            self.open_maps();
        }
    }

    fn lookup(&self, address: &str, domain: &str) -> Option<&str> {
        if self.maps.is_empty() {
            return None;
        }
        let address = address.to_ascii_lowercase();
        if let Some(v) = self.maps.lookup(&address) {
            return Some(v);
        }
        if !self.delimiter.is_empty() {
            let (local, dom) = addr::split(&address);
            if let Some(i) = local.find(|c| self.delimiter.contains(c)) {
                let bare = match dom {
                    Some(d) => format!("{}@{d}", &local[..i]),
                    None => local[..i].to_string(),
                };
                if let Some(v) = self.maps.lookup(&bare) {
                    return Some(v);
                }
            }
        }
        if !domain.is_empty() {
            if let Some(v) = self.maps.lookup(domain) {
                return Some(v);
            }
            let mut rest = domain;
            while let Some((_, parent)) = rest.split_once('.') {
                if let Some(v) = self.maps.lookup(&format!(".{parent}")) {
                    return Some(v);
                }
                rest = parent;
            }
        }
        self.maps.lookup("*")
    }

    /// `sender_dependent_relayhost_maps` for `sender`: the full address,
    /// then `@domain` (`<>` for the null sender, Postfix's
    /// `empty_address_relayhost_maps_lookup_key`). `DUNNO` ends the
    /// search with no override.
    fn sender_relayhost(&self, sender: &str) -> Option<String> {
        if self.snd_relay.is_empty() {
            return None;
        }
        let sender = sender.to_ascii_lowercase();
        let found = if sender.is_empty() {
            self.snd_relay.lookup("<>")
        } else {
            self.snd_relay.lookup(&sender).or_else(|| {
                let d = addr::domain(&sender);
                (!d.is_empty())
                    .then(|| self.snd_relay.lookup(&format!("@{d}")))
                    .flatten()
            })
        };
        let v = found?.trim();
        (!v.is_empty() && !v.eq_ignore_ascii_case("DUNNO")).then(|| v.to_string())
    }

    /// Resolves one recipient address, without a sender.
    #[cfg(test)]
    pub fn resolve(&self, address: &str) -> Resolution {
        self.resolve_from(None, address)
    }

    /// Resolves one recipient address of mail from `sender` (None: not
    /// known, no sender-dependent relay host).
    pub fn resolve_from(&self, sender: Option<&str>, address: &str) -> Resolution {
        let domain = addr::domain(address);
        let class = if domain.is_empty() || addr::domain_in_list(&domain, &self.mydestination) {
            &self.local
        } else if self.virtual_alias_domains.contains(&domain) {
            return Resolution::Bounce {
                dsn: "5.1.1".into(),
                text: "User unknown in virtual alias table".into(),
            };
        } else if self.virtual_domains.contains(&domain) {
            &self.virtual_
        } else if addr::domain_in_list(&domain, &self.relay_domains) {
            &self.relay
        } else {
            &self.default
        };
        let (mut transport, mut nexthop) = class.clone();
        if !self.map_errors.is_empty() {
            return Resolution::Defer {
                dsn: "4.3.0".into(),
                text: format!("transport table unavailable: {}", self.map_errors[0]),
            };
        }
        if sender.is_some() && !self.snd_relay_errors.is_empty() {
            return Resolution::Defer {
                dsn: "4.3.0".into(),
                text: format!(
                    "sender-dependent relayhost table unavailable: {}",
                    self.snd_relay_errors[0]
                ),
            };
        }
        if let Some(v) = self.lookup(address, &domain) {
            let (t, n) = split_value(v);
            if !t.is_empty() {
                transport = t;
            }
            if !n.is_empty() {
                nexthop = n;
            } else if transport != class.0 {
                nexthop = String::new();
            }
        }
        match transport.as_str() {
            "error" => {
                let (dsn, text) = dsn_split(&nexthop, "5.0.0");
                let text = if text.is_empty() {
                    "mail delivery is not possible for this address".to_string()
                } else {
                    text
                };
                return Resolution::Bounce { dsn, text };
            }
            "retry" => {
                let (dsn, text) = dsn_split(&nexthop, "4.0.0");
                let text = if text.is_empty() {
                    "mail delivery is temporarily suspended".to_string()
                } else {
                    text
                };
                return Resolution::Defer { dsn, text };
            }
            "discard" => {
                let text = if nexthop.is_empty() {
                    "discarded".to_string()
                } else {
                    nexthop
                };
                return Resolution::Discard { text };
            }
            _ => {}
        }
        if nexthop.is_empty() {
            nexthop = if transport == self.local.0 {
                if self.local.1.is_empty() {
                    self.myhostname.clone()
                } else {
                    self.local.1.clone()
                }
            } else if let Some(relay) = sender.and_then(|s| self.sender_relayhost(s)) {
                relay
            } else if !self.relayhost.is_empty() {
                self.relayhost.clone()
            } else if !domain.is_empty() {
                domain
            } else {
                self.myhostname.clone()
            };
        }
        Resolution::Deliver { transport, nexthop }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn resolver(text: &str) -> Resolver {
        let base = "myhostname = mx.example.test\nmydestination = $myhostname, localhost\n";
        let cfg = Config::from_text(
            Path::new("/nonexistent"),
            &format!("{base}{text}"),
            Path::new("main.cf"),
        )
        .unwrap();
        Resolver::new(&cfg)
    }

    fn deliver(t: &str, n: &str) -> Resolution {
        Resolution::Deliver {
            transport: t.into(),
            nexthop: n.into(),
        }
    }

    #[test]
    fn classes_and_defaults() {
        let r = resolver("relay_domains = relayed.test\n");
        assert_eq!(r.resolve("root"), deliver("local", "mx.example.test"));
        assert_eq!(
            r.resolve("alice@MX.Example.Test"),
            deliver("local", "mx.example.test")
        );
        assert_eq!(
            r.resolve("bob@localhost"),
            deliver("local", "mx.example.test")
        );
        assert_eq!(
            r.resolve("x@relayed.test"),
            deliver("relay", "relayed.test")
        );
        assert_eq!(r.resolve("x@Remote.Test."), deliver("smtp", "remote.test"));
    }

    #[test]
    fn relayhost_and_transport_nexthops() {
        let r = resolver("relayhost = [127.0.0.1]:2525\nrelay_domains = relayed.test\n");
        assert_eq!(
            r.resolve("x@remote.test"),
            deliver("smtp", "[127.0.0.1]:2525")
        );
        assert_eq!(
            r.resolve("x@relayed.test"),
            deliver("relay", "[127.0.0.1]:2525")
        );
        assert_eq!(
            r.resolve("root@localhost"),
            deliver("local", "mx.example.test")
        );
        let r = resolver("default_transport = smtp:[gw.test]\n");
        assert_eq!(r.resolve("x@remote.test"), deliver("smtp", "[gw.test]"));
    }

    #[test]
    fn sender_dependent_relayhost() {
        let r = resolver(concat!(
            "relayhost = [10.0.0.1]\n",
            "relay_domains = relayed.test\n",
            "sender_dependent_relayhost_maps = inline:{ boss@corp.test=[10.0.0.2]:2525,",
            " @corp.test=[10.0.0.3], other@corp.test=DUNNO, <>=[10.0.0.4] }\n",
            "transport_maps = inline:{ fixed.test=smtp:[10.0.0.9], kept.test=smtp: }\n"
        ));
        let from = |s: &str, a: &str| r.resolve_from(Some(s), a);
        // Full address, then @domain; case-insensitive.
        assert_eq!(
            from("Boss@Corp.test", "x@remote.test"),
            deliver("smtp", "[10.0.0.2]:2525")
        );
        assert_eq!(
            from("anyone@corp.test", "x@remote.test"),
            deliver("smtp", "[10.0.0.3]")
        );
        // DUNNO: no override; an unmapped sender: relayhost.
        assert_eq!(
            from("other@corp.test", "x@remote.test"),
            deliver("smtp", "[10.0.0.1]")
        );
        assert_eq!(
            from("a@elsewhere.test", "x@remote.test"),
            deliver("smtp", "[10.0.0.1]")
        );
        // The null sender is looked up as <>.
        assert_eq!(from("", "x@remote.test"), deliver("smtp", "[10.0.0.4]"));
        // Relay domains go the same way; local mail and transport_maps
        // next hops are not overridden.
        assert_eq!(
            from("anyone@corp.test", "x@relayed.test"),
            deliver("relay", "[10.0.0.3]")
        );
        assert_eq!(
            from("anyone@corp.test", "root@localhost"),
            deliver("local", "mx.example.test")
        );
        assert_eq!(
            from("anyone@corp.test", "x@fixed.test"),
            deliver("smtp", "[10.0.0.9]")
        );
        assert_eq!(
            from("anyone@corp.test", "x@kept.test"),
            deliver("smtp", "[10.0.0.3]")
        );
        // Without relayhost the map still overrides the MX route.
        let r = resolver("sender_dependent_relayhost_maps = inline:{ @corp.test=[10.0.0.3] }\n");
        assert_eq!(
            r.resolve_from(Some("a@corp.test"), "x@remote.test"),
            deliver("smtp", "[10.0.0.3]")
        );
        assert_eq!(
            r.resolve_from(Some("a@else.test"), "x@remote.test"),
            deliver("smtp", "remote.test")
        );
    }

    #[test]
    fn transport_maps() {
        let r = resolver(concat!(
            "relayhost = [10.0.0.1]\n",
            "transport_maps = inline:{ special@remote.test=smtp:[127.0.0.1]:2525,",
            " remote.test=smtp:remote.test:2526, .sub.test=relay:, ",
            " mx.example.test=smtp:, gone.test=error:5.1.1 no such domain,",
            " later.test=retry:not now, lost.test=error:, null.test=discard:,",
            " empty.test=:[192.0.2.1] }\n"
        ));
        assert_eq!(
            r.resolve("special@remote.test"),
            deliver("smtp", "[127.0.0.1]:2525")
        );
        assert_eq!(
            r.resolve("other@Remote.test"),
            deliver("smtp", "remote.test:2526")
        );
        assert_eq!(r.resolve("x@a.b.sub.test"), deliver("relay", "[10.0.0.1]"));
        assert_eq!(r.resolve("x@sub.test"), deliver("smtp", "[10.0.0.1]"));
        // A local domain routed elsewhere.
        assert_eq!(
            r.resolve("x@mx.example.test"),
            deliver("smtp", "[10.0.0.1]")
        );
        assert_eq!(r.resolve("x@empty.test"), deliver("smtp", "[192.0.2.1]"));
        assert_eq!(
            r.resolve("x@gone.test"),
            Resolution::Bounce {
                dsn: "5.1.1".into(),
                text: "no such domain".into()
            }
        );
        assert!(
            matches!(r.resolve("x@lost.test"), Resolution::Bounce { dsn, .. } if dsn == "5.0.0")
        );
        assert_eq!(
            r.resolve("x@later.test"),
            Resolution::Defer {
                dsn: "4.0.0".into(),
                text: "not now".into()
            }
        );
        assert!(matches!(
            r.resolve("x@null.test"),
            Resolution::Discard { .. }
        ));
        let r = resolver("transport_maps = inline:{ local.test=local: }\n");
        assert_eq!(
            r.resolve("u@local.test"),
            deliver("local", "mx.example.test")
        );
    }

    #[test]
    fn extension_and_wildcard() {
        let r = resolver(concat!(
            "recipient_delimiter = +\n",
            "transport_maps = inline:{ u@d.test=smtp:[h1], *=smtp:[h2] }\n"
        ));
        assert_eq!(r.resolve("u+tag@d.test"), deliver("smtp", "[h1]"));
        assert_eq!(r.resolve("v@d.test"), deliver("smtp", "[h2]"));
    }

    #[test]
    fn unavailable_table_defers() {
        let r = resolver("transport_maps = hash:/nonexistent/transport\n");
        assert!(matches!(
            r.resolve("x@remote.test"),
            Resolution::Defer { .. }
        ));
    }

    #[test]
    fn status_codes() {
        assert_eq!(
            dsn_split("5.7.1 go away", "5.0.0"),
            ("5.7.1".into(), "go away".into())
        );
        assert_eq!(
            dsn_split("4.7.1 go away", "5.0.0"),
            ("5.7.1".into(), "go away".into())
        );
        assert_eq!(
            dsn_split("5.x.1 nope", "5.0.0"),
            ("5.0.0".into(), "5.x.1 nope".into())
        );
    }
}
