//! The chroot column of master.cf: which services run confined to the
//! queue directory, and the copies of the few /etc files they read there.
//!
//! A confined service is started as root with
//! [`postern_common::service::DROP_ENV`] saying `chroot`, as every
//! unprivileged Postern daemon is ([`drops_itself`]); the daemon reads its
//! configuration, tables and keys, then chroots and drops to `mail_owner`
//! itself ([`postern_common::service::drop_privileges`]). As Postfix documents,
//! the delivery agents that need root (`local`, `virtual`, `pipe`: the
//! privileged services) cannot run chrooted; master runs them unconfined
//! and says so. Without root there is no chroot at all.

use postern_common::warning;
use postern_conf::master_cf::Service;
use postern_conf::Config;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;

/// What a chrooted daemon reads from /etc: the time zone, the resolver's
/// configuration, and the name-service files getaddrinfo consults. Copied
/// into `queue_directory/etc` at start and at every reload, as Debian's
/// Postfix scripts do.
const ETC_FILES: &[&str] = &[
    "localtime",
    "resolv.conf",
    "hosts",
    "services",
    "host.conf",
    "nsswitch.conf",
];

/// Whether `def`'s program is one of Postern's own daemons (named, not
/// given by an absolute path), which master starts as root so that it can
/// read its secrets, and which then drop privileges themselves. Another
/// program would run as root, so master drops it before exec instead.
pub fn drops_itself(def: &Service) -> bool {
    !def.command.starts_with('/')
}

/// Whether `def` runs chrooted, given the `mail_owner` ids master drops
/// to (None when master is not root). Only Postern's own daemons confine
/// themselves ([`drops_itself`]).
pub fn confined(def: &Service, owner: Option<(u32, u32)>) -> bool {
    def.chroot && def.unpriv && owner.is_some() && drops_itself(def)
}

/// Warns about chroot settings that cannot be honoured, and refreshes the
/// copies of [`ETC_FILES`] when any service runs chrooted.
pub fn prepare(cfg: &Config, defs: &[Service], owner: Option<(u32, u32)>) {
    for def in defs.iter().filter(|d| d.chroot) {
        if owner.is_none() {
            warning!(
                "service {}: chroot needs master to run as root; running it unconfined",
                def.name
            );
        } else if !def.unpriv {
            warning!(
                "service {}: a privileged service cannot run chrooted; running it unconfined",
                def.name
            );
        } else if def.command.starts_with('/') {
            warning!(
                "service {}: {} is not a Postern daemon and cannot chroot itself; \
                 running it unconfined as mail_owner",
                def.name,
                def.command
            );
        }
    }
    if !defs.iter().any(|d| confined(d, owner)) {
        return;
    }
    let etc = Path::new(&cfg.get("queue_directory")).join("etc");
    if let Err(e) = std::fs::create_dir_all(&etc)
        .and_then(|_| std::fs::set_permissions(&etc, std::fs::Permissions::from_mode(0o755)))
    {
        warning!("{}: {e}", etc.display());
        return;
    }
    for name in ETC_FILES {
        let from = Path::new("/etc").join(name);
        // Read through symbolic links (/etc/localtime is one).
        let Ok(data) = std::fs::read(&from) else {
            continue;
        };
        let to = etc.join(name);
        if std::fs::read(&to).is_ok_and(|old| old == data) {
            continue;
        }
        if let Err(e) = replace(&to, &data) {
            warning!("copy {} to {}: {e}", from.display(), to.display());
        }
    }
}

/// Writes `data` to `path` through a temporary file and a rename, so that
/// a daemon never reads half a file; readable by all, as in /etc.
fn replace(path: &Path, data: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension("postern-new");
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o644)
        .open(&tmp)?;
    f.write_all(data)?;
    f.sync_all()?;
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o644))?;
    std::fs::rename(&tmp, path)
}
