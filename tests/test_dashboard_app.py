"""The dashboard page through Streamlit's AppTest, on runs written by the collector's RunStore:
the Dynamics chart (log axis, traces per expert and tier, colours, tier toggles, hover, values
<= 0), the header, the smear warning, the other views, comparing runs, and a column that the
collector adds while the page is open."""

from __future__ import annotations

import colorsys
import time

import numpy as np
import pytest
from dashboard_fixtures import (
    APP,
    KNOWN_STEPS,
    known_rows,
    known_value,
    plotly_figures,
    step_row,
    synthetic_metrics,
    synthetic_rows,
    texts,
    trace_names,
    values,
    write_run,
)
from streamlit.testing.v1 import AppTest

from collector.store import RunStore
from dashboard.serve import RUNS_DIR_ENV

RUN_A, RUN_B, RUN_C = "aaaaaaaa1", "bbbbbbbb2", "cccccccc3"
TIER_NAMES = ("top 5%", "bottom 5%", "middle 90%")


def open_page(runs_dir, monkeypatch) -> AppTest:
    monkeypatch.setenv(RUNS_DIR_ENV, str(runs_dir))
    at = AppTest.from_file(str(APP), default_timeout=120).run()
    assert not at.exception, at.exception
    return at


def switch(at: AppTest, view: str) -> AppTest:
    at.radio(key="view").set_value(view).run()
    assert not at.exception, at.exception
    return at


def dynamics_figure(at: AppTest) -> dict:
    [figure] = plotly_figures(at)
    return figure


@pytest.fixture
def known(tmp_path):
    runs = tmp_path / "runs"
    write_run(runs, RUN_A, known_rows(), name="known")
    return runs


# --- the Dynamics chart (issue 2 and issue 5) ----------------------------------------------------


def test_chart_is_drawn_with_a_log_y_axis_and_a_trace_per_expert_and_tier(known, monkeypatch):
    at = open_page(known, monkeypatch)
    figure = dynamics_figure(at)
    assert figure["layout"]["yaxis"]["type"] == "log"
    # 1, 2 and 5 of each decade, each labelled with its whole value (0.2, not "2")
    axis = figure["layout"]["yaxis"]
    labels = dict(zip(values(axis["tickvals"]), axis["ticktext"], strict=True))
    assert labels[0.2] == "0.2" and labels[0.5] == "0.5" and labels[1.0] == "1"
    assert set(values(axis["tickvals"])) >= {0.1, 0.2, 0.5, 1.0, 2.0, 5.0}
    expected = [
        f"expert {e} ({'clean' if e == 0 else 'perturbed'}) {tier}"
        for e in range(3)
        for tier in TIER_NAMES
    ]
    assert trace_names(figure) == expected
    steps = values(figure["data"][0]["x"])
    assert list(steps) == KNOWN_STEPS
    # the expert 1 bottom line carries the stored layer means
    bottom_1 = values(figure["data"][4]["y"])
    assert np.allclose(bottom_1, [known_value("bottom_norm", 1, s) for s in KNOWN_STEPS])


def test_a_page_run_lists_the_runs_folder_once(known, monkeypatch):
    """Listing opens every run's database: the page, its problem check and the Dynamics view's
    search for a control share one listing."""
    from dashboard import data

    calls = []
    real = data.list_runs

    def counted(folder):
        calls.append(folder)
        return real(folder)

    monkeypatch.setattr(data, "list_runs", counted)
    at = open_page(known, monkeypatch)
    calls.clear()
    at.run()  # a rerun of the Dynamics view, with the run opened
    assert not at.exception, at.exception
    assert dynamics_figure(at)
    assert len(calls) == 1


def test_a_linked_run_that_does_not_exist_is_named_and_the_newest_opened(known, monkeypatch):
    monkeypatch.setenv(RUNS_DIR_ENV, str(known))
    at = AppTest.from_file(str(APP), default_timeout=120)
    at.query_params["run"] = "zzzzzzzzz"
    at.run()
    assert not at.exception, at.exception
    [warning] = [w.value for w in at.warning if "zzzzzzzzz" in w.value]
    assert warning == (
        f"No run `zzzzzzzzz` in `{known}` (asked for by `?run=`); opened the newest run instead."
    )
    assert at.multiselect(key="open_runs").value == [RUN_A]


