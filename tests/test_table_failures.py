"""A lookup table that cannot be used is a temporary failure, never "not
found" (issue #24 point 7, issue #27 points 4 and 6), as in Postfix 3.7:
its indexed file missing, a directory where the file should be, or a
Berkeley DB file made by Postfix's own postmap. In `relay_domains`
(table form) and `virtual_alias_maps` smtpd answers `451 4.3.0 <addr>:
Temporary lookup failure` at RCPT (never 5xx, never "Relay access
denied"); cleanup defers with Postfix's generic reply (the table's path
never reaches the client); qmgr (`transport_maps`) and smtp
(`smtp_tls_policy_maps`, `smtp_sasl_password_maps`) defer, and smtp never
sends without the policy or credentials. Nothing is lost: once the table
is rebuilt (`postmap` + `postern reload`) the mail goes out. `postern
check` names each broken table with the command that fixes it. The RCPT
and DATA replies are compared with a private Postfix's on the same broken
tables. Run as root."""

import re
import shutil
import smtplib
import uuid
from pathlib import Path

import pytest

import postern_harness as h
from postfix_peer import postfix_available, postfix_peer  # noqa: F401  (the fixture)

BROKEN = ["missing", "directory", "berkeley"]
POSTFIX_POSTMAP = "/usr/sbin/postmap"
OUTSIDE = ("127.0.0.2", 0)  # a client outside mynetworks


@pytest.fixture
def root_only():
    if not h.is_root():
        pytest.skip("the daemons read their tables as root")


def db_of(source):
    return Path(str(source) + ".db")


def break_table(source, how):
    """Leaves the `hash:` table of `source` unusable in the way `how` says
    (the source file itself is kept)."""
    db = db_of(source)
    if db.is_dir():
        shutil.rmtree(db)
    elif db.exists():
        db.unlink()
    if how == "directory":
        db.mkdir()
    elif how == "berkeley":
        if not Path(POSTFIX_POSTMAP).exists():
            pytest.skip("Postfix's postmap is not installed")
        r = h.run([POSTFIX_POSTMAP, f"hash:{source}"])
        assert r.returncode == 0, h.describe(r)
        assert db.exists()


def fix_table(p, source):
    """Rebuilds the table with Postern's postmap and reloads."""
    db = db_of(source)
    if db.is_dir():
        shutil.rmtree(db)
    elif db.exists():
        db.unlink()
    r = h.run_tool(p, "postmap", f"hash:{source}")
    assert r.returncode == 0, h.describe(r)
    r = p.postern("reload")
    assert r.returncode == 0, h.describe(r)


def rcpt_reply(port, rcpt, source=OUTSIDE):
    with smtplib.SMTP("127.0.0.1", port, timeout=30, source_address=source) as s:
        s.ehlo("client.example")
        code, _ = s.mail("sender@client.example")
        assert code == 250
        return s.rcpt(rcpt)


def data_reply(port, rcpt, token, source=OUTSIDE):
    """One message; the DATA reply (or the RCPT reply when it refused)."""
    with smtplib.SMTP("127.0.0.1", port, timeout=30, source_address=source) as s:
        s.ehlo("client.example")
        s.mail("sender@client.example")
        code, text = s.rcpt(rcpt)
        if code != 250:
            return code, text
        return s.data(h.crlf(f"Subject: {token}\n\n{token}\n"))


def no_paths(text, p):
    assert str(p.dir) not in text and "/etc/" not in text, text


# ----------------------------------------------------------------- smtpd


