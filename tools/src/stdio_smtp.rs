//! `sendmail -bs`: an SMTP session on standard input and output.
//!
//! Programs that speak SMTP to a pipe (git send-email with
//! `--smtp-server=/usr/sbin/sendmail`, some MUAs) get a small ESMTP server
//! (RFC 5321: HELO, EHLO, MAIL, RCPT, DATA, RSET, NOOP, QUIT; DSN
//! parameters RET, ENVID, NOTIFY, ORCPT) whose every message goes into
//! `maildrop/` exactly as `sendmail` would put it (directly or through
//! postdrop), answered 250 only once it is on disk.

use crate::maildrop::{Drop, Submission};
use crate::sendmail::{parse_notify, valid_envid};
use postern_common::qfile::{attr, Recipient};
use std::io::{BufRead, Write};

/// Most recipients one transaction takes.
const RECIPIENT_LIMIT: usize = 1000;

struct Session<W: Write> {
    out: W,
    hostname: String,
    sender: Option<String>,
    attrs: Vec<(String, String)>,
    recipients: Vec<Recipient>,
    helo: bool,
}

impl<W: Write> Session<W> {
    fn reply(&mut self, text: &str) {
        let _ = self.out.write_all(text.as_bytes());
        let _ = self.out.write_all(b"\r\n");
        let _ = self.out.flush();
    }

    fn reset(&mut self) {
        self.sender = None;
        self.attrs.clear();
        self.recipients.clear();
    }
}

/// `<addr>` and the parameters after it, from a MAIL FROM:/RCPT TO: argument.
fn path_and_params(arg: &str) -> Option<(String, Vec<(String, String)>)> {
    let arg = arg.trim();
    let (path, rest) = if let Some(r) = arg.strip_prefix('<') {
        let end = r.find('>')?;
        (&r[..end], &r[end + 1..])
    } else {
        // Tolerate a bare address, as Postfix does by default.
        match arg.split_once(' ') {
            Some((p, r)) => (p, r),
            None => (arg, ""),
        }
    };
    // A source route (@a,@b:user@c) keeps only the mailbox.
    let path = path.rsplit(':').next().unwrap_or(path).trim();
    if path
        .bytes()
        .any(|b| b < 32 || b == 127 || b == b'<' || b == b'>')
    {
        return None;
    }
    let params = rest
        .split_whitespace()
        .map(|p| match p.split_once('=') {
            Some((k, v)) => (k.to_ascii_uppercase(), v.to_string()),
            None => (p.to_ascii_uppercase(), String::new()),
        })
        .collect();
    Some((path.to_string(), params))
}

