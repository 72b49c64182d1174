//! Connecting to a TCP service the way Postern's clients of local
//! services do (policy servers, before-queue filters, socketmap tables):
//! each address of the name in turn, each within the timeout, and the
//! same timeout on every read and write afterwards, so that a server
//! that stops answering costs at most that long per step.

use std::io;
use std::net::{TcpStream, ToSocketAddrs};
use std::time::Duration;

/// Connects to the first address of `addr` that answers within
/// `timeout`; the stream has `timeout` on reads and writes and no Nagle
/// delay (requests and replies are small, one at a time).
pub fn connect(addr: impl ToSocketAddrs, timeout: Duration) -> io::Result<TcpStream> {
    let mut last = io::Error::new(io::ErrorKind::NotFound, "no address");
    for a in addr.to_socket_addrs()? {
        match TcpStream::connect_timeout(&a, timeout) {
            Ok(s) => {
                s.set_read_timeout(Some(timeout))?;
                s.set_write_timeout(Some(timeout))?;
                let _ = s.set_nodelay(true);
                return Ok(s);
            }
            Err(e) => last = e,
        }
    }
    Err(last)
}
