"""The web host's mail users where its control panel keeps them: `mysql:`
(MariaDB), `pgsql:` (PostgreSQL 15) and `sqlite:` tables configured by
Postfix's own `.cf` files, against real servers started here with
PostfixAdmin's schema (domain, mailbox, alias); and `ldap:` against
OpenLDAP's slapd, as a company directory keeps the same users.

For each database: `virtual_mailbox_domains`, `virtual_mailbox_maps` and
`virtual_alias_maps` as the PostfixAdmin and ISPConfig guides write them;
a mailbox address, an alias and a list alias (two rows, joined with a
comma) are delivered to the virtual mailboxes, an unknown address of the
domain gets 550 at RCPT. The `.cf` files hold the database password and
are mode 0640 root:mail, which mail_owner cannot read: the daemons read
them as root before dropping privileges. The first server listed is a
dead port: the next one is tried. A server restarted under a running
Postern is connected again at the next lookup. `postmap -q` answers from
the same files. Run as root.
"""

import os
import pwd
import re
import sqlite3
import shutil
import smtplib
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

import pytest

import postern_harness as h
from dovecot import dovecot  # noqa: F401  (the fixture)
from postfix_peer import postfix_peer  # noqa: F401  (the fixture)
from postern_harness import wait_for
from table_servers import (MariaDB, Postgres, Slapd, mariadb_available, postfixadmin_rows,
                          postfixadmin_schema, postgres_available, secret_file,
                          slapd_available)

DOMAIN = "sql.test"
MAILBOXES = {"alice@sql.test": "apw", "bob@sql.test": "bpw"}
ALIASES = [("info@sql.test", "alice@sql.test"),
           ("team@sql.test", "alice@sql.test"),
           ("team@sql.test", "bob@sql.test")]
DB_PASSWORD = "s3cret-'pw"
VIRTUAL_MASTER_CF = ("virtual   unix  -       n       n       -       -       virtual",)

# The queries of PostfixAdmin's Postfix guide (DOCUMENTS/POSTFIX_CONF.txt).
QUERIES = {
    "virtual_mailbox_domains": "SELECT domain FROM domain WHERE domain='%s' AND active = '1'",
    "virtual_mailbox_maps": "SELECT maildir FROM mailbox WHERE username='%s' AND active = '1'",
    "virtual_alias_maps": "SELECT goto FROM alias WHERE address='%s' AND active = '1'",
}


@pytest.fixture(scope="module")
def root():
    if not h.is_root():
        pytest.skip("database servers and root-only .cf files need root")


