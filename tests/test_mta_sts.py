"""MTA-STS (RFC 8461) in Postern's SMTP client, with real programs:
dnsmasq serves the MX, A and `_mta-sts` TXT records of a few test
domains; a Python HTTPS server (http.server in ssl, certificate from a
test CA made with openssl) on 127.x.y.z:443 serves each domain's policy
at https://mta-sts.DOMAIN/.well-known/mta-sts.txt; the receivers are
private Postfix instances (tests/postfix_peer.py) with STARTTLS: A with a
certificate from the test CA, B with a self-signed one. The smtp client
trusts the test CA through smtp_tls_CAfile, as an administrator would.
Each domain reaches its receiver through transport_maps `smtp:DOMAIN:PORT`
(an MX lookup, on the receiver's port).

- good.test (enforce, mx.good.test listed, receiver A): delivered,
  "Verified TLS connection established";
- unlisted.test (enforce, policy lists another host): deferred, the MX
  host is never contacted;
- selfsigned.test (enforce, receiver B): deferred, "Server certificate
  not verified" (Postfix's words at level secure);
- testing.test (testing, receiver B): delivered, the failure logged;
- none.test (none, receiver B): delivered as without a policy.
Then the cache: the policy of good.test changed on the web server with the
same TXT id is not fetched again; a new id makes it fetched and obeyed.
"""

import gzip
import json
import os
import random
import re
import shutil
import socket
import ssl
import subprocess
import tempfile
import threading
import types
import time
import uuid
from email import message_from_bytes
from email.policy import default as email_default
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

import postern_harness as h
from postfix_peer import TestCA, postfix_peer  # noqa: F401  (the fixture)

SENDER = "sender@example.org"
DOMAINS = ["good.test", "unlisted.test", "selfsigned.test", "testing.test", "none.test"]
# A TXT record but no policy on the web server (404): no policy, a
# TLS-RPT sts-policy-fetch-error.
BROKEN = "broken.test"


def policy(mode, *mx, max_age=86400):
    return "version: STSv1\r\nmode: %s\r\n%smax_age: %d\r\n" % (
        mode, "".join(f"mx: {m}\r\n" for m in mx), max_age)


class PolicyServer:
    """HTTPS on ip:443; ``policies``: {host: text}; ``fetches``: {host: n}."""

    def __init__(self, cert, key):
        self.policies = {}
        self.fetches = {}
        self.posts = []  # (host, path, content type, body)
        self.lock = threading.Lock()
        self.ip = self._free_ip()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                host = (self.headers.get("Host") or "").split(":")[0].lower()
                with outer.lock:
                    outer.fetches[host] = outer.fetches.get(host, 0) + 1
                    text = outer.policies.get(host)
                if self.path != "/.well-known/mta-sts.txt" or text is None:
                    self.send_error(404)
                    return
                body = text.encode()
                self.send_response(200)
                self.send_header("Content-Type", "text/plain")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_POST(self):
                n = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(n)
                with outer.lock:
                    outer.posts.append(((self.headers.get("Host") or "").split(":")[0].lower(),
                                        self.path, self.headers.get("Content-Type"), body))
                self.send_response(201)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer((self.ip, 443), Handler)
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(str(cert), str(key))
        self.httpd.socket = ctx.wrap_socket(self.httpd.socket, server_side=True)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    @staticmethod
    def _free_ip():
        for _ in range(50):
            ip = f"127.{random.randint(1, 254)}.{random.randint(1, 254)}.{random.randint(2, 254)}"
            s = socket.socket()
            try:
                s.bind((ip, 443))
                return ip
            except OSError:
                continue
            finally:
                s.close()
        raise AssertionError("no free 127.x.y.z:443")

    def count(self, host):
        with self.lock:
            return self.fetches.get(host, 0)

    def stop(self):
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(10)


def self_signed(d, names):
    d = Path(d)
    key, cert = d / "self.key", d / "self.pem"
    san = ",".join(f"DNS:{n}" for n in names)
    r = h.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", key,
               "-out", cert, "-days", "2", "-subj", f"/CN={names[0]}",
               "-addext", f"subjectAltName={san}",
               "-addext", "basicConstraints=critical,CA:FALSE"], timeout=60)
    assert r.returncode == 0, h.describe(r)
    os.chmod(key, 0o644)
    os.chmod(cert, 0o644)
    return types.SimpleNamespace(cert_file=cert, key_file=key)


