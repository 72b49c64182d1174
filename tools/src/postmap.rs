//! postmap and postalias: build, query, list and update lookup tables,
//! with Postfix's options.
//!
//! - `postmap [type:]file ...` compiles each source file into its
//!   indexed file (`hash:`/`btree:` → `file.db`, `cdb:` → `file.cdb`,
//!   `lmdb:` → `file.lmdb`; all are CDB files, see
//!   `postern_common::cdb`), written beside it and renamed into place once
//!   on disk, so a daemon reading the table meanwhile sees the old one or
//!   the new one. Keys are folded to lower case (not with `-f`); `-N`
//!   stores keys and values with a terminating null byte, `-n` without
//!   (the default). A duplicate key is skipped with a warning (`-w`: no
//!   warning; `-r`: the later entry wins). `-i` adds entries read on
//!   standard input to the existing table. Run by root on a file owned by
//!   another user, the program works as that user (not with `-o`); the new
//!   file gets the source's group and other read permissions (`-p`: 0644).
//! - `-q key` prints the value of `key` in the first table that has it,
//!   from any table type Postern reads; `-q -` reads keys on standard
//!   input and prints `key<TAB>value` for each key found. Exit 0 when
//!   found, 1 when not.
//! - `-s` lists every entry; `-d key` (`-d -`: keys on standard input)
//!   removes entries, exit 0 when one was there.
//! - postalias is the same for aliases(5) sources (`name: value`), and
//!   prints `key:<TAB>value`.
//!
//! Errors are one line on stderr, `NAME: fatal: reason`, with an exit code
//! above 1 (sysexits) so "not found" (1) stays distinguishable.

use crate::die;
use crate::sysexits::*;
use postern_common::cdb::{self, Duplicates};
use postern_common::maps::{self, SourceReader, Table};
use std::fs::File;
use std::io::{self, BufRead, BufReader, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// How a table is built.
#[derive(Debug, Clone)]
pub struct BuildOptions {
    /// aliases(5) syntax (postalias, newaliases).
    pub aliases: bool,
    /// Fold keys to lower case (not with -f).
    pub fold: bool,
    /// -N: keys and values end with a null byte.
    pub nul: bool,
    pub dups: Duplicates,
    /// Warn about duplicate keys (not with -r or -w).
    pub warn_dups: bool,
    /// Give the new file the source's group/other read bits (not with -p).
    pub inherit_mode: bool,
    /// -o: stay root when the source belongs to another user.
    pub keep_root: bool,
}

impl BuildOptions {
    pub fn new(aliases: bool) -> BuildOptions {
        BuildOptions {
            aliases,
            fold: true,
            nul: false,
            dups: Duplicates::KeepFirst,
            warn_dups: true,
            inherit_mode: true,
            keep_root: false,
        }
    }
}

/// A failure: exit code and reason.
pub type Failure = (i32, String);

/// Splits `[type:]name`, the type defaulting to `default_type`.
pub fn split_map<'a>(arg: &'a str, default_type: &'a str) -> (&'a str, &'a str) {
    match arg.split_once(':') {
        Some((kind, name))
            if !kind.is_empty() && kind.bytes().all(|b| b.is_ascii_alphanumeric()) =>
        {
            (kind, name)
        }
        _ => (default_type, arg),
    }
}

/// Exclusive lock on the table now at `path` (Postfix's postmap locks the
/// table while it updates it), so two updates do not lose each other's
/// entries; None when there is no table yet. A file renamed over the one
/// locked is locked again.
fn lock_existing(path: &Path) -> Option<File> {
    loop {
        let f = File::open(path).ok()?;
        f.lock().ok()?;
        let same = match (std::fs::metadata(path), f.metadata()) {
            (Ok(now), Ok(locked)) => now.ino() == locked.ino() && now.dev() == locked.dev(),
            _ => false,
        };
        if same {
            return Some(f);
        }
    }
}

/// While alive, the effective user and group are a source file's owner
/// (root runs postmap on a user's file as that user, as Postfix does).
struct AsOwner {
    groups: Vec<nix::unistd::Gid>,
}

impl AsOwner {
    fn switch(meta: &std::fs::Metadata) -> Result<Option<AsOwner>, String> {
        use nix::unistd::{geteuid, getgroups, setegid, seteuid, setgroups, Gid, Uid};
        if !geteuid().is_root() || meta.uid() == 0 {
            return Ok(None);
        }
        let groups = getgroups().unwrap_or_default();
        let gid = Gid::from_raw(meta.gid());
        setgroups(&[gid])
            .and_then(|_| setegid(gid))
            .and_then(|_| seteuid(Uid::from_raw(meta.uid())))
            .map_err(|e| format!("cannot run as the owner of the source file: {e}"))?;
        Ok(Some(AsOwner { groups }))
    }
}

