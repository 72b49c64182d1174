//! Conversations with scripted servers (in memory) and over loopback TCP.

use super::*;
use crate::nexthop::Server;
use postern_common::ipc::Outcome;
use std::io::{self, Cursor, Read, Write};
use std::net::{IpAddr, TcpListener, TcpStream};
use std::time::Duration;

// ------------------------------------------------------------------
// Scripted servers.

/// An in-memory server: every reply is there from the start; what the
/// client writes is kept, one entry per write call.
struct Scripted {
    input: Cursor<Vec<u8>>,
    writes: Vec<Vec<u8>>,
}

impl Scripted {
    fn new(replies: &str) -> Scripted {
        Scripted {
            input: Cursor::new(replies.as_bytes().to_vec()),
            writes: Vec::new(),
        }
    }
}

impl Read for Scripted {
    fn read(&mut self, b: &mut [u8]) -> io::Result<usize> {
        self.input.read(b)
    }
}

impl Write for Scripted {
    fn write(&mut self, b: &[u8]) -> io::Result<usize> {
        self.writes.push(b.to_vec());
        Ok(b.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Stream for Scripted {
    fn set_timeout(&mut self, _: Duration) -> io::Result<()> {
        Ok(())
    }
}

struct TestTxn {
    sender: String,
    rcpts: Vec<String>,
    content: Vec<u8>,
    /// Read the content this many bytes at a time.
    chunk: usize,
    connected: bool,
    recorded: Vec<(usize, Outcome, String, String)>,
    smtputf8: postern_common::smtputf8::Flags,
    /// An address verification probe.
    probe: bool,
}

impl TestTxn {
    fn new(rcpts: &[&str], content: &[u8]) -> TestTxn {
        TestTxn {
            sender: "from@a.test".into(),
            rcpts: rcpts.iter().map(|s| s.to_string()).collect(),
            content: content.to_vec(),
            chunk: 7,
            connected: false,
            recorded: Vec::new(),
            smtputf8: Default::default(),
            probe: false,
        }
    }

    fn outcome(&self, i: usize) -> Option<(Outcome, &str, &str)> {
        self.recorded
            .iter()
            .find(|r| r.0 == i)
            .map(|r| (r.1, r.2.as_str(), r.3.as_str()))
    }
}

/// Returns at most `n` bytes per read.
struct Trickle<'a>(&'a [u8], usize);

impl Read for Trickle<'_> {
    fn read(&mut self, b: &mut [u8]) -> io::Result<usize> {
        let n = self.0.len().min(b.len()).min(self.1);
        b[..n].copy_from_slice(&self.0[..n]);
        self.0 = &self.0[n..];
        Ok(n)
    }
}

impl Transaction for TestTxn {
    fn sender(&self) -> &str {
        &self.sender
    }
    fn recipients(&self) -> &[String] {
        &self.rcpts
    }
    fn content_size(&self) -> u64 {
        self.content.len() as u64
    }
    fn eight_bit(&mut self) -> io::Result<bool> {
        Ok(self.content.iter().any(|&b| b >= 0x80))
    }
    fn content(&mut self) -> io::Result<Box<dyn Read + '_>> {
        Ok(Box::new(Trickle(&self.content, self.chunk)))
    }
    fn connected(&mut self) {
        self.connected = true;
    }
    fn record(&mut self, i: usize, outcome: Outcome, dsn: &str, reason: &str) {
        assert!(self.outcome(i).is_none(), "recipient {i} recorded twice");
        self.recorded.push((i, outcome, dsn.into(), reason.into()));
    }
    fn verify_only(&self) -> bool {
        self.probe
    }
    fn smtputf8(&mut self) -> postern_common::smtputf8::Flags {
        self.smtputf8
    }
}

fn peer() -> Server {
    Server {
        name: "mx.b.test".into(),
        addr: "127.0.0.1".parse::<IpAddr>().unwrap(),
        port: 25,
    }
}

fn settings(t: u64) -> Settings {
    let d = Duration::from_secs(t);
    Settings {
        helo_name: "client.test".into(),
        timeouts: Timeouts {
            helo: d,
            mail: d,
            rcpt: d,
            data_init: d,
            data_xfer: d,
            data_done: d,
            quit: d,
        },
        lmtp: false,
        keep: false,
        discard: Vec::new(),
        line_limit: 998,
        send_xforward: false,
        xforward_timeout: d,
        skip_quit_response: false,
    }
}

