"""The whole mail path, end to end: SMTP and sendmail in, Maildir and SMTP
out, with real peers on loopback (aiosmtpd, dnsmasq, swaks).

Every test identifies its mail by a unique token in the Subject, because
the local users' homes are shared between tests and runs.
"""

import email.utils
import os
import re
import signal
import smtplib
import time
import uuid
from datetime import datetime, timedelta, timezone

import pytest

import postern_harness as h
from postern_harness import wait_for

SENDER = "sender@example.org"


def new_token():
    return "pt-" + uuid.uuid4().hex


def message(headers, body):
    """CRLF message bytes from [(name, value)] and a body given with LF."""
    head = "".join(f"{n}: {v}\n" for n, v in headers)
    return h.crlf(head + "\n" + body)


def relay_params(sink):
    return {"relayhost": f"[127.0.0.1]:{sink.port}"}


def the_one(messages, what):
    assert len(messages) == 1, f"expected exactly one {what}, found {len(messages)}"
    return messages[0]


# --------------------------------------------------------------------------
# Local delivery


def test_local_delivery_maildir(make_postern, local_users):
    p = make_postern()
    token = new_token()
    long_line = "".join(chr(ord("a") + i % 26) for i in range(1500))
    body_lines = [
        "Hello ptalice,",
        "",
        ".a line that starts with a dot",
        ".",
        "..two dots",
        long_line,
        "Grüße aus Köln — ünïcødé ✓ 日本語",
        "\tindented, with trailing spaces   ",
        "last line",
    ]
    body = "\n".join(body_lines) + "\n"
    data = message(
        [
            ("From", f"Sender <{SENDER}>"),
            ("To", "ptalice@postern.test"),
            ("Subject", token),
            ("Date", email.utils.formatdate(localtime=True)),
            ("Message-ID", f"<{token}@example.org>"),
            ("MIME-Version", "1.0"),
            ("Content-Type", "text/plain; charset=utf-8"),
            ("Content-Transfer-Encoding", "8bit"),
        ],
        body,
    )

    with p.smtp() as s:
        s.ehlo("client.example")
        assert s.has_extn("8bitmime"), "EHLO does not offer 8BITMIME"
        code, text = h.smtp_transaction(s, SENDER, ["ptalice@postern.test"], data,
                                        mail_options=["BODY=8BITMIME"])
    assert code == 250, f"DATA got {code} {text}"
    assert "queued as" in text, text
    queue_id = re.search(r"queued as ([0-9A-Za-z]+)", text).group(1)

    _path, raw = the_one(h.wait_for_messages("ptalice", token, timeout=30), "delivered copy")
    assert b"\r" not in raw, "a locally delivered message must have LF line ends"
    headers, got_body = h.split_message(raw)
    assert got_body == body.encode("utf-8")
    head = h.unfold(headers)
    assert re.search(r"^Return-Path: <sender@example\.org>$", head, re.M), head
    assert re.search(r"^Delivered-To: ptalice@postern\.test$", head, re.M), head
    assert re.search(r"^Received: from .*\bby postern\.test\b", head, re.M), head
    assert re.search(rf"^Subject: {token}$", head, re.M), head
    assert re.search(rf"^Message-ID: <{token}@example\.org>$", head, re.M | re.I), head

    m = p.wait_for_log(
        r"postfix/local\[\d+\]: ([0-9A-F]+): to=<ptalice@postern\.test>, .*status=sent")
    assert m.group(1) == queue_id, "the log and the SMTP reply name different queue IDs"


def test_swaks_local_delivery(make_postern, local_users, swaks):
    p = make_postern()
    token = new_token()
    r = h.run([swaks, "--server", f"127.0.0.1:{p.port}", "--to", "ptbob@postern.test",
               "--from", "swaks@example.org", "--header", f"Subject: {token}",
               "--body", f"Sent by swaks, {token}.", "--timeout", "30"], timeout=60)
    assert r.returncode == 0, h.describe(r)
    _path, raw = the_one(h.wait_for_messages("ptbob", token, timeout=30), "delivered copy")
    assert h.header_values(raw, "Subject") == [token]
    assert h.header_values(raw, "Delivered-To") == ["ptbob@postern.test"]
    assert f"Sent by swaks, {token}.".encode() in raw
    p.wait_for_log(r"postfix/local\[\d+\]: [0-9A-F]+: to=<ptbob@postern\.test>, .*status=sent")


