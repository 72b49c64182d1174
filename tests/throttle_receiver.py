"""A scripted receiver that throttles as big mailbox providers do
(aiosmtpd, on 127.0.0.1 and a free port), for the delivery-management
tests (issue #19) and the benchmarks.

What it can be told (all may change while it runs):

- ``max_connections``: one more connection than that is greeted with
  ``421 4.7.0 Too many connections`` and closed.
- ``max_rate`` (messages) per ``rate_window`` seconds, counted over a
  sliding window of accepted messages: over it, MAIL FROM is answered
  ``451 4.7.1 rate limited``.
- ``reputation(seconds)``: for that long every MAIL FROM is answered
  ``421 4.7.0 [TS04] Messages temporarily deferred`` and the connection is
  closed (Yahoo's phrasing).
- ``block_peer(ip, reply)``: every MAIL FROM from that source address
  gets ``reply`` (default the [TS04] one, and the connection is closed):
  one IP blocked by a provider while the others are not.
- ``set_rcpt(address, reply)``: per-recipient replies such as
  ``550 5.1.1 no such user`` or ``552 5.2.2 mailbox full``.
- ``data_delay``: seconds to wait before answering the final dot (keeps
  sessions open long enough to overlap).
- ``quit_delay``: seconds to wait before answering QUIT (shows whether a
  client waits for that reply: Postfix's ``smtp_skip_quit_response``).

What it records: every connection (open and close times, source
address; a connection ends when its QUIT arrives, or when the client
closes first), the most connections open at once (``max_concurrent``), every
accepted message (time, source address, recipients), every 4xx/5xx it
answered (``replies``), and each QUIT (``quits``: when it arrived, when
it was answered or None, when the connection was lost).

Run alone (``python3 tests/throttle_receiver.py --port 2525
--max-connections 3 --max-rate 20``) it serves until interrupted and prints
the same observations at the end.
"""

import argparse
import asyncio
import collections
import socket
import threading
import time

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP

TOO_MANY = "421 4.7.0 Too many connections"
RATE_LIMITED = "451 4.7.1 rate limited"
REPUTATION = "421 4.7.0 [TS04] Messages temporarily deferred"


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Accepted:
    __slots__ = ("time", "peer", "rcpts", "content")

    def __init__(self, t, peer, rcpts, content):
        self.time = t
        self.peer = peer
        self.rcpts = rcpts
        self.content = content


