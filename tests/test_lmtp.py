"""Delivery over LMTP (RFC 2033) to a real Dovecot: Postern's `lmtp`
transport (the smtp agent under the name `lmtp`), selected through
transport_maps with the next hops `unix:/path`, `unix:relative/path`
(relative to queue_directory, as Postfix's `lmtp:unix:private/...`) and
`inet:127.0.0.1:PORT`.
"""

import os
import re
import time
import uuid

import postern_harness as h
from dovecot import dovecot  # noqa: F401  (the fixture)

SENDER = "sender@example.org"
USERS = {"alice@example.test": "a-secret", "bob@example.test": "b-secret",
         "carol@example.test": "c-secret"}


def new_token():
    return "pt-lmtp-" + uuid.uuid4().hex


def message(token, body, to="alice@example.test", sender=SENDER):
    return h.crlf(f"From: {sender}\nTo: {to}\nSubject: {token}\n"
                  "MIME-Version: 1.0\nContent-Type: text/plain; charset=utf-8\n"
                  f"Content-Transfer-Encoding: 8bit\n\n{body}")


def lmtp_postern(make_postern, nexthop):
    return make_postern({"transport_maps": "inline:{ example.test=lmtp:%s }" % nexthop})


BODY = ("First line.\n"
        ".\n"
        ".leading dot\n"
        "Grüße — 8-bit ✓\n"
        + "z" * 900 + "\n"
        "last\n")


def test_lmtp_unix_socket_two_users_and_unknown_user_bounces(make_postern, dovecot):  # noqa: F811
    d = dovecot(users=USERS)
    p = lmtp_postern(make_postern, f"unix:{d.lmtp_socket}")
    token = new_token()
    # The sender is a Dovecot user too: the bounce for the unknown
    # recipient comes back to it over LMTP.
    sender = "carol@example.test"
    rcpts = ["alice@example.test", "nosuch@example.test", "bob@example.test"]
    code, text = p.send(sender, rcpts,
                        message(token, BODY, to=", ".join(rcpts), sender=sender),
                        mail_options=["BODY=8BITMIME"])
    assert code == 250, text

    for user in ("alice@example.test", "bob@example.test"):
        (path, raw), = d.wait_for_messages(user, token, timeout=30)
        # The message is intact: Dovecot only adds headers on top.
        head, _, body = raw.replace(b"\r\n", b"\n").partition(b"\n\n")
        assert body == BODY.encode("utf-8"), body[:200]
        assert re.search(rb"^Subject: " + token.encode() + rb"$", head, re.M)
        assert re.search(rb"^Return-Path: <carol@example\.test>$", head, re.M), head

    sock = re.escape(str(d.lmtp_socket))
    for user in ("alice", "bob"):
        p.wait_for_log(rf"to=<{user}@example\.test>, relay=postern\.test\[{sock}\], "
                       r".*dsn=2\.0\.0, status=sent \(250 2\.0\.0 <"
                       rf"{user}@example\.test> .*Saved\)")
    m = p.wait_for_log(rf"to=<nosuch@example\.test>, relay=postern\.test\[{sock}\], "
                       r".*dsn=5\.1\.1, status=bounced \(host postern\.test\[" + sock
                       + r"\] said: 550 5\.1\.1 (.*) \(in reply to RCPT TO command\)\)")
    assert "nosuch@example.test" in m.group(1)

    # The bounce notice reaches the sender's mailbox, over LMTP as well.
    (path, raw), = d.wait_for_messages("carol@example.test", "nosuch@example.test", timeout=30)
    msg = h.parse_message(raw)
    assert msg.get_content_type() == "multipart/report"
    assert h.header_values(raw, "Return-Path") == ["<>"]
    assert b"550 5.1.1" in raw
    time.sleep(1)  # a second copy would show up now
    assert len(d.find("alice@example.test", token)) == 1


def test_lmtp_relative_unix_path_is_under_queue_directory(make_postern, dovecot):  # noqa: F811
    d = dovecot(users=USERS)
    p = lmtp_postern(make_postern, "unix:private/dovecot-lmtp")
    # As a Postfix admin would arrange it: the socket (here a link to it)
    # in the queue's private/ directory.
    link = p.queue / "private" / "dovecot-lmtp"
    h.wait_for(lambda: (p.queue / "private").is_dir(), 10)
    os.symlink(d.lmtp_socket, link)
    token = new_token()
    code, text = p.send(SENDER, ["bob@example.test"], message(token, "hello\n", to="bob@example.test"))
    assert code == 250, text
    d.wait_for_messages("bob@example.test", token, timeout=30)
    p.wait_for_log(r"to=<bob@example\.test>, relay=postern\.test\[private/dovecot-lmtp\], "
                   r".*status=sent")


