"""A small byte-level decoder-only transformer whose every MLP is a Prismatic layer."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from prismatic.config import ModelConfig
from trainer.layer import Prismatic

VOCAB_SIZE = 256  # bytes


class MLP(nn.Module):
    """The base expert: Linear -> GELU -> Linear, (..., d) -> (..., d)."""

    def __init__(self, d_model: int, hidden: int) -> None:
        super().__init__()
        self.fc = nn.Linear(d_model, hidden)
        self.proj = nn.Linear(hidden, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(F.gelu(self.fc(x)))


class SelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_heads = cfg.n_heads
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model)
        self.dropout = cfg.dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).split(d, dim=2)
        # (B, T, D) -> (B, H, T, D/H)
        q, k, v = (z.view(b, t, self.n_heads, d // self.n_heads).transpose(1, 2) for z in (q, k, v))
        drop = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=drop)
        return self.proj(y.transpose(1, 2).reshape(b, t, d))


def _init_weights(module: nn.Module) -> None:
    # GPT-2 style: N(0, 0.02); the default N(0, 1) embedding saturates the tied output head.
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, mean=0.0, std=0.02)
    if isinstance(module, nn.Linear) and module.bias is not None:
        nn.init.zeros_(module.bias)


def make_mlp_layer(cfg: ModelConfig, name: str = "") -> Prismatic:
    """The MLP of one block; `name` (its module path) makes its perturbation seeds its own."""
    base = MLP(cfg.d_model, cfg.mlp_ratio * cfg.d_model)
    base.apply(_init_weights)  # before cloning: the experts and their tiers come from these weights
    if cfg.router_type == "dense":
        # The control: one expert and no router is exactly the plain MLP, probed as expert 0.
        return Prismatic(
            base,
            num_experts=1,
            perturbation_scale=0.0,
            sparsity=cfg.sparsity,
            d_model=cfg.d_model,
            name=name,
        )
    return Prismatic(
        base,
        num_experts=cfg.num_experts,
        perturbation_scale=cfg.perturbation_scale,
        sparsity=cfg.sparsity,
        perturbation_strategy=cfg.perturbation_strategy,
        mixing=cfg.mixing,
        top_k=cfg.top_k,
        expert_dropout=cfg.expert_dropout,
        d_model=cfg.d_model,
        name=name,
    )


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, index: int = 0) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.d_model)
        self.attn = SelfAttention(cfg)
        self.ln2 = nn.LayerNorm(cfg.d_model)
        self.mlp = make_mlp_layer(cfg, name=f"blocks.{index}.mlp")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class ByteTransformer(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.tok = nn.Embedding(VOCAB_SIZE, cfg.d_model)
        self.pos = nn.Embedding(cfg.seq_len, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.ln_f = nn.LayerNorm(cfg.d_model)
        self.head = nn.Linear(cfg.d_model, VOCAB_SIZE, bias=False)
        self.head.weight = self.tok.weight  # weight tying
        self.apply(_init_weights)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None):
        # idx: (B, T) bytes -> logits (B, T, 256)
        pos = torch.arange(idx.shape[1], device=idx.device)
        x = self.tok(idx) + self.pos(pos)
        for block in self.blocks:
            x = block(x)
        logits = self.head(self.ln_f(x))
        if targets is None:
            return logits, None
        loss = F.cross_entropy(logits.reshape(-1, VOCAB_SIZE), targets.reshape(-1))
        return logits, loss


def build_model(cfg: ModelConfig, seed: int) -> ByteTransformer:
    """Same seed, same base weights (and so the same tiers) on every machine and rank."""
    torch.manual_seed(seed)
    return ByteTransformer(cfg)
