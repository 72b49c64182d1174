"""smtpd's restriction language (Postfix's smtpd_*_restrictions) with real
clients: the stages and smtpd_delay_reject, access tables (cidr:,
texthash:, hash:, regexp:), the FQDN and HELO checks, unlisted recipients,
unauthorized pipelining, sender login maps with a real Dovecot, and what
hostile clients get.

127.0.0.1 is in mynetworks, 127.0.0.2 is not (both are loopback).
"""

import re
import socket
import uuid

import postern_harness as h
from dovecot import Dovecot, dovecot  # noqa: F401  (the fixture)

OUTSIDE = ("127.0.0.2", 0)


def rcpt_reply(p, sender, rcpt, helo="client.example", source=None):
    """(code, text) of RCPT TO after EHLO and MAIL FROM."""
    with p.smtp(source_address=source) as s:
        s.ehlo(helo)
        code, text = s.mail(sender)
        if code != 250:
            return code, text.decode()
        code, text = s.rcpt(rcpt)
        return code, text.decode()


Raw = h.RawSmtp


# --------------------------------------------------------------------------
# Stages and access tables


def test_client_access_cidr_delayed_to_rcpt(make_postern):
    p = make_postern(
        params={"smtpd_client_restrictions":
                lambda p: f"check_client_access cidr:{p.etc}/clients.cidr"},
        files={"etc/clients.cidr": "127.0.0.2/32 REJECT no mail from this host\n"
                                   "127.0.0.0/8 DUNNO\n"})
    # Delayed: the client gets as far as RCPT, where the reason is logged
    # with the recipient.
    code, text = rcpt_reply(p, "s@example.org", "root@postern.test", source=OUTSIDE)
    assert (code, text) == (554, "5.7.1 <unknown[127.0.0.2]>: Client host rejected: "
                                 "no mail from this host")
    p.wait_for_log(r"NOQUEUE: reject: RCPT from unknown\[127\.0\.0\.2\]: 554 5\.7\.1 "
                   r"<unknown\[127\.0\.0\.2\]>: Client host rejected: no mail from this host; "
                   r"from=<s@example\.org> to=<root@postern\.test> proto=ESMTP "
                   r"helo=<client\.example>")
    assert rcpt_reply(p, "s@example.org", "root@postern.test")[0] == 250


def test_client_reject_at_connect_without_delay(make_postern):
    p = make_postern(params={"smtpd_delay_reject": "no",
                             "smtpd_client_restrictions": "permit_mynetworks, reject"})
    c = Raw(p.port, source=OUTSIDE)
    assert c.reply() == ["554 5.7.1 <unknown[127.0.0.2]>: Client host rejected: Access denied"]
    assert c.cmd("EHLO c") == ["503 5.7.0 Error: access denied for unknown[127.0.0.2]"]
    assert c.cmd("MAIL FROM:<a@example.org>")[0].startswith("503 5.7.0")
    assert c.cmd("QUIT") == ["221 2.0.0 Bye"]
    c.close()
    with p.smtp() as s:  # 127.0.0.1 is in mynetworks
        assert s.ehlo("c")[0] == 250


def test_sender_access_texthash_and_hash(make_postern):
    table = ("spam.example REJECT\n"
             "friend@spam.example OK\n"
             "<> 550 5.7.1 no bounces accepted here\n"
             "later.example 450 4.7.25 come back later\n")
    p = make_postern(
        params={"smtpd_sender_restrictions":
                lambda p: f"check_sender_access hash:{p.etc}/sender_access"},
        files={"etc/sender_access": table}, start=False)
    r = h.run([h.BIN_DIR / "postmap", f"hash:{p.etc}/sender_access"], env=p.env())
    assert r.returncode == 0, h.describe(r)
    p.start()
    assert rcpt_reply(p, "x@sub.spam.example", "root@postern.test") == \
        (554, "5.7.1 <x@sub.spam.example>: Sender address rejected: Access denied")
    assert rcpt_reply(p, "friend@spam.example", "root@postern.test")[0] == 250
    assert rcpt_reply(p, "", "root@postern.test") == \
        (550, "5.7.1 <>: Sender address rejected: no bounces accepted here")
    assert rcpt_reply(p, "a@later.example", "root@postern.test") == \
        (450, "4.7.25 <a@later.example>: Sender address rejected: come back later")
    # OK in the sender list does not open the relay.
    assert rcpt_reply(p, "friend@spam.example", "x@example.net", source=OUTSIDE)[0] == 554