def test_empty_runs_folder_shows_the_no_data_help(tmp_path, monkeypatch):
    runs = tmp_path / "runs"
    runs.mkdir()
    at = open_page(runs, monkeypatch)
    assert "holds no run yet" in texts(at.warning)
    assert "prismatic up" in texts(at.info)
    assert not plotly_figures(at)


def _hue_degrees(colour: str) -> float:
    r, g, b = (int(colour[i : i + 2], 16) / 255 for i in (1, 3, 5))
    return colorsys.rgb_to_hls(r, g, b)[0] * 360


def _lightness(colour: str) -> float:
    r, g, b = (int(colour[i : i + 2], 16) / 255 for i in (1, 3, 5))
    return colorsys.rgb_to_hls(r, g, b)[1]


def test_colours_blue_for_expert_0_red_orange_for_perturbed_each_expert_apart(known, monkeypatch):
    figure = dynamics_figure(open_page(known, monkeypatch))
    line = {t["name"]: t["line"] for t in figure["data"]}
    clean = {tier: line[f"expert 0 (clean) {tier}"]["color"] for tier in TIER_NAMES}
    assert all(190 <= _hue_degrees(c) <= 230 for c in clean.values())
    # light = top, medium = bottom, dark = middle
    assert _lightness(clean["top 5%"]) > _lightness(clean["bottom 5%"])
    assert _lightness(clean["bottom 5%"]) > _lightness(clean["middle 90%"])
    for e in (1, 2):
        for tier in TIER_NAMES:
            hue = _hue_degrees(line[f"expert {e} (perturbed) {tier}"]["color"])
            assert hue <= 40 or hue >= 340, (e, tier, hue)
    looks = {(s["color"], s["dash"]) for s in line.values()}
    assert len(looks) == len(line)
    # each expert has a dash of its own, so experts stay apart even without colour
    dashes = {
        e: {line[f"expert {e} ({r}) {t}"]["dash"] for t in TIER_NAMES}
        for e, r in ((0, "clean"), (1, "perturbed"), (2, "perturbed"))
    }
    assert all(len(d) == 1 for d in dashes.values())
    assert len({d.pop() for d in dashes.values()}) == 3


def test_tier_toggles_and_whole_norm_change_the_traces(known, monkeypatch):
    at = open_page(known, monkeypatch)
    at.sidebar.checkbox(key="tier_top").uncheck().run()
    names = trace_names(dynamics_figure(at))
    assert len(names) == 6 and not any("top 5%" in n for n in names)
    at.sidebar.checkbox(key="whole").check().run()
    names = trace_names(dynamics_figure(at))
    assert sum("whole" in n for n in names) == 3


def test_hover_shows_each_value_to_six_significant_digits(known, monkeypatch):
    figure = dynamics_figure(open_page(known, monkeypatch))
    for trace in figure["data"]:
        assert trace["hovertemplate"] == f"{trace['name']}: %{{y:.6g}}<extra></extra>"
    assert figure["layout"]["hovermode"] == "x unified"


def test_values_at_or_below_zero_are_left_out_and_counted(tmp_path, monkeypatch):
    runs = tmp_path / "runs"
    rows = []
    for step in range(0, 200, 10):
        metrics = synthetic_metrics(step)
        if step in (50, 60, 70):
            metrics["bottom_norm"] = [[m[0], 0.0, m[2]] for m in metrics["bottom_norm"]]
        rows.append(step_row(step, metrics))
    write_run(runs, RUN_A, rows)
    at = open_page(runs, monkeypatch)
    figure = dynamics_figure(at)
    bottom_1 = next(t for t in figure["data"] if t["name"] == "expert 1 (perturbed) bottom 5%")
    assert len(values(bottom_1["x"])) == 17
    caption = texts(at.caption)
    assert "3 value(s) ≤ 0 left out" in caption
    assert "expert 1 (perturbed) bottom 5%: 3" in caption


def test_long_runs_are_downsampled_on_the_server_and_keep_their_spikes(tmp_path, monkeypatch):
    runs = tmp_path / "runs"
    spikes = {1234: 50.0, 4321: 1e-6}

    def rows():
        for step in range(6000):
            metrics = synthetic_metrics(step)
            if step in spikes:
                metrics["bottom_norm"] = [
                    [m[0], spikes[step], m[2]] for m in metrics["bottom_norm"]
                ]
            yield step_row(step, metrics)

    write_run(runs, RUN_A, rows())
    figure = dynamics_figure(open_page(runs, monkeypatch))
    bottom_1 = next(t for t in figure["data"] if t["name"] == "expert 1 (perturbed) bottom 5%")
    x, y = values(bottom_1["x"]), values(bottom_1["y"])
    assert len(x) <= 2000
    for step, value in spikes.items():
        assert value in y and step in x


