//! What master does before it supervises: arguments, configuration,
//! accounts, the queue tree, the lock, and detaching from the terminal.

use postern_common::fatal;
use postern_common::privs;
use postern_common::queue::QueueTree;
use postern_common::{info, warning};
use postern_conf::Config;
use std::io::{Read, Seek, Write};
use std::path::PathBuf;

pub struct Args {
    pub config_dir: Option<PathBuf>,
    pub foreground: bool,
}

/// Closes every descriptor above stderr that whoever started master left
/// open, so that no daemon inherits them.
pub fn close_inherited_descriptors() {
    // SAFETY: close_range on descriptors nothing in this process uses yet.
    unsafe {
        if libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, 0u32) != 0 {
            for fd in 3..1024 {
                libc::close(fd);
            }
        }
    }
}

pub fn parse_args() -> Args {
    let mut a = Args {
        config_dir: None,
        foreground: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(x) = it.next() {
        match x.as_str() {
            "-c" => a.config_dir = it.next().map(PathBuf::from),
            "-d" => a.foreground = true,
            "-v" | "-s" => {}
            other => {
                eprintln!(
                    "master: fatal: usage: master [-c config_dir] [-d] (unknown option {other})"
                );
                std::process::exit(1);
            }
        }
    }
    a
}

pub fn load_config(args: &Args) -> Config {
    let dir = postern_conf::config_dir(args.config_dir.as_deref());
    let cfg = match Config::load(&dir) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("master: fatal: {e}");
            std::process::exit(1);
        }
    };
    postern_common::log::init(
        "master",
        &cfg.get("syslog_name"),
        &cfg.get("maillog_file"),
        true,
        false,
    );
    for (name, line) in cfg.unknown_parameters() {
        warning!(
            "{}/main.cf, line {line}: unused parameter: {name}",
            dir.display()
        );
    }
    cfg
}

/// Says once, at start, what becomes of each master.cf service that is
/// not run as written (Postfix services whose work Postern does inside
/// its own daemons: `Service::note`).
pub fn note_services(cfg: &Config) {
    for note in cfg
        .master_services()
        .unwrap_or_default()
        .iter()
        .filter_map(|s| s.note())
    {
        info!("{}/{note}", cfg.dir().display());
    }
}

/// mail_owner's ids when running as root (see `privs::queue_owner`).
pub fn owner(cfg: &Config) -> Option<privs::QueueOwner> {
    privs::queue_owner(cfg).unwrap_or_else(|e| fatal!("{e}"))
}

/// Creates whatever is missing of the queue tree and data directory.
pub fn prepare_tree(cfg: &Config, owner: Option<privs::QueueOwner>) {
    if let Err(e) = privs::prepare_tree(cfg, owner) {
        fatal!("{e}");
    }
}

fn pid_path(cfg: &Config) -> PathBuf {
    QueueTree::new(cfg.get("queue_directory"))
        .root()
        .join("pid")
        .join("master.pid")
}

/// Takes the one-master-per-queue lock; the file also holds master's pid.
pub fn lock(cfg: &Config) -> nix::fcntl::Flock<std::fs::File> {
    let p = pid_path(cfg);
    let f = match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&p)
    {
        Ok(f) => f,
        Err(e) => fatal!("open lock file {}: {e}", p.display()),
    };
    match nix::fcntl::Flock::lock(f, nix::fcntl::FlockArg::LockExclusiveNonblock) {
        Ok(locked) => locked,
        Err((f, _)) => {
            let mut s = String::new();
            let _ = (&f).read_to_string(&mut s);
            fatal!(
                "the Postern mail system is already running (pid {})",
                s.trim()
            );
        }
    }
}

fn write_pid(mut f: &std::fs::File) {
    let _ = f.set_len(0);
    let _ = f.rewind();
    let _ = writeln!(f, "{:>10}", std::process::id());
    let _ = f.sync_all();
}

/// In the foreground, writes the pid and returns. Otherwise forks: the
/// parent exits 0 once the child has written its pid (so `postern start`
/// returns when master is ready), the child detaches from the terminal.
pub fn detach_unless(foreground: bool, lock: &std::fs::File) {
    if foreground {
        write_pid(lock);
        return;
    }
    let (r, w) = match nix::unistd::pipe() {
        Ok(p) => p,
        Err(e) => fatal!("pipe: {e}"),
    };
    // SAFETY: master is single-threaded here.
    match unsafe { nix::unistd::fork() } {
        Err(e) => fatal!("fork: {e}"),
        Ok(nix::unistd::ForkResult::Parent { .. }) => {
            drop(w);
            let mut b = [0u8; 1];
            let ok = std::fs::File::from(r)
                .read(&mut b)
                .map(|n| n == 1)
                .unwrap_or(false);
            // SAFETY: leave without running destructors that would close
            // or unlink what the child now owns.
            unsafe { libc::_exit(if ok { 0 } else { 1 }) };
        }
        Ok(nix::unistd::ForkResult::Child) => {
            drop(r);
            let _ = nix::unistd::setsid();
            write_pid(lock);
            if let Ok(null) = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open("/dev/null")
            {
                let _ = nix::unistd::dup2_stdin(&null);
                let _ = nix::unistd::dup2_stdout(&null);
                let _ = nix::unistd::dup2_stderr(&null);
            }
            let _ = std::fs::File::from(w).write_all(b"1");
        }
    }
}

pub fn remove_pid(cfg: &Config) {
    let _ = std::fs::remove_file(pid_path(cfg));
}
