//! postern: the administrator's control command.
//!
//! `postern [-c DIR] start | start-fg | stop | reload | status | check`.
//! `check` validates main.cf and master.cf and creates what is missing of
//! the queue tree; `start` checks, then runs master, which detaches once
//! it is ready; `start-fg` replaces itself with master in the foreground;
//! `stop` sends master SIGTERM and waits until it has stopped its children
//! and exited; `reload` sends SIGHUP; `status` exits 0 when master runs.
//! As Postfix's postfix(1): `flush` runs `postqueue -f`; `abort` stops
//! master and every process of the mail system at once (SIGTERM to
//! master's process group, SIGKILL to what is left after 5 s), without
//! waiting for deliveries or sessions in progress; `set-permissions`,
//! `upgrade-configuration` and `logrotate` are in [`crate::upkeep`];
//! `tls-report send` (the TLS-RPT reports) in [`crate::tls_report`];
//! `dkim-keygen` (a DKIM key pair and its DNS record) in
//! [`crate::dkim_keygen`].

use crate::die;
use crate::sysexits::*;
use postern_common::hostname;
use postern_common::privs;
use postern_conf::Config;
use std::io::Read;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::time::{Duration, Instant};

const NAME: &str = "postern";
const USAGE: &str = "usage: postern [-c config_dir] start|start-fg|stop|abort|reload|status|check|flush|set-permissions|upgrade-configuration|logrotate|tls-report send [-d YYYY-MM-DD]|dkim-keygen DOMAIN SELECTOR [rsa|ed25519]|queues [-j]|suspend SITE|DOMAIN [DURATION]|resume SITE|DOMAIN|bounce DOMAIN [REASON]";

pub fn main() -> ! {
    let mut config: Option<PathBuf> = None;
    let mut command: Option<String> = None;
    // `tls-report` takes arguments of its own.
    let mut extra: Vec<String> = Vec::new();
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        if matches!(
            command.as_deref(),
            Some("tls-report" | "dkim-keygen" | "queues" | "suspend" | "resume" | "bounce")
        ) {
            extra.push(a);
            continue;
        }
        match a.as_str() {
            "-c" => {
                config = Some(
                    it.next()
                        .unwrap_or_else(|| die(NAME, EX_USAGE, "-c requires a directory"))
                        .into(),
                )
            }
            "-v" | "-D" => {}
            c if command.is_none() && !c.starts_with('-') => command = Some(c.to_string()),
            other => die(
                NAME,
                EX_USAGE,
                format_args!("unexpected argument \"{other}\"; {USAGE}"),
            ),
        }
    }
    let Some(command) = command else {
        die(NAME, EX_USAGE, USAGE);
    };
    if command == "dkim-keygen" {
        // Needs no configuration.
        crate::dkim_keygen::main(&extra);
    }
    let cfg = crate::load_config(NAME, config.as_deref());
    match command.as_str() {
        "check" => {
            // Errors about secrets and tables fail the check (and a
            // start). Tables first, so that every one is named even when
            // the gate stops the check.
            let tables = check_tables(&cfg);
            check(&cfg);
            if check_secrets(&cfg).total() + tables > 0 {
                std::process::exit(1)
            }
            std::process::exit(EX_OK)
        }
        "start" | "start-fg" => start(&cfg, command == "start-fg"),
        "stop" => stop(&cfg),
        "reload" => {
            let pid = running(&cfg)
                .unwrap_or_else(|| die(NAME, 1, "the Postern mail system is not running"));
            // New daemons would start without the key they cannot read:
            // the running ones keep serving with the one they have. (A
            // master.cf that does not parse is master's to refuse: it
            // keeps its old services.)
            let problems = match cfg.master_services() {
                Ok(services) => crate::secrets::check(NAME, &cfg, &services).keys,
                Err(_) => 0,
            };
            if problems > 0 {
                die(
                    NAME,
                    1,
                    "not reloading: the mail system keeps its running configuration",
                );
            }
            eprintln!("{NAME}: refreshing the Postern mail system");
            signal(pid, nix::sys::signal::Signal::SIGHUP);
            // A changed hash_queue_names or hash_queue_depth: files to
            // their new places, as Postfix's reload runs postsuper
            // (active/ is the running qmgr's; the new one's start-up scan
            // places what is there).
            crate::postsuper::rehash_queue(&cfg, false);
            std::process::exit(EX_OK)
        }
        "status" => match running(&cfg) {
            Some(pid) => {
                eprintln!("{NAME}: the Postern mail system is running: PID: {pid}");
                std::process::exit(EX_OK)
            }
            None => {
                eprintln!("{NAME}: the Postern mail system is not running");
                std::process::exit(1)
            }
        },
        "abort" => abort(&cfg),
        "flush" => flush(&cfg),
        "set-permissions" => crate::upkeep::set_permissions(&cfg),
        "upgrade-configuration" => crate::upkeep::upgrade_configuration(&cfg),
        "logrotate" => crate::upkeep::logrotate(&cfg, running(&cfg)),
        "tls-report" => crate::tls_report::main(&cfg, &extra),
        "queues" | "suspend" | "resume" | "bounce" => {
            crate::sites::main(&cfg, command.as_str(), &extra)
        }
        other => die(
            NAME,
            EX_USAGE,
            format_args!("unknown command: '{other}'. {USAGE}"),
        ),
    }
}

