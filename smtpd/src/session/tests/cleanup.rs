//! The queue file through cleanup: when it is opened and given up,
//! the content, and the replies to cleanup's failures.

use super::*;

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
fn xforward_names_the_original_client() {
    // Not an authorized host: not offered, refused.
    let mut s = session();
    let ehlo = send(&mut s, "EHLO filter.test\r\n");
    assert!(!ehlo.iter().any(|l| l.contains("XFORWARD")), "{ehlo:?}");
    assert_eq!(
        send(&mut s, "XFORWARD ADDR=192.0.2.7\r\n"),
        ["550 5.7.0 Error: insufficient authorization"]
    );
    // An authorized one (127.0.0.2 in the test settings).
    let mut s = session_with(settings(), "127.0.0.2");
    let ehlo = send(&mut s, "EHLO filter.test\r\n");
    assert!(ehlo.contains(&"250-XFORWARD NAME ADDR PROTO HELO SOURCE PORT IDENT".to_string()));
    assert_eq!(
        send(
            &mut s,
            "XFORWARD NAME=mail.example ADDR=IPv6:2001:db8::7 PORT=4321 PROTO=ESMTP\r\n"
        ),
        ["250 2.0.0 Ok"]
    );
    assert_eq!(
        send(
            &mut s,
            "XFORWARD HELO=client.example IDENT=ABC123 SOURCE=REMOTE\r\n"
        ),
        ["250 2.0.0 Ok"]
    );
    assert_eq!(
        send(&mut s, "XFORWARD ADDR=not-an-address\r\n"),
        ["501 5.5.4 Bad ADDR syntax: not-an-address"]
    );
    send_opening(
        &mut s,
        "MAIL FROM:<a@b.example>\r\nRCPT TO:<v@mx.example>\r\n",
    );
    assert_eq!(
        send(&mut s, "XFORWARD NAME=x\r\n"),
        ["503 5.5.1 Error: MAIL transaction in progress"]
    );
    send(&mut s, "DATA\r\n");
    let reqs = s.take_requests();
    let Some(CleanupRequest::Envelope(m)) = reqs
        .iter()
        .find(|r| matches!(r, CleanupRequest::Envelope(_)))
    else {
        panic!("{reqs:?}")
    };
    let attr = |n: &str| {
        m.attrs
            .iter()
            .find(|(k, _)| k == n)
            .map(|(_, v)| v.as_str())
    };
    assert_eq!(attr("client"), Some("mail.example[2001:db8::7]"));
    assert_eq!(attr("helo"), Some("client.example"));
    assert_eq!(attr("client_port"), Some("4321"));
    assert_eq!(attr("source"), Some("REMOTE"));
}

/// smtpd's side of cleanup over a real socket, with a listener in the
/// place of cleanup's: a session, its link and the process's pool.
struct CleanupPeer {
    dir: std::path::PathBuf,
    listener: std::os::unix::net::UnixListener,
    cfg: Settings,
    poll: mio::Poll,
    registry: mio::Registry,
    pool: crate::cleanup_conn::CleanupPool,
    buf: Vec<u8>,
}

