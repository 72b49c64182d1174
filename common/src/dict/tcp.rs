//! `tcp:host:port` (Postfix's tcp_table(5)): each lookup is the line
//! `get KEY` on a connection kept open between lookups; the server
//! answers one line, `200 VALUE` (found), `500 TEXT` (not found) or
//! `400 TEXT` (try again later). In both directions `%`, white space and
//! characters that are not printable ASCII travel as `%XX`. A `400`, a
//! connection that fails, a reply longer than 4096 bytes or one that is
//! not `NNN text` is a lookup error (the mail waits). A lookup that fails
//! on a kept connection is tried once more on a new one (Postfix tries
//! ten times a second apart; a lookup here may hold up smtpd's event
//! loop, so it gives up sooner). Used by postsrsd 1.x
//! (`sender_canonical_maps = tcp:127.0.0.1:10001`).

use super::socketmap::{Endpoint, Stream};
use super::{Dict, LookupError};
use std::io::{BufRead, Read, Write};
use std::sync::Mutex;
use std::time::Duration;

/// Postfix's tcp_table limits.
const TIMEOUT: Duration = Duration::from_secs(10);
const MAX_REPLY: usize = 4096;

/// An open `tcp:` table.
#[derive(Debug)]
pub struct Tcp {
    spec: String,
    endpoint: Endpoint,
    conn: Mutex<Option<std::io::BufReader<Stream>>>,
}

impl Tcp {
    /// `host:port` (the part after `tcp:`).
    pub fn open(spec: &str, addr: &str) -> Result<Tcp, String> {
        match addr.rsplit_once(':') {
            Some((host, port)) if !host.is_empty() && !port.is_empty() => Ok(Tcp {
                spec: spec.to_string(),
                endpoint: Endpoint::Inet(addr.trim_start_matches("inet:").to_string()),
                conn: Mutex::new(None),
            }),
            _ => Err(format!("table {spec}: expected tcp:host:port")),
        }
    }

    fn exchange(r: &mut std::io::BufReader<Stream>, request: &[u8]) -> Result<String, String> {
        r.get_mut()
            .write_all(request)
            .map_err(|e| format!("write: {e}"))?;
        let mut line = Vec::new();
        let n = r
            .by_ref()
            .take(MAX_REPLY as u64 + 1)
            .read_until(b'\n', &mut line)
            .map_err(|e| format!("read TCP map reply: {e}"))?;
        if n == 0 {
            return Err("read TCP map reply: unexpected EOF".into());
        }
        if line.last() != Some(&b'\n') {
            return Err(format!("read TCP map reply: text longer than {MAX_REPLY}"));
        }
        line.pop();
        Ok(String::from_utf8_lossy(&line).into_owned())
    }
}

impl Dict for Tcp {
    fn lookup(&self, key: &str) -> Result<Option<String>, LookupError> {
        let err = |reason: String| LookupError::new(self.spec.clone(), reason);
        let request = format!("get {}\n", hex_quote(key.as_bytes()));
        let mut conn = self.conn.lock().unwrap_or_else(|e| e.into_inner());
        let mut reply = None;
        let mut last = String::new();
        for _ in 0..2 {
            let fresh = conn.is_none();
            if fresh {
                match self.endpoint.connect(TIMEOUT) {
                    Ok(s) => *conn = Some(std::io::BufReader::new(s)),
                    Err(e) => {
                        return Err(err(format!("connect to TCP map {}: {e}", self.endpoint)))
                    }
                }
            }
            let Some(r) = conn.as_mut() else { break };
            match Tcp::exchange(r, request.as_bytes()) {
                Ok(line) => {
                    reply = Some(line);
                    break;
                }
                Err(e) => {
                    *conn = None;
                    last = e;
                    if fresh {
                        break;
                    }
                }
            }
        }
        let Some(line) = reply else {
            return Err(err(last));
        };
        let b = line.as_bytes();
        let well_formed =
            b.len() >= 4 && b[..3].iter().all(u8::is_ascii_digit) && b[3].is_ascii_whitespace();
        let text = if well_formed {
            hex_unquote(&line[4..])
        } else {
            None
        };
        let Some(text) = text else {
            *conn = None;
            return Err(err(format!(
                "malformed reply: {}",
                line.chars().take(100).collect::<String>()
            )));
        };
        match b[0] {
            b'2' => Ok(Some(String::from_utf8_lossy(&text).into_owned())),
            b'5' => Ok(None),
            b'4' => {
                *conn = None;
                Err(err(format!("{}", String::from_utf8_lossy(&text))))
            }
            _ => {
                *conn = None;
                Err(err(format!("bad status code: {}", &line[..3])))
            }
        }
    }
}

/// `%`, white space and what is not printable ASCII as `%XX`.
pub fn hex_quote(raw: &[u8]) -> String {
    let mut out = String::with_capacity(raw.len());
    for &c in raw {
        if c != b'%' && c.is_ascii_graphic() {
            out.push(c as char);
        } else {
            out.push_str(&format!("%{c:02X}"));
        }
    }
    out
}

/// The bytes of `%XX`-quoted text (any case); None when malformed.
pub fn hex_unquote(text: &str) -> Option<Vec<u8>> {
    let b = text.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = std::str::from_utf8(b.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::BufReader;
    use std::net::TcpListener;

    #[test]
    fn quoting() {
        assert_eq!(hex_quote(b"a b%c\x01\xc3"), "a%20b%25c%01%C3");
        assert_eq!(hex_unquote("a%20b%25c%01%c3").unwrap(), b"a b%c\x01\xc3");
        assert_eq!(hex_unquote("bad%2"), None);
    }

    #[test]
    fn get_replies() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        std::thread::spawn(move || {
            for c in l.incoming().take(3) {
                let c = c.unwrap();
                let mut r = BufReader::new(c.try_clone().unwrap());
                let mut w = c;
                let mut line = String::new();
                while r.read_line(&mut line).unwrap_or(0) > 0 {
                    let reply = match line.trim_end() {
                        "get a%20b@x.test" => "200 found%20it\n",
                        "get temp@x.test" => "400 later\n",
                        "get junk@x.test" => "2x\n",
                        _ => "500 no\n",
                    };
                    if w.write_all(reply.as_bytes()).is_err() {
                        break;
                    }
                    line.clear();
                }
            }
        });
        let spec = format!("tcp:{addr}");
        let t = Tcp::open(&spec, &addr.to_string()).unwrap();
        assert_eq!(t.lookup("a b@x.test").unwrap().as_deref(), Some("found it"));
        assert_eq!(t.lookup("c@x.test").unwrap(), None);
        assert!(t
            .lookup("temp@x.test")
            .unwrap_err()
            .reason
            .contains("later"));
        assert!(t.lookup("junk@x.test").is_err());
        assert_eq!(t.lookup("c@x.test").unwrap(), None);
        assert!(Tcp::open("tcp:nohost", "nohost").is_err());
    }
}
