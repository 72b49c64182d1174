"""Duplicate elimination (issue 16, point 7), as Postfix's
`duplicate_filter_limit` does it: cleanup keeps one copy of an envelope
recipient given again (in any case; with the same original address and
DSN request), and local delivers once to each mailbox, file, command and
forward address that one recipient's alias, `:include:` and `.forward`
expansion reaches more than once.

Each case is driven by a real client (smtplib, sendmail) to real
mailboxes, and the envelope cases are compared with a real Postfix given
the same recipients.
"""

import os
import pwd
import shutil
import smtplib
import tempfile
import time
import uuid
from pathlib import Path

import pytest

import postern_harness as h
from postfix_peer import postfix_peer  # noqa: F401  (the fixture)
from postern_harness import wait_for

SENDER = "someone@example.org"
VIRTUAL_MASTER_CF = ("virtual   unix  -       n       n       -       -       virtual",)


def new_token():
    return "pt-dup-" + uuid.uuid4().hex


def message(token, to="undisclosed-recipients:;"):
    return h.crlf(f"From: {SENDER}\nTo: {to}\nSubject: {token}\n\nbody {token}\n")


def send(port, rcpts, token, rcpt_options=None):
    """One transaction to 127.0.0.1:port with these RCPTs (each accepted)."""
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as s:
        s.ehlo("client.test")
        assert s.mail(SENDER)[0] == 250
        for i, r in enumerate(rcpts):
            opts = rcpt_options[i] if rcpt_options else []
            code, text = s.rcpt(r, opts)
            assert code in (250, 251), (r, code, text)
        code, text = s.data(message(token))
        assert code == 250, text


def settled(count_fn, expected_at_least=1, quiet=1.5, timeout=30):
    """Waits for at least one copy, then until the count stops changing for
    `quiet` seconds (a second copy would arrive by then); the count."""
    wait_for(lambda: count_fn() >= expected_at_least, timeout, what="the first copy")
    last, since = count_fn(), time.time()
    while time.time() - since < quiet:
        time.sleep(0.2)
        now = count_fn()
        if now != last:
            last, since = now, time.time()
    return last


def copies(user, token):
    return len(h.find_messages(user, token))


# --------------------------------------------------------------------------
# Local users: smtplib, sendmail, aliases


def test_same_recipient_three_times_gives_one_copy(make_postern, local_users):
    p = make_postern()
    token = new_token()
    send(p.port, ["ptalice@postern.test"] * 3, token)
    assert settled(lambda: copies("ptalice", token)) == 1
    m = p.wait_for_log(r"([0-9A-F]+): from=<someone@example\.org>, size=\d+, nrcpt=(\d+)")
    assert m.group(2) == "1"
    assert len(p.log_findall(r"to=<ptalice@postern\.test>, .*status=sent")) == 1


def test_recipients_differing_in_case_give_one_copy(make_postern, local_users):
    p = make_postern()
    token = new_token()
    # (Only the domain's case: Postern's smtpd does not yet find a local
    # account named in another case; sendmail below and cleanup's unit
    # test cover the local part, which Postfix's filter folds too.)
    send(p.port, ["ptalice@Postern.Test", "ptalice@POSTERN.TEST", "ptalice@postern.test"], token)
    assert settled(lambda: copies("ptalice", token)) == 1
    # Another recipient in the same message is kept.
    token = new_token()
    send(p.port, ["ptalice@postern.test", "ptbob@postern.test", "ptalice@POSTERN.test"], token)
    assert settled(lambda: copies("ptalice", token)) == 1
    assert settled(lambda: copies("ptbob", token)) == 1


def test_sendmail_with_a_recipient_repeated_gives_one_copy(make_postern, local_users):
    p = make_postern()
    token = new_token()
    r = p.sendmail(["-i", "ptalice@postern.test", "ptalice@postern.test", "PTALICE@postern.test"],
                   f"Subject: {token}\n\nbody\n".encode())
    assert r.returncode == 0, h.describe(r)
    assert settled(lambda: copies("ptalice", token)) == 1
    # sendmail -t: a header recipient repeating the command line's.
    token = new_token()
    r = p.sendmail(["-i", "-t", "ptalice@postern.test"],
                   f"To: ptalice@postern.test, PTAlice@postern.test\nCc: ptbob@postern.test\n"
                   f"Subject: {token}\n\nbody\n".encode())
    assert r.returncode == 0, h.describe(r)
    assert settled(lambda: copies("ptalice", token)) == 1
    assert settled(lambda: copies("ptbob", token)) == 1


