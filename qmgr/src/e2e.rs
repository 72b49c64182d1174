//! Tests of the whole queue manager on a real queue directory, with fake
//! delivery agents and a fake cleanup on Unix sockets.

use crate::event::Event;
use crate::manager::Manager;
use postern_common::delivery::{self, Job};
use postern_common::ipc::{
    self, CleanupReply, CleanupRequest, DeliveryReply, DeliveryRequest, NewMessage, Outcome,
};
use postern_common::qfile::{self, Recipient, Writer};
use postern_common::queue::{MessageLog, Queue, QueueTree};
use postern_conf::Config;
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

type Notices = Arc<Mutex<Vec<(NewMessage, String)>>>;
type Requests = Arc<Mutex<Vec<DeliveryRequest>>>;

struct Env {
    root: PathBuf,
    tree: QueueTree,
    notices: Notices,
    requests: Requests,
}

impl Drop for Env {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

fn setup(name: &str) -> Env {
    let env = setup_without_cleanup(name);
    cleanup(&env.tree, env.notices.clone());
    env
}

fn setup_without_cleanup(name: &str) -> Env {
    let root = std::env::temp_dir().join(format!("qmgr-e2e-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    let tree = QueueTree::new(&root);
    tree.create_dirs(None, None).unwrap();
    let env = Env {
        root,
        tree,
        notices: Arc::default(),
        requests: Arc::default(),
    };
    agent(&env.tree, "smtp", env.requests.clone());
    env
}

fn config(env: &Env, extra: &str) -> Config {
    let text = format!(
        "queue_directory = {}\nmyhostname = mx.test\nmydestination = $myhostname\n\
         relayhost = [127.0.0.1]:2525\nminimal_backoff_time = 100s\n\
         maximal_backoff_time = 200s\n\
         transport_maps = inline:{{ gone.test=error:5.1.2 bad domain, nowhere.test=nosuch: }}\n{extra}",
        env.root.display()
    );
    Config::from_text(&env.root, &text, &env.root.join("main.cf")).unwrap()
}

/// A delivery agent whose outcome depends on the recipient's local part.
fn agent(tree: &QueueTree, name: &str, requests: Requests) {
    let l = UnixListener::bind(tree.socket(true, name)).unwrap();
    let tree = tree.clone();
    std::thread::spawn(move || {
        for conn in l.incoming() {
            let mut conn = conn.unwrap();
            let req: DeliveryRequest = ipc::recv(&mut conn).unwrap();
            requests.lock().unwrap().push(req.clone());
            if req
                .recipients
                .iter()
                .any(|r| r.rcpt.address.starts_with("crash"))
            {
                continue; // goes away without a word
            }
            let mut job = Job::open(&tree, req).unwrap();
            for r in job.unfinished() {
                let a = r.rcpt.address.clone();
                if a.starts_with("bounce") {
                    job.record(
                        &r,
                        Outcome::Bounced,
                        "5.1.1",
                        "mx.remote.test[192.0.2.1]:25",
                        "host mx.remote.test[192.0.2.1] said: 550 5.1.1 no such user (in reply to RCPT TO command)",
                    );
                } else if a.starts_with("defer") {
                    job.record(
                        &r,
                        Outcome::Deferred,
                        "4.2.0",
                        "mx.remote.test[192.0.2.1]:25",
                        "host mx.remote.test[192.0.2.1] said: 450 4.2.0 try later (in reply to RCPT TO command)",
                    );
                } else {
                    job.record(
                        &r,
                        Outcome::Sent,
                        "2.0.0",
                        "127.0.0.1[127.0.0.1]:2525",
                        "250 ok",
                    );
                }
            }
            let reply: DeliveryReply = job.finish();
            ipc::send(&mut conn, &reply).unwrap();
        }
    });
}

/// A cleanup that accepts every notice and keeps it.
fn cleanup(tree: &QueueTree, notices: Notices) {
    let l = UnixListener::bind(tree.cleanup_socket()).unwrap();
    std::thread::spawn(move || {
        for (n, conn) in l.incoming().enumerate() {
            let mut conn = conn.unwrap();
            let CleanupRequest::Open = ipc::recv(&mut conn).unwrap() else {
                panic!("no Open");
            };
            let CleanupRequest::Envelope(nm) = ipc::recv(&mut conn).unwrap() else {
                panic!("no Envelope");
            };
            let id = format!("AAAAAAAAAAAAA{n:X}");
            ipc::send(
                &mut conn,
                &CleanupReply::Opened {
                    queue_id: id.clone(),
                },
            )
            .unwrap();
            let mut body = Vec::new();
            loop {
                match ipc::recv(&mut conn).unwrap() {
                    CleanupRequest::Content(c) => body.extend(c),
                    CleanupRequest::Close => break,
                    other => panic!("unexpected {other:?}"),
                }
            }
            ipc::send(&mut conn, &CleanupReply::Queued { queue_id: id }).unwrap();
            notices
                .lock()
                .unwrap()
                .push((nm, String::from_utf8(body).unwrap()));
        }
    });
}

fn queue_message(tree: &QueueTree, q: Queue, sender: &str, rcpts: &[&str]) -> String {
    let nf = tree.create(q).unwrap();
    let mut w = Writer::new(nf.file).unwrap();
    let (s, u) = postern_common::queue::now();
    w.arrival(s, u).unwrap();
    w.sender(sender).unwrap();
    for r in rcpts {
        w.recipient(&Recipient::new(r)).unwrap();
    }
    w.begin_content().unwrap();
    w.content(b"Subject: test message\nFrom: someone\n\nbody\n")
        .unwrap();
    w.finish().unwrap();
    nf.id
}

/// Runs the manager until it has nothing left to do.
fn drive(m: &mut Manager) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let more = m.work();
        if m.is_idle() {
            return;
        }
        assert!(Instant::now() < deadline, "qmgr did not settle");
        if !more {
            m.poll(Duration::from_millis(100));
        }
    }
}

fn pending(tree: &QueueTree, q: Queue, id: &str) -> Vec<String> {
    let f = std::fs::File::open(tree.path(q, id)).unwrap();
    qfile::read_envelope(&f)
        .unwrap()
        .pending()
        .map(|r| r.rcpt.address.clone())
        .collect()
}

#[test]
fn deliver_bounce_defer_then_expire() {
    let env = setup("round");
    let tree = &env.tree;
    let id = queue_message(
        tree,
        Queue::Incoming,
        "alice@example.test",
        &[
            "ok@remote.test",
            "bounce@remote.test",
            "defer@remote.test",
            "err@gone.test",
            "x@nowhere.test",
        ],
    );
    let mut m = Manager::new(&config(&env, ""));
    m.start();
    drive(&mut m);

    // One request for the three recipients at the relay host.
    let reqs = env.requests.lock().unwrap().clone();
    assert_eq!(reqs.len(), 1, "{reqs:?}");
    assert_eq!(reqs[0].nexthop, "[127.0.0.1]:2525");
    assert_eq!(reqs[0].recipients.len(), 3);
    assert_eq!(reqs[0].queue, "active");

    // Deferred, with a retry time in the future.
    assert_eq!(tree.find(&id), Some(Queue::Deferred));
    let mtime = std::fs::metadata(tree.path(Queue::Deferred, &id))
        .unwrap()
        .modified()
        .unwrap();
    assert!(mtime > SystemTime::now() + Duration::from_secs(50));
    assert_eq!(
        pending(tree, Queue::Deferred, &id),
        ["defer@remote.test", "x@nowhere.test"]
    );
    let defers = delivery::read_log(tree, MessageLog::Defer, &id).unwrap();
    assert_eq!(defers.len(), 2);
    assert!(defers
        .iter()
        .any(|e| e.recipient == "x@nowhere.test" && e.reason == "mail transport unavailable"));
    assert!(!tree.log_path(MessageLog::Bounce, &id).exists());

    // The notice for the two bounced recipients.
    {
        let all = env.notices.lock().unwrap();
        // notify_classes' default (resource, software): the postmaster
        // hears of the recipient whose transport is missing.
        let (sender, postmaster): (Vec<_>, Vec<_>) =
            all.iter().partition(|n| n.0.sender.is_empty());
        assert_eq!(postmaster.len(), 1);
        assert!(postmaster[0]
            .1
            .contains("Mail Not Delivered (software problem)"));
        assert!(postmaster[0]
            .1
            .contains("Final-Recipient: rfc822; x@nowhere.test"));
        let notices = sender;
        assert_eq!(notices.len(), 1);
        let (nm, body) = &notices[0];
        assert_eq!(nm.sender, "");
        assert_eq!(nm.recipients[0].address, "alice@example.test");
        assert_eq!(nm.flags, ipc::cleanup_flags::NOTIFICATION);
        assert!(body.contains("Final-Recipient: rfc822; bounce@remote.test"));
        assert!(body.contains("Diagnostic-Code: smtp; 550 5.1.1 no such user"));
        assert!(body.contains("Final-Recipient: rfc822; err@gone.test"));
        assert!(body.contains("Status: 5.1.2"));
        assert!(body.contains("<err@gone.test>: bad domain"));
        // Without RET, the whole message comes back (bounce_size_limit).
        assert!(body.contains("Content-Type: message/rfc822\n"));
        assert!(body.contains("Subject: test message\nFrom: someone\n\n"));
        assert!(!body.contains("defer@remote.test"));
    }

    // A later qmgr, to which the message is too old: flushed, tried once
    // more, then returned and removed.
    drop(m);
    let mut m = Manager::new(&config(&env, "maximal_queue_lifetime = 0\n"));
    m.start();
    drive(&mut m);
    assert_eq!(tree.find(&id), Some(Queue::Deferred), "not due yet");
    m.handle(Event::Wakeup(b"F".to_vec()));
    drive(&mut m);
    assert_eq!(tree.find(&id), None);
    assert!(!tree.log_path(MessageLog::Defer, &id).exists());
    assert!(!tree.log_path(MessageLog::Bounce, &id).exists());
    let all = env.notices.lock().unwrap();
    let notices: Vec<_> = all.iter().filter(|n| n.0.sender.is_empty()).collect();
    assert_eq!(notices.len(), 2);
    let body = &notices[1].1;
    assert!(body.contains("Final-Recipient: rfc822; defer@remote.test"));
    assert!(body.contains("Status: 4.2.0"));
    assert!(body.contains("450 4.2.0 try later"));
    assert!(body.contains("Final-Recipient: rfc822; x@nowhere.test"));
    assert!(!body.contains("bounce@remote.test"));
}

#[test]
fn recovery_corruption_locks_and_crashes() {
    let env = setup("misc");
    let tree = &env.tree;
    // Left in active by a qmgr that was killed.
    let left = queue_message(tree, Queue::Active, "a@example.test", &["ok@remote.test"]);
    // Garbage that looks complete.
    let bad = tree.create(Queue::Incoming).unwrap();
    {
        use std::io::Write;
        use std::os::unix::fs::PermissionsExt;
        let mut f = bad.file;
        f.write_all(b"garbage\0E\0\0\0\0").unwrap();
        f.set_permissions(std::fs::Permissions::from_mode(0o700))
            .unwrap();
    }
    // Still being written.
    let writing = tree.create(Queue::Incoming).unwrap();
    // Being delivered by an agent of a qmgr before this one.
    let busy = queue_message(
        tree,
        Queue::Incoming,
        "b@example.test",
        &["ok2@remote.test"],
    );
    let lock = std::fs::File::open(tree.path(Queue::Incoming, &busy)).unwrap();
    lock.lock_shared().unwrap();
    // Bounces of a bounce are not answered.
    let null = queue_message(tree, Queue::Incoming, "", &["bounce@remote.test"]);
    // An agent that dies.
    let crash = queue_message(
        tree,
        Queue::Incoming,
        "c@example.test",
        &["crash@remote.test"],
    );

    let mut m = Manager::new(&config(&env, ""));
    m.start();
    drive(&mut m);

    assert_eq!(tree.find(&left), None, "recovered and delivered");
    assert_eq!(tree.find(&bad.id), Some(Queue::Corrupt));
    assert_eq!(tree.find(&writing.id), Some(Queue::Incoming));
    assert_eq!(tree.find(&busy), Some(Queue::Deferred));
    assert_eq!(tree.find(&null), None);
    // No notice but the postmaster's of the crashed agent (software).
    let notices = env.notices.lock().unwrap().clone();
    assert_eq!(notices.len(), 1, "{notices:?}");
    assert_eq!(notices[0].0.sender, "double-bounce");
    assert!(notices[0]
        .1
        .contains("Final-Recipient: rfc822; crash@remote.test"));
    assert!(notices[0].1.contains("unknown mail transport error"));
    assert_eq!(tree.find(&crash), Some(Queue::Deferred));
    let d = delivery::read_log(tree, MessageLog::Defer, &crash).unwrap();
    assert_eq!(d.len(), 1);
    assert_eq!(d[0].reason, "unknown mail transport error");
    let reqs = env.requests.lock().unwrap();
    assert!(!reqs.iter().any(|r| r.queue_id == busy));
    assert!(reqs.iter().any(|r| r.queue_id == left));
}

#[test]
fn local_recipients_one_per_request() {
    let env = setup("local");
    let tree = &env.tree;
    agent(tree, "local", env.requests.clone());
    let id = queue_message(
        tree,
        Queue::Incoming,
        "a@example.test",
        &[
            "u1@mx.test",
            "u2@mx.test",
            "u3",
            "r1@remote.test",
            "r2@remote.test",
        ],
    );
    let mut m = Manager::new(&config(&env, ""));
    m.start();
    drive(&mut m);
    assert_eq!(tree.find(&id), None);
    let reqs = env.requests.lock().unwrap();
    let local: Vec<_> = reqs.iter().filter(|r| r.transport == "local").collect();
    assert_eq!(local.len(), 3);
    assert!(local
        .iter()
        .all(|r| r.recipients.len() == 1 && r.nexthop == "mx.test"));
    let smtp: Vec<_> = reqs.iter().filter(|r| r.transport == "smtp").collect();
    assert_eq!(smtp.len(), 1);
    assert_eq!(smtp[0].recipients.len(), 2);
}

#[test]
fn notice_waits_for_cleanup() {
    let env = setup_without_cleanup("nocleanup");
    let tree = &env.tree;
    let id = queue_message(
        tree,
        Queue::Incoming,
        "a@example.test",
        &["bounce@remote.test"],
    );
    let mut m = Manager::new(&config(&env, ""));
    m.start();
    drive(&mut m);
    // Every recipient is done, but the notice could not be queued.
    assert_eq!(tree.find(&id), Some(Queue::Deferred));
    assert!(pending(tree, Queue::Deferred, &id).is_empty());
    assert!(tree.log_path(MessageLog::Bounce, &id).exists());

    cleanup(tree, env.notices.clone());
    m.handle(Event::Wakeup(b"F".to_vec()));
    drive(&mut m);
    assert_eq!(tree.find(&id), None);
    assert!(!tree.log_path(MessageLog::Bounce, &id).exists());
    let notices = env.notices.lock().unwrap();
    assert_eq!(notices.len(), 1);
    assert!(notices[0]
        .1
        .contains("Final-Recipient: rfc822; bounce@remote.test"));
    assert_eq!(env.requests.lock().unwrap().len(), 1, "not delivered again");
}

/// A cleanup that refuses, once and for a while (temporary failure), the
/// notices to `refuse`, and accepts everything else.
fn choosy_cleanup(tree: &QueueTree, notices: Notices, refuse: &'static str) {
    let l = UnixListener::bind(tree.cleanup_socket()).unwrap();
    std::thread::spawn(move || {
        let mut refused = false;
        for (n, conn) in l.incoming().enumerate() {
            let mut conn = conn.unwrap();
            let CleanupRequest::Open = ipc::recv(&mut conn).unwrap() else {
                panic!("no Open");
            };
            let CleanupRequest::Envelope(nm) = ipc::recv(&mut conn).unwrap() else {
                panic!("no Envelope");
            };
            if nm.recipients[0].address == refuse && !refused {
                refused = true;
                let no = CleanupReply::Failed {
                    temporary: true,
                    dsn: "4.3.0".into(),
                    reason: "not now".into(),
                };
                ipc::send(&mut conn, &no).unwrap();
                continue;
            }
            let id = format!("BBBBBBBBBBBBB{n:X}");
            let opened = CleanupReply::Opened {
                queue_id: id.clone(),
            };
            ipc::send(&mut conn, &opened).unwrap();
            let mut body = Vec::new();
            loop {
                match ipc::recv(&mut conn).unwrap() {
                    CleanupRequest::Content(c) => body.extend(c),
                    CleanupRequest::Close => break,
                    other => panic!("unexpected {other:?}"),
                }
            }
            ipc::send(&mut conn, &CleanupReply::Queued { queue_id: id }).unwrap();
            let body = String::from_utf8(body).unwrap();
            notices.lock().unwrap().push((nm, body));
        }
    });
}

#[test]
fn a_round_whose_second_notice_fails_sends_the_first_once() {
    let env = setup_without_cleanup("partway");
    let tree = &env.tree;
    choosy_cleanup(tree, env.notices.clone(), "pmcopy@mx.test");
    let id = queue_message(
        tree,
        Queue::Incoming,
        "a@example.test",
        &["bounce@remote.test"],
    );
    let cfg = "notify_classes = bounce\nbounce_notice_recipient = pmcopy@mx.test\n";
    let mut m = Manager::new(&config(&env, cfg));
    m.start();
    drive(&mut m);
    // The sender's notice went; the postmaster's copy was refused: the
    // message waits, and the success log notes the notice that went.
    assert_eq!(tree.find(&id), Some(Queue::Deferred));
    {
        let notices = env.notices.lock().unwrap();
        assert_eq!(notices.len(), 1);
        assert_eq!(notices[0].0.recipients[0].address, "a@example.test");
    }
    let marks = delivery::read_log(tree, MessageLog::Success, &id).unwrap();
    assert_eq!(marks.len(), 1);
    assert_eq!(
        (marks[0].action.as_str(), marks[0].recipient.as_str()),
        ("notified", "bounce")
    );

    // The next round sends the copy only, then the message is done.
    m.handle(Event::Wakeup(b"F".to_vec()));
    drive(&mut m);
    assert_eq!(tree.find(&id), None);
    let notices = env.notices.lock().unwrap();
    let to: Vec<&str> = notices
        .iter()
        .map(|n| n.0.recipients[0].address.as_str())
        .collect();
    assert_eq!(to, ["a@example.test", "pmcopy@mx.test"]);
    assert!(notices[1].1.contains("Postmaster Copy: Undelivered Mail"));
    assert!(notices[1]
        .1
        .contains("Final-Recipient: rfc822; bounce@remote.test"));
    assert!(!tree.log_path(MessageLog::Bounce, &id).exists());
    assert!(!tree.log_path(MessageLog::Success, &id).exists());
    assert_eq!(env.requests.lock().unwrap().len(), 1, "not delivered again");
}
