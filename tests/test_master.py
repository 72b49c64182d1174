"""master as an administrator meets it: reload, process limits, the
throttle on a crashing service, one master per queue, and `postern check`
preparing the queue tree."""

import os
import smtplib
import stat
import threading
import time

import postern_harness as h
from postern_harness import wait_for


def greeting(p):
    """The text of the 220 greeting."""
    s = smtplib.SMTP(timeout=10)
    try:
        code, text = s.connect("127.0.0.1", p.port)
        assert code == 220, (code, text)
        return text.decode()
    finally:
        s.close()


def test_reload_applies_main_cf_and_keeps_listening(make_postern):
    p = make_postern(params={"smtpd_banner": "$myhostname ESMTP before-reload"})
    assert "before-reload" in greeting(p)
    r = p.postconf("-e", "smtpd_banner=$myhostname ESMTP after-reload")
    assert r.returncode == 0, h.describe(r)
    # Clients keep connecting through the reload: none may be refused.
    refused = []
    stop = threading.Event()

    def knock():
        while not stop.is_set():
            try:
                greeting(p)
            except (OSError, AssertionError, smtplib.SMTPException) as e:
                refused.append(repr(e))
            time.sleep(0.02)

    t = threading.Thread(target=knock)
    t.start()
    try:
        r = p.postern("reload")
        assert r.returncode == 0, h.describe(r)
        wait_for(lambda: "after-reload" in greeting(p), timeout=20,
                 what="the new banner after reload")
    finally:
        stop.set()
        t.join()
    assert not refused, refused[:3]
    assert "reload" in p.log_text()


def test_reload_lets_a_session_in_progress_finish(make_postern, sink):
    """A client halfway through DATA when the administrator reloads gets
    its 250 from the old smtpd, which then exits; the message arrives."""
    p = make_postern(params={"relayhost": f"[127.0.0.1]:{sink.port}"})
    c = h.RawSmtp(p.port)
    try:
        assert c.reply()[0].startswith("220")
        assert c.cmd("EHLO client.example")[-1].startswith("250")
        assert c.cmd("MAIL FROM:<app@postern.test>")[0].startswith("250")
        assert c.cmd("RCPT TO:<far@remote.example>")[0].startswith("250")
        assert c.cmd("DATA")[0].startswith("354")
        c.send("Subject: across a reload\r\n\r\nfirst half\r\n")
        old = set(p.child_pids("smtpd"))
        assert old
        r = p.postern("reload")
        assert r.returncode == 0, h.describe(r)
        p.wait_for_log(r"reload: finishing 1 sessions", what="the old smtpd draining")
        # New clients are served by new processes meanwhile.
        assert "ESMTP" in greeting(p)
        assert set(p.child_pids("smtpd")) - old, "no new smtpd after reload"
        c.send("second half\r\n.\r\n")
        reply = c.reply()
        assert reply and reply[0].startswith("250"), reply
        assert c.cmd("QUIT")[0].startswith("221")
    finally:
        c.close()
    wait_for(lambda: not any(h.pid_alive(pid) for pid in old), timeout=20,
             what="the old smtpd to exit after its session")
    wait_for(lambda: len(sink.messages) == 1, timeout=30, what="the message at the sink")
    body = sink.messages[0].body.decode()
    assert "first half" in body and "second half" in body, body


def test_reload_lets_deliveries_in_flight_finish(make_postern, smtp_sink):
    """A reload while qmgr has one delivery out and one waiting: the old
    qmgr waits for the first to come back, the new one starts at once and
    sends the second. Each message arrives once and the queue empties."""
    sink = smtp_sink(["-w", "2"])  # 2 s before the reply to DATA
    p = make_postern(params={"relayhost": f"[127.0.0.1]:{sink.port}",
                             "smtp_destination_concurrency_limit": "1"})
    for i in range(2):
        code, text = p.send("app@postern.test", [f"far{i}@remote.example"],
                            f"Subject: in flight {i}\n\nx\n")
        assert code == 250, text
    wait_for(lambda: len(p.log_findall(r"\(queue active\)")) >= 2, 30,
             what="both messages in the active queue")
    old = set(p.child_pids("qmgr"))
    assert old
    r = p.postern("reload")
    assert r.returncode == 0, h.describe(r)
    p.wait_for_log(r"qmgr\[\d+\]: reload: finishing 1 deliveries in flight",
                   what="the old qmgr waiting for its delivery")
    wait_for(lambda: not any(h.pid_alive(pid) for pid in old), 30,
             what="the old qmgr to exit")
    wait_for(lambda: sink.count() >= 2, 30, what="both messages at the sink")
    wait_for(lambda: not any(p.queue_files(q) for q in ("incoming", "active", "deferred")),
             30, what="an empty queue")
    assert set(p.child_pids("qmgr")) - old, "no new qmgr after the reload"
    assert sink.count() == 2
    assert len(p.log_findall(r"status=sent")) == 2, p.log_text()
    assert not p.log_search(r"read delivery request"), p.log_text()


