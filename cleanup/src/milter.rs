//! Milters on the message cleanup has written (Postfix's cleanup_milter):
//! when the content has ended and before the file is made durable, the
//! envelope and content are read back from the queue file and shown to
//! the milters of `smtpd_milters` (mail from smtpd) or `non_smtpd_milters`
//! (everything else but notifications) on a connection of cleanup's own:
//! connect, HELO, MAIL, RCPT and DATA replayed from the envelope's
//! attributes (smtpd has asked the milters its own questions during the
//! SMTP dialogue), then the headers, the end of the headers, the body in
//! chunks of at most 65,535 bytes and the end of the message. Their
//! modifications (headers, recipients, sender, body, quarantine) are
//! applied by writing the envelope and content again from the sender
//! record on; a refusal (reject, tempfail, a milter's own reply, a failure
//! under `milter_default_action`) removes the file: nothing is queued.
//! The milters see cleanup's Authentication-Results header; the built-in
//! DKIM signature is made after them, over what they leave
//! (`Message::sign_parts` in message.rs), and written in the same rewrite.

use postern_common::milter::{self, Chain, Edit, Outcome, Scope};
use postern_common::qfile::{self, attr, Recipient};
use std::cell::RefCell;
use std::io;

/// Both milter lists, read once per process. `Err`: the list (or a
/// milter setting) cannot be used: every message it applies to is
/// refused for now (`postern check` names the problem).
pub struct Settings {
    pub smtpd: Result<Option<milter::Settings>, String>,
    pub non_smtpd: Result<Option<milter::Settings>, String>,
    /// `smtpd_milter_maps` (by the SMTP client's address, as smtpd looks
    /// it up), with the settings its answers are read with.
    pub smtpd_maps: Option<(postern_common::maps::Tables, milter::Settings)>,
    /// `milter_header_checks`: header_checks(5) on the headers milters
    /// add or change.
    pub header_checks: postern_common::maps::Tables,
    /// For `{mail_host}`, `{mail_mailer}`, `{rcpt_host}`, `{rcpt_mailer}`.
    pub resolver: postern_common::resolve::Resolver,
}

impl Settings {
    pub fn from_config(cfg: &postern_conf::Config) -> Settings {
        let read = |name: &str| match milter::Settings::from_config(cfg, name) {
            Ok(s) if s.milters.is_empty() => Ok(None),
            Ok(s) => Ok(Some(s)),
            Err(e) => {
                postern_common::warning!("{e}: mail for the milters of {name} is refused");
                Err(e)
            }
        };
        let open = |name: &str| {
            let (t, errors) = postern_common::maps::Tables::open_list(&cfg.get(name));
            for e in errors {
                postern_common::warning!("{name}: {e}");
            }
            t
        };
        let maps = cfg.get("smtpd_milter_maps");
        let smtpd_maps = if maps.trim().is_empty() {
            None
        } else {
            milter::Settings::from_config(cfg, "smtpd_milters")
                .ok()
                .map(|base| (open("smtpd_milter_maps"), base))
        };
        Settings {
            smtpd: read("smtpd_milters"),
            non_smtpd: read("non_smtpd_milters"),
            smtpd_maps,
            header_checks: open("milter_header_checks"),
            resolver: postern_common::resolve::Resolver::new(cfg),
        }
    }

    /// The milters of mail from smtpd whose client is `client`
    /// (`smtpd_milter_maps` as smtpd asked it, else `smtpd_milters`).
    pub fn for_smtpd_client(
        &self,
        client: Option<std::net::IpAddr>,
    ) -> Result<Option<std::borrow::Cow<'_, milter::Settings>>, String> {
        let default = || {
            self.smtpd
                .as_ref()
                .map(|o| o.as_ref().map(std::borrow::Cow::Borrowed))
                .map_err(Clone::clone)
        };
        let (Some((maps, base)), Some(ip)) = (&self.smtpd_maps, client) else {
            return default();
        };
        match maps.lookup(&ip.to_string()) {
            Ok(None) => default(),
            Ok(Some(v)) if v.trim().eq_ignore_ascii_case("DISABLE") => Ok(None),
            Ok(Some(v)) => match base.with_list(&v, "smtpd_milter_maps") {
                Ok(s) if s.milters.is_empty() => Ok(None),
                Ok(s) => Ok(Some(std::borrow::Cow::Owned(s))),
                Err(e) => {
                    postern_common::warning!("smtpd_milter_maps: {ip}: {e}");
                    default()
                }
            },
            Err(e) => {
                postern_common::warning!("smtpd_milter_maps: {ip}: {e}");
                default()
            }
        }
    }
}

