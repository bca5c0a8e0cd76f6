"""Exception families, typed by cause.

Invariant: a caller can tell *why* something failed from the exception's
class alone. Configuration mistakes, sandbox/app failures, untrusted
updates and transport failures are separate families; foreign exceptions
(OSError, wasmtime errors, paho return codes) are translated once, at the
boundary that met them, and never leak as themselves from public APIs.
"""

from __future__ import annotations


class DeviceRunnerError(Exception):
    """Base of every error this project raises on purpose."""


# -- configuration ---------------------------------------------------------


class ConfigError(DeviceRunnerError):
    """device.toml (or a CLI option standing in for it) is invalid.

    The message names the key, e.g. ``sensors.temp.driver: unknown driver 'x'``.
    """


# -- sandbox / apps --------------------------------------------------------


class SandboxError(DeviceRunnerError):
    """A module could not be made into a runnable app."""


class ModuleInvalidError(SandboxError):
    """The bytes are not a valid WebAssembly module (or WAT text)."""


class LinkError(SandboxError):
    """The module imports something its grant does not allow, or that does not exist."""

    def __init__(self, message: str, *, imports: list[str] | None = None) -> None:
        super().__init__(message)
        self.imports = imports or []


class AbiError(SandboxError):
    """The module does not follow App ABI v1 (missing export, wrong signature)."""


class AppInitError(SandboxError):
    """Instantiation or ``dr_init`` failed (trap, non-zero code, memory limit)."""


# -- updates / trust (filled in by devicerunner.trust) ---------------------


class UpdateError(DeviceRunnerError):
    """Base for everything that makes an update refused or fail."""


# -- transport -------------------------------------------------------------


class TransportError(DeviceRunnerError):
    """The network or a local channel failed; retrying may help."""
