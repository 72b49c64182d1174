//! A small synchronous Redis client (RESP2 over TCP), for the limits a
//! cluster of Postern nodes shares (`delivery_policy_redis`, qmgr).
//!
//! What qmgr needs of Redis is a handful of commands (`EVAL` of a Lua
//! script, `HSET`, `PUBLISH`, `SUBSCRIBE`, `PING`) on a connection that
//! never blocks longer than a timeout; this is that and nothing more:
//! requests are arrays of bulk strings, replies are parsed into
//! [`Reply`], and every read and write is bounded by the timeout given
//! at connect time. A connection that failed is not used again: the
//! caller makes a new one.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::time::Duration;

/// A reply.
#[derive(Debug, Clone, PartialEq)]
pub enum Reply {
    /// `+OK`
    Status(String),
    /// `-ERR ...`: an error the server answered (the connection is fine).
    Error(String),
    Int(i64),
    /// A bulk string; None: the null bulk string.
    Bulk(Option<Vec<u8>>),
    /// None: the null array.
    Array(Option<Vec<Reply>>),
}

impl Reply {
    /// The reply as an integer (an integer reply, or a bulk string of
    /// digits).
    pub fn as_int(&self) -> Option<i64> {
        match self {
            Reply::Int(n) => Some(*n),
            Reply::Bulk(Some(b)) => std::str::from_utf8(b).ok()?.trim().parse().ok(),
            _ => None,
        }
    }

    /// The reply as text (a status or a bulk string).
    pub fn as_str(&self) -> Option<String> {
        match self {
            Reply::Status(s) => Some(s.clone()),
            Reply::Bulk(Some(b)) => Some(String::from_utf8_lossy(b).into_owned()),
            _ => None,
        }
    }

    /// The elements of an array reply (empty for anything else).
    pub fn items(&self) -> &[Reply] {
        match self {
            Reply::Array(Some(v)) => v,
            _ => &[],
        }
    }
}

/// Why a command has no reply.
#[derive(Debug)]
pub enum Error {
    /// The connection failed or timed out: make a new one.
    Io(std::io::Error),
    /// The server answered something that is not RESP.
    Protocol(String),
    /// The server answered an error (`-ERR ...`).
    Server(String),
}

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Error::Io(e) => write!(f, "{e}"),
            Error::Protocol(e) => write!(f, "protocol error: {e}"),
            Error::Server(e) => write!(f, "server error: {e}"),
        }
    }
}

impl From<std::io::Error> for Error {
    fn from(e: std::io::Error) -> Error {
        Error::Io(e)
    }
}

/// Longest bulk string or array accepted (a reply qmgr asked for is a
/// few numbers; this only bounds what a broken server could make it
/// allocate).
const MAX_LEN: i64 = 64 << 20;

/// One connection to a Redis server.
pub struct Conn {
    reader: BufReader<TcpStream>,
    writer: TcpStream,
}

impl Conn {
    /// Connects to `host:port` (each address it resolves to in turn),
    /// with `timeout` for the connection and for every read and write.
    pub fn connect(addr: &str, timeout: Duration) -> Result<Conn, Error> {
        let addrs: Vec<SocketAddr> = addr.to_socket_addrs()?.collect();
        let mut last =
            std::io::Error::new(std::io::ErrorKind::NotFound, format!("{addr}: no address"));
        for a in addrs {
            match TcpStream::connect_timeout(&a, timeout) {
                Ok(s) => {
                    s.set_read_timeout(Some(timeout))?;
                    s.set_write_timeout(Some(timeout))?;
                    let _ = s.set_nodelay(true);
                    return Ok(Conn {
                        reader: BufReader::new(s.try_clone()?),
                        writer: s,
                    });
                }
                Err(e) => last = e,
            }
        }
        Err(Error::Io(last))
    }

    /// Changes the read timeout (None: wait for ever, as a subscriber
    /// does).
    pub fn set_read_timeout(&self, t: Option<Duration>) -> Result<(), Error> {
        Ok(self.writer.set_read_timeout(t)?)
    }

    /// Sends one command and reads its reply; an error reply is
    /// [`Error::Server`].
    pub fn cmd<A: AsRef<[u8]>>(&mut self, args: &[A]) -> Result<Reply, Error> {
        self.send(args)?;
        match self.read()? {
            Reply::Error(e) => Err(Error::Server(e)),
            r => Ok(r),
        }
    }

    /// Sends one command without reading a reply.
    pub fn send<A: AsRef<[u8]>>(&mut self, args: &[A]) -> Result<(), Error> {
        self.writer.write_all(&encode(args))?;
        Ok(())
    }

    /// Reads one reply (a subscriber reads messages this way).
    pub fn read(&mut self) -> Result<Reply, Error> {
        read_reply(&mut self.reader, 0)
    }
}

