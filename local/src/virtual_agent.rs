//! virtual(8): delivery to mailboxes of virtual users (accounts that are
//! not in the password database, such as Dovecot's), as Postfix's
//! `virtual` agent. master.cf: `virtual unix - n n - - virtual`; qmgr
//! sends it the recipients whose domain is in `virtual_mailbox_domains`
//! (`virtual_transport`, default `virtual`).
//!
//! For each recipient: the mailbox is `virtual_mailbox_base/VALUE`, VALUE
//! from `virtual_mailbox_maps` looked up by the full address, then by
//! `@domain` (a catch-all); a value ending in `/` is a Maildir, anything
//! else an mbox file. The owner comes from `virtual_uid_maps` and
//! `virtual_gid_maps` (same keys; `static:N` for one vmail account) and
//! must be at least `virtual_minimum_uid`: the write happens with those
//! ids, never as root. `virtual_mailbox_limit` bounds an mbox file. A
//! recipient found in no table bounces (5.1.1); a missing or too low uid
//! defers (4.3.5, a configuration error the administrator can fix).

use crate::mailbox::{self, LockPolicy, Mbox};
use crate::message::{self, Prefix};
use crate::status::{self, Status};
use postern_common::delivery::Job;
use postern_common::ipc::{DeliveryRecipient, Outcome};
use postern_common::maps::Tables;
use postern_common::warning;
use postern_conf::Config;
use std::collections::HashSet;
use std::path::PathBuf;
use std::time::Duration;

pub struct Agent {
    mailbox_maps: String,
    uid_maps: String,
    gid_maps: String,
    base: String,
    minimum_uid: u64,
    size_limit: u64,
    locks: LockPolicy,
    hostname: String,
    original_recipient: bool,
}

/// Looks an address up by itself, then by `@domain`. Err: a table
/// could not answer (logged): the recipient is deferred.
fn lookup(t: &Tables, address: &str, what: &str) -> Result<Option<String>, Status> {
    let a = address.to_lowercase();
    let failed = |_| Status::defer("4.3.0", format!("{what} lookup failure"));
    if let Some(v) = t.lookup(&a).map_err(failed)? {
        return Ok(Some(v.into_owned()));
    }
    match a.rfind('@') {
        Some(i) => Ok(t.lookup(&a[i..]).map_err(failed)?.map(|v| v.into_owned())),
        None => Ok(None),
    }
}

impl Agent {
    pub fn new(cfg: &Config) -> Result<Agent, String> {
        let e = |e: postern_conf::ConfError| e.to_string();
        Ok(Agent {
            mailbox_maps: cfg.get("virtual_mailbox_maps"),
            uid_maps: cfg.get("virtual_uid_maps"),
            gid_maps: cfg.get("virtual_gid_maps"),
            base: cfg.get("virtual_mailbox_base"),
            minimum_uid: cfg.get_u64("virtual_minimum_uid").map_err(e)?,
            size_limit: cfg.get_u64("virtual_mailbox_limit").map_err(e)?,
            locks: LockPolicy {
                attempts: cfg.get_u64("deliver_lock_attempts").map_err(e)?.max(1) as u32,
                delay: Duration::from_secs(cfg.get_time("deliver_lock_delay").map_err(e)?),
                stale: Duration::from_secs(cfg.get_time("stale_lock_time").map_err(e)?),
            },
            hostname: nix::unistd::gethostname()
                .ok()
                .and_then(|h| h.into_string().ok())
                .unwrap_or_else(|| "localhost".into()),
            original_recipient: cfg.get_bool("enable_original_recipient").map_err(e)?,
        })
    }

