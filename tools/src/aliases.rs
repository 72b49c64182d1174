//! `newaliases` (`sendmail -bi`): builds every table of `alias_database`
//! as `postalias` does.

use crate::postmap::{self, BuildOptions};
use postern_common::maps;

/// Rebuilds every table named in `alias_database`.
pub fn newaliases(cfg: &postern_conf::Config) -> Result<(), String> {
    let dtype = cfg.get("default_database_type");
    for spec in maps::split_specs(&cfg.get("alias_database")) {
        let (kind, name) = postmap::split_map(&spec, &dtype);
        if maps::indexed_file(kind, name).is_none() {
            eprintln!("newaliases: warning: {spec}: only hash, btree, cdb and lmdb alias databases are built");
            continue;
        }
        postmap::build("postalias", kind, name, &BuildOptions::new(true)).map_err(|(_, e)| e)?;
    }
    Ok(())
}
