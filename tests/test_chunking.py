"""Content-defined chunks: manifests that pin variable-size chunks, and cut
points that survive an edit (so a delta fetches only what changed)."""

from __future__ import annotations

import io
import random

import pytest

from devicerunner.errors import ArtifactMismatchError, MalformedError
from devicerunner.trust import chunking, manifest
from devicerunner.trust import verify as trust
from tests.trustsim import Repo, verify


@pytest.fixture
def repo() -> Repo:
    return Repo()


def _module(seed: int, n: int) -> bytes:
    return b"\0asm\x01\0\0\0" + random.Random(seed).randbytes(n)


def _cdc_release(repo: Repo, module: bytes, **over: object) -> bytes:
    art = chunking.artifact_of(io.BytesIO(module))
    art.update(over)
    return repo.release(module=b"", artifact=art)


def test_content_defined_manifest_verifies_every_chunk_by_its_own_size(repo: Repo) -> None:
    module = _module(1, 200_000)
    m = verify(repo, _cdc_release(repo, module))
    a = m.artifact
    assert a.content_defined and len(set(a.sizes)) > 1  # variable-size chunks
    trust.verify_artifact(m, module)
    off, n = a.span(3)
    trust.verify_chunk(m, 3, module[off : off + n])
    with pytest.raises(ArtifactMismatchError):
        trust.verify_chunk(m, 3, module[off : off + n - 1])  # a chunk cut short


def test_fixed_size_manifests_keep_working(repo: Repo) -> None:
    module = _module(2, 5000)
    m = verify(repo, repo.release(module=module, chunk_size=1024))
    assert m.artifact.chunk_size == 1024 and m.artifact.sizes == (1024,) * 4 + (5008 - 4096,)
    trust.verify_artifact(m, module)


@pytest.mark.parametrize(
    ("field", "value", "why"),
    [
        ("sizes", "x", "one size per chunk"),
        ("sizes", [0], "one size per chunk"),
        ("chunk_size", 4096, "exactly one of"),
    ],
)
def test_manifest_with_inconsistent_chunk_sizes_is_rejected(
    repo: Repo, field: str, value: object, why: str
) -> None:
    with pytest.raises(MalformedError, match=why):
        verify(repo, _cdc_release(repo, _module(3, 50_000), **{field: value}))


def test_chunk_sizes_that_do_not_add_up_to_the_artifact_are_rejected(repo: Repo) -> None:
    module = _module(4, 50_000)
    art = chunking.artifact_of(io.BytesIO(module))
    art["sizes"] = [*art["sizes"][:-1], art["sizes"][-1] + 1]
    with pytest.raises(MalformedError, match="add up"):
        verify(repo, repo.release(module=b"", artifact=art))
    art["sizes"] = [manifest.MAX_CHUNK + 1, *art["sizes"][1:]]
    with pytest.raises(MalformedError, match="integer in"):
        verify(repo, repo.release(module=b"", artifact=art))


def test_an_insert_changes_only_the_chunks_around_it() -> None:
    old = _module(5, 1_000_000)
    new = old[:500_000] + b"a new function body" * 20 + old[500_000:]
    a = chunking.artifact_of(io.BytesIO(old))
    b = chunking.artifact_of(io.BytesIO(new))
    held = set(a["chunks"])
    fetched = sum(n for n, h in zip(b["sizes"], b["chunks"], strict=True) if h not in held)
    assert fetched <= 0.05 * len(new)
    fixed = chunking.Chunking("fixed", fixed_bytes=8192)
    fa, fb = chunking.artifact_of(io.BytesIO(old), fixed), chunking.artifact_of(io.BytesIO(new), fixed)
    assert len(set(fb["chunks"]) - set(fa["chunks"])) > len(fb["chunks"]) // 3  # what CDC avoids
