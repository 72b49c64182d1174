//! One message from Open to Queued: the queue file is created at Open,
//! the envelope's records are written when the envelope comes, the
//! header section is buffered (each header bounded by
//! `header_size_limit`, the section by ten times that)
//! so that recipients from `sendmail -t` can be written before the
//! content, and the body is streamed straight through.

use crate::headers::{self, Header};
use crate::rewrite::{self, Action, AliasError, HeaderClass, Rewriter};
use postern_common::delivery::{self, LogEntry};
use postern_common::dupfilter::DupFilter;
use postern_common::header_checks::{MimeWalk, Piece};
use postern_common::ipc::{cleanup_flags, CleanupReply, NewMessage};
use postern_common::maps::LookupError;
use postern_common::qfile::{self, Recipient};
use postern_common::queue::{self, MessageLog, Queue, QueueTree};
use postern_common::smtputf8;
use postern_common::{info, warning};
use postern_conf::Config;
use std::io;

/// Parameters cleanup reads, once per process.
pub struct Settings {
    pub myhostname: String,
    pub myorigin: String,
    pub drop_headers: Vec<String>,
    pub header_size_limit: usize,
    pub message_size_limit: u64,
    pub hopcount_limit: usize,
    /// Canonical, masquerade and virtual alias mapping; header and body checks.
    pub rewriter: Rewriter,
    /// `append_dot_mydomain`: `user@host` becomes `user@host.$mydomain`.
    pub append_dot_mydomain: Option<String>,
    /// `smtputf8_enable`: the SMTPUTF8 flags are kept (see [`smtputf8`]).
    pub smtputf8_enable: bool,
    /// `smtputf8_autodetect_classes`.
    pub smtputf8_autodetect: smtputf8::Autodetect,
    /// `duplicate_filter_limit`: recipients remembered for duplicate
    /// elimination (0 = no limit).
    pub duplicate_filter_limit: usize,
    /// `enable_original_recipient`: recipients with different original
    /// addresses are not duplicates.
    pub original_recipient: bool,
    /// `always_bcc`: a copy of every message goes there ("": none).
    pub always_bcc: String,
    /// DKIM signing and the authentication checks (`dkim_*`,
    /// `authentication_checks`), with the keys read at start.
    pub dkim: crate::dkim::Dkim,
    /// `smtpd_milters`, `non_smtpd_milters` (see [`crate::milter`]).
    pub milters: crate::milter::Settings,
}

impl Settings {
    /// The header section is buffered in memory (recipients from
    /// `sendmail -t` are written before the content): it may hold ten
    /// headers of the maximal size; past that, the rest is body. Postfix
    /// streams its headers and has no such bound; this one keeps a
    /// cleanup thread's memory bounded while 20,000 recipients in To:
    /// headers (~450 kB) still fit under the default.
    pub fn header_section_limit(&self) -> usize {
        self.header_size_limit.saturating_mul(10)
    }

    pub fn from_config(cfg: &Config) -> Settings {
        Settings {
            myhostname: cfg.get("myhostname"),
            myorigin: cfg.get("myorigin"),
            drop_headers: cfg
                .get_list("message_drop_headers")
                .into_iter()
                .map(|h| h.to_ascii_lowercase())
                .collect(),
            header_size_limit: cfg.get_u64("header_size_limit").unwrap_or(102400) as usize,
            message_size_limit: cfg.get_u64("message_size_limit").unwrap_or(10240000),
            hopcount_limit: cfg.get_u64("hopcount_limit").unwrap_or(50) as usize,
            rewriter: Rewriter::from_config(cfg),
            append_dot_mydomain: cfg
                .get_bool("append_dot_mydomain")
                .unwrap_or(false)
                .then(|| cfg.get("mydomain")),
            smtputf8_enable: cfg.get_bool("smtputf8_enable").unwrap_or(true),
            smtputf8_autodetect: smtputf8::Autodetect::parse(
                &cfg.get("smtputf8_autodetect_classes"),
            )
            .unwrap_or_else(|w| {
                warning!("smtputf8_autodetect_classes: bad input: {w}");
                smtputf8::Autodetect::default()
            }),
            duplicate_filter_limit: cfg.get_u64("duplicate_filter_limit").unwrap_or_else(|e| {
                warning!("{e}; using 1000");
                1000
            }) as usize,
            original_recipient: cfg.get_bool("enable_original_recipient").unwrap_or(true),
            always_bcc: cfg.get("always_bcc").trim().to_string(),
            dkim: crate::dkim::Dkim::from_config(cfg),
            milters: crate::milter::Settings::from_config(cfg),
        }
    }

    /// Postfix's local address rewriting: a bare name gets `@$myorigin`,
    /// and with `append_dot_mydomain` a domain without a dot gets
    /// `.$mydomain`. Bang paths (`host!user`) are left alone here; the
    /// resolver (`postern_common::resolve`) routes them.
    pub fn local_rewrite(&self, address: &str) -> String {
        let q = postern_common::addr::qualify(address, &self.myorigin);
        if let (Some(mydomain), (local, Some(domain))) =
            (&self.append_dot_mydomain, postern_common::addr::split(&q))
        {
            if !domain.is_empty() && !domain.contains('.') && !domain.starts_with('[') {
                return format!("{local}@{domain}.{mydomain}");
            }
        }
        q
    }
}

/// Why a message was not queued.
#[derive(Debug)]
pub struct Refusal {
    pub temporary: bool,
    pub dsn: &'static str,
    pub reason: String,
}

/// The `dsn` of a refusal whose `reason` is a milter's SMTP reply.
pub const MILTER_DSN: &str = postern_common::ipc::MILTER_REPLY_DSN;

impl Refusal {
    /// The enhanced status code, also of a milter's reply.
    pub fn dsn_text(&self) -> String {
        if self.dsn != MILTER_DSN {
            return self.dsn.to_string();
        }
        let class = if self.temporary { '4' } else { '5' };
        self.reason
            .split([' ', '-'])
            .nth(1)
            .filter(|d| d.starts_with(class) && d.split('.').count() == 3)
            .map(str::to_string)
            .unwrap_or_else(|| format!("{class}.7.1"))
    }

    pub fn reply(&self) -> CleanupReply {
        CleanupReply::Failed {
            temporary: self.temporary,
            dsn: self.dsn.into(),
            reason: self.reason.clone(),
        }
    }

    /// A table could not answer: the message is deferred with Postfix's
    /// generic reply (`451 4.3.0 Error: queue file write error`), the
    /// table and the cause in the log only, never shown to the client.
    fn lookup_failure(id: &str, e: &LookupError, key: &str) -> Refusal {
        warning!(
            "{id}: {} map lookup problem for {key} -- message not accepted, try again later",
            e.table
        );
        Refusal {
            temporary: true,
            dsn: "4.3.0",
            reason: "queue file write error".into(),
        }
    }

    fn write_error(e: io::Error) -> Refusal {
        // A full file system or quota is Postfix's "452 4.3.1 Insufficient
        // system storage": the client should try again later.
        if matches!(e.raw_os_error(), Some(libc::ENOSPC) | Some(libc::EDQUOT)) {
            return Refusal {
                temporary: true,
                dsn: "4.3.1",
                reason: "Insufficient system storage".into(),
            };
        }
        Refusal {
            temporary: true,
            dsn: "4.3.0",
            reason: format!("queue file write error: {e}"),
        }
    }
}

enum Part {
    /// Still in the header section; bytes of the current partial line.
    Headers {
        partial: Vec<u8>,
    },
    Body,
}

/// A message being written.
pub struct Message<'a> {
    settings: &'a Settings,
    tree: &'a QueueTree,
    pub id: String,
    writer: Option<qfile::Writer>,
    new: NewMessage,
    part: Part,
    headers: Vec<Header>,
    header_bytes: usize,
    /// The arrival time written into the file (seconds).
    arrival_secs: u64,
    total: u64,
    refused: Option<Refusal>,
    message_id: Option<String>,
    /// A header or body check said HOLD: the file goes to `hold/`.
    hold: Option<String>,
    /// A header or body check said DISCARD: answered as queued, removed.
    discard: Option<String>,
    /// The after-queue content filter (`transport:nexthop`): the
    /// client's `content_filter`, or a header check's FILTER.
    filter: Option<String>,
    /// A header check's REDIRECT: the one recipient instead of all.
    redirect: Option<String>,
    /// A header check's BCC addresses.
    bcc: Vec<String>,
    /// The unfinished last body line, when body_checks need whole lines.
    body_partial: Vec<u8>,
    /// Where the body is in its MIME structure (for the checks of body
    /// part headers), from the end of the primary headers on.
    mime: Option<MimeWalk>,
    /// The recipients and primary headers are in the file.
    head_written: bool,
    /// The file's name in `incoming/`, made when the message opened, its
    /// directory's fsync run by [`Message::sync_name`].
    named: queue::DirChange,
    /// The recipients kept so far: one copy for a recipient given again.
    dups: DupFilter,
    /// DKIM signing and authentication checks for this message
    /// ([`crate::dkim`]), decided at the end of the header section.
    auth: crate::dkim::Plan,
    /// The content from the header section on, held until Close when
    /// `auth` needs the whole message.
    held: Option<Vec<u8>>,
    /// Where the sender record starts: milters' changes rewrite the file
    /// from there.
    envelope_at: u64,
}

