"""The collector's writes: one `RunStore` per run folder, batched upserts, bounded WAL.

Writes are idempotent upserts keyed by step (and layer, expert), so a step that arrives twice,
out of order or again after a restart or a replay is stored exactly once.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prismatic import db
from prismatic.wire import EXPERT_METRICS, MAX_EXPERTS

log = logging.getLogger(__name__)


@dataclass
class StepRow:
    """One aggregated step, ready to write."""

    step: int
    loss: float | None
    val_loss: float | None
    lr: float | None
    ranks_reported: int
    rank_spread: float | None
    nonfinite: int
    layer_mean: dict[str, list[float | None]]  # metric -> value per expert
    per_layer: dict[str, list[list[float | None]]]  # metric -> [layer][expert]
    created: float = field(default_factory=time.time)


class RunStore:
    """The single writer of one `<runs-dir>/<hash>/dynamics.db`."""

    def __init__(self, run_dir: Path) -> None:
        self.path = run_dir / db.DB_NAME
        self.conn = db.connect_writer(self.path)
        self.schema_version = db.migrate(self.conn)
        self._columns = set(db.table_columns(self.conn, "dynamics"))
        self._steps: list[StepRow] = []
        self._run_updates: dict[str, Any] = {}
        self._run_counts: dict[str, int] = {}
        self.run_hash = run_dir.name
        self.last_write = time.monotonic()
        self.rows_written = 0

    # --- buffering -----------------------------------------------------------------------------

    def add_step(self, row: StepRow) -> None:
        self._steps.append(row)

    def update_run(self, **values: Any) -> None:
        self._run_updates.update(values)

    def count(self, key: str, n: int = 1) -> None:
        """Add to a counter column of the run table (`messages`, `rejected`)."""
        self._run_counts[key] = self._run_counts.get(key, 0) + n

    @property
    def pending(self) -> int:
        return len(self._steps) + bool(self._run_updates or self._run_counts)

    # --- flushing ------------------------------------------------------------------------------

    def flush(self) -> list[StepRow]:
        """Write everything buffered in one transaction; returns the step rows written."""
        if not self.pending:
            return []
        steps, self._steps = self._steps, []
        updates, self._run_updates = self._run_updates, {}
        counts, self._run_counts = self._run_counts, {}
        n_experts = max((len(r.layer_mean.get("norm", [])) for r in steps), default=0)
        self._ensure_expert_columns(min(n_experts, MAX_EXPERTS))
        with self.conn:
            self.conn.execute("BEGIN IMMEDIATE")
            for row in steps:
                self._write_step(row)
            if updates or counts:
                self._write_run(updates, counts)
        self.rows_written += len(steps)
        self.last_write = time.monotonic()
        return steps

    def _ensure_expert_columns(self, n_experts: int) -> None:
        missing = [
            c for e in range(n_experts) for c in db.expert_columns(e) if c not in self._columns
        ]
        if not missing:
            return
        with self.conn:
            for column in missing:
                self.conn.execute(f"ALTER TABLE dynamics ADD COLUMN {db.quote(column)} REAL")
                self._columns.add(column)

    def _write_step(self, row: StepRow) -> None:
        values: dict[str, Any] = {
            "step": row.step,
            "loss": row.loss,
            "val_loss": row.val_loss,
            "lr": row.lr,
            "ranks_reported": row.ranks_reported,
            "rank_spread": row.rank_spread,
            "nonfinite": row.nonfinite,
            "updated": time.time(),
        }
        for metric, per_expert in row.layer_mean.items():
            if metric not in db.WIDE_METRICS:
                continue
            for expert, value in enumerate(per_expert):
                column = db.expert_column(expert, metric)
                if column in self._columns:
                    values[column] = value
        # A step reported again without val_loss keeps the val_loss it had.
        keep_if_null = {"val_loss", "lr", "loss"}
        names = list(values)
        assignments = ", ".join(
            f"{db.quote(n)}=coalesce(excluded.{db.quote(n)}, {db.quote(n)})"
            if n in keep_if_null
            else f"{db.quote(n)}=excluded.{db.quote(n)}"
            for n in names
            if n != "step"
        )
        self.conn.execute(
            f"INSERT INTO dynamics ({', '.join(map(db.quote, names))}) "
            f"VALUES ({', '.join('?' * len(names))}) ON CONFLICT(step) DO UPDATE SET {assignments}",
            list(values.values()),
        )
        self._write_layers(row)

    def _write_layers(self, row: StepRow) -> None:
        metrics = [m for m in EXPERT_METRICS if m in row.per_layer]
        if not metrics:
            return
        first = row.per_layer[metrics[0]]
        records = [
            (row.step, layer, expert, *(row.per_layer[m][layer][expert] for m in metrics))
            for layer in range(len(first))
            for expert in range(len(first[layer]))
        ]
        cols = ", ".join(["step", "layer", "expert", *metrics])
        self.conn.executemany(
            f"INSERT OR REPLACE INTO layer_dynamics ({cols}) "
            f"VALUES ({', '.join('?' * (3 + len(metrics)))})",
            records,
        )

    def _write_run(self, updates: dict[str, Any], counts: dict[str, int]) -> None:
        run_hash = self.run_hash
        for key in ("config", "model", "versions"):
            if key in updates and not isinstance(updates[key], str):
                updates[key] = json.dumps(updates[key], sort_keys=True, default=str)
        self.conn.execute("INSERT OR IGNORE INTO run (run_hash) VALUES (?)", (run_hash,))
        if updates:
            sets = ", ".join(f"{db.quote(k)}=?" for k in updates)
            self.conn.execute(
                f"UPDATE run SET {sets} WHERE run_hash=?", [*updates.values(), run_hash]
            )
        for key, value in counts.items():
            self.conn.execute(
                f"UPDATE run SET {key}=coalesce({key}, 0)+? WHERE run_hash=?", (value, run_hash)
            )

    def checkpoint(self) -> None:
        """Fold the WAL back into the database so it stays bounded while readers come and go."""
        try:
            self.conn.execute("PRAGMA wal_checkpoint(PASSIVE)")
        except sqlite3.OperationalError as exc:
            log.debug("store: checkpoint of %s skipped: %s", self.path, exc)

    def close(self) -> None:
        self.flush()
        self.checkpoint()
        self.conn.close()
