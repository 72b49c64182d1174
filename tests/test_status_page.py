"""Issue #20 point 6: the status service (status/, man/status.8): an
unprivileged daemon started from master.cf that serves the operator's
HTML page and /metrics in the Prometheus text format, read-only, to the
clients of `status_access` only.

The page is loaded in headless Chromium (Debian's chromium and
chromium-driver, through python3-selenium), which checks what it shows
and saves a screenshot in bench/results/status-page.png; /metrics is
parsed by python3-prometheus-client's parser (the Prometheus text-format
rules) and its values compared with the queue.
"""

import json
import os
import re
import shutil
import socket
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

import postern_harness as h

SENDER = "sender@example.org"
RESULTS = h.REPO / "bench" / "results"


def shipped_status_line(port):
    """conf/etc/master.cf's status line, its address moved to `port`."""
    lines = [l for l in (h.REPO / "conf" / "etc" / "master.cf").read_text().splitlines()
             if re.match(r"^\S+\s+inet\s.*\sstatus$", l)]
    assert len(lines) == 1, lines
    addr, rest = lines[0].split(None, 1)
    assert addr.startswith("127.0.0.1:"), "shipped on a loopback address"
    return f"127.0.0.1:{port} {rest}"


def get(port, path, source="127.0.0.1", timeout=20):
    """(status, headers, body) of GET path from `source`."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout,
                                  source_address=(source, 0)) as s:
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode())
        return read_response(s)


def raw(port, data, timeout=20):
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(data)
        return read_response(s)


def read_response(s):
    buf = b""
    while True:
        chunk = s.recv(65536)
        if not chunk:
            break
        buf += chunk
    head, _, body = buf.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    code = int(lines[0].split()[1])
    headers = {k.lower(): v.strip() for k, v in (l.split(":", 1) for l in lines[1:])}
    return code, headers, body


def inject(p, rcpts, token):
    h.send_each(p, rcpts, token, SENDER)


def status_postern(make_postern, dnsmasq, rx, **params):
    dns = dnsmasq(["--local=/test/"] + [
        a for d in ("st", "sus", "bo")
        for a in (f"--mx-host={d}.test,mx.{d}.test,10", f"--host-record=mx.{d}.test,127.0.0.1")])
    table = "".join(f"{d}.test smtp:{d}.test:{rx.port}\n" for d in ("st", "sus", "bo"))
    port = h.free_port()
    base = {
        "dns_resolver_addresses": f"127.0.0.1:{dns.port}",
        "transport_maps": lambda p: f"texthash:{p.etc}/transport",
        "delivery_policy_maps": lambda p: f"texthash:{p.etc}/delivery_policy",
        "delivery_reply_rules": lambda p: f"regexp:{p.etc}/reply_rules",
        "minimal_backoff_time": "60s", "maximal_backoff_time": "60s",
    }
    base.update(params)
    p = make_postern(base, files={
        "etc/transport": table,
        "etc/delivery_policy": "st.test max_connections=3 max_message_rate=50/s\n"
                               "bo.test max_connections=4 max_message_rate=20/s\n"
                               "* max_connections=2\n",
        "etc/reply_rules": "/rate limited/ backoff\n"},
        master_cf_extra=[shipped_status_line(port)])
    p.status_port = port
    h.wait_for(lambda: h.smtp_banner_ok(p.port), 20, what="smtpd")
    return p


def status_pid(p):
    pids = []
    for pid in h.children_of(p.master_pid()):
        try:
            exe = os.readlink(f"/proc/{pid}/exe")
        except OSError:
            continue
        if os.path.basename(exe) == "status":
            pids.append(pid)
    return pids


def chromium_driver():
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        pytest.fail("python3-selenium is missing (scripts/test installs it)")
    chromium = shutil.which("chromium")
    driver = shutil.which("chromedriver")
    if not chromium or not driver:
        pytest.fail("chromium and chromium-driver are missing (scripts/test installs them)")
    profile = tempfile.mkdtemp(prefix="pt-chromium-")
    opts = webdriver.ChromeOptions()
    opts.binary_location = chromium
    for a in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
              "--window-size=1500,1300", f"--user-data-dir={profile}"):
        opts.add_argument(a)
    service = Service(executable_path=driver)
    d = webdriver.Chrome(service=service, options=opts)
    d.set_page_load_timeout(60)
    return d, service, profile


def test_status_page_in_chromium_and_metrics_match_the_queue(make_postern, dnsmasq, receiver):
    """Three sites: one normal, one suspended by the operator with mail
    held for it, one in backoff after a reply matched a rule. The page
    (in headless Chromium) shows the rows, the suspended one with its
    reason, the backoff one with its rule, reply and cut limits, the
    sparkline and the queue counts; /metrics parses as Prometheus text
    and its numbers are the queue's."""
    rx = receiver
    rx.set_rcpt("slow@bo.test", "451 4.7.1 rate limited, slow down")
    p = status_postern(make_postern, dnsmasq, rx)
    inject(p, [f"r{i}@st.test" for i in range(6)] + ["first@sus.test", "slow@bo.test"],
           "pt-status")
    h.wait_for(lambda: rx.count() >= 7, 60, what="7 messages at the receiver")
    p.wait_for_log(r"site mx\.bo\.test: backoff: rate 20/s -> 10/s, connections 4 -> 2")
    r = p.postern("suspend", "sus.test", "10m", "maintenance window")
    assert r.returncode == 0, h.describe(r)
    inject(p, ["held1@sus.test", "held2@sus.test"], "pt-status-held")
    h.wait_for(lambda: len(p.log_findall(r"held\d@sus\.test.*status=deferred.*suspended")) >= 2,
               30, what="held1 and held2 deferred")
    h.wait_for(lambda: len(p.queue_files("deferred")) == 3 and not p.queue_files("active"), 30,
               what="three messages in deferred/")

    # The daemon runs as mail_owner, not root.
    pids = status_pid(p)
    if not pids:
        # master starts it on the first connection.
        assert get(p.status_port, "/metrics")[0] == 200
        pids = h.wait_for(lambda: status_pid(p), 10, what="the status process")
    for pid in pids:
        uid = int(re.search(r"^Uid:\s+(\d+)", Path(f"/proc/{pid}/status").read_text(), re.M)[1])
        if h.is_root():
            assert uid != 0, "status serves as root"

    # /metrics
    from prometheus_client.parser import text_string_to_metric_families
    code, headers, body = get(p.status_port, "/metrics")
    assert code == 200, body
    assert headers["content-type"].startswith("text/plain; version=0.0.4"), headers
    families = {f.name: f for f in text_string_to_metric_families(body.decode())}
    # What promtool's lint asks too: a HELP and a TYPE per family, metric
    # names of the format's alphabet, counters ending in _total.
    name = r"[a-zA-Z_:][a-zA-Z0-9_:]*"
    for line in body.decode().splitlines():
        if line.startswith("#"):
            assert re.fullmatch(rf"# (HELP|TYPE) {name} \S.*", line), line
        else:
            assert re.fullmatch(rf'{name}(\{{.*\}})? \S+', line), line
    for f in families.values():
        assert f.documentation and f.type != "unknown", f.name
        if f.type == "counter":
            assert all(x.name.endswith("_total") for x in f.samples), f.samples

    def value(name, **labels):
        fam_name = re.sub(r"_(total|bucket|count|sum)$", "", name)
        fam = families.get(fam_name) or families[name]
        found = [s.value for s in fam.samples
                 if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())]
        assert len(found) == 1, (name, labels, fam.samples)
        return found[0]

    assert value("postfix_up") == 1
    for q in ("maildrop", "incoming", "active", "deferred", "hold"):
        n = len([f for f in p.queue_files(q) if q == "maildrop" or re.fullmatch(r"(.*/)?[0-9A-F]{14,}", f)])
        assert value("postern_queue_messages", queue=q) == n, q
        assert value("postfix_showq_message_size_bytes_count", queue=q) == n, q
    assert value("postern_queue_messages", queue="deferred") == 3
    # The parser names a counter's family without its _total.
    assert families["postern_deliveries"].type == "counter"
    assert value("postern_deliveries_total", status="sent", source="smtp", **{"class": ""}) == 7
    assert value("postfix_smtp_messages_processed_total", status="sent") == 7
    # The two held by the suspension: deferred by qmgr without an attempt.
    held = [x.value for x in families["postern_deliveries"].samples
            if x.labels.get("status") == "deferred" and x.labels.get("source") == "none"]
    assert sum(held) == 2, families["postern_deliveries"].samples
    sites = {json.loads(l)["site"]: json.loads(l) for l in p.postern("queues", "-j").stdout.splitlines()}
    assert set(sites) == {"mx.st.test", "mx.sus.test", "mx.bo.test"}, sites
    for name, s in sites.items():
        assert value("postern_site_connections", site=name) == s["active_connections"]
        queued = [x.value for x in families["postern_site_queued"].samples if x.labels["site"] == name]
        assert sum(queued) == s["queued"], (name, queued, s)
    # What waits on disk for each site: the deferred recipients of its domains.
    assert value("postern_site_deferred_recipients", site="mx.sus.test") == 2
    assert value("postern_site_deferred_recipients", site="mx.bo.test") == 1
    assert value("postern_site_deferred_recipients", site="mx.st.test") == 0
    assert value("postern_site_mode", site="mx.sus.test", mode="suspended") == 1
    assert value("postern_site_mode", site="mx.st.test", mode="normal") == 1
    assert value("postern_site_mode", site="mx.bo.test", mode="backoff") == 1
    assert value("postern_site_backoff", site="mx.bo.test") == 1
    assert value("postern_site_backoff", site="mx.st.test") == 0
    assert value("postern_site_connections_limit", site="mx.bo.test") == 2
    assert value("postern_site_connections_configured", site="mx.bo.test") == 4
    assert value("postern_site_message_rate_limit", site="mx.bo.test") == 10
    assert value("postern_site_message_rate_configured", site="mx.bo.test") == 20
    assert value("postern_site_deliveries_total", site="mx.bo.test", status="deferred") == 1
    rate_deferred = [x for x in families["postern_deliveries"].samples
                     if x.labels.get("status") == "deferred" and x.labels.get("source") == "smtp"]
    assert [x.value for x in rate_deferred] == [1] and rate_deferred[0].labels["class"], \
        rate_deferred
    assert value("postern_site_suspended_until_seconds", site="mx.sus.test") == \
        sites["mx.sus.test"]["suspended_until"]
    assert value("postern_site_connections_configured", site="mx.st.test") == 3
    assert value("postern_site_message_rate_configured", site="mx.st.test") == 50
    assert value("postern_site_deliveries_total", site="mx.st.test", status="sent") == 6
    assert value("postern_site_deliveries_total", site="mx.sus.test", status="sent") == 1
    assert value("postern_site_deliveries_total", site="mx.sus.test", status="deferred") == 2

    # The page, in Chromium.
    from selenium.webdriver.common.by import By
    driver, service, profile = chromium_driver()
    try:
        driver.get(f"http://127.0.0.1:{p.status_port}/")
        assert "Postern status" in driver.title, driver.title
        rows = {r.get_attribute("data-site"): r
                for r in driver.find_elements(By.CSS_SELECTOR, "#sites tr.site")}
        assert set(rows) == {"mx.st.test", "mx.sus.test", "mx.bo.test"}, list(rows)
        sus = rows["mx.sus.test"]
        assert "suspended" in sus.get_attribute("class").split()
        assert "suspended" in sus.text and "maintenance window" in sus.text, sus.text
        assert "sus.test" in sus.text
        # Queued: none in qmgr, the two held on disk.
        assert sus.find_element(By.CSS_SELECTOR, "td.queued").text == "0 / 2", sus.text
        st = rows["mx.st.test"]
        assert "normal" in st.text and "st.test" in st.text and "smtp" in st.text, st.get_attribute("outerHTML")
        # Connections and rate against their limits.
        assert "0 / 3" in st.text and "50/s" in st.text, st.text
        bo = rows["mx.bo.test"]
        assert "backoff" in bo.get_attribute("class").split()
        assert 'rule "backoff"' in bo.text and "451 4.7.1 rate limited, slow down" in bo.text, \
            bo.text
        # Connections and rate cut, against the configured limits.
        assert "0 / 2 of 4" in bo.text and "10/s of 20/s" in bo.text, bo.text
        assert driver.find_element(By.ID, "queue-deferred").text == "3"
        lines = driver.find_elements(By.CSS_SELECTOR, "#sparkline polyline")
        assert [l.get_attribute("class") for l in lines] == ["delivered", "deferred", "bounced"]
        legend = driver.find_element(By.CSS_SELECTOR, ".legend").text
        assert "delivered 7" in legend and "deferred 3" in legend, legend
        # An hour of minutes; the first (before qmgr started) on the
        # baseline, the minute of the deliveries above it.
        pts = [float(xy.split(",")[1]) for xy in lines[0].get_attribute("points").split()]
        assert len(pts) == 60 and min(pts) < pts[0], pts
        # Nothing loaded from elsewhere: only the page itself.
        res = driver.execute_script(
            "return performance.getEntriesByType('resource').map(e => e.name)")
        assert res == [], res
        RESULTS.mkdir(parents=True, exist_ok=True)
        driver.save_screenshot(str(RESULTS / "status-page.png"))
    finally:
        pid = service.process.pid if service.process else None
        try:
            driver.quit()
        finally:
            if pid and h.pid_alive(pid):
                h.kill_pid(pid)
            shutil.rmtree(profile, ignore_errors=True)
    assert (RESULTS / "status-page.png").stat().st_size > 10000