def test_recipient_access_regexp_and_helo_checks(make_postern):
    p = make_postern(
        params={
            "smtpd_recipient_restrictions":
                lambda p: f"reject_non_fqdn_recipient, check_recipient_access regexp:{p.etc}/rcpt.re",
            "smtpd_helo_restrictions": "reject_invalid_helo_hostname, reject_non_fqdn_helo_hostname",
            "smtpd_sender_restrictions": "reject_non_fqdn_sender",
        },
        files={"etc/rcpt.re": "/^info-([a-z]+)@/ 550 5.1.1 ask $1 instead\n"
                              "/^sales@/ REJECT\n"})
    assert rcpt_reply(p, "s@example.org", "info-bob@postern.test") == \
        (550, "5.1.1 <info-bob@postern.test>: Recipient address rejected: ask bob instead")
    assert rcpt_reply(p, "s@example.org", "SALES@postern.test")[0] == 554
    assert rcpt_reply(p, "s@example.org", "root@postern.test")[0] == 250
    assert rcpt_reply(p, "s@example.org", "root@postern.test", helo="localhost") == \
        (504, "5.5.2 <localhost>: Helo command rejected: need fully-qualified hostname")
    assert rcpt_reply(p, "s@example.org", "root@postern.test", helo="bad..name")[0] == 501
    assert rcpt_reply(p, "s@example.org", "root@postern.test", helo="[127.0.0.1]")[0] == 250
    assert rcpt_reply(p, "s@localhost", "root@postern.test") == \
        (504, "5.5.2 <s@localhost>: Sender address rejected: need fully-qualified address")
    code, text = rcpt_reply(p, "s@example.org", "root")
    assert (code, text) == (504, "5.5.2 <root>: Recipient address rejected: "
                                 "need fully-qualified address")


def test_helo_and_sender_checks_without_delay(make_postern):
    p = make_postern(params={"smtpd_delay_reject": "no",
                             "smtpd_helo_restrictions": "reject_non_fqdn_helo_hostname",
                             "smtpd_sender_restrictions": "reject_non_fqdn_sender",
                             "smtpd_helo_required": "yes"})
    with p.smtp() as s:
        code, text = s.ehlo("localhost")
        assert (code, text) == (504, b"5.5.2 <localhost>: Helo command rejected: "
                                     b"need fully-qualified hostname")
        # The HELO did not count: MAIL still needs one.
        code, _ = s.mail("a@example.org")
        assert code == 503
        assert s.ehlo("client.example")[0] == 250
        code, text = s.mail("a@localhost")
        assert code == 504
        assert s.mail("a@example.org")[0] == 250


def test_unlisted_recipient(make_postern):
    p = make_postern(start=False)
    p.write_file("etc/aliases", "postmaster: root\nsupport: root\n")
    p.start()
    assert rcpt_reply(p, "s@example.org", "root@postern.test")[0] == 250
    assert rcpt_reply(p, "s@example.org", "support@postern.test")[0] == 250
    assert rcpt_reply(p, "s@example.org", "no-such-user-x@postern.test") == \
        (550, "5.1.1 <no-such-user-x@postern.test>: Recipient address rejected: "
              "User unknown in local recipient table")
    p.wait_for_log(r"NOQUEUE: reject: RCPT from unknown\[127\.0\.0\.1\]: 550 5\.1\.1 "
                   r"<no-such-user-x@postern\.test>: Recipient address rejected: User unknown "
                   r"in local recipient table; from=<s@example\.org> to=<no-such-user-x@postern\.test>")
    p.stop()
    p.set_params(smtpd_reject_unlisted_recipient="no")
    p.start()
    assert rcpt_reply(p, "s@example.org", "no-such-user-x@postern.test")[0] == 250


