//! The SMTP command language, as pure functions: splitting a command line
//! into words the way Postfix's `smtpd_token` does, taking the address
//! out of a `<path>`, and decoding the ESMTP parameters smtpd accepts
//! (SIZE, BODY, RFC 3461 DSN: NOTIFY, ORCPT, ENVID, RET).

use postern_common::qfile::{NOTIFY_DELAY, NOTIFY_FAILURE, NOTIFY_NEVER, NOTIFY_SUCCESS};

/// One word of a command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Token {
    /// The word as sent, quotes and angle brackets included.
    pub text: String,
    /// A `<` or `"` without its closing partner.
    pub unterminated: bool,
}

fn is_space(c: char) -> bool {
    matches!(c, ' ' | '\t' | '\n' | '\r' | '\x0b' | '\x0c')
}

/// Reads a `<...>` or `"..."` group starting after its opening character,
/// honouring nested quotes and backslash escapes.
fn quoted(chars: &[char], i: &mut usize, tok: &mut String, start: char, last: char) -> bool {
    let mut stack = vec![last];
    tok.push(start);
    while *i < chars.len() {
        let c = chars[*i];
        *i += 1;
        tok.push(c);
        let wanted = *stack.last().unwrap_or(&last);
        if c == '\\' {
            if *i >= chars.len() {
                break;
            }
            tok.push(chars[*i]);
            *i += 1;
        } else if c == wanted {
            if stack.len() == 1 {
                return true;
            }
            stack.pop();
        } else if c == '"' {
            stack.push('"');
        } else if c == '<' && wanted == '>' {
            stack.push('>');
        }
    }
    false
}

/// Splits a command line into words. `FROM:` and `TO:` end a word at
/// their colon, so `MAIL FROM:<a@b>` and `MAIL FROM: <a@b>` both give
/// `MAIL`, `FROM:`, `<a@b>`. Angle brackets and quotes group white space.
pub fn tokenize(line: &str) -> Vec<Token> {
    let chars: Vec<char> = line.chars().collect();
    let mut out = Vec::new();
    let mut i = 0;
    loop {
        let mut tok = String::new();
        let mut unterminated = false;
        while i < chars.len() {
            let c = chars[i];
            i += 1;
            if is_space(c) {
                while i < chars.len() && is_space(chars[i]) {
                    i += 1;
                }
                if !tok.is_empty() {
                    break;
                }
            } else if c == '<' {
                unterminated |= !quoted(&chars, &mut i, &mut tok, '<', '>');
            } else if c == '"' {
                unterminated |= !quoted(&chars, &mut i, &mut tok, '"', '"');
            } else if c == ':' {
                tok.push(':');
                if tok.eq_ignore_ascii_case("to:") || tok.eq_ignore_ascii_case("from:") {
                    break;
                }
            } else {
                tok.push(c);
                if c == '\\' && i < chars.len() {
                    tok.push(chars[i]);
                    i += 1;
                }
            }
        }
        if tok.is_empty() {
            break;
        }
        out.push(Token {
            text: tok,
            unterminated,
        });
    }
    out
}

/// The SMTP commands smtpd knows, plus those it recognizes but does not
/// offer (answered "502 5.5.1 Error: command not implemented").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verb {
    Helo,
    Ehlo,
    StartTls,
    Auth,
    Mail,
    Rcpt,
    Data,
    Bdat,
    Rset,
    Noop,
    Vrfy,
    Etrn,
    Quit,
    Help,
}

impl Verb {
    /// Every verb, in the order Postfix lists command counts on its
    /// `disconnect from` line.
    pub const ALL: [Verb; 14] = [
        Verb::Helo,
        Verb::Ehlo,
        Verb::StartTls,
        Verb::Auth,
        Verb::Mail,
        Verb::Rcpt,
        Verb::Data,
        Verb::Bdat,
        Verb::Rset,
        Verb::Noop,
        Verb::Vrfy,
        Verb::Etrn,
        Verb::Quit,
        Verb::Help,
    ];

