"""The collector service loop: PULL socket -> validate -> aggregate ranks and layers -> SQLite.

One loop, one thread: receive a burst of messages, handle each, then do the periodic chores
(flush batched writes, write steps whose missing ranks timed out, mark silent runs stale, close
idle databases, checkpoint WALs, log throughput). Sockets are made inside `run()`, in the thread
that uses them, as ZeroMQ requires. `serve()` runs that loop in a worker thread so the main
thread stays free for signals (see its docstring).
"""

from __future__ import annotations

import gc
import logging
import os
import signal
import sqlite3
import threading
import time
from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import zmq

from collector.burst import Burst, Prepared
from collector.chores import Chores
from collector.gaps import SpoolWatch
from collector.ranks import PendingSteps
from collector.store import RunStore, StepRow
from collector.writer import WriterError, make_writer
from prismatic import db, wire
from prismatic.config import is_ipv6
from prismatic.errors import ConfigError, ProtocolError, SchemaError

log = logging.getLogger(__name__)

WARN_INTERVAL_S = 10.0  # at most one warning per rejection reason this often
RETRY_UNWRITABLE_S = 30.0  # how long a run whose database cannot be opened is refused
SHUTDOWN_RETRY_S = 10.0  # how long shutdown keeps retrying a flush that failed
# A run's rows kept in memory while its database refuses writes (locked, disk full); beyond
# this the oldest are dropped (counted): they are still in the trainers' spool files.
MAX_UNWRITTEN_ROWS = 100_000
# A burst's bytes, at most: 5,000 messages of the default model are about 5 MB (1,023 bytes
# each, measured on bench/collector.py's messages); a burst of messages of 512 layers x 256
# experts (9.4 MB each) stops at 4 of them (their Python objects take several times that).
BURST_MAX_BYTES = 32 * 1024 * 1024
MAX_BACKLOG_FLUSHES = 4  # flushes' worth of rows buffered while the writer is busy, at most
# ... and the wire bytes behind the rows held for the writer, at most: the default model's 8,000
# rows are about 8 MB; a model of many layers and experts reaches this in far fewer rows.
MAX_HELD_BYTES = 32 * 1024 * 1024
# run_end statuses from several ranks: the run gets the worst one.
_END_PRIORITY = {"completed": 0, "interrupted": 1, "failed": 2}


@dataclass
class CollectorStats:
    received: int = 0
    rows_written: int = 0
    rejected: Counter = field(default_factory=Counter)
    nonfinite_values: int = 0
    flush_errors: int = 0
    rows_dropped: int = 0


@dataclass
class RunState:
    """What the collector knows of one run between messages (restored from its database)."""

    world_size: int = 1
    shards: bool = False
    declared: bool = False  # world size from a run_start (or the database), not guessed
    status: str = "live"
    last_seen: float = field(default_factory=time.time)
    started: float | None = None
    ended: float | None = None
    unflushed_messages: int = 0
    ends: dict[int, dict[str, Any]] = field(default_factory=dict)  # rank -> its run_end


