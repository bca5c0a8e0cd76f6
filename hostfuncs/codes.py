"""Error codes host functions return to apps (App ABI v1).

Invariant: these numbers are part of the ABI. They never change meaning;
new codes get new numbers. docs/abi.md lists them (generated from here).
Expected failures return one of these; a trap means the app misbehaved
in a way it cannot be told about (or the host failed unexpectedly).
"""

from __future__ import annotations

OK = 0
ERR_NOT_FOUND = -1
"""Unknown sensor/actuator name or id, missing kv or config key, or no message waiting."""
ERR_BOUNDS = -2
"""A (ptr, len) the app passed lies outside its linear memory."""
ERR_QUOTA = -3
"""The app's kv byte quota would be exceeded."""
ERR_STALE = -4
"""The sensor's newest sample is older than its max_age_ms."""
ERR_OFFLINE = -5
"""The sensor or actuator is unreachable (unplugged, failing, fault injected)."""
ERR_RATE_LIMITED = -6
"""Telemetry or log rate limit hit; the message was dropped."""
ERR_TOO_LARGE = -7
"""A key, value, name or payload is longer than the documented maximum."""
ERR_BUF_TOO_SMALL = -8
"""The output buffer cannot hold the result; nothing was written."""
ERR_INVALID = -9
"""An argument is malformed (not UTF-8, bad level, NaN where a number is needed)."""
ERR_IO = -10
"""The host failed to carry out the request (storage error)."""

NAMES: dict[int, str] = {
    OK: "OK",
    ERR_NOT_FOUND: "ERR_NOT_FOUND",
    ERR_BOUNDS: "ERR_BOUNDS",
    ERR_QUOTA: "ERR_QUOTA",
    ERR_STALE: "ERR_STALE",
    ERR_OFFLINE: "ERR_OFFLINE",
    ERR_RATE_LIMITED: "ERR_RATE_LIMITED",
    ERR_TOO_LARGE: "ERR_TOO_LARGE",
    ERR_BUF_TOO_SMALL: "ERR_BUF_TOO_SMALL",
    ERR_INVALID: "ERR_INVALID",
    ERR_IO: "ERR_IO",
}

DOCS: dict[int, str] = {
    OK: "success",
    ERR_NOT_FOUND: "unknown sensor/actuator name or id, missing kv/config key, no message waiting",
    ERR_BOUNDS: "a (ptr, len) lies outside the app's linear memory",
    ERR_QUOTA: "the app's kv byte quota would be exceeded",
    ERR_STALE: "the sensor's newest sample is older than its max_age_ms",
    ERR_OFFLINE: "the sensor or actuator is unreachable",
    ERR_RATE_LIMITED: "telemetry/log rate limit hit; message dropped",
    ERR_TOO_LARGE: "key, value, name or payload longer than allowed",
    ERR_BUF_TOO_SMALL: "output buffer too small; nothing written",
    ERR_INVALID: "malformed argument (not UTF-8, bad level, NaN)",
    ERR_IO: "host storage failure",
}
