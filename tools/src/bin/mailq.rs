//! mailq: `postqueue -p` (see `postern_tools::postqueue`).
fn main() {
    postern_tools::postqueue::main_as("mailq")
}
