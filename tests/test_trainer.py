"""`prismatic train`: accumulation, evaluation, precision, checkpoints and --resume, progress."""

from __future__ import annotations

import os
import select
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from trainer_support import (
    Inbox,
    dynamics_steps,
    prismatic_cmd,
    run_cli,
    spool_messages,
    tiny_config,
    train_args,
)

from prismatic.config import run_hash
from prismatic.errors import ConfigError
from trainer.loop import CHECKPOINT_NAME, Trainer, usable_device
from trainer.progress import Progress


def train_here(tmp_path: Path, *overrides: str) -> tuple[str, list[dict], Path]:
    """Train in this process, publishing to a real socket; (status, messages, run folder)."""
    cfg = tiny_config(*overrides)
    with Inbox() as inbox:
        trainer = Trainer(cfg, tmp_path / "runs", collector=inbox.address)
        status = trainer.run()
        messages = inbox.receive()
    return status, messages, trainer.run_dir


def dynamics(messages: list[dict]) -> list[dict]:
    return [m for m in messages if m["kind"] == "dynamics"]


# --- one record per optimizer step -----------------------------------------------------------


def test_gradient_accumulation_publishes_one_record_per_optimizer_step(tmp_path):
    status, messages, run_dir = train_here(
        tmp_path, "train.steps=5", "train.grad_accum=3", "dynamics.log_freq=1"
    )
    assert status == "completed"
    assert dynamics_steps(messages) == [0, 1, 2, 3, 4]  # over the socket
    assert dynamics_steps(spool_messages(run_dir)) == [0, 1, 2, 3, 4]  # and in the spool


def test_the_record_is_taken_after_the_last_micro_batch(tmp_path):
    """3 micro-batches of 2 sequences give the gradient of one batch of 6: the same draws from
    the same generator. A probe after the first micro-batch would see a third of it."""
    no_dropout = ("model.expert_dropout=0", "train.steps=1")
    _, accumulated, _ = train_here(
        tmp_path / "a", *no_dropout, "train.batch_size=2", "train.grad_accum=3"
    )
    _, whole, _ = train_here(tmp_path / "b", *no_dropout, "train.batch_size=6")
    a, b = dynamics(accumulated)[0], dynamics(whole)[0]
    assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
    for name in ("norm", "top_norm", "bottom_norm", "divergence"):
        for x, y in zip(a["metrics"][name][0], b["metrics"][name][0], strict=True):
            assert x == y if y is None else x == pytest.approx(y, rel=1e-4, abs=1e-7)


def test_validation_loss_every_eval_every_steps_with_the_dynamics(tmp_path):
    _, messages, _ = train_here(
        tmp_path, "train.steps=7", "train.eval_every=3", "dynamics.log_freq=2"
    )
    records = {m["step"]: m for m in dynamics(messages)}
    # log_freq steps, eval steps and the last step are published.
    assert sorted(records) == [0, 2, 3, 4, 6]
    assert {s for s, m in records.items() if m["val_loss"] is not None} == {0, 3, 6}
    assert all(m["val_loss"] > 0 for s, m in records.items() if s in (0, 3, 6))
    assert all(m["loss"] > 0 for m in records.values())


# --- precision -------------------------------------------------------------------------------


def test_fp16_run_uses_a_working_grad_scaler_and_publishes_finite_norms(tmp_path, recwarn):
    status, messages, run_dir = train_here(
        tmp_path, "train.steps=3", "train.precision=fp16", "train.checkpoint_every=1"
    )
    assert status == "completed"
    assert not [w for w in recwarn if "GradScaler" in str(w.message)]  # not disabled on CPU
    state = torch.load(run_dir / CHECKPOINT_NAME, weights_only=False)
    assert state["scaler"]["scale"] > 1  # the scaler really scaled
    for record in dynamics(messages):
        assert all(v is not None and v > 0 for v in record["metrics"]["norm"][0])


def test_bf16_run_completes(tmp_path):
    status, messages, _ = train_here(tmp_path, "train.steps=2", "train.precision=bf16")
    assert status == "completed"
    assert dynamics_steps(messages) == [0, 1]


# --- checkpoints and --resume ----------------------------------------------------------------

# Long enough that the run is still going when the tests stop it: they wait for 12 or 25
# records first, and a test process descheduled for a second or two must not find it done
# (at 60 steps, about 1 s was left after the 12th record).
RESUMABLE_STEPS = 250
RESUMABLE = (
    "model.d_model=64",
    "model.n_layers=2",
    "model.seq_len=64",
    "train.batch_size=8",
    f"train.steps={RESUMABLE_STEPS}",
    "train.checkpoint_every=10",
    "dynamics.log_freq=1",
    "dynamics.collector=tcp://127.0.0.1:9",  # nobody listens: the spool is the record
)


