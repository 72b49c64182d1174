//! anvil's event loop: the listener master passed on fd 3, one
//! connection per smtpd process, and the protocol of
//! [`AnvilRequest`]/[`AnvilReply`] over each.
//!
//! Every connection is an owner in the [`Table`]: the sessions it
//! registered stop counting when it closes (its smtpd exited or died).
//! anvil tells master once that it worked and is available, so that
//! master never starts a second one for the same listener (the service
//! has one process) and does not throttle the service when anvil is
//! killed. It exits after `max_idle` without any connection, logging its
//! statistics, and logs them every `anvil_status_update_time`.

use crate::stats::Stats;
use mio::net::{UnixListener, UnixStream};
use mio::{Events, Interest, Poll, Token};
use postern_common::anvil::{Event, Table};
use postern_common::ipc::{self, AnvilReply, AnvilRequest, ANVIL_MAX_MESSAGE};
use postern_common::poll::WriteInterest;
use postern_common::service::Status;
use postern_common::{fatal, warning};
use postern_conf::Config;
use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::time::{Duration, Instant};

const LISTENER: Token = Token(0);
const SIGNALS: Token = Token(1);
/// A client that does not read its replies is cut off past this.
const OUT_LIMIT: usize = 1 << 20;

struct Conn {
    sock: UnixStream,
    owner: u64,
    inbuf: Vec<u8>,
    out: Vec<u8>,
    /// WRITABLE only while replies wait for room.
    writable: WriteInterest,
}

/// What one request does to the table; the reply, if it has one. Also
/// feeds the statistics.
pub fn handle(
    table: &mut Table,
    stats: &mut Stats,
    owner: u64,
    req: AnvilRequest,
    now: Instant,
) -> Option<AnvilReply> {
    let rate = |table: &mut Table, stats: &mut Stats, ident: &str, e: Event| {
        let r = table.event(ident, e, now);
        stats.rate(e, r, ident);
        Some(AnvilReply::Rate(r))
    };
    let reply = match req {
        AnvilRequest::Connect(ident) => {
            let (count, rate) = table.connect(owner, &ident, now);
            stats.count(count, &ident);
            stats.rate(Event::Connection, rate, &ident);
            Some(AnvilReply::Count { count, rate })
        }
        AnvilRequest::Disconnect(ident) => {
            table.disconnect(owner, &ident);
            None
        }
        AnvilRequest::Message(ident) => rate(table, stats, &ident, Event::Message),
        AnvilRequest::Recipient(ident) => rate(table, stats, &ident, Event::Recipient),
        AnvilRequest::Auth(ident) => rate(table, stats, &ident, Event::Auth),
        AnvilRequest::Sessions { ident, count } => {
            table.add_sessions(owner, &ident, count);
            None
        }
    };
    stats.cache(table.len());
    reply
}

/// Takes whole requests off `inbuf` and answers them into `out`.
/// Err: the client sent something that is not our protocol.
fn serve(table: &mut Table, stats: &mut Stats, c: &mut Conn, now: Instant) -> Result<(), String> {
    let mut pos = 0;
    loop {
        let taken = ipc::take_frame::<AnvilRequest>(&c.inbuf[pos..], ANVIL_MAX_MESSAGE);
        let Some((req, used)) = taken.map_err(|e| e.to_string())? else {
            break;
        };
        pos += used;
        if let Some(reply) = handle(table, stats, c.owner, req, now) {
            // Writing into a Vec cannot fail.
            let _ = ipc::send(&mut c.out, &reply);
        }
    }
    c.inbuf.drain(..pos);
    Ok(())
}

