//! One site's deferred mail made due now: `postqueue -s site` and the
//! SMTP `ETRN site` command (RFC 1985) both ask for it.
//!
//! Postfix keeps a per-site log of deferred messages in its flush(8)
//! daemon; Postern has no flush service. Instead the deferred queue is
//! read and each message with a recipient still to deliver in `site` gets
//! its retry time (the queue file's mtime, as in Postfix) set to now;
//! then the caller wakes qmgr with [`crate::ipc::Wakeup::Deferred`], and
//! qmgr, which reads the retry time before it takes a deferred file,
//! delivers them at once. Nothing else in the file changes, so the
//! callers need only write access to `deferred/` files: root
//! (postqueue) or `mail_owner`, who owns the queue files (smtpd, which
//! runs as `mail_owner`).

use crate::qfile;
use crate::queue::{Queue, QueueTree};
use std::fs::File;
use std::io;

/// The site as flush compares it: lower case, without the `[]` of an
/// address literal. None: not a site (empty, or with `/` or a space).
pub fn normalize_site(site: &str) -> Option<String> {
    let site = site
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_ascii_lowercase();
    (!site.is_empty() && !site.contains(['/', ' '])).then_some(site)
}

/// The domain of an address, lower case.
pub fn domain_of(addr: &str) -> Option<String> {
    addr.rsplit_once('@').map(|(_, d)| d.to_ascii_lowercase())
}

/// Makes a deferred message due now. Returns false when it is not in
/// `deferred/` (any more) or its retry time cannot be changed.
pub fn make_due(tree: &QueueTree, id: &str) -> bool {
    let Some(path) = tree.locate(Queue::Deferred, id) else {
        return false;
    };
    let f = match File::options().write(true).open(path) {
        Ok(f) => f,
        Err(_) => return false,
    };
    f.set_modified(std::time::SystemTime::now()).is_ok()
}

/// Makes every deferred message with a recipient still to deliver in
/// `site` (as [`normalize_site`] gives it) due now; returns how many.
/// Err: the deferred queue cannot be read. A message that leaves the
/// queue meanwhile, or cannot be read, is passed over.
pub fn flush_site(tree: &QueueTree, site: &str) -> io::Result<usize> {
    let mut n = 0;
    for id in tree.list(Queue::Deferred)? {
        let Ok(f) = File::open(tree.path(Queue::Deferred, &id)) else {
            continue;
        };
        let Ok(env) = qfile::read_envelope(&f) else {
            continue;
        };
        let wanted = env
            .pending()
            .any(|r| domain_of(&r.rcpt.address).as_deref() == Some(site));
        if wanted && make_due(tree, &id) {
            n += 1;
        }
    }
    Ok(n)
}