impl<'a> Message<'a> {
    /// Creates the queue file (`Open`): a spare renamed in under a new
    /// ID, or a new file. The envelope follows ([`Message::envelope`]).
    pub fn create(settings: &'a Settings, tree: &'a QueueTree) -> Result<Message<'a>, Refusal> {
        let nf = tree
            .create_recycled(Queue::Incoming)
            .map_err(Refusal::write_error)?;
        // The new name is synced once the Open is answered
        // ([`Message::sync_name`]), while the envelope and the content come.
        let started = queue::dir_changed(&tree.parent(Queue::Incoming, &nf.id))
            .and_then(|named| Ok((named, qfile::Writer::new(nf.file)?)));
        let (named, writer) = match started {
            Ok(s) => s,
            Err(e) => {
                let _ = std::fs::remove_file(tree.path(Queue::Incoming, &nf.id));
                return Err(Refusal::write_error(e));
            }
        };
        Ok(Message {
            settings,
            tree,
            id: nf.id,
            writer: Some(writer),
            new: NewMessage::default(),
            part: Part::Headers {
                partial: Vec::new(),
            },
            headers: Vec::new(),
            header_bytes: 0,
            arrival_secs: 0,
            total: 0,
            refused: None,
            message_id: None,
            hold: None,
            discard: None,
            filter: None,
            redirect: None,
            bcc: Vec::new(),
            mime: None,
            head_written: false,
            body_partial: Vec::new(),
            named,
            dups: DupFilter::new(settings.duplicate_filter_limit),
            auth: crate::dkim::Plan::default(),
            held: None,
            envelope_at: 0,
        })
    }

    /// Waits until the file's name in `incoming/` is on disk (with the
    /// names other threads made meanwhile: one fsync for all). cleanup runs
    /// it right after answering the Open, while the client sends the
    /// envelope and the content, so that the end of data finds it done. A
    /// failure is reported by [`Message::close`], which waits again.
    pub fn sync_name(&self) {
        let _ = queue::sync_dir_wait(&self.tree.parent(Queue::Incoming, &self.id), self.named);
    }

    /// Takes the envelope: rewrites the sender and the recipients
    /// (canonical, virtual aliases) and writes the arrival time, the sender
    /// and the attributes. The recipients are written after the header
    /// section (`sendmail -t` adds some). A refusal is kept for
    /// [`Message::close`] to report.
    pub fn envelope(&mut self, mut new: NewMessage) {
        if new.flags & cleanup_flags::MILTER_DISCARD != 0 {
            self.discard = Some("milter".into());
        }
        if let Err(r) = self.take_envelope(&mut new) {
            // Reported to the client at Close, never bounced: no recipient
            // was accepted.
            new.recipients.clear();
            self.refused.get_or_insert(r);
        }
        self.new = new;
    }

    fn take_envelope(&mut self, new: &mut NewMessage) -> Result<(), Refusal> {
        let settings = self.settings;
        if new.recipients.is_empty() && new.flags & cleanup_flags::EXTRACT_RECIPIENTS == 0 {
            return Err(Refusal {
                temporary: false,
                dsn: "5.1.3",
                reason: "no recipients specified".into(),
            });
        }
        let rw = &settings.rewriter;
        let mappings = new.flags & cleanup_flags::NO_ADDRESS_MAPPINGS == 0;
        new.sender = settings.local_rewrite(&new.sender);
        if mappings {
            new.sender = rw
                .address(&new.sender, "envelope_sender")
                .map_err(|e| Refusal::lookup_failure(&self.id, &e, &new.sender))?;
        }
        // The client's content filter: written with the recipients, after
        // the header checks, whose FILTER overrides it.
        if let Some(i) = new
            .attrs
            .iter()
            .rposition(|(n, _)| n == qfile::attr::FILTER)
        {
            let f = new.attrs[i].1.trim().to_string();
            new.attrs.retain(|(n, _)| n != qfile::attr::FILTER);
            self.filter = (!f.is_empty()).then_some(f);
        }
        let mut recipients = Vec::with_capacity(new.recipients.len());
        for r in std::mem::take(&mut new.recipients) {
            let given = settings.local_rewrite(&r.address);
            for r in rewrite_recipient(&self.id, rw, r, &given, mappings)? {
                if !self.dups.recipient(&r, settings.original_recipient) {
                    recipients.push(r);
                }
            }
        }
        new.recipients = recipients;
        let Some(w) = self.writer.as_mut() else {
            return Ok(());
        };
        let (secs, usecs) = queue::now();
        self.arrival_secs = secs;
        let written = (|| {
            w.arrival(secs, usecs)?;
            let at = w.position();
            w.sender(&new.sender)?;
            // The SMTPUTF8 flags are known only with the headers: written
            // then (write_head).
            // TLS-Required is cleanup's own reading of the header.
            let later = [qfile::attr::SMTPUTF8, qfile::attr::TLS_REQUIRED];
            for (n, v) in new
                .attrs
                .iter()
                .filter(|(n, _)| !later.contains(&n.as_str()))
            {
                w.attribute(n, v)?;
            }
            Ok::<u64, io::Error>(at)
        })();
        self.envelope_at = written.map_err(Refusal::write_error)?;
        Ok(())
    }

    /// Who submitted the message ("smtpd", "pickup", ...), for log lines.
    pub fn origin(&self) -> &str {
        &self.new.origin
    }

    /// Takes the next piece of content.
    pub fn content(&mut self, mut data: &[u8]) {
        if self.refused.is_some() {
            return;
        }
        self.total += data.len() as u64;
        if self.total > self.settings.message_size_limit && self.settings.message_size_limit > 0 {
            self.refused = Some(Refusal {
                temporary: false,
                dsn: "5.3.4",
                reason: "message file too big".into(),
            });
            return;
        }
        let checked = self.body_checked();
        while !data.is_empty() {
            match &mut self.part {
                Part::Body if checked => {
                    self.body_lines(data);
                    return;
                }
                Part::Body => {
                    if let Err(e) = self.put(data) {
                        self.refused = Some(Refusal::write_error(e));
                    }
                    return;
                }
                Part::Headers { partial } => {
                    let nl = data.iter().position(|&b| b == b'\n');
                    let (line_part, rest) = match nl {
                        Some(i) => (&data[..=i], &data[i + 1..]),
                        None => (data, &data[data.len()..]),
                    };
                    partial.extend_from_slice(line_part);
                    data = rest;
                    if nl.is_none() {
                        // A header line longer than the whole header
                        // budget is body text, not a header.
                        if partial.len() > self.settings.header_section_limit() {
                            let line = std::mem::take(partial);
                            self.end_headers(Some(line));
                        }
                        return;
                    }
                    let line = std::mem::take(partial);
                    self.header_line(line);
                }
            }
        }
    }

    fn header_line(&mut self, line: Vec<u8>) {
        let is_blank = line == b"\n" || line == b"\r\n";
        let is_continuation = matches!(line.first(), Some(b' ' | b'\t'));
        if is_blank {
            self.end_headers(Some(line));
        } else if is_continuation && !self.headers.is_empty() {
            // header_size_limit bounds each header, as in Postfix: the
            // excess of a longer one is discarded, and the headers after
            // it stay headers.
            let last = self.headers.last_mut().unwrap();
            if last.text.len() + line.len() <= self.settings.header_size_limit {
                self.header_bytes += line.len();
                last.text.extend_from_slice(&line);
            }
        } else if let Some(name) = headers::header_name(&line) {
            let name = name.to_string();
            let mut line = line;
            if line.len() > self.settings.header_size_limit {
                line.truncate(self.settings.header_size_limit.saturating_sub(1));
                line.push(b'\n');
            }
            self.header_bytes += line.len();
            if self.header_bytes > self.settings.header_section_limit() {
                self.end_headers(Some(line));
            } else {
                self.headers.push(Header { name, text: line });
            }
        } else {
            // Not a header: the body starts without a separating line.
            self.end_headers(Some(line));
        }
    }

    /// The header section is complete: edit it, write the recipients and
    /// the headers, and switch to streaming the body. `first_body` is the
    /// line that ended the headers (blank line or first body line).
    fn end_headers(&mut self, first_body: Option<Vec<u8>>) {
        self.part = Part::Body;
        if let Err(r) = self.write_head(first_body) {
            self.refused = Some(r);
        }
    }

    fn write_head(&mut self, first_body: Option<Vec<u8>>) -> Result<(), Refusal> {
        if self.new.flags & cleanup_flags::EXTRACT_RECIPIENTS != 0 {
            self.extract_recipients()?;
        }
        // After the recipients are known, so that a local submission
        // refused here can be bounced to them (see bounce_all).
        self.check_hops()?;
        self.rewrite_headers()?;
        self.final_recipients()?;
        if self.body_checked() {
            let ct = self
                .headers
                .iter()
                .find(|h| h.is("content-type"))
                .map(|h| h.value());
            self.mime = Some(MimeWalk::new(ct.as_deref()));
        }
        let added = if self.new.flags & cleanup_flags::NO_HEADER_FIXUP == 0 {
            self.missing_headers()
        } else {
            Vec::new()
        };
        if self.message_id.is_none() {
            self.message_id = self
                .headers
                .iter()
                .find(|h| h.is("message-id"))
                .map(|h| h.value());
        }
        let received = self.received_header();
        self.plan_auth(&added)?;
        let first = self
            .write_head_records(received, &added, first_body)
            .map_err(Refusal::write_error)?;
        self.head_written = true;
        match first {
            Some(first) if self.body_checked() => self.body_lines(&first),
            Some(first) => self.put(&first).map_err(Refusal::write_error)?,
            None => {}
        }
        Ok(())
    }

    /// Content from the header section on: into the file, or held for
    /// signing and checking at Close.
    fn put(&mut self, data: &[u8]) -> io::Result<()> {
        match (&mut self.held, self.writer.as_mut()) {
            (Some(held), _) => {
                held.extend_from_slice(data);
                Ok(())
            }
            (None, Some(w)) => w.content(data),
            (None, None) => Err(io::Error::other("no queue file")),
        }
    }

    /// Decides whether the message is signed or checked
    /// ([`crate::dkim`]) once its headers are final; if so, its content
    /// is held until Close. Not on the way to an after-queue content
    /// filter: when it comes back.
    fn plan_auth(&mut self, added: &[String]) -> Result<(), Refusal> {
        let dkim = &self.settings.dkim;
        if self.filter.is_some() || !dkim.enabled() {
            return Ok(());
        }
        let class = dkim.class(&self.new);
        let from = self
            .headers
            .iter()
            .find(|h| h.is("from"))
            .map(|h| h.value())
            .or_else(|| {
                added
                    .iter()
                    .find_map(|a| a.strip_prefix("From: ").map(|v| v.trim_end().to_string()))
            });
        let domain = signing_domain(from, &self.new.sender);
        let plan = dkim.plan(class, &domain).map_err(|e| {
            warning!("{}: {e}", self.id);
            Refusal {
                temporary: true,
                dsn: "4.3.0",
                reason: "queue file write error".into(),
            }
        })?;
        if plan.any() {
            self.held = Some(Vec::new());
        }
        self.auth = plan;
        Ok(())
    }

    /// Whether address mappings apply (not with `no_address_mappings`).
    fn mappings(&self) -> bool {
        self.new.flags & cleanup_flags::NO_ADDRESS_MAPPINGS == 0
    }

    /// Whether header and body checks apply: not to notifications, not
    /// with `no_header_body_checks`.
    fn checks_on(&self) -> bool {
        self.new.flags & (cleanup_flags::NOTIFICATION | cleanup_flags::NO_HEADER_BODY_CHECKS) == 0
    }

    /// A header check's REDIRECT, and the automatic bcc recipients
    /// (`always_bcc`, `sender_bcc_maps`, `recipient_bcc_maps`, a header
    /// check's BCC), as Postfix's cleanup: the maps and `always_bcc` not
    /// for notifications or forwarded copies, nor with
    /// `no_address_mappings`. Each copy is a recipient with NOTIFY=NEVER
    /// (no notice about it reaches the sender), rewritten like any other,
    /// and kept once however many rules name it.
    fn final_recipients(&mut self) -> Result<(), Refusal> {
        let s = self.settings;
        if let Some(to) = self.redirect.clone() {
            let to = s.local_rewrite(&to);
            let first = self.new.recipients.first().cloned().unwrap_or_default();
            let original = if first.original.is_empty() {
                first.address
            } else {
                first.original
            };
            self.new.recipients = rewrite_recipient(
                &self.id,
                &s.rewriter,
                Recipient::new(&to),
                &to,
                self.mappings(),
            )?
            .into_iter()
            .map(|r| Recipient {
                original: original.clone(),
                ..r
            })
            .collect();
            // REDIRECT overrides FILTER, as in Postfix.
            self.filter = None;
        }
        let mut copies = std::mem::take(&mut self.bcc);
        let automatic = self.mappings()
            && self.new.flags & (cleanup_flags::NOTIFICATION | cleanup_flags::NO_HEADER_FIXUP) == 0;
        if automatic {
            if !s.always_bcc.is_empty() {
                copies.push(s.always_bcc.clone());
            }
            let sender = &self.new.sender;
            let bcc = s.rewriter.sender_bcc(sender);
            if let Some(b) = bcc.map_err(|e| Refusal::lookup_failure(&self.id, &e, sender))? {
                copies.push(b);
            }
            for r in &self.new.recipients {
                let bcc = s.rewriter.recipient_bcc(&r.address);
                if let Some(b) =
                    bcc.map_err(|e| Refusal::lookup_failure(&self.id, &e, &r.address))?
                {
                    copies.push(b);
                }
            }
        }
        for c in copies {
            let a = s.local_rewrite(c.trim());
            let copy = Recipient {
                notify: qfile::NOTIFY_NEVER,
                ..Recipient::new(&a)
            };
            for r in rewrite_recipient(&self.id, &s.rewriter, copy, &a, self.mappings())? {
                if !self.dups.recipient(&r, s.original_recipient) {
                    self.new.recipients.push(r);
                }
            }
        }
        Ok(())
    }

    /// Recipients from the headers (sendmail -t): Resent- headers win
    /// when there are any, as in Postfix.
    fn extract_recipients(&mut self) -> Result<(), Refusal> {
        let s = self.settings;
        let resent = self
            .headers
            .iter()
            .any(|h| h.is("resent-to") || h.is("resent-cc") || h.is("resent-bcc"));
        let names: &[&str] = if resent {
            &["resent-to", "resent-cc", "resent-bcc"]
        } else {
            &["to", "cc", "bcc"]
        };
        // Duplicates, of the envelope's recipients too, are dropped
        // through the message's filter (a set: a header list of
        // 50,000 addresses must not take quadratic time).
        for h in self
            .headers
            .iter()
            .filter(|h| names.iter().any(|n| h.is(n)))
        {
            for a in headers::addresses(&h.value()) {
                let a = s.local_rewrite(&a);
                for r in rewrite_recipient(
                    &self.id,
                    &s.rewriter,
                    Recipient::new(&a),
                    &a,
                    self.mappings(),
                )? {
                    if !self.dups.recipient(&r, s.original_recipient) {
                        self.new.recipients.push(r);
                    }
                }
            }
        }
        if self.new.recipients.is_empty() {
            return Err(Refusal {
                temporary: false,
                dsn: "5.1.3",
                reason: "No recipient addresses found in message header".into(),
            });
        }
        Ok(())
    }

    /// More Received: and Delivered-To: headers than `hopcount_limit`:
    /// a mail loop.
    fn check_hops(&self) -> Result<(), Refusal> {
        let hops = self
            .headers
            .iter()
            .filter(|h| h.is("received") || h.is("delivered-to"))
            .count();
        if hops > self.settings.hopcount_limit {
            return Err(Refusal {
                temporary: false,
                dsn: "5.4.6",
                reason: "too many hops".into(),
            });
        }
        Ok(())
    }

    /// The Message-Id:, Date: and From: headers the message lacks (each
    /// counting its Resent- form), as lines to append; a new Message-Id
    /// is kept for the log.
    fn missing_headers(&mut self) -> Vec<String> {
        let s = self.settings;
        let mut added: Vec<String> = Vec::new();
        let now = postern_common::time::now_secs();
        if !self
            .headers
            .iter()
            .any(|h| h.is("message-id") || h.is("resent-message-id"))
        {
            let mid = format!("<{}.{}@{}>", date_stamp(now), self.id, s.myhostname);
            added.push(format!("Message-Id: {mid}\n"));
            self.message_id = Some(mid);
        }
        if !self
            .headers
            .iter()
            .any(|h| h.is("date") || h.is("resent-date"))
        {
            added.push(format!(
                "Date: {}\n",
                postern_common::time::rfc5322_date(now)
            ));
        }
        if !self
            .headers
            .iter()
            .any(|h| h.is("from") || h.is("resent-from"))
        {
            let from = if self.new.sender.is_empty() {
                format!("MAILER-DAEMON@{}", s.myhostname)
            } else {
                self.new.sender.clone()
            };
            let full = self
                .new
                .attrs
                .iter()
                .find(|(n, _)| n == qfile::attr::FULL_NAME)
                .map(|(_, v)| v.clone());
            added.push(match full {
                Some(name) if !name.is_empty() => {
                    format!("From: \"{}\" <{from}>\n", name.replace('"', ""))
                }
                _ => format!("From: {from}\n"),
            });
        }
        added
    }

    /// RFC 8689 section 5: `TLS-Required: No` in the header section of a
    /// message without REQUIRETLS asks that the recipient's TLS policy
    /// (DANE, MTA-STS, a `secure` level) not stop its delivery; with
    /// REQUIRETLS the header is ignored.
    fn tls_optional(&self) -> bool {
        let requiretls = self
            .new
            .attrs
            .iter()
            .any(|(n, _)| n == qfile::attr::REQUIRETLS);
        !requiretls
            && self
                .headers
                .iter()
                .any(|h| h.is("tls-required") && h.value().eq_ignore_ascii_case("no"))
    }

    /// The pool or source an `X-Postern-Pool:`/`X-Virtual-MTA:` header
    /// names, when the client may choose one: in `mynetworks`,
    /// authenticated, or local (sendmail). From others it is ignored
    /// (and removed all the same).
    fn pool_header(&self) -> Option<String> {
        let h = self
            .headers
            .iter()
            .find(|h| qfile::POOL_HEADERS.iter().any(|p| h.is(p)))?;
        let value = h.value().trim().to_string();
        if value.is_empty() {
            return None;
        }
        use crate::dkim::Class;
        match self.settings.dkim.class(&self.new) {
            Class::Local | Class::Authenticated | Class::Mynetworks => Some(value),
            _ => {
                info!(
                    "{}: {} header from an untrusted client ignored and removed",
                    self.id, h.name
                );
                None
            }
        }
    }

    /// Mail from sendmail (through pickup) gets Postfix's trace header:
    /// Received: by HOST (Postern, from userid N) id ID; DATE.
    fn received_header(&self) -> Option<String> {
        let attr = |name: &str| {
            self.new
                .attrs
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, v)| v.as_str())
        };
        match (attr(qfile::attr::PROTOCOL), attr(qfile::attr::SUBMITTER)) {
            (Some("sendmail"), Some(sub)) => Some(format!(
                "Received: by {} (Postern, from userid {})\n\tid {}; {}\n",
                self.settings.myhostname,
                sub.trim_start_matches("uid="),
                self.id,
                postern_common::time::rfc5322_date(postern_common::time::now_secs())
            )),
            _ => None,
        }
    }

    /// Writes the SMTPUTF8 flags, the recipients, and the header section:
    /// `received`, the kept headers (less `message_drop_headers`), the
    /// `added` ones, and the line that ended the section. Returns the
    /// first body line when the body started without a blank line (one is
    /// written before it), for the caller to write as body.
    fn write_head_records(
        &mut self,
        received: Option<String>,
        added: &[String],
        first_body: Option<Vec<u8>>,
    ) -> io::Result<Option<Vec<u8>>> {
        let drop = &self.settings.drop_headers;
        let utf8 = self.smtputf8_flags(added);
        let tls_optional = self.tls_optional();
        let pool = self.pool_header();
        // RFC 8601 section 5: results claiming to be ours, in mail from
        // outside, are forgeries.
        let strip_results = self.auth.check;
        let dkim = &self.settings.dkim;
        let w = self
            .writer
            .as_mut()
            .ok_or_else(|| io::Error::from(io::ErrorKind::Other))?;
        if utf8 != smtputf8::Flags::default() {
            w.attribute(qfile::attr::SMTPUTF8, &utf8.value())?;
        }
        if let Some(f) = &self.filter {
            w.attribute(qfile::attr::FILTER, f)?;
        }
        if tls_optional {
            w.attribute(qfile::attr::TLS_REQUIRED, "no")?;
        }
        if let Some(p) = &pool {
            w.attribute(qfile::attr::POOL, p)?;
        }
        for r in &self.new.recipients {
            w.recipient(r)?;
        }
        w.begin_content()?;
        let held = &mut self.held;
        let mut put = |data: &[u8]| -> io::Result<()> {
            match held {
                Some(b) => {
                    b.extend_from_slice(data);
                    Ok(())
                }
                None => w.content(data),
            }
        };
        if let Some(r) = &received {
            put(r.as_bytes())?;
        }
        for h in &self.headers {
            if strip_results && h.is("authentication-results") && dkim.is_our_results(&h.value()) {
                info!(
                    "{}: removed a forged Authentication-Results header for {}",
                    self.id, self.settings.myhostname
                );
                continue;
            }
            // X-Postern-Pool:/X-Virtual-MTA: never leave (whoever sent them).
            if qfile::POOL_HEADERS.iter().any(|p| h.is(p)) {
                continue;
            }
            if !drop.iter().any(|d| h.name.eq_ignore_ascii_case(d)) {
                put(&h.text)?;
            }
        }
        for a in added {
            put(a.as_bytes())?;
        }
        if let Some(line) = first_body {
            if line != b"\n" && line != b"\r\n" {
                // The body started without a blank line: add one so the
                // stored message has a well-formed header section.
                put(b"\n")?;
                Ok(Some(line))
            } else {
                put(&line)?;
                Ok(None)
            }
        } else {
            put(b"\n")?;
            Ok(None)
        }
    }

    /// The message's SMTPUTF8 flags, as Postfix's cleanup sets them: what
    /// the client said (`requested`), whether a header or the sender is
    /// not ASCII, and `requested` also when the message's source is one of
    /// `smtputf8_autodetect_classes` and its envelope or headers hold
    /// UTF-8. `added`: the headers cleanup adds.
    fn smtputf8_flags(&self, added: &[String]) -> smtputf8::Flags {
        let given = smtputf8::Flags::from_attrs(
            self.new.attrs.iter().map(|(n, v)| (n.as_str(), v.as_str())),
        );
        if !self.settings.smtputf8_enable {
            return given;
        }
        let header =
            self.headers.iter().any(|h| !h.text.is_ascii()) || added.iter().any(|h| !h.is_ascii());
        let sender = smtputf8::is_utf8_address(&self.new.sender);
        let recipient = self
            .new
            .recipients
            .iter()
            .any(|r| smtputf8::is_utf8_address(&r.address));
        let autodetect = smtputf8::Source::of_origin(&self.new.origin)
            .is_some_and(|src| self.settings.smtputf8_autodetect.covers(src));
        smtputf8::Flags {
            requested: given.requested || (autodetect && (header || sender || recipient)),
            header,
            sender,
        }
    }

    fn body_checked(&self) -> bool {
        self.checks_on() && self.settings.rewriter.checks.inspects_body()
    }

    /// Body content, line by line through `body_checks`.
    fn body_lines(&mut self, mut data: &[u8]) {
        while !data.is_empty() && self.refused.is_none() {
            let nl = data.iter().position(|&b| b == b'\n');
            let (part, rest) = match nl {
                Some(i) => (&data[..=i], &data[i + 1..]),
                None => (data, &data[data.len()..]),
            };
            self.body_partial.extend_from_slice(part);
            data = rest;
            // A very long line is checked in pieces, as Postfix does.
            if nl.is_some() || self.body_partial.len() >= 64 * 1024 {
                let line = std::mem::take(&mut self.body_partial);
                self.body_line(line);
            }
        }
    }

    /// One body line: through the MIME walk, so that body part headers
    /// meet `mime_header_checks`/`nested_header_checks` and the rest
    /// `body_checks`.
    fn body_line(&mut self, line: Vec<u8>) {
        let pieces = match &mut self.mime {
            Some(m) => m.feed(line),
            None => vec![Piece::Body(line)],
        };
        self.body_pieces(pieces);
    }

    fn body_pieces(&mut self, pieces: Vec<Piece>) {
        for p in pieces {
            let out: Vec<Vec<u8>> = match p {
                Piece::Body(line) => {
                    let text = String::from_utf8_lossy(line.trim_ascii_end()).into_owned();
                    let action = self.settings.rewriter.checks.check_body_line(&line);
                    let action = self.or_lookup_failure(action, &text);
                    match self.apply("body", &text, action) {
                        Applied::Keep => vec![line],
                        Applied::Drop => vec![],
                        Applied::Replace(t) => vec![format!("{t}\n").into_bytes()],
                        Applied::Prepend(t) => vec![format!("{t}\n").into_bytes(), line],
                    }
                }
                Piece::Header { class, text } => {
                    let shown = String::from_utf8_lossy(&text).replace(['\r', '\n'], "");
                    let action = self.settings.rewriter.checks.check_header(class, &text);
                    let action = self.or_lookup_failure(action, &shown);
                    match self.apply("header", &shown, action) {
                        Applied::Keep => vec![text],
                        Applied::Drop => vec![],
                        Applied::Replace(t) => vec![format!("{t}\n").into_bytes()],
                        Applied::Prepend(t) => vec![format!("{t}\n").into_bytes(), text],
                    }
                }
            };
            for l in out {
                if let Err(e) = self.put(&l) {
                    self.refused = Some(Refusal::write_error(e));
                    return;
                }
            }
        }
    }

    /// A check whose table could not answer refuses the message (4.3.0,
    /// deferred by the client) instead of letting it pass unchecked.
    fn or_lookup_failure(&mut self, action: Result<Action, LookupError>, text: &str) -> Action {
        action.unwrap_or_else(|e| {
            self.refused
                .get_or_insert(Refusal::lookup_failure(&self.id, &e, text));
            Action::Keep
        })
    }

    /// Carries out a header or body check action; logs it as Postfix
    /// does (`ID: reject: header Subject: ...; from=<...> to=<...>: text`).
    /// REDIRECT, BCC and FILTER change the envelope, which is written
    /// when the primary headers end: from a body line or a body part's
    /// header they come too late, and the message is held instead (never
    /// delivered without the filter it asked for), with an error logged.
    fn apply(&mut self, what: &str, text: &str, action: Action) -> Applied {
        let shown: String = text.chars().take(200).collect();
        let to = self
            .new
            .recipients
            .first()
            .map(|r| r.address.clone())
            .unwrap_or_default();
        let log = |word: &str, reason: &str| {
            info!(
                "{}: {word}: {what} {shown} from {}; from=<{}> to=<{to}>{}",
                self.id,
                self.new.origin,
                self.new.sender,
                if reason.is_empty() {
                    String::new()
                } else {
                    format!(": {reason}")
                }
            );
        };
        let envelope_written = self.head_written;
        let temporary = matches!(action, Action::Defer(_));
        match action {
            Action::Redirect(_) | Action::Bcc(_) | Action::Filter(_) if envelope_written => {
                postern_common::error!(
                    "{}: {what} check action {action:?} comes after the envelope is written \
                     (use header_checks); message held",
                    self.id
                );
                log("hold", "envelope action in the message body");
                self.hold.get_or_insert_with(String::new);
                Applied::Keep
            }
            Action::Keep => Applied::Keep,
            Action::Ignore => Applied::Drop,
            Action::Warn(t) => {
                log("warning", &t);
                Applied::Keep
            }
            Action::Info(t) => {
                log("info", &t);
                Applied::Keep
            }
            Action::Reject(t) | Action::Defer(t) => {
                let (word, dsn, default) = if temporary {
                    ("defer", "4.7.1", "message content deferred")
                } else {
                    ("reject", "5.7.1", "message content rejected")
                };
                let t = if t.is_empty() { default.to_string() } else { t };
                log(word, &format!("{dsn} {t}"));
                if self.refused.is_none() {
                    self.refused = Some(Refusal {
                        temporary,
                        dsn,
                        reason: t,
                    });
                }
                Applied::Keep
            }
            Action::Discard(t) => {
                log("discard", &t);
                self.discard.get_or_insert(t);
                Applied::Keep
            }
            Action::Hold(t) => {
                log("hold", &t);
                self.hold.get_or_insert(t);
                Applied::Keep
            }
            Action::Redirect(a) => {
                log("redirect", &a);
                self.redirect = Some(a);
                Applied::Keep
            }
            Action::Bcc(a) => {
                log("bcc", &a);
                self.bcc.push(a);
                Applied::Keep
            }
            Action::Filter(f) => {
                log("filter", &f);
                self.filter = Some(f);
                Applied::Keep
            }
            Action::Replace(t) => Applied::Replace(t),
            Action::Prepend(t) => Applied::Prepend(t),
        }
    }

    /// header_checks (mime_header_checks for the MIME headers), then
    /// canonical/masquerade rewriting of the addresses in sender and
    /// recipient headers.
    fn rewrite_headers(&mut self) -> Result<(), Refusal> {
        let check = self.checks_on() && self.settings.rewriter.checks.has_header_checks();
        let mappings = self.mappings();
        let old = std::mem::take(&mut self.headers);
        let mut out = Vec::with_capacity(old.len());
        for mut h in old {
            if check {
                let class = HeaderClass::of(&h.name, true);
                let text = String::from_utf8_lossy(&h.text)
                    .replace(['\r', '\n'], "")
                    .to_string();
                let action = match self.settings.rewriter.checks.check_header(class, &h.text) {
                    Ok(a) => a,
                    Err(e) => {
                        self.refused
                            .get_or_insert(Refusal::lookup_failure(&self.id, &e, &text));
                        Action::Keep
                    }
                };
                match self.apply("header", &text, action) {
                    Applied::Keep => {}
                    Applied::Drop => continue,
                    Applied::Replace(t) => match headers::header_name(t.as_bytes()) {
                        Some(n) => {
                            h = Header {
                                name: n.to_string(),
                                text: format!("{t}\n").into_bytes(),
                            }
                        }
                        None => continue,
                    },
                    Applied::Prepend(t) => {
                        if let Some(n) = headers::header_name(t.as_bytes()) {
                            out.push(Header {
                                name: n.to_string(),
                                text: format!("{t}\n").into_bytes(),
                            });
                        }
                    }
                }
            }
            if let Some(class) = rewrite::header_class(&h.name).filter(|_| mappings) {
                let mut text = String::from_utf8_lossy(&h.text).into_owned();
                let mut changed = false;
                for a in headers::addresses(&h.value()) {
                    let q = self.settings.local_rewrite(&a);
                    let n = match self.settings.rewriter.address(&q, class) {
                        Ok(n) => n,
                        Err(e) => {
                            self.refused
                                .get_or_insert(Refusal::lookup_failure(&self.id, &e, &q));
                            q.clone()
                        }
                    };
                    if n != q && !a.is_empty() {
                        text = text.replace(&a, &n);
                        changed = true;
                    }
                }
                if changed {
                    h.text = text.into_bytes();
                }
            }
            out.push(h);
        }
        self.headers = out;
        match self.refused.take() {
            Some(r) => Err(r),
            None => Ok(()),
        }
    }

    /// Makes the file durable and reports the queue ID, or refuses.
    pub fn close(mut self) -> Result<String, Refusal> {
        if self.refused.is_none() {
            if let Part::Headers { partial } = &mut self.part {
                // Content ended inside the header section.
                let line = std::mem::take(partial);
                if !line.is_empty() {
                    self.header_line(line);
                }
                if matches!(self.part, Part::Headers { .. }) {
                    self.end_headers(None);
                }
            }
        }
        if self.refused.is_none() && !self.body_partial.is_empty() {
            let line = std::mem::take(&mut self.body_partial);
            self.body_line(line);
        }
        if let Some(rest) = self.mime.as_mut().map(MimeWalk::finish) {
            if self.refused.is_none() {
                self.body_pieces(rest);
            }
        }
        // With milters, the signature comes after them, over the message
        // as they leave it (the checks' Authentication-Results before
        // them, for them to see): the held content is written unsigned
        // here, and signed when the milters' verdict is in. Without
        // milters, signed here, with no read-back.
        let sign_after_milters = self.refused.is_none()
            && self.discard.is_none()
            && self.filter.is_none()
            && self.settings.dkim.enabled()
            && !matches!(self.milter_list(), Ok(None));
        if sign_after_milters {
            self.auth.sign = None;
        }
        if self.refused.is_none() {
            self.sign_and_check();
        }
        if let Some(r) = self.refused.take() {
            self.discard();
            // A refused envelope (no recipient kept) is only reported.
            if !r.temporary
                && self.new.flags & cleanup_flags::BOUNCE_ON_REFUSAL != 0
                && !self.new.recipients.is_empty()
            {
                match self.bounce_all(&r) {
                    Ok(id) => return Ok(id),
                    Err(e) => warning!("{}: cannot bounce the refused message: {e}", self.id),
                }
            }
            return Err(r);
        }
        if self.discard.is_none() {
            if let Err(r) = self.milters(sign_after_milters) {
                self.discard();
                return Err(r);
            }
        }
        if self.discard.is_some() {
            // Answered as queued, as Postfix does; nothing is delivered.
            self.discard();
            return Ok(self.id.clone());
        }
        let mut dir = Queue::Incoming;
        if self.hold.is_some() {
            // Renamed before it is complete, so qmgr never sees it.
            if let Err(e) = self.tree.rename(&self.id, Queue::Incoming, Queue::Hold) {
                self.discard();
                return Err(Refusal::write_error(e));
            }
            dir = Queue::Hold;
        }
        let w = self.writer.take().expect("writer present until close");
        // The accounting log's Reception records, from what was written
        // (the file itself may be in qmgr's hands once it is complete).
        let reception = postern_common::accounting::enabled().then(|| qfile::Envelope {
            arrival_secs: self.arrival_secs,
            sender: self.new.sender.clone(),
            attrs: self.new.attrs.clone(),
            recipients: self
                .new
                .recipients
                .iter()
                .map(|r| qfile::QueuedRecipient {
                    offset: 0,
                    done: false,
                    rcpt: r.clone(),
                })
                .collect(),
            content_size: w.content_size(),
            ..Default::default()
        });
        let done = w.finish().and_then(|_| match dir {
            // Its name in incoming/, synced since the message opened
            // (sessions that end together share the fsync).
            Queue::Incoming => queue::sync_dir_wait(&self.tree.parent(dir, &self.id), self.named),
            _ => queue::sync_dir_grouped(&self.tree.parent(dir, &self.id))
                .and_then(|_| queue::sync_dir(&self.tree.parent(Queue::Incoming, &self.id))),
        });
        match done {
            Ok(()) => {
                let mid = self.message_id.clone().unwrap_or_default();
                info!("{}: message-id={}", self.id, mid);
                if let Some(env) = reception {
                    postern_common::accounting::message_event(
                        postern_common::accounting::Kind::Reception,
                        &self.id,
                        &env,
                        None,
                        "",
                    );
                }
                Ok(self.id.clone())
            }
            Err(e) => {
                self.discard();
                Err(Refusal::write_error(e))
            }
        }
    }

    /// The held content, signed or checked ([`crate::dkim`]), with the
    /// new headers on top, into the file.
    fn sign_and_check(&mut self) {
        let Some(held) = self.held.take() else {
            return;
        };
        match self
            .settings
            .dkim
            .finish(&self.id, &self.auth, &self.new, &held)
        {
            Ok(out) => {
                if let Some(why) = out.reject {
                    info!("{}: reject: {why}", self.id);
                    self.refused = Some(Refusal {
                        temporary: false,
                        dsn: "5.7.1",
                        reason: format!("rejected by DMARC policy: {why}"),
                    });
                    return;
                }
                if let Some(why) = out.hold {
                    info!("{}: hold: {why}", self.id);
                    self.hold.get_or_insert(why);
                }
                for h in &out.prepend {
                    if let Err(e) = self.put(h.as_bytes()) {
                        self.refused = Some(Refusal::write_error(e));
                        return;
                    }
                }
            }
            Err(e) => {
                warning!("{}: {e}", self.id);
                self.refused = Some(Refusal {
                    temporary: true,
                    dsn: "4.7.0",
                    reason: "DKIM signing failed; try again later".into(),
                });
                return;
            }
        }
        if let Err(e) = self.put(&held) {
            self.refused = Some(Refusal::write_error(e));
        }
    }

    /// The milter list of the message's origin (none for notifications
    /// or with `no_milters`); Err: a list that cannot be used.
    fn milter_list(
        &self,
    ) -> Result<Option<std::borrow::Cow<'a, postern_common::milter::Settings>>, String> {
        let settings: &'a Settings = self.settings;
        if self.new.flags & (cleanup_flags::NOTIFICATION | cleanup_flags::NO_MILTERS) != 0 {
            Ok(None)
        } else if self.new.origin == "smtpd" {
            // smtpd_milter_maps: the list smtpd chose for this client.
            let client = crate::milter::client_ip(&self.new.attrs);
            settings.milters.for_smtpd_client(client)
        } else {
            match &settings.milters.non_smtpd {
                Ok(o) => Ok(o.as_ref().map(std::borrow::Cow::Borrowed)),
                Err(e) => Err(e.clone()),
            }
        }
    }

    /// The milters of the message's origin (none for notifications):
    /// their verdict, and their changes written into the file. With
    /// `sign`, the message as the milters leave it is then DKIM-signed
    /// (the key chosen by its final From:), the signature written with
    /// their changes in the one rewrite.
    fn milters(&mut self, sign: bool) -> Result<(), Refusal> {
        let list = self.milter_list();
        // A milter list that cannot be used: refused for now, as Postfix.
        let list = list.map_err(|e| {
            warning!("{}: {e}", self.id);
            Refusal {
                temporary: true,
                dsn: "4.3.5",
                reason: "Server configuration error".into(),
            }
        })?;
        let Some(list) = list else {
            return Ok(());
        };
        let from_smtpd = self.new.origin == "smtpd";
        let w = self
            .writer
            .as_mut()
            .ok_or_else(|| Refusal::write_error(io::Error::other("no queue file")))?;
        let records = w
            .read_back(self.envelope_at)
            .map_err(Refusal::write_error)?;
        let mut parts = crate::milter::Parts::read(records);
        let resolver = &self.settings.milters.resolver;
        match crate::milter::inspect(&list, resolver, &self.id, &mut parts, from_smtpd) {
            crate::milter::Verdict::Refuse { temporary, reply } => {
                info!(
                    "{}: milter-{}: END-OF-MESSAGE from {}: {}",
                    self.id,
                    if temporary { "tempfail" } else { "reject" },
                    self.new.origin,
                    reply
                );
                Err(Refusal {
                    temporary,
                    dsn: MILTER_DSN,
                    reason: reply,
                })
            }
            crate::milter::Verdict::Discard(why) => {
                info!("{}: milter-discard: END-OF-MESSAGE: {why}", self.id);
                self.discard = Some(why);
                Ok(())
            }
            crate::milter::Verdict::Accept => {
                self.milter_recipients(&mut parts)?;
                self.milter_header_checks(&mut parts)?;
                if let Some(q) = parts.quarantine.take() {
                    info!("{}: milter-hold: END-OF-MESSAGE: {q}", self.id);
                    self.hold = Some(q);
                }
                if sign {
                    self.sign_parts(&mut parts)?;
                }
                if parts.changed {
                    let w = self.writer.as_mut().expect("writer present");
                    w.rewind(self.envelope_at)
                        .and_then(|_| parts.write(w))
                        .map_err(Refusal::write_error)?;
                    self.new.sender = parts.sender.clone();
                    self.new.recipients = parts.recipients.clone();
                }
                if parts.recipients.is_empty() {
                    return Err(Refusal {
                        temporary: false,
                        dsn: "5.1.3",
                        reason: "no recipients left after the milters".into(),
                    });
                }
                Ok(())
            }
        }
    }

    /// Recipients the milters added go through `virtual_alias_maps`, as
    /// in Postfix (not canonical mapping: they are taken as final
    /// addresses); duplicates of recipients already there are dropped.
    fn milter_recipients(&mut self, parts: &mut crate::milter::Parts) -> Result<(), Refusal> {
        let added = std::mem::take(&mut parts.added);
        for r in added {
            let a = self.settings.local_rewrite(&r.address);
            let expanded = if self.mappings() {
                self.settings
                    .rewriter
                    .virtual_alias(&a)
                    .map_err(|e| match e {
                        AliasError::Limit(reason) => Refusal {
                            temporary: false,
                            dsn: "5.4.6",
                            reason,
                        },
                        AliasError::Lookup(e) => Refusal::lookup_failure(&self.id, &e, &a),
                    })?
            } else {
                vec![a.clone()]
            };
            for address in expanded {
                let new = Recipient {
                    original: if address == a {
                        String::new()
                    } else {
                        a.clone()
                    },
                    address,
                    notify: r.notify,
                    orcpt: r.orcpt.clone(),
                };
                let dup = parts.recipients.iter().any(|o| {
                    o.address == new.address && o.original_or_address() == new.original_or_address()
                });
                if !dup {
                    parts.recipients.push(new);
                }
            }
        }
        Ok(())
    }

    /// `milter_header_checks` on the headers the milters added or
    /// changed: header_checks(5) actions, as Postfix (PREPEND is not
    /// carried out there either; after REDIRECT or DISCARD no header is
    /// looked at). REDIRECT, BCC and FILTER change the envelope that is
    /// written again with the milters' changes.
    fn milter_header_checks(&mut self, parts: &mut crate::milter::Parts) -> Result<(), Refusal> {
        let tables = &self.settings.milters.header_checks;
        if tables.is_empty() || !self.checks_on() {
            return Ok(());
        }
        let mut i = 0;
        while i < parts.headers.len() {
            if !parts.from_milter.get(i).copied().unwrap_or(false) {
                i += 1;
                continue;
            }
            // One logical header, folded lines joined (as header_checks).
            let text = String::from_utf8_lossy(&parts.headers[i])
                .trim_end_matches(['\r', '\n'])
                .replace(['\r', '\n'], "");
            let action = match Action::lookup(tables, &text) {
                Ok(a) => a,
                Err(e) => return Err(Refusal::lookup_failure(&self.id, &e, &text)),
            };
            match action {
                Action::Redirect(a) => {
                    self.log_milter_check("redirect", &text, &a);
                    let a = self.settings.local_rewrite(a.trim());
                    parts.recipients = vec![Recipient::new(&a)];
                    parts.changed = true;
                    // As Postfix: no more checks after REDIRECT.
                    return Ok(());
                }
                Action::Bcc(a) => {
                    self.log_milter_check("bcc", &text, &a);
                    let a = self.settings.local_rewrite(a.trim());
                    parts.recipients.push(Recipient {
                        notify: qfile::NOTIFY_NEVER,
                        ..Recipient::new(&a)
                    });
                    parts.changed = true;
                }
                Action::Filter(f) => {
                    self.log_milter_check("filter", &text, &f);
                    parts.attrs.retain(|(n, _)| n != qfile::attr::FILTER);
                    parts.attrs.push((qfile::attr::FILTER.to_string(), f));
                    parts.changed = true;
                }
                Action::Prepend(_) => {}
                other => match self.apply("header", &text, other) {
                    Applied::Keep | Applied::Prepend(_) => {}
                    Applied::Drop => {
                        parts.headers.remove(i);
                        parts.from_milter.remove(i);
                        parts.changed = true;
                        continue;
                    }
                    Applied::Replace(t) => {
                        if headers::header_name(t.as_bytes()).is_some() {
                            parts.headers[i] = format!("{t}\n").into_bytes();
                        } else {
                            parts.headers.remove(i);
                            parts.from_milter.remove(i);
                            parts.changed = true;
                            continue;
                        }
                        parts.changed = true;
                    }
                },
            }
            if let Some(r) = self.refused.take() {
                return Err(r);
            }
            if self.discard.is_some() {
                // As Postfix: no more checks after DISCARD.
                return Ok(());
            }
            i += 1;
        }
        Ok(())
    }

    fn log_milter_check(&self, word: &str, text: &str, arg: &str) {
        let shown: String = text.chars().take(200).collect();
        info!(
            "{}: {word}: header {shown} from {}; from=<{}>: {arg}",
            self.id, self.new.origin, self.new.sender
        );
    }

    /// Signs the message as the milters left it: the signing table is
    /// asked for the domain of its final From: (or sender), and the
    /// DKIM-Signature goes on top of the header section.
    fn sign_parts(&mut self, parts: &mut crate::milter::Parts) -> Result<(), Refusal> {
        let dkim = &self.settings.dkim;
        let from = parts
            .headers
            .iter()
            .find(|h| headers::header_name(h).is_some_and(|n| n.eq_ignore_ascii_case("from")))
            .map(|h| {
                let s = String::from_utf8_lossy(h);
                let v = s.split_once(':').map(|(_, v)| v).unwrap_or("");
                v.replace(['\r', '\n'], "").trim().to_string()
            });
        let domain = signing_domain(from, &parts.sender);
        let class = dkim.class(&self.new);
        let temporary = |e: String| {
            warning!("{}: {e}", self.id);
            Refusal {
                temporary: true,
                dsn: "4.7.0",
                reason: "DKIM signing failed; try again later".into(),
            }
        };
        let plan = dkim.plan(class, &domain).map_err(temporary)?;
        if plan.sign.is_none() {
            return Ok(());
        }
        let plan = crate::dkim::Plan {
            sign: plan.sign,
            check: false,
        };
        let mut content = Vec::with_capacity(parts.body.len() + 4096);
        for h in &parts.headers {
            content.extend_from_slice(h);
        }
        content.push(b'\n');
        content.extend_from_slice(&parts.body);
        let out = dkim
            .finish(&self.id, &plan, &self.new, &content)
            .map_err(temporary)?;
        for (i, h) in out.prepend.iter().enumerate() {
            parts.headers.insert(i, h.as_bytes().to_vec());
        }
        parts.changed = true;
        Ok(())
    }

    /// A local submission refused for good (too many hops, a REJECT of
    /// header_checks, ...) becomes a bounce, as in Postfix: a new queue
    /// file with the sender, every recipient already done, and the header
    /// section; each recipient's reason in its bounce log. qmgr finds
    /// nothing to deliver and sends the sender the non-delivery notice.
    /// The file is complete and durable before cleanup answers Queued.
    fn bounce_all(&self, r: &Refusal) -> io::Result<String> {
        if self.new.recipients.is_empty() {
            return Err(io::Error::other("no recipients to bounce"));
        }
        let nf = self.tree.create_recycled(Queue::Incoming)?;
        let id = nf.id.clone();
        let written = (|| {
            let mut w = qfile::Writer::new(nf.file.try_clone()?)?;
            let (secs, usecs) = queue::now();
            w.arrival(secs, usecs)?;
            w.sender(&self.new.sender)?;
            for (n, v) in &self.new.attrs {
                w.attribute(n, v)?;
            }
            let mut entries = Vec::with_capacity(self.new.recipients.len());
            for rcpt in &self.new.recipients {
                let at = w.done_recipient(rcpt)?;
                entries.push(LogEntry::new(
                    at,
                    rcpt,
                    &r.dsn_text(),
                    "failed",
                    "none",
                    &r.reason,
                ));
            }
            w.begin_content()?;
            for h in &self.headers {
                w.content(&h.text)?;
            }
            w.content(b"\n")?;
            for e in &entries {
                delivery::append_log(self.tree, MessageLog::Bounce, &id, e)?;
            }
            w.finish()?;
            queue::sync_dir_grouped(&self.tree.parent(Queue::Incoming, &id))
        })();
        if let Err(e) = written {
            let _ = std::fs::remove_file(&nf.path);
            let _ = std::fs::remove_file(self.tree.log_path(MessageLog::Bounce, &id));
            return Err(e);
        }
        info!(
            "{}: {}: {} {}; bounced as {id}",
            self.id, self.new.origin, r.dsn, r.reason
        );
        if postern_common::accounting::enabled() {
            self.account_refusal(&id, r);
        }
        Ok(id)
    }

    /// The accounting log's Bounce records of a refused local submission
    /// ([`Message::bounce_all`]), one per recipient.
    fn account_refusal(&self, id: &str, r: &Refusal) {
        use postern_common::{accounting, bounce_class};
        let env = qfile::Envelope {
            arrival_secs: queue::now().0,
            sender: self.new.sender.clone(),
            attrs: self.new.attrs.clone(),
            ..Default::default()
        };
        let reply = bounce_class::parse_reason(r.dsn, &r.reason);
        let class = bounce_class::classify(r.dsn, &r.reason);
        for rcpt in &self.new.recipients {
            let mut rec = accounting::message_record(
                accounting::Kind::Bounce,
                id,
                &env,
                rcpt,
                Some(&reply),
                &class,
            );
            rec.egress_pool = "cleanup".into();
            accounting::write(&rec);
        }
    }

    /// Gives the file up: the client gave up or the message was refused.
    /// It goes back to `spare/` for the next message (a transaction
    /// abandoned after RCPT TO costs no inode), or is removed.
    pub fn discard(&mut self) {
        self.writer = None;
        if self.hold.is_some() {
            let _ = std::fs::remove_file(self.tree.path(Queue::Incoming, &self.id));
            let _ = std::fs::remove_file(self.tree.path(Queue::Hold, &self.id));
        } else if self.tree.retire(Queue::Incoming, &self.id).is_err() {
            let _ = std::fs::remove_file(self.tree.path(Queue::Incoming, &self.id));
        }
    }
}

