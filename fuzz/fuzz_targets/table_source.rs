//! Lookup-table sources (aliases and postmap form), compiled and read back:
//! what newaliases builds must be what the daemons find.
#![no_main]
use libfuzzer_sys::fuzz_target;
use postern_common::maps;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    for aliases in [true, false] {
        let _ = maps::parse_source(text, aliases);
    }
    let _ = maps::split_specs(text);
    let _ = maps::Table::open(&format!("inline:{{{text}}}"));
});