/// The SMTP client's address of the `client` attribute ("name[addr]").
pub fn client_ip(attrs: &[(String, String)]) -> Option<std::net::IpAddr> {
    let c = attrs.iter().rev().find(|(n, _)| n == attr::CLIENT)?;
    let (_, rest) = c.1.rsplit_once('[')?;
    let addr = rest.trim_end_matches(']');
    addr.strip_prefix("IPv6:").unwrap_or(addr).parse().ok()
}

/// What the milters decided.
pub enum Verdict {
    /// Queue the message (after the rewrite, if any).
    Accept,
    /// Refuse with this reply.
    Refuse { temporary: bool, reply: String },
    /// Answer as queued, deliver nothing.
    Discard(String),
}

/// The message as read back for the milters, and as written again.
pub struct Parts {
    pub sender: String,
    pub attrs: Vec<(String, String)>,
    /// Records other than sender, attributes, recipients (kept as they are).
    pub recipients: Vec<Recipient>,
    /// Header texts as stored ("Name: value\n" with continuation lines).
    pub headers: Vec<Vec<u8>>,
    /// Beside `headers`: the header was added or changed by a milter
    /// (for `milter_header_checks`).
    pub from_milter: Vec<bool>,
    /// Recipients the milters added, not yet in `recipients`: they go
    /// through virtual alias expansion first (the caller's).
    pub added: Vec<Recipient>,
    pub body: Vec<u8>,
    pub quarantine: Option<String>,
    /// A modification was applied: the file is written again.
    pub changed: bool,
}

impl Parts {
    pub fn read(records: Vec<(u8, Vec<u8>)>) -> Parts {
        let mut p = Parts {
            sender: String::new(),
            attrs: Vec::new(),
            recipients: Vec::new(),
            headers: Vec::new(),
            from_milter: Vec::new(),
            added: Vec::new(),
            body: Vec::new(),
            quarantine: None,
            changed: false,
        };
        let mut content = Vec::new();
        for (kind, data) in records {
            match kind {
                qfile::REC_SENDER => p.sender = String::from_utf8_lossy(&data).into_owned(),
                qfile::REC_ATTR => {
                    let s = String::from_utf8_lossy(&data);
                    let (n, v) = s.split_once('=').unwrap_or((&s, ""));
                    p.attrs.push((n.to_string(), v.to_string()));
                }
                qfile::REC_RCPT => {
                    if let Some(r) = Recipient::decode(&data) {
                        p.recipients.push(r);
                    }
                }
                qfile::REC_CONTENT => content.extend_from_slice(&data),
                _ => {}
            }
        }
        // Split the header section off.
        let mut at = 0;
        while at < content.len() {
            let end = content[at..]
                .iter()
                .position(|&b| b == b'\n')
                .map(|i| at + i + 1)
                .unwrap_or(content.len());
            let line = &content[at..end];
            if line == b"\n" || line == b"\r\n" {
                at = end;
                break;
            }
            if matches!(line.first(), Some(b' ' | b'\t')) && !p.headers.is_empty() {
                p.headers.last_mut().unwrap().extend_from_slice(line);
            } else {
                p.headers.push(line.to_vec());
            }
            at = end;
        }
        p.body = content[at..].to_vec();
        p.from_milter = vec![false; p.headers.len()];
        p
    }

