//! Every parameter of Postfix 3.7, with what Postern does with it.
//!
//! The data is `conf/postfix-params.tsv` (taken once from Postfix 3.7's
//! `postconf -d`, then annotated by hand): Postfix's default and, for a
//! name Postern does not read, whether it is harmlessly ignored, done
//! another way, or not offered, with a one-line why. A name in
//! [`crate::params::PARAMS`] is honoured whatever the file says, so a
//! parameter that gains an implementation only needs its PARAMS entry.
//! `postconf -d`, the "unused parameter" warnings and postconf(5) all come
//! from here.

use crate::master_cf::Service;
use crate::params;
use std::sync::OnceLock;

const TABLE: &str = include_str!("../postfix-params.tsv");

/// What Postern does with a Postfix parameter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    /// Read and acted on as Postfix does.
    Honoured,
    /// Accepted and ignored: nothing changes when it is set.
    Ignored,
    /// Accepted; the job is done another way (the why says how).
    Other,
    /// Accepted, but the feature is not offered: setting it has no effect.
    Unsupported,
}

impl Status {
    /// The word in the table's status column.
    pub fn word(self) -> &'static str {
        match self {
            Status::Honoured => "honoured",
            Status::Ignored => "ignored",
            Status::Other => "other",
            Status::Unsupported => "unsupported",
        }
    }

    fn from_word(w: &str) -> Option<Status> {
        Some(match w {
            "honoured" => Status::Honoured,
            "ignored" => Status::Ignored,
            "other" => Status::Other,
            "unsupported" => Status::Unsupported,
            _ => return None,
        })
    }
}

/// One row of the table.
#[derive(Debug, Clone, PartialEq)]
pub struct PostfixParam {
    pub name: &'static str,
    /// Postfix 3.7's default ("" for the machine-dependent ones).
    pub postfix_default: &'static str,
    pub status: Status,
    /// Why, for a parameter that is not honoured as Postfix does.
    pub why: &'static str,
}

/// Every row, sorted by name.
pub fn all() -> &'static [PostfixParam] {
    static ROWS: OnceLock<Vec<PostfixParam>> = OnceLock::new();
    ROWS.get_or_init(|| {
        let mut rows: Vec<PostfixParam> = TABLE
            .lines()
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .map(|l| {
                let mut f = l.split('\t');
                let (Some(name), Some(dflt), Some(status), why) =
                    (f.next(), f.next(), f.next(), f.next())
                else {
                    panic!("postfix-params.tsv: bad line {l:?}");
                };
                PostfixParam {
                    name,
                    postfix_default: dflt,
                    status: Status::from_word(status)
                        .unwrap_or_else(|| panic!("postfix-params.tsv: bad status in {l:?}")),
                    why: why.unwrap_or(""),
                }
            })
            .collect();
        rows.sort_by(|a, b| a.name.cmp(b.name));
        rows
    })
}

/// The row of a Postfix parameter.
pub fn find(name: &str) -> Option<&'static PostfixParam> {
    let rows = all();
    rows.binary_search_by(|r| r.name.cmp(name))
        .ok()
        .map(|i| &rows[i])
}

/// What Postern does with `name`, and why; `None` for a name that is
/// neither Postern's nor Postfix's.
pub fn status_of(name: &str) -> Option<(Status, &'static str)> {
    if params::default_of(name).is_some() {
        // A note on how, when the table has one.
        let how = find(name)
            .filter(|r| r.status == Status::Honoured)
            .map_or("", |r| r.why);
        return Some((Status::Honoured, how));
    }
    if let Some(r) = find(name) {
        return Some((r.status, r.why));
    }
    transport_suffix(name).map(|(_, s)| (s.status, s.why))
}

/// A per-transport parameter suffix (`SERVICE_destination_concurrency_limit`),
/// as Postfix makes one for every delivery service of master.cf.
pub struct TransportSuffix {
    pub suffix: &'static str,
    /// The default, a reference to the global parameter.
    pub default: &'static str,
    pub status: Status,
    pub why: &'static str,
}

const QMGR_READS: &str = "per-transport form, read by qmgr";
const SCHEDULER: &str = "qmgr's scheduler: per-destination concurrency windows and delivery batches replace Postfix's slot and refill scheduler";

