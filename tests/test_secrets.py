"""Secrets readable by root only, as distributions install them: a TLS key
and certificate mode 0600 root (Let's Encrypt's privkey.pem, Debian's
snakeoil key) and a 0600 root `sasl_passwd`. master starts every
unprivileged daemon as root; the daemon reads these, then drops to
mail_owner with no capabilities (chrooted when master.cf says so) before
it reads a byte from the network. Checked with the chroot column n (the
default of upstream Postfix, RHEL, Arch) and y (Debian), against a real
Postfix smarthost that requires AUTH (checked through Dovecot). A
missing or unusable key is an error at start and in `postern check`, and
a secret table changed under a running daemon is read by a fresh one.
Run as root."""

import os
import pwd
import re
import shutil
import smtplib
import ssl
import tempfile
import time
import uuid
from pathlib import Path

import pytest

import postern_harness as h
from dovecot import dovecot  # noqa: F401  (the fixture)
from postfix_peer import TestCA, postfix_peer  # noqa: F401  (the fixture)
from test_chroot import chroot_everything
from test_privileges import ANVIL_PARAMS, UNPRIVILEGED, assert_unprivileged, running_daemons
from test_smtpd_tls_sasl import make_certs

SENDER = "app@postern.test"
RCPT = "user@far.test"
USERS = {"relayuser@example.test": "right-pw"}


@pytest.fixture
def root_only():
    if not h.is_root():
        pytest.skip("secrets readable by root only are tested as root")


@pytest.fixture
def secrets_dir():
    """A directory only root may enter (as /etc/ssl/private is to others)."""
    d = Path(tempfile.mkdtemp(prefix="pt-secrets-"))
    os.chmod(d, 0o700)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def root_only_file(path, text=None):
    """Makes `path` (written with `text` if given) mode 0600, owned by root."""
    path = Path(path)
    if text is not None:
        path.write_text(text)
    os.chown(path, 0, 0)
    os.chmod(path, 0o600)
    return path


def replace_root_only(path, text):
    """Replaces `path` by a rename, as postmap does, still 0600 root."""
    tmp = path.with_name(path.name + ".new")
    root_only_file(tmp, text)
    os.rename(tmp, path)


@pytest.fixture
def root_certs(secrets_dir):
    """A key and certificate (and its CA, readable by the test's client),
    each mode 0600 root, in a directory mode 0700."""
    certs = make_certs(secrets_dir / "tls")
    for f in ("key", "cert"):
        root_only_file(certs[f])
    os.chmod(secrets_dir / "tls", 0o700)
    return certs


@pytest.fixture
def smarthost(postfix_peer, dovecot, secrets_dir):  # noqa: F811
    """A real Postfix that relays only for clients that AUTH (over TLS),
    checking passwords through Dovecot."""
    d = dovecot(users=USERS, auth_failure_delay="0 secs")
    ca = TestCA(secrets_dir / "far-ca", names=["localhost"])
    return postfix_peer(tls=ca, sasl_auth_port=d.auth_port, auth_only_tls=True)


def postmap_root_only(source):
    """Builds `hash:source` with Postern's postmap as an administrator does
    (`postmap /etc/postfix/sasl_passwd`; `chmod 600 sasl_passwd.db`), and
    returns the table's name."""
    r = h.run([h.BIN_DIR / "postmap", f"hash:{source}"])
    assert r.returncode == 0, h.describe(r)
    db = source.with_name(source.name + ".db")
    os.chown(db, 0, 0)
    os.chmod(db, 0o600)
    return f"hash:{source}"


def postern_with_secrets(make_postern, root_certs, far, sasl_passwd, chroot, **extra):
    table = sasl_passwd if ":" in str(sasl_passwd) else f"texthash:{sasl_passwd}"
    params = {
        "relayhost": f"[127.0.0.1]:{far.port}",
        "smtpd_tls_security_level": "may",
        "smtpd_tls_cert_file": str(root_certs["cert"]),
        "smtpd_tls_key_file": str(root_certs["key"]),
        "smtp_tls_security_level": "encrypt",
        "smtp_sasl_auth_enable": "yes",
        "smtp_sasl_password_maps": table,
        "smtp_sasl_tls_security_options": "noanonymous",
        **ANVIL_PARAMS,
        **extra,
    }
    p = make_postern(start=False, params=params)
    if chroot:
        chroot_everything(p)
    p.start()
    return p


