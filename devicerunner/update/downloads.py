"""Persisted, resumable downloads: ``<state_dir>/downloads/<sha256>/``.

Holds the (verified) manifest and every chunk received so far, one file per
chunk, each written atomically only after its hash matched the manifest. So
a dropped connection *and* a power cut both resume where they stopped, and
a chunk already held is never fetched again. Chunks are re-hashed when a
download is reopened; one that does not match is deleted and fetched again.
Every file is size-checked before it is read (a chunk against the manifest's
chunk size, a manifest against MAX_MANIFEST_BYTES); a download whose manifest
does not parse, or sits under another release's hash, is removed.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
from pathlib import Path

from devicerunner.errors import ArtifactMismatchError, VerificationError
from devicerunner.runtime.fsutil import atomic_write, makedirs
from devicerunner.runtime.statefile import StateFileError, read_bounded
from devicerunner.trust import verify as trust
from devicerunner.trust.manifest import MAX_MANIFEST_BYTES, Manifest, parse_manifest

log = logging.getLogger(__name__)
MANIFEST = "manifest.json"


class DownloadStore:
    def __init__(self, state_dir: Path) -> None:
        self.root = Path(state_dir) / "downloads"

    def dir(self, m: Manifest) -> Path:
        return self.root / m.artifact.sha256

    def begin(self, m: Manifest) -> set[int]:
        """Open (or reopen) the download of ``m``; returns the chunk indexes held."""
        d = self.dir(m)
        if not (d / MANIFEST).exists():
            makedirs(d)
            atomic_write(d / MANIFEST, m.raw)
        return self.held(m)

    def held(self, m: Manifest) -> set[int]:
        d = self.dir(m)
        out: set[int] = set()
        if not d.is_dir():
            return out
        for p in d.glob("*.chunk"):
            try:
                i = int(p.stem) if p.stem.isascii() and p.stem.isdigit() else -1
                # a chunk is never larger than chunk_size: bounded before reading
                data = read_bounded(p, m.artifact.chunk_size)
                trust.verify_chunk(m, i, data or b"")
                out.add(i)
            except (ValueError, OSError, VerificationError):
                log.warning("download %s: dropping bad chunk file %s", m.artifact.sha256[:12], p.name)
                with contextlib.suppress(OSError):
                    p.unlink()
        return out

    def put(self, m: Manifest, index: int, data: bytes) -> None:
        """Verify one chunk against the manifest, then persist it. Raises ArtifactMismatchError."""
        trust.verify_chunk(m, index, data)
        atomic_write(self.dir(m) / f"{index}.chunk", data)

    def assemble(self, m: Manifest) -> bytes:
        d = self.dir(m)
        parts = []
        for i in range(len(m.artifact.chunks)):
            try:
                chunk = read_bounded(d / f"{i}.chunk", m.artifact.chunk_size)
            except StateFileError as e:  # larger than a chunk: not the one the manifest pins
                raise ArtifactMismatchError(f"chunk {i}: {e}") from None
            if chunk is None:
                raise FileNotFoundError(d / f"{i}.chunk")
            parts.append(chunk)
        data = b"".join(parts)
        trust.verify_artifact(m, data)
        return data

    def remove(self, sha256: str) -> None:
        shutil.rmtree(self.root / sha256, ignore_errors=True)

    def pending(self) -> list[Manifest]:
        """Downloads a previous run left unfinished (their manifests parse)."""
        out: list[Manifest] = []
        if not self.root.is_dir():
            return out
        for d in self.root.iterdir():
            try:
                raw = read_bounded(d / MANIFEST, MAX_MANIFEST_BYTES)
                if raw is None:
                    raise FileNotFoundError(d / MANIFEST)
                m = parse_manifest(raw)
                if d.name != m.artifact.sha256:  # stored under another release's name
                    raise ValueError(f"manifest for {m.artifact.sha256[:12]} under {d.name[:12]}")
                out.append(m)
            except (OSError, ValueError, VerificationError) as e:
                log.warning("download %s unusable (%s); removed", d.name[:12], e)
                shutil.rmtree(d, ignore_errors=True)
        return out
