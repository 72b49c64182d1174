"""qmgr: delivery status notifications (RFC 3461 requests, RFC 3464
reports), checked by parsing every notice with Python's ``email`` package,
with a real Postern relaying to an aiosmtpd Sink that accepts, defers or
rejects each recipient as told.
"""

import email
import email.policy
import re
import time
import uuid

import pytest

import postern_harness as h
from postern_harness import wait_for

SENDER = "sender@example.org"


def new_token():
    return "pt-" + uuid.uuid4().hex


def message(token, body="The body of the message.\n"):
    return h.crlf(f"From: {SENDER}\nTo: someone@remote.test\nSubject: {token}\n"
                  f"Message-ID: <{token}@example.org>\n\n{body}")


def send(p, sender, rcpts, token, mail_options=(), rcpt_options=(), body=None):
    """One message over SMTP with DSN options; returns the queue ID."""
    with p.smtp() as s:
        s.ehlo("client.example")
        assert s.has_extn("dsn"), "EHLO does not offer DSN"
        code, resp = s.mail(sender, list(mail_options))
        assert code == 250, resp
        for r in rcpts:
            code, resp = s.rcpt(r, list(rcpt_options))
            assert code in (250, 251), resp
        code, resp = s.data(message(token, body) if body else message(token))
        assert code == 250, resp
        return re.search(r"queued as ([0-9A-F]+)", resp.decode()).group(1)


def notices_for(sink, token):
    """Messages at the sink that are notices about the message ``token``."""
    return [m for m in sink.find(token) if m.mail_from in ("", "<>")
            or m.mail_from.startswith("double-bounce@")]


def parse(m):
    return email.message_from_bytes(h.lf(m.content), policy=email.policy.compat32)


def report_parts(msg):
    """(text part, [DSN field blocks], returned part) of a notice."""
    assert msg.get_content_type() == "multipart/report"
    assert msg.get_param("report-type") == "delivery-status"
    parts = msg.get_payload()
    assert len(parts) == 3, [p.get_content_type() for p in parts]
    assert parts[0].get_content_type() == "text/plain"
    assert parts[1].get_content_type() == "message/delivery-status"
    blocks = parts[1].get_payload()
    return parts[0], blocks, parts[2]


def relay_sink_params(sink, **extra):
    params = {"relayhost": f"[127.0.0.1]:{sink.port}"}
    params.update({k: str(v) for k, v in extra.items()})
    return params


def test_failure_notice_ret_full_envid_orcpt(make_postern, sink):
    p = make_postern(params=relay_sink_params(sink))
    sink.set_rcpt("bad@remote.test", "550 5.1.1 no such user")
    tok = new_token()
    qid = send(p, SENDER, ["bad@remote.test", "good@remote.test"], tok,
               mail_options=["RET=FULL", "ENVID=env+2Dtok123"],
               rcpt_options=["NOTIFY=FAILURE", "ORCPT=rfc822;Bad@Remote.test"])
    notice = wait_for(lambda: notices_for(sink, tok), 30, what="the failure notice")[0]
    assert notice.rcpt_tos == [SENDER]
    assert notice.mail_from in ("", "<>"), "notices come from the null sender"
    msg = parse(notice)
    assert msg["Subject"] == "Undelivered Mail Returned to Sender"
    assert msg["Auto-Submitted"] == "auto-replied"
    text, blocks, returned = report_parts(msg)
    assert "<bad@remote.test>" in text.get_payload()
    per_msg, per_rcpt = blocks[0], blocks[1:]
    assert per_msg["Reporting-MTA"] == "dns; postern.test"
    assert per_msg["Original-Envelope-Id"] == "env-tok123"
    assert per_msg["Arrival-Date"]
    assert len(per_rcpt) == 1
    r = per_rcpt[0]
    assert r["Final-Recipient"] == "rfc822; bad@remote.test"
    assert r["Original-Recipient"].replace(" ", "") == "rfc822;Bad@Remote.test"
    assert r["Action"] == "failed"
    assert r["Status"] == "5.1.1"
    assert r["Remote-MTA"] == "dns; 127.0.0.1"
    assert r["Diagnostic-Code"] == "smtp; 550 5.1.1 no such user"
    # RET=FULL: the whole message, as message/rfc822.
    assert returned.get_content_type() == "message/rfc822"
    inner = returned.get_payload()[0]
    assert inner["Subject"] == tok
    assert "The body of the message." in inner.get_payload()
    p.wait_for_log(rf"{qid}: removed")
    assert len(notices_for(sink, tok)) == 1