fn sent_text(s: &Scripted) -> String {
    String::from_utf8(s.writes.concat()).unwrap()
}

#[test]
fn pipelined_per_recipient_results() {
    let mut srv = Scripted::new(
        "220 mx.b.test ESMTP\r\n\
         250-mx.b.test\r\n250-PIPELINING\r\n250-SIZE 100000\r\n250 8BITMIME\r\n\
         250 2.1.0 Ok\r\n\
         250 2.1.5 Ok\r\n\
         450 4.2.0 <b@b.test>: Recipient address rejected: Greylisted\r\n\
         550 5.1.1 <c@b.test>: Recipient address rejected: User unknown\r\n\
         250 2.1.5 Ok\r\n\
         354 End data with <CR><LF>.<CR><LF>\r\n\
         250 2.0.0 Ok: queued as ABC\r\n\
         221 2.0.0 Bye\r\n",
    );
    let content = b"Subject: t\n\n.hello\nw\xc3\xb6rld\n";
    let mut txn = TestTxn::new(&["a@b.test", "b@b.test", "c@b.test", "d@b.test"], content);
    let end = deliver(&mut srv, &peer(), &settings(5), &mut txn);
    assert_eq!(end, End::Complete);
    assert!(txn.connected);
    // EHLO alone, then MAIL + RCPTs + DATA in one write.
    assert_eq!(srv.writes[0], b"EHLO client.test\r\n");
    assert_eq!(
        String::from_utf8(srv.writes[1].clone()).unwrap(),
        format!(
            "MAIL FROM:<from@a.test> SIZE={} BODY=8BITMIME\r\nRCPT TO:<a@b.test>\r\nRCPT TO:<b@b.test>\r\nRCPT TO:<c@b.test>\r\nRCPT TO:<d@b.test>\r\nDATA\r\n",
            content.len()
        )
    );
    let all = sent_text(&srv);
    assert!(all.ends_with("Subject: t\r\n\r\n..hello\r\nwörld\r\n.\r\nQUIT\r\n"));
    assert_eq!(
        txn.outcome(0),
        Some((Outcome::Sent, "2.0.0", "250 2.0.0 Ok: queued as ABC"))
    );
    assert_eq!(
        txn.outcome(1),
        Some((
            Outcome::Deferred,
            "4.2.0",
            "host mx.b.test[127.0.0.1] said: 450 4.2.0 <b@b.test>: Recipient address rejected: Greylisted (in reply to RCPT TO command)"
        ))
    );
    assert_eq!(
        txn.outcome(2),
        Some((
            Outcome::Bounced,
            "5.1.1",
            "host mx.b.test[127.0.0.1] said: 550 5.1.1 <c@b.test>: Recipient address rejected: User unknown (in reply to RCPT TO command)"
        ))
    );
    assert_eq!(txn.outcome(3).unwrap().0, Outcome::Sent);
    // Rejections are recorded before the content is sent.
    assert_eq!(txn.recorded[0].0, 1);
    assert_eq!(txn.recorded[1].0, 2);
}

#[test]
fn a_probe_ends_at_rcpt_to() {
    let mut srv = Scripted::new(
        "220 mx.b.test ESMTP\r\n\
         250-mx.b.test\r\n250 PIPELINING\r\n\
         250 2.1.0 Ok\r\n\
         250 2.1.5 Ok\r\n\
         550 5.1.1 <c@b.test>: Recipient address rejected: User unknown\r\n\
         221 2.0.0 Bye\r\n",
    );
    let mut txn = TestTxn::new(&["a@b.test", "c@b.test"], b"");
    txn.probe = true;
    let end = deliver(&mut srv, &peer(), &settings(5), &mut txn);
    assert_eq!(end, End::Complete);
    let all = sent_text(&srv);
    assert!(!all.contains("DATA"), "{all}");
    assert!(all.ends_with("RCPT TO:<c@b.test>\r\nQUIT\r\n"), "{all}");
    assert_eq!(
        txn.outcome(0),
        Some((Outcome::Sent, "2.1.5", "250 2.1.5 Ok"))
    );
    assert_eq!(txn.outcome(1).unwrap().0, Outcome::Bounced);
}