@pytest.mark.parametrize("via", ["smtp", "sendmail"])
def test_missing_headers_added(make_postern, local_users, via):
    p = make_postern()
    token = new_token()
    if via == "smtp":
        data = message([("To", "ptalice@postern.test"), ("Subject", token)],
                       "No From, no Date, no Message-ID.\n")
        code, text = p.send(SENDER, ["ptalice@postern.test"], data)
        assert code == 250, text
        expected_from = SENDER
    else:
        data = f"To: ptalice@postern.test\nSubject: {token}\n\nNo From, no Date, no Message-ID.\n"
        r = p.sendmail(["-i", "ptalice@postern.test"], data.encode())
        assert r.returncode == 0, h.describe(r)
        expected_from = "root@postern.test"

    _path, raw = the_one(h.wait_for_messages("ptalice", token, timeout=30), "delivered copy")
    msg = h.parse_message(raw)
    assert msg["From"] is not None, "From: was not added"
    assert expected_from in str(msg["From"]), msg["From"]
    assert msg["Date"] is not None, "Date: was not added"
    date = email.utils.parsedate_to_datetime(str(msg["Date"]))
    assert abs(datetime.now(timezone.utc) - date) < timedelta(hours=1), msg["Date"]
    assert msg["Message-ID"] is not None, "Message-ID: was not added"
    assert re.fullmatch(r"<[^<>@\s]+@[^<>@\s]+>", str(msg["Message-ID"]).strip()), msg["Message-ID"]
    assert len(h.header_values(raw, "Message-ID")) == 1


# --------------------------------------------------------------------------
# Delivery over SMTP


def test_relayhost_delivery(make_postern, sink):
    p = make_postern(relay_params(sink))
    token = new_token()
    body = (
        "First line.\n"
        ".\n"
        ".leading dot\n"
        "Grüße — 8-bit ✓\n"
        + "y" * 990 + "\n"
        "last\n"
    )
    data = message([("From", SENDER), ("To", "someone@remote.example"), ("Subject", token),
                    ("MIME-Version", "1.0"),
                    ("Content-Type", "text/plain; charset=utf-8"),
                    ("Content-Transfer-Encoding", "8bit")], body)
    code, text = p.send(SENDER, ["someone@remote.example"], data, mail_options=["BODY=8BITMIME"])
    assert code == 250, text

    sink.wait_for(token, timeout=30)
    time.sleep(2)  # a duplicate would show up now
    m = the_one(sink.find(token), "copy at the sink")
    assert m.mail_from == SENDER
    assert m.rcpt_tos == ["someone@remote.example"]
    assert m.body == body.encode("utf-8")
    assert re.search(r"^Received: .*\bby postern\.test\b", h.unfold(m.headers), re.M), m.headers
    p.wait_for_log(
        r"postfix/[\w/-]+\[\d+\]: [0-9A-F]+: to=<someone@remote\.example>, "
        rf"relay=127\.0\.0\.1\[127\.0\.0\.1\]:{sink.port}, .*status=sent")


def test_mx_delivery_via_dnsmasq(make_postern, sink, dnsmasq):
    dns = dnsmasq(["--mx-host=mx-domain.test,mx1.mx-domain.test,10",
                   "--address=/mx1.mx-domain.test/127.0.0.1"])
    # The peer itself works: an MX answer for the domain.
    assert h.dns_query(dns.port, "mx-domain.test", h.DNS_MX) == (0, 1)
    p = make_postern(
        params={
            "dns_resolver_addresses": f"127.0.0.1:{dns.port}",
            "transport_maps": lambda p: f"texthash:{p.etc}/transport",
        },
        files={"etc/transport": f"mx-domain.test smtp:mx-domain.test:{sink.port}\n"},
    )
    token = new_token()
    data = message([("From", SENDER), ("To", "user@mx-domain.test"), ("Subject", token)],
                   "Delivered through the MX.\n")
    code, text = p.send(SENDER, ["user@mx-domain.test"], data)
    assert code == 250, text

    sink.wait_for(token, timeout=30)
    time.sleep(2)
    m = the_one(sink.find(token), "copy at the sink")
    assert m.mail_from == SENDER
    assert m.rcpt_tos == ["user@mx-domain.test"]
    assert m.body == b"Delivered through the MX.\n"
    p.wait_for_log(
        r"[0-9A-F]+: to=<user@mx-domain\.test>, "
        rf"relay=mx1\.mx-domain\.test\[127\.0\.0\.1\]:{sink.port}, .*status=sent")


