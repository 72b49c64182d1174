"""Postern's SMTP client against a real Postfix as the far side
(tests/postfix_peer.py): STARTTLS at each `smtp_tls_security_level`,
certificate checks with a test CA, `smtp_tls_policy_maps`, SASL to a
smarthost, and connection reuse.

Names resolve through dnsmasq (`dns_resolver_addresses`): mx.far.test and
other.far.test are both 127.0.0.1; the far side's certificate, from a
test CA, names mx.far.test only.
"""

import re
import smtplib
import shutil
import tempfile
import threading
import time
import uuid

import pytest

import postern_harness as h
from dovecot import dovecot  # noqa: F401  (the fixture)
from postfix_peer import TestCA, postfix_peer  # noqa: F401  (the fixture)

SENDER = "sender@example.org"
RCPT = "user@far.test"


def new_token():
    return "pt-smtpc-" + uuid.uuid4().hex


def message(token, body="Hello over SMTP.\n"):
    return h.crlf(f"From: {SENDER}\nTo: {RCPT}\nSubject: {token}\n\n{body}")


@pytest.fixture(scope="module")
def test_ca():
    d = tempfile.mkdtemp(prefix="pt-ca-")
    yield TestCA(d, names=["mx.far.test"])
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="module")
def other_ca():
    d = tempfile.mkdtemp(prefix="pt-ca2-")
    yield TestCA(d, names=["mx.far.test"], cn="Some Other CA")
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def far_dns(dnsmasq):
    return dnsmasq(["--local=/test/",
                    "--mx-host=far.test,mx.far.test,10",
                    "--host-record=mx.far.test,127.0.0.1",
                    "--host-record=other.far.test,127.0.0.1"])


def client(make_postern, dns, far, host="mx.far.test", **params):
    base = {
        "dns_resolver_addresses": f"127.0.0.1:{dns.port}",
        "relayhost": f"[{host}]:{far.port}",
        "smtp_tls_loglevel": "1",
    }
    base.update(params)
    return make_postern(base)


def send(p, token):
    code, text = p.send(SENDER, [RCPT], message(token))
    assert code == 250, text


# --------------------------------------------------------------------------
# TLS


def test_tls_may_encrypt_verify_with_a_real_postfix(make_postern, far_dns, postfix_peer, test_ca):
    far = postfix_peer(tls=test_ca)
    relay = rf"mx\.far\.test\[127\.0\.0\.1\]:{far.port}"

    # may (the default here): STARTTLS offered, so used; no CA given, so
    # the certificate is not trusted, which is fine at this level.
    p = client(make_postern, far_dns, far, smtp_tls_security_level="may")
    token = new_token()
    send(p, token)
    (_path, raw), = far.wait_for(token)
    assert re.search(rb"\(using TLSv1\.[23] with cipher ", raw), raw[:600]
    p.wait_for_log(rf"Untrusted TLS connection established to {relay}: TLSv1\.3 with cipher \S+")
    p.wait_for_log(rf"to=<{re.escape(RCPT)}>, relay={relay}, .*status=sent")

    # encrypt: the same, required.
    q = client(make_postern, far_dns, far, smtp_tls_security_level="encrypt")
    token = new_token()
    send(q, token)
    far.wait_for(token)
    q.wait_for_log(rf"Untrusted TLS connection established to {relay}: TLSv1\.3")

    # verify with the test CA: the certificate chains to it and names
    # mx.far.test.
    r = client(make_postern, far_dns, far, smtp_tls_security_level="verify",
               smtp_tls_CAfile=str(test_ca.ca_file))
    token = new_token()
    send(r, token)
    far.wait_for(token)
    r.wait_for_log(rf"Verified TLS connection established to {relay}: TLSv1\.3")
    r.wait_for_log(rf"to=<{re.escape(RCPT)}>, relay={relay}, .*status=sent")


