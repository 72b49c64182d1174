"""smtpd's STARTTLS, implicit TLS (smtps) and SASL AUTH through a real
Dovecot, driven by real clients: Python's smtplib, swaks, openssl s_client.

Certificates are made here with openssl: a test CA and a leaf signed by it
(rustls refuses a CA:TRUE certificate as a server's own).
"""

import base64
import os
import re
import signal
import shutil
import smtplib
import socket
import ssl
import tempfile
import uuid
from pathlib import Path

import pytest

import postern_harness as h
from dovecot import Dovecot, dovecot  # noqa: F401  (the fixture)

USER = "alice@example.test"
PASSWORD = "s3cret-pw"


def new_token():
    return "pt-" + uuid.uuid4().hex


def make_certs(d):
    """A CA and a leaf for postern.test / 127.0.0.1 in directory d;
    returns {ca, cert, key, chain}."""
    d.mkdir(parents=True, exist_ok=True)

    def ossl(*args):
        r = h.run(["openssl", *args], timeout=60, cwd=d)
        assert r.returncode == 0, h.describe(r)

    ossl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem",
         "-days", "2", "-subj", "/CN=Postern Test CA",
         "-addext", "basicConstraints=critical,CA:TRUE",
         "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    ossl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "leaf.key", "-out", "leaf.csr",
         "-subj", "/CN=postern.test")
    (d / "leaf.ext").write_text(
        "basicConstraints=critical,CA:FALSE\n"
        "keyUsage=critical,digitalSignature,keyEncipherment\n"
        "extendedKeyUsage=serverAuth\n"
        "subjectAltName=DNS:postern.test,IP:127.0.0.1\n")
    ossl("x509", "-req", "-in", "leaf.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
         "-CAcreateserial", "-out", "leaf.pem", "-days", "2", "-extfile", "leaf.ext")
    # Postfix's smtpd_tls_chain_files form: key, then the certificates.
    (d / "chain.pem").write_text((d / "leaf.key").read_text() + (d / "leaf.pem").read_text()
                                 + (d / "ca.pem").read_text())
    for f in d.iterdir():
        f.chmod(0o644)
    return {"ca": d / "ca.pem", "cert": d / "leaf.pem", "key": d / "leaf.key",
            "chain": d / "chain.pem"}


@pytest.fixture(scope="module")
def certs():
    # Readable by mail_owner: smtpd reads its key after master dropped
    # its privileges.
    d = Path(tempfile.mkdtemp(prefix="postern-certs-"))
    d.chmod(0o755)
    yield make_certs(d)
    shutil.rmtree(d, ignore_errors=True)


def client_context(certs):
    ctx = ssl.create_default_context(cafile=str(certs["ca"]))
    ctx.check_hostname = False  # we connect to 127.0.0.1 by address
    return ctx


def tls_params(certs, level="may", **more):
    p = {
        "smtpd_tls_security_level": level,
        "smtpd_tls_cert_file": str(certs["cert"]),
        "smtpd_tls_key_file": str(certs["key"]),
        "smtpd_tls_received_header": "yes",
        "smtpd_tls_loglevel": "1",
    }
    p.update(more)
    return p


def sasl_params(dc, **more):
    p = {
        "smtpd_sasl_auth_enable": "yes",
        "smtpd_sasl_type": "dovecot",
        "smtpd_sasl_path": str(dc.auth_socket),
    }
    p.update(more)
    return p


def message(token, to="x@example.net"):
    return h.crlf(f"From: <{USER}>\nTo: <{to}>\nSubject: {token}\n\nbody {token}\n")


def relay_params(sink):
    return {"relayhost": f"[127.0.0.1]:{sink.port}"}


# --------------------------------------------------------------------------
# STARTTLS


