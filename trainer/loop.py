"""`prismatic train`: a real training run on real text, probed and published every log_freq.

One optimizer step reads as phases: micro-batches (forward, backward), unscale, probe and
publish, clip, optimizer step, then evaluation and checkpoint when due.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from prismatic import db
from prismatic.config import ExperimentConfig, dump_yaml, run_hash, to_dict
from prismatic.errors import ConfigError
from trainer.api import DynamicsReporter
from trainer.data import Corpus, sample_batch
from trainer.model import build_model
from trainer.progress import Progress
from trainer.publisher import Publisher

log = logging.getLogger(__name__)
CHECKPOINT_NAME = db.CHECKPOINT_NAME


@dataclass
class Distributed:
    rank: int = 0
    world_size: int = 1

    @classmethod
    def from_env(cls, cfg: ExperimentConfig) -> Distributed:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world != cfg.train.world_size:
            raise ConfigError(
                f"train.world_size: {cfg.train.world_size} is not accepted; this process was "
                f"launched with WORLD_SIZE={world} (use torchrun --nproc_per_node "
                f"{cfg.train.world_size} for data-parallel runs)"
            )
        if world > 1 and not dist.is_initialized():
            dist.init_process_group("gloo")
        return cls(rank=int(os.environ.get("RANK", "0")), world_size=world)


def run_dir_for(cfg: ExperimentConfig, runs_dir: Path) -> Path:
    return Path(runs_dir) / run_hash(cfg)


def _autocast(cfg: ExperimentConfig, device: torch.device):
    if cfg.train.precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if cfg.train.precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


@torch.no_grad()
def evaluate(model: nn.Module, corpus: Corpus, cfg: ExperimentConfig, device) -> float | None:
    if len(corpus.val) <= cfg.model.seq_len + 1:
        return None
    was_training = model.training
    model.eval()
    generator = torch.Generator().manual_seed(12345)  # the same held-out windows every time
    losses = []
    for _ in range(cfg.train.eval_batches):
        x, y = sample_batch(corpus.val, cfg.train.batch_size, cfg.model.seq_len, generator)
        with _autocast(cfg, device):
            _, loss = model(x.to(device), y.to(device))
        losses.append(loss.item())
    model.train(was_training)
    return sum(losses) / len(losses)


def save_checkpoint(path: Path, state: dict) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)  # atomic: a crash mid-save never leaves a torn checkpoint


def usable_device(name: str) -> torch.device:
    """`train.device` as a torch.device this machine has; ConfigError naming it otherwise."""
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise ConfigError(
            f"train.device: {name!r} is not accepted; expected a torch device such as cpu, "
            "cuda, cuda:1 or mps"
        ) from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        missing = count == 0 or (device.index is not None and device.index >= count)
        seen = f"torch {torch.__version__} sees {count} CUDA device(s)"
    elif device.type == "mps":
        missing = not torch.backends.mps.is_available()
        seen = f"torch {torch.__version__} sees no Apple MPS device"
    else:
        missing = False
    if missing:
        raise ConfigError(
            f"train.device: {name!r} is not available on this machine ({seen}); use cpu, or "
            "install a torch build for your GPU (see README)"
        )
    return device


class StopRequest:
    """Ctrl-C or SIGTERM asks the run to stop at the end of the current step: a checkpoint,
    then run_end "interrupted", and `--resume` repeats no step. A second signal stops at once.

    Under data-parallel training the ranks agree (one tiny all-reduce per step) so that all of
    them stop after the same step; otherwise one would wait forever for the others' gradients.
    """

    def __init__(self) -> None:
        self.requested = False
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    def _handle(self, signum: int, frame: object) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        log.warning(
            "trainer: %s received; stopping after this step (again to stop at once)",
            signal.Signals(signum).name,
        )

    def agreed(self, world_size: int) -> bool:
        if world_size == 1:
            return self.requested
        flag = torch.tensor([float(self.requested)])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())


class Trainer:
    """One run: `run()` trains from step 0 (or from the last checkpoint) to `train.steps`."""

    def __init__(
        self,
        cfg: ExperimentConfig,
        runs_dir: Path,
        collector: str | None = None,
        resume: bool = False,
    ) -> None:
        self.cfg = cfg
        self.dist = Distributed.from_env(cfg)
        self.run_hash = run_hash(cfg)
        self.run_dir = Path(runs_dir) / self.run_hash
        self.collector = collector or cfg.dynamics.collector
        self.resume = resume
        if resume and not (self.run_dir / CHECKPOINT_NAME).is_file():
            raise ConfigError(
                f"--resume: no checkpoint at {self.run_dir / CHECKPOINT_NAME}; start the run "
                "without --resume (checkpoints are written every train.checkpoint_every steps)"
            )
        self.device = usable_device(cfg.train.device)
        if cfg.train.precision == "fp16" and self.device.type == "cpu":
            log.warning(
                "trainer: train.precision fp16 on the CPU is emulated and was about 20x slower "
                "than fp32 here; bf16 or fp32 suit a CPU"
            )
        if cfg.train.threads:
            # Several trainers on one machine: one thread each (oversubscription is ~10x slower).
            torch.set_num_threads(cfg.train.threads)

    def _prepare(self) -> None:
        cfg = self.cfg
        # The corpus first: a bad data.path leaves no run folder behind.
        self.corpus = Corpus.load(cfg.data, cfg.model.seq_len)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if self.dist.rank == 0:
            (self.run_dir / db.CONFIG_NAME).write_text(dump_yaml(cfg), encoding="utf-8")
            if not self.resume and (self.run_dir / CHECKPOINT_NAME).is_file():
                log.warning(
                    "trainer: %s already has a checkpoint; starting again from step 0 and "
                    "overwriting its steps (pass --resume to continue it instead)",
                    self.run_hash,
                )
        self.model = build_model(cfg.model, cfg.seed).to(self.device)
        # Same base weights on every rank (above); from here on each rank draws its own
        # batches and dropout masks.
        torch.manual_seed(cfg.seed * 1000 + self.dist.rank + 1)
        self.optimizer = torch.optim.AdamW(
            self.model.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay
        )
        self.generator = torch.Generator().manual_seed(cfg.seed * 1000 + self.dist.rank)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=cfg.train.precision == "fp16")
        self.start_step = 0
        if self.resume:
            self._load_checkpoint()
        self.wrapped: nn.Module = self.model
        if self.dist.world_size > 1:
            # No buffer broadcast before each forward: the tiers are equal by construction and
            # the routing sums are each rank's own (the probe averages them over ranks).
            self.wrapped = DDP(self.model, forward_sync_buffers=False)

    # --- checkpoints ---------------------------------------------------------------------------

    def _checkpoint_state(self, step: int) -> dict | None:
        """Everything a resumed run needs, with every rank's random state; None off rank 0.

        Under data-parallel training this is a collective: every rank must call it."""
        rng = {"batches": self.generator.get_state(), "torch": torch.get_rng_state()}
        ranks = [rng]
        if self.dist.world_size > 1:
            ranks = [{} for _ in range(self.dist.world_size)]
            dist.all_gather_object(ranks, rng)
        if self.dist.rank != 0:
            return None
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "step": step,
            "rng": ranks,
        }

    def _save_checkpoint(self, step: int) -> None:
        state = self._checkpoint_state(step)
        if state is not None:
            save_checkpoint(self.run_dir / CHECKPOINT_NAME, state)
            log.info("trainer: %s checkpoint at step %d", self.run_hash, step)

    def _load_checkpoint(self) -> None:
        path = self.run_dir / CHECKPOINT_NAME
        state = torch.load(path, map_location=self.device, weights_only=False)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        rng = state["rng"][self.dist.rank]
        self.generator.set_state(rng["batches"])
        torch.set_rng_state(rng["torch"])
        self.start_step = state["step"] + 1
        log.info("trainer: resumed %s after step %d", self.run_hash, state["step"])

    def _maybe_checkpoint(self, step: int, last: int) -> bool:
        every = self.cfg.train.checkpoint_every
        if every and (step % every == 0 or step == last):
            self._save_checkpoint(step)
            return True
        return False

    # --- the run -------------------------------------------------------------------------------

    def _reporter(self) -> DynamicsReporter | None:
        if not self.cfg.dynamics.enabled:
            return None
        spool = None
        if self.cfg.dynamics.spool:
            spool = self.run_dir / "spool" / f"rank{self.dist.rank}.msgpack"
        publisher = Publisher(
            self.collector,
            self.run_hash,
            self.dist.rank,
            spool_path=spool,
            send_hwm=self.cfg.dynamics.send_hwm,
            linger_ms=round(self.cfg.dynamics.linger_s * 1000),
            curve=self._curve(),
        )
        reporter = DynamicsReporter(
            self.model,
            self.collector,
            config=to_dict(self.cfg),
            log_freq=self.cfg.dynamics.log_freq,
            run_hash=self.run_hash,
            rank=self.dist.rank,
            world_size=self.dist.world_size,
            publisher=publisher,
        )
        reporter.last_step = self.start_step - 1
        return reporter

    def _curve(self) -> tuple[bytes, bytes, bytes] | None:
        from prismatic.keys import client_curve

        return client_curve(self.cfg.dynamics)

    def run(self) -> str:
        """Train to `train.steps` (or until asked to stop); returns the end status sent to the
        collector: completed, interrupted or failed."""
        self._prepare()
        reporter = self._reporter()
        status = "failed"
        try:
            with StopRequest() as stop:
                finished = self._train(reporter, stop)
            status = "completed" if finished else "interrupted"
        except KeyboardInterrupt:
            status = "interrupted"
            raise
        finally:
            if reporter is not None:
                reporter.close(status)
            if dist.is_initialized():
                dist.destroy_process_group()
        return status

    def _train(self, reporter: DynamicsReporter | None, stop: StopRequest) -> bool:
        """The step loop; False if it stopped early on request (after a checkpoint)."""
        cfg = self.cfg
        tokens = cfg.train.batch_size * cfg.model.seq_len * cfg.train.grad_accum
        progress = Progress(cfg.train.steps, tokens * self.dist.world_size)
        self.model.train()
        last = cfg.train.steps - 1
        for step in range(self.start_step, cfg.train.steps):
            loss, val_loss = self._step(step, last, reporter)
            checkpointed = self._maybe_checkpoint(step, last)
            if self.dist.rank == 0:
                progress.update(step + 1, loss, val_loss, force=step == last)
            if step < last and stop.agreed(self.dist.world_size):
                if not checkpointed and cfg.train.checkpoint_every:
                    self._save_checkpoint(step)
                log.warning("trainer: %s stopped after step %d", self.run_hash, step)
                return False
        return True

    def _step(
        self, step: int, last: int, reporter: DynamicsReporter | None
    ) -> tuple[float, float | None]:
        """One optimizer step; returns the training loss and the validation loss, if due."""
        # Forward and backward over the micro-batches of this optimizer step.
        loss = self._accumulate()

        # Probe on the synchronised, unscaled gradients, before the optimizer changes them.
        self.scaler.unscale_(self.optimizer)
        eval_due = self._eval_due(step, last)
        val_loss = self._evaluate() if eval_due else None
        if reporter is not None:
            # Every rank probes the same steps, so the collector sees each from all ranks.
            force = step == last or eval_due
            reporter.after_backward(
                step, loss=loss, val_loss=val_loss, lr=self.cfg.train.lr, force=force
            )

        # Clip and step.
        if self.cfg.train.grad_clip > 0:
            nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.train.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        return loss, val_loss

    def _accumulate(self) -> float:
        cfg = self.cfg
        total = torch.zeros((), device=self.device)
        micro = cfg.train.grad_accum
        for i in range(micro):
            x, y = sample_batch(
                self.corpus.train, cfg.train.batch_size, cfg.model.seq_len, self.generator
            )
            # DDP: synchronise gradients only on the last micro-batch of the step.
            ddp = self.wrapped if isinstance(self.wrapped, DDP) else None
            context = (
                ddp.no_sync() if ddp is not None and i < micro - 1 else contextlib.nullcontext()
            )
            with context, _autocast(self.cfg, self.device):
                _, loss = self.wrapped(x.to(self.device), y.to(self.device))
                loss = loss / micro
            self.scaler.scale(loss).backward()
            total += loss.detach().float()
        value = float(total)
        if not math.isfinite(value):
            log.warning("trainer: non-finite loss %s", value)
        return value

    def _eval_due(self, step: int, last: int) -> bool:
        every = self.cfg.train.eval_every
        return bool(every) and (step % every == 0 or step == last)

    def _evaluate(self) -> float | None:
        if self.dist.rank != 0:
            return None
        return evaluate(self.model, self.corpus, self.cfg, self.device)


def train(
    cfg: ExperimentConfig, runs_dir: Path, collector: str | None = None, resume: bool = False
) -> str:
    started = time.perf_counter()
    trainer = Trainer(cfg, runs_dir, collector, resume)
    first_rank = trainer.dist.rank == 0  # one start and one end line per run, not per rank
    if first_rank:
        print(f"run {trainer.run_hash} ({cfg.name}) -> {trainer.run_dir}", flush=True)
    status = trainer.run()
    log.log(
        logging.INFO if first_rank else logging.DEBUG,
        "trainer: %s %s in %.1fs",
        trainer.run_hash,
        status,
        time.perf_counter() - started,
    )
    return status
