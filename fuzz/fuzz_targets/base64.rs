//! base64 as SASL clients send it: decoding never panics, and what it
//! encodes decodes back.
#![no_main]
use libfuzzer_sys::fuzz_target;
use postern_common::base64;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = base64::decode(text);
    }
    assert_eq!(base64::decode(&base64::encode(data)).as_deref(), Some(data));
});