def test_unauth_pipelining_and_data_restrictions(make_postern):
    p = make_postern(params={"smtpd_data_restrictions": "reject_unauth_pipelining"})
    c = Raw(p.port)
    c.reply()
    c.cmd("EHLO client.example")
    c.cmd("MAIL FROM:<a@example.org>")
    c.cmd("RCPT TO:<root@postern.test>")
    # A spammer's shortcut: the content right behind DATA.
    c.send("DATA\r\nSubject: x\r\n\r\nbody\r\n.\r\n")
    assert c.reply() == ["503 5.5.0 <DATA>: Data command rejected: Improper use of SMTP "
                         "command pipelining"]
    c.close()
    p.wait_for_log(r"improper command pipelining after DATA from unknown\[127\.0\.0\.1\]")
    # smtplib waits for 354: accepted.
    code, _ = p.send("a@example.org", ["root@postern.test"], "Subject: fine\n\nbody\n")
    assert code == 250
    p.stop()
    p.set_params(smtpd_data_restrictions="reject")
    p.start()
    with p.smtp() as s:
        s.ehlo("c")
        s.mail("a@example.org")
        s.rcpt("root@postern.test")
        code, text = s.docmd("DATA")
        assert (code, text) == (554, b"5.7.1 <DATA>: Data command rejected: Access denied")


# --------------------------------------------------------------------------
# Sender login maps (with Dovecot)


def test_sender_login_mismatch(make_postern, dovecot):
    d = dovecot(users={"alice@example.test": "apw", "bob@example.test": "bpw"},
                auth_failure_delay="0 secs")
    p = make_postern(
        params={"smtpd_sasl_auth_enable": "yes", "smtpd_sasl_path": str(d.auth_socket),
                "smtpd_sender_login_maps": lambda p: f"texthash:{p.etc}/logins",
                "smtpd_sender_restrictions": "reject_sender_login_mismatch"},
        files={"etc/logins": "alice@example.test alice@example.test\n"
                             "@shared.example alice@example.test, bob@example.test\n"})

    def attempt(login, sender):
        with p.smtp(source_address=OUTSIDE) as s:
            s.ehlo("c")
            if login:
                s.login(login, {"alice@example.test": "apw", "bob@example.test": "bpw"}[login])
            s.mail(sender)
            code, text = s.rcpt("r@example.net")
            return code, text.decode()

    assert attempt("alice@example.test", "alice@example.test") == (250, "2.1.5 Ok")
    assert attempt("bob@example.test", "alice@example.test") == \
        (553, "5.7.1 <alice@example.test>: Sender address rejected: not owned by user "
              "bob@example.test")
    assert attempt("bob@example.test", "team@shared.example") == (250, "2.1.5 Ok")
    assert attempt(None, "alice@example.test") == \
        (553, "5.7.1 <alice@example.test>: Sender address rejected: not logged in")


# --------------------------------------------------------------------------
# Hostile clients


def test_garbage_nul_and_overlong_lines(make_postern):
    p = make_postern(params={"smtpd_hard_error_limit": "5"})
    c = Raw(p.port)
    c.reply()
    assert c.cmd("NOOP\0evil") == ["500 5.5.2 Error: bad syntax"]
    assert c.cmd("X" * 5000) == ["500 5.5.2 postern.test Error: command too long"]
    c.send(b"NOOP \xff\xfe\r\n")
    assert c.reply() == ["500 5.5.2 Error: bad UTF-8 syntax"]
    c.send(b"\x16\x03\x01garbage\r\n")
    c.reply()
    assert c.cmd("FOO") == ["500 5.5.2 Error: command not recognized"]
    assert c.reply() == ["421 4.7.0 postern.test Error: too many errors"]
    assert c.f.readline() == b""  # cut off
    c.close()
    p.wait_for_log(r"too many errors after UNKNOWN from unknown\[127\.0\.0\.1\]")


