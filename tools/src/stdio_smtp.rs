//! `sendmail -bs`: an SMTP session on standard input and output.
//!
//! Programs that speak SMTP to a pipe (git send-email with
//! `--smtp-server=/usr/sbin/sendmail`, some MUAs) get a small ESMTP server
//! (RFC 5321: HELO, EHLO, MAIL, RCPT, DATA, RSET, NOOP, VRFY, QUIT; DSN
//! parameters RET, ENVID, NOTIFY, ORCPT) whose every message goes into
//! `maildrop/` exactly as `sendmail` would put it (directly or through
//! postdrop), answered 250 only once it is on disk.
//!
//! Commands are read with smtpd's grammar ([`postern_common::smtp_command`]):
//! what smtpd refuses as syntax, this refuses with the same reply. As
//! Postfix's stand-alone smtpd, it applies no access restrictions.

use crate::maildrop::{Drop, Submission};
use postern_common::qfile::{attr, Recipient};
use postern_common::smtp_command::{self, Offered, Token, Verb};
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

/// The address of a MAIL FROM/RCPT TO path word, or None.
fn path_address(tok: &Token) -> Option<String> {
    if tok.unterminated {
        return None;
    }
    smtp_command::extract_address(&tok.text).ok()
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
        let args = smtp_command::tokenize(text);
        let Some(first) = args.first() else {
            s.reply("500 5.5.2 Error: bad syntax");
            continue;
        };
        let Some(verb) = Verb::parse(&first.text) else {
            s.reply("500 5.5.2 Error: command not recognized");
            continue;
        };
        match verb {
            Verb::Helo | Verb::Ehlo if args.len() < 2 => s.reply(if verb == Verb::Ehlo {
                "501 Syntax: EHLO hostname"
            } else {
                "501 Syntax: HELO hostname"
            }),
            Verb::Helo => {
                s.reset();
                s.helo = true;
                let r = format!("250 {}", s.hostname);
                s.reply(&r);
            }
            Verb::Ehlo => {
                s.reset();
                s.helo = true;
                let r = format!(
                    "250-{}\r\n250-PIPELINING\r\n250-SIZE {limit}\r\n250-8BITMIME\r\n\
                     250-ENHANCEDSTATUSCODES\r\n250 DSN",
                    s.hostname
                );
                s.reply(&r);
            }
            Verb::Mail => {
                if s.sender.is_some() {
                    s.reply("503 5.5.1 Error: nested MAIL command");
                    continue;
                }
                let Some((path, params)) = smtp_command::path_command(&args, "from:") else {
                    s.reply("501 5.5.4 Syntax: MAIL FROM:<address>");
                    continue;
                };
                let Some(sender) = path_address(path) else {
                    s.reply("501 5.1.7 Bad sender address syntax");
                    continue;
                };
                // SMTPUTF8 is taken as smtpd takes it; pickup's
                // smtputf8_autodetect_classes decides what it means here.
                let offered = Offered {
                    auth: false,
                    smtputf8: cfg.get_bool("smtputf8_enable").unwrap_or(true),
                };
                let options = match smtp_command::mail_params(&params, offered) {
                    Ok(o) => o,
                    Err(e) => {
                        s.reply(&e.reply());
                        continue;
                    }
                };
                if limit > 0 && options.size > limit {
                    s.reply("552 5.3.4 Message size exceeds fixed limit");
                    continue;
                }
                let mut attrs = Vec::new();
                if let Some(r) = options.ret {
                    attrs.push((attr::RET.to_string(), r.to_string()));
                }
                if let Some(e) = options.envid {
                    attrs.push((attr::ENVID.to_string(), e));
                }
                s.sender = Some(sender);
                s.attrs = attrs;
                s.reply("250 2.1.0 Ok");
            }
            Verb::Rcpt => {
                if s.sender.is_none() {
                    s.reply("503 5.5.1 Error: need MAIL command");
                    continue;
                }
                let Some((path, params)) = smtp_command::path_command(&args, "to:") else {
                    s.reply("501 5.5.4 Syntax: RCPT TO:<address>");
                    continue;
                };
                let Some(address) = path_address(path).filter(|a| !a.is_empty()) else {
                    s.reply("501 5.1.3 Bad recipient address syntax");
                    continue;
                };
                let options = match smtp_command::rcpt_params(&params) {
                    Ok(o) => o,
                    Err(e) => {
                        s.reply(&e.reply());
                        continue;
                    }
                };
                if s.recipients.len() >= RECIPIENT_LIMIT {
                    s.reply("452 4.5.3 Error: too many recipients");
                    continue;
                }
                s.recipients.push(Recipient {
                    notify: options.notify,
                    orcpt: options.orcpt,
                    ..Recipient::new(&address)
                });
                s.reply("250 2.1.5 Ok");
            }
            Verb::Data => {
                if args.len() > 1 {
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
            Verb::Rset => {
                s.reset();
                s.reply("250 2.0.0 Ok");
            }
            Verb::Noop => s.reply("250 2.0.0 Ok"),
            Verb::Vrfy => s.reply("252 2.0.0 Send some mail, I'll try my best"),
            Verb::Quit => {
                s.reply("221 2.0.0 Bye");
                return;
            }
            Verb::Help => {
                s.reply("214 2.0.0 Commands: DATA EHLO HELO HELP MAIL NOOP QUIT RCPT RSET VRFY")
            }
            // Not offered on a pipe: no TLS, no SASL, no BDAT or ETRN.
            Verb::StartTls | Verb::Auth | Verb::Bdat | Verb::Etrn => {
                s.reply("502 5.5.1 Error: command not implemented")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn path(line: &str) -> Option<String> {
        let args = smtp_command::tokenize(line);
        let (p, _) = smtp_command::path_command(&args, "from:")?;
        path_address(p)
    }

    #[test]
    fn paths() {
        assert_eq!(path("MAIL FROM:<a@b.test>").as_deref(), Some("a@b.test"));
        assert_eq!(path("MAIL FROM: <>").as_deref(), Some(""));
        assert_eq!(
            path("MAIL FROM:<@r.test:u@x.test>").as_deref(),
            Some("u@x.test")
        );
        assert_eq!(path("MAIL FROM:<a@b.test"), None);
        assert_eq!(path("MAIL FROM:<a b@c>"), None);
    }
}
