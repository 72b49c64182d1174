//! Writing a message into a Maildir or an mbox file, durably.
//!
//! Nothing here reports success before the data is fsync'd: a Maildir
//! message is written to `tmp/`, fsync'd, renamed into `new/` and the
//! directory fsync'd; an mbox append is fsync'd, and on any error the
//! file is truncated back to its size before the append, so a failed
//! delivery leaves no half message behind.
//!
//! Privileges: every function takes the user and group ids to act with
//! and switches to them with `privs::as_user` (a no-op when not running
//! as root), so that files are created, locked and written by the
//! recipient. The caller never holds switched ids across these calls.

use crate::status::Status;
use nix::unistd::{Gid, Uid};
use postern_common::privs;
use postern_common::warning;
use std::fs::{DirBuilder, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// User and group ids to act with.
pub type Ids = (u32, u32);

/// How long to wait for a mailbox lock (`deliver_lock_attempts`,
/// `deliver_lock_delay`, `stale_lock_time`).
#[derive(Debug, Clone)]
pub struct LockPolicy {
    pub attempts: u32,
    pub delay: Duration,
    /// A dot-lock file older than this is removed.
    pub stale: Duration,
}

impl Default for LockPolicy {
    fn default() -> Self {
        LockPolicy {
            attempts: 20,
            delay: Duration::from_secs(1),
            stale: Duration::from_secs(500),
        }
    }
}

// ------------------------------------------------------------------ Maildir

static COUNTER: AtomicU64 = AtomicU64::new(0);

/// A name unique to this delivery: `SECONDS.M<usec>P<pid>Q<counter>.HOST`.
pub fn unique_name(host: &str) -> String {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    let q = COUNTER.fetch_add(1, Ordering::Relaxed);
    format!(
        "{}.M{}P{}Q{}.{}",
        now.as_secs(),
        now.subsec_micros(),
        std::process::id(),
        q,
        host.replace('/', "\\057").replace(':', "\\072")
    )
}

/// Delivers into the Maildir `dir` (created with `tmp`, `new`, `cur` when
/// missing, mode 0700) as `ids`. Returns the file's path in `new/`.
///
/// The file is fsync'd in `tmp/` and renamed into `new/`. With
/// `sync_new`, `new/` is fsync'd too before this returns; without, the
/// caller must do it ([`sync_new_dir`]) before it counts the delivery as
/// done: a batch of deliveries then shares one directory sync.
pub fn deliver_maildir(
    dir: &Path,
    ids: Ids,
    host: &str,
    headers: &[u8],
    content: &mut dyn Read,
    sync_new: bool,
) -> Result<PathBuf, Status> {
    privs::as_user(ids.0, ids.1, || {
        maildir_write(dir, host, headers, content, sync_new)
    })
    .map_err(|e| Status::io(&e, &format!("switch to uid {}", ids.0)))?
}

/// Makes the renames into the Maildir folder `new` (a `new/` directory)
/// durable, as `ids`; the second half of a [`deliver_maildir`] without
/// `sync_new`.
pub fn sync_new_dir(new: &Path, ids: Ids) -> Result<(), Status> {
    let fail = |e: &io::Error| {
        Status::io(
            e,
            &format!("maildir delivery failed: sync {}", new.display()),
        )
    };
    privs::as_user(ids.0, ids.1, || postern_common::queue::sync_dir(new))
        .map_err(|e| Status::io(&e, &format!("switch to uid {}", ids.0)))?
        .map_err(|e| fail(&e))
}

fn maildir_write(
    dir: &Path,
    host: &str,
    headers: &[u8],
    content: &mut dyn Read,
    sync_new: bool,
) -> Result<PathBuf, Status> {
    let fail =
        |e: &io::Error, what: &str| Status::io(e, &format!("maildir delivery failed: {what}"));
    for sub in ["tmp", "new", "cur"] {
        let d = dir.join(sub);
        if !d.is_dir() {
            DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(&d)
                .map_err(|e| fail(&e, &format!("create directory {}", d.display())))?;
        }
    }
    let name = unique_name(host);
    let tmp = dir.join("tmp").join(&name);
    let new = dir.join("new").join(&name);
    let file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&tmp)
        .map_err(|e| fail(&e, &format!("create maildir file {}", tmp.display())))?;
    let written = (|| {
        let mut w = CountingWriter::new(&file, 0, 0);
        w.write_all(headers)?;
        let last = copy_plain(content, &mut w)?;
        if last.is_some_and(|b| b != b'\n') {
            w.write_all(b"\n")?;
        }
        w.flush()?;
        file.sync_all()?;
        std::fs::rename(&tmp, &new)?;
        if sync_new {
            postern_common::queue::sync_dir(&dir.join("new"))?;
        }
        Ok(())
    })();
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(fail(&e, &format!("write {}", tmp.display())));
    }
    Ok(new)
}

