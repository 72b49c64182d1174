"""sendmail as programs and users run it: its flags (-bs, -bv, -N, -R, -V,
-q), its exit codes, and the way an unprivileged user's mail reaches the
queue through the set-gid postdrop without letting one user touch
another's queued mail.

Every test identifies its mail by a unique token in the Subject.
"""

import grp
import os
import pwd
import shutil
import subprocess
import uuid

import pytest

import postern_harness as h
from postern_harness import wait_for


def new_token():
    return "pt-" + uuid.uuid4().hex


def the_one(messages, what):
    assert len(messages) == 1, f"expected exactly one {what}, found {len(messages)}"
    return messages[0]


def install_postdrop(p, setgid=True):
    """DIR/bin/postdrop, installed as Postfix installs it (root:postdrop,
    mode 2755), and command_directory pointing there. Returns its path."""
    dest = p.dir / "bin" / "postdrop"
    dest.parent.mkdir(mode=0o755, exist_ok=True)
    shutil.copyfile(p.cmd("postdrop"), dest)
    os.chown(dest, 0, grp.getgrnam("postdrop").gr_gid)
    os.chmod(dest, 0o2755 if setgid else 0o755)
    p.set_params(command_directory=str(dest.parent))
    return dest


def plain_sendmail(p, args, data, user=None):
    """The sendmail binary as cargo built it (no set-gid bit)."""
    return p.sendmail(args, data, user=user, setgid=False)


def maildrop_files(p):
    return sorted(os.listdir(p.queue / "maildrop"))


# --------------------------------------------------------------------------
# Exit codes


def test_exit_codes_and_reasons(make_postern, tmp_path):
    p = make_postern(start=False, params={"message_size_limit": "2000"})
    assert p.postern("check").returncode == 0

    def one_line_reason(r, code, words):
        assert r.returncode == code, h.describe(r)
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("sendmail: fatal: "), r.stderr
        assert words in lines[0], r.stderr

    one_line_reason(p.sendmail([], b"x\n"), 64, "no recipients")
    one_line_reason(p.sendmail(["-N", "sometimes", "a@b.test"], b"x\n"), 64, "-N")
    one_line_reason(p.sendmail(["-R", "most", "a@b.test"], b"x\n"), 64, "-R")
    one_line_reason(p.sendmail(["-B", "9BIT", "a@b.test"], b"x\n"), 64, "-B")
    one_line_reason(p.sendmail(["a@b.test"], b"Subject: big\n\n" + b"x" * 5000 + b"\n"),
                    65, "too big")
    # Unreadable input: standard input is a directory.
    fd = os.open(tmp_path, os.O_RDONLY)
    try:
        r = subprocess.run([str(p.cmd("sendmail")), "-C", str(p.etc), "a@b.test"],
                           stdin=fd, capture_output=True, text=True, timeout=60,
                           env=p.env())
    finally:
        os.close(fd)
    one_line_reason(r, 74, "standard input")
    assert maildrop_files(p) == [], "a failed submission left a maildrop file"
    # The queue cannot be written.
    p.set_params(queue_directory=str(p.dir / "no-such-queue"))
    one_line_reason(p.sendmail(["a@b.test"], b"x\n"), 75, "queue file write error")


# --------------------------------------------------------------------------
# -bs: SMTP on standard input and output


def smtp_script(*lines):
    return "".join(line + "\r\n" for line in lines).encode()


@pytest.mark.parametrize("as_user", [None, "ptbob"], ids=["root", "unprivileged-user"])
def test_bs_session_delivers(make_postern, local_users, as_user):
    p = make_postern()
    if as_user:
        if not p.setgid_possible():
            pytest.skip("set-gid programs cannot run here (nosuid)")
        install_postdrop(p)
    token = new_token()
    script = smtp_script(
        "EHLO client.test",
        "MAIL FROM:<ptbob@postern.test> RET=HDRS ENVID=env+2B1",
        "RCPT TO:<ptalice@postern.test> NOTIFY=FAILURE ORCPT=rfc822;ptalice@postern.test",
        "DATA",
        "From: Bob <ptbob@postern.test>",
        "To: ptalice@postern.test",
        f"Subject: {token}",
        "",
        "..a line that starts with a dot",
        "body",
        ".",
        "QUIT",
    )
    r = plain_sendmail(p, ["-bs"], script, user=as_user)
    assert r.returncode == 0, h.describe(r)
    codes = [line[:3] for line in r.stdout.splitlines() if line[3:4] == " "]
    assert codes == ["220", "250", "250", "250", "354", "250", "221"], r.stdout
    assert "\r\n250 DSN\r\n" in r.stdout, r.stdout
    _path, raw = the_one(h.wait_for_messages("ptalice", token), "copy for ptalice")
    head, body = h.split_message(raw)
    assert body == b".a line that starts with a dot\nbody\n", body
    assert h.header_values(raw, "Return-Path") == ["<ptbob@postern.test>"]
    assert h.header_values(raw, "From") == ["Bob <ptbob@postern.test>"]
    assert h.header_values(raw, "Delivered-To") == ["ptalice@postern.test"]
    assert len(h.header_values(raw, "Message-Id")) == 1


