"""A burst of messages received together, checked and averaged together with numpy.

The per-message work of the common case (a trainer's plainly valid tables: floats and None,
finite, non-negative, zero counts) is done once per burst for every message of one metric set
and shape: the check of `wire._plainly_valid`, the layer means of `aggregate.mean_over_layers`
and the `layer_dynamics` parameters of `RunStore._write_layers`. A group that is not plainly
valid as a whole goes message by message through `wire.validate_metrics`, exactly as before,
so every rejection reason, cleaned value and NaN/Inf count stays the same.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import chain
from typing import Any

import numpy as np

from collector.store import CELLS_PER_STATEMENT, LayerRows, layer_cells_sql
from prismatic import wire
from prismatic.errors import ProtocolError

_FLOAT_OR_NONE = frozenset((float, type(None)))
# Messages checked together: enough to spread numpy's per-call cost thin, few enough that
# their decoded objects stay in the CPU's cache (measured per message: 64 as fast as 48 to 128,
# a third faster than 256, twice as fast as 1024).
CHUNK = 64
SMALL = 8  # a failing group this small is checked message by message
# Fewer messages of one shape than this are checked one by one: numpy's fixed cost per group
# (about 0.1 ms) outweighs what it saves below 4 (measured: 1 message 118 us in a group of its
# own, 45 us alone; 4 messages 40 us each).
FEWEST = 4
Decoded = tuple[dict[str, Any], "Prepared | None"] | ProtocolError


@dataclass
class Prepared:
    """What a plainly valid message's single-rank row needs, computed with its burst."""

    layer_mean: dict[str, list[float | None]]
    layer_rows: LayerRows | None


class Burst:
    """Messages received together, decoded CHUNK at a time as they are asked for."""

    def __init__(self, datas: list[bytes]) -> None:
        self._datas = datas
        self._decoded: list[Decoded] = []
        self._next = 0

    def take(self, data: bytes) -> tuple[dict[str, Any], Prepared | None] | None:
        """The next message's decoding (raising its ProtocolError); None if `data` is not
        the next message of the burst (the caller decodes it alone)."""
        i = self._next
        if i >= len(self._datas) or self._datas[i] is not data:
            return None
        if i % CHUNK == 0:
            self._decoded = decode_burst(self._datas[i : i + CHUNK])
        self._next = i + 1
        result = self._decoded[i % CHUNK]
        if isinstance(result, ProtocolError):
            raise result
        return result


def decode_burst(datas: list[bytes]) -> list[Decoded]:
    """Each message as `wire.decode` makes it (or the ProtocolError it raises), with the
    Prepared row parts of those checked in the fast path."""
    out: list[Decoded] = []
    groups: dict[Any, list[int]] = {}
    for data in datas:
        try:
            message, deferred = wire.decode_deferred(data)
        except ProtocolError as exc:
            out.append(exc)
            continue
        if deferred:
            groups.setdefault(_shape_key(message["metrics"]), []).append(len(out))
        out.append((message, None))
    for key, indices in groups.items():
        messages = [out[i][0] for i in indices]  # type: ignore[index]
        fast = key is not None and len(indices) >= FEWEST
        prepared = _prepare_all(messages, key) if fast else [None] * len(indices)
        for i, message, p in zip(indices, messages, prepared, strict=True):
            out[i] = (message, p) if p is not None else _check_one(message)
    return out


def _prepare_all(
    messages: list[dict[str, Any]], key: tuple[tuple[Any, ...], int, int]
) -> list[Prepared | None]:
    """Prepared parts for as many messages as can have them: a group that fails is halved
    until the failing messages are in groups of at most SMALL, left to the one-message checks
    (None), so that one bad message costs its neighbours little."""
    prepared = _prepare(messages, key)
    if prepared is not None:
        return list(prepared)
    if len(messages) <= SMALL:
        return [None] * len(messages)
    half = len(messages) // 2
    return _prepare_all(messages[:half], key) + _prepare_all(messages[half:], key)


def _check_one(message: dict[str, Any]) -> Decoded:
    """The deferred check of one message, as `wire.decode` does it."""
    try:
        metrics, nonfinite = wire.validate_metrics(message["metrics"])
    except ProtocolError as exc:
        return exc
    message["metrics"] = metrics
    message["nonfinite_values"] += nonfinite
    return message, None


def _shape_key(metrics: Any) -> tuple[tuple[Any, ...], int, int] | None:
    """(names in order, layers, experts) as the first table says; None if it cannot say."""
    if type(metrics) is not dict or not metrics:
        return None
    first = next(iter(metrics.values()))
    if type(first) is not list or not first or type(first[0]) is not list:
        return None
    return tuple(metrics), len(first), len(first[0])


