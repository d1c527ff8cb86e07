"""Prismatic Dynamics: shared pieces (config, wire format, database schema, command line)."""

__version__ = "0.1.0"
