"""Issue #19: sites and traffic shaping in qmgr (`delivery_policy_maps`).

A scripted throttling receiver (tests/throttle_receiver.py) stands for a
big mailbox provider; dnsmasq gives the test domains their MX hosts, which
qmgr looks up itself to find each domain's site.
"""

import json
import os
import re
import time
from pathlib import Path

import pytest

import postern_harness as h

SENDER = "sender@example.org"


def inject(p, rcpts, token):
    """One SMTP session into Postern, one message per recipient in `rcpts`."""
    h.send_each(p, rcpts, token, SENDER)


def wait_count(rx, n, timeout):
    h.wait_for(lambda: rx.count() >= n, timeout, interval=0.2,
               what=f"{n} messages at the receiver (have {rx.count()})")


def policy_postern(make_postern, dns, transport_table, policy_text, **params):
    base = {
        "dns_resolver_addresses": f"127.0.0.1:{dns.port}",
        "transport_maps": lambda p: f"texthash:{p.etc}/transport",
        "delivery_policy_maps": lambda p: f"texthash:{p.etc}/delivery_policy",
    }
    base.update(params)
    return make_postern(base, files={"etc/transport": transport_table,
                                     "etc/delivery_policy": policy_text})


def test_connection_cap_and_message_rate_hold(make_postern, dnsmasq, receivers):
    """max_connections=3 max_message_rate=20/s: 2,000 messages arrive over
    never more than 3 connections at once, at 20/s within 10%, and the
    receiver (which refuses a 4th connection, and more than 46 messages in
    any 2 seconds: 20/s with room for the arrival jitter of loopback
    sessions, but not for a burst) never has to answer 4xx."""
    rx = receivers(max_connections=3, max_rate=46, rate_window=2.0)
    dns = dnsmasq(["--local=/test/", "--mx-host=shaped.test,mx.shaped.test,10",
                   "--host-record=mx.shaped.test,127.0.0.1"])
    p = policy_postern(make_postern, dns, f"shaped.test smtp:shaped.test:{rx.port}\n",
                       "shaped.test max_connections=3 max_message_rate=20/s\n")
    n = 2000
    token = "pt-shape-" + str(time.time())
    inject(p, [f"u{i}@shaped.test" for i in range(n)], token)
    wait_count(rx, n, timeout=n / 20 + 90)
    assert rx.temp_failures() == [], rx.temp_failures()[:5]
    assert rx.max_concurrent <= 3, rx.summary()
    rate = rx.rate()
    assert abs(rate - 20.0) <= 2.0, rx.summary()
    assert rx.max_in_window(2.0) <= 46, rx.summary()
    assert rx.max_in_window(1.0) <= 26, rx.summary()
    print("receiver:", rx.summary())
    assert not p.log_search(r"status=deferred"), p.log_tail()


def test_domains_with_the_same_mx_hosts_share_one_site(make_postern, dnsmasq, receivers):
    """a.test and b.test have the same MX host: one site, one limit of 2
    connections between them; c.test has another MX host: a site of its
    own, with its own 2 connections at the same time."""
    shared = receivers(data_delay=0.4)
    other = receivers(data_delay=0.4)
    dns = dnsmasq(["--local=/test/",
                   "--mx-host=a.test,mx.shared.test,10",
                   "--mx-host=b.test,mx.shared.test,10",
                   "--mx-host=c.test,mx.other.test,10",
                   "--host-record=mx.shared.test,127.0.0.1",
                   "--host-record=mx.other.test,127.0.0.1"])
    table = (f"a.test smtp:a.test:{shared.port}\n"
             f"b.test smtp:b.test:{shared.port}\n"
             f"c.test smtp:c.test:{other.port}\n")
    p = policy_postern(make_postern, dns, table, "* max_connections=2\n")
    rcpts = [f"u{i}@{d}" for i in range(12) for d in ("a.test", "b.test", "c.test")]
    inject(p, rcpts, "pt-site")
    wait_count(shared, 24, 120)
    wait_count(other, 12, 120)
    # a.test and b.test: 2 at once between them (not 2 each).
    assert shared.max_concurrent == 2, shared.summary()
    # c.test: its own 2, while the shared site had its 2.
    assert other.max_concurrent == 2, other.summary()
    together = max(shared.concurrency_at(t) + other.concurrency_at(t)
                   for t, _, _ in shared.connections + other.connections)
    assert together >= 3, (shared.summary(), other.summary())
    # Both domains of the shared site went over the same connections.
    peers_a = {m.peer for m in shared.accepted if m.rcpts[0].endswith("@a.test")}
    peers_b = {m.peer for m in shared.accepted if m.rcpts[0].endswith("@b.test")}
    assert peers_a & peers_b, "a.test and b.test never shared a connection"


def test_unknown_policy_setting_is_an_error_at_check(make_postern, dnsmasq):
    dns = dnsmasq(["--local=/test/"])
    p = make_postern({"dns_resolver_addresses": f"127.0.0.1:{dns.port}",
                      "delivery_policy_maps": lambda p: f"texthash:{p.etc}/delivery_policy"},
                     files={"etc/delivery_policy": "example.com max_conections=2\n"},
                     start=False)
    r = p.postern("check")
    assert r.returncode == 1, r
    assert "max_conections" in (r.stdout + r.stderr), r


