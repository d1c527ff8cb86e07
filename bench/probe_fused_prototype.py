"""How close can a probe come to the floor? A one-pass fused kernel, measured on its own.

Not part of the product: a measurement behind the probe's `floor_ratio` in docs/benchmarks.md.
It needs numba, which is not a dependency of this project:

    .venv/bin/pip install numba && .venv/bin/python bench/probe_fused_prototype.py

On parameters shaped like the default model's (per layer 2 x 3 x 262,144 weights and two
biases, 4 layers, 3 experts), one thread, it times side by side:
- floor:       one `torch.linalg.vector_norm` pass over the gradients (bench/probe.py's floor);
- weights:     the same pass over the weights: what `weight_drift` must read at least;
- grads_fused: every gradient metric (‖G_k‖, G_k·G_0, top and bottom tier sums) in one pass
  over the gradients and a byte of tier id per position, vectorised by LLVM;
- fused:       that and ‖W_k − W_0‖, ‖W_0‖ in the same pass: every metric the probe takes.
The last line is one JSON object of the times in floors.
"""

from __future__ import annotations

import json
import statistics
import time

import numpy as np
import torch
from numba import njit

ZERO = np.float32(0.0)
BLOCK = 4096  # positions per block: one block of every row stays in L1 while it is used


@njit(fastmath=True, nogil=True, boundscheck=False, inline="always")
def _grad_row(gk, g0, tier):
    total = dot = top = bottom = ZERO
    for i in range(gk.shape[0]):
        x = gk[i]
        sq = x * x
        total += sq
        dot += x * g0[i]
        t = tier[i]
        top += sq if t == 1 else ZERO
        bottom += sq if t == 2 else ZERO
    return total, dot, top, bottom


@njit(fastmath=True, nogil=True, boundscheck=False, inline="always")
def _distance_sq(a, b):
    s = ZERO
    for i in range(a.shape[0]):
        d = a[i] - b[i]
        s += d * d
    return s


@njit(fastmath=True, nogil=True, boundscheck=False, inline="always")
def _sum_sq(a):
    s = ZERO
    for i in range(a.shape[0]):
        s += a[i] * a[i]
    return s


@njit(fastmath=True, nogil=True, boundscheck=False)
def fused(g, w, tier, out, with_weights):
    """out (6, E) float64 += per expert: ‖G‖², G·G_0, top², bottom², ‖W − W_0‖², ‖W_0‖²."""
    experts, n = g.shape
    for start in range(0, n, BLOCK):
        stop = min(start + BLOCK, n)
        g0 = g[0, start:stop]
        t = tier[start:stop]
        for k in range(experts):
            total, dot, top, bottom = _grad_row(g[k, start:stop], g0, t)
            out[0, k] += total
            out[1, k] += dot
            out[2, k] += top
            out[3, k] += bottom
        if with_weights:
            w0 = w[0, start:stop]
            out[5, 0] += _sum_sq(w0)
            for k in range(1, experts):
                out[4, k] += _distance_sq(w[k, start:stop], w0)


def main() -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    experts, d, hidden, layers = 3, 256, 1024, 4
    shapes = [(experts, d * hidden)] * 2 * layers + [(experts, hidden), (experts, d)] * layers
    grads = [torch.randn(s) for s in shapes]
    weights = [torch.randn(s) for s in shapes]
    tiers = []
    for _, n in shapes:
        k = int(n * 0.05)
        order = torch.randn(n).abs().argsort().numpy()
        tier = np.zeros(n, np.uint8)
        tier[order[-k:]], tier[order[:k]] = 1, 2
        tiers.append(tier)
    out = np.zeros((len(shapes), 6, experts))

    def floor() -> list[float]:
        return torch.stack([torch.linalg.vector_norm(g) for g in grads]).tolist()

    def weights_floor() -> list[float]:
        return torch.stack([torch.linalg.vector_norm(w) for w in weights]).tolist()

    def run(with_weights: bool) -> list:
        out[:] = 0.0
        for j, (g, w) in enumerate(zip(grads, weights, strict=True)):
            fused(g.numpy(), w.numpy(), tiers[j], out[j], with_weights)
        return out.tolist()

    started = time.perf_counter()
    run(True)
    print(f"compiled in {time.perf_counter() - started:.1f} s")
    g, w, tier = grads[0].double(), weights[0].double(), torch.from_numpy(tiers[0])
    exact = torch.stack(
        [
            (g * g).sum(1),
            (g * g[0]).sum(1),
            (g[:, tier == 1] ** 2).sum(1),
            (g[:, tier == 2] ** 2).sum(1),
            ((w - w[0]) ** 2).sum(1),
        ]
    )
    worst = (torch.from_numpy(out[0, :5]) - exact).abs().max() / exact.abs().max()
    print(f"largest relative difference from float64: {worst:.1e}")

    fns = {
        "floor": floor,
        "weights": weights_floor,
        "grads_fused": lambda: run(False),
        "fused": lambda: run(True),
    }
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(80):
        for name, fn in fns.items():
            started = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - started)
    median = {name: statistics.median(ts) for name, ts in times.items()}
    result = {name: round(s / median["floor"], 2) for name, s in median.items()}
    for name, s in median.items():
        print(f"{name:12s} {s * 1e3:6.3f} ms  {result[name]:5.2f} floors")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
