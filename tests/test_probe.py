"""The gradient probe against a straightforward reference, and under the ways people train."""

from __future__ import annotations

import logging
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from trainer_support import MLP, Inbox, backward, tiny_net

from prismatic.errors import ProbeError
from prismatic.wire import EXPERT_METRICS
from trainer import GradientProbe, Prismatic, find_prismatic_layers, log_gradient_dynamics, unwrap
from trainer.publisher import Publisher

TESTS = Path(__file__).resolve().parent

# --- a straightforward reference -------------------------------------------------------------


def reference(layer: Prismatic, routing: list[float]) -> dict[str, list[float | None]]:
    """Float64, one expert at a time, each tier picked with an explicit mask."""
    E = layer.num_experts
    acc = {k: [0.0] * E for k in ("top", "bottom", "middle", "total", "drift")}
    dots = [0.0] * E
    base_sq = 0.0
    for name, stacked in layer.stacked_parameters():
        top, bottom = layer.tiers(name)
        n = stacked[0].numel()
        is_top = torch.zeros(n, dtype=torch.bool)
        is_top[top] = True
        is_bottom = torch.zeros(n, dtype=torch.bool)
        is_bottom[bottom] = True
        middle = ~(is_top | is_bottom)
        g0 = stacked.grad[0].double().reshape(-1)
        w0 = stacked.detach()[0].double().reshape(-1)
        base_sq += float(w0 @ w0)
        for k in range(E):
            g = stacked.grad[k].double().reshape(-1)
            w = stacked.detach()[k].double().reshape(-1)
            acc["top"][k] += float(g[is_top].square().sum())
            acc["bottom"][k] += float(g[is_bottom].square().sum())
            acc["middle"][k] += float(g[middle].square().sum())
            acc["total"][k] += float(g.square().sum())
            acc["drift"][k] += float((w - w0).square().sum())
            dots[k] += float(g @ g0)
    norm = [math.sqrt(v) for v in acc["total"]]
    return {
        "top_norm": [math.sqrt(v) for v in acc["top"]],
        "bottom_norm": [math.sqrt(v) for v in acc["bottom"]],
        "middle_norm": [math.sqrt(v) for v in acc["middle"]],
        "norm": norm,
        "divergence": [None] + [1 - dots[k] / (norm[k] * norm[0]) for k in range(1, E)],
        "weight_drift": [None] + [math.sqrt(acc["drift"][k] / base_sq) for k in range(1, E)],
        "routing_weight": routing,
        "nonfinite": [0.0] * E,
    }


def assert_close(actual, expected, rel=1e-5, abs=1e-7):
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected, strict=True):
        if e is None:
            assert a is None
        else:
            assert a == pytest.approx(e, rel=rel, abs=abs)


def routing_means(net: nn.Module, x: torch.Tensor) -> list[list[float]]:
    """What each layer's router saw in one training forward (expert dropout is off here)."""
    means, h = [], x
    for layer in net:
        probs = torch.softmax(layer.router(layer.router_norm(h)), dim=-1)
        means.append(probs.reshape(-1, layer.num_experts).mean(0).tolist())
        h = layer(h)
    return means


# --- correctness -----------------------------------------------------------------------------


@pytest.mark.parametrize("mixing", ["outputs", "smear", "topk"])
def test_every_metric_equals_the_reference(mixing):
    net, x = tiny_net(layers=2, d=16, sparsity=0.2, mixing=mixing, top_k=2, expert_dropout=0.0)
    probe = GradientProbe(net)
    with torch.no_grad():
        net.eval()
        routing = routing_means(net, x)
    backward(net, x)
    result = probe.measure(step=7)
    assert result is not None and result.step == 7
    assert (result.n_layers, result.n_experts) == (2, 3)
    for li, layer in enumerate(net):
        expected = reference(layer, routing[li])
        for name in EXPERT_METRICS:
            # Divergence is 1 - cos: its error is absolute, about float32 epsilon.
            assert_close(result.metrics[name][li], expected[name], abs=1e-5)


def test_tier_norms_are_nonzero_and_split_the_whole_gradient():
    net, x = tiny_net(layers=1, d=16)
    backward(net, x)
    m = GradientProbe(net).measure(0).metrics
    for e in range(3):
        parts = [m[t][0][e] ** 2 for t in ("top_norm", "bottom_norm", "middle_norm")]
        assert all(p > 0 for p in parts)
        assert sum(parts) == pytest.approx(m["norm"][0][e] ** 2, rel=1e-5)


