"""postscreen(8) in front of the `smtpd pass` service (issue #25, point 4).

master runs Postern's postscreen on the stock master.cf line
``smtp inet n - y - 1 postscreen``; a client that passes is handed to
``smtpd pass - - y - - smtpd`` by descriptor passing. A client that talks
before the greeting is refused, a polite one is delivered through smtpd,
the allowlist cache lets it straight through the next time, the access
list allow- and denylists, a DNSBL zone served by dnsmasq scores the
client, the deep protocol tests catch pipelining, non-SMTP commands and
bare newlines (with STARTTLS offered by postscreen itself), fail2ban's stock filter reads the PREGREET line, and a
private Postfix's postscreen logs the same lines for the same clients.
"""

import re
import shutil
import socket
import subprocess
import time
import uuid

import pytest

import postern_harness as h
from postfix_peer import PostfixPeer, postfix_available

FILTER = "/etc/fail2ban/filter.d/postfix.conf"
WAIT = 1  # postscreen_greet_wait, seconds


def postscreen_instance(make_postern, files=None, **params):
    base = {
        "postscreen_greet_wait": f"{WAIT}s",
        # Loopback is in mynetworks: the default access list would let
        # every test client through untested.
        "postscreen_access_list": "",
        "home_mailbox": "Maildir/",
    }
    base.update(params)
    p = make_postern(params=base, files=files, start=False)
    p.master_cf_extra = [
        f"127.0.0.1:{p.port} inet n - n - 1 postscreen",
        "smtpd pass - - n - - smtpd",
    ]
    p.write_master_cf()
    p.start()
    return p


def read_reply(s):
    data = b""
    while True:
        chunk = s.recv(4096)
        if not chunk:
            return data.decode(errors="replace")
        data += chunk
        lines = data.split(b"\r\n")
        if len(lines) >= 2 and any(len(l) >= 4 and l[3:4] == b" " for l in lines[:-1]):
            return data.decode(errors="replace")


