"""The restrictions of postconf(5) that Postern's smtpd gained for issue #27
(point 3), driven with real clients: defer_if_permit / defer_if_reject
(and the access(5) actions of those names), reject_plaintext_session,
permit_inet_interfaces, check_relay_domains, reject_multi_recipient_bounce,
reject_known_sender_login_mismatch, check_reverse_client_hostname_access,
the check_*_{a,mx,ns}_access family and permit_mx_backup (DNS answers from
dnsmasq), and smtpd_end_of_data_restrictions. The replies that do not
depend on DNS are compared with a private Postfix given the same lists.

127.0.0.1 is in mynetworks, 127.0.0.2 is not (both are loopback).
"""

import smtplib

import postern_harness as h
from dovecot import dovecot  # noqa: F401  (the fixture)
from postfix_peer import postfix_peer  # noqa: F401  (the fixture)

OUTSIDE = ("127.0.0.2", 0)


def rcpt_reply(port, sender, rcpt, helo="client.example", source=None):
    """(code, text) of RCPT TO after EHLO and MAIL FROM."""
    with smtplib.SMTP("127.0.0.1", port, timeout=30, source_address=source) as s:
        s.ehlo(helo)
        code, text = s.mail(sender)
        if code != 250:
            return code, text.decode()
        code, text = s.rcpt(rcpt)
        return code, text.decode()


def data_reply(port, sender, rcpts, body="Subject: t\r\n\r\nbody\r\n", source=None):
    """(code, text) of DATA: of the command when it is refused, else of
    the message after the final dot."""
    with smtplib.SMTP("127.0.0.1", port, timeout=30, source_address=source) as s:
        s.ehlo("client.example")
        s.mail(sender)
        for r in rcpts:
            code, text = s.rcpt(r)
            assert code == 250, (r, code, text)
        code, text = s.docmd("DATA")
        if code != 354:
            return code, text.decode()
        s.send(body.encode() + b".\r\n")
        code, text = s.getreply()
        return code, text.decode()


# --------------------------------------------------------------------------
# Without DNS: the same replies as Postfix


SCENARIO_PARAMS = {
    "smtpd_restriction_classes": "dif_class",
    "dif_class": "defer_if_permit",
    "smtpd_recipient_restrictions":
        "check_recipient_access inline:{ {dip@$mydomain=DEFER_IF_PERMIT go away}, "
        "{dir@$mydomain=DEFER_IF_REJECT 4.7.9 not now} }, "
        "check_sender_access inline:{ {dif@x.test=dif_class}, {dip@x.test=defer_if_permit} }, "
        "reject_non_fqdn_recipient, check_recipient_access inline:{ {dir@$mydomain=REJECT} }",
    "smtpd_data_restrictions": "reject_multi_recipient_bounce",
    "smtpd_end_of_data_restrictions":
        "check_sender_access inline:{ {eod@x.test=REJECT eod refused} }",
}


def scenarios(port, domain):
    """The replies of one server for the scenarios (domain: its own)."""
    return [
        # DEFER_IF_PERMIT: the recipient is permitted after it: deferred.
        rcpt_reply(port, "a@x.test", f"dip@{domain}"),
        # DEFER_IF_REJECT then a reject: the reject is deferred.
        rcpt_reply(port, "a@x.test", f"dir@{domain}"),
        # defer_if_permit (a restriction named by a table), nothing rejects.
        rcpt_reply(port, "dif@x.test", f"u@{domain}"),
        # defer_if_permit, then reject_non_fqdn_recipient rejects: a reject.
        rcpt_reply(port, "dif@x.test", "nodomain"),
        # The access(5) action (any case): its own text.
        rcpt_reply(port, "dip@x.test", f"u@{domain}"),
        rcpt_reply(port, "a@x.test", f"ok@{domain}"),
        # A bounce (null sender) for two recipients.
        data_reply(port, "", [f"a@{domain}", f"b@{domain}"]),
        # smtpd_end_of_data_restrictions, after the final dot.
        data_reply(port, "eod@x.test", [f"a@{domain}"]),
    ]


