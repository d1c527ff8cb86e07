"""A PyTorch Lightning callback: the gradient probe in any LightningModule with Prismatic layers.

`lightning` is an optional dependency (`pip install prismatic-dynamics[lightning]`); nothing
else in the project imports it.

    trainer = lightning.Trainer(callbacks=[DynamicsCallback("tcp://127.0.0.1:5557", log_freq=10)])

The probe runs in `on_before_optimizer_step`: once per optimizer step, after the last
accumulated micro-batch, after Lightning's mixed-precision plugin has unscaled the gradients and,
under DDP, after they were all-reduced; each rank publishes with its `global_rank`.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch

from prismatic.config import DEFAULT_COLLECTOR
from trainer.api import DynamicsReporter


class DynamicsCallback(pl.Callback):
    """Probe + publish every `log_freq` optimizer steps.

    `loss_key` / `val_loss_key`: names the module logs with `self.log(...)`; their latest values
    travel with the dynamics (the validation loss once, with the first record after it).
    `config`: what identifies the run (its hash); by default the module's class name and its
    hyper-parameters. `spool_dir`: where each rank appends every message (rank<N>.msgpack).
    """

    def __init__(
        self,
        address: str = DEFAULT_COLLECTOR,
        *,
        log_freq: int = 10,
        config: dict[str, Any] | None = None,
        run_hash: str | None = None,
        spool_dir: Path | None = None,
        loss_key: str = "train_loss",
        val_loss_key: str = "val_loss",
    ) -> None:
        super().__init__()
        self.address = address
        self.log_freq = log_freq
        self.config = config
        self.run_hash = run_hash
        self.spool_dir = Path(spool_dir) if spool_dir is not None else None
        self.loss_key = loss_key
        self.val_loss_key = val_loss_key
        self.reporter: DynamicsReporter | None = None
        self._val_loss: float | None = None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit" or self.reporter is not None:
            return
        rank = trainer.global_rank
        spool = self.spool_dir / f"rank{rank}.msgpack" if self.spool_dir is not None else None
        self.reporter = DynamicsReporter(
            pl_module,
            self.address,
            config=self.config or _module_config(pl_module),
            log_freq=self.log_freq,
            run_hash=self.run_hash,
            rank=rank,
            world_size=trainer.world_size,
            spool_path=spool,
        )

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.sanity_checking:
            self._val_loss = _metric(trainer.callback_metrics, self.val_loss_key)

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any
    ) -> None:
        if self.reporter is None or not self.reporter.due(trainer.global_step):
            return
        result = self.reporter.after_backward(
            trainer.global_step,
            loss=_metric(trainer.callback_metrics, self.loss_key),
            val_loss=self._val_loss,
            lr=float(optimizer.param_groups[0]["lr"]),
        )
        if result is not None:
            self._val_loss = None

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._close("completed")

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        self._close("interrupted" if isinstance(exception, KeyboardInterrupt) else "failed")

    def _close(self, status: str) -> None:
        if self.reporter is not None:
            self.reporter.close(status)
            self.reporter = None


def _metric(metrics: dict[str, Any], key: str) -> float | None:
    value = metrics.get(key)
    if value is None:
        return None
    value = float(value.item() if isinstance(value, torch.Tensor) else value)
    return value if math.isfinite(value) else None


def _module_config(pl_module: pl.LightningModule) -> dict[str, Any]:
    return {"name": type(pl_module).__name__, "hparams": dict(pl_module.hparams)}
