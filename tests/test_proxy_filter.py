"""The before-queue content filter of Postfix's SMTPD_PROXY_README:
the port-25 smtpd (``-o smtpd_proxy_filter=127.0.0.1:F``) passes each
transaction through an SMTP filter as it happens, and the filter hands
the message to an after-filter smtpd on 127.0.0.1:R (``-o
smtpd_proxy_filter=``, ``receive_override_options=no_unknown_recipient_checks``)
that queues it; the client gets the filter's own reply to the final dot.

The filter (``ProxyFilter``) is a real SMTP server written here with
aiosmtpd (Debian's python3-aiosmtpd), in the role amavisd-new plays in
before-queue mode: it offers XFORWARD and keeps what it was told, refuses
a recipient whose address holds ``filter-refuse`` (550 5.1.1), refuses a
message that holds ``FILTER-REJECT-ME`` at the end of DATA (550 5.7.1),
stalls on ``FILTER-HANG-ME`` (past smtpd_proxy_timeout), sleeps a little
on ``FILTER-SLOW-ME``, and otherwise adds ``X-Filtered: yes`` and relays
the message to R with smtplib, answering only after R took it.

The same cases run against a private Postfix 3.7 with the same master.cf
lines, and the replies are compared (code and enhanced status code).
"""

import asyncio
import os
import re
import smtplib
import threading
import time

import pytest

import postern_harness as h
import postfix_peer as pp

FILTER_HEADER = b"X-Filtered: yes"
CLIENT_ADDR = "127.0.0.2"
REJECT_MARK = "FILTER-REJECT-ME"
HANG_MARK = "FILTER-HANG-ME"
SLOW_MARK = "FILTER-SLOW-ME"
PROXY_TIMEOUT = 4  # smtpd_proxy_timeout for these tests, seconds
QUEUES = ("incoming", "active", "deferred", "hold", "maildrop")


class ProxyFilter:
    """A before-queue SMTP filter on 127.0.0.1:PORT relaying to
    127.0.0.1:BACK (see the module doc). ``seen``: what each DATA held;
    ``xforward``: the XFORWARD attributes of each session; ``ehlo``: the
    EHLO names it was greeted with."""

    def __init__(self, back_port, port=None, unix_path=None):
        self.back_port = back_port
        self.port = port or h.free_port()
        self.unix_path = unix_path
        self.seen = []
        self.xforward = []
        self.ehlo = []
        self.refuse = set()
        self._lock = threading.Lock()
        self.controller = None

    async def handle_EHLO(self, server, session, envelope, hostname, responses):
        session.host_name = hostname
        session.xforward = {}
        with self._lock:
            self.ehlo.append(hostname)
            self.xforward.append(session.xforward)
        last = responses[-1]
        return responses[:-1] + ["250-XFORWARD NAME ADDR PORT PROTO HELO IDENT SOURCE",
                                 "250" + last[3:]]

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        if address.lower() in self.refuse:
            return f"550 5.1.1 <{address}>: Recipient address refused by the filter"
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 Ok"

    async def handle_DATA(self, server, session, envelope):
        content = envelope.original_content or envelope.content
        if isinstance(content, str):
            content = content.encode("utf-8", "surrogateescape")
        content = bytes(content)
        with self._lock:
            self.seen.append(content)
        if HANG_MARK.encode() in content:
            await asyncio.sleep(PROXY_TIMEOUT + 4)
            return "451 4.3.0 hung filter gave up (nothing relayed)"
        if REJECT_MARK.encode() in content:
            return "550 5.7.1 Message content rejected by the filter"
        if SLOW_MARK.encode() in content:
            await asyncio.sleep(3)
        filtered = FILTER_HEADER + b"\r\n" + content
        loop = asyncio.get_running_loop()
        try:
            reply = await loop.run_in_executor(None, self._relay, envelope, filtered)
        except (OSError, smtplib.SMTPException) as e:
            return f"451 4.3.0 reinjection failed: {e}"
        return f"250 2.0.0 Ok: filtered, {reply}"

    def _relay(self, envelope, filtered):
        with smtplib.SMTP("127.0.0.1", self.back_port, timeout=30) as s:
            s.ehlo("filter.test")
            s.mail(envelope.mail_from)
            for r in envelope.rcpt_tos:
                code, text = s.rcpt(r)
                if code != 250:
                    raise smtplib.SMTPException(f"RCPT {r}: {code} {text!r}")
            code, text = s.data(filtered)
            if code != 250:
                raise smtplib.SMTPException(f"DATA: {code} {text!r}")
            return text.decode("utf-8", "replace")

    def start(self):
        from aiosmtpd.controller import Controller, UnixSocketController

        FilterSMTP = h.xforward_smtp_class()

        class FilterController(Controller):
            def factory(self):
                return FilterSMTP(self.handler, **self.SMTP_kwargs)

        if self.unix_path:
            class UnixFilterController(UnixSocketController):
                def factory(self):
                    return FilterSMTP(self.handler, **self.SMTP_kwargs)

            self.controller = UnixFilterController(self, unix_socket=str(self.unix_path),
                                                   ready_timeout=10)
            self.controller.start()
            os.chmod(self.unix_path, 0o666)  # smtpd runs as mail_owner
            return self
        self.controller = FilterController(self, hostname="127.0.0.1", port=self.port,
                                           ready_timeout=10)
        self.controller.start()
        return self

    def stop(self):
        if self.controller is not None:
            self.controller.stop()
            self.controller = None

    def restarted(self):
        f = ProxyFilter(self.back_port, self.port)
        f.seen, f.xforward, f.ehlo, f.refuse = self.seen, self.xforward, self.ehlo, self.refuse
        return f.start()


