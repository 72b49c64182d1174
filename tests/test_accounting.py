"""The accounting log (issue #19 point 5): `accounting_log_file`,
`accounting_log_format = json | csv`, one record per event, written by
the daemon that saw it with O_APPEND in one write per line.

- failures of each kind (550 5.1.1, 552 5.2.2, connection refused, a
  domain that does not exist, expiry, a 4xx) land in the log with the
  class the shipped rules give (checked with ``postmap -q`` against
  conf/etc/bounce_classes too), and JSON and CSV parse with Python's
  json and csv modules, with KumoMTA's and PowerMTA's field names;
- 20 SMTP sessions at once never tear or mix a line;
- `postsuper -d` writes AdminBounce records;
- pflogsumm and fail2ban's postfix filter count the same on Postern's
  log with the accounting log on as off;
- `postern reload` after the file was renamed away: new records go to a
  new file.

Names resolve through dnsmasq: far.test's MX is 127.0.0.1 (an aiosmtpd
sink, which answers each recipient as told); dead.test's MX is
127.0.0.1 on a port nobody listens on; nosuch.test does not exist.
"""

import csv
import io
import json
import re
import smtplib
import threading
import time
import uuid
from pathlib import Path

import pytest

import postern_harness as h
from dovecot import dovecot  # noqa: F401  (the fixture)

REPO = Path(__file__).resolve().parent.parent
SHIPPED = REPO / "conf" / "etc" / "bounce_classes"
SENDER = "owner@sender.test"

JSON_FIELDS = ["type", "id", "sender", "recipient", "queue", "site", "size", "response",
               "peer_address", "timestamp", "created", "num_attempts",
               "bounce_classification", "egress_pool", "egress_source", "tls_cipher",
               "tls_protocol_version"]
CSV_FIELDS = ["type", "timeLogged", "timeQueued", "orig", "rcpt", "orcpt", "dsnAction",
              "dsnStatus", "dsnDiag", "dsnMta", "bounceCat", "srcMta", "dlvSourceIp",
              "dlvDestinationIp", "dlvEsmtpAvailable", "dlvSize", "vmta", "jobId", "envId"]


def token():
    return "pt-acct-" + uuid.uuid4().hex


@pytest.fixture
def far_dns(dnsmasq):
    return dnsmasq(["--local=/test/",
                    "--mx-host=far.test,mx.far.test,10",
                    "--host-record=mx.far.test,127.0.0.1",
                    "--mx-host=dead.test,mx.dead.test,10",
                    "--host-record=mx.dead.test,127.0.0.1"])
    # nosuch.test: NXDOMAIN


def acct_path(p):
    return p.dir / "acct.log"


def read_json(path):
    text = path.read_text()
    assert text.endswith("\n") or not text, text[-200:]
    return [json.loads(line) for line in text.splitlines()]


def read_csv(path):
    text = path.read_text()
    rows = list(csv.reader(io.StringIO(text)))
    assert rows and rows[0] == CSV_FIELDS, rows[:1]
    for r in rows[1:]:
        assert len(r) == len(CSV_FIELDS), r
    return [dict(zip(CSV_FIELDS, r)) for r in rows[1:]]


def shipped_class(p, line):
    r = h.run_tool(p, "postmap", "-q", line, f"regexp:{SHIPPED}")
    assert r.returncode == 0, h.describe(r)
    return r.stdout.strip()


def reply_line_json(rec):
    resp = rec["response"]
    e = resp["enhanced_code"]
    return f"{resp['code']} {e['class']}.{e['subject']}.{e['detail']} {resp['content']}"


# The scenario: recipient -> (kind of failure, the record types it must
# get, the class of its failure record).
FAR = {
    "ok@far.test": ("delivered", ["Delivery"], None),
    "bad@far.test": ("550 5.1.1", ["Bounce"], "bad-mailbox"),
    "full@far.test": ("552 5.2.2", ["Bounce"], "quota-issues"),
    "slow@far.test": ("4xx", ["TransientFailure", "Expiration"], "policy-related"),
}
OTHERS = {
    "u@dead.test": ("connection refused", ["TransientFailure", "Expiration"], "bad-connection"),
    "u@nosuch.test": ("dns failure", ["Bounce"], "dns-failure"),
}
CSV_TYPE = {"Reception": "r", "Delivery": "d", "TransientFailure": "t", "Bounce": "b",
            "Expiration": "b", "AdminBounce": "b"}


