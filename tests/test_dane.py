"""DANE (RFC 7672) in Postern's SMTP client, against a DNSSEC-signed zone
(ldns-signzone) served by a validating unbound (an auth-zone with the KSK
as trust anchor) on a loopback address, and real Postfix receivers
(tests/postfix_peer.py) on free ports, reached as `[host]:port` so that
the TLSA names are `_PORT._tcp.HOST`.

- good.far.test: TLSA 3 1 1 of its own key: mail over TLS, "Verified";
- bad.far.test: TLSA 3 1 1 of another key: nothing, deferred;
- plain.far.test: TLSA, but no STARTTLS: nothing, deferred;
- notlsa.far.test: no TLSA: mail (may) at `dane`, nothing at `dane-only`.
"""

import hashlib
import re
import shutil
import subprocess
import tempfile
import uuid
from pathlib import Path

import pytest

import postern_harness as h
from postfix_peer import PostfixPeer, TestCA, postfix_available, postfix_peer  # noqa: F401  (the fixture)

SENDER = "sender@example.org"
RCPT = "user@far.test"
ZONE = "far.test"

pytestmark = pytest.mark.skipif(
    not (shutil.which("unbound") and shutil.which("ldns-signzone")),
    reason="needs unbound and ldnsutils (scripts/test installs them)")


def spki_sha256(cert_file):
    der = subprocess.run(["openssl", "x509", "-in", str(cert_file), "-noout", "-pubkey"],
                         check=True, capture_output=True).stdout
    spki = subprocess.run(["openssl", "pkey", "-pubin", "-outform", "DER"], input=der,
                          check=True, capture_output=True).stdout
    return hashlib.sha256(spki).hexdigest()


