//! postkick: sends a request to a Postern service over its local socket,
//! as Postfix's postkick(1), so that shell scripts can wake a trigger
//! service.
//!
//! `postkick [-c config_dir] [-v] class service request`: `class` is
//! `public` or `private` (the socket directory under `queue_directory`),
//! `service` the socket's name, `request` the bytes sent as they are.
//! Postern's trigger services are `public/qmgr` (`I` scan incoming, `D`
//! scan deferred, `W` wake up, `F` flush: deliver all deferred mail now)
//! and `public/pickup` (`W`: read `maildrop/`), as Postfix's qmgr(8) and
//! pickup(8). postkick waits until the service has read the request, at
//! most `application_event_drain_time` (100 s).

use crate::die;
use crate::sysexits::*;
use postern_common::queue::QueueTree;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::Duration;

const NAME: &str = "postkick";

fn usage() -> ! {
    die(
        NAME,
        EX_USAGE,
        "usage: postkick [-c config_dir] [-v] class service request",
    )
}

pub fn main() -> ! {
    let mut config: Option<PathBuf> = None;
    let mut words: Vec<String> = Vec::new();
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "-c" => config = Some(args.next().unwrap_or_else(|| usage()).into()),
            "-v" => {}
            "--" => words.extend(args.by_ref()),
            s if s.starts_with("-c") && s.len() > 2 => config = Some(s[2..].into()),
            s if s.starts_with('-') && s.len() > 1 => usage(),
            _ => words.push(a),
        }
    }
    let [class, service, request] = words.as_slice() else {
        usage()
    };
    let cfg = crate::load_config(NAME, config.as_deref());
    let private = match class.as_str() {
        "public" => false,
        "private" => true,
        other => die(
            NAME,
            EX_USAGE,
            format_args!("unknown class: {other} (public or private)"),
        ),
    };
    if service.contains('/') || service.is_empty() {
        die(NAME, EX_USAGE, format_args!("bad service name: {service}"));
    }
    let tree = QueueTree::new(cfg.get("queue_directory"));
    let drain = cfg
        .get_time("application_event_drain_time")
        .unwrap_or(100)
        .max(1);
    let down = || -> ! {
        die(
            NAME,
            EX_UNAVAILABLE,
            format_args!(
                "Cannot contact class {class} service {service} - perhaps the mail system is down"
            ),
        )
    };
    let Ok(mut s) = UnixStream::connect(tree.socket(private, service)) else {
        down()
    };
    let timeout = Some(Duration::from_secs(drain));
    let _ = s.set_write_timeout(timeout);
    let _ = s.set_read_timeout(timeout);
    if s.write_all(request.as_bytes()).is_err() {
        down()
    }
    // The service closes the connection once it has read the request.
    let _ = s.shutdown(std::net::Shutdown::Write);
    let mut sink = [0u8; 64];
    let _ = s.read(&mut sink);
    std::process::exit(EX_OK)
}
