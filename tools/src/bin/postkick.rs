//! postkick: sends a request to a Postern trigger service (see `postern_tools::postkick`).
fn main() {
    postern_tools::postkick::main()
}