def proxy_master_cf(port, filter_port, back_port, maxproc="-", options=""):
    """SMTPD_PROXY_README's master.cf lines (Postfix's syntax, for both)."""
    return [
        f"127.0.0.1:{port} inet n - n - {maxproc} smtpd",
        f"  -o smtpd_proxy_filter=127.0.0.1:{filter_port}",
        f"  -o smtpd_proxy_timeout={PROXY_TIMEOUT}s",
        *([f"  -o smtpd_proxy_options={options}"] if options else []),
        f"127.0.0.1:{back_port} inet n - n - - smtpd",
        "  -o smtpd_proxy_filter=",
        "  -o smtpd_authorized_xforward_hosts=127.0.0.0/8",
        "  -o smtpd_client_restrictions=",
        "  -o smtpd_helo_restrictions=",
        "  -o smtpd_sender_restrictions=",
        "  -o smtpd_recipient_restrictions=permit_mynetworks,reject",
        "  -o smtpd_data_restrictions=",
        "  -o mynetworks=127.0.0.0/8",
        "  -o receive_override_options=no_unknown_recipient_checks",
    ]


def status(code, text):
    """(code, enhanced status code) of a reply."""
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    m = re.match(r"\s*(\d\.\d{1,3}\.\d{1,3})\b", text)
    return (code, m.group(1) if m else None)


def message(token, extra=""):
    return h.crlf(f"From: a@client.test\nSubject: {token}\n\nbody {token}\n{extra}")


def transaction(port, rcpts, token, extra=""):
    """One transaction from 127.0.0.2, stopping at the first refusal:
    {step: (code, enhanced code)}, and the DATA reply's text."""
    out = {}
    text = ""
    with smtplib.SMTP("127.0.0.1", port, timeout=60, source_address=(CLIENT_ADDR, 0)) as s:
        s.ehlo("client.example")
        out["MAIL"] = status(*s.mail("sender@client.test"))
        accepted = 0
        for i, r in enumerate(rcpts):
            code, t = s.rcpt(r)
            out[f"RCPT{i}"] = status(code, t)
            accepted += code == 250
        if accepted:
            code, t = s.data(message(token, extra))
            out["DATA"] = status(code, t)
            text = t.decode("utf-8", "replace")
        else:
            code, t = s.docmd("DATA")
            out["DATA-cmd"] = status(code, t)
        s.rset()
    return out, text


class Side:
    """What the cases need of one MTA: its port, where delivered mail is
    found, its queue, its log."""

    def __init__(self, name, port, rcpt, refused, find, queued, log):
        self.name, self.port, self.rcpt, self.refused = name, port, rcpt, refused
        self.find, self.queued, self.log = find, queued, log

    def wait_delivered(self, token, timeout=30):
        return h.wait_for(lambda: self.find(token) or None, timeout, interval=0.2,
                          what=f"{self.name}: a message with {token}")


