//! A small HTTPS client for the two requests Postern makes over the web:
//! the MTA-STS policy fetch (RFC 8461 section 3.3: `GET
//! /.well-known/mta-sts.txt` from `mta-sts.DOMAIN`) and the TLS-RPT report
//! upload (RFC 8460 section 3: `POST` to an `rua=https:` address).
//!
//! HTTP/1.1 written by hand (one request per connection, `Connection:
//! close`): the two requests need no more, and no HTTP crate is in the
//! workspace. The rules RFC 8461 sets: the server's certificate must be
//! valid for the host name by WebPKI (the system roots and
//! `smtp_tls_CAfile`/`smtp_tls_CApath`, [`web_roots`]), redirects are not
//! followed (a 3xx is an error), the body is limited in size, and the
//! whole exchange in time.

use crate::tls::{provider, rustls};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{ClientConfig, ClientConnection, RootCertStore, StreamOwned};
use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The system's CA bundle.
pub const SYSTEM_BUNDLE: &str = "/etc/ssl/certs/ca-certificates.crt";

/// The files of `smtp_tls_CAfile` and of the directory `smtp_tls_CApath`
/// (each may be empty), in that order.
pub fn ca_files(ca_file: &str, ca_path: &str) -> Vec<String> {
    let mut files = Vec::new();
    if !ca_file.is_empty() {
        files.push(ca_file.to_string());
    }
    if !ca_path.is_empty() {
        if let Ok(rd) = std::fs::read_dir(ca_path) {
            for e in rd.flatten() {
                files.push(e.path().to_string_lossy().into_owned());
            }
        }
    }
    files
}

/// The certificates of `files` as a store; `unreadable` is told each
/// file that cannot be read.
pub fn root_store(files: &[String], unreadable: &mut dyn FnMut(&str, String)) -> RootCertStore {
    let mut store = RootCertStore::empty();
    for f in files {
        match CertificateDer::pem_file_iter(f) {
            Ok(it) => {
                for c in it.flatten() {
                    let _ = store.add(c);
                }
            }
            Err(e) => unreadable(f, e.to_string()),
        }
    }
    store
}

/// The WebPKI trust anchors of MTA-STS: the system bundle and the
/// administrator's `smtp_tls_CAfile` and `smtp_tls_CApath` (each may be
/// empty), as a store. Unreadable files are skipped.
pub fn web_roots(ca_file: &str, ca_path: &str) -> RootCertStore {
    let mut files = vec![SYSTEM_BUNDLE.to_string()];
    files.extend(ca_files(ca_file, ca_path));
    root_store(&files, &mut |_, _| {})
}

/// One request.
pub struct Request<'a> {
    /// `GET` or `POST`.
    pub method: &'a str,
    /// The host name (certificate name, SNI, `Host:`).
    pub host: &'a str,
    pub port: u16,
    /// The path and query, starting with `/`.
    pub path: &'a str,
    /// For POST: the content type and body.
    pub body: Option<(&'a str, &'a [u8])>,
    /// The longest response body accepted.
    pub limit: usize,
    /// The whole exchange (connect, TLS, request, response).
    pub timeout: Duration,
}

/// The answer: status code and body.
#[derive(Debug)]
pub struct Response {
    pub status: u16,
    pub body: Vec<u8>,
}

/// Runs `req` against the first of `addrs` that accepts a connection.
pub fn request(
    req: &Request<'_>,
    addrs: &[IpAddr],
    roots: Arc<RootCertStore>,
) -> Result<Response, String> {
    let deadline = Instant::now() + req.timeout;
    let mut last = format!("{}: no address", req.host);
    for ip in addrs {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break;
        }
        let sa = SocketAddr::new(*ip, req.port);
        match TcpStream::connect_timeout(&sa, left) {
            Ok(s) => return exchange(req, s, roots, deadline),
            Err(e) => last = format!("connect to {}[{ip}]:{}: {e}", req.host, req.port),
        }
    }
    Err(last)
}

