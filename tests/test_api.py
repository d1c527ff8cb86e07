"""The plain API for any training loop, and the README examples that show it (run from the
README itself, so the text and the tested code cannot drift apart)."""

from __future__ import annotations

import contextlib
import re

import pytest
import torch
from torch import nn
from trainer_support import MLP, REPO, Inbox, backward, dynamics_steps, tiny_net

from prismatic.errors import ConfigError, ProbeError
from trainer import DynamicsReporter, Prismatic, log_gradient_dynamics
from trainer.api import hash_config

README_SECTION = "<!-- section: trainer (issue 3) -->"
COLLECTOR_LINE = 'collector = "tcp://127.0.0.1:5557"'


def readme_examples() -> list[str]:
    """The ```python blocks of the trainer section that say they run as they are."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    section = text.split(README_SECTION, 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    return [b for b in blocks if "runs as is" in b.splitlines()[0]]


def test_the_readme_has_both_examples():
    first_lines = [b.splitlines()[0] for b in readme_examples()]
    assert len(first_lines) == 2
    assert "manual path" in first_lines[0] and "log_gradient_dynamics" in first_lines[1]


def test_readme_manual_path_publishes_every_log_freq_steps():
    code = readme_examples()[0]
    assert COLLECTOR_LINE in code  # the one line pointed at this test's socket instead
    with Inbox() as inbox:
        exec(code.replace(COLLECTOR_LINE, f'collector = "{inbox.address}"'), {})
        messages = inbox.receive()
    assert messages[0]["kind"] == "run_start" and messages[0]["name"] == "my-run"
    assert dynamics_steps(messages) == [0, 10, 20, 30, 40]
    assert messages[-1] == {**messages[-1], "kind": "run_end", "status": "completed"}
    assert all(m["loss"] > 0 for m in messages if m["kind"] == "dynamics")


def test_readme_log_gradient_dynamics_example(capsys):
    namespace: dict = {}
    exec(readme_examples()[1], namespace)
    dynamics = namespace["dynamics"]
    assert set(dynamics["expert_gradients"]) == {"expert_0", "expert_1", "expert_2"}
    assert set(dynamics["divergence_scores"]) == {"expert_1_divergence", "expert_2_divergence"}
    printed = capsys.readouterr().out.split()
    assert float(printed[0]) > 0 and 0 <= float(printed[1]) <= 2


# --- log_gradient_dynamics -------------------------------------------------------------------


def test_log_gradient_dynamics_is_the_layer_mean_in_the_design_notes_shape():
    net, x = tiny_net(layers=3)
    backward(net, x)
    from trainer.probe import GradientProbe

    per_layer = GradientProbe(net).measure(0).metrics
    dynamics = log_gradient_dynamics(net, step=0)
    expert_1 = dynamics["expert_gradients"]["expert_1"]
    assert set(expert_1) == {"top_norm", "bottom_norm", "middle_norm", "perturbed_norm"}
    assert set(dynamics["expert_gradients"]["expert_0"]) == {
        "top_norm",
        "bottom_norm",
        "middle_norm",
        "clean_norm",
    }
    mean_bottom = sum(row[1] for row in per_layer["bottom_norm"]) / 3
    assert expert_1["bottom_norm"] == pytest.approx(mean_bottom, rel=1e-6)
    mean_div = sum(row[2] for row in per_layer["divergence"]) / 3
    assert dynamics["divergence_scores"]["expert_2_divergence"] == pytest.approx(mean_div)


def test_log_gradient_dynamics_before_backward_is_none():
    net, _ = tiny_net(layers=1)
    assert log_gradient_dynamics(net, step=0) is None


# --- DynamicsReporter ------------------------------------------------------------------------


def test_reporter_sends_run_start_dynamics_and_run_end(tmp_path):
    net, x = tiny_net(layers=2)
    config = {"name": "mine", "lr": 0.1}
    with Inbox() as inbox:
        reporter = DynamicsReporter(
            net, inbox.address, config=config, log_freq=3, spool_path=tmp_path / "rank0.msgpack"
        )
        for step in range(7):
            backward(net, x)
            reporter.after_backward(step, loss=float(step), lr=0.1)
            net.zero_grad()
        reporter.close("completed")
        messages = inbox.receive()
    start = messages[0]
    assert start["kind"] == "run_start" and start["run"] == hash_config(config)
    assert start["model"]["layers"] == 2 and start["model"]["experts"] == 3
    assert start["model"]["mixing"] == "outputs"
    assert dynamics_steps(messages) == [0, 3, 6]
    record = messages[1]
    assert set(record["metrics"]) >= {"top_norm", "divergence", "weight_drift", "nonfinite"}
    assert messages[-1]["last_step"] == 6 and messages[-1]["status"] == "completed"


def test_reporter_publishes_nothing_when_gradients_are_missing(caplog):
    net, _ = tiny_net(layers=1)
    with Inbox() as inbox:
        reporter = DynamicsReporter(net, inbox.address, config={"name": "x"}, log_freq=1)
        assert reporter.after_backward(0) is None
        assert reporter.after_backward(1) is None
        reporter.close()
        messages = inbox.receive()
    assert dynamics_steps(messages) == []
    assert sum("no gradients" in r.getMessage() for r in caplog.records) == 1


def test_closing_names_a_bad_status_and_a_second_close_sends_nothing():
    net, x = tiny_net(layers=1)
    with Inbox() as inbox:
        reporter = DynamicsReporter(net, inbox.address, config={"name": "x"}, log_freq=1)
        with pytest.raises(ConfigError, match="status: 'exploded' is not accepted; expected one"):
            reporter.close("exploded")
        reporter.close("interrupted")
        reporter.close("completed")  # a no-op: the run already ended
        messages = inbox.receive()
        assert not inbox.socket.poll(300)  # and no second run_end after it
    ends = [m for m in messages if m["kind"] == "run_end"]
    assert [m["status"] for m in ends] == ["interrupted"]
    backward(net, x)
    with pytest.raises(ProbeError, match="is closed; make a new one"):
        reporter.after_backward(1)


@pytest.mark.parametrize(
    ("kind", "status"),
    [(None, "completed"), (KeyboardInterrupt, "interrupted"), (OSError, "failed")],
)
def test_as_a_context_manager_the_run_ends_with_how_the_block_ended(kind, status):
    net, x = tiny_net(layers=1)
    with Inbox() as inbox:
        with contextlib.suppress(BaseException):
            with DynamicsReporter(net, inbox.address, config={"name": "x"}, log_freq=1) as rep:
                backward(net, x)
                rep.after_backward(0)
                if kind is not None:
                    raise kind()
        messages = inbox.receive()
    assert dynamics_steps(messages) == [0]
    assert messages[-1]["kind"] == "run_end" and messages[-1]["status"] == status


@pytest.mark.parametrize(
    ("address", "log_freq", "says"),
    [
        ("notanaddr", 10, "DynamicsReporter address: 'notanaddr' is not accepted; expected tcp://"),
        ("tcp://127.0.0.1:99999", 10, "is not accepted; expected tcp://HOST:PORT (port 1..65535)"),
        ("tcp://127.0.0.1:5557", 0, "log_freq: 0 is not accepted; expected an integer >= 1"),
    ],
)
def test_a_bad_address_or_log_freq_is_named_before_anything_is_sent(address, log_freq, says):
    net, _ = tiny_net(layers=1)
    with pytest.raises(ConfigError) as info:
        DynamicsReporter(net, address, config={"name": "x"}, log_freq=log_freq)
    assert says in str(info.value)


def test_the_public_names_come_from_the_trainer_package():
    import trainer

    for name in ("Prismatic", "DynamicsReporter", "log_gradient_dynamics", "GradientProbe"):
        assert name in trainer.__all__ and hasattr(trainer, name)
    layer = trainer.Prismatic(MLP(8), num_experts=3)
    assert isinstance(layer, nn.Module)
    assert layer(torch.randn(2, 8)).shape == (2, 8)


def test_prismatic_signature_matches_the_issue():
    layer = Prismatic(
        MLP(8),
        num_experts=3,
        perturbation_scale=1.0,
        sparsity=0.1,
        perturbation_strategy="dual_sided",
        mixing="outputs",
    )
    assert (layer.num_experts, layer.mixing, layer.perturbation_strategy) == (
        3,
        "outputs",
        "dual_sided",
    )
