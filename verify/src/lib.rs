//! verify: Postern's address verification server, as Postfix's verify(8).
//!
//! Who talks to it, on `queue_directory/private/verify` (the stock
//! master.cf line `verify unix - - y - 1 verify`), one
//! [`postern_common::verify::VerifyRequest`] per connection: smtpd asks
//! what is known of an address (`reject_unverified_*`), a delivery agent
//! reports a probe's result. For an address with nothing known, or whose
//! entry is due for a refresh, it answers first and then sends a probe:
//! a message through cleanup (sender `address_verify_sender`, one
//! recipient, no content, the `trace_flags=verify` attribute), which qmgr
//! and the agents never deliver ([`postern_common::verify`]).
//!
//! The cache ([`cache::Cache`]) follows Postfix's rules
//! (`address_verify_positive_expire_time`, `_refresh_time`,
//! `address_verify_negative_cache`, `_expire_time`, `_refresh_time`; a
//! probe is taken as lost after 1000 s). Postern keeps it as a text file
//! at the path of `address_verify_map` (the `btree:` type is not used;
//! empty: in memory only), opened as root before the privilege drop and
//! rewritten after each change; `address_verify_cache_cleanup_interval`
//! drops expired entries. Runs as `mail_owner`.

pub mod cache;
pub mod probe;

use cache::{Cache, Policy};
use postern_common::verify::{Status, VerifyReply, VerifyRequest, MAX_MESSAGE};
use postern_common::{ipc, warning};
use postern_conf::Config;
use std::path::PathBuf;

fn time_param(cfg: &Config, name: &str, default: u64) -> u64 {
    cfg.get_time(name).unwrap_or(default)
}

/// The cache rules from main.cf.
pub fn policy(cfg: &Config) -> Policy {
    Policy {
        positive_expire: time_param(cfg, "address_verify_positive_expire_time", 31 * 86400),
        positive_refresh: time_param(cfg, "address_verify_positive_refresh_time", 7 * 86400),
        negative_cache: cfg
            .get_bool("address_verify_negative_cache")
            .unwrap_or(true),
        negative_expire: time_param(cfg, "address_verify_negative_expire_time", 3 * 86400),
        negative_refresh: time_param(cfg, "address_verify_negative_refresh_time", 3 * 3600),
    }
}

/// The cache file: the path of `address_verify_map` (`type:path`).
pub fn cache_path(cfg: &Config) -> Option<PathBuf> {
    match cfg.get("address_verify_map").trim() {
        "" => None,
        m => Some(PathBuf::from(m.split_once(':').map_or(m, |(_, p)| p))),
    }
}

/// Answers one request; a query that needs a probe sends it after the
/// answer is written.
fn handle(cfg: &Config, cache: &mut Cache, mut conn: std::os::unix::net::UnixStream) {
    let _ = conn.set_read_timeout(Some(std::time::Duration::from_secs(10)));
    let req: VerifyRequest = match ipc::recv_limited(&mut conn, MAX_MESSAGE) {
        Ok(r) => r,
        Err(_) => {
            let _ = ipc::send(&mut conn, &VerifyReply::Bad);
            return;
        }
    };
    let now = postern_common::time::now_secs();
    match req {
        VerifyRequest::Query { address } => {
            let q = cache.query(&address, now);
            let _ = ipc::send(
                &mut conn,
                &VerifyReply::Status {
                    status: q.status,
                    reason: q.reason.clone(),
                },
            );
            drop(conn);
            if q.probe {
                if let Err(e) = probe::send(cfg, &address) {
                    warning!("probe for {address}: {e}");
                } else {
                    cache.probed(&address, now);
                }
            }
        }
        VerifyRequest::Update {
            address,
            status,
            reason,
        } => {
            if status == Status::Todo {
                let _ = ipc::send(&mut conn, &VerifyReply::Bad);
                return;
            }
            cache.update(&address, status, &reason, now);
            let _ = ipc::send(&mut conn, &VerifyReply::Updated);
        }
    }
}

/// The service: one request per connection, one connection at a time
/// (the cache is the process's).
pub fn run(cfg: &Config) -> ! {
    let mut cache = Cache::open(cache_path(cfg), policy(cfg));
    let cleanup_every = time_param(cfg, "address_verify_cache_cleanup_interval", 12 * 3600);
    let mut last_cleanup = postern_common::time::now_secs();
    postern_common::service::serve_one_at_a_time(cfg, move |conn| {
        handle(cfg, &mut cache, conn);
        let now = postern_common::time::now_secs();
        if cleanup_every > 0 && now.saturating_sub(last_cleanup) >= cleanup_every {
            cache.cleanup(now);
            last_cleanup = now;
        }
    })
}
