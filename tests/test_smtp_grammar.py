"""The SMTP command grammar, the DSN parameters and the HELO name check are
defined once (common/src/smtp_command.rs, dsn.rs, hostname.rs): the same
malformed and edge-case MAIL, RCPT and EHLO commands get the same reply
codes from Postern's smtpd, from `sendmail -bs` (which reads commands with
smtpd's grammar, as Postfix's `sendmail -bs` runs smtpd), and from a
private real Postfix 3.7.

Access restrictions are not the grammar: as Postfix's stand-alone smtpd,
`sendmail -bs` applies none, so the HELO name cases go to the two SMTP
servers only.
"""

import pytest

import postern_harness as h
from postfix_peer import postfix_available, PostfixPeer

# Both servers refuse a bad HELO name at EHLO itself, and a sender
# domain that is not fully qualified at MAIL.
HELO_PARAMS = {
    "smtpd_delay_reject": "no",
    "smtpd_helo_restrictions": "reject_invalid_helo_hostname",
    "smtpd_sender_restrictions": "reject_non_fqdn_sender",
}

SENDER = "sender@example.org"
LONG_ENVID = "x" * 101
LABEL_64 = "a" * 64

# (MAIL command, expected reply code). RCPT cases follow a good MAIL.
MAIL_CASES = [
    (f"MAIL FROM:<{SENDER}>", 250),
    (f"MAIL FROM: <{SENDER}>", 250),
    (f"MAIL FROM:{SENDER}", 250),
    ("MAIL FROM:<>", 250),
    (f"MAIL FROM:<@relay.example:{SENDER}>", 250),
    (f"MAIL FROM:<{SENDER}", 501),
    ("MAIL FROM:<a b@example.org>", 501),
    ("MAIL FROM:<a@>", 501),
    ("MAIL FROM:<a@bad..example>", 501),
    ("MAIL FROM:<a@-bad.example>", 501),
    ("MAIL FROM:<a@1.2.3.4>", 501),
    ("MAIL FROM:<a@[127.0.0.1]>", 250),
    ("MAIL FROM:", 501),
    (f"MAIL TO:<{SENDER}>", 501),
    (f"MAIL FROM:<{SENDER}> ENVID=id+2B1", 250),
    (f"MAIL FROM:<{SENDER}> ENVID=a+zz", 501),
    (f"MAIL FROM:<{SENDER}> ENVID=a+2", 501),
    (f"MAIL FROM:<{SENDER}> ENVID=a=b", 250),
    (f"MAIL FROM:<{SENDER}> ENVID=a+2b", 250),
    (f"MAIL FROM:<{SENDER}> ENVID=a+20b", 250),
    (f"MAIL FROM:<{SENDER}> ENVID=", 501),
    (f"MAIL FROM:<{SENDER}> ENVID=a+0Ab", 501),
    (f"MAIL FROM:<{SENDER}> ENVID={'x' * 100}", 250),
    (f"MAIL FROM:<{SENDER}> ENVID=a ENVID=b", 501),
    (f"MAIL FROM:<{SENDER}> RET=HDRS", 250),
    (f"MAIL FROM:<{SENDER}> RET=full", 250),
    (f"MAIL FROM:<{SENDER}> RET=SOME", 501),
    (f"MAIL FROM:<{SENDER}> RET=FULL RET=HDRS", 501),
    (f"MAIL FROM:<{SENDER}> SIZE=1000", 250),
    (f"MAIL FROM:<{SENDER}> SIZE=12x", 501),
    (f"MAIL FROM:<{SENDER}> BODY=8BITMIME", 250),
    (f"MAIL FROM:<{SENDER}> BODY=7BIT SIZE=10 RET=HDRS ENVID=e", 250),
    (f"MAIL FROM:<{SENDER}> FOO=BAR", 555),
    (f"MAIL FROM:<{SENDER}> AUTH=<>", 250),
    (f"MAIL FROM:<{SENDER}> SMTPUTF8", 250),
    (f"MAIL FROM:<{SENDER}> SMTPUTF8=yes", 555),
]

