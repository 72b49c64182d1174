//! `ldap:/etc/postfix/ldap-aliases.cf`: a table answered by an LDAP
//! directory, as ldap_table(5): `server_host` (URIs or `host[:port]`,
//! tried in turn), `server_port`, `search_base` and `query_filter` with
//! the `%s %u %d %[1-9]` expansions (the key escaped for a filter, RFC
//! 4515, or a DN, RFC 4514), `result_attribute`, `result_format`,
//! `special_result_attribute` (DNs or LDAP URLs searched in turn, up to
//! `recursion_limit`), `terminal_result_attribute`,
//! `leaf_result_attribute`, `scope`, `bind` (`no`, `yes`/simple with
//! `bind_dn` and `bind_pw`), `version`, `start_tls` and `tls_*`, `domain`,
//! `size_limit`, `expansion_limit`, `timeout`, `dereference`,
//! `chase_referrals`. Several values are joined with commas.
//!
//! Through OpenLDAP's libldap (the library Debian's postfix-ldap links),
//! loaded at first use. The connection is kept; a server that went away
//! is connected again once within the lookup. A server down, a search
//! error or a timeout is a [`LookupError`]: the caller defers.

use super::db_config::{CfFile, Templates};
use super::dynlib::{cstring, text, Library};
use super::{Dict, LookupError};
use std::ffi::{c_char, c_int, c_ulong, c_void, CString};
use std::sync::{Mutex, OnceLock};

type Ldap = c_void;
type Message = c_void;
type Ber = c_void;

/// LDAPURLDesc of ldap.h.
#[repr(C)]
struct UrlDesc {
    next: *mut UrlDesc,
    scheme: *mut c_char,
    host: *mut c_char,
    port: c_int,
    dn: *mut c_char,
    attrs: *mut *mut c_char,
    scope: c_int,
    filter: *mut c_char,
    exts: *mut *mut c_char,
    crit_exts: c_int,
}

#[repr(C)]
struct Berval {
    len: c_ulong,
    val: *mut c_char,
}

const LDAP_SUCCESS: c_int = 0;
const LDAP_SIZELIMIT_EXCEEDED: c_int = 0x04;
const LDAP_NO_SUCH_OBJECT: c_int = 0x20;
const LDAP_SERVER_DOWN: c_int = -1;
const LDAP_TIMEOUT: c_int = -5;
const LDAP_CONNECT_ERROR: c_int = -11;
const LDAP_OPT_DEREF: c_int = 0x0002;
const LDAP_OPT_SIZELIMIT: c_int = 0x0003;
const LDAP_OPT_REFERRALS: c_int = 0x0008;
const LDAP_OPT_PROTOCOL_VERSION: c_int = 0x0011;
const LDAP_OPT_TIMEOUT: c_int = 0x5002;
const LDAP_OPT_NETWORK_TIMEOUT: c_int = 0x5005;
const LDAP_OPT_X_TLS_CACERTFILE: c_int = 0x6002;
const LDAP_OPT_X_TLS_CACERTDIR: c_int = 0x6003;
const LDAP_OPT_X_TLS_CERTFILE: c_int = 0x6004;
const LDAP_OPT_X_TLS_KEYFILE: c_int = 0x6005;
const LDAP_OPT_X_TLS_REQUIRE_CERT: c_int = 0x6006;
const LDAP_OPT_X_TLS_CIPHER_SUITE: c_int = 0x6008;
const LDAP_OPT_X_TLS_NEWCTX: c_int = 0x600f;
const LDAP_OPT_X_TLS_NEVER: c_int = 0;
const LDAP_OPT_X_TLS_DEMAND: c_int = 2;

