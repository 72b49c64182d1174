//! master: the supervisor of every Postern daemon.
//!
//! Started by `postern start` (detaches once its listeners are open) or
//! `postern start-fg` (`master -d`, stays in the foreground). It reads
//! main.cf and master.cf, creates what is missing of the queue tree,
//! takes the lock `queue_directory/pid/master.pid` (one master per queue),
//! binds every service's listener, and starts daemons on demand with the
//! listener on fd 3 and a status pipe on fd 4. Run as root, it drops
//! unprivileged services (`unpriv` = y in master.cf) to `mail_owner`
//! before exec; run as a plain user, everything runs as that user.
//! Signals: SIGHUP reloads the configuration, SIGTERM stops every child
//! and then master.
//!
//! Who talks to it: `postern` (start, stop, reload: signals and the pid
//! file), its children (status records on their service's status pipe,
//! [`postern_common::service::StatusRecord`]), and clients, whose
//! connections wake it to start a daemon. What it may touch: the queue
//! tree (it creates missing directories and fixes their owners),
//! `pid/master.pid`, the listeners' sockets, the files it copies into a
//! chroot jail (`etc/`), and its children (signals).
//!
//! Modules: [`listeners`] (sockets), [`children`] (spawning, status
//! pipes), [`supervisor`] (the event loop), [`startup`] (queue tree, lock,
//! detaching), [`jail`] (the chroot column).

pub mod children;
pub mod jail;
pub mod listeners;
pub mod startup;
pub mod supervisor;
