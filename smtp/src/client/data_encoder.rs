//! The message content as it goes on the wire: [`DataEncoder`].

/// Converts queued content (LF line ends) to SMTP DATA: CRLF line ends,
/// a dot doubled at the start of a line, a final CRLF when the content
/// lacks one, and the `.` line. No bare CR and no bare LF ever leaves
/// (SMTP smuggling, CVE-2023-51764: a receiver that takes a lone CR or
/// LF for a line end would see `<CR>.<CR>` or `<LF>.<LF>` as the end of
/// the data and what follows as commands): every LF is sent as CRLF; the
/// CRs just before an LF are part of that line end (Postfix's smtpd and
/// sendmail strip them); any other CR is sent as a space, as Postfix
/// 3.7's cleanup does (`cleanup_replace_stray_cr_lf = yes`), so
/// `before<CR>.<CR>after` leaves as `before . after`.
/// Lines longer than the line length limit (`smtp_line_length_limit`,
/// `lmtp_line_length_limit`; 0 = none) are broken with CRLF SPACE, as
/// Postfix's smtp does, so that a receiver enforcing RFC 5321's 1,000
/// octets takes them and no octet is lost (the inserted space makes the
/// break a header continuation or, in a body, harmless to MIME). Unlike
/// Postfix, a doubled dot counts against the limit: it is on the wire.
/// Works chunk by chunk: a line may span any number of chunks. For BDAT
/// ([`DataEncoder::bdat`]) the same without the dots: BDAT carries the
/// octets as they are.
#[derive(Debug, Clone)]
pub struct DataEncoder {
    /// Octets on the output line so far, not counting its CRLF.
    column: usize,
    /// The last input octets were this many CRs, not yet written: they
    /// belong to the line end when an LF follows, to the line (as
    /// spaces) otherwise.
    pending_crs: usize,
    /// DATA: dot-stuffing and the final `.` line.
    dots: bool,
    /// The longest output line, without its CRLF; 0 = no limit.
    limit: usize,
    /// Some line was broken.
    folded: bool,
}

impl Default for DataEncoder {
    fn default() -> Self {
        Self::new()
    }
}

/// `data` without the CRs at its end, and how many there were.
fn trailing_crs(data: &[u8]) -> (&[u8], usize) {
    let kept = data.iter().rposition(|&b| b != b'\r').map_or(0, |i| i + 1);
    (&data[..kept], data.len() - kept)
}

impl DataEncoder {
    pub fn new() -> DataEncoder {
        DataEncoder {
            column: 0,
            pending_crs: 0,
            dots: true,
            limit: 0,
            folded: false,
        }
    }

    /// For BDAT chunks: CRLF line ends only, no dot-stuffing, no `.` line.
    pub fn bdat() -> DataEncoder {
        DataEncoder {
            dots: false,
            ..DataEncoder::new()
        }
    }

    /// Breaks lines longer than `limit` octets (without the CRLF); 0 = no
    /// limit. A limit of 1 is taken as 2: a continuation line holds its
    /// space and at least one octet.
    pub fn line_limit(mut self, limit: usize) -> DataEncoder {
        self.limit = if limit == 1 { 2 } else { limit };
        self
    }

    /// Whether some line was broken.
    pub fn folded(&self) -> bool {
        self.folded
    }

    /// Appends the encoding of `input` to `out`.
    pub fn feed(&mut self, input: &[u8], out: &mut Vec<u8>) {
        let mut rest = input;
        while !rest.is_empty() {
            let (segment, line_end) = match rest.iter().position(|&b| b == b'\n') {
                Some(p) => (&rest[..p], true),
                None => (rest, false),
            };
            rest = &rest[segment.len() + usize::from(line_end)..];
            let (text, crs) = trailing_crs(segment);
            if !text.is_empty() {
                // CRs held back from the last chunk were stray after all.
                self.stray_crs(out);
                self.text(text, out);
            }
            if line_end {
                // The CRs before the LF, here and held back, end the line.
                self.pending_crs = 0;
                out.extend_from_slice(b"\r\n");
                self.column = 0;
            } else {
                self.pending_crs += crs;
            }
        }
    }

    /// Writes the CRs held back as spaces: they were not before an LF.
    fn stray_crs(&mut self, out: &mut Vec<u8>) {
        while self.pending_crs > 0 {
            let n = self.pending_crs.min(64);
            self.text(&[b' '; 64][..n], out);
            self.pending_crs -= n;
        }
    }

    /// Writes octets of a line (no line end among them), doubling a dot
    /// that starts it and breaking it at the limit.
    fn text(&mut self, mut data: &[u8], out: &mut Vec<u8>) {
        if data.is_empty() {
            return;
        }
        if self.dots && self.column == 0 && data[0] == b'.' {
            out.push(b'.');
            self.column = 1;
        }
        if self.limit > 0 {
            // A line exactly at the limit is left alone: it is broken
            // only when one more octet comes.
            while self.column + data.len() > self.limit {
                let room = self.limit - self.column;
                push_masked(out, &data[..room]);
                out.extend_from_slice(b"\r\n ");
                self.column = 1;
                self.folded = true;
                data = &data[room..];
            }
        }
        push_masked(out, data);
        self.column += data.len();
    }

