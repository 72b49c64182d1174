//! header_checks(5) and body_checks(5): the actions a rule's result
//! names, shared by cleanup (`header_checks`, `mime_header_checks`,
//! `nested_header_checks`, `body_checks`) and the smtp client
//! (`smtp_header_checks`, `smtp_mime_header_checks`,
//! `smtp_nested_header_checks`, `smtp_body_checks`), and the class of a
//! header in a MIME message ([`HeaderClass`]), which says which of the
//! header tables inspects it.

use crate::maps::{LookupError, Tables};
use crate::warning;

/// What a header or body rule says (header_checks(5)).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// No rule matched, or DUNNO/OK.
    Keep,
    Reject(String),
    /// DEFER: refuse for now (cleanup) or defer the delivery (smtp).
    Defer(String),
    Warn(String),
    Info(String),
    /// Remove this header or line.
    Ignore,
    Replace(String),
    Prepend(String),
    /// Send the message to this address instead of its recipients.
    Redirect(String),
    /// Send one more copy to this address.
    Bcc(String),
    /// Send the message through this content filter (`transport:nexthop`).
    Filter(String),
    Hold(String),
    Discard(String),
}

impl Action {
    /// Parses a table result (`REJECT text`, ...). A result that names no
    /// action, or an action without its required argument, is logged and
    /// kept as DUNNO, as Postfix does.
    pub fn parse(result: &str) -> Action {
        let result = result.trim();
        let (word, text) = match result.split_once(char::is_whitespace) {
            Some((w, t)) => (w, t.trim().to_string()),
            None => (result, String::new()),
        };
        let needs = |what: &str, a: fn(String) -> Action| {
            if text.is_empty() {
                warning!("header/body check action {what} has no argument; ignored");
                Action::Keep
            } else {
                a(text.clone())
            }
        };
        match word.to_ascii_uppercase().as_str() {
            "REJECT" => Action::Reject(text),
            "DEFER" => Action::Defer(text),
            "DISCARD" => Action::Discard(text),
            "HOLD" => Action::Hold(text),
            "IGNORE" => Action::Ignore,
            "WARN" => Action::Warn(text),
            "INFO" => Action::Info(text),
            "REPLACE" => needs("REPLACE", Action::Replace),
            "PREPEND" => needs("PREPEND", Action::Prepend),
            "REDIRECT" => needs("REDIRECT", Action::Redirect),
            "BCC" => needs("BCC", Action::Bcc),
            "FILTER" if text.contains(':') => Action::Filter(text),
            "FILTER" => {
                warning!("header/body check action FILTER needs transport:nexthop; ignored");
                Action::Keep
            }
            "DUNNO" | "OK" => Action::Keep,
            other => {
                warning!("unknown header/body check action: {other}");
                Action::Keep
            }
        }
    }

    /// The first matching rule of `tables` for `text`.
    /// The first matching rule's action; an error when a table could not
    /// answer (the caller defers rather than pass the text unchecked).
    pub fn lookup(tables: &Tables, text: &str) -> Result<Action, LookupError> {
        for table in &tables.0 {
            if let Some(r) = table.lookup_expanded(text)? {
                return Ok(Action::parse(&r));
            }
        }
        Ok(Action::Keep)
    }
}

/// Which header table inspects a header, as Postfix's MIME processor
/// classifies headers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeaderClass {
    /// A non-MIME header of the message itself (`header_checks`).
    Primary,
    /// A MIME header (`Content-*`, `MIME-Version`) anywhere in the
    /// message (`mime_header_checks`).
    Mime,
    /// A non-MIME header of a body part or an attached message
    /// (`nested_header_checks`).
    Nested,
}

impl HeaderClass {
    /// The class of header `name` in the primary header section
    /// (`primary`) or in a body part.
    pub fn of(name: &str, primary: bool) -> HeaderClass {
        let n = name.to_ascii_lowercase();
        if n.starts_with("content-") || n == "mime-version" {
            HeaderClass::Mime
        } else if primary {
            HeaderClass::Primary
        } else {
            HeaderClass::Nested
        }
    }
}

/// One set of header and body tables: cleanup's or the smtp client's.
#[derive(Default)]
pub struct CheckTables {
    pub header: Tables,
    pub mime: Tables,
    pub nested: Tables,
    pub body: Tables,
}