def test_starttls_smtplib_received_header_and_log(make_postern, certs, sink):
    p = make_postern(params={**tls_params(certs), **relay_params(sink)})
    token = new_token()
    with p.smtp() as s:
        s.ehlo("client.example")
        assert s.has_extn("starttls")
        code, _ = s.starttls(context=client_context(certs))
        assert code == 220
        # The session starts over: a new EHLO, and no STARTTLS offered again.
        s.ehlo("client.example")
        assert not s.has_extn("starttls")
        cipher = s.sock.cipher()
        version = s.sock.version()
        code, text = h.smtp_transaction(s, "sender@example.org", ["rcpt@example.net"],
                                        message(token))
        assert code == 250, text
    m = sink.wait_for(token)[0]
    received = h.header_values(m.content, "Received")
    ours = [r for r in received if "by postern.test" in r]
    assert ours, received
    r = ours[0]
    assert " with ESMTPS id " in r, r
    assert f"(using {version} with cipher {cipher[0]} " in r, r
    assert re.search(r"\(\d+/\d+ bits\)[ )]", r), r
    line = p.wait_for_log(r"Anonymous TLS connection established from unknown\[127\.0\.0\.1\]: "
                          r"(TLSv1\.[23]) with cipher (\S+) \((\d+)/(\d+) bits\)")
    assert line.group(1) == version and line.group(2) == cipher[0]
    assert int(line.group(3)) == cipher[2]


@pytest.mark.parametrize("version", ["1.2", "1.3"])
def test_openssl_s_client_starttls_versions(make_postern, certs, version):
    p = make_postern(params=tls_params(certs))
    r = h.run(["openssl", "s_client", "-starttls", "smtp", "-connect", f"127.0.0.1:{p.port}",
               f"-tls{version.replace('.', '_')}", "-CAfile", certs["ca"],
               "-verify_return_error", "-servername", "postern.test", "-ign_eof"],
              input=b"EHLO client.example\r\nQUIT\r\n", timeout=30)
    out = r.stdout
    assert f"Protocol  : TLSv{version}" in out or f"New, TLSv{version}" in out, h.describe(r)
    assert "Verify return code: 0 (ok)" in out, h.describe(r)
    assert "250-postern.test" in out and "221 2.0.0 Bye" in out, h.describe(r)
    p.wait_for_log(rf"Anonymous TLS connection established from unknown\[127\.0\.0\.1\]: "
                   rf"TLSv{re.escape(version)} with cipher")


def test_starttls_discards_pipelined_commands(make_postern, certs):
    """CVE-2011-0411: commands sent in the same packet as STARTTLS must not
    be executed after the handshake."""
    p = make_postern(params=tls_params(certs))
    raw = socket.create_connection(("127.0.0.1", p.port), timeout=20)
    f = raw.makefile("rb")
    assert f.readline().startswith(b"220")
    raw.sendall(b"EHLO c\r\n")
    while True:
        line = f.readline()
        if line.startswith(b"250 "):
            break
    raw.sendall(b"STARTTLS\r\nNOOP\r\nMAIL FROM:<evil@example.org>\r\n")
    assert f.readline().startswith(b"220 2.0.0 Ready to start TLS")
    ctx = client_context(certs)
    tls = ctx.wrap_socket(raw, server_hostname="postern.test")
    tf = tls.makefile("rb")
    # Anything left from the plaintext commands would answer first.
    tls.sendall(b"RCPT TO:<x@postern.test>\r\n")
    assert tf.readline().startswith(b"503 5.5.1 Error: need MAIL command")
    tls.sendall(b"QUIT\r\n")
    assert tf.readline().startswith(b"221")
    tls.close()


def test_security_level_encrypt(make_postern, certs):
    p = make_postern(params=tls_params(certs, level="encrypt"))
    with p.smtp() as s:
        s.ehlo("client.example")
        assert s.has_extn("starttls")
        code, text = s.mail("a@example.org")
        assert (code, text) == (530, b"5.7.0 Must issue a STARTTLS command first")
        assert s.noop()[0] == 250
        s.starttls(context=client_context(certs))
        s.ehlo("client.example")
        assert s.mail("a@example.org")[0] == 250
        assert s.rcpt("postmaster@postern.test")[0] == 250


def test_security_level_none_offers_no_starttls(make_postern):
    p = make_postern()
    with p.smtp() as s:
        s.ehlo("c")
        assert not s.has_extn("starttls")
        assert s.docmd("STARTTLS")[0] == 502


