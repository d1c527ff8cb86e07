"""The dashboard's reading side without a page: the incremental row cache, read-only access that
never blocks the collector, downsampling that keeps spikes, and the CSV of a chart."""

from __future__ import annotations

import io
import sqlite3
import time

import numpy as np
import pandas as pd
import pytest
from dashboard_fixtures import step_row, synthetic_metrics, synthetic_rows, write_run

from collector.store import RunStore
from dashboard import charts, data
from dashboard.cache import RunCache
from dashboard.sampling import downsample, finite_series
from prismatic import db


def add_steps(store: RunStore, steps, experts: int = 3, scale: float = 1.0) -> None:
    for step in steps:
        store.add_step(step_row(step, synthetic_metrics(step, experts=experts, scale=scale)))
    store.flush()


# --- the cache -----------------------------------------------------------------------------------


def test_a_refresh_reads_only_the_rows_it_lacks(tmp_path):
    store = RunStore(tmp_path / "aaaaaaaaa")
    add_steps(store, range(0, 400, 10))
    cache = RunCache()
    first = cache.rows(store.path)
    assert len(first) == 40 and cache.rows_read(store.path) == 40

    assert cache.rows(store.path) is first  # nothing committed: the held frame, no read
    add_steps(store, range(400, 450, 10))
    rows = cache.rows(store.path)
    assert cache.rows_read(store.path) == 5
    assert list(rows["step"]) == list(range(0, 450, 10))
    store.close()


def test_an_older_step_written_again_replaces_the_held_row(tmp_path):
    store = RunStore(tmp_path / "aaaaaaaaa")
    add_steps(store, range(0, 100, 10))
    cache = RunCache()
    cache.rows(store.path)
    store.add_step(step_row(30, synthetic_metrics(30), loss=123.0))  # a replayed step
    store.flush()
    rows = cache.rows(store.path)
    assert cache.rows_read(store.path) == 1
    assert len(rows) == 10 and list(rows["step"]) == sorted(rows["step"])
    assert rows.loc[rows["step"] == 30, "loss"].item() == 123.0
    store.close()


def test_a_column_added_mid_run_comes_with_the_next_read(tmp_path):
    store = RunStore(tmp_path / "aaaaaaaaa")
    add_steps(store, range(0, 50, 10), experts=2)
    cache = RunCache()
    assert data.experts_in(cache.rows(store.path)) == [0, 1]
    add_steps(store, range(50, 80, 10), experts=3)
    rows = cache.rows(store.path)
    assert data.experts_in(rows) == [0, 1, 2]
    column = rows[db.expert_column(2, "bottom_norm")]
    assert column.isna().sum() == 5 and column.notna().sum() == 3
    store.close()


def test_two_runs_never_share_an_entry(tmp_path):
    write_run(tmp_path, "aaaaaaaaa", synthetic_rows(range(0, 100, 10), scale=1.0))
    write_run(tmp_path, "bbbbbbbbb", synthetic_rows(range(0, 100, 10), scale=0.0))
    cache = RunCache()
    a = cache.rows(tmp_path / "aaaaaaaaa" / db.DB_NAME)
    b = cache.rows(tmp_path / "bbbbbbbbb" / db.DB_NAME)
    column = db.expert_column(1, "bottom_norm")
    assert not np.allclose(a[column], b[column])
    assert cache.rows(tmp_path / "aaaaaaaaa" / db.DB_NAME) is a


def test_layer_rows_follow_incrementally(tmp_path):
    store = RunStore(tmp_path / "aaaaaaaaa")
    add_steps(store, range(0, 50, 10))
    cache = RunCache()
    cache.rows(store.path)
    assert len(cache.layers(store.path)) == 5 * 2 * 3  # steps x layers x experts
    add_steps(store, range(50, 70, 10))
    cache.rows(store.path)
    layers = cache.layers(store.path)
    assert cache.rows_read(store.path, "layers") == 2 * 2 * 3
    assert sorted(layers["step"].unique()) == list(range(0, 70, 10))
    store.close()


# --- read-only access ----------------------------------------------------------------------------


def test_the_dashboard_cannot_write(tmp_path):
    path = write_run(tmp_path, "aaaaaaaaa", synthetic_rows(range(0, 50, 10))) / db.DB_NAME
    with data.reader(path) as conn, pytest.raises(sqlite3.OperationalError, match="readonly"):
        conn.execute("DELETE FROM dynamics")


def test_a_reader_in_the_middle_of_a_read_does_not_block_the_collector(tmp_path):
    store = RunStore(tmp_path / "aaaaaaaaa")
    add_steps(store, range(0, 50, 10))
    with data.reader(store.path) as conn:
        conn.execute("BEGIN")
        held = conn.execute("SELECT count(*) FROM dynamics").fetchone()[0]
        started = time.monotonic()
        add_steps(store, range(50, 100, 10))  # commits while the read is still open
        assert time.monotonic() - started < db.BUSY_TIMEOUT_MS / 1000
        assert conn.execute("SELECT count(*) FROM dynamics").fetchone()[0] == held == 5
        conn.execute("COMMIT")
    assert len(data.load_dynamics(store.path)) == 10
    store.close()


# --- downsampling and CSV ------------------------------------------------------------------------


