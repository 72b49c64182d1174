"""ETRN (RFC 1985) in smtpd, as Postfix 3.7's smtpd(8) answers it:
`smtpd_etrn_restrictions` (with `check_etrn_access`), `fast_flush_domains`
(default `$relay_domains`), the syntax and state errors, and the flush
itself: a message to a relay domain is deferred (its relay host down, a
free port nobody listens on, and an hour before its next try), then a
receiver comes up on that port and a client's `ETRN domain` has it
delivered within seconds.

The same dialogue is then run against a private Postfix with the same
settings, and the replies are compared, code and text.
"""

import re
import smtplib
import time
import uuid

import pytest

import postern_harness as h
from postern_harness import dead_relay_params
from postfix_peer import postfix_peer  # noqa: F401  (the fixture)

SENDER = "sender@example.org"

# What both servers are given (besides the relay host of the Postern test).
PARAMS = {
    "relay_domains": "etrn.test, blocked.test, closed.test, other.test",
    # other.test is relayed but not eligible for a flush.
    "fast_flush_domains": "etrn.test, blocked.test, closed.test",
    "smtpd_restriction_classes": "etrn_nobody",
    "etrn_nobody": "reject",
    "smtpd_etrn_restrictions":
        "check_etrn_access inline:{ blocked.test=REJECT, closed.test=etrn_nobody }",
}


@pytest.fixture
def dead_port():
    return h.free_port()


def dialogue(port):
    """One session: EHLO, then every kind of ETRN; returns (the EHLO
    keywords, [(command, code, text)]), with the text as sent (bytes)."""
    out = []
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as s:
        s.ehlo("client.example")
        words = set(s.esmtp_features)

        def cmd(line):
            code, text = s.docmd(line)
            out.append((line, code, text))

        cmd("ETRN")
        cmd("ETRN a.test b.test")
        cmd("ETRN -bad..name")
        cmd("ETRN .etrn.test")
        cmd("ETRN other.test")
        cmd("ETRN unknown.test")
        cmd("ETRN blocked.test")
        cmd("ETRN sub.blocked.test")
        cmd("ETRN closed.test")
        cmd("ETRN etrn.test")
        cmd("ETRN @etrn.test")
        cmd("ETRN #etrn.test")
        cmd("ETRN [127.0.0.1]")
        cmd(f"MAIL FROM:<{SENDER}>")
        cmd("ETRN etrn.test")
        cmd("RSET")
        cmd("ETRN etrn.test")
    return words, out


def reply(out, line, n=0):
    got = [(c, t) for (ln, c, t) in out if ln == line]
    return got[n]


def check_replies(words, out):
    assert "etrn" in words
    assert reply(out, "ETRN") == (500, b"Syntax: ETRN domain")
    assert reply(out, "ETRN a.test b.test") == (500, b"Syntax: ETRN domain")
    assert reply(out, "ETRN -bad..name") == (501, b"Error: invalid parameter syntax")
    assert reply(out, "ETRN .etrn.test") == (501, b"Error: invalid parameter syntax")
    assert reply(out, "ETRN other.test") == (459, b"<other.test>: service unavailable")
    assert reply(out, "ETRN unknown.test") == (459, b"<unknown.test>: service unavailable")
    assert reply(out, "ETRN blocked.test") == (
        554, b"5.7.1 <blocked.test>: Etrn command rejected: Access denied")
    # access(5) looks up the parent domains too.
    assert reply(out, "ETRN sub.blocked.test") == (
        554, b"5.7.1 <sub.blocked.test>: Etrn command rejected: Access denied")
    # A restriction class whose list is `reject`.
    assert reply(out, "ETRN closed.test") == (
        554, b"5.7.1 <closed.test>: Etrn command rejected: Access denied")
    assert reply(out, "ETRN etrn.test") == (250, b"Queuing started")
    assert reply(out, "ETRN @etrn.test") == (250, b"Queuing started")
    assert reply(out, "ETRN #etrn.test") == (250, b"Queuing started")
    assert reply(out, "ETRN [127.0.0.1]")[0] == 459
    assert reply(out, "ETRN etrn.test", 1) == (503, b"Error: MAIL transaction in progress")
    assert reply(out, "ETRN etrn.test", 2) == (250, b"Queuing started")


def send_deferred(p, rcpt):
    token = "pt-" + uuid.uuid4().hex
    msg = (f"From: {SENDER}\r\nTo: {rcpt}\r\nSubject: {token}\r\n"
           f"Message-ID: <{token}@example.org>\r\n\r\nHello.\r\n")
    return p.send_deferred(SENDER, [rcpt], msg), token


def start_sink_on(port, monkeypatch):
    monkeypatch.setattr(h, "free_port", lambda udp=False: port)
    try:
        return h.Sink().start()
    finally:
        monkeypatch.undo()