// ------------------------------------------------------------------ mbox

/// An mbox append.
pub struct Mbox<'a> {
    pub path: &'a Path,
    /// Ids that open, create and lock the file (root for a spool
    /// directory only root may write in).
    pub open_as: Ids,
    /// Ids that write the message.
    pub write_as: Ids,
    /// Owner to give a file this delivery creates (when running as root).
    pub chown: Option<Ids>,
    /// A mailbox proper: must be a regular file with one link, is not
    /// followed through a symlink, and (with `owner`) must be owned by it.
    pub mailbox: bool,
    pub owner: Option<u32>,
    /// `mailbox_size_limit`; 0 = none.
    pub size_limit: u64,
    pub locks: &'a LockPolicy,
}

impl Mbox<'_> {
    /// Delivers one message from `sender`, the one mbox delivery of every
    /// caller (mailbox, file, virtual mailbox): its `From ` line, dated
    /// now, then [`Mbox::append`]. Sent with `delivered` as the reason, or
    /// the failure's reason put after `failed` (which names the file).
    pub fn deliver(
        &self,
        sender: &str,
        headers: &[u8],
        content: &mut dyn Read,
        size_hint: u64,
        delivered: impl Into<String>,
        failed: &str,
    ) -> Status {
        let from = crate::message::from_line(sender, postern_common::queue::now().0);
        match self.append(from.as_bytes(), headers, content, size_hint) {
            Ok(()) => Status::sent(delivered),
            Err(mut s) => {
                s.reason = format!("{failed}{}", s.reason);
                s
            }
        }
    }

    /// Appends `from_line`, `headers` and the content (`>From ` quoted,
    /// followed by an empty line). `size_hint` is the content size, to
    /// refuse a message that cannot fit before writing any of it.
    pub fn append(
        &self,
        from_line: &[u8],
        headers: &[u8],
        content: &mut dyn Read,
        size_hint: u64,
    ) -> Result<(), Status> {
        let switch = |e: io::Error, ids: Ids| Status::io(&e, &format!("switch to uid {}", ids.0));
        let opened = privs::as_user(self.open_as.0, self.open_as.1, || self.open())
            .map_err(|e| switch(e, self.open_as))??;
        let result = privs::as_user(self.write_as.0, self.write_as.1, || {
            self.write(&opened, from_line, headers, content, size_hint)
        })
        .map_err(|e| switch(e, self.write_as))
        .and_then(|r| r);
        // The dot-lock goes away with the ids that made it.
        let _ = privs::as_user(self.open_as.0, self.open_as.1, move || drop(opened));
        result
    }

    fn open(&self) -> Result<Opened, Status> {
        let path = self.path;
        let is_regular_or_absent = match std::fs::metadata(path) {
            Ok(m) => m.is_file(),
            Err(_) => true,
        };
        let dot = if is_regular_or_absent {
            DotLock::acquire(path, self.locks)?
        } else {
            None
        };
        let mut flags = libc::O_NONBLOCK | libc::O_NOCTTY;
        if self.mailbox {
            flags |= libc::O_NOFOLLOW;
        }
        let (file, created) = open_append(path, flags)
            .map_err(|e| Status::io(&e, &format!("open {}", path.display())))?;
        set_blocking(&file);
        let meta = file
            .metadata()
            .map_err(|e| Status::io(&e, &format!("stat {}", path.display())))?;
        let regular = meta.is_file();
        if self.mailbox {
            if !regular {
                return Err(Status::bounce(
                    "5.2.0",
                    format!("destination {} is not a regular file", path.display()),
                ));
            }
            if meta.nlink() > 1 {
                return Err(Status::defer(
                    "4.2.0",
                    format!("destination {} has too many hard links", path.display()),
                ));
            }
            if let Some(uid) = self.owner {
                if !created && meta.uid() != uid && privs::is_root() {
                    warning!(
                        "mailbox {} is owned by uid {}, not by its recipient (uid {uid})",
                        path.display(),
                        meta.uid()
                    );
                    return Err(Status::defer(
                        "4.2.0",
                        format!("destination {} is not owned by recipient", path.display()),
                    ));
                }
            }
        }
        if created && privs::is_root() {
            if let Some((uid, gid)) = self.chown {
                let owner = (Uid::from_raw(uid), Gid::from_raw(gid));
                if let Err(e) = nix::unistd::fchown(&file, Some(owner.0), Some(owner.1)) {
                    return Err(Status::io(&e.into(), &format!("chown {}", path.display())));
                }
            }
        }
        if regular {
            lock_fcntl(&file, self.locks)
                .map_err(|e| Status::io(&e, &format!("lock {}", path.display())))?;
        }
        let start = file
            .metadata()
            .map(|m| m.len())
            .map_err(|e| Status::io(&e, &format!("stat {}", path.display())))?;
        Ok(Opened {
            file,
            regular,
            start,
            _dot: dot,
        })
    }

    fn write(
        &self,
        o: &Opened,
        from_line: &[u8],
        headers: &[u8],
        content: &mut dyn Read,
        size_hint: u64,
    ) -> Result<(), Status> {
        let limit = if o.regular { self.size_limit } else { 0 };
        let efbig = || io::Error::from_raw_os_error(libc::EFBIG);
        let context = "error writing message";
        if limit > 0 && o.start + (from_line.len() + headers.len()) as u64 + size_hint + 1 > limit {
            return Err(Status::io(&efbig(), context));
        }
        let r = (|| {
            let mut w = CountingWriter::new(&o.file, o.start, limit);
            w.write_all(from_line)?;
            w.write_all(headers)?;
            let last = copy_quoted(content, &mut w)?;
            if last.is_some_and(|b| b != b'\n') {
                w.write_all(b"\n")?;
            }
            w.write_all(b"\n")?;
            w.flush()?;
            if o.regular {
                o.file.sync_data()?;
            }
            Ok::<(), io::Error>(())
        })();
        if let Err(e) = r {
            if o.regular {
                // Leave no partial message behind.
                if let Err(t) = o.file.set_len(o.start) {
                    warning!(
                        "cannot truncate {} back to {} bytes: {t}",
                        self.path.display(),
                        o.start
                    );
                }
                let _ = o.file.sync_data();
            }
            return Err(Status::io(&e, context));
        }
        Ok(())
    }
}