    /// Appends the end: a CRLF if the last line lacks one (CRs held back
    /// are that line end), then `.` CRLF.
    pub fn finish(&mut self, out: &mut Vec<u8>) {
        if self.pending_crs > 0 || self.column > 0 {
            out.extend_from_slice(b"\r\n");
            self.pending_crs = 0;
            self.column = 0;
        }
        if self.dots {
            out.extend_from_slice(b".\r\n");
        }
    }
}

/// Appends octets of a line, each stray CR among them as a space.
fn push_masked(out: &mut Vec<u8>, data: &[u8]) {
    let start = out.len();
    out.extend_from_slice(data);
    for b in &mut out[start..] {
        if *b == b'\r' {
            *b = b' ';
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn enc_chunks(chunks: &[&[u8]]) -> Vec<u8> {
        let mut e = DataEncoder::new();
        let mut out = Vec::new();
        for c in chunks {
            e.feed(c, &mut out);
        }
        e.finish(&mut out);
        out
    }

    #[test]
    fn data_encoding() {
        assert_eq!(enc_chunks(&[]), b".\r\n");
        assert_eq!(enc_chunks(&[b"a\nb\n"]), b"a\r\nb\r\n.\r\n");
        assert_eq!(enc_chunks(&[b"a\r\nb"]), b"a\r\nb\r\n.\r\n");
        assert_eq!(enc_chunks(&[b".\n..x\n.y"]), b"..\r\n...x\r\n..y\r\n.\r\n");
        assert_eq!(enc_chunks(&[b"a.b\n x.\n"]), b"a.b\r\n x.\r\n.\r\n");
        assert_eq!(enc_chunks(&[b"\n\n"]), b"\r\n\r\n.\r\n");
        assert_eq!(enc_chunks(&[b"bare\rcr\n"]), b"bare cr\r\n.\r\n");
        assert_eq!(enc_chunks(&[b"end\r"]), b"end\r\n.\r\n");
        // Every CR before the LF ends the line, as Postfix strips them.
        assert_eq!(enc_chunks(&[b"x\r\r\r\ny\n"]), b"x\r\ny\r\n.\r\n");
        assert_eq!(enc_chunks(&[b"\r\r\n"]), b"\r\n.\r\n");
    }

    /// No octet string of `out` is a CR without an LF after it, or an LF
    /// without a CR before it.
    fn crlf_only(out: &[u8]) -> bool {
        out.iter().enumerate().all(|(i, &b)| match b {
            b'\r' => out.get(i + 1) == Some(&b'\n'),
            b'\n' => i > 0 && out[i - 1] == b'\r',
            _ => true,
        })
    }

    #[test]
    fn smuggling_variants_leave_with_crlf_only() {
        // What smtpd stores for SEC Consult's CVE-2023-51764 variants (LF
        // line ends; a CR before an LF stripped once), and what Postfix
        // 3.7 relays for them: stray CRs as spaces.
        let cases: [(&[u8], &[u8]); 6] = [
            (b"before\r.\nafter\n", b"before .\r\nafter\r\n.\r\n"),
            (b"before\r.\r\nafter\n", b"before .\r\nafter\r\n.\r\n"),
            (b"before\r.\rafter\n", b"before . after\r\n.\r\n"),
            (b"before\n\rafter\n", b"before\r\n after\r\n.\r\n"),
            (
                b"before\n\x00.\nafter\n",
                b"before\r\n\x00.\r\nafter\r\n.\r\n",
            ),
            (b"before\n.\r\r\r", b"before\r\n..\r\n.\r\n"),
        ];
        for (stored, wire) in cases {
            let whole = enc_chunks(&[stored]);
            assert_eq!(whole, wire, "{:?}", String::from_utf8_lossy(stored));
            assert!(crlf_only(&whole));
            for i in 0..=stored.len() {
                for j in i..=stored.len() {
                    let got = enc_chunks(&[&stored[..i], &stored[i..j], &stored[j..]]);
                    assert_eq!(got, whole, "cut at {i},{j}");
                }
            }
            let mut bdat = DataEncoder::bdat();
            let mut out = Vec::new();
            bdat.feed(stored, &mut out);
            bdat.finish(&mut out);
            assert!(crlf_only(&out));
        }
        // CRs held over a chunk boundary that turn out stray.
        assert_eq!(enc_chunks(&[b"a\r\r", b"\r", b"b\n"]), b"a   b\r\n.\r\n");
        assert_eq!(enc_chunks(&[b"a\r\r", b"\r", b"\nb"]), b"a\r\nb\r\n.\r\n");
    }

    #[test]
    fn data_encoding_across_chunk_boundaries() {
        let whole: &[u8] = b"Subject: x\n\n.dot\nline\r\n..two\nlast.\n.";
        let expect = enc_chunks(&[whole]);
        assert_eq!(
            expect,
            b"Subject: x\r\n\r\n..dot\r\nline\r\n...two\r\nlast.\r\n..\r\n.\r\n".to_vec()
        );
        // Every way of cutting it in two or three gives the same bytes.
        for i in 0..=whole.len() {
            for j in i..=whole.len() {
                let got = enc_chunks(&[&whole[..i], &whole[i..j], &whole[j..]]);
                assert_eq!(got, expect, "cut at {i},{j}");
            }
        }
        // A CR at the end of one chunk and its LF at the start of the next.
        assert_eq!(enc_chunks(&[b"a\r", b"\nb\n"]), b"a\r\nb\r\n.\r\n");
        // A dot after a newline that ended the previous chunk.
        assert_eq!(enc_chunks(&[b"a\n", b".b\n"]), b"a\r\n..b\r\n.\r\n");
    }

    /// Encodes `chunks` with a line limit.
    fn enc_limited(limit: usize, dots: bool, chunks: &[&[u8]]) -> (Vec<u8>, bool) {
        let e = if dots {
            DataEncoder::new()
        } else {
            DataEncoder::bdat()
        };
        let mut e = e.line_limit(limit);
        let mut out = Vec::new();
        for c in chunks {
            e.feed(c, &mut out);
        }
        e.finish(&mut out);
        (out, e.folded())
    }

    #[test]
    fn long_lines_are_broken_with_crlf_space() {
        // As Postfix's smtp_text_out: a line of exactly the limit is kept;
        // one octet more and it is broken, the rest after a space.
        assert_eq!(
            enc_limited(4, true, &[b"abcd\n"]),
            (b"abcd\r\n.\r\n".to_vec(), false)
        );
        assert_eq!(
            enc_limited(4, true, &[b"abcde\n"]),
            (b"abcd\r\n e\r\n.\r\n".to_vec(), true)
        );
        assert_eq!(
            enc_limited(4, false, &[b"abcdefghij\nxy\n"]),
            (b"abcd\r\n efg\r\n hij\r\nxy\r\n".to_vec(), true)
        );
        // A CR before the LF is the line end, not an octet of the line; a
        // bare CR is (sent as a space).
        assert_eq!(enc_limited(4, false, &[b"abcd\r\n"]).0, b"abcd\r\n");
        assert_eq!(enc_limited(4, false, &[b"abcd\rx\n"]).0, b"abcd\r\n  x\r\n");
        assert_eq!(enc_limited(4, false, &[b"abcd\r"]).0, b"abcd\r\n");
        // The doubled dot is on the wire and counts; a continuation line
        // starting with a dot is not stuffed (it starts with the space).
        assert_eq!(
            enc_limited(4, true, &[b".abcd\n"]).0,
            b"..ab\r\n cd\r\n.\r\n"
        );
        assert_eq!(
            enc_limited(4, true, &[b"abcd.x\n"]).0,
            b"abcd\r\n .x\r\n.\r\n"
        );
        // No limit.
        assert_eq!(enc_limited(0, false, &[&[b'x'; 5000]]).0.len(), 5002);
    }

    #[test]
    fn long_lines_keep_every_octet_across_chunks() {
        // 3,000 octets in one line, lines of 998, 999 and 1,995, a CR at
        // every possible place: unfolding gives back the CRLF form.
        let mut text = Vec::new();
        for (i, n) in [3000usize, 998, 999, 1995, 997, 1].iter().enumerate() {
            text.extend((0..*n).map(|k| b'a' + ((k + i) % 26) as u8));
            text.extend_from_slice(if i % 2 == 0 { b"\n" } else { b"\r\n" });
        }
        text.extend_from_slice(b"x\ry\n.dotted\n");
        let crlf = {
            let (plain, _) = enc_limited(0, false, &[&text]);
            plain
        };
        let (whole, folded) = enc_limited(998, false, &[&text]);
        assert!(folded);
        for line in whole.split(|&b| b == b'\n') {
            assert!(line.len() <= 999, "line of {} octets", line.len());
        }
        let unfolded = String::from_utf8_lossy(&whole).replace("\r\n ", "");
        assert_eq!(unfolded.as_bytes(), &crlf[..]);
        for cut in [1, 7, 997, 998, 999, 1000, 2999, 3000, 3001, 4000] {
            let (a, b) = text.split_at(cut.min(text.len()));
            assert_eq!(enc_limited(998, false, &[a, b]).0, whole, "cut at {cut}");
        }
        for size in [1, 2, 3, 10, 999] {
            let chunks: Vec<&[u8]> = text.chunks(size).collect();
            assert_eq!(
                enc_limited(998, false, &chunks).0,
                whole,
                "chunks of {size}"
            );
        }
    }
}
