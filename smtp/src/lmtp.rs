//! lmtp: the LMTP delivery agent (master.cf service `lmtp`): the smtp
//! agent's program under the name `lmtp` (see `main.rs`, whose crate doc
//! describes both).

#[path = "main.rs"]
mod agent;
// The modules' `crate::` paths, as in the smtp program.
use agent::{cache, client, dns, nexthop, reply, sasl, tls};

fn main() {
    agent::main()
}