#[test]
fn chunking_sends_bdat_without_dot_stuffing() {
    let mut srv = Scripted::new(
        "220 mx.b.test ESMTP\r\n\
         250-mx.b.test\r\n250-PIPELINING\r\n250-CHUNKING\r\n250 8BITMIME\r\n\
         250 2.1.0 Ok\r\n\
         250 2.1.5 Ok\r\n\
         550 5.1.1 <b@b.test>: Recipient address rejected: User unknown\r\n\
         250 2.0.0 Ok: queued as ABC\r\n\
         221 2.0.0 Bye\r\n",
    );
    let content = b"Subject: t\n\n.hello\r\n.\nend";
    let mut txn = TestTxn::new(&["a@b.test", "b@b.test"], content);
    assert_eq!(
        deliver(&mut srv, &peer(), &settings(5), &mut txn),
        End::Complete
    );
    // MAIL and RCPTs pipelined, without DATA.
    assert_eq!(
        String::from_utf8(srv.writes[1].clone()).unwrap(),
        "MAIL FROM:<from@a.test>\r\nRCPT TO:<a@b.test>\r\nRCPT TO:<b@b.test>\r\n"
    );
    // One chunk: CRLF line ends, dots as they are, a final CRLF added.
    let body = "Subject: t\r\n\r\n.hello\r\n.\r\nend\r\n";
    assert_eq!(
        sent_text(&srv),
        format!(
            "EHLO client.test\r\n{}BDAT {} LAST\r\n{body}QUIT\r\n",
            String::from_utf8(srv.writes[1].clone()).unwrap(),
            body.len()
        )
    );
    assert_eq!(
        txn.outcome(0),
        Some((Outcome::Sent, "2.0.0", "250 2.0.0 Ok: queued as ABC"))
    );
    assert_eq!(txn.outcome(1).unwrap().0, Outcome::Bounced);
}

#[test]
fn chunking_large_content_in_bounded_chunks() {
    // 200,000 bytes of lines "x...x\n" (99 x's): 2,000 lines.
    let line = format!("{}\n", "x".repeat(99));
    let content = line.repeat(2000).into_bytes();
    let mut srv = Scripted::new(
        "220 mx.b.test ESMTP\r\n\
         250-mx.b.test\r\n250 CHUNKING\r\n\
         250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n\
         250 2.0.0 chunk\r\n250 2.0.0 chunk\r\n250 2.0.0 chunk\r\n\
         250 2.0.0 Ok: queued as XYZ\r\n221 Bye\r\n",
    );
    let mut txn = TestTxn::new(&["a@b.test"], &content);
    txn.chunk = 1000;
    assert_eq!(
        deliver(&mut srv, &peer(), &settings(5), &mut txn),
        End::Complete
    );
    let all = sent_text(&srv);
    // Reassemble the chunks; each is at most 64 KiB of queue file.
    let mut rest = &all[all.find("BDAT").unwrap()..];
    let mut got = String::new();
    let mut sizes = Vec::new();
    loop {
        let eol = rest.find("\r\n").unwrap();
        let cmd = &rest[..eol];
        let mut w = cmd.split(' ');
        assert_eq!(w.next(), Some("BDAT"));
        let n: usize = w.next().unwrap().parse().unwrap();
        let last = w.next() == Some("LAST");
        got.push_str(&rest[eol + 2..eol + 2 + n]);
        sizes.push(n);
        rest = &rest[eol + 2 + n..];
        if last {
            break;
        }
    }
    assert_eq!(rest, "QUIT\r\n");
    assert_eq!(got, line.replace('\n', "\r\n").repeat(2000));
    assert_eq!(sizes.len(), 4);
    assert!(sizes.iter().all(|&n| n <= 64 * 1024 * 2));
    assert_eq!(
        txn.outcome(0),
        Some((Outcome::Sent, "2.0.0", "250 2.0.0 Ok: queued as XYZ"))
    );
}

