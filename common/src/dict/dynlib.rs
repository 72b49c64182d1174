//! The database client libraries (libmariadb, libpq, libsqlite3), loaded
//! when a table of that type is first opened, as Postfix loads its
//! `postfix-mysql`, `postfix-pgsql`, `postfix-sqlite` modules: a system
//! without MariaDB's client library still runs every program, and only
//! a `mysql:` table says what is missing.
//!
//! Loading happens while the daemon opens its tables, as root and before
//! a chroot, so the library's file is found.

use std::ffi::{c_void, CStr, CString};

/// An opened shared library, never closed (its functions are kept in
/// statics).
#[derive(Debug)]
pub struct Library {
    handle: *mut c_void,
    name: String,
}

// SAFETY: a dlopen handle may be used from any thread.
unsafe impl Send for Library {}
unsafe impl Sync for Library {}

impl Library {
    /// Opens the first of `names` that loads; the error names them all
    /// and the package that provides them.
    pub fn open(names: &[&str], package: &str) -> Result<Library, String> {
        let mut last = String::new();
        for name in names {
            let c = CString::new(*name).expect("library names have no NUL");
            // SAFETY: dlopen with a valid C string.
            let handle = unsafe { libc::dlopen(c.as_ptr(), libc::RTLD_NOW | libc::RTLD_LOCAL) };
            if !handle.is_null() {
                return Ok(Library {
                    handle,
                    name: name.to_string(),
                });
            }
            last = dl_error();
        }
        Err(format!(
            "cannot load {} (install {package}): {last}",
            names.join(" or ")
        ))
    }

    /// The address of function `symbol`, as a function pointer of type F.
    ///
    /// # Safety
    /// F must be the `extern "C" fn` type of the library's function.
    pub unsafe fn function<F: Copy>(&self, symbol: &str) -> Result<F, String> {
        assert_eq!(std::mem::size_of::<F>(), std::mem::size_of::<*mut c_void>());
        let c = CString::new(symbol).expect("symbol names have no NUL");
        // SAFETY: a valid handle and C string.
        let p = unsafe { libc::dlsym(self.handle, c.as_ptr()) };
        if p.is_null() {
            return Err(format!("{}: no function {symbol}", self.name));
        }
        // SAFETY: the caller says F is the function's type.
        Ok(unsafe { std::mem::transmute_copy::<*mut c_void, F>(&p) })
    }
}

fn dl_error() -> String {
    // SAFETY: dlerror returns null or a C string valid until the next call.
    let p = unsafe { libc::dlerror() };
    if p.is_null() {
        "unknown error".into()
    } else {
        // SAFETY: non-null, NUL-terminated.
        unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
    }
}

/// A C string for a library call; a value with a NUL byte (which no
/// setting or key can carry through C) is an error.
pub fn cstring(what: &str, value: &str) -> Result<CString, String> {
    CString::new(value).map_err(|_| format!("{what} contains a NUL byte"))
}

/// The text of a C string the library returned (None for NULL).
///
/// # Safety
/// `p` is null or points to a NUL-terminated string.
pub unsafe fn text(p: *const libc::c_char) -> Option<String> {
    if p.is_null() {
        None
    } else {
        // SAFETY: see above.
        Some(unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned())
    }
}
