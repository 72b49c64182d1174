//! The MTA side of the milter protocol (Sendmail's libmilter, version 6),
//! written from Postfix's MILTER_README and libmilter's documentation:
//! the milter list of `smtpd_milters`/`non_smtpd_milters` with per-milter
//! settings, the connection and its option negotiation (no-reply and skip
//! bits, the milter's own macro lists), the stages and their replies, the
//! macros sent before each stage, and the modifications a milter asks for
//! at the end of a message. Used by smtpd (the SMTP stages) and cleanup
//! (the content stages and the modifications).
//!
//! Blocking sockets with the configured timeouts: callers run it where
//! blocking is allowed (cleanup's connection thread; smtpd's milter
//! thread).

pub mod proto;

use proto::{act, cmd, proto_bits as pb, rep, stage};
use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::time::Duration;

/// What happens when a milter cannot be reached or fails
/// (`milter_default_action`, per milter `default_action=`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DefaultAction {
    Accept,
    Reject,
    Tempfail,
    Quarantine,
}

impl DefaultAction {
    pub fn parse(s: &str) -> Option<DefaultAction> {
        match s.trim().to_ascii_lowercase().as_str() {
            "accept" => Some(DefaultAction::Accept),
            "reject" => Some(DefaultAction::Reject),
            "tempfail" => Some(DefaultAction::Tempfail),
            "quarantine" => Some(DefaultAction::Quarantine),
            _ => None,
        }
    }
}

/// One milter of a milter list, with its settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Spec {
    /// As written: `inet:host:port` or `unix:/path`.
    pub name: String,
    pub connect_timeout: Duration,
    pub command_timeout: Duration,
    pub content_timeout: Duration,
    pub default_action: DefaultAction,
    pub protocol: u32,
}

/// The macro names per stage (`milter_*_macros`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MacroSets {
    pub connect: Vec<String>,
    pub helo: Vec<String>,
    pub mail: Vec<String>,
    pub rcpt: Vec<String>,
    pub data: Vec<String>,
    pub eoh: Vec<String>,
    pub eom: Vec<String>,
    pub unknown: Vec<String>,
    /// `milter_macro_defaults`: values for macros the MTA has no value
    /// for (names without braces).
    pub defaults: Vec<(String, String)>,
}

/// `milter_macro_defaults`: `name=value` or `{ name = value }` pairs,
/// separated by commas or white space.
pub fn parse_macro_defaults(v: &str) -> Result<Vec<(String, String)>, String> {
    let mut out = Vec::new();
    for item in postern_conf::split_braced(v, true) {
        let inner = item
            .strip_prefix('{')
            .and_then(|i| i.strip_suffix('}'))
            .unwrap_or(&item);
        let (n, val) = inner
            .split_once('=')
            .ok_or_else(|| format!("milter_macro_defaults: missing '=' in '{item}'"))?;
        let n = n.trim().trim_start_matches('{').trim_end_matches('}');
        if n.is_empty() {
            return Err(format!("milter_macro_defaults: empty name in '{item}'"));
        }
        out.push((n.to_string(), val.trim().to_string()));
    }
    Ok(out)
}

/// A milter list and the macro sets, read from the configuration.
#[derive(Debug, Clone)]
pub struct Settings {
    pub milters: Vec<Spec>,
    /// The settings of a milter named without its own (the `milter_*`
    /// parameters), for another list of the same form
    /// (`smtpd_milter_maps`, see [`Settings::with_list`]).
    pub template: Spec,
    pub macros: MacroSets,
    /// `milter_macro_daemon_name`, `milter_macro_v`, `myhostname`.
    pub daemon_name: String,
    pub macro_v: String,
    pub myhostname: String,
}

fn words(v: &str) -> Vec<String> {
    v.split(|c: char| c.is_whitespace() || c == ',')
        .filter(|w| !w.is_empty())
        .map(str::to_string)
        .collect()
}

fn time(v: &str, unit_default: u64) -> Option<Duration> {
    let v = v.trim();
    let (num, unit) = match v.find(|c: char| !c.is_ascii_digit()) {
        Some(i) => (&v[..i], &v[i..]),
        None => (v, ""),
    };
    let n: u64 = num.parse().ok()?;
    let mult = match unit {
        "" => unit_default,
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86400,
        "w" => 604800,
        _ => return None,
    };
    Some(Duration::from_secs(n * mult))
}

