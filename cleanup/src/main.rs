//! cleanup: canonicalizes a new message and writes its queue file.
//!
//! The program is a thin shell: everything is in the library
//! (`src/lib.rs`), where the crate documentation lists the modules.

fn main() {
    let (cfg, _args) = postern_common::service::start("cleanup");
    postern_cleanup::server::run(&cfg)
}
