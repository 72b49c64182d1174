//! TCP connections to a server: within `smtp_connect_timeout`, from
//! `smtp_bind_address` or `smtp_bind_address6` when set.

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
        connect_from(from, sa, timeout)?
    } else if timeout.is_zero() {
        TcpStream::connect(sa)?
    } else {
        TcpStream::connect_timeout(&sa, timeout)?
    };
    // The client writes whole commands (a pipelined group, the content,
    // the end of data) and then waits for replies: Nagle's algorithm would
    // hold the last small write until the server's delayed ACK, some 40 ms
    // per exchange.
    let _ = stream.set_nodelay(true);
    Ok(stream)
}

/// `smtp_bind_address` and `smtp_bind_address6`.
#[derive(Debug, Clone, Copy, Default)]
pub struct Bind {
    pub v4: Option<std::net::IpAddr>,
    pub v6: Option<std::net::IpAddr>,
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
    bind(
        fd.as_raw_fd(),
        &SockaddrStorage::from(SocketAddr::new(from, 0)),
    )?;
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
