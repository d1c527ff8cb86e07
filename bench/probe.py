"""How much the gradient probe costs, measured side by side in one run on the default model.

    .venv/bin/python bench/probe.py            # about 4 minutes on 2 busy CPU cores

Prints, each as a ratio of two things timed in the same process, interleaved:
- probe time / training-step time, and the implied overhead at log_freq 10;
- probe time / the floor: one `torch.linalg.vector_norm` pass over the same gradients;
- a straightforward per-element reference (tiers recomputed from the weights, each tier's
  gradient values gathered into Python lists, squares summed in Python) / the probe;
- training throughput with probe + publisher / without, with a real collector process
  listening, and with no collector at all (the publisher's queue fills, then drops).
The last line is one JSON object with all five ratios.

Training uses the trainer's own step (`Trainer._step`) with `train.threads` (1 by default, as
`prismatic train` runs); the probe and the floor run on that same thread count.
"""

from __future__ import annotations

import argparse
import json
import math
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from prismatic.config import load_config  # noqa: E402
from trainer.api import DynamicsReporter  # noqa: E402
from trainer.layer import Prismatic  # noqa: E402
from trainer.loop import Trainer  # noqa: E402
from trainer.perturbation import select_tiers  # noqa: E402
from trainer.probe import GradientProbe  # noqa: E402
from trainer.publisher import Publisher  # noqa: E402

TARGETS = {
    "overhead_pct": ("<=", 0.2),
    "floor_ratio": ("<=", 2.0),
    "reference_speedup": (">=", 150.0),
    "throughput_ratio_collector_up": (">=", 0.98),
    "throughput_ratio_collector_down": (">=", 0.98),
}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(REPO / "configs" / "default.yaml"))
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--log-freq", type=int, default=10)
    parser.add_argument("--probe-reps", type=int, default=60)
    parser.add_argument("--reference-reps", type=int, default=2)
    parser.add_argument("--blocks", type=int, default=4, help="blocks per throughput condition")
    return parser.parse_args()


# --- what is compared ------------------------------------------------------------------------


def floor(probe: GradientProbe) -> list[float]:
    """One vector_norm pass over the same stacked gradients, one host sync."""
    grads = [p.grad for layer in probe.layers for _, p in layer.stacked_parameters()]
    return torch.stack([torch.linalg.vector_norm(g) for g in grads]).tolist()


def reference(layers: list[Prismatic]) -> list[dict[str, list[float]]]:
    """Per element, in Python: the probe's norms, divergence and drift, tiers recomputed."""
    out = []
    for layer in layers:
        E = layer.num_experts
        sums = {k: [0.0] * E for k in ("top", "bottom", "middle", "total", "dot", "drift")}
        base_sq = 0.0
        template = dict(layer._template[0].named_parameters())  # the clean base weights
        for name, stacked in layer.stacked_parameters():
            tiers = select_tiers(template[name], layer.sparsity)
            top, bottom = tiers.top.tolist(), tiers.bottom.tolist()
            chosen = set(top) | set(bottom)
            g0 = stacked.grad[0].reshape(-1).tolist()
            w0 = stacked.detach()[0].reshape(-1).tolist()
            base_sq += sum(v * v for v in w0)
            for k in range(E):
                g = stacked.grad[k].reshape(-1).tolist()
                w = stacked.detach()[k].reshape(-1).tolist()
                sums["top"][k] += sum(v * v for v in [g[i] for i in top])
                sums["bottom"][k] += sum(v * v for v in [g[i] for i in bottom])
                middle = [v for i, v in enumerate(g) if i not in chosen]
                sums["middle"][k] += sum(v * v for v in middle)
                sums["total"][k] += sum(v * v for v in g)
                sums["dot"][k] += sum(a * b for a, b in zip(g, g0, strict=True))
                sums["drift"][k] += sum((a - b) ** 2 for a, b in zip(w, w0, strict=True))
        norm = [math.sqrt(v) for v in sums["total"]]
        out.append(
            {
                "top_norm": [math.sqrt(v) for v in sums["top"]],
                "bottom_norm": [math.sqrt(v) for v in sums["bottom"]],
                "middle_norm": [math.sqrt(v) for v in sums["middle"]],
                "norm": norm,
                "divergence": [1 - sums["dot"][k] / (norm[k] * norm[0]) for k in range(1, E)],
                "weight_drift": [math.sqrt(sums["drift"][k] / base_sq) for k in range(1, E)],
            }
        )
    return out