@pytest.fixture
def scratch():
    d = Path(tempfile.mkdtemp(prefix="pt-dup-"))
    os.chmod(d, 0o1777)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def test_two_aliases_to_one_user_give_one_copy(make_postern, local_users, scratch):
    p = make_postern(start=False)
    members = scratch / "members"
    members.write_text("ptalice\nPTAlice@postern.test\nptbob\n")
    os.chmod(members, 0o644)
    archive = scratch / "archive.mbox"
    p.write_file("etc/aliases",
                 "a1: ptalice\n"
                 "a2: PTALICE@postern.test\n"
                 f"both: a1, a2, ptalice, {archive}\n"
                 f"team: both, :include:{members}, {archive}, a2\n")
    p.newaliases()
    p.start()
    token = new_token()
    send(p.port, ["both@postern.test"], token)
    assert settled(lambda: copies("ptalice", token)) == 1
    wait_for(lambda: archive.exists() and token.encode() in archive.read_bytes(), 30,
             what="the archive file")
    # An alias reaching the same user through two aliases, an :include:
    # list and the user's own name, and a file twice: once each.
    token = new_token()
    send(p.port, ["team@postern.test"], token)
    assert settled(lambda: copies("ptalice", token)) == 1
    assert settled(lambda: copies("ptbob", token)) == 1
    assert settled(lambda: archive.read_bytes().count(token.encode())) >= 1
    assert archive.read_bytes().count(f"Subject: {token}".encode()) == 1


# --------------------------------------------------------------------------
# The same envelopes on a real Postfix and on Postern


CASES = [
    # (name, recipients, NOTIFY per recipient or None)
    ("three times", ["x@far.test"] * 3, None),
    ("case", ["X@far.test", "x@FAR.TEST", "x@far.test"], None),
    ("one alias to two aliases of x", ["both@far.test"], None),
    ("two aliases of x", ["a1@far.test", "a2@far.test"], None),
    ("x and an alias of x", ["x@far.test", "a1@far.test"], None),
    ("other NOTIFY", ["x@far.test", "x@far.test"], [["NOTIFY=SUCCESS"], ["NOTIFY=NEVER"]]),
]
ALIASES = "both@far.test a1@far.test, a2@far.test\na1@far.test x@far.test\na2@far.test x@far.test\n"


def test_envelope_duplicates_as_a_real_postfix(make_postern, postfix_peer, scratch):  # noqa: F811
    aliases = scratch / "virtual"
    aliases.write_text(ALIASES)
    os.chmod(aliases, 0o644)
    # Postfix: every recipient of far.test lands in one Maildir.
    far = postfix_peer(params={"virtual_alias_maps": f"texthash:{aliases}"})
    # Postern: the same domain, aliases and single Maildir.
    base = scratch / "vmail"
    base.mkdir()
    nobody = pwd.getpwnam("nobody")
    os.chown(base, nobody.pw_uid, nobody.pw_gid)
    p = make_postern(params={
        "virtual_mailbox_domains": "far.test",
        "virtual_mailbox_base": str(base),
        "virtual_mailbox_maps": "static:far/",
        "virtual_uid_maps": f"static:{nobody.pw_uid}",
        "virtual_gid_maps": f"static:{nobody.pw_gid}",
        "virtual_alias_maps": f"texthash:{aliases}",
    }, master_cf_extra=VIRTUAL_MASTER_CF)

    def postern_copies(token):
        tok = token.encode()
        n = 0
        for sub in ("new", "cur"):
            d = base / "far" / sub
            for name in (os.listdir(d) if d.is_dir() else []):
                try:
                    n += tok in (d / name).read_bytes()
                except OSError:
                    pass
        return n

    results = {}
    for name, rcpts, options in CASES:
        token = new_token()
        send(far.port, rcpts, token, options)
        send(p.port, rcpts, token, options)
        postfix_n = settled(lambda: len(far.find(token)))
        postern_n = settled(lambda: postern_copies(token))
        results[name] = (postfix_n, postern_n)
    assert all(a == b for a, b in results.values()), results
    # What Postfix does, spelled out: one copy of the same recipient, in
    # any case, and of one alias's expansion; separate copies for
    # different original recipients (each with its X-Original-To) and for
    # different DSN requests.
    assert {k: v[1] for k, v in results.items()} == {
        "three times": 1, "case": 1, "one alias to two aliases of x": 1,
        "two aliases of x": 2, "x and an alias of x": 2, "other NOTIFY": 2}, results
