"""Data-parallel training with torchrun (gloo on CPU, 2 ranks): real processes, real sockets."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from net_support import free_port
from trainer_support import (
    PRISMATIC,
    REPO,
    TINY,
    Inbox,
    dynamics_steps,
    spool_messages,
    tiny_config,
)

from prismatic.config import run_hash
from trainer.loop import CHECKPOINT_NAME

pytestmark = pytest.mark.slow
TORCHRUN = str(Path(sys.executable).parent / "torchrun")


def torchrun(runs: Path, collector: str, *overrides: str, resume: bool = False) -> list[str]:
    sets = [arg for item in [*TINY, "train.world_size=2", *overrides] for arg in ("--set", item)]
    return [
        TORCHRUN,
        "--nproc_per_node",
        "2",
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(free_port()),
        "--no-python",
        PRISMATIC,
        "--log-level",
        "WARNING",
        "train",
        "configs/default.yaml",
        *sets,
        "--runs-dir",
        str(runs),
        "--collector",
        collector,
        *(["--resume"] if resume else []),
    ]


def collect_both_ranks(inbox: Inbox, proc: subprocess.Popen) -> list[dict]:
    messages: list[dict] = []
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        messages += inbox.receive(timeout_s=1.0)
        if sum(m["kind"] == "run_end" for m in messages) == 2:
            break
    return messages


def test_each_rank_publishes_with_its_rank_and_the_probe_values_agree(tmp_path):
    overrides = ("train.steps=6", "dynamics.log_freq=2", "train.checkpoint_every=3")
    with Inbox() as inbox:
        proc = subprocess.Popen(
            torchrun(tmp_path, inbox.address, *overrides),
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        messages = collect_both_ranks(inbox, proc)
        output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, output

    by_rank = {rank: [m for m in messages if m["rank"] == rank] for rank in (0, 1)}
    for rank, mine in by_rank.items():
        assert [m["kind"] for m in mine][0] == "run_start"
        assert mine[0]["world_size"] == 2
        assert dynamics_steps(mine) == [0, 2, 4, 5], rank
        assert mine[-1]["kind"] == "run_end" and mine[-1]["status"] == "completed"

    # Each rank trained on its own batches (different losses), yet the probe ran on the
    # synchronised gradients and the routing is averaged over ranks: the same values.
    records = [{m["step"]: m for m in by_rank[r] if m["kind"] == "dynamics"} for r in (0, 1)]
    assert any(records[0][s]["loss"] != records[1][s]["loss"] for s in records[0])
    for step, zero in records[0].items():
        one = records[1][step]
        for name, table in zero["metrics"].items():
            for a, b in zip(table[0], one["metrics"][name][0], strict=True):
                assert a == b if a is None else a == pytest.approx(b, rel=1e-5, abs=1e-7), (
                    step,
                    name,
                )
    run_dir = tmp_path / run_hash(tiny_config("train.world_size=2", *overrides))
    assert len(torch.load(run_dir / CHECKPOINT_NAME, weights_only=False)["rng"]) == 2


def test_ranks_stop_after_the_same_step_and_resume_together(tmp_path):
    # Long enough that the run is still going when the test stops it after 6 records: at 40
    # steps, about 1 s was left, which a descheduled test process could miss.
    steps = 200
    overrides = (
        "model.d_model=64",
        "model.n_layers=2",
        "model.seq_len=64",
        "train.batch_size=8",
        f"train.steps={steps}",
        "train.checkpoint_every=1000",
    )
    nobody = "tcp://127.0.0.1:9"  # the spool files are the record
    run_dir = tmp_path / run_hash(tiny_config("train.world_size=2", *overrides))
    first = subprocess.Popen(
        torchrun(tmp_path, nobody, *overrides),
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 300
    spool = run_dir / "spool" / "rank0.msgpack"
    while time.monotonic() < deadline and first.poll() is None:
        if spool.exists() and len(dynamics_steps(spool_messages(run_dir))) >= 6:
            break
        time.sleep(0.02)
    first.send_signal(signal.SIGINT)  # torchrun passes it on to both ranks
    first.wait(timeout=120)
    stopped = torch.load(run_dir / CHECKPOINT_NAME, weights_only=False)["step"]
    assert 5 <= stopped < steps - 1
    for rank in (0, 1):
        messages = spool_messages(run_dir, rank)
        assert dynamics_steps(messages)[-1] == stopped
        assert [m["status"] for m in messages if m["kind"] == "run_end"] == ["interrupted"]

    second = subprocess.run(
        torchrun(tmp_path, nobody, *overrides, resume=True),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert second.returncode == 0, second.stdout + second.stderr
    for rank in (0, 1):
        assert dynamics_steps(spool_messages(run_dir, rank)) == list(range(steps))