/// Validates the configuration and prepares the queue tree.
fn check(cfg: &Config) {
    for (name, line) in cfg.unknown_parameters() {
        eprintln!(
            "{NAME}: warning: {}/main.cf, line {line}: unused parameter: {name}",
            cfg.dir().display()
        );
    }
    let services = cfg.master_services().unwrap_or_else(|e| die(NAME, 1, e));
    // What would fail or mean something else at run time (crate::gate).
    let found = crate::gate::check(cfg, &services);
    for w in &found.warnings {
        eprintln!("{NAME}: warning: {w}");
    }
    for e in &found.errors {
        eprintln!("{NAME}: error: {e}");
    }
    if !found.errors.is_empty() {
        die(
            NAME,
            1,
            format_args!(
                "{} problem(s) in {}: Postern would not do what this configuration asks",
                found.errors.len(),
                cfg.dir().display()
            ),
        );
    }
    let daemon_dir = PathBuf::from(cfg.get("daemon_directory"));
    for note in services.iter().filter_map(|s| s.note()) {
        eprintln!("{NAME}: {}/{note}", cfg.dir().display());
    }
    let mut commands: Vec<&str> = services.iter().filter_map(|s| s.program()).collect();
    commands.push("master");
    commands.sort();
    commands.dedup();
    for c in commands {
        let p = if c.starts_with('/') {
            PathBuf::from(c)
        } else {
            daemon_dir.join(c)
        };
        if !p.is_file() {
            die(
                NAME,
                1,
                format_args!(
                    "{}: no such program (daemon_directory = {})",
                    p.display(),
                    daemon_dir.display()
                ),
            );
        }
    }
    for t in ["message_size_limit", "default_process_limit", "max_use"] {
        if let Err(e) = cfg.get_u64(t) {
            die(NAME, 1, e);
        }
    }
    for t in [
        "max_idle",
        "ipc_timeout",
        "queue_run_delay",
        "minimal_backoff_time",
        "maximal_backoff_time",
        "maximal_queue_lifetime",
        "smtpd_timeout",
    ] {
        if let Err(e) = cfg.get_time(t) {
            die(NAME, 1, e);
        }
    }
    if let Err(e) = cfg.get_bool("daemon_sched_batch") {
        die(NAME, 1, e);
    }
    if let Err(e) = postern_common::accounting::Format::parse(&cfg.get("accounting_log_format")) {
        die(
            NAME,
            1,
            format_args!("{}/main.cf: {e}", cfg.dir().display()),
        );
    }
    // The status service's clients: a bad entry would stop it at start.
    for item in cfg.get_list("status_access") {
        if let Err(e) = postern_common::cidr::Cidr::parse(&item) {
            die(
                NAME,
                1,
                format_args!("{}/main.cf: status_access: {e}", cfg.dir().display()),
            );
        }
    }
    if let Err(e) = postern_common::queue::Hashing::from_config(cfg) {
        die(
            NAME,
            1,
            format_args!("{}/main.cf: {e}", cfg.dir().display()),
        );
    }
    check_host_names(cfg);
    let owner = privs::queue_owner(cfg).unwrap_or_else(|e| die(NAME, 1, e));
    if let Err(e) = privs::prepare_tree(cfg, owner) {
        die(NAME, 1, e);
    }
}