def test_divergence_is_zero_for_identical_experts():
    net, x = tiny_net(layers=2, d=16, perturbation_scale=0.0)
    backward(net, x)
    for layer in net:
        for _, stacked in layer.stacked_parameters():
            stacked.grad[1:] = stacked.grad[0]
    m = GradientProbe(net).measure(0).metrics
    for row in m["divergence"]:
        assert row[0] is None
        assert row[1:] == [pytest.approx(0.0, abs=3e-7)] * 2  # float32 epsilon
    assert m["weight_drift"] == [[None, 0.0, 0.0], [None, 0.0, 0.0]]  # exactly


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    mode=st.sampled_from(["random", "opposite", "parallel", "scaled", "orthogonal", "zero"]),
)
def test_divergence_stays_in_0_to_2(seed, mode):
    net, x = tiny_net(layers=1, d=8)
    backward(net, x)
    gen = torch.Generator().manual_seed(seed)
    for _, stacked in net[0].stacked_parameters():
        g = torch.randn(stacked.shape, generator=gen)
        if mode == "opposite":
            g[1] = -g[0]
        elif mode == "parallel":
            g[1] = g[0]
        elif mode == "scaled":
            g[1] = 1e-3 * g[0]
        elif mode == "orthogonal":  # per parameter, so also over the whole layer
            g[1] -= (g[1] * g[0]).sum() / g[0].square().sum() * g[0]
        elif mode == "zero":
            g[1] = 0
        stacked.grad.copy_(g)
    div = GradientProbe(net).measure(0).metrics["divergence"][0]
    assert 0.0 <= div[2] <= 2.0
    if mode == "opposite":
        assert div[1] == pytest.approx(2.0, abs=1e-6)
    if mode in ("parallel", "scaled"):
        assert div[1] == pytest.approx(0.0, abs=1e-6)
    if mode == "orthogonal":
        assert div[1] == pytest.approx(1.0, abs=1e-5)
    if mode == "zero":
        assert div[1] is None  # a zero gradient has no direction
    else:
        assert 0.0 <= div[1] <= 2.0


def test_smear_divergence_is_zero_by_construction():
    """Under smear each expert's gradient is one tensor times its routing weight."""
    smear, x = tiny_net(layers=2, d=16, mixing="smear")
    backward(smear, x)
    smear_div = sum(GradientProbe(smear).measure(0).metrics["divergence"], [])
    outputs, x = tiny_net(layers=2, d=16, mixing="outputs")
    backward(outputs, x)
    outputs_div = sum(GradientProbe(outputs).measure(0).metrics["divergence"], [])
    assert all(d < 1e-6 for d in smear_div if d is not None)
    assert all(d > 1e-4 for d in outputs_div if d is not None)  # the same probe can see it


def test_topk_expert_without_tokens_reports_no_gradient_not_zero():
    net, x = tiny_net(layers=1, d=8, mixing="topk", top_k=1, expert_dropout=0.0)
    with torch.no_grad():  # every token to expert 1
        net[0].router.weight.zero_()
        net[0].router.bias.copy_(torch.tensor([0.0, 5.0, 0.0]))
    backward(net, x)
    m = GradientProbe(net).measure(0).metrics
    assert m["norm"][0][1] > 0
    for name in ("top_norm", "bottom_norm", "middle_norm", "norm"):
        assert m[name][0][0] is None and m[name][0][2] is None
    assert m["divergence"][0] == [None, None, None]  # expert 0 had no gradient to compare with
    assert m["nonfinite"][0] == [0.0, 0.0, 0.0]


def test_outside_topk_a_zero_gradient_is_a_norm_of_zero():
    net, x = tiny_net(layers=1, d=8)
    backward(net, x)
    for _, stacked in net[0].stacked_parameters():
        stacked.grad[2] = 0
    m = GradientProbe(net).measure(0).metrics
    assert m["norm"][0][2] == 0.0 and m["top_norm"][0][2] == 0.0
    assert m["divergence"][0][2] is None


def test_dense_layer_is_probed_as_expert_0():
    torch.manual_seed(0)
    net = nn.Sequential(Prismatic(MLP(8), num_experts=1, perturbation_scale=0.0))
    backward(net, torch.randn(4, 8))
    m = GradientProbe(net).measure(0).metrics
    assert m["norm"][0][0] > 0
    assert m["divergence"] == [[None]] and m["weight_drift"] == [[None]]
    assert m["routing_weight"] == [[1.0]]


def test_layers_with_fewer_experts_report_none_past_their_end():
    torch.manual_seed(0)
    net = nn.Sequential(Prismatic(MLP(8), num_experts=3), Prismatic(MLP(8), num_experts=2))
    backward(net, torch.randn(4, 8))
    result = GradientProbe(net).measure(0)
    assert result.n_experts == 3
    assert result.metrics["norm"][1][2] is None and result.metrics["norm"][1][1] > 0


