//! postqueue: lists the mail queue and flushes it (see `postern_tools::postqueue`).
fn main() {
    postern_tools::postqueue::main_as("postqueue")
}
