//! Accounts and privileges: who a program runs as.
//!
//! master, started as root, starts every unprivileged Postern daemon as
//! root; the daemon reads its keys and tables, then drops itself to
//! `mail_owner` with [`drop_to`] (through
//! [`crate::service::drop_privileges`]) before it reads anything from the
//! network, so that no code that parses outside input ever runs as root.
//! A program that is not Postern's own master drops with [`drop_to`]
//! between fork and exec. `local` keeps root only to switch its effective
//! ids to each recipient in turn ([`as_user`]).

use std::io;

/// A user account from the password database.
#[derive(Debug, Clone)]
pub struct Account {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
    pub home: std::path::PathBuf,
    pub shell: std::path::PathBuf,
}

impl From<nix::unistd::User> for Account {
    fn from(u: nix::unistd::User) -> Account {
        Account {
            name: u.name,
            uid: u.uid.as_raw(),
            gid: u.gid.as_raw(),
            home: u.dir,
            shell: u.shell,
        }
    }
}

/// Looks up an account by name.
pub fn user(name: &str) -> Option<Account> {
    nix::unistd::User::from_name(name)
        .ok()
        .flatten()
        .map(Account::from)
}

/// Account names read by [`remember_account_names`], for a chrooted
/// process that can no longer read the password database; None when the
/// name service listed none (it may not enumerate at all).
static ACCOUNT_NAMES: std::sync::OnceLock<Option<std::collections::HashSet<String>>> =
    std::sync::OnceLock::new();

/// Reads every account name of the password database, for a process about
/// to chroot away from it (smtpd's `unix:passwd.byname` recipient check).
/// Accounts added later are known to processes started later (smtpd
/// processes live `max_idle`/`max_use`, or until `postern reload`).
/// Name services that do not enumerate (LDAP, sssd without `enumerate`)
/// list only some accounts, or none: with none, [`account_exists`] says
/// yes to every name rather than refuse them all. Returns how many names
/// were read. Not thread-safe: call while the process has one thread.
pub fn remember_account_names() -> usize {
    let mut names = std::collections::HashSet::new();
    // SAFETY: the getpwent iteration on one thread; each entry's name is
    // copied before the next call reuses the buffer.
    unsafe {
        libc::setpwent();
        loop {
            let pw = libc::getpwent();
            if pw.is_null() {
                break;
            }
            let name = std::ffi::CStr::from_ptr((*pw).pw_name);
            names.insert(name.to_string_lossy().into_owned());
        }
        libc::endpwent();
    }
    let n = names.len();
    let _ = ACCOUNT_NAMES.set((n > 0).then_some(names));
    n
}

/// Whether account `name` exists: among the names remembered before a
/// chroot, or else in the password database.
pub fn account_exists(name: &str) -> bool {
    match ACCOUNT_NAMES.get() {
        Some(Some(names)) => names.contains(name),
        Some(None) => true,
        None => user(name).is_some(),
    }
}

/// Looks up an account by uid.
pub fn user_by_uid(uid: u32) -> Option<Account> {
    nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid))
        .ok()
        .flatten()
        .map(Account::from)
}

/// Looks up a group id by name.
pub fn group_id(name: &str) -> Option<u32> {
    nix::unistd::Group::from_name(name)
        .ok()
        .flatten()
        .map(|g| g.gid.as_raw())
}

pub fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// The calling thread's file-system identity (Linux's fsuid and fsgid)
/// set to `uid`/`gid` until the guard goes: files it makes are theirs
/// from the start, and it is refused what they would be. Per thread:
/// the process's other threads and its real and effective ids do not
/// change. For root, which keeps the capability to change them back.
pub struct FsIdentity {
    uid: u32,
    gid: u32,
}

impl FsIdentity {
    pub fn assume(uid: u32, gid: u32) -> FsIdentity {
        // SAFETY: setfsgid/setfsuid take plain ids and change only this
        // thread's credentials; each returns the previous id.
        let gid0 = unsafe { libc::setfsgid(gid) } as u32;
        let uid0 = unsafe { libc::setfsuid(uid) } as u32;
        FsIdentity {
            uid: uid0,
            gid: gid0,
        }
    }
}

