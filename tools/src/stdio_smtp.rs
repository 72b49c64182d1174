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
/// The longest command line read (smtpd's `line_length_limit` default,
/// 2048, with room for CRLF and more).
const COMMAND_LIMIT: u64 = 4096;

/// Reads and drops the rest of a line.
fn skip_line<R: BufRead>(input: &mut R) -> std::io::Result<()> {
    loop {
        let buf = input.fill_buf()?;
        if buf.is_empty() {
            return Ok(());
        }
        match buf.iter().position(|&b| b == b'\n') {
            Some(i) => {
                input.consume(i + 1);
                return Ok(());
            }
            None => {
                let n = buf.len();
                input.consume(n);
            }
        }
    }
}

pub fn serve<R: BufRead, W: Write>(
    cfg: &postern_conf::Config,
    _default_sender: &str,
    mut input: R,
    out: W,
) {
    let mut s = Session {
        out,
        hostname: cfg.get("myhostname"),
        sender: None,
        attrs: Vec::new(),
        recipients: Vec::new(),
        helo: false,
    };
    let limit = cfg.get_u64("message_size_limit").unwrap_or(10240000);
    let greeting = format!("220 {} ESMTP {}", s.hostname, cfg.get("mail_name"));
    s.reply(&greeting);
    let mut line = Vec::new();
    loop {
        line.clear();
        match std::io::Read::take(&mut input, COMMAND_LIMIT).read_until(b'\n', &mut line) {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        if !line.ends_with(b"\n") && line.len() as u64 == COMMAND_LIMIT {
            // As smtpd: the whole over-long line is one error, not the
            // start of a second command.
            if skip_line(&mut input).is_err() {
                return;
            }
            s.reply(&format!("500 5.5.2 {} Error: command too long", s.hostname));
            continue;
        }
        let text = String::from_utf8_lossy(&line);
        let text = text.trim_end_matches(['\r', '\n']);
        let args = smtp_command::tokenize(text);
        if s.command(cfg, limit, &args, &mut input) == Next::End {
            return;
        }
    }
}

/// Whether the session goes on after a command.
#[derive(PartialEq, Eq)]
enum Next {
    Command,
    End,
}

impl<W: Write> Session<W> {
    /// Answers one command line (its words `args`); DATA reads its
    /// content from `input`.
    fn command<R: BufRead>(
        &mut self,
        cfg: &postern_conf::Config,
        limit: u64,
        args: &[Token],
        input: &mut R,
    ) -> Next {
        let Some(first) = args.first() else {
            self.reply("500 5.5.2 Error: bad syntax");
            return Next::Command;
        };
        let Some(verb) = Verb::parse(&first.text) else {
            self.reply("500 5.5.2 Error: command not recognized");
            return Next::Command;
        };
        match verb {
            Verb::Helo | Verb::Ehlo if args.len() < 2 => self.reply(if verb == Verb::Ehlo {
                "501 Syntax: EHLO hostname"
            } else {
                "501 Syntax: HELO hostname"
            }),
            Verb::Helo => {
                self.reset();
                self.helo = true;
                let r = format!("250 {}", self.hostname);
                self.reply(&r);
            }
            Verb::Ehlo => {
                self.reset();
                self.helo = true;
                let r = format!(
                    "250-{}\r\n250-PIPELINING\r\n250-SIZE {limit}\r\n250-8BITMIME\r\n\
                     250-ENHANCEDSTATUSCODES\r\n250 DSN",
                    self.hostname
                );
                self.reply(&r);
            }
            Verb::Mail => self.mail(cfg, limit, args),
            Verb::Rcpt => self.rcpt(args),
            Verb::Data => return self.data(cfg, args, input),
            Verb::Rset => {
                self.reset();
                self.reply("250 2.0.0 Ok");
            }
            Verb::Noop => self.reply("250 2.0.0 Ok"),
            Verb::Vrfy => self.reply("252 2.0.0 Send some mail, I'll try my best"),
            Verb::Quit => {
                self.reply("221 2.0.0 Bye");
                return Next::End;
            }
            Verb::Help => {
                self.reply("214 2.0.0 Commands: DATA EHLO HELO HELP MAIL NOOP QUIT RCPT RSET VRFY")
            }
            // Not offered on a pipe: no TLS, no SASL, no BDAT or ETRN.
            Verb::StartTls | Verb::Auth | Verb::Bdat | Verb::Etrn => {
                self.reply("502 5.5.1 Error: command not implemented")
            }
        }
        Next::Command
    }

    /// MAIL FROM: starts a transaction.
    fn mail(&mut self, cfg: &postern_conf::Config, limit: u64, args: &[Token]) {
        if self.sender.is_some() {
            return self.reply("503 5.5.1 Error: nested MAIL command");
        }
        let Some((path, params)) = smtp_command::path_command(args, "from:") else {
            return self.reply("501 5.5.4 Syntax: MAIL FROM:<address>");
        };
        let Some(sender) = path_address(path) else {
            return self.reply("501 5.1.7 Bad sender address syntax");
        };
        // SMTPUTF8 is taken as smtpd takes it; pickup's
        // smtputf8_autodetect_classes decides what it means here.
        let offered = Offered {
            auth: false,
            smtputf8: cfg.get_bool("smtputf8_enable").unwrap_or(true),
            // RFC 8689: REQUIRETLS only over TLS, never on standard input.
            requiretls: false,
        };
        let options = match smtp_command::mail_params(&params, offered) {
            Ok(o) => o,
            Err(e) => return self.reply(&e.reply()),
        };
        if limit > 0 && options.size > limit {
            return self.reply("552 5.3.4 Message size exceeds fixed limit");
        }
        let mut attrs = Vec::new();
        if let Some(r) = options.ret {
            attrs.push((attr::RET.to_string(), r.to_string()));
        }
        if let Some(e) = options.envid {
            attrs.push((attr::ENVID.to_string(), e));
        }
        self.sender = Some(sender);
        self.attrs = attrs;
        self.reply("250 2.1.0 Ok");
    }

    /// RCPT TO: adds a recipient to the transaction.
    fn rcpt(&mut self, args: &[Token]) {
        if self.sender.is_none() {
            return self.reply("503 5.5.1 Error: need MAIL command");
        }
        let Some((path, params)) = smtp_command::path_command(args, "to:") else {
            return self.reply("501 5.5.4 Syntax: RCPT TO:<address>");
        };
        let Some(address) = path_address(path).filter(|a| !a.is_empty()) else {
            return self.reply("501 5.1.3 Bad recipient address syntax");
        };
        let options = match smtp_command::rcpt_params(&params) {
            Ok(o) => o,
            Err(e) => return self.reply(&e.reply()),
        };
        if self.recipients.len() >= RECIPIENT_LIMIT {
            return self.reply("452 4.5.3 Error: too many recipients");
        }
        self.recipients.push(Recipient {
            notify: options.notify,
            orcpt: options.orcpt,
            ..Recipient::new(&address)
        });
        self.reply("250 2.1.5 Ok");
    }

    /// DATA: the content goes into maildrop/, answered 250 once on disk.
    /// Input that ends inside the content ends the session, nothing queued.
    fn data<R: BufRead>(
        &mut self,
        cfg: &postern_conf::Config,
        args: &[Token],
        input: &mut R,
    ) -> Next {
        if args.len() > 1 {
            self.reply("501 5.5.4 Syntax: DATA");
            return Next::Command;
        }
        if self.sender.is_none() {
            self.reply("503 5.5.1 Error: need MAIL command");
            return Next::Command;
        }
        if self.recipients.is_empty() {
            self.reply("554 5.5.1 Error: no valid recipients");
            return Next::Command;
        }
        let sub = Submission {
            sender: self.sender.clone().unwrap_or_default(),
            recipients: std::mem::take(&mut self.recipients),
            attrs: std::mem::take(&mut self.attrs),
        };
        self.reset();
        let d = match Drop::open(cfg, &sub, true) {
            Ok(d) => d,
            Err(f) => {
                let r = format!("451 4.3.0 Error: {}", f.reason);
                self.reply(&r);
                return Next::Command;
            }
        };
        self.reply("354 End data with <CR><LF>.<CR><LF>");
        let Some((error, d)) = copy_content(input, d) else {
            return Next::End;
        };
        match (error, d) {
            (Some(e), _) => self.reply(&e),
            (None, Some(dd)) => match dd.finish() {
                Ok(()) => self.reply("250 2.0.0 Ok: queued"),
                Err(f) => {
                    let r = format!("451 4.3.0 Error: {}", f.reason);
                    self.reply(&r)
                }
            },
            (None, None) => self.reply("451 4.3.0 Error: internal error"),
        }
        Next::Command
    }
}

/// Copies DATA content up to the lone "." into the drop, undoing the
/// dot-stuffing. Returns the error reply if writing failed (the drop then
/// gone), or None if input ended before the "." (the drop aborted).
fn copy_content<R: BufRead>(input: &mut R, d: Drop) -> Option<(Option<String>, Option<Drop>)> {
    let mut d = Some(d);
    let mut error: Option<String> = None;
    let mut line = Vec::new();
    loop {
        line.clear();
        match std::io::Read::take(&mut *input, 1 << 20).read_until(b'\n', &mut line) {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
        if line.ends_with(b"\r\n") {
            line.truncate(line.len() - 2);
            line.push(b'\n');
        }
        if line == b".\n" {
            return Some((error, d));
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
    // Input ended inside DATA: nothing is queued.
    if let Some(mut dd) = d {
        dd.abort();
    }
    None
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
