"""pytest fixtures for Postern's integration tests (see postern_harness.py).

Run: ``/usr/bin/python3 -m pytest -q tests/`` (Debian's python3-pytest and
python3-aiosmtpd). Environment:
- ``POSTERN_BIN_DIR``: where the binaries are (default ``<repo>/target/debug``);
- ``POSTERN_KEEP_TMP=1``: keep every instance's directory (they are always
  kept, and named in the report, when a test fails).

Tests run side by side (pytest-xdist, ``-n 2``; scripts/test does that).
What keeps them apart:
- ports: each worker has its own range (postern_harness.free_port);
- directories: every instance makes its own (tempfile.mkdtemp);
- machine-wide state: a test that changes what every other test sees
  (``/etc/resolv.conf``, port 53) is marked ``@pytest.mark.exclusive`` and
  runs alone: every test holds a shared lock while it runs, an exclusive
  test holds it exclusively (and a gate lock first, so that it is not
  starved by the other workers' stream of shared holders). scripts/test
  runs them after the parallel pass, with the ``serial_last`` ones: in it,
  each stopped every worker until the tests running then had ended;
- a resource that only some tests share (the bench/ scripts' cgroups and
  the local user ptbench) is named with ``@pytest.mark.shares("name")``:
  tests with the same name never run at the same time.
The locks are files under /run/lock (or $TMPDIR), so they also keep apart
two pytest runs on one machine.
"""

import fcntl
import os
import shutil
import tempfile
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
    config.addinivalue_line(
        "markers", "exclusive: runs with no other test running at the same time "
        "(it changes machine-wide state, e.g. /etc/resolv.conf)")
    config.addinivalue_line(
        "markers", "shares(name): never runs at the same time as another test "
        "marked with the same name (a machine-wide resource they both use)")


# The files that take longest, slowest first. pytest-xdist (--dist
# loadfile) hands whole files to the workers in collection order, so a
# long file collected late (they are collected alphabetically) would run
# on alone at the end of the parallel pass while the other workers idle.
# Seconds per file (setup + call + teardown of its tests) in a whole run
# of scripts/test (6 workers, tmpfs) on a 2-core machine shared with other
# builds (load average 1 to 14, 8.5 on average), at c4d65d6:
SLOWEST_FIRST = [
    "test_quickstart.py",         # 445 (two builds of a fresh clone, at nice 10)
    "test_reject_unverified.py",  # 286 (a private Postfix per test)
    "test_delivery_shaping.py",   # 249 (2,000 messages at 20/s alone: 103)
    "test_milter.py",             # 219
    "test_smtp_client.py",        # 219
    "test_real_configs.py",       # 192
    "test_sql_tables.py",         # 183
    "test_tls_settings.py",       # 122 (testssl.sh)
    "test_bounds.py",             # 118 (50,000 recipients: 85)
    "test_bench_tls.py",          # 115 (shares "bench": kept apart from the other two)
    "test_accounting.py",         # 114
    "test_table_failures.py",     # 101
    "test_mta_sts.py",            # 98 (its exclusive test runs in the serial pass)
    "test_delivery_cluster.py",   # 98
    "test_smtputf8.py",           # 94
    "test_bigqueue.py",           # 89 (two 20,000-message queues)
    "test_dkim.py",               # 84
    "test_proxy_filter.py",       # 78
    "test_bench_smoke.py",        # 43 (shares "bench")
    "test_queue_tools.py",        # 74 (157 with its queues on the disk)
    "test_dane.py",               # 67 (its exclusive test runs in the serial pass)
    "test_admin_commands.py",     # 62
    "test_content_filter.py",     # 61
    "test_smtpd_restrictions_postconf.py",  # 60
    "test_secrets.py",            # 60
]
# The rest (each about a minute or less) keep their alphabetical order;
# among them test_bench_sqltables.py (23), the third "bench" file.


def _slowest_first(items):
    rank = {name: n for n, name in enumerate(SLOWEST_FIRST)}

    def key(item):
        return rank.get(item.nodeid.split("::", 1)[0].rsplit("/", 1)[-1], len(rank))
    items.sort(key=key)  # stable: the rest keep their order


def pytest_collection_modifyitems(session, config, items):
    """The slowest files first (SLOWEST_FIRST). Tests marked
    ``serial_last`` go after all the others, in their order (a parallel
    runner must also run them alone, after the rest)."""
    _slowest_first(items)
    last = [i for i in items if i.get_closest_marker("serial_last")]
    if last:
        items[:] = [i for i in items if not i.get_closest_marker("serial_last")] + last


def _lock_dir():
    for d in ("/run/lock", tempfile.gettempdir()):
        if os.path.isdir(d) and os.access(d, os.W_OK):
            return d
    return tempfile.gettempdir()


def _lock_file(name):
    """An open file to flock (read-only is enough for flock; the file may
    belong to another user who ran the tests before)."""
    path = os.path.join(_lock_dir(), f"postern-tests-{name}.lock")
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        fd = os.open(path, os.O_RDONLY | os.O_CREAT, 0o644)
    return os.fdopen(fd, "rb")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    """Holds the locks described in the module doc around the whole of one
    test: setup (fixtures included), call and teardown."""
    held = []
    try:
        if item.get_closest_marker("exclusive"):
            gate = _lock_file("gate")
            fcntl.flock(gate, fcntl.LOCK_EX)
            held.append(gate)
            main = _lock_file("main")
            fcntl.flock(main, fcntl.LOCK_EX)
            held.append(main)
        else:
            gate = _lock_file("gate")
            fcntl.flock(gate, fcntl.LOCK_SH)
            main = _lock_file("main")
            fcntl.flock(main, fcntl.LOCK_SH)
            held.append(main)
            gate.close()
        for name in sorted({m.args[0] for m in item.iter_markers("shares")}):
            f = _lock_file("shares-" + name)
            fcntl.flock(f, fcntl.LOCK_EX)
            held.append(f)
        yield
    finally:
        for f in reversed(held):
            f.close()


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
def receivers():
    """The scripted throttling receiver (tests/throttle_receiver.py):
    `make(**kw)` starts one; all are stopped at the end."""
    from throttle_receiver import ThrottleReceiver
    started = []

    def make(**kw):
        r = ThrottleReceiver(**kw).start()
        started.append(r)
        return r

    yield make
    for r in started:
        r.stop()


@pytest.fixture
def receiver(receivers):
    """One scripted throttling receiver with no limits set."""
    return receivers()


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
