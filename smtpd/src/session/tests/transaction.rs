//! MAIL, RCPT and DATA: the envelope, its syntax (SMTPUTF8 included),
//! the limits and the restrictions.

use super::*;

#[test]
fn whole_transaction() {
    let mut s = session();
    let r = send(
        &mut s,
        "EHLO client.example\r\nMAIL FROM:<a@b.example> SIZE=100 BODY=8BITMIME\r\nRCPT TO:<u@mx.example> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;u+40mx.example\r\nDATA\r\n",
    );
    // The first recipient opens the queue file: its 250 waits for
    // cleanup, and the DATA behind it too.
    assert_eq!(r.last().unwrap(), "250 2.1.0 Ok");
    assert_eq!(requests(&mut s).0, ["open"]);
    assert!(s.waiting_on_cleanup());
    assert!(!s.wants_input());
    assert_eq!(
        opened(&mut s),
        ["250 2.1.5 Ok", "354 End data with <CR><LF>.<CR><LF>"]
    );
    // DATA sent the envelope.
    let reqs = s.take_requests();
    assert_eq!(reqs.len(), 1);
    let CleanupRequest::Envelope(m) = &reqs[0] else {
        panic!("{reqs:?}")
    };
    assert_eq!(m.sender, "a@b.example");
    assert_eq!(m.recipients[0].address, "u@mx.example");
    assert_eq!(m.recipients[0].notify, 3);
    assert_eq!(m.recipients[0].orcpt, "rfc822;u@mx.example");
    assert_eq!(m.origin, "smtpd");
    assert!(m
        .attrs
        .contains(&("client".into(), "unknown[127.0.0.1]".into())));
    assert!(m.attrs.contains(&("protocol".into(), "ESMTP".into())));
    assert!(m.attrs.contains(&("helo".into(), "client.example".into())));
    assert!(s.wants_input());
    assert_eq!(
        send(&mut s, "Subject: hi\r\n\r\n..dot\r\n"),
        Vec::<String>::new()
    );
    assert_eq!(send(&mut s, "end\r\n.\r\n"), Vec::<String>::new());
    let (kinds, content) = requests(&mut s);
    assert_eq!(kinds, ["content", "close"]);
    let content = String::from_utf8(content).unwrap();
    assert!(
        content.starts_with(
            "Received: from client.example (unknown [127.0.0.1])\n\tby mx.example (Postern) with ESMTP id QID1\n\tfor <u@mx.example>; "
        ),
        "{content}"
    );
    assert!(
        content.ends_with("\nSubject: hi\n\n.dot\nend\n"),
        "{content}"
    );
    assert_eq!(queued(&mut s), ["250 2.0.0 Ok: queued as QID1"]);
    assert_eq!(send(&mut s, "QUIT\r\n"), ["221 2.0.0 Bye"]);
    assert!(s.is_done());
    assert_eq!(s.stats(), " ehlo=1 mail=1 rcpt=1 data=1 quit=1 commands=5");
}

#[test]
fn relay_denied_and_logged_shape() {
    let mut s = session_with(settings(), "192.0.2.7");
    assert_eq!(s.namaddr(), "unknown[192.0.2.7]");
    let r = send(
        &mut s,
        "EHLO c\r\nMAIL FROM:<s@x>\r\nRCPT TO:<a@far.example>\r\nRCPT TO:<u@MX.example>\r\nRCPT TO:<postmaster>\r\nDATA\r\n",
    );
    assert_eq!(
        &r[9..],
        [
            "250 2.1.0 Ok",
            "554 5.7.1 <a@far.example>: Relay access denied"
        ]
    );
    assert_eq!(requests(&mut s).0, ["open"]);
    assert_eq!(
        opened(&mut s),
        [
            "250 2.1.5 Ok",
            "250 2.1.5 Ok",
            "354 End data with <CR><LF>.<CR><LF>"
        ]
    );
    let reqs = s.take_requests();
    let CleanupRequest::Envelope(m) = &reqs[0] else {
        panic!()
    };
    assert_eq!(m.recipients.len(), 2);
}

