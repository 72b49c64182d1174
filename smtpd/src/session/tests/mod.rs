//! The session's unit tests, by concern, and what they share: the
//! settings, a greeted session, and the replies and requests it makes.

mod auth;
mod cleanup;
mod commands;
mod greeting;
mod tls;
mod transaction;

use super::cleanup::{failure_reply, WRITE_ERROR};
use super::*;
use crate::restrictions::Restrictions;
use crate::restrictions::Stage;
use crate::sasl::SaslReply;
use postern_common::ipc::CleanupReply;
use postern_common::match_list::{Kind, MatchList};
use std::path::PathBuf;
use std::time::Duration;

fn settings() -> Settings {
    let split = |s: &str| postern_conf::split_list(s);
    Settings {
        myhostname: "mx.example".into(),
        debug_peer: Default::default(),
        mail_name: "Postern".into(),
        banner: "mx.example ESMTP Postern".into(),
        message_size_limit: 1000,
        queue_directory: std::env::temp_dir(),
        queue_minfree: 0,
        recipient_limit: 3,
        hard_error_limit: 5,
        soft_error_limit: 3,
        error_sleep: Duration::ZERO,
        helo_required: false,
        disable_vrfy: false,
        fast_flush_domains: MatchList::parse("relay.example", Kind::Domain, true).unwrap(),
        queue: postern_common::queue::QueueTree::new("/nonexistent"),
        line_limit: 2048,
        restrictions: Restrictions::new(
            crate::restrictions::parse_list(&split(
                "permit_mynetworks, permit_sasl_authenticated, reject_unauth_destination",
            )),
            vec![],
            MatchList::parse("127.0.0.0/8", Kind::Address, false).unwrap(),
            split("mx.example, localhost"),
            vec![],
        )
        .unwrap(),
        timeout: Duration::from_secs(300),
        ipc_timeout: Duration::from_secs(300),
        max_idle: Duration::from_secs(100),
        session_limit: 10,
        cleanup_socket: PathBuf::from("/nonexistent"),
        tls_level: TlsLevel::None,
        tls: None,
        tls_wrappermode: false,
        tls_auth_only: false,
        tls_received_header: false,
        tls_loglevel: 1,
        sasl: None,
        sasl_service: "smtp".into(),
        sasl_authenticated_header: false,
        broken_sasl_auth_clients: false,
        dns_servers: vec![],
        dns_timeout: Duration::from_secs(5),
        verify: crate::verify_lookup::VerifyLookup {
            socket: std::env::temp_dir().join("no-verify-service"),
            poll_count: 1,
            poll_delay: Duration::ZERO,
            timeout: Duration::from_secs(1),
        },
        peername_lookup: false,
        delay_open_until_valid_rcpt: true,
        anvil: Default::default(),
        service: "smtp".into(),
        smtputf8_enable: true,
        requiretls_enable: true,
        strict_smtputf8: false,
        forbid_unauth_pipelining: false,
        content_filter: String::new(),
        receive_override: Default::default(),
        xforward_hosts: MatchList::parse("127.0.0.2", Kind::NameAddress, true).unwrap(),
        ehlo_discard: String::new(),
        command_filter: None,
        ccert: None,
        ehlo_discard_maps: None,
        milters: None,
        milter_maps: None,
        proxy: None,
    }
}

fn session_with(s: Settings, ip: &str) -> Session {
    let mut s = Session::new(Arc::new(s), Client::new(ip.parse().unwrap()));
    let greeting = out(&mut s);
    assert_eq!(greeting, ["220 mx.example ESMTP Postern"]);
    s
}

fn session() -> Session {
    session_with(settings(), "127.0.0.1")
}

fn out(s: &mut Session) -> Vec<String> {
    let o = String::from_utf8(s.take_output()).unwrap();
    o.split_terminator("\r\n").map(|l| l.to_string()).collect()
}

fn send(s: &mut Session, text: &str) -> Vec<String> {
    s.receive(text.as_bytes());
    out(s)
}

/// As [`send`], with cleanup answering Open at once: for tests about
/// something else than the opening of the queue file.
fn send_opening(s: &mut Session, text: &str) -> Vec<String> {
    s.receive(text.as_bytes());
    let mut o = out(s);
    while matches!(s.state, State::WaitOpened(_)) {
        o.extend(opened(s));
    }
    o
}

/// Content requests sent so far, concatenated; asserts the order of
/// the other requests.
fn requests(s: &mut Session) -> (Vec<&'static str>, Vec<u8>) {
    let mut kinds = Vec::new();
    let mut content = Vec::new();
    for r in s.take_requests() {
        match r {
            CleanupRequest::Open => kinds.push("open"),
            CleanupRequest::Envelope(_) => kinds.push("envelope"),
            CleanupRequest::Content(c) => {
                kinds.push("content");
                content.extend(c);
            }
            CleanupRequest::Close => kinds.push("close"),
            CleanupRequest::Abort => kinds.push("abort"),
        }
    }
    kinds.dedup();
    (kinds, content)
}

fn opened(s: &mut Session) -> Vec<String> {
    s.cleanup_reply(CleanupReply::Opened {
        queue_id: "QID1".into(),
    });
    out(s)
}

fn queued(s: &mut Session) -> Vec<String> {
    s.cleanup_reply(CleanupReply::Queued {
        queue_id: "QID1".into(),
    });
    out(s)
}
