"""The commands a Postfix administrator reaches for, with Postfix 3.7's
meaning: postsuper -e/-f, postern flush/set-permissions/
upgrade-configuration/logrotate/abort, postlog, qshape, postkick, and
sendmail's answer when postdrop lost its set-gid bit.

Each test drives the real programs. qshape's report is compared with
Postfix's own /usr/sbin/qshape run on a private Postfix holding the same
messages deferred (both have a relay host nobody listens on); postlog's
line with the one Postfix's /usr/sbin/postlog writes.
"""

import grp
import gzip
import os
import pty
import pwd
import re
import select
import shutil
import smtplib
import stat
import subprocess
import time
import uuid

import pytest

import postern_harness as h
from postern_harness import dead_relay_params, run_tool as tool
from postern_harness import wait_for
from postfix_peer import postfix_peer  # noqa: F401 (fixture)

SENDER = "sender@example.org"


def new_token():
    return "pt-" + uuid.uuid4().hex


def message(token, to="someone@remote.test"):
    return (f"From: {SENDER}\nTo: {to}\nSubject: {token}\n"
            f"Message-ID: <{token}@example.org>\n\nHello.\n")


def ids_in(p, queue):
    return [os.path.basename(f) for f in p.queue_files(queue)
            if re.fullmatch(r"[0-9A-F]{14,}", os.path.basename(f))]


def queue_path(p, queue, qid):
    for f in p.queue_files(queue):
        if os.path.basename(f) == qid:
            return p.queue / queue / f
    return None


def send_deferred(p, rcpts, token=None, sender=SENDER):
    token = token or new_token()
    return p.send_deferred(sender, rcpts, message(token, rcpts[0])), token


def start_sink_on(port, monkeypatch):
    monkeypatch.setattr(h, "free_port", lambda udp=False: port)
    try:
        return h.Sink().start()
    finally:
        monkeypatch.undo()


@pytest.fixture
def dead_port():
    return h.free_port()


# --------------------------------------------------------------------------
# postsuper -e / -f


def returned_notice(p, qid):
    """The queue ID of the non-delivery notice sent for ``qid``."""
    m = p.wait_for_log(rf"{qid}: sender non-delivery notification: ([0-9A-F]+)",
                       what=f"the notice returning {qid}")
    return m.group(1)


def test_postsuper_e_returns_a_deferred_message_with_its_delay_reason(make_postern, dead_port):
    p = make_postern(params=dead_relay_params(dead_port))
    qid, _tok = send_deferred(p, ["x@remote.test"])
    r = tool(p, "postsuper", "-e", qid)
    assert r.returncode == 0, h.describe(r)
    assert r.stderr.strip().splitlines() == ["postsuper: Force-expired: 1 message"], r.stderr
    assert re.search(rf"postsuper\[\d+\]: {qid}: expired$", p.log_text(), re.M), p.log_tail()
    # Marked, not moved: the next delivery attempt returns it.
    path = queue_path(p, "deferred", qid)
    assert path is not None and os.stat(path).st_mode & 0o010, "expire bit not set"
    assert not p.log_search(rf"{qid}: from=<{SENDER}>, status=expired")
    r = tool(p, "postqueue", "-f")
    assert r.returncode == 0, h.describe(r)
    p.wait_for_log(rf"{qid}: from=<{re.escape(SENDER)}>, status=expired, returned to sender")
    notice = returned_notice(p, qid)
    wait_for(lambda: qid not in sum((ids_in(p, q) for q in h.QUEUE_NAMES), []), 20,
             what=f"{qid} gone from the queue")
    # The return states the reason for the delay, not a generic one.
    text = tool(p, "postcat", "-q", notice).stdout
    assert "x@remote.test" in text
    assert "Connection refused" in text or "connect to" in text, text
    assert "administratively expired" not in text


