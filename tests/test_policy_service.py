"""Policy delegation (Postfix's SMTPD_POLICY_README): ``check_policy_service``
with real policy servers.

- Debian's ``postgrey`` on ``inet:127.0.0.1:PORT``: a first attempt is
  greylisted (450), the retry after ``--delay`` is accepted; the same
  against a private Postfix (tests/postfix_peer.py) with the same setting.
- ``PolicyServer``, a policy server written here (a thread per
  connection, on a Unix socket under the queue's ``private/`` or on a TCP
  port): it records every request's attributes and every connection, and
  answers with what the test gives it. It shows the attribute set, one
  connection reused within a session, access(5) actions in replies at
  each stage, and ``smtpd_policy_service_default_action`` when the server
  is down.
- spawn(8): a policy program written here, started by master for each
  connection to ``private/policy`` (``spawn user=nobody argv=...``),
  rejects the sender it lists.
"""

import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import pytest

import postern_harness as h
import postfix_peer as pp
from postfix_peer import postfix_peer  # noqa: F401  (the fixture)

OUTSIDE = ("127.0.0.2", 0)


class PolicyServer:
    """A policy server on ``path`` (Unix socket) or on 127.0.0.1:port.
    ``answer(attrs) -> action``; ``requests``: every request's attributes;
    ``connections``: how many connections were accepted."""

    def __init__(self, answer, path=None):
        self.answer = answer
        self.path = path
        self.requests = []
        self.connections = 0
        self._lock = threading.Lock()
        if path is not None:
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.sock.bind(str(path))
            os.chmod(path, 0o666)
            self.port = None
        else:
            self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self.sock.bind(("127.0.0.1", 0))
            self.port = self.sock.getsockname()[1]
        self.sock.listen(16)
        self.sock.settimeout(0.5)
        self.running = True
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self):
        while self.running:
            try:
                c, _ = self.sock.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            with self._lock:
                self.connections += 1
            threading.Thread(target=self._serve, args=(c,), daemon=True).start()

    def _serve(self, c):
        f = c.makefile("rwb")
        try:
            while True:
                attrs = {}
                while True:
                    line = f.readline()
                    if not line:
                        return
                    line = line.rstrip(b"\n").decode()
                    if not line:
                        break
                    k, _, v = line.partition("=")
                    attrs[k] = v
                with self._lock:
                    self.requests.append(attrs)
                f.write(f"action={self.answer(attrs)}\n\n".encode())
                f.flush()
        finally:
            c.close()

    def stop(self):
        self.running = False
        self.sock.close()
        self.thread.join(5)
        if self.path is not None and os.path.exists(self.path):
            os.unlink(self.path)


@pytest.fixture
def policy_servers():
    started = []

    def start(answer, path=None):
        s = PolicyServer(answer, path)
        started.append(s)
        return s

    yield start
    for s in started:
        s.stop()


def rcpt_reply(port, sender, rcpt, helo="client.example", source=None):
    import smtplib
    with smtplib.SMTP("127.0.0.1", port, timeout=60, source_address=source) as s:
        s.ehlo(helo)
        code, text = s.mail(sender)
        if code != 250:
            return code, text.decode()
        code, text = s.rcpt(rcpt)
        return code, text.decode()


# --------------------------------------------------------------------------
# postgrey


class Postgrey:
    """Debian's postgrey in the foreground on 127.0.0.1:port."""

    def __init__(self, delay=2):
        if shutil.which("postgrey") is None:
            pytest.fail("postgrey is not installed (scripts/test installs it)")
        self.dir = Path(tempfile.mkdtemp(prefix="postern-postgrey-"))
        pw = pwd.getpwnam("postgrey")
        os.chown(self.dir, pw.pw_uid, pw.pw_gid)
        self.port = h.free_port()
        self.log = open(self.dir / "postgrey.log", "ab")
        self.proc = subprocess.Popen(
            ["postgrey", f"--inet=127.0.0.1:{self.port}", f"--delay={delay}",
             f"--dbdir={self.dir}", "--user=postgrey", "--group=postgrey",
             f"--pidfile={self.dir}/postgrey.pid"],
            stdout=self.log, stderr=subprocess.STDOUT)
        h.wait_for(lambda: _port_open(self.port), 30, what="postgrey")

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
        self.log.close()
        shutil.rmtree(self.dir, ignore_errors=True)


def _port_open(port):
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


