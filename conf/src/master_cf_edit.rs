//! master.cf as text that `postconf -M`, `-F`, `-P`, `-X` and `-#` show and
//! edit: every line kept as written except the entries an edit touches,
//! which are rewritten in Postfix's layout (the columns aligned, each
//! `-o` option on a line of its own), as Postfix's postconf does.
//! [`crate::master_cf`] is what master makes of the file; this is the
//! administrator's view of it.

/// The column where each of the first eight fields starts in Postfix's
/// layout (service, type, private, unpriv, chroot, wakeup, maxproc, command).
const COLUMNS: [usize; 8] = [0, 11, 17, 25, 33, 41, 49, 57];

/// A folded line stays shorter than this.
const FOLD_WIDTH: usize = 80;

/// The names of the fields `postconf -F` shows, in order.
pub const FIELD_NAMES: [&str; 8] = [
    "service",
    "type",
    "private",
    "unprivileged",
    "chroot",
    "wakeup",
    "process_limit",
    "command",
];

/// One argument of a service's command.
#[derive(Debug, Clone, PartialEq)]
pub enum Arg {
    /// A leading `-o name=value` option (`-oname=value`, `-o { name = value }`).
    Param(String, String),
    /// Any other word: an option (`-v`) or an argument.
    Word(String),
}

/// One service entry: its text as written, and its fields.
#[derive(Debug, Clone)]
pub struct Entry {
    /// The lines as written (with comment lines found between its
    /// continuation lines).
    pub raw: Vec<String>,
    /// The seven columns and the command name.
    pub columns: Vec<String>,
    pub args: Vec<Arg>,
    /// Set when an edit changed the entry: it is written in Postfix's layout.
    changed: bool,
}

#[derive(Debug, Clone)]
enum Chunk {
    /// A comment, a blank line or a malformed line, kept as it is.
    Text(String),
    Entry(Entry),
}

/// master.cf as a sequence of entries and the lines around them.
#[derive(Debug, Clone, Default)]
pub struct MasterText {
    chunks: Vec<Chunk>,
}

fn is_comment_or_blank(l: &str) -> bool {
    let t = l.trim();
    t.is_empty() || t.starts_with('#')
}

fn is_continuation(l: &str) -> bool {
    l.starts_with([' ', '\t']) && !is_comment_or_blank(l)
}

impl MasterText {
    /// Splits master.cf text into entries and other lines. A line with
    /// fewer than eight fields is kept as text (master reports it).
    pub fn parse(text: &str) -> MasterText {
        let lines: Vec<&str> = text.lines().collect();
        let mut chunks = Vec::new();
        let mut i = 0;
        while i < lines.len() {
            if is_comment_or_blank(lines[i]) || lines[i].starts_with([' ', '\t']) {
                chunks.push(Chunk::Text(lines[i].to_string()));
                i += 1;
                continue;
            }
            // The entry runs to its last continuation line; comments and
            // blank lines between continuation lines belong to it.
            let mut last = i;
            let mut j = i + 1;
            while j < lines.len() {
                if is_continuation(lines[j]) {
                    last = j;
                } else if !is_comment_or_blank(lines[j]) {
                    break;
                }
                j += 1;
            }
            let raw: Vec<String> = lines[i..=last].iter().map(|s| s.to_string()).collect();
            let joined: Vec<&str> = raw
                .iter()
                .filter(|l| !is_comment_or_blank(l))
                .map(|l| l.trim())
                .collect();
            match entry_from_fields(&crate::split_braced(&joined.join(" "), false)) {
                Some((columns, args)) => chunks.push(Chunk::Entry(Entry {
                    raw,
                    columns,
                    args,
                    changed: false,
                })),
                None => chunks.extend(raw.into_iter().map(Chunk::Text)),
            }
            i = last + 1;
        }
        MasterText { chunks }
    }

