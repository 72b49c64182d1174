//! `mysql:/etc/postfix/mysql-virtual-mailbox-maps.cf`: a table answered by
//! MySQL or MariaDB, as mysql_table(5): `hosts` (tried in turn, Unix
//! sockets first), `user`, `password`, `dbname`, `charset`, `query` (or the
//! older `table`/`select_field`/`where_field`/`additional_conditions`),
//! `result_format`, `domain`, `expansion_limit`, `option_file`,
//! `option_group`, `tls_*`, `require_result_set`, `retry_interval`;
//! every column of every row found, joined with commas.
//!
//! Through MariaDB's client library (libmariadb, the library Debian's
//! postfix-mysql links), loaded at first use: it speaks every
//! authentication method and TLS of the servers in use, and quotes the
//! key for the connection's character set. A connection is kept between
//! lookups (in proxymap, up to `proxymap_connection_limit` of them while
//! lookups overlap: [`HostPools`]); one the server closed (a restart) fails its query and the
//! next server of the list (the same one again when only one is listed)
//! is connected at once. A server down, a query error or a timeout is a
//! [`LookupError`]: the caller defers.

use super::db_config::{
    sql_lookup, CfFile, DbHost, HostPools, QueryError, SqlConnection, Templates,
};
use super::dynlib::{cstring, text, Library};
use super::{Dict, LookupError};
use std::ffi::{c_char, c_int, c_uint, c_ulong, c_void, CString};
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

type Mysql = c_void;
type Res = c_void;

// enum mysql_option (mysql.h of MariaDB Connector/C).
const MYSQL_OPT_CONNECT_TIMEOUT: c_int = 0;
const MYSQL_READ_DEFAULT_FILE: c_int = 4;
const MYSQL_READ_DEFAULT_GROUP: c_int = 5;
const MYSQL_OPT_READ_TIMEOUT: c_int = 11;
const MYSQL_OPT_WRITE_TIMEOUT: c_int = 12;
const MYSQL_OPT_SSL_VERIFY_SERVER_CERT: c_int = 21;
const CLIENT_MULTI_RESULTS: c_ulong = 1 << 17;

/// Seconds to wait for a server to accept a connection, and for each
/// read or write of a query: a lookup waits at most about this long for
/// a server that stopped answering before it is a temporary failure.
const CONNECT_TIMEOUT: c_uint = 10;
const IO_TIMEOUT: c_uint = 10;

/// The libmariadb functions used.
struct Api {
    init: unsafe extern "C" fn(*mut Mysql) -> *mut Mysql,
    options: unsafe extern "C" fn(*mut Mysql, c_int, *const c_void) -> c_int,
    ssl_set: unsafe extern "C" fn(
        *mut Mysql,
        *const c_char,
        *const c_char,
        *const c_char,
        *const c_char,
        *const c_char,
    ) -> c_int,
    real_connect: unsafe extern "C" fn(
        *mut Mysql,
        *const c_char,
        *const c_char,
        *const c_char,
        *const c_char,
        c_uint,
        *const c_char,
        c_ulong,
    ) -> *mut Mysql,
    set_character_set: unsafe extern "C" fn(*mut Mysql, *const c_char) -> c_int,
    real_escape_string:
        unsafe extern "C" fn(*mut Mysql, *mut c_char, *const c_char, c_ulong) -> c_ulong,
    real_query: unsafe extern "C" fn(*mut Mysql, *const c_char, c_ulong) -> c_int,
    store_result: unsafe extern "C" fn(*mut Mysql) -> *mut Res,
    num_fields: unsafe extern "C" fn(*mut Res) -> c_uint,
    fetch_row: unsafe extern "C" fn(*mut Res) -> *mut *mut c_char,
    free_result: unsafe extern "C" fn(*mut Res),
    next_result: unsafe extern "C" fn(*mut Mysql) -> c_int,
    field_count: unsafe extern "C" fn(*mut Mysql) -> c_uint,
    error: unsafe extern "C" fn(*mut Mysql) -> *const c_char,
    close: unsafe extern "C" fn(*mut Mysql),
}

