//! Writing a message into `maildrop/`, directly or through `postdrop`.
//!
//! `maildrop/` is mode 1730, group `setgid_group`: root, `mail_owner` and
//! programs running with that group (the set-gid `postdrop`) may create
//! files in it; nobody else may even look inside. So, as in Postfix, a
//! [`Drop`] first tries to create the file itself and, when the directory
//! is not writable by the caller, runs `command_directory/postdrop` and
//! streams the message to it as [`DropRecord`]s (the one definition of
//! that pipe's protocol: 4-byte length + postcard, as `ipc`). postdrop
//! checks every record, writes the file with its own writer, and exits
//! with a sysexits code.
//!
//! A maildrop file belongs to the user who wrote it (mode 0644, so that
//! pickup, running as `mail_owner`, can read it); others cannot reach it
//! because they cannot search `maildrop/`.

use crate::sysexits::*;
use postern_common::ipc::{self, Wakeup};
use postern_common::qfile::{self, attr, Recipient};
use postern_common::queue::{self, Queue, QueueTree};
use postern_conf::Config;
use serde::{Deserialize, Serialize};
use std::io::{BufWriter, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};

/// Attributes a submission may carry into the maildrop file: what pickup
/// passes on to cleanup.
pub const ALLOWED_ATTRS: &[&str] = &[
    attr::EXTRACT_RECIPIENTS,
    attr::FULL_NAME,
    attr::ENVID,
    attr::RET,
];

/// The envelope of one submission.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Submission {
    pub sender: String,
    pub recipients: Vec<Recipient>,
    /// (name, value) among [`ALLOWED_ATTRS`].
    pub attrs: Vec<(String, String)>,
}

/// What sendmail writes to postdrop's standard input: one `Envelope`,
/// any number of `Content` pieces (LF line ends), then `End`. A stream
/// that stops before `End` leaves nothing behind.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum DropRecord {
    Envelope(Submission),
    Content(Vec<u8>),
    End,
}

/// A failure: the sysexits code and the one-line reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fail {
    pub code: i32,
    pub reason: String,
}

impl Fail {
    pub fn new(code: i32, reason: impl Into<String>) -> Fail {
        Fail {
            code,
            reason: reason.into(),
        }
    }
}

fn has_ctl(s: &str) -> bool {
    s.bytes().any(|b| b < 32 || b == 127)
}

impl Submission {
    /// Refuses what no honest sendmail writes: control characters,
    /// attributes other than [`ALLOWED_ATTRS`], rewritten or done
    /// recipients, impossible DSN values.
    pub fn check(&self) -> Result<(), Fail> {
        if has_ctl(&self.sender) || self.sender.len() > 1024 {
            return Err(Fail::new(EX_DATAERR, "bad sender address syntax"));
        }
        for r in &self.recipients {
            if r.address.is_empty()
                || has_ctl(&r.address)
                || r.address.len() > 1024
                || !r.original.is_empty()
                || has_ctl(&r.orcpt)
                || r.orcpt.len() > 1024
                || r.notify > (qfile::NOTIFY_SUCCESS | qfile::NOTIFY_FAILURE | qfile::NOTIFY_DELAY)
                    && r.notify != qfile::NOTIFY_NEVER
            {
                return Err(Fail::new(
                    EX_DATAERR,
                    format!("bad recipient address syntax: {}", r.address),
                ));
            }
        }
        for (n, v) in &self.attrs {
            if !ALLOWED_ATTRS.contains(&n.as_str()) || has_ctl(v) || v.len() > 1024 {
                return Err(Fail::new(EX_DATAERR, format!("bad attribute: {n}")));
            }
            if n == attr::RET && v != "FULL" && v != "HDRS" {
                return Err(Fail::new(EX_USAGE, format!("bad RET value: {v}")));
            }
        }
        Ok(())
    }
}

enum Target {
    File {
        w: qfile::Writer,
        path: PathBuf,
        tree: QueueTree,
    },
    Postdrop {
        child: Child,
        stdin: BufWriter<ChildStdin>,
        program: PathBuf,
    },
}

/// One message on its way into `maildrop/`.
pub struct Drop {
    target: Option<Target>,
    limit: u64,
    size: u64,
}

