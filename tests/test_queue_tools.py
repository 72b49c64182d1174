"""The queue commands: postqueue -p/-j/-f/-s/-i, mailq, sendmail -bp,
postsuper -d/-h/-H/-r/-s/-p and postcat, against a real Postern whose
relay host is down (a reserved loopback port nobody listens on) and later
comes up (an aiosmtpd Sink started on that very port).

The listings are checked line by line against Postfix's layout, because
scripts parse them.
"""

import asyncio
import json
import os
import re
import subprocess
import time
import uuid

import pytest

import postern_harness as h
from postern_harness import dead_relay_params, run_tool as tool
from postern_harness import wait_for

SENDER = "sender@example.org"
HEADER = "-Queue ID-  --Size-- ----Arrival Time---- -Sender/Recipient-------"
ID_LINE = re.compile(
    r"^(?P<id>[0-9A-F]+)(?P<status>[*! ])\s+(?P<size>\d+) "
    r"(?P<date>[A-Z][a-z]{2} [A-Z][a-z]{2} [ \d]\d \d\d:\d\d:\d\d)  (?P<sender>\S+)$")


def new_token():
    return "pt-" + uuid.uuid4().hex


def message(token, body="Hello.\n"):
    return (f"From: {SENDER}\nTo: someone@remote.test\nSubject: {token}\n"
            f"Message-ID: <{token}@example.org>\n\n{body}")


def queue_ids(p, queue):
    """The queue IDs in a queue, whatever its hash subdirectories."""
    names = (os.path.basename(f) for f in p.queue_files(queue))
    return sorted(f for f in names if re.fullmatch(r"[0-9A-F]{14,}", f))


def hashed(queue, qid):
    """Where a file of ``queue`` is under the default hashing
    (hash_queue_names = deferred, defer; depth 1): ``deferred/X/ID``, X
    being the ID's first character after its 8 digits of seconds."""
    return f"{queue}/{qid[8]}/{qid}" if queue in ("deferred", "defer") else f"{queue}/{qid}"


def send_deferred(p, rcpts, token=None, body="Hello.\n"):
    """Sends a message and waits until it is deferred; returns (id, token)."""
    token = token or new_token()
    code, text = p.send(SENDER, rcpts, message(token, body))
    assert code == 250, text
    qid = re.search(r"queued as ([0-9A-F]+)", text).group(1)
    p.wait_for_log(rf"{qid}: to=<{re.escape(rcpts[-1])}>.*status=deferred",
                   what=f"{qid} deferred")
    wait_for(lambda: qid in queue_ids(p, "deferred"), 20, what=f"{qid} in deferred/")
    return qid, token


def start_sink_on(port, monkeypatch, sink_class=h.Sink):
    """An aiosmtpd Sink on the given (reserved) port."""
    monkeypatch.setattr(h, "free_port", lambda udp=False: port)
    try:
        return sink_class().start()
    finally:
        monkeypatch.undo()


def parse_listing(text):
    """postqueue -p output -> [{id, status, size, sender, rcpts, reasons}]."""
    lines = text.split("\n")
    assert lines[0] == HEADER, text
    assert text.endswith("\n")
    msgs, cur = [], None
    for line in lines[1:]:
        if cur is None:
            if line.startswith("-- "):
                break
            m = ID_LINE.match(line)
            assert m, f"bad message line {line!r} in\n{text}"
            cur = dict(m.groupdict(), rcpts=[], reasons=[], size=int(m["size"]))
        elif line == "":
            msgs.append(cur)
            cur = None
        elif line.startswith(" " * 41) and not line.strip().startswith("("):
            cur["rcpts"].append(line[41:])
        else:
            assert line.rstrip().endswith(")") and len(line) in (78,) or \
                line.startswith("("), f"bad reason line {line!r}"
            cur["reasons"].append(line.strip()[1:-1])
    return msgs


@pytest.fixture
def dead_port():
    return h.free_port()


