"""The Debian package (issue #22): `scripts/build-deb` builds
postern_VERSION_amd64.deb (and postern-sendmail, the submission commands
and /etc/postern, unpacked before the other MTA goes); lintian finds no
error in them; and, as root on a machine where Debian's postfix (and its
map packages) is installed, `apt-get install ./postern*_amd64.deb` swaps
Postfix out in one transaction
with /usr/sbin/sendmail present throughout, Postern runs (under systemd,
or started by `postern start` where there is none, as in CI's container),
takes mail by /usr/sbin/sendmail and by SMTP on a loopback port and
delivers it; `apt-get remove` leaves the queue, purge removes it; then
the Postfix packages that were installed are installed again and
/etc/postfix restored, leaving the machine as it was (Postfix stopped).

The install test removes Postfix for a while: it must run alone and after
every other test (marker ``serial_last``, see tests/conftest.py)."""

import grp
import os
import pwd
import shutil
import smtplib
import socket
import subprocess
import tempfile
import threading
import time
import uuid
from pathlib import Path

import pytest

import postern_harness as h

# exclusive as well: another pytest run on the same machine (a developer's,
# or a second checkout's) must not use Postfix while it is swapped out.
pytestmark = [pytest.mark.serial_last, pytest.mark.exclusive]

APT_ENV = dict(os.environ, DEBIAN_FRONTEND="noninteractive", LC_ALL="C")
PKG_USER = "ptpkg"


@pytest.fixture(scope="module")
def debs():
    """The packages, built once by the documented command:
    {"postern": path, "postern-sendmail": path}."""
    if not shutil.which("dpkg-deb"):
        pytest.skip("needs dpkg-deb")
    out = Path(tempfile.mkdtemp(prefix="postern-deb-"))
    env = dict(os.environ)
    env["PATH"] = os.path.expanduser("~/.cargo/bin") + os.pathsep + env.get("PATH", "")
    r = h.run([h.REPO / "scripts" / "build-deb", "--out", out], env=env, timeout=3600)
    assert r.returncode == 0, h.describe(r)
    found = {p.name.split("_")[0]: p for p in out.glob("postern*_amd64.deb")}
    assert set(found) == {"postern", "postern-sendmail"}, list(out.iterdir())
    assert r.stdout.strip().splitlines()[-2:] == [str(found["postern"]),
                                                  str(found["postern-sendmail"])]
    assert found["postern"].name.startswith("postern_")
    yield found
    shutil.rmtree(out, ignore_errors=True)


@pytest.fixture(scope="module")
def deb(debs):
    return debs["postern"]


def deb_field(deb, name):
    r = h.run(["dpkg-deb", "-f", deb, name])
    assert r.returncode == 0, h.describe(r)
    return r.stdout.strip()


def deb_listing(deb):
    """{path: (mode string, owner, link target or None)} of the package."""
    r = h.run(["dpkg-deb", "-c", deb])
    assert r.returncode == 0, h.describe(r)
    out = {}
    for line in r.stdout.splitlines():
        f = line.split(None, 5)
        rest = f[5]
        target = None
        if " -> " in rest:
            rest, target = rest.split(" -> ", 1)
        out[rest.lstrip(".").rstrip("/") or "/"] = (f[0], f[1], target)
    return out


def relations(deb, field):
    v = deb_field(deb, field)
    return [x.strip().split()[0] for x in v.split(",")] if v else []


