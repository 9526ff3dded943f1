"""Small hand-written fakes of the Vault adapter, the mounter and the identity, for driver and HTTP tests.

They model behaviour the driver relies on (tokens live until revoked, reads need a live token) instead
of recording calls blindly.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from plugin.core.driver import Driver
from plugin.core.errors import (
    IdentityUnavailableError,
    MountError,
    PermissionDeniedError,
    TokenInvalidError,
    VaultError,
    VaultTransientError,
)
from plugin.core.ports import Mounter, StorePort, TokenSource, VaultPort, VolumeCredentials
from plugin.core.records import Fetched, IssuedToken, VolumeCredential
from plugin.core.scheduler import Scheduler
from plugin.core.spec import Spec
from plugin.settings import DEFAULT_ALLOWED_PATHS

T = TypeVar("T")

OPTIONS = {"role": "web", "secret.pw": "secret/data/web/db#password", "secret.all": "secret/data/web/db", "uid": "1000"}
SECRETS = {"secret/data/web/db": {"password": "hunter2", "username": "web"}}


class FakeVault(VaultPort):
    """Tokens are counters; `secrets` maps path -> data; failures are switched on by the test."""

    def __init__(self) -> None:
        self.secrets: dict[str, Mapping[str, Any]] = dict(SECRETS)
        self.live: dict[str, str] = {}  # token -> accessor
        self.minted: list[tuple[str | None, dict[str, str]]] = []  # (role, meta) of each mint
        self.reads: list[tuple[str, str]] = []
        self.renewed: list[str] = []  # accessors and lease IDs, in renewal order
        self.extended: list[str] = []  # accessors of provisional tokens extended at Mount
        self.asked_ttls: list[int] = []  # the ttl each mint asked for
        self.token_period: int | None = None  # like a periodic token role: every grant is this TTL
        self.renewable = True  # whether minted tokens can be renewed (a role's `renewable`)
        self.versions: dict[str, int] = {}  # KV v2 path -> current version
        self.dynamic: dict[str, int] = {}  # path -> lease duration of the credentials it issues
        self.leases: dict[str, str] = {}  # lease ID -> token that created it
        self.lease_renewal_ttl = 3600
        self.unavailable = False
        self.lease_revokers: set[str] = set()  # tokens whose policy grants sys/leases/revoke
        self.denied_paths: set[str] = set()
        self._ids = itertools.count(1)

    def mint_child(
        self, parent: str, role: str | None, ttl: int, meta: Mapping[str, str], display_name: str
    ) -> IssuedToken:
        self._check()
        n = next(self._ids)
        token, accessor = f"child-token-{n}", f"acc-{n}"
        self.live[token] = accessor
        self.minted.append((role, dict(meta)))
        self.asked_ttls.append(ttl)
        return IssuedToken(token, accessor, self.token_period or ttl, self.renewable)

    def fetch(self, token: str, path: str, params: tuple[tuple[str, str], ...] = ()) -> Fetched:
        self._check()
        assert token in self.live, "read with a revoked or unknown token"
        self.reads.append((token, path))
        if path in self.denied_paths:
            raise VaultError(f"Vault denied permission to read {path}: permission denied")
        if path in self.dynamic:
            n = next(self._ids)
            lease = f"{path}/lease-{n}"
            self.leases[lease] = token
            return Fetched({"username": f"user-{n}", "password": f"pw-{n}"}, lease, self.dynamic[path], True)
        return Fetched(self.secrets[path], version=self.versions.get(path))

    def fetch_many(self, token: str, requests_: Sequence[tuple[str, tuple[tuple[str, str], ...]]]) -> list[Fetched]:
        return [self.fetch(token, path, params) for path, params in requests_]

    def concurrently(self, calls: Sequence[Callable[[], T]]) -> list[T]:
        return [call() for call in calls]

    def kv2_current_version(self, token: str, path: str) -> int:
        self._check()
        return self.versions[path]

    def renew_lease(self, token: str, lease_id: str, increment: int | None = None) -> int:
        self._check()
        if lease_id not in self.leases:
            raise VaultError("Vault refused to renew a lease: invalid lease ID")
        self.renewed.append(lease_id)
        return self.lease_renewal_ttl

    def revoke_lease(self, token: str, lease_id: str) -> None:
        """Like Vault with the docs' policies: only tokens given sys/leases/revoke (`lease_revokers`) may."""
        self._check()
        if token not in self.lease_revokers:
            raise PermissionDeniedError(f"Vault denied revoking lease {lease_id}: permission denied")
        self.leases.pop(lease_id, None)

    def lease_exists(self, token: str, lease_id: str) -> bool:
        return lease_id in self.leases

    def renew_self(self, token: str, increment: int | None = None) -> IssuedToken:
        """A renewal; with `increment`, the extension of a provisional token at Mount (kept apart in `extended`)."""
        self._check()
        if token not in self.live:
            raise TokenInvalidError("Vault says the token is not valid (could not renew a token): permission denied")
        (self.extended if increment else self.renewed).append(self.live[token])
        return IssuedToken(token, self.live[token], self.token_period or increment or 3600, True)

    def lookup_self(self, token: str) -> IssuedToken:
        self._check()
        if token not in self.live:
            raise TokenInvalidError(
                "Vault says the token is not valid (could not look up the plugin token): permission denied"
            )
        return IssuedToken(token, self.live[token], 3600, True)

    def mint_wrapped_child(
        self, parent: str, role: str | None, ttl: int, meta: Mapping[str, str], display_name: str, wrap_ttl: int
    ) -> tuple[str, str]:
        """Like Vault: the inner token lives (by accessor), the plugin sees only the wrapping token."""
        child = self.mint_child(parent, role, ttl, meta, display_name)
        return f"wrapping-{child.accessor}", child.accessor

    def revoke_accessor(self, token: str, accessor: str) -> None:
        self._check()
        for child, known in list(self.live.items()):
            if known == accessor:
                self.revoke_self(child)

    def capabilities(self, token: str, path: str) -> set[str]:
        """What the plugin token of the demo policy may do: create from token roles, revoke by accessor."""
        self._check()
        if token not in self.live and token != "plugin-token":
            raise TokenInvalidError(
                "Vault says the token is not valid (could not check capabilities): permission denied"
            )
        if path == "sys/leases/revoke":
            return {"update"} if token in self.lease_revokers else {"deny"}
        return {"update"} if path.startswith(("auth/token/create", "auth/token/revoke-accessor")) else {"deny"}

    def revoke_self(self, token: str) -> None:
        self._check()
        self.live.pop(token, None)
        # Like Vault: revoking a token revokes the leases it created.
        for lease in [lease for lease, owner in self.leases.items() if owner == token]:
            del self.leases[lease]

    def _check(self) -> None:
        if self.unavailable:
            raise VaultTransientError("Vault at http://127.0.0.1:1 is unreachable")


