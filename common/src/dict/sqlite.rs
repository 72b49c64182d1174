//! `sqlite:/etc/postfix/sqlite-aliases.cf`: a table answered by an SQLite
//! database file, as sqlite_table(5): `dbpath`, `query` (or the older
//! `table`/`select_field`/`where_field`), `result_format`, `domain`,
//! `expansion_limit`; the first column of every row found, joined with
//! commas. Through the system's libsqlite3, loaded at first use.
//!
//! The database is opened read-only when the table is opened (as root,
//! before the daemon drops its privileges), and stays open. A query that
//! fails (the database locked past the busy timeout, a broken file) is a
//! [`LookupError`]: the caller defers.

use super::db_config::{CfFile, Templates};
use super::dynlib::{cstring, text, Library};
use super::{Dict, LookupError};
use std::ffi::{c_char, c_int, c_void};
use std::sync::{Mutex, OnceLock};

const SQLITE_OK: c_int = 0;
const SQLITE_ROW: c_int = 100;
const SQLITE_DONE: c_int = 101;
const SQLITE_OPEN_READONLY: c_int = 0x0000_0001;
/// How long a query waits for a writer's lock (the control panel
/// updating the file) before it fails.
const BUSY_TIMEOUT_MS: c_int = 10_000;

type Db = c_void;
type Stmt = c_void;

/// The libsqlite3 functions used.
struct Api {
    open_v2: unsafe extern "C" fn(*const c_char, *mut *mut Db, c_int, *const c_char) -> c_int,
    close_v2: unsafe extern "C" fn(*mut Db) -> c_int,
    busy_timeout: unsafe extern "C" fn(*mut Db, c_int) -> c_int,
    prepare_v2: unsafe extern "C" fn(
        *mut Db,
        *const c_char,
        c_int,
        *mut *mut Stmt,
        *mut *const c_char,
    ) -> c_int,
    step: unsafe extern "C" fn(*mut Stmt) -> c_int,
    column_text: unsafe extern "C" fn(*mut Stmt, c_int) -> *const c_char,
    finalize: unsafe extern "C" fn(*mut Stmt) -> c_int,
    errmsg: unsafe extern "C" fn(*mut Db) -> *const c_char,
}

fn api() -> Result<&'static Api, String> {
    static API: OnceLock<Result<Api, String>> = OnceLock::new();
    API.get_or_init(|| {
        let lib = Library::open(&["libsqlite3.so.0", "libsqlite3.so"], "libsqlite3-0")?;
        // SAFETY: the types are those of sqlite3.h.
        unsafe {
            Ok(Api {
                open_v2: lib.function("sqlite3_open_v2")?,
                close_v2: lib.function("sqlite3_close_v2")?,
                busy_timeout: lib.function("sqlite3_busy_timeout")?,
                prepare_v2: lib.function("sqlite3_prepare_v2")?,
                step: lib.function("sqlite3_step")?,
                column_text: lib.function("sqlite3_column_text")?,
                finalize: lib.function("sqlite3_finalize")?,
                errmsg: lib.function("sqlite3_errmsg")?,
            })
        }
    })
    .as_ref()
    .map_err(Clone::clone)
}

/// An open database handle.
struct Handle {
    api: &'static Api,
    db: *mut Db,
}

// SAFETY: the handle is used by one thread at a time (behind a Mutex).
unsafe impl Send for Handle {}

impl Drop for Handle {
    fn drop(&mut self) {
        // SAFETY: a handle from sqlite3_open_v2, closed once.
        unsafe { (self.api.close_v2)(self.db) };
    }
}

impl Handle {
    fn error(&self) -> String {
        // SAFETY: errmsg of a valid handle.
        unsafe { text((self.api.errmsg)(self.db)) }.unwrap_or_default()
    }

