"""The load and the far side: Postfix's smtp-source and smtp-sink, a
latency-sampling SMTP client, idle sessions, and the quiet-machine wait."""

import asyncio
import os
import re
import signal
import socket
import subprocess
import threading
import time

from .mta import H


# --------------------------------------------------------------------------
# smtp-sink, counting


class Sink:
    """``smtp-sink -c -u nobody 127.0.0.1:PORT 1000``; its running counter
    (``mesg=N`` after each message) goes to a file we read back."""

    def __init__(self, base, name, dump=False):
        self.port = H.free_port()
        self.out_path = os.path.join(base, f"sink-{name}-{self.port}.out")
        self._out = open(self.out_path, "wb")
        # dump: every message appended to one file (``-D``), for checks of
        # the content (bench/run --dkim counts the signatures).
        self.dump_path = None
        extra = []
        if dump:
            d = os.path.join(base, f"sink-{name}-{self.port}-dump")
            os.mkdir(d)
            os.chmod(d, 0o777)
            self.dump_path = os.path.join(d, "messages")
            extra = ["-D", self.dump_path]
        self.proc = subprocess.Popen(
            ["smtp-sink", "-c", "-u", "nobody", *extra, f"127.0.0.1:{self.port}", "1000"],
            stdin=subprocess.DEVNULL, stdout=self._out, stderr=subprocess.STDOUT)
        H.wait_for(lambda: H.smtp_banner_ok(self.port), 20, what=f"smtp-sink on {self.port}")
        self.base_count = self.count()  # the readiness probe is a session, not a message

    def count(self):
        try:
            with open(self.out_path, "rb") as f:
                f.seek(0, os.SEEK_END)
                size = f.tell()
                f.seek(max(0, size - 256))
                tail = f.read()
        except OSError:
            return 0
        found = re.findall(rb"mesg=(\d+)", tail)
        return int(found[-1]) if found else 0

    def dump_count(self, needle):
        """How many times ``needle`` (bytes) occurs in the dump file."""
        if not self.dump_path:
            return 0
        n = 0
        try:
            with open(self.dump_path, "rb") as f:
                carry = b""
                while True:
                    block = f.read(1 << 20)
                    if not block:
                        break
                    data = carry + block
                    n += data.count(needle)
                    carry = data[-(len(needle) - 1):] if len(needle) > 1 else b""
                    n -= carry.count(needle)
        except OSError:
            return 0
        return n

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._out.close()


# --------------------------------------------------------------------------
# smtp-source


def smtp_source(port, sessions, messages, size, rcpt, timeout):
    """Runs smtp-source to completion; returns (seconds, output). Raises
    if it fails (every message must be answered 250)."""
    cmd = ["smtp-source", "-s", str(sessions), "-m", str(messages), "-l", str(size),
           "-f", "from@x.test", "-t", rcpt, f"127.0.0.1:{port}"]
    t0 = time.monotonic()
    p = subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                       stderr=subprocess.STDOUT, timeout=timeout)
    elapsed = time.monotonic() - t0
    out = p.stdout.decode("utf-8", "replace")
    if p.returncode != 0:
        raise RuntimeError(f"smtp-source exited {p.returncode}:\n{out[-2000:]}")
    return elapsed, out


# --------------------------------------------------------------------------
# Latency: one extra client timing DATA -> 250 on a sample of messages


class _Conn:
    def __init__(self, port, timeout=60):
        self.s = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        # The content and the final "." go out in two writes: with Nagle's
        # algorithm the dot waited for the server's delayed ACK, adding
        # ~40 ms to every DATA->250 sample, whatever the MTA.
        self.s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = b""

    def reply(self):
        while True:
            while b"\n" in self.buf:
                line, self.buf = self.buf.split(b"\n", 1)
                if len(line) >= 4 and line[3:4] == b" ":
                    return int(line[:3]), line
            chunk = self.s.recv(65536)
            if not chunk:
                raise ConnectionError("connection closed")
            self.buf += chunk

    def cmd(self, text, expect):
        self.s.sendall(text)
        code, line = self.reply()
        if code != expect:
            raise RuntimeError(f"{text!r} answered {line!r}")
        return code


