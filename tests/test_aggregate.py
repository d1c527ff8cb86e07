"""Combining layers and ranks: the layer mean, the data-parallel mean and spread, and the shard
rule, each checked against values computed independently from whole gradient vectors."""

from __future__ import annotations

import math
import random

import pytest

from prismatic.aggregate import combine_ranks, mean_over_layers, note_dict


def _norm(v: list[float]) -> float:
    return math.sqrt(sum(x * x for x in v))


def _divergence(g: list[float], g0: list[float]) -> float:
    return 1.0 - sum(a * b for a, b in zip(g, g0, strict=True)) / (_norm(g) * _norm(g0))


def test_layer_mean_skips_missing_values_and_sums_counts() -> None:
    metrics = {
        "bottom_norm": [[1.0, 2.0, None], [3.0, 6.0, 5.0]],
        "divergence": [[None, 0.1, 0.2], [None, 0.3, 0.4]],
        "nonfinite": [[0.0, 2.0, 1.0], [0.0, 3.0, 0.0]],
    }
    mean = mean_over_layers(metrics)
    assert mean["bottom_norm"] == [2.0, 4.0, 5.0]
    assert mean["divergence"][0] is None
    assert mean["divergence"][1:] == pytest.approx([0.2, 0.3])
    assert mean["nonfinite"] == [0.0, 5.0, 1.0]


def test_data_parallel_ranks_store_the_mean_and_the_largest_relative_spread() -> None:
    rank0 = {"norm": [[2.0, 4.0]], "routing_weight": [[0.5, 0.5]]}
    rank1 = {"norm": [[2.0, 4.4]], "routing_weight": [[0.9, 0.1]]}
    merged, spread = combine_ranks([rank0, rank1], shards=False)
    assert merged["norm"] == [[2.0, pytest.approx(4.2)]]
    # (4.4 - 4.0) / 4.2; routing weights differ by design (each rank's own batch): not counted.
    assert spread == pytest.approx(0.4 / 4.2)
    assert merged["routing_weight"] == [[pytest.approx(0.7), pytest.approx(0.3)]]


def test_agreeing_ranks_have_zero_spread_and_replicated_counts_are_not_added() -> None:
    rank = {"norm": [[2.0, 4.0]], "nonfinite": [[0.0, 3.0]]}
    merged, spread = combine_ranks([rank, rank, rank], shards=False)
    assert spread == 0.0
    assert merged["nonfinite"] == [[0.0, 3.0]]


def test_shards_combine_norms_as_root_sum_of_squares_and_divergence_exactly() -> None:
    rng = random.Random(7)
    n, shards = 60, 3
    g0 = [rng.gauss(0, 1) for _ in range(n)]
    g1 = [x + rng.gauss(0, 0.5) for x in g0]
    g2 = [rng.gauss(0, 2) for _ in range(n)]
    bottom = list(range(0, n, 10))  # tier positions, spread over every shard

    per_rank = []
    for s in range(shards):
        part = slice(s * n // shards, (s + 1) * n // shards)
        vectors = [g0[part], g1[part], g2[part]]
        positions = [i - part.start for i in bottom if part.start <= i < part.stop]
        per_rank.append(
            {
                "norm": [[_norm(v) for v in vectors]],
                "bottom_norm": [[_norm([v[i] for i in positions]) for v in vectors]],
                "divergence": [[None] + [_divergence(v, vectors[0]) for v in vectors[1:]]],
                "nonfinite": [[0.0, 1.0, 0.0]],
            }
        )
    merged, spread = combine_ranks(per_rank, shards=True)

    whole = [g0, g1, g2]
    assert merged["norm"][0] == pytest.approx([_norm(v) for v in whole])
    assert merged["bottom_norm"][0] == pytest.approx([_norm([v[i] for i in bottom]) for v in whole])
    assert merged["divergence"][0][0] is None
    assert merged["divergence"][0][1:] == pytest.approx([_divergence(v, g0) for v in whole[1:]])
    assert merged["nonfinite"] == [[0.0, 3.0, 0.0]]  # disjoint shards: counts add up
    assert spread is None  # shards are not expected to agree

    # The mean of the shards' norms would have been wrong: that is the rule under test.
    mean_of_norms = sum(r["norm"][0][1] for r in per_rank) / shards
    assert abs(mean_of_norms - _norm(g1)) > 0.1 * _norm(g1)


def test_ranks_with_a_missing_value_use_the_others() -> None:
    merged, _ = combine_ranks(
        [{"top_norm": [[1.0, None]]}, {"top_norm": [[3.0, 2.0]]}], shards=False
    )
    assert merged["top_norm"] == [[2.0, 2.0]]


def test_note_dict_uses_the_design_note_names() -> None:
    note = note_dict(
        {
            "top_norm": [1.0, 2.0],
            "bottom_norm": [0.1, 0.2],
            "middle_norm": [3.0, 3.0],
            "norm": [4.0, 5.0],
            "divergence": [None, 0.06],
        }
    )
    assert note["expert_gradients"]["expert_0"]["clean_norm"] == 4.0
    assert note["expert_gradients"]["expert_1"]["perturbed_norm"] == 5.0
    assert note["divergence_scores"] == {"expert_1_divergence": 0.06}
