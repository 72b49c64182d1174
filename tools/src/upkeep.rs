//! `postern set-permissions`, `postern upgrade-configuration` and
//! `postern logrotate`: the upkeep commands of Postfix's postfix(1).
//!
//! - **set-permissions** gives every Postern file and directory the owner
//!   and mode an installation has (Postfix's postfix-files): the queue
//!   tree's directories ([`queue::TREE`]), the queue files under them
//!   (`mail_owner`; their modes carry state and are left alone), the
//!   `data_directory`, main.cf and master.cf (root's, not writable by
//!   others), and `command_directory/postdrop` (root, group
//!   `setgid_group`, mode 2755: without it a user's `sendmail` cannot
//!   write `maildrop/`).
//! - **upgrade-configuration** creates what is missing of the queue tree
//!   and appends to master.cf each service of Postern's stock master.cf
//!   (`conf/etc/master.cf`) that it lacks, `unix` services only: an SMTP
//!   listener the administrator left out stays out.
//! - **logrotate** renames `maillog_file` to
//!   `maillog_file.$(date +maillog_file_rotate_suffix)`, creates a new
//!   empty file with the old one's owner and mode (daemons running as
//!   `mail_owner` append to it), has master reload so that every process
//!   writes to the new file, then compresses the old one with
//!   `maillog_file_compressor`.

use crate::die;
use crate::sysexits::*;
use postern_common::privs;
use postern_common::queue::{self, QueueTree};
use postern_conf::Config;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

const NAME: &str = "postern";

/// Postern's stock master.cf, the source of the services
/// upgrade-configuration adds.
const STOCK_MASTER_CF: &str = include_str!("../../conf/etc/master.cf");

fn must_be_root(command: &str) {
    if !privs::is_root() {
        die(
            NAME,
            EX_NOPERM,
            format_args!("{command}: must be run by the super-user"),
        );
    }
}

fn owner(cfg: &Config) -> privs::QueueOwner {
    match privs::queue_owner(cfg) {
        Ok(Some(o)) => o,
        Ok(None) => die(NAME, EX_NOPERM, "must be run by the super-user"),
        Err(e) => die(NAME, EX_CONFIG, e),
    }
}

/// Sets owner and mode of `path` when they differ; says what it changed.
fn fix(path: &Path, uid: u32, gid: u32, mode: Option<u32>) -> usize {
    let Ok(meta) = std::fs::symlink_metadata(path) else {
        return 0;
    };
    if meta.file_type().is_symlink() {
        return 0;
    }
    let mut changed = 0;
    if meta.uid() != uid || meta.gid() != gid {
        match std::os::unix::fs::chown(path, Some(uid), Some(gid)) {
            Ok(()) => changed = 1,
            Err(e) => eprintln!("{NAME}: warning: chown {}: {e}", path.display()),
        }
    }
    if let Some(m) = mode {
        if meta.mode() & 0o7777 != m {
            match std::fs::set_permissions(path, std::fs::Permissions::from_mode(m)) {
                Ok(()) => changed = 1,
                Err(e) => eprintln!("{NAME}: warning: chmod {}: {e}", path.display()),
            }
        }
    }
    changed
}

/// Gives every file below `dir` (not the directory itself) to `uid:gid`,
/// modes unchanged.
fn own_files_below(dir: &Path, uid: u32, gid: u32) -> usize {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return 0;
    };
    let mut n = 0;
    for e in rd.flatten() {
        let p = e.path();
        let Ok(ft) = e.file_type() else { continue };
        if ft.is_dir() {
            // Hashed queue subdirectories (hash_queue_names) are 0700 too.
            n += fix(&p, uid, gid, Some(0o700));
            n += own_files_below(&p, uid, gid);
        } else if ft.is_file() {
            n += fix(&p, uid, gid, None);
        }
    }
    n
}

/// `postern set-permissions`.
pub fn set_permissions(cfg: &Config) -> ! {
    must_be_root("set-permissions");
    let o = owner(cfg);
    let tree = QueueTree::new(cfg.get("queue_directory"));
    if let Err(e) = privs::prepare_tree(cfg, Some(o)) {
        // An unsafe tree is what this command repairs: go on.
        if !e.starts_with("unsafe queue directory") {
            die(NAME, 1, e);
        }
    }
    let mut changed = fix(tree.root(), 0, 0, None);
    // The queue directory is never writable by group or others.
    if let Ok(m) = std::fs::metadata(tree.root()) {
        if m.mode() & 0o022 != 0 {
            changed += fix(tree.root(), 0, 0, Some(m.mode() & 0o7755));
        }
    }
    for (name, mode) in queue::TREE {
        let p = tree.root().join(name);
        let (uid, gid) = match (*name, o.setgid_gid) {
            ("pid", _) => (0, 0),
            ("maildrop" | "public", Some(g)) => (o.uid, g),
            _ => (o.uid, o.gid),
        };
        changed += fix(&p, uid, gid, Some(*mode));
        // maildrop/ files keep their submitter (Postfix's postfix-files
        // does not recurse there either).
        if !matches!(*name, "pid" | "private" | "public" | "maildrop") {
            changed += own_files_below(&p, o.uid, o.gid);
        }
    }
    let data = PathBuf::from(cfg.get("data_directory"));
    changed += fix(&data, o.uid, o.gid, None);
    for f in ["main.cf", "master.cf"] {
        let p = cfg.dir().join(f);
        if let Ok(m) = std::fs::metadata(&p) {
            changed += fix(&p, 0, m.gid(), Some(m.mode() & 0o755));
        }
    }
    let postdrop = PathBuf::from(cfg.get("command_directory")).join("postdrop");
    match (o.setgid_gid, postdrop.is_file()) {
        (Some(g), true) => changed += fix(&postdrop, 0, g, Some(0o2755)),
        (None, _) => eprintln!(
            "{NAME}: warning: setgid_group {}: no such group; {} left as it is",
            cfg.get("setgid_group"),
            postdrop.display()
        ),
        (_, false) => eprintln!("{NAME}: warning: {}: no such file", postdrop.display()),
    }
    eprintln!(
        "{NAME}: set-permissions: {changed} file{} changed",
        if changed == 1 { "" } else { "s" }
    );
    std::process::exit(EX_OK)
}