    /// The entries, in file order.
    pub fn entries(&self) -> impl Iterator<Item = &Entry> + '_ {
        self.chunks.iter().filter_map(|c| match c {
            Chunk::Entry(e) => Some(e),
            Chunk::Text(_) => None,
        })
    }

    /// The entries, in file order, to change.
    pub fn entries_mut(&mut self) -> impl Iterator<Item = &mut Entry> + '_ {
        self.chunks.iter_mut().filter_map(|c| match c {
            Chunk::Entry(e) => Some(e),
            Chunk::Text(_) => None,
        })
    }

    /// The entry `name/type`.
    pub fn find_mut(&mut self, name: &str, kind: &str) -> Option<&mut Entry> {
        self.entries_mut()
            .find(|e| e.name() == name && e.kind() == kind)
    }

    /// Replaces the entry `name/type` by `line` (a whole master.cf entry),
    /// or appends it. `Err` names what is wrong with `line`.
    pub fn set_entry(&mut self, line: &str) -> Result<(), String> {
        let fields = crate::split_braced(line, false);
        let (columns, args) = entry_from_fields(&fields)
            .ok_or_else(|| format!("bad master.cf entry: \"{line}\": expected 8 or more fields"))?;
        let new = Entry {
            raw: Vec::new(),
            columns,
            args,
            changed: true,
        };
        new.check()?;
        match self.find_mut(new.name(), new.kind()) {
            Some(e) => {
                e.columns = new.columns;
                e.args = new.args;
                e.changed = true;
            }
            None => self.chunks.push(Chunk::Entry(new)),
        }
        Ok(())
    }

    /// Removes the entries `which` says yes to.
    pub fn remove(&mut self, mut which: impl FnMut(&Entry) -> bool) {
        let mut out = Vec::new();
        for c in std::mem::take(&mut self.chunks) {
            match c {
                Chunk::Entry(e) if which(&e) => {
                    // Comments inside the entry stay, as Postfix leaves them.
                    out.extend(
                        e.raw
                            .into_iter()
                            .filter(|l| is_comment_or_blank(l))
                            .map(Chunk::Text),
                    );
                }
                c => out.push(c),
            }
        }
        self.chunks = out;
    }

    /// Turns the entries `which` says yes to into comments: `#` before each
    /// of their lines, as Postfix's `postconf -M#`.
    pub fn comment_out(&mut self, mut which: impl FnMut(&Entry) -> bool) {
        let mut out = Vec::new();
        for c in std::mem::take(&mut self.chunks) {
            match c {
                Chunk::Entry(e) if which(&e) => {
                    let lines = if e.changed || e.raw.is_empty() {
                        e.format(true).lines().map(String::from).collect()
                    } else {
                        e.raw
                    };
                    out.extend(lines.into_iter().map(|l| {
                        Chunk::Text(if l.starts_with('#') {
                            l
                        } else {
                            format!("#{l}")
                        })
                    }));
                }
                c => out.push(c),
            }
        }
        self.chunks = out;
    }

    /// The text to write back.
    pub fn text(&self) -> String {
        let mut out = String::new();
        for c in &self.chunks {
            match c {
                Chunk::Text(l) => {
                    out.push_str(l);
                    out.push('\n');
                }
                Chunk::Entry(e) if e.changed => {
                    // Comments found inside the entry go before it.
                    for l in e.raw.iter().filter(|l| is_comment_or_blank(l)) {
                        out.push_str(l);
                        out.push('\n');
                    }
                    out.push_str(&e.format(true));
                    out.push('\n');
                }
                Chunk::Entry(e) => {
                    for l in &e.raw {
                        out.push_str(l);
                        out.push('\n');
                    }
                }
            }
        }
        out
    }
}

/// The columns and arguments of an entry's fields; `None` with fewer
/// than eight.
fn entry_from_fields(fields: &[String]) -> Option<(Vec<String>, Vec<Arg>)> {
    if fields.len() < 8 {
        return None;
    }
    Some((fields[..8].to_vec(), parse_args(&fields[8..])))
}

/// Splits `{ name = value }`, `{name=value}` or `name=value`.
fn param_of(text: &str) -> Option<(String, String)> {
    let inner = match text.strip_prefix('{') {
        Some(rest) => rest.strip_suffix('}')?,
        None => text,
    };
    let (n, v) = inner.split_once('=')?;
    Some((n.trim().to_string(), v.trim().to_string()))
}

