//! The little of HTTP/1.1 (RFC 9110, RFC 9112) the status service needs:
//! one GET (or HEAD) per connection, its head read within
//! [`MAX_HEAD`] bytes and [`HEAD_TIMEOUT`], no body, and a response with
//! `Connection: close`. Anything else gets a clear status: 400 for a
//! malformed or oversized request (or one with a body), 405 for another
//! method, 505 for another HTTP version.

use std::io::{self, Read, Write};
use std::time::{Duration, Instant};

/// The largest request head (request line and header fields) read.
pub const MAX_HEAD: usize = 8192;
/// How long a client has to send its whole request head.
pub const HEAD_TIMEOUT: Duration = Duration::from_secs(10);

/// A request that parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub method: String,
    /// The path, without the query.
    pub path: String,
}

/// Why a request gets no page: the status code and a one-line reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub code: u16,
    pub reason: &'static str,
}

fn bad(reason: &'static str) -> Refusal {
    Refusal { code: 400, reason }
}

/// What reading the head gave.
pub enum Head {
    /// The head, up to and including the blank line.
    Complete(Vec<u8>),
    /// Over [`MAX_HEAD`] bytes without a blank line.
    TooLong,
    /// The client closed or said nothing in time.
    Incomplete,
}

fn head_end(buf: &[u8]) -> Option<usize> {
    buf.windows(4).position(|w| w == b"\r\n\r\n").map(|p| p + 4)
}

/// Reads a request head from `r` (whose read timeout the caller set), at
/// most `MAX_HEAD` bytes, until `deadline`.
pub fn read_head(r: &mut impl Read, deadline: Instant) -> Head {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 2048];
    loop {
        if let Some(end) = head_end(&buf) {
            buf.truncate(end);
            return Head::Complete(buf);
        }
        if buf.len() > MAX_HEAD {
            return Head::TooLong;
        }
        if Instant::now() >= deadline {
            return Head::Incomplete;
        }
        match r.read(&mut chunk) {
            Ok(0) => return Head::Incomplete,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return Head::Incomplete,
        }
    }
}

fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// Parses a request head (RFC 9112 §2-§5).
pub fn parse(head: &[u8]) -> Result<Request, Refusal> {
    let text = std::str::from_utf8(head).map_err(|_| bad("request is not text"))?;
    let mut lines = text.split("\r\n");
    let line = lines.next().unwrap_or("");
    let mut parts = line.split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(bad("malformed request line"));
    };
    if method.is_empty() || !method.bytes().all(is_tchar) {
        return Err(bad("malformed method"));
    }
    if !target.starts_with('/') || !target.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(bad("malformed request target"));
    }
    let Some(v) = version.strip_prefix("HTTP/") else {
        return Err(bad("malformed HTTP version"));
    };
    let minor = match v.as_bytes() {
        [b'1', b'.', m] if m.is_ascii_digit() => m - b'0',
        [a, b'.', b] if a.is_ascii_digit() && b.is_ascii_digit() => {
            return Err(Refusal {
                code: 505,
                reason: "HTTP version not supported",
            })
        }
        _ => return Err(bad("malformed HTTP version")),
    };
    let mut host = 0;
    for field in lines {
        if field.is_empty() {
            break;
        }
        let Some((name, value)) = field.split_once(':') else {
            return Err(bad("malformed header field"));
        };
        // No whitespace before the colon, no obsolete line folding.
        if name.is_empty() || !name.bytes().all(is_tchar) {
            return Err(bad("malformed header field"));
        }
        if value.bytes().any(|b| b.is_ascii_control() && b != b'\t') {
            return Err(bad("malformed header field"));
        }
        let value = value.trim_matches([' ', '\t']);
        if name.eq_ignore_ascii_case("host") {
            host += 1;
        } else if name.eq_ignore_ascii_case("transfer-encoding")
            || (name.eq_ignore_ascii_case("content-length") && value != "0")
        {
            return Err(bad("a request body is not accepted"));
        }
    }
    // RFC 9112 §3.2: exactly one Host in an HTTP/1.1 request.
    if (minor >= 1 && host != 1) || host > 1 {
        return Err(bad("missing or repeated Host header"));
    }
    if method != "GET" && method != "HEAD" {
        return Err(Refusal {
            code: 405,
            reason: "only GET is served",
        });
    }
    let path = target.split(['?', '#']).next().unwrap_or("/").to_string();
    Ok(Request {
        method: method.to_string(),
        path,
    })
}

