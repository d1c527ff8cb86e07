"""Shared pieces of the collector tests: messages shaped like a trainer's, a collector running in
a thread on a real socket, and reads of the real `dynamics.db` files it writes."""

from __future__ import annotations

import json
import math
import re
import sqlite3
import subprocess
import sys
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
    except BaseException:
        if "error" in result:  # the loop died first: that is the failure to report
            raise result["error"] from None
        raise
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


@contextmanager
def locked(path: Path, begin: str = "BEGIN IMMEDIATE", wait: bool = True) -> Iterator[None]:
    """Another process's lock on a database while the block runs (`BEGIN EXCLUSIVE` also keeps
    readers out); `wait=False`: a busy timeout of 0 for its own begin."""
    blocker = sqlite3.connect(path, isolation_level=None)
    try:
        if not wait:
            blocker.execute("PRAGMA busy_timeout=0")
        blocker.execute(begin)
        yield
        blocker.execute("ROLLBACK")
    finally:
        blocker.close()


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


SERVICE_REASONS = ("bad_rank", "bad_database")
RUN_STATUSES = ("live", "stale", "completed", "failed", "interrupted")
_LAYER_METRIC_COLUMNS = tuple(m for m in wire.EXPERT_METRICS)
_EXPERT_COLUMN = re.compile(r"^expert_(\d+)_([a-z_]+)$")


def assert_databases_sound(runs_dir: Path) -> int:
    """Every dynamics.db under runs_dir holds only rows a valid message could produce: numbers
    that are finite or NULL, non-negative norms, known columns, readable JSON, known statuses.
    Returns how many databases were checked."""
    checked = 0
    for path in sorted(runs_dir.rglob(db.DB_NAME)):
        assert wire.RUN_HASH_RE.match(path.parent.name), path
        assert path.parent.parent == runs_dir, f"a database outside the runs folder: {path}"
        conn = sqlite3.connect(path)
        try:
            assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)
            _check_dynamics(conn)
            _check_layers(conn)
            _check_run(conn, path.parent.name)
        finally:
            conn.close()
        checked += 1
    return checked


def _finite_or_null(value: Any, where: str) -> None:
    assert value is None or (type(value) in (int, float) and math.isfinite(value)), (where, value)


def _check_dynamics(conn: sqlite3.Connection) -> None:
    columns = db.table_columns(conn, "dynamics")
    for column in columns:
        if column in ("step", *db.STEP_COLUMNS):
            continue
        match = _EXPERT_COLUMN.match(column)
        assert match, column
        metric = match.group(2)
        assert metric in (*db.WIDE_METRICS, "clean_norm", "perturbed_norm"), column
        assert int(match.group(1)) < wire.MAX_EXPERTS, column
    for row in conn.execute("SELECT * FROM dynamics"):
        record = dict(zip(columns, row, strict=True))
        assert type(record["step"]) is int and 0 <= record["step"] <= wire.MAX_STEP, record
        assert type(record["ranks_reported"]) is int and record["ranks_reported"] >= 1, record
        assert type(record["nonfinite"]) is int and record["nonfinite"] >= 0, record
        for column, value in record.items():
            _finite_or_null(value, column)
            if value is not None and column.endswith("norm"):
                assert value >= 0, (column, value)


def _check_layers(conn: sqlite3.Connection) -> None:
    columns = db.table_columns(conn, "layer_dynamics")
    assert set(columns) == {"step", "layer", "expert", *_LAYER_METRIC_COLUMNS}, columns
    for row in conn.execute("SELECT * FROM layer_dynamics"):
        record = dict(zip(columns, row, strict=True))
        assert 0 <= record["layer"] < wire.MAX_LAYERS and 0 <= record["expert"] < wire.MAX_EXPERTS
        for column, value in record.items():
            _finite_or_null(value, column)
            if value is not None and column in wire.NON_NEGATIVE_METRICS:
                assert value >= 0, (column, value)


def _check_run(conn: sqlite3.Connection, run_hash: str) -> None:
    rows = conn.execute("SELECT run_hash, status, config, model, versions FROM run").fetchall()
    assert len(rows) <= 1
    for found, status, *documents in rows:
        assert found == run_hash
        assert status is None or status in RUN_STATUSES, status
        for text in documents:
            assert text is None or isinstance(json.loads(text), dict), text


# --- real processes ----------------------------------------------------------------------------

REPO = Path(__file__).resolve().parent.parent


