"""The collector over real TCP with real processes: several sender processes (runs and ranks) at
once, message size limits, and `prismatic collect` stopping on SIGTERM/SIGINT."""

from __future__ import annotations

import signal
import socket
import sqlite3
import time
from pathlib import Path

import pytest
import zmq
from collector_support import (
    RUN_A,
    RUN_B,
    RUN_C,
    CollectProcess,
    assert_databases_sound,
    db_path,
    dynamics,
    fast_collector,
    metrics,
    query,
    run_row,
    run_start,
    running,
    send,
    start_sender,
    steps_in,
    wait_for,
)
from net_support import free_port

from prismatic import db, wire
from trainer.publisher import Publisher


@pytest.fixture
def context() -> zmq.Context:
    ctx = zmq.Context()
    yield ctx
    ctx.destroy(linger=0)


def test_sender_processes_for_several_runs_and_ranks_over_tcp(
    tmp_path: Path, context: zmq.Context
) -> None:
    worlds = {RUN_A: 1, RUN_B: 2, RUN_C: 3}
    steps = 60
    collector = fast_collector("tcp://127.0.0.1:*", tmp_path, context=context)
    with running(collector):
        address = collector.bound_address
        assert address is not None and address.startswith("tcp://127.0.0.1:")
        senders = [
            start_sender(address, run, rank, world, steps)
            for run, world in worlds.items()
            for rank in range(world)
        ]
        for proc in senders:
            assert proc.wait(120) == 0
        for run in worlds:
            wait_for(lambda run=run: run_row(tmp_path, run).get("status") == "completed")
    assert collector.stats.rejected == {}

    for run, world in worlds.items():
        path = db_path(tmp_path, run)
        assert steps_in(tmp_path, run) == [i * 10 for i in range(steps)]
        assert {r[0] for r in query(path, "SELECT ranks_reported FROM dynamics")} == {world}
        assert query(path, "SELECT count(*) FROM layer_dynamics") == [(steps * 12,)]
        bottom = query(path, "SELECT bottom_norm FROM layer_dynamics WHERE step=300 AND layer=2")
        expected = [
            sum(metrics(300, rank=r)["bottom_norm"][2][e] for r in range(world)) / world
            for e in range(3)
        ]
        assert [r[0] for r in bottom] == pytest.approx(expected)
        row = run_row(tmp_path, run)
        assert (row["world_size"], row["last_step"], row["messages"]) == (
            world,
            (steps - 1) * 10,
            world * (steps + 2),
        )
    assert assert_databases_sound(tmp_path) == 3


def test_message_size_limits_over_tcp(tmp_path: Path, context: zmq.Context) -> None:
    collector = fast_collector("tcp://127.0.0.1:*", tmp_path, context=context)
    with running(collector):
        address = collector.bound_address
        assert address is not None
        # Over the wire format's limit, under ZeroMQ's: received, rejected and counted.
        big = context.socket(zmq.PUSH)
        big.connect(address)
        send(big, dynamics(RUN_A, 1) | {"pad": "x" * (wire.MAX_MESSAGE_BYTES + 1)})
        wait_for(lambda: collector.stats.rejected["oversized"] == 1)
        # Over ZeroMQ's maximum message size: libzmq drops the peer before a byte is stored.
        huge = context.socket(zmq.PUSH)
        huge.connect(address)
        send(huge, dynamics(RUN_B, 1) | {"pad": "x" * (5 * wire.MAX_MESSAGE_BYTES)})
        # A well-behaved sender is unaffected.
        good = context.socket(zmq.PUSH)
        good.connect(address)
        send(good, dynamics(RUN_C, 1))
        wait_for(lambda: steps_in(tmp_path, RUN_C) == [1])
        time.sleep(0.5)
        for sock in (big, huge, good):
            sock.close(linger=0)
    assert collector.stats.received == 2  # the huge one never reached the collector
    assert not (tmp_path / RUN_A).exists() and not (tmp_path / RUN_B).exists()


def _stream(address: str, run: str, count: int, context: zmq.Context) -> zmq.Socket:
    sock = context.socket(zmq.PUSH)
    sock.setsockopt(zmq.LINGER, 10_000)
    sock.connect(address)
    send(sock, run_start(run))
    for step in range(count):
        send(sock, dynamics(run, step))
    return sock


