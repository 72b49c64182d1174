"""Helpers for Postern's integration tests.

Everything here drives the real programs: Postern's binaries from
``$POSTERN_BIN_DIR`` (default ``<repo>/target/debug``), and real peers on
loopback (an in-process aiosmtpd receiver, dnsmasq, Postfix's smtp-sink).

Rules kept throughout:
- every wait is bounded (``wait_for``);
- every port is chosen at run time (``free_port``);
- every process is stopped by its PID, never by its name;
- each Postern instance lives in its own temporary directory.

Run with Debian's interpreter: ``/usr/bin/python3 -m pytest tests/``.
"""

import email
import email.policy
import grp
import os
import pwd
import re
import shutil
import signal
import smtplib
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _default_bin_dir():
    env = os.environ.get("POSTERN_BIN_DIR")
    if env:
        return Path(env)
    target = os.environ.get("CARGO_TARGET_DIR") or str(REPO / "target")
    return Path(target) / "debug"


BIN_DIR = _default_bin_dir()

DAEMONS = ("master", "smtpd", "cleanup", "qmgr", "smtp", "local", "pickup")
COMMANDS = ("postern", "sendmail", "postconf", "newaliases", "mailq")
# What the tests cannot run without (newaliases falls back to sendmail -bi).
REQUIRED = DAEMONS + ("postern", "sendmail", "postconf")
QUEUE_NAMES = ("maildrop", "incoming", "active", "deferred", "hold", "corrupt")

MYHOSTNAME = "postern.test"
LOCAL_USERS = ("ptalice", "ptbob")
MAIL_OWNER_WHEN_ROOT = "postern"


# --------------------------------------------------------------------------
# Small utilities


def is_root():
    return os.geteuid() == 0


def current_user():
    return pwd.getpwuid(os.geteuid()).pw_name


def missing_binaries(bin_dir=None):
    bin_dir = Path(bin_dir or BIN_DIR)
    return [n for n in REQUIRED if not os.access(bin_dir / n, os.X_OK)]


def wait_for(fn, timeout=20.0, interval=0.1, what=None):
    """Calls ``fn`` until it returns a true value, at most ``timeout``
    seconds; returns that value, or raises AssertionError naming ``what``."""
    deadline = time.monotonic() + timeout
    while True:
        value = fn()
        if value:
            return value
        if time.monotonic() >= deadline:
            name = what or getattr(fn, "__name__", "a condition")
            raise AssertionError(f"timed out after {timeout:g}s waiting for {name}")
        time.sleep(interval)


def poll_until(fn, timeout=20.0, interval=0.1):
    """Like ``wait_for`` but returns the last value instead of raising."""
    deadline = time.monotonic() + timeout
    while True:
        value = fn()
        if value or time.monotonic() >= deadline:
            return value
        time.sleep(interval)


# Ports are handed out from 20000-31999, below the kernel's ephemeral range
# (32768-60999 by default), so that neither a server binding port 0 nor
# the local end of an outgoing connection takes a port between the moment
# a test chooses it and the moment its daemon binds it. Under pytest-xdist
# each worker (PYTEST_XDIST_WORKER=gwN of PYTEST_XDIST_WORKER_COUNT) has its
# own slice of that range, so two workers never choose the same port.
PORT_RANGE = (20000, 32000)


def _port_slice():
    lo, hi = PORT_RANGE
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    count = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1") or 1)
    index = int(worker[2:]) if worker.startswith("gw") and worker[2:].isdigit() else 0
    size = (hi - lo) // max(count, 1)
    start = lo + (index % max(count, 1)) * size
    return start, start + size


_ports_given = set()
_port_next = None


def _port_free(port, udp):
    kinds = [socket.SOCK_STREAM] + ([socket.SOCK_DGRAM] if udp else [])
    for kind in kinds:
        s = socket.socket(socket.AF_INET, kind)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        finally:
            s.close()
    return True


def free_port(udp=False):
    """A loopback port nobody listens on now (TCP, and UDP too if asked),
    from this process's slice of PORT_RANGE. Never hands out the same port
    twice in one test session, unless the whole slice has been handed out
    (then it starts again from the bottom, skipping ports in use)."""
    global _port_next
    lo, hi = _port_slice()
    if _port_next is None:
        # A different starting point for each run, so that two runs on one
        # machine do not walk the same ports in step.
        _port_next = lo + (os.getpid() * 7919) % (hi - lo)
    for _ in range(hi - lo):
        port = _port_next
        _port_next = lo if _port_next + 1 >= hi else _port_next + 1
        if port in _ports_given:
            continue
        if _port_free(port, udp):
            _ports_given.add(port)
            return port
    _ports_given.clear()
    for _ in range(hi - lo):
        port = _port_next
        _port_next = lo if _port_next + 1 >= hi else _port_next + 1
        if _port_free(port, udp):
            _ports_given.add(port)
            return port
    raise RuntimeError("no free loopback port found")


def run(cmd, input=None, timeout=60, env=None, user=None, cwd=None):
    """Runs a command to completion (bounded by ``timeout``) and returns a
    CompletedProcess whose stdout and stderr are str. Output goes through
    temporary files, not pipes, so that a daemon the command leaves behind
    (``postern start``) cannot keep us waiting for end-of-file.
    ``user``: run as that user via ``runuser -u USER --`` (needs root)."""
    cmd = [str(c) for c in cmd]
    if user is not None and user != current_user():
        if not is_root():
            raise RuntimeError(f"running a command as {user} needs root")
        cmd = ["runuser", "-u", user, "--"] + cmd
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        p = subprocess.run(
            cmd,
            input=input,
            stdin=None if input is not None else subprocess.DEVNULL,
            stdout=out,
            stderr=err,
            timeout=timeout,
            env=env,
            cwd=cwd,
        )
        out.seek(0)
        err.seek(0)
        return subprocess.CompletedProcess(
            cmd,
            p.returncode,
            out.read().decode("utf-8", "replace"),
            err.read().decode("utf-8", "replace"),
        )



