"""Private database and directory servers for Postern's table tests, each in its own
temporary directory on a free loopback port, started by the test and
stopped by PID (recipes: /work/shared/design/peers.md):

    m = MariaDB().start()      # mariadbd as user mysql
    m.sql("CREATE DATABASE mail")          # as root, over the Unix socket
    m.restart()                            # same data directory and port
    m.stop()
    pg = Postgres().start()    # PostgreSQL 15 as user postgres
    pg.sql("CREATE ROLE ...")              # psql as postgres
    pg.restart(); pg.stop()
    d = Slapd(ldif).start()    # OpenLDAP's slapd, suffix dc=ldap,dc=test
    d.restart(); d.stop()

and the schema of PostfixAdmin (tables domain, mailbox, alias) that web
hosts keep their mail users in: ``postfixadmin_schema()`` (SQL usable by
all three servers) and ``postfixadmin_rows(domain, mailboxes, aliases)``.
"""

import os
import pwd
import shutil
import subprocess
import tempfile
from pathlib import Path

import postern_harness as h

PG_BIN = "/usr/lib/postgresql/15/bin"


def mariadb_available():
    return shutil.which("mariadbd") is not None or os.path.exists("/usr/sbin/mariadbd")


def postgres_available():
    return os.path.exists(f"{PG_BIN}/initdb")


def postfixadmin_schema():
    """PostfixAdmin's three tables, reduced to the columns Postfix reads."""
    return [
        "CREATE TABLE domain (domain VARCHAR(255) NOT NULL PRIMARY KEY, "
        "active SMALLINT NOT NULL DEFAULT 1)",
        "CREATE TABLE mailbox (username VARCHAR(255) NOT NULL PRIMARY KEY, "
        "password VARCHAR(255) NOT NULL, maildir VARCHAR(255) NOT NULL, "
        "domain VARCHAR(255) NOT NULL, active SMALLINT NOT NULL DEFAULT 1)",
        "CREATE TABLE alias (address VARCHAR(255) NOT NULL, goto TEXT NOT NULL, "
        "domain VARCHAR(255) NOT NULL, active SMALLINT NOT NULL DEFAULT 1)",
    ]


def postfixadmin_rows(domain, mailboxes, aliases):
    """INSERTs: mailboxes {user: password} (maildir DOMAIN/USER/, and the
    alias of each mailbox to itself, as PostfixAdmin writes it), aliases
    [(address, goto)] (one row each; an address may have several)."""
    out = [f"INSERT INTO domain (domain, active) VALUES ('{domain}', 1)"]
    for user, pw in mailboxes.items():
        local = user.split("@")[0]
        out.append("INSERT INTO mailbox (username, password, maildir, domain, active) VALUES "
                   f"('{user}', '{pw}', '{domain}/{local}/', '{domain}', 1)")
        out.append(f"INSERT INTO alias (address, goto, domain, active) VALUES "
                   f"('{user}', '{user}', '{domain}', 1)")
    for address, goto in aliases:
        out.append(f"INSERT INTO alias (address, goto, domain, active) VALUES "
                   f"('{address}', '{goto}', '{domain}', 1)")
    return out


def _wait_port(port, what, timeout=60, proc=None):
    import socket

    def up():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"{what}: the server exited with {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return True
        except OSError:
            return False
    h.wait_for(up, timeout, what=what)


class MariaDB:
    def __init__(self, tls=None):
        """``tls``: {ca, cert, key} files (readable by user mysql): the
        server offers TLS."""
        self.tls = tls
        self.dir = Path(tempfile.mkdtemp(prefix="pt-mariadb-"))
        os.chmod(self.dir, 0o755)
        mysql = pwd.getpwnam("mysql")
        os.chown(self.dir, mysql.pw_uid, mysql.pw_gid)
        self.data = self.dir / "data"
        self.socket = self.dir / "sock"
        self.port = h.free_port()
        self.proc = None

    def start(self):
        if not self.data.exists():
            self.data.mkdir()
            mysql = pwd.getpwnam("mysql")
            os.chown(self.data, mysql.pw_uid, mysql.pw_gid)
            r = subprocess.run(["mariadb-install-db", "--no-defaults", f"--datadir={self.data}",
                                "--user=mysql", "--auth-root-authentication-method=socket"],
                               capture_output=True, timeout=120)
            assert r.returncode == 0, r.stderr.decode()[-2000:]
        self.log = open(self.dir / "log", "ab")
        self.proc = subprocess.Popen(
            ["mariadbd", "--no-defaults", f"--datadir={self.data}", f"--socket={self.socket}",
             f"--port={self.port}", "--bind-address=127.0.0.1", "--user=mysql",
             "--skip-log-bin", "--max-connections=1000", f"--pid-file={self.dir}/pid",
             *([f"--ssl-ca={self.tls['ca']}", f"--ssl-cert={self.tls['cert']}",
                f"--ssl-key={self.tls['key']}"] if self.tls else [])],
            stdout=self.log, stderr=subprocess.STDOUT)
        try:
            _wait_port(self.port, "mariadbd listening", proc=self.proc)
        except AssertionError:
            self.stop()
            raise AssertionError((self.dir / "log").read_text()[-2000:])
        return self

    def sql(self, *statements, database=None):
        """Runs statements as root over the Unix socket; their output."""
        cmd = ["mariadb", "--no-defaults", f"--socket={self.socket}", "-uroot", "-N", "-B"]
        if database:
            cmd.append(database)
        r = subprocess.run(cmd, input=";\n".join(statements).encode() + b";\n",
                           capture_output=True, timeout=60)
        assert r.returncode == 0, r.stderr.decode()
        return r.stdout.decode()

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def kill(self):
        """Kills the server at once (SIGKILL), as a crash would."""
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.proc = None

    def restart(self):
        self.stop()
        return self.start()

    def remove(self):
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


