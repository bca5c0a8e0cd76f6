"""device.toml -> typed, validated configuration.

Invariants: loading either returns a fully valid DeviceConfig or raises
ConfigError whose message starts with the dotted key at fault
(``apps.thermo.tick_interval_ms: must be > 0``). Unknown keys are errors
(a typo must not silently fall back to a default). Relative paths are
resolved against the config file's directory. Driver options of sensors
and actuators are validated by the driver itself when the daemon builds
them, before anything starts (see devicerunner.device.daemon).

This module reads one file (``load``); ``parse`` is pure.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from devicerunner.errors import ConfigError

KNOWN_CAPABILITIES = ("log", "clock", "sensors", "actuators", "kv", "telemetry", "wasi")
NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")


@dataclass(frozen=True)
class AppConfig:
    name: str
    policy: frozenset[str]
    """The most this app may ever be granted on this device."""
    module: Path | None = None
    """A local module to run when no update has been installed (bootstrap)."""
    channel: str = "stable"
    sensors: tuple[str, ...] | None = None
    actuators: tuple[str, ...] | None = None
    tick_interval_ms: int = 100
    tick_budget_ms: int = 10
    memory_limit_bytes: int = 16 * 1024 * 1024
    kv_quota_bytes: int = 64 * 1024
    telemetry_rate_per_s: float = 5.0
    telemetry_burst: int = 20
    health_interval_ms: int = 1000


@dataclass(frozen=True)
class BrokerConfig:
    url: str = "mqtt://127.0.0.1:1883"
    prefix: str = "dr/v1"
    username: str | None = None
    password: str | None = None
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    keepalive_s: int = 30
    reconnect_min_s: float = 0.5
    reconnect_max_s: float = 30.0
    download_stall_s: float = 30.0


@dataclass(frozen=True)
class DeviceConfig:
    id: str
    hardware: str
    state_dir: Path
    apps: Mapping[str, AppConfig]
    sensors: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    actuators: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    broker: BrokerConfig | None = None
    log_format: str = "text"
    trial_attempts: int = 1
    trust_root: Path | None = None
    sysfs_root: Path = Path("/sys")
    source: Path | None = None


class _Table:
    """Typed reads from one TOML table; remembers what was read."""

    def __init__(self, path: str, table: Any) -> None:
        if not isinstance(table, dict):
            raise ConfigError(f"{path}: must be a table")
        self.path = path
        self.t: dict[str, Any] = table
        self.used: set[str] = set()

    def key(self, k: str) -> str:
        return f"{self.path}.{k}" if self.path else k

    def get(self, k: str) -> Any:
        self.used.add(k)
        return self.t.get(k)

    def text(self, k: str, default: str | None = None, pattern: re.Pattern[str] | None = None) -> str:
        v = self.get(k)
        if v is None:
            if default is None:
                raise ConfigError(f"{self.key(k)}: is required")
            return default
        if not isinstance(v, str) or not v:
            raise ConfigError(f"{self.key(k)}: must be a non-empty string")
        if pattern is not None and not pattern.match(v):
            raise ConfigError(f"{self.key(k)}: {v!r} does not match {pattern.pattern}")
        return v

    def opt_text(self, k: str) -> str | None:
        return None if self.get(k) is None else self.text(k)

    def integer(self, k: str, default: int, lo: int = 1, hi: int = 2**62) -> int:
        v = self.get(k)
        if v is None:
            return default
        if isinstance(v, bool) or not isinstance(v, int):
            raise ConfigError(f"{self.key(k)}: must be an integer, got {v!r}")
        if not lo <= v <= hi:
            raise ConfigError(f"{self.key(k)}: must be between {lo} and {hi}, got {v}")
        return v

    def number(self, k: str, default: float, lo: float = 0.0) -> float:
        v = self.get(k)
        if v is None:
            return default
        if isinstance(v, bool) or not isinstance(v, int | float):
            raise ConfigError(f"{self.key(k)}: must be a number, got {v!r}")
        if v < lo:
            raise ConfigError(f"{self.key(k)}: must be >= {lo}, got {v}")
        return float(v)

    def str_list(self, k: str) -> tuple[str, ...] | None:
        v = self.get(k)
        if v is None:
            return None
        if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
            raise ConfigError(f"{self.key(k)}: must be a list of strings")
        return tuple(v)

    def path_(self, k: str, base: Path) -> Path | None:
        v = self.opt_text(k)
        return None if v is None else (base / v).resolve()

    def done(self) -> None:
        unknown = sorted(set(self.t) - self.used)
        if unknown:
            raise ConfigError(f"{self.key(unknown[0])}: unknown key")


def parse_capabilities(key: str, caps: tuple[str, ...] | list[str]) -> frozenset[str]:
    for c in caps:
        if c not in KNOWN_CAPABILITIES:
            raise ConfigError(f"{key}: unknown capability {c!r} (known: {', '.join(KNOWN_CAPABILITIES)})")
    return frozenset(caps)


def _app(name: str, t: _Table, base: Path) -> AppConfig:
    if not NAME_RE.match(name):
        raise ConfigError(f"apps.{name}: app names are lowercase [a-z0-9_-], at most 63 chars")
    policy = t.str_list("policy")
    if policy is None:
        raise ConfigError(f"{t.key('policy')}: is required (the capabilities this app may have)")
    interval = t.integer("tick_interval_ms", 100, 1, 3_600_000)
    cfg = AppConfig(
        name=name,
        policy=parse_capabilities(t.key("policy"), policy),
        module=t.path_("module", base),
        channel=t.text("channel", "stable", NAME_RE),
        sensors=t.str_list("sensors"),
        actuators=t.str_list("actuators"),
        tick_interval_ms=interval,
        tick_budget_ms=t.integer("tick_budget_ms", min(10, interval), 1, 60_000),
        memory_limit_bytes=t.integer("memory_limit_bytes", 16 * 1024 * 1024, 65536, 4 * 1024**3),
        kv_quota_bytes=t.integer("kv_quota_bytes", 64 * 1024, 0, 1024**3),
        telemetry_rate_per_s=t.number("telemetry_rate_per_s", 5.0),
        telemetry_burst=t.integer("telemetry_burst", 20, 1, 100_000),
        health_interval_ms=t.integer("health_interval_ms", 1000, 1, 3_600_000),
    )
    t.done()
    return cfg


def _broker(t: _Table, base: Path) -> BrokerConfig:
    url = t.text("url", "mqtt://127.0.0.1:1883")
    if not re.match(r"^mqtts?://", url):
        raise ConfigError(f"{t.key('url')}: must start with mqtt:// or mqtts://, got {url!r}")
    cfg = BrokerConfig(
        url=url,
        prefix=t.text("prefix", "dr/v1", re.compile(r"^[A-Za-z0-9_./-]{1,64}$")),
        username=t.opt_text("username"),
        password=t.opt_text("password"),
        ca_file=t.path_("ca_file", base),
        cert_file=t.path_("cert_file", base),
        key_file=t.path_("key_file", base),
        keepalive_s=t.integer("keepalive_s", 30, 5, 3600),
        reconnect_min_s=t.number("reconnect_min_s", 0.5),
        reconnect_max_s=t.number("reconnect_max_s", 30.0),
        download_stall_s=t.number("download_stall_s", 30.0),
    )
    t.done()
    return cfg


def _named_tables(root: _Table, section: str) -> dict[str, dict[str, Any]]:
    raw = root.get(section)
    if raw is None:
        return {}
    tables = _Table(section, raw).t
    out: dict[str, dict[str, Any]] = {}
    for name, table in tables.items():
        if not isinstance(table, dict):
            raise ConfigError(f"{section}.{name}: must be a table")
        if not re.match(r"^[A-Za-z0-9_.-]{1,64}$", name):
            raise ConfigError(f"{section}.{name}: names are [A-Za-z0-9_.-], at most 64 chars")
        out[name] = table
    return out


def parse(doc: Mapping[str, Any], base: Path, source: Path | None = None) -> DeviceConfig:
    root = _Table("", dict(doc))
    dev = _Table("device", root.get("device") or {})
    device_id = dev.text("id", pattern=re.compile(r"^[A-Za-z0-9_.-]{1,64}$"))
    hardware = dev.text("hardware", "generic")
    state_dir = dev.path_("state_dir", base) or (base / "state").resolve()
    log_format = dev.text("log_format", "text")
    if log_format not in ("text", "json"):
        raise ConfigError(f"device.log_format: must be 'text' or 'json', got {log_format!r}")
    trial_attempts = dev.integer("trial_attempts", 1, 1, 100)
    trust_root = dev.path_("trust_root", base)
    sysfs_root = dev.path_("sysfs_root", base) or Path("/sys")
    dev.done()

    sensors = _named_tables(root, "sensors")
    actuators = _named_tables(root, "actuators")
    apps: dict[str, AppConfig] = {}
    raw_apps = root.get("apps") or {}
    if not isinstance(raw_apps, dict):
        raise ConfigError("apps: must be a table of [apps.NAME] tables")
    for name, table in raw_apps.items():
        app = _app(name, _Table(f"apps.{name}", table), base)
        wiring = (("sensors", app.sensors, sensors), ("actuators", app.actuators, actuators))
        for kind, names, known in wiring:
            for n in names or ():
                if n not in known:
                    raise ConfigError(f"apps.{name}.{kind}: no [{kind}.{n}] is configured")
        apps[name] = app
    broker_raw = root.get("broker")
    broker = None if broker_raw is None else _broker(_Table("broker", broker_raw), base)
    root.done()
    return DeviceConfig(
        id=device_id,
        hardware=hardware,
        state_dir=state_dir,
        apps=apps,
        sensors=sensors,
        actuators=actuators,
        broker=broker,
        log_format=log_format,
        trial_attempts=trial_attempts,
        trust_root=trust_root,
        sysfs_root=sysfs_root,
        source=source,
    )


def load(path: Path) -> DeviceConfig:
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise ConfigError(f"{path}: cannot read: {e.strerror or e}") from e
    try:
        doc = tomllib.loads(raw.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from e
    return parse(doc, path.parent.resolve(), path.resolve())