#[test]
fn chunking_refused_chunk_and_lmtp_replies() {
    // A refused first chunk: no more chunks, outcome from its reply.
    let content = "y\n".repeat(40_000).into_bytes();
    let mut srv = Scripted::new(
        "220 mx.b.test ESMTP\r\n\
         250-mx.b.test\r\n250 CHUNKING\r\n\
         250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n\
         552 5.3.4 Message too big\r\n221 Bye\r\n",
    );
    let mut txn = TestTxn::new(&["a@b.test"], &content);
    txn.chunk = 4096;
    deliver(&mut srv, &peer(), &settings(5), &mut txn);
    let all = sent_text(&srv);
    assert_eq!(all.matches("BDAT").count(), 1);
    assert!(all.ends_with("QUIT\r\n"));
    assert_eq!(
        txn.outcome(0),
        Some((
            Outcome::Bounced,
            "5.3.4",
            "host mx.b.test[127.0.0.1] said: 552 5.3.4 Message too big (in reply to BDAT command)"
        ))
    );

    // LMTP: one reply per accepted recipient after BDAT LAST.
    let mut srv = Scripted::new(
        "220 lmtp.test LMTP\r\n\
         250-lmtp.test\r\n250-PIPELINING\r\n250 CHUNKING\r\n\
         250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n250 2.1.5 Ok\r\n\
         250 2.0.0 <a@b.test> Saved\r\n\
         452 4.2.2 <c@b.test> Quota exceeded\r\n221 Bye\r\n",
    );
    let mut txn = TestTxn::new(&["a@b.test", "c@b.test"], b".x\n");
    let mut st = settings(5);
    st.lmtp = true;
    let unix = PeerId::unix("me.test", "private/lmtp");
    assert_eq!(deliver(&mut srv, unix, &st, &mut txn), End::Complete);
    assert!(sent_text(&srv).ends_with("BDAT 4 LAST\r\n.x\r\nQUIT\r\n"));
    assert_eq!(txn.outcome(0).unwrap().0, Outcome::Sent);
    assert_eq!(
        txn.outcome(1),
        Some((
            Outcome::Deferred,
            "4.2.2",
            "host me.test[private/lmtp] said: 452 4.2.2 <c@b.test> Quota exceeded (in reply to end of DATA command)"
        ))
    );
}

#[test]
fn discarded_chunking_uses_data() {
    let mut srv = Scripted::new(
        "220 mx.b.test ESMTP\r\n\
         250-mx.b.test\r\n250-PIPELINING\r\n250 CHUNKING\r\n\
         250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n354 go\r\n250 2.0.0 Ok\r\n221 Bye\r\n",
    );
    let mut txn = TestTxn::new(&["a@b.test"], b".x\n");
    let mut st = settings(5);
    st.discard = vec!["chunking".into(), "silent-discard".into()];
    assert_eq!(deliver(&mut srv, &peer(), &st, &mut txn), End::Complete);
    let all = sent_text(&srv);
    assert!(!all.contains("BDAT"));
    assert!(all.ends_with("DATA\r\n..x\r\n.\r\nQUIT\r\n"));
    assert_eq!(txn.outcome(0).unwrap().0, Outcome::Sent);
}

#[test]
fn lmtp_one_reply_per_recipient() {
    let mut srv = Scripted::new(
        "220 lmtp.test LMTP ready\r\n\
         250-lmtp.test\r\n250-PIPELINING\r\n250 ENHANCEDSTATUSCODES\r\n\
         250 2.1.0 Ok\r\n\
         250 2.1.5 Ok\r\n\
         550 5.1.1 <b@b.test> User doesn't exist: b@b.test\r\n\
         250 2.1.5 Ok\r\n\
         354 OK\r\n\
         250 2.0.0 <a@b.test> Saved\r\n\
         452 4.2.2 <c@b.test> Quota exceeded\r\n\
         221 2.0.0 Bye\r\n",
    );
    let mut txn = TestTxn::new(&["a@b.test", "b@b.test", "c@b.test"], b"x\n");
    let mut st = settings(5);
    st.lmtp = true;
    let unix = PeerId::unix("me.test", "private/lmtp");
    assert_eq!(deliver(&mut srv, unix, &st, &mut txn), End::Complete);
    assert_eq!(srv.writes[0], b"LHLO client.test\r\n");
    assert_eq!(
        txn.outcome(0),
        Some((Outcome::Sent, "2.0.0", "250 2.0.0 <a@b.test> Saved"))
    );
    assert_eq!(txn.outcome(1).unwrap().0, Outcome::Bounced);
    assert_eq!(
        txn.outcome(2),
        Some((
            Outcome::Deferred,
            "4.2.2",
            "host me.test[private/lmtp] said: 452 4.2.2 <c@b.test> Quota exceeded (in reply to end of DATA command)"
        ))
    );
    assert!(sent_text(&srv).ends_with(".\r\nQUIT\r\n"));

    // LHLO refused: no HELO fallback.
    let mut srv = Scripted::new("220 x\r\n500 what\r\n221 bye\r\n");
    let mut txn = TestTxn::new(&["a@b.test"], b"x\n");
    assert!(matches!(
        deliver(&mut srv, &peer(), &st, &mut txn),
        End::TryNext { .. }
    ));
    assert!(!sent_text(&srv).contains("HELO "));
}