def test_a_real_postfix_relays_into_postern_over_starttls(make_postern, postfix_peer, test_ca,
                                                          sink):
    """The other direction (issue #3): a real Postfix whose relayhost is
    Postern hands it mail over STARTTLS, required (encrypt) and checked
    against the test CA; Postern relays it on, and its Received header
    says ESMTPS with the cipher."""
    p = make_postern({
        "smtpd_tls_security_level": "may",
        "smtpd_tls_cert_file": str(test_ca.cert_file),
        "smtpd_tls_key_file": str(test_ca.key_file),
        "smtpd_tls_received_header": "yes",
        "smtpd_tls_loglevel": "1",
        "relayhost": f"[127.0.0.1]:{sink.port}",
    })
    far = postfix_peer(params={
        "relayhost": f"[127.0.0.1]:{p.port}",
        "smtp_tls_security_level": "encrypt",
        "smtp_tls_CAfile": str(test_ca.ca_file),
        "smtp_tls_loglevel": "1",
    })
    token = new_token()
    with smtplib.SMTP("127.0.0.1", far.port, timeout=30) as s:
        code, text = h.smtp_transaction(s, SENDER, ["someone@elsewhere.example"],
                                        message(token))
        assert code == 250, text
    m = sink.wait_for(token)[0]
    ours = [r for r in h.header_values(m.content, "Received") if "by postern.test" in r]
    assert len(ours) == 1, h.header_values(m.content, "Received")
    assert re.search(r"^from mx\.far\.test \(unknown \[127\.0\.0\.1\]\)", ours[0]), ours[0]
    assert " with ESMTPS id " in ours[0], ours[0]
    assert re.search(r"\(using TLSv1\.3 with cipher \S+ \(\d+/\d+ bits\)[ )]", ours[0]), ours[0]
    assert m.content.rstrip().endswith(b"Hello over SMTP."), m.content[-200:]
    h.wait_for(lambda: re.search(rf"Trusted TLS connection established to 127\.0\.0\.1\[127\.0\.0\.1\]"
                                 rf":{p.port}: TLSv1\.3", far.log_text()),
               30, what="Postfix's log of its TLS connection to Postern")
    h.wait_for(lambda: re.search(rf"relay=127\.0\.0\.1\[127\.0\.0\.1\]:{p.port}, .*status=sent",
                                 far.log_text()),
               30, what="Postfix's status=sent to Postern")
    p.wait_for_log(r"Anonymous TLS connection established from unknown\[127\.0\.0\.1\]: TLSv1\.3")


def test_tls_verify_wrong_name_or_ca_defers(make_postern, far_dns, postfix_peer, test_ca, other_ca):
    far = postfix_peer(tls=test_ca)

    # The right CA, but the next hop is other.far.test: not in the certificate.
    p = client(make_postern, far_dns, far, host="other.far.test",
               smtp_tls_security_level="verify", smtp_tls_CAfile=str(test_ca.ca_file))
    token = new_token()
    send(p, token)
    p.wait_for_log(rf"to=<{re.escape(RCPT)}>, relay=other\.far\.test\[127\.0\.0\.1\]:{far.port}, "
                   r".*dsn=4\.7\.5, status=deferred \(Server certificate not verified\)")
    p.wait_for_log(r"server certificate verification failed for other\.far\.test\[127\.0\.0\.1\]:"
                   rf"{far.port}: certificate does not match other\.far\.test")

    # The right name, but a CA that did not sign it.
    q = client(make_postern, far_dns, far, smtp_tls_security_level="secure",
               smtp_tls_CAfile=str(other_ca.ca_file))
    token2 = new_token()
    send(q, token2)
    q.wait_for_log(rf"to=<{re.escape(RCPT)}>, relay=mx\.far\.test\[127\.0\.0\.1\]:{far.port}, "
                   r".*dsn=4\.7\.5, status=deferred \(Server certificate not verified\)")
    q.wait_for_log(r"server certificate verification failed for mx\.far\.test\[127\.0\.0\.1\]:"
                   rf"{far.port}: untrusted issuer")
    time.sleep(1)
    assert not far.find(token) and not far.find(token2), "nothing may reach an unverified server"
    # Still queued, for a later try.
    assert len(q.queue_files("deferred")) == 1


def test_tls_required_but_not_offered_and_may_without_starttls(make_postern, far_dns, postfix_peer):
    far = postfix_peer(tls=None)
    relay = rf"mx\.far\.test\[127\.0\.0\.1\]:{far.port}"
    p = client(make_postern, far_dns, far, smtp_tls_security_level="encrypt")
    token = new_token()
    send(p, token)
    p.wait_for_log(rf"to=<{re.escape(RCPT)}>, relay={relay}, .*dsn=4\.7\.4, status=deferred "
                   r"\(TLS is required, but was not offered by host mx\.far\.test\[127\.0\.0\.1\]\)")

    # may: no STARTTLS offered, so plaintext.
    q = client(make_postern, far_dns, far, smtp_tls_security_level="may")
    token = new_token()
    send(q, token)
    (_path, raw), = far.wait_for(token)
    assert b"(using TLS" not in raw
    q.wait_for_log(rf"to=<{re.escape(RCPT)}>, relay={relay}, .*status=sent")
    assert "TLS connection established" not in q.log_text()


