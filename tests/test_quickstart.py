"""The README's quick start from a fresh clone (issue #22): `git clone`
of the committed repository into a temporary directory, then the
README's first command, `scripts/dev-start`, run as written, until a
message sent the way the README says (swaks to 127.0.0.1:2525, and
target/debug/sendmail -C dev/etc) lands in the clone's dev/mail/$USER/;
then ^C (SIGINT to what we started) stops it.

As root, the clone is under a directory only root may enter (as /root
is): dev-start creates the system user postern when it is missing and
runs the network daemons chrooted into dev/queue. As a plain user: a
throwaway user ``ptquick`` (created and removed here) runs it with the
Rust toolchain of the machine made visible in its home (rustup's
~/.rustup bound into its home in a mount namespace of the command only,
and a copy of ~/.cargo); not root, the test runs it as the current
user.

The build goes to CARGO_TARGET_DIR in the temporary directory, seeded with
the compiled third-party crates of this checkout's target/debug (the
clone's own crates are compiled afresh). The plain user's copy of
~/.cargo is seen at the original's path (CARGO_HOME), so that cargo
finds the seeded crates up to date (see same_cargo_home_path).
dev-start listens on the fixed port 2525, so the runs are serialized by
a lock file in /tmp, whatever TMPDIR is: every run on the machine must
see it. The clone and its build (gigabytes) are on the disk, under
/var/tmp, not in TMPDIR: scripts/test points TMPDIR at a tmpfs (memory)."""

import fcntl
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

import pytest

import postern_harness as h

pytestmark = pytest.mark.xdist_group("quickstart")

PORT = 2525
BUILD_TIMEOUT = 1500.0
PLAIN_USER = "ptquick"
# See the module doc; TMPDIR where these do not exist.
LOCK_DIR = "/tmp" if os.path.isdir("/tmp") else tempfile.gettempdir()
DISK_TMP = "/var/tmp" if os.path.isdir("/var/tmp") else None


@pytest.fixture
def quickstart_lock():
    """dev-start's port is fixed: one quick start at a time."""
    with open(os.path.join(LOCK_DIR, "postern-quickstart.lock"), "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield
        fcntl.flock(f, fcntl.LOCK_UN)


def port_free(port):
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def source_target():
    return Path(os.environ.get("CARGO_TARGET_DIR", h.REPO / "target")) / "debug"


def seed_target(dst):
    """Copies the compiled third-party crates (and build-script outputs and
    fingerprints) of this checkout's debug build into ``dst``/debug, so
    that the clone's build compiles only Postern's own crates. Nothing of
    Postern's is copied: the clone's crates are built from its own
    sources."""
    src = source_target()
    out = Path(dst) / "debug"
    (out / "deps").mkdir(parents=True, exist_ok=True)
    if not (src / "deps").is_dir():
        return
    for sub in ("build", ".fingerprint"):
        if (src / sub).is_dir():
            shutil.copytree(src / sub, out / sub, symlinks=True,
                            ignore=shutil.ignore_patterns("postern-*", "postern_*"))
    for f in (src / "deps").iterdir():
        n = f.name
        if n.startswith(("libpostern_", "postern_")):
            continue
        if n.startswith("lib") and n.endswith((".rlib", ".rmeta", ".so")):
            shutil.copy2(f, out / "deps" / n)
        elif n.endswith(".d") and (src / "deps" / ("lib" + n[:-2] + ".rlib")).exists():
            shutil.copy2(f, out / "deps" / n)


def same_cargo_home_path(original, copy):
    """Mount commands (for the plain user's mount namespace, run by root
    before it drops to the user) that show the user's copy of ~/.cargo at
    the path of the original, which the user's build then names as
    CARGO_HOME. Cargo's fingerprint of a crates.io crate holds the absolute
    path of its sources ($CARGO_HOME/registry/src/...): under another path
    the seeded third-party crates would all be compiled again (the case
    took 417 s that way, against the root case's 115 s). Where the
    original's parent is closed to others (root's home, 0700), an empty
    tmpfs covers it in the namespace: it hides nothing the user could see.
    The ~/.rustup bind is made before."""
    cmds = []
    parent = original.parent
    if not parent.stat().st_mode & 0o001:
        cmds.append(f"mount -t tmpfs -o mode=0755,size=1m postern-quickstart {parent}")
        cmds.append(f"mkdir {original}")
    cmds.append(f"mount --bind {copy} {original}")
    return cmds


def clone(dest):
    r = h.run(["git", "clone", "-q", h.REPO, dest], timeout=300)
    assert r.returncode == 0, h.describe(r)
    # A fresh clone: no dev/ and no target/ of ours.
    assert not (Path(dest) / "dev").exists()


def cargo_home():
    """The directory of the cargo the tests were given (rustup's ~/.cargo),
    and rustup's home, when cargo is there."""
    path = os.environ.get("PATH", "") + os.pathsep + os.path.expanduser("~/.cargo/bin")
    cargo = shutil.which("cargo", path=path)
    assert cargo, "the quick start needs a Rust toolchain (cargo)"
    home = Path(cargo).resolve().parent.parent if Path(cargo).parent.name == "bin" else None
    rustup = Path(os.environ.get("RUSTUP_HOME", os.path.expanduser("~/.rustup")))
    return Path(cargo), home, rustup


class Run:
    """scripts/dev-start running in its own process group, at a lower CPU
    priority (nice 10): its build (minutes of CPU) takes what the tests
    running beside it (scripts/test runs several at once) leave, instead of
    slowing them down; it has the whole run to finish."""

    def __init__(self, argv, env, log, cwd):
        self.log = log
        self.out = open(log, "wb")
        self.proc = subprocess.Popen(["nice", "-n", "10", *argv], env=env, cwd=cwd,
                                     stdin=subprocess.DEVNULL, stdout=self.out,
                                     stderr=subprocess.STDOUT, start_new_session=True)

    def text(self):
        return Path(self.log).read_text(errors="replace")

    def wait_listening(self):
        def up():
            if self.proc.poll() is not None:
                raise AssertionError(f"dev-start exited ({self.proc.returncode}):\n"
                                     + self.text()[-6000:])
            return h.smtp_banner_ok(PORT)
        h.wait_for(up, timeout=BUILD_TIMEOUT, interval=1.0,
                   what="dev-start's SMTP service on 127.0.0.1:2525")

    def interrupt(self):
        """^C: SIGINT to the process group we started (its id is our
        child's pid); SIGKILL if it does not end."""
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGINT)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
                raise AssertionError("dev-start did not stop on ^C:\n" + self.text()[-3000:])
        # Nothing of the group is left (master stops its children).
        def group_gone():
            try:
                os.killpg(self.proc.pid, 0)
                return False
            except ProcessLookupError:
                return True
        gone = h.poll_until(group_gone, timeout=20)
        if not gone:
            os.killpg(self.proc.pid, signal.SIGKILL)
            raise AssertionError("processes of dev-start were left after ^C")
        self.out.close()


