//! postmap: builds, queries and updates lookup tables (see `postern_tools::postmap`).
fn main() {
    postern_tools::postmap::main_as("postmap", false)
}
