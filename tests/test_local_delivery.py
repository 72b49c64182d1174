"""local(8) to depth: .forward files (as the user), recipient_delimiter
with .forward+ext, mailbox_command (procmail), aliases to a file, a pipe
and an :include: list, and loop detection by Delivered-To.

The homes of ptalice and ptbob are shared with other tests that may run at
the same time, so these tests never touch ~/.forward itself: they use
``~/.forward+EXT`` (recipient_delimiter) or a ``forward_path`` of their own,
and every message carries a unique token.
"""

import os
import pwd
import re
import shutil
import subprocess
import tempfile
import uuid
from pathlib import Path

import pytest

import postern_harness as h
from dovecot import dovecot  # noqa: F401  (the fixture)
from postern_harness import wait_for


def new_token():
    return "pt-" + uuid.uuid4().hex


def the_one(messages, what):
    assert len(messages) == 1, f"expected exactly one {what}, found {len(messages)}"
    return messages[0]


def user_file(user, rel, text):
    """Writes ~user/rel owned by the user, mode 0644."""
    pw = pwd.getpwnam(user)
    path = Path(pw.pw_dir) / rel
    path.write_text(text)
    os.chown(path, pw.pw_uid, pw.pw_gid)
    os.chmod(path, 0o644)
    return path


@pytest.fixture
def scratch():
    """A world-writable scratch directory (sticky), removed afterwards."""
    d = Path(tempfile.mkdtemp(prefix="pt-local-"))
    os.chmod(d, 0o1777)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def queue_while_stopped(p, rcpt, run, n):
    """Queues n messages for rcpt with sendmail while Postern (not yet
    started) is stopped, subjects RUN-0. to RUN-(n-1)., then starts it:
    a backlog that qmgr finds all at once."""
    assert p.postern("check").returncode == 0
    for i in range(n):
        r = p.sendmail(["-i", rcpt], f"Subject: {run}-{i}.\n\nx\n".encode())
        assert r.returncode == 0, h.describe(r)
    p.start()


def send(p, rcpt, token, sender="someone@example.org", extra_headers=""):
    data = h.crlf(f"From: {sender}\nTo: {rcpt}\n{extra_headers}Subject: {token}\n\nbody {token}\n")
    with p.smtp() as s:
        s.ehlo("client.test")
        code, text = h.smtp_transaction(s, sender, [rcpt], data)
    assert code == 250, text


def test_forward_ext_file_chain_and_pipe_as_the_user(make_postern, local_users, scratch):
    ext = "f" + uuid.uuid4().hex[:8]
    p = make_postern(params={"recipient_delimiter": "+"})
    out = scratch / "pipe-out"
    fwd = user_file("ptbob", f".forward+{ext}",
                    "# ptbob's list mail\n"
                    "ptalice@postern.test, \\ptbob\n"
                    f"\"|/bin/sh -c 'id -un > {out}.who; cat > {out}'\"\n")
    try:
        token = new_token()
        send(p, f"ptbob+{ext}@postern.test", token)
        _p, raw_a = the_one(h.wait_for_messages("ptalice", token), "copy for ptalice")
        _p, raw_b = the_one(h.wait_for_messages("ptbob", token), "copy for ptbob")
        wait_for(lambda: out.exists() and token.encode() in out.read_bytes(), 30,
                 what="the .forward command's output")
        # The command ran as ptbob, not as root or default_privs.
        assert (out.parent / (out.name + ".who")).read_text().strip() == "ptbob"
        assert out.stat().st_uid == pwd.getpwnam("ptbob").pw_uid
        assert h.header_values(raw_a, "Delivered-To") == ["ptalice@postern.test"]
        assert h.header_values(raw_b, "Delivered-To") == ["ptbob@postern.test"]
        assert h.header_values(raw_a, "Return-Path") == ["<someone@example.org>"]
        piped = out.read_bytes()
        assert piped.startswith(b"From someone@example.org "), piped[:80]
        p.wait_for_log(rf"to=<ptbob\+{ext}@postern\.test>.*status=sent")
        # One line per .forward member, as Postfix's local logs them.
        p.wait_for_log(rf"to=<ptalice@postern\.test>, orig_to=<ptbob\+{ext}@postern\.test>, "
                       r"relay=local, .*status=sent \(delivered to maildir\)")
        assert not p.log_search(r": <ptbob\+"), p.log_tail()
    finally:
        fwd.unlink()


