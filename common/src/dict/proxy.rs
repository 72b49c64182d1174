//! `proxy:TYPE:NAME`: a table looked up by the `proxymap` service rather
//! than in this process, as Postfix's proxymap(8). Its purpose is
//! Postfix's: a bounded number of database connections however many SMTP
//! sessions, cleanup, qmgr and delivery processes are running. Every
//! process that reads `proxy:mysql:/etc/postfix/x.cf` asks proxymap over
//! the Unix socket `private/proxymap`; proxymap holds one connection per
//! table (and server), so the database sees at most proxymap's process
//! limit (master.cf) times the number of tables, and proxymap opens the
//! root-only `.cf` files itself.
//!
//! A command (not a daemon) opens a `proxy:` table itself
//! ([`through_proxymap`]).
//!
//! A request is a [`ProxyRequest`], its answer a [`ProxyReply`], framed
//! as every IPC message ([`crate::ipc::send`]). A process keeps its
//! connections to proxymap between lookups (as Postfix's clients keep
//! theirs, clnt_stream): at most [`KEEP_AT_MOST`], each for
//! [`KEEP_IDLE`]; one that proxymap closed meanwhile is replaced at once
//! and the request sent again (a lookup changes nothing). Connecting for
//! each lookup cost a connect, an accept and a thread hand-off per lookup,
//! and wore out proxymap's processes (`max_use` counts connections), each
//! new one opening its database connections again. proxymap answers only for
//! tables named with `proxy:` in `proxy_read_maps` (Postfix's rule: a
//! client cannot make it open arbitrary files as root). Anything that
//! goes wrong (proxymap not running, a table it refuses, the database
//! down) is a [`LookupError`]: the caller defers.

use super::{Dict, LookupError};
use serde::{Deserialize, Serialize};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

/// The socket's name under the queue directory.
pub const SOCKET: &str = "private/proxymap";

/// How long a client waits for proxymap's answer: longer than a database
/// connection and query may take (10 s each in the SQL tables).
const ANSWER_TIMEOUT: Duration = Duration::from_secs(60);

/// Largest request or reply.
pub const MAX_MESSAGE: u32 = 1 << 20;

/// Idle connections to proxymap a process keeps (one per thread that
/// looked up at the same time, up to this many): each holds one of
/// proxymap's client slots while it waits.
pub const KEEP_AT_MOST: usize = 4;

/// A kept connection idle this long is closed, not used (Postfix's
/// `ipc_idle`); proxymap closes its end after [`SERVER_IDLE`].
pub const KEEP_IDLE: Duration = Duration::from_secs(5);

/// proxymap closes a client connection idle this long (longer than a
/// client keeps it), or at once when all its client slots are taken.
pub const SERVER_IDLE: Duration = Duration::from_secs(10);

/// A process's idle connections to proxymap, newest last; `pid`: the
/// process that opened them (a child forked without exec opens its own).
struct Kept {
    pid: u32,
    conns: Vec<(UnixStream, Instant)>,
}

static KEPT: Mutex<Kept> = Mutex::new(Kept {
    pid: 0,
    conns: Vec::new(),
});

fn kept() -> std::sync::MutexGuard<'static, Kept> {
    let mut k = KEPT.lock().unwrap_or_else(|p| p.into_inner());
    let pid = std::process::id();
    if k.pid != pid {
        // The parent's connections are the parent's: never share them.
        // (Closing this process's copies leaves the parent's open.)
        k.pid = pid;
        k.conns.clear();
    }
    k
}

/// A kept connection not idle too long, if there is one (the newest).
fn take_kept() -> Option<UnixStream> {
    let mut k = kept();
    while let Some((c, since)) = k.conns.pop() {
        if since.elapsed() < KEEP_IDLE {
            return Some(c);
        }
        // The older ones have waited longer still.
        k.conns.clear();
    }
    None
}

/// Keeps `conn` for the next lookup (closed when enough are kept).
fn keep(conn: UnixStream) {
    let mut k = kept();
    if k.conns.len() < KEEP_AT_MOST {
        k.conns.push((conn, Instant::now()));
    }
}

/// One lookup: `table` is the table without `proxy:` (`mysql:/x.cf`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProxyRequest {
    pub table: String,
    pub key: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ProxyReply {
    Found(String),
    NotFound,
    /// The table could not answer, or proxymap refuses it; the reason
    /// (for the client's log).
    Failed(String),
}

static QUEUE_DIRECTORY: OnceLock<PathBuf> = OnceLock::new();

/// Where the queue is, so that `proxy:` tables find proxymap's socket;
/// set by [`crate::service::start`] for every daemon.
pub fn set_queue_directory(dir: impl Into<PathBuf>) {
    let _ = QUEUE_DIRECTORY.set(dir.into());
}

/// Whether `proxy:` tables are asked of proxymap: in the daemons. A
/// command (`postmap -q`, `postern check`, `sendmail -bv`), run by the
/// administrator and short-lived, opens the table itself, so that it
/// answers whether or not Postern is running.
pub fn through_proxymap() -> bool {
    QUEUE_DIRECTORY.get().is_some()
}

