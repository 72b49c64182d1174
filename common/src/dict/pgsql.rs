//! `pgsql:/etc/postfix/pgsql-virtual-mailbox-maps.cf`: a table answered by
//! PostgreSQL, as pgsql_table(5): `hosts` (connection URIs
//! `postgresql://...`, `inet:host:port`, `unix:/socket/directory`, plain
//! names; tried in turn, Unix sockets first), `user`, `password`, `dbname`,
//! `encoding`, `query` (or `select_function`, or the older
//! `table`/`select_field`/`where_field`/`additional_conditions`),
//! `result_format`, `domain`, `expansion_limit`, `retry_interval`; every
//! column of every row found, joined with commas.
//!
//! Through libpq (the library Debian's postfix-pgsql links), loaded at
//! first use: SCRAM-SHA-256, md5, TLS and Unix sockets as the server is
//! set up, and the key quoted by `PQescapeStringConn` for the
//! connection's settings. The query is sent without blocking and waited
//! for with a timeout, so a server that stops answering is a temporary
//! failure, not a hung daemon. A connection is kept between lookups; one
//! the server closed (a restart) fails and the next server of the list
//! (the same one again when only one is listed) is connected at once.

use super::db_config::{
    sql_lookup, CfFile, DbHost, HostPools, QueryError, SqlConnection, Templates,
};
use super::dynlib::{cstring, text, Library};
use super::{Dict, LookupError};
use std::ffi::{c_char, c_int, c_void, CString};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

type PgConn = c_void;
type PgResult = c_void;

const CONNECTION_OK: c_int = 0;
const PGRES_COMMAND_OK: c_int = 1;
const PGRES_TUPLES_OK: c_int = 2;

/// Seconds to wait for a connection, and for a query's answer.
const CONNECT_TIMEOUT: u64 = 10;
const QUERY_TIMEOUT: Duration = Duration::from_secs(10);

/// The libpq functions used.
struct Api {
    connectdb_params:
        unsafe extern "C" fn(*const *const c_char, *const *const c_char, c_int) -> *mut PgConn,
    status: unsafe extern "C" fn(*const PgConn) -> c_int,
    error_message: unsafe extern "C" fn(*const PgConn) -> *const c_char,
    finish: unsafe extern "C" fn(*mut PgConn),
    escape_string_conn:
        unsafe extern "C" fn(*mut PgConn, *mut c_char, *const c_char, usize, *mut c_int) -> usize,
    send_query: unsafe extern "C" fn(*mut PgConn, *const c_char) -> c_int,
    socket: unsafe extern "C" fn(*const PgConn) -> c_int,
    consume_input: unsafe extern "C" fn(*mut PgConn) -> c_int,
    is_busy: unsafe extern "C" fn(*mut PgConn) -> c_int,
    get_result: unsafe extern "C" fn(*mut PgConn) -> *mut PgResult,
    result_status: unsafe extern "C" fn(*const PgResult) -> c_int,
    result_error_message: unsafe extern "C" fn(*const PgResult) -> *const c_char,
    ntuples: unsafe extern "C" fn(*const PgResult) -> c_int,
    nfields: unsafe extern "C" fn(*const PgResult) -> c_int,
    getvalue: unsafe extern "C" fn(*const PgResult, c_int, c_int) -> *const c_char,
    getisnull: unsafe extern "C" fn(*const PgResult, c_int, c_int) -> c_int,
    clear: unsafe extern "C" fn(*mut PgResult),
}

fn api() -> Result<&'static Api, String> {
    static API: OnceLock<Result<Api, String>> = OnceLock::new();
    API.get_or_init(|| {
        let lib = Library::open(&["libpq.so.5", "libpq.so"], "libpq5")?;
        // SAFETY: the types are those of libpq-fe.h.
        unsafe {
            Ok(Api {
                connectdb_params: lib.function("PQconnectdbParams")?,
                status: lib.function("PQstatus")?,
                error_message: lib.function("PQerrorMessage")?,
                finish: lib.function("PQfinish")?,
                escape_string_conn: lib.function("PQescapeStringConn")?,
                send_query: lib.function("PQsendQuery")?,
                socket: lib.function("PQsocket")?,
                consume_input: lib.function("PQconsumeInput")?,
                is_busy: lib.function("PQisBusy")?,
                get_result: lib.function("PQgetResult")?,
                result_status: lib.function("PQresultStatus")?,
                result_error_message: lib.function("PQresultErrorMessage")?,
                ntuples: lib.function("PQntuples")?,
                nfields: lib.function("PQnfields")?,
                getvalue: lib.function("PQgetvalue")?,
                getisnull: lib.function("PQgetisnull")?,
                clear: lib.function("PQclear")?,
            })
        }
    })
    .as_ref()
    .map_err(Clone::clone)
}

