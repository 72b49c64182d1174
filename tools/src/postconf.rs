//! postconf: shows and edits the configuration as Postfix 3.7's does.
//!
//! main.cf: `postconf [-d|-n|-p] [-h|-H] [-x] [-f] [name...]`, `-e
//! name=value...`, `-X name...`, `-# name...`; master.cf: `-M`, `-F`, `-P`
//! (with `-X`, `-#`, and `name/type[/field|/param]=value` edits, see
//! [`master`]); what the build offers: `-l`, `-m`, `-a`, `-A`, `-T`.
//! `postconf --man` prints postconf(5), made from the parameter table
//! ([`man`]).

#[path = "postconf_man.rs"]
mod man;
#[path = "postconf_master.rs"]
mod master;

use crate::die;
use crate::sysexits::*;
use postern_conf::{main_cf, params, postfix_params, Config};
use std::path::{Path, PathBuf};

const PROG: &str = "postconf";

#[derive(Default)]
struct Opts {
    config: Option<PathBuf>,
    defaults: bool,
    non_default: bool,
    value_only: bool,
    name_only: bool,
    expand: bool,
    fold: bool,
    edit: bool,
    exclude: bool,
    comment_out: bool,
    master_entries: bool,
    master_fields: bool,
    master_params: bool,
    lock_types: bool,
    map_types: bool,
    server_sasl: bool,
    client_sasl: bool,
    tls_info: Option<String>,
    overrides: Vec<(String, String)>,
    names: Vec<String>,
}

const USAGE: &str = "usage: postconf [-a (server SASL types)] [-A (client SASL types)] \
[-c config_dir] [-d (parameter defaults)] [-e (edit configuration)] [-f (fold lines)] \
[-F (master.cf fields)] [-h (no names)] [-H (no values)] [-l (lock types)] [-m (map types)] \
[-M (master.cf)] [-n (non-default parameters)] [-o name=value (override parameter value)] \
[-p (main.cf, default)] [-P (master.cf parameters)] \
[-T compile-version|run-version|public-key-algorithms] [-v (verbose)] \
[-x (expand parameter values)] [-X (exclude)] [-# (comment-out)] [name...]";

fn parse(args: impl Iterator<Item = String>) -> Opts {
    let mut o = Opts::default();
    let mut it = args.peekable();
    while let Some(a) = it.next() {
        if !o.names.is_empty() || !a.starts_with('-') || a.len() < 2 {
            o.names.push(a);
            continue;
        }
        let cluster: Vec<char> = a[1..].chars().collect();
        let mut i = 0;
        while i < cluster.len() {
            let c = cluster[i];
            i += 1;
            // An option with an argument takes the rest of the cluster or
            // the next word.
            let mut arg = || -> String {
                let rest: String = cluster[i..].iter().collect();
                i = cluster.len();
                if !rest.is_empty() {
                    return rest;
                }
                it.next().unwrap_or_else(|| {
                    eprintln!("{PROG}: option requires an argument -- '{c}'");
                    die(PROG, EX_USAGE, USAGE)
                })
            };
            match c {
                'c' => o.config = Some(PathBuf::from(arg())),
                'o' => {
                    let v = arg();
                    let Some((n, val)) = v.split_once('=') else {
                        die(
                            PROG,
                            EX_USAGE,
                            format_args!("-o \"{v}\": expected name=value"),
                        )
                    };
                    o.overrides
                        .push((n.trim().to_string(), val.trim().to_string()));
                }
                'T' => o.tls_info = Some(arg()),
                'd' => o.defaults = true,
                'n' => o.non_default = true,
                'p' => {}
                'h' => o.value_only = true,
                'H' => o.name_only = true,
                'x' => o.expand = true,
                'f' => o.fold = true,
                'e' => o.edit = true,
                'X' => o.exclude = true,
                '#' => o.comment_out = true,
                'M' => o.master_entries = true,
                'F' => o.master_fields = true,
                'P' => o.master_params = true,
                'l' => o.lock_types = true,
                'm' => o.map_types = true,
                'a' => o.server_sasl = true,
                'A' => o.client_sasl = true,
                'v' => {}
                other => {
                    eprintln!("{PROG}: invalid option -- '{other}'");
                    die(PROG, EX_USAGE, USAGE)
                }
            }
        }
    }
    o
}