# --- header and smear ----------------------------------------------------------------------------


def test_header_shows_latest_and_recent_divergence_coloured_by_threshold(known, monkeypatch):
    at = open_page(known, monkeypatch)
    line = next(m.value for m in at.markdown if m.value.startswith("**Divergence**"))
    # expert 1 at step 390: 0.2 - 0.039 = 0.161; recent window (steps 300..390) mean 0.1655
    assert "expert 1: latest :green[**0.1610**], recent mean :green[**0.1655**]" in line
    # expert 2: 0.03 + 0.0078 = 0.0378 latest, 0.0369 recent: between the thresholds
    assert "expert 2: latest :orange[**0.0378**], recent mean :orange[**0.0369**]" in line
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["steps logged"] == "40"
    assert metrics["last step"] == "390"
    assert metrics["experts"] == "3" and metrics["layers"] == "2"
    assert metrics["mixing"] == "outputs"
    assert "smear" not in texts(at.warning)


def test_converging_divergence_is_red(tmp_path, monkeypatch):
    runs = tmp_path / "runs"
    write_run(runs, RUN_A, synthetic_rows(range(0, 400, 10), scale=0.05))
    at = open_page(runs, monkeypatch)
    line = next(m.value for m in at.markdown if m.value.startswith("**Divergence**"))
    assert "recent mean :red[" in line and "(converging)" in line


def test_smear_mixing_says_divergence_is_zero_by_construction(tmp_path, monkeypatch):
    runs = tmp_path / "runs"
    write_run(runs, RUN_A, synthetic_rows(range(0, 200, 10)), mixing="smear")
    at = open_page(runs, monkeypatch)
    assert "zero by construction" in texts(at.warning)
    assert "not-applicable" not in texts(at.markdown)
    assert texts(at.markdown).count("-badge[not applicable]") == 2


# --- the other views -----------------------------------------------------------------------------


def test_divergence_view_is_linear_with_the_thresholds(known, monkeypatch):
    at = switch(open_page(known, monkeypatch), "Divergence")
    divergence, drift = plotly_figures(at)
    assert divergence["layout"]["yaxis"]["type"] == "linear"
    assert trace_names(divergence) == ["expert 1 divergence", "expert 2 divergence"]
    lines = sorted(s["y0"] for s in divergence["layout"]["shapes"])
    assert lines == [0.01, 0.05]
    assert np.allclose(values(divergence["data"][0]["y"]), [0.2 - 0.0001 * s for s in KNOWN_STEPS])
    assert trace_names(drift) == ["expert 1 weight drift", "expert 2 weight drift"]


def test_routing_and_loss_views(tmp_path, monkeypatch):
    runs = tmp_path / "runs"
    write_run(runs, RUN_A, synthetic_rows(range(0, 300, 10)))
    at = switch(open_page(runs, monkeypatch), "Routing")
    [routing] = plotly_figures(at)
    assert trace_names(routing) == [f"expert {e} routing" for e in range(3)]
    assert np.allclose(values(routing["data"][1]["y"]), 1 / 3)
    at = switch(at, "Loss")
    [loss] = plotly_figures(at)
    assert trace_names(loss) == ["loss", "validation loss"]
    assert list(values(loss["data"][1]["x"])) == list(range(0, 300, 50))


def test_layers_view_shows_one_layer_or_all(known, monkeypatch):
    at = switch(open_page(known, monkeypatch), "Layers")
    [every] = plotly_figures(at)
    layers = [t["meta"] for t in every["data"]]
    assert layers.count("layer 0") == layers.count("layer 1") == 9
    # one legend entry per expert and tier, toggling it in every layer
    shown = [t["name"] for t in every["data"] if t.get("showlegend", True)]
    assert len(shown) == 9 and "expert 1 (perturbed) bottom 5%" in shown
    at.sidebar.selectbox(key="layer").set_value(1).run()
    [one] = plotly_figures(at)
    assert {t["meta"] for t in one["data"]} == {"layer 1"}
    bottom_1 = next(t for t in one["data"] if t["name"] == "expert 1 (perturbed) bottom 5%")
    assert bottom_1["hovertemplate"].startswith("layer 1 expert 1 (perturbed) bottom 5%: ")
    # layer 1 holds 1.5 x the layer mean by construction
    expected = [1.5 * known_value("bottom_norm", 1, s) for s in KNOWN_STEPS]
    assert np.allclose(values(bottom_1["y"]), expected)


