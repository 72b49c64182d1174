//! `sendmail -bv`: what would happen to each recipient, without sending.
//!
//! Prints one line per recipient on standard output, as the address
//! classes of Postfix's trivial-rewrite and local(8) see it:
//! `<addr>: deliverable: local mailbox of USER`, `... alias: VALUE`,
//! `... via TRANSPORT to NEXTHOP`, or `<addr>: undeliverable: REASON`.
//! Postfix mails this report to the sender; Postern prints it (and exits
//! 0 when every recipient is deliverable, 67 (EX_NOUSER) otherwise), so
//! that a shell user or script sees it at once. `transport_maps` is looked
//! up by address and domain; `virtual_alias_maps` by address.

use crate::die;
use crate::sysexits::*;
use postern_common::addr;
use postern_common::maps::Tables;
use postern_conf::Config;

/// Where one address goes, as a line of the report.
pub fn describe(cfg: &Config, address: &str) -> (bool, String) {
    let address = addr::qualify(address, &cfg.get("myorigin"));
    let domain = addr::domain(&address);
    let (local, _) = addr::split(&address);
    let (valias, _) = Tables::open_list(&cfg.get("virtual_alias_maps"));
    if let Some(v) = valias.lookup(&address) {
        return (
            true,
            format!("<{address}>: deliverable: virtual alias: {v}"),
        );
    }
    let (transports, _) = Tables::open_list(&cfg.get("transport_maps"));
    let over = transports
        .lookup(&address)
        .or_else(|| transports.lookup(&domain))
        .map(|s| s.to_string());
    let is_local = addr::domain_in_list(&domain, &cfg.get_list("mydestination"));
    if is_local && over.is_none() {
        let delim = cfg.get("recipient_delimiter");
        let lower = local.to_lowercase();
        let user = match lower.find(|c| !delim.is_empty() && delim.contains(c)) {
            Some(i) if i > 0 => lower[..i].to_string(),
            _ => lower.clone(),
        };
        let (aliases, _) = Tables::open_list(&cfg.get("alias_maps"));
        if let Some(v) = aliases.lookup(&lower).or_else(|| aliases.lookup(&user)) {
            return (true, format!("<{address}>: deliverable: local alias: {v}"));
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
    if addr::domain_in_list(&domain, &cfg.get_list("virtual_mailbox_domains")) && over.is_none() {
        let (maps, _) = Tables::open_list(&cfg.get("virtual_mailbox_maps"));
        return match maps.lookup(&address) {
            Some(m) => (
                true,
                format!(
                    "<{address}>: deliverable: via {} to {}/{m}",
                    cfg.get("virtual_transport"),
                    cfg.get("virtual_mailbox_base")
                ),
            ),
            None => (
                false,
                format!("<{address}>: undeliverable: unknown user: \"{address}\""),
            ),
        };
    }
    let (transport, nexthop) = match over {
        Some(v) => match v.split_once(':') {
            Some((t, n)) => (t.to_string(), n.to_string()),
            None => (v, String::new()),
        },
        None if addr::domain_in_list(&domain, &cfg.get_list("relay_domains")) => {
            (cfg.get("relay_transport"), String::new())
        }
        None => (cfg.get("default_transport"), String::new()),
    };
    let (transport, nh) = match transport.split_once(':') {
        Some((t, n)) => (t.to_string(), n.to_string()),
        None => (transport, String::new()),
    };
    let nexthop = [nexthop, nh, cfg.get("relayhost"), domain]
        .into_iter()
        .find(|s| !s.is_empty())
        .unwrap_or_default();
    if transport == "error" {
        return (false, format!("<{address}>: undeliverable: {nexthop}"));
    }
    (
        true,
        format!("<{address}>: deliverable: via {transport} to {nexthop}"),
    )
}

pub fn run(name: &str, cfg: &Config, recipients: &[String], extract: bool) -> ! {
    if recipients.is_empty() {
        let why = if extract {
            "-bv -t: give the addresses on the command line"
        } else {
            "no recipients specified"
        };
        die(name, EX_USAGE, why);
    }
    let mut all = true;
    for r in recipients {
        let (ok, line) = describe(cfg, r);
        all &= ok;
        println!("{line}");
    }
    std::process::exit(if all { EX_OK } else { EX_NOUSER })
}
