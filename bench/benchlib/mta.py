"""The two mail systems under test, each a private instance in its own
temporary directory, started inside its own cgroup, listening on a free
loopback port, logging to its own ``maillog`` file:

- ``PostfixInstance``: Debian's Postfix with ``postfix -c DIR start``; a
  master.cf of the core services (no chroot) plus the ``postlog`` service,
  so that ``maillog_file`` works;
- ``PosternInstance``: Postern's configuration written by
  tests/postern_harness.py (``Postern``), started with ``postern start``.

Both get the same main.cf settings that matter here (``relayhost``,
``mydestination``, ``mynetworks``, ``home_mailbox``, ``default_process_limit``)
and default durability.
"""

import os
import re
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .cgroup import Cgroup

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests"))
import postern_harness as H  # noqa: E402

SENT = re.compile(rb" status=sent ")

POSTFIX_MASTER_CF = """\
# Written by bench/benchlib/mta.py
127.0.0.1:{port} inet n - n - - smtpd
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
proxywrite unix -       -       n       -       1       proxymap
smtp      unix  -       -       n       -       -       smtp
relay     unix  -       -       n       -       -       smtp
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
local     unix  -       n       n       -       -       local
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
"""


def run(cmd, timeout=120, **kw):
    r = subprocess.run([str(c) for c in cmd], stdin=subprocess.DEVNULL,
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                       timeout=timeout, **kw)
    return r.returncode, r.stdout.decode("utf-8", "replace")


def ensure_postfix():
    """Installs Debian's postfix (for the daemons, smtp-source, smtp-sink)
    if it is missing, without starting the system instance."""
    if shutil.which("smtp-source") and os.path.exists("/usr/sbin/postfix"):
        return
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    subprocess.run(["sh", "-c", "echo 'postfix postfix/main_mailer_type select No configuration'"
                    " | debconf-set-selections"], check=False)
    subprocess.run(["apt-get", "update"], env=env, check=False)
    subprocess.run(["apt-get", "install", "-y", "postfix"], env=env, check=True)


class LogCounter:
    """Counts ' status=sent ' lines of a growing log file, reading only
    what was appended since the last call."""

    def __init__(self, path):
        self.path = path
        self.offset = 0
        self.count = 0
        self._partial = b""

    def update(self):
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                data = f.read()
        except OSError:
            return self.count
        self.offset += len(data)
        data = self._partial + data
        lines = data.split(b"\n")
        self._partial = lines.pop()
        self.count += sum(1 for ln in lines if SENT.search(ln))
        return self.count


class Instance:
    """Common part: a directory, a port, a cgroup, a log."""

    name = "?"

    def __init__(self, base, relay_port, process_limit=None, extra_params=None):
        self.base = Path(base)
        self.port = H.free_port()
        self.relay_port = relay_port
        self.process_limit = process_limit
        self.extra_params = dict(extra_params or {})
        self.cg = Cgroup(f"ptbench-{self.name}-{os.getpid()}-{self.port}")
        self.started = False
        # Programs started in the MTA's cgroup before it (OpenDKIM for
        # Postfix): their CPU and memory count as the MTA's.
        self.companions = []

    def common_params(self):
        p = {
            "myhostname": f"{self.name}.bench.test",
            "mydomain": "bench.test",
            "mydestination": "$myhostname, localhost",
            "mynetworks": "127.0.0.0/8",
            "home_mailbox": "Maildir/",
            "relayhost": f"[127.0.0.1]:{self.relay_port}",
        }
        if self.process_limit:
            p["default_process_limit"] = str(self.process_limit)
        p.update(self.extra_params)
        return p

    def log_counter(self):
        c = LogCounter(self.maillog)
        return c

    def stop(self):
        """Stops the instance with its own stop command, then kills by PID
        whatever is left in its cgroup, and removes the cgroup."""
        if self.started:
            try:
                self._stop_command()
            except subprocess.TimeoutExpired:
                pass
            for c in self.companions:
                H.stop_process(c)
            self.companions = []
            deadline = time.monotonic() + 10
            while self.cg.pids() and time.monotonic() < deadline:
                time.sleep(0.1)
            if self.cg.pids():
                self.cg.kill_all(signal.SIGKILL)
            self.started = False
        self.cg.remove()


