//! The supervisor loop: start daemons when their listener has work and no
//! process of the service is free, count them through the status pipes,
//! reap and respawn them, send timed wake-ups, reload on SIGHUP, and stop
//! everything on SIGTERM.

use crate::children::{self, SpawnSpec};
use crate::listeners::{self, Listener};
use postern_common::error;
use postern_common::ipc::{self, Wakeup};
use postern_common::service::{Load, StatusRecord};
use postern_common::{info, warning};
use postern_conf::master_cf::{Service, ServiceType};
use postern_conf::Config;
use std::collections::HashMap;
use std::io::Read;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::{Duration, Instant};

struct Child {
    busy: bool,
    /// The child reported busy at least once: it did work. A child that
    /// dies with an error before that throttles its service.
    worked: bool,
    /// Started as root to drop its privileges itself: checked at its
    /// first status report ([`children::still_root`]).
    unverified: bool,
}

struct ServiceState {
    def: Service,
    listener: Listener,
    status_read: std::fs::File,
    status_write: OwnedFd,
    children: HashMap<u32, Child>,
    throttled_until: Option<Instant>,
    next_wakeup: Option<Instant>,
}

impl ServiceState {
    /// Whether to start a process when a client waits. `draining`: the
    /// service's processes from before a reload that are still finishing;
    /// they count towards `maxproc`, so a one-process service (qmgr,
    /// pickup, anvil) never runs twice at once.
    fn needs_process(&self, now: Instant, draining: usize) -> bool {
        let free = self.children.values().any(|c| !c.busy);
        let room =
            self.def.maxproc == 0 || ((self.children.len() + draining) as u32) < self.def.maxproc;
        let throttled = self.throttled_until.is_some_and(|t| t > now);
        !free && room && !throttled
    }
}

/// Everything master owns while it runs.
pub struct Supervisor {
    cfg: Config,
    services: Vec<ServiceState>,
    /// Processes from before a reload, still finishing (pid, and the
    /// service they belonged to: [`service_key`]), until reaped.
    orphans: Vec<(u32, String)>,
    owner: Option<(u32, u32)>,
    signals: Signals,
    /// Shutting down: the children die of our own SIGTERM, which is
    /// neither a warning nor a reason to throttle.
    stopping: bool,
}

/// What [`Supervisor::wait`] found readable.
struct Ready {
    /// The SIGTERM, SIGHUP and SIGCHLD pipes.
    term: bool,
    hup: bool,
    chld: bool,
    /// The readable descriptors of services: (service, is_listener).
    services: Vec<(usize, bool)>,
}

struct Signals {
    term: UnixStream,
    hup: UnixStream,
    chld: UnixStream,
}

/// The read end of a socket pair that each of `sigs` writes a byte into.
fn signal_pipe(sigs: &[i32]) -> std::io::Result<UnixStream> {
    let (r, w) = UnixStream::pair()?;
    r.set_nonblocking(true)?;
    w.set_nonblocking(true)?;
    for sig in sigs {
        signal_hook::low_level::pipe::register(*sig, w.try_clone()?)?;
    }
    Ok(r)
}

fn drain(s: &UnixStream) -> bool {
    let mut buf = [0u8; 64];
    let mut any = false;
    let mut r = s;
    while let Ok(n) = r.read(&mut buf) {
        if n == 0 {
            break;
        }
        any = true;
    }
    any
}

impl Supervisor {
    /// Opens every service's listener. Fails if a listener cannot be made.
    pub fn new(cfg: Config, owner: Option<(u32, u32)>) -> Result<Supervisor, String> {
        let services = open_services(&cfg, owner, &mut Vec::new())?;
        let signals = Signals {
            // SIGINT (a terminal's ^C in start-fg) stops master like
            // SIGTERM: both write into the write end of the same pair.
            term: signal_pipe(&[libc::SIGTERM, libc::SIGINT]).map_err(|e| e.to_string())?,
            hup: signal_pipe(&[libc::SIGHUP]).map_err(|e| e.to_string())?,
            chld: signal_pipe(&[libc::SIGCHLD]).map_err(|e| e.to_string())?,
        };
        Ok(Supervisor {
            cfg,
            services,
            orphans: Vec::new(),
            owner,
            signals,
            stopping: false,
        })
    }

