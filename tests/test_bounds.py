"""Bounds on what a client can make Postern hold (issue 7, resource
exhaustion): a huge message (message_size_limit), a header storm
(header_size_limit, hopcount_limit) and very many recipients
(smtpd_recipient_limit, qmgr_message_recipient_limit), each driven end to
end with smtplib or sendmail, relayed to an aiosmtpd Sink.

Already covered elsewhere, not repeated here: sendmail's exit code for a
too-big message (test_sendmail.py), the Delivered-To loop (local), the
recipient slices of qmgr (test_scheduler.py).
"""

import re
import smtplib
import time
import uuid

import pytest

import postern_harness as h
from postern_harness import wait_for

SENDER = "sender@example.org"


def new_token():
    return "pt-" + uuid.uuid4().hex


def relay(sink, **extra):
    params = {"relayhost": f"[127.0.0.1]:{sink.port}"}
    params.update({k: str(v) for k, v in extra.items()})
    return params


def queued_files(p):
    return {q: p.queue_files(q) for q in ("maildrop", "incoming", "active", "deferred", "hold")
            if (p.queue / q).exists()}


def assert_nothing_queued(p):
    """Nothing stays queued. cleanup removes an aborted file after smtpd has
    answered the client (smtpd sends the abort and does not wait, as
    Postfix's), so the file may outlive the session by a moment: wait a
    bounded while for the queue to be empty."""
    def left():
        return {q: f for q, f in queued_files(p).items() if f}
    h.poll_until(lambda: not left(), timeout=10.0)
    assert left() == {}, left()