def test_forward_path_and_a_forward_to_self(make_postern, local_users, scratch):
    # forward_path of this instance only: no shared ~/.forward is touched.
    fdir = scratch / "forwards"
    fdir.mkdir()
    os.chmod(fdir, 0o755)
    p = make_postern(params={"forward_path": f"{fdir}/$user.forward"})
    pw = pwd.getpwnam("ptalice")
    f = fdir / "ptalice.forward"
    f.write_text("ptalice, ptbob@postern.test\n")
    os.chown(f, pw.pw_uid, pw.pw_gid)
    token = new_token()
    send(p, "ptalice@postern.test", token)
    # ptalice's .forward naming ptalice means her mailbox, not a loop.
    h.wait_for_messages("ptalice", token)
    h.wait_for_messages("ptbob", token)
    # A .forward another user owns is ignored.
    os.chown(f, pwd.getpwnam("ptbob").pw_uid, -1)
    token2 = new_token()
    send(p, "ptalice@postern.test", token2)
    h.wait_for_messages("ptalice", token2)
    p.wait_for_log(r"not owned by ptalice or root: ignored")
    wait_for(lambda: not p.queue_files("active") and not p.queue_files("incoming"), 30,
             what="an empty queue")
    assert h.find_messages("ptbob", token2) == []


def test_mailbox_command_procmail(make_postern, local_users):
    if not os.access("/usr/bin/procmail", os.X_OK):
        pytest.skip("procmail is not installed (scripts/test installs it)")
    p = make_postern(params={
        "home_mailbox": None,
        "mailbox_command": '/usr/bin/procmail -a "$EXTENSION" DEFAULT=$home/Maildir/',
        "recipient_delimiter": "+",
    })
    token = new_token()
    send(p, "ptbob+news@postern.test", token)
    _p, raw = the_one(h.wait_for_messages("ptbob", token), "copy written by procmail")
    path = _p
    assert path.stat().st_uid == pwd.getpwnam("ptbob").pw_uid
    assert h.header_values(raw, "Delivered-To") == ["ptbob+news@postern.test"]
    assert h.header_values(raw, "Return-Path") == ["<someone@example.org>"]
    p.wait_for_log(r"to=<ptbob\+news@postern\.test>.*status=sent \(delivered to command")


def test_aliases_file_pipe_include(make_postern, local_users, scratch):
    p = make_postern(start=False)
    archive = scratch / "archive.mbox"
    piped = scratch / "piped"
    members = scratch / "members"
    members.write_text("# the team\nptalice\nptbob\n")
    os.chmod(members, 0o644)
    p.write_file("etc/aliases",
                 "postmaster: root\n"
                 f"archive: {archive}\n"
                 f"pipe: \"|/bin/sh -c 'id -un > {piped}.who; chrt -p $$ > {piped}.sched; "
                 f"cat > {piped}'\"\n"
                 f"team: :include:{members}\n")
    p.newaliases()
    p.start()
    token = new_token()
    for rcpt in ("archive", "pipe", "team"):
        send(p, f"{rcpt}@postern.test", token)
    h.wait_for_messages("ptalice", token)
    h.wait_for_messages("ptbob", token)
    wait_for(lambda: archive.exists() and token.encode() in archive.read_bytes(), 30,
             what="the archive file")
    wait_for(lambda: piped.exists() and token.encode() in piped.read_bytes(), 30,
             what="the piped copy")
    text = archive.read_bytes()
    assert text.startswith(b"From someone@example.org ")
    assert b"\nDelivered-To: archive@postern.test\n" in text
    # Root-owned aliases run commands and write files as default_privs.
    nobody = pwd.getpwnam("nobody").pw_uid
    assert archive.stat().st_uid == nobody
    assert (scratch / "piped.who").read_text().strip() == "nobody"
    # local runs under SCHED_BATCH (daemon_sched_batch); the command it
    # starts gets the normal policy back.
    assert "SCHED_OTHER" in (scratch / "piped.sched").read_text()


