"""postconf as Postfix 3.7's: master.cf (-M, -F, -P, -X, -#, edits), the
parameter list (-d, -n, -h, -H, -x, -X, -#), what the build offers (-l, -m,
-a, -A, -T), and postconf(5) made from the parameter table.

Where Postfix's answer is defined by the same files, the test runs
Postfix's own /usr/sbin/postconf on a private copy of the configuration and
compares outputs line for line."""

import os
import shutil
import subprocess
from pathlib import Path

import pytest

import postern_harness as h

POSTCONF = h.BIN_DIR / "postconf"
PF_POSTCONF = Path("/usr/sbin/postconf")
MASTER_DIST = Path("/usr/share/postfix/master.cf.dist")
DEBIAN_MAIN_CF = Path("/etc/postfix/main.cf")
MAN_PAGE = h.REPO / "man" / "postconf.5"

# master.cf cases Postfix's layout has rules for: -o in its three
# spellings, options after arguments, a long pipe command, a comment
# between continuation lines, a name wider than its column.
TRICKY_MASTER_CF = """\
# top comment
smtp      inet  n       -       y       -       -       smtpd
submission inet n       -       y       -       -       smtpd
  -o syslog_name=postfix/submission
  -o { smtpd_banner = a b c }
  -osmtpd_x=1
pickup    unix  n       -       y       60      1       pickup

relay     unix  -       -       y       -       -       smtp
        -o syslog_name=postfix/$service_name
long-service-name unix - n n - 2 pipe flags=R user=nobody argv=/a/very/long/path/name/that/is/quite/long/for/the/fold ${nexthop} ${user}
x         unix  -       -       -       -       -       smtp -o a=b extra1 -o c=d
postlog   unix-dgram n  -       n       -       1       postlogd
"""


def need_postfix():
    if not os.access(PF_POSTCONF, os.X_OK):
        pytest.skip("Postfix's postconf is not installed (scripts/test installs postfix)")


@pytest.fixture(autouse=True)
def binary():
    if not os.access(POSTCONF, os.X_OK):
        pytest.fail(f"{POSTCONF} missing (run `cargo build --workspace`)")


def debian_main_cf():
    """Debian's main.cf as installed (without the directories other tests
    add for their private Postfix instances)."""
    if not DEBIAN_MAIN_CF.exists():
        pytest.skip("no /etc/postfix/main.cf")
    lines = [l for l in DEBIAN_MAIN_CF.read_text().splitlines()
             if not l.startswith("alternate_config_directories")]
    return "\n".join(lines) + "\n"


@pytest.fixture
def confdir(tmp_path):
    """A configuration directory with Debian's main.cf and Postfix 3.7's
    stock master.cf."""
    d = tmp_path / "etc"
    d.mkdir()
    (d / "main.cf").write_text(debian_main_cf())
    if MASTER_DIST.exists():
        shutil.copy(MASTER_DIST, d / "master.cf")
    else:
        (d / "master.cf").write_text(TRICKY_MASTER_CF)
    return d


def ours(d, *args):
    return h.run([POSTCONF, "-c", d, *args])


def theirs(d, *args):
    return h.run([PF_POSTCONF, "-c", d, *args])


def same_stdout(d, *args):
    a, b = ours(d, *args), theirs(d, *args)
    assert a.returncode == b.returncode == 0, h.describe(a) + h.describe(b)
    assert a.stdout == b.stdout, f"postconf {' '.join(args)}:\n--- Postern\n{a.stdout}\n--- Postfix\n{b.stdout}"
    return a


@pytest.mark.parametrize("master", ["stock", "tricky"])
@pytest.mark.parametrize("args", [["-M"], ["-Mf"], ["-F"], ["-P"], ["-M", "relay/unix"],
                                  ["-M", "smtp"], ["-M", "*/unix"], ["-F", "pickup/unix/wakeup"],
                                  ["-F", "*/*/command"], ["-P", "*/*/syslog_name"],
                                  ["-hF", "pickup/unix/command"], ["-HP"]])
