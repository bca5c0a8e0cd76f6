"""Names of the device's files that more than one part reads (docs/operations.md).

Kept apart from the daemon so that readers such as ``devicerunner status``
do not import the sandbox (and wasmtime) to find a file name.
"""

STATUS_FILE = "status.json"
"""Runtime status the daemon rewrites every second (informational, not a commit point)."""
LOCK_FILE = "lock"
"""Held (flock) by the one daemon that owns the state dir."""
