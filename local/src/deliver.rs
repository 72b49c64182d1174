//! One delivery request, start to end: open the alias tables, read the
//! header section once (loop detection), resolve each recipient, deliver
//! to every place it resolved to, and record one outcome per recipient.
//!
//! Privileges: when running as root, mailbox writes happen as the
//! recipient (spool files are created and dot-locked as Postfix does:
//! as root when only root may write the spool directory, then owned by
//! the recipient), files and commands named by aliases as
//! `default_privs`; a plain-user `local` does everything as itself.

use crate::forward::Forward;
use crate::mailbox::{self, Ids, LockPolicy, Mbox};
use crate::message::{self, Prefix};
use crate::pipe;
use crate::resolve::{Class, Dest, Resolver, Target};
use crate::status::{self, Status};
use postern_common::delivery::Job;
use postern_common::ipc::{DeliveryRecipient, Outcome, RecipientResult};
use postern_common::maps::Tables;
use postern_common::privs::{self, Account};
use postern_common::qfile::Recipient;
use postern_common::warning;
use postern_conf::Config;
use std::collections::HashSet;
use std::io::{self, Read};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The local delivery agent's settings, read once at start.
pub struct Agent {
    cfg: Config,
    alias_maps: String,
    /// Which domains are local, for alias and .forward targets.
    domains: postern_common::resolve::Resolver,
    myorigin: String,
    delimiter: String,
    luser_relay: String,
    home_mailbox: String,
    spool: String,
    /// `forward_path`, before per-recipient expansion.
    forward_path: Vec<String>,
    mailbox_command: String,
    mailbox_transport: String,
    size_limit: u64,
    time_limit: Duration,
    allow_commands: Vec<String>,
    allow_files: Vec<String>,
    /// `prepend_delivered_header`: command, file, forward.
    delivered_header: Vec<String>,
    original_recipient: bool,
    /// `duplicate_filter_limit`, for each recipient's expansion.
    duplicate_filter_limit: usize,
    default_privs: String,
    strict_owner: bool,
    locks: LockPolicy,
    cleanup: PathBuf,
    ipc_timeout: Duration,
    hostname: String,
    /// The password database's answers during one delivery request (or
    /// batch): an account is looked up for its aliases, its .forward and
    /// its mailbox, and each getpwnam reads the whole file. Emptied at
    /// the start of every request, so that changes are seen at the next.
    accounts: std::cell::RefCell<std::collections::HashMap<String, Option<Account>>>,
    /// While a batch of several requests is delivered: the Maildir `new/`
    /// directories written to (with the ids to sync them as), synced
    /// once at the end of the batch ([`Agent::deliver_batch`]).
    pending_syncs: std::cell::RefCell<Option<Vec<(PathBuf, Ids)>>>,
}

/// An outcome held back until the batch's Maildir directories are
/// synced: the job, the recipient, its status, and the range of
/// `pending_syncs` its deliveries added.
struct Held {
    job: usize,
    rcpt: DeliveryRecipient,
    status: Status,
    /// The members' delivery lines are logged (an expanded alias).
    logged: bool,
    syncs: std::ops::Range<usize>,
}

