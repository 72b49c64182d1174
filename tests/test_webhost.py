"""Postern as a web host runs it: the programs that submit mail through
sendmail (PHP's mail(), bsd-mailx's mail, git send-email, cron's
invocation) as an unprivileged user, and the installation command.

The unprivileged user (ptbob, the "web user") runs Postern's plain
sendmail, which hands the message to a set-gid postdrop exactly as on an
installed system (command_directory points at a set-gid copy). The
configuration directory is passed as MAIL_CONFIG, as an administrator
would point programs at a second instance.
"""

import grp
import os
import pwd
import shutil
import subprocess
import uuid
from pathlib import Path

import pytest

import postern_harness as h


def new_token():
    return "pt-" + uuid.uuid4().hex


def the_one(messages, what):
    assert len(messages) == 1, f"expected exactly one {what}, found {len(messages)}"
    return messages[0]


@pytest.fixture
def webhost(make_postern, local_users):
    """A started Postern whose set-gid postdrop is in DIR/bin, and the
    plain sendmail next to it (DIR/bin/sendmail, mode 0755)."""
    p = make_postern(start=False)
    if not p.setgid_possible():
        pytest.skip("set-gid programs cannot run here (nosuid)")
    bindir = p.dir / "bin"
    bindir.mkdir(mode=0o755, exist_ok=True)
    for name, mode in (("postdrop", 0o2755), ("sendmail", 0o755)):
        dest = bindir / name
        shutil.copyfile(p.cmd(name), dest)
        os.chown(dest, 0, grp.getgrnam("postdrop").gr_gid)
        os.chmod(dest, mode)
    p.set_params(command_directory=str(bindir))
    p.start()
    p.sendmail_path = bindir / "sendmail"
    return p


def run_as(p, user, cmd, input=None, env_extra=None, cwd=None):
    env = p.env()
    env.update(env_extra or {})
    home = pwd.getpwnam(user).pw_dir
    env["HOME"] = home
    return h.run(cmd, input=input, env=env, user=user, cwd=cwd or home, timeout=120)


def tool(name):
    path = shutil.which(name)
    if not path:
        pytest.skip(f"{name} is not installed (scripts/test installs it)")
    return path


def test_php_mail(webhost):
    php = tool("php")
    p = webhost
    token = new_token()
    code = ("$ok = mail('ptalice@postern.test', 'PHP " + token + "', "
            "\"Hello from PHP.\\nSecond line.\", "
            "\"From: Web Site <www@postern.test>\\r\\nReply-To: help@postern.test\"); "
            "exit($ok ? 0 : 1);")
    r = run_as(p, "ptbob", [php, "-d", f"sendmail_path={p.sendmail_path} -t -i", "-r", code])
    assert r.returncode == 0, h.describe(r)
    _p, raw = the_one(h.wait_for_messages("ptalice", token), "PHP message")
    msg = h.parse_message(raw)
    assert msg["Subject"] == f"PHP {token}"
    assert msg["To"] == "ptalice@postern.test"
    assert msg["From"] == "Web Site <www@postern.test>"
    assert msg["Reply-To"] == "help@postern.test"
    assert msg["Message-Id"] and msg["Date"]
    assert h.header_values(raw, "Return-Path") == ["<ptbob@postern.test>"]
    assert msg.get_content() == "Hello from PHP.\nSecond line.\n"


def test_bsd_mailx(webhost):
    mail = tool("bsd-mailx")
    p = webhost
    token = new_token()
    # bsd-mailx's way to name the sendmail program: "set sendmail=..." in
    # the file MAILRC names (it has no -S option).
    rc = p.write_file("mailrc", f"set sendmail={p.sendmail_path}\n")
    r = run_as(p, "ptbob", [mail, "-s", f"mailx {token}", "ptalice@postern.test"],
               input=b"Sent with mail(1).\n", env_extra={"MAILRC": str(rc)})
    assert r.returncode == 0, h.describe(r)
    _p, raw = the_one(h.wait_for_messages("ptalice", token), "mailx message")
    msg = h.parse_message(raw)
    assert msg["Subject"] == f"mailx {token}"
    assert msg["To"] == "ptalice@postern.test"
    assert msg["From"] == "ptbob@postern.test"
    assert msg.get_content() == "Sent with mail(1).\n"


