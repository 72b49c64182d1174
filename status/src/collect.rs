//! What the page and the metrics show, gathered per request: qmgr's
//! answer to [`AdminRequest::Status`] on its admin socket, the number
//! and sizes of the files in each queue directory (never moved or
//! changed), and the pending recipients of `deferred/` by domain (each
//! file's envelope read, at most [`DEFERRED_SCAN_LIMIT`] files), which
//! the sites' domains turn into what waits on disk for each site.

use postern_common::ipc::{self, AdminReply, AdminRequest, QmgrStatus};
use postern_common::queue::{is_queue_id, Queue, QueueTree};
use std::collections::HashMap;
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::time::Duration;

/// The most `deferred/` files whose envelopes one request reads.
pub const DEFERRED_SCAN_LIMIT: usize = 20_000;

/// How long qmgr has to answer.
pub const QMGR_TIMEOUT: Duration = Duration::from_secs(5);

/// The queues counted, in the order shown (Postfix's names, as
/// postfix_exporter's `queue` label).
pub const QUEUES: [Queue; 5] = [
    Queue::Maildrop,
    Queue::Incoming,
    Queue::Active,
    Queue::Deferred,
    Queue::Hold,
];

/// One queue directory.
#[derive(Debug, Clone, Default)]
pub struct QueueCount {
    pub name: &'static str,
    /// The size of each message file, bytes.
    pub sizes: Vec<u64>,
    /// Could not be read (the reason).
    pub error: Option<String>,
}

/// Everything one request shows.
#[derive(Debug, Clone)]
pub struct Snapshot {
    pub qmgr: Result<QmgrStatus, String>,
    pub queues: Vec<QueueCount>,
    /// Pending recipients in `deferred/` by domain (lower case).
    pub deferred_by_domain: HashMap<String, u64>,
    /// `deferred/` had more than [`DEFERRED_SCAN_LIMIT`] files: the
    /// counts by domain are a lower bound.
    pub deferred_truncated: bool,
    /// Unix seconds.
    pub now: u64,
}

/// Where the data is.
#[derive(Debug, Clone)]
pub struct Sources {
    pub tree: QueueTree,
    pub admin_socket: PathBuf,
}

/// Asks qmgr for its status.
pub fn ask_qmgr(path: &std::path::Path) -> Result<QmgrStatus, String> {
    let mut s = ipc::connect(path, QMGR_TIMEOUT).map_err(|e| e.to_string())?;
    ipc::send(&mut s, &AdminRequest::Status).map_err(|e| format!("send: {e}"))?;
    let reply: AdminReply = ipc::recv(&mut s).map_err(|e| format!("no answer: {e}"))?;
    reply
        .status
        .map(|b| *b)
        .ok_or_else(|| "qmgr gave no status".to_string())
}

/// Counts one queue directory (message files only, by their names;
/// maildrop's files have other names: every regular file counts).
pub fn count_queue(tree: &QueueTree, q: Queue) -> QueueCount {
    let mut c = QueueCount {
        name: q.name(),
        ..Default::default()
    };
    let walked = tree.walk(q.name(), |_, _, e| {
        let name = e.file_name();
        let Some(name) = name.to_str() else { return };
        if q != Queue::Maildrop && !is_queue_id(name) {
            return;
        }
        if let Ok(m) = e.metadata() {
            if m.is_file() {
                c.sizes.push(m.size());
            }
        }
    });
    if let Err(e) = walked {
        c.error = Some(e.to_string());
    }
    c
}

/// The pending recipients of `deferred/` by domain, from at most
/// `limit` files (true: there were more).
pub fn deferred_by_domain(tree: &QueueTree, limit: usize) -> (HashMap<String, u64>, bool) {
    let mut by = HashMap::new();
    let mut files = 0;
    let mut truncated = false;
    let _ = tree.walk(Queue::Deferred.name(), |_, _, e| {
        let name = e.file_name();
        if !name.to_str().is_some_and(is_queue_id) {
            return;
        }
        if files >= limit {
            truncated = true;
            return;
        }
        files += 1;
        // qmgr may have moved it meanwhile: then it is not counted.
        let Ok(f) = std::fs::File::open(e.path()) else {
            return;
        };
        let Ok(env) = postern_common::qfile::read_envelope(&f) else {
            return;
        };
        for r in env.pending() {
            let domain = postern_common::accounting::domain_of(&r.rcpt.address);
            *by.entry(domain).or_insert(0) += 1;
        }
    });
    (by, truncated)
}

/// The recipients waiting in `deferred/` for a site: those of its
/// domains.
pub fn site_deferred(snap: &Snapshot, domains: &[String]) -> u64 {
    domains
        .iter()
        .filter_map(|d| snap.deferred_by_domain.get(&d.to_ascii_lowercase()))
        .sum()
}

impl Sources {
    pub fn snapshot(&self) -> Snapshot {
        let (deferred_by_domain, deferred_truncated) =
            deferred_by_domain(&self.tree, DEFERRED_SCAN_LIMIT);
        Snapshot {
            qmgr: ask_qmgr(&self.admin_socket),
            queues: QUEUES.iter().map(|&q| count_queue(&self.tree, q)).collect(),
            deferred_by_domain,
            deferred_truncated,
            now: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
        }
    }
}