    /// Runs `sql`, giving the first column of each row to `row`.
    fn query(
        &self,
        sql: &str,
        row: &mut dyn FnMut(Option<&str>) -> Result<(), String>,
    ) -> Result<(), String> {
        let c = cstring("query", sql)?;
        let mut stmt: *mut Stmt = std::ptr::null_mut();
        // SAFETY: valid handle and string; stmt receives the statement.
        let rc = unsafe {
            (self.api.prepare_v2)(self.db, c.as_ptr(), -1, &mut stmt, std::ptr::null_mut())
        };
        if rc != SQLITE_OK {
            return Err(format!("SQL prepare failed: {}", self.error()));
        }
        let mut result = Ok(());
        loop {
            // SAFETY: a prepared statement.
            match unsafe { (self.api.step)(stmt) } {
                SQLITE_DONE => break,
                SQLITE_ROW => {
                    // SAFETY: column 0 of the current row; the text lives
                    // until the next step.
                    let value = unsafe { text((self.api.column_text)(stmt, 0)) };
                    if let Err(e) = row(value.as_deref()) {
                        result = Err(e);
                        break;
                    }
                }
                _ => {
                    result = Err(format!(
                        "SQL step failed for query '{sql}': {}",
                        self.error()
                    ));
                    break;
                }
            }
        }
        // SAFETY: finalized once.
        unsafe { (self.api.finalize)(stmt) };
        result
    }
}

/// A `sqlite:` table.
pub struct SqliteDict {
    table: String,
    templates: Templates,
    db: Mutex<Handle>,
}

impl std::fmt::Debug for SqliteDict {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteDict")
            .field("table", &self.table)
            .finish()
    }
}

impl SqliteDict {
    /// Reads `cf_path` and opens its `dbpath` read-only.
    pub fn open(cf_path: &str) -> Result<SqliteDict, String> {
        let table = format!("sqlite:{cf_path}");
        let cf = CfFile::read(cf_path)?;
        let dbpath = cf
            .get("dbpath")
            .filter(|p| !p.is_empty())
            .ok_or_else(|| format!("{cf_path}: dbpath is not set"))?
            .to_string();
        let templates = Templates::new(
            &table,
            &cf,
            cf.sql_query()?,
            cf.nonempty_or("result_format", "%s")?,
        )?;
        let api = api()?;
        let path = cstring("dbpath", &dbpath)?;
        let mut db: *mut Db = std::ptr::null_mut();
        // SAFETY: valid string; db receives a handle (also on failure).
        let rc = unsafe {
            (api.open_v2)(
                path.as_ptr(),
                &mut db,
                SQLITE_OPEN_READONLY,
                std::ptr::null(),
            )
        };
        let handle = Handle { api, db };
        if rc != SQLITE_OK {
            return Err(format!(
                "{cf_path}: open database {dbpath}: {}",
                handle.error()
            ));
        }
        // SAFETY: a valid handle.
        unsafe { (api.busy_timeout)(db, BUSY_TIMEOUT_MS) };
        // Read the schema now, as root: a file that is not a database is
        // an error at start, and a WAL database's index file is opened.
        handle
            .query("SELECT count(*) FROM sqlite_master", &mut |_| Ok(()))
            .map_err(|e| format!("{cf_path}: database {dbpath}: {e}"))?;
        Ok(SqliteDict {
            table,
            templates,
            db: Mutex::new(handle),
        })
    }
}

/// SQLite's quoting of a value inside '...' (sqlite3_mprintf's `%q`).
fn quote(value: &str, out: &mut String) {
    for c in value.chars() {
        if c == '\'' {
            out.push('\'');
        }
        out.push(c);
    }
}

impl Dict for SqliteDict {
    fn lookup(&self, key: &str) -> Result<Option<String>, LookupError> {
        let key = key.to_lowercase();
        if !self.templates.domain_allows(&key) {
            return Ok(None);
        }
        let Some(sql) = self.templates.expand_query(&key, &mut quote) else {
            return Ok(None);
        };
        let mut results = self.templates.results(&key);
        let db = self.db.lock().unwrap_or_else(|p| p.into_inner());
        db.query(&sql, &mut |value| results.add(value))
            .map_err(|e| LookupError::new(&self.table, e))?;
        Ok(results.finish())
    }
}
