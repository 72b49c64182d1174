//! postsuper: deletes, holds, releases and requeues queued mail (see `postern_tools::postsuper`).
fn main() {
    postern_tools::postsuper::main()
}