def vm_hwm_kb(pid):
    """Peak resident memory of a process (VmHWM), in kB."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    raise AssertionError(f"no VmHWM for {pid}")


# --------------------------------------------------------------------------
# message_size_limit


def test_huge_message_is_refused_and_not_queued(make_postern, sink):
    p = make_postern(params=relay(sink, message_size_limit=100000))
    tok = new_token()
    big = h.crlf(f"Subject: {tok}\n\n" + ("y" * 76 + "\n") * 4000)  # ~310 kB
    with p.smtp() as s:
        s.ehlo("client.example")
        assert s.esmtp_features.get("size") == "100000", s.esmtp_features
        # Announced too big: refused at MAIL.
        code, resp = s.mail(SENDER, ["SIZE=400000"])
        assert (code, resp[:5]) == (552, b"5.3.4"), resp
        s.rset()
        # Not announced: refused at the end of DATA, after reading it all.
        code, resp = s.mail(SENDER)
        assert code == 250, resp
        code, resp = s.rcpt("rcpt@remote.test")
        assert code == 250, resp
        code, resp = s.data(big)
        assert (code, resp[:5]) == (552, b"5.3.4"), resp
        # The session goes on: a small message still gets through.
        code, text = h.smtp_transaction(s, SENDER, ["rcpt@remote.test"],
                                        h.crlf(f"Subject: small {tok}\n\nsmall\n"))
        assert code == 250, text
    msgs = sink.wait_for(tok)
    assert len(msgs) == 1 and b"small" in msgs[0].content and len(msgs[0].content) < 2000
    wait_for(lambda: not any(queued_files(p).values()), 20, what="an empty queue")
    assert len(p.log_findall(r"status=sent")) == 1


def test_huge_message_from_sendmail_is_refused_and_not_queued(make_postern):
    p = make_postern(params={"message_size_limit": "50000"})
    r = p.sendmail(["rcpt@remote.test"],
                   b"Subject: big\n\n" + (b"z" * 76 + b"\n") * 2000)
    assert r.returncode != 0, h.describe(r)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("sendmail: fatal: "), r.stderr
    assert_nothing_queued(p)


# --------------------------------------------------------------------------
# hopcount_limit


def received_headers(n):
    return "".join(f"Received: from hop{i}.example ([192.0.2.{i % 250 + 1}])\n"
                   f"\tby relay{i}.example; Thu, 1 Jan 2026 00:00:{i % 60:02d} +0000\n"
                   for i in range(n))


def test_too_many_hops_is_refused_over_smtp(make_postern, sink):
    """Postfix answers 554 5.4.0 Error: too many hops at the end of DATA
    (Postern says 5.4.6; the code and text are checked here)."""
    p = make_postern(params=relay(sink, hopcount_limit=20))
    tok = new_token()
    code, text = p.send(SENDER, ["rcpt@remote.test"],
                        received_headers(30) + f"Subject: {tok}\n\nlooping\n")
    assert code == 554 and "too many hops" in text, (code, text)
    # Below the limit the same message goes through.
    code, text = p.send(SENDER, ["rcpt@remote.test"],
                        received_headers(10) + f"Subject: ok {tok}\n\nfine\n")
    assert code == 250, text
    msgs = sink.wait_for(tok)
    time.sleep(1)
    assert len(sink.find(tok)) == 1 and b"Subject: ok" in msgs[0].content
    wait_for(lambda: not any(queued_files(p).values()), 20, what="an empty queue")


def test_too_many_hops_from_sendmail_bounces(make_postern, sink):
    """Local submission cannot be refused in the conversation: the message
    is bounced to its sender, and the recipient gets nothing."""
    p = make_postern(params=relay(sink, hopcount_limit=20))
    tok = new_token()
    r = p.sendmail(["-f", SENDER, "rcpt@remote.test"],
                   (received_headers(30) + f"Subject: {tok}\n\nlooping\n").encode())
    assert r.returncode == 0, h.describe(r)
    notice = wait_for(lambda: [m for m in sink.find(tok) if m.mail_from in ("", "<>")],
                      20, what="the bounce notice")[0]
    assert notice.rcpt_tos == [SENDER]
    assert re.search(rb"5\.4\.\d", notice.content) and \
        re.search(rb"too many hops|forwarding loop", notice.content), notice.content[:3000]
    time.sleep(1)
    assert [m for m in sink.find(tok) if "rcpt@remote.test" in m.rcpt_tos] == []
    wait_for(lambda: not any(queued_files(p).values()), 20, what="an empty queue")


# --------------------------------------------------------------------------
# header_size_limit


def test_header_storm_is_bounded(make_postern, sink):
    """A header section far larger than header_size_limit (one giant
    folded header, then thousands of small ones): the message is accepted,
    cleanup does not die, the body arrives intact and what is delivered is
    not larger than what was sent."""
    p = make_postern(params=relay(sink, header_size_limit=20000))
    tok = new_token()
    giant = "X-Giant: start\n" + "".join(f"\tfold {i:06d} " + "g" * 60 + "\n"
                                         for i in range(3000))  # ~220 kB
    many = "".join(f"X-Many-{i}: " + "m" * 40 + "\n" for i in range(5000))  # ~270 kB
    body = f"body line with {tok}\n" + "b" * 70 + "\nlast body line\n"
    sent = giant + many + f"Subject: {tok}\n\n" + body
    code, text = p.send(SENDER, ["rcpt@remote.test"], sent)
    assert code == 250, text
    msg = sink.wait_for(tok)[0]
    content = h.lf(msg.content)
    assert content.endswith(("b" * 70 + "\nlast body line\n").encode()), content[-300:]
    assert len(content) <= len(sent.encode()) + 2000
    assert not p.log_search(r"cleanup\[\d+\]: (fatal|panic)|terminated|signal"), p.log_tail()
    wait_for(lambda: not any(queued_files(p).values()), 20, what="an empty queue")


def test_overlong_header_is_truncated_and_the_rest_stay_headers(make_postern, sink):
    p = make_postern(params=relay(sink, header_size_limit=20000))
    tok = new_token()
    giant = "X-Giant: start\n" + "".join(f"\tfold {i:06d} " + "g" * 60 + "\n"
                                         for i in range(1000))  # ~75 kB
    code, text = p.send(SENDER, ["rcpt@remote.test"],
                        giant + f"Subject: {tok}\nX-After: kept\n\nthe body\n")
    assert code == 250, text
    msg = sink.wait_for(tok)[0]
    headers, body = h.split_message(h.lf(msg.content))
    assert h.header_values(h.lf(msg.content), "X-After") == ["kept"]
    assert body.strip() == b"the body"
    giant_kept = [v for v in h.header_values(h.lf(msg.content), "X-Giant")]
    assert len(giant_kept) == 1 and len(giant_kept[0]) <= 20000


# --------------------------------------------------------------------------
# recipients


def test_smtpd_recipient_limit(make_postern, sink):
    p = make_postern(params=relay(sink, smtpd_recipient_limit=1000,
                                  default_destination_recipient_limit=1000))
    tok = new_token()
    rcpts = [f"r{i}@remote.test" for i in range(1001)]
    with p.smtp(timeout=60) as s:
        s.ehlo("client.example")
        code, resp = s.mail(SENDER)
        assert code == 250, resp
        for r in rcpts[:1000]:
            code, resp = s.rcpt(r)
            assert code == 250, (r, code, resp)
        code, resp = s.rcpt(rcpts[1000])
        assert (code, resp) == (452, b"4.5.3 Error: too many recipients"), (code, resp)
        code, resp = s.data(h.crlf(f"Subject: {tok}\n\nmany\n"))
        assert code == 250, resp
    wait_for(lambda: sum(len(m.rcpt_tos) for m in sink.find(tok)) >= 1000, 60,
             what="1000 recipients at the sink")
    got = sorted(r for m in sink.find(tok) for r in m.rcpt_tos)
    assert got == sorted(rcpts[:1000])


def to_headers(n_headers, per_header, prefix="u"):
    return "".join(
        "To: " + ", ".join(f"{prefix}{j * per_header + i}@remote.test"
                           for i in range(per_header)) + "\n"
        for j in range(n_headers))


def test_5000_recipients_qmgr_memory_bounded(make_postern, sink):
    """One SMTP message with 5,000 recipients (smtpd_recipient_limit
    raised): every one delivered once, qmgr taking them in slices of
    qmgr_message_recipient_limit, never restarted, its memory small."""
    p = make_postern(params=relay(sink, smtpd_recipient_limit=5000,
                                  qmgr_message_recipient_limit=500,
                                  default_destination_recipient_limit=1000))
    qmgr = p.qmgr_pid()
    tok = new_token()
    rcpts = [f"r{i}@remote.test" for i in range(5000)]
    with p.smtp(timeout=60) as s:
        s.ehlo("client.example")
        code, text = h.smtp_transaction(s, SENDER, rcpts, h.crlf(f"Subject: {tok}\n\nmany\n"))
        assert code == 250, text
    p.wait_for_log(rf"from=<{SENDER}>, size=\d+, nrcpt=5000 \(queue active\)", timeout=60)
    wait_for(lambda: sum(len(m.rcpt_tos) for m in sink.find(tok)) >= 5000, 90,
             what="every recipient at the sink")
    time.sleep(1)
    got = [r for m in sink.find(tok) for r in m.rcpt_tos]
    assert sorted(got) == sorted(rcpts)
    assert max(len(m.rcpt_tos) for m in sink.find(tok)) <= 500
    wait_for(lambda: not any(queued_files(p).values()), 30, what="an empty queue")
    assert p.qmgr_pid() == qmgr
    assert vm_hwm_kb(qmgr) < 64 * 1024, vm_hwm_kb(qmgr)


def test_sendmail_t_50000_recipients_qmgr_memory_bounded(make_postern, sink):
    """sendmail -t with 50,000 recipients in 500 To: headers: every one
    delivered once, at most qmgr_message_recipient_limit per delivery,
    qmgr never restarted and its peak memory small.

    header_size_limit is raised to hold the 600 kB header section: Postern
    bounds the whole section with it, where Postfix bounds each header
    (see the expected failure below)."""
    n_headers, per_header = 500, 100
    p = make_postern(params=relay(sink, qmgr_message_recipient_limit=1000,
                                  default_destination_recipient_limit=1000,
                                  header_size_limit=2000000))
    qmgr = p.qmgr_pid()
    tok = new_token()
    r = p.sendmail(["-t", "-f", SENDER],
                   (to_headers(n_headers, per_header) + f"Subject: {tok}\n\nto many\n").encode(),
                   timeout=120)
    assert r.returncode == 0, h.describe(r)
    want = n_headers * per_header
    p.wait_for_log(rf"from=<{SENDER}>, size=\d+, nrcpt={want} \(queue active\)", timeout=40)

    def count():
        return sum(len(m.rcpt_tos) for m in sink.find(tok))

    wait_for(lambda: count() >= want, 120, what="every recipient at the sink")
    time.sleep(1)
    got = [r for m in sink.find(tok) for r in m.rcpt_tos]
    assert len(got) == want and len(set(got)) == want
    assert max(len(m.rcpt_tos) for m in sink.find(tok)) <= 1000
    wait_for(lambda: not any(queued_files(p).values()), 30, what="an empty queue")
    # qmgr was never restarted, and its peak memory stayed far below what
    # 50,000 recipients in memory at once would take.
    assert p.qmgr_pid() == qmgr
    assert vm_hwm_kb(qmgr) < 64 * 1024, vm_hwm_kb(qmgr)


def test_sendmail_t_recipients_past_header_size_limit(make_postern, sink):
    """20,000 recipients in 200 To: headers of 100 each (each header far
    below header_size_limit, the section above it), default settings."""
    p = make_postern(params=relay(sink))
    tok = new_token()
    r = p.sendmail(["-t", "-f", SENDER],
                   (to_headers(200, 100) + f"Subject: {tok}\n\nto many\n").encode(),
                   timeout=120)
    assert r.returncode == 0, h.describe(r)
    m = p.wait_for_log(rf"from=<{SENDER}>, size=\d+, nrcpt=(\d+) \(queue active\)",
                       timeout=60)
    assert m.group(1) == "20000", m.group(0)


def test_sendmail_command_line_5000_recipients(make_postern, sink):
    p = make_postern(params=relay(sink, default_destination_recipient_limit=1000))
    tok = new_token()
    args = [f"c{i}@remote.test" for i in range(5000)]
    r = p.sendmail(["-f", SENDER, *args], f"Subject: {tok}\n\ncommand line\n".encode(),
                   timeout=120)
    assert r.returncode == 0, h.describe(r)
    m = p.wait_for_log(r"nrcpt=\d+ \(queue active\)|message rejected", timeout=60)
    assert "nrcpt=5000 " in m.group(0), m.group(0)
    wait_for(lambda: sum(len(m.rcpt_tos) for m in sink.find(tok)) >= 5000, 60,
             what="every recipient at the sink")
    got = [r for m in sink.find(tok) for r in m.rcpt_tos]
    assert sorted(got) == sorted(args)


def test_client_that_keeps_sending_rcpt_is_cut_off(make_postern):
    """RCPT after RCPT past the limit: each gets 452, the session stays
    usable and nothing is queued without DATA."""
    p = make_postern(params={"smtpd_recipient_limit": "5"})
    with p.smtp() as s:
        s.ehlo("client.example")
        assert s.mail(SENDER)[0] == 250
        codes = [s.rcpt(f"x{i}@remote.test")[0] for i in range(20)]
        assert codes[:5] == [250] * 5, codes
        assert set(codes[5:]) <= {452, 421}, codes
        try:
            s.rset()
        except smtplib.SMTPServerDisconnected:
            pass
    assert_nothing_queued(p)