impl CheckTables {
    /// Opens `{prefix}header_checks`, `{prefix}mime_header_checks`,
    /// `{prefix}nested_header_checks` and `{prefix}body_checks` (prefix
    /// "" for cleanup, "smtp_" for the client); the errors name the
    /// parameter.
    pub fn open(get: impl Fn(&str) -> String, prefix: &str) -> (CheckTables, Vec<String>) {
        let mut errors = Vec::new();
        let mut open = |name: &str| {
            let p = format!("{prefix}{name}");
            let (t, bad) = Tables::open_list(&get(&p));
            errors.extend(bad.into_iter().map(|e| format!("{p}: {e}")));
            t
        };
        let t = CheckTables {
            header: open("header_checks"),
            mime: open("mime_header_checks"),
            nested: open("nested_header_checks"),
            body: open("body_checks"),
        };
        (t, errors)
    }

    /// Whether any header table is set.
    pub fn has_header_checks(&self) -> bool {
        !(self.header.is_empty() && self.mime.is_empty() && self.nested.is_empty())
    }

    /// Whether the body has to be read line by line: body checks, or
    /// MIME and nested header checks, which inspect body part headers.
    pub fn inspects_body(&self) -> bool {
        !(self.body.is_empty() && self.mime.is_empty() && self.nested.is_empty())
    }

    /// The table for a header of `class`.
    pub fn for_class(&self, class: HeaderClass) -> &Tables {
        match class {
            HeaderClass::Primary => &self.header,
            HeaderClass::Mime => &self.mime,
            HeaderClass::Nested => &self.nested,
        }
    }

    /// The action for one logical header (folded lines joined).
    pub fn check_header(
        &self,
        class: HeaderClass,
        header_text: &[u8],
    ) -> Result<Action, LookupError> {
        let t = self.for_class(class);
        if t.is_empty() {
            return Ok(Action::Keep);
        }
        let s = String::from_utf8_lossy(header_text);
        let unfolded = s.trim_end_matches(['\r', '\n']).replace(['\r', '\n'], "");
        Action::lookup(t, &unfolded)
    }

    /// The action for one body line (without its newline).
    pub fn check_body_line(&self, line: &[u8]) -> Result<Action, LookupError> {
        if self.body.is_empty() {
            return Ok(Action::Keep);
        }
        let s = String::from_utf8_lossy(line);
        Action::lookup(&self.body, s.trim_end_matches(['\r', '\n']))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn actions() {
        assert_eq!(
            Action::parse("REJECT go away"),
            Action::Reject("go away".into())
        );
        assert_eq!(Action::parse("ignore"), Action::Ignore);
        assert_eq!(
            Action::parse("PREPEND X-A: b"),
            Action::Prepend("X-A: b".into())
        );
        assert_eq!(Action::parse("DUNNO"), Action::Keep);
        assert_eq!(Action::parse("OK"), Action::Keep);
        assert_eq!(
            Action::parse("FILTER scan:[127.0.0.1]:10024"),
            Action::Filter("scan:[127.0.0.1]:10024".into())
        );
        assert_eq!(Action::parse("FILTER scan"), Action::Keep);
        assert_eq!(
            Action::parse("REDIRECT a@b.test"),
            Action::Redirect("a@b.test".into())
        );
        assert_eq!(
            Action::parse("BCC a@b.test"),
            Action::Bcc("a@b.test".into())
        );
        assert_eq!(Action::parse("BCC"), Action::Keep);
        assert_eq!(Action::parse("DEFER later"), Action::Defer("later".into()));
        assert_eq!(Action::parse("INFO seen"), Action::Info("seen".into()));
        assert_eq!(HeaderClass::of("Content-Type", true), HeaderClass::Mime);
        assert_eq!(HeaderClass::of("MIME-Version", false), HeaderClass::Mime);
        assert_eq!(HeaderClass::of("Subject", true), HeaderClass::Primary);
        assert_eq!(HeaderClass::of("Subject", false), HeaderClass::Nested);
    }
}

/// What a body line turned out to be, for the checks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Piece {
    /// Body text (also MIME boundaries and the blank line after part
    /// headers): `body_checks`.
    Body(Vec<u8>),
    /// One whole header of a body part or an attached message, folded
    /// lines included: the table of its class.
    Header { class: HeaderClass, text: Vec<u8> },
}