impl Agent {
    pub fn new(cfg: &Config) -> Result<Agent, String> {
        let e = |e: postern_conf::ConfError| e.to_string();
        let lower = |name: &str| -> Vec<String> {
            cfg.get_list(name)
                .into_iter()
                .map(|s| s.to_ascii_lowercase())
                .collect()
        };
        let hostname = nix::unistd::gethostname()
            .ok()
            .and_then(|h| h.into_string().ok())
            .unwrap_or_else(|| "localhost".into());
        Ok(Agent {
            alias_maps: cfg.get("alias_maps"),
            domains: postern_common::resolve::Resolver::domains_only(cfg),
            myorigin: cfg.get("myorigin"),
            delimiter: cfg.get("recipient_delimiter"),
            luser_relay: cfg
                .raw("luser_relay")
                .map(|(v, _)| v.to_string())
                .unwrap_or_default(),
            home_mailbox: cfg.get("home_mailbox"),
            spool: cfg.get("mail_spool_directory"),
            forward_path: cfg
                .raw("forward_path")
                .map(|(v, _)| postern_conf::split_list(v))
                .unwrap_or_default(),
            mailbox_command: cfg
                .raw("mailbox_command")
                .map(|(v, _)| v.trim().to_string())
                .unwrap_or_default(),
            mailbox_transport: cfg.get("mailbox_transport").trim().to_string(),
            size_limit: cfg.get_u64("mailbox_size_limit").map_err(e)?,
            time_limit: Duration::from_secs(cfg.get_time("command_time_limit").map_err(e)?),
            allow_commands: lower("allow_mail_to_commands"),
            allow_files: lower("allow_mail_to_files"),
            delivered_header: lower("prepend_delivered_header"),
            original_recipient: cfg.get_bool("enable_original_recipient").map_err(e)?,
            duplicate_filter_limit: cfg.get_u64("duplicate_filter_limit").map_err(e)? as usize,
            default_privs: cfg.get("default_privs"),
            strict_owner: cfg.get_bool("strict_mailbox_ownership").map_err(e)?,
            locks: LockPolicy {
                attempts: cfg.get_u64("deliver_lock_attempts").map_err(e)?.max(1) as u32,
                delay: Duration::from_secs(cfg.get_time("deliver_lock_delay").map_err(e)?),
                stale: Duration::from_secs(cfg.get_time("stale_lock_time").map_err(e)?),
            },
            cleanup: postern_common::queue::QueueTree::new(cfg.get("queue_directory"))
                .socket(false, cfg.get("cleanup_service_name").trim()),
            ipc_timeout: Duration::from_secs(cfg.get_time("ipc_timeout").unwrap_or(3600)),
            hostname,
            accounts: Default::default(),
            pending_syncs: Default::default(),
            cfg: cfg.clone(),
        })
    }

    /// Delivers one request and records every recipient.
    pub fn deliver(&self, job: &mut Job) {
        self.deliver_batch(std::slice::from_mut(job))
    }

    /// Delivers a batch of requests (qmgr's `local_delivery_batch_limit`)
    /// and records every recipient. The alias tables and the password
    /// file are read once for the batch. With several requests, the
    /// Maildir deliveries leave their `new/` directory unsynced, the
    /// directories are synced once at the end, and only then is any
    /// outcome recorded: a recipient is marked done only once its message
    /// is durable in its Maildir.
    pub fn deliver_batch(&self, jobs: &mut [Job]) {
        let Some(first) = jobs.first() else {
            return;
        };
        let id = first.req.queue_id.clone();
        self.accounts.borrow_mut().clear();
        // A table that cannot be opened stays, failing every lookup: the
        // recipients whose lookup reaches it are deferred ("alias database
        // unavailable"), the others delivered.
        let (tables, bad) = Tables::open_list(&self.alias_maps);
        for e in bad {
            warning!("{id}: alias_maps: {e}");
        }
        if jobs.len() == 1 {
            self.deliver_job(&mut jobs[0], &tables, None);
            return;
        }
        *self.pending_syncs.borrow_mut() = Some(Vec::new());
        let mut held = Vec::new();
        for (i, job) in jobs.iter_mut().enumerate() {
            self.deliver_job(job, &tables, Some((i, &mut held)));
        }
        let syncs = self.pending_syncs.borrow_mut().take().unwrap_or_default();
        // Each directory once; a failure defers the recipients whose
        // deliveries it holds (their files may be in new/ already: a
        // second delivery later rather than a lost one).
        let mut failed: Vec<(&PathBuf, Status)> = Vec::new();
        let mut synced: Vec<&PathBuf> = Vec::new();
        for (dir, ids) in &syncs {
            if synced.contains(&dir) || failed.iter().any(|(d, _)| *d == dir) {
                continue;
            }
            match mailbox::sync_new_dir(dir, *ids) {
                Ok(()) => synced.push(dir),
                Err(s) => failed.push((dir, s)),
            }
        }
        for h in held {
            let failure = syncs[h.syncs.clone()]
                .iter()
                .find_map(|(dir, _)| failed.iter().find(|(d, _)| *d == dir));
            // Whatever else became of the recipient (a bounce for one of
            // its aliases), it is not done while one of its copies may
            // still vanish: deferred, as when the sync fails at once.
            let (status, logged) = match failure {
                Some((_, s)) if h.status.outcome != Outcome::Deferred => (s.clone(), false),
                _ => (h.status, h.logged),
            };
            let job = &mut jobs[h.job];
            if logged {
                job.record_logged_diagnosed(
                    &h.rcpt,
                    status.outcome,
                    &status.dsn,
                    "local",
                    &status.reason,
                    status.diag_type,
                );
            } else {
                job.record_diagnosed(
                    &h.rcpt,
                    status.outcome,
                    &status.dsn,
                    "local",
                    &status.reason,
                    status.diag_type,
                );
            }
        }
    }