impl Drop for AsOwner {
    fn drop(&mut self) {
        use nix::unistd::{setegid, seteuid, setgroups, Gid, Uid};
        let _ = seteuid(Uid::from_raw(0));
        let _ = setegid(Gid::from_raw(0));
        let _ = setgroups(&self.groups);
    }
}

/// The entries of a source, as (key, value) to store: split, folded,
/// null-terminated as asked; a malformed line is skipped with Postfix's
/// warning.
fn add_source<R: BufRead>(
    prog: &str,
    what: &str,
    input: R,
    opts: &BuildOptions,
    w: &mut cdb::Writer,
    target: &Path,
) -> Result<(), Failure> {
    let mut src = SourceReader::new(input);
    loop {
        let (lineno, line) = match src.next_line() {
            Ok(Some(l)) => l,
            Ok(None) => return Ok(()),
            Err(e) => return Err((EX_IOERR, format!("read {what}: {e}"))),
        };
        let (mut key, mut value) = match maps::split_entry(&line, opts.aliases) {
            Ok(kv) => kv,
            Err(why) => {
                eprintln!("{prog}: warning: {what}, line {lineno}: {why}");
                continue;
            }
        };
        if opts.fold {
            key = maps::fold_key(&key);
        }
        if opts.nul {
            key.push(0);
            value.push(0);
        }
        w.add(&key, &value)
            .map_err(|e| (EX_CANTCREAT, format!("write {}: {e}", target.display())))?;
    }
}

/// Finishes a table: duplicates resolved (and warned about), the file put
/// in place. Returns the number of entries.
fn commit(prog: &str, w: cdb::Writer, opts: &BuildOptions, path: &Path) -> Result<usize, Failure> {
    let (dropped, kept) = w
        .commit(opts.dups)
        .map_err(|e| (EX_CANTCREAT, format!("write {}: {e}", path.display())))?;
    if opts.warn_dups {
        for k in dropped {
            let k = k.strip_suffix(b"\0").unwrap_or(&k);
            eprintln!(
                "{prog}: warning: {}: duplicate entry: \"{}\"",
                path.display(),
                String::from_utf8_lossy(k)
            );
        }
    }
    Ok(kept)
}

fn indexed_path(kind: &str, name: &str) -> Result<PathBuf, Failure> {
    maps::indexed_file(kind, name).ok_or_else(|| {
        (
            EX_UNAVAILABLE,
            format!(
                "unsupported dictionary type for creating or updating a table: {kind} \
                 (Postern builds hash, btree, cdb and lmdb)"
            ),
        )
    })
}

/// Builds `kind:name` from the source file `name`. Returns the number of
/// entries.
pub fn build(prog: &str, kind: &str, name: &str, opts: &BuildOptions) -> Result<usize, Failure> {
    let path = indexed_path(kind, name)?;
    let source = File::open(name).map_err(|e| (EX_NOINPUT, format!("open {name}: {e}")))?;
    let meta = source
        .metadata()
        .map_err(|e| (EX_NOINPUT, format!("open {name}: {e}")))?;
    let _owner = if opts.keep_root {
        None
    } else {
        AsOwner::switch(&meta).map_err(|e| (EX_NOPERM, e))?
    };
    let mode = if opts.inherit_mode {
        0o600 | (meta.permissions().mode() & 0o044)
    } else {
        0o644
    };
    let _lock = lock_existing(&path);
    let mut w = cdb::Writer::create(&path, mode).map_err(|e| {
        (
            EX_CANTCREAT,
            format!("open database {}: {e}", path.display()),
        )
    })?;
    add_source(
        prog,
        name,
        BufReader::with_capacity(256 * 1024, source),
        opts,
        &mut w,
        &path,
    )?;
    commit(prog, w, opts, &path)
}

/// Opens the indexed table of `kind:name` for an update, refusing what is
/// not one of Postern's CDB files; None when it does not exist.
fn open_for_update(kind: &str, name: &str) -> Result<Option<maps::Table>, Failure> {
    let path = indexed_path(kind, name)?;
    if !path.exists() {
        return Ok(None);
    }
    let t = Table::open(&format!("{kind}:{name}")).map_err(|e| (EX_NOINPUT, e))?;
    match t {
        Table::Indexed { .. } => Ok(Some(t)),
        // A table of Postern's format before CDB: rebuilt from scratch.
        _ => Err((
            EX_DATAERR,
            format!(
                "{}: a table in Postern's old format; rebuild it from its source: \
                 postmap {kind}:{name}",
                path.display()
            ),
        )),
    }
}