/// Writes what is pending; Err when the connection is broken.
fn flush(c: &mut Conn) -> io::Result<()> {
    while !c.out.is_empty() {
        match c.sock.write(&c.out) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => {
                c.out.drain(..n);
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    if c.out.len() > OUT_LIMIT {
        return Err(io::Error::other("client does not read its replies"));
    }
    Ok(())
}

/// Reads what there is; Ok(false) at end of file.
fn fill(c: &mut Conn, buf: &mut [u8]) -> io::Result<bool> {
    loop {
        match c.sock.read(buf) {
            Ok(0) => return Ok(false),
            Ok(n) => c.inbuf.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(true),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

fn signal_pipe(poll: &Poll) -> io::Result<UnixStream> {
    let (r, w) = std::os::unix::net::UnixStream::pair()?;
    r.set_nonblocking(true)?;
    w.set_nonblocking(true)?;
    // On reload as on stop: anvil's counts live in its clients' sessions,
    // which report again to the new process.
    signal_hook::low_level::pipe::register(postern_common::service::DRAIN_SIGNAL, w.try_clone()?)?;
    signal_hook::low_level::pipe::register(libc::SIGTERM, w)?;
    let mut r = UnixStream::from_std(r);
    poll.registry()
        .register(&mut r, SIGNALS, Interest::READABLE)?;
    Ok(r)
}

/// The listener master passed, registered with `poll`.
fn listen(poll: &Poll) -> UnixListener {
    let std_listener = match postern_common::service::unix_listener() {
        Ok(l) => l,
        Err(e) => fatal!("no listener from master: {e}"),
    };
    let mut listener = UnixListener::from_std(std_listener);
    if let Err(e) = poll
        .registry()
        .register(&mut listener, LISTENER, Interest::READABLE)
    {
        fatal!("register listener: {e}");
    }
    listener
}

/// The connected clients, by their poll token.
struct Clients {
    conns: HashMap<Token, Conn>,
    next_token: usize,
    /// Each connection is a separate owner of the sessions it reports.
    next_owner: u64,
}

impl Clients {
    /// Accepts every waiting connection, and puts its token on `touched`.
    fn accept_all(&mut self, listener: &UnixListener, poll: &Poll, touched: &mut Vec<Token>) {
        loop {
            match listener.accept() {
                Ok((mut sock, _)) => {
                    let token = Token(self.next_token);
                    self.next_token += 1;
                    if let Err(e) = poll
                        .registry()
                        .register(&mut sock, token, Interest::READABLE)
                    {
                        warning!("register connection: {e}");
                        continue;
                    }
                    self.conns.insert(
                        token,
                        Conn {
                            sock,
                            owner: self.next_owner,
                            inbuf: Vec::new(),
                            out: Vec::new(),
                            writable: WriteInterest::default(),
                        },
                    );
                    self.next_owner += 1;
                    touched.push(token);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::Interrupted | io::ErrorKind::ConnectionAborted
                    ) => {}
                Err(e) => {
                    warning!("accept: {e}");
                    break;
                }
            }
        }
    }
}

/// Serves until idle for `max_idle` or SIGTERM. Never returns.
pub fn run(cfg: &Config) -> ! {
    let get = |name: &str, default: u64| match cfg.get_time(name) {
        Ok(v) => v.max(1),
        Err(e) => {
            warning!("{name}: {e}; using {default}s");
            default
        }
    };
    let unit = get("anvil_rate_time_unit", 60);
    let stat_time = Duration::from_secs(get("anvil_status_update_time", 600));
    let max_idle = Duration::from_secs(get("max_idle", 100));
    let mut poll = match Poll::new() {
        Ok(p) => p,
        Err(e) => fatal!("poll: {e}"),
    };
    let listener = listen(&poll);
    let _signals = match signal_pipe(&poll) {
        Ok(s) => s,
        Err(e) => fatal!("signal handler: {e}"),
    };
    // Worked (no throttling if killed), and free (no second process).
    let mut status = Status::new();
    status.took_work();

    let mut table = Table::new(Duration::from_secs(unit));
    let mut stats = Stats::default();
    let mut clients = Clients {
        conns: HashMap::new(),
        next_token: 2,
        next_owner: 1,
    };
    let mut idle_since = Instant::now();
    let mut next_stat = Instant::now() + stat_time;
    let mut events = Events::with_capacity(256);
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let now = Instant::now();
        let mut timeout = next_stat.saturating_duration_since(now);
        if clients.conns.is_empty() {
            timeout = timeout.min(max_idle.saturating_sub(idle_since.elapsed()));
        }
        if let Err(e) = poll.poll(&mut events, Some(timeout)) {
            if e.kind() != io::ErrorKind::Interrupted {
                fatal!("poll: {e}");
            }
            continue;
        }
        let now = Instant::now();
        let mut touched = Vec::new();
        for ev in events.iter() {
            match ev.token() {
                SIGNALS => {
                    stats.log(unit);
                    std::process::exit(0);
                }
                LISTENER => clients.accept_all(&listener, &poll, &mut touched),
                t => touched.push(t),
            }
        }
        for t in touched {
            let Some(c) = clients.conns.get_mut(&t) else {
                continue;
            };
            let outcome = fill(c, &mut buf)
                .map_err(|e| Some(e.to_string()))
                .and_then(|open| {
                    serve(&mut table, &mut stats, c, now).map_err(Some)?;
                    flush(c).map_err(|e| Some(e.to_string()))?;
                    let pending = !c.out.is_empty();
                    c.writable
                        .fit(poll.registry(), &mut c.sock, t, pending)
                        .map_err(|e| Some(e.to_string()))?;
                    if open {
                        Ok(())
                    } else {
                        Err(None)
                    }
                });
            if let Err(why) = outcome {
                if let Some(why) = why {
                    warning!("closing a client connection: {why}");
                }
                if let Some(mut c) = clients.conns.remove(&t) {
                    let _ = poll.registry().deregister(&mut c.sock);
                    table.drop_owner(c.owner);
                }
                if clients.conns.is_empty() {
                    idle_since = Instant::now();
                }
            }
        }
        if Instant::now() >= next_stat {
            stats.log(unit);
            next_stat = Instant::now() + stat_time;
        }
        if clients.conns.is_empty() && idle_since.elapsed() >= max_idle {
            stats.log(unit);
            std::process::exit(0);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn protocol() {
        let mut table = Table::new(Duration::from_secs(60));
        let mut stats = Stats::default();
        let now = Instant::now();
        let ident = "smtp:192.0.2.1".to_string();
        let mut h = |owner, req| handle(&mut table, &mut stats, owner, req, now);
        assert_eq!(
            h(1, AnvilRequest::Connect(ident.clone())),
            Some(AnvilReply::Count { count: 1, rate: 1 })
        );
        assert_eq!(
            h(2, AnvilRequest::Connect(ident.clone())),
            Some(AnvilReply::Count { count: 2, rate: 2 })
        );
        assert_eq!(h(2, AnvilRequest::Disconnect(ident.clone())), None);
        assert_eq!(
            h(
                3,
                AnvilRequest::Sessions {
                    ident: ident.clone(),
                    count: 2
                }
            ),
            None
        );
        assert_eq!(
            h(1, AnvilRequest::Connect(ident.clone())),
            Some(AnvilReply::Count { count: 4, rate: 3 })
        );
        assert_eq!(
            h(1, AnvilRequest::Message(ident.clone())),
            Some(AnvilReply::Rate(1))
        );
        assert_eq!(
            h(1, AnvilRequest::Recipient(ident.clone())),
            Some(AnvilReply::Rate(1))
        );
        assert_eq!(
            h(1, AnvilRequest::Auth(ident.clone())),
            Some(AnvilReply::Rate(1))
        );
        assert_eq!(h(1, AnvilRequest::Auth(ident)), Some(AnvilReply::Rate(2)));
    }

    #[test]
    fn framing_in_pieces_and_garbage() {
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        let mut c = Conn {
            sock: UnixStream::from_std(a),
            owner: 1,
            inbuf: Vec::new(),
            out: Vec::new(),
            writable: WriteInterest::default(),
        };
        let mut table = Table::new(Duration::from_secs(60));
        let mut stats = Stats::default();
        let mut bytes = Vec::new();
        ipc::send(&mut bytes, &AnvilRequest::Connect("x".into())).unwrap();
        ipc::send(&mut bytes, &AnvilRequest::Message("x".into())).unwrap();
        for b in bytes {
            c.inbuf.push(b);
            serve(&mut table, &mut stats, &mut c, Instant::now()).unwrap();
        }
        let mut r = &c.out[..];
        assert_eq!(
            ipc::recv::<_, AnvilReply>(&mut r).unwrap(),
            AnvilReply::Count { count: 1, rate: 1 }
        );
        assert_eq!(
            ipc::recv::<_, AnvilReply>(&mut r).unwrap(),
            AnvilReply::Rate(1)
        );
        c.inbuf = (ANVIL_MAX_MESSAGE + 1).to_le_bytes().to_vec();
        assert!(serve(&mut table, &mut stats, &mut c, Instant::now()).is_err());
        c.inbuf = vec![2, 0, 0, 0, 0xff, 0xff];
        assert!(serve(&mut table, &mut stats, &mut c, Instant::now()).is_err());
    }
}