fn api() -> Result<&'static Api, String> {
    static API: OnceLock<Result<Api, String>> = OnceLock::new();
    API.get_or_init(|| {
        let lib = Library::open(
            &["libmariadb.so.3", "libmariadb.so", "libmysqlclient.so.21"],
            "libmariadb3",
        )?;
        // SAFETY: the types are those of mysql.h.
        unsafe {
            Ok(Api {
                init: lib.function("mysql_init")?,
                options: lib.function("mysql_options")?,
                ssl_set: lib.function("mysql_ssl_set")?,
                real_connect: lib.function("mysql_real_connect")?,
                set_character_set: lib.function("mysql_set_character_set")?,
                real_escape_string: lib.function("mysql_real_escape_string")?,
                real_query: lib.function("mysql_real_query")?,
                store_result: lib.function("mysql_store_result")?,
                num_fields: lib.function("mysql_num_fields")?,
                fetch_row: lib.function("mysql_fetch_row")?,
                free_result: lib.function("mysql_free_result")?,
                next_result: lib.function("mysql_next_result")?,
                field_count: lib.function("mysql_field_count")?,
                error: lib.function("mysql_error")?,
                close: lib.function("mysql_close")?,
            })
        }
    })
    .as_ref()
    .map_err(Clone::clone)
}

/// The connection settings of the `.cf` file.
#[derive(Debug)]
struct Settings {
    user: CString,
    password: CString,
    dbname: CString,
    charset: CString,
    option_file: Option<CString>,
    option_group: Option<CString>,
    /// key, cert, CA file, CA path, ciphers.
    tls: Option<[Option<CString>; 5]>,
    tls_verify_cert: Option<bool>,
    require_result_set: bool,
}

/// One open connection.
struct Conn {
    api: &'static Api,
    db: *mut Mysql,
    /// `require_result_set`: a statement without a result set is an error.
    require_result_set: bool,
}

// SAFETY: a connection is used by one lookup at a time (HostPools hands
// each HostPool to one lookup).
unsafe impl Send for Conn {}

impl Drop for Conn {
    fn drop(&mut self) {
        // SAFETY: a handle from mysql_init, closed once.
        unsafe { (self.api.close)(self.db) };
    }
}

impl std::fmt::Debug for Conn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("mysql connection")
    }
}

impl Conn {
    fn error(&self) -> String {
        // SAFETY: a valid handle.
        unsafe { text((self.api.error)(self.db)) }.unwrap_or_default()
    }

