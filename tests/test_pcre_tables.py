"""`pcre:` tables with PCRE's meaning (issue #24 point 5): one
header_checks table with look-ahead, look-behind, a back-reference, an
`if`/`endif` block and flags, and the same messages sent to Postern and to
a private Postfix 3.7 using the same file: the same messages are
rejected, with the same reply, and the same pass. A pattern that does not
compile is an error naming the file and line in `postern check`, and the
table is not used without it (mail waits). Run as root."""

import smtplib
import uuid

import pytest

import postern_harness as h
from postfix_peer import postfix_available, postfix_peer  # noqa: F401  (the fixture)

CHECKS = r"""# Spam rules as hosting setups write them.
/^Subject:(?=.*\bfree\b)(?!.*\bnewsletter\b)/ REJECT free offer
/^Subject:.*\b(\w+)\s+\1\b/ REJECT repeated word $1
/(?<=^X-Spam-Score: )[5-9]\d*/ REJECT high score
if /^X-Mailer:/
/bulk/ REJECT bulk mailer
/^X-Mailer: (?>a+)b/ REJECT atomic
endif
/^Subject: CASE$/i REJECT exact case
/^X-Body-Line:.*$/E DUNNO
"""

MESSAGES = [
    "Subject: Free money now",
    "Subject: our free newsletter",
    "Subject: hello hello world",
    "Subject: hello world",
    "X-Spam-Score: 7",
    "X-Spam-Score: 3",
    "X-Mailer: BulkSender 2.0",
    "X-Other: bulk",
    "X-Mailer: aaab",
    "Subject: CASE",
    "Subject: case",
]


def send(port, rcpt, header):
    token = uuid.uuid4().hex
    body = h.crlf(f"From: a@orig.test\nTo: {rcpt}\n{header}\n\nbody {token}\n")
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as s:
        s.ehlo("client.example")
        s.mail("a@orig.test")
        code, _ = s.rcpt(rcpt)
        assert code == 250
        code, text = s.data(body)
        text = text.decode()
        # Queue IDs differ; the rest must not.
        return code, text.split(" queued as ")[0]


@pytest.mark.skipif(not postfix_available(), reason="Postfix is not installed")
def test_pcre_header_checks_match_postfix(make_postern, sink, postfix_peer, tmp_path):  # noqa: F811
    if not h.is_root():
        pytest.skip("a private Postfix needs root")
    table = tmp_path / "header_checks.pcre"
    table.write_text(CHECKS)
    tmp_path.chmod(0o755)
    table.chmod(0o644)
    far = postfix_peer(params={"header_checks": f"pcre:{table}"})
    p = make_postern(params={
        "header_checks": f"pcre:{table}",
        "relayhost": f"[127.0.0.1]:{sink.port}",
    })
    theirs = [send(far.port, "user@far.test", m) for m in MESSAGES]
    ours = [send(p.port, "user@far.test", m) for m in MESSAGES]
    for m, t, o in zip(MESSAGES, theirs, ours):
        assert o == t, f"{m!r}: Postfix {t}, Postern {o}"
    # The table did reject and pass (not all one way).
    codes = {c for c, _ in ours}
    assert codes == {250, 550}, ours
    assert ("550", "5.7.1 repeated word hello") == (str(ours[2][0]), ours[2][1])


def test_a_bad_pattern_is_an_error_with_file_and_line(make_postern, sink, tmp_path):
    table = tmp_path / "checks.pcre"
    table.write_text("/ok/ DUNNO\n/(unclosed/ REJECT x\n")
    tmp_path.chmod(0o755)
    table.chmod(0o644)
    p = make_postern(params={
        "header_checks": f"pcre:{table}",
        "relayhost": f"[127.0.0.1]:{sink.port}",
    }, start=False)
    r = p.postern("check")
    assert r.returncode == 1, h.describe(r)
    assert f"header_checks: {table}, line 2: error in regex /(unclosed/" in r.stderr, \
        h.describe(r)
    # `postern start` refuses it with the same line: nothing runs.
    r = p.postern("start")
    assert r.returncode == 1, h.describe(r)
    assert f"header_checks: {table}, line 2: error in regex /(unclosed/" in r.stderr, \
        h.describe(r)
    assert not h.smtp_banner_ok(p.port), "a refused start left a listener"
    # Broken after start (the run-time path): the table is not used
    # without its rule, so the mail waits; it is not let through unchecked.
    table.write_text("/ok/ DUNNO\n")
    p.start()
    table.write_text("/ok/ DUNNO\n/(unclosed/ REJECT x\n")
    assert p.postern("reload").returncode == 0
    code, text = h.wait_for(
        lambda: (lambda r: r if r[0] != 250 else None)(send(p.port, "user@far.test",
                                                            "Subject: x")),
        20, what="the broken table to take effect")
    assert (code, text) == (451, "4.3.0 Error: queue file write error"), (code, text)
    p.wait_for_log(rf"{table}, line 2: error in regex")
    table.write_text("/ok/ DUNNO\n")
    assert p.postern("reload").returncode == 0
    code, text = h.wait_for(
        lambda: (lambda r: r if r[0] == 250 else None)(send(p.port, "user@far.test",
                                                            "Subject: x")),
        20, what="the message accepted once the table is fixed")
    assert p.postern("check").returncode == 0
