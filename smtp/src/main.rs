//! smtp: the SMTP delivery agent (master.cf services `smtp` and `relay`).
//!
//! The program is a thin shell: everything is in the library
//! (`src/lib.rs`), whose crate documentation describes the agent and
//! lists its modules.

fn main() {
    postern_smtp::run()
}