def rules_postern(make_postern, dns, rx, domain, policy, rules, **params):
    base = {
        "dns_resolver_addresses": f"127.0.0.1:{dns.port}",
        "transport_maps": lambda p: f"texthash:{p.etc}/transport",
        "delivery_policy_maps": lambda p: f"texthash:{p.etc}/delivery_policy",
        "delivery_reply_rules": lambda p: f"regexp:{p.etc}/reply_rules",
        "minimal_backoff_time": "2s",
        "maximal_backoff_time": "4s",
        "queue_run_delay": "1s",
    }
    base.update(params)
    return make_postern(base, files={"etc/transport": f"{domain} smtp:{domain}:{rx.port}\n",
                                     "etc/delivery_policy": f"{domain} {policy}\n",
                                     "etc/reply_rules": rules})


def test_reputation_mode_and_a_suspend_rule(make_postern, dnsmasq, receivers):
    """The receiver answers [TS04] for a while; the suspend= rule stops
    every attempt (at most one more per connection already open),
    `postern queues` shows the site suspended with the rule and the
    reply, and delivery resumes by itself when the suspension is over."""
    rx = receivers()
    dns = dnsmasq(["--local=/test/", "--mx-host=rep.test,mx.rep.test,10",
                   "--host-record=mx.rep.test,127.0.0.1"])
    p = rules_postern(make_postern, dns, rx, "rep.test",
                      "max_connections=2 max_message_rate=20/s",
                      "/\\[TS0[1-4]\\]/ suspend=8s class=throttled\n")
    inject(p, [f"warm{i}@rep.test" for i in range(5)], "pt-rep-warm")
    wait_count(rx, 5, 30)
    rx.reputation(3)
    started = time.time()
    inject(p, [f"u{i}@rep.test" for i in range(20)], "pt-rep")
    h.wait_for(lambda: p.log_search(r"site .*rep.*: suspended for 8s"), 20,
               what="the site suspended")
    out = p.postern("queues")
    assert out.returncode == 0, out
    assert "mode=suspended" in out.stdout, out.stdout
    assert "[TS04]" in out.stdout and "suspend=8s" in out.stdout, out.stdout
    js = [json.loads(line) for line in p.postern("queues", "-j").stdout.splitlines()]
    site = next(s for s in js if "rep.test" in s["domains"])
    assert site["mode"] == "suspended" and "[TS04]" in site["reason"], site
    # Everything arrives once the suspension is over, without more tries
    # in between.
    wait_count(rx, 25, 60)
    ts04 = [r for r in rx.replies if "[TS04]" in r[1]]
    assert 1 <= len(ts04) <= 2, ts04  # at most one per open connection
    after = [a.time for a in rx.accepted if a.rcpts[0].startswith("u")]
    assert min(after) >= started + 7.0, (min(after) - started)
    assert p.log_search(r"site .*rep.*: resumed"), p.log_tail()


def svg_plot(path, series, title, t0):
    """A small SVG line chart: series = {label: [(x, y), ...]}."""
    width, height, pad = 720, 320, 40
    xs = [x for pts in series.values() for x, _ in pts] or [0, 1]
    ys = [y for pts in series.values() for _, y in pts] or [0, 1]
    xmax, ymax = max(xs) or 1, max(ys) * 1.1 or 1
    colors = ["#1f77b4", "#d62728", "#2ca02c"]
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}">',
           f'<text x="{pad}" y="20" font-family="sans-serif" font-size="14">{title}</text>',
           f'<line x1="{pad}" y1="{height - pad}" x2="{width - 10}" y2="{height - pad}" stroke="black"/>',
           f'<line x1="{pad}" y1="30" x2="{pad}" y2="{height - pad}" stroke="black"/>',
           f'<text x="{width // 2}" y="{height - 8}" font-size="12">seconds</text>',
           f'<text x="2" y="40" font-size="12">{ymax:.0f}/s</text>']
    for i, (label, pts) in enumerate(series.items()):
        coords = " ".join(f"{pad + (x / xmax) * (width - pad - 10):.1f},"
                          f"{height - pad - (y / ymax) * (height - pad - 30):.1f}" for x, y in pts)
        out.append(f'<polyline fill="none" stroke="{colors[i % 3]}" stroke-width="2" points="{coords}"/>')
        out.append(f'<text x="{width - 200}" y="{40 + 16 * i}" font-size="12" fill="{colors[i % 3]}">{label}</text>')
    out.append("</svg>")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(out) + "\n")


