"""A private Postfix as the far side of Postern's SMTP client: it receives
on a loopback port, optionally with STARTTLS (a test CA and a leaf
certificate made here) and SASL (checked through Dovecot's auth service),
and delivers what it accepts for its domain to one Maildir.

    from postfix_peer import PostfixPeer, TestCA, postfix_peer
    ca = TestCA(tmpdir, names=["localhost"])        # ca.ca_file, ca.cert_file, ca.key_file
    far = PostfixPeer(tls=ca, sasl_auth_port=None).start()
    far.port                                        # SMTP on 127.0.0.1:PORT
    far.smtps_port                                  # with tls: SMTPS (TLS first) too
    far.messages()                                  # [(path, bytes)] delivered
    far.wait_for(token)                             # bounded wait for a message
    far.log_text()                                  # its maillog
    far.connections()                               # "connect from" lines so far
    far.stop()

Or as the pytest fixture ``postfix_peer`` (a factory taking the same
keyword arguments; each instance is stopped at teardown; skips the test
when Postfix is not installed).

Everything is in one temporary directory DIR: ``etc/`` (main.cf,
master.cf), ``queue/``, ``data/``, ``mail/`` (the Maildir base; every
recipient of ``far.test`` lands in ``mail/far/``), ``maillog``. It runs
with ``postfix -c DIR/etc start`` (as root: its daemons run as the
``postfix`` user) and is stopped with ``postfix -c DIR/etc stop``, and
then by the PID of its master if that did not work. Postfix's set-gid
commands (postdrop, postqueue) accept a non-default configuration
directory only when the default main.cf lists it in
``alternate_config_directories``: the fixture adds DIR/etc there while the
instance runs (CI machines are throwaway) and takes it out again at stop.
"""

import os
import pwd
import re
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

import postern_harness as h

POSTFIX = "/usr/sbin/postfix"
POSTCONF = "/usr/sbin/postconf"
DOMAIN = "far.test"


def postfix_available():
    return os.access(POSTFIX, os.X_OK) and os.access(POSTCONF, os.X_OK)


class TestCA:
    """A test CA and one leaf certificate signed by it, made with openssl.
    ``names``: DNS names of the leaf (the first is its CN); 127.0.0.1 is
    added as an IP address. Files: ``ca_file``, ``cert_file``, ``key_file``."""

    __test__ = False  # not a pytest class

    def __init__(self, directory, names=("localhost",), cn="Postern Test CA"):
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        os.chmod(d, 0o755)  # Postern's smtp (mail_owner) reads ca.pem
        self.dir = d
        self.ca_key = d / "ca.key"
        self.ca_file = d / "ca.pem"
        self.key_file = d / "leaf.key"
        self.cert_file = d / "leaf.pem"
        csr = d / "leaf.csr"
        ext = d / "leaf.ext"
        self.names = list(names)

        def ossl(*args):
            r = h.run(["openssl", *args], timeout=60)
            if r.returncode != 0:
                raise RuntimeError("openssl failed\n" + h.describe(r))

        ossl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", self.ca_key,
             "-out", self.ca_file, "-days", "2", "-subj", f"/CN={cn}",
             "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign")
        ossl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", self.key_file,
             "-out", csr, "-subj", f"/CN={self.names[0]}")
        san = ",".join([f"DNS:{n}" for n in self.names] + ["IP:127.0.0.1"])
        ext.write_text(f"basicConstraints=critical,CA:FALSE\n"
                       f"keyUsage=critical,digitalSignature,keyEncipherment\n"
                       f"extendedKeyUsage=serverAuth\nsubjectAltName={san}\n")
        ossl("x509", "-req", "-in", csr, "-CA", self.ca_file, "-CAkey", self.ca_key,
             "-CAcreateserial", "-out", self.cert_file, "-days", "2", "-extfile", ext)
        for f in (self.ca_file, self.cert_file, self.key_file):
            os.chmod(f, 0o644)


def _postconf_default(name):
    r = h.run([POSTCONF, "-h", name], timeout=30)
    return r.stdout.strip() if r.returncode == 0 else ""


def _set_alternate_dirs(value):
    h.run([POSTCONF, "-e", f"alternate_config_directories = {value}"], timeout=30)


