//! The SMTP command language a server reads, as pure functions, defined
//! once for smtpd and `sendmail -bs`: splitting a command line into words
//! the way Postfix's `smtpd_token` does, the verbs, taking the address
//! out of a `<path>`, and the ESMTP parameters of MAIL FROM and RCPT TO
//! (SIZE, BODY, AUTH, SMTPUTF8, and RFC 3461 DSN through [`crate::dsn`]).

use crate::{dsn, hostname};

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
        !matches!(self, Verb::Bdat)
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
        if at == 0 || at == out.len() - 1 || !hostname::valid_address_domain(&out[at + 1..]) {
            return Err(BadAddress);
        }
    }
    Ok(out)
}

/// The `<path>` word and the parameter words of `MAIL FROM:<path> ...`
/// or `RCPT TO:<path> ...` (`keyword` is `from:` or `to:`), or `None`
/// when the command does not have that shape (a syntax error).
pub fn path_command<'a>(args: &'a [Token], keyword: &str) -> Option<(&'a Token, Vec<&'a str>)> {
    if args.len() < 3 || !args[1].text.eq_ignore_ascii_case(keyword) {
        return None;
    }
    Some((
        &args[2],
        args[3..].iter().map(|t| t.text.as_str()).collect(),
    ))
}

/// The MAIL FROM extensions the server offers this session, which decide
/// the parameters it takes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Offered {
    /// `AUTH=<mailbox>` (RFC 4954): only where SASL is offered.
    pub auth: bool,
    /// `SMTPUTF8` (RFC 6531).
    pub smtputf8: bool,
    /// `REQUIRETLS` (RFC 8689): only over TLS, where EHLO announced it.
    pub requiretls: bool,
}

/// What the parameters of MAIL FROM said.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MailOptions {
    /// `SIZE=`, 0 when not given.
    pub size: u64,
    /// `RET=FULL|HDRS`.
    pub ret: Option<&'static str>,
    /// `ENVID=`, decoded.
    pub envid: Option<String>,
    /// `AUTH=`, as sent (accepted, not used).
    pub auth: Option<String>,
    /// `SMTPUTF8`: the envelope or headers may hold UTF-8 (RFC 6531).
    pub smtputf8: bool,
    /// `REQUIRETLS`: the message goes on only over authenticated TLS
    /// (RFC 8689).
    pub requiretls: bool,
}

/// What the parameters of RCPT TO said.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RcptOptions {
    /// `NOTIFY=` as queue-file bits, 0 when not given.
    pub notify: u8,
    /// `ORCPT=` as `addr-type;address`, "" when not given.
    pub orcpt: String,
}

/// A MAIL or RCPT parameter refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ParamError {
    /// `SIZE=` not a number.
    SizeSyntax,
    /// `SIZE=` too large to count.
    SizeOverflow,
    /// `RET=` malformed or given twice.
    Ret,
    /// `ENVID=` malformed, too long, or given twice.
    Envid,
    /// `AUTH=` not xtext.
    Auth,
    /// `NOTIFY=` malformed or given twice.
    Notify,
    /// `ORCPT=` malformed or given twice.
    Orcpt,
    /// A parameter the server does not offer (the word as sent).
    Unsupported(String),
}

impl ParamError {
    /// The SMTP reply, as Postfix's smtpd words it.
    pub fn reply(&self) -> String {
        match self {
            ParamError::SizeSyntax => "501 5.5.4 Bad message size syntax".into(),
            ParamError::SizeOverflow => {
                "552 5.3.4 Message size exceeds file system imposed limit".into()
            }
            ParamError::Ret => "501 5.5.4 Bad RET parameter syntax".into(),
            ParamError::Envid => "501 5.5.4 Bad ENVID parameter syntax".into(),
            ParamError::Auth => "501 5.5.4 Syntax error in AUTH parameter".into(),
            ParamError::Notify => "501 5.5.4 Error: Bad NOTIFY parameter syntax".into(),
            ParamError::Orcpt => "501 5.5.4 Error: Bad ORCPT parameter syntax".into(),
            ParamError::Unsupported(w) => format!("555 5.5.4 Unsupported option: {w}"),
        }
    }
}

