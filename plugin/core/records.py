"""The values the core exchanges with its ports: what Vault issued, what the store keeps.

Plain frozen dataclasses, no behaviour. Fields holding a token or secret data are left out of `repr`, so
that a record logged or shown in a traceback reveals nothing.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any


@dataclasses.dataclass(frozen=True)
class IssuedToken:
    """A Vault token with what Vault said of it at issue or renewal. `ttl` is in seconds."""

    token: str = dataclasses.field(repr=False)
    accessor: str
    ttl: int
    renewable: bool


@dataclasses.dataclass(frozen=True)
class Fetched:
    """A secret as Vault answered it: its data, and its lease (dynamic secrets) or KV v2 version, or, for a
    credential without a lease that expires (a PKI certificate), when it expires (seconds since the epoch)."""

    data: Mapping[str, Any] = dataclasses.field(repr=False)
    lease_id: str | None = None
    lease_duration: int = 0
    renewable: bool = False
    version: int | None = None
    expires_at: float | None = None


@dataclasses.dataclass(frozen=True)
class WrapInfo:
    """What `sys/wrapping/lookup` reveals of a wrapping token without consuming it."""

    creation_path: str
    creation_time: str
    ttl: int


@dataclasses.dataclass(frozen=True)
class VolumeInfo:
    """What Get and List say of a volume: `mountpoint` is one active mount's ("" with none)."""

    name: str
    mountpoint: str
    created_at: float  # seconds since the epoch
    active_mounts: int


@dataclasses.dataclass(frozen=True)
class VolumeRecord:
    name: str
    options: dict[str, str]
    created_at: float


@dataclasses.dataclass(frozen=True)
class VolumeCredential:
    """The token unwrapped from a volume's `wrapped-token`: the parent of its mounts' tokens, or (when it
    cannot mint children) the token its mounts read with."""

    token: str = dataclasses.field(repr=False)
    accessor: str
    can_mint: bool
    revoked: bool = False


@dataclasses.dataclass(frozen=True)
class MountRecord:
    """An active (refcount > 0) or half-made (refcount 0, being set up or torn down) mount.

    `owns_token`: the token was minted for this mount and is revoked with it (else it is the volume's).
    `container_token_accessor`: the token handed to the container wrapped in its token-file, if any.
    `unreadable`: its token did not unseal (a damaged row): `token` is "", only `accessor` can revoke it.
    """

    volume: str
    mount_id: str
    refcount: int
    mountpoint: str
    token: str = dataclasses.field(repr=False)
    accessor: str
    created_at: float
    owns_token: bool = True
    container_token_accessor: str | None = None
    revoked: bool = False  # by break-glass: tokens revoked and files wiped while the container runs on
    unreadable: bool = False


@dataclasses.dataclass(frozen=True)
class IdentityRecord:
    token: str = dataclasses.field(repr=False)
    accessor: str
    obtained_at: float


@dataclasses.dataclass(frozen=True)
class OwedRevocation:
    """A revocation Vault could not take yet, or that is due only later (`not_before`, seconds since the
    epoch: an old credential lives for rotate-grace after its replacement).

    `kind`: "token" revokes `token` itself (and its children and leases; `key` is its accessor); "accessor"
    revokes the token behind accessor `key` with `token`'s right to; "lease" revokes lease `key` with `token`.
    """

    key: str
    token: str = dataclasses.field(repr=False)
    kind: str = "token"
    not_before: float = 0.0