# --------------------------------------------------------------------------
# sendmail


@pytest.mark.parametrize("as_user", [None, "ptbob"], ids=["root", "unprivileged-user"])
def test_sendmail_t_i(make_postern, local_users, as_user):
    p = make_postern()
    if as_user and not p.setgid_possible():
        pytest.skip("a set-gid sendmail cannot run here (file system mounted nosuid)")
    token = new_token()
    data = (f"To: ptalice@postern.test\nBcc: ptbob@postern.test\nSubject: {token}\n"
            "\nbody\n.\nmore\n").encode()
    r = p.sendmail(["-t", "-i"], data, user=as_user)
    assert r.returncode == 0, h.describe(r)
    sender = f"{as_user or 'root'}@postern.test"
    for user in ("ptalice", "ptbob"):
        _path, raw = the_one(h.wait_for_messages(user, token, timeout=30), f"copy for {user}")
        headers, body = h.split_message(raw)
        assert not re.search(rb"^bcc:", headers, re.I | re.M), f"Bcc header delivered to {user}"
        assert body == b"body\n.\nmore\n", body
        assert h.header_values(raw, "Return-Path") == [f"<{sender}>"]
        assert h.header_values(raw, "Delivered-To") == [f"{user}@postern.test"]


# --------------------------------------------------------------------------
# Retries, bounces, restarts, crashes


def test_deferred_then_delivered(make_postern, sink):
    rcpt = "slow@remote.example"
    sink.set_rcpt(rcpt, "450 4.2.0 try later")
    p = make_postern(relay_params(sink))
    token = new_token()
    data = message([("From", SENDER), ("To", rcpt), ("Subject", token)], "Try, try again.\n")
    code, text = p.send(SENDER, [rcpt], data)
    assert code == 250, text

    m = p.wait_for_log(r"to=<slow@remote\.example>, .*status=deferred.*$", timeout=30)
    assert "try later" in m.group(0), m.group(0)
    wait_for(lambda: p.queue_files("deferred"), 10, what="a file in the deferred queue")
    assert not sink.find(token)

    sink.set_rcpt(rcpt, "250")
    sink.wait_for(token, timeout=30)
    time.sleep(3)
    m = the_one(sink.find(token), "copy at the sink")
    assert m.rcpt_tos == [rcpt]
    p.wait_for_log(r"to=<slow@remote\.example>, .*status=sent", timeout=10)
    wait_for(lambda: not p.queue_files("deferred"), 10, what="an empty deferred queue")


def test_bounce_5xx_notifies_sender(make_postern, sink, local_users):
    rcpt = "gone@remote.example"
    sink.set_rcpt(rcpt, "550 5.1.1 no such user")
    p = make_postern(relay_params(sink))
    token = new_token()
    data = message([("From", "ptalice@postern.test"), ("To", rcpt), ("Subject", token)],
                   "This will bounce.\n")
    code, text = p.send("ptalice@postern.test", [rcpt], data)
    assert code == 250, text

    p.wait_for_log(r"to=<gone@remote\.example>, .*status=bounced", timeout=30)
    _path, raw = the_one(h.wait_for_messages("ptalice", token, timeout=30), "bounce notice")
    msg = h.parse_message(raw)
    assert "mailer-daemon" in str(msg["From"]).lower(), msg["From"]
    assert h.header_values(raw, "Return-Path") == ["<>"], "a bounce must have the null sender"
    assert msg.get_content_type() == "multipart/report"
    assert msg.get_param("report-type") == "delivery-status"

    texts, status = [], None
    for part in msg.walk():
        ctype = part.get_content_type()
        if ctype == "message/delivery-status":
            status = "\n".join(str(block) for block in part.get_payload())
            texts.append(status)
        elif part.get_content_maintype() == "text" and not part.is_multipart():
            texts.append(part.get_content())
    text = "\n".join(texts)
    assert "gone@remote.example" in text
    assert "550 5.1.1 no such user" in text
    assert status is not None, "no message/delivery-status part"
    assert re.search(r"^Final-Recipient:\s*rfc822;\s*gone@remote\.example", status, re.M | re.I), status
    assert re.search(r"^Action:\s*failed", status, re.M | re.I), status
    assert re.search(r"^Status:\s*5\.1\.1", status, re.M | re.I), status


