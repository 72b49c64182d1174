//! The DATA decoder: end-of-data, dot-unstuffing, bare LF, long lines.
//! Two properties beyond "no panic": the result does not depend on how
//! the input was cut into reads (the decoded bytes plus what is still
//! waiting for the rest of its line), and end-of-data is only ever found
//! right after CRLF.CRLF (no SMTP smuggling, CVE-2023-51764).
#![no_main]
use libfuzzer_sys::fuzz_target;
use postern_smtpd::data::Decoder;

/// The decoded bytes and where the end of data was found; without an end,
/// the bytes still pending (a partial line) follow the decoded ones: how
/// much of an unfinished long line was passed on depends on the reads,
/// but nothing is lost or changed.
fn decode(input: &[u8], piece: usize) -> (Vec<u8>, Option<usize>) {
    let mut d = Decoder::new(2048);
    let mut out = Vec::new();
    let mut pending = Vec::new();
    let mut consumed = 0;
    for chunk in input.chunks(piece.max(1)) {
        pending.extend_from_slice(chunk);
        let fed = d.feed(&pending, &mut out);
        consumed += fed.consumed;
        pending.drain(..fed.consumed);
        if fed.end {
            return (out, Some(consumed));
        }
    }
    out.extend_from_slice(&pending);
    (out, None)
}

fuzz_target!(|data: &[u8]| {
    let Some((&cut, input)) = data.split_first() else { return };
    let whole = decode(input, input.len().max(1));
    let pieces = decode(input, (cut % 7) as usize + 1);
    assert_eq!(whole, pieces, "result depends on how the input was read");
    if let Some(end) = whole.1 {
        let ended = &input[..end];
        assert!(
            ended == b".\r\n" || ended.ends_with(b"\r\n.\r\n"),
            "end of data without CRLF.CRLF: {:?}",
            String::from_utf8_lossy(&ended[ended.len().saturating_sub(8)..])
        );
    }
});