def test_tls_policy_maps_per_destination(make_postern, far_dns, postfix_peer, test_ca):
    far = postfix_peer(tls=test_ca)
    # Level none in general, but this next hop must verify.
    p = client(make_postern, far_dns, far, smtp_tls_security_level="none",
               smtp_tls_CAfile=str(test_ca.ca_file),
               smtp_tls_policy_maps=f"inline:{{ [mx.far.test]:{far.port}=verify }}")
    token = new_token()
    send(p, token)
    (_path, raw), = far.wait_for(token)
    assert b"(using TLS" in raw
    p.wait_for_log(rf"Verified TLS connection established to mx\.far\.test\[127\.0\.0\.1\]:{far.port}")

    # A parent-domain entry (".far.test") covers mx.far.test; its
    # match= names a name the certificate lacks, so verification fails.
    q = client(make_postern, far_dns, far, smtp_tls_security_level="none",
               smtp_tls_CAfile=str(test_ca.ca_file),
               smtp_tls_policy_maps="inline:{ .far.test=verify match=elsewhere.test }")
    token = new_token()
    send(q, token)
    q.wait_for_log(r"dsn=4\.7\.5, status=deferred \(Server certificate not verified\)")
    q.wait_for_log(r"certificate does not match elsewhere\.test")


def test_tls_may_handshake_failure_defers_then_plaintext(make_postern, far_dns, postfix_peer, test_ca):
    # A far side that speaks only TLS 1.0/1.1, which rustls refuses: the
    # handshake fails. As Postfix: the first attempt defers, a retry once
    # the message has waited minimal_backoff_time goes in plaintext.
    far = postfix_peer(tls=test_ca, params={"smtpd_tls_protocols": "<=TLSv1.1",
                                            "tls_medium_cipherlist": "DEFAULT:@SECLEVEL=0"})
    relay = rf"mx\.far\.test\[127\.0\.0\.1\]:{far.port}"
    p = client(make_postern, far_dns, far, smtp_tls_security_level="may")
    token = new_token()
    send(p, token)
    p.wait_for_log(rf"to=<{re.escape(RCPT)}>, relay={relay}, .*dsn=4\.7\.5, status=deferred "
                   r"\(Cannot start TLS: handshake failure\)")
    (_path, raw), = far.wait_for(token, timeout=40)
    assert b"(using TLS" not in raw
    p.wait_for_log(r"TLS handshake with " + relay + " failed; trying again without TLS")
    p.wait_for_log(rf"to=<{re.escape(RCPT)}>, relay={relay}, .*status=sent")


# --------------------------------------------------------------------------
# SASL to a smarthost (the far side checks passwords through Dovecot)


USERS = {"relayuser@example.test": "right-pw"}


def sasl_client(make_postern, dns, far, password, **params):
    base = {
        "smtp_sasl_auth_enable": "yes",
        "smtp_sasl_password_maps":
            f"inline:{{ [mx.far.test]:{far.port}=relayuser@example.test:{password} }}",
        # PLAIN and LOGIN only over TLS (the default keeps noplaintext
        # for unencrypted sessions).
        "smtp_sasl_tls_security_options": "noanonymous",
        "smtp_tls_security_level": "encrypt",
    }
    base.update(params)
    return client(make_postern, dns, far, **base)


def test_sasl_right_and_wrong_password(make_postern, far_dns, postfix_peer, dovecot, test_ca):  # noqa: F811
    d = dovecot(users=USERS, auth_failure_delay="0 secs")
    far = postfix_peer(tls=test_ca, sasl_auth_port=d.auth_port, auth_only_tls=True)
    relay = rf"mx\.far\.test\[127\.0\.0\.1\]:{far.port}"

    p = sasl_client(make_postern, far_dns, far, "right-pw")
    token = new_token()
    send(p, token)
    far.wait_for(token)
    p.wait_for_log(rf"to=<{re.escape(RCPT)}>, relay={relay}, .*status=sent")
    far_log = h.wait_for(lambda: re.search(r"client=localhost\[127\.0\.0\.1\], sasl_method=PLAIN, "
                                           r"sasl_username=relayuser@example\.test",
                                           far.log_text()), 10)
    assert far_log

    q = sasl_client(make_postern, far_dns, far, "wrong-pw")
    token2 = new_token()
    send(q, token2)
    q.wait_for_log(rf"to=<{re.escape(RCPT)}>, relay={relay}, .*dsn=4\.7\.8, status=deferred "
                   r"\(SASL authentication failed; server mx\.far\.test\[127\.0\.0\.1\] said: "
                   r"535 5\.7\.8 Error: authentication failed: .*\)")
    time.sleep(1)
    assert not far.find(token2)


