//! Creating the listening sockets of master.cf's services.
//!
//! inet services get TCP listeners on `inet_interfaces` (or the host in
//! the service name); unix and fifo services get a Unix stream socket in
//! `queue_directory/private` or `public`. Every descriptor is close-on-exec:
//! a child gets exactly its own listener, moved to fd 3 at spawn time.

use nix::sys::socket::{self, sockopt, AddressFamily, SockFlag, SockType, SockaddrIn, SockaddrIn6};
use postern_conf::master_cf::{Service, ServiceType};
use postern_conf::Config;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixListener;
use std::path::PathBuf;

/// A service's listening socket(s).
pub struct Listener {
    pub fds: Vec<OwnedFd>,
    /// The socket file of a unix service, removed at shutdown.
    pub path: Option<PathBuf>,
}

/// Port of a well-known service name, or the number itself.
fn port_of(s: &str) -> Result<u16, String> {
    match s {
        "smtp" => Ok(25),
        "submission" => Ok(587),
        "smtps" | "submissions" => Ok(465),
        "lmtp" => Ok(24),
        _ => s
            .parse()
            .map_err(|_| format!("unknown service port \"{s}\"")),
    }
}

/// `v6only` = false makes an IPv6 wildcard socket take IPv4 clients too
/// (as IPv4-mapped addresses, which smtpd maps back).
fn tcp_listen(addr: SocketAddr, v6only: bool) -> Result<OwnedFd, String> {
    let family = if addr.is_ipv4() {
        AddressFamily::Inet
    } else {
        AddressFamily::Inet6
    };
    let fd = socket::socket(family, SockType::Stream, SockFlag::SOCK_CLOEXEC, None)
        .map_err(|e| format!("socket: {e}"))?;
    socket::setsockopt(&fd, sockopt::ReuseAddr, &true).map_err(|e| format!("SO_REUSEADDR: {e}"))?;
    let res = match addr {
        SocketAddr::V4(a) => socket::bind(fd.as_raw_fd(), &SockaddrIn::from(a)),
        SocketAddr::V6(a) => {
            socket::setsockopt(&fd, sockopt::Ipv6V6Only, &v6only)
                .map_err(|e| format!("IPV6_V6ONLY: {e}"))?;
            socket::bind(fd.as_raw_fd(), &SockaddrIn6::from(a))
        }
    };
    // Daemons of a master that was just killed may hold the port for a
    // moment while they exit: retry for a few seconds before giving up.
    let mut res = res;
    for _ in 0..50 {
        if res != Err(nix::errno::Errno::EADDRINUSE) {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
        res = match addr {
            SocketAddr::V4(a) => socket::bind(fd.as_raw_fd(), &SockaddrIn::from(a)),
            SocketAddr::V6(a) => socket::bind(fd.as_raw_fd(), &SockaddrIn6::from(a)),
        };
    }
    res.map_err(|e| format!("bind {addr}: {e}"))?;
    socket::listen(&fd, socket::Backlog::new(128).unwrap())
        .map_err(|e| format!("listen {addr}: {e}"))?;
    Ok(fd)
}

/// Addresses to listen on for an inet service.
fn inet_addresses(cfg: &Config, svc: &Service) -> Result<Vec<SocketAddr>, String> {
    let (host, port) = svc.inet_address();
    let port = port_of(&port)?;
    let hosts: Vec<String> = match host {
        Some(h) => vec![h],
        None => cfg.get_list("inet_interfaces"),
    };
    let protocols = cfg.get("inet_protocols");
    let want4 = protocols.contains("all") || protocols.contains("ipv4");
    let want6 = protocols.contains("all") || protocols.contains("ipv6");
    let mut out = Vec::new();
    for h in hosts {
        match h.as_str() {
            // Both families on one dual-stack socket (see `open`).
            "all" if want6 => out.push(SocketAddr::new(IpAddr::V6(Ipv6Addr::UNSPECIFIED), port)),
            "all" => out.push(SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), port)),
            "loopback-only" | "localhost" => {
                if want4 {
                    out.push(SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port));
                }
                if want6 {
                    out.push(SocketAddr::new(IpAddr::V6(Ipv6Addr::LOCALHOST), port));
                }
            }
            h => {
                let ip: IpAddr = h
                    .trim_start_matches('[')
                    .trim_end_matches(']')
                    .parse()
                    .map_err(|_| format!("service {}: bad address \"{h}\"", svc.name))?;
                out.push(SocketAddr::new(ip, port));
            }
        }
    }
    Ok(out)
}

/// Creates the listener of one service. `owner` (uid, gid) is given
/// when master runs as root: sockets then belong to mail_owner.
pub fn open(cfg: &Config, svc: &Service, owner: Option<(u32, u32)>) -> Result<Listener, String> {
    match svc.kind {
        ServiceType::Inet => {
            let addrs = inet_addresses(cfg, svc)?;
            let want4 = {
                let p = cfg.get("inet_protocols");
                p.contains("all") || p.contains("ipv4")
            };
            let mut fds = Vec::new();
            for a in &addrs {
                let wildcard6 = a.is_ipv6() && a.ip().is_unspecified();
                match tcp_listen(*a, !(wildcard6 && want4)) {
                    Ok(fd) => fds.push(fd),
                    // A host without IPv6: the IPv4 wildcard does the job.
                    Err(_) if wildcard6 && want4 => {
                        let v4 = SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), a.port());
                        fds.push(tcp_listen(v4, true)?);
                    }
                    Err(e) => return Err(e),
                }
            }
            Ok(Listener { fds, path: None })
        }
        // A pass service (postscreen's hand-off to smtpd) is a Unix
        // socket too: what comes over it is descriptors.
        ServiceType::Unix | ServiceType::Fifo | ServiceType::Pass => {
            let tree = postern_common::queue::QueueTree::new(cfg.get("queue_directory"));
            let path = tree.socket(svc.private, &svc.name);
            let _ = std::fs::remove_file(&path);
            let l =
                UnixListener::bind(&path).map_err(|e| format!("bind {}: {e}", path.display()))?;
            // Access is controlled by the directory: private/ is for
            // mail_owner only, public/ for mail_owner and setgid_group.
            let _ = std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o666));
            if let Some((uid, gid)) = owner {
                let _ = std::os::unix::fs::chown(&path, Some(uid), Some(gid));
            }
            Ok(Listener {
                fds: vec![OwnedFd::from(l)],
                path: Some(path),
            })
        }
        // Never run (`master_cf::runnable` leaves them out).
        ServiceType::UnixDgram => Err(format!(
            "service {}: type {} is not served",
            svc.name,
            svc.kind.word()
        )),
    }
}