def test_stop_restart_nothing_lost(make_postern, sink):
    rcpt = "queued@remote.example"
    sink.set_rcpt(rcpt, "450 4.2.0 try later")
    p = make_postern(relay_params(sink))
    tokens = [new_token() for _ in range(20)]
    with p.smtp() as s:
        s.ehlo("client.example")
        for t in tokens:
            data = message([("From", SENDER), ("To", rcpt), ("Subject", t)], f"Message {t}\n")
            code, text = h.smtp_transaction(s, SENDER, [rcpt], data)
            assert code == 250, text
    p.wait_for_log(r"to=<queued@remote\.example>, .*status=deferred", timeout=30)
    # Give the others a chance to be tried too (not required).
    h.poll_until(lambda: len(p.log_findall(r"to=<queued@remote\.example>, .*status=deferred")) >= 20,
                 15)

    master = p.master_pid()
    r = p.stop()
    assert r is not None and r.returncode == 0, h.describe(r) if r else "not started"
    assert not p.stop_problems, p.stop_problems
    assert not h.pid_alive(master)
    assert not sink.messages

    sink.set_rcpt(rcpt, "250")
    p.start()
    wait_for(lambda: all(sink.find(t) for t in tokens), 60,
             what="all 20 messages at the sink after the restart")
    time.sleep(3)
    counts = {t: sink.count(t) for t in tokens}
    assert all(c == 1 for c in counts.values()), counts


def test_kill_qmgr_nothing_lost_or_doubled(make_postern, sink):
    # Restart a crashed service quickly, so the test sees the recovery.
    p = make_postern({**relay_params(sink), "service_throttle_time": "2s"})
    first_qmgr = wait_for(p.qmgr_pid, 20, what="a qmgr process under master")
    rcpt = "load@remote.example"
    accepted, refused, killed = [], [], None
    s = p.smtp()
    s.ehlo("client.example")
    try:
        for i in range(50):
            t = new_token()
            data = message([("From", SENDER), ("To", rcpt), ("Subject", t)], f"Message {i} {t}\n")
            try:
                code, text = h.smtp_transaction(s, SENDER, [rcpt], data)
            except (smtplib.SMTPException, OSError, AssertionError) as e:
                refused.append((t, repr(e)))
                s.close()
                s = p.smtp()
                s.ehlo("client.example")
                continue
            if code == 250:
                accepted.append(t)
            else:
                refused.append((t, f"{code} {text}"))
            if i == 24:
                killed = p.qmgr_pid()
                assert killed, "no qmgr process to kill"
                h.kill_pid(killed, signal.SIGKILL)
    finally:
        try:
            s.quit()
        except (smtplib.SMTPException, OSError):
            s.close()
    assert killed is not None and first_qmgr
    assert not refused, f"refused while qmgr was down: {refused}"

    wait_for(lambda: all(sink.find(t) for t in accepted), 60,
             what=f"all {len(accepted)} accepted messages at the sink")
    wait_for(lambda: (lambda q: q and q != killed)(p.qmgr_pid()), 20,
             what="a new qmgr process")
    time.sleep(5)  # duplicates would arrive now
    counts = {t: sink.count(t) for t in accepted}
    doubled = {t: c for t, c in counts.items() if c != 1}
    assert not doubled, f"delivered more than once: {doubled}"


# --------------------------------------------------------------------------
# Policy and administration


def test_relay_denied_outside_mynetworks(make_postern, optional_local_users):
    p = make_postern()
    with p.smtp(source_address=("127.0.0.2", 0)) as s:
        s.ehlo("outside.example")
        code, text = s.mail("someone@example.org")
        assert code == 250, text
        code, text = s.rcpt("x@remote.example")
        assert code == 554, (code, text)
        assert b"5.7.1" in text, text
        code, text = s.rcpt("postmaster@postern.test")
        assert code == 250, (code, text)
        if optional_local_users:
            code, text = s.rcpt("ptalice@postern.test")
            assert code == 250, (code, text)


