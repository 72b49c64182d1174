//! mynetworks-style address lists (Postfix match lists of addresses and
//! networks) on arbitrary text.
#![no_main]
use libfuzzer_sys::fuzz_target;
use postern_common::match_list::{Kind, MatchList};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    // Files and tables are left out: the fuzzer must not open paths.
    let opens = postern_conf::split_braced(text, true).iter().any(|i| {
        let i = i.trim_start_matches('!').trim_start();
        i.starts_with('/') || postern_common::match_list::is_table(i)
    });
    if opens {
        return;
    }
    if let Ok(list) = MatchList::parse(text, Kind::Address, false) {
        let _ = list.matches_addr("127.0.0.1".parse().unwrap());
        let _ = list.matches_addr("::ffff:10.1.2.3".parse().unwrap());
    }
});