def test_weight_drift_grows_when_a_perturbed_expert_moves():
    net, x = tiny_net(layers=1, d=16, perturbation_scale=0.0)
    backward(net, x)
    probe = GradientProbe(net)
    assert probe.measure(0).metrics["weight_drift"][0] == [None, 0.0, 0.0]
    with torch.no_grad():
        for _, stacked in net[0].stacked_parameters():
            stacked[2] += 0.1 * stacked[0]
    backward(net, x)
    drift = probe.measure(1).metrics["weight_drift"][0]
    assert drift[1] == 0.0 and drift[2] == pytest.approx(0.1, rel=1e-5)


def test_float32_accumulation_for_bfloat16_parameters():
    net, x = tiny_net(layers=1, d=64)
    net = net.to(torch.bfloat16)
    gen = torch.Generator().manual_seed(0)
    for _, stacked in net[0].stacked_parameters():
        # Many equal values: a bfloat16 running sum stalls at 256 long before the end.
        stacked.grad = (1 + 0.01 * torch.rand(stacked.shape, generator=gen)).to(torch.bfloat16)
    m = GradientProbe(net).measure(0).metrics
    expected = reference(net[0], [math.nan] * 3)
    assert_close(m["norm"][0], expected["norm"], rel=1e-6)
    assert_close(m["top_norm"][0], expected["top_norm"], rel=1e-6)
    total = sum(s.grad[0].numel() for _, s in net[0].stacked_parameters())
    naive = torch.zeros((), dtype=torch.bfloat16)
    for _, s in net[0].stacked_parameters():
        for v in s.grad[0].reshape(-1)[:total]:
            naive += v * v
    assert abs(float(naive) - expected["norm"][0] ** 2) > 0.01 * expected["norm"][0] ** 2


# --- the ways people train -------------------------------------------------------------------


def amp_step(init_scale: float, unscale: bool) -> tuple[dict, float]:
    """One fp16-autocast step with a GradScaler at `init_scale`; the probe's metrics."""
    net, x = tiny_net(layers=2, d=16, expert_dropout=0.0)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=init_scale)
    with torch.autocast("cpu", dtype=torch.float16):
        loss = net(x).float().square().mean()
    scaler.scale(loss).backward()
    probe = GradientProbe(net)
    if unscale:
        scaler.unscale_(optimizer)
        result = probe.measure(0)
    else:
        result = probe.measure(0, loss_scale=scaler.get_scale())
    return result.metrics, scaler.get_scale()


@pytest.mark.parametrize("unscale", [True, False], ids=["unscale_", "loss_scale"])
def test_logged_norms_do_not_depend_on_the_loss_scale(unscale):
    low, s_low = amp_step(2.0**8, unscale)
    high, s_high = amp_step(2.0**15, unscale)
    assert s_low != s_high
    for name in ("top_norm", "bottom_norm", "middle_norm", "norm", "divergence"):
        for row_low, row_high in zip(low[name], high[name], strict=True):
            assert_close(row_low, row_high, rel=1e-6)


def test_scaled_gradients_would_be_off_by_the_scale():
    """What the two tests above guard against: probing the scaled gradients as they are."""
    net, x = tiny_net(layers=1, d=16, expert_dropout=0.0)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    scaler.scale(net(x).square().mean()).backward()
    scaled = GradientProbe(net).measure(0).metrics["norm"][0]
    net2, x2 = tiny_net(layers=1, d=16, expert_dropout=0.0)
    backward(net2, x2)
    plain = GradientProbe(net2).measure(0).metrics["norm"][0]
    assert scaled[0] == pytest.approx(1024 * plain[0], rel=1e-5)


def test_missing_gradients_warn_once_and_publish_nothing(caplog):
    net, x = tiny_net(layers=1)
    probe = GradientProbe(net)
    with caplog.at_level(logging.WARNING, logger="trainer.probe"):
        assert probe.measure(0) is None  # before any backward()
        backward(net, x)
        net.zero_grad(set_to_none=True)
        assert probe.measure(1) is None  # after zero_grad()
    warnings = [r for r in caplog.records if "no gradients" in r.getMessage()]
    assert len(warnings) == 1
    assert "after backward()" in warnings[0].getMessage()
    backward(net, x)
    assert probe.measure(2) is not None


