//! Decoding the content after DATA, incrementally, as bytes arrive.
//!
//! - The end is `<CR><LF>.<CR><LF>` and nothing else (SMTP smuggling,
//!   CVE-2023-51764): a line that ends in a bare LF is still taken as a
//!   line (Postfix's `smtpd_forbid_bare_newline = normalize`), but a lone
//!   `.` line that ends in, or follows a line that ended in, a bare LF
//!   never ends the data; such a line is dropped, as Postfix does.
//! - One leading dot is removed from every line (dot-stuffing).
//! - Lines are stored with LF ends: the CR of a CRLF is removed; any
//!   other CR is kept.
//! - A line longer than the line limit is passed on in pieces; only the
//!   start of a real line is examined for dots.
//! - Postfix's two kludges for the first line: a line that begins with
//!   white space is preceded by an empty line (it would otherwise continue
//!   our own Received: header), and a Unix `From ` line becomes an
//!   `X-Mailbox-Line:` header.
//!
//! Sizes are counted as the message travelled: CRLF line ends, dots
//! removed.

/// State carried from one piece of input to the next.
#[derive(Debug, Clone)]
pub struct Decoder {
    /// The next byte starts a line (the last piece was not a partial line).
    at_line_start: bool,
    /// The last complete line ended in a bare LF.
    prev_bare_lf: bool,
    first: bool,
    line_limit: usize,
}

/// What one call to [`Decoder::feed`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fed {
    /// Input bytes used; the rest must be offered again with more input
    /// (a partial line), or, at the end, follows the message.
    pub consumed: usize,
    /// The end-of-data line was found and consumed.
    pub end: bool,
    /// Message bytes decoded, counted with CRLF line ends.
    pub size: u64,
}

impl Decoder {
    pub fn new(line_limit: usize) -> Decoder {
        Decoder {
            at_line_start: true,
            prev_bare_lf: false,
            first: true,
            line_limit: line_limit.max(80),
        }
    }

    fn first_line_kludges(&mut self, raw: &[u8], out: &mut Vec<u8>, size: &mut u64) {
        if !self.first {
            return;
        }
        self.first = false;
        let unquoted = &raw[raw.iter().take_while(|&&b| b == b'>').count()..];
        if unquoted.starts_with(b"From ") {
            out.extend_from_slice(b"X-Mailbox-Line: ");
            *size += 16;
        } else if matches!(raw.first(), Some(b' ' | b'\t')) {
            out.push(b'\n');
            *size += 2;
        }
    }

