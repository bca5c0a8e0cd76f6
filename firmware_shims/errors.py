"""Errors raised by shims. The config layer maps them onto ConfigError with
the full key path (``sensors.<name>.<key>``)."""

from __future__ import annotations


class ShimConfigError(ValueError):
    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"{key}: {message}")
        self.key = key
        self.message = message


class MissingDependencyError(RuntimeError):
    """An optional driver's package is not installed; the message names it."""
