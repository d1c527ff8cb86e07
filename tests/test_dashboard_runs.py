"""The run browser: every run with its hash, name, strategy, scale, sparsity, mixing, status
(live, completed, failed, stale), steps logged and last update; sort, filter, open several."""

from __future__ import annotations

import time

import pytest
from dashboard_fixtures import APP, plotly_figures, synthetic_rows, write_run
from streamlit.testing.v1 import AppTest

from dashboard import data
from dashboard.serve import RUNS_DIR_ENV

RUNS = {
    # hash: (name, strategy, scale, sparsity, mixing, status in the db, last seen s ago, steps)
    "111111111": ("dual-sided", "dual_sided", 1.0, 0.1, "outputs", "live", 0, 30),
    "222222222": ("control", "dual_sided", 0.0, 0.1, "outputs", "completed", 900, 50),
    "333333333": ("aggressive", "dual_sided", 2.0, 0.1, "topk", "failed", 600, 10),
    "444444444": ("top-only", "top_only", 1.0, 0.2, "smear", "live", 3600, 20),
}
# When each run was last seen, as the fixture wrote it: relative to the test, not to collection
# (a "live" run written at import time is stale by the time a slow suite reaches this file).
LAST_SEEN: dict[str, float] = {}
EXPECTED_STATUS = {
    "111111111": "live",
    "222222222": "completed",
    "333333333": "failed",
    "444444444": "stale",  # the database says live, but nothing came for an hour
}


@pytest.fixture
def runs(tmp_path):
    folder = tmp_path / "runs"
    now = time.time()
    for run_hash, (name, strategy, scale, sparsity, mixing, status, ago, n) in RUNS.items():
        LAST_SEEN[run_hash] = now - ago
        write_run(
            folder,
            run_hash,
            synthetic_rows(range(0, 10 * n, 10)),
            name=name,
            strategy=strategy,
            scale=scale,
            sparsity=sparsity,
            mixing=mixing,
            status=status,
            last_seen=LAST_SEEN[run_hash],
        )
    return folder


def browser(runs, monkeypatch) -> AppTest:
    monkeypatch.setenv(RUNS_DIR_ENV, str(runs))
    at = AppTest.from_file(str(APP), default_timeout=120).run()
    at.radio(key="view").set_value("Run browser").run()
    assert not at.exception, at.exception
    return at


def table(at: AppTest):
    [shown] = [d.value for d in at.dataframe]
    return shown


def test_every_run_is_listed_with_its_columns_and_status(runs, monkeypatch):
    shown = table(browser(runs, monkeypatch))
    assert list(shown.columns) == [
        "hash",
        "name",
        "strategy",
        "scale",
        "sparsity",
        "mixing",
        "status",
        "steps logged",
        "last update",
    ]
    rows = {r["hash"]: r for r in shown.to_dict("records")}
    assert set(rows) == set(RUNS)
    for run_hash, (name, strategy, scale, sparsity, mixing, _, _, n) in RUNS.items():
        row = rows[run_hash]
        assert (row["name"], row["strategy"], row["mixing"]) == (name, strategy, mixing)
        assert (row["scale"], row["sparsity"], row["steps logged"]) == (scale, sparsity, n)
        assert row["status"] == EXPECTED_STATUS[run_hash]
        assert abs(row["last update"].timestamp() - LAST_SEEN[run_hash]) < 1


def test_default_sort_is_newest_first_and_other_sorts_apply(runs, monkeypatch):
    at = browser(runs, monkeypatch)
    assert list(table(at)["hash"]) == ["111111111", "333333333", "222222222", "444444444"]
    at.sidebar.selectbox(key="sort").set_value("steps logged").run()
    at.sidebar.toggle(key="descending").set_value(False).run()
    assert list(table(at)["steps logged"]) == [10, 20, 30, 50]
    at.sidebar.selectbox(key="sort").set_value("scale").run()
    assert list(table(at)["scale"]) == [0.0, 1.0, 1.0, 2.0]


def test_filter_by_text_and_by_status(runs, monkeypatch):
    at = browser(runs, monkeypatch)
    at.sidebar.text_input(key="filter").input("ONLY").run()
    assert list(table(at)["hash"]) == ["444444444"]
    at.sidebar.text_input(key="filter").input("").run()
    at.sidebar.multiselect(key="statuses").set_value(["live", "stale"]).run()
    assert set(table(at)["hash"]) == {"111111111", "444444444"}
    # the filter also narrows what can be opened
    assert set(at.sidebar.multiselect(key="open_runs").options) == {
        at.sidebar.multiselect(key="open_runs").format_func(h) for h in ("111111111", "444444444")
    }


def test_open_one_run_by_default_or_several_to_compare(runs, monkeypatch):
    at = browser(runs, monkeypatch)
    assert at.sidebar.multiselect(key="open_runs").value == ["111111111"]
    at.radio(key="view").set_value("Dynamics").run()
    assert len(plotly_figures(at)) == 1
    at.sidebar.multiselect(key="open_runs").set_value(["111111111", "222222222"]).run()
    assert len(plotly_figures(at)) == 2  # one Dynamics chart per opened run
    at.radio(key="view").set_value("Compare").run()
    [figure] = plotly_figures(at)
    names = {t["name"] for t in figure["data"]}
    assert any("(11111)" in n for n in names) and any("(22222)" in n for n in names)


def test_sort_and_filter_functions_keep_runs_without_a_value_last(tmp_path):
    a = data.RunInfo("aaaaaaaaa", tmp_path, name="b", scale=1.0, last_update=5.0)
    b = data.RunInfo("bbbbbbbbb", tmp_path, name="a", scale=None, last_update=None)
    c = data.RunInfo("ccccccccc", tmp_path, name="c", scale=0.0, last_update=9.0)
    assert data.sort_runs([a, b, c], "scale", descending=False) == [c, a, b]
    assert data.sort_runs([a, b, c], "scale", descending=True) == [a, c, b]
    assert data.sort_runs([a, b, c], "last update") == [c, a, b]
    assert data.filter_runs([a, b, c], "CCC") == [c]
    assert data.filter_runs([a, b, c], statuses=["live"]) == []
