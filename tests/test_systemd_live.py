"""postern.service under a live systemd (issue #22, point 3): CI's machine
(and a developer's container) has no systemd as PID 1, so each test boots
one in a container of its own:

- a private mount namespace (``unshare --mount --propagation private``)
  holds a tmpfs with an overlay of ``/`` (writes go to the tmpfs: the
  host's files never change, and the mounts vanish with the namespace);
- ``systemd-nspawn --boot`` (Debian package systemd-container) runs
  /lib/systemd/systemd as PID 1 on it, with a private network (only
  ``lo``: the host's ports and services are untouched) and
  ``systemd.unit=basic.target`` (none of the host's enabled services);
- the test runs commands inside with ``nsenter --all`` (no machined or
  D-Bus on the host needed) and reads files through /proc/LEADER/root;
- ``scripts/install`` installs target/debug's programs, the hardened
  unit and its generator in there as on a real host.

What it shows: ``systemctl start``/``status``/``is-active``, mail by
/usr/sbin/sendmail (as a plain user) and by SMTP on a loopback port
delivered to /var/mail under the unit's restrictions, ``systemctl reload``
(master re-reads master.cf: a new port answers, same MainPID),
``systemctl stop``, the live ``systemd-analyze security`` score below 5.0;
and postern-systemd-generator under it: ProtectHome=read-only while
main.cf delivers nowhere in homes (a Maildir delivery is then deferred,
"Read-only file system"), ProtectHome=no after ``home_mailbox = Maildir/``
and ``systemctl daemon-reload``, and the mail lands in ~/Maildir.

Root only (mounts, nspawn). ``exclusive``: the overlay's lower layer is
the live ``/``, which other tests must not change while it is mounted.
Each test takes about 10-20 s; every wait is bounded."""

import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

import pytest

import postern_harness as h

pytestmark = [pytest.mark.exclusive]

USER = "ptlive"
PORT = 2525
PORT2 = 2526
ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8", "HOME": "/root"}

# Runs in the new mount namespace: the overlay, then nspawn (exec: the
# Popen's PID is nspawn's).
BOOT = r"""
set -e
d="$1"; shift
mount -t tmpfs -o mode=0755 postern-live "$d"
mkdir "$d/upper" "$d/work" "$d/root"
mount -t overlay postern-live -o "lowerdir=/,upperdir=$d/upper,workdir=$d/work" "$d/root"
exec systemd-nspawn -D "$d/root" "$@"
"""