def test_bs_protocol_errors(make_postern):
    p = make_postern(start=False)
    assert p.postern("check").returncode == 0
    script = smtp_script(
        "HELO",
        "RCPT TO:<a@b.test>",
        "MAIL FROM:<a@b.test> FOO=1",
        "MAIL FROM:<a@b.test>",
        "MAIL FROM:<c@b.test>",
        "DATA",
        "RCPT TO:<x@b.test> NOTIFY=SOMETIMES",
        "RSET",
        "XYZZY",
        "QUIT",
    )
    r = p.sendmail(["-bs"], script)
    assert r.returncode == 0, h.describe(r)
    codes = [line[:3] for line in r.stdout.splitlines() if line[3:4] == " "]
    # An unknown command gets smtpd's (and Postfix's) 500.
    assert codes == ["220", "501", "503", "555", "250", "503", "554", "501", "250",
                     "500", "221"], r.stdout
    assert maildrop_files(p) == []


# --------------------------------------------------------------------------
# -bv, -q


def test_bv_reports_without_sending(make_postern, local_users):
    p = make_postern(start=False, params={
        "relayhost": "[192.0.2.1]:2525",
        "transport_maps": "inline:{special.test=error:no mail here}",
    })
    p.write_file("etc/aliases", "postmaster: root\nteam: ptalice, ptbob\n")
    p.newaliases()
    assert p.postern("check").returncode == 0
    r = p.sendmail(["-bv", "ptalice@postern.test", "team", "someone@example.org"], None)
    assert r.returncode == 0, h.describe(r)
    lines = r.stdout.splitlines()
    assert lines == [
        "<ptalice@postern.test>: deliverable: local mailbox of ptalice",
        "<team@postern.test>: deliverable: local alias: ptalice, ptbob",
        "<someone@example.org>: deliverable: via smtp to [192.0.2.1]:2525",
    ], r.stdout
    r = p.sendmail(["-bv", "nobody-here@postern.test", "x@special.test"], None)
    assert r.returncode == 67, h.describe(r)
    assert r.stdout.splitlines() == [
        '<nobody-here@postern.test>: undeliverable: unknown user: "nobody-here"',
        "<x@special.test>: undeliverable: no mail here",
    ]
    assert maildrop_files(p) == [], "-bv must not queue anything"


def deferred_for_an_hour(make_postern, sink):
    """A message deferred (its relayhost refuses) with an hour to wait,
    and main.cf then pointed at the sink: (postern, the message's token)."""
    p = make_postern(params={"relayhost": f"[127.0.0.1]:{h.free_port()}",
                             "minimal_backoff_time": "1h", "maximal_backoff_time": "1h"})
    token = new_token()
    r = p.sendmail(["-i", "user@example.org"], f"Subject: {token}\n\nx\n".encode())
    assert r.returncode == 0, h.describe(r)
    wait_for(lambda: p.queue_files("deferred"), 30, what="the message deferred")
    p.set_params(relayhost=f"[127.0.0.1]:{sink.port}")
    return p, token


def test_q_flushes_deferred_mail(make_postern, sink):
    p, token = deferred_for_an_hour(make_postern, sink)
    assert p.postern("reload").returncode == 0
    r = p.sendmail(["-q"], None)
    assert r.returncode == 0, h.describe(r)
    sink.wait_for(token, timeout=30)


def test_a_flush_just_before_a_reload_is_not_lost(make_postern, sink):
    """`postqueue -f` and `postern reload` in a row: the flush reaches the
    old qmgr, which either acts on it with the old relayhost or not at
    all before it drains; it passes the flush on to the new qmgr, which
    sends the deferred mail to the new relayhost."""
    p, token = deferred_for_an_hour(make_postern, sink)
    r = h.run([p.cmd("postqueue"), "-c", p.etc, "-f"], env=p.env())
    assert r.returncode == 0, h.describe(r)
    assert p.postern("reload").returncode == 0
    sink.wait_for(token, timeout=30)


# --------------------------------------------------------------------------
# DSN flags: -N, -R, -V