def dead_relay_params(port):
    """main.cf settings for a relayhost where nothing listens, tried once,
    then an hour's wait: the queue stays still while a test looks at it,
    until the test itself flushes or releases."""
    return {
        "relayhost": f"[127.0.0.1]:{port}",
        "minimal_backoff_time": "1h",
        "maximal_backoff_time": "1h",
        "queue_run_delay": "1h",
    }


def run_tool(p, name, *args, input=None, timeout=60):
    """One of Postern's commands (`postsuper`, `postqueue`, ...) on
    instance `p`, with its configuration directory."""
    return run([p.cmd(name), "-c", p.etc, *args], input=input, env=p.env(),
               timeout=timeout, cwd=p.dir)

def describe(result):
    """A CompletedProcess as text, for assertion messages."""
    return (
        f"command: {' '.join(result.args)}\nexit status: {result.returncode}\n"
        f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    )


def run_bench(script, args, timeout=600):
    """A bench/ script run by the tests (test_bench_*.py): its
    CompletedProcess and the text for an assertion message (the command,
    its exit status and the ends of its output)."""
    cmd = [sys.executable, str(script), *map(str, args)]
    p = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                       timeout=timeout)
    report = (f"command: {' '.join(cmd)}\nexit {p.returncode}\n"
              f"stdout:\n{p.stdout[-6000:]}\nstderr:\n{p.stderr[-3000:]}")
    return p, report


def xforward_smtp_class():
    """aiosmtpd's SMTP server class that also takes XFORWARD (as a content
    filter does), keeping the attributes in ``session.xforward``: the
    filter of tests/test_content_filter.py and tests/test_proxy_filter.py."""
    from aiosmtpd.smtp import SMTP, syntax

    class XForwardSMTP(SMTP):
        @syntax("XFORWARD attribute=value ...")
        async def smtp_XFORWARD(self, arg):
            attrs = getattr(self.session, "xforward", None)
            if attrs is None:
                attrs = self.session.xforward = {}
            for pair in (arg or "").split():
                k, _, v = pair.partition("=")
                attrs[k.upper()] = v
            await self.push("250 2.0.0 Ok")

    return XForwardSMTP


def smtp_banner_ok(port, host="127.0.0.1", timeout=2.0):
    """True if something on host:port answers with a 220 greeting."""
    try:
        with socket.create_connection((host, port), timeout=timeout) as s:
            s.settimeout(timeout)
            data = b""
            while b"\n" not in data:
                chunk = s.recv(1024)
                if not chunk:
                    return False
                data += chunk
            ok = data.startswith(b"220")
            try:
                s.sendall(b"QUIT\r\n")
                s.recv(1024)
            except OSError:
                pass
            return ok
    except OSError:
        return False


# --------------------------------------------------------------------------
# Processes, by PID