    pub fn parse(word: &str) -> Option<Verb> {
        Verb::ALL
            .into_iter()
            .find(|v| v.name().eq_ignore_ascii_case(word))
    }

    /// The upper-case name, as in logs ("after RCPT").
    pub fn name(self) -> &'static str {
        match self {
            Verb::Helo => "HELO",
            Verb::Ehlo => "EHLO",
            Verb::StartTls => "STARTTLS",
            Verb::Auth => "AUTH",
            Verb::Mail => "MAIL",
            Verb::Rcpt => "RCPT",
            Verb::Data => "DATA",
            Verb::Bdat => "BDAT",
            Verb::Rset => "RSET",
            Verb::Noop => "NOOP",
            Verb::Vrfy => "VRFY",
            Verb::Etrn => "ETRN",
            Verb::Quit => "QUIT",
            Verb::Help => "HELP",
        }
    }

    /// Commands this version recognizes but does not implement.
    pub fn implemented(self) -> bool {
        !matches!(self, Verb::Bdat | Verb::Etrn)
    }

    /// Commands a client may repeat without end (HELO, NOOP, ...): past
    /// the junk command limit each one counts as an error.
    pub fn is_junk(self) -> bool {
        matches!(
            self,
            Verb::Helo | Verb::Ehlo | Verb::Rset | Verb::Noop | Verb::Vrfy | Verb::Etrn
        )
    }
}

/// Whether a word looks like a message header name (`Subject:`): a client
/// that sends headers as commands has lost track of the dialogue, or is
/// trying to smuggle a message.
pub fn is_header(word: &str) -> bool {
    match word.find(':') {
        Some(0) | None => false,
        Some(i) => word[..i]
            .bytes()
            .all(|b| (33..=126).contains(&b) && b != b':'),
    }
}

/// Why an address was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadAddress;

/// The envelope address inside a MAIL FROM or RCPT TO word, in Postfix's
/// internal form: angle brackets and any source route (`@a,@b:`) removed,
/// a quoted local part unquoted (`"a b"@x` → `a b@x`). `<>` gives "".
pub fn extract_address(word: &str) -> Result<String, BadAddress> {
    let text = match (word.strip_prefix('<'), word.ends_with('>')) {
        (Some(inner), true) if !inner.is_empty() => &inner[..inner.len() - 1],
        (Some(_), _) => return Err(BadAddress),
        (None, _) => word,
    };
    let text = match (text.starts_with('@'), text.find(':')) {
        (true, Some(colon)) => &text[colon + 1..],
        _ => text,
    };
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    let mut in_literal = false;
    while let Some(c) = chars.next() {
        if c.is_control() {
            return Err(BadAddress);
        }
        if in_literal {
            match c {
                ']' => in_literal = false,
                '[' | '\\' => return Err(BadAddress),
                _ => {}
            }
            out.push(c);
            continue;
        }
        match c {
            '"' => loop {
                match chars.next() {
                    None => return Err(BadAddress),
                    Some('"') => break,
                    Some('\\') => match chars.next() {
                        Some(e) if !e.is_control() => out.push(e),
                        _ => return Err(BadAddress),
                    },
                    Some(q) if q.is_control() => return Err(BadAddress),
                    Some(q) => out.push(q),
                }
            },
            '\\' => match chars.next() {
                Some(e) if !e.is_control() => out.push(e),
                _ => return Err(BadAddress),
            },
            '[' => {
                in_literal = true;
                out.push(c);
            }
            ' ' | '<' | '>' | '(' | ')' | ',' | ';' | ']' => return Err(BadAddress),
            _ => out.push(c),
        }
    }
    if in_literal {
        return Err(BadAddress);
    }
    if let Some(at) = out.rfind('@') {
        if at == 0 || at == out.len() - 1 {
            return Err(BadAddress);
        }
    }
    Ok(out)
}