    /// Delivers one request of a batch. `held`: (the job's index, where
    /// to put its outcomes) when recording waits for the batch's end.
    fn deliver_job(
        &self,
        job: &mut Job,
        tables: &Tables,
        mut held: Option<(usize, &mut Vec<Held>)>,
    ) {
        let id = job.req.queue_id.clone();
        let header = job
            .content()
            .and_then(|mut r| message::read_header_section(&mut r, message::MAX_HEADER_SECTION));
        let seen = match header {
            Ok(h) => message::delivered_to(&h),
            Err(e) => {
                warning!("{id}: read queue file: {e}");
                let reason = format!("cannot read queue file: {}", status::strip_os_error(&e));
                job.record_rest(Outcome::Deferred, "4.3.0", "local", &reason);
                return;
            }
        };
        for r in job.req.recipients.clone() {
            let before = self.pending_len();
            match self.recipient(job, &r, &seen, tables) {
                Done::Here(s, logged) => match held.as_mut() {
                    Some((i, held)) => held.push(Held {
                        job: *i,
                        rcpt: r,
                        status: s,
                        logged,
                        syncs: before..self.pending_len(),
                    }),
                    None if logged => job.record_logged_diagnosed(
                        &r,
                        s.outcome,
                        &s.dsn,
                        "local",
                        &s.reason,
                        s.diag_type,
                    ),
                    None => {
                        job.record_diagnosed(&r, s.outcome, &s.dsn, "local", &s.reason, s.diag_type)
                    }
                },
                Done::Passed(result) => job.adopt(result),
            }
        }
    }

    /// How many Maildir directories wait for their sync (0 outside a batch).
    fn pending_len(&self) -> usize {
        self.pending_syncs.borrow().as_ref().map_or(0, Vec::len)
    }

    /// A Maildir delivery; within a batch, `new/` is synced at its end.
    fn maildir(
        &self,
        dir: &Path,
        ids: Ids,
        headers: &[u8],
        content: &mut dyn Read,
    ) -> Result<PathBuf, Status> {
        let later = self.pending_syncs.borrow().is_some();
        let path = mailbox::deliver_maildir(dir, ids, &self.hostname, headers, content, !later)?;
        if let Some(pending) = self.pending_syncs.borrow_mut().as_mut() {
            pending.push((dir.join("new"), ids));
        }
        Ok(path)
    }

