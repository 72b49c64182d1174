//! The skeleton every daemon stands on: arguments from master, the
//! configuration, logging, the inherited listener, and the status pipe.
//!
//! master starts a daemon as `NAME -c CONFIG_DIR -n SERVICE -t TYPE
//! [-o name=value]... [-v] [args]`, with the service's listening socket on
//! fd [`LISTEN_FD`] and the write end of the service's status pipe on fd
//! [`STATUS_FD`]. The daemon reports on the pipe whether it can take more
//! work ([`Status`]); master starts another process for the service when
//! every process it has is busy, up to the service's `maxproc`.
//!
//! On `postern reload` master sends every process [`DRAIN_SIGNAL`]: the
//! serving loops here (and smtpd's own) then take no new connection,
//! finish the ones in hand and exit, while processes started with the new
//! configuration take over the same listener. SIGTERM (`postern stop`)
//! still means exit now.
//!
//! Every unprivileged Postern daemon is started as root with [`DROP_ENV`]
//! set: it reads its configuration, tables and keys first (which may then
//! be readable by root only, as a TLS key or `sasl_passwd` usually is),
//! then [`drop_privileges`] drops it to `mail_owner` with no capabilities,
//! chrooting it into the queue directory first when master.cf says so,
//! before it takes its first connection and before it starts a thread
//! (Postfix's order). Chrooted, the queue is at `/` ([`queue_directory`]).
//! A daemon that changed tables it read as root no longer sees the new
//! files; the serving loops here then let it finish what it has in hand
//! and exit, and master starts a fresh one ([`crate::maps::changed_table`]).

use crate::{fatal, info, warning};
use postern_conf::Config;
use std::io::{self, Read, Write};
use std::os::fd::{FromRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// The listening socket master hands every daemon.
pub const LISTEN_FD: RawFd = 3;
/// The write end of the status pipe back to master.
pub const STATUS_FD: RawFd = 4;

/// Set by master for an unprivileged daemon it starts as root: `UID:GID`
/// to drop to once the daemon has read its files, `UID:GID:chroot` to
/// chroot into the queue directory first ([`drop_request_value`]).
pub const DROP_ENV: &str = "POSTERN_DROP";

/// What master asked of this process through [`DROP_ENV`], read once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum DropRequest {
    None,
    Drop { uid: u32, gid: u32, chroot: bool },
}

static DROP: std::sync::OnceLock<DropRequest> = std::sync::OnceLock::new();
static DROPPED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// The value of [`DROP_ENV`] for a daemon that is to drop to `uid`/`gid`,
/// chrooted into the queue directory or not.
pub fn drop_request_value(uid: u32, gid: u32, chroot: bool) -> String {
    if chroot {
        format!("{uid}:{gid}:chroot")
    } else {
        format!("{uid}:{gid}")
    }
}

fn parse_drop_request(v: &str) -> Option<DropRequest> {
    let mut parts = v.split(':');
    let uid = parts.next()?.parse().ok()?;
    let gid = parts.next()?.parse().ok()?;
    let chroot = match parts.next() {
        None => false,
        Some("chroot") => true,
        Some(_) => return None,
    };
    parts
        .next()
        .is_none()
        .then_some(DropRequest::Drop { uid, gid, chroot })
}

fn drop_request() -> DropRequest {
    *DROP.get_or_init(|| match std::env::var(DROP_ENV) {
        Ok(v) => parse_drop_request(&v)
            .unwrap_or_else(|| fatal!("{DROP_ENV}={v}: expected UID:GID or UID:GID:chroot")),
        Err(_) => DropRequest::None,
    })
}

/// Whether this process runs (or is about to run) chrooted into the
/// queue directory. Daemons prepare what they need from outside the
/// queue before [`drop_privileges`] when this is true.
pub fn jailed() -> bool {
    matches!(drop_request(), DropRequest::Drop { chroot: true, .. })
}

/// The queue directory as this process sees it while serving: `/` in a
/// chroot jail (the jail is the queue directory), `queue_directory`
/// otherwise.
pub fn queue_directory(cfg: &Config) -> PathBuf {
    if jailed() {
        PathBuf::from("/")
    } else {
        PathBuf::from(cfg.get("queue_directory"))
    }
}

/// Drops to the `mail_owner` ids master asked for (chrooting into
/// `queue_directory` first when asked), once; does nothing when master
/// asked nothing (a privileged daemon, a master that is not root, a daemon
/// started by hand). Called once the daemon has read its configuration,
/// tables and keys, and before its first connection, so that no outside
/// input is read as root; must be called while the process has one thread
/// (the capability settings it makes are per thread). A failure is fatal:
/// a daemon that cannot give up root must not serve.
pub fn drop_privileges(cfg: &Config) {
    let DropRequest::Drop { uid, gid, chroot } = drop_request() else {
        return;
    };
    if DROPPED.swap(true, std::sync::atomic::Ordering::SeqCst) {
        return;
    }
    let threads = match std::fs::read_dir("/proc/self/task") {
        Ok(d) => d.count(),
        Err(e) => fatal!("drop privileges: cannot count threads in /proc/self/task: {e}"),
    };
    if threads > 1 {
        fatal!("drop privileges: {threads} threads already running; not serving");
    }
    if chroot {
        enter_chroot(cfg);
    }
    let master = nix::unistd::getppid();
    if let Err(e) = crate::privs::drop_to(uid, gid) {
        fatal!("drop privileges to {uid}:{gid}: {e}");
    }
    // The credential change cleared the death signal master's spawn set;
    // set it again, and leave if master died meanwhile.
    if nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGTERM).is_err()
        || nix::unistd::getppid() != master
    {
        std::process::exit(1);
    }
}

