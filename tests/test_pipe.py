"""pipe(8): master.cf pipe services reached through transport_maps.

Dovecot's LDA (dovecot-lda from dovecot-core) as a virtual user, scripts
that exit 75 (deferred, mailq shows it) and 67 (bounced, the command's
output in the notice), the flags (D R F O . > B h u), the macros
(${sender} ${recipient} ${user} ${extension} ... ${client_*} ${size}),
several recipients per command, the time limit, user=root refused, and
error/discard transports under names of their own.
"""

import os
import re
import shutil
import stat
import tempfile
import time
import uuid
from pathlib import Path

import pytest

import postern_harness as h
from dovecot import dovecot  # noqa: F401  (the fixture)
from postern_harness import wait_for

LDA = next((p for p in ("/usr/lib/dovecot/dovecot-lda", "/usr/lib/dovecot/deliver",
                        "/usr/libexec/dovecot/dovecot-lda") if os.access(p, os.X_OK)), None)
VMAIL = "vmail"


def new_token():
    return "pt" + uuid.uuid4().hex[:16]


@pytest.fixture(scope="module")
def vmail():
    """The vmail account a pipe service runs commands as."""
    if not h.is_root():
        pytest.skip("needs root (pipe switches to user=)")
    return h.ensure_system_user(VMAIL)


@pytest.fixture
def scratch(vmail):
    """A directory the stand-in scripts write to (as vmail) and live in."""
    d = Path(tempfile.mkdtemp(prefix="pt-pipe-"))
    os.chmod(d, 0o1777)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def script(scratch, name, body):
    path = scratch / name
    path.write_text("#!/bin/sh\n" + body)
    os.chmod(path, 0o755)
    return path


CAPTURE = """\
out={dir}/$(date +%s%N)-$$
printf '%s\\n' "$@" > "$out.argv.tmp"
id -u > "$out.uid"
cat > "$out.msg"
mv "$out.argv.tmp" "$out.argv"
"""


def captures(scratch):
    """[(argv list, message bytes, uid)] of every finished capture run."""
    out = []
    for a in sorted(scratch.glob("*.argv")):
        base = str(a)[:-len(".argv")]
        out.append((a.read_text().split("\n")[:-1], Path(base + ".msg").read_bytes(),
                    int(Path(base + ".uid").read_text())))
    return out


def mailq(p):
    r = h.run([p.cmd("postqueue"), "-c", p.etc, "-p"], env=p.env())
    return r.stdout if isinstance(r.stdout, str) else r.stdout.decode()


def transport(p, lines):
    p.write_file("etc/transport", "".join(f"{k} {v}\n" for k, v in lines.items()))


def pipe_postern(make_postern, services, routes, params=None):
    files = {"etc/transport": "".join(f"{k} {v}\n" for k, v in routes.items())}
    all_params = {"transport_maps": lambda p: f"texthash:{p.etc}/transport",
                  "recipient_delimiter": "+"}
    all_params.update(params or {})
    return make_postern(params=all_params, files=files, master_cf_extra=services)


def queue_id(text):
    return re.search(r"queued as ([0-9A-F]+)", text).group(1)


def test_dovecot_lda_as_virtual_user(make_postern, dovecot, vmail, scratch):  # noqa: F811
    if LDA is None:
        pytest.skip("dovecot-lda is not installed (dovecot-core)")
    d = dovecot(users={"alice@lda.test": "pw"}, mail_user=VMAIL)
    # The LDA, running as vmail, logs where the running Dovecot does.
    os.chmod(d.log_path, 0o666)
    p = pipe_postern(make_postern, [
        "dovecot   unix  -       n       n       -       -       pipe",
        f"  flags=DRhu user={VMAIL}:{VMAIL} argv={LDA} -c {d.conf_path} -f ${{sender}} -d ${{recipient}}",
    ], {"lda.test": "dovecot:"}, params={"dovecot_destination_recipient_limit": "1"})
    token = new_token()
    code, text = p.send("sender@remote.example", ["Alice@LDA.Test"],
                        f"Subject: {token}\n\nhello {token}\n")
    assert code == 250, text
    (path, raw), = d.wait_for_messages("alice@lda.test", token)
    assert path.stat().st_uid == vmail.pw_uid, "the LDA wrote as the user= account"
    assert b"Delivered-To: alice@lda.test" in raw, raw[:400]
    assert b"Return-Path: <sender@remote.example>" in raw, raw[:400]
    p.wait_for_log(r"to=<Alice@LDA\.Test>.*relay=dovecot.*status=sent \(delivered via dovecot service\)")
    wait_for(lambda: "Mail queue is empty" in mailq(p), 20, what="an empty queue")


