//! qshape: the queue's shape by domain and age (see `postern_tools::qshape`).
fn main() {
    postern_tools::qshape::main()
}