def make_body(size, tag):
    head = (f"From: <latency@x.test>\r\nTo: <{tag}>\r\nSubject: latency sample\r\n"
            "Message-ID: <{n}@x.test>\r\n\r\n")
    line = b"X" * 76 + b"\r\n"
    body = line * max(1, (size - len(head)) // len(line))
    return head, body


class LatencySampler:
    """Sends messages of ``size`` bytes one at a time on one session, every
    ``gap`` seconds, until stopped or ``limit`` messages; records for each
    the time from sending DATA to the final 250, from the end-of-data dot
    to that 250, and from sending MAIL FROM to that 250: the whole
    transaction, which counts the queue file's creation wherever an MTA
    does it (Postfix and Postern both at the first accepted RCPT TO)."""

    def __init__(self, port, size, rcpt, gap=0.02, limit=1000):
        self.port, self.size, self.rcpt = port, size, rcpt
        self.gap, self.limit = gap, limit
        self.data_to_250 = []
        self.dot_to_250 = []
        self.mail_to_250 = []
        self.error = None
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._loop, daemon=True)

    @property
    def sent(self):
        return len(self.data_to_250)

    def _loop(self):
        try:
            c = _Conn(self.port)
            code, _ = c.reply()
            if code != 220:
                raise RuntimeError("no 220 greeting")
            c.cmd(b"EHLO latency.x.test\r\n", 250)
            head, body = make_body(self.size, self.rcpt)
            n = 0
            while not self._stop.is_set() and n < self.limit:
                n += 1
                tm = time.monotonic()
                c.cmd(b"MAIL FROM:<latency@x.test>\r\n", 250)
                c.cmd(f"RCPT TO:<{self.rcpt}>\r\n".encode(), 250)
                t0 = time.monotonic()
                c.cmd(b"DATA\r\n", 354)
                c.s.sendall(head.replace("{n}", str(n)).encode() + body)
                t1 = time.monotonic()
                c.s.sendall(b".\r\n")
                code, line = c.reply()
                t2 = time.monotonic()
                if code != 250:
                    raise RuntimeError(f"end of data answered {line!r}")
                self.data_to_250.append(t2 - t0)
                self.dot_to_250.append(t2 - t1)
                self.mail_to_250.append(t2 - tm)
                self._stop.wait(self.gap)
            c.cmd(b"QUIT\r\n", 221)
            c.s.close()
        except Exception as e:  # reported by the caller: the run fails
            self.error = f"{type(e).__name__}: {e}"

    def start(self):
        self._t.start()
        return self

    def stop(self):
        self._stop.set()
        self._t.join(120)


def percentile(values, p):
    if not values:
        return None
    v = sorted(values)
    k = (len(v) - 1) * p / 100.0
    lo = int(k)
    hi = min(lo + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (k - lo)


# --------------------------------------------------------------------------
# Idle sessions: many connections that greet and then sit


class IdleSessions:
    """Opens ``count`` SMTP sessions (greeting + EHLO) from an asyncio loop
    in a thread, keeps them open until ``close()``."""

    def __init__(self, port, count):
        self.port, self.count = port, count
        self.open = 0
        self.error = None
        self._ready = threading.Event()
        self._loop = asyncio.new_event_loop()
        self._closing = None
        self._t = threading.Thread(target=self._run, daemon=True)

    async def _one(self, i, writers):
        r, w = await asyncio.open_connection("127.0.0.1", self.port)
        writers.append(w)
        line = await r.readline()
        if not line.startswith(b"220"):
            raise RuntimeError(f"session {i}: greeting {line!r}")
        w.write(b"EHLO idle.x.test\r\n")
        await w.drain()
        while True:
            line = await r.readline()
            if not line:
                raise RuntimeError(f"session {i}: closed during EHLO")
            if line[3:4] == b" ":
                break
        self.open += 1

    async def _main(self):
        writers = []
        self._closing = asyncio.Event()
        try:
            sem = asyncio.Semaphore(50)

            async def limited(i):
                async with sem:
                    await self._one(i, writers)
            await asyncio.wait_for(asyncio.gather(*(limited(i) for i in range(self.count))), 120)
        except Exception as e:
            self.error = f"{type(e).__name__}: {e}"
        self._ready.set()
        await self._closing.wait()
        for w in writers:
            try:
                w.write(b"QUIT\r\n")
                w.close()
            except Exception:
                pass
        await asyncio.sleep(0.2)

    def _run(self):
        asyncio.set_event_loop(self._loop)
        self._loop.run_until_complete(self._main())
        self._loop.close()

    def start(self, timeout=150):
        self._t.start()
        self._ready.wait(timeout)
        if self.error or self.open != self.count:
            raise RuntimeError(f"idle sessions: {self.open}/{self.count} open; {self.error}")
        return self

    def close(self):
        if self._closing is not None:
            self._loop.call_soon_threadsafe(self._closing.set)
        self._t.join(30)


# --------------------------------------------------------------------------
# A quiet machine


def _cpu_times():
    with open("/proc/stat") as f:
        parts = f.readline().split()[1:]
    vals = [int(x) for x in parts]
    idle = vals[3] + (vals[4] if len(vals) > 4 else 0)
    return idle, sum(vals[:8])


def idle_fraction(window=2.0):
    i0, t0 = _cpu_times()
    time.sleep(window)
    i1, t1 = _cpu_times()
    return (i1 - i0) / max(1, t1 - t0)


def wait_quiet(min_idle, max_wait):
    """Waits until the machine's CPUs were at least ``min_idle`` idle over
    2 s, at most ``max_wait`` seconds. Returns (quiet?, last idle, waited)."""
    t0 = time.monotonic()
    while True:
        idle = idle_fraction(2.0)
        waited = time.monotonic() - t0
        if idle >= min_idle:
            return True, idle, waited
        if waited >= max_wait:
            return False, idle, waited
