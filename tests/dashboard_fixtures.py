"""Fixture runs for the dashboard tests and benchmark, written by the collector's own store code.

Every database here goes through `collector.store.RunStore` and `StepRow`, exactly as the
collector writes it; only the numbers are synthetic. The known-answer run is built from simple
formulas (`known_value`) so a test can compute the verdict's numbers on its own.
"""

from __future__ import annotations

import base64
import json
import math
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np

from collector.store import RunStore, StepRow
from prismatic.aggregate import mean_over_layers

PerLayer = dict[str, list[list[float | None]]]  # metric -> [layer][expert]
METRICS = ("top_norm", "bottom_norm", "middle_norm", "norm", "divergence", "weight_drift")

# The known-answer run: 40 logged steps, 3 experts, 2 layers whose values average to the formula.
KNOWN_STEPS = list(range(0, 400, 10))
KNOWN_LAYERS = 2
KNOWN_EXPERTS = 3


def known_value(metric: str, expert: int, step: int) -> float | None:
    """The layer mean of `metric` for `expert` at `step` in the known-answer run."""
    if metric == "bottom_norm":
        return (0.5 + 0.001 * step) * (1.0, 3.0, 1.2)[expert]
    if metric == "top_norm":
        return 2.0 + 0.1 * expert
    if metric == "middle_norm":
        return 1.0 + 0.01 * expert
    if metric == "norm":
        return 4.0 + expert
    if metric == "divergence":
        # expert 1 starts meaningful and falls (slope -0.1 per 1k steps); expert 2 rises slowly.
        return None if expert == 0 else (0.2 - 0.0001 * step, 0.03 + 0.00002 * step)[expert - 1]
    if metric == "weight_drift":
        return None if expert == 0 else 0.01 * expert + 0.00005 * step
    if metric == "routing_weight":
        return (0.5, 0.3, 0.2)[expert]
    raise ValueError(metric)


def known_metrics(step: int) -> PerLayer:
    # Layer factors 0.5 and 1.5 average to 1, so the layer mean is exactly known_value().
    out: PerLayer = {}
    for metric in (*METRICS, "routing_weight"):
        out[metric] = [
            [_times(known_value(metric, e, step), 0.5 + layer) for e in range(KNOWN_EXPERTS)]
            for layer in range(KNOWN_LAYERS)
        ]
    return out


def _times(value: float | None, factor: float) -> float | None:
    return None if value is None else value * factor


def synthetic_metrics(step: int, layers: int = 2, experts: int = 3, scale: float = 1.0) -> PerLayer:
    """Plausible curves: norms decay with training, perturbed bottom tiers sit higher with
    `scale`, divergence settles at a level set by `scale` (0 for a scale-0 control)."""
    decay = 1.0 / (1.0 + step / 500)
    wiggle = 1.0 + 0.1 * math.sin(step / 37)
    out: PerLayer = {m: [] for m in (*METRICS, "routing_weight")}
    for layer in range(layers):
        depth = 1.0 + 0.3 * layer
        rows: dict[str, list[float | None]] = {m: [] for m in out}
        for e in range(experts):
            boost = 1.0 + (scale * (1.0 + 0.4 * e) if e else 0.0)
            rows["top_norm"].append(0.8 * depth * decay * wiggle * (1 + 0.1 * e * scale))
            rows["bottom_norm"].append(0.02 * depth * decay * wiggle * boost)
            rows["middle_norm"].append(2.5 * depth * decay * wiggle)
            rows["norm"].append(2.7 * depth * decay * wiggle)
            settle = scale * (0.03 + 0.05 * e) * (0.6 + 0.4 * decay)
            rows["divergence"].append(None if e == 0 else settle + 1e-4 * scale)
            rows["weight_drift"].append(None if e == 0 else scale * 0.5 + 1e-5 * step)
            rows["routing_weight"].append(1.0 / experts)
        for metric in out:
            out[metric].append(rows[metric])
    return out


def step_row(
    step: int,
    per_layer: PerLayer,
    *,
    loss: float | None = None,
    val_loss: float | None = None,
    lr: float | None = 3e-4,
) -> StepRow:
    return StepRow(
        step=step,
        loss=loss,
        val_loss=val_loss,
        lr=lr,
        ranks_reported=1,
        rank_spread=0.0,
        nonfinite=0,
        layer_mean=mean_over_layers(per_layer),
        per_layer=per_layer,
    )


def run_config(name: str, scale: float, strategy: str, sparsity: float, mixing: str) -> dict:
    return {
        "name": name,
        "model": {
            "router_type": "prismatic",
            "perturbation_scale": scale,
            "perturbation_strategy": strategy,
            "sparsity": sparsity,
            "mixing": mixing,
        },
    }


def write_run(
    runs_dir: Path,
    run_hash: str,
    rows: Iterable[StepRow],
    *,
    name: str = "dual-sided",
    scale: float = 1.0,
    strategy: str = "dual_sided",
    sparsity: float = 0.1,
    mixing: str = "outputs",
    status: str = "completed",
    last_seen: float | None = None,
    layers: int = 2,
    experts: int = 3,
    batch: int = 5000,
    train: dict | None = None,
) -> Path:
    """A run folder `<runs_dir>/<run_hash>/dynamics.db` written through RunStore; `train`: the
    config's train section."""
    run_dir = runs_dir / run_hash
    store = RunStore(run_dir)
    now = time.time() if last_seen is None else last_seen
    config = run_config(name, scale, strategy, sparsity, mixing)
    if train is not None:
        config["train"] = train
    store.update_run(
        name=name,
        config=config,
        model={"layers": layers, "experts": experts, "mixing": mixing},
        mixing=mixing,
        status=status,
        started=now - 600,
        last_seen=now,
        ended=None if status == "live" else now,
        world_size=1,
    )
    for i, row in enumerate(rows, 1):
        store.add_step(row)
        if i % batch == 0:
            store.flush()
    store.close()
    return run_dir


def synthetic_rows(
    steps: Iterable[int],
    layers: int = 2,
    experts: int = 3,
    scale: float = 1.0,
    metrics: Callable[..., PerLayer] = synthetic_metrics,
) -> Iterable[StepRow]:
    for step in steps:
        loss = 6.0 / (1.0 + step / 300) + 1.5
        val = loss + 0.1 if step % 50 == 0 else None
        yield step_row(step, metrics(step, layers, experts, scale), loss=loss, val_loss=val)


def known_rows() -> list[StepRow]:
    return [step_row(s, known_metrics(s), loss=3.0 - 0.001 * s) for s in KNOWN_STEPS]


# --- reading what an AppTest page shows ----------------------------------------------------------

APP = Path(__file__).resolve().parent.parent / "dashboard" / "app.py"


def plotly_figures(at) -> list[dict]:
    """The plotly figures on an AppTest page, as plotly JSON with arrays decoded."""
    return [json.loads(el.proto.spec) for el in at.get("plotly_chart")]


def values(array) -> np.ndarray:
    """A plotly JSON array (a list, or {dtype, bdata[, shape]} for numpy data) as numpy."""
    if isinstance(array, dict) and "bdata" in array:
        out = np.frombuffer(base64.b64decode(array["bdata"]), dtype=np.dtype(array["dtype"]))
        if "shape" in array:
            shape = array["shape"]
            out = out.reshape(
                [int(s) for s in str(shape).split(",")] if isinstance(shape, str) else shape
            )
        return out
    return np.asarray(array, dtype=float)


def trace_names(figure: dict) -> list[str]:
    return [t.get("name") for t in figure["data"]]


def texts(elements) -> str:
    return "\n".join(str(e.value) for e in elements)