#[test]
fn dsn_parameters_when_offered() {
    struct Dsn(TestTxn);
    impl Transaction for Dsn {
        fn sender(&self) -> &str {
            self.0.sender()
        }
        fn recipients(&self) -> &[String] {
            self.0.recipients()
        }
        fn content_size(&self) -> u64 {
            self.0.content_size()
        }
        fn eight_bit(&mut self) -> io::Result<bool> {
            self.0.eight_bit()
        }
        fn content(&mut self) -> io::Result<Box<dyn Read + '_>> {
            self.0.content()
        }
        fn connected(&mut self) {}
        fn record(&mut self, i: usize, o: Outcome, d: &str, r: &str) {
            self.0.record(i, o, d, r)
        }
        fn dsn_envelope(&mut self) -> (Option<String>, Option<String>) {
            (Some("HDRS".into()), Some("id+1 x".into()))
        }
        fn dsn_recipient(&self, i: usize) -> (u8, String) {
            if i == 0 {
                (3, "rfc822;Orig=x@b.test".into())
            } else {
                (8, String::new())
            }
        }
    }
    let replies = "220 x\r\n250-x\r\n250 DSN\r\n250 Ok\r\n250 Ok\r\n250 Ok\r\n354 go\r\n250 Ok\r\n221 bye\r\n";
    let mut srv = Scripted::new(replies);
    let mut txn = Dsn(TestTxn::new(&["a@b.test", "b@b.test"], b"x\n"));
    deliver(&mut srv, &peer(), &settings(5), &mut txn);
    let all = sent_text(&srv);
    assert!(
        all.contains("MAIL FROM:<from@a.test> RET=HDRS ENVID=id+2B1+20x\r\n"),
        "{all}"
    );
    assert!(
        all.contains("RCPT TO:<a@b.test> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;Orig+3Dx@b.test\r\n"),
        "{all}"
    );
    assert!(all.contains("RCPT TO:<b@b.test> NOTIFY=NEVER\r\n"), "{all}");
    // Not offered: not sent.
    let mut srv = Scripted::new(&replies.replace("250-x\r\n250 DSN", "250 x"));
    let mut txn = Dsn(TestTxn::new(&["a@b.test", "b@b.test"], b"x\n"));
    deliver(&mut srv, &peer(), &settings(5), &mut txn);
    assert!(!sent_text(&srv).contains("NOTIFY"));
}

#[test]
fn one_at_a_time_without_pipelining() {
    let mut srv = Scripted::new(
        "220 mx ESMTP\r\n250 mx\r\n250 Ok\r\n550 no\r\n250 Ok\r\n354 go\r\n451 4.3.0 try later\r\n221 bye\r\n",
    );
    let mut txn = TestTxn::new(&["a@b.test", "b@b.test"], b"x\n");
    let end = deliver(&mut srv, &peer(), &settings(5), &mut txn);
    assert_eq!(end, End::Complete);
    let w: Vec<String> = srv
        .writes
        .iter()
        .map(|w| String::from_utf8(w.clone()).unwrap())
        .collect();
    assert_eq!(
        &w[..5],
        &[
            "EHLO client.test\r\n",
            "MAIL FROM:<from@a.test>\r\n",
            "RCPT TO:<a@b.test>\r\n",
            "RCPT TO:<b@b.test>\r\n",
            "DATA\r\n"
        ]
    );
    assert_eq!(
        txn.outcome(0).unwrap(),
        (
            Outcome::Bounced,
            "5.0.0",
            "host mx.b.test[127.0.0.1] said: 550 no (in reply to RCPT TO command)"
        )
    );
    assert_eq!(
        txn.outcome(1).unwrap(),
        (
            Outcome::Deferred,
            "4.3.0",
            "host mx.b.test[127.0.0.1] said: 451 4.3.0 try later (in reply to end of DATA command)"
        )
    );
}

