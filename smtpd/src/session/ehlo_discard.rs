//! `smtpd_discard_ehlo_keywords` and
//! `smtpd_discard_ehlo_keyword_address_maps`: EHLO keywords smtpd does
//! not announce to a client (the map, looked up by the client's address
//! at connect, wins over the list), and the features that go with them,
//! as Postfix: without `dsn` the DSN parameters of MAIL and RCPT are
//! refused, without `smtputf8` the SMTPUTF8 parameter is not taken,
//! without `starttls` STARTTLS is not a command. `silent-discard` keeps
//! the "discarding EHLO keywords" log line quiet.

use super::Session;
use postern_common::{info, warning};

/// The keywords smtpd announces, in Postfix's EHLO order (the names a
/// discard list may use).
const KEYWORDS: &[&str] = &[
    "pipelining",
    "size",
    "vrfy",
    "etrn",
    "starttls",
    "auth",
    "verp",
    "xclient",
    "xforward",
    "enhancedstatuscodes",
    "8bitmime",
    "dsn",
    "smtputf8",
    "chunking",
    "requiretls",
];

impl Session {
    /// The discard list for this client, chosen at connect.
    pub(super) fn choose_ehlo_discard(&mut self) {
        let ip = self.client.addr.to_string();
        let words = match &self.cfg.ehlo_discard_maps {
            Some(maps) => match maps.lookup(&ip) {
                Ok(Some(v)) => v.to_string(),
                Ok(None) => self.cfg.ehlo_discard.clone(),
                Err(e) => {
                    warning!("smtpd_discard_ehlo_keyword_address_maps: {e}");
                    self.cfg.ehlo_discard.clone()
                }
            },
            None => self.cfg.ehlo_discard.clone(),
        };
        self.ehlo_discard = postern_conf::split_list(&words)
            .into_iter()
            .map(|w| w.to_ascii_lowercase())
            .collect();
    }

    /// Whether EHLO keyword `kw` (lower case) is discarded.
    pub(super) fn discarded(&self, kw: &str) -> bool {
        self.ehlo_discard.iter().any(|w| w == kw)
    }

    /// The EHLO reply lines without the discarded keywords (the first
    /// line, the host name, stays); logs what it leaves out.
    pub(super) fn discard_ehlo_lines(&self, lines: Vec<String>) -> Vec<String> {
        let known: Vec<&str> = KEYWORDS
            .iter()
            .copied()
            .filter(|k| self.discarded(k))
            .collect();
        if !known.is_empty() && !self.discarded("silent-discard") {
            info!(
                "discarding EHLO keywords: {}",
                known
                    .iter()
                    .map(|k| k.to_ascii_uppercase())
                    .collect::<Vec<_>>()
                    .join(" ")
            );
        }
        lines
            .into_iter()
            .enumerate()
            .filter(|(i, l)| {
                let kw = l
                    .split([' ', '='])
                    .next()
                    .unwrap_or_default()
                    .to_ascii_lowercase();
                *i == 0 || !self.discarded(&kw)
            })
            .map(|(_, l)| l)
            .collect()
    }
}
