"""The signed app configuration document, and its verification on a device.

A config document is an envelope like a release manifest, signed by the
``config`` role the trust root names::

    {"signed": {"_type": "config", "schema": 1, "app": "thermostat",
                "channel": "stable", "version": 7,
                "settings": {"setpoint": "21.5", "hysteresis": "0.5"},
                "targets": {"hardware": ["rpi4"], "devices": [...],
                            "rollout": {"percent": 100, "salt": "..."}},
                "health": {...},            # optional: the trial's rules
                "issued": "...", "expires": "..."},
     "signatures": [...]}

This module is pure: bytes, the device's trusted state and ``now`` in;
a ``ConfigDoc`` or one typed VerificationError per cause out. It never
opens files or sockets and never reads the clock.

Order of checks (each runs only on what passed the one before): size bound
-> envelope -> a threshold of distinct ``config`` keys of the current root
-> fields (settings bounded) -> root not expired -> document not expired ->
app configured here, channel, hardware and device targeting -> version not
refused (trialled and rolled back here) and above the highest committed.

Settings are canonical JSON like every signed object, so they hold no
floats: a decimal is written as a string (``"21.5"``); the ``config`` host
capability converts it for the app.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from devicerunner.errors import MalformedError, RollbackError
from devicerunner.trust.canonical import NotCanonicalError, canonical
from devicerunner.trust.manifest import (
    ID_RE,
    NAME_RE,
    SCHEMA,
    Envelope,
    Health,
    Root,
    Targets,
    _Fields,
    _schema,
    format_time,
    parse_envelope,
    parse_health,
    parse_time,
)
from devicerunner.trust.verify import DeviceIdentity, check_target, check_threshold, check_times

MAX_CONFIG_BYTES = 16 * 1024
"""The whole envelope; checked before it is parsed."""
MAX_SETTINGS_BYTES = 8 * 1024
"""The canonical form of ``settings``: what an app can be handed at most."""
MAX_SETTINGS_KEYS = 128
MAX_VERSION = 2**53
KEY_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
ROLE = "config"


@dataclass(frozen=True)
class ConfigDoc:
    app: str
    channel: str
    version: int
    """Monotonic per (app, channel): a device never goes back to a lower one
    except by rolling back a trial."""
    settings: Mapping[str, Any]
    settings_bytes: bytes
    """Canonical JSON of ``settings``: what ``config.read`` hands the app."""
    targets: Targets
    health: Health | None
    """The trial's rules; None: those of the running release."""
    issued: int
    expires: int
    digest: str
    """sha256 of the envelope bytes: how a refused document is remembered."""
    envelope: Envelope = field(repr=False, compare=False)
    raw: bytes = field(repr=False, compare=False, default=b"")


