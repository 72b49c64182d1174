"""Issue #19: sites and traffic shaping in qmgr (`delivery_policy_maps`).

A scripted throttling receiver (tests/throttle_receiver.py) stands for a
big mailbox provider; dnsmasq gives the test domains their MX hosts, which
qmgr looks up itself to find each domain's site.
"""

import json
import time

import pytest

import postern_harness as h
from throttle_receiver import ThrottleReceiver

SENDER = "sender@example.org"


@pytest.fixture
def receivers():
    started = []

    def make(**kw):
        r = ThrottleReceiver(**kw).start()
        started.append(r)
        return r

    yield make
    for r in started:
        r.stop()


def inject(p, rcpts, token):
    """One SMTP session into Postern, one message per recipient in `rcpts`."""
    with p.smtp(timeout=60) as s:
        s.ehlo("client.example")
        for i, rcpt in enumerate(rcpts):
            msg = h.crlf(f"From: {SENDER}\nTo: {rcpt}\nSubject: {token} {i}\n\nbody {i}\n")
            s.sendmail(SENDER, [rcpt], msg)


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
    receiver (which refuses a 4th connection and more than 24 messages in
    any second: 20/s with room for the arrival jitter of loopback
    sessions, but not for a burst) never has to answer 4xx."""
    rx = receivers(max_connections=3, max_rate=24)
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
    assert rx.max_in_window(1.0) <= 24, rx.summary()
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