def test_empty_queue(make_postern):
    p = make_postern()
    for cmd in (["postqueue", "-p"], ["mailq"]):
        r = tool(p, *cmd)
        assert r.returncode == 0, h.describe(r)
        assert r.stdout == "Mail queue is empty\n"
    r = p.sendmail(["-bp"], b"")
    assert r.returncode == 0 and r.stdout == "Mail queue is empty\n", h.describe(r)
    r = tool(p, "postqueue", "-j")
    assert r.returncode == 0 and r.stdout == "", h.describe(r)


def test_listing_formats(make_postern, dead_port):
    p = make_postern(params=dead_relay_params(dead_port))
    id1, _ = send_deferred(p, ["a@remote.test", "b@remote.test"])
    id2, _ = send_deferred(p, ["c@other.test"], body="x" * 3000 + "\n")
    r = tool(p, "postqueue", "-p")
    assert r.returncode == 0, h.describe(r)
    text = r.stdout
    msgs = parse_listing(text)
    assert [m["id"] for m in msgs] == sorted([id1, id2])
    by_id = {m["id"]: m for m in msgs}
    m1 = by_id[id1]
    assert m1["status"] == " " and m1["sender"] == SENDER
    assert m1["rcpts"] == ["a@remote.test", "b@remote.test"]
    # One reason line for both recipients (same reason), right-aligned to
    # column 78 as Postfix prints it.
    assert len(m1["reasons"]) == 1 and "Connection refused" in m1["reasons"][0], text
    reason_line = [ln for ln in text.split("\n") if ln.strip().startswith("(")][0]
    if len(reason_line.strip()) < 78:
        assert len(reason_line) == 78, repr(reason_line)
    assert by_id[id2]["size"] > 3000
    total = sum(m["size"] for m in msgs)
    assert text.endswith(f"\n\n-- {total // 1024} Kbytes in 2 Requests.\n"), text
    # mailq and sendmail -bp print exactly the same.
    assert tool(p, "mailq").stdout == text
    assert p.sendmail(["-bp"], b"").stdout == text

    # -j: one JSON object per line, Postfix 3.1+ fields.
    r = tool(p, "postqueue", "-j")
    objs = [json.loads(line) for line in r.stdout.splitlines()]
    assert len(objs) == 2
    o = {o["queue_id"]: o for o in objs}[id1]
    assert o["queue_name"] == "deferred"
    assert o["sender"] == SENDER and o["forced_expire"] is False
    assert isinstance(o["arrival_time"], int) and abs(o["arrival_time"] - time.time()) < 120
    assert o["message_size"] == m1["size"]
    assert [x["address"] for x in o["recipients"]] == ["a@remote.test", "b@remote.test"]
    assert all("Connection refused" in x["delay_reason"] for x in o["recipients"])


