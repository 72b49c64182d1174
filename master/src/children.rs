//! Starting daemon processes and keeping count of them.
//!
//! A child gets its service's listener on fd 3 (further listeners of the
//! same service on fd 5 and up, named in `POSTERN_LISTEN_FDS`), the write
//! end of the service's status pipe on fd 4. When master runs as root and
//! the service is unprivileged, a Postern daemon starts as root with
//! [`postern_common::service::DROP_ENV`]: it reads its keys and tables,
//! which may be readable by root only, then drops itself to `mail_owner`
//! with no capabilities (chrooted when master.cf says so: see
//! [`crate::jail`]) before it reads from the network; any other program
//! gets the uid and gid of `mail_owner` with no capabilities before exec.
//! A daemon still running as root when it first reports on its status
//! pipe is killed ([`still_root`]).
//! Every child gets SIGTERM when master dies (PR_SET_PDEATHSIG), so that a
//! master killed outright leaves no daemon holding its listeners.
//!
//! With `daemon_sched_batch` (the default) a child of a unix or fifo
//! service runs under the kernel's SCHED_BATCH policy, and its threads
//! with it. Postern's daemons hand every message from one to the next
//! (smtpd to cleanup and back, qmgr to smtp and back); under the normal
//! policy each hand-off let the woken daemon preempt the one that woke
//! it, a context switch before the waker had finished what it was doing.
//! Batch tasks do not preempt on wake-up: the woken one runs when a CPU
//! is free or the running task's slice ends. Inet services (smtpd) keep
//! the normal policy: a client waits on each of their answers, and at
//! C=100 a batch smtpd made those waits longer (DATA→250 p50 ~12 ms ->
//! ~17 ms). Nice values and CPU shares are unchanged.

use postern_common::service::{StatusRecord, LISTEN_FD, STATUS_FD};
use std::os::fd::RawFd;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::Command;

/// What a spawned process needs to know.
pub struct SpawnSpec<'a> {
    pub program: &'a Path,
    pub args: Vec<String>,
    pub listen_fds: Vec<RawFd>,
    pub status_fd: RawFd,
    /// (uid, gid) to drop to before exec.
    pub drop_to: Option<(u32, u32)>,
    /// (uid, gid, chroot) the daemon drops to itself once it has read its
    /// files: it starts as root to read keys and tables that only root
    /// may read, and chroots first when asked (see [`crate::jail`]).
    pub drops_itself: Option<(u32, u32, bool)>,
    pub config_dir: &'a Path,
    /// Run under SCHED_BATCH (`daemon_sched_batch`, not for inet services).
    pub sched_batch: bool,
}

