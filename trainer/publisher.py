"""Publishing probe results: msgpack over a ZeroMQ PUSH socket that never blocks training.

`send` never waits: when the socket's queue (SNDHWM messages) is full, because the collector
is down or slow, the message is counted as dropped and training goes on. Every message is also
appended to a spool file (one per rank, in the run folder) before it is sent, and carries its
byte offset in that file (`spool_offset`), so that the collector can see what it missed and
replay exactly those bytes (collector/gaps.py, or `prismatic collect --replay RUN_DIR`).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import zmq

from prismatic import wire
from prismatic.config import is_ipv6

log = logging.getLogger(__name__)


class Spool:
    """Append-only file of every message a sender published, in the bytes that went out.

    Unbuffered: each message is one write() straight to the OS, so a crash of this process
    (even SIGKILL) never leaves half a message for the next session to append after.

    TODO: rotation or compaction; matters for runs that log more than about a million steps
    (roughly 1 KB a message for the default model).
    """

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._file = open(path, "ab", buffering=0)  # noqa: SIM115 - closed in close()
        self.offset = os.fstat(self._file.fileno()).st_size  # a resumed run appends

    def append(self, data: bytes) -> bool:
        """Write one message at `self.offset`; False (spool closed) if the disk refused it."""
        try:
            view = memoryview(data)
            while view:
                written = self._file.write(view) or 0
                view = view[written:]
        except OSError as exc:
            log.warning("publisher: spool %s closed after a write error: %s", self.path, exc)
            self._truncate_torn_tail()
            self.close()
            return False
        self.offset += len(data)
        return True

    def _truncate_torn_tail(self) -> None:
        # A partly written message would hide every later one from a replay.
        try:
            os.ftruncate(self._file.fileno(), self.offset)
        except OSError as exc:
            log.warning("publisher: could not cut the torn tail of %s: %s", self.path, exc)

    @property
    def closed(self) -> bool:
        return self._file.closed

    def close(self) -> None:
        self._file.close()


class Publisher:
    """One PUSH socket per trainer process; use it from the thread that created it.

    Without a `context` argument the publisher owns its ZeroMQ context and terminates it in
    `close()`: that is what lets queued messages (the final `run_end`) go out, for at most
    `linger_ms`. A process that exits without terminating its context drops its queue.
    """

    def __init__(
        self,
        address: str,
        run_hash: str,
        rank: int = 0,
        *,
        context: zmq.Context | None = None,
        spool_path: str | os.PathLike[str] | None = None,
        send_hwm: int = 10_000,
        linger_ms: int = 1000,
        curve: tuple[bytes, bytes, bytes] | None = None,
    ) -> None:
        self.run_hash = run_hash
        self.rank = rank
        self.sent = 0
        self.dropped = 0  # not queued: the socket's queue was full, or the message oversized
        self.oversized = 0
        self._seq = 0
        self._own_context = context is None
        self._context = context or zmq.Context()
        self._socket = self._context.socket(zmq.PUSH)
        self._socket.setsockopt(zmq.SNDHWM, send_hwm)
        # On close, wait at most this long for queued messages: never hang on a dead collector.
        self._socket.setsockopt(zmq.LINGER, linger_ms)
        self._socket.setsockopt(zmq.IPV6, is_ipv6(address))
        if curve is not None:
            server_public, client_public, client_secret = curve
            self._socket.curve_serverkey = server_public
            self._socket.curve_publickey = client_public
            self._socket.curve_secretkey = client_secret
        self._socket.connect(address)
        self._spool = Spool(Path(spool_path)) if spool_path is not None else None
        log.info("publisher: run %s rank %d -> %s", run_hash, rank, address)

    @property
    def spool_path(self) -> Path | None:
        return self._spool.path if self._spool is not None else None

    def send(self, kind: str, **fields: Any) -> bool:
        """Queue one message; False (and counted as dropped) if it could not be queued now."""
        message = wire.header(kind, self.run_hash, self.rank, self._seq)
        message.update(fields)
        self._seq += 1
        data = self._spool_and_encode(message)
        if data is None:
            self.dropped += 1
            return False
        try:
            self._socket.send(data, zmq.NOBLOCK)
        except zmq.Again:
            self.dropped += 1
            return False
        self.sent += 1
        return True

    def _spool_and_encode(self, message: dict[str, Any]) -> bytes | None:
        """Encode, with the message's own position in the spool when there is one, and append;
        None for a message over the wire format's size limit (neither spooled nor sent).

        The spool write comes first: a message the socket drops is still on disk.
        """
        spool = self._spool
        if spool is not None and spool.closed:
            spool = None
        if spool is not None:
            message["spool_offset"] = spool.offset
        data = wire.encode(message)
        if len(data) > wire.MAX_MESSAGE_BYTES:
            # The collector would only reject it, and a replay would stop at it in the spool.
            self._refuse_oversized(message["kind"], len(data))
            return None
        if spool is not None and not spool.append(data):
            # The bytes never reached the spool: do not point the collector at them.
            del message["spool_offset"]
            data = wire.encode(message)
        return data

    def _refuse_oversized(self, kind: str, size: int) -> None:
        self.oversized += 1
        if self.oversized == 1:  # once: every later message of this model is as large
            log.warning(
                "publisher: run %s rank %d: a %s message of %d bytes is over the wire format's "
                "%d-byte limit; not sent (the wire format takes up to %d layers x %d experts)",
                self.run_hash,
                self.rank,
                kind,
                size,
                wire.MAX_MESSAGE_BYTES,
                wire.MAX_LAYERS,
                wire.MAX_EXPERTS,
            )

    def close(self) -> None:
        self._socket.close()
        if self._own_context:
            self._context.term()  # returns once the queue is sent, or after linger_ms
        if self._spool is not None:
            self._spool.close()
        queue_full = self.dropped - self.oversized
        if queue_full:
            log.warning(
                "publisher: %d of %d messages dropped (collector down or slow); the collector "
                "replays them from %s",
                queue_full,
                self.sent + self.dropped,
                self.spool_path or "nowhere (no spool)",
            )
        if self.oversized:
            log.warning(
                "publisher: %d messages over %d bytes were neither sent nor spooled",
                self.oversized,
                wire.MAX_MESSAGE_BYTES,
            )

    def __enter__(self) -> Publisher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
