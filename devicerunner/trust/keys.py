"""Key files for operators: Ed25519 private keys (PEM, 0600) and public keys (PEM).

Errors name the file and what is wrong with it; a private key is never
written over an existing file.
"""

from __future__ import annotations

import os
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from devicerunner.errors import ConfigError, DeviceRunnerError
from devicerunner.trust.manifest import key_id


class KeyFileError(ConfigError):
    """A key file named on the command line is missing, unreadable or not a key (exit 2)."""


class KeyExistsError(DeviceRunnerError):
    """keygen would overwrite a key (exit 1: the operation is refused)."""


def generate(name: str, directory: Path) -> tuple[Path, Path, str]:
    directory.mkdir(parents=True, exist_ok=True)
    priv_path, pub_path = directory / f"{name}.key", directory / f"{name}.pub"
    for p in (priv_path, pub_path):
        if p.exists():
            raise KeyExistsError(f"{p} exists; refusing to overwrite a key")
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    fd = os.open(priv_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    pub = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    pub_path.write_bytes(pub)
    return priv_path, pub_path, key_id(key.public_key())


def load_private(path: Path) -> Ed25519PrivateKey:
    try:
        key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
    except OSError as e:
        raise KeyFileError(f"{path}: cannot read: {e.strerror or e}") from e
    except (ValueError, TypeError) as e:
        raise KeyFileError(f"{path}: not an unencrypted PEM private key") from e
    if not isinstance(key, Ed25519PrivateKey):
        raise KeyFileError(f"{path}: not an Ed25519 key")
    return key


def load_public(path: Path) -> Ed25519PublicKey:
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise KeyFileError(f"{path}: cannot read: {e.strerror or e}") from e
    try:
        key = serialization.load_pem_public_key(data)
    except ValueError:
        try:  # a private key file also gives its public half
            return load_private(path).public_key()
        except KeyFileError:
            raise KeyFileError(f"{path}: not a PEM public key") from None
    if not isinstance(key, Ed25519PublicKey):
        raise KeyFileError(f"{path}: not an Ed25519 key")
    return key
