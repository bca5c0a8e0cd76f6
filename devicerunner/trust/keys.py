"""Key files for operators: Ed25519 private keys (PEM, 0600, encrypted with a
passphrase when one is given) and public keys (PEM).

Errors name the file and what is wrong with it; a private key is never
written over an existing file, and never accepted where a public key is
expected (a private key passed around as if it were public spreads it).

Passphrase: ``--passphrase-file FILE`` (first line) or the environment
variable ``DEVICERUNNER_KEY_PASSPHRASE``; keygen encrypts with it (PKCS#8,
the best encryption the cryptography library offers), and every command
that signs decrypts with it.
"""

from __future__ import annotations

import os
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from devicerunner.errors import ConfigError, DeviceRunnerError
from devicerunner.trust.manifest import key_id

PASSPHRASE_ENV = "DEVICERUNNER_KEY_PASSPHRASE"
MAX_KEY_FILE_BYTES = 64 * 1024


class KeyFileError(ConfigError):
    """A key file named on the command line is missing, unreadable or not a key (exit 2)."""


class KeyExistsError(DeviceRunnerError):
    """keygen would overwrite a key (exit 1: the operation is refused)."""


def passphrase(file: str | Path | None = None) -> bytes | None:
    """The operator's passphrase: the first line of ``file``, else the
    environment variable, else None (keys unencrypted)."""
    if file is not None:
        try:
            text = Path(file).read_bytes()[:4096]
        except OSError as e:
            raise KeyFileError(f"{file}: cannot read the passphrase: {e.strerror or e}") from e
        first = text.splitlines()[0] if text.strip() else b""
        if not first:
            raise KeyFileError(f"{file}: the passphrase file is empty")
        return first
    env = os.environ.get(PASSPHRASE_ENV)
    return env.encode() if env else None


def generate(name: str, directory: Path, password: bytes | None = None) -> tuple[Path, Path, str]:
    directory.mkdir(parents=True, exist_ok=True)
    priv_path, pub_path = directory / f"{name}.key", directory / f"{name}.pub"
    for p in (priv_path, pub_path):
        if p.exists():
            raise KeyExistsError(f"{p} exists; refusing to overwrite a key")
    key = Ed25519PrivateKey.generate()
    encryption: serialization.KeySerializationEncryption = (
        serialization.BestAvailableEncryption(password) if password else serialization.NoEncryption()
    )
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption)
    fd = os.open(priv_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    pub = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    pub_path.write_bytes(pub)
    return priv_path, pub_path, key_id(key.public_key())


def _read(path: Path) -> bytes:
    try:
        data = Path(path).read_bytes()[: MAX_KEY_FILE_BYTES + 1]
    except OSError as e:
        raise KeyFileError(f"{path}: cannot read: {e.strerror or e}") from e
    if len(data) > MAX_KEY_FILE_BYTES:
        raise KeyFileError(f"{path}: more than {MAX_KEY_FILE_BYTES} bytes: not a key file")
    return data


def load_private(path: Path, password: bytes | None = None) -> Ed25519PrivateKey:
    """``password``: None takes the passphrase from the environment (if set)."""
    data = _read(path)
    if password is None:
        password = passphrase()
    encrypted = b"ENCRYPTED PRIVATE KEY" in data
    try:
        key = serialization.load_pem_private_key(data, password=password if encrypted else None)
    except TypeError as e:  # encrypted without a password
        raise KeyFileError(
            f"{path}: the key is encrypted: give --passphrase-file FILE or set {PASSPHRASE_ENV}"
        ) from e
    except ValueError as e:
        why = (
            "wrong passphrase, or not an encrypted PEM private key" if encrypted else "not a PEM private key"
        )
        raise KeyFileError(f"{path}: {why}") from e
    if not isinstance(key, Ed25519PrivateKey):
        raise KeyFileError(f"{path}: not an Ed25519 key")
    return key


def load_public(path: Path) -> Ed25519PublicKey:
    data = _read(path)
    if b"PRIVATE KEY" in data:
        raise KeyFileError(
            f"{path}: this is a private key; give its public half ({Path(path).with_suffix('.pub').name}). "
            "Private keys stay with the person who signs."
        )
    try:
        key = serialization.load_pem_public_key(data)
    except ValueError:
        raise KeyFileError(f"{path}: not a PEM public key") from None
    if not isinstance(key, Ed25519PublicKey):
        raise KeyFileError(f"{path}: not an Ed25519 key")
    return key
