"""The chroot column of master.cf, as a Debian administrator's master.cf
sets it (y for smtpd, pickup, cleanup, qmgr, smtp, relay, lmtp, anvil):
those daemons run confined to the queue directory as mail_owner, with
their keys, tables and the account list read before the chroot, and mail
flows in and out as without it. Run as root."""

import os
import re
import pwd
import shutil
import smtplib
import ssl
import tempfile
import uuid
from pathlib import Path

import pytest

import postern_harness as h
from postern_harness import wait_for
from test_privileges import assert_unprivileged, running_daemons
from test_smtpd_tls_sasl import make_certs

CHROOTED = ("smtpd", "pickup", "cleanup", "qmgr", "anvil", "smtp", "relay", "lmtp")


@pytest.fixture
def root_only():
    if not h.is_root():
        pytest.skip("chroot needs root")


@pytest.fixture
def root_only_certs():
    """A certificate whose key only root may read, as a distribution
    installs one (/etc/ssl/private is 0710 root:ssl-cert)."""
    d = Path(tempfile.mkdtemp(prefix="postern-rootcerts-"))
    certs = make_certs(d)
    os.chown(certs["key"], 0, 0)
    os.chmod(certs["key"], 0o600)
    os.chmod(d, 0o700)
    yield certs
    shutil.rmtree(d, ignore_errors=True)


def chroot_everything(p, services=CHROOTED + ("local",)):
    """Sets the chroot column (the fifth) to y for `services` and the
    SMTP listener."""
    lines = []
    for line in p.master_cf.read_text().splitlines():
        f = line.split()
        if f and not line.startswith("#") and len(f) >= 8 and (
                f[7] in services or f[0] in services or f[7] == "smtpd"):
            f[4] = "y"
            line = "  ".join(f)
        lines.append(line)
    p.master_cf.write_text("\n".join(lines) + "\n")


def test_chrooted_daemons_are_confined_and_mail_flows(root_only, root_only_certs, make_postern,
                                                      sink, dnsmasq, local_users):
    token = uuid.uuid4().hex
    dns = dnsmasq(["--local=/test/", "--mx-host=far.test,mx.far.test,10",
                   "--host-record=mx.far.test,127.0.0.1"])
    p = make_postern(start=False, params={
        # MX routing through a resolver, from inside the jail.
        "dns_resolver_addresses": f"127.0.0.1:{dns.port}",
        # The client's name from /etc/hosts, as master copied it in.
        "smtpd_peername_lookup": "yes",
        "transport_maps": f"inline:{{ far.test=smtp:far.test:{sink.port} }}",
        # Counted by anvil, chrooted too.
        "smtpd_client_connection_count_limit": "10",
        "smtpd_client_event_limit_exceptions": "",
        "smtpd_tls_security_level": "may",
        "smtpd_tls_cert_file": str(root_only_certs["cert"]),
        "smtpd_tls_key_file": str(root_only_certs["key"]),
    })
    chroot_everything(p)
    p.start()
    queue = os.path.realpath(p.queue)

    # In over SMTP with STARTTLS (the key was read as root, before the
    # chroot); the recipient check finds local accounts from inside.
    ctx = ssl.create_default_context(cafile=str(root_only_certs["ca"]))
    ctx.check_hostname = False
    with smtplib.SMTP("127.0.0.1", p.port, timeout=30) as s:
        s.ehlo("client.example")
        assert s.starttls(context=ctx)[0] == 220
        s.ehlo("client.example")
        assert s.mail("app@postern.test")[0] == 250
        code, text = s.rcpt("nosuchuser@postern.test")
        assert code == 550 and b"5.1.1" in text, (code, text)
        assert s.rcpt("ptalice@postern.test")[0] == 250
        assert s.rcpt("someone@far.test")[0] == 250
        code, text = s.data(h.crlf(f"Subject: {token}\n\nthrough the jail\n"))
        assert code == 250, text
    # The name /etc/hosts gives 127.0.0.1, read from the copy in the jail.
    p.wait_for_log(rf"connect from {re.escape(h.hosts_name())}\[127\.0\.0\.1\]")
    # In through sendmail and pickup.
    r = p.sendmail(["ptbob@postern.test"], f"Subject: {token}\n\nby sendmail\n".encode())
    assert r.returncode == 0, h.describe(r)

    wait_for(lambda: any(token.encode() in m.content for m in sink.messages),
             timeout=30, what="the message at the sink, routed by MX from the jail")
    for user in ("ptalice", "ptbob"):
        h.wait_for_messages(user, token)

    owner = pwd.getpwnam("postern")
    seen = running_daemons(p)
    for name in ("smtpd", "pickup", "cleanup", "qmgr", "anvil", "smtp"):
        assert name in seen, f"{name} not running (saw {sorted(seen)})"
        for pid in seen[name]:
            assert os.readlink(f"/proc/{pid}/root") == queue, (name, pid)
            assert_unprivileged(pid, name, owner)
    # local needs root to become each recipient: it cannot be chrooted,
    # and master says so instead of failing.
    assert "local" in seen and all(os.readlink(f"/proc/{pid}/root") == "/"
                                   for pid in seen["local"]), seen.get("local")
    assert p.log_search(r"service local: a privileged service cannot run chrooted")
    # What a chrooted resolver and clock read, copied in by master.
    for f in ("resolv.conf", "localtime"):
        if os.path.exists(f"/etc/{f}"):
            assert (p.queue / "etc" / f).read_bytes() == Path(f"/etc/{f}").read_bytes(), f
    assert not p.log_search(r"(fatal|panic)"), p.log_tail()

