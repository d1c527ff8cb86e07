"""The collector's writer process (collector/writer.py): it stores exactly what writing inline
stores, loses nothing when a batch fails or the process dies, ends with its collector, leaves
Ctrl-C to the collector, and needs no main guard in the script that starts it."""

from __future__ import annotations

import math
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from fractions import Fraction
from pathlib import Path

import pytest
import zmq
from collector_support import (
    REPO,
    RUN_A,
    RUN_B,
    CollectProcess,
    db_path,
    dynamics,
    locked,
    metrics,
    run_end,
    run_start,
    send,
    steps_in,
    wait_for,
)

from collector.service import Collector
from collector.writer import _pack, _unpack
from prismatic import wire

LAYER_CELLS = 4 * 3  # collector_support's messages: 4 layers x 3 experts


@pytest.fixture
def context() -> Iterator[zmq.Context]:
    ctx = zmq.Context()
    yield ctx
    ctx.destroy(linger=0)


def _messages() -> list[bytes]:
    """Two runs, one of two ranks, with the odd message the fast path hands on: NaN, Inf, a
    missing value, a resent step, a run_end."""
    out = [run_start(RUN_A), run_start(RUN_B, world_size=2)]
    for step in range(300):
        out.append(dynamics(RUN_A, step))
        if step < 120:
            out += [dynamics(RUN_B, step, rank=rank) for rank in (0, 1)]
    odd = metrics(5)
    odd["norm"][0][1] = math.nan
    odd["top_norm"][2][0] = math.inf
    odd["bottom_norm"][1][2] = None
    out += [dynamics(RUN_A, 5, metrics=odd, val_loss=2.5), dynamics(RUN_A, 7)]
    out.append(run_end(RUN_A, last_step=299))
    return [wire.encode(m) for m in out]


def _dump(path: Path) -> tuple[list, list, list]:
    conn = sqlite3.connect(path)
    try:
        cols = [r[1] for r in conn.execute("PRAGMA table_info(dynamics)") if r[1] != "updated"]
        wide = conn.execute(f"SELECT {', '.join(cols)} FROM dynamics ORDER BY step").fetchall()
        layers = conn.execute("SELECT * FROM layer_dynamics ORDER BY step, layer, expert")
        run = conn.execute(
            "SELECT run_hash, name, config, status, world_size, messages, rejected, last_step "
            "FROM run"
        ).fetchall()
        return wide, layers.fetchall(), run
    finally:
        conn.close()


def _feed(collector: Collector, datas: list[bytes]) -> None:
    for i, data in enumerate(datas):
        collector.handle_bytes(data)
        if i % 37 == 0:
            collector.flush(wait=False)  # batches in flight while more arrive
    assert collector.shutdown()


def test_the_writer_process_stores_what_inline_writing_stores(tmp_path: Path) -> None:
    datas = _messages()
    inline = Collector(runs_dir=tmp_path / "inline", writer="inline", flush_rows=50)
    process = Collector(runs_dir=tmp_path / "process", writer="process", flush_rows=50)
    _feed(inline, datas)
    _feed(process, datas)
    for run in (RUN_A, RUN_B):
        written = _dump(db_path(tmp_path / "process", run))
        assert written == _dump(db_path(tmp_path / "inline", run))
        assert written[0] and written[1]
    wide, layers, run_table = _dump(db_path(tmp_path / "process", RUN_A))
    assert [row[0] for row in wide] == list(range(300))
    assert len(layers) == 300 * LAYER_CELLS
    assert run_table[0][3] == "completed"
    # Every step once, and the two steps sent again once more each.
    assert process.stats.rows_written == inline.stats.rows_written == 300 + 120 + 2
    assert process._writer.restarts == 0


def test_a_writer_killed_with_a_batch_in_flight_loses_nothing(tmp_path: Path) -> None:
    collector = Collector(runs_dir=tmp_path, writer="process")
    send_steps = lambda steps: [  # noqa: E731
        collector.handle_bytes(wire.encode(dynamics(RUN_A, s))) for s in steps
    ]
    send_steps(range(100))
    assert collector.flush()
    # Someone holds the write lock: the writer takes the next batch and waits on it.
    with locked(db_path(tmp_path, RUN_A)):
        send_steps(range(100, 200))
        collector.flush(wait=False)
        writer = collector._writer
        assert writer.busy(RUN_A)
        assert writer._process is not None
        time.sleep(0.3)  # the writer is inside SQLite's busy wait now
        os.kill(writer._process.pid, signal.SIGKILL)
    send_steps(range(200, 300))
    assert collector.shutdown()
    assert steps_in(tmp_path, RUN_A) == list(range(300))
    conn = sqlite3.connect(db_path(tmp_path, RUN_A))
    try:
        assert conn.execute("SELECT count(*) FROM layer_dynamics").fetchone()[0] == 300 * 12
        assert conn.execute("SELECT messages FROM run").fetchone()[0] == 300  # counted once
    finally:
        conn.close()
    assert writer.restarts == 1
    assert collector.stats.flush_errors >= 1


def test_a_refused_batch_is_written_by_a_later_flush_in_order(tmp_path: Path) -> None:
    collector = Collector(runs_dir=tmp_path, writer="process")
    collector.handle_bytes(wire.encode(dynamics(RUN_A, 0, loss=1.0)))
    assert collector.flush()
    with locked(db_path(tmp_path, RUN_A), wait=False):
        collector.handle_bytes(wire.encode(dynamics(RUN_A, 1, loss=2.0)))
        assert not collector.flush()  # the busy timeout passes: refused, kept
        collector.handle_bytes(wire.encode(dynamics(RUN_A, 1, loss=3.0)))  # the step again
        assert collector.buffered_rows == 2
    assert collector.flush()
    conn = sqlite3.connect(db_path(tmp_path, RUN_A))
    try:
        assert conn.execute("SELECT step, loss FROM dynamics ORDER BY step").fetchall() == [
            (0, 1.0),
            (1, 3.0),  # the later report wins, as it does inline
        ]
    finally:
        conn.close()
    assert collector.shutdown()