def delivered(maildir):
    new = Path(maildir) / "new"
    return sorted(new.iterdir()) if new.is_dir() else []


def send_as_readme(checkout, user, token, target, runas=None):
    """The README's two ways: swaks to 127.0.0.1:2525, and the built
    sendmail with -C dev/etc."""
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "HOME": "/tmp", "USER": user}
    cmd = ["swaks", "--server", f"127.0.0.1:{PORT}", "--to", f"{user}@localhost",
           "--header", f"Subject: hello {token}", "--body", f"First message {token}."]
    r = h.run(cmd, env=env, user=runas, timeout=60)
    assert r.returncode == 0, h.describe(r)
    sendmail = Path(target) / "debug" / "sendmail"
    r = h.run([sendmail, "-C", "dev/etc", f"{user}@localhost"], env=env, user=runas,
              input=f"Subject: hello again {token}\n\nFirst message.\n".encode(),
              cwd=checkout, timeout=60)
    assert r.returncode == 0, h.describe(r)


def check_mail(checkout, user, token, run):
    maildir = Path(checkout) / "dev" / "mail" / user
    try:
        files = h.wait_for(lambda: len(delivered(maildir)) >= 2 and delivered(maildir),
                           timeout=60, what=f"two messages in {maildir}/new")
    except AssertionError:
        raise AssertionError("no mail delivered; dev-start's output:\n" + run.text()[-6000:])
    texts = [f.read_text(errors="replace") for f in files]
    assert any(f"Subject: hello {token}" in t for t in texts), texts
    assert any(f"Subject: hello again {token}" in t for t in texts), texts
    log = run.text()
    assert "status=sent" in log and "smtpd" in log, log[-3000:]


