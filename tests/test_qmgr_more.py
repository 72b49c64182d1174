"""qmgr, continued (issue 4): a big queue to a dead destination (the small
version of bench/bigqueue), fairness between messages and between
destinations, and the notices: success notices say "relayed" or
"delivered" as Postfix's do, and notify_classes' resource and software
copies reach error_notice_recipient.

Real peers only: aiosmtpd Sinks (some slow at DATA), smtp-source, a tmpfs
made full. Every notice is parsed with Python's ``email`` package.
"""

import asyncio
import email
import email.policy
import os
import pwd
import re
import shutil
import uuid

import pytest

import postern_harness as h
from postern_harness import wait_for

SENDER = "sender@example.org"
HEADER = "-Queue ID-  --Size-- ----Arrival Time---- -Sender/Recipient-------"
VIRTUAL_MASTER_CF = ("virtual   unix  -       n       n       -       -       virtual",)


def new_token():
    return "pt-" + uuid.uuid4().hex


def message(token, body="The body.\n"):
    return h.crlf(f"From: {SENDER}\nTo: someone@remote.test\nSubject: {token}\n"
                  f"Message-ID: <{token}@example.org>\n\n{body}")


def send(p, rcpts, token, sender=SENDER, rcpt_options=()):
    with p.smtp() as s:
        s.ehlo("client.example")
        code, resp = s.mail(sender)
        assert code == 250, resp
        for r in rcpts:
            code, resp = s.rcpt(r, list(rcpt_options))
            assert code in (250, 251), resp
        code, resp = s.data(message(token))
        assert code == 250, resp
        return re.search(r"queued as ([0-9A-F]+)", resp.decode()).group(1)


def tool(p, name, *args, timeout=120):
    return h.run([p.cmd(name), "-c", p.etc, *args], env=p.env(), timeout=timeout, cwd=p.dir)


def parse(m):
    return email.message_from_bytes(h.lf(m.content), policy=email.policy.compat32)


def report(msg):
    """(text, [per-message block, per-recipient blocks...]) of a notice."""
    assert msg.get_content_type() == "multipart/report"
    assert msg.get_param("report-type") == "delivery-status"
    parts = msg.get_payload()
    assert [p.get_content_type() for p in parts][:2] == ["text/plain", "message/delivery-status"]
    return parts[0].get_payload(), parts[1].get_payload()


def count(queue_dir):
    return sum(len(files) for _r, _d, files in os.walk(queue_dir))


def ids_in(p, queue):
    """The file names in a queue, whatever its hash subdirectories."""
    return [os.path.basename(f) for f in p.queue_files(queue)]


class SlowSink(h.Sink):
    """A Sink that waits ``delay`` seconds before answering each DATA."""

    def __init__(self, delay):
        super().__init__()
        self.delay = delay

    async def handle_DATA(self, server, session, envelope):
        await asyncio.sleep(self.delay)
        return await super().handle_DATA(server, session, envelope)


@pytest.fixture
def slow_sinks():
    made = []

    def make(delay):
        s = SlowSink(delay).start()
        made.append(s)
        return s
    yield make
    for s in made:
        s.stop()


# --------------------------------------------------------------------------
# A big queue to a dead destination (bench/bigqueue runs 100,000)


