"""What devices report (status and events), validated on read.

A device may publish anything on its own topics (docs/operations.md: the
ACL lets it write its status and events). Operator tools (``fleet
status``, ``rollout``, the simulator's watcher) read those messages through
``read_status`` / ``read_event`` only: a message that is not a well-formed
document becomes a ``MalformedReport`` naming the device and the reason,
never an exception in a caller or in paho's network thread. Pure.
"""

from __future__ import annotations

import json
import logging
import math
import threading
from dataclasses import dataclass, field
from typing import Any

from devicerunner.errors import DeviceRunnerError
from devicerunner.runtime.strict import too_deep
from devicerunner.transport import topics

log = logging.getLogger(__name__)

MAX_PAYLOAD = 64 * 1024
"""A status or event larger than this is not read (a real one is well under 4 KiB)."""
MAX_APPS = 64
MAX_DEPTH = 32
"""Nesting a report may have (a real one has 5); checked before parsing."""
MAX_TEXT = 1000
"""Longer strings (a last error, a reason) are cut here, visibly."""
PHASES = frozenset(
    {
        "IDLE",
        "DOWNLOADING",
        "DOWNLOADED",
        "STAGED",
        "TRIAL",
        "COMMITTED",
        "REJECTED",
        "ROLLED_BACK",
        "FAILED",
        "ROOT_ROTATED",
        "CONFIG_STAGED",
        "CONFIG_TRIAL",
        "CONFIG_COMMITTED",
        "CONFIG_ROLLED_BACK",
        "CONFIG_REJECTED",
        "CONFIG_FAILED",
    }
)
CONFIG_PHASES = frozenset({"IDLE", "STAGED", "TRIAL", "COMMITTED", "ROLLED_BACK", "REJECTED"})
"""An app's config flow (``config_phase`` in its status)."""


class MalformedReport(DeviceRunnerError):
    """A device's status or event that is not a well-formed document."""

    def __init__(self, device: str, kind: str, why: str) -> None:
        super().__init__(f"device {device}: malformed {kind}: {why}")
        self.device, self.kind, self.why = device, kind, why


def _text(v: Any) -> str:
    s = v if isinstance(v, str) else str(v)
    return s if len(s) <= MAX_TEXT else s[: MAX_TEXT - 1] + "…"


class _Doc:
    """Typed reads from one JSON object; the first bad field raises."""

    def __init__(self, device: str, kind: str, obj: Any, where: str = "") -> None:
        if not isinstance(obj, dict):
            what = where.rstrip(".") or "the document"
            raise MalformedReport(device, kind, f"{what} is {type(obj).__name__}, not an object")
        self.device, self.kind, self.obj, self.where = device, kind, obj, where

    def _bad(self, key: str, want: str) -> MalformedReport:
        v = self.obj[key]
        shown = json.dumps(v)[:40] if not isinstance(v, str) else repr(v[:40])
        return MalformedReport(self.device, self.kind, f"{self.where}{key} is {shown}, not {want}")

    def str_(self, key: str, default: str | None = None) -> str | None:
        v = self.obj.get(key)
        if v is None:
            return default
        if not isinstance(v, str):
            raise self._bad(key, "a string")
        return _text(v)

    def int_(self, key: str, default: int | None = None) -> int | None:
        v = self.obj.get(key)
        if v is None:
            return default
        if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < 2**63:
            raise self._bad(key, "a non-negative integer")
        return v

    def num(self, key: str) -> float | None:
        v = self.obj.get(key)
        if v is None:
            return None
        if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
            raise self._bad(key, "a number")
        return float(v)

    def bool_(self, key: str, default: bool = False) -> bool:
        v = self.obj.get(key)
        if v is None:
            return default
        if not isinstance(v, bool):
            raise self._bad(key, "true or false")
        return v

    def obj_(self, key: str) -> dict[str, Any] | None:
        v = self.obj.get(key)
        if v is None:
            return None
        if not isinstance(v, dict):
            raise self._bad(key, "an object")
        return v


@dataclass(frozen=True)
class AppReport:
    version: str | None
    sequence: int
    phase: str
    pending_sequence: int | None = None
    pending_version: str | None = None
    last_error: str | None = None
    last_reason: str | None = None
    last_error_sequence: int | None = None
    running: bool = False
    trial: dict[str, float] | None = None
    config_version: int | None = None
    config_phase: str | None = None
    config_on_trial: int | None = None
    config_last_error: str | None = None
    messages: dict[str, int] | None = None

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass(frozen=True)
class DeviceStatus:
    """A device's retained status document (docs/mqtt.md), as read."""

    device: str
    hardware: str
    online: bool
    ts: float | None = None
    root_version: int | None = None
    apps: dict[str, AppReport] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d["apps"] = {k: a.as_dict() for k, a in self.apps.items()}
        return d


@dataclass(frozen=True)
class DeviceEvent:
    """One update event a device published (docs/mqtt.md), as read."""

    device: str
    app: str
    phase: str
    ts: float | None = None
    sequence: int | None = None
    version: str | None = None
    reason: str | None = None
    reason_text: str | None = None
    document: str | None = None
    """``"rollout"`` when the event is about a rollout document, not a release."""
    config_version: int | None = None
    """Set on ``CONFIG_*`` events (a signed app configuration), never with ``sequence``."""
    rollout_version: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    """Other scalar fields (``seconds``, ``chunks``, ``attempt`` ...)."""

    def as_dict(self) -> dict[str, Any]:
        d = {k: v for k, v in self.__dict__.items() if k != "extra" and v is not None}
        return {**self.extra, **d}