#[test]
fn no_recipient_accepted_skips_data() {
    let mut srv = Scripted::new("220 mx\r\n250 mx\r\n250 Ok\r\n550 5.1.1 no\r\n221 bye\r\n");
    let mut txn = TestTxn::new(&["a@b.test"], b"x\n");
    assert_eq!(
        deliver(&mut srv, &peer(), &settings(5), &mut txn),
        End::Complete
    );
    let all = sent_text(&srv);
    assert!(!all.contains("DATA"));
    assert!(all.ends_with("QUIT\r\n"));
    assert_eq!(txn.outcome(0).unwrap().0, Outcome::Bounced);

    // Pipelined: DATA was sent with the rest; its error is ignored.
    let mut srv = Scripted::new(
        "220 mx\r\n250-mx\r\n250 PIPELINING\r\n250 Ok\r\n550 5.1.1 no\r\n554 5.5.1 no valid recipients\r\n221 bye\r\n",
    );
    let mut txn = TestTxn::new(&["a@b.test"], b"x\n");
    assert_eq!(
        deliver(&mut srv, &peer(), &settings(5), &mut txn),
        End::Complete
    );
    assert_eq!(txn.recorded.len(), 1);
    assert!(!sent_text(&srv).contains("\r\nx\r\n"));
}

#[test]
fn helo_fallback_and_refusals() {
    let mut srv = Scripted::new(
        "220 old\r\n502 what\r\n250 old\r\n250 Ok\r\n250 Ok\r\n354 go\r\n250 Ok\r\n221 bye\r\n",
    );
    let mut txn = TestTxn::new(&["a@b.test"], b"x\n");
    assert_eq!(
        deliver(&mut srv, &peer(), &settings(5), &mut txn),
        End::Complete
    );
    assert_eq!(srv.writes[1], b"HELO client.test\r\n");
    assert_eq!(txn.outcome(0).unwrap(), (Outcome::Sent, "2.0.0", "250 Ok"));

    // A refused greeting: try the next server, whatever the code.
    let mut srv = Scripted::new("554 5.7.1 go away\r\n221 bye\r\n");
    let mut txn = TestTxn::new(&["a@b.test"], b"x\n");
    let end = deliver(&mut srv, &peer(), &settings(5), &mut txn);
    assert_eq!(
        end,
        End::TryNext {
            failure: Failure {
                dsn: "4.7.1".into(),
                reason: "host mx.b.test[127.0.0.1] refused to talk to me: 554 5.7.1 go away".into()
            },
            handshake: false
        }
    );
    assert!(txn.recorded.is_empty() && !txn.connected);

    // HELO refused for good: bounce.
    let mut srv = Scripted::new("220 x\r\n500 no\r\n550 5.7.1 no\r\n221 bye\r\n");
    let mut txn = TestTxn::new(&["a@b.test", "c@b.test"], b"x\n");
    assert_eq!(
        deliver(&mut srv, &peer(), &settings(5), &mut txn),
        End::Complete
    );
    assert_eq!(txn.recorded.len(), 2);
    assert_eq!(txn.outcome(1).unwrap().0, Outcome::Bounced);
}

#[test]
fn service_closing_and_lost_connection() {
    // 421 to a RCPT: nothing sent yet, so the rest may go elsewhere.
    let mut srv = Scripted::new(
        "220 x\r\n250-x\r\n250 PIPELINING\r\n250 Ok\r\n550 5.1.1 no\r\n421 4.3.2 shutting down\r\n",
    );
    let mut txn = TestTxn::new(&["a@b.test", "b@b.test", "c@b.test"], b"x\n");
    match deliver(&mut srv, &peer(), &settings(5), &mut txn) {
        End::TryNext { failure, handshake } => {
            assert!(handshake);
            assert_eq!(failure.dsn, "4.3.2");
            assert_eq!(
                failure.reason,
                "host mx.b.test[127.0.0.1] said: 421 4.3.2 shutting down (in reply to RCPT TO command)"
            );
        }
        e => panic!("{e:?}"),
    }
    assert_eq!(txn.recorded.len(), 1);

    // Lost before the MAIL reply.
    let mut srv = Scripted::new("220 x\r\n250 x\r\n");
    let mut txn = TestTxn::new(&["a@b.test"], b"x\n");
    match deliver(&mut srv, &peer(), &settings(5), &mut txn) {
        End::TryNext { failure, .. } => assert_eq!(
            failure.reason,
            "lost connection with mx.b.test[127.0.0.1] while sending MAIL FROM"
        ),
        e => panic!("{e:?}"),
    }

    // Lost after the content: deferred here, not retried elsewhere.
    let mut srv = Scripted::new("220 x\r\n250 x\r\n250 Ok\r\n250 Ok\r\n354 go\r\n");
    let mut txn = TestTxn::new(&["a@b.test"], b"x\n");
    assert_eq!(
        deliver(&mut srv, &peer(), &settings(5), &mut txn),
        End::Complete
    );
    assert_eq!(
        txn.outcome(0).unwrap(),
        (
            Outcome::Deferred,
            "4.4.2",
            "lost connection with mx.b.test[127.0.0.1] while sending end of data -- message may be sent more than once"
        )
    );

    // MAIL FROM refused for good: every recipient bounces.
    let mut srv = Scripted::new("220 x\r\n250 x\r\n553 5.1.8 bad sender\r\n221 bye\r\n");
    let mut txn = TestTxn::new(&["a@b.test", "b@b.test"], b"x\n");
    assert_eq!(
        deliver(&mut srv, &peer(), &settings(5), &mut txn),
        End::Complete
    );
    assert_eq!(txn.outcome(1).unwrap().1, "5.1.8");
    assert!(txn
        .outcome(1)
        .unwrap()
        .2
        .ends_with("(in reply to MAIL FROM command)"));
}