def _proc_stat(pid):
    """(state, ppid, starttime) of a process, or None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    rest = data[data.rfind(b")") + 2:].split()
    try:
        return rest[0].decode(), int(rest[1]), int(rest[19])
    except (IndexError, ValueError):
        return None


def pid_alive(pid):
    """True if the process exists and is not a zombie."""
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    st = _proc_stat(pid)
    return st is not None and st[0] != "Z"


def proc_argv(pid):
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return [a.decode("utf-8", "replace") for a in f.read().split(b"\0") if a]
    except OSError:
        return []


def proc_name(pid):
    """The basename of argv[0] (first word, in case a process rewrote its
    title), else of /proc/PID/exe."""
    argv = proc_argv(pid)
    if argv and argv[0].strip():
        return os.path.basename(argv[0].split()[0])
    try:
        return os.path.basename(os.readlink(f"/proc/{pid}/exe"))
    except OSError:
        return ""


def children_of(ppid):
    """PIDs whose parent is ``ppid`` (living, non-zombie)."""
    out = []
    if not ppid:
        return out
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        st = _proc_stat(int(entry))
        if st and st[1] == ppid and st[0] != "Z":
            out.append(int(entry))
    return sorted(out)


def descendants_of(pid):
    out = []
    todo = [pid]
    while todo:
        for c in children_of(todo.pop()):
            out.append(c)
            todo.append(c)
    return out


def kill_pid(pid, sig=signal.SIGKILL):
    """Sends ``sig`` to one process; a vanished process is not an error."""
    try:
        os.kill(pid, sig)
        return True
    except ProcessLookupError:
        return False


def stop_process(proc, grace=5):
    """Stops a child started with Popen, by its PID: SIGTERM, then SIGKILL
    after ``grace`` seconds. A process that already exited is fine."""
    if proc is None or proc.poll() is not None:
        return
    kill_pid(proc.pid, signal.SIGTERM)
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        kill_pid(proc.pid, signal.SIGKILL)
        proc.wait(5)


def _identity(pid):
    st = _proc_stat(pid)
    return (pid, st[2]) if st else None


def _same_process_alive(ident):
    pid, start = ident
    st = _proc_stat(pid)
    return st is not None and st[2] == start and st[0] != "Z"


# --------------------------------------------------------------------------
# Accounts and mailboxes


def _user_exists(name):
    try:
        pwd.getpwnam(name)
        return True
    except KeyError:
        return False


def _group_exists(name):
    try:
        grp.getgrnam(name)
        return True
    except KeyError:
        return False


def _create(check, cmd):
    """Runs cmd (useradd, groupadd) unless check() says it is done. Tests
    running side by side take turns (a lock file), and another program's
    hold on /etc/passwd is waited out (a few bounded retries)."""
    if check():
        return
    import fcntl
    with open("/run/lock/postern-tests-accounts.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        for attempt in range(5):
            if check():
                return
            r = run(cmd, timeout=60)
            if r.returncode == 0 or check():  # another run may have raced us
                return
            time.sleep(1)
    raise RuntimeError("could not create an account:\n" + describe(r))


def ensure_system_user(name):
    """As root: a system user (and its group) with no home and no login,
    e.g. ``vmail`` for pipe services."""
    nologin = "/usr/sbin/nologin" if os.path.exists("/usr/sbin/nologin") else "/bin/false"
    _create(lambda: _user_exists(name),
            ["useradd", "--system", "--user-group", "--no-create-home",
             "--home-dir", "/nonexistent", "--shell", nologin, name])
    return pwd.getpwnam(name)


def ensure_system_accounts():
    """As root: group ``postdrop`` and the unprivileged ``postern`` user
    (mail_owner). Does nothing when not root."""
    if not is_root():
        return
    _create(lambda: _group_exists("postdrop"), ["groupadd", "--system", "postdrop"])
    nologin = "/usr/sbin/nologin" if os.path.exists("/usr/sbin/nologin") else "/bin/false"
    _create(
        lambda: _user_exists(MAIL_OWNER_WHEN_ROOT),
        ["useradd", "--system", "--user-group", "--no-create-home",
         "--home-dir", "/nonexistent", "--shell", nologin, MAIL_OWNER_WHEN_ROOT],
    )


def ensure_local_users():
    """As root: the local test users ptalice and ptbob, homes under /home."""
    for u in LOCAL_USERS:
        _create(lambda u=u: _user_exists(u), ["useradd", "-m", "-s", "/bin/sh", u])


def home_of(user):
    return Path(pwd.getpwnam(user).pw_dir)


def maildir_messages(user):
    """[(path, bytes)] of every message in ~user/Maildir/new and cur."""
    out = []
    base = home_of(user) / "Maildir"
    for sub in ("new", "cur"):
        d = base / sub
        try:
            names = sorted(os.listdir(d))
        except OSError:
            continue
        for n in names:
            p = d / n
            try:
                out.append((p, p.read_bytes()))
            except OSError:
                pass  # moved between listdir and read
    return out


def find_messages(user, token):
    """Messages in user's Maildir that contain ``token``."""
    tok = token.encode() if isinstance(token, str) else token
    return [(p, b) for p, b in maildir_messages(user) if tok in b]


def wait_for_messages(user, token, count=1, timeout=30.0):
    """Waits until ``count`` messages containing ``token`` sit in user's
    Maildir; returns them."""
    return wait_for(
        lambda: (lambda m: m if len(m) >= count else None)(find_messages(user, token)),
        timeout,
        interval=0.2,
        what=f"{count} message(s) with {token} in ~{user}/Maildir",
    )


# --------------------------------------------------------------------------
# Messages


def send_each(p, rcpts, token, sender="sender@example.org", timeout=60):
    """One SMTP session into Postern `p`, one message per recipient in
    `rcpts`; message N's Subject is `token N`."""
    with p.smtp(timeout=timeout) as s:
        s.ehlo("client.example")
        for i, rcpt in enumerate(rcpts):
            msg = crlf(f"From: {sender}\nTo: {rcpt}\nSubject: {token} {i}\n\nbody {i}\n")
            s.sendmail(sender, [rcpt], msg)


def crlf(text):
    """str or bytes with any line ends -> bytes with CRLF line ends."""
    if isinstance(text, str):
        text = text.encode("utf-8")
    return text.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")


def lf(data):
    return data.replace(b"\r\n", b"\n")


def split_message(raw):
    """(header bytes, body bytes) of a message, with LF line ends; the
    blank line between them belongs to neither."""
    raw = lf(raw)
    head, sep, body = raw.partition(b"\n\n")
    if not sep:
        return raw, b""
    return head + b"\n", body


def unfold(headers):
    """Header bytes with folded lines joined, as str."""
    text = headers.decode("utf-8", "replace")
    return re.sub(r"\n[ \t]+", " ", text)


def header_values(raw, name):
    """Every value of header ``name`` (unfolded), case-insensitive."""
    head, _ = split_message(raw)
    rx = re.compile(r"^" + re.escape(name) + r":[ \t]*(.*)$", re.I | re.M)
    return rx.findall(unfold(head))


def parse_message(raw):
    return email.message_from_bytes(raw, policy=email.policy.default)


def smtp_transaction(client, sender, rcpts, data, mail_options=()):
    """One MAIL/RCPT/DATA on an open smtplib.SMTP. ``data`` must be bytes
    with CRLF line ends (smtplib dot-stuffs it). Returns DATA's (code, text);
    raises AssertionError if MAIL or a RCPT is refused."""
    code, resp = client.mail(sender, list(mail_options))
    if code != 250:
        client.rset()
        raise AssertionError(f"MAIL FROM:<{sender}> got {code} {resp!r}")
    for r in rcpts:
        code, resp = client.rcpt(r)
        if code not in (250, 251):
            client.rset()
            raise AssertionError(f"RCPT TO:<{r}> got {code} {resp!r}")
    code, resp = client.data(data)
    return code, resp.decode("utf-8", "replace")


