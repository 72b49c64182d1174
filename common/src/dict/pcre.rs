//! `pcre:` tables as Postfix's pcre_table(5) reads them, matched by the
//! PCRE2 library Postfix 3.7 links (through the `pcre2` crate): Perl's
//! syntax, look-ahead and look-behind, back-references, atomic groups.
//!
//! The file: `/pattern/flags result` lines tried in order, the first
//! match giving its result; `!/pattern/flags result` matches when the
//! pattern does not; `if /pattern/flags` ... `endif` blocks are skipped
//! when the pattern does not match (`if !/pattern/` when it does); a line
//! starting with white space continues the one before; `#` comments. Any
//! character but white space may stand for `/`. `$1`, `${1}`, `$(1)` in a
//! result are the match's groups (empty when a group did not take part),
//! `$$` a dollar.
//!
//! Flags, each toggling a default as in Postfix: `i` (on: case-
//! insensitive), `s` (on: `.` matches a newline too), `m` (multi-line),
//! `x` (extended), `A` (anchored at the start), `E` (`$` only at the very
//! end), `U` (ungreedy); `X` (PCRE_EXTRA, gone from PCRE2) is ignored
//! with a warning, as Postfix 3.7 does. A pattern that does not compile,
//! an unknown flag, a `$N` beyond the pattern's groups or an `if` without
//! `endif` is an error naming the line: the table is not used (its
//! lookups fail; `postern check` says why), rather than used without
//! the rule, as the rule might be the one that rejects.

use super::{Dict, LookupError};
use crate::warning;
use pcre2::bytes::{Regex, RegexBuilder};

/// One part of a result: text, or the text of a group.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    Text(String),
    Group(usize),
}

#[derive(Debug)]
enum Op {
    /// A rule: when `re` matches (or, negated, does not), `result`.
    Match {
        re: Regex,
        negate: bool,
        result: Vec<Part>,
    },
    /// `if`: when `re` does not match (negated: does), go on after the
    /// op at `endif`.
    If {
        re: Regex,
        negate: bool,
        endif: usize,
    },
    Endif,
}

/// An open `pcre:` table.
#[derive(Debug)]
pub struct Pcre {
    /// The file, for warnings.
    name: String,
    ops: Vec<(usize, Op)>,
}

impl Pcre {
    /// Reads and compiles the table in `path`. Err: `FILE, line N: why`.
    pub fn open(path: &str) -> Result<Pcre, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("open {path}: {e}"))?;
        Pcre::parse(path, &text).map_err(|e| format!("{path}, {e}"))
    }

    /// Compiles table text; `name` is the file, for warnings. Err:
    /// `line N: why`.
    pub fn parse(name: &str, text: &str) -> Result<Pcre, String> {
        let mut ops: Vec<(usize, Op)> = Vec::new();
        let mut open_ifs: Vec<(usize, usize)> = Vec::new();
        for (lineno, line) in crate::regexp::logical_lines(text) {
            // `if` and `endif` in any case, not followed by a letter or
            // digit (`if/a/` is an if).
            let keyword = |k: &str| {
                line.len() >= k.len()
                    && line[..k.len()].eq_ignore_ascii_case(k)
                    && !line[k.len()..].starts_with(|c: char| c.is_ascii_alphanumeric())
            };
            if keyword("endif") {
                if !line[5..].trim().is_empty() {
                    warning!("pcre map {name}, line {lineno}: ignoring extra text after ENDIF");
                }
                let (at, _) = open_ifs
                    .pop()
                    .ok_or_else(|| format!("line {lineno}: endif without matching if"))?;
                let here = ops.len();
                if let (_, Op::If { endif, .. }) = &mut ops[at] {
                    *endif = here;
                }
                ops.push((lineno, Op::Endif));
                continue;
            }
            if keyword("if") {
                let (re, negate, rest) = pattern(name, lineno, line[2..].trim_start())?;
                if !rest.trim().is_empty() {
                    return Err(format!(
                        "line {lineno}: text after the if pattern: \"{}\"",
                        rest.trim()
                    ));
                }
                open_ifs.push((ops.len(), lineno));
                ops.push((
                    lineno,
                    Op::If {
                        re,
                        negate,
                        endif: usize::MAX,
                    },
                ));
                continue;
            }
            let (re, negate, rest) = pattern(name, lineno, &line)?;
            let result_text = rest.trim();
            if result_text.is_empty() {
                return Err(format!("line {lineno}: no result after the pattern"));
            }
            let result = parse_result(result_text).map_err(|e| format!("line {lineno}: {e}"))?;
            let groups = re.captures_len().saturating_sub(1);
            for p in &result {
                match p {
                    Part::Group(_) if negate => {
                        return Err(format!(
                            "line {lineno}: $number in the result of a negated pattern"
                        ))
                    }
                    Part::Group(n) if *n > groups => {
                        return Err(format!(
                            "line {lineno}: out of range replacement index \"{n}\" \
                             (the pattern has {groups} groups)"
                        ))
                    }
                    _ => {}
                }
            }
            ops.push((lineno, Op::Match { re, negate, result }));
        }
        if let Some((_, lineno)) = open_ifs.pop() {
            return Err(format!("line {lineno}: if has no matching endif"));
        }
        Ok(Pcre {
            name: name.to_string(),
            ops,
        })
    }

    /// The result of the first rule that matches `key`, groups filled in.
    pub fn find(&self, key: &str) -> Option<String> {
        let subject = key.as_bytes();
        let mut i = 0;
        while i < self.ops.len() {
            let (lineno, op) = &self.ops[i];
            match op {
                Op::Match { re, negate, result } => {
                    if *negate {
                        if !self.matches(re, subject, *lineno) {
                            return Some(expand(result, None, subject));
                        }
                    } else if let Some(caps) = self.captures(re, subject, *lineno) {
                        return Some(expand(result, Some(&caps), subject));
                    }
                }
                Op::If { re, negate, endif } => {
                    if self.matches(re, subject, *lineno) == *negate {
                        i = *endif;
                    }
                }
                Op::Endif => {}
            }
            i += 1;
        }
        None
    }

    /// Whether `re` matches; a matching error (such as the backtracking
    /// limit) is a warning and no match, as in Postfix.
    fn matches(&self, re: &Regex, subject: &[u8], lineno: usize) -> bool {
        re.is_match(subject).unwrap_or_else(|e| {
            warning!("pcre map {}, line {lineno}: {e}", self.name);
            false
        })
    }

    fn captures<'s>(
        &self,
        re: &Regex,
        subject: &'s [u8],
        lineno: usize,
    ) -> Option<pcre2::bytes::Captures<'s>> {
        re.captures(subject).unwrap_or_else(|e| {
            warning!("pcre map {}, line {lineno}: {e}", self.name);
            None
        })
    }
}