def dns_args(web_ip, ids, conf_dir):
    args = ["--local=/test/"]
    for dom in ("good.test", BROKEN):
        args.append(f"--txt-record=_smtp._tls.{dom},v=TLSRPTv1; rua=mailto:tlsrpt@rpt.test")
    # A comma inside one TXT string: quoted, which dnsmasq honours in a
    # configuration file only (on its command line a comma splits strings).
    conf = Path(conf_dir) / "tlsrpt-dnsmasq.conf"
    conf.write_text('txt-record=_smtp._tls.testing.test,"v=TLSRPTv1; '
                    'rua=mailto:tlsrpt@rpt.test,https://mta-sts.testing.test/tlsrpt"\n')
    args.append(f"--conf-file={conf}")
    for dom in DOMAINS + [BROKEN]:
        args += [f"--mx-host={dom},mx.{dom},10", f"--host-record=mx.{dom},127.0.0.1",
                 f"--host-record=mta-sts.{dom},{web_ip}",
                 f"--txt-record=_mta-sts.{dom},v=STSv1; id={ids.get(dom, '1')}"]
    return args


def message(rcpt, token):
    return h.crlf(f"From: {SENDER}\nTo: {rcpt}\nSubject: {token}\n\n{token}\n")


@pytest.fixture
def world(postfix_peer):  # noqa: F811
    """The CA, the receivers, the policy server and DNS (see the module doc)."""
    if not h.dnsmasq_binary():
        pytest.skip("dnsmasq is not installed (scripts/test installs dnsmasq-base)")
    d = tempfile.mkdtemp(prefix="pt-sts-")
    ca = TestCA(d, names=["mx.good.test", "mx.unlisted.test"]
                + [f"mta-sts.{x}" for x in DOMAINS + [BROKEN]])
    d2 = tempfile.mkdtemp(prefix="pt-sts-self-")
    os.chmod(d2, 0o755)
    ss = self_signed(d2, ["mx.selfsigned.test", "mx.testing.test", "mx.none.test",
                          f"mx.{BROKEN}"])
    accept = {"virtual_mailbox_domains": " ".join(DOMAINS + [BROKEN, "rpt.test"])}
    a = postfix_peer(tls=ca, params=accept)
    b = postfix_peer(tls=ss, params=accept)
    web = PolicyServer(ca.cert_file, ca.key_file)
    web.policies.update({
        "mta-sts.good.test": policy("enforce", "mx.good.test"),
        "mta-sts.unlisted.test": policy("enforce", "mx.elsewhere.test"),
        "mta-sts.selfsigned.test": policy("enforce", "*.selfsigned.test"),
        "mta-sts.testing.test": policy("testing", "mx.testing.test"),
        "mta-sts.none.test": policy("none"),
    })
    dns = h.Dnsmasq(dns_args(web.ip, {}, d)).start()
    w = types.SimpleNamespace(ca=ca, a=a, b=b, web=web, dns=dns, dir=d)
    yield w
    w.dns.stop()
    web.stop()
    shutil.rmtree(d, ignore_errors=True)
    shutil.rmtree(d2, ignore_errors=True)


def postern_for(make_postern, w, **extra):
    ports = {"good.test": w.a.port, "unlisted.test": w.a.port}
    ports.update({x: w.b.port for x in ("selfsigned.test", "testing.test", "none.test", BROKEN)})
    transport = ", ".join(f"{dom}=smtp:{dom}:{port}" for dom, port in ports.items())
    # TLS-RPT reports go to receiver A, no MX lookup.
    transport += f", rpt.test=smtp:[127.0.0.1]:{w.a.port}"
    params = {
        "dns_resolver_addresses": f"127.0.0.1:{w.dns.port}",
        "transport_maps": f"inline:{{ {transport} }}",
        "smtp_tls_CAfile": str(w.ca.ca_file),
        "smtp_tls_loglevel": "1",
    }
    params.update(extra)
    return make_postern(params)


def send(p, domain):
    token = "pt-sts-" + uuid.uuid4().hex
    rcpt = f"user@{domain}"
    code, text = p.send(SENDER, [rcpt], message(rcpt, token))
    assert code == 250, text
    qid = re.search(r"queued as ([0-9A-F]+)", text).group(1)
    return token, qid


def outcome(p, qid, status):
    return p.wait_for_log(rf"{qid}: to=<[^>]+>, relay=[^\n]*status={status} \(([^\n]*)\)")


