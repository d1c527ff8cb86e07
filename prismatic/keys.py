"""ZeroMQ CURVE keys: `prismatic keys DIR` writes them; collector and trainers read them.

`prismatic keys DIR --clients NAME ...` makes ZeroMQ certificates (`NAME.key` public,
`NAME.key_secret` secret, readable by its owner only):

    DIR/collector.key, DIR/collector.key_secret    the collector's pair (--curve-dir DIR)
    DIR/NAME.key, DIR/NAME.key_secret              one pair per trainer (or group of trainers)
    DIR/clients/NAME.key                           the allow-list: public keys the collector takes

Run it again with new names to add trainers: the collector's pair is kept, and an existing
client is never overwritten (its trainers would be locked out). Removing `clients/NAME.key`
revokes a client; the collector re-reads `clients/` on the next connection attempt.

Trainers take their keys from the config (dynamics.curve_server_key: the collector's public
key file or its 40-character Z85 text; dynamics.curve_client_key_file: their `.key_secret`),
or from the environment, which wins: PRISMATIC_CURVE_SERVER_KEY and
PRISMATIC_CURVE_CLIENT_KEY_FILE.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import zmq
import zmq.auth
from zmq.utils import z85

from prismatic.config import DynamicsConfig
from prismatic.errors import ConfigError

SERVER_KEY_ENV = "PRISMATIC_CURVE_SERVER_KEY"
CLIENT_KEY_ENV = "PRISMATIC_CURVE_CLIENT_KEY_FILE"
COLLECTOR_NAME = "collector"
CLIENTS_DIR = "clients"
Z85_KEY_LENGTH = 40
_CLIENT_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def generate(directory: Path, clients: list[str]) -> list[Path]:
    """Write the collector's pair (unless present) and one pair per new client; the paths."""
    if not zmq.has("curve"):
        raise ConfigError("keys: this libzmq was built without CURVE support")
    _check_client_names(directory, clients)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / CLIENTS_DIR).mkdir(exist_ok=True)
    written = []
    if not (directory / f"{COLLECTOR_NAME}.key_secret").is_file():
        written += _create_pair(directory, COLLECTOR_NAME)
    for name in clients:
        public, secret = _create_pair(directory, name)
        allowed = directory / CLIENTS_DIR / public.name
        allowed.write_bytes(public.read_bytes())
        written += [public, secret, allowed]
    return written


def _check_client_names(directory: Path, clients: list[str]) -> None:
    for name in clients:
        if not _CLIENT_NAME_RE.match(name) or name == COLLECTOR_NAME:
            raise ConfigError(
                f"--clients: {name!r} is not accepted; expected letters, digits, '.', '_' or '-' "
                f"(up to 64, not {COLLECTOR_NAME!r})"
            )
        if (directory / f"{name}.key_secret").exists():
            raise ConfigError(
                f"--clients: {name!r} already has keys in {directory}; pick a new name "
                f"(or delete {name}.key* and clients/{name}.key to replace them)"
            )
    if len(set(clients)) != len(clients):
        raise ConfigError(f"--clients: {' '.join(clients)!r} names a client twice")


def _create_pair(directory: Path, name: str) -> list[Path]:
    # The secret file must never exist with loose permissions, not even for a moment.
    old_umask = os.umask(0o077)
    try:
        public, secret = zmq.auth.create_certificates(str(directory), name)
    finally:
        os.umask(old_umask)
    os.chmod(public, 0o644)
    return [Path(public), Path(secret)]


def load_public(text_or_path: str, what: str) -> bytes:
    """A public key from a certificate file or from its 40-character Z85 text."""
    path = Path(text_or_path)
    if path.is_file():
        try:
            public, _ = zmq.auth.load_certificate(str(path))
        except (OSError, ValueError) as exc:
            raise ConfigError(f"{what}: {text_or_path!r} is not a ZeroMQ key file ({exc})") from exc
        return public
    if len(text_or_path) == Z85_KEY_LENGTH and _is_z85(text_or_path):
        return text_or_path.encode("ascii")
    raise ConfigError(f"{what}: {text_or_path!r} is neither a key file nor a 40-character Z85 key")


def _is_z85(text: str) -> bool:
    try:
        return len(z85.decode(text)) == 32
    except (ValueError, KeyError, TypeError, UnicodeEncodeError):
        return False


def load_secret_pair(path_text: str, what: str) -> tuple[bytes, bytes]:
    """(public, secret) from a `.key_secret` file."""
    path = Path(path_text)
    if not path.is_file():
        raise ConfigError(f"{what}: {path_text!r} is not a file; make keys with `prismatic keys`")
    try:
        public, secret = zmq.auth.load_certificate(str(path))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{what}: {path_text!r} is not a ZeroMQ key file ({exc})") from exc
    if secret is None:
        raise ConfigError(f"{what}: {path_text!r} holds no secret key; pass the .key_secret file")
    return public, secret


def client_curve(cfg: DynamicsConfig) -> tuple[bytes, bytes, bytes] | None:
    """(server public, client public, client secret), or None when CURVE is off.

    The environment wins over the config, key by key."""
    server = os.environ.get(SERVER_KEY_ENV) or cfg.curve_server_key
    client_file = os.environ.get(CLIENT_KEY_ENV) or cfg.curve_client_key_file
    if not server and not client_file:
        return None
    if not (server and client_file):
        raise ConfigError(
            "dynamics.curve_server_key and dynamics.curve_client_key_file: set both or neither "
            f"(or {SERVER_KEY_ENV} and {CLIENT_KEY_ENV})"
        )
    public, secret = load_secret_pair(client_file, "dynamics.curve_client_key_file")
    return load_public(server, "dynamics.curve_server_key"), public, secret
