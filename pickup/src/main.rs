//! `pickup`: the program master starts for the `pickup` service. The
//! logic is in the crate's library (`postern_pickup`, see its `lib.rs`).

use postern_pickup::scan;

fn main() {
    let (cfg, _args) = postern_common::service::start("pickup");
    scan::run(&cfg)
}
