//! A pool of worker threads that outlive their jobs.
//!
//! cleanup and smtp serve each connection, and qmgr runs each delivery
//! request, on a thread of its own. Starting and ending a thread per
//! message cost more CPU than the work on it: the stack's mmap, guard page
//! and munmap (with a TLB shootdown on the other CPU), the clone, the exit
//! and glibc's per-thread arena set-up, several times per message. The
//! pool keeps finished workers waiting for the next job instead, starts a
//! new one only when no idle worker is left for the jobs queued, up to
//! `max`, and lets a worker go after [`IDLE_EXIT`] without work.

use std::collections::VecDeque;
use std::io;
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

/// A worker idle this long exits, so an idle process shrinks back.
pub const IDLE_EXIT: Duration = Duration::from_secs(60);

type Job = Box<dyn FnOnce() + Send + 'static>;

#[derive(Default)]
struct State {
    jobs: VecDeque<Job>,
    /// Workers waiting for a job.
    idle: usize,
    /// Workers alive.
    threads: usize,
}

struct Shared {
    state: Mutex<State>,
    work: Condvar,
}

/// Runs jobs on up to `max` reused threads named `name`.
#[derive(Clone)]
pub struct Pool {
    shared: Arc<Shared>,
    name: String,
    max: usize,
}

impl Pool {
    pub fn new(name: &str, max: usize) -> Pool {
        Pool {
            shared: Arc::new(Shared {
                state: Mutex::new(State::default()),
                work: Condvar::new(),
            }),
            name: name.to_string(),
            max: max.max(1),
        }
    }

    /// Runs `job` on an idle worker, on a new one when every worker is
    /// taken (up to `max`), or else as soon as one is free. Fails, handing
    /// `job` back, only when no worker runs and none can be started.
    pub fn submit<F>(&self, job: F) -> Result<(), (io::Error, F)>
    where
        F: FnOnce() + Send + 'static,
    {
        let mut s = self.lock();
        // Every queued job and this one need an idle worker of their own;
        // a job must not wait behind a long one while the pool may grow.
        let start = s.idle <= s.jobs.len() && s.threads < self.max;
        if start {
            s.threads += 1;
            drop(s);
            let shared = self.shared.clone();
            let spawned = std::thread::Builder::new()
                .name(self.name.clone())
                .spawn(move || work(&shared));
            s = self.lock();
            if let Err(e) = spawned {
                s.threads -= 1;
                if s.threads == 0 {
                    return Err((e, job));
                }
            }
        }
        s.jobs.push_back(Box::new(job));
        drop(s);
        self.shared.work.notify_one();
        Ok(())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A job's panic happens outside the lock: it is never poisoned by
        // one; recover anyway rather than stop serving.
        self.shared
            .state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// A worker: takes jobs until it has been idle for [`IDLE_EXIT`].
fn work(shared: &Shared) {
    let mut s = shared
        .state
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    loop {
        if let Some(job) = s.jobs.pop_front() {
            drop(s);
            // A job that panics (its message is logged by the panic hook)
            // must not take the worker, and its place in `threads`, along.
            let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(job));
            s = shared
                .state
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            continue;
        }
        s.idle += 1;
        let (next, timeout) = shared
            .work
            .wait_timeout_while(s, IDLE_EXIT, |s| s.jobs.is_empty())
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        s = next;
        s.idle -= 1;
        if timeout.timed_out() && s.jobs.is_empty() {
            s.threads -= 1;
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::mpsc::channel;

    #[test]
    fn a_panicking_job_does_not_take_the_worker_along() {
        let pool = Pool::new("t", 1);
        pool.submit(|| panic!("a job that fails"))
            .map_err(|(e, _)| e)
            .unwrap();
        let (tx, rx) = channel();
        pool.submit(move || tx.send(()).unwrap())
            .map_err(|(e, _)| e)
            .unwrap();
        rx.recv_timeout(Duration::from_secs(10))
            .expect("the next job ran on the same, only worker");
        assert_eq!(pool.lock().threads, 1);
    }

    #[test]
    fn reuses_threads_and_grows_for_blocked_jobs() {
        let pool = Pool::new("t", 4);
        let (tx, rx) = channel();
        for _ in 0..20 {
            let tx = tx.clone();
            pool.submit(move || tx.send(std::thread::current().id()).unwrap())
                .map_err(|(e, _)| e)
                .unwrap();
            rx.recv().unwrap();
            // The worker is back waiting before the next job comes.
            while pool.lock().idle == 0 {
                std::thread::yield_now();
            }
        }
        // One job at a time: one worker did them all.
        assert_eq!(pool.lock().threads, 1);

        // Four jobs that wait for each other need four workers at once.
        let gate = Arc::new((Mutex::new(0usize), Condvar::new()));
        let done = Arc::new(AtomicUsize::new(0));
        for _ in 0..4 {
            let (gate, done) = (gate.clone(), done.clone());
            pool.submit(move || {
                let (m, cv) = &*gate;
                let mut n = m.lock().unwrap();
                *n += 1;
                cv.notify_all();
                let _n = cv.wait_while(n, |n| *n < 4).unwrap();
                done.fetch_add(1, Ordering::SeqCst);
            })
            .map_err(|(e, _)| e)
            .unwrap();
        }
        for _ in 0..200 {
            if done.load(Ordering::SeqCst) == 4 {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(done.load(Ordering::SeqCst), 4);
        assert!(pool.lock().threads <= 4);
    }
}
