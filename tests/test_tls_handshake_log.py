"""Failed TLS handshakes and smtpd_tls_loglevel / smtp_tls_loglevel 2, as
Postfix 3.7 logs them, side by side with a private Postfix on loopback:

- a client that says STARTTLS then sends no TLS (an HTTP request), or
  hangs up in the middle of the handshake: `SSL_accept error from
  HOST[ADDR]: -1` and `warning: TLS library problem: ...`, or `SSL_accept
  error from HOST[ADDR]: lost connection`; then `lost connection after
  STARTTLS from HOST[ADDR]`, which fail2ban's stock postfix filter (mode
  ddos, aggressive) counts;
- at level 2, `setting up TLS connection from HOST[ADDR]` and
  `HOST[ADDR]: TLS cipher list "..."` before the handshake (the list is
  rustls's, in the server's order), on both sides.
"""

import hashlib
import re
import shutil
import socket
import subprocess
import threading
import time

import pytest

import postern_harness as h
from postfix_peer import TestCA, postfix_peer  # noqa: F401  (the fixture)


def starttls_then(port, what):
    """EHLO, STARTTLS, then `what` ("http": a plaintext request instead
    of a ClientHello; "hangup": half a ClientHello, then close)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        f = s.makefile("rb")

        def reply():
            while True:
                line = f.readline()
                if not line or line[3:4] != b"-":
                    return line

        assert reply().startswith(b"220")
        s.sendall(b"EHLO client.example\r\n")
        assert reply().startswith(b"250")
        s.sendall(b"STARTTLS\r\n")
        assert reply().startswith(b"220")
        if what == "http":
            s.sendall(b"GET / HTTP/1.0\r\n\r\n")
            s.settimeout(5)
            try:
                while s.recv(4096):
                    pass
            except OSError:
                pass
        else:
            # A TLS record header announcing more than follows.
            s.sendall(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03")
            time.sleep(0.5)


def shapes(text, daemon):
    """The TLS failure lines of one log, without host, pid and the TLS
    library's own words."""
    out = []
    for line in text.splitlines():
        m = re.search(rf"post(?:fix|ern)/{daemon}\[\d+\]: (.*)$", line)
        if not m:
            continue
        msg = m.group(1)
        if re.match(r"(SSL_accept error|warning: TLS library problem|lost connection after)", msg):
            msg = re.sub(r"TLS library problem: .*", "TLS library problem: ...", msg)
            out.append(msg)
    return out


@pytest.fixture
def far(postfix_peer, tmp_path):  # noqa: F811
    ca = TestCA(tmp_path / "ca", names=["localhost"])
    return ca, postfix_peer(tls=ca)


def test_failed_handshakes_logged_as_postfix_logs_them(make_postern, far):
    ca, peer = far
    p = make_postern(params={"smtpd_tls_security_level": "may",
                             "smtpd_tls_cert_file": str(ca.cert_file),
                             "smtpd_tls_key_file": str(ca.key_file),
                             "syslog_name": "postfix"})
    for port in (peer.port, p.port):
        starttls_then(port, "http")
        starttls_then(port, "hangup")
    want = ["SSL_accept error from localhost[127.0.0.1]: -1",
            "warning: TLS library problem: ...",
            "lost connection after STARTTLS from localhost[127.0.0.1]",
            "SSL_accept error from localhost[127.0.0.1]: lost connection",
            "lost connection after STARTTLS from localhost[127.0.0.1]"]
    theirs = h.wait_for(lambda: (lambda s: s if len(s) >= 5 else None)(
        shapes(peer.log_text(), "smtpd")), 20, what="Postfix's lines")
    ours = h.wait_for(lambda: (lambda s: s if len(s) >= 5 else None)(
        shapes(p.log_text(), "smtpd")), 20, what="Postern's lines")
    # Host names: whatever the resolver says of 127.0.0.1, the same for both.
    norm = lambda lines: [re.sub(r"from \S+\[", "from HOST[", x) for x in lines]  # noqa: E731
    assert norm(ours) == norm(theirs), (ours, theirs)
    assert norm(ours) == norm(want), ours

    f2b = shutil.which("fail2ban-regex")
    if f2b:
        for mode in ("ddos", "aggressive"):
            counts = []
            for log in (peer.maillog, p.maillog):
                r = subprocess.run([f2b, str(log), f"postfix[mode={mode}]"],
                                   capture_output=True, text=True, timeout=120)
                assert r.returncode == 0, r.stdout + r.stderr
                m = re.search(r"^Lines: \d+ lines, \d+ ignored, (\d+) matched", r.stdout, re.M)
                counts.append(int(m.group(1)))
            assert counts[0] == counts[1] >= 2, (mode, counts)


