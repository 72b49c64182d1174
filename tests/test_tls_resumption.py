"""TLS session resumption, as Postfix's session-cache parameters define it
(postconf(5): smtpd_tls_session_cache_timeout,
smtp_tls_session_cache_timeout), in rustls terms.

smtpd: master runs smtpd processes on demand, so a client's next
connection is often served by another process. Session tickets sealed
with a key every smtpd shares (data_directory/smtpd_ticket.key, mode
0600, new at each `postern start`, as Postfix's tlsmgr keys) resume
there: `openssl s_client -sess_out`, every smtpd told to finish, then
`-sess_in` on a new process says `Reused`, for TLS 1.2 and 1.3; with
smtpd_tls_session_cache_timeout = 0 it does not. At smtpd_tls_loglevel 2
smtpd logs Postfix's "Reusing old session (RFC 5077 session ticket)".

smtp: one smtp process resumes its session with the same next hop (a
private Postfix 3.7 at smtpd_tls_loglevel 2 logs "Reusing old session");
with smtp_tls_session_cache_timeout = 0 it does not.
"""

import os
import re
import signal
import stat
import time
import uuid
from pathlib import Path

import pytest

import postern_harness as h
from postfix_peer import TestCA, postfix_peer  # noqa: F401  (the fixture)
from test_tls_settings import certs, dual, s_client  # noqa: F401  (certs: the fixture)


def smtpd_pids(p):
    return [c for c in h.descendants_of(p.master_pid()) if h.proc_name(c) == "smtpd"]


def drain_smtpds(p):
    """Tells every smtpd to finish (master's reload signal to one
    process): the next client gets a new process."""
    for pid in smtpd_pids(p):
        os.kill(pid, signal.SIGHUP)
    h.wait_for(lambda: not smtpd_pids(p), 20, what="every smtpd gone")


def data_directory(p):
    r = p.postconf("-h", "data_directory")
    assert r.returncode == 0, h.describe(r)
    return Path(r.stdout.strip())


@pytest.mark.parametrize("version", ["1.2", "1.3"])
def test_another_smtpd_process_resumes_the_session(make_postern, certs, tmp_path,  # noqa: F811
                                                    version):
    p = make_postern(params=dual(certs, smtpd_tls_loglevel="2"))
    sess = tmp_path / "sess.pem"
    flag = "-tls1_2" if version == "1.2" else "-tls1_3"
    r1 = s_client(p.port, flag, "-sess_out", str(sess))
    assert f"New, TLSv{version}" in r1.stdout, h.describe(r1)
    assert sess.exists() and sess.stat().st_size > 0, h.describe(r1)
    first = smtpd_pids(p)
    assert first, "no smtpd"
    drain_smtpds(p)

    r2 = s_client(p.port, flag, "-sess_in", str(sess))
    assert f"Reused, TLSv{version}" in r2.stdout, h.describe(r2)
    second = smtpd_pids(p)
    assert second and not set(first) & set(second), (first, second)
    p.wait_for_log(r"post(fix|ern)/smtpd\[\d+\]: \S+\[127\.0\.0\.1\]: Reusing old session "
                   r"\(RFC 5077 session ticket\)$")
    # Postfix's ticket lines at level 2: issued at the first session,
    # decrypted (and a new one issued) at the second.
    text = p.log_text()
    issued = re.findall(r"smtpd\[\d+\]: \S+\[127\.0\.0\.1\]: Issuing session ticket, "
                        r"key expiration: (\d+)$", text, re.M)
    decrypted = re.findall(r"smtpd\[\d+\]: \S+\[127\.0\.0\.1\]: Decrypting session ticket, "
                           r"key expiration: (\d+)$", text, re.M)
    assert issued and len(decrypted) == 1, text[-3000:]
    assert time.time() < int(decrypted[0]) <= time.time() + 2 * 3600, decrypted

    key = data_directory(p) / "smtpd_ticket.key"
    st = key.stat()
    assert stat.S_IMODE(st.st_mode) == 0o600, oct(st.st_mode)
    assert st.st_uid == os.geteuid()

    # A new start makes a new key: the old ticket no longer resumes.
    r = p.postern("stop")
    assert r.returncode == 0, h.describe(r)
    before = key.read_bytes()
    p.start()
    assert key.read_bytes() != before
    r3 = s_client(p.port, flag, "-sess_in", str(sess))
    assert f"New, TLSv{version}" in r3.stdout, h.describe(r3)