/// An mbox file, open, locked.
struct Opened {
    file: File,
    regular: bool,
    /// Its size before this delivery.
    start: u64,
    _dot: Option<DotLock>,
}

/// Opens for appending; creates (O_EXCL) when missing. Returns whether
/// this call created the file.
fn open_append(path: &Path, flags: i32) -> io::Result<(File, bool)> {
    for _ in 0..10 {
        match OpenOptions::new()
            .append(true)
            .custom_flags(flags)
            .open(path)
        {
            Ok(f) => return Ok((f, false)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        match OpenOptions::new()
            .append(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(flags)
            .open(path)
        {
            Ok(f) => return Ok((f, true)),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e),
        }
    }
    Err(io::Error::from_raw_os_error(libc::EAGAIN))
}

fn set_blocking(f: &File) {
    use nix::fcntl::{fcntl, FcntlArg, OFlag};
    if let Ok(fl) = fcntl(f, FcntlArg::F_GETFL) {
        let _ = fcntl(
            f,
            FcntlArg::F_SETFL(OFlag::from_bits_retain(fl) & !OFlag::O_NONBLOCK),
        );
    }
}

/// An exclusive fcntl lock on the whole file, tried `attempts` times.
fn lock_fcntl(f: &File, p: &LockPolicy) -> io::Result<()> {
    let mut last = io::Error::from_raw_os_error(libc::EAGAIN);
    for i in 0..p.attempts.max(1) {
        if i > 0 {
            std::thread::sleep(p.delay);
        }
        // The whole file (length 0: to its end, however it grows).
        let whole = libc::flock {
            l_type: libc::F_WRLCK as libc::c_short,
            l_whence: libc::SEEK_SET as libc::c_short,
            l_start: 0,
            l_len: 0,
            l_pid: 0,
        };
        match nix::fcntl::fcntl(f, nix::fcntl::FcntlArg::F_SETLK(&whole)) {
            Ok(_) => return Ok(()),
            Err(e) => last = e.into(),
        }
        match last.raw_os_error() {
            Some(libc::EAGAIN) | Some(libc::EACCES) | Some(libc::EINTR) => continue,
            _ => return Err(last),
        }
    }
    Err(io::Error::new(
        last.kind(),
        format!(
            "unable to lock for exclusive access: {}",
            crate::status::strip_os_error(&last)
        ),
    ))
}

/// `FILE.lock`, removed when dropped.
struct DotLock {
    path: PathBuf,
}

impl DotLock {
    /// Takes the dot-lock of `file`. `None` when the directory does not
    /// let us create it (dot-locking is then skipped, as Postfix does for
    /// spool directories it cannot write).
    fn acquire(file: &Path, p: &LockPolicy) -> Result<Option<DotLock>, Status> {
        let mut name = file.as_os_str().to_owned();
        name.push(".lock");
        let path = PathBuf::from(name);
        for i in 0..p.attempts.max(1) {
            if i > 0 {
                std::thread::sleep(p.delay);
            }
            match OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&path)
            {
                Ok(mut f) => {
                    let _ = writeln!(f, "{}", std::process::id());
                    return Ok(Some(DotLock { path }));
                }
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                    let stale = std::fs::symlink_metadata(&path)
                        .ok()
                        .and_then(|m| m.modified().ok())
                        .and_then(|t| t.elapsed().ok())
                        .is_some_and(|age| age > p.stale);
                    if stale {
                        warning!("removing stale lock file {}", path.display());
                        let _ = std::fs::remove_file(&path);
                    }
                }
                Err(e)
                    if matches!(
                        e.raw_os_error(),
                        Some(libc::EACCES | libc::EPERM | libc::EROFS)
                    ) =>
                {
                    return Ok(None);
                }
                Err(e) => {
                    return Err(Status::io(
                        &e,
                        &format!("create lock file {}", path.display()),
                    ));
                }
            }
        }
        Err(Status::defer(
            "4.2.0",
            format!(
                "unable to lock {} for exclusive access: lock file {} exists",
                file.display(),
                path.display()
            ),
        ))
    }
}

