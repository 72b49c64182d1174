"""Bounce classification (issue #19 point 4): `bounce_classifier_maps`
maps each failure's one-line reply ``"<code> <enhanced> <text>"`` to a
class; the shipped rules are conf/etc/bounce_classes (PowerMTA's 17
categories and KumoMTA's dns-failure, too-many-recipients,
authentication-failed, auto-reply; text before codes). The class goes
into the bounce notice (``X-Postern-Bounce-Class:`` in the per-recipient
part of message/delivery-status), ``postqueue -j`` and a log line of its
own beside Postfix's unchanged delivery line.

The receiver is an aiosmtpd sink answering each recipient as told; the
sender's domain is routed to the same sink, so the notices land there.
"""

import email
import email.policy
import json
import re
import uuid
from pathlib import Path

import postern_harness as h

REPO = Path(__file__).resolve().parent.parent
SHIPPED = REPO / "conf" / "etc" / "bounce_classes"
SENDER = "owner@sender.test"

# The 17 PowerMTA categories and KumoMTA's extra ones.
CLASSES = {
    "bad-mailbox", "inactive-mailbox", "quota-issues", "bad-domain", "routing-errors",
    "no-answer-from-host", "bad-connection", "relaying-issues", "policy-related",
    "spam-related", "virus-related", "content-related", "protocol-errors",
    "bad-configuration", "invalid-sender", "message-expired", "other",
    "dns-failure", "too-many-recipients", "authentication-failed", "auto-reply",
}

# One-line replies (remote, and Postern's own as it classifies them) and
# the class the shipped rules give.
SAMPLES = [
    ("550 5.1.1 <a@b.test>: Recipient address rejected: User unknown in local recipient table",
     "bad-mailbox"),
    ("550 5.1.1 The email account that you tried to reach does not exist", "bad-mailbox"),
    ("552 5.2.2 <a@b.test>: mailbox full", "quota-issues"),
    ("452 4.2.2 The email account that you tried to reach is over quota", "quota-issues"),
    ("550 5.2.1 The email account that you tried to reach is disabled", "inactive-mailbox"),
    ("550 5.1.2 Host unknown", "bad-domain"),
    ("554 5.7.1 Service unavailable; Client host [192.0.2.1] blocked using zen.spamhaus.org",
     "spam-related"),
    # Text before codes: "blocked" in a 5.1.1 reply.
    ("550 5.1.1 sender blocked", "spam-related"),
    ("554 5.7.1 <a@b.test>: Relay access denied", "relaying-issues"),
    ("550 5.7.1 Message rejected due to content restrictions", "content-related"),
    ("554 5.7.0 Virus found in message", "virus-related"),
    ("550 5.7.26 This message does not pass authentication checks (SPF and DKIM both do not pass)",
     "authentication-failed"),
    ("452 4.5.3 Too many recipients", "too-many-recipients"),
    ("550 5.0.0 Auto-reply: I am out of the office", "auto-reply"),
    ("451 4.7.1 rate limited", "policy-related"),
    ("421 4.7.0 Too many connections", "policy-related"),
    ("553 5.1.8 <x@y.test>: Sender address rejected: Domain not found", "invalid-sender"),
    ("500 5.5.2 Error: command not recognized", "protocol-errors"),
    ("554 5.4.6 Hop count exceeded - possible mail loop", "routing-errors"),
    ("550 5.3.5 System incorrectly configured", "bad-configuration"),
    ("451 4.4.1 connect to mx.b.test[192.0.2.1]:25: Connection refused", "bad-connection"),
    ("451 4.4.1 connect to mx.b.test[192.0.2.1]:25: Connection timed out", "no-answer-from-host"),
    ("550 5.4.4 Host or domain name not found. Name service error for name=nx.test type=MX: "
     "Host not found", "dns-failure"),
    ("451 4.7.5 Cannot start TLS: handshake failure", "bad-connection"),
    ("550 4.4.7 Message expired: connect to mx.b.test[192.0.2.1]:25: Connection refused",
     "message-expired"),
    ("550 5.9.9 something nobody wrote a rule for", "other"),
]


def postmap_q(p, key, table):
    r = h.run_tool(p, "postmap", "-q", key, table)
    assert r.returncode == 0, h.describe(r)
    return r.stdout.strip()


def shipped_rules():
    return [line.split()[-1] for line in SHIPPED.read_text().splitlines()
            if line.startswith("/")]


def test_the_shipped_rules_cover_every_class(make_postern):
    """Every class the file gives is one of the 21, each of the 21 is
    given by some rule, and the last rule is the catch-all `other`."""
    given = shipped_rules()
    assert set(given) == CLASSES, set(given) ^ CLASSES
    assert SHIPPED.read_text().rstrip().splitlines()[-1].split() == ["/./", "other"]
    # The text patterns come before the enhanced-code patterns.
    text = SHIPPED.read_text()
    assert text.index("/spam|") < text.index(r"/^[0-9]{3} [45]\.1\.1 /")


def test_sample_replies_get_their_class(make_postern):
    """postmap -q on the shipped file (the table a daemon opens with
    bounce_classifier_maps = regexp:...) classifies each sample."""
    p = make_postern(start=False)
    got = {line: postmap_q(p, line, f"regexp:{SHIPPED}") for line, _ in SAMPLES}
    want = dict(SAMPLES)
    wrong = {k: (got[k], want[k]) for k in want if got[k] != want[k]}
    assert not wrong, wrong


def notices(sink):
    return [m for m in sink.messages if m.mail_from in ("", "<>")]


