//! postlog: logs text from scripts in Postern's log (see `postern_tools::postlog`).
fn main() {
    postern_tools::postlog::main()
}
