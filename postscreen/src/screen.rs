//! One client's screening, in Postfix's order: the permanent access list
//! (`postscreen_access_list`), the allowlist cache (`PASS OLD`), then the
//! tests before the greeting — pregreet (the `220-` teaser and
//! `postscreen_greet_wait`) and the DNSBL score, looked up meanwhile —,
//! the verdict, and the hand-off to smtpd or the failed client's end.
//! The log lines are Postfix's, which log watchers such as fail2ban read.

use crate::cache::{now, Cache, Expiry};
use crate::dnsbl::Score;
use crate::dummy_smtp::Deep;
use crate::settings::{AccessItem, Action, Settings};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use postern_common::delivery::fmt_delay;
use postern_common::{info, warning};
use std::collections::HashMap;
use std::io::Write;
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// `[addr]:port` as Postfix's postscreen writes a client.
pub struct Client(pub SocketAddr);

impl std::fmt::Display for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ip = postern_common::cidr::normalize(self.0.ip());
        write!(f, "[{ip}]:{}", self.0.port())
    }
}

/// What the permanent access list says of a client.
#[derive(Debug, PartialEq)]
enum Listed {
    Allow,
    Deny,
    Neither,
}

fn access(s: &Settings, ip: IpAddr) -> Listed {
    for item in &s.access_list {
        match item {
            AccessItem::PermitMynetworks => {
                if s.mynetworks.matches_addr(ip).unwrap_or(false) {
                    return Listed::Allow;
                }
            }
            AccessItem::Table(t) => match t.lookup(&ip.to_string()) {
                Ok(Some(v)) => match v.trim().to_ascii_lowercase().as_str() {
                    "permit" => return Listed::Allow,
                    "reject" => return Listed::Deny,
                    "dunno" => {}
                    other => warning!(
                        "postscreen_access_list: {}: unknown action \"{other}\" for {ip}: \
                         expected permit, reject or dunno",
                        t.spec().unwrap_or("table")
                    ),
                },
                Ok(None) => {}
                Err(e) => warning!("postscreen_access_list: lookup {ip}: {e:?}"),
            },
        }
    }
    Listed::Neither
}

/// What the client threads share.
#[derive(Default)]
pub struct Shared {
    pub cache: Mutex<Option<Cache>>,
    /// Connections in postscreen, per client address.
    per_client: Mutex<HashMap<IpAddr, u64>>,
    /// Clients in the tests (not those let through at once).
    screening: AtomicU64,
}

impl Shared {
    pub fn new(cache: Cache) -> Shared {
        Shared {
            cache: Mutex::new(Some(cache)),
            ..Default::default()
        }
    }

    fn cached(&self, ip: IpAddr) -> Option<Expiry> {
        self.cache.lock().unwrap().as_ref().and_then(|c| c.get(ip))
    }

    fn record(&self, ip: IpAddr, e: Expiry) {
        if let Some(c) = self.cache.lock().unwrap().as_mut() {
            c.put(ip, e);
        }
    }
}

/// Gives a count back when the client leaves, however it leaves.
struct OnDrop<F: Fn()>(F);

impl<F: Fn()> Drop for OnDrop<F> {
    fn drop(&mut self) {
        (self.0)();
    }
}

impl Shared {
    /// Counts a new connection of `ip` (in the accepting thread, before
    /// the client's own starts, so that a burst is counted whole); the
    /// count with it.
    pub fn enter(&self, ip: IpAddr) -> u64 {
        let mut m = self.per_client.lock().unwrap();
        let n = m.entry(postern_common::cidr::normalize(ip)).or_insert(0);
        *n += 1;
        *n
    }

    fn leave(&self, ip: IpAddr) {
        let mut m = self.per_client.lock().unwrap();
        if let Some(n) = m.get_mut(&ip) {
            *n -= 1;
            if *n == 0 {
                m.remove(&ip);
            }
        }
    }
}