def test_master_cf_shown_as_postfix(confdir, master, args):
    need_postfix()
    if master == "tricky":
        (confdir / "master.cf").write_text(TRICKY_MASTER_CF)
    same_stdout(confdir, *args)


def test_master_cf_requests_errors(confdir):
    r = ours(confdir, "-M", "nosuch/unix")
    assert r.returncode == 0 and r.stdout == "", h.describe(r)
    assert 'unmatched request: "nosuch/unix"' in r.stderr, h.describe(r)
    r = ours(confdir, "-F", "smtp/inet/bogus")
    assert r.returncode != 0 and 'invalid service attribute name: "bogus"' in r.stderr, h.describe(r)
    r = ours(confdir, "-hM")
    assert r.returncode != 0 and "-M" in r.stderr, h.describe(r)


def edit_both(tmp_path, master_text, *args):
    """Runs the same edit with Postern's and Postfix's postconf on two
    copies; returns (Postern's master.cf, Postfix's master.cf)."""
    out = []
    for prog in (POSTCONF, PF_POSTCONF):
        d = tmp_path / prog.parent.name.replace("/", "_") / "etc"
        if d.exists():
            shutil.rmtree(d)
        d.mkdir(parents=True)
        (d / "main.cf").write_text("")
        (d / "master.cf").write_text(master_text)
        r = h.run([prog, "-c", d, *args])
        assert r.returncode == 0, h.describe(r)
        out.append((d / "master.cf").read_text())
    return out


# Edits whose result Postfix defines, on a master.cf with comments only
# before the first service: Postfix takes the comment lines after a
# service for part of it and moves them above it when it rewrites it;
# Postern leaves them where they are (test below).
EDIT_MASTER_CF = """\
# top comment

# another
smtp      inet  n       -       y       -       -       smtpd
submission inet n       -       y       -       -       smtpd
  -o syslog_name=postfix/submission
  -o smtpd_tls_auth_only=yes
pickup    unix  n       -       y       60      1       pickup
relay     unix  -       -       y       -       -       smtp
        -o syslog_name=postfix/$service_name
maildrop  unix  -       n       n       -       -       pipe
  flags=DRXhu user=vmail argv=/usr/bin/maildrop -d ${recipient}
"""


@pytest.mark.parametrize("args", [
    ["-P", "submission/inet/smtpd_tls_auth_only=no", "submission/inet/new_p=5"],
    ["-e", "-P", "relay/unix/smtp_helo_name=xy", "relay/unix/empty="],
    ["-PX", "submission/inet/syslog_name"],
    ["-F", "pickup/unix/wakeup=30", "smtp/inet/command=smtpd -v"],
    ["-F", "relay/unix/chroot=n"],
    ["-M", "pickup/unix=pickup unix n - n 30 1 pickup -v", "new/unix=new unix - - n - - smtp"],
    ["-MX", "relay/unix"],
    ["-M#", "submission/inet"],
    ["-M#", "maildrop/unix"],
])
def test_master_cf_edits_as_postfix(tmp_path, args):
    need_postfix()
    a, b = edit_both(tmp_path, EDIT_MASTER_CF, *args)
    assert a == b, f"postconf {' '.join(args)}:\n--- Postern\n{a}\n--- Postfix\n{b}"


