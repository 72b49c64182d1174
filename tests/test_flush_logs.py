"""The per-domain logs of deferred mail (``flush/`` in the queue tree,
common/src/flush.rs), Postern's form of Postfix's fast flush logs: qmgr
appends a message's queue ID to the log of each domain it still has
recipients in when it defers it; ``postqueue -s DOMAIN``, ``ETRN DOMAIN``
and ``postern resume`` read the log, not the whole deferred queue, and
rewrite it without what they moved; qmgr's upkeep compacts logs not read
for ``fast_flush_refresh_time`` and removes empty ones not written for
``fast_flush_purge_time``.

The receiver here is real (aiosmtpd) and answers ``450`` to the
recipients it is told to, so that the deferrals are real ones.
"""

import os
import time
import uuid

import postern_harness as h
from postern_harness import wait_for

SENDER = "sender@example.org"


def params(port, **extra):
    """Everything to the receiver; an hour between tries, so that nothing
    moves unless a flush moves it."""
    p = {
        "relayhost": f"[127.0.0.1]:{port}",
        "minimal_backoff_time": "1h",
        "maximal_backoff_time": "1h",
        "queue_run_delay": "1h",
    }
    p.update(extra)
    return p


def send_deferred(p, rcpt):
    token = "pt-" + uuid.uuid4().hex
    msg = (f"From: {SENDER}\r\nTo: {rcpt}\r\nSubject: {token}\r\n"
           f"Message-ID: <{token}@example.org>\r\n\r\nHello.\r\n")
    return p.send_deferred(SENDER, [rcpt], msg, said="450"), token


def flush_log(p, domain):
    """The queue IDs the domain's flush log lists (None: no log)."""
    try:
        return (p.queue / "flush" / domain).read_text().split()
    except FileNotFoundError:
        return None


def test_a_4xx_deferral_is_logged_and_flushed_by_postqueue_s_after_a_restart(make_postern):
    sink = h.Sink().start()
    try:
        for rcpt in ("a@flush.test", "b@other.test", "c@nolog.test"):
            sink.set_rcpt(rcpt, "450 4.2.0 try later")
        p = make_postern(params=params(sink.port))
        id_a, tok_a = send_deferred(p, "a@flush.test")
        id_b, tok_b = send_deferred(p, "b@other.test")
        id_c, tok_c = send_deferred(p, "c@nolog.test")
        # qmgr's deferral wrote the logs: one ID per domain, the file
        # mail_owner's (qmgr appends to it).
        assert flush_log(p, "flush.test") == [id_a]
        assert flush_log(p, "other.test") == [id_b]
        st = os.stat(p.queue / "flush" / "flush.test")
        assert st.st_uid == os.stat(p.queue / "deferred").st_uid
        # The logs are in the queue tree: a restart keeps them.
        p.stop()
        p.start()
        assert flush_log(p, "flush.test") == [id_a]
        # A domain whose log is gone: postqueue -s finds nothing (the log
        # is what it reads, not the deferred queue), no error.
        (p.queue / "flush" / "nolog.test").unlink()
        for rcpt in ("a@flush.test", "b@other.test", "c@nolog.test"):
            sink.set_rcpt(rcpt, "250")
        r = h.run_tool(p, "postqueue", "-s", "nolog.test")
        assert r.returncode == 0, h.describe(r)
        r = h.run_tool(p, "postqueue", "-s", "FLUSH.test")
        assert r.returncode == 0, h.describe(r)
        got = sink.wait_for(tok_a, timeout=30)[0]
        assert got.rcpt_tos == ["a@flush.test"]
        p.wait_for_log(rf"{id_a}: to=<a@flush\.test>.*status=sent", what=f"{id_a} sent")
        # Rewritten without what it moved; the others wait for their
        # retry time.
        assert flush_log(p, "flush.test") == []
        time.sleep(2)
        assert sink.count(tok_b) == 0 and sink.count(tok_c) == 0
        assert flush_log(p, "other.test") == [id_b]
        deferred = p.queue_files("deferred")
        assert len(deferred) == 2, deferred
        # postqueue -f is the flush of everything, logs or not.
        r = h.run_tool(p, "postqueue", "-f")
        assert r.returncode == 0, h.describe(r)
        sink.wait_for(tok_b, timeout=30)
        sink.wait_for(tok_c, timeout=30)
        assert sink.count(tok_a) == 1
    finally:
        sink.stop()


def test_a_message_deferred_again_after_a_flush_is_listed_again(make_postern):
    """ETRN reads the log like postqueue -s: the message goes to the
    receiver, which refuses it again; qmgr lists it again, and a second
    ETRN brings it when the receiver takes it."""
    sink = h.Sink().start()
    try:
        sink.set_rcpt("a@etrn.test", "450 4.2.0 try later")
        p = make_postern(params=params(sink.port, relay_domains="etrn.test"))
        qid, tok = send_deferred(p, "a@etrn.test")
        assert flush_log(p, "etrn.test") == [qid]
        before = len(sink.rcpt_log)
        with p.smtp() as s:
            s.ehlo("client.example")
            assert s.docmd("ETRN etrn.test") == (250, b"Queuing started")
        wait_for(lambda: len(sink.rcpt_log) > before, 30, what="the flushed message's attempt")
        wait_for(lambda: flush_log(p, "etrn.test") == [qid], 30,
                 what=f"{qid} listed again after its second deferral "
                      f"(log: {flush_log(p, 'etrn.test')})")
        assert any(f.endswith("/" + qid) for f in p.queue_files("deferred"))
        sink.set_rcpt("a@etrn.test", "250")
        with p.smtp() as s:
            s.ehlo("client.example")
            assert s.docmd("ETRN etrn.test") == (250, b"Queuing started")
        sink.wait_for(tok, timeout=30)
        assert flush_log(p, "etrn.test") == []
    finally:
        sink.stop()


def test_upkeep_compacts_old_logs_and_removes_old_empty_ones(make_postern):
    """With fast_flush_refresh_time and fast_flush_purge_time of a second,
    qmgr's upkeep (on its first queue_run_delay tick) leaves a log with
    each deferred ID once and removes an empty log."""
    sink = h.Sink().start()
    try:
        sink.set_rcpt("a@keep.test", "450 4.2.0 try later")
        p = make_postern(params=params(sink.port, fast_flush_refresh_time="1s",
                                       fast_flush_purge_time="1s"))
        qid, _ = send_deferred(p, "a@keep.test")
        p.stop()
        log = p.queue / "flush" / "keep.test"
        log.write_text(f"{qid}\n{qid}\n0123456789ABCDEF\n{qid}\n")
        empty = p.queue / "flush" / "empty.test"
        empty.write_text("")
        old = time.time() - 60
        owner = os.stat(p.queue / "flush")
        for f in (log, empty):
            os.chown(f, owner.st_uid, owner.st_gid)
            os.utime(f, (old, old))
        p.set_params(queue_run_delay="1s")
        p.start()
        m = p.wait_for_log(r"qmgr\[\d+\]: flush logs: (\d+) compacted \((\d+) queue ID\(s\) "
                           r"dropped\), (\d+) empty one\(s\) removed",
                           timeout=30, what="the flush logs' upkeep")
        assert (m.group(1), m.group(2), m.group(3)) == ("1", "3", "1"), m.group(0)
        assert flush_log(p, "keep.test") == [qid]
        assert not empty.exists()
    finally:
        sink.stop()
