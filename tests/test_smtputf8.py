"""SMTPUTF8 (RFC 6531, 6533) end to end, issue #16 point 5.

Real peers only: Python's smtplib with the SMTPUTF8 option as the client,
a private Postfix (tests/postfix_peer.py) as the next hop (one with
SMTPUTF8, one with ``smtputf8_enable = no``), and Postern's local
delivery to Maildir. smtpd's replies are compared with a real Postfix's
for the same command lines.
"""

import re
import smtplib
import socket
import uuid

import pytest

import postern_harness as h
from dovecot import dovecot  # noqa: F401  (the fixture)
from postfix_peer import postfix_peer  # noqa: F401  (the fixture)

# Local part and domain in UTF-8: what only SMTPUTF8 may carry.
SENDER = "ålice@postern.test"          # an alias of ptalice
LOCAL_RCPT = "jörg@postern.test"       # an alias of ptbob
REMOTE_RCPT = "müller@far.test"        # delivered by the far-side Postfix
ALIASES = ("postmaster: root\nålice: ptalice\njörg: ptbob\n"
           "fwd: ptbob, müller@far.test\n")


def new_token():
    return "pt-utf8-" + uuid.uuid4().hex


def message(token, to=REMOTE_RCPT):
    return (f"From: Ålice <{SENDER}>\r\nTo: <{to}>\r\nSubject: {token} grüße\r\n"
            f"\r\nHällo, wörld.\r\n").encode()


def make(make_postern, relay_port, **params):
    p = make_postern({
        "relayhost": f"[127.0.0.1]:{relay_port}",
        "smtp_tls_security_level": "none",
        **params,
    }, start=False)
    p.write_file("etc/aliases", ALIASES)
    p.start()
    return p


def send_utf8(p, sender, rcpts, data):
    """One SMTPUTF8 transaction with smtplib; returns the refused dict."""
    with p.smtp() as s:
        s.ehlo("client.example")
        assert s.has_extn("smtputf8"), s.esmtp_features
        return s.sendmail(sender, rcpts, data, mail_options=["SMTPUTF8"])


class Raw:
    """Command lines as bytes, replies as (code, enhanced status) — the
    part of a reply two implementations must agree on."""

    def __init__(self, port):
        self.s = socket.create_connection(("127.0.0.1", port), timeout=20)
        self.f = self.s.makefile("rb")
        self.reply()

    def reply(self):
        lines = []
        while True:
            line = self.f.readline()
            assert line, "connection closed"
            lines.append(line.decode("utf-8", "replace").rstrip("\r\n"))
            if line[3:4] != b"-":
                return lines

    def cmd(self, line):
        self.s.sendall((line.encode() if isinstance(line, str) else line) + b"\r\n")
        return self.reply()

    def close(self):
        try:
            self.cmd("QUIT")
        except (OSError, AssertionError):
            pass
        self.f.close()
        self.s.close()


def short(reply):
    last = reply[-1]
    m = re.match(r"(\d{3})[ -](\d\.\d+\.\d+)?", last)
    return f"{m.group(1)} {m.group(2) or ''}".strip()


# What each implementation gets, in one session after EHLO; RSET between
# transactions.
DIALOGUE = [
    b"MAIL FROM:<j\xc3\xb6rg@far.test>",                 # UTF-8 local part, no SMTPUTF8
    b"RCPT TO:<\xc3\xbc@b\xc3\xbccher.test>",            # UTF-8 domain, no SMTPUTF8
    b"RCPT TO:<m\xc3\xbcller@far.test>",                 # UTF-8 local part, no SMTPUTF8
    b"RSET",
    b"MAIL FROM:<a@b\xc3\xbccher.test>",                 # UTF-8 domain, no SMTPUTF8
    b"MAIL FROM:<j\xc3\xb6rg@b\xc3\xbccher.test> SMTPUTF8",
    b"RCPT TO:<\xc3\xbc@b\xc3\xbccher.test>",
    b"RSET",
    b"MAIL FROM:<j\xf6rg@far.test> SMTPUTF8",            # Latin-1, not UTF-8
    b"MAIL FROM:<a@far.test> SMTPUTF8 BODY=8BITMIME",
    b"RSET",
    b"MAIL FROM:<a@far.test>",
    b"RCPT TO:<m\xc3\xbcller@far.test>",               # strict: 553 5.6.7
    b"RSET",
    b"MAIL FROM:<a@far.test> SMTPUTF8",
    b"RCPT TO:<x@b\xc3\xbc..test>",                     # not a domain name
    b"RCPT TO:<x@b\xc3\xbc-.test>",
    b"RCPT TO:<x@xn--bcher-kva.test>",                  # the A-label form
    b"RSET",
    b"VRFY <x@b\xc3\xbccher.test>",
    b"VRFY <x@b\xc3\xbccher.test> SMTPUTF8",
]


