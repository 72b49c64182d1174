//! `regexp:` and `pcre:` table files (common/src/regexp.rs, loaded by
//! maps.rs): parsed, then looked up with a few keys and with lines of the
//! input itself, through both the plain and the `$N`-expanding lookup.
#![no_main]
use libfuzzer_sys::fuzz_target;
use postern_common::{maps, regexp};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(rules) = regexp::parse(text) else {
        return;
    };
    let table = maps::Table::Regexp {
        spec: "regexp:/fuzz".into(),
        rules,
    };
    let keys = [
        "",
        "user@example.com",
        "Subject: hello",
        "127.0.0.1",
        "ÄÖ ü",
    ];
    for key in keys.into_iter().chain(text.lines().take(8)) {
        // A regexp: table in memory never fails a lookup.
        let plain = table.lookup(key).unwrap().map(|v| v.into_owned());
        let expanded = table.lookup_expanded(key).unwrap();
        // Both lookups pick the same rule: one answers iff the other does.
        assert_eq!(plain.is_some(), expanded.is_some());
    }
});