def test_exit_75_defers_and_67_bounces_with_output(make_postern, local_users, scratch):
    tempfail = script(scratch, "tempfail", 'echo "mailbox $1 is busy, try later"\nexit 75\n')
    nouser = script(scratch, "nouser", 'echo "no mailbox for $1 here"\nexit 67\n')
    p = pipe_postern(make_postern, [
        "tf unix - n n - - pipe",
        f"  user={VMAIL} argv={tempfail} ${{recipient}}",
        "nu unix - n n - - pipe",
        f"  user={VMAIL} argv={nouser} ${{recipient}}",
    ], {"tempfail.test": "tf:", "nouser.test": "nu:"})
    sender = f"ptalice@{h.MYHOSTNAME}"
    tok1 = new_token()
    code, text = p.send(sender, [f"{tok1}@tempfail.test"], f"Subject: {tok1}\n\nbody\n")
    assert code == 250, text
    qid = queue_id(text)
    p.wait_for_log(rf"{qid}: to=<{tok1}@tempfail\.test>.*relay=tf.*dsn=4\.3\.0, status=deferred "
                   rf"\(temporary failure\. Command output: mailbox {tok1}@tempfail\.test is busy")
    wait_for(lambda: qid in mailq(p) and "is busy" in mailq(p), 20, what="mailq showing the deferral")
    tok2 = new_token()
    code, text = p.send(sender, [f"{tok2}@nouser.test"], f"Subject: {tok2}\n\nbody\n")
    assert code == 250, text
    p.wait_for_log(rf"to=<{tok2}@nouser\.test>.*dsn=5\.1\.1, status=bounced")
    notice = h.wait_for_messages("ptalice", f"no mailbox for {tok2}@nouser.test here")
    assert notice, "the bounce notice carries the command's output"


