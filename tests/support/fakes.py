"""Small hand-written fakes of the Vault adapter, the mounter and the identity, for driver and HTTP tests.

They model behaviour the driver relies on (tokens live until revoked, reads need a live token) instead
of recording calls blindly.
"""

from __future__ import annotations

import itertools
from pathlib import Path

from plugin.core.errors import (
    IdentityUnavailableError,
    MountError,
    TokenInvalidError,
    VaultError,
    VaultTransientError,
)
from plugin.core.ports import Mounter, TokenSource, VaultPort, VolumeCredentials
from plugin.core.records import Fetched, IssuedToken

OPTIONS = {"role": "web", "secret.pw": "secret/data/web/db#password", "secret.all": "secret/data/web/db", "uid": "1000"}
SECRETS = {"secret/data/web/db": {"password": "hunter2", "username": "web"}}


class FakeVault(VaultPort):
    """Tokens are counters; `secrets` maps path -> data; failures are switched on by the test."""

    def __init__(self):
        self.secrets = dict(SECRETS)
        self.live: dict[str, str] = {}  # token -> accessor
        self.minted: list[tuple[str, dict]] = []
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
        self.denied_paths: set[str] = set()
        self._ids = itertools.count(1)

    def mint_child(self, parent, role, ttl, meta, display_name):
        self._check()
        n = next(self._ids)
        token, accessor = f"child-token-{n}", f"acc-{n}"
        self.live[token] = accessor
        self.minted.append((role, dict(meta)))
        self.asked_ttls.append(ttl)
        return IssuedToken(token, accessor, self.token_period or ttl, self.renewable)

    def fetch(self, token, path, params=()):
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

    def fetch_many(self, token, requests):
        return [self.fetch(token, path, params) for path, params in requests]

    def concurrently(self, calls):
        return [call() for call in calls]

    def kv2_current_version(self, token, path):
        self._check()
        return self.versions[path]

    def renew_lease(self, token, lease_id, increment=None):
        self._check()
        if lease_id not in self.leases:
            raise VaultError("Vault refused to renew a lease: invalid lease ID")
        self.renewed.append(lease_id)
        return self.lease_renewal_ttl

    def revoke_lease(self, token, lease_id):
        self._check()
        self.leases.pop(lease_id, None)

    def lease_exists(self, token, lease_id):
        return lease_id in self.leases

    def renew_self(self, token, increment=None):
        """A renewal; with `increment`, the extension of a provisional token at Mount (kept apart in `extended`)."""
        self._check()
        if token not in self.live:
            raise TokenInvalidError("Vault says the token is not valid (could not renew a token): permission denied")
        (self.extended if increment else self.renewed).append(self.live[token])
        return IssuedToken(token, self.live[token], self.token_period or increment or 3600, True)

    def lookup_self(self, token):
        self._check()
        if token not in self.live:
            raise TokenInvalidError(
                "Vault says the token is not valid (could not look up the plugin token): permission denied"
            )
        return IssuedToken(token, self.live[token], 3600, True)

    def revoke_self(self, token):
        self._check()
        self.live.pop(token, None)
        # Like Vault: revoking a token revokes the leases it created.
        for lease in [lease for lease, owner in self.leases.items() if owner == token]:
            del self.leases[lease]

    def _check(self):
        if self.unavailable:
            raise VaultTransientError("Vault at http://127.0.0.1:1 is unreachable")


class FakeMounter(Mounter):
    def __init__(self, root: Path):
        self.root = root
        self.mounted: dict[tuple[str, str], dict] = {}
        self.fail = False

    def view_path(self, volume, mount_id):
        return self.root / volume / mount_id / "view"

    def is_mounted(self, volume, mount_id):
        return (volume, mount_id) in self.mounted

    def mount(self, volume, mount_id, files, *, uid, gid, mode, size):
        if self.fail:
            raise MountError("could not create the tmpfs: no space")
        self.mounted[(volume, mount_id)] = {"files": dict(files), "uid": uid, "gid": gid, "mode": mode, "size": size}
        return self.view_path(volume, mount_id)

    def rewrite(self, volume, mount_id, files, *, uid, gid, mode):
        current = self.mounted[(volume, mount_id)]["files"]
        written = [name for name, content in files.items() if current.get(name) != content]
        current.update(files)
        return written

    def unmount(self, volume, mount_id):
        self.mounted.pop((volume, mount_id), None)


class FakeIdentity(TokenSource):
    def __init__(self):
        self.problem: str | None = None

    def token(self):
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

    def unwrap(self, name, spec, allowed_paths):
        raise AssertionError("the driver tests make no wrapped-token volumes")