impl Settings {
    /// Reads `list_param` (`smtpd_milters` or `non_smtpd_milters`) and the
    /// `milter_*` parameters. An entry Postern cannot use is an error
    /// (`postern check` shows it; the daemon logs it and uses
    /// `milter_default_action` for that milter).
    pub fn from_config(cfg: &postern_conf::Config, list_param: &str) -> Result<Settings, String> {
        let t = |name: &str| {
            let v = cfg.get(name);
            time(&v, 1).ok_or_else(|| format!("bad {name}: {v}"))
        };
        let connect_timeout = t("milter_connect_timeout")?;
        let command_timeout = t("milter_command_timeout")?;
        let content_timeout = t("milter_content_timeout")?;
        let da = cfg.get("milter_default_action");
        let default_action =
            DefaultAction::parse(&da).ok_or_else(|| format!("bad milter_default_action: {da}"))?;
        let p = cfg.get("milter_protocol");
        let protocol: u32 = p
            .trim()
            .parse()
            .ok()
            .filter(|p| (2..=6).contains(p))
            .ok_or_else(|| format!("bad milter_protocol: {p}"))?;
        let template = Spec {
            name: String::new(),
            connect_timeout,
            command_timeout,
            content_timeout,
            default_action,
            protocol,
        };
        let milters = parse_list(&cfg.get(list_param), list_param, &template)?;
        let m = |name: &str| words(&cfg.get(name));
        Ok(Settings {
            milters,
            template,
            macros: MacroSets {
                connect: m("milter_connect_macros"),
                helo: m("milter_helo_macros"),
                mail: m("milter_mail_macros"),
                rcpt: m("milter_rcpt_macros"),
                data: m("milter_data_macros"),
                eoh: m("milter_end_of_header_macros"),
                eom: m("milter_end_of_data_macros"),
                unknown: m("milter_unknown_command_macros"),
                defaults: parse_macro_defaults(&cfg.get("milter_macro_defaults"))?,
            },
            daemon_name: cfg.get("milter_macro_daemon_name"),
            macro_v: cfg.get("milter_macro_v"),
            myhostname: cfg.get("myhostname"),
        })
    }

    /// The same settings with another milter list (an answer of
    /// `smtpd_milter_maps`, in the form of `smtpd_milters`).
    pub fn with_list(&self, list: &str, what: &str) -> Result<Settings, String> {
        Ok(Settings {
            milters: parse_list(list, what, &self.template)?,
            ..self.clone()
        })
    }
}

/// A milter list (`smtpd_milters` form): each entry an address, or an
/// address with its own settings in braces.
fn parse_list(list: &str, list_param: &str, template: &Spec) -> Result<Vec<Spec>, String> {
    {
        let mut milters = Vec::new();
        for item in postern_conf::split_braced(list, true) {
            let mut spec = template.clone();
            if let Some(inner) = item.strip_prefix('{').and_then(|i| i.strip_suffix('}')) {
                let mut parts = inner.split(',').map(str::trim).filter(|s| !s.is_empty());
                spec.name = parts.next().unwrap_or("").to_string();
                for kv in parts {
                    let (k, v) = kv
                        .split_once('=')
                        .map(|(k, v)| (k.trim(), v.trim()))
                        .ok_or_else(|| format!("{list_param}: bad setting '{kv}'"))?;
                    let bad = || format!("{list_param}: bad value '{kv}'");
                    match k {
                        "connect_timeout" => spec.connect_timeout = time(v, 1).ok_or_else(bad)?,
                        "command_timeout" => spec.command_timeout = time(v, 1).ok_or_else(bad)?,
                        "content_timeout" => spec.content_timeout = time(v, 1).ok_or_else(bad)?,
                        "default_action" => {
                            spec.default_action = DefaultAction::parse(v).ok_or_else(bad)?
                        }
                        "protocol" => {
                            spec.protocol = v
                                .parse()
                                .ok()
                                .filter(|p| (2..=6).contains(p))
                                .ok_or_else(bad)?
                        }
                        _ => return Err(format!("{list_param}: unknown milter setting '{k}'")),
                    }
                }
            } else {
                spec.name = item.clone();
            }
            Endpoint::parse(&spec.name)
                .ok_or_else(|| format!("{list_param}: bad milter address '{}'", spec.name))?;
            milters.push(spec);
        }
        Ok(milters)
    }
}

/// Where a milter listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    Inet(String, u16),
    Unix(String),
}

impl Endpoint {
    /// `inet:host:port`, `inet:[v6]:port`, `unix:/path`, `local:/path`.
    pub fn parse(s: &str) -> Option<Endpoint> {
        if let Some(p) = s.strip_prefix("unix:").or_else(|| s.strip_prefix("local:")) {
            return (!p.is_empty()).then(|| Endpoint::Unix(p.to_string()));
        }
        let rest = s.strip_prefix("inet:")?;
        let (host, port) = rest.rsplit_once(':')?;
        let host = host.trim_start_matches('[').trim_end_matches(']');
        let host = if host.is_empty() { "localhost" } else { host };
        Some(Endpoint::Inet(host.to_string(), port.parse().ok()?))
    }
}

