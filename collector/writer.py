"""Where the collector's SQLite writes run: in its own process, on the second core, or inline.

Receiving, checking and aggregating take one core and SQLite's inserts about as much again, so
by default a writer process does the inserts while the collector goes on receiving
(`ProcessWriter`). The collector keeps every batch it hands over until the writer says it is
committed: a batch that fails (locked, disk full) or whose writer died is put back in front of
its store's buffer and written by a later flush, so nothing is lost and nothing is written twice
out of order. One batch per run is in flight at a time, which keeps each run's writes in the
order they were received. `InlineWriter` does the same in the collector's own thread.

The writer process ignores SIGINT and SIGTERM: a Ctrl-C reaches the whole process group, and the
collector decides when writing stops. It exits when the collector says "stop", or is gone.
"""

from __future__ import annotations

import gc
import logging
import marshal
import os
import pickle
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import zmq

from collector.store import Batch, RunStore, StepRow, WireRow, row_from_wire, row_to_wire
from prismatic.errors import SchemaError

log = logging.getLogger(__name__)

WRITERS = ("process", "inline")
_ROOT = Path(__file__).resolve().parent.parent  # the folder holding collector/ and prismatic/
START_TIMEOUT_S = 60.0  # the writer process's first reply (an interpreter start and imports)
STOP_TIMEOUT_S = 15.0  # for the writer to close its databases at the end
FOLDER_PREFIX = "prismatic-writer-"  # then the collector's pid, "-", and mkdtemp's letters
POLL_S = 0.5  # while waiting, how often to check that the writer process is alive
# A writer holding batches that has answered nothing for this long is taken as hung (a stalled
# disk, a stopped process): it is killed and its batches are put back for a new one.
WRITE_TIMEOUT_S = 60.0
RESTART_BACKOFF_S = 5.0  # after a writer failed to start, how long before the next try

# Callbacks into the collector: a committed batch's rows; a batch that was put back, and why.
OnDone = Callable[[RunStore, list[StepRow]], None]
OnFailed = Callable[[RunStore, sqlite3.Error], None]


class WriterError(RuntimeError):
    """No writer process could be started."""


class InlineWriter:
    """Writes each batch at once, in the caller's thread."""

    name = "inline"

    def __init__(self, on_done: OnDone, on_failed: OnFailed) -> None:
        self.on_done = on_done
        self.on_failed = on_failed
        self.hang_limit_s: float | None = None  # unused: nothing is ever in flight

    def submit(self, store: RunStore, batch: Batch) -> None:
        try:
            written = store.write(batch)
        except sqlite3.Error as exc:
            store.restore(batch)
            self.on_failed(store, exc)
        else:
            self.on_done(store, written)

    def busy(self, run_hash: str) -> bool:
        return False

    def flying_bytes(self) -> int:
        return 0

    def collect(self, timeout: float = 0.0) -> None:
        """Nothing is ever in flight."""

    def wait(self, run_hash: str | None = None) -> None:
        """Nothing is ever in flight."""

    def checkpoint(self, store: RunStore) -> None:
        store.checkpoint()

    def close_store(self, store: RunStore) -> None:
        """Checkpoint and close the store's database (its buffer is already empty)."""
        store.close()

    def reply_socket(self) -> zmq.Socket | None:
        return None

    def start(self) -> None:
        """Nothing to start."""

    def stop(self) -> None:
        """Nothing to stop."""

    def kill(self) -> None:
        """Nothing to kill."""