def test_queue_file_opened_at_the_first_accepted_recipient(make_postern, sink):
    """As Postfix (smtpd_delay_open_until_valid_rcpt = yes): the queue
    file is made when the first recipient is accepted, not before, not at
    DATA; a transaction given up leaves nothing behind."""
    p = make_postern(relay_params(sink))

    def incoming():
        return [f for f in p.queue_files("incoming") if re.fullmatch(r"[0-9A-F]{14,}", f)]

    def mailq():
        r = h.run([p.cmd("mailq"), "-c", p.etc], env=p.env(), cwd=p.dir)
        assert r.returncode == 0, h.describe(r)
        return r.stdout

    with p.smtp(source_address=("127.0.0.2", 0)) as s:
        s.ehlo("outside.example")
        assert s.mail(SENDER)[0] == 250
        # Refused: no file yet, so the log line says NOQUEUE.
        assert s.rcpt("x@remote.example")[0] == 554
        p.wait_for_log(r"NOQUEUE: reject: RCPT from unknown\[127\.0\.0\.2\]: 554 5\.7\.1 "
                       r"<x@remote\.example>")
        assert incoming() == []
        # The first accepted recipient: the file exists (not complete, so
        # the queue listing does not show it) and has an ID.
        code, text = s.rcpt("postmaster@postern.test")
        assert code == 250, text
        qid = p.wait_for_log(r"postfix/smtpd\[\d+\]: ([0-9A-F]+): client=unknown\[127\.0\.0\.2\]"
                             ).group(1)
        assert incoming() == [qid]
        assert mailq() == "Mail queue is empty\n"
        # Refused after it: the log names the file, as Postfix's does.
        assert s.rcpt("y@remote.example")[0] == 554
        p.wait_for_log(rf"{qid}: reject: RCPT from unknown\[127\.0\.0\.2\]: 554 5\.7\.1 "
                       r"<y@remote\.example>")
        # RSET gives the file up: back to spare/, for the next message.
        assert s.rset()[0] == 250
        wait_for(lambda: incoming() == [], timeout=10, what="the given-up file removed")
        assert qid in p.queue_files("spare")

    # The next transaction of a session makes a file of its own.
    token = new_token()
    with p.smtp() as s:
        s.ehlo("client.example")
        assert s.mail(SENDER)[0] == 250
        assert s.rcpt("someone@remote.example")[0] == 250
        assert s.rset()[0] == 250
        data = message([("From", SENDER), ("Subject", token)], "body\n")
        s.sendmail(SENDER, ["other@remote.example"], data)
    sink.wait_for(token, timeout=30)
    time.sleep(1)
    m = the_one(sink.find(token), "copy at the sink")
    assert m.rcpt_tos == ["other@remote.example"]
    wait_for(lambda: incoming() == [] and mailq() == "Mail queue is empty\n", timeout=30,
             what="an empty queue")


def test_a_file_opened_long_ago_is_not_taken_from_its_writer(make_postern, sink):
    """The file made at RCPT TO may be a reused one (spare/) whose times
    are old, and the client may take its time before DATA: qmgr, which
    removes incomplete files older than a day, must not remove it from
    under cleanup (the message would be acknowledged and lost)."""
    p = make_postern(relay_params(sink))
    first = new_token()
    code, text = p.send(SENDER, ["a@remote.example"],
                        message([("From", SENDER), ("Subject", first)], "first\n"))
    assert code == 250, text
    sink.wait_for(first, timeout=30)
    wait_for(lambda: p.queue_files("spare"), timeout=30, what="the delivered file kept as a spare")
    two_days_ago = time.time() - 2 * 86400
    spares = set()
    for name in p.queue_files("spare"):
        os.utime(p.queue / "spare" / name, (two_days_ago, two_days_ago))
        spares.add(os.stat(p.queue / "spare" / name).st_ino)
    # cleanup looks into an empty spare/ again only after a second.
    time.sleep(1.5)

    slow = new_token()
    with p.smtp() as s:
        s.ehlo("client.example")
        assert s.mail(SENDER)[0] == 250
        assert s.rcpt("slow@remote.example")[0] == 250
        opened = r"postfix/smtpd\[\d+\]: ([0-9A-F]+): client="
        wait_for(lambda: len(p.log_findall(opened)) == 2, timeout=10, what="the file opened")
        qid = p.log_findall(opened)[-1]
        st = os.stat(p.queue / "incoming" / qid)
        assert st.st_ino in spares and st.st_mtime < time.time() - 86400, "an old spare reused"
        # Meanwhile another message makes qmgr look at incoming/.
        other = new_token()
        code, text = p.send(SENDER, ["b@remote.example"],
                            message([("From", SENDER), ("Subject", other)], "other\n"))
        assert code == 250, text
        sink.wait_for(other, timeout=30)
        code, text = s.data(message([("From", SENDER), ("Subject", slow)], "slow\n"))
        assert code == 250, text
    sink.wait_for(slow, timeout=30)
    assert not p.log_search(r"removing incomplete queue file"), p.log_tail()


