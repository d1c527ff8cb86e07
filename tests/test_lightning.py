"""The Lightning callback with a tiny real Lightning Trainer on CPU."""

from __future__ import annotations

import pytest

pl = pytest.importorskip("lightning.pytorch")

import torch  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402
from trainer_support import MLP, Inbox, dynamics_steps, spool_messages  # noqa: E402

from trainer import DynamicsCallback, Prismatic  # noqa: E402


class Regressor(pl.LightningModule):
    def __init__(self, width: int = 8) -> None:
        super().__init__()
        self.save_hyperparameters()
        torch.manual_seed(0)
        self.net = nn.Sequential(
            nn.Linear(width, width),
            Prismatic(MLP(width), num_experts=3, name="mlp0"),
            Prismatic(MLP(width), num_experts=3, name="mlp1"),
            nn.Linear(width, 1),
        )

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.mse_loss(self.net(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", nn.functional.mse_loss(self.net(x), y))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


def loader() -> DataLoader:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(64, 8, generator=gen)
    return DataLoader(TensorDataset(x, x.sum(1, keepdim=True)), batch_size=4)


def fit(callback: DynamicsCallback, **trainer_args) -> None:
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=[callback],
        **trainer_args,
    )
    trainer.fit(Regressor(), loader(), loader())


def test_one_record_every_log_freq_optimizer_steps_with_accumulation(tmp_path):
    with Inbox() as inbox:
        callback = DynamicsCallback(inbox.address, log_freq=2, spool_dir=tmp_path / "spool")
        fit(callback, max_steps=7, accumulate_grad_batches=2, limit_val_batches=0)
        messages = inbox.receive()
    assert messages[0]["kind"] == "run_start"
    assert messages[0]["config"]["name"] == "Regressor"
    assert messages[0]["model"]["layers"] == 2
    # 14 micro-batches, 7 optimizer steps (global_step 0..6), a record every 2nd one.
    assert dynamics_steps(messages) == [0, 2, 4, 6]
    assert messages[-1]["kind"] == "run_end" and messages[-1]["status"] == "completed"
    records = [m for m in messages if m["kind"] == "dynamics"]
    assert all(m["loss"] is not None and m["lr"] == pytest.approx(0.05) for m in records)
    assert all(m["metrics"]["norm"][1][2] > 0 for m in records)
    assert dynamics_steps(spool_messages(tmp_path)) == [0, 2, 4, 6]  # rank 0's spool


def test_validation_loss_travels_with_the_next_record(tmp_path):
    with Inbox() as inbox:
        callback = DynamicsCallback(inbox.address, log_freq=1)
        fit(callback, max_steps=6, val_check_interval=3, limit_val_batches=2)
        messages = inbox.receive()
    records = [m for m in messages if m["kind"] == "dynamics"]
    assert [m["step"] for m in records] == [0, 1, 2, 3, 4, 5]
    # Validation runs after the 3rd and 6th batch; the first one reaches record 3.
    assert [m["step"] for m in records if m["val_loss"] is not None] == [3]
    assert records[3]["val_loss"] > 0


def test_the_callback_is_importable_from_the_trainer_package():
    from trainer.lightning import DynamicsCallback as direct

    assert DynamicsCallback is direct