/// Screens one client (the `n`th connection of its address, counted by
/// [`Shared::enter`]) and hands it over or ends its connection.
pub fn screen(s: &Settings, shared: &Shared, sock: TcpStream, peer: SocketAddr, n: u64) {
    let ip = postern_common::cidr::normalize(peer.ip());
    let _held = OnDrop(|| shared.leave(ip));
    screen_held(s, shared, sock, peer, n)
}

fn screen_held(s: &Settings, shared: &Shared, mut sock: TcpStream, peer: SocketAddr, n: u64) {
    let start = Instant::now();
    let client = Client(peer);
    let ip = postern_common::cidr::normalize(peer.ip());
    let local = sock
        .local_addr()
        .map(|a| Client(a).to_string())
        .unwrap_or_else(|_| "[unknown]:0".into());
    info!("CONNECT from {client} to {local}");
    if s.client_connection_count_limit > 0 && n > s.client_connection_count_limit {
        info!("NOQUEUE: reject: CONNECT from {client}: too many connections");
        return drop_client(sock, &client, "421 4.7.0 Error: too many connections");
    }
    // The reply a client that fails under `enforce` gets at RCPT TO.
    let mut enforce: Option<String> = None;
    match access(s, ip) {
        Listed::Allow => {
            info!("ALLOWLISTED {client}");
            return hand_off(s, sock, &client);
        }
        Listed::Deny => {
            info!("DENYLISTED {client}");
            match s.denylist_action {
                Action::Drop => {
                    return drop_client(sock, &client, "521 5.3.2 Service currently unavailable")
                }
                Action::Enforce => enforce = Some("550 5.3.2 Service currently unavailable".into()),
                Action::Ignore => {}
            }
        }
        Listed::Neither => {}
    }
    let t = now();
    let dnsbl_on = !s.dnsbl.is_empty();
    if enforce.is_none() {
        let cached = shared.cached(ip);
        if let Some(e) = cached {
            if e.pregreet > t
                && (!dnsbl_on || e.dnsbl > t)
                && deep_todo(s, &e, t) == Deep::default()
            {
                info!("PASS OLD {client}");
                return hand_off(s, sock, &client);
            }
        }
    }
    if s.pre_queue_limit > 0 && shared.screening.load(Ordering::SeqCst) >= s.pre_queue_limit {
        info!("reject: connect from {client}: all screening ports busy");
        return drop_client(sock, &client, "421 4.3.2 All screening ports are busy");
    }
    shared.screening.fetch_add(1, Ordering::SeqCst);
    let _screening = OnDrop(|| {
        shared.screening.fetch_sub(1, Ordering::SeqCst);
    });
    // The DNS lists are asked while the client is made to wait.
    let dnsbl_rx = dnsbl_on.then(|| {
        let (tx, rx) = mpsc::channel();
        let (sites, servers, timeout) = (s.dnsbl.clone(), s.dns_servers.clone(), s.dnsbl_timeout);
        std::thread::spawn(move || {
            let _ = tx.send(sites.score(&servers, timeout, ip));
        });
        rx
    });
    if !s.greet_banner.is_empty() {
        let teaser = format!("220-{}\r\n", s.greet_banner);
        if sock.write_all(teaser.as_bytes()).is_err() {
            return hangup(&client, start);
        }
    }
    let mut score: Option<Score> = None;
    let mut pregreet_failed = false;
    loop {
        let left = s.greet_wait.saturating_sub(start.elapsed());
        if left.is_zero() {
            break;
        }
        if let (Some(rx), None) = (&dnsbl_rx, &score) {
            if let Ok(sc) = rx.try_recv() {
                // A client the allowlists vouch for needs no more waiting.
                if s.dnsbl_allowlist_threshold < 0 && sc.score <= s.dnsbl_allowlist_threshold {
                    score = Some(sc);
                    break;
                }
                score = Some(sc);
            }
        }
        if !readable(&sock, left.min(Duration::from_millis(50))) {
            continue;
        }
        let mut buf = [0u8; 1024];
        let n = peek(&sock, &mut buf);
        if n == 0 {
            return hangup(&client, start);
        }
        info!(
            "PREGREET {n} after {} from {client}: {}",
            fmt_delay(start.elapsed().as_secs_f64()),
            escape(&buf[..n], 100)
        );
        pregreet_failed = true;
        match s.greet_action {
            Action::Drop => return drop_client(sock, &client, "521 5.5.1 Protocol error"),
            Action::Enforce => {
                enforce.get_or_insert_with(|| "550 5.5.1 Protocol error".into());
            }
            Action::Ignore => {}
        }
        break;
    }
    // What the lists said by the end of the wait (Postfix too goes on
    // with a partial score).
    if let (Some(rx), None) = (&dnsbl_rx, &score) {
        let left = s.greet_wait.saturating_sub(start.elapsed());
        score = rx.recv_timeout(left.max(Duration::from_millis(10))).ok();
    }
    let mut dnsbl_failed = false;
    if let Some(sc) = &score {
        if sc.score >= s.dnsbl_threshold {
            info!("DNSBL rank {} for {client}", sc.score);
            dnsbl_failed = true;
            let name = sc.name.clone().unwrap_or_default();
            let shown = s
                .dnsbl_reply_map
                .as_ref()
                .and_then(|m| m.lookup(&name).ok().flatten().map(|v| v.to_string()))
                .unwrap_or(name);
            let reply = |code: &str| {
                format!("{code} 5.7.1 Service unavailable; client [{ip}] blocked using {shown}")
            };
            match s.dnsbl_action {
                Action::Drop => return drop_client(sock, &client, &reply("521")),
                Action::Enforce => {
                    enforce.get_or_insert_with(|| reply("550"));
                }
                Action::Ignore => {}
            }
        }
    }
    if let Some(reply) = enforce {
        // A client that failed gets every deep test, as in Postfix; one
        // that talked first gets no greeting.
        let all = Deep {
            pipelining: true,
            non_smtp_command: true,
            bare_newline: true,
        };
        crate::dummy_smtp::run(s, sock, &client, !pregreet_failed, &reply, all);
        info!("DISCONNECT {client}");
        return;
    }
    // Record what passed; a test failed under `ignore` is run again next
    // time.
    let t = now();
    let mut e = shared.cached(ip).unwrap_or_default();
    if !pregreet_failed {
        e.pregreet = t + s.greet_ttl;
    }
    if let Some(sc) = score.as_ref().filter(|_| !dnsbl_failed) {
        let ttl = sc
            .ttl
            .unwrap_or(s.dnsbl_min_ttl)
            .clamp(s.dnsbl_min_ttl, s.dnsbl_max_ttl.max(s.dnsbl_min_ttl));
        e.dnsbl = t + ttl;
        // A client the allowlists vouch for skips the other tests, which
        // count as passed for as long as its DNSBL result.
        if s.dnsbl_allowlist_threshold < 0 && sc.score <= s.dnsbl_allowlist_threshold {
            for test in [
                &mut e.pipelining,
                &mut e.non_smtp_command,
                &mut e.bare_newline,
            ] {
                *test = (*test).max(t + ttl);
            }
        }
    }
    // The deep tests still to pass keep the client in postscreen's own
    // dialogue: it is told to come back (450), and is let through then.
    let todo = deep_todo(s, &e, t);
    let mut deep_failed = false;
    if todo != Deep::default() {
        let Ok(dialogue) = sock.try_clone() else {
            return;
        };
        let o = crate::dummy_smtp::run(
            s,
            dialogue,
            &client,
            true,
            "450 4.3.2 Service currently unavailable",
            todo,
        );
        let t = now();
        for (asked, failed, test, expiry) in [
            (
                todo.pipelining,
                o.failed.pipelining,
                &s.pipelining,
                &mut e.pipelining,
            ),
            (
                todo.non_smtp_command,
                o.failed.non_smtp_command,
                &s.non_smtp_command,
                &mut e.non_smtp_command,
            ),
            (
                todo.bare_newline,
                o.failed.bare_newline,
                &s.bare_newline,
                &mut e.bare_newline,
            ),
        ] {
            if asked && !failed && !o.dropped {
                *expiry = t + test.ttl;
            }
            deep_failed |= failed;
        }
    }
    if !pregreet_failed && !dnsbl_failed && !deep_failed {
        info!("PASS NEW {client}");
    }
    if e != Expiry::default() {
        shared.record(ip, e);
    }
    if todo != Deep::default() {
        info!("DISCONNECT {client}");
        return;
    }
    hand_off(s, sock, &client)
}

