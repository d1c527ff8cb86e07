"""Shared pieces of the collector tests: messages shaped like a trainer's, a collector running in
a thread on a real socket, and reads of the real `dynamics.db` files it writes."""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import zmq

from collector.service import Collector
from prismatic import db, wire

RUN_A = "a00000001"
RUN_B = "b00000002"
RUN_C = "c00000003"


def metrics(step: int, layers: int = 4, experts: int = 3, rank: int = 0) -> dict[str, list]:
    """Per-layer per-expert values that differ by step, layer, expert (and rank, if asked)."""
    out: dict[str, list] = {m: [] for m in wire.EXPERT_METRICS}
    for layer in range(layers):
        base = 1.0 + step / 100 + layer / 10 + rank / 1000
        out["top_norm"].append([base * (1 + e) for e in range(experts)])
        out["bottom_norm"].append([base * 0.1 * (1 + e) for e in range(experts)])
        out["middle_norm"].append([base * 2.0 for _ in range(experts)])
        out["norm"].append([base * 3.0 + e for e in range(experts)])
        out["divergence"].append([None] + [0.01 * e + layer / 1000 for e in range(1, experts)])
        out["weight_drift"].append([None] + [0.5 * e for e in range(1, experts)])
        out["routing_weight"].append([1.0 / experts] * experts)
        out["nonfinite"].append([0.0] * experts)
    return out


def run_start(run: str, world_size: int = 1, shards: bool = False, rank: int = 0) -> dict:
    message = wire.header(wire.KIND_RUN_START, run, rank, 0)
    message.update(
        name=f"run-{run}",
        config={"name": f"run-{run}", "model": {"num_experts": 3}},
        model={"layers": 4, "experts": 3, "mixing": "outputs"},
        world_size=world_size,
        shards=shards,
        host="test-host",
        pid=1234,
        versions={"python": "3"},
    )
    return message


def dynamics(run: str, step: int, rank: int = 0, seq: int | None = None, **fields: Any) -> dict:
    message = wire.header(wire.KIND_DYNAMICS, run, rank, step + 1 if seq is None else seq)
    message.update(step=step, loss=5.0 - step / 1000, lr=3e-4, metrics=metrics(step, rank=rank))
    message.update(fields)
    return message


def run_end(run: str, status: str = "completed", rank: int = 0, last_step: int = 0) -> dict:
    message = wire.header(wire.KIND_RUN_END, run, rank, 10**6)
    message.update(status=status, last_step=last_step, sent=10, dropped=0)
    return message


def fast_collector(address: str, runs_dir: Path, **overrides: Any) -> Collector:
    """A collector with short intervals, so tests see commits, timeouts and chores quickly."""
    options: dict[str, Any] = {
        "flush_interval_ms": 50,
        "rank_timeout_s": 30.0,
        "stale_after_s": 60.0,
        "stats_interval_s": 0.5,
    }
    options.update(overrides)
    return Collector(address, runs_dir, **options)


@contextmanager
def running(collector: Collector) -> Iterator[Collector]:
    """The collector's loop in a thread; stopped, flushed and joined on exit."""
    result: dict[str, Any] = {}

    def work() -> None:
        try:
            result["committed"] = collector.run()
        except BaseException as exc:  # surfaced in the test thread below
            result["error"] = exc

    thread = threading.Thread(target=work, name="collector-under-test")
    thread.start()
    if not collector.ready.wait(10):
        collector.stop()
        thread.join(10)
        raise RuntimeError(f"collector did not start: {result.get('error')!r}")
    try:
        yield collector
    finally:
        collector.stop()
        thread.join(30)
    assert not thread.is_alive(), "collector did not stop within 30 s"
    if "error" in result:
        raise result["error"]
    assert result["committed"], "collector could not commit everything on shutdown"


@contextmanager
def pusher(context: zmq.Context, address: str) -> Iterator[zmq.Socket]:
    sock = context.socket(zmq.PUSH)
    sock.setsockopt(zmq.LINGER, 5000)
    sock.connect(address)
    try:
        yield sock
    finally:
        sock.close()


def send(sock: zmq.Socket, message: dict) -> None:
    sock.send(wire.encode(message))


def wait_for(predicate: Callable[[], Any], timeout: float = 20.0, what: str = "") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"timed out after {timeout} s waiting for {what or predicate}")


def query(path: Path, sql: str, params: tuple = ()) -> list[tuple]:
    """Read a dynamics.db as the dashboard does (read-only); [] if it is not there yet."""
    if not path.is_file():
        return []
    conn = db.connect_reader(path)
    try:
        return conn.execute(sql, params).fetchall()
    except sqlite3.OperationalError as exc:
        if "no such table" in str(exc):
            return []
        raise
    finally:
        conn.close()


def db_path(runs_dir: Path, run: str) -> Path:
    return runs_dir / run / db.DB_NAME


def steps_in(runs_dir: Path, run: str) -> list[int]:
    return [r[0] for r in query(db_path(runs_dir, run), "SELECT step FROM dynamics ORDER BY step")]


def run_row(runs_dir: Path, run: str) -> dict[str, Any]:
    """The run table's row; {} while the database or the row is not there yet."""
    path = db_path(runs_dir, run)
    if not path.is_file():
        return {}
    conn = db.connect_reader(path)
    try:
        return db.read_run(conn) or {}
    except sqlite3.OperationalError as exc:
        if "no such table" in str(exc):
            return {}
        raise
    finally:
        conn.close()