def test_sasl_login_mechanism_and_sender_dependent(make_postern, far_dns, postfix_peer, dovecot, test_ca):  # noqa: F811
    d = dovecot(users=USERS, auth_failure_delay="0 secs")
    far = postfix_peer(tls=test_ca, sasl_auth_port=d.auth_port)
    p = sasl_client(make_postern, far_dns, far, "not-used",
                    smtp_sender_dependent_authentication="yes",
                    smtp_sasl_password_maps=f"inline:{{ {SENDER}=relayuser@example.test:right-pw }}",
                    smtp_sasl_mechanism_filter="login")
    token = new_token()
    send(p, token)
    far.wait_for(token)
    h.wait_for(lambda: "sasl_method=LOGIN, sasl_username=relayuser@example.test" in far.log_text(), 10)


def test_sasl_never_plaintext_unless_allowed(make_postern, far_dns, postfix_peer, dovecot):  # noqa: F811
    d = dovecot(users=USERS, auth_failure_delay="0 secs")
    far = postfix_peer(tls=None, sasl_auth_port=d.auth_port)
    relay = rf"mx\.far\.test\[127\.0\.0\.1\]:{far.port}"
    # No TLS here, and smtp_sasl_security_options keeps its default
    # (noplaintext): the password is not sent.
    p = sasl_client(make_postern, far_dns, far, "right-pw", smtp_tls_security_level="may")
    token = new_token()
    send(p, token)
    p.wait_for_log(rf"to=<{re.escape(RCPT)}>, relay={relay}, .*dsn=4\.7\.0, status=deferred "
                   r"\(SASL authentication failed; cannot authenticate to server "
                   r"mx\.far\.test\[127\.0\.0\.1\]: no mechanism available\)")
    # The far side saw EHLO and QUIT, no AUTH (its disconnect line counts
    # every command).
    h.wait_for(lambda: re.search(r"disconnect from localhost\[127\.0\.0\.1\] ehlo=1 quit=1 "
                                 r"commands=2", far.log_text()), 10)
    assert " auth=" not in far.log_text()

    # Allowed in plaintext by the administrator: it works.
    q = sasl_client(make_postern, far_dns, far, "right-pw", smtp_tls_security_level="may",
                    smtp_sasl_security_options="noanonymous")
    token = new_token()
    send(q, token)
    far.wait_for(token)
    q.wait_for_log(rf"to=<{re.escape(RCPT)}>, relay={relay}, .*status=sent")


# --------------------------------------------------------------------------
# Connection reuse


