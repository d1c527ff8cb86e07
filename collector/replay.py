"""Ingesting spool files: every message a trainer published, appended per rank in its run
folder (`spool/rank<N>.msgpack`). Writes are idempotent, so replaying twice stores each step
once."""

from __future__ import annotations

import logging
from pathlib import Path

import msgpack

from collector.service import Collector
from prismatic import wire
from prismatic.errors import ConfigError, ProtocolError

log = logging.getLogger(__name__)
SPOOL_DIR = "spool"


def spool_files(run_dir: Path) -> list[Path]:
    return sorted((run_dir / SPOOL_DIR).glob("rank*.msgpack"))


def read_spool(path: Path):
    """Yield raw messages; a torn last message (a crash mid-write) ends the file quietly."""
    with open(path, "rb") as fh:
        unpacker = msgpack.Unpacker(fh, raw=False, strict_map_key=False,
                                    max_buffer_size=wire.MAX_MESSAGE_BYTES)
        try:
            yield from unpacker
        except (msgpack.OutOfData, ValueError) as exc:
            log.warning("replay: %s ends in a torn message (%s); the rest was read", path, exc)


def replay_into(collector: Collector, run_dir: Path) -> int:
    """Feed one run folder's spool files through `collector`; returns messages accepted."""
    accepted = 0
    for path in spool_files(run_dir):
        for raw in read_spool(path):
            collector.stats.received += 1
            try:
                message = wire.validate(raw)
            except ProtocolError as exc:
                collector.reject(exc.reason, exc.detail)
                continue
            collector.handle(message)
            accepted += 1
    return accepted


def replay_dirs(run_dirs: list[Path], runs_dir: Path) -> None:
    collector = Collector(runs_dir=runs_dir)
    for run_dir in run_dirs:
        if not (run_dir / SPOOL_DIR).is_dir():
            raise ConfigError(f"--replay: {str(run_dir)!r} has no spool/ folder; pass a run folder "
                              "such as build/runs/<hash>")
        count = replay_into(collector, run_dir)
        print(f"replayed {count} messages from {run_dir}", flush=True)
    collector.shutdown()
