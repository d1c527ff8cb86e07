"""The collector service loop: PULL socket -> validate -> aggregate ranks and layers -> SQLite.

One loop, one thread: receive a burst of messages, handle each, then do the periodic chores
(flush batched writes, write steps whose missing ranks timed out, mark silent runs stale, close
idle databases, checkpoint WALs, log throughput). Sockets are made inside `run()`, in the thread
that uses them, as ZeroMQ requires.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import zmq

from collector.gaps import SpoolWatch
from collector.ranks import PendingSteps
from collector.store import RunStore, StepRow
from prismatic import db, wire
from prismatic.errors import ProtocolError, SchemaError

log = logging.getLogger(__name__)


@dataclass
class CollectorStats:
    received: int = 0
    rows_written: int = 0
    rejected: Counter = field(default_factory=Counter)
    nonfinite_values: int = 0


@dataclass
class RunState:
    world_size: int = 1
    shards: bool = False
    status: str = "live"
    last_seen: float = field(default_factory=time.time)


class Collector:
    """Receives from many trainers and writes `<runs_dir>/<run hash>/dynamics.db`."""

    def __init__(
        self,
        bind: str = "tcp://127.0.0.1:5557",
        runs_dir: Path = Path("build/runs"),
        *,
        context: zmq.Context | None = None,
        flush_interval_ms: int = 250,
        flush_rows: int = 500,
        rank_timeout_s: float = 30.0,
        stale_after_s: float = 120.0,
        idle_close_s: float = 60.0,
        stats_interval_s: float = 10.0,
        curve: Any = None,
    ) -> None:
        self.bind = bind
        self.runs_dir = Path(runs_dir)
        self.context = context or zmq.Context.instance()
        self.flush_interval_s = flush_interval_ms / 1000
        self.flush_rows = flush_rows
        self.rank_timeout_s = rank_timeout_s
        self.stale_after_s = stale_after_s
        self.idle_close_s = idle_close_s
        self.stats_interval_s = stats_interval_s
        self.curve = curve
        self.stats = CollectorStats()
        self.ready = threading.Event()
        self.stop_event = threading.Event()
        self.bound_address: str | None = None
        self.on_commit: Any = None  # optional callback(run_hash, [StepRow]) for benchmarks
        self._stores: dict[str, RunStore] = {}
        self._runs: dict[str, RunState] = {}
        self._pending = PendingSteps()
        self._last_warning: dict[str, float] = {}
        self.spools = SpoolWatch(self)  # replays from spool files what the socket missed

    # --- lifecycle -----------------------------------------------------------------------------

    def run(self) -> None:
        """Serve until `stop()`; then flush and commit everything, and return."""
        sock = self._open_socket()
        log.info(
            "collector: listening on %s, writing %s (schema version %d)",
            self.bound_address,
            self.runs_dir,
            db.SCHEMA_VERSION,
        )
        self.ready.set()
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        chores = Chores(self)
        try:
            while not self.stop_event.is_set():
                if poller.poll(50):
                    self._drain(sock)
                chores.run_due()
        finally:
            sock.close(linger=0)
            self.shutdown()

    def stop(self) -> None:
        self.stop_event.set()

    def _open_socket(self) -> zmq.Socket:
        sock = self.context.socket(zmq.PULL)
        sock.setsockopt(zmq.RCVHWM, 100_000)
        # libzmq drops a peer that sends more than this; below it, decode() counts "oversized".
        sock.setsockopt(zmq.MAXMSGSIZE, 4 * wire.MAX_MESSAGE_BYTES)
        sock.setsockopt(zmq.LINGER, 0)
        if self.curve is not None:
            self.curve.apply_server(sock)
        sock.bind(self.bind)
        self.bound_address = sock.getsockopt_string(zmq.LAST_ENDPOINT) or self.bind
        return sock

    def _drain(self, sock: zmq.Socket, limit: int = 5000) -> None:
        for _ in range(limit):
            try:
                data = sock.recv(zmq.NOBLOCK, copy=True)
            except zmq.Again:
                return
            self.handle_bytes(data)

    def shutdown(self) -> None:
        """Write every step still waiting for ranks, flush, checkpoint and close all stores."""
        for run_hash, row in self._pending.pop_all():
            self._store(run_hash).add_step(row)
        for run_hash in list(self._stores):
            self._close_store(run_hash)
        log.info(
            "collector: stopped; %d messages, %d rows written, rejected %s",
            self.stats.received,
            self.stats.rows_written,
            dict(self.stats.rejected) or "none",
        )

    # --- messages ------------------------------------------------------------------------------

    def handle_bytes(self, data: bytes) -> bool:
        """Validate and apply one message; False if it was rejected (and counted)."""
        self.stats.received += 1
        try:
            message = wire.decode(data)
        except ProtocolError as exc:
            self.reject(exc.reason, exc.detail)
            return False
        try:
            if not self.spools.observe(message, len(data)):
                return True  # already ingested from its spool file
            self.handle(message)
        except SchemaError as exc:
            self.reject("bad_database", str(exc))
            return False
        return True

    def handle(self, message: dict[str, Any]) -> None:
        run_hash = message["run"]
        state = self._runs.setdefault(run_hash, RunState())
        state.last_seen = time.time()
        store = self._store(run_hash)
        store.count("messages")
        updates: dict[str, Any] = {"last_seen": state.last_seen}
        if state.status == "stale":
            state.status = "live"
            updates["status"] = "live"
        kind = message["kind"]
        if kind == wire.KIND_RUN_START:
            updates.update(self._on_run_start(state, message))
        elif kind == wire.KIND_DYNAMICS:
            self._on_dynamics(state, message)
        else:
            updates.update(self._on_run_end(run_hash, state, message))
        store.update_run(**updates)

    def _on_run_start(self, state: RunState, message: dict[str, Any]) -> dict[str, Any]:
        state.world_size = message["world_size"]
        state.shards = message["shards"]
        state.status = "live"
        model = message["model"]
        return {
            "name": message["name"],
            "config": message["config"],
            "model": model,
            "mixing": str(model.get("mixing", ""))[:20],
            "world_size": state.world_size,
            "shards": int(state.shards),
            "status": "live",
            "started": message["ts"] or time.time(),
            "ended": None,
            "host": message["host"],
            "versions": message["versions"],
        }

    def _on_dynamics(self, state: RunState, message: dict[str, Any]) -> None:
        if message["nonfinite_values"]:
            self.stats.nonfinite_values += message["nonfinite_values"]
            self.reject(
                "nonfinite_value", f"{message['nonfinite_values']} stored as NULL", count=False
            )
        # A rank we did not expect: the run is wider than its run_start said (or it was missed).
        state.world_size = max(state.world_size, message["rank"] + 1)
        row = self._pending.add(message, state.world_size, state.shards)
        if row is not None:
            self._store(message["run"]).add_step(row)

    def _on_run_end(self, run_hash: str, state: RunState, message: dict[str, Any]) -> dict:
        for row in self._pending.pop_run(run_hash):
            self._store(run_hash).add_step(row)
        state.status = message["status"]
        return {
            "status": state.status,
            "ended": message["ts"] or time.time(),
            "last_step": message["last_step"],
            "sent": message["sent"],
            "dropped": message["dropped"],
        }

    def reject(self, reason: str, detail: str = "", count: bool = True) -> None:
        """Count a rejection by reason; warn at most once per 10 s per reason."""
        if count:
            self.stats.rejected[reason] += 1
        now = time.monotonic()
        if now - self._last_warning.get(reason, -1e9) >= 10.0:
            self._last_warning[reason] = now
            log.warning(
                "collector: rejected message (%s): %s [%d so far]",
                reason,
                detail[:200],
                self.stats.rejected[reason],
            )

    # --- stores --------------------------------------------------------------------------------

    def _store(self, run_hash: str) -> RunStore:
        store = self._stores.get(run_hash)
        if store is None:
            # run_hash is validated as 9 lowercase hex characters: no path can escape runs_dir.
            store = self._stores[run_hash] = RunStore(self.runs_dir / run_hash)
        return store

    def _close_store(self, run_hash: str) -> None:
        store = self._stores.pop(run_hash)
        self._commit(store, store.flush())
        store.close()

    def _commit(self, store: RunStore, rows: list[StepRow]) -> None:
        self.stats.rows_written += len(rows)
        if rows and self.on_commit is not None:
            self.on_commit(store.run_hash, rows)

    def flush(self) -> None:
        for store in list(self._stores.values()):
            self._commit(store, store.flush())

    @property
    def buffered_rows(self) -> int:
        return sum(store.pending for store in self._stores.values())


class Chores:
    """The collector's periodic work, each on its own interval."""

    def __init__(self, collector: Collector) -> None:
        self.c = collector
        now = time.monotonic()
        self.last = {
            "flush": now,
            "timeouts": now,
            "stale": now,
            "idle": now,
            "wal": now,
            "stats": now,
        }
        self.received_at_stats = 0

    def run_due(self) -> None:
        c = self.c
        now = time.monotonic()
        if now - self.last["flush"] >= c.flush_interval_s or c.buffered_rows >= c.flush_rows:
            self.last["flush"] = now
            c.flush()
        if self._due("timeouts", 1.0, now):
            for run_hash, row in c._pending.pop_expired(c.rank_timeout_s):
                c._store(run_hash).add_step(row)
        if self._due("stale", 1.0, now):
            self._mark_stale()
        if self._due("idle", 5.0, now):
            self._close_idle(now)
        if self._due("wal", 5.0, now):
            for store in c._stores.values():
                store.checkpoint()
        if self._due("stats", c.stats_interval_s, now):
            self._log_stats(now)
        c.spools.run_due()

    def _due(self, chore: str, interval: float, now: float) -> bool:
        if now - self.last[chore] < interval:
            return False
        self.last[chore] = now
        return True

    def _mark_stale(self) -> None:
        c = self.c
        cutoff = time.time() - c.stale_after_s
        for run_hash, state in c._runs.items():
            if state.status == "live" and state.last_seen < cutoff:
                state.status = "stale"
                c._store(run_hash).update_run(status="stale")
                log.info("collector: run %s is stale (silent for %.0fs)", run_hash, c.stale_after_s)

    def _close_idle(self, now: float) -> None:
        c = self.c
        for run_hash, store in list(c._stores.items()):
            if (
                not store.pending
                and now - store.last_write > c.idle_close_s
                and not c._pending.has_run(run_hash)
            ):
                c._close_store(run_hash)

    def _log_stats(self, now: float) -> None:
        c = self.c
        elapsed = c.stats_interval_s
        rate = (c.stats.received - self.received_at_stats) / elapsed
        self.received_at_stats = c.stats.received
        live = sum(1 for s in c._runs.values() if s.status == "live")
        log.info(
            "collector: %.0f msg/s, %d rows written, rejected %s, %d live runs",
            rate,
            c.stats.rows_written,
            dict(c.stats.rejected) or "none",
            live,
        )