def sender_main(address: str, run: str, rank: int, world: int, steps: int, every: int = 10) -> None:
    """A stand-in trainer rank in its own process: run_start, `steps` logged steps, run_end."""
    context = zmq.Context()
    sock = context.socket(zmq.PUSH)
    sock.setsockopt(zmq.LINGER, 30_000)
    sock.connect(address)
    send(sock, run_start(run, world, rank=rank))
    for i in range(steps):
        send(sock, dynamics(run, i * every, rank=rank, seq=i + 1))
    send(sock, run_end(run, rank=rank, last_step=(steps - 1) * every))
    sock.close()
    context.term()  # returns once everything queued was sent


def start_sender(address: str, run: str, rank: int, world: int, steps: int) -> subprocess.Popen:
    code = (
        "import sys; sys.path.insert(0, 'tests'); from collector_support import sender_main; "
        f"sender_main({address!r}, {run!r}, {rank}, {world}, {steps})"
    )
    return subprocess.Popen([sys.executable, "-c", code], cwd=REPO)


class CollectProcess:
    """`prismatic collect` in its own process on an ephemeral TCP port; its log lines kept."""

    def __init__(self, runs_dir: Path, *args: str) -> None:
        command = [sys.executable, "-m", "prismatic.cli", "collect"]
        command += ["--bind", "tcp://127.0.0.1:*", "--runs-dir", str(runs_dir), *args]
        self.proc = subprocess.Popen(
            command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        listening = wait_for(
            lambda: (
                next((line for line in self.lines if "listening on" in line), None)
                or self.proc.poll() is not None
            ),
            timeout=60,
            what="prismatic collect to listen",
        )
        if self.proc.poll() is not None:
            raise RuntimeError("prismatic collect exited:\n" + "\n".join(self.lines))
        self.address = re.search(r"listening on (tcp://\S+),", listening).group(1)

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    def signal(self, signum: int) -> None:
        self.proc.send_signal(signum)

    def has_received(self, sock: zmq.Socket) -> None:
        """Wait until the collector has received everything sent on `sock` so far: send it a
        message it rejects and wait for the rejection in its log (one socket delivers in
        order). A signal drops what the collector has not read yet, and a fixed sleep cannot
        tell a loaded collector has read it. Once per process: a rejection reason is logged
        at most every 10 s."""
        send(sock, {"v": 1, "kind": "nope"})
        wait_for(
            lambda: any("unknown_kind" in line for line in self.lines),
            timeout=60,
            what="the collector to receive what was sent before a rejected marker",
        )

    def wait(self, timeout: float) -> int:
        code = self.proc.wait(timeout)
        self._reader.join(5)
        return code

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def __enter__(self) -> CollectProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.kill()


def rate_sender_main(address: str, run: str, rate: int, seconds: float) -> None:
    """Send `rate` dynamics messages a second for `seconds`, on a steady schedule."""
    context = zmq.Context()
    sock = context.socket(zmq.PUSH)
    sock.setsockopt(zmq.LINGER, 30_000)
    sock.connect(address)
    send(sock, run_start(run))
    started = time.monotonic()
    total = int(rate * seconds)
    for step in range(total):
        due = started + step / rate
        delay = due - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        send(sock, dynamics(run, step))
    sock.close()
    context.term()
    print(json.dumps({"sent": total, "seconds": time.monotonic() - started}), flush=True)


def dashboard_reader_main(path: str, seconds: float, keep_open: bool) -> None:
    """Poll a dynamics.db the way the dashboard does, through prismatic.db's read functions;
    print what it saw and every error (a 'database is locked' would be one)."""
    errors: list[str] = []
    polls = max_step = 0
    conn = None
    last_step, last_updated = -1, 0.0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            if conn is None:
                conn = db.connect_reader(Path(path))
            if db.read_schema_version(conn) is not None:
                db.read_run(conn)
                db.count_steps(conn)
                columns, rows = db.read_dynamics_changed(conn, last_step, last_updated)
                if rows:
                    last_step = max(last_step, max(r[0] for r in rows))
                    updated = columns.index("updated")
                    last_updated = max(last_updated, max(r[updated] for r in rows))
                db.read_layer_dynamics(conn, max(0, last_step - 50), last_step)
                max_step = max(max_step, last_step)
            polls += 1
        except sqlite3.Error as exc:
            errors.append(f"{type(exc).__name__}: {exc}")
        finally:
            if conn is not None and not keep_open:
                conn.close()
                conn = None
        time.sleep(0.05)
    print(json.dumps({"polls": polls, "max_step": max_step, "errors": errors[:20]}), flush=True)


def start_python(code: str) -> subprocess.Popen:
    """`code` in a new interpreter that can import collector_support; stdout captured."""
    prelude = "import sys; sys.path.insert(0, 'tests'); import collector_support as cs; "
    return subprocess.Popen(
        [sys.executable, "-c", prelude + code], cwd=REPO, stdout=subprocess.PIPE, text=True
    )