/// A new file for the table at `path`, with the mode of the one it
/// replaces (0644 when there is none).
fn writer_like(path: &Path) -> Result<cdb::Writer, Failure> {
    let mode = std::fs::metadata(path)
        .map(|m| m.permissions().mode() & 0o7777)
        .unwrap_or(0o644);
    cdb::Writer::create(path, mode).map_err(|e| {
        (
            EX_CANTCREAT,
            format!("open database {}: {e}", path.display()),
        )
    })
}

/// `-i`: adds the entries of `input` to `kind:name` (creating it).
pub fn add_entries(
    prog: &str,
    kind: &str,
    name: &str,
    input: &[u8],
    opts: &BuildOptions,
) -> Result<usize, Failure> {
    let path = indexed_path(kind, name)?;
    let _lock = lock_existing(&path);
    let old = open_for_update(kind, name)?;
    let mut w = writer_like(&path)?;
    if let Some(Table::Indexed { db, .. }) = &old {
        let reader = db.reader();
        for r in reader.records() {
            let (k, v) = r.map_err(|e| (EX_IOERR, format!("read {}: {e}", path.display())))?;
            w.add(&k, &v)
                .map_err(|e| (EX_CANTCREAT, format!("write {}: {e}", path.display())))?;
        }
    }
    add_source(prog, "stdin", input, opts, &mut w, &path)?;
    commit(prog, w, opts, &path)
}

/// `-d`: removes `keys` from `kind:name`; the number removed.
pub fn delete(kind: &str, name: &str, keys: &[Vec<u8>]) -> Result<usize, Failure> {
    let path = indexed_path(kind, name)?;
    let _lock = lock_existing(&path);
    let Some(Table::Indexed { db, .. }) = open_for_update(kind, name)? else {
        return Err((
            EX_NOINPUT,
            format!(
                "open database {}: No such file or directory",
                path.display()
            ),
        ));
    };
    let ioerr = |e: io::Error| (EX_IOERR, format!("read {}: {e}", path.display()));
    let mut present = false;
    for k in keys {
        present |= db.get(k).map_err(ioerr)?.is_some();
    }
    if !present {
        return Ok(0);
    }
    let mut w = writer_like(&path)?;
    let mut removed = 0;
    let reader = db.reader();
    for r in reader.records() {
        let (k, v) = r.map_err(ioerr)?;
        if keys
            .iter()
            .any(|d| *d == k.strip_suffix(b"\0").unwrap_or(&k))
        {
            removed += 1;
            continue;
        }
        w.add(&k, &v)
            .map_err(|e| (EX_CANTCREAT, format!("write {}: {e}", path.display())))?;
    }
    w.commit(Duplicates::KeepFirst)
        .map_err(|e| (EX_CANTCREAT, format!("write {}: {e}", path.display())))?;
    Ok(removed)
}

/// The value of `key` in `table`: indexed tables by the key as given
/// (folded unless `-f`), others as the daemons look them up (`$N`
/// expanded for regexp:/pcre:).
fn query(table: &Table, key: &str, fold: bool) -> Result<Option<Vec<u8>>, Failure> {
    match table {
        Table::Indexed { db, .. } => {
            let k = if fold {
                maps::fold_key(key.as_bytes())
            } else {
                key.as_bytes().to_vec()
            };
            db.get(&k)
                .map_err(|e| (EX_IOERR, format!("read {}: {e}", db.path().display())))
        }
        other => other
            .lookup_expanded(key)
            .map(|v| v.map(String::into_bytes))
            .map_err(|e| {
                (
                    EX_TEMPFAIL,
                    format!("table {}: query error: {}", e.table, e.reason),
                )
            }),
    }
}

/// Every entry of `table`, for `-s`.
fn dump(table: &Table, spec: &str, out: &mut dyn FnMut(&[u8], &[u8])) -> Result<(), Failure> {
    match table {
        Table::Indexed { db, .. } => {
            for r in db.entries() {
                let (k, v) =
                    r.map_err(|e| (EX_IOERR, format!("read {}: {e}", db.path().display())))?;
                out(&k, &v);
            }
            Ok(())
        }
        Table::Entries { map, .. } => {
            for (k, v) in map {
                out(k.as_bytes(), v.as_bytes());
            }
            Ok(())
        }
        _ => Err((
            EX_UNAVAILABLE,
            format!("table {spec}: sequence operation is not supported"),
        )),
    }
}

