"""Metric tables read straight from their msgpack bytes into numpy, many messages at once.

The trainer's `metrics` maps differ from one message to the next only in the bytes of their
values: the same names, shapes and nulls, every value a float64 (msgpack's `0xcb` marker and 8
big-endian bytes). A `Layout` records one such map's encoding: where each float64's 8 bytes lie
(its slots) and every other byte (the skeleton). Another map whose bytes equal the skeleton
everywhere decodes, by msgpack's own rules, to the same names, shapes and nulls, with the
floats its slots hold (a float64 marker takes the next 8 bytes whatever they are). So a burst's
maps are matched against a layout and their values read with a few numpy calls, without a
Python object per value.

A layout is only made from a map that msgpack itself decodes to known metric names and equal
shapes of floats and None, and that msgpack encodes back to the very same bytes; its slots
are placed with msgpack's own Packer (the size of each header) and checked against the floats
msgpack decoded from them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import msgpack
import numpy as np

from prismatic import wire

FLOAT64_MARKER = 0xCB
MAX_LAYOUTS = 64  # kept per collector process (a run's maps have one or a few)


@dataclass(frozen=True, eq=False)  # compared and hashed as itself
class Layout:
    """Where the values of one encoding of a metrics map lie in its bytes."""

    names: tuple[str, ...]
    n_layers: int
    n_experts: int
    size: int  # bytes of the encoded map
    skeleton: np.ndarray  # (bytes,) positions of every byte that is not a float's
    expected: np.ndarray  # (bytes,) uint8: what the skeleton holds
    payload: np.ndarray  # (floats, 8) positions of each float's 8 bytes
    float_slots: np.ndarray  # (floats,) flat [name][layer][expert] index of each float
    nil_slots: np.ndarray  # (nils,) the same for each nil
    non_negative: np.ndarray  # (floats,) bool: a value of a metric that cannot be negative
    count: np.ndarray  # (floats,) bool: a value of a count metric

    @property
    def shape(self) -> tuple[int, int, int]:
        """(names, layers, experts) of the tables, stacked."""
        return len(self.names), self.n_layers, self.n_experts

    @property
    def missing(self) -> np.ndarray:
        """(names, layers, experts) bool: where the map holds nil."""
        out = np.zeros(int(np.prod(self.shape)), dtype=bool)
        out[self.nil_slots] = True
        return out.reshape(self.shape)

    def matches(self, rows: np.ndarray) -> np.ndarray:
        """rows: (messages, size) uint8 -> (messages,) bool: encoded exactly like this one."""
        return (rows[:, self.skeleton] == self.expected).all(axis=1)

    def floats(self, rows: np.ndarray) -> np.ndarray:
        """rows: (messages, size) uint8 of matching maps -> (messages, floats) float64."""
        raw = np.ascontiguousarray(rows[:, self.payload])  # (messages, floats, 8)
        return raw.view(">f8").reshape(len(rows), -1).astype(np.float64)

    def plainly_valid(self, floats: np.ndarray) -> np.ndarray:
        """(messages,) bool: every value finite, none negative where it cannot be, every count
        zero, as `wire.validate_metrics` takes them unchanged; the others need its checks."""
        with np.errstate(invalid="ignore"):
            ok = np.isfinite(floats).all(axis=1)
            ok &= (floats[:, self.non_negative] >= 0.0).all(axis=1)  # -0.0 passes, as in wire
            ok &= (floats[:, self.count] == 0.0).all(axis=1)
        return ok


def layout_of(raw: bytes) -> Layout | None:
    """The layout of one encoded metrics map; None unless msgpack decodes it to plain tables
    (known names, equal shapes, floats and None only) and encodes those to the same bytes."""
    try:
        tables = msgpack.unpackb(raw, raw=False, strict_map_key=False)
    except Exception:  # msgpack raises several unrelated types on garbage
        return None
    shape = _plain_shape(tables)
    if shape is None or msgpack.packb(tables, use_bin_type=True) != raw:
        return None
    payload, float_slots, nil_slots, values = _slots(tables, len(raw))
    if payload is None:
        return None
    template = np.frombuffer(raw, dtype=np.uint8)
    starts = np.array(payload, dtype=np.intp)
    positions = starts[:, None] + np.arange(8)
    read = template[positions].view(">f8").ravel().astype(np.float64)
    decoded = np.array(values, dtype=np.float64)
    markers_ok = (template[starts - 1] == FLOAT64_MARKER).all()
    if not markers_ok or (read.view(np.uint64) != decoded.view(np.uint64)).any():
        return None  # not where msgpack put them: no fast path for this encoding
    is_skeleton = np.ones(len(raw), dtype=bool)
    is_skeleton[positions.ravel()] = False
    skeleton = np.flatnonzero(is_skeleton)
    names = tuple(tables)
    cells = shape[0] * shape[1]
    metric_of = [names[s // cells] for s in float_slots]
    return Layout(
        names=names,
        n_layers=shape[0],
        n_experts=shape[1],
        size=len(raw),
        skeleton=skeleton,
        expected=template[skeleton].copy(),
        payload=positions,
        float_slots=np.array(float_slots, dtype=np.intp),
        nil_slots=np.array(nil_slots, dtype=np.intp),
        non_negative=np.array([m in wire.NON_NEGATIVE_METRICS for m in metric_of], dtype=bool),
        count=np.array([m in wire.COUNT_METRICS for m in metric_of], dtype=bool),
    )


def _plain_shape(tables: Any) -> tuple[int, int] | None:
    """(layers, experts) if `tables` is a non-empty map of known names to tables of one shape,
    1..MAX_LAYERS x 1..MAX_EXPERTS, holding floats and None only; else None."""
    if type(tables) is not dict or not tables or not tables.keys() <= wire._METRIC_SET:
        return None
    shapes = set()
    for table in tables.values():
        if type(table) is not list or not 0 < len(table) <= wire.MAX_LAYERS:
            return None
        if set(map(type, table)) != {list} or len(set(map(len, table))) != 1:
            return None
        shapes.add((len(table), len(table[0])))
        if not set(map(type, (v for row in table for v in row))) <= {float, type(None)}:
            return None
    if len(shapes) != 1:
        return None
    n_layers, n_experts = shapes.pop()
    return (n_layers, n_experts) if 0 < n_experts <= wire.MAX_EXPERTS else None


def _slots(
    tables: dict[str, list[list[float | None]]], size: int
) -> tuple[list[int] | None, list[int], list[int], list[float]]:
    """Where each float's 8 bytes start in the canonical encoding of `tables` (None if the
    encoding does not end at `size`), the flat slot of each float and nil, and the floats."""
    packer = msgpack.Packer(use_bin_type=True)
    position = len(packer.pack_map_header(len(tables)))
    payload: list[int] = []
    float_slots: list[int] = []
    nil_slots: list[int] = []
    values: list[float] = []
    slot = 0
    for name, table in tables.items():
        position += len(packer.pack(name)) + len(packer.pack_array_header(len(table)))
        for row in table:
            position += len(packer.pack_array_header(len(row)))
            for value in row:
                if value is None:
                    nil_slots.append(slot)
                    position += 1  # nil: one byte
                else:
                    float_slots.append(slot)
                    values.append(value)
                    payload.append(position + 1)
                    position += 9  # float64: marker and 8 bytes
                slot += 1
    return (payload if position == size else None), float_slots, nil_slots, values


class LayoutCache:
    """The layouts seen lately, by encoded size; bounded (cleared when full)."""

    def __init__(self, limit: int = MAX_LAYOUTS) -> None:
        self.limit = limit
        self._by_size: dict[int, list[Layout]] = {}
        self._count = 0

    def match(self, rows: np.ndarray) -> tuple[Layout, np.ndarray] | None:
        """A known layout that some of `rows` have, and which rows have it."""
        for layout in self._by_size.get(rows.shape[1], ()):
            matched = layout.matches(rows)
            if matched.any():
                return layout, matched
        return None

    def add(self, layout: Layout) -> None:
        if self._count >= self.limit:
            self._by_size.clear()
            self._count = 0
        self._by_size.setdefault(layout.size, []).insert(0, layout)
        self._count += 1