def test_hold_release_delete(make_postern, dead_port):
    p = make_postern(params=dead_relay_params(dead_port))
    id1, _ = send_deferred(p, ["a@remote.test"])
    id2, _ = send_deferred(p, ["b@remote.test"])
    id3, _ = send_deferred(p, ["c@remote.test"])

    r = tool(p, "postsuper", "-h", id1)
    assert r.returncode == 0, h.describe(r)
    assert "postsuper: Placed on hold: 1 message" in r.stderr
    assert id1 in queue_ids(p, "hold") and id1 not in queue_ids(p, "deferred")
    assert re.search(rf"postsuper\[\d+\]: {id1}: placed on hold", p.log_text())
    msgs = {m["id"]: m for m in parse_listing(tool(p, "postqueue", "-p").stdout)}
    assert msgs[id1]["status"] == "!" and msgs[id2]["status"] == " "
    assert json.loads([ln for ln in tool(p, "postqueue", "-j").stdout.splitlines()
                       if id1 in ln][0])["queue_name"] == "hold"

    # A held message is never tried, even on a flush.
    tool(p, "postqueue", "-f")
    time.sleep(1.5)
    assert id1 in queue_ids(p, "hold")

    r = tool(p, "postsuper", "-H", id1)
    assert "postsuper: Released from hold: 1 message" in r.stderr, h.describe(r)
    assert re.search(rf"postsuper\[\d+\]: {id1}: released from hold", p.log_text())
    # Released: due now, so qmgr tries it again at once (and defers it).
    p.wait_for_log(rf"{id1}: to=<a@remote.test>.*status=deferred(.|\n)*"
                   rf"{id1}: to=<a@remote.test>.*status=deferred")
    wait_for(lambda: id1 in queue_ids(p, "deferred"), 20)

    # -d - reads IDs from stdin; a queue name limits ALL.
    r = tool(p, "postsuper", "-d", "-", input=f"{id2}\n".encode())
    assert "postsuper: Deleted: 1 message" in r.stderr, h.describe(r)
    assert re.search(rf"postsuper\[\d+\]: {id2}: removed", p.log_text())
    assert not (p.queue / hashed("defer", id2)).exists()
    tool(p, "postsuper", "-h", id3)
    r = tool(p, "postsuper", "-d", "ALL", "deferred")
    assert "postsuper: Deleted: 1 message" in r.stderr, h.describe(r)
    assert queue_ids(p, "deferred") == [] and queue_ids(p, "hold") == [id3]
    r = tool(p, "postsuper", "-d", "ALL")
    assert "Deleted: 1 message" in r.stderr
    assert tool(p, "postqueue", "-p").stdout == "Mail queue is empty\n"


def test_flush_site_id_and_requeue(make_postern, dead_port, monkeypatch):
    p = make_postern(params=dead_relay_params(dead_port))
    id_f, tok_f = send_deferred(p, ["f@flush.test"])
    id_s, tok_s = send_deferred(p, ["s@site.test"])
    id_i, tok_i = send_deferred(p, ["i@id.test"])
    id_r, tok_r = send_deferred(p, ["r1@requeue.test", "r2@requeue.test"],
                                body="line one\n.leading dot\nlast\n")
    sink = start_sink_on(dead_port, monkeypatch)
    try:
        # -s site: only that site's mail goes.
        r = tool(p, "postqueue", "-s", "site.test")
        assert r.returncode == 0, h.describe(r)
        sink.wait_for(tok_s)
        assert sink.count(tok_f) == 0 and sink.count(tok_i) == 0
        # -i ID: only that message.
        r = tool(p, "postqueue", "-i", id_i)
        assert r.returncode == 0, h.describe(r)
        sink.wait_for(tok_i)
        assert sink.count(tok_f) == 0

        # -r: through cleanup again, under a new queue ID; delivered once.
        r = tool(p, "postsuper", "-r", id_r)
        assert r.returncode == 0, h.describe(r)
        assert "postsuper: Requeued: 1 message" in r.stderr
        assert re.search(rf"postsuper\[\d+\]: {id_r}: requeued", p.log_text())
        got = sink.wait_for(tok_r)[0]
        assert sorted(got.rcpt_tos) == ["r1@requeue.test", "r2@requeue.test"]
        assert b"\n.leading dot\n" in h.lf(got.content)
        assert h.lf(got.content).count(b"Subject: " + tok_r.encode()) == 1
        assert id_r not in sum((queue_ids(p, q) for q in h.QUEUE_NAMES), [])

        # -f: everything deferred.
        r = tool(p, "postqueue", "-f")
        assert r.returncode == 0, h.describe(r)
        sink.wait_for(tok_f)
        wait_for(lambda: tool(p, "postqueue", "-p").stdout == "Mail queue is empty\n", 20)
        for t in (tok_f, tok_s, tok_i, tok_r):
            assert sink.count(t) == 1, t
    finally:
        sink.stop()


