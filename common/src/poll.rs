//! What the mio event loops (smtpd, anvil) share about their sockets.

use mio::event::Source;
use mio::{Interest, Registry, Token};
use std::io;

/// A socket registered for READABLE, and for WRITABLE only while output
/// waits for room: a Unix socket signals EPOLLOUT each time its peer
/// reads, so one always registered for it woke its event loop once for
/// every request the peer took in. The loop writes on every turn; the
/// interest is for the output a full socket held up.
#[derive(Debug, Default)]
pub struct WriteInterest {
    registered: bool,
}

impl WriteInterest {
    /// Registers `source` for WRITABLE too if `pending` (output is left
    /// over), for READABLE alone if not, when that changes.
    pub fn fit<S: Source + ?Sized>(
        &mut self,
        registry: &Registry,
        source: &mut S,
        token: Token,
        pending: bool,
    ) -> io::Result<()> {
        if pending != self.registered {
            let interest = if pending {
                Interest::READABLE | Interest::WRITABLE
            } else {
                Interest::READABLE
            };
            registry.reregister(source, token, interest)?;
            self.registered = pending;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mio::net::UnixStream;
    use mio::{Events, Poll};
    use std::io::{Read, Write};
    use std::time::Duration;

    /// Registered for READABLE alone, a socket is not signalled when its
    /// peer reads what it wrote; with output pending it is signalled
    /// writable; once nothing is pending it is quiet again.
    #[test]
    fn writable_is_signalled_only_while_output_is_pending() {
        let mut poll = Poll::new().unwrap();
        let (mut ours, mut peer) = UnixStream::pair().unwrap();
        let token = Token(7);
        poll.registry()
            .register(&mut ours, token, Interest::READABLE)
            .unwrap();
        let mut events = Events::with_capacity(4);
        let mut signalled = |poll: &mut Poll| {
            poll.poll(&mut events, Some(Duration::from_millis(50)))
                .unwrap();
            events.iter().any(|e| e.token() == token && e.is_writable())
        };
        let mut interest = WriteInterest::default();
        let mut b = [0u8; 7];
        ours.write_all(b"request").unwrap();
        peer.read_exact(&mut b).unwrap();
        assert!(!signalled(&mut poll), "woken by the peer's read");
        interest
            .fit(poll.registry(), &mut ours, token, true)
            .unwrap();
        assert!(signalled(&mut poll), "not told there is room");
        interest
            .fit(poll.registry(), &mut ours, token, false)
            .unwrap();
        ours.write_all(b"request").unwrap();
        peer.read_exact(&mut b).unwrap();
        assert!(!signalled(&mut poll), "woken by the peer's read");
    }
}