@pytest.fixture
def postgrey():
    g = Postgrey(delay=2)
    yield g
    g.stop()


def greylisting(port, rcpt):
    """First attempt greylisted with 450, retry after the delay accepted."""
    sender = "someone@sender.example"
    code, text = rcpt_reply(port, sender, rcpt, source=OUTSIDE)
    assert code == 450, (code, text)
    assert "Greylisted" in text, text
    assert f"<{rcpt}>: Recipient address rejected" in text, text
    time.sleep(3)
    code, text = rcpt_reply(port, sender, rcpt, source=OUTSIDE)
    assert code == 250, (code, text)


def test_postgrey_greylists_then_accepts(make_postern, postgrey):
    p = make_postern(params={
        "smtpd_recipient_restrictions":
            f"reject_unauth_destination, check_policy_service inet:127.0.0.1:{postgrey.port}"})
    greylisting(p.port, "root@postern.test")
    p.wait_for_log(r"NOQUEUE: reject: RCPT from unknown\[127\.0\.0\.2\]: 450 4\.\d\.\d "
                   r"<root@postern\.test>: Recipient address rejected: Greylisted")


def test_postgrey_against_postfix(postfix_peer, postgrey):
    peer = postfix_peer(params={
        "smtpd_recipient_restrictions":
            f"reject_unauth_destination, check_policy_service inet:127.0.0.1:{postgrey.port}"})
    greylisting(peer.port, f"user@{pp.DOMAIN}")


# --------------------------------------------------------------------------
# A policy server of the test's own


def policy_path(p, name="testpolicy"):
    d = p.queue / "private"
    d.mkdir(exist_ok=True)
    return d / name


def test_attributes_and_one_connection_per_session(make_postern, policy_servers):
    p = make_postern(start=False, params={
        "smtpd_recipient_restrictions":
            "reject_unauth_destination, check_policy_service unix:private/testpolicy",
        "smtpd_policy_service_policy_context": "ctx-test"})
    p.start()
    srv = policy_servers(lambda a: "DUNNO", policy_path(p))
    import smtplib
    with smtplib.SMTP("127.0.0.1", p.port, timeout=60, source_address=OUTSIDE) as s:
        s.ehlo("client.example")
        assert s.mail("a@sender.example", ["SIZE=1234"])[0] == 250
        assert s.rcpt("root@postern.test")[0] == 250
        assert s.rcpt("postmaster@postern.test")[0] == 250
    assert srv.connections == 1
    assert len(srv.requests) == 2
    first, second = srv.requests
    for k in ("request", "protocol_state", "protocol_name", "helo_name", "queue_id", "sender",
              "recipient", "recipient_count", "client_address", "client_name",
              "reverse_client_name", "instance", "sasl_method", "sasl_username", "sasl_sender",
              "size", "ccert_subject", "ccert_issuer", "ccert_fingerprint",
              "ccert_pubkey_fingerprint", "encryption_protocol", "encryption_cipher",
              "encryption_keysize", "etrn_domain", "stress", "server_address", "server_port",
              "client_port", "compatibility_level", "mail_version", "policy_context"):
        assert k in first, f"attribute {k} missing: {first}"
    assert first["request"] == "smtpd_access_policy"
    assert first["protocol_state"] == "RCPT"
    assert first["protocol_name"] == "ESMTP"
    assert first["helo_name"] == "client.example"
    assert first["sender"] == "a@sender.example"
    assert first["recipient"] == "root@postern.test"
    assert first["recipient_count"] == "0"
    assert second["recipient_count"] == "1"
    assert first["client_address"] == "127.0.0.2"
    assert first["server_address"] == "127.0.0.1"
    assert first["server_port"] == str(p.port)
    assert first["size"] == "1234"
    assert first["policy_context"] == "ctx-test"
    assert first["instance"] and first["instance"] == second["instance"]


