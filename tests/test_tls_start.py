"""A TLS key or certificate smtpd cannot use stops `postern start`,
`postern start-fg` and `postern reload`, not only `postern check`: one
`postern: error:` line naming the parameter, its file and the cause, exit
1, and no master left running (or, for reload, the running configuration
kept). Without this, the mail system starts and smtpd quietly offers no
STARTTLS. Keys are mode 0600 root in a directory mode 0700, as
distributions install them; a good pair starts. Run as root."""

import re
import subprocess
import time

import pytest

import postern_harness as h
from test_secrets import root_certs, root_only, root_only_file, secrets_dir  # noqa: F401
from test_smtpd_tls_sasl import make_certs


@pytest.fixture
def other_key(secrets_dir):  # noqa: F811
    """A root-only key of another certificate (it matches nothing here)."""
    other = make_certs(secrets_dir / "other")
    return root_only_file(other["key"])


def tls_params(cert, key):
    return {"smtpd_tls_security_level": "may",
            "smtpd_tls_cert_file": str(cert), "smtpd_tls_key_file": str(key)}


def assert_not_running(p):
    r = p.status()
    assert r.returncode == 1, h.describe(r)
    assert not h.smtp_banner_ok(p.port), "something answers on the SMTP port"


def start_fg_result(p, timeout=30):
    """`postern start-fg`, expected to exit by itself: (code, output)."""
    r = subprocess.run([str(p.cmd("postern")), "-c", str(p.etc), "start-fg"],
                       stdin=subprocess.DEVNULL, capture_output=True, text=True,
                       env=p.env(), cwd=str(p.dir), timeout=timeout, start_new_session=True)
    return r.returncode, r.stderr


def test_mismatched_root_only_key_stops_start_and_start_fg(
        root_only, make_postern, root_certs, other_key):  # noqa: F811
    p = make_postern(params=tls_params(root_certs["cert"], other_key), start=False)
    p._prepare()
    r = p.postern("start")
    assert r.returncode == 1, h.describe(r)
    # One line names the key and its cause; the last says nothing started.
    errors = [line for line in r.stderr.splitlines() if ": error: " in line]
    assert len(errors) == 1, h.describe(r)
    assert r.stderr.splitlines()[-1] == ("postern: fatal: 1 table(s) or key(s) above cannot "
                                         "be used: not starting the Postern mail system"), \
        h.describe(r)
    assert re.fullmatch(
        r"postern: error: service \S+ \(master\.cf line \d+\): cannot load TLS certificate "
        rf"and key: smtpd_tls_key_file = {re.escape(str(other_key))}, smtpd_tls_cert_file = "
        rf"{re.escape(str(root_certs['cert']))}: private key does not match public key in "
        r"certificate", errors[0]), h.describe(r)
    assert_not_running(p)

    code, err = start_fg_result(p)
    assert code == 1, err
    assert "private key does not match public key in certificate" in err, err
    assert "smtpd_tls_key_file" in err, err
    assert_not_running(p)


def test_unreadable_key_or_certificate_stops_start(
        root_only, make_postern, root_certs, secrets_dir):  # noqa: F811
    missing = secrets_dir / "missing.key"
    p = make_postern(params=tls_params(root_certs["cert"], missing), start=False)
    p._prepare()
    r = p.postern("start")
    assert r.returncode == 1, h.describe(r)
    assert re.search(rf"^postern: error: .*smtpd_tls_key_file = {re.escape(str(missing))}: "
                     r"cannot read private key: No such file or directory", r.stderr, re.M), \
        h.describe(r)
    assert_not_running(p)

    # A certificate path that is a directory (root reads everything else).
    p.set_params(smtpd_tls_cert_file=str(secrets_dir), smtpd_tls_key_file=str(root_certs["key"]))
    r = p.postern("start")
    assert r.returncode == 1, h.describe(r)
    assert re.search(rf"^postern: error: .*smtpd_tls_cert_file = {re.escape(str(secrets_dir))}: "
                     r"cannot read certificate: Is a directory", r.stderr, re.M), h.describe(r)
    assert_not_running(p)

    # A key file that holds no key.
    garbage = root_only_file(secrets_dir / "garbage.key", "not a key\n")
    p.set_params(smtpd_tls_cert_file=str(root_certs["cert"]), smtpd_tls_key_file=str(garbage))
    code, err = start_fg_result(p)
    assert code == 1, err
    assert re.search(rf"smtpd_tls_key_file = {re.escape(str(garbage))}: no private key", err), err
    assert_not_running(p)


def test_good_root_only_pair_starts_with_starttls(root_only, make_postern, root_certs):  # noqa: F811
    p = make_postern(params=tls_params(root_certs["cert"], root_certs["key"]))
    with p.smtp() as s:
        s.ehlo("client.example")
        assert s.has_extn("starttls")
    assert not p.log_search(r"cannot load TLS"), p.log_tail()


def test_reload_with_a_bad_key_keeps_the_running_configuration(
        root_only, make_postern, root_certs, other_key):  # noqa: F811
    p = make_postern(params=tls_params(root_certs["cert"], root_certs["key"]))
    master = p.master_pid()
    with p.smtp() as s:
        s.ehlo("client.example")
        assert s.has_extn("starttls")
    smtpds = [c for c in h.descendants_of(master) if h.proc_name(c) == "smtpd"]
    assert smtpds, "no smtpd running"

    p.set_params(smtpd_tls_key_file=str(other_key))
    r = p.postern("reload")
    assert r.returncode == 1, h.describe(r)
    assert "private key does not match public key in certificate" in r.stderr, h.describe(r)
    assert re.search(r"^postern: fatal: not reloading", r.stderr, re.M), h.describe(r)
    assert "refreshing" not in r.stderr, h.describe(r)
    time.sleep(1)
    # The same master and smtpd processes (no SIGHUP went out), with STARTTLS.
    assert p.master_pid() == master
    assert all(h.pid_alive(pid) for pid in smtpds), "smtpd was told to stop"
    with p.smtp() as s:
        s.ehlo("client.example")
        assert s.has_extn("starttls")

    # Fixed: reload goes through.
    p.set_params(smtpd_tls_key_file=str(root_certs["key"]))
    r = p.postern("reload")
    assert r.returncode == 0, h.describe(r)
