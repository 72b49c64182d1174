//! master.cf: one service per logical line, eight columns and a command.
//!
//! `service type private unpriv chroot wakeup maxproc command [args]`, with
//! `-` for a column's default, indented continuation lines, `#` comments,
//! and `-o name=value` (or `-o { name = value }`) overrides in the
//! arguments. An inet service may be `port`, `host:port` or `[v6]:port`.

use crate::ConfError;
use std::path::Path;

/// How a service listens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ServiceType {
    /// A TCP listener (`host:port` or `port`).
    Inet,
    /// A Unix stream socket in `private/` or `public/`.
    Unix,
    /// A named pipe in `private/` or `public/` (accepted for Postfix
    /// compatibility; served as a Unix socket of the same name).
    Fifo,
    /// A Unix datagram socket (Postfix's `postlog`): parsed, never run
    /// (see [`Service::role`]).
    UnixDgram,
    /// A Unix socket in `private/` or `public/` to which postscreen
    /// passes the client connections it lets through (`smtpd pass ...`):
    /// the program receives each connection's descriptor (SCM_RIGHTS).
    Pass,
}

impl ServiceType {
    /// The word in master.cf's type column.
    pub fn word(self) -> &'static str {
        match self {
            ServiceType::Inet => "inet",
            ServiceType::Unix => "unix",
            ServiceType::Fifo => "fifo",
            ServiceType::UnixDgram => "unix-dgram",
            ServiceType::Pass => "pass",
        }
    }
}

/// What qmgr does itself for a transport whose master.cf command is one
/// of Postfix's pseudo delivery agents (error(8), discard(8)): qmgr maps a
/// transport to its behaviour by that command, not by the service's name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TransportBehaviour {
    /// error(8): the recipient bounces with the next hop as the reason.
    Bounce,
    /// error(8) under the service name `retry`: the recipient is deferred.
    Defer,
    /// discard(8): the recipient is dropped as delivered.
    Discard,
}

/// What Postern does with one master.cf service line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// master runs the command (a Postern daemon, or another program).
    Run,
    /// No process: qmgr delivers for this transport itself.
    Transport(TransportBehaviour),
    /// No process: the job is done elsewhere in Postern (the text says
    /// where), or the service is not offered.
    Elsewhere(&'static str),
}

/// One master.cf service line.
#[derive(Debug, Clone, PartialEq)]
pub struct Service {
    /// As written in the first column (`smtp`, `127.0.0.1:2525`, `pickup`).
    pub name: String,
    pub kind: ServiceType,
    /// Socket in `private/` (true) or `public/` (false). Ignored for inet.
    pub private: bool,
    /// Run as `mail_owner` (true) or keep the privileges of master.
    pub unpriv: bool,
    pub chroot: bool,
    /// Seconds between wake-up requests that master sends; 0 = none.
    pub wakeup: u64,
    /// Wake up only after the service was first used (`60?`).
    pub wakeup_after_use: bool,
    /// Most processes at once; 0 = no limit.
    pub maxproc: u32,
    /// The program (`smtpd`), found in `daemon_directory` unless absolute.
    pub command: String,
    /// Arguments other than `-o` overrides.
    pub args: Vec<String>,
    /// `-o name=value` overrides, in order.
    pub overrides: Vec<(String, String)>,
    pub line: usize,
}

impl Service {
    /// The name a log line or a socket uses: the first column, except that
    /// for inet services it is the port part.
    pub fn socket_name(&self) -> &str {
        &self.name
    }

    /// For an inet service, the host part (`None` = all of
    /// `inet_interfaces`) and the port or service name.
    pub fn inet_address(&self) -> (Option<String>, String) {
        split_host_port(&self.name)
    }

