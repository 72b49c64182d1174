"""Milters (Postfix's MILTER_README): ``smtpd_milters`` and
``non_smtpd_milters`` with real milters on loopback, each a Debian package
started here in the foreground:

- a test milter on python3-milter (pymilter on Sendmail's libmilter:
  tests/milter_peer.py), scripted per test: every reply at every stage,
  every modification action, macros, a no-reply stage (HELO);
- OpenDKIM signing with a key made by opendkim-genkey; the signature on
  the delivered message checked with python3-dkim against the public key;
- rspamd in milter mode (its proxy worker, self-scan, no network): GTUBE
  refused with rspamd's own reply, a clean message passed with the
  X-Spamd-Result header rspamd adds.

Mail is relayed to an aiosmtpd sink (relayhost) so that the envelope and
the content as delivered can be checked.
"""

import json
import os
import pwd
import re
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

import pytest

import postern_harness as h
from dovecot import dovecot  # noqa: F401  (the fixture)
from postfix_peer import postfix_peer  # noqa: F401  (the fixture)

HERE = Path(__file__).resolve().parent
PY = "/usr/bin/python3"
SENDER = "sender@example.org"
RCPT = "rcpt@remote.example"


def token():
    return "pt-" + uuid.uuid4().hex


def message(tok, extra_headers=(), body="Hello.\nSecond line.\n"):
    head = [("From", SENDER), ("To", RCPT), ("Subject", tok),
            ("Message-ID", f"<{tok}@example.org>"), ("Date", "Sun, 06 Dec 2026 10:00:00 +0000")]
    head += list(extra_headers)
    return h.crlf("".join(f"{n}: {v}\n" for n, v in head) + "\n" + body)


def wait_port(port, timeout=20):
    def up():
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return True
        except OSError:
            return False
    h.wait_for(up, timeout, what=f"a listener on 127.0.0.1:{port}")


def relay(sink, **more):
    p = {"relayhost": f"[127.0.0.1]:{sink.port}", "smtpd_error_sleep_time": "0"}
    p.update(more)
    return p


# --------------------------------------------------------------------------
# peers


