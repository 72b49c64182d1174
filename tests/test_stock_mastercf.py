"""Postfix's own master.cf, unchanged: Postern starts on the stock file
of Postfix 3.7 (Debian's /usr/share/postfix/master.cf.dist, only the
smtp listen address changed) and delivers local, relayed and piped mail;
`postern check` on a copy of Debian's /etc/postfix (main.cf and
master.cf) exits 0 with warnings only.
"""

import os
import re
import shutil
import tempfile
import uuid
from pathlib import Path

import pytest

import postern_harness as h
from postern_harness import wait_for

STOCK = Path("/usr/share/postfix/master.cf.dist")
DEBIAN_ETC = Path("/etc/postfix")
STOCK_MAILDROP = "/usr/bin/maildrop"


def new_token():
    return "pt" + uuid.uuid4().hex[:16]


def stock_text():
    if not STOCK.exists():
        pytest.skip(f"{STOCK} is missing (Debian's postfix package)")
    return STOCK.read_text()


@pytest.fixture
def vmail():
    if not h.is_root():
        pytest.skip("needs root")
    return h.ensure_system_user("vmail")


@pytest.fixture
def scratch(vmail):
    d = Path(tempfile.mkdtemp(prefix="pt-stock-"))
    os.chmod(d, 0o1777)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def test_stock_master_cf_starts_and_delivers(make_postern, local_users, sink, vmail, scratch):
    text = stock_text()
    # The stock maildrop service runs /usr/bin/maildrop, which is not
    # installed here: a stand-in at another path, in this copy only.
    if not os.access(STOCK_MAILDROP, os.X_OK):
        stand_in = scratch / "maildrop"
        stand_in.write_text(f"#!/bin/sh\nprintf '%s\\n' \"$@\" > {scratch}/argv\n"
                            f"id -un > {scratch}/user\ncat > {scratch}/msg\n")
        os.chmod(stand_in, 0o755)
        assert text.count(f"argv={STOCK_MAILDROP} ") == 1
        text = text.replace(f"argv={STOCK_MAILDROP} ", f"argv={stand_in} ")
    routes = (f"relay.test smtp:[127.0.0.1]:{sink.port}\n"
              "piped.test maildrop:\n")
    p = make_postern(
        params={"transport_maps": lambda p: f"texthash:{p.etc}/transport",
                "maildrop_destination_recipient_limit": "1"},
        files={"etc/transport": routes}, start=False)
    # Only the smtp listen address changes.
    stock_smtp = re.compile(r"^smtp(\s+inet\s)", re.M)
    assert len(stock_smtp.findall(text)) == 1
    p.write_file("etc/master.cf", stock_smtp.sub(rf"127.0.0.1:{p.port}\1", text))
    r = p.postern("check")
    assert r.returncode == 0, h.describe(r)
    assert not re.search(r"postern: (fatal|error|panic):", r.stderr), r.stderr
    for service in ("tlsmgr/unix (tlsmgr)", "bounce/unix (bounce)", "postlog/unix-dgram (postlogd)",
                    "showq/unix (showq)", "error/unix (error)", "discard/unix (discard)"):
        assert f"service {service}: not run" in r.stderr, r.stderr
    p.start()
    # The notes once at start.
    p.wait_for_log(r"master\[\d+\]: .*service rewrite/unix \(trivial-rewrite\): not run")
    assert len(p.log_findall(r"service scache/unix \(scache\): not run")) == 1
    token = new_token()
    rcpts = [f"ptalice@{h.MYHOSTNAME}", "someone@relay.test", "Carol@piped.test"]
    code, reply = p.send("sender@remote.example", rcpts, f"Subject: {token}\n\nbody {token}\n")
    assert code == 250, reply
    assert h.wait_for_messages("ptalice", token)
    (m,) = sink.wait_for(token)
    assert m.rcpt_tos == ["someone@relay.test"]
    if not os.access(STOCK_MAILDROP, os.X_OK):
        wait_for(lambda: (scratch / "msg").exists() and token in (scratch / "msg").read_text(), 30,
                 what="the maildrop service's run")
        # flags=DRXhu user=vmail argv=... -d ${recipient}
        assert (scratch / "argv").read_text() == "-d\ncarol@piped.test\n"
        assert (scratch / "user").read_text().strip() == "vmail"
        msg = (scratch / "msg").read_text()
        assert msg.startswith("Return-Path: <sender@remote.example>\nDelivered-To: carol@piped.test\n"), msg
    p.wait_for_log(r"to=<Carol@piped\.test>, relay=maildrop.*status=sent")
    p.wait_for_log(r"to=<someone@relay\.test>, relay=127\.0\.0\.1\[127\.0\.0\.1\]:\d+.*status=sent")