/// Decodes RFC 3461 xtext (`+2B` for `+`). `None` when malformed or when
/// the result is not printable text.
pub fn xtext_decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => {
                let hex = s.get(i + 1..i + 3)?;
                if !hex
                    .bytes()
                    .all(|h| h.is_ascii_digit() || (b'A'..=b'F').contains(&h))
                {
                    return None;
                }
                out.push(u8::from_str_radix(hex, 16).ok()?);
                i += 3;
            }
            c if (b'!'..=b'~').contains(&c) && c != b'=' => {
                out.push(c);
                i += 1;
            }
            _ => return None,
        }
    }
    let s = String::from_utf8(out).ok()?;
    s.chars().all(|c| !c.is_control() || c == '\t').then_some(s)
}

/// Decodes RFC 6533 unitext (`\x{E9}` for `é`) as used in `ORCPT=utf-8;`.
fn uxtext_decode(s: &str) -> Option<String> {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(p) = rest.find("\\x{") {
        out.push_str(&rest[..p]);
        let after = &rest[p + 3..];
        let end = after.find('}')?;
        let code = u32::from_str_radix(&after[..end], 16).ok()?;
        out.push(char::from_u32(code)?);
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    out.chars().all(|c| !c.is_control()).then_some(out)
}

/// `NOTIFY=SUCCESS,FAILURE,DELAY` or `NOTIFY=NEVER` as queue-file bits.
pub fn parse_notify(v: &str) -> Option<u8> {
    let mut mask = 0u8;
    for word in v.split(',') {
        mask |= match word.to_ascii_uppercase().as_str() {
            "SUCCESS" => NOTIFY_SUCCESS,
            "FAILURE" => NOTIFY_FAILURE,
            "DELAY" => NOTIFY_DELAY,
            "NEVER" => NOTIFY_NEVER,
            _ => return None,
        };
    }
    if mask & NOTIFY_NEVER != 0 && mask != NOTIFY_NEVER {
        return None;
    }
    Some(mask)
}

/// `ORCPT=addr-type;xtext` decoded to `addr-type;address`.
pub fn parse_orcpt(v: &str) -> Option<String> {
    let (kind, coded) = v.split_once(';')?;
    if kind.is_empty() || !kind.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-') {
        return None;
    }
    let addr = if kind.eq_ignore_ascii_case("utf-8") {
        uxtext_decode(coded)?
    } else {
        xtext_decode(coded)?
    };
    Some(format!("{kind};{addr}"))
}

/// `RET=FULL` or `RET=HDRS`, upper-cased.
pub fn parse_ret(v: &str) -> Option<String> {
    let v = v.to_ascii_uppercase();
    matches!(v.as_str(), "FULL" | "HDRS").then_some(v)
}

/// The value of `NAME=value` when the word's name is `name`
/// (case-insensitive).
pub fn param<'a>(word: &'a str, name: &str) -> Option<&'a str> {
    let (n, v) = word.split_once('=')?;
    n.eq_ignore_ascii_case(name).then_some(v)
}

/// Replaces what must not appear in a HELO name kept for logs and
/// headers, as Postfix's `neuter()`: white space, `<>()\";@`, and
/// control characters become `?`.
pub fn neuter(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_control() || " <>()\\\";@".contains(c) {
                '?'
            } else {
                c
            }
        })
        .collect()
}

