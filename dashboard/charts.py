"""The Dynamics chart: gradient norm per expert and tier on a log axis, and its colour scheme.

Expert 0 (clean) is drawn in blues: light = top 5 %, medium = bottom 5 %, dark = middle 90 %.
Each perturbed expert gets its own red/orange family in the same light/medium/dark order and its
own dash, so experts stay apart even in grey. Values <= 0 cannot sit on a log axis: they are left
out and counted per series.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from dashboard.sampling import finite_series
from prismatic.db import expert_column

TIERS = ("top", "bottom", "middle")
TIER_LABELS = {"top": "top 5%", "bottom": "bottom 5%", "middle": "middle 90%", "norm": "whole"}
CLEAN_COLOURS = {"top": "#9ecae1", "bottom": "#4292c6", "middle": "#08306b"}
PERTURBED_FAMILIES = [
    {"top": "#fc9272", "bottom": "#ef3b2c", "middle": "#99000d"},  # reds
    {"top": "#fdae6b", "bottom": "#f16913", "middle": "#8c2d04"},  # oranges
    {"top": "#ffa07a", "bottom": "#ff4500", "middle": "#8b2500"},  # vermilions
    {"top": "#ffd27f", "bottom": "#e69500", "middle": "#7a4f00"},  # ambers
]
PERTURBED_DASHES = ["dash", "dot", "dashdot", "longdash", "longdashdot"]
# Log axes label 1, 2 and 5 of each decade (plotly's default labels every digit 1..9 once the
# range spans about one decade, a column of numbers a newcomer found hard to read), each with its
# whole value: plotly's own 1-2-5 ticks ("D2") label 0.2 and 0.5 as a bare "2" and "5".
LOG_TICK_DIGITS = (1, 2, 5)
LOG_TICKS_MAX_DECADES = 4  # wider ranges label only the powers of ten


def log_axis(series: list) -> dict:
    """A log y axis with labelled 1-2-5 ticks over the positive values of `series` (arrays)."""
    positive = [np.asarray(y, dtype=float) for y in series if y is not None and len(y)]
    values = np.concatenate(positive) if positive else np.empty(0)
    values = values[np.isfinite(values) & (values > 0)]
    if not len(values):
        return {"type": "log"}
    low = math.floor(math.log10(values.min()))
    high = math.ceil(math.log10(values.max()))
    digits = LOG_TICK_DIGITS if high - low <= LOG_TICKS_MAX_DECADES else (1,)
    ticks = [d * 10.0**e for e in range(low, high + 1) for d in digits]
    return {"type": "log", "tickvals": ticks, "ticktext": [_tick_label(t) for t in ticks]}


def _tick_label(value: float) -> str:
    """0.002, 0.5, 20, 5000; 2e-5 and 1e6 beyond (no exponent padding)."""
    if 1e-3 <= value < 1e4:
        return f"{value:.4f}".rstrip("0").rstrip(".")
    mantissa, exponent = f"{value:.0e}".split("e")
    return f"{mantissa}e{int(exponent)}"


LAYOUT = {
    "height": 520,
    "margin": {"l": 70, "r": 20, "t": 40, "b": 50},
    "hovermode": "x unified",
    "legend": {"orientation": "v", "groupclick": "toggleitem"},
    "template": "plotly_white",
}


@dataclass
class LeftOut:
    """Values <= 0 that a log axis could not show, per series name."""

    per_series: dict[str, int] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return sum(self.per_series.values())

    def text(self) -> str:
        parts = ", ".join(f"{name}: {n}" for name, n in self.per_series.items() if n)
        return f"{self.total} value(s) ≤ 0 left out (a log axis cannot show them) — {parts}."


def tier_colour(expert: int, tier: str) -> str:
    if expert == 0:
        return CLEAN_COLOURS[tier]
    return PERTURBED_FAMILIES[(expert - 1) % len(PERTURBED_FAMILIES)][tier]


def expert_dash(expert: int) -> str:
    return "solid" if expert == 0 else PERTURBED_DASHES[(expert - 1) % len(PERTURBED_DASHES)]


def series_name(expert: int, tier: str, clones: bool = False) -> str:
    """`clones`: a scale-0 control, whose experts 1+ are unperturbed copies of expert 0."""
    role = "clean" if expert == 0 else "clone" if clones else "perturbed"
    return f"expert {expert} ({role}) {TIER_LABELS[tier]}"


def norm_trace(
    df: pd.DataFrame, expert: int, tier: str, clones: bool = False
) -> tuple[dict | None, int]:
    """One log-axis line (as a plotly dict; None when no value can be drawn) and how many
    values <= 0 it left out."""
    column = expert_column(expert, f"{tier}_norm" if tier in TIERS else "norm")
    if column not in df.columns:
        return None, 0
    values = df[column].to_numpy(dtype=float)
    x, y, left_out = finite_series(df["step"].to_numpy(), values, log_axis=True)
    if not len(x):
        return None, left_out
    name = series_name(expert, tier, clones)
    trace = {
        "type": "scatter",
        "x": x,
        "y": y,
        "mode": "lines",
        "name": name,
        "legendgroup": f"expert {expert}",
        "line": {
            "color": tier_colour(expert, tier if tier in TIERS else "middle"),
            "dash": expert_dash(expert),
            "width": 1 if tier == "norm" else 2,
        },
        "hovertemplate": f"{name}: %{{y:.6g}}<extra></extra>",
    }
    return trace, left_out


def dynamics_figure(
    df: pd.DataFrame,
    experts: list[int],
    tiers: list[str],
    include_whole: bool = False,
    clones: bool = False,
) -> tuple[go.Figure, LeftOut]:
    """Gradient norm (log y) against step, one line per expert and tier."""
    traces = []
    left_out = LeftOut()
    kinds = [*tiers, "norm"] if include_whole else list(tiers)
    for expert in experts:
        for tier in kinds:
            trace, lost = norm_trace(df, expert, tier, clones)
            if lost:
                left_out.per_series[series_name(expert, tier, clones)] = lost
            if trace is not None:
                traces.append(trace)
    layout = {
        **LAYOUT,
        "yaxis": {
            **log_axis([t["y"] for t in traces]),
            "title": {"text": "gradient norm (log scale)"},
        },
        "xaxis": {"title": {"text": "training step"}},
    }
    # Built from dicts: plotly validates once here instead of trace by trace.
    return go.Figure(data=traces, layout=layout), left_out


def figure_csv(fig: go.Figure) -> str:
    """What a line figure shows, as long-format CSV: series, step, value."""
    parts: list[tuple] = []
    for trace in fig.data:
        x = np.asarray(trace.x if trace.x is not None else [])
        y = np.asarray(trace.y if trace.y is not None else [])
        name = f"{trace.meta} {trace.name}" if trace.meta else trace.name
        parts.extend(zip([name] * len(x), x.tolist(), y.tolist(), strict=True))
    out = io.StringIO()
    pd.DataFrame(parts, columns=["series", "step", "value"]).to_csv(out, index=False)
    return out.getvalue()