/// Chroots into `queue_directory` (still as root).
fn enter_chroot(cfg: &Config) {
    let dir = cfg.get("queue_directory");
    // Read before the chroot, from the real /etc/localtime: the time zone
    // of log lines and Date: headers.
    extern "C" {
        fn tzset();
    }
    // SAFETY: tzset has no preconditions; one thread.
    unsafe { tzset() };
    if let Err(e) = std::env::set_current_dir(&dir) {
        fatal!("chdir {dir}: {e}");
    }
    if let Err(e) = nix::unistd::chroot(".") {
        fatal!("chroot {dir}: {e}");
    }
    if let Err(e) = std::env::set_current_dir("/") {
        fatal!("chdir / in {dir}: {e}");
    }
}

/// Says why a process takes no more work: one of its tables changed
/// ([`crate::table_watch`]), and it may not be able to read it again.
/// Set when a [`serve_threaded`] process takes no more connections
/// (worn out, drained, a table changed): a handler that keeps a client's
/// connection for many requests (proxymap) closes it after the request in
/// hand, and the client connects to a fresh process.
static LEAVING: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Whether this process is leaving ([`LEAVING`]).
pub fn leaving() -> bool {
    LEAVING.load(std::sync::atomic::Ordering::SeqCst)
}

/// A handler found a reason to leave (a changed table): the process takes
/// no more connections and exits when those in hand are done.
pub fn leave() {
    LEAVING.store(true, std::sync::atomic::Ordering::SeqCst);
}

pub fn restart_for_table(table: &Path) {
    info!("table {} has changed -- restarting", table.display());
}

/// Refuses to go on when master asked for a drop that has not happened:
/// a daemon about to take its listener must not do it as root. Guards
/// against a serving loop that forgot [`drop_privileges`].
fn must_have_dropped(what: &str) {
    if drop_request() != DropRequest::None && !DROPPED.load(std::sync::atomic::Ordering::SeqCst) {
        fatal!("{what} before dropping privileges (internal error)");
    }
}

/// The signal that asks a process to finish its work in hand and exit.
/// Its default action terminates, so a process that does not catch it
/// behaves as under SIGTERM.
pub const DRAIN_SIGNAL: libc::c_int = libc::SIGHUP;

/// A socket that becomes readable once [`DRAIN_SIGNAL`] has come (the
/// signal handler writes a byte to it). Non-blocking.
pub fn drain_notifier() -> io::Result<UnixStream> {
    let (r, w) = UnixStream::pair()?;
    r.set_nonblocking(true)?;
    w.set_nonblocking(true)?;
    signal_hook::low_level::pipe::register(DRAIN_SIGNAL, w)?;
    Ok(r)
}

/// Whether `notifier` (from [`drain_notifier`]) says to drain. Once true,
/// the caller remembers it: the byte is consumed.
/// `notifier` is `&UnixStream`, std's or mio's.
pub fn drain_requested(mut notifier: impl io::Read) -> bool {
    let mut b = [0u8; 16];
    matches!(notifier.read(&mut b), Ok(n) if n > 0)
}

/// The notifier, or a fatal error: a daemon that cannot be drained would
/// drop its clients at every reload.
pub fn drain_notifier_or_die() -> UnixStream {
    drain_notifier().unwrap_or_else(|e| fatal!("drain signal handler: {e}"))
}

/// Waits until `fd` or the drain notifier is readable, or `timeout`
/// passes. Returns (fd readable, drain asked).
fn wait_readable_or_drain(
    fd: std::os::fd::BorrowedFd<'_>,
    drain: &UnixStream,
    timeout: Option<Duration>,
) -> (bool, bool) {
    use nix::poll::{PollFd, PollFlags};
    use std::os::fd::AsFd;
    let mut fds = [
        PollFd::new(fd, PollFlags::POLLIN),
        PollFd::new(drain.as_fd(), PollFlags::POLLIN),
    ];
    match poll_events(&mut fds, timeout) {
        Some([readable, drain_signal]) => (readable, drain_signal && drain_requested(drain)),
        None => (false, false),
    }
}

