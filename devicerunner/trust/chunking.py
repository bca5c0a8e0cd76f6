"""Where a module is cut into chunks (publisher side only).

Content-defined chunking (FastCDC 2020, through PyPI ``pyfastcdc``, whose
cut points match the reference Rust crate ``fastcdc`` v2020 with the gear
table of the paper's C code): a boundary falls where a rolling hash of the
last bytes matches a mask, so an edit moves the boundaries around it only
and every other chunk keeps its bytes and its hash. Two builds that differ
by one function then share all but a few chunks, and a device that holds
the old build fetches only those (update/downloads).

Devices never run the chunker: the signed manifest lists each chunk's size
and hash, and a device finds reusable chunks by hash. So the parameters
below can change between releases without breaking anything; they only
decide how well deltas work and how long the manifest gets.

Reads the module from a stream, one chunk at a time: a 30 MB module is
never whole in the publisher's memory. Never signs, never publishes.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from devicerunner.errors import MalformedError, TooLargeError
from devicerunner.trust.manifest import MAX_ARTIFACT_BYTES, MAX_CHUNK, MIN_CHUNK, artifact_fields


@dataclass(frozen=True)
class Chunking:
    """How to cut: ``fastcdc`` (content-defined) or ``fixed``."""

    kind: str = "fastcdc"
    avg_bytes: int = 8 * 1024
    min_bytes: int = 2 * 1024
    max_bytes: int = 56 * 1024
    """Under a 64 KiB broker packet limit with room for topic and header."""
    fixed_bytes: int = 64 * 1024

    def __post_init__(self) -> None:
        if self.kind not in ("fastcdc", "fixed"):
            raise MalformedError(f"chunking: unknown kind {self.kind!r} (fastcdc or fixed)")
        if self.kind == "fixed" and not MIN_CHUNK <= self.fixed_bytes <= MAX_CHUNK:
            raise MalformedError(f"chunking: fixed chunk size must be in {MIN_CHUNK}..{MAX_CHUNK}")
        if self.kind == "fastcdc" and not (
            256 <= self.min_bytes <= self.avg_bytes <= self.max_bytes <= MAX_CHUNK
        ):
            raise MalformedError(f"chunking: need 256 <= min <= avg <= max <= {MAX_CHUNK}")


DEFAULT = Chunking()
BIG = Chunking(avg_bytes=32 * 1024, min_bytes=8 * 1024, max_bytes=56 * 1024)
"""For modules over BIG_FROM_BYTES: fewer, larger chunks keep the manifest short."""
BIG_FROM_BYTES = 8 * 1024 * 1024


def for_size(size: int) -> Chunking:
    return BIG if size > BIG_FROM_BYTES else DEFAULT


def cut(stream: BinaryIO, how: Chunking = DEFAULT) -> Iterator[tuple[int, bytes]]:
    """(offset, bytes) of every chunk of ``stream``, in order; one chunk in memory at a time."""
    if how.kind == "fixed":
        pos = 0
        while block := stream.read(how.fixed_bytes):
            yield pos, block
            pos += len(block)
        return
    from pyfastcdc import FastCDC  # publisher-side only: devices never import it

    cdc = FastCDC(how.avg_bytes, min_size=how.min_bytes, max_size=how.max_bytes)
    for c in cdc.cut_stream(stream):
        yield c.offset, bytes(c.data)  # .data is valid only until the next chunk


def artifact_of(stream: BinaryIO, how: Chunking = DEFAULT) -> dict[str, Any]:
    """The manifest's ``artifact`` for the module in ``stream``."""
    whole = hashlib.sha256()
    chunks: list[tuple[int, str]] = []
    size = 0
    for _, data in cut(stream, how):
        size += len(data)
        if size > MAX_ARTIFACT_BYTES:
            raise TooLargeError(f"module is over {MAX_ARTIFACT_BYTES} bytes")
        whole.update(data)
        chunks.append((len(data), hashlib.sha256(data).hexdigest()))
    if size == 0:
        raise MalformedError("module is empty")
    if how.kind == "fixed":
        return {
            "sha256": whole.hexdigest(),
            "size": size,
            "chunk_size": how.fixed_bytes,
            "chunks": [h for _, h in chunks],
        }
    return artifact_fields(whole.hexdigest(), size, chunks)


def artifact_of_file(path: Path, how: Chunking | None = None) -> dict[str, Any]:
    with open(path, "rb") as f:
        return artifact_of(f, how or for_size(path.stat().st_size))