enum Stream {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Stream {
    fn set_timeout(&self, t: Duration) {
        let t = Some(t.max(Duration::from_millis(1)));
        let _ = match self {
            Stream::Tcp(s) => s.set_read_timeout(t).and(s.set_write_timeout(t)),
            Stream::Unix(s) => s.set_read_timeout(t).and(s.set_write_timeout(t)),
        };
    }
}

impl Read for Stream {
    fn read(&mut self, b: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.read(b),
            Stream::Unix(s) => s.read(b),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, b: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.write(b),
            Stream::Unix(s) => s.write(b),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// A milter's answer to a stage.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    /// Go on (also: the milter was not asked, or does not answer).
    Continue,
    /// Accept: the milter wants nothing more of this message (of the
    /// session, at connect or HELO).
    Accept,
    /// Reject (5xx) with the SMTP reply to give.
    Reject(String),
    /// Tempfail (4xx) with the SMTP reply to give.
    Tempfail(String),
    /// Accept and throw away the message.
    Discard,
    /// No more body chunks (SMFIR_SKIP).
    Skip,
    /// Refuse the whole connection with this reply (a reject at connect
    /// or HELO; an SMFIR_SHUTDOWN).
    Shutdown(String),
}

/// Postfix's default texts.
pub const REJECT_TEXT: &str = "550 5.7.1 Command rejected";
pub const TEMPFAIL_TEXT: &str = "451 4.7.1 Service unavailable - try again later";

/// A modification a milter asked for at the end of the message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Edit {
    AddHeader(String, String),
    /// Insert at this position among the headers (0: first).
    InsertHeader(u32, String, String),
    /// The index-th (from 1) header of this name gets this value; an empty
    /// value deletes it.
    ChangeHeader(u32, String, String),
    AddRcpt(String, Option<String>),
    DelRcpt(String),
    ChangeFrom(String, Option<String>),
    /// The new body (CRLF line ends, as the milter sent it); its chunks
    /// are joined.
    ReplaceBody(Vec<u8>),
    Quarantine(String),
}

/// A reply text from SMFIR_REPLYCODE: the milter's code, enhanced code and
/// text, lines joined with CRLF (multi-line replies keep their form).
fn custom_reply(data: &[u8]) -> String {
    let s = split_first(data);
    s.trim_end_matches(['\r', '\n']).to_string()
}

fn split_first(data: &[u8]) -> String {
    let end = data.iter().position(|&b| b == 0).unwrap_or(data.len());
    String::from_utf8_lossy(&data[..end]).into_owned()
}

/// One open milter connection.
pub struct Milter {
    pub spec: Spec,
    stream: Stream,
    /// The milter's negotiated actions and protocol bits.
    pub actions: u32,
    pub protocol: u32,
    /// The milter's own macro lists (SETSYMLIST in its negotiation), by
    /// SMFIM stage.
    symlists: [Option<Vec<String>>; 7],
    /// Accepted the session (connect/HELO) or the message: not asked again
    /// until the next one.
    pub done_session: bool,
    pub done_message: bool,
    /// Said SKIP to the body.
    skip_body: bool,
    /// `milter_macro_defaults`.
    pub macro_defaults: Vec<(String, String)>,
}

impl Milter {
    /// Connects (within `connect_timeout`) and negotiates.
    pub fn open(spec: &Spec) -> io::Result<Milter> {
        let ep = Endpoint::parse(&spec.name)
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "bad milter address"))?;
        let stream = match ep {
            Endpoint::Inet(h, p) => {
                Stream::Tcp(crate::tcp::connect((h.as_str(), p), spec.connect_timeout)?)
            }
            Endpoint::Unix(p) => Stream::Unix(UnixStream::connect(p)?),
        };
        stream.set_timeout(spec.connect_timeout);
        let mut m = Milter {
            spec: spec.clone(),
            stream,
            actions: 0,
            protocol: 0,
            symlists: Default::default(),
            done_session: false,
            done_message: false,
            skip_body: false,
            macro_defaults: Vec::new(),
        };
        m.negotiate()?;
        Ok(m)
    }

    fn negotiate(&mut self) -> io::Result<()> {
        let mut d = Vec::with_capacity(12);
        d.extend_from_slice(&self.spec.protocol.to_be_bytes());
        d.extend_from_slice(&act::ALL.to_be_bytes());
        d.extend_from_slice(&pb::OFFERED.to_be_bytes());
        proto::write_packet(&mut self.stream, cmd::OPTNEG, &d)?;
        let (code, data) = proto::read_packet(&mut self.stream)?;
        if code != cmd::OPTNEG || data.len() < 12 {
            return Err(bad("milter negotiation: unexpected reply"));
        }
        let version = proto::be_u32(&data).unwrap_or(0);
        if !(2..=6).contains(&version) {
            return Err(bad(&format!("milter protocol version {version}")));
        }
        self.actions = proto::be_u32(&data[4..]).unwrap_or(0) & act::ALL;
        let wanted = proto::be_u32(&data[8..]).unwrap_or(0);
        if wanted & !pb::OFFERED != 0 {
            return Err(bad(&format!(
                "milter asks for protocol options 0x{:x} not offered",
                wanted & !pb::OFFERED
            )));
        }
        self.protocol = wanted;
        // Macro lists: (u32 stage, NUL-terminated space-separated names)*.
        let mut rest = &data[12..];
        while rest.len() >= 4 {
            let st = proto::be_u32(rest).unwrap_or(99) as usize;
            rest = &rest[4..];
            let end = rest.iter().position(|&b| b == 0).unwrap_or(rest.len());
            let names = String::from_utf8_lossy(&rest[..end]).into_owned();
            rest = rest.get(end + 1..).unwrap_or(&[]);
            if st < 7 && self.actions & act::SETSYMLIST != 0 {
                self.symlists[st] = Some(words(&names));
            }
        }
        Ok(())
    }

    fn has(&self, bit: u32) -> bool {
        self.protocol & bit != 0
    }

    /// The milter asked to see recipients the MTA refused
    /// (SMFIP_RCPT_REJ).
    pub fn wants_rejected_recipients(&self) -> bool {
        self.has(pb::RCPT_REJ)
    }

    /// Sends the macros of a stage (before its command).
    fn macros(
        &mut self,
        for_cmd: u8,
        smfim: Option<u32>,
        defaults: &[String],
        value: &dyn Fn(&str) -> Option<String>,
    ) -> io::Result<()> {
        let names = smfim
            .and_then(|s| self.symlists[s as usize].clone())
            .unwrap_or_else(|| defaults.to_vec());
        let mut d = vec![for_cmd];
        let mut any = false;
        for n in &names {
            let bare = n.trim_start_matches('{').trim_end_matches('}');
            let v = value(bare).or_else(|| {
                self.macro_defaults
                    .iter()
                    .find(|(k, _)| k == bare)
                    .map(|(_, v)| v.clone())
            });
            if let Some(v) = v {
                let shown = if bare.len() == 1 {
                    bare.to_string()
                } else {
                    format!("{{{bare}}}")
                };
                d.extend_from_slice(shown.as_bytes());
                d.push(0);
                d.extend_from_slice(v.as_bytes());
                d.push(0);
                any = true;
            }
        }
        if any {
            proto::write_packet(&mut self.stream, cmd::MACRO, &d)?;
        }
        Ok(())
    }

    /// Reads the reply to a stage, with PROGRESS resetting the wait, and
    /// for the end of message the modifications before it.
    fn read_reply(&mut self, edits: Option<&mut Vec<Edit>>) -> io::Result<Reply> {
        let mut edits = edits;
        loop {
            let (code, data) = proto::read_packet(&mut self.stream)?;
            let reply = match code {
                rep::CONTINUE => Reply::Continue,
                rep::ACCEPT => Reply::Accept,
                rep::REJECT => Reply::Reject(REJECT_TEXT.into()),
                rep::TEMPFAIL => Reply::Tempfail(TEMPFAIL_TEXT.into()),
                rep::DISCARD => Reply::Discard,
                rep::SKIP => Reply::Skip,
                rep::CONN_FAIL | rep::SHUTDOWN => {
                    Reply::Shutdown("421 4.7.0 Server closing connection".into())
                }
                rep::REPLYCODE => {
                    let text = custom_reply(&data);
                    match text.as_bytes().first() {
                        Some(b'4') => Reply::Tempfail(text),
                        Some(b'5') => Reply::Reject(text),
                        _ => return Err(bad(&format!("bad milter reply code: {text}"))),
                    }
                }
                rep::PROGRESS => continue,
                other => {
                    let Some(e) = edits.as_deref_mut() else {
                        return Err(bad(&format!(
                            "unexpected milter reply '{}' before the end of the message",
                            other as char
                        )));
                    };
                    self.edit(other, &data, e)?;
                    continue;
                }
            };
            return Ok(reply);
        }
    }

    fn edit(&mut self, code: u8, data: &[u8], edits: &mut Vec<Edit>) -> io::Result<()> {
        let need = |bit: u32| {
            if self.actions & bit == 0 {
                Err(bad(&format!(
                    "milter asks for modification '{}' it did not negotiate",
                    code as char
                )))
            } else {
                Ok(())
            }
        };
        let s = proto::split_nul;
        match code {
            rep::ADDHEADER => {
                need(act::ADDHDRS)?;
                let v = s(data);
                edits.push(Edit::AddHeader(get(&v, 0), get(&v, 1)));
            }
            rep::INSHEADER | rep::CHGHEADER => {
                need(if code == rep::INSHEADER {
                    act::ADDHDRS
                } else {
                    act::CHGHDRS
                })?;
                let idx = proto::be_u32(data).ok_or_else(|| bad("short header edit"))?;
                let v = s(&data[4..]);
                edits.push(if code == rep::INSHEADER {
                    Edit::InsertHeader(idx, get(&v, 0), get(&v, 1))
                } else {
                    Edit::ChangeHeader(idx, get(&v, 0), get(&v, 1))
                });
            }
            rep::ADDRCPT => {
                need(act::ADDRCPT)?;
                edits.push(Edit::AddRcpt(get(&s(data), 0), None));
            }
            rep::ADDRCPT_PAR => {
                need(act::ADDRCPT_PAR)?;
                let v = s(data);
                let args = v.get(1).filter(|a| !a.is_empty()).cloned();
                edits.push(Edit::AddRcpt(get(&v, 0), args));
            }
            rep::DELRCPT => {
                need(act::DELRCPT)?;
                edits.push(Edit::DelRcpt(get(&s(data), 0)));
            }
            rep::CHGFROM => {
                need(act::CHGFROM)?;
                let v = s(data);
                let args = v.get(1).filter(|a| !a.is_empty()).cloned();
                edits.push(Edit::ChangeFrom(get(&v, 0), args));
            }
            rep::REPLBODY => {
                need(act::CHGBODY)?;
                if let Some(Edit::ReplaceBody(b)) = edits.last_mut() {
                    b.extend_from_slice(data);
                } else {
                    edits.push(Edit::ReplaceBody(data.to_vec()));
                }
            }
            rep::QUARANTINE => {
                need(act::QUARANTINE)?;
                edits.push(Edit::Quarantine(split_first(data)));
            }
            other => {
                return Err(bad(&format!("unknown milter reply '{}'", other as char)));
            }
        }
        Ok(())
    }

    /// One stage: macros, command, and (unless the milter said it will
    /// not answer) its reply.
    fn stage(
        &mut self,
        command: u8,
        data: &[u8],
        (no_bit, nr_bit): (u32, u32),
        macros: Option<(u32, &[String])>,
        value: &dyn Fn(&str) -> Option<String>,
        timeout: Duration,
    ) -> io::Result<Reply> {
        self.stream.set_timeout(timeout);
        if let Some((st, defaults)) = macros {
            self.macros(command, Some(st), defaults, value)?;
        }
        if no_bit != 0 && self.has(no_bit) {
            return Ok(Reply::Continue);
        }
        proto::write_packet(&mut self.stream, command, data)?;
        if nr_bit != 0 && self.has(nr_bit) {
            return Ok(Reply::Continue);
        }
        self.read_reply(None)
    }

    pub fn connect(
        &mut self,
        hostname: &str,
        addr: Option<(std::net::IpAddr, u16)>,
        sets: &MacroSets,
        value: &dyn Fn(&str) -> Option<String>,
    ) -> io::Result<Reply> {
        let mut d = hostname.as_bytes().to_vec();
        d.push(0);
        match addr {
            Some((ip, port)) => {
                d.push(if ip.is_ipv6() { b'6' } else { b'4' });
                d.extend_from_slice(&port.to_be_bytes());
                d.extend_from_slice(ip.to_string().as_bytes());
                d.push(0);
            }
            None => d.push(b'U'),
        }
        let t = self.spec.command_timeout;
        self.stage(
            cmd::CONNECT,
            &d,
            (pb::NOCONNECT, pb::NR_CONN),
            Some((stage::CONNECT, &sets.connect)),
            value,
            t,
        )
    }

    pub fn helo(
        &mut self,
        name: &str,
        sets: &MacroSets,
        value: &dyn Fn(&str) -> Option<String>,
    ) -> io::Result<Reply> {
        let t = self.spec.command_timeout;
        self.stage(
            cmd::HELO,
            &proto::nul_strings(&[name]),
            (pb::NOHELO, pb::NR_HELO),
            Some((stage::HELO, &sets.helo)),
            value,
            t,
        )
    }

    /// MAIL FROM: `<sender>` and its ESMTP parameters.
    pub fn mail(
        &mut self,
        sender: &str,
        params: &[String],
        sets: &MacroSets,
        value: &dyn Fn(&str) -> Option<String>,
    ) -> io::Result<Reply> {
        self.done_message = false;
        self.skip_body = false;
        let mut args = vec![format!("<{sender}>")];
        args.extend(params.iter().cloned());
        let t = self.spec.command_timeout;
        self.stage(
            cmd::MAIL,
            &proto::nul_strings(&args),
            (pb::NOMAIL, pb::NR_MAIL),
            Some((stage::ENVFROM, &sets.mail)),
            value,
            t,
        )
    }

    pub fn rcpt(
        &mut self,
        rcpt: &str,
        params: &[String],
        sets: &MacroSets,
        value: &dyn Fn(&str) -> Option<String>,
    ) -> io::Result<Reply> {
        let mut args = vec![format!("<{rcpt}>")];
        args.extend(params.iter().cloned());
        let t = self.spec.command_timeout;
        self.stage(
            cmd::RCPT,
            &proto::nul_strings(&args),
            (pb::NORCPT, pb::NR_RCPT),
            Some((stage::ENVRCPT, &sets.rcpt)),
            value,
            t,
        )
    }

    pub fn data(
        &mut self,
        sets: &MacroSets,
        value: &dyn Fn(&str) -> Option<String>,
    ) -> io::Result<Reply> {
        if self.spec.protocol < 4 {
            return Ok(Reply::Continue);
        }
        let t = self.spec.command_timeout;
        self.stage(
            cmd::DATA,
            b"",
            (pb::NODATA, pb::NR_DATA),
            Some((stage::DATA, &sets.data)),
            value,
            t,
        )
    }

    /// An unknown SMTP command.
    pub fn unknown(
        &mut self,
        line: &str,
        sets: &MacroSets,
        value: &dyn Fn(&str) -> Option<String>,
    ) -> io::Result<Reply> {
        if self.spec.protocol < 3 {
            return Ok(Reply::Continue);
        }
        self.stream.set_timeout(self.spec.command_timeout);
        self.macros(cmd::UNKNOWN, None, &sets.unknown, value)?;
        if self.has(pb::NOUNKNOWN) {
            return Ok(Reply::Continue);
        }
        proto::write_packet(&mut self.stream, cmd::UNKNOWN, &proto::nul_strings(&[line]))?;
        if self.has(pb::NR_UNKN) {
            return Ok(Reply::Continue);
        }
        self.read_reply(None)
    }

    /// One header: its name and its value as stored (continuation lines
    /// kept, without the last line end).
    pub fn header(&mut self, name: &str, value: &str) -> io::Result<Reply> {
        let value = if self.has(pb::HDR_LEADSPC) {
            value
        } else {
            value.strip_prefix(' ').unwrap_or(value)
        };
        let t = self.spec.content_timeout;
        self.stage(
            cmd::HEADER,
            &proto::nul_strings(&[name, value]),
            (pb::NOHDRS, pb::NR_HDR),
            None,
            &|_| None,
            t,
        )
    }

    pub fn end_of_headers(
        &mut self,
        sets: &MacroSets,
        value: &dyn Fn(&str) -> Option<String>,
    ) -> io::Result<Reply> {
        let t = self.spec.content_timeout;
        self.stage(
            cmd::EOH,
            b"",
            (pb::NOEOH, pb::NR_EOH),
            Some((stage::EOH, &sets.eoh)),
            value,
            t,
        )
    }

    /// The body (LF line ends as stored; sent with CRLF), in chunks of at
    /// most 65,535 bytes, until the milter says SKIP.
    pub fn body(&mut self, body: &[u8]) -> io::Result<Reply> {
        if self.has(pb::NOBODY) || self.skip_body {
            return Ok(Reply::Continue);
        }
        let mut crlf = Vec::with_capacity(body.len() + body.len() / 40);
        for &b in body {
            if b == b'\n' && crlf.last() != Some(&b'\r') {
                crlf.push(b'\r');
            }
            crlf.push(b);
        }
        let t = self.spec.content_timeout;
        for chunk in crlf.chunks(proto::MAX_BODY_CHUNK) {
            match self.stage(cmd::BODY, chunk, (0, pb::NR_BODY), None, &|_| None, t)? {
                Reply::Continue => {}
                Reply::Skip => {
                    self.skip_body = true;
                    return Ok(Reply::Continue);
                }
                other => return Ok(other),
            }
        }
        Ok(Reply::Continue)
    }

    /// The end of the message: its reply and the modifications before it.
    pub fn end_of_message(
        &mut self,
        sets: &MacroSets,
        value: &dyn Fn(&str) -> Option<String>,
    ) -> io::Result<(Reply, Vec<Edit>)> {
        self.stream.set_timeout(self.spec.content_timeout);
        self.macros(cmd::BODYEOB, Some(stage::EOM), &sets.eom, value)?;
        proto::write_packet(&mut self.stream, cmd::BODYEOB, b"")?;
        let mut edits = Vec::new();
        let reply = self.read_reply(Some(&mut edits))?;
        Ok((reply, edits))
    }

    /// Ends the message (the next one may follow on this connection).
    pub fn abort(&mut self) -> io::Result<()> {
        self.stream.set_timeout(self.spec.command_timeout);
        self.done_message = false;
        proto::write_packet(&mut self.stream, cmd::ABORT, b"")
    }

    /// Ends the connection.
    pub fn quit(mut self) {
        self.stream.set_timeout(Duration::from_secs(1));
        let _ = proto::write_packet(&mut self.stream, cmd::QUIT, b"");
    }
}