def test_client_leaving_mid_data_leaves_nothing(make_postern):
    p = make_postern()
    c = Raw(p.port)
    c.reply()
    c.cmd("EHLO c")
    c.cmd("MAIL FROM:<a@example.org>")
    c.cmd("RCPT TO:<root@postern.test>")
    assert c.cmd("DATA")[0].startswith("354")
    c.send("Subject: half\r\n\r\n" + "line\r\n" * 1000)
    c.close()
    p.wait_for_log(r"lost connection after DATA from unknown\[127\.0\.0\.1\]")
    p.wait_for_log(r"disconnect from unknown\[127\.0\.0\.1\]")
    # cleanup unlinks the file after smtpd has sent it the abort (smtpd
    # does not wait for that): wait a bounded while, then look.
    queues = ("incoming", "active", "deferred", "maildrop")
    h.poll_until(lambda: not any(p.queue_files(q) for q in queues), timeout=10)
    for q in queues:
        assert p.queue_files(q) == [], q


def test_idle_connections_do_not_stop_a_client(make_postern):
    p = make_postern()
    idle = []
    try:
        for _ in range(500):
            idle.append(socket.create_connection(("127.0.0.1", p.port), timeout=20))
        # A well-behaved client still gets through, start to end.
        code, text = p.send("a@example.org", ["root@postern.test"], "Subject: hi\n\nbody\n")
        assert code == 250, text
    finally:
        for s in idle:
            s.close()


def test_tarpit_delays_only_the_erring_client(make_postern):
    """Past smtpd_soft_error_limit each reply waits smtpd_error_sleep_time;
    the event loop meanwhile serves everyone else."""
    p = make_postern(params={"smtpd_soft_error_limit": "2", "smtpd_error_sleep_time": "3s",
                             "smtpd_hard_error_limit": "4"})
    bad = Raw(p.port)
    bad.reply()
    assert bad.cmd("FOO") == ["500 5.5.2 Error: command not recognized"]
    assert bad.cmd("BAR") == ["500 5.5.2 Error: command not recognized"]
    bad.send("BAZ\r\n")  # the third error: its reply is held back
    code, _ = p.send("a@example.org", ["root@postern.test"], "Subject: meanwhile\n\nbody\n")
    assert code == 250
    # Served while the erring client waited; its reply comes afterwards.
    assert bad.reply() == ["500 5.5.2 Error: command not recognized"]
    assert bad.cmd("QUX") == ["500 5.5.2 Error: command not recognized"]
    assert bad.reply() == ["421 4.7.0 postern.test Error: too many errors"]
    bad.close()
    order = p.log_findall(r"(disconnect from unknown\[127\.0\.0\.1\] (?:ehlo|unknown)\S*)")
    assert order[0].startswith("disconnect from unknown[127.0.0.1] ehlo="), order


# --------------------------------------------------------------------------
# Restrictions that ask DNS (dnsmasq as the name server)


