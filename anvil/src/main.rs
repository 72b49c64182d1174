//! `anvil`: the program master starts for the `anvil` service. The logic
//! is in the crate's library (`postern_anvil`, see its `lib.rs`).

use postern_anvil::server;

fn main() {
    let (cfg, _args) = postern_common::service::start("anvil");
    postern_common::service::drop_privileges(&cfg);
    server::run(&cfg)
}
