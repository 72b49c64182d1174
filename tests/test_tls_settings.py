"""smtpd's TLS settings as Postfix 3.7 defines them (postconf(5)), seen
from real clients: testssl.sh (cipher order, protocols and ciphers on
offer), openssl s_client (which certificate, which protocol), smtplib (the
Received header), `postern check` (keys that do not match), and a private
Postfix for the format of the log line and the Received header.

Certificates are made here with openssl: a test CA, an RSA leaf and an
ECDSA (P-256) leaf for postern.test / 127.0.0.1.
"""

import json
import re
import shutil
import smtplib
import ssl
import tempfile
import uuid
from pathlib import Path

import pytest

import postern_harness as h
from postfix_peer import TestCA, postfix_peer  # noqa: F401  (the fixture)

TESTSSL = shutil.which("testssl") or shutil.which("testssl.sh")


def ossl(d, *args):
    r = h.run(["openssl", *args], timeout=60, cwd=d)
    assert r.returncode == 0, h.describe(r)


@pytest.fixture(scope="module")
def certs():
    d = Path(tempfile.mkdtemp(prefix="postern-tlscerts-"))
    d.chmod(0o755)  # smtpd reads its keys as root, check as the caller
    ossl(d, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out",
         "ca.pem", "-days", "2", "-subj", "/CN=Postern Test CA",
         "-addext", "basicConstraints=critical,CA:TRUE",
         "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    (d / "leaf.ext").write_text(
        "basicConstraints=critical,CA:FALSE\n"
        "keyUsage=critical,digitalSignature,keyEncipherment\n"
        "extendedKeyUsage=serverAuth\n"
        "subjectAltName=DNS:postern.test,IP:127.0.0.1\n")
    for kind, newkey in (("rsa", ["-newkey", "rsa:2048"]),
                         ("ec", ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1"])):
        ossl(d, "req", *newkey, "-nodes", "-keyout", f"{kind}.key", "-out", f"{kind}.csr",
             "-subj", "/CN=postern.test")
        ossl(d, "x509", "-req", "-in", f"{kind}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
             "-CAcreateserial", "-out", f"{kind}.pem", "-days", "2", "-extfile", "leaf.ext")
    # smtpd_tls_chain_files: both keys, each followed by its chain, in one file.
    (d / "both.pem").write_text(
        (d / "rsa.key").read_text() + (d / "rsa.pem").read_text() + (d / "ca.pem").read_text()
        + (d / "ec.key").read_text() + (d / "ec.pem").read_text() + (d / "ca.pem").read_text())
    for f in d.iterdir():
        f.chmod(0o644)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def dual(certs, **more):
    p = {
        "smtpd_tls_security_level": "may",
        "smtpd_tls_cert_file": str(certs / "rsa.pem"),
        "smtpd_tls_key_file": str(certs / "rsa.key"),
        "smtpd_tls_eccert_file": str(certs / "ec.pem"),
        "smtpd_tls_eckey_file": str(certs / "ec.key"),
    }
    p.update(more)
    return p


def s_client(port, *args, data=b"EHLO client.example\r\nQUIT\r\n"):
    return h.run(["openssl", "s_client", "-starttls", "smtp", "-connect", f"127.0.0.1:{port}",
                  "-ign_eof", *args], input=data, timeout=30)


# --------------------------------------------------------------------------
# Dual certificates


def test_rsa_and_ecdsa_certificates_each_to_the_client_that_wants_it(make_postern, certs):
    p = make_postern(params=dual(certs))
    for sigalgs, want in (("ECDSA+SHA256", "ECDSA"), ("RSA-PSS+SHA256:RSA+SHA256", "RSA-PSS")):
        r = s_client(p.port, "-tls1_3", "-sigalgs", sigalgs, "-CAfile", str(certs / "ca.pem"),
                     "-verify_return_error")
        assert "Verify return code: 0 (ok)" in r.stdout, h.describe(r)
        assert f"Peer signature type: {want}" in r.stdout, h.describe(r)
    # TLS 1.2: the cipher suite's authentication decides.
    for cipher, bits in (("ECDHE-ECDSA-AES128-GCM-SHA256", "256"),
                         ("ECDHE-RSA-AES128-GCM-SHA256", "2048")):
        r = s_client(p.port, "-tls1_2", "-cipher", cipher, "-CAfile", str(certs / "ca.pem"),
                     "-verify_return_error")
        assert f"Cipher is {cipher}" in r.stdout, h.describe(r)
        assert f"Server public key is {bits} bit" in r.stdout, h.describe(r)


def test_chain_files_with_two_keys(make_postern, certs):
    p = make_postern(params={"smtpd_tls_security_level": "may",
                             "smtpd_tls_chain_files": str(certs / "both.pem")})
    for sigalgs, bits in (("ECDSA+SHA256", "256"), ("RSA-PSS+SHA256", "2048")):
        r = s_client(p.port, "-tls1_3", "-sigalgs", sigalgs, "-CAfile", str(certs / "ca.pem"),
                     "-verify_return_error")
        assert "Verify return code: 0 (ok)" in r.stdout, h.describe(r)
        assert f"Server public key is {bits} bit" in r.stdout, h.describe(r)


# --------------------------------------------------------------------------
# Protocols and ciphers


def test_mandatory_protocols_refuse_tls12(make_postern, certs):
    p = make_postern(params=dual(certs, smtpd_tls_security_level="encrypt",
                                 smtpd_tls_mandatory_protocols=">=TLSv1.3",
                                 # Opportunistic settings do not apply at encrypt.
                                 smtpd_tls_protocols="TLSv1.2"))
    r = s_client(p.port, "-tls1_2")
    assert "Cipher is (NONE)" in r.stdout, h.describe(r)
    assert "New, TLSv1.2" not in r.stdout, h.describe(r)
    r = s_client(p.port, "-tls1_3")
    assert "Protocol  : TLSv1.3" in r.stdout, h.describe(r)


def test_opportunistic_protocols_and_excluded_ciphers(make_postern, certs):
    p = make_postern(params=dual(certs, smtpd_tls_protocols="!SSLv2, !SSLv3, !TLSv1, !TLSv1.1, !TLSv1.3",
                                 smtpd_tls_exclude_ciphers="AES256, CHACHA20"))
    r = s_client(p.port, "-tls1_3")
    assert "Cipher is (NONE)" in r.stdout, h.describe(r)
    r = s_client(p.port, "-tls1_2", "-cipher", "ECDHE-RSA-AES256-GCM-SHA384")
    assert "Cipher is (NONE)" in r.stdout, h.describe(r)
    r = s_client(p.port, "-tls1_2")
    assert re.search(r"Cipher is ECDHE-(RSA|ECDSA)-AES128-GCM-SHA256", r.stdout), h.describe(r)


def relayed(p, far):
    """A message sent through Postern `p` to the Postfix receiver `far`,
    as `far` stored it (its Received header tells the TLS of the hop)."""
    token = "pt-" + uuid.uuid4().hex
    code, text = p.send("s@example.org", ["u@far.test"],
                        h.crlf(f"From: <s@example.org>\nSubject: {token}\n\nbody\n"))
    assert code == 250, text
    (_path, raw), = far.wait_for(token, timeout=40)
    return raw


def test_tls13_aes_gcm_choice_as_go_and_boringssl(make_postern, certs, postfix_peer, tmp_path):  # noqa: F811
    """TLS 1.3's suite: smtpd follows the client's order (Postfix's
    tls_preempt_cipherlist = no) except that a client whose first choice
    is AES-256-GCM, and which offers AES-128-GCM too, gets AES-128-GCM;
    the smtp client offers AES-128-GCM first, so a Postfix receiver
    answers with it."""
    p = make_postern(params=dual(certs, smtpd_tls_loglevel="1"))

    def cipher(*args):
        r = s_client(p.port, "-tls1_3", "-sigalgs", "ECDSA+SHA256", *args)
        m = re.search(r"Cipher is (\S+)", r.stdout)
        assert m, h.describe(r)
        return m.group(1)

    # OpenSSL's own order: AES-256-GCM, ChaCha20, AES-128-GCM.
    assert cipher() == "TLS_AES_128_GCM_SHA256"
    assert cipher("-ciphersuites", "TLS_AES_256_GCM_SHA384") == "TLS_AES_256_GCM_SHA384"
    assert cipher("-ciphersuites", "TLS_CHACHA20_POLY1305_SHA256:TLS_AES_256_GCM_SHA384:"
                  "TLS_AES_128_GCM_SHA256") == "TLS_CHACHA20_POLY1305_SHA256"
    assert cipher("-ciphersuites", "TLS_AES_256_GCM_SHA384:TLS_CHACHA20_POLY1305_SHA256") \
        == "TLS_AES_256_GCM_SHA384"
    # The log line names what was chosen.
    p.wait_for_log(r"post(fix|ern)/smtpd\[\d+\]: Anonymous TLS connection established from "
                   r"\S+: TLSv1\.3 with cipher TLS_AES_128_GCM_SHA256 \(128/128 bits\)")

    # An excluded AES-128-GCM is not chosen; the client's order is kept.
    q = make_postern(params=dual(certs, smtpd_tls_exclude_ciphers="TLS_AES_128_GCM_SHA256"))
    r = s_client(q.port, "-tls1_3")
    assert "Cipher is TLS_AES_256_GCM_SHA384" in r.stdout, h.describe(r)

    # Outbound: a Postfix receiver (OpenSSL, the client's order) takes
    # the AES-128-GCM our client offers first.
    ca = TestCA(tmp_path / "ca", names=["localhost"])
    far = postfix_peer(tls=ca)
    o = make_postern({"relayhost": f"[127.0.0.1]:{far.port}",
                      "smtp_tls_security_level": "encrypt", "smtp_tls_loglevel": "1"})
    raw = relayed(o, far)
    assert b"(using TLSv1.3 with cipher TLS_AES_128_GCM_SHA256 (128/128 bits)" in raw, raw[:600]


def test_unusable_protocol_list_is_reported_by_check(make_postern, certs):
    p = make_postern(params=dual(certs, smtpd_tls_protocols="<=TLSv1.1"), start=False)
    r = p.postern("check")
    assert r.returncode == 1, h.describe(r)
    assert "smtpd_tls_protocols" in r.stderr and "TLSv1.2" in r.stderr, h.describe(r)


@pytest.mark.skipif(TESTSSL is None, reason="testssl.sh is not installed (Debian testssl.sh)")
@pytest.mark.parametrize("preempt", ["yes", "no"])
def test_testssl_server_order_and_only_what_is_allowed(make_postern, certs, tmp_path, preempt):
    p = make_postern(params=dual(certs, smtpd_tls_security_level="encrypt",
                                 tls_preempt_cipherlist=preempt,
                                 smtpd_tls_mandatory_protocols=">=TLSv1.2",
                                 smtpd_tls_mandatory_exclude_ciphers="CHACHA20"))
    out = tmp_path / "testssl.json"
    r = h.run([TESTSSL, "--starttls", "smtp", "-p", "-P", "-E", "--quiet", "--color", "0",
               "--warnings", "off", "--sneaky",
               "--jsonfile", str(out), f"127.0.0.1:{p.port}"], timeout=300)
    assert out.exists(), h.describe(r)
    findings = {f["id"]: f["finding"] for f in json.loads(out.read_text())}
    print(json.dumps(findings, indent=1))
    for old in ("SSLv2", "SSLv3", "TLS1", "TLS1_1"):
        assert findings.get(old, "").startswith("not offered"), (old, findings.get(old))
    assert findings.get("TLS1_2", "").startswith("offered"), findings.get("TLS1_2")
    assert findings.get("TLS1_3", "").startswith("offered"), findings.get("TLS1_3")
    tls12 = [v.split()[3] for k, v in findings.items() if k.startswith("cipher-tls1_2")]
    assert sorted(tls12) == sorted(["ECDHE-RSA-AES256-GCM-SHA384", "ECDHE-ECDSA-AES256-GCM-SHA384",
                                    "ECDHE-RSA-AES128-GCM-SHA256", "ECDHE-ECDSA-AES128-GCM-SHA256"]), \
        tls12  # the CHACHA20 suites are excluded (mandatory exclusions apply at encrypt)
    if preempt == "yes":
        assert findings.get("cipher_order") == "server", findings.get("cipher_order")
        assert findings.get("cipherorder_TLSv1_2", "").split()[0] == "ECDHE-ECDSA-AES256-GCM-SHA384"
    else:
        assert findings.get("cipher_order") == "NOT a cipher order configured", \
            findings.get("cipher_order")


# --------------------------------------------------------------------------
# Log line and Received header, as Postfix's


def received_of(p, sink):
    token = "pt-" + uuid.uuid4().hex
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    with smtplib.SMTP("127.0.0.1", p.port, timeout=30) as s:
        s.ehlo("client.example")
        s.starttls(context=ctx)
        s.ehlo("client.example")
        code, text = h.smtp_transaction(
            s, "s@example.org", ["r@example.net"],
            h.crlf(f"From: <s@example.org>\nSubject: {token}\n\nbody\n"))
        assert code == 250, text
    m = sink.wait_for(token)[0]
    return m.content


def test_loglevel_and_received_header(make_postern, certs, sink):
    p = make_postern(params=dual(certs, smtpd_tls_loglevel="1", smtpd_tls_received_header="yes",
                                 smtpd_tls_eccert_file=None, smtpd_tls_eckey_file=None,
                                 relayhost=f"[127.0.0.1]:{sink.port}"))
    content = received_of(p, sink)
    text = content.decode()
    m = re.search(r"Received: from client\.example \(\S+ \[127\.0\.0\.1\]\)\r?\n"
                  r"\t\(using TLSv1\.3 with cipher (\S+) \((\d+)/(\d+) bits\)\r?\n"
                  r"\t key-exchange X25519 server-signature RSA-PSS \(2048 bits\)"
                  r" server-digest SHA256\)\r?\n"
                  r"\t\(No client certificate requested\)\r?\n"
                  r"\tby postern\.test \(\S+\) with ESMTPS id ", text)
    assert m, text[:800]
    p.wait_for_log(r"post(fix|ern)/smtpd\[\d+\]: Anonymous TLS connection established from "
                   r"\S+\[127\.0\.0\.1\]: TLSv1\.3 with cipher TLS_\S+ \(\d+/\d+ bits\) "
                   r"key-exchange X25519 server-signature RSA-PSS \(2048 bits\) server-digest SHA256$")


def test_loglevel_0_logs_no_session(make_postern, certs):
    p = make_postern(params=dual(certs))
    r = s_client(p.port, "-tls1_3")
    assert "Protocol  : TLSv1.3" in r.stdout, h.describe(r)
    p.wait_for_log(r"disconnect from")
    assert "TLS connection established" not in p.log_text()


def test_session_cache_timeout_zero_no_resumption(make_postern, certs, tmp_path):
    sess = tmp_path / "sess.pem"
    for timeout, resumed in (("3600s", True), ("0", False)):
        p = make_postern(params=dual(certs, smtpd_tls_session_cache_timeout=timeout,
                                     smtpd_tls_session_cache_database="btree:${data_directory}/smtpd_scache",
                                     smtp_tls_session_cache_database="btree:${data_directory}/smtp_scache"))
        r = p.postern("check")  # Postfix's btree: value is accepted, not opened
        assert r.returncode == 0 and "smtpd_scache" not in r.stderr, h.describe(r)
        r1 = s_client(p.port, "-tls1_2", "-sess_out", str(sess))
        assert "Protocol  : TLSv1.2" in r1.stdout, h.describe(r1)
        r2 = s_client(p.port, "-tls1_2", "-sess_in", str(sess))
        assert ("Reused, TLSv1.2" in r2.stdout) == resumed, h.describe(r2)
        p.stop()


# --------------------------------------------------------------------------
# Keys that cannot be used


def test_mismatched_key_fails_check_and_start(make_postern, certs):
    p = make_postern(params=dual(certs, smtpd_tls_key_file=str(certs / "ec.key"),
                                 smtpd_tls_eccert_file=None, smtpd_tls_eckey_file=None),
                     start=False)
    p._prepare()
    r = p.postern("start")
    assert r.returncode == 1, h.describe(r)
    assert "postern: error: " in r.stderr and "private key does not match" in r.stderr, \
        h.describe(r)
    r = p.postern("check")
    assert r.returncode == 1, h.describe(r)
    assert re.search(r"postern: error: service \S+ .*cannot load TLS certificate and key: "
                     r"smtpd_tls_key_file = \S+ec\.key, smtpd_tls_cert_file = \S+rsa\.pem: "
                     r"private key does not match public key in certificate", r.stderr), h.describe(r)


def test_log_line_and_received_header_as_postfix_writes_them(make_postern, certs, sink,
                                                             postfix_peer, tmp_path):
    """The same STARTTLS session (TLS 1.3, RSA certificate) into a private
    Postfix 3.7 and into Postern: the TLS part of the Received header and
    of the log line are the same (the cipher may differ: it is the
    client's choice among equals)."""
    ca = TestCA(tmp_path / "ca", names=["localhost"])
    far = postfix_peer(tls=ca)
    p = make_postern(params={"smtpd_tls_security_level": "may",
                             "smtpd_tls_cert_file": str(ca.cert_file),
                             "smtpd_tls_key_file": str(ca.key_file),
                             "smtpd_tls_loglevel": "1", "smtpd_tls_received_header": "yes",
                             "relayhost": f"[127.0.0.1]:{sink.port}"})

    def send(port, rcpt):
        token = "pt-" + uuid.uuid4().hex
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        ctx.minimum_version = ssl.TLSVersion.TLSv1_3
        with smtplib.SMTP("127.0.0.1", port, timeout=30) as s:
            s.ehlo("client.example")
            s.starttls(context=ctx)
            s.ehlo("client.example")
            code, text = h.smtp_transaction(
                s, "s@example.org", [rcpt],
                h.crlf(f"From: <s@example.org>\nSubject: {token}\n\nbody\n"))
            assert code == 250, text
        return token

    def tls_part(received):
        m = re.search(r"\t\(using .*?\)\r?\n\t\(No client certificate requested\)",
                      received, re.S)
        assert m, received
        return m.group(0).replace("\r", "")

    t1 = send(far.port, "u@far.test")
    postfix_raw = far.wait_for(t1)[0][1]
    t2 = send(p.port, "r@example.net")
    postern_msg = sink.wait_for(t2)[0].content
    theirs = tls_part(postfix_raw.decode(errors="replace"))
    ours = tls_part(postern_msg.decode(errors="replace"))
    # The cipher may differ (AES-NI or not); the layout may not.
    norm = lambda t: re.sub(r"cipher \S+ \(\d+/\d+ bits\)", "cipher C", t)  # noqa: E731
    assert norm(ours) == norm(theirs), (ours, theirs)

    pat = r"TLS connection established from \S+: (.*)$"
    theirs = re.search(pat, far.log_text(), re.M)
    ours = p.wait_for_log(r"post(fix|ern)/smtpd\[\d+\]: Anonymous " + pat)
    assert theirs, far.log_text()[-2000:]
    assert re.search(r"post(fix|ern)/smtpd\[\d+\]: Anonymous " + pat, far.log_text(), re.M)
    assert norm(ours.group(ours.lastindex)) == norm(theirs.group(1)), \
        (ours.group(0), theirs.group(0))


def test_smtp_client_mandatory_protocols_and_ciphers(make_postern, postfix_peer, tmp_path):
    """Postern's smtp at level encrypt speaks what smtp_tls_mandatory_*
    allow (the opportunistic smtp_tls_protocols do not apply), to a
    private Postfix that offers TLS 1.2 and 1.3."""
    ca = TestCA(tmp_path / "ca", names=["localhost"])
    far = postfix_peer(tls=ca)
    p = make_postern({"relayhost": f"[127.0.0.1]:{far.port}",
                      "smtp_tls_security_level": "encrypt", "smtp_tls_loglevel": "1",
                      "smtp_tls_protocols": "TLSv1.3",
                      "smtp_tls_mandatory_protocols": "!SSLv2, !SSLv3, !TLSv1, !TLSv1.1, !TLSv1.3",
                      "smtp_tls_mandatory_exclude_ciphers": "AES256, CHACHA20"})
    raw = relayed(p, far)
    assert b"(using TLSv1.2 with cipher ECDHE-RSA-AES128-GCM-SHA256 (128/128 bits))" in raw, raw[:600]
    p.wait_for_log(r"post(fix|ern)/smtp\[\d+\]: Untrusted TLS connection established to "
                   rf"127\.0\.0\.1\[127\.0\.0\.1\]:{far.port}: TLSv1\.2 with cipher "
                   r"ECDHE-RSA-AES128-GCM-SHA256 \(128/128 bits\)$")


def test_smtp_client_protocol_list_that_leaves_nothing_fails_check(make_postern):
    p = make_postern({"smtp_tls_mandatory_protocols": "TLSv1.1"}, start=False)
    r = p.postern("check")
    assert r.returncode == 1, h.describe(r)
    assert re.search(r"postern: error: service \S+ .*smtp_tls_mandatory_protocols: "
                     r"\"TLSv1\.1\" leaves neither TLSv1\.2 nor TLSv1\.3", r.stderr), h.describe(r)
