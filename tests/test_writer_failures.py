"""The writer process (collector/writer.py) when things go wrong: dead, hung or unstartable
writers, leftover folders, shutdown under a lock. Real processes, sockets and files."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
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
    steps_in,
)

import collector.writer as writer_module
from collector.service import Collector
from prismatic import wire


@pytest.fixture
def context() -> Iterator[zmq.Context]:
    ctx = zmq.Context()
    yield ctx
    ctx.destroy(linger=0)


def _send_steps(collector: Collector, run: str, steps: range) -> None:
    for step in steps:
        collector.handle_bytes(wire.encode(dynamics(run, step)))


def _in_thread(fn, timeout: float) -> tuple[bool, dict]:
    """Run fn in a daemon thread; (finished within timeout, {'value'|'error': ...})."""
    out: dict = {}

    def work() -> None:
        try:
            out["value"] = fn()
        except BaseException as exc:  # reported to the test
            out["error"] = exc

    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    thread.join(timeout)
    return not thread.is_alive(), out


def _kill_writer(collector: Collector) -> None:
    process = collector._writer._process
    assert process is not None
    os.kill(process.pid, signal.SIGKILL)
    process.wait()


def _unblock(context: zmq.Context, address: str) -> None:
    """Connect a peer to the dead writer's socket so that a blocked send can complete."""
    peer = context.socket(zmq.PAIR)
    peer.setsockopt(zmq.LINGER, 0)
    peer.connect(address)
    time.sleep(0.5)
    peer.close()


# --- 1: a writer that died while nothing was in flight -------------------------------------


def test_a_writer_that_died_while_idle_does_not_hang_the_next_flush(tmp_path: Path) -> None:
    context = zmq.Context()  # not destroyed: a thread may still be blocked on its socket
    collector = Collector(runs_dir=tmp_path, writer="process", context=context)
    _send_steps(collector, RUN_A, range(10))
    assert collector.flush()
    folder = collector._writer._folder
    _kill_writer(collector)  # OOM killer, a stray kill: nothing in flight
    time.sleep(0.5)
    _send_steps(collector, RUN_A, range(10, 20))
    # The flush starts a new writer (an interpreter start: seconds on a loaded machine, up to
    # START_TIMEOUT_S); a send blocked on the dead one would never return.
    done, out = _in_thread(
        lambda: collector.flush(wait=False), timeout=writer_module.START_TIMEOUT_S + 30
    )
    if not done:
        _unblock(context, f"ipc://{folder}/writer")  # so the test can clean up
    assert done, "flush(wait=False) blocked in a send to a writer that is gone"
    assert "error" not in out, out
    finished, result = _in_thread(collector.shutdown, timeout=60)
    assert finished and result.get("value") is True, result
    assert steps_in(tmp_path, RUN_A) == list(range(20))


def test_a_checkpoint_to_a_dead_writer_does_not_hang_the_loop(tmp_path: Path) -> None:
    """The main loop sends a checkpoint every 0.25 s: the first one after the writer died
    blocks the loop for good (a Ctrl-C then only sets stop_event: it takes a second one)."""
    context = zmq.Context()  # not destroyed: a thread may still be blocked on its socket
    collector = Collector(runs_dir=tmp_path, writer="process", context=context)
    _send_steps(collector, RUN_A, range(10))
    assert collector.flush()
    folder = collector._writer._folder
    _kill_writer(collector)
    time.sleep(0.5)
    done, _ = _in_thread(collector.checkpoint_next, timeout=5)
    if not done:
        _unblock(context, f"ipc://{folder}/writer")
    assert done, "checkpoint_next blocked in a send to a writer that is gone"
    finished, result = _in_thread(collector.shutdown, timeout=60)
    assert finished and result.get("value") is True, result


# --- 2: a writer that cannot be restarted ---------------------------------------------------


