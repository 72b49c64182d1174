//! AUTH through the auth server.

use super::*;

fn sasl_settings() -> Settings {
    let mut cfg = settings();
    cfg.sasl = Some(crate::sasl::AuthTarget::Unix("/nonexistent".into()));
    cfg.hard_error_limit = 20;
    cfg
}

#[test]
fn auth_exchange_and_relay() {
    let mut s = session_with(sasl_settings(), "192.0.2.7");
    // EHLO waits for the mechanism list.
    assert!(send(&mut s, "EHLO c\r\nNOOP\r\n").is_empty());
    assert_eq!(s.take_sasl_requests(), [SaslRequest::Mechs]);
    assert!(!s.wants_input());
    s.sasl_mechs(Some(vec!["PLAIN".into(), "LOGIN".into()]));
    let r = out(&mut s);
    assert!(r.contains(&"250-AUTH PLAIN LOGIN".to_string()), "{r:?}");
    assert_eq!(r.last().unwrap(), "250 2.0.0 Ok");
    // Unknown mechanism.
    assert_eq!(
        send(&mut s, "AUTH CRAM-MD5\r\n"),
        ["535 5.7.8 Error: authentication failed: Invalid authentication mechanism"]
    );
    // LOGIN: two challenges, the client's lines go to the server.
    assert!(send(&mut s, "AUTH LOGIN\r\n").is_empty());
    let reqs = s.take_sasl_requests();
    assert!(
        matches!(&reqs[..], [SaslRequest::Start { mech, resp: None, secured: false, .. }] if mech == "LOGIN")
    );
    s.sasl_reply(SaslReply::Cont("VXNlcm5hbWU6".into()));
    assert_eq!(out(&mut s), ["334 VXNlcm5hbWU6"]);
    assert!(send(&mut s, "YWxpY2U=\r\n").is_empty());
    assert_eq!(
        s.take_sasl_requests(),
        [SaslRequest::Continue("YWxpY2U=".into())]
    );
    s.sasl_reply(SaslReply::Cont("UGFzc3dvcmQ6".into()));
    assert_eq!(out(&mut s), ["334 UGFzc3dvcmQ6"]);
    assert_eq!(send(&mut s, "*\r\n"), ["501 5.7.0 Authentication aborted"]);
    assert_eq!(s.take_sasl_requests(), [SaslRequest::Abort]);
    // Failure, then success; relaying only after.
    send(&mut s, "AUTH PLAIN AGFsaWNlAGJhZA==\r\n");
    s.take_sasl_requests();
    s.sasl_reply(SaslReply::Fail(String::new(), None));
    assert_eq!(out(&mut s), ["535 5.7.8 Error: authentication failed: "]);
    let r = send(
        &mut s,
        "MAIL FROM:<a@b> AUTH=<>\r\nRCPT TO:<x@far.example>\r\nRSET\r\n",
    );
    assert_eq!(r[1], "554 5.7.1 <x@far.example>: Relay access denied");
    send(&mut s, "AUTH PLAIN AGFsaWNlAGdvb2Q=\r\n");
    s.take_sasl_requests();
    s.sasl_reply(SaslReply::Ok("alice".into()));
    assert_eq!(out(&mut s), ["235 2.7.0 Authentication successful"]);
    assert_eq!(
        send(&mut s, "AUTH PLAIN AGFsaWNlAGdvb2Q=\r\n"),
        ["503 5.5.1 Error: already authenticated"]
    );
    let r = send_opening(&mut s, "MAIL FROM:<a@b>\r\nRCPT TO:<x@far.example>\r\n");
    assert_eq!(r, ["250 2.1.0 Ok", "250 2.1.5 Ok"]);
    assert_eq!(s.protocol(), "ESMTPA");
}

#[test]
fn auth_not_offered() {
    let mut s = session();
    assert_eq!(
        send(&mut s, "EHLO c\r\nAUTH PLAIN\r\n").last().unwrap(),
        "503 5.5.1 Error: authentication not enabled"
    );
    let mut cfg = sasl_settings();
    cfg.tls_auth_only = true;
    let mut s = session_with(cfg, "127.0.0.1");
    let r = send(&mut s, "EHLO c\r\n");
    assert!(!r.iter().any(|l| l.contains("AUTH")), "{r:?}");
    assert!(s.take_sasl_requests().is_empty());
}