def test_postsuper_f_releases_and_returns_a_held_message(make_postern, dead_port, tmp_path):
    # A message held by header_checks was never tried: its return says
    # Postfix's "message is administratively expired".
    p = make_postern(params={
        **dead_relay_params(dead_port),
        "header_checks": lambda p: f"regexp:{p.dir}/etc/header_checks",
    }, files={"etc/header_checks": "/^Subject: hold-me/ HOLD\n"})
    code, text = p.send(SENDER, ["y@remote.test"], message("hold-me " + new_token()))
    assert code == 250, text
    qid = re.search(r"queued as ([0-9A-F]+)", text).group(1)
    wait_for(lambda: qid in ids_in(p, "hold"), 20, what=f"{qid} in hold/")

    # -e alone: a held message stays held, even through a flush.
    r = tool(p, "postsuper", "-e", qid)
    assert r.returncode == 0 and "Force-expired: 1 message" in r.stderr, h.describe(r)
    assert tool(p, "postqueue", "-f").returncode == 0
    time.sleep(2)
    assert qid in ids_in(p, "hold")
    assert not p.log_search(rf"{qid}: from=<[^>]*>, status=expired")

    # -f: expired and released, then returned at once.
    r = tool(p, "postsuper", "-f", qid)
    assert r.returncode == 0, h.describe(r)
    assert r.stderr.strip().splitlines() == [
        "postsuper: Force-expired: 1 message",
        "postsuper: Released from hold: 1 message"], r.stderr
    log = p.log_text()
    assert re.search(rf"postsuper\[\d+\]: {qid}: released from hold$", log, re.M), log
    p.wait_for_log(rf"{qid}: from=<{re.escape(SENDER)}>, status=expired, returned to sender")
    p.wait_for_log(rf"{qid}: to=<y@remote.test>.*status=deferred \(message is "
                   r"administratively expired\)")
    notice = returned_notice(p, qid)
    text = tool(p, "postcat", "-q", notice).stdout
    assert "message is administratively expired" in text, text


def test_postsuper_e_all_and_bad_ids(make_postern, dead_port):
    p = make_postern(params=dead_relay_params(dead_port))
    a, _ = send_deferred(p, ["a@remote.test"])
    b, _ = send_deferred(p, ["b@remote.test"])
    r = tool(p, "postsuper", "-e", "ALL", "deferred")
    assert r.returncode == 0, h.describe(r)
    assert "postsuper: Force-expired: 2 messages" in r.stderr
    for qid in (a, b):
        assert os.stat(queue_path(p, "deferred", qid)).st_mode & 0o010
    r = tool(p, "postsuper", "-e", "NOSUCHID0000000")
    assert r.returncode == 0 and "Force-expired" not in r.stderr, h.describe(r)
    r = tool(p, "postsuper", "-x")
    assert r.returncode == 64 and "-e queue_id (expire)" in r.stderr, h.describe(r)


# --------------------------------------------------------------------------
# postern flush, abort, set-permissions, upgrade-configuration, logrotate


def test_postern_flush_delivers_deferred_mail(make_postern, dead_port, monkeypatch):
    p = make_postern(params=dead_relay_params(dead_port))
    qid, tok = send_deferred(p, ["f@flush.test"])
    sink = start_sink_on(dead_port, monkeypatch)
    try:
        time.sleep(1)
        assert sink.count(tok) == 0  # the retry is an hour away
        r = p.postern("flush")
        assert r.returncode == 0, h.describe(r)
        sink.wait_for(tok, timeout=15)
        wait_for(lambda: qid not in ids_in(p, "deferred"), 15)
    finally:
        sink.stop()


def test_postern_abort_stops_everything_at_once(make_postern):
    p = make_postern()
    master = p.master_pid()
    children = p.child_pids()
    assert master and children
    # An SMTP session in progress: stop would let it finish; abort does not.
    s = h.RawSmtp(p.port)
    assert s.reply()[0].startswith("220")
    assert s.cmd("EHLO client.example")[0].startswith("250")
    started = time.monotonic()
    r = p.postern("abort", timeout=30)
    took = time.monotonic() - started
    assert r.returncode == 0, h.describe(r)
    assert "aborting the Postern mail system" in r.stderr
    assert took < 5, f"abort took {took:.1f}s"
    h.poll_until(lambda: not any(h.pid_alive(x) for x in [master] + children), 5)
    assert not h.pid_alive(master)
    assert [c for c in children if h.pid_alive(c)] == []
    # The session is gone with its smtpd.
    s.s.settimeout(5)
    try:
        s.send("NOOP\r\n")
        assert s.f.readline() == b""
    except OSError:
        pass
    s.close()
    assert p.status().returncode == 1
    p.started = False
    r = p.postern("abort")
    assert r.returncode == 1 and "not running" in r.stderr, h.describe(r)
    # Nothing was left in a state that keeps it from starting again.
    p.start()
    assert p.status().returncode == 0


