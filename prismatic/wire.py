"""The wire format between trainers and the collector: msgpack maps, one module for both sides.

Every message is a map with `v` (schema version), `kind`, `run` (run hash), `rank` and `seq`
(per-sender sequence number). See docs/protocol.md for the full description. `decode` turns
bytes into a validated, normalised dict or raises `ProtocolError` whose `reason` is a short
counted label (`bad_msgpack`, `unknown_kind`, ...; every label is in `REJECT_REASONS`).
"""

from __future__ import annotations

import math
import re
import time
from itertools import chain
from typing import Any

import msgpack

from prismatic.errors import ProtocolError

WIRE_VERSION = 1
KIND_RUN_START = "run_start"
KIND_DYNAMICS = "dynamics"
KIND_RUN_END = "run_end"
KINDS = (KIND_RUN_START, KIND_DYNAMICS, KIND_RUN_END)
END_STATUSES = ("completed", "failed", "interrupted")

# Per layer and expert. `norm` is the whole-gradient norm: the database calls it `clean_norm` for
# expert 0 and `perturbed_norm` for the others, as the design note does.
TIER_METRICS = ("top_norm", "bottom_norm", "middle_norm")
EXPERT_METRICS = (
    *TIER_METRICS,
    "norm",
    "divergence",
    "weight_drift",
    "routing_weight",
    "nonfinite",
)
# Summed, not averaged, when layers (or sharded ranks) are combined.
COUNT_METRICS = ("nonfinite",)
# Values of these can never be negative: a negative one is a corrupt message, not a measurement.
NON_NEGATIVE_METRICS = frozenset((*TIER_METRICS, "norm", "weight_drift", "nonfinite"))
_METRIC_SET = frozenset(EXPERT_METRICS)
_LIST_TYPE = {list}
_FLOAT_OR_NONE = frozenset((float, type(None)))

MAX_COUNT = 2**40  # per layer and expert: summed over 512 layers and 4097 ranks it fits int64
# Every shape accepted below fits: MAX_LAYERS x MAX_EXPERTS with every metric is 9.4 MB
# (measured, float64 values); DeepSeek-V3's 61 x 256 is 1.1 MB.
MAX_MESSAGE_BYTES = 16 << 20
MAX_STEP = 10**12
MAX_LAYERS = 512
MAX_EXPERTS = 256
MAX_RANK = 4096
MAX_TREE_DEPTH = 16  # config, model and versions maps
MAX_TREE_NODES = 20_000
MAX_TEXT = 200  # host and name are cut to this many characters
# Timestamps are seconds since the epoch; anything outside these years is not a clock reading.
MIN_TS = 946_684_800.0  # 2000-01-01
MAX_TS = 7_258_118_400.0  # 2200-01-01
RUN_HASH_RE = re.compile(r"^[0-9a-f]{9}\Z")
_NOTE_EXPERT_RE = re.compile(r"^expert_(\d{1,3})\Z")
_NOTE_DIVERGENCE_RE = re.compile(r"^expert_(\d{1,3})_divergence\Z")
_NOTE_METRIC_ALIASES = {"clean_norm": "norm", "perturbed_norm": "norm"}

# Every reason `decode` / `validate` can reject with (docs/protocol.md explains each).
REJECT_REASONS = (
    "oversized",
    "bad_msgpack",
    "not_a_map",
    "bad_version",
    "unknown_kind",
    "bad_run_hash",
    "bad_field",
    "absurd_step",
    "unknown_metric",
    "bad_shape",
    "bad_value",
    "too_deep",
    "too_large",
)


def encode(message: dict[str, Any]) -> bytes:
    return msgpack.packb(message, use_bin_type=True)


def header(kind: str, run: str, rank: int, seq: int) -> dict[str, Any]:
    return {
        "v": WIRE_VERSION,
        "kind": kind,
        "run": run,
        "rank": rank,
        "seq": seq,
        "ts": time.time(),
    }


# --- decoding and validation -------------------------------------------------------------------


