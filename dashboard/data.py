"""Reading runs for the dashboard: run list, dynamics rows, and what is wrong when there is none.

Everything here is plain Python and pandas (no widgets) so it can be tested directly. Reads go
through prismatic.db's read-only connection; the page never blocks the collector.
"""

from __future__ import annotations

import re
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from prismatic import db
from prismatic.wire import RUN_HASH_RE

EXPERT_COL_RE = re.compile(r"^expert_(\d+)_(\w+)$")
LIVE_WINDOW_S = 60.0


@dataclass
class RunInfo:
    run_hash: str
    path: Path
    name: str = ""
    strategy: str = ""
    scale: float | None = None
    sparsity: float | None = None
    mixing: str = ""
    status: str = "unknown"
    steps: int = 0
    last_update: float | None = None
    layers: int | None = None
    experts: int | None = None

    @property
    def db_path(self) -> Path:
        return self.path / db.DB_NAME

    @property
    def label(self) -> str:
        return f"{self.name or '?'} · {self.run_hash} · {self.status}"


@dataclass
class Problem:
    """Why there is nothing (or nothing sensible) to chart, and what to do about it."""

    kind: str
    message: str
    fix: str


def list_runs(runs_dir: Path) -> list[RunInfo]:
    if not runs_dir.is_dir():
        return []
    runs = []
    for path in sorted(runs_dir.iterdir()):
        if path.is_dir() and RUN_HASH_RE.match(path.name):
            runs.append(read_run_info(path))
    return runs


def _config_from_yaml(path: Path) -> dict:
    try:
        data = yaml.safe_load((path / db.CONFIG_NAME).read_text(encoding="utf-8"))
        return data if isinstance(data, dict) else {}
    except (OSError, yaml.YAMLError):
        return {}


def read_run_info(path: Path) -> RunInfo:
    info = RunInfo(run_hash=path.name, path=path)
    run: dict | None = None
    if info.db_path.is_file():
        try:
            with _reader(info.db_path) as conn:
                if db.read_schema_version(conn) == db.SCHEMA_VERSION:
                    run = db.read_run(conn)
                    info.steps = db.count_steps(conn)
        except sqlite3.Error:
            run = None
    config = (run or {}).get("config") or _config_from_yaml(path)
    model = config.get("model", {}) if isinstance(config, dict) else {}
    info.name = (run or {}).get("name") or config.get("name", "")
    info.strategy = model.get("perturbation_strategy", "")
    info.scale = model.get("perturbation_scale")
    info.sparsity = model.get("sparsity")
    info.mixing = (run or {}).get("mixing") or model.get("mixing", "")
    if run:
        shape = run.get("model") or {}
        info.layers, info.experts = shape.get("layers"), shape.get("experts")
        info.last_update = run.get("last_seen")
        info.status = run.get("status") or "unknown"
        if info.status == "live" and info.last_update and time.time() - info.last_update > 3600:
            info.status = "stale"
    elif not info.db_path.is_file():
        info.status = "no data"
    return info


class _reader:
    def __init__(self, path: Path) -> None:
        self.conn = db.connect_reader(path)

    def __enter__(self) -> sqlite3.Connection:
        return self.conn

    def __exit__(self, *exc: object) -> None:
        self.conn.close()


def load_dynamics(db_path: Path, after_step: int = -1) -> pd.DataFrame:
    with _reader(db_path) as conn:
        columns, rows = db.read_dynamics(conn, after_step)
    return pd.DataFrame.from_records(rows, columns=columns)


def load_layers(
    db_path: Path, first_step: int | None = None, last_step: int | None = None
) -> pd.DataFrame:
    with _reader(db_path) as conn:
        columns, rows = db.read_layer_dynamics(conn, first_step, last_step)
    return pd.DataFrame.from_records(rows, columns=columns)


def experts_in(df: pd.DataFrame) -> list[int]:
    found = {int(m.group(1)) for c in df.columns if (m := EXPERT_COL_RE.match(c))}
    return sorted(found)


def diagnose_runs_dir(runs_dir: Path) -> Problem | None:
    if not runs_dir.is_dir():
        return Problem(
            "no_runs_dir",
            f"No runs folder at `{runs_dir}`.",
            "Start a run: `prismatic up` (or `prismatic collect` plus "
            "`prismatic train configs/default.yaml`), or pass `--runs-dir`.",
        )
    if not list_runs(runs_dir):
        return Problem(
            "no_runs",
            f"The runs folder `{runs_dir}` holds no run yet.",
            "Start a run with `prismatic up`; runs appear here as they start.",
        )
    return None


def diagnose_run(info: RunInfo, df: pd.DataFrame | None) -> Problem | None:
    """The design note's troubleshooting, matched to what is actually on disk."""
    if not info.db_path.is_file():
        return Problem(
            "no_db",
            f"Run `{info.run_hash}` has no `dynamics.db` yet.",
            "Is the collector running and the trainer pointed at it? Start "
            "`prismatic collect`, or replay the run's spool with "
            f"`prismatic collect --replay {info.path}`.",
        )
    try:
        with _reader(info.db_path) as conn:
            version = db.read_schema_version(conn)
    except sqlite3.Error as exc:
        return Problem(
            "unreadable",
            f"`{info.db_path}` cannot be read: {exc}.",
            "Check the file is a SQLite database written by `prismatic collect`.",
        )
    if version != db.SCHEMA_VERSION:
        return Problem(
            "unknown_schema",
            f"`{info.db_path}` has schema version {version!r}; this dashboard reads "
            f"version {db.SCHEMA_VERSION}.",
            "Open it with the prismatic version that wrote it, or re-collect the run "
            "from its spool with `prismatic collect --replay`.",
        )
    if df is None or df.empty:
        return Problem(
            "empty",
            f"Run `{info.run_hash}` has a database but no logged step yet.",
            "Gradient logging runs every `dynamics.log_freq` steps after backward(); "
            "wait for the first logged step, or check the trainer's output.",
        )
    return diagnose_rows(df)


def diagnose_rows(df: pd.DataFrame) -> Problem | None:
    norm_cols = [c for c in df.columns if c.endswith("_norm")]
    values = df[norm_cols].to_numpy(dtype=float) if norm_cols else np.empty((0, 0))
    finite = values[np.isfinite(values)]
    if norm_cols and finite.size and np.all(finite == 0):
        return Problem(
            "all_zero",
            "Every gradient norm is zero.",
            "The probe ran before `backward()` or after `optimizer.zero_grad()`: call "
            "it after backward(), before optimizer.step().",
        )
    experts = experts_in(df)
    if experts:
        last = df.iloc[-1]
        missing = [
            e
            for e in experts
            if pd.isna(last.get(db.expert_column(e, "top_norm")))
            and pd.isna(last.get(db.expert_column(e, "norm")))
        ]
        if missing:
            return Problem(
                "missing_experts",
                f"Expert(s) {', '.join(map(str, missing))} appear in earlier rows but "
                "not in the latest one.",
                "Every expert must be logged at every step: check the probe sees all "
                "experts (under top-k routing an expert with no tokens has no "
                "gradient).",
            )
    return None
