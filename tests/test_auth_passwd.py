"""The password file (parsing, verifying) and the `postier passwd` command."""

from __future__ import annotations

import argparse
import io
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from postier.auth import passwd_cmd
from postier.auth.passwd import PasswordFile, hash_password, parse_text
from postier.errors import ConfigError


@pytest.fixture(scope="module")
def hashes() -> dict[str, str]:
    """One hash per scheme, computed once: hashing is deliberately slow."""
    return {
        "ARGON2ID": hash_password("argon-pw"),
        "BLF-CRYPT": hash_password("bcrypt-pw", "BLF-CRYPT"),
    }


def write(tmp_path: Path, text: str, name: str = "passwd") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


# --- parsing ------------------------------------------------------------------------------


def test_all_schemes_comments_blank_and_simple_lines(tmp_path: Path, hashes: dict[str, str]):
    path = write(
        tmp_path,
        "# postier users\n\n"
        f"alice@example.org:{hashes['ARGON2ID']}\n"
        f"bob@example.org:{hashes['BLF-CRYPT']}::::::\n"
        "   # indented comment\n"
        "carol@example.org:{PLAIN}carol-pw:1000:1000::/home/carol::\n"
        "dave dave-pw\n"
        "erin@example.org:{CLEAR}erin-pw\n",
    )
    pw = PasswordFile.load(path)
    assert len(pw) == 5
    assert set(pw.plain_users) == {"carol@example.org", "dave", "erin@example.org"}
    assert "ALICE@example.ORG" in pw and "nobody@example.org" not in pw
    assert pw.canonical("Bob@Example.Org") == "bob@example.org"
    assert pw.canonical("zed") is None
    assert not pw.world_readable or os.stat(path).st_mode & stat.S_IROTH


def test_dovecot_y_prefix_and_b_prefix_both_verify(tmp_path: Path):
    import bcrypt

    b = bcrypt.hashpw(b"pw", bcrypt.gensalt(4)).decode()
    assert b.startswith("$2b$")
    y = "$2y$" + b[4:]
    pw = PasswordFile.load(write(tmp_path, f"b:{{BLF-CRYPT}}{b}\ny:{{BLF-CRYPT}}{y}\n"))
    assert pw.verify("b", "pw") and pw.verify("y", "pw")
    assert not pw.verify("y", "Pw")


@pytest.mark.parametrize(
    ("line", "what"),
    [
        ("alice@example.org:{MD5}abc", "unknown password scheme"),
        ("alice@example.org:secret", "must start with a {SCHEME}"),
        ("alice@example.org:{PLAIN}", "empty password"),
        (":{PLAIN}x", "address is empty"),
        ("justoneword", "expected"),
        ("a@b:{ARGON2ID}$2y$12$abc", "must start with $argon2id$"),
        ("a@b:{ARGON2ID}$argon2id$garbage", "malformed {ARGON2ID}"),
        ("a@b:{BLF-CRYPT}$2y$12$short", "malformed {BLF-CRYPT}"),
        ("a@b:{BLF-CRYPT}$2y$99$" + "a" * 53, "malformed {BLF-CRYPT}"),
    ],
)
def test_malformed_line_names_file_and_line(tmp_path: Path, line: str, what: str):
    path = write(tmp_path, f"# header\nok@example.org:{{PLAIN}}pw\n{line}\n")
    with pytest.raises(ConfigError) as info:
        PasswordFile.load(path)
    message = str(info.value)
    assert message.startswith(f"{path}:3: ")
    assert what in message


def test_error_message_never_echoes_the_secret(tmp_path: Path):
    path = write(tmp_path, "a@b:{SHA512}topsecretvalue\n")
    with pytest.raises(ConfigError) as info:
        PasswordFile.load(path)
    assert "topsecretvalue" not in str(info.value)


def test_duplicate_address_differing_in_case(tmp_path: Path):
    path = write(tmp_path, "a@b.org:{PLAIN}x\nA@B.ORG:{PLAIN}y\n")
    with pytest.raises(ConfigError, match=r":2: duplicate address \(first on line 1\)"):
        PasswordFile.load(path)