/// The libldap functions used.
struct Api {
    initialize: unsafe extern "C" fn(*mut *mut Ldap, *const c_char) -> c_int,
    set_option: unsafe extern "C" fn(*mut Ldap, c_int, *const c_void) -> c_int,
    start_tls_s: unsafe extern "C" fn(*mut Ldap, *mut c_void, *mut c_void) -> c_int,
    sasl_bind_s: unsafe extern "C" fn(
        *mut Ldap,
        *const c_char,
        *const c_char,
        *const Berval,
        *mut c_void,
        *mut c_void,
        *mut *mut Berval,
    ) -> c_int,
    search_ext_s: unsafe extern "C" fn(
        *mut Ldap,
        *const c_char,
        c_int,
        *const c_char,
        *const *const c_char,
        c_int,
        *mut c_void,
        *mut c_void,
        *const libc::timeval,
        c_int,
        *mut *mut Message,
    ) -> c_int,
    first_entry: unsafe extern "C" fn(*mut Ldap, *mut Message) -> *mut Message,
    next_entry: unsafe extern "C" fn(*mut Ldap, *mut Message) -> *mut Message,
    first_attribute: unsafe extern "C" fn(*mut Ldap, *mut Message, *mut *mut Ber) -> *mut c_char,
    next_attribute: unsafe extern "C" fn(*mut Ldap, *mut Message, *mut Ber) -> *mut c_char,
    get_values_len:
        unsafe extern "C" fn(*mut Ldap, *mut Message, *const c_char) -> *mut *mut Berval,
    value_free_len: unsafe extern "C" fn(*mut *mut Berval),
    memfree: unsafe extern "C" fn(*mut c_void),
    ber_free: unsafe extern "C" fn(*mut Ber, c_int),
    msgfree: unsafe extern "C" fn(*mut Message) -> c_int,
    unbind_ext_s: unsafe extern "C" fn(*mut Ldap, *mut c_void, *mut c_void) -> c_int,
    err2string: unsafe extern "C" fn(c_int) -> *const c_char,
    is_ldap_url: unsafe extern "C" fn(*const c_char) -> c_int,
    url_parse: unsafe extern "C" fn(*const c_char, *mut *mut UrlDesc) -> c_int,
    free_urldesc: unsafe extern "C" fn(*mut UrlDesc),
}

fn api() -> Result<&'static Api, String> {
    static API: OnceLock<Result<Api, String>> = OnceLock::new();
    API.get_or_init(|| {
        let lib = Library::open(
            &["libldap-2.5.so.0", "libldap.so.2", "libldap.so"],
            "libldap-2.5-0",
        )?;
        // SAFETY: the types are those of ldap.h and lber.h.
        unsafe {
            Ok(Api {
                initialize: lib.function("ldap_initialize")?,
                set_option: lib.function("ldap_set_option")?,
                start_tls_s: lib.function("ldap_start_tls_s")?,
                sasl_bind_s: lib.function("ldap_sasl_bind_s")?,
                search_ext_s: lib.function("ldap_search_ext_s")?,
                first_entry: lib.function("ldap_first_entry")?,
                next_entry: lib.function("ldap_next_entry")?,
                first_attribute: lib.function("ldap_first_attribute")?,
                next_attribute: lib.function("ldap_next_attribute")?,
                get_values_len: lib.function("ldap_get_values_len")?,
                value_free_len: lib.function("ldap_value_free_len")?,
                memfree: lib.function("ldap_memfree")?,
                ber_free: lib.function("ber_free")?,
                msgfree: lib.function("ldap_msgfree")?,
                unbind_ext_s: lib.function("ldap_unbind_ext_s")?,
                err2string: lib.function("ldap_err2string")?,
                is_ldap_url: lib.function("ldap_is_ldap_url")?,
                url_parse: lib.function("ldap_url_parse")?,
                free_urldesc: lib.function("ldap_free_urldesc")?,
            })
        }
    })
    .as_ref()
    .map_err(Clone::clone)
}

fn err_text(api: &Api, rc: c_int) -> String {
    // SAFETY: a static string for any code.
    unsafe { text((api.err2string)(rc)) }.unwrap_or_else(|| format!("error {rc}"))
}

