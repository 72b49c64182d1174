"""Issue #20 point 5: site limits shared by a cluster of Postern nodes
through Redis (`delivery_policy_redis`).

Two Postern instances on this machine are the cluster; one redis-server
(Debian's), started here on a free loopback port and stopped by PID, is
what they share; one scripted receiver (tests/throttle_receiver.py),
capped at 5 connections, stands for the provider both deliver to; dnsmasq
gives its domain an MX host, so that both nodes find the same site.
"""

import re
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import pytest

import postern_harness as h

SENDER = "sender@example.org"
SITE = "mx.cl.test"
REDIS = shutil.which("redis-server") or "/usr/bin/redis-server"
REDIS_CLI = shutil.which("redis-cli") or "/usr/bin/redis-cli"


class RedisServer:
    """redis-server on 127.0.0.1 and a free port, without persistence
    (a restart starts empty, as after a crash)."""

    def __init__(self):
        self.port = h.free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="postern-redis-"))
        self.proc = None

    def start(self, timeout=10):
        self.proc = subprocess.Popen(
            [REDIS, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(self.dir), "--protected-mode", "no",
             "--logfile", str(self.dir / "redis.log")],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        h.wait_for(lambda: self.cli("PING").strip() == "PONG", timeout,
                   what=f"redis-server answering on port {self.port}")
        return self

    def kill(self):
        """Dies at once (SIGKILL), as a crashed server."""
        if self.proc is not None:
            h.kill_pid(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
            self.proc = None

    def stop(self):
        if self.proc is not None:
            h.stop_process(self.proc)
            self.proc = None

    def cli(self, *args):
        r = h.run([REDIS_CLI, "-h", "127.0.0.1", "-p", str(self.port), *args], timeout=10)
        return r.stdout if r.returncode == 0 else ""


@pytest.fixture
def redis():
    if not Path(REDIS).exists():
        pytest.skip("redis-server is not installed (scripts/test installs redis-server)")
    started = []

    def make():
        r = RedisServer().start()
        started.append(r)
        return r

    yield make
    for r in started:
        r.stop()
        shutil.rmtree(r.dir, ignore_errors=True)


def cluster(make_postern, dns, rx, redis_port, policy, size=2, **params):
    """Two nodes with the same configuration."""
    base = {
        "dns_resolver_addresses": f"127.0.0.1:{dns.port}",
        "transport_maps": lambda p: f"texthash:{p.etc}/transport",
        "delivery_policy_maps": lambda p: f"texthash:{p.etc}/delivery_policy",
        "delivery_policy_redis": f"127.0.0.1:{redis_port}",
        "delivery_policy_cluster_size": str(size),
    }
    base.update(params)
    files = {"etc/transport": f"cl.test smtp:cl.test:{rx.port}\n",
             "etc/delivery_policy": f"cl.test {policy}\n"}
    return [make_postern(base, files=files) for _ in range(2)]


def dns_for(dnsmasq):
    return dnsmasq(["--local=/test/", f"--mx-host=cl.test,{SITE},10",
                    f"--host-record={SITE},127.0.0.1"])


def inject(p, n, token):
    """One SMTP session into `p`, one message per recipient; each
    message's Subject is `token N`."""
    h.send_each(p, [f"u{i}@cl.test" for i in range(n)], token, SENDER, timeout=120)


def inject_all(jobs):
    """[(postern, n, token)] injected side by side."""
    errors = []

    def run(job):
        try:
            inject(*job)
        except Exception as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=run, args=(j,)) for j in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert not errors, errors


def subjects(rx, token=None):
    out = []
    for a in list(rx.accepted):
        m = re.search(rb"^Subject: (.*?)\r?$", a.content, re.M)
        if m:
            s = m.group(1).decode()
            if token is None or s.startswith(token + " "):
                out.append((a.time, s))
    return out


def wait_count(rx, n, timeout):
    h.wait_for(lambda: rx.count() >= n, timeout, interval=0.2,
               what=f"{n} messages at the receiver (have {rx.count()})")


def test_two_nodes_share_the_connection_cap_and_the_message_rate(make_postern, dnsmasq,
                                                                  receivers, redis):
    """max_connections=5 max_message_rate=20/s for the site, on two
    nodes: the receiver (which answers a 6th connection with 421 and
    more than 46 messages in 2 s with 451) never sees more than 5
    connections at once nor more than 20/s between them, and both nodes
    deliver. Each node alone would take 4 connections and 20/s (a
    delivery takes 0.2 s): without a shared count the pair would open 8
    and send 40/s."""
    rx = receivers(max_connections=5, max_rate=46, rate_window=2.0, data_delay=0.2)
    r = redis()
    a, b = cluster(make_postern, dns_for(dnsmasq), rx, r.port,
                   "max_connections=5 max_message_rate=20/s")
    n = 200
    ta, tb = "pt-cl-a-" + str(time.time()), "pt-cl-b-" + str(time.time())
    inject_all([(a, n, ta), (b, n, tb)])
    wait_count(rx, 2 * n, timeout=2 * n / 20 + 90)
    print("receiver:", rx.summary())
    assert rx.max_concurrent <= 5, rx.summary()
    assert rx.temp_failures() == [], rx.temp_failures()[:5]
    assert rx.max_in_window(2.0) <= 46, rx.summary()
    assert rx.rate() <= 22.0, rx.summary()
    # Both nodes delivered all the way through, side by side.
    got_a, got_b = subjects(rx, ta), subjects(rx, tb)
    assert len(got_a) == n and len(got_b) == n, (len(got_a), len(got_b))
    overlap_end = min(max(t for t, _ in got_a), max(t for t, _ in got_b))
    early_b = [t for t, _ in got_b if t < overlap_end]
    assert len(early_b) >= n / 4, "the nodes did not deliver side by side"
    # The counting was Redis's.
    assert r.cli("EXISTS", "postern:{%s}:msg" % SITE).strip() == "1"
    for p in (a, b):
        assert p.log_search(r"delivery_policy_redis .*site limits shared by the cluster"), \
            p.log_tail()
        assert not p.log_search(r"status=deferred"), p.log_tail()


def test_redis_dies_mid_run_and_comes_back(make_postern, dnsmasq, receivers, redis):
    """Redis is killed while both nodes deliver: each keeps going at its
    share (2 connections, 10/s: half the limits), logs it, and nothing is
    lost or sent twice; Redis restarted (empty) on the same port is
    found again, each node writes its connections back, and the limits
    are shared again."""
    rx = receivers(max_connections=5, max_rate=46, rate_window=2.0, data_delay=0.2)
    r = redis()
    a, b = cluster(make_postern, dns_for(dnsmasq), rx, r.port,
                   "max_connections=5 max_message_rate=20/s")
    n = 250
    ta, tb = "pt-clk-a-" + str(time.time()), "pt-clk-b-" + str(time.time())
    t0 = time.time()
    inject_all([(a, n, ta), (b, n, tb)])
    print(f"injected in {time.time() - t0:.1f}s; {rx.summary()}")
    wait_count(rx, 60, 60)
    r.kill()
    killed = time.time()
    for p in (a, b):
        p.wait_for_log(r"delivery_policy_redis .*each site keeps to its local share \(1/2",
                       timeout=10, what="the fallback logged")
    before = rx.count()
    time.sleep(6)
    during = rx.count() - before
    # Mail keeps flowing at the shares: 2 + 2 connections, 10/s + 10/s.
    assert during >= 6 * 5, f"only {during} messages in 6 s without Redis"
    outage = [t for t in rx.times() if killed + 1 <= t <= killed + 6]
    assert len(outage) <= 5 * 20 + 5, len(outage)
    print(f"outage: {during} in 6 s")
    r.start()
    restarted = time.time()
    for p in (a, b):
        p.wait_for_log(r"delivery_policy_redis .*Redis answers again: site limits shared",
                       timeout=15, what="the shared limits back")
    # The new (empty) server is what counts again.
    h.wait_for(lambda: r.cli("EXISTS", "postern:{%s}:msg" % SITE).strip() == "1", 10,
               what="the message rate counted in Redis again")
    print(f"shared again after {time.time() - restarted:.1f}s; {rx.summary()}")
    wait_count(rx, 2 * n, timeout=2 * n / 10 + 60)
    print(f"all delivered {time.time() - restarted:.1f}s after the restart")
    time.sleep(2)
    got = [s for _, s in subjects(rx)]
    assert sorted(got) == sorted([f"{ta} {i}" for i in range(n)] + [f"{tb} {i}" for i in range(n)]), \
        "lost or duplicated messages"
    crowded = [round(t - killed, 2) for t, _, _ in rx.connections if rx.concurrency_at(t) > 5]
    assert rx.max_concurrent <= 5, (rx.summary(), "s after the kill:", crowded,
                                    "restart at", round(restarted - killed, 2))
    assert rx.temp_failures() == [], rx.temp_failures()[:5]
    after = [t for t in rx.times() if t >= restarted + 2]
    if len(after) > 10:
        assert (len(after) - 1) / (after[-1] - after[0]) <= 22.0
    print(f"during the outage: {during} in 6 s; {rx.summary()}")


def test_a_suspension_on_one_node_stops_the_other_within_a_second(make_postern, dnsmasq,
                                                                  receivers, redis):
    """`postern suspend` on node A: node B, which has a backlog for the
    site, sends nothing more from one second after the command returned;
    `postern resume` on A lets B go again."""
    rx = receivers(max_connections=5, data_delay=0.1)
    r = redis()
    a, b = cluster(make_postern, dns_for(dnsmasq), rx, r.port,
                   "max_connections=4 max_message_rate=10/s")
    tb = "pt-cls-b-" + str(time.time())
    inject(a, 1, "pt-cls-a-warm")
    wait_count(rx, 1, 30)
    inject(b, 150, tb)
    h.wait_for(lambda: len(subjects(rx, tb)) >= 10, 30, what="B delivering")
    res = a.postern("suspend", "cl.test", "10m", "maintenance window")
    assert res.returncode == 0, h.describe(res)
    done = time.time()
    b.wait_for_log(r"site mx\.cl\.test: suspension from cluster node", timeout=5,
                   what="B told of the suspension")
    time.sleep(3)
    late = [t - done for t, _ in subjects(rx, tb) if t > done + 1.0]
    assert not late, f"B delivered {len(late)} messages after the suspension: {late[:5]}"
    q = b.postern("queues")
    assert "mode=suspended" in q.stdout and "maintenance window" in q.stdout, q.stdout
    sent = len(subjects(rx, tb))
    assert sent < 150
    res = a.postern("resume", "cl.test")
    assert res.returncode == 0, h.describe(res)
    b.wait_for_log(r"site mx\.cl\.test: resumed by cluster node", timeout=5,
                   what="B told of the resumption")
    h.wait_for(lambda: len(subjects(rx, tb)) >= 150, 60, what="B's backlog delivered")
    assert len({s for _, s in subjects(rx, tb)}) == 150


def test_a_dead_nodes_connections_expire(make_postern, dnsmasq, receivers, redis):
    """Node A's qmgr is killed with connections in flight: its count in
    Redis stays until its lease runs out (nothing refreshes it), then the
    next node to ask drops it."""
    rx = receivers(max_connections=5, data_delay=3.0)
    r = redis()
    a, b = cluster(make_postern, dns_for(dnsmasq), rx, r.port, "max_connections=3")
    inject(a, 3, "pt-cld-a")
    conns = "postern:{%s}:conns" % SITE

    def counts():
        out = r.cli("HGETALL", conns).split()
        return dict(zip(out[0::2], (int(x) for x in out[1::2])))

    h.wait_for(lambda: sum(counts().values()) == 3, 20, what="A holding 3 connections")
    (old_node,) = counts().keys()
    qmgr = a.qmgr_pid()
    h.kill_pid(qmgr, signal.SIGKILL)
    killed = time.time()
    # B asks all the while: the dead node's 3 count until they expire.
    inject(b, 3, "pt-cld-b")
    h.wait_for(lambda: old_node not in counts(), 30, interval=0.2,
               what="the dead node's connections released")
    gone = time.time() - killed
    assert 5 <= gone <= 15, gone  # the 10 s lease, less the time since its last refresh
    try:
        h.wait_for(lambda: len(subjects(rx, "pt-cld-b")) == 3, 30, what="B's mail delivered")
    except AssertionError:
        print(rx.summary(), b.log_tail(60))
        raise
