"""The manual pages: every page renders without a warning, the pages an
administrator looks up exist, scripts/install puts each into its section's
directory, and the file-format pages (section 5) name no parameter that
Postern does not know (issue #17 point 8)."""

import filecmp
import os
import re
import shutil
import subprocess

import pytest

import postern_harness as h

MAN = h.REPO / "man"
# The pages scripts/install installs: man/*.[158].
PAGES = sorted(p for p in MAN.iterdir() if re.fullmatch(r"[A-Za-z_0-9.-]+\.[158]", p.name))

# The pages issue #17 names (postconf.5 is generated from the parameter
# table; generic.5 says what Postern does instead of smtp_generic_maps).
REQUIRED = ("postconf.5", "master.5", "access.5", "transport.5", "virtual.5",
            "aliases.5", "canonical.5", "header_checks.5", "generic.5", "relocated.5")

# Words with underscores in section-5 pages that are not parameters:
# smtpd restrictions, canonical_classes values, a log field, and a name
# an example defines for itself in main.cf.
NOT_PARAMETERS = {
    "check_client_access", "check_helo_access", "check_sender_access",
    "check_recipient_access", "permit_mynetworks", "permit_sasl_authenticated",
    "permit_auth_destination", "reject_unauth_destination", "defer_unauth_destination",
    "reject_unknown_sender_domain",
    "envelope_sender", "envelope_recipient", "header_sender", "header_recipient",
    "orig_to", "mua_client_restrictions",
    # Names of the table pages themselves.
    "pcre_table", "socketmap_table", "tcp_table",
    # A value of receive_override_options.
    "no_header_body_checks",
    # Fields of the accounting log's records and of the class log line
    # (accounting(5), bounce_classes(5)), the page names, a log reader.
    "bounce_class", "bounce_classification", "egress_pool", "egress_source",
    "enhanced_code", "num_attempts", "peer_address", "tls_cipher", "tls_protocol_version",
    "bounce_classes", "regexp_table", "postfix_exporter",
}
# The settings of the .cf files of database tables (mysql_table(5), ...).
NOT_PARAMETERS |= {
    "select_field", "where_field", "additional_conditions", "result_format",
    "expansion_limit", "option_file", "option_group", "tls_cert_file", "tls_key_file",
    "tls_verify_cert", "tls_ciphers", "require_result_set", "retry_interval",
    "select_function", "server_host", "server_port", "search_base", "query_filter",
    "result_attribute", "special_result_attribute", "terminal_result_attribute",
    "leaf_result_attribute", "recursion_limit", "bind_dn", "bind_pw", "start_tls",
    "tls_ca_cert_file", "tls_ca_cert_dir", "tls_cert", "tls_key", "tls_cipher_suite",
    "tls_require_cert", "size_limit", "chase_referrals", "mysql_real_escape_string",
    "sqlite_table", "pgsql_table", "mysql_table", "ldap_table",
}
# The settings of a delivery_policy_maps value (delivery_policy in qmgr(8)),
# which accounting(5) names as the rule of a record.
NOT_PARAMETERS |= {"max_connect_failures"}
# Fields of a pooled delivery's accounting record (accounting(5)).
NOT_PARAMETERS |= {"source_selection"}


