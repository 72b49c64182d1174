//! JSON string literals for the JSON Postern writes by hand (the
//! accounting log, TLS-RPT reports, `postern queues -j`): one escaper, so
//! every file quotes the same way. (postqueue -j keeps its own: it copies
//! Postfix's output byte for byte.)

/// A JSON string literal (RFC 8259): quotes, backslashes and control
/// characters escaped; U+2028/U+2029 too, for readers that treat the
/// output as JavaScript.
pub fn string(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 || c == '\u{2028}' || c == '\u{2029}' => {
                out.push_str(&format!("\\u{:04x}", c as u32))
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn escapes() {
        assert_eq!(super::string("a\"b\\c\n\u{1}"), "\"a\\\"b\\\\c\\n\\u0001\"");
    }
}