def test_dsn_notify_never_suppresses_the_bounce(make_postern, local_users):
    p = make_postern()
    quiet, loud = new_token(), new_token()
    for token, extra in ((quiet, ["-N", "never"]), (loud, [])):
        r = p.sendmail(["-i", "-f", "ptalice@postern.test", *extra,
                        "no-such-user@postern.test"],
                       f"Subject: {token}\n\nx\n".encode())
        assert r.returncode == 0, h.describe(r)
    # The bounce for the second message arrives; the first makes none.
    h.wait_for_messages("ptalice", loud, timeout=30)
    p.wait_for_log(r"to=<no-such-user@postern\.test>.*status=bounced", what="bounces")
    wait_for(lambda: len(p.log_findall(r"status=bounced")) >= 2, 30, what="both bounced")
    wait_for(lambda: not any(p.queue_files(q) for q in ("incoming", "active", "deferred")),
             30, what="an empty queue")
    assert h.find_messages("ptalice", quiet) == [], "-N never still produced a bounce"


def test_dsn_ret_and_envid_are_stored(make_postern):
    p = make_postern(params={"relayhost": f"[127.0.0.1]:{h.free_port()}",
                             "minimal_backoff_time": "1h", "maximal_backoff_time": "1h"})
    r = p.sendmail(["-i", "-R", "hdrs", "-V", "envid-42", "-N", "success,delay",
                    "user@example.org"], b"Subject: dsn\n\nx\n")
    assert r.returncode == 0, h.describe(r)
    files = wait_for(lambda: p.queue_files("deferred"), 30, what="the message deferred")
    data = (p.queue / "deferred" / files[0]).read_bytes()
    assert b"ret=HDRS" in data and b"envid=envid-42" in data
    # The recipient record: address NUL original NUL notify NUL orcpt.
    assert b"user@example.org\x00\x005\x00" in data


# --------------------------------------------------------------------------
# postdrop: an unprivileged user's way into the queue


def test_unprivileged_user_submits_through_postdrop(make_postern, local_users):
    p = make_postern()
    if not p.setgid_possible():
        pytest.skip("set-gid programs cannot run here (nosuid)")
    install_postdrop(p)
    token = new_token()
    data = f"To: ptalice@postern.test\nSubject: {token}\n\ncron output\n".encode()
    r = plain_sendmail(p, ["-t", "-i"], data, user="ptbob")
    assert r.returncode == 0, h.describe(r)
    _path, raw = the_one(h.wait_for_messages("ptalice", token), "copy for ptalice")
    assert h.header_values(raw, "Return-Path") == ["<ptbob@postern.test>"]
    assert h.header_values(raw, "From") == ["ptbob@postern.test"]
    p.wait_for_log(r"uid=\d+ from=<ptbob")
    uid = pwd.getpwnam("ptbob").pw_uid
    assert p.log_search(rf"uid={uid} from=<ptbob"), p.log_tail()


def test_without_setgid_postdrop_the_user_is_told(make_postern, local_users):
    p = make_postern(start=False)
    assert p.postern("check").returncode == 0
    install_postdrop(p, setgid=False)
    r = plain_sendmail(p, ["ptalice@postern.test"], b"Subject: x\n\nx\n", user="ptbob")
    assert r.returncode == 77, h.describe(r)
    assert "is not set-gid postdrop" in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert r.stderr.startswith("sendmail: fatal: "), r.stderr
    assert maildrop_files(p) == []


def test_postdrop_refuses_a_users_own_configuration(make_postern, local_users):
    p = make_postern(start=False)
    if not p.setgid_possible():
        pytest.skip("set-gid programs cannot run here (nosuid)")
    assert p.postern("check").returncode == 0
    postdrop = install_postdrop(p)
    # ptbob's own main.cf pointing at the real queue: not trusted.
    own = p.dir / "bobconf"
    own.mkdir()
    (own / "main.cf").write_text(p.main_cf.read_text())
    bob = pwd.getpwnam("ptbob")
    os.chown(own, bob.pw_uid, bob.pw_gid)
    os.chown(own / "main.cf", bob.pw_uid, bob.pw_gid)
    r = h.run([postdrop, "-c", own], input=b"", user="ptbob")
    assert r.returncode == 77, h.describe(r)
    assert "unauthorized configuration directory" in r.stderr
    r = h.run([p.cmd("sendmail"), "-C", own, "ptalice@postern.test"],
              input=b"x\n", user="ptbob")
    assert r.returncode == 77, h.describe(r)
    assert r.stderr.strip().splitlines() == [
        f"sendmail: fatal: {own}: unauthorized configuration directory name: specify it "
        "in the alternate_config_directories parameter of /etc/postern/main.cf"], r.stderr
    assert maildrop_files(p) == []