def test_defer_flags_multi_bounce_and_end_of_data_as_postfix(make_postern, postfix_peer):
    p = make_postern(params=dict(SCENARIO_PARAMS, local_recipient_maps=""))
    mine = scenarios(p.port, "postern.test")
    assert mine[0] == (450, "4.7.1 <dip@postern.test>: Recipient address rejected: go away")
    assert mine[1] == (450, "4.7.9 <dir@postern.test>: Recipient address rejected: not now")
    assert mine[2] == (450, "4.7.0 <dif@x.test>: Sender address rejected: "
                            "defer_if_permit requested")
    assert mine[3] == (504, "5.5.2 <nodomain>: Recipient address rejected: "
                            "need fully-qualified address")
    assert mine[4] == (450, "4.7.1 <dip@x.test>: Sender address rejected: Service unavailable")
    assert mine[5][0] == 250
    assert mine[6] == (550, "5.5.3 <DATA>: Data command rejected: Multi-recipient bounce")
    assert mine[7] == (554, "5.7.1 <eod@x.test>: Sender address rejected: eod refused")
    p.wait_for_log(r"\w+: reject: END-OF-MESSAGE from unknown\[127\.0\.0\.1\]: 554 5\.7\.1 "
                   r"<eod@x\.test>: Sender address rejected: eod refused; from=<eod@x\.test> "
                   r"to=<a@postern\.test>")
    far = postfix_peer(params=dict(SCENARIO_PARAMS, mydomain="far.test"))
    theirs = scenarios(far.port, "far.test")
    theirs = [(c, t.replace("far.test", "postern.test")) for c, t in theirs]
    # The accepted recipient's reply is the only one that may differ.
    assert theirs[5][0] == 250
    assert theirs[:5] + theirs[6:] == mine[:5] + mine[6:]


def test_multi_recipient_bounce_at_rcpt_and_end_of_data(make_postern):
    p = make_postern(params={
        "local_recipient_maps": "",
        "smtpd_recipient_restrictions": "reject_multi_recipient_bounce",
        "smtpd_end_of_data_restrictions": "reject_multi_recipient_bounce"})
    with p.smtp() as s:
        s.ehlo("c")
        s.mail("")
        assert s.rcpt("a@postern.test")[0] == 250
        code, text = s.rcpt("b@postern.test")
        assert (code, text) == (550, b"5.5.3 <b@postern.test>: Recipient address rejected: "
                                     b"Multi-recipient bounce")
    assert data_reply(p.port, "", ["a@postern.test"])[0] == 250
    p.stop()
    p.set_params(smtpd_recipient_restrictions="", smtpd_data_restrictions="",
                 smtpd_end_of_data_restrictions="reject_multi_recipient_bounce")
    p.start()
    assert data_reply(p.port, "", ["a@postern.test", "b@postern.test"]) == \
        (550, "5.5.3 <END-OF-MESSAGE>: End-of-data rejected: Multi-recipient bounce")
    assert data_reply(p.port, "s@x.test", ["a@postern.test", "b@postern.test"])[0] == 250


def test_plaintext_inet_interfaces_and_relay_domains(make_postern):
    p = make_postern(params={
        "inet_interfaces": "127.0.0.1",
        "relay_domains": "far.test",
        "smtpd_relay_restrictions": "",
        "smtpd_client_restrictions": "permit_inet_interfaces, reject_plaintext_session",
        "smtpd_recipient_restrictions": "check_relay_domains"})
    # 127.0.0.1 is this machine's inet_interfaces address: permitted.
    assert rcpt_reply(p.port, "a@x.test", "u@far.test")[0] == 250
    # 127.0.0.2 is not; it has no TLS.
    assert rcpt_reply(p.port, "a@x.test", "u@far.test", source=OUTSIDE) == \
        (450, "4.7.1 Session encryption is required")
    p.stop()
    p.set_params(smtpd_client_restrictions="", plaintext_reject_code="554")
    p.start()
    assert rcpt_reply(p.port, "a@x.test", "u@far.test", source=OUTSIDE) == (250, "2.1.5 Ok")
    assert rcpt_reply(p.port, "a@x.test", "root@postern.test", source=OUTSIDE)[0] == 250
    assert rcpt_reply(p.port, "a@x.test", "u@elsewhere.test", source=OUTSIDE) == \
        (554, "5.7.1 <u@elsewhere.test>: Recipient address rejected: Relay access denied")
    p.wait_for_log(r'support for restriction "check_relay_domains" will be removed')


