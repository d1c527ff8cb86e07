"""The three questions of the design note, answered from the data with the numbers behind them.

Pure functions over the `dynamics` DataFrame, so the dashboard and the tests compute the same.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from prismatic.db import expert_column

MEANINGFUL = 0.05  # divergence above this: perturbed experts learn differently
CONVERGING = 0.01  # below this: collapsing to consensus
MIN_POINTS = 8  # logged steps needed before any verdict
WINDOW_FRACTION = 0.25  # the recent window: the last quarter of logged steps (>= 3 points)
WAKE_RATIO = 1.5  # perturbed bottom norm / clean bottom norm above this: waking up


@dataclass
class Answer:
    question: str
    verdict: str  # "yes", "no", "mixed", "not enough data"
    summary: str
    numbers: dict[str, float | None]


def window_size(n: int) -> int:
    return max(3, int(round(n * WINDOW_FRACTION)))


def _mean(series: pd.Series) -> float | None:
    values = series.dropna()
    return float(values.mean()) if len(values) else None


def divergence_level(value: float | None) -> str:
    if value is None:
        return "unknown"
    if value > MEANINGFUL:
        return "meaningful"
    if value < CONVERGING:
        return "converging"
    return "weak"


def perturbed_experts(df: pd.DataFrame, n_experts: int) -> list[int]:
    return [e for e in range(1, n_experts) if expert_column(e, "divergence") in df.columns]


def bottom_ratios(df: pd.DataFrame, n_experts: int) -> dict[int, float | None]:
    recent = df.tail(window_size(len(df)))
    clean = _mean(recent.get(expert_column(0, "bottom_norm"), pd.Series(dtype=float)))
    out: dict[int, float | None] = {}
    for e in range(1, n_experts):
        mine = _mean(recent.get(expert_column(e, "bottom_norm"), pd.Series(dtype=float)))
        out[e] = mine / clean if mine is not None and clean else None
    return out


def divergence_windows(df: pd.DataFrame, expert: int) -> tuple[float | None, float | None]:
    """(first-window mean, recent-window mean) of one expert's divergence."""
    column = df.get(expert_column(expert, "divergence"), pd.Series(dtype=float))
    w = window_size(len(df))
    return _mean(column.head(w)), _mean(column.tail(w))


def slope_per_1k(df: pd.DataFrame, column: str) -> float | None:
    if column not in df.columns:
        return None
    data = df[["step", column]].dropna()
    if len(data) < 2 or data["step"].nunique() < 2:
        return None
    slope = np.polyfit(data["step"].to_numpy(float), data[column].to_numpy(float), 1)[0]
    return float(slope * 1000)


def answer_all(df: pd.DataFrame, n_experts: int) -> list[Answer]:
    questions = (
        "Are bottom weights waking up?",
        "Is there genuine divergence?",
        "Do perturbations cascade, or collapse to consensus?",
    )
    if len(df) < MIN_POINTS or n_experts < 2:
        reason = (
            f"{len(df)} logged step(s); a verdict needs at least {MIN_POINTS}."
            if n_experts >= 2
            else "This run has no perturbed expert (a dense control)."
        )
        return [Answer(q, "not enough data", reason, {}) for q in questions]
    return [
        _wake(df, n_experts, questions[0]),
        _divergence(df, n_experts, questions[1]),
        _cascade(df, n_experts, questions[2]),
    ]


def _wake(df: pd.DataFrame, n_experts: int, question: str) -> Answer:
    ratios = bottom_ratios(df, n_experts)
    known = [r for r in ratios.values() if r is not None]
    if not known:
        return Answer(question, "not enough data", "No bottom-tier norms logged.", {})
    woke = [r for r in known if r >= WAKE_RATIO]
    verdict = "yes" if len(woke) == len(known) else "mixed" if woke else "no"
    text = ", ".join(f"expert {e}: {r:.2f}×" for e, r in ratios.items() if r is not None)
    summary = (
        f"Recent-window bottom-tier norm, perturbed / clean: {text} "
        f"(≥ {WAKE_RATIO}× counts as waking up)."
    )
    return Answer(question, verdict, summary, {f"bottom_ratio_{e}": r for e, r in ratios.items()})


def _divergence(df: pd.DataFrame, n_experts: int, question: str) -> Answer:
    numbers: dict[str, float | None] = {}
    levels = []
    for e in perturbed_experts(df, n_experts):
        _, recent = divergence_windows(df, e)
        numbers[f"divergence_{e}"] = recent
        levels.append(divergence_level(recent))
    if not levels or all(level == "unknown" for level in levels):
        return Answer(question, "not enough data", "No divergence logged.", numbers)
    verdict = (
        "yes"
        if all(level == "meaningful" for level in levels)
        else "no"
        if all(level == "converging" for level in levels)
        else "mixed"
    )
    text = ", ".join(
        f"expert {k.rsplit('_', 1)[1]}: {v:.4f}" for k, v in numbers.items() if v is not None
    )
    summary = (
        f"Recent-window mean divergence (1 − cosine to expert 0): {text}; > {MEANINGFUL} is "
        f"meaningful, < {CONVERGING} is converging."
    )
    return Answer(question, verdict, summary, numbers)


def _cascade(df: pd.DataFrame, n_experts: int, question: str) -> Answer:
    numbers: dict[str, float | None] = {}
    collapsing = sustained = 0
    for e in perturbed_experts(df, n_experts):
        first, last = divergence_windows(df, e)
        slope = slope_per_1k(df, expert_column(e, "divergence"))
        numbers.update(
            {
                f"first_{e}": first,
                f"last_{e}": last,
                f"slope_per_1k_{e}": slope,
                f"drift_slope_per_1k_{e}": slope_per_1k(df, expert_column(e, "weight_drift")),
            }
        )
        if first is None or last is None:
            continue
        if last < CONVERGING or (first > 0 and last < 0.5 * first and (slope or 0) < 0):
            collapsing += 1
        elif first <= 0 or last >= 0.8 * first:
            sustained += 1
    total = collapsing + sustained
    verdict = (
        "yes"
        if sustained and not collapsing
        else "no"
        if collapsing and not sustained
        else "mixed"
        if total
        else "not enough data"
    )
    parts = []
    for e in perturbed_experts(df, n_experts):
        first, last, slope = (
            numbers[f"first_{e}"],
            numbers[f"last_{e}"],
            numbers[f"slope_per_1k_{e}"],
        )
        if first is not None and last is not None:
            slope_text = f", slope {slope:+.4f}/1k steps" if slope is not None else ""
            parts.append(f"expert {e}: {first:.4f} → {last:.4f}{slope_text}")
    summary = (
        "Divergence, first window → recent window: "
        + "; ".join(parts)
        + ". Sustained = recent ≥ 0.8 × first; collapsing = recent < half of first and "
        f"falling, or < {CONVERGING}."
    )
    return Answer(question, verdict, summary, numbers)
