"""Shared pieces of the trainer tests: tiny models and configs, a real PULL socket that collects
what a trainer publishes, and reads of the spool files a run writes."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import msgpack
import torch
import zmq
from torch import nn

from prismatic import wire
from prismatic.config import ExperimentConfig, load_config
from trainer.layer import Prismatic

REPO = Path(__file__).resolve().parent.parent
PRISMATIC = str(Path(sys.executable).parent / "prismatic")
TINY = [
    "model.d_model=32",
    "model.n_layers=1",
    "model.n_heads=2",
    "model.seq_len=16",
    "train.batch_size=2",
    "train.eval_every=0",
    "train.checkpoint_every=0",
    "data.max_bytes=20000",
    "dynamics.log_freq=1",
]


def tiny_config(*overrides: str) -> ExperimentConfig:
    """The default config shrunk to a model that trains a step in milliseconds."""
    return load_config(REPO / "configs" / "default.yaml", [*TINY, *overrides])


class MLP(nn.Module):
    """A base expert: (..., d) -> (..., d)."""

    def __init__(self, d: int = 8, hidden: int = 16) -> None:
        super().__init__()
        self.fc = nn.Linear(d, hidden)
        self.proj = nn.Linear(hidden, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(torch.relu(self.fc(x)))


def tiny_net(
    layers: int = 2, d: int = 8, seed: int = 0, **prismatic: Any
) -> tuple[nn.Module, torch.Tensor]:
    """A stack of Prismatic layers (with residuals) and a batch of inputs (4, 5, d)."""
    torch.manual_seed(seed)
    blocks = [Prismatic(MLP(d), name=f"layer{i}", **prismatic) for i in range(layers)]
    net = nn.Sequential(*blocks)
    return net, torch.randn(4, 5, d)


def backward(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """One training forward and backward; returns the loss."""
    net.train()
    loss = net(x).square().mean()
    loss.backward()
    return loss


class Inbox:
    """A bound PULL socket on a free loopback port: what a publisher sends, decoded."""

    def __init__(self) -> None:
        self.context = zmq.Context()
        self.socket = self.context.socket(zmq.PULL)
        self.socket.setsockopt(zmq.LINGER, 0)
        port = self.socket.bind_to_random_port("tcp://127.0.0.1")
        self.address = f"tcp://127.0.0.1:{port}"

    def receive(self, until_kind: str = wire.KIND_RUN_END, timeout_s: float = 30.0) -> list[dict]:
        """Messages until one of `until_kind` arrives (or the timeout); validated by wire."""
        messages: list[dict] = []
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.socket.poll(100):
                messages.append(wire.decode(self.socket.recv()))
                if messages[-1]["kind"] == until_kind:
                    break
        return messages

    def close(self) -> None:
        self.socket.close()
        self.context.term()

    def __enter__(self) -> Inbox:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def spool_messages(run_dir: Path, rank: int = 0) -> list[dict]:
    """Every message a rank appended to its spool file, validated by the wire module."""
    path = run_dir / "spool" / f"rank{rank}.msgpack"
    with open(path, "rb") as fh:
        return [wire.validate(m) for m in msgpack.Unpacker(fh, raw=False, strict_map_key=False)]


def dynamics_steps(messages: list[dict]) -> list[int]:
    return [m["step"] for m in messages if m["kind"] == wire.KIND_DYNAMICS]


def prismatic_cmd(*args: str) -> list[str]:
    return [PRISMATIC, "--log-level", "WARNING", *args]


def run_cli(*args: str, timeout: float = 300, **kwargs: Any) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run(
        prismatic_cmd(*args),
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        **kwargs,
    )


def train_args(config: str = "configs/default.yaml", *overrides: str) -> list[str]:
    args = ["train", config]
    for item in [*TINY, *overrides]:
        args += ["--set", item]
    return args
