"""Address verification (#25 point 5): the verify service, its probes and
its cache, driven through the service's own socket (private/verify) with
its protocol (common/src/verify.rs: a 4-byte little-endian length, then a
postcard-encoded VerifyRequest / VerifyReply), against an aiosmtpd next
hop that answers 250 for one recipient and 550 for another.

These tests show the service, the probe path and the cache; smtpd's
reject_unverified_* through them is tests/test_reject_unverified.py."""

import socket
import struct
import time

import postern_harness as h

STATUS = ["ok", "defer", "bounce", "todo"]


def _varint(n):
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _read_varint(buf, i):
    n = shift = 0
    while True:
        b = buf[i]
        i += 1
        n |= (b & 0x7F) << shift
        shift += 7
        if not b & 0x80:
            return n, i


def verify_query(p, address):
    """(status, reason) from the verify service for address."""
    a = address.encode()
    body = _varint(0) + _varint(len(a)) + a  # VerifyRequest::Query
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(10)
    s.connect(str(p.queue / "private" / "verify"))
    s.sendall(struct.pack("<I", len(body)) + body)
    data = b""
    while True:
        chunk = s.recv(4096)
        if not chunk:
            break
        data += chunk
    s.close()
    (n,) = struct.unpack("<I", data[:4])
    buf = data[4:4 + n]
    variant, i = _read_varint(buf, 0)
    assert variant == 0, buf  # VerifyReply::Status
    status, i = _read_varint(buf, i)
    ln, i = _read_varint(buf, i)
    return STATUS[status], buf[i:i + ln].decode()


def start(make_postern, sink, **extra):
    params = {
        "relayhost": f"[127.0.0.1]:{sink.port}",
        "address_verify_negative_refresh_time": "1h",
    }
    params.update(extra)
    return make_postern(params=params,
                        master_cf_extra=("verify unix - - n - 1 verify",))


def poll(p, address, timeout=30):
    deadline = time.time() + timeout
    while time.time() < deadline:
        st = verify_query(p, address)
        if st[0] != "todo":
            return st
        time.sleep(0.3)
    raise AssertionError(f"{address}: still in progress\n{p.log_tail()}")


def test_probe_answers_and_is_never_delivered(make_postern, sink):
    sink.set_rcpt("known@remote.test", "250 2.1.5 Ok")
    sink.set_rcpt("unknown@remote.test", "550 5.1.1 <unknown@remote.test>: User unknown")
    p = start(make_postern, sink)

    # Nothing known: in progress, and a probe goes.
    assert verify_query(p, "known@remote.test") == (
        "todo", "Address verification in progress")
    assert verify_query(p, "unknown@remote.test")[0] == "todo"

    assert poll(p, "known@remote.test") == ("ok", "250 2.1.5 Ok")
    st, reason = poll(p, "unknown@remote.test")
    assert st == "bounce"
    assert "550 5.1.1 <unknown@remote.test>: User unknown" in reason
    assert "(in reply to RCPT TO command)" in reason

    # The probes ended at RCPT TO: nothing reached the next hop's DATA.
    assert sink.messages == [], sink.messages
    rcpts = [a for a, _ in sink.rcpt_log]
    assert rcpts.count("known@remote.test") == 1
    assert rcpts.count("unknown@remote.test") == 1

    # Postfix's log lines for a probe; no bounce, nothing left queued.
    h.wait_for(lambda: p.log_search(r"to=<known@remote\.test>.*status=deliverable \(250 2\.1\.5 Ok\)"),
               what="deliverable line")
    assert p.log_search(r"to=<unknown@remote\.test>.*dsn=5\.1\.1, status=undeliverable")
    assert not p.log_search(r"status=(sent|bounced)")
    assert not p.log_search(r"sender non-delivery notification")
    h.wait_for(lambda: all(not p.queue_files(q) for q in
                           ("incoming", "active", "deferred", "bounce", "defer")),
               what="empty queue")

    # The cache answers the second time, without a new probe.
    assert verify_query(p, "known@remote.test")[0] == "ok"
    assert verify_query(p, "unknown@remote.test")[0] == "bounce"
    time.sleep(1.5)
    assert len(sink.rcpt_log) == 2, sink.rcpt_log


def test_cache_survives_a_restart(make_postern, sink):
    sink.set_rcpt("known@remote.test", "250 2.1.5 Ok")
    p = start(make_postern, sink)
    verify_query(p, "known@remote.test")
    assert poll(p, "known@remote.test")[0] == "ok"
    assert (p.data / "verify_cache").read_text().startswith("known@remote.test\tok\t")
    p.stop()
    p.start()
    assert verify_query(p, "known@remote.test") == ("ok", "250 2.1.5 Ok")
    assert len(sink.rcpt_log) == 1
