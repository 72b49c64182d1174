"""Real Postfix configurations (issue #27): the main.cf and master.cf of
public mail stacks, as their projects ship them (tests/data/stacks/NAME/,
see each README), with only paths, ports and template placeholders filled
in, composed as each stack's installer composes them (stack_texts) and
with the settings its installer or start-up scripts add.

- ``postern check`` passes where Postfix's ``postfix check`` passes, and
  where the stack needs what Postern lacks it fails (and ``postern start``
  with it), naming each with its file and line: mailcow as shipped needs
  the PROXY protocol, so Postern refuses to start it (its milters are
  honoured since issue #21);
- Postern's ``postconf -n`` warns about no parameter Postfix's own
  postconf knows;
- Debian's default, docker-mailserver, iRedMail and mailcow (without its
  milter and PROXY-protocol settings, taken out of both copies alike: see
  its test) are each given to a private Postfix and to Postern
  (compare(): the same probe on each):
  the same resolution of each address (Postfix's trivial-rewrite asked
  directly), the same RCPT TO replies; for docker-mailserver, iRedMail
  and mailcow also the same delivery of a message to an alias (to the
  same Maildir, through Dovecot LMTP; iRedMail's through amavisd-new and
  its SQL tables in MariaDB, mailcow's through its SQL queries on its
  own schema in MariaDB) and the same submission replies (Dovecot SASL)
  with and without authentication;
- each broken piece of the issue fails ``postern check`` with a one-line
  reason, and the pieces that used to be misread now mean what they mean
  in Postfix (a hyphenated per-service name, a ``/file/name`` or
  ``type:table`` in a domain list, ``-o cleanup_service_name``).
"""

import os
import pwd
import re
import shutil
import smtplib
import tempfile
from pathlib import Path

import pytest

import postern_harness as h
from postfix_peer import POSTCONF as PF_POSTCONF
from postfix_peer import POSTFIX, TestCA, _edit_alternate_dirs, postfix_available
from dovecot import dovecot  # noqa: F401  (the fixture)

STACKS = Path(__file__).parent / "data" / "stacks"

pytestmark = pytest.mark.skipif(
    not (postfix_available() and h.is_root()),
    reason="needs root and Postfix installed (scripts/test installs it)")