fn exchange(
    req: &Request<'_>,
    sock: TcpStream,
    roots: Arc<RootCertStore>,
    deadline: Instant,
) -> Result<Response, String> {
    let config = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    let name = ServerName::try_from(req.host.to_string())
        .map_err(|e| format!("{}: invalid host name: {e}", req.host))?;
    let conn =
        ClientConnection::new(Arc::new(config), name).map_err(|e| format!("{}: {e}", req.host))?;
    let mut tls = StreamOwned::new(conn, sock);
    let set = |tls: &mut StreamOwned<ClientConnection, TcpStream>| -> Result<(), String> {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(format!("{}: timed out", req.host));
        }
        tls.sock
            .set_read_timeout(Some(left))
            .and_then(|_| tls.sock.set_write_timeout(Some(left)))
            .map_err(|e| e.to_string())
    };
    let mut head = format!(
        "{} {} HTTP/1.1\r\nHost: {}\r\nUser-Agent: Postern\r\nConnection: close\r\n",
        req.method, req.path, req.host
    );
    if let Some((ctype, body)) = req.body {
        head.push_str(&format!(
            "Content-Type: {ctype}\r\nContent-Length: {}\r\n",
            body.len()
        ));
    }
    head.push_str("\r\n");
    set(&mut tls)?;
    let mut out = head.into_bytes();
    if let Some((_, body)) = req.body {
        out.extend_from_slice(body);
    }
    tls.write_all(&out)
        .and_then(|_| tls.flush())
        .map_err(|e| format!("{}: {e}", req.host))?;
    // The head (at most 16 KiB) and the body (at most `limit`).
    let cap = req.limit + 16 * 1024;
    let mut got: Vec<u8> = Vec::new();
    let mut buf = [0u8; 8192];
    loop {
        set(&mut tls)?;
        match tls.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                got.extend_from_slice(&buf[..n]);
                if got.len() > cap {
                    return Err(format!(
                        "{}: response larger than {} bytes",
                        req.host, req.limit
                    ));
                }
                if response_complete(&got) {
                    break;
                }
            }
            // Servers that close without close_notify.
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => break,
            Err(e) => return Err(format!("{}: {e}", req.host)),
        }
    }
    parse_response(&got, req.limit).map_err(|e| format!("{}: {e}", req.host))
}

/// Whether `got` holds a whole response whose length is known.
fn response_complete(got: &[u8]) -> bool {
    let Some(end) = find(got, b"\r\n\r\n") else {
        return false;
    };
    match header(&got[..end], "content-length").and_then(|v| v.parse::<usize>().ok()) {
        Some(n) => got.len() >= end + 4 + n,
        None => false,
    }
}

fn find(h: &[u8], n: &[u8]) -> Option<usize> {
    h.windows(n.len()).position(|w| w == n)
}

fn header(head: &[u8], name: &str) -> Option<String> {
    String::from_utf8_lossy(head).lines().skip(1).find_map(|l| {
        let (n, v) = l.split_once(':')?;
        n.trim()
            .eq_ignore_ascii_case(name)
            .then(|| v.trim().to_string())
    })
}

/// Status and body of a complete HTTP/1.x response (Content-Length,
/// chunked, or up to the end of the connection). A redirect is an error:
/// RFC 8461 section 3.3 forbids following it.
pub fn parse_response(got: &[u8], limit: usize) -> Result<Response, String> {
    let end = find(got, b"\r\n\r\n").ok_or("incomplete HTTP response")?;
    let head = &got[..end];
    let status_line = String::from_utf8_lossy(head)
        .lines()
        .next()
        .unwrap_or("")
        .to_string();
    let mut parts = status_line.split_whitespace();
    let proto = parts.next().unwrap_or("");
    if !proto.starts_with("HTTP/1.") {
        return Err(format!("not an HTTP response: {status_line:.80}"));
    }
    let status: u16 = parts
        .next()
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| format!("bad status line: {status_line:.80}"))?;
    if (300..400).contains(&status) {
        return Err(format!("redirect refused: {status_line:.80}"));
    }
    let rest = &got[end + 4..];
    let body = if header(head, "transfer-encoding")
        .is_some_and(|v| v.to_ascii_lowercase().contains("chunked"))
    {
        dechunk(rest, limit)?
    } else if let Some(n) = header(head, "content-length").and_then(|v| v.parse::<usize>().ok()) {
        if rest.len() < n {
            return Err("connection closed before the end of the body".into());
        }
        rest[..n].to_vec()
    } else {
        rest.to_vec()
    };
    if body.len() > limit {
        return Err(format!("response larger than {limit} bytes"));
    }
    Ok(Response { status, body })
}

fn dechunk(mut rest: &[u8], limit: usize) -> Result<Vec<u8>, String> {
    let mut body = Vec::new();
    loop {
        let eol = find(rest, b"\r\n").ok_or("incomplete chunked body")?;
        let size_text = String::from_utf8_lossy(&rest[..eol]);
        let size = usize::from_str_radix(size_text.split(';').next().unwrap_or("").trim(), 16)
            .map_err(|_| "bad chunk size")?;
        rest = &rest[eol + 2..];
        if size == 0 {
            return Ok(body);
        }
        if rest.len() < size + 2 || body.len() + size > limit {
            return Err("incomplete or oversized chunked body".into());
        }
        body.extend_from_slice(&rest[..size]);
        rest = &rest[size + 2..];
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn responses() {
        let r = parse_response(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nabcdef", 10).unwrap();
        assert_eq!((r.status, r.body.as_slice()), (200, &b"abc"[..]));
        let r = parse_response(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n",
            10,
        )
        .unwrap();
        assert_eq!(r.body, b"abcde");
        assert!(parse_response(b"HTTP/1.0 301 Moved\r\nLocation: x\r\n\r\n", 10).is_err());
        assert!(parse_response(b"HTTP/1.0 200 OK\r\n\r\n0123456789ab", 10).is_err());
        let r = parse_response(b"HTTP/1.0 404 Not Found\r\n\r\nno", 10).unwrap();
        assert_eq!(r.status, 404);
    }
}