    /// What Postern makes of this line: Postfix's services whose work is
    /// done inside Postern's own daemons are accepted and not run.
    pub fn role(&self) -> Role {
        match self.command.as_str() {
            "error" if self.name == "retry" => Role::Transport(TransportBehaviour::Defer),
            "error" => Role::Transport(TransportBehaviour::Bounce),
            "discard" => Role::Transport(TransportBehaviour::Discard),
            "postscreen" if self.kind == ServiceType::Inet => Role::Run,
            "postscreen" => Role::Elsewhere("postscreen serves inet services only"),
            "dnsblog" => Role::Elsewhere("DNSBL lookups: postscreen makes them itself"),
            "tlsproxy" => Role::Elsewhere(
                "TLS proxy: postscreen and smtpd do STARTTLS themselves (rustls)",
            ),
            "tlsmgr" => Role::Elsewhere("TLS session cache: kept inside each smtpd and smtp process"),
            "trivial-rewrite" => Role::Elsewhere(
                "address rewriting and resolution: cleanup, and the resolver shared by qmgr, smtpd and sendmail -bv",
            ),
            "bounce" => Role::Elsewhere(
                "bounce, defer and trace logs and notices: the delivery agents and qmgr",
            ),
            "showq" => Role::Elsewhere("queue listing: postqueue -p and mailq read the queue"),
            "scache" => Role::Elsewhere("connection cache: kept inside each smtp process"),
            "postlogd" => Role::Elsewhere(
                "logging: each daemon writes syslog or maillog_file itself",
            ),
            "flush" => Role::Elsewhere(
                "fast flush: postqueue -f and sendmail -q have qmgr retry the deferred queue",
            ),
            "qmqpd" => Role::Elsewhere("QMQP is not offered: service ignored"),
            _ => Role::Run,
        }
    }

    /// Why Postern cannot honour this service as Postfix would run it
    /// (`postern check` and `postern start` refuse the configuration);
    /// `None` when it can (run, or done elsewhere without a difference).
    pub fn unsupported(&self) -> Option<&'static str> {
        match self.command.as_str() {
            "qmqpd" => Some("QMQP is not offered"),
            "oqmgr" => Some("the old queue manager is not offered: qmgr schedules"),
            _ => None,
        }
    }

    /// The program master runs for this service, `None` when it runs
    /// none (see [`Service::role`]).
    pub fn program(&self) -> Option<&str> {
        match self.role() {
            Role::Run => Some(&self.command),
            Role::Transport(_) | Role::Elsewhere(_) => None,
        }
    }

    /// One line saying what becomes of a service that is not run as
    /// written (master logs it at start, `postern check` prints it);
    /// `None` for a service run as written.
    pub fn note(&self) -> Option<String> {
        let what = match self.role() {
            Role::Run => return None,
            Role::Transport(TransportBehaviour::Bounce) => {
                "not run: qmgr bounces mail for this transport itself (error)".to_string()
            }
            Role::Transport(TransportBehaviour::Defer) => {
                "not run: qmgr defers mail for this transport itself (retry)".to_string()
            }
            Role::Transport(TransportBehaviour::Discard) => {
                "not run: qmgr discards mail for this transport itself".to_string()
            }
            Role::Elsewhere(text) => format!("not run: {text}"),
        };
        Some(format!(
            "master.cf, line {}: service {}/{} ({}): {what}",
            self.line,
            self.name,
            self.kind.word(),
            self.command
        ))
    }
}

/// The services master runs, each with the program it runs as its
/// command.
pub fn runnable(services: Vec<Service>) -> Vec<Service> {
    services
        .into_iter()
        .filter_map(|mut s| {
            let program = s.program()?.to_string();
            s.command = program;
            Some(s)
        })
        .collect()
}

/// The `pass` service postscreen hands its clients to: the one named
/// `smtpd` (Postfix's `smtpd_service_name`), else the only one.
pub fn smtpd_pass_service(services: &[Service]) -> Option<&Service> {
    let passes: Vec<&Service> = services
        .iter()
        .filter(|s| s.kind == ServiceType::Pass)
        .collect();
    passes
        .iter()
        .find(|s| s.name == "smtpd")
        .or_else(|| (passes.len() == 1).then(|| &passes[0]))
        .copied()
}