    /// Delivers to one recipient: its outcome over all its destinations.
    fn recipient(
        &self,
        job: &Job,
        r: &DeliveryRecipient,
        seen: &HashSet<String>,
        tables: &Tables,
    ) -> Done {
        let rcpt = &r.rcpt.address;
        if seen.contains(&rcpt.to_lowercase()) {
            return Done::Here(
                Status::bounce("5.4.6", format!("mail forwarding loop for {rcpt}")),
                false,
            );
        }
        let read_include = |p: &Path| -> io::Result<String> {
            let read = || {
                let mut s = String::new();
                std::fs::File::open(p)?
                    .take(crate::resolve::MAX_INCLUDE as u64)
                    .read_to_string(&mut s)?;
                Ok(s)
            };
            match self.default_privs_ids() {
                Some((uid, gid)) if privs::is_root() => privs::as_user(uid, gid, read)?,
                _ => read(),
            }
        };
        let expand = |s: &str| self.cfg.expand(s);
        let has_account = |u: &str| self.user(u).is_some();
        let read_forward = |n: &crate::resolve::LocalName| self.read_forward(n);
        let is_local_domain = |d: &str| self.domains.is_local_domain(d);
        let resolver = Resolver {
            aliases: tables,
            is_local_domain: &is_local_domain,
            myorigin: &self.myorigin,
            delimiter: &self.delimiter,
            luser_relay: &self.luser_relay,
            expand: &expand,
            has_account: &has_account,
            read_include: &read_include,
            read_forward: &read_forward,
            duplicate_filter_limit: self.duplicate_filter_limit,
        };
        let exp = resolver.resolve(rcpt);
        if job.is_probe() {
            return Done::Here(probe_status(&exp), false);
        }
        if !self.mailbox_transport.is_empty() {
            if let [t] = exp.targets.as_slice() {
                if t.dest == Dest::Mailbox && exp.failures.is_empty() {
                    return match self.pass(job, r, t) {
                        Ok(result) => Done::Passed(result),
                        Err(s) => Done::Here(s, false),
                    };
                }
            }
            if exp.targets.iter().any(|t| t.dest == Dest::Mailbox) {
                // The other agent would record the whole recipient, which
                // must stay ours while other destinations are pending.
                warning!(
                    "{}: <{rcpt}>: expands to several destinations: mailbox_transport {} \
                     not used, the mailbox is delivered by local",
                    job.req.queue_id,
                    self.mailbox_transport
                );
            }
        }
        // An alias or .forward expanded: one line per member, `to=<member>,
        // orig_to=<alias>`, as Postfix's local logs them (pflogsumm counts
        // deliveries by these), and none for the alias itself.
        let expanded = exp.targets.iter().any(|t| t.class != Class::Direct)
            || exp.failures.iter().any(|(addr, _)| addr != rcpt);
        let orig = if r.rcpt.original.is_empty() {
            rcpt.as_str()
        } else {
            r.rcpt.original.as_str()
        };
        let log = |member: &str, s: &Status| {
            if expanded {
                job.log_delivery(member, orig, s.outcome, &s.dsn, "local", &s.reason);
            }
        };
        let mut results = Vec::new();
        for (addr, s) in exp.failures {
            log(&addr, &s);
            results.push(s);
        }
        let mut forwards: Vec<&Target> = Vec::new();
        for t in &exp.targets {
            if matches!(t.dest, Dest::Forward(_)) {
                forwards.push(t);
                continue;
            }
            let s = self.target(job, r, t, seen);
            log(&t.name.address, &s);
            results.push(s);
        }
        if !forwards.is_empty() {
            // Postfix logs the forwarding once, under the address that
            // expanded (the new message names it as each member's orig_to).
            let s = self.forward(job, r, &forwards);
            log(rcpt, &s);
            results.push(s);
        }
        Done::Here(status::combine(&results), expanded)
    }

    /// Hands one recipient whose mail goes to a mailbox to the agent of
    /// `mailbox_transport` (`lmtp:unix:private/dovecot-lmtp`): a
    /// `DeliveryRequest` on `private/TRANSPORT`, as qmgr would send it.
    /// That agent logs the delivery and marks the recipient done itself.
    fn pass(
        &self,
        job: &Job,
        r: &DeliveryRecipient,
        t: &Target,
    ) -> Result<RecipientResult, Status> {
        let (transport, nexthop) = match self.mailbox_transport.split_once(':') {
            Some((t, n)) => (t.trim(), n.trim()),
            None => (self.mailbox_transport.as_str(), ""),
        };
        let nexthop = if nexthop.is_empty() {
            self.cfg.get("myhostname")
        } else {
            nexthop.to_string()
        };
        let address = if t.class == Class::Direct {
            r.rcpt.address.clone()
        } else {
            t.name.address.clone()
        };
        let mut req = job.req.clone();
        req.transport = transport.to_string();
        req.nexthop = nexthop;
        req.recipients = vec![DeliveryRecipient {
            offset: r.offset,
            rcpt: Recipient {
                address,
                original: r.rcpt.original_or_address().to_string(),
                ..r.rcpt.clone()
            },
        }];
        let unavailable = |e: io::Error| {
            Status::defer(
                "4.3.0",
                format!(
                    "mailbox_transport {}: {}",
                    self.mailbox_transport,
                    status::strip_os_error(&e)
                ),
            )
        };
        let sock = postern_common::queue::QueueTree::new(self.cfg.get("queue_directory"))
            .socket(true, transport);
        let mut conn =
            postern_common::ipc::connect(&sock, self.ipc_timeout).map_err(unavailable)?;
        postern_common::ipc::send(&mut conn, &req).map_err(unavailable)?;
        let reply: postern_common::ipc::DeliveryReply =
            postern_common::ipc::recv(&mut conn).map_err(unavailable)?;
        reply
            .results
            .into_iter()
            .find(|x| x.offset == r.offset)
            .ok_or_else(|| {
                Status::defer(
                    "4.3.0",
                    format!("mailbox_transport {}: no result", self.mailbox_transport),
                )
            })
    }

