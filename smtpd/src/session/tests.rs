use super::cleanup::{failure_reply, WRITE_ERROR};
use super::*;
use crate::restrictions::Restrictions;
use crate::restrictions::Stage;
use crate::sasl::SaslReply;
use postern_common::cidr::CidrList;
use postern_common::ipc::CleanupReply;
use std::path::PathBuf;
use std::time::Duration;

fn settings() -> Settings {
    let split = |s: &str| postern_conf::split_list(s);
    Settings {
        myhostname: "mx.example".into(),
        mail_name: "Postern".into(),
        banner: "mx.example ESMTP Postern".into(),
        message_size_limit: 1000,
        queue_directory: std::env::temp_dir(),
        queue_minfree: 0,
        recipient_limit: 3,
        hard_error_limit: 5,
        soft_error_limit: 3,
        error_sleep: Duration::ZERO,
        helo_required: false,
        disable_vrfy: false,
        line_limit: 2048,
        restrictions: Restrictions::new(
            crate::restrictions::parse_list(&split(
                "permit_mynetworks, permit_sasl_authenticated, reject_unauth_destination",
            )),
            vec![],
            CidrList::parse(&["127.0.0.0/8"]).unwrap(),
            split("mx.example, localhost"),
            vec![],
        )
        .unwrap(),
        timeout: Duration::from_secs(300),
        ipc_timeout: Duration::from_secs(300),
        max_idle: Duration::from_secs(100),
        session_limit: 10,
        cleanup_socket: PathBuf::from("/nonexistent"),
        tls_level: TlsLevel::None,
        tls: None,
        tls_wrappermode: false,
        tls_auth_only: false,
        tls_received_header: false,
        sasl: None,
        sasl_service: "smtp".into(),
        sasl_authenticated_header: false,
        broken_sasl_auth_clients: false,
        dns_servers: vec![],
        dns_timeout: Duration::from_secs(5),
        peername_lookup: false,
        delay_open_until_valid_rcpt: true,
        anvil: Default::default(),
        service: "smtp".into(),
        smtputf8_enable: true,
        strict_smtputf8: false,
    }
}

fn session_with(s: Settings, ip: &str) -> Session {
    let mut s = Session::new(Arc::new(s), Client::new(ip.parse().unwrap()));
    let greeting = out(&mut s);
    assert_eq!(greeting, ["220 mx.example ESMTP Postern"]);
    s
}

fn session() -> Session {
    session_with(settings(), "127.0.0.1")
}

fn out(s: &mut Session) -> Vec<String> {
    let o = String::from_utf8(s.take_output()).unwrap();
    o.split_terminator("\r\n").map(|l| l.to_string()).collect()
}

fn send(s: &mut Session, text: &str) -> Vec<String> {
    s.receive(text.as_bytes());
    out(s)
}

/// As [`send`], with cleanup answering Open at once: for tests about
/// something else than the opening of the queue file.
fn send_opening(s: &mut Session, text: &str) -> Vec<String> {
    s.receive(text.as_bytes());
    let mut o = out(s);
    while matches!(s.state, State::WaitOpened(_)) {
        o.extend(opened(s));
    }
    o
}

/// Content requests sent so far, concatenated; asserts the order of
/// the other requests.
fn requests(s: &mut Session) -> (Vec<&'static str>, Vec<u8>) {
    let mut kinds = Vec::new();
    let mut content = Vec::new();
    for r in s.take_requests() {
        match r {
            CleanupRequest::Open => kinds.push("open"),
            CleanupRequest::Envelope(_) => kinds.push("envelope"),
            CleanupRequest::Content(c) => {
                kinds.push("content");
                content.extend(c);
            }
            CleanupRequest::Close => kinds.push("close"),
            CleanupRequest::Abort => kinds.push("abort"),
        }
    }
    kinds.dedup();
    (kinds, content)
}

fn opened(s: &mut Session) -> Vec<String> {
    s.cleanup_reply(CleanupReply::Opened {
        queue_id: "QID1".into(),
    });
    out(s)
}