def test_a_writer_that_cannot_restart_keeps_the_batch_and_says_so_at_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(writer_module, "START_TIMEOUT_S", 20.0)
    collector = Collector(runs_dir=tmp_path, writer="process")
    _send_steps(collector, RUN_A, range(10))
    assert collector.flush()
    # The writer holds a batch (the database is locked) and dies; the next start fails
    # (here: an interpreter that cannot start; in life EMFILE, a full /tmp, ...).
    with locked(db_path(tmp_path, RUN_A)):
        _send_steps(collector, RUN_A, range(10, 110))
        collector.flush(wait=False)
        time.sleep(0.3)
        _kill_writer(collector)
    monkeypatch.setenv("PYTHONHOME", "/nonexistent")  # the child dies at once
    started = time.monotonic()
    error = None
    try:
        collector.flush()  # hears the writer is gone: the batch is put back
        collector.flush()  # hands it over again: a new writer is started
    except Exception as exc:  # what the collector's loop would die of
        error = exc
    took = time.monotonic() - started
    kept = collector.buffered_rows + sum(
        len(batch.steps) for _, _, batch in collector._writer._flying.values()
    )
    print(f"flush raised {error!r} after {took:.1f}s; rows kept {kept} of 100")
    assert error is None, f"a failed writer restart escaped flush: {error!r}"
    assert kept == 100, "the batch handed to a writer that could not start is gone"
    assert took < 10, f"waited {took:.1f}s for a writer that exited at once"
    monkeypatch.delenv("PYTHONHOME")
    collector._writer._retry_at = 0.0  # (the fix's back-off) the environment is fixed now
    assert collector.shutdown()
    assert steps_in(tmp_path, RUN_A) == list(range(110))


# --- 3: the writer's socket path ------------------------------------------------------------


def _writer_folders(where: Path) -> list[Path]:
    return sorted(where.glob("prismatic-writer-*"))


def test_a_long_tmpdir_is_not_reported_as_a_bind_error(tmp_path: Path) -> None:
    tmpdir = tmp_path / ("t" * (108 - len(str(tmp_path))))
    tmpdir.mkdir()
    env = {**os.environ, "TMPDIR": str(tmpdir)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "prismatic.cli", "collect", "--bind", "tcp://127.0.0.1:*"]
        + ["--runs-dir", str(tmp_path / "runs")],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines = []
    assert proc.stdout is not None
    for line in proc.stdout:
        lines.append(line)
        if "writer process" in line:
            proc.send_signal(signal.SIGTERM)
    proc.wait(60)
    output = "".join(lines)
    print(output)
    assert "--bind: cannot listen" not in output, "a writer socket error blamed on --bind"
    assert proc.returncode == 0
    assert _writer_folders(tmpdir) == [], "the writer's folder was left behind"


# --- 4: folders left behind ----------------------------------------------------------------


def _writer_address(pid: int) -> str:
    cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    return next(a.decode() for a in cmdline if a.startswith(b"ipc://"))


def _writer_pid(collector_pid: int) -> int:
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError, IndexError):
            continue
        if int(fields[1]) == collector_pid:
            return int(stat.parent.name)
    raise AssertionError("no writer process")


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="reads /proc")
def test_a_killed_collector_leaves_no_writer_folder_behind(tmp_path: Path) -> None:
    collector = CollectProcess(tmp_path)
    try:
        deadline = time.monotonic() + 30
        while not any("writer process" in ln for ln in collector.lines):
            assert time.monotonic() < deadline
            time.sleep(0.05)
        writer = _writer_pid(collector.proc.pid)
        folder = Path(re.sub("^ipc://", "", _writer_address(writer))).parent
        assert folder.is_dir()
    finally:
        collector.kill()  # SIGKILL: no shutdown ran
    deadline = time.monotonic() + 10
    while Path(f"/proc/{writer}").exists() and time.monotonic() < deadline:
        time.sleep(0.1)  # the writer notices its collector is gone within POLL_S
    time.sleep(0.5)
    assert not folder.exists(), f"{folder} left behind by a collector that was killed"


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="reads /proc")
def test_a_second_signal_leaves_no_writer_folder_behind(tmp_path: Path) -> None:
    collector = CollectProcess(tmp_path)
    blocker = None
    try:
        ctx = zmq.Context.instance()
        sock = ctx.socket(zmq.PUSH)
        sock.connect(collector.address)
        sock.send(wire.encode(dynamics(RUN_B, 0)))
        deadline = time.monotonic() + 30
        while steps_in(tmp_path, RUN_B) != [0]:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        writer = _writer_pid(collector.proc.pid)
        folder = Path(re.sub("^ipc://", "", _writer_address(writer))).parent
        blocker = sqlite3.connect(db_path(tmp_path, RUN_B), isolation_level=None)
        blocker.execute("BEGIN IMMEDIATE")  # the first signal's flush waits on this
        sock.send(wire.encode(dynamics(RUN_B, 1)))
        collector.has_received(sock)  # unreceived, step 1 would leave nothing to flush
        sock.close(linger=1000)
        time.sleep(0.5)
        collector.signal(signal.SIGTERM)
        time.sleep(1.0)
        collector.signal(signal.SIGTERM)  # the impatient second one
        assert collector.wait(30) == 128 + signal.SIGTERM
    finally:
        if blocker is not None:
            blocker.close()
        collector.kill()
    time.sleep(0.5)
    assert not folder.exists(), f"{folder} left behind by a second signal"


