//! sendmail: the Postfix/Sendmail-compatible submission command.
fn main() {
    postern_tools::sendmail::main_as("sendmail")
}
