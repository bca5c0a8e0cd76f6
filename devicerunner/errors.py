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


class StateDirLockedError(DeviceRunnerError):
    """Another daemon holds the state directory (one daemon per state dir)."""

    def __init__(self, state_dir: object, pid: int | None) -> None:
        holder = f"process {pid}" if pid is not None else "another process"
        super().__init__(f"state dir {state_dir} is in use by {holder} (one daemon per state dir)")
        self.state_dir = state_dir
        self.pid = pid


# -- sandbox / apps --------------------------------------------------------


class SandboxError(DeviceRunnerError):
    """A module could not be made into a runnable app."""


class ModuleInvalidError(SandboxError):
    """The bytes are not a valid WebAssembly module (or WAT text)."""


class CompileLimitError(SandboxError):
    """Compiling the module needs more memory or time than the device allows."""


class LinkError(SandboxError):
    """The module imports something its grant does not allow, or that does not exist."""

    def __init__(self, message: str, *, imports: list[str] | None = None) -> None:
        super().__init__(message)
        self.imports = imports or []


class AbiError(SandboxError):
    """The module does not follow App ABI v1 (missing export, wrong signature)."""


class AppInitError(SandboxError):
    """Instantiation or ``dr_init`` failed (trap, non-zero code, memory limit)."""


# -- updates / trust (filled in by devicerunner.trust.verify) ---------------------


class UpdateError(DeviceRunnerError):
    """Base for everything that makes an update refused or fail."""

    reason = "update_failed"
    """A stable, machine-readable cause, used in events and state.json."""


class VerificationError(UpdateError):
    """Untrusted input: the device refuses it and changes nothing."""

    reason = "unverified"


class NoTrustRootError(VerificationError):
    """The device has no trust root yet, so nothing can be verified."""

    reason = "no_trust_root"


class MalformedError(VerificationError):
    """Not parseable as the expected document (bad JSON, missing/extra field, bad type)."""

    reason = "malformed"


class TooLargeError(VerificationError):
    """A size someone else controls exceeds its bound (endless-data attack)."""

    reason = "too_large"


class BadSignatureError(VerificationError):
    """No valid signature from any key trusted for the role (unsigned or wrong key)."""

    reason = "bad_signature"


class ThresholdError(VerificationError):
    """Valid signatures from fewer distinct trusted keys than the role's threshold."""

    reason = "below_threshold"


class RollbackError(VerificationError):
    """Sequence not above the highest the device accepted (or marked bad before)."""

    reason = "rollback"


class ExpiredError(VerificationError):
    """Expired (freeze attack), judged against max(clock, trusted-time floor)."""

    reason = "expired"


class IssuedInFutureError(VerificationError):
    """Dated (``issued``) further ahead than this device's clock can vouch for.

    Refused so that one document from a signing box with a bad clock cannot
    push the trusted-time floor years ahead (and expire everything after it)."""

    reason = "issued_in_future"


class ArtifactMismatchError(VerificationError):
    """Bytes do not match the manifest's size, sha256 or a chunk hash (tamper, mix-and-match)."""

    reason = "artifact_mismatch"


class WrongTargetError(VerificationError):
    """The release is for other hardware, other devices, or another app/channel."""

    reason = "wrong_target"


class CapabilityEscalationError(VerificationError):
    """The manifest asks for capabilities the device policy does not grant that app."""

    reason = "capability_escalation"


class LimitAbovePolicyError(VerificationError):
    """The manifest asks for more resources (memory, CPU, kv, telemetry, module
    size) than the device policy allows that app."""

    reason = "limit_above_policy"


class UnsupportedError(VerificationError):
    """A schema or ABI version this device does not implement."""

    reason = "unsupported"


class RootRotationError(VerificationError):
    """A new trust root that is not a valid successor of the current one."""

    reason = "bad_root"


# -- transport -------------------------------------------------------------


class TransportError(DeviceRunnerError):
    """The network or a local channel failed; retrying may help."""
