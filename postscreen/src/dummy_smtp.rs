//! The SMTP dialogue with a client that failed a test under `enforce`
//! (Postfix's postscreen_smtpd.c): it completes the greeting, accepts
//! HELO, EHLO and MAIL, rejects every RCPT TO with the failed test's
//! reply (logged as `NOQUEUE: reject: RCPT from ...`), and ends after
//! QUIT, `postscreen_command_count_limit` commands or
//! `postscreen_command_time_limit` without one.

use crate::screen::Client;
use crate::settings::Settings;
use postern_common::info;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;

pub fn run(s: &Settings, sock: TcpStream, client: &Client, reject: &str) {
    let _ = sock.set_read_timeout(Some(s.command_time_limit));
    let Ok(reader) = sock.try_clone() else {
        return;
    };
    let mut reader = BufReader::new(reader);
    let mut out = sock;
    let mut say = |text: &str| out.write_all(format!("{text}\r\n").as_bytes()).is_ok();
    if !say(&format!("220 {}", s.smtpd_banner)) {
        return;
    }
    let (mut helo, mut sender, mut proto) = (String::new(), String::new(), "SMTP");
    let mut count = 0;
    while let Some(line) = next_line(&mut reader) {
        count += 1;
        if count > s.command_count_limit {
            say(&format!(
                "421 4.7.0 {} Error: too many commands",
                s.myhostname
            ));
            info!("COMMAND COUNT LIMIT from {client}");
            return;
        }
        let line = line.trim_end_matches(['\r', '\n']);
        let (verb, arg) = line.split_once(' ').unwrap_or((line, ""));
        let ok = match verb.to_ascii_uppercase().as_str() {
            "EHLO" => {
                helo = arg.trim().to_string();
                proto = "ESMTP";
                say(&format!(
                    "250-{}\r\n250-SIZE\r\n250-ENHANCEDSTATUSCODES\r\n250-8BITMIME\r\n250 DSN",
                    s.myhostname
                ))
            }
            "HELO" => {
                helo = arg.trim().to_string();
                say(&format!("250 {}", s.myhostname))
            }
            "MAIL" => {
                sender = address(arg, "FROM:");
                say("250 2.1.0 Ok")
            }
            "RCPT" => {
                info!(
                    "NOQUEUE: reject: RCPT from {client}: {reject}; from=<{sender}>, to=<{}>, proto={proto}, helo=<{helo}>",
                    address(arg, "TO:")
                );
                say(reject)
            }
            "DATA" | "BDAT" => say("554 5.5.1 Error: no valid recipients"),
            "RSET" | "NOOP" => say("250 2.0.0 Ok"),
            "QUIT" => {
                say("221 2.0.0 Bye");
                return;
            }
            _ => say("502 5.5.2 Error: command not recognized"),
        };
        if !ok {
            return;
        }
    }
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