def cases(side, flt):
    """Every case, asserting what Postfix 3.7 does; returns the replies."""
    replies = {}

    # Filtered once, with the filter's header; the filter's reply to the
    # final dot is the client's, and it saw our Received header.
    token = f"pass-{time.time_ns()}"
    r, text = transaction(side.port, [side.rcpt], token)
    replies["pass"] = r
    assert r == {"MAIL": (250, "2.1.0"), "RCPT0": (250, "2.1.5"), "DATA": (250, "2.0.0")}, r
    assert "filtered" in text, text
    side.wait_delivered(token)
    time.sleep(1.5)  # a second copy would show up by now
    got = side.find(token)
    assert len(got) == 1, f"{side.name}: delivered {len(got)} times"
    assert got[0].count(FILTER_HEADER) == 1, got[0][:800]
    seen = [m for m in flt.seen if token.encode() in m]
    assert len(seen) == 1
    # The before-filter smtpd's own Received header, naming the client;
    # no queue ID (there is no queue file on this side).
    first = re.search(rb"^Received: from [^\r\n]*\r\n(?:[ \t][^\r\n]*\r\n)*", seen[0], re.M)
    assert first and b"[127.0.0.2]" in first.group(0), seen[0][:600]
    assert b" id " not in first.group(0), first.group(0)
    # EHLO $myhostname and XFORWARD with the original client.
    assert flt.xforward[-1].get("ADDR") == CLIENT_ADDR, flt.xforward[-1]
    assert flt.xforward[-1].get("HELO") == "client.example", flt.xforward[-1]

    # A recipient the filter refuses: its reply reaches the client; the
    # other recipient still gets the message.
    token = f"rcpt-{time.time_ns()}"
    flt.refuse.add(side.refused.lower())
    with smtplib.SMTP("127.0.0.1", side.port, timeout=60,
                      source_address=(CLIENT_ADDR, 0)) as s:
        s.ehlo("client.example")
        s.mail("sender@client.test")
        code, text = s.rcpt(side.refused)
    assert b"refused by the filter" in text, (code, text)
    r, _ = transaction(side.port, [side.refused, side.rcpt], token)
    replies["rcpt"] = r
    assert r["RCPT0"] == (550, "5.1.1") and r["RCPT1"] == (250, "2.1.5"), r
    assert r["DATA"] == (250, "2.0.0"), r
    side.wait_delivered(token)

    # The same, pipelined (PIPELINING): each reply in order, the filter's
    # among smtpd's own.
    token = f"pipelined-{time.time_ns()}"
    c = h.RawSmtp(side.port, source=(CLIENT_ADDR, 0))
    try:
        assert c.reply()[0].startswith("220")
        assert any("PIPELINING" in x for x in c.cmd("EHLO client.example"))
        c.send(f"MAIL FROM:<sender@client.test>\r\nRCPT TO:<{side.refused}>\r\n"
               f"RCPT TO:<{side.rcpt}>\r\nDATA\r\n")
        got = [c.reply() for _ in range(4)]
        c.send(message(token) + b".\r\nQUIT\r\n")
        got += [c.reply(), c.reply()]
    finally:
        c.close()
    codes = [status(int(x[-1][:3]), x[-1][4:]) for x in got]
    replies["pipelined"] = codes
    assert codes == [(250, "2.1.0"), (550, "5.1.1"), (250, "2.1.5"), (354, None),
                     (250, "2.0.0"), (221, "2.0.0")], got
    side.wait_delivered(token)

    # The filter refuses the content: 550 5.7.1 at the end of DATA, and
    # nothing is queued or delivered.
    token = f"reject-{time.time_ns()}"
    r, text = transaction(side.port, [side.rcpt], token, extra=REJECT_MARK + "\n")
    replies["reject"] = r
    assert r["DATA"] == (550, "5.7.1") and "rejected by the filter" in text, (r, text)
    time.sleep(1.5)
    assert not side.find(token), f"{side.name} delivered what the filter refused"
    assert not side.queued(), side.queued()

    # The filter takes longer than smtpd_proxy_timeout: 451 4.3.0, nothing
    # queued.
    token = f"hang-{time.time_ns()}"
    t0 = time.monotonic()
    r, text = transaction(side.port, [side.rcpt], token, extra=HANG_MARK + "\n")
    replies["timeout"] = r
    assert r["DATA"] == (451, "4.3.0"), (r, text)
    assert "queue file write error" in text, text
    assert time.monotonic() - t0 < PROXY_TIMEOUT + 3.5, "the filter's own reply came back"
    time.sleep(1)
    assert not side.find(token) and not side.queued()

    # The filter down: 451 4.3.0 at the first RCPT (smtpd connects to the
    # filter there), nothing queued; back up, the retry is delivered once.
    flt.stop()
    token = f"down-{time.time_ns()}"
    r, text = transaction(side.port, [side.rcpt], token)
    replies["down"] = r
    assert r["MAIL"] == (250, "2.1.0") and r["RCPT0"] == (451, "4.3.0"), r
    assert r["DATA-cmd"][0] in (503, 554), r
    time.sleep(1)
    assert not side.find(token) and not side.queued()
    flt = flt.restarted()
    try:
        r, _ = transaction(side.port, [side.rcpt], token)
        replies["back"] = r
        assert r["DATA"] == (250, "2.0.0"), r
        side.wait_delivered(token)
        time.sleep(1.5)
        got = side.find(token)
        assert len(got) == 1 and got[0].count(FILTER_HEADER) == 1
    finally:
        flt.stop()
    return replies, flt


