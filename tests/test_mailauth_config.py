"""`--no-dmarc-reject` / `dmarc_reject`: default on, off by flag or TOML, bad values exit 2."""

from __future__ import annotations

import subprocess
import sys

from postier.cli import load_config, make_parser


def config(*argv: str):
    return load_config(make_parser().parse_args(["serve", "-H", "mx.test", *argv]))


def test_default_rejects():
    assert config().dmarc_reject is True


def test_flag_turns_it_off():
    assert config("--no-dmarc-reject").dmarc_reject is False


def test_toml_turns_it_off_and_the_flag_wins(tmp_path):
    path = tmp_path / "postier.toml"
    path.write_text("dmarc_reject = false\n")
    assert config("-c", str(path)).dmarc_reject is False
    path.write_text("dmarc_reject = true\n")
    assert config("-c", str(path), "--no-dmarc-reject").dmarc_reject is False


def test_bad_value_names_the_key(tmp_path):
    path = tmp_path / "postier.toml"
    path.write_text('dmarc_reject = "sometimes"\n')
    proc = subprocess.run(
        [sys.executable, "-m", "postier", "check-config", "-H", "mx.test", "-c", str(path)],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    assert "dmarc_reject" in proc.stderr and proc.stderr.count("\n") == 1