def dialogue(port):
    r = Raw(port)
    try:
        ehlo = r.cmd("EHLO client.example")
        return ehlo, [short(r.cmd(line)) for line in DIALOGUE]
    finally:
        r.close()


def test_ehlo_offers_smtputf8_and_disable_hides_it(make_postern):
    p = make_postern()
    ehlo, _ = dialogue(p.port)
    assert "250 SMTPUTF8" in ehlo or "250-SMTPUTF8" in ehlo, ehlo

    off = make_postern({"smtputf8_enable": "no"})
    r = Raw(off.port)
    try:
        ehlo = r.cmd("EHLO client.example")
        assert not any("SMTPUTF8" in line for line in ehlo), ehlo
        assert short(r.cmd("MAIL FROM:<a@far.test> SMTPUTF8")) == "555 5.5.4"
    finally:
        r.close()


@pytest.mark.parametrize("strict", ["no", "yes"])
def test_smtpd_replies_match_postfix(make_postern, postfix_peer, strict):  # noqa: F811
    far = postfix_peer(params={"strict_smtputf8": strict})
    p = make_postern({"strict_smtputf8": strict, "mynetworks": "127.0.0.0/8",
                      "relayhost": f"[127.0.0.1]:{far.port}"})
    _, theirs = dialogue(far.port)
    _, ours = dialogue(p.port)
    table = "\n".join(f"{c!r}: postfix {t} postern {o}"
                      for c, t, o in zip(DIALOGUE, theirs, ours))
    print(table)
    assert ours == theirs, table
    # The rules the comparison covers, spelled out.
    if strict == "no":
        assert ours[0] == "250 2.1.0" and ours[1] == "501 5.1.3", table
    else:
        assert ours[0] == "553 5.6.7", table
    assert ours[5] == "250 2.1.0" and ours[8] == "500 5.5.2", table
    assert ours[12] == ("250 2.1.5" if strict == "no" else "553 5.6.7"), table


def test_utf8_sender_and_recipients_to_maildir_and_a_real_postfix(
        make_postern, postfix_peer, local_users):  # noqa: F811
    far = postfix_peer()
    p = make(make_postern, far.port)
    token = new_token()
    refused = send_utf8(p, SENDER, [LOCAL_RCPT, REMOTE_RCPT], message(token))
    assert refused == {}

    # Local: jörg is ptbob's alias; the Maildir copy keeps the UTF-8.
    _, raw = h.wait_for_messages("ptbob", token)[0]
    head = raw.split(b"\n\n", 1)[0].decode()
    assert "with UTF8SMTP id" in head, head
    assert f"X-Original-To: {LOCAL_RCPT}" in head, head
    assert f"Return-Path: <{SENDER}>" in head, head
    assert "Hällo, wörld." in raw.decode()

    # Relayed: the far Postfix got the UTF-8 envelope with SMTPUTF8 (its
    # Received header says UTF8SMTP) and the addresses intact.
    _, got = far.wait_for(token)[0]
    text = got.decode()
    assert re.search(r"by mx\.far\.test \(Postfix\) with UTF8SMTP id", text), text
    assert f"Return-Path: <{SENDER}>" in text, text
    assert f"Delivered-To: {REMOTE_RCPT}" in text, text
    log = far.log_text()
    assert f"from=<{SENDER}>" in log and f"to=<{REMOTE_RCPT}>" in log, log

    # Postern's own log shows the addresses as they are.
    p.wait_for_log(re.escape(f"to=<{REMOTE_RCPT}>") + r".*status=sent")
    assert p.log_search(re.escape(f"from=<{SENDER}>")), p.log_tail()


