"""The command line and the TOML file, as an operator meets them (docs/configuration.md).

Exit codes: 0 success; 2 bad usage or configuration, with one line on stderr naming the file,
key or flag and what is wrong.
"""

from __future__ import annotations

import re
import smtplib
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from postier import __version__
from tests.server import PostierServer, free_port, make_server

SAFETY_TIMEOUT = 30.0


def postier(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "postier", *args],
        capture_output=True,
        text=True,
        timeout=SAFETY_TIMEOUT,
        cwd=cwd,
        stdin=subprocess.DEVNULL,
    )


def settings(output: str) -> dict[str, str]:
    """check-config output `key = value` lines -> {key: value text}."""
    out = {}
    for line in output.splitlines():
        key, sep, value = line.partition(" = ")
        assert sep, f"not a setting line: {line!r}"
        out[key] = value.split("  #")[0]
    return out


# `serve` logs events (warnings about the configuration, ...) to stderr as it starts.
_LOG_LINE = re.compile(r"^\d{4}-\d\d-\d\dT\S+ +[A-Z]+ +postier ")


def one_error_line(proc: subprocess.CompletedProcess[str]) -> str:
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    lines = [x for x in proc.stderr.strip().splitlines() if not _LOG_LINE.match(x)]
    assert len(lines) == 1, f"expected one line on stderr, got:\n{proc.stderr}"
    return lines[0]


GOOD_TOML = """\
hostname = "mx.example.org"
domain = ["example.org", "Example.NET."]
users = "users"
max_recipients = 50

[limits]
max_message_size = 5000
"""


@pytest.fixture
def conf_dir(tmp_path: Path) -> Path:
    (tmp_path / "users").write_text("alice@example.org\nbob@example.net bob-box\n")
    (tmp_path / "postier.toml").write_text(GOOD_TOML)
    return tmp_path


# ---- check-config ----------------------------------------------------------------------------
def test_check_config_prints_the_effective_settings(conf_dir: Path) -> None:
    proc = postier("check-config", "-c", str(conf_dir / "postier.toml"))
    assert proc.returncode == 0, proc.stderr
    s = settings(proc.stdout)
    assert s["hostname"] == '"mx.example.org"'
    assert s["domain"] == '["example.org", "example.net"]'  # normalised
    assert s["users"] == f'"{conf_dir / "users"}"'  # relative to the file
    assert s["max_recipients"] == "50"
    assert s["max_message_size"] == "5000"  # from a [table]: tables only group keys
    assert s["max_connections"] == "1000"  # defaults are shown too
    assert s["mailbox_format"] == '"maildir"'
    assert {"mx", "local", "mail_root", "queue_dir", "command_timeout"} <= set(s)