def test_reject_known_sender_login_mismatch(make_postern, dovecot):
    d = dovecot(users={"alice@example.test": "apw", "bob@example.test": "bpw"},
                auth_failure_delay="0 secs")
    p = make_postern(
        params={"smtpd_sasl_auth_enable": "yes", "smtpd_sasl_path": str(d.auth_socket),
                "smtpd_sender_login_maps": lambda p: f"texthash:{p.etc}/logins",
                "smtpd_sender_restrictions": "reject_known_sender_login_mismatch"},
        files={"etc/logins": "alice@example.test alice@example.test\n"})

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
    # An address nobody owns is anyone's (reject_sender_login_mismatch
    # would refuse it).
    assert attempt("bob@example.test", "free@example.test") == (250, "2.1.5 Ok")
    assert attempt(None, "alice@example.test") == \
        (553, "5.7.1 <alice@example.test>: Sender address rejected: not logged in")
    assert attempt(None, "free@example.test")[0] == 554  # relay refused, not the sender


# --------------------------------------------------------------------------
# The hosts serving a name (dnsmasq as the name server)

# ns.bad.test in DNS wire form, for an NS record of nsd.test.
NS_BAD = "026e7303626164047465737400"


def test_server_access_checks(make_postern, dnsmasq):
    dns = dnsmasq([
        "--mx-host=badmx.test,mx.bad.test,10", "--address=/mx.bad.test/127.0.0.66",
        "--mx-host=goodmx.test,mx.good.test,10", "--address=/mx.good.test/127.0.0.9",
        "--address=/bada.test/127.0.0.66",
        f"--dns-rr=nsd.test,2,{NS_BAD}", "--local=/sub.nsd.test/", "--address=/ns.bad.test/127.0.0.67",
        "--mx-host=okmx.test,mx.ok.test,10", "--address=/mx.ok.test/127.0.0.68",
    ])
    p = make_postern(
        params={
            "dns_resolver_addresses": f"127.0.0.1:{dns.port}",
            "dns_resolver_timeout": "2s",
            "smtpd_helo_restrictions": lambda p: f"check_helo_a_access cidr:{p.etc}/bad.cidr",
            "smtpd_sender_restrictions": lambda p: (
                f"check_sender_mx_access cidr:{p.etc}/bad.cidr, "
                f"check_sender_ns_access texthash:{p.etc}/bad.names, "
                f"check_sender_a_access cidr:{p.etc}/bad.cidr"),
            # Through a restriction class: its DNS answers are fetched too.
            "smtpd_restriction_classes": "rcpt_mx",
            "rcpt_mx": lambda p: f"check_recipient_mx_access cidr:{p.etc}/bad.cidr",
            "smtpd_recipient_restrictions": "rcpt_mx, reject_unauth_destination",
        },
        files={"etc/bad.cidr": "127.0.0.66/32 REJECT bad host\n"
                               "127.0.0.68/32 OK\n",
               "etc/bad.names": "ns.bad.test REJECT bad name server\n"})
    assert rcpt_reply(p.port, "a@goodmx.test", "root@postern.test") == (250, "2.1.5 Ok")
    assert rcpt_reply(p.port, "a@badmx.test", "root@postern.test") == \
        (554, "5.7.1 <a@badmx.test>: Sender address rejected: bad host")
    # No MX: the domain is its own MX host (and its A is checked too).
    assert rcpt_reply(p.port, "a@bada.test", "root@postern.test") == \
        (554, "5.7.1 <a@bada.test>: Sender address rejected: bad host")
    # NS of the domain, and of its parent for a name without NS records.
    assert rcpt_reply(p.port, "a@nsd.test", "root@postern.test") == \
        (554, "5.7.1 <a@nsd.test>: Sender address rejected: bad name server")
    assert rcpt_reply(p.port, "a@sub.nsd.test", "root@postern.test") == \
        (554, "5.7.1 <a@sub.nsd.test>: Sender address rejected: bad name server")
    assert rcpt_reply(p.port, "a@goodmx.test", "root@postern.test", helo="bada.test") == \
        (554, "5.7.1 <bada.test>: Helo command rejected: bad host")
    assert rcpt_reply(p.port, "a@goodmx.test", "u@badmx.test") == \
        (554, "5.7.1 <u@badmx.test>: Recipient address rejected: bad host")
    # OK is not allowed from these tables.
    assert rcpt_reply(p.port, "a@okmx.test", "root@postern.test") == \
        (451, "4.3.5 Server configuration error")
    p.wait_for_log(r"restriction check_sender_mx_access returns OK for a@okmx\.test")