#[derive(Debug, Default)]
struct Args {
    config: Option<PathBuf>,
    query: Option<String>,
    delete: Option<String>,
    dump: bool,
    incremental: bool,
    no_fold: bool,
    nul: Option<bool>,
    replace: bool,
    ignore_dups: bool,
    no_inherit: bool,
    keep_root: bool,
    maps: Vec<String>,
}

fn usage(prog: &str) -> ! {
    die(
        prog,
        EX_USAGE,
        format_args!(
            "usage: {prog} [-fimnNoprsuUvw] [-c config_dir] [-d key] [-q key] \
             [map_type:]file..."
        ),
    )
}

fn parse_args(prog: &str, argv: Vec<String>) -> Args {
    let mut a = Args::default();
    let mut it = argv.into_iter();
    let mut only_maps = false;
    while let Some(arg) = it.next() {
        if only_maps || !arg.starts_with('-') || arg == "-" {
            a.maps.push(arg);
            continue;
        }
        if arg == "--" {
            only_maps = true;
            continue;
        }
        let flags: Vec<char> = arg[1..].chars().collect();
        let mut i = 0;
        while i < flags.len() {
            let c = flags[i];
            i += 1;
            if matches!(c, 'c' | 'd' | 'q') {
                let rest: String = flags[i..].iter().collect();
                i = flags.len();
                let value = if rest.is_empty() {
                    it.next().unwrap_or_else(|| usage(prog))
                } else {
                    rest
                };
                match c {
                    'c' => a.config = Some(PathBuf::from(value)),
                    'd' => a.delete = Some(value),
                    _ => a.query = Some(value),
                }
                continue;
            }
            match c {
                'f' => a.no_fold = true,
                'i' => a.incremental = true,
                'N' => a.nul = Some(true),
                'n' => a.nul = Some(false),
                'o' => a.keep_root = true,
                'p' => a.no_inherit = true,
                'r' => a.replace = true,
                's' => a.dump = true,
                'w' => a.ignore_dups = true,
                // -u (no UTF-8 checks), -U and -m (for -b/-h) and -v change
                // nothing here: keys and values are stored as bytes.
                'u' | 'U' | 'm' | 'v' => {}
                'b' | 'h' | 'F' | 'x' => die(
                    prog,
                    EX_USAGE,
                    format_args!("option -{c} is not supported by Postern's {prog}"),
                ),
                _ => usage(prog),
            }
        }
    }
    a
}

/// Keys from standard input, one a line (`-q -`, `-d -`).
fn stdin_keys(prog: &str) -> Vec<String> {
    let mut keys = Vec::new();
    for line in io::stdin().lock().split(b'\n') {
        match line {
            Ok(l) => {
                let l = l.strip_suffix(b"\r").unwrap_or(&l);
                keys.push(String::from_utf8_lossy(l).into_owned());
            }
            Err(e) => die(prog, EX_IOERR, format_args!("read stdin: {e}")),
        }
    }
    keys
}

/// The default map type: `default_database_type` of main.cf, or `hash`
/// when there is no configuration to read (postmap needs none).
fn default_type(prog: &str, dir: Option<&Path>) -> String {
    let d = postern_conf::config_dir(dir);
    match postern_conf::Config::load(&d) {
        Ok(cfg) => cfg.get("default_database_type"),
        Err(e) if dir.is_some() => die(prog, EX_CONFIG, e),
        Err(_) => "hash".into(),
    }
}

/// `postmap` (`aliases` false) or `postalias` (true).
pub fn main_as(prog: &str, aliases: bool) -> ! {
    let a = parse_args(prog, std::env::args().skip(1).collect());
    if a.maps.is_empty() {
        usage(prog);
    }
    let modes = [a.query.is_some(), a.delete.is_some(), a.dump]
        .iter()
        .filter(|&&m| m)
        .count();
    if modes > 1 || (modes == 1 && a.incremental) {
        die(prog, EX_USAGE, "specify only one of -s -q -d or -i");
    }
    let untyped = a.maps.iter().any(|m| split_map(m, "").0.is_empty());
    let dtype = if untyped {
        default_type(prog, a.config.as_deref())
    } else {
        String::new()
    };
    let opts = build_options(&a, aliases);
    let maps: Vec<(String, String)> = a
        .maps
        .iter()
        .map(|m| {
            let (k, n) = split_map(m, &dtype);
            (k.to_string(), n.to_string())
        })
        .collect();
    let sep = if aliases { ":\t" } else { "\t" };
    let stdout = io::stdout();
    let mut out = io::BufWriter::new(stdout.lock());
    let code = if let Some(q) = &a.query {
        query_maps(prog, &maps, q, opts.fold, sep, &mut out)
    } else if let Some(d) = &a.delete {
        delete_keys(prog, &maps, d, opts.fold)
    } else if a.dump {
        dump_maps(prog, &maps, sep, &mut out)
    } else if a.incremental {
        let mut input = Vec::new();
        if let Err(e) = io::Read::read_to_end(&mut io::stdin().lock(), &mut input) {
            die(prog, EX_IOERR, format_args!("read stdin: {e}"));
        }
        for (k, n) in &maps {
            if let Err((code, why)) = add_entries(prog, k, n, &input, &opts) {
                die(prog, code, why);
            }
        }
        EX_OK
    } else {
        for (k, n) in &maps {
            if let Err((code, why)) = build(prog, k, n, &opts) {
                die(prog, code, why);
            }
        }
        EX_OK
    };
    let _ = out.flush();
    std::process::exit(code)
}