def test_ret_hdrs_and_notify_never(make_postern, sink):
    p = make_postern(params=relay_sink_params(sink))
    sink.set_rcpt("bad@remote.test", "550 5.1.1 no such user")
    tok = new_token()
    send(p, SENDER, ["bad@remote.test"], tok, mail_options=["RET=HDRS"])
    notice = wait_for(lambda: notices_for(sink, tok), 30)[0]
    _, _, returned = report_parts(parse(notice))
    assert returned.get_content_type() == "text/rfc822-headers"
    assert tok in returned.get_payload()
    assert "The body of the message." not in notice.content.decode()

    tok2 = new_token()
    qid2 = send(p, SENDER, ["bad@remote.test"], tok2, rcpt_options=["NOTIFY=NEVER"])
    p.wait_for_log(rf"{qid2}: removed")
    # The failure is logged, but nobody is told.
    assert re.search(rf"{qid2}: to=<bad@remote.test>.*status=bounced", p.log_text())
    time.sleep(1)
    assert notices_for(sink, tok2) == []


def test_success_notice(make_postern, sink):
    p = make_postern(params=relay_sink_params(sink))
    tok = new_token()
    qid = send(p, SENDER, ["good@remote.test", "quiet@remote.test"], tok,
               mail_options=["ENVID=e1"], rcpt_options=[])
    tok2 = new_token()
    qid2 = send(p, SENDER, ["good@remote.test"], tok2,
                rcpt_options=["NOTIFY=SUCCESS,FAILURE"])
    notice = wait_for(lambda: notices_for(sink, tok2), 30, what="the success notice")[0]
    msg = parse(notice)
    assert msg["Subject"] == "Successful Mail Delivery Report"
    _, blocks, returned = report_parts(msg)
    # Handed to an SMTP server (without DSN): "relayed", as Postfix says.
    assert [b["Action"] for b in blocks[1:]] == ["relayed"]
    assert blocks[1]["Final-Recipient"] == "rfc822; good@remote.test"
    assert blocks[1]["Status"].startswith("2.")
    assert returned.get_content_type() == "text/rfc822-headers"
    p.wait_for_log(rf"{qid2}: removed")
    p.wait_for_log(rf"{qid}: removed")
    time.sleep(0.5)
    # No NOTIFY=SUCCESS: no success notice.
    assert notices_for(sink, tok) == []
    assert len(notices_for(sink, tok2)) == 1


def test_delay_warning_once(make_postern, sink):
    p = make_postern(params=relay_sink_params(sink, delay_warning_time="1s"))
    sink.set_rcpt("slow@remote.test", "450 4.2.0 try again later")
    tok = new_token()
    qid = send(p, SENDER, ["slow@remote.test"], tok, rcpt_options=["NOTIFY=DELAY,FAILURE"])
    notice = wait_for(lambda: notices_for(sink, tok), 30, what="the delay notice")[0]
    msg = parse(notice)
    assert msg["Subject"] == "Delayed Mail (still being retried)"
    text, blocks, _ = report_parts(msg)
    assert "THIS IS A WARNING ONLY" in text.get_payload()
    r = blocks[1]
    assert r["Action"] == "delayed" and r["Status"] == "4.2.0"
    assert r["Will-Retry-Until"]
    # Several more attempts, still one warning.
    n = len(re.findall(rf"{qid}: to=<slow@remote.test>.*status=deferred", p.log_text()))
    p.wait_for_log(rf"({qid}: to=<slow@remote.test>.*status=deferred(.|\n)*){{{n + 2}}}",
                   timeout=40)
    assert len(notices_for(sink, tok)) == 1
    # Without DELAY in NOTIFY: no warning.
    tok2 = new_token()
    qid2 = send(p, SENDER, ["slow@remote.test"], tok2, rcpt_options=["NOTIFY=FAILURE"])
    p.wait_for_log(rf"({qid2}: to=<slow@remote.test>.*status=deferred(.|\n)*){{2}}",
                   timeout=40)
    assert notices_for(sink, tok2) == []