def test_check_on_debian_etc_postfix_warns_only(tmp_path, system_accounts):
    if not (DEBIAN_ETC / "main.cf").exists() or not (DEBIAN_ETC / "master.cf").exists():
        pytest.skip("no /etc/postfix/main.cf and master.cf (Debian's postfix package)")
    etc = tmp_path / "etc"
    etc.mkdir()
    shutil.copy(DEBIAN_ETC / "master.cf", etc / "master.cf")
    # The administrator's main.cf as it is, with the queue kept away from
    # the system's own.
    main = (DEBIAN_ETC / "main.cf").read_text()
    main += (f"\nqueue_directory = {tmp_path}/queue\ndata_directory = {tmp_path}/data\n"
             f"daemon_directory = {h.BIN_DIR}\n")
    (etc / "main.cf").write_text(main)
    for d in ("queue", "data"):
        (tmp_path / d).mkdir()
    r = h.run([h.BIN_DIR / "postern", "-c", etc, "check"])
    # The only errors: the tables Postfix's postmap/newaliases built in
    # Berkeley DB format (/etc/aliases.db), which the daemons could not
    # read, each with the command that rebuilds it (issue #27 point 4).
    errors = [ln for ln in r.stderr.splitlines() if ": error: " in ln]
    assert r.returncode == (1 if errors else 0), h.describe(r)
    for line in errors:
        assert "Berkeley DB" in line and re.search(r"run: post(map|alias) \S+|"
                                                   r"postmap \S+", line), line
    for line in r.stderr.splitlines():
        assert line.startswith("postern: warning: ") or ": not run: " in line \
            or line in errors, line
    assert "service postlog/unix-dgram (postlogd): not run" in r.stderr


def test_stock_master_cf_with_postscreen_enabled(make_postern, local_users):
    """The stock file's postscreen lines uncommented (and the plain smtpd
    line commented out), as Postfix's POSTSCREEN_README says: postscreen
    serves the port and hands the client to the smtpd pass service; the
    dnsblog and tlsproxy services are noted."""
    text = stock_text()
    text = re.sub(r"^smtp(\s+inet\s.*smtpd)$", r"#smtp\1", text, flags=re.M)
    for name, command in (("smtp", "postscreen"), ("smtpd", "smtpd"), ("dnsblog", "dnsblog"),
                          ("tlsproxy", "tlsproxy")):
        text, n = re.subn(rf"^#({name}\s+(inet|pass|unix)\s.*\s{command})$", r"\1", text, flags=re.M)
        assert n == 1, name
    p = make_postern(start=False)
    text, n = re.subn(r"^smtp(\s+inet\s.*postscreen)$", rf"127.0.0.1:{p.port}\1", text, flags=re.M)
    assert n == 1
    p.write_file("etc/master.cf", text)
    r = p.postern("check")
    assert r.returncode == 0, h.describe(r)
    assert f"service 127.0.0.1:{p.port}/inet (postscreen)" not in r.stderr, r.stderr
    assert "service smtpd/pass (smtpd)" not in r.stderr, r.stderr
    assert "service dnsblog/unix (dnsblog): not run" in r.stderr, r.stderr
    p.start()
    token = new_token()
    code, reply = p.send("sender@remote.example", [f"ptbob@{h.MYHOSTNAME}"], f"Subject: {token}\n\nx\n")
    assert code == 250, reply
    assert h.wait_for_messages("ptbob", token)
    assert p.log_search(r"postfix/smtpd\[\d+\]: connect from")
    # Loopback is in mynetworks: the default postscreen_access_list.
    assert p.log_search(r"postfix/postscreen\[\d+\]: ALLOWLISTED \[127\.0\.0\.1\]:\d+")
