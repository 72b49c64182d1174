//! Logging in Postfix's line format.
//!
//! Lines look like `Nov 22 14:11:42 HOST postfix/smtpd[1234]: ID: text`
//! in `maillog_file` (when set; `/dev/stdout` works), or go to syslog
//! (facility mail) through `/dev/log`, or to stderr when neither is
//! available. Commands run by people (sendmail, postconf, ...) also print
//! warnings and fatal errors to stderr as `name: warning: text`, so that
//! the one-line reason reaches the terminal.
//!
//! Use the macros: `info!`, `warning!`, `error!`, `fatal!` (exits 1).

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::net::UnixDatagram;
use std::sync::{Mutex, OnceLock};

enum Sink {
    File(File),
    Syslog(UnixDatagram),
    Stderr,
}

struct Logger {
    /// "postfix/smtpd" (`syslog_name/program`)
    ident: String,
    /// `maillog_file` when it is a file Postern opened by name: what
    /// [`reopen`] opens again after `postern logrotate`.
    path: Option<String>,
    /// The command name printed on stderr ("sendmail"), when interactive.
    stderr_name: Option<String>,
    host: String,
    sink: Mutex<Sink>,
    verbose: bool,
}

static LOGGER: OnceLock<Logger> = OnceLock::new();

/// Sets up logging for this process. `program` is the short name
/// ("smtpd"); `syslog_name` the prefix ("postfix" by default, as Postfix, so that log tools find the lines); `maillog_file` the file
/// to append to, or "" for syslog. `interactive` also copies warnings
/// and errors to stderr. Only the first call has an effect.
pub fn init(
    program: &str,
    syslog_name: &str,
    maillog_file: &str,
    interactive: bool,
    verbose: bool,
) {
    init_ident(
        program,
        &format!("{syslog_name}/{program}"),
        maillog_file,
        interactive,
        verbose,
    )
}

/// As [`init`], with the whole tag of each line given (`postlog -t TAG`).
pub fn init_ident(
    program: &str,
    ident: &str,
    maillog_file: &str,
    interactive: bool,
    verbose: bool,
) {
    let inherited = match maillog_file {
        "/dev/stdout" => Some(nix::unistd::dup(std::io::stdout())),
        "/dev/stderr" => Some(nix::unistd::dup(std::io::stderr())),
        _ => None,
    };
    let sink = if let Some(copy) = inherited {
        // Write to the descriptor we inherited: reopening /dev/stdout
        // checks the permissions of whatever it is (a terminal or pipe of
        // root's), which a daemon running as mail_owner may not pass.
        match copy {
            Ok(fd) => Sink::File(fd.into()),
            Err(_) => Sink::Stderr,
        }
    } else if !maillog_file.is_empty() {
        match OpenOptions::new()
            .append(true)
            .create(true)
            .open(maillog_file)
        {
            Ok(f) => Sink::File(f),
            Err(e) => {
                eprintln!("{program}: warning: open {maillog_file}: {e}; logging to stderr");
                Sink::Stderr
            }
        }
    } else {
        match UnixDatagram::unbound().and_then(|s| s.connect("/dev/log").map(|_| s)) {
            Ok(s) => Sink::Syslog(s),
            Err(_) => Sink::Stderr,
        }
    };
    let host = nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .map(|h| h.split('.').next().unwrap_or("localhost").to_string())
        .unwrap_or_else(|| "localhost".into());
    let path = (!maillog_file.is_empty() && !maillog_file.starts_with("/dev/"))
        .then(|| maillog_file.to_string());
    let _ = LOGGER.set(Logger {
        ident: ident.to_string(),
        path,
        stderr_name: interactive.then(|| program.to_string()),
        host,
        sink: Mutex::new(sink),
        verbose,
    });
}

/// Severity of a line; the word Postfix puts before the text.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Level {
    Info,
    Warning,
    Error,
    Fatal,
    Debug,
    /// `postlog -p panic`.
    Panic,
}

impl Level {
    fn prefix(self) -> &'static str {
        match self {
            Level::Info | Level::Debug => "",
            Level::Warning => "warning: ",
            Level::Error => "error: ",
            Level::Fatal => "fatal: ",
            Level::Panic => "panic: ",
        }
    }

    fn syslog_severity(self) -> u8 {
        match self {
            Level::Info => 6,
            Level::Debug => 7,
            Level::Warning => 4,
            Level::Error => 3,
            Level::Fatal | Level::Panic => 2,
        }
    }
}

/// Opens `maillog_file` again, so that lines go to the file now under
/// that name (after `postern logrotate` renamed the old one). The new
/// file is created when missing. Without a file of our own, does nothing.
pub fn reopen() {
    let Some(l) = LOGGER.get() else { return };
    let Some(path) = &l.path else { return };
    match OpenOptions::new().append(true).create(true).open(path) {
        Ok(f) => *l.sink.lock().unwrap_or_else(|e| e.into_inner()) = Sink::File(f),
        Err(e) => eprintln!("{}: warning: open {path}: {e}", l.ident),
    }
}

thread_local! {
    /// The verbosity a `debug_peer_list` match added for the session this
    /// thread serves ([`crate::debug_peer`]); 0 when none.
    static PEER_LEVEL: std::cell::Cell<u32> = const { std::cell::Cell::new(0) };
}

/// Whether verbose logging is on: `-v` on the master.cf line, or a peer
/// of `debug_peer_list` in the session this thread serves.
pub fn verbose() -> bool {
    PEER_LEVEL.with(|l| l.get()) > 0 || LOGGER.get().map(|l| l.verbose).unwrap_or(false)
}