def test_postcat(make_postern, dead_port):
    p = make_postern(params=dead_relay_params(dead_port))
    qid, tok = send_deferred(p, ["a@remote.test"], body="Body line 1\n\nBody line 3\n")
    r = tool(p, "postcat", "-q", qid)
    assert r.returncode == 0, h.describe(r)
    out = r.stdout
    at = hashed("deferred", qid)
    assert f"*** ENVELOPE RECORDS {at} ***" in out
    assert f"sender: {SENDER}\n" in out and "recipient: a@remote.test\n" in out
    assert f"*** MESSAGE CONTENTS {at} ***\n" in out
    assert f"Subject: {tok}\n" in out and "Body line 3\n" in out
    assert out.endswith(f"*** MESSAGE FILE END {at} ***\n")

    r = tool(p, "postcat", "-hq", qid)
    assert f"Subject: {tok}\n" in r.stdout and "Body line" not in r.stdout
    assert "***" not in r.stdout and "sender:" not in r.stdout
    r = tool(p, "postcat", "-b", "-q", qid)
    assert r.stdout == "\nBody line 1\n\nBody line 3\n", h.describe(r)
    r = tool(p, "postcat", "-e", "-q", qid)
    assert "recipient: a@remote.test" in r.stdout and "Subject:" not in r.stdout
    # A file name instead of a queue ID.
    path = p.queue / hashed("deferred", qid)
    r = tool(p, "postcat", str(path))
    assert f"*** ENVELOPE RECORDS {path} ***" in r.stdout and "Body line 1" in r.stdout
    r = tool(p, "postcat", "-q", "0123456789ABCDEF")
    assert r.returncode != 0 and "postcat: fatal:" in r.stderr


def test_repair_and_purge(make_postern, dead_port):
    p = make_postern(params=dead_relay_params(dead_port))
    qid, _ = send_deferred(p, ["a@remote.test"])
    d = p.queue / "deferred"
    # A name that does not match the inode, a stray file, a stray log, an
    # old temporary file of a dead writer.
    wrong = qid[:13] + "FFFFFFF"
    os.rename(p.queue / hashed("deferred", qid), p.queue / hashed("deferred", wrong))
    os.rename(p.queue / hashed("defer", qid), p.queue / hashed("defer", wrong))
    (d / "junk").write_text("not a queue file")
    (p.queue / "defer" / "0000000100000ABC").write_text("recipient=x\n")
    tmp = p.queue / "incoming" / ".tmp.999999.1"
    tmp.write_text("partial")
    os.utime(tmp, (time.time() - 3600, time.time() - 3600))
    r = tool(p, "postsuper", "-s", "-p")
    assert r.returncode == 0, h.describe(r)
    assert not tmp.exists()
    assert queue_ids(p, "deferred") == [qid], h.describe(r)
    assert (p.queue / hashed("defer", qid)).exists()
    assert not (d / "junk").exists() and (p.queue / "corrupt" / "junk").exists()
    assert not (p.queue / "defer" / "0000000100000ABC").exists()
    assert f"{wrong}: renamed to {qid}" in r.stderr
    msgs = parse_listing(tool(p, "postqueue", "-p").stdout)
    assert [m["id"] for m in msgs] == [qid] and msgs[0]["reasons"]


class SlowSink(h.Sink):
    """A Sink that waits before it answers DATA: a delivery in flight."""
    delay = 4.0

    async def handle_DATA(self, server, session, envelope):
        await asyncio.sleep(self.delay)
        return await super().handle_DATA(server, session, envelope)


def test_delete_active_message_waits_for_delivery(make_postern, monkeypatch):
    sink = SlowSink().start()
    try:
        p = make_postern(params={"relayhost": f"[127.0.0.1]:{sink.port}"})
        tok = new_token()
        code, text = p.send(SENDER, ["a@remote.test"], message(tok))
        qid = re.search(r"queued as ([0-9A-F]+)", text).group(1)
        wait_for(lambda: sink.connections > 0, 20)
        assert qid in queue_ids(p, "active")
        msgs = parse_listing(tool(p, "postqueue", "-p").stdout)
        assert msgs[0]["id"] == qid and msgs[0]["status"] == "*"
        # The delivery is in flight: qmgr takes the request and acts when
        # the agent returns, never under its feet.
        r = tool(p, "postsuper", "-d", qid)
        assert r.returncode == 0, h.describe(r)
        assert "postsuper: Deleted: 1 message" in r.stderr
        sink.wait_for(tok)
        p.wait_for_log(rf"{qid}: removed")
        wait_for(lambda: qid not in queue_ids(p, "active"), 20)
        time.sleep(1)
        assert sink.count(tok) == 1
        assert tool(p, "postqueue", "-p").stdout == "Mail queue is empty\n"
    finally:
        sink.stop()


