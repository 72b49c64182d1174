//! postscreen's own SMTP dialogue (Postfix's postscreen_smtpd.c), for a
//! client that failed a test under `enforce` and for one that takes the
//! deep protocol tests (after the 220 greeting): it completes the
//! greeting (not to a client that talked first), accepts HELO, EHLO and
//! MAIL, answers every RCPT TO with the session's reject reply (logged
//! as `NOQUEUE: reject: RCPT from ...`), and ends after QUIT,
//! `postscreen_command_count_limit` commands or
//! `postscreen_command_time_limit` without one. Meanwhile it runs the
//! deep tests asked for: command pipelining (the dialogue offers no
//! PIPELINING), non-SMTP commands (`postscreen_forbidden_commands`, mail
//! header lines) and bare newlines. With `postscreen_tls_security_level`
//! `may` or `encrypt` it offers STARTTLS itself (rustls, smtpd's keys and
//! settings) where Postfix's postscreen calls on tlsproxy(8).

use crate::screen::{escape, Client};
use crate::settings::{Action, DeepTest, Settings};
use postern_common::info;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;

/// The client connection, plain or under TLS after STARTTLS.
trait Stream: Read + Write + Send {}
impl<T: Read + Write + Send> Stream for T {}

/// Writes one reply (its lines joined by CRLF); false when the client is
/// gone.
fn say(r: &mut BufReader<Box<dyn Stream>>, text: &str) -> bool {
    let w = r.get_mut();
    w.write_all(format!("{text}\r\n").as_bytes()).is_ok() && w.flush().is_ok()
}

/// The EHLO reply: the host name, then the keywords offered, less those
/// in `postscreen_discard_ehlo_keywords` (as Postfix's postscreen, which
/// logs nothing for that list).
fn ehlo_reply(s: &Settings, tls_offered: bool) -> String {
    let keywords = ["SIZE", "STARTTLS", "ENHANCEDSTATUSCODES", "8BITMIME", "DSN"];
    let mut lines = vec![s.myhostname.clone()];
    lines.extend(
        keywords
            .into_iter()
            .filter(|k| (*k != "STARTTLS" || tls_offered) && !s.ehlo_discard.iter().any(|d| d == k))
            .map(String::from),
    );
    let last = lines.len() - 1;
    lines
        .iter()
        .enumerate()
        .map(|(i, l)| format!("250{}{l}", if i == last { ' ' } else { '-' }))
        .collect::<Vec<_>>()
        .join("\r\n")
}

/// The deep tests, each a flag.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Deep {
    pub pipelining: bool,
    pub non_smtp_command: bool,
    pub bare_newline: bool,
}

/// How a dialogue went: the deep tests that failed, and whether the
/// client was dropped for it.
#[derive(Debug, Default)]
pub struct Outcome {
    pub failed: Deep,
    pub dropped: bool,
}

/// The SMTP commands the dialogue knows (a known command is never a
/// "non-SMTP command").
const KNOWN: &[&str] = &[
    "HELO", "EHLO", "XCLIENT", "XFORWARD", "AUTH", "MAIL", "RCPT", "DATA", "BDAT", "RSET", "NOOP",
    "VRFY", "ETRN", "QUIT", "STARTTLS",
];

