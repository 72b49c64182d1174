"""Queue hashing (issue 17, point 9): `hash_queue_names` and
`hash_queue_depth` split the queue and log directories into
one-character subdirectories as Postfix does (the queue ID's characters
from its microseconds on: `deferred/X/ID`, `deferred/X/Y/ID`), and every
program follows: qmgr, cleanup, the delivery agents' logs, postqueue,
postsuper, postcat, `postern start`, crash recovery.
"""

import os
import pwd
import re
import signal
import stat

import postern_harness as h
from postern_harness import wait_for
from test_queue_tools import (SENDER, SlowSink, dead_relay_params, message, new_token,
                              parse_listing, queue_ids, send_deferred, start_sink_on, tool)
import pytest


@pytest.fixture
def dead_port():
    return h.free_port()


def where(p, queue, qid):
    """Every path of ``qid`` below ``queue/``, relative to the queue
    directory (one, normally)."""
    return [f"{queue}/{f}" for f in p.queue_files(queue) if os.path.basename(f) == qid]


def at_depth(queue, qid, depth):
    chars = qid[8:8 + depth]
    return "/".join([queue, *chars, qid])


def test_default_hashes_deferred_and_defer_at_depth_one(make_postern, dead_port):
    p = make_postern(params=dead_relay_params(dead_port))
    qid, _ = send_deferred(p, ["a@remote.test"])
    # Postfix's default layout: deferred/X/ID, X = the first hex digit of
    # the microseconds; the defer log likewise.
    assert where(p, "deferred", qid) == [at_depth("deferred", qid, 1)]
    assert where(p, "defer", qid) == [at_depth("defer", qid, 1)]
    sub = p.queue / "deferred" / qid[8]
    st = os.stat(sub)
    assert stat.S_IMODE(st.st_mode) == 0o700
    if h.is_root():
        assert st.st_uid == pwd.getpwnam(p.mail_owner).pw_uid
    # Not hashed by default: nothing below incoming/ or hold/ but files.
    for q in ("incoming", "active", "hold"):
        assert [d for d in os.listdir(p.queue / q) if (p.queue / q / d).is_dir()] == [], q


def test_depth_two_and_every_tool(make_postern, dead_port, monkeypatch):
    p = make_postern(params=dict(dead_relay_params(dead_port),
                                 hash_queue_names="incoming, deferred, defer, hold",
                                 hash_queue_depth="2"))
    # incoming is hashed too: a message qmgr has not taken yet is there.
    qmgr = p.qmgr_pid()
    os.kill(qmgr, signal.SIGSTOP)
    try:
        tok = new_token()
        code, text = p.send(SENDER, ["b@remote.test"], message(tok))
        assert code == 250, text
        qid = re.search(r"queued as ([0-9A-F]+)", text).group(1)
        assert where(p, "incoming", qid) == [at_depth("incoming", qid, 2)]
    finally:
        os.kill(qmgr, signal.SIGCONT)
    p.wait_for_log(rf"{qid}: to=<b@remote.test>.*status=deferred", what=f"{qid} deferred")
    wait_for(lambda: where(p, "deferred", qid) == [at_depth("deferred", qid, 2)], 20)
    assert where(p, "defer", qid) == [at_depth("defer", qid, 2)]
    other, _ = send_deferred(p, ["c@remote.test"])

    msgs = parse_listing(tool(p, "postqueue", "-p").stdout)
    assert sorted(m["id"] for m in msgs) == sorted([qid, other])
    assert all(m["reasons"] for m in msgs), msgs
    r = tool(p, "postcat", "-q", qid)
    assert r.returncode == 0 and f"*** ENVELOPE RECORDS {at_depth('deferred', qid, 2)} ***" \
        in r.stdout, h.describe(r)

    r = tool(p, "postsuper", "-h", qid)
    assert "Placed on hold: 1 message" in r.stderr, h.describe(r)
    assert where(p, "hold", qid) == [at_depth("hold", qid, 2)]
    assert "!" in [m["status"] for m in parse_listing(tool(p, "postqueue", "-p").stdout)
                   if m["id"] == qid][0]
    r = tool(p, "postsuper", "-H", qid)
    assert "Released from hold: 1 message" in r.stderr, h.describe(r)
    wait_for(lambda: where(p, "deferred", qid) or where(p, "active", qid), 20)

    r = tool(p, "postsuper", "-r", other)
    assert "Requeued: 1 message" in r.stderr, h.describe(r)
    assert where(p, "deferred", other) == [] and where(p, "defer", other) == []

    r = tool(p, "postsuper", "-s")
    assert r.returncode == 0 and "Repaired" not in r.stderr, h.describe(r)

    r = tool(p, "postsuper", "-d", "ALL")
    assert re.search(r"Deleted: 2 messages", r.stderr), h.describe(r)
    for q in ("incoming", "active", "deferred", "hold", "defer"):
        assert queue_ids(p, q) == [], q
    assert tool(p, "postqueue", "-p").stdout == "Mail queue is empty\n"