/// Polls `fds` for at most `timeout` (None: no limit). Which of them had
/// an event (any `revents`, POLLHUP and POLLERR too); None when none did
/// or a signal interrupted the wait.
fn poll_events<const N: usize>(
    fds: &mut [nix::poll::PollFd<'_>; N],
    timeout: Option<Duration>,
) -> Option<[bool; N]> {
    use nix::poll::{PollFlags, PollTimeout};
    let timeout = match timeout {
        Some(t) => PollTimeout::try_from(t).unwrap_or(PollTimeout::MAX),
        None => PollTimeout::NONE,
    };
    match nix::poll::poll(fds, timeout) {
        Ok(n) if n > 0 => {}
        _ => return None,
    }
    // None from revents(): bits nix does not name, still an event.
    Some(
        fds.each_ref()
            .map(|fd| fd.revents() != Some(PollFlags::empty())),
    )
}

/// What a daemon was started with.
#[derive(Debug, Clone, Default)]
pub struct Args {
    pub config_dir: Option<PathBuf>,
    /// The master.cf service name (first column), e.g. "smtp" or "relay".
    pub service: String,
    /// "inet", "unix", "fifo".
    pub kind: String,
    pub overrides: Vec<(String, String)>,
    pub verbose: bool,
    /// Arguments after the options.
    pub rest: Vec<String>,
}

/// Parses a daemon's command line.
pub fn parse_args(program: &str, argv: impl IntoIterator<Item = String>) -> Result<Args, String> {
    let mut a = Args {
        service: program.to_string(),
        ..Default::default()
    };
    let mut it = argv.into_iter();
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "-c" => a.config_dir = Some(it.next().ok_or("-c needs a directory")?.into()),
            "-n" => a.service = it.next().ok_or("-n needs a service name")?,
            "-t" => a.kind = it.next().ok_or("-t needs a service type")?,
            "-o" => {
                let v = it.next().ok_or("-o needs name=value")?;
                let (n, val) = v.split_once('=').ok_or("-o needs name=value")?;
                a.overrides
                    .push((n.trim().to_string(), val.trim().to_string()));
            }
            "-v" => a.verbose = true,
            "-S" | "-s" | "-u" | "-D" | "-d" => {} // Postfix options we accept and ignore
            _ => {
                a.rest.push(arg);
                a.rest.extend(it.by_ref());
            }
        }
    }
    Ok(a)
}

/// Starts a daemon: parses arguments, reads the configuration with
/// master.cf's overrides applied, and sets up logging. Exits with a fatal
/// log line when the configuration cannot be used.
pub fn start(program: &str) -> (Config, Args) {
    keep_heap();
    let args = match parse_args(program, std::env::args().skip(1)) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("{program}: fatal: {e}");
            std::process::exit(1);
        }
    };
    let dir = postern_conf::config_dir(args.config_dir.as_deref());
    let mut cfg = match Config::load(&dir) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{program}: fatal: {e}");
            std::process::exit(1);
        }
    };
    // `$service_name` (master.cf's `-o syslog_name=postfix/$service_name`)
    // is the service's name; `-o` overrides are applied after it, as
    // Postfix's daemons apply them.
    cfg.set_overrides([("service_name".to_string(), args.service.clone())]);
    cfg.set_overrides(args.overrides.clone());
    crate::dict::proxy::set_queue_directory(cfg.get("queue_directory"));
    crate::log::init(
        program,
        &cfg.get("syslog_name"),
        &cfg.get("maillog_file"),
        false,
        args.verbose,
    );
    // As root, before the drop: the classifier table may be root's only.
    crate::bounce_class::init(&cfg);
    crate::accounting::init(&cfg);
    (cfg, args)
}

/// Tells the C allocator to keep up to 1 MiB of freed heap instead of
/// giving it back at every free: a daemon allocates and frees the same
/// buffers for every request, and each shrink of the heap (brk) costs a
/// system call and a TLB flush on every CPU (perf put 6% of local's time
/// there). Growth takes 256 KiB at a time for the same reason.
fn keep_heap() {
    // SAFETY: mallopt only sets allocator parameters; called before any
    // thread starts.
    unsafe {
        libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 20);
        libc::mallopt(libc::M_TOP_PAD, 256 << 10);
    }
}

/// What a status record says (the second half of its 8 bytes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Load {
    /// Can take more work.
    Available = 0,
    /// Every slot is taken: master should start another process.
    Busy = 1,
    /// Has taken work and can take more: a process that serves several
    /// clients at once says this at its first one, so that master knows
    /// it started well (a process that dies before it ever took work
    /// throttles its service: "bad command startup").
    Working = 2,
}

impl Load {
    pub fn from_wire(v: u32) -> Load {
        match v {
            0 => Load::Available,
            2 => Load::Working,
            _ => Load::Busy,
        }
    }
}

/// One record on a service's status pipe: which process says what.
/// Written by [`Status`] in every daemon, read by master. On the wire, 8
/// bytes: the pid, then the [`Load`], each a little-endian u32. 8 bytes <
/// PIPE_BUF, so a record is written atomically even though every process
/// of the service shares the pipe.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StatusRecord {
    pub pid: u32,
    pub load: Load,
}

impl StatusRecord {
    /// The size of a record on the wire.
    pub const LEN: usize = 8;

    pub fn encode(&self) -> [u8; Self::LEN] {
        let mut m = [0u8; Self::LEN];
        m[..4].copy_from_slice(&self.pid.to_le_bytes());
        m[4..].copy_from_slice(&(self.load as u32).to_le_bytes());
        m
    }

