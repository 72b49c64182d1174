//! sendmail: the Postfix/Sendmail-compatible submission command. As
//! Postfix's, it is also `newaliases` and `mailq` when called by those
//! names (an installation may make them links to sendmail: the Debian
//! package's /usr/bin/newaliases is one).
fn main() {
    let name = std::env::args_os()
        .next()
        .and_then(|a| {
            std::path::Path::new(&a)
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
        })
        .unwrap_or_default();
    match name.as_str() {
        "newaliases" => postern_tools::sendmail::main_as("newaliases"),
        "mailq" => postern_tools::postqueue::main_as("mailq"),
        _ => postern_tools::sendmail::main_as("sendmail"),
    }
}
