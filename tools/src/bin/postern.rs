//! postern: starts, stops, reloads, checks and reports on the mail system.
fn main() {
    postern_tools::control::main()
}
