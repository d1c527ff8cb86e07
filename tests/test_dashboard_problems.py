"""Each no-data case, matched to what is on disk, shows its own message and its own fix."""

from __future__ import annotations

import sqlite3
import time

import pytest
from dashboard_fixtures import (
    APP,
    plotly_figures,
    step_row,
    synthetic_metrics,
    synthetic_rows,
    texts,
    write_run,
)
from streamlit.testing.v1 import AppTest

from collector.store import RunStore
from dashboard.serve import RUNS_DIR_ENV
from prismatic import db

RUN = "0123abcde"


def page(runs, monkeypatch) -> AppTest:
    monkeypatch.setenv(RUNS_DIR_ENV, str(runs))
    at = AppTest.from_file(str(APP), default_timeout=120).run()
    assert not at.exception, at.exception
    return at


def no_runs_folder(runs):
    pass


def empty_runs_folder(runs):
    runs.mkdir()


def run_without_database(runs):
    (runs / RUN).mkdir(parents=True)
    (runs / RUN / "config.yaml").write_text("name: dual-sided\n", encoding="utf-8")


def not_a_database(runs):
    (runs / RUN).mkdir(parents=True)
    (runs / RUN / db.DB_NAME).write_bytes(b"this is not sqlite" * 100)


def empty_table(runs):
    store = RunStore(runs / RUN)
    store.update_run(name="starting", status="live", last_seen=time.time())
    store.close()


def newer_schema(runs):
    write_run(runs, RUN, synthetic_rows(range(0, 100, 10)))
    # a newer collector recorded a migration this dashboard does not know
    with sqlite3.connect(runs / RUN / db.DB_NAME) as conn:
        conn.execute(
            "INSERT INTO schema_migrations VALUES (?, 'from the future', 0)",
            (db.SCHEMA_VERSION + 1,),
        )


def experts_missing_later(runs):
    rows = [step_row(s, synthetic_metrics(s, experts=3)) for s in range(0, 100, 10)]
    rows += [step_row(s, synthetic_metrics(s, experts=2)) for s in range(100, 150, 10)]
    write_run(runs, RUN, rows)


def all_norms_zero(runs):
    def zero(step, layers, experts, scale):
        metrics = synthetic_metrics(step, layers, experts, scale)
        for name in ("top_norm", "bottom_norm", "middle_norm", "norm"):
            metrics[name] = [[0.0] * experts for _ in range(layers)]
        return metrics

    write_run(runs, RUN, synthetic_rows(range(0, 100, 10), metrics=zero))


CASES = {
    # case: (make it, words of its message, words of its fix)
    "no runs folder": (no_runs_folder, "There is no runs folder", "--runs-dir"),
    "empty runs folder": (empty_runs_folder, "holds no run yet", "prismatic up"),
    "no dynamics.db": (run_without_database, "has no `dynamics.db`", "--replay"),
    "not a database": (not_a_database, "cannot be read as a SQLite database", "Move the file"),
    "empty table": (empty_table, "no logged step yet", "dynamics.log_freq"),
    "unknown schema": (newer_schema, "newer than the version", "Upgrade prismatic"),
    "experts missing": (experts_missing_later, "Expert(s) 2 of this run are missing", "tokens"),
    "all norms zero": (all_norms_zero, "Every gradient norm is zero", "before `optimizer.step()`"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_each_no_data_case_has_its_own_message_and_fix(case, tmp_path, monkeypatch):
    make, message, fix = CASES[case]
    runs = tmp_path / "runs"
    make(runs)
    at = page(runs, monkeypatch)
    warnings = [w.value for w in at.warning if w.value.startswith("**No data**")]
    assert len(warnings) == 1 and message in warnings[0]
    fixes = [i.value for i in at.info if i.value.startswith("**Fix:**")]
    assert len(fixes) == 1 and fix in fixes[0]
    # no other case's message shows
    others = [m for c, (_, m, _) in CASES.items() if c != case]
    assert not any(m in warnings[0] for m in others)


def test_cases_that_still_have_a_chart_draw_it_under_the_message(tmp_path, monkeypatch):
    runs = tmp_path / "runs"
    experts_missing_later(runs)
    at = page(runs, monkeypatch)
    assert len(plotly_figures(at)) == 1
    runs = tmp_path / "zero"
    all_norms_zero(runs)
    at = page(runs, monkeypatch)
    [figure] = plotly_figures(at)
    assert figure["data"] == []  # every value left out of the log axis, and said so
    assert "90 value(s) ≤ 0 left out" in texts(at.caption)  # 10 steps x 3 experts x 3 tiers


def test_a_broken_run_next_to_a_good_one_does_not_hide_the_good_one(tmp_path, monkeypatch):
    runs = tmp_path / "runs"
    run_without_database(runs)
    write_run(runs, "fedcba987", synthetic_rows(range(0, 100, 10)), name="good")
    at = page(runs, monkeypatch)
    at.sidebar.multiselect(key="open_runs").set_value([RUN, "fedcba987"]).run()
    assert len(plotly_figures(at)) == 1
    assert "has no `dynamics.db`" in texts(at.warning)