/// The settings of the `.cf` file.
#[derive(Debug)]
struct Settings {
    /// Space-separated URIs for ldap_initialize.
    uris: CString,
    version: c_int,
    search_base: String,
    /// Whether search_base uses the key (then "no such object" is "not
    /// found").
    dynamic_base: bool,
    scope: c_int,
    /// bind = yes: simple bind with these (empty: anonymous).
    bind: Option<(CString, CString)>,
    timeout: u64,
    size_limit: c_int,
    dereference: c_int,
    chase_referrals: bool,
    start_tls: bool,
    tls: Vec<(c_int, CString)>,
    tls_require_cert: bool,
    recursion_limit: usize,
    /// Requested attributes: terminal, leaf, ordinary, then special.
    attributes: Vec<CString>,
    num_terminal: usize,
    num_leaf: usize,
    /// terminal + leaf + ordinary.
    num_attributes: usize,
}

fn split_attributes(cf: &CfFile, name: &str, default: &str) -> Vec<String> {
    cf.str_or(name, default)
        .split([',', ' ', '\t'])
        .filter(|a| !a.is_empty())
        .map(str::to_string)
        .collect()
}

/// One open connection.
struct Conn {
    api: &'static Api,
    ld: *mut Ldap,
}

// SAFETY: used by one thread at a time (behind a Mutex).
unsafe impl Send for Conn {}

impl Drop for Conn {
    fn drop(&mut self) {
        // SAFETY: a handle from ldap_initialize, unbound once.
        unsafe { (self.api.unbind_ext_s)(self.ld, std::ptr::null_mut(), std::ptr::null_mut()) };
    }
}

/// A search result, freed when dropped.
struct SearchResult<'a> {
    api: &'a Api,
    msg: *mut Message,
}

impl Drop for SearchResult<'_> {
    fn drop(&mut self) {
        if !self.msg.is_null() {
            // SAFETY: freed once.
            unsafe { (self.api.msgfree)(self.msg) };
        }
    }
}

impl Conn {
    fn connect(api: &'static Api, s: &Settings) -> Result<Conn, String> {
        let mut ld: *mut Ldap = std::ptr::null_mut();
        // SAFETY: a C string of URIs; ld receives the handle.
        let rc = unsafe { (api.initialize)(&mut ld, s.uris.as_ptr()) };
        if rc != LDAP_SUCCESS || ld.is_null() {
            return Err(format!(
                "ldap_initialize {}: {}",
                s.uris.to_string_lossy(),
                err_text(api, rc)
            ));
        }
        let conn = Conn { api, ld };
        let tv = libc::timeval {
            tv_sec: s.timeout as libc::time_t,
            tv_usec: 0,
        };
        let set_int = |opt: c_int, v: c_int| {
            // SAFETY: an int option.
            unsafe { (api.set_option)(ld, opt, (&v as *const c_int).cast()) }
        };
        set_int(LDAP_OPT_PROTOCOL_VERSION, s.version);
        set_int(LDAP_OPT_DEREF, s.dereference);
        set_int(LDAP_OPT_SIZELIMIT, s.size_limit);
        // SAFETY: timeval options; LDAP_OPT_REFERRALS takes ON/OFF as a
        // pointer value.
        unsafe {
            (api.set_option)(
                ld,
                LDAP_OPT_NETWORK_TIMEOUT,
                (&tv as *const libc::timeval).cast(),
            );
            (api.set_option)(ld, LDAP_OPT_TIMEOUT, (&tv as *const libc::timeval).cast());
            // LDAP_OPT_ON is any pointer but NULL (LDAP_OPT_OFF).
            static ON: c_int = 1;
            let on: *const c_void = if s.chase_referrals {
                (&ON as *const c_int).cast()
            } else {
                std::ptr::null()
            };
            (api.set_option)(ld, LDAP_OPT_REFERRALS, on);
        }
        if s.start_tls || !s.tls.is_empty() {
            for (opt, v) in &s.tls {
                // SAFETY: string options.
                unsafe { (api.set_option)(ld, *opt, v.as_ptr().cast()) };
            }
            set_int(
                LDAP_OPT_X_TLS_REQUIRE_CERT,
                if s.tls_require_cert {
                    LDAP_OPT_X_TLS_DEMAND
                } else {
                    LDAP_OPT_X_TLS_NEVER
                },
            );
            set_int(LDAP_OPT_X_TLS_NEWCTX, 0);
        }
        if s.start_tls {
            // SAFETY: a handle; no controls.
            let rc = unsafe { (api.start_tls_s)(ld, std::ptr::null_mut(), std::ptr::null_mut()) };
            if rc != LDAP_SUCCESS {
                return Err(format!("start_tls: {}", err_text(api, rc)));
            }
        }
        if let Some((dn, pw)) = &s.bind {
            let cred = Berval {
                len: pw.as_bytes().len() as c_ulong,
                val: pw.as_ptr() as *mut c_char,
            };
            // SAFETY: simple bind (mechanism NULL) with a berval password.
            let rc = unsafe {
                (api.sasl_bind_s)(
                    ld,
                    dn.as_ptr(),
                    std::ptr::null(),
                    &cred,
                    std::ptr::null_mut(),
                    std::ptr::null_mut(),
                    std::ptr::null_mut(),
                )
            };
            if rc != LDAP_SUCCESS {
                return Err(format!(
                    "bind as '{}': {}",
                    dn.to_string_lossy(),
                    err_text(api, rc)
                ));
            }
        }
        Ok(conn)
    }

