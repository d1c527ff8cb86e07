"""Waiting for every rank of a step, then combining ranks and layers into one `StepRow`."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from collector.store import StepRow
from prismatic.aggregate import combine_ranks, mean_over_layers


@dataclass
class _Waiting:
    world_size: int
    shards: bool
    reports: dict[int, dict[str, Any]] = field(default_factory=dict)  # rank -> message
    first_seen: float = field(default_factory=time.monotonic)


class PendingSteps:
    """Steps seen from some but not yet all ranks, keyed by (run hash, step)."""

    def __init__(self) -> None:
        self._waiting: dict[tuple[str, int], _Waiting] = {}

    def add(self, message: dict[str, Any], world_size: int, shards: bool) -> StepRow | None:
        """Record one rank's report; the combined row once every rank has reported."""
        key = (message["run"], message["step"])
        waiting = self._waiting.setdefault(key, _Waiting(world_size, shards))
        waiting.world_size = max(waiting.world_size, world_size)
        waiting.reports[message["rank"]] = message  # a duplicate rank report replaces the first
        if len(waiting.reports) < waiting.world_size:
            return None
        del self._waiting[key]
        return build_row(waiting)

    def pop_expired(self, timeout_s: float) -> list[tuple[str, StepRow]]:
        cutoff = time.monotonic() - timeout_s
        expired = [k for k, w in self._waiting.items() if w.first_seen <= cutoff]
        return [(k[0], build_row(self._waiting.pop(k))) for k in expired]

    def pop_run(self, run_hash: str) -> list[StepRow]:
        keys = [k for k in self._waiting if k[0] == run_hash]
        return [build_row(self._waiting.pop(k)) for k in keys]

    def pop_all(self) -> list[tuple[str, StepRow]]:
        keys = list(self._waiting)
        return [(k[0], build_row(self._waiting.pop(k))) for k in keys]

    def has_run(self, run_hash: str) -> bool:
        return any(k[0] == run_hash for k in self._waiting)


def _first(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return sum(present) / len(present) if present else None


def build_row(waiting: _Waiting) -> StepRow:
    reports = [waiting.reports[r] for r in sorted(waiting.reports)]
    per_layer, spread = combine_ranks([r["metrics"] for r in reports], waiting.shards)
    layer_mean = mean_over_layers(per_layer)
    nonfinite = layer_mean.get("nonfinite") or []
    return StepRow(
        step=reports[0]["step"],
        loss=_first([r["loss"] for r in reports]),
        val_loss=_first([r["val_loss"] for r in reports]),
        lr=_first([r["lr"] for r in reports]),
        ranks_reported=len(reports),
        rank_spread=spread,
        nonfinite=int(sum(v for v in nonfinite if v is not None)),
        layer_mean=layer_mean,
        per_layer=per_layer,
    )
