"""After-queue content filtering as in Postfix's FILTER_README: main.cf's
``content_filter = scan:[127.0.0.1]:F`` sends every message to an smtp(8)
service ``scan`` (with ``smtp_send_xforward_command = yes``), the filter
hands it back to a reinjection smtpd on 127.0.0.1:R (``-o content_filter=``,
``-o receive_override_options=...``, ``smtpd_authorized_xforward_hosts``),
and from there it is delivered once.

The filter is a real SMTP content filter written here with aiosmtpd
(Debian's python3-aiosmtpd): ``XForwardFilter`` takes each message, adds
an ``X-Filtered-By`` header, passes the XFORWARD attributes it was given
on to the reinjection port (as amavisd-new does) and relays the message
there with smtplib; it answers the client only after the reinjection
smtpd took the message. amavisd-new itself is not used: its Debian
package pulls in a large Perl stack and starts a system instance at
install, which this suite's machines cannot spare.

The same test runs against a private Postfix (tests/postfix_peer.py) with
the same master.cf lines and main.cf settings.
"""

import re
import smtplib
import threading
import time

import pytest

import postern_harness as h
import postfix_peer as pp

FILTER_HEADER = "X-Filtered-By: postern-test-filter"
# The original client: another loopback address than the filter's.
CLIENT_ADDR = "127.0.0.2"


class XForwardFilter:
    """An SMTP content filter on 127.0.0.1:PORT relaying to 127.0.0.1:BACK.
    ``passed``: the messages it relayed (bytes as it sent them)."""

    def __init__(self, back_port):
        self.back_port = back_port
        self.port = h.free_port()
        self.passed = []
        self.xforward_seen = []
        self._lock = threading.Lock()
        self.controller = None

    async def handle_EHLO(self, server, session, envelope, hostname, responses):
        session.host_name = hostname
        session.xforward = {}
        # Offer XFORWARD before the final line, as amavisd-new does.
        last = responses[-1]
        return responses[:-1] + ["250-XFORWARD NAME ADDR PORT PROTO HELO IDENT SOURCE",
                                 "250" + last[3:] if last[3:4] == " " else last]

    async def handle_DATA(self, server, session, envelope):
        content = envelope.original_content or envelope.content
        if isinstance(content, str):
            content = content.encode("utf-8", "surrogateescape")
        filtered = (FILTER_HEADER + "\r\n").encode() + bytes(content)
        xforward = dict(getattr(session, "xforward", {}) or {})
        try:
            with smtplib.SMTP("127.0.0.1", self.back_port, timeout=30) as s:
                s.ehlo("filter.test")
                if s.has_extn("xforward") and xforward:
                    pairs = " ".join(f"{k}={v}" for k, v in xforward.items())
                    code, text = s.docmd("XFORWARD", pairs)
                    if code != 250:
                        return f"451 4.3.0 reinjection refused XFORWARD: {code} {text!r}"
                s.sendmail(envelope.mail_from, envelope.rcpt_tos, filtered)
        except (OSError, smtplib.SMTPException) as e:
            return f"451 4.3.0 reinjection failed: {e}"
        with self._lock:
            self.passed.append(filtered)
            self.xforward_seen.append(xforward)
        return "250 2.0.0 Ok: filtered"

    def count(self, token):
        with self._lock:
            return sum(1 for m in self.passed if token.encode() in m)

    def start(self):
        from aiosmtpd.controller import Controller
        from aiosmtpd.smtp import SMTP, syntax

        class FilterSMTP(SMTP):
            @syntax("XFORWARD attribute=value ...")
            async def smtp_XFORWARD(self, arg):
                attrs = getattr(self.session, "xforward", None)
                if attrs is None:
                    attrs = self.session.xforward = {}
                for pair in (arg or "").split():
                    k, _, v = pair.partition("=")
                    attrs[k.upper()] = v
                await self.push("250 2.0.0 Ok")

        class FilterController(Controller):
            def factory(self):
                return FilterSMTP(self.handler, **self.SMTP_kwargs)

        self.controller = FilterController(self, hostname="127.0.0.1", port=self.port,
                                           ready_timeout=10)
        self.controller.start()
        return self

    def stop(self):
        if self.controller is not None:
            self.controller.stop()
            self.controller = None