def test_double_bounce_goes_to_postmaster_once(make_postern, sink):
    p = make_postern(params=relay_sink_params(
        sink, notify_classes="2bounce", **{"2bounce_notice_recipient": "pm@remote.test"}))
    sink.set_rcpt("bad@remote.test", "550 5.1.1 no such user")
    sink.set_rcpt("gone@remote.test", "550 5.1.1 sender gone too")
    tok = new_token()
    send(p, "gone@remote.test", ["bad@remote.test"], tok)
    pm = wait_for(lambda: [m for m in sink.find(tok) if "pm@remote.test" in m.rcpt_tos],
                  30, what="the double bounce")[0]
    assert pm.mail_from == "double-bounce@postern.test"
    msg = parse(pm)
    assert msg["Subject"] == "Postmaster Copy: Undelivered Mail"
    _, blocks, returned = report_parts(msg)
    assert blocks[1]["Final-Recipient"] == "rfc822; gone@remote.test"
    # What it returns is the failed bounce, which names the first failure.
    assert returned.get_content_type() == "message/rfc822"
    assert "bad@remote.test" in returned.as_string()

    # The postmaster address fails too: the double bounce is dropped.
    sink.set_rcpt("pm@remote.test", "550 5.1.1 no postmaster here")
    tok2 = new_token()
    send(p, "gone@remote.test", ["bad@remote.test"], tok2)
    p.wait_for_log(r"undeliverable postmaster notification discarded", timeout=30)
    time.sleep(1)
    wait_for(lambda: not any(h_ for h_ in (p.queue_files("deferred") + p.queue_files("active")
                                          + p.queue_files("incoming"))), 20)
    assert len([m for m in sink.find(tok) if "pm@remote.test" in m.rcpt_tos]) == 1
    assert [m for m in sink.find(tok2) if m.mail_from in ("", "<>")] == []


def test_postmaster_copy_of_bounce(make_postern, sink):
    p = make_postern(params=relay_sink_params(
        sink, notify_classes="bounce", bounce_notice_recipient="pmcopy@remote.test"))
    sink.set_rcpt("bad@remote.test", "550 5.1.1 no such user")
    tok = new_token()
    send(p, SENDER, ["bad@remote.test"], tok)
    wait_for(lambda: [m for m in sink.find(tok) if SENDER in m.rcpt_tos
                      and m.mail_from in ("", "<>")], 30)
    copy = wait_for(lambda: [m for m in sink.find(tok) if "pmcopy@remote.test" in m.rcpt_tos],
                    30)[0]
    msg = parse(copy)
    assert msg["Subject"] == "Postmaster Copy: Undelivered Mail"
    _, blocks, returned = report_parts(msg)
    assert blocks[1]["Action"] == "failed"
    assert returned.get_content_type() == "text/rfc822-headers"


# --------------------------------------------------------------------------
# Concurrency feedback and dead destinations


import asyncio  # noqa: E402
import socket  # noqa: E402
import threading  # noqa: E402


class CountingSink(h.Sink):
    """A Sink that takes ``delay`` seconds over each DATA and records how
    many deliveries were at DATA at once (``samples``: the count as each
    one arrived)."""

    def __init__(self, delay):
        super().__init__()
        self.delay = delay
        self.current = 0
        self.samples = []

    async def handle_DATA(self, server, session, envelope):
        with self._lock:
            self.current += 1
            self.samples.append(self.current)
        try:
            await asyncio.sleep(self.delay)
            return await super().handle_DATA(server, session, envelope)
        finally:
            with self._lock:
                self.current -= 1


class HoldingServer:
    """A TCP server on a free loopback port that accepts connections and
    says nothing until ``release()``, then answers each with ``reply``
    and closes it. Counts connections."""

    def __init__(self, reply=b"421 4.3.2 service not available\r\n"):
        self.reply = reply
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(100)
        self.port = self.sock.getsockname()[1]
        self.conns = []
        self.total = 0
        self.released = threading.Event()
        self.lock = threading.Lock()
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self):
        while True:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            with self.lock:
                self.total += 1
                if self.released.is_set():
                    self._answer(c)
                else:
                    self.conns.append(c)

    def _answer(self, c):
        try:
            c.sendall(self.reply)
        except OSError:
            pass
        c.close()

    def open_connections(self):
        with self.lock:
            return len(self.conns)

    def release(self):
        with self.lock:
            self.released.set()
            for c in self.conns:
                self._answer(c)
            self.conns = []

    def stop(self):
        self.release()
        self.sock.close()


