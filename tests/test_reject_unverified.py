"""smtpd's reject_unverified_recipient and reject_unverified_sender
(#25 point 5; Postfix 3.7's ADDRESS_VERIFICATION_README).

The front is Postern (or, for the comparison, a private Postfix 3.7 with
the same main.cf settings): `relay_domains = far.test`, `relayhost =
[127.0.0.1]:FAR`, `smtpd_recipient_restrictions = permit_mynetworks,
reject_unverified_recipient, reject_unauth_destination`. The next hop is
a private real Postfix (tests/postfix_peer.py) whose
`virtual_mailbox_maps` knows only known@far.test: it answers any other
recipient `550 5.1.1 ... User unknown in virtual mailbox table`. The
client connects from 127.0.0.2, outside `mynetworks = 127.0.0.1/32`.

Shown: the known user is accepted once the probe answered (within the
poll), the unknown one refused with Postfix's reply (450 and "unverified
address" by default, 550 and "undeliverable address" with
`unverified_recipient_reject_code = 550`, `unverified_*_reject_reason`),
"Address verification in progress" when the poll ends first, the sender
check, no probe for a client `permit_mynetworks` lets through, a verify
service that cannot answer, and that no probe is ever delivered at the
next hop. Each scenario is then run against the Postfix front and the
replies compared.
"""

import re
import smtplib
import time

import pytest

import postern_harness as h
import postfix_peer as pp

CLIENT = ("127.0.0.2", 0)
KNOWN = f"known@{pp.DOMAIN}"
VERIFY_LINE = "verify unix - - n - 1 verify"


def far_side():
    """The next hop: a private Postfix that knows only KNOWN."""
    return pp.PostfixPeer(params={
        "virtual_mailbox_maps": f"inline:{{ {KNOWN}=far/ }}",
    }).start()


def front_params(far, **extra):
    """main.cf settings of the front, the same for Postern and Postfix."""
    params = {
        "relay_domains": pp.DOMAIN,
        "relayhost": f"[127.0.0.1]:{far.port}",
        "mynetworks": "127.0.0.1/32",
        "smtpd_relay_restrictions": "permit_mynetworks, reject_unauth_destination",
        "smtpd_recipient_restrictions":
            "permit_mynetworks, reject_unverified_recipient, reject_unauth_destination",
        # Postfix's defaults are 3 polls 3s apart; more and shorter ones
        # leave room for a slow machine without changing what is shown.
        "address_verify_poll_count": "10",
        "address_verify_poll_delay": "1s",
    }
    params.update(extra)
    return params


def postern_front(make_postern, far, **extra):
    return make_postern(params=front_params(far, **extra), master_cf_extra=(VERIFY_LINE,))


def postfix_front(far, **extra):
    params = front_params(far, **extra)
    params.update({
        # Not the far side's identity (a loop) nor its domain.
        "myhostname": "front.test",
        "mydomain": "front.test",
        "virtual_mailbox_domains": "",
        "virtual_mailbox_maps": "",
    })
    return pp.PostfixPeer(params=params).start()


def rcpt_replies(port, sender, rcpts, source=CLIENT, pause=0):
    """[(code, text)] of MAIL FROM (when refused) and each RCPT TO in one
    session; `pause` seconds between the recipients."""
    out = []
    with smtplib.SMTP("127.0.0.1", port, timeout=120, source_address=source) as s:
        s.ehlo("client.example")
        code, text = s.mail(sender)
        if code != 250:
            return [(code, text.decode())]
        for i, r in enumerate(rcpts):
            if i and pause:
                time.sleep(pause)
            code, text = s.rcpt(r)
            out.append((code, text.decode().replace("\n", " ")))
        s.rset()
    return out


def far_probes(far, address):
    """Log lines of the far side about a RCPT TO for `address` (refused or
    taken)."""
    return sum(1 for line in far.log_text().splitlines()
               if f"<{address}>" in line and ("RCPT from" in line or f"to=<{address}>" in line))