def filter_master_cf(back_port):
    """The FILTER_README master.cf lines (Postfix's syntax, for both): the
    reinjection smtpd runs none of main.cf's restrictions (an access
    table's FILTER there would send the mail round again)."""
    return [
        "scan      unix  -       -       n       -       2       smtp",
        "  -o smtp_send_xforward_command=yes",
        f"127.0.0.1:{back_port} inet n - n - - smtpd",
        "  -o content_filter=",
        "  -o receive_override_options=no_unknown_recipient_checks,no_header_body_checks,"
        "no_milters,no_address_mappings",
        "  -o smtpd_authorized_xforward_hosts=127.0.0.0/8",
        "  -o mynetworks=127.0.0.0/8",
        "  -o local_recipient_maps=",
        "  -o relay_recipient_maps=",
        "  -o smtpd_delay_reject=no",
        "  -o smtpd_client_restrictions=permit_mynetworks,reject",
        "  -o smtpd_helo_restrictions=",
        "  -o smtpd_sender_restrictions=",
        "  -o smtpd_recipient_restrictions=permit_mynetworks,reject",
        "  -o smtpd_data_restrictions=reject_unauth_pipelining",
    ]


def send(port, rcpt, token):
    msg = f"From: a@client.test\nTo: {rcpt}\nSubject: {token}\n\nbody {token}\n"
    with smtplib.SMTP("127.0.0.1", port, timeout=30, source_address=(CLIENT_ADDR, 0)) as s:
        s.ehlo("client.example")
        code, text = h.smtp_transaction(s, "sender@client.test", [rcpt], h.crlf(msg))
    assert code == 250, (code, text)
    return text


def check_filtered_once(messages, flt, token):
    assert len(messages) == 1, f"delivered {len(messages)} times"
    raw = messages[0]
    assert raw.count(FILTER_HEADER.encode()) == 1, raw[:600]
    assert flt.count(token) == 1, f"the filter saw it {flt.count(token)} times"


@pytest.fixture
def filter_ports():
    return h.free_port()


def test_content_filter_postern(make_postern, local_users, filter_ports):
    back = filter_ports
    flt = XForwardFilter(back).start()
    try:
        p = make_postern(
            params={"content_filter": f"scan:[127.0.0.1]:{flt.port}",
                    "mynetworks": "127.0.0.0/8"},
            master_cf_extra=filter_master_cf(back))
        h.wait_for(lambda: h.smtp_banner_ok(back), 20, what="the reinjection smtpd")
        user = local_users[0]
        token = f"filtered-{time.time_ns()}"
        send(p.port, f"{user}@{h.MYHOSTNAME}", token)
        got = h.wait_for_messages(user, token)
        time.sleep(1.5)  # a second copy would show up by now
        check_filtered_once([b for _, b in h.find_messages(user, token)], flt, token)
        raw = h.find_messages(user, token)[0][1]
        # XFORWARD: the filter was told the original client, and the
        # reinjection smtpd logged and stamped it.
        xf = flt.xforward_seen[-1]
        assert xf.get("ADDR") == CLIENT_ADDR, xf
        assert re.search(rb"Received: from client\.example \(unknown \[127\.0\.0\.2\]\)", raw), raw[:800]
        p.wait_for_log(r"client=\S+\[127\.0\.0\.1\], orig_queue_id=\w+, "
                       r"orig_client=unknown\[127\.0\.0\.2\]")
        assert got

        # The filter down: the message waits in the queue, never bypasses it.
        flt.stop()
        token2 = f"held-{time.time_ns()}"
        send(p.port, f"{user}@{h.MYHOSTNAME}", token2)
        p.wait_for_log(rf"to=<{user}@{re.escape(h.MYHOSTNAME)}>, relay=none.*status=deferred"
                       rf".*127\.0\.0\.1\[127\.0\.0\.1\]:{flt.port}")
        time.sleep(3)
        assert not h.find_messages(user, token2), "delivered without its filter"
        assert p.queue_files("deferred") or p.queue_files("active")
        # Back up on the same port: it goes out once.
        flt2 = XForwardFilter(back)
        flt2.port = flt.port
        flt = flt2.start()
        h.run_tool(p, "postqueue", "-f")
        h.wait_for_messages(user, token2, timeout=40)
        time.sleep(1.5)
        check_filtered_once([b for _, b in h.find_messages(user, token2)], flt, token2)
    finally:
        flt.stop()