def test_flags_macros_and_client_attributes(make_postern, vmail, scratch):
    capture = script(scratch, "capture", CAPTURE.format(dir=scratch))
    argv = ("${sender} ${recipient} ${user} ${extension} ${domain} ${nexthop} ${mailbox} "
            "${original_recipient} ${client_address} ${client_hostname} ${client_helo} "
            "${client_port} ${client_protocol} ${queue_id} ${size} {${sasl_username:none}}")
    p = pipe_postern(make_postern, [
        "capture unix - n n - - pipe",
        f"  flags=FDROhu.> user={VMAIL} argv={capture} {argv}",
        "raw unix - n n - - pipe",
        f"  flags=B user={VMAIL} eol=\\r\\n argv={capture} ${{recipient}} ${{user}}",
    ], {"flags.test": "capture:", "raw.test": "raw:"},
        params={"capture_destination_recipient_limit": "1"})
    token = new_token()
    body = f"Subject: {token}\n\n.leading dot\nFrom the start\nend\n"
    code, text = p.send("Sender@Remote.Example", ["Bob+Ext@Flags.TEST"], body)
    assert code == 250, text
    qid = queue_id(text)
    got = wait_for(lambda: captures(scratch), 30, what="the capture script's run")
    (args, msg, uid), = got
    assert uid == vmail.pw_uid
    assert args[:8] == ["sender@remote.example", "bob+ext@flags.test", "bob", "ext", "flags.test",
                        "flags.test", "bob+ext", "bob+ext@flags.test"], args
    assert args[8] == "127.0.0.1" and args[10] == "client.example", args
    assert args[11].isdigit() and args[12] == "ESMTP" and args[13] == qid, args
    assert int(args[14]) > len(body) and args[15] == "none", args
    lines = msg.split(b"\n")
    assert re.match(rb"From Sender@Remote\.Example  \w{3} \w{3} [ \d]\d \d\d:\d\d:\d\d \d{4}$", lines[0]), lines[0]
    assert lines[1] == b"Return-Path: <Sender@Remote.Example>", lines[:5]
    assert lines[2].lower() == b"x-original-to: bob+ext@flags.test", lines[:5]
    assert lines[3].lower() == b"delivered-to: bob+ext@flags.test", lines[:5]
    assert b"\n..leading dot\n>From the start\nend\n" in msg, msg
    assert not msg.endswith(b"\n\n")
    # eol= and B: CRLF line ends and a blank line at the end.
    code, text = p.send("s@remote.example", ["Carol@raw.test"], f"Subject: {token}\n\nx\n")
    assert code == 250, text
    got = wait_for(lambda: (lambda c: c if len(c) == 2 else None)(captures(scratch)), 30)
    args, msg, _ = [c for c in got if c[0][0] == "Carol@raw.test"][0]
    assert args == ["Carol@raw.test", "Carol"], args
    assert msg.endswith(b"\r\nx\r\n\r\n") and b"\n" not in msg.replace(b"\r\n", b""), msg


def test_sasl_macros_of_an_authenticated_client(make_postern, dovecot, vmail, scratch):  # noqa: F811
    # ${sasl_method}, ${sasl_username} from AUTH through Dovecot, and
    # ${sasl_sender} from MAIL FROM's AUTH= (xtext-decoded), as Postfix's
    # smtpd records them for an authenticated client.
    d = dovecot(users={"alice@auth.test": "pw"})
    capture = script(scratch, "capture", CAPTURE.format(dir=scratch))
    p = pipe_postern(make_postern, [
        "capture unix - n n - - pipe",
        f"  user={VMAIL} argv={capture} ${{sasl_method}} ${{sasl_username}} ${{sasl_sender}}",
    ], {"sasl.test": "capture:"}, params={
        "smtpd_sasl_auth_enable": "yes",
        "smtpd_sasl_type": "dovecot",
        "smtpd_sasl_path": str(d.auth_socket),
    })
    with p.smtp() as s:
        s.ehlo("client.example")
        s.login("alice@auth.test", "pw")
        assert s.mail("alice@auth.test", ["AUTH=owner+2Bx@auth.test"])[0] == 250
        assert s.rcpt("bob@sasl.test")[0] == 250
        assert s.data(b"Subject: sasl\r\n\r\nx\r\n")[0] == 250
    got = wait_for(lambda: captures(scratch), 30, what="the capture script's run")
    (args, _, _), = got
    assert args == ["PLAIN", "alice@auth.test", "owner+x@auth.test"], args


def test_several_recipients_per_command(make_postern, vmail, scratch):
    capture = script(scratch, "capture", CAPTURE.format(dir=scratch))
    p = pipe_postern(make_postern, [
        "multi unix - n n - - pipe",
        f"  user={VMAIL} argv={capture} -f ${{sender}} -- ${{recipient}}",
    ], {"multi.test": "multi:"}, params={"multi_destination_recipient_limit": "10"})
    rcpts = [f"r{i}@multi.test" for i in range(3)]
    code, text = p.send("s@remote.example", rcpts, "Subject: several\n\nx\n")
    assert code == 250, text
    got = wait_for(lambda: captures(scratch), 30, what="the capture script's run")
    time.sleep(1)
    got = captures(scratch)
    assert len(got) == 1, got
    args = got[0][0]
    assert args[:3] == ["-f", "s@remote.example", "--"] and sorted(args[3:]) == rcpts, args
    for r in rcpts:
        p.wait_for_log(rf"to=<{r}>.*relay=multi.*status=sent")