UNKNOWN_REASON = (r"host 127\.0\.0\.1\[127\.0\.0\.1\] said: 550 5\.1\.1 <{a}>: Recipient address "
                  r"rejected: User unknown in virtual mailbox table \(in reply to RCPT TO command\)")


@pytest.fixture
def far():
    if not pp.postfix_available():
        pytest.skip("Postfix is not installed (scripts/test installs postfix)")
    f = far_side()
    yield f
    f.stop()


def test_known_accepted_unknown_deferred_and_no_probe_delivered(make_postern, far):
    p = postern_front(make_postern, far)
    unknown = f"nobody@{pp.DOMAIN}"
    replies = rcpt_replies(p.port, "sender@client.test", [KNOWN, unknown])
    assert replies[0][0] == 250, (replies, p.log_tail())
    code, text = replies[1]
    assert code == 450, (replies, p.log_tail())
    assert re.fullmatch(rf"4\.1\.1 <{unknown}>: Recipient address rejected: unverified address: "
                        + UNKNOWN_REASON.format(a=re.escape(unknown)), text), text
    # Postfix's reject line.
    p.wait_for_log(rf"\w+: reject: RCPT from unknown\[127\.0\.0\.2\]: 450 4\.1\.1 <{unknown}>: "
                   r"Recipient address rejected: unverified address: host .*; "
                   rf"from=<sender@client\.test> to=<{unknown}> proto=ESMTP helo=<client\.example>")
    # The probes reached the next hop's RCPT, once each.
    assert far_probes(far, unknown) == 1, far.log_text()
    # A later session is answered from the verify cache: no new probe.
    replies = rcpt_replies(p.port, "sender@client.test", [unknown, KNOWN])
    assert replies[0][0] == 450 and replies[1][0] == 250, replies
    assert far_probes(far, unknown) == 1
    # Real mail to the known user goes through, and is the only message
    # the next hop ever delivered: no probe was delivered.
    token = f"verified-{time.time_ns()}"
    with smtplib.SMTP("127.0.0.1", p.port, timeout=60, source_address=CLIENT) as s:
        s.ehlo("client.example")
        code, _ = h.smtp_transaction(s, "sender@client.test", [KNOWN],
                                     h.crlf(f"Subject: {token}\n\nhello\n"))
    assert code == 250
    far.wait_for(token)
    time.sleep(1)
    assert len(far.messages()) == 1, [b[:200] for _, b in far.messages()]
    assert not p.log_search(r"status=bounced")


def test_reject_code_550_and_reject_reason(make_postern, far):
    p = postern_front(make_postern, far, unverified_recipient_reject_code="550")
    unknown = f"nobody@{pp.DOMAIN}"
    [(code, text)] = rcpt_replies(p.port, "sender@client.test", [unknown])
    assert code == 550, (text, p.log_tail())
    assert re.fullmatch(rf"5\.1\.1 <{unknown}>: Recipient address rejected: undeliverable address: "
                        + UNKNOWN_REASON.format(a=re.escape(unknown)), text), text
    # unverified_recipient_reject_reason replaces the next hop's text.
    p.set_params(unverified_recipient_reject_reason="Address lookup failure")
    p.postern("reload")
    h.wait_for(lambda: rcpt_replies(p.port, "sender@client.test", [unknown])[0][1].endswith(
        "undeliverable address: Address lookup failure"), 20, interval=1,
        what="the reject reason after reload")
    assert far.messages() == []


def test_in_progress_when_the_poll_ends_first(make_postern, far):
    """One query, no wait (address_verify_poll_count = 1): Postfix's
    'Address verification in progress'; the retry is accepted."""
    p = postern_front(make_postern, far, address_verify_poll_count="1")
    replies = rcpt_replies(p.port, "sender@client.test", [KNOWN, KNOWN], pause=3)
    assert replies[0] == (450, f"4.1.1 <{KNOWN}>: Recipient address rejected: unverified "
                               "address: Address verification in progress"), replies
    assert replies[1][0] == 250, replies


