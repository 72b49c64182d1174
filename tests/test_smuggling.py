"""SMTP smuggling (CVE-2023-51764; issue 17, point 5), in both directions,
with the end-of-data variants SEC Consult published: ``<LF>.<LF>``,
``<LF>.<CR><LF>``, ``<CR>.<CR><LF>``, ``<CR>.<LF>``, ``<CR><LF>.<CR>``,
``<CR><LF>.<LF>``, ``<LF>.<CR>``, ``<CR>.<CR>`` and the NUL ones.

- Inbound, smtpd never ends the message at one of them: the commands
  smuggled after it stay message text, and the client gets one reply.
- Outbound, the smtp and lmtp clients send CRLF line ends only: no bare
  CR, no bare LF ever reaches the next hop, whether the message came by
  SMTP or by ``sendmail``, over DATA or BDAT. A stray CR goes as a space,
  as Postfix 3.7 sends it (``cleanup_replace_stray_cr_lf = yes``): each
  variant that Postfix relays is relayed by Postern byte for byte the
  same, with a real private Postfix relaying the same input next to it.

The next hop is a raw-socket SMTP/LMTP server (a real TCP peer, below)
that records every byte it reads and ends DATA only at ``<CR><LF>.<CR><LF>``.
"""

import re
import socket
import threading
import uuid

import pytest

import postern_harness as h
from postfix_peer import postfix_available

SENDER = "sender@example.org"

VARIANTS = {
    "LF.LF": b"\n.\n",
    "LF.CRLF": b"\n.\r\n",
    "CR.CRLF": b"\r.\r\n",
    "CR.LF": b"\r.\n",
    "CRLF.CR": b"\r\n.\r",
    "CRLF.LF": b"\r\n.\n",
    "LF.CR": b"\n.\r",
    "CR.CR": b"\r.\r",
    "CRLF.NUL.CRLF": b"\r\n\x00.\r\n",
    "CRLF.DOT.NUL.CRLF": b"\r\n.\x00\r\n",
    "NUL.LF.LF": b"\x00\n.\n",
}

# The variants a stock Postfix 3.7 (smtpd_forbid_bare_newline = no) does
# not take for the end of the data when they come by SMTP: the ones the
# outbound comparison with Postfix can use. (On the others Postfix ends
# the message early, which Postern never does.)
POSTFIX_RELAYS = ("CR.CRLF", "CR.LF", "CRLF.CR", "LF.CR", "CR.CR",
                  "CRLF.NUL.CRLF", "CRLF.DOT.NUL.CRLF")

SMUGGLED = (b"MAIL FROM:<smuggled@evil.test>\r\nRCPT TO:<victim@remote.test>\r\n"
            b"DATA\r\nSubject: smuggled\r\n\r\nevil\r\n")


class RawReceiver:
    """An SMTP (or LMTP) server on a plain socket: answers 250 to
    everything, 354 to DATA, and ends DATA only at ``<CR><LF>.<CR><LF>``,
    as a strict receiver does. Offers CHUNKING when asked (BDAT).
    ``sessions``: every byte each connection sent; ``commands``: the
    command lines read outside DATA; ``datas``: each DATA (or BDAT)
    content as read."""

    def __init__(self, chunking=False):
        self.chunking = chunking
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.sock.listen(16)
        self.sock.settimeout(0.2)
        self.lock = threading.Lock()
        self.sessions = []
        self.commands = []
        self.datas = []
        self.stopping = False
        self.thread = threading.Thread(target=self._accept, daemon=True)

    def start(self):
        self.thread.start()
        return self

    def stop(self):
        self.stopping = True
        self.thread.join(5)
        self.sock.close()

    def _accept(self):
        while not self.stopping:
            try:
                conn, _ = self.sock.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def find(self, token):
        with self.lock:
            return [d for d in self.datas if token in d]

    def _serve(self, conn):
        conn.settimeout(30)
        raw = bytearray()
        buf = bytearray()
        with self.lock:
            self.sessions.append(raw)

        def more():
            data = conn.recv(65536)
            if not data:
                raise EOFError
            raw.extend(data)
            buf.extend(data)

        def line():
            while b"\n" not in buf:
                more()
            i = buf.index(b"\n") + 1
            out = bytes(buf[:i])
            del buf[:i]
            return out

        bdat = bytearray()
        try:
            conn.sendall(b"220 raw.test ESMTP\r\n")
            while True:
                cmd = line()
                with self.lock:
                    self.commands.append(cmd)
                verb = cmd[:4].upper()
                if verb in (b"EHLO", b"LHLO"):
                    chunking = b"250-CHUNKING\r\n" if self.chunking else b""
                    conn.sendall(b"250-raw.test\r\n250-PIPELINING\r\n250-8BITMIME\r\n"
                                 + chunking + b"250 ENHANCEDSTATUSCODES\r\n")
                elif verb == b"DATA":
                    conn.sendall(b"354 go ahead\r\n")
                    data = bytearray()
                    while not (data.endswith(b"\r\n.\r\n") or data == b".\r\n"):
                        data.extend(line())
                    with self.lock:
                        self.datas.append(bytes(data))
                    conn.sendall(b"250 2.0.0 Ok\r\n")
                elif verb == b"BDAT":
                    words = cmd.split()
                    size = int(words[1])
                    while len(buf) < size:
                        more()
                    bdat.extend(buf[:size])
                    del buf[:size]
                    if len(words) > 2 and words[2].upper() == b"LAST":
                        with self.lock:
                            self.datas.append(bytes(bdat))
                        bdat = bytearray()
                    conn.sendall(b"250 2.0.0 Ok\r\n")
                elif verb == b"QUIT":
                    conn.sendall(b"221 2.0.0 Bye\r\n")
                    return
                else:
                    conn.sendall(b"250 2.0.0 Ok\r\n")
        except (OSError, EOFError, ValueError):
            pass
        finally:
            conn.close()


