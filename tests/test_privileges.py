"""Least privilege, as an administrator would check it with ps and /proc:
run as root, master stays root, every daemon that parses outside input
runs as mail_owner with no capabilities and no_new_privs (in every one of
its threads; master starts it as root and it drops itself before it
reads from the network: see tests/test_secrets.py for what it reads as
root first), and mail is stored where other users cannot read it."""

import os
import pwd
import stat
import uuid

import pytest

import postern_harness as h
from postern_harness import wait_for

# The daemons that parse input from outside and so must never hold root.
UNPRIVILEGED = ("smtpd", "cleanup", "qmgr", "smtp", "pickup", "anvil")

# Makes smtpd ask anvil, so that anvil runs.
ANVIL_PARAMS = {"smtpd_client_connection_count_limit": "10",
                "smtpd_client_event_limit_exceptions": ""}


def proc_status(pid):
    """/proc/PID/status as a dict of its fields."""
    fields = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            name, _, value = line.partition(":")
            fields[name] = value.strip()
    return fields


def assert_unprivileged(pid, name, owner):
    """Every thread of process `pid` (daemon `name`) runs as `owner` (a
    pwd entry), with no supplementary group but its own, no capability in
    any set, and no_new_privs."""
    uid, gid = str(owner.pw_uid), str(owner.pw_gid)
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except FileNotFoundError:
        return  # exited meanwhile
    for tid in tasks:
        try:
            st = proc_status(f"{pid}/task/{tid}")
        except FileNotFoundError:
            continue  # a thread that ended meanwhile
        where = (name, pid, tid)
        assert st["Uid"].split() == [uid] * 4, (where, st["Uid"])
        assert st["Gid"].split() == [gid] * 4, (where, st["Gid"])
        assert st["Groups"].split() in ([], [gid]), (where, st["Groups"])
        for cap in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
            assert int(st[cap], 16) == 0, (where, cap, st[cap])
        assert st["NoNewPrivs"] == "1", (where, st["NoNewPrivs"])


def running_daemons(p):
    """{program name: [pids]} of the master's children now."""
    seen = {}
    for pid in p.child_pids():
        name = h.proc_name(pid)
        if name:
            seen.setdefault(name, []).append(pid)
    return seen


@pytest.fixture
def root_only():
    if not h.is_root():
        pytest.skip("privilege separation is tested as root")


def test_daemons_run_unprivileged(root_only, make_postern, sink, local_users):
    token = uuid.uuid4().hex
    p = make_postern(params={"relayhost": f"[127.0.0.1]:{sink.port}", **ANVIL_PARAMS})
    # Mail through every daemon: SMTP in, relayed out; sendmail in, local out.
    code, text = p.send("ptalice@postern.test", ["far@remote.example"],
                        f"Subject: {token}\n\nout\n")
    assert code == 250, text
    r = p.sendmail(["ptalice@postern.test"], f"Subject: {token}\n\nin\n".encode())
    assert r.returncode == 0, h.describe(r)
    wait_for(lambda: any(token.encode() in m.content for m in sink.messages),
             timeout=30, what="the relayed message at the sink")
    mine = lambda: [(path, raw) for path, raw in h.maildir_messages("ptalice")
                    if token.encode() in raw]
    wait_for(mine, timeout=30, what="the local message in ptalice's Maildir")

    owner = pwd.getpwnam("postern")
    seen = running_daemons(p)
    missing = [d for d in UNPRIVILEGED if d not in seen]
    assert not missing, f"daemons not running after the deliveries: {missing} (saw {sorted(seen)})"
    for name in UNPRIVILEGED:
        for pid in seen[name]:
            assert_unprivileged(pid, name, owner)
    # Started as root, they dropped themselves, and master checked.
    assert not p.log_search(r"without having dropped root"), p.log_tail()

    # master itself keeps root: it must bind ports and start local.
    assert proc_status(p.master_pid())["Uid"].split()[0] == "0"

    # The delivered copy belongs to the recipient, not to root.
    path, _ = mine()[0]
    st = os.stat(path)
    assert st.st_uid == pwd.getpwnam("ptalice").pw_uid, path


def test_queue_files_unreadable_to_others(root_only, make_postern, sink):
    token = uuid.uuid4().hex
    p = make_postern(params={"relayhost": f"[127.0.0.1]:{sink.port}"})
    sink.set_rcpt("wait@remote.example", "450 4.2.0 try later")
    code, text = p.send("someone@postern.test", ["wait@remote.example"],
                        f"Subject: {token}\n\nbody\n")
    assert code == 250, text
    ids = wait_for(lambda: p.queue_files("deferred"), timeout=30,
                   what="a deferred queue file")
    owner = pwd.getpwnam("postern")
    for qid in ids:
        st = os.stat(p.queue / "deferred" / qid)
        assert st.st_uid == owner.pw_uid, qid
        assert stat.S_IMODE(st.st_mode) & 0o077 == 0, oct(st.st_mode)
    for d in ("incoming", "active", "deferred", "hold", "corrupt", "defer", "bounce", "private"):
        st = os.stat(p.queue / d)
        assert st.st_uid == owner.pw_uid, d
        assert stat.S_IMODE(st.st_mode) & 0o077 == 0, (d, oct(st.st_mode))
    # maildrop: the set-gid group may write, nobody may list or read.
    st = os.stat(p.queue / "maildrop")
    assert stat.S_IMODE(st.st_mode) == 0o1730, oct(st.st_mode)