impl Drop for FsIdentity {
    fn drop(&mut self) {
        // SAFETY: as above; the user first, which gives back the
        // capability to set the group.
        unsafe {
            libc::setfsuid(self.uid);
            libc::setfsgid(self.gid);
        }
    }
}

/// Drops to `uid`/`gid` for good: no supplementary groups, an empty
/// capability bounding set, no ambient capabilities, and no_new_privs.
/// Made of plain system calls only, so that it is safe to call between
/// fork and exec.
pub fn drop_to(uid: u32, gid: u32) -> io::Result<()> {
    use nix::unistd::{Gid, Uid};
    // SAFETY: prctl with integer arguments only; it changes this thread's
    // capability sets and reads no memory of ours.
    unsafe {
        // Clear ambient capabilities and empty the bounding set while we
        // still have CAP_SETPCAP; EINVAL marks the end of known caps.
        libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_CLEAR_ALL,
            0,
            0,
            0,
        );
        for cap in 0..64 {
            if libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0) == -1 {
                break;
            }
        }
    }
    let (uid, gid) = (Uid::from_raw(uid), Gid::from_raw(gid));
    nix::unistd::setgroups(&[gid])?;
    nix::unistd::setresgid(gid, gid, gid)?;
    nix::unistd::setresuid(uid, uid, uid)?;
    // setresuid away from root cleared the permitted and effective
    // sets, but not the inheritable one (which a root process may have
    // been given): empty all three.
    clear_capabilities()?;
    // no_new_privs keeps a set-id program from giving them back.
    nix::sys::prctl::set_no_new_privs()?;
    Ok(())
}

