//! status: Postern's operator status page and Prometheus metrics, a
//! read-only HTTP service (Postern-only; Postfix has none, its users run
//! postfix_exporter beside it).
//!
//! master starts it for an `inet` service in master.cf, shipped as
//! `127.0.0.1:9154 inet n - n - 1 status` (a loopback address; 9154 is
//! postfix_exporter's port, so a Prometheus job that scraped it finds
//! the same `postfix_*` names here). It serves:
//!
//! - `/`: an HTML page ([`page`]): the queue directories' counts, the
//!   sites of `delivery_policy_maps` with their source, domains, queued
//!   deliveries, mode (normal, backoff, suspended) with the matched rule
//!   or the suspension's reason, the last remote reply, connections and
//!   message rate against their limits, warm-up progress where a source
//!   has a schedule, and a sparkline of recipients delivered, deferred
//!   and bounced per minute over the last hour (inline SVG, no script,
//!   nothing loaded from elsewhere);
//! - `/metrics`: the same in the Prometheus text format ([`metrics`]).
//!
//! Where the data comes from ([`collect`]), per request: qmgr's admin
//! socket `private/qmgr-admin`, asked
//! [`postern_common::ipc::AdminRequest::Status`] (qmgr's sites and the
//! counters it keeps since it started), and the queue directories,
//! whose files it counts and sizes (and, in `deferred/`, whose
//! envelopes it reads for what waits for each site's domains). Nothing
//! is kept between requests, nothing is written.
//!
//! Who may ask: clients whose address is in `status_access` (a CIDR
//! list, default `127.0.0.0/8`); others get 403. The HTTP it speaks
//! ([`http`]) is one GET or HEAD per connection, the request head
//! bounded to [`http::MAX_HEAD`] bytes and [`http::HEAD_TIMEOUT`];
//! a malformed or oversized request gets 400. Nothing in its answers
//! is secret: no parameter values, passwords or message content, only
//! names, counts, limits and the replies remote servers gave.
//!
//! Privileges: it reads its configuration as root, then drops to
//! `mail_owner` ([`postern_common::service::drop_privileges`], in the
//! serving loop) before it accepts its first connection; the request
//! parser never runs as root. Up to [`SLOTS`] requests are served at
//! once, each on a thread.

pub mod collect;
pub mod http;
pub mod metrics;
pub mod page;

use collect::Sources;
use postern_common::cidr::Cidr;
use postern_common::ipc;
use postern_common::queue::QueueTree;
use postern_common::{fatal, info};
use postern_conf::Config;
use std::io::Write;
use std::net::IpAddr;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

/// Requests served at once by one process.
pub const SLOTS: usize = 4;
/// How long a response may take to write.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);

/// What every request needs, read once at start.
pub struct Settings {
    pub access: Vec<Cidr>,
    pub sources: Sources,
    /// The master.cf services whose program is smtp.
    pub smtp_transports: Vec<String>,
    pub hostname: String,
}

/// `status_access`, parsed.
pub fn parse_access(items: &[String]) -> Result<Vec<Cidr>, String> {
    items
        .iter()
        .map(|i| Cidr::parse(i).map_err(|e| format!("status_access: {e}")))
        .collect()
}

impl Settings {
    pub fn from_config(cfg: &Config) -> Settings {
        let access = parse_access(&cfg.get_list("status_access")).unwrap_or_else(|e| fatal!("{e}"));
        let smtp_transports = cfg
            .master_services()
            .unwrap_or_default()
            .into_iter()
            .filter(|s| s.command == "smtp")
            .map(|s| s.name)
            .collect();
        // The queue as the serving process sees it (the service may be
        // chrooted into it).
        let queue = postern_common::service::queue_directory(cfg);
        let tree = QueueTree::configured(&queue, cfg);
        let admin_socket = tree.socket(true, ipc::QMGR_ADMIN_SOCKET);
        Settings {
            access,
            sources: Sources { tree, admin_socket },
            smtp_transports,
            hostname: cfg.get("myhostname"),
        }
    }

    pub fn allowed(&self, ip: IpAddr) -> bool {
        let ip = postern_common::cidr::normalize(ip);
        self.access.iter().any(|c| c.contains(ip))
    }
}

/// The client's address, from the connected socket.
fn peer_ip(conn: &UnixStream) -> Option<IpAddr> {
    use nix::sys::socket::{getpeername, SockaddrStorage};
    let addr: SockaddrStorage = getpeername(conn.as_raw_fd()).ok()?;
    if let Some(a) = addr.as_sockaddr_in() {
        return Some(IpAddr::V4(a.ip()));
    }
    if let Some(a) = addr.as_sockaddr_in6() {
        return Some(IpAddr::V6(a.ip()));
    }
    None
}

