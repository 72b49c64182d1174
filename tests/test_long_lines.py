"""Long lines (issue 16, point 6): Postfix's `smtp_line_length_limit`
(default 998) and `lmtp_line_length_limit` (default 990). A line longer
than the limit is broken with CRLF SPACE on the way out, every octet kept,
and the break logged once per message as Postfix logs it.

The receivers are aiosmtpd's SMTP and LMTP servers with their stock line
limit (RFC 5321 section 4.5.3.1.6: 1,000 octets with the CRLF), which
answer `500 Line too long` to a longer line: each test first shows that
the receiver refuses the raw line, so that a Postern that relayed it as
it came would bounce the message.
"""

import re
import smtplib
import threading
import uuid

import pytest

import postern_harness as h
from postfix_peer import postfix_peer  # noqa: F401  (the fixture)

SENDER = "sender@example.org"


def new_token():
    return "pt-long-" + uuid.uuid4().hex


class StrictReceiver:
    """aiosmtpd's SMTP (or LMTP) server, unchanged: its DATA phase refuses
    lines over 1,001 octets with `500 Line too long`. Keeps what it
    accepted (bytes as received, CRLF, dot-unstuffed)."""

    def __init__(self, lmtp=False):
        self.lmtp = lmtp
        self.port = None
        self.controller = None
        self._lock = threading.Lock()
        self.messages = []

    async def handle_DATA(self, server, session, envelope):
        with self._lock:
            self.messages.append((list(envelope.rcpt_tos), bytes(envelope.original_content)))
        if self.lmtp:
            # One reply per recipient after the data (RFC 2033).
            for _ in envelope.rcpt_tos[1:]:
                await server.push("250 2.0.0 Ok")
        return "250 2.0.0 Ok"

    def find(self, token):
        with self._lock:
            return [m for m in self.messages if token.encode() in m[1]]

    def start(self):
        from aiosmtpd.controller import Controller
        from aiosmtpd.lmtp import LMTP
        from aiosmtpd.smtp import SMTP

        proto = LMTP if self.lmtp else SMTP

        class StockController(Controller):
            def factory(self):
                return proto(self.handler, **self.SMTP_kwargs)

        self.port = h.free_port()
        self.controller = StockController(self, hostname="127.0.0.1", port=self.port,
                                          ready_timeout=10)
        self.controller.start()
        return self

    def stop(self):
        if self.controller is not None:
            self.controller.stop()
            self.controller = None


@pytest.fixture
def strict():
    started = []

    def start(lmtp=False):
        r = StrictReceiver(lmtp=lmtp).start()
        started.append(r)
        return r

    yield start
    for r in started:
        r.stop()


def long_message(token, leading_dot=True):
    """A header line of 1,500 octets and body lines of 3,000 (with a dot
    at a break point), 998, 999 and 1,995 octets, all distinct."""
    def run(n, seed):
        return "".join(chr(ord("a") + (k * 7 + seed) % 26) for k in range(n))

    body = [
        "Short first line.",
        run(3000, 1),
        run(998, 2),
        run(999, 3),
        ("." if leading_dot else "d") + run(1994, 4),
        run(997, 5) + "." + run(500, 6),
        "last",
    ]
    head = [f"From: {SENDER}", "To: rcpt@far.test", f"Subject: {token}",
            "Date: Sun, 6 Dec 2026 01:00:00 +0000", f"Message-Id: <{token}@example.org>",
            "X-Long: " + run(1500, 7)]
    return "\n".join(head) + "\n\n" + "\n".join(body) + "\n"


def refuses_raw_long_line(receiver):
    """The receiver really enforces the limit: the raw 3,000-octet line
    gets 500, as a Postern relaying it as it came would."""
    if receiver.lmtp:
        client = smtplib.LMTP("127.0.0.1", receiver.port, timeout=10)
    else:
        client = smtplib.SMTP("127.0.0.1", receiver.port, timeout=10)
    try:
        client.ehlo("client.test")  # LHLO for LMTP
        client.mail(SENDER)
        client.rcpt("rcpt@far.test")
        code, text = client.data(b"Subject: raw\r\n\r\n" + b"x" * 3000 + b"\r\n")
    finally:
        client.close()
    assert code == 500 and b"Line too long" in text, (code, text)