RCPT_CASES = [
    ("RCPT TO:<{rcpt}>", 250),
    ("RCPT TO: <{rcpt}>", 250),
    ("RCPT TO:<{rcpt}> NOTIFY=SUCCESS,FAILURE", 250),
    ("RCPT TO:<{rcpt}> NOTIFY=success,delay", 250),
    ("RCPT TO:<{rcpt}> NOTIFY=NEVER", 250),
    ("RCPT TO:<{rcpt}> NOTIFY=NEVER,SUCCESS", 501),
    ("RCPT TO:<{rcpt}> NOTIFY=FAILURE,NEVER", 501),
    ("RCPT TO:<{rcpt}> NOTIFY=SOMETIMES", 501),
    ("RCPT TO:<{rcpt}> NOTIFY=", 501),
    ("RCPT TO:<{rcpt}> NOTIFY=DELAY NOTIFY=DELAY", 501),
    ("RCPT TO:<{rcpt}> ORCPT=rfc822;orig+2Bx@example.org", 250),
    ("RCPT TO:<{rcpt}> ORCPT=rfc822;{rcpt}", 250),
    ("RCPT TO:<{rcpt}> ORCPT=utf-8;j\\x{{F6}}rg@example.org", 250),
    ("RCPT TO:<{rcpt}> ORCPT=rfc822;bad+zz@example.org", 501),
    ("RCPT TO:<{rcpt}> ORCPT=rfc822;ok+2bx@example.org", 250),
    ("RCPT TO:<{rcpt}> ORCPT=rfc822;", 250),
    ("RCPT TO:<{rcpt}> ORCPT=;a@b", 501),
    ("RCPT TO:<{rcpt}> ORCPT=x-type;a@b", 250),
    ("RCPT TO:<{rcpt}> ORCPT=utf-8;bad\\x{{41", 501),
    ("RCPT TO:<{rcpt}> NOTIFY=SUCCESS,,FAILURE", 250),
    ("RCPT TO:<{rcpt}> ORCPT=rfc822", 501),
    ("RCPT TO:<{rcpt}> ORCPT=rfc822;a@b ORCPT=rfc822;c@d", 501),
    ("RCPT TO:<{rcpt}> FOO", 555),
    ("RCPT TO:<{rcpt}", 501),
    ("RCPT TO:<>", 501),
    ("RCPT TO:<a b@example.org>", 501),
    ("RCPT TO:<u@bad..example>", 501),
    ("RCPT FROM:<{rcpt}>", 501),
]

# Where Postern is deliberately stricter than Postfix 3.7:
# (command, Postern's code, Postfix's code). An ENVID is at most 100
# characters (RFC 3461 section 4.4); a decoded ORCPT with a control
# character would become a broken Original-Recipient: header in a DSN.
STRICTER_CASES = [
    (f"MAIL FROM:<{SENDER}> ENVID={LONG_ENVID}", 501, 250),
    ("RCPT TO:<{rcpt}> ORCPT=rfc822;bad+0Ax@example.org", 501, 250),
]

HELO_CASES = [
    ("EHLO client.example", 250),
    ("EHLO client.example.", 250),
    ("EHLO localhost", 250),
    ("EHLO under_score.example", 250),
    ("EHLO [127.0.0.1]", 250),
    ("EHLO [IPv6:::1]", 250),
    ("EHLO bad..example", 501),
    ("EHLO -bad.example", 501),
    ("EHLO bad-.example", 501),
    ("EHLO 1.2.3.4", 250),
    ("EHLO 999.1.2.3", 501),
    ("EHLO [1.2.3]", 501),
    ("EHLO [127.0.0.1", 501),
    ("EHLO [999.0.0.1]", 501),
    (f"EHLO {LABEL_64}.example", 501),
    ("EHLO bad/name.example", 501),
    ("EHLO host.123", 250),
    ("EHLO 123", 501),
    ("EHLO [IPv6:1.2.3.4]", 501),
    ("EHLO [::1]", 501),
    ("EHLO", 501),
]

# reject_non_fqdn_sender (common/src/hostname.rs, fqdn_domain).
FQDN_SENDER_CASES = [
    ("MAIL FROM:<a@example.org>", 250),
    ("MAIL FROM:<a@example.org.>", 250),
    ("MAIL FROM:<a@[127.0.0.1]>", 250),
    ("MAIL FROM:<a@example>", 504),
    ("MAIL FROM:<a@bad_.example>", 250),
]

# Grammar every reader shares, HELO restrictions aside.
SHARED_HELO_CASES = [("EHLO", 501), ("HELO", 501), ("EHLO client.example", 250)]


def final_code(lines):
    """The code of a (possibly multi-line) reply."""
    assert lines, "no reply"
    return int(lines[-1][:3])


class SmtpServer:
    """Sends one dialogue per connection to an SMTP port."""

    def __init__(self, port):
        self.port = port

    def dialogue(self, commands):
        c = h.RawSmtp(self.port)
        try:
            assert final_code(c.reply()) == 220
            return [final_code(c.cmd(line)) for line in commands]
        finally:
            try:
                c.cmd("QUIT")
            except OSError:
                pass
            c.close()


class SendmailBs:
    """Sends one dialogue per `sendmail -bs` run."""

    def __init__(self, postern):
        self.p = postern

    def dialogue(self, commands):
        script = "".join(line + "\r\n" for line in [*commands, "QUIT"]).encode()
        r = self.p.sendmail(["-bs"], script, setgid=False)
        assert r.returncode == 0, h.describe(r)
        codes = [int(line[:3]) for line in r.stdout.splitlines() if line[3:4] == " "]
        # The greeting first, QUIT's 221 last.
        assert codes[0] == 220 and codes[-1] == 221, r.stdout
        return codes[1:-1]


def one_code(server, cmd, rcpt):
    """The reply code of one MAIL case (after EHLO), or of one RCPT case
    (after EHLO and a good MAIL)."""
    if cmd.startswith("MAIL"):
        return server.dialogue(["EHLO client.example", cmd])[-1]
    codes = server.dialogue(["EHLO client.example", f"MAIL FROM:<{SENDER}>",
                             cmd.format(rcpt=rcpt)])
    assert codes[1] == 250, f"MAIL before {cmd}: {codes}"
    return codes[-1]


