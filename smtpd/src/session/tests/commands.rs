//! The command loop: bad and unknown commands, the error limits,
//! the timeout, pipelining.

use super::*;

#[test]
fn pipelining_in_order_and_paused_while_waiting() {
    let mut s = session();
    // Everything at once, including the content and the next commands.
    let r = send(
        &mut s,
        "EHLO c\r\nMAIL FROM:<>\r\nRCPT TO:<x@far.example>\r\nRCPT TO:<u@mx.example>\r\nDATA\r\nbody\r\n.\r\nRSET\r\nQUIT\r\n",
    );
    assert_eq!(&r[9..], ["250 2.1.0 Ok"]);
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
fn timeout_reply() {
    let mut s = session();
    s.timeout();
    assert_eq!(
        out(&mut s),
        ["421 4.4.2 mx.example Error: timeout exceeded"]
    );
    assert!(s.is_done());
}

#[test]
fn etrn_syntax_state_and_eligibility() {
    // The test settings' hard error limit is 5: four errors here.
    let mut s = session();
    send(&mut s, "EHLO c\r\n");
    send(&mut s, "MAIL FROM:<>\r\n");
    assert_eq!(
        send(&mut s, "ETRN relay.example\r\n"),
        ["503 Error: MAIL transaction in progress"]
    );
    send(&mut s, "RSET\r\n");
    assert_eq!(send(&mut s, "ETRN\r\n"), ["500 Syntax: ETRN domain"]);
    assert_eq!(
        send(&mut s, "ETRN bad..example\r\n"),
        ["501 Error: invalid parameter syntax"]
    );
    // fast_flush_domains is relay.example in these settings.
    assert_eq!(
        send(&mut s, "ETRN far.example\r\n"),
        ["459 <far.example>: service unavailable"]
    );
}