def test_set_permissions_repairs_modes_and_owners(make_postern):
    if not h.is_root():
        pytest.skip("needs root")
    p = make_postern(start=False)
    assert p.postern("check").returncode == 0
    owner = pwd.getpwnam(p.mail_owner)
    postdrop_gid = grp.getgrnam("postdrop").gr_gid
    # A postdrop copied without its set-gid bit, a maildrop others can
    # write, a deferred directory and a queue file owned by root.
    bindir = p.dir / "bin"
    bindir.mkdir(mode=0o755)
    postdrop = bindir / "postdrop"
    shutil.copyfile(p.cmd("postdrop"), postdrop)
    os.chmod(postdrop, 0o755)
    shutil.copyfile(p.cmd("postqueue"), bindir / "postqueue")
    os.chmod(bindir / "postqueue", 0o755)
    p.set_params(command_directory=str(bindir))
    os.chmod(p.queue / "maildrop", 0o777)
    os.chown(p.queue / "deferred", 0, 0)
    stray = p.queue / "deferred" / "ABCDEF0123456789"
    stray.write_bytes(b"x")
    os.chown(stray, 0, 0)
    r = p.postern("check")
    assert r.returncode != 0 and "unsafe queue directory" in r.stderr, h.describe(r)

    r = p.postern("set-permissions")
    assert r.returncode == 0, h.describe(r)
    assert re.search(r"set-permissions: \d+ files changed", r.stderr), r.stderr
    st = os.stat(p.queue / "maildrop")
    assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (
        0o1730, owner.pw_uid, postdrop_gid)
    st = os.stat(p.queue / "deferred")
    assert (stat.S_IMODE(st.st_mode), st.st_uid) == (0o700, owner.pw_uid)
    assert os.stat(stray).st_uid == owner.pw_uid
    st = os.stat(postdrop)
    assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (0o2755, 0, postdrop_gid)
    stray.unlink()
    r = p.postern("check")
    assert r.returncode == 0, h.describe(r)
    # Nothing left to change.
    r = p.postern("set-permissions")
    assert r.returncode == 0 and "set-permissions: 0 files changed" in r.stderr, h.describe(r)


def test_set_permissions_needs_root(make_postern):
    p = make_postern(start=False)
    if not h.is_root():
        r = p.postern("set-permissions")
        assert r.returncode == 77 and "super-user" in r.stderr, h.describe(r)
        return
    r = h.run([p.cmd("postern"), "-c", p.etc, "set-permissions"], user="nobody",
              env=p.env(), cwd="/")
    assert r.returncode == 77 and "must be run by the super-user" in r.stderr, h.describe(r)


def test_upgrade_configuration_adds_missing_services(make_postern):
    p = make_postern(start=False, master_cf_omit=("anvil",))
    before = p.master_cf.read_text()
    assert not re.search(r"^anvil\s", before, re.M)
    r = p.postern("upgrade-configuration")
    assert r.returncode == 0, h.describe(r)
    assert f"postern: adding anvil/unix service to {p.master_cf}" in r.stderr, r.stderr
    after = p.master_cf.read_text()
    assert after.startswith(before)
    assert re.search(r"^anvil\s+unix\s.*\banvil$", after, re.M), after
    # The SMTP listener the test wrote is kept; no second smtp inet line.
    assert len(re.findall(r"^\S+\s+inet\s", after, re.M)) == 1
    r = p.postern("upgrade-configuration")
    assert r.returncode == 0 and "adding" not in r.stderr, h.describe(r)
    assert p.master_cf.read_text() == after
    assert p.postern("check").returncode == 0