class Container:
    """systemd booted in an nspawn container on an overlay of /."""

    def __init__(self):
        self.dir = Path(tempfile.mkdtemp(prefix="postern-live-"))
        self.log = self.dir.parent / (self.dir.name + ".log")
        self.proc = None
        self.leader = None
        self.name = f"postern-live-{os.getpid()}"

    def start(self, timeout=120):
        binds = [h.REPO]
        if not Path(h.BIN_DIR).resolve().is_relative_to(h.REPO):
            binds.append(Path(h.BIN_DIR).resolve())
        args = ["--boot", "--private-network", "--register=no", "--keep-unit",
                "--link-journal=no", "--console=pipe", "--settings=no",
                f"--machine={self.name}"]
        args += [f"--bind-ro={b}" for b in binds]
        args += ["--", "systemd.unit=basic.target"]
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                ["unshare", "--mount", "--propagation", "private", "sh", "-c", BOOT, "sh",
                 str(self.dir), *args],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=ENV)
        deadline = time.monotonic() + timeout

        def leader():
            if self.proc.poll() is not None:
                raise AssertionError(f"systemd-nspawn exited ({self.proc.returncode}):\n"
                                     + self.log.read_text(errors="replace")[-3000:])
            for kid in h.children_of(self.proc.pid):
                if h.proc_name(kid) == "systemd":
                    return kid
            return None
        self.leader = h.wait_for(leader, timeout=60, what="systemd as the container's PID 1")
        # systemd's private bus (/run/systemd/private) comes a moment after
        # PID 1 does.
        h.wait_for(lambda: self.path("/run/systemd/private").exists(), timeout=60,
                   what="systemd's bus in the container")
        left = max(10, deadline - time.monotonic())
        r = self.run(["systemctl", "is-system-running", "--wait"], timeout=left)
        state = r.stdout.strip()
        if state == "degraded":  # a host unit that cannot run in here: not ours
            failed = self.run(["systemctl", "--failed", "--no-legend", "--plain"]).stdout
            print(f"container degraded; failed units:\n{failed}")
        assert state in ("running", "degraded"), h.describe(r) + self.console()
        return self

    def run(self, cmd, timeout=60, input=None, user=None):
        cmd = [str(c) for c in cmd]
        if user is not None:
            cmd = ["runuser", "-u", user, "--"] + cmd
        return h.run(["nsenter", "-t", str(self.leader), "--all", *cmd], input=input,
                     timeout=timeout, env=ENV)

    def ok(self, cmd, timeout=60, input=None, user=None):
        r = self.run(cmd, timeout=timeout, input=input, user=user)
        assert r.returncode == 0, h.describe(r) + self.journal()
        return r.stdout

    def path(self, p):
        """A file of the container, seen from the host."""
        return Path(f"/proc/{self.leader}/root") / str(p).lstrip("/")

    def journal(self, lines=60):
        r = self.run(["journalctl", "--no-pager", "-q", "-n", str(lines),
                      "-u", "postern.service"], timeout=30)
        return f"\n--- journal of postern.service ---\n{r.stdout}{r.stderr}"

    def console(self):
        return "\n--- console ---\n" + self.log.read_text(errors="replace")[-3000:]

    def smtp(self, port, token):
        """An SMTP transaction from inside (the container's lo)."""
        code = (
            "import smtplib, sys\n"
            f"s = smtplib.SMTP('127.0.0.1', {port}, timeout=30)\n"
            f"s.sendmail('someone@example.org', ['{USER}@localhost'],"
            f" 'Subject: by smtp {token}\\r\\n\\r\\nvia smtp {token}\\r\\n')\n"
            "s.quit()\n")
        return self.ok(["python3", "-c", code])

    def banner(self, port):
        code = (
            "import socket\n"
            "try:\n"
            f"    s = socket.create_connection(('127.0.0.1', {port}), timeout=5)\n"
            "    print(s.recv(512).decode(errors='replace'))\n"
            "except OSError as e:\n"
            "    print('refused', e)\n")
        return self.run(["python3", "-c", code]).stdout.startswith("220")

    def stop(self):
        if self.proc is None:
            return
        if self.proc.poll() is None and self.leader:
            try:
                self.run(["systemctl", "poweroff", "--no-block"], timeout=30)
            except subprocess.TimeoutExpired:
                pass
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                # PID 1 of the container: its whole PID namespace goes.
                h.kill_pid(self.leader, signal.SIGKILL)
                h.stop_process(self.proc)
        # The mounts were in the namespace, gone with it; the directory is
        # empty again.
        shutil.rmtree(self.dir, ignore_errors=True)
        self.log.unlink(missing_ok=True)


@pytest.fixture
def container():
    if not h.is_root():
        pytest.skip("needs root: mounts an overlay of / and boots systemd in systemd-nspawn")
    for prog, pkg in (("systemd-nspawn", "systemd-container"), ("unshare", "util-linux"),
                      ("nsenter", "util-linux"), ("systemctl", "systemd")):
        if not shutil.which(prog):
            pytest.fail(f"{prog} is not installed (Debian package {pkg}; scripts/test installs it)")
    missing = h.missing_binaries()
    if missing:
        pytest.fail(f"Postern binaries missing in {h.BIN_DIR}: {', '.join(missing)}")
    probe = h.run(["unshare", "--mount", "--propagation", "private", "mount", "-t", "tmpfs",
                   "probe", tempfile.gettempdir()])
    if probe.returncode != 0:
        pytest.skip("cannot mount here (an unprivileged container?): " + probe.stderr.strip())
    c = Container()
    try:
        c.start()
        yield c
    finally:
        c.stop()