def _edit_alternate_dirs(edit):
    """Read-modify-write of alternate_config_directories under a lock, so
    that peers started and stopped at once (tests run side by side) do not
    lose each other's entries or leave stale ones."""
    import fcntl
    with open("/run/lock/postern-tests-postfix-alternate.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        current = _postconf_default("alternate_config_directories")
        dirs = current.replace(",", " ").split()
        new = edit(dirs)
        if new != dirs:
            _set_alternate_dirs(" ".join(new))


class PostfixPeer:
    """One private Postfix (see the module doc).

    ``tls``: a TestCA whose leaf the server presents with STARTTLS (None:
    no STARTTLS). ``sasl_auth_port``: Dovecot's auth service on
    127.0.0.1:PORT; when given, AUTH is offered (only after STARTTLS when
    ``auth_only_tls``) and a recipient is accepted only from an
    authenticated client. ``params``: more main.cf settings;
    ``master_extra``: more master.cf lines.
    """

    def __init__(self, tls=None, sasl_auth_port=None, auth_only_tls=False, params=None,
                 tmp_base=None, master_extra=()):
        if not h.is_root():
            raise RuntimeError("a private Postfix needs root")
        self.dir = Path(tempfile.mkdtemp(prefix="pt-postfix-", dir=tmp_base))
        os.chmod(self.dir, 0o755)
        self.etc = self.dir / "etc"
        self.queue = self.dir / "queue"
        self.data = self.dir / "data"
        self.mail = self.dir / "mail"
        self.maillog = self.dir / "maillog"
        self.port = h.free_port()
        self.smtps_port = h.free_port() if tls is not None else None
        pw = pwd.getpwnam("postfix")
        for d in (self.etc, self.queue, self.mail):
            d.mkdir(mode=0o755)
        self.data.mkdir(mode=0o700)
        os.chown(self.data, pw.pw_uid, pw.pw_gid)
        os.chown(self.mail, pw.pw_uid, pw.pw_gid)
        self.maillog.touch(mode=0o644)
        self.vuid, self.vgid = pw.pw_uid, pw.pw_gid
        self.params = {
            "compatibility_level": "3.6",
            "queue_directory": str(self.queue),
            "data_directory": str(self.data),
            "mail_owner": "postfix",
            "setgid_group": "postdrop",
            "maillog_file": str(self.maillog),
            "maillog_file_prefixes": str(self.dir),
            "myhostname": "mx.far.test",
            "mydomain": DOMAIN,
            "mydestination": "",
            "inet_interfaces": "127.0.0.1",
            "inet_protocols": "ipv4",
            "mynetworks": "127.0.0.0/8",
            "smtpd_relay_restrictions": "permit_mynetworks, permit_sasl_authenticated, "
                                        "reject_unauth_destination",
            "virtual_mailbox_domains": DOMAIN,
            "virtual_mailbox_base": str(self.mail),
            "virtual_mailbox_maps": "static:far/",
            "virtual_uid_maps": f"static:{self.vuid}",
            "virtual_gid_maps": f"static:{self.vgid}",
            "virtual_minimum_uid": "1",
            "alias_maps": "",
            "alias_database": "",
            "local_recipient_maps": "",
            "smtputf8_enable": "yes",
            "biff": "no",
            "smtpd_banner": "$myhostname ESMTP far side",
            "smtpd_tls_security_level": "none",
            "smtpd_sasl_auth_enable": "no",
            "smtp_tls_security_level": "none",
        }
        if tls is not None:
            self.params.update({
                "smtpd_tls_security_level": "may",
                "smtpd_tls_cert_file": str(tls.cert_file),
                "smtpd_tls_key_file": str(tls.key_file),
                "smtpd_tls_loglevel": "1",
                "smtpd_tls_received_header": "yes",
            })
        if sasl_auth_port is not None:
            self.params.update({
                "smtpd_sasl_auth_enable": "yes",
                "smtpd_sasl_type": "dovecot",
                "smtpd_sasl_path": f"inet:127.0.0.1:{sasl_auth_port}",
                "smtpd_tls_auth_only": "yes" if auth_only_tls else "no",
                "broken_sasl_auth_clients": "no",
                # Only an authenticated client may hand mail over.
                "mynetworks": "192.0.2.1/32",
                "smtpd_relay_restrictions": "permit_sasl_authenticated, reject",
                "smtpd_recipient_restrictions": "permit_sasl_authenticated, reject",
            })
        self.params.update(params or {})
        # More master.cf lines (a spawn service, ...).
        self.master_extra = list(master_extra)
        self.added_alternate = False
        self.started = False
        self._write_config()

    def _write_config(self):
        smtps = ""
        if self.smtps_port:
            smtps = (f"127.0.0.1:{self.smtps_port} inet n - n - - smtpd\n"
                     "  -o smtpd_tls_wrappermode=yes\n")
        text = "# Written by tests/postfix_peer.py\n"
        text += "".join(f"{k} = {v}\n" for k, v in self.params.items())
        (self.etc / "main.cf").write_text(text)
        master = f"""\
# Written by tests/postfix_peer.py
127.0.0.1:{self.port} inet n - n - - smtpd
{smtps}pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
tlsmgr    unix  -       -       n       1000?   1       tlsmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
smtp      unix  -       -       n       -       -       smtp
relay     unix  -       -       n       -       -       smtp
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
local     unix  -       n       n       -       -       local
virtual   unix  -       n       n       -       -       virtual
lmtp      unix  -       -       n       -       -       lmtp
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
"""
        master += "".join(line + "\n" for line in self.master_extra)
        (self.etc / "master.cf").write_text(master)
        for f in ("main.cf", "master.cf"):
            os.chmod(self.etc / f, 0o644)

    # -- start and stop ----------------------------------------------------

    def _postfix(self, *args, timeout=60):
        return h.run([POSTFIX, "-c", self.etc, *args], timeout=timeout)

    def start(self, timeout=30):
        _edit_alternate_dirs(lambda dirs: dirs if str(self.etc) in dirs else [*dirs, str(self.etc)])
        self.added_alternate = True
        r = self._postfix("start")
        if r.returncode != 0:
            raise AssertionError("postfix start failed\n" + h.describe(r) + self.log_text())
        self.started = True
        h.wait_for(lambda: h.smtp_banner_ok(self.port), timeout,
                   what=f"the far-side Postfix on port {self.port}")
        return self

    def master_pid(self):
        try:
            return int((self.queue / "pid" / "master.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def stop(self, remove=True):
        if self.started:
            pid = self.master_pid()
            r = self._postfix("stop")
            if pid and r.returncode != 0:
                h.kill_pid(pid, signal.SIGTERM)
            if pid:
                h.poll_until(lambda: not h.pid_alive(pid), 15)
                if h.pid_alive(pid):
                    h.kill_pid(pid, signal.SIGKILL)
            self.started = False
        if self.added_alternate:
            _edit_alternate_dirs(lambda dirs: [d for d in dirs if d != str(self.etc)])
            self.added_alternate = False
        if remove:
            shutil.rmtree(self.dir, ignore_errors=True)

    # -- looking inside ----------------------------------------------------

    def log_text(self):
        try:
            return self.maillog.read_text(errors="replace")
        except OSError:
            return ""

    def connections(self):
        """How many SMTP connections the far side has seen."""
        return len(re.findall(r"postfix/smtpd\[\d+\]: connect from ", self.log_text()))

    def messages(self):
        out = []
        for sub in ("new", "cur"):
            d = self.mail / "far" / sub
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

    def find(self, token):
        tok = token.encode() if isinstance(token, str) else token
        return [(p, b) for p, b in self.messages() if tok in b]

    def wait_for(self, token, count=1, timeout=30.0):
        return h.wait_for(
            lambda: (lambda m: m if len(m) >= count else None)(self.find(token)),
            timeout, interval=0.2,
            what=f"{count} message(s) with {token} at the far-side Postfix")


@pytest.fixture
def postfix_peer():
    """Factory: ``postfix_peer(tls=..., sasl_auth_port=..., params=...)`` ->
    a started PostfixPeer; each is stopped at teardown."""
    if not postfix_available():
        pytest.skip("Postfix is not installed (scripts/test installs postfix)")
    if not h.is_root():
        pytest.skip("a private Postfix needs root")
    started = []

    def start(**kwargs):
        p = PostfixPeer(**kwargs)
        started.append(p)
        return p.start()

    yield start
    for p in started:
        p.stop()
