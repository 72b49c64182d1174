"""Tables answered by a server (issue #24 point 3): `tcp:` with Debian's
postsrsd 1.x rewriting a forwarded message's envelope sender to SRS0=...
(`sender_canonical_maps`) and taking the SRS address back
(`recipient_canonical_maps`); `socketmap:` (inet and unix) with a small
socketmap server of the test's own as `virtual_alias_maps`. A server that
is gone is a temporary failure: `451 4.3.0 <addr>: Temporary lookup
failure` at RCPT, and the mail flows again once it is back (the
connection is opened again). `unionmap:`, `pipemap:` and
`unix:passwd.byname` through `postmap -q`. Run as root."""

import os
import shutil
import signal
import smtplib
import socket
import subprocess
import tempfile
import threading
import uuid
from pathlib import Path

import pytest

import postern_harness as h

POSTSRSD = "/usr/sbin/postsrsd"


def rcpt_reply(port, rcpt, sender="sender@orig.test"):
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as s:
        s.ehlo("client.example")
        code, _ = s.mail(sender)
        assert code == 250
        code, text = s.rcpt(rcpt)
        return code, text.decode()


# ------------------------------------------------------------- postsrsd


@pytest.fixture
def postsrsd():
    """Debian's postsrsd (1.x: the tcp_table protocol) on two free ports,
    domain fwd.test, in the foreground; stopped by its PID."""
    if not os.access(POSTSRSD, os.X_OK):
        pytest.skip("postsrsd is not installed (scripts/test installs it)")
    d = Path(tempfile.mkdtemp(prefix="pt-srs-"))
    secret = d / "secret"
    secret.write_text("a-test-secret\n")
    os.chmod(secret, 0o600)
    fwd, rev = h.free_port(), h.free_port()
    proc = subprocess.Popen([POSTSRSD, f"-s{secret}", "-dfwd.test", "-l127.0.0.1",
                             f"-f{fwd}", f"-r{rev}", "-4"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    h.wait_for(lambda: _listening(fwd) and _listening(rev), 10, what="postsrsd")
    yield {"forward": fwd, "reverse": rev, "proc": proc}
    kill_postsrsd(proc)
    shutil.rmtree(d, ignore_errors=True)


def kill_postsrsd(proc):
    """postsrsd forks a child per connection: its whole session (which
    this test started) goes, so no kept connection is still answered."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=10)


def _listening(port):
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


def test_postsrsd_over_tcp_rewrites_the_forwarded_sender(make_postern, sink, postsrsd):
    p = make_postern(params={
        "relayhost": f"[127.0.0.1]:{sink.port}",
        "sender_canonical_maps": f"tcp:127.0.0.1:{postsrsd['forward']}",
        "sender_canonical_classes": "envelope_sender",
        "recipient_canonical_maps": f"tcp:127.0.0.1:{postsrsd['reverse']}",
        "recipient_canonical_classes": "envelope_recipient",
    })
    r = h.run_tool(p, "postmap", "-q", "alice@orig.test", f"tcp:127.0.0.1:{postsrsd['forward']}")
    assert r.returncode == 0 and r.stdout.startswith("SRS0="), h.describe(r)
    srs = r.stdout.strip()
    assert srs.lower().endswith("=orig.test=alice@fwd.test"), srs
    token = f"srs-{uuid.uuid4().hex}"
    code, text = p.send("alice@orig.test", ["user@far.test"], f"Subject: {token}\n\n{token}\n")
    assert code == 250, (code, text)
    msg = sink.wait_for(token)[0]
    assert msg.mail_from.lower() == srs.lower(), msg.mail_from
    assert msg.rcpt_tos == ["user@far.test"]
    # A bounce to the SRS address goes back to the original sender.
    bounce = f"bounce-{uuid.uuid4().hex}"
    code, text = p.send("", [srs], f"Subject: {bounce}\n\n{bounce}\n")
    assert code == 250, (code, text)
    msg = sink.wait_for(bounce)[0]
    assert msg.rcpt_tos == ["alice@orig.test"], msg.rcpt_tos
    # postsrsd gone: recipients wait (the reverse map cannot answer).
    kill_postsrsd(postsrsd["proc"])
    code, text = rcpt_reply(p.port, "user@far.test")
    assert (code, text) == (451, "4.3.0 <user@far.test>: Temporary lookup failure")
    p.wait_for_log(rf"tcp:127\.0\.0\.1:{postsrsd['reverse']} lookup error for ")


# ------------------------------------------------------------ socketmap


class SocketmapServer:
    """A socketmap server (netstrings) for the map `valias`:
    info@sock.test → dest@far.test, anything else NOTFOUND; on TCP or on
    a Unix socket. ``stop()`` closes the listener and every connection."""

    def __init__(self, unix_path=None):
        self.unix_path = unix_path
        self.requests = []
        self.conns = []
        self.lock = threading.Lock()
        if unix_path:
            self.sock = socket.socket(socket.AF_UNIX)
            self.sock.bind(str(unix_path))
            os.chmod(unix_path, 0o666)
            self.port = None
        else:
            self.sock = socket.socket()
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self.port = h.free_port()
            self.sock.bind(("127.0.0.1", self.port))
        self.sock.listen(16)
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            with self.lock:
                self.conns.append(c)
            threading.Thread(target=self._serve, args=(c,), daemon=True).start()

    @staticmethod
    def _read_netstring(f):
        digits = b""
        while True:
            ch = f.read(1)
            if not ch:
                return None
            if ch == b":":
                break
            digits += ch
        data = f.read(int(digits) + 1)
        return data[:-1].decode()

    def _serve(self, c):
        f = c.makefile("rb")
        try:
            while True:
                req = self._read_netstring(f)
                if req is None:
                    return
                with self.lock:
                    self.requests.append(req)
                name, _, key = req.partition(" ")
                if name == "valias" and key == "info@sock.test":
                    answer = "OK dest@far.test"
                else:
                    answer = "NOTFOUND "
                data = answer.encode()
                c.sendall(b"%d:%s," % (len(data), data))
        except OSError:
            return

    def stop(self):
        # shutdown wakes the accept() of the other thread; close alone
        # would leave the socket listening until that accept returns.
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()
        with self.lock:
            for c in self.conns:
                try:
                    c.shutdown(socket.SHUT_RDWR)
                    c.close()
                except OSError:
                    pass

    def spec(self):
        if self.unix_path:
            return f"socketmap:unix:{self.unix_path}:valias"
        return f"socketmap:inet:127.0.0.1:{self.port}:valias"


@pytest.mark.parametrize("kind", ["inet", "unix"])
def test_socketmap_virtual_aliases_and_a_dead_server(make_postern, sink, kind):
    d = Path(tempfile.mkdtemp(prefix="pt-sockmap-"))
    os.chmod(d, 0o755)
    server = SocketmapServer(d / "sock" if kind == "unix" else None)
    try:
        spec = server.spec()
        p = make_postern(params={
            "relayhost": f"[127.0.0.1]:{sink.port}",
            "virtual_alias_domains": "sock.test",
            "virtual_alias_maps": spec,
        })
        token = f"sockmap-{uuid.uuid4().hex}"
        code, text = p.send("a@orig.test", ["info@sock.test"], f"Subject: {token}\n\n{token}\n")
        assert code == 250, (code, text)
        msg = sink.wait_for(token)[0]
        assert msg.rcpt_tos == ["dest@far.test"]
        assert "valias info@sock.test" in server.requests
        code, text = rcpt_reply(p.port, "nobody@sock.test")
        assert code == 550, (code, text)
        r = h.run_tool(p, "postmap", "-q", "info@sock.test", spec)
        assert (r.returncode, r.stdout) == (0, "dest@far.test\n"), h.describe(r)
        # The server gone: 451, never 550 or a bounce.
        server.stop()
        code, text = rcpt_reply(p.port, "info@sock.test")
        assert (code, text) == (451, "4.3.0 <info@sock.test>: Temporary lookup failure")
        r = h.run_tool(p, "postmap", "-q", "info@sock.test", spec)
        assert r.returncode not in (0, 1), h.describe(r)
        # Back: a new connection, and the mail flows.
        if kind == "unix":
            os.unlink(d / "sock")
            server = SocketmapServer(d / "sock")
        else:
            port = server.port
            server = SocketmapServer.__new__(SocketmapServer)
            server.unix_path, server.requests, server.conns = None, [], []
            server.lock = threading.Lock()
            server.sock = socket.socket()
            server.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            server.sock.bind(("127.0.0.1", port))
            server.port = port
            server.sock.listen(16)
            threading.Thread(target=server._accept, daemon=True).start()
        code, text = rcpt_reply(p.port, "info@sock.test")
        assert code == 250, (code, text)
    finally:
        server.stop()
        shutil.rmtree(d, ignore_errors=True)


# ------------------------------------------------- unionmap, pipemap, unix


def test_unionmap_pipemap_and_passwd_through_postmap(make_postern):
    p = make_postern(start=False)

    def q(key, spec):
        r = h.run_tool(p, "postmap", "-q", key, spec)
        return r.returncode, r.stdout.strip()
    assert q("a", "unionmap:{inline:{a=1, b=2}, inline:{a=3}}") == (0, "1,3")
    assert q("z", "unionmap:{inline:{a=1}}")[0] == 1
    assert q("a", "pipemap:{inline:{a=b}, inline:{b=final}}") == (0, "final")
    assert q("b", "pipemap:{inline:{a=b}, inline:{b=final}}")[0] == 1
    code, line = q("root", "unix:passwd.byname")
    assert code == 0 and line.startswith("root:") and line.split(":")[2] == "0", line
    assert q("no-such-user-here", "unix:passwd.byname")[0] == 1
    code, line = q("root", "proxy:unix:passwd.byname")
    assert code == 0 and line.startswith("root:")