/// Starts one daemon process; returns its pid.
pub fn spawn(spec: &SpawnSpec<'_>) -> std::io::Result<u32> {
    let mut cmd = Command::new(spec.program);
    cmd.args(&spec.args);
    cmd.env("MAIL_CONFIG", spec.config_dir);
    let extra: Vec<String> = (0..spec.listen_fds.len())
        .map(|i| {
            if i == 0 {
                LISTEN_FD.to_string()
            } else {
                (STATUS_FD + i as i32).to_string()
            }
        })
        .collect();
    cmd.env("POSTERN_LISTEN_FDS", extra.join(" "));
    match spec.drops_itself {
        Some((uid, gid, chroot)) => cmd.env(
            postern_common::service::DROP_ENV,
            postern_common::service::drop_request_value(uid, gid, chroot),
        ),
        None => cmd.env_remove(postern_common::service::DROP_ENV),
    };
    cmd.stdin(std::process::Stdio::null());
    let listen = spec.listen_fds.clone();
    let status = spec.status_fd;
    let drop = spec.drop_to;
    let sched_batch = spec.sched_batch;
    let master = nix::unistd::getpid().as_raw();
    // SAFETY: between fork and exec we only make system calls (fcntl,
    // dup2, sigprocmask, sched_setscheduler, prctl, getppid, and the ones
    // in privs::drop_to), which are async-signal-safe, and allocate
    // nothing.
    unsafe {
        cmd.pre_exec(move || {
            // Move every descriptor out of the way first, so that putting
            // one on fd 3 cannot clobber another that happens to be there.
            let mut high = [0 as RawFd; 16];
            let n = listen.len().min(15);
            for (i, fd) in listen.iter().take(n).enumerate() {
                high[i] = libc::fcntl(*fd, libc::F_DUPFD_CLOEXEC, 64);
                if high[i] < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            let st = libc::fcntl(status, libc::F_DUPFD_CLOEXEC, 64);
            if st < 0 {
                return Err(std::io::Error::last_os_error());
            }
            // dup2 clears close-on-exec on the new descriptor.
            for (i, fd) in high.iter().take(n).enumerate() {
                let target = if i == 0 {
                    LISTEN_FD
                } else {
                    STATUS_FD + i as i32
                };
                if libc::dup2(*fd, target) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            if libc::dup2(st, STATUS_FD) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            // Each child in its own process group would escape a terminal's
            // ^C; stay in master's group but reset the signal mask.
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            libc::sigprocmask(libc::SIG_SETMASK, &set, std::ptr::null_mut());
            if sched_batch {
                // Allowed to any process (it is no real-time policy); a
                // kernel without it leaves the daemon under the normal
                // policy, which works the same, only with more context
                // switches.
                let normal = libc::sched_param { sched_priority: 0 };
                libc::sched_setscheduler(0, libc::SCHED_BATCH, &normal);
            }
            if let Some((uid, gid)) = drop {
                postern_common::privs::drop_to(uid, gid)?;
            }
            // A daemon must not outlive master: a new master could not
            // bind the listeners it holds. Set after the privilege change,
            // which clears this setting; then check master did not die
            // just before.
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM, 0, 0, 0) != 0
                || libc::getppid() != master
            {
                libc::_exit(1);
            }
            Ok(())
        });
    }
    let child = cmd.spawn()?;
    Ok(child.id())
}

/// Whether process `pid` still has root's user id, or a capability,
/// after it should have dropped them: it has reported on its
/// status pipe, which a daemon does only once it serves. A process that
/// is gone is not root.
pub fn still_root(pid: u32) -> bool {
    let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) else {
        return false;
    };
    status.lines().any(|line| {
        let Some((name, value)) = line.split_once(':') else {
            return false;
        };
        let mut fields = value.split_whitespace();
        match name {
            "Uid" => fields.any(|id| id == "0"),
            "CapEff" | "CapPrm" => fields.any(|c| u64::from_str_radix(c, 16) != Ok(0)),
            _ => false,
        }
    })
}

/// Reads the status records waiting in `fd`.
pub fn read_status(fd: &std::fs::File) -> Vec<StatusRecord> {
    use std::io::Read;
    let mut out = Vec::new();
    let mut buf = [0u8; StatusRecord::LEN * 64];
    let mut f = fd;
    loop {
        match f.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                out.extend(StatusRecord::decode_all(&buf[..n]));
                if n < buf.len() {
                    break;
                }
            }
            Err(_) => break,
        }
    }
    out
}

/// A pipe whose read end master keeps (non-blocking) and whose write end
/// every child of the service inherits as fd 4.
pub fn status_pipe() -> std::io::Result<(std::fs::File, std::os::fd::OwnedFd)> {
    let (r, w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC | nix::fcntl::OFlag::O_NONBLOCK)?;
    // The write end must block in children: a status write never fails
    // with EAGAIN for 8 bytes unless master is gone.
    use nix::fcntl::{fcntl, FcntlArg, OFlag};
    if let Ok(fl) = fcntl(&w, FcntlArg::F_GETFL) {
        let _ = fcntl(
            &w,
            FcntlArg::F_SETFL(OFlag::from_bits_retain(fl) & !OFlag::O_NONBLOCK),
        );
    }
    Ok((std::fs::File::from(r), w))
}
