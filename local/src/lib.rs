//! The local delivery agents: `local` (local(8): aliases, .forward,
//! mailboxes of accounts, files, commands), `virtual` (virtual(8):
//! mailboxes of virtual users) and `pipe` (pipe(8): external commands). See `main.rs` for local and
//! [`virtual_agent`] for virtual.
//!
//! Modules:
//! - [`deliver`]: one local request, from recipients to recorded outcomes.
//! - [`resolve`]: aliases, .forward, extensions, unknown users (pure).
//! - [`mailbox`]: Maildir and mbox writers, locks.
//! - [`pipe`]: delivery to `|command` and `mailbox_command`.
//! - [`pipe_agent`]: the pipe(8) agent (master.cf `pipe` services).
//! - [`forward`]: resubmission through cleanup.
//! - [`message`]: the header section and the lines put before a copy.
//! - [`status`]: outcomes and how they combine.
//! - [`virtual_agent`]: the virtual(8) agent.

pub mod deliver;
pub mod forward;
pub mod mailbox;
pub mod message;
pub mod pipe;
pub mod pipe_agent;
pub mod resolve;
pub mod spawn_agent;
pub mod status;
pub mod virtual_agent;
