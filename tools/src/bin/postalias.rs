//! postalias: builds, queries and updates alias tables (see `postern_tools::postmap`).
fn main() {
    postern_tools::postmap::main_as("postalias", true)
}