def test_flags_override_the_file(conf_dir: Path) -> None:
    proc = postier(
        "check-config", "-c", str(conf_dir / "postier.toml"),
        "--max-recipients", "7", "-H", "flag.example.org", "-s", "other.example",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    s = settings(proc.stdout)
    assert s["max_recipients"] == "7"
    assert s["hostname"] == '"flag.example.org"'
    assert s["domain"] == '["other.example"]'
    assert s["max_message_size"] == "5000"  # not overridden: still the file's


def test_flags_override_the_file_in_the_running_server(tmp_path: Path) -> None:
    conf = tmp_path / "postier.toml"
    conf.write_text('hostname = "from-file.test"\nmax_message_size = 5000\n')
    srv = make_server(tmp_path / "srv", extra=["-c", str(conf), "--max-message-size", "6000"])
    # make_server passes -H mx.test; drop it so the file's hostname is the one in force.
    i = srv.args.index("-H")
    del srv.args[i : i + 2]
    srv.start()
    try:
        with smtplib.SMTP("127.0.0.1", srv.mx_port, timeout=SAFETY_TIMEOUT) as c:
            code, text = c.ehlo("cli.test")
            assert code == 250
            assert text.startswith(b"from-file.test")
            assert c.esmtp_features["size"] == "6000"
    finally:
        assert srv.stop() == 0


def test_unknown_toml_key(conf_dir: Path) -> None:
    conf = conf_dir / "postier.toml"
    conf.write_text(GOOD_TOML + "max_recipents = 10\n")
    line = one_error_line(postier("check-config", "-c", str(conf)))
    assert "max_recipents" in line and str(conf) in line


def test_unknown_key_inside_a_table(conf_dir: Path) -> None:
    conf = conf_dir / "postier.toml"
    conf.write_text(GOOD_TOML + "[timeouts]\ncommand_timout = 10\n")
    line = one_error_line(postier("check-config", "-c", str(conf)))
    assert "command_timout" in line


def test_wrong_type_in_toml(conf_dir: Path) -> None:
    conf = conf_dir / "postier.toml"
    conf.write_text('max_recipients = "lots"\n')
    line = one_error_line(postier("check-config", "-c", str(conf)))
    assert "max_recipients" in line and "lots" in line


def test_invalid_toml(conf_dir: Path) -> None:
    conf = conf_dir / "postier.toml"
    conf.write_text("max_recipients = \n")
    line = one_error_line(postier("check-config", "-c", str(conf)))
    assert str(conf) in line and "TOML" in line


def test_missing_config_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.toml"
    line = one_error_line(postier("check-config", "-c", str(missing)))
    assert str(missing) in line


@pytest.mark.parametrize(
    ("flag", "value"),
    [
        ("--max-recipients", "x"),
        ("--max-message-size", "10MB"),
        ("--command-timeout", "soon"),
        ("--max-connections", "0"),
        ("--mailbox-format", "eml"),
        ("--mx", "127.0.0.1:notaport"),
    ],
)
def test_bad_flag_value(flag: str, value: str) -> None:
    line = one_error_line(postier("check-config", flag, value))
    name = flag.lstrip("-").replace("-", "_")
    assert flag in line or name in line, line


def test_unknown_flag_is_a_usage_error() -> None:
    proc = postier("check-config", "--frobnicate", "5")
    assert proc.returncode == 2
    assert "--frobnicate" in proc.stderr.strip().splitlines()[-1]


@pytest.mark.parametrize("command", ["check-config", "serve"])
def test_local_listener_must_be_loopback(command: str) -> None:
    line = one_error_line(postier(command, "--local", "192.0.2.1:25"))
    assert "192.0.2.1" in line and "loopback" in line


def test_local_listener_accepts_loopback_forms() -> None:
    for spec in ("127.0.0.1:2525", "[::1]:2525", "lo:2525"):
        proc = postier("check-config", "--local", spec)
        assert proc.returncode == 0, (spec, proc.stderr)


@pytest.mark.parametrize("command", ["check-config", "serve"])
def test_missing_users_file(tmp_path: Path, command: str) -> None:
    missing = tmp_path / "no-such-users"
    line = one_error_line(postier(command, "-u", str(missing), "-s", "example.org"))
    assert str(missing) in line


def test_missing_aliases_file(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-aliases"
    line = one_error_line(postier("check-config", "-a", str(missing)))
    assert str(missing) in line


def test_bad_mailbox_name_in_users_file(tmp_path: Path) -> None:
    users = tmp_path / "users"
    users.write_text("alice@example.org\nmallory@example.org ../../etc\n")
    line = one_error_line(
        postier(
            "serve", "-u", str(users), "-s", "example.org", "-R", str(tmp_path / "mail"),
            "-Q", str(tmp_path / "q"), "--mx", f"127.0.0.1:{free_port()}",
            "--local", f"127.0.0.1:{free_port()}",
        )
    )  # fmt: skip
    assert f"{users}:2" in line and "../../etc" in line


def test_port_in_use(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        line = one_error_line(
            postier(
                "serve", "-R", str(tmp_path / "mail"), "-Q", str(tmp_path / "q"),
                "-s", "example.org", "--mx", f"127.0.0.1:{port}",
                "--local", f"127.0.0.1:{free_port()}",
            )
        )  # fmt: skip
    assert f"127.0.0.1:{port}" in line


def test_version() -> None:
    proc = postier("--version")
    assert proc.returncode == 0
    assert proc.stdout.strip() == f"postier {__version__}"


def test_no_command_is_a_usage_error() -> None:
    proc = postier()
    assert proc.returncode == 2
    assert proc.stderr


# ---- listening on an interface ---------------------------------------------------------------
def _has_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
    except OSError:
        return False
    return True


def test_mx_on_an_interface_binds_all_its_addresses(tmp_path: Path) -> None:
    port = free_port()
    srv: PostierServer = make_server(tmp_path / "srv")
    i = srv.args.index("--mx")
    srv.args[i + 1] = f"lo:{port}"
    srv.mx_port = port
    srv.start()
    try:
        hosts = ["127.0.0.1"] + (["::1"] if _has_ipv6_loopback() else [])
        for host in hosts:
            with smtplib.SMTP(host, port, timeout=SAFETY_TIMEOUT) as c:
                c.sendmail("s@remote.test", ["alice@example.org"], f"Subject: {host}\r\n\r\n")
        assert len(srv.maildir_files("alice")) == len(hosts)
        listening = [x for x in srv.log().splitlines() if "event=listening role=mx" in x]
        assert any(f"127.0.0.1:{port}" in x for x in listening), listening
        if len(hosts) == 2:
            assert any(f"::1:{port}" in x for x in listening), listening
    finally:
        assert srv.stop() == 0