/// Creates a maildrop file as the caller, or `None` when the caller may
/// not write `maildrop/`.
fn create_file(
    cfg: &Config,
    tree: &QueueTree,
    sub: &Submission,
    uid: u32,
) -> Result<Option<(qfile::Writer, PathBuf)>, Fail> {
    let nf = match tree.create(Queue::Maildrop) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => return Ok(None),
        Err(e) => {
            return Err(Fail::new(
                EX_TEMPFAIL,
                format!(
                    "queue file write error: {}: {e}",
                    tree.dir(Queue::Maildrop).display()
                ),
            ))
        }
    };
    let path = nf.path.clone();
    // pickup runs as mail_owner and must read what a local user wrote;
    // maildrop/ (mode 1730) keeps other users out, as in Postfix.
    let _ = nf
        .file
        .set_permissions(std::os::unix::fs::PermissionsExt::from_mode(0o644));
    // Run as root, give the file to mail_owner so that pickup (which runs
    // as mail_owner) can remove it.
    if let Ok(Some(owner)) = postern_common::privs::queue_owner(cfg) {
        let _ = std::os::unix::fs::chown(&path, Some(owner.uid), Some(owner.gid));
    }
    let fail = |e: std::io::Error| {
        let _ = std::fs::remove_file(&path);
        Fail::new(EX_TEMPFAIL, format!("queue file write error: {e}"))
    };
    let mut w = qfile::Writer::new(nf.file).map_err(fail)?;
    let (secs, usecs) = queue::now();
    let res = (|| -> std::io::Result<()> {
        w.arrival(secs, usecs)?;
        w.sender(&sub.sender)?;
        w.attribute(attr::SUBMITTER, &uid.to_string())?;
        for (n, v) in &sub.attrs {
            w.attribute(n, v)?;
        }
        for r in &sub.recipients {
            w.recipient(r)?;
        }
        w.begin_content()
    })();
    res.map_err(fail)?;
    Ok(Some((w, path)))
}

