"""Combining metrics across layers and across ranks (the collector's rules, shared with the
trainer's `log_gradient_dynamics`, which returns the design note's layer-averaged dict)."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from functools import reduce
from operator import add

from prismatic.wire import COUNT_METRICS, TIER_METRICS

Table = list[list[float | None]]  # [layer][expert]
NORM_METRICS = (*TIER_METRICS, "norm")


def _sum(values: Iterable[float]) -> float:
    """Left to right, as Python 3.11's sum() adds floats. From 3.12 sum() compensates rounding,
    which would change a mean's last bit with the Python version; the collector's numpy path
    (collector/burst.py) adds in this order too, so both store the same bits."""
    return reduce(add, values, 0)


def mean_of(values: Sequence[float], total: float | None = None) -> float:
    """The mean of finite values: their sum / n, or where the sum overflows (norms near
    float64's limit) the sum of value / n, which stays finite. `total`: their sum, if known."""
    n = len(values)
    total = _sum(values) if total is None else total
    if math.isinf(total):
        return _sum(v / n for v in values)
    return total / n


def _mean(values: Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return mean_of(present) if present else None


def mean_over_layers(metrics: dict[str, Table]) -> dict[str, list[float | None]]:
    """{name: [value per expert]}: the mean over layers (the design note's rule), skipping
    missing values; counts (`nonfinite`) are summed instead."""
    out: dict[str, list[float | None]] = {}
    for name, table in metrics.items():
        try:
            columns = list(zip(*table, strict=True))
        except ValueError:  # layers of different widths (only from combined, ragged ranks)
            out[name] = _mean_with_gaps(name, table)
            continue
        try:
            sums = list(map(_sum, columns))  # in C; TypeError if a value is missing (None)
        except TypeError:
            out[name] = _column_means(name, columns, len(table))
            continue
        if name in COUNT_METRICS:
            out[name] = list(map(float, sums))
        else:
            out[name] = [mean_of(col, total) for col, total in zip(columns, sums, strict=True)]
    return out


def _column_means(name: str, columns: list[tuple], n_layers: int) -> list[float | None]:
    """Column by column, for a table with missing values (expert 0's divergence, say)."""
    if name in COUNT_METRICS:
        return [float(_sum(v for v in col if v is not None)) for col in columns]
    out: list[float | None] = []
    for column in columns:
        try:
            out.append(mean_of(column))
        except TypeError:
            out.append(_mean(column))
    return out


def _mean_with_gaps(name: str, table: Table) -> list[float | None]:
    width = max(len(row) for row in table)
    padded = [row + [None] * (width - len(row)) for row in table]
    return _column_means(name, list(zip(*padded, strict=True)), len(table))


def combine_ranks(
    per_rank: Sequence[dict[str, Table]], shards: bool
) -> tuple[dict[str, Table], float | None]:
    """Merge the same step from several ranks; returns (metrics, largest relative spread).

    Data-parallel ranks hold synchronised gradients, so their gradient norms should agree: the
    mean is stored and the largest (max - min) / |mean| over the norms flags a desync (routing
    weights come from each rank's own batch and legitimately differ, so they do not count).

    When ranks hold disjoint shards of every parameter, a norm over the whole parameter is
    sqrt(sum of squares) over ranks, never a mean; divergence is recombined exactly from the
    shards' dot products (cosine * norm * norm); counts add up. The spread is then None: there
    is nothing that should agree.
    """
    if len(per_rank) == 1:
        return per_rank[0], (None if shards else 0.0)
    names = sorted(set().union(*per_rank))
    n_layers = max(len(t) for m in per_rank for t in m.values())
    n_experts = max(len(r) for m in per_rank for t in m.values() for r in t)
    merged: dict[str, Table] = {}
    spread = 0.0
    for name in names:
        merged[name] = []
        for layer in range(n_layers):
            row: list[float | None] = []
            for expert in range(n_experts):
                values = _values_at(per_rank, name, layer, expert)
                value, s = _combine(name, values, shards)
                spread = max(spread, s)
                row.append(value)
            merged[name].append(row)
    if shards and "divergence" in merged and "norm" in merged:
        merged["divergence"] = _shard_divergence(per_rank, merged["norm"], n_layers, n_experts)
    return merged, (None if shards else spread)


def _values_at(per_rank: Sequence[dict[str, Table]], name: str, layer: int, expert: int) -> list:
    out = []
    for metrics in per_rank:
        table = metrics.get(name)
        if table is None or layer >= len(table) or expert >= len(table[layer]):
            continue
        value = table[layer][expert]
        if value is not None:
            out.append(value)
    return out


def _combine(name: str, values: list[float], shards: bool) -> tuple[float | None, float]:
    if not values:
        return None, 0.0
    if name in COUNT_METRICS:
        # Shards count disjoint values; data-parallel replicas count the same ones again.
        return float(sum(values) if shards else max(values)), 0.0
    if shards and name in NORM_METRICS:
        squares = sum(v * v for v in values)
        # hypot where the squares overflow: the same norm, without passing through Inf; a norm
        # beyond float64 itself is no value (None), as an Inf sent in is
        norm = math.sqrt(squares) if math.isfinite(squares) else math.hypot(*values)
        return (norm if math.isfinite(norm) else None), 0.0
    mean = mean_of(values, sum(values))
    if shards or name not in NORM_METRICS or len(values) < 2:
        return mean, 0.0
    scale = abs(mean)
    spread = (max(values) - min(values)) / scale if scale > 0 else 0.0
    return mean, spread


def _shard_divergence(
    per_rank: Sequence[dict[str, Table]], total_norm: Table, n_layers: int, n_experts: int
) -> Table:
    """1 - cos over the whole parameter, from each shard's divergence and norms:
    cos = sum_s (1 - d_s) * |g_k,s| * |g_0,s| / (|g_k| * |g_0|)."""
    out: Table = []
    for layer in range(n_layers):
        row: list[float | None] = [None]  # expert 0 has no divergence to itself
        for expert in range(1, n_experts):
            whole_k, whole_0 = total_norm[layer][expert], total_norm[layer][0]
            if not whole_k or not whole_0:
                row.append(None)
                continue
            cos = 0.0
            for metrics in per_rank:
                d = _at(metrics, "divergence", layer, expert)
                nk = _at(metrics, "norm", layer, expert)
                n0 = _at(metrics, "norm", layer, 0)
                if d is None or nk is None or n0 is None:
                    if nk and n0:  # a shard with gradient but no divergence: cannot recombine
                        cos = math.nan
                    continue
                # each norm over its whole first: no product of two large norms overflows
                cos += (1.0 - d) * (nk / whole_k) * (n0 / whole_0)
            row.append(None if math.isnan(cos) else 1.0 - cos)
        out.append(row[:n_experts])
    return out


def _at(metrics: dict[str, Table], name: str, layer: int, expert: int) -> float | None:
    table = metrics.get(name)
    if table is None or layer >= len(table) or expert >= len(table[layer]):
        return None
    return table[layer][expert]


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
