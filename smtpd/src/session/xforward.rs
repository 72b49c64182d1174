//! XFORWARD (Postfix's XFORWARD_README): an after-queue content filter
//! that reinjects mail tells smtpd who the original client was, so that
//! the reinjected message's `client=` log line (as `orig_client=`) and its
//! queue file (what later log lines, pipe's macros and the next XFORWARD
//! use) name that client. The Received header shows the filter, the
//! client that connected, as Postfix's does.
//! Only clients in `smtpd_authorized_xforward_hosts` are offered it; the
//! attributes hold for the next transaction and are forgotten when it
//! ends (end of DATA, RSET). Access control keeps using the real client.

use super::{Done, Session};
use postern_common::smtp_command::Token;
use std::net::IpAddr;

/// What the client forwarded. `None`: not given, or given as
/// `[UNAVAILABLE]`/`[TEMPUNAVAIL]`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Forwarded {
    pub name: Option<String>,
    pub addr: Option<IpAddr>,
    pub port: Option<u16>,
    pub proto: Option<String>,
    pub helo: Option<String>,
    /// The original queue ID.
    pub ident: Option<String>,
    /// `LOCAL` or `REMOTE`.
    pub source: Option<String>,
}

impl Forwarded {
    /// `name[addr]` of the original client, when its address was given.
    pub fn namaddr(&self) -> Option<String> {
        let addr = self.addr?;
        Some(format!(
            "{}[{addr}]",
            self.name.as_deref().unwrap_or("unknown")
        ))
    }
}

/// The attributes the EHLO keyword announces.
pub const KEYWORD: &str = "XFORWARD NAME ADDR PROTO HELO SOURCE PORT IDENT";

impl Session {
    /// Whether this client may send XFORWARD.
    pub(super) fn xforward_allowed(&self) -> bool {
        self.cfg.xforward_hosts.matches(self.client.addr)
    }

    /// `XFORWARD attr=value ...`.
    pub(super) fn xforward(&mut self, args: &[Token]) -> Done {
        if !self.xforward_allowed() {
            return self.fail("550 5.7.0 Error: insufficient authorization");
        }
        if self.tx.is_some() {
            return self.fail("503 5.5.1 Error: MAIL transaction in progress");
        }
        if args.len() < 2 {
            return self.fail("501 5.5.4 Syntax: XFORWARD attribute=value...");
        }
        let mut f = self.xforward.clone();
        for a in &args[1..] {
            let Some((name, raw)) = a.text.split_once('=') else {
                return self.fail("501 5.5.4 Syntax: XFORWARD attribute=value...");
            };
            let Some(value) = postern_common::dsn::xtext_decode(raw) else {
                return self.fail(&format!("501 5.5.4 Bad {name} syntax: {raw}"));
            };
            let unknown = value == "[UNAVAILABLE]" || value == "[TEMPUNAVAIL]";
            let value = (!unknown && !value.is_empty()).then_some(value);
            match name.to_ascii_uppercase().as_str() {
                "NAME" => f.name = value,
                "ADDR" => match value {
                    None => f.addr = None,
                    Some(v) => {
                        let v = v
                            .strip_prefix("IPv6:")
                            .or_else(|| v.strip_prefix("ipv6:"))
                            .unwrap_or(&v);
                        match v.parse::<IpAddr>() {
                            Ok(ip) => f.addr = Some(postern_common::cidr::normalize(ip)),
                            Err(_) => return self.fail(&format!("501 5.5.4 Bad ADDR syntax: {v}")),
                        }
                    }
                },
                "PORT" => match value.map(|v| v.parse::<u16>()) {
                    None => f.port = None,
                    Some(Ok(p)) => f.port = Some(p),
                    Some(Err(_)) => return self.fail(&format!("501 5.5.4 Bad PORT syntax: {raw}")),
                },
                "PROTO" => f.proto = value,
                "HELO" => f.helo = value,
                "IDENT" => f.ident = value,
                "SOURCE" => f.source = value.map(|v| v.to_ascii_uppercase()),
                _ => return self.fail(&format!("501 5.5.4 Bad XFORWARD attribute name: {name}")),
            }
        }
        self.xforward = f;
        self.reply("250 2.0.0 Ok");
        Done::Ok
    }
}
