//! The `proxymap` service, as Postfix's proxymap(8): answers table
//! lookups for the daemons that name a table `proxy:TYPE:NAME`, over the
//! Unix socket `private/proxymap` ([`postern_common::dict::proxy`] is the
//! client and the protocol).
//!
//! Why a service and not a pool in each process: Postern runs many
//! processes that look up the same tables (smtpd processes, cleanup, qmgr,
//! one virtual or local agent per delivery); a pool per process bounds
//! nothing when the processes multiply. proxymap opens each table once per
//! process, and a database table keeps one connection (per server), shared
//! by all the threads that serve clients (a lookup waits for the one
//! before it): the database sees at most proxymap's process limit
//! (master.cf `maxproc`) connections per table, however many SMTP
//! sessions are open. One process serves [`CONNECTIONS_PER_PROCESS`]
//! clients at once; clients connect for one lookup and go.
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
use std::sync::Arc;
use std::time::Duration;

/// Clients served at once by one process (a thread each).
pub const CONNECTIONS_PER_PROCESS: usize = 32;

/// A client that sends nothing for this long is dropped.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(100);

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

pub fn run(cfg: &Config, args: &[String]) -> ! {
    let param = if args.iter().any(|a| a == "-w") {
        "proxy_write_maps"
    } else {
        "proxy_read_maps"
    };
    let served = Arc::new(open_approved(&cfg.get(param)));
    info!("serving {} table(s) of {param}", served.len());
    postern_common::service::serve_threaded(
        cfg,
        CONNECTIONS_PER_PROCESS,
        move |conn| {
            let _ = conn.set_read_timeout(Some(CLIENT_TIMEOUT));
            let _ = conn.set_write_timeout(Some(CLIENT_TIMEOUT));
            let mut conn = &conn;
            // A client may ask several questions on one connection.
            while let Ok(req) = ipc::recv_limited::<_, ProxyRequest>(&mut conn, proxy::MAX_MESSAGE)
            {
                if ipc::send(&mut conn, &answer(&served, &req)).is_err() {
                    break;
                }
            }
        },
        || {},
    )
}