def test_delivered_to_loop_bounces(make_postern, local_users):
    p = make_postern()
    token = new_token()
    send(p, "ptalice@postern.test", token, sender="ptbob@postern.test",
         extra_headers="Delivered-To: ptalice@postern.test\n")
    p.wait_for_log(r"to=<ptalice@postern\.test>.*dsn=5\.4\.6, status=bounced "
                   r"\(mail forwarding loop for ptalice@postern\.test\)")
    _p, raw = the_one(h.wait_for_messages("ptbob", token), "bounce notice for ptbob")
    assert re.search(rb"mail forwarding loop", raw)
    assert h.find_messages("ptalice", token) == []


# --------------------------------------------------------------------------
# virtual(8): mailboxes of virtual users


VIRTUAL_MASTER_CF = ("virtual   unix  -       n       n       -       -       virtual",)


def test_virtual_mailboxes(make_postern, local_users, scratch):
    base = scratch / "vmail"
    base.mkdir()
    nobody = pwd.getpwnam("nobody")
    os.chown(base, nobody.pw_uid, nobody.pw_gid)
    os.chmod(base, 0o700)
    p = make_postern(params={
        "virtual_mailbox_domains": "virt.test",
        "virtual_mailbox_base": str(base),
        "virtual_mailbox_maps": "inline:{alice@virt.test=virt.test/alice/, "
                                "bob@virt.test=virt.test/bob.mbox, "
                                "low@virt.test=virt.test/low/}",
        "virtual_uid_maps": f"inline:{{low@virt.test=5, @virt.test={nobody.pw_uid}}}",
        "virtual_gid_maps": f"static:{nobody.pw_gid}",
    }, master_cf_extra=VIRTUAL_MASTER_CF)
    token = new_token()
    for rcpt in ("alice@virt.test", "bob@virt.test", "Alice@VIRT.test"):
        send(p, rcpt, token)
    new = base / "virt.test" / "alice" / "new"
    wait_for(lambda: new.is_dir() and len(os.listdir(new)) == 2, 30,
             what="two messages in alice's Maildir")
    for name in os.listdir(new):
        f = new / name
        assert f.stat().st_uid == nobody.pw_uid
        raw = f.read_bytes()
        assert token.encode() in raw
        assert h.header_values(raw, "Delivered-To") == ["alice@virt.test"]
        assert h.header_values(raw, "Return-Path") == ["<someone@example.org>"]
    mbox = base / "virt.test" / "bob.mbox"
    wait_for(lambda: mbox.exists() and token.encode() in mbox.read_bytes(), 30,
             what="bob's mbox")
    assert mbox.read_bytes().startswith(b"From someone@example.org ")
    assert mbox.stat().st_uid == nobody.pw_uid
    p.wait_for_log(r"to=<bob@virt\.test>, relay=virtual, .*status=sent \(delivered to mailbox\)")
    # Unknown virtual user: refused by smtpd, bounced by virtual when it
    # comes another way; a uid below virtual_minimum_uid: deferred.
    with p.smtp() as s:
        s.ehlo("client.test")
        s.mail("someone@example.org")
        code, _ = s.rcpt("carol@virt.test")
        assert code == 550
    r = p.sendmail(["-i", "carol@virt.test"], f"Subject: {token}\n\nx\n".encode())
    assert r.returncode == 0, h.describe(r)
    p.wait_for_log(r'to=<carol@virt\.test>, relay=virtual, .*dsn=5\.1\.1, status=bounced '
                   r'\(unknown user: "carol@virt\.test"\)')
    send(p, "low@virt.test", token)
    p.wait_for_log(r"to=<low@virt\.test>, relay=virtual, .*dsn=4\.3\.5, status=deferred")
    assert not (base / "virt.test" / "low").exists()