def send_with_starttls(p, ca_file, token):
    ctx = ssl.create_default_context(cafile=str(ca_file))
    ctx.check_hostname = False
    with smtplib.SMTP("127.0.0.1", p.port, timeout=30) as s:
        s.ehlo("client.example")
        assert s.has_extn("starttls"), "STARTTLS not offered: the 0600 key was not read"
        assert s.starttls(context=ctx)[0] == 220
        s.ehlo("client.example")
        assert s.sock.version() in ("TLSv1.2", "TLSv1.3"), s.sock.version()
        assert s.mail(SENDER)[0] == 250
        assert s.rcpt(RCPT)[0] == 250
        code, text = s.data(h.crlf(f"From: {SENDER}\nTo: {RCPT}\nSubject: {token}\n\nsecret\n"))
        assert code == 250, text


@pytest.mark.parametrize("chroot", [False, True], ids=["chroot-n", "chroot-y"])
def test_root_only_key_and_sasl_passwd_are_read_then_privileges_dropped(
        root_only, make_postern, root_certs, smarthost, secrets_dir, chroot):
    far = smarthost
    sasl_passwd = root_only_file(secrets_dir / "sasl_passwd",
                                 f"[127.0.0.1]:{far.port} relayuser@example.test:right-pw\n")
    # The TLS policy table is a secret as well, read the same way.
    policy = root_only_file(secrets_dir / "tls_policy", f"[127.0.0.1]:{far.port} encrypt\n")
    p = postern_with_secrets(make_postern, root_certs, far, postmap_root_only(sasl_passwd), chroot,
                             smtp_tls_policy_maps=postmap_root_only(policy))
    token = "pt-secrets-" + uuid.uuid4().hex

    # In over STARTTLS with the root-only key; out to the smarthost with
    # AUTH from the root-only sasl_passwd.
    send_with_starttls(p, root_certs["ca"], token)
    far.wait_for(token)
    p.wait_for_log(rf"to=<{re.escape(RCPT)}>, relay=127\.0\.0\.1\[127\.0\.0\.1\]:{far.port}, "
                   r".*status=sent")
    assert h.wait_for(lambda: "sasl_username=relayuser@example.test" in far.log_text(), 10)

    # Every network-facing daemon, in every thread: not root, no
    # capability; confined to the queue when chrooted.
    owner = pwd.getpwnam(p.mail_owner)
    seen = running_daemons(p)
    missing = [d for d in UNPRIVILEGED if d not in seen]
    assert not missing, f"not running: {missing} (saw {sorted(seen)})"
    queue = os.path.realpath(p.queue)
    for name in UNPRIVILEGED:
        for pid in seen[name]:
            assert_unprivileged(pid, name, owner)
            root = os.readlink(f"/proc/{pid}/root")
            assert root == (queue if chroot else "/"), (name, pid, root)
    assert not p.log_search(r"(error|fatal|panic):"), p.log_tail()


def test_missing_or_unusable_key_is_an_error_at_start_and_in_check(
        root_only, make_postern, root_certs, secrets_dir):
    garbage = root_only_file(secrets_dir / "garbage.key", "not a key\n")
    p = make_postern(start=False, params={
        "smtpd_tls_security_level": "may",
        "smtpd_tls_cert_file": str(root_certs["cert"]),
        "smtpd_tls_key_file": str(secrets_dir / "missing.key"),
        "smtp_sasl_auth_enable": "yes",
        "smtp_sasl_password_maps": f"texthash:{secrets_dir / 'no_sasl_passwd'}",
    }, master_cf_extra=[
        # A submission service whose own key is unusable.
        f"127.0.0.1:{h.free_port()} inet n - n - - smtpd -o smtpd_tls_key_file={garbage}",
    ])
    r = p.postern("check")
    assert r.returncode == 1, h.describe(r)
    assert re.search(r"^postern: error: service 127\.0\.0\.1:\d+ \(master\.cf line \d+\): "
                     r"cannot load TLS certificate and key: .*missing\.key", r.stderr, re.M), \
        h.describe(r)
    assert re.search(r"^postern: error: .*cannot load TLS certificate and key: .*garbage\.key",
                     r.stderr, re.M), h.describe(r)
    assert re.search(r"^postern: error: service smtp .*smtp_sasl_password_maps: .*no_sasl_passwd",
                     r.stderr, re.M), h.describe(r)

    # The same errors stop a start: no mail system without its STARTTLS.
    p._prepare()
    r = p.postern("start")
    assert r.returncode == 1, h.describe(r)
    assert re.search(r"^postern: error: .*cannot load TLS certificate and key: "
                     r"smtpd_tls_key_file = .*missing\.key: cannot read private key", r.stderr,
                     re.M), h.describe(r)
    assert p.status().returncode == 1

    # The same key, readable by root only, is no error.
    root_only_file(secrets_dir / "missing.key", Path(root_certs["key"]).read_text())
    p.set_params(smtp_sasl_auth_enable="no")
    p.master_cf_extra = []
    p.write_master_cf()
    r = p.postern("check")
    assert r.returncode == 0 and "error" not in r.stderr, h.describe(r)


