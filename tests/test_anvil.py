"""Client limits counted across smtpd processes by the anvil server
(Postfix's anvil(8)), with real SMTP clients.

``smtpd_client_session_limit = 1`` makes master start one smtpd process
per simultaneous session, so every limit below is counted across
processes. 127.0.0.1 is in mynetworks (exempt from the limits by
``smtpd_client_event_limit_exceptions``); 127.0.0.2 is not.
"""

import os
import re
import signal

import postern_harness as h

OUTSIDE = ("127.0.0.2", 0)
ANVIL_LINE = "anvil     unix  -       -       n       -       1       anvil"
REFUSED = ["421 4.7.0 postern.test Error: too many connections from 127.0.0.2"]
FALLBACK = r"counting client limits in this smtpd process only"


Raw = h.RawSmtp


def greeted(port, source=OUTSIDE):
    """A connection that got its 220 (asserted)."""
    c = Raw(port, source=source)
    r = c.reply()
    assert r and r[0].startswith("220 "), r
    return c


def greeted_soon(p):
    """A session from outside once the limits allow it again (sessions
    that ended are counted down as smtpd sees them close)."""
    def one_more():
        c = Raw(p.port, source=OUTSIDE)
        r = c.reply()
        if r and r[0].startswith("220 "):
            return c
        c.close()
        return None

    return h.wait_for(one_more, timeout=20, what="a new session once one ended")


def start(make_postern, **params):
    base = {"smtpd_client_session_limit": "1"}
    base.update(params)
    p = make_postern(params=base, master_cf_extra=[ANVIL_LINE])
    return p


def outside_pids(p, n):
    """The smtpd processes that logged the first ``n`` sessions from
    127.0.0.2 (waits for them)."""
    pattern = r"postfix/smtpd\[(\d+)\]: connect from unknown\[127\.0\.0\.2\]"
    h.wait_for(lambda: len(p.log_findall(pattern)) >= n, what=f"{n} sessions logged")
    return set(p.log_findall(pattern)[:n])


def test_connection_count_across_processes(make_postern):
    p = start(make_postern, smtpd_client_connection_count_limit="2")
    service = re.escape(f"127.0.0.1:{p.port}")
    first = greeted(p.port)
    second = greeted(p.port)
    # Two sessions, two smtpd processes.
    assert len(outside_pids(p, 2)) == 2
    third = Raw(p.port, source=OUTSIDE)
    assert third.reply() == REFUSED
    assert third.f.readline() == b""
    third.close()
    p.wait_for_log(r"warning: Connection concurrency limit exceeded: 3 from "
                   rf"unknown\[127\.0\.0\.2\] for service {service}")
    # mynetworks is exempt, however many sessions it has.
    insiders = [greeted(p.port, source=("127.0.0.1", 0)) for _ in range(4)]
    for c in insiders:
        assert c.cmd("QUIT")[0].startswith("221")
        c.close()
    # A session that ends stops counting in the other processes too.
    assert first.cmd("QUIT")[0].startswith("221")
    first.close()
    again = greeted_soon(p)
    assert second.cmd("NOOP") == ["250 2.0.0 Ok"]
    for c in (again, second):
        c.close()
    # Counted by anvil, never by a process alone.
    assert len(p.child_pids("anvil")) == 1
    assert not p.log_search(FALLBACK)


def test_rates_across_processes(make_postern):
    p = start(make_postern,
              smtpd_client_connection_count_limit="0",
              smtpd_client_connection_rate_limit="3",
              smtpd_client_message_rate_limit="2",
              smtpd_client_recipient_rate_limit="2",
              smtpd_client_auth_rate_limit="2")
    service = re.escape(f"127.0.0.1:{p.port}")
    clients = [greeted(p.port) for _ in range(3)]
    assert len(outside_pids(p, 3)) == 3
    fourth = Raw(p.port, source=OUTSIDE)
    assert fourth.reply() == REFUSED
    fourth.close()
    p.wait_for_log(r"warning: Connection rate limit exceeded: 4 from "
                   rf"unknown\[127\.0\.0\.2\] for service {service}")
    a, b, c = clients
    for x in clients:
        assert x.cmd("EHLO client.example")[0].startswith("250")
    # Messages: one in each of two processes, the third is one too many.
    assert a.cmd("MAIL FROM:<s@example.org>") == ["250 2.1.0 Ok"]
    assert b.cmd("MAIL FROM:<s@example.org>") == ["250 2.1.0 Ok"]
    assert c.cmd("MAIL FROM:<s@example.org>") == \
        ["450 4.7.1 Error: too much mail from 127.0.0.2"]
    p.wait_for_log(r"warning: Message delivery request rate limit exceeded: 3 from "
                   rf"unknown\[127\.0\.0\.2\] for service {service}")
    # Recipients likewise.
    assert a.cmd("RCPT TO:<root@postern.test>")[0].startswith("250")
    assert b.cmd("RCPT TO:<root@postern.test>")[0].startswith("250")
    assert a.cmd("RCPT TO:<root@postern.test>") == \
        ["450 4.7.1 Error: too many recipients from 127.0.0.2"]
    p.wait_for_log(r"warning: Recipient address rate limit exceeded: 3 from "
                   rf"unknown\[127\.0\.0\.2\] for service {service}")
    # AUTH commands are counted before anything else (SASL is off here,
    # so the first two are refused for that).
    assert b.cmd("AUTH PLAIN")[0].startswith("503")
    assert c.cmd("AUTH PLAIN")[0].startswith("503")
    assert a.cmd("AUTH PLAIN") == ["450 4.7.1 Error: too many AUTH commands from 127.0.0.2"]
    p.wait_for_log(r"warning: AUTH command rate limit exceeded: 3 from "
                   rf"unknown\[127\.0\.0\.2\] for service {service}")
    # mynetworks is not limited.
    insider = greeted(p.port, source=("127.0.0.1", 0))
    insider.cmd("EHLO client.example")
    for _ in range(4):
        assert insider.cmd("MAIL FROM:<s@example.org>") == ["250 2.1.0 Ok"]
        assert insider.cmd("RSET")[0].startswith("250")
    for x in clients + [insider]:
        x.close()
    assert not p.log_search(FALLBACK)