/// Reads the parameters of MAIL FROM, stopping at the first refused.
pub fn mail_params(words: &[&str], offered: Offered) -> Result<MailOptions, ParamError> {
    let mut o = MailOptions::default();
    for &w in words {
        if w.eq_ignore_ascii_case("BODY=8BITMIME") || w.eq_ignore_ascii_case("BODY=7BIT") {
            // Content is passed on as it comes, 8-bit or not.
        } else if let Some(v) = param(w, "SIZE") {
            if v.is_empty() || !v.bytes().all(|b| b.is_ascii_digit()) {
                return Err(ParamError::SizeSyntax);
            }
            o.size = v.parse().map_err(|_| ParamError::SizeOverflow)?;
        } else if let Some(v) = param(w, "RET") {
            match dsn::parse_ret(v) {
                Some(r) if o.ret.is_none() => o.ret = Some(r),
                _ => return Err(ParamError::Ret),
            }
        } else if let Some(v) = param(w, "AUTH") {
            // RFC 4954 AUTH=<mailbox>: kept (not used) where SASL is
            // offered, ignored elsewhere, as Postfix does.
            if offered.auth {
                if dsn::xtext_decode(v).is_none() {
                    return Err(ParamError::Auth);
                }
                o.auth = Some(v.to_string());
            }
        } else if let Some(v) = param(w, "ENVID") {
            match dsn::parse_envid(v) {
                Some(e) if o.envid.is_none() => o.envid = Some(e),
                _ => return Err(ParamError::Envid),
            }
        } else if offered.smtputf8 && w.eq_ignore_ascii_case("SMTPUTF8") {
            o.smtputf8 = true;
        } else if offered.requiretls && w.eq_ignore_ascii_case("REQUIRETLS") {
            o.requiretls = true;
        } else {
            return Err(ParamError::Unsupported(w.to_string()));
        }
    }
    Ok(o)
}

