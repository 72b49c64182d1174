//! SMTP command lines as a client sends them: tokenizing, the verb,
//! `<path>` addresses (quoted local parts, UTF-8, source routes), the
//! MAIL/RCPT parameters (SIZE, NOTIFY, ORCPT, RET, ENVID xtext) and HELO
//! names.
#![no_main]
use libfuzzer_sys::fuzz_target;
use postern_common::smtp_command::{self as protocol, Offered};
use postern_common::{dsn, hostname};

fuzz_target!(|data: &[u8]| {
    let line = String::from_utf8_lossy(data);
    let tokens = protocol::tokenize(&line);
    if let Some(first) = tokens.first() {
        let _ = protocol::Verb::parse(&first.text);
    }
    let words: Vec<&str> = tokens.iter().map(|t| t.text.as_str()).collect();
    let all = Offered {
        auth: true,
        smtputf8: true,
    };
    let _ = protocol::mail_params(&words, all);
    let _ = protocol::rcpt_params(&words);
    for t in &tokens {
        let _ = protocol::extract_address(&t.text);
        let _ = dsn::xtext_decode(&t.text);
        let _ = dsn::unitext_decode(&t.text);
        let _ = dsn::parse_notify(&t.text);
        if let Some(o) = dsn::parse_orcpt(&t.text) {
            for utf8 in [false, true] {
                let again = dsn::format_orcpt(&o, utf8).and_then(|f| dsn::parse_orcpt(&f));
                assert!(again.is_some(), "{o}");
            }
        }
        let _ = hostname::valid_helo_name(&t.text);
        let _ = hostname::valid_hostaddr(&t.text);
    }
    let _ = protocol::printable(data, 400);
    let _ = protocol::neuter(&line);
});
