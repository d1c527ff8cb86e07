"""Real text as bytes: the running interpreter's standard library, or any file or folder."""

from __future__ import annotations

import logging
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import torch

from prismatic.config import DataConfig
from prismatic.errors import DataError

log = logging.getLogger(__name__)
TEXT_SUFFIXES = {".py", ".txt", ".md", ".rst", ".json", ".yaml", ".yml", ".toml", ".c", ".h"}


def stdlib_files() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    return sorted(p for p in root.rglob("*.py") if "site-packages" not in p.parts)


def source_files(path: str | None) -> list[Path]:
    if path is None:
        return stdlib_files()
    p = Path(path)
    if p.is_file():
        return [p]
    if p.is_dir():
        return sorted(f for f in p.rglob("*") if f.is_file() and f.suffix in TEXT_SUFFIXES)
    raise DataError(f"data.path: {path!r} is neither a file nor a folder; use null for the stdlib")


def read_corpus(cfg: DataConfig) -> bytes:
    chunks: list[bytes] = []
    total = 0
    for f in source_files(cfg.path):  # sorted: a deterministic order everywhere
        data = f.read_bytes()
        chunks.append(data)
        total += len(data)
        if total >= cfg.max_bytes:
            break
    return b"".join(chunks)[: cfg.max_bytes]


@dataclass
class Corpus:
    train: torch.Tensor  # (n_train,) uint8
    val: torch.Tensor  # (n_val,) uint8

    @classmethod
    def load(cls, cfg: DataConfig, seq_len: int) -> Corpus:
        raw = read_corpus(cfg)
        if len(raw) < 4 * (seq_len + 1):
            raise DataError(
                f"data.path: {cfg.path!r} holds {len(raw)} bytes; need at least {4 * (seq_len + 1)}"
            )
        data = torch.frombuffer(bytearray(raw), dtype=torch.uint8)
        n_val = max(int(len(data) * cfg.val_fraction), seq_len + 1) if cfg.val_fraction else 0
        # The held-out split is the tail of the corpus.
        log.info("corpus: %d bytes (%d held out)", len(data), n_val)
        return cls(train=data[: len(data) - n_val], val=data[len(data) - n_val :])


def sample_batch(
    data: torch.Tensor, batch_size: int, seq_len: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random windows: (B, T) inputs and the (B, T) next bytes."""
    starts = torch.randint(0, len(data) - seq_len - 1, (batch_size,), generator=generator)
    window = torch.stack([data[s : s + seq_len + 1] for s in starts.tolist()]).long()
    return window[:, :-1], window[:, 1:]