/// The enabled deep tests whose pass has expired (or never was).
fn deep_todo(s: &Settings, e: &Expiry, t: u64) -> Deep {
    Deep {
        pipelining: s.pipelining.enabled && e.pipelining <= t,
        non_smtp_command: s.non_smtp_command.enabled && e.non_smtp_command <= t,
        bare_newline: s.bare_newline.enabled && e.bare_newline <= t,
    }
}

/// Passes the client's descriptor to the `smtpd pass` service, which
/// greets it; a client that cannot be handed over is told to come back.
fn hand_off(s: &Settings, mut sock: TcpStream, client: &Client) {
    let path = s
        .queue_directory
        .join("private")
        .join(&s.smtpd_service_name);
    let sent = UnixStream::connect(&path).and_then(|c| postern_common::pass_fd::send_fd(&c, &sock));
    if let Err(e) = sent {
        warning!(
            "cannot hand {client} to the {} service ({}): {e}",
            s.smtpd_service_name,
            path.display()
        );
        let _ = sock.write_all(b"421 4.3.2 All server ports are busy\r\n");
        info!("DISCONNECT {client}");
    }
}

fn drop_client(mut sock: TcpStream, client: &Client, reply: &str) {
    let _ = sock.write_all(format!("{reply}\r\n").as_bytes());
    info!("DISCONNECT {client}");
}

