//! The message content: streamed after DATA (dot-stuffed, ending with
//! the `.` line) or sent as BDAT chunks (RFC 3030).

use super::session::Session;
use super::{stage, DataEncoder, End, Transaction};
use crate::reply::Reply;
use postern_common::ipc::Outcome;
use postern_common::{info, warning};
use std::io::{self, Read, Write};

impl Session<'_, '_> {
    /// The content as BDAT chunks (RFC 3030) of at most 64 KiB of queue
    /// file each, a smaller message in one chunk (CRLF line ends, no
    /// dot-stuffing), the last one `BDAT n LAST`; each chunk but the last
    /// has its reply read before the next goes out. Then the reply (LMTP:
    /// replies) to the end of the content.
    pub(super) fn send_bdat<T: Transaction>(&mut self, txn: &mut T, accepted: &[usize]) -> End {
        // From here on a failure may leave a copy at the server: every
        // accepted recipient gets an outcome now.
        self.timeout(self.settings.timeouts.data_xfer);
        match self.bdat_chunks(txn) {
            Ok(()) => self.end_of_data(txn, accepted),
            // Drop the connection without BDAT LAST: the server discards
            // the partial message.
            Err(Trouble::Local(e)) => self.local_error(txn, accepted, &e),
            Err(Trouble::Io(e)) => {
                let f = self.io_failure(&e, stage::BDAT);
                Self::record_all(txn, accepted, Outcome::Deferred, &f.dsn, &f.reason);
                End::Complete
            }
            Err(Trouble::Refused(r)) => {
                let (outcome, dsn, reason) = self.said(&r, "BDAT command");
                Self::record_all(txn, accepted, outcome, &dsn, &reason);
                if r.code != 421 {
                    // A kept session starts the next transaction with RSET.
                    self.done();
                }
                End::Complete
            }
        }
    }

    /// Sends the BDAT chunks; see [`Session::send_bdat`].
    pub(super) fn bdat_chunks<T: Transaction>(&mut self, txn: &mut T) -> Result<(), Trouble> {
        let chunk = buffer_size(txn.content_size());
        let mut content = txn.content().map_err(Trouble::Local)?;
        let mut enc = DataEncoder::bdat().line_limit(self.settings.line_limit);
        let mut inbuf = vec![0u8; chunk];
        let mut pending: Vec<u8> = Vec::with_capacity(chunk + chunk / 2);
        let mut next: Vec<u8> = Vec::with_capacity(chunk + chunk / 2);
        let mut started = false;
        loop {
            // A whole chunk's worth, however the content reads.
            let mut n = 0;
            while n < chunk {
                match content.read(&mut inbuf[n..]) {
                    Ok(0) => break,
                    Ok(k) => n += k,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(Trouble::Local(e)),
                }
            }
            if n == 0 {
                break;
            }
            next.clear();
            enc.feed(&inbuf[..n], &mut next);
            if started {
                // A chunk that is not the last: send it, read its reply.
                self.queue(&format!("BDAT {}", pending.len()));
                self.wbuf.extend_from_slice(&pending);
                self.flush().map_err(Trouble::Io)?;
                let r = self.read().map_err(Trouble::Io)?;
                if r.class() != 2 {
                    return Err(Trouble::Refused(r));
                }
            }
            std::mem::swap(&mut pending, &mut next);
            started = true;
        }
        drop(content);
        enc.finish(&mut pending);
        self.log_folded(txn, &enc);
        self.queue(&format!("BDAT {} LAST", pending.len()));
        self.wbuf.extend_from_slice(&pending);
        self.flush().map_err(Trouble::Io)
    }

    /// A problem reading our own queue file: defer, and drop the
    /// connection without finishing the transaction.
    pub(super) fn local_error<T: Transaction>(
        &mut self,
        txn: &mut T,
        which: &[usize],
        e: &io::Error,
    ) -> End {
        warning!("read message content: {e}");
        let reason = format!("local data error while talking to {}", self.peer.namaddr);
        Self::record_all(txn, which, Outcome::Deferred, "4.3.0", &reason);
        End::Complete
    }

    /// Streams the content, encoded, and the final dot.
    pub(super) fn send_content<T: Transaction>(&mut self, txn: &mut T) -> Result<(), Trouble> {
        let size = buffer_size(txn.content_size());
        let mut content = txn.content().map_err(Trouble::Local)?;
        let mut enc = DataEncoder::new().line_limit(self.settings.line_limit);
        let mut inbuf = vec![0u8; size];
        let mut out = Vec::with_capacity(size + size / 2);
        loop {
            let n = match content.read(&mut inbuf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(Trouble::Local(e)),
            };
            out.clear();
            enc.feed(&inbuf[..n], &mut out);
            self.conn.write_all(&out).map_err(Trouble::Io)?;
        }
        drop(content);
        out.clear();
        enc.finish(&mut out);
        self.log_folded(txn, &enc);
        self.conn.write_all(&out).map_err(Trouble::Io)?;
        self.conn.flush().map_err(Trouble::Io)
    }

    /// Says once per transaction that long lines were broken, as
    /// Postfix's smtp does.
    pub(super) fn log_folded<T: Transaction>(&self, txn: &T, enc: &DataEncoder) {
        if enc.folded() {
            info!(
                "{}: breaking line > {} bytes with <CR><LF>SPACE",
                txn.queue_id(),
                self.settings.line_limit
            );
        }
    }
}

/// Why sending the content stopped.
pub(super) enum Trouble {
    /// Reading our queue file failed.
    Local(io::Error),
    /// Writing to the server failed.
    Io(io::Error),
    /// The server refused a BDAT chunk.
    Refused(Reply),
}

/// The content buffers' size for a message of `content_size` bytes: the
/// message and a byte (so that its end is read in one pass), at least
/// 4 KiB, at most 64 KiB (the BDAT chunk). Buffers for 64 KiB whatever
/// the message were 160 KiB more per delivery in flight for a small one
/// (with the queue file reader's, `ContentReader::sized`). A wrong size
/// costs only more passes.
pub(crate) fn buffer_size(content_size: u64) -> usize {
    const CHUNK: u64 = 64 * 1024;
    content_size.saturating_add(1).clamp(4096, CHUNK) as usize
}