def largest_difference(probe: GradientProbe, ref: list[dict[str, list[float]]]) -> float:
    """Relative difference for norms, absolute for divergence: the reference checks the probe."""
    metrics = probe.measure(0).metrics
    worst = 0.0
    for li, layer_ref in enumerate(ref):
        for name, values in layer_ref.items():
            ours = metrics[name][li]
            ours = ours[1:] if name in ("divergence", "weight_drift") else ours
            for a, b in zip(ours, values, strict=True):
                scale = 1.0 if name == "divergence" else max(abs(b), 1e-30)
                worst = max(worst, abs(a - b) / scale)
    return worst


def timed(fn: Callable[[], object]) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def interleaved(fns: dict[str, Callable[[], object]], reps: int) -> dict[str, float]:
    """Median seconds per call, the calls taking turns so that load changes hit all alike."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            times[name].append(timed(fn))
    return {name: statistics.median(ts) for name, ts in times.items()}


# --- the run ---------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_collector(runs: Path) -> tuple[subprocess.Popen, str]:
    address = f"tcp://127.0.0.1:{free_port()}"
    proc = subprocess.Popen(
        [sys.executable, "-m", "prismatic.cli", "--log-level", "WARNING", "collect"]
        + ["--bind", address, "--runs-dir", str(runs)],
        cwd=REPO,
    )
    time.sleep(2.0)  # a PUSH socket connects whenever the collector is up; this is only tidy
    return proc, address


def reporter(trainer: Trainer, address: str, runs: Path, tag: str, log_freq: int):
    publisher = Publisher(
        address, trainer.run_hash, 0, spool_path=runs / tag / "spool" / "rank0.msgpack"
    )
    return DynamicsReporter(
        trainer.model,
        address,
        config={"name": f"bench-{tag}"},
        log_freq=log_freq,
        run_hash=trainer.run_hash,
        publisher=publisher,
    )


def throughput(trainer: Trainer, reporters: dict, blocks: int, log_freq: int) -> dict:
    """Seconds per block of `log_freq` steps (exactly one probed step each), per condition.

    Conditions take turns block by block, in a rotating order (none, up, down; up, down, none;
    ...), so that neither a slow drift of the machine's load nor a position in the round favours
    one. Returns the fastest block of each: load from other processes only ever adds time."""
    seconds: dict[str, list[float]] = {name: [] for name in reporters}
    names = list(reporters)
    step = 0
    for round_ in range(blocks):
        shift = round_ % len(names)
        for name in names[shift:] + names[:shift]:
            started = time.perf_counter()
            for _ in range(log_freq):
                trainer._step(step, last=10**9, reporter=reporters[name])
                step += 1
            seconds[name].append(time.perf_counter() - started)
    return {name: min(ts) for name, ts in seconds.items()}


def lower_bound(probe: GradientProbe, reps: int) -> dict[str, float]:
    """What any probe must at least read, each timed like the floor: the gradients (norms), the
    weights (weight_drift) and the scattered 10 % tier positions (top and bottom norms)."""
    stacked = [slot.param for slot in probe._slots]
    tiers = [slot.tier_index for slot in probe._slots]  # the probe's own (sorted) tier indices

    def weights() -> list[float]:
        return torch.stack([torch.linalg.vector_norm(p.detach()) for p in stacked]).tolist()

    def gather() -> list[float]:
        return torch.stack(
            [
                p.grad.reshape(p.shape[0], -1).index_select(1, i).sum()
                for p, i in zip(stacked, tiers, strict=True)
            ]
        ).tolist()

    return interleaved({"floor": lambda: floor(probe), "weights": weights, "gather": gather}, reps)


def main() -> int:
    args = parse_args()
    overrides = ["train.eval_every=0", "train.checkpoint_every=0", *args.set]
    cfg = load_config(args.config, overrides)
    work = Path(tempfile.mkdtemp(prefix="bench-probe-"))
    collector, up_address = start_collector(work / "collected")
    try:
        trainer = Trainer(cfg, work / "runs", collector=up_address)
        trainer._prepare()
        trainer.model.train()
        m = cfg.model
        print(
            f"model: d_model {m.d_model}, {m.n_layers} layers, {m.num_experts} experts, "
            f"seq {m.seq_len}, batch {cfg.train.batch_size}; threads {torch.get_num_threads()}"
        )

        # Probe, floor and reference on the same gradients (one real forward and backward).
        trainer._accumulate()
        probe = GradientProbe(trainer.model)
        n_grad = sum(
            p.grad.numel() for layer in probe.layers for _, p in layer.stacked_parameters()
        )
        fast = interleaved(
            {"probe": lambda: probe.measure(0), "floor": lambda: floor(probe)}, args.probe_reps
        )
        bound = lower_bound(probe, args.probe_reps)
        ref_s = statistics.median(
            timed(lambda: reference(probe.layers)) for _ in range(args.reference_reps)
        )
        diff = largest_difference(probe, reference(probe.layers))
        trainer.optimizer.zero_grad(set_to_none=True)
        print(f"gradients probed: {n_grad:,} values in {len(probe.layers)} layers")
        print(
            "must-read parts, in floors: weights "
            f"{bound['weights'] / bound['floor']:.2f}, tier gather "
            f"{bound['gather'] / bound['floor']:.2f}; with the gradients themselves, at least "
            f"{(bound['floor'] + bound['weights'] + bound['gather']) / bound['floor']:.2f} floors"
        )
        print(
            f"probe {fast['probe'] * 1e3:.2f} ms, floor {fast['floor'] * 1e3:.2f} ms, "
            f"reference {ref_s:.2f} s (largest difference from the probe {diff:.1e})"
        )

        # Training throughput, conditions interleaved block by block.
        dead = f"tcp://127.0.0.1:{free_port()}"  # nothing listens there
        conditions = {
            "none": None,
            "up": reporter(trainer, up_address, work, "up", args.log_freq),
            "down": reporter(trainer, dead, work, "down", args.log_freq),
        }
        blocks = throughput(trainer, conditions, args.blocks, args.log_freq)
        for rep in conditions.values():
            if rep is not None:
                rep.close("completed")
        step_s = blocks["none"] / args.log_freq
        print(
            f"block of {args.log_freq} steps (fastest of {args.blocks}): "
            + ", ".join(f"{name} {s:.2f} s" for name, s in blocks.items())
        )
    finally:
        collector.terminate()
        collector.wait(timeout=30)

    result = {
        "overhead_pct": round(100 * fast["probe"] / step_s / args.log_freq, 4),
        "floor_ratio": round(fast["probe"] / fast["floor"], 2),
        "reference_speedup": round(ref_s / fast["probe"], 1),
        "throughput_ratio_collector_up": round(blocks["none"] / blocks["up"], 4),
        "throughput_ratio_collector_down": round(blocks["none"] / blocks["down"], 4),
    }
    print(f"probe / training step: {fast['probe'] / step_s:.5f} (step {step_s:.2f} s)")
    for key, value in result.items():
        op, target = TARGETS[key]
        met = value <= target if op == "<=" else value >= target
        print(f"{key}: {value} (target {op} {target}: {'met' if met else 'MISSED'})")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
