//! Message headers as cleanup sees them: header names, folded values and
//! the address lists of To/Cc/Bcc that `sendmail -t` takes recipients from
//! (display names, quoted strings, comments, groups, source routes).
#![no_main]
use libfuzzer_sys::fuzz_target;
use postern_cleanup::headers;

fuzz_target!(|data: &[u8]| {
    for line in data.split(|&b| b == b'\n') {
        let _ = headers::header_name(line);
    }
    let text = String::from_utf8_lossy(data);
    for a in headers::addresses(&text) {
        assert!(!a.is_empty());
    }
});
