//! `local`: Postern's local delivery agent, as Postfix's local(8).
//!
//! master starts it for the `local` service (`local unix - n n - - local`)
//! and qmgr sends it one delivery request per connection on
//! `private/local` (or a batch for one recipient with a backlog, whose
//! Maildir deliveries share one sync of `new/`: `deliver::Agent::deliver_batch`),
//! for recipients whose domain is in `mydestination`.
//! It resolves each recipient through `alias_maps`, delivers to
//! mailboxes (Maildir or mbox), files and commands, forwards remote alias
//! targets (and `luser_relay`) through cleanup (`public/cleanup`), and
//! records every recipient's outcome in the queue file before answering.
//!
//! What it may touch: the queue file of the request (read, and "done"
//! marks through `postern_common::delivery`), the `defer/` and `bounce/`
//! logs, recipients' mailboxes (as the recipient), files named by aliases
//! and the commands they run (as `default_privs`). Run by a root master it
//! keeps root only to switch its effective ids for each write; it is
//! single-threaded and serves one request at a time.
//!
//! The modules are in the crate's library (`postern_local`, see its
//! `lib.rs`), shared with the `virtual` agent (`src/bin/virtual.rs`).

use postern_common::fatal;
use postern_local::deliver;

fn main() {
    let (cfg, _args) = postern_common::service::start("local");
    let agent = match deliver::Agent::new(&cfg) {
        Ok(a) => a,
        Err(e) => fatal!("{e}"),
    };
    postern_common::delivery::serve_batches(&cfg, |jobs| agent.deliver_batch(jobs))
}
