//! The greeting, HELO and EHLO.

use super::*;

#[test]
fn ehlo_offers_what_is_implemented() {
    let mut s = session();
    assert_eq!(
        send(&mut s, "EHLO client.example\r\n"),
        [
            "250-mx.example",
            "250-PIPELINING",
            "250-SIZE 1000",
            "250-VRFY",
            "250-ETRN",
            "250-ENHANCEDSTATUSCODES",
            "250-8BITMIME",
            "250-DSN",
            "250 SMTPUTF8"
        ]
    );
    assert_eq!(send(&mut s, "HELO x\r\n"), ["250 mx.example"]);
    assert_eq!(send(&mut s, "EHLO\r\n"), ["501 Syntax: EHLO hostname"]);
}

#[test]
fn helo_required_and_vrfy() {
    let mut cfg = settings();
    cfg.helo_required = true;
    let mut s = session_with(cfg.clone(), "127.0.0.1");
    assert_eq!(
        send(&mut s, "MAIL FROM:<a@b>\r\n"),
        ["503 5.5.1 Error: send HELO/EHLO first"]
    );
    assert_eq!(
        send(&mut s, "VRFY <u@mx.example>\r\n"),
        ["252 2.0.0 <u@mx.example>"]
    );
    assert_eq!(send(&mut s, "VRFY\r\n"), ["501 5.5.4 Syntax: VRFY address"]);
    cfg.disable_vrfy = true;
    let mut s = session_with(cfg, "127.0.0.1");
    assert_eq!(
        send(&mut s, "VRFY u\r\n"),
        ["502 5.5.1 VRFY command is disabled"]
    );
    let r = send(&mut s, "EHLO c\r\n");
    assert!(!r.iter().any(|l| l.contains("VRFY")));
}

#[test]
fn greeting_waits_for_the_client_name() {
    let mut cfg = settings();
    cfg.peername_lookup = true;
    let mut s = Session::new(Arc::new(cfg), Client::new("192.0.2.1".parse().unwrap()));
    assert_eq!(
        s.take_dns_requests(),
        [Query::Peer("192.0.2.1".parse().unwrap())]
    );
    // Nothing is said, and early input waits.
    assert!(send(&mut s, "HELO c\r\n").is_empty());
    // An answer to a question this session did not ask is ignored.
    s.dns_answer(Query::Peer("192.0.2.9".parse().unwrap()), Answer::TryAgain);
    assert!(out(&mut s).is_empty());
    s.dns_answer(
        Query::Peer("192.0.2.1".parse().unwrap()),
        Answer::Peer(PeerName {
            name: "mail.example".into(),
            name_status: NameStatus::Ok,
            reverse_name: "mail.example".into(),
            reverse_status: NameStatus::Ok,
        }),
    );
    assert_eq!(
        out(&mut s),
        ["220 mx.example ESMTP Postern", "250 mx.example"]
    );
    assert_eq!(s.namaddr(), "mail.example[192.0.2.1]");
}

#[test]
fn greeting_waits_for_dns_without_delay_reject() {
    let mut cfg = settings();
    let split = |s: &str| postern_conf::split_list(s);
    cfg.restrictions.delay_reject = false;
    cfg.restrictions.set_list(
        Stage::Client,
        crate::restrictions::parse_list(&split("reject_rbl_client rbl.example")),
    );
    cfg.restrictions.set_list(
        Stage::Sender,
        crate::restrictions::parse_list(&split("reject_unknown_sender_domain")),
    );
    let cfg = Arc::new(cfg);
    // Listed: the greeting is the refusal.
    let mut s = Session::new(cfg.clone(), Client::new("192.0.2.1".parse().unwrap()));
    assert!(out(&mut s).is_empty());
    assert!(!s.wants_input());
    let q = Query::Rbl("1.2.0.192.rbl.example".into());
    assert_eq!(s.take_dns_requests(), std::slice::from_ref(&q));
    s.dns_answer(q, Answer::Found(vec!["127.0.0.2".parse().unwrap()]));
    assert_eq!(
        out(&mut s),
        ["554 5.7.1 Service unavailable; Client host [192.0.2.1] blocked using rbl.example"]
    );
    assert_eq!(
        send(&mut s, "HELO c\r\n"),
        ["503 5.7.0 Error: access denied for unknown[192.0.2.1]"]
    );
    // Not listed: greeted; the sender's domain is looked up at MAIL.
    let mut s = Session::new(cfg, Client::new("192.0.2.2".parse().unwrap()));
    let q = Query::Rbl("2.2.0.192.rbl.example".into());
    assert_eq!(s.take_dns_requests(), std::slice::from_ref(&q));
    s.dns_answer(q, Answer::NotFound);
    assert_eq!(out(&mut s), ["220 mx.example ESMTP Postern"]);
    assert_eq!(
        send(&mut s, "HELO c\r\nMAIL FROM:<a@gone.example>\r\n"),
        ["250 mx.example"]
    );
    let q = Query::Domain("gone.example".into());
    assert_eq!(s.take_dns_requests(), std::slice::from_ref(&q));
    s.dns_answer(q, Answer::NotFound);
    assert_eq!(
        out(&mut s),
        ["450 4.1.8 <a@gone.example>: Sender address rejected: Domain not found"]
    );
    assert!(s.stats().contains("mail=0/1"), "{}", s.stats());
}

#[test]
fn input_behind_ehlo_ends_the_session_with_forbid_unauth_pipelining() {
    let mut s = session_with(
        Settings {
            forbid_unauth_pipelining: true,
            ..settings()
        },
        "127.0.0.1",
    );
    let r = send(&mut s, "EHLO client.example\r\nMAIL FROM:<a@b>\r\n");
    assert_eq!(r, ["554 5.5.0 Error: SMTP protocol synchronization"]);
    assert!(s.is_done());
    // A client that waits for each reply where it must is served.
    let mut s = session_with(
        Settings {
            forbid_unauth_pipelining: true,
            ..settings()
        },
        "127.0.0.1",
    );
    assert_eq!(send(&mut s, "EHLO client.example\r\n")[0], "250-mx.example");
    let r = send(&mut s, "MAIL FROM:<a@b>\r\nRSET\r\nNOOP\r\n");
    assert_eq!(r, ["250 2.1.0 Ok", "250 2.0.0 Ok", "250 2.0.0 Ok"]);
    assert!(!s.is_done());
}
