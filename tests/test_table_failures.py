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

import os
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


def start_then_break(p, source, how):
    """Builds the `hash:` table of `source` with Postern's postmap, starts
    Postern (a table that cannot be opened stops `postern start`: see
    test_start_refuses_an_unusable_table), then breaks the table as `how`
    says and reloads: the run-time path, a table that goes bad under a
    running mail system."""
    r = h.run_tool(p, "postmap", f"hash:{source}")
    assert r.returncode == 0, h.describe(r)
    p.start()
    break_table(source, how)
    r = p.postern("reload")
    assert r.returncode == 0, h.describe(r)


def fix_table(p, source, reload=True):
    """Rebuilds the table with Postern's postmap and reloads (without
    `reload`, the daemons must notice the new file themselves)."""
    db = db_of(source)
    if db.is_dir():
        shutil.rmtree(db)
    elif db.exists():
        db.unlink()
    r = h.run_tool(p, "postmap", f"hash:{source}")
    assert r.returncode == 0, h.describe(r)
    if reload:
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
    start_then_break(p, p.etc / "relay_domains", how)
    code, text = h.wait_for(
        lambda: (lambda r: r if r[0] != 250 else None)(rcpt_reply(p.port, "user@relayed.test")),
        20, what="RCPT no longer accepted once the table is broken")
    assert (code, text.decode()) == (451, "4.3.0 <user@relayed.test>: Temporary lookup failure")
    # A domain no table knows is still refused for relaying... only once
    # the table answers: while it cannot, nothing is refused for good.
    code, text = rcpt_reply(p.port, "user@elsewhere.test")
    assert code == 451, (code, text)
    p.wait_for_log(r"relay_domains.*lookup error for \"relayed\.test\"|"
                   r"hash:\S*relay_domains lookup error for \"relayed\.test\"")
    # A table that was never built is noticed when postmap builds it: no
    # reload needed.
    fix_table(p, p.etc / "relay_domains", reload=how != "missing")
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
    start_then_break(p, p.etc / "virtual", how)
    # smtpd's recipient validation asks the table.
    code, text = h.wait_for(
        lambda: (lambda r: r if r[0] != 250 else None)(rcpt_reply(p.port, "info@virt.test")),
        20, what="RCPT no longer accepted once the table is broken")
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
    start_then_break(p, p.etc / "transport", how)
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
    start_then_break(p, p.etc / "sasl_passwd", how)
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
    start_then_break(p, p.etc / "tls_policy", how)
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
        "virtual_mailbox_maps": "/etc/postern-test/vmailbox",
        "sender_canonical_maps": lambda p: f"hash:{p.etc}/canonical",
        "smtpd_recipient_restrictions": lambda p:
            f"check_recipient_access cdb:{p.etc}/nothere, reject_unauth_destination",
        "smtpd_restriction_classes": "friends",
        "friends": lambda p: f"check_sender_access hash:{p.etc}/friends",
    }, files={"etc/canonical": "a@b.test c@d.test\n"}, start=False)
    p.newaliases()
    r = h.run_tool(p, "postmap", f"hash:{p.etc}/canonical")
    assert r.returncode == 0, h.describe(r)
    # The source edited after the last postmap.
    import time
    later = time.time() + 10
    os.utime(p.etc / "canonical", (later, later))
    r = p.postern("check")
    assert r.returncode == 1, h.describe(r)
    err = r.stderr
    assert re.search(r"error: .*transport_maps: .*unsupported dictionary type: nosuchtype", err), err
    assert re.search(r"error: .*virtual_mailbox_maps: table /etc/postern-test/vmailbox: "
                     r"expected type:name", err), err
    assert re.search(rf"error: .*sender_canonical_maps: database {re.escape(str(p.etc))}"
                     rf"/canonical\.db is older than source file .*canonical; "
                     rf"run: postmap hash:", err), err
    assert re.search(rf"error: .*smtpd_recipient_restrictions: .*{re.escape(str(p.etc))}"
                     rf"/nothere\.cdb.*run: postmap cdb:", err), err
    assert re.search(rf"error: .*friends: .*{re.escape(str(p.etc))}/friends\.db.*"
                     rf"run: postmap hash:", err), err


@pytest.mark.parametrize("how", BROKEN + ["stale"])
def test_start_refuses_an_unusable_table(make_postern, how):
    """A file table that cannot be opened, in a foreign format, or whose
    index is older than its source stops `postern start` (nothing runs)
    with the file, the parameter and the command that fixes it; the same
    table in a master.cf `-o` override too. Once rebuilt, it starts."""
    p = make_postern(params={
        "virtual_alias_maps": lambda p: f"hash:{p.etc}/virtual",
    }, files={"etc/virtual": "a@b.test c@d.test\n", "etc/access": "x@y.test REJECT\n"},
        master_cf_extra=("submission inet n - n - - smtpd -o smtpd_recipient_restrictions="
                         "check_recipient_access,hash:{etc}/access,permit_mynetworks,reject",),
        start=False)
    p.master_cf.write_text(p.master_cf.read_text().replace("{etc}", str(p.etc)))
    p.newaliases()
    source = p.etc / "virtual"
    assert h.run_tool(p, "postmap", f"hash:{p.etc}/access").returncode == 0
    if how == "stale":
        import time
        assert h.run_tool(p, "postmap", f"hash:{source}").returncode == 0
        later = time.time() + 10
        os.utime(source, (later, later))
    else:
        break_table(source, how)
    db_of(p.etc / "access").unlink()
    r = p.postern("start")
    assert r.returncode == 1, h.describe(r)
    assert p.postern("status").returncode != 0, "master runs"
    line = [ln for ln in r.stderr.splitlines() if "virtual_alias_maps" in ln]
    assert len(line) == 1 and "error:" in line[0], h.describe(r)
    assert re.search(r"/main\.cf, line \d+: virtual_alias_maps: ", line[0]), line[0]
    assert f"postmap hash:{source}" in line[0] and str(db_of(source)) in line[0], line[0]
    line = [ln for ln in r.stderr.splitlines() if "access.db" in ln]
    assert len(line) == 1 and re.search(
        r"/master\.cf, line \d+: service submission/inet: -o smtpd_recipient_restrictions: "
        r".*run: postmap hash:", line[0]), h.describe(r)
    assert "not starting" in r.stderr, r.stderr
    for t in (source, p.etc / "access"):
        db = db_of(t)
        shutil.rmtree(db) if db.is_dir() else db.unlink() if db.exists() else None
        os.utime(t)  # (the stale case's source: edited in the future)
        assert h.run_tool(p, "postmap", f"hash:{t}").returncode == 0
    p.start()


