"""REQUIRETLS and TLS-Required: No (RFC 8689), issue #26 point 4.

Real peers only. Postern as the receiver: Python's smtplib with STARTTLS
(and in SMTPS wrapper mode) sees REQUIRETLS in EHLO only over TLS, MAIL
FROM's REQUIRETLS is taken over TLS and refused in clear text, and
postcat shows the queue file's attribute. Postern as the sender: the
next hop is a second Postern with TLS and REQUIRETLS (Postfix has no
REQUIRETLS), reached with `smtp_tls_security_level = secure` and a test
CA; at level `may` the message bounces with 5.7.10, to a private Postfix
with TLS (no REQUIRETLS) with 5.7.30, and the bounce returns headers
only. A message with `TLS-Required: No` reaches a `secure` destination
whose certificate does not verify.

Names resolve through dnsmasq (`dns_resolver_addresses`): mx.far.test is
127.0.0.1, the name in the test CA's certificate.
"""

import os
import re
import shutil
import smtplib
import ssl
import tempfile
import time
import uuid

import pytest

import postern_harness as h
from postfix_peer import TestCA, postfix_peer  # noqa: F401  (the fixture)

SENDER = "ptalice@postern.test"   # local on the sending Postern: bounces land there
RCPT = "user@far.test"


def new_token():
    return "pt-rtls-" + uuid.uuid4().hex


def message(token, extra=""):
    return h.crlf(f"From: {SENDER}\nTo: {RCPT}\nSubject: {token}\n{extra}\n"
                  f"Secret body of {token}.\n")


@pytest.fixture(scope="module")
def test_ca():
    d = tempfile.mkdtemp(prefix="pt-rtls-ca-")
    yield TestCA(d, names=["mx.far.test"])
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="module")
def other_ca():
    d = tempfile.mkdtemp(prefix="pt-rtls-ca2-")
    yield TestCA(d, names=["mx.far.test"], cn="Some Other CA")
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def far_dns(dnsmasq):
    return dnsmasq(["--local=/test/", "--host-record=mx.far.test,127.0.0.1"])


def tls_server(ca):
    return {"smtpd_tls_security_level": "may",
            "smtpd_tls_cert_file": str(ca.cert_file),
            "smtpd_tls_key_file": str(ca.key_file)}


def no_verify():
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


def receiver(make_postern, ca, **params):
    """A Postern next hop with TLS (and REQUIRETLS) that keeps what it
    accepts in its queue: its own relayhost is dead, and at level secure
    a REQUIRETLS message waits for it (at level may it would bounce)."""
    return make_postern({**tls_server(ca), **h.dead_relay_params(h.free_port()),
                         "smtp_tls_security_level": "secure",
                         "mynetworks": "127.0.0.0/8", **params})


def sender(make_postern, ca, dns, nexthop_port, **params):
    """The Postern under test as the sender: takes mail over STARTTLS,
    relays to mx.far.test:PORT."""
    return make_postern({**tls_server(ca),
                         "mynetworks": "127.0.0.0/8",
                         "dns_resolver_addresses": f"127.0.0.1:{dns.port}",
                         "relayhost": f"[mx.far.test]:{nexthop_port}",
                         "smtp_tls_loglevel": "1",
                         **params})


def submit(p, token, requiretls=True, extra=""):
    """One message over STARTTLS, with MAIL FROM's REQUIRETLS if asked."""
    with p.smtp() as s:
        s.ehlo("client.example")
        s.starttls(context=no_verify())
        s.ehlo("client.example")
        assert s.has_extn("requiretls"), s.esmtp_features
        opts = ["REQUIRETLS"] if requiretls else []
        refused = s.sendmail(SENDER, [RCPT], message(token, extra), mail_options=opts)
        assert refused == {}


def queued_ids(p, queue="deferred"):
    return [os.path.basename(f) for f in p.queue_files(queue)]


