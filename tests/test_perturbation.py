"""Tier selection and the static perturbation: exact counts, ties, zeros, seeding."""

from __future__ import annotations

import hashlib
import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from trainer_support import MLP, REPO

from trainer.layer import Prismatic
from trainer.perturbation import (
    STRATEGIES,
    expert_seed,
    perturb,
    select_tiers,
    tier_size,
)


def layer(strategy: str = "dual_sided", scale: float = 1.0, seed: int = 0, **kw) -> Prismatic:
    torch.manual_seed(seed)
    return Prismatic(
        MLP(16, 64),
        num_experts=3,
        perturbation_scale=scale,
        perturbation_strategy=strategy,
        **kw,
    )


def changed_positions(p: Prismatic, name: str, expert: int) -> set[int]:
    stacked = dict(p.stacked_parameters())[name]
    diff = (stacked[expert] != stacked[0]).reshape(-1)
    return set(torch.nonzero(diff).reshape(-1).tolist())


def tier_sets(p: Prismatic, name: str) -> tuple[set[int], set[int]]:
    top, bottom = p.tiers(name)
    return set(top.tolist()), set(bottom.tolist())


def experts_digest(p: Prismatic) -> str:
    h = hashlib.sha256()
    for name, stacked in p.stacked_parameters():
        h.update(name.encode())
        h.update(stacked.detach().numpy().tobytes())
    return h.hexdigest()


# --- the experts -----------------------------------------------------------------------------


def test_expert_0_equals_the_base():
    torch.manual_seed(3)
    base = MLP(16, 64)
    p = Prismatic(base, num_experts=4)
    for name, weight in base.named_parameters():
        assert torch.equal(dict(p.stacked_parameters())[name][0], weight)


def test_dual_sided_experts_differ_exactly_on_the_tier_positions():
    p = layer("dual_sided")
    for name in ("fc.weight", "proj.weight"):
        top, bottom = tier_sets(p, name)
        assert len(top) == len(bottom) > 0
        for expert in (1, 2):
            # N(0, 1) noise is never exactly 0, so every tier position moves and nothing else.
            assert changed_positions(p, name, expert) == top | bottom


@pytest.mark.parametrize("strategy", ["top_only", "bottom_only"])
def test_one_sided_strategies_touch_only_their_tier(strategy):
    p = layer(strategy)
    for name in ("fc.weight", "proj.weight"):
        top, bottom = tier_sets(p, name)
        expected = top if strategy == "top_only" else bottom
        assert changed_positions(p, name, 1) == expected


def test_random_strategy_moves_as_many_random_nonzero_weights():
    p = layer("random")
    for name in ("fc.weight", "proj.weight"):
        top, bottom = tier_sets(p, name)
        base = dict(p.stacked_parameters())[name][0].reshape(-1)
        for expert in (1, 2):
            moved = changed_positions(p, name, expert)
            assert len(moved) == len(top) + len(bottom)
            assert all(base[i] != 0 for i in moved)
            assert moved != top | bottom  # not the tiers themselves
        assert changed_positions(p, name, 1) != changed_positions(p, name, 2)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_scale_zero_gives_identical_experts(strategy):
    p = layer(strategy, scale=0.0)
    for _, stacked in p.stacked_parameters():
        for expert in range(1, 3):
            assert torch.equal(stacked[expert], stacked[0])


def test_scale_zero_is_exact_in_bfloat16_too():
    torch.manual_seed(0)
    p = Prismatic(MLP(16, 64).to(torch.bfloat16), num_experts=3, perturbation_scale=0.0)
    for _, stacked in p.stacked_parameters():
        assert stacked.dtype == torch.bfloat16
        assert torch.equal(stacked[1], stacked[0])


def test_perturbation_noise_is_relative_to_the_weight():
    torch.manual_seed(0)
    weight = torch.randn(1000)
    tiers = select_tiers(weight, 0.1)
    small = perturb(weight, tiers, expert=1, param_name="w", scale=0.01, strategy="dual_sided")
    big = perturb(weight, tiers, expert=1, param_name="w", scale=1.0, strategy="dual_sided")
    positions = torch.cat([tiers.top, tiers.bottom])
    # Same seed, same noise: the change scales with `scale` and with |w|.
    ratio = (big - weight)[positions] / (small - weight)[positions]
    assert torch.allclose(ratio, torch.full_like(ratio, 100.0), rtol=1e-3)


# --- determinism -----------------------------------------------------------------------------


def test_two_constructions_give_the_same_experts():
    assert experts_digest(layer(seed=5)) == experts_digest(layer(seed=5))


