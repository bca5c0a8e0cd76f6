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
from devicerunner.runtime.strict import REQUIRED, Strict
from devicerunner.trust.manifest import MAX_ARTIFACT_BYTES
from devicerunner.trust.verify import LimitsPolicy
from hostfuncs.registry import CAPABILITIES

KNOWN_CAPABILITIES = tuple(CAPABILITIES)  # the ABI registry's one list
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
    messages_queue: int = 32
    """Messages from operators kept for the app at most (the oldest dropped beyond)."""
    messages_rate_per_s: float = 20.0
    messages_burst: int = 40
    min_tick_interval_ms: int = 10
    max_module_bytes: int = 4 * 1024 * 1024

    def ceilings(self) -> LimitsPolicy:
        """The most a release may ask for this app: its memory, tick budget, kv
        quota and telemetry rate here are ceilings, ``min_tick_interval_ms`` a
        floor, ``max_module_bytes`` the largest module it may ship."""
        return LimitsPolicy(
            memory_bytes=self.memory_limit_bytes,
            tick_budget_ms=self.tick_budget_ms,
            min_tick_interval_ms=self.min_tick_interval_ms,
            kv_quota_bytes=self.kv_quota_bytes,
            telemetry_rate_per_s=self.telemetry_rate_per_s,
            module_bytes=self.max_module_bytes,
        )


DEFAULT_MAX_PACKET_BYTES = 272 * 1024
"""The largest document (a 256 KiB manifest) plus topic and headers."""
MIN_PACKET_BYTES_CFG = 128 * 1024
MAX_PACKET_BYTES_CFG = 256 * 1024 * 1024


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
    protocol: str = "3.1.1"
    max_packet_bytes: int = DEFAULT_MAX_PACKET_BYTES
    retain: bool = True
    """False on brokers without retained messages (Azure IoT Hub, Mosquitto with
    retain_available false): status and last will are then published live."""


ARTIFACT_SOURCES = ("retained", "mqtt", "http")


@dataclass(frozen=True)
class ArtifactsConfig:
    """``[artifacts]``: where chunks come from, tried in this order (docs/operations.md)."""

    sources: tuple[str, ...] = ("retained",)
    http_url: str | None = None
    ca_file: Path | None = None
    window: int = 8
    """MQTT request/response: chunks requested and not yet received, at most."""
    max_redirects: int = 3
    min_bytes_per_s: int = 16 * 1024
    """HTTP: a chunk slower than this (plus 20 s) fails the source (slow-loris)."""
    request_documents: bool = False
    """Ask the artifact servers for the current root/releases/rollouts on every
    connect (brokers without retained messages). Default: on with the mqtt source."""
    status_requests: bool = True
    """Answer fleet-wide status requests (brokers without retained wildcard delivery)."""


@dataclass(frozen=True)
class DeviceConfig:
    id: str
    hardware: str
    state_dir: Path
    apps: Mapping[str, AppConfig]
    sensors: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    actuators: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    broker: BrokerConfig | None = None
    artifacts: ArtifactsConfig = field(default_factory=ArtifactsConfig)
    log_format: str = "text"
    trial_attempts: int = 2
    """Trials a pending update may start; a crash or power cut during one counts.
    2 survives one power cut in a trial, and a release that crashes the daemon
    runs at most twice."""
    compile_memory_bytes: int = 1024**3
    """Address-space cap of the child process that compiles a candidate."""
    compile_timeout_s: float = 120.0
    trust_root: Path | None = None
    sysfs_root: Path = Path("/sys")
    source: Path | None = None
    kv_flush_interval_s: float = 5.0
    """At most one kv snapshot write per app per interval (flash wear); a power
    cut loses at most this much of an app's kv writes. A clean stop flushes."""


class _Table(Strict):
    """Typed reads from one TOML table (runtime.strict), as ConfigError;
    ``done()`` refuses the keys nobody read."""

    def __init__(self, path: str, table: Any) -> None:
        super().__init__(table, path, _config_error)

    def text(  # type: ignore[override]
        self, k: str, default: str | None = None, pattern: re.Pattern[str] | None = None
    ) -> str:
        return str(super().text(k, REQUIRED if default is None else default, pattern=pattern))

    def opt_text(self, k: str) -> str | None:
        return None if self.get(k) is None else self.text(k)

    def integer(self, k: str, default: int, lo: int = 1, hi: int = 2**62) -> int:  # type: ignore[override]
        return int(super().integer(k, default, lo=lo, hi=hi))

    def number(self, k: str, default: float, lo: float = 0.0) -> float:  # type: ignore[override]
        return float(super().number(k, default, lo=lo))

    def str_list(self, k: str) -> tuple[str, ...] | None:
        return None if self.get(k) is None else tuple(self.text_list(k))

    def path_(self, k: str, base: Path) -> Path | None:
        v = self.opt_text(k)
        return None if v is None else (base / v).resolve()

    def done(self) -> None:
        self.finish()


def _config_error(key: str, message: str) -> Exception:
    return ConfigError(f"{key}: {message}")