def test_reverse_client_hostname_access(make_postern):
    p = make_postern(
        params={"smtpd_client_restrictions":
                lambda p: f"check_reverse_client_hostname_access cidr:{p.etc}/c.cidr"},
        files={"etc/c.cidr": "127.0.0.2/32 REJECT go away\n127.0.0.3/32 OK\n"})
    assert rcpt_reply(p.port, "a@x.test", "root@postern.test")[0] == 250
    assert rcpt_reply(p.port, "a@x.test", "root@postern.test", source=OUTSIDE) == \
        (554, "5.7.1 <unknown>: Unverified Client host rejected: go away")
    assert rcpt_reply(p.port, "a@x.test", "root@postern.test", source=("127.0.0.3", 0)) == \
        (451, "4.3.5 Server configuration error")


def test_permit_mx_backup(make_postern, dnsmasq):
    dns = dnsmasq([
        # This machine (127.0.0.1) is backup MX of backup.test, primary of
        # primary.test, not an MX of other.test.
        "--mx-host=backup.test,mx1.far.test,10", "--mx-host=backup.test,mx2.far.test,20",
        "--address=/mx1.far.test/127.0.0.50", "--address=/mx2.far.test/127.0.0.1",
        "--mx-host=primary.test,mx2.far.test,10",
        "--mx-host=other.test,mx1.far.test,10",
        "--local=/nomx.test/",
    ])
    p = make_postern(params={
        "dns_resolver_addresses": f"127.0.0.1:{dns.port}",
        "dns_resolver_timeout": "2s",
        "inet_interfaces": "127.0.0.1",
        "smtpd_relay_restrictions": "",
        "smtpd_recipient_restrictions": "permit_mx_backup, reject_unauth_destination"})
    assert rcpt_reply(p.port, "a@x.test", "u@backup.test", source=OUTSIDE) == (250, "2.1.5 Ok")
    for d in ("primary.test", "other.test", "nomx.test"):
        assert rcpt_reply(p.port, "a@x.test", f"u@{d}", source=OUTSIDE) == \
            (554, f"5.7.1 <u@{d}>: Relay access denied"), d
    assert rcpt_reply(p.port, "a@x.test", "root@postern.test", source=OUTSIDE)[0] == 250
    p.stop()
    p.set_params(permit_mx_backup_networks="127.0.0.60/32")
    p.start()
    assert rcpt_reply(p.port, "a@x.test", "u@backup.test", source=OUTSIDE)[0] == 554
    p.stop()
    p.set_params(permit_mx_backup_networks="127.0.0.0/26")
    p.start()
    assert rcpt_reply(p.port, "a@x.test", "u@backup.test", source=OUTSIDE)[0] == 250


# --------------------------------------------------------------------------
# smtpd_discard_ehlo_keywords / smtpd_discard_ehlo_keyword_address_maps


def ehlo_and_dsn(port, source=None):
    """(EHLO keywords, MAIL with RET=, RCPT with NOTIFY=, STARTTLS)."""
    with smtplib.SMTP("127.0.0.1", port, timeout=30, source_address=source) as s:
        code, text = s.ehlo("client.example")
        words = sorted(l.split()[0].upper() for l in text.decode().splitlines()[1:])
        mail = s.docmd("MAIL", "FROM:<a@x.test> RET=HDRS")
        if mail[0] != 250:
            s.docmd("MAIL", "FROM:<a@x.test>")
        rcpt = s.docmd("RCPT", "TO:<u@x.test> NOTIFY=NEVER")
        s.docmd("RSET")
        return words, mail, rcpt, s.docmd("STARTTLS")