#[test]
fn size_limit() {
    let mut s = session();
    assert_eq!(
        send(&mut s, "MAIL FROM:<a@b> SIZE=1001\r\n"),
        ["552 5.3.4 Message size exceeds fixed limit"]
    );
    assert_eq!(
        send(&mut s, "MAIL FROM:<a@b> SIZE=x\r\n"),
        ["501 5.5.4 Bad message size syntax"]
    );
    send(
        &mut s,
        "MAIL FROM:<a@b> SIZE=1000\r\nRCPT TO:<u@mx.example>\r\nDATA\r\n",
    );
    s.take_requests();
    opened(&mut s);
    let line = "x".repeat(98) + "\r\n";
    for _ in 0..9 {
        assert!(send(&mut s, &line).is_empty());
    }
    let (kinds, _) = requests(&mut s);
    assert_eq!(kinds, ["envelope", "content"]);
    // Over the limit: aborted at once, read to the end, then refused.
    assert!(send(&mut s, &(line.clone() + &line)).is_empty());
    let (kinds, _) = requests(&mut s);
    assert_eq!(kinds, ["abort"]);
    assert!(send(&mut s, &line).is_empty());
    assert!(requests(&mut s).0.is_empty());
    assert_eq!(
        send(&mut s, ".\r\n"),
        ["552 5.3.4 Error: message file too big"]
    );
    assert!(requests(&mut s).0.is_empty());
    // The session goes on.
    assert_eq!(send(&mut s, "MAIL FROM:<a@b>\r\n"), ["250 2.1.0 Ok"]);
}

#[test]
fn too_many_recipients() {
    let mut s = session();
    send(&mut s, "MAIL FROM:<a@b>\r\n");
    for i in 0..3 {
        assert_eq!(
            send_opening(&mut s, &format!("RCPT TO:<u{i}@mx.example>\r\n")),
            ["250 2.1.5 Ok"]
        );
    }
    assert_eq!(
        send(&mut s, "RCPT TO:<u9@mx.example>\r\n"),
        ["452 4.5.3 Error: too many recipients"]
    );
    assert_eq!(s.error_count, 0);
}

#[test]
fn address_syntax() {
    let mut cfg = settings();
    cfg.hard_error_limit = 20;
    let mut s = session_with(cfg, "127.0.0.1");
    assert_eq!(
        send(&mut s, "MAIL FROM:<a b@c>\r\n"),
        ["501 5.1.7 Bad sender address syntax"]
    );
    assert_eq!(
        send(&mut s, "MAIL FROM:<a@c\r\n"),
        ["501 5.1.7 Bad sender address syntax"]
    );
    assert_eq!(
        send(&mut s, "MAIL FROM <a@c>\r\n"),
        ["501 5.5.4 Syntax: MAIL FROM:<address>"]
    );
    assert_eq!(
        send(&mut s, "MAIL FROM:<a@c> FOO=1\r\n"),
        ["555 5.5.4 Unsupported option: FOO=1"]
    );
    assert_eq!(send(&mut s, "mail from: <a@c>\r\n"), ["250 2.1.0 Ok"]);
    assert_eq!(
        send(&mut s, "RCPT TO:<>\r\n"),
        ["501 5.1.3 Bad recipient address syntax"]
    );
    assert_eq!(
        send(&mut s, "RCPT TO:<u@mx.example> NOTIFY=NEVER,DELAY\r\n"),
        ["501 5.5.4 Error: Bad NOTIFY parameter syntax"]
    );
    assert_eq!(
        send(&mut s, "RCPT TO:<u@mx.example> FOO\r\n"),
        ["555 5.5.4 Unsupported option: FOO"]
    );
    assert_eq!(
        send_opening(&mut s, "RCPT TO:u@mx.example\r\n"),
        ["250 2.1.5 Ok"]
    );
}

#[test]
fn rcpt_waits_for_dns_and_keeps_order() {
    let mut cfg = settings();
    let split = |s: &str| postern_conf::split_list(s);
    cfg.restrictions = Restrictions::new(
        crate::restrictions::parse_list(&split("permit_mynetworks, reject_unauth_destination")),
        crate::restrictions::parse_list(&split("reject_unknown_recipient_domain")),
        MatchList::parse("127.0.0.0/8", Kind::Address, false).unwrap(),
        split("mx.example"),
        vec![],
    )
    .unwrap();
    let mut s = session_with(cfg, "127.0.0.1");
    let r = send(
        &mut s,
        "MAIL FROM:<a@b>\r\nRCPT TO:<x@gone.example>\r\nRCPT TO:<u@mx.example>\r\nNOOP\r\n",
    );
    assert_eq!(r, ["250 2.1.0 Ok"]);
    assert_eq!(
        s.take_dns_requests(),
        [Query::Domain("gone.example".into())]
    );
    assert!(!s.wants_input());
    s.dns_answer(Query::Domain("gone.example".into()), Answer::NotFound);
    assert_eq!(
        out(&mut s),
        ["450 4.1.2 <x@gone.example>: Recipient address rejected: Domain not found"]
    );
    // The accepted recipient opens the queue file; then the NOOP.
    assert_eq!(opened(&mut s), ["250 2.1.5 Ok", "250 2.0.0 Ok"]);
    // The answer is kept: no second lookup.
    assert_eq!(
        send(&mut s, "RCPT TO:<y@gone.example>\r\n")[0],
        "450 4.1.2 <y@gone.example>: Recipient address rejected: Domain not found"
    );
    assert!(s.take_dns_requests().is_empty());
    assert!(s.stats().contains("rcpt=1/3"), "{}", s.stats());
}