impl Drop {
    /// Starts a message: a maildrop file of our own when we may write
    /// `maildrop/`, else (when `via_postdrop`) a `postdrop` process, to
    /// which the configuration directory is passed as `-c`.
    pub fn open(cfg: &Config, sub: &Submission, via_postdrop: bool) -> Result<Drop, Fail> {
        sub.check()?;
        let limit = cfg.get_u64("message_size_limit").unwrap_or(10240000);
        let tree = QueueTree::new(cfg.get("queue_directory"));
        let uid = nix::unistd::getuid().as_raw();
        if let Some((w, path)) = create_file(cfg, &tree, sub, uid)? {
            return Ok(Drop {
                target: Some(Target::File { w, path, tree }),
                limit,
                size: 0,
            });
        }
        if !via_postdrop {
            return Err(not_writable(cfg, &tree));
        }
        let program = PathBuf::from(cfg.get("command_directory")).join("postdrop");
        let mut child = Command::new(&program)
            .arg("-c")
            .arg(cfg.dir())
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| {
                Fail::new(
                    EX_UNAVAILABLE,
                    format!(
                        "queue file write error: {}: permission denied, and cannot run {}: {e}",
                        tree.dir(Queue::Maildrop).display(),
                        program.display()
                    ),
                )
            })?;
        let stdin =
            BufWriter::with_capacity(64 * 1024, child.stdin.take().expect("stdin was piped"));
        let mut d = Drop {
            target: Some(Target::Postdrop {
                child,
                stdin,
                program,
            }),
            limit,
            size: 0,
        };
        d.send(&DropRecord::Envelope(sub.clone()))?;
        Ok(d)
    }

    fn send(&mut self, rec: &DropRecord) -> Result<(), Fail> {
        let Some(Target::Postdrop { stdin, .. }) = &mut self.target else {
            return Ok(());
        };
        if ipc::send(stdin, rec).is_err() {
            // postdrop gave up: its exit status says why.
            return Err(self.postdrop_status());
        }
        Ok(())
    }

    /// Waits for postdrop after it stopped reading: its exit code and the
    /// reason it printed (its one line, `postdrop: fatal: REASON`, becomes
    /// ours, so that the caller still sees one line).
    fn postdrop_status(&mut self) -> Fail {
        match self.target.take() {
            Some(Target::Postdrop {
                mut child,
                stdin,
                program,
            }) => {
                drop(stdin);
                let status = child.wait();
                let mut said = String::new();
                if let Some(mut e) = child.stderr.take() {
                    let _ = std::io::Read::read_to_string(
                        &mut std::io::Read::take(&mut e, 8192),
                        &mut said,
                    );
                }
                let said = said
                    .lines()
                    .rev()
                    .find_map(|l| l.strip_prefix("postdrop: fatal: "))
                    .map(str::to_string);
                match status {
                    Ok(s) if s.success() => Fail::new(EX_OK, ""),
                    Ok(s) if s.code().is_some() => Fail::new(
                        s.code().unwrap_or(EX_TEMPFAIL),
                        said.unwrap_or_else(|| format!("{} failed", program.display())),
                    ),
                    Ok(s) => Fail::new(
                        EX_TEMPFAIL,
                        format!("{} stopped early ({s})", program.display()),
                    ),
                    Err(e) => Fail::new(EX_OSERR, format!("wait for postdrop: {e}")),
                }
            }
            _ => Fail::new(EX_SOFTWARE, "postdrop is not running"),
        }
    }

    /// Appends content (LF line ends).
    pub fn content(&mut self, data: &[u8]) -> Result<(), Fail> {
        self.size += data.len() as u64;
        if self.limit > 0 && self.size > self.limit {
            self.abort();
            return Err(Fail::new(EX_DATAERR, "message file too big"));
        }
        match &mut self.target {
            Some(Target::File { w, .. }) => {
                if let Err(e) = w.content(data) {
                    self.abort();
                    return Err(Fail::new(
                        EX_TEMPFAIL,
                        format!("queue file write error: {e}"),
                    ));
                }
                Ok(())
            }
            Some(Target::Postdrop { .. }) => self.send(&DropRecord::Content(data.to_vec())),
            None => Err(Fail::new(EX_SOFTWARE, "message already finished")),
        }
    }

    /// Content bytes so far.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Makes the message durable; returns once it is on disk (exit 0 is
    /// only allowed after this), then wakes pickup.
    pub fn finish(mut self) -> Result<(), Fail> {
        match self.target.take() {
            Some(Target::File { w, path, tree }) => {
                let res = w.finish().and_then(|file| sync_maildrop(&tree, &file));
                if let Err(e) = res {
                    let _ = std::fs::remove_file(&path);
                    return Err(Fail::new(
                        EX_TEMPFAIL,
                        format!("queue file write error: {e}"),
                    ));
                }
                // The message is safe. Waking pickup is a courtesy: it also
                // scans maildrop on its own timer.
                let _ = ipc::wake(&tree.pickup_socket(), &[Wakeup::Wake]);
                Ok(())
            }
            Some(t @ Target::Postdrop { .. }) => {
                self.target = Some(t);
                self.send(&DropRecord::End)?;
                if let Some(Target::Postdrop { stdin, .. }) = &mut self.target {
                    if stdin.flush().is_err() {
                        return Err(self.postdrop_status());
                    }
                }
                let f = self.postdrop_status();
                if f.code == EX_OK {
                    Ok(())
                } else {
                    Err(f)
                }
            }
            None => Err(Fail::new(EX_SOFTWARE, "message already finished")),
        }
    }

    /// Gives up: nothing stays in the queue.
    pub fn abort(&mut self) {
        match self.target.take() {
            Some(Target::File { path, .. }) => {
                let _ = std::fs::remove_file(path);
            }
            Some(Target::Postdrop {
                mut child, stdin, ..
            }) => {
                // Closing the pipe before End makes postdrop remove its file.
                drop(stdin);
                let _ = child.wait();
            }
            None => {}
        }
    }
}

impl std::ops::Drop for Drop {
    fn drop(&mut self) {
        self.abort();
    }
}