fn get(v: &[String], i: usize) -> String {
    v.get(i).cloned().unwrap_or_default()
}

fn bad(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what.to_string())
}

/// The reply a milter's failure gives, by its default action: `None` for
/// accept (the milter is skipped), `Some(Quarantine)`-style handling is
/// the caller's.
pub fn failure_reply(action: DefaultAction) -> Option<Reply> {
    match action {
        DefaultAction::Accept | DefaultAction::Quarantine => None,
        DefaultAction::Reject => Some(Reply::Reject(REJECT_TEXT.into())),
        DefaultAction::Tempfail => Some(Reply::Tempfail(TEMPFAIL_TEXT.into())),
    }
}

/// The macros of a recipient the MTA refused, shown to a milter that
/// asked for them (SMFIP_RCPT_REJ), as Postfix and Sendmail give them:
/// `{rcpt_mailer}` is `error`, `{rcpt_host}` the enhanced status code and
/// `{rcpt_addr}` the text after it and the address (from
/// `550 5.1.1 <a@b>: Recipient address rejected: ...`).
pub fn rejected_rcpt_macros(reply: &str) -> Vec<(String, String)> {
    let mut m = vec![("rcpt_mailer".to_string(), "error".to_string())];
    let rest = reply.get(4..).unwrap_or("");
    let (dsn, after) = match rest.split_once(' ') {
        Some((d, a)) => (d, Some(a)),
        None => (rest, None),
    };
    m.push(("rcpt_host".into(), dsn.to_string()));
    if let Some((_, text)) = after.and_then(|a| a.split_once(' ')) {
        m.push(("rcpt_addr".into(), text.to_string()));
    }
    m
}