def postcat(p, qid):
    r = h.run_tool(p, "postcat", "-q", qid)
    assert r.returncode == 0, h.describe(r)
    return r.stdout


def raw_ehlo_and_mail(port, tls_wrap=False, starttls=False):
    """EHLO keywords and the reply to MAIL FROM ... REQUIRETLS, by hand."""
    if tls_wrap:
        s = smtplib.SMTP_SSL("127.0.0.1", port, timeout=20, context=no_verify())
    else:
        s = smtplib.SMTP("127.0.0.1", port, timeout=20)
    try:
        s.ehlo("client.example")
        if starttls:
            s.starttls(context=no_verify())
            s.ehlo("client.example")
        features = dict(s.esmtp_features)
        code, text = s.docmd("MAIL FROM:<a@example.org> REQUIRETLS")
        return features, code, text.decode()
    finally:
        s.close()


def _listening(port):
    import socket
    try:
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
        return True
    except OSError:
        return False


# --------------------------------------------------------------------------
# Postern as the receiver


def test_requiretls_offered_and_taken_only_over_tls(make_postern, test_ca,
                                                    postfix_peer):  # noqa: F811
    p = make_postern(tls_server(test_ca))
    features, code, text = raw_ehlo_and_mail(p.port)
    assert "requiretls" not in features and "starttls" in features, features
    # In clear text the parameter is unknown, as any other not offered:
    # the reply Postfix 3.7 (no REQUIRETLS at all) gives.
    assert (code, text) == (555, "5.5.4 Unsupported option: REQUIRETLS"), (code, text)
    pf = postfix_peer(tls=test_ca)
    assert raw_ehlo_and_mail(pf.port)[1:] == (code, text)

    features, code, text = raw_ehlo_and_mail(p.port, starttls=True)
    assert "requiretls" in features, features
    assert code == 250 and text.startswith("2.1.0"), (code, text)

    # Turned off: not offered even over TLS, and unknown there.
    q = make_postern({**tls_server(test_ca), "smtpd_requiretls_enable": "no"})
    features, code, _ = raw_ehlo_and_mail(q.port, starttls=True)
    assert "requiretls" not in features and code == 555, features


def test_requiretls_offered_in_smtps_wrapper_mode(make_postern, test_ca):
    port = h.free_port()
    make_postern(tls_server(test_ca),
                 master_cf_extra=[f"127.0.0.1:{port} inet n - n - - smtpd "
                                  "-o smtpd_tls_wrappermode=yes"])
    h.wait_for(lambda: _listening(port), timeout=20, what="the smtps listener")
    features, code, text = raw_ehlo_and_mail(port, tls_wrap=True)
    assert "requiretls" in features and "starttls" not in features, features
    assert code == 250, (code, text)


def test_requiretls_recorded_in_the_queue_file(make_postern, test_ca, far_dns):
    far = receiver(make_postern, test_ca)
    token = new_token()
    with far.smtp() as s:
        s.ehlo("client.example")
        s.starttls(context=no_verify())
        s.ehlo("client.example")
        assert s.sendmail(SENDER, [RCPT], message(token), mail_options=["REQUIRETLS"]) == {}
        assert s.sendmail(SENDER, [RCPT], message(token + "-plain")) == {}
    h.wait_for(lambda: len(queued_ids(far)) == 2, timeout=30, what="two deferred messages")
    shown = {}
    for qid in queued_ids(far):
        text = postcat(far, qid)
        shown["plain" if f"{token}-plain" in text else "rtls"] = text
    assert "named_attribute: requiretls=yes" in shown["rtls"], shown["rtls"]
    assert "requiretls" not in shown["plain"], shown["plain"]


# --------------------------------------------------------------------------
# Postern as the sender