def test_two_thousand_messages_to_a_dead_destination(make_postern):
    if not os.access("/usr/sbin/smtp-source", os.X_OK):
        pytest.skip("smtp-source (Debian's postfix package) is not installed")
    n = 2000
    dead = h.free_port()  # nobody listens there
    p = make_postern(params={
        "relayhost": f"[127.0.0.1]:{dead}",
        "minimal_backoff_time": "1h", "maximal_backoff_time": "1h",
        "queue_run_delay": "1h", "transport_retry_time": "1h",
    })
    r = h.run(["/usr/sbin/smtp-source", "-s", "10", "-m", str(n), "-l", "512",
               "-f", "from@x.test", "-t", "to@remote.test", f"127.0.0.1:{p.port}"],
              timeout=300)
    assert r.returncode == 0, h.describe(r)

    def all_deferred():
        c = {q: count(p.queue / q) for q in ("incoming", "active", "deferred")}
        return c["deferred"] == n and c["incoming"] == 0 and c["active"] == 0
    wait_for(all_deferred, 300, interval=1.0, what=f"{n} messages in deferred/")
    # qmgr's memory stays small: it holds at most the active queue.
    with open(f"/proc/{p.qmgr_pid()}/status") as f:
        hwm_kb = int(re.search(r"^VmHWM:\s+(\d+) kB", f.read(), re.M).group(1))
    assert hwm_kb < 100 * 1024, f"qmgr peak RSS {hwm_kb} kB"
    log = p.log_text()
    assert len(re.findall(r" status=deferred ", log)) >= n

    r = tool(p, "postqueue", "-p")
    assert r.returncode == 0, h.describe(r)
    lines = r.stdout.rstrip("\n").split("\n")
    assert lines[0] == HEADER
    assert sum(1 for ln in lines if re.match(r"^[0-9A-F]{10,}[*! ]\s+\d+ ", ln)) == n
    assert r.stdout.count("  to@remote.test\n") == n
    assert re.fullmatch(rf"-- \d+ Kbytes in {n} Requests\.", lines[-1]), lines[-1]

    r = tool(p, "postsuper", "-d", "ALL", "deferred")
    assert r.returncode == 0, h.describe(r)
    assert f"postsuper: Deleted: {n} messages" in r.stderr, h.describe(r)
    assert tool(p, "postqueue", "-p").stdout == "Mail queue is empty\n"
    assert count(p.queue / "deferred") == 0 and count(p.queue / "defer") == 0


# --------------------------------------------------------------------------
# Fairness


def test_small_message_is_not_kept_behind_a_bulk_one(make_postern, slow_sinks):
    """One destination, two requests at a time, 5 recipients a request: a
    bulk message of 300 recipients needs 60 requests; a small message
    queued just after it goes out among the first few, not after all 60."""
    sink = slow_sinks(0.1)
    p = make_postern(params={
        "relayhost": f"[127.0.0.1]:{sink.port}",
        "smtp_destination_concurrency_limit": "2",
        "initial_destination_concurrency": "2",
        "smtp_destination_recipient_limit": "5",
    })
    bulk = new_token()
    send(p, [f"u{i}@remote.test" for i in range(300)], bulk)
    wait_for(lambda: sink.count(bulk) >= 1, 30, what="the bulk message's first request")
    small = new_token()
    send(p, ["small@remote.test"], small)
    wait_for(lambda: sink.count(small) == 1, 60, what="the small message")
    wait_for(lambda: sink.count(bulk) == 60, 120, what="all of the bulk message")
    order = [m for m in sink.messages if bulk in m.content.decode() or small in m.content.decode()]
    at = next(i for i, m in enumerate(order) if small in m.content.decode())
    assert at < 12, f"the small message was request {at + 1} of {len(order)}"
    assert sorted(r for m in order for r in m.rcpt_tos) == sorted(
        [f"u{i}@remote.test" for i in range(300)] + ["small@remote.test"])


def test_slow_destination_does_not_delay_a_fast_one(make_postern, slow_sinks):
    slow = slow_sinks(3.0)
    fast = slow_sinks(0)
    p = make_postern(params={
        "transport_maps": f"inline:{{slow.test=smtp:[127.0.0.1]:{slow.port}, "
                          f"fast.test=smtp:[127.0.0.1]:{fast.port}}}",
        "smtp_destination_concurrency_limit": "2",
        "initial_destination_concurrency": "2",
    })
    tok = new_token()
    for i in range(8):
        send(p, [f"s{i}@slow.test"], tok)
    for i in range(8):
        send(p, [f"f{i}@fast.test"], tok)
    wait_for(lambda: fast.count(tok) == 8, 30, what="the fast destination's 8 messages")
    # The slow one takes two at a time, 3 s each: most of its mail is
    # still waiting when the fast one has all of its own.
    assert slow.count(tok) < 8
    wait_for(lambda: slow.count(tok) == 8, 60, what="the slow destination's 8 messages")


