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
        # Addresses libzmq would take late (after the corpus loaded) or wrongly (another port).
        (
            ["train", "configs/default.yaml", "--collector", "garbage"],
            "--collector: 'garbage' is not accepted; expected tcp://HOST:PORT",
        ),
        (
            ["train", "configs/default.yaml", "--collector", "tcp://127.0.0.1:99999"],
            "--collector: 'tcp://127.0.0.1:99999' is not accepted",
        ),
        (
            ["train", "configs/default.yaml", "--set", "dynamics.collector=tcp://h:0"],
            "dynamics.collector: 'tcp://h:0' is not accepted",
        ),
        (["collect", "--bind", "tcp://127.0.0.1:99999"], "--bind: 'tcp://127.0.0.1:99999'"),
        (["collect", "--stale-after", "-1"], "--stale-after: -1 is not accepted"),
        (["collect", "--rank-timeout", "abc"], "--rank-timeout: 'abc' is not accepted"),
        (
            ["dashboard", "--address", "no-such-host.invalid", "--allow-remote"],
            "--address: 'no-such-host.invalid' is not accepted",
        ),
        (["keys", "/dev/null/x"], "keys: '/dev/null/x' is not accepted"),
        (
            ["train", "configs/default.yaml", "--runs-dir", "/dev/null/x"],
            "--runs-dir: '/dev/null/x' is not accepted; cannot create that folder",
        ),
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


def test_a_bad_data_path_leaves_no_run_folder(tmp_path):
    result = run_cli(
        "train",
        "configs/default.yaml",
        "--set",
        f"data.path={tmp_path / 'missing.txt'}",
        "--runs-dir",
        str(tmp_path / "runs"),
    )
    assert result.returncode == 2, result.stderr
    assert "data.path" in result.stderr
    assert not any((tmp_path / "runs").glob("*/config.yaml"))


@pytest.mark.parametrize(
    ("address", "bind", "ok"),
    [
        ("tcp://127.0.0.1:5557", False, True),
        ("tcp://[::1]:5557", False, True),
        ("ipc:///tmp/prismatic.sock", False, True),
        ("inproc://collector", False, True),
        ("tcp://127.0.0.1:*", True, True),
        ("tcp://127.0.0.1:*", False, False),
        ("tcp://127.0.0.1:0", False, False),
        ("tcp://127.0.0.1", False, False),
        ("tcp://:5557", False, False),
        ("udp://127.0.0.1:5557", False, False),
        ("inproc://", False, False),
    ],
)
def test_zmq_addresses_accepted_and_refused(address, bind, ok):
    from prismatic.config import check_address
    from prismatic.errors import ConfigError

    if ok:
        assert check_address("--x", address, bind=bind) == address
    else:
        with pytest.raises(ConfigError, match=r"--x: .* is not accepted; expected tcp://HOST"):
            check_address("--x", address, bind=bind)