/// The leading options of a command (up to its first word not starting
/// with `-`) hold its `-o` parameters, as Postfix reads them.
fn parse_args(words: &[String]) -> Vec<Arg> {
    let mut out = Vec::new();
    let mut leading = true;
    let mut i = 0;
    while i < words.len() {
        let w = &words[i];
        if leading && !w.starts_with('-') {
            leading = false;
        }
        if leading && w == "-o" && i + 1 < words.len() {
            if let Some((n, v)) = param_of(&words[i + 1]) {
                out.push(Arg::Param(n, v));
                i += 2;
                continue;
            }
        }
        if leading && w.len() > 2 && w.starts_with("-o") {
            if let Some((n, v)) = param_of(&w[2..]) {
                out.push(Arg::Param(n, v));
                i += 1;
                continue;
            }
        }
        out.push(Arg::Word(w.clone()));
        i += 1;
    }
    out
}

impl Arg {
    /// As Postfix shows it: `-o name=value`, `-o {name=value}` when the
    /// value has white space.
    fn display(&self) -> String {
        match self {
            Arg::Param(n, v) if v.contains(char::is_whitespace) => {
                format!("-o {{{n}={v}}}")
            }
            Arg::Param(n, v) => format!("-o {n}={v}"),
            Arg::Word(w) => w.clone(),
        }
    }
}

impl Entry {
    pub fn name(&self) -> &str {
        &self.columns[0]
    }

    pub fn kind(&self) -> &str {
        &self.columns[1]
    }

    /// The `-o` parameters, in order.
    pub fn params(&self) -> Vec<(&str, &str)> {
        self.args
            .iter()
            .filter_map(|a| match a {
                Arg::Param(n, v) => Some((n.as_str(), v.as_str())),
                Arg::Word(_) => None,
            })
            .collect()
    }

    /// Field `i` of [`FIELD_NAMES`]: the command with all its arguments
    /// for `command`.
    pub fn field(&self, i: usize) -> String {
        if i < 7 {
            return self.columns[i].clone();
        }
        let mut s = self.columns[7].clone();
        for a in &self.args {
            s.push(' ');
            s.push_str(&a.display());
        }
        s
    }

    /// Sets field `i` of [`FIELD_NAMES`]. `Err` names a bad value.
    pub fn set_field(&mut self, i: usize, value: &str) -> Result<(), String> {
        let mut new = self.clone();
        if i < 7 {
            if value.is_empty() || value.contains(char::is_whitespace) {
                return Err(format!(
                    "invalid {} field value: \"{value}\"",
                    FIELD_NAMES[i]
                ));
            }
            new.columns[i] = value.to_string();
        } else {
            let words = crate::split_braced(value, false);
            if words.is_empty() {
                return Err("empty command field".into());
            }
            new.columns[7] = words[0].clone();
            new.args = parse_args(&words[1..]);
        }
        new.check()?;
        *self = Entry {
            changed: true,
            ..new
        };
        Ok(())
    }

    /// Sets (or adds, after the other `-o` options) the parameter `name`.
    pub fn set_param(&mut self, name: &str, value: &str) {
        self.changed = true;
        if let Some(Arg::Param(_, v)) = self
            .args
            .iter_mut()
            .find(|a| matches!(a, Arg::Param(n, _) if n == name))
        {
            *v = value.to_string();
            return;
        }
        let at = self
            .args
            .iter()
            .rposition(|a| matches!(a, Arg::Param(..)))
            .map(|p| p + 1)
            .unwrap_or(0);
        self.args
            .insert(at, Arg::Param(name.to_string(), value.to_string()));
    }

    /// Removes the parameter `name`; whether it was there.
    pub fn remove_param(&mut self, name: &str) -> bool {
        let before = self.args.len();
        self.args
            .retain(|a| !matches!(a, Arg::Param(n, _) if n == name));
        let removed = self.args.len() != before;
        self.changed |= removed;
        removed
    }

