"""The MQTT topic layout (docs/mqtt.md). Pure."""

from __future__ import annotations

import re

DEFAULT_PREFIX = "dr/v1"


def root(p: str) -> str:
    return f"{p}/trust/root"


def root_version(p: str, version: int | str) -> str:
    return f"{p}/trust/roots/{version}"


def release(p: str, app: str, channel: str) -> str:
    return f"{p}/releases/{app}/{channel}"


def rollout(p: str, app: str, channel: str) -> str:
    return f"{p}/rollouts/{app}/{channel}"


def config(p: str, app: str, channel: str) -> str:
    return f"{p}/configs/{app}/{channel}"


def config_rollout(p: str, app: str, channel: str) -> str:
    return f"{p}/rollouts/{app}/{channel}/config"


def app_inbox(p: str, app: str, device: str | None = None) -> str:
    """Where operators send ``app`` messages: one device's, or (None) every device's."""
    return f"{p}/devices/{device}/apps/{app}/in" if device else f"{p}/apps/{app}/in"


def parse_app_message(p: str, device: str, topic: str) -> tuple[str, str, bool] | None:
    """``(app, suffix, broadcast)`` for a message to an app of ``device``, else None.
    A message for another device's app is None (some brokers match loosely)."""
    parts = topic[len(p) + 1 :].split("/") if topic.startswith(p + "/") else []
    if len(parts) >= 4 and parts[0] == "apps" and parts[2] == "in":
        return parts[1], "/".join(parts[3:]), True
    if len(parts) >= 6 and parts[0] == "devices" and parts[2] == "apps" and parts[4] == "in":
        if parts[1] != device:
            return None
        return parts[3], "/".join(parts[5:]), False
    return None


def chunk(p: str, sha256: str, index: int | str) -> str:
    return f"{p}/artifacts/{sha256}/{index}"


def status(p: str, device: str) -> str:
    return f"{p}/devices/{device}/status"


def events(p: str, device: str) -> str:
    return f"{p}/devices/{device}/events"


def telemetry(p: str, device: str, app: str, name: str) -> str:
    return f"{p}/devices/{device}/telemetry/{app}/{name}"


def parse_chunk(p: str, topic: str) -> tuple[str, int] | None:
    parts = topic[len(p) + 1 :].split("/") if topic.startswith(p + "/") else []
    # fullmatch on ASCII digits: str.isdigit() is also true for "²" or Arabic-Indic digits, which
    # int() refuses (ValueError), and a bounded length keeps int() cheap.
    if len(parts) == 3 and parts[0] == "artifacts" and _INDEX_RE.fullmatch(parts[2]):
        return parts[1], int(parts[2])
    return None


_INDEX_RE = re.compile(r"[0-9]{1,9}")


def parse_device_topic(p: str, topic: str) -> tuple[str, str] | None:
    """``(device, "status" | "events")`` for a device's status or events topic, else None.

    Strict on purpose: some brokers' wildcard matching is looser than the spec.
    The payload is read by ``transport.reports`` (validated: devices are not trusted).
    """
    parts = topic[len(p) + 1 :].split("/") if topic.startswith(p + "/") else []
    if len(parts) != 3 or parts[0] != "devices" or not parts[1] or parts[2] not in ("status", "events"):
        return None
    return parts[1], parts[2]


# -- request/response (brokers without usable retained messages; docs/mqtt.md) --

SERVER_GROUP = "dr-artifacts"
"""The shared-subscription group artifact servers join (``$share/{group}/...``)."""


def artifact_request(p: str, device: str) -> str:
    """Where a device asks for chunks (inside its own ACL namespace)."""
    return f"{p}/devices/{device}/requests/artifacts"


def documents_request(p: str, device: str) -> str:
    """Where a device asks for the current root, releases and rollouts."""
    return f"{p}/devices/{device}/requests/documents"


def artifact_response(p: str, device: str, sha256: str, index: int | str) -> str:
    return f"{p}/devices/{device}/artifacts/{sha256}/{index}"


def document_response(p: str, device: str, kind: str) -> str:
    """``kind``: ``root`` (the current one), ``roots/{version}`` (a step of the
    chain), ``releases/{app}/{channel}`` or ``rollouts/{app}/{channel}``."""
    return f"{p}/devices/{device}/documents/{kind}"


def status_request(p: str) -> str:
    """Fleet-wide: every device answers with its status, after a random delay."""
    return f"{p}/fleet/status-request"


def parse_request(p: str, topic: str) -> tuple[str, str] | None:
    """``(device, "artifacts" | "documents")`` for a request topic, else None."""
    parts = topic[len(p) + 1 :].split("/") if topic.startswith(p + "/") else []
    if (
        len(parts) == 4
        and parts[0] == "devices"
        and parts[2] == "requests"
        and parts[3] in ("artifacts", "documents")
    ):
        return parts[1], parts[3]
    return None


def parse_response(p: str, device: str, topic: str) -> tuple[str, list[str]] | None:
    """``("artifacts", [sha, index])`` or ``("documents", [kind...])`` under a device's own topics."""
    base = f"{p}/devices/{device}/"
    if not topic.startswith(base):
        return None
    parts = topic[len(base) :].split("/")
    if parts[0] in ("artifacts", "documents") and len(parts) >= 2:
        return parts[0], parts[1:]
    return None