def test_logrotate_rotates_maillog_file(make_postern):
    p = make_postern()
    with p.smtp() as s:
        s.ehlo("before.example")
    p.wait_for_log(r"disconnect from ")
    before = p.log_text()
    st = os.stat(p.maillog)
    r = p.postern("logrotate")
    assert r.returncode == 0, h.describe(r)
    rotated = [f for f in os.listdir(p.dir) if re.fullmatch(r"maillog\.\d{8}-\d{6}\.gz", f)]
    assert len(rotated) == 1, os.listdir(p.dir)
    old = gzip.decompress((p.dir / rotated[0]).read_bytes()).decode(errors="replace")
    assert old.startswith(before)
    # A new file with the old one's owner and mode, written by every
    # process from now on: master (it reloaded) and a new smtpd.
    new = os.stat(p.maillog)
    assert (new.st_uid, new.st_gid, stat.S_IMODE(new.st_mode)) == (
        st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode))
    p.wait_for_log(r"master\[\d+\]: reload ", what="master's reload line in the new file")
    h.wait_for(lambda: h.smtp_banner_ok(p.port), 10)
    with p.smtp() as s:
        s.ehlo("after.example")
    p.wait_for_log(r"smtpd\[\d+\]: disconnect from ")
    # Nothing of before the rotation is in the new file.
    assert not set(before.splitlines()) & set(p.log_text().splitlines())


def test_logrotate_refusals(make_postern):
    p = make_postern(start=False, params={"maillog_file_compressor": ""})
    r = p.postern("logrotate")
    assert r.returncode == 1, h.describe(r)
    assert r.stderr.strip() == ("postern: fatal: empty 'maillog_file_compressor' parameter "
                                "value - logfile rotation failed"), r.stderr
    p.set_params(maillog_file_compressor="gzip", maillog_file="/dev/stdout")
    r = p.postern("logrotate")
    assert r.returncode == 1 and "not rotating '/dev/stdout'" in r.stderr, h.describe(r)
    r = p.postern("frobnicate")
    assert r.returncode == 64 and "unknown command: 'frobnicate'" in r.stderr, h.describe(r)


# --------------------------------------------------------------------------
# postlog

LINE = re.compile(r"^(?:[A-Z][a-z]{2} [ 0-9]\d \d\d:\d\d:\d\d) (\S+) (.+?)\[(\d+)\]: (.*)$")


def postfix_postlog(tmp_path, *args, input=None):
    """Postfix's postlog, writing its lines to stdout (maillog_file =
    /dev/stdout); returns them as (tag, text)."""
    conf = tmp_path / "pfconf"
    conf.mkdir(exist_ok=True)
    (conf / "main.cf").write_text("compatibility_level = 3.6\nmaillog_file = /dev/stdout\n")
    (conf / "master.cf").write_text("")
    # A pipe: Postfix's postlog opens /dev/stdout again, which fails for
    # the deleted temporary file h.run would give it.
    r = subprocess.run(["/usr/sbin/postlog", "-c", str(conf), *args], input=input,
                       stdin=None if input is not None else subprocess.DEVNULL,
                       capture_output=True, timeout=30)
    r.stdout = r.stdout.decode(errors="replace")
    r.stderr = r.stderr.decode(errors="replace")
    return r, [LINE.match(l).group(2, 4) for l in r.stdout.splitlines() if LINE.match(l)]


def postern_postlog(p, *args, input=None):
    start = len(p.log_text())
    r = tool(p, "postlog", *args, input=input)
    new = p.log_text()[start:]
    return r, [LINE.match(l).group(2, 4) for l in new.splitlines() if LINE.match(l)]


