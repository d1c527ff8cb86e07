"""A burst of messages received together, decoded, checked and averaged together with numpy.

Two tiers, the first for the trainer's messages, each handing what it cannot take to the next:

1. Bytes: a `dynamics` message's header is decoded and checked by msgspec (`_Header`: the types
   and ranges of `wire.validate`), its `metrics` map left as bytes; maps encoded alike (the
   same names, shapes and nulls, float64 values: collector/layout.py) are read into one numpy
   array per burst, checked, layer-averaged and turned into `layer_dynamics` parameters there.
   Anything else (another kind, an unknown field, a field msgspec refuses, a value that is not
   plainly valid) goes to tier 2, which decodes it again from the start.
2. Objects: msgpack's decoding and `wire.validate`, the tables of plainly valid messages (floats
   and None, finite, non-negative, zero counts) checked per metric set and shape with numpy on
   the decoded objects; a group that is not plainly valid as a whole goes message by message
   through `wire.validate_metrics`, exactly as one message alone.

Either way every message ends as `wire.decode` makes it, or with the ProtocolError it raises:
every rejection reason, cleaned value and NaN/Inf count stays the same.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from itertools import chain
from typing import Annotated, Any, Literal

import msgspec
import numpy as np

from collector.layout import MAX_LAYOUTS, Layout, LayoutCache, layout_of
from collector.store import CELLS_PER_STATEMENT, LayerRows, LayerShape, Means
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
LAYOUT_TRIES = 4  # new layouts made per group of a burst at most (a sender of odd encodings)
Decoded = tuple[dict[str, Any], "Prepared | None"] | ProtocolError
_U63 = Annotated[int, msgspec.Meta(ge=0, le=2**63 - 1)]


class _Header(msgspec.Struct, forbid_unknown_fields=True, gc=False):
    """A `dynamics` message as `wire.validate` accepts it, the metrics map still encoded. Each
    field takes exactly what wire.py takes (msgspec refuses bool for int, and a float for int);
    a message this refuses, or one with any other field, is decoded by tier 2 instead."""

    v: Literal[1]
    kind: Literal["dynamics"]
    run: Annotated[str, msgspec.Meta(pattern=wire.RUN_HASH_RE.pattern)]
    rank: Annotated[int, msgspec.Meta(ge=0, le=wire.MAX_RANK)]
    seq: _U63
    step: Annotated[int, msgspec.Meta(ge=0, le=wire.MAX_STEP)]
    metrics: msgspec.Raw
    ts: Annotated[float, msgspec.Meta(ge=wire.MIN_TS, le=wire.MAX_TS)] | None = None
    spool_offset: _U63 | None = None
    loss: float | None = None
    val_loss: float | None = None
    lr: float | None = None


_HEADER = msgspec.msgpack.Decoder(_Header)
LAYOUTS = LayoutCache()


@dataclass(slots=True)
class Prepared:
    """What a plainly valid message's single-rank row needs, computed with its burst (its
    counts are all zero: the row's nonfinite is 0)."""

    layer_mean: Mapping[str, list[float | None]]
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
    Prepared row parts of those checked in a fast path."""
    out: list[Decoded | None] = [None] * len(datas)
    by_size: dict[int, list[tuple[int, _Header]]] = {}
    for i, data in enumerate(datas):
        header = _header(data)
        if header is not None:
            by_size.setdefault(len(header.metrics), []).append((i, header))
    for group in by_size.values():
        if len(group) >= FEWEST:
            _decode_tables(group, out)
    rest = [i for i, result in enumerate(out) if result is None]
    for i, result in zip(rest, decode_objects([datas[i] for i in rest]), strict=True):
        out[i] = result
    return out  # type: ignore[return-value]  # every None was filled


def _header(data: bytes) -> _Header | None:
    if len(data) > wire.MAX_MESSAGE_BYTES:
        return None
    try:
        return _HEADER.decode(data)
    except Exception:  # refused, or anything msgspec finds odd: tier 2 says what is wrong
        return None


def _decode_tables(group: list[tuple[int, _Header]], out: list[Decoded | None]) -> None:
    """Tier 1 for messages whose metrics maps have one size: each layout that some of them
    have reads those at once. What no layout reads is left None in `out` (tier 2's)."""
    rows = np.frombuffer(b"".join(h.metrics for _, h in group), dtype=np.uint8)
    rows = rows.reshape(len(group), -1)  # (messages, bytes of a map)
    todo = np.arange(len(group))
    tries = 0
    while len(todo) >= FEWEST:
        found = LAYOUTS.match(rows[todo])
        if found is None:
            if tries == LAYOUT_TRIES:
                return
            tries += 1
            layout = layout_of(bytes(group[todo[0]][1].metrics))
            if layout is None:
                todo = todo[1:]
                continue
            LAYOUTS.add(layout)
            found = layout, layout.matches(rows[todo])
        layout, matched = found
        members = todo[matched]
        _read(layout, [group[j] for j in members], rows[members], out)
        todo = todo[~matched]


def _read(
    layout: Layout, group: list[tuple[int, _Header]], rows: np.ndarray, out: list[Decoded | None]
) -> None:
    """The messages of one layout: the plainly valid ones decoded into `out`, with their
    layer means and layer_dynamics parameters; the others left for tier 2."""
    floats = layout.floats(rows)
    valid = layout.plainly_valid(floats)
    if not valid.all():
        group = [g for g, ok in zip(group, valid, strict=True) if ok]
        floats = floats[valid]
    if not group:
        return
    plan = _plan(layout)
    n = len(group)
    values = np.full((n, plan.missing.size), np.nan)
    values[:, layout.float_slots] = floats  # [message][name, layer, expert], nil as NaN
    means = _flat_means(plan, values.reshape(n, *layout.shape))
    records = _records(plan, values)
    names, n_experts = layout.names, layout.n_experts
    for j, ((i, header), mean, record) in enumerate(zip(group, means, records, strict=True)):
        message = _message(header, Tables(names, values, j, plan.missing))
        # A plainly valid message's counts are all zero: its row's nonfinite is 0.
        out[i] = message, Prepared(Means(names, mean, n_experts), record)


@dataclass(frozen=True, eq=False)
class _Plan:
    """What tier 1 makes of the values of one layout, worked out once for it."""

    missing: np.ndarray  # (names, layers, experts) bool: nil
    counts: np.ndarray  # (names, 1) bool: a count metric (summed over layers, not averaged)
    present: np.ndarray  # (names, experts) values over the layers
    no_mean: np.ndarray  # flat [name][expert] positions of means that are None (no value)
    layer_shape: LayerShape | None  # None if one step needs more than one statement
    cells: np.ndarray  # flat slot of each layer_dynamics parameter but the step


@functools.lru_cache(maxsize=MAX_LAYOUTS)
def _plan(layout: Layout) -> _Plan:
    names, n_layers, n_experts = layout.names, layout.n_layers, layout.n_experts
    missing = layout.missing
    counts = np.array([n in wire.COUNT_METRICS for n in names])[:, None]
    present = n_layers - missing.sum(axis=1)
    metrics = tuple(m for m in wire.EXPERT_METRICS if m in names)
    # [layer][expert][metric in EXPERT_METRICS order] -> the value's flat slot
    slots = np.arange(missing.size).reshape(layout.shape)
    cells = slots[[names.index(m) for m in metrics]].transpose(1, 2, 0).ravel()
    small = n_layers * n_experts <= CELLS_PER_STATEMENT
    return _Plan(
        missing=missing,
        counts=counts,
        present=present,
        no_mean=np.flatnonzero((present == 0) & ~counts),
        layer_shape=(metrics, n_layers, n_experts) if small else None,
        cells=cells,
    )


def _flat_means(plan: _Plan, table: np.ndarray) -> list[bytes]:
    """table: (messages, names, layers, experts), nil as NaN -> each message's layer means,
    [name][expert] flat as float64 bytes (store.Means), as `aggregate.mean_over_layers` makes
    them: the mean of the values present, NaN (None) where there are none, counts summed.
    Summed layer by layer, in order, so each float is the one Python's sum() gives (numpy's
    pairwise sum could differ)."""
    filled = np.where(plan.missing, 0.0, table)
    with np.errstate(all="ignore"):  # overflow to Inf, 0/0: as in Python, then None
        sums = filled[:, :, 0].copy()
        for layer in range(1, table.shape[2]):
            sums += filled[:, :, layer]
        sums += 0.0  # Python's sum() starts at 0: a sum of -0.0s is 0.0
        means = np.where(plan.counts, sums, sums / plan.present)
    means = _unoverflowed(means, filled, plan.present, plan.counts)
    out = means.reshape(len(table), -1)
    out[:, plan.no_mean] = np.nan  # what else is NaN here: 0/0 where no value, also no mean
    data = np.ascontiguousarray(out).tobytes()
    size = out.shape[1] * 8
    return [data[i : i + size] for i in range(0, len(data), size)]


def _records(plan: _Plan, values: np.ndarray) -> list[LayerRows | None]:
    """Each message's layer_dynamics records (store.layer_cells_sql), None for a shape that
    needs more than one statement a step."""
    if plan.layer_shape is None:
        return [None] * len(values)
    return list(cell_records(plan.layer_shape, values[:, plan.cells]))


def cell_records(shape: LayerShape, cells: np.ndarray) -> list[LayerRows]:
    """LayerRows for each row of `cells` (steps x their parameters, nil as NaN)."""
    data = np.ascontiguousarray(cells, dtype=np.float64).tobytes()
    size = cells.shape[1] * 8
    if not size:
        return [(shape, b"") for _ in range(len(cells))]
    return [(shape, data[i : i + size]) for i in range(0, len(data), size)]


class Tables(Mapping[str, list[list[Any]]]):
    """A tier-1 message's `metrics`, {name: [[value per expert] per layer]}, made into lists
    when first read. Most messages never need them (their layer means and layer_dynamics
    records come with their burst), and making and freeing some forty lists a message cost a
    fifth of the collector's time (measured in-process: 72 -> 57 us a message)."""

    __slots__ = ("_names", "_values", "_index", "_missing", "_tables")

    def __init__(
        self, names: tuple[str, ...], values: np.ndarray, index: int, missing: np.ndarray
    ) -> None:
        self._names = names
        self._values = values  # (messages, names x layers x experts) float64, nil as NaN
        self._index = index  # this message's row of them
        self._missing = missing  # (names, layers, experts) bool: nil
        self._tables: dict[str, list[list[Any]]] | None = None

    def _made(self) -> dict[str, list[list[Any]]]:
        if self._tables is None:
            values = self._values[self._index].reshape(self._missing.shape).astype(object)
            values[self._missing] = None
            self._tables = dict(zip(self._names, values.tolist(), strict=True))
        return self._tables

    def __getitem__(self, name: str) -> list[list[Any]]:
        return self._made()[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)

    def __repr__(self) -> str:
        return repr(self._made())


def _message(header: _Header, metrics: Tables) -> dict[str, Any]:
    """The message `wire.validate` makes of this header and (valid) metrics."""
    loss, bad_loss = wire.finite(header.loss)
    val_loss, bad_val = wire.finite(header.val_loss)
    lr, bad_lr = wire.finite(header.lr)
    return {
        "v": header.v,
        "kind": header.kind,
        "run": header.run,
        "rank": header.rank,
        "seq": header.seq,
        "ts": header.ts,
        "spool_offset": header.spool_offset,
        "step": header.step,
        "loss": loss,
        "val_loss": val_loss,
        "lr": lr,
        "metrics": metrics,
        "nonfinite_values": bad_loss + bad_val + bad_lr,
    }


def decode_objects(datas: list[bytes]) -> list[Decoded]:
    """Tier 2: each message as `wire.decode` makes it (or the ProtocolError it raises), with
    the Prepared row parts of those checked in its fast path."""
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
    rows = _layer_rows(table, names)
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


def _unoverflowed(
    means: np.ndarray, filled: np.ndarray, present: np.ndarray, counts: np.ndarray
) -> np.ndarray:
    """Where a layer sum overflowed to Inf (finite values near float64's limit), the mean as
    `aggregate.mean_of` takes it: value / n summed layer by layer, in order."""
    over = np.isinf(means) & ~counts
    if not over.any():
        return means
    with np.errstate(all="ignore"):
        alt = filled[:, :, 0] / present
        for layer in range(1, filled.shape[2]):
            alt += filled[:, :, layer] / present
        alt += 0.0
    return np.where(over, alt, means)


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
    means = _unoverflowed(means, filled, present, counts)
    out = means.astype(object)
    out[(present == 0) & ~counts] = None
    return out.tolist()


def _layer_rows(table: np.ndarray, names: tuple[str, ...]) -> list[LayerRows] | None:
    """Each message's `layer_dynamics` records (store.layer_cells_sql) from its tables
    (messages, names, layers, experts; nil as NaN); None if one step needs more than one
    statement."""
    n, _, n_layers, n_experts = table.shape
    if n_layers * n_experts > CELLS_PER_STATEMENT:
        return None
    metrics = tuple(m for m in wire.EXPERT_METRICS if m in names)
    order = [names.index(m) for m in metrics]
    # [message][metric][layer][expert] -> [message][layer][expert][metric], flat per message
    cells = table[:, order].transpose(0, 2, 3, 1).reshape(n, -1)
    return cell_records((metrics, n_layers, n_experts), cells)