def test_cron_style_sendmail(webhost):
    """What Debian's cron runs for a job's output: sendmail -FCronDaemon
    -i -B8BITMIME -oem USER, headers from cron on standard input."""
    p = webhost
    token = new_token()
    data = (f"From: root (Cron Daemon)\nTo: ptalice@postern.test\n"
            f"Subject: Cron <ptbob@postern> /usr/local/bin/backup {token}\n"
            "MIME-Version: 1.0\nContent-Type: text/plain; charset=UTF-8\n"
            "Content-Transfer-Encoding: 8bit\nX-Cron-Env: <SHELL=/bin/sh>\n\n"
            "backup done: 3 files, naïve résumé\n").encode()
    r = run_as(p, "ptbob", [p.sendmail_path, "-FCronDaemon", "-i", "-B8BITMIME", "-oem",
                            "ptalice@postern.test"], input=data)
    assert r.returncode == 0, h.describe(r)
    _p, raw = the_one(h.wait_for_messages("ptalice", token), "cron message")
    msg = h.parse_message(raw)
    assert msg["X-Cron-Env"] == "<SHELL=/bin/sh>"
    uid = pwd.getpwnam("ptbob").pw_uid
    received = h.header_values(raw, "Received")
    assert any(r.startswith(f"by postern.test (Postern, from userid {uid}) id ")
               for r in received), received
    assert msg.get_content() == "backup done: 3 files, naïve résumé\n"
    assert h.header_values(raw, "Return-Path") == ["<ptbob@postern.test>"]


def test_git_send_email(webhost):
    git = tool("git")
    exec_path = subprocess.run([git, "--exec-path"], capture_output=True, text=True).stdout
    if not os.access(os.path.join(exec_path.strip(), "git-send-email"), os.X_OK):
        pytest.skip("git send-email is not installed (scripts/test installs git-email)")
    p = webhost
    token = new_token()
    repo = p.dir / "repo"
    repo.mkdir()
    bob = pwd.getpwnam("ptbob")
    os.chown(repo, bob.pw_uid, bob.pw_gid)
    env = {"GIT_AUTHOR_NAME": "Bob Builder", "GIT_AUTHOR_EMAIL": "ptbob@postern.test",
           "GIT_COMMITTER_NAME": "Bob Builder", "GIT_COMMITTER_EMAIL": "ptbob@postern.test",
           "GIT_CONFIG_NOSYSTEM": "1"}
    steps = [
        [git, "init", "-q"],
        ["sh", "-c", f"echo '{token}' > README"],
        [git, "add", "README"],
        [git, "commit", "-q", "-m", f"Add README {token}"],
        [git, "format-patch", "-1", "-o", "out"],
    ]
    for cmd in steps:
        r = run_as(p, "ptbob", cmd, env_extra=env, cwd=repo)
        assert r.returncode == 0, h.describe(r)
    patch = next((repo / "out").glob("*.patch"))
    r = run_as(p, "ptbob", [git, "send-email", "--to=ptalice@postern.test",
                            f"--smtp-server={p.sendmail_path}", "--confirm=never",
                            "--no-validate", "--quiet", str(patch)],
               env_extra=env, cwd=repo)
    assert r.returncode == 0, h.describe(r)
    _p, raw = the_one(h.wait_for_messages("ptalice", token), "patch mail")
    msg = h.parse_message(raw)
    assert msg["Subject"] == f"[PATCH] Add README {token}"
    assert msg["From"] == "Bob Builder <ptbob@postern.test>"
    assert msg["To"] == "ptalice@postern.test"
    assert msg["Message-Id"].endswith("@postern.test>") or "@" in msg["Message-Id"]
    assert f"+{token}" in msg.get_content()


# --------------------------------------------------------------------------
# Installation