/// How deep multiparts and attached messages nest before the rest is
/// taken as plain body (Postfix's `mime_nesting_limit`).
const MIME_NESTING_LIMIT: usize = 100;

/// Where the body walk is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Walk {
    Body,
    /// In the headers of a body part or of an attached message.
    PartHeaders,
}

/// Follows a message body through its MIME structure, line by line, so
/// that the headers of body parts and attached messages reach
/// `mime_header_checks` and `nested_header_checks`, as Postfix's MIME
/// processor does: multipart boundaries from each Content-Type, a
/// `message/rfc822` part's headers as nested headers.
#[derive(Debug)]
pub struct MimeWalk {
    boundaries: Vec<String>,
    walk: Walk,
    /// The part header being collected (continuation lines follow).
    pending: Vec<u8>,
    /// The Content-Type of the part whose headers are being read.
    part_type: Option<String>,
}

/// The media type (lower-case) and the boundary parameter of a
/// Content-Type value.
pub fn content_type(value: &str) -> (String, Option<String>) {
    let mut parts = value.split(';');
    let media = parts.next().unwrap_or("").trim().to_ascii_lowercase();
    let boundary = parts.find_map(|p| {
        let (k, v) = p.split_once('=')?;
        k.trim()
            .eq_ignore_ascii_case("boundary")
            .then(|| v.trim().trim_matches('"').to_string())
            .filter(|b| !b.is_empty())
    });
    (media, boundary)
}

/// A header line's name, when the line starts a header.
fn header_name(line: &[u8]) -> Option<&str> {
    let colon = line.iter().position(|&b| b == b':')?;
    let name = std::str::from_utf8(&line[..colon]).ok()?;
    (!name.is_empty() && name.bytes().all(|b| (33..=126).contains(&b))).then_some(name)
}

/// The value of a whole header, unfolded.
fn header_value(text: &[u8]) -> String {
    let s = String::from_utf8_lossy(text);
    let v = s.split_once(':').map(|(_, v)| v).unwrap_or("");
    v.replace(['\r', '\n'], " ").trim().to_string()
}

impl MimeWalk {
    /// Starts the body of a message whose primary Content-Type value is
    /// `content_type` (None: none, plain text).
    pub fn new(primary_content_type: Option<&str>) -> MimeWalk {
        let mut w = MimeWalk {
            boundaries: Vec::new(),
            walk: Walk::Body,
            pending: Vec::new(),
            part_type: None,
        };
        if let Some(ct) = primary_content_type {
            w.enter(ct);
        }
        w
    }

    /// After the headers of an entity with Content-Type `ct`: a multipart
    /// adds its boundary; an attached message's headers come next.
    fn enter(&mut self, ct: &str) {
        let (media, boundary) = content_type(ct);
        if self.boundaries.len() >= MIME_NESTING_LIMIT {
            self.walk = Walk::Body;
            return;
        }
        self.walk = Walk::Body;
        if media.starts_with("multipart/") {
            if let Some(b) = boundary {
                self.boundaries.push(b);
            }
        } else if media == "message/rfc822" {
            self.walk = Walk::PartHeaders;
        }
    }

    /// The header collected so far, as a piece (its Content-Type noted).
    fn flush_header(&mut self, out: &mut Vec<Piece>) {
        if self.pending.is_empty() {
            return;
        }
        let text = std::mem::take(&mut self.pending);
        let name = header_name(&text).unwrap_or("");
        if name.eq_ignore_ascii_case("content-type") {
            self.part_type = Some(header_value(&text));
        }
        out.push(Piece::Header {
            class: HeaderClass::of(name, false),
            text,
        });
    }

