//! lmtp: the LMTP delivery agent (master.cf service `lmtp`): the smtp
//! agent under the name `lmtp`, as Postfix's lmtp(8) is smtp(8) under
//! another name (see the crate documentation in `src/lib.rs`).

fn main() {
    postern_smtp::run()
}