/// The transports qmgr handles itself, by master.cf service name.
pub fn transport_behaviours(services: &[Service]) -> Vec<(String, TransportBehaviour)> {
    services
        .iter()
        .filter(|s| s.kind == ServiceType::Unix)
        .filter_map(|s| match s.role() {
            Role::Transport(b) => Some((s.name.clone(), b)),
            _ => None,
        })
        .collect()
}

/// Splits `host:port`, `[v6addr]:port` or `port`.
pub fn split_host_port(s: &str) -> (Option<String>, String) {
    if let Some(rest) = s.strip_prefix('[') {
        if let Some((host, port)) = rest.split_once("]:") {
            return (Some(host.to_string()), port.to_string());
        }
    }
    match s.rsplit_once(':') {
        Some((h, p)) if !h.contains(':') => (Some(h.to_string()), p.to_string()),
        _ => (None, s.to_string()),
    }
}

fn bool_col(v: &str, default: bool, file: &Path, line: usize) -> Result<bool, ConfError> {
    match v {
        "-" => Ok(default),
        "y" | "yes" => Ok(true),
        "n" | "no" => Ok(false),
        _ => Err(ConfError::Syntax {
            file: file.display().to_string(),
            line,
            reason: format!("bad boolean field \"{v}\": expected y, n or -"),
        }),
    }
}

/// Parses master.cf text. `default_process_limit` fills a `-` maxproc.
pub fn parse(
    text: &str,
    file: &Path,
    default_process_limit: u32,
) -> Result<Vec<Service>, ConfError> {
    let mut out = Vec::new();
    for (line, l) in logical_lines(text, file)? {
        out.push(parse_service(&l, file, line, default_process_limit)?);
    }
    // Two services of one type with one name would fight over one socket.
    for (i, a) in out.iter().enumerate() {
        if out[..i]
            .iter()
            .any(|b| b.name == a.name && b.kind == a.kind)
        {
            return Err(ConfError::Syntax {
                file: file.display().to_string(),
                line: a.line,
                reason: format!("duplicate service {}/{:?}", a.name, a.kind),
            });
        }
    }
    Ok(out)
}

/// The logical lines of master.cf, each with the number of its first
/// line: continuation lines joined, blank lines and comments left out.
fn logical_lines(text: &str, file: &Path) -> Result<Vec<(usize, String)>, ConfError> {
    let mut logical: Vec<(usize, String)> = Vec::new();
    for (idx, raw) in text.lines().enumerate() {
        let t = raw.trim();
        if t.is_empty() || t.starts_with('#') {
            continue;
        }
        if raw.starts_with([' ', '\t']) {
            if let Some(last) = logical.last_mut() {
                last.1.push(' ');
                last.1.push_str(t);
                continue;
            }
            return Err(ConfError::Syntax {
                file: file.display().to_string(),
                line: idx + 1,
                reason: "continuation line without a service before it".into(),
            });
        }
        logical.push((idx + 1, t.to_string()));
    }
    Ok(logical)
}