# --------------------------------------------------------------------------
# cleanup: address rewriting and content checks


def test_canonical_masquerade_and_virtual_alias(make_postern, local_users):
    p = make_postern(params={
        "sender_canonical_maps": "inline:{ptbob@postern.test=bob@example.org}",
        "canonical_maps": "inline:{@old.example=@example.org}",
        "masquerade_domains": "example.net",
        "virtual_alias_maps": "inline:{sales@postern.test=ptalice@postern.test ptbob@postern.test, "
                              "@aliases.test=ptalice@postern.test, "
                              "info@valias.test=ptalice@postern.test}",
        "virtual_alias_domains": "valias.test",
    })
    token = new_token()
    r = p.sendmail(["-i", "-f", "ptbob@postern.test", "sales@postern.test"],
                   f"From: Bob <ptbob@postern.test>\nCc: x@old.example\nSubject: {token}\n\nx\n"
                   .encode())
    assert r.returncode == 0, h.describe(r)
    for user in ("ptalice", "ptbob"):
        _p, raw = the_one(h.wait_for_messages(user, token), f"copy for {user}")
        assert h.header_values(raw, "Return-Path") == ["<bob@example.org>"]
        assert h.header_values(raw, "From") == ["Bob <bob@example.org>"]
        assert h.header_values(raw, "Cc") == ["x@example.org"]
        assert h.header_values(raw, "X-Original-To") == ["sales@postern.test"]
        assert h.header_values(raw, "Delivered-To") == [f"{user}@postern.test"]
    p.wait_for_log(r"to=<ptalice@postern\.test>, orig_to=<sales@postern\.test>, .*status=sent")
    # A catch-all for a domain, and masquerading of a subdomain.
    token2 = new_token()
    send(p, "anyone@aliases.test", token2, sender="carl@mail.example.net")
    _p, raw = the_one(h.wait_for_messages("ptalice", token2), "catch-all copy")
    assert h.header_values(raw, "Return-Path") == ["<carl@example.net>"]
    assert h.header_values(raw, "From") == ["carl@example.net"]
    # A virtual alias domain: known addresses expand, others bounce.
    token3 = new_token()
    r = p.sendmail(["-i", "info@valias.test", "nobody@valias.test"],
                   f"Subject: {token3}\n\nx\n".encode())
    assert r.returncode == 0, h.describe(r)
    h.wait_for_messages("ptalice", token3)
    p.wait_for_log(r"to=<nobody@valias\.test>, .*dsn=5\.1\.1, status=bounced "
                   r"\(User unknown in virtual alias table\)")