# --------------------------------------------------------------------------
# Postern


def default_main_cf(tmp, bin_dir, mail_owner):
    """main.cf parameters every test starts from, in order."""
    return {
        "queue_directory": f"{tmp}/queue",
        "data_directory": f"{tmp}/data",
        "daemon_directory": str(bin_dir),
        "command_directory": str(bin_dir),
        "mail_owner": mail_owner,
        "maillog_file": f"{tmp}/maillog",
        "myhostname": MYHOSTNAME,
        "mydomain": MYHOSTNAME,
        "mydestination": "$myhostname, localhost",
        "mynetworks": "127.0.0.1/32",
        # Client names would come from this machine's resolver: tests that
        # look them up point dns_resolver_addresses at their own dnsmasq.
        "smtpd_peername_lookup": "no",
        "home_mailbox": "Maildir/",
        "alias_maps": f"hash:{tmp}/etc/aliases",
        "alias_database": f"hash:{tmp}/etc/aliases",
        "queue_run_delay": "1s",
        "minimal_backoff_time": "2s",
        "maximal_backoff_time": "4s",
    }


MASTER_CF = """\
# Written by tests/postern_harness.py
{port_line}
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
anvil     unix  -       -       n       -       1       anvil
smtp      unix  -       -       n       -       -       smtp
relay     unix  -       -       n       -       -       smtp
lmtp      unix  -       -       n       -       -       lmtp
local     unix  -       n       n       -       -       local
"""


class RawSmtp:
    """A plain-socket SMTP client that reads whole replies (a list of
    lines), for tests that need what smtplib hides: pipelined input, a
    chosen source address, replies before the greeting."""

    def __init__(self, port, source=None):
        self.s = socket.create_connection(("127.0.0.1", port), timeout=20,
                                          source_address=source)
        self.f = self.s.makefile("rb")

    def reply(self):
        lines = []
        while True:
            line = self.f.readline()
            if not line:
                break
            lines.append(line.decode("utf-8", "replace").rstrip("\r\n"))
            if len(line) < 4 or line[3:4] != b"-":
                break
        return lines

    def send(self, data):
        self.s.sendall(data if isinstance(data, bytes) else data.encode())

    def cmd(self, line):
        self.send(line + "\r\n")
        return self.reply()

    def close(self):
        for x in (self.f, self.s):
            try:
                x.close()
            except OSError:
                pass