class PyMilterPeer:
    """tests/milter_peer.py in its own process."""

    def __init__(self, unix=False, helo_replies=False, rcpt_rej=False):
        self.dir = Path(tempfile.mkdtemp(prefix="milter-"))
        os.chmod(self.dir, 0o755)
        self.port = h.free_port()
        self.unix = self.dir / "milter.sock" if unix else None
        self.plan_file = self.dir / "plan.json"
        self.events_file = self.dir / "events.jsonl"
        self.events_file.touch()
        self.plan()
        self.proc = subprocess.Popen(
            [PY, str(HERE / "milter_peer.py"),
             f"unix:{self.unix}" if self.unix else str(self.port), str(self.plan_file),
             str(self.events_file)] + (["helo-replies"] if helo_replies else [])
            + (["rcpt-rej"] if rcpt_rej else []),
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if self.unix:
            h.wait_for(self.unix.exists, 20, what="the milter's socket")
        else:
            wait_port(self.port)

    @property
    def name(self):
        return f"unix:{self.unix}" if self.unix else f"inet:127.0.0.1:{self.port}"

    def plan(self, replies=None, edits=None):
        self.plan_file.write_text(json.dumps({"replies": replies or {}, "edits": edits or []}))
        self.events_file.write_text("")

    def events(self):
        return [json.loads(line) for line in self.events_file.read_text().splitlines() if line]

    def stages(self):
        return [e["stage"] for e in self.events()]

    def stop(self):
        # libmilter acts on SIGTERM only when its listener's poll times out
        # (4.5 s measured; 5 s of every test's teardown here): killed at
        # once, it keeps nothing the test still needs.
        h.stop_process(self.proc, grace=0)
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture
def test_milter():
    m = PyMilterPeer()
    yield m
    m.stop()


class OpenDkim:
    """opendkim -f with a key from opendkim-genkey (domain example.org,
    selector sel)."""

    def __init__(self):
        self.dir = Path(tempfile.mkdtemp(prefix="opendkim-"))
        os.chmod(self.dir, 0o755)
        self.port = h.free_port()
        h.run(["opendkim-genkey", "-b", "2048", "-d", "example.org", "-s", "sel",
               "-D", str(self.dir)], timeout=60)
        key = self.dir / "sel.private"
        pw = pwd.getpwnam("opendkim")
        os.chown(key, pw.pw_uid, pw.pw_gid)
        os.chmod(key, 0o600)
        txt = (self.dir / "sel.txt").read_text()
        self.dns_txt = "".join(re.findall(r'"([^"]*)"', txt)).encode()
        conf = self.dir / "opendkim.conf"
        conf.write_text(
            "Syslog no\nRequireSafeKeys false\nMode sv\nDomain example.org\n"
            f"Selector sel\nKeyFile {key}\nSocket inet:{self.port}@127.0.0.1\n"
            "Canonicalization relaxed/relaxed\nInternalHosts 127.0.0.1\n"
            "UserID opendkim\nBackground no\n"
            f"PidFile {self.dir}/opendkim.pid\n")
        self.proc = subprocess.Popen(["opendkim", "-f", "-x", str(conf)],
                                     stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        wait_port(self.port)

    @property
    def name(self):
        return f"inet:127.0.0.1:{self.port}"

    def verify(self, raw):
        import dkim
        return dkim.verify(h.crlf(raw) if b"\r\n" not in raw else raw,
                           dnsfunc=lambda name, timeout=5: self.dns_txt)

    def stop(self):
        # At once, as PyMilterPeer (libmilter too).
        h.stop_process(self.proc, grace=0)
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture
def opendkim():
    if not shutil.which("opendkim"):
        pytest.fail("opendkim is not installed (scripts/test installs it)")
    d = OpenDkim()
    yield d
    d.stop()


class Rspamd:
    """rspamd -f with Debian's configuration and a local.d of its own: the
    proxy worker in milter mode with self-scan on a loopback port, the
    other workers on loopback too, DNS pointed at a dead port (no
    network), milter_headers adding X-Spamd-Result for local mail too."""

    def __init__(self):
        self.dir = Path(tempfile.mkdtemp(prefix="rspamd-"))
        os.chmod(self.dir, 0o777)
        self.port = h.free_port()
        local = self.dir / "local.d"
        local.mkdir()
        (self.dir / "db").mkdir()
        (self.dir / "override.d").mkdir()
        for d in (self.dir / "db", local, self.dir / "override.d"):
            os.chmod(d, 0o777)
        dead = h.free_port(udp=True)
        (local / "worker-proxy.inc").write_text(
            f'bind_socket = "127.0.0.1:{self.port}";\nmilter = yes;\ntimeout = 60s;\n'
            'upstream "local" { default = yes; self_scan = yes; }\ncount = 1;\n')
        (local / "worker-normal.inc").write_text(
            f'bind_socket = "127.0.0.1:{h.free_port()}";\ncount = 1;\n')
        (local / "worker-controller.inc").write_text(
            f'bind_socket = "127.0.0.1:{h.free_port()}";\ncount = 1;\n')
        (local / "worker-fuzzy.inc").write_text("enabled = false;\n")
        (local / "logging.inc").write_text(
            f'type = "file";\nfilename = "{self.dir}/rspamd.log";\nlevel = "info";\n')
        # A short list of public suffixes for its URL matcher: with Debian's
        # (9,600 suffixes, without hyperscan) rspamd took 25 s of a loaded
        # machine to start, 1.5 s with this; the messages here have no URLs.
        tld = self.dir / "effective_tld_names.dat"
        tld.write_text("com\norg\nnet\ntest\nexample\n")
        os.chmod(tld, 0o644)
        (local / "options.inc").write_text(
            f'dns {{ nameserver = ["127.0.0.1:{dead}"]; timeout = 0.2s; retransmits = 1; }}\n'
            f'local_addrs = [];\ndisable_hyperscan = true;\nurl_tld = "{tld}";\n')
        (local / "milter_headers.conf").write_text(
            'use = ["x-spamd-result"];\nskip_local = false;\nskip_authenticated = false;\n')
        for off in ("fuzzy_check", "rspamd_update", "phishing", "rbl", "surbl", "asn"):
            (local / f"{off}.conf").write_text("enabled = false;\n")
        self.proc = subprocess.Popen(
            ["rspamd", "-f", "-u", "_rspamd", "-g", "_rspamd", "-c", "/etc/rspamd/rspamd.conf",
             "--var", f"LOCAL_CONFDIR={self.dir}", "--var", f"DBDIR={self.dir}/db",
             "--var", f"RUNDIR={self.dir}", "--var", f"LOGDIR={self.dir}"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def wait_ready(self):
        try:
            wait_port(self.port, timeout=180)
        except AssertionError:
            self.stop()
            raise

    @property
    def name(self):
        return f"inet:127.0.0.1:{self.port}"

    def stop(self):
        h.stop_process(self.proc, grace=10)
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture(scope="module", autouse=True)
def rspamd_started(request):
    """rspamd took a minute or two to start (most of it compiling its
    matcher of 9,600 TLD suffixes, 84 s on a loaded 2-core machine; a few
    seconds with the short list Rspamd gives it): when a selected test of
    this module uses it, it is started with the module and comes up while
    the tests before that one run."""
    wanted = any(getattr(i, "module", None) is request.module
                 and "rspamd" in getattr(i, "fixturenames", ())
                 for i in request.session.items)
    if not wanted or not shutil.which("rspamd"):
        yield None
        return
    r = Rspamd()
    yield r
    r.stop()


@pytest.fixture
def rspamd(rspamd_started):
    if rspamd_started is None:
        pytest.fail("rspamd is not installed (scripts/test installs it)")
    rspamd_started.wait_ready()
    return rspamd_started


# --------------------------------------------------------------------------
# modifications at the end of the message


def test_every_modification_action(make_postern, sink, test_milter):
    test_milter.plan(edits=[
        ["addheader", "X-Added", "added value"],
        ["insheader", "0", "X-Inserted", "at the top"],
        ["chgheader", "Subject", "1", "changed subject"],
        ["chgheader", "X-Drop", "1", ""],
        ["addrcpt", "<added@remote.example>"],
        ["addrcpt", "<withargs@remote.example>", "NOTIFY=NEVER"],
        ["delrcpt", "<gone@remote.example>"],
        ["chgfrom", "<changed@example.org>"],
        ["replacebody", "A new body.\r\nFrom the milter.\r\n"],
    ])
    p = make_postern(relay(sink, smtpd_milters=test_milter.name))
    tok = token()
    data = message(tok, [("X-Drop", "remove me"), ("X-Keep", "stays")])
    code, text = p.send(SENDER, [RCPT, "gone@remote.example"], data)
    assert code == 250, text
    msgs = sink.wait_for(tok, timeout=30) if False else None
    # The Subject is changed: find the message by its Message-ID.
    msgs = sink.wait_for(f"<{tok}@example.org>", count=1, timeout=30)
    time.sleep(1)
    got = sink.find(f"<{tok}@example.org>")
    assert len(got) == 1, got
    m = got[0]
    assert m.mail_from == "changed@example.org"
    assert sorted(m.rcpt_tos) == sorted([RCPT, "added@remote.example",
                                         "withargs@remote.example"])
    headers = h.unfold(m.headers)
    assert re.search(r"^X-Added: added value$", headers, re.M), headers
    assert headers.startswith("X-Inserted: at the top"), headers
    assert re.search(r"^Subject: changed subject$", headers, re.M), headers
    assert "X-Drop" not in headers
    assert re.search(r"^X-Keep: stays$", headers, re.M)
    assert m.body == b"A new body.\r\nFrom the milter.\r\n" or \
        m.body == b"A new body.\nFrom the milter.\n", m.body
    # Every stage was shown, with Postfix's macros.
    ev = test_milter.events()
    stages = [e["stage"] for e in ev]
    for s in ("connect", "helo", "mail", "rcpt", "data", "header", "eoh", "body", "eom"):
        assert s in stages, stages
    eom = [e for e in ev if e["stage"] == "eom"][-1]
    qid = p.wait_for_log(r"postfix/cleanup\[\d+\]: ([0-9A-F]+): message-id=<" + tok)
    assert eom["macros"].get("i"), eom
    assert eom["macros"]["i"] in p.log_text()
    mail = [e for e in ev if e["stage"] == "mail"][-1]
    assert mail["macros"].get("{mail_addr}") == SENDER, mail
    conn = [e for e in ev if e["stage"] == "connect"][-1]
    assert conn["macros"].get("j") == "postern.test", conn
    assert conn["macros"].get("{daemon_name}"), conn


def test_quarantine_goes_to_hold(make_postern, sink, test_milter):
    test_milter.plan(edits=[["quarantine", "held by the test milter"]])
    p = make_postern(relay(sink, smtpd_milters=test_milter.name))
    tok = token()
    code, text = p.send(SENDER, [RCPT], message(tok))
    assert code == 250, text
    h.wait_for(lambda: p.queue_files("hold"), 20, what="a file in hold/")
    time.sleep(1)
    assert sink.find(tok) == []
    assert p.queue_files("hold")


# --------------------------------------------------------------------------
# real milters


def test_opendkim_signs(make_postern, sink, opendkim):
    p = make_postern(relay(sink, smtpd_milters=opendkim.name))
    tok = token()
    code, text = p.send(SENDER, [RCPT], message(tok))
    assert code == 250, text
    m = sink.wait_for(tok)[0]
    assert b"DKIM-Signature:" in m.content, m.content[:600]
    assert opendkim.verify(m.content), m.content[:1500]
    # The check can fail: a header changed after signing breaks it.
    broken = m.content.replace(tok.encode(), b"pt-changed", 1)
    assert not opendkim.verify(broken)


def test_non_smtpd_milters_sign_sendmail_t(make_postern, sink, opendkim):
    p = make_postern(relay(sink, non_smtpd_milters=opendkim.name))
    tok = token()
    r = p.sendmail(["-t", "-f", SENDER], message(tok).replace(b"\r\n", b"\n"))
    assert r.returncode == 0, h.describe(r)
    m = sink.wait_for(tok)[0]
    assert b"DKIM-Signature:" in m.content, m.content[:600]
    assert opendkim.verify(m.content)


# --------------------------------------------------------------------------
# replies at every stage


def dialogue(p, data, rcpts=(RCPT,), port=None):
    """One session step by step (with Postern ``p``, or the server on
    127.0.0.1:``port``). Returns (command, code, text) of the first
    reply that is not a success (command "END" for the final dot), or
    ("END", 250, text) when the message was taken."""
    import smtplib
    try:
        conn = smtplib.SMTP("127.0.0.1", port, timeout=60) if port else p.smtp()
    except smtplib.SMTPConnectError as e:
        return "CONNECT", e.smtp_code, e.smtp_error.decode()
    with conn as s:
        code, text = s.ehlo("client.example")
        if code != 250:
            return "EHLO", code, text.decode()
        code, text = s.docmd("MAIL", f"FROM:<{SENDER}>")
        if code != 250:
            return "MAIL", code, text.decode()
        for r in rcpts:
            code, text = s.docmd("RCPT", f"TO:<{r}>")
            if code != 250:
                return "RCPT", code, text.decode()
        code, text = s.docmd("DATA")
        if code != 354:
            return "DATA", code, text.decode()
        body = data.replace(b"\r\n.", b"\r\n..")
        s.send(body + b".\r\n")
        code, text = s.getreply()
        return "END", code, text.decode()


@pytest.mark.parametrize("stage,reply,where,code,text", [
    ("connect", "reject", "CONNECT", 554, "postern.test ESMTP not accepting connections"),
    ("connect", "custom:421:4.7.0:Go away now", "CONNECT", 421,
     "postern.test Service unavailable - try again later"),
    ("connect", "tempfail", "MAIL", 451, "4.7.1 Service unavailable - try again later"),
    ("mail", "reject", "MAIL", 550, "5.7.1 Command rejected"),
    ("mail", "tempfail", "MAIL", 451, "4.7.1 Service unavailable - try again later"),
    ("mail", "custom:553:5.7.1:No mail from you", "MAIL", 553, "5.7.1 No mail from you"),
    ("rcpt", "reject", "RCPT", 550, "5.7.1 Command rejected"),
    ("rcpt", "custom:452:4.2.2:Mailbox full here", "RCPT", 452, "4.2.2 Mailbox full here"),
    ("data", "reject", "DATA", 550, "5.7.1 Command rejected"),
    ("data", "tempfail", "DATA", 451, "4.7.1 Service unavailable - try again later"),
    ("header", "reject", "END", 550, "5.7.1 Command rejected"),
    ("eoh", "tempfail", "END", 451, "4.7.1 Service unavailable - try again later"),
    ("body", "custom:554:5.7.1:Body refused", "END", 554, "5.7.1 Body refused"),
    ("eom", "reject", "END", 550, "5.7.1 Command rejected"),
    ("eom", "custom:554:5.7.0:Spam, go away", "END", 554, "5.7.0 Spam, go away"),
    ("eom", "custom:451:4.7.1:Greylisted, try later", "END", 451, "4.7.1 Greylisted, try later"),
])
def test_refusal_at_each_stage(make_postern, sink, test_milter, stage, reply, where, code, text):
    p = make_postern(relay(sink, smtpd_milters=test_milter.name))
    # After the start: a refusal at connect would fail the start's
    # greeting check.
    test_milter.plan(replies={stage: reply})
    tok = token()
    got = dialogue(p, message(tok))
    assert got[:2] == (where, code), got
    assert got[2] == text, got
    time.sleep(1)
    assert sink.find(tok) == []
    for q in ("incoming", "active", "deferred", "hold"):
        assert p.queue_files(q) == [], q


@pytest.mark.parametrize("stage", ["connect", "mail", "rcpt", "data", "eom"])
def test_discard_at_each_stage(make_postern, sink, test_milter, stage):
    p = make_postern(relay(sink, smtpd_milters=test_milter.name))
    test_milter.plan(replies={stage: "discard"})
    tok = token()
    got = dialogue(p, message(tok))
    assert got[:2] == ("END", 250), got
    time.sleep(2)
    assert sink.find(tok) == []


@pytest.mark.parametrize("stage", ["connect", "mail", "eoh"])
def test_accept_ends_the_milters_part(make_postern, sink, test_milter, stage):
    test_milter.plan(replies={stage: "accept"}, edits=[["addheader", "X-Not", "added"]])
    p = make_postern(relay(sink, smtpd_milters=test_milter.name))
    tok = token()
    got = dialogue(p, message(tok))
    assert got[:2] == ("END", 250), got
    m = sink.wait_for(tok)[0]
    assert b"X-Not" not in m.content
    # After the accept the milter is not asked about this message again
    # (cleanup's own connection shows the message anew, and gets the same
    # accept there).
    stages = test_milter.stages()
    assert "eom" not in stages, stages


def test_skip_and_large_body(make_postern, sink, test_milter):
    """A body over 65,535 bytes goes in chunks no larger; after SKIP no
    more chunks are sent, and the message is taken."""
    p = make_postern(relay(sink, smtpd_milters=test_milter.name))
    tok = token()
    body = ("x" * 70 + "\n") * 3000  # ~213 kB
    got = dialogue(p, message(tok, body=body))
    assert got[:2] == ("END", 250), got
    sink.wait_for(tok)
    sizes = [int(e["args"][0]) for e in test_milter.events() if e["stage"] == "body"]
    assert len(sizes) >= 4 and max(sizes) <= 65535, sizes
    test_milter.plan(replies={"body": "skip"}, edits=[["addheader", "X-After-Skip", "yes"]])
    tok = token()
    got = dialogue(p, message(tok, body=body))
    assert got[:2] == ("END", 250), got
    m = sink.wait_for(tok)[0]
    assert b"X-After-Skip: yes" in m.content
    ev = test_milter.events()
    assert [e["stage"] for e in ev].count("body") == 1, [e["stage"] for e in ev]
    assert [e for e in ev if e["stage"] == "eom"][-1]["args"] == ["1"]


def test_unix_socket_milter(make_postern, sink):
    m = PyMilterPeer(unix=True)
    try:
        m.plan(edits=[["addheader", "X-Unix-Milter", "seen"]])
        p = make_postern(relay(sink, smtpd_milters=m.name))
        tok = token()
        got = dialogue(p, message(tok))
        assert got[:2] == ("END", 250), got
        msg = sink.wait_for(tok)[0]
        assert b"X-Unix-Milter: seen" in msg.content
    finally:
        m.stop()


# --------------------------------------------------------------------------
# milter_default_action


def dead_milter():
    return f"inet:127.0.0.1:{h.free_port()}"


def test_milter_down_tempfail(make_postern, sink):
    p = make_postern(relay(sink, smtpd_milters=dead_milter()))
    tok = token()
    got = dialogue(p, message(tok))
    assert got == ("MAIL", 451, "4.7.1 Service unavailable - try again later"), got
    for q in ("incoming", "active", "deferred", "hold"):
        assert p.queue_files(q) == [], q


def test_milter_down_accept(make_postern, sink):
    p = make_postern(relay(sink, smtpd_milters=dead_milter(), milter_default_action="accept"))
    tok = token()
    got = dialogue(p, message(tok))
    assert got[:2] == ("END", 250), got
    sink.wait_for(tok)


def test_per_milter_default_action(make_postern, sink, test_milter):
    """The braced form: the dead milter's own default_action=accept wins
    over milter_default_action = tempfail, and the live milter works."""
    test_milter.plan(edits=[["addheader", "X-Live", "yes"]])
    milters = f"{{ {dead_milter()}, default_action=accept, connect_timeout=5s }}, {test_milter.name}"
    p = make_postern(relay(sink, smtpd_milters=milters))
    tok = token()
    got = dialogue(p, message(tok))
    assert got[:2] == ("END", 250), got
    m = sink.wait_for(tok)[0]
    assert b"X-Live: yes" in m.content


def test_milter_dies_mid_message(make_postern, sink, test_milter):
    """The milter goes away at the end of the message: tempfail (the
    default) answers 451 at the final dot and nothing is queued."""
    test_milter.plan(replies={"eom": "crash"})
    p = make_postern(relay(sink, smtpd_milters=test_milter.name))
    tok = token()
    got = dialogue(p, message(tok))
    assert got == ("END", 451, "4.7.1 Service unavailable - try again later"), got
    time.sleep(1)
    for q in ("incoming", "active", "deferred", "hold"):
        assert p.queue_files(q) == [], q
    assert sink.find(tok) == []


def test_no_milters_override(make_postern, sink, test_milter):
    """receive_override_options = no_milters (a content filter's
    reinjection smtpd): neither smtpd nor cleanup asks the milters."""
    test_milter.plan(edits=[["addheader", "X-Should-Not", "be here"]])
    p = make_postern(relay(sink, smtpd_milters=test_milter.name,
                           receive_override_options="no_milters"))
    tok = token()
    got = dialogue(p, message(tok))
    assert got[:2] == ("END", 250), got
    m = sink.wait_for(tok)[0]
    assert b"X-Should-Not" not in m.content
    assert test_milter.events() == []


@pytest.mark.parametrize("reply,code,text", [
    ("reject", 550, "5.7.1 Command rejected"),
    ("custom:554:5.7.1:No such HELO", 554, "5.7.1 No such HELO"),
])
def test_refusal_at_helo(make_postern, sink, reply, code, text):
    m = PyMilterPeer(helo_replies=True)
    try:
        m.plan(replies={"helo": reply})
        p = make_postern(relay(sink, smtpd_milters=m.name))
        got = dialogue(p, message(token()))
        assert got == ("EHLO", code, text), got
    finally:
        m.stop()


def test_no_reply_helo_is_not_waited_for(make_postern, sink, test_milter):
    """The default test milter negotiates SMFIP_NR_HELO: the EHLO reply
    must not wait for an answer that never comes (milter_command_timeout
    is 30s; the whole session takes far less)."""
    p = make_postern(relay(sink, smtpd_milters=test_milter.name))
    start = time.monotonic()
    got = dialogue(p, message(token()))
    assert got[:2] == ("END", 250), got
    assert time.monotonic() - start < 10
    assert "helo" in test_milter.stages()


# --------------------------------------------------------------------------
# the same replies as Postfix with the same milter


COMPARED = [
    {"connect": "reject"},
    {"connect": "custom:421:4.7.0:Go away now"},
    {"connect": "tempfail"},
    {"mail": "reject"},
    {"mail": "custom:553:5.7.1:No mail from you"},
    {"rcpt": "reject"},
    {"rcpt": "custom:452:4.2.2:Mailbox full here"},
    {"data": "tempfail"},
    {"header": "reject"},
    {"eom": "custom:554:5.7.0:Spam, go away"},
    {"eom": "tempfail"},
    {"eom": "discard"},
    {},
]


def test_replies_as_postfix(make_postern, sink, test_milter, postfix_peer):
    """Each scripted reply, through a private Postfix with smtpd_milters
    set to the same test milter and through Postern: the same command gets
    the same reply."""
    import postfix_peer as pp
    far = postfix_peer(params={"smtpd_milters": test_milter.name,
                               "smtpd_error_sleep_time": "0"})
    p = make_postern(relay(sink, smtpd_milters=test_milter.name))
    rcpt = f"user@{pp.DOMAIN}"
    for replies in COMPARED:
        test_milter.plan(replies=replies)
        theirs = dialogue(None, message(token()), rcpts=[rcpt], port=far.port)
        ours = dialogue(p, message(token()), rcpts=[rcpt])
        # Each names its own host.
        theirs = theirs[:2] + (theirs[2].replace("mx.far.test", "HOST"),)
        ours = ours[:2] + (ours[2].replace("postern.test", "HOST"),)
        if theirs[:2] == ("END", 250):
            assert ours[:2] == theirs[:2], (replies, ours, theirs)
        else:
            assert ours == theirs, (replies, ours, theirs)


def unknown_command(port, line="XYZZY hello"):
    c = h.RawSmtp(port)
    try:
        c.reply()
        c.cmd("EHLO client.example")
        return c.cmd(line)
    finally:
        c.close()


@pytest.mark.parametrize("reply", ["continue", "reject", "custom:550:5.7.0:Not that, please"])
def test_unknown_command_as_postfix(make_postern, sink, test_milter, postfix_peer, reply):
    """An unknown command is shown to the milter; its reply, when it
    refuses, replaces smtpd's own, as in Postfix."""
    far = postfix_peer(params={"smtpd_milters": test_milter.name,
                               "smtpd_error_sleep_time": "0"})
    p = make_postern(relay(sink, smtpd_milters=test_milter.name))
    test_milter.plan(replies={"unknown": reply})
    theirs = unknown_command(far.port)
    test_milter.plan(replies={"unknown": reply})
    ours = unknown_command(p.port)
    assert "unknown" in test_milter.stages()
    assert ours == theirs, (ours, theirs)


def test_milter_down_as_postfix(make_postern, sink, postfix_peer):
    dead = dead_milter()
    far = postfix_peer(params={"smtpd_milters": dead, "smtpd_error_sleep_time": "0"})
    p = make_postern(relay(sink, smtpd_milters=dead))
    import postfix_peer as pp
    rcpt = f"user@{pp.DOMAIN}"
    theirs = dialogue(None, message(token()), rcpts=[rcpt], port=far.port)
    ours = dialogue(p, message(token()), rcpts=[rcpt])
    assert ours == theirs, (ours, theirs)


def test_connect_reject_answers_mail(make_postern, sink, test_milter):
    """After a milter's reject at connect (greeting 554), MAIL gets the
    milter's reply, as in Postfix."""
    p = make_postern(relay(sink, smtpd_milters=test_milter.name))
    test_milter.plan(replies={"connect": "reject"})
    c = h.RawSmtp(p.port)
    try:
        assert c.reply() == ["554 postern.test ESMTP not accepting connections"]
        assert c.cmd("EHLO client.example")[-1].startswith("250 ")
        assert c.cmd(f"MAIL FROM:<{SENDER}>") == ["550 5.7.1 Command rejected"]
    finally:
        c.close()


def test_milter_down_quarantine(make_postern, sink):
    """milter_default_action = quarantine: the message is taken and held."""
    p = make_postern(relay(sink, smtpd_milters=dead_milter(),
                           milter_default_action="quarantine"))
    tok = token()
    got = dialogue(p, message(tok))
    assert got[:2] == ("END", 250), got
    h.wait_for(lambda: p.queue_files("hold"), 20, what="a file in hold/")
    time.sleep(1)
    assert sink.find(tok) == []


def test_postern_check_names_a_bad_milter_list(make_postern):
    p = make_postern({"smtpd_milters": "inet:127.0.0.1:8891, tcp:127.0.0.1:8892",
                      "non_smtpd_milters": "{ inet:127.0.0.1:8891, default_action=maybe }"},
                     start=False)
    r = p.postern("check")
    assert r.returncode != 0, h.describe(r)
    assert re.search(r"main\.cf.*smtpd_milters.*bad milter address 'tcp:127\.0\.0\.1:8892'",
                     r.stderr), r.stderr
    assert re.search(r"main\.cf.*non_smtpd_milters.*bad value 'default_action=maybe'",
                     r.stderr), r.stderr
    good = make_postern({"smtpd_milters": "inet:127.0.0.1:8891, { unix:/run/m.sock, "
                                          "default_action=accept, command_timeout=10s }"},
                        start=False)
    r = good.postern("check")
    assert r.returncode == 0, h.describe(r)


def test_tls_macros_at_helo(make_postern, sink, test_milter, tmp_path):
    """After STARTTLS the EHLO stage carries {tls_version}, {cipher} and
    {cipher_bits} (milter_helo_macros)."""
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    r = h.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key),
               "-out", str(cert), "-days", "2", "-subj", "/CN=postern.test"], timeout=60)
    assert r.returncode == 0, h.describe(r)
    os.chmod(key, 0o600)
    p = make_postern(relay(sink, smtpd_milters=test_milter.name,
                           smtpd_tls_security_level="may", smtpd_tls_cert_file=str(cert),
                           smtpd_tls_key_file=str(key)))
    import ssl
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    tok = token()
    with p.smtp() as s:
        s.ehlo("client.example")
        s.starttls(context=ctx)
        s.ehlo("client.example")
        code, text = h.smtp_transaction(s, SENDER, [RCPT], message(tok))
        assert code == 250, text
    sink.wait_for(tok)
    helos = [e for e in test_milter.events() if e["stage"] == "helo"]
    assert helos and helos[0]["macros"].get("{tls_version}") is None, helos
    tls = [e for e in helos if "{tls_version}" in e["macros"]]
    assert tls, helos
    assert tls[-1]["macros"]["{tls_version}"].startswith("TLSv1."), tls
    assert tls[-1]["macros"].get("{cipher}") and tls[-1]["macros"].get("{cipher_bits}"), tls


# --------------------------------------------------------------------------
# macros, as Postfix sends them


def by_conn(events):
    """The events of each milter connection, in order of their first."""
    conns = {}
    for e in events:
        conns.setdefault(e["conn"], []).append(e)
    return list(conns.values())


def stage_macros(events, stage, nth=0):
    got = [e for e in events if e["stage"] == stage]
    return got[nth]["macros"] if len(got) > nth else None


def normal(macros, host):
    """Macro values with the MTA's own names and the values that differ
    by nature (queue id, client port, version) made comparable."""
    out = {}
    for k, v in (macros or {}).items():
        if k in ("i", "{client_port}"):
            v = "SET" if v else ""
        elif k == "v":
            v = "VERSION"
        elif k in ("_", "{client_name}"):
            # The client's name is the resolver's (Postfix here finds
            # "localhost" for 127.0.0.1 in /etc/hosts).
            v = re.sub(r"^(localhost|unknown)\b", "NAME", v)
        else:
            v = v.replace(host, "HOST")
        out[k] = v
    return out


MACRO_STAGES = ("connect", "helo", "mail", "rcpt", "data", "eoh", "eom")


def test_macros_as_postfix(make_postern, sink, postfix_peer, tmp_path):
    """The same session through a private Postfix and through Postern,
    with the same milter (asking for rejected recipients, SMFIP_RCPT_REJ):
    every macro of the default milter_*_macros reaches the milter with
    Postfix's value at each stage ({mail_host}, {mail_mailer},
    {rcpt_host}, {rcpt_mailer}, {daemon_addr} ...), and a recipient the
    MTA refused is shown with {rcpt_mailer} error, {rcpt_host} the
    enhanced status code and {rcpt_addr} the reply text. A macro named in
    a milter_*_macros list that neither MTA knows gets its
    milter_macro_defaults value."""
    m = PyMilterPeer(rcpt_rej=True)
    try:
        access = tmp_path / "rcpt_access"
        access.write_text("bad@remote.example 550 5.1.1 No such user here\n")
        os.chmod(tmp_path, 0o755)
        os.chmod(access, 0o644)
        common = {"smtpd_milters": m.name, "smtpd_error_sleep_time": "0",
                  "relayhost": f"[127.0.0.1]:{sink.port}",
                  "smtpd_recipient_restrictions":
                      f"check_recipient_access texthash:{access}, permit_mynetworks, "
                      "reject_unauth_destination",
                  # A macro neither MTA has a value for gets its default.
                  "milter_macro_defaults": "{ test_default = two words }",
                  "milter_connect_macros": "j {daemon_name} {daemon_addr} v _ {test_default}"}
        far = postfix_peer(params=dict(common))
        p = make_postern(dict(common))
        results = {}
        for name, port, host in (("postfix", far.port, "mx.far.test"),
                                 ("postern", p.port, "postern.test")):
            m.plan()
            tok = token()
            c = h.RawSmtp(port)
            try:
                c.reply()
                c.cmd("EHLO client.example")
                assert c.cmd(f"MAIL FROM:<{SENDER}>")[-1].startswith("250"), name
                assert c.cmd("RCPT TO:<bad@remote.example>") == [
                    "550 5.1.1 <bad@remote.example>: Recipient address rejected: "
                    "No such user here"], name
                assert c.cmd(f"RCPT TO:<{RCPT}>")[-1].startswith("250"), name
                assert c.cmd("DATA")[-1].startswith("354"), name
                c.send(message(tok) + b".\r\n")
                assert c.reply()[-1].startswith("250"), name
                c.cmd("QUIT")
            finally:
                c.close()
            h.wait_for(lambda: "eom" in m.stages(), 30, what=f"the end of message ({name})")
            time.sleep(0.5)
            results[name] = (by_conn(m.events()), host)
        (pf_conns, pf_host), (pt_conns, pt_host) = results["postfix"], results["postern"]
        # Postfix: one milter connection (smtpd's, handed to cleanup).
        # Postern: smtpd's for the SMTP stages, cleanup's for the content.
        pf = pf_conns[0]
        pt_smtpd = pt_conns[0]
        pt_cleanup = [c for c in pt_conns if any(e["stage"] == "eom" for e in c)][-1]
        diffs = []
        for stage in MACRO_STAGES:
            ours_ev = pt_smtpd if stage in ("connect", "helo", "mail", "rcpt", "data") \
                else pt_cleanup
            theirs = normal(stage_macros(pf, stage), pf_host)
            ours = normal(stage_macros(ours_ev, stage), pt_host)
            if ours != theirs:
                diffs.append((stage, ours, theirs))
        assert diffs == [], "\n".join(map(repr, diffs))
        # The refused recipient, then the accepted one.
        pf_rcpts = [(e["args"][0], normal(e["macros"], pf_host)) for e in pf
                    if e["stage"] == "rcpt"]
        pt_rcpts = [(e["args"][0], normal(e["macros"], pt_host)) for e in pt_smtpd
                    if e["stage"] == "rcpt"]
        assert pt_rcpts == pf_rcpts, (pt_rcpts, pf_rcpts)
        assert pf_rcpts[0][1]["{rcpt_mailer}"] == "error", pf_rcpts
        assert stage_macros(pf, "connect").get("{test_default}") == "two words", pf
        # cleanup's replay shows the same values as smtpd's stages (and
        # the queue ID, which smtpd has only after the first recipient).
        for stage in ("connect", "mail"):
            replayed = normal(stage_macros(pt_cleanup, stage), pt_host)
            replayed.pop("i", None)
            assert replayed == normal(stage_macros(pt_smtpd, stage), pt_host), stage
        replay_rcpt = [e for e in pt_cleanup if e["stage"] == "rcpt"]
        assert [e["args"][0] for e in replay_rcpt] == [f"<{RCPT}>"], replay_rcpt
        replayed = normal(replay_rcpt[0]["macros"], pt_host)
        replayed.pop("i", None)
        assert replayed == pt_rcpts[1][1], (replay_rcpt, pt_rcpts)
    finally:
        m.stop()


def test_client_certificate_macros(make_postern, sink, test_milter, tmp_path):
    """With smtpd_tls_ask_ccert, a client certificate gives
    {cert_subject} and {cert_issuer} (their CNs, as Postfix's peer_CN and
    issuer_CN) at HELO after STARTTLS, on smtpd's milter connection and in
    cleanup's replay of the session."""
    import ssl
    from postfix_peer import TestCA
    ca = TestCA(tmp_path / "ca", names=["client.example"], cn="Milter Test CA")
    os.chmod(ca.key_file, 0o644)  # smtpd reads it after dropping privileges
    p = make_postern(relay(sink, smtpd_milters=test_milter.name,
                           smtpd_tls_security_level="may", smtpd_tls_cert_file=str(ca.cert_file),
                           smtpd_tls_key_file=str(ca.key_file), smtpd_tls_ask_ccert="yes"))
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.load_cert_chain(str(ca.cert_file), str(ca.key_file))
    tok = token()
    with p.smtp() as s:
        s.ehlo("client.example")
        s.starttls(context=ctx)
        s.ehlo("client.example")
        code, text = h.smtp_transaction(s, SENDER, [RCPT], message(tok))
        assert code == 250, text
    sink.wait_for(tok)
    # smtpd's connection and cleanup's (not the harness's start probe).
    conns = [c for c in by_conn(test_milter.events()) if any(e["stage"] == "mail" for e in c)]
    assert len(conns) == 2, conns
    for c in conns:
        helos = [e for e in c if e["stage"] == "helo" and "{cert_subject}" in e["macros"]]
        assert helos, c
        assert helos[-1]["macros"]["{cert_subject}"] == "client.example", helos
        assert helos[-1]["macros"]["{cert_issuer}"] == "Milter Test CA", helos
        assert helos[-1]["macros"]["{tls_version}"].startswith("TLSv1."), helos


def test_auth_macros(make_postern, sink, test_milter, dovecot):
    """An authenticated client: {auth_type} and {auth_authen}, and MAIL
    FROM's AUTH= address as {auth_author}, at MAIL."""
    dc = dovecot(users={"user@example.test": "pw"})
    p = make_postern(relay(sink, smtpd_milters=test_milter.name,
                           smtpd_sasl_auth_enable="yes", smtpd_sasl_type="dovecot",
                           smtpd_sasl_path=str(dc.auth_socket)))
    tok = token()
    with p.smtp() as s:
        s.ehlo("client.example")
        s.user, s.password = "user@example.test", "pw"
        code, _ = s.auth("PLAIN", s.auth_plain)
        assert code == 235
        code, text = h.smtp_transaction(s, SENDER, [RCPT], message(tok),
                                        mail_options=["AUTH=author@example.test"])
        assert code == 250, text
    sink.wait_for(tok)
    conns = [c for c in by_conn(test_milter.events()) if any(e["stage"] == "mail" for e in c)]
    assert len(conns) == 2, conns
    for c in conns:
        mail = stage_macros(c, "mail")
        assert mail.get("{auth_type}") == "PLAIN", mail
        assert mail.get("{auth_authen}") == "user@example.test", mail
        assert mail.get("{auth_author}") == "author@example.test", mail


def test_added_recipients_are_aliased_as_postfix(make_postern, sink, test_milter,
                                                 postfix_peer, tmp_path):
    """A recipient a milter adds goes through virtual_alias_maps, in
    Postfix and in Postern alike."""
    aliases = tmp_path / "virtual"
    aliases.write_text("alias@remote.example one@remote.example, two@remote.example\n")
    os.chmod(tmp_path, 0o755)
    os.chmod(aliases, 0o644)
    test_milter.plan(edits=[["addrcpt", "<alias@remote.example>"]])
    common = {"smtpd_milters": test_milter.name, "smtpd_error_sleep_time": "0",
              "relayhost": f"[127.0.0.1]:{sink.port}",
              "virtual_alias_maps": f"texthash:{aliases}"}
    far = postfix_peer(params=dict(common))
    p = make_postern(dict(common))
    got = {}
    for name, port in (("postfix", far.port), ("postern", p.port)):
        tok = token()
        assert dialogue(None, message(tok), port=port)[:2] == ("END", 250), name
        sink.wait_for(tok, timeout=30)
        time.sleep(1)
        got[name] = sorted(r for m in sink.find(tok) for r in m.rcpt_tos)
    assert got["postern"] == got["postfix"], got
    assert got["postern"] == sorted([RCPT, "one@remote.example", "two@remote.example"]), got


def test_milter_header_checks_as_postfix(make_postern, sink, test_milter, postfix_peer,
                                         tmp_path):
    """milter_header_checks inspects the headers a milter adds or
    changes, and only those: IGNORE removes one, REDIRECT sends the message
    elsewhere; a header of the message itself that the same rule matches
    stays; after REDIRECT no more headers are looked at. As in Postfix."""
    checks = tmp_path / "milter_header_checks"
    checks.write_text("/^X-Spam-Flag: YES/ REDIRECT spam@remote.example\n"
                      "/^X-Drop-Me:/ IGNORE\n")
    os.chmod(tmp_path, 0o755)
    os.chmod(checks, 0o644)
    common = {"smtpd_milters": test_milter.name, "smtpd_error_sleep_time": "0",
              "relayhost": f"[127.0.0.1]:{sink.port}",
              "milter_header_checks": f"regexp:{checks}"}
    far = postfix_peer(params=dict(common))
    p = make_postern(dict(common))
    results = {}
    for flag in ("NO", "YES"):
        test_milter.plan(edits=[["addheader", "X-Spam-Flag", flag],
                                ["addheader", "X-Drop-Me", "milter"]])
        for name, port in (("postfix", far.port), ("postern", p.port)):
            tok = token()
            data = message(tok, [("X-Drop-Me", "original")])
            assert dialogue(None, data, port=port)[:2] == ("END", 250), name
            m = sink.wait_for(tok, timeout=30)[0]
            headers = h.unfold(m.headers)
            results[(flag, name)] = (
                sorted(m.rcpt_tos),
                re.findall(r"^X-Drop-Me: .*$", headers, re.M),
                re.findall(r"^X-Spam-Flag: .*$", headers, re.M))
    for flag in ("NO", "YES"):
        assert results[(flag, "postern")] == results[(flag, "postfix")], results
    assert results[("NO", "postern")] == ([RCPT], ["X-Drop-Me: original"],
                                          ["X-Spam-Flag: NO"]), results
    assert results[("YES", "postern")] == (["spam@remote.example"],
                                           ["X-Drop-Me: original", "X-Drop-Me: milter"],
                                           ["X-Spam-Flag: YES"]), results


def test_smtpd_milter_maps(make_postern, sink, test_milter, tmp_path):
    """smtpd_milter_maps by client address: DISABLE turns the milters
    off for 127.0.0.2 (smtpd's stages and cleanup's alike), another
    milter list replaces smtpd_milters for 127.0.0.3, and other clients
    keep smtpd_milters."""
    other = PyMilterPeer()
    try:
        test_milter.plan(edits=[["addheader", "X-First", "yes"]])
        other.plan(edits=[["addheader", "X-Second", "yes"]])
        table = tmp_path / "milter_map"
        table.write_text(f"127.0.0.2/32 DISABLE\n"
                         f"127.0.0.3/32 {{ {other.name}, default_action=tempfail }}\n")
        os.chmod(tmp_path, 0o755)
        os.chmod(table, 0o644)
        p = make_postern(relay(sink, smtpd_milters=test_milter.name,
                               smtpd_milter_maps=f"cidr:{table}",
                               mynetworks="127.0.0.0/8"))
        seen = {}
        for src in ("127.0.0.1", "127.0.0.2", "127.0.0.3"):
            test_milter.plan(edits=[["addheader", "X-First", "yes"]])
            other.plan(edits=[["addheader", "X-Second", "yes"]])
            tok = token()
            with p.smtp(source_address=(src, 0)) as s:
                s.ehlo("client.example")
                code, text = h.smtp_transaction(s, SENDER, [RCPT], message(tok))
                assert code == 250, (src, text)
            m = sink.wait_for(tok)[0]
            seen[src] = (b"X-First: yes" in m.content, b"X-Second: yes" in m.content,
                         bool(test_milter.events()), bool(other.events()))
        assert seen == {"127.0.0.1": (True, False, True, False),
                        "127.0.0.2": (False, False, False, False),
                        "127.0.0.3": (False, True, False, True)}, seen
    finally:
        other.stop()


# rspamd last in the file: it is started with the module (rspamd_started)
# and has the time of the tests above to come up.
def test_rspamd_gtube_and_clean(make_postern, sink, rspamd):
    p = make_postern(relay(sink, smtpd_milters=rspamd.name))
    tok = token()
    gtube = "XJS*C4JDBQADN1.NSBN3*2IDNEN*GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL*C.34X"
    code, text = p.send(SENDER, [RCPT], message(tok, body=f"Spam.\n{gtube}\n"))
    assert code == 554 and "5.7.1" in text and "Gtube pattern" in text, (code, text)
    tok2 = token()
    code, text = p.send(SENDER, [RCPT], message(tok2))
    assert code == 250, text
    m = sink.wait_for(tok2, timeout=60)[0]
    assert re.search(rb"^X-Spamd-Result: ", m.content, re.M), m.content[:1500]
    time.sleep(1)
    assert sink.find(tok) == []