def test_dns_restrictions(make_postern, dnsmasq):
    dns = dnsmasq(["--mx-host=good.test,mx.good.test,10", "--address=/mx.good.test/127.0.0.9",
                   "--address=/only-a.test/127.0.0.7",
                   # 127.0.0.2 is listed in rbl.test; 127.0.0.1 is not.
                   "--address=/2.0.0.127.rbl.test/127.0.0.2"])
    p = make_postern(params={
        "dns_resolver_addresses": f"127.0.0.1:{dns.port}",
        "dns_resolver_timeout": "2s",
        "smtpd_client_restrictions": "reject_rbl_client rbl.test",
        "smtpd_sender_restrictions": "reject_unknown_sender_domain",
        "smtpd_recipient_restrictions": "reject_unknown_recipient_domain",
    })
    assert rcpt_reply(p, "a@good.test", "root@postern.test") == (250, "2.1.5 Ok")
    assert rcpt_reply(p, "a@only-a.test", "root@postern.test") == (250, "2.1.5 Ok")
    assert rcpt_reply(p, "a@nxdomain.test", "root@postern.test") == \
        (450, "4.1.8 <a@nxdomain.test>: Sender address rejected: Domain not found")
    assert rcpt_reply(p, "", "root@postern.test") == (250, "2.1.5 Ok")
    assert rcpt_reply(p, "a@good.test", "x@nowhere.test") == \
        (450, "4.1.2 <x@nowhere.test>: Recipient address rejected: Domain not found")
    assert rcpt_reply(p, "a@good.test", "x@good.test") == (250, "2.1.5 Ok")
    assert rcpt_reply(p, "a@good.test", "root@postern.test", source=OUTSIDE) == \
        (554, "5.7.1 Service unavailable; Client host [127.0.0.2] blocked using rbl.test")
    p.wait_for_log(r"NOQUEUE: reject: RCPT from unknown\[127\.0\.0\.2\]: 554 5\.7\.1 Service "
                   r"unavailable; Client host \[127\.0\.0\.2\] blocked using rbl\.test;")
    # Pipelined recipients each wait for their answers, in order.
    with p.smtp() as s:
        s.ehlo("c")
        s.mail("a@good.test")
        s.putcmd("RCPT", "TO:<x@nowhere.test>")
        s.putcmd("RCPT", "TO:<y@good.test>")
        s.putcmd("RCPT", "TO:<z@also-nowhere.test>")
        assert [s.getreply()[0] for _ in range(3)] == [450, 250, 450]


def reload_with(p, **params):
    """Changes main.cf and reloads; returns once new sessions see it."""
    banner = "$myhostname ESMTP " + uuid.uuid4().hex
    p.set_params(smtpd_banner=banner, **params)
    r = p.postern("reload")
    assert r.returncode == 0, h.describe(r)
    word = banner.split()[-1]
    h.wait_for(lambda: word in greeting(p), 20, what="the reloaded configuration")


def greeting(p):
    with socket.create_connection(("127.0.0.1", p.port), timeout=10) as c:
        return c.makefile("rb").readline().decode()