def test_forwarding_keeps_the_request(make_postern, postfix_peer, local_users):  # noqa: F811
    # An alias that forwards to a remote address: the copy local sends on
    # still asks for SMTPUTF8 (Postfix keeps the request through aliases
    # and .forward), so the far side sees UTF8SMTP, not ESMTP.
    far = postfix_peer()
    p = make(make_postern, far.port)
    token = new_token()
    assert send_utf8(p, SENDER, ["fwd@postern.test"], message(token)) == {}
    h.wait_for_messages("ptbob", token)
    _, got = far.wait_for(token)[0]
    assert re.search(rb"by mx\.far\.test \(Postfix\) with UTF8SMTP id", got), got
    assert f"Return-Path: <{SENDER}>".encode() in got, got


def test_idn_domain_in_mydestination_in_either_form(make_postern, local_users):
    # Issue #16: an internationalized domain in mydestination matches in
    # its U-label and A-label forms (Postfix 3.7 wants both listed).
    p = make(make_postern, h.free_port(),
             mydestination="$myhostname, localhost, xn--bcher-kva.test, müller.test")
    token = new_token()
    rcpts = ["ptbob@bücher.test", "ptbob@xn--mller-kva.test"]
    assert send_utf8(p, SENDER, rcpts, message(token)) == {}
    h.wait_for_messages("ptbob", token, count=2)
    for r in rcpts:
        p.wait_for_log(re.escape(f"to=<{r}>") + r", relay=local, .*status=sent")


def test_idn_domain_in_tables_in_either_form(make_postern, local_users):
    # Issue #16 point 5, tables: virtual_alias_domains and virtual_alias_maps
    # list the U-label form, the client writes the A-label form (and the
    # other way round); both reach the user. Without the second lookup,
    # smtpd refuses them as unknown in the virtual alias table.
    p = make_postern(start=False, params={
        "virtual_alias_domains": "bücher.test, xn--mller-kva.test",
    })
    p.set_params(virtual_alias_maps=f"texthash:{p.etc}/virtual")
    p.write_file("etc/virtual", "info@bücher.test ptbob\n@xn--mller-kva.test ptbob\n")
    p.start()
    token = new_token()
    rcpts = ["info@xn--bcher-kva.test", "anyone@müller.test"]
    assert send_utf8(p, SENDER, rcpts, message(token)) == {}
    h.wait_for_messages("ptbob", token, count=2)


def test_sendmail_autodetect_sets_smtputf8(make_postern, postfix_peer):  # noqa: F811
    # smtputf8_autodetect_classes = sendmail, verify (the default): a
    # sendmail submission with UTF-8 in its envelope goes out with SMTPUTF8.
    far = postfix_peer()
    p = make(make_postern, far.port)
    token = new_token()
    r = p.sendmail(["-f", SENDER, REMOTE_RCPT], message(token).replace(b"\r\n", b"\n"))
    assert r.returncode == 0, h.describe(r)
    _, got = far.wait_for(token)[0]
    assert b"with UTF8SMTP id" in got, got

    # With the class removed, the same submission is legacy mail: sent
    # without SMTPUTF8 (Postfix accepts the UTF-8 local part anyway).
    q = make(make_postern, far.port, smtputf8_autodetect_classes="verify")
    token = new_token()
    r = q.sendmail(["-f", SENDER, REMOTE_RCPT], message(token).replace(b"\r\n", b"\n"))
    assert r.returncode == 0, h.describe(r)
    _, got = far.wait_for(token)[0]
    assert b"with UTF8SMTP id" not in got and b"with ESMTP id" in got, got