    pub fn decode(m: &[u8; Self::LEN]) -> StatusRecord {
        let [p0, p1, p2, p3, l0, l1, l2, l3] = *m;
        StatusRecord {
            pid: u32::from_le_bytes([p0, p1, p2, p3]),
            load: Load::from_wire(u32::from_le_bytes([l0, l1, l2, l3])),
        }
    }

    /// Every whole record in `bytes` (a trailing partial one is ignored).
    pub fn decode_all(bytes: &[u8]) -> impl Iterator<Item = StatusRecord> + '_ {
        bytes
            .chunks_exact(Self::LEN)
            .filter_map(|m| m.try_into().ok().map(StatusRecord::decode))
    }
}

/// Reports this process's state to master. Silent when there is no
/// status pipe (a daemon started by hand).
pub struct Status {
    fd: Option<std::fs::File>,
    /// [`Load::Working`] was sent (or Busy, which implies it).
    worked: bool,
}

impl Status {
    pub fn new() -> Status {
        must_have_dropped("status reported");
        // Only a pipe on fd 4 is master's status pipe: a daemon started by
        // hand may have anything there (its log file, say).
        // SAFETY: fstat into a zeroed stat buffer.
        let open = unsafe {
            let mut st: libc::stat = std::mem::zeroed();
            libc::fstat(STATUS_FD, &mut st) == 0 && (st.st_mode & libc::S_IFMT) == libc::S_IFIFO
        };
        Status {
            // SAFETY: master gave us this descriptor and nothing else owns it.
            fd: open.then(|| unsafe { std::fs::File::from_raw_fd(STATUS_FD) }),
            worked: false,
        }
    }

    fn send(&mut self, load: Load) {
        if let Some(f) = &mut self.fd {
            let record = StatusRecord {
                pid: std::process::id(),
                load,
            };
            // One write: atomic among all processes of the service.
            let _ = f.write_all(&record.encode());
        }
    }

    /// Every slot is taken: master should start another process.
    pub fn busy(&mut self) {
        self.worked = true;
        self.send(Load::Busy)
    }

    /// Ready for more.
    pub fn available(&mut self) {
        self.send(Load::Available)
    }

    /// A client was taken (and there is room for more): said once.
    pub fn took_work(&mut self) {
        if !std::mem::replace(&mut self.worked, true) {
            self.send(Load::Working)
        }
    }
}

impl Default for Status {
    fn default() -> Self {
        Self::new()
    }
}

/// Every listening socket master passed: fd 3, and for an inet service
/// that listens on several addresses also fd 5 and up, as named in
/// `POSTERN_LISTEN_FDS`.
pub fn listen_fds() -> Vec<RawFd> {
    must_have_dropped("listener taken");
    let from_env: Vec<RawFd> = std::env::var("POSTERN_LISTEN_FDS")
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|s| s.parse().ok())
        .filter(|&fd| fd == LISTEN_FD || fd > STATUS_FD)
        .collect();
    if from_env.is_empty() {
        vec![LISTEN_FD]
    } else {
        from_env
    }
}

/// The inherited listener of a unix-type service.
pub fn unix_listener() -> io::Result<UnixListener> {
    must_have_dropped("listener taken");
    // SAFETY: master put the listening socket on LISTEN_FD for us.
    let l = unsafe { UnixListener::from_raw_fd(LISTEN_FD) };
    l.set_nonblocking(true)?;
    Ok(l)
}

/// A connection from the shared listener, blocking, or None when another
/// process of the service took it first (or a signal came). The listener
/// may be a TCP one (spawn(8) on an inet service): the connection is
/// taken whatever its address family (std's `accept` refuses a non-Unix
/// peer address), and read and written as any socket.
fn accept(listener: &UnixListener) -> Option<UnixStream> {
    use std::os::fd::{AsRawFd, FromRawFd};
    let accepted = nix::sys::socket::accept4(
        listener.as_raw_fd(),
        nix::sys::socket::SockFlag::SOCK_CLOEXEC,
    );
    match accepted {
        Ok(fd) => {
            // SAFETY: accept4 returned a new descriptor that nothing else owns.
            let c = unsafe { UnixStream::from_raw_fd(fd) };
            let _ = c.set_nonblocking(false);
            Some(c)
        }
        Err(nix::errno::Errno::EAGAIN) | Err(nix::errno::Errno::EINTR) => None,
        Err(nix::errno::Errno::ECONNABORTED) => None,
        Err(e) => fatal!("accept: {e}"),
    }
}

/// `max_use` (at least 1): the connections a process serves before it
/// leaves (per slot, [`serve_threaded`]), and the messages or requests a
/// connection that smtpd or qmgr keeps carries (cleanup, smtp, lmtp).
pub fn max_use(cfg: &Config) -> u64 {
    cfg.get_u64("max_use").unwrap_or(100).max(1)
}

