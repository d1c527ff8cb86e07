"""CURVE on the collector's socket: only trainers whose public key is allowed may write.

`prismatic collect --curve-dir DIR` (DIR made by `prismatic keys`) gives the PULL socket the
collector's key pair and makes ZeroMQ ask us about every connecting publisher (ZAP). A refused
handshake never reaches the PULL socket, so nothing the publisher sends is stored. Two threads
of ours, each owning its sockets as ZeroMQ requires, see the refusals:

- the ZAP handler (`zmq.auth.thread.ThreadAuthenticator`) asks `AllowedKeys` about each client
  key: an unknown key is refused, counted as `unknown_key` and logged with the peer's address;
- a socket monitor sees handshakes that fail before any key is checked: a publisher without
  CURVE (`no_curve`, or `handshake_aborted` when it hangs up first), one holding a wrong
  collector key (`bad_key`), or anything else that is not a CURVE ZeroMQ peer.

Refusals are logged as WARNING, at most once per 10 s per reason and peer, with a running
count; the totals are logged when the collector stops.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator
from zmq.utils.monitor import recv_monitor_message

from prismatic.errors import ConfigError

log = logging.getLogger(__name__)
ZAP_DOMAIN = "*"
WARN_EVERY_S = 10.0
MONITOR_EVENTS = (
    zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
    | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
    | zmq.EVENT_HANDSHAKE_FAILED_AUTH
)


class AllowedKeys:
    """The public keys in `clients/`, re-read whenever the folder's listing changes, so adding
    or revoking a trainer needs no collector restart."""

    def __init__(self, clients_dir: Path) -> None:
        self.clients_dir = clients_dir
        self._stamp: tuple[int, ...] | None = None
        self._keys: set[bytes] = set()

    def keys(self) -> set[bytes]:
        stamp = self._listing_stamp()
        if stamp != self._stamp:
            self._keys = set(zmq.auth.load_certificates(str(self.clients_dir)))
            self._stamp = stamp
        return self._keys

    def _listing_stamp(self) -> tuple[int, ...]:
        files = sorted(self.clients_dir.glob("*.key"))
        return (
            self.clients_dir.stat().st_mtime_ns,
            *(f.stat().st_mtime_ns for f in files),
            len(files),
        )

    def __contains__(self, z85_key: bytes) -> bool:
        return z85_key in self.keys()


class Refusals:
    """Counts refused handshakes by reason and logs them without flooding the log (a refused
    publisher retries every 100 ms). Called from the ZAP and monitor threads."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._last_warning: dict[tuple[str, str], float] = {}

    def add(self, reason: str, peer: str, detail: str) -> None:
        now = time.monotonic()
        with self._lock:
            self.counts[reason] += 1
            count = self.counts[reason]
            key = (reason, peer)
            due = now - self._last_warning.get(key, -1e9) >= WARN_EVERY_S
            if due:
                self._last_warning[key] = now
        if due:
            log.warning(
                "collector: refused a publisher from %s (%s): %s [%d refused so far]",
                peer,
                reason,
                detail,
                count,
            )


def describe_handshake_failure(event: int, value: int) -> tuple[str, str]:
    """(reason, what to tell the user) for a failed handshake the ZAP handler never saw."""
    if event == zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL:
        # `value` is an errno. Which side notices first is a race: a publisher without CURVE
        # often hangs up before the collector reports a mechanism mismatch.
        return "handshake_aborted", (
            f"it hung up during the handshake ({os.strerror(value)}); "
            "a publisher without CURVE keys, or not a ZeroMQ peer"
        )
    if value == zmq.PROTOCOL_ERROR_ZMTP_MECHANISM_MISMATCH:
        return "no_curve", "it did not offer CURVE; give the trainer keys (dynamics.curve_*)"
    if value in (zmq.PROTOCOL_ERROR_ZMTP_CRYPTOGRAPHIC, zmq.PROTOCOL_ERROR_ZMTP_KEY_EXCHANGE):
        return "bad_key", "its CURVE handshake did not decrypt: it holds a wrong collector key"
    return "bad_handshake", f"ZMTP protocol error {value:#x} during the handshake"


class _Authenticator(ThreadAuthenticator):
    """pyzmq's ZAP thread, keeping each request's peer address for the log."""

    peer = "?"

    async def handle_zap_message(self, msg: list[bytes]) -> None:
        # ZAP request frames (RFC 27): version, id, domain, address, identity, mechanism, ...
        if len(msg) > 3:
            self.peer = msg[3].decode("utf-8", "replace") or "?"
        await super().handle_zap_message(msg)


