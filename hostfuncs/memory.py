"""The guest-memory interface host functions use, and its bounds rules.

Invariant: every (ptr, len) an app passes is masked to u32 (wasmtime-py
hands an i32 >= 2 GiB over as a negative int, and negative offsets would
index from the end) and checked against the memory's *current* size
before a single byte is touched. Out of bounds raises GuestMemoryError,
which the sandbox turns into the function's documented error code.
"""

from __future__ import annotations

from typing import Protocol

U32 = 0xFFFFFFFF


class GuestMemoryError(Exception):
    """The app passed a (ptr, len) outside its linear memory."""


def check_range(ptr: int, length: int, size: int) -> tuple[int, int]:
    """Masked (ptr, length) if ``[ptr, ptr+length)`` lies inside ``size`` bytes."""
    ptr &= U32
    length &= U32
    if ptr + length > size:
        raise GuestMemoryError(f"range [{ptr:#x}, +{length}) outside memory of {size} bytes")
    return ptr, length


class GuestMemory(Protocol):
    def size(self) -> int: ...
    def read(self, ptr: int, length: int) -> bytes: ...
    def write(self, ptr: int, data: bytes) -> None: ...
