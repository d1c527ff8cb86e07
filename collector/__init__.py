"""The collector: one service that receives from many trainers and writes every dynamics.db."""

from typing import Any

__all__ = ["Collector", "CollectorStats"]


def __getattr__(name: str) -> Any:
    """`Collector` and `CollectorStats` on first use: importing the package stays light for
    the writer process (collector/writer.py), which needs none of the receiving side."""
    if name in __all__:
        from collector import service

        return getattr(service, name)
    raise AttributeError(f"module 'collector' has no attribute {name!r}")