def test_downsampling_keeps_every_bucket_min_and_max():
    rng = np.random.default_rng(0)
    x = np.arange(100_000)
    y = rng.uniform(1.0, 2.0, size=x.size)
    y[[17, 50_003, 99_999]] = [100.0, 1e-9, 55.0]
    xs, ys = downsample(x, y)
    assert len(xs) <= 2000 and np.all(np.diff(xs) > 0)
    assert {17, 50_003, 99_999} <= set(xs.tolist())
    assert ys.max() == 100.0 and ys.min() == 1e-9
    short_x, short_y = downsample(x[:500], y[:500])
    assert len(short_x) == 500


def test_finite_series_drops_nan_and_counts_values_a_log_axis_cannot_show():
    steps = np.arange(6)
    values = np.array([1.0, 0.0, np.nan, -2.0, 3.0, np.inf])
    x, y, left_out = finite_series(steps, values, log_axis=True)
    assert list(x) == [0, 4] and left_out == 2
    x, y, left_out = finite_series(steps, values, log_axis=False)
    assert list(x) == [0, 1, 3, 4] and left_out == 0


def test_chart_csv_holds_what_the_chart_shows(tmp_path):
    path = write_run(tmp_path, "aaaaaaaaa", synthetic_rows(range(0, 50, 10))) / db.DB_NAME
    rows = data.load_dynamics(path)
    fig, _ = charts.dynamics_figure(rows, [0, 1], ["bottom"])
    csv = pd.read_csv(io.StringIO(charts.figure_csv(fig)))
    assert list(csv.columns) == ["series", "step", "value"]
    assert set(csv["series"]) == {"expert 0 (clean) bottom 5%", "expert 1 (perturbed) bottom 5%"}
    mine = csv[csv["series"] == "expert 1 (perturbed) bottom 5%"]
    assert np.allclose(mine["value"], rows[db.expert_column(1, "bottom_norm")])
    assert list(mine["step"]) == list(range(0, 50, 10))


def test_one_layer_in_the_wide_shape(tmp_path):
    path = write_run(tmp_path, "aaaaaaaaa", synthetic_rows(range(0, 30, 10))) / db.DB_NAME
    wide = data.layer_wide(data.load_layers(path), 1)
    assert list(wide["step"]) == [0, 10, 20]
    expected = synthetic_metrics(10)["bottom_norm"][1][2]
    assert wide.loc[1, db.expert_column(2, "bottom_norm")] == pytest.approx(expected)
    assert db.expert_column(0, "divergence") not in wide.columns


def test_layer_chart_csv_names_each_layer(tmp_path):
    from dashboard import figures

    path = write_run(tmp_path, "aaaaaaaaa", synthetic_rows(range(0, 30, 10))) / db.DB_NAME
    fig, _ = figures.layers_figure(data.load_layers(path), [0, 1], ["bottom"])
    csv = pd.read_csv(io.StringIO(charts.figure_csv(fig)))
    assert "layer 1 expert 2 (perturbed) bottom 5%" in set(csv["series"])
    assert len(set(csv["series"])) == 6  # 2 layers x 3 experts


@pytest.mark.parametrize("n_rows", [0, 1, 7, 8, 9, 25])
def test_a_chunked_read_equals_a_whole_read(n_rows):
    conn = sqlite3.connect(":memory:")
    conn.execute("CREATE TABLE t (step INTEGER, a REAL, b REAL)")
    rows = [(s, s / 3, None if s % 4 == 0 else -s) for s in range(n_rows)]
    conn.executemany("INSERT INTO t VALUES (?, ?, ?)", rows)
    chunked, n_read = data.frame_of(conn.execute("SELECT * FROM t ORDER BY step"), chunk_rows=8)
    whole = data.frame(["step", "a", "b"], rows)
    assert n_read == n_rows
    assert chunked["step"].dtype == np.int64
    pd.testing.assert_frame_equal(chunked, whole, check_dtype=False)
    assert int(chunked["b"].isna().sum()) == (n_rows + 3) // 4  # NULL -> NaN


def test_a_text_value_in_a_later_chunk_reads_every_row_the_general_way():
    conn = sqlite3.connect(":memory:")
    conn.execute("CREATE TABLE t (step INTEGER, a)")
    conn.executemany("INSERT INTO t VALUES (?, ?)", [(s, float(s)) for s in range(20)])
    conn.execute("INSERT INTO t VALUES (20, 'oops')")
    out, n_read = data.frame_of(conn.execute("SELECT * FROM t ORDER BY step"), chunk_rows=8)
    assert n_read == 21 and list(out["step"]) == list(range(21))
    assert out["a"].iloc[20] == "oops" and float(out["a"].iloc[3]) == 3.0


def test_log_ticks_are_1_2_5_per_decade_with_whole_labels_and_only_powers_when_wide():
    import numpy as np

    from dashboard.charts import log_axis

    narrow = log_axis([np.array([0.03, 0.7]), np.array([np.nan, 0.0, 3.0])])
    assert narrow["type"] == "log"
    assert narrow["ticktext"][:6] == ["0.01", "0.02", "0.05", "0.1", "0.2", "0.5"]
    assert len(narrow["tickvals"]) == len(narrow["ticktext"]) == 12  # 0.01 .. 50
    wide = log_axis([np.array([2e-7, 30.0])])
    assert wide["ticktext"] == ["1e-7", "1e-6", "1e-5", "1e-4", "0.001", "0.01", "0.1", "1"] + [
        "10",
        "100",
    ]
    assert log_axis([np.array([0.0, -1.0, np.nan])]) == {"type": "log"}  # nothing to place
