"""After-queue content filtering as in Postfix's FILTER_README: main.cf's
``content_filter = scan:[127.0.0.1]:F`` sends every message to an smtp(8)
service ``scan`` (with ``smtp_send_xforward_command = yes``), the filter
hands it back to a reinjection smtpd on 127.0.0.1:R (``-o content_filter=``,
``-o receive_override_options=...``, ``smtpd_authorized_xforward_hosts``),
and from there it is delivered once.

Two real filters, each run the same way:

- Debian's amavisd-new (``Amavisd``), spam and virus checks off, in the
  foreground with a configuration written here (its ports free ones);
  its mark is the Received line it adds, ``(amavis, port F)``. It
  passes XFORWARD on to the reinjection port itself.
- ``XForwardFilter``, an SMTP filter written here with aiosmtpd (Debian's
  python3-aiosmtpd): it adds an ``X-Filtered-By`` header, passes the
  XFORWARD attributes it was given on to the reinjection port (as
  amavisd-new does) and relays the message there with smtplib, answering
  only after the reinjection smtpd took it; it also counts what it saw.

The same tests run against a private Postfix (tests/postfix_peer.py) with
the same master.cf lines and main.cf settings.
"""

import os
import pwd
import re
import shutil
import signal
import smtplib
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import pytest

import postern_harness as h
import postfix_peer as pp

FILTER_HEADER = "X-Filtered-By: postern-test-filter"
# The original client: another loopback address than the filter's.
CLIENT_ADDR = "127.0.0.2"


class XForwardFilter:
    """An SMTP content filter on 127.0.0.1:PORT relaying to 127.0.0.1:BACK.
    ``passed``: the messages it relayed (bytes as it sent them)."""

    name = "aiosmtpd filter"

    def __init__(self, back_port, port=None):
        self.back_port = back_port
        self.port = port or h.free_port()
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

    def marks(self, raw):
        """How many times the filter's mark is in a delivered message."""
        return raw.count(FILTER_HEADER.encode())

    def original_client(self):
        return self.xforward_seen[-1].get("ADDR") if self.xforward_seen else None

    def restarted(self):
        return XForwardFilter(self.back_port, self.port).start()

    def start(self):
        from aiosmtpd.controller import Controller

        FilterSMTP = h.xforward_smtp_class()

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


AMAVISD = "/usr/sbin/amavisd"

AMAVISD_CONF = """\
use strict;
$MYHOME = '{home}';
$TEMPBASE = "$MYHOME/tmp";
$db_home = "$MYHOME/db";
$pid_file = "$MYHOME/amavisd.pid";
$lock_file = "$MYHOME/amavisd.lock";
$daemon_user = 'amavis';
$daemon_group = 'amavis';
$mydomain = 'filter.test';
$myhostname = 'amavis.filter.test';
$max_servers = 2;
$inet_socket_bind = '127.0.0.1';
$inet_socket_port = [{port}];
@inet_acl = qw(127.0.0.1);
$forward_method = 'smtp:[127.0.0.1]:{back}';
$notify_method = $forward_method;
@bypass_virus_checks_maps = (1);
@bypass_spam_checks_maps = (1);
@local_domains_maps = (1);
$enable_db = 0;
$enable_zmq = 0;
$enable_dkim_verification = 0;
$enable_dkim_signing = 0;
$do_syslog = 0;
$LOGFILE = "$MYHOME/amavis.log";
$log_level = 2;
$unix_socketname = undef;
1;
"""


