"""Waiting for every rank of a step, then combining ranks and layers into one `StepRow`.

A step is ready when every rank of the run's world size has reported it; the collector writes
what it has after the rank timeout (`pop_expired`). Such a partial step is remembered for a
while, so a rank that reports late still joins it and the step is written again with one more
rank (the store never lets fewer ranks overwrite more).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from collector.store import StepRow
from prismatic.aggregate import combine_ranks, mean_of, mean_over_layers

if TYPE_CHECKING:
    from collector.burst import Prepared

# How long a step written before all ranks reported still takes late ranks, in rank timeouts.
LATE_RANK_TIMEOUTS = 10


@dataclass
class _Waiting:
    world_size: int
    shards: bool
    reports: dict[int, dict[str, Any]] = field(default_factory=dict)  # rank -> message
    since: float = field(default_factory=time.monotonic)  # first seen, then: written partial


Steps = OrderedDict[int, _Waiting]  # step -> waiting, oldest first


class PendingSteps:
    """Steps seen from some but not yet all ranks, per run."""

    def __init__(self) -> None:
        self._waiting: dict[str, Steps] = {}
        self._written_partial: dict[str, Steps] = {}

    def add(
        self,
        message: dict[str, Any],
        world_size: int,
        shards: bool,
        prepared: Prepared | None = None,
    ) -> StepRow | None:
        """Record one rank's report; the combined row once every rank has reported (or at
        once, with one more rank, for a step already written partially). `prepared`: the
        message's layer means and records, if computed with its burst."""
        run, step = message["run"], message["step"]
        if world_size == 1 and run not in self._waiting and run not in self._written_partial:
            return build_single(message, shards, prepared)
        partial = self._written_partial.get(run)
        if partial is not None and step in partial:
            late = partial[step]
            late.reports[message["rank"]] = message
            if len(late.reports) >= late.world_size:
                del partial[step]
            return build_row(late)
        steps = self._waiting.setdefault(run, OrderedDict())
        waiting = steps.get(step) or steps.setdefault(step, _Waiting(world_size, shards))
        waiting.world_size = max(waiting.world_size, world_size)
        waiting.reports[message["rank"]] = message  # a duplicate rank report replaces the first
        if len(waiting.reports) < waiting.world_size:
            return None
        del steps[step]
        if not steps:
            del self._waiting[run]
        return build_row(waiting)

    def pop_expired(self, timeout_s: float) -> list[tuple[str, StepRow]]:
        """Steps whose missing ranks did not report within `timeout_s`: write what there is."""
        now = time.monotonic()
        out = []
        for run, steps in list(self._waiting.items()):
            while steps:
                step, waiting = next(iter(steps.items()))
                if now - waiting.since < timeout_s:
                    break
                del steps[step]
                out.append((run, build_row(waiting)))
                waiting.since = now
                self._written_partial.setdefault(run, OrderedDict())[step] = waiting
            if not steps:
                del self._waiting[run]
        self._forget_partial(now - LATE_RANK_TIMEOUTS * timeout_s)
        return out

    def _forget_partial(self, before: float) -> None:
        for run, steps in list(self._written_partial.items()):
            while steps and next(iter(steps.values())).since < before:
                steps.popitem(last=False)
            if not steps:
                del self._written_partial[run]

    def pop_run(self, run_hash: str) -> list[StepRow]:
        """Every step of a run that ended, as far as it got."""
        self._written_partial.pop(run_hash, None)
        steps = self._waiting.pop(run_hash, None)
        return [build_row(w) for w in steps.values()] if steps else []

    def pop_all(self) -> list[tuple[str, StepRow]]:
        out = [(run, build_row(w)) for run, steps in self._waiting.items() for w in steps.values()]
        self._waiting.clear()
        self._written_partial.clear()
        return out

    def has_run(self, run_hash: str) -> bool:
        return run_hash in self._waiting

    def __len__(self) -> int:
        return sum(len(steps) for steps in self._waiting.values())


def _mean(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return mean_of(present, sum(present)) if present else None


def build_single(
    message: dict[str, Any], shards: bool = False, prepared: Prepared | None = None
) -> StepRow:
    """The common case, one rank: no waiting, no combining."""
    metrics = message["metrics"]
    if prepared is not None:  # plainly valid: its counts are all zero
        layer_mean, nonfinite, layer_rows = prepared.layer_mean, 0, prepared.layer_rows
    else:
        layer_mean, layer_rows = mean_over_layers(metrics), None
        counts = layer_mean.get("nonfinite") or ()
        nonfinite = int(sum(v for v in counts if v is not None))
    return StepRow(
        step=message["step"],
        loss=message["loss"],
        val_loss=message["val_loss"],
        lr=message["lr"],
        ranks_reported=1,
        rank_spread=None if shards else 0.0,
        nonfinite=nonfinite,
        layer_mean=layer_mean,
        per_layer=metrics,
        world_size=1,
        sent_ts=message["ts"],
        layer_rows=layer_rows,
    )


def build_row(waiting: _Waiting) -> StepRow:
    reports = [waiting.reports[r] for r in sorted(waiting.reports)]
    per_layer, spread = combine_ranks([r["metrics"] for r in reports], waiting.shards)
    layer_mean = mean_over_layers(per_layer)
    nonfinite = layer_mean.get("nonfinite") or ()
    sent = [r["ts"] for r in reports if r["ts"] is not None]
    return StepRow(
        step=reports[0]["step"],
        # Each rank's loss is over its own batch: their mean is the loss of the global batch.
        loss=_mean([r["loss"] for r in reports]),
        val_loss=_mean([r["val_loss"] for r in reports]),
        lr=_mean([r["lr"] for r in reports]),
        ranks_reported=len(reports),
        rank_spread=spread,
        nonfinite=int(sum(v for v in nonfinite if v is not None)),
        layer_mean=layer_mean,
        per_layer=per_layer,
        world_size=waiting.world_size,
        sent_ts=max(sent) if sent else None,
    )