    /// Delivers to a mailbox, a file or a command.
    fn target(
        &self,
        job: &Job,
        r: &DeliveryRecipient,
        t: &Target,
        seen: &HashSet<String>,
    ) -> Status {
        match &t.dest {
            Dest::Mailbox => self.mailbox(job, r, t, seen),
            Dest::File(path) => self.file(job, r, t, path),
            Dest::Command(cmd) => self.command(job, r, t, cmd),
            Dest::Forward(_) => Status::defer("4.3.0", "internal error: forward as target"),
        }
    }

    fn prefix_headers(
        &self,
        r: &DeliveryRecipient,
        sender: &str,
        delivered: Option<&str>,
    ) -> Vec<u8> {
        Prefix {
            sender,
            original: self
                .original_recipient
                .then(|| r.rcpt.original_or_address()),
            delivered,
        }
        .headers()
    }

    fn wants_delivered(&self, what: &str) -> bool {
        self.delivered_header.iter().any(|w| w == what)
    }

    fn mailbox(
        &self,
        job: &Job,
        r: &DeliveryRecipient,
        t: &Target,
        seen: &HashSet<String>,
    ) -> Status {
        let address = if t.class == Class::Direct && r.rcpt.address.contains('@') {
            r.rcpt.address.clone()
        } else {
            t.name.address.clone()
        };
        if t.class != Class::Direct && seen.contains(&address.to_lowercase()) {
            return Status::bounce("5.4.6", format!("mail forwarding loop for {address}"));
        }
        let Some(acct) = self.user(&t.name.user) else {
            return Status::bounce("5.1.1", format!("unknown user: \"{}\"", t.name.user));
        };
        if !self.mailbox_command.is_empty() {
            // As the recipient, never as root (Postfix: mailbox_command
            // runs with the recipient's privileges; root's mail too runs
            // as default_privs).
            let acct = if acct.uid == 0 && privs::is_root() {
                match self.run_as(&Target {
                    owner: None,
                    ..t.clone()
                }) {
                    Ok(a) => a,
                    Err(s) => return s,
                }
            } else {
                acct
            };
            let home = acct.home.display().to_string();
            let ext = t.name.extension.clone().unwrap_or_default();
            let vars: [(&str, &str); 6] = [
                ("user", &t.name.user),
                ("home", &home),
                ("extension", &ext),
                ("recipient", &address),
                ("domain", &t.name.domain),
                ("local", &t.name.local),
            ];
            // $user, $home, ... as Postfix; "$EXTENSION" and other shell
            // variables are left for the shell (they are in the environment).
            let cmd = crate::resolve::substitute(&self.mailbox_command, &vars);
            return self.run_command(job, r, &t.name, &acct, &cmd, Some(&address));
        }
        let sender = job.req.sender.as_str();
        let headers = self.prefix_headers(r, sender, Some(&address));
        let mut content = match job.content() {
            Ok(c) => c,
            Err(e) => return Status::io(&e, "cannot read queue file"),
        };
        let ids = (acct.uid, acct.gid);
        let (path, maildir, spool) = if !self.home_mailbox.is_empty() {
            let p = format!("{}/{}", acct.home.display(), self.home_mailbox);
            (PathBuf::from(&p), p.ends_with('/'), None)
        } else {
            let dir = self.spool.trim_end_matches('/');
            let maildir = self.spool.ends_with('/');
            let p = format!("{dir}/{}{}", acct.name, if maildir { "/" } else { "" });
            (PathBuf::from(p), maildir, Some(PathBuf::from(dir)))
        };
        if maildir {
            return match self.maildir(&path, ids, &headers, &mut content) {
                Ok(_) => Status::sent("delivered to maildir"),
                Err(s) => s,
            };
        }
        let (open_as, chown) = match &spool {
            Some(dir) => spool_ids(dir, &acct),
            None => (ids, None),
        };
        let mbox = Mbox {
            path: &path,
            open_as,
            write_as: ids,
            chown,
            mailbox: true,
            owner: self.strict_owner.then_some(acct.uid),
            size_limit: self.size_limit,
            locks: &self.locks,
        };
        mbox.deliver(
            sender,
            &headers,
            &mut content,
            job.req.content_size,
            "delivered to mailbox",
            &format!(
                "cannot update mailbox {} for user {}. ",
                path.display(),
                acct.name
            ),
        )
    }