    fn search(
        &self,
        base: &str,
        scope: c_int,
        filter: &str,
        attrs: &[CString],
        s: &Settings,
    ) -> Result<SearchResult<'static>, c_int> {
        let base = CString::new(base).map_err(|_| LDAP_NO_SUCH_OBJECT)?;
        let filter = CString::new(filter).map_err(|_| LDAP_NO_SUCH_OBJECT)?;
        let mut ptrs: Vec<*const c_char> = attrs.iter().map(|a| a.as_ptr()).collect();
        ptrs.push(std::ptr::null());
        let tv = libc::timeval {
            tv_sec: s.timeout as libc::time_t,
            tv_usec: 0,
        };
        let mut msg: *mut Message = std::ptr::null_mut();
        // SAFETY: valid strings and a NULL-terminated attribute array.
        let rc = unsafe {
            (self.api.search_ext_s)(
                self.ld,
                base.as_ptr(),
                scope,
                filter.as_ptr(),
                ptrs.as_ptr(),
                0,
                std::ptr::null_mut(),
                std::ptr::null_mut(),
                if s.timeout > 0 { &tv } else { std::ptr::null() },
                s.size_limit,
                &mut msg,
            )
        };
        let result = SearchResult { api: self.api, msg };
        if rc == LDAP_SUCCESS {
            Ok(result)
        } else {
            Err(rc)
        }
    }
}

/// An `ldap:` table.
pub struct LdapDict {
    table: String,
    templates: Templates,
    settings: Settings,
    api: &'static Api,
    conn: Mutex<Option<Conn>>,
}

impl std::fmt::Debug for LdapDict {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LdapDict")
            .field("table", &self.table)
            .finish()
    }
}

/// RFC 4515: a value inside a search filter.
fn quote_filter(value: &str, out: &mut String) {
    for c in value.chars() {
        match c {
            '*' | '(' | ')' | '\\' | '\0' => out.push_str(&format!("\\{:02x}", c as u32)),
            c => out.push(c),
        }
    }
}

