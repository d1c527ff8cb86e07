"""CURVE on the collector's socket: only trainers whose public key is allowed may write.

ZeroMQ's ZAP handler (`zmq.auth.thread.ThreadAuthenticator`) checks each connecting client's
key against the `clients/` folder made by `prismatic keys`; a refused handshake never reaches
the PULL socket, so nothing it sends is stored.
"""

from __future__ import annotations

import logging
from pathlib import Path

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

from prismatic.errors import ConfigError

log = logging.getLogger(__name__)


class ServerCurve:
    def __init__(self, public: bytes, secret: bytes, clients_dir: Path) -> None:
        self.public = public
        self.secret = secret
        self.clients_dir = clients_dir
        self._auth: ThreadAuthenticator | None = None

    @classmethod
    def from_dir(cls, directory: Path) -> ServerCurve:
        secret_file = directory / "collector.key_secret"
        clients = directory / "clients"
        if not secret_file.is_file() or not clients.is_dir():
            raise ConfigError(f"--curve-dir: {str(directory)!r} lacks collector.key_secret or "
                              "clients/; make it with `prismatic keys DIR`")
        public, secret = zmq.auth.load_certificate(str(secret_file))
        if secret is None:
            raise ConfigError(f"--curve-dir: {secret_file} holds no secret key")
        return cls(public, secret, clients)

    def apply_server(self, sock: zmq.Socket) -> None:
        if self._auth is None:
            self._auth = ThreadAuthenticator(sock.context, log=logging.getLogger("collector.auth"))
            self._auth.start()
            self._auth.configure_curve(domain="*", location=str(self.clients_dir))
        sock.curve_secretkey = self.secret
        sock.curve_publickey = self.public
        sock.curve_server = True
        allowed = len(list(self.clients_dir.glob("*.key")))
        log.info("collector: CURVE on, %d allowed client key(s) in %s", allowed, self.clients_dir)

    def stop(self) -> None:
        if self._auth is not None:
            self._auth.stop()
            self._auth = None