def decode(data: bytes) -> dict[str, Any]:
    """Bytes from the socket to a validated message; raises ProtocolError(reason)."""
    return validate(_unpack(data))


def decode_deferred(data: bytes) -> tuple[dict[str, Any], bool]:
    """`decode`, except that a dynamics message's `metrics` map is left unchecked: then True,
    and the caller must check it as `validate_metrics` does (that check is the last one, so
    deferring it leaves every rejection reason as it was) and add its NaN/Inf count to
    `nonfinite_values`. Lets the collector check a burst of messages' tables at once."""
    raw = _unpack(data)
    deferred = type(raw) is dict and raw.get("kind") == KIND_DYNAMICS and "metrics" in raw
    return validate(raw, defer_metrics=deferred), deferred


def _unpack(data: bytes) -> Any:
    if len(data) > MAX_MESSAGE_BYTES:
        raise ProtocolError("oversized", f"{len(data)} bytes > {MAX_MESSAGE_BYTES}")
    try:
        # Integer map keys are accepted (strict_map_key=False). msgpack bounds every container
        # by the buffer length (bounded above) and nesting by its own stack (StackError).
        raw = msgpack.unpackb(data, raw=False, strict_map_key=False)
    except Exception as exc:  # msgpack raises several unrelated types on garbage
        raise ProtocolError("bad_msgpack", type(exc).__name__) from None
    return raw


def validate(raw: Any, defer_metrics: bool = False) -> dict[str, Any]:
    """A decoded map to a normalised message; raises ProtocolError(reason) if it is not one."""
    if not isinstance(raw, dict):
        raise ProtocolError("not_a_map", type(raw).__name__)
    version = raw.get("v")
    if type(version) is not int or version != WIRE_VERSION:
        raise ProtocolError("bad_version", f"v={repr(version)[:40]}, accepted {WIRE_VERSION}")
    kind = raw.get("kind")
    if type(kind) is not str or kind not in KINDS:
        raise ProtocolError("unknown_kind", repr(kind)[:40])
    run = raw.get("run")
    if type(run) is not str or not RUN_HASH_RE.match(run):
        raise ProtocolError("bad_run_hash", repr(run)[:40])
    msg: dict[str, Any] = {
        "v": version,
        "kind": kind,
        "run": run,
        "rank": _int_field(raw, "rank", 0, MAX_RANK),
        "seq": _int_field(raw, "seq", 0, 2**63 - 1),
        "ts": _timestamp(raw),
        # Where this message starts in its sender's spool file: lets the collector see gaps
        # across trainer restarts (seq restarts at 0) and replay only the bytes it missed.
        "spool_offset": _int_field(raw, "spool_offset", 0, 2**63 - 1, required=False),
    }
    if kind == KIND_RUN_START:
        msg.update(_validate_run_start(raw))
    elif kind == KIND_DYNAMICS:
        msg.update(_validate_dynamics(raw, defer_metrics))
    else:
        msg.update(_validate_run_end(raw))
    return msg


def _int_field(raw: dict, name: str, low: int, high: int, required: bool = True) -> int | None:
    value = raw.get(name)
    if value is None and not required:
        return None
    if type(value) is not int:  # bool is a subclass of int: excluded on purpose
        raise ProtocolError("bad_field", f"{name}={repr(value)[:40]}")
    if not low <= value <= high:
        reason = "absurd_step" if name in ("step", "last_step") else "bad_field"
        raise ProtocolError(reason, f"{name}={value}")
    return value


def _timestamp(raw: dict) -> float | None:
    value = raw.get("ts")
    if value is None:
        return None
    if type(value) not in (int, float) or not MIN_TS <= value <= MAX_TS:
        raise ProtocolError("bad_field", f"ts={repr(value)[:40]}")
    return float(value)


def _scalar(raw: dict, name: str) -> tuple[float | None, int]:
    """An optional number; NaN/Inf become None and are counted (the second value)."""
    value = raw.get(name)
    if value is None:
        return None, 0
    if type(value) not in (int, float):
        raise ProtocolError("bad_field", f"{name}={repr(value)[:40]}")
    return finite(float(value))