/// The suffixes Postfix 3.7 adds per delivery service, in its order.
pub const TRANSPORT_SUFFIXES: &[TransportSuffix] = &[
    ts("delivery_slot_cost", "$default_delivery_slot_cost", false),
    ts(
        "delivery_slot_discount",
        "$default_delivery_slot_discount",
        false,
    ),
    ts("delivery_slot_loan", "$default_delivery_slot_loan", false),
    ts(
        "destination_concurrency_failed_cohort_limit",
        "$default_destination_concurrency_failed_cohort_limit",
        true,
    ),
    ts(
        "destination_concurrency_limit",
        "$default_destination_concurrency_limit",
        true,
    ),
    ts(
        "destination_concurrency_negative_feedback",
        "$default_destination_concurrency_negative_feedback",
        true,
    ),
    ts(
        "destination_concurrency_positive_feedback",
        "$default_destination_concurrency_positive_feedback",
        true,
    ),
    ts(
        "destination_rate_delay",
        "$default_destination_rate_delay",
        true,
    ),
    ts(
        "destination_recipient_limit",
        "$default_destination_recipient_limit",
        true,
    ),
    ts(
        "extra_recipient_limit",
        "$default_extra_recipient_limit",
        false,
    ),
    ts(
        "initial_destination_concurrency",
        "$initial_destination_concurrency",
        true,
    ),
    ts(
        "minimum_delivery_slots",
        "$default_minimum_delivery_slots",
        false,
    ),
    ts("recipient_limit", "$default_recipient_limit", false),
    ts(
        "recipient_refill_delay",
        "$default_recipient_refill_delay",
        false,
    ),
    ts(
        "recipient_refill_limit",
        "$default_recipient_refill_limit",
        false,
    ),
    ts(
        "transport_rate_delay",
        "$default_transport_rate_delay",
        false,
    ),
];

const fn ts(suffix: &'static str, default: &'static str, honoured: bool) -> TransportSuffix {
    TransportSuffix {
        suffix,
        default,
        status: if honoured {
            Status::Honoured
        } else {
            Status::Other
        },
        why: if honoured { QMGR_READS } else { SCHEDULER },
    }
}

/// pipe(8)'s `SERVICE_time_limit`.
const PIPE_TIME_LIMIT: TransportSuffix = TransportSuffix {
    suffix: "time_limit",
    default: "$command_time_limit",
    status: Status::Honoured,
    why: "read by pipe",
};

fn transport_suffix(name: &str) -> Option<(&str, &'static TransportSuffix)> {
    TRANSPORT_SUFFIXES
        .iter()
        .chain(std::iter::once(&PIPE_TIME_LIMIT))
        .find_map(|s| {
            let service = name.strip_suffix(s.suffix)?.strip_suffix('_')?;
            (!service.is_empty()).then_some((service, s))
        })
}

/// The per-transport parameters of master.cf's delivery services (unix
/// services running smtp, lmtp, local, virtual, pipe or error), with their
/// defaults, leaving out names the tables already have: what Postfix's
/// `postconf -d` adds for master.cf.
pub fn service_params(services: &[Service]) -> Vec<(String, &'static str)> {
    let mut out = Vec::new();
    // Any service type, as Postfix's postconf (an inet spawn service has
    // its time limit too).
    for s in services {
        let pipe = s.command == "pipe";
        // spawn(8) services have only their time limit, as in Postfix.
        let spawn = s.command == "spawn";
        if !pipe
            && !spawn
            && !["smtp", "lmtp", "local", "virtual", "error"].contains(&s.command.as_str())
        {
            continue;
        }
        let transport = if spawn { &[][..] } else { TRANSPORT_SUFFIXES };
        let suffixes = transport
            .iter()
            .chain((pipe || spawn).then_some(&PIPE_TIME_LIMIT));
        for x in suffixes {
            let name = format!("{}_{}", s.name, x.suffix);
            if params::default_of(&name).is_none() && find(&name).is_none() {
                out.push((name, x.default));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_is_whole_and_sorted() {
        assert!(all().len() > 800);
        assert_eq!(find("biff").unwrap().status, Status::Ignored);
        assert_eq!(status_of("myhostname"), Some((Status::Honoured, "")));
        assert_eq!(
            status_of("uucp_delivery_slot_cost").map(|s| s.0),
            Some(Status::Other)
        );
        assert_eq!(
            status_of("uucp_time_limit").map(|s| s.0),
            Some(Status::Honoured)
        );
        assert_eq!(status_of("no_such_thing"), None);
        for r in all() {
            assert!(
                r.status == Status::Honoured || !r.why.is_empty(),
                "{}: a parameter not honoured says why",
                r.name
            );
        }
    }
}