/// The answer to one request: (status, content type, body).
pub fn answer(settings: &Settings, req: &http::Request) -> (u16, &'static str, Vec<u8>) {
    match req.path.as_str() {
        "/" | "/index.html" => {
            let snap = settings.sources.snapshot();
            (
                200,
                "text/html; charset=utf-8",
                page::render(&snap, &settings.hostname).into_bytes(),
            )
        }
        "/metrics" => {
            let snap = settings.sources.snapshot();
            let path = settings.sources.admin_socket.display().to_string();
            (
                200,
                metrics::CONTENT_TYPE,
                metrics::render(&snap, &path, &settings.smtp_transports).into_bytes(),
            )
        }
        _ => (
            404,
            "text/plain; charset=utf-8",
            b"404 Not Found: try / or /metrics\n".to_vec(),
        ),
    }
}

/// After a refusal: closes the sending side and reads what the client
/// still sends (a bounded amount, for a bounded time) before closing, so
/// that unread input does not make the kernel reset the connection and
/// lose the answer (a "lingering close").
fn linger(conn: &mut UnixStream) {
    use std::io::Read;
    let _ = conn.shutdown(std::net::Shutdown::Write);
    let _ = conn.set_read_timeout(Some(Duration::from_secs(2)));
    let deadline = Instant::now() + Duration::from_secs(2);
    let mut buf = [0u8; 4096];
    let mut left = 64 * 1024;
    while left > 0 && Instant::now() < deadline {
        match conn.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => left -= n.min(left),
        }
    }
}

/// Serves one connection: one request, one response.
pub fn serve(settings: &Settings, mut conn: UnixStream) {
    if let Some(code) = serve_request(settings, &mut conn) {
        if code >= 400 {
            linger(&mut conn);
        }
    }
}

/// One request: the status code answered, if any.
fn serve_request(settings: &Settings, conn: &mut UnixStream) -> Option<u16> {
    let _ = conn.set_read_timeout(Some(http::HEAD_TIMEOUT));
    let _ = conn.set_write_timeout(Some(WRITE_TIMEOUT));
    let peer = peer_ip(conn);
    let head = http::read_head(conn, Instant::now() + http::HEAD_TIMEOUT);
    let allowed = peer.is_some_and(|ip| settings.allowed(ip));
    let who = peer.map_or("unknown".to_string(), |ip| ip.to_string());
    if !allowed {
        info!("refused {who}: not in status_access");
        let _ = http::refuse(conn, 403, "not in status_access");
        return Some(403);
    }
    let head = match head {
        http::Head::Complete(h) => h,
        http::Head::TooLong => {
            info!("{who}: request head over {} bytes", http::MAX_HEAD);
            let _ = http::refuse(conn, 400, "request head too long");
            return Some(400);
        }
        http::Head::Incomplete => {
            let _ = http::refuse(conn, 400, "incomplete request");
            return Some(400);
        }
    };
    let req = match http::parse(&head) {
        Ok(r) => r,
        Err(r) => {
            info!("{who}: {}", r.reason);
            let _ = http::refuse(conn, r.code, r.reason);
            return Some(r.code);
        }
    };
    let (code, ctype, body) = answer(settings, &req);
    let _ = http::respond(conn, code, ctype, &body, req.method == "HEAD");
    let _ = conn.flush();
    Some(code)
}

/// The service: settings read as root, the privilege drop, then the
/// serving loop. Still root after the drop (a master.cf line with
/// `unpriv` = n): a fatal error, no connection is read.
pub fn run(cfg: &Config) -> ! {
    let settings = std::sync::Arc::new(Settings::from_config(cfg));
    postern_common::service::drop_privileges(cfg);
    // master drops only an unprivileged service (the master.cf unpriv
    // column): the HTTP parser must never run as root.
    if nix::unistd::geteuid().is_root() {
        fatal!(
            "refusing to serve HTTP as root: the unpriv column of the status service's master.cf line must be - or y"
        );
    }
    postern_common::service::serve_threaded(cfg, SLOTS, move |conn| serve(&settings, conn), || {})
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn access_list() {
        let a = parse_access(&["127.0.0.0/8".into(), "[::1]/128".into()]).unwrap();
        let s = |ip: &str| a.iter().any(|c| c.contains(ip.parse().unwrap()));
        assert!(s("127.0.0.1") && s("127.9.9.9") && s("::1"));
        assert!(!s("10.0.0.1"));
        assert!(parse_access(&["127.0.0.1/8".into()]).is_err());
        assert!(parse_access(&["nonsense".into()]).is_err());
    }
}