def test_etrn_flushes_the_domain(make_postern, dead_port, monkeypatch):
    p = make_postern(params=dict(PARAMS, **dead_relay_params(dead_port)))
    _, tok_etrn = send_deferred(p, "user@etrn.test")
    _, tok_other = send_deferred(p, "user@other.test")
    sink = start_sink_on(dead_port, monkeypatch)
    try:
        # Refused: nothing moves (an hour to the next try).
        with p.smtp() as s:
            s.ehlo("client.example")
            assert s.docmd("ETRN other.test")[0] == 459
            assert s.docmd("ETRN blocked.test")[0] == 554
        time.sleep(2)
        assert sink.count(tok_etrn) == 0 and sink.count(tok_other) == 0
        # Accepted: the domain's mail goes now, the other stays.
        t0 = time.monotonic()
        with p.smtp() as s:
            s.ehlo("client.example")
            assert s.docmd("ETRN etrn.test") == (250, b"Queuing started")
        got = sink.wait_for(tok_etrn, timeout=20)[0]
        assert time.monotonic() - t0 < 20
        assert got.rcpt_tos == ["user@etrn.test"]
        time.sleep(1)
        assert sink.count(tok_other) == 0
    finally:
        sink.stop()
    log = p.log_text()
    # Postfix's log lines (smtpd.c etrn_cmd, smtpd_check.c log_whatsup).
    assert re.search(r"postfix/smtpd\[\d+\]: warning: reject: ETRN other\.test\.\.\. "
                     r"from \S+\[127\.0\.0\.1\]", log), log
    assert re.search(r"postfix/smtpd\[\d+\]: NOQUEUE: reject: ETRN from "
                     r"\S+\[127\.0\.0\.1\]: 554 5\.7\.1 <blocked\.test>: Etrn command "
                     r"rejected: Access denied; proto=ESMTP helo=<client\.example>", log), log


def test_etrn_replies_as_postfix(make_postern, postfix_peer):
    p = make_postern(params=PARAMS)
    words, ours = dialogue(p.port)
    check_replies(words, ours)
    far = postfix_peer(params=PARAMS)
    their_words, theirs = dialogue(far.port)
    assert "etrn" in their_words
    assert ours == theirs
    # The same log lines.
    for pattern in (r"warning: reject: ETRN other\.test\.\.\. from \S+\[127\.0\.0\.1\]",
                    r"NOQUEUE: reject: ETRN from \S+\[127\.0\.0\.1\]: 554 5\.7\.1 "
                    r"<closed\.test>: Etrn command rejected: Access denied; proto=ESMTP "
                    r"helo=<client\.example>"):
        assert re.search(pattern, p.log_text()), pattern
        assert re.search(pattern, far.log_text()), pattern


def test_etrn_restrictions_reject_and_helo_required(make_postern):
    p = make_postern(params=dict(PARAMS, smtpd_etrn_restrictions="reject",
                                 smtpd_helo_required="yes"))
    with p.smtp() as s:
        assert s.docmd("ETRN etrn.test") == (503, b"Error: send HELO/EHLO first")
        s.ehlo("client.example")
        assert s.docmd("ETRN etrn.test") == (
            554, b"5.7.1 <etrn.test>: Etrn command rejected: Access denied")
        assert s.docmd("QUIT")[0] == 221
    p.wait_for_log(r"disconnect from \S+\[127\.0\.0\.1\] ehlo=1 etrn=0/2 quit=1 "
                   r"commands=2/4")


def test_etrn_keyword_discarded(make_postern):
    p = make_postern(params={"smtpd_discard_ehlo_keywords": "etrn"})
    with p.smtp() as s:
        s.ehlo("client.example")
        assert "etrn" not in s.esmtp_features
        assert "vrfy" in s.esmtp_features


def test_etrn_policy_service_sees_the_domain(make_postern):
    from test_policy_service import PolicyServer
    srv = PolicyServer(lambda a: "REJECT no flush for you" if a.get("etrn_domain") == "blocked.test"
                       else "DUNNO")
    try:
        p = make_postern(params=dict(
            PARAMS, smtpd_etrn_restrictions=f"check_policy_service inet:127.0.0.1:{srv.port}"))
        with p.smtp() as s:
            s.ehlo("client.example")
            assert s.docmd("ETRN blocked.test") == (
                554, b"5.7.1 <blocked.test>: Etrn command rejected: no flush for you")
            assert s.docmd("ETRN etrn.test") == (250, b"Queuing started")
    finally:
        srv.stop()
    first, second = srv.requests
    assert first["protocol_state"] == "ETRN" and first["etrn_domain"] == "blocked.test"
    assert first["recipient"] == "" and first["sender"] == ""
    assert second["etrn_domain"] == "etrn.test"