@pytest.mark.parametrize("args,stdin", [
    (["-t", "mytag", "-p", "warn", "hello", "world"], None),
    (["-t", "cron/backup", "-p", "error", "disk", "full"], None),
    (["-t", "s", "-p", "info", "plain"], None),
    (["-t", "s"], b"line one\n\nline three\n"),
    (["-p", "warning", "default", "tag"], None),
    (["-t", "t", "-p", "fatal", "it", "broke"], None),
    (["-t", "t", "-p", "panic", "it", "broke"], None),
])
def test_postlog_writes_postfix_lines(make_postern, tmp_path, args, stdin):
    p = make_postern(start=False, params={"syslog_name": "postfix"})
    r, ours = postern_postlog(p, *args, input=stdin)
    assert r.returncode == 0, h.describe(r)
    assert ours, p.log_text()
    text = p.log_text().splitlines()[-1]
    assert LINE.match(text), text
    if not os.access("/usr/sbin/postlog", os.X_OK):
        pytest.skip("Postfix's postlog is not installed")
    pr, theirs = postfix_postlog(tmp_path, *args, input=stdin)
    assert pr.returncode == 0, h.describe(pr)
    assert ours == theirs


def test_postlog_bad_priority(make_postern):
    p = make_postern(start=False)
    r = tool(p, "postlog", "-p", "bogus", "x")
    assert r.returncode == 1, h.describe(r)
    assert r.stderr.strip() == "postlog: fatal: unknown priority value: bogus"
    r = tool(p, "postlog", "-x")
    assert r.returncode == 64 and "invalid option -- 'x'" in r.stderr, h.describe(r)


def test_postlog_through_syslog_name(make_postern):
    p = make_postern(start=False, params={"syslog_name": "postern-test"})
    r = tool(p, "postlog", "a", "note")
    assert r.returncode == 0, h.describe(r)
    assert re.search(r" postern-test/postlog\[\d+\]: a note$", p.log_text(), re.M), p.log_text()


# --------------------------------------------------------------------------
# postkick


def test_postkick_wakes_qmgr(make_postern, dead_port, monkeypatch):
    p = make_postern(params=dead_relay_params(dead_port))
    qid, tok = send_deferred(p, ["k@kick.test"])
    sink = start_sink_on(dead_port, monkeypatch)
    try:
        time.sleep(1)
        assert sink.count(tok) == 0
        # D: only what is due (nothing, the retry is an hour away).
        r = tool(p, "postkick", "public", "qmgr", "D")
        assert r.returncode == 0 and r.stderr == "", h.describe(r)
        time.sleep(2)
        assert sink.count(tok) == 0
        # F: everything deferred, now.
        r = tool(p, "postkick", "public", "qmgr", "F")
        assert r.returncode == 0 and r.stderr == "", h.describe(r)
        sink.wait_for(tok, timeout=15)
    finally:
        sink.stop()


def test_postkick_wakes_pickup(make_postern):
    # pickup reads maildrop/ every 60 s; a file dropped there by hand
    # (as a crashed sendmail would leave) goes at once when kicked.
    p = make_postern()
    token = new_token()
    hold_dir = p.dir / "stash"
    hold_dir.mkdir()
    # sendmail wakes pickup itself: write with pickup's socket hidden.
    sock = p.queue / "public" / "pickup"
    hidden = p.queue / "public" / "pickup.hidden"
    os.rename(sock, hidden)
    try:
        r = p.sendmail(["-i", f"ptnobody-{token}@postern.test"],
                       f"Subject: {token}\n\nx\n".encode())
        assert r.returncode == 0, h.describe(r)
    finally:
        os.rename(hidden, sock)
    assert len(os.listdir(p.queue / "maildrop")) == 1
    r = tool(p, "postkick", "public", "pickup", "W")
    assert r.returncode == 0, h.describe(r)
    wait_for(lambda: os.listdir(p.queue / "maildrop") == [], 10, what="pickup to take the file")


def test_postkick_errors(make_postern):
    p = make_postern(start=False)
    assert p.postern("check").returncode == 0
    r = tool(p, "postkick", "public", "qmgr", "I")
    assert r.returncode == 69, h.describe(r)
    assert r.stderr.strip() == ("postkick: fatal: Cannot contact class public service qmgr "
                                "- perhaps the mail system is down"), r.stderr
    r = tool(p, "postkick", "public", "qmgr")
    assert r.returncode == 64 and "usage: postkick" in r.stderr, h.describe(r)
    r = tool(p, "postkick", "secret", "qmgr", "I")
    assert r.returncode == 64 and "unknown class" in r.stderr, h.describe(r)