def send_many(p, rcpts_tokens):
    with p.smtp() as s:
        s.ehlo("client.example")
        for rcpt, tok in rcpts_tokens:
            code, _ = h.smtp_transaction(s, SENDER, [rcpt], message(tok))
            assert code == 250


def test_concurrency_window_grows_to_the_limit(make_postern):
    sink = CountingSink(delay=0.5).start()
    try:
        p = make_postern(params=relay_sink_params(
            sink, default_destination_concurrency_limit=10))
        toks = [new_token() for _ in range(60)]
        send_many(p, [(f"u{i}@remote.test", t) for i, t in enumerate(toks)])
        wait_for(lambda: all(sink.count(t) == 1 for t in toks), 90,
                 what="all 60 messages at the sink")
        samples = sink.samples
        # It starts at initial_destination_concurrency (5) ...
        assert max(samples[:6]) <= 5, samples
        # ... and grows, one per window's worth of successes, to the limit.
        assert max(samples) == 10, samples
        assert samples.index(10) > 30, samples
    finally:
        sink.stop()


def test_failing_destination_is_dead_and_does_not_slow_a_live_one(make_postern):
    hold = HoldingServer()
    live = h.Sink().start()
    try:
        p = make_postern(params={
            "transport_maps": f"inline:{{ dead.test=smtp:[127.0.0.1]:{hold.port}, "
                              f"live.test=smtp:[127.0.0.1]:{live.port} }}",
            "minimal_backoff_time": "1h", "maximal_backoff_time": "1h",
            "queue_run_delay": "1h"})
        dead_toks = [new_token() for _ in range(30)]
        send_many(p, [(f"d{i}@dead.test", t) for i, t in enumerate(dead_toks)])
        # The first window's worth of connections hangs at the dead host.
        wait_for(lambda: hold.open_connections() == 5, 30, what="5 connections held")
        live_toks = [new_token() for _ in range(10)]
        send_many(p, [(f"l{i}@live.test", t) for i, t in enumerate(live_toks)])
        # The live destination gets everything while the dead one still
        # holds its connections.
        wait_for(lambda: all(live.count(t) == 1 for t in live_toks), 30)
        assert hold.open_connections() == 5 and hold.total == 5
        # Now the dead host fails them: one failed pseudo-cohort (a window's
        # worth of failures; the slots they free are used meanwhile, as in
        # Postfix), and the rest is deferred without another connection.
        hold.release()
        wait_for(lambda: len(p.queue_files("deferred")) == 30, 30, what="30 deferred")
        log = p.log_text()
        tried = hold.total
        assert tried < 10, tried
        suspended = re.findall(r"status=deferred \(delivery temporarily suspended: ", log)
        assert len(suspended) == 30 - tried
        assert re.search(r"destination \[127.0.0.1\]:\d+: dead", log)
        # Mail arriving for it while it is dead is deferred at once, too.
        send_many(p, [("late@dead.test", new_token())])
        wait_for(lambda: len(p.queue_files("deferred")) == 31, 30)
        assert hold.total == tried
    finally:
        hold.stop()
        live.stop()


def test_rate_delay(make_postern):
    sink = CountingSink(delay=0).start()
    try:
        p = make_postern(params=relay_sink_params(
            sink, default_destination_rate_delay="1s"))
        toks = [new_token() for _ in range(3)]
        started = time.monotonic()
        send_many(p, [(f"u{i}@remote.test", t) for i, t in enumerate(toks)])
        # The three arrived within this many seconds of each other (next to
        # nothing, unless the machine is busy).
        spread = time.monotonic() - started
        wait_for(lambda: all(sink.count(t) == 1 for t in toks), 30)
        assert max(sink.samples) == 1
        # delay= is the time since the message's own arrival.
        stamps = [float(x) for x in re.findall(
            r"relay=127\.0\.0\.1\[127\.0\.0\.1\]:\d+, delay=([\d.]+)", p.log_text())]
        assert len(stamps) == 3, stamps
        # One at a time, a second apart: the last is delivered 2 s after
        # the first arrived (its own delay plus at most the arrival spread).
        assert max(stamps) + spread >= 2.0, (stamps, spread)
    finally:
        sink.stop()


# --------------------------------------------------------------------------
# Logging that pflogsumm understands


