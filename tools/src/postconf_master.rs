//! `postconf -M`, `-F`, `-P`: master.cf shown and edited as Postfix's
//! postconf does (the text handling is `postern_conf::master_cf_edit`).
//!
//! A request names `service[/type[/field-or-parameter]]`, `*` matching any
//! one part; with `=value` (or `-e`) it is an edit: `-M name/type='entry'`,
//! `-F name/type/field=value`, `-P name/type/param=value`. `-X` removes
//! services (`-M`) or parameters (`-P`), `-M#` comments services out.

use super::{write_config_file, Opts, PROG};
use crate::die;
use crate::sysexits::*;
use postern_conf::master_cf_edit::{Entry, MasterText, FIELD_NAMES};
use std::path::Path;

#[derive(Clone, Copy, PartialEq)]
enum Mode {
    Entries,
    Fields,
    Params,
}

/// A request: up to three `/`-separated parts, each `None` for `*`.
struct Pattern {
    text: String,
    name: Option<String>,
    kind: Option<String>,
    last: Option<String>,
}

impl Pattern {
    fn parse(text: &str, mode: Mode) -> Pattern {
        let parts: Vec<&str> = text.split('/').collect();
        let max = if mode == Mode::Entries { 2 } else { 3 };
        if parts.len() > max || parts.iter().any(|p| p.is_empty()) {
            die(PROG, EX_USAGE, format_args!("invalid request: \"{text}\""));
        }
        let part = |i: usize| parts.get(i).filter(|p| **p != "*").map(|p| p.to_string());
        let p = Pattern {
            text: text.to_string(),
            name: part(0),
            kind: part(1),
            last: part(2),
        };
        if mode == Mode::Fields {
            if let Some(f) = &p.last {
                if !FIELD_NAMES.contains(&f.as_str()) {
                    die(
                        PROG,
                        EX_USAGE,
                        format_args!("invalid service attribute name: \"{f}\""),
                    );
                }
            }
        }
        p
    }

    fn matches(&self, e: &Entry) -> bool {
        self.name.as_deref().is_none_or(|n| n == e.name())
            && self.kind.as_deref().is_none_or(|k| k == e.kind())
    }
}

pub(super) fn run(o: &Opts, dir: &Path) -> ! {
    let mode = if o.master_entries {
        Mode::Entries
    } else if o.master_fields {
        Mode::Fields
    } else {
        Mode::Params
    };
    if o.value_only && mode == Mode::Entries {
        die(PROG, EX_USAGE, "with option -M, do not specify -h");
    }
    if o.comment_out && mode != Mode::Entries {
        die(PROG, EX_USAGE, "-# requires -M");
    }
    if o.exclude && mode == Mode::Fields {
        die(PROG, EX_USAGE, "-X requires -M or -P");
    }
    let file = dir.join("master.cf");
    let text = std::fs::read_to_string(&file).unwrap_or_else(|e| {
        die(
            PROG,
            EX_CONFIG,
            format_args!("open {}: {e}", file.display()),
        )
    });
    let mut master = MasterText::parse(&text);
    let editing = o.exclude || o.comment_out || o.edit || o.names.iter().any(|n| n.contains('='));
    if !editing {
        show(o, mode, &master);
    }
    if o.names.is_empty() {
        die(PROG, EX_USAGE, "no service or parameter specified to edit");
    }
    for request in &o.names {
        if o.exclude || o.comment_out {
            let p = Pattern::parse(request, mode);
            let mut found = false;
            match mode {
                Mode::Entries if o.comment_out => master.comment_out(|e| {
                    let m = p.matches(e);
                    found |= m;
                    m
                }),
                Mode::Entries => master.remove(|e| {
                    let m = p.matches(e);
                    found |= m;
                    m
                }),
                _ => {
                    let Some(param) = p.last.as_deref() else {
                        die(
                            PROG,
                            EX_USAGE,
                            format_args!("-PX requires service/type/parameter: \"{request}\""),
                        );
                    };
                    for e in master.entries_mut().filter(|e| p.matches(e)) {
                        found |= e.remove_param(param);
                    }
                }
            }
            if !found {
                eprintln!("{PROG}: warning: unmatched request: \"{request}\"");
            }
            continue;
        }
        let Some((key, value)) = request.split_once('=') else {
            die(
                PROG,
                EX_USAGE,
                format_args!("-e: bad assignment \"{request}\": expected name=value"),
            );
        };
        let p = Pattern::parse(key.trim(), mode);
        let result = match mode {
            Mode::Entries => edit_entry(&mut master, &p, value),
            Mode::Fields | Mode::Params => {
                let (Some(_), Some(_), Some(last)) = (&p.name, &p.kind, &p.last) else {
                    die(
                        PROG,
                        EX_USAGE,
                        format_args!(
                            "expected service/type/{} in \"{key}\"",
                            if mode == Mode::Fields {
                                "field"
                            } else {
                                "parameter"
                            }
                        ),
                    );
                };
                let mut found = false;
                let mut res = Ok(());
                for e in master.entries_mut().filter(|e| p.matches(e)) {
                    found = true;
                    if mode == Mode::Fields {
                        let i = FIELD_NAMES.iter().position(|f| f == last).unwrap_or(7);
                        res = res.and(e.set_field(i, value.trim()));
                    } else {
                        e.set_param(last, value.trim());
                    }
                }
                if !found {
                    eprintln!("{PROG}: warning: unmatched request: \"{}\"", p.text);
                }
                res
            }
        };
        if let Err(e) = result {
            die(PROG, EX_CONFIG, e);
        }
    }
    let new = master.text();
    if let Err(e) = postern_conf::master_cf::parse(&new, &file, 100) {
        die(PROG, EX_CONFIG, format_args!("edit refused: {e}"));
    }
    write_config_file(&file, &new);
    std::process::exit(EX_OK)
}