def test_client_hostname_lookup(make_postern, dnsmasq, sink):
    """smtpd_peername_lookup: the client's name is its PTR name when that
    name's addresses include the client's (forward-confirmed); it shows in
    the log and the Received header, check_client_access matches it, and
    reject_unknown_client_hostname, reject_unknown_reverse_client_hostname
    and reject_unknown_helo_hostname answer as Postfix's.

    Tests may only use loopback clients: 127.0.0.1 has its name from
    /etc/hosts; 127.0.0.77, which /etc/hosts does not name, has none (name
    servers answer NXDOMAIN in 127.in-addr.arpa), as with Postfix; the
    not-resolving-back and no-answer cases are unit tests (smtpd/src/dns.rs)."""
    other = ("127.0.0.77", 0)
    me = h.hosts_name()  # localhost, unless /etc/hosts says otherwise
    dns = dnsmasq(["--local=/client.test/", "--address=/good.client.test/127.0.0.77"])
    p = make_postern(params={
        "dns_resolver_addresses": f"127.0.0.1:{dns.port}",
        "dns_resolver_timeout": "2s",
        "smtpd_peername_lookup": "yes",
        "relay_domains": "far.test",
        "relayhost": f"[127.0.0.1]:{sink.port}",
        "smtpd_client_restrictions": "reject_unknown_reverse_client_hostname",
        "smtpd_helo_restrictions": "reject_unknown_helo_hostname",
    })

    # A confirmed name: in the log and in the Received header.
    token = "pt-" + uuid.uuid4().hex
    with p.smtp() as s:
        s.ehlo("good.client.test")
        code, text = h.smtp_transaction(s, "a@b.test", ["x@far.test"],
                                        h.crlf(f"Subject: {token}\n\n{token}\n"))
        assert code == 250, text
    p.wait_for_log(rf"connect from {re.escape(me)}\[127\.0\.0\.1\]")
    m = sink.wait_for(token)[0]
    rcv = [r for r in h.header_values(m.content, "Received") if "by postern.test" in r][0]
    assert rcv.startswith(f"from good.client.test ({me} [127.0.0.1])"), rcv

    # No PTR name: unknown, with nothing logged about it (no name is
    # invented), and reject_unknown_reverse_client_hostname refuses.
    assert rcpt_reply(p, "a@b.test", "x@far.test", helo="good.client.test",
                      source=other) == \
        (450, "4.7.25 Client host rejected: cannot find your reverse hostname, [127.0.0.77]")
    p.wait_for_log(r"connect from unknown\[127\.0\.0\.77\]")
    assert not p.log_search(r"does not resolve to address 127\.0\.0\.77"), p.log_tail()

    # A HELO name without records.
    assert rcpt_reply(p, "a@b.test", "x@far.test", helo="nosuch.client.test") == \
        (450, "4.7.1 <nosuch.client.test>: Helo command rejected: Host not found")

    # reject_unknown_client_hostname wants the confirmed name; its code is
    # unknown_client_hostname_reject_code.
    reload_with(p, smtpd_client_restrictions="reject_unknown_client_hostname",
                smtpd_helo_restrictions="", unknown_client_hostname_reject_code="550")
    assert rcpt_reply(p, "a@b.test", "x@far.test") == (250, "2.1.5 Ok")
    assert rcpt_reply(p, "a@b.test", "x@far.test", source=other) == \
        (550, "5.7.25 Client host rejected: cannot find your hostname, [127.0.0.77]")

    # check_client_access matches the confirmed name, never an unconfirmed one.
    (p.etc / "clients").write_text(f"{me} REJECT not from {me}\n")
    reload_with(p, smtpd_client_restrictions=f"check_client_access texthash:{p.etc}/clients")
    assert rcpt_reply(p, "a@b.test", "x@far.test") == \
        (554, f"5.7.1 <{me}[127.0.0.1]>: Client host rejected: not from {me}")
    assert rcpt_reply(p, "a@b.test", "x@far.test", source=other) == (250, "2.1.5 Ok")

    # Without the lookup, every client is unknown.
    reload_with(p, smtpd_peername_lookup="no")
    assert rcpt_reply(p, "a@b.test", "x@far.test") == (250, "2.1.5 Ok")
    p.wait_for_log(r"connect from unknown\[127\.0\.0\.1\]")


def test_dns_restrictions_without_delay_reject(make_postern, dnsmasq):
    """smtpd_delay_reject = no: each list's DNS restrictions decide at their
    own stage (the client's at connect, the greeting waits for DNS)."""
    dns = dnsmasq(["--mx-host=good.test,mx.good.test,10", "--address=/mx.good.test/127.0.0.9",
                   # 127.0.0.2 is listed in rbl.test, 127.0.0.3 in helo-rbl.test.
                   "--address=/2.0.0.127.rbl.test/127.0.0.2",
                   "--address=/3.0.0.127.helo-rbl.test/127.0.0.2"])
    p = make_postern(params={
        "dns_resolver_addresses": f"127.0.0.1:{dns.port}",
        "dns_resolver_timeout": "2s",
        "smtpd_delay_reject": "no",
        # The client name first (answered in the loop for loopback
        # clients), then the client restrictions' DNS, before the greeting.
        "smtpd_peername_lookup": "yes",
        "smtpd_client_restrictions": "reject_rbl_client rbl.test",
        "smtpd_helo_restrictions": "reject_rbl_client helo-rbl.test",
        "smtpd_sender_restrictions": "reject_unknown_sender_domain",
    })
    # Listed: refused instead of the greeting; every command but QUIT 503.
    listed = Raw(p.port, source=OUTSIDE)
    assert listed.reply() == ["554 5.7.1 Service unavailable; Client host [127.0.0.2] "
                              "blocked using rbl.test"]
    assert listed.cmd("EHLO client.example") == \
        ["503 5.7.0 Error: access denied for unknown[127.0.0.2]"]
    assert listed.cmd("MAIL FROM:<a@good.test>") == \
        ["503 5.7.0 Error: access denied for unknown[127.0.0.2]"]
    assert listed.cmd("QUIT") == ["221 2.0.0 Bye"]
    listed.close()
    p.wait_for_log(r"NOQUEUE: reject: CONNECT from unknown\[127\.0\.0\.2\]: 554 5\.7\.1 "
                   r"Service unavailable; Client host \[127\.0\.0\.2\] blocked using rbl\.test;")
    # Listed at the HELO stage: refused at HELO/EHLO.
    with p.smtp(source_address=("127.0.0.3", 0)) as s:
        code, text = s.ehlo("client.example")
        assert (code, text.decode()) == \
            (554, "5.7.1 Service unavailable; Client host [127.0.0.3] blocked using helo-rbl.test")
    # Not listed: the sender's domain is checked at MAIL FROM.
    with p.smtp() as s:
        assert s.ehlo("client.example")[0] == 250
        code, text = s.mail("a@nxdomain.test")
        assert (code, text.decode()) == \
            (450, "4.1.8 <a@nxdomain.test>: Sender address rejected: Domain not found")
        assert s.mail("a@good.test")[0] == 250
        assert s.rcpt("root@postern.test")[0] == 250
    p.wait_for_log(rf"NOQUEUE: reject: MAIL from {re.escape(h.hosts_name())}\[127\.0\.0\.1\]: "
                   r"450 4\.1\.8 "
                   r"<a@nxdomain\.test>: Sender address rejected: Domain not found;")


