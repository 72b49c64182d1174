//! Duplicate elimination: remembers the deliveries already made for one
//! message (cleanup: its envelope recipients) or one recipient (local:
//! the targets of its alias, `.forward` and `:include:` expansion), as
//! Postfix's `been_here` filter.
//!
//! Keys are compared without regard to case, as Postfix's (whose filter
//! folds the whole key, local part included). At most
//! `duplicate_filter_limit` keys are remembered (0 = no limit): past that,
//! what is new is let through, so that a list of millions of recipients
//! costs bounded memory and at worst a duplicate copy, never a lost one.

use crate::qfile::Recipient;
use std::collections::HashSet;

/// The keys seen so far.
#[derive(Debug, Clone, Default)]
pub struct DupFilter {
    seen: HashSet<String>,
    /// The most keys remembered; 0 = no limit.
    limit: usize,
}

impl DupFilter {
    /// A filter remembering at most `limit` keys (`duplicate_filter_limit`;
    /// 0 = no limit).
    pub fn new(limit: usize) -> DupFilter {
        DupFilter {
            seen: HashSet::new(),
            limit,
        }
    }

    /// Whether `key` was seen before; remembers it (while there is room).
    pub fn been_here(&mut self, key: &str) -> bool {
        let folded = fold(key);
        if self.seen.contains(&folded) {
            return true;
        }
        if self.limit == 0 || self.seen.len() < self.limit {
            self.seen.insert(folded);
        }
        false
    }

    /// Whether an envelope recipient repeats one already kept, as Postfix's
    /// cleanup compares them: with `original` (`enable_original_recipient
    /// = yes`) the same address, original address, DSN NOTIFY and ORCPT,
    /// so that different originals reaching one address are kept apart,
    /// each with its `X-Original-To:` and its own DSN; else the address
    /// alone.
    pub fn recipient(&mut self, r: &Recipient, original: bool) -> bool {
        if !original {
            return self.been_here(&r.address);
        }
        let key = format!(
            "{}\n{}\n{}\n{}",
            r.orcpt,
            r.notify,
            r.original_or_address(),
            r.address
        );
        self.been_here(&key)
    }

    /// How many keys are remembered.
    pub fn len(&self) -> usize {
        self.seen.len()
    }

    pub fn is_empty(&self) -> bool {
        self.seen.is_empty()
    }
}

/// The key in the case compared: ASCII lower case, and Unicode lower case
/// for the rest (UTF-8 addresses).
fn fold(key: &str) -> String {
    if key.is_ascii() {
        key.to_ascii_lowercase()
    } else {
        key.to_lowercase()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repeats_are_found_case_insensitively() {
        let mut f = DupFilter::new(0);
        assert!(!f.been_here("mailbox bob"));
        assert!(f.been_here("mailbox bob"));
        assert!(f.been_here("MailBox BOB"));
        assert!(!f.been_here("mailbox alice"));
        assert!(!f.been_here("mailbox ÉLODIE"));
        assert!(f.been_here("mailbox élodie"));
        assert_eq!(f.len(), 3);
    }

    #[test]
    fn past_the_limit_new_keys_pass_and_old_ones_are_still_found() {
        let mut f = DupFilter::new(2);
        assert!(!f.been_here("a"));
        assert!(!f.been_here("b"));
        assert!(!f.been_here("c"));
        assert!(!f.been_here("c"), "not remembered past the limit");
        assert!(f.been_here("a"));
        assert!(f.been_here("B"));
        assert_eq!(f.len(), 2);
    }

    #[test]
    fn recipients_compare_as_postfix_cleanup() {
        let mut f = DupFilter::new(1000);
        let r = |a: &str, orig: &str, notify: u8, orcpt: &str| Recipient {
            address: a.into(),
            original: orig.into(),
            notify,
            orcpt: orcpt.into(),
        };
        assert!(!f.recipient(&r("bob@x.test", "", 0, ""), true));
        assert!(f.recipient(&r("bob@x.test", "", 0, ""), true));
        assert!(f.recipient(&r("Bob@X.Test", "", 0, ""), true));
        // The original written out, or left empty as equal: the same.
        assert!(f.recipient(&r("bob@x.test", "bob@x.test", 0, ""), true));
        // Another original reaching the same address is kept.
        assert!(!f.recipient(&r("bob@x.test", "alias@x.test", 0, ""), true));
        // So are other DSN requests.
        assert!(!f.recipient(&r("bob@x.test", "", 2, ""), true));
        assert!(!f.recipient(&r("bob@x.test", "", 0, "rfc822;bob@x.test"), true));
        // Without original recipients, the address alone.
        let mut f = DupFilter::new(1000);
        assert!(!f.recipient(&r("bob@x.test", "a@x.test", 0, ""), false));
        assert!(f.recipient(&r("BOB@x.test", "b@x.test", 2, ""), false));
    }
}
