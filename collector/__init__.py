"""The collector: one service that receives from many trainers and writes every dynamics.db."""

from collector.service import Collector, CollectorStats

__all__ = ["Collector", "CollectorStats"]