class Amavisd:
    """Debian's amavisd-new in the foreground on 127.0.0.1:PORT, relaying
    to 127.0.0.1:BACK; spam and virus checks off. The configuration sits
    in a root-owned directory (amavisd refuses one its user can write),
    its home in one owned by the amavis user. Stopped by its PID (and its
    process group, the children it forked)."""

    name = "amavisd-new"

    def __init__(self, back_port, port=None):
        self.back_port = back_port
        self.port = port or h.free_port()
        self.etc = Path(tempfile.mkdtemp(prefix="pt-amavis-etc-"))
        self.home = Path(tempfile.mkdtemp(prefix="pt-amavis-"))
        os.chmod(self.etc, 0o755)
        pw = pwd.getpwnam("amavis")
        for d in (self.home, self.home / "tmp", self.home / "db"):
            d.mkdir(exist_ok=True)
            os.chown(d, pw.pw_uid, pw.pw_gid)
        self.conf = self.etc / "amavisd.conf"
        self.conf.write_text(AMAVISD_CONF.format(home=self.home, port=self.port,
                                                 back=self.back_port))
        os.chmod(self.conf, 0o644)
        self.proc = None

    def start(self):
        self.proc = subprocess.Popen([AMAVISD, "-c", str(self.conf), "foreground"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     cwd="/", start_new_session=True)
        h.wait_for(lambda: h.smtp_banner_ok(self.port) or self.proc.poll() is not None, 60,
                   what="amavisd-new's SMTP port")
        assert self.proc.poll() is None, "amavisd-new did not start:\n" + self.log_text()
        return self

    def stop(self):
        if self.proc is not None and self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
        self.proc = None

    def remove(self):
        self.stop()
        shutil.rmtree(self.etc, ignore_errors=True)
        shutil.rmtree(self.home, ignore_errors=True)

    def log_text(self):
        try:
            return (self.home / "amavis.log").read_text(errors="replace")
        except OSError:
            return ""

    def marks(self, raw):
        return raw.count(f"(amavis, port {self.port})".encode())

    def count(self, token):
        return None  # amavisd-new does not log the Subject; marks() counts passes

    def original_client(self):
        return None  # seen through the reinjection smtpd's orig_client line

    def restarted(self):
        a = Amavisd(self.back_port, self.port)
        shutil.rmtree(a.etc, ignore_errors=True)
        shutil.rmtree(a.home, ignore_errors=True)
        a.etc, a.home, a.conf = self.etc, self.home, self.conf
        return a.start()


def amavisd_available():
    try:
        pwd.getpwnam("amavis")
    except KeyError:
        return False
    return os.access(AMAVISD, os.X_OK)


FILTERS = {
    "aiosmtpd": XForwardFilter,
    "amavisd": Amavisd,
}


@pytest.fixture(params=sorted(FILTERS))
def content_filter(request):
    """Factory: ``content_filter(back_port)`` -> a started filter of the
    kind the test is run with; stopped (and removed) at teardown."""
    kind = request.param
    if not h.is_root():
        pytest.skip("the filters run as root (amavisd-new drops to its user)")
    if kind == "amavisd" and not amavisd_available():
        pytest.fail("amavisd-new is not installed (scripts/test installs amavisd-new)")
    made = []

    def make(back):
        f = FILTERS[kind](back).start()
        made.append(f)
        return f

    yield make
    for f in made:
        f.stop()
        if hasattr(f, "remove"):
            f.remove()



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
    """Delivered once, through the filter once."""
    assert len(messages) == 1, f"delivered {len(messages)} times"
    raw = messages[0]
    assert flt.marks(raw) == 1, f"{flt.name} marks: {flt.marks(raw)}\n{raw[:800]!r}"
    seen = flt.count(token)
    assert seen in (None, 1), f"the filter saw it {seen} times"


@pytest.fixture
def filter_ports():
    return h.free_port()


def test_content_filter_postern(make_postern, local_users, filter_ports, content_filter):
    back = filter_ports
    flt = content_filter(back)
    p = make_postern(
        params={"content_filter": f"scan:[127.0.0.1]:{flt.port}",
                "mynetworks": "127.0.0.0/8"},
        master_cf_extra=filter_master_cf(back))
    h.wait_for(lambda: h.smtp_banner_ok(back), 20, what="the reinjection smtpd")
    user = local_users[0]
    token = f"filtered-{time.time_ns()}"
    send(p.port, f"{user}@{h.MYHOSTNAME}", token)
    h.wait_for_messages(user, token)
    time.sleep(1.5)  # a second copy would show up by now
    check_filtered_once([b for _, b in h.find_messages(user, token)], flt, token)
    raw = h.find_messages(user, token)[0][1]
    # XFORWARD: the filter was told the original client and passed it on;
    # the reinjection smtpd logged it. Its Received header shows the
    # filter, the client that connected (as Postfix's).
    assert flt.original_client() in (None, CLIENT_ADDR), flt.original_client()
    received = re.findall(rb"^Received: from [^\n]*", raw, re.M)
    assert b"[127.0.0.1])" in received[0] and b"[127.0.0.2])" in received[-1], received
    p.wait_for_log(r"client=\S+\[127\.0\.0\.1\], orig_queue_id=\w+, "
                   r"orig_client=unknown\[127\.0\.0\.2\]")

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
    flt = flt.restarted()
    try:
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
def test_content_filter_postfix(filter_ports, content_filter):
    """The same FILTER_README setup in a private Postfix 3.7."""
    back = filter_ports
    flt = content_filter(back)
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
        assert flt.original_client() in (None, CLIENT_ADDR)
        h.wait_for(lambda: re.search(r"client=\S+\[127\.0\.0\.1\], orig_queue_id=\w+, "
                                     r"orig_client=unknown\[127\.0\.0\.2\]", far.log_text()),
                   20, what="Postfix's orig_client log line")
        flt.stop()
        token2 = f"pf-held-{time.time_ns()}"
        send(far.port, f"x@{pp.DOMAIN}", token2)
        time.sleep(4)
        assert not far.find(token2), "Postfix delivered without its filter"
        flt = flt.restarted()
        h.run(["/usr/sbin/postqueue", "-c", str(far.etc), "-f"])
        far.wait_for(token2, timeout=40)
        time.sleep(1.5)
        check_filtered_once([b for _, b in far.find(token2)], flt, token2)
    finally:
        flt.stop()
        if far is not None:
            far.stop()


def test_check_refuses_bad_filter_settings(make_postern):
    """A misspelt receive_override_options, a content_filter without a
    transport, or a before-queue smtpd_proxy_filter smtpd cannot use stops `postern check`
    (and start), naming it."""
    p = make_postern(start=False, params={"receive_override_options": "no_header_checks"})
    r = p.postern("check")
    assert r.returncode == 1 and "no_header_checks" in r.stderr, h.describe(r)
    r = p.postern("start")
    assert r.returncode != 0 and "no_header_checks" in r.stderr, h.describe(r)
    p = make_postern(start=False, master_cf_extra=[
        "127.0.0.1:10999 inet n - n - - smtpd", "  -o content_filter=:[127.0.0.1]:10024"])
    r = p.postern("check")
    assert r.returncode == 1 and "content_filter" in r.stderr, h.describe(r)
    r = p.postern("start")
    assert r.returncode != 0 and "content_filter" in r.stderr, h.describe(r)
    # A before-queue filter smtpd could not use (tests/test_proxy_filter.py
    # has one that works): refused, never ignored.
    for params in ({"smtpd_proxy_filter": "127.0.0.1:99999"},
                   {"smtpd_proxy_filter": "127.0.0.1:10024",
                    "smtpd_proxy_options": "speed_adjust, forward_ehlo"}):
        p = make_postern(start=False, params=params)
        r = p.postern("check")
        name = "smtpd_proxy_options" if len(params) > 1 else "smtpd_proxy_filter"
        assert r.returncode == 1 and name in r.stderr, h.describe(r)
        r = p.postern("start")
        assert r.returncode != 0 and name in r.stderr, h.describe(r)


def test_content_filter_for_local_submission(make_postern, local_users, filter_ports):
    """pickup records content_filter too: sendmail's mail goes through the
    filter (the aiosmtpd one) and is delivered once."""
    back = filter_ports
    flt = XForwardFilter(back).start()
    try:
        p = make_postern(
            params={"content_filter": f"scan:[127.0.0.1]:{flt.port}",
                    "mynetworks": "127.0.0.0/8"},
            master_cf_extra=filter_master_cf(back))
        h.wait_for(lambda: h.smtp_banner_ok(back), 20, what="the reinjection smtpd")
        user = local_users[0]
        token = f"local-{time.time_ns()}"
        r = p.sendmail(["-i", f"{user}@{h.MYHOSTNAME}"], f"Subject: {token}\n\nx\n".encode())
        assert r.returncode == 0, h.describe(r)
        h.wait_for_messages(user, token)
        time.sleep(1.5)
        check_filtered_once([b for _, b in h.find_messages(user, token)], flt, token)
        assert flt.xforward_seen[-1].get("SOURCE") == "LOCAL", flt.xforward_seen
    finally:
        flt.stop()
