"""Every exception this project raises on purpose. Each message names what to change."""


class PrismaticError(Exception):
    """Base class: an error a user can act on; the CLI prints it in one line and exits 2."""


class ConfigError(PrismaticError):
    """A config file, an override or a flag holds a key or value that is not accepted."""


class DataError(PrismaticError):
    """The training text could not be found or is too short to train on."""


class ProtocolError(PrismaticError):
    """A message on the wire is malformed; `reason` is the counted rejection reason."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


class SchemaError(PrismaticError):
    """A dynamics.db has a schema this version does not recognise."""


class ProbeError(PrismaticError):
    """Nothing can be probed: the model holds no Prismatic layer, or its reporter is closed."""


class ExpertShapeError(PrismaticError, ValueError):
    """A Prismatic layer's expert returned an output whose shape is not its input's."""
