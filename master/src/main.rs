//! `master`: the supervisor `postern start` runs. The logic is in the
//! crate's library (`postern_master`, see its `lib.rs`).

use postern_common::{fatal, info};
use postern_master::{startup, supervisor};

fn main() {
    startup::close_inherited_descriptors();
    let args = startup::parse_args();
    let cfg = startup::load_config(&args);
    let owner = startup::owner(&cfg);
    startup::prepare_tree(&cfg, owner);
    let lock = startup::lock(&cfg);
    let mut sup = match supervisor::Supervisor::new(cfg.clone(), owner.map(|o| (o.uid, o.gid))) {
        Ok(s) => s,
        Err(e) => fatal!("{e}"),
    };
    startup::detach_unless(args.foreground, &lock);
    startup::note_services(&cfg);
    info!(
        "daemon started -- version {}, configuration {}",
        env!("CARGO_PKG_VERSION"),
        cfg.dir().display()
    );
    sup.run();
    startup::remove_pid(&cfg);
    info!("stopped");
}