# --------------------------------------------------------------------------
# qshape

# Recipients chosen so that no two rows tie on both count and length
# (Postfix's qshape leaves such ties in Perl's random hash order).
MESSAGES = [
    (SENDER, [f"u{i}@one.example.com" for i in range(5)]),
    (SENDER, [f"v{i}@two.example.com" for i in range(3)] + [f"w{i}@z.test" for i in range(4)]),
    (SENDER, ["a@x.sub.example.net", "b@X.Sub.Example.NET"]),
    ("", ["c@y.sub.example.net"]),
]

OPTIONS = [
    [], ["-s"], ["-p"], ["-p", "-m", "2"], ["-b", "4"], ["-l", "-b", "5", "-t", "30"],
    ["-w", "120"], ["-w", "60"], ["-t", "10", "-b", "12"], ["-N", "1", "-n", "1"],
    ["-l", "-t", "2.5", "-b", "6"], ["-b", "1"],
    ["-s", "-p", "-m", "1"],
]


def deferred_files(root):
    n = 0
    for _r, _d, files in os.walk(root):
        n += sum(1 for f in files if re.fullmatch(r"[A-Za-z0-9]{6,}", f))
    return n


def fill_postfix(pf):
    for sender, rcpts in MESSAGES:
        with smtplib.SMTP("127.0.0.1", pf.port, timeout=30) as s:
            s.ehlo("client.example")
            code, text = h.smtp_transaction(s, sender, rcpts, h.crlf(message(new_token())))
            assert code == 250, text
    wait_for(lambda: deferred_files(pf.queue / "deferred") == len(MESSAGES), 60,
             what="the Postfix messages deferred")


def fill_postern(p):
    for sender, rcpts in MESSAGES:
        code, text = p.send(sender, rcpts, message(new_token()))
        assert code == 250, text
    wait_for(lambda: len(ids_in(p, "deferred")) == len(MESSAGES), 60,
             what="the Postern messages deferred")


def test_qshape_report_matches_postfix(make_postern, postfix_peer, dead_port):
    if not os.access("/usr/sbin/qshape", os.X_OK):
        pytest.skip("Postfix's qshape is not installed")
    pf = postfix_peer(params={"relayhost": f"[127.0.0.1]:{dead_port}",
                              "minimal_backoff_time": "1h", "maximal_backoff_time": "1h",
                              "queue_run_delay": "1h"})
    p = make_postern(params=dead_relay_params(dead_port))
    fill_postfix(pf)
    fill_postern(p)
    for opts in OPTIONS:
        theirs = h.run(["/usr/sbin/qshape", *opts, str(pf.queue / "deferred")], timeout=60)
        ours = tool(p, "qshape", *opts, "deferred")
        assert theirs.returncode == 0, h.describe(theirs)
        assert ours.returncode == 0, h.describe(ours)
        assert ours.stdout == theirs.stdout, (
            f"qshape {' '.join(opts)}:\n--- Postfix\n{theirs.stdout}--- Postern\n{ours.stdout}")
    # Absolute queue paths, several queues, and the default (incoming and
    # active, empty here): still Postfix's report.
    theirs = h.run(["/usr/sbin/qshape", str(pf.queue / "incoming"), str(pf.queue / "deferred")])
    ours = tool(p, "qshape", str(p.queue / "incoming"), str(p.queue / "deferred"))
    assert ours.stdout == theirs.stdout
    theirs = h.run(["/usr/sbin/qshape", str(pf.queue / "incoming"), str(pf.queue / "active")])
    ours = tool(p, "qshape")
    assert ours.stdout == theirs.stdout
    assert "TOTAL  0" in ours.stdout