def test_hold_active_message_not_in_flight(make_postern, dead_port):
    """Many messages to a dead host, one postsuper -h ALL while qmgr is
    busy with them: each is held exactly once, none lost."""
    p = make_postern(params=dead_relay_params(dead_port))
    ids = [send_deferred(p, [f"u{i}@remote.test"])[0] for i in range(3)]
    tool(p, "postqueue", "-f")
    r = tool(p, "postsuper", "-h", "ALL")
    assert r.returncode == 0, h.describe(r)
    wait_for(lambda: sorted(queue_ids(p, "hold")) == sorted(ids), 30,
             what="all three on hold")
    assert queue_ids(p, "deferred") == [] and queue_ids(p, "active") == []


def test_concurrent_admin_operations(make_postern, monkeypatch):
    """postsuper -h/-H/-d/-r in a loop while deliveries are in flight:
    every message not deleted arrives exactly once; deleted ones at most
    once; nothing stays behind."""
    sink = SlowSink()
    sink.delay = 0.3
    sink.start()
    try:
        p = make_postern(params={"relayhost": f"[127.0.0.1]:{sink.port}",
                                 "queue_run_delay": "1s"})
        tokens = {}
        for i in range(12):
            tok = new_token()
            code, text = p.send(SENDER, [f"u{i}@remote.test"], message(tok))
            assert code == 250
            tokens[re.search(r"queued as ([0-9A-F]+)", text).group(1)] = tok
        ids = sorted(tokens)
        deleted = set()
        for round_ in range(4):
            tool(p, "postsuper", "-h", "ALL")
            tool(p, "postsuper", "-r", ids[round_])
            tool(p, "postsuper", "-H", "ALL")
            victim = ids[-1 - round_]
            r = tool(p, "postsuper", "-d", victim)
            if "Deleted: 1 message" in r.stderr:
                deleted.add(victim)
        tool(p, "postsuper", "-H", "ALL")
        tool(p, "postqueue", "-f")
        wait_for(lambda: tool(p, "postqueue", "-p").stdout == "Mail queue is empty\n",
                 60, what="an empty queue")
        time.sleep(1)
        for qid, tok in tokens.items():
            n = sink.count(tok)
            if qid in deleted:
                assert n <= 1, (qid, n)
            else:
                assert n == 1, (qid, n, p.log_tail())
    finally:
        sink.stop()


# --------------------------------------------------------------------------
# A big queue


def write_queue_file(directory, sender, rcpt, content, when):
    """Writes one complete queue file (common/src/qfile.rs format) into
    ``directory`` under its inode-based queue ID, as cleanup would."""
    import struct

    def rec(kind, data):
        return kind + struct.pack("<I", len(data)) + data

    head = rec(b"V", b"postern-queue-1")
    sizes_at = len(head)
    secs, usecs = int(when), int((when % 1) * 1e6)
    env = (rec(b"T", f"{secs}.{usecs:06d}".encode()) + rec(b"S", sender.encode())
           + rec(b"A", b"protocol=ESMTP") + rec(b"R", f"{rcpt}\0\0{0}\0".encode())
           + rec(b"M", b""))
    content_at = sizes_at + 5 + 24 + len(env)
    sizes = struct.pack("<QQQ", content_at, len(content), 1)
    data = head + rec(b"Z", sizes) + env + rec(b"C", content) + rec(b"E", b"")
    tmp = directory / f".tmp.{os.getpid()}.w"
    with open(tmp, "wb") as f:
        f.write(data)
    ino = os.stat(tmp).st_ino
    qid = f"{secs:08X}{usecs:05X}{ino:X}"
    os.chmod(tmp, 0o700)
    os.rename(tmp, directory / qid)
    return qid


