//! Delivery to a command: `/bin/sh -c COMMAND` with the message on its
//! standard input, as Postfix's local(8) runs `|command` alias targets.
//!
//! The command runs in a session of its own (so that it and everything
//! it starts can be killed at `command_time_limit`), with a clean
//! environment, as the given ids when running as root. Its standard
//! output and error are read together; the first line is the reason
//! reported when it fails. Exit status: 0 sent; a status from
//! `<sysexits.h>` per Postfix's table (75, EX_TEMPFAIL: deferred); output
//! that starts with an enhanced status code (`5.1.1 text`) sets the
//! outcome; any other status bounces (5.3.0); death by a signal defers;
//! the time limit bounces (5.3.0). No threads: one poll loop feeds the
//! input and reads the output.

use crate::mailbox::Ids;
use crate::status::Status;
use nix::fcntl::{fcntl, FcntlArg, OFlag};
use nix::poll::{PollFd, PollFlags, PollTimeout};
use std::ffi::CString;
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::Path;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

/// The `user=name[:group]` of a master.cf pipe or spawn service: the
/// ids its commands run as. Never root, group 0 or `mail_owner` (uid):
/// the command would then run with the mail system's privileges.
pub fn command_user(value: &str, mail_owner: Option<u32>) -> Result<(u32, u32), String> {
    let (u, g) = match value.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (value, None),
    };
    let acct =
        postern_common::privs::user(u).ok_or_else(|| format!("user={value}: unknown user {u}"))?;
    let gid = match g {
        Some(g) => postern_common::privs::group_id(g)
            .ok_or_else(|| format!("user={value}: unknown group {g}"))?,
        None => acct.gid,
    };
    if acct.uid == 0 {
        return Err(format!("user={value}: user= specifies root privileges"));
    }
    if gid == 0 {
        return Err(format!(
            "user={value}: user= specifies privileged group id 0"
        ));
    }
    if Some(acct.uid) == mail_owner {
        return Err(format!(
            "user={value}: user= specifies the mail system owner (mail_owner)"
        ));
    }
    Ok((acct.uid, gid))
}

/// How much command output is kept for the reason.
const OUTPUT_KEPT: usize = 4096;

/// One command to run.
pub struct Command<'a> {
    /// The command as shown in reasons; run by `/bin/sh -c` unless `argv`.
    pub command: &'a str,
    /// Run this argument vector directly instead (pipe(8)'s `argv=`).
    pub argv: Option<&'a [String]>,
    /// The whole environment of the command.
    pub env: Vec<(String, String)>,
    /// Run as these ids; `None` = as this process.
    pub run_as: Option<Ids>,
    /// Working directory; "/" when it cannot be entered.
    pub home: &'a Path,
    pub time_limit: Duration,
}

