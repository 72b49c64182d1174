"""pytest fixtures for Postern's integration tests (see postern_harness.py).

Run: ``/usr/bin/python3 -m pytest -q tests/`` (Debian's python3-pytest and
python3-aiosmtpd). Environment:
- ``POSTERN_BIN_DIR``: where the binaries are (default ``<repo>/target/debug``);
- ``POSTERN_KEEP_TMP=1``: keep every instance's directory (they are always
  kept, and named in the report, when a test fails).
"""

import os
import shutil
import warnings

import pytest

import postern_harness as h


def pytest_configure(config):
    config.addinivalue_line(
        "markers",
        "serial_last: runs alone and after every other test (it changes the "
        "machine: tests/test_package.py removes Postfix for a while)")
    config.addinivalue_line(
        "markers", "xdist_group(name): tests of one group run on one worker")


def pytest_collection_modifyitems(session, config, items):
    """Tests marked ``serial_last`` go after all the others, in their
    order (a parallel runner must also run them alone, after the rest)."""
    last = [i for i in items if i.get_closest_marker("serial_last")]
    if last:
        items[:] = [i for i in items if not i.get_closest_marker("serial_last")] + last


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    setattr(item, "rep_" + rep.when, rep)
    if rep.failed:
        # What the Postern instances of this test logged: the first thing a
        # reader of a failure needs.
        for p in getattr(item, "_posterns", []):
            text = p.log_tail(150)
            if p.fg_output.exists():
                text += p.fg_text()
            rep.sections.append((f"postern instance {p.dir} ({rep.when})", text))


def _failed(node):
    return any(getattr(getattr(node, "rep_" + w, None), "failed", False)
               for w in ("setup", "call"))


@pytest.fixture(scope="session")
def system_accounts():
    """As root: group postdrop and the mail_owner user ``postern``."""
    h.ensure_system_accounts()


@pytest.fixture(scope="session")
def local_users(system_accounts):
    """The local users ptalice and ptbob; skips the test when not root."""
    if not h.is_root():
        pytest.skip("needs root (local users ptalice and ptbob)")
    h.ensure_local_users()
    return h.LOCAL_USERS


@pytest.fixture(scope="session")
def optional_local_users(system_accounts):
    """Like local_users, but None instead of a skip when not root."""
    if not h.is_root():
        return None
    h.ensure_local_users()
    return h.LOCAL_USERS


@pytest.fixture
def make_postern(request, system_accounts):
    """Factory: ``make_postern(params=None, files=None, start=True,
    fg=False, master_cf_extra=(), master_cf_omit=())`` -> a Postern (started unless
    start=False; with ``postern start``, or ``start-fg`` if fg=True).
    Every instance is stopped at teardown; its directory is removed unless
    the test failed or POSTERN_KEEP_TMP is set."""
    instances = []
    request.node._posterns = instances

    def make(params=None, files=None, start=True, fg=False, master_cf_extra=(),
             master_cf_omit=()):
        missing = h.missing_binaries()
        if missing:
            pytest.fail(f"Postern binaries missing in {h.BIN_DIR}: {', '.join(missing)} "
                        "(run `cargo build --workspace`, or set POSTERN_BIN_DIR)")
        p = h.Postern(params=params, files=files, master_cf_extra=master_cf_extra,
                      master_cf_omit=master_cf_omit)
        instances.append(p)
        if start:
            p.start_fg() if fg else p.start()
        return p

    yield make
    keep = _failed(request.node) or bool(os.environ.get("POSTERN_KEEP_TMP"))
    errors = []
    for p in reversed(instances):
        try:
            p.cleanup(keep=keep)
        except Exception as e:  # teardown must reach every instance
            errors.append(f"{p.dir}: {e!r}")
        if keep:
            print(f"kept Postern directory {p.dir}")
        if p.stop_problems:
            warnings.warn(f"Postern in {p.dir} did not stop cleanly: {p.stop_problems}")
    if errors:
        pytest.fail("stopping Postern failed: " + "; ".join(errors))


@pytest.fixture
def postern(make_postern):
    """A started Postern with the default test configuration."""
    return make_postern()


@pytest.fixture
def sink():
    """An aiosmtpd receiver on 127.0.0.1 (see postern_harness.Sink)."""
    s = h.Sink().start()
    yield s
    s.stop()


@pytest.fixture
def dnsmasq():
    """Factory: ``dnsmasq(["--mx-host=...", "--address=/name/ip"])`` -> a
    started Dnsmasq (``.port``); stopped by PID at teardown."""
    if not h.dnsmasq_binary():
        pytest.skip("dnsmasq is not installed (scripts/test installs dnsmasq-base)")
    started = []

    def start(args):
        d = h.Dnsmasq(args)
        started.append(d)
        return d.start()

    yield start
    for d in started:
        d.stop()


@pytest.fixture
def smtp_sink():
    """Factory: ``smtp_sink(extra_args=())`` -> a started Postfix smtp-sink."""
    if not os.access(h.SmtpSink.BINARY, os.X_OK):
        pytest.skip("smtp-sink is not installed (scripts/test installs postfix)")
    started = []

    def start(extra_args=()):
        s = h.SmtpSink(extra_args)
        started.append(s)
        return s.start()

    yield start
    for s in started:
        s.stop()


@pytest.fixture(scope="session")
def swaks():
    path = shutil.which("swaks")
    if not path:
        pytest.skip("swaks is not installed (scripts/test installs it)")
    return path