/// Serves a unix-type service one connection at a time, as Postfix's
/// single-threaded servers do: busy while a connection is handled, exits
/// after `max_use` connections or `max_idle` seconds without one (master
/// starts a fresh process when work comes).
pub fn serve_one_at_a_time(cfg: &Config, mut handle: impl FnMut(UnixStream)) -> ! {
    drop_privileges(cfg);
    let listener = match unix_listener() {
        Ok(l) => l,
        Err(e) => fatal!("no listener from master on fd {LISTEN_FD}: {e}"),
    };
    let max_use = max_use(cfg);
    let max_idle = Duration::from_secs(cfg.get_time("max_idle").unwrap_or(100).max(1));
    let drain = drain_notifier_or_die();
    let mut status = Status::new();
    let mut uses = 0;
    let mut idle_since = Instant::now();
    loop {
        let left = max_idle.saturating_sub(idle_since.elapsed());
        if left.is_zero() {
            std::process::exit(0);
        }
        let (readable, drained) =
            wait_readable_or_drain(std::os::fd::AsFd::as_fd(&listener), &drain, Some(left));
        if drained {
            std::process::exit(0);
        }
        if !readable {
            continue;
        }
        if let Some(table) = crate::table_watch::changed() {
            // A fresh process reads it (as root, if it must): master
            // starts one for the connection waiting.
            restart_for_table(&table);
            std::process::exit(0);
        }
        let Some(conn) = accept(&listener) else {
            continue;
        };
        status.busy();
        handle(conn);
        uses += 1;
        if uses >= max_use || drain_requested(&drain) {
            std::process::exit(0);
        }
        status.available();
        idle_since = Instant::now();
    }
}

/// Serves a unix-type service with up to `slots` connections at once,
/// each on a thread of its own (reused: [`crate::pool`]): one process carries many clients' requests
/// (cleanup serves every smtpd session's message this way), so a busy
/// system runs one or two such processes instead of one per client, and
/// pays for a thread, not a fork and exec, per connection. Busy (master
/// starts another process) only while every slot is taken. After `max_use`
/// connections per slot, or `max_idle` seconds with none, the process
/// stops accepting, lets its connections finish, calls `before_exit` and
/// exits.
pub fn serve_threaded<F, E>(cfg: &Config, slots: usize, handle: F, before_exit: E) -> !
where
    F: Fn(UnixStream) + Send + Sync + 'static,
    E: FnOnce(),
{
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    drop_privileges(cfg);
    let listener = match unix_listener() {
        Ok(l) => l,
        Err(e) => fatal!("no listener from master on fd {LISTEN_FD}: {e}"),
    };
    let slots = slots.max(1);
    let max_use = max_use(cfg) as usize * slots;
    let max_idle = Duration::from_secs(cfg.get_time("max_idle").unwrap_or(100).max(1));
    let handle = Arc::new(handle);
    // The threads stay for the next connection (see crate::pool).
    let workers = crate::pool::Pool::new("conn", slots);
    // Connections in progress; a finished thread pokes the main loop
    // through the pipe when the count leaves "full" (say "available"
    // again) or reaches zero (idle time, exit when worn out or drained).
    let active = Arc::new(AtomicUsize::new(0));
    let (done_rx, done_tx) = match nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC) {
        Ok(p) => p,
        Err(e) => fatal!("pipe: {e}"),
    };
    let done_tx = Arc::new(std::fs::File::from(done_tx));
    let mut done_rx = std::fs::File::from(done_rx);
    let drain = drain_notifier_or_die();
    let mut draining = false;
    let mut status = Status::new();
    let mut busy = false;
    let mut uses = 0;
    let mut idle_since = Instant::now();
    let last_done = Arc::new(LastDone::new());
    loop {
        if leaving() {
            draining = true;
        }
        if uses >= max_use || draining {
            leave();
        }
        // Read after leave(): a connection that ends from here on sees
        // that the process is leaving and pokes the loop ([`Finished`]).
        let now_active = active.load(Ordering::SeqCst);
        if now_active == 0 {
            // Idle since the last connection ended, which did not say so.
            idle_since = idle_since.max(last_done.get());
        }
        if now_active == 0 && idle_since.elapsed() >= max_idle {
            before_exit();
            std::process::exit(0);
        }
        if uses >= max_use || draining {
            // Worn out or drained: take no more (master starts a fresh
            // process) and leave when the last connection is done.
            if !busy {
                status.busy();
                busy = true;
            }
            if now_active == 0 {
                before_exit();
                std::process::exit(0);
            }
        }
        let want_busy = now_active >= slots || uses >= max_use || draining;
        if want_busy != busy {
            if want_busy {
                status.busy()
            } else {
                status.available()
            }
            busy = want_busy;
        }
        let accepting = !want_busy;
        // With connections in hand the loop still looks again after
        // `max_idle`: the last one may end without a word.
        let wait = if now_active == 0 {
            max_idle.saturating_sub(idle_since.elapsed())
        } else {
            max_idle
        };
        let wait = Some(wait);
        let Some(woken) = wait_threaded(&listener, accepting, &done_rx, &drain, draining, wait)
        else {
            continue;
        };
        if woken.drain && drain_requested(&drain) {
            draining = true;
            continue;
        }
        if woken.done {
            let mut b = [0u8; 64];
            let _ = std::io::Read::read(&mut done_rx, &mut b);
        }
        if !accepting || !woken.listener {
            continue;
        }
        if leaving() {
            continue;
        }
        if let Some(table) = crate::table_watch::changed() {
            // Take no more: the connections in hand finish with the old
            // table, master starts a fresh process (which reads the new
            // one as root, if it must) for the ones waiting.
            restart_for_table(&table);
            leave();
            continue;
        }
        let Some(conn) = accept(&listener) else {
            continue;
        };
        uses += 1;
        active.fetch_add(1, Ordering::SeqCst);
        status.took_work();
        let finished = Finished {
            active: active.clone(),
            last_done: last_done.clone(),
            done: done_tx.clone(),
            slots,
        };
        hand_to_worker(&workers, &handle, conn, finished);
    }
}

