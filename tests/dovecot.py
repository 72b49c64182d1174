"""A private Dovecot for Postern's tests: SASL authentication (for smtpd's
``smtpd_sasl_type = dovecot``) and LMTP delivery (for an ``lmtp``
transport), both on Unix sockets and on loopback TCP ports.

    from dovecot import Dovecot
    d = Dovecot(users={"alice@example.test": "secret"}).start()
    d.auth_socket      # Unix socket for smtpd_sasl_path (mode 0666)
    d.auth_port        # the same auth service as inet:127.0.0.1:PORT
    d.lmtp_socket      # Unix socket for an LMTP client (mode 0666)
    d.lmtp_port        # LMTP on 127.0.0.1:PORT
    d.add_user("bob@example.test", "pw")   # passwd-file; Dovecot re-reads it
    d.messages("alice@example.test")       # [(path, bytes)] in new/ and cur/
    d.wait_for_messages("alice@example.test", token)
    d.log_text()                           # DIR/dovecot.log
    d.stop()

Or as the pytest fixture ``dovecot`` (a factory taking the same keyword
arguments; every instance is stopped by PID at teardown; it skips the test
when Dovecot is not installed): in a test file,
``from dovecot import Dovecot, dovecot  # noqa: F401``.

Everything lives in one temporary directory DIR (short, under /tmp, so
socket paths stay below 108 bytes): ``dovecot.conf``, ``passwd`` (lines
``user:{PLAIN}password``), ``run/`` (base_dir), ``state/``, ``dovecot.log``,
and ``home/USER/Maildir/`` for each user's mail. Dovecot runs in the
foreground (``dovecot -F -c DIR/dovecot.conf``) and is stopped by PID.
Users' mail is owned by ``mail_user`` (default ``nobody`` when root, else
the current user). Nothing in /etc/dovecot is read or changed.
"""

import grp
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

import postern_harness as h

DOVECOT = shutil.which("dovecot") or "/usr/sbin/dovecot"


def dovecot_available():
    """True if the dovecot binary and its LMTP server are installed."""
    if not os.access(DOVECOT, os.X_OK):
        return False
    for libexec in ("/usr/lib/dovecot", "/usr/libexec/dovecot"):
        if os.access(os.path.join(libexec, "lmtp"), os.X_OK):
            return True
    return False


def _port_open(port):
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def _unix_open(path):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.settimeout(0.5)
        s.connect(str(path))
        return True
    except OSError:
        return False
    finally:
        s.close()


