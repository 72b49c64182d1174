//! `smtpd_command_filter`: each SMTP command line (not message content,
//! not AUTH's answers) is looked up, leading white space skipped, in a
//! table, and a result replaces the line before it is parsed, as Postfix
//! does (typically a `pcre:`/`regexp:` table that repairs a broken
//! client's syntax). A table that cannot answer ends the session with
//! Postfix's `421 4.3.0 Server local data error`.

use super::Session;
use postern_common::{info, warning};

/// What the filter made of a command line.
pub(super) enum Filtered {
    Line(Vec<u8>),
    /// The table could not answer: the session ends.
    Failed,
}

impl Session {
    /// The line to run instead of `line`, as the filter says.
    pub(super) fn filter_command(&mut self, line: Vec<u8>) -> Filtered {
        let Some(table) = &self.cfg.command_filter else {
            return Filtered::Line(line);
        };
        let text = String::from_utf8_lossy(&line).into_owned();
        let key = text.trim_start_matches([' ', '\t']);
        match table.lookup_expanded(key) {
            Ok(Some(new)) => {
                info!(
                    "{}: replacing command \"{}\" with \"{}\"",
                    self.namaddr,
                    text.chars().take(100).collect::<String>(),
                    new.chars().take(100).collect::<String>()
                );
                Filtered::Line(new.into_bytes())
            }
            Ok(None) => Filtered::Line(line),
            Err(_) => {
                warning!(
                    "smtpd_command_filter: lookup error for \"{}\"",
                    text.chars().take(100).collect::<String>()
                );
                let host = self.cfg.myhostname.clone();
                self.reply(&format!("421 4.3.0 {host} Server local data error"));
                self.hangup = true;
                Filtered::Failed
            }
        }
    }
}