class Postern:
    """One Postern instance in its own temporary directory:
    ``DIR/etc`` (config), ``DIR/queue``, ``DIR/data``, ``DIR/maillog``.

    ``params``: main.cf settings added to or replacing the defaults; a value
    of None removes a default; a callable value is called with this object
    (to refer to ``p.etc`` or ``p.dir``). ``files``: {relative path: text}
    written under DIR before start (e.g. ``{"etc/transport": "..."}``).
    ``master_cf_extra``: lines appended to master.cf; one that names a
    service of the default master.cf (same name and type) replaces it.
    ``master_cf_omit``: names of default services left out.
    """

    def __init__(self, params=None, files=None, master_cf_extra=(), bin_dir=None, tmp_base=None,
                 master_cf_omit=()):
        self.bin_dir = Path(bin_dir or BIN_DIR)
        # Short paths on purpose: Unix socket paths under queue/ must stay
        # below 108 bytes, which pytest's tmp_path does not promise.
        self.dir = Path(tempfile.mkdtemp(prefix="postern-", dir=tmp_base))
        os.chmod(self.dir, 0o755)  # unprivileged daemons must reach queue/ and etc/
        self.etc = self.dir / "etc"
        self.queue = self.dir / "queue"
        self.data = self.dir / "data"
        self.maillog = self.dir / "maillog"
        self.fg_output = self.dir / "start-fg.out"
        for d in (self.etc, self.queue, self.data):
            d.mkdir(mode=0o755)
            os.chmod(d, 0o755)
        self.port = free_port()
        self.mail_owner = MAIL_OWNER_WHEN_ROOT if is_root() else current_user()
        if is_root():
            pw = pwd.getpwnam(self.mail_owner)
            os.chown(self.data, pw.pw_uid, pw.pw_gid)
            os.chmod(self.data, 0o700)
            # Whatever process writes the log (master as root, or the
            # daemons as mail_owner) can append to it.
            self.maillog.touch(mode=0o644)
            os.chown(self.maillog, pw.pw_uid, pw.pw_gid)
        self.params = default_main_cf(self.dir, self.bin_dir, self.mail_owner)
        for name, value in (params or {}).items():
            if value is None:
                self.params.pop(name, None)
            else:
                self.params[name] = value(self) if callable(value) else str(value)
        self.master_cf_extra = list(master_cf_extra)
        self.master_cf_omit = set(master_cf_omit)
        self._fg = None
        self._fg_out = None
        self._aliases_built = False
        self.started = False
        self.stop_problems = []
        for rel, text in (files or {}).items():
            self.write_file(rel, text(self) if callable(text) else text)
        self.write_file("etc/aliases", "postmaster: root\n")
        self.write_main_cf()
        self.write_master_cf()

    # -- files -------------------------------------------------------------

    def write_file(self, rel, text):
        path = self.dir / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text) if isinstance(text, str) else path.write_bytes(text)
        os.chmod(path, 0o644)
        return path

    @property
    def main_cf(self):
        return self.etc / "main.cf"

    @property
    def master_cf(self):
        return self.etc / "master.cf"

    def write_main_cf(self):
        text = "# Written by tests/postern_harness.py\n"
        text += "".join(f"{n} = {v}\n" for n, v in self.params.items())
        self.write_file("etc/main.cf", text)

    def set_params(self, **params):
        """Changes main.cf (takes effect at the next start)."""
        for n, v in params.items():
            if v is None:
                self.params.pop(n, None)
            else:
                self.params[n] = v(self) if callable(v) else str(v)
        self.write_main_cf()

    def write_master_cf(self):
        text = MASTER_CF.format(port_line=f"127.0.0.1:{self.port} inet n - n - - smtpd")
        extra = [line.rstrip("\n") for line in self.master_cf_extra]
        named = {tuple(line.split()[:2]) for line in extra if line.split()}
        kept = [line for line in text.splitlines()
                if not (line.split() and (tuple(line.split()[:2]) in named
                                          or line.split()[0] in self.master_cf_omit))]
        text = "".join(line + "\n" for line in kept + extra)
        self.write_file("etc/master.cf", text)

    # -- commands ----------------------------------------------------------

    def cmd(self, name):
        return self.bin_dir / name

    def env(self):
        e = dict(os.environ)
        e["MAIL_CONFIG"] = str(self.etc)
        return e

    def postern(self, *args, timeout=60):
        """``postern -c ETC ARGS...``. Before ``check``, the alias database
        is built as an installation has it (``postern check`` fails on a
        table it cannot open, as the daemons would)."""
        if args[:1] == ("check",) and not self._aliases_built \
                and (self.etc / "aliases").exists():
            self.newaliases()
        return run([self.cmd("postern"), "-c", self.etc, *args], env=self.env(),
                   timeout=timeout, cwd=self.dir)

    def postconf(self, *args, timeout=30):
        """``postconf -c ETC ARGS...``"""
        return run([self.cmd("postconf"), "-c", self.etc, *args], env=self.env(),
                   timeout=timeout, cwd=self.dir)

    def sendmail(self, args, input_bytes, user=None, timeout=60, setgid=None):
        """``sendmail -C ETC ARGS...`` with ``input_bytes`` on stdin, as
        ``user`` if given (via runuser; needs root).

        An unprivileged user runs ``setgid_sendmail()``, a copy installed
        the way Postfix installs its submission programs (set-gid
        ``postdrop``), because ``maildrop/`` is writable only by that group
        and cargo does not set the bit. ``setgid``: force either way."""
        if setgid is None:
            setgid = user is not None and user != "root" and is_root()
        program = self.setgid_sendmail() if setgid else self.cmd("sendmail")
        return run([program, "-C", self.etc, *args], input=input_bytes,
                   env=self.env(), user=user, timeout=timeout, cwd=self.dir)

    def setgid_sendmail(self):
        """DIR/bin/sendmail: a copy of BIN/sendmail owned by root:postdrop,
        mode 2755 (needs root; see ``setgid_possible``)."""
        dest = self.dir / "bin" / "sendmail"
        if not dest.exists():
            dest.parent.mkdir(mode=0o755, exist_ok=True)
            shutil.copyfile(self.cmd("sendmail"), dest)
            os.chown(dest, 0, grp.getgrnam("postdrop").gr_gid)
            os.chmod(dest, 0o2755)
        return dest

    def setgid_possible(self):
        """Whether a set-gid program in DIR would work (root, and the file
        system not mounted nosuid)."""
        return is_root() and not (os.statvfs(self.dir).f_flag & os.ST_NOSUID)

    def newaliases(self):
        """Builds the alias database from ``ETC/aliases``."""
        if os.access(self.cmd("newaliases"), os.X_OK):
            r = run([self.cmd("newaliases"), "-C", self.etc], env=self.env(), timeout=60,
                    cwd=self.dir)
        else:
            r = self.sendmail(["-bi"], None)
        if r.returncode != 0:
            raise AssertionError("building the alias database failed\n" + describe(r))
        self._aliases_built = True
        return r

    # -- start and stop ----------------------------------------------------

    def _prepare(self):
        missing = missing_binaries(self.bin_dir)
        if missing:
            raise AssertionError(
                f"Postern binaries missing in {self.bin_dir}: {', '.join(missing)} "
                "(run `cargo build --workspace`, or set POSTERN_BIN_DIR)")
        if not self._aliases_built:
            self.newaliases()

    def start(self, wait=True, timeout=20):
        """``postern -c ETC start``: must exit 0 once master runs; then waits
        until the SMTP port answers 220."""
        self._prepare()
        r = self.postern("start", timeout=60)
        if r.returncode != 0:
            raise AssertionError("postern start failed\n" + describe(r) + self.log_tail())
        self.started = True
        if wait:
            self.wait_ready(timeout)
        return r

    def start_fg(self, wait=True, timeout=20):
        """``postern -c ETC start-fg`` as a child process (stop: SIGTERM)."""
        self._prepare()
        self._fg_out = open(self.fg_output, "ab")
        self._fg = subprocess.Popen(
            [str(self.cmd("postern")), "-c", str(self.etc), "start-fg"],
            stdin=subprocess.DEVNULL, stdout=self._fg_out, stderr=subprocess.STDOUT,
            env=self.env(), cwd=str(self.dir), start_new_session=True,
        )
        self.started = True
        if wait:
            self.wait_ready(timeout)
        return self._fg

    @property
    def fg_pid(self):
        return self._fg.pid if self._fg else None

    def wait_ready(self, timeout=20):
        def ready():
            if self._fg is not None and self._fg.poll() is not None:
                raise AssertionError(
                    f"postern start-fg exited with {self._fg.returncode}\n"
                    + self.fg_text() + self.log_tail())
            return smtp_banner_ok(self.port)
        try:
            wait_for(ready, timeout, interval=0.1,
                     what=f"a 220 greeting on 127.0.0.1:{self.port}")
        except AssertionError as e:
            raise AssertionError(f"{e}\n{self.log_tail()}") from None

    def status(self):
        return self.postern("status", timeout=30)

    def master_pid(self):
        """The PID in QUEUE/pid/master.pid (first line), or None."""
        try:
            with open(self.queue / "pid" / "master.pid") as f:
                return int(f.readline().strip())
        except (OSError, ValueError):
            return None

    def stop(self, timeout=30):
        """Stops this instance: ``postern stop`` (or SIGTERM to start-fg).
        Any process of the instance still alive afterwards (master or a
        child, as seen before the stop) is killed by PID and recorded in
        ``stop_problems``. Returns the stop command's result (or start-fg's
        exit status); None if not started."""
        if not self.started:
            return None
        mpid = self.master_pid()
        idents = []
        for pid in ([mpid] if mpid and pid_alive(mpid) else []) + descendants_of(mpid):
            ident = _identity(pid)
            if ident:
                idents.append(ident)
        result = None
        if self._fg is not None:
            if self._fg.poll() is None:
                self._fg.send_signal(signal.SIGTERM)
            try:
                result = self._fg.wait(timeout)
            except subprocess.TimeoutExpired:
                self.stop_problems.append(f"start-fg still running {timeout}s after SIGTERM")
        else:
            try:
                result = self.postern("stop", timeout=timeout)
                if result.returncode != 0:
                    self.stop_problems.append("postern stop failed\n" + describe(result))
            except subprocess.TimeoutExpired:
                self.stop_problems.append(f"postern stop did not return within {timeout}s")
        if mpid and pid_alive(mpid):
            self.stop_problems.append(f"master {mpid} still alive after stop")
            poll_until(lambda: not pid_alive(mpid), 2)
        left = [i for i in idents if _same_process_alive(i)]
        if left:
            self.stop_problems.append(
                "killed by PID after stop: " + ", ".join(f"{p} ({proc_name(p)})" for p, _ in left))
            for pid, _ in left:
                kill_pid(pid, signal.SIGKILL)
        if self._fg is not None:
            if self._fg.poll() is None:
                kill_pid(self._fg.pid, signal.SIGKILL)
                try:
                    self._fg.wait(10)
                except subprocess.TimeoutExpired:
                    pass
            self._fg = None
        if self._fg_out is not None:
            self._fg_out.close()
            self._fg_out = None
        self.started = False
        return result

    def cleanup(self, keep=False):
        """Stops (if needed) and removes the directory unless ``keep``."""
        try:
            self.stop()
        finally:
            if not keep:
                shutil.rmtree(self.dir, ignore_errors=True)

    # -- looking inside ----------------------------------------------------

    def child_pids(self, name=None):
        """PIDs of master's children, optionally only those whose argv[0]
        basename is ``name``."""
        return [p for p in children_of(self.master_pid()) if name is None or proc_name(p) == name]

    def qmgr_pid(self):
        pids = self.child_pids("qmgr")
        return pids[0] if pids else None

    def log_text(self):
        try:
            return self.maillog.read_text(errors="replace")
        except OSError:
            return ""

    def log_tail(self, lines=80):
        text = self.log_text().splitlines()[-lines:]
        return f"\n--- last {len(text)} lines of {self.maillog} ---\n" + "\n".join(text) + "\n"

    def fg_text(self):
        try:
            return "--- start-fg output ---\n" + self.fg_output.read_text(errors="replace") + "\n"
        except OSError:
            return ""

    def log_search(self, pattern, flags=re.M):
        return re.search(pattern, self.log_text(), flags)

    def log_findall(self, pattern, flags=re.M):
        return re.findall(pattern, self.log_text(), flags)

    def wait_for_log(self, pattern, timeout=30.0, what=None):
        """Waits until the maillog matches ``pattern``; returns the match."""
        try:
            return wait_for(lambda: self.log_search(pattern), timeout, interval=0.2,
                            what=what or f"maillog to match {pattern!r}")
        except AssertionError as e:
            raise AssertionError(f"{e}\n{self.log_tail()}") from None

    def queue_files(self, queue_name):
        """Files under QUEUE/<queue_name> (recursively, for hashed queues),
        as paths relative to that directory."""
        base = self.queue / queue_name
        out = []
        for root, _dirs, files in os.walk(base):
            for f in files:
                out.append(os.path.relpath(os.path.join(root, f), base))
        return sorted(out)

    # -- sending -----------------------------------------------------------

    def smtp(self, source_address=None, timeout=30):
        """An smtplib.SMTP connected to this instance (caller says EHLO)."""
        return smtplib.SMTP("127.0.0.1", self.port, timeout=timeout,
                            source_address=source_address)

    def send(self, sender, rcpts, data, mail_options=(), source_address=None):
        """One message over SMTP; returns DATA's (code, text)."""
        with self.smtp(source_address=source_address) as s:
            s.ehlo("client.example")
            return smtp_transaction(s, sender, rcpts, crlf(data), mail_options)

    def send_deferred(self, sender, rcpts, data, said=None):
        """One message over SMTP that qmgr then defers: waits for the
        deferral of its last recipient in the log (the remote reply
        starting with `said`, when given) and for its file in deferred/
        (local logs the deferral before qmgr moves the file). Returns its
        queue ID."""
        code, text = self.send(sender, rcpts, data)
        assert code == 250, text
        qid = re.search(r"queued as ([0-9A-F]+)", text).group(1)
        reply = rf" \(host \S+ said: {re.escape(said)}" if said else ""
        self.wait_for_log(rf"{qid}: to=<{re.escape(rcpts[-1])}>.*status=deferred{reply}",
                          what=f"{qid} deferred")
        wait_for(lambda: any(os.path.basename(f) == qid for f in self.queue_files("deferred")),
                 20, what=f"{qid} in deferred/")
        return qid


