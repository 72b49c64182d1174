//! postconf: prints and edits main.cf parameters.
fn main() {
    postern_tools::postconf::main()
}
