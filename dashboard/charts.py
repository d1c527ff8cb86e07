"""Plotly figures for the Dynamics tab, and server-side downsampling that keeps spikes."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from prismatic.db import expert_column

TIERS = ("top", "bottom", "middle")
TIER_LABELS = {"top": "top 5%", "bottom": "bottom 5%", "middle": "middle 90%"}
# Expert 0: light / medium / dark blue for top / bottom / middle.
CLEAN_COLOURS = {"top": "#9ecae1", "bottom": "#4292c6", "middle": "#08306b"}
# Perturbed experts: one red/orange hue family each (light / medium / dark), dashes tell apart.
PERTURBED_FAMILIES = [
    {"top": "#fcae91", "bottom": "#fb6a4a", "middle": "#a50f15"},
    {"top": "#fdd0a2", "bottom": "#fd8d3c", "middle": "#a63603"},
    {"top": "#fbb4b9", "bottom": "#f768a1", "middle": "#7a0177"},
    {"top": "#fee391", "bottom": "#fec44f", "middle": "#993404"},
]
DASHES = ["solid", "dash", "dot", "dashdot", "longdash", "longdashdot"]
MAX_POINTS = 2000


def tier_colour(expert: int, tier: str) -> str:
    if expert == 0:
        return CLEAN_COLOURS[tier]
    return PERTURBED_FAMILIES[(expert - 1) % len(PERTURBED_FAMILIES)][tier]


def expert_dash(expert: int) -> str:
    return "solid" if expert == 0 else DASHES[(expert - 1) % (len(DASHES) - 1) + 1]


def downsample(
    x: np.ndarray, y: np.ndarray, max_points: int = MAX_POINTS
) -> tuple[np.ndarray, np.ndarray]:
    """At most ~max_points points: per bucket the min and the max of y, in step order."""
    n = len(x)
    if n <= max_points:
        return x, y
    buckets = max_points // 2
    size = math.ceil(n / buckets)
    pad = buckets * size - n
    yy = np.concatenate([y.astype(float), np.full(pad, np.nan)]).reshape(buckets, size)
    all_nan = np.all(np.isnan(yy), axis=1)
    filled_lo = np.where(np.isnan(yy), np.inf, yy)
    filled_hi = np.where(np.isnan(yy), -np.inf, yy)
    lo = np.argmin(filled_lo, axis=1) + np.arange(buckets) * size
    hi = np.argmax(filled_hi, axis=1) + np.arange(buckets) * size
    keep = np.unique(np.concatenate([lo[~all_nan], hi[~all_nan]]))
    keep = keep[keep < n]
    return x[keep], y[keep]


def dynamics_figure(
    df: pd.DataFrame, experts: list[int], tiers: list[str], include_whole: bool = False
) -> tuple[go.Figure, int]:
    """Gradient norm (log y) against step; returns the figure and how many values ≤ 0 were
    left out (they cannot sit on a log axis)."""
    fig = go.Figure()
    left_out = 0
    steps = df["step"].to_numpy()
    series = [(e, t) for e in experts for t in tiers]
    if include_whole:
        series += [(e, "norm") for e in experts]
    for expert, tier in series:
        column = expert_column(expert, f"{tier}_norm" if tier in TIERS else "norm")
        if column not in df.columns:
            continue
        y = df[column].to_numpy(dtype=float)
        positive = np.isfinite(y) & (y > 0)
        left_out += int((np.isfinite(y) & (y <= 0)).sum())
        x_kept, y_kept = downsample(steps[positive], y[positive])
        label = TIER_LABELS.get(tier, "whole")
        fig.add_trace(
            go.Scattergl(
                x=x_kept,
                y=y_kept,
                mode="lines",
                name=f"expert {expert} {label}",
                legendgroup=f"expert {expert}",
                line={
                    "color": tier_colour(expert, tier if tier in TIERS else "middle"),
                    "dash": expert_dash(expert),
                    "width": 2 if tier != "norm" else 1,
                },
                hovertemplate=(
                    f"expert {expert} {label}<br>step %{{x}}<br>norm %{{y:.4g}}<extra></extra>"
                ),
            )
        )
    fig.update_layout(
        yaxis={"type": "log", "title": "gradient norm (log)"},
        xaxis={"title": "training step"},
        height=480,
        margin={"l": 60, "r": 20, "t": 30, "b": 40},
        legend={"orientation": "v"},
        hovermode="closest",
    )
    return fig, left_out


def line_figure(
    df: pd.DataFrame,
    columns: dict[str, str],
    y_title: str,
    log_y: bool = False,
    hlines: dict[str, float] | None = None,
) -> go.Figure:
    """One line per {label: column}, linear y unless log_y; optional labelled horizontal lines."""
    fig = go.Figure()
    steps = df["step"].to_numpy()
    for label, column in columns.items():
        if column not in df.columns:
            continue
        y = df[column].to_numpy(dtype=float)
        ok = np.isfinite(y) & ((y > 0) if log_y else True)
        x_kept, y_kept = downsample(steps[ok], y[ok])
        fig.add_trace(go.Scattergl(x=x_kept, y=y_kept, mode="lines", name=label))
    for label, value in (hlines or {}).items():
        fig.add_hline(y=value, line_dash="dot", annotation_text=label)
    fig.update_layout(
        yaxis={"type": "log" if log_y else "linear", "title": y_title},
        xaxis={"title": "training step"},
        height=360,
        margin={"l": 60, "r": 20, "t": 30, "b": 40},
    )
    return fig