/// `{mail_mailer}`/`{mail_host}` or `{rcpt_mailer}`/`{rcpt_host}`
/// (`prefix` `mail` or `rcpt`): the transport and next hop the address
/// resolves to, as Postfix's trivial-rewrite gives them. Nothing for the
/// null sender or an address the resolver cannot answer for now.
pub fn route_macros(
    resolver: &crate::resolve::Resolver,
    prefix: &str,
    address: &str,
) -> Vec<(String, String)> {
    if address.is_empty() {
        return Vec::new();
    }
    match resolver.resolve(None, address) {
        Ok(r) => vec![
            (format!("{prefix}_mailer"), r.transport),
            (format!("{prefix}_host"), r.nexthop),
        ],
        Err(_) => Vec::new(),
    }
}

/// An address as a milter gives it: angle brackets removed.
pub fn bare_address(a: &str) -> String {
    let a = a.trim();
    a.strip_prefix('<')
        .and_then(|x| x.strip_suffix('>'))
        .unwrap_or(a)
        .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints() {
        assert_eq!(
            Endpoint::parse("inet:127.0.0.1:8891"),
            Some(Endpoint::Inet("127.0.0.1".into(), 8891))
        );
        assert_eq!(
            Endpoint::parse("inet:[::1]:25"),
            Some(Endpoint::Inet("::1".into(), 25))
        );
        assert_eq!(
            Endpoint::parse("unix:/run/m.sock"),
            Some(Endpoint::Unix("/run/m.sock".into()))
        );
        assert_eq!(Endpoint::parse("tcp:x"), None);
        assert_eq!(time("10s", 1), Some(Duration::from_secs(10)));
        assert_eq!(time("2m", 1), Some(Duration::from_secs(120)));
    }
}

