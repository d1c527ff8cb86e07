"""The gradient probe: per layer and expert, tier norms, divergence, drift and routing.

Run it after `backward()` (and after unscaling, if a GradScaler is used) and before
`optimizer.step()`. All work is tensor operations; the results of every layer are stacked into
one tensor and copied to the host once, so a logged step costs one device sync.

Per stacked parameter G of shape (E, n) the probe computes the Gram matrix G G^T (one pass over
the gradient: every expert's squared norm on the diagonal, every dot product with expert 0 in
the first column) and gathers the 10 % tier positions once. The middle tier is the remainder.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
from torch import nn

from prismatic.errors import ProbeError
from prismatic.wire import EXPERT_METRICS
from trainer.layer import Prismatic

log = logging.getLogger(__name__)

# Column order of the (layers, experts, metrics) result tensor.
_COLUMNS = EXPERT_METRICS
_IDX = {name: i for i, name in enumerate(_COLUMNS)}


def unwrap(model: nn.Module) -> nn.Module:
    """DistributedDataParallel (`.module`) and torch.compile (`._orig_mod`) wrappers, peeled."""
    while True:
        if hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        elif hasattr(model, "module") and isinstance(model.module, nn.Module):
            model = model.module
        else:
            return model


def find_prismatic_layers(model: nn.Module) -> list[Prismatic]:
    return [m for m in unwrap(model).modules() if isinstance(m, Prismatic)]


@dataclass
class ProbeResult:
    """metrics[name][layer][expert]; None where a value does not exist (see docs/protocol.md)."""

    step: int
    metrics: dict[str, list[list[float | None]]]
    n_layers: int
    n_experts: int

    def layer_mean(self) -> dict[str, list[float | None]]:
        from prismatic.aggregate import mean_over_layers

        return mean_over_layers(self.metrics)


class GradientProbe:
    """Measures the gradients of every Prismatic layer in `model` (any nn.Module tree)."""

    def __init__(self, model: nn.Module) -> None:
        self.layers = find_prismatic_layers(model)
        if not self.layers:
            raise ProbeError(
                f"{type(unwrap(model)).__name__} holds no Prismatic layer; wrap an expert in "
                "trainer.Prismatic to probe it"
            )
        self.n_experts = max(layer.num_experts for layer in self.layers)
        self._warned_missing = False

    @torch.no_grad()
    def measure(self, step: int, loss_scale: float | None = None) -> ProbeResult | None:
        """None (with one warning) when gradients are missing, e.g. before backward()."""
        per_layer = []
        for layer in self.layers:
            stats = self._layer_stats(layer)
            if stats is None:
                self._warn_missing(step)
                return None
            per_layer.append(stats)
        table = torch.stack(per_layer)  # (L, E, M)
        if loss_scale:
            norm_cols = [_IDX[m] for m in ("top_norm", "bottom_norm", "middle_norm", "norm")]
            table[:, :, norm_cols] /= loss_scale
        values = table.tolist()  # the one host sync
        if any(e[_IDX["nonfinite"]] for r in values for e in r):
            values = self._with_nonfinite_counts(values)
        return ProbeResult(step, self._to_metrics(values), len(self.layers), self.n_experts)

    def _layer_stats(self, layer: Prismatic) -> torch.Tensor | None:
        E = layer.num_experts
        device = layer.last_routing.device
        gram = torch.zeros(E, E, dtype=torch.float32, device=device)
        tier_sq = torch.zeros(2, E, dtype=torch.float32, device=device)
        drift_sq = torch.zeros(E, dtype=torch.float32, device=device)
        base_sq = torch.zeros((), dtype=torch.float32, device=device)
        for name, param in layer.stacked_parameters():
            if param.grad is None:
                return None
            g = param.grad.reshape(E, -1).float()  # (E, n), float32 whatever the dtype
            gram += g @ g.T
            top, bottom = layer.tiers(name)
            k = top.numel()
            if k + bottom.numel():
                sq = g.index_select(1, torch.cat([top, bottom])).square()  # (E, k_top + k_bottom)
                tier_sq[0] += sq[:, :k].sum(1)
                tier_sq[1] += sq[:, k:].sum(1)
            w = param.detach().reshape(E, -1).float()
            drift_sq += (w - w[:1]).square().sum(1)
            base_sq += w[0].square().sum()
        return self._finish_layer(layer, gram, tier_sq, drift_sq, base_sq)

    def _finish_layer(self, layer, gram, tier_sq, drift_sq, base_sq) -> torch.Tensor:
        E = layer.num_experts
        total_sq = gram.diagonal()
        norm = total_sq.sqrt()
        middle_sq = (total_sq - tier_sq[0] - tier_sq[1]).clamp_min(0)
        cosine = gram[:, 0] / (norm * norm[0])
        divergence = 1.0 - cosine
        out = torch.full((self.n_experts, len(_COLUMNS)), float("nan"), device=gram.device)
        out[:E, _IDX["top_norm"]] = tier_sq[0].sqrt()
        out[:E, _IDX["bottom_norm"]] = tier_sq[1].sqrt()
        out[:E, _IDX["middle_norm"]] = middle_sq.sqrt()
        out[:E, _IDX["norm"]] = norm
        out[1:E, _IDX["divergence"]] = divergence[1:]
        out[1:E, _IDX["weight_drift"]] = drift_sq[1:].sqrt() / base_sq.sqrt()
        out[:E, _IDX["routing_weight"]] = layer.last_routing.float()
        # A flag for now; exact counts are taken only when some gradient is non-finite.
        out[:E, _IDX["nonfinite"]] = (~torch.isfinite(total_sq)).float()
        if layer.mixing == "topk":
            # An expert that received no token has an exactly-zero gradient: "no gradient".
            silent = total_sq == 0
            out[:E][silent, : _IDX["divergence"] + 1] = float("-inf")
        return out

    def _with_nonfinite_counts(self, values: list) -> list:
        """Rare path (a second sync): count non-finite gradient values per layer and expert."""
        for li, layer in enumerate(self.layers):
            counts = torch.zeros(layer.num_experts, device=layer.last_routing.device)
            for _, param in layer.stacked_parameters():
                g = param.grad.reshape(layer.num_experts, -1)
                counts += (~torch.isfinite(g)).sum(1)
            for e, c in enumerate(counts.tolist()):
                values[li][e][_IDX["nonfinite"]] = c
        return values

    def _to_metrics(self, values: list) -> dict[str, list[list[float | None]]]:
        metrics: dict[str, list[list[float | None]]] = {name: [] for name in _COLUMNS}
        for layer_values in values:
            for name, col in _IDX.items():
                metrics[name].append([_clean(expert[col]) for expert in layer_values])
        return metrics

    def _warn_missing(self, step: int) -> None:
        if not self._warned_missing:
            log.warning(
                "probe: step %d has no gradients (called before backward() or after zero_grad()?);"
                " nothing published for such steps. Call it after backward(), before step().",
                step,
            )
            self._warned_missing = True


def _clean(value: float) -> float | None:
    """NaN marks "does not exist", -inf "no gradient", and a non-finite gradient gives a
    non-finite norm: all travel as None (nil); the `nonfinite` count says which it was."""
    return value if math.isfinite(value) else None