# --------------------------------------------------------------------------
# Sink: an aiosmtpd receiver that answers as told


class SinkMessage:
    def __init__(self, mail_from, rcpt_tos, content, peer, mail_options):
        self.mail_from = mail_from
        self.rcpt_tos = list(rcpt_tos)
        self.content = content  # bytes as received (CRLF), dot-unstuffed
        self.peer = peer
        self.mail_options = list(mail_options or [])
        self.time = time.time()

    @property
    def headers(self):
        return split_message(self.content)[0]

    @property
    def body(self):
        """The body with LF line ends."""
        return split_message(self.content)[1]

    def __repr__(self):
        return f"<SinkMessage from={self.mail_from!r} to={self.rcpt_tos!r} {len(self.content)} bytes>"


_CODE_TEXT = {"2": "2.0.0 Ok", "4": "4.0.0 try again later", "5": "5.0.0 rejected"}


def _full_reply(answer):
    answer = str(answer).strip()
    if re.fullmatch(r"\d{3}", answer):
        return f"{answer} {_CODE_TEXT.get(answer[0], 'Ok')}"
    return answer


class Sink:
    """An aiosmtpd Controller on 127.0.0.1 and a free port.

    ``set_rcpt(address, answer)``: the reply to RCPT TO for that address
    (``'250'``, ``'450 4.2.0 try later'``, ``'550 5.1.1 no such user'``);
    ``default_rcpt`` for other addresses. ``set_data(answer)``: the reply at
    the end of DATA (None = 250). Both can change while running.
    ``messages``: every message accepted at end of DATA; ``rejected_data``:
    those refused there; ``connections``: connections seen.
    """

    def __init__(self, hostname="sink.test"):
        self.port = None
        self.server_hostname = hostname
        self._lock = threading.Lock()
        self._rcpt = {}
        self.default_rcpt = "250"
        self._data_answer = None
        self._messages = []
        self._rejected_data = []
        self._connections = 0
        self.rcpt_log = []  # (address, answer) for every RCPT seen
        self.controller = None

    # configuration
    def set_rcpt(self, address, answer):
        with self._lock:
            self._rcpt[address.lower()] = answer

    def set_data(self, answer):
        with self._lock:
            self._data_answer = answer

    def _rcpt_answer(self, address):
        with self._lock:
            return _full_reply(self._rcpt.get(address.lower(), self.default_rcpt))

    # observations
    @property
    def messages(self):
        with self._lock:
            return list(self._messages)

    @property
    def rejected_data(self):
        with self._lock:
            return list(self._rejected_data)

    @property
    def connections(self):
        with self._lock:
            return self._connections

    def find(self, token):
        tok = token.encode() if isinstance(token, str) else token
        return [m for m in self.messages if tok in m.content]

    def count(self, token):
        return len(self.find(token))

    def wait_for(self, token, count=1, timeout=30.0):
        return wait_for(
            lambda: (lambda m: m if len(m) >= count else None)(self.find(token)),
            timeout, interval=0.1, what=f"{count} message(s) with {token} at the sink")

    # aiosmtpd hooks (run in the controller's thread)
    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        answer = self._rcpt_answer(address)
        with self._lock:
            self.rcpt_log.append((address, answer))
        if answer.startswith("2"):
            envelope.rcpt_tos.append(address)
        return answer

    async def handle_DATA(self, server, session, envelope):
        with self._lock:
            answer = _full_reply(self._data_answer) if self._data_answer else "250 2.0.0 Ok: queued"
            content = envelope.original_content if envelope.original_content is not None \
                else envelope.content
            if isinstance(content, str):
                content = content.encode("utf-8", "surrogateescape")
            m = SinkMessage(envelope.mail_from, envelope.rcpt_tos, bytes(content),
                            session.peer, envelope.mail_options)
            (self._messages if answer.startswith("2") else self._rejected_data).append(m)
        return answer

    def _count_connection(self):
        with self._lock:
            self._connections += 1

    def start(self):
        from aiosmtpd.controller import Controller
        from aiosmtpd.smtp import SMTP

        sink = self

        class CountingSMTP(SMTP):
            # Accept long lines: what Postern relays is checked by the test,
            # not refused by the receiver.
            line_length_limit = 100000

            def connection_made(self, transport):
                sink._count_connection()
                super().connection_made(transport)

        class SinkController(Controller):
            def factory(self):
                return CountingSMTP(self.handler, **self.SMTP_kwargs)

        self.port = free_port()
        self.controller = SinkController(
            self, hostname="127.0.0.1", port=self.port,
            server_hostname=self.server_hostname, ready_timeout=10,
            enable_SMTPUTF8=True,
        )
        self.controller.start()
        with self._lock:
            self._connections = 0  # the controller's own readiness probe
        return self

    def stop(self):
        if self.controller is not None:
            try:
                self.controller.stop()
            finally:
                self.controller = None


