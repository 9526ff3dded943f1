"""What the core needs from the outside world, as typed ports.

The adapters (plugin.vault, plugin.host) implement these Protocols by subclassing them, and so do the
test fakes (tests/support/fakes.py), so mypy checks that neither drifts from what the core calls. Each
method's contract, including what it raises, is stated here; the adapters add how.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, TypeVar

from plugin.core.records import (
    Fetched,
    IdentityRecord,
    IssuedToken,
    MountRecord,
    OwedRevocation,
    VolumeCredential,
    VolumeRecord,
)

if TYPE_CHECKING:
    from plugin.core.spec import Spec

T = TypeVar("T")


class VaultPort(Protocol):
    """Vault or OpenBao, as the core uses it. Every method takes the token to act with.

    Raises `VaultTransientError` when Vault could not answer now (retried within the caller's budget,
    `plugin.core.retry`, before it is raised), `TokenInvalidError` when Vault says the token is gone,
    `VaultError` for any other refusal."""

    def mint_child(
        self, parent: str, role: str | None, ttl: int, meta: Mapping[str, str], display_name: str
    ) -> IssuedToken:
        """A child token of `parent` from token role `role` (or with the parent's policies if None); the
        TTL granted may differ from `ttl`."""
        ...

    def mint_wrapped_child(
        self, parent: str, role: str | None, ttl: int, meta: Mapping[str, str], display_name: str, wrap_ttl: int
    ) -> tuple[str, str]:
        """Like `mint_child`, answered wrapped: (wrapping token, accessor of the wrapped token)."""
        ...

    def renew_self(self, token: str, increment: int | None = None) -> IssuedToken:
        """Renew `token` (by `increment` seconds if given); the answer holds the TTL granted."""
        ...

    def revoke_self(self, token: str) -> None:
        """Revoke `token`, its children and its leases; a token Vault no longer knows counts as revoked."""
        ...

    def revoke_accessor(self, token: str, accessor: str) -> None:
        """Revoke the token behind `accessor` with `token`'s right to; an unknown accessor counts as revoked."""
        ...

    def capabilities(self, token: str, path: str) -> set[str]:
        """What `token` may do on `path`."""
        ...

    def fetch(self, token: str, path: str, params: tuple[tuple[str, str], ...] = ()) -> Fetched:
        """Read `path` (or write `params` to it) and say what Vault said of the answer."""
        ...

    def fetch_many(self, token: str, requests_: Sequence[tuple[str, tuple[tuple[str, str], ...]]]) -> list[Fetched]:
        """`fetch` each (path, params) concurrently; results in order."""
        ...

    def concurrently(self, calls: Sequence[Callable[[], T]]) -> list[T]:
        """Run independent calls of this port concurrently; results in order, the first error raised."""
        ...

    def kv2_current_version(self, token: str, path: str) -> int:
        """The newest version of the KV v2 secret at data path `path`."""
        ...

    def renew_lease(self, token: str, lease_id: str, increment: int | None = None) -> int:
        """Renew a lease; returns its new duration in seconds."""
        ...

    def revoke_lease(self, token: str, lease_id: str) -> None:
        """Revoke a lease (an unknown lease ID counts as revoked). `PermissionDeniedError` if `token` may not."""
        ...

    def lease_exists(self, token: str, lease_id: str) -> bool:
        """Whether Vault still knows `lease_id`."""
        ...


class TokenSource(Protocol):
    """The plugin's own token."""

    def token(self) -> str:
        """The token; waits for one within the caller's budget. Raises `IdentityUnavailableError`."""
        ...


class VolumeCredentials(Protocol):
    """The credential of a `wrapped-token=` volume."""

    def unwrap(self, name: str, spec: Spec, allowed_paths: Sequence[str]) -> tuple[VolumeCredential, int]:
        """Check and consume `spec.wrapped_token` (once); returns the credential and its TTL in seconds.
        Raises `WrappingTokenError` (tamper), `InvalidOptionError`, or a Vault error."""
        ...


class StorePort(Protocol):
    """The persistent state the core keeps: volumes, mounts, their leases, owed revocations. Tokens go in
    and come out in clear (the adapter seals them at rest). Raises `StateError` when unusable."""

    def add_volume(self, name: str, options: dict[str, str], credential: VolumeCredential | None = None) -> None: ...
    def volume(self, name: str) -> VolumeRecord | None: ...
    def volumes(self) -> list[VolumeRecord]: ...
    def remove_volume(self, name: str) -> None: ...
    def volume_credential(self, name: str) -> VolumeCredential | None: ...
    def volume_credentials(self) -> dict[str, VolumeCredential]: ...
    def mark_credential_revoked(self, name: str) -> None: ...

    def add_mount(self, record: MountRecord) -> None: ...
    def mount(self, volume: str, mount_id: str) -> MountRecord | None: ...
    def mounts(self, volume: str | None = None) -> list[MountRecord]: ...
    def active_mountpoints(self, volume: str) -> list[str]: ...
    def mount_ids(self, volume: str) -> list[str]:
        """Every recorded mount of the volume, in progress (refcount 0) or active (no token is unsealed)."""
        ...

    def set_refcount(self, volume: str, mount_id: str, refcount: int) -> None: ...
    def set_container_token_accessor(self, volume: str, mount_id: str, accessor: str) -> None: ...
    def replace_mount_token(self, record: MountRecord, leases: dict[str, str]) -> None:
        """A running mount's new token (and container token) and leases replace the old, in one step."""
        ...

    def mark_mount_revoked(self, volume: str, mount_id: str) -> None: ...
    def remove_mount(self, volume: str, mount_id: str) -> None: ...
    def set_lease(self, volume: str, mount_id: str, source: str, lease_id: str) -> None: ...
    def leases(self, volume: str, mount_id: str) -> dict[str, str]: ...

    def add_pending_revocation(self, owed: OwedRevocation) -> None: ...
    def pending_revocations(self) -> list[OwedRevocation]: ...
    def remove_pending_revocation(self, key: str) -> None: ...


class IdentityStore(Protocol):
    """Where the plugin identity keeps its token, a SecretID awaiting its login, and the digests of the
    wrapping tokens it consumed."""

    def identity(self) -> IdentityRecord | None: ...
    def save_identity(self, record: IdentityRecord) -> None: ...
    def forget_identity(self) -> None: ...
    def save_pending_secret_id(self, secret_id: str, source: str) -> None: ...
    def pending_secret_id(self) -> tuple[str, str] | None: ...
    def forget_pending_secret_id(self) -> None: ...
    def save_identity_from_secret_id(self, record: IdentityRecord) -> None: ...
    def mark_wrapping_token_consumed(self, digest: str) -> None: ...
    def wrapping_token_consumed_at(self, digest: str) -> float | None: ...
    def forget_wrapping_token(self, digest: str) -> None: ...


class Mounter(Protocol):
    """The per-mount tmpfs. Raises `MountError`."""

    def view_path(self, volume: str, mount_id: str) -> Path:
        """Where the read-only view of a mount is (or will be): what dockerd binds."""
        ...

    def is_mounted(self, volume: str, mount_id: str) -> bool: ...

    def mount(
        self, volume: str, mount_id: str, files: Mapping[str, bytes], *, uid: int, gid: int, mode: int, size: int
    ) -> Path:
        """Make the tmpfs holding `files` (owned by uid/gid, `mode`) and its read-only view; all or nothing."""
        ...

    def rewrite(
        self, volume: str, mount_id: str, files: Mapping[str, bytes], *, uid: int, gid: int, mode: int
    ) -> list[str]:
        """Replace the files whose bytes changed, each atomically; returns their names."""
        ...

    def wipe(self, volume: str, mount_id: str) -> None:
        """Remove every file of a mount, keeping the (empty) mount."""
        ...

    def unmount(self, volume: str, mount_id: str) -> None:
        """Remove the view and the tmpfs; nothing mounted is fine."""
        ...

    def holders(self, volume: str, mount_id: str) -> list[int] | None:
        """The processes binding the mount's tmpfs, one per container (its init, the one to signal); [] for
        none or when it is not mounted; None when this host cannot tell (it does not see every process)."""
        ...

    def holders_of(self, mounts: Sequence[tuple[str, str]]) -> dict[tuple[str, str], list[int]] | None:
        """`holders` of each (volume, mount ID), from one look."""
        ...