def install_postern(c, params):
    """scripts/install in the container, a fresh /etc/postern with
    ``params``, a loopback smtpd on PORT, a local user; then daemon-reload
    (which runs the generator)."""
    c.ok(["rm", "-rf", "/etc/postern", "/var/spool/postern", "/var/lib/postern"])
    c.ok([h.REPO / "scripts" / "install", "--prefix", "/usr", "--bin-dir", h.BIN_DIR,
          "--no-build", "--force"], timeout=120)
    assert c.path("/usr/lib/systemd/system-generators/postern-systemd-generator").exists()
    c.ok(["postconf", "-e", "inet_interfaces = loopback-only",
          *[f"{k} = {v}" for k, v in params.items()]])
    with open(c.path("/etc/postern/master.cf"), "a") as f:
        f.write(f"127.0.0.1:{PORT} inet n - y - - smtpd\n")
    c.ok(["newaliases"])
    if c.run(["id", USER]).returncode != 0:
        c.ok(["useradd", "--create-home", "--shell", "/bin/sh", USER])
    c.ok(["systemctl", "daemon-reload"])


def prop(c, name):
    return c.ok(["systemctl", "show", "--value", "-p", name, "postern.service"]).strip()


def security_score(c):
    r = c.run(["systemd-analyze", "security", "--no-pager", "postern.service"], timeout=120)
    m = re.search(r"Overall exposure level for postern\.service: (\d+(?:\.\d+)?)", r.stdout)
    assert m, h.describe(r)
    return float(m.group(1)), r.stdout


def mail_text(c, path):
    try:
        return c.path(path).read_text(errors="replace")
    except (FileNotFoundError, PermissionError):
        return ""


# Homes stay read-only: .forward files forward to addresses only.
NO_HOME_DELIVERY = {"allow_mail_to_commands": "alias", "allow_mail_to_files": "alias"}
DROPIN = "/run/systemd/generator/postern.service.d/50-postern-homes.conf"


def test_unit_starts_delivers_reloads_and_stops_under_live_systemd(container):
    c = container
    install_postern(c, NO_HOME_DELIVERY)
    c.ok(["systemctl", "start", "postern.service"], timeout=120)
    r = c.run(["systemctl", "is-active", "postern.service"])
    assert r.stdout.strip() == "active", h.describe(r) + c.journal()
    status = c.ok(["systemctl", "status", "--no-pager", "postern.service"])
    assert "active (running)" in status, status
    main_pid = int(prop(c, "MainPID"))
    pid_file = mail_text(c, "/var/spool/postern/pid/master.pid").split()
    assert pid_file and int(pid_file[0]) == main_pid, (pid_file, main_pid)
    assert "/usr/libexec/postern/master" in status, status
    # The sandbox is the unit's, applied.
    assert prop(c, "ProtectSystem") == "full"
    assert prop(c, "ProtectHome") == "read-only"
    assert prop(c, "PrivateTmp") == "yes"
    assert not c.path(DROPIN).exists()
    h.wait_for(lambda: c.banner(PORT), timeout=30, what=f"smtpd on {PORT}")

    # Mail by /usr/sbin/sendmail as a plain user (postdrop's set-gid bit
    # works: NoNewPrivileges is off) and by SMTP, into /var/mail.
    token = uuid.uuid4().hex[:12]
    c.ok(["/usr/sbin/sendmail", f"{USER}@localhost"], user=USER,
         input=f"Subject: by sendmail {token}\n\nvia sendmail {token}\n".encode())
    c.smtp(PORT, token)
    mbox = f"/var/mail/{USER}"
    try:
        h.wait_for(lambda: f"via sendmail {token}" in mail_text(c, mbox)
                   and f"via smtp {token}" in mail_text(c, mbox),
                   timeout=60, what=f"both messages in {mbox}")
    except AssertionError as e:
        raise AssertionError(str(e) + c.journal()) from None
    st = os.stat(c.path(mbox))
    assert st.st_uid == int(c.ok(["id", "-u", USER]).strip())
    journal = c.journal(200)
    assert "status=sent (delivered to mailbox)" in journal, journal

    # The live score (not --offline): the unit as systemd loaded it.
    score, out = security_score(c)
    assert score < 5.0, out[-3000:]

    # systemctl reload: `postern reload`, SIGHUP to master, which re-reads
    # master.cf: the new port answers, master is the same process.
    with open(c.path("/etc/postern/master.cf"), "a") as f:
        f.write(f"127.0.0.1:{PORT2} inet n - y - - smtpd\n")
    c.ok(["systemctl", "reload", "postern.service"], timeout=60)
    h.wait_for(lambda: c.banner(PORT2), timeout=30, what=f"smtpd on {PORT2} after reload")
    assert int(prop(c, "MainPID")) == main_pid
    assert c.run(["systemctl", "is-active", "postern.service"]).stdout.strip() == "active"
    assert re.search(r"master\[\d+\]: reload", c.journal(200)), c.journal(200)

    # systemctl stop: master and its children gone, the ports closed.
    c.ok(["systemctl", "stop", "postern.service"], timeout=90)
    r = c.run(["systemctl", "is-active", "postern.service"])
    assert r.stdout.strip() == "inactive", h.describe(r) + c.journal()
    assert c.run(["test", "-d", f"/proc/{main_pid}"]).returncode != 0, "master still runs"
    assert not c.banner(PORT) and not c.banner(PORT2)
    r = c.run(["pgrep", "-f", "/usr/libexec/postern/"])
    assert r.stdout.strip() == "", "Postern processes left: " + r.stdout


