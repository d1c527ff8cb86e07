"""Nothing let in that does not belong: loopback by default, exposing is a flag, and with CURVE
only allowed publishers write (real collector process, real TCP sockets, real SQLite)."""

from __future__ import annotations

import os
import signal
import socket
import sqlite3
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from prismatic.cli import _is_loopback, build_parser
from prismatic.config import DynamicsConfig, ModelConfig, load_config, run_hash
from prismatic.errors import ConfigError
from prismatic.keys import (
    CLIENT_KEY_ENV,
    SERVER_KEY_ENV,
    client_curve,
    generate,
    load_public,
    load_secret_pair,
)
from trainer.api import DynamicsReporter
from trainer.model import build_model
from trainer.publisher import Publisher

REPO = Path(__file__).resolve().parent.parent
CLI = [sys.executable, "-m", "prismatic.cli"]
TINY_MODEL = ModelConfig(d_model=32, n_layers=1, seq_len=16)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def prismatic(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*CLI, *args], capture_output=True, text=True, timeout=120, env=env, cwd=REPO
    )


# --- loopback by default -----------------------------------------------------------------------


def test_collector_and_dashboard_listen_on_loopback_unless_told_otherwise():
    parser = build_parser()
    assert _is_loopback(parser.parse_args(["collect"]).bind)
    assert _is_loopback(parser.parse_args(["dashboard"]).address)
    assert not parser.parse_args(["collect"]).allow_remote
    assert not parser.parse_args(["dashboard"]).allow_remote


@pytest.mark.parametrize(
    "host",
    ["0.0.0.0", "*", "[::]", "10.1.2.3", "127.0.0.1.example.com", "eth0"],
)
def test_the_collector_refuses_a_non_loopback_bind_without_allow_remote(host, tmp_path):
    bind = f"tcp://{host}:{free_port()}"
    result = prismatic("collect", "--bind", bind, "--runs-dir", str(tmp_path))
    assert result.returncode == 2
    assert result.stderr == (
        f"prismatic: error: --bind: {bind!r} is not loopback; add --allow-remote to expose "
        "the collector (and see --curve-dir to require keys)\n"
    )


@pytest.mark.parametrize("host", ["127.0.0.1", "127.3.4.5", "localhost", "[::1]"])
def test_loopback_spellings_are_loopback(host):
    assert _is_loopback(f"tcp://{host}:5557")


def test_the_dashboard_refuses_a_non_loopback_address_without_allow_remote(tmp_path):
    result = prismatic("dashboard", "--address", "0.0.0.0", "--runs-dir", str(tmp_path))
    assert result.returncode == 2
    assert "--address: '0.0.0.0' is not loopback; add --allow-remote" in result.stderr


# --- key files ---------------------------------------------------------------------------------


def test_keys_writes_private_secrets_and_an_allow_list(tmp_path):
    keys = tmp_path / "keys"
    result = prismatic("keys", str(keys), "--clients", "alice", "bob")
    assert result.returncode == 0, result.stderr
    for name in ("collector", "alice", "bob"):
        assert stat.S_IMODE((keys / f"{name}.key_secret").stat().st_mode) == 0o600
        load_secret_pair(str(keys / f"{name}.key_secret"), "test")
    assert sorted(p.name for p in (keys / "clients").iterdir()) == ["alice.key", "bob.key"]
    assert not list((keys / "clients").glob("*secret*"))


def test_keys_never_overwrites_and_keeps_the_collector_pair(tmp_path):
    keys = tmp_path / "keys"
    generate(keys, ["alice"])
    collector = (keys / "collector.key_secret").read_bytes()
    alice = (keys / "alice.key_secret").read_bytes()
    again = prismatic("keys", str(keys), "--clients", "alice")
    assert again.returncode == 2
    assert "'alice' already has keys" in again.stderr
    assert (keys / "alice.key_secret").read_bytes() == alice
    assert prismatic("keys", str(keys), "--clients", "carol").returncode == 0
    assert (keys / "collector.key_secret").read_bytes() == collector
    assert (keys / "clients" / "carol.key").is_file()


@pytest.mark.parametrize("name", ["../escape", "a/b", "collector", "", ".hidden"])
def test_keys_rejects_client_names_that_are_not_plain(name, tmp_path):
    with pytest.raises(ConfigError, match="--clients"):
        generate(tmp_path / "keys", [name])
    assert not (tmp_path / "escape.key").exists()


