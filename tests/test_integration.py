"""The whole path in one process: a few real training steps of a tiny Prismatic model, probed
and published over `inproc://` (one ZeroMQ context), a collector in a thread, and rows with the
design note's columns in a real dynamics.db."""

from __future__ import annotations

from pathlib import Path

import torch
import zmq
from collector_support import db_path, fast_collector, query, run_row, running, wait_for

from prismatic import db
from prismatic.config import load_config, run_hash, to_dict
from trainer.api import DynamicsReporter
from trainer.data import Corpus, sample_batch
from trainer.model import build_model
from trainer.publisher import Publisher

REPO = Path(__file__).resolve().parent.parent
TINY = [
    "model.d_model=32",
    "model.n_layers=2",
    "model.n_heads=2",
    "model.seq_len=16",
    "train.batch_size=2",
    "train.steps=6",
    "dynamics.log_freq=2",
    f"data.path={REPO / 'README.md'}",
    "data.max_bytes=20000",
]


def test_training_steps_end_as_rows_with_the_right_columns(tmp_path: Path) -> None:
    cfg = load_config(REPO / "configs" / "default.yaml", TINY)
    torch.manual_seed(0)
    model = build_model(cfg.model, cfg.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr)
    corpus = Corpus.load(cfg.data, cfg.model.seq_len)
    generator = torch.Generator().manual_seed(0)
    run = run_hash(cfg)

    context = zmq.Context()  # the one context: inproc only connects within it
    address = "inproc://integration"
    try:
        with running(fast_collector(address, tmp_path, context=context)):
            publisher = Publisher(address, run, context=context)
            reporter = DynamicsReporter(
                model, address, config=to_dict(cfg), log_freq=2, run_hash=run, publisher=publisher
            )
            for step in range(cfg.train.steps):
                x, y = sample_batch(corpus.train, 2, cfg.model.seq_len, generator)
                _, loss = model(x, y)
                loss.backward()
                reporter.after_backward(step, loss=loss.item(), lr=cfg.train.lr)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            reporter.close("completed")
            wait_for(lambda: run_row(tmp_path, run).get("status") == "completed")
    finally:
        context.destroy(linger=0)

    path = db_path(tmp_path, run)
    columns = [r[1] for r in query(path, f"PRAGMA table_info({db.quote('dynamics')})")]
    for expert in range(cfg.model.num_experts):
        assert set(db.expert_columns(expert)) <= set(columns)
    assert {"expert_1_bottom_norm", "expert_1_divergence", "expert_0_clean_norm"} <= set(columns)

    rows = query(path, "SELECT step, loss, expert_0_bottom_norm, expert_1_divergence FROM dynamics")
    assert [r[0] for r in rows] == [0, 2, 4]
    for _, loss, bottom, divergence in rows:
        assert loss > 0 and bottom > 0  # real gradients reached the tiers
        assert 0 <= divergence <= 2
    layers = query(path, "SELECT DISTINCT layer, expert FROM layer_dynamics ORDER BY 1, 2")
    assert layers == [(la, e) for la in range(2) for e in range(cfg.model.num_experts)]
    run_info = run_row(tmp_path, run)
    assert run_info["model"]["layers"] == 2 and run_info["config"]["name"] == cfg.name
    assert run_info["last_step"] == 4