def start_training(runs_dir: Path, *extra: str) -> subprocess.Popen:
    args = [*train_args("configs/default.yaml", *RESUMABLE), "--runs-dir", str(runs_dir)]
    return subprocess.Popen(
        prismatic_cmd(*args, *extra),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_for_records(run_dir: Path, count: int, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        spool = run_dir / "spool" / "rank0.msgpack"
        if spool.exists() and len(dynamics_steps(spool_messages(run_dir))) >= count:
            return
        time.sleep(0.02)
    raise AssertionError(f"the run did not publish {count} records: {proc.poll()}")


def checkpoint_step(run_dir: Path) -> int:
    return torch.load(run_dir / CHECKPOINT_NAME, weights_only=False)["step"]


@pytest.mark.slow
def test_interrupted_run_resumes_with_the_same_hash_and_no_duplicate_steps(tmp_path):
    runs = tmp_path / "runs"
    run_dir = runs / run_hash(tiny_config(*RESUMABLE))
    first = start_training(runs)
    wait_for_records(run_dir, 12, first)
    first.send_signal(signal.SIGINT)
    _, err = first.communicate(timeout=120)
    assert first.returncode == 130, err  # interrupted (as by Ctrl-C), not completed
    assert "stopping after this step" in err
    stopped_at = checkpoint_step(run_dir)
    assert 11 <= stopped_at < RESUMABLE_STEPS - 1
    assert dynamics_steps(spool_messages(run_dir))[-1] == stopped_at  # a checkpoint right there

    second = start_training(runs, "--resume")
    _, err = second.communicate(timeout=300)
    assert second.returncode == 0, err
    assert [p.name for p in runs.iterdir()] == [run_dir.name]  # the same run, the same hash
    messages = spool_messages(run_dir)
    assert dynamics_steps(messages) == list(range(RESUMABLE_STEPS))  # every step once, in order
    ends = [m["status"] for m in messages if m["kind"] == "run_end"]
    assert ends == ["interrupted", "completed"]
    assert checkpoint_step(run_dir) == RESUMABLE_STEPS - 1


@pytest.mark.slow
def test_a_killed_run_resumes_from_its_last_checkpoint_and_repeats_steps_identically(tmp_path):
    runs = tmp_path / "runs"
    run_dir = runs / run_hash(tiny_config(*RESUMABLE))
    first = start_training(runs)
    wait_for_records(run_dir, 25, first)
    first.kill()  # no chance to save anything
    first.wait()
    saved = checkpoint_step(run_dir)
    published = {m["step"]: m for m in spool_messages(run_dir) if m["kind"] == "dynamics"}
    second = start_training(runs, "--resume")
    _, err = second.communicate(timeout=300)
    assert second.returncode == 0, err
    records = [m for m in spool_messages(run_dir) if m["kind"] == "dynamics"]
    after = records[len(published) :]
    assert [m["step"] for m in after] == list(range(saved + 1, RESUMABLE_STEPS))
    # The steps after the checkpoint are done again from the saved model, optimizer and random
    # state: the very same numbers, so the collector's upsert stores each step once, unchanged.
    for m in after:
        if m["step"] in published:
            assert m["loss"] == published[m["step"]]["loss"]
            assert m["metrics"] == published[m["step"]]["metrics"]


def test_resume_without_a_checkpoint_is_a_clear_error(tmp_path):
    out = run_cli(*train_args(), "--runs-dir", str(tmp_path), "--resume")
    assert out.returncode == 2
    assert "--resume: no checkpoint at" in out.stderr
    assert "Traceback" not in out.stderr


# --- progress --------------------------------------------------------------------------------


def test_plain_progress_lines_when_not_on_a_terminal(tmp_path):
    out = run_cli(
        *train_args("configs/default.yaml", "train.steps=5"),
        "--runs-dir",
        str(tmp_path),
        "--collector",
        "tcp://127.0.0.1:9",
    )
    assert out.returncode == 0, out.stderr
    lines = [line for line in out.stdout.splitlines() if line.startswith("step ")]
    assert lines and lines[-1].startswith("step 5/5 loss ")
    assert " tok/s " in lines[-1] and " eta 0:00:00" in lines[-1]
    assert "\r" not in out.stdout


def test_progress_bar_on_a_terminal():
    master, slave = os.openpty()
    with open(slave, "w", closefd=True) as stream:
        progress = Progress(4, tokens_per_step=100, stream=stream, tty_every_s=0.0)
        for step in range(1, 5):
            time.sleep(0.01)
            progress.update(step, 2.5 - step / 10, force=step == 4)
    text = b""
    while select.select([master], [], [], 0.5)[0]:
        try:
            chunk = os.read(master, 4096)
        except OSError:
            break
        if not chunk:
            break
        text += chunk
    os.close(master)
    screen = text.decode()
    assert "\r[" in screen  # redrawn in place
    assert "[##############################] step 4/4 loss 2.1000" in screen
    assert "tok/s" in screen and "eta" in screen


def test_plain_progress_is_throttled():
    import io

    stream = io.StringIO()
    progress = Progress(1000, tokens_per_step=10, stream=stream, every_s=3600)
    for step in range(1, 1001):
        progress.update(step, 1.0, force=step == 1000)
    lines = stream.getvalue().splitlines()
    assert len(lines) == 2  # the first step and the forced last one
    assert lines[0].endswith("tok/s - eta -")  # nothing timed yet: no speed, no 0
    assert lines[-1].startswith("step 1000/1000")


@pytest.mark.parametrize(
    ("name", "says"),
    [
        ("banana", "train.device: 'banana' is not accepted; expected a torch device such as cpu"),
        ("cuda:99", "train.device: 'cuda:99' is not available on this machine"),
    ],
)
def test_an_unusable_device_is_one_config_error_naming_it(name, says):
    with pytest.raises(ConfigError) as info:
        usable_device(name)
    assert str(info.value).startswith(says)
    assert usable_device("cpu") == torch.device("cpu")
