"""Broker connection settings from a URL, the config file and the environment.

``mqtt://[user[:password]@]host[:port]`` or ``mqtts://...`` (TLS, port 8883
by default). Credentials may also come from ``DR_MQTT_USERNAME`` /
``DR_MQTT_PASSWORD`` (preferred over putting a password in a process
argument, which other users can read from /proc).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlsplit

from devicerunner.errors import ConfigError


@dataclass(frozen=True)
class BrokerSettings:
    host: str
    port: int
    tls: bool = False
    username: str | None = None
    password: str | None = None
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    keepalive_s: int = 30
    protocol: str = "3.1.1"
    """"3.1.1" or "5" (MQTT 5: the device announces ``max_packet_bytes`` in CONNECT)."""
    max_packet_bytes: int = 0
    """Largest packet the client reads (0: no bound; operator tools). See transport/guard.py."""

    @property
    def url(self) -> str:
        return f"{'mqtts' if self.tls else 'mqtt'}://{self.host}:{self.port}"


def parse_url(
    url: str,
    *,
    ca_file: Path | None = None,
    cert_file: Path | None = None,
    key_file: Path | None = None,
    username: str | None = None,
    password: str | None = None,
    keepalive_s: int = 30,
    protocol: str = "3.1.1",
    max_packet_bytes: int = 0,
) -> BrokerSettings:
    try:
        u = urlsplit(url)
        port = u.port
    except ValueError as e:
        raise ConfigError(f"broker URL {url!r}: {e}") from e
    if u.scheme not in ("mqtt", "mqtts") or not u.hostname:
        raise ConfigError(f"broker URL {url!r}: expected mqtt://host[:port] or mqtts://host[:port]")
    tls = u.scheme == "mqtts"
    user = unquote(u.username) if u.username else username or os.environ.get("DR_MQTT_USERNAME")
    pw = unquote(u.password) if u.password else password or os.environ.get("DR_MQTT_PASSWORD")
    for name, f in (("ca_file", ca_file), ("cert_file", cert_file), ("key_file", key_file)):
        if f is not None and not Path(f).exists():
            raise ConfigError(f"broker {name}: {f} does not exist")
    if (cert_file is None) != (key_file is None):
        raise ConfigError("broker: a client certificate needs both cert_file and key_file")
    if not tls and (ca_file or cert_file):
        raise ConfigError(f"broker URL {url!r}: TLS files given for a plain mqtt:// URL (use mqtts://)")
    return BrokerSettings(
        host=u.hostname,
        port=port or (8883 if tls else 1883),
        tls=tls,
        username=user,
        password=pw,
        ca_file=ca_file,
        cert_file=cert_file,
        key_file=key_file,
        keepalive_s=keepalive_s,
        protocol=protocol,
        max_packet_bytes=max_packet_bytes,
    )
