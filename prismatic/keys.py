"""ZeroMQ CURVE keys: `prismatic keys DIR` writes them; collector and trainers read them.

Files are ZeroMQ certificates (`NAME.key` public, `NAME.key_secret` secret) made by
`zmq.auth.create_certificates`. Environment variables override the config:
PRISMATIC_CURVE_SERVER_KEY (the collector's public key file or Z85 text) and
PRISMATIC_CURVE_CLIENT_KEY_FILE (a trainer's `.key_secret` file).
"""

from __future__ import annotations

import os
from pathlib import Path

import zmq
import zmq.auth

from prismatic.config import DynamicsConfig
from prismatic.errors import ConfigError

SERVER_KEY_ENV = "PRISMATIC_CURVE_SERVER_KEY"
CLIENT_KEY_ENV = "PRISMATIC_CURVE_CLIENT_KEY_FILE"


def generate(directory: Path, clients: list[str]) -> list[Path]:
    if not zmq.has("curve"):
        raise ConfigError("keys: this libzmq was built without CURVE support")
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "clients").mkdir(exist_ok=True)
    written = []
    for name in ["collector", *clients]:
        public, secret = zmq.auth.create_certificates(str(directory), name)
        written += [Path(public), Path(secret)]
        if name != "collector":
            target = directory / "clients" / Path(public).name
            target.write_bytes(Path(public).read_bytes())
    return written


def load_public(text_or_path: str, what: str) -> bytes:
    path = Path(text_or_path)
    if path.is_file():
        public, _ = zmq.auth.load_certificate(str(path))
        return public
    if len(text_or_path) == 40:
        return text_or_path.encode("ascii")
    raise ConfigError(f"{what}: {text_or_path!r} is neither a key file nor a 40-character Z85 key")


def load_secret_pair(path_text: str, what: str) -> tuple[bytes, bytes]:
    path = Path(path_text)
    if not path.is_file():
        raise ConfigError(f"{what}: {path_text!r} is not a file; make keys with `prismatic keys`")
    public, secret = zmq.auth.load_certificate(str(path))
    if secret is None:
        raise ConfigError(f"{what}: {path_text!r} holds no secret key; pass the .key_secret file")
    return public, secret


def client_curve(cfg: DynamicsConfig) -> tuple[bytes, bytes, bytes] | None:
    """(server public, client public, client secret), or None when CURVE is off."""
    server = os.environ.get(SERVER_KEY_ENV) or cfg.curve_server_key
    client_file = os.environ.get(CLIENT_KEY_ENV) or cfg.curve_client_key_file
    if not server and not client_file:
        return None
    if not (server and client_file):
        raise ConfigError(
            "dynamics.curve_server_key and dynamics.curve_client_key_file: set both or neither"
        )
    public, secret = load_secret_pair(client_file, "dynamics.curve_client_key_file")
    return load_public(server, "dynamics.curve_server_key"), public, secret
