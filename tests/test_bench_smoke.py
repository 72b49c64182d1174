"""bench/run --quick on a tiny case: both MTAs, both scenarios, every
message accounted for. Checks the benchmark's machinery, not speed (it
uses the debug binaries of ``POSTERN_BIN_DIR``; nothing here is timed).
"""

import json
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

import postern_harness as h

# The bench/ scripts share the cgroups named ptbench-* and the local user
# ptbench (tests/conftest.py).
pytestmark = pytest.mark.shares("bench")

BENCH_RUN = h.REPO / "bench" / "run"
N = 100


def _cgroup2():
    """The cgroup v2 mount point, or None."""
    with open("/proc/mounts") as f:
        for line in f:
            parts = line.split()
            if len(parts) > 2 and parts[2] == "cgroup2":
                return parts[1]
    return None


def _bench_cgroups(root):
    return {d for d in os.listdir(root) if d.startswith("ptbench-")}


@pytest.fixture
def bench_result(tmp_path, system_accounts):
    if not h.is_root():
        pytest.skip("bench/run needs root (cgroups, Postfix, the local user ptbench)")
    cg_root = _cgroup2()
    if not cg_root:
        pytest.skip("no cgroup v2 hierarchy mounted")
    missing = h.missing_binaries()
    assert not missing, f"Postern binaries missing in {h.BIN_DIR}: {missing}"
    out = tmp_path / "results"
    # Short on purpose: Postfix's socket paths under queue/ must stay
    # below 108 bytes, which pytest's tmp_path does not promise.
    work = Path(tempfile.mkdtemp(prefix="ptb-"))
    os.chmod(work, 0o755)  # the MTAs' unprivileged users must get through
    try:
        yield from _run_bench(out, work, cg_root)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _run_bench(out, work, cg_root):
    cgroups_before = _bench_cgroups(cg_root)
    cmd = [sys.executable, str(BENCH_RUN), "--quick", "--cases", "c20-4k",
           "--scenarios", "relay,maildir", "-n", str(N), "--no-build",
           "--postern-bin", str(h.BIN_DIR), "--out", str(out), "--tmp", str(work)]
    p = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                       timeout=85)
    report = f"command: {' '.join(cmd)}\nexit {p.returncode}\nstdout:\n{p.stdout[-6000:]}\nstderr:\n{p.stderr[-4000:]}"
    files = sorted(out.glob("*.json"))
    assert p.returncode == 0 and len(files) == 1, report
    left = _bench_cgroups(cg_root) - cgroups_before
    yield json.loads(files[0].read_text()), out, work, report, left


def test_quick_bench_counts_every_message_for_both_mtas(bench_result):
    doc, out, work, report, cgroups_left = bench_result
    runs = doc["runs"]
    seen = {(r["mta"], r["scenario"]) for r in runs}
    assert seen == {("postfix", "relay"), ("postern", "relay"),
                    ("postfix", "maildir"), ("postern", "maildir")}, report
    for r in runs:
        c = r["checks"]
        assert r["messages"] == N
        # smtp-source's N plus the latency client's sample, all delivered once
        assert c["expected"] == N + r["latency_samples"], r
        assert c["log_status_sent"] == c["expected"], r
        if r["scenario"] == "relay":
            assert c["sink_received"] == c["expected"], r
        else:
            assert c["maildir_files"] == c["expected"], r
        assert r["accepted_per_s"] > 0 and r["delivered_per_s"] > 0, r
        assert r["cpu_seconds"] > 0 and r["peak_pss_mb"] > 0, r
    assert doc["meta"]["failure"] is None
    md = (out / "latest.md").read_text()
    assert "## c20-4k, relay" in md and "Postern/Postfix" in md, md
    # Everything it started is gone: its temporary directories and cgroups,
    # and the Maildir runs' messages (set aside between runs, then removed).
    assert os.listdir(work) == [], report
    home = pwd.getpwnam("ptbench").pw_dir
    assert not os.path.exists(os.path.join(home, "Maildir.bench-kept")), report
    for sub in ("new", "cur", "tmp"):
        d = os.path.join(home, "Maildir", sub)
        assert not os.path.isdir(d) or os.listdir(d) == [], (d, report)
    assert cgroups_left == set(), report