def test_changed_root_only_sasl_passwd_is_read_by_a_fresh_smtp(
        root_only, make_postern, root_certs, smarthost, secrets_dir):
    far = smarthost
    sasl_passwd = root_only_file(secrets_dir / "sasl_passwd",
                                 f"[127.0.0.1]:{far.port} relayuser@example.test:wrong-pw\n")
    p = postern_with_secrets(make_postern, root_certs, far, sasl_passwd, chroot=False)
    token = "pt-secrets-" + uuid.uuid4().hex
    code, text = p.send(SENDER, [RCPT], h.crlf(f"Subject: {token}\n\nfirst try\n"))
    assert code == 250, text
    p.wait_for_log(r"status=deferred \(SASL authentication failed")
    smtp_before = set(running_daemons(p).get("smtp", []))
    assert smtp_before

    # The administrator fixes the password (a new file, still root's only)
    # and flushes the queue: the smtp process that read the old file as
    # root cannot read the new one; a fresh one does, and delivers.
    replace_root_only(sasl_passwd, f"[127.0.0.1]:{far.port} relayuser@example.test:right-pw\n")
    time.sleep(1.2)  # smtp looks at its files at most once a second
    r = h.run([p.cmd("postqueue"), "-c", p.etc, "-f"], env=p.env(), timeout=30)
    assert r.returncode == 0, h.describe(r)
    far.wait_for(token)
    p.wait_for_log(rf"postfix/smtp\[\d+\]: table {re.escape(str(sasl_passwd))} has changed "
                   r"-- restarting")
    p.wait_for_log(rf"to=<{re.escape(RCPT)}>, .*status=sent")


def test_changed_root_only_transport_map_is_read_by_a_fresh_qmgr(
        root_only, make_postern, sink, secrets_dir):
    transport = root_only_file(secrets_dir / "transport", "route.test error:5.7.1 not routed yet\n")
    p = make_postern(params={"transport_maps": f"texthash:{transport}"})
    first = "pt-secrets-" + uuid.uuid4().hex
    # smtpd refuses a recipient routed to error: at RCPT, as Postfix's
    # (smtpd_reject_unlisted_recipient): submitted locally, qmgr routes it.
    r = p.sendmail(["-f", SENDER, "x@route.test"], f"Subject: {first}\n\n1\n".encode())
    assert r.returncode == 0, h.describe(r)
    p.wait_for_log(r"to=<x@route\.test>, .*status=bounced \(not routed yet\)")
    qmgr_before = p.qmgr_pid()

    # qmgr read the table as root and cannot open the new one as
    # mail_owner: a fresh qmgr reads it before anything is routed with
    # what the old one has left.
    replace_root_only(transport, f"route.test smtp:[127.0.0.1]:{sink.port}\n")
    time.sleep(1.2)  # qmgr looks at its files at most once a second
    second = "pt-secrets-" + uuid.uuid4().hex
    code, text = p.send(SENDER, ["x@route.test"], h.crlf(f"Subject: {second}\n\n2\n"))
    assert code == 250, text
    h.wait_for(lambda: any(second.encode() in m.content for m in sink.messages), timeout=30,
               what="the second message at the sink, routed by the new table")
    p.wait_for_log(rf"postfix/qmgr\[{qmgr_before}\]: table {re.escape(str(transport))} "
                   r"has changed -- restarting")
    assert p.qmgr_pid() != qmgr_before


def test_changed_root_only_access_table_is_read_by_a_fresh_smtpd(
        root_only, make_postern, secrets_dir, local_users):
    access = root_only_file(secrets_dir / "sender_access", "other.test REJECT not this one\n")
    p = make_postern(params={
        "smtpd_sender_restrictions": f"check_sender_access texthash:{access}"})

    def rcpt_reply():
        with p.smtp() as s:
            s.ehlo("client.example")
            assert s.mail("someone@blocked.test")[0] == 250
            return s.rcpt(f"ptalice@{h.MYHOSTNAME}")

    assert rcpt_reply()[0] == 250
    smtpd_before = running_daemons(p)["smtpd"]

    replace_root_only(access, "blocked.test REJECT 5.7.1 blocked now\n")
    time.sleep(1.2)  # smtpd looks at its files at most once a second
    code, text = rcpt_reply()
    # Postfix's form: the enhanced code from the table, then the address.
    assert code == 554 and text.startswith(b"5.7.1 ") and text.endswith(b"blocked now"), \
        (code, text)
    p.wait_for_log(rf"postfix/smtpd\[({'|'.join(map(str, smtpd_before))})\]: table "
                   rf"{re.escape(str(access))} has changed -- restarting")