def test_server_tables_stop_start_only_for_their_configuration(make_postern):
    """A server table (mysql:) whose server does not answer does not stop
    `postern start`: its lookups defer at run time (issue #24 point 7).
    One whose configuration file is missing, or does not parse, does."""
    port = h.free_port()  # nothing listens there
    good = f"hosts = 127.0.0.1:{port}\nuser = u\npassword = p\ndbname = d\n" \
        "query = SELECT goto FROM alias WHERE address = '%s'\n"
    p = make_postern(params={
        "virtual_alias_domains": "virt.test",
        "virtual_alias_maps": lambda p: f"mysql:{p.etc}/virtual.cf",
    }, files={"etc/virtual.cf": "hosts = 127.0.0.1\nuser = u\n"}, start=False)
    p.newaliases()
    # No query: does not parse.
    r = p.postern("start")
    assert r.returncode == 1 and "virtual_alias_maps" in r.stderr \
        and "virtual.cf" in r.stderr, h.describe(r)
    (p.etc / "virtual.cf").unlink()
    r = p.postern("start")
    assert r.returncode == 1 and "virtual_alias_maps" in r.stderr \
        and "virtual.cf" in r.stderr, h.describe(r)
    (p.etc / "virtual.cf").write_text(good)
    p.start()
    code, text = rcpt_reply(p.port, "info@virt.test")
    assert (code, text.decode()) == (451, "4.3.0 <info@virt.test>: Temporary lookup failure")


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
        # Postern does not start with them missing: built, started, then
        # removed (the run-time path).
        p = make_postern(params=common, start=False)
        for t in ("relay", "virtual"):
            assert h.run_tool(p, "postmap", f"hash:{work}/{t}").returncode == 0
        p.start()
        for t in ("relay", "virtual"):
            db_of(work / t).unlink()
        assert p.postern("reload").returncode == 0

        def replies(port):
            out = [rcpt_reply(port, "user@relayed.test", source=None),
                   rcpt_reply(port, "info@virt.test", source=None)]
            return [(c, t.decode()) for c, t in out]
        theirs = replies(far.port)
        assert h.wait_for(lambda: replies(p.port) == theirs, 20,
                          what="Postern's replies as Postfix's"), (replies(p.port), theirs)
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


@pytest.mark.skipif(not postfix_available(), reason="Postfix is not installed")
def test_access_table_unusable_reply_is_postfix_reply(root_only, make_postern,
                                                      postfix_peer):  # noqa: F811
    """check_recipient_access with a table never built: Postfix answers as
    if the table had said `451 4.3.5 Server configuration error`."""
    work = Path(h.tempfile.mkdtemp(prefix="pt-tables-"))
    try:
        (work / "access").write_text("user@any.test REJECT\n")
        common = {"smtpd_recipient_restrictions":
                  f"check_recipient_access hash:{work}/access, permit"}
        far = postfix_peer(params=common)
        p = make_postern(params=common, start=False)
        assert h.run_tool(p, "postmap", f"hash:{work}/access").returncode == 0
        p.start()
        db_of(work / "access").unlink()
        assert p.postern("reload").returncode == 0
        ours = h.wait_for(
            lambda: (lambda r: r if r[0] != 554 else None)(
                rcpt_reply(p.port, "user@any.test", source=None)),
            20, what="the table's failure seen by smtpd")
        theirs = rcpt_reply(far.port, "user@any.test", source=None)
        assert (ours[0], ours[1].decode()) == (theirs[0], theirs[1].decode()) == (
            451, "4.3.5 <user@any.test>: Recipient address rejected: Server configuration error")
    finally:
        shutil.rmtree(work, ignore_errors=True)


def test_sendmail_mail_waits_in_maildrop_while_cleanup_cannot_read_a_table(
        root_only, make_postern, sink):
    """Local submission: pickup leaves the message in maildrop/ while
    cleanup defers it (virtual_alias_maps unreadable), and hands it over
    once the table is rebuilt."""
    p = make_postern(params={
        "virtual_alias_domains": "virt.test",
        "virtual_alias_maps": lambda p: f"hash:{p.etc}/virtual",
        "relayhost": f"[127.0.0.1]:{sink.port}",
    }, files={"etc/virtual": "info@virt.test dest@far.test\n"}, start=False)
    start_then_break(p, p.etc / "virtual", "missing")
    token = f"maildrop-{uuid.uuid4().hex}"
    submit(p, "info@virt.test", token)
    p.wait_for_log(r"map lookup problem for info@virt\.test -- message not accepted")
    assert len(list((p.queue / "maildrop").iterdir())) == 1
    fix_table(p, p.etc / "virtual")
    assert p.postern("flush").returncode == 0
    msg = sink.wait_for(token, timeout=120)[0]
    assert msg.rcpt_tos == ["dest@far.test"]