/// What a check leaves of a header or body line.
enum Applied {
    Keep,
    Drop,
    Replace(String),
    Prepend(String),
}

/// Canonical mapping, then virtual aliasing of one envelope recipient;
/// `given` is its address as given (qualified), kept as the original.
fn rewrite_recipient(
    id: &str,
    rw: &Rewriter,
    r: Recipient,
    given: &str,
    mappings: bool,
) -> Result<Vec<Recipient>, Refusal> {
    let expanded = if mappings {
        let canonical = rw
            .address(given, "envelope_recipient")
            .map_err(|e| Refusal::lookup_failure(id, &e, given))?;
        rw.virtual_alias(&canonical).map_err(|e| match e {
            AliasError::Limit(reason) => Refusal {
                temporary: false,
                dsn: "5.4.6",
                reason,
            },
            AliasError::Lookup(e) => Refusal::lookup_failure(id, &e, &canonical),
        })?
    } else {
        vec![given.to_string()]
    };
    let original = if r.original.is_empty() {
        given.to_string()
    } else {
        r.original.clone()
    };
    Ok(expanded
        .into_iter()
        .map(|address| Recipient {
            original: if address == original {
                String::new()
            } else {
                original.clone()
            },
            address,
            notify: r.notify,
            orcpt: r.orcpt.clone(),
        })
        .collect())
}