def test_delivered_over_verified_tls_to_a_requiretls_server(
        make_postern, test_ca, far_dns, local_users):
    far = receiver(make_postern, test_ca)
    p = sender(make_postern, test_ca, far_dns, far.port,
               smtp_tls_security_level="secure", smtp_tls_CAfile=str(test_ca.ca_file))
    token = new_token()
    submit(p, token)
    p.wait_for_log(rf"to=<{re.escape(RCPT)}>, relay=mx\.far\.test\[127\.0\.0\.1\]:{far.port}, "
                   r".*status=sent")
    assert p.log_search(rf"Verified TLS connection established to mx\.far\.test\[127\.0\.0\.1\]:"
                        rf"{far.port}"), p.log_tail()
    # The next hop got it with MAIL FROM's REQUIRETLS and keeps the tag.
    h.wait_for(lambda: queued_ids(far), timeout=30, what="the message at the next hop")
    (qid,) = queued_ids(far)
    text = postcat(far, qid)
    assert token in text and "named_attribute: requiretls=yes" in text, text


def bounce_for(token):
    """The non-delivery notice for `token` in ptalice's Maildir."""
    found = h.wait_for_messages("ptalice", token, timeout=60)
    return found[0][1].decode("utf-8", "replace")


def assert_headers_only(notice, token):
    assert "text/rfc822-headers" in notice, notice
    assert f"Subject: {token}" in notice, notice
    assert f"Secret body of {token}" not in notice, notice
    assert "message/rfc822" not in notice, notice


def test_unauthenticated_tls_bounces_5_7_10(make_postern, test_ca, far_dns, local_users):
    far = receiver(make_postern, test_ca)
    p = sender(make_postern, test_ca, far_dns, far.port, smtp_tls_security_level="may")
    token = new_token()
    submit(p, token)
    p.wait_for_log(rf"to=<{re.escape(RCPT)}>, .*dsn=5\.7\.10, status=bounced "
                   r"\(REQUIRETLS needs authenticated TLS")
    notice = bounce_for(token)
    assert "Status: 5.7.10" in notice, notice
    assert_headers_only(notice, token)
    time.sleep(1)
    assert not queued_ids(far), "nothing may reach the next hop"
    assert not re.search(rf"connect to mx\.far\.test|TLS connection established",
                         p.log_text()), "no connection was to be made"

    # encrypt: TLS, but the server is not authenticated either.
    q = sender(make_postern, test_ca, far_dns, far.port, smtp_tls_security_level="encrypt")
    token2 = new_token()
    submit(q, token2)
    q.wait_for_log(rf"to=<{re.escape(RCPT)}>, .*dsn=5\.7\.10, status=bounced")
    time.sleep(1)
    assert not queued_ids(far), "nothing may reach the next hop"


def test_a_server_without_requiretls_bounces_5_7_30(
        make_postern, test_ca, far_dns, postfix_peer, local_users):  # noqa: F811
    far = postfix_peer(tls=test_ca)
    p = sender(make_postern, test_ca, far_dns, far.port,
               smtp_tls_security_level="secure", smtp_tls_CAfile=str(test_ca.ca_file))
    token = new_token()
    submit(p, token)
    p.wait_for_log(rf"to=<{re.escape(RCPT)}>, relay=mx\.far\.test\[127\.0\.0\.1\]:{far.port}, "
                   r".*dsn=5\.7\.30, status=bounced \(REQUIRETLS support required, but was "
                   r"not offered by host mx\.far\.test\[127\.0\.0\.1\]\)")
    assert p.log_search(r"Verified TLS connection established to mx\.far\.test"), p.log_tail()
    notice = bounce_for(token)
    assert "Status: 5.7.30" in notice, notice
    assert_headers_only(notice, token)
    time.sleep(1)
    assert not far.find(token), "the message reached a server without REQUIRETLS"

    # The same message without REQUIRETLS goes there.
    token2 = new_token()
    submit(p, token2, requiretls=False)
    far.wait_for(token2)


