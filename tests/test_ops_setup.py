"""`postier setup` on a scratch root: the files it writes start a server that takes mail on
the ports it printed, AUTH works with the password given, and a second run changes nothing."""

from __future__ import annotations

import hashlib
import re
import shutil
import smtplib
import subprocess
import sys
from pathlib import Path

import pytest

from tests.server import PostierServer, free_port
from tests.test_tls_integration import client_context

SAFETY = 60.0
PASSWORD = "correct horse battery"


def setup(tmp: Path, ports: dict[str, int], stdin: bytes = PASSWORD.encode() + b"\n"):  # type: ignore[no-untyped-def]
    args = [
        sys.executable, "-m", "postier", "setup", "example.org",
        "--dir", str(tmp / "etc"), "--mail-root", str(tmp / "mail"),
        "--queue-dir", str(tmp / "queue"), "--user", "alice", "--password-stdin",
        "--letsencrypt-live", str(tmp / "no-letsencrypt"),
    ]  # fmt: skip
    for role, port in ports.items():
        args += [f"--{role}", f"127.0.0.1:{port}"]
    return subprocess.run(args, input=stdin, capture_output=True, timeout=SAFETY)


def snapshot(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        + f" {p.stat().st_mtime_ns}"
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_setup_writes_a_working_deployment_and_a_second_run_changes_nothing(
    tmp_path: Path,
) -> None:
    ports = {role: free_port() for role in ("mx", "submission", "submissions", "local")}
    first = setup(tmp_path, ports)
    assert first.returncode == 0, first.stderr.decode()
    text = first.stdout.decode()
    # In order: the files, the DNS records, the firewall ports, the next three commands.
    positions = [text.index(h) for h in ("Files:", "DNS records", "Firewall", "Next:")]
    assert positions == sorted(positions)
    etc = tmp_path / "etc"
    for name in ("postier.toml", "users", "aliases", "passwd", "postier.service", "tls/cert.pem"):
        assert f"wrote    {etc / name}" in text
    assert "SELF-SIGNED" in text
    assert re.search(r"^example\.org\. \d+ IN MX 10 mx\.example\.org\.", text, re.M)
    assert re.search(r"^ed\d{6}\._domainkey\.example\.org\. .*TXT", text, re.M), text
    assert re.search(r"^rsa\d{6}\._domainkey\.example\.org\. .*TXT", text, re.M), text
    printed = {int(p): role for p, role in re.findall(r"^  (\d+)/tcp  \((\w+)\)$", text, re.M)}
    assert printed == {ports["mx"]: "mx", ports["submission"]: "submission",
                       ports["submissions"]: "submissions"}  # fmt: skip
    next_steps = text[text.index("Next:") :].strip().splitlines()[1:]
    assert len(next_steps) == 3 and "systemctl enable --now postier" in next_steps[1]
    assert (etc / "passwd").stat().st_mode & 0o777 == 0o600
    assert PASSWORD not in (etc / "passwd").read_text()

    srv = PostierServer(
        root=tmp_path, args=["-c", str(etc / "postier.toml"), "--workers", "1"],
        mx_port=ports["mx"], local_port=ports["local"], mail_root=tmp_path / "mail",
        log_path=tmp_path / "postier.log",
    )  # fmt: skip
    srv.start()
    try:
        with smtplib.SMTP("127.0.0.1", ports["mx"], timeout=SAFETY) as client:
            client.sendmail(
                "someone@example.net", ["postmaster@example.org"], "Subject: hi\r\n\r\nhello\r\n"
            )
        assert len(srv.maildir_files("alice")) == 1  # postmaster goes to the first user
        with smtplib.SMTP("127.0.0.1", ports["submission"], timeout=SAFETY) as client:
            client.starttls(context=client_context())
            assert client.login("alice@example.org", PASSWORD)[0] == 235
    finally:
        assert srv.stop() == 0

    before = snapshot(etc)
    second = setup(tmp_path, ports, stdin=b"another password\n")
    assert second.returncode == 0, second.stderr.decode()
    assert "wrote " not in second.stdout.decode()
    assert snapshot(etc) == before


def test_the_written_unit_passes_systemd_analyze(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed")
    ports = {role: free_port() for role in ("mx", "submission", "submissions", "local")}
    assert setup(tmp_path, ports).returncode == 0
    unit = tmp_path / "etc" / "postier.service"
    proc = subprocess.run(
        [analyze, "verify", str(unit)], capture_output=True, text=True, timeout=SAFETY
    )
    assert proc.returncode == 0, proc.stderr
    assert f"-c {tmp_path / 'etc' / 'postier.toml'}" in unit.read_text()
    assert f"ReadWritePaths={tmp_path / 'mail'} {tmp_path / 'queue'}" in unit.read_text()


@pytest.mark.parametrize(
    ("argv_extra", "stdin", "message"),
    [
        ([], b"\xff\xfe not utf-8\n", "--password-stdin: the password is not UTF-8"),
        ([], b"\n", "the password is empty"),
        (["--user", "../root"], b"pw\n", "--user:"),
    ],
)
def test_bad_input_is_exit_2_with_one_line(
    tmp_path: Path, argv_extra: list[str], stdin: bytes, message: str
) -> None:
    args = [
        sys.executable, "-m", "postier", "setup", "example.org", "--dir", str(tmp_path / "etc"),
        "--password-stdin", *argv_extra,
    ]  # fmt: skip
    proc = subprocess.run(args, input=stdin, capture_output=True, timeout=SAFETY)
    assert proc.returncode == 2
    assert message in proc.stderr.decode() and proc.stderr.decode().count("\n") == 1
    assert not (tmp_path / "etc" / "passwd").exists()


def test_relative_mail_root_and_queue_mean_what_they_meant_on_the_command_line(
    tmp_path: Path,
) -> None:
    """The config file reads relative paths relative to itself; setup writes absolute ones."""
    proc = subprocess.run(
        [
            sys.executable, "-m", "postier", "setup", "example.org", "--dir", "etc",
            "--mail-root", "run/mail", "--queue-dir", "run/queue", "--password-stdin",
            "--letsencrypt-live", str(tmp_path / "no-letsencrypt"),
        ],
        input=PASSWORD.encode() + b"\n", capture_output=True, timeout=SAFETY, cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr.decode()
    toml = (tmp_path / "etc" / "postier.toml").read_text()
    assert f'mail_root = "{tmp_path / "run" / "mail"}"' in toml
    assert f'queue_dir = "{tmp_path / "run" / "queue"}"' in toml
