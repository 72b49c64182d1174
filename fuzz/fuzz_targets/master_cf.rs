//! master.cf parsing on arbitrary text.
#![no_main]
use libfuzzer_sys::fuzz_target;
use std::path::Path;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    if let Ok(services) = postern_conf::master_cf::parse(text, Path::new("master.cf"), 100) {
        for s in services {
            let _ = s.inet_address();
        }
    }
});