def test_loglevel_2_setting_up_and_cipher_list(make_postern, far, sink):
    ca, peer = far
    p = make_postern(params={"smtpd_tls_security_level": "may",
                             "smtpd_tls_cert_file": str(ca.cert_file),
                             "smtpd_tls_key_file": str(ca.key_file),
                             "smtpd_tls_loglevel": "2",
                             "smtp_tls_security_level": "may", "smtp_tls_loglevel": "2",
                             "relayhost": f"[127.0.0.1]:{peer.port}"})
    r = h.run(["openssl", "s_client", "-starttls", "smtp", "-connect", f"127.0.0.1:{p.port}",
               "-ign_eof"], input=b"EHLO c\r\nQUIT\r\n", timeout=30)
    assert "Protocol  : TLSv1.3" in r.stdout, h.describe(r)
    p.wait_for_log(r"post(fix|ern)/smtpd\[\d+\]: setting up TLS connection from "
                   r"\S+\[127\.0\.0\.1\]$")
    m = p.wait_for_log(r"post(fix|ern)/smtpd\[\d+\]: \S+\[127\.0\.0\.1\]: TLS cipher list "
                       r"\"([^\"]+)\"$")
    assert "TLS_AES_256_GCM_SHA384" in m.group(2).split(":"), m.group(0)

    # The client side, delivering to the private Postfix.
    code, text = p.send("s@example.org", ["u@far.test"], "Subject: level 2\n\nbody\n")
    assert code == 250, text
    p.wait_for_log(rf"post(fix|ern)/smtp\[\d+\]: setting up TLS connection to "
                   rf"127\.0\.0\.1\[127\.0\.0\.1\]:{peer.port}$", timeout=40)
    p.wait_for_log(rf"post(fix|ern)/smtp\[\d+\]: 127\.0\.0\.1\[127\.0\.0\.1\]:{peer.port}: "
                   r"TLS cipher list \"[^\"]+\"$")
    # The server's certificate, as Postfix 3.7's smtp logs it at level 2.
    cert_fp = h.run(["openssl", "x509", "-in", str(ca.cert_file), "-noout", "-fingerprint",
                     "-sha256"], timeout=30).stdout.strip().split("=", 1)[1]
    spki = subprocess.run(["openssl", "x509", "-in", str(ca.cert_file), "-noout", "-pubkey"],
                          capture_output=True, check=True).stdout
    der = subprocess.run(["openssl", "pkey", "-pubin", "-outform", "DER"], input=spki,
                         capture_output=True, check=True).stdout
    pkey_fp = ":".join(f"{b:02X}" for b in hashlib.sha256(der).digest())
    issuer = re.search(r"CN\s*=\s*(.+)$", h.run(
        ["openssl", "x509", "-in", str(ca.ca_file), "-noout", "-subject"], timeout=30).stdout.strip())
    p.wait_for_log(rf"post(fix|ern)/smtp\[\d+\]: 127\.0\.0\.1\[127\.0\.0\.1\]:{peer.port}: "
                   rf"subject_CN=localhost, issuer_CN={re.escape(issuer.group(1))}, "
                   rf"fingerprint={cert_fp}, pkey_fingerprint={pkey_fp}$")


class StarttlsThenBreak:
    """A raw SMTP receiver on 127.0.0.1 that offers STARTTLS, answers it
    220, then either hangs up ("hangup") or answers in plaintext
    ("garbage"), as a broken or hostile next hop does."""

    def __init__(self, how):
        self.how = how
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(5)
        self.port = self.sock.getsockname()[1]
        self.thread = threading.Thread(target=self.serve, daemon=True)
        self.stopped = False
        self.thread.start()

    def serve(self):
        self.sock.settimeout(0.5)
        while not self.stopped:
            try:
                c, _ = self.sock.accept()
            except OSError:
                continue
            with c:
                c.settimeout(10)
                f = c.makefile("rb")
                try:
                    c.sendall(b"220 broken.test ESMTP\r\n")
                    while True:
                        line = f.readline()
                        if not line:
                            break
                        verb = line[:4].upper()
                        if verb in (b"EHLO", b"HELO"):
                            c.sendall(b"250-broken.test\r\n250 STARTTLS\r\n")
                        elif verb == b"STAR":
                            c.sendall(b"220 2.0.0 Ready to start TLS\r\n")
                            if self.how == "garbage":
                                f.read(5)
                                c.sendall(b"HTTP/1.0 400 Bad Request\r\n\r\n")
                                time.sleep(0.5)
                            # Closed now, whatever refers to the socket.
                            c.shutdown(socket.SHUT_RDWR)
                            break
                        elif verb == b"QUIT":
                            c.sendall(b"221 bye\r\n")
                            break
                        else:
                            c.sendall(b"250 ok\r\n")
                except OSError:
                    pass

    def stop(self):
        self.stopped = True
        self.sock.close()
        self.thread.join(5)