def finite(value: float | None) -> tuple[float | None, int]:
    """(value, 0), or (None, 1) for NaN/Inf: a non-finite number is stored as NULL and counted."""
    if value is None or math.isfinite(value):
        return value, 0
    return None, 1


def _validate_run_start(raw: dict) -> dict[str, Any]:
    config = raw.get("config")
    model = raw.get("model")
    if not isinstance(config, dict) or not isinstance(model, dict):
        raise ProtocolError("bad_field", "run_start needs maps config and model")
    versions = raw.get("versions", {})
    if not isinstance(versions, dict):
        raise ProtocolError("bad_field", f"versions={repr(versions)[:40]}")
    host = raw.get("host", "")
    name = raw.get("name", "")
    if type(host) is not str or type(name) is not str:
        raise ProtocolError("bad_field", "host and name must be strings")
    shards = raw.get("shards", False)
    if type(shards) is not bool:
        raise ProtocolError("bad_field", f"shards={repr(shards)[:40]}")
    budget = [MAX_TREE_NODES]
    return {
        "config": plain_tree(config, budget),
        "model": plain_tree(model, budget),
        "world_size": _int_field(raw, "world_size", 1, MAX_RANK + 1),
        "shards": shards,
        "host": host[:MAX_TEXT],
        "name": name[:MAX_TEXT],
        "pid": _int_field(raw, "pid", 0, 2**31, required=False),
        "versions": plain_tree(versions, budget),
    }


def plain_tree(value: Any, budget: list[int], depth: int = 0) -> Any:
    """A copy of a config-like tree that JSON can always hold: string keys, finite numbers,
    bounded depth (`too_deep`) and size (`too_large`); other types are `bad_field`."""
    budget[0] -= 1
    if budget[0] < 0:
        raise ProtocolError("too_large", f"more than {MAX_TREE_NODES} values in a map")
    if value is None or type(value) in (str, bool, int):
        return value
    if type(value) is float:
        return value if math.isfinite(value) else None
    if depth >= MAX_TREE_DEPTH:
        raise ProtocolError("too_deep", f"maps or lists nested deeper than {MAX_TREE_DEPTH}")
    if isinstance(value, list):
        return [plain_tree(v, budget, depth + 1) for v in value]
    if isinstance(value, dict):
        out = {}
        for key, item in value.items():
            if type(key) not in (str, int, float, bool) and key is not None:
                raise ProtocolError("bad_field", f"map key {repr(key)[:40]}")
            out[str(key)] = plain_tree(item, budget, depth + 1)
        return out
    raise ProtocolError("bad_field", f"value of type {type(value).__name__} in a map")


def _validate_run_end(raw: dict) -> dict[str, Any]:
    status = raw.get("status")
    if type(status) is not str or status not in END_STATUSES:
        raise ProtocolError("bad_field", f"status={repr(status)[:40]}")
    return {
        "status": status,
        "last_step": _int_field(raw, "last_step", -1, MAX_STEP, required=False),
        # Bounded so that the sum over every rank stays an SQLite integer (2^40 x 4,097 < 2^63).
        "sent": _int_field(raw, "sent", 0, MAX_COUNT, required=False),
        "dropped": _int_field(raw, "dropped", 0, MAX_COUNT, required=False),
    }


def _validate_dynamics(raw: dict, defer_metrics: bool = False) -> dict[str, Any]:
    loss, bad_loss = _scalar(raw, "loss")
    val_loss, bad_val = _scalar(raw, "val_loss")
    lr, bad_lr = _scalar(raw, "lr")
    out: dict[str, Any] = {
        "step": _int_field(raw, "step", 0, MAX_STEP),
        "loss": loss,
        "val_loss": val_loss,
        "lr": lr,
    }
    if defer_metrics and "metrics" in raw:
        metrics, nonfinite = raw["metrics"], 0  # checked by the caller (decode_deferred)
    elif "metrics" in raw:
        metrics, nonfinite = validate_metrics(raw["metrics"])
    elif "expert_gradients" in raw:
        metrics, nonfinite = validate_metrics(_from_design_note(raw))
    else:
        raise ProtocolError("bad_field", "dynamics needs metrics or expert_gradients")
    out["metrics"] = metrics
    out["nonfinite_values"] = nonfinite + bad_loss + bad_val + bad_lr
    return out


