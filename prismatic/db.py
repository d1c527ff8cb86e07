"""The dynamics.db schema, its named migrations and the read queries the dashboard uses.

The collector is the only writer (collector/store.py); the dashboard only reads, through a
read-only connection. Column names are only ever built from an expert index and a metric name
in `wire.EXPERT_METRICS`, and are quoted.
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from prismatic.errors import SchemaError
from prismatic.wire import EXPERT_METRICS, MAX_EXPERTS

DB_NAME = "dynamics.db"
CONFIG_NAME = "config.yaml"
CHECKPOINT_NAME = "checkpoint.pt"  # written by the trainer, next to the run's dynamics.db
BUSY_TIMEOUT_MS = 5000
JOURNAL_SIZE_LIMIT = 8 * 1024 * 1024
# The collector's page cache per open run. SQLite's default (2 MB) fills as a run's database
# grows, so a collector holding 32 runs grew ~2.6 MB a minute for the 10 minutes of bench/soak.py;
# a writer that appends needs only the few pages it is writing.
WRITER_CACHE_KIB = 256

# Columns of the wide `dynamics` table for one expert, in order (design note names first).
WIDE_METRICS = (
    "top_norm",
    "bottom_norm",
    "middle_norm",
    "norm",
    "divergence",
    "weight_drift",
    "routing_weight",
)
STEP_COLUMNS = ("loss", "val_loss", "lr", "ranks_reported", "rank_spread", "nonfinite", "updated")


def expert_column(expert: int, metric: str) -> str:
    """`expert_1_bottom_norm`; `norm` is `clean_norm` for expert 0, `perturbed_norm` otherwise."""
    if not (isinstance(expert, int) and 0 <= expert < MAX_EXPERTS) or metric not in EXPERT_METRICS:
        raise ValueError(f"no column for expert {expert!r}, metric {metric!r}")
    if metric == "norm":
        metric = "clean_norm" if expert == 0 else "perturbed_norm"
    return f"expert_{expert}_{metric}"


def expert_columns(expert: int) -> list[str]:
    metrics = [m for m in WIDE_METRICS if not (expert == 0 and m in ("divergence", "weight_drift"))]
    return [expert_column(expert, m) for m in metrics]


def quote(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


# --- migrations --------------------------------------------------------------------------------


def _m1_initial(conn: sqlite3.Connection) -> None:
    conn.execute(
        """CREATE TABLE run (
            run_hash TEXT PRIMARY KEY, name TEXT, config TEXT, model TEXT, mixing TEXT,
            world_size INTEGER, shards INTEGER, status TEXT, started REAL, ended REAL,
            last_seen REAL, last_step INTEGER, messages INTEGER DEFAULT 0,
            rejected INTEGER DEFAULT 0, sent INTEGER, dropped INTEGER, host TEXT, versions TEXT)"""
    )
    conn.execute(
        """CREATE TABLE dynamics (
            step INTEGER PRIMARY KEY, loss REAL, val_loss REAL, lr REAL,
            ranks_reported INTEGER, rank_spread REAL, nonfinite INTEGER, updated REAL)"""
    )
    metric_cols = ", ".join(f"{m} REAL" for m in EXPERT_METRICS if m != "nonfinite")
    conn.execute(
        f"""CREATE TABLE layer_dynamics (
            step INTEGER NOT NULL, layer INTEGER NOT NULL, expert INTEGER NOT NULL,
            {metric_cols}, nonfinite INTEGER,
            PRIMARY KEY (step, layer, expert)) WITHOUT ROWID"""
    )


def _m2_updated_index(conn: sqlite3.Connection) -> None:
    # Readers poll for rows written since their last look (read_dynamics_changed).
    conn.execute("CREATE INDEX dynamics_updated ON dynamics (updated)")


MIGRATIONS: list[tuple[int, str, Callable[[sqlite3.Connection], None]]] = [
    (1, "initial: run, dynamics, layer_dynamics", _m1_initial),
    (2, "index dynamics.updated for incremental reads", _m2_updated_index),
]
SCHEMA_VERSION = MIGRATIONS[-1][0]


def migrate(conn: sqlite3.Connection) -> int:
    """Apply every migration not yet recorded, each in its own transaction (the migration and
    its record commit together or not at all); return the schema version."""
    conn.execute(
        "CREATE TABLE IF NOT EXISTS schema_migrations "
        "(version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_at REAL NOT NULL)"
    )
    done = {row[0] for row in conn.execute("SELECT version FROM schema_migrations")}
    newer = [v for v in done if v > SCHEMA_VERSION]
    if newer:
        raise SchemaError(
            f"schema version {max(newer)} is newer than this program's {SCHEMA_VERSION}; upgrade"
        )
    for version, name, apply in MIGRATIONS:
        if version in done:
            continue
        conn.execute("BEGIN IMMEDIATE")
        try:
            if not conn.execute(
                "SELECT 1 FROM schema_migrations WHERE version=?", (version,)
            ).fetchone():
                apply(conn)
                conn.execute(
                    "INSERT INTO schema_migrations VALUES (?, ?, ?)", (version, name, time.time())
                )
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
    return SCHEMA_VERSION


def connect_writer(path: Path) -> sqlite3.Connection:
    path.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(str(path), timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")
    conn.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
    conn.execute(f"PRAGMA journal_size_limit={JOURNAL_SIZE_LIMIT}")
    conn.execute(f"PRAGMA cache_size=-{WRITER_CACHE_KIB}")  # negative: KiB, not pages
    # Manual checkpoints from the collector keep the WAL bounded while readers stay connected.
    conn.execute("PRAGMA wal_autocheckpoint=1000")
    return conn


def table_columns(conn: sqlite3.Connection, table: str) -> list[str]:
    return [row[1] for row in conn.execute(f"PRAGMA table_info({quote(table)})")]


# --- reads (the dashboard) ---------------------------------------------------------------------


def connect_reader(path: Path) -> sqlite3.Connection:
    """Read-only: the dashboard can never write, and never takes a write lock."""
    uri = f"file:{Path(path).resolve().as_posix()}?mode=ro"
    conn = sqlite3.connect(uri, uri=True, timeout=BUSY_TIMEOUT_MS / 1000, check_same_thread=False)
    conn.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
    return conn


def change_marker(path: Path) -> tuple[int, int, int]:
    """Changes whenever the collector commits: (db mtime, wal mtime, wal size)."""
    marker = []
    for p in (Path(path), Path(f"{path}-wal")):
        try:
            st = os.stat(p)
            marker += [st.st_mtime_ns, st.st_size]
        except FileNotFoundError:
            marker += [0, 0]
    return (marker[0], marker[2], marker[3])


def read_schema_version(conn: sqlite3.Connection) -> int | None:
    tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    if "schema_migrations" not in tables:
        return None
    row = conn.execute("SELECT max(version) FROM schema_migrations").fetchone()
    return row[0]


def read_run(conn: sqlite3.Connection) -> dict[str, Any] | None:
    conn.row_factory = sqlite3.Row
    try:
        row = conn.execute("SELECT * FROM run LIMIT 1").fetchone()
    finally:
        conn.row_factory = None
    if row is None:
        return None
    run = dict(row)
    for key in ("config", "model", "versions"):
        try:
            run[key] = json.loads(run[key]) if run[key] else {}
        except (TypeError, ValueError):
            run[key] = {}
    return run


def _all(cur: sqlite3.Cursor) -> tuple[list[str], list[tuple]]:
    return [d[0] for d in cur.description], cur.fetchall()


# Each query_* returns an open cursor (a reader can fetch it in chunks: dashboard.data.frame_of),
# each read_* the same query's (column names, rows).


def query_dynamics(conn: sqlite3.Connection, after_step: int = -1) -> sqlite3.Cursor:
    return conn.execute("SELECT * FROM dynamics WHERE step > ? ORDER BY step", (after_step,))


def query_dynamics_changed(
    conn: sqlite3.Connection, after_step: int, updated_after: float
) -> sqlite3.Cursor:
    """Rows a reader holding steps <= after_step, written up to `updated_after`, lacks: newer
    steps, plus older steps written again since (a late rank, a replay)."""
    return conn.execute(
        "SELECT * FROM dynamics WHERE step > ? OR updated > ? ORDER BY step",
        (after_step, updated_after),
    )


def query_layer_dynamics(
    conn: sqlite3.Connection, first_step: int | None = None, last_step: int | None = None
) -> sqlite3.Cursor:
    low = -1 if first_step is None else first_step
    high = 2**62 if last_step is None else last_step
    return conn.execute(
        "SELECT * FROM layer_dynamics WHERE step BETWEEN ? AND ? ORDER BY step, layer, expert",
        (low, high),
    )


def read_dynamics(conn: sqlite3.Connection, after_step: int = -1) -> tuple[list[str], list[tuple]]:
    return _all(query_dynamics(conn, after_step))


def read_dynamics_changed(
    conn: sqlite3.Connection, after_step: int, updated_after: float
) -> tuple[list[str], list[tuple]]:
    return _all(query_dynamics_changed(conn, after_step, updated_after))


def read_layer_dynamics(
    conn: sqlite3.Connection, first_step: int | None = None, last_step: int | None = None
) -> tuple[list[str], list[tuple]]:
    return _all(query_layer_dynamics(conn, first_step, last_step))


def count_steps(conn: sqlite3.Connection) -> int:
    return conn.execute("SELECT count(*) FROM dynamics").fetchone()[0]
