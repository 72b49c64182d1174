//! `unix:passwd.byname` and `unix:group.byname`: the system's account
//! and group databases as tables (Postfix's dict_unix), through the C
//! library (NSS), so LDAP or SSSD accounts count too. A found account's
//! value is its passwd(5) line (`name:x:uid:gid:gecos:home:shell`), a
//! group's its group(5) line (`name:x:gid:member,member`). The usual use
//! is `local_recipient_maps = proxy:unix:passwd.byname $alias_maps`.

use super::{Dict, LookupError};

/// Which database.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unix {
    Passwd,
    Group,
}

impl Unix {
    /// `passwd.byname` or `group.byname`; Err names what is supported.
    pub fn open(name: &str) -> Result<Unix, String> {
        match name {
            "passwd.byname" => Ok(Unix::Passwd),
            "group.byname" => Ok(Unix::Group),
            other => Err(format!(
                "unix:{other}: unknown table (unix:passwd.byname and unix:group.byname are)"
            )),
        }
    }
}

impl Dict for Unix {
    fn lookup(&self, key: &str) -> Result<Option<String>, LookupError> {
        let spec = match self {
            Unix::Passwd => "unix:passwd.byname",
            Unix::Group => "unix:group.byname",
        };
        // A name with a NUL cannot be asked for; it is no account.
        if key.contains('\0') {
            return Ok(None);
        }
        match self {
            Unix::Passwd => match nix::unistd::User::from_name(key) {
                Ok(Some(u)) => Ok(Some(format!(
                    "{}:{}:{}:{}:{}:{}:{}",
                    u.name,
                    u.passwd.to_string_lossy(),
                    u.uid,
                    u.gid,
                    u.gecos.to_string_lossy(),
                    u.dir.display(),
                    u.shell.display()
                ))),
                Ok(None) => Ok(None),
                Err(e) => Err(LookupError::new(spec, format!("getpwnam_r: {e}"))),
            },
            Unix::Group => match nix::unistd::Group::from_name(key) {
                Ok(Some(g)) => Ok(Some(format!(
                    "{}:{}:{}:{}",
                    g.name,
                    g.passwd.to_string_lossy(),
                    g.gid,
                    g.mem.join(",")
                ))),
                Ok(None) => Ok(None),
                Err(e) => Err(LookupError::new(spec, format!("getgrnam_r: {e}"))),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn root_is_an_account() {
        let t = Unix::open("passwd.byname").unwrap();
        let line = t.lookup("root").unwrap().unwrap();
        assert!(line.starts_with("root:"), "{line}");
        assert_eq!(line.split(':').nth(2), Some("0"));
        assert_eq!(t.lookup("no-such-account-here").unwrap(), None);
        assert!(Unix::open("hosts.byname").is_err());
    }
}