class ProcessWriter:
    """Hands batches to a writer process and hears back what it committed.

    The two talk over a ZeroMQ PAIR socket on an `ipc://` path in a private (0700) folder:
    sending a batch only queues it (ZeroMQ's I/O thread writes it while this thread goes on
    receiving), where a pipe would block while the writer is busy with the previous batch.

    Started with the collector's loop (`start`), or by the first batch. If the process dies,
    the batches it held are put back into their stores (reported as failed flushes) and a new
    process is started for the next one.
    """

    name = "process"

    def __init__(self, on_done: OnDone, on_failed: OnFailed, context: zmq.Context) -> None:
        self.on_done = on_done
        self.on_failed = on_failed
        self.context = context
        self.restarts = 0
        self._process: subprocess.Popen | None = None
        self._sock: zmq.Socket | None = None
        self._folder: str | None = None
        self._next_id = 0
        self._checked = 0.0  # when the process was last seen alive
        self._progress = 0.0  # when the writer last answered (or got work while idle)
        self._retry_at = 0.0  # no new writer before this (one failed to start)
        # At shutdown the collector shortens the hang limit to its own retry time, so that a
        # stopped writer costs that, not WRITE_TIMEOUT_S (`prismatic up` waits 30 s).
        self.hang_limit_s: float | None = None
        self._cpu: int | None = None  # the writer's CPU time (clock ticks) when last looked at
        # run hash -> (batch id, store, batch): one batch per run in flight
        self._flying: dict[str, tuple[int, RunStore, Batch]] = {}
        self._by_id: dict[int, str] = {}

    # --- the process ---------------------------------------------------------------------------

    def _start(self) -> zmq.Socket:
        """A new interpreter running this module: not a fork (the ZeroMQ I/O threads would not
        survive one), not multiprocessing's spawn (that imports the caller's main module
        again, which a script without a main guard does not survive)."""
        if time.monotonic() < self._retry_at:
            raise WriterError("collector: no writer process (the last one failed to start)")
        # 0700: nobody else connects. Named after this process, so that a later collector can
        # tell the folder of one that was killed (and could not remove it) from one in use.
        prefix = f"{FOLDER_PREFIX}{os.getpid()}-"
        remove_stale_folders()
        folder = tempfile.mkdtemp(prefix=prefix)
        if len(f"{folder}/writer") > getattr(zmq, "IPC_PATH_MAX_LEN", 107):  # a long $TMPDIR
            shutil.rmtree(folder, ignore_errors=True)
            folder = tempfile.mkdtemp(prefix=prefix, dir="/tmp")
        address = f"ipc://{folder}/writer"
        sock = self.context.socket(zmq.PAIR)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SNDHWM, 0)  # a send fails (zmq.Again) only when no writer is there
        try:
            sock.bind(address)
        except zmq.ZMQError as exc:
            sock.close()
            shutil.rmtree(folder, ignore_errors=True)
            self._retry_at = time.monotonic() + RESTART_BACKOFF_S
            message = f"collector: the writer's socket {address}: {exc}"
            log.error("%s", message)
            raise WriterError(message) from None
        env = dict(os.environ)
        # The packages as this process found them, even when they are not installed.
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(_ROOT), env.get("PYTHONPATH", "")) if p)
        env["PYTHONSAFEPATH"] = "1"  # not the working folder's own `collector`, if it has one
        level = logging.getLogger().getEffectiveLevel()
        entry = "import sys; from collector.writer import main; main(sys.argv[1:])"
        command = [sys.executable, "-c", entry, address, str(level), str(os.getpid())]
        process = subprocess.Popen(command, env=env, stdin=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + START_TIMEOUT_S
            while not sock.poll(round(POLL_S * 1000)):
                if process.poll() is not None:
                    raise RuntimeError("exited at start")
                if time.monotonic() > deadline:
                    raise RuntimeError("did not start")
            reply = pickle.loads(sock.recv())
            if reply != ("ready",):
                raise RuntimeError(f"said {reply!r} at start")
        except (zmq.ZMQError, pickle.UnpicklingError, RuntimeError) as exc:
            sock.close()
            _end(process, 0.0)
            shutil.rmtree(folder, ignore_errors=True)
            self._retry_at = time.monotonic() + RESTART_BACKOFF_S
            message = f"collector: the writer process {exc} (exit status {process.returncode})"
            log.error("%s", message)
            raise WriterError(message) from None
        self._process, self._sock, self._folder = process, sock, folder
        self._checked = time.monotonic()
        log.info("collector: writer process %d started", process.pid)
        return sock

    def _lost(self, why: str) -> None:
        """The writer process is gone: put back every batch it held, start afresh later."""
        log.error(
            "collector: the writer process %s; its %d batch(es) will be written again",
            why,
            len(self._flying),
        )
        self._close(0.0)
        self.restarts += 1
        flying, self._flying, self._by_id = self._flying, {}, {}
        for _, store, batch in flying.values():
            store.restore(batch)
            self.on_failed(store, sqlite3.OperationalError(f"writer process {why}"))

    def _close(self, timeout: float) -> bool:
        """Close the socket, end the process (waiting `timeout` for it to exit by itself) and
        remove the folder; True if it exited by itself."""
        exited = True
        if self._sock is not None:
            self._sock.close(linger=0)
        if self._process is not None:
            exited = _end(self._process, timeout)
        if self._folder is not None:
            shutil.rmtree(self._folder, ignore_errors=True)
        self._process = self._sock = self._folder = None
        return exited

    def _alive(self) -> bool:
        """False (after putting its batches back) if the process has exited, or has held
        batches without answering for WRITE_TIMEOUT_S (then it is killed)."""
        process = self._process
        now = time.monotonic()
        limit = WRITE_TIMEOUT_S if self.hang_limit_s is None else self.hang_limit_s
        if process is not None and self._flying and now - self._progress > min(POLL_S, limit / 2):
            # A writer that uses CPU is committing a large batch, not hung: that counts as
            # progress. Silent means no reply and no CPU time (stopped, or a stalled disk).
            # (Looked at only once a reply is overdue: most batches are answered sooner.)
            cpu = _cpu_ticks(process.pid)
            if cpu is not None and cpu != self._cpu:
                self._cpu = cpu
                self._progress = now
        if process is not None and self._flying and now - self._progress > limit:
            process.kill()
            self._lost(f"answered nothing and used no CPU for {limit:g}s; killed it")
            return False
        if process is None or process.poll() is None:
            self._checked = now
            return True
        self._lost(f"exited with status {process.returncode}")
        return False

    def start(self) -> None:
        """Start the process now, not with the first batch: a collector about to serve
        should not keep its first rows waiting for an interpreter to start."""
        if self._sock is None:
            self._start()

    def _send(self, message: tuple, start: bool = True) -> None:
        """Send to the writer, starting one if there is none (and `start`). Never blocks: a
        PAIR socket whose writer is gone would block a send for good."""
        data = pickle.dumps(message, pickle.HIGHEST_PROTOCOL)
        for _ in range(2):
            if self._sock is not None:
                self._alive()  # a writer that exited is replaced, its batches put back
            if self._sock is None and not start:
                return
            sock = self._sock or self._start()
            try:
                sock.send(data, zmq.NOBLOCK, copy=False)
                return
            except zmq.Again:  # no writer connected: it is gone, or going
                if self._process is not None:
                    self._process.kill()
                self._lost("is not connected")
        raise WriterError("collector: the writer process does not take messages")

    # --- batches -------------------------------------------------------------------------------

    def submit(self, store: RunStore, batch: Batch) -> None:
        if store.run_hash in self._flying:
            raise RuntimeError(f"run {store.run_hash} already has a batch in flight")
        rows = _pack([row_to_wire(row) for row in batch.steps])
        self._next_id += 1
        batch_id = self._next_id
        message = ("write", batch_id, str(store.path.parent), rows, batch.updates, batch.counts)
        try:
            self._send(message)
        except WriterError as exc:  # no writer could be started: keep the batch, retry later
            store.restore(batch)
            self.on_failed(store, sqlite3.OperationalError(str(exc)))
            return
        if not self._flying:
            self._progress = time.monotonic()
        self._flying[store.run_hash] = (batch_id, store, batch)
        self._by_id[batch_id] = store.run_hash

    def busy(self, run_hash: str) -> bool:
        return run_hash in self._flying

    def flying_bytes(self) -> int:
        """The wire size of the batches handed over and not yet answered (still held here)."""
        return sum(batch.nbytes for _, _, batch in self._flying.values())

    def collect(self, timeout: float = 0.0) -> None:
        """Take every reply that is there (waiting up to `timeout` for the first)."""
        while self._sock is not None and self._flying:
            if not self._sock.poll(round(timeout * 1000)):
                if time.monotonic() - self._checked > POLL_S:
                    self._alive()
                return
            timeout = 0.0
            self._apply(pickle.loads(self._sock.recv()))

    def _apply(self, reply: tuple) -> None:
        self._progress = time.monotonic()
        kind, batch_id, *rest = reply
        run_hash = self._by_id.pop(batch_id)
        _, store, batch = self._flying.pop(run_hash)
        if kind == "done":
            written_at, unwritable = rest
            store.unwritable_rows += unwritable
            written = [batch.steps[i] for i in written_at]
            store.rows_written += len(written)
            store.last_write = time.monotonic()
            self.on_done(store, written)
        else:
            store.restore(batch)
            self.on_failed(store, sqlite3.OperationalError(rest[0]))

    def wait(self, run_hash: str | None = None) -> None:
        """Until the run's batch (or every batch) in flight has its reply."""
        while (run_hash in self._flying) if run_hash is not None else self._flying:
            self.collect(POLL_S)
            if self._flying:
                self._alive()

    def checkpoint(self, store: RunStore) -> None:
        self._send(("checkpoint", str(store.path.parent)), start=False)

    def close_store(self, store: RunStore) -> None:
        """The writer checkpoints and closes its connection; the collector closes its own."""
        self._send(("close", str(store.path.parent)), start=False)
        store.conn.close()

    def reply_socket(self) -> zmq.Socket | None:
        """The socket replies arrive on, to poll with the collector's (None before a start)."""
        return self._sock

    def kill(self) -> None:
        """End the writer process now, whatever it is doing (SQLite rolls back a transaction
        it had not committed): for a collector that exits at once, not leaving a process
        behind that waits on a locked database."""
        if self._process is not None:
            self._process.kill()
        if self._folder is not None:  # the process cannot remove it now
            shutil.rmtree(self._folder, ignore_errors=True)

    def stop(self) -> None:
        """Let the writer close its databases and exit (after the replies it owes)."""
        self.wait()
        if self._sock is None:
            return
        self._send(("stop",), start=False)
        if self._sock is None:
            return
        if not self._close(STOP_TIMEOUT_S):
            log.error(
                "collector: the writer process did not stop in %.0fs; killed it", STOP_TIMEOUT_S
            )


def remove_stale_folders() -> None:
    """Remove the socket folders of writers whose collector is gone (killed, so it could not
    remove them itself). A folder whose collector runs is kept."""
    for base in {tempfile.gettempdir(), "/tmp"}:
        for folder in Path(base).glob(f"{FOLDER_PREFIX}*-*"):
            pid = folder.name[len(FOLDER_PREFIX) :].split("-", 1)[0]
            if pid.isdigit() and not _running(int(pid)) and _mine(folder):
                shutil.rmtree(folder, ignore_errors=True)


def _mine(folder: Path) -> bool:
    try:
        return folder.stat().st_uid == os.getuid()
    except OSError:
        return False


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    return True


def _cpu_ticks(pid: int) -> int | None:
    """User + system CPU time of a process in clock ticks, from /proc (None where there is
    no /proc: then only replies count as a writer's progress)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            fields = fh.read().rsplit(b")", 1)[1].split()
        return int(fields[11]) + int(fields[12])
    except (OSError, IndexError, ValueError):
        return None


def _end(process: subprocess.Popen, timeout: float) -> bool:
    """Wait for the process to exit; kill it after `timeout`. True if it exited by itself."""
    try:
        process.wait(timeout)
        return True
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        return False


def _pack(rows: list[WireRow]) -> tuple[bool, bytes]:
    """A batch's rows for the writer: marshal (plain values only; measured on the benchmark's
    rows, 0.8 against pickle's 1.4 µs a row to dump, 1.9 against 2.8 to load), or pickle if a
    value is of a type marshal does not take. The rest of
    each message is pickled: a run_start's fields may hold any type msgpack decodes."""
    try:
        return True, marshal.dumps(rows)
    except ValueError:
        return False, pickle.dumps(rows, pickle.HIGHEST_PROTOCOL)


def _unpack(packed: tuple[bool, bytes]) -> list[WireRow]:
    marshalled, data = packed
    rows: list[WireRow] = marshal.loads(data) if marshalled else pickle.loads(data)
    return rows


def make_writer(
    kind: str, on_done: OnDone, on_failed: OnFailed, context: zmq.Context
) -> InlineWriter | ProcessWriter:
    if kind == "process":
        return ProcessWriter(on_done, on_failed, context)
    if kind == "inline":
        return InlineWriter(on_done, on_failed)
    raise ValueError(f"writer: {kind!r} is not accepted; expected one of {', '.join(WRITERS)}")


# --- the writer process ------------------------------------------------------------------------


def serve(address: str, log_level: int = logging.WARNING, parent: int | None = None) -> None:
    """The writer process: a RunStore per run folder, written as batches arrive, in order.
    Ends on "stop", or when its collector (`parent`) is gone."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    logging.basicConfig(
        level=log_level,
        format="%(asctime)s %(levelname)s writer: %(message)s",
        datefmt="%H:%M:%S",
    )
    context = zmq.Context()
    sock = context.socket(zmq.PAIR)
    sock.setsockopt(zmq.LINGER, 5000)  # the last replies, if the collector still reads them
    sock.connect(address)
    stores: dict[str, RunStore] = {}
    sock.send(pickle.dumps(("ready",)))
    # A batch is tens of thousands of young objects, none in a cycle: the cyclic collector
    # would walk them again and again (measured: unpickling a batch took twice as long). It
    # runs when the writer has nothing to do instead.
    gc.disable()
    try:
        while True:
            if not sock.poll(round(POLL_S * 1000)):
                if parent is not None and os.getppid() != parent:
                    return  # the collector is gone
                gc.collect()
                continue
            message = pickle.loads(sock.recv())
            op = message[0]
            if op == "write":
                sock.send(pickle.dumps(_write(stores, *message[1:]), pickle.HIGHEST_PROTOCOL))
            elif op == "checkpoint" and message[1] in stores:
                stores[message[1]].checkpoint()
            elif op == "close" and message[1] in stores:
                _close(stores.pop(message[1]))
            elif op == "stop":
                return
    finally:
        for store in stores.values():
            _close(store)
        sock.close()
        context.term()
        # The socket's private folder: its collector removes it too, unless it was killed.
        shutil.rmtree(os.path.dirname(address.removeprefix("ipc://")), ignore_errors=True)


_BUGS_LOGGED: set[tuple[str, str]] = set()  # (run folder, exception type) with a traceback logged


def _write(
    stores: dict[str, RunStore],
    batch_id: int,
    run_dir: str,
    rows: tuple[bool, bytes],
    updates: dict[str, Any],
    counts: dict[str, int],
) -> tuple:
    """("done", id, indices of the rows written, rows SQLite could not hold) or
    ("failed", id, why)."""
    try:
        store = stores.get(run_dir)
        if store is None:
            store = stores[run_dir] = RunStore(Path(run_dir))
        steps = [row_from_wire(row) for row in _unpack(rows)]
        unwritable = store.unwritable_rows
        written = store.write(Batch(steps, updates, counts))
    except (sqlite3.Error, SchemaError) as exc:
        return ("failed", batch_id, str(exc))
    except Exception as exc:  # a bug: say so, keep the batch in the collector, keep serving
        bug = (run_dir, type(exc).__name__)
        if bug not in _BUGS_LOGGED:  # the batch comes back every flush: one traceback
            _BUGS_LOGGED.add(bug)
            log.exception(
                "batch %d of %s (later failures like it are not logged)", batch_id, run_dir
            )
        return ("failed", batch_id, f"writer error: {type(exc).__name__}: {exc}")
    index = {id(row): i for i, row in enumerate(steps)}
    return (
        "done",
        batch_id,
        [index[id(row)] for row in written],
        store.unwritable_rows - unwritable,
    )


def _close(store: RunStore) -> None:
    try:
        store.close()
    except sqlite3.Error as exc:
        log.warning("closing %s: %s", store.path, exc)


def main(argv: list[str]) -> None:
    """The writer process's entry: the address, the log level and the collector's pid."""
    serve(argv[0], int(argv[1]), int(argv[2]))
