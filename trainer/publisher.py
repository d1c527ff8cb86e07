"""Publishing probe results: msgpack over a ZeroMQ PUSH socket that never blocks training.

`send` never waits: when the socket's queue (SNDHWM messages) is full, because the collector
is down or slow, the message is counted as dropped and training goes on. Every message is also
appended to a spool file (one per rank, in the run folder) so that the collector can replay
what it missed (`prismatic collect --replay RUN_DIR`).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import zmq

from prismatic import wire

log = logging.getLogger(__name__)


class Publisher:
    """One PUSH socket per trainer process; use it from the thread that created it."""

    def __init__(
        self,
        address: str,
        run_hash: str,
        rank: int = 0,
        *,
        context: zmq.Context | None = None,
        spool_path: Path | None = None,
        send_hwm: int = 10_000,
        linger_ms: int = 1000,
        curve: tuple[bytes, bytes, bytes] | None = None,
    ) -> None:
        self.run_hash = run_hash
        self.rank = rank
        self.sent = 0
        self.dropped = 0
        self._seq = 0
        self._context = context or zmq.Context.instance()
        self._socket = self._context.socket(zmq.PUSH)
        self._socket.setsockopt(zmq.SNDHWM, send_hwm)
        # On close, wait at most this long for queued messages: never hang on a dead collector.
        self._socket.setsockopt(zmq.LINGER, linger_ms)
        if curve is not None:
            server_public, client_public, client_secret = curve
            self._socket.curve_serverkey = server_public
            self._socket.curve_publickey = client_public
            self._socket.curve_secretkey = client_secret
        self._socket.connect(address)
        self._spool = None
        if spool_path is not None:
            spool_path.parent.mkdir(parents=True, exist_ok=True)
            self._spool = open(spool_path, "ab")  # noqa: SIM115 - closed in close()
        log.info("publisher: run %s rank %d -> %s", run_hash, rank, address)

    def send(self, kind: str, **fields: Any) -> bool:
        """Queue one message; False (and counted as dropped) if it could not be queued now."""
        message = wire.header(kind, self.run_hash, self.rank, self._seq)
        message.update(fields)
        self._seq += 1
        data = wire.encode(message)
        if self._spool is not None:
            self._spool.write(data)
            self._spool.flush()  # in the OS's hands: survives a crash of this process
        try:
            self._socket.send(data, zmq.NOBLOCK)
        except zmq.Again:
            self.dropped += 1
            return False
        self.sent += 1
        return True

    def close(self) -> None:
        self._socket.close()
        if self._spool is not None:
            self._spool.close()
            self._spool = None
        if self.dropped:
            log.warning(
                "publisher: %d of %d messages dropped (collector down or slow); "
                "replay the spool with prismatic collect --replay",
                self.dropped,
                self.sent + self.dropped,
            )

    def __enter__(self) -> Publisher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
