//! Building the aliases database (`newaliases`, `sendmail -bi`) and other
//! indexed tables: the source file is compiled into `FILE.db`.

use postern_common::maps;
use std::path::Path;

/// Compiles one `hash:` source file. `aliases` selects aliases(5) syntax.
pub fn build(source: &Path, aliases: bool) -> Result<usize, String> {
    let text =
        std::fs::read_to_string(source).map_err(|e| format!("open {}: {e}", source.display()))?;
    let entries = maps::parse_source(&text, aliases)
        .map_err(|(line, e)| format!("{}, line {line}: {e}", source.display()))?;
    maps::write_hash_db(source, &entries)
        .map_err(|e| format!("write {}: {e}", maps::db_path(source).display()))?;
    Ok(entries.len())
}

/// Rebuilds every table named in `alias_database`.
pub fn newaliases(cfg: &postern_conf::Config) -> Result<(), String> {
    for spec in maps::split_specs(&cfg.get("alias_database")) {
        match spec.split_once(':') {
            Some(("hash" | "btree" | "lmdb" | "cdb", path)) => {
                build(Path::new(path), true)?;
            }
            _ => eprintln!("newaliases: warning: {spec}: only hash: alias databases are built"),
        }
    }
    Ok(())
}