def test_install_into_destdir(tmp_path):
    script = h.REPO / "scripts" / "install"
    root = tmp_path / "root"
    r = h.run([script, "--destdir", root, "--bin-dir", h.BIN_DIR, "--no-build"])
    assert r.returncode == 0, h.describe(r)
    for rel in ("usr/sbin/postern", "usr/sbin/sendmail", "usr/sbin/postconf",
                "usr/sbin/postdrop", "usr/libexec/postern/master",
                "usr/libexec/postern/smtpd", "usr/libexec/postern/cleanup",
                "usr/libexec/postern/qmgr", "usr/libexec/postern/pickup",
                "usr/libexec/postern/local", "usr/libexec/postern/virtual",
                "etc/postern/main.cf", "etc/postern/master.cf",
                "usr/share/man/man1/sendmail.1", "usr/share/man/man8/local.8",
                "usr/share/man/man5/aliases.5", "lib/systemd/system/postern.service"):
        assert (root / rel).is_file(), rel
    assert os.readlink(root / "usr/lib/sendmail") == "../sbin/sendmail"
    assert os.readlink(root / "usr/bin/newaliases") == "../sbin/sendmail"
    modes = {"maildrop": 0o1730, "public": 0o710, "incoming": 0o700, "active": 0o700,
             "deferred": 0o700, "pid": 0o755}
    for d, mode in modes.items():
        st = os.stat(root / "var/spool/postern" / d)
        assert st.st_mode & 0o7777 == mode, (d, oct(st.st_mode))
    unit = (root / "lib/systemd/system/postern.service").read_text()
    assert "ExecStart=/usr/sbin/postern start" in unit
    if h.is_root():
        h.ensure_system_accounts()
        st = os.stat(root / "usr/sbin/postdrop")
        assert st.st_mode & 0o2000 and st.st_gid == grp.getgrnam("postdrop").gr_gid
        st = os.stat(root / "var/spool/postern/maildrop")
        assert st.st_uid == pwd.getpwnam("postern").pw_uid
        assert st.st_gid == grp.getgrnam("postdrop").gr_gid
    # The installed configuration is what postern check accepts.
    r = h.run([root / "usr/sbin/postconf", "-c", root / "etc/postern", "-h", "setgid_group"])
    assert r.returncode == 0 and r.stdout.strip() == "postdrop", h.describe(r)
    # A second run keeps the administrator's main.cf.
    (root / "etc/postern/main.cf").write_text("myhostname = mine.test\n")
    r = h.run([script, "--destdir", root, "--bin-dir", h.BIN_DIR, "--no-build"])
    assert r.returncode == 0, h.describe(r)
    assert (root / "etc/postern/main.cf").read_text() == "myhostname = mine.test\n"


def test_install_refuses_to_replace_postfix(tmp_path):
    script = h.REPO / "scripts" / "install"
    root = tmp_path / "root"
    (root / "usr/sbin").mkdir(parents=True)
    (root / "etc/postfix").mkdir(parents=True)
    (root / "etc/postfix/main.cf").write_text("# Postfix\n")
    fake = root / "usr/sbin/sendmail"
    fake.write_text("#!/bin/sh\necho I am Postfix's sendmail\n")
    os.chmod(fake, 0o755)
    r = h.run([script, "--destdir", root, "--bin-dir", h.BIN_DIR, "--no-build"])
    assert r.returncode == 73, h.describe(r)
    assert "refusing to replace" in r.stderr
    assert "Postfix" in fake.read_text()
    assert not (root / "usr/libexec/postern").exists()
    r = h.run([script, "--destdir", root, "--bin-dir", h.BIN_DIR, "--no-build", "--force"])
    assert r.returncode == 0, h.describe(r)
    assert "Postfix" in (root / "usr/sbin/sendmail.pre-postern").read_text()
    assert b"postern-queue-1" in fake.read_bytes()
    # Prefix: the configuration names the installed directories.
    other = tmp_path / "opt"
    r = h.run([script, "--destdir", other, "--prefix", "/opt/postern", "--bin-dir", h.BIN_DIR,
               "--no-build"])
    assert r.returncode == 0, h.describe(r)
    assert (other / "opt/postern/libexec/postern/master").is_file()
    r = h.run([other / "opt/postern/sbin/postconf", "-c", other / "etc/postern", "-h",
               "daemon_directory"])
    assert r.stdout.strip() == "/opt/postern/libexec/postern", h.describe(r)


def test_installed_postdrop_path_is_the_default():
    # Postern's sendmail finds postdrop in command_directory, whose default
    # is where scripts/install puts it.
    r = h.run([h.BIN_DIR / "postconf", "-d", "-h", "command_directory"])
    assert r.stdout.strip() == "/usr/sbin", h.describe(r)
    assert Path(h.REPO / "scripts" / "install").read_text().count("postdrop") > 2