/// Reports every lookup table main.cf and the `-o` overrides of master.cf
/// name that the daemons could not use: an unknown type, a missing or
/// unreadable file, a Berkeley DB or LMDB file left by Postfix, an index
/// older than its source (each with the command that fixes it), a
/// server table (`mysql:`, `ldap:`, ...) whose configuration file is
/// missing or does not parse. The server itself is not asked (one that
/// is down defers lookups at run time). Returns how many; `check` and
/// `start` stop on any.
fn check_tables(cfg: &Config) -> usize {
    let dir = cfg.dir().display().to_string();
    let mut names = cfg.explicit_names();
    names.push("alias_maps".into());
    names.sort();
    names.dedup();
    let mut problems = Vec::new();
    let mut seen = std::collections::HashSet::new();
    let mut look = |scfg: &Config, name: &str, at: String, problems: &mut Vec<String>| {
        // The restriction classes are lists of restrictions too.
        let classes = scfg.get_list("smtpd_restriction_classes");
        let value = scfg.get(name);
        let specs = if classes.iter().any(|c| c == name) {
            table_specs("smtpd_class_restrictions", &value)
        } else {
            table_specs(name, &value)
        };
        for spec in specs {
            if !seen.insert(spec.clone()) {
                continue;
            }
            let builder = if name.starts_with("alias_") {
                "postalias"
            } else {
                "postmap"
            };
            if let Err(e) = postern_common::maps::check_spec(&spec, builder) {
                problems.push(format!("{at}{name}: {e}"));
            }
            // Every value must be a policy qmgr understands.
            if name == "delivery_policy_maps" || name == "delivery_reply_rules" {
                for (place, value) in postern_common::delivery_policy::table_values(&spec) {
                    let parsed = if name == "delivery_policy_maps" {
                        postern_common::delivery_policy::Policy::parse(&value).map(|_| ())
                    } else {
                        postern_common::delivery_policy::ReplyRule::parse(&value).map(|_| ())
                    };
                    if let Err(e) = parsed {
                        problems.push(format!("{at}{name}: {place}: {e}"));
                    }
                }
            }
        }
    };
    for name in names {
        let at = match cfg.main_cf_line(&name) {
            Some(l) => format!("{dir}/main.cf, line {l}: "),
            None => format!("{dir}/main.cf: "),
        };
        look(cfg, &name, at, &mut problems);
    }
    // Each service's `-o` overrides, with that service's view of main.cf.
    if let Ok(services) = cfg.master_services() {
        for s in services.iter().filter(|s| !s.overrides.is_empty()) {
            let mut scfg = cfg.clone();
            scfg.set_overrides(s.overrides.clone());
            for (name, _) in &s.overrides {
                let at = format!(
                    "{dir}/master.cf, line {}: service {}/{}: -o ",
                    s.line,
                    s.name,
                    s.kind.word()
                );
                look(&scfg, name, at, &mut problems);
            }
        }
    }
    for p in &problems {
        eprintln!("{NAME}: error: {p}");
    }
    problems.len()
}