pub fn main() -> ! {
    let mut args = std::env::args().skip(1).peekable();
    if args.peek().map(String::as_str) == Some("--man") {
        print!("{}", man::page());
        std::process::exit(EX_OK);
    }
    let o = parse(args);
    if let Some(list) = build_information(&o) {
        for l in list {
            println!("{l}");
        }
        std::process::exit(EX_OK);
    }
    let dir = postern_conf::config_dir(o.config.as_deref());
    let masters = [o.master_entries, o.master_fields, o.master_params];
    if masters.iter().filter(|m| **m).count() > 1 {
        die(PROG, EX_USAGE, "specify only one of -M, -F or -P");
    }
    if o.master_entries || o.master_fields || o.master_params {
        master::run(&o, &dir);
    }
    if o.exclude || o.comment_out {
        let names = o.names.clone();
        edit_main_cf(&dir, |text| {
            names
                .iter()
                .fold(text, |t, n| main_cf::remove(&t, n, o.comment_out))
        });
    }
    if o.edit {
        let pairs = o.names.clone();
        edit_main_cf(&dir, |mut text| {
            for p in &pairs {
                let Some((n, v)) = p.split_once('=') else {
                    die(
                        PROG,
                        EX_USAGE,
                        format_args!("-e: bad assignment \"{p}\": expected name=value"),
                    );
                };
                let n = n.trim();
                if !params::is_known(n) {
                    eprintln!("{PROG}: warning: {n}: unknown parameter");
                }
                text = main_cf::edit(&text, n, v.trim());
            }
            text
        });
    }
    show_main_cf(&o, &dir);
}

/// `-l`, `-m`, `-a`, `-A`, `-T`: what this build offers.
fn build_information(o: &Opts) -> Option<Vec<String>> {
    let list =
        |v: &[&str]| -> Option<Vec<String>> { Some(v.iter().map(|s| s.to_string()).collect()) };
    if o.lock_types {
        // local takes both on every mailbox (mailbox_delivery_lock).
        return list(&["fcntl", "dotlock"]);
    }
    if o.map_types {
        // The types common::maps::Table opens (tests/test_postconf.py
        // opens each with postmap -q).
        return list(&[
            "btree",
            "cdb",
            "cidr",
            "hash",
            "inline",
            "lmdb",
            "nis",
            "pcre",
            "pipemap",
            "proxy",
            "randmap",
            "regexp",
            "socketmap",
            "static",
            "tcp",
            "texthash",
            "unionmap",
            "unix",
            "weighted",
        ]);
    }
    if o.server_sasl {
        return list(&["dovecot"]);
    }
    if o.client_sasl {
        // The smtp client's own SASL (PLAIN, LOGIN) stands in for
        // Postfix's default client type.
        return list(&["cyrus"]);
    }
    match o.tls_info.as_deref() {
        None => None,
        Some("compile-version") | Some("run-version") => {
            list(&[concat!("rustls ", env!("POSTERN_RUSTLS_VERSION"))])
        }
        Some("public-key-algorithms") => list(&["ecdsa", "ed25519", "rsa"]),
        Some(other) => die(
            PROG,
            EX_USAGE,
            format_args!(
                "invalid -T argument \"{other}\": expected compile-version, run-version or public-key-algorithms"
            ),
        ),
    }
}

/// Every parameter name `postconf` lists: Postern's, Postfix 3.7's, and
/// the per-transport ones of master.cf's delivery services.
fn all_names(cfg: &Config) -> Vec<String> {
    let mut v: Vec<String> = params::PARAMS
        .iter()
        .map(|(n, _)| n.to_string())
        .chain(postfix_params::all().iter().map(|r| r.name.to_string()))
        .chain(service_params(cfg).into_iter().map(|(n, _)| n))
        .collect();
    v.sort();
    v.dedup();
    v
}

fn service_params(cfg: &Config) -> Vec<(String, &'static str)> {
    let file = cfg.dir().join("master.cf");
    let Ok(text) = std::fs::read_to_string(&file) else {
        return Vec::new();
    };
    match postern_conf::master_cf::parse(&text, &file, 100) {
        Ok(services) => postfix_params::service_params(&services),
        Err(_) => Vec::new(),
    }
}

/// `cfg` with the defaults of the Postfix parameters Postern does not read
/// filled in, so that `-x` expands references to them as Postfix does
/// (the daemons' Config leaves them unset).
fn with_postfix_defaults(cfg: &Config) -> Config {
    let services = service_params(cfg);
    let fill: Vec<(String, String)> = postfix_params::all()
        .iter()
        .map(|r| (r.name.to_string(), r.postfix_default))
        .chain(services)
        .filter(|(n, _)| cfg.raw(n).is_none())
        .map(|(n, v)| (n, v.to_string()))
        .collect();
    let mut c = cfg.clone();
    c.set_overrides(fill);
    c
}

/// The default of `name` as `postconf -d` shows it.
fn default_value(cfg: &Config, name: &str) -> Option<String> {
    match name {
        "process_id" => return Some(std::process::id().to_string()),
        "process_name" => return Some(PROG.to_string()),
        _ => {}
    }
    if let Some(v) = cfg.default_raw(name) {
        return Some(v.to_string());
    }
    if let Some(r) = postfix_params::find(name) {
        return Some(r.postfix_default.to_string());
    }
    service_params(cfg)
        .into_iter()
        .find(|(n, _)| n == name)
        .map(|(_, d)| d.to_string())
}

