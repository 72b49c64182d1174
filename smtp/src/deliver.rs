//! One delivery request, from next hop to recorded outcomes.
//!
//! [`Agent::deliver`] parses the request's next hop, finds the servers to
//! try ([`crate::nexthop`], with DNS from [`crate::dns`]), connects to
//! each address in turn within `smtp_connect_timeout`, and runs the SMTP
//! conversation ([`crate::client`]) until every recipient has an outcome.
//! A server that cannot be reached, or that ends the session before any
//! content was sent, passes the recipients still without an outcome on to
//! the next address; at most `smtp_mx_session_limit` servers that got as
//! far as EHLO are tried. What is left when no address remains is
//! deferred with the last reason, and when no server even completed the
//! handshake the destination is reported as failed.

use crate::client::{self, End, Settings, Timeouts, Transaction};
use crate::dns::{self, Resolver};
use crate::nexthop::{self, Failure, NextHop, Server};
use postern_common::delivery::Job;
use postern_common::ipc::{DeliveryRecipient, Outcome};
use postern_conf::Config;
use std::io::{self, Read};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

/// The agent's settings and its DNS resolver, made once per process.
pub struct Agent {
    settings: Settings,
    connect_timeout: Duration,
    options: nexthop::Options,
    /// Most sessions per request that got past EHLO; 0 = no limit.
    session_limit: usize,
    dns_servers: Vec<SocketAddr>,
    dns_timeout: Duration,
    /// Started on first use: a delivery to `[address]` needs no DNS.
    resolver: Option<Resolver>,
}

/// A time parameter, with its default when the setting is unusable.
fn time(cfg: &Config, name: &str) -> Duration {
    let secs = cfg.get_time(name).unwrap_or_else(|e| {
        postern_common::warning!("{e}; using the default");
        postern_conf::params::default_of(name)
            .and_then(postern_conf::parse_time)
            .unwrap_or(300)
    });
    Duration::from_secs(secs)
}

fn number(cfg: &Config, name: &str) -> usize {
    cfg.get_u64(name).unwrap_or_else(|e| {
        postern_common::warning!("{e}; using the default");
        postern_conf::params::default_of(name)
            .and_then(|d| d.parse().ok())
            .unwrap_or(0)
    }) as usize
}

impl Agent {
    /// Reads the `smtp_*`, `inet_protocols` and `dns_resolver_*`
    /// parameters.
    pub fn from_config(cfg: &Config) -> Agent {
        let dns_servers = cfg
            .get_list("dns_resolver_addresses")
            .iter()
            .filter_map(|item| {
                let sa = dns::parse_server(item);
                if sa.is_none() {
                    postern_common::warning!(
                        "dns_resolver_addresses: ignoring \"{item}\": expected address or address:port"
                    );
                }
                sa
            })
            .collect();
        Agent {
            settings: Settings {
                helo_name: cfg.get("smtp_helo_name"),
                timeouts: Timeouts {
                    helo: time(cfg, "smtp_helo_timeout"),
                    mail: time(cfg, "smtp_mail_timeout"),
                    rcpt: time(cfg, "smtp_rcpt_timeout"),
                    data_init: time(cfg, "smtp_data_init_timeout"),
                    data_xfer: time(cfg, "smtp_data_xfer_timeout"),
                    data_done: time(cfg, "smtp_data_done_timeout"),
                    quit: time(cfg, "smtp_quit_timeout"),
                },
            },
            connect_timeout: time(cfg, "smtp_connect_timeout"),
            options: nexthop::Options::protocols(
                &cfg.get_list("inet_protocols"),
                number(cfg, "smtp_mx_address_limit"),
            ),
            session_limit: number(cfg, "smtp_mx_session_limit"),
            dns_servers,
            dns_timeout: time(cfg, "dns_resolver_timeout"),
            resolver: None,
        }
    }

    fn resolver(&mut self) -> Result<&Resolver, String> {
        if self.resolver.is_none() {
            self.resolver = Some(Resolver::new(&self.dns_servers, self.dns_timeout)?);
        }
        Ok(self.resolver.as_ref().expect("just set"))
    }

    /// The servers for a next hop.
    fn servers(&mut self, hop: &NextHop) -> Result<Vec<Server>, Failure> {
        let options = self.options.clone();
        if !hop.mx {
            if let Ok(addr) = hop.host.parse() {
                return Ok(vec![Server {
                    name: hop.host.clone(),
                    addr,
                    port: hop.port,
                }]);
            }
        }
        match self.resolver() {
            Ok(r) => nexthop::servers(hop, r, &options),
            Err(e) => {
                postern_common::warning!("{e}");
                Err(Failure {
                    dsn: "4.3.0".into(),
                    reason: format!("DNS resolver unavailable: {e}"),
                })
            }
        }
    }

    /// Delivers one request: every recipient gets an outcome.
    pub fn deliver(&mut self, job: &mut Job) {
        if job.unfinished().is_empty() {
            return;
        }
        let dest = if job.req.nexthop.trim().is_empty() {
            postern_common::addr::domain(&job.req.recipients[0].rcpt.address)
        } else {
            job.req.nexthop.clone()
        };
        let hop = match nexthop::parse(&dest) {
            Ok(h) => h,
            Err(reason) => {
                postern_common::warning!("{}: {reason}", job.req.queue_id);
                job.record_rest(Outcome::Deferred, "4.3.5", "none", &reason);
                return;
            }
        };
        match self.servers(&hop) {
            Ok(list) => self.try_servers(job, &list),
            Err(f) => {
                if f.is_permanent() {
                    job.record_rest(Outcome::Bounced, &f.dsn, "none", &f.reason);
                } else {
                    job.destination_failed();
                    job.record_rest(Outcome::Deferred, &f.dsn, "none", &f.reason);
                }
            }
        }
    }