def test_reload_with_a_broken_master_cf_keeps_the_old_services(make_postern, sink):
    """A typo in master.cf, then `postern reload`: master says why and goes
    on with the services it had; mail still flows."""
    p = make_postern(params={"relayhost": f"[127.0.0.1]:{sink.port}"})
    before = set(p.child_pids("smtpd"))
    text = p.master_cf.read_text()
    p.master_cf.write_text(text + "broken    unix  -  -  n\n")
    r = p.postern("reload")
    assert r.returncode == 0, h.describe(r)
    p.wait_for_log(r"warning: reload: .*; keeping the old configuration",
                   what="the refused reload")
    # The old processes were not told to go.
    assert before, "no smtpd running before the reload"
    time.sleep(0.5)
    assert all(h.pid_alive(pid) for pid in before), "the old smtpd exited"
    code, text = p.send("app@postern.test", ["far@remote.example"],
                        "Subject: after a bad reload\n\nstill here\n")
    assert code == 250, text
    wait_for(lambda: len(sink.messages) == 1, timeout=30, what="the message at the sink")
    assert not p.log_search(r"reload -- version")


def test_maxproc_limits_processes(make_postern, sink):
    p = make_postern(params={"relayhost": f"[127.0.0.1]:{sink.port}"})
    # Replace the smtp service line with maxproc 1.
    text = (p.etc / "master.cf").read_text()
    lines = [("smtp      unix  -       -       n       -       1       smtp"
              if line.startswith("smtp ") and " unix " in line else line)
             for line in text.splitlines()]
    (p.etc / "master.cf").write_text("\n".join(lines) + "\n")
    assert p.postern("reload").returncode == 0
    seen = 0
    for i in range(30):
        code, text = p.send("load@postern.test", [f"r{i}@remote.example"], f"Subject: m{i}\n\nx\n")
        assert code == 250, text
        seen = max(seen, len(p.child_pids("smtp")))
    wait_for(lambda: len(sink.messages) >= 30, timeout=60, what="30 messages at the sink")
    assert seen <= 1, f"{seen} smtp processes with maxproc 1"


def test_crashing_service_is_throttled(make_postern):
    p = make_postern(params={"service_throttle_time": "60s"},
                     master_cf_extra=["broken    unix  -       -       n       -       -       /bin/false"])
    # Connecting to the service's socket makes master start the program.
    import socket
    for _ in range(5):
        c = socket.socket(socket.AF_UNIX)
        try:
            c.connect(str(p.queue / "private" / "broken"))
        finally:
            c.close()
        time.sleep(0.2)
    wait_for(lambda: "throttling" in p.log_text(), timeout=20, what="the throttle warning")
    time.sleep(1)
    starts = p.log_text().count("process /bin/false pid")
    assert starts == 1, f"/bin/false started {starts} times despite the throttle"
    # The rest of the system still works.
    assert "ESMTP" in greeting(p)


def test_one_master_per_queue(make_postern):
    p = make_postern()
    r = p.postern("start")
    assert r.returncode != 0
    assert "already running" in r.stderr, h.describe(r)
    # master itself refuses too, not only the postern command.
    r = h.run([p.cmd("master"), "-c", p.etc, "-d"], env=p.env(), timeout=20)
    assert r.returncode != 0 and "already running" in r.stderr, h.describe(r)


def test_check_creates_queue_tree(make_postern):
    p = make_postern(start=False)
    r = p.postern("check")
    assert r.returncode == 0, h.describe(r)
    for d, mode in (("incoming", 0o700), ("active", 0o700), ("deferred", 0o700),
                    ("maildrop", 0o1730), ("public", 0o710), ("private", 0o700)):
        st = os.stat(p.queue / d)
        assert stat.S_IMODE(st.st_mode) == mode, (d, oct(st.st_mode))