def test_policies_decide_delivery(make_postern, world):
    w = world
    p = postern_for(make_postern, w)

    # enforce, listed MX, certificate from the trusted CA: delivered.
    token, qid = send(p, "good.test")
    w.a.wait_for(token)
    outcome(p, qid, "sent")
    p.wait_for_log(rf"Verified TLS connection established to mx\.good\.test\[127\.0\.0\.1\]:{w.a.port}")
    assert w.web.count("mta-sts.good.test") == 1

    # enforce, MX host not in the policy: deferred, never contacted.
    before = w.a.connections()
    token, qid = send(p, "unlisted.test")
    m = outcome(p, qid, "deferred")
    assert m.group(1) == "MX host mx.unlisted.test does not match the MTA-STS policy of unlisted.test"
    assert re.search(rf"{qid}: .*dsn=4\.7\.5, status=deferred", p.log_text())
    assert not w.a.find(token) and w.a.connections() == before

    # enforce, self-signed certificate: deferred over TLS, no clear text.
    token, qid = send(p, "selfsigned.test")
    m = outcome(p, qid, "deferred")
    assert m.group(1) == "Server certificate not verified"
    p.wait_for_log(rf"Untrusted TLS connection established to mx\.selfsigned\.test\[127\.0\.0\.1\]:{w.b.port}")
    p.wait_for_log(rf"server certificate verification failed for mx\.selfsigned\.test\[127\.0\.0\.1\]:{w.b.port}: untrusted issuer")
    assert not w.b.find(token)

    # testing: delivered to the self-signed one, the failure logged.
    token, qid = send(p, "testing.test")
    w.b.wait_for(token)
    outcome(p, qid, "sent")
    p.wait_for_log(rf"{qid}: MTA-STS policy of testing\.test \(testing mode\): "
                   rf"mx\.testing\.test\[127\.0\.0\.1\]:{w.b.port} would fail: certificate-not-trusted")

    # none: as without a policy (may: the self-signed receiver gets it).
    token, qid = send(p, "none.test")
    w.b.wait_for(token)
    outcome(p, qid, "sent")
    assert w.web.count("mta-sts.none.test") == 1
    assert not re.search(r"MTA-STS policy of none\.test", p.log_text())

    # The policies are cached under data_directory/mta-sts.
    cached = Path(p.dir) / "data" / "mta-sts" / "good.test"
    assert cached.read_text().startswith("1 ")


def test_disabled_means_no_policy(make_postern, world):
    w = world
    p = postern_for(make_postern, w, smtp_mta_sts_enable="no")
    token, qid = send(p, "selfsigned.test")
    w.b.wait_for(token)
    outcome(p, qid, "sent")
    assert w.web.count("mta-sts.selfsigned.test") == 0


def test_cache_until_the_id_changes(make_postern, world):
    w = world
    p = postern_for(make_postern, w)
    token, qid = send(p, "good.test")
    w.a.wait_for(token)
    assert w.web.count("mta-sts.good.test") == 1

    # Another policy on the web server, same TXT id: the cached one holds.
    w.web.policies["mta-sts.good.test"] = policy("enforce", "mx.elsewhere.test")
    token, qid = send(p, "good.test")
    w.a.wait_for(token)
    outcome(p, qid, "sent")
    assert w.web.count("mta-sts.good.test") == 1

    # A new id: fetched again, and the new policy refuses mx.good.test.
    port = w.dns.port
    w.dns.stop()
    w.dns = h.Dnsmasq(dns_args(w.web.ip, {"good.test": "2"}, w.dir)).start(port=port)
    token, qid = send(p, "good.test")
    m = outcome(p, qid, "deferred")
    assert m.group(1) == "MX host mx.good.test does not match the MTA-STS policy of good.test"
    assert w.web.count("mta-sts.good.test") == 2
    assert not w.a.find(token)
    assert (Path(p.dir) / "data" / "mta-sts" / "good.test").read_text().startswith("2 ")