fn queued(s: &mut Session) -> Vec<String> {
    s.cleanup_reply(CleanupReply::Queued {
        queue_id: "QID1".into(),
    });
    out(s)
}

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
fn pipelining_in_order_and_paused_while_waiting() {
    let mut s = session();
    // Everything at once, including the content and the next commands.
    let r = send(
        &mut s,
        "EHLO c\r\nMAIL FROM:<>\r\nRCPT TO:<x@far.example>\r\nRCPT TO:<u@mx.example>\r\nDATA\r\nbody\r\n.\r\nRSET\r\nQUIT\r\n",
    );
    assert_eq!(&r[8..], ["250 2.1.0 Ok"]);
    let (kinds, _) = requests(&mut s);
    assert_eq!(kinds, ["open"]);
    // The rest waited for the queue file; the RSET and QUIT then for
    // the 250.
    assert_eq!(
        opened(&mut s),
        [
            "250 2.1.5 Ok",
            "250 2.1.5 Ok",
            "354 End data with <CR><LF>.<CR><LF>"
        ]
    );
    let (kinds, content) = requests(&mut s);
    assert_eq!(kinds, ["envelope", "content", "close"]);
    assert!(content.ends_with(b"\nbody\n"));
    assert_eq!(
        queued(&mut s),
        [
            "250 2.0.0 Ok: queued as QID1",
            "250 2.0.0 Ok",
            "221 2.0.0 Bye"
        ]
    );
    assert!(s.is_done());
}

