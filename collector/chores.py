"""The collector's periodic work, each chore on its own interval: flush batched writes, write
steps whose missing ranks timed out, mark silent runs stale, close idle databases, checkpoint
WALs, log throughput, and let the spool watch replay what the socket missed."""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

from prismatic.errors import SchemaError

if TYPE_CHECKING:
    from collector.service import Collector

log = logging.getLogger(__name__)
WAL_CHECKPOINT_EVERY_S = 0.25  # one store per turn, in rotation


class Chores:
    """The collector's periodic work, each on its own interval."""

    def __init__(self, collector: Collector) -> None:
        self.c = collector
        now = time.monotonic()
        self.last = dict.fromkeys(("flush", "timeouts", "stale", "idle", "wal", "stats"), now)
        self.received_at_stats = 0
        self.rows_at_stats = 0

    def run_due(self) -> None:
        c = self.c
        now = time.monotonic()
        if self._due("flush", c.flush_interval_s, now):
            c.flush(wait=False)
        if self._due("timeouts", min(1.0, c.rank_timeout_s / 4), now):
            for run_hash, row in c._pending.pop_expired(c.rank_timeout_s):
                self._guarded(c._add_row, run_hash, row)
        if self._due("stale", min(1.0, c.stale_after_s / 4), now):
            self._mark_stale()
        if self._due("idle", min(5.0, c.idle_close_s / 2), now):
            self._close_idle(now)
        if self._due("wal", WAL_CHECKPOINT_EVERY_S, now):
            c.checkpoint_next()
        if self._due("stats", c.stats_interval_s, now):
            self._log_stats(now)
        c.spools.run_due()

    def _due(self, chore: str, interval: float, now: float) -> bool:
        if now - self.last[chore] < interval:
            return False
        self.last[chore] = now
        return True

    def _guarded(self, action: Any, run_hash: str, *args: Any) -> None:
        try:
            action(run_hash, *args)
        except SchemaError as exc:
            self.c.reject("bad_database", str(exc), subject=run_hash)

    def _mark_stale(self) -> None:
        c = self.c
        cutoff = time.time() - c.stale_after_s
        for run_hash, state in list(c._runs.items()):
            if state.status != "live" or state.last_seen >= cutoff:
                continue
            if run_hash not in c._stores and not c.has_database(run_hash):
                # Its folder was deleted while it was silent: forget it rather than bring the
                # folder back as an empty, nameless run. A new message creates it again.
                del c._runs[run_hash]
                log.info("collector: run %s: its database was removed; forgotten", run_hash)
                continue
            state.status = "stale"
            self._guarded(lambda h: c._store(h).update_run(status="stale"), run_hash)
            log.info("collector: run %s is stale (silent for %.0fs)", run_hash, c.stale_after_s)

    def _close_idle(self, now: float) -> None:
        c = self.c
        for run_hash, store in list(c._stores.items()):
            if (
                not c.has_unwritten(run_hash)
                and now - store.last_write > c.idle_close_s
                and not c._pending.has_run(run_hash)
            ):
                c._close_store(run_hash)

    def _log_stats(self, now: float) -> None:
        c = self.c
        elapsed = c.stats_interval_s
        rate = (c.stats.received - self.received_at_stats) / elapsed
        rows = (c.stats.rows_written - self.rows_at_stats) / elapsed
        self.received_at_stats = c.stats.received
        self.rows_at_stats = c.stats.rows_written
        live = sum(1 for s in c._runs.values() if s.status == "live")
        log.info(
            "collector: %s msg/s, %s rows/s, %d rows written, rejected %s, nonfinite %d, "
            "%d live runs, %d open databases",
            _rate(rate),
            _rate(rows),
            c.stats.rows_written,
            dict(c.stats.rejected) or "none",
            c.stats.nonfinite_values,
            live,
            len(c._stores),
        )


def _rate(per_s: float) -> str:
    """Two significant digits below 10 (a trainer at log_freq 10 sends 0.1 msg/s), whole above."""
    return f"{per_s:.2g}" if per_s < 10 else f"{per_s:.0f}"
