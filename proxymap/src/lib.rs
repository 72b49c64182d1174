//! The `proxymap` service, as Postfix's proxymap(8): answers table
//! lookups for the daemons that name a table `proxy:TYPE:NAME`, over the
//! Unix socket `private/proxymap` ([`postern_common::dict::proxy`] is the
//! client and the protocol).
//!
//! Why a service and not a pool in each process: Postern runs many
//! processes that look up the same tables (smtpd processes, cleanup, qmgr,
//! one virtual or local agent per delivery); a pool per process bounds
//! nothing when the processes multiply. proxymap opens each table once per
//! process, and a database table opens at most `proxymap_connection_limit`
//! connections (per server), shared by all the threads that serve
//! clients: one while lookups come one at a time, another only while
//! lookups overlap (smtpd's, cleanup's and qmgr's), a lookup waiting when
//! all are in use. The database sees at most proxymap's process limit
//! (master.cf `maxproc`) × `proxymap_connection_limit` connections per
//! table, however many SMTP sessions are open. One process serves
//! [`CONNECTIONS_PER_PROCESS`] clients at once, a thread each.
//!
//! Clients keep their connection for many lookups (as Postfix's do), so
//! a process is not worn out by lookups (`max_use` counts connections)
//! and keeps its database connections. A client connection idle for
//! [`proxy::SERVER_IDLE`] is closed, and so is an idle one as soon as
//! every slot of the process is taken (a client waiting to connect gets
//! the slot; the client whose connection closed connects again at its
//! next lookup). A process that is leaving (worn out, drained, a table
//! file changed) closes each connection after the request in hand.
//!
//! Only the tables named `proxy:...` in `proxy_read_maps` (`proxy_write_maps`
//! for the `proxywrite` service, started with `-w`) are served, and they
//! are opened at start, as root, before the privilege drop: the `.cf`
//! files with database passwords are commonly readable by root only. A
//! request for any other table is refused (logged), so that no client can
//! make proxymap read a file it chooses.

use postern_common::dict::proxy::{self, ProxyReply, ProxyRequest};
use postern_common::dict::LookupError;
use postern_common::maps::Table;
use postern_common::{info, ipc, warning};
use postern_conf::Config;
use std::collections::HashMap;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Clients served at once by one process (a thread each).
pub const CONNECTIONS_PER_PROCESS: usize = 32;

/// A client that stops halfway through a request for this long is dropped.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(100);

/// How often an idle client connection looks whether it must go (every
/// slot taken, the process leaving).
const IDLE_TICK: Duration = Duration::from_millis(50);

/// Client connections open now in this process.
static CLIENTS: AtomicUsize = AtomicUsize::new(0);

/// The tables a process serves: `TYPE:NAME` → the open table, or why it
/// could not be opened (given to every client that asks).
pub type Served = HashMap<String, Result<Table, String>>;

/// Opens every table that `value` (`proxy_read_maps` or
/// `proxy_write_maps`, expanded) approves.
pub fn open_approved(value: &str) -> Served {
    let mut served = Served::new();
    for table in proxy::approved_tables(value) {
        let opened = Table::open(&table).map_err(|e| {
            warning!("cannot open {table}: {e}");
            e
        });
        served.insert(table, opened);
    }
    served
}

/// The answer to one request.
pub fn answer(served: &Served, req: &ProxyRequest) -> ProxyReply {
    match served.get(&req.table) {
        None => {
            warning!(
                "request for unapproved table: \"{}\" (add proxy:{} to proxy_read_maps)",
                req.table,
                req.table
            );
            ProxyReply::Failed(format!("{}: not approved in proxy_read_maps", req.table))
        }
        Some(Err(e)) => ProxyReply::Failed(e.clone()),
        Some(Ok(t)) => match lookup(t, &req.key) {
            Ok(Some(v)) => ProxyReply::Found(v),
            Ok(None) => ProxyReply::NotFound,
            Err(e) => {
                warning!("{e}");
                ProxyReply::Failed(e.to_string())
            }
        },
    }
}

/// A lookup that tells a failure from "not found" (`$N` expanded for
/// `regexp:`/`pcre:`, as the daemons look them up).
fn lookup(t: &Table, key: &str) -> Result<Option<String>, LookupError> {
    t.lookup_expanded(key)
}

/// Waits for the next request on a client connection: false when the
/// connection is to be closed instead (idle for [`proxy::SERVER_IDLE`],
/// every slot taken, the process leaving).
fn wait_for_request(conn: &UnixStream) -> bool {
    use nix::poll::{PollFd, PollFlags, PollTimeout};
    use std::os::fd::AsFd;
    let since = Instant::now();
    loop {
        let mut fds = [PollFd::new(conn.as_fd(), PollFlags::POLLIN)];
        let tick = PollTimeout::try_from(IDLE_TICK).unwrap_or(PollTimeout::MAX);
        match nix::poll::poll(&mut fds, tick) {
            // Readable, closed or in error: the read tells which.
            Ok(n) if n > 0 => return true,
            Ok(_) | Err(nix::errno::Errno::EINTR) => {}
            Err(_) => return false,
        }
        if postern_common::service::leaving()
            || since.elapsed() >= proxy::SERVER_IDLE
            || CLIENTS.load(Ordering::SeqCst) >= CONNECTIONS_PER_PROCESS
        {
            return false;
        }
    }
}

/// Serves one client connection: its requests, one after the other.
fn serve_client(served: &Served, conn: UnixStream) {
    struct Counted;
    impl Drop for Counted {
        fn drop(&mut self) {
            CLIENTS.fetch_sub(1, Ordering::SeqCst);
        }
    }
    CLIENTS.fetch_add(1, Ordering::SeqCst);
    let _counted = Counted;
    let _ = conn.set_read_timeout(Some(CLIENT_TIMEOUT));
    let _ = conn.set_write_timeout(Some(CLIENT_TIMEOUT));
    let mut conn = &conn;
    while wait_for_request(conn) {
        let Ok(req) = ipc::recv_limited::<_, ProxyRequest>(&mut conn, proxy::MAX_MESSAGE) else {
            break;
        };
        if !postern_common::service::leaving() {
            if let Some(table) = postern_common::table_watch::changed() {
                // A table file was rebuilt (proxy:hash:...): this request
                // gets the old table's answer, the next ones a fresh
                // process, which reads the new file as root.
                postern_common::service::restart_for_table(&table);
                postern_common::service::leave();
            }
        }
        if ipc::send(&mut conn, &answer(served, &req)).is_err()
            || postern_common::service::leaving()
        {
            break;
        }
    }
}

pub fn run(cfg: &Config, args: &[String]) -> ! {
    let param = if args.iter().any(|a| a == "-w") {
        "proxy_write_maps"
    } else {
        "proxy_read_maps"
    };
    let limit = cfg
        .get_u64("proxymap_connection_limit")
        .unwrap_or(1)
        .clamp(1, CONNECTIONS_PER_PROCESS as u64) as usize;
    postern_common::dict::db_config::set_connection_limit(limit);
    let served = Arc::new(open_approved(&cfg.get(param)));
    info!("serving {} table(s) of {param}", served.len());
    postern_common::service::serve_threaded(
        cfg,
        CONNECTIONS_PER_PROCESS,
        move |conn| serve_client(&served, conn),
        || {},
    )
}