def test_users_cannot_touch_each_others_queued_mail(make_postern, local_users):
    # Mail waits in maildrop (pickup is not running) and in deferred.
    p = make_postern(start=False, params={
        "relayhost": f"[127.0.0.1]:{h.free_port()}",
        "minimal_backoff_time": "1h", "maximal_backoff_time": "1h"})
    if not p.setgid_possible():
        pytest.skip("set-gid programs cannot run here (nosuid)")
    assert p.postern("check").returncode == 0
    install_postdrop(p)
    token = new_token()
    r = plain_sendmail(p, ["-i", "friend@example.org"],
                       f"Subject: {token}\n\nsecret\n".encode(), user="ptalice")
    assert r.returncode == 0, h.describe(r)
    [name] = maildrop_files(p)
    path = p.queue / "maildrop" / name
    st = os.stat(path)
    assert st.st_uid == pwd.getpwnam("ptalice").pw_uid
    for cmd in (["ls", p.queue / "maildrop"], ["cat", path], ["rm", "-f", path],
                ["mv", path, "/tmp/" + name],
                ["sh", "-c", f"echo forged > {path}"]):
        r = h.run(cmd, user="ptbob")
        assert r.returncode != 0, f"ptbob could run {cmd}: {h.describe(r)}"
        assert "Permission denied" in r.stderr, h.describe(r)
    assert token.encode() in path.read_bytes()
    # Once picked up and deferred, it is mail_owner's and private.
    p.start()
    files = wait_for(lambda: p.queue_files("deferred"), 30, what="the message deferred")
    deferred = p.queue / "deferred" / files[0]
    for cmd in (["cat", deferred], ["rm", "-f", deferred], ["ls", p.queue / "deferred"]):
        r = h.run(cmd, user="ptbob")
        assert r.returncode != 0, f"ptbob could run {cmd}: {h.describe(r)}"
    assert token.encode() in deferred.read_bytes()


# --------------------------------------------------------------------------
# postdrop treats its input as hostile


def _varint(n):
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _str(s):
    b = s.encode()
    return _varint(len(b)) + b


def _frame(body):
    return len(body).to_bytes(4, "little") + body


def drop_envelope(sender, recipients, attrs):
    """DropRecord::Envelope(Submission) as postcard, framed as ipc::send
    frames it. recipients: [(address, original, notify, orcpt)]."""
    body = _varint(0) + _str(sender) + _varint(len(recipients))
    for address, original, notify, orcpt in recipients:
        body += _str(address) + _str(original) + bytes([notify]) + _str(orcpt)
    body += _varint(len(attrs))
    for n, v in attrs:
        body += _str(n) + _str(v)
    return _frame(body)


def drop_content(data):
    return _frame(_varint(1) + _varint(len(data)) + data)


DROP_END = _frame(_varint(2))


def test_postdrop_checks_every_record(make_postern, local_users):
    p = make_postern(start=False)
    if not p.setgid_possible():
        pytest.skip("set-gid programs cannot run here (nosuid)")
    assert p.postern("check").returncode == 0
    postdrop = install_postdrop(p)
    rcpt = ("ptalice@postern.test", "", 0, "")

    def run(stream):
        return h.run([postdrop, "-c", p.etc], input=stream, user="ptbob")

    body = drop_content(b"Subject: x\n\nhello\n")
    # Forged attributes, rewritten or done-looking recipients, bad DSN bits.
    for env in (drop_envelope("ptbob", [rcpt], [("notification", "yes")]),
                drop_envelope("ptbob", [rcpt], [("submitter", "0")]),
                drop_envelope("ptbob", [("ptalice@postern.test", "root@x", 0, "")], []),
                drop_envelope("ptbob", [("ptalice@postern.test", "", 9, "")], []),
                drop_envelope("ptbob", [("bad\naddr@x", "", 0, "")], []),
                drop_envelope("pt\rbob", [rcpt], [])):
        r = run(env + body + DROP_END)
        assert r.returncode == 65, h.describe(r)
        assert r.stderr.startswith("postdrop: fatal: "), r.stderr
    # Garbage, and a stream cut before End: nothing is left behind.
    assert run(b"\x05\x00\x00\x00hello").returncode == 65
    r = run(drop_envelope("ptbob", [rcpt], []) + body)
    assert r.returncode == 65 and "ended early" in r.stderr, h.describe(r)
    assert maildrop_files(p) == []
    # A proper stream is accepted; the file belongs to ptbob, mode 0644.
    r = run(drop_envelope("ptbob", [rcpt], [("ret", "HDRS")]) + body + DROP_END)
    assert r.returncode == 0, h.describe(r)
    [name] = maildrop_files(p)
    st = os.stat(p.queue / "maildrop" / name)
    assert st.st_uid == pwd.getpwnam("ptbob").pw_uid
    assert st.st_mode & 0o7777 == 0o744  # 0644 plus the owner-execute "complete" bit