def test_trainer_keys_come_from_the_config_or_the_environment_which_wins(tmp_path, monkeypatch):
    keys = tmp_path / "keys"
    generate(keys, ["alice", "bob"])
    monkeypatch.delenv(SERVER_KEY_ENV, raising=False)
    monkeypatch.delenv(CLIENT_KEY_ENV, raising=False)
    collector_public = load_public(str(keys / "collector.key"), "test")
    alice = load_secret_pair(str(keys / "alice.key_secret"), "test")
    bob = load_secret_pair(str(keys / "bob.key_secret"), "test")
    cfg = DynamicsConfig(
        curve_server_key=str(keys / "collector.key"),
        curve_client_key_file=str(keys / "alice.key_secret"),
    )
    assert client_curve(DynamicsConfig()) is None
    assert client_curve(cfg) == (collector_public, *alice)

    monkeypatch.setenv(CLIENT_KEY_ENV, str(keys / "bob.key_secret"))
    monkeypatch.setenv(SERVER_KEY_ENV, collector_public.decode())  # the Z85 text works too
    assert client_curve(cfg) == (collector_public, *bob)
    assert client_curve(DynamicsConfig()) == (collector_public, *bob)


def test_half_a_curve_setup_or_a_bad_key_is_an_error(tmp_path, monkeypatch):
    keys = tmp_path / "keys"
    generate(keys, ["alice"])
    monkeypatch.delenv(SERVER_KEY_ENV, raising=False)
    monkeypatch.delenv(CLIENT_KEY_ENV, raising=False)
    with pytest.raises(ConfigError, match="set both or neither"):
        client_curve(DynamicsConfig(curve_server_key=str(keys / "collector.key")))
    with pytest.raises(ConfigError, match="holds no secret key"):
        client_curve(
            DynamicsConfig(
                curve_server_key=str(keys / "collector.key"),
                curve_client_key_file=str(keys / "alice.key"),
            )
        )
    with pytest.raises(ConfigError, match="neither a key file nor a 40-character Z85 key"):
        load_public("x" * 39 + "~", "dynamics.curve_server_key")


# --- CURVE on a real collector -----------------------------------------------------------------


