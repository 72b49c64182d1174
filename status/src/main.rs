//! `status`: the program master starts for the status service (the
//! operator's status page and Prometheus metrics). The logic is in the
//! crate's library (`postern_status`, see its `lib.rs`).

fn main() {
    let (cfg, _args) = postern_common::service::start("status");
    postern_status::run(&cfg)
}