def check_folded(raw, sent, limit):
    """Every line within the limit; removing each inserted CRLF SPACE gives
    back exactly the message sent (in CRLF form) below Postern's Received
    header."""
    lines = raw.split(b"\r\n")
    assert max(len(line) for line in lines) <= limit, max(len(line) for line in lines)
    assert any(len(line) == limit for line in lines), "nothing was broken at the limit"
    unfolded = raw.replace(b"\r\n ", b"")
    want = h.crlf(sent)
    assert unfolded.endswith(want), (len(unfolded), len(want))
    # As many breaks as Postfix makes: a line of n octets on the wire (a
    # leading dot doubled) is broken when n > limit, then every limit - 1
    # octets (each continuation starts with the space).
    def breaks(line):
        n = len(line) + line.startswith(".")
        return 0 if n <= limit else -(-(n - limit) // (limit - 1))

    assert raw.count(b"\r\n ") == sum(breaks(line) for line in sent.split("\n"))


def test_long_lines_are_folded_for_a_receiver_enforcing_the_limit(make_postern, strict):
    r = strict()
    refuses_raw_long_line(r)
    p = make_postern({"relayhost": f"[127.0.0.1]:{r.port}"})
    token = new_token()
    sent = long_message(token)
    code, text = p.send(SENDER, ["rcpt@far.test"], h.crlf(sent))
    assert code == 250, text
    h.wait_for(lambda: r.find(token), 30, what="the message at the receiver")
    (rcpts, raw), = r.find(token)
    check_folded(raw, sent, 998)
    p.wait_for_log(r"status=sent \(250 2\.0\.0 Ok\)")
    # Logged once for the message, in Postfix's words.
    m = p.wait_for_log(r"postfix/smtp\[\d+\]: ([0-9A-F]+): breaking line > 998 bytes "
                       r"with <CR><LF>SPACE$")
    assert len(p.log_findall(rf"{m.group(1)}: breaking line")) == 1


def test_smtp_line_length_limit_zero_relays_lines_as_they_are(make_postern, strict):
    # The switch is real: without the limit the same receiver refuses the
    # message, and it bounces.
    r = strict()
    p = make_postern({"relayhost": f"[127.0.0.1]:{r.port}", "smtp_line_length_limit": "0"})
    token = new_token()
    code, text = p.send(SENDER, ["rcpt@far.test"], h.crlf(long_message(token)))
    assert code == 250, text
    p.wait_for_log(r"to=<rcpt@far\.test>, .*dsn=5\.\d\.\d, status=bounced .*500 Line too long")
    assert not r.find(token)


def test_lmtp_folds_at_lmtp_line_length_limit(make_postern, strict):
    r = strict(lmtp=True)
    refuses_raw_long_line(r)
    p = make_postern({"transport_maps": "inline:{ far.test=lmtp:inet:127.0.0.1:%d }" % r.port})
    token = new_token()
    sent = long_message(token)
    code, text = p.send(SENDER, ["rcpt@far.test", "two@far.test"], h.crlf(sent))
    assert code == 250, text
    h.wait_for(lambda: r.find(token), 30, what="the message at the LMTP receiver")
    (rcpts, raw), = r.find(token)
    assert sorted(rcpts) == ["rcpt@far.test", "two@far.test"]
    check_folded(raw, sent, 990)
    p.wait_for_log(r"postfix/lmtp\[\d+\]: [0-9A-F]+: breaking line > 990 bytes "
                   r"with <CR><LF>SPACE$")
    assert len(p.log_findall(r"to=<(rcpt|two)@far\.test>, .*status=sent")) == 2


def test_folded_exactly_as_a_real_postfix_folds(make_postern, postfix_peer, strict):  # noqa: F811
    # The same message through a real Postfix relaying to the same kind of
    # receiver: the body and the long header arrive broken at the same
    # places. (A line starting with a dot is left out: Postfix does not
    # count the doubled dot, Postern does.)
    r = strict()
    far = postfix_peer(params={"relayhost": f"[127.0.0.1]:{r.port}"})
    p = make_postern({"relayhost": f"[127.0.0.1]:{r.port}"})
    token = new_token()
    sent = long_message(token, leading_dot=False)
    for port in (far.port, p.port):
        with smtplib.SMTP("127.0.0.1", port, timeout=30) as s:
            s.ehlo("client.test")
            code, text = h.smtp_transaction(s, SENDER, ["rcpt@other.test"], h.crlf(sent))
            assert code == 250, text
    h.wait_for(lambda: len(r.find(token)) == 2, 60, what="both copies at the receiver")
    bodies = []
    for _, raw in r.find(token):
        head, _, body = raw.partition(b"\r\n\r\n")
        long_header = re.search(rb"^X-Long: .*?(?=\r\n[^ \t])", head + b"\r\n.", re.M | re.S)
        long_header = long_header.group(0)
        bodies.append((long_header, body))
    assert bodies[0] == bodies[1]
    assert b"\r\n " in bodies[0][1]
    assert re.search(r"postfix/smtp\[\d+\]: [0-9A-F]+: breaking line > 998 bytes "
                     r"with <CR><LF>SPACE", far.log_text())
