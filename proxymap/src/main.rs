//! proxymap: looks up tables for the other daemons (`proxy:TYPE:NAME`),
//! holding the database connections they would each open. The logic is
//! in the crate's library (`postern_proxymap`, see its `lib.rs`).

fn main() {
    let (cfg, args) = postern_common::service::start("proxymap");
    postern_proxymap::run(&cfg, &args.rest)
}