/// Reads the parameters of RCPT TO, stopping at the first refused.
pub fn rcpt_params(words: &[&str]) -> Result<RcptOptions, ParamError> {
    let mut o = RcptOptions::default();
    let (mut got_notify, mut got_orcpt) = (false, false);
    for &w in words {
        if let Some(v) = param(w, "NOTIFY") {
            match dsn::parse_notify(v) {
                Some(n) if !got_notify => {
                    o.notify = n;
                    got_notify = true;
                }
                _ => return Err(ParamError::Notify),
            }
        } else if let Some(v) = param(w, "ORCPT") {
            match dsn::parse_orcpt(v) {
                Some(x) if !got_orcpt => {
                    o.orcpt = x;
                    got_orcpt = true;
                }
                _ => return Err(ParamError::Orcpt),
            }
        } else {
            return Err(ParamError::Unsupported(w.to_string()));
        }
    }
    Ok(o)
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
        assert_eq!(extract_address("<a@b.example.>").unwrap(), "a@b.example.");
        assert_eq!(extract_address("<a@x_.example>").unwrap(), "a@x_.example");
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
            "<a@bad..example>",
            "<a@-bad.example>",
            "<a@1.2.3.4>",
            "<a@b/c.example>",
        ] {
            assert!(extract_address(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn mail_and_rcpt_params() {
        use crate::qfile::{NOTIFY_FAILURE, NOTIFY_NEVER, NOTIFY_SUCCESS};
        let args = tokenize("MAIL FROM:<a@b> SIZE=10 RET=hdrs ENVID=x+2By BODY=8BITMIME");
        let (path, words) = path_command(&args, "from:").unwrap();
        assert_eq!(path.text, "<a@b>");
        let o = mail_params(&words, Offered::default()).unwrap();
        assert_eq!(o.size, 10);
        assert_eq!(o.ret, Some("HDRS"));
        assert_eq!(o.envid.as_deref(), Some("x+y"));
        assert!(path_command(&tokenize("MAIL TO:<a@b>"), "from:").is_none());
        assert!(path_command(&tokenize("MAIL FROM:"), "from:").is_none());
        let refused = |w: &str, offered| mail_params(&[w], offered).unwrap_err().reply();
        let none = Offered::default();
        assert_eq!(
            refused("SIZE=1x", none),
            "501 5.5.4 Bad message size syntax"
        );
        assert!(refused("SIZE=99999999999999999999999", none).starts_with("552 5.3.4"));
        assert_eq!(
            refused("RET=SOME", none),
            "501 5.5.4 Bad RET parameter syntax"
        );
        assert_eq!(
            refused("ENVID=a+zz", none),
            "501 5.5.4 Bad ENVID parameter syntax"
        );
        assert_eq!(
            refused(&format!("ENVID={}", "x".repeat(101)), none),
            "501 5.5.4 Bad ENVID parameter syntax"
        );
        assert_eq!(mail_params(&["AUTH=<>"], none).unwrap().auth, None);
        assert_eq!(
            refused("SMTPUTF8", none),
            "555 5.5.4 Unsupported option: SMTPUTF8"
        );
        assert_eq!(
            refused("BODY=BINARYMIME", none),
            "555 5.5.4 Unsupported option: BODY=BINARYMIME"
        );
        assert_eq!(
            refused("REQUIRETLS", none),
            "555 5.5.4 Unsupported option: REQUIRETLS"
        );
        let all = Offered {
            auth: true,
            smtputf8: true,
            requiretls: true,
        };
        let o = mail_params(&["AUTH=<>", "smtputf8", "requiretls"], all).unwrap();
        assert!(o.smtputf8 && o.auth.as_deref() == Some("<>") && o.requiretls);
        assert_eq!(
            refused("AUTH=a+zz", all),
            "501 5.5.4 Syntax error in AUTH parameter"
        );
        assert_eq!(
            mail_params(&["RET=FULL", "RET=HDRS"], none).unwrap_err(),
            ParamError::Ret
        );
        assert_eq!(
            mail_params(&["ENVID=a", "ENVID=b"], none).unwrap_err(),
            ParamError::Envid
        );

        let o = rcpt_params(&["NOTIFY=success,failure", "ORCPT=rfc822;a+2Bb@c"]).unwrap();
        assert_eq!(o.notify, NOTIFY_SUCCESS | NOTIFY_FAILURE);
        assert_eq!(o.orcpt, "rfc822;a+b@c");
        assert_eq!(rcpt_params(&["NOTIFY=NEVER"]).unwrap().notify, NOTIFY_NEVER);
        assert_eq!(rcpt_params(&[]).unwrap(), RcptOptions::default());
        for (w, e) in [
            ("NOTIFY=NEVER,SUCCESS", ParamError::Notify),
            ("NOTIFY=", ParamError::Notify),
            ("ORCPT=rfc822", ParamError::Orcpt),
            ("ORCPT=rfc822;a+zz", ParamError::Orcpt),
            ("SIZE=10", ParamError::Unsupported("SIZE=10".into())),
        ] {
            assert_eq!(rcpt_params(&[w]).unwrap_err(), e, "{w}");
        }
        assert_eq!(
            rcpt_params(&["NOTIFY=DELAY", "NOTIFY=DELAY"]).unwrap_err(),
            ParamError::Notify
        );
        assert_eq!(
            ParamError::Notify.reply(),
            "501 5.5.4 Error: Bad NOTIFY parameter syntax"
        );
    }

    #[test]
    fn params() {
        assert_eq!(param("SIZE=100", "size"), Some("100"));
        assert_eq!(param("SIZE", "size"), None);
        assert_eq!(neuter("a b<c>"), "a?b?c?");
    }
}