/// The connection settings of the `.cf` file.
#[derive(Debug)]
struct Settings {
    user: String,
    password: String,
    dbname: String,
    encoding: String,
}

/// One open connection.
struct Conn {
    api: &'static Api,
    pg: *mut PgConn,
}

// SAFETY: a connection is used by one lookup at a time (HostPools hands
// each HostPool to one lookup).
unsafe impl Send for Conn {}

impl Drop for Conn {
    fn drop(&mut self) {
        // SAFETY: a connection from PQconnectdbParams, finished once.
        unsafe { (self.api.finish)(self.pg) };
    }
}

impl std::fmt::Debug for Conn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("pgsql connection")
    }
}

/// Frees a result when it goes out of scope.
struct ResultGuard<'a> {
    api: &'a Api,
    res: *mut PgResult,
}

impl Drop for ResultGuard<'_> {
    fn drop(&mut self) {
        // SAFETY: a result of PQgetResult, cleared once.
        unsafe { (self.api.clear)(self.res) };
    }
}

impl Conn {
    fn error(&self) -> String {
        // SAFETY: a valid connection.
        unsafe { text((self.api.error_message)(self.pg)) }
            .unwrap_or_default()
            .trim()
            .replace('\n', " ")
    }

    fn connect(api: &'static Api, host: &DbHost, s: &Settings) -> Result<Conn, String> {
        let timeout = CONNECT_TIMEOUT.to_string();
        let mut params: Vec<(&str, String)> = vec![
            ("connect_timeout", timeout),
            ("client_encoding", s.encoding.clone()),
        ];
        let mut expand = 0;
        match host {
            DbHost::Uri(uri) => {
                params.push(("dbname", uri.clone()));
                expand = 1;
            }
            DbHost::Unix(dir) => params.push(("host", dir.clone())),
            DbHost::Inet { host, port } => {
                params.push(("host", host.clone()));
                if let Some(p) = port {
                    params.push(("port", p.to_string()));
                }
            }
        }
        if expand == 0 {
            for (k, v) in [
                ("dbname", &s.dbname),
                ("user", &s.user),
                ("password", &s.password),
            ] {
                if !v.is_empty() {
                    params.push((k, v.clone()));
                }
            }
        }
        let keys: Vec<CString> = params
            .iter()
            .map(|(k, _)| cstring(k, k))
            .collect::<Result<_, _>>()?;
        let values: Vec<CString> = params
            .iter()
            .map(|(k, v)| cstring(k, v))
            .collect::<Result<_, _>>()?;
        let mut kp: Vec<*const c_char> = keys.iter().map(|c| c.as_ptr()).collect();
        let mut vp: Vec<*const c_char> = values.iter().map(|c| c.as_ptr()).collect();
        kp.push(std::ptr::null());
        vp.push(std::ptr::null());
        // SAFETY: NULL-terminated arrays of C strings.
        let pg = unsafe { (api.connectdb_params)(kp.as_ptr(), vp.as_ptr(), expand) };
        if pg.is_null() {
            return Err("PQconnectdbParams: out of memory".into());
        }
        let conn = Conn { api, pg };
        // SAFETY: a connection object.
        if unsafe { (api.status)(pg) } != CONNECTION_OK {
            return Err(conn.error());
        }
        Ok(conn)
    }

    /// PQescapeStringConn: the value as it goes inside '...'.
    fn escape(&self, value: &str, out: &mut String, failed: &mut Option<String>) {
        let mut buf = vec![0u8; 2 * value.len() + 1];
        let mut err: c_int = 0;
        // SAFETY: buf holds 2*len+1 bytes as the function requires.
        let n = unsafe {
            (self.api.escape_string_conn)(
                self.pg,
                buf.as_mut_ptr().cast(),
                value.as_ptr().cast(),
                value.len(),
                &mut err,
            )
        };
        if err != 0 {
            failed.get_or_insert(format!("cannot escape input string: {}", self.error()));
        } else if n < buf.len() {
            out.push_str(&String::from_utf8_lossy(&buf[..n]));
        }
    }