def digest_of(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def parse_config(data: bytes) -> ConfigDoc:
    """Parse without checking signatures (``verify_config`` checks them first)."""
    return config_from_envelope(parse_envelope(data, MAX_CONFIG_BYTES, "config"), bytes(data))


def config_from_envelope(env: Envelope, raw: bytes) -> ConfigDoc:
    f = _Fields(
        env.signed,
        "config",
        ("_type", "schema", "app", "channel", "version", "settings", "targets", "issued", "expires"),
        ("health",),
    )
    _schema(f, "config")
    settings = f.get("settings")
    if not isinstance(settings, dict) or len(settings) > MAX_SETTINGS_KEYS:
        raise MalformedError(f"config.settings: must be an object of at most {MAX_SETTINGS_KEYS} keys")
    for k in settings:
        if not KEY_RE.match(k):
            raise MalformedError(f"config.settings: key {k[:70]!r} is not [A-Za-z0-9_.-]{{1,64}}")
    try:
        settings_bytes = canonical(settings)
    except NotCanonicalError as e:
        raise MalformedError(f"config.settings: {e}") from e
    if len(settings_bytes) > MAX_SETTINGS_BYTES:
        raise MalformedError(
            f"config.settings: {len(settings_bytes)} bytes, the limit is {MAX_SETTINGS_BYTES}"
        )
    tf = _Fields(f.get("targets"), "config.targets", ("hardware",), ("devices", "rollout"))
    hardware = tf.text_list("hardware", ID_RE)
    if not hardware:
        raise MalformedError("config.targets.hardware: must name at least one hardware id")
    rf = _Fields(
        tf.get("rollout", {"percent": 100, "salt": ""}), "config.targets.rollout", ("percent", "salt")
    )
    targets = Targets(
        hardware,
        tf.text_list("devices", ID_RE, max_n=10_000),
        rf.integer("percent", 0, 100),
        rf.text("salt", re.compile(r"^[A-Za-z0-9_.-]{0,64}$")),
    )
    health = None
    if f.get("health") is not None:
        health = parse_health(f.get("health"), "config.health")
    issued = parse_time(f.get("issued"), "config.issued")
    expires = parse_time(f.get("expires"), "config.expires")
    if expires <= issued:
        raise MalformedError("config.expires: must be after issued")
    return ConfigDoc(
        app=f.text("app", NAME_RE),
        channel=f.text("channel", NAME_RE),
        version=f.integer("version", 1, MAX_VERSION),
        settings=settings,
        settings_bytes=settings_bytes,
        targets=targets,
        health=health,
        issued=issued,
        expires=expires,
        digest=digest_of(raw),
        envelope=env,
        raw=raw,
    )


def config_signed(
    *,
    app: str,
    version: int,
    settings: Mapping[str, Any],
    hardware: list[str] | tuple[str, ...],
    issued: int,
    expires: int,
    channel: str = "stable",
    devices: list[str] | tuple[str, ...] = (),
    rollout_percent: int = 100,
    rollout_salt: str = "",
    health: Health | None = None,
) -> dict[str, Any]:
    """The ``signed`` part of a config document (the one writer of the format)."""
    targets: dict[str, Any] = {
        "hardware": list(hardware),
        "rollout": {"percent": rollout_percent, "salt": rollout_salt or f"{app}-config-{version}"},
    }
    if devices:
        targets["devices"] = list(devices)
    doc: dict[str, Any] = {
        "_type": "config",
        "schema": SCHEMA,
        "app": app,
        "channel": channel,
        "version": version,
        "settings": dict(settings),
        "targets": targets,
        "issued": format_time(issued),
        "expires": format_time(expires),
    }
    if health is not None:
        doc["health"] = {
            "trial_ticks": health.trial_ticks,
            "trial_seconds": health.trial_seconds,
            "max_traps": health.max_traps,
            "max_overruns": health.max_overruns,
            "max_broker_loss_s": health.max_broker_loss_s,
        }
    return doc


@dataclass(frozen=True)
class ConfigHistory:
    """What a device decided about one app's configs before."""

    highest_version: int = 0
    """The highest version committed (the anti-rollback floor)."""
    bad_versions: frozenset[int] = frozenset()
    """Versions trialled on this device and rolled back: refused for ever."""


def verify_config(
    data: bytes,
    *,
    root: Root,
    device: DeviceIdentity,
    channel: str | None,
    history: ConfigHistory,
    time_floor: int,
    now: int,
) -> ConfigDoc:
    env = parse_envelope(data, MAX_CONFIG_BYTES, "config")
    check_threshold(env, root, ROLE, "config document")
    doc = config_from_envelope(env, bytes(data))
    what = f"config {doc.app} v{doc.version}"
    check_times(what, doc.issued, doc.expires, root=root, now=now, time_floor=time_floor)
    check_target("config", doc.app, doc.channel, doc.targets, device=device, channel=channel)
    if doc.version in history.bad_versions:
        raise RollbackError(f"config v{doc.version} of {doc.app} failed its trial here and was rolled back")
    if doc.version <= history.highest_version:
        raise RollbackError(
            f"config v{doc.version} is not above v{history.highest_version}, the one {doc.app} runs"
        )
    return doc