def test_master_cf_edit_keeps_comments_and_refuses_bad_values(tmp_path):
    d = tmp_path / "etc"
    d.mkdir()
    (d / "main.cf").write_text("")
    (d / "master.cf").write_text(TRICKY_MASTER_CF)
    r = ours(d, "-F", "pickup/unix/wakeup=30")
    assert r.returncode == 0, h.describe(r)
    text = (d / "master.cf").read_text()
    assert text.startswith("# top comment\n")
    assert "pickup     unix  n       -       y       30      1       pickup\n\nrelay " in text
    # Untouched entries keep their layout byte for byte.
    assert "  -o { smtpd_banner = a b c }\n" in text
    before = text
    r = ours(d, "-F", "pickup/unix/private=maybe")
    assert r.returncode != 0 and "maybe" in r.stderr, h.describe(r)
    assert (d / "master.cf").read_text() == before
    r = ours(d, "-M", "pickup/unix=pickup unix n")
    assert r.returncode != 0, h.describe(r)
    assert (d / "master.cf").read_text() == before
    # A value with spaces (Postfix 3.7 refuses it) is written in braces.
    r = ours(d, "-P", "submission/inet/smtpd_banner=x y z")
    assert r.returncode == 0, h.describe(r)
    assert "    -o {smtpd_banner=x y z}\n" in (d / "master.cf").read_text()
    r = ours(d, "-P", "submission/inet/smtpd_banner")
    assert r.stdout == "submission/inet/smtpd_banner = x y z\n", h.describe(r)
    # -PX of a parameter that is not there.
    r = ours(d, "-PX", "submission/inet/no_such")
    assert r.returncode == 0 and "unmatched request" in r.stderr, h.describe(r)


def test_defaults_count_within_ten_percent_of_postfix(confdir):
    need_postfix()
    a, b = ours(confdir, "-d"), theirs(confdir, "-d")
    assert a.returncode == 0 and b.returncode == 0, h.describe(a)
    n_ours, n_theirs = len(a.stdout.splitlines()), len(b.stdout.splitlines())
    assert abs(n_ours - n_theirs) <= n_theirs // 10, (n_ours, n_theirs)
    names_ours = {l.split(" =")[0] for l in a.stdout.splitlines()}
    missing = {l.split(" =")[0] for l in b.stdout.splitlines()} - names_ours
    assert not missing, f"Postfix parameters postconf -d does not list: {sorted(missing)}"


def test_debian_main_cf_gives_no_unused_parameter_warning(confdir, make_postern):
    for args in (["-n"], []):
        r = ours(confdir, *args)
        assert r.returncode == 0, h.describe(r)
        assert "unused parameter" not in r.stderr, h.describe(r)
    # The same settings in a working instance: postern check says nothing
    # about them (other settings the instance needs stay as they are).
    p = make_postern(start=False)
    text = p.main_cf.read_text()
    for line in debian_main_cf().splitlines():
        name = line.split("=")[0].strip()
        if line and not line.startswith(("#", " ", "\t")) and name not in p.params:
            text += line + "\n"
    p.main_cf.write_text(text)
    r = p.postern("check")
    assert "unused parameter" not in r.stderr, h.describe(r)
    for name in ("compatibility_level", "biff", "readme_directory",
                 "smtp_tls_session_cache_database"):
        assert name in text
    # A name that is neither Postern's nor Postfix's still warns.
    (confdir / "main.cf").write_text(debian_main_cf() + "no_such_parameter_at_all = 1\n")
    r = ours(confdir, "-n")
    assert "unused parameter: no_such_parameter_at_all" in r.stderr, h.describe(r)


def test_non_default_and_postfix_only_values_as_postfix(confdir):
    need_postfix()
    same_stdout(confdir, "-n")
    same_stdout(confdir, "-nh")
    same_stdout(confdir, "-nH")
    same_stdout(confdir, "-d", "biff", "readme_directory", "smtpd_milters",
                "postscreen_greet_wait", "relay_destination_concurrency_limit")
    same_stdout(confdir, "compatibility_level", "smtp_tls_session_cache_database")
    same_stdout(confdir, "-x", "smtp_tls_CApath", "mydestination", "uucp_delivery_slot_cost",
                "postscreen_greet_wait", "smtpd_tls_ciphers")
    same_stdout(confdir, "-p", "recipient_delimiter")
    same_stdout(confdir, "-o", "relayhost=[x]", "relayhost")