@pytest.mark.parametrize("how", ["hangup", "garbage"])
def test_smtp_client_failed_handshake(make_postern, how):
    """Postfix's smtp (tls_client.c) logs `SSL_connect error to
    HOST[ADDR]:PORT: lost connection` when the server hangs up during the
    handshake, `SSL_connect error to ...: -1` and `warning: TLS library
    problem: ...` when TLS fails; the message is deferred."""
    far = StarttlsThenBreak(how)
    try:
        p = make_postern({"relayhost": f"[127.0.0.1]:{far.port}",
                          "smtp_tls_security_level": "encrypt"})
        code, text = p.send("s@example.org", ["u@far.test"], "Subject: x\n\nbody\n")
        assert code == 250, text
        relay = rf"127\.0\.0\.1\[127\.0\.0\.1\]:{far.port}"
        if how == "hangup":
            p.wait_for_log(rf"post(fix|ern)/smtp\[\d+\]: SSL_connect error to {relay}: "
                           r"lost connection$")
        else:
            m = p.wait_for_log(rf"post(fix|ern)/smtp\[(\d+)\]: SSL_connect error to {relay}: -1$")
            p.wait_for_log(rf"post(fix|ern)/smtp\[{m.group(2)}\]: warning: TLS library problem: ")
        p.wait_for_log(r"to=<u@far\.test>.*status=deferred")
    finally:
        far.stop()


def test_loglevel_2_session_lines_as_postfix(make_postern, postfix_peer, tmp_path):  # noqa: F811
    """A TLS 1.3 session and its resumption from the ticket, into a
    private Postfix 3.7 and into Postern, both at smtpd_tls_loglevel 2:
    the same sequence of Postfix's session lines (setting up, cipher
    list, tickets issued and decrypted, session reused, established)."""
    ca = TestCA(tmp_path / "ca", names=["localhost"])
    peer = postfix_peer(tls=ca, params={"smtpd_tls_loglevel": "2"})
    p = make_postern(params={"smtpd_tls_security_level": "may",
                             "smtpd_tls_cert_file": str(ca.cert_file),
                             "smtpd_tls_key_file": str(ca.key_file),
                             "smtpd_tls_loglevel": "2"})
    wanted = re.compile(r"(setting up TLS connection from|TLS cipher list|Issuing session ticket|"
                        r"Decrypting session ticket|Reusing old session|"
                        r"Anonymous TLS connection established)")

    def lines(text):
        out = []
        for line in text.splitlines():
            m = re.search(r"post(?:fix|ern)/smtpd\[\d+\]: (.*)$", line)
            if m and wanted.search(m.group(1)):
                msg = re.sub(r"\S+\[127\.0\.0\.1\]", "HOST[127.0.0.1]", m.group(1))
                msg = re.sub(r"cipher list \".*\"", "cipher list \"...\"", msg)
                msg = re.sub(r"key expiration: \d+", "key expiration: T", msg)
                msg = re.sub(r": TLSv1\.3 with cipher .*", ": TLSv1.3 ...", msg)
                out.append(msg)
        return out

    for server in (peer, p):
        sess = tmp_path / f"sess-{server.port}.pem"
        for arg in ("-sess_out", "-sess_in"):
            r = h.run(["openssl", "s_client", "-starttls", "smtp", "-connect",
                       f"127.0.0.1:{server.port}", "-tls1_3", arg, str(sess), "-ign_eof"],
                      input=b"EHLO c\r\nQUIT\r\n", timeout=30)
            assert "TLSv1.3" in r.stdout, h.describe(r)
        assert "Reused, TLSv1.3" in r.stdout, h.describe(r)
    time.sleep(1)
    theirs, ours = lines(peer.log_text()), lines(p.log_text())
    assert ours == theirs, "\n".join(["ours:", *ours, "theirs:", *theirs])