def test_check_refuses_a_queue_others_can_write(make_postern):
    p = make_postern(start=False)
    assert p.postern("check").returncode == 0
    for path, bad in ((p.queue / "incoming", 0o777), (p.queue, 0o775)):
        good = stat.S_IMODE(os.stat(path).st_mode)
        os.chmod(path, bad)
        try:
            for command in ("check", "start"):
                r = p.postern(command)
                assert r.returncode != 0, h.describe(r)
                assert "unsafe queue directory" in r.stderr and str(path) in r.stderr, r.stderr
                assert len(r.stderr.strip().splitlines()) <= 2, r.stderr
        finally:
            os.chmod(path, good)
    r = p.postern("check")
    assert r.returncode == 0, h.describe(r)


def test_service_on_several_addresses(make_postern):
    """inet_interfaces with two addresses: one listener each, both served
    by the same smtpd processes."""
    port = h.free_port()
    p = make_postern(params={"inet_interfaces": "127.0.0.1, 127.0.0.3"},
                     master_cf_extra=[f"{port} inet n - n - - smtpd"])
    for host in ("127.0.0.1", "127.0.0.3"):
        s = smtplib.SMTP(host, port, timeout=10)
        try:
            assert s.ehlo("client.example")[0] == 250
        finally:
            s.quit()


def sched_policies(pid):
    """The scheduling policy of each thread of `pid`, as `chrt -p` names
    it (SCHED_OTHER, SCHED_BATCH, ...)."""
    out = set()
    for tid in os.listdir(f"/proc/{pid}/task"):
        r = h.run(["chrt", "-p", tid], timeout=10)
        if r.returncode == 0:  # a thread that just ended has no policy
            out.add(r.stdout.split("scheduling policy:")[1].split()[0])
    return out


def test_daemons_run_under_the_batch_scheduling_policy(make_postern, sink):
    """The daemons of unix and fifo services, every thread of them, run
    under SCHED_BATCH (daemon_sched_batch = yes, the default); smtpd (an
    inet service, clients wait on it) and master keep the normal
    policy."""
    p = make_postern(params={"relayhost": f"[127.0.0.1]:{sink.port}"})
    code, text = p.send("a@postern.test", ["b@remote.example"], "Subject: s\n\nx\n")
    assert code == 250, text
    wait_for(lambda: sink.messages, timeout=30, what="the message at the sink")
    names = {h.proc_name(c): sched_policies(c) for c in p.child_pids()}
    for daemon in ("cleanup", "qmgr", "smtp", "pickup"):
        assert names.get(daemon) == {"SCHED_BATCH"}, names
    assert names.get("smtpd") == {"SCHED_OTHER"}, names
    assert sched_policies(p.master_pid()) == {"SCHED_OTHER"}


def test_daemon_sched_batch_no_keeps_the_normal_policy(make_postern):
    p = make_postern(params={"daemon_sched_batch": "no"})
    assert "ESMTP" in greeting(p)
    for c in p.child_pids():
        assert sched_policies(c) == {"SCHED_OTHER"}, h.proc_name(c)


def test_check_refuses_a_bad_daemon_sched_batch(make_postern):
    p = make_postern(start=False, params={"daemon_sched_batch": "sometimes"})
    r = p.postern("check")
    assert r.returncode == 1, h.describe(r)
    assert "daemon_sched_batch" in r.stderr and "yes or no" in r.stderr, h.describe(r)


def test_client_waiting_behind_a_full_smtpd_is_served(make_postern):
    """One smtpd process with room for two sessions: a third client waits
    in the listen queue, and is greeted as soon as a session ends."""
    port = h.free_port()
    p = make_postern(params={"smtpd_client_session_limit": "2"},
                     master_cf_extra=[f"127.0.0.1:{port} inet n - n - 1 smtpd"])
    first = smtplib.SMTP("127.0.0.1", port, timeout=10)
    second = smtplib.SMTP("127.0.0.1", port, timeout=10)
    third = smtplib.SMTP(timeout=20)
    greeted = []

    def connect():
        greeted.append(third.connect("127.0.0.1", port))

    t = threading.Thread(target=connect)
    t.start()
    time.sleep(1)
    assert not greeted, "a third session was served beyond the limit"
    first.quit()
    t.join(15)
    assert greeted and greeted[0][0] == 220, greeted
    second.quit()
    third.quit()