def test_next_hop_without_smtputf8_bounces_5_6_7(make_postern, postfix_peer, local_users):  # noqa: F811
    legacy = postfix_peer(params={"smtputf8_enable": "no"})
    p = make(make_postern, legacy.port)
    ehlo, _ = dialogue(legacy.port)
    assert not any("SMTPUTF8" in line for line in ehlo), ehlo

    # SMTPUTF8 requested, UTF-8 recipient: bounced, never sent.
    token = new_token()
    assert send_utf8(p, SENDER, [REMOTE_RCPT], message(token)) == {}
    p.wait_for_log(re.escape(f"to=<{REMOTE_RCPT}>") + r".*dsn=5\.6\.7, status=bounced "
                   r"\(SMTPUTF8 is required, but was not offered by host")
    # The bounce reaches the UTF-8 sender (ålice → ptalice) as an RFC 6533
    # notice about an SMTPUTF8 message.
    _, dsn = h.wait_for_messages("ptalice", token)[0]
    text = dsn.decode()
    assert "Content-Type: message/global-delivery-status" in text, text
    assert f"Final-Recipient: utf-8; {REMOTE_RCPT}" in text, text
    assert f"X-Postern-Sender: utf-8; {SENDER}" in text, text
    assert "Status: 5.6.7" in text, text
    assert "Content-Type: message/global" in text, text
    assert not legacy.find(token)

    # SMTPUTF8 requested but nothing in it needs it: delivered as legacy
    # mail (Postfix's rule).
    token = new_token()
    plain = (f"From: <a@postern.test>\r\nSubject: {token}\r\n\r\nascii\r\n").encode()
    assert send_utf8(p, "ptalice@postern.test", ["plain@far.test"], plain) == {}
    _, got = legacy.wait_for(token)[0]
    assert b"with ESMTP id" in got, got


def test_each_transaction_decides_alone(make_postern, postfix_peer):  # noqa: F811
    # One message for two next hops: the one with SMTPUTF8 gets it, the
    # legacy one bounces only its own UTF-8 recipient.
    legacy = postfix_peer(params={"smtputf8_enable": "no"})
    far = postfix_peer()
    p = make(make_postern, far.port,
             transport_maps=f"inline:{{legacy.test=smtp:[127.0.0.1]:{legacy.port}}}")
    token = new_token()
    assert send_utf8(p, SENDER, ["jö@legacy.test", REMOTE_RCPT], message(token)) == {}
    _, got = far.wait_for(token)[0]
    assert b"with UTF8SMTP id" in got
    p.wait_for_log(r"to=<jö@legacy\.test>.*dsn=5\.6\.7, status=bounced")
    assert not legacy.find(token)


def test_lmtp_to_dovecot_without_smtputf8(make_postern, dovecot):  # noqa: F811
    # Dovecot 2.3's LMTP does not offer SMTPUTF8: the lmtp agent follows
    # the smtp agent's rule.
    d = dovecot(users={"alice@example.test": "pw"})
    p = make_postern({"transport_maps":
                      f"inline:{{example.test=lmtp:inet:127.0.0.1:{d.lmtp_port}}}"})
    token = new_token()
    assert send_utf8(p, "ptalice@postern.test", ["jörg@example.test"], message(token)) == {}
    p.wait_for_log(r"to=<jörg@example\.test>, relay=127\.0\.0\.1\[127\.0\.0\.1\]:\d+, .*"
                   r"dsn=5\.6\.7, status=bounced \(SMTPUTF8 is required, but was not offered")
    # Asked for, not needed (all ASCII): delivered.
    token = new_token()
    plain = f"From: <a@postern.test>\r\nSubject: {token}\r\n\r\nascii\r\n".encode()
    assert send_utf8(p, "ptalice@postern.test", ["alice@example.test"], plain) == {}
    d.wait_for_messages("alice@example.test", token)


def test_postqueue_shows_utf8_addresses(make_postern):
    closed = h.free_port()  # nothing listens: the message stays queued
    p = make(make_postern, closed)
    token = new_token()
    assert send_utf8(p, SENDER, [REMOTE_RCPT], message(token)) == {}
    p.wait_for_log(re.escape(f"to=<{REMOTE_RCPT}>") + r".*status=deferred")
    r = h.run([p.cmd("postqueue"), "-c", p.etc, "-p"], env=p.env(), timeout=30)
    assert r.returncode == 0, h.describe(r)
    assert SENDER in r.stdout and REMOTE_RCPT in r.stdout, r.stdout