    /// Waits until a signal comes, a child reports on a status pipe, or a
    /// client waits on the listener of a service that needs a process;
    /// at most until the next timer. None when a signal interrupted the
    /// wait.
    fn wait(&self, now: Instant) -> Option<Ready> {
        use nix::poll::{PollFd, PollFlags, PollTimeout};
        use std::os::fd::AsFd;
        const IN: PollFlags = PollFlags::POLLIN;
        let mut fds: Vec<PollFd<'_>> = vec![
            PollFd::new(self.signals.term.as_fd(), IN),
            PollFd::new(self.signals.hup.as_fd(), IN),
            PollFd::new(self.signals.chld.as_fd(), IN),
        ];
        let mut what: Vec<(usize, bool)> = Vec::new(); // (service, is_listener)
        for (i, s) in self.services.iter().enumerate() {
            fds.push(PollFd::new(s.status_read.as_fd(), IN));
            what.push((i, false));
            let key = service_key(&s.def);
            let draining = self.orphans.iter().filter(|(_, k)| *k == key).count();
            if s.needs_process(now, draining) {
                for l in &s.listener.fds {
                    fds.push(PollFd::new(l.as_fd(), IN));
                    what.push((i, true));
                }
            }
        }
        let mut timeout = Duration::from_secs(60);
        for s in &self.services {
            for t in [s.next_wakeup, s.throttled_until].into_iter().flatten() {
                timeout = timeout.min(t.saturating_duration_since(now));
            }
        }
        // A millisecond more: a timer is due when the wait ends, not just before.
        let ms = timeout.as_millis().min(60_000) as u16 + 1;
        nix::poll::poll(&mut fds, PollTimeout::from(ms)).ok()?;
        // Any event, as a raw `revents != 0` (None: bits nix does not name).
        let woke = |f: &PollFd<'_>| f.revents() != Some(PollFlags::empty());
        Some(Ready {
            term: woke(&fds[0]),
            hup: woke(&fds[1]),
            chld: woke(&fds[2]),
            services: (fds[3..].iter().zip(what))
                .filter(|(f, _)| woke(f))
                .map(|(_, w)| w)
                .collect(),
        })
    }

    /// Runs until SIGTERM; then stops every child and returns.
    pub fn run(&mut self) {
        // Wake every trigger service once at start: qmgr takes back what a
        // crash left in active/, pickup reads maildrop.
        let now = Instant::now();
        for s in &mut self.services {
            if s.def.wakeup > 0 && !s.def.wakeup_after_use {
                s.next_wakeup = Some(now);
            }
        }
        loop {
            let now = Instant::now();
            self.send_wakeups(now);
            let Some(ready) = self.wait(now) else {
                continue; // EINTR
            };
            if ready.chld && drain(&self.signals.chld) {
                self.reap();
            }
            if ready.term && drain(&self.signals.term) {
                info!("terminating on signal");
                self.stop_all();
                return;
            }
            if ready.hup && drain(&self.signals.hup) {
                self.reload();
                continue;
            }
            let mut spawned = vec![false; self.services.len()];
            for (svc, is_listener) in ready.services {
                if is_listener {
                    if !spawned[svc] {
                        spawned[svc] = true;
                        self.spawn(svc);
                    }
                } else {
                    let s = &mut self.services[svc];
                    for StatusRecord { pid, load } in children::read_status(&s.status_read) {
                        if let Some(c) = s.children.get_mut(&pid) {
                            if std::mem::take(&mut c.unverified) && children::still_root(pid) {
                                error!(
                                    "{}: pid {pid} serves without having dropped root \
                                     privileges; killing it",
                                    s.def.command
                                );
                                signal(pid, libc::SIGKILL);
                            }
                            c.busy = load == Load::Busy;
                            c.worked |= load != Load::Available;
                        }
                    }
                }
            }
        }
    }

    fn spawn(&mut self, idx: usize) {
        let dir = self.cfg.dir().to_path_buf();
        let daemon_dir = PathBuf::from(self.cfg.get("daemon_directory"));
        // A bad value was reported by `postern check` at start.
        let sched_batch = self.cfg.get_bool("daemon_sched_batch").unwrap_or(true);
        let s = &mut self.services[idx];
        // A service that network clients wait on (smtpd) answers them as
        // soon as they write: it keeps the normal policy.
        let sched_batch =
            sched_batch && !matches!(s.def.kind, ServiceType::Inet | ServiceType::Pass);
        let program = if s.def.command.starts_with('/') {
            PathBuf::from(&s.def.command)
        } else {
            daemon_dir.join(&s.def.command)
        };
        let confined = crate::jail::confined(&s.def, self.owner);
        let drops_itself = crate::jail::drops_itself(&s.def);
        let mut args = vec![
            "-c".to_string(),
            dir.display().to_string(),
            "-n".into(),
            s.def.name.clone(),
            "-t".into(),
            s.def.kind.word().into(),
        ];
        for (n, v) in &s.def.overrides {
            args.push("-o".into());
            args.push(format!("{n}={v}"));
        }
        args.extend(s.def.args.iter().cloned());
        let spec = SpawnSpec {
            program: &program,
            args,
            listen_fds: s.listener.fds.iter().map(|f| f.as_raw_fd()).collect(),
            status_fd: s.status_write.as_raw_fd(),
            drop_to: if s.def.unpriv && !drops_itself {
                self.owner
            } else {
                None
            },
            drops_itself: match self.owner {
                Some((uid, gid)) if s.def.unpriv && drops_itself => Some((uid, gid, confined)),
                _ => None,
            },
            config_dir: &dir,
            sched_batch,
        };
        match children::spawn(&spec) {
            Ok(pid) => {
                s.children.insert(
                    pid,
                    Child {
                        busy: false,
                        worked: false,
                        unverified: spec.drop_to.is_some() || spec.drops_itself.is_some(),
                    },
                );
                if s.def.wakeup > 0 && s.next_wakeup.is_none() {
                    s.next_wakeup = Some(Instant::now() + Duration::from_secs(s.def.wakeup));
                }
            }
            Err(e) => {
                warning!(
                    "spawn {}: {e}; throttling service {}",
                    program.display(),
                    s.def.name
                );
                let t = self.cfg.get_time("service_throttle_time").unwrap_or(60);
                s.throttled_until = Some(Instant::now() + Duration::from_secs(t));
            }
        }
    }

    fn reap(&mut self) {
        loop {
            let mut status: libc::c_int = 0;
            // Not nix's waitpid: it fails on a child killed by a signal
            // nix does not name (a real-time one), and that child would
            // stay unreaped.
            // SAFETY: waitpid with a valid pointer.
            let pid = unsafe { libc::waitpid(-1, &mut status, libc::WNOHANG) };
            if pid <= 0 {
                break;
            }
            let pid = pid as u32;
            let now = Instant::now();
            if let Some(i) = self.orphans.iter().position(|(p, _)| *p == pid) {
                let (_, key) = self.orphans.swap_remove(i);
                // A trigger service's process from before a reload is
                // gone: wake its successor now rather than at the next
                // timer, so that qmgr takes back what the old one left in
                // active/ at once.
                if let Some(s) = self
                    .services
                    .iter_mut()
                    .find(|s| service_key(&s.def) == key)
                {
                    wake_soon(s, now);
                }
            }
            let throttle = self.cfg.get_time("service_throttle_time").unwrap_or(60);
            for s in &mut self.services {
                let Some(child) = s.children.remove(&pid) else {
                    continue;
                };
                let normal = libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0;
                let told_to_stop = self.stopping
                    && libc::WIFSIGNALED(status)
                    && libc::WTERMSIG(status) == libc::SIGTERM;
                if normal && !self.stopping {
                    // A trigger service's process left by itself (qmgr
                    // whose table changed): its successor starts now.
                    wake_soon(s, now);
                }
                if !normal && !told_to_stop {
                    let how = if libc::WIFSIGNALED(status) {
                        format!("killed by signal {}", libc::WTERMSIG(status))
                    } else {
                        format!("exit status {}", libc::WEXITSTATUS(status))
                    };
                    warning!("process {} pid {pid} {how}", s.def.command);
                    if !child.worked {
                        warning!(
                            "{}: bad command startup -- throttling for {throttle}s",
                            s.def.command
                        );
                        s.throttled_until = Some(Instant::now() + Duration::from_secs(throttle));
                    }
                }
                break;
            }
        }
    }

    fn send_wakeups(&mut self, now: Instant) {
        let tree = postern_common::queue::QueueTree::new(self.cfg.get("queue_directory"));
        for s in &mut self.services {
            let Some(t) = s.next_wakeup else { continue };
            if t > now {
                continue;
            }
            s.next_wakeup = Some(now + Duration::from_secs(s.def.wakeup.max(1)));
            if s.def.kind == ServiceType::Inet {
                continue;
            }
            // The listener is ours, so connecting never blocks; it makes
            // the listener readable, which starts the daemon if needed.
            let path = tree.socket(s.def.private, &s.def.name);
            if let Err(e) = ipc::wake(&path, &[Wakeup::Wake]) {
                warning!("wake up {}: {e}", path.display());
            }
        }
    }

    fn signal_children(&self, sig: i32) {
        for s in &self.services {
            for pid in s.children.keys() {
                signal(*pid, sig);
            }
        }
    }

    fn stop_all(&mut self) {
        self.stopping = true;
        self.signal_children(libc::SIGTERM);
        for (p, _) in &self.orphans {
            // Still draining since a reload: stop means now for them too.
            signal(*p, libc::SIGTERM);
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.services.iter().any(|s| !s.children.is_empty()) || !self.orphans.is_empty() {
            if Instant::now() > deadline {
                self.signal_children(libc::SIGKILL);
                for (p, _) in &self.orphans {
                    signal(*p, libc::SIGKILL);
                }
            }
            std::thread::sleep(Duration::from_millis(20));
            self.reap();
            if Instant::now() > deadline + Duration::from_secs(5) {
                break;
            }
        }
        for s in &self.services {
            if let Some(p) = &s.listener.path {
                let _ = std::fs::remove_file(p);
            }
        }
    }

    /// SIGHUP: read the configuration again. Services that stay keep their
    /// listeners, so no client is refused during a reload; their processes
    /// are told to drain (finish their clients, take no more, exit) and new
    /// ones start with the new configuration.
    fn reload(&mut self) {
        // After `postern logrotate`, our lines go to the new file too.
        postern_common::log::reopen();
        let cfg = match Config::load(self.cfg.dir()) {
            Ok(c) => c,
            Err(e) => {
                warning!("reload: {e}; keeping the old configuration");
                return;
            }
        };
        let mut old = std::mem::take(&mut self.services);
        let services = match open_services(&cfg, self.owner, &mut old) {
            Ok(s) => s,
            Err(e) => {
                // Nothing was touched: the old services go on as they were.
                self.services = old;
                warning!("reload: {e}; keeping the old configuration");
                return;
            }
        };
        self.services = services;
        // A new accounting_log_file (renamed away by logrotate, or newly
        // set), made for mail_owner before the new daemons write to it.
        if let Err(e) = postern_common::accounting::prepare(&cfg, self.owner) {
            warning!("reload: {e}");
        }
        // Every process of the old configuration drains; those of services
        // that stay count towards the new ones' maxproc until they exit.
        for s in self.services.iter_mut().chain(old.iter_mut()) {
            let key = service_key(&s.def);
            for (pid, _) in s.children.drain() {
                signal(pid, postern_common::service::DRAIN_SIGNAL);
                self.orphans.push((pid, key.clone()));
            }
        }
        // Services that are gone: their sockets go too.
        for s in &old {
            if let Some(path) = &s.listener.path {
                let _ = std::fs::remove_file(path);
            }
        }
        self.cfg = cfg;
        info!(
            "reload -- version {}, configuration {}",
            env!("CARGO_PKG_VERSION"),
            self.cfg.dir().display()
        );
    }
}

