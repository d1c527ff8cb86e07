"""The verdict panel on a known-answer run: every number it shows equals a value worked out here
from how the run was built (tests/dashboard_fixtures.py: known_value), without dashboard.verdict.

The run: 40 logged steps 0, 10, ..., 390; the first and the recent window are the first and the
last quarter of them (10 steps each: 0..90 and 300..390, mean steps 45 and 345).
- bottom norm of expert k = (0.5 + 0.001 step) x (1.0, 3.0, 1.2)[k]: ratios 3.0 and 1.2 exactly.
- divergence: expert 1 = 0.2 - 0.0001 step, expert 2 = 0.03 + 0.00002 step: a window's mean is
  the value at its mean step, the slopes are -0.1 and +0.02 per 1,000 steps.
- weight drift: 0.01 k + 0.00005 step: slope 0.05 per 1,000 steps for both.
"""

from __future__ import annotations

import time

import pandas as pd
import pytest
from dashboard_fixtures import (
    APP,
    KNOWN_STEPS,
    known_rows,
    plotly_figures,
    step_row,
    synthetic_metrics,
    synthetic_rows,
    texts,
    trace_names,
    write_run,
)
from streamlit.testing.v1 import AppTest

from dashboard import verdict
from dashboard.serve import RUNS_DIR_ENV

RUN = "abcdef123"
QUESTION_1, QUESTION_2, QUESTION_3 = verdict.QUESTIONS
EXPECTED = {
    (QUESTION_1, 0, "recent bottom norm"): 0.5 + 0.345,
    (QUESTION_1, 1, "recent bottom norm"): 3.0 * (0.5 + 0.345),
    (QUESTION_1, 1, "bottom ratio"): 3.0,
    (QUESTION_1, 2, "bottom ratio"): 1.2,
    (QUESTION_2, 1, "recent divergence"): 0.2 - 0.0345,
    (QUESTION_2, 2, "recent divergence"): 0.03 + 0.0069,
    (QUESTION_2, 1, "latest divergence"): 0.2 - 0.039,
    (QUESTION_2, 2, "latest divergence"): 0.03 + 0.0078,
    (QUESTION_3, 1, "first-window divergence"): 0.2 - 0.0045,
    (QUESTION_3, 2, "first-window divergence"): 0.03 + 0.0009,
    (QUESTION_3, 1, "divergence slope per 1k steps"): -0.1,
    (QUESTION_3, 2, "divergence slope per 1k steps"): 0.02,
    (QUESTION_3, 1, "weight drift slope per 1k steps"): 0.05,
    (QUESTION_3, 2, "weight drift slope per 1k steps"): 0.05,
}


def page(runs, monkeypatch) -> AppTest:
    monkeypatch.setenv(RUNS_DIR_ENV, str(runs))
    at = AppTest.from_file(str(APP), default_timeout=120).run()
    assert not at.exception, at.exception
    return at


def numbers_table(at: AppTest) -> pd.DataFrame:
    [table] = [t.value for t in at.table if "quantity" in t.value.columns]
    return table


def test_verdict_numbers_equal_the_values_known_by_construction(tmp_path, monkeypatch):
    write_run(tmp_path / "runs", RUN, known_rows())
    table = numbers_table(page(tmp_path / "runs", monkeypatch))
    shown = {(r.question, r.expert, r.quantity): r.value for r in table.itertuples()}
    for key, expected in EXPECTED.items():
        assert shown[key] == pytest.approx(expected, rel=1e-9, abs=1e-12), key


def test_verdict_answers_and_their_sentences(tmp_path, monkeypatch):
    write_run(tmp_path / "runs", RUN, known_rows())
    markdown = texts(page(tmp_path / "runs", monkeypatch).markdown)
    # 3.0x wakes up, 1.2x does not: mixed
    assert f"**{QUESTION_1}** :orange-badge[mixed]" in markdown
    assert "expert 1: 3.00×, expert 2: 1.20×" in markdown
    # 0.1655 is meaningful, 0.0369 is between the thresholds: mixed
    assert f"**{QUESTION_2}** :orange-badge[mixed]" in markdown
    assert "expert 1: 0.1655 (meaningful), expert 2: 0.0369 (weak)" in markdown
    # expert 1 keeps 0.1655 / 0.1955 = 85 % of its first window, expert 2 rises: sustained
    assert f"**{QUESTION_3}** :green-badge[sustained]" in markdown
    assert "expert 1: 0.1955 → 0.1655, slope -0.1000/1k steps" in markdown