@pytest.fixture
def receiver():
    made = []

    def make(chunking=False):
        r = RawReceiver(chunking).start()
        made.append(r)
        return r
    yield make
    for r in made:
        r.stop()


def bare_cr_or_lf(data):
    """The offsets of every CR not followed by LF and every LF not after
    a CR."""
    return [i for i, b in enumerate(data)
            if (b == 13 and data[i + 1:i + 2] != b"\n")
            or (b == 10 and (i == 0 or data[i - 1] != 13))]


def one(r, token, name):
    """The one message ``r`` got whose Subject is ``token name``."""
    found = r.find(f"Subject: {token} {name}\r\n".encode())
    assert len(found) == 1, (name, found)
    return found[0]


def body(data):
    return data.partition(b"\r\n\r\n")[2]


def submit_raw(port, token, name, text):
    """One message by SMTP on a raw socket, ``text`` (bytes) as its body,
    ended by CRLF.CRLF. Returns the replies to the end of the data and to
    the QUIT that follows it, as the client sees them."""
    s = h.RawSmtp(port)
    try:
        assert s.reply()[0].startswith("220")
        s.cmd("EHLO client.test")
        assert s.cmd(f"MAIL FROM:<{SENDER}>")[0].startswith("250")
        assert s.cmd("RCPT TO:<rcpt@remote.test>")[0].startswith("250")
        assert s.cmd("DATA")[0].startswith("354")
        s.send(f"From: {SENDER}\r\nSubject: {token} {name}\r\n\r\n".encode()
               + text + b"\r\n.\r\n")
        end = s.reply()
        s.send(b"QUIT\r\n")
        return end, s.reply()
    finally:
        s.close()


def check_clean(r):
    """Every byte every client sent to ``r`` is CRLF-terminated text."""
    with r.lock:
        sessions = [bytes(x) for x in r.sessions]
    assert sessions
    for raw in sessions:
        bad = bare_cr_or_lf(raw)
        assert bad == [], [raw[max(0, i - 20):i + 20] for i in bad[:5]]


def test_inbound_never_ends_early_and_outbound_is_crlf_only(make_postern, receiver):
    r = receiver()
    p = make_postern(params={"relayhost": f"[127.0.0.1]:{r.port}"})
    token = "pt-" + uuid.uuid4().hex
    for name, v in VARIANTS.items():
        end, after = submit_raw(p.port, token, name, b"before" + v + SMUGGLED + b"after")
        # One transaction: the end of the data is the client's CRLF.CRLF,
        # and nothing smuggled was answered before QUIT's 221.
        assert end[0].startswith("250") and "queued as" in end[0], (name, end)
        assert after[0].startswith("221"), (name, after)
    h.wait_for(lambda: len(r.find(token.encode())) == len(VARIANTS), 60,
               what="every message at the receiver")
    check_clean(r)
    for name in VARIANTS:
        data = one(r, token, name)
        # The smuggled commands are message text at the next hop, all of
        # them, and "after" too: the data did not end early anywhere.
        assert b"MAIL FROM:<smuggled@evil.test>" in data, (name, data)
        assert body(data).endswith(b"evil\r\nafter\r\n.\r\n"), (name, data)
        lines = data[:-3].split(b"\r\n")
        assert b"." not in lines, (name, data)
    with r.lock:
        commands = list(r.commands)
    assert not [c for c in commands if b"smuggled" in c or b"victim" in c]
    assert len([c for c in commands if c.upper().startswith(b"MAIL FROM")]) == len(VARIANTS)
    assert not p.log_search(r"from=<smuggled@evil\.test>")
    assert not p.log_search(r"to=<victim@remote\.test>")