class SignedDns:
    """far.test, signed, served by unbound on 127.0.0.x:port."""

    def __init__(self, d, records, port=None):
        self.dir = Path(d)
        self.port = port or h.free_port(udp=True)
        zone = self.dir / "far.test.zone"
        zone.write_text(
            f"$ORIGIN {ZONE}.\n$TTL 300\n"
            f"@ IN SOA ns.{ZONE}. admin.{ZONE}. 1 3600 600 86400 300\n"
            f"@ IN NS ns.{ZONE}.\nns IN A 127.0.0.1\n" + "".join(r + "\n" for r in records))
        ksk = subprocess.run(["ldns-keygen", "-a", "ECDSAP256SHA256", "-k", ZONE], cwd=d,
                             check=True, capture_output=True, text=True).stdout.strip()
        zsk = subprocess.run(["ldns-keygen", "-a", "ECDSAP256SHA256", ZONE], cwd=d,
                             check=True, capture_output=True, text=True).stdout.strip()
        subprocess.run(["ldns-signzone", "-n", str(zone), ksk, zsk], cwd=d, check=True,
                       capture_output=True)
        anchor = self.dir / "anchor.key"
        shutil.copy(self.dir / f"{ksk}.ds", anchor)
        conf = self.dir / "unbound.conf"
        conf.write_text(f"""server:
  interface: 127.0.0.1@{self.port}
  port: {self.port}
  do-daemonize: no
  use-syslog: no
  username: ""
  chroot: ""
  directory: "{d}"
  pidfile: ""
  logfile: "{d}/unbound.log"
  do-not-query-localhost: no
  local-zone: "test." nodefault
  trust-anchor-file: "{anchor}"
  val-log-level: 2
auth-zone:
  name: "{ZONE}."
  zonefile: "{zone}.signed"
  for-upstream: yes
  for-downstream: no
""")
        self.proc = subprocess.Popen(["unbound", "-d", "-c", str(conf)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        h.wait_for(lambda: self.answer("good." + ZONE, "A"), timeout=15, what="unbound")

    def answer(self, name, rtype):
        r = subprocess.run(["drill", "-D", "-p", str(self.port), name, rtype, "@127.0.0.1"],
                           capture_output=True, text=True)
        return r.returncode == 0 and " ad" in r.stdout.split(";; ANSWER")[0] \
            and "NOERROR" in r.stdout

    def stop(self):
        h.stop_process(self.proc)


def message(token):
    return h.crlf(f"From: {SENDER}\nTo: {RCPT}\nSubject: {token}\n\n{token}\n")


@pytest.fixture(scope="module")
def cas():
    d1, d2 = tempfile.mkdtemp(prefix="pt-dane-"), tempfile.mkdtemp(prefix="pt-dane2-")
    yield (TestCA(d1, names=["good.far.test", "bad.far.test", "plain.far.test",
                             "notlsa.far.test"]),
           TestCA(d2, names=["bad.far.test"], cn="Another CA"))
    shutil.rmtree(d1, ignore_errors=True)
    shutil.rmtree(d2, ignore_errors=True)


@pytest.fixture(scope="module")
def far_side(cas):
    """The four Postfix receivers, shared by the tests of this module (each
    test looks only for its own tokens in them): started once, not per
    test, since starting four Postfix instances is most of each test's time."""
    if not postfix_available():
        pytest.skip("Postfix is not installed (scripts/test installs postfix)")
    if not h.is_root():
        pytest.skip("a private Postfix needs root")
    ca, other = cas
    started = []
    try:
        for tls in (ca, other, None, ca):
            started.append(PostfixPeer(tls=tls))
            started[-1].start()
        yield tuple(started)
    finally:
        for p in started:
            p.stop()


@pytest.fixture
def receivers(far_side, cas):
    """(good, bad, plain, notlsa, the zone's records for them)."""
    good, bad, plain, notlsa = far_side
    digest = spki_sha256(cas[0].cert_file)
    return good, bad, plain, notlsa, [
        "good IN A 127.0.0.1", "bad IN A 127.0.0.1", "plain IN A 127.0.0.1",
        "notlsa IN A 127.0.0.1",
        f"_{good.port}._tcp.good IN TLSA 3 1 1 {digest}",
        f"_{bad.port}._tcp.bad IN TLSA 3 1 1 {digest}",
        f"_{plain.port}._tcp.plain IN TLSA 3 1 1 {digest}",
    ]


def test_dane_levels_against_a_signed_zone(make_postern, receivers):
    good, bad, plain, notlsa, records = receivers
    d = tempfile.mkdtemp(prefix="pt-unbound-")
    dns = SignedDns(d, records)
    try:
        assert dns.answer(f"_{good.port}._tcp.good.far.test", "TLSA"), "zone is not validated"

        def postern(host, port, level="dane"):
            return make_postern({
                "dns_resolver_addresses": f"127.0.0.1:{dns.port}",
                "smtp_dns_support_level": "dnssec",
                "smtp_tls_security_level": level,
                "relayhost": f"[{host}.far.test]:{port}",
                "smtp_tls_loglevel": "1",
            })

        def send(p):
            token = "pt-dane-" + uuid.uuid4().hex
            code, text = p.send(SENDER, [RCPT], message(token))
            assert code == 250, text
            return token

        # Matching key: delivered over TLS, Verified.
        p = postern("good", good.port)
        token = send(p)
        (_path, raw), = good.wait_for(token)
        assert re.search(rb"\(using TLSv1\.[23] with cipher ", raw)
        p.wait_for_log(rf"Verified TLS connection established to good\.far\.test\[127\.0\.0\.1\]:{good.port}")
        p.wait_for_log(r"status=sent")

        # Another key: nothing delivered, deferred.
        p = postern("bad", bad.port)
        token = send(p)
        p.wait_for_log(rf"Untrusted TLS connection established to bad\.far\.test\[127\.0\.0\.1\]:{bad.port}")
        p.wait_for_log(r"dsn=4\.7\.5, status=deferred \(Server certificate not verified\)")
        assert not bad.find(token)

        # STARTTLS stripped: nothing delivered, deferred.
        p = postern("plain", plain.port)
        token = send(p)
        p.wait_for_log(r"dsn=4\.7\.4, status=deferred \(TLS is required, but was not offered "
                       r"by host plain\.far\.test\[127\.0\.0\.1\]\)")
        assert not plain.find(token)

        # No TLSA: delivered at dane (may), refused at dane-only.
        p = postern("notlsa", notlsa.port)
        token = send(p)
        notlsa.wait_for(token)
        p.wait_for_log(r"status=sent")
        p = postern("notlsa", notlsa.port, level="dane-only")
        token = send(p)
        p.wait_for_log(r"dsn=4\.7\.5, status=deferred \(no TLSA records found\)")
        assert not notlsa.find(token)
    finally:
        dns.stop()
        shutil.rmtree(d, ignore_errors=True)


@pytest.mark.exclusive  # /etc/resolv.conf and 127.0.0.1:53 for the whole machine
def test_postfix_gives_the_same_outcomes(postfix_peer, receivers):  # noqa: F811
    """The same zone and receivers, a private Postfix as the sender: it
    reads /etc/resolv.conf (no port, no resolver parameter), so unbound
    listens on 127.0.0.1:53 and resolv.conf is replaced for the test and
    put back after it."""
    import smtplib
    import socket
    probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        probe.bind(("127.0.0.1", 53))
    except OSError:
        pytest.skip("127.0.0.1:53 is taken")
    finally:
        probe.close()
    good, bad, plain, notlsa, records = receivers
    d = tempfile.mkdtemp(prefix="pt-unbound-")
    dns = SignedDns(d, records, port=53)
    resolv = Path("/etc/resolv.conf")
    saved = resolv.read_bytes() if resolv.exists() else None
    try:
        resolv.write_text("nameserver 127.0.0.1\noptions trust-ad\n")

        def outcome(host, port, level="dane"):
            pf = postfix_peer(params={
                "relayhost": f"[{host}.far.test]:{port}",
                "smtp_dns_support_level": "dnssec",
                "smtp_tls_security_level": level,
                "smtp_tls_loglevel": "1",
                "smtp_host_lookup": "dns",
                # The sender relays far.test instead of keeping it.
                "virtual_mailbox_domains": "sender.invalid",
            })
            token = "pt-dane-pf-" + uuid.uuid4().hex
            with smtplib.SMTP("127.0.0.1", pf.port, timeout=30) as c:
                c.sendmail(SENDER, [RCPT], message(token))
            h.wait_for(lambda: re.search(r"status=(sent|deferred|bounced)", pf.log_text()),
                       timeout=30, what="Postfix's delivery")
            return re.search(r"status=(\w+)", pf.log_text()).group(1), pf.log_text()

        status, log = outcome("good", good.port)
        assert status == "sent", log
        assert "Verified TLS connection established to good.far.test" in log
        status, log = outcome("bad", bad.port)
        assert status == "deferred" and "Server certificate not verified" in log, log
        status, log = outcome("plain", plain.port)
        assert status == "deferred" and "TLS is required, but was not offered" in log, log
        status, log = outcome("notlsa", notlsa.port)
        assert status == "sent", log
        status, log = outcome("notlsa", notlsa.port, level="dane-only")
        assert status == "deferred" and "no TLSA records found" in log, log
    finally:
        if saved is not None:
            resolv.write_bytes(saved)
        dns.stop()
        shutil.rmtree(d, ignore_errors=True)


def test_dane_sessions_are_recorded_for_tls_rpt(make_postern, receivers):
    """With smtp_tls_report_enable, each DANE session is one TLS-RPT
    line (policy type tlsa, the TLSA records as the policy string): a
    success for the matching key, certificate-not-trusted for the other."""
    import time

    def read_store(path):
        """The lines smtp appended (common/src/tls_rpt.rs: version, policy
        type, policy string, mx patterns, result, MX host, IP, reason;
        tab-separated, percent-escaped)."""
        def dec(x):
            return x.replace("%0D", "\r").replace("%0A", "\n").replace("%09", "\t") \
                    .replace("%25", "%")
        out = []
        for line in path.read_text().splitlines():
            f = [dec(x) for x in line.split("\t")]
            assert f[0] == "1" and len(f) == 8, line
            out.append({"type": f[1], "policy": f[2].split("\n"), "result": f[4],
                        "mx": f[5], "ip": f[6]})
        return out
    good, bad, _plain, _notlsa, records = receivers
    d = tempfile.mkdtemp(prefix="pt-unbound-")
    dns = SignedDns(d, records)
    try:
        def postern(host, port):
            return make_postern({
                "dns_resolver_addresses": f"127.0.0.1:{dns.port}",
                "smtp_dns_support_level": "dnssec",
                "smtp_tls_security_level": "dane",
                "relayhost": f"[{host}.far.test]:{port}",
                "smtp_tls_loglevel": "1",
                "smtp_tls_report_enable": "yes",
            })

        day = time.strftime("%Y-%m-%d", time.gmtime())
        p = postern("good", good.port)
        token = "pt-dane-" + uuid.uuid4().hex
        assert p.send(SENDER, [RCPT], message(token))[0] == 250
        good.wait_for(token)
        p.wait_for_log(r"status=sent")
        lines = read_store(Path(p.dir) / "data" / "tls-rpt" / day / "good.far.test")
        assert lines and all(x["type"] == "tlsa" and x["result"] == "success" for x in lines)
        assert any(r.startswith("3 1 1 ") for r in lines[0]["policy"])

        p = postern("bad", bad.port)
        token = "pt-dane-" + uuid.uuid4().hex
        assert p.send(SENDER, [RCPT], message(token))[0] == 250
        p.wait_for_log(r"status=deferred \(Server certificate not verified\)")
        lines = read_store(Path(p.dir) / "data" / "tls-rpt" / day / "bad.far.test")
        assert lines and lines[0]["result"] == "certificate-not-trusted"
        assert lines[0]["mx"] == "bad.far.test"
    finally:
        dns.stop()
        shutil.rmtree(d, ignore_errors=True)


def test_dane_wins_over_mta_sts(make_postern, receivers):
    """At level dane, delivery by MX: far.test (MX good.far.test, usable
    TLSA) and sub.far.test (MX notlsa.far.test, no TLSA) both publish an
    MTA-STS policy in enforce mode that lists neither MX host. DANE wins
    where it applies (RFC 8461 section 2): good.far.test gets the mail,
    Verified by its TLSA record; notlsa.far.test comes under the policy
    and is refused."""
    from test_mta_sts import PolicyServer, policy
    good, _bad, _plain, notlsa, records = receivers
    d = tempfile.mkdtemp(prefix="pt-unbound-")
    web_ca = TestCA(Path(d) / "web", names=["mta-sts.far.test", "mta-sts.sub.far.test"])
    web = PolicyServer(web_ca.cert_file, web_ca.key_file)
    web.policies.update({
        "mta-sts.far.test": policy("enforce", "other.far.test"),
        "mta-sts.sub.far.test": policy("enforce", "other.far.test"),
    })
    dns = SignedDns(d, records + [
        "@ IN MX 10 good", "sub IN MX 10 notlsa",
        '_mta-sts IN TXT "v=STSv1; id=1"', f"mta-sts IN A {web.ip}",
        '_mta-sts.sub IN TXT "v=STSv1; id=1"', f"mta-sts.sub IN A {web.ip}",
    ])
    try:
        p = make_postern({
            "dns_resolver_addresses": f"127.0.0.1:{dns.port}",
            "smtp_dns_support_level": "dnssec",
            "smtp_tls_security_level": "dane",
            "transport_maps": f"inline:{{ far.test=smtp:far.test:{good.port}, "
                              f"sub.far.test=smtp:sub.far.test:{notlsa.port} }}",
            "smtp_tls_CAfile": str(web_ca.ca_file),
            "smtp_tls_loglevel": "1",
        })
        token = "pt-dane-" + uuid.uuid4().hex
        assert p.send(SENDER, [RCPT], message(token))[0] == 250
        good.wait_for(token)
        p.wait_for_log(rf"Verified TLS connection established to good\.far\.test\[127\.0\.0\.1\]:{good.port}")
        p.wait_for_log(r"to=<user@far\.test>, relay=good\.far\.test.*status=sent")
        assert web.count("mta-sts.far.test") == 1, "the policy was looked up"

        token = "pt-dane-" + uuid.uuid4().hex
        assert p.send(SENDER, ["user@sub.far.test"], message(token))[0] == 250
        p.wait_for_log(r"to=<user@sub\.far\.test>, .*dsn=4\.7\.5, status=deferred \(MX host "
                       r"notlsa\.far\.test does not match the MTA-STS policy of sub\.far\.test\)")
        assert not notlsa.find(token)
    finally:
        web.stop()
        dns.stop()
        shutil.rmtree(d, ignore_errors=True)
