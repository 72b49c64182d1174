//! Lines from Dovecot's auth server (VERSION, MECH, OK, CONT, FAIL, with
//! its \001 escaping): smtpd must survive whatever the socket says.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    for line in String::from_utf8_lossy(data).split('\n') {
        let _ = postern_smtpd::sasl::parse_line(line);
    }
});