def test_package_contents_and_fields(debs):
    deb, sub = debs["postern"], debs["postern-sendmail"]
    assert deb.name.startswith("postern_") and deb.name.endswith("_amd64.deb")
    assert deb_field(deb, "Package") == "postern"
    assert deb_field(sub, "Package") == "postern-sendmail"
    assert deb_field(deb, "Architecture") == "amd64"
    # As Debian's MTAs: Provides, Conflicts, Replaces mail-transport-agent.
    for field in ("Provides", "Conflicts", "Replaces"):
        assert "mail-transport-agent" in relations(deb, field), field
    # The submission package conflicts with nothing (so apt unpacks it
    # before it removes the other MTA) and takes Postfix's files over.
    assert not deb_field(sub, "Conflicts") and not deb_field(sub, "Breaks")
    assert not deb_field(sub, "Provides")
    assert "postfix" in relations(sub, "Replaces")
    assert "postern" in relations(sub, "Depends")
    assert "postern-sendmail" in relations(deb, "Depends")
    files = deb_listing(deb)
    subfiles = deb_listing(sub)
    for path in ("/usr/sbin/postern", "/usr/sbin/postqueue", "/usr/sbin/postconf",
                 "/usr/sbin/postmap", "/usr/sbin/postsuper",
                 "/usr/libexec/postern/master", "/usr/libexec/postern/smtpd",
                 "/usr/libexec/postern/local", "/usr/libexec/postern/qmgr",
                 "/lib/systemd/system/postern.service", "/etc/logrotate.d/postern",
                 "/usr/lib/systemd/system-generators/postern-systemd-generator",
                 "/usr/share/man/man8/postern-systemd-generator.8.gz",
                 "/usr/share/man/man5/postconf.5.gz",
                 "/usr/share/man/man8/master.8.gz", "/usr/share/doc/postern/copyright"):
        assert path in files, path
    for path in ("/usr/sbin/sendmail", "/usr/sbin/postdrop", "/etc/postern/main.cf",
                 "/etc/postern/master.cf", "/usr/share/man/man1/sendmail.1.gz",
                 "/usr/share/doc/postern-sendmail/copyright"):
        assert path in subfiles, path
    assert not set(files) & {k for k, v in subfiles.items() if not v[0].startswith("d")}
    assert subfiles["/usr/lib/sendmail"][2] == "../sbin/sendmail"
    assert subfiles["/usr/bin/newaliases"][2] == "../sbin/sendmail"
    # Everything root's in the archives; the maintainer scripts give the
    # queue its owners.
    for listing in (files, subfiles):
        assert all(v[1] == "root/root" for v in listing.values()), \
            [k for k, v in listing.items() if v[1] != "root/root"]
        assert not any(k.startswith("/var/spool/postern/") for k in listing)
        # No uncompressed manual page (lintian wants them compressed).
        assert not [k for k in listing if k.startswith("/usr/share/man/")
                    and k[-2:-1] == "." and k[-1].isdigit()]
    r = h.run(["dpkg-deb", "-I", sub, "conffiles"])
    assert {"/etc/postern/main.cf", "/etc/postern/master.cf"} <= set(r.stdout.split())
    r = h.run(["dpkg-deb", "-I", deb, "conffiles"])
    assert "/etc/logrotate.d/postern" in r.stdout.split()


def test_lintian_reports_no_errors(debs):
    if not shutil.which("lintian"):
        pytest.fail("lintian is not installed (scripts/test installs it)")
    r = h.run(["lintian", "--allow-root", "--tag-display-limit", "0",
               debs["postern"], debs["postern-sendmail"]], timeout=900)
    errors = [l for l in r.stdout.splitlines() if l.startswith("E:")]
    assert not errors, r.stdout + r.stderr
    # lintian exits 2 on a run error (not on tags).
    assert r.returncode in (0, 1), h.describe(r)


# --------------------------------------------------------------------------
# Install, use, remove, purge, and Postfix back


def installed_packages():
    r = h.run(["dpkg-query", "-W", "-f", "${Package}\t${db:Status-Abbrev}\n"])
    assert r.returncode == 0, h.describe(r)
    return {l.split("\t")[0] for l in r.stdout.splitlines() if l.split("\t")[1].startswith("ii")}


def statoverrides():
    r = h.run(["dpkg-statoverride", "--list"])
    return sorted(r.stdout.splitlines())


def apt(*args, timeout=1200, cwd=None):
    return h.run(["apt-get", "-y", "-q", *args], env=APT_ENV, timeout=timeout, cwd=cwd)


def postfix_running():
    if not os.path.exists("/usr/sbin/postfix"):
        return False
    return h.run(["/usr/sbin/postfix", "status"]).returncode == 0


class SendmailWatch:
    """Checks, every millisecond, that /usr/sbin/sendmail is there and
    executable; counts the moments it was not."""

    def __init__(self):
        self.missing = 0
        self.checks = 0
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _run(self):
        while not self._stop.is_set():
            self.checks += 1
            if not os.access("/usr/sbin/sendmail", os.X_OK):
                self.missing += 1
            time.sleep(0.001)

    def stop(self):
        self._stop.set()
        self._t.join(5)


def mbox_has(user, token):
    p = Path("/var/mail") / user
    try:
        return token in p.read_text(errors="replace")
    except FileNotFoundError:
        return False