class Postgres:
    def __init__(self):
        self.dir = Path(tempfile.mkdtemp(prefix="pt-pg-"))
        os.chmod(self.dir, 0o755)
        pg = pwd.getpwnam("postgres")
        os.chown(self.dir, pg.pw_uid, pg.pw_gid)
        self.data = self.dir / "data"
        self.port = h.free_port()

    def _as_postgres(self, *cmd, input=None):
        r = subprocess.run(["runuser", "-u", "postgres", "--", *cmd], input=input,
                           capture_output=True, timeout=120)
        assert r.returncode == 0, (cmd, r.stdout.decode()[-2000:], r.stderr.decode()[-2000:])
        return r.stdout.decode()

    def start(self):
        if not self.data.exists():
            self._as_postgres(f"{PG_BIN}/initdb", "-D", str(self.data), "-U", "postgres",
                              "--auth-local=trust", "--auth-host=scram-sha-256")
        self._as_postgres(f"{PG_BIN}/pg_ctl", "-D", str(self.data), "-l", f"{self.dir}/log", "-w",
                          "-o", f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 "
                          "-c max_connections=300", "start")
        return self

    def sql(self, *statements, database="postgres"):
        return self._as_postgres(f"{PG_BIN}/psql", "-h", str(self.dir), "-p", str(self.port),
                                 "-U", "postgres", "-d", database, "-v", "ON_ERROR_STOP=1",
                                 "-q", "-A", "-t",
                                 input=(";\n".join(statements) + ";\n").encode())

    def stop(self, mode="fast"):
        if (self.data / "postmaster.pid").exists():
            self._as_postgres(f"{PG_BIN}/pg_ctl", "-D", str(self.data), "-m", mode, "-w", "stop")

    def restart(self):
        self.stop()
        return self.start()

    def remove(self):
        try:
            self.stop(mode="immediate")
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)


def secret_file(path, text, group="mail"):
    """Writes a .cf file as distributions install them: mode 0640,
    owned by root and a group mail_owner is not in."""
    import grp
    path = Path(path)
    path.write_text(text)
    os.chown(path, 0, grp.getgrnam(group).gr_gid)
    os.chmod(path, 0o640)
    return path


class Slapd:
    """OpenLDAP's slapd with the mdb backend, suffix ``dc=ldap,dc=test``,
    root ``cn=admin,dc=ldap,dc=test`` / ``ROOTPW``, loaded with ``ldif``
    (anonymous reads allowed: no access lines)."""

    SUFFIX = "dc=ldap,dc=test"
    ROOTDN = "cn=admin,dc=ldap,dc=test"
    ROOTPW = "root-secret"

    def __init__(self, ldif, tls=None):
        """``tls``: {ca, cert, key} files: StartTLS offered, and required
        for every operation (``security tls=1``)."""
        self.dir = Path(tempfile.mkdtemp(prefix="pt-slapd-"))
        os.chmod(self.dir, 0o755)
        (self.dir / "db").mkdir()
        self.port = h.free_port()
        self.ldif = ldif
        self.conf = self.dir / "slapd.conf"
        self.conf.write_text(
            "include /etc/ldap/schema/core.schema\n"
            "include /etc/ldap/schema/cosine.schema\n"
            "include /etc/ldap/schema/inetorgperson.schema\n"
            "include /etc/ldap/schema/nis.schema\n"
            "include /etc/ldap/schema/misc.schema\n"
            "include /etc/ldap/schema/dyngroup.schema\n"
            "modulepath /usr/lib/ldap\nmoduleload back_mdb\n"
            f"pidfile {self.dir}/slapd.pid\n"
            + (f"TLSCACertificateFile {tls['ca']}\nTLSCertificateFile {tls['cert']}\n"
               f"TLSCertificateKeyFile {tls['key']}\nsecurity tls=1\n" if tls else "") +
            "database mdb\n"
            f'suffix "{self.SUFFIX}"\nrootdn "{self.ROOTDN}"\nrootpw {self.ROOTPW}\n'
            f"directory {self.dir}/db\n")
        self.loaded = False
        self.tls = tls

    def start(self):
        r = subprocess.run(["slapd", "-f", str(self.conf), "-h", f"ldap://127.0.0.1:{self.port}/"],
                           capture_output=True, timeout=60)
        assert r.returncode == 0, r.stderr.decode()
        _wait_port(self.port, "slapd listening")
        if not self.loaded:
            env = dict(os.environ)
            tls_args = []
            if self.tls:
                env["LDAPTLS_CACERT"] = str(self.tls["ca"])
                tls_args = ["-ZZ"]
            r = subprocess.run(["ldapadd", "-x", *tls_args, "-H", f"ldap://127.0.0.1:{self.port}/",
                                "-D", self.ROOTDN, "-w", self.ROOTPW],
                               input=self.ldif.encode(), capture_output=True, timeout=60, env=env)
            assert r.returncode == 0, r.stderr.decode() + r.stdout.decode()
            self.loaded = True
        return self

    def pid(self):
        try:
            return int((self.dir / "slapd.pid").read_text())
        except (OSError, ValueError):
            return None

    def stop(self):
        pid = self.pid()
        if pid and h.pid_alive(pid):
            os.kill(pid, 15)
            h.wait_for(lambda: not h.pid_alive(pid), 30, what="slapd to stop")

    def restart(self):
        self.stop()
        return self.start()

    def remove(self):
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


def slapd_available():
    return shutil.which("slapd") is not None or os.path.exists("/usr/sbin/slapd")