@pytest.fixture
def proxy_ports():
    return h.free_port(), h.free_port()


def postern_side(make_postern, users, filter_port, back_port, maxproc="-", options="",
                 params=None):
    p = make_postern(start=False, params={"mynetworks": "127.0.0.0/8", **(params or {})})
    p.master_cf_extra = proxy_master_cf(p.port, filter_port, back_port, maxproc, options)
    p.write_master_cf()
    r = p.postern("check")
    assert r.returncode == 0, h.describe(r)
    p.start()
    h.wait_for(lambda: h.smtp_banner_ok(back_port), 20, what="the after-filter smtpd")
    side = Side("Postern", p.port, f"{users[0]}@{h.MYHOSTNAME}", f"{users[1]}@{h.MYHOSTNAME}",
                lambda t: [b for _, b in h.find_messages(users[0], t)],
                lambda: [f"{q}/{f}" for q in QUEUES for f in p.queue_files(q)],
                p.log_text)
    return p, side


def postfix_side(filter_port, back_port, options="", params=None):
    far = pp.PostfixPeer(params=params)
    master = (far.etc / "master.cf").read_text()
    line = f"127.0.0.1:{far.port} inet n - n - - smtpd\n"
    assert line in master
    master = master.replace(line, "")
    master += "".join(x + "\n" for x in proxy_master_cf(far.port, filter_port, back_port,
                                                          options=options))
    (far.etc / "master.cf").write_text(master)
    far.start()
    h.wait_for(lambda: h.smtp_banner_ok(back_port), 20, what="Postfix's after-filter smtpd")

    def queued():
        out = []
        for q in QUEUES:
            for root, _d, files in os.walk(far.queue / q):
                out += [os.path.join(root, f) for f in files]
        return out

    side = Side("Postfix", far.port, f"x@{pp.DOMAIN}", f"bob@{pp.DOMAIN}",
                lambda t: [b for _, b in far.find(t)], queued, far.log_text)
    return far, side


def test_proxy_filter_postern(make_postern, local_users, proxy_ports):
    filter_port, back_port = proxy_ports
    flt = ProxyFilter(back_port, filter_port).start()
    try:
        p, side = postern_side(make_postern, local_users, filter_port, back_port)
        _, flt = cases(side, flt)
        # EHLO $smtpd_proxy_ehlo (= $myhostname) to the filter.
        assert set(flt.ehlo) == {h.MYHOSTNAME}, flt.ehlo
        # Postfix's log lines.
        log = p.log_text()
        assert re.search(r"proxy-accept: END-OF-MESSAGE: 250 2\.0\.0 Ok: filtered.*; "
                         r"from=<sender@client\.test> to=<\S+> proto=ESMTP "
                         r"helo=<client\.example>", log), log[-3000:]
        assert re.search(r"proxy-reject: END-OF-MESSAGE: 550 5\.7\.1 Message content "
                         r"rejected by the filter;", log), log[-3000:]
        assert re.search(rf"warning: timeout talking to proxy 127\.0\.0\.1:{filter_port}",
                         log), log[-3000:]
        assert re.search(rf"warning: connect to proxy filter 127\.0\.0\.1:{filter_port}: "
                         r"Connection refused", log), log[-3000:]
    finally:
        flt.stop()