/// RFC 4514: a value inside a DN (`search_base` with `%s`).
fn quote_dn(value: &str, out: &mut String) {
    let last = value.chars().count().saturating_sub(1);
    for (i, c) in value.chars().enumerate() {
        let special = matches!(c, ',' | '+' | '"' | '\\' | '<' | '>' | ';' | '=')
            || (i == 0 && (c == '#' || c == ' '))
            || (i == last && c == ' ');
        if special {
            out.push('\\');
        }
        out.push(c);
    }
}

impl LdapDict {
    /// Reads `cf_path` (the directory is connected at the first lookup).
    pub fn open(cf_path: &str) -> Result<LdapDict, String> {
        let table = format!("ldap:{cf_path}");
        let cf = CfFile::read(cf_path)?;
        let port = cf.int_or("server_port", 389, 0)?;
        let mut uris = Vec::new();
        let mut version = cf.int_or("version", 2, 2)? as c_int;
        if version != 2 && version != 3 {
            version = 2;
        }
        for h in cf
            .str_or("server_host", "localhost")
            .split([',', ' ', '\t'])
            .filter(|h| !h.is_empty())
        {
            let lower = h.to_ascii_lowercase();
            if lower.starts_with("ldap://")
                || lower.starts_with("ldaps://")
                || lower.starts_with("ldapi://")
            {
                if !lower.starts_with("ldap://") {
                    version = 3;
                }
                uris.push(h.to_string());
            } else if h.contains(':') {
                uris.push(format!("ldap://{h}"));
            } else {
                uris.push(format!("ldap://{h}:{port}"));
            }
        }
        let scope = match cf.str_or("scope", "sub").as_str() {
            "one" => 1,
            "base" => 0,
            "sub" => 2,
            other => {
                return Err(format!(
                    "{cf_path}: scope = {other}: expected sub, one or base"
                ))
            }
        };
        let search_base = cf.str_or("search_base", "");
        let query = cf.str_or("query_filter", "(mailacceptinggeneralid=%s)");
        let result_format = match cf.get("result_format") {
            Some(_) => cf.nonempty_or("result_format", "%s")?,
            None => cf.nonempty_or("result_filter", "%s")?,
        };
        let mut templates = Templates::new(&table, &cf, query, result_format)?;
        templates.add_key_template(&search_base)?;
        let dynamic_base = search_base.contains('%') && search_base.replace("%%", "").contains('%');
        let bind = match cf.str_or("bind", "yes").to_ascii_lowercase().as_str() {
            "no" | "false" | "0" => None,
            "yes" | "true" | "1" | "simple" => Some((
                cstring("bind_dn", &cf.str_or("bind_dn", ""))?,
                cstring("bind_pw", &cf.str_or("bind_pw", ""))?,
            )),
            "sasl" => {
                return Err(format!(
                    "{cf_path}: bind = sasl is not supported; use simple"
                ))
            }
            other => return Err(format!("{cf_path}: bind = {other}: expected no or simple")),
        };
        let mut tls = Vec::new();
        for (name, opt) in [
            ("tls_ca_cert_file", LDAP_OPT_X_TLS_CACERTFILE),
            ("tls_ca_cert_dir", LDAP_OPT_X_TLS_CACERTDIR),
            ("tls_cert", LDAP_OPT_X_TLS_CERTFILE),
            ("tls_key", LDAP_OPT_X_TLS_KEYFILE),
            ("tls_cipher_suite", LDAP_OPT_X_TLS_CIPHER_SUITE),
        ] {
            if let Some(v) = cf.get(name).filter(|v| !v.is_empty()) {
                tls.push((opt, cstring(name, v)?));
            }
        }
        let terminal = split_attributes(&cf, "terminal_result_attribute", "");
        let leaf = split_attributes(&cf, "leaf_result_attribute", "");
        let ordinary = split_attributes(&cf, "result_attribute", "maildrop");
        let special = split_attributes(&cf, "special_result_attribute", "");
        let mut attributes = Vec::new();
        for a in terminal
            .iter()
            .chain(&leaf)
            .chain(&ordinary)
            .chain(&special)
        {
            attributes.push(cstring("result_attribute", a)?);
        }
        let dereference = cf.int_or("dereference", 0, 0)?;
        let settings = Settings {
            uris: cstring("server_host", &uris.join(" "))?,
            version,
            search_base,
            dynamic_base,
            scope,
            bind,
            timeout: cf.int_or("timeout", 10, 0)? as u64,
            size_limit: cf.int_or("size_limit", templates.expansion_limit as i64, 0)? as c_int,
            dereference: if dereference > 3 {
                0
            } else {
                dereference as c_int
            },
            chase_referrals: cf.bool_or("chase_referrals", false)?,
            start_tls: cf.bool_or("start_tls", false)?,
            tls,
            tls_require_cert: cf.bool_or("tls_require_cert", false)?,
            recursion_limit: cf.int_or("recursion_limit", 1000, 1)? as usize,
            num_terminal: terminal.len(),
            num_leaf: leaf.len(),
            num_attributes: terminal.len() + leaf.len() + ordinary.len(),
            attributes,
        };
        let api = api()?;
        Ok(LdapDict {
            table,
            templates,
            settings,
            api,
            conn: Mutex::new(None),
        })
    }