def test_every_page_is_found():
    names = {p.name for p in PAGES}
    missing = [r for r in REQUIRED if r not in names]
    assert not missing, f"pages missing from man/: {missing}"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_page_renders_without_warnings(page):
    if not shutil.which("groff"):
        pytest.fail("groff is not installed (Debian package groff-base; scripts/test installs it)")
    r = subprocess.run(["groff", "-ww", "-man", "-Tutf8", str(page)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stderr == "", f"{page.name}: {r.stderr}"
    assert len(r.stdout.splitlines()) > 10, f"{page.name} renders almost nothing"
    # The title names the page: man(1) and whatis(1) go by it.
    name, sect = page.name.rsplit(".", 1)
    th = next(line for line in page.read_text().splitlines() if line.startswith(".TH"))
    words = th.split()
    assert words[1].lower() == name.lower() and words[2] == sect, f"{page.name}: {th}"
    text = page.read_text()
    assert ".SH NAME" in text and re.search(r'^\.SH "?SEE ALSO"?$', text, re.M), page.name


def test_install_puts_every_page_in_its_section(tmp_path):
    # The programs install requires, as small files: this test is about the
    # pages, and a debug build is a gigabyte to copy (test_webhost.py
    # installs the real programs).
    bindir = tmp_path / "bin"
    bindir.mkdir()
    for prog in ("postern", "sendmail", "postdrop", "master", "smtpd", "cleanup", "qmgr",
                 "pickup", "smtp", "local"):
        (bindir / prog).write_text("#!/bin/sh\nexit 0\n")
        (bindir / prog).chmod(0o755)
    root = tmp_path / "root"
    r = h.run([h.REPO / "scripts" / "install", "--destdir", root, "--bin-dir", bindir,
               "--no-build", "--no-accounts"])
    assert r.returncode == 0, h.describe(r)
    mandir = root / "usr/share/man"
    for page in PAGES:
        sect = page.name.rsplit(".", 1)[1]
        installed = mandir / f"man{sect}" / page.name
        assert installed.is_file(), f"{page.name} is not installed in man{sect}/"
        assert filecmp.cmp(page, installed, shallow=False), page.name
    # body_checks(5) leads to header_checks(5), as in Postfix.
    link = mandir / "man5/body_checks.5"
    assert link.is_symlink() and os.path.realpath(link) == str(mandir / "man5/header_checks.5")
    # man(1) finds a section-5 page there by name.
    if shutil.which("man"):
        r = subprocess.run(["man", "-M", str(mandir), "-w", "5", "transport"],
                           capture_output=True, text=True, timeout=60)
        assert r.stdout.strip() == str(mandir / "man5/transport.5"), r.stdout + r.stderr


def _plain(source):
    """The page's text without font changes and escapes, leaving out its
    NOT IMPLEMENTED section (which names Postfix's parameters that Postern
    does not have)."""
    out, skip = [], False
    for line in source.splitlines():
        if line.startswith(".SH"):
            skip = "NOT IMPLEMENTED" in line
        if skip or line.startswith(('.\\"', "'\\\"")):
            continue
        line = re.sub(r"\\f[BIRP]|\\f\(..|\\&|\\\(..", "", line)
        out.append(line.replace("\\-", "-").replace("\\e", "\\"))
    return "\n".join(out)


def _parameter_words(page):
    text = _plain(page.read_text())
    # Names with underscores, not parts of paths or file names.
    return set(re.findall(r"(?<![\w/.-])([a-z][a-z0-9]*(?:_[a-z0-9]+)+)(?![\w/-]|\.\w)", text))


def test_section_5_pages_name_only_known_parameters(tmp_path):
    # postconf.5 is generated from the parameter table itself.
    pages = [p for p in PAGES if p.name.endswith(".5") and p.name != "postconf.5"]
    assert pages
    words = {}
    for page in pages:
        for w in _parameter_words(page) - NOT_PARAMETERS:
            words.setdefault(w, []).append(page.name)
    assert "transport_maps" in words and "virtual_alias_maps" in words  # the scan works
    conf = tmp_path / "conf"
    conf.mkdir()
    (conf / "main.cf").write_text("")
    names = sorted(words)
    r = h.run([h.BIN_DIR / "postconf", "-c", conf, "-d", *names])
    assert r.returncode == 0, h.describe(r)
    known = {line.split(" =", 1)[0] for line in r.stdout.splitlines() if " =" in line}
    unknown = {n: words[n] for n in names if n not in known}
    assert not unknown, f"section-5 pages name parameters postconf -d does not know: {unknown}"