def test_backoff_rule_rate_falls_and_climbs_back(make_postern, dnsmasq, receivers):
    """A struggling receiver (5 messages/s, `451 4.7.1 rate limited` over
    that) and a `backoff` rule: the rate it sees falls from 20/s to what it
    takes; when it recovers, the rate climbs back step by step. Plotted
    into bench/results/backoff-rate.svg from the receiver's timestamps."""
    rx = receivers(max_rate=5)
    dns = dnsmasq(["--local=/test/", "--mx-host=bo.test,mx.bo.test,10",
                   "--host-record=mx.bo.test,127.0.0.1"])
    p = rules_postern(make_postern, dns, rx, "bo.test",
                      "max_connections=2 max_message_rate=20/s backoff_recover_after=10",
                      "/rate limited/ backoff class=throttled\n")
    n = 700
    t0 = time.time()
    inject(p, [f"u{i}@bo.test" for i in range(n)], "pt-bo")
    time.sleep(max(0.0, t0 + 15 - time.time()))
    rx.max_rate = 0  # the receiver has recovered
    recovered = time.time()
    wait_count(rx, n, 180)
    ts = sorted(rx.times())
    def rate_between(a, b):
        return sum(1 for t in ts if a <= t < b) / (b - a)
    struggling = rate_between(t0 + 8, t0 + 15)
    end = ts[-1]
    # The last seconds before the backlog ran out: back near 20/s.
    final = rate_between(end - 5, end)
    assert struggling <= 7.0, struggling
    assert final >= 15.0, final
    assert p.log_search(r"site .*bo.*: backoff: rate"), p.log_tail()
    assert p.log_search(r"backoff over: back to normal") or final >= 18.0
    bins = {}
    for t in ts:
        bins[int(t - t0)] = bins.get(int(t - t0), 0) + 1
    points = [(s, bins.get(s, 0)) for s in range(0, int(end - t0) + 1)]
    here = Path(__file__).resolve().parent.parent / "bench" / "results"
    svg_plot(here / "backoff-rate.svg",
             {"messages/s at the receiver": points,
              "receiver limit (5/s until recovered)": [(0, 5), (recovered - t0, 5),
                                                       (recovered - t0, 0)]},
             "Adaptive backoff: a rule on '451 4.7.1 rate limited', 20/s configured", t0)
    print(f"struggling={struggling:.1f}/s final={final:.1f}/s; {rx.summary()}")


def deferred_retry_times(p):
    """The retry times (mtimes) of the files in deferred/."""
    return [os.stat(p.queue / "deferred" / f).st_mtime for f in p.queue_files("deferred")]


def test_backoff_retry_after_is_the_retry_time_of_a_backed_off_sites_mail(
        make_postern, dnsmasq, receivers):
    """PowerMTA's backoff_retry_after: what a site in backoff defers is
    retried that long after, not after Postfix's backoff time (2s to 4s
    here). The receiver takes 1 message a second and answers `451 4.7.1
    rate limited` beyond; a `backoff` rule puts the site in backoff."""
    rx = receivers(max_rate=1)
    dns = dnsmasq(["--local=/test/", "--mx-host=bra.test,mx.bra.test,10",
                   "--host-record=mx.bra.test,127.0.0.1"])
    p = rules_postern(make_postern, dns, rx, "bra.test",
                      "max_connections=2 backoff_retry_after=2h",
                      "/rate limited/ backoff\n", queue_run_delay="300s")
    inject(p, [f"u{i}@bra.test" for i in range(10)], "pt-bra")
    h.wait_for(lambda: p.log_search(r"site .*bra.*: backoff: rate"), 30,
               what="the site in backoff")
    h.wait_for(lambda: len(p.queue_files("deferred")) + rx.count() >= 10
               and not p.queue_files("active") and not p.queue_files("incoming"), 60,
               what="every message delivered or deferred")
    deferred = deferred_retry_times(p)
    assert deferred, f"nothing deferred; {rx.summary()}"
    now = time.time()
    for t in deferred:
        assert now + 7000 <= t <= now + 7300, f"retry in {t - now:.0f}s, not 2h"
    assert p.log_search(r"status=deferred .*rate limited"), p.log_tail()


def test_suspend_a_domain_qmgr_has_not_seen(make_postern, dnsmasq, receivers):
    """`postern suspend DOMAIN` before any mail for it: qmgr finds the
    domain's site by its MX host and suspends it; the first message then
    waits without an attempt, until `postern resume`. A domain no
    delivery_policy_maps entry covers is refused with a reason."""
    rx = receivers()
    dns = dnsmasq(["--local=/test/", "--mx-host=new.test,mx.new.test,10",
                   "--host-record=mx.new.test,127.0.0.1"])
    p = rules_postern(make_postern, dns, rx, "new.test", "max_connections=2", "",
                      queue_run_delay="300s", minimal_backoff_time="300s",
                      maximal_backoff_time="300s")
    r = p.postern("suspend", "new.test", "1h", "maintenance")
    assert r.returncode == 0, r
    assert "site mx.new.test suspended" in r.stdout + r.stderr, r
    q = p.postern("queues")
    assert "mx.new.test" in q.stdout and "mode=suspended" in q.stdout, q.stdout
    inject(p, ["u1@new.test"], "pt-new")
    p.wait_for_log(r"to=<u1@new\.test>.*status=deferred.*suspended", 30)
    assert rx.count() == 0
    retry = h.wait_for(lambda: deferred_retry_times(p), 10, what="the message in deferred/")
    assert len(retry) == 1 and retry[0] >= time.time() + 3000, retry
    r = p.postern("resume", "new.test")
    assert r.returncode == 0, r
    wait_count(rx, 1, 30)
    r = p.postern("suspend", "other.example", "1h")
    assert r.returncode != 0
    assert "no site for \"other.example\"" in r.stderr, r