def _children(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError, IndexError):
            continue
        if int(fields[1]) == pid:  # the parent's pid
            found.append(int(stat.parent.name))
    return found


def _gone(pid: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return True
    return "\nState:\tZ" in status  # exited, not reaped by whoever adopted it


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="reads /proc")
def test_the_writer_process_ends_when_its_collector_is_killed(
    tmp_path: Path, context: zmq.Context
) -> None:
    collector = CollectProcess(tmp_path)
    try:
        wait_for(lambda: any("writer process" in line for line in collector.lines))
        writers = _children(collector.proc.pid)
        assert len(writers) == 1
        sock = context.socket(zmq.PUSH)
        sock.connect(collector.address)
        for step in range(20):
            send(sock, dynamics(RUN_A, step))
        wait_for(lambda: len(steps_in(tmp_path, RUN_A)) == 20)
        sock.close(linger=0)
    finally:
        collector.kill()
    wait_for(lambda: all(_gone(pid) for pid in writers), timeout=10, what="the writer to end")
    with CollectProcess(tmp_path) as again:  # the database is fine for the next collector
        sock = context.socket(zmq.PUSH)
        sock.connect(again.address)
        send(sock, dynamics(RUN_A, 20))
        wait_for(lambda: len(steps_in(tmp_path, RUN_A)) == 21)
        sock.close(linger=0)
        again.signal(signal.SIGTERM)
        assert again.wait(30) == 0


@pytest.mark.slow
def test_ctrl_c_to_the_whole_process_group_still_commits_everything(
    tmp_path: Path, context: zmq.Context
) -> None:
    """A terminal's Ctrl-C signals the collector and its writer together; the writer ignores
    it and the collector flushes through it."""
    command = [sys.executable, "-m", "prismatic.cli", "collect", "--bind", "tcp://127.0.0.1:*"]
    proc = subprocess.Popen(
        [*command, "--runs-dir", str(tmp_path)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # its own process group, as a shell gives a foreground job
    )
    try:
        assert proc.stdout is not None
        lines = []
        for line in proc.stdout:
            lines.append(line)
            if "writer process" in line:
                break
        address = next(ln for ln in lines if "listening on" in ln).split()[5].rstrip(",")
        sock = context.socket(zmq.PUSH)
        sock.setsockopt(zmq.LINGER, 5000)
        sock.connect(address)
        for step in range(3000):
            send(sock, dynamics(RUN_B, step))
        wait_for(lambda: len(steps_in(tmp_path, RUN_B)) > 500, timeout=60)
        os.killpg(proc.pid, signal.SIGINT)
        rest, _ = proc.communicate(timeout=60)
        sock.close(linger=0)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, rest
    assert "written again" not in rest and "Traceback" not in rest  # the writer carried on
    final = next(ln for ln in rest.splitlines() if "stopped;" in ln)
    received, rows = (int(w) for w in final.split("stopped;")[1].split()[0:3:2])
    assert rows == received == len(steps_in(tmp_path, RUN_B))


def test_a_script_without_a_main_guard_can_run_a_collector(tmp_path: Path) -> None:
    """The writer is a fresh interpreter, not multiprocessing's spawn, which would import the
    script again (and, without a main guard, run it again)."""
    script = tmp_path / "collect_some.py"
    script.write_text(
        textwrap.dedent(
            f"""
            import sys
            sys.path.insert(0, {str(REPO / "tests")!r})
            from collector_support import RUN_A, dynamics
            from collector.service import Collector
            from prismatic import wire

            print("script ran", flush=True)
            collector = Collector(runs_dir=sys.argv[1])
            for step in range(50):
                collector.handle_bytes(wire.encode(dynamics(RUN_A, step)))
            print("committed", collector.shutdown(), collector._writer.name)
            """
        )
    )
    done = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "runs")],
        cwd=tmp_path,  # not the repository: the writer finds the packages anyway
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split("\n")[:2] == ["script ran", "committed True process"]
    assert steps_in(tmp_path / "runs", RUN_A) == list(range(50))


def test_a_bad_writer_is_named_with_what_is_accepted(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"'thread' is not accepted; expected one of process, "):
        Collector(runs_dir=tmp_path, writer="thread")
    done = subprocess.run(
        [sys.executable, "-m", "prismatic.cli", "collect", "--writer", "thread"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert "invalid choice: 'thread'" in done.stderr and "'inline'" in done.stderr


def test_rows_marshal_cannot_take_are_pickled() -> None:
    plain = [(1, 2.5, None, ("a", "b"), {"norm": [[1.0, None]]}, b"\x00\x01")]
    assert _pack(plain)[0] is True
    assert _unpack(_pack(plain)) == plain
    odd = [(1, Fraction(1, 3))]
    assert _pack(odd)[0] is False
    assert _unpack(_pack(odd)) == odd


def test_the_writer_is_not_left_running_after_shutdown(tmp_path: Path) -> None:
    collector = Collector(runs_dir=tmp_path, writer="process")
    collector.handle_bytes(wire.encode(dynamics(RUN_A, 0)))
    assert collector.flush()
    process = collector._writer._process
    assert process is not None and process.poll() is None
    assert collector.shutdown()
    assert process.poll() == 0
    assert collector._writer._folder is None  # its socket's folder is removed too
    # The WAL was folded back and truncated at the end, as inline writing does.
    wal = Path(f"{db_path(tmp_path, RUN_A)}-wal")
    assert not wal.exists() or wal.stat().st_size == 0