def mail_codes(server, rcpt):
    """Reply code of each MAIL case, then of each RCPT case."""
    return [one_code(server, cmd, rcpt) for cmd in case_names()]


def expected_mail_codes():
    return [code for _, code in MAIL_CASES] + [code for _, code in RCPT_CASES]


def case_names():
    return [c for c, _ in MAIL_CASES] + [c for c, _ in RCPT_CASES]


def mismatches(got, expected, names):
    return [f"{n!r}: got {g}, expected {e}"
            for n, g, e in zip(names, got, expected) if g != e]


@pytest.fixture
def postern(make_postern):
    return make_postern(params=HELO_PARAMS)


def test_smtpd_mail_and_rcpt_grammar(postern):
    got = mail_codes(SmtpServer(postern.port), "ptalice@postern.test")
    assert not mismatches(got, expected_mail_codes(), case_names())
    for cmd, ours, _ in STRICTER_CASES:
        assert one_code(SmtpServer(postern.port), cmd, "ptalice@postern.test") == ours, cmd


def test_sendmail_bs_reads_the_same_grammar_as_smtpd(postern):
    # Each of these was taken by a looser parser of its own before
    # sendmail -bs used smtpd's (a space in a path, BODY/AUTH it does not
    # offer, lower-case xtext hex, an ORCPT without an address).
    bs = mail_codes(SendmailBs(postern), "ptalice@postern.test")
    smtpd = mail_codes(SmtpServer(postern.port), "ptalice@postern.test")
    names = case_names()
    assert not mismatches(bs, smtpd, names)
    assert not mismatches(bs, expected_mail_codes(), names)
    for cmd, ours, _ in STRICTER_CASES:
        assert one_code(SendmailBs(postern), cmd, "ptalice@postern.test") == ours, cmd
    for cmd, code in SHARED_HELO_CASES:
        assert SendmailBs(postern).dialogue([cmd]) == [code], cmd
        assert SmtpServer(postern.port).dialogue([cmd]) == [code], cmd


def test_smtpd_rejects_invalid_helo_names(postern):
    server = SmtpServer(postern.port)
    got = [server.dialogue([cmd])[-1] for cmd, _ in HELO_CASES]
    names = [c for c, _ in HELO_CASES]
    assert not mismatches(got, [code for _, code in HELO_CASES], names)
    postern.wait_for_log(r"reject: EHLO from \S+: 501 5\.5\.2 <bad\.\.example>: "
                         r"Helo command rejected: Invalid name")


def test_smtpd_rejects_non_fqdn_senders(postern):
    server = SmtpServer(postern.port)
    got = [one_code(server, cmd, None) for cmd, _ in FQDN_SENDER_CASES]
    names = [c for c, _ in FQDN_SENDER_CASES]
    assert not mismatches(got, [code for _, code in FQDN_SENDER_CASES], names)


def test_sendmail_bs_applies_no_helo_restrictions(postern):
    # As Postfix's stand-alone smtpd: the grammar, not the access policy.
    assert SendmailBs(postern).dialogue(["EHLO bad..example"]) == [250]


@pytest.fixture
def real_postfix():
    if not postfix_available():
        pytest.skip("Postfix is not installed")
    far = PostfixPeer(params=HELO_PARAMS).start()
    yield far
    far.stop()


def test_same_reply_codes_as_postfix(postern, real_postfix):
    postfix = SmtpServer(real_postfix.port)
    ours = SmtpServer(postern.port)
    names = case_names()
    theirs = mail_codes(postfix, "someone@far.test")
    assert not mismatches(theirs, expected_mail_codes(), names), "Postfix itself"
    assert not mismatches(mail_codes(ours, "ptalice@postern.test"), theirs, names)
    for cmd, _, postfix_code in STRICTER_CASES:
        assert one_code(postfix, cmd, "someone@far.test") == postfix_code, cmd
    fqdn_names = [c for c, _ in FQDN_SENDER_CASES]
    theirs = [one_code(postfix, cmd, None) for cmd in fqdn_names]
    got = [one_code(ours, cmd, None) for cmd in fqdn_names]
    assert not mismatches(got, theirs, fqdn_names)
    helo_names = [c for c, _ in HELO_CASES]
    theirs = [postfix.dialogue([cmd])[-1] for cmd in helo_names]
    got = [ours.dialogue([cmd])[-1] for cmd in helo_names]
    assert not mismatches(got, theirs, helo_names)


def test_an_overlong_command_line_is_one_error_for_both(postern):
    # A 5,000-octet command: one "500 5.5.2 ... command too long", and the
    # command after it is read as the next command (not the line's tail).
    long_line = "NOOP " + "a" * 5000
    for server in (SmtpServer(postern.port), SendmailBs(postern)):
        assert server.dialogue(["EHLO client.example", long_line, "NOOP"]) == [250, 500, 250]
