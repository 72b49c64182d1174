//! The listeners master passed (fd 3, and fd 5 and up for several
//! addresses) and one thread per client. postscreen is one process
//! (maxproc 1 in master.cf) that never says busy: screening is cheap and
//! the clients it lets through are smtpd's load. On master's drain signal
//! (reload), or when a table it read changed, it stops accepting and exits
//! when its clients are done; master starts a fresh one.

use crate::cache::Cache;
use crate::screen::Shared;
use crate::settings::Settings;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use postern_common::service::Status;
use postern_common::{fatal, warning};
use std::net::TcpListener;
use std::os::fd::{AsFd, FromRawFd};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

pub fn run(s: Settings) -> ! {
    let shared = Arc::new(Shared::new(Cache::open(
        s.cache_file.clone(),
        &s.cache_map,
        s.cache_retention,
        s.cache_cleanup_interval,
    )));
    let s = Arc::new(s);
    let listeners: Vec<TcpListener> = postern_common::service::listen_fds()
        .into_iter()
        .map(|fd| {
            // SAFETY: master put the listening sockets on these
            // descriptors for us, and nothing else owns them.
            let l = unsafe { TcpListener::from_raw_fd(fd) };
            if let Err(e) = l.set_nonblocking(true) {
                fatal!("no listener from master on fd {fd}: {e}");
            }
            l
        })
        .collect();
    let drain = postern_common::service::drain_notifier_or_die();
    let mut status = Status::new();
    status.available();
    let active = Arc::new(AtomicUsize::new(0));
    loop {
        let mut fds: Vec<PollFd> = listeners
            .iter()
            .map(|l| PollFd::new(l.as_fd(), PollFlags::POLLIN))
            .collect();
        fds.push(PollFd::new(drain.as_fd(), PollFlags::POLLIN));
        if poll(&mut fds, PollTimeout::from(1000u16)).is_err() {
            continue;
        }
        let drained = fds
            .last()
            .and_then(|f| f.revents())
            .is_some_and(|r| !r.is_empty());
        if drained {
            break;
        }
        if let Some(table) = postern_common::table_watch::changed() {
            // A fresh postscreen reads the new file (as root, if it must);
            // this one lets its clients in hand finish.
            postern_common::service::restart_for_table(&table);
            status.busy();
            break;
        }
        for l in &listeners {
            loop {
                match l.accept() {
                    Ok((sock, peer)) => {
                        status.took_work();
                        let _ = sock.set_nonblocking(false);
                        let _ = sock.set_nodelay(true);
                        let (s, shared, active) = (s.clone(), shared.clone(), active.clone());
                        active.fetch_add(1, Ordering::SeqCst);
                        let n = shared.enter(peer.ip());
                        std::thread::spawn(move || {
                            crate::screen::screen(&s, &shared, sock, peer, n);
                            active.fetch_sub(1, Ordering::SeqCst);
                        });
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                    Err(e) => {
                        warning!("accept connection: {e}");
                        break;
                    }
                }
            }
        }
    }
    drop(listeners);
    while active.load(Ordering::SeqCst) > 0 {
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    std::process::exit(0)
}