/// `20261122141142` in UTC, for Message-Id.
/// The domain a message is signed for: its From: header's first address,
/// else the envelope sender.
fn signing_domain(from_value: Option<String>, sender: &str) -> String {
    let from = from_value
        .and_then(|v| headers::addresses(&v).into_iter().next())
        .unwrap_or_else(|| sender.to_string());
    from.rsplit_once('@')
        .map(|(_, d)| d.to_string())
        .unwrap_or_default()
}

fn date_stamp(secs: u64) -> String {
    let days = secs / 86400;
    let rem = secs % 86400;
    let (y, m, d) = postern_common::time::civil_from_days(days as i64);
    format!(
        "{y:04}{m:02}{d:02}{:02}{:02}{:02}",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use postern_common::qfile::ContentReader;
    use std::io::Read;

    fn setup(name: &str) -> (QueueTree, Settings) {
        let root = std::env::temp_dir().join(format!("pcl-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let t = QueueTree::new(&root);
        t.create_dirs(None, None).unwrap();
        let cfg = Config::from_text(
            &root,
            "myhostname = h.test\n",
            std::path::Path::new("main.cf"),
        )
        .unwrap();
        (t, Settings::from_config(&cfg))
    }

    fn stored(t: &QueueTree, id: &str) -> (qfile::Envelope, String) {
        let f = std::fs::File::open(t.path(Queue::Incoming, id)).unwrap();
        let env = qfile::read_envelope(&f).unwrap();
        let mut s = String::new();
        ContentReader::new(&f, env.content_offset)
            .unwrap()
            .read_to_string(&mut s)
            .unwrap();
        (env, s)
    }

    #[test]
    fn extracts_recipients_drops_bcc_adds_headers() {
        let (t, s) = setup("x");
        let new = NewMessage {
            sender: "root".into(),
            flags: cleanup_flags::EXTRACT_RECIPIENTS,
            ..Default::default()
        };
        let mut m = Message::create(&s, &t).unwrap();
        m.envelope(new);
        m.content(b"To: a@x.test, \"B\" <b@x.test>\nBcc: c@x.test\nSubj");
        m.content(b"ect: hi\n folded\n\nbody\n.\n");
        let id = m.close().map_err(|r| r.reason).unwrap();
        let (env, text) = stored(&t, &id);
        assert_eq!(env.sender, "root@h.test");
        let rc: Vec<_> = env
            .recipients
            .iter()
            .map(|r| r.rcpt.address.as_str())
            .collect();
        assert_eq!(rc, ["a@x.test", "b@x.test", "c@x.test"]);
        assert!(!text.contains("Bcc:"));
        assert!(text.contains("Subject: hi\n folded\n"));
        assert!(text.contains("Message-Id: <"));
        assert!(text.contains("\nDate: "));
        assert!(text.contains("\nFrom: root@h.test\n"));
        assert!(text.ends_with("\n\nbody\n.\n"));
        std::fs::remove_dir_all(t.root()).unwrap();
    }

    #[test]
    fn duplicate_recipients_are_kept_once() {
        let (t, s) = setup("d");
        let r = |a: &str, notify: u8| Recipient {
            notify,
            ..Recipient::new(a)
        };
        let new = NewMessage {
            sender: "a@x.test".into(),
            recipients: vec![
                r("bob@x.test", 0),
                r("bob@x.test", 0),
                r("BOB@X.TEST", 0),
                r("bob", 0),
                r("bob@x.test", 2),
                r("carol@x.test", 0),
            ],
            flags: cleanup_flags::EXTRACT_RECIPIENTS,
            ..Default::default()
        };
        let mut m = Message::create(&s, &t).unwrap();
        m.envelope(new);
        // Header recipients (sendmail -t) repeating the envelope's too.
        m.content(b"To: carol@x.test, Dave@x.test\nCc: dave@X.test\n\nbody\n");
        let id = m.close().map_err(|r| r.reason).unwrap();
        let (env, _) = stored(&t, &id);
        let rc: Vec<_> = env
            .recipients
            .iter()
            .map(|r| (r.rcpt.address.as_str(), r.rcpt.notify))
            .collect();
        // "bob" is qualified with myorigin (h.test): another address. A
        // different NOTIFY is another request, as in Postfix.
        assert_eq!(
            rc,
            [
                ("bob@x.test", 0),
                ("bob@h.test", 0),
                ("bob@x.test", 2),
                ("carol@x.test", 0),
                ("Dave@x.test", 0)
            ]
        );
        std::fs::remove_dir_all(t.root()).unwrap();
    }

    #[test]
    fn append_dot_mydomain_and_bang_paths() {
        let root = std::env::temp_dir();
        let text = "myhostname = h.example.com\nappend_dot_mydomain = yes\n";
        let cfg = Config::from_text(&root, text, std::path::Path::new("main.cf")).unwrap();
        let s = Settings::from_config(&cfg);
        assert_eq!(s.local_rewrite("root"), "root@h.example.com");
        assert_eq!(s.local_rewrite("u@host"), "u@host.example.com");
        assert_eq!(s.local_rewrite("u@a.b"), "u@a.b");
        assert_eq!(s.local_rewrite("u@[10.0.0.1]"), "u@[10.0.0.1]");
        assert_eq!(s.local_rewrite(""), "");
        let off = Settings::from_config(
            &Config::from_text(
                &root,
                "myhostname = h.example.com\n",
                std::path::Path::new("main.cf"),
            )
            .unwrap(),
        );
        assert_eq!(off.local_rewrite("u@host"), "u@host");
        assert_eq!(off.local_rewrite("host!user"), "host!user@h.example.com");
    }

    #[test]
    fn no_recipients_is_refused_and_nothing_left() {
        let (t, s) = setup("n");
        let new = NewMessage {
            sender: "root".into(),
            flags: cleanup_flags::EXTRACT_RECIPIENTS,
            ..Default::default()
        };
        let mut m = Message::create(&s, &t).unwrap();
        m.envelope(new);
        m.content(b"Subject: x\n\nbody\n");
        let r = m.close().err().unwrap();
        assert_eq!(r.dsn, "5.1.3");
        assert!(t.list(Queue::Incoming).unwrap().is_empty());
        std::fs::remove_dir_all(t.root()).unwrap();
    }

    #[test]
    fn body_without_blank_line_and_date_stamp() {
        let (t, s) = setup("b");
        let new = NewMessage {
            sender: "a@x.test".into(),
            recipients: vec![Recipient::new("b@x.test")],
            ..Default::default()
        };
        let mut m = Message::create(&s, &t).unwrap();
        m.envelope(new);
        m.content(b"Subject: x\nthis is body\n");
        let id = m.close().map_err(|r| r.reason).unwrap();
        let (_, text) = stored(&t, &id);
        assert!(text.contains("\n\nthis is body\n"), "{text}");
        assert_eq!(date_stamp(1_700_000_000), "20231114221320");
        std::fs::remove_dir_all(t.root()).unwrap();
    }
}