def test_discard_ehlo_keywords_as_postfix(make_postern, postfix_peer):
    params = {"smtpd_discard_ehlo_keywords": "silent-discard, dsn, starttls, pipelining, "
                                             "chunking"}
    p = make_postern(params=dict(params, smtpd_tls_security_level="none"))
    words, mail, rcpt, starttls = ehlo_and_dsn(p.port)
    assert "DSN" not in words and "PIPELINING" not in words and "SIZE" in words
    assert mail == (501, b"5.7.1 DSN support is disabled")
    assert rcpt == (501, b"5.7.1 DSN support is disabled")
    assert starttls == (502, b"5.5.1 Error: command not implemented")
    far = postfix_peer(params=params)
    theirs = ehlo_and_dsn(far.port)
    assert theirs[1:] == (mail, rcpt, starttls)
    # Postfix offers what Postern does not (CHUNKING: discarded here).
    assert set(words) <= set(theirs[0]), (words, theirs[0])
    assert "discarding EHLO keywords" not in p.log_text()  # silent-discard
    # The map, by client address, wins over the list.
    p.stop()
    p.set_params(smtpd_discard_ehlo_keywords="dsn",
                 smtpd_discard_ehlo_keyword_address_maps=f"texthash:{p.etc}/ehlo")
    p.write_file("etc/ehlo", "127.0.0.2 size\n")
    p.start()
    words, mail, _, _ = ehlo_and_dsn(p.port, source=OUTSIDE)
    assert "SIZE" not in words and "DSN" in words and mail[0] == 250
    words, mail, _, _ = ehlo_and_dsn(p.port)
    assert "DSN" not in words and mail[0] == 501
    p.wait_for_log(r"discarding EHLO keywords: DSN")


# --------------------------------------------------------------------------
# smtpd_command_filter


def filtered_dialogue(port):
    c = h.RawSmtp(port)
    c.reply()
    out = [c.cmd("HELLO client.example")[0].split()[0],
           c.cmd("  MAIL FROM:<a@x.test> BODY=8BITMIME8"),
           c.cmd("NOOP")]
    c.cmd("QUIT")
    c.close()
    return out


def test_command_filter_as_postfix(make_postern, postfix_peer, tmp_path):
    rules = ("/^HELLO (.*)/ EHLO $1\n"
             "/^(MAIL FROM:<[^>]*>) BODY=8BITMIME8$/ $1 BODY=8BITMIME\n")
    p = make_postern(params={"smtpd_command_filter": lambda p: f"regexp:{p.etc}/filter"},
                     files={"etc/filter": rules})
    mine = filtered_dialogue(p.port)
    assert mine == ["250-postern.test", ["250 2.1.0 Ok"], ["250 2.0.0 Ok"]]
    p.wait_for_log(r'unknown\[127\.0\.0\.1\]: replacing command "HELLO client\.example" with '
                   r'"EHLO client\.example"')
    (tmp_path / "filter").write_text(rules)
    far = postfix_peer(params={"smtpd_command_filter": f"regexp:{tmp_path}/filter"})
    theirs = filtered_dialogue(far.port)
    assert theirs[1:] == mine[1:] and theirs[0].startswith("250-")


# --------------------------------------------------------------------------
# sleep SECONDS


def test_sleep_catches_a_client_that_talks_first_and_holds_up_no_one_else(make_postern):
    import time
    p = make_postern(params={
        "smtpd_delay_reject": "no",
        "smtpd_restriction_classes": "slow",
        "slow": "sleep 2",
        "smtpd_client_restrictions": lambda p: (
            f"check_client_access cidr:{p.etc}/slow.cidr, sleep 1, reject_unauth_pipelining")},
        files={"etc/slow.cidr": "127.0.0.2/32 slow\n"})
    # A client that talks before the greeting (a zombie's shortcut).
    c = h.RawSmtp(p.port)
    c.send("EHLO client.example\r\n")
    assert c.reply() == ["503 5.5.0 <unknown[127.0.0.1]>: Client host rejected: "
                         "Improper use of SMTP command pipelining"]
    c.close()
    # One that waits gets the greeting after the pause.
    t = time.monotonic()
    with p.smtp() as s:
        assert s.ehlo("c")[0] == 250
    assert time.monotonic() - t >= 1
    # 127.0.0.2 sleeps 2 + 1 seconds; meanwhile 127.0.0.1 is served.
    slow = h.RawSmtp(p.port, source=OUTSIDE)
    t = time.monotonic()
    with p.smtp() as s:
        assert s.ehlo("c")[0] == 250
    assert time.monotonic() - t < 2.5
    assert slow.reply()[0].startswith("220 ")
    assert time.monotonic() - t >= 2.9
    slow.close()


