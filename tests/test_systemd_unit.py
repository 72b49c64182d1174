"""The systemd unit (conf/systemd/postern.service, installed by
scripts/install and the Debian package), issue #22: hardened for what
master allows, and `systemd-analyze security` rates it below 5.0 (run
with --offline=true, which needs no running systemd: CI's container has
none)."""

import re
import shutil

import pytest

import postern_harness as h

UNIT = h.REPO / "conf" / "systemd" / "postern.service"


def directives():
    out = {}
    for line in UNIT.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith(("#", "[")) and "=" in line:
            k, v = line.split("=", 1)
            out.setdefault(k, []).append(v)
    return out


def test_unit_runs_master_as_a_forking_service_with_its_pid_file():
    d = directives()
    assert d["Type"] == ["forking"]
    assert d["PIDFile"] == ["/var/spool/postern/pid/master.pid"]
    assert d["ExecStart"] == ["/usr/sbin/postern start"]
    assert d["ExecStop"] == ["/usr/sbin/postern stop"]
    assert d["ExecReload"] == ["/usr/sbin/postern reload"]


def test_unit_hardening_directives():
    d = directives()
    assert d["ProtectSystem"] == ["full"]
    assert d["ProtectHome"] == ["read-only"]
    assert d["PrivateTmp"] == ["yes"]
    assert d["RestrictAddressFamilies"] == ["AF_UNIX AF_INET AF_INET6 AF_NETLINK"]
    rw = d["ReadWritePaths"][0].split()
    for p in ("/var/spool/postern", "/var/lib/postern", "/var/mail"):
        assert p in rw or "-" + p in rw, rw
    # local and pipe switch users, and a command they run may run sendmail,
    # whose postdrop needs its set-gid bit: no_new_privs would break it.
    assert d["NoNewPrivileges"] == ["no"]
    caps = d["CapabilityBoundingSet"][0].split()
    for c in ("CAP_SETUID", "CAP_SETGID", "CAP_SYS_CHROOT", "CAP_NET_BIND_SERVICE",
              "CAP_CHOWN", "CAP_DAC_OVERRIDE"):
        assert c in caps, c
    assert "CAP_SYS_ADMIN" not in caps
    # master's chroot column needs chroot(2), which @system-service lacks.
    assert "chroot" in d["SystemCallFilter"][0].split()


def test_systemd_analyze_security_below_5():
    if not shutil.which("systemd-analyze"):
        pytest.fail("systemd-analyze is not installed (Debian package systemd)")
    r = h.run(["systemd-analyze", "security", "--offline=true", "--no-pager", UNIT],
              timeout=120)
    m = re.search(r"Overall exposure level for postern\.service: (\d+(?:\.\d+)?)", r.stdout)
    assert m, h.describe(r)
    assert float(m.group(1)) < 5.0, r.stdout[-3000:]
