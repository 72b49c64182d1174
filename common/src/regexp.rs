//! `regexp:` lookup tables (Postfix's regexp_table(5)): a file of
//! `/pattern/flags result` lines, tried in order; the first pattern that
//! matches the key gives the result. `!/pattern/ result` matches when the
//! pattern does not. Patterns are case-insensitive unless the `i` flag
//! turns that off (Postfix's default); `x` allows white space and
//! comments; `m` is multi-line. The Rust `regex` syntax, which covers
//! POSIX extended regular expressions. `$1`, `${1}` in a result are
//! replaced by the match's groups. (`pcre:` tables are
//! [`crate::dict::pcre`], through PCRE2.)

use regex::{Regex, RegexBuilder};

/// One rule of a table.
#[derive(Debug, Clone)]
pub struct Rule {
    pub re: Regex,
    pub negate: bool,
    pub result: String,
}

/// The lines of a pattern table (`regexp:`, `pcre:`): `#` comments and
/// blank lines skipped, a line starting with white space joined to the
/// one before; each with the number of its first line.
pub fn logical_lines(text: &str) -> Vec<(usize, String)> {
    let mut out: Vec<(usize, String)> = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let t = line.trim();
        if t.is_empty() || t.starts_with('#') {
            continue;
        }
        if line.starts_with([' ', '\t']) {
            if let Some(last) = out.last_mut() {
                last.1.push(' ');
                last.1.push_str(t);
                continue;
            }
        }
        out.push((i + 1, t.to_string()));
    }
    out
}

/// Parses a table file. Errors name the line.
pub fn parse(text: &str) -> Result<Vec<Rule>, String> {
    let mut rules = Vec::new();
    for (lineno, line) in logical_lines(text) {
        let (negate, rest) = match line.strip_prefix('!') {
            Some(r) => (true, r),
            None => (false, line.as_str()),
        };
        let mut chars = rest.char_indices();
        let delim = match chars.next() {
            Some((_, c)) if !c.is_alphanumeric() && !c.is_whitespace() => c,
            _ => return Err(format!("line {lineno}: expected /pattern/")),
        };
        // The pattern ends at the next unescaped delimiter.
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
        let end = end.ok_or_else(|| format!("line {lineno}: no closing {delim}"))?;
        let pattern = &rest[delim.len_utf8()..end];
        let after = &rest[end + delim.len_utf8()..];
        let flags_len = after
            .find(|c: char| c.is_whitespace())
            .unwrap_or(after.len());
        let (flags, result) = after.split_at(flags_len);
        let mut b = RegexBuilder::new(pattern);
        let mut insensitive = true;
        for f in flags.chars() {
            match f {
                'i' => insensitive = !insensitive,
                'x' => {
                    b.ignore_whitespace(true);
                }
                'm' => {
                    b.multi_line(true);
                }
                's' => {
                    b.dot_matches_new_line(true);
                }
                'U' => {
                    b.swap_greed(true);
                }
                _ => return Err(format!("line {lineno}: unknown flag {f}")),
            }
        }
        b.case_insensitive(insensitive);
        let re = b
            .build()
            .map_err(|e| format!("line {lineno}: bad pattern /{pattern}/: {e}"))?;
        rules.push(Rule {
            re,
            negate,
            result: result.trim().to_string(),
        });
    }
    Ok(rules)
}

/// The result of the first rule that matches `key`, with `$N` replaced.
pub fn lookup(rules: &[Rule], key: &str) -> Option<String> {
    for r in rules {
        if r.negate {
            if !r.re.is_match(key) {
                return Some(r.result.clone());
            }
            continue;
        }
        if let Some(c) = r.re.captures(key) {
            let mut out = String::new();
            c.expand(&r.result, &mut out);
            return Some(out);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules_in_order() {
        let rules = parse(
            "# checks\n/^Subject:.*viagra/ REJECT no spam\n\
             /^X-Mailer: (.*)$/ WARN mailer $1\n\
             !/^Received:/i DUNNO\n/^received: from (\\S+)/ PREPEND X-Was: $1\n",
        )
        .unwrap();
        assert_eq!(
            lookup(&rules, "subject: Buy VIAGRA").as_deref(),
            Some("REJECT no spam")
        );
        assert_eq!(
            lookup(&rules, "X-Mailer: mutt 2").as_deref(),
            Some("WARN mailer mutt 2")
        );
        // `i` turns the default case-insensitivity off.
        assert_eq!(lookup(&rules, "received: from a").as_deref(), Some("DUNNO"));
        assert_eq!(
            lookup(&rules, "Received: from host.test").as_deref(),
            Some("PREPEND X-Was: host.test")
        );
        assert!(parse("/unclosed\n").is_err());
        assert!(parse("/a/q x\n").is_err());
    }
}