def test_queue_file_opened_at_mail_from_without_the_delay(make_postern):
    p = make_postern({"smtpd_delay_open_until_valid_rcpt": "no"})
    with p.smtp() as s:
        s.ehlo("client.example")
        assert s.mail(SENDER)[0] == 250
        p.wait_for_log(r"postfix/smtpd\[\d+\]: [0-9A-F]+: client=")
        assert len(p.queue_files("incoming")) == 1
    # The client left without a recipient: the file goes.
    wait_for(lambda: p.queue_files("incoming") == [], timeout=10, what="the file removed")


def test_wildcard_listener_serves_ipv4_and_ipv6(make_postern):
    """A master.cf service given as a bare port listens on every
    inet_interfaces address (the default, all): IPv4 and IPv6 clients are
    both served, and each is logged with its own address."""
    port = h.free_port()
    p = make_postern(master_cf_extra=[f"{port} inet n - n - - smtpd"])
    for host in ("127.0.0.1", "::1"):
        s = smtplib.SMTP(host, port, timeout=10)
        try:
            code, _ = s.ehlo("client.example")
            assert code == 250
        finally:
            s.quit()
    log = p.log_text()
    assert "connect from unknown[127.0.0.1]" in log, log
    assert "connect from unknown[::1]" in log, log


def test_postconf(make_postern):
    p = make_postern(start=False)

    r = p.postconf("-n")
    assert r.returncode == 0, h.describe(r)
    lines = set(r.stdout.splitlines())
    for name, value in p.params.items():
        assert f"{name} = {value}" in lines, f"{name} = {value} missing from postconf -n:\n{r.stdout}"
    assert not any(line.startswith("smtpd_banner ") for line in lines), r.stdout

    r = p.postconf("myhostname")
    assert r.returncode == 0 and r.stdout.strip() == "myhostname = postern.test", h.describe(r)
    r = p.postconf("-d", "mail_owner")
    assert r.returncode == 0 and r.stdout.strip() == "mail_owner = postern", h.describe(r)

    r = p.postconf("-e", "relayhost=[10.0.0.1]")
    assert r.returncode == 0, h.describe(r)
    assert "relayhost = [10.0.0.1]" in p.main_cf.read_text().splitlines()
    r = p.postconf("relayhost")
    assert r.stdout.strip() == "relayhost = [10.0.0.1]", h.describe(r)

    r = p.postern("check")
    assert r.returncode == 0, "postern check on a good configuration:\n" + h.describe(r)

    def append(line):
        text = p.main_cf.read_text()
        if not text.endswith("\n"):
            text += "\n"
        text += line + "\n"
        p.main_cf.write_text(text)
        return len(text.splitlines())

    append("postern_test_no_such_parameter = 1")
    r = p.postconf("-n")
    assert r.returncode == 0, h.describe(r)
    assert "postern_test_no_such_parameter" in r.stderr, h.describe(r)
    assert "warning" in r.stderr.lower(), h.describe(r)

    line = append("garbage")
    r = p.postern("check")
    assert r.returncode != 0, h.describe(r)
    assert f"main.cf, line {line}" in r.stderr, h.describe(r)


@pytest.mark.parametrize("mode", ["start", "start-fg"])
def test_postern_status(make_postern, mode):
    p = make_postern(fg=(mode == "start-fg"))
    r = p.status()
    assert r.returncode == 0, h.describe(r)
    master = wait_for(p.master_pid, 5, what="QUEUE/pid/master.pid")
    assert h.pid_alive(master)

    p.stop()
    assert not p.stop_problems, p.stop_problems
    assert not h.pid_alive(master)
    r = p.status()
    assert r.returncode != 0, h.describe(r)
