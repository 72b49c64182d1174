//! qmgr: Postern's queue manager, started by master (master.cf
//! `qmgr unix n - n 300 1 qmgr`).
//!
//! The program is a thin shell: everything is in the library
//! (`src/lib.rs`), where the crate documentation lists the modules.

fn main() {
    let (cfg, _args) = postern_common::service::start("qmgr");
    postern_qmgr::manager::run(&cfg)
}