def test_tls_report_counts_the_sessions(make_postern, world):
    """TLS-RPT: testing-mode failures and enforce successes recorded by
    smtp; `postern tls-report send` mails each domain's RFC 8460 report
    (gzip attachment) to its `_smtp._tls` rua; parsed back, the counts
    are the sessions the log shows."""
    w = world
    p = postern_for(make_postern, w, smtp_tls_report_enable="yes",
                    smtp_tls_report_organization="Postern Test Org",
                    smtp_tls_report_contact="tlsrpt-contact@sender.test")
    for dom, peer in (("testing.test", w.b), ("testing.test", w.b), ("good.test", w.a),
                      (BROKEN, w.b)):
        token, qid = send(p, dom)
        peer.wait_for(token)
        outcome(p, qid, "sent")
    day = time.strftime("%Y-%m-%d", time.gmtime())
    store = Path(p.dir) / "data" / "tls-rpt" / day
    assert (store / "testing.test").exists() and (store / "good.test").exists()

    log = p.log_text()
    testing_sessions = len(re.findall(r"TLS connection established to mx\.testing\.test\[", log))
    good_sessions = len(re.findall(r"Verified TLS connection established to mx\.good\.test\[", log))
    assert testing_sessions >= 1 and good_sessions == 1

    r = p.postern("tls-report", "send", "-d", day)
    assert r.returncode == 0, h.describe(r)

    def report(domain):
        (_path, raw), = w.a.wait_for(f"TLS-Report-Domain: {domain}")
        msg = message_from_bytes(raw, policy=email_default)
        assert msg.get_content_type() == "multipart/report"
        assert msg.get_param("report-type") == "tlsrpt"
        assert msg["TLS-Report-Submitter"]
        part, = [x for x in msg.iter_attachments()
                 if x.get_content_type() == "application/tlsrpt+gzip"]
        assert re.fullmatch(rf"[^!]+!{re.escape(domain)}!\d+!\d+\.json\.gz", part.get_filename())
        return json.loads(gzip.decompress(part.get_content()))

    rep = report("testing.test")
    # The same report POSTed to the https: address (RFC 8460 section 5.4).
    (host, path, ctype, body), = [x for x in w.web.posts if x[0] == "mta-sts.testing.test"]
    assert (path, ctype) == ("/tlsrpt", "application/tlsrpt+gzip")
    assert json.loads(gzip.decompress(body)) == rep
    assert rep["organization-name"] == "Postern Test Org"
    assert rep["contact-info"] == "tlsrpt-contact@sender.test"
    assert rep["date-range"]["start-datetime"] == f"{day}T00:00:00Z"
    pol, = rep["policies"]
    assert pol["policy"]["policy-type"] == "sts"
    assert pol["policy"]["policy-domain"] == "testing.test"
    assert "mode: testing" in pol["policy"]["policy-string"]
    assert pol["policy"]["mx-host"] == ["mx.testing.test"]
    assert pol["summary"] == {"total-successful-session-count": 0,
                              "total-failure-session-count": testing_sessions}
    detail, = pol["failure-details"]
    assert detail["result-type"] == "certificate-not-trusted"
    assert detail["receiving-mx-hostname"] == "mx.testing.test"
    assert detail["receiving-ip"] == "127.0.0.1"
    assert detail["failed-session-count"] == testing_sessions

    rep = report("good.test")
    pol, = rep["policies"]
    assert pol["summary"] == {"total-successful-session-count": 1,
                              "total-failure-session-count": 0}
    assert pol["failure-details"] == []

    # The policy that could not be fetched: delivered as without one,
    # reported as an sts-policy-fetch-error per attempt.
    p.wait_for_log(r"warning: MTA-STS: cannot fetch the policy of broken\.test: "
                   r"mta-sts\.broken\.test: HTTP status 404")
    rep = report(BROKEN)
    pol, = rep["policies"]
    fetches = w.web.count(f"mta-sts.{BROKEN}")
    assert fetches >= 1
    assert pol["summary"] == {"total-successful-session-count": 0,
                              "total-failure-session-count": fetches}
    assert [d["result-type"] for d in pol["failure-details"]] == ["sts-policy-fetch-error"]

    # A day is reported once.
    r = p.postern("tls-report", "send", "-d", day)
    assert r.returncode == 0, h.describe(r)
    time.sleep(2)
    assert len(w.a.find("TLS-Report-Domain: testing.test")) == 1


def mta_sts_daemon():
    """postfix-mta-sts-resolver's daemon (PyPI; scripts/test installs it
    in /opt/postern-test-venv)."""
    return shutil.which("mta-sts-daemon") or next(
        (p for p in ["/opt/postern-test-venv/bin/mta-sts-daemon"] if os.access(p, os.X_OK)), None)