/// Raises this thread's verbosity by `level` until the guard is dropped
/// (Postfix's debug_peer_check and debug_peer_restore: a second raise
/// while one is in force does nothing).
pub fn raise_verbosity(level: u32) -> VerbosityGuard {
    let raised = PEER_LEVEL.with(|l| {
        if l.get() == 0 && level > 0 {
            l.set(level);
            true
        } else {
            false
        }
    });
    VerbosityGuard { raised }
}

/// Restores the verbosity [`raise_verbosity`] raised, when dropped.
#[derive(Debug)]
#[must_use = "the verbosity is restored when the guard is dropped"]
pub struct VerbosityGuard {
    raised: bool,
}

impl VerbosityGuard {
    /// Whether this guard raised the verbosity.
    pub fn raised(&self) -> bool {
        self.raised
    }
}

impl Drop for VerbosityGuard {
    fn drop(&mut self) {
        if self.raised {
            PEER_LEVEL.with(|l| l.set(0));
        }
    }
}

fn timestamp() -> String {
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    // SAFETY: time(NULL) and localtime_r with valid pointers.
    unsafe {
        let t = libc::time(std::ptr::null_mut());
        let mut tm: libc::tm = std::mem::zeroed();
        libc::localtime_r(&t, &mut tm);
        format!(
            "{} {:2} {:02}:{:02}:{:02}",
            MONTHS[(tm.tm_mon.clamp(0, 11)) as usize],
            tm.tm_mday,
            tm.tm_hour,
            tm.tm_min,
            tm.tm_sec
        )
    }
}

/// This process's ID, asked of the kernel once (a system call per line
/// was most of the system calls some daemons make per message): a child
/// forked without exec asks again (`pthread_atfork`).
fn pid() -> u32 {
    use std::sync::atomic::{AtomicU32, Ordering};
    static PID: AtomicU32 = AtomicU32::new(0);
    static AT_FORK: std::sync::Once = std::sync::Once::new();
    extern "C" fn forget() {
        PID.store(0, Ordering::Relaxed);
    }
    let known = PID.load(Ordering::Relaxed);
    if known != 0 {
        return known;
    }
    AT_FORK.call_once(|| {
        // SAFETY: registers a handler that only stores to an atomic,
        // which is async-signal-safe as a fork's child handler must be.
        unsafe {
            libc::pthread_atfork(None, None, Some(forget));
        }
    });
    let pid = std::process::id();
    PID.store(pid, Ordering::Relaxed);
    pid
}

/// Writes one line. Used through the macros.
pub fn write(level: Level, text: std::fmt::Arguments<'_>) {
    let Some(l) = LOGGER.get() else {
        eprintln!("{}{}", level.prefix(), text);
        return;
    };
    if level == Level::Debug && !verbose() {
        return;
    }
    let pid = pid();
    let msg = format!("{}{}", level.prefix(), text);
    if let (Some(name), true) = (
        &l.stderr_name,
        level != Level::Info && level != Level::Debug,
    ) {
        eprintln!("{name}: {msg}");
    }
    let mut sink = l.sink.lock().unwrap_or_else(|e| e.into_inner());
    match &mut *sink {
        Sink::File(f) => {
            let line = format!("{} {} {}[{}]: {}\n", timestamp(), l.host, l.ident, pid, msg);
            // One write per line: with O_APPEND, lines from many processes
            // do not interleave.
            let _ = f.write_all(line.as_bytes());
        }
        Sink::Syslog(s) => {
            let pri = 2 * 8 + level.syslog_severity(); // facility mail = 2
            let line = format!("<{pri}>{} {}[{}]: {}", timestamp(), l.ident, pid, msg);
            if s.send(line.as_bytes()).is_err() {
                eprintln!("{}[{}]: {}", l.ident, pid, msg);
            }
        }
        Sink::Stderr => {
            if l.stderr_name.is_none() {
                eprintln!("{} {}[{}]: {}", timestamp(), l.ident, pid, msg);
            }
        }
    }
}

#[macro_export]
macro_rules! info {
    ($($a:tt)*) => { $crate::log::write($crate::log::Level::Info, format_args!($($a)*)) };
}

#[macro_export]
macro_rules! warning {
    ($($a:tt)*) => { $crate::log::write($crate::log::Level::Warning, format_args!($($a)*)) };
}

#[macro_export]
macro_rules! error {
    ($($a:tt)*) => { $crate::log::write($crate::log::Level::Error, format_args!($($a)*)) };
}

#[macro_export]
macro_rules! debug {
    ($($a:tt)*) => { $crate::log::write($crate::log::Level::Debug, format_args!($($a)*)) };
}

/// Logs a fatal error and exits with status 1.
#[macro_export]
macro_rules! fatal {
    ($($a:tt)*) => {{
        $crate::log::write($crate::log::Level::Fatal, format_args!($($a)*));
        std::process::exit(1)
    }};
}

#[cfg(test)]
mod tests {
    /// The ID kept for log lines is this process's, and a forked child's
    /// is its own, not its parent's.
    #[test]
    fn a_forked_child_logs_its_own_pid() {
        assert_eq!(super::pid(), std::process::id());
        // SAFETY: the child only calls pid() (an atomic load and store,
        // and getpid) and _exit.
        match unsafe { libc::fork() } {
            0 => {
                let ok = super::pid() == unsafe { libc::getpid() } as u32;
                unsafe { libc::_exit(if ok { 0 } else { 1 }) }
            }
            child => {
                assert!(child > 0, "fork failed");
                let mut status = 0;
                // SAFETY: waits for the child forked above.
                unsafe { libc::waitpid(child, &mut status, 0) };
                assert!(libc::WIFEXITED(status), "status {status}");
                assert_eq!(
                    libc::WEXITSTATUS(status),
                    0,
                    "the child logged its parent's pid"
                );
                assert_eq!(super::pid(), std::process::id());
            }
        }
    }
}