def scenario(make_postern, far_dns, sink, fmt, classifier):
    sink.set_rcpt("bad@far.test", "550 5.1.1 <bad@far.test>: Recipient address rejected: "
                  "User unknown in local recipient table")
    sink.set_rcpt("full@far.test", "552 5.2.2 <full@far.test>: mailbox full")
    sink.set_rcpt("slow@far.test", "451 4.7.1 rate limited")
    dead = h.free_port()
    table = ", ".join([f"far.test=smtp:far.test:{sink.port}",
                       f"dead.test=smtp:dead.test:{dead}",
                       f"nosuch.test=smtp:nosuch.test:{sink.port}",
                       f"sender.test=smtp:[127.0.0.1]:{sink.port}"])
    params = {
        "dns_resolver_addresses": f"127.0.0.1:{far_dns.port}",
        "transport_maps": f"inline:{{ {table} }}",
        "accounting_log_file": lambda p: str(acct_path(p)),
        "accounting_log_format": fmt,
        # Expiry within the test: deferred recipients are retried every
        # 2-4 s and returned after 12 s.
        "maximal_queue_lifetime": "12s",
        "bounce_queue_lifetime": "12s",
    }
    if classifier:
        params["bounce_classifier_maps"] = f"regexp:{SHIPPED}"
    p = make_postern(params)
    tok = token()
    # One message per recipient: each record is then easy to tell apart.
    ids = {}
    for rcpt in list(FAR) + list(OTHERS):
        code, text = p.send(SENDER, [rcpt], h.crlf(f"Subject: {tok} {rcpt}\n\nx\n"))
        assert code == 250, text
        ids[rcpt] = re.search(r"queued as (\S+)", text).group(1)
    return p, ids


def records_by_rcpt(recs, key_rcpt, key_type):
    out = {}
    for r in recs:
        out.setdefault(r[key_rcpt], []).append(r[key_type])
    return out