def test_actions_at_each_stage(make_postern, policy_servers):
    # One server per list: every list sees the same attributes (with
    # smtpd_delay_reject they are all evaluated at RCPT), as in Postfix.
    helo_srv = policy_servers(
        lambda a: "DEFER try later please" if a["helo_name"] == "deferme.example" else "DUNNO")
    sender_srv = policy_servers(
        lambda a: "554 5.7.1 you are listed" if a["sender"] == "spammer@bad.example"
        else "DUNNO")
    rcpt_srv = policy_servers(
        lambda a: "REJECT no such person here" if a["recipient"].startswith("nobody@")
        else "DUNNO")
    p = make_postern(params={
        "smtpd_helo_restrictions": f"check_policy_service inet:127.0.0.1:{helo_srv.port}",
        "smtpd_sender_restrictions": f"check_policy_service inet:127.0.0.1:{sender_srv.port}",
        "smtpd_recipient_restrictions":
            f"reject_unauth_destination, check_policy_service inet:127.0.0.1:{rcpt_srv.port}"})
    assert rcpt_reply(p.port, "spammer@bad.example", "root@postern.test", source=OUTSIDE) == \
        (554, "5.7.1 <spammer@bad.example>: Sender address rejected: you are listed")
    assert rcpt_reply(p.port, "a@ok.example", "nobody@postern.test", source=OUTSIDE) == \
        (554, "5.7.1 <nobody@postern.test>: Recipient address rejected: no such person here")
    code, text = rcpt_reply(p.port, "a@ok.example", "root@postern.test",
                            helo="deferme.example", source=OUTSIDE)
    assert (code, text) == (450, "4.7.1 <deferme.example>: Helo command rejected: "
                                 "try later please")
    assert rcpt_reply(p.port, "a@ok.example", "root@postern.test", source=OUTSIDE)[0] == 250
    assert helo_srv.requests[0]["protocol_state"] == "RCPT"


def test_server_down_answers_default_action(make_postern):
    port = h.free_port()
    p = make_postern(params={
        "smtpd_recipient_restrictions":
            f"reject_unauth_destination, check_policy_service inet:127.0.0.1:{port}",
        "smtpd_policy_service_retry_delay": "0s"})
    code, text = rcpt_reply(p.port, "a@ok.example", "root@postern.test", source=OUTSIDE)
    assert (code, text) == (451, "4.3.5 <root@postern.test>: Recipient address rejected: "
                                 "Server configuration problem")
    p.wait_for_log(rf"problem talking to server inet:127\.0\.0\.1:{port}")


def test_bad_endpoint_stops_check(make_postern):
    p = make_postern(start=False, params={
        "smtpd_recipient_restrictions":
            "reject_unauth_destination, check_policy_service inet:127.0.0.1"})
    r = p.postern("check")
    assert r.returncode != 0
    assert "check_policy_service: expected a policy server" in (r.stderr + r.stdout)


# --------------------------------------------------------------------------
# spawn(8)

SPAWNED_POLICY = """\
import os, sys
listed = set(sys.argv[1:])
while True:
    attrs = {}
    while True:
        line = sys.stdin.readline()
        if not line:
            sys.exit(0)
        line = line.rstrip("\\n")
        if not line:
            break
        k, _, v = line.partition("=")
        attrs[k] = v
    if attrs.get("sender") in listed:
        action = f"REJECT listed by uid {os.getuid()}"
    else:
        action = "DUNNO"
    sys.stdout.write(f"action={action}\\n\\n")
    sys.stdout.flush()
"""