@pytest.mark.parametrize("how", BROKEN)
def test_relay_domains_table_unusable_gives_451_then_relays_once_fixed(
        root_only, make_postern, sink, how):
    p = make_postern(params={
        "relay_domains": lambda p: f"hash:{p.etc}/relay_domains",
        "smtpd_relay_restrictions": "permit_mynetworks, reject_unauth_destination",
        "relayhost": f"[127.0.0.1]:{sink.port}",
    }, files={"etc/relay_domains": "relayed.test OK\n"}, start=False)
    break_table(p.etc / "relay_domains", how)
    p.start()
    code, text = rcpt_reply(p.port, "user@relayed.test")
    assert (code, text.decode()) == (451, "4.3.0 <user@relayed.test>: Temporary lookup failure")
    # A domain no table knows is still refused for relaying... only once
    # the table answers: while it cannot, nothing is refused for good.
    code, text = rcpt_reply(p.port, "user@elsewhere.test")
    assert code == 451, (code, text)
    p.wait_for_log(r"relay_domains.*lookup error for \"relayed\.test\"|"
                   r"hash:\S*relay_domains lookup error for \"relayed\.test\"")
    fix_table(p, p.etc / "relay_domains")
    token = f"relay-{uuid.uuid4().hex}"
    h.wait_for(lambda: rcpt_reply(p.port, "user@relayed.test")[0] == 250, 20,
               what="RCPT accepted once the table is rebuilt")
    code, text = data_reply(p.port, "user@relayed.test", token)
    assert code == 250, (code, text)
    sink.wait_for(token)
    code, text = rcpt_reply(p.port, "user@elsewhere.test")
    assert (code, text.decode()) == (554, "5.7.1 <user@elsewhere.test>: Relay access denied")


@pytest.mark.parametrize("how", BROKEN)
def test_virtual_alias_maps_unusable_defers_at_rcpt_and_in_cleanup(
        root_only, make_postern, sink, how):
    p = make_postern(params={
        "virtual_alias_domains": "virt.test",
        "virtual_alias_maps": lambda p: f"hash:{p.etc}/virtual",
        "relayhost": f"[127.0.0.1]:{sink.port}",
    }, files={"etc/virtual": "info@virt.test dest@far.test\n"}, start=False)
    break_table(p.etc / "virtual", how)
    p.start()
    # smtpd's recipient validation asks the table.
    code, text = rcpt_reply(p.port, "info@virt.test")
    assert (code, text.decode()) == (451, "4.3.0 <info@virt.test>: Temporary lookup failure")
    # Without it, cleanup asks, and defers the whole message, saying no
    # more than Postfix does.
    p.set_params(smtpd_reject_unlisted_recipient="no")
    assert p.postern("reload").returncode == 0
    token = f"valias-{uuid.uuid4().hex}"

    def deferred_by_cleanup():
        code, text = data_reply(p.port, "info@virt.test", token)
        return (code, text.decode()) if code == 451 and b"queue file" in text else None
    got = h.wait_for(deferred_by_cleanup, 20, what="cleanup's 451")
    assert got == (451, "4.3.0 Error: queue file write error")
    no_paths(got[1], p)
    p.wait_for_log(r"map lookup problem for info@virt\.test -- message not accepted, "
                   r"try again later")
    assert not p.queue_files("incoming") and not p.queue_files("active") \
        and not p.queue_files("deferred")
    fix_table(p, p.etc / "virtual")
    code, text = h.wait_for(
        lambda: (lambda r: r if r[0] == 250 else None)(data_reply(p.port, "info@virt.test",
                                                                  token)),
        20, what="the message accepted once the table is rebuilt")
    msg = sink.wait_for(token)[0]
    assert msg.rcpt_tos == ["dest@far.test"]


# ------------------------------------------------------- qmgr and smtp


def submit(p, rcpt, token):
    r = p.sendmail(["-f", "app@postern.test", rcpt],
                   h.crlf(f"Subject: {token}\n\n{token}\n"))
    assert r.returncode == 0, h.describe(r)