class Collector:
    """Receives from many trainers and writes `<runs_dir>/<run hash>/dynamics.db`."""

    def __init__(
        self,
        bind: str = "tcp://127.0.0.1:5557",
        runs_dir: Path = Path("build/runs"),
        *,
        context: zmq.Context | None = None,
        flush_interval_ms: int = 100,
        flush_rows: int = 2000,
        rank_timeout_s: float = 30.0,
        stale_after_s: float = 120.0,
        idle_close_s: float = 60.0,
        max_open_runs: int = 128,
        stats_interval_s: float = 10.0,
        curve: Any = None,
        writer: str = "process",
    ) -> None:
        self.bind = bind
        self.runs_dir = Path(runs_dir)
        self.context = context or zmq.Context.instance()
        self.flush_interval_s = flush_interval_ms / 1000
        self.flush_rows = flush_rows
        self.rank_timeout_s = rank_timeout_s
        self.stale_after_s = stale_after_s
        self.idle_close_s = idle_close_s
        self.max_open_runs = max_open_runs
        self.stats_interval_s = stats_interval_s
        self.curve = curve
        self.stats = CollectorStats()
        self.ready = threading.Event()
        self.stop_event = threading.Event()
        self.bound_address: str | None = None
        self.on_commit: Any = None  # optional callback(run_hash, [StepRow]) for benchmarks
        self._stores: OrderedDict[str, RunStore] = OrderedDict()  # least recently used first
        self._runs: dict[str, RunState] = {}
        self._pending = PendingSteps()
        self._buffered = 0  # step rows added to stores since the last flush
        self._message_bytes = 0  # the wire size of the message being handled (memory bounds)
        self._unwritable: dict[str, float] = {}  # run hash -> when opening its database failed
        self._last_warning: dict[str, float] = {}
        self._checkpoint_turn = 0
        self._burst: Burst | None = None  # the burst _drain is handling
        self.spools = SpoolWatch(self)  # replays from spool files what the socket missed
        # SQLite's inserts: in a writer process (the second core) by default (collector/writer.py)
        self._writer = make_writer(writer, self._committed, self._flush_failed, self.context)
        self._refused: set[str] = set()  # runs whose batch failed since the flush began

    # --- lifecycle -----------------------------------------------------------------------------

    def run(self) -> bool:
        """Serve until `stop()`; then flush and commit everything. True if all was committed."""
        sock = self._open_socket()
        log.info(
            "collector: listening on %s, writing %s (schema version %d)",
            self.bound_address,
            self.runs_dir,
            db.SCHEMA_VERSION,
        )
        self._adopt_live_runs()
        try:
            self._writer.start()
            if self._writer.name == "inline":
                log.info("collector: writing inline, in this process (--writer inline)")
        except WriterError:
            sock.close(linger=0)
            raise
        self.ready.set()
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        replies: zmq.Socket | None = None  # the writer's, polled too: commits are heard at once
        chores = Chores(self)
        try:
            while not self.stop_event.is_set():
                if replies is not self._writer.reply_socket():
                    if replies is not None:
                        poller.unregister(replies)
                    replies = self._writer.reply_socket()
                    if replies is not None:
                        poller.register(replies, zmq.POLLIN)
                events = dict(poller.poll(50))
                self._writer.collect()
                if sock in events:
                    self._drain(sock)
                chores.run_due()
        finally:
            sock.close(linger=0)
            if self.curve is not None:
                self.curve.stop()
        return self.shutdown()

    def stop(self) -> None:
        self.stop_event.set()

    def kill_writer(self) -> None:
        """End the writer process at once (the collector is exiting without flushing)."""
        self._writer.kill()

    def _open_socket(self) -> zmq.Socket:
        sock = self.context.socket(zmq.PULL)
        sock.setsockopt(zmq.RCVHWM, 100_000)
        # libzmq drops a peer that sends more than this; below it, decode() counts "oversized".
        sock.setsockopt(zmq.MAXMSGSIZE, 4 * wire.MAX_MESSAGE_BYTES)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.IPV6, is_ipv6(self.bind))
        if self.curve is not None:
            self.curve.apply_server(sock)
        sock.bind(self.bind)
        self.bound_address = sock.getsockopt_string(zmq.LAST_ENDPOINT) or self.bind
        return sock

    def _drain(self, sock: zmq.Socket, limit: int = 5000) -> None:
        """Receive what is queued (up to `limit` messages or BURST_MAX_BYTES), then handle it
        as one burst: its messages are checked and averaged together (collector/burst.py), and
        applied one by one."""
        datas = []
        size = 0
        for _ in range(limit):
            try:
                data = sock.recv(zmq.NOBLOCK, copy=True)
            except zmq.Again:
                break
            datas.append(data)
            size += len(data)
            if size >= BURST_MAX_BYTES:  # big (valid) messages: a burst decodes to ~7x this
                break
        self._burst = Burst(datas)
        # The cyclic garbage collector would walk the burst's young, acyclic message trees over
        # and over (tens of thousands of lists); reference counting frees them anyway. Measured
        # in-process (messages fed to handle_bytes in bursts): two thirds more messages a second.
        collecting = gc.isenabled()
        gc.disable()
        try:
            for data in datas:
                self.handle_bytes(data)
                if self._buffered >= self.flush_rows:
                    self.flush(wait=False)
        finally:
            self._burst = None
            if collecting:
                gc.enable()

    def _adopt_live_runs(self) -> None:
        """Runs left `live` by an earlier collector: watch them too, so silent ones go stale."""
        for path in sorted(self.runs_dir.glob(f"*/{db.DB_NAME}")):
            run_hash = path.parent.name
            if not wire.RUN_HASH_RE.match(run_hash) or run_hash in self._runs:
                continue
            try:
                conn = db.connect_reader(path)
                try:
                    run = db.read_run(conn)
                finally:
                    conn.close()
            except sqlite3.Error:
                continue
            if run and run.get("status") == "live":
                self._runs[run_hash] = _state_from_row(run)

    def shutdown(self) -> bool:
        """Write every step still waiting for ranks, commit, checkpoint and close all stores.

        A commit that fails (the database is locked by someone else) is retried for up to
        SHUTDOWN_RETRY_S; True if everything received was committed.
        """
        for run_hash, row in self._pending.pop_all():
            self._add_row(run_hash, row)
        deadline = time.monotonic() + SHUTDOWN_RETRY_S
        self._writer.hang_limit_s = SHUTDOWN_RETRY_S  # a stopped writer: that long, not 60 s
        while not self.commit_all() and time.monotonic() < deadline:
            time.sleep(0.2)
        unwritten = self.buffered_rows
        committed = unwritten == 0
        if self.stats.rows_dropped:  # dropped earlier: not in the database either
            log.error(
                "collector: %d rows were dropped unwritten (see above); they are still in the "
                "trainers' spool files: a restarted collector, or --replay, reads them again",
                self.stats.rows_dropped,
            )
        for run_hash in list(self._stores):
            # Not one more try for what the retries above could not commit.
            self._close_store(run_hash, force=True, flush=committed)
        self._writer.stop()
        if committed:
            # Where each spool was read to: a restarted collector or `--replay` starts there.
            self.spools.save_committed(force=True)
        else:
            log.error(
                "collector: could not commit %d rows; they are not in the database (spool "
                "cursors are not saved: a restarted collector, or --replay, reads them again "
                "from the trainers' spool files)",
                unwritten,
            )
        log.info(
            "collector: stopped; %d messages, %d rows written, rejected %s",
            self.stats.received,
            self.stats.rows_written,
            dict(self.stats.rejected) or "none",
        )
        return committed and not self.stats.rows_dropped

    # --- messages ------------------------------------------------------------------------------

    def handle_bytes(self, data: bytes) -> bool:
        """Validate and apply one message; False if it was rejected (and counted)."""
        self.stats.received += 1
        self._message_bytes = len(data)
        run_hash = ""
        try:
            decoded = self._burst.take(data) if self._burst is not None else None
            message, prepared = decoded or (wire.decode(data), None)
            run_hash = message["run"]
            if not self.spools.observe(message, data):
                return True  # already ingested from its spool file
            self.handle(message, prepared)
        except ProtocolError as exc:
            self.reject(exc.reason, exc.detail)
            return False
        except SchemaError as exc:
            self.reject("bad_database", str(exc), subject=run_hash)
            return False
        return True

    def handle(self, message: dict[str, Any], prepared: Prepared | None = None) -> None:
        """Apply one validated message, from the socket or a spool replay (`prepared`: its
        layer means and records, if its burst computed them).

        Raises ProtocolError("bad_rank") for a rank outside the run's declared world size, and
        SchemaError when the run's database cannot be written.
        """
        run_hash = message["run"]
        kind = message["kind"]
        if kind == wire.KIND_RUN_START:  # before the store opens: it must not create its run
            self._check_rank(run_hash, message["rank"], message["world_size"])
        store = self._store(run_hash)
        state = self._runs[run_hash]
        if kind != wire.KIND_RUN_START and state.declared:
            self._check_rank(run_hash, message["rank"], state.world_size)
        state.last_seen = time.time()
        state.unflushed_messages += 1
        if state.status == "stale":
            state.status = "live"
            store.update_run(status="live")
        if kind == wire.KIND_DYNAMICS:
            self._on_dynamics(store, state, message, prepared)
        elif kind == wire.KIND_RUN_START:
            store.update_run(**self._on_run_start(state, message))
        else:
            store.update_run(**self._on_run_end(run_hash, state, message))

    def _check_rank(self, run_hash: str, rank: int, world_size: int) -> None:
        """Raise ProtocolError("bad_rank") for a rank outside the world size, counted in the
        run's `rejected` if the run exists (a rejected message never creates one)."""
        if rank < world_size:
            return
        if run_hash in self._stores or self.has_database(run_hash):
            self._store(run_hash).count("rejected")
        raise ProtocolError("bad_rank", f"rank {rank} of {world_size} ranks")

    def has_database(self, run_hash: str) -> bool:
        return (self.runs_dir / run_hash / db.DB_NAME).exists()

    def _on_run_start(self, state: RunState, message: dict[str, Any]) -> dict[str, Any]:
        if state.ended is not None and message["ts"] is not None and message["ts"] <= state.ended:
            # Sent before the run ended (a spool read again): it does not reopen the run. A
            # resumed run's run_start is sent after its end.
            return {}
        state.ended = None
        state.world_size = message["world_size"]
        state.shards = message["shards"]
        state.declared = True
        state.status = "live"
        # Only this rank's earlier end (a resumed run): ranks' streams arrive in any order, and
        # another rank's run_end may already be here before this run_start.
        state.ends.pop(message["rank"], None)
        if state.started is None:  # a resumed run, or a replay, keeps when it first started
            state.started = message["ts"] or time.time()
        model = message["model"]
        return {
            "name": message["name"],
            "config": message["config"],
            "model": model,
            "mixing": str(model.get("mixing", ""))[:20],
            "world_size": state.world_size,
            "shards": int(state.shards),
            "status": "live",
            "started": state.started,
            "ended": None,
            "host": message["host"],
            "versions": message["versions"],
        }

    def _on_dynamics(
        self,
        store: RunStore,
        state: RunState,
        message: dict[str, Any],
        prepared: Prepared | None = None,
    ) -> None:
        if message["nonfinite_values"]:
            self.stats.nonfinite_values += message["nonfinite_values"]
            self.reject(
                "nonfinite_value", f"{message['nonfinite_values']} stored as NULL", count=False
            )
        if not state.declared:  # no run_start seen: the widest rank so far is the world
            state.world_size = max(state.world_size, message["rank"] + 1)
        row = self._pending.add(message, state.world_size, state.shards, prepared)
        if row is not None:
            store.add_step(row, self._message_bytes)
            self._buffered += 1

    def _on_run_end(self, run_hash: str, state: RunState, message: dict[str, Any]) -> dict:
        """The run ends when every rank has sent run_end; it gets the worst of their statuses."""
        state.ends[message["rank"]] = message
        ends = list(state.ends.values())
        steps = [e["last_step"] for e in ends if e["last_step"] is not None]
        updates: dict[str, Any] = {
            "last_step": max(steps) if steps else None,
            "sent": sum(e["sent"] or 0 for e in ends),
            "dropped": sum(e["dropped"] or 0 for e in ends),
        }
        if len(ends) < state.world_size:
            return updates
        for row in self._pending.pop_run(run_hash):
            self._add_row(run_hash, row)
        state.status = max((e["status"] for e in ends), key=_END_PRIORITY.__getitem__)
        state.ended = message["ts"] or time.time()
        updates.update(status=state.status, ended=state.ended)
        log.info("collector: run %s %s", run_hash, state.status)
        return updates

    def reject(self, reason: str, detail: str = "", count: bool = True, subject: str = "") -> None:
        """Count a rejection by reason (unless `count` is False: a warning only); warn at most
        once per WARN_INTERVAL_S per reason, and per `subject` (a run whose database fails, so
        that a second one is named too)."""
        if count:
            self.stats.rejected[reason] += 1
        now = time.monotonic()
        key = f"{reason} {subject}"
        if now - self._last_warning.get(key, -1e9) >= WARN_INTERVAL_S:
            self._last_warning[key] = now
            log.warning(
                "collector: %s: %s [%s so far]",
                reason,
                detail[:200],
                self.stats.rejected[reason] if count else "not counted as rejected",
            )

    # --- stores --------------------------------------------------------------------------------

    def _store(self, run_hash: str) -> RunStore:
        """The run's open store (most recently used last), opened and its state restored."""
        store = self._stores.get(run_hash)
        if store is not None:
            self._stores.move_to_end(run_hash)
            return store
        failed_at = self._unwritable.get(run_hash)
        if failed_at is not None and time.monotonic() - failed_at < RETRY_UNWRITABLE_S:
            raise SchemaError(f"run {run_hash}: its database could not be opened; retrying later")
        self._close_least_used()
        try:
            # run_hash is validated as 9 lowercase hex characters: no path can escape runs_dir.
            store = RunStore(self.runs_dir / run_hash)
        except SchemaError:
            self._unwritable[run_hash] = time.monotonic()
            raise
        self._unwritable.pop(run_hash, None)
        self._stores[run_hash] = store
        if run_hash not in self._runs:
            row = store.read_run()
            self._runs[run_hash] = _state_from_row(row) if row else RunState()
            if not row:  # a new run: live from its first message, run_start or not
                store.update_run(status="live")
        return store

    def _close_least_used(self) -> None:
        if len(self._stores) < self.max_open_runs:
            return
        for run_hash in list(self._stores):
            if not self._pending.has_run(run_hash) and self._close_store(run_hash):
                return

    def _close_store(self, run_hash: str, force: bool = False, flush: bool = True) -> bool:
        """Commit (unless not `flush`) and close; False (and kept open) if the commit failed,
        unless `force` (shutdown, which has counted what could not be committed)."""
        store = self._stores[run_hash]
        self._writer.wait(run_hash)
        self._note_messages(run_hash, store)
        batch = store.take()  # without `flush`, dropped: shutdown has counted it unwritten
        if batch is not None and flush:
            self._writer.submit(store, batch)
            self._writer.wait(run_hash)
            if store.pending and not force:
                return False
        del self._stores[run_hash]
        try:
            self._writer.close_store(store)
        except sqlite3.Error as exc:
            self._flush_failed(store, exc)
        return True

    def _add_row(self, run_hash: str, row: StepRow) -> None:
        self._store(run_hash).add_step(row)
        self._buffered += 1

    def _note_messages(self, run_hash: str, store: RunStore) -> None:
        state = self._runs.get(run_hash)
        if state is not None and state.unflushed_messages:
            store.update_run(last_seen=state.last_seen)
            store.count("messages", state.unflushed_messages)
            state.unflushed_messages = 0

    def _committed(self, store: RunStore, rows: list[StepRow]) -> None:
        self.stats.rows_written += len(rows)
        if rows and self.on_commit is not None:
            self.on_commit(store.run_hash, rows)

    def flush(self, wait: bool = True) -> bool:
        """Hand every store's buffered rows to the writer, one transaction per store, and with
        `wait` see them committed; False if some store refused (its rows stay buffered for the
        next flush). Without `wait` a store whose last batch is still being written keeps its
        rows for the next flush, and the loop goes on receiving unless the writer has fallen
        more than MAX_BACKLOG_FLUSHES flushes behind.

        (A writer thread was measured slower than writing inline: the GIL hand-offs around
        each SQLite step cost more than they saved. A process has no such hand-offs.)
        """
        self._refused = set()
        self._writer.collect()
        self._hand_over()
        if wait or self._backlogged():
            self._writer.wait()
            self._hand_over()  # the stores whose earlier batch was still in flight
            if wait:
                self._writer.wait()
        self._buffered = 0
        return not self._refused

    def _hand_over(self) -> None:
        writer = self._writer
        for run_hash, store in list(self._stores.items()):
            if run_hash in self._refused or writer.busy(run_hash):
                continue
            self._note_messages(run_hash, store)
            batch = store.take()
            if batch is None:
                continue
            if not store.path.exists():
                try:
                    store = self._reopen_removed(run_hash, store)
                except SchemaError as exc:  # no new file either: keep the rows, try again
                    store.restore(batch)
                    self.reject("bad_database", str(exc), subject=run_hash)
                    continue
            writer.submit(store, batch)

    def _reopen_removed(self, run_hash: str, removed: RunStore) -> RunStore:
        """A database deleted while open (a user removing a run, then running it again): rows
        sent on would go into the deleted file, so the run gets a new one."""
        log.warning(
            "collector: run %s: %s was removed while open; writing a new one",
            run_hash,
            removed.path,
        )
        del self._stores[run_hash]
        try:
            store = self._store(run_hash)
        except SchemaError:
            self._stores[run_hash] = removed
            raise
        self._writer.close_store(removed)
        store.update_run(status=self._runs[run_hash].status)
        return store

    def has_unwritten(self, run_hash: str) -> bool:
        """Whether some of the run's rows are buffered or being written."""
        store = self._stores.get(run_hash)
        return store is not None and (store.pending > 0 or self._writer.busy(run_hash))

    def commit_all(self) -> bool:
        """Flush: True once everything buffered is committed."""
        return self.flush() and self.buffered_rows == 0

    def checkpoint_next(self) -> None:
        """Checkpoint the least recently checkpointed open store: one at a time, so that the
        loop never stalls on all of them at once (SQLite also checkpoints on commit once a
        WAL passes 1,000 pages)."""
        if not self._stores:
            return
        self._checkpoint_turn = (self._checkpoint_turn + 1) % len(self._stores)
        store = list(self._stores.values())[self._checkpoint_turn]
        self._writer.checkpoint(store)

    def _flush_failed(self, store: RunStore, exc: sqlite3.Error) -> None:
        self.stats.flush_errors += 1
        self._refused.add(store.run_hash)
        self.reject(
            "flush_failed",
            f"{store.path}: {exc}; rows kept for the next try",
            count=False,
            subject=store.run_hash,
        )
        excess = len(store._steps) - MAX_UNWRITTEN_ROWS
        if excess > 0:
            store.buffered_bytes -= store.buffered_bytes * excess // len(store._steps)
            del store._steps[:excess]
            self.stats.rows_dropped += excess
            log.error(
                "collector: dropped %d unwritable rows of %s (still in the trainers' spool files)",
                excess,
                store.path,
            )
            self.spools.hold_back(store.run_hash)

    def _backlogged(self) -> bool:
        """Whether the writer has fallen so far behind that receiving should wait for it: more
        than MAX_BACKLOG_FLUSHES flushes' worth of rows, or MAX_HELD_BYTES of the messages
        behind the rows held (buffered or handed over and unanswered; their Python objects take
        several times that)."""
        if self.buffered_rows > MAX_BACKLOG_FLUSHES * self.flush_rows:
            return True
        return self._writer.flying_bytes() + self.buffered_bytes > MAX_HELD_BYTES

    @property
    def buffered_bytes(self) -> int:
        """The wire size of the messages behind the rows buffered in the stores."""
        return sum(store.buffered_bytes for store in self._stores.values())

    @property
    def buffered_rows(self) -> int:
        return sum(len(store._steps) for store in self._stores.values())