# --------------------------------------------------------------------------
# Client limits (anvil)


def test_client_connection_and_message_limits(make_postern):
    p = make_postern(params={"smtpd_client_connection_count_limit": "2",
                             "smtpd_client_connection_rate_limit": "4",
                             "smtpd_client_message_rate_limit": "2"})
    service = f"127.0.0.1:{p.port}"
    first, second = Raw(p.port, source=OUTSIDE), Raw(p.port, source=OUTSIDE)
    assert first.reply()[0].startswith("220") and second.reply()[0].startswith("220")
    third = Raw(p.port, source=OUTSIDE)
    assert third.reply() == ["421 4.7.0 postern.test Error: too many connections from 127.0.0.2"]
    assert third.f.readline() == b""
    third.close()
    p.wait_for_log(r"warning: Connection concurrency limit exceeded: 3 from "
                   rf"unknown\[127\.0\.0\.2\] for service {re.escape(service)}")
    # mynetworks (127.0.0.1) is exempt.
    locals_ = [Raw(p.port) for _ in range(5)]
    assert all(c.reply()[0].startswith("220") for c in locals_)
    for c in locals_:
        c.close()
    # Messages per time unit.
    first.cmd("EHLO c")
    assert first.cmd("MAIL FROM:<a@example.org>") == ["250 2.1.0 Ok"]
    first.cmd("RSET")
    assert first.cmd("MAIL FROM:<a@example.org>") == ["250 2.1.0 Ok"]
    first.cmd("RSET")
    assert first.cmd("MAIL FROM:<a@example.org>") == ["450 4.7.1 Error: too much mail from 127.0.0.2"]
    p.wait_for_log(r"warning: Message delivery request rate limit exceeded: 3 from "
                   r"unknown\[127\.0\.0\.2\]")
    first.close()
    second.close()
    # Connections per time unit: this is the 4th counted (the refused one
    # counts too); the 5th is refused although only one session is open.
    p.wait_for_log(r"disconnect from unknown\[127\.0\.0\.2\].*\n(?:.*\n)*.*"
                   r"disconnect from unknown\[127\.0\.0\.2\].*\n(?:.*\n)*.*"
                   r"disconnect from unknown\[127\.0\.0\.2\]")
    fourth = Raw(p.port, source=OUTSIDE)
    assert fourth.reply()[0].startswith("220")
    fifth = Raw(p.port, source=OUTSIDE)
    assert fifth.reply() == ["421 4.7.0 postern.test Error: too many connections from 127.0.0.2"]
    p.wait_for_log(r"warning: Connection rate limit exceeded: 5 from unknown\[127\.0\.0\.2\]")
    fourth.close()
    fifth.close()