def test_header_and_body_checks(make_postern, local_users):
    checks = ("/^Subject:.*reject-me/ REJECT no thanks\n"
              "/^Subject:.*hold-me/ HOLD held for review\n"
              "/^Subject:.*discard-me/ DISCARD\n"
              "/^X-Mailer: warn-me/ WARN watch this\n"
              "/^Subject:.*prepend-me/ PREPEND X-Tagged: yes\n"
              "/^X-Secret:/ IGNORE\n"
              "/^X-Old: (.*)/ REPLACE X-New: $1\n")
    body = ("/^password: / REPLACE password: [removed]\n"
            "/^drop this line/ IGNORE\n"
            "/BODY-REJECT/ REJECT body says no\n")
    p = make_postern(params={"header_checks": lambda p: f"regexp:{p.etc}/header_checks",
                             "body_checks": lambda p: f"pcre:{p.etc}/body_checks"},
                     files={"etc/header_checks": checks, "etc/body_checks": body})
    t = new_token()

    def smtp_send(subject, text, extra=""):
        data = h.crlf(f"From: someone@example.org\nTo: ptalice@postern.test\n{extra}"
                      f"Subject: {subject}\n\n{text}")
        with p.smtp() as s:
            s.ehlo("client.test")
            return h.smtp_transaction(s, "someone@example.org", ["ptalice@postern.test"], data)

    code, text = smtp_send(f"{t} reject-me", "x\n")
    assert code == 550 or code == 554, (code, text)
    assert "no thanks" in text
    code, text = smtp_send(f"{t} body", "ok\nthe BODY-REJECT word\n")
    assert code in (550, 554) and "body says no" in text, (code, text)
    code, text = smtp_send(f"{t} discard-me", "x\n")
    assert code == 250, text
    code, text = smtp_send(f"{t} hold-me", "x\n")
    assert code == 250, text
    held = wait_for(lambda: p.queue_files("hold"), 30, what="a held message")
    assert len(held) == 1
    code, text = smtp_send(f"{t} warn-me prepend-me",
                           "hello\npassword: hunter2\ndrop this line\nbye\n",
                           extra="X-Secret: s3cret\nX-Old: value 1\nX-Mailer: warn-me\n")
    assert code == 250, text
    _p, raw = the_one(h.wait_for_messages("ptalice", f"{t} warn-me"), "the checked copy")
    head, got = h.split_message(raw)
    assert got == b"hello\npassword: [removed]\nbye\n", got
    assert h.header_values(raw, "X-Secret") == []
    assert h.header_values(raw, "X-New") == ["value 1"]
    assert h.header_values(raw, "X-Old") == []
    assert h.header_values(raw, "X-Tagged") == ["yes"]
    assert re.search(rb"^X-Tagged: yes\nSubject: ", head, re.M), head
    p.wait_for_log(r": warning: header X-Mailer: warn-me from smtpd.*: watch this")
    p.wait_for_log(r": discard: header Subject: .*discard-me")
    p.wait_for_log(r": hold: header Subject: .*hold-me.*: held for review")
    # Only the checked copy was delivered: not the discarded or held one.
    assert len(h.find_messages("ptalice", t)) == 1


# --------------------------------------------------------------------------
# Dovecot IMAP reads what virtual(8) wrote


DOVECOT_CONF = """\
base_dir = {dir}/run
state_dir = {dir}/state
log_path = {dir}/dovecot.log
protocols = imap
listen = 127.0.0.1
ssl = no
disable_plaintext_auth = no
auth_mechanisms = plain login
default_login_user = dovenull
default_internal_user = dovecot
first_valid_uid = 1
mbox_write_locks = dotlock fcntl
mbox_read_locks = fcntl
passdb {{
  driver = passwd-file
  args = scheme=PLAIN username_format=%u {dir}/passwd
}}
userdb {{
  driver = passwd-file
  args = username_format=%u {dir}/passwd
}}
service imap-login {{
  inet_listener imap {{
    address = 127.0.0.1
    port = {port}
  }}
}}
"""