@pytest.mark.exclusive  # /etc/resolv.conf and 127.0.0.1:53 for the whole machine
def test_postfix_with_mta_sts_resolver_gives_the_same_outcomes(postfix_peer, world):  # noqa: F811
    """The same domains, policies and receivers, a private Postfix 3.7 as
    the sender with postfix-mta-sts-resolver answering its
    smtp_tls_policy_maps (socketmap): what Postern builds in. Postfix and
    the resolver read /etc/resolv.conf, so dnsmasq serves the same
    records on 127.0.0.1:53 and resolv.conf is replaced for the test and
    put back after it; the resolver trusts the test CA through
    SSL_CERT_FILE. Same outcomes: good, testing and none delivered,
    unlisted and selfsigned deferred (Postfix connects to the unlisted
    MX and refuses its certificate name; Postern does not connect)."""
    import smtplib
    daemon = mta_sts_daemon()
    if not daemon:
        pytest.skip("postfix-mta-sts-resolver is not installed (scripts/test installs it)")
    probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        probe.bind(("127.0.0.1", 53))
    except OSError:
        pytest.skip("127.0.0.1:53 is taken")
    finally:
        probe.close()
    w = world
    d = Path(tempfile.mkdtemp(prefix="pt-sts-pf-"))
    dns53 = h.Dnsmasq(dns_args(w.web.ip, {}, d)).start(port=53)
    bundle = d / "bundle.pem"
    bundle.write_bytes(Path("/etc/ssl/certs/ca-certificates.crt").read_bytes()
                       + Path(w.ca.ca_file).read_bytes())
    sport = h.free_port()
    (d / "mta-sts.yml").write_text(
        f"host: 127.0.0.1\nport: {sport}\nreuse_port: true\ncache:\n  type: internal\n"
        "default_zone:\n  strict_testing: false\n  timeout: 4\n")
    resolv = Path("/etc/resolv.conf")
    saved = resolv.read_bytes() if resolv.exists() else None
    proc = None
    try:
        resolv.write_text("nameserver 127.0.0.1\n")
        env = dict(os.environ, SSL_CERT_FILE=str(bundle))
        proc = subprocess.Popen([daemon, "-c", str(d / "mta-sts.yml"), "-v", "debug",
                                 "-l", str(d / "daemon.log"), "--disable-uvloop"],
                                env=env, stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        h.wait_for(lambda: _connects(sport), timeout=20, what="mta-sts-daemon")
        ports = {"good.test": w.a.port, "unlisted.test": w.a.port}
        ports.update({x: w.b.port for x in ("selfsigned.test", "testing.test", "none.test")})
        pf = postfix_peer(params={
            "transport_maps": "inline:{ " + ", ".join(
                f"{dom}=smtp:{dom}:{port}" for dom, port in ports.items()) + " }",
            "smtp_tls_policy_maps": f"socketmap:inet:127.0.0.1:{sport}:postfix",
            "smtp_tls_CAfile": str(w.ca.ca_file),
            "smtp_tls_security_level": "may",
            "smtp_tls_loglevel": "1",
            "smtp_host_lookup": "dns",
            "virtual_mailbox_domains": "sender.invalid",
        })
        for dom in DOMAINS:
            token = "pt-sts-pf-" + uuid.uuid4().hex
            with smtplib.SMTP("127.0.0.1", pf.port, timeout=30) as c:
                c.sendmail(SENDER, [f"user@{dom}"], message(f"user@{dom}", token))

        def status(dom):
            m = re.search(rf"to=<user@{re.escape(dom)}>,[^\n]*status=(\w+) \(([^\n]*)\)",
                          pf.log_text())
            return m and (m.group(1), m.group(2))

        got = {dom: h.wait_for(lambda dom=dom: status(dom), timeout=60,
                               what=f"Postfix's delivery to {dom}") for dom in DOMAINS}
        log = pf.log_text()
        assert got["good.test"][0] == "sent", log
        assert re.search(r"Verified TLS connection established to mx\.good\.test\[", log), log
        assert got["unlisted.test"] == ("deferred", "Server certificate not verified"), log
        assert got["selfsigned.test"] == ("deferred", "Server certificate not verified"), log
        assert got["testing.test"][0] == "sent", log
        assert got["none.test"][0] == "sent", log
    finally:
        if saved is not None:
            resolv.write_bytes(saved)
        if proc is not None:
            h.stop_process(proc)
        dns53.stop()
        shutil.rmtree(d, ignore_errors=True)


def _connects(port):
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False
