"""Persisted, resumable downloads: ``<state_dir>/downloads/<sha256>/``.

Holds the (verified) manifest and every chunk received so far, one file per
chunk, each written atomically only after its hash matched the manifest. So
a dropped connection *and* a power cut both resume where they stopped, and
a chunk already held is never fetched again. Chunks are re-hashed when a
download is reopened; one that does not match is deleted and fetched again.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
from pathlib import Path

from devicerunner.errors import VerificationError
from devicerunner.runtime.fsutil import atomic_write, makedirs
from devicerunner.trust import verify as trust
from devicerunner.trust.manifest import Manifest, parse_manifest

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
                i = int(p.stem)
                trust.verify_chunk(m, i, p.read_bytes())
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
        data = b"".join((d / f"{i}.chunk").read_bytes() for i in range(len(m.artifact.chunks)))
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
                out.append(parse_manifest((d / MANIFEST).read_bytes()))
            except (OSError, VerificationError):
                shutil.rmtree(d, ignore_errors=True)
        return out