    /// The user's `.forward`: the first file of `forward_path` that
    /// exists, read with the user's privileges and owned by the user or
    /// root. A path that names `$extension` is skipped for an address
    /// without one (Postfix's rule for undefined attributes).
    fn read_forward(&self, n: &crate::resolve::LocalName) -> Option<String> {
        let acct = self.user(&n.user)?;
        let home = acct.home.display().to_string();
        let delim = self
            .delimiter
            .chars()
            .next()
            .map(String::from)
            .unwrap_or_default();
        for spec in &self.forward_path {
            if n.extension.is_none() && spec.contains("extension") {
                continue;
            }
            let vars: [(&str, &str); 7] = [
                ("home", &home),
                ("user", &n.user),
                ("extension", n.extension.as_deref().unwrap_or("")),
                ("recipient_delimiter", &delim),
                ("local", &n.local),
                ("domain", &n.domain),
                ("recipient", &n.address),
            ];
            let path = PathBuf::from(crate::resolve::substitute(spec, &vars));
            if !path.is_absolute() {
                continue;
            }
            let read = || -> io::Result<Option<String>> {
                let f = match std::fs::File::open(&path) {
                    Ok(f) => f,
                    Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
                    Err(e) => return Err(e),
                };
                let m = f.metadata()?;
                if !m.is_file() {
                    return Ok(None);
                }
                if m.uid() != acct.uid && m.uid() != 0 {
                    warning!(
                        "file {} is not owned by {} or root: ignored",
                        path.display(),
                        acct.name
                    );
                    return Ok(None);
                }
                let mut s = String::new();
                f.take(crate::resolve::MAX_INCLUDE as u64)
                    .read_to_string(&mut s)?;
                Ok(Some(s))
            };
            match privs::as_user(acct.uid, acct.gid, read) {
                Ok(Ok(Some(text))) => return Some(text),
                Ok(Ok(None)) => {}
                Ok(Err(e)) | Err(e) => {
                    warning!(
                        "cannot read {}: {}",
                        path.display(),
                        status::strip_os_error(&e)
                    )
                }
            }
        }
        None
    }

    /// The account `name`, from this request's answers when it was
    /// looked up before.
    fn user(&self, name: &str) -> Option<Account> {
        if let Some(a) = self.accounts.borrow().get(name) {
            return a.clone();
        }
        let a = privs::user(name);
        self.accounts
            .borrow_mut()
            .insert(name.to_string(), a.clone());
        a
    }

    /// The ids of `default_privs` (None when it does not exist).
    fn default_privs_ids(&self) -> Option<Ids> {
        self.user(&self.default_privs).map(|a| (a.uid, a.gid))
    }

    /// The account files and commands of aliases run as: `default_privs`
    /// as root, this process's own account otherwise.
    fn run_as(&self, t: &Target) -> Result<Account, Status> {
        if let Some(owner) = &t.owner {
            // Named in a .forward file: as that user, never as root.
            return match self.user(owner) {
                Some(a) if a.uid != 0 || !privs::is_root() => Ok(a),
                Some(_) => self.run_as(&Target {
                    owner: None,
                    ..t.clone()
                }),
                None => Err(Status::bounce(
                    "5.1.1",
                    format!("unknown user: \"{owner}\""),
                )),
            };
        }
        if privs::is_root() {
            self.user(&self.default_privs).ok_or_else(|| {
                warning!(
                    "default_privs account {} does not exist",
                    self.default_privs
                );
                Status::defer(
                    "4.3.5",
                    format!(
                        "mail system configuration error: no account {}",
                        self.default_privs
                    ),
                )
            })
        } else {
            let uid = nix::unistd::geteuid().as_raw();
            Ok(privs::user_by_uid(uid).unwrap_or_else(|| Account {
                name: uid.to_string(),
                uid,
                gid: nix::unistd::getegid().as_raw(),
                home: PathBuf::from("/"),
                shell: PathBuf::from("/bin/sh"),
            }))
        }
    }

