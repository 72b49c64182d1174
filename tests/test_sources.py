"""Issue #20 points 1-4: sending identities (sources), pools, warm-up and
per-source suspension.

Sources are master.cf transports of the smtp program bound to their own
loopback addresses (127.0.0.2, .3, .4); the scripted receiver
(tests/throttle_receiver.py, on 127.0.0.1) records which address each
message came from. The next hop is the receiver itself
(`[127.0.0.1]:PORT`), a site of its own for `delivery_policy_maps`.
"""

import datetime
import threading
import time

import pytest

import postern_harness as h
from throttle_receiver import ThrottleReceiver

SENDER = "sender@example.org"
IPS = {"vmta1": "127.0.0.2", "vmta2": "127.0.0.3", "vmta3": "127.0.0.4"}


def vmtas(**extra):
    """master.cf lines: one smtp transport per source address, each with
    its own HELO name and any extra -o settings."""
    lines = []
    for name, ip in IPS.items():
        opts = f" -o smtp_bind_address={ip} -o smtp_bind_address_enforce=yes" \
               f" -o smtp_helo_name={name}.example.org"
        for k, v in extra.get(name, {}).items():
            opts += f" -o {k}={v}"
        lines.append(f"{name} unix - - n - - smtp{opts}")
    return lines


def fast(**params):
    """Large per-connection batches, a few connections, quick retries."""
    base = {
        "default_delivery_batch_limit": "100",
        "default_destination_concurrency_limit": "4",
        "initial_destination_concurrency": "4",
        "delivery_policy_maps": lambda p: f"texthash:{p.etc}/delivery_policy",
        "smtp_connection_cache_on_demand": "yes",
    }
    base.update(params)
    return base


