"""Combining metrics across layers and across ranks (the collector's rules, shared with the
trainer's `log_gradient_dynamics`, which returns the design note's layer-averaged dict)."""

from __future__ import annotations

import math
from collections.abc import Sequence

from prismatic.wire import COUNT_METRICS, TIER_METRICS

Table = list[list[float | None]]  # [layer][expert]
NORM_METRICS = (*TIER_METRICS, "norm")


def _mean(values: Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return sum(present) / len(present) if present else None


def mean_over_layers(metrics: dict[str, Table]) -> dict[str, list[float | None]]:
    """{name: [value per expert]}: the mean over layers (the design note's rule), skipping
    missing values; counts (`nonfinite`) are summed instead."""
    out: dict[str, list[float | None]] = {}
    for name, table in metrics.items():
        n_experts = max(len(row) for row in table)
        columns = [[row[e] if e < len(row) else None for row in table] for e in range(n_experts)]
        if name in COUNT_METRICS:
            out[name] = [sum(v for v in col if v is not None) for col in columns]
        else:
            out[name] = [_mean(col) for col in columns]
    return out


def combine_ranks(
    per_rank: Sequence[dict[str, Table]], shards: bool
) -> tuple[dict[str, Table], float | None]:
    """Merge the same step from several ranks; returns (metrics, largest relative spread).

    Data-parallel ranks hold synchronised gradients, so values should agree: the mean is stored
    and the spread (max - min) / |mean| flags a desync. When ranks hold disjoint shards of each
    parameter, a norm over the whole parameter is sqrt(sum of squares) over ranks, never a mean.
    """
    if len(per_rank) == 1:
        return per_rank[0], 0.0
    names = set().union(*per_rank)
    merged: dict[str, Table] = {}
    spread = 0.0
    for name in sorted(names):
        tables = [m[name] for m in per_rank if name in m]
        n_layers = max(len(t) for t in tables)
        n_experts = max(len(r) for t in tables for r in t)
        merged[name] = []
        for layer in range(n_layers):
            row = []
            for expert in range(n_experts):
                values = [
                    t[layer][expert]
                    for t in tables
                    if layer < len(t) and expert < len(t[layer]) and t[layer][expert] is not None
                ]
                value, s = _combine(name, values, shards)
                spread = max(spread, s)
                row.append(value)
            merged[name].append(row)
    return merged, spread


def _combine(name: str, values: list[float], shards: bool) -> tuple[float | None, float]:
    if not values:
        return None, 0.0
    if name in COUNT_METRICS:
        return float(sum(values)), 0.0
    if shards and name in NORM_METRICS:
        return math.sqrt(sum(v * v for v in values)), 0.0
    mean = sum(values) / len(values)
    if shards or len(values) < 2:
        return mean, 0.0
    scale = abs(mean)
    spread = (max(values) - min(values)) / scale if scale > 0 else 0.0
    return mean, spread


def note_dict(layer_mean: dict[str, list[float | None]]) -> dict:
    """The design note's nested shape: expert_gradients and divergence_scores."""
    n_experts = len(layer_mean.get("norm", []))
    gradients: dict[str, dict[str, float | None]] = {}
    divergence: dict[str, float | None] = {}
    for e in range(n_experts):
        entry = {m: layer_mean[m][e] for m in TIER_METRICS if m in layer_mean}
        entry["clean_norm" if e == 0 else "perturbed_norm"] = layer_mean["norm"][e]
        gradients[f"expert_{e}"] = entry
        if e >= 1 and "divergence" in layer_mean:
            divergence[f"expert_{e}_divergence"] = layer_mean["divergence"][e]
    return {"expert_gradients": gradients, "divergence_scores": divergence}
