"""bench/sqltables on a tiny load: the private MariaDB with its 100,000
mailboxes, Postfix and Postern on the same proxy:mysql: files, and the
benchmark's own checks (every unknown recipient refused with 550, every
known one relayed once, no temporary failure) passing for both. Checks
the machinery, not speed: debug binaries of ``POSTERN_BIN_DIR``, nothing
timed.
"""

import os
import re
import shutil
import tempfile
from pathlib import Path

import pytest

import postern_harness as h
from table_servers import mariadb_available

# The bench/ scripts share the cgroups named ptbench-* and the local user
# ptbench (tests/conftest.py).
pytestmark = pytest.mark.shares("bench")

BENCH = h.REPO / "bench" / "sqltables"


def test_sqltables_bench_checks_both_mtas(tmp_path, system_accounts):
    if not h.is_root():
        pytest.skip("bench/sqltables needs root (MariaDB, cgroups, Postfix)")
    if not mariadb_available():
        pytest.fail("mariadb-server is not installed (scripts/test installs it)")
    missing = h.missing_binaries()
    assert not missing, f"Postern binaries missing in {h.BIN_DIR}: {missing}"
    out = tmp_path / "sqltables.md"
    # Short: Postfix's socket paths under queue/ stay below 108 bytes.
    work = Path(tempfile.mkdtemp(prefix="ptq-"))
    os.chmod(work, 0o755)
    try:
        p, report = h.run_bench(BENCH, ["-m", 60, "-r", 3, "-s", 5, "--no-build",
                                        "--postern-bin", h.BIN_DIR, "--out", out,
                                        "--tmp", work, "--settle", 0.2])
        assert p.returncode == 0, report
        md = out.read_text()
        assert "Checks passed" in md and "18 unknown" in md, report
        # Both MTAs measured: every row has a figure for each.
        row = re.search(r"^\| peak database connections[^|]*\| (\d+) \| (\d+) \|", md, re.M)
        assert row and int(row.group(1)) >= 1 and int(row.group(2)) >= 1, md
        assert re.search(r"^\| SELECTs the tables' user ran \| [\d,]+ \| [\d,]+ \|", md, re.M), md
    finally:
        shutil.rmtree(work, ignore_errors=True)