class FakeMounter(Mounter):
    def __init__(self, root: Path) -> None:
        self.root = root
        self.mounted: dict[tuple[str, str], dict[str, Any]] = {}  # files, uid, gid, mode, size of each mount
        self.fail = False
        self.held: dict[tuple[str, str], list[int]] | None = None  # (volume, mount id) -> holder PIDs

    def view_path(self, volume: str, mount_id: str) -> Path:
        return self.root / volume / mount_id / "view"

    def is_mounted(self, volume: str, mount_id: str) -> bool:
        return (volume, mount_id) in self.mounted

    def mount(
        self, volume: str, mount_id: str, files: Mapping[str, bytes], *, uid: int, gid: int, mode: int, size: int
    ) -> Path:
        if self.fail:
            raise MountError("could not create the tmpfs: no space")
        self.mounted[(volume, mount_id)] = {"files": dict(files), "uid": uid, "gid": gid, "mode": mode, "size": size}
        return self.view_path(volume, mount_id)

    def rewrite(
        self, volume: str, mount_id: str, files: Mapping[str, bytes], *, uid: int, gid: int, mode: int
    ) -> list[str]:
        current = self.mounted[(volume, mount_id)]["files"]
        written = [name for name, content in files.items() if current.get(name) != content]
        current.update(files)
        return written

    def wipe(self, volume: str, mount_id: str) -> None:
        self.mounted[(volume, mount_id)]["files"] = {}

    def unmount(self, volume: str, mount_id: str) -> None:
        self.mounted.pop((volume, mount_id), None)

    def holders(self, volume: str, mount_id: str) -> list[int] | None:
        """What the test says holds each mount (`held`); None (cannot tell) unless it says."""
        found = self.holders_of([(volume, mount_id)])
        return None if found is None else found[(volume, mount_id)]

    def holders_of(self, mounts: Sequence[tuple[str, str]]) -> dict[tuple[str, str], list[int]] | None:
        if self.held is None:
            return None
        return {key: list(self.held.get(key, [])) if key in self.mounted else [] for key in mounts}


class FakeIdentity(TokenSource):
    def __init__(self) -> None:
        self.problem: str | None = None

    def token(self) -> str:
        if self.problem:
            raise IdentityUnavailableError(self.problem)
        return "plugin-token"


class FakeClock:
    """A monotonic clock the test moves by hand."""

    def __init__(self, now: float = 1000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class FakeCredentials(VolumeCredentials):
    """`wrapped-token=` volumes are tested against real OpenBao (tests/test_wrapping_openbao.py)."""

    def unwrap(self, name: str, spec: Spec, allowed_paths: Sequence[str]) -> tuple[VolumeCredential, int]:
        raise AssertionError("the driver tests make no wrapped-token volumes")


def driver_over_fakes(
    store: StorePort, vault: VaultPort, identity: TokenSource, mounter: Mounter, scheduler: Scheduler, **options: Any
) -> Driver:
    """The driver as the composition root makes it, over these fakes (host `host-a`, default allow-list)."""
    return Driver(
        store,
        vault,
        identity,
        mounter,
        scheduler,
        hostname="host-a",
        credentials=FakeCredentials(),
        wrap_allowed_paths=DEFAULT_ALLOWED_PATHS,
        **options,
    )


if TYPE_CHECKING:  # mypy: each fake implements every method of its port (an abstract one cannot be made)
    _PORTS: tuple[VaultPort, Mounter, TokenSource, VolumeCredentials] = (
        FakeVault(),
        FakeMounter(Path()),
        FakeIdentity(),
        FakeCredentials(),
    )
