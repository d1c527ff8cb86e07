"""The other views' figures: divergence and drift over time, routing weights, loss, per layer,
the layer x expert x tier heatmap of one window, and several runs on shared axes."""

from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from dashboard import verdict
from dashboard.charts import (
    LAYOUT,
    TIER_LABELS,
    TIERS,
    LeftOut,
    log_axis,
    norm_trace,
    series_name,
    tier_colour,
)
from dashboard.data import experts_in, layer_wide
from dashboard.sampling import finite_series
from prismatic.db import expert_column

RUN_COLOURS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#17becf"]
EXPERT_DASHES = ["solid", "dash", "dot", "dashdot", "longdash", "longdashdot"]
# Compare view: label -> (metric, experts it applies to, log axis)
COMPARE_METRICS = {
    "divergence": ("divergence", "perturbed", False),
    "bottom 5% norm": ("bottom_norm", "all", True),
    "top 5% norm": ("top_norm", "all", True),
    "middle 90% norm": ("middle_norm", "all", True),
    "weight drift": ("weight_drift", "perturbed", False),
    "routing weight": ("routing_weight", "all", False),
    "loss": ("loss", "run", False),
    "validation loss": ("val_loss", "run", False),
}


def _line(df: pd.DataFrame, column: str, name: str, log_axis: bool = False, **style) -> dict:
    x, y, _ = finite_series(df["step"].to_numpy(), df[column].to_numpy(dtype=float), log_axis)
    return {
        "type": "scatter",
        "x": x,
        "y": y,
        "mode": style.pop("mode", "lines"),
        "name": name,
        "hovertemplate": f"{name}: %{{y:.6g}}<extra></extra>",
        **style,
    }


def _figure(traces: list[dict], y_title: str, log_y: bool = False, **layout) -> go.Figure:
    return go.Figure(
        data=traces,
        layout={
            **LAYOUT,
            "height": 420,
            "yaxis": {
                **(log_axis([t["y"] for t in traces]) if log_y else {"type": "linear"}),
                "title": {"text": y_title},
            },
            "xaxis": {"title": {"text": "training step"}},
            **layout,
        },
    )


def divergence_figure(df: pd.DataFrame) -> go.Figure:
    """Divergence per perturbed expert on a linear axis, with the design note's thresholds."""
    traces = [
        _line(df, expert_column(e, "divergence"), f"expert {e} divergence", line=_style(e))
        for e in experts_in(df)
        if e > 0 and expert_column(e, "divergence") in df.columns
    ]
    fig = _figure(traces, "divergence (1 − cosine to expert 0)")
    _thresholds(fig)
    return fig


def drift_figure(df: pd.DataFrame) -> go.Figure:
    traces = [
        _line(df, expert_column(e, "weight_drift"), f"expert {e} weight drift", line=_style(e))
        for e in experts_in(df)
        if e > 0 and expert_column(e, "weight_drift") in df.columns
    ]
    return _figure(traces, "weight drift ‖W_k − W_0‖ / ‖W_0‖")


def routing_figure(df: pd.DataFrame) -> go.Figure:
    experts = experts_in(df)
    traces = [
        _line(df, expert_column(e, "routing_weight"), f"expert {e} routing", line=_style(e))
        for e in experts
        if expert_column(e, "routing_weight") in df.columns
    ]
    fig = _figure(traces, "mean router probability")
    if experts:
        fig.add_hline(y=1 / len(experts), line_dash="dot", annotation_text="uniform")
    return fig


def loss_figure(df: pd.DataFrame) -> go.Figure:
    traces = []
    if "loss" in df.columns:
        traces.append(_line(df, "loss", "loss", line={"color": "#08306b"}))
    if "val_loss" in df.columns:
        traces.append(
            _line(
                df, "val_loss", "validation loss", mode="lines+markers", line={"color": "#d62728"}
            )
        )
    return _figure(traces, "cross-entropy loss")


def _style(expert: int) -> dict:
    colour = tier_colour(expert, "bottom") if expert else tier_colour(0, "middle")
    return {"color": colour, "dash": EXPERT_DASHES[expert % len(EXPERT_DASHES)], "width": 2}


# --- per layer and heatmap -----------------------------------------------------------------------