class ThrottleReceiver:
    def __init__(self, max_connections=0, max_rate=0, rate_window=1.0, data_delay=0.0,
                 hostname="mx.throttle.test", quit_delay=0.0):
        self.max_connections = max_connections  # 0: no cap
        self.max_rate = max_rate  # 0: no limit
        self.rate_window = rate_window
        self.data_delay = data_delay
        self.quit_delay = quit_delay
        self.hostname = hostname
        self.port = None
        self._lock = threading.Lock()
        self._rcpt = {}
        self._reputation_until = 0.0
        self._blocked = {}  # source address -> reply
        self._open = 0
        self.max_concurrent = 0
        self.connections = []  # [open_time, close_time or None, peer]
        self.accepted = []  # Accepted
        self.replies = []  # (time, reply, peer)
        self.quits = []  # {"at", "answered", "lost"}: times (answered, lost: None until then)
        self._recent = collections.deque()  # accepted-message times in the window
        self.controller = None

    # -------------------------------------------------------------- settings
    def set_rcpt(self, address, reply):
        with self._lock:
            self._rcpt[address.lower()] = reply

    def reputation(self, seconds):
        """Answer [TS04] to every MAIL FROM for that many seconds."""
        with self._lock:
            self._reputation_until = time.time() + seconds

    def block_peer(self, ip, reply=REPUTATION):
        """Answer `reply` to every MAIL FROM from source address `ip`."""
        with self._lock:
            self._blocked[ip] = reply

    def by_peer(self):
        """Accepted messages per source address: {ip: count}."""
        with self._lock:
            return dict(collections.Counter(a.peer[0] for a in self.accepted))

    def in_reputation_mode(self):
        with self._lock:
            return time.time() < self._reputation_until

    # ---------------------------------------------------------- observations
    def times(self):
        with self._lock:
            return [a.time for a in self.accepted]

    def count(self):
        with self._lock:
            return len(self.accepted)

    def temp_failures(self):
        with self._lock:
            return [r for r in self.replies if r[1].startswith("4")]

    def concurrency_at(self, t):
        with self._lock:
            return sum(1 for o, c, _ in self.connections if o <= t and (c is None or c > t))

    def rate(self, start=None, end=None):
        """Messages per second between the first and last accepted (or the
        given times): (count - 1) / span."""
        ts = sorted(self.times())
        if start is not None:
            ts = [t for t in ts if t >= start]
        if end is not None:
            ts = [t for t in ts if t <= end]
        if len(ts) < 2:
            return 0.0
        return (len(ts) - 1) / (ts[-1] - ts[0])

    def max_in_window(self, window=1.0):
        ts = sorted(self.times())
        best, j = 0, 0
        for i, t in enumerate(ts):
            while ts[j] < t - window:
                j += 1
            best = max(best, i - j + 1)
        return best

    # ----------------------------------------------------------- the server
    def _reply(self, peer, text):
        with self._lock:
            self.replies.append((time.time(), text, peer))
        return text

    def _connected(self, peer):
        with self._lock:
            self._open += 1
            rec = [time.time(), None, peer]
            self.connections.append(rec)
            over = self.max_connections and self._open > self.max_connections
            self.max_concurrent = max(self.max_concurrent, self._open)
            return rec, over

    def _closed(self, rec):
        with self._lock:
            if rec[1] is None:
                rec[1] = time.time()
                self._open -= 1

    async def handle_MAIL(self, server, session, envelope, address, mail_options):
        peer = session.peer
        with self._lock:
            blocked = self._blocked.get(peer[0])
        if blocked:
            server._throttle_close = blocked.startswith("421")
            return self._reply(peer, blocked)
        if self.in_reputation_mode():
            server._throttle_close = True
            return self._reply(peer, REPUTATION)
        if self.max_rate:
            now = time.time()
            with self._lock:
                while self._recent and self._recent[0] < now - self.rate_window:
                    self._recent.popleft()
                over = len(self._recent) >= self.max_rate
            if over:
                return self._reply(peer, RATE_LIMITED)
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 2.1.0 Ok"

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        with self._lock:
            answer = self._rcpt.get(address.lower())
        if answer:
            return self._reply(session.peer, answer)
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 Ok"

    async def handle_QUIT(self, server, session, envelope):
        if self.quit_delay:
            await asyncio.sleep(self.quit_delay)
        return "221 Bye"

    async def handle_DATA(self, server, session, envelope):
        if self.data_delay:
            await asyncio.sleep(self.data_delay)
        now = time.time()
        with self._lock:
            self.accepted.append(Accepted(now, session.peer, list(envelope.rcpt_tos),
                                          bytes(envelope.original_content or b"")))
            self._recent.append(now)
        return "250 2.0.0 Ok: queued"

    def start(self):
        rx = self

        class ThrottleSMTP(SMTP):
            line_length_limit = 100000

            def connection_made(self, transport):
                self._throttle_close = False
                peer = transport.get_extra_info("peername")
                self._throttle_rec, self._throttle_over = rx._connected(peer)
                super().connection_made(transport)

            def connection_lost(self, error):
                rx._closed(self._throttle_rec)
                quit = getattr(self, "_throttle_quit", None)
                if quit is not None:
                    with rx._lock:
                        quit["lost"] = time.time()
                super().connection_lost(error)

            def data_received(self, data):
                # The connection ends for counting when its QUIT arrives,
                # here, as the event loop reads it: the command itself is
                # handled in a later turn of the loop, and a client that
                # does not wait for the reply (smtp_skip_quit_response)
                # may already have told its queue manager, which may open
                # the next connection before that turn.
                # (Not a line of message content: between 354 and the
                # reply to the final dot.)
                if not getattr(self, "_throttle_in_data", False) and \
                        getattr(self, "_throttle_quit", None) is None and any(
                        line.strip().upper() == b"QUIT" for line in data.split(b"\n")):
                    rx._closed(self._throttle_rec)
                    self._throttle_quit = {"at": time.time(), "answered": None, "lost": None}
                    with rx._lock:
                        rx.quits.append(self._throttle_quit)
                super().data_received(data)

            def eof_received(self):
                rx._closed(self._throttle_rec)
                return super().eof_received()

            async def _handle_client(self):
                if self._throttle_over:
                    await self.push(rx._reply(self.session.peer, TOO_MANY))
                    rx._closed(self._throttle_rec)
                    self.transport.close()
                    return
                await super()._handle_client()

            async def push(self, status):
                self._throttle_in_data = status.startswith("354")
                await super().push(status)
                if status.startswith("221"):
                    rx._closed(self._throttle_rec)
                    quit = getattr(self, "_throttle_quit", None)
                    if quit is not None:
                        with rx._lock:
                            quit["answered"] = time.time()
                if getattr(self, "_throttle_close", False) and status.startswith("421"):
                    self._throttle_close = False
                    rx._closed(self._throttle_rec)
                    self.transport.close()

        class ThrottleController(Controller):
            def factory(self):
                return ThrottleSMTP(self.handler, **self.SMTP_kwargs)

        self.port = _free_port()
        self.controller = ThrottleController(self, hostname="127.0.0.1", port=self.port,
                                             server_hostname=self.hostname, ready_timeout=10)
        self.controller.start()
        # The controller's readiness probe is not a client: wait for it to
        # close (bounded), then forget it.
        deadline = time.time() + 5
        while time.time() < deadline:
            with self._lock:
                if all(c[1] is not None for c in self.connections):
                    break
            time.sleep(0.02)
        with self._lock:
            self.connections.clear()
            self.quits.clear()
            self._open = 0
            self.max_concurrent = 0
        return self

    def stop(self):
        if self.controller is not None:
            try:
                self.controller.stop()
            finally:
                self.controller = None

    def summary(self):
        return (f"accepted={self.count()} max_concurrent={self.max_concurrent} "
                f"rate={self.rate():.2f}/s max_in_1s={self.max_in_window(1.0)} "
                f"temp_failures={len(self.temp_failures())}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--max-connections", type=int, default=0)
    ap.add_argument("--max-rate", type=int, default=0)
    ap.add_argument("--data-delay", type=float, default=0.0)
    a = ap.parse_args()
    r = ThrottleReceiver(a.max_connections, a.max_rate, data_delay=a.data_delay)
    if a.port:
        global _free_port
        _free_port = lambda: a.port  # noqa: E731
    r.start()
    print(f"listening on 127.0.0.1:{r.port}", flush=True)
    try:
        while True:
            time.sleep(1)
    except KeyboardInterrupt:
        pass
    r.stop()
    print(r.summary())


if __name__ == "__main__":
    main()