def test_unverified_sender(make_postern, far):
    p = postern_front(make_postern, far, smtpd_sender_restrictions="reject_unverified_sender")
    unknown = f"nosender@{pp.DOMAIN}"
    [(code, text)] = rcpt_replies(p.port, unknown, [KNOWN])
    assert code == 450, (text, p.log_tail())
    assert re.fullmatch(rf"4\.1\.7 <{unknown}>: Sender address rejected: unverified address: "
                        + UNKNOWN_REASON.format(a=re.escape(unknown)), text), text
    assert rcpt_replies(p.port, KNOWN, [KNOWN])[0][0] == 250


def test_no_probe_for_a_permitted_client(make_postern, far):
    """permit_mynetworks decides before reject_unverified_recipient is
    reached: nothing is asked, no probe goes (as in Postfix)."""
    p = postern_front(make_postern, far)
    other = f"other@{pp.DOMAIN}"
    assert rcpt_replies(p.port, "sender@client.test", [other], source=None) == [
        (250, "2.1.5 Ok")]
    time.sleep(2)
    assert far_probes(far, other) == 0, far.log_text()


def test_verify_service_unavailable(make_postern, far):
    """No verify service in master.cf: Postfix's 'address verification
    problem' (450, as defer_if_permit), and its warning."""
    p = make_postern(params=front_params(far))
    unknown = f"nobody@{pp.DOMAIN}"
    [(code, text)] = rcpt_replies(p.port, "sender@client.test", [unknown])
    assert (code, text) == (450, f"4.1.1 <{unknown}>: Recipient address rejected: "
                                 "address verification problem"), p.log_tail()
    p.wait_for_log(r"warning: verify service failure")
    # defer_if_permit: a later reject wins; with tempfail_action = defer
    # the verify problem is answered at once.
    lists = {"smtpd_recipient_restrictions": "reject_unverified_recipient, reject"}
    p2 = make_postern(params=front_params(far, **lists))
    [(code, text)] = rcpt_replies(p2.port, "sender@client.test", [unknown])
    assert (code, text) == (554, f"5.7.1 <{unknown}>: Recipient address rejected: "
                                 "Access denied"), p2.log_tail()
    p3 = make_postern(params=front_params(far, unverified_recipient_tempfail_action="defer",
                                          **lists))
    [(code, text)] = rcpt_replies(p3.port, "sender@client.test", [unknown])
    assert (code, text) == (450, f"4.1.1 <{unknown}>: Recipient address rejected: "
                                 "address verification problem"), p3.log_tail()


def test_postern_check_accepts_it_but_not_after_the_final_dot(make_postern, far):
    p = make_postern(start=False, params=front_params(
        far, smtpd_sender_restrictions="reject_unverified_sender"),
        master_cf_extra=(VERIFY_LINE,))
    r = p.postern("check")
    assert r.returncode == 0, h.describe(r)
    assert "unverified" not in r.stdout + r.stderr, h.describe(r)
    # After the final dot there is no command to wait at: refused, never
    # passed over.
    p = make_postern(start=False, params=front_params(
        far, smtpd_end_of_data_restrictions="reject_unverified_sender"),
        master_cf_extra=(VERIFY_LINE,))
    for cmd in ("check", "start"):
        r = p.postern(cmd)
        assert r.returncode != 0, h.describe(r)
        assert re.search(r"smtpd_end_of_data_restrictions: reject_unverified_sender: "
                         r"not carried out after the final dot", r.stderr), h.describe(r)
    # Without a verify service in master.cf: a warning naming the list.
    p = make_postern(start=False, params=front_params(far))
    r = p.postern("check")
    assert r.returncode == 0, h.describe(r)
    assert re.search(r"warning: .*main\.cf, line \d+: smtpd_recipient_restrictions: "
                     r"reject_unverified_\*: no verify service in master\.cf", r.stderr), \
        h.describe(r)