@pytest.mark.parametrize("how", BROKEN)
def test_transport_maps_unusable_defers_in_qmgr_then_delivers(
        root_only, make_postern, sink, how):
    p = make_postern(params={
        "transport_maps": lambda p: f"hash:{p.etc}/transport",
    }, files={"etc/transport": f"far.test smtp:[127.0.0.1]:{sink.port}\n"}, start=False)
    break_table(p.etc / "transport", how)
    p.start()
    token = f"transport-{uuid.uuid4().hex}"
    submit(p, "user@far.test", token)
    p.wait_for_log(r"to=<user@far\.test>.*status=deferred \(address resolver failure\)")
    p.wait_for_log(r"hash:\S*transport lookup error for ")
    assert not sink.messages
    fix_table(p, p.etc / "transport")
    sink.wait_for(token, timeout=60)


@pytest.mark.parametrize("how", BROKEN)
def test_smtp_sasl_password_maps_unusable_defers_never_sends(
        root_only, make_postern, sink, how):
    p = make_postern(params={
        "relayhost": f"[127.0.0.1]:{sink.port}",
        "smtp_sasl_auth_enable": "yes",
        "smtp_sasl_password_maps": lambda p: f"hash:{p.etc}/sasl_passwd",
    }, files={"etc/sasl_passwd": "[other.test]:587 user:secret\n"}, start=False)
    break_table(p.etc / "sasl_passwd", how)
    p.start()
    token = f"sasl-{uuid.uuid4().hex}"
    submit(p, "user@far.test", token)
    p.wait_for_log(r"to=<user@far\.test>.*status=deferred \(Temporary lookup failure\)")
    assert sink.connections == 0 and not sink.messages
    fix_table(p, p.etc / "sasl_passwd")
    sink.wait_for(token, timeout=60)


@pytest.mark.parametrize("how", BROKEN)
def test_smtp_tls_policy_maps_unusable_defers_never_sends(
        root_only, make_postern, sink, how):
    p = make_postern(params={
        "relayhost": f"[127.0.0.1]:{sink.port}",
        "smtp_tls_policy_maps": lambda p: f"hash:{p.etc}/tls_policy",
    }, files={"etc/tls_policy": f"[127.0.0.1]:{sink.port} none\n"}, start=False)
    break_table(p.etc / "tls_policy", how)
    p.start()
    token = f"policy-{uuid.uuid4().hex}"
    submit(p, "user@far.test", token)
    p.wait_for_log(r"to=<user@far\.test>.*status=deferred \(client TLS configuration problem\)")
    assert sink.connections == 0 and not sink.messages
    fix_table(p, p.etc / "tls_policy")
    sink.wait_for(token, timeout=60)


# ---------------------------------------------------------- postern check


@pytest.mark.parametrize("how", BROKEN)
def test_check_names_an_unusable_table_and_the_command_that_fixes_it(make_postern, how):
    p = make_postern(params={
        "virtual_alias_maps": lambda p: f"hash:{p.etc}/virtual",
    }, files={"etc/virtual": "a@b.test c@d.test\n"}, start=False)
    p.newaliases()
    source = p.etc / "virtual"
    break_table(source, how)
    r = p.postern("check")
    assert r.returncode == 1, h.describe(r)
    line = [ln for ln in r.stderr.splitlines() if "virtual_alias_maps" in ln]
    assert line and "error:" in line[0], h.describe(r)
    assert f"postmap hash:{source}" in line[0], line[0]
    assert str(db_of(source)) in line[0], line[0]
    fix = h.run_tool(p, "postmap", f"hash:{source}") if how == "missing" else None
    if fix is None:
        fix_db = db_of(source)
        shutil.rmtree(fix_db) if fix_db.is_dir() else fix_db.unlink()
        fix = h.run_tool(p, "postmap", f"hash:{source}")
    assert fix.returncode == 0, h.describe(fix)
    r = p.postern("check")
    assert r.returncode == 0, h.describe(r)