def test_missing_certificate_is_a_local_problem(make_postern, tmp_path):
    """`postern start` refuses a certificate it cannot read
    (test_tls_start.py); one that goes missing while the system runs is
    logged by the next smtpd, which serves without STARTTLS."""
    mine = make_certs(tmp_path / "certs")
    cert = tmp_path / "certs" / "moving.pem"
    cert.write_bytes(mine["cert"].read_bytes())
    cert.chmod(0o644)
    p = make_postern(params={"smtpd_tls_security_level": "may",
                             "smtpd_tls_cert_file": str(cert),
                             "smtpd_tls_key_file": str(mine["key"])})
    with p.smtp() as s:
        s.ehlo("c")
        assert s.has_extn("starttls")
    cert.unlink()
    for pid in h.descendants_of(p.master_pid()):
        if h.proc_name(pid) == "smtpd":
            os.kill(pid, signal.SIGHUP)  # drain: the next client gets a fresh smtpd
    h.wait_for(lambda: not any(h.proc_name(c) == "smtpd"
                               for c in h.descendants_of(p.master_pid())), 20)
    with p.smtp() as s:
        s.ehlo("c")
        assert not s.has_extn("starttls")
    p.wait_for_log(r"error: cannot load TLS certificate and key: .*moving\.pem")


def test_swaks_tls_and_chain_files(make_postern, certs, sink, swaks):
    p = make_postern(params={"smtpd_tls_security_level": "may",
                             "smtpd_tls_chain_files": str(certs["chain"]),
                             **relay_params(sink)})
    token = new_token()
    r = h.run([swaks, "--server", f"127.0.0.1:{p.port}", "--tls", "--tls-verify",
               "--tls-ca-path", certs["ca"], "--tls-sni", "postern.test",
               "--from", "s@example.org", "--to", "r@example.net",
               "--header", f"Subject: {token}"], timeout=60)
    assert r.returncode == 0, h.describe(r)
    assert "TLS started" in r.stdout, h.describe(r)
    sink.wait_for(token)


def test_smtps_wrappermode(make_postern, certs, sink, swaks):
    port = h.free_port()
    p = make_postern(
        params={**relay_params(sink), "smtpd_tls_cert_file": str(certs["cert"]),
                "smtpd_tls_key_file": str(certs["key"])},
        master_cf_extra=[f"127.0.0.1:{port} inet n - n - - smtpd"
                         " -o smtpd_tls_wrappermode=yes -o smtpd_tls_security_level=encrypt"])
    token = new_token()
    with smtplib.SMTP_SSL("127.0.0.1", port, timeout=30, context=client_context(certs)) as s:
        s.ehlo("client.example")
        assert not s.has_extn("starttls")
        code, text = h.smtp_transaction(s, "s@example.org", ["r@example.net"], message(token))
        assert code == 250, text
    sink.wait_for(token)
    token2 = new_token()
    r = h.run([swaks, "--server", f"127.0.0.1:{port}", "--tlsc", "--from", "s@example.org",
               "--to", "r@example.net", "--header", f"Subject: {token2}"], timeout=60)
    assert r.returncode == 0, h.describe(r)
    sink.wait_for(token2)


# --------------------------------------------------------------------------
# SASL with Dovecot


@pytest.fixture
def dc(dovecot):
    return dovecot(users={USER: PASSWORD, "bob@example.test": "bobpw"},
                   auth_failure_delay="1 secs")


def test_auth_plain_and_login_relay(make_postern, dc, sink):
    p = make_postern(params={**sasl_params(dc, smtpd_sasl_authenticated_header="yes"),
                             **relay_params(sink)})
    for mech in ("PLAIN", "LOGIN"):
        token = new_token()
        # From outside mynetworks: only authentication allows relaying.
        with p.smtp(source_address=("127.0.0.2", 0)) as s:
            s.ehlo("client.example")
            assert set(s.esmtp_features["auth"].split()) >= {"PLAIN", "LOGIN"}
            code, _ = s.mail("s@example.org")
            assert s.rcpt("r@example.net")[0] == 554
            s.rset()
            s.user, s.password = USER, PASSWORD
            code, text = s.auth(mech, getattr(s, "auth_" + mech.lower()),
                                initial_response_ok=(mech == "PLAIN"))
            assert (code, text) == (235, b"2.7.0 Authentication successful")
            code, text = h.smtp_transaction(s, USER, ["r@example.net"], message(token),
                                            mail_options=[f"AUTH=<{USER}>"])
            assert code == 250, text
        m = sink.wait_for(token)[0]
        rcv = [r for r in h.header_values(m.content, "Received") if "by postern.test" in r][0]
        assert " with ESMTPA id " in rcv, rcv
        assert f"(Authenticated sender: {USER})" in rcv, rcv
        p.wait_for_log(rf"client=unknown\[127\.0\.0\.2\], sasl_method={mech}, "
                       rf"sasl_username={re.escape(USER)}")