def test_bad_utf8_and_missing_file(tmp_path: Path):
    path = tmp_path / "passwd"
    path.write_bytes(b"a@b:{PLAIN}ok\nb@b:{PLAIN}\xff\n")
    with pytest.raises(ConfigError, match=":2: not valid UTF-8"):
        PasswordFile.load(path)
    with pytest.raises(ConfigError, match="cannot read password file"):
        PasswordFile.load(tmp_path / "absent")


def test_parse_text_keeps_every_line():
    lines = parse_text(b"# c\n\nu:{PLAIN}p:x:y\n", "f")
    assert [text for text, _ in lines] == ["# c", "", "u:{PLAIN}p:x:y"]
    entry = lines[2][1]
    assert entry is not None and entry.extra == "x:y" and entry.render() == "u:{PLAIN}p:x:y"


# --- verifying ----------------------------------------------------------------------------


def test_verify_right_wrong_unknown(tmp_path: Path, hashes: dict[str, str]):
    path = write(
        tmp_path,
        f"alice@example.org:{hashes['ARGON2ID']}\n"
        f"bob@example.org:{hashes['BLF-CRYPT']}\n"
        "carol@example.org:{PLAIN}carol-pw\n"
        "dave dave pw with spaces\n",
    )
    pw = PasswordFile.load(path)
    assert pw.verify("alice@example.org", "argon-pw")
    assert pw.verify("ALICE@EXAMPLE.ORG", "argon-pw")
    assert pw.verify("bob@example.org", "bcrypt-pw")
    assert pw.verify("carol@example.org", "carol-pw")
    assert pw.verify("dave", "dave pw with spaces")
    for user, wrong in [
        ("alice@example.org", "bcrypt-pw"),
        ("bob@example.org", "argon-pw"),
        ("carol@example.org", "carol-pw "),
        ("carol@example.org", ""),
        ("alice@example.org", "\udcff"),
    ]:
        assert not pw.verify(user, wrong)
    assert not pw.verify("mallory@example.org", "argon-pw")


def test_unknown_user_hashes_a_dummy_of_the_usual_scheme(tmp_path: Path, hashes: dict[str, str]):
    pw = PasswordFile.load(write(tmp_path, f"a@b:{hashes['ARGON2ID']}\nc@d:{{PLAIN}}x\n"))
    assert not pw.verify("nobody", "x")
    scheme, secret = pw._dummy_hash()
    assert scheme == "ARGON2ID" and secret.startswith("$argon2id$v=19$m=65536,t=3,p=4$")
    empty = PasswordFile([])
    assert not empty.verify("nobody", "x")


def test_hash_password_forms():
    assert hash_password("x").startswith("{ARGON2ID}$argon2id$")
    assert hash_password("x", "blf-crypt").startswith("{BLF-CRYPT}$2y$12$")
    with pytest.raises(ValueError):
        hash_password("")
    with pytest.raises(ValueError):
        hash_password("x", "PLAIN")
    with pytest.raises(ValueError, match="72 bytes"):
        hash_password("x" * 73, "BLF-CRYPT")


# --- postier passwd -----------------------------------------------------------------------


def run_cmd(monkeypatch: pytest.MonkeyPatch, argv: list[str], stdin: str) -> int:
    parser = argparse.ArgumentParser(prog="postier passwd")
    passwd_cmd.add_arguments(parser)
    monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    return passwd_cmd.run(parser.parse_args(argv))


def test_cmd_creates_file_0600_and_preserves_other_lines(tmp_path: Path, monkeypatch, capsys):
    path = tmp_path / "passwd"
    assert run_cmd(monkeypatch, [str(path), "alice@example.org"], "first\n") == 0
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert PasswordFile.load(path).verify("alice@example.org", "first")

    path.write_text(path.read_text() + "# keep me\nbob b-pw\nx@y:{PLAIN}p:1:2::/h::\n")
    assert run_cmd(monkeypatch, [str(path), "X@Y", "--scheme", "BLF-CRYPT"], "second\r\n") == 0
    text = path.read_text().splitlines()
    assert text[1:3] == ["# keep me", "bob b-pw"]
    assert text[3].startswith("x@y:{BLF-CRYPT}$2y$") and text[3].endswith(":1:2::/h::")
    pw = PasswordFile.load(path)
    assert pw.verify("x@y", "second") and pw.verify("bob", "b-pw")

    assert run_cmd(monkeypatch, [str(path), "bob"], "third\n") == 0
    assert path.read_text().splitlines()[2].startswith("bob:{ARGON2ID}$argon2id$")
    assert PasswordFile.load(path).plain_users == ()
    assert not list(tmp_path.glob(".passwd.*")), "temporary file left behind"