def test_proxy_filter_keeps_sessions_concurrent(make_postern, local_users, proxy_ports):
    """One smtpd process (maxproc 1) serves a second client in full while
    the first waits for a slow filter's end-of-data reply: the filter
    conversation never blocks the process's other sessions."""
    filter_port, back_port = proxy_ports
    flt = ProxyFilter(back_port, filter_port).start()
    try:
        p, side = postern_side(make_postern, local_users, filter_port, back_port,
                               maxproc="1")
        slow_token = f"slow-{time.time_ns()}"
        result = {}

        def slow():
            result["slow"] = transaction(side.port, [side.rcpt], slow_token,
                                         extra=SLOW_MARK + "\n")

        t = threading.Thread(target=slow)
        t.start()
        h.wait_for(lambda: any(slow_token.encode() in m for m in flt.seen), 20,
                   what="the slow message at the filter")
        t0 = time.monotonic()
        fast_token = f"fast-{time.time_ns()}"
        r, _ = transaction(side.port, [side.rcpt], fast_token)
        fast_took = time.monotonic() - t0
        t.join(30)
        assert not t.is_alive()
        assert r["DATA"] == (250, "2.0.0"), r
        assert result["slow"][0]["DATA"] == (250, "2.0.0"), result
        assert fast_took < 2.5, f"the second session waited {fast_took:.1f}s for the first"
        side.wait_delivered(fast_token)
        side.wait_delivered(slow_token)
        pids = set(re.findall(r"smtpd\[(\d+)\]: proxy-accept:", p.log_text()))
        assert len(pids) == 1, pids
    finally:
        flt.stop()


@pytest.mark.skipif(not pp.postfix_available(), reason="Postfix is not installed")
def test_proxy_filter_same_replies_as_postfix(make_postern, local_users, proxy_ports):
    """The same cases against a private Postfix 3.7 with the same master.cf
    lines: both pass every assertion, with the same replies."""
    filter_port, back_port = proxy_ports
    flt = ProxyFilter(back_port, filter_port).start()
    far = None
    try:
        far, side = postfix_side(filter_port, back_port)
        postfix_replies, flt = cases(side, flt)
        log = far.log_text()
        assert re.search(r"proxy-reject: END-OF-MESSAGE: 550 5\.7\.1 Message content "
                         r"rejected by the filter;", log), log[-3000:]
    finally:
        flt.stop()
        if far is not None:
            far.stop()
    filter_port, back_port = h.free_port(), h.free_port()
    flt = ProxyFilter(back_port, filter_port).start()
    try:
        _, side = postern_side(make_postern, local_users, filter_port, back_port)
        postern_replies, flt = cases(side, flt)
    finally:
        flt.stop()
    assert postern_replies == postfix_replies



def test_proxy_filter_on_a_unix_socket(make_postern, local_users, proxy_ports):
    """``smtpd_proxy_filter = unix:private/NAME``: a path relative to the
    queue directory, as Postfix's smtpd (which runs there) reads it."""
    _, back_port = proxy_ports
    p = make_postern(start=False, params={"mynetworks": "127.0.0.0/8"})
    p.master_cf_extra = proxy_master_cf(p.port, 1, back_port)
    p.master_cf_extra[1] = "  -o smtpd_proxy_filter=unix:private/proxyfilter"
    p.write_master_cf()
    p.start()
    h.wait_for(lambda: h.smtp_banner_ok(back_port), 20, what="the after-filter smtpd")
    path = p.queue / "private" / "proxyfilter"
    flt = ProxyFilter(back_port, unix_path=path).start()
    try:
        user = local_users[0]
        token = f"unix-{time.time_ns()}"
        r, text = transaction(p.port, [f"{user}@{h.MYHOSTNAME}"], token)
        assert r["DATA"] == (250, "2.0.0") and "filtered" in text, (r, text)
        got = h.wait_for_messages(user, token)
        assert len(got) == 1 and got[0][1].count(FILTER_HEADER) == 1
    finally:
        flt.stop()