/// The result of a stage over the whole milter list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Continue,
    Reject(String),
    Tempfail(String),
    Discard,
    /// Refuse the rest of the session with this reply.
    Shutdown(String),
}

/// Whether an accept ends the milter's part in the session or the message.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    Session,
    Message,
}

struct Slot {
    spec: Spec,
    conn: Option<Milter>,
    /// Failed with default_action=accept (or quarantine): skipped.
    disabled: bool,
}

/// The milters of one session or message, asked in turn at each stage.
pub struct Chain {
    pub settings: Settings,
    slots: Vec<Slot>,
    /// A milter failed with default_action=quarantine: the message goes
    /// to hold/.
    pub quarantine: Option<String>,
    /// A failure at connect time whose default action refuses: given at
    /// the first stage that can refuse.
    pending: Option<Outcome>,
}

impl Chain {
    /// Connects to every milter of `settings`. A milter that cannot be
    /// reached is handled by its default action.
    pub fn open(settings: Settings) -> Chain {
        let mut chain = Chain {
            slots: Vec::new(),
            quarantine: None,
            pending: None,
            settings,
        };
        for spec in chain.settings.milters.clone() {
            let mut slot = Slot {
                spec: spec.clone(),
                conn: None,
                disabled: false,
            };
            match Milter::open(&spec) {
                Ok(mut m) => {
                    m.macro_defaults = chain.settings.macros.defaults.clone();
                    slot.conn = Some(m)
                }
                Err(e) => {
                    crate::warning!("milter {}: cannot connect: {e}", spec.name);
                    chain.failed(&mut slot);
                }
            }
            chain.slots.push(slot);
        }
        chain
    }

    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    fn failed(&mut self, slot: &mut Slot) -> Option<Outcome> {
        slot.conn = None;
        slot.disabled = true;
        match slot.spec.default_action {
            DefaultAction::Accept => None,
            DefaultAction::Quarantine => {
                self.quarantine
                    .get_or_insert_with(|| format!("milter {} failed", slot.spec.name));
                None
            }
            DefaultAction::Reject => {
                let o = Outcome::Reject(REJECT_TEXT.into());
                self.pending.get_or_insert(o.clone());
                Some(o)
            }
            DefaultAction::Tempfail => {
                let o = Outcome::Tempfail(TEMPFAIL_TEXT.into());
                self.pending.get_or_insert(o.clone());
                Some(o)
            }
        }
    }

