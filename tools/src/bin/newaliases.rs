//! newaliases: rebuilds the aliases database (the same as `sendmail -bi`).
fn main() {
    postern_tools::sendmail::main_as("newaliases")
}
