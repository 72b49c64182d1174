//! SMTP command lines as a client sends them: tokenizing, the verb,
//! `<path>` addresses (quoted local parts, UTF-8, source routes) and the
//! ESMTP parameters (SIZE, NOTIFY, ORCPT, RET, ENVID xtext).
#![no_main]
use libfuzzer_sys::fuzz_target;
use postern_smtpd::protocol;

fuzz_target!(|data: &[u8]| {
    let line = String::from_utf8_lossy(data);
    let tokens = protocol::tokenize(&line);
    if let Some(first) = tokens.first() {
        let _ = protocol::Verb::parse(&first.text);
    }
    for t in &tokens {
        let _ = protocol::extract_address(&t.text);
        let _ = protocol::xtext_decode(&t.text);
        let _ = protocol::parse_notify(&t.text);
        let _ = protocol::parse_orcpt(&t.text);
        let _ = protocol::parse_ret(&t.text);
        let _ = protocol::param(&t.text, "SIZE");
    }
    let _ = protocol::printable(data, 400);
    let _ = protocol::neuter(&line);
});
