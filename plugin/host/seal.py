"""Sealing tokens at rest: AES-256-GCM with a key file kept apart from the state database.

Each sealed blob is bound to a context (what the token is for) as associated data, so a blob copied
into another row does not open there.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from plugin.core.errors import StateError

_KEY_BYTES = 32
_NONCE_BYTES = 12


class Sealer:
    """Seals and unseals short strings (tokens) with one AES-256-GCM key."""

    def __init__(self, key: bytes):
        if len(key) != _KEY_BYTES:
            raise StateError("the seal key must be 32 bytes")
        self._aead = AESGCM(key)

    @classmethod
    def load_or_create(cls, key_path: Path) -> Sealer:
        """Read the key file, creating it (mode 0600, 32 random bytes) on first start.

        Raises `StateError` if the file is readable by others or has the wrong size.
        """
        try:
            fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        except FileExistsError:
            return cls(_read_key(key_path))
        with os.fdopen(fd, "wb") as f:
            f.write(os.urandom(_KEY_BYTES))
            f.flush()
            os.fsync(f.fileno())
        return cls(_read_key(key_path))

    def seal(self, plaintext: str, context: str) -> bytes:
        nonce = os.urandom(_NONCE_BYTES)
        return nonce + self._aead.encrypt(nonce, plaintext.encode(), context.encode())

    def unseal(self, blob: bytes, context: str) -> str:
        """Raises `StateError` if the blob was sealed with another key or for another context."""
        try:
            return self._aead.decrypt(blob[:_NONCE_BYTES], blob[_NONCE_BYTES:], context.encode()).decode()
        except (InvalidTag, ValueError) as e:
            raise StateError(
                "a sealed token in the state database does not open with the seal key: the state directory "
                "was copied without its seal.key, or the key was replaced"
            ) from e


def _read_key(key_path: Path) -> bytes:
    try:
        fd = os.open(key_path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError as e:
        raise StateError(f"cannot open seal key {key_path} ({e.strerror}): it must be a regular file, mode 0600") from e
    with os.fdopen(fd, "rb") as f:
        info = os.fstat(f.fileno())
        if stat.S_IMODE(info.st_mode) & 0o077:
            raise StateError(f"seal key {key_path} is readable by group or others: chmod 0600 {key_path}")
        key = f.read()
    if len(key) != _KEY_BYTES:
        raise StateError(f"seal key {key_path} is damaged (expected {_KEY_BYTES} bytes)")
    return key