/// The `type:name` tables in the value of parameter `name`: every item
/// of a table parameter (`*_maps`, `*_checks`), the table items of a
/// domain list, the arguments of `check_*_access` in a restriction list.
fn table_specs(name: &str, value: &str) -> Vec<String> {
    // Postfix's TLS session caches (`btree:${data_directory}/smtpd_scache`)
    // are tlsmgr's, which Postern does not have: never opened.
    if name.ends_with("_tls_session_cache_database") {
        return Vec::new();
    }
    // The smtp client's secret tables are checked per service, with its
    // `-o` overrides, and only where they are used (crate::secrets).
    if name.ends_with("_sasl_password_maps") || name.ends_with("_tls_policy_maps") {
        return Vec::new();
    }
    // proxymap's lists name tables that their own parameters use.
    if name == "proxy_read_maps" || name == "proxy_write_maps" {
        return Vec::new();
    }
    let items = postern_common::maps::split_specs(value);
    let is_table = |i: &str| {
        matches!(i.split_once(':'), Some((kind, _))
            if !kind.is_empty() && kind.bytes().all(|b| b.is_ascii_alphanumeric()))
    };
    if name.ends_with("_maps") || name.ends_with("_checks") || name == "delivery_reply_rules" {
        // `$other_maps` expanded may bring names along (a list that
        // also holds domains): tables are opened, and a file name without
        // its type is reported (Postfix wants type:name).
        items
            .into_iter()
            .filter(|i| is_table(i) || i.starts_with('/'))
            .collect()
    } else if name.ends_with("_domains") || name == "mydestination" {
        items.into_iter().filter(|i| is_table(i)).collect()
    } else if name.ends_with("_restrictions") || name.ends_with("_restriction_classes") {
        items
            .windows(2)
            .filter(|w| {
                let r = w[0].to_ascii_lowercase();
                r.starts_with("check_") && r.ends_with("_access") && is_table(&w[1])
            })
            .map(|w| w[1].clone())
            .collect()
    } else {
        Vec::new()
    }
}

/// Reports problems with the keys and secret tables the daemons read
/// (crate::secrets); returns how many.
fn check_secrets(cfg: &Config) -> crate::secrets::Problems {
    let services = cfg.master_services().unwrap_or_else(|e| die(NAME, 1, e));
    crate::secrets::check(NAME, cfg, &services)
}

/// The names Postern gives itself must be host names (Postfix refuses
/// to start with a bad `myhostname`; a bad `smtp_helo_name` makes strict
/// receivers refuse every delivery).
fn check_host_names(cfg: &Config) {
    let myhostname = cfg.get("myhostname");
    if !hostname::valid_hostname(&myhostname) {
        die(
            NAME,
            1,
            format_args!(
                "{}/main.cf: bad parameter value: myhostname = {myhostname}",
                cfg.dir().display()
            ),
        );
    }
    for p in ["smtp_helo_name", "lmtp_lhlo_name"] {
        let v = cfg.get(p);
        if !hostname::valid_hostname(&v) && !hostname::valid_address_literal(&v) {
            eprintln!(
                "{NAME}: warning: {}/main.cf: {p} = {v} is not a valid host name or address literal",
                cfg.dir().display()
            );
        }
    }
}

fn pid_file(cfg: &Config) -> PathBuf {
    PathBuf::from(cfg.get("queue_directory"))
        .join("pid")
        .join("master.pid")
}

/// master's pid when it runs: its pid file is locked.
fn running(cfg: &Config) -> Option<i32> {
    let mut f = std::fs::File::open(pid_file(cfg)).ok()?;
    let mut s = String::new();
    f.read_to_string(&mut s).ok()?;
    // A shared lock conflicts with master's exclusive one; ours goes
    // when it is dropped.
    use nix::fcntl::{Flock, FlockArg};
    if Flock::lock(f, FlockArg::LockSharedNonblock).is_ok() {
        return None;
    }
    s.trim().parse().ok()
}

/// Sends `sig` to master, whose pid was read from its locked pid file.
fn signal(pid: i32, sig: nix::sys::signal::Signal) {
    if let Err(e) = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), sig) {
        die(
            NAME,
            1,
            format_args!("signal master (pid {pid}): {}", std::io::Error::from(e)),
        );
    }
}