#[test]
fn size_limit_and_smtputf8() {
    let mut srv = Scripted::new("220 x\r\n250-x\r\n250 SIZE 3\r\n221 bye\r\n");
    let mut txn = TestTxn::new(&["a@b.test"], b"four\n");
    assert_eq!(
        deliver(&mut srv, &peer(), &settings(5), &mut txn),
        End::Complete
    );
    assert_eq!(
        txn.outcome(0).unwrap(),
        (
            Outcome::Bounced,
            "5.3.4",
            "message size 5 exceeds size limit 3 of server mx.b.test[127.0.0.1]"
        )
    );
    // SMTPUTF8 requested and a UTF-8 recipient: refused by a server
    // without SMTPUTF8.
    let mut srv = Scripted::new("220 x\r\n250 x\r\n221 bye\r\n");
    let mut txn = TestTxn::new(&["jö@b.test"], b"x\n");
    txn.smtputf8.requested = true;
    deliver(&mut srv, &peer(), &settings(5), &mut txn);
    assert_eq!(
        txn.outcome(0).unwrap(),
        (
            Outcome::Bounced,
            "5.6.7",
            "SMTPUTF8 is required, but was not offered by host mx.b.test[127.0.0.1]"
        )
    );
    // Requested, but all ASCII: sent without the parameter.
    let mut srv =
        Scripted::new("220 x\r\n250 x\r\n250 ok\r\n250 ok\r\n354 go\r\n250 ok\r\n221 bye\r\n");
    let mut txn = TestTxn::new(&["a@b.test"], b"x\n");
    txn.smtputf8.requested = true;
    deliver(&mut srv, &peer(), &settings(5), &mut txn);
    assert_eq!(txn.outcome(0).unwrap().0, Outcome::Sent);
    let said = String::from_utf8(srv.writes.concat()).unwrap();
    assert!(said.contains("MAIL FROM:<from@a.test>\r\n"), "{said}");
    // Not requested: a legacy UTF-8 local part goes as it is.
    let mut srv =
        Scripted::new("220 x\r\n250 x\r\n250 ok\r\n250 ok\r\n354 go\r\n250 ok\r\n221 bye\r\n");
    let mut txn = TestTxn::new(&["jö@b.test"], b"x\n");
    deliver(&mut srv, &peer(), &settings(5), &mut txn);
    assert_eq!(txn.outcome(0).unwrap().0, Outcome::Sent);
    // Requested, offered: MAIL FROM carries SMTPUTF8.
    let mut srv = Scripted::new(
        "220 x\r\n250-x\r\n250 SMTPUTF8\r\n250 ok\r\n250 ok\r\n354 go\r\n250 ok\r\n221 bye\r\n",
    );
    let mut txn = TestTxn::new(&["jö@b.test"], b"x\n");
    txn.smtputf8.requested = true;
    deliver(&mut srv, &peer(), &settings(5), &mut txn);
    assert_eq!(txn.outcome(0).unwrap().0, Outcome::Sent);
    let said = String::from_utf8(srv.writes.concat()).unwrap();
    assert!(
        said.contains("MAIL FROM:<from@a.test> SMTPUTF8\r\n"),
        "{said}"
    );
    // SMTPUTF8 without 8BITMIME: 8-bit content goes (as Postfix).
    let mut srv = Scripted::new(
        "220 x\r\n250-x\r\n250 SMTPUTF8\r\n250 ok\r\n250 ok\r\n354 go\r\n250 ok\r\n221 bye\r\n",
    );
    let mut txn = TestTxn::new(&["a@b.test"], "Subject: ä\n\nö\n".as_bytes());
    deliver(&mut srv, &peer(), &settings(5), &mut txn);
    assert_eq!(txn.outcome(0).unwrap().0, Outcome::Sent);
    // 8-bit content to a server without 8BITMIME: bounced, not sent.
    let mut srv = Scripted::new("220 x\r\n250 x\r\n221 bye\r\n");
    let mut txn = TestTxn::new(&["a@b.test"], "Subject: x\n\nsmörgåsbord\n".as_bytes());
    deliver(&mut srv, &peer(), &settings(5), &mut txn);
    let (outcome, dsn, reason) = txn.outcome(0).unwrap();
    assert_eq!((outcome, dsn), (Outcome::Bounced, "5.6.3"));
    assert!(reason.contains("did not offer 8BITMIME"), "{reason}");
}

