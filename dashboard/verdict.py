"""The design note's three questions, answered from the `dynamics` rows with the numbers behind
each answer. Pure functions over a DataFrame: the page shows exactly what they return.

Windows are counted in logged steps: the first and the recent window are each the first and the
last quarter of the logged steps (at least 3). No verdict before MIN_POINTS logged steps.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from prismatic.db import expert_column

MEANINGFUL = 0.05  # divergence above this: perturbed experts learn differently
CONVERGING = 0.01  # below this: collapsing to consensus
MIN_POINTS = 8  # logged steps needed before any verdict
WINDOW_FRACTION = 0.25
WAKE_RATIO = 1.5  # perturbed / clean bottom-tier norm at or above this: waking up
SUSTAINED = 0.8  # recent >= 0.8 x first window: divergence sustained
COLLAPSED = 0.5  # recent < 0.5 x first window and falling: collapsing
RULES = (
    f"Bottom weights wake up when a perturbed expert's recent-window bottom-tier norm is at least "
    f"{WAKE_RATIO}× expert 0's. Divergence is meaningful above {MEANINGFUL} and converging below "
    f"{CONVERGING}; when a scale-0 control of the same experiment is among the runs, what is held "
    f"against these thresholds, and whose trend is judged, is the excess over the control's "
    f"divergence. A trend is "
    f"sustained when the recent window keeps ≥ {SUSTAINED}× the first window's divergence; "
    f"collapsing when it falls below {CONVERGING}, or below {COLLAPSED}× the first window with a "
    f"falling slope; never diverged when both windows are below {CONVERGING}. Windows: the first "
    f"and the last quarter of the logged steps (at least 3); no verdict before {MIN_POINTS} "
    f"logged steps."
)
QUESTIONS = (
    "Are bottom weights waking up?",
    "Is there genuine divergence?",
    "Do perturbations cascade, or collapse to consensus?",
)


@dataclass
class Number:
    expert: int
    quantity: str
    value: float | None


@dataclass
class Answer:
    question: str
    # yes / no / mixed; the third question: sustained / collapsing / never diverged / mixed;
    # or: not enough data, not applicable
    verdict: str
    summary: str
    numbers: list[Number] = field(default_factory=list)

    def value(self, expert: int, quantity: str) -> float | None:
        found = (n.value for n in self.numbers if (n.expert, n.quantity) == (expert, quantity))
        return next(found, None)


def window_size(n: int) -> int:
    return max(3, int(round(n * WINDOW_FRACTION)))


def _mean(values: pd.Series | None) -> float | None:
    if values is None:
        return None
    present = values.dropna()
    return float(present.mean()) if len(present) else None


def _column(df: pd.DataFrame, expert: int, metric: str) -> pd.Series | None:
    name = expert_column(expert, metric)
    return df[name] if name in df.columns else None


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


def windows(df: pd.DataFrame, expert: int, metric: str) -> tuple[float | None, float | None]:
    """(first-window mean, recent-window mean) of one expert's metric."""
    column = _column(df, expert, metric)
    if column is None:
        return None, None
    w = window_size(len(df))
    return _mean(column.head(w)), _mean(column.tail(w))


def slope_per_1k(df: pd.DataFrame, expert: int, metric: str) -> float | None:
    """Least-squares slope of the metric against step, per 1,000 steps."""
    column = _column(df, expert, metric)
    if column is None:
        return None
    ok = column.notna().to_numpy()
    steps = df["step"].to_numpy(dtype=float)[ok]
    if len(steps) < 2 or np.ptp(steps) == 0:
        return None
    return float(np.polyfit(steps, column.to_numpy(dtype=float)[ok], 1)[0] * 1000)


@dataclass
class Control:
    """The scale-0 run of the same experiment: its divergence is what routing and expert dropout
    alone produce between exact clones, the baseline a perturbed run is judged against."""

    label: str
    rows: pd.DataFrame


NO_CONTROL = (
    " No scale-0 control of this experiment is among the runs: routing and expert dropout alone "
    "make exact clones diverge, so train configs/control-scale0.yaml (the same config at "
    "scale 0) alongside to tell that apart from the perturbation's effect."
)