impl Dict for Pcre {
    fn lookup(&self, key: &str) -> Result<Option<String>, LookupError> {
        Ok(self.find(key))
    }

    fn is_pattern(&self) -> bool {
        true
    }
}

/// The result with the groups of `caps` filled in.
fn expand(result: &[Part], caps: Option<&pcre2::bytes::Captures<'_>>, _subject: &[u8]) -> String {
    let mut out = String::new();
    for p in result {
        match p {
            Part::Text(t) => out.push_str(t),
            Part::Group(n) => {
                if let Some(m) = caps.and_then(|c| c.get(*n)) {
                    out.push_str(&String::from_utf8_lossy(m.as_bytes()));
                }
            }
        }
    }
    out
}

/// A result's text: `$N`, `${N}`, `$(N)` groups, `$$` a dollar.
fn parse_result(text: &str) -> Result<Vec<Part>, String> {
    let mut parts = Vec::new();
    let mut literal = String::new();
    let mut rest = text;
    while let Some(at) = rest.find('$') {
        literal.push_str(&rest[..at]);
        let after = &rest[at + 1..];
        let (name, next) = if let Some(r) = after.strip_prefix('$') {
            literal.push('$');
            rest = r;
            continue;
        } else if let Some(r) = after.strip_prefix('{') {
            let end = r.find('}').ok_or("bad replacement syntax: no closing }")?;
            (&r[..end], &r[end + 1..])
        } else if let Some(r) = after.strip_prefix('(') {
            let end = r.find(')').ok_or("bad replacement syntax: no closing )")?;
            (&r[..end], &r[end + 1..])
        } else {
            let end = after
                .find(|c: char| !c.is_ascii_alphanumeric() && c != '_')
                .unwrap_or(after.len());
            if end == 0 {
                return Err("bad replacement syntax: $ without a number".into());
            }
            (&after[..end], &after[end..])
        };
        let n: usize = match name.parse() {
            Ok(n) if name.bytes().all(|b| b.is_ascii_digit()) => n,
            _ => return Err(format!("non-numeric replacement index \"{name}\"")),
        };
        if n < 1 {
            return Err(format!("out of range replacement index \"{name}\""));
        }
        if !literal.is_empty() {
            parts.push(Part::Text(std::mem::take(&mut literal)));
        }
        parts.push(Part::Group(n));
        rest = next;
    }
    literal.push_str(rest);
    if !literal.is_empty() {
        parts.push(Part::Text(literal));
    }
    Ok(parts)
}