/// Which descriptors of [`serve_threaded`]'s loop are readable.
struct Woken {
    listener: bool,
    /// A connection finished ([`Finished`]).
    done: bool,
    drain: bool,
}

/// Waits for [`serve_threaded`]'s loop: the listener when `accepting`,
/// the end of a connection, the drain signal unless `draining` already;
/// at most `timeout` (None: no limit). None when nothing came.
fn wait_threaded(
    listener: &UnixListener,
    accepting: bool,
    done_rx: &std::fs::File,
    drain: &UnixStream,
    draining: bool,
    timeout: Option<Duration>,
) -> Option<Woken> {
    use nix::poll::{PollFd, PollFlags};
    use std::os::fd::AsFd;
    let when = |on: bool| {
        if on {
            PollFlags::POLLIN
        } else {
            PollFlags::empty()
        }
    };
    let mut fds = [
        PollFd::new(listener.as_fd(), when(accepting)),
        PollFd::new(done_rx.as_fd(), PollFlags::POLLIN),
        PollFd::new(drain.as_fd(), when(!draining)),
    ];
    let [listener, done, drain] = poll_events(&mut fds, timeout)?;
    Some(Woken {
        listener,
        done,
        drain,
    })
}

/// Runs `handle` on `conn` on a thread of `workers`; `finished` counts it
/// done when the thread is through with it, or at once when no thread
/// could take it.
fn hand_to_worker<F>(
    workers: &crate::pool::Pool,
    handle: &std::sync::Arc<F>,
    conn: UnixStream,
    finished: Finished,
) where
    F: Fn(UnixStream) + Send + Sync + 'static,
{
    let h = handle.clone();
    let submitted = workers.submit(move || {
        // Counted as finished even if the handler panics.
        let _finished = finished;
        h(conn);
    });
    if let Err((e, job)) = submitted {
        // Dropping the job drops the connection (the client sees it
        // close and tries again) and counts it as finished.
        drop(job);
        warning!("cannot start a thread: {e}");
    }
}

/// One connection of [`serve_threaded`] ending (when dropped): the count
/// of connections goes down, and the main loop hears of it only when that
/// changes what the loop does at once: a full process may accept again,
/// a leaving one (worn out, drained, a changed table) may exit when the
/// last is done. An ordinary end, even of the last connection, pokes
/// nobody: the time is noted for the idle limit, which the loop reads
/// when it next wakes (at the latest after `max_idle`). A poke per
/// message cost a pipe write and a wake-up of the main thread, the two
/// context switches of a thread hand-off, for every message.
struct Finished {
    active: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    last_done: std::sync::Arc<LastDone>,
    done: std::sync::Arc<std::fs::File>,
    slots: usize,
}

impl Drop for Finished {
    fn drop(&mut self) {
        use std::sync::atomic::Ordering;
        // Before the count: a loop that sees none left sees the time.
        self.last_done.set_now();
        let before = self.active.fetch_sub(1, Ordering::SeqCst);
        // The loop calls leave() before it reads the count, and this
        // reads leaving() after the count went down (both SeqCst): either
        // the loop sees no connection left, or this sees it leaving.
        if before == self.slots || (before == 1 && leaving()) {
            let _ = (&*self.done).write(&[0]);
        }
    }
}

/// When the last connection of [`serve_threaded`] ended, without a
/// message to the loop: nanoseconds since the process's start.
struct LastDone {
    start: Instant,
    nanos: std::sync::atomic::AtomicU64,
}

impl LastDone {
    fn new() -> LastDone {
        LastDone {
            start: Instant::now(),
            nanos: std::sync::atomic::AtomicU64::new(0),
        }
    }

    fn set_now(&self) {
        let n = u64::try_from(self.start.elapsed().as_nanos()).unwrap_or(u64::MAX);
        self.nanos.fetch_max(n, std::sync::atomic::Ordering::SeqCst);
    }

    fn get(&self) -> Instant {
        self.start + Duration::from_nanos(self.nanos.load(std::sync::atomic::Ordering::SeqCst))
    }
}

/// How many connections a trigger service keeps open for their next
/// wake-ups ([`crate::ipc::Waker`]'s: one per cleanup process). A
/// connection beyond them is read and closed (given [`TRIGGER_WAIT`] for
/// its first bytes when none came yet), and its writer connects again
/// the next time.
const KEPT_TRIGGER_CONNECTIONS: usize = 128;

/// How long a connection that cannot be kept may take to send its first
/// bytes: its writer connects, then writes.
const TRIGGER_WAIT: Duration = Duration::from_millis(200);

