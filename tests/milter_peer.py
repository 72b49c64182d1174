"""A scriptable test milter on Debian's python3-milter (pymilter, on
Sendmail's libmilter itself), run as its own process:

    python3 milter_peer.py PORT|unix:PATH PLAN_FILE EVENTS_FILE [helo-replies]

PLAN_FILE (JSON, read again at every callback, so a test changes it
between sessions): ``{"replies": {STAGE: REPLY}, "edits": [[ACTION, ARGS...]]}``
with STAGE one of connect helo mail rcpt data header eoh body eom, REPLY
one of continue accept reject tempfail discard skip crash (the milter
process exits), or
``"custom:CODE:XCODE:TEXT"`` (setreply, then reject or tempfail by the
code). ``edits`` are done at the end of the message: addheader NAME VALUE,
insheader IDX NAME VALUE, chgheader NAME IDX VALUE (empty deletes),
addrcpt RCPT [PARAMS], delrcpt RCPT, chgfrom SENDER, replacebody TEXT,
quarantine REASON.

EVENTS_FILE gets one JSON line per callback: the stage, its arguments and
the macros the MTA sent for it.

HELO is declared no-reply (``Milter.noreply``), so libmilter negotiates
SMFIP_NR_HELO and the MTA must not wait for an answer there, unless a
further argument ``helo-replies`` makes it an answered stage. A further
argument ``rcpt-rej`` asks for SMFIP_RCPT_REJ: recipients the MTA has
refused are shown too (with ``{rcpt_mailer}`` ``error``, as Sendmail and
Postfix send them).
"""

import json
import os
import sys

import Milter

SOCKET, PLAN, EVENTS = sys.argv[1], sys.argv[2], sys.argv[3]

MACROS = ["i", "j", "_", "{daemon_name}", "{daemon_addr}", "v", "{auth_type}",
          "{auth_authen}", "{auth_author}", "{mail_addr}", "{mail_host}", "{mail_mailer}",
          "{rcpt_addr}", "{rcpt_host}", "{rcpt_mailer}", "{client_addr}", "{tls_version}",
          "{cipher}", "{cipher_bits}", "{cert_subject}", "{cert_issuer}", "{client_name}",
          "{client_port}", "{test_default}"]


def plan():
    try:
        with open(PLAN) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


# "helo-replies" as a further argument: HELO is answered (and scripted)
# like the other stages; without it HELO is a no-reply stage.
HELO_REPLIES = "helo-replies" in sys.argv[4:]
RCPT_REJ = "rcpt-rej" in sys.argv[4:]


class TestMilter(Milter.Base):
    def __init__(self):
        self.id = Milter.uniqueID()

    def log(self, stage, *args):
        macros = {}
        for m in MACROS:
            v = self.getsymval(m)
            if v is not None:
                macros[m] = v
        with open(EVENTS, "a") as f:
            f.write(json.dumps({"conn": self.id, "stage": stage,
                                "args": [a if isinstance(a, str) else repr(a) for a in args],
                                "macros": macros}) + "\n")

    def answer(self, stage):
        r = plan().get("replies", {}).get(stage, "continue")
        if r == "crash":
            os._exit(1)
        if r.startswith("custom:"):
            _, code, xcode, text = r.split(":", 3)
            self.setreply(code, xcode, text)
            return Milter.TEMPFAIL if code.startswith("4") else Milter.REJECT
        return {"continue": Milter.CONTINUE, "accept": Milter.ACCEPT,
                "reject": Milter.REJECT, "tempfail": Milter.TEMPFAIL,
                "discard": Milter.DISCARD, "skip": Milter.SKIP}[r]

    def connect(self, hostname, family, hostaddr):
        self.log("connect", hostname, hostaddr)
        return self.answer("connect")

    def hello(self, heloname):
        self.log("helo", heloname)
        return self.answer("helo") if HELO_REPLIES else Milter.CONTINUE

    def envfrom(self, mailfrom, *params):
        self.body_chunks = 0
        self.log("mail", mailfrom, *params)
        return self.answer("mail")

    def envrcpt(self, to, *params):
        self.log("rcpt", to, *params)
        return self.answer("rcpt")

    def data(self):
        self.log("data")
        return self.answer("data")

    def header(self, name, value):
        self.log("header", name, value)
        return self.answer("header")

    def eoh(self):
        self.log("eoh")
        return self.answer("eoh")

    def body(self, chunk):
        self.body_chunks += 1
        self.log("body", str(len(chunk)))
        return self.answer("body")

    def unknown(self, cmd):
        self.log("unknown", cmd)
        return self.answer("unknown")

    def eom(self):
        self.log("eom", str(self.body_chunks))
        for e in plan().get("edits", []):
            a = e[0]
            if a == "addheader":
                self.addheader(e[1], e[2])
            elif a == "insheader":
                self.addheader(e[2], e[3], int(e[1]))
            elif a == "chgheader":
                self.chgheader(e[1], int(e[2]), e[3])
            elif a == "addrcpt":
                self.addrcpt(e[1], e[2] if len(e) > 2 else None)
            elif a == "delrcpt":
                self.delrcpt(e[1])
            elif a == "chgfrom":
                self.chgfrom(e[1])
            elif a == "replacebody":
                self.progress()
                self.replacebody(e[1].encode())
            elif a == "quarantine":
                self.quarantine(e[1])
        return self.answer("eom")

    def close(self):
        return Milter.CONTINUE


if __name__ == "__main__":
    if not HELO_REPLIES:
        TestMilter.hello = Milter.noreply(TestMilter.hello)
    if RCPT_REJ:
        Milter.enable_protocols(TestMilter, Milter.P_RCPT_REJ)
    Milter.factory = TestMilter
    Milter.set_flags(Milter.ADDHDRS | Milter.CHGHDRS | Milter.ADDRCPT | Milter.ADDRCPT_PAR
                     | Milter.DELRCPT | Milter.CHGFROM | Milter.CHGBODY | Milter.QUARANTINE)
    sys.stdout.write("ready\n")
    sys.stdout.flush()
    os.umask(0)  # a unix: socket the MTA's unprivileged daemons can use
    where = SOCKET if SOCKET.startswith("unix:") else f"inet:{SOCKET}@127.0.0.1"
    Milter.runmilter("postern-test", where, 60)
