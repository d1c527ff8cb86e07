"""The gradient probe: per layer and expert, tier norms, divergence, drift and routing.

Run it after `backward()` (and after `GradScaler.unscale_`, or pass `loss_scale`) and before
`optimizer.step()`. All work is tensor operations into a scratch tensor allocated once; the
results of every layer are combined in one tensor and copied to the host once, so a logged step
costs one device sync.

Per stacked parameter G of shape (E, n), in float32 whatever the parameter dtype:
- ‖G_k‖ per expert (one pass) and G_k · G_0 (one matrix-vector pass): the divergence
  1 − cos(G_k, G_0). Its error is absolute, about float32 epsilon (1e-7), far below the 0.01
  that separates "collapsing" from "diverging". (The distance form, from ‖G_k − G_0‖, is exact
  for identical gradients but loses 1e-4 when one gradient is 1000x smaller than the other.)
- the tier positions (fixed, sorted) gathered once: top and bottom norms; middle is the rest;
- ‖W_k − W_0‖ (`torch.pdist`: one pass, no cancellation, so an unperturbed expert shows exactly
  0) and ‖W_0‖ over the weights for `weight_drift`.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from prismatic.errors import ProbeError
from prismatic.wire import EXPERT_METRICS
from trainer.layer import Prismatic

log = logging.getLogger(__name__)

# Column order of the (layers, experts, metrics) result tensor.
_COLUMNS = EXPERT_METRICS
_IDX = {name: i for i, name in enumerate(_COLUMNS)}
_NORM_COLUMNS = [_IDX[m] for m in ("top_norm", "bottom_norm", "middle_norm", "norm")]
# Scratch rows per stacked parameter: norms (squared at the end) and raw sums.
_G_NORM, _G_DOT, _TOP, _BOTTOM, _W_DIST, _W0_NORM = range(6)
_SQUARED_ROWS = [_G_NORM, _TOP, _BOTTOM, _W_DIST, _W0_NORM]  # _G_DOT is summed as it is
_PDIST_MAX_EXPERTS = 4  # beyond this, pdist's E(E-1)/2 pairs cost more than E-1 differences


def unwrap(model: nn.Module) -> nn.Module:
    """Peel DistributedDataParallel / DataParallel (`.module`) and torch.compile (`._orig_mod`)."""
    while True:
        inner = getattr(model, "_orig_mod", None)
        if isinstance(inner, nn.Module):
            model = inner
        elif isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        else:
            return model


def find_prismatic_layers(model: nn.Module) -> list[Prismatic]:
    """Every Prismatic layer in any nn.Module tree, in module order (wrappers peeled first)."""
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


@dataclass
class _Slot:
    """One stacked parameter of one layer, with its row in the scratch tensor."""

    layer: int
    param: nn.Parameter
    tier_index: torch.Tensor  # (k_top + k_bottom,) sorted within each tier
    k_top: int


class GradientProbe:
    """Measures the gradients of every Prismatic layer in `model` (any nn.Module tree).

    `average_routing_over_ranks`: under data-parallel training every rank routes its own batch;
    with this set (and a process group initialised) the routing weights are averaged over the
    ranks with one all-reduce, so every rank reports the same values. Every rank must then call
    `measure` at the same steps, as it does for the gradients' own all-reduce.
    """

    def __init__(self, model: nn.Module, *, average_routing_over_ranks: bool = False) -> None:
        self.layers = find_prismatic_layers(model)
        if not self.layers:
            raise ProbeError(
                f"{type(unwrap(model)).__name__} holds no Prismatic layer; wrap an expert in "
                "trainer.Prismatic to probe it"
            )
        self.n_experts = max(layer.num_experts for layer in self.layers)
        self.average_routing_over_ranks = average_routing_over_ranks
        self._warned_missing = False
        self._prepare()

    def _prepare(self) -> None:
        """Tier indices and scratch space on the model's device (again if the model moved)."""
        self.device = self.layers[0].routing_sum.device
        self._slots = [
            self._slot(li, layer, name, param)
            for li, layer in enumerate(self.layers)
            for name, param in layer.stacked_parameters()
        ]
        # (params, 6, E): filled by out= writes, never reallocated; unused cells stay 0.
        self._scratch = torch.zeros(len(self._slots), 6, self.n_experts, device=self.device)
        self._layer_of_slot = torch.tensor([s.layer for s in self._slots], device=self.device)
        topk = [layer.mixing == "topk" and layer.num_experts > 1 for layer in self.layers]
        self._topk = torch.tensor(topk, device=self.device)
        self._any_topk = any(topk)

    @staticmethod
    def _slot(li: int, layer: Prismatic, name: str, param: nn.Parameter) -> _Slot:
        top, bottom = layer.tiers(name)
        index = torch.cat([top, bottom])
        if param[0].numel() < 2**31:
            index = index.to(torch.int32)  # a slightly faster gather, half the memory
        return _Slot(li, param, index, top.numel())

    # --- measuring -----------------------------------------------------------------------------

    @torch.no_grad()
    def measure(self, step: int, loss_scale: float | None = None) -> ProbeResult | None:
        """None (with one warning) when gradients are missing, e.g. before backward().

        `loss_scale`: divide the norms by it, for gradients still multiplied by a GradScaler's
        scale (not needed after `scaler.unscale_(optimizer)`)."""
        if any(slot.param.grad is None for slot in self._slots if slot.param.requires_grad):
            self._warn_missing(step)
            return None
        if self._slots[0].param.device != self.device:  # e.g. probe made before model.cuda()
            self._prepare()
        for row, slot in enumerate(self._slots):
            self._measure_param(row, slot)
        table = self._finish(loss_scale)  # (L, E, M)
        values = table.tolist()  # the one host sync
        if any(e[_IDX["nonfinite"]] for layer in values for e in layer):
            values = self._with_nonfinite_counts(values)
        return ProbeResult(step, self._to_metrics(values), len(self.layers), self.n_experts)

    def _measure_param(self, row: int, slot: _Slot) -> None:
        out = self._scratch[row]  # (6, E)
        param = slot.param
        E = param.shape[0]
        w = param.detach().reshape(E, -1).float()  # (E, n); a no-op for float32
        _distances_to_first(w, out[_W_DIST, 1:E])
        torch.linalg.vector_norm(w[0], out=out[_W0_NORM, 0])
        if param.grad is None:  # a frozen parameter: no gradient to add
            return
        g = param.grad.reshape(E, -1).float()
        torch.linalg.vector_norm(g, dim=1, out=out[_G_NORM, :E])
        torch.mv(g, g[0], out=out[_G_DOT, :E])
        if slot.tier_index.numel():
            tiers = g.index_select(1, slot.tier_index)  # (E, k_top + k_bottom)
            k = slot.k_top
            torch.linalg.vector_norm(tiers[:, :k], dim=1, out=out[_TOP, :E])
            torch.linalg.vector_norm(tiers[:, k:], dim=1, out=out[_BOTTOM, :E])

    def _finish(self, loss_scale: float | None) -> torch.Tensor:
        """Scratch (params, 6, E) -> per layer and expert (L, E, M), in a few vector ops."""
        per_param = self._scratch.clone()
        per_param[:, _SQUARED_ROWS] = per_param[:, _SQUARED_ROWS].square()
        sums = torch.zeros(len(self.layers), 6, self.n_experts, device=self.device)
        sums.index_add_(0, self._layer_of_slot, per_param)
        total_sq, dot, top_sq, bottom_sq, drift_sq, base_sq = sums.unbind(1)  # (L, E) each
        norm = total_sq.sqrt()
        # Clamped against rounding; a zero gradient has no direction, so no divergence.
        both = norm * norm[:, :1]
        divergence = (1.0 - dot / both).clamp(0.0, 2.0).where(both > 0, float("nan"))
        out = torch.full(
            (len(self.layers), self.n_experts, len(_COLUMNS)), float("nan"), device=self.device
        )
        out[..., _IDX["top_norm"]] = top_sq.sqrt()
        out[..., _IDX["bottom_norm"]] = bottom_sq.sqrt()
        out[..., _IDX["middle_norm"]] = (total_sq - top_sq - bottom_sq).clamp_min(0).sqrt()
        out[..., _IDX["norm"]] = norm
        out[:, 1:, _IDX["divergence"]] = divergence[:, 1:]
        out[:, 1:, _IDX["weight_drift"]] = (drift_sq[:, 1:] / base_sq[:, :1]).sqrt()
        out[..., _IDX["routing_weight"]] = self._routing()
        # A flag for now; exact counts are taken only when some gradient is non-finite.
        out[..., _IDX["nonfinite"]] = (~torch.isfinite(total_sq)).float()
        if loss_scale:
            out[..., _NORM_COLUMNS] /= loss_scale
        self._mark_silent_experts(out, total_sq)
        self._mark_absent_experts(out)
        return out

    def _routing(self) -> torch.Tensor:
        """(L, E) mean router probabilities since the last measurement; NaN where absent."""
        routing = torch.full((len(self.layers), self.n_experts), float("nan"), device=self.device)
        for li, layer in enumerate(self.layers):
            routing[li, : layer.num_experts] = layer.take_routing().to(self.device)
        if self.average_routing_over_ranks and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(routing)
            routing /= dist.get_world_size()
        return routing

    def _mark_silent_experts(self, out: torch.Tensor, total_sq: torch.Tensor) -> None:
        """Under top-k routing an expert that received no token has an exactly-zero gradient:
        "no gradient" (None on the wire), not a norm of 0, and no divergence either."""
        if not self._any_topk:
            return
        silent = (total_sq == 0) & self._topk.unsqueeze(1)  # (L, E)
        no_gradient = out[..., : _IDX["divergence"] + 1]  # the tier norms, norm, divergence
        no_gradient[silent] = float("-inf")

    def _mark_absent_experts(self, out: torch.Tensor) -> None:
        """Layers with fewer experts than the widest one: NaN ("does not exist") past their end."""
        for li, layer in enumerate(self.layers):
            if layer.num_experts < self.n_experts:
                out[li, layer.num_experts :] = float("nan")

    def _with_nonfinite_counts(self, values: list) -> list:
        """Rare path (a second sync): count non-finite gradient values per layer and expert."""
        counts = torch.zeros(len(self.layers), self.n_experts, device=self.device)
        for slot in self._slots:
            if slot.param.grad is not None:
                g = slot.param.grad.reshape(slot.param.shape[0], -1)
                counts[slot.layer, : g.shape[0]] += (~torch.isfinite(g)).sum(1).to(self.device)
        for li, layer in enumerate(self.layers):
            for e, count in enumerate(counts[li].tolist()[: layer.num_experts]):
                values[li][e][_IDX["nonfinite"]] = count
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


def _distances_to_first(x: torch.Tensor, out: torch.Tensor) -> None:
    """out[k-1] = ‖x_k − x_0‖ for k = 1..E-1, in one pass over x (E, n) when E is small."""
    E = x.shape[0]
    if E < 2:
        return
    if E <= _PDIST_MAX_EXPERTS:
        # pdist's pairs start with (0, 1), (0, 2), ..., (0, E-1).
        out.copy_(torch.pdist(x)[: E - 1])
        return
    for k in range(1, E):
        torch.linalg.vector_norm(x[k] - x[0], out=out[k - 1])


def _clean(value: float) -> float | None:
    """NaN marks "does not exist", -inf "no gradient", and a non-finite gradient gives a
    non-finite norm: all travel as None (nil); the `nonfinite` count says which it was."""
    return value if math.isfinite(value) else None
