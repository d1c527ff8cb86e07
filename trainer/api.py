"""Using the probe from your own training loop.

Two paths, as the design note promises:
- `DynamicsReporter`: probe + publisher in one object; call it after `backward()`, before
  `optimizer.step()`; it measures every `log_freq` steps and sends to the collector.
- `log_gradient_dynamics(model, step)`: returns the design note's layer-averaged nested dict
  (`expert_gradients`, `divergence_scores`) and sends nothing.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import socket
import sys
import weakref
from typing import Any

import torch
from torch import nn

from prismatic import __version__, wire
from prismatic.aggregate import note_dict
from prismatic.config import RUN_HASH_LENGTH, check_address
from prismatic.errors import ConfigError, ProbeError
from trainer.probe import GradientProbe, ProbeResult, find_prismatic_layers
from trainer.publisher import Publisher

_PROBES: weakref.WeakKeyDictionary[nn.Module, GradientProbe] = weakref.WeakKeyDictionary()


def log_gradient_dynamics(model: nn.Module, step: int) -> dict | None:
    """The design note's helper: layer-averaged dynamics of every Prismatic layer, or None when
    the model has no gradients yet. Call after backward(), before optimizer.step()."""
    probe = _PROBES.get(model)
    if probe is None:
        probe = _PROBES[model] = GradientProbe(model)
    result = probe.measure(step)
    return None if result is None else note_dict(result.layer_mean())


def hash_config(config: dict[str, Any]) -> str:
    canonical = json.dumps(config, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()[:RUN_HASH_LENGTH]


def model_shape(model: nn.Module) -> dict[str, Any]:
    layers = find_prismatic_layers(model)
    first = layers[0]
    top = first.sparsity / 2
    return {
        "layers": len(layers),
        "experts": max(layer.num_experts for layer in layers),
        "tier_fractions": {"top": top, "bottom": top, "middle": 1 - 2 * top},
        "mixing": first.mixing,
        "strategy": first.perturbation_strategy,
        "scale": first.perturbation_scale,
        "sparsity": first.sparsity,
    }


def library_versions() -> dict[str, str]:
    import msgpack
    import zmq

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "pyzmq": zmq.__version__,
        "msgpack": ".".join(map(str, msgpack.version)),
        "prismatic": __version__,
    }


class DynamicsReporter:
    """Probe + publisher for any training loop that holds Prismatic layers.

    >>> reporter = DynamicsReporter(model, "tcp://127.0.0.1:5557", config={"name": "mine"})
    >>> # each step: loss.backward(); reporter.after_backward(step, loss=loss.item()); opt.step()
    >>> reporter.close("completed")

    As a context manager it closes the run itself: "completed" when the block ends normally,
    "interrupted" on Ctrl-C, "failed" on any other exception.
    """

    def __init__(
        self,
        model: nn.Module,
        address: str,
        *,
        config: dict[str, Any],
        log_freq: int = 10,
        run_hash: str | None = None,
        rank: int = 0,
        world_size: int = 1,
        spool_path: str | os.PathLike[str] | None = None,
        publisher: Publisher | None = None,
    ) -> None:
        if publisher is None:
            check_address("DynamicsReporter address", address)
        if isinstance(log_freq, bool) or not isinstance(log_freq, int) or log_freq < 1:
            raise ConfigError(f"log_freq: {log_freq!r} is not accepted; expected an integer >= 1")
        # Data-parallel ranks route different batches: average the routing weights over ranks
        # so every rank reports the same values (the gradients are already synchronised).
        self.probe = GradientProbe(model, average_routing_over_ranks=world_size > 1)
        self.log_freq = log_freq
        self.run_hash = run_hash or hash_config(config)
        self.publisher = publisher or Publisher(address, self.run_hash, rank, spool_path=spool_path)
        self.last_step = -1
        self.closed = False
        self.publisher.send(
            wire.KIND_RUN_START,
            name=str(config.get("name", "")),
            config=config,
            model=model_shape(model),
            world_size=world_size,
            shards=False,
            host=socket.gethostname(),
            pid=os.getpid(),
            versions=library_versions(),
            argv=sys.argv[:20],
        )

    def due(self, step: int) -> bool:
        return step % self.log_freq == 0

    def after_backward(
        self,
        step: int,
        *,
        loss: float | None = None,
        val_loss: float | None = None,
        lr: float | None = None,
        loss_scale: float | None = None,
        force: bool = False,
    ) -> ProbeResult | None:
        """Measure and publish if this step is due (or `force`); returns what was measured."""
        if self.closed:
            raise ProbeError(
                f"DynamicsReporter of run {self.run_hash} is closed; make a new one to report again"
            )
        if not (force or self.due(step)):
            return None
        result = self.probe.measure(step, loss_scale=loss_scale)
        if result is None:
            return None
        self.publisher.send(
            wire.KIND_DYNAMICS,
            step=step,
            loss=loss,
            val_loss=val_loss,
            lr=lr,
            metrics=result.metrics,
        )
        self.last_step = step
        return result

    def close(self, status: str = "completed") -> None:
        """End the run with `status` (completed, failed or interrupted); again is a no-op."""
        if status not in wire.END_STATUSES:
            accepted = ", ".join(wire.END_STATUSES)
            raise ConfigError(f"status: {status!r} is not accepted; expected one of {accepted}")
        if self.closed:
            return
        self.closed = True
        self.publisher.send(
            wire.KIND_RUN_END,
            status=status,
            last_step=self.last_step,
            sent=self.publisher.sent + 1,
            dropped=self.publisher.dropped,
        )
        self.publisher.close()

    def __enter__(self) -> DynamicsReporter:
        return self

    def __exit__(self, kind: type[BaseException] | None, *rest: object) -> None:
        if kind is None:
            self.close("completed")
        elif issubclass(kind, KeyboardInterrupt):
            self.close("interrupted")
        else:
            self.close("failed")