def test_access_and_header_filter_actions(make_postern, local_users, filter_ports):
    """FILTER from an access table and from header_checks sends only the
    matching mail through the filter; other mail goes straight."""
    back = filter_ports
    flt = XForwardFilter(back).start()
    try:
        p = make_postern(
            params={
                "mynetworks": "127.0.0.0/8",
                "smtpd_sender_restrictions": lambda p: f"check_sender_access texthash:{p.etc}/access",
                "header_checks": lambda p: f"regexp:{p.etc}/header_checks",
            },
            files={
                "etc/access": f"scanme@client.test FILTER scan:[127.0.0.1]:{flt.port}\n",
                "etc/header_checks": f"/^Subject: scan-this/ FILTER scan:[127.0.0.1]:{flt.port}\n",
            },
            master_cf_extra=filter_master_cf(back))
        h.wait_for(lambda: h.smtp_banner_ok(back), 20, what="the reinjection smtpd")
        user = local_users[0]
        rcpt = f"{user}@{h.MYHOSTNAME}"
        plain = f"plain-{time.time_ns()}"
        send(p.port, rcpt, plain)
        h.wait_for_messages(user, plain)
        assert flt.count(plain) == 0
        by_header = f"scan-this-{time.time_ns()}"
        send(p.port, rcpt, by_header)
        h.wait_for_messages(user, by_header)
        time.sleep(1)
        check_filtered_once([b for _, b in h.find_messages(user, by_header)], flt, by_header)
        by_sender = f"sender-{time.time_ns()}"
        msg = f"Subject: {by_sender}\n\nx\n"
        with smtplib.SMTP("127.0.0.1", p.port, timeout=30) as s:
            s.ehlo("client.example")
            code, _ = h.smtp_transaction(s, "scanme@client.test", [rcpt], h.crlf(msg))
        assert code == 250
        h.wait_for_messages(user, by_sender)
        time.sleep(1)
        check_filtered_once([b for _, b in h.find_messages(user, by_sender)], flt, by_sender)
    finally:
        flt.stop()


@pytest.mark.skipif(not pp.postfix_available(), reason="Postfix is not installed")
def test_content_filter_postfix(filter_ports):
    """The same FILTER_README setup in a private Postfix 3.7."""
    if not h.is_root():
        pytest.skip("a private Postfix needs root")
    back = filter_ports
    flt = XForwardFilter(back).start()
    far = None
    try:
        far = pp.PostfixPeer(params={"content_filter": f"scan:[127.0.0.1]:{flt.port}",
                                     "minimal_backoff_time": "2s",
                                     "maximal_backoff_time": "4s",
                                     "queue_run_delay": "1s"})
        with open(far.etc / "master.cf", "a") as f:
            f.write("".join(line + "\n" for line in filter_master_cf(back)))
        far.start()
        h.wait_for(lambda: h.smtp_banner_ok(back), 20, what="Postfix's reinjection smtpd")
        token = f"pf-filtered-{time.time_ns()}"
        send(far.port, f"x@{pp.DOMAIN}", token)
        far.wait_for(token)
        time.sleep(1.5)
        check_filtered_once([b for _, b in far.find(token)], flt, token)
        assert flt.xforward_seen[-1].get("ADDR") == CLIENT_ADDR
        h.wait_for(lambda: re.search(r"client=\S+\[127\.0\.0\.1\], orig_queue_id=\w+, "
                                     r"orig_client=unknown\[127\.0\.0\.2\]", far.log_text()),
                   20, what="Postfix's orig_client log line")
        flt.stop()
        token2 = f"pf-held-{time.time_ns()}"
        send(far.port, f"x@{pp.DOMAIN}", token2)
        time.sleep(4)
        assert not far.find(token2), "Postfix delivered without its filter"
        flt2 = XForwardFilter(back)
        flt2.port = flt.port
        flt = flt2.start()
        h.run(["/usr/sbin/postqueue", "-c", str(far.etc), "-f"])
        far.wait_for(token2, timeout=40)
        time.sleep(1.5)
        check_filtered_once([b for _, b in far.find(token2)], flt, token2)
    finally:
        flt.stop()
        if far is not None:
            far.stop()


def test_check_refuses_bad_filter_settings(make_postern):
    """A misspelt receive_override_options or a content_filter without a
    transport stops `postern check` (and start), naming it."""
    p = make_postern(start=False, params={"receive_override_options": "no_header_checks"})
    r = p.postern("check")
    assert r.returncode == 1 and "no_header_checks" in r.stderr, h.describe(r)
    p = make_postern(start=False, master_cf_extra=[
        "127.0.0.1:10999 inet n - n - - smtpd", "  -o content_filter=:[127.0.0.1]:10024"])
    r = p.postern("check")
    assert r.returncode == 1 and "content_filter" in r.stderr, h.describe(r)