class CurveCollector:
    """`prismatic collect --curve-dir` as its own process, its log in a file."""

    def __init__(self, tmp_path: Path, keys: Path) -> None:
        self.address = f"tcp://127.0.0.1:{free_port()}"
        self.runs = tmp_path / "runs"
        self.log_path = tmp_path / "collector.log"
        self._log = open(self.log_path, "w")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [*CLI, "collect", "--bind", self.address, "--runs-dir", str(self.runs)]
            + ["--curve-dir", str(keys)],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            cwd=REPO,
        )
        self.wait_for("listening on")

    def wait_for(self, text: str, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.log():
            assert self.proc.poll() is None, self.log()
            assert time.monotonic() < deadline, f"{text!r} never logged:\n{self.log()}"
            time.sleep(0.1)

    def log(self) -> str:
        return self.log_path.read_text()

    def steps(self, run: str) -> list[int]:
        db = self.runs / run / "dynamics.db"
        if not db.is_file():
            return []
        conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
        try:
            return [r[0] for r in conn.execute("SELECT step FROM dynamics ORDER BY step")]
        except sqlite3.Error:
            return []
        finally:
            conn.close()

    def stop(self) -> str:
        self.proc.send_signal(signal.SIGTERM)
        assert self.proc.wait(30) == 0
        self._log.close()
        return self.log()


def publish(
    address: str, run: str, curve: tuple[bytes, bytes, bytes] | None, linger_ms: int = 1000
) -> None:
    """What a trainer does: run_start, 3 probed steps, run_end, through a real publisher."""
    model = build_model(TINY_MODEL, seed=0)
    publisher = Publisher(address, run, curve=curve, linger_ms=linger_ms)
    reporter = DynamicsReporter(
        model, address, config={"name": run}, log_freq=1, run_hash=run, publisher=publisher
    )
    tokens = torch.randint(
        0, 256, (2, TINY_MODEL.seq_len), generator=torch.Generator().manual_seed(0)
    )
    for step in range(3):
        _, loss = model(tokens, tokens)
        loss.backward()
        reporter.after_backward(step, loss=loss.item())
        model.zero_grad()
    time.sleep(1.0)  # time for the handshake, allowed or refused
    reporter.close("completed")


def pair(keys: Path, name: str, server: Path | None = None) -> tuple[bytes, bytes, bytes]:
    public, secret = load_secret_pair(str(keys / f"{name}.key_secret"), "test")
    return load_public(str(server or keys / "collector.key"), "test"), public, secret


@pytest.fixture
def keys(tmp_path: Path) -> Path:
    directory = tmp_path / "keys"
    generate(directory, ["trainer"])
    generate(tmp_path / "stranger", ["mallory"])  # a real pair the collector never allowed
    return directory


def test_with_curve_only_an_allowed_publisher_writes_and_every_refusal_is_logged(tmp_path, keys):
    collector = CurveCollector(tmp_path, keys)
    # An allowed publisher's close() waits until its queue is sent: 1 s of handshake time and
    # 1 s of linger can run out on a loaded machine. A refused one gives up after 1 s.
    allowed = 30_000
    try:
        publish(collector.address, "aaaaaaaaa", pair(keys, "trainer"), linger_ms=allowed)
        publish(
            collector.address,
            "bbbbbbbbb",
            pair(tmp_path / "stranger", "mallory", keys / "collector.key"),
        )
        publish(collector.address, "ccccccccc", None)
        publish(collector.address, "ddddddddd", pair(keys, "trainer", keys / "trainer.key"))
        # A barrier: once this allowed run is stored, the refused ones had their chance.
        publish(collector.address, "eeeeeeeee", pair(keys, "trainer"), linger_ms=allowed)
        deadline = time.monotonic() + 30
        while collector.steps("eeeeeeeee") != [0, 1, 2]:
            assert time.monotonic() < deadline, collector.log()
            time.sleep(0.2)
    finally:
        log = collector.stop()

    assert collector.steps("aaaaaaaaa") == [0, 1, 2]
    for refused in ("bbbbbbbbb", "ccccccccc", "ddddddddd"):
        assert not (collector.runs / refused).exists(), f"{refused} wrote something:\n{log}"
    assert "collector: CURVE on, 1 allowed client key(s)" in log
    assert "refused a publisher from 127.0.0.1 (unknown_key)" in log  # mallory
    assert "(no_curve)" in log or "(handshake_aborted)" in log  # no keys at all
    assert "(bad_key)" in log  # a wrong collector key
    assert "collector: CURVE refused {" in log  # the totals, at shutdown


@pytest.mark.slow
@pytest.mark.parametrize("source", ["config", "environment"])
def test_a_real_trainer_with_keys_from_its_config_or_environment_writes_through_curve(
    source, tmp_path, keys
):
    collector = CurveCollector(tmp_path, keys)
    overrides = ["model.d_model=32", "model.n_layers=1", "model.seq_len=16"]
    overrides += ["train.batch_size=2", "train.steps=3", "dynamics.log_freq=1"]
    # The spool is out of reach, so what the trainer's exit leaves queued is lost: give a loaded
    # collector time for the handshake (the trainer still exits as soon as its queue is sent).
    overrides += ["dynamics.linger_s=60"]
    env = {k: v for k, v in os.environ.items() if k not in (SERVER_KEY_ENV, CLIENT_KEY_ENV)}
    if source == "config":
        overrides += [
            f"dynamics.curve_server_key={keys / 'collector.key'}",
            f"dynamics.curve_client_key_file={keys / 'trainer.key_secret'}",
        ]
    else:
        env[SERVER_KEY_ENV] = str(keys / "collector.key")
        env[CLIENT_KEY_ENV] = str(keys / "trainer.key_secret")
    try:
        result = prismatic(
            "train",
            "configs/default.yaml",
            "--collector",
            collector.address,
            "--runs-dir",
            str(tmp_path / "trainer-side"),  # its spool stays out of the collector's reach
            *[a for o in overrides for a in ("--set", o)],
            env=env,
        )
        # The trainer has exited: its publisher sent everything (run_end last) or gave up.
        assert result.returncode == 0, result.stderr
    finally:
        log = collector.stop()
    run = run_hash(load_config(REPO / "configs/default.yaml", overrides))
    assert collector.steps(run) == [0, 1, 2], log
    assert "accepted a CURVE publisher from 127.0.0.1" in log
    assert "refused" not in log
