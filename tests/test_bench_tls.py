"""bench/tls on a tiny load: Postfix and Postern each through every case
(clear, STARTTLS with the P-256 and the RSA-2048 leaf, STARTTLS with
resumption, outbound TLS to a private Postfix receiver), and the
benchmark's own checks (every message answered 250, logged sent once,
counted by smtp-sink or by the receiver on one TLS connection each; TLS
where asked; resumption only where offered) passing for both. Checks the
machinery, not speed: debug binaries of ``POSTERN_BIN_DIR``, nothing timed.
"""

import contextlib
import os
import re
import shutil
import tempfile
from pathlib import Path

import pytest

import postern_harness as h

# The bench/ scripts share the cgroups named ptbench-* and the local user
# ptbench (tests/conftest.py).
pytestmark = pytest.mark.shares("bench")

BENCH = h.REPO / "bench" / "tls"
CASES = ["clear", "in-p256", "in-rsa", "in-p256-resume", "out-p256"]
M = 12


def test_tls_bench_checks_both_mtas(tmp_path, system_accounts):
    if not h.is_root():
        pytest.skip("bench/tls needs root (cgroups, Postfix's daemons)")
    missing = h.missing_binaries()
    assert not missing, f"Postern binaries missing in {h.BIN_DIR}: {missing}"
    out = tmp_path / "tls.md"
    # Short: Postfix's socket paths under queue/ stay below 108 bytes.
    work = Path(tempfile.mkdtemp(prefix="ptt-"))
    os.chmod(work, 0o755)
    try:
        p, report = h.run_bench(BENCH, ["-m", M, "-s", 2, "--no-build",
                                        "--postern-bin", h.BIN_DIR, "--out", out,
                                        "--tmp", work, "--settle", 0.2,
                                        "--speed-seconds", 1])
        assert p.returncode == 0, report
        md = out.read_text()
        assert "Checks passed" in md and "RUN FAILED" not in md, report
        # Every case measured for both MTAs, with the far side's count.
        for mta in ("Postfix", "Postern"):
            for case in CASES:
                row = re.search(rf"^\| {mta} \| `{case}` \|([^\n]*)$", md, re.M)
                assert row, f"no row for {mta} {case}:\n{md}"
                cells = [c.strip() for c in row.group(1).split("|")]
                tls, resumed, far = int(cells[3]), int(cells[4]), cells[5]
                if case.startswith("in-"):
                    assert tls == M, (mta, case, md)
                    assert far == str(M), (mta, case, md)
                else:
                    assert tls == 0, (mta, case, md)
                if case == "in-p256-resume":
                    assert resumed > 0, (mta, case, md)
                elif case.startswith("in-"):
                    assert resumed == 0, (mta, case, md)
                if case == "out-p256":
                    assert far == f"{M} msgs, {M} TLS", (mta, case, md)
                if case == "clear":
                    assert far == str(M), (mta, case, md)
        # The crypto floor was read from openssl speed.
        assert re.search(r"ECDSA P-256 sign \d+\.\d+ ms", md), md
    finally:
        shutil.rmtree(work, ignore_errors=True)


def test_tls_bench_on_a_fresh_file_system_per_run(tmp_path, system_accounts):
    """``--queue-fs ext4-nojournal``: each run on a file system made for
    it (a loop-mounted image under --tmp), named in the report, and gone
    afterwards (no mount, no image left)."""
    if not h.is_root():
        pytest.skip("bench/tls needs root (cgroups, Postfix's daemons, mount)")
    if not os.path.exists("/dev/loop-control"):
        pytest.skip("no loop devices on this machine: --queue-fs cannot mount an image")
    with small_run(tmp_path, "--cases", "clear,in-p256",
                   "--queue-fs", "ext4-nojournal") as (md, work):
        assert "on a fresh ext4 without a journal for each run" in md, md
        assert "--queue-fs ext4-nojournal" in md, md
        for mta in ("Postfix", "Postern"):
            for case in ("clear", "in-p256"):
                assert re.search(rf"^\| {mta} \| `{case}` \|", md, re.M), (mta, case, md)
        with open("/proc/mounts") as f:
            mounts = f.read()
        assert str(work) not in mounts, mounts
        assert sorted(os.listdir(work)) == [], os.listdir(work)


def test_tls_bench_pins_each_mta_to_one_cpu(tmp_path, system_accounts):
    """``--pin`` (a diagnostic): each MTA's processes on CPU 0, checked
    for every process of its cgroup after each run, and said in the
    report; the clients run on the other CPUs."""
    if not h.is_root():
        pytest.skip("bench/tls needs root (cgroups, Postfix's daemons)")
    if len(os.sched_getaffinity(0)) < 2 or 0 not in os.sched_getaffinity(0):
        pytest.skip("--pin needs CPU 0 and another CPU")
    with small_run(tmp_path, "--cases", "clear", "--pin") as (md, _):
        assert "--pin`" in md and "a diagnostic" in md, md
        pinned = re.search(r"Pinned \(`--pin`\): after each run, (\d+)–(\d+) processes "
                           r"in the MTA's cgroup, each allowed on CPU 0 alone; (\d+) "
                           r"allowed elsewhere\.", md)
        assert pinned, md
        assert int(pinned.group(1)) > 0 and pinned.group(3) == "0", md


@contextlib.contextmanager
def small_run(tmp_path, *extra):
    """bench/tls on 6 messages per case and MTA with ``extra`` options,
    in a work directory of its own (removed afterwards): (the report,
    the work directory), once the run passed its checks."""
    out = tmp_path / "tls.md"
    # Short: Postfix's socket paths under queue/ stay below 108 bytes.
    work = Path(tempfile.mkdtemp(prefix="ptt-"))
    os.chmod(work, 0o755)
    try:
        p, report = h.run_bench(BENCH, ["-m", 6, "-s", 2, "--no-build",
                                        "--postern-bin", h.BIN_DIR, "--out", out,
                                        "--tmp", work, "--settle", 0.2,
                                        "--speed-seconds", 1, "--handshakes", 0, *extra])
        assert p.returncode == 0, report
        md = out.read_text()
        assert "Checks passed" in md, report
        yield md, work
    finally:
        shutil.rmtree(work, ignore_errors=True)
