//! Deliveries to scripted SMTP servers on loopback, and with real peers.

use super::*;
use postern_common::ipc::{DeliveryRecipient, DeliveryRequest};
use postern_common::qfile::{self, Recipient};
use postern_common::queue::{MessageLog, Queue, QueueTree};
use postern_conf::Config;
use std::io::{BufRead, BufReader, Write};
use std::net::{IpAddr, TcpListener};
use std::path::PathBuf;

fn tmpdir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("postern-smtp-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

/// A queue tree with one message in `active/`, and a job for it.
fn make_job(dir: &PathBuf, rcpts: &[&str], body: &[u8], nexthop: &str) -> (QueueTree, Job) {
    let tree = QueueTree::new(dir);
    tree.create_dirs(None, None).unwrap();
    let nf = tree.create(Queue::Active).unwrap();
    let mut w = qfile::Writer::new(nf.file).unwrap();
    w.arrival(1_700_000_000, 0).unwrap();
    w.sender("from@a.test").unwrap();
    for r in rcpts {
        w.recipient(&Recipient::new(r)).unwrap();
    }
    w.begin_content().unwrap();
    w.content(body).unwrap();
    let f = w.finish().unwrap();
    let env = qfile::read_envelope(&f).unwrap();
    let req = DeliveryRequest {
        queue: "active".into(),
        queue_id: nf.id.clone(),
        transport: "smtp".into(),
        nexthop: nexthop.into(),
        sender: env.sender.clone(),
        arrival_secs: env.arrival_secs,
        arrival_usecs: env.arrival_usecs,
        content_offset: env.content_offset,
        content_size: env.content_size,
        recipients: env
            .recipients
            .iter()
            .map(|r| DeliveryRecipient {
                offset: r.offset,
                rcpt: r.rcpt.clone(),
            })
            .collect(),
        queue_wait: 0.0,
        flags: 0,
        site: None,
        pool: String::new(),
        selection: String::new(),
    };
    let job = Job::open(&tree, req).unwrap();
    (tree, job)
}

fn agent() -> Agent {
    let cfg = Config::from_main_cf_text(
        "smtp_helo_name = client.test\nsmtp_connect_timeout = 2s\nsmtp_helo_timeout = 5s\n",
    )
    .unwrap();
    Agent::from_config(&cfg, false)
}

/// The lines of a DATA section up to the final dot, as sent.
fn read_data(r: &mut impl BufRead) -> Vec<u8> {
    let mut msg = Vec::new();
    loop {
        let mut l = Vec::new();
        r.read_until(b'\n', &mut l).unwrap();
        if l == b".\r\n" {
            return msg;
        }
        msg.extend_from_slice(&l);
    }
}

/// A server that answers each command in turn; RCPT TO addresses
/// listed in `reject` get a 550. Returns the message it received.
fn sink(l: TcpListener, reject: &'static [&'static str]) -> std::thread::JoinHandle<Vec<u8>> {
    std::thread::spawn(move || {
        let (c, _) = l.accept().unwrap();
        let mut w = c.try_clone().unwrap();
        let mut r = BufReader::new(c);
        w.write_all(b"220 sink ESMTP\r\n").unwrap();
        let mut msg = Vec::new();
        loop {
            let mut line = String::new();
            if r.read_line(&mut line).unwrap() == 0 {
                break;
            }
            let up = line.to_ascii_uppercase();
            let reply: &[u8] = if up.starts_with("EHLO") {
                b"250-sink\r\n250-PIPELINING\r\n250 8BITMIME\r\n"
            } else if up.starts_with("RCPT") {
                if reject.iter().any(|x| line.contains(x)) {
                    b"550 5.1.1 no such user\r\n"
                } else {
                    b"250 2.1.5 Ok\r\n"
                }
            } else if up.starts_with("DATA") {
                w.write_all(b"354 go\r\n").unwrap();
                msg.extend(read_data(&mut r));
                b"250 2.0.0 Ok: queued as SINK1\r\n"
            } else if up.starts_with("QUIT") {
                w.write_all(b"221 bye\r\n").unwrap();
                break;
            } else {
                b"250 2.1.0 Ok\r\n"
            };
            w.write_all(reply).unwrap();
        }
        msg
    })
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn server(port: u16) -> Server {
    Server {
        name: "127.0.0.1".into(),
        addr: "127.0.0.1".parse::<IpAddr>().unwrap(),
        port,
    }
}

#[test]
fn delivers_and_records_each_recipient() {
    let dir = tmpdir("ok");
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let srv = sink(l, &["bad@"]);
    let (tree, mut job) = make_job(
        &dir,
        &["good@b.test", "bad@b.test"],
        b"Subject: hi\n\n.dot\n",
        &format!("[127.0.0.1]:{port}"),
    );
    let id = job.req.queue_id.clone();
    let offsets: Vec<u64> = job.req.recipients.iter().map(|r| r.offset).collect();
    let a = agent();
    a.deliver(&mut job);
    let reply = job.finish();
    assert_eq!(srv.join().unwrap(), b"Subject: hi\r\n\r\n..dot\r\n");
    assert!(!reply.destination_failed);
    let by = |o: u64| {
        reply
            .results
            .iter()
            .find(|r| r.offset == o)
            .unwrap()
            .clone()
    };
    let good = by(offsets[0]);
    assert_eq!(good.outcome, Outcome::Sent);
    assert_eq!(good.reason, "250 2.0.0 Ok: queued as SINK1");
    let bad = by(offsets[1]);
    assert_eq!(bad.outcome, Outcome::Bounced);
    assert_eq!(bad.dsn, "5.1.1");
    assert_eq!(
        bad.reason,
        "host 127.0.0.1[127.0.0.1] said: 550 5.1.1 no such user (in reply to RCPT TO command)"
    );
    // Both are marked done in the queue file; the bounce is logged.
    let f = std::fs::File::open(tree.path(Queue::Active, &id)).unwrap();
    let env = qfile::read_envelope(&f).unwrap();
    assert!(env.recipients.iter().all(|r| r.done));
    let log = postern_common::delivery::read_log(&tree, MessageLog::Bounce, &id).unwrap();
    assert_eq!(log.len(), 1);
    assert_eq!(log[0].relay, format!("127.0.0.1[127.0.0.1]:{port}"));
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Delivers "first", then "second" to a@b.test through one agent,
/// each expected sent; the agent keeps its cached session.
fn deliver_first_and_second(dir: &std::path::Path, port: u16) -> Agent {
    let a = agent();
    for (i, body) in [&b"first\n"[..], &b"second\n"[..]].iter().enumerate() {
        let (_tree, mut job) = make_job(&dir.join(i.to_string()), &["a@b.test"], body, "b.test");
        a.try_servers(&mut job, &[server(port)]);
        let reply = job.finish();
        assert_eq!(
            reply.results[0].outcome,
            Outcome::Sent,
            "{:?}",
            reply.results
        );
    }
    a
}

#[test]
fn second_request_reuses_the_session() {
    let dir = tmpdir("reuse");
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    // The sink takes one connection only: the second message must
    // come over it (after RSET), and QUIT when the cache lets go.
    let srv = sink(l, &[]);
    // Kept to the end: its cache holds the session.
    let _agent = deliver_first_and_second(&dir, port);
    // The reaper closes the idle session after smtp_connection_cache_time_limit.
    assert_eq!(srv.join().unwrap(), b"first\r\nsecond\r\n");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_kept_session_that_refuses_its_rset_is_replaced() {
    let dir = tmpdir("stale");
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    // The first session takes one message, then answers the next
    // transaction's RSET (pipelined with MAIL, RCPT and DATA) with 421
    // and closes, as a server that dropped an idle session does. The
    // second message must come whole over a new session.
    let srv = std::thread::spawn(move || {
        let (c, _) = l.accept().unwrap();
        let mut w = c.try_clone().unwrap();
        let mut r = BufReader::new(c);
        w.write_all(b"220 sink ESMTP\r\n").unwrap();
        let mut first = Vec::new();
        let mut messages = 0;
        loop {
            let mut line = String::new();
            if r.read_line(&mut line).unwrap() == 0 {
                break;
            }
            let up = line.to_ascii_uppercase();
            if up.starts_with("EHLO") {
                w.write_all(b"250-sink\r\n250 PIPELINING\r\n").unwrap();
            } else if up.starts_with("RSET") {
                w.write_all(b"421 4.4.2 sink Error: timeout exceeded\r\n")
                    .unwrap();
                break;
            } else if up.starts_with("DATA") {
                w.write_all(b"354 go\r\n").unwrap();
                first.extend(read_data(&mut r));
                messages += 1;
                w.write_all(b"250 2.0.0 Ok\r\n").unwrap();
            } else {
                w.write_all(b"250 2.1.0 Ok\r\n").unwrap();
            }
        }
        drop((w, r));
        (messages, first, sink(l, &[]).join().unwrap())
    });
    let a = deliver_first_and_second(&dir, port);
    a.close_cached();
    let (messages, first, second) = srv.join().unwrap();
    assert_eq!((messages, &first[..]), (1, &b"first\r\n"[..]));
    assert_eq!(second, b"second\r\n");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn next_address_after_a_refused_connection() {
    let dir = tmpdir("next");
    let dead = free_port();
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let srv = sink(l, &[]);
    let (_tree, mut job) = make_job(&dir, &["a@b.test"], b"x\n", "b.test");
    agent().try_servers(&mut job, &[server(dead), server(port)]);
    let reply = job.finish();
    srv.join().unwrap();
    assert_eq!(reply.results[0].outcome, Outcome::Sent);
    assert!(!reply.destination_failed);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn every_address_refused() {
    let dir = tmpdir("dead");
    let (a, b) = (free_port(), free_port());
    let (tree, mut job) = make_job(&dir, &["a@b.test", "c@b.test"], b"x\n", "b.test");
    let id = job.req.queue_id.clone();
    agent().try_servers(&mut job, &[server(a), server(b)]);
    let reply = job.finish();
    assert!(reply.destination_failed);
    assert_eq!(reply.results.len(), 2);
    for r in &reply.results {
        assert_eq!(r.outcome, Outcome::Deferred);
        assert_eq!(r.dsn, "4.4.1");
        assert_eq!(
            r.reason,
            format!("connect to 127.0.0.1[127.0.0.1]:{b}: Connection refused")
        );
    }
    let log = postern_common::delivery::read_log(&tree, MessageLog::Defer, &id).unwrap();
    assert_eq!(log[0].relay, "none");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Kills a helper process however the test ends.
struct Kill(std::process::Child);
impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn spawn(cmd: &str, args: &[String]) -> Kill {
    Kill(
        std::process::Command::new(cmd)
            .args(args)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect(cmd),
    )
}

/// MX lookup through dnsmasq, a first MX (smtp-sink) that answers 421
/// to MAIL FROM, and delivery to the second one. Run with
/// `cargo test -p postern-smtp -- --ignored` (needs dnsmasq-base and
/// postfix's smtp-sink, and root for smtp-sink's -u).
#[test]
#[ignore]
fn mx_lookup_and_backup_mx_with_real_peers() {
    let dns_port = {
        let s = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        s.local_addr().unwrap().port()
    };
    let port = free_port();
    let dir = tmpdir("real");
    std::fs::create_dir_all(dir.join("dump")).unwrap();
    // smtp-sink writes its dumps as nobody.
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(dir.join("dump"), std::fs::Permissions::from_mode(0o777)).unwrap();
    let _dns = spawn(
        "dnsmasq",
        &[
            "--no-daemon".into(),
            format!("--port={dns_port}"),
            "--listen-address=127.0.0.1".into(),
            "--bind-interfaces".into(),
            "--no-resolv".into(),
            "--no-hosts".into(),
            "--local=/test/".into(),
            "--mx-host=example.test,mx1.example.test,10".into(),
            "--mx-host=example.test,mx2.example.test,20".into(),
            "--host-record=mx1.example.test,127.0.0.9".into(),
            "--host-record=mx2.example.test,127.0.0.10".into(),
            "--mx-host=nullmx.test,.,0".into(),
        ],
    );
    let _mx1 = spawn(
        "smtp-sink",
        &[
            "-u".into(),
            "nobody".into(),
            "-Q".into(),
            "MAIL".into(),
            format!("127.0.0.9:{port}"),
            "10".into(),
        ],
    );
    let _mx2 = spawn(
        "smtp-sink",
        &[
            "-u".into(),
            "nobody".into(),
            "-d".into(),
            format!("{}/dump/%M.", dir.display()),
            format!("127.0.0.10:{port}"),
            "10".into(),
        ],
    );
    std::thread::sleep(Duration::from_millis(700));
    let cfg = Config::from_text(
        std::path::Path::new("/nonexistent"),
        &format!(
            "smtp_helo_name = client.test\ndns_resolver_addresses = 127.0.0.1:{dns_port}\ndns_resolver_timeout = 2s\n"
        ),
        std::path::Path::new("main.cf"),
    )
    .unwrap();
    let agent = Agent::from_config(&cfg, false);
    let (_tree, mut job) = make_job(
        &dir,
        &["a@example.test", "b@example.test"],
        b"Subject: real\n\n.dot line\n",
        &format!("example.test:{port}"),
    );
    agent.deliver(&mut job);
    let reply = job.finish();
    for r in &reply.results {
        assert_eq!(r.outcome, Outcome::Sent, "{r:?}");
        assert_eq!(r.reason, "250 2.0.0 Ok", "{r:?}");
    }
    let dumps: Vec<_> = std::fs::read_dir(dir.join("dump")).unwrap().collect();
    assert_eq!(dumps.len(), 1);
    let dump = std::fs::read(dumps[0].as_ref().unwrap().path()).unwrap();
    let dump = String::from_utf8_lossy(&dump);
    assert!(
        dump.contains("..dot line\r\n") || dump.contains(".dot line"),
        "{dump}"
    );

    // A null MX bounces without a connection.
    let (_tree, mut job) = make_job(&dir.join("n"), &["a@nullmx.test"], b"x\n", "nullmx.test");
    agent.deliver(&mut job);
    let reply = job.finish();
    assert_eq!(reply.results[0].outcome, Outcome::Bounced);
    assert_eq!(reply.results[0].dsn, "5.1.10");
    // An unknown domain bounces too.
    let (_tree, mut job) = make_job(&dir.join("x"), &["a@nosuch.test"], b"x\n", "nosuch.test");
    agent.deliver(&mut job);
    let reply = job.finish();
    assert_eq!(reply.results[0].dsn, "5.4.4");
    assert_eq!(
        reply.results[0].reason,
        "Host or domain name not found. Name service error for name=nosuch.test type=MX: Host not found"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn bad_next_hop_and_literal_address() {
    let dir = tmpdir("hop");
    let (_tree, mut job) = make_job(&dir, &["a@b.test"], b"x\n", "[broken");
    agent().deliver(&mut job);
    let reply = job.finish();
    assert_eq!(reply.results[0].dsn, "4.3.5");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn quit_response_skipped_for_smtp_and_awaited_for_lmtp_by_default() {
    let cfg = |text: &str| Config::from_main_cf_text(text).unwrap();
    // Postfix's defaults: smtp_skip_quit_response = yes,
    // lmtp_skip_quit_response = no.
    assert!(
        Agent::from_config(&cfg(""), false)
            .settings
            .skip_quit_response
    );
    assert!(
        !Agent::from_config(&cfg(""), true)
            .settings
            .skip_quit_response
    );
    let flipped = cfg("smtp_skip_quit_response = no\nlmtp_skip_quit_response = yes\n");
    assert!(
        !Agent::from_config(&flipped, false)
            .settings
            .skip_quit_response
    );
    assert!(
        Agent::from_config(&flipped, true)
            .settings
            .skip_quit_response
    );
}
