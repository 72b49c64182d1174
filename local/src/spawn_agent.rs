//! spawn(8): runs a program that is not Postern's for each connection to
//! a master.cf `unix` or `inet` service, with the connection on its standard input,
//! output and error, as Postfix's `spawn` daemon. The usual use is a
//! policy server that Postfix's master starts on demand:
//!
//! ```text
//! policy unix - n n - 0 spawn
//!   user=nobody argv=/usr/bin/policyd-spf
//! ```
//!
//! with `check_policy_service unix:private/policy` in smtpd's lists.
//!
//! Attributes: `user=name[:group]` (required; never root, gid 0 or
//! `mail_owner`) and `argv=` (required, the rest of the line; an element
//! in `{ }` may hold spaces). The program runs in its own session as
//! `user=`, with only `TZ`, `LANG` and `MAIL_CONFIG` of the environment
//! (Postfix's `export_environment`) and `PATH=/usr/bin:/bin` and `queue_directory` as working
//! directory; `SERVICE_time_limit` (default `command_time_limit`) kills it
//! (and its process group). The service's process limit is the number of
//! programs running at once.
//!
//! The daemon runs as root only to become `user=`; it reads nothing from
//! the connection.

use crate::pipe::become_user;
use postern_common::{error, privs, warning};
use postern_conf::Config;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// `user=` and `argv=`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    pub uid: u32,
    pub gid: u32,
    pub argv: Vec<String>,
}

fn unbrace(s: &str) -> &str {
    match s.strip_prefix('{').and_then(|r| r.strip_suffix('}')) {
        Some(inner) => inner.trim(),
        None => s,
    }
}

impl Settings {
    /// The master.cf arguments after `spawn`; `mail_owner` (uid) is
    /// refused as `user=`, as root is.
    pub fn parse(args: &[String], mail_owner: Option<u32>) -> Result<Settings, String> {
        let mut user = None;
        let mut argv: Option<Vec<String>> = None;
        for a in args {
            if let Some(v) = &mut argv {
                v.push(unbrace(a).to_string());
                continue;
            }
            let a = unbrace(a);
            let Some((name, value)) = a.split_once('=') else {
                return Err(format!("bad attribute \"{a}\": expected name=value"));
            };
            match name {
                "user" => {
                    user = Some(crate::pipe::command_user(value, mail_owner)?);
                }
                "argv" => {
                    argv = Some(if value.is_empty() {
                        Vec::new()
                    } else {
                        vec![value.to_string()]
                    })
                }
                other => return Err(format!("unknown attribute {other}=")),
            }
        }
        let argv = argv
            .filter(|v| !v.is_empty())
            .ok_or("missing argv= attribute")?;
        let (uid, gid) = user.ok_or("missing user= attribute")?;
        Ok(Settings { uid, gid, argv })
    }
}

/// One spawn service.
pub struct Agent {
    service: String,
    settings: Settings,
    time_limit: Duration,
    directory: PathBuf,
    /// `export_environment` values.
    env: Vec<(String, String)>,
}

impl Agent {
    /// Err: the service's line cannot be run (logged by the caller).
    pub fn new(cfg: &Config, service: &str, args: &[String]) -> Result<Agent, String> {
        let mail_owner = privs::user(&cfg.get("mail_owner")).map(|a| a.uid);
        let settings = Settings::parse(args, mail_owner)?;
        let limit_name = format!("{service}_time_limit");
        let limit = if cfg.raw(&limit_name).is_some() {
            cfg.get_time(&limit_name)
        } else {
            cfg.get_time("command_time_limit")
        }
        .map_err(|e| e.to_string())?;
        let env = ["TZ", "LANG"]
            .iter()
            .filter_map(|n| std::env::var(n).ok().map(|v| (n.to_string(), v)))
            .chain([
                ("MAIL_CONFIG".to_string(), cfg.dir().display().to_string()),
                ("PATH".to_string(), "/usr/bin:/bin".to_string()),
            ])
            .collect();
        Ok(Agent {
            service: service.to_string(),
            settings,
            time_limit: Duration::from_secs(limit.max(1)),
            directory: postern_common::service::queue_directory(cfg),
            env,
        })
    }

    /// Runs the program on `conn` and waits for it (at most the time limit).
    pub fn serve(&self, conn: UnixStream) {
        let s = &self.settings;
        let fd = conn.as_raw_fd();
        let dup = || -> std::io::Result<Stdio> {
            Ok(Stdio::from(std::os::fd::OwnedFd::from(conn.try_clone()?)))
        };
        let (stdin, stdout, stderr) = match (dup(), dup(), dup()) {
            (Ok(a), Ok(b), Ok(c)) => (a, b, c),
            _ => {
                warning!("service {}: cannot duplicate socket {fd}", self.service);
                return;
            }
        };
        let (uid, gid) = (s.uid, s.gid);
        let mut cmd = Command::new(&s.argv[0]);
        cmd.args(&s.argv[1..])
            .env_clear()
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .current_dir(&self.directory)
            .stdin(stdin)
            .stdout(stdout)
            .stderr(stderr);
        // SAFETY: between fork and exec only async-signal-safe calls
        // (setsid, setgroups, setresgid, setresuid).
        unsafe {
            cmd.pre_exec(move || {
                nix::unistd::setsid()?;
                become_user(uid, gid)
            });
        }
        let mut child = match cmd.spawn() {
            Ok(c) => c,
            Err(e) => {
                error!("service {}: cannot run {}: {e}", self.service, s.argv[0]);
                return;
            }
        };
        // Only the program holds the connection now.
        drop(cmd);
        drop(conn);
        let started = Instant::now();
        loop {
            match child.try_wait() {
                Ok(Some(status)) => {
                    if !status.success() {
                        match status.code() {
                            Some(c) => warning!("command {} exit status {c}", s.argv[0]),
                            None => warning!("command {} killed by a signal", s.argv[0]),
                        }
                    }
                    return;
                }
                Ok(None) => {}
                Err(e) => {
                    warning!("command {}: wait: {e}", s.argv[0]);
                    return;
                }
            }
            if started.elapsed() >= self.time_limit {
                warning!(
                    "command {} time limit exceeded ({}s): killed",
                    s.argv[0],
                    self.time_limit.as_secs()
                );
                let group = nix::unistd::Pid::from_raw(child.id() as libc::pid_t);
                let _ = nix::sys::signal::killpg(group, nix::sys::signal::Signal::SIGKILL);
                let _ = child.kill();
                let _ = child.wait();
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(s: &str) -> Vec<String> {
        s.split_whitespace().map(str::to_string).collect()
    }

    #[test]
    fn attributes() {
        let s = Settings::parse(&args("user=nobody argv=/usr/bin/python3 /p.py -x"), None).unwrap();
        assert_eq!(s.argv, args("/usr/bin/python3 /p.py -x"));
        assert!(Settings::parse(&args("user=root argv=/bin/true"), None)
            .unwrap_err()
            .contains("root"));
        assert!(Settings::parse(&args("argv=/bin/true"), None)
            .unwrap_err()
            .contains("user="));
        assert!(Settings::parse(&args("user=nobody"), None)
            .unwrap_err()
            .contains("argv="));
        assert!(Settings::parse(&args("user=nobody flags=R argv=/bin/true"), None).is_err());
    }
}
