//! main.cf parsing and `$name` expansion on arbitrary text: postconf -e
//! writes what an administrator typed, and expansion must terminate even
//! for self-referencing values.
#![no_main]
use libfuzzer_sys::fuzz_target;
use std::path::Path;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    if let Ok(cfg) = postern_conf::Config::from_text(Path::new("/etc/postern"), text, Path::new("main.cf")) {
        for name in cfg.explicit_names() {
            let _ = cfg.get(&name);
        }
        let _ = cfg.expand(text);
    }
    let _ = postern_conf::main_cf::edit(text, "relayhost", "[x]:25");
});