def _prepare(
    messages: list[dict[str, Any]], key: tuple[tuple[Any, ...], int, int]
) -> list[Prepared] | None:
    """The messages' Prepared parts, or None unless every one is plainly valid."""
    names, n_layers, n_experts = key
    values = _plain_values(messages, key)
    if values is None:
        return None
    shape = (len(messages), len(names), n_layers, n_experts)
    decoded = np.array(values, dtype=object).reshape(shape)  # the very objects, None included
    missing = np.equal(decoded, None)  # type: ignore[call-overload]  # elementwise `is None`
    table = decoded.astype(float)  # None becomes NaN, masked by `missing` from here on
    if np.isnan(table[~missing]).any() or not _in_range(table, missing, names):
        return None  # a NaN was sent, or a value is out of range
    means = _layer_means(table, missing, names)
    rows = _layer_rows([m["step"] for m in messages], decoded, names)
    records: list[LayerRows | None] = list(rows) if rows else [None] * len(messages)
    return [
        Prepared(dict(zip(names, m, strict=True)), r) for m, r in zip(means, records, strict=True)
    ]


def _plain_values(
    messages: list[dict[str, Any]], key: tuple[tuple[Any, ...], int, int]
) -> list[Any] | None:
    """Every value of every table, flat, if all the messages have exactly this metric set and
    shape, in known names, holding floats and None only; else None. All in C passes."""
    names, n_layers, n_experts = key
    if not set(names) <= wire._METRIC_SET:
        return None
    if not (0 < n_layers <= wire.MAX_LAYERS and 0 < n_experts <= wire.MAX_EXPERTS):
        return None
    metrics = [m["metrics"] for m in messages]
    if set(map(tuple, metrics)) != {names}:
        return None
    tables = list(chain.from_iterable(map(dict.values, metrics)))
    if set(map(type, tables)) != {list} or set(map(len, tables)) != {n_layers}:
        return None
    rows = list(chain.from_iterable(tables))
    if set(map(type, rows)) != {list} or set(map(len, rows)) != {n_experts}:
        return None
    values = list(chain.from_iterable(rows))
    return values if set(map(type, values)) <= _FLOAT_OR_NONE else None


def _in_range(table: np.ndarray, missing: np.ndarray, names: tuple[str, ...]) -> bool:
    """No Inf; no negative value where none can be; every count zero."""
    if np.isinf(table).any():
        return False
    non_negative = [i for i, n in enumerate(names) if n in wire.NON_NEGATIVE_METRICS]
    if non_negative and (table[:, non_negative] < 0.0).any():
        return False
    counts = [i for i, n in enumerate(names) if n in wire.COUNT_METRICS]
    return not (counts and ((table[:, counts] != 0.0) & ~missing[:, counts]).any())


def _layer_means(
    table: np.ndarray, missing: np.ndarray, names: tuple[str, ...]
) -> list[list[list[float | None]]]:
    """[message][name][expert] as `aggregate.mean_over_layers`: the mean of the values present,
    None where there are none; counts summed. Summed layer by layer, in order, so each float
    is the one Python's sum() gives (numpy's pairwise sum could differ in the last bit)."""
    filled = np.where(missing, 0.0, table)
    present = table.shape[2] - missing.sum(axis=2)
    counts = np.array([n in wire.COUNT_METRICS for n in names])[None, :, None]
    with np.errstate(all="ignore"):  # overflow to Inf, 0/0: as in Python, then None
        sums = filled[:, :, 0].copy()
        for layer in range(1, table.shape[2]):
            sums += filled[:, :, layer]
        sums += 0.0  # Python's sum() starts at 0: a sum of -0.0s is 0.0
        means = np.where(counts, sums, sums / present)
    out = means.astype(object)
    out[(present == 0) & ~counts] = None
    return out.tolist()


def _layer_rows(
    steps: list[int], decoded: np.ndarray, names: tuple[str, ...]
) -> list[LayerRows] | None:
    """Each message's `layer_dynamics` INSERT and its parameters: the step, then each cell's
    metrics in EXPERT_METRICS order; None if they need more than one statement. They hold the
    decoded values themselves (None included): no new float objects to make and free."""
    n, _, n_layers, n_experts = decoded.shape
    n_cells = n_layers * n_experts
    if n_cells > CELLS_PER_STATEMENT:
        return None
    metrics = tuple(m for m in wire.EXPERT_METRICS if m in names)
    sql = layer_cells_sql(metrics, n_layers, n_experts)
    order = [names.index(m) for m in metrics]
    # [message][metric][layer][expert] -> [message][layer][expert][metric], flat per message
    params = np.empty((n, 1 + n_cells * len(metrics)), dtype=object)
    params[:, 0] = steps
    params[:, 1:] = decoded[:, order].transpose(0, 2, 3, 1).reshape(n, -1)
    return [(sql, p) for p in params.tolist()]
