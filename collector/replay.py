"""Ingesting spool files: every message a trainer published, appended per rank in its run
folder (`spool/rank<N>.msgpack`), in the bytes that went out on the socket.

`replay_file` reads one spool from a byte offset on and feeds each message through
`Collector.handle()`; it returns where it stopped, so a caller can come back later for only what
was appended since (collector/gaps.py does, on its own). `replay_into` replays a whole run
folder from the start; `prismatic collect --replay RUN_DIR` reads only what the runs folder has
not stored yet (from the saved cursors, `SpoolWatch.replay_unread`). Writes are idempotent, so
replaying twice stores each step once.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgpack

from prismatic import wire
from prismatic.errors import ConfigError, ProtocolError, SchemaError

if TYPE_CHECKING:
    from collector.service import Collector

log = logging.getLogger(__name__)
SPOOL_DIR = "spool"
FLUSH_BYTES = 8 * 1024 * 1024  # a replay hands rows over at least this often (wire bytes)


def spool_files(run_dir: Path) -> list[Path]:
    return sorted((run_dir / SPOOL_DIR).glob("rank*.msgpack"))


def spool_path(run_dir: Path, rank: int) -> Path:
    """Where the trainer of `rank` appends what it publishes (trainer/loop.py writes there)."""
    return run_dir / SPOOL_DIR / f"rank{rank}.msgpack"


def read_spool(path: Path, start: int = 0) -> Iterator[tuple[Any, int]]:
    """Yield (raw message, byte offset just past it) from `start` on.

    A torn last message (a write in progress, or a crash mid-write) ends the file quietly: the
    offsets yielded never step past it, so a later read from the last offset picks it up whole.
    """
    with open(path, "rb") as fh:
        fh.seek(start)
        unpacker = msgpack.Unpacker(
            fh, raw=False, strict_map_key=False, max_buffer_size=wire.MAX_MESSAGE_BYTES
        )
        try:
            for raw in unpacker:
                yield raw, start + unpacker.tell()
        except (msgpack.UnpackException, ValueError) as exc:
            log.warning(
                "replay: %s is unreadable after byte %d (%s); the rest is skipped",
                path,
                start + unpacker.tell(),
                type(exc).__name__,
            )


@dataclass
class Replayed:
    """What one `replay_file` call did."""

    messages: int = 0  # read from the file
    accepted: int = 0  # passed validation and were handled
    end: int = 0  # byte offset just past the last whole message read


def replay_file(collector: Collector, path: Path, start: int = 0) -> Replayed:
    """Feed `path` from byte `start` on through `collector`."""
    done = Replayed(end=start)
    for raw, end in read_spool(path, start):
        done.messages += 1
        collector._message_bytes = end - done.end
        done.end = end
        collector.stats.received += 1
        # Hand rows to the writer as they pile up, as the receiving loop does: a long spool
        # read at once would otherwise be held in memory whole until the next flush.
        # (and every FLUSH_BYTES of a large model's messages, looked at every 8 messages)
        if collector._buffered >= collector.flush_rows or (
            done.messages % 8 == 0 and collector.buffered_bytes > FLUSH_BYTES
        ):
            collector.flush(wait=False)
        try:
            collector.handle(wire.validate(raw))
        except ProtocolError as exc:
            collector.reject(exc.reason, exc.detail)
            continue
        except SchemaError as exc:
            # The run's database is from a newer version: nothing in this file can be stored.
            collector.reject("bad_database", str(exc), subject=str(path))
            break
        done.accepted += 1
    return done


def warn_if_torn(path: Path, end: int) -> None:
    """Warn when `path` goes on past `end`, where reading stopped: a torn last write."""
    size = path.stat().st_size
    if end < size:
        log.warning(
            "replay: %s ends in %d bytes that are not a whole message (a torn write)",
            path,
            size - end,
        )


def replay_into(collector: Collector, run_dir: Path) -> int:
    """Feed one run folder's spool files through `collector`; returns messages accepted."""
    accepted = 0
    for path in spool_files(run_dir):
        done = replay_file(collector, path)
        warn_if_torn(path, done.end)
        accepted += done.accepted
    return accepted


def replay_dirs(run_dirs: list[Path], runs_dir: Path, writer: str = "process") -> bool:
    """Ingest what each run folder's spool holds that `runs_dir` has not stored; True if all
    of it was committed."""
    from collector.service import Collector

    for run_dir in run_dirs:
        if not run_dir.is_dir():
            raise ConfigError(
                f"--replay: {str(run_dir)!r} is not a folder; pass a run folder such as "
                "build/runs/<hash>"
            )
        if not (run_dir / SPOOL_DIR).is_dir():
            raise ConfigError(
                f"--replay: {str(run_dir)!r} has no spool/ folder; pass a run folder "
                "such as build/runs/<hash>"
            )
    collector = Collector(runs_dir=runs_dir, writer=writer)
    for run_dir in run_dirs:
        count = collector.spools.replay_unread(run_dir)
        print(f"replayed {count} messages from {run_dir}", flush=True)
    committed = collector.shutdown()
    if not committed:
        print("replay: not everything could be committed (see the log); run it again", flush=True)
    return committed
