"""The release bundle: one file holding a signed manifest and its module.

Layout: ``DRBUNDLE1\\n`` magic, u32 big-endian manifest length, the manifest
envelope bytes, then the module bytes. Pure; both lengths are bounded
before anything is sliced. A bundle proves nothing by itself: the device
verifies the manifest's signatures and then the module against the
manifest (trust.verify_artifact).
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from typing import BinaryIO

from devicerunner.errors import MalformedError, TooLargeError
from devicerunner.trust.manifest import MAX_ARTIFACT_BYTES, MAX_MANIFEST_BYTES, Manifest

MAGIC = b"DRBUNDLE1\n"
_LEN = struct.Struct(">I")
MAX_BUNDLE_BYTES = len(MAGIC) + _LEN.size + MAX_MANIFEST_BYTES + MAX_ARTIFACT_BYTES


def pack(manifest: bytes, module: bytes) -> bytes:
    return MAGIC + _LEN.pack(len(manifest)) + manifest + module


def unpack(data: bytes) -> tuple[bytes, bytes]:
    if len(data) > MAX_BUNDLE_BYTES:
        raise TooLargeError(f"bundle is {len(data)} bytes, the limit is {MAX_BUNDLE_BYTES}")
    if not data.startswith(MAGIC) or len(data) < len(MAGIC) + _LEN.size:
        raise MalformedError("not a devicerunner bundle (bad magic)")
    (n,) = _LEN.unpack_from(data, len(MAGIC))
    if n > MAX_MANIFEST_BYTES:
        raise TooLargeError(f"bundle manifest is {n} bytes, the limit is {MAX_MANIFEST_BYTES}")
    start = len(MAGIC) + _LEN.size
    if start + n > len(data):
        raise MalformedError("bundle is truncated")
    return data[start : start + n], data[start + n :]


def read_header(f: BinaryIO) -> tuple[bytes, int]:
    """(manifest envelope, offset of the module) of a bundle file, without
    reading the module (a big one is then streamed chunk by chunk)."""
    head = f.read(len(MAGIC) + _LEN.size)
    if not head.startswith(MAGIC) or len(head) < len(MAGIC) + _LEN.size:
        raise MalformedError("not a devicerunner bundle (bad magic)")
    (n,) = _LEN.unpack_from(head, len(MAGIC))
    if n > MAX_MANIFEST_BYTES:
        raise TooLargeError(f"bundle manifest is {n} bytes, the limit is {MAX_MANIFEST_BYTES}")
    man = f.read(n)
    if len(man) != n:
        raise MalformedError("bundle is truncated")
    return man, len(head) + n


def iter_chunks(f: BinaryIO, m: Manifest, module_offset: int) -> Iterator[tuple[int, bytes]]:
    """(index, bytes) of every chunk of the module in an open bundle (or module)
    file, one at a time, each checked against the manifest."""
    from devicerunner.trust.verify import verify_chunk

    a = m.artifact
    for i in range(len(a.chunks)):
        off, n = a.span(i)
        f.seek(module_offset + off)
        data = f.read(n)
        verify_chunk(m, i, data)  # never publish or serve a corrupt bundle
        yield i, data
