//! `socketmap:inet:host:port:name` and `socketmap:unix:/path:name`
//! (Postfix's socketmap_table(5), Sendmail's socket map protocol): each
//! lookup is the netstring `name key` on a connection kept open between
//! lookups; the server answers one netstring, `OK value`, `NOTFOUND `,
//! `TEMP reason`, `TIMEOUT reason` or `PERM reason`. NOTFOUND is "not
//! found"; TEMP, TIMEOUT and PERM, a connection that fails or a reply that
//! is not a netstring are lookup errors (the mail waits). As Postfix
//! does, a connection idle for 10 s or older than 100 s is closed before
//! the next lookup, and a lookup that fails on a kept connection is tried
//! once more on a new one. Used by postfix-mta-sts-resolver
//! (`smtp_tls_policy_maps`) and postsrsd 2.x (`sender_canonical_maps`).

use super::{Dict, LookupError};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Postfix's socketmap limits.
const TIMEOUT: Duration = Duration::from_secs(100);
const MAX_IDLE: Duration = Duration::from_secs(10);
const MAX_TTL: Duration = Duration::from_secs(100);
const MAX_REPLY: usize = 100_000;

/// Where the server listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    /// `host:port`.
    Inet(String),
    Unix(String),
}

impl Endpoint {
    /// Connects, with [`TIMEOUT`] on every read and write.
    pub fn connect(&self, timeout: Duration) -> std::io::Result<Stream> {
        match self {
            Endpoint::Inet(addr) => crate::tcp::connect(addr.as_str(), timeout).map(Stream::Tcp),
            Endpoint::Unix(path) => {
                let s = UnixStream::connect(path)?;
                s.set_read_timeout(Some(timeout))?;
                s.set_write_timeout(Some(timeout))?;
                Ok(Stream::Unix(s))
            }
        }
    }
}

impl std::fmt::Display for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Endpoint::Inet(a) => write!(f, "inet:{a}"),
            Endpoint::Unix(p) => write!(f, "unix:{p}"),
        }
    }
}

/// A connection to a table server.
#[derive(Debug)]
pub enum Stream {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.read(buf),
            Stream::Unix(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.write(buf),
            Stream::Unix(s) => s.write(buf),
        }
    }
    fn flush(&mut self) -> std::io::Result<()> {
        match self {
            Stream::Tcp(s) => s.flush(),
            Stream::Unix(s) => s.flush(),
        }
    }
}

/// A kept connection and when it was opened and last used.
#[derive(Debug)]
struct Kept {
    stream: std::io::BufReader<Stream>,
    opened: Instant,
    used: Instant,
}

/// An open `socketmap:` table.
#[derive(Debug)]
pub struct Socketmap {
    spec: String,
    endpoint: Endpoint,
    /// The map name sent before each key.
    name: String,
    conn: Mutex<Option<Kept>>,
}

impl Socketmap {
    /// `inet:host:port:name` or `unix:/path:name` (the part after
    /// `socketmap:`). Nothing is connected until the first lookup.
    pub fn open(spec: &str, rest: &str) -> Result<Socketmap, String> {
        let bad = || {
            format!(
                "table {spec}: expected socketmap:inet:host:port:name or \
                 socketmap:unix:/path:name"
            )
        };
        let (where_, name) = rest.rsplit_once(':').ok_or_else(bad)?;
        let endpoint = if let Some(hp) = where_.strip_prefix("inet:") {
            if !hp.contains(':') {
                return Err(bad());
            }
            Endpoint::Inet(hp.to_string())
        } else if let Some(p) = where_.strip_prefix("unix:") {
            Endpoint::Unix(p.to_string())
        } else {
            return Err(bad());
        };
        if name.is_empty() {
            return Err(bad());
        }
        Ok(Socketmap {
            spec: spec.to_string(),
            endpoint,
            name: name.to_string(),
            conn: Mutex::new(None),
        })
    }

    fn error(&self, reason: impl Into<String>) -> LookupError {
        LookupError::new(self.spec.clone(), reason)
    }

    /// One request on `kept`: the reply's payload.
    fn exchange(kept: &mut Kept, request: &[u8]) -> Result<Vec<u8>, String> {
        let stream = kept.stream.get_mut();
        stream
            .write_all(request)
            .map_err(|e| format!("write: {e}"))?;
        read_netstring(&mut kept.stream, MAX_REPLY)
    }
}