/// `[!...]/pattern/flags` at the start of `line`: the compiled pattern,
/// whether it is negated, and the text after the flags.
fn pattern<'l>(name: &str, lineno: usize, line: &'l str) -> Result<(Regex, bool, &'l str), String> {
    let mut negate = false;
    let mut rest = line;
    loop {
        if let Some(r) = rest.strip_prefix('!') {
            negate = !negate;
            rest = r;
        } else if rest.starts_with(char::is_whitespace) {
            rest = rest.trim_start();
        } else {
            break;
        }
    }
    let mut chars = rest.char_indices();
    let delim = match chars.next() {
        Some((_, c)) => c,
        None => return Err(format!("line {lineno}: no regexp")),
    };
    let mut end = None;
    let mut escaped = false;
    for (i, c) in chars {
        if escaped {
            escaped = false;
        } else if c == '\\' {
            escaped = true;
        } else if c == delim {
            end = Some(i);
            break;
        }
    }
    let end =
        end.ok_or_else(|| format!("line {lineno}: no closing regexp delimiter \"{delim}\""))?;
    let body = &rest[delim.len_utf8()..end];
    let after = &rest[end + delim.len_utf8()..];
    let flags_len = after.find(char::is_whitespace).unwrap_or(after.len());
    let (flags, tail) = after.split_at(flags_len);
    let mut opt = Options {
        caseless: true,
        dotall: true,
        ..Options::default()
    };
    for f in flags.chars() {
        match f {
            'i' => opt.caseless = !opt.caseless,
            'm' => opt.multiline = !opt.multiline,
            's' => opt.dotall = !opt.dotall,
            'x' => opt.extended = !opt.extended,
            'A' => opt.anchored = !opt.anchored,
            'E' => opt.dollar_endonly = !opt.dollar_endonly,
            'U' => opt.ungreedy = !opt.ungreedy,
            'X' => {
                warning!("pcre map {name}, line {lineno}: ignoring obsolete regexp option \"X\"")
            }
            other => return Err(format!("line {lineno}: unknown regexp option \"{other}\"")),
        }
    }
    let re =
        compile(body, &opt).map_err(|e| format!("line {lineno}: error in regex /{body}/: {e}"))?;
    Ok((re, negate, tail))
}

/// pcre_table(5)'s options, each a PCRE2 compile option.
#[derive(Debug, Default, Clone, Copy)]
struct Options {
    caseless: bool,
    dotall: bool,
    multiline: bool,
    extended: bool,
    anchored: bool,
    dollar_endonly: bool,
    ungreedy: bool,
}

/// Compiles `body` with the options. The `pcre2` crate sets CASELESS,
/// DOTALL, MULTILINE and EXTENDED itself; UNGREEDY is the inline `(?U)`,
/// ANCHORED a `\A` before the pattern and DOLLAR_ENDONLY (which
/// MULTILINE overrides) `\z` for each `$` outside a class.
fn compile(body: &str, opt: &Options) -> Result<Regex, pcre2::Error> {
    let mut pattern = String::with_capacity(body.len() + 12);
    if opt.ungreedy {
        pattern.push_str("(?U)");
    }
    let body = if opt.dollar_endonly && !opt.multiline {
        std::borrow::Cow::Owned(dollar_at_end_only(body))
    } else {
        std::borrow::Cow::Borrowed(body)
    };
    if opt.anchored {
        pattern.push_str("\\A(?:");
        pattern.push_str(&body);
        // A comment of an extended pattern ends at a newline.
        pattern.push_str(if opt.extended { "\n)" } else { ")" });
    } else {
        pattern.push_str(&body);
    }
    RegexBuilder::new()
        .caseless(opt.caseless)
        .dotall(opt.dotall)
        .multi_line(opt.multiline)
        .extended(opt.extended)
        .utf(true)
        .jit_if_available(true)
        .build(&pattern)
}