def _state_from_row(run: dict[str, Any]) -> RunState:
    return RunState(
        world_size=run.get("world_size") or 1,
        shards=bool(run.get("shards")),
        declared=run.get("world_size") is not None,
        status=run.get("status") or "live",
        last_seen=run.get("last_seen") or time.time(),
        started=run.get("started"),
        ended=run.get("ended"),
    )


def serve(collector: Collector) -> int:
    """Run `collector` until SIGTERM or SIGINT; exit code 0 once everything was committed.

    The first signal stops receiving, then flushes and commits. A second one exits at once.
    The loop runs in a worker thread because Python runs signal handlers only in the main
    thread, between bytecodes: a loop waiting inside SQLite (a locked database) would not see
    the second signal until the wait ended, while a main thread in join() sees it at once.
    """
    received: list[int] = []

    def on_signal(signum: int, frame: Any) -> None:
        name = signal.Signals(signum).name
        if received:
            log.warning("collector: second signal (%s); exiting without flushing", name)
            collector.kill_writer()
            os._exit(128 + signum)
        received.append(signum)
        log.info("collector: %s received; stopping, flushing and committing", name)
        collector.stop()

    outcome: dict[str, Any] = {}

    def work() -> None:
        try:
            outcome["committed"] = collector.run()
        except zmq.ZMQError as exc:
            outcome["error"] = exc
        except WriterError as exc:  # the writer process could not start
            outcome["writer"] = exc

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    worker = threading.Thread(target=work, name="collector", daemon=True)
    worker.start()
    try:
        while worker.is_alive():
            worker.join(0.2)
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    if "writer" in outcome:
        raise ConfigError(str(outcome["writer"]))
    if "error" in outcome:
        raise ConfigError(f"--bind: cannot listen on {collector.bind!r}: {outcome['error']}")
    return 0 if outcome.get("committed") else 1