# --------------------------------------------------------------------------
# Client certificates: permit_tls_clientcerts, permit_tls_all_clientcerts,
# check_ccert_access


def cert_fingerprints(cert_file):
    """(certificate, public key) SHA-256 fingerprints as Postfix prints
    them, made by openssl."""
    import subprocess

    def colons(hexdigest):
        return ":".join(hexdigest[i:i + 2] for i in range(0, len(hexdigest), 2)).upper()

    der = subprocess.run(["openssl", "x509", "-in", str(cert_file), "-outform", "DER"],
                         capture_output=True, check=True).stdout
    pub = subprocess.run(["openssl", "x509", "-in", str(cert_file), "-noout", "-pubkey"],
                         capture_output=True, check=True).stdout
    spki = subprocess.run(["openssl", "pkey", "-pubin", "-outform", "DER"], input=pub,
                          capture_output=True, check=True).stdout
    import hashlib
    return colons(hashlib.sha256(der).hexdigest()), colons(hashlib.sha256(spki).hexdigest())


def tls_rcpt(port, rcpt, cert=None):
    import ssl
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    if cert:
        ctx.load_cert_chain(cert.cert_file, cert.key_file)
    with smtplib.SMTP("127.0.0.1", port, timeout=30, source_address=OUTSIDE) as s:
        s.ehlo("client.example")
        s.starttls(context=ctx)
        s.ehlo("client.example")
        s.mail("a@x.test")
        code, text = s.rcpt(rcpt)
        return code, text.decode()


class ClientCA:
    """A CA and a client certificate (extendedKeyUsage clientAuth) it
    signed, made with openssl: ``ca_file``, ``cert_file``, ``key_file``."""

    def __init__(self, d):
        import subprocess
        d.mkdir()
        self.ca_file, ca_key = d / "ca.pem", d / "ca.key"
        self.cert_file, self.key_file, csr, ext = (d / "leaf.pem", d / "leaf.key",
                                                   d / "leaf.csr", d / "ext")

        def ossl(*args):
            subprocess.run(["openssl", *map(str, args)], capture_output=True, check=True)

        ossl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", ca_key,
             "-out", self.ca_file, "-days", "2", "-subj", "/CN=Client CA",
             "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign")
        ossl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", self.key_file,
             "-out", csr, "-subj", "/CN=client.example")
        ext.write_text("basicConstraints=critical,CA:FALSE\n"
                       "keyUsage=critical,digitalSignature\n"
                       "extendedKeyUsage=clientAuth\n")
        ossl("x509", "-req", "-in", csr, "-CA", self.ca_file, "-CAkey", ca_key,
             "-CAcreateserial", "-out", self.cert_file, "-days", "2", "-extfile", ext)


