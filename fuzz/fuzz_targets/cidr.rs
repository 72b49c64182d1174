//! mynetworks-style address lists on arbitrary text.
#![no_main]
use libfuzzer_sys::fuzz_target;
use postern_common::cidr::CidrList;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let items: Vec<&str> = text.split([',', ' ']).collect();
    if let Ok(list) = CidrList::parse(&items) {
        let _ = list.matches("127.0.0.1".parse().unwrap());
        let _ = list.matches("::ffff:10.1.2.3".parse().unwrap());
    }
});