impl Drop for DotLock {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

// ------------------------------------------------------------------ copying

/// Buffers writes in 64 KiB pieces, counting bytes, and refuses (EFBIG) to
/// take a file past `limit` bytes (0 = none) from `start`.
struct CountingWriter<'a> {
    file: &'a File,
    buf: Vec<u8>,
    total: u64,
    limit: u64,
}

impl<'a> CountingWriter<'a> {
    fn new(file: &'a File, start: u64, limit: u64) -> Self {
        CountingWriter {
            file,
            buf: Vec::with_capacity(64 * 1024),
            total: start,
            limit,
        }
    }
}

impl Write for CountingWriter<'_> {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        self.total += data.len() as u64;
        if self.limit > 0 && self.total > self.limit {
            return Err(io::Error::from_raw_os_error(libc::EFBIG));
        }
        self.buf.extend_from_slice(data);
        if self.buf.len() >= 64 * 1024 {
            self.flush()?;
        }
        Ok(data.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        if !self.buf.is_empty() {
            let mut f = self.file;
            f.write_all(&self.buf)?;
            self.buf.clear();
        }
        Ok(())
    }
}

/// Copies as is; returns the last byte copied.
pub fn copy_plain(r: &mut dyn Read, w: &mut dyn Write) -> io::Result<Option<u8>> {
    let mut buf = vec![0u8; 64 * 1024];
    let mut last = None;
    loop {
        let n = match r.read(&mut buf) {
            Ok(0) => return Ok(last),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        w.write_all(&buf[..n])?;
        last = Some(buf[n - 1]);
    }
}

/// Copies with `>` put before every line that starts with `From `.
/// Returns the last byte copied.
pub fn copy_quoted(r: &mut dyn Read, w: &mut dyn Write) -> io::Result<Option<u8>> {
    let mut q = Quoter::default();
    let mut buf = vec![0u8; 64 * 1024];
    let mut out = Vec::with_capacity(buf.len() + 1024);
    let mut last = None;
    loop {
        let n = match r.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        out.clear();
        q.feed(&buf[..n], &mut out);
        w.write_all(&out)?;
        last = Some(buf[n - 1]);
    }
    out.clear();
    q.finish(&mut out);
    w.write_all(&out)?;
    Ok(last)
}

/// The `>From ` quoting state across pieces of input.
struct Quoter {
    at_line_start: bool,
    /// Bytes at a line start that are so far a prefix of "From ".
    held: Vec<u8>,
}

impl Default for Quoter {
    fn default() -> Self {
        Quoter {
            at_line_start: true,
            held: Vec::with_capacity(5),
        }
    }
}

impl Quoter {
    fn feed(&mut self, data: &[u8], out: &mut Vec<u8>) {
        const FROM: &[u8] = b"From ";
        for &b in data {
            if self.at_line_start {
                self.held.push(b);
                if FROM.starts_with(&self.held) {
                    if self.held.len() == FROM.len() {
                        out.push(b'>');
                        out.extend_from_slice(&self.held);
                        self.held.clear();
                        self.at_line_start = false;
                    }
                    continue;
                }
                out.extend_from_slice(&self.held);
                self.held.clear();
                self.at_line_start = b == b'\n';
                continue;
            }
            out.push(b);
            if b == b'\n' {
                self.at_line_start = true;
            }
        }
    }

    fn finish(&mut self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.held);
        self.held.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use postern_common::ipc::Outcome;

    fn tmpdir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("plocal-mbox-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    fn me() -> Ids {
        (
            nix::unistd::geteuid().as_raw(),
            nix::unistd::getegid().as_raw(),
        )
    }

    fn quote(s: &[u8], piece: usize) -> Vec<u8> {
        let mut q = Quoter::default();
        let mut out = Vec::new();
        for c in s.chunks(piece) {
            q.feed(c, &mut out);
        }
        q.finish(&mut out);
        out
    }

    #[test]
    fn from_quoting_across_pieces() {
        let input = b"From x\nFrom: y\nFro\nFrom z\n>From a\n Fromage\nFrom ";
        let want = b">From x\nFrom: y\nFro\n>From z\n>From a\n Fromage\n>From ";
        for piece in [1, 2, 3, 5, 7, 100] {
            assert_eq!(quote(input, piece), want, "piece {piece}");
        }
        assert_eq!(quote(b"Fr", 1), b"Fr");
    }

    #[test]
    fn maildir_delivery() {
        let d = tmpdir("maildir");
        let md = d.join("home/Maildir");
        let mut content = &b"Subject: x\n\nbody"[..];
        let p = deliver_maildir(
            &md,
            me(),
            "h/o:st",
            b"Delivered-To: a@b\n",
            &mut content,
            true,
        )
        .unwrap();
        assert!(p.starts_with(md.join("new")));
        let name = p.file_name().unwrap().to_str().unwrap().to_string();
        assert!(name.ends_with(".h\\057o\\072st"), "{name}");
        assert!(
            name.contains(&format!("P{}Q", std::process::id())),
            "{name}"
        );
        assert_eq!(
            std::fs::read(&p).unwrap(),
            b"Delivered-To: a@b\nSubject: x\n\nbody\n"
        );
        assert_eq!(std::fs::read_dir(md.join("tmp")).unwrap().count(), 0);
        assert!(md.join("cur").is_dir());
        let mode = std::fs::metadata(md.join("tmp")).unwrap().mode() & 0o777;
        assert_eq!(mode, 0o700);
        let mut content = &b"second\n"[..];
        let q = deliver_maildir(&md, me(), "h", b"", &mut content, false).unwrap();
        sync_new_dir(&md.join("new"), me()).unwrap();
        assert_ne!(p, q);
        std::fs::remove_dir_all(d).unwrap();
    }

    fn mbox<'a>(path: &'a Path, limit: u64, locks: &'a LockPolicy) -> Mbox<'a> {
        Mbox {
            path,
            open_as: me(),
            write_as: me(),
            chown: None,
            mailbox: true,
            owner: Some(me().0),
            size_limit: limit,
            locks,
        }
    }

    #[test]
    fn mbox_append_and_limits() {
        let d = tmpdir("append");
        let f = d.join("alice");
        let locks = LockPolicy::default();
        let m = mbox(&f, 0, &locks);
        let body = b"Subject: s\n\nFrom me\nno newline";
        m.append(
            b"From a@b  Sat Nov 22 14:11:42 2025\n",
            b"Return-Path: <a@b>\n",
            &mut &body[..],
            0,
        )
        .unwrap();
        let want1: &[u8] = b"From a@b  Sat Nov 22 14:11:42 2025\nReturn-Path: <a@b>\nSubject: s\n\n>From me\nno newline\n\n";
        assert_eq!(std::fs::read(&f).unwrap(), want1);
        assert!(!d.join("alice.lock").exists());
        let mode = std::fs::metadata(&f).unwrap().mode() & 0o777;
        assert_eq!(mode, 0o600);
        m.append(b"From x\n", b"", &mut &b"b\n"[..], 2).unwrap();
        let mut want2 = want1.to_vec();
        want2.extend_from_slice(b"From x\nb\n\n");
        assert_eq!(std::fs::read(&f).unwrap(), want2);

        // Too big, known in advance: nothing written.
        let size = want2.len() as u64;
        let small = mbox(&f, size + 10, &locks);
        let e = small
            .append(b"From x\n", b"", &mut &[b'a'; 100][..], 100)
            .unwrap_err();
        assert_eq!((e.outcome, e.dsn.as_str()), (Outcome::Bounced, "5.2.2"));
        assert_eq!(e.reason, "error writing message: File too large");
        // Too big, found while writing: truncated back.
        let e = small
            .append(b"From x\n", b"", &mut &[b'a'; 100][..], 0)
            .unwrap_err();
        assert_eq!(e.dsn, "5.2.2");
        assert_eq!(std::fs::read(&f).unwrap(), want2);
        std::fs::remove_dir_all(d).unwrap();
    }

    #[test]
    fn mbox_locks_and_refusals() {
        let d = tmpdir("locks");
        let f = d.join("bob");
        let quick = LockPolicy {
            attempts: 2,
            delay: Duration::from_millis(10),
            stale: Duration::from_secs(500),
        };
        // A fresh dot-lock held by someone else: deferred.
        std::fs::write(d.join("bob.lock"), b"1\n").unwrap();
        let e = mbox(&f, 0, &quick)
            .append(b"From x\n", b"", &mut &b"m\n"[..], 2)
            .unwrap_err();
        assert_eq!((e.outcome, e.dsn.as_str()), (Outcome::Deferred, "4.2.0"));
        assert!(e.reason.contains("unable to lock"), "{}", e.reason);
        // A stale one is removed.
        let stale = LockPolicy {
            stale: Duration::from_secs(0),
            ..quick.clone()
        };
        std::thread::sleep(Duration::from_millis(20));
        mbox(&f, 0, &stale)
            .append(b"From x\n", b"", &mut &b"m\n"[..], 2)
            .unwrap();
        assert!(!d.join("bob.lock").exists());

        // A symlink is not followed.
        std::os::unix::fs::symlink(&f, d.join("link")).unwrap();
        let link = d.join("link");
        let e = mbox(&link, 0, &quick)
            .append(b"From x\n", b"", &mut &b"m\n"[..], 2)
            .unwrap_err();
        assert_eq!(e.outcome, Outcome::Deferred);
        // A hard-linked mailbox is refused.
        std::fs::hard_link(&f, d.join("hard")).unwrap();
        let e = mbox(&f, 0, &quick)
            .append(b"From x\n", b"", &mut &b"m\n"[..], 2)
            .unwrap_err();
        assert!(e.reason.contains("hard links"), "{}", e.reason);
        // A directory that cannot be written into: deferred with 4.2.0,
        // unless we are root (who can write anywhere).
        if !privs::is_root() {
            let ro = d.join("ro");
            std::fs::create_dir(&ro).unwrap();
            std::fs::set_permissions(&ro, std::os::unix::fs::PermissionsExt::from_mode(0o500))
                .unwrap();
            let e = mbox(&ro.join("carol"), 0, &quick)
                .append(b"From x\n", b"", &mut &b"m\n"[..], 2)
                .unwrap_err();
            assert_eq!((e.outcome, e.dsn.as_str()), (Outcome::Deferred, "4.2.0"));
            assert!(e.reason.contains("Permission denied"), "{}", e.reason);
            std::fs::set_permissions(&ro, std::os::unix::fs::PermissionsExt::from_mode(0o700))
                .unwrap();
        }
        std::fs::remove_dir_all(d).unwrap();
    }

    #[test]
    fn files_that_are_not_regular() {
        let locks = LockPolicy::default();
        let m = Mbox {
            mailbox: false,
            owner: None,
            ..mbox(Path::new("/dev/null"), 10, &locks)
        };
        m.append(b"From x\n", b"", &mut &[b'a'; 100][..], 100)
            .unwrap();
        let m = mbox(Path::new("/dev/null"), 0, &locks);
        let e = m.append(b"", b"", &mut &b""[..], 0).unwrap_err();
        assert_eq!(e.dsn, "5.2.0");
    }
}
