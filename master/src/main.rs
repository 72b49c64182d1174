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
//! Modules: [`listeners`] (sockets), [`children`] (spawning, status
//! pipes), [`supervisor`] (the event loop), [`startup`] (queue tree, lock,
//! detaching), [`jail`] (the chroot column).

mod children;
mod jail;
mod listeners;
mod startup;
mod supervisor;

fn main() {
    startup::close_inherited_descriptors();
    let args = startup::parse_args();
    let cfg = startup::load_config(&args);
    let owner = startup::owner(&cfg);
    startup::prepare_tree(&cfg, owner);
    let lock = startup::lock(&cfg);
    let mut sup = match supervisor::Supervisor::new(cfg.clone(), owner.map(|o| (o.uid, o.gid))) {
        Ok(s) => s,
        Err(e) => postern_common::fatal!("{e}"),
    };
    startup::detach_unless(args.foreground, &lock);
    startup::note_services(&cfg);
    postern_common::info!(
        "daemon started -- version {}, configuration {}",
        env!("CARGO_PKG_VERSION"),
        cfg.dir().display()
    );
    sup.run();
    startup::remove_pid(&cfg);
    postern_common::info!("stopped");
}
