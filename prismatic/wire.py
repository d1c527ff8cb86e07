"""The wire format between trainers and the collector: msgpack maps, one module for both sides.

Every message is a map with `v` (schema version), `kind`, `run` (run hash), `rank` and `seq`
(per-sender sequence number). See docs/protocol.md for the full description. `decode` turns
bytes into a validated, normalised dict or raises `ProtocolError` whose `reason` is a short
counted label (`bad_msgpack`, `unknown_kind`, ...).
"""

from __future__ import annotations

import math
import re
import time
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
# Summed, not averaged, when layers or ranks are combined.
COUNT_METRICS = ("nonfinite",)

MAX_MESSAGE_BYTES = 1 << 20
MAX_STEP = 10**12
MAX_LAYERS = 512
MAX_EXPERTS = 256
MAX_RANK = 4096
RUN_HASH_RE = re.compile(r"^[0-9a-f]{9}$")
_NOTE_EXPERT_RE = re.compile(r"^expert_(\d{1,3})$")
_NOTE_DIVERGENCE_RE = re.compile(r"^expert_(\d{1,3})_divergence$")
_NOTE_METRIC_ALIASES = {"clean_norm": "norm", "perturbed_norm": "norm"}


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
    if len(data) > MAX_MESSAGE_BYTES:
        raise ProtocolError("oversized", f"{len(data)} bytes > {MAX_MESSAGE_BYTES}")
    try:
        # Integer map keys are accepted (strict_map_key=False); msgpack bounds every container
        # by the buffer length, which is already bounded above.
        raw = msgpack.unpackb(data, raw=False, strict_map_key=False)
    except Exception as exc:  # msgpack raises several unrelated types on garbage
        raise ProtocolError("bad_msgpack", type(exc).__name__) from None
    return validate(raw)


def validate(raw: Any) -> dict[str, Any]:
    if not isinstance(raw, dict):
        raise ProtocolError("not_a_map", type(raw).__name__)
    version = raw.get("v")
    if version != WIRE_VERSION:
        raise ProtocolError("bad_version", f"v={version!r}, accepted {WIRE_VERSION}")
    kind = raw.get("kind")
    if kind not in KINDS:
        raise ProtocolError("unknown_kind", repr(kind)[:40])
    run = raw.get("run")
    if not isinstance(run, str) or not RUN_HASH_RE.match(run):
        raise ProtocolError("bad_run_hash", repr(run)[:40])
    msg: dict[str, Any] = {
        "v": version,
        "kind": kind,
        "run": run,
        "rank": _int_field(raw, "rank", 0, MAX_RANK),
        "seq": _int_field(raw, "seq", 0, 2**63 - 1),
        "ts": _float_field(raw, "ts", required=False),
        # Where this message starts in its sender's spool file: lets the collector see gaps
        # across trainer restarts (seq restarts at 0) and replay only the bytes it missed.
        "spool_offset": _int_field(raw, "spool_offset", 0, 2**63 - 1, required=False),
    }
    if kind == KIND_RUN_START:
        msg.update(_validate_run_start(raw))
    elif kind == KIND_DYNAMICS:
        msg.update(_validate_dynamics(raw))
    else:
        msg.update(_validate_run_end(raw))
    return msg


def _int_field(raw: dict, name: str, low: int, high: int, required: bool = True) -> int | None:
    value = raw.get(name)
    if value is None and not required:
        return None
    if not isinstance(value, int) or isinstance(value, bool):
        raise ProtocolError("bad_field", f"{name}={repr(value)[:40]}")
    if not low <= value <= high:
        reason = "absurd_step" if name == "step" else "bad_field"
        raise ProtocolError(reason, f"{name}={value}")
    return value


def _float_field(raw: dict, name: str, required: bool = True) -> float | None:
    value = raw.get(name)
    if value is None:
        if required:
            raise ProtocolError("bad_field", f"{name} missing")
        return None
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise ProtocolError("bad_field", f"{name}={repr(value)[:40]}")
    value = float(value)
    return value if math.isfinite(value) else None


def _validate_run_start(raw: dict) -> dict[str, Any]:
    config = raw.get("config")
    model = raw.get("model")
    if not isinstance(config, dict) or not isinstance(model, dict):
        raise ProtocolError("bad_field", "run_start needs maps config and model")
    world_size = _int_field(raw, "world_size", 1, MAX_RANK + 1)
    host = raw.get("host", "")
    name = raw.get("name", "")
    if not isinstance(host, str) or not isinstance(name, str):
        raise ProtocolError("bad_field", "host and name must be strings")
    return {
        "config": config,
        "model": model,
        "world_size": world_size,
        "shards": bool(raw.get("shards", False)),
        "host": host[:200],
        "name": name[:200],
        "pid": _int_field(raw, "pid", 0, 2**31, required=False),
        "versions": raw.get("versions") if isinstance(raw.get("versions"), dict) else {},
    }


