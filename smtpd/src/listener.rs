//! What smtpd accepts clients on: a TCP listener of an `inet` service, or
//! the Unix socket of a `pass` service, over which postscreen hands over
//! each client connection it lets through (one descriptor per
//! connection, [`postern_common::pass_fd`]).

use mio::event::Source;
use mio::net::{TcpListener, TcpStream, UnixListener};
use mio::{Interest, Registry, Token};
use std::io;
use std::net::SocketAddr;
use std::os::fd::{FromRawFd, IntoRawFd, RawFd};
use std::time::Duration;

/// How long postscreen may take to send the descriptor once connected
/// (it sends it right after connecting).
const PASS_WAIT: Duration = Duration::from_secs(5);

pub enum Listener {
    Tcp(TcpListener),
    Pass(UnixListener),
}

impl Listener {
    /// The listener master passed on `fd`: a Unix socket means a `pass`
    /// service.
    ///
    /// # Safety
    /// `fd` must be a listening socket nothing else in the process owns.
    pub unsafe fn from_fd(fd: RawFd) -> io::Result<Listener> {
        let unix = nix::sys::socket::getsockname::<nix::sys::socket::SockaddrStorage>(fd)
            .ok()
            .is_some_and(|a| a.as_unix_addr().is_some());
        if unix {
            let l = std::os::unix::net::UnixListener::from_raw_fd(fd);
            l.set_nonblocking(true)?;
            Ok(Listener::Pass(UnixListener::from_std(l)))
        } else {
            let l = std::net::TcpListener::from_raw_fd(fd);
            l.set_nonblocking(true)?;
            Ok(Listener::Tcp(TcpListener::from_std(l)))
        }
    }

    /// The next client, as `TcpListener::accept` gives it. A hand-off
    /// that goes wrong (postscreen gone, no descriptor) is reported as
    /// `ConnectionAborted`: the caller goes on to the next one.
    pub fn accept(&self) -> io::Result<(TcpStream, SocketAddr)> {
        match self {
            Listener::Tcp(l) => l.accept(),
            Listener::Pass(l) => {
                let (conn, _) = l.accept()?;
                // SAFETY: the descriptor mio gives up is the accepted
                // connection, owned by the std stream from here on.
                let conn =
                    unsafe { std::os::unix::net::UnixStream::from_raw_fd(conn.into_raw_fd()) };
                let aborted =
                    |e: io::Error| io::Error::new(io::ErrorKind::ConnectionAborted, e.to_string());
                conn.set_nonblocking(false).map_err(aborted)?;
                conn.set_read_timeout(Some(PASS_WAIT)).map_err(aborted)?;
                let client = postern_common::pass_fd::recv_fd(&conn).map_err(|e| {
                    postern_common::warning!("receive a client from postscreen: {e}");
                    aborted(e)
                })?;
                let client = std::net::TcpStream::from(client);
                client.set_nonblocking(true).map_err(aborted)?;
                let peer = client.peer_addr().map_err(aborted)?;
                Ok((TcpStream::from_std(client), peer))
            }
        }
    }
}

impl Source for Listener {
    fn register(&mut self, r: &Registry, t: Token, i: Interest) -> io::Result<()> {
        match self {
            Listener::Tcp(l) => l.register(r, t, i),
            Listener::Pass(l) => l.register(r, t, i),
        }
    }
    fn reregister(&mut self, r: &Registry, t: Token, i: Interest) -> io::Result<()> {
        match self {
            Listener::Tcp(l) => l.reregister(r, t, i),
            Listener::Pass(l) => l.reregister(r, t, i),
        }
    }
    fn deregister(&mut self, r: &Registry) -> io::Result<()> {
        match self {
            Listener::Tcp(l) => l.deregister(r),
            Listener::Pass(l) => l.deregister(r),
        }
    }
}