    /// Decodes what it can of `input`, appending message content to `out`.
    pub fn feed(&mut self, input: &[u8], out: &mut Vec<u8>) -> Fed {
        let mut pos = 0;
        let mut size = 0u64;
        loop {
            let rest = &input[pos..];
            match rest.iter().position(|&b| b == b'\n') {
                Some(i) => {
                    let raw = &rest[..i];
                    pos += i + 1;
                    let (mut body, bare) = match raw.strip_suffix(b"\r") {
                        Some(b) => (b, false),
                        None => (raw, true),
                    };
                    if self.at_line_start {
                        if body == b"." {
                            if !bare && !self.prev_bare_lf {
                                return Fed {
                                    consumed: pos,
                                    end: true,
                                    size,
                                };
                            }
                            // Not the end: a bare LF is around it. Dropped.
                            self.prev_bare_lf = bare;
                            continue;
                        }
                        self.first_line_kludges(body, out, &mut size);
                        if body.first() == Some(&b'.') {
                            body = &body[1..];
                        }
                    }
                    out.extend_from_slice(body);
                    out.push(b'\n');
                    size += body.len() as u64 + 2;
                    self.at_line_start = true;
                    self.prev_bare_lf = bare;
                }
                None => {
                    if rest.len() < self.line_limit {
                        break;
                    }
                    // A long line: pass on what we have but a final CR,
                    // which may be the first half of a CRLF.
                    let take = if rest.ends_with(b"\r") {
                        rest.len() - 1
                    } else {
                        rest.len()
                    };
                    let mut piece = &rest[..take];
                    if self.at_line_start {
                        self.first_line_kludges(piece, out, &mut size);
                        if piece.first() == Some(&b'.') {
                            piece = &piece[1..];
                        }
                    }
                    out.extend_from_slice(piece);
                    size += piece.len() as u64;
                    pos += take;
                    self.at_line_start = false;
                    break;
                }
            }
        }
        Fed {
            consumed: pos,
            end: false,
            size,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds `input` in pieces of `step` bytes, like a network would,
    /// keeping unconsumed bytes. Returns (content, end found, bytes after
    /// the end, size).
    fn run(input: &[u8], step: usize, limit: usize) -> (Vec<u8>, bool, Vec<u8>, u64) {
        let mut d = Decoder::new(limit);
        let mut out = Vec::new();
        let mut buf = Vec::new();
        let mut size = 0;
        let mut used = 0;
        for chunk in input.chunks(step.max(1)) {
            buf.extend_from_slice(chunk);
            let f = d.feed(&buf, &mut out);
            size += f.size;
            used += f.consumed;
            buf.drain(..f.consumed);
            if f.end {
                return (out, true, input[used..].to_vec(), size);
            }
        }
        (out, false, buf, size)
    }

    fn all_steps(input: &[u8]) -> (Vec<u8>, bool, Vec<u8>) {
        let (out, end, rest, _) = run(input, input.len(), 2048);
        for step in 1..input.len().min(12) {
            let (o, e, r, _) = run(input, step, 2048);
            assert_eq!((&o, e), (&out, end), "step {step}");
            if e {
                assert_eq!(r, rest, "step {step}");
            }
        }
        (out, end, rest)
    }

    #[test]
    fn plain_message() {
        let (out, end, rest) = all_steps(b"Subject: x\r\n\r\nbody\r\n.\r\nQUIT\r\n");
        assert!(end);
        assert_eq!(out, b"Subject: x\n\nbody\n");
        assert_eq!(rest, b"QUIT\r\n");
    }

    #[test]
    fn immediate_end() {
        let (out, end, rest) = all_steps(b".\r\n");
        assert!(end);
        assert!(out.is_empty());
        assert!(rest.is_empty());
    }

    #[test]
    fn dot_unstuffing() {
        let (out, end, _) = all_steps(b"..a\r\n...\r\n..\r\nx.\r\n.\r\n");
        assert!(end);
        assert_eq!(out, b".a\n..\n.\nx.\n");
    }

    #[test]
    fn smuggling_is_not_end() {
        // <LF>.<LF>, <LF>.<CR><LF> and <CR><LF>.<LF> are not the end.
        for input in [
            &b"a\n.\nMAIL FROM:<x>\r\n.\r\n"[..],
            b"a\n.\r\nMAIL FROM:<x>\r\n.\r\n",
            b"a\r\n.\nMAIL FROM:<x>\r\n.\r\n",
        ] {
            let (out, end, rest) = all_steps(input);
            assert!(end);
            assert_eq!(out, b"a\nMAIL FROM:<x>\n", "{input:?}");
            assert!(rest.is_empty());
        }
        // A bare CR is not a line end either.
        let (out, end, _) = all_steps(b"a\r.\r\nb\r\n.\r\n");
        assert!(end);
        assert_eq!(out, b"a\r.\nb\n");
        // Without CRLF.CRLF there is no end at all.
        let (_, end, _) = all_steps(b"a\n.\n");
        assert!(!end);
    }

    #[test]
    fn bare_lf_lines_are_lines() {
        let (out, end, _) = all_steps(b"a\nb\r\n.\r\n");
        assert!(end);
        assert_eq!(out, b"a\nb\n");
    }

    #[test]
    fn end_across_pieces() {
        let input = b"line one\r\nline two\r\n.\r\nNOOP\r\n";
        for step in 1..input.len() {
            let (out, end, rest, _) = run(input, step, 2048);
            assert!(end, "step {step}");
            assert_eq!(out, b"line one\nline two\n");
            assert_eq!(rest, b"NOOP\r\n");
        }
    }

    #[test]
    fn long_lines() {
        let mut input = Vec::new();
        input.extend(std::iter::repeat_n(b'x', 500));
        input.extend_from_slice(b"\r\n.");
        input.extend(std::iter::repeat_n(b'y', 300));
        input.extend_from_slice(b"\r\n.\r\n");
        for step in [1, 7, 100, 1000] {
            let (out, end, _, size) = run(&input, step, 100);
            assert!(end);
            let mut want = vec![b'x'; 500];
            want.push(b'\n');
            want.extend(std::iter::repeat_n(b'y', 300));
            want.push(b'\n');
            assert_eq!(out, want, "step {step}");
            assert_eq!(size, 500 + 2 + 300 + 2);
        }
        // A CR at the cut is kept for the next piece.
        let mut input = vec![b'z'; 99];
        input.extend_from_slice(b"\r\n.\r\n");
        let (out, end, _, _) = run(&input, 100, 100);
        assert!(end);
        assert_eq!(out.len(), 100);
        assert_eq!(*out.last().unwrap(), b'\n');
    }

    /// Found by the smtp_data fuzz target in a 10-minute run: with no
    /// line end yet, how much of a long line has been passed on depends on
    /// the reads; what was passed on plus what is still pending does not.
    #[test]
    fn unfinished_long_line_is_split_by_reads_but_kept_whole() {
        let input: Vec<u8> = (0..2472u32)
            .map(|i| [189u8, 29, 255, 0][(i / 97 % 4) as usize])
            .collect();
        let whole = run(&input, input.len(), 2048);
        let bytewise = run(&input, 1, 2048);
        assert!(!whole.1 && !bytewise.1);
        assert_ne!(
            whole.0.len(),
            bytewise.0.len(),
            "flushed at different points"
        );
        let joined = |(mut out, _, rest, _): (Vec<u8>, bool, Vec<u8>, u64)| {
            out.extend_from_slice(&rest);
            out
        };
        assert_eq!(joined(whole), input);
        assert_eq!(joined(bytewise), input);
    }

    #[test]
    fn first_line_kludges() {
        let (out, _, _) = all_steps(b" folded\r\nbody\r\n.\r\n");
        assert_eq!(out, b"\n folded\nbody\n");
        let (out, _, _) = all_steps(b"From a@b Sun Nov 22\r\nSubject: s\r\n\r\nFrom here\r\n.\r\n");
        assert_eq!(
            out,
            b"X-Mailbox-Line: From a@b Sun Nov 22\nSubject: s\n\nFrom here\n"
        );
    }

    #[test]
    fn sizes() {
        let (_, _, _, size) = run(b"ab\r\n..c\r\n.\r\n", 100, 2048);
        assert_eq!(size, 4 + 4);
    }
}
