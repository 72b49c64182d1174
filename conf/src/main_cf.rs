//! main.cf: `name = value` lines, indented continuation lines, `#`
//! comments; the last setting of a name wins.

use crate::ConfError;
use std::path::Path;

/// One setting as written in main.cf, with the line it started on.
#[derive(Debug, Clone, PartialEq)]
pub struct Setting {
    pub name: String,
    pub value: String,
    pub line: usize,
}

/// Parses the text of a main.cf. `file` names the file in errors.
pub fn parse(text: &str, file: &Path) -> Result<Vec<Setting>, ConfError> {
    let mut out: Vec<Setting> = Vec::new();
    for (idx, raw) in text.lines().enumerate() {
        let lineno = idx + 1;
        let trimmed = raw.trim();
        if trimmed.is_empty() || trimmed.starts_with('#') {
            continue;
        }
        if raw.starts_with([' ', '\t']) {
            // Continuation of the previous logical line.
            match out.last_mut() {
                Some(last) => {
                    if !last.value.is_empty() {
                        last.value.push(' ');
                    }
                    last.value.push_str(trimmed);
                    continue;
                }
                None => {
                    return Err(ConfError::Syntax {
                        file: file.display().to_string(),
                        line: lineno,
                        reason: "continuation line without a parameter before it".into(),
                    })
                }
            }
        }
        let Some((name, value)) = trimmed.split_once('=') else {
            return Err(ConfError::Syntax {
                file: file.display().to_string(),
                line: lineno,
                reason: format!("missing '=' after attribute name: \"{trimmed}\""),
            });
        };
        let name = name.trim();
        // Postfix's names: letters, digits, `_` and `-` (per-service
        // parameters take the master.cf service name, `smtp-amavis_...`).
        if name.is_empty()
            || !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
        {
            return Err(ConfError::Syntax {
                file: file.display().to_string(),
                line: lineno,
                reason: format!("bad parameter name: \"{name}\""),
            });
        }
        out.push(Setting {
            name: name.to_string(),
            value: value.trim().to_string(),
            line: lineno,
        });
    }
    Ok(out)
}

/// Rewrites main.cf text so that `name = value` is set: every existing
/// setting of `name` (with its continuation lines) is replaced, as
/// Postfix's `postconf -e` does, or a line is appended. Comments and the
/// rest of the file stay as they were.
pub fn edit(text: &str, name: &str, value: &str) -> String {
    let lines: Vec<&str> = text.lines().collect();
    let spans = setting_spans(&lines, name);
    let new_line = format!("{name} = {value}");
    let mut out = String::new();
    let mut i = 0;
    while i < lines.len() {
        if let Some(&(_, end)) = spans.iter().find(|&&(s, _)| s == i) {
            out.push_str(&new_line);
            out.push('\n');
            i = end;
            continue;
        }
        out.push_str(lines[i]);
        out.push('\n');
        i += 1;
    }
    if spans.is_empty() {
        out.push_str(&new_line);
        out.push('\n');
    }
    out
}

/// The line ranges (start, end exclusive) of every setting of `name`,
/// with its continuation lines.
fn setting_spans(lines: &[&str], name: &str) -> Vec<(usize, usize)> {
    let mut spans = Vec::new();
    let mut i = 0;
    while i < lines.len() {
        let l = lines[i];
        let t = l.trim();
        if t.is_empty() || t.starts_with('#') || l.starts_with([' ', '\t']) {
            i += 1;
            continue;
        }
        let mut end = i + 1;
        while end < lines.len()
            && lines[end].starts_with([' ', '\t'])
            && !lines[end].trim().is_empty()
        {
            end += 1;
        }
        if t.split_once('=').map(|(n, _)| n.trim()) == Some(name) {
            spans.push((i, end));
        }
        i = end;
    }
    spans
}

/// Rewrites main.cf text without any setting of `name` (`postconf -X`),
/// or with its settings turned into comments (`postconf -#`).
pub fn remove(text: &str, name: &str, comment_out: bool) -> String {
    let lines: Vec<&str> = text.lines().collect();
    let spans = setting_spans(&lines, name);
    let mut out = String::new();
    for (i, l) in lines.iter().enumerate() {
        if spans.iter().any(|&(s, e)| (s..e).contains(&i)) {
            if comment_out {
                out.push('#');
                out.push_str(l);
                out.push('\n');
            }
            continue;
        }
        out.push_str(l);
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn continuation_and_comments() {
        let t = "# c\na = 1\nb = x,\n  y\n\n#z\na = 2\n";
        let s = parse(t, Path::new("main.cf")).unwrap();
        assert_eq!(s.len(), 3);
        assert_eq!(s[1].value, "x, y");
        assert_eq!(s[2].value, "2");
    }

    #[test]
    fn malformed_names_file_and_line() {
        let e = parse("a = 1\nnonsense\n", Path::new("/x/main.cf")).unwrap_err();
        assert!(e.to_string().starts_with("/x/main.cf, line 2: missing '='"));
    }

    #[test]
    fn edit_replaces_every_setting_and_appends() {
        let t = "a = 1\nb = 2\n  more\nc = 3\n";
        assert_eq!(edit(t, "b", "9"), "a = 1\nb = 9\nc = 3\n");
        assert_eq!(edit(t, "d", "4"), "a = 1\nb = 2\n  more\nc = 3\nd = 4\n");
        assert_eq!(edit("b = 1\n#x\nb = 2\n", "b", "3"), "b = 3\n#x\nb = 3\n");
    }

    #[test]
    fn remove_and_comment_out() {
        let t = "a = 1\nb = 2\n  more\n# b = 0\nb = 3\nc = 3\n";
        assert_eq!(remove(t, "b", false), "a = 1\n# b = 0\nc = 3\n");
        assert_eq!(
            remove(t, "b", true),
            "a = 1\n#b = 2\n#  more\n# b = 0\n#b = 3\nc = 3\n"
        );
    }
}