/// A command as RESP: an array of bulk strings.
pub fn encode<A: AsRef<[u8]>>(args: &[A]) -> Vec<u8> {
    let mut out = format!("*{}\r\n", args.len()).into_bytes();
    for a in args {
        let a = a.as_ref();
        out.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
        out.extend_from_slice(a);
        out.extend_from_slice(b"\r\n");
    }
    out
}

fn line<R: BufRead>(r: &mut R) -> Result<String, Error> {
    let mut buf = Vec::new();
    // A line is short; bound it all the same.
    let n = r.take(65536).read_until(b'\n', &mut buf)?;
    if n == 0 {
        return Err(Error::Io(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            "connection closed by the server",
        )));
    }
    if !buf.ends_with(b"\r\n") {
        return Err(Error::Protocol("line without CRLF".into()));
    }
    buf.truncate(buf.len() - 2);
    String::from_utf8(buf).map_err(|_| Error::Protocol("line not UTF-8".into()))
}

fn length(s: &str) -> Result<i64, Error> {
    let n: i64 = s
        .parse()
        .map_err(|_| Error::Protocol(format!("bad length \"{s}\"")))?;
    if n > MAX_LEN {
        return Err(Error::Protocol(format!("length {n} too large")));
    }
    Ok(n)
}

/// Reads one reply from `r`.
pub fn read_reply<R: BufRead>(r: &mut R, depth: usize) -> Result<Reply, Error> {
    if depth > 8 {
        return Err(Error::Protocol("arrays nested too deep".into()));
    }
    let l = line(r)?;
    let (kind, rest) = l.split_at(l.len().min(1));
    Ok(match kind {
        "+" => Reply::Status(rest.to_string()),
        "-" => Reply::Error(rest.to_string()),
        ":" => Reply::Int(
            rest.parse()
                .map_err(|_| Error::Protocol(format!("bad integer \"{rest}\"")))?,
        ),
        "$" => {
            let n = length(rest)?;
            if n < 0 {
                Reply::Bulk(None)
            } else {
                let mut buf = vec![0; n as usize + 2];
                r.read_exact(&mut buf)?;
                if !buf.ends_with(b"\r\n") {
                    return Err(Error::Protocol("bulk string without CRLF".into()));
                }
                buf.truncate(n as usize);
                Reply::Bulk(Some(buf))
            }
        }
        "*" => {
            let n = length(rest)?;
            if n < 0 {
                Reply::Array(None)
            } else {
                let mut v = Vec::with_capacity((n as usize).min(1024));
                for _ in 0..n {
                    v.push(read_reply(r, depth + 1)?);
                }
                Reply::Array(Some(v))
            }
        }
        _ => return Err(Error::Protocol(format!("unexpected reply \"{l}\""))),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(b: &[u8]) -> Result<Reply, Error> {
        read_reply(&mut std::io::Cursor::new(b.to_vec()), 0)
    }

    #[test]
    fn encodes_commands_as_arrays_of_bulk_strings() {
        assert_eq!(
            encode(&["SET", "k", ""]),
            b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$0\r\n\r\n".to_vec()
        );
    }

    #[test]
    fn parses_every_reply_kind() {
        assert_eq!(parse(b"+OK\r\n").unwrap(), Reply::Status("OK".into()));
        assert_eq!(parse(b"-ERR x\r\n").unwrap(), Reply::Error("ERR x".into()));
        assert_eq!(parse(b":-3\r\n").unwrap(), Reply::Int(-3));
        assert_eq!(parse(b"$-1\r\n").unwrap(), Reply::Bulk(None));
        assert_eq!(
            parse(b"$5\r\na\r\nbc\r\n").unwrap(),
            Reply::Bulk(Some(b"a\r\nbc".to_vec()))
        );
        let r = parse(b"*3\r\n:1\r\n*1\r\n$1\r\nx\r\n$-1\r\n").unwrap();
        assert_eq!(r.items().len(), 3);
        assert_eq!(r.items()[0].as_int(), Some(1));
        assert_eq!(r.items()[1].items()[0].as_str().as_deref(), Some("x"));
        assert_eq!(parse(b"*-1\r\n").unwrap(), Reply::Array(None));
    }

    #[test]
    fn refuses_what_is_not_resp() {
        assert!(matches!(parse(b"hello\r\n"), Err(Error::Protocol(_))));
        assert!(matches!(parse(b"+OK\n"), Err(Error::Protocol(_))));
        assert!(matches!(
            parse(b"$999999999999\r\n"),
            Err(Error::Protocol(_))
        ));
        assert!(matches!(parse(b"$3\r\nab"), Err(Error::Io(_))));
        assert!(matches!(parse(b""), Err(Error::Io(_))));
    }
}
