"""notify_classes (issue 17, point 3): only Postern's own resource and
software problems page the postmaster. A next hop that answers ``451
4.3.0 try again later`` is that server's trouble: the message is retried
and delivered, and error_notice_recipient hears nothing, as with
Postfix, whose delivery agents never report ``resource`` or
``software``.

Real peers only: an aiosmtpd receiver that refuses the message twice at
the end of DATA, then takes it.
"""

import re
import uuid

import postern_harness as h
from postern_harness import wait_for
from test_pipe import VMAIL, new_token, pipe_postern, queue_id, script, scratch, vmail  # noqa: F401

SENDER = "sender@example.org"


class RefusingSink(h.Sink):
    """A Sink that answers ``refusal`` at the end of DATA to the first
    ``times`` copies of a message for ``rcpt`` containing ``token`` (other
    messages, notices among them, are taken)."""

    def __init__(self, rcpt, token, refusal, times):
        super().__init__()
        self.rcpt = rcpt
        self.token = token.encode()
        self.refusal = refusal
        self.left = times

    async def handle_DATA(self, server, session, envelope):
        content = envelope.original_content or b""
        mine = self.rcpt in envelope.rcpt_tos and self.token in content
        if mine and self.left > 0:
            self.left -= 1
            with self._lock:
                self._rejected_data.append(h.SinkMessage(
                    envelope.mail_from, envelope.rcpt_tos, bytes(content),
                    session.peer, envelope.mail_options))
            return self.refusal
        return await super().handle_DATA(server, session, envelope)


def queue_empty(p):
    return not any(p.queue_files(q) for q in ("incoming", "active", "deferred"))


def test_remote_4_3_0_is_retried_without_a_postmaster_notice(make_postern):
    token = "pt-" + uuid.uuid4().hex
    sink = RefusingSink("rcpt@remote.test", token, "451 4.3.0 try again later", 2).start()
    try:
        # notify_classes is left at its default, "resource, software";
        # the postmaster's address is at the sink too, where any notice
        # about the message would arrive (it carries the message's
        # headers, token included).
        p = make_postern(params={
            "relayhost": f"[127.0.0.1]:{sink.port}",
            "error_notice_recipient": "pm@remote.test",
            "minimal_backoff_time": "1s",
            "maximal_backoff_time": "2s",
        })
        data = (f"From: {SENDER}\nTo: rcpt@remote.test\nSubject: {token}\n"
                f"Message-ID: <{token}@example.org>\n\nThe body.\n")
        code, resp = p.send(SENDER, ["rcpt@remote.test"], data)
        assert code == 250, resp
        qid = re.search(r"queued as ([0-9A-F]+)", resp).group(1)

        # Refused twice with 4.3.0, then delivered.
        delivered = wait_for(
            lambda: [m for m in sink.find(token) if m.rcpt_tos == ["rcpt@remote.test"]],
            60, what="the message delivered")
        assert len(delivered) == 1
        assert len(sink.rejected_data) == 2
        deferrals = p.log_findall(
            rf"{qid}: to=<rcpt@remote\.test>.*dsn=4\.3\.0, status=deferred "
            r"\(host 127\.0\.0\.1\[127\.0\.0\.1\] said: 451 4\.3\.0 try again later")
        assert len(deferrals) == 2, p.log_tail()
        p.wait_for_log(rf"{qid}: to=<rcpt@remote\.test>.*status=sent")
        wait_for(lambda: queue_empty(p), 30, what="an empty queue")

        # No postmaster notice, neither queued nor delivered.
        notices = [m for m in sink.find(token) if "pm@remote.test" in m.rcpt_tos]
        assert notices == [], [m.content[:300] for m in notices]
        assert not p.log_search(rf"{qid}: postmaster .*notification")
        assert not p.log_search(r"from=<double-bounce@"), p.log_tail()
        # Only the message itself reached the sink (no notice to the
        # sender either: the message was only delayed).
        assert [m.rcpt_tos for m in sink.messages] == [["rcpt@remote.test"]]
    finally:
        sink.stop()


def test_own_software_problem_still_pages_the_postmaster(make_postern, sink):
    """The other side of the rule: a problem of Postern's own (a transport
    missing from master.cf) is still reported to error_notice_recipient."""
    p = make_postern(params={
        "relayhost": f"[127.0.0.1]:{sink.port}",
        "transport_maps": "inline:{nowhere.test=nosuch:}",
        "error_notice_recipient": "pm@remote.test",
    })
    token = "pt-" + uuid.uuid4().hex
    data = f"From: {SENDER}\nTo: x@nowhere.test\nSubject: {token}\n\nThe body.\n"
    code, resp = p.send(SENDER, ["x@nowhere.test"], data)
    assert code == 250, resp
    pm = wait_for(lambda: [m for m in sink.find(token) if "pm@remote.test" in m.rcpt_tos],
                  30, what="the software notice")
    assert b"Postmaster Warning: Mail Not Delivered (software problem)" in pm[0].content