def validate_metrics(metrics: Any) -> tuple[dict[str, list[list[float | None]]], int]:
    """metrics: {name: [[value per expert] per layer]}, every table the same shape.

    Returns the clean tables and how many NaN/Inf values were turned into None.
    """
    if not isinstance(metrics, dict) or not metrics:
        raise ProtocolError("bad_field", "metrics must be a non-empty map")
    if _plainly_valid(metrics):
        return metrics, 0
    shape: tuple[int, int] | None = None
    clean: dict[str, list[list[float | None]]] = {}
    nonfinite = 0
    for name, table in metrics.items():
        if type(name) is not str or name not in _METRIC_SET:
            raise ProtocolError("unknown_metric", repr(name)[:40])
        if type(table) is not list or not 0 < len(table) <= MAX_LAYERS:
            raise ProtocolError("bad_shape", f"{name}: expected 1..{MAX_LAYERS} layers")
        width = _table_width(name, table)
        if shape and shape != (len(table), width):
            raise ProtocolError("bad_shape", f"{name}: layers or experts differ between metrics")
        shape = (len(table), width)
        clean[name], bad = _validate_table(name, table)
        nonfinite += bad
    return clean, nonfinite


def _plainly_valid(metrics: dict) -> bool:
    """The trainer's messages, checked all at once in C (set, map, chain, filter, sum): known
    names; tables of equally many layers, each a list of equally many experts; floats or None
    only, all finite and non-negative; counts all zero. False sends the message through the
    table-by-table checks, which say what is wrong or clean what can be cleaned."""
    if not metrics.keys() <= _METRIC_SET:
        return False
    tables = list(metrics.values())
    if set(map(type, tables)) != _LIST_TYPE or len(set(map(len, tables))) != 1:
        return False
    rows = list(chain.from_iterable(tables))
    if set(map(type, rows)) != _LIST_TYPE:
        return False
    widths = set(map(len, rows))
    if len(widths) != 1 or not 0 < widths.pop() <= MAX_EXPERTS or len(tables[0]) > MAX_LAYERS:
        return False
    values = list(chain.from_iterable(rows))
    if not set(map(type, values)) <= _FLOAT_OR_NONE:
        return False
    # filter(None, ...) drops None and 0.0, both fine; a sum is finite only if every value is.
    present = list(filter(None, values))
    total = sum(present)
    if total - total != 0.0 or (present and min(present) < 0.0):
        return False
    counts = metrics.get("nonfinite")
    return counts is None or not any(chain.from_iterable(counts))


def _table_width(name: str, table: list) -> int:
    """The number of experts: every row a list of the same length, 1..MAX_EXPERTS."""
    if set(map(type, table)) != _LIST_TYPE:
        raise ProtocolError("bad_shape", f"{name}: every layer must be a list of experts")
    widths = set(map(len, table))
    width = widths.pop()
    if widths or not 0 < width <= MAX_EXPERTS:
        raise ProtocolError("bad_shape", f"{name}: expected 1..{MAX_EXPERTS} experts per layer")
    return width


def _validate_table(name: str, table: list) -> tuple[list[list[float | None]], int]:
    # Fast path, the trainer's messages: floats and None only, checked a table at a time in C
    # (set, map, filter, sum). filter(None, ...) drops None and 0.0, which are fine anyway; a
    # sum is finite only if every value is.
    flat = list(chain.from_iterable(table))
    if set(map(type, flat)) <= _FLOAT_OR_NONE:
        present = list(filter(None, flat))
        if name in COUNT_METRICS:
            if not present:  # all zero: the usual count
                return table, 0
        else:
            total = sum(present)
            if total - total == 0.0 and not (
                present and name in NON_NEGATIVE_METRICS and min(present) < 0.0
            ):
                return table, 0
    if name in COUNT_METRICS:
        return [_clean_counts(name, row) for row in table], 0
    rows: list[list[float | None]] = []
    nonfinite = 0
    for row in table:
        clean_row, bad = _clean_row(name, row, name in NON_NEGATIVE_METRICS)
        rows.append(clean_row)
        nonfinite += bad
    return rows, nonfinite