# --------------------------------------------------------------------------
# dnsmasq


DNS_A, DNS_MX = 1, 15


def dns_query(port, name, qtype=DNS_A, timeout=1.0):
    """One UDP query to 127.0.0.1:port; (rcode, answer count) or None."""
    qid = os.getpid() & 0xFFFF
    pkt = struct.pack(">HHHHHH", qid, 0x0100, 1, 0, 0, 0)
    pkt += b"".join(bytes([len(l)]) + l.encode() for l in name.rstrip(".").split(".") if l)
    pkt += b"\0" + struct.pack(">HH", qtype, 1)
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        s.settimeout(timeout)
        s.sendto(pkt, ("127.0.0.1", port))
        data, _ = s.recvfrom(4096)
    except OSError:
        return None
    finally:
        s.close()
    if len(data) < 12:
        return None
    _id, flags, _qd, an, _ns, _ar = struct.unpack(">HHHHHH", data[:12])
    return flags & 0xF, an


def hosts_name(ip="127.0.0.1"):
    """The name smtpd gives a loopback client: the first name on the
    address's first line in /etc/hosts, else localhost (RFC 6761)."""
    with open("/etc/hosts") as f:
        for line in f:
            words = line.split("#")[0].split()
            if len(words) > 1 and words[0] == ip:
                return words[1].lower()
    return "localhost"


