//! SMTP server replies: reading a (possibly multi-line) reply, and the
//! parts the client needs from it (code, enhanced status code, text).
//!
//! A reply is one or more lines `DDD-text` ended by a line `DDD text` (or
//! `DDD` alone), as RFC 5321 section 4.2 says. As in Postfix, a line that
//! does not start with three digits ends the reply too (with code 0, a
//! protocol error), non-printable characters are shown as `?`, lines are
//! cut at [`LINE_LIMIT`] bytes, and only the first [`TEXT_LIMIT`] bytes of
//! a long multi-line reply are kept.

use std::io::{self, Read};

/// Longest reply line kept; the rest of a longer line is skipped.
pub const LINE_LIMIT: usize = 2048;
/// Most reply text kept from one multi-line reply.
pub const TEXT_LIMIT: usize = 16 * 1024;
/// Most lines read for one reply before the server is called broken.
pub const MAX_LINES: usize = 10_000;

/// One server reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    /// The three-digit code of the last line; 0 when it had none.
    pub code: u16,
    /// The lines as received (code included), without line ends.
    pub lines: Vec<String>,
}

impl Reply {
    /// The first digit of the code: 2, 3, 4, 5 (0 for a malformed reply).
    pub fn class(&self) -> u16 {
        self.code / 100
    }

    /// The whole reply on one line, lines separated by a space, as Postfix
    /// writes it in logs and bounces: `550-5.1.1 first 550 5.1.1 second`.
    pub fn text(&self) -> String {
        self.lines.join(" ")
    }

    /// The enhanced status code (RFC 3463) at the start of the last line's
    /// text when present and of the reply's class, else `X.0.0` from the
    /// code (`5.5.0` when the reply is malformed).
    pub fn dsn(&self) -> String {
        let class = self.class();
        if !matches!(class, 2 | 4 | 5) {
            return "5.5.0".into();
        }
        if let Some(last) = self.lines.last() {
            let text = last.get(4..).unwrap_or("").trim_start_matches(' ');
            if let Some(d) = enhanced_code(text) {
                if d.as_bytes()[0] == b'0' + class as u8 {
                    return d.to_string();
                }
            }
        }
        format!("{class}.0.0")
    }

    /// The text of each line after `DDD-` / `DDD ` (EHLO keywords).
    pub fn texts(&self) -> impl Iterator<Item = &str> {
        self.lines.iter().map(|l| l.get(4..).unwrap_or(""))
    }
}

/// An enhanced status code `C.S.D` at the start of `text` (C one digit of
/// 2, 4, 5; S and D one to three digits), followed by a space or the end.
pub fn enhanced_code(text: &str) -> Option<&str> {
    let b = text.as_bytes();
    if b.is_empty() || !matches!(b[0], b'2' | b'4' | b'5') || b.get(1) != Some(&b'.') {
        return None;
    }
    let mut i = 2;
    for part in 0..2 {
        let start = i;
        while i < b.len() && b[i].is_ascii_digit() && i - start < 3 {
            i += 1;
        }
        if i == start {
            return None;
        }
        if part == 0 {
            if b.get(i) != Some(&b'.') {
                return None;
            }
            i += 1;
        }
    }
    match b.get(i) {
        None | Some(b' ') | Some(b'\t') => Some(&text[..i]),
        _ => None,
    }
}

/// Whether a line ends a reply, and its code: `DDD` followed by a space
/// or nothing ends it; `DDD-` continues it; anything else ends it with
/// code 0.
fn classify(line: &[u8]) -> (bool, u16) {
    let three = line.len() >= 3 && line[..3].iter().all(u8::is_ascii_digit);
    if !three || (line.len() > 3 && line[3].is_ascii_digit()) {
        return (true, 0);
    }
    let code =
        (line[0] - b'0') as u16 * 100 + (line[1] - b'0') as u16 * 10 + (line[2] - b'0') as u16;
    match line.get(3) {
        Some(b'-') => (false, code),
        None | Some(b' ') => (true, code),
        _ => (true, 0),
    }
}

/// Postfix's printable(): anything but printable ASCII and UTF-8 text
/// becomes `?`.
fn printable(line: &[u8]) -> String {
    String::from_utf8_lossy(line)
        .chars()
        .map(|c| {
            if c.is_control() || c == '\u{FFFD}' {
                '?'
            } else {
                c
            }
        })
        .collect()
}

/// A buffered reader of reply lines. Kept apart from the writing side so
/// that commands can be pipelined while replies are read in order.
pub struct LineReader {
    buf: Vec<u8>,
    start: usize,
    end: usize,
}

impl Default for LineReader {
    fn default() -> Self {
        Self::new()
    }
}

impl LineReader {
    pub fn new() -> LineReader {
        LineReader {
            buf: vec![0; 8192],
            start: 0,
            end: 0,
        }
    }

