//! Connecting to a TCP service the way Postern's clients of local
//! services do (policy servers, before-queue filters, socketmap tables):
//! each address of the name in turn, each within the timeout, and the
//! same timeout on every read and write afterwards, so that a server
//! that stops answering costs at most that long per step.

use std::io;
use std::net::{TcpStream, ToSocketAddrs};
use std::os::fd::AsFd;
use std::time::Duration;

/// Sends the acknowledgement of what was received on `sock` now, if one
/// is pending, instead of after the delayed-ACK timer (40 ms). For a side
/// that has just read records that call for no answer while the peer has
/// more to send: the peer's kernel may hold that (Nagle) until this ACK.
/// At the end of a TLS 1.3 handshake both ends meet it: the client's
/// EHLO waits behind its Finished (smtpd), and an OpenSSL server's reply
/// to EHLO waits behind its session tickets (the smtp client). Linux's
/// `TCP_QUICKACK`; nothing elsewhere.
pub fn ack_now(sock: impl AsFd) {
    #[cfg(target_os = "linux")]
    {
        use std::os::fd::AsRawFd;
        let one: libc::c_int = 1;
        // SAFETY: a valid socket and a c_int option of the right size.
        unsafe {
            libc::setsockopt(
                sock.as_fd().as_raw_fd(),
                libc::IPPROTO_TCP,
                libc::TCP_QUICKACK,
                (&one as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            );
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = sock;
}

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