#[test]
fn pipelined_replies_keep_order() {
    let mut s = session();
    let r = send(
        &mut s,
        "HELO c\r\nRCPT TO:<a@b>\r\nMAIL FROM:<a@b>\r\nMAIL FROM:<a@b>\r\nNOOP\r\nXYZZY\r\nRSET\r\n",
    );
    assert_eq!(
        r,
        [
            "250 mx.example",
            "503 5.5.1 Error: need MAIL command",
            "250 2.1.0 Ok",
            "503 5.5.1 Error: nested MAIL command",
            "250 2.0.0 Ok",
            "500 5.5.2 Error: command not recognized",
            "250 2.0.0 Ok"
        ]
    );
    // A command split over two reads.
    assert_eq!(send(&mut s, "NO"), Vec::<String>::new());
    assert_eq!(send(&mut s, "OP\r"), Vec::<String>::new());
    assert_eq!(send(&mut s, "\n"), ["250 2.0.0 Ok"]);
    // Bare LF ends a command too.
    assert_eq!(send(&mut s, "NOOP\n"), ["250 2.0.0 Ok"]);
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
        &r[8..],
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
fn data_errors() {
    let mut s = session();
    assert_eq!(
        send(&mut s, "DATA\r\n"),
        ["503 5.5.1 Error: need RCPT command"]
    );
    send(&mut s, "MAIL FROM:<a@b>\r\n");
    assert_eq!(
        send(&mut s, "DATA\r\n"),
        ["554 5.5.1 Error: no valid recipients"]
    );
    send_opening(&mut s, "RCPT TO:<u@mx.example>\r\n");
    assert_eq!(send(&mut s, "DATA x\r\n"), ["501 5.5.4 Syntax: DATA"]);
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
fn error_limit_hangs_up() {
    let mut s = session();
    let r = send(&mut s, "A\r\nB\r\nC\r\nD\r\nE\r\nF\r\n");
    assert_eq!(r.len(), 6);
    assert_eq!(r[5], "421 4.7.0 mx.example Error: too many errors");
    assert!(s.is_done());
    assert_eq!(s.reason, Some("too many errors"));
    assert_eq!(s.stats(), " unknown=0/5 commands=0/5");
}

#[test]
fn bad_commands() {
    let mut cfg = settings();
    cfg.hard_error_limit = 20;
    let mut s = session_with(cfg, "127.0.0.1");
    assert_eq!(send(&mut s, "NOOP\0x\r\n"), ["500 5.5.2 Error: bad syntax"]);
    assert_eq!(send(&mut s, "\r\n"), ["500 5.5.2 Error: bad syntax"]);
    s.receive(b"NOOP \xff\r\n");
    assert_eq!(out(&mut s), ["500 5.5.2 Error: bad UTF-8 syntax"]);
    let long = "NOOP ".to_string() + &"x".repeat(3000) + "\r\n";
    assert_eq!(
        send(&mut s, &long),
        ["500 5.5.2 mx.example Error: command too long"]
    );
    // Arriving in pieces, longer than the limit before its end.
    assert!(send(&mut s, &"y".repeat(2500)).is_empty());
    assert!(send(&mut s, &"y".repeat(2500)).is_empty());
    assert_eq!(
        send(&mut s, "y\r\nNOOP\r\n"),
        [
            "500 5.5.2 mx.example Error: command too long",
            "250 2.0.0 Ok"
        ]
    );
    assert_eq!(
        send(&mut s, "STARTTLS\r\n"),
        ["502 5.5.1 Error: command not implemented"]
    );
    assert_eq!(s.error_count, 6);
}

#[test]
fn header_as_command_ends_session() {
    let mut s = session();
    assert_eq!(
        send(&mut s, "Subject: hello\r\nNOOP\r\n"),
        ["221 2.7.0 Error: I can break rules, too. Goodbye."]
    );
    assert!(s.is_done());
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
fn smuggled_dot_does_not_end_data() {
    let mut s = session();
    send(
        &mut s,
        "EHLO c\r\nMAIL FROM:<a@b>\r\nRCPT TO:<u@mx.example>\r\nDATA\r\n",
    );
    s.take_requests();
    opened(&mut s);
    let r = send(
        &mut s,
        "x\n.\nMAIL FROM:<evil@x>\r\nRCPT TO:<v@mx.example>\r\nDATA\r\nevil\r\n",
    );
    assert!(r.is_empty(), "{r:?}");
    assert!(s.wants_input());
    assert_eq!(send(&mut s, ".\r\n"), Vec::<String>::new());
    let (kinds, content) = requests(&mut s);
    assert_eq!(kinds, ["envelope", "content", "close"]);
    assert!(content.ends_with(b"\nx\nMAIL FROM:<evil@x>\nRCPT TO:<v@mx.example>\nDATA\nevil\n"));
}

#[test]
fn end_of_data_split_across_reads() {
    let mut s = session();
    send(
        &mut s,
        "EHLO c\r\nMAIL FROM:<a@b>\r\nRCPT TO:<u@mx.example>\r\nDATA\r\n",
    );
    s.take_requests();
    opened(&mut s);
    for piece in ["text\r", "\n", ".", "\r", "\nNO", "OP\r\n"] {
        assert!(send(&mut s, piece).is_empty());
    }
    let (kinds, content) = requests(&mut s);
    assert_eq!(kinds, ["envelope", "content", "close"]);
    assert!(content.ends_with(b"\ntext\n"));
    assert_eq!(
        queued(&mut s),
        ["250 2.0.0 Ok: queued as QID1", "250 2.0.0 Ok"]
    );
}

#[test]
fn cleanup_failures() {
    // Unreachable at the first RCPT: the recipient is refused, and
    // the pipelined DATA with it.
    let mut s = session();
    send(
        &mut s,
        "MAIL FROM:<a@b>\r\nRCPT TO:<u@mx.example>\r\nDATA\r\nRSET\r\n",
    );
    assert_eq!(requests(&mut s).0, ["open"]);
    s.cleanup_lost();
    assert_eq!(
        out(&mut s),
        [
            WRITE_ERROR,
            "554 5.5.1 Error: no valid recipients",
            "250 2.0.0 Ok"
        ]
    );
    // Refused by cleanup at the first RCPT: the next one tries again.
    send(&mut s, "MAIL FROM:<a@b>\r\nRCPT TO:<u@mx.example>\r\n");
    s.take_requests();
    s.cleanup_reply(CleanupReply::Failed {
        temporary: true,
        dsn: "4.3.1".into(),
        reason: "Insufficient system storage".into(),
    });
    assert_eq!(out(&mut s), ["452 4.3.1 Insufficient system storage"]);
    send(&mut s, "RCPT TO:<v@mx.example>\r\n");
    assert_eq!(requests(&mut s).0, ["open"]);
    assert_eq!(opened(&mut s), ["250 2.1.5 Ok"]);
    // Lost between RCPT and DATA: DATA opens another file.
    s.cleanup_lost();
    assert!(out(&mut s).is_empty());
    assert!(send(&mut s, "DATA\r\n").is_empty());
    assert_eq!(requests(&mut s).0, ["open"]);
    assert_eq!(opened(&mut s), ["354 End data with <CR><LF>.<CR><LF>"]);
    let reqs = s.take_requests();
    let CleanupRequest::Envelope(m) = &reqs[0] else {
        panic!("{reqs:?}")
    };
    let rcpts: Vec<_> = m.recipients.iter().map(|r| r.address.as_str()).collect();
    assert_eq!(rcpts, ["v@mx.example"]);
    // Lost during the content: read to the end, then 451.
    send(&mut s, "a\r\n");
    s.cleanup_lost();
    assert!(send(&mut s, "b\r\n").is_empty());
    assert_eq!(send(&mut s, ".\r\n"), [WRITE_ERROR]);
    // Refused at the end (the errors so far forgiven, not to reach the
    // hard limit).
    s.error_count = 0;
    send(
        &mut s,
        "MAIL FROM:<a@b>\r\nRCPT TO:<u@mx.example>\r\nDATA\r\n",
    );
    assert_eq!(
        opened(&mut s),
        ["250 2.1.5 Ok", "354 End data with <CR><LF>.<CR><LF>"]
    );
    send(&mut s, "a\r\n.\r\n");
    s.cleanup_reply(CleanupReply::Failed {
        temporary: false,
        dsn: "5.4.6".into(),
        reason: "too many hops".into(),
    });
    assert_eq!(out(&mut s), ["554 5.4.6 Error: too many hops"]);
    assert_eq!(
        failure_reply(true, "", ""),
        "451 4.3.0 Error: queue file write error"
    );
    assert_eq!(
        failure_reply(false, "5.3.4", "message file too big"),
        "552 5.3.4 Error: message file too big"
    );
}

#[test]
fn queue_file_opened_at_mail_without_delay_and_given_up_by_rset() {
    let mut cfg = settings();
    cfg.delay_open_until_valid_rcpt = false;
    let mut s = session_with(cfg, "192.0.2.7");
    assert!(send(&mut s, "MAIL FROM:<a@b>\r\n").is_empty());
    assert_eq!(requests(&mut s).0, ["open"]);
    assert_eq!(opened(&mut s), ["250 2.1.0 Ok"]);
    // Recipients, refused or not, no longer wait for cleanup.
    assert_eq!(
        send(
            &mut s,
            "RCPT TO:<x@far.example>\r\nRCPT TO:<u@mx.example>\r\n"
        ),
        [
            "554 5.7.1 <x@far.example>: Relay access denied",
            "250 2.1.5 Ok"
        ]
    );
    assert!(requests(&mut s).0.is_empty());
    // RSET gives the file up, and so does a new EHLO.
    assert_eq!(send(&mut s, "RSET\r\n"), ["250 2.0.0 Ok"]);
    assert_eq!(requests(&mut s).0, ["abort"]);
    send(&mut s, "MAIL FROM:<a@b>\r\n");
    opened(&mut s);
    send(&mut s, "EHLO c\r\n");
    assert_eq!(requests(&mut s).0, ["open", "abort"]);
}

#[test]
fn a_session_that_went_on_has_given_its_connection_up() {
    let mut s = session();
    send(
        &mut s,
        "MAIL FROM:<a@b>\r\nRCPT TO:<u@mx.example>\r\nRSET\r\nMAIL FROM:<a@b>\r\nRCPT TO:<v@mx.example>\r\n",
    );
    s.take_requests();
    assert!(!s.gave_up_cleanup());
    // Opened, and the pipelined commands run: RSET gives this file up
    // and the next RCPT asks for another, on a new connection. The old
    // one closing now must not fail the new request.
    assert_eq!(
        opened(&mut s),
        ["250 2.1.5 Ok", "250 2.0.0 Ok", "250 2.1.0 Ok"]
    );
    assert!(s.gave_up_cleanup());
    assert_eq!(requests(&mut s).0, ["abort", "open"]);
    assert!(s.waiting_on_cleanup());
}

#[test]
fn a_refused_recipient_opens_nothing() {
    let mut s = session_with(settings(), "192.0.2.7");
    assert_eq!(
        send(
            &mut s,
            "MAIL FROM:<a@b>\r\nRCPT TO:<x@far.example>\r\nQUIT\r\n"
        ),
        [
            "250 2.1.0 Ok",
            "554 5.7.1 <x@far.example>: Relay access denied",
            "221 2.0.0 Bye"
        ]
    );
    s.finish();
    assert!(requests(&mut s).0.is_empty());
}

#[test]
fn a_client_that_leaves_after_rcpt_gives_the_file_up() {
    let mut s = session();
    send_opening(&mut s, "MAIL FROM:<a@b>\r\nRCPT TO:<u@mx.example>\r\n");
    s.take_requests();
    s.client_eof();
    s.finish();
    assert_eq!(requests(&mut s).0, ["abort"]);
}

#[test]
fn client_leaves_mid_data() {
    let mut s = session();
    send(
        &mut s,
        "MAIL FROM:<a@b>\r\nRCPT TO:<u@mx.example>\r\nDATA\r\n",
    );
    s.take_requests();
    opened(&mut s);
    send(&mut s, "partial\r\n");
    s.take_requests();
    s.client_eof();
    let (kinds, _) = requests(&mut s);
    assert_eq!(kinds, ["abort"]);
    assert!(s.is_done());
    assert_eq!(s.where_, "DATA");
    assert_eq!(s.reason, Some("lost connection"));
    s.finish();
}

#[test]
fn timeout_reply() {
    let mut s = session();
    s.timeout();
    assert_eq!(
        out(&mut s),
        ["421 4.4.2 mx.example Error: timeout exceeded"]
    );
    assert!(s.is_done());
}

fn sasl_settings() -> Settings {
    let mut cfg = settings();
    cfg.sasl = Some(crate::sasl::AuthTarget::Unix("/nonexistent".into()));
    cfg.hard_error_limit = 20;
    cfg
}

#[test]
fn auth_exchange_and_relay() {
    let mut s = session_with(sasl_settings(), "192.0.2.7");
    // EHLO waits for the mechanism list.
    assert!(send(&mut s, "EHLO c\r\nNOOP\r\n").is_empty());
    assert_eq!(s.take_sasl_requests(), [SaslRequest::Mechs]);
    assert!(!s.wants_input());
    s.sasl_mechs(Some(vec!["PLAIN".into(), "LOGIN".into()]));
    let r = out(&mut s);
    assert!(r.contains(&"250-AUTH PLAIN LOGIN".to_string()), "{r:?}");
    assert_eq!(r.last().unwrap(), "250 2.0.0 Ok");
    // Unknown mechanism.
    assert_eq!(
        send(&mut s, "AUTH CRAM-MD5\r\n"),
        ["535 5.7.8 Error: authentication failed: Invalid authentication mechanism"]
    );
    // LOGIN: two challenges, the client's lines go to the server.
    assert!(send(&mut s, "AUTH LOGIN\r\n").is_empty());
    let reqs = s.take_sasl_requests();
    assert!(
        matches!(&reqs[..], [SaslRequest::Start { mech, resp: None, secured: false, .. }] if mech == "LOGIN")
    );
    s.sasl_reply(SaslReply::Cont("VXNlcm5hbWU6".into()));
    assert_eq!(out(&mut s), ["334 VXNlcm5hbWU6"]);
    assert!(send(&mut s, "YWxpY2U=\r\n").is_empty());
    assert_eq!(
        s.take_sasl_requests(),
        [SaslRequest::Continue("YWxpY2U=".into())]
    );
    s.sasl_reply(SaslReply::Cont("UGFzc3dvcmQ6".into()));
    assert_eq!(out(&mut s), ["334 UGFzc3dvcmQ6"]);
    assert_eq!(send(&mut s, "*\r\n"), ["501 5.7.0 Authentication aborted"]);
    assert_eq!(s.take_sasl_requests(), [SaslRequest::Abort]);
    // Failure, then success; relaying only after.
    send(&mut s, "AUTH PLAIN AGFsaWNlAGJhZA==\r\n");
    s.take_sasl_requests();
    s.sasl_reply(SaslReply::Fail(String::new()));
    assert_eq!(out(&mut s), ["535 5.7.8 Error: authentication failed: "]);
    let r = send(
        &mut s,
        "MAIL FROM:<a@b> AUTH=<>\r\nRCPT TO:<x@far.example>\r\nRSET\r\n",
    );
    assert_eq!(r[1], "554 5.7.1 <x@far.example>: Relay access denied");
    send(&mut s, "AUTH PLAIN AGFsaWNlAGdvb2Q=\r\n");
    s.take_sasl_requests();
    s.sasl_reply(SaslReply::Ok("alice".into()));
    assert_eq!(out(&mut s), ["235 2.7.0 Authentication successful"]);
    assert_eq!(
        send(&mut s, "AUTH PLAIN AGFsaWNlAGdvb2Q=\r\n"),
        ["503 5.5.1 Error: already authenticated"]
    );
    let r = send_opening(&mut s, "MAIL FROM:<a@b>\r\nRCPT TO:<x@far.example>\r\n");
    assert_eq!(r, ["250 2.1.0 Ok", "250 2.1.5 Ok"]);
    assert_eq!(s.protocol(), "ESMTPA");
}

#[test]
fn auth_not_offered() {
    let mut s = session();
    assert_eq!(
        send(&mut s, "EHLO c\r\nAUTH PLAIN\r\n").last().unwrap(),
        "503 5.5.1 Error: authentication not enabled"
    );
    let mut cfg = sasl_settings();
    cfg.tls_auth_only = true;
    let mut s = session_with(cfg, "127.0.0.1");
    let r = send(&mut s, "EHLO c\r\n");
    assert!(!r.iter().any(|l| l.contains("AUTH")), "{r:?}");
    assert!(s.take_sasl_requests().is_empty());
}

#[test]
fn starttls_state() {
    let mut cfg = settings();
    cfg.tls_level = TlsLevel::Encrypt;
    let mut s = session_with(cfg, "127.0.0.1");
    // No certificate loaded: not offered, a local problem.
    let r = send(&mut s, "EHLO c\r\nMAIL FROM:<a@b>\r\nSTARTTLS\r\n");
    assert!(!r.iter().any(|l| l.starts_with("250-STARTTLS")), "{r:?}");
    assert_eq!(
        &r[r.len() - 2..],
        [
            "530 5.7.0 Must issue a STARTTLS command first",
            "454 4.7.0 TLS not available due to local problem"
        ]
    );
}

#[test]
fn starttls_discards_pipelined_input_and_resets() {
    let mut cfg = settings();
    cfg.tls_level = TlsLevel::May;
    // Any certificate will do: the session only needs to know TLS is on.
    cfg.tls = Some(test_tls_config());
    let mut s = session_with(cfg, "127.0.0.1");
    let r = send(
        &mut s,
        "EHLO c\r\nMAIL FROM:<a@b>\r\nSTARTTLS\r\nRCPT TO:<u@mx.example>\r\n",
    );
    assert!(r.contains(&"250-STARTTLS".to_string()));
    assert_eq!(
        &r[r.len() - 2..],
        ["250 2.1.0 Ok", "220 2.0.0 Ready to start TLS"]
    );
    assert!(s.starttls_requested());
    assert!(!s.wants_input());
    assert!(send(&mut s, "NOOP\r\n").is_empty());
    s.tls_started();
    s.tls_established(Negotiated {
        protocol: "TLSv1.3".into(),
        cipher: "TLS_AES_256_GCM_SHA384".into(),
        bits: 256,
        kx: None,
    });
    // The transaction and the pipelined RCPT are gone.
    assert_eq!(
        send(&mut s, "RCPT TO:<u@mx.example>\r\n"),
        ["503 5.5.1 Error: need MAIL command"]
    );
    let r = send(&mut s, "EHLO c\r\n");
    assert!(!r.iter().any(|l| l.contains("STARTTLS")), "{r:?}");
    assert_eq!(
        send(&mut s, "STARTTLS\r\n"),
        ["554 5.5.1 Error: TLS already active"]
    );
    assert_eq!(s.protocol(), "ESMTPS");
}

const TEST_KEY: &[u8] = &[
    0x30, 0x81, 0x87, 0x02, 0x01, 0x00, 0x30, 0x13, 0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02,
    0x01, 0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07, 0x04, 0x6d, 0x30, 0x6b, 0x02,
    0x01, 0x01, 0x04, 0x20, 0x9e, 0xc0, 0x61, 0xfc, 0x74, 0x75, 0x32, 0xae, 0x57, 0x27, 0x84, 0x45,
    0x36, 0x96, 0x36, 0xa1, 0xfa, 0xcb, 0xd2, 0x7d, 0x7e, 0x62, 0x31, 0x8d, 0xb6, 0x5e, 0x77, 0x8f,
    0x1d, 0x72, 0x0a, 0xbf, 0xa1, 0x44, 0x03, 0x42, 0x00, 0x04, 0xeb, 0x08, 0xef, 0x71, 0x8d, 0xcb,
    0xd0, 0x07, 0x38, 0xfb, 0x8a, 0x15, 0xa5, 0xd6, 0x07, 0xc6, 0x25, 0xae, 0x08, 0xce, 0x4a, 0x31,
    0xe0, 0x00, 0x93, 0x2e, 0x9c, 0x60, 0x5d, 0x6d, 0x4e, 0xc4, 0xf0, 0x4d, 0xa2, 0x4c, 0x05, 0xb4,
    0x27, 0x06, 0x9d, 0x9e, 0x50, 0xb1, 0x38, 0x9c, 0xf9, 0x4a, 0xb1, 0xef, 0xd0, 0x2c, 0xa0, 0xd3,
    0xf7, 0xff, 0x7d, 0x95, 0x08, 0xd9, 0x7c, 0xc2, 0xe3, 0x41,
];
const TEST_CERT: &[u8] = &[
    0x30, 0x82, 0x01, 0x75, 0x30, 0x82, 0x01, 0x1b, 0xa0, 0x03, 0x02, 0x01, 0x02, 0x02, 0x14, 0x18,
    0xff, 0x56, 0xec, 0x59, 0x46, 0x62, 0x14, 0xd3, 0x0c, 0xa7, 0x8e, 0x83, 0x56, 0xce, 0xec, 0xde,
    0x08, 0x9e, 0xf8, 0x30, 0x0a, 0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x03, 0x02, 0x30,
    0x0f, 0x31, 0x0d, 0x30, 0x0b, 0x06, 0x03, 0x55, 0x04, 0x03, 0x0c, 0x04, 0x74, 0x65, 0x73, 0x74,
    0x30, 0x20, 0x17, 0x0d, 0x32, 0x36, 0x31, 0x31, 0x32, 0x32, 0x31, 0x34, 0x35, 0x35, 0x34, 0x31,
    0x5a, 0x18, 0x0f, 0x32, 0x31, 0x32, 0x36, 0x31, 0x30, 0x32, 0x39, 0x31, 0x34, 0x35, 0x35, 0x34,
    0x31, 0x5a, 0x30, 0x0f, 0x31, 0x0d, 0x30, 0x0b, 0x06, 0x03, 0x55, 0x04, 0x03, 0x0c, 0x04, 0x74,
    0x65, 0x73, 0x74, 0x30, 0x59, 0x30, 0x13, 0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01,
    0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07, 0x03, 0x42, 0x00, 0x04, 0xeb, 0x08,
    0xef, 0x71, 0x8d, 0xcb, 0xd0, 0x07, 0x38, 0xfb, 0x8a, 0x15, 0xa5, 0xd6, 0x07, 0xc6, 0x25, 0xae,
    0x08, 0xce, 0x4a, 0x31, 0xe0, 0x00, 0x93, 0x2e, 0x9c, 0x60, 0x5d, 0x6d, 0x4e, 0xc4, 0xf0, 0x4d,
    0xa2, 0x4c, 0x05, 0xb4, 0x27, 0x06, 0x9d, 0x9e, 0x50, 0xb1, 0x38, 0x9c, 0xf9, 0x4a, 0xb1, 0xef,
    0xd0, 0x2c, 0xa0, 0xd3, 0xf7, 0xff, 0x7d, 0x95, 0x08, 0xd9, 0x7c, 0xc2, 0xe3, 0x41, 0xa3, 0x53,
    0x30, 0x51, 0x30, 0x1d, 0x06, 0x03, 0x55, 0x1d, 0x0e, 0x04, 0x16, 0x04, 0x14, 0x28, 0xbe, 0x60,
    0x76, 0x00, 0xaa, 0xfa, 0x3c, 0x48, 0x76, 0xcc, 0x21, 0x96, 0xb7, 0xe3, 0x4b, 0xd4, 0xdb, 0xf5,
    0xd9, 0x30, 0x1f, 0x06, 0x03, 0x55, 0x1d, 0x23, 0x04, 0x18, 0x30, 0x16, 0x80, 0x14, 0x28, 0xbe,
    0x60, 0x76, 0x00, 0xaa, 0xfa, 0x3c, 0x48, 0x76, 0xcc, 0x21, 0x96, 0xb7, 0xe3, 0x4b, 0xd4, 0xdb,
    0xf5, 0xd9, 0x30, 0x0f, 0x06, 0x03, 0x55, 0x1d, 0x13, 0x01, 0x01, 0xff, 0x04, 0x05, 0x30, 0x03,
    0x01, 0x01, 0xff, 0x30, 0x0a, 0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x03, 0x02, 0x03,
    0x48, 0x00, 0x30, 0x45, 0x02, 0x21, 0x00, 0xd5, 0xa7, 0x17, 0xf5, 0x48, 0x8d, 0xf0, 0x48, 0x4a,
    0xd9, 0xa5, 0xc4, 0x60, 0x2b, 0x9e, 0x34, 0x87, 0x24, 0xe1, 0x12, 0x10, 0xe7, 0xde, 0x6c, 0xcc,
    0xb6, 0x67, 0xe4, 0xc9, 0x8c, 0x00, 0xb8, 0x02, 0x20, 0x27, 0x3c, 0x0a, 0x75, 0x1d, 0xf8, 0xa7,
    0xa5, 0xb2, 0x24, 0x5d, 0x55, 0xe5, 0x9e, 0xde, 0x29, 0xca, 0xb2, 0x05, 0x0c, 0x3f, 0x84, 0x0e,
    0xbd, 0x52, 0xff, 0x7e, 0xc9, 0xe1, 0xec, 0x4a, 0xc6,
];

/// A server configuration from a throwaway key and certificate
/// (made with `openssl req -x509 -newkey ec`).
fn test_tls_config() -> Arc<postern_common::tls::rustls::ServerConfig> {
    use postern_common::tls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
    // A P-256 key (PKCS#8) and its self-signed certificate.
    let key = PrivateKeyDer::try_from(TEST_KEY.to_vec()).unwrap();
    let cert = CertificateDer::from(TEST_CERT.to_vec());
    postern_common::tls::rustls::ServerConfig::builder_with_provider(
        postern_common::tls::provider(),
    )
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(vec![cert], key)
    .map(Arc::new)
    .unwrap_or_else(|e| panic!("{e}"))
}

#[test]
fn rcpt_waits_for_dns_and_keeps_order() {
    let mut cfg = settings();
    let split = |s: &str| postern_conf::split_list(s);
    cfg.restrictions = Restrictions::new(
        crate::restrictions::parse_list(&split("permit_mynetworks, reject_unauth_destination")),
        crate::restrictions::parse_list(&split("reject_unknown_recipient_domain")),
        CidrList::parse(&["127.0.0.0/8"]).unwrap(),
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