/// Decodes RFC 3461 xtext (`+XX` hex escapes).
fn xtext(v: &str) -> Option<String> {
    let b = v.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'+' {
            let hex = std::str::from_utf8(b.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// Runs the session until QUIT or end of input; exits 0.
pub fn run(cfg: &postern_conf::Config, default_sender: &str) -> ! {
    let stdin = std::io::stdin();
    let input = stdin.lock();
    let out = std::io::BufWriter::new(std::io::stdout().lock());
    serve(cfg, default_sender, input, out);
    std::process::exit(crate::sysexits::EX_OK)
}

/// One session on any reader and writer.
pub fn serve<R: BufRead, W: Write>(
    cfg: &postern_conf::Config,
    _default_sender: &str,
    mut input: R,
    out: W,
) {
    let limit = cfg.get_u64("message_size_limit").unwrap_or(10240000);
    let mut s = Session {
        out,
        hostname: cfg.get("myhostname"),
        sender: None,
        attrs: Vec::new(),
        recipients: Vec::new(),
        helo: false,
    };
    let greeting = format!("220 {} ESMTP {}", s.hostname, cfg.get("mail_name"));
    s.reply(&greeting);
    let mut line = Vec::new();
    loop {
        line.clear();
        match std::io::Read::take(&mut input, 4096).read_until(b'\n', &mut line) {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        let text = String::from_utf8_lossy(&line);
        let text = text.trim_end_matches(['\r', '\n']);
        let (verb, arg) = match text.split_once(' ') {
            Some((v, a)) => (v.to_ascii_uppercase(), a.to_string()),
            None => (text.to_ascii_uppercase(), String::new()),
        };
        match verb.as_str() {
            "HELO" | "EHLO" if arg.trim().is_empty() => {
                s.reply("501 5.5.4 Syntax: HELO/EHLO hostname")
            }
            "HELO" => {
                s.reset();
                s.helo = true;
                let r = format!("250 {}", s.hostname);
                s.reply(&r);
            }
            "EHLO" => {
                s.reset();
                s.helo = true;
                let r = format!(
                    "250-{}\r\n250-PIPELINING\r\n250-SIZE {limit}\r\n250-8BITMIME\r\n\
                     250-ENHANCEDSTATUSCODES\r\n250 DSN",
                    s.hostname
                );
                s.reply(&r);
            }
            "MAIL" => {
                if s.sender.is_some() {
                    s.reply("503 5.5.1 Error: nested MAIL command");
                    continue;
                }
                let Some(a) = strip_keyword(&arg, "FROM:") else {
                    s.reply("501 5.5.4 Syntax: MAIL FROM:<address>");
                    continue;
                };
                let Some((path, params)) = path_and_params(a) else {
                    s.reply("501 5.1.7 Bad sender address syntax");
                    continue;
                };
                let mut attrs = Vec::new();
                let mut bad = None;
                for (k, v) in params {
                    match k.as_str() {
                        "SIZE" => {
                            if v.parse::<u64>()
                                .map(|n| limit > 0 && n > limit)
                                .unwrap_or(false)
                            {
                                bad = Some("552 5.3.4 Message size exceeds fixed limit");
                            }
                        }
                        "BODY" | "SMTPUTF8" | "AUTH" => {}
                        "RET" => match v.to_ascii_uppercase().as_str() {
                            "FULL" | "HDRS" => {
                                attrs.push((attr::RET.to_string(), v.to_ascii_uppercase()))
                            }
                            _ => bad = Some("501 5.5.4 Bad RET parameter syntax"),
                        },
                        "ENVID" => match xtext(&v) {
                            Some(e) if valid_envid(&e) => attrs.push((attr::ENVID.to_string(), e)),
                            _ => bad = Some("501 5.5.4 Bad ENVID parameter syntax"),
                        },
                        _ => bad = Some("555 5.5.4 Unsupported option"),
                    }
                }
                if let Some(b) = bad {
                    s.reply(b);
                    continue;
                }
                s.sender = Some(path);
                s.attrs = attrs;
                s.reply("250 2.1.0 Ok");
            }
            "RCPT" => {
                if s.sender.is_none() {
                    s.reply("503 5.5.1 Error: need MAIL command");
                    continue;
                }
                let Some(a) = strip_keyword(&arg, "TO:") else {
                    s.reply("501 5.5.4 Syntax: RCPT TO:<address>");
                    continue;
                };
                let Some((path, params)) = path_and_params(a) else {
                    s.reply("501 5.1.3 Bad recipient address syntax");
                    continue;
                };
                if path.is_empty() {
                    s.reply("501 5.1.3 Bad recipient address syntax");
                    continue;
                }
                if s.recipients.len() >= RECIPIENT_LIMIT {
                    s.reply("452 4.5.3 Error: too many recipients");
                    continue;
                }
                let mut r = Recipient::new(&path);
                let mut bad = None;
                for (k, v) in params {
                    match k.as_str() {
                        "NOTIFY" => match parse_notify(&v) {
                            Ok(n) => r.notify = n,
                            Err(_) => bad = Some("501 5.5.4 Bad NOTIFY parameter syntax"),
                        },
                        "ORCPT" => match xtext(&v) {
                            Some(o) if o.contains(';') && !o.bytes().any(|b| b < 32) => r.orcpt = o,
                            _ => bad = Some("501 5.5.4 Bad ORCPT parameter syntax"),
                        },
                        _ => bad = Some("555 5.5.4 Unsupported option"),
                    }
                }
                if let Some(b) = bad {
                    s.reply(b);
                    continue;
                }
                s.recipients.push(r);
                s.reply("250 2.1.5 Ok");
            }
            "DATA" => {
                if !arg.trim().is_empty() {
                    s.reply("501 5.5.4 Syntax: DATA");
                    continue;
                }
                if s.sender.is_none() {
                    s.reply("503 5.5.1 Error: need MAIL command");
                    continue;
                }
                if s.recipients.is_empty() {
                    s.reply("554 5.5.1 Error: no valid recipients");
                    continue;
                }
                let sub = Submission {
                    sender: s.sender.clone().unwrap_or_default(),
                    recipients: std::mem::take(&mut s.recipients),
                    attrs: std::mem::take(&mut s.attrs),
                };
                s.reset();
                let mut d = match Drop::open(cfg, &sub, true) {
                    Ok(d) => Some(d),
                    Err(f) => {
                        let r = format!("451 4.3.0 Error: {}", f.reason);
                        s.reply(&r);
                        continue;
                    }
                };
                s.reply("354 End data with <CR><LF>.<CR><LF>");
                let mut error: Option<String> = None;
                let mut ended = false;
                loop {
                    line.clear();
                    match std::io::Read::take(&mut input, 1 << 20).read_until(b'\n', &mut line) {
                        Ok(0) | Err(_) => break,
                        Ok(_) => {}
                    }
                    if line.ends_with(b"\r\n") {
                        line.truncate(line.len() - 2);
                        line.push(b'\n');
                    }
                    if line == b".\n" {
                        ended = true;
                        break;
                    }
                    let data = if line.starts_with(b".") {
                        &line[1..]
                    } else {
                        &line[..]
                    };
                    if let Some(dd) = d.as_mut() {
                        if let Err(f) = dd.content(data) {
                            error = Some(if f.reason.contains("too big") {
                                "552 5.3.4 Error: message file too big".into()
                            } else {
                                format!("451 4.3.0 Error: {}", f.reason)
                            });
                            d = None;
                        }
                    }
                }
                if !ended {
                    // Input ended inside DATA: nothing is queued.
                    if let Some(mut dd) = d {
                        dd.abort();
                    }
                    return;
                }
                match (error, d) {
                    (Some(e), _) => s.reply(&e),
                    (None, Some(dd)) => match dd.finish() {
                        Ok(()) => s.reply("250 2.0.0 Ok: queued"),
                        Err(f) => {
                            let r = format!("451 4.3.0 Error: {}", f.reason);
                            s.reply(&r)
                        }
                    },
                    (None, None) => s.reply("451 4.3.0 Error: internal error"),
                }
            }
            "RSET" => {
                s.reset();
                s.reply("250 2.0.0 Ok");
            }
            "NOOP" => s.reply("250 2.0.0 Ok"),
            "VRFY" => s.reply("252 2.0.0 Send some mail, I'll try my best"),
            "QUIT" => {
                s.reply("221 2.0.0 Bye");
                return;
            }
            "" => s.reply("500 5.5.2 Error: bad syntax"),
            _ => s.reply("502 5.5.2 Error: command not recognized"),
        }
    }
}

/// `FROM:<x>` → `<x>`, case-insensitively, allowing a space after the colon.
fn strip_keyword<'a>(arg: &'a str, kw: &str) -> Option<&'a str> {
    let a = arg.trim_start();
    if a.len() >= kw.len() && a[..kw.len()].eq_ignore_ascii_case(kw) {
        Some(a[kw.len()..].trim_start())
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_and_xtext() {
        let (p, params) = path_and_params("<a@b.test> RET=HDRS ENVID=x+2By").unwrap();
        assert_eq!(p, "a@b.test");
        assert_eq!(params[0], ("RET".into(), "HDRS".into()));
        assert_eq!(xtext("x+2By").as_deref(), Some("x+y"));
        assert_eq!(path_and_params("<>").unwrap().0, "");
        assert_eq!(path_and_params("<@r.test:u@x.test>").unwrap().0, "u@x.test");
        assert_eq!(strip_keyword("from: <x>", "FROM:"), Some("<x>"));
    }
}