/// One service from its logical line `l`, which starts at line `line`.
fn parse_service(
    l: &str,
    file: &Path,
    line: usize,
    default_process_limit: u32,
) -> Result<Service, ConfError> {
    let err = |reason: String| ConfError::Syntax {
        file: file.display().to_string(),
        line,
        reason,
    };
    let fields = crate::split_braced(l, false);
    if fields.len() < 8 {
        return Err(err(format!(
            "expected 8 or more fields, found {}",
            fields.len()
        )));
    }
    let kind = match fields[1].as_str() {
        "inet" => ServiceType::Inet,
        "unix" => ServiceType::Unix,
        "fifo" => ServiceType::Fifo,
        "unix-dgram" => ServiceType::UnixDgram,
        "pass" => ServiceType::Pass,
        other => return Err(err(format!("unsupported service type \"{other}\""))),
    };
    let private = bool_col(&fields[2], true, file, line)?;
    let unpriv = bool_col(&fields[3], true, file, line)?;
    let chroot = bool_col(&fields[4], false, file, line)?;
    let (wakeup, wakeup_after_use) = match fields[5].as_str() {
        "-" => (0, false),
        w => {
            let (num, q) = match w.strip_suffix('?') {
                Some(n) => (n, true),
                None => (w, false),
            };
            let n: u64 = num
                .parse()
                .map_err(|_| err(format!("bad wakeup time \"{w}\"")))?;
            (n, q)
        }
    };
    let maxproc = match fields[6].as_str() {
        "-" => default_process_limit,
        m => m
            .parse()
            .map_err(|_| err(format!("bad process limit \"{m}\"")))?,
    };
    let (args, overrides) = command_arguments(&fields[8..]).map_err(err)?;
    Ok(Service {
        name: fields[0].clone(),
        kind,
        private,
        unpriv,
        chroot,
        wakeup,
        wakeup_after_use,
        maxproc,
        command: fields[7].clone(),
        args,
        overrides,
        line,
    })
}

/// A command's plain arguments, and its `-o` overrides.
type Arguments = (Vec<String>, Vec<(String, String)>);

