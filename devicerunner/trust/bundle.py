"""The release bundle: one file holding a signed manifest and its module.

Layout: ``DRBUNDLE1\\n`` magic, u32 big-endian manifest length, the manifest
envelope bytes, then the module bytes. Pure; both lengths are bounded
before anything is sliced. A bundle proves nothing by itself: the device
verifies the manifest's signatures and then the module against the
manifest (trust.verify_artifact).
"""

from __future__ import annotations

import struct

from devicerunner.errors import MalformedError, TooLargeError
from devicerunner.trust.manifest import MAX_ARTIFACT_BYTES, MAX_MANIFEST_BYTES

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
