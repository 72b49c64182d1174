//! `smtp_header_checks`, `smtp_mime_header_checks`,
//! `smtp_nested_header_checks` and `smtp_body_checks` (lmtp reads the same
//! parameters): the content of a delivery passes through them on its way
//! out, one logical header or body line at a time, as Postfix's smtp
//! client does. The client may only change what it sends, not where mail
//! goes: IGNORE, REPLACE, PREPEND, WARN, INFO, DUNNO and OK are carried
//! out; any other action is logged as unsupported here and skipped, as
//! Postfix does.

use postern_common::header_checks::{Action, CheckTables, HeaderClass, MimeWalk, Piece};
use postern_common::maps::LookupError;
use postern_common::{info, warning};
use std::io::{self, BufRead, BufReader, Read};

/// A message's content with the checks applied: reads the queued content
/// line by line and gives what is to be sent.
pub struct Checked<'t, R: Read> {
    inner: BufReader<R>,
    checks: &'t CheckTables,
    queue_id: String,
    /// In the primary header section: the header being collected.
    pending: Vec<u8>,
    in_headers: bool,
    /// The primary Content-Type, for the MIME walk of the body.
    content_type: Option<String>,
    mime: Option<MimeWalk>,
    out: Vec<u8>,
    pos: usize,
    eof: bool,
    /// A check table that could not answer: the read fails with it, so
    /// the delivery is deferred rather than sent unchecked.
    failed: Option<LookupError>,
}

impl<'t, R: Read> Checked<'t, R> {
    pub fn new(inner: R, checks: &'t CheckTables, queue_id: &str) -> Checked<'t, R> {
        Checked {
            inner: BufReader::with_capacity(64 * 1024, inner),
            checks,
            queue_id: queue_id.to_string(),
            pending: Vec::new(),
            in_headers: true,
            content_type: None,
            mime: None,
            out: Vec::new(),
            pos: 0,
            eof: false,
            failed: None,
        }
    }

    /// Carries out one action on `text` (a header or a body line, with
    /// its newline); what is to be sent goes to `out`.
    fn apply(&mut self, what: &str, text: Vec<u8>, action: Result<Action, LookupError>) {
        let action = match action {
            Ok(a) => a,
            Err(e) => {
                warning!("{}: {e}", self.queue_id);
                self.failed.get_or_insert(e);
                Action::Keep
            }
        };
        let shown: String = String::from_utf8_lossy(&text)
            .replace(['\r', '\n'], "")
            .chars()
            .take(200)
            .collect();
        let log = |word: &str, reason: &str| {
            info!(
                "{}: {word}: {what} {shown}{}",
                self.queue_id,
                if reason.is_empty() {
                    String::new()
                } else {
                    format!(": {reason}")
                }
            );
        };
        match action {
            Action::Keep => self.out.extend_from_slice(&text),
            Action::Ignore => {}
            Action::Warn(t) => {
                log("warning", &t);
                self.out.extend_from_slice(&text);
            }
            Action::Info(t) => {
                log("info", &t);
                self.out.extend_from_slice(&text);
            }
            Action::Replace(t) => {
                self.out.extend_from_slice(t.as_bytes());
                self.out.push(b'\n');
            }
            Action::Prepend(t) => {
                self.out.extend_from_slice(t.as_bytes());
                self.out.push(b'\n');
                self.out.extend_from_slice(&text);
            }
            other => {
                warning!(
                    "{}: smtp {what} check action {other:?} is not supported by the smtp client; ignored",
                    self.queue_id
                );
                self.out.extend_from_slice(&text);
            }
        }
    }

    fn primary_header(&mut self) {
        if self.pending.is_empty() {
            return;
        }
        let text = std::mem::take(&mut self.pending);
        let name = header_name(&text).unwrap_or_default();
        if name.eq_ignore_ascii_case("content-type") {
            let s = String::from_utf8_lossy(&text);
            let v = s.split_once(':').map(|(_, v)| v).unwrap_or("");
            self.content_type = Some(v.replace(['\r', '\n'], " ").trim().to_string());
        }
        let action = self
            .checks
            .check_header(HeaderClass::of(&name, true), &text);
        self.apply("header", text, action);
    }

    fn body_piece(&mut self, p: Piece) {
        match p {
            Piece::Body(line) => {
                let action = self.checks.check_body_line(&line);
                self.apply("body", line, action);
            }
            Piece::Header { class, text } => {
                let action = self.checks.check_header(class, &text);
                self.apply("header", text, action);
            }
        }
    }

    /// One line of the queued content.
    fn line(&mut self, line: Vec<u8>) {
        if !self.in_headers {
            let pieces = match &mut self.mime {
                Some(m) => m.feed(line),
                None => vec![Piece::Body(line)],
            };
            for p in pieces {
                self.body_piece(p);
            }
            return;
        }
        let continuation = matches!(line.first(), Some(b' ' | b'\t'));
        if continuation && !self.pending.is_empty() {
            self.pending.extend_from_slice(&line);
        } else if header_name(&line).is_some() {
            self.primary_header();
            self.pending = line;
        } else {
            // The blank line (or the first body line): the body starts.
            self.primary_header();
            self.in_headers = false;
            self.mime = Some(MimeWalk::new(self.content_type.as_deref()));
            if line.trim_ascii().is_empty() {
                self.out.extend_from_slice(&line);
            } else {
                self.line(line);
            }
        }
    }
}

fn header_name(line: &[u8]) -> Option<String> {
    let colon = line.iter().position(|&b| b == b':')?;
    let name = std::str::from_utf8(&line[..colon]).ok()?;
    (!name.is_empty() && name.bytes().all(|b| (33..=126).contains(&b))).then(|| name.to_string())
}

impl<R: Read> Read for Checked<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.pos >= self.out.len() && !self.eof {
            self.out.clear();
            self.pos = 0;
            // A batch of lines at a time; a very long line in pieces.
            while self.out.len() < 64 * 1024 {
                let mut line = Vec::new();
                let n = (&mut self.inner)
                    .take(64 * 1024)
                    .read_until(b'\n', &mut line)?;
                if n == 0 {
                    self.eof = true;
                    self.primary_header();
                    if let Some(rest) = self.mime.as_mut().map(MimeWalk::finish) {
                        for p in rest {
                            self.body_piece(p);
                        }
                    }
                    break;
                }
                self.line(line);
            }
        }
        if let Some(e) = &self.failed {
            return Err(io::Error::other(e.to_string()));
        }
        let n = buf.len().min(self.out.len() - self.pos);
        buf[..n].copy_from_slice(&self.out[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use postern_common::maps::Tables;

    #[test]
    fn strips_replaces_and_keeps() {
        let checks = CheckTables {
            header: Tables::open_list(
                "inline:{X-Secret: yes=IGNORE, Subject: old=REPLACE Subject: new}",
            )
            .0,
            body: Tables::open_list("inline:{drop me=IGNORE}").0,
            ..Default::default()
        };
        let msg = b"Subject: old\nX-Secret: yes\nTo: a@b\n\nkeep\ndrop me\n";
        let mut out = String::new();
        Checked::new(&msg[..], &checks, "Q")
            .read_to_string(&mut out)
            .unwrap();
        assert_eq!(out, "Subject: new\nTo: a@b\n\nkeep\n");
    }
}
