//! Where a recipient goes: (transport, next hop), from the one resolver
//! in `postern_common::resolve` (Postfix's trivial-rewrite; see there for
//! the classes, `transport_maps`, `relayhost` and the sender-dependent
//! tables).
//!
//! Three transports are handled by qmgr itself, as Postfix's `error`,
//! `retry` and `discard` agents would: `error:TEXT` bounces at once,
//! `retry:TEXT` defers, `discard:TEXT` drops the recipient as delivered.
//! TEXT may start with an enhanced status code (`error:5.1.1 no such user`).

use postern_common::resolve;
use postern_common::warning;
use postern_conf::Config;

pub use postern_common::resolve::dsn_split;

/// What to do with one recipient.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Resolution {
    /// Hand it to the delivery agent at `private/TRANSPORT`.
    Deliver { transport: String, nexthop: String },
    /// Fail it now (`error` transport, bad address syntax).
    Bounce { dsn: String, text: String },
    /// Try again later (`retry` transport, table trouble).
    Defer { dsn: String, text: String },
    /// Drop it as delivered (`discard` transport).
    Discard { text: String },
}

/// qmgr's side of [`postern_common::resolve::Resolver`]: what its
/// answers mean for a queued recipient.
pub struct Resolver {
    inner: resolve::Resolver,
    /// `default_filter_nexthop`: the next hop of a content filter that
    /// names none (empty: the recipient's domain).
    default_filter_nexthop: String,
}

impl Resolver {
    pub fn new(cfg: &Config) -> Resolver {
        Resolver {
            inner: resolve::Resolver::new(cfg),
            default_filter_nexthop: cfg.get("default_filter_nexthop"),
        }
    }

    /// Re-opens the tables whose files changed (see
    /// [`resolve::Resolver::refresh`]).
    pub fn refresh(&mut self) {
        self.inner.refresh();
    }

    /// Resolves one recipient address, without a sender.
    #[cfg(test)]
    pub fn resolve(&self, address: &str) -> Resolution {
        self.resolve_from(None, address)
    }

    /// Resolves one recipient address of mail from `sender` (None: not
    /// known, no sender-dependent transport or relay host).
    pub fn resolve_from(&self, sender: Option<&str>, address: &str) -> Resolution {
        self.resolve_filtered(sender, address, None)
    }

    /// [`Resolver::resolve_from`] for a message with an after-queue
    /// content filter (`transport:nexthop`, the queue file's
    /// `content_filter` attribute), as Postfix's qmgr: the filter
    /// overrides the resolver's transport and next hop (a failure or bad
    /// syntax still counts); a filter without a next hop uses
    /// `default_filter_nexthop`, else the recipient's domain.
    pub fn resolve_filtered(
        &self,
        sender: Option<&str>,
        address: &str,
        filter: Option<&str>,
    ) -> Resolution {
        let r = match self.inner.resolve(sender, address) {
            Ok(r) => r,
            Err(e) => {
                // The table and the cause go to the log, not into the
                // notices the sender may get (Postfix's words).
                warning!("{address}: {e}");
                return Resolution::Defer {
                    dsn: "4.3.0".into(),
                    text: "address resolver failure".into(),
                };
            }
        };
        if r.bad_syntax {
            return Resolution::Bounce {
                dsn: "5.1.3".into(),
                text: "bad address syntax".into(),
            };
        }
        if let Some(f) = filter.map(str::trim).filter(|f| !f.is_empty()) {
            // A pool (FILTER weighted:{a=1,b=1}) stays whole.
            let (transport, nexthop) = resolve::split_transport(f);
            let nexthop = if !nexthop.is_empty() {
                nexthop
            } else if !self.default_filter_nexthop.is_empty() {
                self.default_filter_nexthop.clone()
            } else {
                postern_common::addr::split(address)
                    .1
                    .unwrap_or_default()
                    .to_string()
            };
            return Resolution::Deliver { transport, nexthop };
        }
        let or = |text: String, default: &str| {
            if text.is_empty() {
                default.to_string()
            } else {
                text
            }
        };
        match r.transport.as_str() {
            "error" => {
                let (dsn, text) = dsn_split(&r.nexthop, "5.0.0");
                Resolution::Bounce {
                    dsn,
                    text: or(text, "mail delivery is not possible for this address"),
                }
            }
            "retry" => {
                let (dsn, text) = dsn_split(&r.nexthop, "4.0.0");
                Resolution::Defer {
                    dsn,
                    text: or(text, "mail delivery is temporarily suspended"),
                }
            }
            "discard" => Resolution::Discard {
                text: or(r.nexthop, "discarded"),
            },
            _ => Resolution::Deliver {
                transport: r.transport,
                nexthop: r.nexthop,
            },
        }
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
    fn content_filter_overrides() {
        let r = resolver("relay_domains = relayed.test\n");
        let f = |a: &str, f: &str| r.resolve_filtered(None, a, Some(f));
        assert_eq!(
            f("root", "amavis:[127.0.0.1]:10024"),
            deliver("amavis", "[127.0.0.1]:10024")
        );
        assert_eq!(f("x@remote.test", "scan:"), deliver("scan", "remote.test"));
        assert_eq!(f("x@remote.test", "scan"), deliver("scan", "remote.test"));
        assert_eq!(f("x@remote.test", ""), deliver("smtp", "remote.test"));
        let r = resolver("default_filter_nexthop = [10.0.0.1]\n");
        assert_eq!(
            r.resolve_filtered(None, "x@remote.test", Some("scan:")),
            deliver("scan", "[10.0.0.1]")
        );
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
        // A transport without a next hop resets it to the domain, around
        // any relay host (Postfix's `example.com smtp:`).
        assert_eq!(
            from("anyone@corp.test", "x@kept.test"),
            deliver("smtp", "kept.test")
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
        assert_eq!(
            r.resolve("x@a.b.sub.test"),
            deliver("relay", "a.b.sub.test")
        );
        assert_eq!(r.resolve("x@sub.test"), deliver("smtp", "[10.0.0.1]"));
        // A local domain routed elsewhere.
        assert_eq!(
            r.resolve("x@mx.example.test"),
            deliver("smtp", "mx.example.test")
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
        assert_eq!(r.resolve("u@local.test"), deliver("local", "local.test"));
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