def inject(p, n, token, sender=SENDER, headers="", threads=4):
    """n messages, one recipient each, over `threads` parallel sessions."""
    errors = []

    def worker(k):
        try:
            with p.smtp(timeout=120) as s:
                s.ehlo("client.example")
                for i in range(k, n, threads):
                    rcpt = f"u{i}@pool.test"
                    msg = h.crlf(f"From: {sender}\nTo: {rcpt}\n{headers}"
                                 f"Subject: {token} {i}\n\nbody {i}\n")
                    s.sendmail(sender, [rcpt], msg)
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    ts = [threading.Thread(target=worker, args=(k,)) for k in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(600)
    assert not errors, errors


def wait_count(rx, n, timeout):
    h.wait_for(lambda: rx.count() >= n, timeout, interval=0.2,
               what=f"{n} messages at the receiver (have {rx.count()}: {rx.by_peer()})")


def share(rx, ip):
    return rx.by_peer().get(ip, 0) / max(1, rx.count())


def test_weighted_pool_splits_by_weight(make_postern, receiver):
    """default_transport = weighted:{vmta1=3, vmta2=1, vmta3=1}: 5,000
    messages leave from 127.0.0.2/.3/.4 within 5% of 60/20/20, each from
    its source's address and HELO name."""
    rx = receiver
    pool = "weighted:{vmta1=3,vmta2=1,vmta3=1}"
    p = make_postern(fast(default_transport=f"{pool}:[127.0.0.1]:{rx.port}"),
                     files={"etc/delivery_policy": "* max_connections=4\n"},
                     master_cf_extra=vmtas())
    n = 5000
    inject(p, n, "pt-pool")
    wait_count(rx, n, 600)
    by = rx.by_peer()
    print("by source:", by)
    assert set(by) <= set(IPS.values()), by
    for ip, want in (("127.0.0.2", 0.6), ("127.0.0.3", 0.2), ("127.0.0.4", 0.2)):
        assert abs(share(rx, ip) - want) <= 0.05, by
    assert not p.log_search(r"status=deferred"), p.log_tail()


def test_suspend_source_rule_moves_its_share_to_the_others(make_postern, receiver):
    """The receiver blocks 127.0.0.3 (vmta2) with [TS04]: the rule's
    suspend_source= stops vmta2 for the site only, and its share goes to
    vmta1 and vmta3 (3:1); every message arrives, none from 127.0.0.3."""
    rx = receiver
    rx.block_peer("127.0.0.3")
    pool = "weighted:{vmta1=3,vmta2=1,vmta3=1}"
    p = make_postern(
        fast(default_transport=f"{pool}:[127.0.0.1]:{rx.port}",
             delivery_reply_rules=lambda p: f"regexp:{p.etc}/reply_rules"),
        files={"etc/delivery_policy": "* max_connections=4\n",
               "etc/reply_rules": "/\\[TS04\\]/ suspend_source=1h\n"},
        master_cf_extra=vmtas())
    n = 1000
    inject(p, n, "pt-suspend-source")
    wait_count(rx, n, 300)
    by = rx.by_peer()
    print("by source:", by)
    assert by.get("127.0.0.3", 0) == 0, by
    # vmta2's share went to the others in their ratio, 3:1.
    assert abs(share(rx, "127.0.0.2") - 0.75) <= 0.05, by
    assert abs(share(rx, "127.0.0.4") - 0.25) <= 0.05, by
    assert p.log_search(r"site .*\(source vmta2\): suspended for 3600s"), p.log_tail()
    # Only vmta2 was suspended.
    assert not p.log_search(r"\(source vmta[13]\): suspended"), p.log_tail()
    q = p.postern("queues")
    assert q.returncode == 0, q
    assert "source=vmta2" in q.stdout and "mode=suspended" in q.stdout, q.stdout


def test_sender_and_header_selected_pools(make_postern, receiver):
    """Mail from @news.example goes through the sender's pool (vmta2,
    vmta3), other mail through default_transport (vmta1), and a message
    with `X-Virtual-MTA: bulk` from a trusted client (mynetworks) through
    pool_maps' `bulk` (vmta3); the header never reaches the receiver."""
    rx = receiver
    p = make_postern(
        fast(default_transport="vmta1",
             relayhost=f"[127.0.0.1]:{rx.port}",
             sender_dependent_default_transport_maps=lambda p: f"texthash:{p.etc}/sender_pools",
             pool_maps=lambda p: f"texthash:{p.etc}/pools"),
        files={"etc/delivery_policy": "* max_connections=4\n",
               "etc/sender_pools": "@news.example weighted:{vmta2=1,vmta3=1}\n",
               "etc/pools": "bulk vmta3\n"},
        master_cf_extra=vmtas())
    inject(p, 20, "pt-news", sender="list@news.example", threads=1)
    inject(p, 5, "pt-plain", threads=1)
    inject(p, 5, "pt-header", headers="X-Virtual-MTA: bulk\nX-Postern-Pool: bulk\n", threads=1)
    wait_count(rx, 30, 120)

    def peers(token):
        return [a.peer[0] for a in rx.accepted if token.encode() in a.content]

    assert sorted(set(peers("pt-news"))) == ["127.0.0.3", "127.0.0.4"], peers("pt-news")
    assert peers("pt-news").count("127.0.0.3") == 10, peers("pt-news")
    assert set(peers("pt-plain")) == {"127.0.0.2"}, peers("pt-plain")
    assert set(peers("pt-header")) == {"127.0.0.4"}, peers("pt-header")
    for a in rx.accepted:
        low = a.content.lower()
        assert b"x-virtual-mta" not in low and b"x-postern-pool" not in low, a.content[:400]
    # Each source greeted with its own name.
    assert not p.log_search(r"status=deferred"), p.log_tail()


def warm_postern(make_postern, rx, extra_services=(), policy="* max_connections=4\n",
                 **params):
    """vmta1 (127.0.0.2) is new: day 1 of 50, 100 messages a day since
    today; vmta2 (127.0.0.3) is warm. One pool of both, 1:1.
    `extra_services`: more master.cf lines."""
    today = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")
    pool = "weighted:{vmta1=1,vmta2=1}"
    p = make_postern(
        fast(default_transport=f"{pool}:[127.0.0.1]:{rx.port}",
             accounting_log_file=lambda p: str(p.dir / "acct.log"), **params),
        files={"etc/delivery_policy": policy},
        master_cf_extra=vmtas(vmta1={"smtp_warmup_schedule": "50,100",
                                     "smtp_warmup_start": today}) + list(extra_services))
    return p


def acct(p):
    import json
    path = p.dir / "acct.log"
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


def test_status_page_shows_each_source_and_its_warmup(make_postern, receiver):
    """The status service (status(8)) shows the site once per source, and
    the new source's warm-up: day 1, today's quota of 50, what it sent
    today; on the page and in /metrics."""
    import re
    from test_status_page import get, shipped_status_line
    rx = receiver
    port = h.free_port()
    p = warm_postern(make_postern, rx, extra_services=[shipped_status_line(port)])
    inject(p, 120, "pt-warm-status")
    wait_count(rx, 120, 300)
    h.wait_for(lambda: get(port, "/metrics")[0] == 200, 30, what="the status service")
    code, _, body = get(port, "/metrics")
    assert code == 200, body[:300]
    text = body.decode()

    def sample(name, source):
        m = re.search(rf'^{name}{{site="[^"]*",source="{source}"}} (\S+)$', text, re.M)
        return m and float(m.group(1))

    assert sample("postern_site_warmup_day", "vmta1") == 1, text[-3000:]
    assert sample("postern_site_warmup_quota", "vmta1") == 50, text[-3000:]
    assert sample("postern_site_warmup_sent_today", "vmta1") == 50, text[-3000:]
    # The warm source has no schedule: no warm-up samples, but its site row.
    assert sample("postern_site_warmup_day", "vmta2") is None, text[-3000:]
    assert re.search(r'^postern_site_queued\{site="[^"]*",source="vmta2"\} ', text, re.M), \
        text[-3000:]
    code, _, page = get(port, "/")
    assert code == 200
    html = page.decode()
    assert "<td>vmta1</td>" in html and "<td>vmta2</td>" in html, html[-3000:]
    assert re.search(r"day 1: 50 of 50 <progress", html), html[-3000:]


def test_a_sites_warmup_schedule_overrides_the_sources(make_postern, receiver):
    """`warmup_schedule=20,40` in the site's delivery_policy_maps entry
    wins over vmta1's smtp_warmup_schedule (50,100): on day 1 the new
    source sends 20 of 100, the warm one the other 80, none waits."""
    rx = receiver
    p = warm_postern(make_postern, rx,
                     policy="* max_connections=4 warmup_schedule=20,40\n")
    inject(p, 100, "pt-site-warm")
    wait_count(rx, 100, 120)
    by = rx.by_peer()
    assert by == {"127.0.0.2": 20, "127.0.0.3": 80}, by
    assert p.queue_files("deferred") == []


def test_warmup_overflows_to_the_warm_source(make_postern, receiver):
    """500 messages: the new source sends its 50 of the day, the other 450
    go from the warm one, and none waits; the accounting records say which
    source sent each and why."""
    rx = receiver
    p = warm_postern(make_postern, rx)
    inject(p, 500, "pt-warm")
    wait_count(rx, 500, 180)
    by = rx.by_peer()
    assert by == {"127.0.0.2": 50, "127.0.0.3": 450}, by
    assert not p.log_search(r"status=deferred"), p.log_tail()
    assert p.queue_files("deferred") == []
    recs = [r for r in acct(p) if r["type"] == "Delivery"]
    assert len(recs) == 500, len(recs)
    assert all(r["pool"] == "weighted:{vmta1=1,vmta2=1}" for r in recs), recs[:2]
    assert sum(r["egress_pool"] == "vmta1" for r in recs) == 50
    over = [r for r in recs if r["source_selection"].startswith("overflow")]
    assert over and all(r["egress_pool"] == "vmta2" for r in over), recs[-1]
    assert "vmta1: warm-up day 1" in over[0]["source_selection"], over[0]
    # No message waited for the warm-up (Delayed records of mail that
    # waited for a source's connection limit are not waiting: they say
    # "waiting for site", see test_delivery_shaping).
    waited = [r for r in acct(p) if r["type"] == "Delayed"
              and "waiting for site" not in ((r.get("response") or {}).get("content") or "")]
    assert waited == [], waited[:3]


def test_warmup_waits_for_tomorrow_when_no_source_has_room(make_postern, receiver, monkeypatch):
    """With the warm source suspended for the site (`postern suspend -s`),
    the new one sends its 50 and the other 450 wait for tomorrow; run a
    day later (the test clock), day 2's quota of 100 goes."""
    rx = receiver
    p = warm_postern(make_postern, rx)
    site = f"[127.0.0.1]:{rx.port}"
    r = p.postern("suspend", "-s", "vmta2", site, "2d")
    assert r.returncode == 0, h.describe(r)
    assert "vmta2" in r.stderr, r.stderr
    inject(p, 500, "pt-wait")
    wait_count(rx, 50, 120)
    h.wait_for(lambda: len(p.log_findall(r"status=deferred.*warm-up day 1")) >= 450, 120,
               what="450 deferred for the warm-up quota")
    time.sleep(2)
    assert rx.by_peer() == {"127.0.0.2": 50}, rx.by_peer()
    assert len(p.queue_files("deferred")) == 450
    delayed = [r for r in acct(p) if r["type"] == "Delayed"]
    assert len(delayed) >= 450, len(delayed)
    # Tomorrow: day 2, a quota of 100 (vmta2 is still suspended).
    p.stop()
    monkeypatch.setenv("POSTERN_TEST_CLOCK_OFFSET", "86400")
    p.start()
    r = h.run_tool(p, "postqueue", "-f")
    assert r.returncode == 0, h.describe(r)
    wait_count(rx, 150, 120)
    time.sleep(3)
    assert rx.by_peer() == {"127.0.0.2": 150}, rx.by_peer()


def test_limits_hold_per_source_and_site_limits_cap_their_sum(make_postern):
    """`max_connections=2 site_max_connections=3`: each source opens at
    most 2 connections to the site, and the three together at most 3
    (more than one source's 2: the limit is per source)."""
    rx = ThrottleReceiver(data_delay=0.3).start()
    try:
        pool = "weighted:{vmta1=1,vmta2=1,vmta3=1}"
        p = make_postern(fast(default_transport=f"{pool}:[127.0.0.1]:{rx.port}",
                              default_delivery_batch_limit="1"),
                         files={"etc/delivery_policy":
                                "* max_connections=2 site_max_connections=3\n"},
                         master_cf_extra=vmtas())
        inject(p, 60, "pt-caps")
        wait_count(rx, 60, 120)
        assert rx.max_concurrent == 3, rx.summary()
        for ip in IPS.values():
            mine = [c for c in rx.connections if c[2][0] == ip]
            most = max(sum(1 for o, c, _ in mine if o <= t and (c is None or c > t))
                       for t, _, _ in mine)
            assert most <= 2, (ip, most)
    finally:
        rx.stop()


def test_site_message_rate_caps_the_sum_of_the_sources(make_postern, receiver):
    """`max_message_rate=10/s site_max_message_rate=10/s,burst=1` on a
    pool of three sources: each source alone may send 10 a second, the
    three together send no more than 10 a second (30 without the cap),
    and each source sends its share."""
    rx = receiver
    pool = "weighted:{vmta1=1,vmta2=1,vmta3=1}"
    p = make_postern(fast(default_transport=f"{pool}:[127.0.0.1]:{rx.port}"),
                     files={"etc/delivery_policy":
                            "* max_connections=2 max_message_rate=10/s"
                            " site_max_message_rate=10/s,burst=1\n"},
                     master_cf_extra=vmtas())
    n = 90
    inject(p, n, "pt-site-rate")
    wait_count(rx, n, 120)
    by = rx.by_peer()
    assert all(by.get(ip, 0) >= 20 for ip in IPS.values()), by
    rate = rx.rate()
    # 89 intervals at 10/s take 8.9 s; the three sources' own limits
    # alone would allow 30/s (about 3 s).
    assert rate <= 11.5, (rate, rx.summary())
    # Loopback jitter puts a message or two more in one 2-second window
    # (as test_delivery_shaping's 20/s case); the sum of the sources' own
    # limits would allow 60.
    assert rx.max_in_window(2.0) <= 26, rx.summary()
    assert not rx.temp_failures(), rx.summary()


@pytest.mark.parametrize("enforce", ["yes", "no"])
def test_bind_address_enforce(make_postern, receiver, enforce):
    """A source address this host does not have (192.0.2.1): with
    smtp_bind_address_enforce = yes the delivery is deferred; with no it
    goes from the default address, with a warning."""
    rx = receiver
    p = make_postern(
        {"default_transport": f"gone:[127.0.0.1]:{rx.port}"},
        master_cf_extra=["gone unix - - n - - smtp -o smtp_bind_address=192.0.2.1"
                         f" -o smtp_bind_address_enforce={enforce}"])
    inject(p, 1, "pt-bind", threads=1)
    if enforce == "yes":
        p.wait_for_log(r"status=deferred .*cannot bind to 192\.0\.2\.1", 30)
        assert rx.count() == 0
    else:
        wait_count(rx, 1, 30)
        assert rx.accepted[0].peer[0] == "127.0.0.1"
        assert p.log_search(r"cannot bind to 192\.0\.2\.1.*connecting from the default")


def test_client_selected_pool_by_filter(make_postern, receiver):
    """smtpd's access table gives the client 127.0.0.1 a FILTER whose
    transport is a pool: its mail leaves from that pool's members (1:1),
    not from default_transport's vmta1."""
    rx = receiver
    pool = f"weighted:{{vmta2=1,vmta3=1}}:[127.0.0.1]:{rx.port}"
    p = make_postern(
        fast(default_transport=f"vmta1:[127.0.0.1]:{rx.port}",
             smtpd_client_restrictions=lambda p: f"check_client_access cidr:{p.etc}/clients"),
        files={"etc/delivery_policy": "* max_connections=4\n",
               "etc/clients": f"127.0.0.1/32 FILTER {pool}\n"},
        master_cf_extra=vmtas())
    inject(p, 10, "pt-filter", threads=1)
    wait_count(rx, 10, 60)
    assert rx.by_peer() == {"127.0.0.3": 5, "127.0.0.4": 5}, rx.by_peer()


def test_pool_header_from_an_untrusted_client_is_ignored_and_removed(make_postern, receiver):
    """A client outside mynetworks, not authenticated, cannot choose the
    pool: its X-Virtual-MTA header is ignored (the mail goes by
    relay_transport) and still removed."""
    rx = receiver
    p = make_postern(
        fast(relay_transport=f"vmta1:[127.0.0.1]:{rx.port}", relay_domains="pool.test",
             mynetworks="127.0.0.9/32",
             pool_maps=lambda p: f"texthash:{p.etc}/pools"),
        files={"etc/delivery_policy": "* max_connections=4\n",
               "etc/pools": "bulk vmta3\n"},
        master_cf_extra=vmtas())
    inject(p, 3, "pt-untrusted", headers="X-Virtual-MTA: bulk\n", threads=1)
    wait_count(rx, 3, 60)
    assert rx.by_peer() == {"127.0.0.2": 3}, rx.by_peer()
    assert all(b"x-virtual-mta" not in a.content.lower() for a in rx.accepted)
    assert p.log_search(r"X-Virtual-MTA header from an untrusted client ignored"), p.log_tail()