def _validate_run_end(raw: dict) -> dict[str, Any]:
    status = raw.get("status")
    if status not in END_STATUSES:
        raise ProtocolError("bad_field", f"status={repr(status)[:40]}")
    return {
        "status": status,
        "last_step": _int_field(raw, "last_step", -1, MAX_STEP, required=False),
        "sent": _int_field(raw, "sent", 0, 2**63 - 1, required=False),
        "dropped": _int_field(raw, "dropped", 0, 2**63 - 1, required=False),
    }


def _validate_dynamics(raw: dict) -> dict[str, Any]:
    out: dict[str, Any] = {
        "step": _int_field(raw, "step", 0, MAX_STEP),
        "loss": _float_field(raw, "loss", required=False),
        "val_loss": _float_field(raw, "val_loss", required=False),
        "lr": _float_field(raw, "lr", required=False),
    }
    if "metrics" in raw:
        metrics, nonfinite = _validate_metrics(raw["metrics"])
    elif "expert_gradients" in raw:
        metrics, nonfinite = _validate_metrics(_from_design_note(raw))
    else:
        raise ProtocolError("bad_field", "dynamics needs metrics or expert_gradients")
    out["metrics"] = metrics
    out["nonfinite_values"] = nonfinite
    return out


def _validate_metrics(metrics: Any) -> tuple[dict[str, list[list[float | None]]], int]:
    """metrics: {name: [[value per expert] per layer]}; NaN/Inf become None and are counted."""
    if not isinstance(metrics, dict) or not metrics:
        raise ProtocolError("bad_field", "metrics must be a non-empty map")
    shape: tuple[int, int] | None = None
    clean: dict[str, list[list[float | None]]] = {}
    nonfinite = 0
    for name, table in metrics.items():
        if name not in EXPERT_METRICS:
            raise ProtocolError("unknown_metric", repr(name)[:40])
        if not isinstance(table, list) or not 0 < len(table) <= MAX_LAYERS:
            raise ProtocolError("bad_shape", f"{name}: expected 1..{MAX_LAYERS} layers")
        rows = []
        for row in table:
            if not isinstance(row, list) or not 0 < len(row) <= MAX_EXPERTS:
                raise ProtocolError("bad_shape", f"{name}: expected 1..{MAX_EXPERTS} experts")
            values = []
            for value in row:
                if value is None:
                    values.append(None)
                    continue
                if not isinstance(value, (int, float)) or isinstance(value, bool):
                    raise ProtocolError("bad_value", f"{name}: {repr(value)[:40]}")
                if not math.isfinite(value):
                    nonfinite += 1
                    values.append(None)
                    continue
                values.append(float(value))
            rows.append(values)
        this_shape = (len(rows), len(rows[0]))
        if any(len(r) != this_shape[1] for r in rows) or (shape and shape != this_shape):
            raise ProtocolError("bad_shape", f"{name}: layers or experts differ between metrics")
        shape = this_shape
        clean[name] = rows
    return clean, nonfinite


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
            raise ProtocolError("bad_field", f"expert_gradients[{key!r}] must be a map")
        for metric, value in values.items():
            name = _NOTE_METRIC_ALIASES.get(metric, metric)
            if name not in EXPERT_METRICS:
                raise ProtocolError("unknown_metric", repr(metric)[:40])
            per_expert.setdefault(index, {})[name] = value
    for key, value in divergences.items():
        match = _NOTE_DIVERGENCE_RE.match(key) if isinstance(key, str) else None
        index = int(match.group(1)) if match else _note_expert_index(key)
        per_expert.setdefault(index, {})["divergence"] = value
    if not per_expert:
        raise ProtocolError("bad_field", "expert_gradients is empty")
    n_experts = max(per_expert) + 1
    if n_experts > MAX_EXPERTS:
        raise ProtocolError("bad_shape", f"{n_experts} experts > {MAX_EXPERTS}")
    names = sorted({name for values in per_expert.values() for name in values})
    return {name: [[per_expert.get(i, {}).get(name) for i in range(n_experts)]] for name in names}


def _note_expert_index(key: Any) -> int:
    if isinstance(key, int) and not isinstance(key, bool) and 0 <= key < MAX_EXPERTS:
        return key
    match = _NOTE_EXPERT_RE.match(key) if isinstance(key, str) else None
    if not match:
        raise ProtocolError("bad_field", f"expert key {repr(key)[:40]}")
    return int(match.group(1))
