"""Tier selection and the static perturbation of experts 1+.

Tiers are chosen once, from the base (clean) weights, and are the same for every expert, so
"expert 0 bottom vs expert 1 bottom" compares the same positions.

Counting rule: for a parameter of n elements and `sparsity` s, each of the top and bottom tiers
holds exactly floor(n * s / 2) positions, with s taken at its decimal value (0.7 is 7/10, not the
binary float just below it, which would give 62 instead of 63 for n = 180). Ties in |w| are
broken by flat index (a stable sort), so a LayerNorm weight of all ones still gets exactly that
many: the first positions are "top", the last ones "bottom". Zeros are never chosen: a tier takes
at most as many positions as there are non-zero weights (top first, then bottom from the rest),
so an all-zero bias has empty tiers.

Small parameters: when floor(n * s / 2) == 0 (a 3-element bias at s = 0.1, or anything under
20 elements at the default sparsity) both tiers are empty. The whole parameter is then "middle",
it is never perturbed (every expert holds the clean copy) and it adds nothing to the top and
bottom norms.

Tier indices are stored sorted ascending, so the probe's gather reads memory in order.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from fractions import Fraction

import torch

STRATEGIES = ("dual_sided", "top_only", "bottom_only", "random")


@dataclass(frozen=True)
class Tiers:
    """Flat indices of one parameter's top and bottom tiers (the rest is the middle tier)."""

    top: torch.Tensor  # (k_top,) int64, ascending
    bottom: torch.Tensor  # (k_bottom,) int64, ascending
    numel: int


def tier_size(numel: int, sparsity: float) -> int:
    """floor(numel * sparsity / 2), exactly, with `sparsity` read as the decimal it was written."""
    return int(numel * Fraction(repr(float(sparsity))) / 2)


def select_tiers(weight: torch.Tensor, sparsity: float) -> Tiers:
    flat = weight.detach().reshape(-1).abs().float().cpu()
    k = tier_size(flat.numel(), sparsity)
    nonzero = int((flat > 0).sum())
    k_top = min(k, nonzero)
    k_bottom = min(k, nonzero - k_top)
    # Descending by |w|, ties by index; zeros all sit after the non-zeros.
    order = torch.argsort(flat, descending=True, stable=True)
    top = order[:k_top].sort().values
    bottom = order[nonzero - k_bottom : nonzero].sort().values
    return Tiers(top=top, bottom=bottom, numel=flat.numel())


def expert_seed(expert: int, param_name: str) -> int:
    """The same 63-bit seed on every machine and rank for (expert index, parameter name)."""
    digest = hashlib.sha256(f"prismatic:{expert}:{param_name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def perturbation_positions(
    weight: torch.Tensor, tiers: Tiers, strategy: str, generator: torch.Generator
) -> torch.Tensor:
    """Flat indices that `strategy` perturbs: the tiers themselves, or as many random non-zeros."""
    if strategy == "dual_sided":
        return torch.cat([tiers.top, tiers.bottom])
    if strategy == "top_only":
        return tiers.top
    if strategy == "bottom_only":
        return tiers.bottom
    if strategy == "random":
        nonzero = torch.nonzero(weight.detach().reshape(-1).cpu() != 0).reshape(-1)
        count = min(tiers.top.numel() + tiers.bottom.numel(), nonzero.numel())
        pick = torch.randperm(nonzero.numel(), generator=generator)[:count]
        return nonzero[pick]
    raise ValueError(f"perturbation_strategy {strategy!r} is not one of {', '.join(STRATEGIES)}")


@torch.no_grad()
def perturb(
    weight: torch.Tensor,
    tiers: Tiers,
    *,
    expert: int,
    param_name: str,
    scale: float,
    strategy: str,
) -> torch.Tensor:
    """A perturbed copy: w + scale * |w| * N(0, 1) on the chosen positions, seeded per expert.

    The noise is drawn on the CPU from a generator seeded by `expert_seed`, so it is the same
    on every machine, device and rank."""
    generator = torch.Generator().manual_seed(expert_seed(expert, param_name))
    positions = perturbation_positions(weight, tiers, strategy, generator)
    # Untouched positions keep their exact bits in any dtype; the noise is added in at least
    # float32, so scale 0 gives back the very same weights even in bf16.
    flat = weight.detach().reshape(-1).cpu().clone()
    noise = torch.randn(positions.numel(), generator=generator)
    chosen = flat[positions].to(torch.promote_types(flat.dtype, torch.float32))
    flat[positions] = (chosen + scale * chosen.abs() * noise.to(chosen.dtype)).to(flat.dtype)
    return flat.reshape(weight.shape).to(device=weight.device)