def test_quick_start_as_root_from_a_fresh_clone(quickstart_lock):
    if not h.is_root():
        pytest.skip("the root quick start needs root")
    assert port_free(PORT), "port 2525 (dev-start's) is taken"
    base = Path(tempfile.mkdtemp(prefix="postern-quickstart-root-", dir=DISK_TMP))
    os.chmod(base, 0o700)  # as /root: mail_owner cannot enter
    run = None
    try:
        checkout = base / "postern"
        clone(checkout)
        target = base / "target"
        seed_target(target)
        cargo, _home, _rustup = cargo_home()
        env = {
            "PATH": f"{cargo.parent}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            "HOME": os.path.expanduser("~"), "USER": "root", "LOGNAME": "root",
            "CARGO_TARGET_DIR": str(target),
        }
        if os.environ.get("RUSTUP_HOME"):
            env["RUSTUP_HOME"] = os.environ["RUSTUP_HOME"]
        token = uuid.uuid4().hex[:12]
        run = Run(["scripts/dev-start"], env, base / "dev-start.log", checkout)
        run.wait_listening()
        # The account it needs exists now (created when missing).
        pwd.getpwnam("postern")
        main_cf = (checkout / "dev/etc/main.cf").read_text()
        assert "mail_owner = postern" in main_cf
        send_as_readme(checkout, "root", token, target)
        check_mail(checkout, "root", token, run)
        # The network daemons ran as postern, not root.
        pw = pwd.getpwnam("postern")
        assert (checkout / "dev/queue/incoming").stat().st_uid == pw.pw_uid
        run.interrupt()
        run = None
        assert not h.smtp_banner_ok(PORT)
    finally:
        if run is not None:
            try:
                os.killpg(run.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        shutil.rmtree(base, ignore_errors=True)


def _ensure_plain_user():
    r = h.run(["useradd", "--create-home", "--shell", "/bin/bash", PLAIN_USER])
    assert r.returncode == 0, h.describe(r)
    return pwd.getpwnam(PLAIN_USER)


def test_quick_start_as_a_plain_user_from_a_fresh_clone(quickstart_lock):
    assert port_free(PORT), "port 2525 (dev-start's) is taken"
    made_user = False
    base = Path(tempfile.mkdtemp(prefix="postern-quickstart-user-", dir=DISK_TMP))
    os.chmod(base, 0o755)
    run = None
    try:
        cargo, home_cargo, rustup = cargo_home()
        if h.is_root():
            try:
                pw = pwd.getpwnam(PLAIN_USER)
            except KeyError:
                pw = _ensure_plain_user()
                made_user = True
            home = Path(pw.pw_dir)
            checkout = home / "postern"
            shutil.rmtree(checkout, ignore_errors=True)
        else:
            pw = pwd.getpwuid(os.geteuid())
            home = Path(pw.pw_dir)
            checkout = base / "postern"
        clone(checkout)
        target = base / "target"
        seed_target(target)
        token = uuid.uuid4().hex[:12]
        env = {"HOME": str(home), "USER": pw.pw_name, "LOGNAME": pw.pw_name,
               "PATH": "/usr/local/bin:/usr/bin:/bin", "CARGO_TARGET_DIR": str(target)}
        if h.is_root():
            for p in (checkout, target):
                h.run(["chown", "-R", f"{pw.pw_uid}:{pw.pw_gid}", p])
            # The machine's rustup toolchain, as if rustup had installed
            # it for this user: a copy of ~/.cargo (cargo writes there),
            # and ~/.rustup bound into the user's home in a mount
            # namespace of this command only (root's home is closed to
            # others); dev-start finds ~/.cargo/bin itself.
            mounts = []
            if home_cargo is not None and home_cargo.is_dir():
                shutil.rmtree(home / ".cargo", ignore_errors=True)
                r = h.run(["cp", "-a", home_cargo, home / ".cargo"], timeout=300)
                assert r.returncode == 0, h.describe(r)
                h.run(["chown", "-R", f"{pw.pw_uid}:{pw.pw_gid}", home / ".cargo"])
            if rustup.is_dir():
                (home / ".rustup").mkdir(exist_ok=True)
                mounts.append(f"mount --bind {rustup} {home / '.rustup'}")
            if home_cargo is not None and home_cargo.is_dir():
                mounts += same_cargo_home_path(home_cargo, home / ".cargo")
                env["CARGO_HOME"] = str(home_cargo)
            if home_cargo is None:
                env["PATH"] = f"{cargo.parent}:" + env["PATH"]
            script = " && ".join(mounts + [
                f"exec setpriv --reuid={pw.pw_uid} --regid={pw.pw_gid} --init-groups "
                f"--reset-env env -i {' '.join(f'{k}={v}' for k, v in env.items())} "
                f"sh -c 'cd {checkout} && exec scripts/dev-start'"])
            argv = ["unshare", "--mount", "--propagation", "private", "sh", "-c", script]
            runas = pw.pw_name
            penv = None
        else:
            argv = ["scripts/dev-start"]
            penv = dict(os.environ, **{"CARGO_TARGET_DIR": str(target)})
            runas = None
        run = Run(argv, penv, base / "dev-start.log", checkout)
        run.wait_listening()
        main_cf = (checkout / "dev/etc/main.cf").read_text()
        assert f"mail_owner = {pw.pw_name}" in main_cf
        send_as_readme(checkout, pw.pw_name, token, target, runas=runas)
        check_mail(checkout, pw.pw_name, token, run)
        for f in delivered(checkout / "dev/mail" / pw.pw_name):
            assert f.stat().st_uid == pw.pw_uid
        run.interrupt()
        run = None
        assert not h.smtp_banner_ok(PORT)
    finally:
        if run is not None:
            try:
                os.killpg(run.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        shutil.rmtree(base, ignore_errors=True)
        if made_user:
            # Its processes are gone (the group was stopped above).
            h.run(["userdel", "--remove", PLAIN_USER])