def test_shipped_policy_and_rules_pass_check(make_postern):
    """conf/etc/delivery_policy and conf/etc/reply_rules, as shipped, are
    what `postern check` accepts; the shipped rules catch the receiver's
    throttling replies."""
    conf = Path(__file__).resolve().parent.parent / "conf" / "etc"
    policy = (conf / "delivery_policy").read_text()
    rules = (conf / "reply_rules").read_text()
    p = make_postern({"delivery_policy_maps": lambda p: f"texthash:{p.etc}/delivery_policy",
                      "delivery_reply_rules": lambda p: f"regexp:{p.etc}/reply_rules"},
                     files={"etc/delivery_policy": policy, "etc/reply_rules": rules},
                     start=False)
    r = p.postern("check")
    assert r.returncode == 0, r.stderr
    for reply, action in [
        ("421 4.7.0 [TS04] Messages temporarily deferred", "suspend=2h"),
        ("451 4.7.1 rate limited", "backoff"),
        ("421 4.7.0 Too many connections", "backoff"),
    ]:
        q = p.postmap("-q", reply, f"regexp:{p.etc}/reply_rules") if hasattr(p, "postmap") \
            else h.run([p.cmd("postmap"), "-c", p.etc, "-q", reply, f"regexp:{p.etc}/reply_rules"],
                       env=p.env())
        assert action in q.stdout, (reply, q.stdout, q.stderr)
    bad = make_postern({"delivery_reply_rules": lambda p: f"regexp:{p.etc}/reply_rules"},
                       files={"etc/reply_rules": "/x/ slow_down\n"}, start=False)
    r = bad.postern("check")
    assert r.returncode == 1 and "slow_down" in r.stderr, r


def test_operator_commands_and_suspensions_survive_reload_and_restart(make_postern, dnsmasq,
                                                                     receivers):
    """`postern suspend`/`resume`/`bounce`/`queues`: each logged; a
    suspension holds across `postern reload` (a new qmgr process) and
    across a restart (kept in data_directory)."""
    rx = receivers()
    dns = dnsmasq(["--local=/test/", "--mx-host=op.test,mx.op.test,10",
                   "--host-record=mx.op.test,127.0.0.1",
                   "--mx-host=gone.test,mx.op.test,10"])
    table = f"op.test smtp:op.test:{rx.port}\ngone.test smtp:gone.test:{rx.port}\n"
    p = make_postern({
        "dns_resolver_addresses": f"127.0.0.1:{dns.port}",
        "transport_maps": lambda p: f"texthash:{p.etc}/transport",
        "delivery_policy_maps": lambda p: f"texthash:{p.etc}/delivery_policy",
        "minimal_backoff_time": "2s", "maximal_backoff_time": "2s", "queue_run_delay": "1s",
    }, files={"etc/transport": table, "etc/delivery_policy": "* max_connections=2\n"})
    inject(p, ["first@op.test"], "pt-op")
    wait_count(rx, 1, 30)
    r = p.postern("suspend", "op.test", "10m", "maintenance window")
    assert r.returncode == 0, r
    assert p.log_search(r"admin: suspend site mx\.op\.test for 600s: maintenance window")
    q = p.postern("queues")
    assert "mode=suspended" in q.stdout and "maintenance window" in q.stdout, q.stdout
    inject(p, ["held1@op.test"], "pt-op")
    h.wait_for(lambda: p.log_search(r"held1@op\.test.*status=deferred.*suspended"), 20,
               what="held1 deferred, site suspended")

    old = p.qmgr_pid()
    assert p.postern("reload").returncode == 0
    h.wait_for(lambda: p.qmgr_pid() not in (None, old), 30, what="a new qmgr")
    q = p.postern("queues")
    assert "mx.op.test" in q.stdout and "mode=suspended" in q.stdout, q.stdout
    time.sleep(4)  # held1's retries come and go: no attempt
    assert rx.count() == 1, "delivered to a suspended site after a reload"

    p.stop()
    p.start()
    inject(p, ["held2@op.test"], "pt-op")
    time.sleep(4)
    assert rx.count() == 1, "delivered to a suspended site after a restart"
    q = p.postern("queues", "-j")
    site = next(json.loads(x) for x in q.stdout.splitlines() if "mx.op.test" in x)
    assert site["mode"] == "suspended", site

    r = p.postern("resume", "op.test")
    assert r.returncode == 0, r
    assert p.log_search(r"admin: resume site mx\.op\.test")
    wait_count(rx, 3, 30)

    # bounce: what waits for the domain, and new mail for a while.
    r = p.postern("bounce", "gone.test", "domain retired")
    assert r.returncode == 0, r
    inject(p, ["x@gone.test"], "pt-op")
    h.wait_for(lambda: p.log_search(r"x@gone\.test.*status=bounced.*domain retired"), 20,
               what="x@gone.test bounced")
    assert p.log_search(r"admin: bounce mail for gone\.test")
    assert rx.count() == 3
    # A domain qmgr has not seen is no longer refused: its site is looked
    # up (test_suspend_a_domain_qmgr_has_not_seen; no MX: the domain is
    # its own site); what is no domain still is.
    r = p.postern("suspend", "nosuch.test")
    assert r.returncode == 0 and "site nosuch.test suspended" in r.stderr, r
    r = p.postern("suspend", "not@a-domain")
    assert r.returncode == 1 and "no site for" in r.stderr, r