    /// The columns that master checks, checked the same way.
    fn check(&self) -> Result<(), String> {
        let line = self.format(false);
        crate::master_cf::parse(&line, std::path::Path::new("master.cf"), 100)
            .map(|_| ())
            .map_err(|e| match e {
                crate::ConfError::Syntax { reason, .. } => {
                    format!("{}/{}: {reason}", self.name(), self.kind())
                }
                e => e.to_string(),
            })
    }

    /// The entry in Postfix's layout: the columns aligned, then the
    /// command and its arguments; `fold` puts each `-o` option on a line
    /// of its own and wraps the rest, as `postconf -Mf` (and Postfix's
    /// master.cf edits).
    pub fn format(&self, fold: bool) -> String {
        let mut line = String::new();
        for (i, f) in self.columns.iter().enumerate() {
            line.push_str(f);
            if let Some(next) = COLUMNS.get(i + 1) {
                let pad = next.saturating_sub(line.len()).max(1);
                line.push_str(&" ".repeat(pad));
            }
        }
        let mut out = String::new();
        for a in &self.args {
            let word = a.display();
            if !fold {
                line.push(' ');
                line.push_str(&word);
            } else if matches!(a, Arg::Param(..)) {
                if !line.is_empty() {
                    out.push_str(&line);
                    out.push('\n');
                }
                out.push_str(&format!("    {word}\n"));
                line.clear();
            } else if line.is_empty() {
                line = format!("    {word}");
            } else if line.len() + 1 + word.len() < FOLD_WIDTH {
                line.push(' ');
                line.push_str(&word);
            } else {
                out.push_str(&line);
                out.push('\n');
                line = format!("    {word}");
            }
        }
        if !line.is_empty() {
            out.push_str(&line);
        } else if out.ends_with('\n') {
            out.pop();
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = "\
# top
smtp      inet  n       -       y       -       -       smtpd
submission inet n       -       y       -       -       smtpd
  -o syslog_name=postfix/submission
#  -o smtpd_tls_auth_only=yes
  -o { smtpd_banner = a b c }
  -osmtpd_x=1
pickup    unix  n       -       y       60      1       pickup
";

    #[test]
    fn untouched_text_is_kept() {
        assert_eq!(MasterText::parse(TEXT).text(), TEXT);
    }

    #[test]
    fn layout_as_postfix() {
        let m = MasterText::parse(TEXT);
        let e: Vec<&Entry> = m.entries().collect();
        assert_eq!(
            e[1].format(false),
            "submission inet  n       -       y       -       -       smtpd -o syslog_name=postfix/submission -o {smtpd_banner=a b c} -o smtpd_x=1"
        );
        assert_eq!(
            e[0].format(false),
            "smtp       inet  n       -       y       -       -       smtpd"
        );
        assert_eq!(
            e[1].format(true),
            "submission inet  n       -       y       -       -       smtpd\n    -o syslog_name=postfix/submission\n    -o {smtpd_banner=a b c}\n    -o smtpd_x=1"
        );
    }

    #[test]
    fn edits() {
        let mut m = MasterText::parse(TEXT);
        let e = m.find_mut("submission", "inet").unwrap();
        e.set_param("smtpd_banner", "xyz");
        assert!(e.remove_param("smtpd_x"));
        m.find_mut("pickup", "unix")
            .unwrap()
            .set_field(5, "30")
            .unwrap();
        assert!(m
            .find_mut("pickup", "unix")
            .unwrap()
            .set_field(2, "maybe")
            .is_err());
        m.comment_out(|e| e.name() == "smtp");
        assert_eq!(
            m.text(),
            "# top\n#smtp      inet  n       -       y       -       -       smtpd\n\
             #  -o smtpd_tls_auth_only=yes\n\
             submission inet  n       -       y       -       -       smtpd\n    -o syslog_name=postfix/submission\n    -o smtpd_banner=xyz\n\
             pickup     unix  n       -       y       30      1       pickup\n"
        );
        m.remove(|e| e.name() == "pickup");
        m.set_entry("new unix - - n - - smtp").unwrap();
        assert!(m
            .text()
            .ends_with("xyz\nnew        unix  -       -       n       -       -       smtp\n"));
    }
}