def rss_peak_kb(pid):
    with open(f"/proc/{pid}/status") as f:
        m = re.search(r"^VmHWM:\s+(\d+) kB", f.read(), re.M)
    return int(m.group(1))


def test_ten_thousand_messages_to_a_dead_destination(make_postern, dead_port):
    n = 10000
    # Started once so that the queue tree exists, then stopped to fill it.
    # Dead for an hour once found dead: one cohort of connection attempts.
    p = make_postern(params=dict(dead_relay_params(dead_port), transport_retry_time="1h"))
    p.stop()
    d = p.queue / "deferred"
    content = b"Subject: bulk\nFrom: sender@example.org\n\n" + b"x" * 400 + b"\n"
    t0 = time.time() - 60
    ids = [write_queue_file(d, SENDER, f"u{i}@remote.test", content, t0 + i * 1e-6)
           for i in range(n)]
    if h.is_root():
        import pwd
        pw = pwd.getpwnam(p.mail_owner)
        for qid in ids:
            os.chown(d / qid, pw.pw_uid, pw.pw_gid)
    t_start = time.time()
    p.start()
    # qmgr takes them all in, finds the destination dead after one cohort,
    # and defers the rest without connecting.
    wait_for(lambda: len(re.findall(r"status=deferred", p.log_text())) >= n, 600,
             interval=1.0, what=f"{n} deferrals")
    wait_for(lambda: len(queue_ids(p, "deferred")) == n, 120, interval=0.5)
    qmgr = p.qmgr_pid()
    peak = rss_peak_kb(qmgr)
    t_deferred = time.time()
    print(f"qmgr peak RSS with {n} messages: {peak} kB; all deferred after "
          f"{t_deferred - t_start:.0f}s")
    assert peak < 200 * 1024, peak
    log = p.log_text()
    assert len(re.findall(r": dead for \d+s after failed connections", log)) == 1
    assert len(re.findall(r"delivery temporarily suspended", log)) >= n - 10
    r = tool(p, "postqueue", "-p", timeout=300)
    assert r.returncode == 0
    assert r.stdout.startswith(HEADER + "\n")
    assert re.search(rf"\n-- \d+ Kbytes in {n} Requests\.\n$", r.stdout), r.stdout[-200:]
    t_list = time.time()
    r = tool(p, "postsuper", "-d", "ALL", "deferred", timeout=300)
    print(f"postqueue -p: {t_list - t_deferred:.1f}s; postsuper -d ALL: "
          f"{time.time() - t_list:.1f}s")
    assert f"postsuper: Deleted: {n} messages" in r.stderr, h.describe(r)
    assert tool(p, "postqueue", "-p").stdout == "Mail queue is empty\n"
    assert [f for _r, _d, files in os.walk(p.queue / "defer") for f in files] == []


def test_who_may_run_them(make_postern, dead_port):
    if not h.is_root():
        pytest.skip("needs root (runs the commands as other users)")
    p = make_postern(params=dead_relay_params(dead_port))
    qid, _ = send_deferred(p, ["a@remote.test"])
    run_as = lambda user, *args: h.run([p.cmd(args[0]), "-c", p.etc, *args[1:]],
                                       env=p.env(), user=user, cwd="/")
    # mail_owner may list, hold and release.
    r = run_as(p.mail_owner, "postqueue", "-p")
    assert r.returncode == 0 and qid in r.stdout, h.describe(r)
    r = run_as(p.mail_owner, "postsuper", "-h", qid)
    assert "Placed on hold: 1 message" in r.stderr, h.describe(r)
    r = run_as(p.mail_owner, "postsuper", "-H", qid)
    assert "Released from hold: 1 message" in r.stderr, h.describe(r)
    # Anyone else may not look.
    r = run_as("nobody", "postqueue", "-p")
    assert r.returncode != 0
    assert "postqueue: fatal: User nobody" in r.stderr and "not allowed" in r.stderr, h.describe(r)
