"""The `prismatic` command line: bad flags and config errors are one line and exit 2."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def run_cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "prismatic.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
    )


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (
            ["train", "configs/default.yaml", "--set", "model.mixing=blend"],
            "model.mixing: 'blend' is not accepted; expected one of outputs, smear, topk",
        ),
        (["train", "configs/default.yaml", "--set", "train.stepz=3"], "train.stepz: unknown key"),
        (["train", "configs/nope.yaml"], "is not a file"),
        (["up", "--steps", "0"], "--steps: 0 is not accepted; expected 1 or more"),
        (["up", "--steps", "many"], "--steps: 'many' is not accepted"),
        (["dashboard", "--port", "70000"], "--port: 70000 is not accepted; expected 1..65535"),
        (
            ["collect", "--bind", "tcp://0.0.0.0:5557"],
            "--bind: 'tcp://0.0.0.0:5557' is not loopback",
        ),
        (["frobnicate"], "invalid choice: 'frobnicate'"),
    ],
)
def test_errors_are_one_line_with_exit_code_2(args, expected):
    result = run_cli(*args)
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("prismatic: error: ")
    assert expected in lines[0]
    assert "Traceback" not in result.stderr


def test_help_lists_every_command():
    result = run_cli("--help")
    assert result.returncode == 0
    for command in ("train", "collect", "dashboard", "up", "keys"):
        assert command in result.stdout