def layers_figure(
    layers: pd.DataFrame, chosen: list[int], tiers: list[str]
) -> tuple[go.Figure, LeftOut]:
    """The Dynamics chart for each chosen layer, stacked on a shared step axis."""
    fig = make_subplots(
        rows=len(chosen),
        cols=1,
        shared_xaxes=True,
        vertical_spacing=0.04,
        subplot_titles=[f"layer {layer}" for layer in chosen],
    )
    left_out = LeftOut()
    for row, layer in enumerate(chosen, 1):
        wide = layer_wide(layers, layer)
        shown = []
        for expert in experts_in(wide):
            for tier in tiers:
                trace, lost = norm_trace(wide, expert, tier)
                name = f"layer {layer} {series_name(expert, tier)}"
                if lost:
                    left_out.per_series[name] = lost
                if trace is None:
                    continue
                # One legend entry per expert and tier toggles it in every layer; `meta`
                # keeps the layer for the hover and the CSV.
                trace.update(showlegend=row == 1, legendgroup=f"{expert} {tier}")
                trace.update(
                    meta=f"layer {layer}", hovertemplate=f"{name}: %{{y:.6g}}<extra></extra>"
                )
                fig.add_trace(trace, row=row, col=1)
                shown.append(trace["y"])
        fig.update_yaxes(**log_axis(shown), title_text="grad norm", row=row, col=1)
    fig.update_xaxes(title_text="training step", row=len(chosen), col=1)
    fig.update_layout(**{**LAYOUT, "height": max(360, 260 * len(chosen)), "hovermode": "closest"})
    return fig, left_out


def window_means(layers: pd.DataFrame, first_step: int, last_step: int) -> pd.DataFrame:
    """Mean tier norm per layer (rows) and expert x tier (columns) over first..last step."""
    part = layers[(layers["step"] >= first_step) & (layers["step"] <= last_step)]
    if part.empty:
        return pd.DataFrame()
    means = part.groupby(["layer", "expert"])[[f"{t}_norm" for t in TIERS]].mean()
    table = means.unstack("expert")
    table.columns = [f"expert {e} {TIER_LABELS[m.removesuffix('_norm')]}" for m, e in table.columns]
    order = [f"expert {e} {TIER_LABELS[t]}" for e in sorted(part["expert"].unique()) for t in TIERS]
    table = table[[c for c in order if c in table.columns]]
    table.index = [f"layer {int(i)}" for i in table.index]
    return table


def heatmap_figure(means: pd.DataFrame, first_step: int, last_step: int) -> go.Figure:
    """Colour = log10 of the mean norm, so tiers orders of magnitude apart all show structure;
    the cell text and the hover give the mean itself."""
    values = means.to_numpy(dtype=float)
    with np.errstate(divide="ignore", invalid="ignore"):
        colour = np.where(values > 0, np.log10(values), np.nan)
    fig = go.Figure(
        go.Heatmap(
            z=colour,
            x=list(means.columns),
            y=list(means.index),
            customdata=values,
            text=[[f"{v:.3g}" for v in row] for row in values],
            texttemplate="%{text}",
            colorscale="Viridis",
            colorbar={"title": {"text": "log10 norm"}},
            hovertemplate="%{y}, %{x}: %{customdata:.6g}<extra></extra>",
        )
    )
    fig.update_layout(
        title={
            "text": f"mean gradient norm per layer, expert and tier, steps {first_step}–{last_step}"
        },
        height=max(320, 160 + 60 * len(means.index)),
        margin={"l": 80, "r": 20, "t": 60, "b": 140},
        xaxis={"tickangle": -35},
        yaxis={"autorange": "reversed"},
        template="plotly_white",
    )
    return fig


# --- several runs --------------------------------------------------------------------------------


def compare_figure(runs: list[tuple[str, pd.DataFrame]], metric_label: str) -> go.Figure:
    """Several runs on one pair of axes: one colour per run, one dash per expert."""
    metric, applies_to, log_y = COMPARE_METRICS[metric_label]
    traces = []
    for i, (label, df) in enumerate(runs):
        colour = RUN_COLOURS[i % len(RUN_COLOURS)]
        if applies_to == "run":
            if metric in df.columns:
                traces.append(_line(df, metric, f"{label}", log_y, line={"color": colour}))
            continue
        for e in experts_in(df):
            if (applies_to == "perturbed" and e == 0) or expert_column(e, metric) not in df:
                continue
            style = {"color": colour, "dash": EXPERT_DASHES[e % len(EXPERT_DASHES)], "width": 2}
            name = f"{label} · expert {e}"
            traces.append(_line(df, expert_column(e, metric), name, log_y, line=style))
    title = f"{metric_label}{' (log scale)' if log_y else ''}"
    fig = _figure(traces, title, log_y, height=480)
    if metric == "divergence":
        _thresholds(fig)
    return fig


def _thresholds(fig: go.Figure) -> None:
    """The design note's divergence thresholds as labelled horizontal lines."""
    fig.add_hline(
        y=verdict.MEANINGFUL, line_dash="dot", line_color="green", annotation_text="meaningful"
    )
    fig.add_hline(
        y=verdict.CONVERGING, line_dash="dot", line_color="red", annotation_text="converging"
    )