def dnsmasq_binary():
    return shutil.which("dnsmasq") or ("/usr/sbin/dnsmasq" if os.path.exists("/usr/sbin/dnsmasq") else None)


class Dnsmasq:
    """dnsmasq on 127.0.0.1 and a free UDP+TCP port, answering only what
    ``args`` say (``--mx-host=...``, ``--address=/name/ip``)."""

    def __init__(self, args, log_dir=None):
        self.args = list(args)
        self.port = None
        self.proc = None
        self.log_dir = Path(log_dir or tempfile.mkdtemp(prefix="postern-dns-"))
        self.log_path = self.log_dir / "dnsmasq.log"
        self._log = None

    def start(self, timeout=10, port=None):
        """``port``: a given one (to serve other records where a stopped
        dnsmasq was); by default a free one."""
        binary = dnsmasq_binary()
        if not binary:
            raise RuntimeError("dnsmasq is not installed (apt-get install dnsmasq-base)")
        self.port = port or free_port(udp=True)
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [binary, "--no-daemon", f"--port={self.port}", "--listen-address=127.0.0.1",
             "--bind-interfaces", "--no-resolv", "--no-hosts", "--pid-file=",
             "--log-facility=-", *self.args],
            stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT,
        )

        def ready():
            if self.proc.poll() is not None:
                raise AssertionError(f"dnsmasq exited with {self.proc.returncode}:\n{self.log_text()}")
            return dns_query(self.port, "ready.invalid", DNS_A, timeout=0.3) is not None
        wait_for(ready, timeout, what=f"dnsmasq answering on port {self.port}")
        return self

    def log_text(self):
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def stop(self):
        stop_process(self.proc)
        self.proc = None
        if self._log is not None:
            self._log.close()
            self._log = None
        shutil.rmtree(self.log_dir, ignore_errors=True)


# --------------------------------------------------------------------------
# Postfix's smtp-sink


class SmtpSink:
    """``/usr/sbin/smtp-sink -c [-u nobody] 127.0.0.1:PORT BACKLOG``: a fast
    receiver that only counts. ``count()`` is the number of messages it
    received (from its running counter)."""

    BINARY = "/usr/sbin/smtp-sink"

    def __init__(self, extra_args=(), backlog=100):
        self.extra_args = list(extra_args)
        self.backlog = backlog
        self.port = None
        self.proc = None
        self.dir = Path(tempfile.mkdtemp(prefix="postern-sink-"))
        self.out_path = self.dir / "smtp-sink.out"
        self._out = None

    def start(self, timeout=10):
        if not os.access(self.BINARY, os.X_OK):
            raise RuntimeError("smtp-sink is not installed (apt-get install postfix)")
        self.port = free_port()
        cmd = [self.BINARY, "-c"]
        if is_root():
            cmd += ["-u", "nobody"]
        cmd += [*self.extra_args, f"127.0.0.1:{self.port}", str(self.backlog)]
        self._out = open(self.out_path, "ab")
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=self._out,
                                     stderr=subprocess.STDOUT, cwd=str(self.dir))

        def ready():
            if self.proc.poll() is not None:
                raise AssertionError(f"smtp-sink exited with {self.proc.returncode}")
            return smtp_banner_ok(self.port)
        wait_for(ready, timeout, what=f"smtp-sink on port {self.port}")
        return self

    def count(self):
        try:
            text = self.out_path.read_text(errors="replace")
        except OSError:
            return 0
        counts = re.findall(r"mesg=(\d+)", text)
        return int(counts[-1]) if counts else 0

    def stop(self):
        stop_process(self.proc)
        self.proc = None
        if self._out is not None:
            self._out.close()
            self._out = None
        shutil.rmtree(self.dir, ignore_errors=True)