class PostfixInstance(Instance):
    name = "postfix"

    def __init__(self, base, relay_port, process_limit=None, extra_params=None,
                 opendkim=None):
        super().__init__(base, relay_port, process_limit, extra_params)
        # opendkim: (RSA key file, domain, selector): Postfix signs through
        # OpenDKIM, the milter every Postfix + DKIM guide sets up.
        self.opendkim = opendkim
        if opendkim:
            self.milter_port = H.free_port()
            self.extra_params.update({
                "smtpd_milters": f"inet:127.0.0.1:{self.milter_port}",
                "non_smtpd_milters": "$smtpd_milters",
                "milter_default_action": "tempfail"})
        self.dir = Path(tempfile.mkdtemp(prefix="postfix-", dir=base))
        os.chmod(self.dir, 0o755)
        self.etc = self.dir / "etc"
        self.queue = self.dir / "queue"
        self.data = self.dir / "data"
        self.maillog = self.dir / "maillog"
        for d in (self.etc, self.queue, self.data):
            d.mkdir(mode=0o755)
        pw = pwd.getpwnam("postfix")
        os.chown(self.data, pw.pw_uid, pw.pw_gid)
        params = {
            "compatibility_level": "3.6",
            "queue_directory": str(self.queue),
            "data_directory": str(self.data),
            "mail_owner": "postfix",
            "setgid_group": "postdrop",
            "maillog_file": str(self.maillog),
            "maillog_file_prefixes": str(self.dir),
            "inet_interfaces": "127.0.0.1",
            "inet_protocols": "ipv4",
            "alias_maps": f"hash:{self.etc}/aliases",
            "alias_database": f"hash:{self.etc}/aliases",
            "smtpd_relay_restrictions": "permit_mynetworks reject_unauth_destination",
            "biff": "no",
            "multi_instance_enable": "no",
        }
        params.update(self.common_params())
        (self.etc / "main.cf").write_text(
            "# Written by bench/benchlib/mta.py\n"
            + "".join(f"{k} = {v}\n" for k, v in params.items()))
        (self.etc / "master.cf").write_text(POSTFIX_MASTER_CF.format(port=self.port))
        (self.etc / "aliases").write_text("postmaster: root\n")

    def start_opendkim(self):
        """OpenDKIM (Debian's opendkim) as this Postfix's milter, in its
        cgroup: its CPU and memory count as Postfix's."""
        key_file, domain, selector = self.opendkim
        d = self.dir / "opendkim"
        d.mkdir(mode=0o755, exist_ok=True)
        key = d / "key.private"
        shutil.copy(key_file, key)
        pw = pwd.getpwnam("opendkim")
        os.chown(key, pw.pw_uid, pw.pw_gid)
        os.chmod(key, 0o600)
        conf = d / "opendkim.conf"
        conf.write_text(
            "Syslog no\nRequireSafeKeys false\nMode s\n"
            f"Domain {domain}\nSelector {selector}\nKeyFile {key}\n"
            f"Socket inet:{self.milter_port}@127.0.0.1\nCanonicalization relaxed/relaxed\n"
            "SignatureAlgorithm rsa-sha256\nOversignHeaders From\n"
            "InternalHosts 127.0.0.0/8\nUserID opendkim\nBackground no\n"
            f"PidFile {d}/opendkim.pid\n")
        out = open(d / "out", "ab")
        proc = subprocess.Popen(["/usr/sbin/opendkim", "-f", "-x", str(conf)],
                                stdin=subprocess.DEVNULL, stdout=out,
                                stderr=subprocess.STDOUT, preexec_fn=self.cg.enter_fn())
        out.close()
        self.companions.append(proc)

        def listening():
            if proc.poll() is not None:
                raise RuntimeError("opendkim exited: " + (d / "out").read_text(errors="replace"))
            try:
                socket.create_connection(("127.0.0.1", self.milter_port), 0.5).close()
                return True
            except OSError:
                return False
        H.wait_for(listening, 20, what=f"opendkim on {self.milter_port}")

    def start(self):
        # Only Postfix's set-gid commands (postdrop, postqueue) insist on
        # alternate_config_directories in /etc/postfix/main.cf; the load
        # comes by SMTP, so neither runs and the system's main.cf is left
        # alone.
        if self.opendkim:
            self.start_opendkim()
        code, out = run(["/usr/sbin/postalias", "-c", self.etc, f"hash:{self.etc}/aliases"])
        if code != 0:
            raise RuntimeError("postalias failed:\n" + out)
        r = subprocess.run(["postfix", "-c", str(self.etc), "start"],
                           stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, timeout=120,
                           preexec_fn=self.cg.enter_fn())
        self.started = True
        if r.returncode != 0:
            raise RuntimeError("postfix start failed:\n" + r.stdout.decode("utf-8", "replace")
                               + self.log_tail())
        H.wait_for(lambda: H.smtp_banner_ok(self.port), 30, what=f"Postfix on {self.port}")

    def _stop_command(self):
        run(["postfix", "-c", self.etc, "stop"], timeout=60)

    def log_tail(self, n=40):
        try:
            return "\n".join(self.maillog.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""


class PosternInstance(Instance):
    name = "postern"

    def __init__(self, base, relay_port, bin_dir, process_limit=None, extra_params=None,
                 policy_entries=0):
        super().__init__(base, relay_port, process_limit, extra_params)
        H.ensure_system_accounts()
        params = self.common_params()
        files = {}
        if policy_entries:
            # issue #19: the cost of sites. N entries for other domains,
            # and the relay's own (a bracketed next hop is its own site)
            # with limits that do not bind.
            lines = [f"d{i}.example.net max_connections=10 max_message_rate=100/s"
                     for i in range(policy_entries - 1)]
            lines.append("127.0.0.1 max_connections=10000 max_messages_per_connection=100000")
            files["etc/delivery_policy"] = "\n".join(lines) + "\n"
            params["delivery_policy_maps"] = lambda p: f"texthash:{p.etc}/delivery_policy"
        # The harness shortens the retry timers and turns the client name
        # lookup off for tests; a benchmark keeps the defaults, as the
        # Postfix side does.
        params.update({"queue_run_delay": None, "minimal_backoff_time": None,
                       "maximal_backoff_time": None, "smtpd_peername_lookup": None,
                       "inet_interfaces": "127.0.0.1"})
        self.p = H.Postern(params=params, bin_dir=bin_dir, tmp_base=str(base), files=files)
        self.p.port = self.port
        self.p.write_master_cf()
        self.dir = self.p.dir
        self.maillog = self.p.maillog

    def start(self):
        self.p._prepare()  # checks the binaries, builds the alias database
        r = subprocess.run([str(self.p.cmd("postern")), "-c", str(self.p.etc), "start"],
                           stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, timeout=120, env=self.p.env(),
                           cwd=str(self.p.dir), preexec_fn=self.cg.enter_fn())
        self.started = True
        self.p.started = True
        if r.returncode != 0:
            raise RuntimeError("postern start failed:\n" + r.stdout.decode("utf-8", "replace")
                               + self.p.log_tail())
        self.p.wait_ready(30)

    def _stop_command(self):
        self.p.stop(timeout=60)

    def log_tail(self, n=40):
        return self.p.log_tail(n)