def test_check_reports_unknown_types_and_stale_indexes(make_postern):
    p = make_postern(params={
        "transport_maps": "nosuchtype:/etc/whatever",
        "sender_canonical_maps": lambda p: f"hash:{p.etc}/canonical",
        "smtpd_recipient_restrictions": lambda p:
            f"check_recipient_access cdb:{p.etc}/nothere, reject_unauth_destination",
    }, files={"etc/canonical": "a@b.test c@d.test\n"}, start=False)
    p.newaliases()
    r = h.run_tool(p, "postmap", f"hash:{p.etc}/canonical")
    assert r.returncode == 0, h.describe(r)
    # The source edited after the last postmap.
    import os
    import time
    later = time.time() + 10
    os.utime(p.etc / "canonical", (later, later))
    r = p.postern("check")
    assert r.returncode == 1, h.describe(r)
    err = r.stderr
    assert re.search(r"error: .*transport_maps: .*unsupported dictionary type: nosuchtype", err), err
    assert re.search(rf"error: .*sender_canonical_maps: database {re.escape(str(p.etc))}"
                     rf"/canonical\.db is older than source file .*canonical; "
                     rf"run: postmap hash:", err), err
    assert re.search(rf"error: .*smtpd_recipient_restrictions: .*{re.escape(str(p.etc))}"
                     rf"/nothere\.cdb.*run: postmap cdb:", err), err


# ------------------------------------------------- the same as Postfix


@pytest.mark.skipif(not postfix_available(), reason="Postfix is not installed")
def test_replies_are_postfix_replies(root_only, make_postern, postfix_peer):  # noqa: F811
    """relay_domains and virtual_alias_maps as missing `hash:` tables, the
    same RCPT and DATA, to a private Postfix and to Postern."""
    work = Path(h.tempfile.mkdtemp(prefix="pt-tables-"))
    try:
        (work / "relay").write_text("relayed.test OK\n")
        (work / "virtual").write_text("info@virt.test dest@far.test\n")
        common = {
            "relay_domains": f"hash:{work}/relay",
            "virtual_alias_domains": "virt.test",
            "virtual_alias_maps": f"hash:{work}/virtual",
            "smtpd_relay_restrictions": "reject_unauth_destination",
        }
        far = postfix_peer(params=dict(common, virtual_mailbox_domains=""))
        p = make_postern(params=common)

        def replies(port):
            out = [rcpt_reply(port, "user@relayed.test", source=None),
                   rcpt_reply(port, "info@virt.test", source=None)]
            return [(c, t.decode()) for c, t in out]
        assert replies(p.port) == replies(far.port)
        for inst in (p,):
            inst.set_params(smtpd_reject_unlisted_recipient="no")
            assert inst.postern("reload").returncode == 0
        far.params["smtpd_reject_unlisted_recipient"] = "no"
        far._write_config()
        assert far._postfix("reload").returncode == 0
        token = uuid.uuid4().hex

        def cleanup_reply(port):
            got = h.wait_for(
                lambda: (lambda r: r if r[0] != 451 or b"queue file" in r[1] else None)(
                    data_reply(port, "info@virt.test", token, source=None)),
                20, what="DATA's reply")
            return got[0], got[1].decode()
        assert cleanup_reply(p.port) == cleanup_reply(far.port) \
            == (451, "4.3.0 Error: queue file write error")
    finally:
        shutil.rmtree(work, ignore_errors=True)


# ----------------------------------------------------------------- local


@pytest.mark.parametrize("how", ["missing", "directory"])
def test_alias_maps_unusable_defers_local_delivery(root_only, make_postern, local_users, how):
    p = make_postern()
    db = db_of(p.etc / "aliases")
    db.unlink()
    if how == "directory":
        db.mkdir()
    token = f"alias-{uuid.uuid4().hex}"
    submit(p, "ptalice@postern.test", token)
    p.wait_for_log(r"to=<ptalice@postern\.test>.*status=deferred \(alias database unavailable\)")
    assert not h.find_messages("ptalice", token)
    if db.is_dir():
        db.rmdir()
    p.newaliases()
    h.wait_for_messages("ptalice", token, timeout=60)