    /// Reads one line (without CRLF or LF), cut at [`LINE_LIMIT`] bytes.
    /// End of input before a line end is `UnexpectedEof`.
    pub fn read_line<R: Read + ?Sized>(&mut self, r: &mut R) -> io::Result<Vec<u8>> {
        let mut line = Vec::new();
        loop {
            if self.start == self.end {
                self.start = 0;
                self.end = loop {
                    match r.read(&mut self.buf) {
                        Ok(n) => break n,
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                        Err(e) => return Err(e),
                    }
                };
                if self.end == 0 {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "connection closed by server",
                    ));
                }
            }
            let avail = &self.buf[self.start..self.end];
            match avail.iter().position(|&b| b == b'\n') {
                Some(p) => {
                    let room = LINE_LIMIT.saturating_sub(line.len());
                    line.extend_from_slice(&avail[..p.min(room)]);
                    self.start += p + 1;
                    if line.last() == Some(&b'\r') {
                        line.pop();
                    }
                    return Ok(line);
                }
                None => {
                    let room = LINE_LIMIT.saturating_sub(line.len());
                    line.extend_from_slice(&avail[..avail.len().min(room)]);
                    self.start = self.end;
                }
            }
        }
    }

    /// Reads one whole reply.
    pub fn read_reply<R: Read + ?Sized>(&mut self, r: &mut R) -> io::Result<Reply> {
        let mut lines = Vec::new();
        let mut kept = 0;
        for _ in 0..MAX_LINES {
            let line = self.read_line(r)?;
            let (last, code) = classify(&line);
            if kept < TEXT_LIMIT {
                kept += line.len() + 1;
                lines.push(printable(&line));
            }
            if last {
                return Ok(Reply { code, lines });
            }
        }
        Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("reply of more than {MAX_LINES} lines"),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Reply {
        LineReader::new().read_reply(&mut s.as_bytes()).unwrap()
    }

    #[test]
    fn single_and_multi_line() {
        let r = parse("250 2.1.0 Ok\r\n");
        assert_eq!(
            (r.code, r.dsn(), r.text()),
            (250, "2.1.0".into(), "250 2.1.0 Ok".into())
        );
        let r = parse("550-5.1.1 first\r\n550-5.1.1 second\r\n550 5.1.1 third\r\n");
        assert_eq!(r.code, 550);
        assert_eq!(r.dsn(), "5.1.1");
        assert_eq!(r.text(), "550-5.1.1 first 550-5.1.1 second 550 5.1.1 third");
        let r = parse("250\n");
        assert_eq!((r.code, r.dsn()), (250, "2.0.0".into()));
    }

    #[test]
    fn enhanced_codes() {
        assert_eq!(enhanced_code("5.1.10 x"), Some("5.1.10"));
        assert_eq!(enhanced_code("4.7.1"), Some("4.7.1"));
        assert_eq!(enhanced_code("5.1 x"), None);
        assert_eq!(enhanced_code("3.1.1 x"), None);
        assert_eq!(enhanced_code("5.1.1234 x"), None);
        assert_eq!(enhanced_code("Ok"), None);
        // A code of the wrong class is ignored.
        assert_eq!(parse("451 5.1.1 odd\r\n").dsn(), "4.0.0");
        assert_eq!(parse("554 no code\r\n").dsn(), "5.0.0");
    }

    #[test]
    fn malformed_and_long() {
        let r = parse("hello\r\n");
        assert_eq!((r.code, r.dsn()), (0, "5.5.0".into()));
        let r = parse("2500 x\r\n");
        assert_eq!(r.code, 0);
        let long = format!("250 {}\r\n", "x".repeat(5000));
        let r = parse(&long);
        assert_eq!(r.code, 250);
        assert_eq!(r.lines[0].len(), LINE_LIMIT);
        let r = parse("220 bad\x01byte\r\n");
        assert_eq!(r.text(), "220 bad?byte");
        let mut rd = LineReader::new();
        assert_eq!(
            rd.read_reply(&mut "250-partial\r\n".as_bytes())
                .unwrap_err()
                .kind(),
            io::ErrorKind::UnexpectedEof
        );
    }

    #[test]
    fn replies_in_sequence_across_reads() {
        // A reader that returns one byte at a time.
        struct Slow<'a>(&'a [u8]);
        impl Read for Slow<'_> {
            fn read(&mut self, b: &mut [u8]) -> io::Result<usize> {
                if self.0.is_empty() || b.is_empty() {
                    return Ok(0);
                }
                b[0] = self.0[0];
                self.0 = &self.0[1..];
                Ok(1)
            }
        }
        let mut src = Slow(b"250 a\r\n250-b\r\n250 c\n354 go\r\n");
        let mut rd = LineReader::new();
        assert_eq!(rd.read_reply(&mut src).unwrap().text(), "250 a");
        assert_eq!(rd.read_reply(&mut src).unwrap().text(), "250-b 250 c");
        assert_eq!(rd.read_reply(&mut src).unwrap().code, 354);
    }
}