def test_auth_request_carries_both_addresses(make_postern, dovecot):
    """Dovecot learns both ends of the connection (lip, rip, lport, rport),
    as Postfix's smtpd tells it lip and rip."""
    d = dovecot(users={USER: PASSWORD}, extra_conf="auth_debug = yes\n")
    p = make_postern(params=sasl_params(d))
    with p.smtp(source_address=("127.0.0.2", 0)) as s:
        rport = s.sock.getsockname()[1]
        s.ehlo("client.example")
        s.user, s.password = USER, PASSWORD
        assert s.auth("PLAIN", s.auth_plain)[0] == 235
    h.wait_for(lambda: f"lip=127.0.0.1\trip=127.0.0.2\tlport={p.port}\trport={rport}"
               in d.log_text(), what="the AUTH request in Dovecot's debug log")


def test_auth_wrong_password(make_postern, dc):
    p = make_postern(params=sasl_params(dc))
    with p.smtp(source_address=("127.0.0.2", 0)) as s:
        s.ehlo("client.example")
        s.user, s.password = USER, "wrong"
        with pytest.raises(smtplib.SMTPAuthenticationError) as e:
            s.auth("LOGIN", s.auth_login, initial_response_ok=False)
        assert e.value.smtp_code == 535
        assert e.value.smtp_error.startswith(b"5.7.8 Error: authentication failed:")
        # The session goes on, unauthenticated.
        s.mail("s@example.org")
        assert s.rcpt("r@example.net")[0] == 554
    # fail2ban's postfix-sasl filter matches this line.
    line = p.wait_for_log(r"postfix/smtpd\[\d+\]: warning: unknown\[127\.0\.0\.2\]: "
                          r"SASL LOGIN authentication failed: (.*), sasl_username=(.*)$")
    # Dovecot gives no reason for a wrong password: Postfix 3.7 logs this.
    assert line.group(1) == "(reason unavailable)", line.group(0)
    assert line.group(2) == USER, line.group(0)


def test_auth_swaks_plain_and_inet_path(make_postern, dc, sink, swaks):
    p = make_postern(params={**sasl_params(dc, smtpd_sasl_path=f"inet:127.0.0.1:{dc.auth_port}"),
                             **relay_params(sink), "broken_sasl_auth_clients": "yes"})
    with p.smtp() as s:
        code, text = s.ehlo("c")
        assert b"\nAUTH=PLAIN LOGIN" in text and b"\nAUTH PLAIN LOGIN" in text, text
    token = new_token()
    r = h.run([swaks, "--server", f"127.0.0.1:{p.port}", "--auth", "PLAIN",
               "--auth-user", USER, "--auth-password", PASSWORD,
               "--from", USER, "--to", "r@example.net", "--header", f"Subject: {token}"],
              timeout=60)
    assert r.returncode == 0, h.describe(r)
    assert "235 2.7.0 Authentication successful" in r.stdout
    sink.wait_for(token)


def test_auth_relative_sasl_path(make_postern, dovecot):
    """smtpd_sasl_path = private/auth is relative to queue_directory."""
    p = make_postern(params={"smtpd_sasl_auth_enable": "yes", "smtpd_sasl_path": "private/auth"},
                     start=False)
    # As on a real host: the queue exists (owned by mail_owner) before
    # Dovecot is told to put its socket into private/.
    r = p.postern("check")
    assert r.returncode == 0, h.describe(r)
    dovecot(users={USER: PASSWORD}, auth_socket_path=str(p.queue / "private" / "auth"))
    p.start()
    with p.smtp() as s:
        s.ehlo("c")
        s.login(USER, PASSWORD)


def test_auth_without_server_is_temporary(make_postern, tmp_path):
    p = make_postern(params={"smtpd_sasl_auth_enable": "yes",
                             "smtpd_sasl_path": str(tmp_path / "no-such-socket")})
    with p.smtp() as s:
        s.ehlo("c")
        assert not s.has_extn("auth")
        code, _ = s.docmd("AUTH", "PLAIN " + base64.b64encode(b"\0a\0b").decode())
        assert code in (535, 454)
    p.wait_for_log(r"warning: SASL: Connect to .*no-such-socket failed")


