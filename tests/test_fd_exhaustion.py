"""Out of file descriptors (issue 7, resource exhaustion): smtpd with a
small RLIMIT_NOFILE (set on the running process with prlimit(2)) and more
clients than it has descriptors for. It must keep running without
spinning, leave the excess waiting (the kernel's listen queue) or hand it
to another smtpd, and serve mail normally once the clients are gone.
"""

import os
import re
import select
import socket
import subprocess
import sys
import time

import pytest

import postern_harness as h
from postern_harness import wait_for

SENDER = "sender@example.org"
CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_ticks(pid):
    """utime + stime of a process, in clock ticks."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        data = f.read()
    fields = data[data.rfind(b")") + 2:].split()
    return int(fields[11]) + int(fields[12])


def open_fds(pid):
    return len(os.listdir(f"/proc/{pid}/fd"))


def banner(sock, timeout):
    """The first reply line a server sent within ``timeout``, or None."""
    r, _, _ = select.select([sock], [], [], timeout)
    if not r:
        return None
    try:
        data = sock.recv(4096)
    except OSError:
        return b""
    return data


def banners(socks, timeout, settle=None):
    """{socket: first data} for those of ``socks`` that got something
    within ``timeout`` seconds in all (or, with ``settle``, within that
    many seconds after the first one did)."""
    out = {}
    deadline = time.monotonic() + timeout
    while len(out) < len(socks):
        if out and settle is not None:
            deadline = min(deadline, first_at + settle)
        left = deadline - time.monotonic()
        if left <= 0:
            break
        r, _, _ = select.select([s for s in socks if s not in out], [], [], left)
        if r and not out:
            first_at = time.monotonic()
        for s in r:
            try:
                out[s] = s.recv(4096)
            except OSError:
                out[s] = b""
    return out


def start_limited(make_postern, sink, maxproc):
    p = make_postern(params={"relayhost": f"[127.0.0.1]:{sink.port}"}, start=False)
    cf = (p.etc / "master.cf").read_text()
    line = f"127.0.0.1:{p.port} inet n - n - - smtpd"
    assert line in cf
    p.write_file("etc/master.cf", cf.replace(
        line, f"127.0.0.1:{p.port} inet n - n - {maxproc} smtpd"))
    p.start()
    return p


def starve_smtpd(p):
    """Connects once so that smtpd runs, then gives that smtpd only a few
    descriptors more than it has open. Returns (pid, the connection)."""
    first = socket.create_connection(("127.0.0.1", p.port), timeout=10)
    assert (banner(first, 10) or b"").startswith(b"220"), "no banner"
    pids = wait_for(lambda: p.child_pids("smtpd"), 10, what="smtpd")
    assert len(pids) == 1, pids
    pid = pids[0]
    limit = open_fds(pid) + 6
    set_nofile(pid, limit)
    with open(f"/proc/{pid}/limits") as f:
        line = next(x for x in f if x.startswith("Max open files"))
    assert line.split()[3:5] == [str(limit), str(limit)], line
    return pid, first


def set_nofile(pid, limit):
    """prlimit(2) on smtpd: allowed to a process with smtpd's own uid and
    gid (root may lack CAP_SYS_RESOURCE in a container)."""
    st = os.stat(f"/proc/{pid}")
    code = ("import resource, sys; resource.prlimit(int(sys.argv[1]), "
            "resource.RLIMIT_NOFILE, (int(sys.argv[2]), int(sys.argv[2])))")
    kw = {}
    if os.getuid() != st.st_uid:
        kw = dict(user=st.st_uid, group=st.st_gid, extra_groups=[])
    r = subprocess.run([sys.executable, "-c", code, str(pid), str(limit)],
                       capture_output=True, text=True, timeout=30, **kw)
    if r.returncode != 0:
        pytest.skip(f"cannot lower smtpd's RLIMIT_NOFILE here: {r.stderr.strip()}")


def test_smtpd_out_of_descriptors_waits_and_recovers(make_postern, sink):
    """One smtpd (maxproc 1): what it cannot accept waits in the listen
    queue; it does not spin, does not die, and takes the waiting clients
    as soon as descriptors come back."""
    p = start_limited(make_postern, sink, maxproc=1)
    pid, first = starve_smtpd(p)
    conns = [first]
    try:
        for _ in range(30):
            conns.append(socket.create_connection(("127.0.0.1", p.port), timeout=10))
        seen = banners(conns[1:], 3)
        answered = [c for c in conns[1:] if seen.get(c, b"").startswith(b"220")]
        waiting = [c for c in conns[1:] if c not in answered]
        assert waiting, "every connection was served: the limit did not bite"
        assert len(answered) < 30
        p.wait_for_log(r"smtpd\[\d+\]: warning: accept connection: .*(Too many open files|"
                       r"not accepting more)", timeout=10)
        # No busy loop: over two seconds the starved smtpd uses a small
        # part of one CPU.
        t0 = cpu_ticks(pid)
        time.sleep(2)
        used = cpu_ticks(pid) - t0
        assert used < CLK_TCK // 2, f"smtpd used {used} ticks in 2 s"
        assert h.pid_alive(pid) and p.child_pids("smtpd") == [pid]
        # The clients it holds still get answers.
        for c in answered[:3] + [first]:
            c.sendall(b"NOOP\r\n")
            assert (banner(c, 10) or b"").startswith(b"250")
        # Descriptors come back: the waiting clients get their banner from
        for c in answered + [first]:
            c.sendall(b"QUIT\r\n")
            c.close()
            conns.remove(c)
        # the same smtpd, as many at a time as it has room for.
        rounds = 0
        while waiting:
            rounds += 1
            assert rounds <= 31, "no progress"
            got = banners(waiting, 15, settle=1)
            assert got, f"{len(waiting)} clients still wait"
            for c, g in got.items():
                assert g.startswith(b"220"), g
                c.sendall(b"QUIT\r\n")
                c.close()
                conns.remove(c)
                waiting.remove(c)
        assert rounds >= 2, "the excess never had to wait"
    finally:
        for c in conns:
            c.close()
    assert p.child_pids("smtpd") == [pid], "smtpd was restarted"
    # And mail flows.
    tok = "pt-fd-" + str(time.time_ns())
    code, text = p.send(SENDER, ["rcpt@remote.test"], f"Subject: {tok}\n\nafter the storm\n")
    assert code == 250, text
    sink.wait_for(tok)
    assert not p.log_search(r"smtpd\[\d+\]: (fatal|panic)"), p.log_tail()


def test_starved_smtpd_hands_excess_to_another(make_postern, sink):
    """With room for more processes, the starved smtpd says busy and
    master starts another one for the clients that wait."""
    p = start_limited(make_postern, sink, maxproc=4)
    pid, first = starve_smtpd(p)
    conns = [first]
    try:
        for _ in range(30):
            conns.append(socket.create_connection(("127.0.0.1", p.port), timeout=10))
        got = banners(conns[1:], 15)
        assert len(got) == 30 and all(g.startswith(b"220") for g in got.values()), got
        others = [q for q in p.child_pids("smtpd") if q != pid]
        assert others, "no second smtpd"
        t0 = cpu_ticks(pid)
        time.sleep(2)
        assert cpu_ticks(pid) - t0 < CLK_TCK // 2
        assert h.pid_alive(pid)
    finally:
        for c in conns:
            c.close()
    tok = "pt-fd2-" + str(time.time_ns())
    code, text = p.send(SENDER, ["rcpt@remote.test"], f"Subject: {tok}\n\nfine\n")
    assert code == 250, text
    sink.wait_for(tok)
    assert not re.search(r"smtpd\[\d+\]: (fatal|panic)", p.log_text())