@pytest.mark.parametrize("fmt,classifier", [("json", True), ("csv", False)])
def test_failures_of_each_kind_land_with_their_class(make_postern, far_dns, sink, fmt,
                                                     classifier):
    """json with bounce_classifier_maps = regexp:conf/etc/bounce_classes;
    csv with the default (empty: the same rules, built in)."""
    p, ids = scenario(make_postern, far_dns, sink, fmt, classifier)
    path = acct_path(p)
    everyone = {**FAR, **OTHERS}
    final = {"Delivery", "Bounce", "Expiration"}

    # postqueue -j while the deferred ones wait: their class is there.
    def deferred():
        got = {}
        r = h.run_tool(p, "postqueue", "-j")
        for line in r.stdout.splitlines():
            for rc in json.loads(line)["recipients"]:
                if "bounce_class" in rc:
                    got[rc["address"]] = rc["bounce_class"]
        return got if len(got) == 2 else None
    assert h.wait_for(deferred, 20, what="two deferred recipients in postqueue -j") == {
        "slow@far.test": "policy-related", "u@dead.test": "bad-connection"}

    if fmt == "json":
        def done():
            recs = read_json(path) if path.exists() else []
            types = records_by_rcpt(recs, "recipient", "type")
            return recs if all(final & set(types.get(r, ())) for r in everyone) else None
        recs = h.wait_for(done, 60, what="a final record for every recipient")
        recs = [r for r in recs if r["recipient"] in everyone]  # not the notices
        for rec in recs:
            missing = [f for f in JSON_FIELDS if f not in rec]
            assert not missing, (missing, rec)
            assert isinstance(rec["timestamp"], int) and rec["timestamp"] >= rec["created"] > 0
            assert rec["sender"] == SENDER and rec["size"] > 0
        for rcpt, (what, types, cls) in everyone.items():
            mine = [r for r in recs if r["recipient"] == rcpt]
            assert [r["type"] for r in mine][0] == "Reception", (rcpt, mine)
            assert all(r["id"] == ids[rcpt] for r in mine), (rcpt, mine)
            assert mine[0]["site"] == "" and mine[0]["queue"] == rcpt.split("@")[1]
            got_types = [r["type"] for r in mine[1:]]
            # A deferred recipient gets a TransientFailure per attempt.
            assert [t for i, t in enumerate(got_types)
                    if i == 0 or t != got_types[i - 1]] == types, (rcpt, got_types)
            for r in mine[1:]:
                assert r["site"] == rcpt.split("@")[1], r
                if r["type"] != "Expiration":  # qmgr's: no transport at hand
                    assert r["egress_pool"] == "smtp", r
                assert r["response"]["code"] in (250, 451, 452, 550, 552), r
                if r["type"] == "Delivery":
                    assert r["response"]["code"] == 250
                    assert r["peer_address"] == {"name": "mx.far.test", "addr": "127.0.0.1"}
                    assert r["num_attempts"] == 1
                    continue
                want = "message-expired" if r["type"] == "Expiration" else cls
                assert r["bounce_classification"] == want, (rcpt, r)
                # What the shipped rules say of the reply in the record.
                line = reply_line_json(r)
                if r["type"] == "Expiration":
                    line = f"{r['response']['code']} 4.4.7 Message expired: " + \
                        r["response"]["content"]
                assert shipped_class(p, line) == want, (line, r)
                assert r["num_attempts"] >= 1
        bad = next(r for r in recs if r["recipient"] == "bad@far.test" and r["type"] == "Bounce")
        assert bad["response"] == {
            "code": 550, "enhanced_code": {"class": 5, "subject": 1, "detail": 1},
            "content": "<bad@far.test>: Recipient address rejected: User unknown in local "
                       "recipient table", "command": "RCPT TO"}, bad
        assert bad["peer_address"] == {"name": "mx.far.test", "addr": "127.0.0.1"}
        dns = next(r for r in recs if r["recipient"] == "u@nosuch.test" and r["type"] == "Bounce")
        assert dns["response"]["code"] == 550 and dns["response"]["command"] is None
        assert "Host or domain name not found" in dns["response"]["content"]
        refused = next(r for r in recs if r["recipient"] == "u@dead.test"
                       and r["type"] == "Expiration")
        # num_attempts counts the attempts of the message's last round
        # (the defer log is per round): at least the one that failed.
        assert refused["num_attempts"] >= 1, refused
    else:
        def done():
            recs = read_csv(path) if path.exists() else []
            types = records_by_rcpt(recs, "rcpt", "type")
            return recs if all("d" in types.get(r, ()) or "b" in types.get(r, ())
                               for r in everyone) else None
        recs = h.wait_for(done, 60, what="a final record for every recipient")
        for rcpt, (what, types, cls) in everyone.items():
            mine = [r for r in recs if r["rcpt"] == rcpt]
            assert mine[0]["type"] == "r", mine
            got = [r["type"] for r in mine[1:]]
            want = [CSV_TYPE[t] for t in types]
            assert [t for i, t in enumerate(got) if i == 0 or t != got[i - 1]] == want, \
                (rcpt, got)
            for r in mine:
                assert r["orig"] == SENDER and r["jobId"] in ("", rcpt.split("@")[1]), r
                assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\+0000", r["timeLogged"]), r
                assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\+0000", r["timeQueued"]), r
            for r in mine[1:]:
                assert r["jobId"] == rcpt.split("@")[1], r
                if r["type"] == "d":
                    assert r["vmta"] == "smtp", r
                    assert r["dsnAction"] == "relayed" and r["dsnStatus"] == "2.0.0", r
                    assert r["dlvDestinationIp"] == "127.0.0.1", r
                    continue
                expired = r["type"] == "b" and cls in ("policy-related", "bad-connection")
                want = "message-expired" if expired else cls
                assert r["bounceCat"] == want, (rcpt, r)
                assert r["dsnAction"] == ("delayed" if r["type"] == "t" else "failed"), r
        bad = next(r for r in recs if r["rcpt"] == "bad@far.test" and r["type"] == "b")
        assert bad["dsnStatus"] == "5.1.1"
        assert bad["dsnDiag"] == ("smtp;550 5.1.1 <bad@far.test>: Recipient address rejected: "
                                  "User unknown in local recipient table"), bad
        assert bad["dsnMta"] == "mx.far.test (127.0.0.1)", bad
        assert bad["dlvSize"].isdigit(), bad


