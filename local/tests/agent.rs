//! The `local` binary end to end: a queue file in a temporary queue, a
//! delivery request on `private/local`, a fake cleanup for forwarded
//! mail. As root with the account `ptalice`, deliveries go to ptalice
//! (and files and commands run as nobody); otherwise to the user running
//! the test.

use postern_common::ipc::{
    self, CleanupReply, CleanupRequest, DeliveryRecipient, DeliveryReply, DeliveryRequest,
    NewMessage, Outcome,
};
use postern_common::qfile::{self, Recipient};
use postern_common::queue::{Queue, QueueTree};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

struct Env {
    dir: PathBuf,
    tree: QueueTree,
    user: String,
    uid: u32,
    root: bool,
}

fn user() -> (String, u32, bool) {
    // SAFETY: plain getter.
    let euid = unsafe { libc::geteuid() };
    if euid == 0 {
        if let Some(a) = postern_common::privs::user("ptalice") {
            return (a.name, a.uid, true);
        }
    }
    let a = postern_common::privs::user_by_uid(euid).expect("an account for the test user");
    (a.name, a.uid, euid == 0)
}

fn setup(name: &str) -> Env {
    let dir = std::env::temp_dir().join(format!("plocal-it-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    let tree = QueueTree::new(dir.join("queue"));
    tree.create_dirs(None, None).unwrap();
    let (user, uid, root) = user();
    for (d, mode) in [
        ("etc", 0o755),
        ("mail", 0o755),
        ("files", 0o777),
        ("maildirs", 0o1777),
    ] {
        std::fs::create_dir_all(dir.join(d)).unwrap();
        std::fs::set_permissions(dir.join(d), std::fs::Permissions::from_mode(mode)).unwrap();
    }
    let d = dir.display();
    std::fs::write(
        dir.join("etc/main.cf"),
        format!(
            "queue_directory = {d}/queue\nmyhostname = host.test\nmydestination = host.test, localhost\n\
             alias_maps = hash:{d}/etc/aliases, nis:mail.aliases\nmail_spool_directory = {d}/mail\n\
             maillog_file = {d}/log\nrecipient_delimiter = +\ndeliver_lock_attempts = 2\n"
        ),
    )
    .unwrap();
    let aliases = format!(
        "list: {user}, {d}/files/archive, \"|cat > {d}/files/cmdout; echo $RECIPIENT $EXTENSION >> {d}/files/cmdout\", \
         far@remote.test, Other@Remote.test\n\
         loop1: loop2\nloop2: loop1\nbusy: \"|echo try later; exit 75\"\n\
         fails: \"|echo no such list; exit 1\"\nhalf: {user}, nosuchuser\n"
    );
    let entries = postern_common::maps::parse_source(&aliases, true).unwrap();
    postern_common::maps::write_hash_db(&dir.join("etc/aliases"), &entries).unwrap();
    Env {
        dir,
        tree,
        user,
        uid,
        root,
    }
}

/// What the fake cleanup was sent: each message and its content.
type Submitted = Arc<Mutex<Vec<(NewMessage, Vec<u8>)>>>;

/// A cleanup that queues whatever it is sent.
fn fake_cleanup(sock: &Path) -> Submitted {
    let got = Arc::new(Mutex::new(Vec::new()));
    let l = UnixListener::bind(sock).unwrap();
    let g = got.clone();
    std::thread::spawn(move || {
        for c in l.incoming() {
            let mut c = c.unwrap();
            let Ok(CleanupRequest::Open) = ipc::recv::<_, CleanupRequest>(&mut c) else {
                continue;
            };
            let m = match ipc::recv::<_, CleanupRequest>(&mut c) {
                Ok(CleanupRequest::Envelope(m)) => m,
                _ => continue,
            };
            ipc::send(
                &mut c,
                &CleanupReply::Opened {
                    queue_id: "X".into(),
                },
            )
            .unwrap();
            let mut data = Vec::new();
            while let Ok(CleanupRequest::Content(b)) = ipc::recv::<_, CleanupRequest>(&mut c) {
                data.extend_from_slice(&b);
            }
            let n = g.lock().unwrap().len();
            ipc::send(
                &mut c,
                &CleanupReply::Queued {
                    queue_id: format!("FEEDFACE000{n:03}"),
                },
            )
            .unwrap();
            g.lock().unwrap().push((m, data));
        }
    });
    got
}

/// Starts `local` as master would, with the listener on fd 3.
fn start_local(env: &Env, overrides: &[&str]) -> std::process::Child {
    let sock = env.tree.socket(true, "local");
    let _ = std::fs::remove_file(&sock);
    let l = UnixListener::bind(&sock).unwrap();
    let fd = l.as_raw_fd();
    // Master's status pipe; without it the log file would take fd 4.
    let status = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/null")
        .unwrap();
    let sfd = status.as_raw_fd();
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_local"));
    cmd.arg("-c")
        .arg(env.dir.join("etc"))
        .args(["-n", "local", "-t", "unix"]);
    for o in overrides {
        cmd.args(["-o", o]);
    }
    // SAFETY: dup2 between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            for (from, to) in [(fd, 3), (sfd, 4)] {
                let r = if from == to {
                    libc::fcntl(to, libc::F_SETFD, 0)
                } else {
                    libc::dup2(from, to)
                };
                if r == -1 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    let child = cmd.spawn().unwrap();
    drop(l);
    drop(status);
    child
}

/// Queues a message in `active/` and asks `local` to deliver it.
fn deliver(env: &Env, sender: &str, rcpts: &[&str], content: &[u8]) -> (String, DeliveryReply) {
    let (id, req) = queue(env, sender, rcpts, content);
    let mut replies = deliver_batch(env, vec![req]);
    (id, replies.remove(0))
}

/// Sends `local` several requests as one batch (qmgr's
/// `local_delivery_batch_limit`); one reply per request, in order.
fn deliver_batch(env: &Env, reqs: Vec<DeliveryRequest>) -> Vec<DeliveryReply> {
    let mut s = UnixStream::connect(env.tree.socket(true, "local")).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let last = reqs.len() - 1;
    for (i, mut req) in reqs.into_iter().enumerate() {
        if i < last {
            req.flags |= DeliveryRequest::MORE;
        }
        ipc::send(&mut s, &req).unwrap();
    }
    (0..=last).map(|_| ipc::recv(&mut s).unwrap()).collect()
}

/// Queues a message in `active/`; its ID and the request for `local`.
fn queue(env: &Env, sender: &str, rcpts: &[&str], content: &[u8]) -> (String, DeliveryRequest) {
    let nf = env.tree.create(Queue::Active).unwrap();
    let mut w = qfile::Writer::new(nf.file).unwrap();
    w.arrival(1_700_000_000, 0).unwrap();
    w.sender(sender).unwrap();
    for r in rcpts {
        let mut rc = Recipient::new(r);
        if *r == "list@host.test" {
            rc.original = "List@Host.test".into();
        }
        w.recipient(&rc).unwrap();
    }
    w.begin_content().unwrap();
    w.content(content).unwrap();
    let f = w.finish().unwrap();
    let envl = qfile::read_envelope(&f).unwrap();
    let req = DeliveryRequest {
        queue: "active".into(),
        queue_id: nf.id.clone(),
        transport: "local".into(),
        nexthop: "host.test".into(),
        sender: sender.into(),
        arrival_secs: envl.arrival_secs,
        arrival_usecs: envl.arrival_usecs,
        content_offset: envl.content_offset,
        content_size: envl.content_size,
        recipients: envl
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
    (nf.id, req)
}

fn result(reply: &DeliveryReply, i: usize) -> (Outcome, String, String) {
    let r = &reply.results[i];
    (r.outcome, r.dsn.clone(), r.reason.clone())
}

#[test]
fn local_end_to_end() {
    let env = setup("e2e");
    let d = env.dir.display().to_string();
    let u = env.user.clone();
    let got = fake_cleanup(&env.tree.cleanup_socket());
    let mut child = start_local(&env, &[]);

    let msg = b"From: a@x.test\nSubject: hi\n\nFrom the start\nbody\n";
    let rcpts = [
        format!("{u}+Ext@host.test"),
        "list@host.test".to_string(),
        "nosuch@host.test".to_string(),
        "loop1@host.test".to_string(),
        "busy@host.test".to_string(),
        "fails@host.test".to_string(),
        "half@host.test".to_string(),
    ];
    let refs: Vec<&str> = rcpts.iter().map(|s| s.as_str()).collect();
    let (id, reply) = deliver(&env, "a@x.test", &refs, msg);
    assert_eq!(reply.results.len(), 7, "{reply:?}");

    // 1. The user's mailbox (twice: directly and through the list).
    assert_eq!(
        result(&reply, 0),
        (Outcome::Sent, "2.0.0".into(), "delivered to mailbox".into())
    );
    let mbox = std::fs::read_to_string(env.dir.join("mail").join(&u)).unwrap();
    assert!(mbox.starts_with("From a@x.test  "), "{mbox}");
    assert!(mbox.contains(&format!(
        "Return-Path: <a@x.test>\nX-Original-To: {u}+Ext@host.test\nDelivered-To: {u}+Ext@host.test\nFrom: a@x.test\n"
    )), "{mbox}");
    assert!(mbox.contains("\n>From the start\nbody\n\n"), "{mbox}");
    assert_eq!(mbox.matches("\nSubject: hi\n").count(), 3, "{mbox}");
    assert!(
        mbox.contains(&format!(
            "X-Original-To: List@Host.test\nDelivered-To: {u}@host.test\n"
        )),
        "{mbox}"
    );
    let meta = std::fs::metadata(env.dir.join("mail").join(&u)).unwrap();
    assert_eq!(meta.uid(), env.uid);
    assert_eq!(meta.mode() & 0o777, 0o600);

    // 2. The list: mailbox, file, command, two forwards in one message.
    let (o, dsn, reason) = result(&reply, 1);
    assert_eq!((o, dsn.as_str()), (Outcome::Sent, "2.0.0"), "{reason}");
    assert!(reason.contains("delivered to mailbox"), "{reason}");
    assert!(
        reason.contains(&format!("delivered to file: {d}/files/archive")),
        "{reason}"
    );
    assert!(reason.contains("delivered to command: cat >"), "{reason}");
    assert!(reason.contains("forwarded as FEEDFACE000000"), "{reason}");
    let archive = std::fs::read_to_string(env.dir.join("files/archive")).unwrap();
    assert!(
        archive.contains("Delivered-To: list@host.test\n"),
        "{archive}"
    );
    assert!(archive.contains("\n>From the start\n"), "{archive}");
    if env.root {
        let nobody = postern_common::privs::user("nobody").unwrap();
        let m = std::fs::metadata(env.dir.join("files/archive")).unwrap();
        assert_eq!(m.uid(), nobody.uid);
        let m = std::fs::metadata(env.dir.join("files/cmdout")).unwrap();
        assert_eq!(m.uid(), nobody.uid);
    }
    let cmdout = std::fs::read_to_string(env.dir.join("files/cmdout")).unwrap();
    assert!(cmdout.starts_with("From a@x.test  "), "{cmdout}");
    assert!(
        cmdout.contains("\nFrom the start\nbody\nlist@host.test\n"),
        "{cmdout}"
    );
    {
        let got = got.lock().unwrap();
        assert_eq!(got.len(), 1);
        let (m, data) = &got[0];
        assert_eq!(m.sender, "a@x.test");
        let to: Vec<&str> = m.recipients.iter().map(|r| r.address.as_str()).collect();
        assert_eq!(to, ["far@remote.test", "Other@Remote.test"]);
        assert_eq!(
            data.as_slice(),
            &[b"Delivered-To: list@host.test\n".as_slice(), msg].concat()[..]
        );
    }

    // 3. Unknown, loop, temporary failure, failing command, partial failure.
    assert_eq!(
        result(&reply, 2),
        (
            Outcome::Bounced,
            "5.1.1".into(),
            "unknown user: \"nosuch\"".into()
        )
    );
    assert_eq!(
        result(&reply, 3),
        (
            Outcome::Bounced,
            "5.4.6".into(),
            "mail forwarding loop for loop1@host.test".into()
        )
    );
    let (o, dsn, reason) = result(&reply, 4);
    assert_eq!((o, dsn.as_str()), (Outcome::Deferred, "4.3.0"), "{reason}");
    assert_eq!(reason, "temporary failure. Command output: try later");
    let (o, dsn, reason) = result(&reply, 5);
    assert_eq!((o, dsn.as_str()), (Outcome::Bounced, "5.3.0"), "{reason}");
    assert!(reason.ends_with("Command output: no such list"), "{reason}");
    let (o, _, reason) = result(&reply, 6);
    assert_eq!(o, Outcome::Bounced, "{reason}");
    assert_eq!(reason, "unknown user: \"nosuchuser\"");

    // Recorded: sent and bounced recipients are marked done; the log
    // lines name relay=local.
    let f = std::fs::File::open(env.tree.path(Queue::Active, &id)).unwrap();
    let e = qfile::read_envelope(&f).unwrap();
    let done: Vec<bool> = e.recipients.iter().map(|r| r.done).collect();
    assert_eq!(done, [true, true, true, true, false, true, true]);
    let log = String::from_utf8_lossy(&std::fs::read(env.dir.join("log")).unwrap()).into_owned();
    assert!(
        log.contains(&format!("{id}: to=<{u}+Ext@host.test>, relay=local, ")),
        "{log}"
    );
    assert!(log.contains("status=sent (delivered to mailbox)"), "{log}");

    // 4. A message that was already delivered to the recipient: a loop.
    let looped = format!("Delivered-To: {u}@HOST.test\nSubject: again\n\nx\n");
    let (_, reply) = deliver(&env, "", &[&format!("{u}@host.test")], looped.as_bytes());
    assert_eq!(
        result(&reply, 0),
        (
            Outcome::Bounced,
            "5.4.6".into(),
            format!("mail forwarding loop for {u}@host.test")
        )
    );
    let _ = child.kill();
    let _ = child.wait();

    // 5. Maildir in the spool, null sender.
    let mut child = start_local(&env, &[&format!("mail_spool_directory={d}/maildirs/")]);
    let (_, reply) = deliver(
        &env,
        "",
        &[&format!("{u}@host.test")],
        b"Subject: md\n\nbody\n",
    );
    assert_eq!(
        result(&reply, 0),
        (Outcome::Sent, "2.0.0".into(), "delivered to maildir".into())
    );
    let new = env.dir.join("maildirs").join(&u).join("new");
    let files: Vec<_> = std::fs::read_dir(&new)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(files.len(), 1);
    let text = std::fs::read_to_string(&files[0]).unwrap();
    assert_eq!(
        text,
        format!("Return-Path: <>\nX-Original-To: {u}@host.test\nDelivered-To: {u}@host.test\nSubject: md\n\nbody\n")
    );
    assert_eq!(std::fs::metadata(&files[0]).unwrap().uid(), env.uid);
    let _ = child.kill();
    let _ = child.wait();

    // 6. An alias table that cannot be opened: deferred.
    let mut child = start_local(&env, &[&format!("alias_maps=hash:{d}/etc/missing")]);
    let (_, reply) = deliver(&env, "a@x.test", &[&format!("{u}@host.test")], b"x\n");
    assert_eq!(
        result(&reply, 0),
        (
            Outcome::Deferred,
            "4.3.0".into(),
            "alias database unavailable".into()
        )
    );
    let _ = child.kill();
    let _ = child.wait();

    // 7. home_mailbox = Maildir/ (as root only: the real home of ptalice).
    if env.root && u == "ptalice" {
        let mut child = start_local(&env, &["home_mailbox=Maildir/"]);
        let token = format!("plocal-token-{}", std::process::id());
        let body = format!("Subject: {token}\n\nbody\n");
        let (_, reply) = deliver(&env, "a@x.test", &["ptalice@host.test"], body.as_bytes());
        assert_eq!(
            result(&reply, 0),
            (Outcome::Sent, "2.0.0".into(), "delivered to maildir".into())
        );
        let acct = postern_common::privs::user("ptalice").unwrap();
        let new = acct.home.join("Maildir/new");
        let mine: Vec<PathBuf> = std::fs::read_dir(&new)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| {
                std::fs::read_to_string(p)
                    .unwrap_or_default()
                    .contains(&token)
            })
            .collect();
        assert_eq!(mine.len(), 1);
        let m = std::fs::metadata(&mine[0]).unwrap();
        assert_eq!(
            (m.uid(), m.gid(), m.mode() & 0o777),
            (acct.uid, acct.gid, 0o600)
        );
        std::fs::remove_file(&mine[0]).unwrap();
        let _ = child.kill();
        let _ = child.wait();
    }

    // 8. A spool directory like /var/mail (root:mail 2775), as root.
    if let (true, Some(mail_gid)) = (env.root, postern_common::privs::group_id("mail")) {
        let spool = env.dir.join("spool");
        std::fs::create_dir(&spool).unwrap();
        std::os::unix::fs::chown(&spool, Some(0), Some(mail_gid)).unwrap();
        std::fs::set_permissions(&spool, std::fs::Permissions::from_mode(0o2775)).unwrap();
        let mut child = start_local(&env, &[&format!("mail_spool_directory={d}/spool")]);
        let (_, reply) = deliver(&env, "a@x.test", &[&format!("{u}@host.test")], b"x\n");
        assert_eq!(
            result(&reply, 0),
            (Outcome::Sent, "2.0.0".into(), "delivered to mailbox".into())
        );
        let m = std::fs::metadata(spool.join(&u)).unwrap();
        assert_eq!((m.uid(), m.gid()), (env.uid, mail_gid));
        assert!(!spool.join(format!("{u}.lock")).exists());
        let _ = child.kill();
        let _ = child.wait();
    }
    std::fs::remove_dir_all(&env.dir).unwrap();
}

#[test]
fn a_batch_is_recorded_after_its_maildirs_are_synced() {
    let env = setup("batch");
    let d = env.dir.display().to_string();
    let u = env.user.clone();
    let mut child = start_local(&env, &[&format!("mail_spool_directory={d}/maildirs/")]);
    let me = format!("{u}@host.test");
    let reqs: Vec<(String, DeliveryRequest)> = [
        (me.as_str(), "Subject: one\n\n1\n"),
        ("nosuch@host.test", "Subject: two\n\n2\n"),
        (me.as_str(), "Subject: three\n\n3\n"),
    ]
    .iter()
    .map(|(to, body)| queue(&env, "a@x.test", &[to], body.as_bytes()))
    .collect();
    let ids: Vec<String> = reqs.iter().map(|(id, _)| id.clone()).collect();
    let replies = deliver_batch(&env, reqs.into_iter().map(|(_, r)| r).collect());
    let _ = child.kill();
    let _ = child.wait();
    // One reply per request, in the order sent.
    let outcomes: Vec<(Outcome, String)> = replies
        .iter()
        .map(|r| (result(r, 0).0, result(r, 0).1))
        .collect();
    assert_eq!(
        outcomes,
        [
            (Outcome::Sent, "2.0.0".to_string()),
            (Outcome::Bounced, "5.1.1".to_string()),
            (Outcome::Sent, "2.0.0".to_string()),
        ]
    );
    // Both messages in new/, each once; every recipient marked done.
    let new = env.dir.join("maildirs").join(&u).join("new");
    let mut subjects: Vec<String> = std::fs::read_dir(&new)
        .unwrap()
        .map(|e| std::fs::read_to_string(e.unwrap().path()).unwrap())
        .map(|t| {
            t.lines()
                .find(|l| l.starts_with("Subject:"))
                .unwrap()
                .to_string()
        })
        .collect();
    subjects.sort();
    assert_eq!(subjects, ["Subject: one", "Subject: three"]);
    for id in &ids {
        let f = std::fs::File::open(env.tree.path(Queue::Active, id)).unwrap();
        let envl = qfile::read_envelope(&f).unwrap();
        assert_eq!(envl.recipients.len(), 1);
        assert!(envl.recipients[0].done, "{id} not marked done");
    }
    let log = std::fs::read_to_string(env.dir.join("log")).unwrap();
    assert_eq!(
        log.matches("status=sent (delivered to maildir)").count(),
        2,
        "{log}"
    );
}