def parse_capabilities(key: str, caps: tuple[str, ...] | list[str]) -> frozenset[str]:
    for c in caps:
        if c not in KNOWN_CAPABILITIES:
            raise ConfigError(f"{key}: unknown capability {c!r} (known: {', '.join(KNOWN_CAPABILITIES)})")
    return frozenset(caps)


def _app(name: str, t: _Table, base: Path) -> AppConfig:
    if not NAME_RE.fullmatch(name):
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
        messages_queue=t.integer("messages_queue", 32, 1, 1024),
        messages_rate_per_s=t.number("messages_rate_per_s", 20.0),
        messages_burst=t.integer("messages_burst", 40, 1, 10_000),
        min_tick_interval_ms=t.integer("min_tick_interval_ms", min(10, interval), 1, 3_600_000),
        max_module_bytes=t.integer("max_module_bytes", 4 * 1024 * 1024, 1024, MAX_ARTIFACT_BYTES),
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
        # 0 would reconnect in a hot loop (and hammer the broker with every device)
        reconnect_min_s=t.number("reconnect_min_s", 0.5, lo=0.05),
        reconnect_max_s=t.number("reconnect_max_s", 30.0, lo=0.05),
        download_stall_s=t.number("download_stall_s", 30.0),
        protocol=t.text("protocol", "3.1.1", re.compile(r"^(3\.1\.1|5)$")),
        max_packet_bytes=t.integer(
            "max_packet_bytes", DEFAULT_MAX_PACKET_BYTES, MIN_PACKET_BYTES_CFG, MAX_PACKET_BYTES_CFG
        ),
        retain=_flag(t, "retain", True),
    )
    t.done()
    if cfg.reconnect_max_s < cfg.reconnect_min_s:
        raise ConfigError(
            f"{t.key('reconnect_max_s')}: must be >= reconnect_min_s ({cfg.reconnect_min_s}), "
            f"got {cfg.reconnect_max_s}"
        )
    return cfg


def _flag(t: _Table, k: str, default: bool) -> bool:
    v = t.get(k)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise ConfigError(f"{t.key(k)}: must be true or false")
    return v


def _artifacts(t: _Table, base: Path) -> ArtifactsConfig:
    sources = t.str_list("sources") or ("retained",)
    for name in sources:
        if name not in ARTIFACT_SOURCES:
            raise ConfigError(
                f"{t.key('sources')}: unknown source {name!r} (known: {', '.join(ARTIFACT_SOURCES)})"
            )
    if len(set(sources)) != len(sources):
        raise ConfigError(f"{t.key('sources')}: a source is listed twice")
    http_url = t.opt_text("http_url")
    if http_url is not None and not re.match(r"^https?://[^/\s]+", http_url):
        raise ConfigError(f"{t.key('http_url')}: must be an http:// or https:// URL, got {http_url!r}")
    if "http" in sources and http_url is None:
        raise ConfigError(f"{t.key('http_url')}: is required with the http source")
    cfg = ArtifactsConfig(
        sources=sources,
        http_url=http_url,
        ca_file=t.path_("ca_file", base),
        window=t.integer("window", 8, 1, 64),
        max_redirects=t.integer("max_redirects", 3, 0, 10),
        min_bytes_per_s=t.integer("min_bytes_per_s", 16 * 1024, 1, 2**40),
        request_documents=_flag(t, "request_documents", "mqtt" in sources),
        status_requests=_flag(t, "status_requests", True),
    )
    t.done()
    return cfg


def _named_tables(root: _Table, section: str) -> dict[str, dict[str, Any]]:
    raw = root.get(section)
    if raw is None:
        return {}
    tables = _Table(section, raw).obj
    out: dict[str, dict[str, Any]] = {}
    for name, table in tables.items():
        if not isinstance(table, dict):
            raise ConfigError(f"{section}.{name}: must be a table")
        if not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", name):
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
    trial_attempts = dev.integer("trial_attempts", 2, 1, 100)
    compile_memory_bytes = dev.integer("compile_memory_bytes", 1024**3, 64 * 1024**2, 64 * 1024**3)
    compile_timeout_s = dev.number("compile_timeout_s", 120.0, 1.0)
    trust_root = dev.path_("trust_root", base)
    sysfs_root = dev.path_("sysfs_root", base) or Path("/sys")
    kv_flush_interval_s = dev.number("kv_flush_interval_s", 5.0, lo=0.1)
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
    artifacts_raw = root.get("artifacts")
    artifacts = (
        ArtifactsConfig() if artifacts_raw is None else _artifacts(_Table("artifacts", artifacts_raw), base)
    )
    root.done()
    return DeviceConfig(
        id=device_id,
        hardware=hardware,
        state_dir=state_dir,
        apps=apps,
        sensors=sensors,
        actuators=actuators,
        broker=broker,
        artifacts=artifacts,
        log_format=log_format,
        trial_attempts=trial_attempts,
        compile_memory_bytes=compile_memory_bytes,
        compile_timeout_s=compile_timeout_s,
        trust_root=trust_root,
        sysfs_root=sysfs_root,
        source=source,
        kv_flush_interval_s=kv_flush_interval_s,
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