@pytest.fixture
def work():
    """A directory every daemon can read (pytest's tmp_path is root-only)."""
    d = Path(tempfile.mkdtemp(prefix="pt-stacks-"))
    d.chmod(0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


# iRedMail's AMAVISD_CONTENT_FILTER_ORIGINATING (conf/amavisd).
IREDMAIL_ORIGINATING = "smtp-amavis:[127.0.0.1]:10026"


def placeholders(stack, d, ca):
    """(old, new) text replacements for `stack`: paths into `d`, the test
    certificate, and the installer's template placeholders."""
    etc = d / "etc"
    common = [("/etc/aliases", f"{etc}/aliases")]
    if stack == "debian":
        # Debian's postinst writes the host name.
        return common + [("myhostname = vm", "myhostname = mx.debian.test"),
                         (", vm,", ", mx.debian.test,"),
                         ("/etc/ssl/certs/ssl-cert-snakeoil.pem", str(ca.cert_file)),
                         ("/etc/ssl/private/ssl-cert-snakeoil.key", str(ca.key_file))]
    if stack == "docker-mailserver":
        return common + [("/etc/postfix/", f"{etc}/"),
                         ("/etc/ssl/private/ssl-cert-snakeoil.key", str(ca.key_file)),
                         ("/etc/ssl/certs/ssl-cert-snakeoil.pem", str(ca.cert_file)),
                         ("/dev/shm/sasl-auth.sock", f"{d}/sasl-auth.sock")]
    if stack == "mailcow":
        return common + [("/opt/postfix/conf/", f"{etc}/"),
                         ("/etc/ssl/mail/cert.pem", str(ca.cert_file)),
                         ("/etc/ssl/mail/key.pem", str(ca.key_file)),
                         ("/etc/ssl/certs/ca-certificates.crt", str(ca.ca_file))]
    if stack == "iredmail":
        ph = {
            "PH_QUEUE_DIRECTORY": f"{d}/queue", "PH_DATA_DIRECTORY": f"{d}/data",
            "PH_COMMAND_DIRECTORY": "/usr/sbin", "PH_DAEMON_DIRECTORY": "/usr/lib/postfix/sbin",
            "PH_MAIL_OWNER": "postfix",
            "PH_SENDMAIL_PATH": "/usr/sbin/sendmail", "PH_NEWALIASES_PATH": "/usr/bin/newaliases",
            "PH_MAILQ_PATH": "/usr/bin/mailq", "PH_SETGID_GROUP": "postdrop",
            "PH_SSL_KEY_FILE": str(ca.key_file), "PH_SSL_CERT_FILE": str(ca.cert_file),
            "PH_SSL_CA_FILE": str(ca.ca_file), "PH_SSL_CERT_DIR": str(ca.dir),
            "PH_SSL_DH512_PARAM_FILE": f"{etc}/dh512.pem",
            "PH_SSL_DH1024_PARAM_FILE": f"{etc}/dh2048.pem",
            "PH_POSTFIX_FILE_HEADER_CHECKS": f"{etc}/header_checks.pcre",
            "PH_POSTFIX_FILE_BODY_CHECKS": f"{etc}/body_checks.pcre",
            "PH_POSTFIX_FILE_SMTPD_COMMAND_FILTER": f"{etc}/command_filter.pcre",
            "PH_POSTFIX_FILE_HELO_ACCESS": f"{etc}/helo_access.pcre",
            "PH_POSTFIX_FILE_SENDER_ACCESS": f"{etc}/sender_access.pcre",
            "PH_IREDAPD_SERVER_ADDRESS": "127.0.0.1", "PH_IREDAPD_LISTEN_PORT": "7777",
            "PH_IREDAPD_SRS_FORWARD_PORT": "7778", "PH_IREDAPD_SRS_REVERSE_PORT": "7779",
            "PH_DOVECOT_SERVICE_QUOTA_STATUS_PORT": "12340",
            "PH_SYS_USER_VMAIL_UID": "2000", "PH_SYS_GROUP_VMAIL_GID": "2000",
            "PH_STORAGE_BASE_DIR": f"{d}/vmail", "PH_HOSTNAME": "mx.iredmail.test",
            "PH_POSTFIX_DEFAULT_DB_TYPE": "hash", "PH_POSTFIX_FILE_ALIASES": f"{etc}/aliases",
            "PH_MESSAGE_SIZE_LIMIT_BYTES": "15728640",
            "PH_AMAVISD_CONTENT_FILTER_ORIGINATING": IREDMAIL_ORIGINATING,
            "PH_SYS_USER_VMAIL": "vmail", "PH_SYS_GROUP_VMAIL": "vmail",
            "PH_DOVECOT_DELIVER_BIN": "/usr/lib/dovecot/deliver",
            "PH_SYS_USER_MLMMJ": "mlmmj", "PH_SYS_GROUP_MLMMJ": "mlmmj",
            "PH_CMD_MLMMJ_AMIME_RECEIVE": "/usr/bin/mlmmj-amime-receive",
            "PH_MLMMJ_SPOOL_DIR": f"{d}/mlmmj", "PH_AMAVISD_MAX_SERVERS": "2",
            "PH_LOCAL_ADDRESS": "127.0.0.1", "PH_POSTFIX_MAIL_REINJECT_PORT": "10025",
            "PH_POSTFIX_MLMMJ_REINJECT_PORT": "10028", "PH_AMAVISD_MYNETWORKS": "127.0.0.0/8",
            # The files its installer appends (main.cf.mysql, .postscreen,
            # .dovecot, .amavisd) and the SQL client files it copies.
            "PH_POSTFIX_LOOKUP_DIR": f"{etc}/mysql", "PH_SQL_SERVER_ADDRESS": "127.0.0.1",
            "PH_SQL_SERVER_PORT": "3306", "PH_VMAIL_DB_BIND_USER": "vmail",
            "PH_VMAIL_DB_BIND_PASSWD": "vmail-secret", "PH_VMAIL_DB_NAME": "vmail",
            "PH_POSTSCREEN_FILE_DNSBL_REPLY": f"{etc}/postscreen_dnsbl_reply",
            "PH_POSTSCREEN_FILE_ACCESS_CIDR": f"{etc}/postscreen_access.cidr",
            "PH_DOVECOT_SASL_AUTH_SOCKET": "private/dovecot-auth", "PH_TRANSPORT": "dovecot",
            "PH_SMTP_SERVER": "127.0.0.1", "PH_AMAVISD_ORIGINATING_PORT": "10026",
        }
        # Longest first: PH_SSL_CERT_DIR must not eat PH_SSL_CERT_FILE.
        return common + sorted(ph.items(), key=lambda kv: -len(kv[0]))
    raise AssertionError(stack)


# Data files the stacks' installers or start-up scripts create (contents
# made up for the test; they are not part of the shipped configuration).
# docker-mailserver's start-up scripts write /etc/postfix/vhost (the
# domains of its accounts and of postfix-virtual.cf, sorted),
# /etc/postfix/virtual (a copy of postfix-virtual.cf: aliases, forwards,
# catch-alls) and /etc/postfix/vmailbox ("LOGIN DOMAIN/USER/" per
# account): scripts/helpers/{postfix,aliases,accounts}.sh.
DATA_FILES = {
    "docker-mailserver": {
        "vhost": "catchall.test\nhosted.test\n",
        "virtual": "alias@hosted.test user@hosted.test\n"
                   "forward@hosted.test someone@elsewhere.test\n"
                   "@catchall.test user@hosted.test\n",
        "vmailbox": "# WARNING: this file is auto-generated. Modify "
                    "/tmp/docker-mailserver/postfix-accounts.cf to edit the user list.\n"
                    "user@hosted.test hosted.test/user/\n",
        "maps/header_checks.pcre": "", "maps/sender_header_filter.pcre": ""},
    # mailcow: the maps it ships beside its main.cf, and what its postfix
    # container's start-up script writes (mailcow_entrypoint()).
    "mailcow": {**{name: STACKS / "mailcow" / name for name in (
                    "postscreen_access.cidr", "anonymize_headers.pcre", "local_transport",
                    "allow_mailcow_local.regexp", "smtp_dsn_filter")},
                "custom_transport.pcre": ""},
    # iRedMail's installer copies its helo_access.pcre, command_filter.pcre
    # and postscreen_access.cidr, creates the others empty, and adds
    # aliases for nobody, vmail, root and amavis.
    "iredmail": {"header_checks.pcre": "", "body_checks.pcre": "",
                 "command_filter.pcre": STACKS / "iredmail" / "command_filter.pcre",
                 "helo_access.pcre": STACKS / "iredmail" / "helo_access.pcre",
                 "sender_access.pcre": "", "postscreen_dnsbl_reply": "",
                 "postscreen_access.cidr": STACKS / "iredmail" / "postscreen_access.cidr",
                 "aliases": "postmaster: root\nabuse: root\nnobody: root\nvmail: root\n"
                            "root: postmaster@ired.test\namavis: root\n"},
}


# What iRedMail's installer appends to its main.cf, in its order
# (functions/postfix.sh, dovecot.sh, amavisd.sh, mlmmj.sh).
IREDMAIL_MAIN_PARTS = ("main.cf.mysql", "main.cf.postscreen", "main.cf.dovecot",
                       "main.cf.amavisd", "main.cf.mlmmj")
# Tables the stack's scripts index with postmap.
INDEXED = {"mailcow": ["sni.map"]}
# What the installers set with `postconf -e` (both MTAs alike).
INSTALLER_SETTINGS = {"iredmail": {"compatibility_level": "3.6"}}


MAILCOW_HOSTNAME = "mx.mailcow.test"


def mailcow_entrypoint(db_socket="/var/run/mysqld/mysqld.sock", lmtp="lmtp:inet:dovecot:24"):
    """What mailcow's postfix container writes at start
    (data/Dockerfiles/postfix/postfix.sh, its `cat <<EOF > FILE` texts):
    {path under its /opt/postfix/conf/ (or "aliases" for /etc/aliases):
    text}, with its environment (DBUSER, DBPASS, DBNAME) filled, the
    database's socket at `db_socket` and the dovecot container's LMTP
    service (in mysql_relay_ne.cf's answer) at `lmtp`. The shell expands
    nothing else in those texts (`$.` stays as written)."""
    script = (STACKS / "mailcow" / "postfix.sh").read_text()
    env = {"DBUSER": "mailcow", "DBPASS": "mailcow-secret", "DBNAME": "mailcow"}
    files = {}
    for m in re.finditer(r"(?ms)^[ \t]*cat <<EOF > (/\S+)\n(.*?)^EOF$", script):
        path, text = m.group(1), m.group(2)
        for k, v in env.items():
            text = text.replace("${" + k + "}", v)
        text = text.replace("unix:/var/run/mysqld/mysqld.sock", f"unix:{db_socket}")
        text = text.replace("lmtp:inet:dovecot:24", lmtp)
        files["aliases" if path == "/etc/aliases" else path.removeprefix("/opt/postfix/conf/")] = text
    assert {"aliases", "dns_blocklists.cf", "sql/mysql_virtual_alias_maps.cf",
            "custom_postscreen_whitelist.cidr"} <= set(files), sorted(files)
    # No certificate directories: `echo -n "" > sni.map`.
    files["sni.map"] = ""
    return files


def mailcow_main_cf(text):
    """mailcow's main.cf as postfix.sh leaves it: cut after its `# Overrides`
    line, then the DNSBL sites of the dns_blocklists.cf it wrote (the open
    Spamhaus lists: no DQS key, asn-check answered 200), `# User
    Overrides` and its extra.cf, which holds only myhostname."""
    script = (STACKS / "mailcow" / "postfix.sh").read_text()
    dnsbl = "\n".join(l for l in mailcow_entrypoint()["dns_blocklists.cf"].splitlines()
                      if not l.startswith("#") and l.strip())
    spamhaus = re.search(r"(?s)SPAMHAUS_DNSBL_CONFIG=\$\(cat <<EOF\n(  zen\.spamhaus\.org.*?)\nEOF",
                         script).group(1)
    head = text[:text.index("\n", text.index("Overrides")) + 1]
    return (head + "\n" + f"{dnsbl}\n{spamhaus}\n" + "\n# User Overrides\n"
            + f"myhostname = {MAILCOW_HOSTNAME}\n\n")


def stack_texts(stack, subs):
    """The stack's main.cf and master.cf as its installer composes them,
    placeholders filled (`subs` first, then the stack's placeholders).

    iRedMail's installer (functions/postfix.sh) starts from the
    distribution's master.cf (Debian's stock one here) and appends its own;
    appends main.cf.mysql, .postscreen, .dovecot, .amavisd and .mlmmj to its
    main.cf; switches port 25 to postscreen (comments `smtp inet ... smtpd`
    out, uncomments the postscreen, `smtpd pass`, dnsblog and tlsproxy
    lines); sets every service's chroot column to n; and gives pickup
    `-o content_filter=` the originating amavis port."""
    texts = {}
    for name in ("main.cf", "master.cf"):
        t = (STACKS / stack / name).read_text()
        if stack == "iredmail" and name == "main.cf":
            t += "".join((STACKS / stack / part).read_text() for part in IREDMAIL_MAIN_PARTS)
        if stack == "iredmail" and name == "master.cf":
            t = iredmail_master_cf((STACKS / "debian" / "master.cf").read_text()) + t
        if stack == "mailcow" and name == "main.cf":
            t = mailcow_main_cf(t)
        for old, new in subs:
            t = t.replace(old, new)
        texts[name] = t
    if stack == "iredmail":
        m = texts["master.cf"]
        m = re.sub(r"(?m)^([0-9a-zA-Z]\S*\s+\S+\s+\S+\s+\S+\s+)\S+(?=\s)", r"\1n", m)
        m = re.sub(r"(?m)^(pickup\s.*)$", rf"\1\n  -o content_filter={IREDMAIL_ORIGINATING}",
                   m, count=1)
        texts["master.cf"] = m
    return texts


def iredmail_master_cf(text):
    """Debian's master.cf as iRedMail's postfix_config_postscreen leaves it."""
    text = re.sub(r"(?m)^(smtp .*inet.*smtpd)$", r"#\1", text)
    for rx in (r"smtpd.*pass.*smtpd", r"smtp *.*inet.*postscreen", r"tlsproxy.*unix.*tlsproxy",
               r"dnsblog.*unix.*dnsblog"):
        text = re.sub(rf"(?m)^#({rx})$", r"\1", text)
    return text


def set_param(main, name, value):
    """main.cf text with `name = value`: in place when the file has the
    name (its continuation lines replaced too), else appended."""
    new, n = re.subn(rf"(?m)^{re.escape(name)}\s*=.*(\n[ \t]+\S.*)*$",
                     lambda _: f"{name} = {value}", main)
    return new if n else main + f"{name} = {value}\n"


def prepare(stack, d, ca, mta, ports=None, settings=None, files=None, links=None, subs=()):
    """DIR/etc with the stack's files filled for `mta` ("postfix" or
    "postern"): its own queue, data directory and log, and, for Postern,
    Postern's daemons and mail_owner.

    ``ports``: a dict; every inet service of master.cf then listens on
    127.0.0.1:PORT, PORT from ports[service name] or a free port recorded
    there (no test binds the real 25, 587 or 465). ``settings``: main.cf
    parameters the stack's installer sets (postconf -e), same for both
    MTAs. ``files``: more data files {path under DIR/etc: text}.
    ``links``: {name under DIR: target} symbolic links (a socket the
    stack expects at a fixed path). ``subs``: more (old, new) text
    replacements after the placeholders."""
    etc = d / "etc"
    etc.mkdir(parents=True, exist_ok=True)
    for sub in ("queue", "data"):
        (d / sub).mkdir(exist_ok=True)
    texts = stack_texts(stack, list(subs) + placeholders(stack, d, ca))
    # {etc} and {dir} in a setting: this MTA's directories.
    local = {k: v.replace("{etc}", str(etc)).replace("{dir}", str(d))
             for k, v in {**INSTALLER_SETTINGS.get(stack, {}), **(settings or {})}.items()}
    local.update({
        "queue_directory": f"{d}/queue",
        "data_directory": f"{d}/data",
        "inet_interfaces": "127.0.0.1",
        "inet_protocols": "ipv4",
        # Both MTAs answer the test's refused commands at once (the error
        # sleep only makes the comparison slower).
        "smtpd_error_sleep_time": "0s",
    })
    if mta == "postern":
        local.update({"daemon_directory": str(h.BIN_DIR), "command_directory": str(h.BIN_DIR),
                      "mail_owner": h.MAIL_OWNER_WHEN_ROOT, "maillog_file": f"{d}/maillog"})
    else:
        local.update({"mail_owner": "postfix", "daemon_directory": "/usr/lib/postfix/sbin"})
        # Postfix's maillog_file needs a postlog service, which not every
        # stack's master.cf has (else it logs to syslog).
        if re.search(r"(?m)^postlog\s", texts["master.cf"]):
            local.update({"maillog_file": f"{d}/maillog", "maillog_file_prefixes": str(d)})
    main = texts["main.cf"] + "\n# Filled in by tests/test_real_configs.py\n"
    for k, v in local.items():
        main = set_param(main, k, v)
    texts["main.cf"] = main
    if ports is not None:
        def listen(m):
            name = m.group(1)
            if name not in ports:
                ports[name] = h.free_port()
            return f"127.0.0.1:{ports[name]}{m.group(2)}inet"
        texts["master.cf"] = re.sub(r"(?m)^([^#\s]\S*)(\s+)inet(?=\s)", listen, texts["master.cf"])
    for name, t in texts.items():
        (etc / name).write_text(t)
    (etc / "aliases").write_text("postmaster: root\nabuse: root\nwebmaster: root\n")
    # The SQL client files an installer writes (their connection details
    # are made up unless the test gives them in `files`).
    for path in set(re.findall(r"mysql:(/\S+?\.cf)", texts["main.cf"] + texts["master.cf"])):
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text("hosts = 127.0.0.1\nuser = mail\npassword = secret\ndbname = mail\n"
                     "query = SELECT 1 WHERE '%s' = ''\n")
    # The SQL client files the installer copies (iRedMail: samples/postfix/
    # mysql/*.cf into /etc/postfix/mysql), placeholders filled.
    if (STACKS / stack / "mysql").is_dir():
        allsubs = list(subs) + placeholders(stack, d, ca)
        for src in sorted((STACKS / stack / "mysql").glob("*.cf")):
            text = src.read_text()
            for old, new in allsubs:
                text = text.replace(old, new)
            (etc / "mysql").mkdir(exist_ok=True)
            (etc / "mysql" / src.name).write_text(text)
    entry = mailcow_entrypoint() if stack == "mailcow" else {}
    for rel, text in {**entry, **DATA_FILES.get(stack, {}), **(files or {})}.items():
        if isinstance(text, Path):
            text = text.read_text()
        p = etc / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    for name, target in (links or {}).items():
        (d / name).unlink(missing_ok=True)
        (d / name).symlink_to(target)
    for p in [d, etc, *etc.rglob("*")]:
        p.chmod(0o755 if p.is_dir() else 0o644)
    # The indexed tables the start-up script builds (mailcow: `postmap -F
    # hash:sni.map`), each with its own MTA's postmap.
    postmap = h.BIN_DIR / "postmap" if mta == "postern" else PF_POSTCONF.replace("postconf",
                                                                                 "postmap")
    for rel in INDEXED.get(stack, ()):
        r = h.run([postmap, "-c", etc, f"hash:{etc}/{rel}"])
        assert r.returncode == 0, h.describe(r)
    if mta == "postfix":
        pw = pwd.getpwnam("postfix")
        os.chown(d / "data", pw.pw_uid, pw.pw_gid)
    else:
        # As the installer's newaliases: the alias database exists.
        r = h.run([h.BIN_DIR / "postalias", "-c", etc, f"hash:{etc}/aliases"])
        assert r.returncode == 0, h.describe(r)
    return etc


@pytest.fixture
def ca(work):
    return TestCA(work / "ca", names=["localhost"])


# What Postern lacks that each stack needs: `postern check` must name each
# (parameter or restriction or service, as it appears in its error line).
NEEDS = {
    "debian": [],
    "docker-mailserver": [],
    # mailcow sends postscreen's clients through HAProxy's PROXY protocol
    # (its milters, smtpd_milters = inet:rspamd:9900, are honoured since
    # issue #21).
    "mailcow": [
        "-o smtpd_upstream_proxy_protocol: not honoured by Postern",
    ],
    "iredmail": [
    ],
}


@pytest.mark.parametrize("stack", sorted(NEEDS))
def test_postern_check_passes_where_postfix_check_passes(stack, work, ca):
    pf = prepare(stack, work / "postfix", ca, "postfix")
    r = h.run([POSTFIX, "-c", pf, "check"], timeout=120)
    assert r.returncode == 0, "Postfix's postfix check fails on the stack\n" + h.describe(r)
    pt = prepare(stack, work / "postern", ca, "postern")
    r = h.run([h.BIN_DIR / "postern", "-c", pt, "check"], timeout=120)
    if not NEEDS[stack]:
        assert r.returncode == 0, h.describe(r)
        assert "error:" not in r.stderr, r.stderr
        return
    assert r.returncode != 0, "postern check passed a configuration Postern cannot honour\n" \
        + h.describe(r)
    errors = [l for l in r.stderr.splitlines() if ": error: " in l]
    for want in NEEDS[stack]:
        assert any(want in l for l in errors), f"no error naming {want!r}\n{r.stderr}"
    for l in errors:
        # One line each, with its file and line.
        assert re.search(r"/(main|master)\.cf(, line \d+)?: ", l), l
    # Nor does it start (mailcow: the PROXY protocol).
    r = h.run([h.BIN_DIR / "postern", "-c", pt, "start"], timeout=120)
    assert r.returncode != 0, h.describe(r)
    assert all(want in r.stderr for want in NEEDS[stack]), h.describe(r)


@pytest.mark.parametrize("stack", sorted(NEEDS))
def test_postconf_warns_about_nothing_postfix_knows(stack, work, ca):
    pf = prepare(stack, work / "postfix", ca, "postfix")
    theirs = h.run([PF_POSTCONF, "-c", pf, "-n"], timeout=60)
    pt = prepare(stack, work / "postern", ca, "postern")
    ours = h.run([h.BIN_DIR / "postconf", "-c", pt, "-n"], timeout=60)
    assert ours.returncode == 0, h.describe(ours)

    def unused(err):
        return {m.group(1) for m in re.finditer(r"unused parameter: ([^=\s]+)", err)}
    extra = unused(ours.stderr) - unused(theirs.stderr)
    assert not extra, f"Postern warns about {sorted(extra)}; Postfix does not\n{ours.stderr}"
    # The names Postern prints are Postfix's (a hyphenated one included).
    names = {l.split(" =")[0] for l in ours.stdout.splitlines()}
    pf_names = {l.split(" =")[0] for l in theirs.stdout.splitlines()}
    # (the test's own additions aside: Postfix's side logs to syslog and
    # keeps its command_directory)
    assert names - pf_names <= {"config_directory", "command_directory", "maillog_file"}, \
        sorted(names - pf_names)


# -- the same stack under Postfix and under Postern ----------------------------

class Running:
    """One MTA (``mta``: "postfix" or "postern") started on a stack's
    files in DIR ``d``: ``ports`` {master.cf service: port},
    ``resolve(addresses)`` -> {address: {class, transport, nexthop,
    recipient}} from its own resolver (Postfix's trivial-rewrite asked
    directly; Postern's through ``sendmail -bv -v``)."""

    def __init__(self, mta, d, ports, postern=None):
        self.mta, self.d, self.ports, self.postern = mta, d, ports, postern

    def resolve(self, addresses):
        from test_resolve_vs_postfix import TrivialRewrite, postern_resolutions
        if self.mta == "postern":
            return postern_resolutions(self.postern, addresses)
        tr = TrivialRewrite(self.d / "queue")
        try:
            return {a: tr.resolve("", a) for a in addresses}
        finally:
            tr.close()

    def log_text(self):
        if self.mta == "postern":
            return self.postern.log_text()
        try:
            return (self.d / "maillog").read_text(errors="replace")
        except OSError:
            return ""


def smtpd_port(ports, etc):
    """The port of an inet service run by smtpd itself (not postscreen,
    whose greeting a probe would fail as a pregreet, nor one in TLS
    wrapper mode, which greets only after a TLS handshake)."""
    text = (etc / "master.cf").read_text()
    for m in re.finditer(r"(?m)^127\.0\.0\.1:(\d+)\s+inet\s+\S+\s+\S+\s+\S+\s+\S+\s+\S+\s+smtpd\b"
                         r".*\n((?:[ \t]+\S.*\n)*)", text):
        if not re.search(r"smtpd_tls_wrappermode\s*=\s*yes", m.group(2)):
            return int(m.group(1))
    raise AssertionError("no inet smtpd service in master.cf")


def probe_with_log(probe, run):
    try:
        return probe(run)
    except (AssertionError, OSError, smtplib.SMTPException) as e:
        raise AssertionError(f"{run.mta}: {e!r}\n--- its log ---\n{run.log_text()[-4000:]}") \
            from e


def run_on_stack(mta, stack, d, ca, make_postern, probe, **prep):
    """Starts `mta` on the stack's files (prepare(**prep)), returns
    probe(Running), and stops Postfix again (Postern: at teardown).
    ``per_mta``: {mta: more prepare() arguments} (its own ports, ...)."""
    prep = dict(prep)
    prep.update(prep.pop("per_mta", {}).get(mta, {}))
    ports = dict(prep.pop("ports", {}))
    if mta == "postern":
        p = make_postern(start=False)
        etc = prepare(stack, p.dir, ca, "postern", ports=ports, **prep)
        p.port = smtpd_port(ports, etc)
        p.start()
        return probe_with_log(probe, Running("postern", p.dir, ports, postern=p))
    etc = prepare(stack, d, ca, "postfix", ports=ports, **prep)
    r = h.run([PF_POSTCONF.replace("postconf", "postalias"), "-c", etc, f"hash:{etc}/aliases"])
    assert r.returncode == 0, h.describe(r)
    # Postfix starts from a configuration directory only when its default
    # main.cf lists it (as tests/postfix_peer.py does).
    _edit_alternate_dirs(lambda dirs: [*dirs, str(etc)])
    try:
        r = h.run([POSTFIX, "-c", etc, "start"], timeout=120)
        assert r.returncode == 0, h.describe(r)
        port = smtpd_port(ports, etc)
        h.wait_for(lambda: h.smtp_banner_ok(port), 20, what="Postfix's greeting")
        return probe_with_log(probe, Running("postfix", d, ports))
    finally:
        h.run([POSTFIX, "-c", etc, "stop"], timeout=60)
        _edit_alternate_dirs(lambda dirs: [x for x in dirs if x != str(etc)])


def compare(stack, work, ca, make_postern, probe, **prep):
    """Runs probe on a private Postfix and on Postern, both on the stack's
    files; returns (what Postfix showed, what Postern showed, the list of
    differences). An observation is a dict {what: {key: value}}; resolutions
    are compared on class, transport, next hop and recipient."""
    seen = {mta: run_on_stack(mta, stack, work / mta, ca, make_postern, probe, **prep)
            for mta in ("postfix", "postern")}
    pf, pt = seen["postfix"], seen["postern"]
    differences = []
    for what in pf:
        for key in pf[what]:
            a, b = pf[what][key], pt[what].get(key)
            if isinstance(a, dict) and "class" in a:
                for k in ("class", "transport", "nexthop", "recipient"):
                    if a[k].lower() != str((b or {}).get(k, "")).lower():
                        differences.append(f"{what} {key}: {k}: Postfix {a[k]!r}, "
                                           f"Postern {(b or {}).get(k)!r}")
            elif a != b:
                differences.append(f"{what} {key}: Postfix {a!r}, Postern {b!r}")
    return pf, pt, differences


DEBIAN_ADDRESSES = ["root@mx.debian.test", "postmaster@mx.debian.test", "abuse@mx.debian.test",
                    "nobody-here@mx.debian.test", "root@localhost", "user+ext@mx.debian.test",
                    "someone@elsewhere.test", "user@sub.mx.debian.test"]


def test_debian_default_resolves_and_answers_as_postfix(work, ca, make_postern):
    """Debian's own main.cf and master.cf, given to a private Postfix and to
    Postern: the same class, transport and next hop for each address
    (Postfix's trivial-rewrite asked directly), and the same RCPT TO reply
    (the client, 127.0.0.1, is in Debian's mynetworks)."""
    from test_resolve_vs_postfix import rcpt_replies

    def probe(run):
        return {"resolve": run.resolve(DEBIAN_ADDRESSES),
                "rcpt": rcpt_replies(run.ports["smtp"], DEBIAN_ADDRESSES)}
    _, pt, differences = compare("debian", work, ca, make_postern, probe)
    assert not differences, "\n".join(differences)
    assert pt["rcpt"]["root@mx.debian.test"].startswith("250"), pt


def submission(port, login=None, sender="user@hosted.test", rcpt="someone@elsewhere.test",
               source=None):
    """The RCPT TO reply on a submission port after STARTTLS (and AUTH
    PLAIN as `login` (user, password) if given), from the `source`
    address (host, port) if given; nothing is queued."""
    import ssl
    with smtplib.SMTP("127.0.0.1", port, timeout=30, source_address=source) as c:
        c.ehlo("client.test")
        c.starttls(context=ssl._create_unverified_context())
        c.ehlo("client.test")
        if login:
            c.login(*login)
        code, text = c.mail(sender)
        if code != 250:
            return f"MAIL {code} {text.decode()}"
        code, text = c.rcpt(rcpt)
        c.rset()
        return f"{code} {text.decode()}"


def submit(port, login, sender, rcpt, token):
    """One message on a submission port after STARTTLS and AUTH PLAIN as
    `login`; the reply to DATA."""
    import ssl
    with smtplib.SMTP("127.0.0.1", port, timeout=60) as c:
        c.ehlo("client.test")
        c.starttls(context=ssl._create_unverified_context())
        c.ehlo("client.test")
        c.login(*login)
        code, text = c.mail(sender)
        assert code == 250, (code, text)
        code, text = c.rcpt(rcpt)
        if code != 250:
            return f"RCPT {code} {text.decode()}"
        code, _ = c.data(h.crlf(f"From: {sender}\nSubject: {token}\n\n{token}\n"))
        return f"{code}"


def submission_login_fails(port, login=("user@hosted.test", "wrong")):
    """The reply to AUTH PLAIN with a wrong password after STARTTLS."""
    import ssl
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as c:
        c.ehlo("client.test")
        c.starttls(context=ssl._create_unverified_context())
        c.ehlo("client.test")
        try:
            c.login(*login)
        except smtplib.SMTPAuthenticationError as e:
            return f"{e.smtp_code} {e.smtp_error.decode()}"
        return "accepted"


def deliver(port, rcpt, token, sender=""):
    """One message by SMTP; the reply to DATA (or to RCPT if refused)."""
    with smtplib.SMTP("127.0.0.1", port, timeout=60) as c:
        c.ehlo("client.test")
        code, text = c.mail(sender)
        assert code == 250, (code, text)
        code, text = c.rcpt(rcpt)
        if code != 250:
            return f"RCPT {code} {text.decode()}"
        code, text = c.data(h.crlf(f"From: someone@client.test\nSubject: {token}\n\n{token}\n"))
        return f"{code}"


def delivered_to(maildir_root, token, timeout=60):
    """Where (relative to maildir_root) the message with `token` landed,
    and the Delivered-To header the delivery agent wrote."""
    def find():
        for f in Path(maildir_root).rglob("*"):
            if f.is_file() and f.parent.name in ("new", "cur"):
                data = f.read_bytes()
                if token.encode() in data:
                    return f, data
        return None
    f, data = h.wait_for(find, timeout, interval=0.2, what=f"a message with {token}")
    return {"path": str(f.parent.relative_to(maildir_root)),
            "delivered-to": h.header_values(data, "Delivered-To")}


DMS_RESOLVE = ["user@hosted.test", "alias@hosted.test", "forward@hosted.test",
               "nobody@hosted.test", "any@catchall.test", "user+tag@hosted.test",
               "root@mail.hosted.test", "someone@elsewhere.test"]


def test_docker_mailserver_hosted_domain_as_postfix(work, ca, make_postern, dovecot):
    """docker-mailserver's main.cf and master.cf with what its start-up
    scripts add for one account (user@hosted.test) and its
    postfix-virtual.cf (an alias, a forward, a catch-all domain):
    virtual_mailbox_maps = texthash:/etc/postfix/vmailbox and
    virtual_transport = lmtp:unix:/var/run/dovecot/lmtp
    (setup.d/postfix.sh), mynetworks emptied (PERMIT_DOCKER=none, the
    default: setup.d/networking.sh), mua_sender_restrictions without the
    login-mismatch check (SPOOF_PROTECTION=0, security/spoofing.sh),
    myhostname/mydomain. Dovecot (tests/dovecot.py) is the stack's SASL
    server (its socket at the stack's smtpd_sasl_path) and LMTP server.

    A private Postfix and Postern on the same files: the same resolution
    of each address, the same RCPT TO replies on port 25 (postscreen,
    then smtpd; 127.0.0.1 is outside mynetworks), the same Maildir and
    Delivered-To for a message to the alias (through Dovecot LMTP), and on
    the submission port (STARTTLS required) the same reply to an
    authenticated relay (accepted) and to an unauthenticated one
    (refused)."""
    from test_resolve_vs_postfix import rcpt_replies
    dc = dovecot(users={"user@hosted.test": "secret"})
    settings = {
        "myhostname": "mail.hosted.test", "mydomain": "hosted.test",
        "message_size_limit": "10240000", "mailbox_size_limit": "0",
        "virtual_mailbox_limit": "0",
        "virtual_mailbox_maps": "texthash:{etc}/vmailbox",
        "virtual_transport": f"lmtp:unix:{dc.lmtp_socket}",
        "mynetworks": "",
        "mua_sender_restrictions": "$dms_smtpd_sender_restrictions",
    }

    def probe(run):
        smtp, sub = run.ports["smtp"], run.ports["submission"]
        token = f"dms-alias-{run.mta}"
        return {
            "resolve": run.resolve(DMS_RESOLVE),
            # Null sender: reject_unknown_sender_domain needs DNS for any
            # outside sender domain (tried once below).
            "rcpt": rcpt_replies(smtp, ["user@hosted.test", "alias@hosted.test",
                                        "forward@hosted.test", "any@catchall.test",
                                        "nobody@hosted.test", "someone@elsewhere.test"],
                                 sender=""),
            "rcpt from a sender domain without DNS": rcpt_replies(
                smtp, ["user@hosted.test"], sender="sender@nodns.test"),
            "delivery": {"reply": deliver(smtp, "alias@hosted.test", token),
                         **delivered_to(dc.home, token)},
            "submission": {
                "authenticated": submission(sub, login=("user@hosted.test", "secret")),
                "unauthenticated": submission(sub),
                "wrong password": submission_login_fails(sub),
            },
        }

    pf, pt, differences = compare("docker-mailserver", work, ca, make_postern, probe,
                                  settings=settings, links={"sasl-auth.sock": dc.auth_socket})
    assert not differences, "\n".join(differences)
    # And what both did is what the stack means (a build that refused or
    # lost everything alike would not pass).
    assert pt["resolve"]["user@hosted.test"]["class"] == "virtual", pt["resolve"]
    rcpt = pt["rcpt"]
    assert rcpt["user@hosted.test"].startswith("250") and rcpt["alias@hosted.test"].startswith("250")
    assert rcpt["any@catchall.test"].startswith("250"), rcpt
    assert rcpt["nobody@hosted.test"].startswith("550 5.1.1"), rcpt
    # (smtpd_recipient_restrictions' reject_unauth_destination answers
    # before the relay restrictions' defer_unauth_destination, in Postfix)
    assert "Relay access denied" in rcpt["someone@elsewhere.test"], rcpt
    assert pt["delivery"]["path"] == "user@hosted.test/Maildir/new", pt["delivery"]
    assert pt["submission"]["authenticated"].startswith("250"), pt["submission"]
    assert pt["submission"]["unauthenticated"].startswith("554 5.7.1"), pt["submission"]


IRED_RESOLVE = ["user@ired.test", "team@ired.test", "info@ired.test", "user@alias-domain.test",
                "nobody@ired.test", "user+tag@ired.test", "root@mx.iredmail.test",
                "someone@elsewhere.test"]
IRED_RCPT = ["user@ired.test", "team@ired.test", "info@ired.test", "user@alias-domain.test",
             "nobody@ired.test", "nobody@alias-domain.test", "someone@elsewhere.test"]


def iredmail_rows(transport):
    """The vmail rows iRedMail's installer and iRedAdmin write
    (samples/mysql/sql/add_first_domain_and_user.sql and the accounts it
    adds): one domain, one mailbox (with its forwarding to itself), a
    mail alias account (team@, forwardings.is_list), a per-user alias
    address (info@, forwardings.is_alias) and an alias domain."""
    return [
        "INSERT INTO domain (domain, transport, settings, created) VALUES "
        f"('ired.test', '{transport}', 'default_user_quota:1024;', NOW())",
        "INSERT INTO mailbox (username, password, name, maildir, quota, domain, isadmin, "
        "isglobaladmin, storagebasedirectory, storagenode, created) VALUES ('user@ired.test', "
        "'{PLAIN}secret', 'User', 'ired.test/u/s/e/user-2026.12.06.18.00.00/', 1024, 'ired.test', "
        "0, 1, '/var/vmail', 'vmail1', NOW())",
        "INSERT INTO forwardings (address, forwarding, domain, dest_domain, is_forwarding) VALUES "
        "('user@ired.test', 'user@ired.test', 'ired.test', 'ired.test', 1)",
        "INSERT INTO alias (address, name, domain, created, active) VALUES "
        "('team@ired.test', 'Team', 'ired.test', NOW(), 1)",
        "INSERT INTO forwardings (address, forwarding, domain, dest_domain, is_list) VALUES "
        "('team@ired.test', 'user@ired.test', 'ired.test', 'ired.test', 1)",
        "INSERT INTO forwardings (address, forwarding, domain, dest_domain, is_alias) VALUES "
        "('info@ired.test', 'user@ired.test', 'ired.test', 'ired.test', 1)",
        "INSERT INTO alias_domain (alias_domain, target_domain, created) VALUES "
        "('alias-domain.test', 'ired.test', NOW())",
    ]


def test_iredmail_hosted_domain_as_postfix(work, ca, make_postern, dovecot):
    """iRedMail (MySQL backend) as its installer composes it (see
    stack_texts), its SQL client files (samples/postfix/mysql/*.cf, their
    real queries) reading its vmail schema (samples/iredmail/iredmail.mysql)
    in a private MariaDB (tests/table_servers.py) with iredmail_rows().
    Its amavisd content filter is a private amavisd-new
    (tests/test_content_filter.py) on the content_filter port, reinjecting
    to the stack's 10025 service; Dovecot (tests/dovecot.py) is its SASL
    server (private/dovecot-auth) and, as the installer's documented
    TRANSPORT choice `lmtp:unix:...`, its delivery agent (the default,
    the `dovecot` pipe to dovecot-lda, would need the system's Dovecot).

    Not run, identically for both MTAs: the two check_policy_service
    restrictions, iRedAPD (inet:127.0.0.1:7777, in
    smtpd_recipient_restrictions and smtpd_end_of_data_restrictions; a
    service of iRedMail's own, not packaged) and Dovecot's quota-status
    (inet:127.0.0.1:12340): both lines are taken out of both copies of
    main.cf, as without their servers both MTAs would only defer.

    A private Postfix and Postern on the same files: the same resolution
    (transport_maps from SQL included), the same RCPT TO replies from
    mynetworks and from outside it (127.0.0.2: with EHLO of an address
    literal, and with a name DNS does not know), the same Maildir,
    Delivered-To and pass through amavisd for a message to the alias, and
    on the submission port the same replies with and without AUTH."""
    from test_content_filter import Amavisd, amavisd_available
    from test_resolve_vs_postfix import rcpt_replies
    from table_servers import MariaDB, mariadb_available
    if not (mariadb_available() and amavisd_available()):
        pytest.fail("mariadb-server and amavisd-new are needed (scripts/test installs them)")
    dc = dovecot(users={"user@ired.test": "secret"})
    transport = f"lmtp:unix:{dc.lmtp_socket}"
    db = MariaDB().start()
    try:
        db.sql("CREATE DATABASE vmail CHARACTER SET utf8mb4")
        db.sql((STACKS / "iredmail" / "iredmail.mysql").read_text().rstrip().rstrip(";"),
               database="vmail")
        db.sql(*iredmail_rows(transport), database="vmail")
        db.sql("CREATE USER 'vmail'@'127.0.0.1' IDENTIFIED BY 'vmail-secret'",
               "GRANT SELECT ON vmail.* TO 'vmail'@'127.0.0.1'")
        common = [("PH_SQL_SERVER_PORT", str(db.port)), ("PH_TRANSPORT", transport),
                  ("\n    check_policy_service inet:PH_IREDAPD_SERVER_ADDRESS:PH_IREDAPD_LISTEN_PORT",
                   ""),
                  ("\n    check_policy_service inet:127.0.0.1:PH_DOVECOT_SERVICE_QUOTA_STATUS_PORT",
                   "")]
        filter_port = {mta: h.free_port() for mta in ("postfix", "postern")}
        per_mta = {mta: {"subs": common + [(":10024", f":{filter_port[mta]}")]}
                   for mta in filter_port}

        def probe(run):
            smtp, sub = run.ports["smtp"], run.ports["submission"]
            private = run.d / "queue" / "private" / "dovecot-auth"
            private.unlink(missing_ok=True)
            private.symlink_to(dc.auth_socket)
            amavis = Amavisd(run.ports["127.0.0.1:10025"], port=filter_port[run.mta]).start()
            try:
                token = f"ired-alias-{run.mta}"
                reply = deliver(smtp, "team@ired.test", token)
                where = delivered_to(dc.home, token)
            finally:
                amavis.stop()
            data = [f.read_bytes() for f in (dc.home / where["path"]).iterdir()
                    if token.encode() in f.read_bytes()][0]
            received = h.header_values(data, "Received")
            return {
                "resolve": run.resolve(IRED_RESOLVE),
                "rcpt from mynetworks": rcpt_replies(smtp, IRED_RCPT, sender=""),
                "rcpt from outside": rcpt_replies(smtp, IRED_RCPT, sender="",
                                                  helo="[127.0.0.2]", source=("127.0.0.2", 0)),
                "rcpt from outside, unknown HELO name": rcpt_replies(
                    smtp, ["user@ired.test"], sender="", source=("127.0.0.2", 0)),
                "delivery": {"reply": reply, **where,
                             "through amavisd": any("amavis.filter.test" in r for r in received)},
                "submission": {
                    "authenticated": submission(sub, login=("user@ired.test", "secret"),
                                                sender="user@ired.test"),
                    "unauthenticated": submission(sub, sender="user@ired.test"),
                    "wrong password": submission_login_fails(sub, ("user@ired.test", "wrong")),
                },
            }

        pf, pt, differences = compare("iredmail", work, ca, make_postern, probe, per_mta=per_mta)
    finally:
        db.remove()
    # Where Postern differs from Postfix on purpose: iRedMail leaves
    # smtpd_relay_restrictions at its default, whose last word is
    # defer_unauth_destination (454) in Postfix and reject_unauth_destination
    # (554) in Postern (conf/src/params.rs: a misdirected client learns at
    # once). Only that reply, with the same text, is let through.
    deliberate = ("rcpt from outside someone@elsewhere.test: Postfix '454 4.7.1 "
                  "<someone@elsewhere.test>: Relay access denied', Postern '554 5.7.1 "
                  "<someone@elsewhere.test>: Relay access denied'")
    differences = [d for d in differences if d != deliberate]
    assert not differences, "\n".join(differences)
    assert pt["resolve"]["user@ired.test"]["transport"] == "lmtp", pt["resolve"]
    ours = pt["rcpt from mynetworks"]
    assert all(ours[a].startswith("250") for a in
               ("user@ired.test", "team@ired.test", "info@ired.test", "user@alias-domain.test",
                "someone@elsewhere.test")), ours
    assert ours["nobody@ired.test"].startswith("550 5.1.1"), ours
    outside = pt["rcpt from outside"]
    assert outside["user@ired.test"].startswith("250"), outside
    assert "Relay access denied" in outside["someone@elsewhere.test"], outside
    assert pt["delivery"]["path"] == "user@ired.test/Maildir/new", pt["delivery"]
    assert pt["delivery"]["through amavisd"], pt["delivery"]
    assert pt["submission"]["authenticated"].startswith("250"), pt["submission"]
    assert pt["submission"]["unauthenticated"].startswith("554 5.7.1"), pt["submission"]


MC_RESOLVE = ["user@mc.test", "team@mc.test", "user@alias-mc.test", "nobody@mc.test",
              "user+tag@mc.test", "root@localhost", "someone@elsewhere.test"]
MC_RCPT = ["user@mc.test", "team@mc.test", "user@alias-mc.test", "nobody@mc.test",
           "nobody@alias-mc.test", "someone@elsewhere.test"]

# PHP (php-cli) that prints mailcow's schema: the $views and $tables
# arrays of init_db.inc.php, turned into statements as init_db_schema()
# turns them for a new database (its "Create table if it is missing"
# branch, then its views).
MAILCOW_SCHEMA_PHP = r"""<?php
$src = file_get_contents($argv[1]);
if (!preg_match('/\n    \$views = array\(.*?\n    \);\n\n    \$tables = array\(.*?\n    \);\n/s',
                $src, $m)) { fwrite(STDERR, "no \$tables in $argv[1]\n"); exit(1); }
eval($m[0]);
foreach ($tables as $table => $properties) {
  $sql = "CREATE TABLE IF NOT EXISTS `" . $table . "` (";
  foreach ($properties['cols'] as $column => $type) { $sql .= "`" . $column . "` " . $type . ","; }
  foreach ($properties['keys'] ?? array() as $key_type => $key_content) {
    if (strtolower($key_type) == 'primary') {
      foreach ($key_content as $key_values) {
        $sql .= "PRIMARY KEY (`" . implode("`, `", $key_values) . "`),"; }
    } elseif (strtolower($key_type) == 'key') {
      foreach ($key_content as $key_name => $key_values) {
        $sql .= "KEY `" . $key_name . "` (`" . implode("`, `", $key_values) . "`),"; }
    } elseif (strtolower($key_type) == 'unique') {
      foreach ($key_content as $key_name => $key_values) {
        $sql .= "UNIQUE KEY `" . $key_name . "` (`" . implode("`, `", $key_values) . "`),"; }
    } elseif (strtolower($key_type) == 'fkey') {
      foreach ($key_content as $key_name => $key_values) {
        @list($table_ref, $field_ref) = explode('.', $key_values['ref']);
        $sql .= "FOREIGN KEY `" . $key_name . "` (" . $key_values['col'] . ") REFERENCES `"
          . $table_ref . "` (`" . $field_ref . "`) ON DELETE " . $key_values['delete']
          . " ON UPDATE " . $key_values['update'] . ",";
      }
    }
  }
  echo rtrim($sql, ",") . ") " . $properties['attr'] . ";\n";
}
foreach ($views as $view => $create) { echo rtrim(trim($create), ";") . ";\n"; }
"""


def mailcow_schema(work):
    """mailcow's CREATE TABLE and CREATE VIEW statements, one string."""
    script = work / "mailcow-schema.php"
    script.write_text(MAILCOW_SCHEMA_PHP)
    r = h.run(["php", script, STACKS / "mailcow" / "init_db.inc.php"], timeout=60)
    assert r.returncode == 0 and "CREATE TABLE IF NOT EXISTS `mailbox`" in r.stdout, \
        h.describe(r)
    return r.stdout.rstrip().rstrip(";")


def mailcow_rows():
    """The rows mailcow's admin interface writes (functions.mailbox.inc.php,
    mailbox('add', ...)): a domain, a mailbox (with the alias row
    address = goto = username it adds beside it, and the attributes of its
    default mailbox template that its SQL queries read), an alias address
    and an alias domain."""
    attrs = ('{"mailbox_format": "maildir:", "tls_enforce_in": "0", "tls_enforce_out": "0", '
             '"relayhost": "0", "smtp_access": "1", "imap_access": "1", "force_pw_update": "0"}')
    return [
        "INSERT INTO domain (domain, description, aliases, mailboxes, defquota, maxquota, quota, "
        "backupmx, gal, active, relay_unknown_only, relay_all_recipients) VALUES "
        "('mc.test', 'mc', 400, 10, 3072, 10240, 10240, 0, 1, 1, 0, 0)",
        "INSERT INTO mailbox (username, password, name, quota, local_part, domain, attributes, "
        "authsource, active) VALUES ('user@mc.test', '{PLAIN}secret', 'User', 0, 'user', "
        f"'mc.test', '{attrs}', 'mailcow', 1)",
        "INSERT INTO alias (address, goto, domain, active) VALUES "
        "('user@mc.test', 'user@mc.test', 'mc.test', 1)",
        "INSERT INTO alias (address, public_comment, private_comment, goto, domain, sogo_visible, "
        "internal, sender_allowed, active) VALUES ('team@mc.test', '', '', 'user@mc.test', "
        "'mc.test', 1, 0, 1, 1)",
        "INSERT INTO alias_domain (alias_domain, target_domain, active) VALUES "
        "('alias-mc.test', 'mc.test', 1)",
    ]


def service_entry(master, name):
    """The text of master.cf service `name` with its -o lines."""
    m = re.search(rf"(?m)^{re.escape(name)}\s.*\n(?:[ \t]+\S.*\n)*", master)
    assert m, name
    return m.group(0)


def test_mailcow_hosted_domain_as_postfix(work, ca, make_postern, dovecot):
    """mailcow-dockerized's main.cf and master.cf as its postfix container
    composes them at start (mailcow_main_cf: its DNSBL sites and
    myhostname appended), with the maps it ships, the aliases, sni.map
    and SQL client files its start-up script writes (mailcow_entrypoint:
    mailcow's own queries), on mailcow's schema (init_db.inc.php, built by
    PHP as mailcow builds it: mailcow_schema) in a private MariaDB with the
    rows its admin interface writes for a domain, a mailbox, an alias and
    an alias domain. Dovecot (tests/dovecot.py) stands for its dovecot
    container: SASL on inet (mailcow's `inet:dovecot:10001`) and LMTP on
    inet (`lmtp:inet:dovecot:24`); only those host names are changed, to
    127.0.0.1 and Dovecot's ports.

    Taken out of both copies identically, each named (the test asserts
    that each was in the shipped files):
    - the milter settings: smtpd_milters and non_smtpd_milters
      (rspamd, inet:rspamd:9900), milter_default_action, milter_protocol
      and milter_mail_macros in main.cf. Postern has no Milter protocol
      (issue #21), so mail is not filtered by rspamd on either side; the
      empty `-o smtpd_milters=` / `-o non_smtpd_milters=` of the 589, 590
      and 591 services (no milter there) stay;
    - the three services for an HAProxy in front (10025, 10465 and 10587,
      `-o postscreen_upstream_proxy_protocol=haproxy` /
      `-o smtpd_upstream_proxy_protocol=haproxy`): Postern has no PROXY
      protocol, and they serve only that optional set-up;
    - mailcow's whitelist_fwd service (`127.0.0.1:10027 ... spawn
      argv=/usr/local/bin/whitelist_forwardinghosts.sh`, a script of
      mailcow's own that reads its Redis) and the
      `tcp:127.0.0.1:10027` entry of postscreen_access_list that asks it;
    - `socketmap:inet:postfix-tlspol:8642:QUERY` from smtp_tls_policy_maps
      (mailcow's postfix-tlspol container, not packaged; only outbound
      TLS policy, which no probe reaches); its SQL table stays.

    mynetworks: mailcow leaves mynetworks_style = subnet, which in its
    container is its Docker network (its own containers); here that
    network is 127.0.0.1/32 (`mynetworks`, both MTAs), and 127.0.0.2
    stands for a client on the Internet.

    A private Postfix and Postern on the same files: the same resolution
    of each address, the same RCPT TO replies through postscreen from
    mynetworks and from outside it (mailcow's check_recipient_mx_access
    and reject_invalid_helo_hostname included), the same Maildir and
    Delivered-To for a message to the alias (through LMTP), the same
    anonymized Received header on an authenticated message (mailcow's
    `-o cleanup_service_name=smtp_sender_cleanup` with its
    anonymize_headers.pcre), and on the submission port (STARTTLS
    required) the same replies to an authenticated relay, a sender the
    login does not own (mailcow's smtpd_sender_login_maps query), an
    unauthenticated client in and out of mynetworks, and a wrong password.

    Why mailcow (the refused stack, its milters taken out) and not a
    stack whose files need no milter: mailcow is the most complete of the
    container stacks, and without rspamd everything else of it runs as
    shipped here, on Debian packages: its own SQL queries on its own
    schema, postscreen with its DNSBL sites, its restrictions, sender
    login maps, submission services and header-scrubbing cleanup. The
    milter-free candidates would have given less: Mail-in-a-Box adds
    OpenDKIM and OpenDMARC milters itself, and Modoboa's schema exists
    only as Django migrations, so its SQL tables could not be built as
    shipped."""
    from test_resolve_vs_postfix import rcpt_replies
    from table_servers import MariaDB, mariadb_available
    if not mariadb_available() or not shutil.which("php"):
        pytest.fail("mariadb-server and php-cli are needed (scripts/test installs them)")
    dc = dovecot(users={"user@mc.test": "secret"})
    lmtp = f"lmtp:inet:127.0.0.1:{dc.lmtp_port}"
    main = (STACKS / "mailcow" / "main.cf").read_text()
    master = (STACKS / "mailcow" / "master.cf").read_text()
    not_run = [
        # Whole lines ("\nNAME = ..."): smtpd_milters is also the tail of
        # non_smtpd_milters.
        *[("\n" + line + "\n", "\n") for line in (
            "smtpd_milters = inet:rspamd:9900", "non_smtpd_milters = inet:rspamd:9900",
            "milter_default_action = tempfail", "milter_protocol = 6",
            "milter_mail_macros = i {mail_addr} {client_addr} {client_name} {auth_authen}")],
        *[(service_entry(master, name), "") for name in ("10025", "10465", "10587")],
        ("127.0.0.1:10027 inet n n n - 0 spawn user=nobody "
         "argv=/usr/local/bin/whitelist_forwardinghosts.sh\n", ""),
        (",\n  tcp:127.0.0.1:10027", ""),
        (" socketmap:inet:postfix-tlspol:8642:QUERY", ""),
    ]
    for old, _ in not_run:
        assert old in main or old in master, old
    left = main
    for old, rep in not_run:
        left = left.replace(old, rep)
    assert not [l for l in left.splitlines() if "milter" in l and not l.startswith("#")], left
    containers = [("inet:dovecot:10001", f"inet:127.0.0.1:{dc.auth_port}"),
                  ("lmtp:inet:dovecot:24", lmtp)]
    db = MariaDB().start()
    try:
        db.sql("CREATE DATABASE mailcow CHARACTER SET utf8mb4")
        db.sql(mailcow_schema(work), database="mailcow")
        db.sql(*mailcow_rows(), database="mailcow")
        db.sql("CREATE USER 'mailcow'@'localhost' IDENTIFIED BY 'mailcow-secret'",
               "GRANT SELECT ON mailcow.* TO 'mailcow'@'localhost'")

        def submitted(run, token):
            """An authenticated message on the submission port: it goes
            through mailcow's smtp_sender_cleanup, whose header_checks
            (anonymize_headers.pcre) rewrite the Received header that
            names the authenticated sender."""
            reply = submit(run.ports["submission"], ("user@mc.test", "secret"),
                           "user@mc.test", "team@mc.test", token)
            where = delivered_to(dc.home, token)
            data = [f.read_bytes() for f in (dc.home / where["path"]).iterdir()
                    if token.encode() in f.read_bytes()][0]
            received = h.header_values(data, "Received")
            return {"reply": reply, **where,
                    "anonymized Received": any(
                        "from [127.0.0.1] (localhost [127.0.0.1]) by localhost (Mailerdaemon) "
                        "with ESMTPSA" in " ".join(r.split()) for r in received),
                    "authenticated sender shown": any("Authenticated sender" in r
                                                      for r in received)}

        def probe(run):
            smtp, sub = run.ports["smtp"], run.ports["submission"]
            token = f"mailcow-alias-{run.mta}"
            outside = ("127.0.0.2", 0)
            return {
                "resolve": run.resolve(MC_RESOLVE),
                # Null sender: the pass service's reject_unknown_sender_domain
                # needs DNS for any other sender domain.
                "rcpt from mynetworks": rcpt_replies(smtp, MC_RCPT, sender=""),
                "rcpt from outside": rcpt_replies(smtp, MC_RCPT, sender="",
                                                  helo="client.mc-outside.test", source=outside),
                "rcpt from outside, HELO not a host name": rcpt_replies(
                    smtp, ["user@mc.test"], sender="", helo="bad_helo!", source=outside),
                "delivery": {"reply": deliver(smtp, "team@mc.test", token),
                             **delivered_to(dc.home, token)},
                "submitted message": submitted(run, token + "-submitted"),
                "submission": {
                    "authenticated": submission(sub, login=("user@mc.test", "secret"),
                                                sender="user@mc.test"),
                    "authenticated, sender not the login's": submission(
                        sub, login=("user@mc.test", "secret"), sender="other@mc.test"),
                    "unauthenticated, from mynetworks": submission(sub, sender="user@mc.test"),
                    "unauthenticated, from outside": submission(sub, sender="user@mc.test",
                                                                source=outside),
                    "wrong password": submission_login_fails(sub, ("user@mc.test", "wrong")),
                },
            }

        pf, pt, differences = compare(
            "mailcow", work, ca, make_postern, probe, subs=not_run + containers,
            settings={"mynetworks": "127.0.0.1/32"},
            files=mailcow_entrypoint(db_socket=db.socket, lmtp=lmtp))
    finally:
        db.remove()
    assert not differences, "\n".join(differences)
    # What both did is what the stack means.
    assert pt["resolve"]["user@mc.test"]["transport"] == "lmtp", pt["resolve"]
    ours = pt["rcpt from mynetworks"]
    assert all(ours[a].startswith("250") for a in
               ("user@mc.test", "team@mc.test", "user@alias-mc.test")), ours
    assert ours["nobody@mc.test"].startswith("550 5.1.1"), ours
    assert ours["someone@elsewhere.test"].startswith("250"), ours  # mynetworks relays
    outside = pt["rcpt from outside"]
    assert outside["user@mc.test"].startswith("250"), outside
    # mailcow's smtpd_relay_restrictions end in defer_unauth_destination.
    assert outside["someone@elsewhere.test"].startswith("454 4.7.1"), outside
    assert pt["rcpt from outside, HELO not a host name"]["user@mc.test"].startswith("501 5.5.2")
    assert pt["delivery"]["path"] == "user@mc.test/Maildir/new", pt["delivery"]
    assert pt["delivery"]["delivered-to"] == ["user@mc.test"], pt["delivery"]
    assert pt["submitted message"]["anonymized Received"], pt["submitted message"]
    assert not pt["submitted message"]["authenticated sender shown"], pt["submitted message"]
    subm = pt["submission"]
    assert subm["authenticated"].startswith("250"), subm
    assert subm["authenticated, sender not the login's"].startswith("553 5.7.1"), subm
    assert subm["unauthenticated, from outside"].startswith("554 5.7.1"), subm


# -- each broken piece of the issue -------------------------------------------

BROKEN = [
    ({"smtpd_recipient_restrictions": "permit_mynetworks, reject_bogus, reject_unauth_destination"},
     (), "smtpd_recipient_restrictions: reject_bogus: unknown restriction"),
    ({"smtpd_sender_restrictions": "check_sender_access"}, (),
     "smtpd_sender_restrictions: check_sender_access: missing argument"),
    ({"relay_domains": "hash:/nonexistent/relay_domains"}, (),
     "relay_domains: open database /nonexistent/relay_domains.db"),
    ({"virtual_mailbox_domains": "/nonexistent/vhost"}, (),
     "virtual_mailbox_domains: open /nonexistent/vhost"),
    ({"daemon_directory": "/usr/lib/postfix/sbin"}, (),
     "daemon_directory = /usr/lib/postfix/sbin: holds Postfix's programs"),
    # (smtpd_milters was one until the milter client: honoured now; a milter
    # list that cannot be parsed is named by check, tests/test_milter.py)
    ({}, ("submission inet n - n - - smtpd -o smtpd_client_restrictions=check_policy_service,"
          "private/policy",),
     "-o smtpd_client_restrictions: check_policy_service: expected a policy server"),
    ({}, ("submission inet n - n - - smtpd -o smtpd_proxy_filter=127.0.0.1:99999",),
     "-o smtpd_proxy_filter: smtpd_proxy_filter = 127.0.0.1:99999: bad port"),
    ({"smtpd_restriction_classes": "a_class", "a_class": "a_class"}, (),
     "a_class: the restriction class refers to itself"),
]


@pytest.mark.parametrize("params,master,want", BROKEN, ids=[b[2].split(":")[0] for b in BROKEN])
def test_each_broken_piece_fails_check_with_one_line(params, master, want, make_postern):
    p = make_postern(params=params, master_cf_extra=master, start=False)
    r = p.postern("check")
    assert r.returncode != 0, h.describe(r)
    lines = [l for l in r.stderr.splitlines() if want in l]
    assert len(lines) == 1, f"want one line with {want!r}\n{r.stderr}"
    assert re.search(r"/(main|master)\.cf(, line \d+)?: ", lines[0]), lines[0]
    r = p.postern("start")
    # Nor does it start (a table that cannot be opened included: one that
    # breaks under a running system defers the mail that needs it, see
    # tests/test_table_failures.py).
    assert r.returncode != 0 and want in r.stderr, h.describe(r)


def send(port, rcpt, body, sender="sender@client.test"):
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as c:
        c.ehlo("client.test")
        code, _ = c.mail(sender)
        assert code == 250
        code, text = c.rcpt(rcpt)
        if code != 250:
            return code, text.decode()
        code, text = c.data(h.crlf(body))
        return code, text.decode()


def test_domain_lists_from_files_and_tables_accept_mail(make_postern, local_users):
    """virtual_mailbox_domains = /file/name and relay_domains = type:table
    (with a hyphenated per-service parameter beside them) are read as
    Postfix reads them: mail for those domains is accepted, not 554
    Relay access denied."""
    p = make_postern(
        params={
            "mynetworks": "192.0.2.0/24",
            "virtual_mailbox_domains": lambda p: f"{p.etc}/vhost",
            "virtual_mailbox_maps": lambda p: f"texthash:{p.etc}/vmailbox",
            "virtual_mailbox_base": lambda p: f"{p.dir}/vmail",
            "virtual_uid_maps": "static:65534", "virtual_gid_maps": "static:65534",
            "virtual_minimum_uid": "1",
            "relay_domains": lambda p: f"texthash:{p.etc}/relay_domains, !deny.relay.test",
            "smtp-amavis_destination_recipient_limit": "1",
        },
        files={"etc/vhost": "# hosted\nhosted.test other.test\n",
               "etc/vmailbox": "box@hosted.test hosted/box/\n",
               "etc/relay_domains": "relay.test OK\n"},
        master_cf_extra=("smtp-amavis unix - - n - 2 smtp",))
    r = p.postern("check")
    assert r.returncode == 0, h.describe(r)
    assert "unused parameter" not in r.stderr, r.stderr
    assert send(p.port, "box@hosted.test", "Subject: t\n\nx\n")[0] == 250
    from test_resolve_vs_postfix import rcpt_replies
    replies = rcpt_replies(p.port, ["box@hosted.test", "x@relay.test", "x@sub.relay.test",
                                    "x@other.test", "x@nowhere.test"])
    assert replies["x@relay.test"].startswith("250"), replies
    assert replies["x@other.test"].startswith("550"), replies  # listed domain, unknown box
    assert replies["x@nowhere.test"].startswith("554"), replies
    # relay_domains is in parent_domain_matches_subdomains: the table's
    # key relay.test covers its subdomains, as in Postfix.
    assert replies["x@sub.relay.test"].startswith("250"), replies
    assert p.postconf("-h", "smtp-amavis_destination_recipient_limit").stdout.strip() == "1"


def test_cleanup_service_name_override_is_applied(make_postern, local_users):
    """`-o cleanup_service_name=scrub` on a submission port sends its mail
    through the second cleanup service, with that service's own
    `-o header_checks` (the header-scrubbing cleanup submission services
    use); port 25 keeps the plain cleanup."""
    sub_port = h.free_port()
    p = make_postern(
        start=False,
        files={"etc/scrub": "/^X-Secret:/ IGNORE\n"},
        master_cf_extra=(
            f"127.0.0.1:{sub_port} inet n - n - - smtpd -o cleanup_service_name=scrub "
            "-o syslog_name=postfix/$service_name",
            "scrub unix n - n - 0 cleanup -o header_checks=regexp:{etc}/scrub",
        ))
    # {etc} in master.cf: filled now that the directory is known.
    p.master_cf.write_text(p.master_cf.read_text().replace("{etc}", str(p.etc)))
    p.start()
    user = h.LOCAL_USERS[0]
    for port, token in ((sub_port, "via-submission"), (p.port, "via-smtp")):
        code, _ = send(port, f"{user}@{h.MYHOSTNAME}",
                       f"Subject: {token}\nX-Secret: {token}\n\nbody\n")
        assert code == 250
    sub = h.wait_for_messages(user, "Subject: via-submission")[0][1]
    smtp = h.wait_for_messages(user, "Subject: via-smtp")[0][1]
    assert b"X-Secret" not in sub, sub
    assert b"X-Secret: via-smtp" in smtp, smtp
    log = p.maillog.read_text()
    # syslog_name = postfix/$service_name: the service's own name.
    assert re.search(rf"postfix/127\.0\.0\.1:{sub_port}/smtpd\[\d+\]", log), log[-2000:]


def test_receive_override_options_reach_cleanup(make_postern, local_users):
    """`-o receive_override_options=no_header_body_checks` on pickup (as
    docker-mailserver's master.cf has it): locally submitted mail skips
    header_checks; mail by SMTP still meets them."""
    p = make_postern(
        start=False,
        files={"etc/hc": "/^X-Bad:/ REJECT bad header\n"},
        params={"header_checks": lambda p: f"regexp:{p.etc}/hc"},
        master_cf_extra=("pickup unix n - n 60 1 pickup "
                         "-o receive_override_options=no_header_body_checks",))
    p.start()
    user = h.LOCAL_USERS[0]
    r = p.sendmail(["-f", "s@client.test", f"{user}@{h.MYHOSTNAME}"],
                   b"Subject: via-pickup\nX-Bad: 1\n\nbody\n")
    assert r.returncode == 0, h.describe(r)
    assert b"X-Bad: 1" in h.wait_for_messages(user, "Subject: via-pickup")[0][1]
    code, text = send(p.port, f"{user}@{h.MYHOSTNAME}", "Subject: via-smtp\nX-Bad: 1\n\nbody\n")
    assert code // 100 == 5 and "bad header" in text, (code, text)


def test_postscreen_pass_service_overrides_reach_smtpd(make_postern):
    """With postscreen on port 25 (docker-mailserver's and mailcow's
    master.cf), the SMTP server's settings are the `smtpd pass` service's
    `-o` overrides: smtpd, which serves the pass service postscreen hands
    the client to (loopback is allowlisted by the default access list),
    takes them."""
    p = make_postern(start=False)
    p.master_cf_extra = [
        f"127.0.0.1:{p.port} inet n - n - 1 postscreen -o postscreen_greet_action=enforce",
        "smtpd pass - - n - - smtpd -o { smtpd_banner = $myhostname ESMTP passed-on }",
    ]
    p.write_master_cf()
    p.start()
    c = h.RawSmtp(p.port)
    try:
        banner = c.reply()[0]
    finally:
        c.close()
    assert "passed-on" in banner, banner