/// Serves a trigger service (qmgr, pickup): calls `on_wakeup` with the
/// bytes that came on wake-up connections, and with nothing when
/// `period` passes. Connections stay open for more (a process that
/// wakes the service for every message keeps one: [`crate::ipc::Waker`])
/// until their writer closes them. Returns when [`DRAIN_SIGNAL`] comes,
/// between wake-ups, having passed what came but was not yet read on to
/// the next process of the service (through `own_socket`, whose listener
/// master holds for it); never exits by itself.
pub fn serve_triggers(period: Duration, own_socket: &Path, mut on_wakeup: impl FnMut(&[u8])) {
    let listener = match unix_listener() {
        Ok(l) => l,
        Err(e) => fatal!("no listener from master on fd {LISTEN_FD}: {e}"),
    };
    let drain = drain_notifier_or_die();
    let mut status = Status::new();
    // A trigger server is always "busy": there is only ever one.
    status.busy();
    let mut kept: Vec<UnixStream> = Vec::new();
    let mut next = Instant::now() + period;
    loop {
        let now = Instant::now();
        if now >= next {
            on_wakeup(&[]);
            next = Instant::now() + period;
            continue;
        }
        let Some(ready) = wait_for_triggers(&listener, &drain, &kept, next - now) else {
            continue;
        };
        if ready.drained {
            pass_on_triggers(kept, own_socket);
            return;
        }
        let mut bytes = Vec::new();
        // Drain every pending wake-up before acting once.
        let mut i = 0;
        kept.retain(|c| {
            let readable = ready.kept.get(i).copied().unwrap_or(false);
            i += 1;
            !readable || read_triggers(c, &mut bytes)
        });
        if ready.listener {
            accept_triggers(&listener, &mut kept, KEPT_TRIGGER_CONNECTIONS, &mut bytes);
        }
        if !bytes.is_empty() {
            on_wakeup(&bytes);
        }
    }
}

/// Takes every wake-up connection waiting on `listener`: reads what each
/// holds into `bytes`, and keeps it open in `kept` for more while `kept`
/// has fewer than `limit`.
fn accept_triggers(
    listener: &UnixListener,
    kept: &mut Vec<UnixStream>,
    limit: usize,
    bytes: &mut Vec<u8>,
) {
    while let Ok((c, _)) = listener.accept() {
        if c.set_nonblocking(true).is_err() {
            continue;
        }
        let before = bytes.len();
        if !read_triggers(&c, bytes) {
            continue;
        }
        if kept.len() < limit {
            kept.push(c);
        } else if bytes.len() == before {
            // Not kept, and nothing came yet: closed now, its wake-up
            // would be lost.
            let _ = c.set_nonblocking(false);
            let _ = c.set_read_timeout(Some(TRIGGER_WAIT));
            let mut b = [0u8; 64];
            if let Ok(n) = (&c).read(&mut b) {
                bytes.extend_from_slice(&b[..n]);
            }
        }
    }
}

/// Which of a trigger service's sockets have something to read.
struct TriggersReady {
    listener: bool,
    drained: bool,
    kept: Vec<bool>,
}

/// Waits until the listener, the drain notifier or a kept connection is
/// readable, or `timeout` passes (None then, as when a signal came).
fn wait_for_triggers(
    listener: &UnixListener,
    drain: &UnixStream,
    kept: &[UnixStream],
    timeout: Duration,
) -> Option<TriggersReady> {
    use nix::poll::{PollFd, PollFlags, PollTimeout};
    use std::os::fd::AsFd;
    let mut fds = vec![
        PollFd::new(listener.as_fd(), PollFlags::POLLIN),
        PollFd::new(drain.as_fd(), PollFlags::POLLIN),
    ];
    fds.extend(
        kept.iter()
            .map(|c| PollFd::new(c.as_fd(), PollFlags::POLLIN)),
    );
    let timeout = PollTimeout::try_from(timeout).unwrap_or(PollTimeout::MAX);
    match nix::poll::poll(&mut fds, timeout) {
        Ok(n) if n > 0 => {}
        _ => return None,
    }
    // None from revents(): bits nix does not name, still an event.
    let ready: Vec<bool> = fds
        .iter()
        .map(|fd| fd.revents() != Some(PollFlags::empty()))
        .collect();
    Some(TriggersReady {
        listener: ready[0],
        drained: ready[1] && drain_requested(drain),
        kept: ready[2..].to_vec(),
    })
}

/// Reads what a wake-up connection holds now into `bytes`. False when
/// its writer closed it (or it failed): it is done with.
fn read_triggers(mut c: &UnixStream, bytes: &mut Vec<u8>) -> bool {
    let mut b = [0u8; 256];
    loop {
        match c.read(&mut b) {
            Ok(0) => return false,
            Ok(n) => bytes.extend_from_slice(&b[..n]),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return true,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return false,
        }
    }
}