def test_connection_reuse_many_messages_few_connections(make_postern, sink):
    # Issue #5: 1,000 messages to one destination arrive over far fewer
    # connections than messages, counted at the receiving side.
    n, sessions = 1000, 5
    p = make_postern({"relayhost": f"[127.0.0.1]:{sink.port}"})
    token = new_token()
    errors = []

    def submit(k):
        # Session k submits messages k, k + sessions, k + 2 * sessions, ...
        try:
            with p.smtp(timeout=120) as s:
                s.ehlo("client.example")
                for i in range(k, n, sessions):
                    data = h.crlf(f"From: {SENDER}\nTo: r{i}@remote.example\n"
                                  f"Subject: {token} {i}\n\nmsg {i}\n")
                    s.sendmail(SENDER, [f"r{i}@remote.example"], data)
        except Exception as e:  # reported below
            errors.append(f"session {k}: {e!r}")

    threads = [threading.Thread(target=submit, args=(k,)) for k in range(sessions)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not any(t.is_alive() for t in threads), "submission did not finish"
    assert not errors, errors
    sink.wait_for(token, count=n, timeout=300)
    time.sleep(1)
    got = sink.find(token)
    assert len(got) == n, f"{len(got)} messages at the sink, {n} sent"
    # Every message once, each intact.
    subjects = sorted(int(re.search(rb"Subject: \S+ (\d+)", m.content).group(1)) for m in got)
    assert subjects == list(range(n))
    assert all(re.search(rb"\r\n\r\nmsg \d+\r\n$", m.content) for m in got)
    conns = sink.connections
    print(f"connection reuse: {n} messages over {conns} connections "
          f"({n / max(conns, 1):.1f} messages per connection)")
    assert conns <= n // 5, f"{conns} connections for {n} messages"


# --------------------------------------------------------------------------
# CHUNKING (RFC 3030): BDAT to a far side that offers it


def _disconnect_lines(far):
    """The far side's disconnect lines of sessions that carried mail."""
    return [l for l in re.findall(r"postfix/smtpd\[\d+\]: disconnect from \S+ (.*)",
                                  far.log_text()) if "mail=" in l]


def test_chunking_bdat_to_a_real_postfix(make_postern, far_dns, postfix_peer):
    # Postfix 3.x offers CHUNKING by default.
    far = postfix_peer()
    p = client(make_postern, far_dns, far, smtp_tls_security_level="none")
    token = new_token()
    # A body line that starts with "." (BDAT carries it as it is: no
    # dot-stuffing), and a 100 KB message (more than one 64 KiB chunk).
    small_body = "first line\n.leading dot line\n..two dots\n.\nlast line\n"
    code, text = p.send(SENDER, [RCPT], message(token + " small", small_body))
    assert code == 250, text
    big_lines = [f"line {i:05d} " + "abcdefghij" * 9 for i in range(1000)]
    big_body = "\n".join(big_lines) + "\n"
    assert len(big_body) >= 100_000
    code, text = p.send(SENDER, [RCPT], message(token + " big", big_body))
    assert code == 250, text
    far.wait_for(token, count=2, timeout=60)
    p.wait_for_log(rf"status=sent .*{token}|status=sent", timeout=30)

    got = {b"small" if b"Subject: " + (token + " small").encode() in m else b"big": m
           for _, m in far.find(token)}
    small = got[b"small"]
    assert small.split(b"\n\n", 1)[1] == small_body.encode(), small
    big = got[b"big"]
    assert big.split(b"\n\n", 1)[1] == big_body.encode()

    # The far side saw BDAT, never DATA (its disconnect lines count them).
    # The two messages may go over one session or two at once (the agent
    # delivers requests in parallel); smtp_connection_cache_time_limit may
    # keep a session open, and its counts come on the disconnect line once
    # it closes.
    def bdat_count():
        return sum(int(m) for l in _disconnect_lines(far) for m in re.findall(r"\bbdat=(\d+)", l))
    h.wait_for(lambda: bdat_count() >= 3 or None, 30, what="far-side disconnect lines")
    lines = _disconnect_lines(far)
    assert any(re.search(r"\bbdat=\d+", l) for l in lines), lines
    assert not any(re.search(r"\bdata=", l) for l in lines), lines
    bdats = sum(int(m) for l in lines for m in re.findall(r"\bbdat=(\d+)", l))
    print("far side's sessions:", lines)
    # One chunk for the small message, two (64 KiB + rest) for the big one.
    assert bdats >= 3, lines


def test_lmtp_chunking_to_dovecot_one_reply_per_recipient(make_postern, dovecot):  # noqa: F811
    # Dovecot's LMTP offers CHUNKING. A verbose lmtp service shows the
    # conversation: BDAT ... LAST, then one reply per recipient.
    users = {"alice@example.test": "a", "bob@example.test": "b"}
    d = dovecot(users=users)
    p = make_postern({"transport_maps": f"inline:{{ example.test=lmtpv:unix:{d.lmtp_socket} }}"},
                     master_cf_extra=["lmtpv     unix  -       -       n       -       -       lmtp -v"])
    token = new_token()
    body = "one\n.\n.leading dot\n" + "w" * 70 + "\n" * 3 + "end\n"
    rcpts = list(users)
    data = f"From: {SENDER}\nTo: {', '.join(rcpts)}\nSubject: {token}\n\n{body}"
    code, text = p.send(SENDER, rcpts, data)
    assert code == 250, text
    for user in rcpts:
        (_, raw), = d.wait_for_messages(user, token, timeout=30)
        assert raw.replace(b"\r\n", b"\n").partition(b"\n\n")[2] == body.encode()
        p.wait_for_log(rf"to=<{re.escape(user)}>, relay=.*status=sent \(250 2\.0\.0 <{re.escape(user)}>")
    p.wait_for_log(r"postfix/lmtpv?\[\d+\]: > \S+: BDAT \d+ LAST")
    assert not re.search(r"> \S+: DATA$", p.log_text(), re.M)


def test_discard_ehlo_keywords_chunking_uses_data(make_postern, far_dns, postfix_peer):
    far = postfix_peer()
    p = client(make_postern, far_dns, far, smtp_tls_security_level="none",
               smtp_discard_ehlo_keywords="chunking")
    token = new_token()
    body = "a\n.dot line\nb\n"
    code, text = p.send(SENDER, [RCPT], message(token, body))
    assert code == 250, text
    (_, m), = far.wait_for(token, timeout=60)
    assert m.split(b"\n\n", 1)[1] == body.encode()
    p.wait_for_log(r"discarding EHLO keywords: CHUNKING", timeout=30)
    h.wait_for(lambda: _disconnect_lines(far) or None, 30, what="far-side disconnect line")
    lines = _disconnect_lines(far)
    assert any(re.search(r"\bdata=1", l) for l in lines), lines
    assert not any("bdat=" in l for l in lines), lines


# --------------------------------------------------------------------------
# sender_dependent_relayhost_maps


def test_sender_dependent_relayhost(make_postern, sink):
    other = h.Sink("other-sink.test").start()
    try:
        p = make_postern({
            "relayhost": f"[127.0.0.1]:{sink.port}",
            "sender_dependent_relayhost_maps":
                f"inline:{{ @corp.example=[127.0.0.1]:{other.port}, "
                f"dunno@corp.example=DUNNO }}",
        })
        token = new_token()
        mapped, unmapped, dunno = "boss@corp.example", SENDER, "dunno@corp.example"
        for who in (mapped, unmapped, dunno):
            data = f"From: {who}\nTo: r@remote.example\nSubject: {token} {who}\n\nhi\n"
            code, text = p.send(who, ["r@remote.example"], data)
            assert code == 250, text
        other.wait_for(token, count=1, timeout=60)
        sink.wait_for(token, count=2, timeout=60)
        time.sleep(0.5)
        assert [m.mail_from for m in other.find(token)] == [mapped]
        assert sorted(m.mail_from for m in sink.find(token)) == sorted([unmapped, dunno])
        p.wait_for_log(rf"to=<r@remote\.example>, relay=127\.0\.0\.1\[127\.0\.0\.1\]:{other.port}.*status=sent",
                       timeout=30)
    finally:
        other.stop()


# --------------------------------------------------------------------------
# DSN parameters passed on


def test_dsn_parameters_passed_on(make_postern, far_dns, postfix_peer):
    # The far side logs every command it receives from 127.0.0.1.
    far = postfix_peer(params={"debug_peer_list": "127.0.0.1"})
    p = client(make_postern, far_dns, far, smtp_tls_security_level="none")
    token = new_token()
    with p.smtp() as s:
        s.ehlo("client.example")
        assert s.has_extn("dsn")
        code, text = s.mail(SENDER, ["RET=HDRS", "ENVID=env+2B" + token])
        assert code == 250, text
        code, text = s.rcpt(RCPT, ["NOTIFY=SUCCESS,FAILURE", "ORCPT=rfc822;Orig+3Duser@far.test"])
        assert code == 250, text
        code, text = s.data(message(token))
        assert code == 250, text
    far.wait_for(token)
    log = far.log_text()
    assert re.search(r"< localhost\[127\.0\.0\.1\]: MAIL FROM:<sender@example\.org> .*RET=HDRS "
                     rf"ENVID=env\+2B{token}", log), log[-3000:]
    assert re.search(r"< localhost\[127\.0\.0\.1\]: RCPT TO:<user@far\.test> "
                     r"NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;Orig\+3Duser@far\.test", log), log[-3000:]


# --------------------------------------------------------------------------
# smtp_bind_address


def test_bind_address(make_postern, sink):
    p = make_postern({"relayhost": f"[127.0.0.1]:{sink.port}",
                      "smtp_bind_address": "127.0.0.3"})
    token = new_token()
    send(p, token)
    m, = sink.wait_for(token)
    assert m.peer[0] == "127.0.0.3", m.peer


# --------------------------------------------------------------------------
# MX cases through dnsmasq


def test_mx_cases_via_dnsmasq(make_postern, sink, dnsmasq):
    dead = "127.0.0.9"  # nothing listens there
    dns = dnsmasq([
        "--local=/test/",
        # several preferences: the lowest wins
        "--mx-host=prefs.test,mx20.prefs.test,20",
        "--mx-host=prefs.test,mx10.prefs.test,10",
        "--host-record=mx10.prefs.test,127.0.0.1",
        "--host-record=mx20.prefs.test,127.0.0.1",
        # equal preferences: either
        "--mx-host=equal.test,a.equal.test,10",
        "--mx-host=equal.test,b.equal.test,10",
        "--host-record=a.equal.test,127.0.0.1",
        "--host-record=b.equal.test,127.0.0.1",
        # a dead first MX: the second one gets it
        "--mx-host=deadfirst.test,mx1.deadfirst.test,10",
        "--mx-host=deadfirst.test,mx2.deadfirst.test,20",
        f"--host-record=mx1.deadfirst.test,{dead}",
        "--host-record=mx2.deadfirst.test,127.0.0.1",
        # no MX: the domain's own address
        "--host-record=nomx.test,127.0.0.1",
        # null MX (RFC 7505)
        "--mx-host=nullmx.test,.,0",
        # nosuch.test: NXDOMAIN
    ])
    domains = ["prefs.test", "equal.test", "deadfirst.test", "nomx.test", "nullmx.test",
               "nosuch.test"]
    table = ", ".join(f"{d}=smtp:{d}:{sink.port}" for d in domains)
    p = make_postern({"dns_resolver_addresses": f"127.0.0.1:{dns.port}",
                      "transport_maps": f"inline:{{ {table} }}"})
    tokens = {}
    for d in domains:
        tokens[d] = new_token()
        code, text = p.send(SENDER, [f"u@{d}"], h.crlf(f"Subject: {tokens[d]}\n\nto {d}\n"))
        assert code == 250, text
    port = sink.port
    for d in ("prefs.test", "equal.test", "deadfirst.test", "nomx.test"):
        sink.wait_for(tokens[d])
    p.wait_for_log(rf"to=<u@prefs\.test>, relay=mx10\.prefs\.test\[127\.0\.0\.1\]:{port}, .*status=sent")
    p.wait_for_log(rf"to=<u@equal\.test>, relay=[ab]\.equal\.test\[127\.0\.0\.1\]:{port}, .*status=sent")
    p.wait_for_log(rf"connect to mx1\.deadfirst\.test\[127\.0\.0\.9\]:{port}: Connection refused")
    p.wait_for_log(rf"to=<u@deadfirst\.test>, relay=mx2\.deadfirst\.test\[127\.0\.0\.1\]:{port}, "
                   r".*status=sent")
    p.wait_for_log(rf"to=<u@nomx\.test>, relay=nomx\.test\[127\.0\.0\.1\]:{port}, .*status=sent")
    p.wait_for_log(r"to=<u@nullmx\.test>, relay=none, .*dsn=5\.1\.10, status=bounced "
                   r"\(.*nullmx\.test does not accept mail \(nullMX\)\)")
    p.wait_for_log(r"to=<u@nosuch\.test>, relay=none, .*dsn=5\.4\.4, status=bounced "
                   r"\(Host or domain name not found\. Name service error for name=nosuch\.test "
                   r"type=MX: Host not found\)")
    assert not sink.find(tokens["nullmx.test"]) and not sink.find(tokens["nosuch.test"])


def test_tls_wrappermode_smtps(make_postern, far_dns, postfix_peer, test_ca):
    far = postfix_peer(tls=test_ca)
    p = make_postern({
        "dns_resolver_addresses": f"127.0.0.1:{far_dns.port}",
        "relayhost": f"[mx.far.test]:{far.smtps_port}",
        "smtp_tls_wrappermode": "yes",
        "smtp_tls_security_level": "verify",
        "smtp_tls_CAfile": str(test_ca.ca_file),
        "smtp_tls_loglevel": "1",
    })
    token = new_token()
    send(p, token)
    (_path, raw), = far.wait_for(token)
    assert re.search(rb"\(using TLSv1\.[23] with cipher ", raw)
    p.wait_for_log(rf"Verified TLS connection established to mx\.far\.test\[127\.0\.0\.1\]:"
                   rf"{far.smtps_port}: TLSv1\.3")
    p.wait_for_log(rf"relay=mx\.far\.test\[127\.0\.0\.1\]:{far.smtps_port}, .*status=sent")


def test_tls_secure_matches_a_subdomain_of_the_nexthop(make_postern, far_dns, postfix_peer, test_ca):
    # Delivery by MX to far.test: its MX mx.far.test presents a
    # certificate for mx.far.test, which "secure" accepts as a subdomain
    # of the next hop (Postfix's default match "nexthop, dot-nexthop").
    far = postfix_peer(tls=test_ca)
    p = make_postern({
        "dns_resolver_addresses": f"127.0.0.1:{far_dns.port}",
        "transport_maps": f"inline:{{ far.test=smtp:far.test:{far.port} }}",
        "smtp_tls_security_level": "secure",
        "smtp_tls_CAfile": str(test_ca.ca_file),
        "smtp_tls_loglevel": "1",
    })
    token = new_token()
    send(p, token)
    far.wait_for(token)
    p.wait_for_log(rf"Verified TLS connection established to mx\.far\.test\[127\.0\.0\.1\]:{far.port}")


def test_eight_bit_content_needs_8bitmime(make_postern, smtp_sink):
    """8-bit content goes only to a server that announced 8BITMIME
    (RFC 6152): to one that did not, it bounces with 5.6.3 and a reason
    that says so; 7-bit mail to the same server is delivered."""
    sink = smtp_sink(["-8"])  # smtp-sink -8: no 8BITMIME in its EHLO reply
    p = make_postern(params={"relayhost": f"[127.0.0.1]:{sink.port}"})
    code, text = p.send("s@postern.test", ["eight@remote.example"],
                        "Subject: 8bit\n\nsmörgåsbord\n", mail_options=["BODY=8BITMIME"])
    assert code == 250, text
    code, text = p.send("s@postern.test", ["seven@remote.example"],
                        "Subject: 7bit\n\nplain\n")
    assert code == 250, text
    p.wait_for_log(r"to=<eight@remote\.example>.*dsn=5\.6\.3, status=bounced "
                   r"\(message has 8-bit content, but host .* did not offer 8BITMIME")
    p.wait_for_log(r"to=<seven@remote\.example>.*status=sent")
    h.wait_for(lambda: sink.count() >= 1, timeout=20, what="the 7-bit message at smtp-sink")
    time.sleep(1)
    assert sink.count() == 1, "the 8-bit message reached a server without 8BITMIME"


def test_per_recipient_outcomes_in_one_transaction(make_postern, sink):
    """One transaction whose recipients get 250, 450 and 550: the first is
    delivered once, the second retried until it is accepted, the third
    bounced with a notice to the sender."""
    token = uuid.uuid4().hex
    p = make_postern(params={"relayhost": f"[127.0.0.1]:{sink.port}"})
    sink.set_rcpt("later@remote.example", "450 4.2.0 try later")
    sink.set_rcpt("gone@remote.example", "550 5.1.1 no such user")
    rcpts = ["ok@remote.example", "later@remote.example", "gone@remote.example"]
    code, text = p.send("sender@remote.example", rcpts, f"Subject: {token}\n\nbody {token}\n")
    assert code == 250, text

    def copies():
        # Deliveries of the message itself; the notice (from <>) quotes it.
        return [m for m in sink.messages
                if f"body {token}".encode() in m.content and m.mail_from not in ("", "<>")]

    first = h.wait_for(copies, timeout=30, what="the first delivery")
    assert [m.rcpt_tos for m in first] == [["ok@remote.example"]]
    p.wait_for_log(r"to=<later@remote\.example>.*dsn=4\.2\.0, status=deferred")
    p.wait_for_log(r"to=<gone@remote\.example>.*dsn=5\.1\.1, status=bounced "
                   r"\(host 127\.0\.0\.1\[127\.0\.0\.1\] said: 550 5\.1\.1 no such user")
    notice = h.wait_for(
        lambda: [m for m in sink.messages
                 if m.rcpt_tos == ["sender@remote.example"] and m.mail_from in ("", "<>")],
        timeout=30, what="the bounce notice to the sender")
    assert b"gone@remote.example" in notice[0].content
    assert b"later@remote.example" not in notice[0].content.split(b"Content-Type: text/rfc822-headers")[0]

    sink.set_rcpt("later@remote.example", "250 2.0.0 ok")
    h.wait_for(lambda: len(copies()) >= 2, timeout=30, what="the retried recipient delivered")
    time.sleep(2)  # a second copy for ok@ would arrive by now
    assert sorted(r for m in copies() for r in m.rcpt_tos) == \
        ["later@remote.example", "ok@remote.example"]


# --------------------------------------------------------------------------
# QUIT: smtp_skip_quit_response


@pytest.mark.parametrize("skip", ["default", "no"])
def test_quit_reply_skipped_by_default_awaited_when_asked(make_postern, receivers, skip):
    """Postfix's smtp_skip_quit_response (default yes): after the last
    transaction the client sends QUIT and closes without waiting for the
    221. A receiver that takes 4 s to answer QUIT sees the client close
    first, and the delivery is logged sent before those 4 s are up; with
    `smtp_skip_quit_response = no` the client waits for the 221."""
    rx = receivers(quit_delay=4.0)
    params = {"relayhost": f"[127.0.0.1]:{rx.port}",
              "smtp_connection_cache_on_demand": "no"}
    if skip == "no":
        params["smtp_skip_quit_response"] = "no"
    p = make_postern(params)
    token = new_token()
    code, _ = p.send(SENDER, ["rcpt@remote.example"], message(token))
    assert code == 250
    h.wait_for(lambda: rx.count() == 1, 30, what="the message at the receiver")
    assert rx.accepted[0].rcpts == ["rcpt@remote.example"]
    assert token.encode() in rx.accepted[0].content
    assert rx.accepted[0].content.rstrip(b"\r\n").endswith(b"Hello over SMTP.")
    h.wait_for(lambda: rx.quits and rx.quits[0]["lost"] is not None, 30,
               what="the client's QUIT and the end of its connection")
    p.wait_for_log(r"status=sent", timeout=30)
    quit = rx.quits[0]
    if skip == "default":
        assert quit["answered"] is None, quit
        assert quit["lost"] - quit["at"] < 2.0, quit
    else:
        assert quit["answered"] is not None, quit
        assert quit["answered"] - quit["at"] >= 3.5, quit
        assert quit["lost"] >= quit["answered"], quit
    assert len(rx.quits) == 1, rx.quits