/// The `name type` of each service line of a master.cf text.
fn service_keys(text: &str) -> Vec<(String, String)> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.starts_with(char::is_whitespace))
        .filter_map(|l| {
            let mut w = l.split_whitespace();
            Some((w.next()?.to_string(), w.next()?.to_string()))
        })
        .collect()
}

/// `postern upgrade-configuration`.
pub fn upgrade_configuration(cfg: &Config) -> ! {
    let owner = privs::queue_owner(cfg).unwrap_or_else(|e| die(NAME, EX_CONFIG, e));
    if let Err(e) = privs::prepare_tree(cfg, owner) {
        die(NAME, 1, e);
    }
    let path = cfg.dir().join("master.cf");
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| die(NAME, EX_CONFIG, format_args!("{}: {e}", path.display())));
    let have = service_keys(&text);
    let mut added = Vec::new();
    for line in STOCK_MASTER_CF.lines() {
        let Some(key) = service_keys(line).pop() else {
            continue;
        };
        if key.1 == "unix" && !have.contains(&key) {
            eprintln!(
                "{NAME}: adding {}/{} service to {}",
                key.0,
                key.1,
                path.display()
            );
            added.push(line);
        }
    }
    if !added.is_empty() {
        let mut new = text.clone();
        if !new.is_empty() && !new.ends_with('\n') {
            new.push('\n');
        }
        for l in &added {
            new.push_str(l);
            new.push('\n');
        }
        let tmp = cfg
            .dir()
            .join(format!("master.cf.tmp.{}", std::process::id()));
        let res = std::fs::write(&tmp, new)
            .and_then(|()| {
                let m = std::fs::metadata(&path)?;
                std::fs::set_permissions(&tmp, m.permissions())?;
                let _ = std::os::unix::fs::chown(&tmp, Some(m.uid()), Some(m.gid()));
                std::fs::File::open(&tmp)?.sync_all()
            })
            .and_then(|()| std::fs::rename(&tmp, &path));
        if let Err(e) = res {
            let _ = std::fs::remove_file(&tmp);
            die(NAME, 1, format_args!("update {}: {e}", path.display()));
        }
    }
    std::process::exit(EX_OK)
}

/// `strftime(3)` of the local time now.
fn strftime_now(format: &str) -> Option<String> {
    let fmt = std::ffi::CString::new(format).ok()?;
    let mut buf = vec![0u8; 256];
    // SAFETY: time(NULL), localtime_r and strftime with valid pointers
    // and the buffer's true length.
    let n = unsafe {
        let t = libc::time(std::ptr::null_mut());
        let mut tm: libc::tm = std::mem::zeroed();
        libc::localtime_r(&t, &mut tm);
        libc::strftime(buf.as_mut_ptr().cast(), buf.len(), fmt.as_ptr(), &tm)
    };
    (n > 0).then(|| String::from_utf8_lossy(&buf[..n]).into_owned())
}

/// `postern logrotate`. `master` is the running master's pid, if any.
pub fn logrotate(cfg: &Config, master: Option<i32>) -> ! {
    let mut values = Vec::new();
    for name in [
        "maillog_file",
        "maillog_file_compressor",
        "maillog_file_rotate_suffix",
    ] {
        let v = cfg.get(name);
        if v.is_empty() {
            die(
                NAME,
                1,
                format_args!("empty '{name}' parameter value - logfile rotation failed"),
            );
        }
        values.push(v);
    }
    let (file, compressor, suffix) = (&values[0], &values[1], &values[2]);
    if file.starts_with("/dev/") {
        die(NAME, 1, format_args!("not rotating '{file}'"));
    }
    let failed = |why: String| -> ! {
        die(
            NAME,
            1,
            format_args!("logfile '{file}' rotation failed: {why}"),
        )
    };
    let suffix =
        strftime_now(suffix).unwrap_or_else(|| failed("bad maillog_file_rotate_suffix".into()));
    let old = format!("{file}.{suffix}");
    let meta = std::fs::metadata(file).unwrap_or_else(|e| failed(format!("{file}: {e}")));
    if let Err(e) = std::fs::rename(file, &old) {
        failed(format!("rename {file} to {old}: {e}"));
    }
    // The new file, as the old one was: daemons running as mail_owner
    // may not create files where it lives.
    let created = std::fs::OpenOptions::new()
        .append(true)
        .create_new(true)
        .open(file)
        .and_then(|f| {
            f.set_permissions(std::fs::Permissions::from_mode(meta.mode() & 0o7777))?;
            std::os::unix::fs::fchown(&f, Some(meta.uid()), Some(meta.gid()))
        });
    if let Err(e) = created {
        failed(format!("create {file}: {e}"));
    }
    if let Some(pid) = master {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGHUP,
        );
        // Processes finish what they write to the old file.
        std::thread::sleep(Duration::from_secs(1));
    }
    match std::process::Command::new(compressor).arg(&old).output() {
        Ok(o) if o.status.success() => std::process::exit(EX_OK),
        Ok(o) => failed(format!(
            "{compressor}: {}",
            String::from_utf8_lossy(&o.stderr).trim()
        )),
        Err(e) => failed(format!("{compressor}: {e}")),
    }
}
