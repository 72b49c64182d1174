//! `sendmail -bv`: what would happen to each recipient, without sending.
//!
//! Prints one line per recipient on standard output, as the address
//! classes of Postfix's trivial-rewrite and local(8) see it:
//! `<addr>: deliverable: local mailbox of USER`, `... alias: VALUE`,
//! `... via TRANSPORT to NEXTHOP`, or `<addr>: undeliverable: REASON`.
//! Postfix mails this report to the sender; Postern prints it (and exits
//! 0 when every recipient is deliverable, 67 (EX_NOUSER) otherwise), so
//! that a shell user or script sees it at once. Classes, transports and
//! next hops come from the one resolver (`postern_common::resolve`), as
//! qmgr and smtpd see them. With `-v`, a second line per address gives
//! the resolver's raw answer and smtpd's recipient verdict.

use crate::die;
use crate::sysexits::*;
use postern_common::addr;
use postern_common::maps::Tables;
use postern_common::resolve::{dsn_split, Class, Resolver};
use postern_conf::Config;

/// Where one address goes, as a line of the report.
pub fn describe(cfg: &Config, resolver: &Resolver, address: &str) -> (bool, String) {
    let address = addr::qualify(address, &cfg.get("myorigin"));
    match resolver.virtual_alias(&address) {
        Ok(Some(v)) => {
            return (
                true,
                format!("<{address}>: deliverable: virtual alias: {v}"),
            )
        }
        Ok(None) => {}
        Err(e) => {
            return (
                false,
                format!("<{address}>: undeliverable: address resolver failure: {e}"),
            )
        }
    }
    let r = match resolver.resolve(None, &address) {
        Ok(r) => r,
        Err(e) => {
            return (
                false,
                format!("<{address}>: undeliverable: address resolver failure: {e}"),
            )
        }
    };
    if r.bad_syntax {
        return (
            false,
            format!("<{address}>: undeliverable: bad address syntax"),
        );
    }
    match r.transport.as_str() {
        "error" | "retry" => {
            let (_, text) = dsn_split(&r.nexthop, "5.0.0");
            return (false, format!("<{address}>: undeliverable: {text}"));
        }
        "discard" => return (true, format!("<{address}>: deliverable: discarded")),
        _ => {}
    }
    let (local, _) = addr::split(&r.recipient);
    if r.class == Class::Local && r.transport == resolver.local_transport() {
        let lower = local.to_lowercase();
        let user = resolver.strip_extension(&lower).0.to_string();
        let (aliases, _) = Tables::open_list(&cfg.get("alias_maps"));
        let alias = match aliases.lookup(&lower) {
            Ok(None) => aliases.lookup(&user),
            found => found,
        };
        match alias {
            Ok(Some(v)) => {
                return (true, format!("<{address}>: deliverable: local alias: {v}"));
            }
            Ok(None) => {}
            Err(e) => {
                return (
                    false,
                    format!("<{address}>: undeliverable: alias database unavailable: {e}"),
                )
            }
        }
        if postern_common::privs::user(&user).is_some() {
            return (
                true,
                format!("<{address}>: deliverable: local mailbox of {user}"),
            );
        }
        let relay = cfg.get("luser_relay");
        if !relay.trim().is_empty() {
            return (
                true,
                format!("<{address}>: deliverable: luser_relay {relay}"),
            );
        }
        return (
            false,
            format!("<{address}>: undeliverable: unknown user: \"{user}\""),
        );
    }
    if r.class == Class::Virtual && r.transport == resolver.virtual_transport() {
        return match resolver.virtual_mailbox(&r.recipient) {
            Ok(Some(m)) => (
                true,
                format!(
                    "<{address}>: deliverable: via {} to {}/{m}",
                    r.transport,
                    cfg.get("virtual_mailbox_base")
                ),
            ),
            Ok(None) => (
                false,
                format!("<{address}>: undeliverable: unknown user: \"{address}\""),
            ),
            Err(e) => (
                false,
                format!("<{address}>: undeliverable: address resolver failure: {e}"),
            ),
        };
    }
    (
        true,
        format!(
            "<{address}>: deliverable: via {} to {}",
            r.transport, r.nexthop
        ),
    )
}

/// The resolver's answer and the SMTP server's verdict for one address,
/// for `-bv -v`: `<addr>: class=C transport=T nexthop=N recipient=R
/// verdict=ok` (or `verdict=CODE DSN TEXT`).
pub fn resolution_line(resolver: &Resolver, sender: Option<&str>, address: &str) -> String {
    let verdict = match resolver.check_listed(sender, address, false) {
        Ok(()) => "ok".to_string(),
        Err(f) => format!("{} {} {}", f.code, f.dsn, f.text),
    };
    match resolver.resolve(sender, address) {
        Ok(r) => format!(
            "<{address}>: class={} transport={} nexthop={} recipient={}{} verdict={verdict}",
            r.class.name(),
            r.transport,
            r.nexthop,
            r.recipient,
            if r.bad_syntax { " bad_syntax" } else { "" }
        ),
        Err(e) => format!("<{address}>: failure={e} verdict={verdict}"),
    }
}

/// Prints the report; with `verbose` (`-v`) a [`resolution_line`] after
/// each address.
pub fn run(
    name: &str,
    cfg: &Config,
    recipients: &[String],
    extract: bool,
    sender: Option<&str>,
    verbose: bool,
) -> ! {
    if recipients.is_empty() {
        let why = if extract {
            "-bv -t: give the addresses on the command line"
        } else {
            "no recipients specified"
        };
        die(name, EX_USAGE, why);
    }
    let resolver = Resolver::with_recipient_checks(cfg);
    let mut all = true;
    for r in recipients {
        let (ok, line) = describe(cfg, &resolver, r);
        all &= ok;
        println!("{line}");
        if verbose {
            println!("{}", resolution_line(&resolver, sender, r));
        }
    }
    std::process::exit(if all { EX_OK } else { EX_NOUSER })
}
