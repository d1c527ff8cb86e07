"""Incremental, cached reads of a run's rows, shared by every page session of one server.

An entry is keyed by the database path and remembers the change marker (file times and WAL size)
it was read at: an unchanged marker returns the held frame without touching SQLite, a changed one
reads only rows the entry lacks (newer steps, or older steps written again since). Two runs never
share an entry, and a column the collector adds mid-run (a new expert) comes with the next read.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from dashboard.data import frame_of, reader
from prismatic import db

MAX_ENTRIES = 64


@dataclass
class Held:
    marker: tuple[int, int, int]
    rows: pd.DataFrame
    last_step: int
    last_updated: float
    generation: int  # counts re-reads that replaced older rows; layer entries follow it
    rows_read: int  # how many rows the latest read fetched from SQLite


class RunCache:
    """`rows(db_path)`: the `dynamics` table; `layers(db_path)`: `layer_dynamics`.

    Frames handed out are shared between sessions: callers must not modify them in place."""

    def __init__(self, max_entries: int = MAX_ENTRIES) -> None:
        self.max_entries = max_entries
        self._held: OrderedDict[tuple[str, str], Held] = OrderedDict()
        self._lock = threading.Lock()

    def rows(self, db_path: Path) -> pd.DataFrame:
        key = (str(Path(db_path).resolve()), "dynamics")
        with self._lock:
            marker = db.change_marker(db_path)
            held = self._held.get(key)
            if held is None or held.marker != marker:
                held = self._refresh_rows(db_path, marker, held)
                self._keep(key, held)
            return held.rows

    def layers(self, db_path: Path) -> pd.DataFrame:
        """Every layer's rows; read after rows(), whose generation says if older rows changed."""
        path = str(Path(db_path).resolve())
        with self._lock:
            marker = db.change_marker(db_path)
            main = self._held.get((path, "dynamics"))
            generation = main.generation if main else 0
            held = self._held.get((path, "layers"))
            if held is None or held.generation != generation:
                held = None  # older steps were rewritten: read everything again
            if held is None or held.marker != marker:
                held = self._refresh_layers(db_path, marker, held, generation)
                self._keep((path, "layers"), held)
            return held.rows

    def rows_read(self, db_path: Path, table: str = "dynamics") -> int:
        """Rows fetched from SQLite by the latest read of this table (0 if none yet)."""
        held = self._held.get((str(Path(db_path).resolve()), table))
        return held.rows_read if held else 0

    # --- reading -------------------------------------------------------------------------------

    def _refresh_rows(self, db_path: Path, marker: tuple, held: Held | None) -> Held:
        with reader(db_path) as conn:
            if held is None or held.rows.empty:
                new, n_read = frame_of(db.query_dynamics(conn))
            else:
                cursor = db.query_dynamics_changed(conn, held.last_step, held.last_updated)
                new, n_read = frame_of(cursor)
        if held is None or held.rows.empty:
            return _held_rows(marker, new, 0, n_read)
        if new.empty:
            return Held(marker, held.rows, held.last_step, held.last_updated, held.generation, 0)
        rewrites_old = int(new["step"].min()) <= held.last_step
        if rewrites_old:
            kept = held.rows[~held.rows["step"].isin(new["step"])]
            merged = pd.concat([kept, new], ignore_index=True).sort_values("step", kind="stable")
            merged = merged.reset_index(drop=True)
        else:
            merged = pd.concat([held.rows, new], ignore_index=True)
        return _held_rows(marker, merged, held.generation + rewrites_old, n_read)

    def _refresh_layers(
        self, db_path: Path, marker: tuple, held: Held | None, generation: int
    ) -> Held:
        first = None if held is None else held.last_step + 1
        with reader(db_path) as conn:
            new, n_read = frame_of(db.query_layer_dynamics(conn, first))
        rows = new if held is None else pd.concat([held.rows, new], ignore_index=True)
        last = int(rows["step"].max()) if len(rows) else -1
        return Held(marker, rows, last, 0.0, generation, n_read)

    def _keep(self, key: tuple[str, str], held: Held) -> None:
        self._held[key] = held
        self._held.move_to_end(key)
        while len(self._held) > self.max_entries:
            self._held.popitem(last=False)


def _held_rows(marker: tuple, rows: pd.DataFrame, generation: int, rows_read: int) -> Held:
    last_step = int(rows["step"].max()) if len(rows) else -1
    updated = rows["updated"].max() if "updated" in rows.columns and len(rows) else None
    last_updated = float(updated) if updated is not None and pd.notna(updated) else 0.0
    return Held(marker, rows, last_step, last_updated, generation, rows_read)
