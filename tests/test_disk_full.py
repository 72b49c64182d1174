"""A full queue file system: smtpd answers 452 4.3.1 and sendmail exits 75
instead of accepting what cannot be stored; mail already queued is not
lost; once space is freed, new mail is accepted and everything goes out."""

import os
import smtplib
import uuid

import pytest

import postern_harness as h
from postern_harness import wait_for


def fill(path):
    """Writes zeros into `path` until the file system is full."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        for size in (65536, 4096, 512, 1):
            block = b"\0" * size
            try:
                while True:
                    os.write(fd, block)
            except OSError:
                pass
    finally:
        os.close(fd)


def test_full_queue_refuses_then_recovers(make_postern, sink):
    if not h.is_root():
        pytest.skip("needs root (mount)")
    p = make_postern(start=False, params={
        "relayhost": f"[127.0.0.1]:{sink.port}",
        "message_size_limit": "1000000",
    })
    p.queue.mkdir(parents=True, exist_ok=True)
    r = h.run(["mount", "-t", "tmpfs", "-o", "size=4m,mode=0755", "tmpfs", p.queue])
    if r.returncode != 0:
        pytest.skip("cannot mount a tmpfs here: " + r.stderr.strip())
    try:
        p.start()
        token = uuid.uuid4().hex
        # A message queued before the disk fills: the far side defers it.
        sink.set_rcpt("early@remote.example", "450 4.2.0 try later")
        code, text = p.send("s@postern.test", ["early@remote.example"],
                            f"Subject: early-{token}\n\nqueued before the disk filled\n")
        assert code == 250, text
        wait_for(lambda: p.queue_files("deferred"), timeout=30, what="the early message deferred")

        filler = p.queue / "filler"
        fill(filler)

        # SMTP: refused with 452 4.3.1, at MAIL FROM, at RCPT TO (where the
        # queue file is made) or at the latest at the end of DATA: never a
        # 250 for a message that was not stored.
        with p.smtp() as s:
            s.ehlo("client.example")
            code, text = s.mail("s@postern.test")
            if code == 250:
                code, text = s.rcpt("late@remote.example")
            if code == 250:
                code, text = s.data(f"Subject: late-{token}\r\n\r\n{'x' * 200000}\r\n".encode())
        assert code == 452, (code, text)
        assert b"4.3.1" in text, text

        # sendmail: exit 75 (EX_TEMPFAIL) with a one-line reason.
        r = p.sendmail(["late@remote.example"], f"Subject: sm-{token}\n\n{'y' * 200000}\n".encode())
        assert r.returncode == 75, h.describe(r)
        assert len(r.stderr.strip().splitlines()) == 1 and "sendmail: fatal:" in r.stderr, r.stderr

        # Nothing half-written is left to be delivered.
        assert not any(f"late-{token}".encode() in m.content for m in sink.messages)

        # Space comes back: the queued message goes out, new mail is taken.
        os.unlink(filler)
        sink.set_rcpt("early@remote.example", "250 2.0.0 ok")
        code, text = p.send("s@postern.test", ["late@remote.example"],
                            f"Subject: after-{token}\n\nafter the disk was freed\n")
        assert code == 250, text
        r = p.sendmail(["late@remote.example"], f"Subject: smafter-{token}\n\nafter\n".encode())
        assert r.returncode == 0, h.describe(r)
        for subject in (f"early-{token}", f"after-{token}", f"smafter-{token}"):
            wait_for(lambda s=subject: any(s.encode() in m.content for m in sink.messages),
                     timeout=60, what=f"{subject} at the sink")
        assert not any(f"late-{token}".encode() in m.content for m in sink.messages)
        assert not any(f"sm-{token}".encode() in m.content for m in sink.messages)
    finally:
        p.stop()
        h.run(["umount", "-l", p.queue])
