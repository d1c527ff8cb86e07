"""The Prismatic layer: mixing modes, routing, expert dropout, the dense control."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from trainer_support import MLP

from prismatic.config import ModelConfig
from trainer.layer import Prismatic
from trainer.model import build_model


def make(**kw) -> tuple[Prismatic, torch.Tensor]:
    torch.manual_seed(0)
    return Prismatic(MLP(8), **kw), torch.randn(4, 5, 8)


@pytest.mark.parametrize("mixing", ["outputs", "smear", "topk"])
def test_every_mixing_mode_keeps_the_input_shape_and_trains(mixing):
    layer, x = make(mixing=mixing, top_k=2)
    y = layer(x)
    assert y.shape == x.shape
    y.square().mean().backward()
    for _, stacked in layer.stacked_parameters():
        assert stacked.grad is not None and stacked.grad.shape == stacked.shape
    assert layer.router.weight.grad is not None


def test_outputs_mode_is_the_routing_weighted_sum_of_expert_outputs():
    layer, x = make(expert_dropout=0.0)
    layer.eval()
    weights = torch.softmax(layer.router(layer.router_norm(x)), dim=-1)
    expected = sum(
        weights[..., k : k + 1] * layer._run_expert(layer.expert_parameters(k), x) for k in range(3)
    )
    assert torch.allclose(layer(x), expected, atol=1e-6)


def test_smear_mode_runs_the_batch_mean_merged_expert():
    layer, x = make(mixing="smear", expert_dropout=0.0)
    layer.eval()
    mean_w = torch.softmax(layer.router(layer.router_norm(x)), dim=-1).reshape(-1, 3).mean(0)
    merged = {
        name: sum(mean_w[k] * p[k] for k in range(3)) for name, p in layer.stacked_parameters()
    }
    assert torch.allclose(layer(x), layer._run_expert(merged, x), atol=1e-6)


def test_dense_control_is_exactly_the_plain_mlp():
    torch.manual_seed(0)
    base = MLP(8)
    layer = Prismatic(base, num_experts=1, perturbation_scale=0.0)
    x = torch.randn(3, 8)
    assert not hasattr(layer, "router")
    assert torch.equal(layer(x), base(x))
    assert layer.take_routing().tolist() == [1.0]


def test_dense_router_type_builds_one_expert_layers():
    model = build_model(ModelConfig(router_type="dense", d_model=16, n_layers=2, n_heads=2), 0)
    layers = [m for m in model.modules() if isinstance(m, Prismatic)]
    assert len(layers) == 2 and all(layer.num_experts == 1 for layer in layers)


def test_topk_sends_each_token_to_k_experts_and_idle_experts_get_a_zero_gradient():
    layer, x = make(mixing="topk", top_k=1, expert_dropout=0.0)
    with torch.no_grad():  # a router that sends every token to expert 2
        layer.router.weight.zero_()
        layer.router.bias.copy_(torch.tensor([0.0, 0.0, 5.0]))
    y = layer(x)
    assert torch.allclose(y, layer._run_expert(layer.expert_parameters(2), x), atol=1e-6)
    y.sum().backward()
    grad = dict(layer.stacked_parameters())["fc.weight"].grad
    assert torch.count_nonzero(grad[0]) == torch.count_nonzero(grad[1]) == 0
    assert torch.count_nonzero(grad[2]) > 0


def test_expert_dropout_zeroes_routing_weights_in_training_only():
    layer, x = make(expert_dropout=0.5)
    x = torch.randn(2000, 8)
    layer.train()
    weights = layer._routing(x)
    dropped = (weights == 0).float().mean().item()
    assert 0.3 < dropped < 0.5  # about half, less where a token lost every expert and kept all
    assert torch.allclose(weights.sum(-1), torch.ones(2000), atol=1e-5)
    layer.eval()
    assert (layer._routing(x) > 0).all()


def test_expert_dropout_default_is_on():
    layer, _ = make()
    assert layer.expert_dropout == pytest.approx(0.1)


def test_routing_weight_is_the_mean_router_probability_since_last_read():
    layer, x = make(expert_dropout=0.0)
    layer.train()
    layer(x)
    layer(2 * x)
    probs = torch.cat(
        [torch.softmax(layer.router(layer.router_norm(z)), -1).reshape(-1, 3) for z in (x, 2 * x)]
    )
    assert torch.allclose(layer.take_routing(), probs.mean(0), atol=1e-6)
    assert torch.isnan(layer.take_routing()).all()  # nothing routed since: not measured
    layer.eval()
    layer(x)
    assert torch.isnan(layer.take_routing()).all()  # evaluation batches do not count


def test_the_template_follows_train_eval_and_dtype():
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(8, 8), nn.Dropout(0.5))
    layer = Prismatic(base, num_experts=2, expert_dropout=0.0)
    x = torch.randn(64, 8)
    layer.eval()
    assert torch.equal(layer(x), layer(x))  # the dropout inside the expert is off
    layer.train()
    assert not torch.equal(layer(x), layer(x))
    layer.to(torch.float64)
    assert layer.routing_sum.dtype == torch.float32  # the sums stay float32
    assert layer(x.double()).dtype == torch.float64


@pytest.mark.parametrize(
    "kwargs, word",
    [
        ({"mixing": "blend"}, "mixing"),
        ({"perturbation_strategy": "both"}, "perturbation_strategy"),
        ({"top_k": 4}, "top_k"),
        ({"num_experts": 0}, "num_experts"),
        ({"sparsity": 1.5}, "sparsity"),
        ({"perturbation_scale": -1.0}, "perturbation_scale"),
        ({"expert_dropout": 1.0}, "expert_dropout"),
    ],
)
def test_bad_arguments_name_themselves(kwargs, word):
    with pytest.raises(ValueError, match=word):
        Prismatic(MLP(8), **kwargs)


def test_width_must_be_given_when_it_cannot_be_inferred():
    with pytest.raises(ValueError, match="d_model"):
        Prismatic(nn.LayerNorm(8))
    assert Prismatic(nn.LayerNorm(8), d_model=8)(torch.randn(2, 8)).shape == (2, 8)


def test_an_expert_that_changes_the_shape_is_refused_with_a_clear_error():
    from prismatic.errors import ExpertShapeError

    layer = Prismatic(nn.Linear(8, 4), num_experts=3)
    with pytest.raises(ExpertShapeError, match=r"Linear\) maps \(2, 8\) to \(2, 4\)"):
        layer(torch.randn(2, 8))
