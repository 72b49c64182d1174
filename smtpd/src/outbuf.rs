//! Bytes waiting to be written to a non-blocking socket: the replies to
//! a client, the requests to cleanup ([`crate::server`],
//! [`crate::cleanup_conn`]).

use std::io::{self, Write};

/// Bytes waiting to be written.
#[derive(Default)]
pub(crate) struct OutBuf {
    buf: Vec<u8>,
    pos: usize,
}

impl OutBuf {
    pub(crate) fn pending(&self) -> usize {
        self.buf.len() - self.pos
    }

    pub(crate) fn push(&mut self, b: &[u8]) {
        if self.pos == self.buf.len() {
            self.buf.clear();
            self.pos = 0;
        } else if self.pos >= 64 * 1024 {
            // Never fully drained: drop what was sent before growing.
            self.buf.drain(..self.pos);
            self.pos = 0;
        }
        self.buf.extend_from_slice(b);
    }

    /// Writes until done or the socket is full; Ok(bytes written).
    pub(crate) fn write_to<W: Write>(&mut self, w: &mut W) -> io::Result<usize> {
        let mut n = 0;
        while self.pos < self.buf.len() {
            match w.write(&self.buf[self.pos..]) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(k) => {
                    self.pos += k;
                    n += k;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        if self.pos == self.buf.len() {
            self.buf.clear();
            self.pos = 0;
        }
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A writer that takes at most `n` bytes per call.
    struct Trickle(Vec<u8>, usize);

    impl Write for Trickle {
        fn write(&mut self, b: &[u8]) -> io::Result<usize> {
            if self.1 == 0 {
                return Err(io::ErrorKind::WouldBlock.into());
            }
            let n = b.len().min(self.1);
            self.0.extend_from_slice(&b[..n]);
            self.1 -= n;
            Ok(n)
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn outbuf_partial_writes_and_compaction() {
        let mut o = OutBuf::default();
        let mut w = Trickle(Vec::new(), 0);
        let mut want = Vec::new();
        for i in 0..100u8 {
            let chunk = vec![i; 10_000];
            o.push(&chunk);
            want.extend_from_slice(&chunk);
            w.1 = 7_000;
            o.write_to(&mut w).unwrap();
            // What was sent is dropped before the buffer grows much.
            assert!(o.buf.len() <= o.pending() + 64 * 1024 + 10_000);
        }
        w.1 = usize::MAX;
        o.write_to(&mut w).unwrap();
        assert_eq!(o.pending(), 0);
        assert_eq!(w.0, want);
    }
}