    /// A refusal left by a milter that failed (default action reject or
    /// tempfail): every later stage is refused with it.
    pub fn pending(&self) -> Option<&Outcome> {
        self.pending.as_ref()
    }

    /// Runs one stage through every milter still in the game.
    pub fn stage(
        &mut self,
        scope: Scope,
        mut f: impl FnMut(&mut Milter) -> io::Result<Reply>,
    ) -> Outcome {
        if let Some(p) = &self.pending {
            return p.clone();
        }
        let mut slots = std::mem::take(&mut self.slots);
        let mut out = Outcome::Continue;
        for slot in slots.iter_mut() {
            let Some(m) = slot.conn.as_mut() else {
                continue;
            };
            if slot.disabled || m.done_session || (scope == Scope::Message && m.done_message) {
                continue;
            }
            match f(m) {
                Ok(Reply::Continue | Reply::Skip) => {}
                Ok(Reply::Accept) => match scope {
                    Scope::Session => m.done_session = true,
                    Scope::Message => m.done_message = true,
                },
                Ok(Reply::Reject(r)) => {
                    out = Outcome::Reject(r);
                    break;
                }
                Ok(Reply::Tempfail(r)) => {
                    out = Outcome::Tempfail(r);
                    break;
                }
                Ok(Reply::Discard) => {
                    // libmilter expects nothing more of this message (of
                    // the session, at connect or HELO).
                    match scope {
                        Scope::Session => m.done_session = true,
                        Scope::Message => m.done_message = true,
                    }
                    out = Outcome::Discard;
                    break;
                }
                Ok(Reply::Shutdown(r)) => {
                    out = Outcome::Shutdown(r);
                    break;
                }
                Err(e) => {
                    crate::warning!("milter {}: {e}", slot.spec.name);
                    if let Some(o) = self.failed(slot) {
                        out = o;
                        break;
                    }
                }
            }
        }
        self.slots = slots;
        out
    }

    /// The end of the message: the outcome and every milter's
    /// modifications, in milter order.
    pub fn end_of_message(
        &mut self,
        value: &dyn Fn(&str) -> Option<String>,
    ) -> (Outcome, Vec<Edit>) {
        let sets = self.settings.macros.clone();
        let mut all = Vec::new();
        let out = self.stage(Scope::Message, |m| {
            let (reply, edits) = m.end_of_message(&sets, value)?;
            if !matches!(reply, Reply::Reject(_) | Reply::Tempfail(_)) {
                all.extend(edits);
            }
            Ok(reply)
        });
        (out, all)
    }

    /// Ends the message on every connection (the next message may follow).
    pub fn abort(&mut self) {
        let mut slots = std::mem::take(&mut self.slots);
        for slot in slots.iter_mut() {
            if let Some(m) = slot.conn.as_mut() {
                if !m.done_session {
                    if let Err(e) = m.abort() {
                        crate::warning!("milter {}: {e}", slot.spec.name);
                        slot.conn = None;
                    }
                }
            }
        }
        self.slots = slots;
    }

    /// Closes every connection.
    pub fn quit(self) {
        for slot in self.slots {
            if let Some(m) = slot.conn {
                m.quit();
            }
        }
    }
}