def test_apt_install_swaps_postfix_for_postern_and_back(debs):
    if not h.is_root():
        pytest.skip("installing a package needs root")
    if not shutil.which("apt-get"):
        pytest.skip("needs apt-get")
    before = installed_packages()
    if "postfix" not in before:
        pytest.skip("Debian's postfix is not installed here (scripts/test installs it)")
    postfix_pkgs = sorted(p for p in before if p.startswith("postfix"))
    # What we restore must be at hand before anything is removed.
    r = apt("install", "--reinstall", "--download-only", *postfix_pkgs)
    if r.returncode != 0:
        pytest.skip("cannot download the Postfix packages to put back: " + r.stderr[-500:])
    overrides_before = statoverrides()
    had_user = h._user_exists("postern")
    had_group = h._group_exists("postdrop")
    had_aliases_cdb = os.path.exists("/etc/aliases.cdb")
    assert not os.path.exists("/etc/postern"), "a Postern package is installed already"
    assert not os.path.exists("/var/spool/postern")
    saved = Path(tempfile.mkdtemp(prefix="postern-pkg-saved-"))
    shutil.copytree("/etc/postfix", saved / "postfix", symlinks=True)
    made_user = not h._user_exists(PKG_USER)
    if made_user:
        r = h.run(["useradd", "--create-home", "--shell", "/bin/sh", PKG_USER])
        assert r.returncode == 0, h.describe(r)
    was_running = postfix_running()
    systemd = os.path.isdir("/run/systemd/system")
    started_by_hand = False
    try:
        # --- install: Postfix goes, Postern comes, sendmail stays --------
        watch = SendmailWatch()
        r = apt("install", *[f"./{p.name}" for p in debs.values()],
                cwd=debs["postern"].parent)
        watch.stop()
        assert r.returncode == 0, h.describe(r)
        assert watch.checks > 100, watch.checks
        assert watch.missing == 0, (
            f"/usr/sbin/sendmail was missing {watch.missing} times of {watch.checks} "
            "during the switch\n" + r.stdout[-4000:])
        after = installed_packages()
        assert {"postern", "postern-sendmail"} <= after
        assert not [p for p in after if p.startswith("postfix")], after
        assert not os.path.exists("/usr/sbin/postfix")
        # The note for the administrator who had Postfix.
        assert "postern -c /etc/postfix check" in r.stdout, r.stdout[-4000:]
        # Accounts, set-gid programs and the queue tree.
        pw = pwd.getpwnam("postern")
        postdrop_gid = grp.getgrnam("postdrop").gr_gid
        st = os.stat("/usr/sbin/postdrop")
        assert st.st_mode & 0o2000 and st.st_gid == postdrop_gid, oct(st.st_mode)
        st = os.stat("/var/spool/postern/maildrop")
        assert (st.st_mode & 0o7777, st.st_uid, st.st_gid) == (0o1730, pw.pw_uid, postdrop_gid)
        st = os.stat("/var/spool/postern/public")
        assert (st.st_mode & 0o7777, st.st_gid) == (0o710, postdrop_gid)
        assert os.stat("/var/spool/postern/incoming").st_uid == pw.pw_uid
        assert os.path.realpath("/usr/sbin/sendmail") == "/usr/sbin/sendmail"
        r = h.run(["/usr/sbin/postern", "check"])
        assert r.returncode == 0, h.describe(r)

        # --- run it on the installed configuration, plus a loopback port --
        port = h.free_port()
        with open("/etc/postern/main.cf", "a") as f:
            f.write("\n# test_package\ninet_interfaces = loopback-only\n")
        with open("/etc/postern/master.cf", "a") as f:
            f.write(f"127.0.0.1:{port} inet n - y - - smtpd\n")
        if systemd:
            r = h.run(["systemctl", "restart", "postern.service"], timeout=120)
            assert r.returncode == 0, h.describe(r)
            r = h.run(["systemctl", "is-active", "postern.service"])
            assert r.stdout.strip() == "active", h.describe(r)
        else:
            r = h.run(["/usr/sbin/postern", "start"], timeout=60)
            assert r.returncode == 0, h.describe(r)
            started_by_hand = True
        h.wait_for(lambda: h.smtp_banner_ok(port), timeout=30, what=f"smtpd on {port}")
        r = h.run(["/usr/sbin/postern", "status"])
        assert r.returncode == 0, h.describe(r)

        token = uuid.uuid4().hex[:12]
        # /usr/sbin/sendmail as a plain user: postdrop's set-gid bit works.
        r = h.run(["/usr/sbin/sendmail", f"{PKG_USER}@localhost"], user=PKG_USER,
                  input=f"Subject: by sendmail {token}\n\nvia sendmail {token}\n".encode())
        assert r.returncode == 0, h.describe(r)
        with smtplib.SMTP("127.0.0.1", port, timeout=30) as s:
            s.sendmail("someone@example.org", [f"{PKG_USER}@localhost"],
                       f"Subject: by smtp {token}\r\n\r\nvia smtp {token}\r\n")

        def both():
            p = Path("/var/mail") / PKG_USER
            t = p.read_text(errors="replace") if p.exists() else ""
            return f"via sendmail {token}" in t and f"via smtp {token}" in t
        try:
            h.wait_for(both, timeout=60, what="both messages in /var/mail/" + PKG_USER)
        except AssertionError:
            log = Path("/var/log/postern.log")
            raise AssertionError("not delivered; /var/log/postern.log:\n"
                                 + (log.read_text(errors="replace")[-5000:] if log.exists() else "(none)"))
        log = Path("/var/log/postern.log").read_text(errors="replace")
        assert "status=sent" in log, log[-3000:]
        # The network daemons run as postern.
        r = h.run(["ps", "-o", "user=,comm=", "-C", "smtpd"])
        assert "postern" in r.stdout.split(), r.stdout

        # --- remove keeps the queue, purge removes it ----------------------
        if started_by_hand:
            pass  # prerm stops it
        r = apt("remove", "postern")
        assert r.returncode == 0, h.describe(r)
        # postern-sendmail goes with it (it depends on postern).
        assert not {"postern", "postern-sendmail"} & installed_packages()
        started_by_hand = False
        assert not os.path.exists("/usr/sbin/postern")
        assert os.path.isdir("/var/spool/postern/maildrop")
        assert os.path.exists("/etc/postern/main.cf")
        assert not h.smtp_banner_ok(port), "Postern still runs after apt-get remove"
        r = apt("purge", "postern", "postern-sendmail")
        assert r.returncode == 0, h.describe(r)
        assert not os.path.exists("/var/spool/postern")
        assert not os.path.exists("/etc/postern")
        assert not os.path.exists("/var/log/postern.log")
    finally:
        if started_by_hand and os.path.exists("/usr/sbin/postern"):
            h.run(["/usr/sbin/postern", "stop"], timeout=60)
        # --- the machine as it was -----------------------------------------
        now = installed_packages()
        left = [p for p in ("postern", "postern-sendmail")
                if p in now or os.path.exists(f"/var/lib/dpkg/info/{p}.list")]
        if left:
            apt("purge", *left)
        r = apt("install", *postfix_pkgs)
        restored = r.returncode == 0
        missing = sorted(before - installed_packages())
        if missing:
            apt("install", *missing)
        # What came with Postern (logrotate, recommended) goes again.
        extra = sorted(installed_packages() - before)
        if extra:
            apt("purge", *extra)
        # /etc/postfix as it was.
        if Path("/etc/postfix").exists():
            shutil.rmtree("/etc/postfix")
        shutil.copytree(saved / "postfix", "/etc/postfix", symlinks=True)
        shutil.rmtree(saved, ignore_errors=True)
        # Postfix stopped, as scripts/test leaves it.
        if postfix_running() and not was_running:
            h.run(["/usr/sbin/postfix", "stop"], timeout=60)
        if made_user:
            h.run(["userdel", "--remove", PKG_USER])
            Path("/var/mail", PKG_USER).unlink(missing_ok=True)
        if not had_user and h._user_exists("postern"):
            h.run(["userdel", "postern"])
        if not had_group and h._group_exists("postdrop"):
            h.run(["groupdel", "postdrop"])
        if not had_aliases_cdb:
            Path("/etc/aliases.cdb").unlink(missing_ok=True)
    assert restored, h.describe(r)
    assert installed_packages() == before, "the installed packages differ"
    assert statoverrides() == overrides_before
    assert os.access("/usr/sbin/sendmail", os.X_OK)
    r = h.run(["/usr/sbin/postfix", "check"])
    assert r.returncode == 0, h.describe(r)
    assert postfix_running() == was_running
