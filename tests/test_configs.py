"""The experiment configs in configs/: every one loads, differs from the baseline only where its
name says, and trains end to end on a tiny model."""

from __future__ import annotations

import io
from pathlib import Path

import msgpack
import pytest
from net_support import free_port

from prismatic.config import load_config, run_hash, to_dict
from prismatic.up import STACK_FILE

REPO = Path(__file__).resolve().parent.parent
CONFIGS = REPO / "configs"
STACK = REPO / STACK_FILE
EXPERIMENTS = sorted(p for p in CONFIGS.glob("*.yaml") if p != STACK)
TINY = [
    "model.d_model=32",
    "model.n_layers=1",
    "model.seq_len=16",
    "train.batch_size=2",
    "train.steps=3",
    "train.eval_every=0",
    "train.checkpoint_every=0",
    "data.max_bytes=20000",
    "dynamics.log_freq=1",
]

# What each experiment changes relative to configs/default.yaml, besides its name.
DIFFERENCES = {
    "default.yaml": {},
    "control-scale0.yaml": {"model.perturbation_scale": 0.0},
    "top-only.yaml": {"model.perturbation_strategy": "top_only"},
    "bottom-only.yaml": {"model.perturbation_strategy": "bottom_only"},
    "random.yaml": {"model.perturbation_strategy": "random"},
    "aggressive-scale2.yaml": {"model.perturbation_scale": 2.0},
    "smear.yaml": {"model.mixing": "smear"},
    "dense.yaml": {"model.router_type": "dense"},
    "data-parallel-2.yaml": {"train.world_size": 2},
}


def flat(cfg) -> dict[str, object]:
    return {
        f"{section}.{key}" if isinstance(values, dict) else section: value
        for section, values in to_dict(cfg).items()
        for key, value in (values.items() if isinstance(values, dict) else [(None, values)])
    }


def test_the_issue_s_experiments_are_all_there():
    names = {p.name for p in EXPERIMENTS}
    assert set(DIFFERENCES) == names, "a config was added or removed: update DIFFERENCES"


@pytest.mark.parametrize("path", EXPERIMENTS, ids=lambda p: p.name)
def test_every_config_loads_and_differs_from_the_baseline_only_where_its_name_says(path):
    cfg = load_config(path)
    baseline = flat(load_config(CONFIGS / "default.yaml"))
    changed = {k: v for k, v in flat(cfg).items() if baseline[k] != v and k != "name"}
    assert changed == DIFFERENCES[path.name]
    if path.name != "default.yaml":
        assert cfg.name != "dual-sided", "each experiment has its own name in the dashboard"


def test_every_experiment_has_its_own_run_hash_and_name():
    configs = [load_config(p) for p in EXPERIMENTS]
    assert len({run_hash(c) for c in configs}) == len(configs)
    assert len({c.name for c in configs}) == len(configs)


def test_every_config_stays_on_loopback_by_default():
    for path in EXPERIMENTS:
        assert load_config(path).dynamics.collector == "tcp://127.0.0.1:5557", path.name


@pytest.mark.slow
@pytest.mark.parametrize("path", EXPERIMENTS, ids=lambda p: p.name)
def test_every_config_trains_a_few_tiny_steps(path, tmp_path):
    """In this process, with no collector listening: the trainer must still finish (it never
    waits for the collector) and its spool must hold run_start, one message per step, run_end."""
    from trainer.loop import train

    overrides = [*TINY, "train.world_size=1"]  # torchrun's ranks are covered in test_up.py
    cfg = load_config(path, overrides)
    status = train(cfg, tmp_path, collector=f"tcp://127.0.0.1:{free_port()}")
    assert status == "completed"
    spool = tmp_path / run_hash(cfg) / "spool" / "rank0.msgpack"
    kinds = [m["kind"] for m in msgpack.Unpacker(io.BytesIO(spool.read_bytes()), raw=False)]
    assert kinds == ["run_start", "dynamics", "dynamics", "dynamics", "run_end"]