/// `$` outside character classes and `\Q...\E` becomes `\z` (the end of
/// the subject, not before a final newline).
fn dollar_at_end_only(p: &str) -> String {
    let mut out = String::with_capacity(p.len() + 4);
    let mut chars = p.chars().peekable();
    let mut in_class = false;
    while let Some(c) = chars.next() {
        match c {
            '\\' => {
                out.push(c);
                match chars.next() {
                    Some('Q') => {
                        out.push('Q');
                        // Literal up to \E.
                        while let Some(q) = chars.next() {
                            out.push(q);
                            if q == '\\' && chars.peek() == Some(&'E') {
                                out.push(chars.next().unwrap_or('E'));
                                break;
                            }
                        }
                    }
                    Some(n) => out.push(n),
                    None => {}
                }
            }
            '[' if !in_class => {
                in_class = true;
                out.push(c);
                if chars.peek() == Some(&'^') {
                    out.push('^');
                    chars.next();
                }
                if chars.peek() == Some(&']') {
                    out.push(']');
                    chars.next();
                }
            }
            '[' if in_class && chars.peek() == Some(&':') => {
                // [:alpha:] inside a class.
                out.push(c);
                while let Some(q) = chars.next() {
                    out.push(q);
                    if q == ':' && chars.peek() == Some(&']') {
                        out.push(']');
                        chars.next();
                        break;
                    }
                }
            }
            ']' if in_class => {
                in_class = false;
                out.push(c);
            }
            '$' if !in_class => out.push_str("\\z"),
            _ => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(text: &str) -> Pcre {
        Pcre::parse("test", text).unwrap()
    }

    #[test]
    fn lookaround_and_backreferences() {
        let t = table(
            "/^Subject:(?=.*\\bfree\\b)(?!.*\\bnewsletter\\b)/ REJECT free offer\n\
             /^From:.*<(\\w+)@[^>]*>.*\\b\\1\\b/ REJECT name repeated: $1\n\
             /(?<=X-Spam-Score: )(\\d+)/ WARN score ${1}\n",
        );
        assert_eq!(
            t.find("Subject: a FREE gift").as_deref(),
            Some("REJECT free offer")
        );
        assert_eq!(t.find("Subject: free newsletter"), None);
        assert_eq!(
            t.find("From: x <bob@x.test> bob").as_deref(),
            Some("REJECT name repeated: bob")
        );
        assert_eq!(t.find("From: x <bob@x.test> alice"), None);
        assert_eq!(t.find("X-Spam-Score: 17").as_deref(), Some("WARN score 17"));
    }

    #[test]
    fn flags_toggle_postfix_defaults() {
        let t = table("/^abc$/i CASE\n/a.b/s DOT\n/^x.y/ DOTALL\n");
        assert_eq!(t.find("ABC"), None);
        assert_eq!(t.find("abc").as_deref(), Some("CASE"));
        assert_eq!(t.find("a\nb"), None);
        assert_eq!(t.find("x\ny").as_deref(), Some("DOTALL"));
        let t = table("/b/A ANCHORED\n/c$/E END\n/(a+)(a*)/U LAZY $1-$2\n");
        assert_eq!(t.find("xb"), None);
        assert_eq!(t.find("bx").as_deref(), Some("ANCHORED"));
        assert_eq!(t.find("xc\n"), None);
        assert_eq!(t.find("xc").as_deref(), Some("END"));
        assert_eq!(t.find("aaa").as_deref(), Some("LAZY a-"));
        let t = table("/ a  b /x SPACED\n");
        assert_eq!(t.find("ab").as_deref(), Some("SPACED"));
    }

    #[test]
    fn if_endif_and_negation() {
        let t = table(
            "if /@example\\.test$/\n!/^admin@/ NOT-ADMIN\n/^admin@/ ADMIN\nendif\n\
             if !/@/\n/./ BARE\nendif\n/./ OTHER $$x\n",
        );
        assert_eq!(t.find("bob@example.test").as_deref(), Some("NOT-ADMIN"));
        assert_eq!(t.find("admin@example.test").as_deref(), Some("ADMIN"));
        assert_eq!(t.find("bob").as_deref(), Some("BARE"));
        assert_eq!(t.find("bob@other.test").as_deref(), Some("OTHER $x"));
    }

    #[test]
    fn errors_name_the_line() {
        for (text, want) in [
            ("/ok/ A\n/(unclosed/ B\n", "line 2: error in regex"),
            ("/a/q X\n", "line 1: unknown regexp option \"q\""),
            ("/(a)/ $2\n", "line 1: out of range replacement index \"2\""),
            (
                "!/(a)/ $1\n",
                "line 1: $number in the result of a negated pattern",
            ),
            ("/a/ ${x}\n", "line 1: non-numeric replacement index \"x\""),
            ("if /a/\n/b/ c\n", "line 1: if has no matching endif"),
            ("endif\n", "line 1: endif without matching if"),
            ("/a\n", "line 1: no closing regexp delimiter"),
        ] {
            let e = Pcre::parse("t", text).unwrap_err();
            assert!(e.starts_with(want), "{text:?}: {e}");
        }
    }

    #[test]
    fn dollar_translation_leaves_classes_and_escapes() {
        assert_eq!(dollar_at_end_only("a$"), "a\\z");
        assert_eq!(dollar_at_end_only("[$]\\$\\Q$\\E$"), "[$]\\$\\Q$\\E\\z");
    }
}