def test_client_certificates(make_postern, tmp_path):
    from postfix_peer import TestCA
    server = TestCA(tmp_path / "server", names=["postern.test"])
    client = ClientCA(tmp_path / "client")
    cert_fp, pkey_fp = cert_fingerprints(client.cert_file)
    p = make_postern(
        params={
            "smtpd_tls_security_level": "may",
            "smtpd_tls_cert_file": str(server.cert_file),
            "smtpd_tls_key_file": str(server.key_file),
            "smtpd_tls_loglevel": "1",
            "smtpd_tls_ask_ccert": "yes",
            "relay_clientcerts": lambda p: f"texthash:{p.etc}/relay_ccerts",
            "smtpd_relay_restrictions": "permit_tls_clientcerts, reject_unauth_destination",
        },
        files={"etc/relay_ccerts": f"{pkey_fp} client.example\n"})
    assert tls_rcpt(p.port, "u@elsewhere.test", client) == (250, "2.1.5 Ok")
    p.wait_for_log(r"Untrusted TLS connection established from unknown\[127\.0\.0\.2\]")
    assert tls_rcpt(p.port, "u@elsewhere.test") == \
        (554, "5.7.1 <u@elsewhere.test>: Relay access denied")
    # The certificate's fingerprint counts too; a certificate not listed
    # does not.
    p.stop()
    p.write_file("etc/relay_ccerts", f"{cert_fp} client.example\n")
    p.start()
    assert tls_rcpt(p.port, "u@elsewhere.test", client)[0] == 250
    assert tls_rcpt(p.port, "u@elsewhere.test", server)[0] == 554
    # permit_tls_all_clientcerts: any certificate of smtpd_tls_CAfile's CAs.
    p.stop()
    p.set_params(smtpd_tls_CAfile=str(client.ca_file),
                 smtpd_relay_restrictions="permit_tls_all_clientcerts, reject_unauth_destination")
    p.start()
    assert tls_rcpt(p.port, "u@elsewhere.test", client)[0] == 250
    p.wait_for_log(r"Trusted TLS connection established from unknown\[127\.0\.0\.2\]")
    assert tls_rcpt(p.port, "u@elsewhere.test", server)[0] == 554
    # check_ccert_access: fingerprints as access(5) keys.
    p.stop()
    p.set_params(smtpd_client_restrictions=f"check_ccert_access texthash:{p.etc}/ccert_access",
                 smtpd_relay_restrictions="permit_mynetworks, reject_unauth_destination")
    p.write_file("etc/ccert_access", f"{cert_fp} REJECT certificate withdrawn\n")
    p.start()
    assert tls_rcpt(p.port, "root@postern.test", client) == \
        (554, "5.7.1 <unknown[127.0.0.2]>: Client host rejected: certificate withdrawn")
    assert tls_rcpt(p.port, "root@postern.test", server)[0] == 250
    assert tls_rcpt(p.port, "root@postern.test")[0] == 250


def test_defer_if_permit_at_connect_without_delay_reject(make_postern):
    """With smtpd_delay_reject = no the client list runs at connect; its
    defer_if_permit still defers the recipients it would let through."""
    p = make_postern(params={"smtpd_delay_reject": "no",
                             "local_recipient_maps": "",
                             "smtpd_client_restrictions": "defer_if_permit"})
    assert rcpt_reply(p.port, "a@x.test", "u@postern.test") == \
        (450, "4.7.0 <unknown[127.0.0.1]>: Client host rejected: defer_if_permit requested")
    # A reject still wins.
    assert rcpt_reply(p.port, "a@x.test", "u@elsewhere.test", source=OUTSIDE)[0] == 554


def test_relay_domains_and_plaintext_as_postfix(make_postern, postfix_peer):
    params = {"relay_domains": "relay.test", "smtpd_relay_restrictions": "",
              "smtpd_recipient_restrictions": "check_relay_domains",
              "smtpd_sender_restrictions": "check_sender_access inline:{ p@x.test=plain_class }",
              "smtpd_restriction_classes": "plain_class",
              "plain_class": "reject_plaintext_session"}
    p = make_postern(params=params)
    far = postfix_peer(params=params)

    def replies(port):
        return [rcpt_reply(port, "a@x.test", "u@relay.test"),
                rcpt_reply(port, "a@x.test", "u@else.test"),
                rcpt_reply(port, "p@x.test", "u@relay.test")]

    mine = replies(p.port)
    assert mine == [(250, "2.1.5 Ok"),
                    (554, "5.7.1 <u@else.test>: Recipient address rejected: Relay access denied"),
                    (450, "4.7.1 Session encryption is required")]
    assert replies(far.port) == mine


def test_defer_if_permit_of_a_sender_ends_with_its_transaction(make_postern):
    p = make_postern(params={
        "smtpd_delay_reject": "no", "local_recipient_maps": "",
        "smtpd_sender_restrictions": "check_sender_access inline:{ d@x.test=defer_if_permit }"})
    with p.smtp() as s:
        s.ehlo("c")
        s.mail("d@x.test")
        assert s.rcpt("u@postern.test") == \
            (450, b"4.7.1 <d@x.test>: Sender address rejected: Service unavailable")
        s.rset()
        s.mail("a@x.test")
        assert s.rcpt("u@postern.test") == (250, b"2.1.5 Ok")