    /// The values of the entries of `res` (dict_ldap_get_values),
    /// searching the DNs and URLs of special attributes in turn.
    fn collect(
        &self,
        conn: &Conn,
        res: &SearchResult,
        results: &mut super::db_config::Results,
        depth: usize,
        entries: &mut usize,
    ) -> Result<(), String> {
        let api = self.api;
        let s = &self.settings;
        let has_values = |entry: *mut Message, attr: &CString| -> bool {
            // SAFETY: a valid entry and attribute name.
            let vals = unsafe { (api.get_values_len)(conn.ld, entry, attr.as_ptr()) };
            if vals.is_null() {
                return false;
            }
            // SAFETY: a NULL-terminated array, freed once.
            let any = unsafe { !(*vals).is_null() };
            unsafe { (api.value_free_len)(vals) };
            any
        };
        // SAFETY: res holds a search result.
        let mut entry = unsafe { (api.first_entry)(conn.ld, res.msg) };
        while !entry.is_null() {
            *entries += 1;
            if s.size_limit > 0 && *entries > s.size_limit as usize {
                return Err(format!("query size limit ({}) exceeded", s.size_limit));
            }
            let is_terminal = s.attributes[..s.num_terminal]
                .iter()
                .any(|a| has_values(entry, a));
            let is_leaf = is_terminal
                || s.num_leaf == 0
                || !s.attributes[s.num_attributes..]
                    .iter()
                    .any(|a| has_values(entry, a));
            let mut ber: *mut Ber = std::ptr::null_mut();
            // SAFETY: iterating the entry's attributes; each name is freed.
            let mut attr = unsafe { (api.first_attribute)(conn.ld, entry, &mut ber) };
            let mut outcome = Ok(());
            while !attr.is_null() {
                let name = unsafe { text(attr) }.unwrap_or_default();
                let index = s.attributes.iter().position(|a| {
                    let a = a.to_string_lossy();
                    name.eq_ignore_ascii_case(&a)
                        || name.len() > a.len()
                            && name[..a.len()].eq_ignore_ascii_case(&a)
                            && name.as_bytes()[a.len()] == b';'
                });
                let values = self.values(conn, entry, attr);
                unsafe { (api.memfree)(attr.cast()) };
                if outcome.is_ok() {
                    if let Some(i) = index {
                        outcome = self.use_attribute(
                            conn,
                            i,
                            is_terminal,
                            is_leaf,
                            &values,
                            results,
                            depth,
                            entries,
                        );
                    }
                }
                // SAFETY: continues the iteration started above.
                attr = unsafe { (api.next_attribute)(conn.ld, entry, ber) };
            }
            if !ber.is_null() {
                unsafe { (api.ber_free)(ber, 0) };
            }
            outcome?;
            // SAFETY: the next entry of the same result.
            entry = unsafe { (api.next_entry)(conn.ld, entry) };
        }
        Ok(())
    }