/// Sends a trigger service (one with a wake-up time in master.cf, not
/// marked `?`) its next wake-up now: the wake-up starts a process if none
/// runs.
/// Sends `sig` to `pid`, a child master started. A child that is gone
/// already needs no signal.
fn signal(pid: u32, sig: libc::c_int) {
    if let Ok(sig) = nix::sys::signal::Signal::try_from(sig) {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), sig);
    }
}

fn wake_soon(s: &mut ServiceState, now: Instant) {
    if s.def.wakeup > 0 && !s.def.wakeup_after_use {
        s.next_wakeup = Some(now);
    }
}

/// What identifies a service across a reload: its name and type.
fn service_key(def: &Service) -> String {
    format!("{}/{:?}", def.name, def.kind)
}

/// Builds the service table from master.cf, taking over from `previous`
/// the services with the same name and type (listener, status pipe and
/// children: the caller decides what becomes of those). Fails without
/// touching `previous` when master.cf cannot be read or a new listener
/// cannot be opened; on success `previous` holds the services that are
/// gone.
fn open_services(
    cfg: &Config,
    owner: Option<(u32, u32)>,
    previous: &mut Vec<ServiceState>,
) -> Result<Vec<ServiceState>, String> {
    let defs = cfg.master_services().map_err(|e| e.to_string())?;
    let defs = postern_conf::master_cf::runnable(defs);
    let same = |p: &ServiceState, def: &Service| p.def.name == def.name && p.def.kind == def.kind;
    // First everything that can fail.
    let mut fresh = Vec::new();
    for def in &defs {
        if previous.iter().any(|p| same(p, def)) {
            fresh.push(None);
            continue;
        }
        let listener =
            listeners::open(cfg, def, owner).map_err(|e| format!("service {}: {e}", def.name))?;
        let pipe = children::status_pipe().map_err(|e| e.to_string())?;
        fresh.push(Some((listener, pipe)));
    }
    crate::jail::prepare(cfg, &defs, owner);
    let mut out = Vec::new();
    for (def, opened) in defs.into_iter().zip(fresh) {
        let state = match opened {
            None => {
                let i = previous
                    .iter()
                    .position(|p| same(p, &def))
                    .expect("found above");
                let mut p = previous.swap_remove(i);
                p.def = def;
                p.throttled_until = None;
                p
            }
            Some((listener, (status_read, status_write))) => ServiceState {
                def,
                listener,
                status_read,
                status_write,
                children: HashMap::new(),
                throttled_until: None,
                next_wakeup: None,
            },
        };
        out.push(state);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(line: &str) -> ServiceState {
        let def = postern_conf::master_cf::parse(line, std::path::Path::new("master.cf"), 100)
            .unwrap()
            .remove(0);
        let (status_read, status_write) = children::status_pipe().unwrap();
        ServiceState {
            def,
            listener: Listener {
                fds: Vec::new(),
                path: None,
            },
            status_read,
            status_write,
            children: HashMap::new(),
            throttled_until: None,
            next_wakeup: None,
        }
    }

    #[test]
    fn a_draining_process_counts_towards_maxproc() {
        let now = Instant::now();
        // One pickup at a time, even across a reload.
        let pickup = state("pickup unix n - n 60 1 pickup\n");
        assert!(pickup.needs_process(now, 0));
        assert!(!pickup.needs_process(now, 1));
        // No limit: draining processes do not hold new ones back.
        let cleanup = state("cleanup unix n - n - 0 cleanup\n");
        assert!(cleanup.needs_process(now, 5));
        // A limit of 3 with 2 draining leaves room for one.
        let smtp = state("smtp unix - - n - 3 smtp\n");
        assert!(smtp.needs_process(now, 2));
        assert!(!smtp.needs_process(now, 3));
    }
}