class ServerCurve:
    """The collector's key pair, the allow-list and the threads that enforce and watch it."""

    def __init__(self, public: bytes, secret: bytes, clients_dir: Path) -> None:
        self.public = public
        self.secret = secret
        self.allowed = AllowedKeys(clients_dir)
        self.refusals = Refusals()
        self._auth: _Authenticator | None = None
        self._monitor: threading.Thread | None = None
        self._stop = threading.Event()

    @classmethod
    def from_dir(cls, directory: Path) -> ServerCurve:
        secret_file = directory / "collector.key_secret"
        clients = directory / "clients"
        if not secret_file.is_file() or not clients.is_dir():
            raise ConfigError(
                f"--curve-dir: {str(directory)!r} lacks collector.key_secret or clients/; "
                "make it with `prismatic keys DIR`"
            )
        public, secret = zmq.auth.load_certificate(str(secret_file))
        if secret is None:
            raise ConfigError(f"--curve-dir: {secret_file} holds no secret key")
        return cls(public, secret, clients)

    def apply_server(self, sock: zmq.Socket) -> None:
        """Make `sock` a CURVE server; call before bind, in the thread that owns `sock`."""
        self._start_authenticator(sock.context)
        sock.curve_secretkey = self.secret
        sock.curve_publickey = self.public
        sock.curve_server = True
        self._start_monitor(sock)
        log.info(
            "collector: CURVE on, %d allowed client key(s) in %s",
            len(self.allowed.keys()),
            self.allowed.clients_dir,
        )

    # --- ZAP: is this client key allowed? -----------------------------------------------------

    def _start_authenticator(self, context: zmq.Context) -> None:
        if self._auth is not None:
            return
        self._auth = _Authenticator(context, log=logging.getLogger("collector.zap"))
        self._auth.start()
        self._auth.configure_curve_callback(domain=ZAP_DOMAIN, credentials_provider=self)

    def callback(self, domain: str, z85_key: bytes) -> bool:
        """Asked by the ZAP thread for each CURVE handshake."""
        peer = self._auth.peer if self._auth is not None else "?"
        key = z85_key.decode("ascii", "replace")
        if z85_key in self.allowed:
            log.info("collector: accepted a CURVE publisher from %s (key %s...)", peer, key[:8])
            return True
        detail = f"key {key[:8]}... is not in {self.allowed.clients_dir}"
        self.refusals.add("unknown_key", peer, detail)
        return False

    # --- monitor: handshakes that fail before any key is checked -----------------------------

    def _start_monitor(self, sock: zmq.Socket) -> None:
        endpoint = f"inproc://prismatic-curve-monitor-{id(self)}"
        sock.monitor(endpoint, MONITOR_EVENTS)
        self._monitor = threading.Thread(
            target=self._watch, args=(sock.context, endpoint), name="curve-monitor", daemon=True
        )
        self._monitor.start()

    def _watch(self, context: zmq.Context, endpoint: str) -> None:
        events = context.socket(zmq.PAIR)
        events.connect(endpoint)
        try:
            while not self._stop.is_set():
                if not events.poll(200):
                    continue
                event = recv_monitor_message(events)
                if event["event"] == zmq.EVENT_MONITOR_STOPPED:
                    return
                self._on_event(event)
        finally:
            events.close(linger=0)

    def _on_event(self, event: dict[str, Any]) -> None:
        if event["event"] == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
            return  # the ZAP callback already counted and logged it, with the key and address
        # The monitor names our endpoint, not the peer's address (ZAP never saw this peer).
        where = "a peer of " + event["endpoint"].decode("utf-8", "replace")
        reason, detail = describe_handshake_failure(event["event"], event["value"])
        self.refusals.add(reason, where, detail)

    # --- lifecycle -----------------------------------------------------------------------------

    def stop(self) -> None:
        """Stop both threads (after the PULL socket is closed) and log the totals."""
        self._stop.set()
        if self._monitor is not None:
            self._monitor.join(timeout=2.0)
            self._monitor = None
        if self._auth is not None:
            self._auth.stop()
            self._auth = None
        if self.refusals.counts:
            log.info("collector: CURVE refused %s", dict(self.refusals.counts))