def test_a_new_depth_is_applied_by_postsuper_and_postern_start(make_postern, dead_port,
                                                              monkeypatch):
    p = make_postern(params=dead_relay_params(dead_port))
    ids = [send_deferred(p, [f"u{i}@remote.test"])[0] for i in range(3)]
    p.stop()

    p.set_params(hash_queue_depth="2")
    r = tool(p, "postsuper")  # no option: -s and -p, as Postfix's
    assert r.returncode == 0, h.describe(r)
    for qid in ids:
        assert where(p, "deferred", qid) == [at_depth("deferred", qid, 2)], h.describe(r)
        assert where(p, "defer", qid) == [at_depth("defer", qid, 2)]

    p.set_params(hash_queue_names="")
    r = tool(p, "postsuper", "-s")
    assert r.returncode == 0, h.describe(r)
    for qid in ids:
        assert where(p, "deferred", qid) == [f"deferred/{qid}"]
        assert where(p, "defer", qid) == [f"defer/{qid}"]
    # The subdirectories no longer needed are gone.
    for q in ("deferred", "defer"):
        assert [d for d in os.listdir(p.queue / q) if (p.queue / q / d).is_dir()] == [], q

    # Back to Postfix's default: `postern start` puts them in place
    # before anything runs, and they are delivered from there.
    p.set_params(hash_queue_names=None, hash_queue_depth=None)
    p.start()
    for qid in ids:
        assert where(p, "deferred", qid) == [at_depth("deferred", qid, 1)]
        assert where(p, "defer", qid) == [at_depth("defer", qid, 1)]
    sink = start_sink_on(dead_port, monkeypatch)
    try:
        r = tool(p, "postqueue", "-f")
        assert r.returncode == 0, h.describe(r)
        for i in range(3):
            wait_for(lambda: any(f"u{i}@remote.test" in m.rcpt_tos for m in sink.messages), 30,
                     what=f"u{i} delivered")
        wait_for(lambda: not any(queue_ids(p, q) for q in ("deferred", "active", "defer")), 20)
    finally:
        sink.stop()


def test_files_misplaced_under_a_running_qmgr_are_found(make_postern, dead_port, monkeypatch):
    """A hashing changed by `postern reload`: qmgr's scan and the tools
    find the files where the old hashing put them."""
    p = make_postern(params=dead_relay_params(dead_port))
    qid, tok = send_deferred(p, ["d@remote.test"])
    # As if written under depth 2.
    old = p.queue / at_depth("deferred", qid, 1)
    new = p.queue / at_depth("deferred", qid, 2)
    new.parent.mkdir(mode=0o700)
    if h.is_root():
        o = pwd.getpwnam(p.mail_owner)
        os.chown(new.parent, o.pw_uid, o.pw_gid)
    os.rename(old, new)
    r = tool(p, "postcat", "-q", qid)
    assert r.returncode == 0 and tok in r.stdout, h.describe(r)
    sink = start_sink_on(dead_port, monkeypatch)
    try:
        assert tool(p, "postqueue", "-f").returncode == 0
        sink.wait_for(tok)
    finally:
        sink.stop()


def test_crash_recovery_on_a_hashed_queue(make_postern, monkeypatch):
    """kill -9 of master and every daemon while deliveries are in flight
    and messages wait in hashed incoming/, active/ and deferred/: after
    `postern start`, everything is delivered."""
    slow = SlowSink().start()
    port = slow.port
    p = make_postern(params={"relayhost": f"[127.0.0.1]:{port}",
                             "hash_queue_names": "incoming, active, deferred, defer",
                             "hash_queue_depth": "2",
                             "minimal_backoff_time": "1h", "maximal_backoff_time": "1h",
                             "queue_run_delay": "1h"})
    tokens = []
    try:
        for i in range(6):
            tok = new_token()
            code, text = p.send(SENDER, [f"r{i}@remote.test"], message(tok))
            assert code == 250, text
            tokens.append(tok)
        wait_for(lambda: slow.connections > 0, 20, what="a delivery in flight")
        assert queue_ids(p, "active"), "messages in active/"
        pids = [p.master_pid(), *p.child_pids()]
        for pid in pids:
            h.kill_pid(pid, signal.SIGKILL)
    finally:
        slow.stop()
    wait_for(lambda: not any(os.path.exists(f"/proc/{pid}") and
                             open(f"/proc/{pid}/stat").read().split()[2] != "Z"
                             for pid in pids), 10, what="the killed processes gone")
    sink = start_sink_on(port, monkeypatch)
    try:
        r = p.postern("start")
        assert r.returncode == 0, h.describe(r)
        p.wait_ready(30)
        tool(p, "postqueue", "-f")
        for tok in tokens:
            sink.wait_for(tok, timeout=60)
        wait_for(lambda: not any(queue_ids(p, q) for q in ("incoming", "active", "deferred")),
                 30, what="an empty queue")
    finally:
        sink.stop()