    fn connect(api: &'static Api, host: &DbHost, s: &Settings) -> Result<Conn, String> {
        // mysql_init initializes the library on first use, which is not
        // safe to do from two threads at once.
        static INIT: Mutex<()> = Mutex::new(());
        let db = {
            let _g = INIT.lock().unwrap_or_else(|p| p.into_inner());
            // SAFETY: allocates a new handle.
            unsafe { (api.init)(std::ptr::null_mut()) }
        };
        if db.is_null() {
            return Err("mysql_init: out of memory".into());
        }
        let conn = Conn {
            api,
            db,
            require_result_set: s.require_result_set,
        };
        let opt_str = |opt, v: &Option<CString>| {
            if let Some(v) = v {
                // SAFETY: a string option.
                unsafe { (api.options)(db, opt, v.as_ptr().cast()) };
            }
        };
        opt_str(MYSQL_READ_DEFAULT_FILE, &s.option_file);
        opt_str(MYSQL_READ_DEFAULT_GROUP, &s.option_group);
        for (opt, secs) in [
            (MYSQL_OPT_CONNECT_TIMEOUT, CONNECT_TIMEOUT),
            (MYSQL_OPT_READ_TIMEOUT, IO_TIMEOUT),
            (MYSQL_OPT_WRITE_TIMEOUT, IO_TIMEOUT),
        ] {
            // SAFETY: these options take an unsigned int.
            unsafe { (api.options)(db, opt, (&secs as *const c_uint).cast()) };
        }
        if let Some(tls) = &s.tls {
            let p = |v: &Option<CString>| v.as_ref().map_or(std::ptr::null(), |c| c.as_ptr());
            // SAFETY: strings or NULL.
            unsafe {
                (api.ssl_set)(
                    db,
                    p(&tls[0]),
                    p(&tls[1]),
                    p(&tls[2]),
                    p(&tls[3]),
                    p(&tls[4]),
                )
            };
        }
        if let Some(verify) = s.tls_verify_cert {
            let v: c_char = verify.into();
            // SAFETY: this option takes a my_bool.
            unsafe {
                (api.options)(
                    db,
                    MYSQL_OPT_SSL_VERIFY_SERVER_CERT,
                    (&v as *const c_char).cast(),
                )
            };
        }
        let (host_c, port, socket) = match host {
            DbHost::Unix(path) => (None, 0, Some(cstring("hosts", path)?)),
            DbHost::Inet { host, port } => (Some(cstring("hosts", host)?), port.unwrap_or(0), None),
            DbHost::Uri(u) => return Err(format!("{u}: not a MySQL server address")),
        };
        let p = |v: &Option<CString>| v.as_ref().map_or(std::ptr::null(), |c| c.as_ptr());
        // SAFETY: valid handle and strings (or NULL).
        let ok = unsafe {
            (api.real_connect)(
                db,
                p(&host_c),
                s.user.as_ptr(),
                s.password.as_ptr(),
                s.dbname.as_ptr(),
                port.into(),
                p(&socket),
                CLIENT_MULTI_RESULTS,
            )
        };
        if ok.is_null() {
            return Err(format!("connect: {}", conn.error()));
        }
        // SAFETY: a connected handle.
        if unsafe { (api.set_character_set)(db, s.charset.as_ptr()) } != 0 {
            return Err(format!(
                "mysql_set_character_set '{}' failed: {}",
                s.charset.to_string_lossy(),
                conn.error()
            ));
        }
        Ok(conn)
    }

    /// The server's escaping of `value` for this connection's charset.
    /// A failure (the server's SQL mode leaves no way to quote, (unsigned
    /// long)-1) goes to `failed`: the query is not sent with a value
    /// missing.
    fn escape(&self, value: &str, out: &mut String, failed: &mut Option<String>) {
        let mut buf = vec![0u8; 2 * value.len() + 1];
        // SAFETY: buf holds 2*len+1 bytes as the function requires.
        let n = unsafe {
            (self.api.real_escape_string)(
                self.db,
                buf.as_mut_ptr().cast(),
                value.as_ptr().cast(),
                value.len() as c_ulong,
            )
        };
        if n as usize <= buf.len() {
            out.push_str(&String::from_utf8_lossy(&buf[..n as usize]));
        } else {
            failed.get_or_insert(format!("cannot escape input string: {}", self.error()));
        }
    }

    /// Runs `sql`; every column of every row of its result set goes to
    /// `value`. Several result sets (a stored procedure) are an error.
    fn query(
        &mut self,
        sql: &str,
        require_result_set: bool,
        value: &mut dyn FnMut(Option<&str>) -> Result<(), String>,
    ) -> Result<(), QueryError> {
        let api = self.api;
        // SAFETY: a connected handle and a buffer of that length.
        if unsafe { (api.real_query)(self.db, sql.as_ptr().cast(), sql.len() as c_ulong) } != 0 {
            return Err(QueryError::Server(format!(
                "query failed: {}",
                self.error()
            )));
        }
        let mut first: Option<*mut Res> = None;
        let mut problem: Option<String> = None;
        loop {
            // SAFETY: after a successful query.
            let res = unsafe { (api.store_result)(self.db) };
            if !res.is_null() {
                if first.is_none() {
                    first = Some(res);
                } else {
                    problem.get_or_insert(
                        "multiple result sets returning data are not supported".into(),
                    );
                    // SAFETY: a result set, freed once.
                    unsafe { (api.free_result)(res) };
                }
            } else if unsafe { (api.field_count)(self.db) } != 0 {
                problem.get_or_insert(format!("mysql_store_result: {}", self.error()));
            }
            // SAFETY: a connected handle.
            match unsafe { (api.next_result)(self.db) } {
                0 => continue,
                -1 => break,
                _ => {
                    problem.get_or_insert(format!("mysql_next_result: {}", self.error()));
                    break;
                }
            }
        }
        if first.is_none() && require_result_set {
            problem.get_or_insert("query returned no result set (require_result_set = yes)".into());
        }
        let mut result = match problem {
            Some(p) => Err(QueryError::Server(format!("query failed: {p}"))),
            None => Ok(()),
        };
        if let Some(res) = first {
            if result.is_ok() {
                // SAFETY: a stored result set; rows are arrays of
                // num_fields NUL-terminated strings or NULLs.
                let fields = unsafe { (api.num_fields)(res) } as usize;
                'rows: loop {
                    let row = unsafe { (api.fetch_row)(res) };
                    if row.is_null() {
                        break;
                    }
                    for j in 0..fields {
                        let v = unsafe { text(*row.add(j)) };
                        if let Err(e) = value(v.as_deref()) {
                            result = Err(QueryError::Result(e));
                            break 'rows;
                        }
                    }
                }
            }
            // SAFETY: freed once.
            unsafe { (api.free_result)(res) };
        }
        result
    }
}