def test_generator_makes_homes_writable_for_home_mailbox_under_live_systemd(container):
    c = container
    install_postern(c, NO_HOME_DELIVERY)
    # Nothing in main.cf delivers into homes: no drop-in, read-only homes.
    assert not c.path(DROPIN).exists()
    c.ok(["systemctl", "start", "postern.service"], timeout=120)
    assert prop(c, "ProtectHome") == "read-only"

    # home_mailbox without daemon-reload: the sandbox still has read-only
    # homes, the delivery is deferred (the message stays queued).
    c.ok(["postconf", "-e", "home_mailbox = Maildir/"])
    c.ok(["systemctl", "reload", "postern.service"], timeout=60)
    token = uuid.uuid4().hex[:12]
    c.ok(["/usr/sbin/sendmail", f"{USER}@localhost"], user=USER,
         input=f"Subject: maildir {token}\n\nfirst {token}\n".encode())
    try:
        h.wait_for(lambda: "Read-only file system" in c.journal(100), timeout=60,
                   what="the deferral of the Maildir delivery (read-only homes)")
    except AssertionError as e:
        raise AssertionError(str(e) + c.journal()) from None
    assert "status=deferred" in c.journal(100)
    assert "Mail queue is empty" not in c.ok(["postqueue", "-p"])

    # daemon-reload runs the generator: the drop-in, ProtectHome=no.
    c.ok(["systemctl", "daemon-reload"])
    dropin = c.path(DROPIN).read_text()
    assert "ProtectHome=no" in dropin and "home_mailbox = Maildir/" in dropin, dropin
    assert DROPIN in prop(c, "DropInPaths")
    assert prop(c, "ProtectHome") == "no"
    c.ok(["systemctl", "restart", "postern.service"], timeout=120)
    assert c.run(["systemctl", "is-active", "postern.service"]).stdout.strip() == "active"
    c.ok(["postqueue", "-f"])
    c.ok(["/usr/sbin/sendmail", f"{USER}@localhost"], user=USER,
         input=f"Subject: maildir {token}\n\nsecond {token}\n".encode())
    new = c.path(f"/home/{USER}/Maildir/new")

    def delivered():
        if not new.is_dir():
            return False
        texts = [p.read_text(errors="replace") for p in new.iterdir()]
        return any(f"first {token}" in t for t in texts) and \
            any(f"second {token}" in t for t in texts)
    try:
        h.wait_for(delivered, timeout=60, what=f"both messages in ~{USER}/Maildir/new")
    except AssertionError as e:
        raise AssertionError(str(e) + c.journal()) from None
    uid = int(c.ok(["id", "-u", USER]).strip())
    assert all(os.stat(p).st_uid == uid for p in new.iterdir())
    assert "delivered to maildir" in c.journal(200)
    score, out = security_score(c)
    assert score < 5.0, out[-3000:]
    c.ok(["systemctl", "stop", "postern.service"], timeout=90)