def test_stray_cr_goes_as_postfix_sends_it(make_postern, receiver):
    """The same input through a real Postfix 3.7 and through Postern, both
    relaying to raw receivers: the bodies arrive byte for byte the same
    (a stray CR as a space, the CRs before a line end dropped)."""
    if not postfix_available() or not h.is_root():
        pytest.skip("needs Postfix (scripts/test installs postfix) and root")
    from postfix_peer import PostfixPeer
    theirs, ours = receiver(), receiver()
    far = PostfixPeer(params={"relayhost": f"[127.0.0.1]:{theirs.port}"}).start()
    try:
        p = make_postern(params={"relayhost": f"[127.0.0.1]:{ours.port}"})
        token = "pt-" + uuid.uuid4().hex
        cases = {name: b"before" + VARIANTS[name] + b"after" for name in POSTFIX_RELAYS}
        cases["CRCR"] = b"x\r\r\ny"
        cases["CRCRCR-mid"] = b"x\r\r\ry\r\r"
        for port in (far.port, p.port):
            for name, text in cases.items():
                end, _ = submit_raw(port, token, name, text)
                assert end[0].startswith("250"), (port, name, end)
        for rcv in (theirs, ours):
            h.wait_for(lambda: len(rcv.find(token.encode())) == len(cases), 60,
                       what="every message at the receiver")
        check_clean(theirs)
        check_clean(ours)
        for name in cases:
            want = one(theirs, token, name)
            got = one(ours, token, name)
            assert body(got) == body(want), (name, body(got), body(want))
        # What that is, spelled out for two of them.
        got = one(ours, token, "CR.CR")
        assert body(got) == b"before . after\r\n.\r\n"
        got = one(ours, token, "CR.LF")
        assert body(got) == b"before .\r\nafter\r\n.\r\n"
    finally:
        far.stop()


def test_sendmail_submissions_leave_crlf_only(make_postern, receiver):
    """By sendmail (-i: a lone dot is text): each variant reaches the next
    hop with CRLF line ends only, and as a real Postfix's sendmail sends
    it when Postfix is there."""
    r = receiver()
    p = make_postern(params={"relayhost": f"[127.0.0.1]:{r.port}"})
    token = "pt-" + uuid.uuid4().hex
    inputs = {name: f"Subject: {token} {name}\n\n".encode() + b"before" + v + b"after\n"
              for name, v in VARIANTS.items()}
    for name, text in inputs.items():
        res = p.sendmail(["-i", "rcpt@remote.test"], text)
        assert res.returncode == 0, h.describe(res)
    h.wait_for(lambda: len(r.find(token.encode())) == len(VARIANTS), 60,
               what="every message at the receiver")
    check_clean(r)
    for name in VARIANTS:
        data = one(r, token, name)
        assert body(data).endswith(b"after\r\n.\r\n"), (name, data)
    got = one(r, token, "CR.CR")
    assert body(got) == b"before . after\r\n.\r\n"
    got = one(r, token, "LF.LF")
    assert body(got) == b"before\r\n..\r\nafter\r\n.\r\n"
    if not postfix_available() or not h.is_root():
        return
    from postfix_peer import PostfixPeer
    theirs = receiver()
    far = PostfixPeer(params={"relayhost": f"[127.0.0.1]:{theirs.port}"}).start()
    try:
        for name, text in inputs.items():
            res = h.run(["/usr/sbin/sendmail", "-C", far.etc, "-i", "rcpt@remote.test"],
                        input=text, timeout=60)
            assert res.returncode == 0, h.describe(res)
        h.wait_for(lambda: len(theirs.find(token.encode())) == len(VARIANTS), 60,
                   what="every message at Postfix's receiver")
        for name in VARIANTS:
            want = one(theirs, token, name)
            got = one(r, token, name)
            assert body(got) == body(want), (name, body(got), body(want))
    finally:
        far.stop()


def test_bdat_and_lmtp_leave_crlf_only(make_postern, receiver):
    chunky, lmtp = receiver(chunking=True), receiver()
    p = make_postern(params={
        "relayhost": f"[127.0.0.1]:{chunky.port}",
        "transport_maps": "inline:{ lmtp.test=lmtp:inet:127.0.0.1:%d }" % lmtp.port,
    })
    token = "pt-" + uuid.uuid4().hex
    text = b"".join(b"<" + v + b">" for v in VARIANTS.values()) + b"end"
    for rcpt in ("rcpt@remote.test", "rcpt@lmtp.test"):
        s = h.RawSmtp(p.port)
        try:
            s.reply()
            s.cmd("EHLO client.test")
            assert s.cmd(f"MAIL FROM:<{SENDER}>")[0].startswith("250")
            assert s.cmd(f"RCPT TO:<{rcpt}>")[0].startswith("250")
            assert s.cmd("DATA")[0].startswith("354")
            s.send(f"Subject: {token}\r\n\r\n".encode() + text + b"\r\n.\r\n")
            assert s.reply()[0].startswith("250")
            s.cmd("QUIT")
        finally:
            s.close()
    for rcv in (chunky, lmtp):
        h.wait_for(lambda: rcv.find(token.encode()), 60, what="the message")
        check_clean(rcv)
    with chunky.lock:
        assert any(c.upper().startswith(b"BDAT") for c in chunky.commands)
    with lmtp.lock:
        assert any(c.upper().startswith(b"LHLO") for c in lmtp.commands)
    (bdat,) = chunky.find(token.encode())
    (data,) = lmtp.find(token.encode())
    # BDAT carries no dot-stuffing; otherwise the two say the same.
    assert re.sub(rb"\r\n\.\.", b"\r\n.", body(data))[:-3] == body(bdat)
    assert b"< . >" in body(bdat)  # <CR>.<CR>