def _final_counts(lines: list[str]) -> tuple[int, int]:
    line = next(line for line in reversed(lines) if "stopped;" in line)
    words = line.split("stopped;")[1].split()
    return int(words[0]), int(words[2])


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_prismatic_collect_flushes_commits_and_exits_0_on_a_signal(
    tmp_path: Path, context: zmq.Context, signum: int
) -> None:
    with CollectProcess(tmp_path, "--stale-after", "1") as collector:
        silent = _stream(collector.address, RUN_B, 1, context)  # a run that goes quiet
        sock = _stream(collector.address, RUN_A, 3000, context)
        wait_for(lambda: run_row(tmp_path, RUN_B).get("status") == "stale", timeout=30)
        # Signal while messages are still arriving: whatever was received must be committed.
        for step in range(3000, 6000):
            send(sock, dynamics(RUN_A, step))
        wait_for(lambda: len(steps_in(tmp_path, RUN_A)) > 1000, timeout=60)
        collector.signal(signum)
        code = collector.wait(60)
        sock.close(linger=0)
        silent.close(linger=0)
    assert code == 0, "\n".join(collector.lines)
    received, rows_written = _final_counts(collector.lines)
    stored = len(steps_in(tmp_path, RUN_A)) + len(steps_in(tmp_path, RUN_B))
    assert stored == rows_written
    assert received == rows_written + 2  # every dynamics message received became a row
    assert any(signal.Signals(signum).name in line for line in collector.lines)
    assert any("schema version" in line for line in collector.lines[:3])


@pytest.mark.slow
def test_a_second_signal_exits_at_once_even_while_a_flush_waits(
    tmp_path: Path, context: zmq.Context
) -> None:
    with CollectProcess(tmp_path) as collector:
        sock = _stream(collector.address, RUN_A, 10, context)
        wait_for(lambda: len(steps_in(tmp_path, RUN_A)) == 10)

        # Someone else holds the write lock: the collector's next flush waits on it.
        blocker = sqlite3.connect(db_path(tmp_path, RUN_A), isolation_level=None)
        blocker.execute("BEGIN IMMEDIATE")
        for step in range(10, 20):
            send(sock, dynamics(RUN_A, step))
        collector.has_received(sock)  # else the signal could find nothing to flush
        time.sleep(1.0)
        collector.signal(signal.SIGTERM)
        time.sleep(1.0)
        assert collector.proc.poll() is None  # the first signal waits for the flush

        collector.signal(signal.SIGTERM)
        started = time.monotonic()
        code = collector.wait(30)
        waited = time.monotonic() - started
        blocker.execute("ROLLBACK")
        blocker.close()
        sock.close(linger=0)
    assert code == 128 + signal.SIGTERM
    # The busy timeout alone is 5 s, and shutdown retries for 10 s more: this did not wait.
    assert waited < db.BUSY_TIMEOUT_MS / 1000 / 2, waited
    assert len(steps_in(tmp_path, RUN_A)) == 10  # nothing more was written


@pytest.mark.slow
def test_the_first_signal_commits_once_the_database_is_free_again(
    tmp_path: Path, context: zmq.Context
) -> None:
    with CollectProcess(tmp_path) as collector:
        sock = _stream(collector.address, RUN_A, 10, context)
        wait_for(lambda: len(steps_in(tmp_path, RUN_A)) == 10)
        blocker = sqlite3.connect(db_path(tmp_path, RUN_A), isolation_level=None)
        blocker.execute("BEGIN IMMEDIATE")
        for step in range(10, 20):
            send(sock, dynamics(RUN_A, step))
        collector.has_received(sock)  # what the signal finds unreceived is dropped
        time.sleep(1.0)
        collector.signal(signal.SIGTERM)
        time.sleep(2.0)
        blocker.execute("ROLLBACK")  # the lock goes away: the waiting flush goes through
        blocker.close()
        code = collector.wait(60)
        sock.close(linger=0)
    assert code == 0, "\n".join(collector.lines)
    assert steps_in(tmp_path, RUN_A) == list(range(20))


def _ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.mark.skipif(not _ipv6_loopback(), reason="this machine has no IPv6 loopback")
def test_an_ipv6_address_works_for_the_collector_and_the_publisher(
    tmp_path: Path, context: zmq.Context
) -> None:
    address = f"tcp://[::1]:{free_port()}"
    with running(fast_collector(address, tmp_path, context=context)) as collector:
        assert collector.bound_address == address
        publisher = Publisher(address, RUN_A, context=context)
        publisher.send(wire.KIND_DYNAMICS, step=0, loss=1.0, metrics=metrics(0))
        wait_for(lambda: steps_in(tmp_path, RUN_A) == [0])
        publisher.close()