@pytest.fixture
def imap_dovecot(scratch):
    """A private Dovecot serving IMAP for alice@virt.test (Maildir) and
    bob@virt.test (mbox) under scratch/vmail, mail owned by nobody."""
    if not (shutil.which("dovecot") and os.access("/usr/lib/dovecot/imap", os.X_OK)):
        pytest.skip("dovecot-imapd is not installed (scripts/test installs it)")
    d = Path(tempfile.mkdtemp(prefix="pt-dc-"))
    os.chmod(d, 0o755)
    base = scratch / "vmail"
    (base / "virt.test").mkdir(parents=True)
    nobody = pwd.getpwnam("nobody")
    for x in (base, base / "virt.test"):
        os.chown(x, nobody.pw_uid, nobody.pw_gid)
        os.chmod(x, 0o700)
    port = h.free_port()
    (d / "dovecot.conf").write_text(DOVECOT_CONF.format(dir=d, port=port))
    u, g = nobody.pw_uid, nobody.pw_gid
    vt = base / "virt.test"
    (d / "passwd").write_text(
        f"alice@virt.test:{{PLAIN}}apw:{u}:{g}::{vt}/alice::userdb_mail=maildir:{vt}/alice\n"
        f"bob@virt.test:{{PLAIN}}bpw:{u}:{g}::{vt}/bobhome::"
        f"userdb_mail=mbox:{vt}/bobhome:INBOX={vt}/bob.mbox\n")
    proc = subprocess.Popen(["dovecot", "-F", "-c", str(d / "dovecot.conf")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: h.smtp_banner_ok(port) or _imap_ok(port), 20, what="Dovecot IMAP")
        yield {"port": port, "base": base, "dir": d}
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=20)
        shutil.rmtree(d, ignore_errors=True)


def _imap_ok(port):
    import socket
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
            return s.recv(100).startswith(b"* OK")
    except OSError:
        return False


def imap_bodies(port, user, password):
    import imaplib
    with imaplib.IMAP4("127.0.0.1", port) as m:
        m.login(user, password)
        typ, data = m.select("INBOX", readonly=True)
        assert typ == "OK", data
        typ, data = m.search(None, "ALL")
        out = []
        for num in data[0].split():
            typ, parts = m.fetch(num, "(RFC822)")
            out.append(parts[0][1])
        return out