def test_heatmap_shows_window_means_per_layer_expert_and_tier(known, monkeypatch):
    at = switch(open_page(known, monkeypatch), "Heatmap")
    at.sidebar.slider(key="window").set_value((100, 190)).run()
    [figure] = plotly_figures(at)
    heatmap = figure["data"][0]
    assert heatmap["y"] == ["layer 0", "layer 1"]
    assert heatmap["x"][:3] == ["expert 0 top 5%", "expert 0 bottom 5%", "expert 0 middle 90%"]
    means = values(heatmap["customdata"]).reshape(2, 9)
    window = range(100, 200, 10)
    for layer, factor in ((0, 0.5), (1, 1.5)):
        expected = factor * np.mean([known_value("bottom_norm", 2, s) for s in window])
        assert means[layer, heatmap["x"].index("expert 2 bottom 5%")] == pytest.approx(expected)
    assert "steps 100–190" in figure["layout"]["title"]["text"]


def test_every_chart_has_a_csv_download(known, monkeypatch):
    at = open_page(known, monkeypatch)
    for view, charts in (("Dynamics", 1), ("Divergence", 2), ("Heatmap", 1), ("Loss", 1)):
        switch(at, view)
        assert len(at.get("download_button")) == charts == len(plotly_figures(at))


def test_comparing_two_runs_draws_two_different_curves_on_shared_axes(tmp_path, monkeypatch):
    runs = tmp_path / "runs"
    write_run(runs, RUN_A, synthetic_rows(range(0, 300, 10), scale=1.0), name="dual")
    write_run(runs, RUN_B, synthetic_rows(range(0, 300, 10), scale=0.0), name="control", scale=0)
    at = open_page(runs, monkeypatch)
    at.sidebar.multiselect(key="open_runs").set_value([RUN_A, RUN_B]).run()
    switch(at, "Compare")
    at.sidebar.selectbox(key="compare_metric").set_value("bottom 5% norm").run()
    [figure] = plotly_figures(at)
    by_name = {t["name"]: values(t["y"]) for t in figure["data"]}
    dual = by_name[f"dual s=1 ({RUN_A[:5]}) · expert 1"]
    control = by_name[f"control s=0 ({RUN_B[:5]}) · expert 1"]
    assert len(dual) == len(control) == 30
    assert np.all(dual > control)
    assert figure["layout"]["yaxis"]["type"] == "log"
    assert len(figure["data"]) == 6  # two runs x three experts, one figure


# --- live ----------------------------------------------------------------------------------------


def test_new_rows_and_a_new_expert_column_appear_without_a_restart(tmp_path, monkeypatch):
    runs = tmp_path / "runs"
    store = RunStore(runs / RUN_A)
    store.update_run(name="growing", status="live", last_seen=time.time(), model={"layers": 2})
    for step in range(0, 100, 10):
        store.add_step(step_row(step, synthetic_metrics(step, experts=2)))
    store.flush()
    at = open_page(runs, monkeypatch)
    assert not any("expert 2" in n for n in trace_names(dynamics_figure(at)))

    # the collector sees a third expert: RunStore adds its columns mid-run
    for step in range(100, 150, 10):
        store.add_step(step_row(step, synthetic_metrics(step, experts=3)))
    store.update_run(last_seen=time.time())
    store.flush()
    at.run()
    names = trace_names(dynamics_figure(at))
    assert "expert 2 (perturbed) bottom 5%" in names
    assert {m.label: m.value for m in at.metric}["last step"] == "140"
    store.close()


def test_a_live_run_refreshes_in_place_until_it_ends(tmp_path, monkeypatch):
    runs = tmp_path / "runs"
    store = RunStore(runs / RUN_A)
    store.update_run(name="running", status="live", last_seen=time.time(), model={"layers": 2})
    add = [step_row(s, synthetic_metrics(s)) for s in range(0, 100, 10)]
    for row in add:
        store.add_step(row)
    store.flush()
    at = open_page(runs, monkeypatch)
    assert "Live: refreshes in place every 3 s" in texts(at.caption)
    store.update_run(status="completed", last_seen=time.time())
    store.flush()
    at.run()
    assert "Live:" not in texts(at.caption)
    assert "completed" in texts(at.subheader)
    store.close()