fn start(cfg: &Config, foreground: bool) -> ! {
    if let Some(pid) = running(cfg) {
        die(
            NAME,
            1,
            format_args!("the Postern mail system is already running (pid {pid})"),
        );
    }
    // Tables first, so that every one is named even when the gate stops.
    let tables = check_tables(cfg);
    check(cfg);
    // A key smtpd cannot use would mean a mail system without STARTTLS
    // (and with `encrypt`, without mail); a file table that cannot be
    // opened (or a server table whose configuration file cannot be read)
    // would defer, or refuse, the mail that needs it from the first
    // message on: not started (the rule is in ARCHITECTURE.md, "Tables
    // that cannot be opened"). A server that does not answer is no
    // reason: its table is opened without connecting, and its lookups
    // defer until it answers.
    let secrets = check_secrets(cfg);
    if secrets.total() + tables > 0 {
        die(
            NAME,
            1,
            format_args!(
                "{} table(s) or key(s) above cannot be used: not starting the Postern mail system",
                secrets.total() + tables
            ),
        );
    }
    // A new TLS session ticket secret for this run of the mail system,
    // as Postfix's tlsmgr makes new ticket keys when it starts.
    let tickets = postern_common::tls_tickets::secret_path(cfg);
    if let Err(e) = postern_common::tls_tickets::renew_secret(&tickets) {
        eprintln!("{NAME}: warning: TLS session ticket key {e}");
    }
    // As Postfix's start runs postsuper: every queue file where the
    // hashing wants it before anything reads the queue.
    crate::postsuper::rehash_queue(cfg, true);
    let master = PathBuf::from(cfg.get("daemon_directory")).join("master");
    let mut cmd = std::process::Command::new(&master);
    cmd.arg("-c").arg(cfg.dir());
    if foreground {
        cmd.arg("-d");
        let e = cmd.exec();
        die(
            NAME,
            EX_OSERR,
            format_args!("exec {}: {e}", master.display()),
        );
    }
    eprintln!("{NAME}: starting the Postern mail system");
    match cmd.status() {
        Ok(s) if s.success() => std::process::exit(EX_OK),
        Ok(s) => die(NAME, 1, format_args!("mail system startup failed ({s})")),
        Err(e) => die(
            NAME,
            EX_OSERR,
            format_args!("run {}: {e}", master.display()),
        ),
    }
}

fn stop(cfg: &Config) -> ! {
    let pid =
        running(cfg).unwrap_or_else(|| die(NAME, 1, "the Postern mail system is not running"));
    eprintln!("{NAME}: stopping the Postern mail system");
    signal(pid, nix::sys::signal::Signal::SIGTERM);
    // master stops its children first; wait until its lock is free.
    let deadline = Instant::now() + Duration::from_secs(60);
    while running(cfg).is_some() {
        if Instant::now() > deadline {
            die(
                NAME,
                1,
                format_args!("master (pid {pid}) did not stop within 60 s"),
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    std::process::exit(EX_OK)
}

/// `postern flush`: as `postqueue -f` (Postfix's postfix-script runs it).
fn flush(cfg: &Config) -> ! {
    let queue = PathBuf::from(cfg.get("queue_directory"));
    if !queue.is_dir() {
        die(
            NAME,
            1,
            format_args!("no Postern queue directory {}!", queue.display()),
        );
    }
    let postqueue = PathBuf::from(cfg.get("command_directory")).join("postqueue");
    let e = std::process::Command::new(&postqueue)
        .arg("-c")
        .arg(cfg.dir())
        .arg("-f")
        .exec();
    die(
        NAME,
        EX_OSERR,
        format_args!("exec {}: {e}", postqueue.display()),
    )
}

/// `postern abort`: stops everything now (see the module doc).
fn abort(cfg: &Config) -> ! {
    use nix::sys::signal::Signal;
    let pid =
        running(cfg).unwrap_or_else(|| die(NAME, 1, "the Postern mail system is not running"));
    eprintln!("{NAME}: aborting the Postern mail system");
    let master = nix::unistd::Pid::from_raw(pid);
    // master leads its own process group (it detaches with setsid, and
    // start-fg runs it as a session leader too); its children are in it.
    let group = nix::unistd::getpgid(Some(master))
        .ok()
        .filter(|g| *g == master);
    let kill = |sig: Signal| match group {
        Some(g) => nix::sys::signal::killpg(g, sig),
        None => nix::sys::signal::kill(master, sig),
    };
    if let Err(e) = kill(Signal::SIGTERM) {
        die(
            NAME,
            1,
            format_args!("signal master (pid {pid}): {}", std::io::Error::from(e)),
        );
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while running(cfg).is_some() {
        if Instant::now() > deadline {
            eprintln!("{NAME}: warning: stopping the Postern mail system with force");
            let _ = kill(Signal::SIGKILL);
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    std::process::exit(EX_OK)
}