def test_defer_and_bounce_rules_change_a_recipients_outcome(make_postern, dnsmasq, receivers):
    """`defer` makes a remote 5xx temporary, `bounce` a 4xx final; the
    receiver's per-recipient 550 5.1.1 and 552 5.2.2 without a rule stay
    as they are."""
    rx = receivers()
    rx.set_rcpt("tempo@rr.test", "550 5.2.1 mailbox temporarily disabled")
    rx.set_rcpt("full@rr.test", "452 4.2.2 mailbox full")
    rx.set_rcpt("nouser@rr.test", "550 5.1.1 no such user")
    rx.set_rcpt("over@rr.test", "552 5.2.2 mailbox full")
    dns = dnsmasq(["--local=/test/", "--mx-host=rr.test,mx.rr.test,10",
                   "--host-record=mx.rr.test,127.0.0.1"])
    p = rules_postern(make_postern, dns, rx, "rr.test", "max_connections=2",
                      "/temporarily disabled/ defer class=inactive\n"
                      "/^452 4\\.2\\.2 / bounce class=quota\n")
    for r in ["tempo", "full", "nouser", "over", "ok"]:
        inject(p, [f"{r}@rr.test"], "pt-rr")
    wait_count(rx, 1, 30)
    for rcpt, status in [("tempo", "deferred"), ("full", "bounced"),
                         ("nouser", "bounced"), ("over", "bounced"), ("ok", "sent")]:
        h.wait_for(lambda: p.log_search(rf"to=<{rcpt}@rr\.test>.*status={status}"), 20,
                   what=f"{rcpt}: {status}")
    assert p.log_search(r"to=<tempo@rr\.test>.*dsn=4\.2\.1, status=deferred"), p.log_tail()
    assert p.log_search(r"to=<full@rr\.test>.*dsn=5\.2\.2, status=bounced"), p.log_tail()


def test_after_counts_before_defer_and_bounce_act(make_postern, dnsmasq, receivers):
    """`after=3/1h` with `bounce`: the first two `452 4.2.2` are deferred
    as usual, the third within the hour is final; with `defer`: the first
    two `550 5.2.1` bounce as usual, the third is deferred. One message
    at a time, so that each reply is its own match."""
    rx = receivers()
    for i in range(3):
        rx.set_rcpt(f"full{i}@ra.test", "452 4.2.2 mailbox full")
        rx.set_rcpt(f"tempo{i}@ra.test", "550 5.2.1 mailbox temporarily disabled")
    dns = dnsmasq(["--local=/test/", "--mx-host=ra.test,mx.ra.test,10",
                   "--host-record=mx.ra.test,127.0.0.1"])
    p = rules_postern(make_postern, dns, rx, "ra.test", "max_connections=1",
                      "/temporarily disabled/ defer after=3/1h\n"
                      "/^452 4\\.2\\.2 / bounce after=3/1h\n",
                      minimal_backoff_time="300s", maximal_backoff_time="300s",
                      queue_run_delay="300s")
    for kind, first, nth in [("full", "deferred", "bounced"), ("tempo", "bounced", "deferred")]:
        for i in range(3):
            inject(p, [f"{kind}{i}@ra.test"], "pt-ra")
            want = nth if i == 2 else first
            p.wait_for_log(rf"to=<{kind}{i}@ra\.test>.*status={want}", 20,
                           what=f"{kind}{i}: {want}")
    log = p.log_text()
    # Before the third: the usual outcome only (the first two 452s are
    # not bounced; the third 550 is not bounced).
    for rcpt in ["full0", "full1", "tempo2"]:
        assert not re.search(rf"to=<{rcpt}@ra\.test>.*status=bounced", log), log
    # The third 452 made final: a bounce with a 5.x.x code.
    assert re.search(r"to=<full2@ra\.test>.*dsn=5\.2\.2, status=bounced", log), p.log_tail()
    assert re.search(r"to=<tempo2@ra\.test>.*dsn=4\.2\.1, status=deferred", log), p.log_tail()
    # The first two 5xx: deferred by the agent, made final by qmgr.
    assert re.search(r"to=<tempo0@ra\.test>.*dsn=5\.2\.1, status=bounced", log), p.log_tail()


