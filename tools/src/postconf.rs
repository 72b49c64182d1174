//! postconf: prints parameters (`postconf`, `-n`, `-d`, `-h`, `-x`,
//! `postconf NAME...`) and edits main.cf (`-e NAME=VALUE...`), as Postfix's.

use crate::die;
use crate::sysexits::*;
use postern_conf::{main_cf, params, Config};
use std::path::PathBuf;

#[derive(Default)]
struct Opts {
    config: Option<PathBuf>,
    defaults: bool,
    non_default: bool,
    value_only: bool,
    expand: bool,
    edit: bool,
    names: Vec<String>,
}

fn parse() -> Opts {
    let mut o = Opts::default();
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        if a.starts_with('-') && a.len() > 1 && !o.edit
            || (o.edit && a.starts_with('-') && o.names.is_empty())
        {
            for c in a[1..].chars() {
                match c {
                    'c' => {
                        o.config = Some(PathBuf::from(it.next().unwrap_or_else(|| {
                            die("postconf", EX_USAGE, "-c requires a directory")
                        })))
                    }
                    'd' => o.defaults = true,
                    'n' => o.non_default = true,
                    'h' => o.value_only = true,
                    'x' => o.expand = true,
                    'e' => o.edit = true,
                    'v' => {}
                    other => die(
                        "postconf",
                        EX_USAGE,
                        format_args!("invalid option -- '{other}'"),
                    ),
                }
            }
        } else {
            o.names.push(a);
        }
    }
    o
}

pub fn main() -> ! {
    let o = parse();
    let dir = postern_conf::config_dir(o.config.as_deref());
    if o.edit {
        edit(&dir, &o.names);
    }
    let cfg = if o.defaults {
        Config::from_text(&dir, "", &dir.join("main.cf"))
            .unwrap_or_else(|e| die("postconf", EX_CONFIG, e))
    } else {
        crate::load_config("postconf", Some(&dir))
    };
    if !o.defaults {
        for (name, line) in cfg.unknown_parameters() {
            eprintln!(
                "postconf: warning: {}/main.cf, line {line}: unused parameter: {name}={}",
                dir.display(),
                cfg.raw(name).map(|(v, _)| v).unwrap_or("")
            );
        }
    }
    let names: Vec<String> = if !o.names.is_empty() {
        o.names.clone()
    } else if o.non_default {
        cfg.explicit_names()
    } else {
        let mut v: Vec<String> = params::PARAMS.iter().map(|(n, _)| n.to_string()).collect();
        v.sort();
        v
    };
    let mut out = String::new();
    for n in &names {
        let raw = if o.defaults {
            cfg.default_raw(n).map(|v| (v, false))
        } else {
            cfg.raw(n)
        };
        let Some((raw, explicit)) = raw else {
            eprintln!("postconf: warning: {n}: unknown parameter");
            continue;
        };
        if o.non_default && !explicit {
            continue;
        }
        let v = if o.expand {
            cfg.expand(raw)
        } else {
            raw.to_string()
        };
        if o.value_only {
            out.push_str(&v);
            out.push('\n');
        } else if v.is_empty() {
            out.push_str(&format!("{n} =\n"));
        } else {
            out.push_str(&format!("{n} = {v}\n"));
        }
    }
    print!("{out}");
    std::process::exit(EX_OK)
}

/// `postconf -e name=value ...`: edits main.cf in place, atomically.
fn edit(dir: &std::path::Path, pairs: &[String]) -> ! {
    let file = dir.join("main.cf");
    let mut text = std::fs::read_to_string(&file).unwrap_or_else(|e| {
        die(
            "postconf",
            EX_CONFIG,
            format_args!("open {}: {e}", file.display()),
        )
    });
    for p in pairs {
        let Some((n, v)) = p.split_once('=') else {
            die(
                "postconf",
                EX_USAGE,
                format_args!("-e: bad assignment \"{p}\": expected name=value"),
            );
        };
        let n = n.trim();
        if !params::is_known(n) {
            eprintln!("postconf: warning: {n}: unknown parameter");
        }
        text = main_cf::edit(&text, n, v.trim());
    }
    // Check what we are about to write, then replace the file whole.
    if let Err(e) = main_cf::parse(&text, &file) {
        die("postconf", EX_CONFIG, e);
    }
    let tmp = dir.join(format!(".main.cf.{}", std::process::id()));
    let res = std::fs::write(&tmp, &text).and_then(|_| {
        if let Ok(meta) = std::fs::metadata(&file) {
            use std::os::unix::fs::MetadataExt;
            let _ = std::fs::set_permissions(&tmp, meta.permissions());
            let _ = std::os::unix::fs::chown(&tmp, Some(meta.uid()), Some(meta.gid()));
        }
        std::fs::rename(&tmp, &file)
    });
    if let Err(e) = res {
        let _ = std::fs::remove_file(&tmp);
        die(
            "postconf",
            EX_CANTCREAT,
            format_args!("write {}: {e}", file.display()),
        );
    }
    std::process::exit(EX_OK)
}
