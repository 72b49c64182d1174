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
    // Join continuation lines into logical lines first.
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
    let mut out = Vec::new();
    for (line, l) in logical {
        let err = |reason: String| ConfError::Syntax {
            file: file.display().to_string(),
            line,
            reason,
        };
        let fields = crate::split_braced(&l, false);
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
        let command = fields[7].clone();
        let mut args = Vec::new();
        let mut overrides = Vec::new();
        let mut i = 8;
        while i < fields.len() {
            let a = &fields[i];
            if a == "-o" {
                let Some(v) = fields.get(i + 1) else {
                    return Err(err("-o without name=value".into()));
                };
                let v = v.trim_start_matches('{').trim_end_matches('}').trim();
                let Some((n, val)) = v.split_once('=') else {
                    return Err(err(format!("-o \"{v}\": expected name=value")));
                };
                overrides.push((n.trim().to_string(), val.trim().to_string()));
                i += 2;
            } else if let Some(v) = a.strip_prefix("-o") {
                let Some((n, val)) = v.split_once('=') else {
                    return Err(err(format!("-o \"{v}\": expected name=value")));
                };
                overrides.push((n.trim().to_string(), val.trim().to_string()));
                i += 1;
            } else {
                args.push(a.clone());
                i += 1;
            }
        }
        out.push(Service {
            name: fields[0].clone(),
            kind,
            private,
            unpriv,
            chroot,
            wakeup,
            wakeup_after_use,
            maxproc,
            command,
            args,
            overrides,
            line,
        });
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

    #[test]
    fn too_few_fields() {
        let e = parse("smtp inet n\n", Path::new("m.cf"), 100).unwrap_err();
        assert!(e.to_string().contains("m.cf, line 1"));
    }
}
