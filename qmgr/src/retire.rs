//! Retiring finished queue files off the main thread.
//!
//! Freeing a file's blocks can wait on the disk: with the `discard` mount
//! option and no journal, ext4 trims the freed blocks synchronously inside
//! the truncate (or the unlink). qmgr's one thread must not stall on that
//! per message, so the file of a finished message is handed to this
//! thread, which retires it ([`QueueTree::retire`]: emptied into
//! `spare/`, or removed). A crash before it gets there
//! leaves the file in `active/`, with its recipients marked done: at
//! start-up it is taken back and finishes at once.

use postern_common::queue::{Queue, QueueTree};
use postern_common::{info, warning};
use std::sync::mpsc::{channel, Sender};

/// How long the thread lets finished files gather after the first one
/// before it retires them. Under load one wake-up per batch instead of
/// one per message (`bench/tls --threads`: 0.9 per message before); a
/// finished file stays that much longer in `active/`, with every
/// recipient marked done, which is all a crash meanwhile would find.
const GATHER: std::time::Duration = std::time::Duration::from_millis(10);

pub struct Retirer {
    tx: Option<Sender<String>>,
    thread: Option<std::thread::JoinHandle<()>>,
    tree: QueueTree,
}

impl Retirer {
    pub fn new(tree: QueueTree) -> Retirer {
        // The manager's unit tests (e2e) look at the queue right after a
        // round: there the file is retired on the spot.
        if cfg!(test) {
            return Retirer {
                tx: None,
                thread: None,
                tree,
            };
        }
        let (tx, rx) = channel::<String>();
        let t = tree.clone();
        let started = std::thread::Builder::new()
            .name("retire".into())
            .spawn(move || {
                while let Ok(first) = rx.recv() {
                    // Let the files of a busy moment gather: one wake-up
                    // of this thread per batch rather than per message.
                    std::thread::sleep(GATHER);
                    retire(&t, &first);
                    for id in rx.try_iter() {
                        retire(&t, &id);
                    }
                }
            });
        let (tx, thread) = match started {
            Ok(t) => (Some(tx), Some(t)),
            Err(_) => (None, None),
        };
        Retirer { tx, thread, tree }
    }

    /// Retires what was handed over and stops the thread (qmgr is about
    /// to exit): no finished file is left half retired in `active/`.
    pub fn finish(&mut self) {
        self.tx = None;
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }

    /// Retires the file of finished message `id` (in `active/`). The
    /// `removed` line is logged here, when qmgr lets go of the message
    /// (its memory and its place in the active queue are freed), not
    /// when the thread gets to the file.
    pub fn retire(&self, id: &str) {
        info!("{id}: removed");
        let queued = self
            .tx
            .as_ref()
            .is_some_and(|tx| tx.send(id.to_string()).is_ok());
        if !queued {
            retire(&self.tree, id);
        }
    }
}

fn retire(tree: &QueueTree, id: &str) {
    if let Err(e) = tree.retire(Queue::Active, id) {
        warning!("{id}: remove active queue file: {e}");
    }
}