fn hangup(client: &Client, start: Instant) {
    info!(
        "HANGUP after {} from {client} in tests before SMTP handshake",
        fmt_delay(start.elapsed().as_secs_f64())
    );
    info!("DISCONNECT {client}");
}

fn readable(sock: &TcpStream, wait: Duration) -> bool {
    let mut fds = [PollFd::new(sock.as_fd(), PollFlags::POLLIN)];
    let ms = u16::try_from(wait.as_millis()).unwrap_or(u16::MAX);
    matches!(poll(&mut fds, PollTimeout::from(ms)), Ok(n) if n > 0)
}

/// What the client sent, left in the socket (for smtpd, under `ignore`).
fn peek(sock: &TcpStream, buf: &mut [u8]) -> usize {
    // SAFETY: recv into a buffer we own, with its length.
    let n = unsafe {
        libc::recv(
            sock.as_raw_fd(),
            buf.as_mut_ptr().cast(),
            buf.len(),
            libc::MSG_PEEK,
        )
    };
    usize::try_from(n).unwrap_or(0)
}

/// Bytes as Postfix's escape() prints them (`\r`, `\n`, octal for other
/// controls), cut at `max` characters.
pub fn escape(b: &[u8], max: usize) -> String {
    let mut out = String::new();
    for &c in b {
        match c {
            b'\r' => out.push_str("\\r"),
            b'\n' => out.push_str("\\n"),
            b'\t' => out.push_str("\\t"),
            b'\\' => out.push_str("\\\\"),
            0x20..=0x7e => out.push(c as char),
            _ => out.push_str(&format!("\\{c:03o}")),
        }
    }
    out.chars().take(max).collect()
}

#[cfg(test)]
mod tests {
    #[test]
    fn escapes_like_postfix() {
        assert_eq!(super::escape(b"EHLO x\r\n", 100), "EHLO x\\r\\n");
        assert_eq!(super::escape(b"\x01a", 3), "\\00");
    }
}