def answer_all(
    df: pd.DataFrame,
    n_experts: int,
    mixing: str = "",
    *,
    is_control: bool = False,
    control: Control | None = None,
) -> list[Answer]:
    """The three answers. `is_control`: the run is itself a scale-0 control. `control`: the
    control of this run, when one was found; question 2 then asks how far this run's divergence
    exceeds the control's."""
    if n_experts < 2:
        why = "This run has no perturbed expert (a dense control): nothing to compare."
        return [Answer(q, "not enough data", why) for q in QUESTIONS]
    if len(df) < MIN_POINTS:
        why = f"{len(df)} logged step(s) so far; a verdict needs at least {MIN_POINTS}."
        return [Answer(q, "not enough data", why) for q in QUESTIONS]
    if mixing == "smear":
        why = (
            "Under `smear` mixing every expert's gradient is the same tensor scaled by its "
            "routing weight, so directional divergence is zero by construction."
        )
        return [
            wake(df, n_experts),
            Answer(QUESTIONS[1], "not applicable", why),
            Answer(QUESTIONS[2], "not applicable", why),
        ]
    if is_control:
        return _as_control(df, n_experts)
    return [
        wake(df, n_experts),
        divergence(df, n_experts, control),
        cascade(df, n_experts, control),
    ]


def _as_control(df: pd.DataFrame, n_experts: int) -> list[Answer]:
    """A scale-0 run perturbs nothing: its numbers are a baseline, not an answer."""
    answers = [wake(df, n_experts), divergence(df, n_experts), cascade(df, n_experts)]
    numbers = answers[1].numbers
    recent = [n.value for n in numbers if n.quantity == "recent divergence" and n.value is not None]
    seen = f" (recent divergence {', '.join(f'{v:.4f}' for v in recent)})" if recent else ""
    why = (
        "This run is a scale-0 control: experts 1+ are exact clones of expert 0, so nothing "
        f"here is the perturbation's doing. Its divergence{seen} comes from routing and expert "
        "dropout alone. It is the baseline against which the perturbed runs of this experiment "
        "are judged."
    )
    return [Answer(a.question, "not applicable", why, a.numbers) for a in answers]


def wake(df: pd.DataFrame, n_experts: int) -> Answer:
    _, clean = windows(df, 0, "bottom_norm")
    numbers = [Number(0, "recent bottom norm", clean)]
    ratios: dict[int, float] = {}
    for e in range(1, n_experts):
        _, mine = windows(df, e, "bottom_norm")
        ratio = mine / clean if mine is not None and clean else None
        numbers += [Number(e, "recent bottom norm", mine), Number(e, "bottom ratio", ratio)]
        if ratio is not None:
            ratios[e] = ratio
    if not ratios:
        return Answer(QUESTIONS[0], "not enough data", "No bottom-tier norms logged.", numbers)
    woke = [e for e, r in ratios.items() if r >= WAKE_RATIO]
    verdict = "yes" if len(woke) == len(ratios) else "mixed" if woke else "no"
    text = ", ".join(f"expert {e}: {r:.2f}×" for e, r in ratios.items())
    summary = (
        f"Recent-window bottom-tier norm, perturbed ÷ clean: {text} "
        f"(≥ {WAKE_RATIO}× counts as waking up)."
    )
    return Answer(QUESTIONS[0], verdict, summary, numbers)