/// Why postdrop may not create a file in `maildrop/`: most often it was
/// installed without its set-gid bit (a copy, a package that lost it).
fn not_writable(cfg: &Config, tree: &QueueTree) -> Fail {
    let dir = tree.dir(Queue::Maildrop);
    let group = cfg.get("setgid_group");
    let fix = "as root, run \"postern set-permissions\"";
    let Some(gid) = postern_common::privs::group_id(&group) else {
        return Fail::new(
            EX_CONFIG,
            format!("setgid_group {group}: no such group; {fix} once it exists"),
        );
    };
    let program = std::env::current_exe()
        .map(|p| p.display().to_string())
        .unwrap_or_else(|_| "postdrop".into());
    if nix::unistd::getegid().as_raw() != gid {
        return Fail::new(
            EX_NOPERM,
            format!(
                "{program} is not set-gid {group}: it cannot create a file in {}; {fix}",
                dir.display()
            ),
        );
    }
    let (mode, dir_gid) = std::fs::metadata(&dir)
        .map(|m| (m.mode() & 0o7777, m.gid()))
        .unwrap_or((0, 0));
    Fail::new(
        EX_NOPERM,
        format!(
            "{}: mode {mode:04o}, group id {dir_gid}: not writable by group {group}; {fix}",
            dir.display()
        ),
    )
}

/// Makes a new name in `maildrop/` durable. A caller that may write into
/// maildrop (mode 1730) but not open it syncs the whole file system.
fn sync_maildrop(tree: &QueueTree, file: &std::fs::File) -> std::io::Result<()> {
    match queue::sync_dir(&tree.dir(Queue::Maildrop)) {
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
            nix::unistd::syncfs(file)?;
            Ok(())
        }
        other => other,
    }
}

/// Whether this process runs with privileges its caller does not have
/// (set-gid or set-uid).
pub fn privileged() -> bool {
    nix::unistd::getuid() != nix::unistd::geteuid()
        || nix::unistd::getgid() != nix::unistd::getegid()
}

/// Postfix's rule for a configuration directory named by an unprivileged
/// caller of a set-gid program (`-c`/`-C` or `MAIL_CONFIG`): the default
/// directory, or one listed in `alternate_config_directories` (or
/// `multi_instance_directories`) of the default main.cf. Postern also
/// trusts a directory that only root can have written: it and its
/// main.cf owned by root and writable by nobody else.
pub fn check_config_dir(dir: &Path) -> Result<(), String> {
    if !privileged() || nix::unistd::getuid().is_root() {
        return Ok(());
    }
    let default = Path::new(postern_conf::DEFAULT_CONFIG_DIR);
    let canon = |p: &Path| std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf());
    let want = canon(dir);
    if want == canon(default) {
        return Ok(());
    }
    if let Ok(c) = Config::load(default) {
        for name in ["alternate_config_directories", "multi_instance_directories"] {
            if c.get_list(name).iter().any(|d| canon(Path::new(d)) == want) {
                return Ok(());
            }
        }
    }
    let root_only = |p: &Path| {
        std::fs::metadata(p)
            .map(|m| m.uid() == 0 && m.mode() & 0o022 == 0)
            .unwrap_or(false)
    };
    if root_only(&want) && root_only(&want.join("main.cf")) {
        return Ok(());
    }
    Err(format!(
        "{}: unauthorized configuration directory name: specify it in the \
         alternate_config_directories parameter of {}/main.cf",
        dir.display(),
        default.display()
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn submissions_are_checked() {
        let mut s = Submission {
            sender: "a@x.test".into(),
            recipients: vec![Recipient::new("b@x.test")],
            attrs: vec![(attr::RET.into(), "HDRS".into())],
        };
        assert!(s.check().is_ok());
        s.recipients[0].notify = qfile::NOTIFY_NEVER;
        assert!(s.check().is_ok());
        s.recipients[0].notify = qfile::NOTIFY_NEVER | qfile::NOTIFY_SUCCESS;
        assert!(s.check().is_err());
        s.recipients[0].notify = 0;
        s.recipients[0].original = "x".into();
        assert!(s.check().is_err());
        s.recipients[0].original.clear();
        s.attrs.push((attr::NOTIFICATION.into(), "yes".into()));
        assert!(s.check().is_err());
        s.attrs.pop();
        s.sender = "a\nb".into();
        assert_eq!(s.check().unwrap_err().code, EX_DATAERR);
    }
}