    /// Waits until the answer to the query sent is in, at most until
    /// `deadline`.
    fn wait(&mut self, deadline: Instant) -> Result<(), String> {
        let api = self.api;
        // SAFETY: a valid connection throughout.
        while unsafe { (api.is_busy)(self.pg) } != 0 {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(format!("no answer within {} s", QUERY_TIMEOUT.as_secs()));
            }
            let mut fds = [libc::pollfd {
                fd: unsafe { (api.socket)(self.pg) },
                events: libc::POLLIN,
                revents: 0,
            }];
            let ms = left.as_millis().min(i32::MAX as u128) as c_int;
            // SAFETY: one pollfd.
            let n = unsafe { libc::poll(fds.as_mut_ptr(), 1, ms) };
            if n < 0 && std::io::Error::last_os_error().kind() != std::io::ErrorKind::Interrupted {
                return Err(format!("poll: {}", std::io::Error::last_os_error()));
            }
            if n > 0 && unsafe { (api.consume_input)(self.pg) } == 0 {
                return Err(self.error());
            }
        }
        Ok(())
    }

    /// Runs `sql`; every column of every row of its result goes to
    /// `value`.
    fn query(
        &mut self,
        sql: &str,
        value: &mut dyn FnMut(Option<&str>) -> Result<(), String>,
    ) -> Result<(), QueryError> {
        let api = self.api;
        let c = cstring("query", sql).map_err(QueryError::Server)?;
        // SAFETY: a valid connection and string.
        if unsafe { (api.send_query)(self.pg, c.as_ptr()) } == 0 {
            return Err(QueryError::Server(format!(
                "query failed: {}",
                self.error()
            )));
        }
        let deadline = Instant::now() + QUERY_TIMEOUT;
        let mut problem: Option<String> = None;
        let mut outcome: Result<(), QueryError> = Ok(());
        loop {
            self.wait(deadline).map_err(QueryError::Server)?;
            // SAFETY: not busy: returns at once.
            let res = unsafe { (api.get_result)(self.pg) };
            if res.is_null() {
                break;
            }
            let res = ResultGuard { api, res };
            // SAFETY: a result.
            match unsafe { (api.result_status)(res.res) } {
                PGRES_TUPLES_OK if problem.is_none() && outcome.is_ok() => {
                    let (rows, cols) = unsafe { ((api.ntuples)(res.res), (api.nfields)(res.res)) };
                    'rows: for i in 0..rows {
                        for j in 0..cols {
                            // SAFETY: i, j within the result.
                            let v = unsafe {
                                if (api.getisnull)(res.res, i, j) != 0 {
                                    None
                                } else {
                                    text((api.getvalue)(res.res, i, j))
                                }
                            };
                            if let Err(e) = value(v.as_deref()) {
                                outcome = Err(QueryError::Result(e));
                                break 'rows;
                            }
                        }
                    }
                }
                PGRES_TUPLES_OK | PGRES_COMMAND_OK => {}
                _ => {
                    let msg =
                        unsafe { text((api.result_error_message)(res.res)) }.unwrap_or_default();
                    problem
                        .get_or_insert(format!("query failed: {}", msg.trim().replace('\n', " ")));
                }
            }
        }
        match problem {
            Some(p) => Err(QueryError::Server(p)),
            None => outcome,
        }
    }
}

/// A `pgsql:` table.
pub struct PgsqlDict {
    table: String,
    templates: Templates,
    settings: Settings,
    api: &'static Api,
    hosts: HostPools<Conn>,
}

impl std::fmt::Debug for PgsqlDict {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgsqlDict")
            .field("table", &self.table)
            .finish()
    }
}

impl PgsqlDict {
    /// Reads `cf_path` (the database is connected at the first lookup).
    pub fn open(cf_path: &str) -> Result<PgsqlDict, String> {
        let table = format!("pgsql:{cf_path}");
        let cf = CfFile::read(cf_path)?;
        let query = match (cf.get("query"), cf.get("select_function")) {
            (None, Some(f)) if !f.is_empty() => format!("SELECT {f}('%s')"),
            _ => cf.sql_query()?,
        };
        let templates = Templates::new(&table, &cf, query, cf.nonempty_or("result_format", "%s")?)?;
        let settings = Settings {
            user: cf.str_or("user", ""),
            password: cf.str_or("password", ""),
            dbname: cf.str_or("dbname", ""),
            encoding: cf.nonempty_or("encoding", "UTF8")?,
        };
        let retry = cf.int_or("retry_interval", 60, 1)? as u64;
        cf.int_or("idle_interval", 60, 1)?;
        let hosts = DbHost::parse_list(cf.get("hosts"), true)?;
        let api = api()?;
        Ok(PgsqlDict {
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
        self.query(sql, value)
    }
}

impl Dict for PgsqlDict {
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