/// The reason phrase of a status code.
pub fn phrase(code: u16) -> &'static str {
    match code {
        200 => "OK",
        400 => "Bad Request",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        500 => "Internal Server Error",
        505 => "HTTP Version Not Supported",
        _ => "Error",
    }
}

/// Writes a whole response; `head_only` for HEAD.
pub fn respond(
    w: &mut impl Write,
    code: u16,
    content_type: &str,
    body: &[u8],
    head_only: bool,
) -> io::Result<()> {
    let mut out = format!(
        "HTTP/1.1 {code} {}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n\
         Cache-Control: no-store\r\nX-Content-Type-Options: nosniff\r\n\
         Content-Security-Policy: default-src 'none'; style-src 'unsafe-inline'\r\n",
        phrase(code),
        body.len()
    );
    if code == 405 {
        out.push_str("Allow: GET, HEAD\r\n");
    }
    out.push_str("Connection: close\r\n\r\n");
    let mut bytes = out.into_bytes();
    if !head_only {
        bytes.extend_from_slice(body);
    }
    w.write_all(&bytes)?;
    w.flush()
}

/// A short plain-text answer for a refusal.
pub fn refuse(w: &mut impl Write, code: u16, reason: &str) -> io::Result<()> {
    respond(
        w,
        code,
        "text/plain; charset=utf-8",
        format!("{code} {}: {reason}\n", phrase(code)).as_bytes(),
        false,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests() {
        let ok = parse(b"GET /metrics?x=1 HTTP/1.1\r\nHost: a\r\nAccept: */*\r\n\r\n").unwrap();
        assert_eq!(ok.path, "/metrics");
        assert_eq!(parse(b"GET / HTTP/1.0\r\n\r\n").unwrap().path, "/");
        let code = |h: &[u8]| parse(h).map(|_| 200).unwrap_or_else(|r| r.code);
        assert_eq!(code(b"GET / HTTP/1.1\r\n\r\n"), 400, "no Host");
        assert_eq!(code(b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n"), 400);
        assert_eq!(code(b"GET  / HTTP/1.1\r\nHost: a\r\n\r\n"), 400);
        assert_eq!(code(b"GET / HTTP/1.1\r\nHost : a\r\n\r\n"), 400);
        assert_eq!(code(b"GET / HTTP/1.1\r\nHost: a\r\n folded\r\n\r\n"), 400);
        assert_eq!(code(b"GET http://x/ HTTP/1.1\r\nHost: a\r\n\r\n"), 400);
        assert_eq!(code(b"GET / HTTP/2.0\r\nHost: a\r\n\r\n"), 505);
        assert_eq!(code(b"POST / HTTP/1.1\r\nHost: a\r\n\r\n"), 405);
        assert_eq!(
            code(b"GET / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\n"),
            400
        );
        assert_eq!(code(b"\x16\x03\x01\x02\r\n\r\n"), 400);
    }

    #[test]
    fn head_is_bounded() {
        let long = vec![b'a'; MAX_HEAD + 10];
        let deadline = Instant::now() + Duration::from_secs(5);
        assert!(matches!(read_head(&mut &long[..], deadline), Head::TooLong));
        let mut short: &[u8] = b"GET / HTTP/1.0\r\n\r\nrest";
        match read_head(&mut short, deadline) {
            Head::Complete(h) => assert_eq!(h, b"GET / HTTP/1.0\r\n\r\n"),
            _ => panic!("complete head expected"),
        }
        assert!(matches!(
            read_head(&mut &b"GET /"[..], deadline),
            Head::Incomplete
        ));
    }
}