    /// Tries each server in turn until every recipient has an outcome.
    pub fn try_servers(&self, job: &mut Job, servers: &[Server]) {
        let mut last: Option<(Failure, String)> = None;
        let mut sessions = 0;
        let mut eight_bit = None;
        for (k, srv) in servers.iter().enumerate() {
            if job.unfinished().is_empty() {
                break;
            }
            if self.session_limit > 0 && sessions >= self.session_limit {
                break;
            }
            let more = k + 1 < servers.len();
            let stream = match connect(srv, self.connect_timeout) {
                Ok(s) => s,
                Err(e) => {
                    let f = Failure {
                        dsn: "4.4.1".into(),
                        reason: format!(
                            "connect to {}:{}: {}",
                            srv.namaddr(),
                            srv.port,
                            strerror(&e)
                        ),
                    };
                    if more {
                        postern_common::info!("{}: {}", job.req.queue_id, f.reason);
                    }
                    last = Some((f, "none".into()));
                    continue;
                }
            };
            let rcpts = job.unfinished();
            let mut txn = JobTransaction {
                addrs: rcpts.iter().map(|r| r.rcpt.address.clone()).collect(),
                rcpts,
                relay: srv.relay(),
                eight_bit: &mut eight_bit,
                job,
            };
            match client::deliver(stream, srv, &self.settings, &mut txn) {
                End::Complete => {
                    sessions += 1;
                    last = None;
                }
                End::TryNext { failure, handshake } => {
                    if handshake {
                        sessions += 1;
                    }
                    if more {
                        postern_common::info!("{}: {}", job.req.queue_id, failure.reason);
                    }
                    last = Some((failure, srv.relay()));
                }
            }
        }
        if job.unfinished().is_empty() {
            return;
        }
        let (f, relay) = last.unwrap_or_else(|| {
            (
                Failure {
                    dsn: "4.4.0".into(),
                    reason: "no server to deliver to".into(),
                },
                "none".into(),
            )
        });
        if sessions == 0 {
            job.destination_failed();
        }
        // What is left may succeed later: never a bounce.
        let mut dsn = f.dsn;
        if !dsn.starts_with('4') {
            dsn.replace_range(0..1, "4");
        }
        job.record_rest(Outcome::Deferred, &dsn, &relay, &f.reason);
    }
}

/// Connects within `timeout` (zero: the system's own limit).
fn connect(srv: &Server, timeout: Duration) -> io::Result<TcpStream> {
    let sa = SocketAddr::new(srv.addr, srv.port);
    if timeout.is_zero() {
        TcpStream::connect(sa)
    } else {
        TcpStream::connect_timeout(&sa, timeout)
    }
}

/// The system's text for an error ("Connection refused"), as Postfix's %m.
fn strerror(e: &io::Error) -> String {
    match e.raw_os_error() {
        Some(n) => nix::errno::Errno::from_raw(n).desc().to_string(),
        None if e.kind() == io::ErrorKind::TimedOut => "Connection timed out".into(),
        None => e.to_string(),
    }
}

/// A delivery request as one session sees it: the recipients still
/// without an outcome when the session started.
struct JobTransaction<'a> {
    job: &'a mut Job,
    rcpts: Vec<DeliveryRecipient>,
    addrs: Vec<String>,
    relay: String,
    /// Whether the content has 8-bit bytes, once looked at.
    eight_bit: &'a mut Option<bool>,
}

impl Transaction for JobTransaction<'_> {
    fn sender(&self) -> &str {
        &self.job.req.sender
    }

    fn recipients(&self) -> &[String] {
        &self.addrs
    }

    fn content_size(&self) -> u64 {
        self.job.req.content_size
    }

    fn eight_bit(&mut self) -> io::Result<bool> {
        if let Some(b) = *self.eight_bit {
            return Ok(b);
        }
        let mut r = self.job.content()?;
        let mut buf = vec![0u8; 64 * 1024];
        let found = loop {
            let n = r.read(&mut buf)?;
            if n == 0 {
                break false;
            }
            if buf[..n].iter().any(|&b| b >= 0x80) {
                break true;
            }
        };
        *self.eight_bit = Some(found);
        Ok(found)
    }

    fn content(&mut self) -> io::Result<Box<dyn Read + '_>> {
        Ok(Box::new(self.job.content()?))
    }

    fn connected(&mut self) {
        self.job.connected();
    }

    fn record(&mut self, i: usize, outcome: Outcome, dsn: &str, reason: &str) {
        self.job
            .record(&self.rcpts[i], outcome, dsn, &self.relay, reason);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use postern_common::ipc::DeliveryRequest;
    use postern_common::qfile::{self, Recipient};
    use postern_common::queue::{MessageLog, Queue, QueueTree};
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
        };
        let job = Job::open(&tree, req).unwrap();
        (tree, job)
    }

    fn agent() -> Agent {
        let cfg = Config::from_text(
            std::path::Path::new("/nonexistent"),
            "smtp_helo_name = client.test\nsmtp_connect_timeout = 2s\nsmtp_helo_timeout = 5s\n",
            std::path::Path::new("main.cf"),
        )
        .unwrap();
        Agent::from_config(&cfg)
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
                    loop {
                        let mut l = Vec::new();
                        r.read_until(b'\n', &mut l).unwrap();
                        if l == b".\r\n" {
                            break;
                        }
                        msg.extend_from_slice(&l);
                    }
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
        let mut a = agent();
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
        let mut agent = Agent::from_config(&cfg);
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
}
