"""debug_peer_list and debug_peer_level (issue #27 point 2), as Postfix's
debug_peer: a session with a listed peer logs verbosely (smtpd: each
command `< name[addr]: LINE` and each reply `> name[addr]: LINE`; smtp:
the same for the commands it sends and the replies it reads), every
other session does not. The list is a match list (addresses, networks,
names, `type:table`, `!negation`).

The smtpd side is compared with a private Postfix given the same
debug_peer_list: the same clients get the chat lines, and the lines for
the same commands are the same."""

import re
import smtplib
import uuid

import pytest

import postern_harness as h
from postfix_peer import postfix_available, postfix_peer  # noqa: F401  (the fixture)

LISTED, OTHER = "127.0.0.2", "127.0.0.1"


def session(port, source, token):
    """EHLO, MAIL FROM with `token`, RSET, QUIT from `source`."""
    with smtplib.SMTP("127.0.0.1", port, timeout=30, source_address=(source, 0)) as s:
        s.ehlo("client.test")
        code, _ = s.mail(f"{token}@client.test")
        assert code == 250
        s.rset()


def chat(log, token):
    """The verbose chat lines of the session that sent `token`, as
    (client address, direction and text), without the EHLO reply (its
    extensions are each server's own)."""
    lines = re.findall(r"/smtpd\[\d+\]: ([<>]) \S+\[([0-9.]+)\]: (.*)$", log, re.M)
    # The session of `token`: its MAIL line's address.
    addrs = {a for d, a, t in lines if token in t}
    mail = [i for i, (d, a, t) in enumerate(lines) if token in t]
    if not mail:
        return set(), []
    out = []
    for d, a, t in lines[mail[0]:]:
        if a not in addrs:
            continue
        out.append((d, t))
        if t.startswith("221"):
            break
    return addrs, out


def test_smtpd_logs_listed_clients_verbosely_as_postfix(make_postern, postfix_peer):  # noqa: F811
    if not postfix_available() or not h.is_root():
        pytest.skip("needs Postfix and root")
    params = {"debug_peer_list": f"!192.0.2.9, {LISTED}", "debug_peer_level": "1"}
    far = postfix_peer(params=params)
    p = make_postern(params=params)
    results = {}
    for name, port, log in (("Postern", p.port, lambda: p.maillog.read_text()),
                            ("Postfix", far.port, far.log_text)):
        listed, other = f"listed-{uuid.uuid4().hex}", f"other-{uuid.uuid4().hex}"
        session(port, LISTED, listed)
        session(port, OTHER, other)
        got = h.wait_for(lambda: (lambda c: c if c[1] and c[1][-1][1].startswith("221")
                                  else None)(chat(log(), listed)),
                         20, what=f"{name}'s verbose lines for the listed client")
        addrs, lines = got
        assert addrs == {LISTED}, (name, addrs)
        assert chat(log(), other) == (set(), []), (name, "the other client is verbose")
        # Normalize the tokens.
        results[name] = [(d, t.replace(listed, "TOKEN")) for d, t in lines]
    assert results["Postern"] == results["Postfix"], results
    assert ("<", "mail FROM:<TOKEN@client.test>") in results["Postern"], results


def test_smtp_logs_listed_servers_verbosely(make_postern, sink):
    """smtp: a delivery to a server listed by address is verbose (the
    commands sent and the replies read); with the list naming another
    host, none is."""
    p = make_postern(params={"relayhost": f"[127.0.0.1]:{sink.port}",
                             "debug_peer_list": "192.0.2.7"})
    first = f"quiet-{uuid.uuid4().hex}"
    r = p.sendmail(["-f", f"{first}@postern.test", "user@far.test"],
                   h.crlf(f"Subject: {first}\n\nx\n"))
    assert r.returncode == 0, h.describe(r)
    sink.wait_for(first)
    p.wait_for_log(r"status=sent")
    assert not p.log_search(rf"/smtp\[\d+\]: > \S+: MAIL FROM:<{first}@"), p.log_tail()
    p.set_params(debug_peer_list=f"hash:{p.etc}/peers")
    p.write_file("etc/peers", "127.0.0.1 yes\n")
    assert h.run_tool(p, "postmap", f"hash:{p.etc}/peers").returncode == 0
    assert p.postern("reload").returncode == 0
    second = f"loud-{uuid.uuid4().hex}"
    r = p.sendmail(["-f", f"{second}@postern.test", "user@far.test"],
                   h.crlf(f"Subject: {second}\n\nx\n"))
    assert r.returncode == 0, h.describe(r)
    sink.wait_for(second)
    p.wait_for_log(rf"/smtp\[\d+\]: > 127\.0\.0\.1\[127\.0\.0\.1\]: MAIL FROM:<{second}@")
    p.wait_for_log(r"/smtp\[\d+\]: < 127\.0\.0\.1\[127\.0\.0\.1\]: 250")