    pub fn deliver(&self, job: &mut Job) {
        let id = job.req.queue_id.clone();
        let mut tables = Vec::new();
        for (name, spec) in [
            ("virtual_mailbox_maps", &self.mailbox_maps),
            ("virtual_uid_maps", &self.uid_maps),
            ("virtual_gid_maps", &self.gid_maps),
        ] {
            // One that cannot be opened stays, failing every lookup: the
            // recipients that need it are deferred.
            let (t, bad) = Tables::open_list(spec);
            for e in bad {
                warning!("{id}: {name}: {e}");
            }
            tables.push(t);
        }
        let header = job
            .content()
            .and_then(|mut r| message::read_header_section(&mut r, message::MAX_HEADER_SECTION));
        let seen = match header {
            Ok(h) => message::delivered_to(&h),
            Err(e) => {
                let reason = format!("cannot read queue file: {}", status::strip_os_error(&e));
                job.record_rest(Outcome::Deferred, "4.3.0", "virtual", &reason);
                return;
            }
        };
        for r in job.req.recipients.clone() {
            let s = self.recipient(job, &r, &seen, &tables);
            job.record(&r, s.outcome, &s.dsn, "virtual", &s.reason);
        }
    }

    fn recipient(
        &self,
        job: &Job,
        r: &DeliveryRecipient,
        seen: &HashSet<String>,
        t: &[Tables],
    ) -> Status {
        let rcpt = r.rcpt.address.to_lowercase();
        if seen.contains(&rcpt) {
            return Status::bounce("5.4.6", format!("mail forwarding loop for {rcpt}"));
        }
        let mbox = match lookup(&t[0], &rcpt, "virtual_mailbox_maps") {
            Ok(Some(m)) => m,
            Ok(None) => return Status::bounce("5.1.1", format!("unknown user: \"{rcpt}\"")),
            Err(s) => return s,
        };
        let id_of = |table: &Tables, what: &str| -> Result<u32, Status> {
            let v = lookup(table, &rcpt, &format!("virtual_{what}_maps"))?.ok_or_else(|| {
                Status::defer(
                    "4.3.5",
                    format!("mail system configuration error: no {what} for {rcpt}"),
                )
            })?;
            let n: u64 = v.trim().parse().map_err(|_| {
                Status::defer(
                    "4.3.5",
                    format!("mail system configuration error: bad {what} {v} for {rcpt}"),
                )
            })?;
            Ok(n as u32)
        };
        let uid = match id_of(&t[1], "uid") {
            Ok(u) => u,
            Err(s) => return s,
        };
        let gid = match id_of(&t[2], "gid") {
            Ok(g) => g,
            Err(s) => return s,
        };
        if (uid as u64) < self.minimum_uid {
            warning!(
                "recipient {rcpt}: bad uid {uid} in virtual_uid_maps (below virtual_minimum_uid)"
            );
            return Status::defer("4.3.5", "mail system configuration error");
        }
        if mbox.contains("..") || self.base.is_empty() {
            warning!(
                "recipient {rcpt}: bad mailbox {mbox} (virtual_mailbox_base = {})",
                self.base
            );
            return Status::defer("4.3.5", "mail system configuration error");
        }
        let path = PathBuf::from(format!(
            "{}/{}",
            self.base.trim_end_matches('/'),
            mbox.trim_start_matches('/')
        ));
        if job.is_probe() {
            // An address verification probe: found, nothing delivered.
            return Status::sent(if mbox.ends_with('/') {
                "delivers to maildir"
            } else {
                "delivers to mailbox"
            });
        }
        let sender = job.req.sender.as_str();
        let headers = Prefix {
            sender,
            original: self
                .original_recipient
                .then(|| r.rcpt.original_or_address()),
            delivered: Some(&rcpt),
        }
        .headers();
        let mut content = match job.content() {
            Ok(c) => c,
            Err(e) => return Status::io(&e, "cannot read queue file"),
        };
        if mbox.ends_with('/') {
            return match mailbox::deliver_maildir(
                &path,
                (uid, gid),
                &self.hostname,
                &headers,
                &mut content,
                true,
            ) {
                Ok(_) => Status::sent("delivered to maildir"),
                Err(s) => s,
            };
        }
        let m = Mbox {
            path: &path,
            open_as: (uid, gid),
            write_as: (uid, gid),
            chown: None,
            mailbox: true,
            owner: Some(uid),
            size_limit: self.size_limit,
            locks: &self.locks,
        };
        m.deliver(
            sender,
            &headers,
            &mut content,
            job.req.content_size,
            "delivered to mailbox",
            &format!("cannot update mailbox {}. ", path.display()),
        )
    }
}