    fn attr(&self, name: &str) -> Option<&str> {
        self.attrs
            .iter()
            .rev()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    /// Writes the envelope and content again (the writer rewound to the
    /// sender record).
    pub fn write(&self, w: &mut qfile::Writer) -> io::Result<()> {
        w.sender(&self.sender)?;
        for (n, v) in &self.attrs {
            w.attribute(n, v)?;
        }
        for r in &self.recipients {
            w.recipient(r)?;
        }
        w.begin_content()?;
        for h in &self.headers {
            w.content(h)?;
        }
        w.content(b"\n")?;
        w.content(&self.body)
    }
}

fn split_header(h: &[u8]) -> (String, String) {
    let s = String::from_utf8_lossy(h);
    let s = s.strip_suffix('\n').unwrap_or(&s);
    let (n, v) = s.split_once(':').unwrap_or((s, ""));
    (n.trim_end().to_string(), v.to_string())
}

fn header_text(name: &str, value: &str) -> Vec<u8> {
    let value = value.replace("\r\n", "\n");
    let sep = if value.starts_with([' ', '\t']) || value.is_empty() {
        ""
    } else {
        " "
    };
    format!("{name}:{sep}{value}\n").into_bytes()
}

/// "name[addr]" of the client attribute.
fn client(p: &Parts) -> (String, Option<std::net::IpAddr>) {
    let c = p.attr(attr::CLIENT).unwrap_or("");
    match c.rsplit_once('[') {
        Some((name, rest)) => {
            let addr = rest.trim_end_matches(']');
            let addr = addr.strip_prefix("IPv6:").unwrap_or(addr);
            (name.to_string(), addr.parse().ok())
        }
        None => ("localhost".to_string(), None),
    }
}

/// Runs the milters over the message. `from_smtpd`: smtpd's list, else
/// the non-SMTP one (whose connect and HELO are "localhost").
pub fn inspect(
    settings: &milter::Settings,
    resolver: &postern_common::resolve::Resolver,
    id: &str,
    p: &mut Parts,
    from_smtpd: bool,
) -> Verdict {
    let mut chain = Chain::open(settings.clone());
    let verdict = run(&mut chain, resolver, id, p, from_smtpd);
    chain.quit();
    verdict
}

fn run(
    chain: &mut Chain,
    resolver: &postern_common::resolve::Resolver,
    id: &str,
    p: &mut Parts,
    from_smtpd: bool,
) -> Verdict {
    let sets = chain.settings.macros.clone();
    let (mut cname, mut caddr) = client(p);
    if !from_smtpd || caddr.is_none() {
        cname = "localhost".into();
        caddr = Some(std::net::IpAddr::from([127, 0, 0, 1]));
    }
    let port: u16 = p
        .attr(attr::CLIENT_PORT)
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let helo = if from_smtpd {
        p.attr(attr::HELO).unwrap_or("").to_string()
    } else {
        "localhost".to_string()
    };
    let rcpt_now = RefCell::new(String::new());
    let s = &chain.settings;
    let (daemon_name, macro_v, myhostname) = (
        s.daemon_name.clone(),
        s.macro_v.clone(),
        s.myhostname.clone(),
    );
    let addr_text = caddr.map(|a| a.to_string()).unwrap_or_default();
    let sender = p.sender.clone();
    let attrs = p.attrs.clone();
    let get_attr = |n: &str| {
        attrs
            .iter()
            .rev()
            .find(|(k, _)| k == n)
            .map(|(_, v)| v.clone())
    };
    let mail_route = milter::route_macros(resolver, "mail", &sender);
    let rcpt_route = RefCell::new(Vec::new());
    let value = |name: &str| -> Option<String> {
        let routed = |list: &[(String, String)]| {
            list.iter().find(|(n, _)| n == name).map(|(_, v)| v.clone())
        };
        match name {
            "i" => Some(id.to_string()),
            "j" => Some(myhostname.clone()),
            "v" => Some(macro_v.clone()),
            "_" => Some(format!("{cname} [{addr_text}]")),
            "daemon_name" => Some(daemon_name.clone()),
            "client_addr" => Some(addr_text.clone()),
            "client_name" => Some(cname.clone()),
            "client_port" => Some(port.to_string()),
            "auth_type" => get_attr(attr::SASL_METHOD),
            "auth_authen" => get_attr(attr::SASL_USERNAME),
            "auth_author" => get_attr(attr::SASL_SENDER),
            "mail_addr" => Some(sender.clone()),
            "mail_host" | "mail_mailer" => routed(&mail_route),
            "rcpt_addr" => Some(rcpt_now.borrow().clone()),
            "rcpt_host" | "rcpt_mailer" => routed(&rcpt_route.borrow()),
            // What smtpd's session knew (server address, TLS, client
            // certificate): recorded for this replay.
            _ if from_smtpd => get_attr(&format!("{}{name}", attr::MILTER_MACRO_PREFIX)),
            _ => None,
        }
    };
    let mut outcome = chain.stage(Scope::Session, |m| {
        m.connect(&cname, caddr.map(|a| (a, port)), &sets, &value)
    });
    if outcome == Outcome::Continue && !helo.is_empty() {
        outcome = chain.stage(Scope::Session, |m| m.helo(&helo, &sets, &value));
    }
    if outcome == Outcome::Continue {
        outcome = chain.stage(Scope::Message, |m| m.mail(&sender, &[], &sets, &value));
    }
    for r in p.recipients.clone() {
        if outcome != Outcome::Continue {
            break;
        }
        *rcpt_now.borrow_mut() = r.address.clone();
        *rcpt_route.borrow_mut() = milter::route_macros(resolver, "rcpt", &r.address);
        outcome = chain.stage(Scope::Message, |m| m.rcpt(&r.address, &[], &sets, &value));
    }
    if outcome == Outcome::Continue {
        outcome = chain.stage(Scope::Message, |m| m.data(&sets, &value));
    }
    for h in &p.headers {
        if outcome != Outcome::Continue {
            break;
        }
        let (n, v) = split_header(h);
        outcome = chain.stage(Scope::Message, |m| m.header(&n, &v));
    }
    if outcome == Outcome::Continue {
        outcome = chain.stage(Scope::Message, |m| m.end_of_headers(&sets, &value));
    }
    if outcome == Outcome::Continue {
        let body = p.body.clone();
        outcome = chain.stage(Scope::Message, |m| m.body(&body));
    }
    let mut edits = Vec::new();
    if outcome == Outcome::Continue {
        let (o, e) = chain.end_of_message(&value);
        outcome = o;
        edits = e;
    }
    match outcome {
        Outcome::Continue => {}
        Outcome::Discard => return Verdict::Discard("milter".into()),
        Outcome::Reject(reply) => {
            return Verdict::Refuse {
                temporary: false,
                reply,
            }
        }
        Outcome::Tempfail(reply) | Outcome::Shutdown(reply) => {
            return Verdict::Refuse {
                temporary: true,
                reply,
            }
        }
    }
    if let Some(q) = chain.quarantine.take() {
        p.quarantine = Some(q);
    }
    apply(p, edits);
    Verdict::Accept
}

/// ESMTP parameters of an added recipient: NOTIFY and ORCPT are kept.
fn rcpt_with_args(address: &str, args: Option<&str>) -> Recipient {
    let mut r = Recipient::new(address);
    for a in args.unwrap_or("").split_whitespace() {
        let (k, v) = a.split_once('=').unwrap_or((a, ""));
        if k.eq_ignore_ascii_case("NOTIFY") {
            for n in v.split(',') {
                r.notify |= match n.to_ascii_uppercase().as_str() {
                    "SUCCESS" => qfile::NOTIFY_SUCCESS,
                    "FAILURE" => qfile::NOTIFY_FAILURE,
                    "DELAY" => qfile::NOTIFY_DELAY,
                    "NEVER" => qfile::NOTIFY_NEVER,
                    _ => 0,
                };
            }
        } else if k.eq_ignore_ascii_case("ORCPT") {
            r.orcpt = v.to_string();
        }
    }
    r
}

/// Applies the modifications in the order the milters gave them.
pub fn apply(p: &mut Parts, edits: Vec<Edit>) {
    p.changed |= edits.iter().any(|e| !matches!(e, Edit::Quarantine(_)));
    for e in edits {
        match e {
            Edit::AddHeader(n, v) => {
                p.headers.push(header_text(&n, &v));
                p.from_milter.push(true);
            }
            Edit::InsertHeader(i, n, v) => {
                let at = (i as usize).min(p.headers.len());
                p.headers.insert(at, header_text(&n, &v));
                p.from_milter.insert(at, true);
            }
            Edit::ChangeHeader(i, n, v) => {
                let i = i.max(1) as usize;
                let found = p
                    .headers
                    .iter()
                    .enumerate()
                    .filter(|(_, h)| split_header(h).0.eq_ignore_ascii_case(&n))
                    .map(|(at, _)| at)
                    .nth(i - 1);
                match (found, v.is_empty()) {
                    (Some(at), true) => {
                        p.headers.remove(at);
                        p.from_milter.remove(at);
                    }
                    (Some(at), false) => {
                        p.headers[at] = header_text(&n, &v);
                        p.from_milter[at] = true;
                    }
                    (None, false) => {
                        p.headers.push(header_text(&n, &v));
                        p.from_milter.push(true);
                    }
                    (None, true) => {}
                }
            }
            Edit::AddRcpt(a, args) => {
                let a = milter::bare_address(&a);
                p.added.push(rcpt_with_args(&a, args.as_deref()));
            }
            Edit::DelRcpt(a) => {
                let a = milter::bare_address(&a);
                p.added.retain(|r| !r.address.eq_ignore_ascii_case(&a));
                p.recipients.retain(|r| {
                    !r.address.eq_ignore_ascii_case(&a)
                        && !r.original_or_address().eq_ignore_ascii_case(&a)
                });
            }
            Edit::ChangeFrom(a, _args) => p.sender = milter::bare_address(&a),
            Edit::ReplaceBody(b) => {
                let mut body = Vec::with_capacity(b.len());
                let mut i = 0;
                while i < b.len() {
                    if b[i] == b'\r' && b.get(i + 1) == Some(&b'\n') {
                        i += 1;
                        continue;
                    }
                    body.push(b[i]);
                    i += 1;
                }
                p.body = body;
            }
            Edit::Quarantine(reason) => {
                p.quarantine.get_or_insert(reason);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn edits_apply() {
        let mut p = Parts::read(vec![
            (qfile::REC_SENDER, b"a@x".to_vec()),
            (qfile::REC_RCPT, Recipient::new("b@y").encode()),
            (
                qfile::REC_CONTENT,
                b"Subject: hi\nX-A: 1\nX-A: 2\n folded\n\nbody\n".to_vec(),
            ),
        ]);
        assert_eq!(p.headers.len(), 3);
        apply(
            &mut p,
            vec![
                Edit::ChangeHeader(2, "X-A".into(), "".into()),
                Edit::ChangeHeader(1, "Subject".into(), " new".into()),
                Edit::InsertHeader(0, "X-Top".into(), " t".into()),
                Edit::AddRcpt("<c@z>".into(), Some("NOTIFY=NEVER".into())),
                Edit::DelRcpt("<b@y>".into()),
                Edit::ChangeFrom("<d@w>".into(), None),
                Edit::ReplaceBody(b"new\r\nbody\r\n".to_vec()),
            ],
        );
        assert_eq!(
            p.headers,
            vec![
                b"X-Top: t\n".to_vec(),
                b"Subject: new\n".to_vec(),
                b"X-A: 1\n".to_vec()
            ]
        );
        // Added recipients wait for virtual alias expansion.
        assert!(p.recipients.is_empty());
        assert_eq!(p.added.len(), 1);
        assert_eq!(p.added[0].address, "c@z");
        assert_eq!(p.added[0].notify, qfile::NOTIFY_NEVER);
        assert_eq!(p.from_milter, vec![true, true, false]);
        assert_eq!(p.sender, "d@w");
        assert_eq!(p.body, b"new\nbody\n");
    }
}