def _clean_row(name: str, row: list, non_negative: bool) -> tuple[list[float | None], int]:
    values: list[float | None] = []
    nonfinite = 0
    for value in row:
        if value is None:
            values.append(None)
            continue
        if type(value) not in (int, float):
            raise ProtocolError("bad_value", f"{name}: {repr(value)[:40]}")
        value = float(value)
        if not math.isfinite(value):
            nonfinite += 1
            values.append(None)
        elif non_negative and value < 0.0:
            raise ProtocolError("bad_value", f"{name}: {value} < 0")
        else:
            values.append(value)
    return values, nonfinite


def _clean_counts(name: str, row: list) -> list[float | None]:
    """Counts: whole numbers in 0..MAX_COUNT (sent as floats by the probe), or None."""
    values: list[float | None] = []
    for value in row:
        if value is None:
            values.append(None)
            continue
        if type(value) not in (int, float) or not 0 <= value <= MAX_COUNT:
            raise ProtocolError("bad_value", f"{name}: {repr(value)[:40]}")
        if type(value) is float and not value.is_integer():
            raise ProtocolError("bad_value", f"{name}: {value} is not a count")
        values.append(float(value))
    return values


def _from_design_note(raw: dict) -> dict[str, list[list[Any]]]:
    """The design note's nested dict (one already-averaged layer) to the columnar metrics map."""
    gradients = raw.get("expert_gradients")
    divergences = raw.get("divergence_scores") or {}
    if not isinstance(gradients, dict) or not isinstance(divergences, dict):
        raise ProtocolError("bad_field", "expert_gradients and divergence_scores must be maps")
    per_expert: dict[int, dict[str, Any]] = {}
    for key, values in gradients.items():
        index = _note_expert_index(key)
        if not isinstance(values, dict):
            raise ProtocolError("bad_field", f"expert_gradients[{repr(key)[:40]}] must be a map")
        for metric, value in values.items():
            name = _NOTE_METRIC_ALIASES.get(metric, metric) if type(metric) is str else metric
            if type(name) is not str or name not in _METRIC_SET:
                raise ProtocolError("unknown_metric", repr(metric)[:40])
            _note_set(per_expert.setdefault(index, {}), index, name, value)
    for key, value in divergences.items():
        match = _NOTE_DIVERGENCE_RE.match(key) if type(key) is str else None
        index = int(match.group(1)) if match else _note_expert_index(key)
        if index >= MAX_EXPERTS:
            raise ProtocolError("bad_shape", f"expert {index} >= {MAX_EXPERTS}")
        _note_set(per_expert.setdefault(index, {}), index, "divergence", value)
    if not per_expert:
        raise ProtocolError("bad_field", "expert_gradients is empty")
    n_experts = max(per_expert) + 1
    names = sorted({name for values in per_expert.values() for name in values})
    return {name: [[per_expert.get(i, {}).get(name) for i in range(n_experts)]] for name in names}


def _note_set(expert: dict[str, Any], index: int, name: str, value: Any) -> None:
    """One value of the nested form; the same one twice (`expert_1` and `1`, or `norm` and
    `perturbed_norm`) is refused rather than one of them silently kept."""
    if name in expert:
        raise ProtocolError("bad_field", f"expert {index}: {name} given twice")
    expert[name] = value


def _note_expert_index(key: Any) -> int:
    if type(key) is int and 0 <= key < MAX_EXPERTS:
        return key
    match = _NOTE_EXPERT_RE.match(key) if type(key) is str else None
    if not match or int(match.group(1)) >= MAX_EXPERTS:
        raise ProtocolError("bad_field", f"expert key {repr(key)[:40]}")
    return int(match.group(1))