def test_twenty_concurrent_sessions_never_tear_a_line(make_postern, sink):
    """20 SMTP sessions at once, each sending messages with 40 long
    recipient addresses: cleanup (64 threads), smtp (32) and qmgr append
    at once; every line must parse whole and every record be there once."""
    sink.set_data("250 2.0.0 Ok: queued " + "y" * 900)
    table = f"far.test=smtp:[127.0.0.1]:{sink.port}"
    p = make_postern({"transport_maps": f"inline:{{ {table} }}",
                      "accounting_log_file": lambda p: str(acct_path(p)),
                      "accounting_log_format": "json",
                      "smtpd_recipient_limit": "1000"})
    tok = token()
    n_sessions, n_msgs, n_rcpts = 20, 3, 40
    errors = []

    def session(i):
        try:
            with smtplib.SMTP("127.0.0.1", p.port, timeout=60) as s:
                for m in range(n_msgs):
                    rcpts = [f"{'r' * 40}-{i}-{m}-{k}@far.test" for k in range(n_rcpts)]
                    refused = s.sendmail(SENDER, rcpts,
                                         h.crlf(f"Subject: {tok} {i} {m}\n\n{'z' * 2000}\n"))
                    assert not refused, refused
        except Exception as e:  # reported below
            errors.append(repr(e))

    threads = [threading.Thread(target=session, args=(i,)) for i in range(n_sessions)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    want = n_sessions * n_msgs * n_rcpts
    path = acct_path(p)

    def complete():
        lines = path.read_text().splitlines()
        return lines if len(lines) >= 2 * want else None
    lines = h.wait_for(complete, 120, what=f"{2 * want} records")
    recs = [json.loads(line) for line in lines]  # a torn or mixed line fails here
    assert len(recs) == 2 * want
    keys = [(r["type"], r["recipient"]) for r in recs]
    assert len(set(keys)) == len(keys), "a record written twice"
    assert sum(r["type"] == "Reception" for r in recs) == want
    assert sum(r["type"] == "Delivery" for r in recs) == want
    assert all(len(r["response"]["content"]) > 900 for r in recs if r["type"] == "Delivery")


def test_postsuper_d_writes_admin_bounce_records(make_postern, sink):
    dead = h.free_port()
    p = make_postern({"transport_maps": f"inline:{{ far.test=smtp:[127.0.0.1]:{dead} }}",
                      "accounting_log_file": lambda p: str(acct_path(p)),
                      "accounting_log_format": "csv",
                      "minimal_backoff_time": "300s", "maximal_backoff_time": "300s",
                      "queue_run_delay": "300s"})
    code, text = p.send(SENDER, ["a@far.test", "b@far.test"], h.crlf("Subject: x\n\nx\n"))
    assert code == 250, text
    qid = re.search(r"queued as (\S+)", text).group(1)
    h.wait_for(lambda: p.queue_files("deferred"), 30, what="the message deferred")
    r = h.run_tool(p, "postsuper", "-d", qid)
    assert r.returncode == 0, h.describe(r)
    recs = read_csv(acct_path(p))
    admin = [x for x in recs if x["type"] == "b" and "postsuper -d" in x["dsnDiag"]]
    assert sorted(x["rcpt"] for x in admin) == ["a@far.test", "b@far.test"], recs
    assert [x["type"] for x in recs if x["rcpt"] == "a@far.test"] == ["r", "t", "b"], recs


# --------------------------------------------------------------------------
# Log tools: the same counts with the accounting log on as off.

def test_log_tools_count_the_same_with_the_accounting_log_on(make_postern, dovecot,  # noqa: F811
                                                             local_users):
    import test_log_compat as lc
    lc.tools()
    dc = dovecot(users={lc.USER: lc.PASSWORD}, auth_failure_delay="0 secs")
    results = []
    for on in (False, True):
        params = {**lc.common_params(h.free_port()), "smtpd_sasl_path": str(dc.auth_socket)}
        if on:
            params["accounting_log_file"] = lambda p: str(acct_path(p))
        p = make_postern(params=params, start=False)
        p.write_file("etc/aliases", lc.ALIASES)
        p.newaliases()
        p.start()
        tok = uuid.uuid4().hex
        lc.traffic(p.port, tok, p.log_text)
        lc.settle(p.log_text, tok)
        report = lc.pflogsumm(p.maillog)
        # The talk-before-greeting part of the traffic retries until the
        # server saw the talk (a race on loopback): its extra attempts are
        # "lost connection after CONNECT" lines, left out of the comparison.
        f2b = {mode: sorted(x for x in lc.fail2ban(p.maillog, mode)
                            if "lost connection after CONNECT" not in x) for mode in lc.MODES}
        results.append((lc.grand_totals(report), f2b,
                        lc.section(report, "Recipients by message count"),
                        lc.section(report, "Senders by message count"), p))
        if on:
            recs = read_json(acct_path(p))
            assert {r["type"] for r in recs} >= {"Reception", "Delivery", "TransientFailure",
                                                 "Bounce"}, recs
        p.stop()
    (t0, f0, r0, s0, p0), (t1, f1, r1, s1, p1) = results
    assert t0 == t1, (t0, t1)
    assert t0["delivered"] and t0["bounced"] and t0["deferred"] and t0["rejected"], t0
    assert f0 == f1
    assert any(f0.values())
    assert (r0, s0) == (r1, s1)
    # The bounce_class lines are for people: the tools see nothing in them.
    text = p1.maillog.read_text()
    assert re.search(r"\]: [0-9A-F]+: bounce_class=\S+, recipient=<", text), text
    stripped = p1.dir / "maillog.noclass"
    stripped.write_text("".join(line for line in text.splitlines(True)
                                if ": bounce_class=" not in line))
    assert lc.grand_totals(lc.pflogsumm(stripped)) == t1
    for mode in lc.MODES:
        assert sorted(lc.fail2ban(stripped, mode)) == sorted(lc.fail2ban(p1.maillog, mode)), mode


# --------------------------------------------------------------------------
# Reload: logrotate renames the file, `postern reload`, new records go to a
# new file.

def test_reload_reopens_the_file(make_postern, sink):
    table = f"far.test=smtp:[127.0.0.1]:{sink.port}"
    p = make_postern({"transport_maps": f"inline:{{ {table} }}",
                      "accounting_log_file": lambda p: str(acct_path(p)),
                      "accounting_log_format": "csv"})
    path = acct_path(p)
    assert path.exists(), "master creates the file at start"
    first, second = token(), token()
    code, text = p.send(SENDER, ["one@far.test"], h.crlf(f"Subject: {first}\n\nx\n"))
    assert code == 250, text
    sink.wait_for(first)
    h.wait_for(lambda: any(r["type"] == "d" for r in read_csv(path)), 20,
               what="the first delivery record")
    rotated = p.dir / "acct.log.1"
    path.rename(rotated)
    r = p.postern("reload")
    assert r.returncode == 0, h.describe(r)
    # master makes the new file at reload, owned by mail_owner.
    h.wait_for(path.exists, 10, what="a new accounting file after reload")
    if h.is_root():
        import pwd
        assert path.stat().st_uid == pwd.getpwnam(p.mail_owner).pw_uid
        assert path.stat().st_mode & 0o777 == 0o640
    code, text = p.send(SENDER, ["two@far.test"], h.crlf(f"Subject: {second}\n\nx\n"))
    assert code == 250, text
    sink.wait_for(second)
    new = h.wait_for(lambda: (lambda rs: rs if any(x["type"] == "d" for x in rs) else None)(
        read_csv(path)), 20, what="the second delivery in the new file")
    assert {x["rcpt"] for x in new} == {"two@far.test"}, new
    old = read_csv(rotated)
    assert {x["rcpt"] for x in old} == {"one@far.test"}, old


def test_a_refused_local_submission_is_a_bounce_record(make_postern, sink):
    """sendmail's message refused by header_checks becomes a bounce made by
    cleanup (as Postfix): its Bounce record comes from cleanup, with the
    class of the refusal (5.7.1: policy-related)."""
    p = make_postern({"transport_maps": f"inline:{{ sender.test=smtp:[127.0.0.1]:{sink.port} }}",
                      "header_checks": lambda p: f"regexp:{p.etc}/header_checks",
                      "accounting_log_file": lambda p: str(acct_path(p))},
                     files={"etc/header_checks": "/^Subject: refuse-me/ REJECT no thanks\n"})
    r = p.sendmail(["-f", SENDER, "victim@far.test"],
                   b"Subject: refuse-me\n\nx\n")
    assert r.returncode == 0, h.describe(r)

    def bounced():
        recs = read_json(acct_path(p)) if acct_path(p).exists() else []
        return [x for x in recs if x["type"] == "Bounce" and x["recipient"] == "victim@far.test"]
    (rec,) = h.wait_for(bounced, 30, what="the Bounce record")
    assert rec["bounce_classification"] == "policy-related", rec
    assert rec["egress_pool"] == "cleanup" and rec["sender"] == SENDER, rec
    assert rec["response"]["enhanced_code"] == {"class": 5, "subject": 7, "detail": 1}, rec
    assert "no thanks" in rec["response"]["content"], rec


def test_postern_check_refuses_an_unknown_format(make_postern):
    p = make_postern({"accounting_log_file": lambda p: str(acct_path(p)),
                      "accounting_log_format": "xml"}, start=False)
    r = p.postern("check")
    assert r.returncode == 1, h.describe(r)
    assert 'accounting_log_format: unknown format "xml"' in r.stderr, h.describe(r)
