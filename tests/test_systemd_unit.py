"""The systemd unit (conf/systemd/postern.service, installed by
scripts/install and the Debian package), issue #22: hardened for what
master allows, and `systemd-analyze security` rates it below 5.0 (run
with --offline=true, which needs no running systemd: CI's container has
none; tests/test_systemd_live.py runs it under a live one). And its
generator (conf/systemd/postern-systemd-generator): ProtectHome=no in a
drop-in exactly when main.cf delivers into home directories."""

import os
import re
import shutil

import pytest

import postern_harness as h

UNIT = h.REPO / "conf" / "systemd" / "postern.service"
GENERATOR = h.REPO / "conf" / "systemd" / "postern-systemd-generator"
DROPIN = "postern.service.d/50-postern-homes.conf"


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


# --------------------------------------------------------------------------
# postern-systemd-generator


def generate(tmp_path, params, master_cf_extra="", main_cf=True):
    """Runs the generator as systemd does (three output directories) on a
    configuration of conf/etc plus ``params``; returns the drop-in's text,
    or None when it wrote none."""
    etc = tmp_path / "etc"
    etc.mkdir()
    if main_cf:
        text = (h.REPO / "conf/etc/main.cf").read_text()
        text += "".join(f"\n{k} = {v}" for k, v in params.items()) + "\n"
        (etc / "main.cf").write_text(text)
    (etc / "master.cf").write_text((h.REPO / "conf/etc/master.cf").read_text()
                                   + master_cf_extra)
    out = [tmp_path / d for d in ("normal", "early", "late")]
    for d in out:
        d.mkdir()
    env = {"PATH": "/usr/bin:/bin", "MAIL_CONFIG": str(etc),
           "POSTCONF": str(h.BIN_DIR / "postconf")}
    r = h.run([GENERATOR, *out], env=env, timeout=60)
    assert r.returncode == 0 and r.stderr == "", h.describe(r)
    # Only the normal directory, only the drop-in.
    written = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")
                     if p.is_file() and not p.is_relative_to(etc))
    if not written:
        return None
    assert written == ["normal/" + DROPIN], written
    return (out[0] / DROPIN).read_text()


def protect_home(dropin):
    vals = [l.split("=", 1)[1] for l in dropin.splitlines() if l.startswith("ProtectHome=")]
    assert dropin.splitlines().count("[Service]") == 1, dropin
    return vals


# .forward files forward to addresses only: nothing writes into homes.
NO_HOMES = {"allow_mail_to_commands": "alias", "allow_mail_to_files": "alias"}


def test_generator_writes_nothing_when_no_delivery_goes_into_homes(tmp_path):
    assert generate(tmp_path, dict(NO_HOMES, mail_spool_directory="/var/mail")) is None


def test_generator_writes_nothing_for_an_empty_forward_path(tmp_path):
    assert generate(tmp_path, {"forward_path": ""}) is None


def test_generator_writes_nothing_without_a_main_cf(tmp_path):
    assert generate(tmp_path, {}, main_cf=False) is None


@pytest.mark.parametrize("params,reason", [
    (dict(NO_HOMES, home_mailbox="Maildir/"), "home_mailbox = Maildir/"),
    (dict(NO_HOMES, mailbox_command="/usr/bin/procmail -a $EXTENSION"), "mailbox_command = "),
    (dict(NO_HOMES, mail_spool_directory="/home/mail"), "mail_spool_directory = /home/mail"),
    (dict(NO_HOMES, mailbox_transport="maildrop"), "mailbox_transport = maildrop"),
    # Postfix's default, Postern's too: a .forward may run a command.
    ({}, "a .forward file may deliver to a command or a file"),
    ({"allow_mail_to_commands": "alias"}, "allow_mail_to_files = alias, forward"),
], ids=["home_mailbox", "mailbox_command", "spool_under_home", "pipe_mailbox_transport",
        "default_forward", "forward_to_files"])
def test_generator_makes_homes_writable_when_mail_goes_into_them(tmp_path, params, reason):
    extra = ("maildrop  unix  -       n       n       -       -       pipe\n"
             "  flags=DRXhu user=nobody argv=/usr/bin/maildrop -d ${recipient}\n")
    dropin = generate(tmp_path, params, master_cf_extra=extra)
    assert dropin is not None, params
    assert protect_home(dropin) == ["no"], dropin
    assert reason in dropin, dropin
    assert "systemctl daemon-reload" in dropin


def test_generator_ignores_a_transport_that_is_not_pipe(tmp_path):
    # lmtp to Dovecot: Dovecot writes the mailboxes, not Postern.
    assert generate(tmp_path, dict(NO_HOMES, mailbox_transport="lmtp:unix:private/dovecot-lmtp")) \
        is None


def test_generator_needs_its_output_directory():
    r = h.run([GENERATOR], env={"PATH": "/usr/bin:/bin"})
    assert r.returncode == 64 and "usage" in r.stderr, h.describe(r)


def test_install_puts_the_generator_in_systemds_directory(tmp_path):
    bindir = tmp_path / "bin"
    bindir.mkdir()
    for prog in ("postern", "sendmail", "postdrop", "master", "smtpd", "cleanup", "qmgr",
                 "pickup", "smtp", "local"):
        (bindir / prog).write_text("#!/bin/sh\nexit 0\n")
        (bindir / prog).chmod(0o755)
    for prefix, root in (("/usr", tmp_path / "r1"), ("/usr/local", tmp_path / "r2")):
        r = h.run([h.REPO / "scripts" / "install", "--destdir", root, "--prefix", prefix,
                   "--bin-dir", bindir, "--no-build", "--no-accounts"])
        assert r.returncode == 0, h.describe(r)
        gen = root / prefix.lstrip("/") / "lib/systemd/system-generators/postern-systemd-generator"
        assert gen.is_file() and os.access(gen, os.X_OK), gen
        assert f'POSTCONF:-{prefix}/sbin/postconf' in gen.read_text()
        unit = (root / "lib/systemd/system/postern.service").read_text()
        assert "man:postern-systemd-generator(8)" in unit
