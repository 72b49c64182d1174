//! `postern queues [-j]`, `postern suspend [-s SOURCE] SITE|DOMAIN
//! [DURATION]`, `postern resume [-s SOURCE] SITE|DOMAIN`, `postern
//! bounce DOMAIN [REASON]`: the
//! operator's view of qmgr's sites (`delivery_policy_maps`), asked over
//! qmgr's admin socket `private/qmgr-admin` (root or `mail_owner`). qmgr
//! logs each action; this command prints qmgr's answer.

use crate::die;
use crate::sysexits::{EX_OK, EX_UNAVAILABLE, EX_USAGE};
use postern_common::ipc::{self, AdminReply, AdminRequest};
use postern_common::queue::QueueTree;
use postern_conf::Config;
use std::time::Duration;

const NAME: &str = "postern";

/// A suspension without a duration lasts an hour.
pub const DEFAULT_SUSPEND: u64 = 3600;
/// A bounce without a duration covers new mail for five minutes
/// (KumoMTA's default for an admin bounce).
pub const DEFAULT_BOUNCE: u64 = 300;

fn duration(s: &str) -> u64 {
    postern_conf::parse_time(s)
        .unwrap_or_else(|| die(NAME, EX_USAGE, format_args!("bad duration \"{s}\"")))
}

/// The request for `command` with its arguments.
pub fn request(command: &str, args: &[String]) -> AdminRequest {
    let usage = |u: &str| -> ! { die(NAME, EX_USAGE, format_args!("usage: postern {u}")) };
    // `-s SOURCE`: one source's state for the site (suspend, resume).
    let (source, args) = match args {
        [s, src, rest @ ..] if s == "-s" && (command == "suspend" || command == "resume") => {
            (src.clone(), rest)
        }
        _ => (String::new(), args),
    };
    match command {
        "queues" => match args {
            [] => AdminRequest::Sites { json: false },
            [j] if j == "-j" => AdminRequest::Sites { json: true },
            _ => usage("queues [-j]"),
        },
        "suspend" => match args {
            [site] => AdminRequest::Suspend {
                site: site.clone(),
                seconds: DEFAULT_SUSPEND,
                reason: "suspended by the administrator".into(),
                source,
            },
            [site, d, rest @ ..] => AdminRequest::Suspend {
                site: site.clone(),
                source,
                seconds: duration(d),
                reason: if rest.is_empty() {
                    "suspended by the administrator".into()
                } else {
                    rest.join(" ")
                },
            },
            _ => usage("suspend [-s SOURCE] SITE|DOMAIN [DURATION [REASON]]"),
        },
        "resume" => match args {
            [site] => AdminRequest::Resume {
                site: site.clone(),
                source,
            },
            _ => usage("resume [-s SOURCE] SITE|DOMAIN"),
        },
        "bounce" => match args {
            [domain, rest @ ..] => AdminRequest::Bounce {
                domain: domain.clone(),
                seconds: DEFAULT_BOUNCE,
                reason: if rest.is_empty() {
                    "bounced by the administrator".into()
                } else {
                    rest.join(" ")
                },
            },
            _ => usage("bounce DOMAIN [REASON]"),
        },
        _ => usage("queues|suspend|resume|bounce"),
    }
}

/// How long a command waits for qmgr's admin socket while qmgr restarts.
const QMGR_RESTART_WAIT: Duration = Duration::from_secs(10);

pub fn main(cfg: &Config, command: &str, args: &[String]) -> ! {
    let req = request(command, args);
    let tree = QueueTree::configured(cfg.get("queue_directory"), cfg);
    let path = tree.socket(true, ipc::QMGR_ADMIN_SOCKET);
    // Right after `postern reload` master is starting a new qmgr, which
    // binds the socket anew: a refused or missing socket is waited for a
    // little, as the operator would otherwise have to retry by hand.
    let deadline = std::time::Instant::now() + QMGR_RESTART_WAIT;
    let mut s = loop {
        match ipc::connect(&path, Duration::from_secs(30)) {
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::ConnectionRefused | std::io::ErrorKind::NotFound
                ) && std::time::Instant::now() < deadline =>
            {
                std::thread::sleep(Duration::from_millis(100));
            }
            r => break r,
        }
    }
    .unwrap_or_else(|e| {
        die(
            NAME,
            EX_UNAVAILABLE,
            format_args!("cannot reach the queue manager at {}: {e}", path.display()),
        )
    });
    let reply: AdminReply = ipc::send(&mut s, &req)
        .and_then(|()| ipc::recv(&mut s))
        .unwrap_or_else(|e| {
            die(
                NAME,
                EX_UNAVAILABLE,
                format_args!("no answer from the queue manager: {e}"),
            )
        });
    if matches!(req, AdminRequest::Sites { .. }) {
        print!("{}", reply.text);
    } else if reply.ok {
        eprintln!("{NAME}: {}", reply.text);
    } else {
        die(NAME, 1, reply.text);
    }
    std::process::exit(EX_OK)
}
