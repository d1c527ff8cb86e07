"""collector/curve.py with real ZeroMQ sockets over loopback TCP, in this process."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import pytest
import zmq

from collector.curve import (
    AllowedKeys,
    Refusals,
    ServerCurve,
    describe_handshake_failure,
)
from prismatic.errors import ConfigError
from prismatic.keys import generate, load_public, load_secret_pair


@pytest.fixture
def keys(tmp_path: Path) -> Path:
    directory = tmp_path / "keys"
    generate(directory, ["alice", "bob"])
    return directory


class Server:
    """A CURVE PULL socket as the collector makes it, in its own context."""

    def __init__(self, keys: Path) -> None:
        self.keys = keys
        self.context = zmq.Context()
        self.curve = ServerCurve.from_dir(keys)
        self.sock = self.context.socket(zmq.PULL)
        self.sock.linger = 0
        self.curve.apply_server(self.sock)
        port = self.sock.bind_to_random_port("tcp://127.0.0.1")
        self.address = f"tcp://127.0.0.1:{port}"

    def receive(self, timeout_s: float, until=None) -> list[bytes]:
        """What arrives in `timeout_s`; with `until`, only until a message arrives or
        `until()` is true."""
        got = []
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.sock.poll(50):
                got.append(self.sock.recv())
            if until is not None and (got or until()):
                break
        return got

    def refused(self) -> int:
        return sum(dict(self.curve.refusals.counts).values())  # a copy: the ZAP thread adds

    def close(self) -> None:
        self.sock.close()
        self.curve.stop()
        self.context.term()


@pytest.fixture
def server(keys: Path):
    s = Server(keys)
    yield s
    s.close()


def client(
    context: zmq.Context, address: str, keys: Path, name: str | None, server_key: Path
) -> zmq.Socket:
    sock = context.socket(zmq.PUSH)
    sock.linger = 0
    if name is not None:
        public, secret = load_secret_pair(str(keys / f"{name}.key_secret"), "test")
        sock.curve_serverkey = load_public(str(server_key), "test")
        sock.curve_publickey = public
        sock.curve_secretkey = secret
    sock.connect(address)
    return sock


def send_from(
    server: Server, keys: Path, name: str | None, payload: bytes, server_key: Path | None = None
) -> list[bytes]:
    """What the server receives after `name` (from `keys`; None: no CURVE) sends: until a
    message arrives or the server counts a refusal (up to 30 s: a loaded machine can take
    longer than 1.5 s to finish a handshake), and in 1.5 s more."""
    context = zmq.Context()
    try:
        server_key = server_key or server.keys / "collector.key"
        refused = server.refused()
        sock = client(context, server.address, keys, name, server_key)
        sock.send(payload)
        got = server.receive(30, until=lambda: server.refused() > refused)
        got += server.receive(1.5)  # a second copy, or a message let through after all
        sock.close()
    finally:
        context.term()
    return got


def test_an_allowed_key_gets_through_and_is_logged_as_accepted(server, keys, caplog):
    caplog.set_level(logging.INFO, logger="collector.curve")
    assert send_from(server, keys, "alice", b"hello") == [b"hello"]
    assert "accepted a CURVE publisher from 127.0.0.1" in caplog.text
    assert not server.curve.refusals.counts


def test_an_unknown_key_is_refused_counted_and_logged(server, keys, tmp_path, caplog):
    generate(tmp_path / "other", ["mallory"])  # a valid pair the collector never allowed
    assert send_from(server, tmp_path / "other", "mallory", b"let me in") == []
    assert server.curve.refusals.counts["unknown_key"] >= 1
    assert "refused a publisher from 127.0.0.1 (unknown_key)" in caplog.text


def test_a_publisher_without_curve_is_refused_and_logged(server, keys, caplog):
    assert send_from(server, keys, None, b"plain") == []
    counts = server.curve.refusals.counts
    assert counts["no_curve"] + counts["handshake_aborted"] >= 1, counts
    assert "refused a publisher from a peer of tcp://127.0.0.1:" in caplog.text


def test_a_publisher_holding_a_wrong_collector_key_is_refused_and_logged(server, keys, caplog):
    wrong = keys / "alice.key"  # an allowed client, but it thinks alice is the collector
    assert send_from(server, keys, "alice", b"misdirected", server_key=wrong) == []
    assert server.curve.refusals.counts["bad_key"] >= 1
    assert "(bad_key): its CURVE handshake did not decrypt" in caplog.text


def test_revoking_and_adding_keys_takes_effect_without_a_restart(server, keys):
    assert send_from(server, keys, "bob", b"before") == [b"before"]
    (keys / "clients" / "bob.key").unlink()
    assert send_from(server, keys, "bob", b"after revoking") == []
    generate(keys, ["carol"])  # `prismatic keys` again, same folder: the collector's pair stays
    assert send_from(server, keys, "carol", b"new trainer") == [b"new trainer"]


def test_stop_ends_both_threads(keys):
    s = Server(keys)
    s.sock.close()
    s.curve.stop()
    s.context.term()  # would hang if the ZAP or monitor thread still held a socket
    assert s.curve._auth is None and s.curve._monitor is None


def test_allowed_keys_follow_the_clients_folder(keys):
    allowed = AllowedKeys(keys / "clients")
    alice = load_public(str(keys / "alice.key"), "test")
    assert alice in allowed and len(allowed.keys()) == 2
    (keys / "clients" / "alice.key").unlink()
    assert alice not in allowed


def test_from_dir_names_what_is_missing(tmp_path, keys):
    with pytest.raises(ConfigError, match="lacks collector.key_secret or clients/"):
        ServerCurve.from_dir(tmp_path / "nowhere")
    os.replace(keys / "collector.key", keys / "collector.key_secret")  # public half only
    with pytest.raises(ConfigError, match="holds no secret key"):
        ServerCurve.from_dir(keys)


def test_handshake_failures_are_named_by_cause():
    assert (
        describe_handshake_failure(
            zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL, zmq.PROTOCOL_ERROR_ZMTP_MECHANISM_MISMATCH
        )[0]
        == "no_curve"
    )
    assert (
        describe_handshake_failure(
            zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL, zmq.PROTOCOL_ERROR_ZMTP_CRYPTOGRAPHIC
        )[0]
        == "bad_key"
    )
    reason, detail = describe_handshake_failure(zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL, 32)
    assert reason == "handshake_aborted" and "Broken pipe" in detail


def test_refusals_count_every_one_but_warn_once_per_reason_and_peer(caplog):
    refusals = Refusals()
    for _ in range(50):
        refusals.add("unknown_key", "10.0.0.7", "key abc")
    refusals.add("unknown_key", "10.0.0.8", "key def")
    assert refusals.counts["unknown_key"] == 51
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2
    assert "10.0.0.7" in warnings[0].getMessage() and "[1 refused so far]" in warnings[0].message
