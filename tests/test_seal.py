"""seal.Sealer: AES-256-GCM sealing of tokens, bound to a context, with a 0600 key file."""

from __future__ import annotations

import os
import stat

import pytest

from plugin.core.errors import StateError
from plugin.host.seal import Sealer

TOKEN = "hvs.CAESIJ-not-a-real-token-0123456789"


@pytest.fixture
def sealer() -> Sealer:
    return Sealer(os.urandom(32))


@pytest.mark.parametrize("plaintext", [TOKEN, "", "ü密✓", "x" * 4096])
def test_round_trip(sealer, plaintext):
    assert sealer.unseal(sealer.seal(plaintext, "identity"), "identity") == plaintext


def test_sealed_blob_does_not_contain_the_plaintext(sealer):
    blob = sealer.seal(TOKEN, "identity")

    assert TOKEN.encode() not in blob
    assert b"not-a-real-token" not in blob


def test_each_seal_uses_a_fresh_nonce(sealer):
    assert sealer.seal(TOKEN, "identity") != sealer.seal(TOKEN, "identity")


@pytest.mark.parametrize("other", ["mount:web:1", "identity ", "", "revoke:abc"])
def test_other_context_does_not_open(sealer, other):
    blob = sealer.seal(TOKEN, "identity")

    with pytest.raises(StateError, match="seal key"):
        sealer.unseal(blob, other)


def test_other_key_does_not_open(sealer):
    blob = sealer.seal(TOKEN, "identity")

    with pytest.raises(StateError):
        Sealer(os.urandom(32)).unseal(blob, "identity")


@pytest.mark.parametrize(
    "position", [0, 11, 12, 20, -1], ids=["nonce-first", "nonce-last", "body-first", "body", "tag-last"]
)
def test_tampered_blob_does_not_open(sealer, position):
    blob = bytearray(sealer.seal(TOKEN, "identity"))
    blob[position] ^= 0x01

    with pytest.raises(StateError):
        sealer.unseal(bytes(blob), "identity")


@pytest.mark.parametrize("cut", [0, 5, 12, 28], ids=["empty", "short-nonce", "nonce-only", "no-tag"])
def test_truncated_blob_does_not_open(sealer, cut):
    blob = sealer.seal(TOKEN, "identity")

    with pytest.raises(StateError):
        sealer.unseal(blob[:cut], "identity")


@pytest.mark.parametrize("size", [0, 16, 31, 33, 64])
def test_key_of_wrong_size_is_refused(size):
    with pytest.raises(StateError, match="32 bytes"):
        Sealer(b"k" * size)


def test_load_or_create_creates_a_private_32_byte_key(tmp_path):
    key_path = tmp_path / "seal.key"

    Sealer.load_or_create(key_path)

    info = key_path.stat()
    assert stat.S_IMODE(info.st_mode) == 0o600
    assert info.st_size == 32


def test_load_or_create_reuses_the_existing_key(tmp_path):
    key_path = tmp_path / "seal.key"
    first = Sealer.load_or_create(key_path)
    key = key_path.read_bytes()

    second = Sealer.load_or_create(key_path)

    assert key_path.read_bytes() == key
    assert second.unseal(first.seal(TOKEN, "identity"), "identity") == TOKEN


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660, 0o602])
def test_key_file_readable_by_others_is_refused(tmp_path, mode):
    key_path = tmp_path / "seal.key"
    key_path.write_bytes(os.urandom(32))
    key_path.chmod(mode)

    with pytest.raises(StateError, match="chmod 0600"):
        Sealer.load_or_create(key_path)


@pytest.mark.parametrize("size", [0, 16, 31, 33])
def test_key_file_of_wrong_size_is_refused(tmp_path, size):
    key_path = tmp_path / "seal.key"
    key_path.write_bytes(b"k" * size)
    key_path.chmod(0o600)

    with pytest.raises(StateError, match="damaged"):
        Sealer.load_or_create(key_path)
