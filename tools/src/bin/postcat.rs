//! postcat: prints a queue file (see `postern_tools::postcat`).
fn main() {
    postern_tools::postcat::main()
}