def test_collapse_to_consensus_is_called_collapsing(tmp_path, monkeypatch):
    # divergence falls from 0.2 to 0.002 by step 250 (recent window < 0.01), both experts
    rows = []
    for step in range(0, 400, 10):
        metrics = synthetic_metrics(step)
        value = 0.2 * max(0.0, 1 - step / 250) + 0.002
        metrics["divergence"] = [[None, value, value] for _ in metrics["divergence"]]
        rows.append(step_row(step, metrics))
    write_run(tmp_path / "runs", RUN, rows)
    markdown = texts(page(tmp_path / "runs", monkeypatch).markdown)
    assert f"**{QUESTION_2}** :red-badge[no]" in markdown
    assert f"**{QUESTION_3}** :red-badge[collapsing]" in markdown


def test_before_enough_points_the_panel_says_so_instead_of_guessing(tmp_path, monkeypatch):
    write_run(tmp_path / "runs", RUN, known_rows()[:5])
    at = page(tmp_path / "runs", monkeypatch)
    markdown = texts(at.markdown)
    assert markdown.count(":gray-badge[not enough data]") == 3
    assert "5 logged step(s) so far; a verdict needs at least 8" in markdown
    assert not [t for t in at.table if "quantity" in t.value.columns]


# --- against a scale-0 control ------------------------------------------------------------------

CONTROL = "c0c0c0c0c"


def verdict_of(at: AppTest, question: str) -> str:
    [text] = [m.value for m in at.markdown if m.value.startswith(f"**{question}**")]
    return text


def test_a_run_no_more_divergent_than_its_control_shows_no_genuine_divergence(
    tmp_path, monkeypatch
):
    runs = tmp_path / "runs"
    # The control has the run's very divergence: what the run shows is routing and dropout.
    write_run(runs, CONTROL, known_rows(), name="control", scale=0.0, last_seen=1_000.0)
    write_run(runs, RUN, known_rows(), last_seen=2_000.0)  # newer: opened by default
    at = page(runs, monkeypatch)
    table = numbers_table(at)
    shown = {(r.question, r.expert, r.quantity): r.value for r in table.itertuples()}
    for e in (1, 2):
        recent = EXPECTED[(QUESTION_2, e, "recent divergence")]
        assert shown[(QUESTION_2, e, "control recent divergence")] == pytest.approx(recent)
        assert shown[(QUESTION_2, e, "divergence above control")] == pytest.approx(0, abs=1e-12)
    answer = verdict_of(at, QUESTION_2)
    assert "[no]" in answer and "above the scale-0 control's (control" in answer
    # Nothing above the control at either end: the perturbation never added divergence.
    for e in (1, 2):
        first = EXPECTED[(QUESTION_3, e, "first-window divergence")]
        assert shown[(QUESTION_3, e, "control first-window divergence")] == pytest.approx(first)
    answer = verdict_of(at, QUESTION_3)
    assert "[never diverged]" in answer and "above the control's (control" in answer


def test_the_control_itself_is_a_baseline_not_an_answer(tmp_path, monkeypatch):
    runs = tmp_path / "runs"
    write_run(runs, RUN, known_rows(), last_seen=1_000.0)
    write_run(runs, CONTROL, known_rows(), name="control", scale=0.0, last_seen=2_000.0)
    at = page(runs, monkeypatch)
    for question in verdict.QUESTIONS:
        answer = verdict_of(at, question)
        assert "[not applicable]" in answer and "scale-0 control" in answer
    names = trace_names(plotly_figures(at)[0])
    assert "expert 1 (clone) bottom 5%" in names and not any("perturbed" in n for n in names)


def test_without_a_control_the_answer_says_one_is_missing(tmp_path, monkeypatch):
    write_run(tmp_path / "runs", RUN, known_rows())
    answer = verdict_of(page(tmp_path / "runs", monkeypatch), QUESTION_2)
    assert "No scale-0 control of this experiment" in answer


def test_a_control_must_share_the_experiment(tmp_path):
    from dashboard import data

    runs = tmp_path / "runs"
    write_run(runs, RUN, known_rows())
    write_run(runs, CONTROL, known_rows(), name="control", scale=0.0)
    write_run(runs, "d0d0d0d0d", known_rows(), name="smear control", scale=0.0, mixing="smear")
    infos = {i.run_hash: i for i in data.list_runs(runs)}
    assert data.find_control(infos[RUN], list(infos.values())).run_hash == CONTROL
    assert data.find_control(infos[CONTROL], list(infos.values())) is None  # a control itself
    others = [infos[RUN], infos["d0d0d0d0d"]]  # a control with another mixing mode is no match
    assert data.find_control(infos[RUN], others) is None