    /// The values of one attribute of an entry.
    fn values(&self, conn: &Conn, entry: *mut Message, attr: *mut c_char) -> Vec<String> {
        let api = self.api;
        // SAFETY: a valid entry and attribute; the array is freed once.
        let vals = unsafe { (api.get_values_len)(conn.ld, entry, attr) };
        let mut out = Vec::new();
        if vals.is_null() {
            return out;
        }
        let mut i = 0;
        loop {
            let v = unsafe { *vals.add(i) };
            if v.is_null() {
                break;
            }
            let bytes =
                unsafe { std::slice::from_raw_parts((*v).val as *const u8, (*v).len as usize) };
            out.push(String::from_utf8_lossy(bytes).into_owned());
            i += 1;
        }
        unsafe { (api.value_free_len)(vals) };
        out
    }

    #[allow(clippy::too_many_arguments)]
    fn use_attribute(
        &self,
        conn: &Conn,
        i: usize,
        is_terminal: bool,
        is_leaf: bool,
        values: &[String],
        results: &mut super::db_config::Results,
        depth: usize,
        entries: &mut usize,
    ) -> Result<(), String> {
        let s = &self.settings;
        if i < s.num_attributes || is_terminal {
            let skip = (is_terminal && i >= s.num_terminal)
                || (!is_leaf && i < s.num_terminal + s.num_leaf);
            if !skip {
                for v in values {
                    results.add(Some(v))?;
                }
            }
            return Ok(());
        }
        if depth >= s.recursion_limit {
            crate::warning!("{}: recursion limit exceeded", self.table);
            return Ok(());
        }
        for dn in values {
            let Ok(c) = CString::new(dn.as_str()) else {
                continue;
            };
            // SAFETY: a C string.
            if unsafe { (self.api.is_ldap_url)(c.as_ptr()) } != 0 {
                self.follow_url(conn, &c, results, depth, entries)?;
                continue;
            }
            match conn.search(dn, 0, "objectclass=*", &s.attributes, s) {
                Ok(res) => self.collect(conn, &res, results, depth + 1, entries)?,
                Err(LDAP_NO_SUCH_OBJECT) => {
                    crate::warning!("{}: DN {dn} not found, skipping", self.table);
                }
                Err(rc) => return Err(format!("search {dn}: {}", err_text(self.api, rc))),
            }
        }
        Ok(())
    }

    /// A special attribute's LDAP URL (a dynamic group's `memberURL`): its
    /// search, on this connection, for the result attributes (those of
    /// the URL's list that are result attributes, when it has one).
    fn follow_url(
        &self,
        conn: &Conn,
        url: &CString,
        results: &mut super::db_config::Results,
        depth: usize,
        entries: &mut usize,
    ) -> Result<(), String> {
        let api = self.api;
        let s = &self.settings;
        let shown = url.to_string_lossy();
        let mut desc: *mut UrlDesc = std::ptr::null_mut();
        // SAFETY: a C string; desc receives the parsed URL, freed below.
        let rc = unsafe { (api.url_parse)(url.as_ptr(), &mut desc) };
        if rc != 0 || desc.is_null() {
            return Err(format!("malformed URL {shown}: error {rc}"));
        }
        // SAFETY: a parsed URL: NULL or NUL-terminated strings, a
        // NULL-terminated attribute array; freed once.
        let (base, scope, filter, url_attrs) = unsafe {
            let d = &*desc;
            let mut attrs = Vec::new();
            if !d.attrs.is_null() {
                let mut i = 0;
                while !(*d.attrs.add(i)).is_null() {
                    attrs.push(text(*d.attrs.add(i)).unwrap_or_default());
                    i += 1;
                }
            }
            let r = (
                text(d.dn).unwrap_or_default(),
                d.scope,
                text(d.filter).unwrap_or_else(|| "(objectclass=*)".into()),
                attrs,
            );
            (api.free_urldesc)(desc);
            r
        };
        let attrs: Vec<CString> = if url_attrs.is_empty() {
            s.attributes.clone()
        } else {
            s.attributes
                .iter()
                .filter(|a| {
                    let a = a.to_string_lossy();
                    url_attrs.iter().any(|u| u.eq_ignore_ascii_case(&a))
                })
                .cloned()
                .collect()
        };
        if attrs.is_empty() {
            return Ok(());
        }
        match conn.search(&base, scope, &filter, &attrs, s) {
            Ok(res) => self.collect(conn, &res, results, depth + 1, entries),
            Err(LDAP_NO_SUCH_OBJECT) => {
                crate::warning!("{}: DN {base} not found, skipping", self.table);
                Ok(())
            }
            Err(rc) => Err(format!("search {shown}: {}", err_text(api, rc))),
        }
    }