/// Runs the dialogue. `greet`: send the 220 greeting; `reject`: the RCPT
/// reply; `tests`: the deep tests to run.
pub fn run(
    s: &Settings,
    sock: TcpStream,
    client: &Client,
    greet: bool,
    reject: &str,
    tests: Deep,
) -> Outcome {
    let mut outcome = Outcome::default();
    let mut reject = reject.to_string();
    let mut todo = tests;
    let _ = sock.set_read_timeout(Some(s.command_time_limit));
    let _ = sock.set_write_timeout(Some(s.command_time_limit));
    let Ok(plain) = sock.try_clone() else {
        return outcome;
    };
    let mut reader: BufReader<Box<dyn Stream>> = BufReader::new(Box::new(sock));
    if greet && !say(&mut reader, &format!("220 {}", s.smtpd_banner)) {
        return outcome;
    }
    let mut plain = Some(plain);
    let mut in_tls = false;
    let (mut helo, mut sender, mut proto) = (String::new(), String::new(), "SMTP");
    let mut after = "CONNECT".to_string();
    let mut count = 0;
    while let Some(raw) = next_line(&mut reader) {
        count += 1;
        if count > s.command_count_limit {
            say(
                &mut reader,
                &format!("421 4.7.0 {} Error: too many commands", s.myhostname),
            );
            info!("COMMAND COUNT LIMIT from {client} after {after}");
            return outcome;
        }
        let line = raw.trim_end_matches(['\r', '\n']).to_string();
        let (verb, arg) = line.split_once(' ').unwrap_or((&line, ""));
        let verb_uc = verb.to_ascii_uppercase();
        // A test that fails: its action (drop ends the dialogue here).
        let mut fail = |which: &mut bool, test: &DeepTest| -> bool {
            *which = true;
            match test.action {
                Action::Drop => true,
                Action::Enforce => {
                    reject = "550 5.5.1 Protocol error".into();
                    false
                }
                Action::Ignore => false,
            }
        };
        if todo.bare_newline && raw.ends_with('\n') && !raw.ends_with("\r\n") {
            todo.bare_newline = false;
            info!(
                "BARE NEWLINE from {client} after {}",
                escape(line.as_bytes(), 100)
            );
            if fail(&mut outcome.failed.bare_newline, &s.bare_newline) {
                say(&mut reader, "521 5.5.1 Protocol error");
                outcome.dropped = true;
                return outcome;
            }
        }
        let forbidden = !KNOWN.contains(&verb_uc.as_str())
            && (is_header(verb)
                || s.forbidden_commands.contains(&verb_uc)
                || s.forbidden_tables
                    .iter()
                    .any(|t| matches!(t.lookup(verb), Ok(Some(_))))
                || s.forbidden_patterns
                    .iter()
                    .any(|rules| postern_common::regexp::lookup(rules, verb).is_some()));
        if todo.non_smtp_command && forbidden {
            todo.non_smtp_command = false;
            info!(
                "NON-SMTP COMMAND from {client} after {after}: {verb} {}",
                escape(arg.as_bytes(), 100)
            );
            if fail(&mut outcome.failed.non_smtp_command, &s.non_smtp_command) {
                say(
                    &mut reader,
                    "521 5.7.0 Error: I can break rules, too. Goodbye.",
                );
                outcome.dropped = true;
                return outcome;
            }
        }
        if todo.pipelining && !reader.buffer().is_empty() {
            todo.pipelining = false;
            info!(
                "COMMAND PIPELINING from {client} after {verb}: {}",
                escape(reader.buffer(), 100)
            );
            if fail(&mut outcome.failed.pipelining, &s.pipelining) {
                say(&mut reader, "521 5.5.1 Protocol error");
                outcome.dropped = true;
                return outcome;
            }
        }
        after = if KNOWN.contains(&verb_uc.as_str()) {
            verb_uc.clone()
        } else {
            "UNKNOWN".into()
        };
        let tls_offered = s.tls.is_some() && !in_tls;
        let ok = match verb_uc.as_str() {
            "EHLO" => {
                helo = arg.trim().to_string();
                proto = "ESMTP";
                say(&mut reader, &ehlo_reply(s, tls_offered))
            }
            "STARTTLS" if tls_offered => {
                // What the client sent ahead stays unencrypted: dropped,
                // as smtpd does.
                let (Some(cfg), Some(tcp)) = (s.tls.clone(), plain.take()) else {
                    return outcome;
                };
                if !say(&mut reader, "220 2.0.0 Ready to start TLS") {
                    return outcome;
                }
                let Ok(conn) = rustls::ServerConnection::new(cfg) else {
                    return outcome;
                };
                reader = BufReader::new(Box::new(rustls::StreamOwned::new(conn, tcp)));
                in_tls = true;
                // RFC 3207: the session starts again.
                helo.clear();
                sender.clear();
                true
            }
            "MAIL" if s.tls_required && !in_tls => {
                say(&mut reader, "530 5.7.0 Must issue a STARTTLS command first")
            }
            "HELO" => {
                helo = arg.trim().to_string();
                say(&mut reader, &format!("250 {}", s.myhostname))
            }
            "MAIL" => {
                sender = address(arg, "FROM:");
                say(&mut reader, "250 2.1.0 Ok")
            }
            "RCPT" => {
                info!(
                    "NOQUEUE: reject: RCPT from {client}: {reject}; from=<{sender}>, to=<{}>, proto={proto}, helo=<{helo}>",
                    address(arg, "TO:")
                );
                say(&mut reader, &reject)
            }
            "DATA" | "BDAT" => say(&mut reader, "554 5.5.1 Error: no valid recipients"),
            "RSET" | "NOOP" => say(&mut reader, "250 2.0.0 Ok"),
            "QUIT" => {
                say(&mut reader, "221 2.0.0 Bye");
                return outcome;
            }
            _ => say(&mut reader, "502 5.5.2 Error: command not recognized"),
        };
        if !ok {
            return outcome;
        }
    }
    outcome
}

/// Whether a command word is a mail header name (`Subject:`): a client
/// that sends a message without the SMTP dialogue.
fn is_header(word: &str) -> bool {
    word.len() > 1
        && word.ends_with(':')
        && word[..word.len() - 1]
            .bytes()
            .all(|b| b.is_ascii_graphic() && b != b':')
}

/// The address of `MAIL FROM:<a>` / `RCPT TO:<a>`, for the log.
fn address(arg: &str, keyword: &str) -> String {
    let a = arg.trim();
    let a = if a.len() >= keyword.len() && a[..keyword.len()].eq_ignore_ascii_case(keyword) {
        &a[keyword.len()..]
    } else {
        a
    };
    let a = a.split_whitespace().next().unwrap_or("");
    a.trim_start_matches('<').trim_end_matches('>').to_string()
}

/// A line of at most 4 KiB (longer input is cut); None when the client
/// is gone or silent too long.
fn next_line(r: &mut impl BufRead) -> Option<String> {
    let mut buf = Vec::new();
    match r.by_ref().take(4096).read_until(b'\n', &mut buf) {
        Ok(0) | Err(_) => None,
        Ok(_) => Some(String::from_utf8_lossy(&buf).into_owned()),
    }
}