/// The command's arguments after its name: the plain ones, and the
/// `-o name=value` (`-oname=value`, `-o { name = value }`) overrides.
fn command_arguments(fields: &[String]) -> Result<Arguments, String> {
    let mut args = Vec::new();
    let mut overrides = Vec::new();
    let mut i = 0;
    while i < fields.len() {
        let a = &fields[i];
        if a == "-o" {
            let Some(v) = fields.get(i + 1) else {
                return Err("-o without name=value".into());
            };
            let v = v.trim_start_matches('{').trim_end_matches('}').trim();
            let Some((n, val)) = v.split_once('=') else {
                return Err(format!("-o \"{v}\": expected name=value"));
            };
            overrides.push((n.trim().to_string(), val.trim().to_string()));
            i += 2;
        } else if let Some(v) = a.strip_prefix("-o") {
            let Some((n, val)) = v.split_once('=') else {
                return Err(format!("-o \"{v}\": expected name=value"));
            };
            overrides.push((n.trim().to_string(), val.trim().to_string()));
            i += 1;
        } else {
            args.push(a.clone());
            i += 1;
        }
    }
    Ok((args, overrides))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_lines() {
        let t = "smtp      inet  n       -       n       -       -       smtpd\n\
                 pickup    unix  n       -       n       60      1       pickup\n\
                 127.0.0.1:2525 inet n - n - - smtpd\n  -o smtpd_tls_wrappermode=yes -o { smtpd_banner = a b }\n";
        let s = parse(t, Path::new("master.cf"), 100).unwrap();
        assert_eq!(s.len(), 3);
        assert!(!s[0].private && s[0].unpriv && !s[0].chroot);
        assert_eq!(s[0].maxproc, 100);
        assert_eq!(s[1].wakeup, 60);
        assert_eq!(s[1].maxproc, 1);
        assert_eq!(
            s[2].inet_address(),
            (Some("127.0.0.1".into()), "2525".into())
        );
        assert_eq!(
            s[2].overrides,
            vec![
                ("smtpd_tls_wrappermode".into(), "yes".into()),
                ("smtpd_banner".into(), "a b".into())
            ]
        );
    }

    /// The service lines of Postfix 3.7's stock master.cf (Debian's
    /// /usr/share/postfix/master.cf.dist), with postscreen enabled.
    const STOCK: &str = "\
smtp      inet  n       -       y       -       1       postscreen
smtpd     pass  -       -       y       -       -       smtpd
dnsblog   unix  -       -       y       -       0       dnsblog
tlsproxy  unix  -       -       y       -       0       tlsproxy
pickup    unix  n       -       y       60      1       pickup
cleanup   unix  n       -       y       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
tlsmgr    unix  -       -       y       1000?   1       tlsmgr
rewrite   unix  -       -       y       -       -       trivial-rewrite
bounce    unix  -       -       y       -       0       bounce
defer     unix  -       -       y       -       0       bounce
trace     unix  -       -       y       -       0       bounce
verify    unix  -       -       y       -       1       verify
flush     unix  n       -       y       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
proxywrite unix -       -       n       -       1       proxymap
smtp      unix  -       -       y       -       -       smtp
relay     unix  -       -       y       -       -       smtp
        -o syslog_name=postfix/$service_name
showq     unix  n       -       y       -       -       showq
error     unix  -       -       y       -       -       error
retry     unix  -       -       y       -       -       error
discard   unix  -       -       y       -       -       discard
local     unix  -       n       n       -       -       local
virtual   unix  -       n       n       -       -       virtual
lmtp      unix  -       -       y       -       -       lmtp
anvil     unix  -       -       y       -       1       anvil
scache    unix  -       -       y       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
maildrop  unix  -       n       n       -       -       pipe
  flags=DRXhu user=vmail argv=/usr/bin/maildrop -d ${recipient}
uucp      unix  -       n       n       -       -       pipe
  flags=Fqhu user=uucp argv=uux -r -n -z -a$sender - $nexthop!rmail ($recipient)
";

    #[test]
    fn stock_master_cf_roles() {
        let s = parse(STOCK, Path::new("master.cf"), 100).unwrap();
        let by = |name: &str, kind: ServiceType| {
            s.iter()
                .find(|x| x.name == name && x.kind == kind)
                .unwrap()
                .clone()
        };
        assert_eq!(
            by("postlog", ServiceType::UnixDgram).role(),
            Role::Elsewhere("logging: each daemon writes syslog or maillog_file itself")
        );
        assert_eq!(by("smtp", ServiceType::Inet).program(), Some("postscreen"));
        assert_eq!(by("smtpd", ServiceType::Pass).program(), Some("smtpd"));
        assert_eq!(by("smtp", ServiceType::Unix).program(), Some("smtp"));
        assert_eq!(by("maildrop", ServiceType::Unix).program(), Some("pipe"));
        assert_eq!(
            by("maildrop", ServiceType::Unix).args,
            vec![
                "flags=DRXhu",
                "user=vmail",
                "argv=/usr/bin/maildrop",
                "-d",
                "${recipient}"
            ]
        );
        for name in [
            "tlsmgr", "rewrite", "bounce", "defer", "trace", "flush", "showq", "scache", "dnsblog",
            "tlsproxy",
        ] {
            let x = by(name, ServiceType::Unix);
            assert!(matches!(x.role(), Role::Elsewhere(_)), "{name}");
            assert!(x.note().unwrap().contains(&format!("service {name}/unix")));
        }
        for name in [
            "pickup", "cleanup", "qmgr", "local", "virtual", "lmtp", "anvil", "relay", "verify",
        ] {
            assert_eq!(by(name, ServiceType::Unix).role(), Role::Run, "{name}");
            assert_eq!(by(name, ServiceType::Unix).note(), None);
        }
        assert_eq!(
            transport_behaviours(&s),
            vec![
                ("error".to_string(), TransportBehaviour::Bounce),
                ("retry".to_string(), TransportBehaviour::Defer),
                ("discard".to_string(), TransportBehaviour::Discard),
            ]
        );
        // By command, whatever the name.
        let t = "oops unix - - n - - error\nbin unix - - n - - discard\n";
        let s = parse(t, Path::new("master.cf"), 100).unwrap();
        assert_eq!(
            transport_behaviours(&s),
            vec![
                ("oops".to_string(), TransportBehaviour::Bounce),
                ("bin".to_string(), TransportBehaviour::Discard),
            ]
        );
    }

    #[test]
    fn too_few_fields() {
        let e = parse("smtp inet n\n", Path::new("m.cf"), 100).unwrap_err();
        assert!(e.to_string().contains("m.cf, line 1"));
    }
}
