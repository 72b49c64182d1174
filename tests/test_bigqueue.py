"""Issue #19 point 7, queue scale, at a small scale: 20,000 deferred
messages for 500 sites (dnsmasq gives each its own MX host), a suspended
site's backlog among them, written straight into ``deferred/`` as cleanup
writes queue files (``mkqueue``, common/examples/mkqueue.rs) with their
retry times as mtimes.

qmgr indexes ``deferred/`` by retry time once at start (one listing, one
stat per file), then takes each file when its retry time comes and sleeps
in between: an idle queue with a suspended backlog costs it no CPU, and a
message goes out when it is due, not at the next ``queue_run_delay``.
``postern resume`` finds the site's mail through its domain's flush log
(``flush/DOMAIN``, which mkqueue writes as qmgr would have when it
deferred the messages), not by reading every deferred envelope.
The million-message run is bench/bigqueue's.
"""

import os
import time

import pytest

import postern_harness as h

SITES = 500


def mkqueue_binary():
    path = h.BIN_DIR / "examples" / "mkqueue"
    if not path.exists():
        pytest.fail(f"{path} missing: cargo build --examples -p postern-common "
                    "(scripts/test builds the examples)")
    return path


def mkqueue(p, n, domain, retry, sites=0, spread=0):
    args = [str(mkqueue_binary()), "-c", str(p.etc), "-n", str(n), "-j", "2", "-l", "512",
            "-r", str(retry), "--spread", str(spread), "--domain", domain]
    if sites:
        args += ["--sites", str(sites)]
    r = h.run(args, timeout=600)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(f"queued {n} "), r.stdout