def socket_fds(pid):
    """How many sockets process ``pid`` has open."""
    n = 0
    try:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                n += os.readlink(f"/proc/{pid}/fd/{fd}").startswith("socket:")
            except OSError:
                pass
    except OSError:
        return 0
    return n


def test_anvil_killed_and_restarted(make_postern):
    p = start(make_postern, smtpd_client_connection_count_limit="2")
    first = greeted(p.port)
    second = greeted(p.port)
    old = h.wait_for(lambda: p.child_pids("anvil"), what="anvil running")
    assert len(old) == 1
    # Its sockets: the listener and the like, and one per smtpd process.
    sockets = socket_fds(old[0])
    h.kill_pid(old[0], signal.SIGKILL)
    p.wait_for_log(rf"process anvil pid {old[0]} killed by signal 9")
    # The smtpd processes see anvil go and connect to a new one at once,
    # telling it the sessions they have: master starts it (no throttling).
    new = h.wait_for(lambda: [x for x in p.child_pids("anvil") if x not in old],
                     what="a new anvil")
    h.wait_for(lambda: socket_fds(new[0]) >= sockets,
               what="both smtpd processes connected to the new anvil")
    # Nobody stalls, and the limit still counts both open sessions.
    assert first.cmd("NOOP") == ["250 2.0.0 Ok"]
    third = Raw(p.port, source=OUTSIDE)
    assert third.reply() == REFUSED
    third.close()
    assert second.cmd("QUIT")[0].startswith("221")
    second.close()
    again = greeted_soon(p)
    again.close()
    first.close()
    assert "bad command startup" not in p.log_text()


def test_anvil_stopped_does_not_stall_clients(make_postern):
    p = start(make_postern, smtpd_client_connection_count_limit="2")
    first = greeted(p.port)
    pid = h.wait_for(lambda: p.child_pids("anvil"), what="anvil running")[0]
    h.kill_pid(pid, signal.SIGSTOP)
    try:
        # anvil does not answer: smtpd gives up after its short time
        # limit and counts alone; the clients get their greetings.
        second = greeted(p.port)
        p.wait_for_log(r"warning: .*/private/anvil: timeout waiting for an answer; " + FALLBACK)
        assert first.cmd("NOOP") == ["250 2.0.0 Ok"]
        assert second.cmd("NOOP") == ["250 2.0.0 Ok"]
        second.close()
        first.close()
    finally:
        h.kill_pid(pid, signal.SIGCONT)


def test_without_anvil_service_counts_per_process(make_postern):
    """A master.cf without anvil (an old one): smtpd warns once and counts
    in its own process."""
    p = make_postern(params={"smtpd_client_connection_count_limit": "2"},
                     master_cf_omit=["anvil"])
    first = greeted(p.port)
    second = greeted(p.port)
    third = Raw(p.port, source=OUTSIDE)
    assert third.reply() == REFUSED
    third.close()
    for c in (first, second):
        c.close()
    for _ in range(3):
        c = greeted_soon(p)
        c.cmd("QUIT")
        c.close()
    lines = p.log_findall(r"warning: .*/private/anvil: connect: .*; " + FALLBACK)
    assert len(lines) == 1, lines


def test_sessions_of_a_dead_smtpd_stop_counting(make_postern):
    p = start(make_postern, smtpd_client_connection_count_limit="2")
    first = greeted(p.port)
    serving_first = int(p.wait_for_log(
        r"postfix/smtpd\[(\d+)\]: connect from unknown\[127\.0\.0\.2\]").group(1))
    second = greeted(p.port)
    third = Raw(p.port, source=OUTSIDE)
    assert third.reply() == REFUSED
    third.close()
    # The process of the first session dies: anvil sees its connection
    # close and no longer counts that session.
    h.kill_pid(serving_first, signal.SIGKILL)
    assert first.f.readline() == b""
    again = greeted_soon(p)
    assert second.cmd("NOOP") == ["250 2.0.0 Ok"]
    for c in (first, second, again):
        c.close()
    assert not p.log_search(FALLBACK)