def test_nonfinite_gradients_are_counted_and_published(tmp_path):
    net, x = tiny_net(layers=2, d=8)
    backward(net, x)
    w = dict(net[1].stacked_parameters())["fc.weight"]
    w.grad[1, 0, :3] = float("nan")
    w.grad[2, 1, 0] = float("inf")
    dict(net[1].stacked_parameters())["proj.bias"].grad[1, 0] = float("-inf")
    result = GradientProbe(net).measure(3)
    m = result.metrics
    assert m["nonfinite"] == [[0, 0, 0], [0, 4, 1]]
    assert m["norm"][1][1] is None and m["norm"][1][2] is None and m["norm"][1][0] > 0
    assert m["norm"][0][1] > 0  # the other layer is untouched
    with Inbox() as inbox:
        publisher = Publisher(inbox.address, "abcdef012", spool_path=tmp_path / "rank0.msgpack")
        publisher.send("dynamics", step=3, loss=1.0, metrics=m)
        publisher.send("run_end", status="completed")
        publisher.close()
        received = inbox.receive()
    assert received[0]["kind"] == "dynamics"
    assert received[0]["metrics"]["nonfinite"] == [[0.0, 0.0, 0.0], [0.0, 4.0, 1.0]]
    assert received[0]["metrics"]["norm"][1][1] is None


# --- finding the layers ----------------------------------------------------------------------


class Custom(nn.Module):
    """Not our model: Prismatic layers at different depths, around other modules."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        expert = nn.Sequential(nn.LayerNorm(8), nn.Linear(8, 8), nn.Tanh())
        self.stem = nn.Linear(8, 8)
        self.parts = nn.ModuleDict(
            {
                "a": nn.Sequential(nn.ReLU(), Prismatic(expert, num_experts=2, name="a")),
                "b": Prismatic(MLP(8), num_experts=3, name="b"),
            }
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.parts["b"](self.parts["a"](self.stem(x)))


def test_prismatic_layers_are_found_in_any_module_tree():
    model = Custom()
    layers = find_prismatic_layers(model)
    assert layers == [model.parts["a"][1], model.parts["b"]]
    model(torch.randn(4, 8)).sum().backward()
    result = GradientProbe(model).measure(0)
    assert result.n_layers == 2 and result.n_experts == 3
    assert result.metrics["norm"][0][2] is None  # layer "a" has two experts
    dynamics = log_gradient_dynamics(model, 0)
    assert set(dynamics) == {"expert_gradients", "divergence_scores"}
    assert set(dynamics["expert_gradients"]) == {"expert_0", "expert_1", "expert_2"}


def test_a_model_without_prismatic_layers_is_a_clear_error():
    with pytest.raises(ProbeError, match="no Prismatic layer"):
        GradientProbe(nn.Linear(4, 4))


def test_torch_compile_wrapper_is_unwrapped():
    net, x = tiny_net(layers=2)
    compiled = torch.compile(net, backend="eager")
    assert compiled is not net and unwrap(compiled) is net
    assert find_prismatic_layers(compiled) == list(net)
    backward(compiled, x)  # through the compiled module
    assert GradientProbe(compiled).measure(0).metrics["norm"][1][0] > 0


# Run in a child process: a process group is C++ that a stuck rendezvous would hold past
# pytest-timeout's signal (a hang there once stalled a whole CI run), and a child's timeout
# always ends it. Gloo is pinned to the loopback interface, not whatever the hostname resolves
# to, and given a short timeout of its own.
DDP_CHILD = """
import datetime, sys
import torch.distributed as dist
from torch import nn
from trainer_support import backward, tiny_net
from trainer import GradientProbe, unwrap

net, x = tiny_net(layers=2)
dist.init_process_group(
    "gloo", init_method="file://" + sys.argv[1], rank=0, world_size=1,
    timeout=datetime.timedelta(seconds=60),
)
try:
    ddp = nn.parallel.DistributedDataParallel(net)
    assert unwrap(ddp) is net
    probe = GradientProbe(ddp, average_routing_over_ranks=True)
    backward(ddp, x)
    assert probe.measure(0).metrics["norm"][1][2] > 0
finally:
    dist.destroy_process_group()
print("ok")
"""


def test_distributed_data_parallel_wrapper_is_unwrapped(tmp_path):
    env = {
        **os.environ,
        "GLOO_SOCKET_IFNAME": "lo",
        "PYTHONPATH": os.pathsep.join([str(TESTS), str(TESTS.parent)]),
    }
    done = subprocess.run(
        [sys.executable, "-c", DDP_CHILD, str(tmp_path / "store")],
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-3000:]


def test_a_module_attribute_of_a_plain_model_is_not_peeled():
    class Holder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.module = Prismatic(MLP(8), name="inner")
            self.outer = Prismatic(MLP(8), name="outer")

    holder = Holder()
    assert unwrap(holder) is holder
    assert len(find_prismatic_layers(holder)) == 2
