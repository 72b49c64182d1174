//! Transports that qmgr delivers itself: a master.cf service whose
//! command is Postfix's `error` or `discard` agent, whatever the
//! service's name (`oops unix - - n - - error`, `retry ... error`,
//! `bin ... discard`). Postfix's qmgr hands such a transport to the
//! agent, which only records an outcome; qmgr records it at once
//! instead, with the next hop as the reason, as those agents do.

use crate::resolve::{dsn_split, Resolution};
use postern_conf::master_cf::{self, TransportBehaviour};
use postern_conf::Config;
use std::collections::HashMap;

/// Transport name → what qmgr does for it.
pub struct Behaviours(HashMap<String, TransportBehaviour>);

impl Behaviours {
    /// From master.cf; a master.cf that cannot be read (master reported
    /// it) maps nothing.
    pub fn from_config(cfg: &Config) -> Behaviours {
        let services = cfg.master_services().unwrap_or_default();
        Behaviours(
            master_cf::transport_behaviours(&services)
                .into_iter()
                .collect(),
        )
    }

    /// The resolution with a pseudo-agent transport turned into its
    /// outcome.
    pub fn apply(&self, r: Resolution) -> Resolution {
        match &r {
            Resolution::Deliver { transport, nexthop } => match self.0.get(transport) {
                Some(b) => outcome(*b, nexthop),
                None => r,
            },
            _ => r,
        }
    }
}

/// What the pseudo agent says for a recipient with this next hop:
/// `[X.Y.Z ]text` for error and retry, any text for discard.
pub fn outcome(b: TransportBehaviour, nexthop: &str) -> Resolution {
    match b {
        TransportBehaviour::Bounce => {
            let (dsn, text) = dsn_split(nexthop, "5.0.0");
            let text = if text.is_empty() {
                "mail delivery is not possible for this address".to_string()
            } else {
                text
            };
            Resolution::Bounce { dsn, text }
        }
        TransportBehaviour::Defer => {
            let (dsn, text) = dsn_split(nexthop, "4.0.0");
            let text = if text.is_empty() {
                "mail delivery is temporarily suspended".to_string()
            } else {
                text
            };
            Resolution::Defer { dsn, text }
        }
        TransportBehaviour::Discard => Resolution::Discard {
            text: if nexthop.is_empty() {
                "discarded".to_string()
            } else {
                nexthop.to_string()
            },
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    #[test]
    fn by_command_not_name() {
        let t = "oops unix - - n - - error\nretry unix - - n - - error\nbin unix - - n - - discard\nsmtp unix - - n - - smtp\n";
        let s = master_cf::parse(t, Path::new("master.cf"), 100).unwrap();
        let b = Behaviours(master_cf::transport_behaviours(&s).into_iter().collect());
        let d = |t: &str, n: &str| Resolution::Deliver {
            transport: t.into(),
            nexthop: n.into(),
        };
        assert_eq!(
            b.apply(d("oops", "5.7.1 go away")),
            Resolution::Bounce {
                dsn: "5.7.1".into(),
                text: "go away".into()
            }
        );
        assert_eq!(
            b.apply(d("retry", "later")),
            Resolution::Defer {
                dsn: "4.0.0".into(),
                text: "later".into()
            }
        );
        assert_eq!(
            b.apply(d("bin", "")),
            Resolution::Discard {
                text: "discarded".into()
            }
        );
        assert_eq!(b.apply(d("smtp", "example.com")), d("smtp", "example.com"));
    }
}