# --------------------------------------------------------------------------
# The site model in the accounting log (accounting_log_file): site mode
# changes, the operator's commands, AdminBounce and Delayed records, and
# a reply rule's class=NAME.

ACCT_CSV_FIELDS = ["type", "timeLogged", "timeQueued", "orig", "rcpt", "orcpt", "dsnAction",
                   "dsnStatus", "dsnDiag", "dsnMta", "bounceCat", "srcMta", "dlvSourceIp",
                   "dlvDestinationIp", "dlvEsmtpAvailable", "dlvSize", "vmta", "jobId",
                   "envId"]


def read_acct(p, fmt):
    """The accounting log as a list of dicts in KumoMTA's JSON terms,
    whichever format it was written in (each line must parse)."""
    path = p.dir / "acct.log"
    if not path.exists():
        return []
    text = path.read_text()
    assert not text or text.endswith("\n"), text[-200:]
    if fmt == "json":
        return [json.loads(line) for line in text.splitlines()]
    import csv
    import io
    rows = list(csv.reader(io.StringIO(text)))
    assert rows and rows[0] == ACCT_CSV_FIELDS, rows[:1]
    kinds = {"r": "Reception", "d": "Delivery", "t": "TransientFailure", "b": "Bounce",
             "tq": "Delayed", "m": "SiteModeChange"}
    out = []
    for r in rows[1:]:
        assert len(r) == len(ACCT_CSV_FIELDS), r
        c = dict(zip(ACCT_CSV_FIELDS, r))
        typ = kinds[c["type"]]
        if typ == "Bounce" and "canceled by the administrator" in c["dsnDiag"]:
            typ = "AdminBounce"
        mode = typ == "SiteModeChange"
        out.append({
            "type": typ,
            "recipient": c["rcpt"],
            "site": c["jobId"],
            "mode": c["dsnAction"] if mode else None,
            "rule": c["srcMta"] if mode else None,
            "reply": c["dsnDiag"],
            "bounce_classification": c["bounceCat"],
            "csv": c,
        })
    return out


def reply_of(rec):
    """The reply text of a record, either format."""
    if "reply" in rec:
        return rec["reply"]
    resp = rec.get("response") or {}
    e = resp.get("enhanced_code")
    enh = f"{e['class']}.{e['subject']}.{e['detail']} " if e else ""
    return f"{resp.get('code')} {enh}{resp.get('content', '')}"


def acct_postern(make_postern, dns, rx, domain, fmt, rules, **params):
    return rules_postern(make_postern, dns, rx, domain, "max_connections=2 max_message_rate=20/s",
                         rules, accounting_log_file=lambda p: str(p.dir / "acct.log"),
                         accounting_log_format=fmt, **params)


def test_num_attempts_counts_across_delivery_rounds(make_postern, dnsmasq, receivers):
    """A recipient answered `451 4.3.0` in three delivery rounds, then
    accepted: its TransientFailure records count 1, 2, 3 and its Delivery
    record 4 (the defer log of each round carries the earlier rounds'
    count over)."""
    rx = receivers()
    rx.set_rcpt("slow@na.test", "451 4.3.0 try again later")
    dns = dnsmasq(["--local=/test/", "--mx-host=na.test,mx.na.test,10",
                   "--host-record=mx.na.test,127.0.0.1"])
    p = rules_postern(make_postern, dns, rx, "na.test", "max_connections=2", "",
                      accounting_log_file=lambda p: str(p.dir / "acct.log"),
                      accounting_log_format="json",
                      minimal_backoff_time="1s", maximal_backoff_time="1s")
    inject(p, ["slow@na.test"], "pt-na")

    def failures():
        return [r for r in read_acct(p, "json") if r["type"] == "TransientFailure"]
    h.wait_for(lambda: len(failures()) >= 3, 60, what="three rounds deferred")
    rx.set_rcpt("slow@na.test", None)
    wait_count(rx, 1, 60)
    recs = h.wait_for(lambda: [r for r in read_acct(p, "json") if r["type"] == "Delivery"], 20,
                      what="the Delivery record")
    tf = [r["num_attempts"] for r in failures()]
    assert tf == list(range(1, len(tf) + 1)), tf
    assert recs[0]["num_attempts"] == len(tf) + 1, (recs, tf)