def cpu_seconds(pid):
    """User + system CPU time of a process (all its threads)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def big_postern(make_postern, dnsmasq, sink, extra_domains, **params):
    """A stopped Postern whose 500 site domains (siteK.big.test, MX
    mxK.big.test) and `extra_domains` (MX mx.DOMAIN) all lead to `sink`,
    with a policy for every site."""
    args = ["--local=/test/"]
    routes = []
    for k in range(SITES):
        d = f"site{k}.big.test"
        args += [f"--mx-host={d},mx{k}.big.test,10", f"--host-record=mx{k}.big.test,127.0.0.1"]
        routes.append(f"{d} smtp:{d}:{sink.port}")
    for d in extra_domains:
        args += [f"--mx-host={d},mx.{d},10", f"--host-record=mx.{d},127.0.0.1"]
        routes.append(f"{d} smtp:{d}:{sink.port}")
    dns = dnsmasq(args)
    base = {
        "dns_resolver_addresses": f"127.0.0.1:{dns.port}",
        "transport_maps": lambda p: f"texthash:{p.etc}/transport",
        "delivery_policy_maps": lambda p: f"texthash:{p.etc}/delivery_policy",
        # Nothing of the backlog comes due or expires during a test.
        "maximal_queue_lifetime": "5d",
        "bounce_queue_lifetime": "5d",
    }
    base.update(params)
    p = make_postern(base, files={"etc/transport": "\n".join(routes) + "\n",
                                  "etc/delivery_policy": "* max_connections=2\n"},
                     start=False)
    # The queue tree, as `postern start` makes it, before files go in.
    p._prepare()
    r = p.postern("check")
    assert r.returncode == 0, r.stderr
    return p


def wait_indexed(p, n, timeout=180):
    m = p.wait_for_log(rf"qmgr\[\d+\]: deferred queue indexed: (\d+) file\(s\) listed",
                       timeout=timeout, what="qmgr's index of deferred/")
    assert int(m.group(1)) == n, p.log_tail()


def test_a_suspended_backlog_costs_no_cpu_until_it_resumes(make_postern, dnsmasq, smtp_sink):
    """19,000 messages for 500 sites due in an hour or later, and 1,000 for
    a site that `postern suspend` (before qmgr has seen mail for it) holds
    for a day. With queue_run_delay = 1s, which made qmgr list and stat
    all 20,000 files every second, qmgr uses (almost) no CPU for 20
    seconds and delivers nothing; `postern resume` brings the suspended
    site's 1,000 out at once."""
    sink = smtp_sink()
    p = big_postern(make_postern, dnsmasq, sink, ["hold.test"], queue_run_delay="1s")
    mkqueue(p, 19000, "big.test", retry=3600, sites=SITES, spread=3600)
    # What waits for a suspended site has the suspension's end as its
    # retry time.
    mkqueue(p, 1000, "hold.test", retry=86400)
    p.start()
    wait_indexed(p, 20000)
    # A site qmgr has seen no mail for yet: found by its MX host.
    r = p.postern("suspend", "hold.test", "1d")
    assert r.returncode == 0, r.stderr
    assert "mx.hold.test suspended" in r.stdout + r.stderr, r
    q = p.postern("queues")
    assert "hold.test" in q.stdout and "suspended" in q.stdout, q.stdout

    time.sleep(2)
    pid = p.qmgr_pid()
    before = cpu_seconds(pid)
    time.sleep(20)
    used = cpu_seconds(pid) - before
    print(f"qmgr CPU while idle for 20 s with 20,000 deferred: {used:.2f} s")
    assert p.qmgr_pid() == pid
    assert used < 0.5, f"qmgr used {used:.2f} s of CPU in 20 s while idle"
    assert sink.count() == 0
    assert len(p.queue_files("deferred")) == 20000
    assert not p.log_search(r"status=sent"), p.log_tail()

    # mkqueue listed each message in its domain's flush log, as qmgr
    # does when it defers one: the resume reads that log, not deferred/.
    log = p.queue / "flush" / "hold.test"
    assert len(log.read_text().split()) == 1000
    assert len(list((p.queue / "flush").iterdir())) == SITES + 1
    r = p.postern("resume", "hold.test")
    assert r.returncode == 0, r.stderr
    p.wait_for_log(r"qmgr\[\d+\]: resume \S+: 1000 deferred message\(s\) due now, from the "
                   r"flush logs of 1 domain\(s\) \(1000 listed\)", timeout=120,
                   what="the resume's count from the flush log")
    h.wait_for(lambda: sink.count() >= 1000, 240, interval=0.5,
               what=f"the resumed site's 1,000 messages at the sink (have {sink.count()})")
    assert sink.count() == 1000
    assert log.read_text() == ""
    assert len(p.log_findall(r"to=<u\d+@hold\.test>.*status=sent")) == 1000
    assert not p.log_search(r"to=<u\d+@site\d+\.big\.test>.*status=sent"), p.log_tail()
    assert len(p.queue_files("deferred")) == 19000


def test_the_next_due_message_goes_out_when_due(make_postern, dnsmasq, smtp_sink):
    """With the default queue_run_delay (300s), 3 messages due 45 seconds
    after they were queued, behind 20,000 that are not due, go out at
    their retry time: qmgr sleeps until the earliest retry time in its
    index, not until its next run of the deferred queue."""
    sink = smtp_sink()
    p = big_postern(make_postern, dnsmasq, sink, ["due.test"])
    mkqueue(p, 20000, "big.test", retry=7200, sites=SITES, spread=3600)
    queued = time.time()
    mkqueue(p, 3, "due.test", retry=45)
    p.start()
    wait_indexed(p, 20003)
    assert time.time() < queued + 44, "qmgr indexed the queue after the messages were due"
    assert sink.count() == 0
    h.wait_for(lambda: sink.count() >= 3, 120, interval=0.2,
               what=f"the 3 due messages at the sink (have {sink.count()})")
    arrived = time.time()
    # mtimes have whole seconds: due within a second of queued + 45.
    assert arrived >= queued + 44, f"sent {arrived - queued:.1f} s after queueing"
    assert arrived <= queued + 45 + 20, f"sent {arrived - queued:.1f} s after queueing"
    assert len(p.log_findall(r"to=<u\d+@due\.test>.*status=sent")) == 3
    assert sink.count() == 3
    assert len(p.queue_files("deferred")) == 20000