# --------------------------------------------------------------------------
# Success notices: relayed or delivered


def test_success_notice_says_relayed_or_delivered(make_postern, sink, local_users):
    if True:
        p = make_postern(params={"relayhost": f"[127.0.0.1]:{sink.port}"})
        tok = new_token()
        send(p, ["far@remote.test", "ptalice@postern.test"], tok,
             rcpt_options=["NOTIFY=SUCCESS"])
        h.wait_for_messages("ptalice", tok, timeout=30)

        def notices():
            return [m for m in sink.find(tok) if m.mail_from in ("", "<>")]
        wait_for(lambda: sum(len(report(parse(m))[1]) - 1 for m in notices()) >= 2, 30,
                 what="success notices for both recipients")
        actions = {}
        for m in notices():
            msg = parse(m)
            assert msg["Subject"] == "Successful Mail Delivery Report"
            assert m.rcpt_tos == [SENDER]
            _, blocks = report(msg)
            for b in blocks[1:]:
                actions[b["Final-Recipient"]] = (b["Action"], b["Status"])
        # Handed to an SMTP server that did not announce DSN: "relayed"
        # (RFC 3461 6.2.3.1); put in a mailbox here: "delivered".
        assert actions == {"rfc822; far@remote.test": ("relayed", "2.0.0"),
                           "rfc822; ptalice@postern.test": ("delivered", "2.0.0")}, actions


def test_no_success_notice_when_the_next_hop_takes_dsn(make_postern):
    """smtp-sink announces DSN (unless -N): the NOTIFY goes on with the
    recipient and that server reports success; Postern sends no "relayed"
    notice of its own (RFC 3461 6.2.3.1, as Postfix's smtp_rcpt_done)."""
    dsn = h.SmtpSink().start()
    nodsn = h.SmtpSink(["-N"]).start()
    try:
        p = make_postern(params={
            "transport_maps": f"inline:{{dsn.test=smtp:[127.0.0.1]:{dsn.port}, "
                              f"nodsn.test=smtp:[127.0.0.1]:{nodsn.port}}}",
        })
        sender = "sender@nodsn.test"
        tok = new_token()
        qa = send(p, ["a@dsn.test"], tok, sender=sender, rcpt_options=["NOTIFY=SUCCESS"])
        qb = send(p, ["b@nodsn.test"], tok, sender=sender, rcpt_options=["NOTIFY=SUCCESS"])
        p.wait_for_log(rf"{qa}: removed")
        p.wait_for_log(rf"{qb}: removed")
        p.wait_for_log(rf"{qb}: sender delivery status notification: ")
        assert not p.log_search(rf"{qa}: sender delivery status notification")
        # b's message and the notice about it; a's message alone.
        wait_for(lambda: nodsn.count() == 2, 30, what="the notice at the sink")
        assert dsn.count() == 1
    finally:
        dsn.stop()
        nodsn.stop()


# --------------------------------------------------------------------------
# notify_classes: resource and software


def problem_notices(sink, tok):
    return [m for m in sink.find(tok) if "pm@remote.test" in m.rcpt_tos]


def test_software_problem_goes_to_error_notice_recipient(make_postern, sink):
    # notify_classes is left at its default, "resource, software".
    p = make_postern(params={
        "relayhost": f"[127.0.0.1]:{sink.port}",
        "transport_maps": "inline:{nowhere.test=nosuch:}",
        "error_notice_recipient": "pm@remote.test",
    })
    tok = new_token()
    qid = send(p, ["x@nowhere.test", "ok@remote.test"], tok)
    pm = wait_for(lambda: problem_notices(sink, tok), 30, what="the software notice")
    assert len(pm) == 1
    assert pm[0].mail_from == "double-bounce@postern.test"
    msg = parse(pm[0])
    assert msg["Subject"] == "Postmaster Warning: Mail Not Delivered (software problem)"
    text, blocks = report(msg)
    assert "software problem" in text
    assert blocks[0]["X-Postern-Queue-ID"] == qid
    assert [b["Final-Recipient"] for b in blocks[1:]] == ["rfc822; x@nowhere.test"]
    assert blocks[1]["Action"] == "delayed"
    assert blocks[1]["Status"] == "4.3.0"
    assert "mail transport unavailable" in blocks[1]["Diagnostic-Code"]
    # The sender hears nothing (the message is only delayed), the good
    # recipient got its copy.
    assert sink.count(tok) == 2
    assert [m for m in sink.find(tok) if m.mail_from in ("", "<>")] == []


