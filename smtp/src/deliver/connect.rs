//! TCP connections to a server: within `smtp_connect_timeout`, from
//! `smtp_bind_address` or `smtp_bind_address6` when set. When the
//! address cannot be bound (not configured on this host), the connection
//! is made from the address the system picks, with a warning, as in
//! Postfix; with `smtp_bind_address_enforce = yes` the attempt fails
//! instead (the delivery is deferred), so that mail never leaves from
//! another source's address.

use crate::nexthop::Server;
use std::io;
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

/// Connects within `timeout` (zero: the system's own limit), from the
/// `bind` address of the server's family when one is set.
pub(super) fn connect(srv: &Server, timeout: Duration, bind: &Bind) -> io::Result<TcpStream> {
    let sa = SocketAddr::new(srv.addr, srv.port);
    let from = match srv.addr {
        std::net::IpAddr::V4(_) => bind.v4,
        std::net::IpAddr::V6(_) => bind.v6,
    };
    let stream = if let Some(from) = from {
        match connect_from(from, sa, timeout) {
            Err(e) if is_bind_error(&e) && !bind.enforce => {
                postern_common::warning!("{e}; connecting from the default address");
                plain(sa, timeout)?
            }
            r => r?,
        }
    } else {
        plain(sa, timeout)?
    };
    // The client writes whole commands (a pipelined group, the content,
    // the end of data) and then waits for replies: Nagle's algorithm would
    // hold the last small write until the server's delayed ACK, some 40 ms
    // per exchange.
    let _ = stream.set_nodelay(true);
    Ok(stream)
}

/// A bind that failed (the error [`connect_from`] makes of it).
fn is_bind_error(e: &io::Error) -> bool {
    e.to_string().starts_with("cannot bind to ")
}

fn plain(sa: SocketAddr, timeout: Duration) -> io::Result<TcpStream> {
    let stream = if timeout.is_zero() {
        TcpStream::connect(sa)?
    } else {
        TcpStream::connect_timeout(&sa, timeout)?
    };
    Ok(stream)
}

/// `smtp_bind_address` and `smtp_bind_address6`.
#[derive(Debug, Clone, Copy, Default)]
pub struct Bind {
    pub v4: Option<std::net::IpAddr>,
    pub v6: Option<std::net::IpAddr>,
    /// `smtp_bind_address_enforce`: a failed bind fails the connection.
    pub enforce: bool,
}

/// A TCP connection from the local address `from` (port chosen by the
/// system), within `timeout` (zero: no limit of ours).
pub(super) fn connect_from(
    from: std::net::IpAddr,
    to: SocketAddr,
    timeout: Duration,
) -> io::Result<TcpStream> {
    use nix::sys::socket::{
        bind, connect, getsockopt, socket, sockopt, AddressFamily, SockFlag, SockType,
        SockaddrStorage,
    };
    use std::os::fd::{AsFd, AsRawFd, OwnedFd};
    let family = if to.is_ipv4() {
        AddressFamily::Inet
    } else {
        AddressFamily::Inet6
    };
    let fd: OwnedFd = socket(
        family,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
        None,
    )?;
    if let Err(e) = bind(
        fd.as_raw_fd(),
        &SockaddrStorage::from(SocketAddr::new(from, 0)),
    ) {
        return Err(io::Error::other(format!(
            "cannot bind to {from}: {}",
            e.desc()
        )));
    }
    match connect(fd.as_raw_fd(), &SockaddrStorage::from(to)) {
        Ok(()) => {}
        Err(nix::errno::Errno::EINPROGRESS) => {
            use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
            let limit = if timeout.is_zero() {
                PollTimeout::NONE
            } else {
                PollTimeout::try_from(timeout).unwrap_or(PollTimeout::MAX)
            };
            let mut writable = [PollFd::new(fd.as_fd(), PollFlags::POLLOUT)];
            if poll(&mut writable, limit)? == 0 {
                return Err(io::Error::from(io::ErrorKind::TimedOut));
            }
            let err = getsockopt(&fd, sockopt::SocketError)?;
            if err != 0 {
                return Err(io::Error::from_raw_os_error(err));
            }
        }
        Err(e) => return Err(e.into()),
    }
    let stream = TcpStream::from(fd);
    stream.set_nonblocking(false)?;
    Ok(stream)
}

/// The system's text for an error ("Connection refused"), as Postfix's %m.
pub(super) fn strerror(e: &io::Error) -> String {
    match e.raw_os_error() {
        Some(n) => nix::errno::Errno::from_raw(n).desc().to_string(),
        None if e.kind() == io::ErrorKind::TimedOut => "Connection timed out".into(),
        None => e.to_string(),
    }
}