    /// One attempt on a connection; Err((rc, why)): rc tells whether the
    /// server went away.
    fn lookup_on(
        &self,
        conn: &Conn,
        key: &str,
        base: &str,
        filter: &str,
    ) -> Result<Option<String>, (c_int, String)> {
        let s = &self.settings;
        let res = match conn.search(base, s.scope, filter, &s.attributes, s) {
            Ok(r) => r,
            Err(LDAP_NO_SUCH_OBJECT) if s.dynamic_base => return Ok(None),
            Err(rc) => {
                return Err((
                    rc,
                    format!("search {base} {filter}: {}", err_text(self.api, rc)),
                ))
            }
        };
        let mut results = self.templates.results(key);
        let mut entries = 0;
        self.collect(conn, &res, &mut results, 0, &mut entries)
            .map_err(|e| (LDAP_SIZELIMIT_EXCEEDED, e))?;
        Ok(results.finish())
    }
}

impl Dict for LdapDict {
    fn lookup(&self, key: &str) -> Result<Option<String>, LookupError> {
        let key = key.to_lowercase();
        if !self.templates.domain_allows(&key) {
            return Ok(None);
        }
        let Some(base) =
            self.templates
                .expand_key_template(&self.settings.search_base, &key, &mut quote_dn)
        else {
            return Ok(None);
        };
        let Some(filter) = self.templates.expand_query(&key, &mut quote_filter) else {
            return Ok(None);
        };
        let fail = |e: String| LookupError::new(&self.table, e);
        let mut conn = self.conn.lock().unwrap_or_else(|p| p.into_inner());
        // A kept connection the server closed is opened again once.
        for attempt in 0..2 {
            if conn.is_none() {
                *conn = Some(Conn::connect(self.api, &self.settings).map_err(fail)?);
            }
            match self.lookup_on(conn.as_ref().expect("connected"), &key, &base, &filter) {
                Ok(v) => return Ok(v),
                Err((rc, e)) => {
                    *conn = None;
                    let gone = matches!(rc, LDAP_SERVER_DOWN | LDAP_CONNECT_ERROR | LDAP_TIMEOUT);
                    if !gone || attempt == 1 {
                        return Err(fail(e));
                    }
                }
            }
        }
        unreachable!("the loop returns")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filter_and_dn_quoting() {
        let mut out = String::new();
        quote_filter("a*b(c)\\d", &mut out);
        assert_eq!(out, "a\\2ab\\28c\\29\\5cd");
        let mut out = String::new();
        quote_filter("jörg*", &mut out);
        assert_eq!(out, "jörg\\2a");
        let mut out = String::new();
        quote_dn(" a,b=c ", &mut out);
        assert_eq!(out, "\\ a\\,b\\=c\\ ");
    }
}