@pytest.mark.parametrize("fmt", ["json", "csv"])
def test_mail_waiting_for_a_sites_limits_gets_delayed_records(make_postern, dnsmasq,
                                                              receivers, fmt):
    """12 messages in one session for a site of max_connections=1
    max_message_rate=4/s: those queued while the site is at its limit
    get one Delayed record each (451 4.4.5, "waiting for site ...", the
    site's name), written as they start to wait, before their Delivery
    record; every message is then delivered once."""
    rx = receivers()
    dns = dnsmasq(["--local=/test/", "--mx-host=wsl.test,mx.wsl.test,10",
                   "--host-record=mx.wsl.test,127.0.0.1"])
    p = rules_postern(make_postern, dns, rx, "wsl.test", "max_connections=1 max_message_rate=4/s",
                      "", accounting_log_file=lambda p: str(p.dir / "acct.log"),
                      accounting_log_format=fmt)
    inject(p, [f"u{i}@wsl.test" for i in range(12)], "pt-wsl")
    wait_count(rx, 12, 60)
    h.wait_for(lambda: sum(r["type"] == "Delivery" for r in read_acct(p, fmt)) >= 12, 20,
               what="12 Delivery records")
    recs = read_acct(p, fmt)
    delayed = [r for r in recs if r["type"] == "Delayed"]
    assert len(delayed) >= 6, [(r["type"], r["recipient"]) for r in recs]
    assert all("waiting for site" in reply_of(r) for r in delayed), delayed
    assert all("4.4.5" in (r["csv"]["dsnStatus"] if fmt == "csv" else reply_of(r))
               for r in delayed), delayed
    site = delayed[0]["site"]
    assert "wsl" in site, delayed
    assert all(r["site"] == site for r in delayed), delayed
    # Once each, before the same recipient's Delivery.
    rcpts = [r["recipient"] for r in delayed]
    assert len(rcpts) == len(set(rcpts)), rcpts
    order = [(r["type"], r["recipient"]) for r in recs]
    for r in rcpts:
        assert order.index(("Delayed", r)) < order.index(("Delivery", r)), order
    assert sorted(r["recipient"] for r in recs if r["type"] == "Delivery") == \
        sorted(f"u{i}@wsl.test" for i in range(12))


@pytest.mark.parametrize("fmt", ["json", "csv"])
def test_a_suspend_rule_writes_site_mode_changes_to_the_accounting_log(make_postern, dnsmasq,
                                                                       receivers, fmt):
    """A suspend= rule firing writes a SiteModeChange record naming the
    site, the rule and the reply; what waits meanwhile gets Delayed
    records; the suspension's end writes `resumed`; the TS04 failure's
    record has the rule's class=NAME as its bounce_classification and
    the site's name as its site."""
    rx = receivers()
    dns = dnsmasq(["--local=/test/", "--mx-host=acs.test,mx.acs.test,10",
                   "--host-record=mx.acs.test,127.0.0.1"])
    p = acct_postern(make_postern, dns, rx, "acs.test", fmt,
                     "/\\[TS0[1-4]\\]/ suspend=5s class=provider-throttled\n")
    inject(p, ["warm@acs.test"], "pt-acs-warm")
    wait_count(rx, 1, 30)
    rx.reputation(2)
    inject(p, [f"u{i}@acs.test" for i in range(10)], "pt-acs")
    h.wait_for(lambda: p.log_search(r"site .*acs.*: suspended for 5s"), 20,
               what="the site suspended")
    wait_count(rx, 11, 60)
    h.wait_for(lambda: any(r["type"] == "SiteModeChange" and r["mode"] == "resumed"
                           for r in read_acct(p, fmt)), 20, what="a resumed record")
    recs = read_acct(p, fmt)
    modes = [r for r in recs if r["type"] == "SiteModeChange"]
    susp = [r for r in modes if r["mode"] == "suspended"]
    assert len(susp) == 1, modes
    site = susp[0]["site"]
    assert "acs" in site, susp
    assert "suspend=5s" in susp[0]["rule"], susp
    assert "421" in reply_of(susp[0]) and "[TS04]" in reply_of(susp[0]), susp
    if fmt == "json":
        assert susp[0]["until"] and susp[0]["until"] > susp[0]["timestamp"], susp
    resumed = [r for r in modes if r["mode"] == "resumed"]
    assert resumed and resumed[0]["site"] == site, modes
    # The attempt that got [TS04]: its class is the rule's, its site the site's name.
    ts04 = [r for r in recs if r["type"] == "TransientFailure" and "[TS04]" in reply_of(r)]
    assert ts04, recs
    assert all(r["bounce_classification"] == "provider-throttled" for r in ts04), ts04
    assert all(r["site"] == site for r in ts04), ts04
    # Mail that waited for the suspension's end, without an attempt (the
    # Delayed records of mail that waited for the site's limits are
    # test_mail_waiting_for_a_sites_limits_gets_delayed_records').
    delayed = [r for r in recs if r["type"] == "Delayed"
               and "waiting for site" not in reply_of(r)]
    assert delayed, [r["type"] for r in recs]
    assert all("suspended" in reply_of(r) for r in delayed), delayed
    assert all(r["site"] == site for r in delayed), delayed
    # The receiver counts a message before Postern has read its 250 and
    # written the Delivery record: the last ones may come a moment later.
    want = {f"u{i}@acs.test" for i in range(10)}
    h.wait_for(lambda: want <= {r["recipient"] for r in read_acct(p, fmt)
                                if r["type"] == "Delivery"}, 20,
               what="a Delivery record for each of the 10")