def test_experts_are_the_same_in_another_process():
    code = (
        "import sys; sys.path.insert(0, 'tests');"
        "import test_perturbation as t; print(t.experts_digest(t.layer(seed=5)))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == experts_digest(layer(seed=5))


def test_seeds_depend_on_expert_and_parameter_name_only():
    assert expert_seed(1, "fc.weight") == expert_seed(1, "fc.weight")
    assert expert_seed(1, "fc.weight") != expert_seed(2, "fc.weight")
    assert expert_seed(1, "fc.weight") != expert_seed(1, "proj.weight")
    # Pinned: the same value on every machine, whatever torch or Python version.
    assert expert_seed(1, "fc.weight") == int.from_bytes(
        hashlib.sha256(b"prismatic:1:fc.weight").digest()[:8], "little"
    ) & (2**63 - 1)


def test_layers_with_different_names_get_different_noise():
    torch.manual_seed(0)
    base = MLP(16, 64)
    a = Prismatic(base, name="blocks.0.mlp")
    b = Prismatic(base, name="blocks.1.mlp")
    again = Prismatic(base, name="blocks.0.mlp")
    wa, wb, wa2 = (dict(p.stacked_parameters())["fc.weight"] for p in (a, b, again))
    assert torch.equal(wa[0], wb[0])  # the same clean expert
    assert not torch.equal(wa[1], wb[1])
    assert torch.equal(wa[1], wa2[1])


# --- exact tier counts -----------------------------------------------------------------------


def test_layernorm_of_ones_gets_exactly_the_requested_count():
    weight = nn.LayerNorm(100).weight  # all ones: every magnitude ties
    tiers = select_tiers(weight, 0.1)
    assert tiers.top.tolist() == [0, 1, 2, 3, 4]  # ties broken by index
    assert tiers.bottom.tolist() == [95, 96, 97, 98, 99]


def test_zero_bias_has_empty_tiers_and_is_never_perturbed():
    bias = torch.zeros(200)
    tiers = select_tiers(bias, 0.1)
    assert tiers.top.numel() == tiers.bottom.numel() == 0
    out = perturb(bias, tiers, expert=1, param_name="b", scale=1.0, strategy="random")
    assert torch.equal(out, bias)


def test_zeros_are_never_bottom_weights():
    weight = torch.cat([torch.zeros(90), torch.arange(1.0, 11.0)])  # 10 non-zeros
    tiers = select_tiers(weight, 0.2)  # 10 per tier requested
    assert tiers.top.tolist() == list(range(90, 100))  # the non-zeros, all "top"
    assert tiers.bottom.numel() == 0  # nothing non-zero left for the bottom


def test_a_three_element_parameter_is_all_middle_and_unperturbed():
    """Documented in trainer/perturbation.py: floor(3 * 0.1 / 2) == 0."""
    torch.manual_seed(0)
    p = Prismatic(nn.Linear(4, 3), num_experts=3, d_model=4)
    top, bottom = p.tiers("bias")
    assert top.numel() == bottom.numel() == 0
    stacked = dict(p.stacked_parameters())["bias"]
    assert torch.equal(stacked[1], stacked[0])
    # The 12-element weight is small too: floor(12 * 0.1 / 2) == 0.
    assert p.tiers("weight")[0].numel() == 0


def test_tier_size_uses_the_decimal_sparsity():
    assert tier_size(180, 0.7) == 63  # 180 * 0.7 / 2 = 63, though the float product is 62.99...
    assert tier_size(100, 0.1) == 5
    assert tier_size(19, 0.1) == 0
    assert tier_size(20, 0.1) == 1


@settings(max_examples=60, deadline=None)
@given(
    values=st.lists(st.sampled_from([0.0, 1.0, -1.0, 0.5, 2.0, -3.0, 1e-8]), min_size=1),
    sparsity=st.sampled_from([0.0, 0.1, 0.2, 0.5, 1.0]),
)
def test_tiers_are_exact_disjoint_and_ordered(values, sparsity):
    weight = torch.tensor(values)
    tiers = select_tiers(weight, sparsity)
    k = tier_size(len(values), sparsity)
    nonzero = int((weight != 0).sum())
    assert tiers.top.numel() == min(k, nonzero)
    assert tiers.bottom.numel() == min(k, nonzero - tiers.top.numel())
    top, bottom = set(tiers.top.tolist()), set(tiers.bottom.tolist())
    assert not top & bottom
    assert all(weight[i] != 0 for i in top | bottom)
    assert tiers.top.tolist() == sorted(top) and tiers.bottom.tolist() == sorted(bottom)
    magnitudes = weight.abs()
    if top and bottom:
        assert min(magnitudes[i] for i in top) >= max(magnitudes[i] for i in bottom)
    rest = set(range(len(values))) - top - bottom
    for i in rest:
        if weight[i] != 0 and top:
            assert magnitudes[i] <= min(magnitudes[j] for j in top)
        if weight[i] != 0 and bottom:
            assert magnitudes[i] >= max(magnitudes[j] for j in bottom)