impl Dict for Socketmap {
    fn lookup(&self, key: &str) -> Result<Option<String>, LookupError> {
        let request = netstring(format!("{} {key}", self.name).as_bytes());
        let mut conn = self.conn.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        if conn
            .as_ref()
            .is_some_and(|k| now - k.used > MAX_IDLE || now - k.opened > MAX_TTL)
        {
            *conn = None;
        }
        let mut reply = None;
        let mut last_error = String::new();
        // A kept connection the server closed fails once; a new one is
        // tried before giving up.
        for _ in 0..2 {
            let fresh = conn.is_none();
            if fresh {
                match self.endpoint.connect(TIMEOUT) {
                    Ok(s) => {
                        *conn = Some(Kept {
                            stream: std::io::BufReader::new(s),
                            opened: Instant::now(),
                            used: Instant::now(),
                        })
                    }
                    Err(e) => return Err(self.error(format!("connect to {}: {e}", self.endpoint))),
                }
            }
            let Some(kept) = conn.as_mut() else { break };
            match Socketmap::exchange(kept, &request) {
                Ok(r) => {
                    kept.used = Instant::now();
                    reply = Some(r);
                    break;
                }
                Err(e) => {
                    *conn = None;
                    last_error = format!("{}: {e}", self.endpoint);
                    if fresh {
                        break;
                    }
                }
            }
        }
        let Some(reply) = reply else {
            return Err(self.error(last_error));
        };
        let text = String::from_utf8_lossy(&reply);
        let (status, rest) = match text.split_once(' ') {
            Some((s, r)) => (s, r),
            None => (text.as_ref(), ""),
        };
        match status {
            "OK" => Ok(Some(rest.to_string())),
            "NOTFOUND" => Ok(None),
            "TEMP" | "TIMEOUT" | "PERM" => {
                Err(self.error(format!("{status} {rest}").trim_end().to_string()))
            }
            _ => {
                *conn = None;
                Err(self.error(format!(
                    "malformed reply: {}",
                    text.chars().take(100).collect::<String>()
                )))
            }
        }
    }
}

/// `data` as a netstring: `LEN:data,`.
pub fn netstring(data: &[u8]) -> Vec<u8> {
    let mut out = format!("{}:", data.len()).into_bytes();
    out.extend_from_slice(data);
    out.push(b',');
    out
}

/// Reads one netstring of at most `max` bytes.
pub fn read_netstring(r: &mut impl std::io::BufRead, max: usize) -> Result<Vec<u8>, String> {
    let mut len: usize = 0;
    let mut digits = 0;
    loop {
        let mut b = [0u8];
        match r.read(&mut b) {
            Ok(0) => return Err("unexpected EOF".into()),
            Ok(_) => {}
            Err(e) => return Err(format!("read: {e}")),
        }
        match b[0] {
            d @ b'0'..=b'9' if digits < 10 => {
                len = len * 10 + usize::from(d - b'0');
                digits += 1;
            }
            b':' if digits > 0 => break,
            _ => return Err("malformed netstring".into()),
        }
    }
    if len > max {
        return Err(format!("reply longer than {max} bytes"));
    }
    let mut data = vec![0u8; len + 1];
    r.read_exact(&mut data).map_err(|e| format!("read: {e}"))?;
    if data.pop() != Some(b',') {
        return Err("malformed netstring".into());
    }
    Ok(data)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::BufRead;
    use std::os::unix::net::UnixListener;

    /// A server answering each request by the rule `answer`, for `n`
    /// connections.
    fn server(path: &std::path::Path, answer: fn(&str) -> String, n: usize) {
        let l = UnixListener::bind(path).unwrap();
        std::thread::spawn(move || {
            for c in l.incoming().take(n) {
                let mut r = std::io::BufReader::new(c.unwrap());
                while let Ok(req) = read_netstring(&mut r, 1000) {
                    let req = String::from_utf8(req).unwrap();
                    let out = netstring(answer(&req).as_bytes());
                    if r.get_mut().write_all(&out).is_err() {
                        break;
                    }
                }
                let _ = r.fill_buf();
            }
        });
    }

    #[test]
    fn replies_and_errors() {
        let dir = std::env::temp_dir().join(format!("pt-sockmap-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let sock = dir.join("s");
        let _ = std::fs::remove_file(&sock);
        server(
            &sock,
            |req| match req {
                "policy a.test" => "OK secure match=mx.a.test".into(),
                "policy temp.test" => "TEMP try later".into(),
                "policy perm.test" => "PERM broken".into(),
                "policy junk.test" => "WHAT".into(),
                _ => "NOTFOUND ".into(),
            },
            3,
        );
        let spec = format!("socketmap:unix:{}:policy", sock.display());
        let t = Socketmap::open(&spec, &spec["socketmap:".len()..]).unwrap();
        assert_eq!(
            t.lookup("a.test").unwrap().as_deref(),
            Some("secure match=mx.a.test")
        );
        assert_eq!(t.lookup("b.test").unwrap(), None);
        assert!(t
            .lookup("temp.test")
            .unwrap_err()
            .reason
            .contains("TEMP try later"));
        assert!(t.lookup("perm.test").is_err());
        assert!(t.lookup("junk.test").is_err());
        // After a malformed reply, a new connection.
        assert_eq!(
            t.lookup("a.test").unwrap().as_deref(),
            Some("secure match=mx.a.test")
        );
        std::fs::remove_dir_all(&dir).unwrap();
        let e = Socketmap::open("socketmap:x", "x").unwrap_err();
        assert!(e.contains("expected"), "{e}");
        let nobody = "socketmap:unix:/nonexistent/sock:m";
        let t = Socketmap::open(nobody, &nobody["socketmap:".len()..]).unwrap();
        assert!(t.lookup("k").unwrap_err().reason.contains("connect to"));
    }

    #[test]
    fn netstrings() {
        assert_eq!(netstring(b"map key"), b"7:map key,");
        let mut r = std::io::Cursor::new(b"3:abc,2:xy".to_vec());
        assert_eq!(read_netstring(&mut r, 10).unwrap(), b"abc");
        assert!(read_netstring(&mut r, 10).is_err());
        let mut r = std::io::Cursor::new(b"30:abc,".to_vec());
        assert!(read_netstring(&mut r, 10).is_err());
    }
}