def test_time_limit_kills_the_command(make_postern, vmail, scratch):
    slow = script(scratch, "slow", "echo started\nsleep 60\n")
    p = pipe_postern(make_postern, [
        "slow unix - n n - - pipe",
        f"  user={VMAIL} argv={slow}",
    ], {"slow.test": "slow:"}, params={"slow_time_limit": "2s"})
    start = time.monotonic()
    code, text = p.send("s@remote.example", ["x@slow.test"], "Subject: slow\n\nx\n")
    assert code == 250, text
    # Postfix's pipe(8) bounces a command that runs out of time (5.3.0).
    p.wait_for_log(r"to=<x@slow\.test>.*dsn=5\.3\.0, status=bounced \(Command time limit exceeded",
                   timeout=30)
    assert time.monotonic() - start < 25
    assert "unused parameter" not in p.log_text()


def test_user_root_and_mail_owner_refused(make_postern, vmail, scratch):
    marker = scratch / "ran"
    cmd = script(scratch, "touch", f"touch {marker}\n")
    p = pipe_postern(make_postern, [
        "rootpipe unix - n n - - pipe",
        f"  user=root argv={cmd}",
        "ownerpipe unix - n n - - pipe",
        f"  user={h.MAIL_OWNER_WHEN_ROOT} argv={cmd}",
    ], {"root.test": "rootpipe:", "owner.test": "ownerpipe:"})
    code, text = p.send("s@remote.example", ["x@root.test"], "Subject: r\n\nx\n")
    assert code == 250, text
    p.wait_for_log(r"to=<x@root\.test>.*dsn=4\.3\.5, status=deferred \(mail system configuration "
                   r"error: user=root: user= specifies root privileges")
    code, text = p.send("s@remote.example", ["x@owner.test"], "Subject: o\n\nx\n")
    assert code == 250, text
    p.wait_for_log(r"to=<x@owner\.test>.*dsn=4\.3\.5, status=deferred .*mail system owner")
    assert not marker.exists(), "the command never ran"
    assert "mail system configuration error" in mailq(p)


def test_error_and_discard_under_other_names(make_postern, local_users):
    p = pipe_postern(make_postern, [
        "oops unix - - n - - error",
        "later unix - - n - - error",
        "retry unix - - n - - error",
        "bin unix - - n - - discard",
    ], {"oops.test": "oops:5.7.1 go away", "bin.test": "bin:", "retry.test": "retry:not now"})
    token = new_token()
    sender = f"ptalice@{h.MYHOSTNAME}"
    code, text = p.send(sender, [f"{token}@oops.test"], f"Subject: {token}\n\nx\n")
    assert code == 250, text
    p.wait_for_log(rf"to=<{token}@oops\.test>.*dsn=5\.7\.1, status=bounced \(go away\)")
    assert h.wait_for_messages("ptalice", token)
    code, text = p.send(sender, ["x@bin.test"], "Subject: d\n\nx\n")
    assert code == 250, text
    p.wait_for_log(r"to=<x@bin\.test>.*status=sent")
    # A recipient whose transport is named `retry` is refused for now at
    # RCPT, as Postfix's smtpd does (smtpd_reject_unlisted_recipient);
    # submitted locally, qmgr defers it.
    c = h.RawSmtp(p.port)
    try:
        c.reply()
        c.cmd("EHLO client.test")
        c.cmd(f"MAIL FROM:<{sender}>")
        reply = c.cmd("RCPT TO:<x@retry.test>")[-1]
        assert reply.startswith("450 4.1.1") and "not now" in reply, reply
        c.cmd("QUIT")
    finally:
        c.close()
    r = p.sendmail(["-f", sender, "x@retry.test"], b"Subject: d\n\nx\n")
    assert r.returncode == 0, h.describe(r)
    p.wait_for_log(r"to=<x@retry\.test>.*status=deferred \(not now\)")