class Dovecot:
    """One private Dovecot instance (see the module doc).

    ``users``: {login: password} written to the passwd-file (PLAIN scheme).
    ``auth_socket_path``: where the auth-client listener goes (default
    ``DIR/auth``); e.g. a Postern instance's ``queue/private/auth`` to test
    a relative ``smtpd_sasl_path``. ``auth_failure_delay``: Dovecot's delay
    before a FAIL (its default is 2 secs). ``mechanisms``: auth_mechanisms.
    ``extra_conf``: text appended to dovecot.conf.
    """

    def __init__(self, users=None, auth_socket_path=None, auth_failure_delay="2 secs",
                 mechanisms="plain login", mail_user=None, extra_conf="", tmp_base=None):
        self.dir = Path(tempfile.mkdtemp(prefix="pt-dovecot-", dir=tmp_base))
        os.chmod(self.dir, 0o755)
        self.run_dir = self.dir / "run"
        self.state_dir = self.dir / "state"
        self.home = self.dir / "home"
        self.conf_path = self.dir / "dovecot.conf"
        self.passwd_path = self.dir / "passwd"
        self.log_path = self.dir / "dovecot.log"
        self.auth_socket = Path(auth_socket_path) if auth_socket_path else self.dir / "auth"
        self.lmtp_socket = self.dir / "lmtp"
        self.auth_port = h.free_port()
        self.lmtp_port = h.free_port()
        self.auth_failure_delay = auth_failure_delay
        self.mechanisms = mechanisms
        self.extra_conf = extra_conf
        self.users = dict(users or {})
        if mail_user is None:
            mail_user = "nobody" if h.is_root() else h.current_user()
        self.mail_user = mail_user
        pw = pwd.getpwnam(mail_user)
        self.mail_uid, self.mail_gid = pw.pw_uid, pw.pw_gid
        self.mail_group = grp.getgrgid(pw.pw_gid).gr_name
        for d in (self.run_dir, self.state_dir, self.home):
            d.mkdir(mode=0o755)
        if h.is_root():
            os.chown(self.home, self.mail_uid, self.mail_gid)
        self.log_path.touch(mode=0o644)
        self.proc = None
        self._out = None
        self._write_passwd()
        self._write_conf()

    # -- configuration -----------------------------------------------------

    def _write_passwd(self):
        text = "".join(f"{u}:{{PLAIN}}{p}\n" for u, p in self.users.items())
        tmp = self.passwd_path.with_suffix(".tmp")
        tmp.write_text(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, self.passwd_path)

    def add_user(self, login, password):
        """Adds or changes a user; Dovecot notices the changed passwd-file."""
        self.users[login] = password
        self._write_passwd()
        # passwd-file is re-read when its mtime changes; make sure it does
        # even within the same second.
        t = time.time() + 1
        os.utime(self.passwd_path, (t, t))

    def _write_conf(self):
        if h.is_root():
            login_user, internal_user = "dovenull", "dovecot"
        else:
            login_user = internal_user = h.current_user()
        conf = f"""\
# Written by tests/dovecot.py
base_dir = {self.run_dir}
state_dir = {self.state_dir}
log_path = {self.log_path}
info_log_path = {self.log_path}
protocols = lmtp
listen = 127.0.0.1
ssl = no
disable_plaintext_auth = no
auth_mechanisms = {self.mechanisms}
auth_failure_delay = {self.auth_failure_delay}
auth_verbose = yes
default_login_user = {login_user}
default_internal_user = {internal_user}
mail_location = maildir:{self.home}/%u/Maildir
first_valid_uid = 1
first_valid_gid = 1
postmaster_address = postmaster@example.test
lmtp_save_to_detail_mailbox = no
passdb {{
  driver = passwd-file
  args = scheme=PLAIN username_format=%u {self.passwd_path}
}}
userdb {{
  driver = static
  args = uid={self.mail_user} gid={self.mail_group} home={self.home}/%u
}}
service auth {{
  unix_listener auth-client {{
    path = {self.auth_socket}
    mode = 0666
  }}
  inet_listener {{
    address = 127.0.0.1
    port = {self.auth_port}
  }}
}}
service lmtp {{
  unix_listener {self.lmtp_socket} {{
    mode = 0666
  }}
  inet_listener lmtp {{
    address = 127.0.0.1
    port = {self.lmtp_port}
  }}
}}
{self.extra_conf}
"""
        self.conf_path.write_text(conf)
        os.chmod(self.conf_path, 0o644)

    # -- start and stop ----------------------------------------------------

    def start(self, timeout=20):
        if not dovecot_available():
            raise RuntimeError("Dovecot is not installed (apt-get install dovecot-core dovecot-lmtpd)")
        self.auth_socket.parent.mkdir(parents=True, exist_ok=True)
        self._out = open(self.dir / "dovecot.out", "ab")
        self.proc = subprocess.Popen(
            [DOVECOT, "-F", "-c", str(self.conf_path)],
            stdin=subprocess.DEVNULL, stdout=self._out, stderr=subprocess.STDOUT,
            cwd=str(self.dir), start_new_session=True,
        )

        def ready():
            if self.proc.poll() is not None:
                raise AssertionError(
                    f"dovecot exited with {self.proc.returncode}:\n{self.output()}{self.log_text()}")
            return (_unix_open(self.auth_socket) and _unix_open(self.lmtp_socket)
                    and _port_open(self.auth_port) and _port_open(self.lmtp_port))
        h.wait_for(ready, timeout, what="Dovecot's auth and LMTP listeners")
        return self

    def stop(self, remove=True):
        """Stops Dovecot by PID (SIGTERM, then SIGKILL); removes DIR unless
        ``remove`` is false."""
        h.stop_process(self.proc, grace=10)
        self.proc = None
        if self._out is not None:
            self._out.close()
            self._out = None
        if remove:
            shutil.rmtree(self.dir, ignore_errors=True)

    # -- looking inside ----------------------------------------------------

    def output(self):
        try:
            return (self.dir / "dovecot.out").read_text(errors="replace")
        except OSError:
            return ""

    def log_text(self):
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def maildir(self, user):
        return self.home / user / "Maildir"

    def messages(self, user):
        """[(path, bytes)] of every message in user's Maildir new/ and cur/."""
        out = []
        for sub in ("new", "cur"):
            d = self.maildir(user) / sub
            try:
                names = sorted(os.listdir(d))
            except OSError:
                continue
            for n in names:
                try:
                    out.append((d / n, (d / n).read_bytes()))
                except OSError:
                    pass
        return out

    def find(self, user, token):
        tok = token.encode() if isinstance(token, str) else token
        return [(p, b) for p, b in self.messages(user) if tok in b]

    def wait_for_messages(self, user, token, count=1, timeout=30.0):
        return h.wait_for(
            lambda: (lambda m: m if len(m) >= count else None)(self.find(user, token)),
            timeout, interval=0.2,
            what=f"{count} message(s) with {token} in Dovecot's Maildir of {user}")


@pytest.fixture
def dovecot():
    """Factory: ``dovecot(users={...}, **kwargs)`` -> a started Dovecot;
    each is stopped by PID at teardown. Skips if Dovecot is not installed."""
    if not dovecot_available():
        pytest.skip("Dovecot is not installed (scripts/test installs dovecot-core, dovecot-lmtpd)")
    started = []

    def start(**kwargs):
        d = Dovecot(**kwargs)
        started.append(d)
        return d.start()

    yield start
    for d in started:
        d.stop()