# --- 5: a writer that hangs --------------------------------------------------------------------


@contextlib.contextmanager
def stopped_writer(collector: Collector) -> Iterator[None]:
    """Steps 0-9 of RUN_A committed, then the writer process SIGSTOPped with steps 10-19
    buffered and the collector told to stop; the writer is ended afterwards, whatever happened."""
    _send_steps(collector, RUN_A, range(10))
    assert collector.flush()
    process = collector._writer._process
    assert process is not None
    os.kill(process.pid, signal.SIGSTOP)
    try:
        _send_steps(collector, RUN_A, range(10, 20))
        collector.stop()
        yield
    finally:
        if process.poll() is None:
            os.kill(process.pid, signal.SIGCONT)
            process.kill()


def test_shutdown_gives_up_on_a_writer_that_hangs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A writer stuck for good (a stalled disk, a stopped process): shutdown promises to retry
    for SHUTDOWN_RETRY_S and to stop the writer within STOP_TIMEOUT_S, then exit 1."""
    import collector.service as service

    monkeypatch.setattr(service, "SHUTDOWN_RETRY_S", 2.0)
    monkeypatch.setattr(writer_module, "STOP_TIMEOUT_S", 2.0)
    # the fix's hang limit (absent before it)
    monkeypatch.setattr(writer_module, "WRITE_TIMEOUT_S", 3.0, raising=False)
    collector = Collector(runs_dir=tmp_path, writer="process")
    with stopped_writer(collector):
        finished, out = _in_thread(collector.shutdown, timeout=20)
        print("shutdown finished:", finished, out)
        assert finished, "shutdown waits forever on a writer that does not answer"
        # committed by a new writer, or said not to be
        assert out.get("value") is False or steps_in(tmp_path, RUN_A) == list(range(20))


def test_shutdown_waits_its_own_retry_time_for_a_stopped_writer_not_the_hang_limit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """WRITE_TIMEOUT_S (60 s) is for a writer that falls silent while the collector serves; at
    shutdown a silent writer costs SHUTDOWN_RETRY_S, so `prismatic up` (which waits 30 s)
    never has to kill the collector for it."""
    import collector.service as service

    monkeypatch.setattr(service, "SHUTDOWN_RETRY_S", 3.0)
    monkeypatch.setattr(writer_module, "STOP_TIMEOUT_S", 2.0)
    assert writer_module.WRITE_TIMEOUT_S >= 60
    collector = Collector(runs_dir=tmp_path, writer="process")
    with stopped_writer(collector):
        began = time.monotonic()
        finished, out = _in_thread(collector.shutdown, timeout=40)
        took = time.monotonic() - began
        assert finished, "shutdown waits on a writer that does not answer"
        assert took < 30, f"shutdown took {took:.1f}s with a stopped writer"
        assert out.get("value") is False or steps_in(tmp_path, RUN_A) == list(range(20))


def test_a_writer_busy_with_a_large_batch_is_not_taken_for_a_hung_one(tmp_path: Path) -> None:
    """Silent means no reply and no CPU time: a writer committing a batch for longer than the
    hang limit, using CPU all along, is left to finish (it was killed and restarted forever)."""
    collector = Collector(runs_dir=tmp_path, writer="process")
    collector._writer.start()
    collector._writer.hang_limit_s = 0.2  # far less than the batch below takes to commit
    big = {name: [[0.5] * 256 for _ in range(64)] for name in ("norm", "top_norm")}
    _send_steps(collector, RUN_A, range(1))
    assert collector.flush()
    for step in range(1, 25):  # 24 steps x 16,384 layer rows: seconds of SQLite
        message = dynamics(RUN_A, step)
        message["metrics"] = big
        collector.handle_bytes(wire.encode(message))
    began = time.monotonic()
    assert collector.flush()
    took = time.monotonic() - began
    restarts = collector._writer.restarts
    assert collector.shutdown()
    assert took > 0.4, f"the batch took {took:.2f}s: too short to show anything"
    assert restarts == 0
    assert steps_in(tmp_path, RUN_A) == list(range(25))


# --- 6: LRU eviction, restarts: what held up --------------------------------------------------


def test_lru_eviction_with_one_open_run_stores_what_inline_stores(tmp_path: Path) -> None:
    counts = {}
    for kind in ("inline", "process"):
        collector = Collector(runs_dir=tmp_path / kind, writer=kind, max_open_runs=1)
        for step in range(60):
            for run in (RUN_A, RUN_B):
                collector.handle_bytes(wire.encode(dynamics(run, step)))
            if step % 7 == 0:
                collector.flush(wait=False)
        assert collector.shutdown()
        counts[kind] = {
            run: (
                steps_in(tmp_path / kind, run),
                sqlite3.connect(db_path(tmp_path / kind, run))
                .execute("SELECT messages FROM run")
                .fetchall(),
            )
            for run in (RUN_A, RUN_B)
        }
        assert collector.stats.rows_written == 120
    assert counts["process"] == counts["inline"]
    assert counts["process"][RUN_A] == (list(range(60)), [(60,)])


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.skipif(not Path("/proc/self/fd").exists(), reason="reads /proc")
def test_writer_restarts_leak_no_descriptors_or_folders(tmp_path: Path) -> None:
    collector = Collector(runs_dir=tmp_path, writer="process")
    _send_steps(collector, RUN_A, range(5))
    assert collector.flush()
    counts, folders = [], []
    for round_ in range(4):
        folders.append(collector._writer._folder)
        with locked(db_path(tmp_path, RUN_A)):
            _send_steps(collector, RUN_A, range(5 + round_ * 5, 10 + round_ * 5))
            collector.flush(wait=False)
            time.sleep(0.2)
            _kill_writer(collector)
        collector.flush()
        collector.flush()
        assert collector._writer.restarts == round_ + 1
        counts.append(_fds())
    assert counts[-1] <= counts[0], f"descriptors left open by restarts: {counts}"
    assert not any(Path(f).exists() for f in folders)
    assert collector.shutdown()
    assert steps_in(tmp_path, RUN_A) == list(range(25))


def test_a_store_evicted_after_the_stop_signal_keeps_its_unwritten_rows(tmp_path: Path) -> None:
    """max_open_runs reached while the loop drains its last burst after a SIGTERM: the least
    used run is closed although its commit failed, so shutdown no longer sees its rows, says
    everything was committed (exit 0) and saves the spool cursors past them."""
    collector = Collector(runs_dir=tmp_path, writer="process", max_open_runs=1)
    _send_steps(collector, RUN_A, range(5))
    assert collector.flush()
    with locked(db_path(tmp_path, RUN_A)):
        _send_steps(collector, RUN_A, range(5, 10))
        collector.stop()  # the first signal, while _drain still handles its burst
        collector.handle_bytes(wire.encode(dynamics(RUN_B, 0)))  # evicts RUN_A: refused
    committed = collector.shutdown()
    assert steps_in(tmp_path, RUN_A) == list(range(10)) or committed is False


def test_a_corrupt_database_is_refused_and_other_runs_go_on(tmp_path: Path) -> None:
    (tmp_path / RUN_A).mkdir()
    db_path(tmp_path, RUN_A).write_bytes(b"not a database at all" * 100)
    collector = Collector(runs_dir=tmp_path, writer="process")
    assert not collector.handle_bytes(wire.encode(dynamics(RUN_A, 0)))
    _send_steps(collector, RUN_B, range(10))
    assert collector.shutdown()
    assert collector.stats.rejected["bad_database"] == 1
    assert steps_in(tmp_path, RUN_B) == list(range(10))
    assert collector._writer.restarts == 0


# --- shutdown under a lock; folders of killed collectors; which writer ----------------------


@pytest.mark.parametrize("kind", ["process", "inline"])
def test_shutdown_names_the_rows_it_could_not_commit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, kind: str
) -> None:
    from collector import service

    monkeypatch.setattr(service, "SHUTDOWN_RETRY_S", 0.5)
    collector = Collector(runs_dir=tmp_path, writer=kind)
    _send_steps(collector, RUN_A, range(3))
    assert collector.flush()
    with locked(db_path(tmp_path, RUN_A), "BEGIN EXCLUSIVE"):
        _send_steps(collector, RUN_A, range(3, 10))
        started = time.monotonic()
        assert not collector.shutdown()
        took = time.monotonic() - started
    assert "could not commit 7 rows" in caplog.text
    assert steps_in(tmp_path, RUN_A) == [0, 1, 2]
    # One try (the 5 s busy timeout) and no other at the close: not the two or three of before.
    assert took < 9.0, took


def test_a_new_writer_removes_the_folders_of_killed_collectors_only(tmp_path: Path) -> None:
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        text=True,
        capture_output=True,
        check=True,
    )
    dead_pid = int(dead.stdout)
    base = Path(writer_module.tempfile.gettempdir())
    stale = base / f"{writer_module.FOLDER_PREFIX}{dead_pid}-zz9stale"
    live = base / f"{writer_module.FOLDER_PREFIX}{os.getpid()}-zz9live"
    for folder in (stale, live):
        folder.mkdir()
        (folder / "writer").write_text("")
    try:
        collector = Collector(runs_dir=tmp_path, writer="process")
        _send_steps(collector, RUN_A, range(2))
        assert collector.flush()
        assert not stale.exists()
        assert live.exists()  # this test's own pid: a collector that is running
        assert collector.shutdown()
    finally:
        for folder in (stale, live):
            if folder.exists():
                (folder / "writer").unlink()
                folder.rmdir()


def test_an_inline_collector_says_it_writes_inline(tmp_path: Path) -> None:
    with CollectProcess(tmp_path, "--writer", "inline") as collector:
        wait_for_line = time.monotonic() + 20
        while not any("writing inline" in ln for ln in collector.lines):
            assert time.monotonic() < wait_for_line, collector.lines
            time.sleep(0.05)
        assert not any("writer process" in ln for ln in collector.lines)
        collector.signal(signal.SIGTERM)
        assert collector.wait(30) == 0


def test_a_batch_the_writer_cannot_write_for_a_bug_is_logged_once_and_kept(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A batch that fails for a reason other than SQLite's comes back every flush: the writer
    says so with one traceback, not one every 100 ms, and answers "failed" each time."""
    stores: dict = {}
    run_dir = str(tmp_path / RUN_A)
    unbindable = {"sent": 2**64}  # no SQLite integer holds it: OverflowError, not sqlite3.Error
    answers = [
        writer_module._write(stores, i, run_dir, writer_module._pack([]), unbindable, {})
        for i in range(3)
    ]
    assert [a[0] for a in answers] == ["failed"] * 3
    assert all("OverflowError" in a[2] for a in answers)
    tracebacks = [r for r in caplog.records if r.exc_info]
    assert len(tracebacks) == 1, [r.getMessage() for r in tracebacks]
    for store in stores.values():
        store.conn.close()