@pytest.fixture(scope="module")
def mariadb(root):
    if not mariadb_available():
        pytest.fail("mariadb-server is not installed (scripts/test installs it)")
    from test_smtpd_tls_sasl import make_certs
    certs_dir = Path(tempfile.mkdtemp(prefix="pt-mariadb-certs-"))
    os.chmod(certs_dir, 0o755)
    m = MariaDB(tls=make_certs(certs_dir / "c")).start()
    m.sql("CREATE DATABASE mail")
    m.sql(*postfixadmin_schema(), *postfixadmin_rows(DOMAIN, MAILBOXES, ALIASES), database="mail")
    pw = DB_PASSWORD.replace("'", "''")
    m.sql(f"CREATE USER 'mailuser'@'127.0.0.1' IDENTIFIED BY '{pw}'",
          "GRANT SELECT ON mail.* TO 'mailuser'@'127.0.0.1'")
    yield m
    m.remove()
    shutil.rmtree(certs_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def postgres(root):
    if not postgres_available():
        pytest.fail("PostgreSQL 15 is not installed (scripts/test installs it)")
    pg = Postgres().start()
    pw = DB_PASSWORD.replace("'", "''")
    pg.sql(f"CREATE ROLE mailuser LOGIN PASSWORD '{pw}'", "CREATE DATABASE mail OWNER postgres")
    pg.sql(*postfixadmin_schema(), *postfixadmin_rows(DOMAIN, MAILBOXES, ALIASES),
           "GRANT SELECT ON domain, mailbox, alias TO mailuser", database="mail")
    yield pg
    pg.remove()


@pytest.fixture(scope="module")
def sqlite_db(root):
    d = Path(tempfile.mkdtemp(prefix="pt-sqlite-"))
    os.chmod(d, 0o755)
    path = d / "postfixadmin.sqlite"
    con = sqlite3.connect(path)
    for stmt in postfixadmin_schema() + postfixadmin_rows(DOMAIN, MAILBOXES, ALIASES):
        con.execute(stmt)
    con.commit()
    con.close()
    os.chmod(path, 0o644)
    yield path
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def etc_dir():
    d = Path(tempfile.mkdtemp(prefix="pt-sqlcf-"))
    os.chmod(d, 0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def cf_files(kind, etc, server, extra=""):
    """Postfix's .cf files for the three parameters; {param: "kind:path"}."""
    out = {}
    for param, query in QUERIES.items():
        if kind == "sqlite":
            text = f"dbpath = {server}\nquery = {query}\n"
        else:
            dead = h.free_port()
            text = (f"# {param} for Postfix\n"
                    f"user = mailuser\npassword = {DB_PASSWORD}\n"
                    f"hosts = inet:127.0.0.1:{dead}, inet:127.0.0.1:{server.port}\n"
                    f"dbname = mail\nquery = {query}\n{extra}")
        path = secret_file(etc / f"{kind}-{param.replace('_', '-')}.cf", text)
        out[param] = f"{kind}:{path}"
    return out


def start_postern(make_postern, tables, base):
    nobody = pwd.getpwnam("nobody")
    return make_postern(params={
        **tables,
        "virtual_mailbox_base": str(base),
        "virtual_uid_maps": f"static:{nobody.pw_uid}",
        "virtual_gid_maps": f"static:{nobody.pw_gid}",
    }, master_cf_extra=VIRTUAL_MASTER_CF)


def mail_base():
    base = Path(tempfile.mkdtemp(prefix="pt-vmail-"))
    nobody = pwd.getpwnam("nobody")
    os.chown(base, nobody.pw_uid, nobody.pw_gid)
    os.chmod(base, 0o700)
    return base


def send(p, rcpts, token):
    data = h.crlf(f"From: someone@example.org\nTo: {rcpts[0]}\nSubject: {token}\n\nbody {token}\n")
    with p.smtp() as s:
        s.ehlo("client.test")
        code, text = h.smtp_transaction(s, "someone@example.org", rcpts, data)
    assert code == 250, text


def messages_with(base, user, token):
    new = base / DOMAIN / user / "new"
    if not new.is_dir():
        return []
    return [f for f in new.iterdir() if token.encode() in f.read_bytes()]


def server_for(kind, request):
    return request.getfixturevalue({"mysql": "mariadb", "pgsql": "postgres",
                                    "sqlite": "sqlite_db"}[kind])


@pytest.mark.parametrize("kind", ["mysql", "pgsql", "sqlite"])
def test_postfixadmin_tables_deliver_and_refuse(kind, request, make_postern, etc_dir):
    server = server_for(kind, request)
    tables = cf_files(kind, etc_dir, server)
    for spec in tables.values():
        st = Path(spec.split(":", 1)[1]).stat()
        assert (st.st_mode & 0o777, st.st_uid) == (0o640, 0)
    base = mail_base()
    try:
        p = start_postern(make_postern, tables, base)
        token = "pt-" + uuid.uuid4().hex
        # A mailbox, an alias to it, and a list alias of two rows.
        send(p, ["alice@sql.test"], token + "-a")
        send(p, ["info@sql.test"], token + "-i")
        send(p, ["team@sql.test"], token + "-t")
        for user, suffix in (("alice", "-a"), ("alice", "-i"), ("alice", "-t"), ("bob", "-t")):
            wait_for(lambda: len(messages_with(base, user, token + suffix)) == 1, 30,
                     what=f"{token}{suffix} in {user}'s Maildir")
        p.wait_for_log(r"to=<alice@sql\.test>, orig_to=<info@sql\.test>, relay=virtual, "
                       r".*status=sent")
        # Unknown in the domain: 550 at RCPT; a domain not in the table:
        # relay denied.
        with p.smtp(source_address=("127.0.0.2", 0)) as s:
            s.ehlo("client.test")
            s.mail("someone@example.org")
            code, text = s.rcpt("carol@sql.test")
            assert code == 550, text
            assert b"5.1.1" in text, text
            code, text = s.rcpt("x@nosuch.test")
            assert code == 554 or code == 454 or code == 550, text
            code, text = s.rcpt("Alice@SQL.test")
            assert code == 250, text
        # postmap -q answers from the same files, rows joined by commas.
        r = h.run_tool(p, "postmap", "-q", "team@sql.test", tables["virtual_alias_maps"])
        assert r.returncode == 0, h.describe(r)
        assert sorted(r.stdout.strip().split(",")) == ["alice@sql.test", "bob@sql.test"]
        r = h.run_tool(p, "postmap", "-q", "carol@sql.test", tables["virtual_mailbox_maps"])
        assert r.returncode == 1, h.describe(r)
        # mail_owner could not have read the .cf files itself.
        assert not p.log_search(r"Permission denied"), p.log_tail()
    finally:
        shutil.rmtree(base, ignore_errors=True)


@pytest.mark.parametrize("kind", ["mysql", "pgsql"])
def test_server_restart_is_reconnected(kind, request, make_postern, etc_dir):
    server = server_for(kind, request)
    tables = cf_files(kind, etc_dir, server)
    base = mail_base()
    try:
        p = start_postern(make_postern, tables, base)
        token = "pt-" + uuid.uuid4().hex
        send(p, ["alice@sql.test"], token + "-1")
        wait_for(lambda: len(messages_with(base, "alice", token + "-1")) == 1, 30,
                 what="the first message")
        server.restart()
        # The same smtpd and virtual processes' connections were closed by
        # the restart: the next lookup connects again.
        send(p, ["info@sql.test"], token + "-2")
        wait_for(lambda: len(messages_with(base, "alice", token + "-2")) == 1, 30,
                 what="the message after the restart")
    finally:
        shutil.rmtree(base, ignore_errors=True)


def test_sqlite_key_quoting(make_postern, etc_dir, sqlite_db):
    """A key with a quote is a value, not SQL: no match, no error."""
    path = secret_file(etc_dir / "q.cf", f"dbpath = {sqlite_db}\n"
                       "query = SELECT goto FROM alias WHERE address='%s'\n")
    p = make_postern(start=False)
    r = h.run_tool(p, "postmap", "-q", "x' OR '1'='1", f"sqlite:{path}")
    assert r.returncode == 1, h.describe(r)
    r = h.run_tool(p, "postmap", "-q", "INFO@sql.test", f"sqlite:{path}")
    assert (r.returncode, r.stdout.strip()) == (0, "alice@sql.test"), h.describe(r)


def mysql_connections(m):
    """The connections of the table's database user, counted by MariaDB."""
    out = m.sql("SELECT COUNT(*) FROM information_schema.processlist WHERE user = 'mailuser'")
    return int(out.strip())


def proxymap_ask(sock, table, key):
    """One request on proxymap's socket, in its framing (a u32 length, then
    postcard: strings as a varint length and the bytes; the reply's enum as
    a varint index): (variant, text) with 0 found, 1 not found, 2 failed."""
    import socket as sk

    def string(v):
        b = v.encode()
        n, out = len(b), b""
        while True:
            out += bytes([(n & 0x7f) | (0x80 if n > 0x7f else 0)])
            n >>= 7
            if not n:
                return out + b
    body = string(table) + string(key)
    with sk.socket(sk.AF_UNIX, sk.SOCK_STREAM) as c:
        c.settimeout(30)
        c.connect(str(sock))
        c.sendall(len(body).to_bytes(4, "little") + body)
        data = b""
        while len(data) < 4 or len(data) < 4 + int.from_bytes(data[:4], "little"):
            chunk = c.recv(65536)
            assert chunk, data
            data += chunk
    reply = data[4:]
    variant, rest = reply[0], reply[1:]
    if variant == 1:
        return (1, None)
    n, shift, i = 0, 0, 0
    while True:
        n |= (rest[i] & 0x7f) << shift
        shift += 7
        i += 1
        if rest[i - 1] < 0x80:
            break
    return (variant, rest[i:i + n].decode())


PROXYMAP_MASTER_CF = ("proxymap  unix  -       -       n       -       1       proxymap",)


def user_stats(m):
    """(connections opened, SELECTs run) by the tables' database user since
    the last FLUSH USER_STATISTICS, from MariaDB's userstat."""
    out = m.sql("SELECT TOTAL_CONNECTIONS, SELECT_COMMANDS FROM information_schema.USER_STATISTICS "
                "WHERE USER = 'mailuser'").split()
    return (int(out[0]), int(out[1])) if out else (0, 0)


def reset_user_stats(m):
    m.sql("SET GLOBAL userstat = 1", "FLUSH USER_STATISTICS")


def test_proxy_mysql_bounds_database_connections(make_postern, etc_dir, mariadb):
    """500 SMTP sessions at once validate recipients against MariaDB
    through proxy:mysql: the database sees at most
    proxymap_connection_limit (2 here) connections per table (proxymap's
    process limit is 1), counted on the server; lookups that overlap
    (clients hammering proxymap) do use the second one."""
    import threading
    limit = 2
    tables = {k: "proxy:" + v for k, v in cf_files("mysql", etc_dir, mariadb).items()}
    base = mail_base()
    try:
        nobody = pwd.getpwnam("nobody")
        p = make_postern(params={
            **tables,
            "virtual_mailbox_base": str(base),
            "virtual_uid_maps": f"static:{nobody.pw_uid}",
            "virtual_gid_maps": f"static:{nobody.pw_gid}",
            "proxymap_connection_limit": str(limit),
        }, master_cf_extra=VIRTUAL_MASTER_CF + PROXYMAP_MASTER_CF)
        sessions = 500
        before = mysql_connections(mariadb)
        peak = [0]
        stop = threading.Event()

        seen = []

        def watch():
            while not stop.is_set():
                n = mysql_connections(mariadb) - before
                if n > peak[0]:
                    peak[0] = n
                    seen.append(subprocess.run(["ss", "-tnp", "dst", f"127.0.0.1:{mariadb.port}"],
                                               capture_output=True, text=True).stdout)
                stop.wait(0.05)
        watcher = threading.Thread(target=watch)
        watcher.start()
        ready = threading.Barrier(sessions, timeout=120)
        results, errors = {}, []

        def session(i):
            rcpt = ["alice@sql.test", "info@sql.test", "team@sql.test", "nobody@sql.test"][i % 4]
            try:
                with smtplib.SMTP("127.0.0.1", p.port, timeout=120) as s:
                    s.ehlo("client.test")
                    s.mail("someone@example.org")
                    ready.wait()
                    results[i] = (rcpt, s.rcpt(rcpt)[0])
                    s.rset()
            except Exception as e:  # reported below
                errors.append(f"{i}: {e!r}")
        threads = [threading.Thread(target=session, args=(i,)) for i in range(sessions)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=300)
        # One message through proxy: cleanup, qmgr and virtual look up too.
        token = "pt-" + uuid.uuid4().hex
        send(p, ["team@sql.test"], token)
        wait_for(lambda: len(messages_with(base, "bob", token)) == 1, 30, what="the message to bob")
        # Clients asking at the same time, as many as proxymap serves.
        sock = p.dir / "queue" / "private" / "proxymap"
        mailbox_table = tables["virtual_mailbox_maps"].removeprefix("proxy:")
        hammer_errors = []

        def hammer():
            try:
                for _ in range(40):
                    assert proxymap_ask(sock, mailbox_table, "bob@sql.test") == (0, "sql.test/bob/")
            except Exception as e:  # reported below
                hammer_errors.append(repr(e))
        hammers = [threading.Thread(target=hammer) for _ in range(16)]
        for t in hammers:
            t.start()
        for t in hammers:
            t.join(timeout=120)
        stop.set()
        watcher.join()
        assert not errors, errors[:5]
        assert not hammer_errors, hammer_errors[:5]
        wrong = {i: r for i, r in results.items()
                 if r[1] != (550 if r[0].startswith("nobody@") else 250)}
        assert len(results) == sessions and not wrong, list(wrong.items())[:5]
        # Three tables, at most `limit` connections each; the hammered
        # table opened its second one.
        assert 4 <= peak[0] <= 3 * limit, \
            f"{peak[0]} database connections at the peak: {seen[-1:]}"
        assert not p.log_search(r"lookup error"), p.log_tail()
        # proxymap answers a request for an approved table, and refuses a
        # table proxy_read_maps does not name (a client cannot make it
        # read a file of its choice as root).
        assert proxymap_ask(sock, mailbox_table, "bob@sql.test") == (0, "sql.test/bob/")
        assert proxymap_ask(sock, mailbox_table, "nobody@sql.test") == (1, None)
        variant, why = proxymap_ask(sock, "sqlite:/etc/shadow.cf", "root")
        assert variant == 2 and "proxy_read_maps" in why, why
        p.wait_for_log(r"proxymap\[\d+\]: warning: request for unapproved table: \"sqlite:/etc/shadow")
    finally:
        shutil.rmtree(base, ignore_errors=True)


def rcpt_session(port, rcpts):
    """One SMTP session: MAIL and the RCPTs, no DATA; the RCPT codes."""
    with smtplib.SMTP("127.0.0.1", port, timeout=60) as s:
        s.ehlo("client.test")
        s.mail("someone@example.org")
        codes = [s.rcpt(r)[0] for r in rcpts]
        s.rset()
    return codes


def test_proxymap_clients_keep_their_connection(make_postern, etc_dir, mariadb):
    """The daemons keep their connection to proxymap between lookups, so
    that proxymap's processes are not worn out by lookups: with max_use 1
    (a process serves 32 client connections) 200 RCPTs and their
    messages (some 1,000 lookups) open no more database connections than
    one proxymap process holds (3 tables × proxymap_connection_limit 4),
    counted by MariaDB; a client that connected for each lookup makes
    master start a process (and its 3 connections) every 32 lookups."""
    tables = {k: "proxy:" + v for k, v in cf_files("mysql", etc_dir, mariadb).items()}
    base = mail_base()
    try:
        nobody = pwd.getpwnam("nobody")
        p = make_postern(params={
            **tables,
            "virtual_mailbox_base": str(base),
            "virtual_uid_maps": f"static:{nobody.pw_uid}",
            "virtual_gid_maps": f"static:{nobody.pw_gid}",
            "max_use": "1",
            # The unknown users are errors: no error sleep (not what is
            # measured here).
            "smtpd_soft_error_limit": "100",
            "smtpd_hard_error_limit": "200",
        }, master_cf_extra=VIRTUAL_MASTER_CF + (
            "proxymap  unix  -       -       n       -       -       proxymap",))
        reset_user_stats(mariadb)
        rcpts = [["alice@sql.test", "info@sql.test", "team@sql.test", f"nobody{i}@sql.test"][i % 4]
                 for i in range(50)]
        for _ in range(4):
            codes = rcpt_session(p.port, rcpts)
            assert codes == [550 if r.startswith("nobody") else 250 for r in rcpts], codes
        tokens = ["pt-" + uuid.uuid4().hex for _ in range(3)]
        for t in tokens:
            send(p, ["team@sql.test", "info@sql.test"], t)
        for t in tokens:
            wait_for(lambda: len(messages_with(base, "bob", t)) == 1, 30, what="the message to bob")
        opened, selects = user_stats(mariadb)
        assert selects >= 600, selects
        assert 1 <= opened <= 12, f"{opened} database connections opened for {selects} SELECTs"
        assert not p.log_search(r"lookup error|connect to .*proxymap"), p.log_tail()
    finally:
        shutil.rmtree(base, ignore_errors=True)


def test_rcpt_queries_no_more_than_postfix(make_postern, etc_dir, mariadb, postfix_peer):
    """The same RCPTs (mailboxes, aliases, unknown users; relay control by
    reject_unauth_destination and the unlisted-recipient check) to
    Postfix 3.7 and to Postern on the same proxy:mysql: tables: Postern
    runs no more SELECTs than Postfix (each address is resolved once per
    RCPT, as Postfix's smtpd keeps its resolver's answers), counted by
    MariaDB."""
    import grp
    if "postfix-mysql" not in " ".join(os.listdir("/usr/lib/postfix")):
        pytest.fail("postfix-mysql is not installed (scripts/test installs it)")
    ours = {k: "proxy:" + v for k, v in cf_files("mysql", etc_dir, mariadb).items()}
    # Postfix's proxymap reads them as user postfix.
    theirs = {}
    for k, v in ours.items():
        path = Path(v.split(":", 2)[2])
        copy = secret_file(path.with_name("postfix-" + path.name), path.read_text(), group="postfix")
        theirs[k] = f"proxy:mysql:{copy}"
    assert grp.getgrnam("postfix")
    relay = {"mynetworks": "192.0.2.0/24",
             "smtpd_relay_restrictions": "permit_mynetworks, reject_unauth_destination"}
    rcpts = ["alice@sql.test", "info@sql.test", "team@sql.test", "bob@sql.test"] + \
            [f"nobody{i}@sql.test" for i in range(8)]
    want = [250] * 4 + [550] * 8
    far = postfix_peer(params={**theirs, **relay})
    reset_user_stats(mariadb)
    assert rcpt_session(far.port, rcpts) == want
    postfix_selects = user_stats(mariadb)[1]
    base = mail_base()
    try:
        p = make_postern(params={**ours, **relay, "virtual_mailbox_base": str(base)},
                         master_cf_extra=PROXYMAP_MASTER_CF)
        reset_user_stats(mariadb)
        assert rcpt_session(p.port, rcpts) == want
        postern_selects = user_stats(mariadb)[1]
    finally:
        shutil.rmtree(base, ignore_errors=True)
    assert 0 < postern_selects <= postfix_selects, \
        f"Postern {postern_selects} SELECTs, Postfix {postfix_selects}"


LDAP_DOMAIN = "ldap.test"
LDIF = """\
dn: dc=ldap,dc=test
objectClass: dcObject
objectClass: organization
o: Postern test
dc: ldap

dn: ou=people,dc=ldap,dc=test
objectClass: organizationalUnit
ou: people

dn: ou=groups,dc=ldap,dc=test
objectClass: organizationalUnit
ou: groups

dn: ou=domains,dc=ldap,dc=test
objectClass: organizationalUnit
ou: domains

dn: cn=ldap.test,ou=domains,dc=ldap,dc=test
objectClass: organizationalRole
objectClass: domainRelatedObject
cn: ldap.test
associatedDomain: ldap.test

dn: cn=postfix,dc=ldap,dc=test
objectClass: organizationalRole
objectClass: simpleSecurityObject
cn: postfix
userPassword: {pw}

dn: uid=alice,ou=people,dc=ldap,dc=test
objectClass: inetOrgPerson
objectClass: inetLocalMailRecipient
uid: alice
cn: Alice
sn: A
mail: alice@ldap.test
mailLocalAddress: alice@ldap.test
mailLocalAddress: info@ldap.test
userPassword: {alice_pw}

dn: uid=bob,ou=people,dc=ldap,dc=test
objectClass: inetOrgPerson
objectClass: inetLocalMailRecipient
uid: bob
cn: Bob
sn: B
mail: bob@ldap.test
mailLocalAddress: bob@ldap.test
userPassword: {bob_pw}

dn: cn=team,ou=groups,dc=ldap,dc=test
objectClass: groupOfNames
objectClass: inetLocalMailRecipient
cn: team
mailLocalAddress: team@ldap.test
member: uid=alice,ou=people,dc=ldap,dc=test
member: uid=bob,ou=people,dc=ldap,dc=test

dn: cn=everyone,ou=groups,dc=ldap,dc=test
objectClass: groupOfURLs
objectClass: inetLocalMailRecipient
cn: everyone
mailLocalAddress: everyone@ldap.test
memberURL: ldap:///ou=people,dc=ldap,dc=test??one?(objectClass=inetOrgPerson)
"""
# The people's own passwords (simple bind as their entry: Dovecot's auth_bind).
LDAP_USERS = {"alice@ldap.test": "alice-ldap-pw", "bob@ldap.test": "bob-ldap-pw"}


def ldif():
    return LDIF.format(pw=DB_PASSWORD, alice_pw=LDAP_USERS["alice@ldap.test"],
                       bob_pw=LDAP_USERS["bob@ldap.test"])


@pytest.fixture(scope="module")
def slapd(root):
    if not slapd_available():
        pytest.fail("slapd is not installed (scripts/test installs it)")
    d = Slapd(ldif()).start()
    yield d
    d.remove()


def ldap_cf_files(etc, d):
    """ldap_table(5) files as a company's Postfix has them: simple bind as
    cn=postfix with its password (0640 root:mail), version 3, a dead server
    first; the list alias through special_result_attribute = member."""
    common = (f"server_host = ldap://127.0.0.1:{h.free_port()}/ ldap://127.0.0.1:{d.port}/\n"
              "version = 3\nbind = yes\n"
              f"bind_dn = cn=postfix,{Slapd.SUFFIX}\nbind_pw = {DB_PASSWORD}\n"
              "timeout = 5\n")
    files = {
        "virtual_mailbox_domains": f"search_base = ou=domains,{Slapd.SUFFIX}\n"
                                   "query_filter = (associatedDomain=%s)\n"
                                   "result_attribute = associatedDomain\n",
        "virtual_mailbox_maps": f"search_base = ou=people,{Slapd.SUFFIX}\n"
                                "query_filter = (mail=%s)\nresult_attribute = mail\n"
                                "result_format = %d/%u/\n",
        "virtual_alias_maps": f"search_base = {Slapd.SUFFIX}\nscope = sub\n"
                              "query_filter = (mailLocalAddress=%s)\n"
                              "result_attribute = mail\nspecial_result_attribute = member\n"
                              "domain = ldap.test\n",
    }
    out = {}
    for param, text in files.items():
        path = secret_file(etc / f"ldap-{param.replace('_', '-')}.cf", common + text)
        out[param] = f"ldap:{path}"
    return out


def test_ldap_directory_delivers_and_refuses(make_postern, etc_dir, slapd):
    tables = ldap_cf_files(etc_dir, slapd)
    base = mail_base()
    try:
        p = start_postern(make_postern, tables, base)
        token = "pt-" + uuid.uuid4().hex
        send(p, ["alice@ldap.test"], token + "-a")
        send(p, ["info@ldap.test"], token + "-i")
        send(p, ["team@ldap.test"], token + "-t")

        def in_box(user, t):
            new = base / LDAP_DOMAIN / user / "new"
            return new.is_dir() and [f for f in new.iterdir() if t.encode() in f.read_bytes()]
        for user, suffix in (("alice", "-a"), ("alice", "-i"), ("alice", "-t"), ("bob", "-t")):
            wait_for(lambda: in_box(user, token + suffix), 30,
                     what=f"{token}{suffix} in {user}'s Maildir")
        with p.smtp(source_address=("127.0.0.2", 0)) as s:
            s.ehlo("client.test")
            s.mail("someone@example.org")
            code, text = s.rcpt("carol@ldap.test")
            assert code == 550 and b"5.1.1" in text, text
            # A filter metacharacter in the key is a value, not a wildcard.
            code, text = s.rcpt("*@ldap.test")
            assert code in (501, 550), text
        r = h.run_tool(p, "postmap", "-q", "team@ldap.test", tables["virtual_alias_maps"])
        assert r.returncode == 0, h.describe(r)
        assert sorted(r.stdout.strip().split(",")) == ["alice@ldap.test", "bob@ldap.test"]
        # domain = ldap.test: other domains are not searched.
        r = h.run_tool(p, "postmap", "-q", "alice@other.test", tables["virtual_alias_maps"])
        assert r.returncode == 1, h.describe(r)
        # The directory restarted under Postern: connected again.
        slapd.restart()
        send(p, ["info@ldap.test"], token + "-r")
        wait_for(lambda: in_box("alice", token + "-r"), 30, what="the message after the restart")
    finally:
        shutil.rmtree(base, ignore_errors=True)


@pytest.mark.parametrize("through", ["direct", "proxymap"])
def test_database_killed_under_load(through, make_postern, etc_dir, mariadb):
    """MariaDB killed (SIGKILL) while clients keep sending: every RCPT
    meanwhile gets 4xx, never 5xx; every message accepted (before, during,
    after) is delivered once the server is back; RCPT gets 250 again. The
    tables opened by each daemon, or proxy: tables through proxymap."""
    import threading
    tables = cf_files("mysql", etc_dir, mariadb, extra="retry_interval = 2\n")
    if through == "proxymap":
        tables = {k: "proxy:" + v for k, v in tables.items()}
    base = mail_base()
    try:
        nobody = pwd.getpwnam("nobody")
        p = make_postern(params={
            **tables,
            "virtual_mailbox_base": str(base),
            "virtual_uid_maps": f"static:{nobody.pw_uid}",
            "virtual_gid_maps": f"static:{nobody.pw_gid}",
        }, master_cf_extra=VIRTUAL_MASTER_CF + PROXYMAP_MASTER_CF)
        phase = ["up"]
        # "starting": the server is coming back (it may answer before
        # start() returns), so either answer is right there.
        codes = {"up": [], "down": [], "starting": [], "back": []}
        accepted = []
        stop = threading.Event()

        def sender():
            while not stop.is_set():
                token = "pt-" + uuid.uuid4().hex
                now = phase[0]
                try:
                    with p.smtp() as s:
                        s.ehlo("client.test")
                        s.mail("someone@example.org")
                        code, text = s.rcpt("info@sql.test")
                        codes[now].append((code, text))
                        if code == 250:
                            data = h.crlf(f"Subject: {token}\n\nbody {token}\n")
                            c, t = s.data(data.encode() if isinstance(data, str) else data)
                            if c == 250:
                                accepted.append(token)
                            else:
                                codes[now].append((c, t))
                except Exception as e:  # a refused connection would show here
                    codes[now].append((0, repr(e).encode()))
                time.sleep(0.05)
        threads = [threading.Thread(target=sender) for _ in range(3)]
        for t in threads:
            t.start()
        time.sleep(2)
        mariadb.kill()
        phase[0] = "down"
        time.sleep(4)
        phase[0] = "starting"
        mariadb.start()
        phase[0] = "back"
        wait_for(lambda: any(c == 250 for c, _ in codes["back"]), 60, what="RCPT accepted again")
        time.sleep(2)
        stop.set()
        for t in threads:
            t.join(timeout=60)
        every = [c for cs in codes.values() for c, _ in cs]
        assert not [c for c in every if c >= 500 or c == 0], codes
        assert codes["down"] and all(400 <= c < 500 for c, _ in codes["down"][1:]), codes["down"]
        assert any(b"4.3.0" in t for c, t in codes["down"]), codes["down"]
        assert accepted

        def delivered():
            new = base / DOMAIN / "alice" / "new"
            got = [f.read_bytes() for f in new.iterdir()] if new.is_dir() else []
            return all(sum(tok.encode() in g for g in got) == 1 for tok in accepted)
        wait_for(delivered, 90, what=f"all {len(accepted)} accepted messages delivered once")
    finally:
        shutil.rmtree(base, ignore_errors=True)


def dovecot_passdb(kind, server, etc):
    """Dovecot's passdb on the same database as Postern's tables, as the
    hosting guides write it: the SQL drivers read PostfixAdmin's mailbox
    table (a read-only account of Dovecot's own for MariaDB and
    PostgreSQL, the file itself for SQLite); LDAP binds as the user's
    entry (auth_bind), found by its mail attribute with Postfix's
    cn=postfix account. Returns the passdb block for dovecot.conf."""
    query = ("password_query = SELECT username AS user, password FROM mailbox "
             "WHERE username = '%u' AND active = '1'\n")
    if kind == "mysql":
        server.sql("CREATE USER IF NOT EXISTS 'dovecot'@'127.0.0.1' IDENTIFIED BY 'dovecotpw'",
                   "GRANT SELECT ON mail.mailbox TO 'dovecot'@'127.0.0.1'")
        text = ("driver = mysql\n"
                f"connect = host=127.0.0.1 port={server.port} dbname=mail user=dovecot "
                "password=dovecotpw\ndefault_pass_scheme = PLAIN\n" + query)
        driver = "sql"
    elif kind == "pgsql":
        server.sql("DO $$ BEGIN IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'dovecot') "
                   "THEN CREATE ROLE dovecot LOGIN PASSWORD 'dovecotpw'; END IF; END $$")
        server.sql("GRANT SELECT ON mailbox TO dovecot", database="mail")
        text = ("driver = pgsql\n"
                f"connect = host=127.0.0.1 port={server.port} dbname=mail user=dovecot "
                "password=dovecotpw\ndefault_pass_scheme = PLAIN\n" + query)
        driver = "sql"
    elif kind == "sqlite":
        text = f"driver = sqlite\nconnect = {server}\ndefault_pass_scheme = PLAIN\n" + query
        driver = "sql"
    else:
        text = (f"uris = ldap://127.0.0.1:{server.port}/\nldap_version = 3\n"
                f"dn = cn=postfix,{Slapd.SUFFIX}\ndnpass = {DB_PASSWORD}\n"
                f"auth_bind = yes\nbase = ou=people,{Slapd.SUFFIX}\nscope = subtree\n"
                "pass_filter = (&(objectClass=inetOrgPerson)(mail=%u))\n"
                # The login stays the address (Dovecot's default maps uid
                # to the user name).
                "pass_attrs = mail=user\n")
        driver = "ldap"
    conf = etc / f"dovecot-{kind}.conf.ext"
    conf.write_text(text)
    # Dovecot's auth worker reads it as user dovecot.
    os.chmod(conf, 0o644)
    return f"passdb {{\n  driver = {driver}\n  args = {conf}\n}}\n"


@pytest.mark.parametrize("kind", ["mysql", "pgsql", "sqlite", "ldap"])
def test_dovecot_and_postern_share_the_database(kind, request, make_postern, etc_dir, dovecot):
    """Dovecot's passdb reads the same database as Postern's tables
    (MariaDB, PostgreSQL, SQLite: PostfixAdmin's mailbox table; OpenLDAP:
    the user's entry): the mailbox user authenticates for submission
    (port 587 service, smtpd_sasl_type = dovecot) and relays; a wrong
    password is 535; mail to the user's alias is delivered through the
    same database's tables; unauthenticated, no relaying."""
    if kind == "ldap":
        server = request.getfixturevalue("slapd")
        tables, domain, users = ldap_cf_files(etc_dir, server), LDAP_DOMAIN, LDAP_USERS
    else:
        server = server_for(kind, request)
        tables, domain, users = cf_files(kind, etc_dir, server), DOMAIN, MAILBOXES
    user, password = f"alice@{domain}", users[f"alice@{domain}"]
    dc = dovecot(users={}, auth_failure_delay="0 secs",
                 extra_conf=dovecot_passdb(kind, server, etc_dir))
    base = mail_base()
    sub = h.free_port()
    try:
        nobody = pwd.getpwnam("nobody")
        p = make_postern(params={
            **tables,
            "virtual_mailbox_base": str(base),
            "virtual_uid_maps": f"static:{nobody.pw_uid}",
            "virtual_gid_maps": f"static:{nobody.pw_gid}",
            "smtpd_sasl_type": "dovecot",
            "smtpd_sasl_path": str(dc.auth_socket),
        }, master_cf_extra=VIRTUAL_MASTER_CF + (
            f"127.0.0.1:{sub} inet n - n - - smtpd",
            "  -o syslog_name=postern/submission",
            "  -o smtpd_sasl_auth_enable=yes",
            "  -o smtpd_relay_restrictions=permit_sasl_authenticated,reject",
        ))
        h.wait_for(lambda: h.smtp_banner_ok(sub), 20, what="the submission port")
        # A wrong password, and another mailbox's password, each from its
        # own address: Dovecot's auth penalty delays every later login from
        # an address that failed (seconds, doubling), which only slows the
        # test down.
        for source, wrong in (("127.0.0.3", "wrong"), ("127.0.0.4", users[f"bob@{domain}"])):
            with smtplib.SMTP("127.0.0.1", sub, timeout=30, source_address=(source, 0)) as s:
                s.ehlo("client.test")
                with pytest.raises(smtplib.SMTPAuthenticationError) as e:
                    s.login(user, wrong)
                assert e.value.smtp_code == 535
        with smtplib.SMTP("127.0.0.1", sub, timeout=30, source_address=("127.0.0.2", 0)) as s:
            s.ehlo("client.test")
            code, _ = s.login(user, password)
            assert code == 235
            s.mail(user)
            code, text = s.rcpt("someone@far.test")
            assert code == 250, text
            s.rset()
            token = "pt-" + uuid.uuid4().hex
            msg = h.crlf(f"From: {user}\nTo: info@{domain}\nSubject: {token}\n\nx\n")
            assert s.sendmail(user, [f"info@{domain}"], msg) == {}
        new = base / domain / "alice" / "new"
        wait_for(lambda: new.is_dir() and len([f for f in new.iterdir()
                                               if token.encode() in f.read_bytes()]) == 1,
                 30, what="the submitted message in alice's Maildir")
        # The passdb of the database answered (not the empty passwd-file).
        log = dc.log_text()
        assert f"{'ldap' if kind == 'ldap' else 'sql'}({user}," in log, log[-3000:]
        p.wait_for_log(rf"sasl_method=PLAIN, sasl_username={re.escape(user)}$")
        # Not authenticated: no relaying on the submission port.
        with smtplib.SMTP("127.0.0.1", sub, timeout=30, source_address=("127.0.0.2", 0)) as s:
            s.ehlo("client.test")
            s.mail(user)
            code, text = s.rcpt("someone@far.test")
            assert code == 554, text
    finally:
        shutil.rmtree(base, ignore_errors=True)


@pytest.mark.parametrize("kind", ["mysql", "pgsql", "sqlite", "ldap"])
def test_chrooted_daemons_use_the_tables(kind, request, make_postern, etc_dir):
    """Debian's master.cf runs smtpd, cleanup and qmgr chrooted in the
    queue directory: the tables were opened (and their client libraries
    loaded) before the chroot, the servers are reached from inside."""
    from test_chroot import chroot_everything
    if kind == "ldap":
        tables = ldap_cf_files(etc_dir, request.getfixturevalue("slapd"))
        domain = LDAP_DOMAIN
    else:
        tables = cf_files(kind, etc_dir, server_for(kind, request))
        domain = DOMAIN
    base = mail_base()
    try:
        nobody = pwd.getpwnam("nobody")
        p = make_postern(start=False, params={
            **tables,
            "virtual_mailbox_base": str(base),
            "virtual_uid_maps": f"static:{nobody.pw_uid}",
            "virtual_gid_maps": f"static:{nobody.pw_gid}",
        }, master_cf_extra=VIRTUAL_MASTER_CF)
        chroot_everything(p, services=("cleanup", "qmgr", "smtpd"))
        p.start()
        token = "pt-" + uuid.uuid4().hex
        send(p, [f"info@{domain}"], token)
        new = base / domain / "alice" / "new"
        wait_for(lambda: new.is_dir() and any(token.encode() in f.read_bytes()
                                              for f in new.iterdir()),
                 30, what="the message in alice's Maildir")
        with p.smtp() as s:
            s.ehlo("client.test")
            s.mail("someone@example.org")
            code, text = s.rcpt(f"carol@{domain}")
            assert code == 550, text
        assert not p.log_search(r"lookup error|cannot load"), p.log_tail()
    finally:
        shutil.rmtree(base, ignore_errors=True)


def test_server_address_forms(make_postern, etc_dir, mariadb, postgres):
    """hosts as Postfix takes them: MySQL over its Unix socket; PostgreSQL
    by connection URIs, over TCP and to its socket directory."""
    from urllib.parse import quote
    # Over the socket the client is 'localhost' (a user of its own: a
    # 'mailuser'@'localhost' would also match TCP clients from 127.0.0.1).
    mariadb.sql("CREATE USER IF NOT EXISTS 'sockuser'@'localhost' IDENTIFIED BY 'sockpw'",
                "GRANT SELECT ON mail.* TO 'sockuser'@'localhost'")
    query = QUERIES["virtual_alias_maps"]
    forms = {
        "mysql-unix": ("mysql", f"hosts = unix:{mariadb.socket}\nuser = sockuser\n"
                                f"password = sockpw\ndbname = mail\n"),
        "pgsql-uri": ("pgsql", "hosts = postgresql://mailuser:"
                               f"{quote(DB_PASSWORD, safe='')}@127.0.0.1:{postgres.port}/mail\n"),
        # unix:/dir means the default port, as in Postfix: the test's
        # server listens on another, named in a URI to the socket directory.
        "pgsql-uri-socket": ("pgsql", f"hosts = postgresql:///mail?host={postgres.dir}"
                                      f"&port={postgres.port}&user=mailuser\n"),
    }
    p = make_postern(start=False)
    for name, (kind, text) in forms.items():
        path = secret_file(etc_dir / f"{name}.cf", text + f"query = {query}\n")
        r = h.run_tool(p, "postmap", "-q", "info@sql.test", f"{kind}:{path}")
        assert (r.returncode, r.stdout.strip()) == (0, "alice@sql.test"), (name, h.describe(r))


def test_ldap_start_tls(make_postern, etc_dir, root, tmp_path):
    """A directory that requires TLS: with start_tls = yes and the CA
    (tls_ca_cert_file, tls_require_cert = yes) the lookup answers; without
    STARTTLS the bind is refused, and the lookup fails (not "not found")."""
    from test_smtpd_tls_sasl import make_certs
    if not slapd_available():
        pytest.fail("slapd is not installed (scripts/test installs it)")
    certs = make_certs(tmp_path / "certs")
    d = Slapd(ldif(), tls=certs).start()
    try:
        base = (f"server_host = ldap://127.0.0.1:{d.port}/\nversion = 3\n"
                f"bind_dn = cn=postfix,{Slapd.SUFFIX}\nbind_pw = {DB_PASSWORD}\n"
                f"search_base = {Slapd.SUFFIX}\nquery_filter = (mailLocalAddress=%s)\n"
                "result_attribute = mail\n")
        tls = secret_file(etc_dir / "tls.cf", base + "start_tls = yes\ntls_require_cert = yes\n"
                          f"tls_ca_cert_file = {certs['ca']}\n")
        plain = secret_file(etc_dir / "plain.cf", base)
        p = make_postern(start=False)
        r = h.run_tool(p, "postmap", "-q", "info@ldap.test", f"ldap:{tls}")
        assert (r.returncode, r.stdout.strip()) == (0, "alice@ldap.test"), h.describe(r)
        r = h.run_tool(p, "postmap", "-q", "info@ldap.test", f"ldap:{plain}")
        assert r.stdout.strip() == "" and "onfidentiality required" in r.stderr + p.log_text(), \
            h.describe(r)
    finally:
        d.remove()


def test_mysql_tls(make_postern, etc_dir, mariadb):
    """tls_CAfile and tls_verify_cert = yes: the lookup goes over TLS with
    the server's certificate verified; an account that requires TLS is
    refused without them (a failure, not "not found")."""
    mariadb.sql("CREATE USER IF NOT EXISTS 'tlsuser'@'127.0.0.1' IDENTIFIED BY 'tlspw' REQUIRE SSL",
                "GRANT SELECT ON mail.* TO 'tlsuser'@'127.0.0.1'")
    base = (f"hosts = inet:127.0.0.1:{mariadb.port}\nuser = tlsuser\npassword = tlspw\n"
            f"dbname = mail\nquery = {QUERIES['virtual_alias_maps']}\n")
    tls = secret_file(etc_dir / "tls.cf", base + f"tls_CAfile = {mariadb.tls['ca']}\n"
                      "tls_verify_cert = yes\n")
    plain = secret_file(etc_dir / "plain.cf", base)
    p = make_postern(start=False)
    r = h.run_tool(p, "postmap", "-q", "info@sql.test", f"mysql:{tls}")
    assert (r.returncode, r.stdout.strip()) == (0, "alice@sql.test"), h.describe(r)
    r = h.run_tool(p, "postmap", "-q", "info@sql.test", f"mysql:{plain}")
    assert r.stdout.strip() == "" and "Access denied" in r.stderr + p.log_text(), h.describe(r)


def server_settings(kind, server):
    if kind == "sqlite":
        return f"dbpath = {server}\n"
    if kind == "ldap":
        return (f"server_host = ldap://127.0.0.1:{server.port}/\nversion = 3\n"
                f"bind_dn = cn=postfix,{Slapd.SUFFIX}\nbind_pw = {DB_PASSWORD}\n")
    return (f"hosts = inet:127.0.0.1:{server.port}\nuser = mailuser\n"
            f"password = {DB_PASSWORD}\ndbname = mail\n")


# (name, settings by kind, keys): the same .cf file given to Postfix's and
# Postern's postmap -q. `||` is SQL's concatenation in PostgreSQL and
# SQLite; MariaDB's CONCAT.
def concat(kind, *parts):
    if kind == "mysql":
        return "CONCAT(" + ", ".join(parts) + ")"
    return " || ".join(parts)


def comparison_cases(kind):
    if kind == "ldap":
        d = LDAP_DOMAIN
        return [
            ("filter", f"search_base = {Slapd.SUFFIX}\nquery_filter = (mailLocalAddress=%s)\n"
                       "result_attribute = mail\n",
             [f"info@{d}", f"ALICE@{d}", f"carol@{d}", d, "a*@ldap.test"]),
            ("special", f"search_base = {Slapd.SUFFIX}\nquery_filter = (mailLocalAddress=%s)\n"
                        "result_attribute = mail\nspecial_result_attribute = member memberURL\n"
                        "result_format = <%s> for %U at %D\n",
             [f"team@{d}", f"info@{d}", f"everyone@{d}"]),
            ("url-attrs", f"search_base = {Slapd.SUFFIX}\nquery_filter = (mailLocalAddress=%s)\n"
                          "result_attribute = mail uid\nspecial_result_attribute = memberURL\n",
             [f"everyone@{d}"]),
            ("parts", f"search_base = ou=people,{Slapd.SUFFIX}\nquery_filter = (&(uid=%u)(mail=*@%d))\n"
                      "result_attribute = uid mail\ndomain = ldap.test\n",
             [f"alice@{d}", "alice@other.test", "alice", f"@{d}"]),
            ("base", "search_base = ou=people,dc=%2,dc=%1\nquery_filter = (uid=%u)\n"
                     "result_attribute = mail\nscope = one\n",
             [f"bob@{d}", "bob@nowhere.test", "bob@test"]),
        ]
    d = DOMAIN
    return [
        ("alias", f"query = {QUERIES['virtual_alias_maps']}\n",
         [f"info@{d}", f"team@{d}", f"Alice@SQL.test", f"carol@{d}", d, f"o'brien@{d}",
          "x%s@sql.test"]),
        ("parts", "query = SELECT goto FROM alias WHERE address = "
                  + concat(kind, "'%u'", "'@'", "'%d'") + "\nresult_format = %u@relay.%D\n",
         [f"team@{d}", "team", f"@{d}", f"info@{d}"]),
        ("labels", "query = SELECT domain FROM domain WHERE domain = '%2.%1'\n"
                   "result_format = smtp:[%s]\n",
         [f"u@{d}", f"u@mx.{d}", "u@localhost", "sql.test", "u@.test"]),
        ("domain", f"query = {QUERIES['virtual_mailbox_maps']}\ndomain = sql.test\n",
         [f"alice@{d}", "alice@other.test", d]),
        ("legacy", "table = mailbox\nselect_field = maildir\nwhere_field = username\n"
                   "additional_conditions = AND active = '1'\n",
         [f"bob@{d}", f"carol@{d}"]),
    ]


@pytest.mark.parametrize("kind", ["mysql", "pgsql", "sqlite", "ldap"])
def test_same_answers_as_postfix(kind, request, make_postern, etc_dir):
    """Postfix 3.7's postmap -q (postfix-mysql, -pgsql, -sqlite, -ldap) and
    Postern's on the same .cf files and servers: the same value, or both
    not found, for every key."""
    if not os.path.exists("/usr/lib/postfix/postfix-mysql.so"):
        pytest.fail("postfix-mysql and its siblings are not installed (scripts/test installs them)")
    server = request.getfixturevalue({"mysql": "mariadb", "pgsql": "postgres",
                                      "sqlite": "sqlite_db", "ldap": "slapd"}[kind])
    from concurrent.futures import ThreadPoolExecutor
    p = make_postern(start=False)
    differ, found = [], []
    cases = []
    for name, settings, keys in comparison_cases(kind):
        cf = secret_file(etc_dir / f"{kind}-{name}.cf", server_settings(kind, server) + settings)
        # postmap -q - reads the keys from stdin, prints "key<TAB>value"
        # for each one found.
        cases.append((name, cf, "".join(k + "\n" for k in keys).encode()))
    # Postfix's postmap takes seconds to exit: all of them at once.
    with ThreadPoolExecutor(len(cases)) as pool:
        postfix = list(pool.map(lambda c: h.run(["/usr/sbin/postmap", "-q", "-", f"{kind}:{c[1]}"],
                                                input=c[2]), cases))
    for (name, cf, keys_in), theirs in zip(cases, postfix):
        ours = h.run_tool(p, "postmap", "-q", "-", f"{kind}:{cf}", input=keys_in)
        t = (theirs.returncode, theirs.stdout.splitlines())
        o = (ours.returncode, ours.stdout.splitlines())
        if t != o:
            differ.append((name, "postfix", t, theirs.stderr.strip()[-300:],
                           "postern", o, ours.stderr.strip()[-300:]))
        found.append((name, o[1]))
    assert not differ, "\n".join(map(str, differ))
    # Every case found something (the comparison is not of two failures).
    assert all(lines for _, lines in found), found


@pytest.mark.parametrize("kind", ["mysql", "pgsql"])
def test_hung_server_is_a_failure_not_a_hang(kind, request, make_postern, etc_dir):
    """A server that accepts connections and never answers (stopped with
    SIGSTOP): the lookup fails within the timeouts (10 s to connect, to
    each server of the list), it does not hang and is not "not found"."""
    import signal
    server = server_for(kind, request)
    if kind == "mysql":
        pid = server.proc.pid
    else:
        pid = int((server.data / "postmaster.pid").read_text().split()[0])
    cf = secret_file(etc_dir / f"{kind}-hung.cf",
                     f"hosts = inet:127.0.0.1:{server.port}\nuser = mailuser\n"
                     f"password = {DB_PASSWORD}\ndbname = mail\n"
                     f"query = {QUERIES['virtual_alias_maps']}\n")
    p = make_postern(start=False)
    os.kill(pid, signal.SIGSTOP)
    try:
        started = time.monotonic()
        r = h.run_tool(p, "postmap", "-q", "info@sql.test", f"{kind}:{cf}", timeout=120)
        took = time.monotonic() - started
    finally:
        os.kill(pid, signal.SIGCONT)
    assert r.stdout.strip() == "" and r.returncode != 0, h.describe(r)
    assert "lookup error" in r.stderr, h.describe(r)
    # The server is listed once, so tried twice (as Postfix does).
    assert took < 2 * 10 + 10, took
    r = h.run_tool(p, "postmap", "-q", "info@sql.test", f"{kind}:{cf}")
    assert (r.returncode, r.stdout.strip()) == (0, "alice@sql.test"), h.describe(r)