#[test]
fn multiple_recipients_received_has_no_for() {
    let mut s = session();
    send(
        &mut s,
        "HELO c\r\nMAIL FROM:<a@b>\r\nRCPT TO:<u@mx.example>\r\nRCPT TO:<v@mx.example>\r\nDATA\r\n",
    );
    s.take_requests();
    opened(&mut s);
    send(&mut s, ".\r\n");
    let (_, content) = requests(&mut s);
    let content = String::from_utf8(content).unwrap();
    assert!(content.starts_with("Received: from c (unknown [127.0.0.1])\n\tby mx.example (Postern) with SMTP id QID1;\n\t"), "{content}");
    assert!(!content.contains("for <"));
}

#[test]
fn smtputf8_parameter_and_addresses() {
    let mut s = session();
    send(&mut s, "EHLO client.example\r\n");
    // A UTF-8 domain needs SMTPUTF8; a UTF-8 local part never did.
    assert_eq!(
        send(&mut s, "MAIL FROM:<a@bücher.example>\r\n"),
        ["501 5.1.7 Bad sender address syntax"]
    );
    assert_eq!(
        send(&mut s, "MAIL FROM:<jörg@b.example>\r\n"),
        ["250 2.1.0 Ok"]
    );
    assert_eq!(
        send(&mut s, "RCPT TO:<u@bücher.example>\r\n"),
        ["501 5.1.3 Bad recipient address syntax"]
    );
    send(&mut s, "RSET\r\n");
    assert_eq!(
        send(&mut s, "MAIL FROM:<jörg@bücher.example> SMTPUTF8\r\n"),
        ["250 2.1.0 Ok"]
    );
    assert_eq!(
        send(&mut s, "RCPT TO:<ü@bü..example>\r\n"),
        ["501 5.1.3 Bad recipient address syntax"]
    );
    assert_eq!(
        send(&mut s, "RCPT TO:<ü@mx.example>\r\n"),
        Vec::<String>::new()
    );
    assert_eq!(opened(&mut s), ["250 2.1.5 Ok"]);
    assert_eq!(
        send(&mut s, "DATA\r\n"),
        ["354 End data with <CR><LF>.<CR><LF>"]
    );
    let reqs = s.take_requests();
    let Some(CleanupRequest::Envelope(m)) = reqs.last() else {
        panic!("{reqs:?}")
    };
    assert_eq!(m.sender, "jörg@bücher.example");
    assert!(m.attrs.contains(&("smtputf8".into(), "requested".into())));
    send(&mut s, "Subject: x\r\n\r\nbody\r\n.\r\n");
    let (_, content) = requests(&mut s);
    let content = String::from_utf8(content).unwrap();
    assert!(content.contains("with UTF8SMTP id QID1"), "{content}");
    // Malformed UTF-8 is refused whatever the parameters.
    let mut s = session();
    s.receive(b"MAIL FROM:<j\xf6rg@b.example> SMTPUTF8\r\n");
    assert_eq!(out(&mut s), ["500 5.5.2 Error: bad UTF-8 syntax"]);
}

#[test]
fn smtputf8_disabled_and_strict() {
    let mut cfg = settings();
    cfg.smtputf8_enable = false;
    let mut s = session_with(cfg, "127.0.0.1");
    let ehlo = send(&mut s, "EHLO client.example\r\n");
    assert!(!ehlo.iter().any(|l| l.contains("SMTPUTF8")), "{ehlo:?}");
    assert_eq!(
        send(&mut s, "MAIL FROM:<a@b.example> SMTPUTF8\r\n"),
        ["555 5.5.4 Unsupported option: SMTPUTF8"]
    );
    let mut cfg = settings();
    cfg.strict_smtputf8 = true;
    let mut s = session_with(cfg, "127.0.0.1");
    send(&mut s, "EHLO client.example\r\n");
    assert_eq!(
        send(&mut s, "MAIL FROM:<jörg@b.example>\r\n"),
        ["553 5.6.7 Must declare SMTPUTF8 to send unicode address"]
    );
    assert_eq!(
        send(&mut s, "MAIL FROM:<a@b.example>\r\n"),
        ["250 2.1.0 Ok"]
    );
    assert_eq!(
        send(&mut s, "RCPT TO:<ü@mx.example>\r\n"),
        ["553 5.6.7 Must declare SMTPUTF8 to send unicode address"]
    );
}