def test_dovecot_imap_reads_virtual_mailboxes(make_postern, local_users, imap_dovecot):
    base = imap_dovecot["base"]
    nobody = pwd.getpwnam("nobody")
    p = make_postern(params={
        "virtual_mailbox_domains": "virt.test",
        "virtual_mailbox_base": str(base),
        "virtual_mailbox_maps": "inline:{alice@virt.test=virt.test/alice/, "
                                "bob@virt.test=virt.test/bob.mbox}",
        "virtual_uid_maps": f"static:{nobody.pw_uid}",
        "virtual_gid_maps": f"static:{nobody.pw_gid}",
    }, master_cf_extra=VIRTUAL_MASTER_CF)
    token = new_token()
    body = "Line one.\nFrom the start of a line\n.\n..two dots\nünïcødé ✓\n"
    count = 12
    # Concurrent deliveries to one mbox: several SMTP sessions at once,
    # and qmgr runs several virtual agents in parallel.
    import threading
    errors = []

    def one(i):
        try:
            data = h.crlf(f"From: s@example.org\nTo: bob@virt.test\nSubject: {token} {i}\n"
                          "MIME-Version: 1.0\nContent-Type: text/plain; charset=utf-8\n\n"
                          + body)
            with p.smtp() as s:
                s.ehlo("client.test")
                code, text = h.smtp_transaction(s, "s@example.org",
                                                ["bob@virt.test", "alice@virt.test"], data)
                assert code == 250, text
        except Exception as e:  # reported below
            errors.append(repr(e))

    threads = [threading.Thread(target=one, args=(i,)) for i in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    wait_for(lambda: len(p.log_findall(r"to=<(?:alice|bob)@virt\.test>, relay=virtual, .*status=sent"))
             >= 2 * count, 60, what="every virtual delivery")
    for user, pw in (("alice@virt.test", "apw"), ("bob@virt.test", "bpw")):
        msgs = imap_bodies(imap_dovecot["port"], user, pw)
        mine = [m for m in msgs if token.encode() in m]
        assert len(mine) == count, (user, len(mine))
        subjects = set()
        for raw in mine:
            msg = h.parse_message(raw.replace(b"\r\n", b"\n"))
            subjects.add(msg["Subject"])
            # mbox (as Postfix writes it, and Dovecot reads it) quotes
            # "From " at the start of a line; a Maildir keeps it.
            want = body.replace("\nFrom ", "\n>From ") if user.startswith("bob") else body
            assert msg.get_content() == want, (user, msg.get_content())
            assert h.header_values(raw, "Delivered-To") == [user]
        assert subjects == {f"{token} {i}" for i in range(count)}


# --------------------------------------------------------------------------
# mailbox_transport: local hands the mailbox delivery to the lmtp agent


def test_mailbox_transport_to_dovecot_lmtp(make_postern, local_users, dovecot):  # noqa: F811
    d = dovecot(users={"ptalice@postern.test": "secret"})
    p = make_postern(params={"mailbox_transport": f"lmtp:unix:{d.lmtp_socket}"})
    token = new_token()
    send(p, "ptalice@postern.test", token)
    (path, raw), = d.wait_for_messages("ptalice@postern.test", token, timeout=30)
    assert re.search(rb"^Return-Path: <someone@example\.org>$", raw, re.M), raw[:300]
    sock = re.escape(str(d.lmtp_socket))
    p.wait_for_log(rf"to=<ptalice@postern\.test>, relay=[^,]*\[{sock}\], .*status=sent")
    wait_for(lambda: not p.queue_files("active") and not p.queue_files("deferred")
             and not p.queue_files("incoming"), 30, what="an empty queue")
    # Recorded once, by the lmtp agent: local does not log it again, and
    # nothing went to the local Maildir.
    assert len(p.log_findall(r"to=<ptalice@postern\.test>.*status=sent")) == 1
    assert h.find_messages("ptalice", token) == []


def test_a_backlog_through_mailbox_transport(make_postern, local_users, dovecot):  # noqa: F811
    """A backlog for one user whose mailbox is Dovecot's (mailbox_transport
    = lmtp): local takes it in batches and hands each message on to the
    lmtp agent as a request of its own. Every message arrives once, each
    recorded once by the lmtp agent."""
    d = dovecot(users={"ptalice@postern.test": "secret"})
    p = make_postern(start=False,
                     params={"mailbox_transport": f"lmtp:unix:{d.lmtp_socket}"})
    run, n = f"pt-lmtp-backlog-{uuid.uuid4().hex}", 20
    queue_while_stopped(p, "ptalice@postern.test", run, n)
    got = d.wait_for_messages("ptalice@postern.test", run, count=n, timeout=60)
    wait_for(lambda: not any(p.queue_files(q) for q in ("incoming", "active", "deferred")),
             30, what="an empty queue")
    subjects = sorted(re.search(rb"Subject: (\S+)", raw).group(1).decode() for _, raw in got)
    assert subjects == sorted(f"{run}-{i}." for i in range(n))
    assert len(p.log_findall(r"to=<ptalice@postern\.test>.*status=sent")) == n


def test_mailbox_size_limit_bounces(make_postern, local_users, scratch):
    spool = scratch / "spool"
    spool.mkdir()
    os.chmod(spool, 0o1777)
    p = make_postern(params={"home_mailbox": None, "mail_spool_directory": str(spool),
                             "mailbox_size_limit": "3000"})
    token = new_token()
    send(p, "ptalice@postern.test", token, sender="ptbob@postern.test")
    mbox = spool / "ptalice"
    wait_for(lambda: mbox.exists() and token.encode() in mbox.read_bytes(), 30,
             what="the first message in the spool mbox")
    assert mbox.stat().st_uid == pwd.getpwnam("ptalice").pw_uid
    big = new_token()
    data = h.crlf(f"From: ptbob@postern.test\nTo: ptalice@postern.test\nSubject: {big}\n\n"
                  + ("x" * 70 + "\n") * 40)
    with p.smtp() as s:
        s.ehlo("client.test")
        code, text = h.smtp_transaction(s, "ptbob@postern.test", ["ptalice@postern.test"], data)
    assert code == 250, text
    p.wait_for_log(r"to=<ptalice@postern\.test>, .*dsn=5\.2\.2, status=bounced")
    p.wait_for_log(r"sender non-delivery notification")
    assert big.encode() not in mbox.read_bytes()
    assert token.encode() in mbox.read_bytes()


@pytest.fixture
def small_fs():
    """A 64 KiB tmpfs (mode 1777), unmounted afterwards; skips when the
    machine does not allow the mount."""
    if not h.is_root():
        pytest.skip("needs root (mount)")
    d = Path(tempfile.mkdtemp(prefix="pt-full-"))
    r = h.run(["mount", "-t", "tmpfs", "-o", "size=64k,mode=1777", "tmpfs", d])
    if r.returncode != 0:
        d.rmdir()
        pytest.skip("cannot mount a tmpfs here: " + r.stderr.strip())
    try:
        yield d
    finally:
        h.run(["umount", d])
        shutil.rmtree(d, ignore_errors=True)


def test_full_disk_defers_then_delivers(make_postern, local_users, small_fs):
    p = make_postern(params={"home_mailbox": None, "mail_spool_directory": str(small_fs),
                             "mailbox_size_limit": "0",
                             "minimal_backoff_time": "1h", "maximal_backoff_time": "1h"})
    filler = small_fs / "filler"
    filler.write_bytes(b"f" * (60 * 1024))
    token = new_token()
    data = h.crlf(f"From: someone@example.org\nTo: ptalice@postern.test\nSubject: {token}\n\n"
                  + ("y" * 70 + "\n") * 200)
    with p.smtp() as s:
        s.ehlo("client.test")
        code, text = h.smtp_transaction(s, "someone@example.org", ["ptalice@postern.test"], data)
    assert code == 250, text
    p.wait_for_log(r"to=<ptalice@postern\.test>, .*dsn=4\.3\.0, status=deferred "
                   r"\(.*No space left on device")
    mbox = small_fs / "ptalice"
    # Nothing half-written stays behind.
    assert not mbox.exists() or token.encode() not in mbox.read_bytes()
    assert mbox.exists() is False or mbox.stat().st_size == 0
    # Flushed once in deferred/: local logs the deferral before qmgr has
    # moved the message there, and a flush before that finds nothing.
    wait_for(lambda: p.queue_files("deferred"), 20, what="the message in deferred/")
    filler.unlink()
    r = p.sendmail(["-q"], None)
    assert r.returncode == 0, h.describe(r)
    wait_for(lambda: mbox.exists() and token.encode() in mbox.read_bytes(), 30,
             what="the message delivered once there is room")
    assert mbox.read_bytes().count(token.encode()) == 1


def test_a_backlog_for_one_maildir_arrives_once_each(make_postern, local_users):
    """Mail piled up for one Maildir while Postern was stopped: at start,
    qmgr hands local the backlog in batches (local_delivery_batch_limit)
    and local syncs each batch's new/ once. Every message arrives exactly
    once, every delivery is logged, and the queue empties."""
    p = make_postern(start=False)
    run, n = f"pt-backlog-{uuid.uuid4().hex}", 40
    queue_while_stopped(p, "ptalice@postern.test", run, n)
    wait_for(lambda: len(h.find_messages("ptalice", run)) >= n, 60,
             what=f"{n} messages in ~ptalice/Maildir")
    wait_for(lambda: not any(p.queue_files(q) for q in ("incoming", "active", "deferred")),
             30, what="an empty queue")
    got = sorted(re.search(rb"Subject: (\S+)", b).group(1).decode()
                 for _, b in h.find_messages("ptalice", run))
    assert got == sorted(f"{run}-{i}." for i in range(n))
    sent = p.log_findall(r"to=<ptalice@postern\.test>.*status=sent \(delivered to maildir\)")
    assert len(sent) == n