def test_without_the_classes_no_problem_notice(make_postern, sink):
    p = make_postern(params={
        "relayhost": f"[127.0.0.1]:{sink.port}",
        "transport_maps": "inline:{nowhere.test=nosuch:}",
        "error_notice_recipient": "pm@remote.test",
        "notify_classes": "bounce",
    })
    tok = new_token()
    qid = send(p, ["x@nowhere.test"], tok)
    p.wait_for_log(rf"{qid}: to=<x@nowhere\.test>.*status=deferred \(mail transport unavailable\)")
    wait_for(lambda: qid in ids_in(p, "deferred"), 20)
    assert problem_notices(sink, tok) == []
    assert not p.log_search(rf"{qid}: postmaster notification")


def test_resource_problem_full_mailbox_disk(make_postern, sink, local_users):
    """A virtual mailbox on a full file system: deferred with "No space
    left on device", which the postmaster hears of (resource)."""
    nobody = pwd.getpwnam("nobody")
    p = make_postern(start=False, params={
        "relayhost": f"[127.0.0.1]:{sink.port}",
        "error_notice_recipient": "pm@remote.test",
        "virtual_mailbox_domains": "virt.test",
        "virtual_mailbox_base": lambda p: str(p.dir / "vmail"),
        "virtual_mailbox_maps": "inline:{full@virt.test=virt.test/full/}",
        "virtual_uid_maps": f"static:{nobody.pw_uid}",
        "virtual_gid_maps": f"static:{nobody.pw_gid}",
    }, master_cf_extra=VIRTUAL_MASTER_CF)
    base = p.dir / "vmail"
    base.mkdir()
    r = h.run(["mount", "-t", "tmpfs", "-o", "size=256k,mode=0755", "tmpfs", base])
    if r.returncode != 0:
        pytest.skip("cannot mount a tmpfs here: " + r.stderr.strip())
    try:
        box = base / "virt.test" / "full"
        for sub in ("", "new", "cur", "tmp"):
            d = box / sub
            d.mkdir(parents=True, exist_ok=True)
        for d in (base / "virt.test", box, box / "new", box / "cur", box / "tmp"):
            os.chown(d, nobody.pw_uid, nobody.pw_gid)
        filler = base / "filler"
        fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            for size in (65536, 4096, 512, 1):
                try:
                    while True:
                        os.write(fd, b"\0" * size)
                except OSError:
                    pass
        finally:
            os.close(fd)
        p.start()
        tok = new_token()
        qid = send(p, ["full@virt.test"], tok)
        pm = wait_for(lambda: problem_notices(sink, tok), 30, what="the resource notice")
        msg = parse(pm[0])
        assert msg["Subject"] == "Postmaster Warning: Mail Not Delivered (resource problem)"
        _, blocks = report(msg)
        assert blocks[0]["X-Postern-Queue-ID"] == qid
        assert blocks[1]["Final-Recipient"] == "rfc822; full@virt.test"
        assert blocks[1]["Action"] == "delayed"
        assert blocks[1]["Status"].startswith("4.3.")
        assert "No space left on device" in blocks[1]["Diagnostic-Code"]
        assert qid in ids_in(p, "deferred") or qid in ids_in(p, "active")
        # Room again: the message goes out at its next try.
        filler.unlink()
        tool(p, "postqueue", "-f")
        wait_for(lambda: (box / "new").is_dir() and os.listdir(box / "new"), 30,
                 what="the message in the mailbox")
    finally:
        p.stop()
        h.run(["umount", "-l", base])
        shutil.rmtree(base, ignore_errors=True)