def test_divergence_above_a_control_that_never_diverged_is_the_run_own(tmp_path, monkeypatch):
    runs = tmp_path / "runs"
    # A control whose clones never diverge (divergence exactly 0 at every step).
    quiet = synthetic_rows(KNOWN_STEPS, layers=2, experts=3, scale=0.0)
    write_run(runs, CONTROL, quiet, name="control", scale=0.0, last_seen=1_000.0)
    write_run(runs, RUN, known_rows(), last_seen=2_000.0)
    at = page(runs, monkeypatch)
    shown = {(r.question, r.expert, r.quantity): r.value for r in numbers_table(at).itertuples()}
    for e in (1, 2):
        recent = EXPECTED[(QUESTION_2, e, "recent divergence")]
        assert shown[(QUESTION_2, e, "control recent divergence")] == 0.0
        assert shown[(QUESTION_2, e, "divergence above control")] == pytest.approx(recent)
    assert "[mixed]" in verdict_of(at, QUESTION_2)  # expert 1 meaningful, expert 2 weak
    header = texts(at.markdown)
    assert "judged above its scale-0 control (control c0c0c0c0c)" in header
    # The header colours what the verdict judges: the excess over the control.
    assert "expert 1: latest **0.1610**, recent mean **0.1655**, control **0.0000**, above it " in (
        header
    )
    assert "above it :green[**+0.1655**] (meaningful)" in header
    assert "above it :orange[**+0.0369**] (weak)" in header
    assert "[sustained]" in verdict_of(at, QUESTION_3)


def test_the_header_colours_the_excess_over_the_control_not_the_raw_divergence(
    tmp_path, monkeypatch
):
    """A newcomer saw a green "meaningful" header over a verdict of "converging": the control's
    clones diverged as much as the perturbed experts."""
    runs = tmp_path / "runs"
    write_run(runs, CONTROL, known_rows(), name="control", scale=0.0, last_seen=1_000.0)
    write_run(runs, RUN, known_rows(), last_seen=2_000.0)
    header = texts(page(runs, monkeypatch).markdown)
    assert "above it :red[**+0.0000**] (converging)" in header
    assert ":green[" not in header.split("**Divergence**")[1].split("\n")[0]


def test_the_control_header_is_its_baseline_uncoloured(tmp_path, monkeypatch):
    runs = tmp_path / "runs"
    write_run(runs, RUN, known_rows(), last_seen=1_000.0)
    write_run(runs, CONTROL, known_rows(), name="control", scale=0.0, last_seen=2_000.0)
    at = page(runs, monkeypatch)
    line = next(m.value for m in at.markdown if m.value.startswith("**Divergence**"))
    assert "the baseline its perturbed runs are judged by" in line
    assert "expert 1: latest **0.1610**, recent mean **0.1655**" in line
    assert ":green[" not in line and ":red[" not in line
    assert "It is the baseline against which the perturbed runs" in verdict_of(at, QUESTION_2)


def test_a_control_run_otherwise_is_taken_when_no_exact_one_exists_and_named(tmp_path, monkeypatch):
    """The stack trains a two-rank baseline and one single-rank control."""
    from dashboard import data

    runs = tmp_path / "runs"
    one_rank = {"world_size": 1, "batch_size": 16}
    two_ranks = {"world_size": 2, "batch_size": 16}
    write_run(runs, CONTROL, known_rows(), name="control", scale=0.0, train=one_rank)
    write_run(runs, RUN, known_rows(), train=two_ranks, last_seen=time.time() + 60)
    infos = {i.run_hash: i for i in data.list_runs(runs)}
    assert data.find_control(infos[RUN], list(infos.values())).run_hash == CONTROL
    assert data.control_differences(infos[RUN], infos[CONTROL]) == ["train.world_size 1, not 2"]
    answer = verdict_of(page(runs, monkeypatch), QUESTION_2)
    assert "(control c0c0c0c0c, run with train.world_size 1, not 2)" in answer
    # An exact control wins over one run otherwise; one that trains otherwise is no control.
    write_run(runs, "c1c1c1c1c", known_rows(), name="exact", scale=0.0, train=two_ranks)
    write_run(runs, "c2c2c2c2c", known_rows(), name="other", scale=0.0, train={"world_size": 2})
    infos = {i.run_hash: i for i in data.list_runs(runs)}
    assert data.find_control(infos[RUN], list(infos.values())).run_hash == "c1c1c1c1c"
    del infos["c1c1c1c1c"], infos[CONTROL]
    assert data.find_control(infos[RUN], list(infos.values())) is None