    fn file(&self, job: &Job, r: &DeliveryRecipient, t: &Target, path: &Path) -> Status {
        if !self.allow_files.iter().any(|c| c == t.class.word()) {
            return Status::bounce("5.7.1", "mail to file is restricted");
        }
        let acct = match self.run_as(t) {
            Ok(a) => a,
            Err(s) => return s,
        };
        let ids = (acct.uid, acct.gid);
        let sender = job.req.sender.as_str();
        let delivered = self
            .wants_delivered("file")
            .then_some(t.name.address.as_str());
        let headers = self.prefix_headers(r, sender, delivered);
        let mut content = match job.content() {
            Ok(c) => c,
            Err(e) => return Status::io(&e, "cannot read queue file"),
        };
        let reason = format!("delivered to file: {}", path.display());
        if path.as_os_str().as_encoded_bytes().ends_with(b"/") {
            return match self.maildir(path, ids, &headers, &mut content) {
                Ok(_) => Status::sent(reason),
                Err(s) => s,
            };
        }
        let mbox = Mbox {
            path,
            open_as: ids,
            write_as: ids,
            chown: None,
            mailbox: false,
            owner: None,
            size_limit: self.size_limit,
            locks: &self.locks,
        };
        mbox.deliver(
            sender,
            &headers,
            &mut content,
            job.req.content_size,
            reason,
            &format!("cannot append message to file {}: ", path.display()),
        )
    }

    fn command(&self, job: &Job, r: &DeliveryRecipient, t: &Target, cmd: &str) -> Status {
        if !self.allow_commands.iter().any(|c| c == t.class.word()) {
            return Status::bounce("5.7.1", "mail to command is restricted");
        }
        let acct = match self.run_as(t) {
            Ok(a) => a,
            Err(s) => return s,
        };
        let delivered = self
            .wants_delivered("command")
            .then_some(t.name.address.as_str());
        self.run_command(job, r, &t.name, &acct, cmd, delivered)
    }

    /// Runs a command (an alias's, a .forward's, or `mailbox_command`)
    /// as `acct`, with the environment Postfix's local(8) gives it.
    fn run_command(
        &self,
        job: &Job,
        r: &DeliveryRecipient,
        name: &crate::resolve::LocalName,
        acct: &Account,
        cmd: &str,
        delivered: Option<&str>,
    ) -> Status {
        let sender = job.req.sender.as_str();
        let mut prefix = message::from_line(sender, postern_common::queue::now().0).into_bytes();
        prefix.extend_from_slice(&self.prefix_headers(r, sender, delivered));
        let mut content = match job.content() {
            Ok(c) => c,
            Err(e) => return Status::io(&e, "cannot read queue file"),
        };
        let mut env: Vec<(String, String)> = vec![
            ("PATH".into(), "/usr/bin:/bin".into()),
            ("SENDER".into(), sender.into()),
            ("RECIPIENT".into(), name.address.clone()),
            ("LOCAL".into(), name.local.clone()),
            ("DOMAIN".into(), name.domain.clone()),
            ("HOME".into(), acct.home.display().to_string()),
            ("USER".into(), acct.name.clone()),
            ("LOGNAME".into(), acct.name.clone()),
            ("SHELL".into(), acct.shell.display().to_string()),
            (
                "ORIGINAL_RECIPIENT".into(),
                r.rcpt.original_or_address().to_string(),
            ),
        ];
        if let Some(ext) = &name.extension {
            env.push(("EXTENSION".into(), ext.clone()));
        }
        if let Some(d) = self.delimiter.chars().next() {
            env.push(("RECIPIENT_DELIMITER".into(), d.to_string()));
        }
        for name in ["TZ", "LANG", "MAIL_CONFIG"] {
            if let Ok(v) = std::env::var(name) {
                env.push((name.into(), v));
            }
        }
        let c = pipe::Command {
            command: cmd,
            argv: None,
            env,
            run_as: Some((acct.uid, acct.gid)),
            home: &acct.home,
            time_limit: self.time_limit,
        };
        c.run(&prefix, &mut content)
    }

