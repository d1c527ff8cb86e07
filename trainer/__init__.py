"""The trainer side: the Prismatic layer, the gradient probe, and the ways to run it.

Public names, for any training loop:
- `Prismatic(base_expert, num_experts=3, ...)`: the layer (trainer/layer.py);
- `DynamicsReporter(model, address, config=...)`: probe + publisher, call after `backward()`;
- `log_gradient_dynamics(model, step)`: the design note's layer-averaged nested dict;
- `GradientProbe`, `find_prismatic_layers`, `unwrap`: the probe itself;
- `DynamicsCallback`: the PyTorch Lightning callback (imported on first use: `lightning` is an
  optional dependency).
"""

from __future__ import annotations

from typing import Any

from trainer.api import DynamicsReporter, log_gradient_dynamics
from trainer.layer import Prismatic
from trainer.probe import GradientProbe, ProbeResult, find_prismatic_layers, unwrap
from trainer.publisher import Publisher

__all__ = [
    "DynamicsCallback",
    "DynamicsReporter",
    "GradientProbe",
    "Prismatic",
    "ProbeResult",
    "Publisher",
    "find_prismatic_layers",
    "log_gradient_dynamics",
    "unwrap",
]


def __getattr__(name: str) -> Any:
    if name == "DynamicsCallback":
        from trainer.lightning import DynamicsCallback

        return DynamicsCallback
    raise AttributeError(f"module 'trainer' has no attribute {name!r}")
