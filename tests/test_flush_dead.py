"""``postqueue -f`` revives a dead destination (issue 17, point 4), as
Postfix's qmgr does on its ``F`` trigger ("purge all information about
dead transports and destinations", qmgr(8)): the next hop, marked dead
after failed connections, is tried again at once instead of after
``transport_retry_time``.

Real peers only: nothing listens on the next hop's port at first; then
an aiosmtpd receiver is started on that very port.
"""

import os
import re
import time
import uuid

import postern_harness as h
from postern_harness import wait_for

SENDER = "sender@example.org"


class PortSink(h.Sink):
    """A Sink on a port chosen in advance (the dead next hop's)."""

    def __init__(self, port):
        super().__init__()
        self.fixed_port = port

    def start(self):
        chosen = h.free_port
        h.free_port = lambda udp=False: self.fixed_port
        try:
            return super().start()
        finally:
            h.free_port = chosen


def send(p, token):
    data = (f"From: {SENDER}\nTo: rcpt@remote.test\nSubject: {token}\n"
            f"Message-ID: <{token}@example.org>\n\nThe body.\n")
    code, resp = p.send(SENDER, ["rcpt@remote.test"], data)
    assert code == 250, resp
    return re.search(r"queued as ([0-9A-F]+)", resp).group(1)


def deferred_ids(p):
    """Queue IDs in deferred/ (hashed or flat)."""
    return sorted(os.path.basename(f) for f in p.queue_files("deferred"))


def postqueue(p, *args):
    return h.run([p.cmd("postqueue"), "-c", p.etc, *args], env=p.env(), timeout=60, cwd=p.dir)


def make_dead(make_postern):
    """A Postern whose next hop is marked dead by its first message; no
    retry of any kind for an hour. Returns (postern, port, first ID)."""
    port = h.free_port()  # nobody listens there
    p = make_postern(params={
        "relayhost": f"[127.0.0.1]:{port}",
        # One failed connection is a whole failed cohort: dead at once.
        "initial_destination_concurrency": "1",
        "transport_retry_time": "1h",
        "minimal_backoff_time": "1h",
        "maximal_backoff_time": "1h",
        "queue_run_delay": "1h",
    })
    first = send(p, "pt-" + uuid.uuid4().hex)
    p.wait_for_log(rf"{first}: to=<rcpt@remote\.test>.*status=deferred \(connect to ")
    p.wait_for_log(rf"destination \[127\.0\.0\.1\]:{port}: dead for 3600s")
    wait_for(lambda: first in deferred_ids(p), 20, what="the message in deferred/")
    return p, port, first


def test_postqueue_f_revives_a_dead_destination(make_postern):
    p, port, first = make_dead(make_postern)
    sink = PortSink(port).start()
    try:
        # Dead: new mail for the next hop is deferred without a
        # connection, although the receiver is up now.
        second = send(p, "pt-" + uuid.uuid4().hex)
        p.wait_for_log(rf"{second}: to=<rcpt@remote\.test>.*status=deferred "
                       r"\(delivery temporarily suspended: connect to ")
        wait_for(lambda: second in deferred_ids(p), 20)
        assert sink.connections == 0
        assert sink.messages == []

        # The flush: both delivered within seconds.
        started = time.monotonic()
        r = postqueue(p, "-f")
        assert r.returncode == 0, h.describe(r)
        wait_for(lambda: len(sink.messages) == 2, 15, what="both messages at the receiver")
        assert time.monotonic() - started < 15
        for qid in (first, second):
            p.wait_for_log(rf"{qid}: to=<rcpt@remote\.test>.*status=sent")
        wait_for(lambda: not deferred_ids(p), 10, what="an empty deferred queue")
    finally:
        sink.stop()


def test_without_a_flush_the_destination_stays_dead(make_postern):
    """The other side: with the receiver up but no flush, nothing is
    tried before transport_retry_time (an hour here); a new message is
    suspended, not delivered."""
    p, port, first = make_dead(make_postern)
    sink = PortSink(port).start()
    try:
        second = send(p, "pt-" + uuid.uuid4().hex)
        p.wait_for_log(rf"{second}: to=<rcpt@remote\.test>.*"
                       r"delivery temporarily suspended")
        time.sleep(5)
        assert sink.connections == 0
        assert sink.messages == []
        assert deferred_ids(p) == sorted([first, second])
    finally:
        sink.stop()