/// At a drain: the kept connections stop taking wake-ups (a writer's next
/// one fails at once, and goes on a new connection to the next process),
/// and what they held unread goes to the next process of the service.
fn pass_on_triggers(kept: Vec<UnixStream>, own_socket: &Path) {
    let mut bytes = Vec::new();
    for c in &kept {
        let _ = c.shutdown(std::net::Shutdown::Read);
        read_triggers(c, &mut bytes);
    }
    drop(kept);
    let mut what: Vec<crate::ipc::Wakeup> = bytes
        .iter()
        .filter_map(|&b| crate::ipc::Wakeup::from_byte(b))
        .collect();
    what.dedup();
    if what.is_empty() {
        return;
    }
    if let Err(e) = crate::ipc::wake(own_socket, &what) {
        warning!(
            "reload: cannot pass wake-up requests on to the next process ({}): {e}",
            own_socket.display()
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fresh directory of this test process's, with a trigger listener
    /// in it: (directory, socket path, listener).
    fn trigger_listener(name: &str) -> (PathBuf, PathBuf, UnixListener) {
        let dir =
            std::env::temp_dir().join(format!("postern-triggers-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("qmgr");
        let listener = UnixListener::bind(&path).unwrap();
        (dir, path, listener)
    }

    /// cleanup's wake-ups of qmgr travel on one kept connection; what
    /// qmgr had not read when it drains goes to the next qmgr, and the
    /// waker's next wake-up finds the closed connection and goes on a
    /// new one.
    #[test]
    fn wake_ups_keep_their_connection_and_outlive_a_drain() {
        use crate::ipc::{Waker, Wakeup};
        let (dir, path, listener) = trigger_listener("keep");
        let waker = Waker::new(&path);
        waker.wake(&[Wakeup::Incoming]).unwrap();
        waker.wake(&[Wakeup::Incoming]).unwrap();
        let (kept, _) = listener.accept().unwrap();
        kept.set_nonblocking(true).unwrap();
        listener.set_nonblocking(true).unwrap();
        assert!(listener.accept().is_err(), "a second connection");
        let mut bytes = Vec::new();
        assert!(read_triggers(&kept, &mut bytes), "the connection stays");
        assert_eq!(bytes, b"II");

        // Unread at the drain: passed on through the listener.
        waker.wake(&[Wakeup::Incoming]).unwrap();
        pass_on_triggers(vec![kept], &path);
        listener.set_nonblocking(false).unwrap();
        let (next, _) = listener.accept().unwrap();
        let mut got = Vec::new();
        next.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        (&next).read_to_end(&mut got).unwrap();
        assert_eq!(got, b"I");

        // The waker's connection was closed by the drain: the next
        // wake-up reaches the listener on a new one.
        waker.wake(&[Wakeup::Incoming]).unwrap();
        let (again, _) = listener.accept().unwrap();
        again.set_nonblocking(true).unwrap();
        let mut bytes = Vec::new();
        assert!(read_triggers(&again, &mut bytes));
        assert_eq!(bytes, b"I");
        drop(waker);
        let mut bytes = Vec::new();
        assert!(!read_triggers(&again, &mut bytes), "closed by its writer");
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A connection the service cannot keep (its limit reached) still
    /// gets its wake-up read when the writer connects first and writes a
    /// moment later, as `ipc::wake` does.
    #[test]
    fn a_wake_up_beyond_the_kept_connections_is_not_lost() {
        let (dir, path, listener) = trigger_listener("full");
        listener.set_nonblocking(true).unwrap();
        let writer = {
            let path = path.clone();
            std::thread::spawn(move || {
                let mut s = UnixStream::connect(&path).unwrap();
                std::thread::sleep(Duration::from_millis(50));
                s.write_all(b"D").unwrap();
            })
        };
        let deadline = Instant::now() + Duration::from_secs(5);
        let (mut kept, mut bytes) = (Vec::new(), Vec::new());
        while bytes.is_empty() && Instant::now() < deadline {
            accept_triggers(&listener, &mut kept, 0, &mut bytes);
            std::thread::sleep(Duration::from_millis(5));
        }
        writer.join().unwrap();
        assert_eq!(bytes, b"D");
        assert!(kept.is_empty());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn drop_requests_as_master_writes_them() {
        for (uid, gid, chroot) in [(108, 114, false), (108, 114, true)] {
            assert_eq!(
                parse_drop_request(&drop_request_value(uid, gid, chroot)),
                Some(DropRequest::Drop { uid, gid, chroot })
            );
        }
        for bad in ["", "108", "108:x", "108:114:jail", "108:114:chroot:1"] {
            assert_eq!(parse_drop_request(bad), None, "{bad}");
        }
    }

    #[test]
    fn status_records_read_back_as_written() {
        let sent = [
            StatusRecord {
                pid: 1,
                load: Load::Available,
            },
            StatusRecord {
                pid: 0x0102_0304,
                load: Load::Busy,
            },
            StatusRecord {
                pid: u32::MAX,
                load: Load::Working,
            },
        ];
        let mut wire: Vec<u8> = sent.iter().flat_map(|r| r.encode()).collect();
        // A partial record at the end is not one.
        wire.extend_from_slice(&[9, 9, 9]);
        let read: Vec<StatusRecord> = StatusRecord::decode_all(&wire).collect();
        assert_eq!(read, sent);
        assert_eq!(&sent[1].encode(), &[4, 3, 2, 1, 1, 0, 0, 0]);
    }
}