def test_pflogsumm_counts(make_postern, sink):
    import shutil
    import subprocess
    pflogsumm = shutil.which("pflogsumm")
    if not pflogsumm:
        pytest.skip("pflogsumm is not installed (scripts/test installs it)")
    sink.set_rcpt("bad@remote.test", "550 5.1.1 no such user")
    sink.set_rcpt("slow@remote.test", "450 4.2.0 try again later")
    p = make_postern(params=relay_sink_params(sink))
    toks = [new_token() for _ in range(5)]
    send_many(p, [("a@remote.test", toks[0]), ("b@remote.test", toks[1]),
                  ("c@remote.test", toks[2]), ("bad@remote.test", toks[3]),
                  ("slow@remote.test", toks[4])])
    # Three sent, one bounced (and its notice sent), one deferred twice.
    p.wait_for_log(r"sender non-delivery notification")
    p.wait_for_log(r"(to=<slow@remote.test>.*status=deferred(.|\n)*){2}", timeout=30)
    wait_for(lambda: all(sink.count(t) >= 1 for t in toks[:3]), 20)
    wait_for(lambda: len(re.findall(r"status=sent", p.log_text())) == 4, 20)
    log = p.log_text()
    for line in re.findall(r".*status=.*", log):
        assert re.search(r": to=<[^>]*>, (orig_to=<[^>]*>, )?relay=[^,]+, delay=[\d.]+, "
                         r"delays=[\d.]+/[\d.]+/[\d.]+/[\d.]+, dsn=\d\.\d+\.\d+, "
                         r"status=(sent|deferred|bounced) \(", line), line
    r = subprocess.run([pflogsumm, "--syslog-name=postern", str(p.maillog)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    totals = dict((name, int(n)) for n, name in
                  re.findall(r"^\s+(\d+)\s+(received|delivered|deferred|bounced)\b",
                             r.stdout, re.M))
    assert totals == {"received": 5, "delivered": 4, "deferred": 1, "bounced": 1}, r.stdout[:800]
    m = re.search(r"^\s+1\s+deferred\s+\((\d+)\s+deferrals\)", r.stdout, re.M)
    assert m and int(m.group(1)) >= 2, r.stdout[:800]


def test_message_recipient_limit(make_postern, sink):
    """qmgr_message_recipient_limit bounds the recipients held in memory:
    with 2, two-recipient messages are taken in one at a time."""
    p = make_postern(params=relay_sink_params(sink, qmgr_message_recipient_limit=2))
    toks = [new_token() for _ in range(4)]
    with p.smtp() as s:
        s.ehlo("client.example")
        for i, t in enumerate(toks):
            code, _ = h.smtp_transaction(s, SENDER, [f"a{i}@remote.test", f"b{i}@remote.test"],
                                         message(t))
            assert code == 250
    wait_for(lambda: all(sink.count(t) == 1 for t in toks), 30)
    wait_for(lambda: len(re.findall(r": removed", p.log_text())) == 4, 20)
    events = re.findall(r"qmgr\[\d+\]: [0-9A-F]+: (from=.*\(queue active\)|removed)",
                        p.log_text())
    depth = 0
    for e in events:
        depth += 1 if e.startswith("from=") else -1
        assert depth <= 1, events


def test_big_message_is_read_in_slices(make_postern, sink):
    """A message with more recipients than qmgr_message_recipient_limit is
    delivered a slice at a time, every recipient exactly once, and a
    failure among them is reported once."""
    p = make_postern(params=relay_sink_params(sink, qmgr_message_recipient_limit=3,
                                              default_destination_recipient_limit=2))
    sink.set_rcpt("r5@remote.test", "550 5.1.1 no such user")
    tok = new_token()
    rcpts = [f"r{i}@remote.test" for i in range(8)]
    qid = send(p, SENDER, rcpts, tok)
    p.wait_for_log(rf"{qid}: removed")
    assert re.search(rf"{qid}: from=<{SENDER}>, size=\d+, nrcpt=8 \(queue active\)",
                     p.log_text())
    got = sorted(r for m in sink.find(tok) if m.mail_from == SENDER for r in m.rcpt_tos)
    assert got == sorted(r for r in rcpts if r != "r5@remote.test")
    notice = wait_for(lambda: notices_for(sink, tok), 20)
    assert len(notice) == 1
    _, blocks, _ = report_parts(parse(notice[0]))
    assert [b["Final-Recipient"] for b in blocks[1:]] == ["rfc822; r5@remote.test"]
