//! `verify`: the program master starts for the `verify` service. The
//! logic is in the crate's library (`postern_verify`, see its `lib.rs`).

fn main() {
    let (cfg, _args) = postern_common::service::start("verify");
    postern_verify::run(&cfg)
}
