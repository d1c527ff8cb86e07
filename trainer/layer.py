"""The Prismatic layer: one base expert cloned N times, experts 1+ statically perturbed.

Experts' parameters are stored stacked, one tensor of shape (num_experts, *shape) per base
parameter, so each gradient the probe reads is already one contiguous tensor per parameter.
The base module is kept only as a template for `torch.func.functional_call`.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from prismatic.errors import ExpertShapeError
from trainer.perturbation import STRATEGIES, perturb, select_tiers

MIXING_MODES = ("outputs", "smear", "topk")


def _infer_width(module: nn.Module) -> int:
    for sub in module.modules():
        if isinstance(sub, nn.Linear):
            return sub.in_features
    raise ValueError("cannot infer the input width of base_expert; pass d_model=")


class Prismatic(nn.Module):
    """Mixes `num_experts` copies of `base_expert`; expert 0 is clean, 1+ are perturbed.

    `base_expert` must map (..., d_model) to the same shape. Mixing modes:
    - `outputs`: softmax-weighted sum of every expert's output, per token;
    - `smear`: experts' parameters merged with the batch-mean routing weights, one forward pass
      (every expert then gets the same gradient direction: divergence is 0 by construction);
    - `topk`: each token goes to its `top_k` most probable experts.
    With `num_experts=1` there is no router: the layer is the plain base MLP (the dense control).

    `name` (e.g. "blocks.0.mlp") is folded into the perturbation seeds, so two layers built from
    the same base shapes do not receive the same noise pattern. The base expert's buffers, if it
    has any, are shared by all experts (they live in a template that follows `.to()` and
    `.train()`); its parameters are cloned into `experts`.
    """

    routing_sum: torch.Tensor
    routing_tokens: torch.Tensor

    def __init__(
        self,
        base_expert: nn.Module,
        num_experts: int = 3,
        perturbation_scale: float = 1.0,
        sparsity: float = 0.1,
        perturbation_strategy: str = "dual_sided",
        mixing: str = "outputs",
        top_k: int = 1,
        expert_dropout: float = 0.1,
        d_model: int | None = None,
        name: str = "",
    ) -> None:
        super().__init__()
        if num_experts < 1:
            raise ValueError(f"num_experts {num_experts} must be 1 or more")
        if not 0.0 <= sparsity <= 1.0:
            raise ValueError(f"sparsity {sparsity} must be in [0, 1]")
        if perturbation_scale < 0:
            raise ValueError(f"perturbation_scale {perturbation_scale} must be 0 or more")
        if not 0.0 <= expert_dropout < 1.0:
            raise ValueError(f"expert_dropout {expert_dropout} must be in [0, 1)")
        if mixing not in MIXING_MODES:
            raise ValueError(f"mixing {mixing!r} is not one of {', '.join(MIXING_MODES)}")
        if perturbation_strategy not in STRATEGIES:
            raise ValueError(
                f"perturbation_strategy {perturbation_strategy!r} is not one of "
                f"{', '.join(STRATEGIES)}"
            )
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k {top_k} must be in 1..num_experts ({num_experts})")
        self.num_experts = num_experts
        self.perturbation_scale = float(perturbation_scale)
        self.sparsity = float(sparsity)
        self.perturbation_strategy = perturbation_strategy
        self.mixing = mixing
        self.top_k = top_k
        self.expert_dropout = float(expert_dropout)
        self.d_model = d_model or _infer_width(base_expert)

        # The template is not a registered submodule: its own parameters are never trained.
        self._template = [copy.deepcopy(base_expert).requires_grad_(False)]
        self.param_names = [param_name for param_name, _ in base_expert.named_parameters()]
        self.experts = nn.ParameterDict()
        for param_name, weight in base_expert.named_parameters():
            self._add_stacked(param_name, weight, seed_name=f"{name}.{param_name}".lstrip("."))
        if num_experts > 1:
            self.router_norm = nn.LayerNorm(self.d_model)
            self.router = nn.Linear(self.d_model, num_experts)
        # Router probabilities summed over the training tokens since the probe last read them,
        # (num_experts,), and how many tokens that was; `take_routing` returns the mean.
        self.register_buffer("routing_sum", torch.zeros(num_experts), persistent=False)
        self.register_buffer("routing_tokens", torch.zeros(()), persistent=False)

    def _add_stacked(self, param_name: str, weight: torch.Tensor, seed_name: str) -> None:
        """Tiers from the clean weight, then (num_experts, *shape): clean copy + perturbed ones."""
        tiers = select_tiers(weight, self.sparsity)
        key = self._key(param_name)
        self.register_buffer(f"tier_top__{key}", tiers.top)
        self.register_buffer(f"tier_bottom__{key}", tiers.bottom)
        clones = [weight.detach().clone()]
        for expert in range(1, self.num_experts):
            clones.append(
                perturb(
                    weight,
                    tiers,
                    expert=expert,
                    param_name=seed_name,
                    scale=self.perturbation_scale,
                    strategy=self.perturbation_strategy,
                )
            )
        self.experts[key] = nn.Parameter(torch.stack(clones))

    @staticmethod
    def _key(name: str) -> str:
        return name.replace(".", "__")

    # --- what the probe reads ------------------------------------------------------------------

    def stacked_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """(base parameter name, stacked parameter of shape (num_experts, *shape))."""
        return [(name, self.experts[self._key(name)]) for name in self.param_names]

    def tiers(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        key = self._key(name)
        return getattr(self, f"tier_top__{key}"), getattr(self, f"tier_bottom__{key}")

    def expert_parameters(self, expert: int) -> dict[str, torch.Tensor]:
        return {name: p[expert] for name, p in self.stacked_parameters()}

    @torch.no_grad()
    def take_routing(self) -> torch.Tensor:
        """Mean router probability per expert since the last call, (num_experts,), and reset.

        NaN when no training batch went through the router since (e.g. only eval batches). The
        dense control (one expert, no router) always gives 1."""
        if self.num_experts == 1:
            return torch.ones(1, device=self.routing_sum.device)
        mean = self.routing_sum / self.routing_tokens  # 0/0 = NaN: "not measured"
        self.routing_sum.zero_()
        self.routing_tokens.zero_()
        return mean

    # --- the template follows the module ------------------------------------------------------

    def train(self, mode: bool = True) -> Prismatic:
        super().train(mode)
        self._template[0].train(mode)  # e.g. dropout inside the base expert
        return self

    def _apply(self, fn, recurse: bool = True):  # type: ignore[no-untyped-def]
        super()._apply(fn, recurse)
        self._template[0]._apply(fn)  # the template's buffers go where the experts go
        # Routing sums stay float32 even in a .half() or .to(bfloat16) model.
        self.routing_sum = self.routing_sum.float()
        self.routing_tokens = self.routing_tokens.float()
        return self

    # --- forward -------------------------------------------------------------------------------

    def _run_expert(self, params: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        y = functional_call(self._template[0], params, (x,))
        if y.shape != x.shape:
            # Caught here, not as a broadcasting error in the mixing sum further on.
            raise ExpertShapeError(
                f"Prismatic: its expert ({type(self._template[0]).__name__}) maps "
                f"{tuple(x.shape)} to {tuple(y.shape)}; the experts' outputs are mixed in "
                "place of the input, so an expert must return its input's shape "
                "(e.g. an MLP d -> 4d -> d)"
            )
        return y

    def _routing(self, x: torch.Tensor) -> torch.Tensor:
        probs = F.softmax(self.router(self.router_norm(x)), dim=-1)  # (..., E)
        if self.training:
            flat = probs.detach().reshape(-1, self.num_experts)
            self.routing_sum += flat.sum(0).to(self.routing_sum.dtype)
            self.routing_tokens += flat.shape[0]
        if self.training and self.expert_dropout > 0:
            keep = torch.rand_like(probs) >= self.expert_dropout
            dropped = probs * keep
            total = dropped.sum(-1, keepdim=True)
            # A token that lost every expert keeps its original weights.
            probs = torch.where(total > 0, dropped / total.clamp_min(1e-12), probs)
        return probs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.num_experts == 1:
            return self._run_expert(self.expert_parameters(0), x)
        weights = self._routing(x)  # (..., E)
        if self.mixing == "outputs":
            out = torch.zeros_like(x)
            for k in range(self.num_experts):
                out = out + weights[..., k : k + 1] * self._run_expert(self.expert_parameters(k), x)
            return out
        if self.mixing == "smear":
            mean_w = weights.reshape(-1, self.num_experts).mean(0)  # (E,)
            merged = {
                name: torch.einsum("e,e...->...", mean_w.to(p.dtype), p)
                for name, p in self.stacked_parameters()
            }
            return self._run_expert(merged, x)
        return self._forward_topk(x, weights)

    def _forward_topk(self, x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        flat_x = x.reshape(-1, x.shape[-1])  # (N, D)
        top_w, top_i = weights.reshape(-1, self.num_experts).topk(self.top_k, dim=-1)  # (N, k)
        top_w = top_w / top_w.sum(-1, keepdim=True)
        out = torch.zeros_like(flat_x)
        for k in range(self.num_experts):
            token, slot = torch.nonzero(top_i == k, as_tuple=True)
            if token.numel() == 0:
                continue  # no tokens: this expert gets an all-zero gradient ("no gradient")
            y = self._run_expert(self.expert_parameters(k), flat_x[token])
            out = out.index_add(0, token, top_w[token, slot].unsqueeze(-1) * y)
        return out.reshape(x.shape)

    def extra_repr(self) -> str:
        return (
            f"num_experts={self.num_experts}, scale={self.perturbation_scale}, "
            f"sparsity={self.sparsity}, strategy={self.perturbation_strategy}, mixing={self.mixing}"
        )