/// The socket path as this process sees it now (`/private/proxymap`
/// inside a chroot jail).
fn socket_path() -> PathBuf {
    if crate::service::jailed() {
        return PathBuf::from("/").join(SOCKET);
    }
    QUEUE_DIRECTORY
        .get()
        .cloned()
        .unwrap_or_else(|| PathBuf::from("/var/spool/postern"))
        .join(SOCKET)
}

/// The tables `proxy_read_maps` (its value expanded) lets proxymap open:
/// every item written `proxy:TYPE:NAME`, as `TYPE:NAME`.
pub fn approved_tables(value: &str) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for item in crate::maps::split_specs(value) {
        if let Some(table) = item.strip_prefix("proxy:") {
            if !out.iter().any(|t| t == table) {
                out.push(table.to_string());
            }
        }
    }
    out
}

/// A `proxy:` table in a client process.
#[derive(Debug)]
pub struct ProxyDict {
    /// `proxy:TYPE:NAME`, for messages.
    spec: String,
    /// `TYPE:NAME`, as proxymap knows it.
    table: String,
}

impl ProxyDict {
    /// `name` is what follows `proxy:`.
    pub fn open(name: &str) -> Result<ProxyDict, String> {
        match name.split_once(':') {
            Some((kind, rest)) if !kind.is_empty() && !rest.is_empty() && kind != "proxy" => {
                Ok(ProxyDict {
                    spec: format!("proxy:{name}"),
                    table: name.to_string(),
                })
            }
            _ => Err(format!("table proxy:{name}: expected proxy:type:name")),
        }
    }

    /// Asks proxymap on a kept connection, or a new one; a kept one that
    /// fails (proxymap closed it, or its process ended) is replaced and
    /// the request sent again, once.
    fn ask(&self, key: &str) -> Result<ProxyReply, String> {
        let req = ProxyRequest {
            table: self.table.clone(),
            key: key.to_string(),
        };
        if let Some(mut conn) = take_kept() {
            match exchange(&mut conn, &req) {
                Ok(reply) => {
                    keep(conn);
                    return Ok(reply);
                }
                // proxymap took the time it may: no second wait.
                Err(err)
                    if matches!(
                        err.1.kind(),
                        std::io::ErrorKind::TimedOut | std::io::ErrorKind::WouldBlock
                    ) =>
                {
                    return Err(exchange_error(err));
                }
                Err(_) => {}
            }
        }
        let mut conn = connect()?;
        let reply = exchange(&mut conn, &req).map_err(exchange_error)?;
        keep(conn);
        Ok(reply)
    }
}

/// A new connection to proxymap.
fn connect() -> Result<UnixStream, String> {
    let path = socket_path();
    let conn = UnixStream::connect(&path).map_err(|e| {
        format!(
            "connect to {}: {e} (is the proxymap service in master.cf?)",
            path.display()
        )
    })?;
    conn.set_read_timeout(Some(ANSWER_TIMEOUT))
        .and_then(|()| conn.set_write_timeout(Some(ANSWER_TIMEOUT)))
        .map_err(|e| format!("proxymap socket: {e}"))?;
    Ok(conn)
}

/// One request and its answer; Err: what failed ("send to", "read
/// from") and why.
fn exchange(
    conn: &mut UnixStream,
    req: &ProxyRequest,
) -> Result<ProxyReply, (&'static str, std::io::Error)> {
    crate::ipc::send(conn, req).map_err(|e| ("send to", e))?;
    crate::ipc::recv_limited(conn, MAX_MESSAGE).map_err(|e| ("read from", e))
}

fn exchange_error((what, e): (&'static str, std::io::Error)) -> String {
    format!("{what} proxymap: {e}")
}

impl Dict for ProxyDict {
    fn lookup(&self, key: &str) -> Result<Option<String>, LookupError> {
        match self.ask(key) {
            Ok(ProxyReply::Found(v)) => Ok(Some(v)),
            Ok(ProxyReply::NotFound) => Ok(None),
            Ok(ProxyReply::Failed(why)) => Err(LookupError::new(&self.spec, why)),
            Err(why) => Err(LookupError::new(&self.spec, why)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn approved_tables_are_the_proxy_items() {
        assert_eq!(
            approved_tables(
                "proxy:mysql:/etc/a.cf, hash:/etc/x reject_unauth_destination \
                 check_recipient_access proxy:pgsql:/etc/b.cf proxy:mysql:/etc/a.cf"
            ),
            vec!["mysql:/etc/a.cf", "pgsql:/etc/b.cf"]
        );
    }

    #[test]
    fn open_wants_a_type() {
        assert!(ProxyDict::open("mysql:/etc/a.cf").is_ok());
        assert!(ProxyDict::open("/etc/a.cf").is_err());
        assert!(ProxyDict::open("proxy:mysql:/x").is_err());
    }
}