    /// One forwarded message to every remote target of a recipient.
    fn forward(&self, job: &Job, r: &DeliveryRecipient, targets: &[&Target]) -> Status {
        let recipients: Vec<Recipient> = targets
            .iter()
            .filter_map(|t| match &t.dest {
                Dest::Forward(a) => Some(Recipient {
                    address: a.clone(),
                    // The address that expanded: its orig_to in the new
                    // message's delivery lines, as with Postfix.
                    original: if r.rcpt.original.is_empty() {
                        r.rcpt.address.clone()
                    } else {
                        r.rcpt.original.clone()
                    },
                    notify: r.rcpt.notify,
                    orcpt: r.rcpt.orcpt.clone(),
                }),
                _ => None,
            })
            .collect();
        // Before the content: reading the envelope moves the file position.
        let env = postern_common::qfile::read_envelope(&job.file).ok();
        let smtputf8 = env
            .as_ref()
            .is_some_and(|env| postern_common::smtputf8::Flags::of_envelope(env).requested);
        let requiretls = env
            .as_ref()
            .is_some_and(|env| env.attr(postern_common::qfile::attr::REQUIRETLS).is_some());
        let mut content = match job.content() {
            Ok(c) => c,
            Err(e) => return Status::io(&e, "cannot read queue file"),
        };
        let f = Forward {
            cleanup: &self.cleanup,
            timeout: self.ipc_timeout,
            sender: &job.req.sender,
            recipients,
            delivered_to: self
                .wants_delivered("forward")
                .then_some(r.rcpt.address.as_str()),
            smtputf8,
            requiretls,
        };
        f.submit(&mut content)
    }
}

/// Where a recipient's outcome was recorded.
/// An address verification probe (`DeliveryRequest::VERIFY`): nothing is
/// delivered; the address is resolved (aliases, `.forward`, the account)
/// and its outcome is what a delivery would meet first: a failure (an
/// unknown user: undeliverable), else Postfix's words for where the mail
/// would go.
fn probe_status(exp: &crate::resolve::Expansion) -> Status {
    let failures: Vec<Status> = exp.failures.iter().map(|(_, s)| s.clone()).collect();
    if exp.targets.is_empty() {
        return if failures.is_empty() {
            Status::sent("discarded")
        } else {
            status::combine(&failures)
        };
    }
    let t = &exp.targets[0];
    Status::sent(match &t.dest {
        Dest::Mailbox => "delivers to mailbox".to_string(),
        Dest::File(p) => format!("delivers to file: {}", p.display()),
        Dest::Command(c) => format!("delivers to command: {c}"),
        Dest::Forward(a) => format!("forwards to {a}"),
    })
}

enum Done {
    /// Here: local records it; true when the delivery lines of the
    /// alias members are logged already.
    Here(Status, bool),
    /// By the `mailbox_transport` agent, which already recorded it.
    Passed(RecipientResult),
}

/// Who opens a spool mailbox, as Postfix: the recipient when the spool
/// directory is world-writable; the recipient with the directory's group
/// when it is group-writable (`/var/mail` is `root:mail 2775`); else
/// root, and a new file is then given to the recipient.
fn spool_ids(dir: &Path, acct: &Account) -> (Ids, Option<Ids>) {
    let user = (acct.uid, acct.gid);
    match std::fs::metadata(dir) {
        Ok(m) if m.mode() & 0o002 != 0 => (user, None),
        Ok(m) if m.mode() & 0o020 != 0 => ((acct.uid, m.gid()), None),
        _ if privs::is_root() => ((0, 0), Some(user)),
        _ => (user, None),
    }
}

#[cfg(test)]
mod probe_tests {
    use super::*;
    use crate::resolve::Expansion;

    #[test]
    fn a_probe_for_an_unknown_user_is_undeliverable_and_nothing_else_is_done() {
        let mut exp = Expansion::default();
        exp.failures.push((
            "nobody@h.test".into(),
            Status::bounce("5.1.1", "unknown user: \"nobody\""),
        ));
        let s = probe_status(&exp);
        assert_eq!(s.outcome, Outcome::Bounced);
        assert_eq!(s.dsn, "5.1.1");
        let s = probe_status(&Expansion::default());
        assert_eq!(s.outcome, Outcome::Sent);
    }
}