/// Empties this thread's effective, permitted and inheritable
/// capability sets (capset(2), version 3). A plain system call: safe
/// between fork and exec.
fn clear_capabilities() -> io::Result<()> {
    #[repr(C)]
    struct Header {
        version: u32,
        pid: libc::c_int,
    }
    #[repr(C)]
    #[derive(Clone, Copy)]
    struct Data {
        effective: u32,
        permitted: u32,
        inheritable: u32,
    }
    const VERSION_3: u32 = 0x2008_0522;
    let mut header = Header {
        version: VERSION_3,
        pid: 0,
    };
    let data = [Data {
        effective: 0,
        permitted: 0,
        inheritable: 0,
    }; 2];
    // SAFETY: capset with a valid header and the two data words version 3
    // expects.
    let r = unsafe { libc::syscall(libc::SYS_capset, &mut header, data.as_ptr()) };
    if r == -1 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Runs `f` with the effective uid and gid of `uid`/`gid` (and only that
/// group), then returns to root. When not root, runs `f` as is.
/// Must not be used from a process with more than one thread.
pub fn as_user<T>(uid: u32, gid: u32, f: impl FnOnce() -> T) -> io::Result<T> {
    if !is_root() {
        return Ok(f());
    }
    use nix::unistd::{setegid, seteuid, setgroups, Gid, Uid};
    // The process is single-threaded: the ids are the whole process's.
    let switched = setgroups(&[Gid::from_raw(gid)])
        .and_then(|()| setegid(Gid::from_raw(gid)))
        .and_then(|()| seteuid(Uid::from_raw(uid)));
    if let Err(e) = switched {
        let _ = seteuid(Uid::from_raw(0));
        let _ = setegid(Gid::from_raw(0));
        return Err(e.into());
    }
    let out = f();
    // Back to root; the saved set-user-id is still 0.
    if seteuid(Uid::from_raw(0)).is_err() || setegid(Gid::from_raw(0)).is_err() {
        // Cannot become root again: better to die than to go on as
        // the wrong user.
        // SAFETY: _exit ends the process at once; nothing runs after it.
        unsafe { libc::_exit(1) };
    }
    let _ = setgroups(&[]);
    Ok(out)
}

/// Who owns the queue: (uid, gid) of `mail_owner` and the gid of
/// `setgid_group`, when running as root; `None` for a plain user, who
/// runs everything as itself.
#[derive(Debug, Clone, Copy)]
pub struct QueueOwner {
    pub uid: u32,
    pub gid: u32,
    pub setgid_gid: Option<u32>,
}

/// Resolves the queue owner from the configuration.
pub fn queue_owner(cfg: &postern_conf::Config) -> Result<Option<QueueOwner>, String> {
    if !is_root() {
        return Ok(None);
    }
    let name = cfg.get("mail_owner");
    let acct = user(&name).ok_or_else(|| {
        format!(
            "file {}/main.cf: parameter mail_owner: unknown user name value: {name}",
            cfg.dir().display()
        )
    })?;
    if acct.uid == 0 {
        return Err(format!("mail_owner {name} must not be the super-user"));
    }
    Ok(Some(QueueOwner {
        uid: acct.uid,
        gid: acct.gid,
        setgid_gid: group_id(&cfg.get("setgid_group")),
    }))
}

/// Creates whatever is missing of the queue tree and `data_directory`,
/// with owners and modes, as Postfix's post-install does.
pub fn prepare_tree(cfg: &postern_conf::Config, owner: Option<QueueOwner>) -> Result<(), String> {
    let tree = crate::queue::QueueTree::new(cfg.get("queue_directory"));
    tree.create_dirs(
        owner.map(|o| (o.uid, o.gid)),
        owner.and_then(|o| o.setgid_gid),
    )
    .map_err(|e| format!("queue directory {}: {e}", tree.root().display()))?;
    let owner_uid = owner
        .map(|o| o.uid)
        .unwrap_or_else(|| nix::unistd::geteuid().as_raw());
    let problems = tree.check_dirs(owner_uid, owner.is_some());
    if let Some(first) = problems.first() {
        return Err(format!(
            "unsafe queue directory: {first}{}; fix the owner and mode (Postern does not start on a queue others can write to)",
            if problems.len() > 1 { format!(" (and {} more)", problems.len() - 1) } else { String::new() }
        ));
    }
    // Daemons that run as mail_owner append to maillog_file too.
    let maillog = cfg.get("maillog_file");
    if let (Some(o), false) = (owner, maillog.is_empty() || maillog.starts_with("/dev/")) {
        let f = std::fs::OpenOptions::new()
            .append(true)
            .create(true)
            .open(&maillog)
            .map_err(|e| format!("maillog_file {maillog}: {e}"))?;
        use std::os::unix::fs::PermissionsExt;
        let _ = f.set_permissions(std::fs::Permissions::from_mode(0o640));
        let _ = std::os::unix::fs::chown(&maillog, Some(o.uid), Some(o.gid));
    }
    // And to accounting_log_file.
    crate::accounting::prepare(cfg, owner.map(|o| (o.uid, o.gid)))?;
    let data = std::path::PathBuf::from(cfg.get("data_directory"));
    std::fs::create_dir_all(&data)
        .map_err(|e| format!("data directory {}: {e}", data.display()))?;
    if let Some(o) = owner {
        let _ = std::os::unix::fs::chown(&data, Some(o.uid), Some(o.gid));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn a_file_made_under_another_fs_identity_is_theirs_from_the_start() {
        if !is_root() {
            return; // needs root, as the agents that use it
        }
        let dir = std::env::temp_dir().join(format!("postern-fsid-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir(&dir).unwrap();
        std::os::unix::fs::chown(&dir, Some(65534), Some(65534)).unwrap();
        // Another thread, started before (a thread starts with its
        // creator's identity), keeps root's meanwhile.
        let (go, wait) = std::sync::mpsc::channel::<()>();
        let other = std::thread::spawn({
            let d = dir.clone();
            move || {
                wait.recv().unwrap();
                std::fs::write(d.join("roots"), b"x").unwrap()
            }
        });
        {
            let _as = FsIdentity::assume(65534, 65534);
            std::fs::write(dir.join("theirs"), b"x").unwrap();
            go.send(()).unwrap();
            other.join().unwrap();
        }
        let m = std::fs::metadata(dir.join("theirs")).unwrap();
        assert_eq!((m.uid(), m.gid()), (65534, 65534));
        let m = std::fs::metadata(dir.join("roots")).unwrap();
        assert_eq!((m.uid(), m.gid()), (0, 0));
        // The guard gone, this thread is root again.
        std::fs::write(dir.join("mine"), b"x").unwrap();
        assert_eq!(std::fs::metadata(dir.join("mine")).unwrap().uid(), 0);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