/// How the command line says tables are built.
fn build_options(a: &Args, aliases: bool) -> BuildOptions {
    BuildOptions {
        aliases,
        fold: !a.no_fold,
        nul: a.nul.unwrap_or(false),
        dups: if a.replace {
            Duplicates::KeepLast
        } else {
            Duplicates::KeepFirst
        },
        warn_dups: !(a.replace || a.ignore_dups),
        inherit_mode: !a.no_inherit,
        keep_root: a.keep_root,
    }
}

/// `-q key` (`-q -`: keys on standard input, printed with their values):
/// the value from the first table that has the key. The exit code: 0 when
/// a key was found, 1 when none was.
fn query_maps(
    prog: &str,
    maps: &[(String, String)],
    q: &str,
    fold: bool,
    sep: &str,
    out: &mut impl Write,
) -> i32 {
    let tables: Vec<Table> = maps
        .iter()
        .map(|(k, n)| Table::open(&format!("{k}:{n}")).unwrap_or_else(|e| die(prog, EX_NOINPUT, e)))
        .collect();
    let find = |key: &str| -> Option<Vec<u8>> {
        for t in &tables {
            match query(t, key, fold) {
                Ok(Some(v)) => return Some(v),
                Ok(None) => {}
                Err((code, why)) => die(prog, code, why),
            }
        }
        None
    };
    let mut found = false;
    if q == "-" {
        // Key by key, so a long list of keys costs no memory.
        for line in io::stdin().lock().split(b'\n') {
            let line =
                line.unwrap_or_else(|e| die(prog, EX_IOERR, format_args!("read stdin: {e}")));
            let key =
                String::from_utf8_lossy(line.strip_suffix(b"\r").unwrap_or(&line)).into_owned();
            if let Some(v) = find(&key) {
                found = true;
                let _ = write!(out, "{key}{sep}");
                let _ = out.write_all(&v);
                let _ = out.write_all(b"\n");
            }
        }
    } else if let Some(v) = find(q) {
        found = true;
        let _ = out.write_all(&v);
        let _ = out.write_all(b"\n");
    }
    if found {
        EX_OK
    } else {
        1
    }
}

/// `-d key` (`-d -`: keys on standard input): removes the keys from every
/// table. The exit code: 0 when one was there, 1 when none was.
fn delete_keys(prog: &str, maps: &[(String, String)], d: &str, fold: bool) -> i32 {
    let keys: Vec<String> = if d == "-" {
        stdin_keys(prog)
    } else {
        vec![d.to_string()]
    };
    let keys: Vec<Vec<u8>> = keys
        .iter()
        .map(|k| {
            if fold {
                maps::fold_key(k.as_bytes())
            } else {
                k.as_bytes().to_vec()
            }
        })
        .collect();
    let mut found = false;
    for (k, n) in maps {
        match delete(k, n, &keys) {
            Ok(removed) => found |= removed > 0,
            Err((code, why)) => die(prog, code, why),
        }
    }
    if found {
        EX_OK
    } else {
        1
    }
}

/// `-s`: every entry of every table, `key<sep>value` a line.
fn dump_maps(prog: &str, maps: &[(String, String)], sep: &str, out: &mut impl Write) -> i32 {
    for (k, n) in maps {
        let spec = format!("{k}:{n}");
        let t = Table::open(&spec).unwrap_or_else(|e| die(prog, EX_NOINPUT, e));
        let mut emit = |key: &[u8], value: &[u8]| {
            let _ = out.write_all(key);
            let _ = out.write_all(sep.as_bytes());
            let _ = out.write_all(value);
            let _ = out.write_all(b"\n");
        };
        if let Err((code, why)) = dump(&t, &spec, &mut emit) {
            let _ = out.flush();
            die(prog, code, why);
        }
    }
    EX_OK
}
