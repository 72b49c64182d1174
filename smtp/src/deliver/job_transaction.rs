//! A delivery request as the client conversation sees it
//! ([`crate::client::Transaction`]): envelope and content from the queue
//! file, outcomes recorded through the job.

use crate::client::Transaction;
use crate::content_checks::Checked;
use postern_common::delivery::Job;
use postern_common::header_checks::CheckTables;
use postern_common::ipc::{DeliveryRecipient, Outcome};
use std::io::{self, Read};

/// A delivery request as one session sees it: the recipients still
/// without an outcome when the session started.
pub(super) struct JobTransaction<'a> {
    job: &'a mut Job,
    rcpts: Vec<DeliveryRecipient>,
    addrs: Vec<String>,
    relay: String,
    /// Whether the content has 8-bit bytes, once looked at.
    eight_bit: &'a mut Option<bool>,
    /// The smtp client's header and body checks.
    checks: &'a Result<CheckTables, String>,
    /// The message is relayed under REQUIRETLS (RFC 8689).
    requiretls: bool,
    /// `delivery_reply_rules` (`defer`, `bounce`).
    reply_rules: &'a postern_common::maps::Tables,
}

impl<'a> JobTransaction<'a> {
    /// The recipients of `job` still without an outcome, for a session
    /// with `relay`; `eight_bit` is shared by the request's sessions;
    /// `requiretls`: relayed under REQUIRETLS.
    pub(super) fn new(
        job: &'a mut Job,
        relay: String,
        eight_bit: &'a mut Option<bool>,
        checks: &'a Result<CheckTables, String>,
        requiretls: bool,
        reply_rules: &'a postern_common::maps::Tables,
    ) -> JobTransaction<'a> {
        let rcpts = job.unfinished();
        JobTransaction {
            addrs: rcpts.iter().map(|r| r.rcpt.address.clone()).collect(),
            rcpts,
            relay,
            eight_bit,
            checks,
            requiretls,
            reply_rules,
            job,
        }
    }
}

impl Drop for JobTransaction<'_> {
    fn drop(&mut self) {
        // The next session (another server) may not announce DSN.
        self.job.dsn_passed_on = false;
    }
}

impl Transaction for JobTransaction<'_> {
    fn sender(&self) -> &str {
        &self.job.req.sender
    }

    fn recipients(&self) -> &[String] {
        &self.addrs
    }

    fn content_size(&self) -> u64 {
        self.job.req.content_size
    }

    fn eight_bit(&mut self) -> io::Result<bool> {
        if let Some(b) = *self.eight_bit {
            return Ok(b);
        }
        let mut r = self.job.content()?;
        let mut buf = vec![0u8; crate::client::content::buffer_size(self.job.req.content_size)];
        let found = loop {
            let n = r.read(&mut buf)?;
            if n == 0 {
                break false;
            }
            if buf[..n].iter().any(|&b| b >= 0x80) {
                break true;
            }
        };
        *self.eight_bit = Some(found);
        Ok(found)
    }

    fn content(&mut self) -> io::Result<Box<dyn Read + '_>> {
        match self.checks {
            Err(e) => Err(io::Error::other(format!("smtp content checks: {e}"))),
            Ok(c) if c.has_header_checks() || c.inspects_body() => {
                let id = self.job.req.queue_id.clone();
                Ok(Box::new(Checked::new(self.job.content()?, c, &id)))
            }
            Ok(_) => Ok(Box::new(self.job.content()?)),
        }
    }

    fn requiretls(&mut self) -> bool {
        self.requiretls
    }

    fn connected(&mut self) {
        self.job.connected();
    }

    fn tls_used(&mut self, cipher: &str, protocol: &str) {
        self.job.tls_cipher = cipher.to_string();
        self.job.tls_protocol_version = protocol.to_string();
    }

    fn record(&mut self, i: usize, outcome: Outcome, dsn: &str, reason: &str) {
        let site = self
            .job
            .req
            .site
            .as_ref()
            .map(|s| s.name.clone())
            .unwrap_or_default();
        let adjusted = postern_common::delivery_policy::adjust_outcome(
            self.reply_rules,
            outcome,
            dsn,
            reason,
            &site,
            &self.relay,
        );
        self.job.reply_class = adjusted.class;
        self.job.record(
            &self.rcpts[i],
            adjusted.outcome,
            &adjusted.dsn,
            &self.relay,
            reason,
        );
    }

    fn dsn_envelope(&mut self) -> (Option<String>, Option<String>) {
        use postern_common::qfile::attr;
        // Asked only of a server that announced DSN: the recipients'
        // NOTIFY goes with them, and that server reports success itself.
        self.job.dsn_passed_on = true;
        match self.job.envelope() {
            Some(env) => (
                env.attr(attr::RET).map(str::to_string),
                env.attr(attr::ENVID).map(str::to_string),
            ),
            None => (None, None),
        }
    }

    fn smtputf8(&mut self) -> postern_common::smtputf8::Flags {
        match self.job.envelope() {
            Some(env) => postern_common::smtputf8::Flags::of_envelope(env),
            None => Default::default(),
        }
    }

    fn dsn_recipient(&self, i: usize) -> (u8, String) {
        // As Postfix: without an ORCPT, the original recipient address.
        let r = &self.rcpts[i].rcpt;
        let orcpt = if !r.orcpt.is_empty() {
            r.orcpt.clone()
        } else if !r.original.is_empty() {
            format!("rfc822;{}", r.original)
        } else {
            String::new()
        };
        (r.notify, orcpt)
    }

    fn queue_id(&self) -> &str {
        &self.job.req.queue_id
    }

    fn verify_only(&self) -> bool {
        self.job.is_probe()
    }

    fn xforward(&mut self) -> Vec<(&'static str, String)> {
        use postern_common::qfile::attr;
        let Some(env) = self.job.envelope() else {
            return Vec::new();
        };
        let mut out = Vec::new();
        // "name[addr]"; "local" for local submission (no address).
        if let Some((name, addr)) = env
            .attr(attr::CLIENT)
            .and_then(|c| c.strip_suffix(']'))
            .and_then(|c| c.split_once('['))
        {
            out.push(("NAME", name.to_string()));
            let addr = match addr.parse::<std::net::IpAddr>() {
                Ok(std::net::IpAddr::V6(a)) => format!("IPv6:{a}"),
                _ => addr.to_string(),
            };
            out.push(("ADDR", addr));
        }
        let named = [
            ("PORT", attr::CLIENT_PORT),
            ("PROTO", attr::PROTOCOL),
            ("HELO", attr::HELO),
            ("SOURCE", attr::SOURCE),
        ];
        for (n, a) in named {
            if let Some(v) = env.attr(a).filter(|v| !v.is_empty()) {
                out.push((n, v.to_string()));
            }
        }
        out.push(("IDENT", self.job.req.queue_id.clone()));
        out
    }
}
