//! postdrop: the set-gid helper that writes a local user's message into maildrop/.
fn main() {
    postern_tools::postdrop::main()
}