/// A `mysql:` table.
pub struct MysqlDict {
    table: String,
    templates: Templates,
    settings: Settings,
    api: &'static Api,
    hosts: HostPools<Conn>,
}

impl std::fmt::Debug for MysqlDict {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MysqlDict")
            .field("table", &self.table)
            .finish()
    }
}

impl MysqlDict {
    /// Reads `cf_path` (the database is connected at the first lookup).
    pub fn open(cf_path: &str) -> Result<MysqlDict, String> {
        let table = format!("mysql:{cf_path}");
        let cf = CfFile::read(cf_path)?;
        let templates = Templates::new(
            &table,
            &cf,
            cf.sql_query()?,
            cf.nonempty_or("result_format", "%s")?,
        )?;
        let s = |name: &str, default: &str| cstring(name, &cf.str_or(name, default));
        let opt = |name: &str| -> Result<Option<CString>, String> {
            cf.get(name)
                .filter(|v| !v.is_empty())
                .map(|v| cstring(name, v))
                .transpose()
        };
        let tls = [
            opt("tls_key_file")?,
            opt("tls_cert_file")?,
            opt("tls_CAfile")?,
            opt("tls_CApath")?,
            opt("tls_ciphers")?,
        ];
        let settings = Settings {
            user: s("user", "")?,
            password: s("password", "")?,
            dbname: cstring("dbname", &cf.nonempty_or("dbname", "")?)?,
            charset: cstring("charset", &cf.nonempty_or("charset", "utf8mb4")?)?,
            option_file: opt("option_file")?,
            option_group: Some(s("option_group", "client")?).filter(|g| !g.as_bytes().is_empty()),
            tls: tls.iter().any(Option::is_some).then_some(tls),
            tls_verify_cert: match cf.get("tls_verify_cert") {
                Some(_) => Some(cf.bool_or("tls_verify_cert", false)?),
                None => None,
            },
            require_result_set: cf.bool_or("require_result_set", true)?,
        };
        let retry = cf.int_or("retry_interval", 60, 1)? as u64;
        cf.int_or("idle_interval", 60, 1)?;
        let hosts = DbHost::parse_list(cf.get("hosts"), false)?;
        let api = api()?;
        Ok(MysqlDict {
            table,
            templates,
            settings,
            api,
            hosts: HostPools::new(hosts, Duration::from_secs(retry)),
        })
    }
}

impl SqlConnection for Conn {
    fn quote(&self, value: &str, out: &mut String, failed: &mut Option<String>) {
        self.escape(value, out, failed)
    }
    fn run_query(
        &mut self,
        sql: &str,
        value: &mut dyn FnMut(Option<&str>) -> Result<(), String>,
    ) -> Result<(), QueryError> {
        self.query(sql, self.require_result_set, value)
    }
}

impl Dict for MysqlDict {
    fn lookup(&self, key: &str) -> Result<Option<String>, LookupError> {
        sql_lookup(
            &self.table,
            &self.templates,
            &self.hosts,
            &mut |host| Conn::connect(self.api, host, &self.settings),
            key,
        )
    }
}