    /// Takes one body line (with its newline) and says what it is; a
    /// part header is given once its last folded line is known.
    pub fn feed(&mut self, line: Vec<u8>) -> Vec<Piece> {
        let mut out = Vec::new();
        match self.walk {
            Walk::Body => {
                if let Some(rest) = line.strip_prefix(b"--") {
                    let rest = rest.trim_ascii_end();
                    let found = self.boundaries.iter().rposition(|b| {
                        rest.starts_with(b.as_bytes()) && matches!(&rest[b.len()..], b"" | b"--")
                    });
                    if let Some(i) = found {
                        let closing =
                            rest.ends_with(b"--") && rest.len() == self.boundaries[i].len() + 2;
                        self.boundaries.truncate(if closing { i } else { i + 1 });
                        if !closing {
                            self.walk = Walk::PartHeaders;
                            self.part_type = None;
                        }
                    }
                }
                out.push(Piece::Body(line));
            }
            Walk::PartHeaders => {
                let blank = line.trim_ascii().is_empty();
                let continuation = matches!(line.first(), Some(b' ' | b'\t'));
                if blank {
                    self.flush_header(&mut out);
                    out.push(Piece::Body(line));
                    // A part without Content-Type is text (in a
                    // multipart/digest it would be a message: rare).
                    let ct = self.part_type.take();
                    match ct {
                        Some(ct) => self.enter(&ct),
                        None => self.walk = Walk::Body,
                    }
                } else if continuation && !self.pending.is_empty() {
                    self.pending.extend_from_slice(&line);
                } else if header_name(&line).is_some() {
                    self.flush_header(&mut out);
                    self.pending = line;
                } else {
                    // Not a header: the part's body starts without the
                    // blank line.
                    self.flush_header(&mut out);
                    self.walk = Walk::Body;
                    self.part_type = None;
                    out.push(Piece::Body(line));
                }
            }
        }
        out
    }

    /// The end of the body: a header still being collected.
    pub fn finish(&mut self) -> Vec<Piece> {
        let mut out = Vec::new();
        self.flush_header(&mut out);
        out
    }
}

#[cfg(test)]
mod mime_tests {
    use super::*;

    fn walk(ct: Option<&str>, body: &str) -> Vec<Piece> {
        let mut w = MimeWalk::new(ct);
        let mut out = Vec::new();
        for l in body.split_inclusive('\n') {
            out.extend(w.feed(l.as_bytes().to_vec()));
        }
        out.extend(w.finish());
        out
    }

    fn headers(p: &[Piece]) -> Vec<(HeaderClass, String)> {
        p.iter()
            .filter_map(|p| match p {
                Piece::Header { class, text } => {
                    Some((*class, String::from_utf8_lossy(text).into_owned()))
                }
                _ => None,
            })
            .collect()
    }

    #[test]
    fn multipart_and_attached_message() {
        let body = "preamble\n--b1\nContent-Type: text/plain\n\nhello\n--b1\n\
                    Content-Type: application/octet-stream;\n name=\"x.exe\"\n\
                    Content-Disposition: attachment; filename=\"x.exe\"\n\nAAAA\n\
                    --b1\nContent-Type: message/rfc822\n\nSubject: inner\nFrom: a@b\n\ninner body\n--b1--\nepilogue\n";
        let p = walk(Some("multipart/mixed; boundary=\"b1\""), body);
        let h = headers(&p);
        assert_eq!(h.len(), 6, "{h:?}");
        assert_eq!(
            h[0],
            (HeaderClass::Mime, "Content-Type: text/plain\n".into())
        );
        assert_eq!(
            h[1],
            (
                HeaderClass::Mime,
                "Content-Type: application/octet-stream;\n name=\"x.exe\"\n".into()
            )
        );
        assert_eq!(h[2].0, HeaderClass::Mime);
        assert_eq!(h[4], (HeaderClass::Nested, "Subject: inner\n".into()));
        // Bodies stay body: the line after the inner headers.
        assert!(p.contains(&Piece::Body(b"inner body\n".to_vec())));
        assert!(p.contains(&Piece::Body(b"AAAA\n".to_vec())));
        // A plain message has no part headers.
        let p = walk(None, "Content-Type: not a header here\n");
        assert!(headers(&p).is_empty());
        assert_eq!(
            content_type("Multipart/Mixed; BOUNDARY=abc").0,
            "multipart/mixed"
        );
        assert_eq!(
            content_type("multipart/mixed; boundary=abc").1.as_deref(),
            Some("abc")
        );
    }
}