@pytest.mark.parametrize("fmt", ["json", "csv"])
def test_operator_commands_and_rule_classes_in_the_accounting_log(make_postern, dnsmasq,
                                                                  receivers, fmt):
    """`postern suspend`, `resume` and `bounce` each write a record (the
    site's mode with the command as its rule); mail `postern bounce`
    fails gets AdminBounce records; a recipient's reply matched by a
    rule with class=NAME gets NAME as its bounce_classification."""
    rx = receivers()
    rx.set_rcpt("dis@opa.test", "550 5.2.1 mailbox disabled by its owner")
    dns = dnsmasq(["--local=/test/", "--mx-host=opa.test,mx.opa.test,10",
                   "--host-record=mx.opa.test,127.0.0.1",
                   "--mx-host=gone.test,mx.gone.test,10",
                   "--host-record=mx.gone.test,127.0.0.1"])
    p = acct_postern(make_postern, dns, rx, "opa.test", fmt,
                     "/mailbox disabled/ class=owner-disabled\n")
    inject(p, ["first@opa.test", "dis@opa.test"], "pt-opa")
    wait_count(rx, 1, 30)
    h.wait_for(lambda: any(r["type"] == "Bounce" for r in read_acct(p, fmt)), 20,
               what="dis@opa.test bounced")

    assert p.postern("suspend", "opa.test", "10m", "maintenance window").returncode == 0
    assert p.postern("resume", "opa.test").returncode == 0
    # New mail for gone.test fails at once, without an attempt.
    assert p.postern("bounce", "gone.test", "domain retired").returncode == 0
    inject(p, ["x@gone.test"], "pt-opa")
    h.wait_for(lambda: p.log_search(r"x@gone\.test.*status=bounced.*domain retired"), 20,
               what="x@gone.test bounced")
    h.wait_for(lambda: any(r["type"] == "AdminBounce" for r in read_acct(p, fmt)), 20,
               what="an AdminBounce record")
    recs = read_acct(p, fmt)
    modes = [r for r in recs if r["type"] == "SiteModeChange"]
    susp = [r for r in modes if r["mode"] == "suspended"]
    assert len(susp) == 1 and "opa" in susp[0]["site"], modes
    assert susp[0]["rule"] == "postern suspend: maintenance window", susp
    res = [r for r in modes if r["mode"] == "resumed"]
    assert len(res) == 1 and res[0]["site"] == susp[0]["site"], modes
    assert res[0]["rule"] == "postern resume", res
    bnc = [r for r in modes if r["mode"] == "bounce"]
    assert len(bnc) == 1 and bnc[0]["site"] == "gone.test", modes
    assert bnc[0]["rule"] == "postern bounce: domain retired", bnc
    admin = [r for r in recs if r["type"] == "AdminBounce"]
    assert [r["recipient"] for r in admin] == ["x@gone.test"], admin
    assert "domain retired" in reply_of(admin[0]), admin
    # class=NAME of the reply rule, instead of the classifier's.
    dis = [r for r in recs if r["recipient"] == "dis@opa.test" and r["type"] == "Bounce"]
    assert len(dis) == 1 and dis[0]["bounce_classification"] == "owner-disabled", dis
    assert p.log_search(r"bounce_class=owner-disabled, recipient=<dis@opa\.test>"), p.log_tail()


def test_backoff_entered_and_left_in_the_accounting_log(make_postern, dnsmasq, receivers):
    """A `backoff` rule matching a reply writes a SiteModeChange `backoff`
    record with the rule and the reply; the way back (here
    backoff_to_normal_after=1s) writes `normal`."""
    rx = receivers()
    # A 5xx: no retry comes to signal again while the site recovers.
    rx.set_rcpt("slow@bka.test", "554 5.7.1 rate limited, slow down")
    dns = dnsmasq(["--local=/test/", "--mx-host=bka.test,mx.bka.test,10",
                   "--host-record=mx.bka.test,127.0.0.1"])
    p = rules_postern(make_postern, dns, rx, "bka.test",
                      "max_connections=2 max_message_rate=20/s backoff_to_normal_after=1s",
                      "/rate limited/ backoff\n",
                      accounting_log_file=lambda p: str(p.dir / "acct.log"))
    inject(p, ["slow@bka.test"], "pt-bka")
    h.wait_for(lambda: any(r["type"] == "SiteModeChange" for r in read_acct(p, "json")), 30,
               what="a backoff record")
    time.sleep(1.5)
    inject(p, [f"ok{i}@bka.test" for i in range(3)], "pt-bka")
    wait_count(rx, 3, 30)
    h.wait_for(lambda: any(r.get("mode") == "normal" for r in read_acct(p, "json")), 20,
               what="a normal record")
    modes = [r for r in read_acct(p, "json") if r["type"] == "SiteModeChange"]
    bo = [r for r in modes if r["mode"] == "backoff"]
    assert bo and "bka" in bo[0]["site"], modes
    assert bo[0]["rule"] == "backoff", bo
    assert "rate limited, slow down" in reply_of(bo[0]) and "554" in reply_of(bo[0]), bo
    normal = [r for r in modes if r["mode"] == "normal"]
    assert normal[0]["site"] == bo[0]["site"] and normal[0]["rule"] == "backoff over", modes