@pytest.fixture
def script_dir():
    d = Path(tempfile.mkdtemp(prefix="postern-spawn-"))
    os.chmod(d, 0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def spawn_line(script):
    return (f"policy unix - n n - 0 spawn user=nobody "
            f"argv=/usr/bin/python3 {script} bad@listed.example")


def spawned_policy(port, rcpt):
    nobody = pwd.getpwnam("nobody").pw_uid
    assert rcpt_reply(port, "bad@listed.example", rcpt, source=OUTSIDE) == \
        (554, f"5.7.1 <{rcpt}>: Recipient address rejected: listed by uid {nobody}")
    assert rcpt_reply(port, "good@ok.example", rcpt, source=OUTSIDE)[0] == 250


def test_spawned_policy_program_rejects_listed_sender(make_postern, script_dir):
    script = script_dir / "policy.py"
    script.write_text(SPAWNED_POLICY)
    os.chmod(script, 0o644)
    p = make_postern(
        params={"smtpd_recipient_restrictions":
                "reject_unauth_destination, check_policy_service unix:private/policy",
                "policy_time_limit": "3600s"},
        master_cf_extra=(spawn_line(script),))
    spawned_policy(p.port, "root@postern.test")
    r = p.postern("check")
    assert r.returncode == 0, r.stderr


def test_spawned_policy_program_against_postfix(postfix_peer, script_dir):
    script = script_dir / "policy.py"
    script.write_text(SPAWNED_POLICY)
    os.chmod(script, 0o644)
    peer = postfix_peer(
        params={"smtpd_recipient_restrictions":
                "reject_unauth_destination, check_policy_service unix:private/policy",
                "policy_time_limit": "3600s"},
        master_extra=(spawn_line(script),))
    spawned_policy(peer.port, f"user@{pp.DOMAIN}")


def test_spawned_policy_program_on_an_inet_port(make_postern, script_dir):
    # mailcow's style: 127.0.0.1:PORT inet ... spawn, check_policy_service inet:.
    script = script_dir / "policy.py"
    script.write_text(SPAWNED_POLICY)
    os.chmod(script, 0o644)
    port = h.free_port()
    p = make_postern(
        params={"smtpd_recipient_restrictions":
                f"reject_unauth_destination, check_policy_service inet:127.0.0.1:{port}"},
        master_cf_extra=(f"127.0.0.1:{port} inet n n n - 0 spawn user=nobody "
                         f"argv=/usr/bin/python3 {script} bad@listed.example",))
    spawned_policy(p.port, "root@postern.test")


def test_spawn_time_limit_kills_the_program(make_postern, script_dir):
    script = script_dir / "sleep.py"
    script.write_text("import time\ntime.sleep(60)\n")
    os.chmod(script, 0o644)
    p = make_postern(
        params={"smtpd_recipient_restrictions":
                "reject_unauth_destination, check_policy_service unix:private/policy",
                "smtpd_policy_service_timeout": "30s",
                "policy_time_limit": "2s"},
        master_cf_extra=(f"policy unix - n n - 0 spawn user=nobody "
                         f"argv=/usr/bin/python3 {script}",))
    start = time.monotonic()
    code, text = rcpt_reply(p.port, "a@ok.example", "root@postern.test", source=OUTSIDE)
    assert code == 451, (code, text)
    assert time.monotonic() - start < 25
    p.wait_for_log(r"command /usr/bin/python3 time limit exceeded \(2s\): killed")


def test_spawn_refuses_root(make_postern):
    p = make_postern(master_cf_extra=("policy unix - n n - 0 spawn user=root argv=/bin/cat",))
    c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    c.connect(str(p.queue / "private" / "policy"))
    c.settimeout(20)
    try:
        # The daemon refuses to start (master throttles the service);
        # nothing runs the command.
        p.wait_for_log(r"service policy: user=root: user= specifies root privileges")
    finally:
        c.close()


def test_braced_form_overrides_settings_per_server(make_postern, policy_servers):
    # Postfix 3.7: check_policy_service { endpoint, name=value, ... }.
    down = h.free_port()
    srv = policy_servers(lambda a: "DUNNO")
    p = make_postern(params={
        "smtpd_recipient_restrictions":
            f"reject_unauth_destination, "
            f"check_policy_service {{ inet:127.0.0.1:{down}, retry_delay=0s, "
            f"{{ default_action = DUNNO }} }}, "
            f"check_policy_service {{ inet:127.0.0.1:{srv.port}, policy_context=per-server }}",
        "smtpd_policy_service_policy_context": "global"})
    assert rcpt_reply(p.port, "a@ok.example", "root@postern.test", source=OUTSIDE)[0] == 250
    assert srv.requests[-1]["policy_context"] == "per-server"


def test_prepend_action_adds_header_above_received(make_postern, policy_servers, sink):
    # postgrey answers PREPEND X-Greylist: ... to a retry it lets through.
    srv = policy_servers(lambda a: "PREPEND X-Policy-Test: checked by test"
                         if a["protocol_state"] == "RCPT" else "DUNNO")
    p = make_postern(params={
        "relayhost": f"[127.0.0.1]:{sink.port}",
        "smtpd_recipient_restrictions":
            f"check_policy_service inet:127.0.0.1:{srv.port}, permit_mynetworks, "
            "reject_unauth_destination"})
    token = f"t{time.time_ns()}"
    import smtplib
    with smtplib.SMTP("127.0.0.1", p.port, timeout=60) as s:
        s.sendmail("a@ok.example", ["x@remote.test"],
                   f"Subject: prepend {token}\r\n\r\nbody {token}\r\n")
    m = sink.wait_for(f"body {token}")[0]
    text = h.lf(m.headers).decode()
    assert "X-Policy-Test: checked by test" in text, text
    assert text.index("X-Policy-Test:") < text.index("Received:"), text
    assert "not supported" not in p.log_text()
