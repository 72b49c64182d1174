//! Scanning `maildrop/` on every wake-up.

use crate::submit::{self, Outcome};
use postern_common::queue::{Queue, QueueTree};
use postern_common::{qfile, warning};
use postern_conf::Config;
use std::time::{Duration, SystemTime};

/// An incomplete maildrop file older than this was abandoned by a
/// sendmail that died; it was never reported as submitted.
const ABANDONED: Duration = Duration::from_secs(24 * 3600);

pub fn run(cfg: &Config) -> ! {
    let tree = QueueTree::new(postern_common::service::queue_directory(cfg));
    let settings = submit::Settings::from_config(cfg);
    postern_common::service::drop_privileges(cfg);
    // Wake-ups come from sendmail and master; scan every minute anyway.
    let own_socket = tree.pickup_socket();
    postern_common::service::serve_triggers(Duration::from_secs(60), &own_socket, |_| {
        scan_once(&tree, &settings);
    });
    // Drained (reload): between scans, so no file is half picked up.
    std::process::exit(0)
}

fn scan_once(tree: &QueueTree, settings: &submit::Settings) {
    let ids = match tree.list(Queue::Maildrop) {
        Ok(ids) => ids,
        Err(e) => {
            warning!("scan {}: {e}", tree.dir(Queue::Maildrop).display());
            return;
        }
    };
    for id in ids {
        let path = tree.path(Queue::Maildrop, &id);
        let file = match std::fs::File::open(&path) {
            Ok(f) => f,
            Err(_) => continue, // gone already
        };
        match qfile::is_complete(&file) {
            Ok(true) => {}
            _ => {
                let old = file
                    .metadata()
                    .and_then(|m| m.modified())
                    .map(|t| SystemTime::now().duration_since(t).unwrap_or_default() > ABANDONED)
                    .unwrap_or(false);
                if old {
                    warning!("{id}: removing abandoned incomplete maildrop file");
                    let _ = std::fs::remove_file(&path);
                }
                continue;
            }
        }
        match submit::submit(tree, settings, &file) {
            Outcome::Queued => {
                let _ = std::fs::remove_file(&path);
            }
            Outcome::Rejected(why) => {
                warning!("{id}: message rejected: {why}");
                let _ = std::fs::remove_file(&path);
            }
            Outcome::Corrupt(why) => {
                warning!("{id}: malformed maildrop file: {why}; moved to corrupt");
                let _ = tree.move_to(&id, Queue::Maildrop, Queue::Corrupt);
            }
            Outcome::TryLater(why) => {
                // cleanup is unavailable: leave everything for the next scan.
                warning!("{id}: {why}");
                return;
            }
        }
    }
}