def test_qshape_ages(make_postern, dead_port):
    # Ages come from the arrival time: with one-second-ish buckets
    # (-t 0.02 minutes) messages minutes apart in age land in different
    # columns; -l makes the buckets linear.
    p = make_postern(params=dead_relay_params(dead_port))
    send_deferred(p, ["a@old.test"])
    time.sleep(8)
    send_deferred(p, ["b@new.test"])
    r = tool(p, "qshape", "-t", "0.02", "-b", "8", "deferred")
    assert r.returncode == 0, h.describe(r)
    rows = {line.split()[0]: line.split()[1:] for line in r.stdout.splitlines()[1:]}
    heads = r.stdout.splitlines()[0].split()
    assert heads == ["T", "0.02", "0.04", "0.08", "0.16", "0.32", "0.64", "1.28", "1.28+"]
    old = [int(x) for x in rows["old.test"]]
    new = [int(x) for x in rows["new.test"]]
    assert old[0] == new[0] == 1
    assert old.index(1, 1) > new.index(1, 1), r.stdout
    r = tool(p, "qshape", "-l", "-t", "0.02", "-b", "4", "deferred")
    assert r.stdout.splitlines()[0].split() == ["T", "0.02", "0.04", "0.06", "0.06+"]


def test_qshape_batches_on_a_terminal(make_postern, dead_port):
    p = make_postern(params=dead_relay_params(dead_port))
    for d in ("a.test", "bb.test", "ccc.test"):
        send_deferred(p, [f"x@{d}"])
    master, slave = pty.openpty()
    proc = subprocess.Popen([str(p.cmd("qshape")), "-c", str(p.etc), "-N", "1", "-n", "2",
                             "deferred"], stdout=slave, stderr=subprocess.PIPE,
                            stdin=subprocess.DEVNULL, env=p.env())
    os.close(slave)
    out = b""
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        ready, _, _ = select.select([master], [], [], 1)
        if ready:
            try:
                chunk = os.read(master, 65536)
            except OSError:
                break
            if not chunk:
                break
            out += chunk
        elif proc.poll() is not None:
            break
    proc.wait(10)
    os.close(master)
    text = out.decode().replace("\r\n", "\n")
    reports = [r for r in text.split("\x1b[H\x1b[2J\x1b[3J") if r.strip()]
    # One report after each message, one at the end.
    assert len(reports) == 4, text
    for rep in reports:
        lines = rep.strip("\n").splitlines()
        assert lines[0].split()[0] == "T"
        assert len(lines) <= 3, rep  # the heading and at most 2 rows
        assert lines[1].split()[0] == "TOTAL"
    assert reports[-1].splitlines()[1].split()[1] == "3"


# --------------------------------------------------------------------------
# sendmail without a set-gid postdrop


def test_sendmail_without_setgid_postdrop_names_the_cause(make_postern, local_users):
    p = make_postern(start=False)
    assert p.postern("check").returncode == 0
    bindir = p.dir / "bin"
    bindir.mkdir(mode=0o755)
    postdrop = bindir / "postdrop"
    shutil.copyfile(p.cmd("postdrop"), postdrop)
    os.chmod(postdrop, 0o755)  # as a copy without its set-gid bit
    p.set_params(command_directory=str(bindir))
    r = p.sendmail(["ptalice@postern.test"], b"Subject: x\n\nx\n", user="ptbob", setgid=False)
    assert r.returncode == 77, h.describe(r)
    assert r.stderr.strip().splitlines() == [
        f"sendmail: fatal: {postdrop} is not set-gid postdrop: it cannot create a file in "
        f"{p.queue}/maildrop; as root, run \"postern set-permissions\""], r.stderr
    assert "queue file write error" not in r.stderr
    assert os.listdir(p.queue / "maildrop") == []
    # The advice works.
    r = p.postern("set-permissions")
    assert r.returncode == 0, h.describe(r)
    if not p.setgid_possible():
        return
    p.start()
    token = new_token()
    r = p.sendmail(["ptalice@postern.test"], f"Subject: {token}\n\nx\n".encode(),
                   user="ptbob", setgid=False)
    assert r.returncode == 0, h.describe(r)
    h.wait_for_messages("ptalice", token)