def _load(device: str, kind: str, payload: bytes) -> dict[str, Any]:
    if len(payload) > MAX_PAYLOAD:
        raise MalformedReport(device, kind, f"{len(payload)} bytes, over the {MAX_PAYLOAD}-byte limit")
    if too_deep(payload, MAX_DEPTH):
        raise MalformedReport(device, kind, f"nested deeper than {MAX_DEPTH}")
    try:
        obj = json.loads(payload.decode("utf-8"))
    except UnicodeDecodeError:
        raise MalformedReport(device, kind, "not UTF-8 text") from None
    except RecursionError:
        raise MalformedReport(device, kind, "nested too deeply") from None
    except ValueError as e:
        raise MalformedReport(device, kind, f"not JSON ({str(e)[:60]})") from None
    d = _Doc(device, kind, obj)
    claimed = d.str_("device")
    if claimed is not None and claimed != device:
        raise MalformedReport(device, kind, f"claims to be device {claimed!r}")
    return obj  # type: ignore[no-any-return]


def _app(device: str, name: str, obj: Any) -> AppReport:
    a = _Doc(device, "status", obj, f"apps.{name}.")
    phase = a.str_("phase", "IDLE") or "IDLE"
    if phase not in PHASES:
        raise MalformedReport(device, "status", f"apps.{name}.phase {phase[:40]!r} is not a phase")
    trial = a.obj_("trial")
    if trial is not None:
        t = _Doc(device, "status", trial, f"apps.{name}.trial.")
        trial = {k: t.num(k) or 0.0 for k in ("ticks", "of_ticks", "seconds", "of_seconds")}
    config_phase = a.str_("config_phase")
    if config_phase is not None and config_phase not in CONFIG_PHASES:
        why = f"apps.{name}.config_phase {config_phase[:40]!r} is not a phase"
        raise MalformedReport(device, "status", why)
    messages = a.obj_("messages")
    if messages is not None:
        mdoc = _Doc(device, "status", messages, f"apps.{name}.messages.")
        messages = {k[:64]: mdoc.int_(k) or 0 for k in list(messages)[:16]}
    return AppReport(
        version=a.str_("version"),
        sequence=a.int_("sequence", 0) or 0,
        phase=phase,
        pending_sequence=a.int_("pending_sequence"),
        pending_version=a.str_("pending_version"),
        last_error=a.str_("last_error"),
        last_reason=a.str_("last_reason"),
        last_error_sequence=a.int_("last_error_sequence"),
        running=a.bool_("running"),
        trial=trial,
        config_version=a.int_("config_version"),
        config_phase=config_phase,
        config_on_trial=a.int_("config_on_trial"),
        config_last_error=a.str_("config_last_error"),
        messages=messages,
    )


def read_status(device: str, payload: bytes) -> DeviceStatus:
    """Raises ``MalformedReport``. A last will (``{"online": false}`` and little else) is valid."""
    d = _Doc(device, "status", _load(device, "status", payload))
    apps_obj = d.obj_("apps") or {}
    if len(apps_obj) > MAX_APPS:
        raise MalformedReport(device, "status", f"{len(apps_obj)} apps, over the limit of {MAX_APPS}")
    apps = {_text(k): _app(device, k, v) for k, v in apps_obj.items()}
    return DeviceStatus(
        device=device,
        hardware=d.str_("hardware", "?") or "?",
        online=d.bool_("online"),
        ts=d.num("ts"),
        root_version=d.int_("root_version"),
        apps=apps,
    )


def read_event(device: str, payload: bytes) -> DeviceEvent:
    """Raises ``MalformedReport``."""
    obj = _load(device, "event", payload)
    d = _Doc(device, "event", obj)
    app, phase = d.str_("app"), d.str_("phase")
    if not app or not phase:
        raise MalformedReport(device, "event", "no app or no phase")
    if phase not in PHASES:
        raise MalformedReport(device, "event", f"phase {phase[:40]!r} is not a phase")
    known = {"device", "app", "phase", "ts", "sequence", "version", "reason", "reason_text", "document"}
    known |= {"rollout_version", "config_version"}
    extra = {
        k[:64]: v
        for k, v in list(obj.items())[:32]
        if k not in known
        and (isinstance(v, int | bool) or (isinstance(v, float) and math.isfinite(v)) or isinstance(v, str))
    }
    extra = {k: _text(v) if isinstance(v, str) else v for k, v in extra.items()}
    return DeviceEvent(
        device=device,
        app=app,
        phase=phase,
        ts=d.num("ts"),
        sequence=d.int_("sequence"),
        version=d.str_("version"),
        reason=d.str_("reason"),
        reason_text=d.str_("reason_text"),
        document=d.str_("document"),
        rollout_version=d.int_("rollout_version"),
        config_version=d.int_("config_version"),
        extra=extra,
    )


class Reader:
    """Reads device messages off the broker for an operator tool: returns a
    ``DeviceStatus`` / ``DeviceEvent``, or None for anything else; a malformed
    message is logged once per device and kind (a device repeating it does
    not flood the operator's terminal). Thread-safe."""

    def __init__(self, prefix: str, logger: logging.Logger = log) -> None:
        self.p = prefix
        self.log = logger
        self.warned: set[tuple[str, str]] = set()
        self.malformed = 0
        self._lock = threading.Lock()

    def read(self, topic: str, payload: bytes) -> DeviceStatus | DeviceEvent | None:
        where = topics.parse_device_topic(self.p, topic)
        if where is None:
            return None
        device, kind = where
        if kind == "status" and not payload:
            return None  # a cleared retained status
        try:
            return read_status(device, payload) if kind == "status" else read_event(device, payload)
        except MalformedReport as e:
            with self._lock:
                self.malformed += 1
                first = (device, kind) not in self.warned
                self.warned.add((device, kind))
            if first:
                self.log.warning("ignoring a malformed %s from device %s: %s", e.kind, device, e.why)
            return None