def test_main_cf_remove_and_comment_out_as_postfix(tmp_path):
    need_postfix()
    text = "a_x = 1\nmyorigin = b\n  more\n# c\nrelayhost = x\nmyorigin = z\n"
    for args in (["-#", "myorigin"], ["-X", "myorigin", "relayhost"],
                 ["-e", "relayhost=[y]", "myorigin=q"]):
        results = []
        for prog in (POSTCONF, PF_POSTCONF):
            d = tmp_path / f"{prog.parent.name}-{args[0].strip('-#') or 'hash'}"
            d.mkdir(exist_ok=True)
            (d / "main.cf").write_text(text)
            (d / "master.cf").write_text("")
            r = h.run([prog, "-c", d, *args])
            assert r.returncode == 0, h.describe(r)
            results.append((d / "main.cf").read_text())
        assert results[0] == results[1], f"postconf {' '.join(args)}:\n{results[0]}\n---\n{results[1]}"


def test_build_information(confdir):
    r = ours(confdir, "-l")
    assert r.returncode == 0 and r.stdout.split() == ["fcntl", "dotlock"], h.describe(r)
    r = ours(confdir, "-m")
    types = r.stdout.split()
    assert {"hash", "cdb", "lmdb", "texthash", "regexp", "pcre", "cidr", "inline", "static"} <= set(types)
    # Each file type listed is one Postern's postmap builds and reads.
    src = confdir / "t"
    src.write_text("k v\n")
    for t in ("hash", "cdb", "lmdb", "btree"):
        if t in types:
            r = h.run([h.BIN_DIR / "postmap", f"{t}:{src}"])
            assert r.returncode == 0, h.describe(r)
            r = h.run([h.BIN_DIR / "postmap", "-q", "k", f"{t}:{src}"])
            assert r.stdout.strip() == "v", (t, h.describe(r))
    r = ours(confdir, "-a")
    assert r.stdout.split() == ["dovecot"], h.describe(r)
    r = ours(confdir, "-A")
    assert r.stdout.split() == ["cyrus"], h.describe(r)
    for what in ("compile-version", "run-version"):
        r = ours(confdir, "-T", what)
        assert r.returncode == 0 and r.stdout.startswith("rustls 0."), h.describe(r)
    r = ours(confdir, "-T", "public-key-algorithms")
    assert {"rsa", "ecdsa"} <= set(r.stdout.split()), h.describe(r)
    r = ours(confdir, "-T", "bogus")
    assert r.returncode == 64 and len(r.stderr.splitlines()) == 1, h.describe(r)


def test_man_page_is_generated_and_clean():
    r = h.run([POSTCONF, "--man"])
    assert r.returncode == 0, h.describe(r)
    assert MAN_PAGE.read_text() == r.stdout, \
        "man/postconf.5 differs from `postconf --man`: regenerate it (postconf --man > man/postconf.5)"
    g = subprocess.run(["groff", "-ww", "-man", "-Tutf8", "-z", str(MAN_PAGE)],
                       capture_output=True, text=True, timeout=60)
    assert g.returncode == 0 and g.stderr == "", g.stderr
    # Every Postfix parameter has its entry, with its status.
    if os.access(PF_POSTCONF, os.X_OK):
        names = [l.split(" =")[0] for l in h.run([PF_POSTCONF, "-d"]).stdout.splitlines()]
        page = MAN_PAGE.read_text()
        missing = [n for n in names if f".B {n}\n" not in page
                   and not n.endswith(("_delivery_slot_cost", "_time_limit", "_recipient_limit",
                                       "_concurrency_limit", "_rate_delay", "_slots",
                                       "_discount", "_loan", "_feedback", "_cohort_limit",
                                       "_refill_delay", "_refill_limit",
                                       "_initial_destination_concurrency"))]
        assert not missing, missing