impl CleanupPeer {
    fn new(name: &str) -> CleanupPeer {
        let dir = std::env::temp_dir().join(format!("postern-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let listener = std::os::unix::net::UnixListener::bind(dir.join("cleanup")).unwrap();
        listener.set_nonblocking(true).unwrap();
        let mut cfg = settings();
        cfg.cleanup_socket = dir.join("cleanup");
        let poll = mio::Poll::new().unwrap();
        let registry = poll.registry().try_clone().unwrap();
        CleanupPeer {
            dir,
            listener,
            cfg,
            poll,
            registry,
            pool: Default::default(),
            buf: vec![0u8; 4096],
        }
    }

    /// One turn of the session's requests and cleanup's replies.
    fn turn(&mut self, s: &mut Session, link: &mut crate::cleanup_conn::CleanupLink) {
        let token = mio::Token(2);
        if let Some(c) = &mut link.conn {
            c.readable = true;
        }
        let mut last_io = std::time::Instant::now();
        link.send_requests(s, token, &self.registry, &self.cfg, &mut self.pool);
        link.exchange(
            s,
            &self.registry,
            &self.cfg,
            &mut self.buf,
            &mut last_io,
            &mut self.pool,
        );
    }

    /// A session through EHLO, MAIL and RCPT, its Open sent.
    fn session_at_rcpt(&mut self) -> (Session, crate::cleanup_conn::CleanupLink) {
        let mut s = session();
        let mut link = crate::cleanup_conn::CleanupLink::default();
        send(
            &mut s,
            "EHLO c\r\nMAIL FROM:<a@b>\r\nRCPT TO:<u@mx.example>\r\n",
        );
        self.turn(&mut s, &mut link);
        (s, link)
    }

    /// cleanup answers the Open; the session answers its RCPT.
    fn answer_open(
        &mut self,
        server: &mut std::os::unix::net::UnixStream,
        id: &str,
        s: &mut Session,
        link: &mut crate::cleanup_conn::CleanupLink,
    ) {
        let queue_id = id.to_string();
        postern_common::ipc::send(server, &CleanupReply::Opened { queue_id }).unwrap();
        self.turn(s, link);
        assert_eq!(out(s), ["250 2.1.5 Ok"]);
    }

    /// A new connection from smtpd, if there is one.
    fn accept(&self) -> Option<std::os::unix::net::UnixStream> {
        match self.listener.accept() {
            Ok((c, _)) => {
                c.set_nonblocking(true).unwrap();
                Some(c)
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => None,
            Err(e) => panic!("{e}"),
        }
    }

    /// The requests one read on cleanup's end gets.
    fn frames(server: &mut std::os::unix::net::UnixStream) -> Vec<&'static str> {
        use std::io::Read;
        let mut got = vec![0u8; 65536];
        let n = match server.read(&mut got) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => 0,
            Err(e) => panic!("{e}"),
        };
        let mut kinds = Vec::new();
        let mut at = 0;
        while let Some((r, used)) = postern_common::ipc::take_frame::<CleanupRequest>(
            &got[at..n],
            postern_common::ipc::MAX_MESSAGE,
        )
        .unwrap()
        {
            kinds.push(match r {
                CleanupRequest::Open => "open",
                CleanupRequest::Envelope(_) => "envelope",
                CleanupRequest::Content(_) => "content",
                CleanupRequest::Close => "close",
                CleanupRequest::Abort => "abort",
            });
            at += used;
        }
        assert_eq!(at, n, "a frame cut short");
        kinds
    }
}

impl Drop for CleanupPeer {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The envelope DATA makes waits in smtpd until content follows: cleanup
/// reads the envelope, the content and Close together, instead of waking
/// once for the envelope a client round trip before the content. And
/// smtpd is not woken each time cleanup reads.
#[test]
fn the_envelope_goes_to_cleanup_with_the_content() {
    let mut peer = CleanupPeer::new("envelope");
    let mut events = mio::Events::with_capacity(8);
    let (mut s, mut link) = peer.session_at_rcpt();
    let mut server = peer.accept().expect("a connection to cleanup");
    let zero = Some(std::time::Duration::ZERO);
    peer.poll.poll(&mut events, zero).unwrap();
    assert_eq!(CleanupPeer::frames(&mut server), ["open"]);
    // cleanup reading what smtpd wrote does not wake smtpd's event loop
    // (a Unix socket registered for WRITABLE would signal it).
    let wait = Some(std::time::Duration::from_millis(100));
    peer.poll.poll(&mut events, wait).unwrap();
    assert!(events.is_empty(), "woken by cleanup's read");
    assert_eq!(opened(&mut s), ["250 2.1.5 Ok"]);

    assert_eq!(
        send(&mut s, "DATA\r\n"),
        ["354 End data with <CR><LF>.<CR><LF>"]
    );
    peer.turn(&mut s, &mut link);
    assert!(
        CleanupPeer::frames(&mut server).is_empty(),
        "the envelope went alone"
    );

    send(&mut s, "Subject: x\r\n\r\nbody\r\n.\r\n");
    peer.turn(&mut s, &mut link);
    assert_eq!(
        CleanupPeer::frames(&mut server),
        ["envelope", "content", "close"]
    );
}

/// A connection whose message was queued carries the next message (of
/// another session): cleanup gets its Open on the same connection, no
/// new one. When cleanup closed a kept connection before it answered,
/// the Open goes again on a new connection, and the session never knows.
#[test]
fn a_queued_message_leaves_its_connection_for_the_next() {
    use postern_common::ipc;
    let mut peer = CleanupPeer::new("kept");
    let (mut s, mut link) = peer.session_at_rcpt();
    let mut server = peer.accept().expect("a connection to cleanup");
    assert_eq!(CleanupPeer::frames(&mut server), ["open"]);
    let reply = |server: &mut std::os::unix::net::UnixStream, r: CleanupReply| {
        ipc::send(server, &r).unwrap();
    };
    peer.answer_open(&mut server, "QID1", &mut s, &mut link);
    send(&mut s, "DATA\r\nSubject: x\r\n\r\nbody\r\n.\r\n");
    peer.turn(&mut s, &mut link);
    assert_eq!(
        CleanupPeer::frames(&mut server),
        ["envelope", "content", "close"]
    );
    reply(
        &mut server,
        CleanupReply::Queued {
            queue_id: "QID1".into(),
        },
    );
    peer.turn(&mut s, &mut link);
    assert!(out(&mut s)
        .iter()
        .any(|l| l == "250 2.0.0 Ok: queued as QID1"));
    assert!(link.conn.is_none());

    // The next session's message: the kept connection.
    let (mut s2, mut link2) = peer.session_at_rcpt();
    assert!(
        peer.accept().is_none(),
        "a new connection for the next message"
    );
    assert_eq!(CleanupPeer::frames(&mut server), ["open"]);

    // cleanup leaves without answering: a new connection gets the Open.
    drop(server);
    peer.turn(&mut s2, &mut link2);
    // (the turn's next pass writes to the new connection)
    peer.turn(&mut s2, &mut link2);
    let mut again = peer.accept().expect("the Open again, on a new connection");
    assert_eq!(CleanupPeer::frames(&mut again), ["open"]);
    assert!(
        out(&mut s2).is_empty(),
        "the session heard of the lost connection"
    );
    peer.answer_open(&mut again, "QID2", &mut s2, &mut link2);
}