impl Command<'_> {
    /// Runs the command with `prefix` then `content` as its input.
    pub fn run(&self, prefix: &[u8], content: &mut dyn Read) -> Status {
        let mut child = match self.spawn() {
            Ok(c) => c,
            // No process at all (fork, pipe): a resource problem of the
            // mail system, for the postmaster.
            Err((e, output))
                if matches!(
                    e.raw_os_error(),
                    Some(libc::EAGAIN | libc::ENOMEM | libc::EMFILE | libc::ENFILE)
                ) =>
            {
                return Status::defer(
                    "4.3.0",
                    format!(
                        "cannot run command \"{}\": {}",
                        self.command,
                        crate::status::strip_os_error(&e)
                    ) + &output,
                )
            }
            // The command could not become itself (no such program, not
            // executable, user or directory refused): Postfix's child
            // dies with a temporary failure and that is the message's
            // deferral, like any exit status — not a software problem
            // that pages the postmaster at each retry.
            Err((e, _)) => {
                let program = match self.argv {
                    Some([program, ..]) => program.as_str(),
                    _ => "/bin/sh",
                };
                return Status::defer(
                    "4.3.0",
                    format!(
                        "temporary failure. Command output: execvp {program}: {}",
                        crate::status::strip_os_error(&e)
                    ),
                )
                .from_command();
            }
        };
        let deadline = Instant::now() + self.time_limit;
        let result = feed(&mut child.0, child.1, prefix, content, deadline);
        let (output, timed_out) = match result {
            Ok(v) => v,
            Err(e) => {
                kill(&mut child.0);
                return Status::defer(
                    "4.3.0",
                    format!(
                        "cannot deliver to command \"{}\": {}",
                        self.command,
                        crate::status::strip_os_error(&e)
                    ),
                );
            }
        };
        let text = first_line(&output);
        if timed_out {
            kill(&mut child.0);
            return Status::bounce(
                "5.3.0",
                format!(
                    "Command time limit exceeded: \"{}\"{}",
                    self.command,
                    with_output(&text)
                ),
            )
            .from_command();
        }
        let status = match child.0.wait() {
            Ok(s) => s,
            Err(e) => return Status::io(&e, "wait for command"),
        };
        // The command's verdict on this message: a deferral or bounce,
        // never a mail system problem for the postmaster (notify_classes),
        // as Postfix's pipe(8) and local(8) report it.
        outcome(self.command, status, &text).from_command()
    }

    /// Starts the command; returns it with the read end of its output.
    fn spawn(&self) -> Result<(Child, File), (io::Error, String)> {
        let (out_r, out_w) = pipe().map_err(|e| (e, String::new()))?;
        let out_w2 = out_w.try_clone().map_err(|e| (e, String::new()))?;
        let home = CString::new(self.home.as_os_str().as_bytes())
            .unwrap_or_else(|_| CString::new("/").unwrap());
        let root = CString::new("/").unwrap();
        let run_as = self.run_as.filter(|_| postern_common::privs::is_root());
        let mut cmd = match self.argv {
            Some([program, args @ ..]) => {
                let mut c = std::process::Command::new(program);
                c.args(args);
                c
            }
            _ => {
                let mut c = std::process::Command::new("/bin/sh");
                c.arg("-c").arg(self.command);
                c
            }
        };
        cmd.env_clear()
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::piped())
            .stdout(Stdio::from(out_w))
            .stderr(Stdio::from(out_w2));
        // SAFETY: only async-signal-safe system calls between fork and exec.
        unsafe {
            cmd.pre_exec(move || {
                if libc::setsid() == -1 {
                    return Err(io::Error::last_os_error());
                }
                // local runs under SCHED_BATCH (master's daemon_sched_batch);
                // the user's command gets the normal policy.
                let normal = libc::sched_param { sched_priority: 0 };
                libc::sched_setscheduler(0, libc::SCHED_OTHER, &normal);
                if let Some((uid, gid)) = run_as {
                    become_user(uid, gid)?;
                }
                if libc::chdir(home.as_ptr()) == -1 && libc::chdir(root.as_ptr()) == -1 {
                    return Err(io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd.spawn().map_err(|e| (e, String::new()))?;
        // The command's copies of the output pipe go with `cmd`.
        drop(cmd);
        Ok((child, File::from(out_r)))
    }
}

/// Writes the input and collects the output until the command is done
/// with both or the deadline passes. Returns (output kept, timed out).
fn feed(
    child: &mut Child,
    output: File,
    prefix: &[u8],
    content: &mut dyn Read,
    deadline: Instant,
) -> io::Result<(Vec<u8>, bool)> {
    let mut stdin = child.stdin.take();
    if let Some(s) = &stdin {
        set_nonblocking(s)?;
    }
    set_nonblocking(&output)?;
    let mut output = Some(output);
    let mut kept = Vec::new();
    let mut pending: Vec<u8> = prefix.to_vec();
    let mut sent = 0usize;
    let mut input_done = false;
    let mut buf = vec![0u8; 64 * 1024];
    let mut exited_at: Option<Instant> = None;
    loop {
        // Next piece of input.
        if stdin.is_some() && sent == pending.len() {
            if input_done {
                stdin = None; // EOF for the command
            } else {
                pending.clear();
                sent = 0;
                let n = loop {
                    match content.read(&mut buf) {
                        Ok(n) => break n,
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                        Err(e) => return Err(e),
                    }
                };
                if n == 0 {
                    input_done = true;
                    stdin = None;
                } else {
                    pending.extend_from_slice(&buf[..n]);
                }
            }
        }
        if stdin.is_none() && output.is_none() {
            return Ok((kept, false));
        }
        let now = Instant::now();
        if now >= deadline {
            return Ok((kept, true));
        }
        // The command has exited but something it started still holds
        // its input or output open: do not wait for that.
        if exited_at.is_none() && child.try_wait()?.is_some() {
            exited_at = Some(now);
        }
        if exited_at.is_some_and(|t| now.duration_since(t) > Duration::from_millis(200)) {
            return Ok((kept, false));
        }
        let mut fds = Vec::with_capacity(2);
        if let Some(s) = &stdin {
            fds.push(PollFd::new(s.as_fd(), PollFlags::POLLOUT));
        }
        if let Some(o) = &output {
            fds.push(PollFd::new(o.as_fd(), PollFlags::POLLIN));
        }
        let wait = deadline
            .saturating_duration_since(now)
            .min(Duration::from_millis(50));
        let ms = u16::try_from(wait.as_millis().max(1)).unwrap_or(u16::MAX);
        match nix::poll::poll(&mut fds, PollTimeout::from(ms)) {
            Ok(_) => {}
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(e.into()),
        }
        if let Some(s) = stdin.as_mut() {
            match s.write(&pending[sent..]) {
                Ok(n) => sent += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::BrokenPipe => {
                    // The command does not want the rest: not an error.
                    stdin = None;
                    input_done = true;
                }
                Err(e) => return Err(e),
            }
        }
        if let Some(o) = output.as_mut() {
            loop {
                match o.read(&mut buf) {
                    Ok(0) => {
                        output = None;
                        break;
                    }
                    Ok(n) => {
                        let room = OUTPUT_KEPT.saturating_sub(kept.len());
                        kept.extend_from_slice(&buf[..n.min(room)]);
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(e),
                }
            }
        }
    }
}

/// Becomes `uid`/`gid` for good, between fork and exec. Unlike
/// `privs::drop_to`, this leaves no_new_privs off: a command may run
/// set-gid programs such as `sendmail`'s postdrop, as under Postfix.
pub(crate) fn become_user(uid: u32, gid: u32) -> io::Result<()> {
    use nix::unistd::{Gid, Uid};
    let (uid, gid) = (Uid::from_raw(uid), Gid::from_raw(gid));
    nix::unistd::setgroups(&[gid])?;
    nix::unistd::setresgid(gid, gid, gid)?;
    nix::unistd::setresuid(uid, uid, uid)?;
    Ok(())
}

/// Kills the command and everything in its session, and reaps it.
fn kill(child: &mut Child) {
    // The process group this child leads (setsid).
    let group = nix::unistd::Pid::from_raw(child.id() as libc::pid_t);
    let _ = nix::sys::signal::killpg(group, nix::sys::signal::Signal::SIGKILL);
    let _ = child.kill();
    let _ = child.wait();
}

fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    Ok(nix::unistd::pipe2(OFlag::O_CLOEXEC)?)
}

fn set_nonblocking(fd: impl AsFd) -> io::Result<()> {
    let fl = fcntl(&fd, FcntlArg::F_GETFL)?;
    fcntl(
        &fd,
        FcntlArg::F_SETFL(OFlag::from_bits_retain(fl) | OFlag::O_NONBLOCK),
    )?;
    Ok(())
}

/// The first non-empty line of the output, printable, at most 500 bytes.
fn first_line(out: &[u8]) -> String {
    let text = String::from_utf8_lossy(out);
    let line = text
        .lines()
        .map(str::trim)
        .find(|l| !l.is_empty())
        .unwrap_or("");
    let mut s: String = line
        .chars()
        .map(|c| if c.is_control() { '?' } else { c })
        .collect();
    if s.len() > 500 {
        let mut end = 500;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
    }
    s
}

fn with_output(text: &str) -> String {
    if text.is_empty() {
        String::new()
    } else {
        format!(". Command output: {text}")
    }
}

/// `<sysexits.h>` codes: (dsn, text), as Postfix's sys_exits table.
fn sysexits(code: i32) -> Option<(&'static str, &'static str)> {
    Some(match code {
        64 => ("5.3.0", "command line usage error"),
        65 => ("5.6.0", "data format error"),
        66 => ("5.3.0", "cannot open input"),
        67 => ("5.1.1", "user unknown"),
        68 => ("5.1.2", "host name unknown"),
        69 => ("5.3.0", "service unavailable"),
        70 => ("5.3.0", "internal software error"),
        71 => ("4.3.0", "system resource problem"),
        72 => ("5.3.0", "critical OS file missing"),
        73 => ("5.2.0", "can't create user output file"),
        74 => ("5.3.0", "input/output error"),
        75 => ("4.3.0", "temporary failure"),
        76 => ("5.5.0", "remote error in protocol"),
        77 => ("5.7.0", "permission denied"),
        78 => ("5.3.5", "local configuration error"),
        _ => return None,
    })
}

/// `4.x.y` or `5.x.y` at the start of the text, and the rest.
fn leading_dsn(text: &str) -> Option<(&str, &str)> {
    let word = text.split_whitespace().next()?;
    let parts: Vec<&str> = word.split('.').collect();
    let ok = parts.len() == 3
        && matches!(parts[0], "4" | "5")
        && parts[1..]
            .iter()
            .all(|p| !p.is_empty() && p.len() <= 3 && p.bytes().all(|b| b.is_ascii_digit()));
    ok.then(|| (word, text[word.len()..].trim()))
}

/// The delivery status from how the command ended.
fn outcome(command: &str, status: std::process::ExitStatus, text: &str) -> Status {
    if let Some(sig) = status.signal() {
        return Status::defer(
            "4.3.0",
            format!(
                "Command died with signal {sig}: \"{command}\"{}",
                with_output(text)
            ),
        );
    }
    let code = status.code().unwrap_or(-1);
    if code == 0 {
        return Status::sent(format!("delivered to command: {command}"));
    }
    let make = |dsn: &str, reason: String| {
        if dsn.starts_with('4') {
            Status::defer(dsn, reason)
        } else {
            Status::bounce(dsn, reason)
        }
    };
    if let Some((dsn, rest)) = leading_dsn(text) {
        let reason = if rest.is_empty() { text } else { rest };
        return make(dsn, reason.to_string());
    }
    if let Some((dsn, what)) = sysexits(code) {
        return make(dsn, format!("{what}{}", with_output(text)));
    }
    Status::bounce(
        "5.3.0",
        format!(
            "Command died with status {code}: \"{command}\"{}",
            with_output(text)
        ),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use postern_common::ipc::Outcome;

    fn run(cmd: &str, input: &[u8], limit: u64) -> Status {
        let c = Command {
            command: cmd,
            argv: None,
            env: vec![
                ("PATH".into(), "/usr/bin:/bin".into()),
                ("RECIPIENT".into(), "a@h".into()),
            ],
            run_as: None,
            home: Path::new("/nonexistent"),
            time_limit: Duration::from_secs(limit),
        };
        c.run(b"From x\n", &mut &input[..])
    }

    #[test]
    fn exit_statuses() {
        let s = run("cat >/dev/null", b"hello\n", 10);
        assert_eq!(s, Status::sent("delivered to command: cat >/dev/null"));
        let s = run("echo 'no such list'; echo second; exit 1", b"x\n", 10);
        assert_eq!(s.outcome, Outcome::Bounced);
        assert_eq!(s.dsn, "5.3.0");
        assert_eq!(
            s.reason,
            "Command died with status 1: \"echo 'no such list'; echo second; exit 1\". Command output: no such list"
        );
        let s = run("echo busy >&2; exit 75", b"x\n", 10);
        assert_eq!((s.outcome, s.dsn.as_str()), (Outcome::Deferred, "4.3.0"));
        assert_eq!(s.reason, "temporary failure. Command output: busy");
        let s = run("exit 67", b"x\n", 10);
        assert_eq!((s.outcome, s.dsn.as_str()), (Outcome::Bounced, "5.1.1"));
        let s = run("echo '4.2.2 mailbox full'; exit 1", b"x\n", 10);
        assert_eq!((s.outcome, s.dsn.as_str()), (Outcome::Deferred, "4.2.2"));
        assert_eq!(s.reason, "mailbox full");
        let s = run("kill -9 $$", b"x\n", 10);
        assert_eq!(s.outcome, Outcome::Deferred);
        assert!(
            s.reason.starts_with("Command died with signal 9"),
            "{}",
            s.reason
        );
    }

    #[test]
    fn input_environment_and_directory() {
        let dir = std::env::temp_dir().join(format!("plocal-pipe-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let out = dir.join("out");
        let big: Vec<u8> = (0..300_000).map(|i| b"abcdefghij\n"[i % 11]).collect();
        let cmd = format!(
            "cat > {}; echo \"$RECIPIENT $HOME $(pwd)\" >> {}",
            out.display(),
            out.display()
        );
        let s = run(&cmd, &big, 30);
        assert!(s.is_sent(), "{s:?}");
        let got = std::fs::read(&out).unwrap();
        let mut want = b"From x\n".to_vec();
        want.extend_from_slice(&big);
        want.extend_from_slice(b"a@h  /\n");
        assert_eq!(got, want);
        // A command that reads nothing still succeeds.
        let s = run("true", &big, 30);
        assert!(s.is_sent(), "{s:?}");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn time_limit_and_background_children() {
        let t = Instant::now();
        let s = run("echo started; sleep 30", b"x\n", 1);
        assert_eq!((s.outcome, s.dsn.as_str()), (Outcome::Bounced, "5.3.0"));
        assert_eq!(
            s.reason,
            "Command time limit exceeded: \"echo started; sleep 30\". Command output: started"
        );
        assert!(t.elapsed() < Duration::from_secs(10));
        // A child left running with the output open does not hold us.
        let t = Instant::now();
        let s = run("sleep 20 & exit 0", b"x\n", 15);
        assert!(s.is_sent(), "{s:?}");
        assert!(t.elapsed() < Duration::from_secs(5));
    }

    #[test]
    fn dsn_parsing() {
        assert_eq!(leading_dsn("5.1.1 no"), Some(("5.1.1", "no")));
        assert_eq!(leading_dsn("2.0.0 ok"), None);
        assert_eq!(leading_dsn("5.1 x"), None);
        assert_eq!(first_line(b"\n  a\tb \nc"), "a\tb".replace('\t', "?"));
    }
}
