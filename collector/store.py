"""The collector's writes: one `RunStore` per run folder, batched upserts, bounded WAL.

Writes are idempotent upserts keyed by step (and layer, expert), so a step that arrives twice,
out of order or again after a restart or a replay is stored exactly once. A step written before
all of its ranks reported (the rank timeout) is only ever replaced by a report of at least as
many ranks, so a late duplicate cannot overwrite a complete row with a partial one.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import operator
import os
import sqlite3
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import chain, repeat
from pathlib import Path
from typing import Any

from prismatic import db
from prismatic.errors import SchemaError
from prismatic.wire import EXPERT_METRICS, MAX_EXPERTS

log = logging.getLogger(__name__)

# The WAL is checkpointed harder (TRUNCATE, waiting this long for readers) once it outgrows the
# journal size limit: a passive checkpoint alone can be starved by readers that never pause.
TRUNCATE_BUSY_MS = 200
# Readers whose transactions overlap without a break (several dashboards scanning a long run)
# outlast a 200 ms wait every time, and the WAL grows without bound (206 MB measured, 50,000
# steps of 16 layers x 8 experts, two readers). Past this size the TRUNCATE waits as long as
# a long scan: the writer (every run's inserts) waits meanwhile, while new readers go on.
WAL_HARD_LIMIT = 8 * db.JOURNAL_SIZE_LIMIT
FORCED_TRUNCATE_BUSY_MS = 5000
_COUNTERS = ("messages", "rejected")
# Layer cells per INSERT: 256 x 11 parameters stays far below SQLite's 32,766 variables.
CELLS_PER_STATEMENT = 256
MAX_VARIABLES = 16_000  # per multi-row dynamics upsert (SQLite allows 32,766)
STEP_ROWS_PER_STATEMENT = 16  # measured: 16 rows a statement insert fastest (1 to 256 tried)
_KEEP_IF_NULL = frozenset(("loss", "val_loss", "lr"))
# A step's layer_dynamics records built ahead (collector/burst.py): their shape (metrics in
# EXPERT_METRICS order, layers, experts) and the parameters of layer_cells_sql but the step:
# every cell's metrics, as float64 bytes, nil as NaN (SQLite stores a bound NaN as NULL). Bytes
# are made from the burst's arrays at once and cross to the writer process as they are.
LayerShape = tuple[tuple[str, ...], int, int]
LayerRows = tuple[LayerShape, bytes]


@dataclass(slots=True)  # slots: tens of thousands live between flushes, made and freed fast
class StepRow:
    """One aggregated step, ready to write."""

    step: int
    loss: float | None
    val_loss: float | None
    lr: float | None
    ranks_reported: int
    rank_spread: float | None
    nonfinite: int
    layer_mean: Mapping[str, list[float | None]]  # metric -> value per expert
    per_layer: Mapping[str, list[list[float | None]]]  # metric -> [layer][expert]
    created: float = field(default_factory=time.time)
    world_size: int = 1  # ranks expected when the row was built
    sent_ts: float | None = None  # when its last rank published it (the sender's clock)
    layer_rows: LayerRows | None = None  # per_layer's records, if built ahead

    @property
    def n_experts(self) -> int:
        """Every metric of a row has the same number of experts (wire.validate_metrics)."""
        layer_mean = self.layer_mean
        if isinstance(layer_mean, Means):  # said at once, without going through the Mapping
            return layer_mean.n_experts
        return len(next(iter(layer_mean.values()), ()))


class Means(Mapping[str, list[Any]]):
    """A tier-1 message's layer means, {name: [value per expert]}, over their float64 bytes
    ([name][expert], as the store writes them; NaN where a mean is None): made at once for a
    whole burst with numpy, and crossing to the writer process as they are."""

    __slots__ = ("names", "flat", "n_experts")

    def __init__(self, names: tuple[str, ...], flat: bytes, n_experts: int) -> None:
        self.names = names
        self.flat = flat
        self.n_experts = n_experts

    def __getitem__(self, name: str) -> list[Any]:
        start = self.names.index(name) * self.n_experts
        values = memoryview(self.flat).cast("d")[start : start + self.n_experts].tolist()
        return [None if math.isnan(v) else v for v in values]

    def values_flat(self) -> list[Any]:
        """Every mean as a float, NaN where there is none (SQLite stores a bound NaN as NULL)."""
        return memoryview(self.flat).cast("d").tolist()

    def __iter__(self) -> Iterator[str]:
        return iter(self.names)

    def __len__(self) -> int:
        return len(self.names)

    def __repr__(self) -> str:
        return repr(dict(self))


# A StepRow as the writer process gets it (collector/writer.py): plain values that pickle fast,
# without what only the collector needs (when it was made, when it was sent).
WireRow = tuple[Any, ...]
# A row's own values, in the order of the dynamics columns ("step", *db.STEP_COLUMNS) up to
# `updated`, and at the head of a WireRow.
_HEAD = operator.attrgetter(
    "step", "loss", "val_loss", "lr", "ranks_reported", "rank_spread", "nonfinite"
)


def row_to_wire(row: StepRow) -> WireRow:
    """What `row_from_wire` makes the same row for writing from: the layer means as names and
    a flat list if built ahead, the per-layer tables only if their records were not."""
    if isinstance(row.layer_mean, Means):
        means: Any = (row.layer_mean.names, row.layer_mean.flat, row.layer_mean.n_experts)
    else:
        means = dict(row.layer_mean)
    per_layer = {} if row.layer_rows is not None else dict(row.per_layer)
    return (*_HEAD(row), row.world_size, means, per_layer, row.layer_rows)


def row_from_wire(values: WireRow) -> StepRow:
    (
        step,
        loss,
        val_loss,
        lr,
        ranks,
        spread,
        nonfinite,
        world_size,
        means,
        per_layer,
        layer_rows,
    ) = values
    if type(means) is tuple:
        means = Means(*means)
    return StepRow(
        step,
        loss,
        val_loss,
        lr,
        ranks,
        spread,
        nonfinite,
        means,
        per_layer,
        world_size=world_size,
        layer_rows=layer_rows,
    )


@dataclass
class Batch:
    """What one flush of a store writes, in one transaction."""

    steps: list[StepRow]
    updates: dict[str, Any]
    counts: dict[str, int]
    nbytes: int = 0  # the wire size of the messages its steps came from (for memory bounds)


class RunStore:
    """The single writer of one `<runs-dir>/<hash>/dynamics.db`.

    Opening a database this version cannot write (newer schema, not a database) raises
    SchemaError; a failed flush (locked, disk full) keeps its rows buffered for the next try.
    """

    def __init__(self, run_dir: Path) -> None:
        self.path = run_dir / db.DB_NAME
        self.run_hash = run_dir.name
        try:
            self.conn = db.connect_writer(self.path)
        except (sqlite3.DatabaseError, OSError) as exc:
            raise SchemaError(f"{self.path}: cannot open for writing ({exc})") from None
        try:
            self.schema_version = db.migrate(self.conn)
            self._columns = set(db.table_columns(self.conn, "dynamics"))
            self._run_columns = set(db.table_columns(self.conn, "run"))
        except (sqlite3.DatabaseError, SchemaError) as exc:
            self.conn.close()
            raise SchemaError(f"{self.path}: {exc}") from None
        self._steps: list[StepRow] = []
        self.buffered_bytes = 0  # wire bytes of the messages behind _steps (Batch.nbytes)
        self._run_updates: dict[str, Any] = {}
        self._run_counts: dict[str, int] = {}
        self.last_write = time.monotonic()
        self.rows_written = 0
        self.unwritable_rows = 0  # rows dropped because SQLite could not hold them
        self._plans: dict[tuple, tuple[tuple[str, ...], Callable[[list], Sequence]]] = {}

    # --- buffering -----------------------------------------------------------------------------

    def add_step(self, row: StepRow, nbytes: int = 0) -> None:
        self._steps.append(row)
        self.buffered_bytes += nbytes

    def update_run(self, **values: Any) -> None:
        unknown = set(values) - self._run_columns
        if unknown:
            raise ValueError(f"run table has no column(s) {sorted(unknown)}")
        self._run_updates.update(values)

    def count(self, key: str, n: int = 1) -> None:
        """Add to a counter column of the run table (`messages`, `rejected`)."""
        if key not in _COUNTERS:
            raise ValueError(f"run table has no counter {key!r}; expected one of {_COUNTERS}")
        self._run_counts[key] = self._run_counts.get(key, 0) + n

    @property
    def pending(self) -> int:
        """Rows (and run updates) buffered and not yet committed."""
        return len(self._steps) + bool(self._run_updates or self._run_counts)

    def read_run(self) -> dict[str, Any] | None:
        """The run table's row as committed (what a restarted collector continues from)."""
        return db.read_run(self.conn)

    # --- flushing ------------------------------------------------------------------------------

    def flush(self) -> list[StepRow]:
        """Write everything buffered in one transaction; returns the step rows written.

        On a database error nothing is lost: the buffers are restored and the error raised.
        """
        batch = self.take()
        if batch is None:
            return []
        try:
            return self.write(batch)
        except sqlite3.Error:
            self.restore(batch)
            raise

    def take(self) -> Batch | None:
        """Hand the buffered work over for `write` (`restore()` puts it back if that failed)."""
        if not (self._steps or self._run_updates or self._run_counts):
            return None
        batch = Batch(self._steps, self._run_updates, self._run_counts, self.buffered_bytes)
        self._steps, self._run_updates, self._run_counts = [], {}, {}
        self.buffered_bytes = 0
        return batch

    def write(self, batch: Batch) -> list[StepRow]:
        """Commit one batch in one transaction; raises sqlite3.Error if the database refused."""
        try:
            written = self._write(batch.steps, batch.updates, batch.counts)
        except (OverflowError, ValueError, TypeError) as exc:
            written = self._salvage(batch.steps, batch.updates, batch.counts, exc)
        self.rows_written += len(written)
        self.last_write = time.monotonic()
        return written

    def restore(self, batch: Batch) -> None:
        """Put a batch whose write failed back in front of what was buffered since."""
        self._steps = batch.steps + self._steps
        self.buffered_bytes += batch.nbytes
        self._run_updates = {**batch.updates, **self._run_updates}
        for key, n in batch.counts.items():
            self._run_counts[key] = self._run_counts.get(key, 0) + n

    def _write(
        self, steps: list[StepRow], updates: dict[str, Any], counts: dict[str, int]
    ) -> list[StepRow]:
        rows = _latest_per_step(steps)
        self._ensure_expert_columns(min(max((r.n_experts for r in rows), default=0), MAX_EXPERTS))
        with self.conn:
            self.conn.execute("BEGIN IMMEDIATE")
            rows = self._drop_superseded(rows)
            self._write_steps(rows)
            self._write_layers(rows)
            if updates or counts:
                self._write_run(updates, counts)
        return rows

    def _salvage(
        self, steps: list[StepRow], updates: dict[str, Any], counts: dict[str, int], exc: Exception
    ) -> list[StepRow]:
        """A row SQLite cannot hold got past validation (a bug): write the others one by one,
        drop that one loudly, and keep the collector running."""
        written: list[StepRow] = []
        for row in steps:
            try:
                written += self._write([row], {}, {})
            except (OverflowError, ValueError, TypeError):
                self.unwritable_rows += 1
        self._write([], updates, counts)
        log.error(
            "store: %s: dropped %d row(s) SQLite cannot hold (%s); %d written",
            self.path,
            len(steps) - len(written),
            exc,
            len(written),
        )
        return written

    def _ensure_expert_columns(self, n_experts: int) -> None:
        missing = [
            c for e in range(n_experts) for c in db.expert_columns(e) if c not in self._columns
        ]
        if not missing:
            return
        with self.conn:
            self.conn.execute("BEGIN IMMEDIATE")
            for column in missing:
                self.conn.execute(f"ALTER TABLE dynamics ADD COLUMN {db.quote(column)} REAL")
        self._columns.update(missing)
        self._plans.clear()

    def _drop_superseded(self, rows: list[StepRow]) -> list[StepRow]:
        """Partial rows (fewer ranks than the world size) never replace a row with more ranks."""
        partial = [r.step for r in rows if r.ranks_reported < r.world_size]
        if not partial:
            return rows
        stored: dict[int, int] = {}
        for chunk in range(0, len(partial), 500):
            part = partial[chunk : chunk + 500]
            stored.update(
                self.conn.execute(
                    "SELECT step, ranks_reported FROM dynamics "
                    f"WHERE step IN ({', '.join('?' * len(part))})",
                    part,
                ).fetchall()
            )
        return [r for r in rows if (stored.get(r.step) or 0) <= r.ranks_reported]

    def _write_steps(self, rows: list[StepRow]) -> None:
        """Rows of one column set (a run's rows almost always share one) go several to a
        statement, as a multi-row VALUES, below SQLite's limit on variables. Statements hold
        a power of two of rows, at most STEP_ROWS_PER_STATEMENT: a handful of distinct SQL
        texts, all kept compiled in the connection's statement cache (a statement sized to
        each flush was compiled anew every time, which cost more than its rows' inserts)."""
        now = time.time()
        groups: dict[tuple[str, ...], list[list[Any]]] = {}
        for row in rows:
            names, values = self._step_values(row, now)
            groups.setdefault(names, []).append(values)
        for names, records in groups.items():
            size = min(STEP_ROWS_PER_STATEMENT, max(1, MAX_VARIABLES // len(names)))
            size = 1 << (size.bit_length() - 1)  # a power of two
            start = 0
            while start < len(records):
                while size > len(records) - start:
                    size //= 2
                count = (len(records) - start) // size
                batches = (records[start + i * size : start + (i + 1) * size] for i in range(count))
                self.conn.executemany(
                    _upsert_sql(names, size), (list(chain.from_iterable(b)) for b in batches)
                )
                start += count * size

    def _step_values(self, row: StepRow, now: float) -> tuple[tuple[str, ...], list[Any]]:
        layer_mean = row.layer_mean
        values: list[Any] = [*_HEAD(row), now]
        if isinstance(layer_mean, Means):  # flat already, as pick takes it
            names, pick = self._column_plan(layer_mean.names, layer_mean.n_experts)
            values += pick(layer_mean.values_flat())
            return names, values
        names, pick = self._column_plan(tuple(layer_mean), row.n_experts)
        if len(set(map(len, layer_mean.values()))) > 1:  # never from validated messages
            return self._ragged_values(layer_mean, values)
        values += pick(list(chain.from_iterable(layer_mean.values())))
        return names, values

    def _ragged_values(
        self, layer_mean: Mapping[str, list[float | None]], values: list[Any]
    ) -> tuple[tuple[str, ...], list[Any]]:
        """`_step_values` for metrics of different lengths, cell by cell."""
        cells = [
            (metric, expert)
            for metric, means in layer_mean.items()
            if metric in db.WIDE_METRICS
            for expert in range(len(means))
            if db.expert_column(expert, metric) in self._columns
        ]
        names = ("step", *db.STEP_COLUMNS, *(db.expert_column(e, m) for m, e in cells))
        return names, values + [layer_mean[m][e] for m, e in cells]

    def _column_plan(
        self, metrics: tuple[str, ...], n_experts: int
    ) -> tuple[tuple[str, ...], Callable[[list], Sequence]]:
        """For rows of this shape (metrics in order, each of n_experts values): the column
        names and a getter of the values behind the expert columns from the row's layer means
        flattened in that order (in C: a row's values are picked without a Python loop).
        Cached: every row of a run has the same shape."""
        shape = (metrics, n_experts)
        plan = self._plans.get(shape)
        if plan is None:
            cells = [
                (i * n_experts + expert, db.expert_column(expert, metric))
                for i, metric in enumerate(metrics)
                if metric in db.WIDE_METRICS
                for expert in range(n_experts)
                if db.expert_column(expert, metric) in self._columns
            ]
            names = ("step", *db.STEP_COLUMNS, *(column for _, column in cells))
            indices = [index for index, _ in cells]
            # itemgetter of one index returns the value itself: then (and for none) a slice.
            if len(indices) > 1:
                pick: Callable[[list], Sequence] = operator.itemgetter(*indices)
            else:
                pick = operator.itemgetter(
                    slice(indices[0], indices[0] + 1) if indices else slice(0)
                )
            plan = self._plans[shape] = (names, pick)
        return plan

    def _write_layers(self, rows: list[StepRow]) -> None:
        """Every (layer, expert) of every row; a statement per step (or per CELLS_PER_STATEMENT
        cells) with its cells as rows of one multi-row VALUES, a fifth faster in SQLite than
        one statement per cell (measured with bench/collector.py's message shape)."""
        groups: dict[tuple[tuple[str, ...], int], list[list]] = {}
        built: dict[LayerShape, tuple[list[int], list[bytes]]] = {}
        for row in rows:
            if row.layer_rows is not None:
                shape, data = row.layer_rows
                steps, datas = built.setdefault(shape, ([], []))
                steps.append(row.step)
                datas.append(data)
                continue
            metrics = tuple(m for m in EXPERT_METRICS if m in row.per_layer)
            if not metrics:
                continue
            tables = [row.per_layer[m] for m in metrics]
            layers, experts = _cell_index(len(tables[0]), len(tables[0][0]))
            # One record per (layer, expert): zip the flattened tables, all in C.
            columns = [chain.from_iterable(t) for t in tables]
            cells = list(zip(repeat(row.step), layers, experts, *columns))
            for start in range(0, len(cells), CELLS_PER_STATEMENT):
                chunk = cells[start : start + CELLS_PER_STATEMENT]
                params = list(chain.from_iterable(chunk))
                groups.setdefault((metrics, len(chunk)), []).append(params)
        for (metrics, n_cells), params_list in groups.items():
            self.conn.executemany(_layer_sql(metrics, n_cells), params_list)
        for shape, (steps, datas) in built.items():
            # Every step's cells made floats in one call; each step's own is bound last.
            # float64 bytes to Python floats in C, without numpy (not imported by the writer
            # process: it would be a third of its memory).
            values = memoryview(b"".join(datas)).cast("d")
            size = len(values) // len(steps)
            records: list[list[Any]] = [
                values[i * size : (i + 1) * size].tolist() for i in range(len(steps))
            ]
            for record, step in zip(records, steps, strict=True):
                record.append(step)
            self.conn.executemany(layer_cells_sql(*shape), records)

    def _write_run(self, updates: dict[str, Any], counts: dict[str, int]) -> None:
        run_hash = self.run_hash
        updates = dict(updates)
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
            column = db.quote(key)  # one of _COUNTERS, checked in count()
            self.conn.execute(
                f"UPDATE run SET {column}=coalesce({column}, 0)+? WHERE run_hash=?",
                (value, run_hash),
            )

    # --- the WAL -------------------------------------------------------------------------------

    @property
    def wal_bytes(self) -> int:
        try:
            return os.stat(f"{self.path}-wal").st_size
        except FileNotFoundError:
            return 0

    def checkpoint(self) -> None:
        """Fold the WAL back into the database so it stays bounded while readers come and go.

        A passive checkpoint never waits. If the WAL has still outgrown the journal size limit
        (a reader held an old snapshot while it grew), a TRUNCATE checkpoint waits briefly for
        readers to move on and empties the file, longer past WAL_HARD_LIMIT. A reader that never
        ends its transaction pins the WAL whatever the writer does; the dashboard reads in short
        transactions.
        """
        try:
            self.conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
            wal_bytes = self.wal_bytes
            if wal_bytes > db.JOURNAL_SIZE_LIMIT:
                hard = wal_bytes > WAL_HARD_LIMIT
                busy_ms = FORCED_TRUNCATE_BUSY_MS if hard else TRUNCATE_BUSY_MS
                self.conn.execute(f"PRAGMA busy_timeout={busy_ms}")
                try:
                    self.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
                finally:
                    self.conn.execute(f"PRAGMA busy_timeout={db.BUSY_TIMEOUT_MS}")
        except sqlite3.OperationalError as exc:
            log.debug("store: checkpoint of %s skipped: %s", self.path, exc)

    def close(self) -> None:
        """Flush (raising if that fails: the caller decides), checkpoint and close."""
        self.flush()
        try:
            # Briefly, as checkpoint() does: a database someone holds locked is left with
            # its WAL (the next writer folds it back), not waited on for the busy timeout.
            self.conn.execute(f"PRAGMA busy_timeout={TRUNCATE_BUSY_MS}")
            self.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
        except sqlite3.OperationalError as exc:
            log.debug("store: final checkpoint of %s skipped: %s", self.path, exc)
        self.conn.close()


def _latest_per_step(steps: list[StepRow]) -> list[StepRow]:
    """One row per step: the one with most ranks, and of those the latest; a loss, val_loss or
    lr it lacks is kept from the row it replaces, as the upsert keeps a stored one."""
    if len(steps) < 2:
        return steps
    best: dict[int, StepRow] = {}
    for row in steps:
        held = best.get(row.step)
        if held is None or row.ranks_reported >= held.ranks_reported:
            if held is not None:
                row.loss = held.loss if row.loss is None else row.loss
                row.val_loss = held.val_loss if row.val_loss is None else row.val_loss
                row.lr = held.lr if row.lr is None else row.lr
            best[row.step] = row
    return list(best.values()) if len(best) < len(steps) else steps


@functools.cache
def _cell_index(n_layers: int, n_experts: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(layer, expert) of each cell of a table flattened layer by layer."""
    layers = tuple(la for la in range(n_layers) for _ in range(n_experts))
    return layers, tuple(range(n_experts)) * n_layers


@functools.cache
def _layer_sql(metrics: tuple[str, ...], n_cells: int) -> str:
    cols = ", ".join(db.quote(c) for c in ("step", "layer", "expert", *metrics))
    one = f"({', '.join('?' * (3 + len(metrics)))})"
    return f"INSERT OR REPLACE INTO layer_dynamics ({cols}) VALUES {', '.join([one] * n_cells)}"


@functools.cache
def layer_cells_sql(metrics: tuple[str, ...], n_layers: int, n_experts: int) -> str:
    """One step's layer_dynamics INSERT with each cell's layer and expert written in the SQL,
    the cells' metrics bound first and the step bound once, last: a third fewer parameters to
    make and bind than _layer_sql. (Several steps to a statement measured no faster in the
    collector: the parameter lists must then be joined, which costs what SQLite saves.)"""
    cols = ", ".join(db.quote(c) for c in ("step", "layer", "expert", *metrics))
    k = len(metrics)
    step = f"?{n_layers * n_experts * k + 1}"
    cells = (
        f"({step}, {layer}, {expert}, {', '.join(f'?{1 + cell * k + i}' for i in range(k))})"
        for cell, (layer, expert) in enumerate(
            (la, ex) for la in range(n_layers) for ex in range(n_experts)
        )
    )
    return f"INSERT OR REPLACE INTO layer_dynamics ({cols}) VALUES {', '.join(cells)}"


@functools.cache
def _upsert_sql(names: tuple[str, ...], n_rows: int = 1) -> str:
    """The dynamics upsert of `n_rows` rows of one column set; a step reported again without
    val_loss (or loss, lr) keeps the value it had."""
    assignments = ", ".join(
        f"{db.quote(n)}=coalesce(excluded.{db.quote(n)}, {db.quote(n)})"
        if n in _KEEP_IF_NULL
        else f"{db.quote(n)}=excluded.{db.quote(n)}"
        for n in names
        if n != "step"
    )
    one = f"({', '.join('?' * len(names))})"
    return (
        f"INSERT INTO dynamics ({', '.join(map(db.quote, names))}) "
        f"VALUES {', '.join([one] * n_rows)} ON CONFLICT(step) DO UPDATE SET {assignments}"
    )