/// `-M name/type='entry'`: replaces or adds a whole service.
fn edit_entry(master: &mut MasterText, p: &Pattern, line: &str) -> Result<(), String> {
    let (Some(name), Some(kind)) = (&p.name, &p.kind) else {
        return Err(format!("-M edit requires service/type, not \"{}\"", p.text));
    };
    let fields = postern_conf::split_braced(line, false);
    if fields.len() >= 2 && (&fields[0] != name || &fields[1] != kind) {
        return Err(format!(
            "service {name}/{kind}: the new entry is for {}/{}",
            fields[0], fields[1]
        ));
    }
    master.set_entry(line)
}

fn show(o: &Opts, mode: Mode, master: &MasterText) -> ! {
    let patterns: Vec<Pattern> = o.names.iter().map(|n| Pattern::parse(n, mode)).collect();
    let mut matched = vec![false; patterns.len()];
    let mut out = String::new();
    for e in master.entries() {
        let hits: Vec<usize> = if patterns.is_empty() {
            vec![usize::MAX]
        } else {
            (0..patterns.len())
                .filter(|&i| patterns[i].matches(e))
                .collect()
        };
        if hits.is_empty() {
            continue;
        }
        let wanted = |last: &str, matched: &mut [bool]| {
            if patterns.is_empty() {
                return true;
            }
            let mut yes = false;
            for &i in &hits {
                if patterns[i].last.as_deref().is_none_or(|l| l == last) {
                    matched[i] = true;
                    yes = true;
                }
            }
            yes
        };
        let prefix = format!("{}/{}/", e.name(), e.kind());
        match mode {
            Mode::Entries => {
                if wanted("", &mut matched) {
                    out.push_str(&e.format(o.fold));
                    out.push('\n');
                }
            }
            Mode::Fields => {
                for (i, f) in FIELD_NAMES.iter().enumerate() {
                    if wanted(f, &mut matched) {
                        line(&mut out, o, &prefix, f, &e.field(i));
                    }
                }
            }
            Mode::Params => {
                let mut params = e.params();
                params.sort_by(|a, b| a.0.cmp(b.0));
                for (n, v) in params {
                    if wanted(n, &mut matched) {
                        line(&mut out, o, &prefix, n, v);
                    }
                }
            }
        }
    }
    for (i, p) in patterns.iter().enumerate() {
        if !matched[i] {
            eprintln!("{PROG}: warning: unmatched request: \"{}\"", p.text);
        }
    }
    print!("{out}");
    std::process::exit(EX_OK)
}

/// One `name/type/what = value` line (`-h`: the value, `-H`: the name).
fn line(out: &mut String, o: &Opts, prefix: &str, what: &str, value: &str) {
    let text = if o.value_only {
        value.to_string()
    } else if o.name_only {
        format!("{prefix}{what}")
    } else {
        format!("{prefix}{what} = {value}")
    };
    out.push_str(&text);
    out.push('\n');
}