def impolite(port, line=b"EHLO spammer.example\r\n"):
    """Talks at once; returns everything the server says until it hangs up."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(line)
        out = b""
        while True:
            try:
                chunk = s.recv(4096)
            except OSError:
                break
            if not chunk:
                break
            out += chunk
        return out.decode(errors="replace")


def polite_delivery(p, token):
    """Waits for the whole greeting (postscreen's 220- then smtpd's 220)
    and sends one message to ptalice; returns (greeting, DATA's code)."""
    with socket.create_connection(("127.0.0.1", p.port), timeout=WAIT + 20) as s:
        greeting = read_reply(s)
        f = s.makefile("rwb")

        def cmd(line):
            f.write(line.encode() + b"\r\n")
            f.flush()
            reply = b""
            while True:
                l = f.readline()
                reply += l
                if len(l) < 4 or l[3:4] == b" ":
                    return reply.decode()

        assert cmd("EHLO polite.example").startswith("250"), greeting
        assert cmd("MAIL FROM:<sender@example.org>").startswith("250")
        assert cmd(f"RCPT TO:<ptalice@{h.MYHOSTNAME}>").startswith("250")
        assert cmd("DATA").startswith("354")
        code = cmd(f"Subject: {token}\r\n\r\nhello\r\n.")
        cmd("QUIT")
        return greeting, code


def test_pregreet_is_refused_and_a_polite_client_is_delivered(make_postern):
    h.ensure_local_users()
    p = postscreen_instance(make_postern, postscreen_greet_action="drop",
                            postscreen_greet_banner="$smtpd_banner")
    out = impolite(p.port)
    assert "521 5.5.1 Protocol error" in out, out
    p.wait_for_log(r"postscreen\[\d+\]: PREGREET 22 after [\d.]+ from \[127\.0\.0\.1\]:\d+: "
                   r"EHLO spammer\.example\\r\\n$")
    p.wait_for_log(r"postscreen\[\d+\]: CONNECT from \[127\.0\.0\.1\]:\d+ to \[127\.0\.0\.1\]:\d+")
    p.wait_for_log(r"postscreen\[\d+\]: DISCONNECT \[127\.0\.0\.1\]:\d+")
    token = uuid.uuid4().hex
    greeting, code = polite_delivery(p, token)
    # postscreen's teaser, then smtpd's own greeting on the same connection.
    assert greeting.startswith("220-"), greeting
    assert "\r\n220 " in greeting, greeting
    assert code.startswith("250"), code
    h.wait_for_messages("ptalice", token)
    p.wait_for_log(r"postscreen\[\d+\]: PASS NEW \[127\.0\.0\.1\]:\d+")
    # smtpd served the session postscreen handed over.
    p.wait_for_log(r"smtpd\[\d+\]: connect from \S+\[127\.0\.0\.1\]")
    # The cache: the next connection is let through at once.
    token2 = uuid.uuid4().hex
    start = time.monotonic()
    greeting, code = polite_delivery(p, token2)
    assert code.startswith("250"), code
    assert not greeting.startswith("220-"), greeting
    assert time.monotonic() - start < WAIT + 5
    p.wait_for_log(r"postscreen\[\d+\]: PASS OLD \[127\.0\.0\.1\]:\d+")
    h.wait_for_messages("ptalice", token2)


def test_pregreet_enforce_rejects_every_recipient(make_postern):
    p = postscreen_instance(make_postern, postscreen_greet_action="enforce")
    with socket.create_connection(("127.0.0.1", p.port), timeout=10) as s:
        s.sendall(b"EHLO early.example\r\n")
        f = s.makefile("rwb")
        lines = []
        while True:
            l = f.readline().decode()
            lines.append(l)
            if l.startswith("250 ") or not l:
                break
        # Postfix greets no client that talked first: the teaser only.
        assert lines[0].startswith("220-"), lines
        assert not any(l.startswith("220 ") for l in lines), lines
        f.write(b"MAIL FROM:<a@example.org>\r\n")
        f.flush()
        assert f.readline().startswith(b"250")
        f.write(b"RCPT TO:<ptalice@" + h.MYHOSTNAME.encode() + b">\r\n")
        f.flush()
        assert f.readline().startswith(b"550 5.5.1 Protocol error")
        f.write(b"QUIT\r\n")
        f.flush()
        assert f.readline().startswith(b"221")
    p.wait_for_log(r"postscreen\[\d+\]: NOQUEUE: reject: RCPT from \[127\.0\.0\.1\]:\d+: "
                   r"550 5\.5\.1 Protocol error; from=<a@example\.org>, to=<ptalice@\S+>, "
                   r"proto=ESMTP, helo=<early\.example>")


def test_access_list_allows_and_denies(make_postern):
    cidr = "127.0.0.2 reject\n127.0.0.0/8 permit\n"
    p = postscreen_instance(
        make_postern,
        files={"etc/ps_access.cidr": cidr},
        postscreen_access_list=lambda p: f"cidr:{p.etc}/ps_access.cidr",
        # The old name still works.
        postscreen_blacklist_action="drop",
    )
    with socket.create_connection(("127.0.0.1", p.port), timeout=10,
                                  source_address=("127.0.0.2", 0)) as s:
        assert read_reply(s).startswith("521 5.3.2 Service currently unavailable")
    p.wait_for_log(r"postscreen\[\d+\]: DENYLISTED \[127\.0\.0\.2\]:\d+")
    # Allowlisted: smtpd greets at once, no teaser, no wait.
    with socket.create_connection(("127.0.0.1", p.port), timeout=10,
                                  source_address=("127.0.0.3", 0)) as s:
        start = time.monotonic()
        g = read_reply(s)
        assert g.startswith("220 "), g
        assert time.monotonic() - start < WAIT
    p.wait_for_log(r"postscreen\[\d+\]: ALLOWLISTED \[127\.0\.0\.3\]:\d+")


def test_fail2ban_aggressive_matches_pregreet(make_postern):
    if not shutil.which("fail2ban-regex") or not h.os.path.exists(FILTER):
        pytest.skip("needs fail2ban (scripts/test installs it)")
    p = postscreen_instance(make_postern, postscreen_greet_action="drop")
    impolite(p.port)
    p.wait_for_log(r"PREGREET")
    r = subprocess.run(["fail2ban-regex", "-o", "msg", str(p.maillog),
                        "postfix[mode=aggressive]"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert any("PREGREET" in l for l in r.stdout.splitlines()), r.stdout


def postscreen_ehlo_keywords(port):
    """The EHLO keywords of postscreen's own dialogue, to a client that
    talked first (pregreet under `enforce`)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(b"EHLO early.example\r\n")
        f = s.makefile("rwb")
        lines = []
        while True:
            l = f.readline().decode()
            lines.append(l)
            if l.startswith("250 ") or not l:
                break
        f.write(b"QUIT\r\n")
        f.flush()
    return [l[4:].strip().split()[0] for l in lines if l.startswith("250")][1:]


def test_discard_ehlo_keywords_in_the_dialogue(make_postern):
    """postscreen_discard_ehlo_keywords (default
    $smtpd_discard_ehlo_keywords, mailcow sets it) takes keywords out of
    postscreen's EHLO reply, case-insensitively; the others stay."""
    p = postscreen_instance(make_postern, postscreen_greet_action="enforce",
                            postscreen_discard_ehlo_keywords="dsn, 8bitmime, silent-discard")
    words = postscreen_ehlo_keywords(p.port)
    assert "ENHANCEDSTATUSCODES" in words and "SIZE" in words, words
    assert "DSN" not in words and "8BITMIME" not in words, words
    p.stop()
    p = postscreen_instance(make_postern, postscreen_greet_action="enforce",
                            smtpd_discard_ehlo_keywords="enhancedstatuscodes")
    words = postscreen_ehlo_keywords(p.port)
    assert "ENHANCEDSTATUSCODES" not in words and "DSN" in words, words


def test_cache_cleanup_interval(make_postern):
    """postscreen_cache_cleanup_interval: once it has passed, the next
    change to the cache drops what expired longer than
    postscreen_cache_retention_time ago and logs it as Postfix does."""
    p = postscreen_instance(make_postern, postscreen_cache_cleanup_interval="2s",
                            postscreen_cache_retention_time="1s", postscreen_greet_ttl="1s")
    s, f = dialogue(p.port, "127.0.0.21", b"QUIT\r\n")
    s.close()
    p.wait_for_log(r"PASS NEW \[127\.0\.0\.21\]")
    time.sleep(3.5)
    s, f = dialogue(p.port, "127.0.0.22", b"QUIT\r\n")
    s.close()
    p.wait_for_log(r"postscreen\[\d+\]: cache btree:\S+postscreen_cache full cleanup: "
                   r"retained=1 dropped=1 entries")


def test_postern_check_refuses_postscreen_settings_not_offered(make_postern):
    p = make_postern(params={"postscreen_upstream_proxy_protocol": "haproxy",
                             "postscreen_greet_action": "enforce"}, start=False)
    r = p.postern("check")
    assert r.returncode != 0
    assert "postscreen_upstream_proxy_protocol: not honoured by Postern" in r.stderr + r.stdout
    assert "postscreen_greet_action" not in r.stderr + r.stdout


def test_dnsbl_score_refuses_a_listed_client_at_the_threshold(make_postern, dnsmasq):
    dns = dnsmasq([
        # 127.0.0.2 is in bl.test (answer 127.0.0.2) and in other.test
        # with an answer the filter leaves out; 127.0.0.3 is in no list.
        "--address=/2.0.0.127.bl.test/127.0.0.2",
        "--address=/2.0.0.127.other.test/127.0.0.99",
    ])
    p = postscreen_instance(
        make_postern,
        dns_resolver_addresses=f"127.0.0.1:{dns.port}",
        postscreen_dnsbl_sites="bl.test=127.0.0.[2..3]*2, other.test=127.0.0.2*5",
        postscreen_dnsbl_threshold="2",
        postscreen_dnsbl_action="drop",
        postscreen_dnsbl_reply_map=lambda p: f"texthash:{p.etc}/dnsbl_reply",
        files={"etc/dnsbl_reply": "bl.test=127.0.0.[2..3] our-blocklist\n"},
    )
    with socket.create_connection(("127.0.0.1", p.port), timeout=10,
                                  source_address=("127.0.0.2", 0)) as s:
        out = b""
        while True:
            chunk = s.recv(4096)
            if not chunk:
                break
            out += chunk
    out = out.decode()
    assert "521 5.7.1 Service unavailable; client [127.0.0.2] blocked using our-blocklist" in out, out
    p.wait_for_log(r"postscreen\[\d+\]: DNSBL rank 2 for \[127\.0\.0\.2\]:\d+")
    with socket.create_connection(("127.0.0.1", p.port), timeout=10,
                                  source_address=("127.0.0.3", 0)) as s:
        g = read_reply(s)
        assert "\r\n220 " in g, g
    p.wait_for_log(r"postscreen\[\d+\]: PASS NEW \[127\.0\.0\.3\]:\d+")
    assert not p.log_search(r"DNSBL rank \d+ for \[127\.0\.0\.3\]")


def dialogue(port, source, first, timeout=10):
    """Connects from `source`, reads the whole greeting, sends `first`
    (bytes) and returns a file for the rest."""
    s = socket.create_connection(("127.0.0.1", port), timeout=timeout,
                                 source_address=(source, 0))
    greeting = read_reply(s)
    assert "\r\n220 " in greeting or greeting.startswith("220 "), greeting
    s.sendall(first)
    return s, s.makefile("rwb")


def reply_of(f):
    lines = []
    while True:
        l = f.readline().decode()
        lines.append(l)
        if len(l) < 4 or l[3] == " ":
            return "".join(lines)


def test_deep_protocol_tests(make_postern):
    h.ensure_local_users()
    p = postscreen_instance(
        make_postern,
        postscreen_pipelining_enable="yes",
        postscreen_pipelining_action="enforce",
        postscreen_non_smtp_command_enable="yes",
        postscreen_non_smtp_command_action="drop",
        postscreen_bare_newline_enable="yes",
        postscreen_bare_newline_action="drop",
    )
    # A clean client passes, is told to come back, and then goes through.
    s, f = dialogue(p.port, "127.0.0.4", b"EHLO good.example\r\n")
    assert reply_of(f).startswith("250")
    f.write(b"MAIL FROM:<a@example.org>\r\n"); f.flush()
    assert reply_of(f).startswith("250")
    f.write(b"RCPT TO:<ptalice@" + h.MYHOSTNAME.encode() + b">\r\n"); f.flush()
    assert reply_of(f).startswith("450 4.3.2 Service currently unavailable")
    f.write(b"QUIT\r\n"); f.flush()
    assert reply_of(f).startswith("221")
    s.close()
    p.wait_for_log(r"postscreen\[\d+\]: PASS NEW \[127\.0\.0\.4\]:\d+")
    with socket.create_connection(("127.0.0.1", p.port), timeout=10,
                                  source_address=("127.0.0.4", 0)) as c:
        g = read_reply(c)
        assert g.startswith("220 ") and "Postern" in g, g
    p.wait_for_log(r"postscreen\[\d+\]: PASS OLD \[127\.0\.0\.4\]:\d+")
    # Pipelining where none was offered: enforce rejects its recipients.
    s, f = dialogue(p.port, "127.0.0.5",
                    b"EHLO pipe.example\r\nMAIL FROM:<a@example.org>\r\n")
    assert reply_of(f).startswith("250")
    assert reply_of(f).startswith("250")
    f.write(b"RCPT TO:<ptalice@" + h.MYHOSTNAME.encode() + b">\r\n"); f.flush()
    assert reply_of(f).startswith("550 5.5.1 Protocol error")
    s.close()
    p.wait_for_log(r"postscreen\[\d+\]: COMMAND PIPELINING from \[127\.0\.0\.5\]:\d+ "
                   r"after EHLO: MAIL FROM:<a@example\.org>\\r\\n")
    # An HTTP request: dropped.
    s, f = dialogue(p.port, "127.0.0.6", b"GET / HTTP/1.0\r\n")
    assert reply_of(f).startswith("521 5.7.0 Error: I can break rules, too. Goodbye.")
    s.close()
    p.wait_for_log(r"postscreen\[\d+\]: NON-SMTP COMMAND from \[127\.0\.0\.6\]:\d+ "
                   r"after CONNECT: GET / HTTP/1\.0")
    # A bare newline: dropped.
    s, f = dialogue(p.port, "127.0.0.7", b"EHLO lf.example\n")
    assert reply_of(f).startswith("521 5.5.1 Protocol error")
    s.close()
    p.wait_for_log(r"postscreen\[\d+\]: BARE NEWLINE from \[127\.0\.0\.7\]:\d+ "
                   r"after EHLO lf\.example")


def postscreen_events(log_text):
    """postscreen's lines, without time, process ID, ports and timings."""
    out = []
    for line in log_text.splitlines():
        m = re.search(r"postscreen\[\d+\]: (.*)$", line)
        if not m or m.group(1).startswith(("warning:", "statistics:")):
            continue
        text = re.sub(r"\]:\d+", "]:P", m.group(1))
        out.append(re.sub(r" after [\d.]+ ", " after T ", text))
    return out


def scripted_clients(port):
    """The same traffic for both servers: a client that talks first, then
    a polite one that waits for the whole greeting and quits."""
    assert "521 5.5.1 Protocol error" in impolite(port)
    with socket.create_connection(("127.0.0.1", port), timeout=WAIT + 20) as s:
        g = read_reply(s)
        assert g.startswith("220-") and "\r\n220 " in g, g
        s.sendall(b"QUIT\r\n")
        assert s.recv(1024).startswith(b"221")


def test_same_log_as_postfix_postscreen(make_postern):
    if not postfix_available() or not h.is_root():
        pytest.skip("needs Postfix (scripts/test installs it) and root")
    params = {"postscreen_greet_wait": f"{WAIT}s", "postscreen_greet_action": "drop",
              "postscreen_access_list": ""}
    far = PostfixPeer(params=params)
    master = (far.etc / "master.cf").read_text()
    master = master.replace(
        f"127.0.0.1:{far.port} inet n - n - - smtpd\n",
        f"127.0.0.1:{far.port} inet n - n - 1 postscreen\n"
        "smtpd     pass  -       -       n       -       -       smtpd\n"
        "dnsblog   unix  -       -       n       -       0       dnsblog\n")
    (far.etc / "master.cf").write_text(master)
    try:
        far.start()
        p = postscreen_instance(make_postern, **params)
        scripted_clients(far.port)
        scripted_clients(p.port)
        want = ["CONNECT from [127.0.0.1]:P to [127.0.0.1]:P",
                "PREGREET 22 after T from [127.0.0.1]:P: EHLO spammer.example\\r\\n",
                "DISCONNECT [127.0.0.1]:P",
                "CONNECT from [127.0.0.1]:P to [127.0.0.1]:P",
                "PASS NEW [127.0.0.1]:P"]

        def scripted_part(log_text):
            """From the scripted client's CONNECT on (the start-up probe
            talked to postscreen too)."""
            ev = postscreen_events(log_text)
            at = next((i for i, e in enumerate(ev) if e.startswith("PREGREET 22 ")), None)
            return [] if at is None else ev[at - 1:]

        for what, text in (("Postfix", far.log_text), ("Postern", p.log_text)):
            h.wait_for(lambda: len(scripted_part(text())) >= len(want), 10,
                       what=f"{what}'s postscreen lines")
            assert scripted_part(text())[:len(want)] == want, (what, scripted_part(text()))
    finally:
        far.stop()


def test_dnswl_below_the_allowlist_threshold_skips_the_wait(make_postern, dnsmasq):
    dns = dnsmasq(["--address=/8.0.0.127.wl.test/127.0.10.2"])
    p = postscreen_instance(
        make_postern,
        dns_resolver_addresses=f"127.0.0.1:{dns.port}",
        postscreen_greet_wait="8s",
        postscreen_dnsbl_sites="wl.test=127.0.[0..255].[1..3]*-2, bl.test",
        # The old name still works.
        postscreen_dnsbl_whitelist_threshold="-1",
        # Skipped too for an allowlisted client.
        postscreen_pipelining_enable="yes",
    )
    with socket.create_connection(("127.0.0.1", p.port), timeout=20,
                                  source_address=("127.0.0.8", 0)) as s:
        start = time.monotonic()
        g = read_reply(s)
        took = time.monotonic() - start
        s.sendall(b"EHLO wl.example\r\n")
        ehlo = read_reply(s)
    assert "\r\n220 " in g, g
    assert took < 5, took
    # smtpd's EHLO (postscreen's own dialogue offers no PIPELINING).
    assert "PIPELINING" in ehlo, ehlo
    p.wait_for_log(r"postscreen\[\d+\]: PASS NEW \[127\.0\.0\.8\]:\d+")


def test_connection_limits(make_postern):
    p = postscreen_instance(make_postern, postscreen_greet_wait="5s",
                            postscreen_client_connection_count_limit="2",
                            postscreen_pre_queue_limit="3")
    held = []
    try:
        for _ in range(2):
            held.append(socket.create_connection(("127.0.0.1", p.port), timeout=10,
                                                 source_address=("127.0.0.9", 0)))
        # A third from the same client: too many connections.
        with socket.create_connection(("127.0.0.1", p.port), timeout=10,
                                      source_address=("127.0.0.9", 0)) as s:
            assert "421 4.7.0 Error: too many connections" in read_reply(s)
        p.wait_for_log(r"postscreen\[\d+\]: NOQUEUE: reject: CONNECT from "
                       r"\[127\.0\.0\.9\]:\d+: too many connections")
        held.append(socket.create_connection(("127.0.0.1", p.port), timeout=10,
                                             source_address=("127.0.0.10", 0)))
        time.sleep(0.3)
        # A fourth client in the tests at once: all screening ports busy.
        with socket.create_connection(("127.0.0.1", p.port), timeout=10,
                                      source_address=("127.0.0.11", 0)) as s:
            assert "421 4.3.2 All screening ports are busy" in read_reply(s)
        p.wait_for_log(r"postscreen\[\d+\]: reject: connect from \[127\.0\.0\.11\]:\d+: "
                       r"all screening ports busy")
    finally:
        for s in held:
            s.close()


def test_starttls_in_the_deep_tests(make_postern, tmp_path):
    import ssl
    from postfix_peer import TestCA
    ca = TestCA(tmp_path / "ca", names=["postern.test"])
    p = postscreen_instance(
        make_postern,
        smtpd_tls_cert_file=str(ca.cert_file),
        smtpd_tls_key_file=str(ca.key_file),
        smtpd_tls_security_level="may",
        postscreen_tls_security_level="encrypt",
        postscreen_pipelining_enable="yes",
    )
    s, f = dialogue(p.port, "127.0.0.12", b"EHLO tls.example\r\n")
    ehlo = reply_of(f)
    assert "250-STARTTLS" in ehlo, ehlo
    f.write(b"MAIL FROM:<a@example.org>\r\n"); f.flush()
    assert reply_of(f).startswith("530 5.7.0 Must issue a STARTTLS command first")
    f.write(b"STARTTLS\r\n"); f.flush()
    assert reply_of(f).startswith("220 2.0.0")
    ctx = ssl.create_default_context(cafile=str(ca.ca_file))
    t = ctx.wrap_socket(s, server_hostname="postern.test")
    tf = t.makefile("rwb")
    tf.write(b"EHLO tls.example\r\n"); tf.flush()
    assert "STARTTLS" not in reply_of(tf)
    tf.write(b"MAIL FROM:<a@example.org>\r\n"); tf.flush()
    assert reply_of(tf).startswith("250")
    tf.write(b"RCPT TO:<ptalice@" + h.MYHOSTNAME.encode() + b">\r\n"); tf.flush()
    assert reply_of(tf).startswith("450 4.3.2")
    tf.write(b"QUIT\r\n"); tf.flush()
    assert reply_of(tf).startswith("221")
    t.close()
    p.wait_for_log(r"postscreen\[\d+\]: PASS NEW \[127\.0\.0\.12\]:\d+")
    # Back again: smtpd, which offers STARTTLS itself.
    with socket.create_connection(("127.0.0.1", p.port), timeout=10,
                                  source_address=("127.0.0.12", 0)) as c:
        assert read_reply(c).startswith("220 ")
        c.sendall(b"EHLO tls.example\r\n")
        assert "STARTTLS" in read_reply(c)
    p.wait_for_log(r"postscreen\[\d+\]: PASS OLD \[127\.0\.0\.12\]:\d+")