def test_submission_service(make_postern, certs, dc, sink, swaks):
    """master.cf's submission entry, as Postfix ships it (commented out)."""
    sub = h.free_port()
    p = make_postern(
        params={**tls_params(certs, level="none"), **relay_params(sink),
                "smtpd_sasl_path": str(dc.auth_socket)},
        master_cf_extra=[
            f"127.0.0.1:{sub} inet n - n - - smtpd",
            "  -o syslog_name=postern/submission",
            "  -o smtpd_tls_security_level=encrypt",
            "  -o smtpd_sasl_auth_enable=yes",
            "  -o smtpd_tls_auth_only=yes",
            "  -o smtpd_relay_restrictions=permit_sasl_authenticated,reject",
        ])
    # Before STARTTLS: no AUTH, and nothing but 530.
    with smtplib.SMTP("127.0.0.1", sub, timeout=30) as s:
        s.ehlo("c")
        assert s.has_extn("starttls") and not s.has_extn("auth")
        assert s.docmd("AUTH", "PLAIN")[0] == 530
        assert s.mail("a@example.org")[0] == 530
        s.starttls(context=client_context(certs))
        s.ehlo("c")
        assert s.has_extn("auth")
        # Not authenticated: even from 127.0.0.1 (mynetworks) no relaying.
        assert s.mail("a@example.org")[0] == 250
        code, text = s.rcpt("r@example.net")
        assert code == 554, text
    token = new_token()
    r = h.run([swaks, "--server", f"127.0.0.1:{sub}", "--tls", "--auth", "LOGIN",
               "--auth-user", USER, "--auth-password", PASSWORD,
               "--from", USER, "--to", "r@example.net", "--header", f"Subject: {token}"],
              timeout=60)
    assert r.returncode == 0, h.describe(r)
    m = sink.wait_for(token)[0]
    rcv = [x for x in h.header_values(m.content, "Received") if "by postern.test" in x][0]
    assert " with ESMTPSA id " in rcv, rcv
    r = h.run([swaks, "--server", f"127.0.0.1:{sub}", "--tls", "--auth", "PLAIN",
               "--auth-user", USER, "--auth-password", "bad",
               "--from", USER, "--to", "r@example.net"], timeout=60)
    assert r.returncode != 0
    assert "535 5.7.8 Error: authentication failed" in r.stdout, h.describe(r)
    p.wait_for_log(r"postern/submission/smtpd\[\d+\]: warning: unknown\[127\.0\.0\.1\]: "
                   r"SASL PLAIN authentication failed")


# --------------------------------------------------------------------------
# Who may relay


def test_open_relay_matrix(make_postern, dc):
    """Inside/outside mynetworks x authenticated or not x local /
    relay_domains / remote recipient, on the smtp port and on a submission
    port (permit_sasl_authenticated, reject)."""
    sub = h.free_port()
    p = make_postern(
        params={**sasl_params(dc), "relay_domains": "relay.test",
                "mynetworks": "127.0.0.1/32"},
        master_cf_extra=[f"127.0.0.1:{sub} inet n - n - - smtpd"
                         " -o smtpd_relay_restrictions=permit_sasl_authenticated,reject"])
    rcpts = {"local": "root@postern.test", "relay_domains": "user@relay.test",
             "remote": "user@example.net"}
    got = {}
    for port_name, port in (("smtp", p.port), ("submission", sub)):
        for src in ("127.0.0.1", "127.0.0.2"):
            for authed in (False, True):
                with smtplib.SMTP("127.0.0.1", port, timeout=30, source_address=(src, 0)) as s:
                    s.ehlo("client.example")
                    if authed:
                        s.login(USER, PASSWORD)
                    assert s.mail("sender@example.org")[0] == 250
                    for kind, rcpt in rcpts.items():
                        code, text = s.rcpt(rcpt)
                        got[(port_name, src, authed, kind)] = (code, text.decode())
    expected = {}
    for port_name in ("smtp", "submission"):
        for src in ("127.0.0.1", "127.0.0.2"):
            for authed in (False, True):
                for kind, rcpt in rcpts.items():
                    if port_name == "submission":
                        ok = authed
                        refusal = (554, f"5.7.1 <{rcpt}>: Recipient address rejected: Access denied")
                    else:
                        ok = authed or src == "127.0.0.1" or kind != "remote"
                        refusal = (554, f"5.7.1 <{rcpt}>: Relay access denied")
                    expected[(port_name, src, authed, kind)] = (250, "2.1.5 Ok") if ok else refusal
    wrong = {k: (got[k], v) for k, v in expected.items() if got[k] != v}
    assert not wrong, "\n".join(f"{k}: got {g}, expected {e}" for k, (g, e) in wrong.items())