def test_status_access_and_bad_requests(make_postern, dnsmasq, receiver):
    """A client outside status_access gets 403; a malformed, oversized,
    hostless or non-GET request gets 400 (405 for POST); one that says
    nothing is answered 400 after the request timeout; the daemon keeps
    serving."""
    p = status_postern(make_postern, dnsmasq, receiver, status_access="127.0.0.1/32")
    port = p.status_port
    code, _, body = get(port, "/", source="127.0.0.2")
    assert code == 403, body
    code, headers, body = get(port, "/")
    assert code == 200 and headers["content-type"].startswith("text/html"), body
    assert b"<script" not in body
    assert get(port, "/nosuch")[0] == 404
    assert raw(port, b"GARBAGE\r\n\r\n")[0] == 400
    assert raw(port, b"GET / HTTP/1.1\r\n\r\n")[0] == 400, "no Host"
    assert raw(port, b"GET / HTTP/1.1\r\nHost: x\r\nX-Long: " + b"a" * 20000 + b"\r\n\r\n")[0] == 400
    assert raw(port, b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc")[0] == 400
    assert raw(port, b"POST /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n")[0] == 405
    t0 = time.monotonic()
    assert raw(port, b"GET / HTTP/1.1\r\nHost: x\r\n", timeout=30)[0] == 400
    assert time.monotonic() - t0 < 25
    code, _, body = get(port, "/metrics")
    assert code == 200 and b"postfix_up" in body
    assert p.log_search(r"status\[\d+\]: .*refused 127\.0\.0\.2: not in status_access")


def test_postern_check_refuses_a_bad_status_access(make_postern):
    """A status_access entry that is not an address or network stops
    `postern check` with one line naming it."""
    p = make_postern({"status_access": "127.0.0.0/8, 10.1.2.3/8"}, start=False)
    r = p.postern("check")
    assert r.returncode == 1, h.describe(r)
    assert re.search(r"status_access: .*10\.1\.2\.3/8", r.stderr), r.stderr
    p.set_params(status_access="127.0.0.0/8, [::1]/128")
    r = p.postern("check")
    assert r.returncode == 0, h.describe(r)


def test_status_refuses_to_serve_as_root(make_postern):
    """On a master.cf line with unpriv = n master would leave it root: it
    logs a fatal error and never answers HTTP."""
    if not h.is_root():
        pytest.skip("needs root (master drops only when it is root)")
    port = h.free_port()
    p = make_postern(master_cf_extra=[f"127.0.0.1:{port} inet n n n - 1 status"])
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(f"GET / HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode())
        p.wait_for_log(r"status\[\d+\]: fatal: refusing to serve HTTP as root")
        try:
            got = s.recv(100)
        except (ConnectionResetError, socket.timeout):
            got = b""
    assert got == b"", got


def test_a_saved_suspension_shows_after_a_restart(make_postern, dnsmasq, receiver):
    """A site suspended before `postern stop` and `start` is shown
    suspended, with its reason, before any mail for it comes again."""
    rx = receiver
    p = status_postern(make_postern, dnsmasq, rx)
    inject(p, ["first@sus.test"], "pt-status-restart")
    h.wait_for(lambda: rx.count() >= 1, 60, what="the message at the receiver")
    r = p.postern("suspend", "sus.test", "10m", "saved maintenance window")
    assert r.returncode == 0, h.describe(r)
    p.stop()
    p.start()
    h.wait_for(lambda: h.smtp_banner_ok(p.port), 20, what="smtpd")
    # The page answers as soon as master runs; the sites come from qmgr,
    # which may not listen yet just after the start (the page says so).
    code, _, body = h.wait_for(lambda: (lambda r: r if r[0] == 200
                                        and b'id="qmgr-down"' not in r[2] else None)(
        get(p.status_port, "/")), 20, what="the page with qmgr's answer")
    page = body.decode()
    row = re.search(r'<tr class="site suspended" data-site="mx\.sus\.test">.*?</tr>', page)
    assert row and "saved maintenance window" in row[0], page
    _, _, body = get(p.status_port, "/metrics")
    assert 'postern_site_mode{site="mx.sus.test",mode="suspended"} 1' in body.decode()