fn show_main_cf(o: &Opts, dir: &Path) -> ! {
    let mut cfg = if o.defaults {
        Config::from_text(dir, "", &dir.join("main.cf")).unwrap_or_else(|e| die(PROG, EX_CONFIG, e))
    } else {
        crate::load_config(PROG, Some(dir))
    };
    cfg.set_overrides(o.overrides.iter().cloned());
    if !o.defaults {
        for (name, line) in cfg.unknown_parameters() {
            eprintln!(
                "{PROG}: warning: {}/main.cf, line {line}: unused parameter: {name}={}",
                dir.display(),
                cfg.raw(name).map(|(v, _)| v).unwrap_or("")
            );
        }
    }
    let names: Vec<String> = if !o.names.is_empty() {
        o.names.clone()
    } else if o.non_default {
        let mut v: Vec<String> = cfg
            .explicit_names()
            .into_iter()
            .filter(|n| params::is_known(n))
            .collect();
        // As Postfix: -c makes config_directory a setting of its own.
        if o.config.is_some() {
            v.push("config_directory".into());
            v.sort();
            v.dedup();
        }
        v
    } else {
        all_names(&cfg)
    };
    let mut expander: Option<Config> = None;
    let mut out = String::new();
    for n in &names {
        let value = if o.defaults {
            default_value(&cfg, n)
        } else {
            match cfg.raw(n) {
                Some((v, true)) => Some(v.to_string()),
                _ => default_value(&cfg, n),
            }
        };
        let Some(value) = value else {
            eprintln!("{PROG}: warning: {n}: unknown parameter");
            continue;
        };
        let value = if o.expand {
            expander
                .get_or_insert_with(|| with_postfix_defaults(&cfg))
                .expand(&value)
        } else {
            value
        };
        let line = if o.name_only {
            n.clone()
        } else if o.value_only {
            value
        } else if value.is_empty() {
            format!("{n} =")
        } else {
            format!("{n} = {value}")
        };
        if o.fold {
            out.push_str(&fold(&line));
        } else {
            out.push_str(&line);
        }
        out.push('\n');
    }
    print!("{out}");
    std::process::exit(EX_OK)
}

/// A long line wrapped at white space, continued with four spaces, as
/// Postfix's `postconf -f`.
fn fold(line: &str) -> String {
    let mut out = String::new();
    let mut cur = String::new();
    for w in line.split(' ').filter(|w| !w.is_empty()) {
        if cur.is_empty() {
            cur = if out.is_empty() {
                w.to_string()
            } else {
                format!("    {w}")
            };
        } else if cur.len() + 1 + w.len() < 80 {
            cur.push(' ');
            cur.push_str(w);
        } else {
            out.push_str(&cur);
            out.push('\n');
            cur = format!("    {w}");
        }
    }
    out.push_str(&cur);
    out
}

/// Edits main.cf in place: `change` makes the new text, which is checked
/// and written whole (see [`write_config_file`]).
fn edit_main_cf(dir: &Path, change: impl FnOnce(String) -> String) -> ! {
    let file = dir.join("main.cf");
    let text = std::fs::read_to_string(&file).unwrap_or_else(|e| {
        die(
            PROG,
            EX_CONFIG,
            format_args!("open {}: {e}", file.display()),
        )
    });
    let text = change(text);
    if let Err(e) = main_cf::parse(&text, &file) {
        die(PROG, EX_CONFIG, e);
    }
    write_config_file(&file, &text);
    std::process::exit(EX_OK)
}

/// Replaces a configuration file whole (a temporary file with the same
/// owner and mode, renamed over it), so that a daemon never reads half.
fn write_config_file(file: &Path, text: &str) {
    let dir = file.parent().unwrap_or(Path::new("."));
    let base = file
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{base}.{}", std::process::id()));
    let res = std::fs::write(&tmp, text).and_then(|_| {
        if let Ok(meta) = std::fs::metadata(file) {
            use std::os::unix::fs::MetadataExt;
            let _ = std::fs::set_permissions(&tmp, meta.permissions());
            let _ = std::os::unix::fs::chown(&tmp, Some(meta.uid()), Some(meta.gid()));
        }
        std::fs::rename(&tmp, file)
    });
    if let Err(e) = res {
        let _ = std::fs::remove_file(&tmp);
        die(
            PROG,
            EX_CANTCREAT,
            format_args!("write {}: {e}", file.display()),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_and_names() {
        let o = parse(
            ["-c", "/x", "-nh", "-oa=b", "myorigin", "-n"]
                .iter()
                .map(|s| s.to_string()),
        );
        assert_eq!(o.config, Some(PathBuf::from("/x")));
        assert!(o.non_default && o.value_only);
        assert_eq!(o.overrides, vec![("a".to_string(), "b".to_string())]);
        assert_eq!(o.names, vec!["myorigin", "-n"]);
        let o = parse(["-T", "run-version"].iter().map(|s| s.to_string()));
        assert_eq!(o.tls_info.as_deref(), Some("run-version"));
    }

    #[test]
    fn man_page_is_generated() {
        assert!(
            include_str!("../../man/postconf.5") == man::page(),
            "man/postconf.5 is not what `postconf --man` prints: regenerate it"
        );
    }

    #[test]
    fn folding() {
        let long = format!("a = {}", "word ".repeat(30));
        for l in fold(&long).lines() {
            assert!(l.len() < 80);
        }
        assert!(fold(&long).lines().nth(1).unwrap().starts_with("    word"));
    }
}