def dsn_recipient_fields(raw):
    """The per-recipient blocks of a notice's message/delivery-status part."""
    msg = email.message_from_bytes(raw, policy=email.policy.compat32)
    for part in msg.walk():
        if part.get_content_type() == "message/delivery-status":
            blocks = part.get_payload()
            return [dict(b.items()) for b in blocks[1:]]
    raise AssertionError("no message/delivery-status part:\n" + raw.decode(errors="replace"))


def make(make_postern, sink, files=None, **params):
    table = f"far.test=smtp:[127.0.0.1]:{sink.port}, sender.test=smtp:[127.0.0.1]:{sink.port}"
    base = {"transport_maps": f"inline:{{ {table} }}"}
    base.update(params)
    return make_postern(base, files=files)


def test_the_notice_and_the_log_carry_the_class(make_postern, sink):
    sink.set_rcpt("bad@far.test", "550 5.1.1 <bad@far.test>: Recipient address rejected: "
                  "User unknown in local recipient table")
    sink.set_rcpt("full@far.test", "552 5.2.2 <full@far.test>: mailbox full")
    p = make(make_postern, sink)
    token = "pt-bclass-" + uuid.uuid4().hex
    code, text = p.send(SENDER, ["bad@far.test", "full@far.test", "ok@far.test"],
                        h.crlf(f"Subject: {token}\n\nx\n"))
    assert code == 250, text
    sink.wait_for(token)
    h.wait_for(lambda: notices(sink), 30, what="the non-delivery notice")
    (notice,) = notices(sink)
    fields = {f["Final-Recipient"].split(";")[1].strip(): f for f in
              dsn_recipient_fields(notice.content)}
    assert fields["bad@far.test"]["X-Postern-Bounce-Class"] == "bad-mailbox", fields
    assert fields["full@far.test"]["X-Postern-Bounce-Class"] == "quota-issues", fields
    assert fields["bad@far.test"]["Status"] == "5.1.1"
    # The class line, after Postfix's delivery line, which is unchanged.
    for rcpt, dsn, cls in (("bad@far.test", "5.1.1", "bad-mailbox"),
                           ("full@far.test", "5.2.2", "quota-issues")):
        p.wait_for_log(rf"postfix/smtp\[\d+\]: [0-9A-F]+: to=<{re.escape(rcpt)}>, "
                       rf"relay=127\.0\.0\.1\[127\.0\.0\.1\]:{sink.port}, delay=[\d.]+, "
                       rf"delays=[\d.]+/[\d.]+/[\d.]+/[\d.]+, dsn={dsn}, status=bounced "
                       rf"\(host 127\.0\.0\.1\[127\.0\.0\.1\] said: ")
        p.wait_for_log(rf"postfix/smtp\[\d+\]: [0-9A-F]+: bounce_class={cls}, "
                       rf"recipient=<{re.escape(rcpt)}>, dsn={dsn}$")
    assert not re.search(r"bounce_class=.*ok@far\.test", p.log_text())


def postqueue_j(p):
    r = h.run_tool(p, "postqueue", "-j")
    assert r.returncode == 0, h.describe(r)
    return [json.loads(line) for line in r.stdout.splitlines() if line.strip()]


def deferred_classes(p):
    out = {}
    for m in postqueue_j(p):
        for r in m["recipients"]:
            if "bounce_class" in r:
                out[r["address"]] = r["bounce_class"]
    return out


def test_postqueue_j_shows_the_class_of_deferred_recipients(make_postern, sink):
    sink.set_rcpt("slow@far.test", "451 4.7.1 rate limited")
    sink.set_rcpt("greylist@far.test", "450 4.2.0 <greylist@far.test>: Recipient address "
                  "rejected: Greylisted, try again later")
    p = make(make_postern, sink, minimal_backoff_time="300s", maximal_backoff_time="300s",
             queue_run_delay="300s")
    token = "pt-bclass-" + uuid.uuid4().hex
    code, text = p.send(SENDER, ["slow@far.test", "greylist@far.test", "ok@far.test"],
                        h.crlf(f"Subject: {token}\n\nx\n"))
    assert code == 250, text
    sink.wait_for(token)
    got = h.wait_for(lambda: (lambda c: c if len(c) == 2 else None)(deferred_classes(p)), 30,
                     what="both deferred recipients in postqueue -j")
    assert got == {"slow@far.test": "policy-related",
                   "greylist@far.test": "policy-related"}, got
    (m,) = postqueue_j(p)
    # Postfix's fields are still there, and the recipient delivered is gone.
    assert {r["address"] for r in m["recipients"]} == {"slow@far.test", "greylist@far.test"}
    assert all(r["delay_reason"] for r in m["recipients"])


def test_an_own_table_replaces_the_shipped_rules(make_postern, sink):
    """bounce_classifier_maps set: its answer (any label) wins, and what it
    does not match is `other`; the built-in rules are not consulted."""
    sink.set_rcpt("slow@far.test", "451 4.7.1 rate limited")
    sink.set_rcpt("grey@far.test", "450 4.2.0 Greylisted")
    rules = "/^4[0-9][0-9] 4\\.7\\.1 .*rate limited/  throttled\n"
    p = make(make_postern, sink, minimal_backoff_time="300s", maximal_backoff_time="300s",
             queue_run_delay="300s",
             bounce_classifier_maps=lambda p: f"regexp:{p.etc}/classes",
             files={"etc/classes": rules})
    token = "pt-bclass-" + uuid.uuid4().hex
    code, text = p.send(SENDER, ["slow@far.test", "grey@far.test"],
                        h.crlf(f"Subject: {token}\n\nx\n"))
    assert code == 250, text
    got = h.wait_for(lambda: (lambda c: c if len(c) == 2 else None)(deferred_classes(p)), 30,
                     what="both deferred recipients in postqueue -j")
    assert got == {"slow@far.test": "throttled", "grey@far.test": "other"}, got