/// A real socket: a server thread that answers each command as it
/// comes and checks the client's bytes.
#[test]
fn over_loopback_tcp() {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let body: Vec<u8> = (0..20_000)
        .flat_map(|i| format!(".line {i}\n").into_bytes())
        .collect();
    let expect: Vec<u8> = (0..20_000)
        .flat_map(|i| format!("..line {i}\r\n").into_bytes())
        .collect();
    let server = std::thread::spawn(move || {
        let (c, _) = l.accept().unwrap();
        let mut w = c.try_clone().unwrap();
        let mut r = io::BufReader::new(c);
        use std::io::BufRead;
        let mut line = String::new();
        let mut next = |r: &mut io::BufReader<TcpStream>| {
            line.clear();
            r.read_line(&mut line).unwrap();
            line.clone()
        };
        w.write_all(b"220 loop ESMTP\r\n").unwrap();
        assert_eq!(next(&mut r), "EHLO client.test\r\n");
        w.write_all(b"250-loop\r\n250 PIPELINING\r\n").unwrap();
        assert!(next(&mut r).starts_with("MAIL FROM:<from@a.test>"));
        assert_eq!(next(&mut r), "RCPT TO:<a@b.test>\r\n");
        assert_eq!(next(&mut r), "DATA\r\n");
        w.write_all(b"250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n354 go\r\n")
            .unwrap();
        let mut got = Vec::new();
        loop {
            let mut l = Vec::new();
            r.read_until(b'\n', &mut l).unwrap();
            if l == b".\r\n" {
                break;
            }
            got.extend_from_slice(&l);
        }
        w.write_all(b"250 2.0.0 Ok: queued as LOOP1\r\n").unwrap();
        assert_eq!(next(&mut r), "QUIT\r\n");
        w.write_all(b"221 bye\r\n").unwrap();
        got
    });
    let s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    let mut txn = TestTxn::new(&["a@b.test"], &body);
    txn.chunk = 4000;
    let p = Server { port, ..peer() };
    assert_eq!(deliver(s, &p, &settings(5), &mut txn), End::Complete);
    assert_eq!(
        txn.outcome(0).unwrap(),
        (Outcome::Sent, "2.0.0", "250 2.0.0 Ok: queued as LOOP1")
    );
    assert_eq!(server.join().unwrap(), expect);
}

#[test]
fn greeting_timeout() {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let server = std::thread::spawn(move || {
        let (c, _) = l.accept().unwrap();
        std::thread::sleep(Duration::from_millis(1500));
        drop(c);
    });
    let s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    let mut txn = TestTxn::new(&["a@b.test"], b"x\n");
    let end = deliver(s, &peer(), &settings(1), &mut txn);
    server.join().unwrap();
    match end {
        End::TryNext { failure, handshake } => {
            assert!(!handshake);
            assert_eq!(failure.dsn, "4.4.2");
            assert_eq!(
                failure.reason,
                "conversation with mx.b.test[127.0.0.1] timed out while receiving the initial server greeting"
            );
        }
        e => panic!("{e:?}"),
    }
}
