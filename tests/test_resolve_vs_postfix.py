"""Postern's one resolver (common/src/resolve.rs) against Postfix's own
answers, address by address.

One main.cf (local, virtual alias, virtual mailbox and relay domains,
transport_maps, relayhost, recipient_delimiter, catch-alls, relocated and
canonical maps) is given to a private Postfix and to Postern. For each of
60 addresses:

- Postfix's class, transport and next hop come from its trivial-rewrite
  itself: the test speaks the `resolve` request of its private/rewrite
  socket (attribute protocol, as resolve_clnt does); Postern's from
  `sendmail -bv -v`, which prints the resolver's answer;
- both smtpd's reply to RCPT TO, from a client outside mynetworks (so the
  relay check runs too), must be the same.

Then two deliveries end to end: with relay_domains = example.com,
user@sub.example.com goes through relay_transport (not default_transport);
postmaster@ of a virtual mailbox domain, mapped in virtual_alias_maps, is
accepted and delivered (it was 550 5.1.1 User unknown in virtual mailbox
table).
"""

import re
import shutil
import socket
import tempfile
from pathlib import Path
import pytest

import postern_harness as h
from postfix_peer import postfix_available, postfix_peer  # noqa: F401 (fixture)

@pytest.fixture
def table_dir():
    """A directory every daemon can read (pytest's tmp_path is root-only)."""
    d = Path(tempfile.mkdtemp(prefix="pt-resolve-"))
    d.chmod(0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


pytestmark = pytest.mark.skipif(
    not (postfix_available() and h.is_root()),
    reason="needs root and Postfix installed")

# RESOLVE_CLASS_* and RESOLVE_FLAG_* of Postfix's resolve_clnt.h.
FLAG_ROUTED = 1 << 1
FLAG_ERROR = 1 << 2
FLAG_FAIL = 1 << 3
CLASSES = {1 << 8: "local", 1 << 9: "alias", 1 << 10: "virtual", 1 << 11: "relay",
           1 << 12: "default"}

TABLES = {
    "virtual": """\
postmaster@vbox.test   box1@vbox.test
info@vbox.test         box1@vbox.test
sales@alias.test       box2@vbox.test
@catchall.test         box2@vbox.test
webmaster@res.test     alice
""",
    "vmailbox": """\
box1@vbox.test   vbox.test/box1/
box2@vbox.test   vbox.test/box2/
""",
    "transport": """\
special.test        smtp:[192.0.2.20]:25
.sub.special.test   relay:[192.0.2.21]
nohop.test          smtp:
keep.test           :[192.0.2.22]
gone.test           error:5.1.2 this domain is gone
later.test          retry:4.4.1 come back later
user@direct.test    smtp:[192.0.2.23]
lmtpuser@vbox.test  lmtp:unix:private/dovecot-lmtp
""",
    "relay_rcpts": """\
known@relay.test       x
known@sub.relay.test   x
@a.dotrelay.test       x
""",
    "local_users": """\
alice   x
bob     x
""",
    "relocated": "moved@res.test   new@elsewhere.test\n",
    "canonical": "canon@res.test   alice@res.test\noldname@vbox.test  box1@vbox.test\n",
}


def shared_params(tdir):
    t = lambda name: f"texthash:{tdir}/{name}"  # noqa: E731
    return {
        "myhostname": "mx.res.test",
        "mydomain": "res.test",
        "myorigin": "res.test",
        "mydestination": "mx.res.test, localhost, res.test",
        "inet_interfaces": "127.0.0.1",
        "proxy_interfaces": "192.0.2.77",
        "mynetworks": "192.0.2.0/24",
        "smtpd_relay_restrictions": "permit_mynetworks, reject_unauth_destination",
        "smtpd_recipient_restrictions": "",
        "relay_domains": "relay.test, .dotrelay.test, bücher.test",
        "virtual_alias_domains": "alias.test, catchall.test",
        "virtual_alias_maps": t("virtual"),
        "virtual_mailbox_domains": "vbox.test",
        "virtual_mailbox_maps": t("vmailbox"),
        "relay_recipient_maps": t("relay_rcpts"),
        "transport_maps": t("transport"),
        "relocated_maps": t("relocated"),
        "canonical_maps": t("canonical"),
        "local_recipient_maps": f"unix:passwd.byname {t('local_users')}",
        "relayhost": "[192.0.2.10]:2525",
        "recipient_delimiter": "+",
        "smtputf8_enable": "yes",
        # Many refusals in one session: no tarpit, no disconnect.
        "smtpd_error_sleep_time": "0",
        "smtpd_soft_error_limit": "1000",
        "smtpd_hard_error_limit": "1000",
    }


ADDRESSES = [
    # Local domains, interface literals, the bare name.
    "alice@res.test", "Alice@RES.TEST", "alice+tag@res.test", "alice@mx.res.test",
    "alice@localhost", "alice@res.test.", "bob@res.test", "root@res.test", "ROOT@res.test",
    "nobody-here@res.test", "nobody+x@res.test", "postmaster@res.test",
    "MAILER-DAEMON@res.test", "double-bounce@res.test", "alice@[127.0.0.1]",
    "alice@[192.0.2.77]", "bob@[192.0.2.99]", "webmaster@res.test", "moved@res.test",
    "canon@res.test", "-dash@res.test",
    # Routing inside the local part.
    "alice%relay.test@res.test", "relay.test!alice@res.test", "a%b@other.test",
    "known@relay.test@res.test", "known%relay.test@res.test",
    # Virtual mailbox domain.
    "box1@vbox.test", "box1+x@vbox.test", "BOX2@VBOX.TEST", "postmaster@vbox.test",
    "info@vbox.test", "nobody@vbox.test", "oldname@vbox.test", "lmtpuser@vbox.test",
    # Virtual alias domains.
    "sales@alias.test", "nobody@alias.test", "any@catchall.test", "Any+x@CatchAll.Test",
    # Relay domains, subdomains through parent_domain_matches_subdomains.
    "known@relay.test", "unknown@relay.test", "known@sub.relay.test",
    "unknown@sub.relay.test", "x@a.dotrelay.test", "x@dotrelay.test", "Known@Relay.Test",
    # Default class and transport_maps.
    "x@other.test", "x@UPPER.Other.Test", "x@special.test", "x@a.sub.special.test",
    "x@sub.special.test", "x@nohop.test", "x@keep.test", "x@gone.test", "x@later.test",
    "user@direct.test", "user+ext@direct.test", "other@direct.test", "x@1.2.3.4",
    "x@[192.0.2.300]", "x@example.com",
]

# Compared only through the resolvers (RCPT of UTF-8 needs SMTPUTF8):
# UTF-8 domains fold their case.
RESOLVE_ONLY = ["user@BÜCHER.TEST", "user@bücher.test", "x@[IPv6:::1]",
                "x@[ipv6:2001:db8::1]"]
# Where Postern differs from Postfix 3.7 on purpose (issue #16 point 5):
# the A-label form of a domain listed in its U-label form is the same
# domain (Postfix wants both forms listed). {address: (class, transport)}.
DELIBERATE = {"user@xn--bcher-kva.test": ("relay", "relay")}


# -- Postfix's trivial-rewrite, asked directly -------------------------------

def _read_attrs(f):
    """One attr_print0 record: name NUL value NUL ... NUL."""
    attrs = []
    while True:
        name = b""
        while True:
            c = f.read(1)
            if not c:
                raise EOFError("trivial-rewrite closed the connection")
            if c == b"\0":
                break
            name += c
        if not name:
            return attrs
        value = b""
        while True:
            c = f.read(1)
            if c in (b"\0", b""):
                break
            value += c
        attrs.append((name.decode(), value.decode("utf-8", "replace")))


class TrivialRewrite:
    def __init__(self, queue):
        self.s = socket.socket(socket.AF_UNIX)
        self.s.settimeout(20)
        self.s.connect(str(queue / "private" / "rewrite"))
        self.f = self.s.makefile("rb")
        # Postfix 3.x announces its protocol first.
        self.s.settimeout(2)
        try:
            self.hello = _read_attrs(self.f)
        except (socket.timeout, TimeoutError):
            self.hello = None
        self.s.settimeout(20)

    def resolve(self, sender, address):
        req = b"".join(x.encode() + b"\0" for x in
                       ("request", "resolve", "sender", sender, "address", address)) + b"\0"
        self.s.sendall(req)
        attrs = _read_attrs(self.f)
        names = [n for n, _ in attrs]
        assert names == ["flags", "transport", "nexthop", "recipient", "flags"], attrs
        flags = int(attrs[4][1])
        return {
            "class": next((n for bit, n in CLASSES.items() if flags & bit), "?"),
            "transport": attrs[1][1],
            "nexthop": attrs[2][1],
            "recipient": attrs[3][1],
            "routed": bool(flags & FLAG_ROUTED),
            "bad_syntax": bool(flags & FLAG_ERROR),
            "fail": bool(flags & FLAG_FAIL),
        }

    def close(self):
        self.s.close()


# -- Postern's resolver, through sendmail -bv -v -------------------------------

def postern_resolutions(p, addresses):
    r = p.sendmail(["-bv", "-v", *addresses], None)
    out = {}
    for line in r.stdout.splitlines():
        if " class=" not in line and " failure=" not in line:
            continue
        m = re.match(r"<(.*)>: class=(\S+) transport=(\S*) nexthop=(.*) recipient=(\S+)"
                     r"( bad_syntax)? verdict=(.*)$", line)
        assert m, line
        addr = "<" + m.group(1)
        d = {"class": m.group(2), "transport": m.group(3), "nexthop": m.group(4),
             "recipient": m.group(5), "bad_syntax": bool(m.group(6)),
             "verdict": m.group(7)}
        out[addr[1:]] = d
    assert len(out) == len(set(addresses)), h.describe(r)
    return out


def rcpt_replies(port, addresses, sender="sender@client.test", helo="client.test", source=None):
    """The last reply line to RCPT TO for each address, one session (from
    the `source` address, EHLO `helo`), MAIL FROM:<sender> before each."""
    out = {}
    c = h.RawSmtp(port, source=source)
    try:
        assert c.reply()[0].startswith("220")
        assert c.cmd(f"EHLO {helo}")[-1].startswith("250")
        for a in addresses:
            assert c.cmd(f"MAIL FROM:<{sender}>")[-1].startswith("250")
            out[a] = c.cmd(f"RCPT TO:<{a}>")[-1]
            c.cmd("RSET")
        c.cmd("QUIT")
    finally:
        c.close()
    return out


def test_every_address_class_matches_postfix(postfix_peer, make_postern, table_dir):
    tdir = table_dir
    for name, text in TABLES.items():
        (tdir / name).write_text(text)
        (tdir / name).chmod(0o644)
    params = shared_params(tdir)
    far = postfix_peer(params={**params, "virtual_mailbox_base": "/nonexistent"})
    p = make_postern(params=params)
    tr = TrivialRewrite(far.queue)
    try:
        postfix = {a: tr.resolve("", a) for a in ADDRESSES}
    finally:
        tr.close()
    postern = postern_resolutions(p, ADDRESSES)
    differences = []
    for a in ADDRESSES:
        want, got = postfix[a], postern[a]
        assert not want["fail"], f"Postfix could not resolve {a}: {want}"
        if want["bad_syntax"] or got["bad_syntax"]:
            if want["bad_syntax"] != got["bad_syntax"]:
                differences.append(f"{a}: bad syntax: Postfix {want}, Postern {got}")
            continue
        for k in ("class", "transport", "nexthop", "recipient"):
            if want[k].lower() != str(got.get(k, "")).lower():
                differences.append(
                    f"{a}: {k}: Postfix {want[k]!r}, Postern {got.get(k)!r}")
    pf_rcpt = rcpt_replies(far.port, ADDRESSES)
    pt_rcpt = rcpt_replies(p.port, ADDRESSES)
    for a in ADDRESSES:
        if pf_rcpt[a] != pt_rcpt[a]:
            differences.append(f"{a}: RCPT: Postfix {pf_rcpt[a]!r}, Postern {pt_rcpt[a]!r}")
    assert not differences, "\n".join(differences)
    # The verdicts really vary: some of each kind.
    codes = {r[:3] for r in pt_rcpt.values()}
    assert {"250", "550", "554"} <= codes, pt_rcpt


def test_relay_subdomain_goes_through_relay_transport(postfix_peer, make_postern):
    """relay_domains = example.com: smtpd takes user@sub.example.com (a
    subdomain, by parent_domain_matches_subdomains) and qmgr hands it to
    relay_transport, not to default_transport (which would bounce)."""
    far = postfix_peer(params={"virtual_mailbox_domains": "far.test, sub.example.com"})
    p = make_postern(params={
        "relay_domains": "example.com",
        "relay_transport": f"relay:[127.0.0.1]:{far.port}",
        "default_transport": "error:5.7.1 default_transport must not be used",
        "mynetworks": "192.0.2.0/24",
        "smtpd_relay_restrictions": "permit_mynetworks, reject_unauth_destination",
    })
    c = h.RawSmtp(p.port)
    try:
        c.reply()
        c.cmd("EHLO client.test")
        assert c.cmd("MAIL FROM:<s@client.test>")[-1].startswith("250")
        reply = c.cmd("RCPT TO:<user@sub.example.com>")[-1]
        assert reply.startswith("250"), reply
        assert c.cmd("DATA")[-1].startswith("354")
        r = c.cmd("Subject: sub-relay-token\r\n\r\nhello\r\n.")
        assert r[-1].startswith("250"), r
        c.cmd("QUIT")
    finally:
        c.close()
    far.wait_for("sub-relay-token")
    log = p.log_text() if hasattr(p, "log_text") else p.maillog.read_text()
    assert "relay=" in log and "default_transport must not be used" not in log, log


def test_postmaster_alias_in_virtual_mailbox_domain(postfix_peer, make_postern, table_dir):
    """postmaster@vbox.test is in virtual_alias_maps, not in
    virtual_mailbox_maps: smtpd accepts it (RFC 5321 needs postmaster)
    and the alias target receives it; an unknown address of the domain is
    still refused."""
    far = postfix_peer()
    tdir = table_dir
    (tdir / "virtual").write_text("postmaster@vbox.test  pm@far.test\n")
    (tdir / "vmailbox").write_text("box1@vbox.test  vbox.test/box1/\n")
    (tdir / "transport").write_text(f"far.test  smtp:[127.0.0.1]:{far.port}\n")
    for f in tdir.iterdir():
        f.chmod(0o644)
    p = make_postern(params={
        "virtual_mailbox_domains": "vbox.test",
        "virtual_mailbox_maps": f"texthash:{tdir}/vmailbox",
        "virtual_alias_maps": f"texthash:{tdir}/virtual",
        "transport_maps": f"texthash:{tdir}/transport",
        "mynetworks": "192.0.2.0/24",
        "smtpd_relay_restrictions": "permit_mynetworks, reject_unauth_destination",
    })
    c = h.RawSmtp(p.port)
    try:
        c.reply()
        c.cmd("EHLO client.test")
        assert c.cmd("MAIL FROM:<s@client.test>")[-1].startswith("250")
        bad = c.cmd("RCPT TO:<nobody@vbox.test>")[-1]
        assert bad.startswith("550 5.1.1") and "virtual mailbox table" in bad, bad
        reply = c.cmd("RCPT TO:<postmaster@vbox.test>")[-1]
        assert reply.startswith("250"), reply
        assert c.cmd("DATA")[-1].startswith("354")
        r = c.cmd("Subject: vpostmaster-token\r\n\r\nhello\r\n.")
        assert r[-1].startswith("250"), r
        c.cmd("QUIT")
    finally:
        c.close()
    far.wait_for("vpostmaster-token")
