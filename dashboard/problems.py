"""Why there is nothing (or nothing sensible) to chart, matched to what is on disk, with a fix.

The design note's troubleshooting, one `Problem` per case: no runs folder, no run in it, a run
without dynamics.db, a file that is not a readable database, a schema this page does not know,
an empty table, experts missing from later rows, all norms zero.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from dashboard.data import RunInfo, experts_in, list_runs, readable_schema, reader
from prismatic import db

# Problems after which the chart still has something to show (it is drawn under the message).
CHART_STILL_USEFUL = ("all_zero", "missing_experts")


@dataclass
class Problem:
    """What is wrong, in the user's terms, and what to do about it."""

    kind: str
    message: str
    fix: str


def diagnose_runs_dir(runs_dir: Path, runs: list[RunInfo] | None = None) -> Problem | None:
    """`runs`: the folder's runs when the caller has listed them already."""
    if not runs_dir.is_dir():
        return Problem(
            "no_runs_dir",
            f"There is no runs folder at `{runs_dir}`.",
            "Start a run with `prismatic up` (or `prismatic collect` plus "
            "`prismatic train configs/default.yaml`), or point the dashboard at your runs "
            "with `prismatic dashboard --runs-dir DIR`.",
        )
    if not (runs if runs is not None else list_runs(runs_dir)):
        return Problem(
            "no_runs",
            f"The runs folder `{runs_dir}` holds no run yet.",
            "Start a run with `prismatic up`; a run appears here as soon as the collector "
            "receives its first message.",
        )
    return None


def diagnose_run(info: RunInfo, df: pd.DataFrame | None) -> Problem | None:
    """The first thing wrong with one run, or None when its rows can be charted as they are."""
    if not info.db_path.is_file():
        return Problem(
            "no_db",
            f"Run `{info.run_hash}` has no `dynamics.db`: no message from its trainer has "
            "reached a collector.",
            "Start the collector (`prismatic collect --runs-dir ...` with the same runs "
            "folder) and check the trainer's `dynamics.collector` address; messages it sent "
            f"meanwhile are in its spool: `prismatic collect --replay {info.path}`.",
        )
    schema = _schema_problem(info)
    if schema is not None:
        return schema
    if df is None or df.empty:
        return Problem(
            "empty",
            f"Run `{info.run_hash}` has a database but no logged step yet.",
            "The probe logs every `dynamics.log_freq` steps, after backward(): wait for the "
            "first logged step. If none comes, the trainer is not calling the probe (see "
            "README, *Using the probe in your own training loop*).",
        )
    return diagnose_rows(df, info.experts)


def _schema_problem(info: RunInfo) -> Problem | None:
    try:
        with reader(info.db_path) as conn:
            version = db.read_schema_version(conn)
            tables = set(r[0] for r in conn.execute("SELECT name FROM sqlite_master"))
    except sqlite3.Error as exc:
        return Problem(
            "unreadable",
            f"`{info.db_path}` cannot be read as a SQLite database ({exc}).",
            "Move the file away and replay the run from its spool: "
            f"`prismatic collect --replay {info.path}`.",
        )
    if readable_schema(version) and "dynamics" in tables:
        return None
    if version is not None and version > db.SCHEMA_VERSION:
        return Problem(
            "unknown_schema",
            f"`{info.db_path}` has schema version {version}, newer than the version "
            f"{db.SCHEMA_VERSION} this dashboard reads.",
            "Upgrade prismatic here (`./dev setup` after pulling) to the version the collector "
            "runs.",
        )
    return Problem(
        "unknown_schema",
        f"`{info.db_path}` was not written by `prismatic collect`: it has no schema version "
        "this dashboard knows (e.g. the design note's hand-made `dynamics` table).",
        "Let the collector write it: move the file away and run `prismatic collect` with the "
        f"trainer, or replay the run's spool with `prismatic collect --replay {info.path}`.",
    )


def diagnose_rows(df: pd.DataFrame, expected_experts: int | None = None) -> Problem | None:
    norm_cols = [c for c in df.columns if c.startswith("expert_") and c.endswith("_norm")]
    values = df[norm_cols].to_numpy(dtype=float) if norm_cols else np.empty(0)
    finite = values[np.isfinite(values)]
    if finite.size and not np.any(finite):
        return Problem(
            "all_zero",
            "Every gradient norm is zero: the gradients were read when they were empty.",
            "Call the probe after `loss.backward()` and before `optimizer.step()` and "
            "`optimizer.zero_grad()` (with the Lightning callback: `on_before_optimizer_step`).",
        )
    missing = missing_experts(df, expected_experts)
    if missing:
        return Problem(
            "missing_experts",
            f"Expert(s) {', '.join(map(str, missing))} of this run are missing from the latest "
            "logged rows.",
            "Every expert must be probed at every logged step: check the probe finds all "
            "experts of each Prismatic layer, and under `topk` mixing that every expert gets "
            "tokens (an expert with no tokens has no gradient).",
        )
    return None


def missing_experts(df: pd.DataFrame, expected: int | None = None) -> list[int]:
    """Experts with values in earlier rows (or in the run's shape) but none in the last row."""
    present = experts_in(df)
    everyone = sorted(set(present) | set(range(expected or 0)))
    last = df.iloc[-1]
    return [
        e
        for e in everyone
        if not any(
            pd.notna(last.get(db.expert_column(e, m))) for m in ("top_norm", "bottom_norm", "norm")
        )
    ]