# -- the same scenarios against a private Postfix as the front -------------

SCENARIOS = {
    "default": ({}, "sender@client.test", [KNOWN, f"nobody@{pp.DOMAIN}"], 0),
    "reject-code-550": ({"unverified_recipient_reject_code": "550"},
                        "sender@client.test", [f"nobody@{pp.DOMAIN}", KNOWN], 0),
    "reject-reason": ({"unverified_recipient_reject_code": "550",
                       "unverified_recipient_reject_reason": "Address lookup failure"},
                      "sender@client.test", [f"nobody@{pp.DOMAIN}"], 0),
    "in-progress": ({"address_verify_poll_count": "1"}, "sender@client.test",
                    [KNOWN, KNOWN], 3),
    "sender": ({"smtpd_sender_restrictions": "reject_unverified_sender"},
               f"nosender@{pp.DOMAIN}", [KNOWN], 0),
    # Checked at MAIL FROM itself.
    "sender-no-delay-reject": ({"smtpd_sender_restrictions": "reject_unverified_sender",
                                "smtpd_delay_reject": "no",
                                "unverified_sender_reject_code": "550"},
                               f"nosender@{pp.DOMAIN}", [KNOWN], 0),
    # warn_if_reject: logged, and the recipient accepted.
    "warn-if-reject": ({"smtpd_recipient_restrictions":
                        "warn_if_reject, reject_unverified_recipient, reject_unauth_destination"},
                       "sender@client.test", [f"nobody@{pp.DOMAIN}"], 0),
}


# The reply codes each scenario gives (MAIL FROM's when it is refused).
CODES = {
    "default": [250, 450],
    "reject-code-550": [550, 250],
    "reject-reason": [550],
    "in-progress": [450, 250],
    "sender": [450],
    "sender-no-delay-reject": [550],
    "warn-if-reject": [250],
}


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_same_replies_as_postfix(make_postern, far, name):
    extra, sender, rcpts, pause = SCENARIOS[name]
    p = postern_front(make_postern, far, **extra)
    ours = rcpt_replies(p.port, sender, rcpts, pause=pause)
    pf = postfix_front(far, **extra)
    try:
        theirs = rcpt_replies(pf.port, sender, rcpts, pause=pause)
    finally:
        log = pf.log_text()
        pf.stop()
    assert ours == theirs, f"Postern: {ours}\nPostfix: {theirs}\n{log[-3000:]}"
    assert [c for c, _ in ours] == CODES[name], ours
    assert far.messages() == []


def test_policy_asked_once_and_prepend_added_once(make_postern, far):
    """A policy server before reject_unverified_recipient is asked once per
    RCPT, as in Postfix (Postern's smtpd runs the command again once the
    verify answer is in), and its PREPEND header is added once."""
    from test_policy_service import PolicyServer
    policy = PolicyServer(lambda attrs: "PREPEND X-Policy: seen"
                          if attrs.get("protocol_state") == "RCPT" else "DUNNO")
    try:
        p = postern_front(make_postern, far, smtpd_recipient_restrictions=(
            f"permit_mynetworks, check_policy_service inet:127.0.0.1:{policy.port}, "
            "reject_unverified_recipient, reject_unauth_destination"))
        token = f"policy-once-{time.time_ns()}"
        with smtplib.SMTP("127.0.0.1", p.port, timeout=60, source_address=CLIENT) as s:
            s.ehlo("client.example")
            code, _ = h.smtp_transaction(s, "sender@client.test", [KNOWN],
                                         h.crlf(f"Subject: {token}\n\nhello\n"))
        assert code == 250, p.log_tail()
        [(_, raw)] = far.wait_for(token)
        assert raw.count(b"X-Policy: seen") == 1, raw[:600]
        rcpt_requests = [r for r in policy.requests if r.get("protocol_state") == "RCPT"]
        assert len(rcpt_requests) == 1, policy.requests
    finally:
        policy.stop()