def divergence(df: pd.DataFrame, n_experts: int, control: Control | None = None) -> Answer:
    """Recent divergence against the thresholds; with a control, the excess over the control's
    recent divergence (same expert) is what is held against them."""
    numbers: list[Number] = []
    levels: dict[int, tuple[float, str]] = {}
    for e in perturbed_experts(df, n_experts):
        _, recent = windows(df, e, "divergence")
        latest = _column(df, e, "divergence").dropna()  # type: ignore[union-attr]
        numbers += [
            Number(e, "recent divergence", recent),
            Number(e, "latest divergence", float(latest.iloc[-1]) if len(latest) else None),
        ]
        judged = recent
        if control is not None and recent is not None:
            _, baseline = windows(control.rows, e, "divergence")
            judged = recent - baseline if baseline is not None else None
            numbers += [
                Number(e, "control recent divergence", baseline),
                Number(e, "divergence above control", judged),
            ]
        if judged is not None:
            levels[e] = (judged, divergence_level(judged))
    if not levels:
        return Answer(QUESTIONS[1], "not enough data", "No divergence logged.", numbers)
    kinds = {level for _, level in levels.values()}
    verdict = "yes" if kinds == {"meaningful"} else "no" if kinds == {"converging"} else "mixed"
    sign = "" if control is None else "+"
    text = ", ".join(f"expert {e}: {v:{sign}.4f} ({level})" for e, (v, level) in levels.items())
    if control is None:
        what = "Recent-window mean divergence (1 − cosine to expert 0)"
    else:
        what = f"Recent-window divergence above the scale-0 control's ({control.label})"
    summary = (
        f"{what}: {text}; > {MEANINGFUL} is meaningful, < {CONVERGING} is converging to "
        "consensus." + (NO_CONTROL if control is None else "")
    )
    return Answer(QUESTIONS[1], verdict, summary, numbers)


def cascade(df: pd.DataFrame, n_experts: int, control: Control | None = None) -> Answer:
    """The trend of divergence; with a control, the trend of the excess over the control's."""
    numbers: list[Number] = []
    trends: dict[int, str] = {}
    parts = []
    for e in perturbed_experts(df, n_experts):
        first, recent = windows(df, e, "divergence")
        slope = slope_per_1k(df, e, "divergence")
        drift = slope_per_1k(df, e, "weight_drift")
        numbers += [
            Number(e, "first-window divergence", first),
            Number(e, "recent divergence", recent),
            Number(e, "divergence slope per 1k steps", slope),
            Number(e, "weight drift slope per 1k steps", drift),
        ]
        if control is not None:
            first, recent, slope = _above_control(control, e, first, recent, slope, numbers)
        if first is None or recent is None:
            continue
        trends[e] = _trend(first, recent, slope)
        slope_text = f", slope {slope:+.4f}/1k steps" if slope is not None else ""
        drift_text = f", weight drift {drift:+.4f}/1k steps" if drift is not None else ""
        sign = "" if control is None else "+"
        parts.append(
            f"expert {e}: {first:{sign}.4f} → {recent:{sign}.4f}{slope_text}{drift_text} "
            f"({trends[e]})"
        )
    if not trends:
        return Answer(QUESTIONS[2], "not enough data", "No divergence logged.", numbers)
    kinds = set(trends.values())
    verdict = kinds.pop() if len(kinds) == 1 and "fading" not in kinds else "mixed"
    what = "Divergence" if control is None else f"Divergence above the control's ({control.label})"
    summary = f"{what}, first window → recent window: " + "; ".join(parts) + "."
    return Answer(QUESTIONS[2], verdict, summary, numbers)


def _above_control(
    control: Control,
    expert: int,
    first: float | None,
    recent: float | None,
    slope: float | None,
    numbers: list[Number],
) -> tuple[float | None, float | None, float | None]:
    """(first, recent, slope) of this run's divergence minus its control's, recorded too."""
    c_first, c_recent = windows(control.rows, expert, "divergence")
    c_slope = slope_per_1k(control.rows, expert, "divergence")
    numbers += [
        Number(expert, "control first-window divergence", c_first),
        Number(expert, "control recent divergence", c_recent),
    ]
    first = first - c_first if first is not None and c_first is not None else None
    recent = recent - c_recent if recent is not None and c_recent is not None else None
    slope = slope - c_slope if slope is not None and c_slope is not None else None
    return first, recent, slope


def _trend(first: float, recent: float, slope: float | None) -> str:
    if first < CONVERGING and recent < CONVERGING:
        return "never diverged"
    if recent < CONVERGING or (recent < COLLAPSED * first and (slope or 0) < 0):
        return "collapsing"
    if recent >= SUSTAINED * first:
        return "sustained"
    return "fading"