/// Makes bytes printable for a log line (`?` for control characters).
pub fn printable(b: &[u8], max: usize) -> String {
    String::from_utf8_lossy(&b[..b.len().min(max)])
        .chars()
        .map(|c| if c.is_control() { '?' } else { c })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn words(line: &str) -> Vec<String> {
        tokenize(line).into_iter().map(|t| t.text).collect()
    }

    #[test]
    fn tokens() {
        assert_eq!(words("MAIL FROM:<a@b>"), ["MAIL", "FROM:", "<a@b>"]);
        assert_eq!(
            words("mail from: <a@b> SIZE=10"),
            ["mail", "from:", "<a@b>", "SIZE=10"]
        );
        assert_eq!(
            words("RCPT TO:<\"x y\"@b> NOTIFY=NEVER"),
            ["RCPT", "TO:", "<\"x y\"@b>", "NOTIFY=NEVER"]
        );
        assert_eq!(words("  NOOP   "), ["NOOP"]);
        assert_eq!(words("RCPT TO:<a b@c>"), ["RCPT", "TO:", "<a b@c>"]);
        assert!(words("").is_empty());
        assert!(tokenize("MAIL FROM:<a@b").iter().any(|t| t.unterminated));
        assert!(!tokenize("MAIL FROM:<a@b>").iter().any(|t| t.unterminated));
        assert_eq!(words("HELO host:name"), ["HELO", "host:name"]);
        assert_eq!(words("x\\ y"), ["x\\ y"]);
    }

    #[test]
    fn verbs() {
        assert_eq!(Verb::parse("ehlo"), Some(Verb::Ehlo));
        assert_eq!(Verb::parse("StartTLS"), Some(Verb::StartTls));
        assert_eq!(Verb::parse("XYZZY"), None);
        assert!(!Verb::Bdat.implemented());
        assert!(Verb::Auth.implemented());
        assert!(Verb::Mail.implemented());
        assert!(is_header("Subject:"));
        assert!(is_header("From:x"));
        assert!(!is_header(":x"));
        assert!(!is_header("MAIL"));
    }

    #[test]
    fn addresses() {
        assert_eq!(extract_address("<a@b.test>").unwrap(), "a@b.test");
        assert_eq!(extract_address("a@b.test").unwrap(), "a@b.test");
        assert_eq!(extract_address("<>").unwrap(), "");
        assert_eq!(extract_address("<@r1,@r2:u@d>").unwrap(), "u@d");
        assert_eq!(extract_address("<\"a b\"@d>").unwrap(), "a b@d");
        assert_eq!(extract_address("<\"a\\\"b\"@d>").unwrap(), "a\"b@d");
        assert_eq!(extract_address("<u@[127.0.0.1]>").unwrap(), "u@[127.0.0.1]");
        assert_eq!(extract_address("<postmaster>").unwrap(), "postmaster");
        assert_eq!(
            extract_address("<jörg@bücher.test>").unwrap(),
            "jörg@bücher.test"
        );
        for bad in [
            "<a b@c>",
            "<a@b",
            "<a@b>>",
            "<a@>",
            "<@b>",
            "<a<b>",
            "<a@[1.2>",
            "<\"ab@c>",
            "<a\u{1}@b>",
            "<a@b,c@d>",
        ] {
            assert!(extract_address(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn dsn_params() {
        assert_eq!(
            parse_notify("success,FAILURE"),
            Some(NOTIFY_SUCCESS | NOTIFY_FAILURE)
        );
        assert_eq!(parse_notify("NEVER"), Some(NOTIFY_NEVER));
        assert_eq!(parse_notify("NEVER,DELAY"), None);
        assert_eq!(parse_notify("SOMETIMES"), None);
        assert_eq!(parse_notify(""), None);
        assert_eq!(
            parse_orcpt("rfc822;a+2Bb@c").as_deref(),
            Some("rfc822;a+b@c")
        );
        assert_eq!(
            parse_orcpt("utf-8;j\\x{F6}rg@c").as_deref(),
            Some("utf-8;jörg@c")
        );
        assert_eq!(parse_orcpt("rfc822"), None);
        assert_eq!(parse_orcpt("rfc822;a+2"), None);
        assert_eq!(parse_orcpt("rfc822;a+0Ab"), None);
        assert_eq!(xtext_decode("abc+3Ddef").as_deref(), Some("abc=def"));
        assert_eq!(xtext_decode("a=b"), None);
        assert_eq!(xtext_decode("a+zz"), None);
        assert_eq!(parse_ret("hdrs").as_deref(), Some("HDRS"));
        assert_eq!(parse_ret("some"), None);
        assert_eq!(param("SIZE=100", "size"), Some("100"));
        assert_eq!(param("SIZE", "size"), None);
        assert_eq!(neuter("a b<c>"), "a?b?c?");
    }
}