def test_shipped_master_cf_submission_and_smtps(make_postern, certs, dc, sink):
    """The submission and smtps entries of conf/etc/master.cf, uncommented,
    work as on Postfix."""
    shipped = (h.REPO / "conf" / "etc" / "master.cf").read_text().splitlines()
    ports = {"submission": h.free_port(), "smtps": h.free_port()}
    extra, take = [], None
    for line in shipped:
        m = re.match(r"^#(submission|smtps)(\s.*)$", line)
        if m:
            take = m.group(1)
            extra.append(f"127.0.0.1:{ports[take]}{m.group(2)}")
            continue
        if take and line.startswith("#  -o "):
            extra.append(line[1:])
            continue
        take = None
    assert len(extra) > 6, extra
    p = make_postern(params={**tls_params(certs, level="none"), **relay_params(sink),
                             "smtpd_sasl_path": str(dc.auth_socket)},
                     master_cf_extra=extra)
    ctx = client_context(certs)
    # submission: STARTTLS first, then AUTH, then relaying.
    with smtplib.SMTP("127.0.0.1", ports["submission"], timeout=30) as s:
        s.ehlo("c")
        assert not s.has_extn("auth")
        assert s.mail("a@example.org")[0] == 530
        s.starttls(context=ctx)
        s.ehlo("c")
        assert s.mail("a@example.org")[0] == 250
        assert s.rcpt("r@example.net")[0] == 554
        s.rset()
        s.login(USER, PASSWORD)
        token = new_token()
        code, text = h.smtp_transaction(s, USER, ["r@example.net"], message(token))
        assert code == 250, text
    sink.wait_for(token)
    # smtps: TLS from the first byte.
    with smtplib.SMTP_SSL("127.0.0.1", ports["smtps"], timeout=30, context=ctx) as s:
        s.ehlo("c")
        assert not s.has_extn("starttls") and s.has_extn("auth")
        assert s.mail("a@example.org")[0] == 250
        assert s.rcpt("r@example.net")[0] == 554
        s.rset()
        s.login(USER, PASSWORD)
        token = new_token()
        code, text = h.smtp_transaction(s, USER, ["r@example.net"], message(token))
        assert code == 250, text
    sink.wait_for(token)
    p.wait_for_log(r"postfix/smtps/smtpd\[\d+\]: Anonymous TLS connection established")
    p.wait_for_log(r"postfix/submission/smtpd\[\d+\]: Anonymous TLS connection established")


def test_fail2ban_filters_match_the_log(make_postern, dc, swaks):
    """fail2ban's stock postfix filter (modes auth and normal) finds the
    attacker in Postern's log, with syslog_name = postfix as a migrating
    site keeps it."""
    f2b = shutil.which("fail2ban-regex")
    if not f2b:
        pytest.skip("fail2ban is not installed (scripts/test installs it)")
    p = make_postern(params={**sasl_params(dc), "syslog_name": "postfix"})
    for mech in ("LOGIN", "PLAIN"):
        r = h.run([swaks, "--server", f"127.0.0.1:{p.port}", "--auth", mech,
                   "--auth-user", USER, "--auth-password", "wrong", "--quit-after", "AUTH",
                   "--local-interface", "127.0.0.2"], timeout=60)
        assert "535 5.7.8" in r.stdout, h.describe(r)
    code, _ = rcpt_outside(p)
    assert code == 554
    p.wait_for_log(r"postfix/smtpd\[\d+\]: NOQUEUE: reject: RCPT from .*Relay access denied")
    for mode, count in (("auth", 2), ("normal", 1)):
        r = h.run([f2b, "--print-all-matched", str(p.maillog), f"postfix[mode={mode}]"],
                  timeout=120)
        assert r.returncode == 0, h.describe(r)
        m = re.search(r"^Lines: \d+ lines, \d+ ignored, (\d+) matched", r.stdout, re.M)
        assert m and int(m.group(1)) == count, r.stdout
        assert "127.0.0.2" in r.stdout


def rcpt_outside(p):
    with p.smtp(source_address=("127.0.0.2", 0)) as s:
        s.ehlo("c")
        s.mail("a@example.org")
        return s.rcpt("r@example.net")

