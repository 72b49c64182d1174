use super::access::{address_keys, client_keys, is_dsn};
use super::*;

fn items(s: &str) -> Vec<Item> {
    parse_list(&postern_common::restriction::words(s))
}

fn r(relay: &str, rcpt: &str) -> Restrictions {
    Restrictions::new(
        items(relay),
        items(rcpt),
        MatchList::parse("127.0.0.0/8 [::1]/128", Kind::Address, false).unwrap(),
        postern_conf::split_list("mx.example, localhost"),
        postern_conf::split_list("relay.example"),
    )
    .unwrap()
}

fn req(ip: &str, rcpt: &'static str) -> Request<'static> {
    Request {
        client_addr: Some(ip.parse().unwrap()),
        client_name: "unknown",
        recipient: Some(rcpt),
        sender: Some("s@sender.example"),
        helo: Some("client.example"),
        esmtp: true,
        command: "RCPT",
        ..Default::default()
    }
}

const DEFAULT: &str = "permit_mynetworks, permit_sasl_authenticated, reject_unauth_destination";

#[test]
fn relay_control() {
    let p = r(DEFAULT, "");
    assert_eq!(p.check_recipient(&req("127.0.0.1", "a@far.example")), None);
    assert_eq!(
        p.check_recipient(&req("::ffff:127.0.0.1", "a@far.example")),
        None
    );
    assert_eq!(
        p.check_recipient(&req("192.0.2.1", "a@far.example"))
            .as_deref(),
        Some("554 5.7.1 <a@far.example>: Relay access denied")
    );
    assert_eq!(p.check_recipient(&req("192.0.2.1", "a@MX.example.")), None);
    assert_eq!(
        p.check_recipient(&req("192.0.2.1", "a@relay.example")),
        None
    );
    assert_eq!(
        p.check_recipient(&req("192.0.2.1", "a@sub.relay.example")),
        None
    );
    assert_eq!(p.check_recipient(&req("192.0.2.1", "user")), None);
    assert_eq!(p.check_recipient(&req("192.0.2.1", "Postmaster")), None);
    assert!(p
        .check_recipient(&req("192.0.2.1", "a%far.example@mx.example"))
        .is_some());
    assert!(p
        .check_recipient(&req("192.0.2.1", "far!a@mx.example"))
        .is_some());
    assert!(p
        .check_recipient(&req("192.0.2.1", "a@notrelay.example"))
        .is_some());
    let mut authed = req("192.0.2.1", "a@far.example");
    authed.sasl_username = Some("alice");
    assert_eq!(p.check_recipient(&authed), None);
}

#[test]
fn other_restrictions() {
    let p = r("permit_mynetworks defer_unauth_destination", "");
    assert_eq!(
        p.check_recipient(&req("192.0.2.1", "a@far.example"))
            .as_deref(),
        Some("454 4.7.1 <a@far.example>: Relay access denied")
    );
    // Relay restrictions permit; recipient restrictions still apply.
    let p = r(DEFAULT, "reject");
    assert_eq!(
        p.check_recipient(&req("127.0.0.1", "a@mx.example"))
            .as_deref(),
        Some("554 5.7.1 <a@mx.example>: Recipient address rejected: Access denied")
    );
    let p = r(DEFAULT, "permit_auth_destination, defer");
    assert_eq!(p.check_recipient(&req("127.0.0.1", "a@mx.example")), None);
    assert_eq!(
        p.check_recipient(&req("127.0.0.1", "a@far.example"))
            .as_deref(),
        Some("450 4.7.1 <a@far.example>: Recipient address rejected: Try again later")
    );
    // An unknown restriction never reaches run time: the list is refused.
    assert!(postern_common::restriction::parse_list(
        &postern_conf::split_list("no_such_thing"),
        &[]
    )
    .is_err());
    let p = r("permit_sasl_authenticated reject_unauth_destination", "");
    assert!(p
        .check_recipient(&req("127.0.0.1", "a@far.example"))
        .is_some());
}

#[test]
fn stages_and_delay() {
    let mut p = r(DEFAULT, "");
    p.set_list(Stage::Client, items("permit_mynetworks, reject"));
    p.set_list(Stage::Sender, items("reject_non_fqdn_sender"));
    // Delayed: the client list refuses at RCPT, with the client words.
    assert_eq!(
        p.check_recipient(&req("192.0.2.1", "a@mx.example"))
            .as_deref(),
        Some("554 5.7.1 <unknown[192.0.2.1]>: Client host rejected: Access denied")
    );
    assert_eq!(p.check_connect(&req("192.0.2.1", "a@mx.example")), None);
    // A permit in the client list does not skip the sender list.
    let mut q = req("127.0.0.1", "a@mx.example");
    q.sender = Some("joe@localhost");
    assert_eq!(
        p.check_recipient(&q).as_deref(),
        Some("504 5.5.2 <joe@localhost>: Sender address rejected: need fully-qualified address")
    );
    q.sender = Some("");
    assert_eq!(p.check_recipient(&q), None);
    p.delay_reject = false;
    assert!(p.check_connect(&req("192.0.2.1", "x")).is_some());
    assert!(p.check_sender(&q).is_none());
}

#[test]
fn helo_and_fqdn_checks() {
    let mut p = r(DEFAULT, "reject_non_fqdn_recipient");
    p.set_list(
        Stage::Helo,
        items("reject_invalid_helo_hostname, reject_non_fqdn_helo_hostname"),
    );
    let mut q = req("127.0.0.1", "a@mx.example");
    assert_eq!(p.check_recipient(&q), None);
    q.helo = Some("bad..name");
    assert_eq!(
        p.check_recipient(&q).as_deref(),
        Some("501 5.5.2 <bad..name>: Helo command rejected: Invalid name")
    );
    q.helo = Some("localhost");
    assert_eq!(
        p.check_recipient(&q).as_deref(),
        Some("504 5.5.2 <localhost>: Helo command rejected: need fully-qualified hostname")
    );
    q.helo = Some("[127.0.0.1]");
    assert_eq!(p.check_recipient(&q), None);
    q.recipient = Some("user");
    assert_eq!(
        p.check_recipient(&q).as_deref(),
        Some("504 5.5.2 <user>: Recipient address rejected: need fully-qualified address")
    );
}

#[test]
fn pipelining() {
    let mut p = r(DEFAULT, "");
    p.set_list(Stage::Data, items("reject_unauth_pipelining"));
    let mut q = req("127.0.0.1", "a@mx.example");
    q.command = "DATA";
    q.recipient = None;
    assert_eq!(p.check_data(&q), None);
    q.pipelined = true;
    assert_eq!(
        p.check_data(&q).as_deref(),
        Some("503 5.5.0 <DATA>: Data command rejected: Improper use of SMTP command pipelining")
    );
}

#[test]
fn access_actions() {
    let dir = std::env::temp_dir().join(format!("postern-access-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let cidr = dir.join("clients.cidr");
    std::fs::write(
        &cidr,
        "# comment\n192.0.2.0/24 REJECT go away\n198.51.100.7 OK\n203.0.113.0/24 450 4.7.25 later\n",
    )
    .unwrap();
    let senders = dir.join("senders");
    std::fs::write(
        &senders,
        "spam.example REJECT\nfriend@spam.example OK\n<> 550 5.7.1 no bounces here\nwarn.example DUNNO\nrestr.example reject_non_fqdn_recipient\nbad@ 553 bad local part\n",
    )
    .unwrap();
    let mut p = r(DEFAULT, "");
    p.set_list(
        Stage::Client,
        items(&format!("check_client_access cidr:{}", cidr.display())),
    );
    p.set_list(
        Stage::Sender,
        items(&format!(
            "check_sender_access texthash:{}",
            senders.display()
        )),
    );
    let q = req("192.0.2.9", "a@mx.example");
    assert_eq!(
        p.check_recipient(&q).as_deref(),
        Some("554 5.7.1 <unknown[192.0.2.9]>: Client host rejected: go away")
    );
    let q = req("203.0.113.1", "a@mx.example");
    assert_eq!(
        p.check_recipient(&q).as_deref(),
        Some("450 4.7.25 <unknown[203.0.113.1]>: Client host rejected: later")
    );
    // OK in the client list; the sender list still runs.
    let mut q = req("198.51.100.7", "a@far.example");
    q.sender = Some("x@sub.spam.example");
    assert_eq!(
        p.check_recipient(&q).as_deref(),
        Some("554 5.7.1 <x@sub.spam.example>: Sender address rejected: Access denied")
    );
    q.sender = Some("friend@spam.example");
    // OK in the sender list does not open the relay.
    assert_eq!(
        p.check_recipient(&q).as_deref(),
        Some("554 5.7.1 <a@far.example>: Relay access denied")
    );
    q.sender = Some("");
    assert_eq!(
        p.check_recipient(&q).as_deref(),
        Some("550 5.7.1 <>: Sender address rejected: no bounces here")
    );
    q.sender = Some("bad@anything.example");
    assert_eq!(
        p.check_recipient(&q).as_deref(),
        Some("553 5.7.1 <bad@anything.example>: Sender address rejected: bad local part")
    );
    q.sender = Some("a@restr.example");
    q.recipient = Some("user");
    assert!(p
        .check_recipient(&q)
        .unwrap()
        .starts_with("504 5.5.2 <user>: Recipient address rejected"));
    // A table that cannot be opened answers every lookup with an error:
    // Postfix's answer, as if the table had said "451 4.3.5 Server
    // configuration error".
    p.set_list(Stage::Helo, items("check_helo_access hash:/nonexistent/x"));
    assert_eq!(
        p.check_recipient(&req("127.0.0.1", "a@mx.example"))
            .as_deref(),
        Some("451 4.3.5 <client.example>: Helo command rejected: Server configuration error")
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn sender_login_mismatch() {
    let mut p = r(DEFAULT, "");
    p.sender_login_maps = Some(Tables(vec![Table::open(
        "inline:{ alice@example.test=alice@example.test, @shared.example=alice@example.test bob@example.test }",
    )
    .unwrap()]));
    p.set_list(Stage::Sender, items("reject_sender_login_mismatch"));
    let mut q = req("127.0.0.1", "a@mx.example");
    q.sender = Some("alice@example.test");
    assert_eq!(
        p.check_recipient(&q).as_deref(),
        Some("553 5.7.1 <alice@example.test>: Sender address rejected: not logged in")
    );
    q.sasl_username = Some("alice@example.test");
    assert_eq!(p.check_recipient(&q), None);
    q.sasl_username = Some("bob@example.test");
    assert_eq!(
        p.check_recipient(&q).as_deref(),
        Some("553 5.7.1 <alice@example.test>: Sender address rejected: not owned by user bob@example.test")
    );
    q.sender = Some("anyone@shared.example");
    assert_eq!(p.check_recipient(&q), None);
    q.sender = Some("someone@else.example");
    assert!(p.check_recipient(&q).is_some());
    q.sasl_username = None;
    assert_eq!(p.check_recipient(&q), None);
}

#[test]
fn keys() {
    assert_eq!(
        address_keys("U@Sub.Example.COM"),
        [
            "u@sub.example.com",
            "sub.example.com",
            "example.com",
            "com",
            "u@"
        ]
    );
    assert_eq!(address_keys(""), ["<>"]);
    assert_eq!(
        client_keys("unknown", "192.0.2.1".parse().unwrap()),
        ["192.0.2.1", "192.0.2", "192.0", "192"]
    );
    assert!(is_dsn("5.7.25", '5'));
    assert!(!is_dsn("4.7.1", '5'));
}

#[test]
fn open_relay_refused() {
    let e = Restrictions::new(
        items("permit_mynetworks"),
        items("permit_auth_destination"),
        MatchList::default(),
        vec![],
        vec![],
    )
    .unwrap_err();
    assert!(e.contains("specify at least one working instance"), "{e}");
}

/// The restrictions added with the shared grammar: DNS white and
/// right-hand-side lists, check_sasl_access, warn_if_reject and classes.
#[test]
fn dns_lists_sasl_access_warn_and_classes() {
    use crate::dns::{Answer, Query};
    let mut p = r(DEFAULT, "");
    p.set_list(
        Stage::Sender,
        items("permit_dnswl_client wl.example, reject_rhsbl_sender dbl.example=127.0.1.2"),
    );
    let mut q = req("192.0.2.7", "a@mx.example");
    q.sender = Some("s@spam.example");
    let needed = p.dns_needed(Stage::Recipient, &q);
    let wl = Query::Rbl("7.2.0.192.wl.example".into());
    let dbl = Query::Rbl("spam.example.dbl.example".into());
    assert!(needed.contains(&wl) && needed.contains(&dbl), "{needed:?}");
    let mut answers = std::collections::HashMap::new();
    answers.insert(
        dbl.clone(),
        Answer::Found(vec!["127.0.1.2".parse().unwrap()]),
    );
    q.dns = Some(&answers);
    assert_eq!(
        p.check_recipient(&q).as_deref(),
        Some("554 5.7.1 Service unavailable; Sender address [spam.example] blocked using dbl.example")
    );
    // Another answer than the one asked for does not list.
    let mut other = std::collections::HashMap::new();
    other.insert(
        dbl.clone(),
        Answer::Found(vec!["127.0.1.9".parse().unwrap()]),
    );
    q.dns = Some(&other);
    assert_eq!(p.check_recipient(&q), None);
    // Whitelisted first: permitted before the RHSBL is read.
    let mut both = answers.clone();
    both.insert(wl, Answer::Found(vec!["127.0.0.2".parse().unwrap()]));
    q.dns = Some(&both);
    assert_eq!(p.check_recipient(&q), None);

    // check_sasl_access by login name; warn_if_reject only logs.
    let mut p = r(DEFAULT, "");
    p.set_list(
        Stage::Client,
        items("check_sasl_access inline:{ mallory=REJECT blocked login }"),
    );
    let mut q = req("127.0.0.1", "a@mx.example");
    q.sasl_username = Some("mallory");
    assert!(p
        .check_recipient(&q)
        .unwrap()
        .contains("Client host rejected: blocked login"));
    p.set_list(
        Stage::Client,
        items("warn_if_reject check_sasl_access inline:{ mallory=REJECT blocked login }"),
    );
    assert_eq!(p.check_recipient(&q), None);

    // A restriction class, by name.
    let cfg = Config::from_text(
        std::path::Path::new("/nonexistent"),
        "smtpd_restriction_classes = strict\nstrict = reject\n\
         smtpd_recipient_restrictions = check_recipient_access inline:{ a@mx.example=strict }, \
         reject_unauth_destination\nmynetworks = 127.0.0.1/32\nmydestination = mx.example\n\
         local_recipient_maps =\nalias_maps =\n",
        std::path::Path::new("main.cf"),
    )
    .unwrap();
    let p = Restrictions::from_config(&cfg).unwrap();
    assert!(p
        .check_recipient(&req("192.0.2.1", "a@mx.example"))
        .unwrap()
        .starts_with("554 5.7.1 <a@mx.example>: Recipient address rejected"));
    assert_eq!(p.check_recipient(&req("192.0.2.1", "b@mx.example")), None);
    // An unknown restriction in a class stops smtpd at start.
    let cfg = Config::from_text(
        std::path::Path::new("/nonexistent"),
        "smtpd_restriction_classes = strict\nstrict = reject_bogus\n",
        std::path::Path::new("main.cf"),
    )
    .unwrap();
    assert_eq!(
        Restrictions::from_config(&cfg).unwrap_err(),
        "strict: reject_bogus: unknown restriction"
    );
}

#[test]
fn braced_policy_server_settings_reach_the_client() {
    let spec = "{ inet:127.0.0.1:1, retry_delay=0s, { default_action = DUNNO } }";
    let cfg = postern_conf::Config::from_text(
        std::path::Path::new("/nonexistent"),
        &format!(
            "smtpd_recipient_restrictions = reject_unauth_destination, check_policy_service {spec}\n"
        ),
        std::path::Path::new("main.cf"),
    )
    .unwrap();
    let r = Restrictions::from_config(&cfg).unwrap();
    assert_eq!(r.policy.settings_of(spec).default_action, "DUNNO");
}

#[test]
fn reject_unverified_recipient_asks_then_answers_as_postfix() {
    use crate::dns::{Answer, Query};
    use postern_common::verify::Status;
    let p = r(
        DEFAULT,
        "reject_unverified_recipient, reject_unauth_destination",
    );
    let rcpt = "u@relay.example";
    // No answer yet: the address is asked for and the lists stop.
    let wanted = std::cell::RefCell::new(None);
    let ask = Request {
        verify: Some(&wanted),
        ..req("192.0.2.1", rcpt)
    };
    assert_eq!(p.check_recipient(&ask), None);
    assert_eq!(wanted.borrow().as_deref(), Some(rcpt));
    let with = |a: Answer| {
        let mut m = std::collections::HashMap::new();
        m.insert(Query::Verify(rcpt.into()), a);
        m
    };
    let answer = |p: &Restrictions, a: Answer| {
        let m = with(a);
        let rq = Request {
            dns: Some(&m),
            ..req("192.0.2.1", rcpt)
        };
        p.check_recipient(&rq)
    };
    assert_eq!(
        answer(&p, Answer::Verify(Ok((Status::Ok, "250 Ok".into())))),
        None
    );
    // Undeliverable, with the default code 450: "unverified address",
    // as defer_if_permit (the list went on and accepted).
    let why = "host x said: 550 5.1.1 no such user";
    assert_eq!(
        answer(&p, Answer::Verify(Ok((Status::Bounce, why.into())))).as_deref(),
        Some(
            "450 4.1.1 <u@relay.example>: Recipient address rejected: unverified address: \
             host x said: 550 5.1.1 no such user"
        )
    );
    assert_eq!(
        answer(
            &p,
            Answer::Verify(Ok((
                Status::Todo,
                "Address verification in progress".into()
            )))
        )
        .as_deref(),
        Some(
            "450 4.1.1 <u@relay.example>: Recipient address rejected: unverified address: \
             Address verification in progress"
        )
    );
    assert_eq!(
        answer(&p, Answer::Verify(Err("no service".into()))).as_deref(),
        Some(
            "450 4.1.1 <u@relay.example>: Recipient address rejected: address verification problem"
        )
    );
    // A later reject wins over defer_if_permit.
    let strict = r(DEFAULT, "reject_unverified_recipient, reject");
    assert_eq!(
        answer(&strict, Answer::Verify(Ok((Status::Bounce, why.into())))).as_deref(),
        Some("554 5.7.1 <u@relay.example>: Recipient address rejected: Access denied")
    );
    // A 5xx reject code: "undeliverable address", at once.
    let mut hard = r(DEFAULT, "reject_unverified_recipient, reject");
    hard.unverified_recipient = unverified::Unverified::from_config(
        &postern_conf::Config::from_text(
            std::path::Path::new("/nonexistent"),
            "unverified_recipient_reject_code = 550\n",
            std::path::Path::new("main.cf"),
        )
        .unwrap(),
        "recipient",
    )
    .unwrap();
    assert_eq!(
        answer(&hard, Answer::Verify(Ok((Status::Bounce, why.into())))).as_deref(),
        Some(
            "550 5.1.1 <u@relay.example>: Recipient address rejected: undeliverable address: \
             host x said: 550 5.1.1 no such user"
        )
    );
    // warn_if_reject: only logged, never a defer_if_permit.
    let warn = r(
        DEFAULT,
        "warn_if_reject, reject_unverified_recipient, reject_unauth_destination",
    );
    assert_eq!(
        answer(&warn, Answer::Verify(Ok((Status::Bounce, why.into())))),
        None
    );
    // A client permit_mynetworks lets through is never asked about.
    let wanted = std::cell::RefCell::new(None);
    let trusted = Request {
        verify: Some(&wanted),
        ..req("127.0.0.1", rcpt)
    };
    let p = r(
        DEFAULT,
        "permit_mynetworks, reject_unverified_recipient, reject_unauth_destination",
    );
    assert_eq!(p.check_recipient(&trusted), None);
    assert_eq!(*wanted.borrow(), None);
}

#[test]
fn etrn_restrictions_see_the_domain() {
    let mut p = r(DEFAULT, "");
    p.set_list(
        Stage::Etrn,
        items("check_etrn_access inline:{ blocked.example=REJECT, ok.example=OK }, reject"),
    );
    let etrn = |d: &'static str| Request {
        recipient: None,
        sender: None,
        etrn_domain: Some(d),
        command: "ETRN",
        ..req("192.0.2.1", "")
    };
    // The table is looked up with the parent domains (access(5)).
    assert_eq!(
        p.check_etrn(&etrn("sub.blocked.example")).as_deref(),
        Some("554 5.7.1 <sub.blocked.example>: Etrn command rejected: Access denied")
    );
    assert_eq!(p.check_etrn(&etrn("ok.example")), None);
    assert_eq!(
        p.check_etrn(&etrn("other.example")).as_deref(),
        Some("554 5.7.1 <other.example>: Etrn command rejected: Access denied")
    );
    // With smtpd_delay_reject the client list comes first.
    p.set_list(Stage::Client, items("reject"));
    assert_eq!(
        p.check_etrn(&etrn("ok.example")).as_deref(),
        Some("554 5.7.1 <unknown[192.0.2.1]>: Client host rejected: Access denied")
    );
}