def test_command_exit_statuses_are_not_software_problems(make_postern, sink, local_users,
                                                          scratch):  # noqa: F811
    """A pipe(8) command or mailbox_command that exits EX_TEMPFAIL (75)
    defers that message, and one that exits EX_SOFTWARE (70) bounces it:
    the message's delivery problems, reported to its sender as Postfix's
    pipe and local report them, and never a "software problem" notice to
    error_notice_recipient (notify_classes keeps its default, resource
    and software)."""
    once = ('m={dir}/$(basename "$0").tried\n'
            'if [ -e "$m" ]; then cat >/dev/null; exit 0; fi\n'
            ': > "$m"; echo "busy, try later"; exit 75\n').format(dir=scratch)
    tempfail = script(scratch, "tempfail-once", once)
    mboxcmd = script(scratch, "mboxcmd-once", once)
    software = script(scratch, "software", 'echo "internal trouble"\nexit 70\n')
    p = pipe_postern(make_postern, [
        "tf unix - n n - - pipe",
        f"  user={VMAIL} argv={tempfail}",
        "sw unix - n n - - pipe",
        f"  user={VMAIL} argv={software}",
    ], {"tempfail.test": "tf:", "software.test": "sw:"}, params={
        "relayhost": f"[127.0.0.1]:{sink.port}",
        "mailbox_command": str(mboxcmd),
        "error_notice_recipient": "pm@remote.test",
        "minimal_backoff_time": "1s",
        "maximal_backoff_time": "2s",
        "queue_run_delay": "1s",
    })
    token = new_token()
    qids = {}
    for rcpt in ("x@tempfail.test", "y@software.test", f"ptalice@{h.MYHOSTNAME}"):
        code, text = p.send(SENDER, [rcpt],
                            f"From: {SENDER}\nTo: {rcpt}\nSubject: {token}\n\nbody {token}\n")
        assert code == 250, text
        qids[rcpt] = queue_id(text)
    p.wait_for_log(rf"{qids['x@tempfail.test']}: to=<x@tempfail\.test>.*relay=tf.*dsn=4\.3\.0, "
                   r"status=deferred \(temporary failure\. Command output: busy")
    p.wait_for_log(rf"{qids['x@tempfail.test']}: to=<x@tempfail\.test>.*relay=tf.*status=sent",
                   timeout=60)
    p.wait_for_log(rf"{qids['y@software.test']}: to=<y@software\.test>.*relay=sw.*dsn=5\.3\.0, "
                   r"status=bounced \(internal software error\. Command output: internal trouble")
    alice = rf"{qids[f'ptalice@{h.MYHOSTNAME}']}: to=<ptalice@{re.escape(h.MYHOSTNAME)}>"
    p.wait_for_log(alice + r".*dsn=4\.3\.0, status=deferred \(temporary failure")
    p.wait_for_log(alice + r".*status=sent", timeout=60)
    wait_for(lambda: queue_empty(p), 60, what="an empty queue")

    # The sender hears of the bounce, with the command's diagnostic.
    bounce = wait_for(lambda: [m for m in sink.messages if SENDER in m.rcpt_tos], 30,
                      what="the bounce notice to the sender")
    assert b"Diagnostic-Code: x-unix; internal software error" in bounce[0].content, \
        bounce[0].content[:2000]
    # The postmaster hears nothing.
    notices = [m for m in sink.messages if "pm@remote.test" in m.rcpt_tos]
    assert notices == [], [m.content[:300] for m in notices]
    assert not p.log_search(r"postmaster .*notification"), p.log_tail()


def test_command_that_cannot_start_defers_without_a_notice(make_postern, sink, scratch):  # noqa: F811
    """A pipe(8) command that does not exist: as with Postfix 3.7 (whose
    child logs ``execvp ...: No such file or directory`` and dies with a
    temporary failure), the message is deferred with dsn 4.3.0 and waits
    for the administrator to fix the command; it is the message's
    deferral, retried without a "software problem" notice to
    error_notice_recipient at each try."""
    missing = f"{scratch}/no-such-command"
    p = pipe_postern(make_postern, [
        "nocmd unix - n n - - pipe",
        f"  user={VMAIL} argv={missing} ${{recipient}}",
    ], {"nocmd.test": "nocmd:"}, params={
        "relayhost": f"[127.0.0.1]:{sink.port}",
        "error_notice_recipient": "pm@remote.test",
        "minimal_backoff_time": "1s",
        "maximal_backoff_time": "2s",
        "queue_run_delay": "1s",
    })
    token = new_token()
    code, text = p.send(SENDER, ["x@nocmd.test"],
                        f"From: {SENDER}\nTo: x@nocmd.test\nSubject: {token}\n\nbody\n")
    assert code == 250, text
    qid = queue_id(text)
    line = (rf"{qid}: to=<x@nocmd\.test>.*relay=nocmd.*dsn=4\.3\.0, status=deferred "
            rf"\(temporary failure\. Command output: execvp {re.escape(missing)}: "
            r"No such file or directory")
    p.wait_for_log(line)
    # Retried (two more tries at least), still nobody paged.
    wait_for(lambda: len(p.log_findall(line)) >= 3, 60, what="three tries")
    notices = [m for m in sink.messages if "pm@remote.test" in m.rcpt_tos]
    assert notices == [], [m.content[:300] for m in notices]
    assert not p.log_search(r"postmaster .*notification"), p.log_tail()
    assert p.queue_files("deferred") or p.queue_files("active"), "the message must wait"