@pytest.mark.parametrize("version", ["1.2", "1.3"])
def test_session_cache_timeout_zero_resumes_nothing(make_postern, certs, tmp_path,  # noqa: F811
                                                     version):
    p = make_postern(params=dual(certs, smtpd_tls_session_cache_timeout="0"))
    sess = tmp_path / "sess.pem"
    flag = "-tls1_2" if version == "1.2" else "-tls1_3"
    r1 = s_client(p.port, flag, "-sess_out", str(sess))
    assert f"New, TLSv{version}" in r1.stdout, h.describe(r1)
    if sess.exists() and sess.stat().st_size > 0:
        # Same process, then another: neither resumes.
        r2 = s_client(p.port, flag, "-sess_in", str(sess))
        assert f"New, TLSv{version}" in r2.stdout, h.describe(r2)
        drain_smtpds(p)
        r3 = s_client(p.port, flag, "-sess_in", str(sess))
        assert f"New, TLSv{version}" in r3.stdout, h.describe(r3)


def test_session_cache_database_accepted_and_documented(make_postern):
    p = make_postern(params={
        "smtpd_tls_session_cache_database": "btree:${data_directory}/smtpd_scache",
        "smtp_tls_session_cache_database": "btree:${data_directory}/smtp_scache",
    }, start=False)
    r = p.postern("check")
    assert r.returncode == 0 and "scache" not in r.stderr, h.describe(r)
    page = (Path(h.REPO) / "man" / "postconf.5").read_text()
    entry = page.split(".B smtpd_tls_session_cache_database\n", 1)[1].split(".TP", 1)[0]
    assert "session tickets" in entry and "no cache database is needed" in entry, entry


def send_one(p, rcpt):
    token = "pt-" + uuid.uuid4().hex
    code, text = p.send("s@example.org", [rcpt],
                        h.crlf(f"From: <s@example.org>\nSubject: {token}\n\nbody\n"))
    assert code == 250, text
    return token


@pytest.mark.parametrize("timeout", ["3600s", "0"])
def test_smtp_client_resumes_with_the_same_next_hop(make_postern, postfix_peer,  # noqa: F811
                                                    tmp_path, timeout):
    ca = TestCA(tmp_path / "ca", names=["localhost"])
    far = postfix_peer(tls=ca, params={"smtpd_tls_loglevel": "2"})
    p = make_postern({"relayhost": f"[127.0.0.1]:{far.port}",
                      "smtp_tls_security_level": "may", "smtp_tls_loglevel": "2",
                      "smtp_tls_session_cache_timeout": timeout,
                      # A new connection (and handshake) for each message.
                      "smtp_connection_cache_on_demand": "no"})
    for _ in range(2):
        token = send_one(p, "u@far.test")
        far.wait_for(token, timeout=40)
    established = re.findall(r"TLS connection established from", far.log_text())
    assert len(established) == 2, far.log_text()[-3000:]
    reused = re.findall(r"smtpd\[\d+\]: \S+: Reusing old session", far.log_text())
    if timeout == "0":
        assert reused == [], far.log_text()[-3000:]
        assert not p.log_search(r"Reusing old session")
    else:
        assert len(reused) == 1, far.log_text()[-3000:]
        p.wait_for_log(r"post(fix|ern)/smtp\[\d+\]: 127\.0\.0\.1\[127\.0\.0\.1\]:\d+: "
                       r"Reusing old session$")
        # The resumed session is logged as the first one was.
        assert len(p.log_findall(r"Untrusted TLS connection established to")) == 2


def test_empty_ticket_cipher_turns_tickets_off(make_postern, certs, tmp_path):  # noqa: F811
    """Postfix: an empty tls_session_ticket_cipher disables session
    tickets; TLS 1.2 sessions then resume by session ID, with the smtpd
    process that made them only."""
    p = make_postern(params=dual(certs, tls_session_ticket_cipher="", smtpd_tls_loglevel="2"))
    sess = tmp_path / "sess.pem"
    r1 = s_client(p.port, "-tls1_2", "-sess_out", str(sess))
    assert "New, TLSv1.2" in r1.stdout, h.describe(r1)
    assert "TLS session ticket:" not in r1.stdout, h.describe(r1)
    r2 = s_client(p.port, "-tls1_2", "-sess_in", str(sess))
    assert "Reused, TLSv1.2" in r2.stdout, h.describe(r2)
    p.wait_for_log(r"smtpd\[\d+\]: \S+\[127\.0\.0\.1\]: Reusing old session$")
    assert not p.log_search(r"Issuing session ticket")
    drain_smtpds(p)
    r3 = s_client(p.port, "-tls1_2", "-sess_in", str(sess))
    assert "New, TLSv1.2" in r3.stdout, h.describe(r3)
