"""An in-memory release repository for trust tests (like python-tuf's
RepositorySimulator): real keys, real signatures, no files."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from devicerunner.trust import manifest
from devicerunner.trust import verify as trust

NOW = 1_800_000_000
DAY = 86_400
WAT_MODULE = b"\0asm\x01\0\0\0" + bytes(range(256)) * 10  # bytes only; never run here


@dataclass
class Repo:
    root_keys: list[Ed25519PrivateKey] = field(
        default_factory=lambda: [Ed25519PrivateKey.generate() for _ in range(3)]
    )
    release_keys: list[Ed25519PrivateKey] = field(
        default_factory=lambda: [Ed25519PrivateKey.generate() for _ in range(3)]
    )
    rollout_keys: list[Ed25519PrivateKey] = field(default_factory=lambda: [Ed25519PrivateKey.generate()])
    root_threshold: int = 2
    release_threshold: int = 2
    version: int = 1

    def root_bytes(self, signers: list[Ed25519PrivateKey] | None = None, **over: Any) -> bytes:
        signed = manifest.root_signed(
            version=over.pop("version", self.version),
            issued=NOW - DAY,
            expires=over.pop("expires", NOW + 365 * DAY),
            role_keys={
                "root": [k.public_key() for k in self.root_keys],
                "release": [k.public_key() for k in self.release_keys],
                "rollout": [k.public_key() for k in self.rollout_keys],
            },
            thresholds={"root": self.root_threshold, "release": self.release_threshold, "rollout": 1},
        )
        signed.update(over)
        return manifest.sign_envelope(signed, signers if signers is not None else self.root_keys)

    def root(self) -> manifest.Root:
        return trust.load_trusted_root(self.root_bytes())

    def release(
        self,
        module: bytes = WAT_MODULE,
        signers: list[Ed25519PrivateKey] | None = None,
        **kw: Any,
    ) -> bytes:
        args: dict[str, Any] = dict(
            app="thermo",
            version="1.0.0",
            sequence=5,
            module=module,
            capabilities=["log", "sensors"],
            hardware=["rpi4"],
            issued=NOW - 60,
            expires=NOW + 30 * DAY,
            chunk_size=1024,
        )
        args.update(kw)
        signed = manifest.manifest_signed(**args)
        return manifest.sign_envelope(signed, signers if signers is not None else self.release_keys[:2])


DEVICE = trust.DeviceIdentity(
    device_id="dev-7", hardware="rpi4", policy={"thermo": frozenset({"log", "sensors", "clock"})}
)


def verify(
    repo: Repo,
    data: bytes,
    *,
    root: manifest.Root | None = None,
    highest: int = 0,
    bad: frozenset[int] = frozenset(),
    floor: int = 0,
    now: int = NOW,
    device: trust.DeviceIdentity = DEVICE,
) -> manifest.Manifest:
    return trust.verify_release(
        data,
        root=root or repo.root(),
        device=device,
        history={"thermo": trust.AppHistory(highest, bad)},
        time_floor=floor,
        now=now,
    )