def test_cmd_keeps_group_bits_drops_world(tmp_path: Path, monkeypatch):
    path = tmp_path / "passwd"
    path.write_text("a@b:{PLAIN}x\n")
    path.chmod(0o644)
    assert run_cmd(monkeypatch, [str(path), "a@b"], "y\n") == 0
    assert stat.S_IMODE(path.stat().st_mode) == 0o640


def test_cmd_delete(tmp_path: Path, monkeypatch, capsys):
    path = tmp_path / "passwd"
    path.write_text("# c\na@b:{PLAIN}x\nc@d:{PLAIN}y\n")
    assert run_cmd(monkeypatch, [str(path), "A@B", "--delete"], "") == 0
    assert path.read_text() == "# c\nc@d:{PLAIN}y\n"
    assert run_cmd(monkeypatch, [str(path), "a@b", "--delete"], "") == 1
    assert "no entry for a@b" in capsys.readouterr().err
    assert run_cmd(monkeypatch, [str(tmp_path / "absent"), "a@b", "--delete"], "") == 1


def test_cmd_refusals(tmp_path: Path, monkeypatch, capsys):
    path = tmp_path / "passwd"
    assert run_cmd(monkeypatch, [str(path), "a@b"], "\n") == 1
    assert "empty password" in capsys.readouterr().err
    assert run_cmd(monkeypatch, [str(path), "a@b"], "") == 1
    for bad in ["a:b", "a b", "#a", "", "a\tb"]:
        assert run_cmd(monkeypatch, [str(path), bad], "pw\n") == 2
    assert not path.exists()
    path.write_text("a@b:{NOPE}x\n")
    assert run_cmd(monkeypatch, [str(path), "a@b"], "pw\n") == 2
    assert f"{path}:1: unknown password scheme" in capsys.readouterr().err
    assert run_cmd(monkeypatch, [str(path), "a@b", "--delete"], "") == 2
    assert path.read_text() == "a@b:{NOPE}x\n"
    assert run_cmd(monkeypatch, [str(tmp_path / "nodir" / "f"), "a@b"], "pw\n") == 1


def test_cmd_terminal_mismatch_and_match(tmp_path: Path, monkeypatch, capsys):
    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    answers = iter(["one", "two", "same", "same"])

    def fake_getpass(prompt: str = "") -> str:
        answer = next(answers, None)
        if answer is None:
            raise EOFError
        return answer

    monkeypatch.setattr(passwd_cmd.getpass, "getpass", fake_getpass)
    parser = argparse.ArgumentParser()
    passwd_cmd.add_arguments(parser)
    monkeypatch.setattr(sys, "stdin", Tty())
    path = tmp_path / "passwd"
    assert passwd_cmd.run(parser.parse_args([str(path), "a@b"])) == 1
    assert "do not match" in capsys.readouterr().err
    assert passwd_cmd.run(parser.parse_args([str(path), "a@b"])) == 0
    assert PasswordFile.load(path).verify("a@b", "same")
    assert passwd_cmd.run(parser.parse_args([str(path), "a@b"])) == 1  # Ctrl-D
    assert "no password given" in capsys.readouterr().err


def test_cmd_in_a_subprocess_with_piped_stdin(tmp_path: Path):
    """The real entry path: stdin is a pipe, so one line is read and no prompt appears."""
    path = tmp_path / "passwd"
    code = (
        "import argparse, sys\n"
        "from postier.auth.passwd_cmd import add_arguments, run\n"
        "p = argparse.ArgumentParser(prog='postier passwd'); add_arguments(p)\n"
        "sys.exit(run(p.parse_args(sys.argv[1:])))\n"
    )
    cmd = [sys.executable, "-c", code, str(path), "sub@example.org"]
    done = subprocess.run(cmd, input="piped pw\nignored\n", capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout == ""
    assert PasswordFile.load(path).verify("sub@example.org", "piped pw")
    bad = subprocess.run([*cmd, "--scheme", "MD5"], input=b"x\n", capture_output=True)
    assert bad.returncode == 2