def test_lmtp_inet_and_dead_socket_defers(make_postern, dovecot):  # noqa: F811
    d = dovecot(users=USERS)
    p = lmtp_postern(make_postern, f"inet:127.0.0.1:{d.lmtp_port}")
    token = new_token()
    code, text = p.send(SENDER, ["alice@example.test"], message(token, BODY))
    assert code == 250, text
    d.wait_for_messages("alice@example.test", token, timeout=30)
    p.wait_for_log(rf"to=<alice@example\.test>, relay=127\.0\.0\.1\[127\.0\.0\.1\]:{d.lmtp_port}, "
                   r".*status=sent \(250 2\.0\.0 <alice@example\.test> .*Saved\)")

    # Nothing listening on the socket: deferred, not lost.
    q = lmtp_postern(make_postern, f"unix:{d.dir}/no-such-socket")
    token = new_token()
    code, text = q.send(SENDER, ["alice@example.test"], message(token, "later\n"))
    assert code == 250, text
    q.wait_for_log(r"to=<alice@example\.test>, relay=none, .*status=deferred "
                   r"\(connect to .*/no-such-socket: No such file or directory\)")


def test_lmtp_per_recipient_replies_after_data(make_postern, dovecot):  # noqa: F811
    # A quota checked only when the message is saved: Dovecot answers the
    # end of the data once per recipient, 250 for alice and 552 for bob,
    # whose mailbox is already full.
    quota = """\
mail_plugins = $mail_plugins quota
lmtp_rcpt_check_quota = no
plugin {
  quota = maildir:User quota
  quota_rule = *:storage=20K
}
"""
    d = dovecot(users=USERS, extra_conf=quota)
    full = d.maildir("bob@example.test")
    for sub in ("new", "cur", "tmp"):
        (full / sub).mkdir(parents=True, exist_ok=True)
    big = full / "cur" / "1.big:2,S"
    big.write_bytes(b"Subject: big\n\n" + b"x" * 40000 + b"\n")
    for path in (full.parent, full, full / "new", full / "cur", full / "tmp", big):
        os.chown(path, d.mail_uid, d.mail_gid)
    p = lmtp_postern(make_postern, f"unix:{d.lmtp_socket}")
    token = new_token()
    rcpts = ["alice@example.test", "bob@example.test"]
    code, text = p.send(SENDER, rcpts, message(token, "small\n", to=", ".join(rcpts)))
    assert code == 250, text
    d.wait_for_messages("alice@example.test", token, timeout=30)
    p.wait_for_log(r"to=<alice@example\.test>, .*status=sent \(250 2\.0\.0 <alice@example\.test> ")
    m = p.wait_for_log(r"to=<bob@example\.test>, .*dsn=(5\.2\.2), status=bounced "
                       r"\(host postern\.test\[\S+\] said: 552 5\.2\.2 <bob@example\.test> "
                       r".*(?i:quota).* \(in reply to end of DATA command\)\)")
    assert m.group(1) == "5.2.2"
    assert not d.find("bob@example.test", token)


def test_lmtp_connection_reuse(make_postern, dovecot):  # noqa: F811
    d = dovecot(users=USERS)
    p = lmtp_postern(make_postern, f"unix:{d.lmtp_socket}")
    token = new_token()
    n = 40

    def connects():
        return len(re.findall(r"lmtp\(\d+\): Info: Connect from local", d.log_text()))
    before = connects()  # the fixture's own readiness probes
    with p.smtp() as s:
        s.ehlo("client.example")
        for i in range(n):
            s.sendmail(SENDER, ["alice@example.test"], message(f"{token} {i}", f"message {i}\n"))
    d.wait_for_messages("alice@example.test", token, count=n, timeout=60)
    time.sleep(1)
    assert len(d.find("alice@example.test", token)) == n
    sent = p.log_findall(r"to=<alice@example\.test>, .*status=sent")
    assert len(sent) == n
    conns = connects() - before
    print(f"LMTP reuse: {n} messages over {conns} connections")
    assert 0 < conns <= n // 4, d.log_text()[-2000:]