def test_tls_required_no_relaxes_a_failing_policy(
        make_postern, test_ca, other_ca, far_dns, local_users):
    # The next hop's certificate is from a CA the sender does not trust.
    far = receiver(make_postern, other_ca)
    p = sender(make_postern, test_ca, far_dns, far.port,
               smtp_tls_security_level="secure", smtp_tls_CAfile=str(test_ca.ca_file))
    strict, relaxed = new_token(), new_token()
    submit(p, strict, requiretls=False)
    submit(p, relaxed, requiretls=False, extra="TLS-Required: No\n")
    p.wait_for_log(rf"to=<{re.escape(RCPT)}>, .*dsn=4\.7\.5, status=deferred "
                   r"\(Server certificate not verified\)")
    p.wait_for_log(rf"to=<{re.escape(RCPT)}>, relay=mx\.far\.test\[127\.0\.0\.1\]:{far.port}, "
                   r".*status=sent")
    h.wait_for(lambda: queued_ids(far), timeout=30, what="the relaxed message at the next hop")
    texts = [postcat(far, q) for q in queued_ids(far)]
    assert len(texts) == 1 and relaxed in texts[0], texts
    # The next hop tagged it too (cleanup reads the header).
    assert "named_attribute: tls_required=no" in texts[0], texts[0]
    assert p.log_search(r"TLS-Required: No: TLS security level secure for "
                        r"\[mx\.far\.test\]:\d+ lowered to may"), p.log_tail()
    # It still went over TLS (untrusted), not in clear text.
    assert p.log_search(r"Untrusted TLS connection established to mx\.far\.test"), p.log_tail()

    # With REQUIRETLS the header is ignored: the message never goes out
    # unverified (deferred, as the secure level says).
    ignored = new_token()
    submit(p, ignored, requiretls=True, extra="TLS-Required: No\n")

    def deferred_ignored():
        for q in queued_ids(p):
            text = postcat(p, q)
            if ignored in text:
                return text
        return None
    text = h.wait_for(deferred_ignored, timeout=30, what="the REQUIRETLS message deferred")
    assert "named_attribute: requiretls=yes" in text and "tls_required" not in text, text
    time.sleep(1)
    assert all(ignored not in postcat(far, q) for q in queued_ids(far))


def test_forwarding_by_alias_keeps_requiretls(make_postern, test_ca, far_dns, local_users):
    # local forwards the message to a remote alias target: the copy keeps
    # REQUIRETLS, so at level may it does not leave (5.7.10), and at level
    # secure the next hop gets it tagged.
    far = receiver(make_postern, test_ca)
    for level in ("may", "secure"):
        p = make_postern({**tls_server(test_ca), "mynetworks": "127.0.0.0/8",
                          "dns_resolver_addresses": f"127.0.0.1:{far_dns.port}",
                          "relayhost": f"[mx.far.test]:{far.port}",
                          "smtp_tls_security_level": level,
                          "smtp_tls_CAfile": str(test_ca.ca_file)}, start=False)
        p.write_file("etc/aliases", "postmaster: root\nrtlsfwd: user@far.test\n")
        p.start()
        token = new_token()
        with p.smtp() as s:
            s.ehlo("client.example")
            s.starttls(context=no_verify())
            s.ehlo("client.example")
            assert s.sendmail(SENDER, ["rtlsfwd@postern.test"], message(token),
                              mail_options=["REQUIRETLS"]) == {}
        p.wait_for_log(r"to=<rtlsfwd@postern\.test>, .*status=sent \(forwarded as ")
        if level == "may":
            p.wait_for_log(r"to=<user@far\.test>, orig_to=<rtlsfwd@postern\.test>, .*dsn=5\.7\.10, "
                           r"status=bounced|to=<user@far\.test>, .*dsn=5\.7\.10, status=bounced")
        else:
            p.wait_for_log(r"to=<user@far\.test>, .*status=sent")
            h.wait_for(lambda: queued_ids(far), timeout=30, what="the copy at the next hop")
            (qid,) = queued_ids(far)
            text = postcat(far, qid)
            assert token in text and "named_attribute: requiretls=yes" in text, text