def speed_adjust_cases(side, flt):
    """smtpd_proxy_options = speed_adjust: smtpd answers the envelope
    itself and talks to the filter only after the final dot, so every
    answer of the filter comes back at the end of DATA."""
    replies = {}
    token = f"speed-{time.time_ns()}"
    n = len(flt.seen)
    r, text = transaction(side.port, [side.rcpt], token)
    replies["pass"] = r
    assert r == {"MAIL": (250, "2.1.0"), "RCPT0": (250, "2.1.5"), "DATA": (250, "2.0.0")}, r
    assert "filtered" in text, text
    side.wait_delivered(token)
    time.sleep(1)
    got = side.find(token)
    assert len(got) == 1 and got[0].count(FILTER_HEADER) == 1
    assert len(flt.seen) == n + 1

    # The filter refuses a recipient: smtpd took it, the filter's refusal
    # is the reply to the final dot, and nothing is delivered.
    flt.refuse.add(side.refused.lower())
    token = f"speed-rcpt-{time.time_ns()}"
    r, text = transaction(side.port, [side.refused, side.rcpt], token)
    replies["rcpt"] = r
    assert r["RCPT0"] == (250, "2.1.5") and r["DATA"] == (550, "5.1.1"), (r, text)
    assert "refused by the filter" in text, text

    token = f"speed-reject-{time.time_ns()}"
    r, text = transaction(side.port, [side.rcpt], token, extra=REJECT_MARK + "\n")
    replies["reject"] = r
    assert r["DATA"] == (550, "5.7.1"), (r, text)

    # The filter down: the envelope is accepted, the final dot gets
    # 451 4.3.0, nothing is queued.
    flt.stop()
    token2 = f"speed-down-{time.time_ns()}"
    r, text = transaction(side.port, [side.rcpt], token2)
    replies["down"] = r
    assert r["RCPT0"] == (250, "2.1.5") and r["DATA"] == (451, "4.3.0"), (r, text)
    time.sleep(1.5)
    for t in (token, token2):
        assert not side.find(t), f"{side.name} delivered {t}"
    assert not side.queued(), side.queued()
    return replies


@pytest.mark.skipif(not pp.postfix_available(), reason="Postfix is not installed")
def test_speed_adjust_same_as_postfix(make_postern, local_users, proxy_ports):
    filter_port, back_port = proxy_ports
    flt = ProxyFilter(back_port, filter_port).start()
    try:
        _, side = postern_side(make_postern, local_users, filter_port, back_port,
                               options="speed_adjust")
        postern_replies = speed_adjust_cases(side, flt)
    finally:
        flt.stop()
    filter_port, back_port = h.free_port(), h.free_port()
    flt = ProxyFilter(back_port, filter_port).start()
    far = None
    try:
        far, side = postfix_side(filter_port, back_port, options="speed_adjust")
        postfix_replies = speed_adjust_cases(side, flt)
    finally:
        flt.stop()
        if far is not None:
            far.stop()
    assert postern_replies == postfix_replies


def open_at_mail_cases(side, flt):
    """smtpd_delay_open_until_valid_rcpt = no: smtpd connects to the filter
    at MAIL FROM, so a filter that is down refuses MAIL FROM."""
    replies = {}
    flt.stop()
    token = f"at-mail-{time.time_ns()}"
    with smtplib.SMTP("127.0.0.1", side.port, timeout=60,
                      source_address=(CLIENT_ADDR, 0)) as s:
        s.ehlo("client.example")
        replies["down"] = status(*s.mail("sender@client.test"))
    assert replies["down"] == (451, "4.3.0"), replies
    flt = flt.restarted()
    try:
        r, _ = transaction(side.port, [side.rcpt], token)
        replies["back"] = r
        assert r == {"MAIL": (250, "2.1.0"), "RCPT0": (250, "2.1.5"), "DATA": (250, "2.0.0")}, r
        got = side.wait_delivered(token)
        assert got[0].count(FILTER_HEADER) == 1
    finally:
        flt.stop()
    time.sleep(0.5)
    assert not side.queued()
    return replies


@pytest.mark.skipif(not pp.postfix_available(), reason="Postfix is not installed")
def test_open_at_mail_same_as_postfix(make_postern, local_users, proxy_ports):
    params = {"smtpd_delay_open_until_valid_rcpt": "no"}
    filter_port, back_port = proxy_ports
    flt = ProxyFilter(back_port, filter_port).start()
    try:
        _, side = postern_side(make_postern, local_users, filter_port, back_port, params=params)
        postern_replies = open_at_mail_cases(side, flt)
    finally:
        flt.stop()
    filter_port, back_port = h.free_port(), h.free_port()
    flt = ProxyFilter(back_port, filter_port).start()
    far = None
    try:
        far, side = postfix_side(filter_port, back_port, params=params)
        postfix_replies = open_at_mail_cases(side, flt)
    finally:
        flt.stop()
        if far is not None:
            far.stop()
    assert postern_replies == postfix_replies
