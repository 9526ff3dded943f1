"""The Vault/OpenBao adapter: the only module that imports hvac.

Every call passes its token explicitly: hvac would otherwise pick up `VAULT_TOKEN`, `~/.vault-token`
or CA variables from the environment. hvac and requests errors are translated here, once, into the
plugin's error family; callers never see an hvac exception. Messages name the operation and path,
never a token or a secret value.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

import hvac
import hvac.exceptions
import requests
import requests.adapters

from plugin.errors import VaultError, VaultUnavailableError, WrappingTokenError
from plugin.metrics import VAULT_ERRORS, VAULT_SECONDS

log = logging.getLogger(__name__)
T = TypeVar("T")

FETCH_THREADS = 8


@dataclasses.dataclass(frozen=True)
class IssuedToken:
    """A Vault token with what Vault said of it at issue or renewal. `ttl` is in seconds."""

    token: str = dataclasses.field(repr=False)
    accessor: str
    ttl: int
    renewable: bool

    @classmethod
    def from_auth(cls, auth: Mapping[str, Any]) -> "IssuedToken":
        """From the `auth` block of a Vault response (login, token create, unwrapped token)."""
        return cls(auth["client_token"], auth["accessor"], int(auth["lease_duration"]), bool(auth["renewable"]))


@dataclasses.dataclass(frozen=True)
class Fetched:
    """A secret as Vault answered it: its data, and its lease (dynamic secrets) or KV v2 version."""

    data: Mapping[str, Any] = dataclasses.field(repr=False)
    lease_id: str | None = None
    lease_duration: int = 0
    renewable: bool = False
    version: int | None = None


@dataclasses.dataclass(frozen=True)
class WrapInfo:
    """What `sys/wrapping/lookup` reveals of a wrapping token without consuming it."""

    creation_path: str
    creation_time: str
    ttl: int


class Vault:
    """A connection to one Vault server. Thread-safe: HTTP connections are pooled and kept alive."""

    def __init__(self, addr: str, *, cacert: str | None = None, namespace: str | None = None, timeout: float = 5.0):
        self._addr = addr.rstrip("/")
        self._verify: str | bool = cacert or True
        self._namespace = namespace or None
        self._timeout = timeout
        self._session = requests.Session()
        # Configuration is explicit: no proxy, CA bundle or .netrc credentials picked up from the environment.
        self._session.trust_env = False
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._pool_lock = threading.Lock()
        adapter = requests.adapters.HTTPAdapter(pool_connections=4, pool_maxsize=32)
        self._session.mount("http://", adapter)
        self._session.mount("https://", adapter)

    def _client(self, token: str) -> hvac.Client:
        # token="" rather than None: None makes hvac read VAULT_TOKEN / ~/.vault-token.
        return hvac.Client(
            url=self._addr,
            token=token,
            verify=self._verify,
            cert=False,
            timeout=self._timeout,
            namespace=self._namespace,
            session=self._session,
        )

    # -- response wrapping ----------------------------------------------------------------------

    def lookup_wrapping(self, wrapping_token: str) -> WrapInfo:
        """Inspect a wrapping token without consuming it. Raises `WrappingTokenError` if it is not valid."""
        try:
            response = self._call(
                "lookup_wrapping", "look up the wrapping token",
                lambda: self._client("").adapter.post("/v1/sys/wrapping/lookup", json={"token": wrapping_token}),
            )
        except VaultUnavailableError:
            raise
        except VaultError as e:
            raise WrappingTokenError("the wrapping token is not valid: it was already unwrapped, or it expired") from e
        data = response["data"]
        return WrapInfo(data["creation_path"], data["creation_time"], int(data["creation_ttl"]))

    def unwrap(self, wrapping_token: str) -> Mapping[str, Any]:
        """Consume a wrapping token and return the wrapped response. Raises `WrappingTokenError` if refused."""
        try:
            # hvac sends the wrapping token as X-Vault-Token and nothing in the body.
            return self._call("unwrap", "unwrap the wrapping token", lambda: self._client(wrapping_token).sys.unwrap())
        except VaultUnavailableError:
            raise
        except VaultError as e:
            raise WrappingTokenError("the wrapping token was refused at unwrap: someone else unwrapped it first") from e

    # -- tokens ---------------------------------------------------------------------------------

    def approle_login(self, mount: str, role_id: str, secret_id: str) -> IssuedToken:
        response = self._call(
            "login", f"log in with AppRole at auth/{mount}",
            lambda: self._client("").auth.approle.login(role_id=role_id, secret_id=secret_id, mount_point=mount),
        )
        return IssuedToken.from_auth(response["auth"])

    def mint_child(self, parent: str, role: str | None, ttl: int, meta: Mapping[str, str], display_name: str) -> IssuedToken:
        """Create a child token of `parent`: from token role `role`, or with the parent's policies if None."""
        response = self._call(
            "mint", _minting(role),
            lambda: self._client(parent).auth.token.create(
                role_name=role, ttl=f"{ttl}s", meta=dict(meta), renewable=True, display_name=display_name
            ),
        )
        return IssuedToken.from_auth(response["auth"])

    def mint_wrapped_child(self, parent: str, role: str | None, ttl: int, meta: Mapping[str, str], display_name: str,
                           wrap_ttl: int) -> tuple[str, str]:
        """Like `mint_child`, but Vault answers with a single-use wrapping token around the new token.

        Returns (wrapping token, accessor of the wrapped token); the plugin never sees the inner token.
        """
        response = self._call(
            "mint", _minting(role),
            lambda: self._client(parent).auth.token.create(
                role_name=role, ttl=f"{ttl}s", meta=dict(meta), renewable=True, display_name=display_name,
                wrap_ttl=f"{wrap_ttl}s",
            ),
        )
        return response["wrap_info"]["token"], response["wrap_info"]["wrapped_accessor"]

    def revoke_accessor(self, token: str, accessor: str) -> None:
        """Revoke the token behind `accessor` (and its children) using `token`'s rights on auth/token/revoke-accessor."""
        try:
            self._call("revoke_accessor", "revoke a token by accessor",
                       lambda: self._client(token).adapter.post("/v1/auth/token/revoke-accessor", json={"accessor": accessor}))
        except VaultUnavailableError:
            raise
        except VaultError as e:
            # Vault answers 400 "invalid accessor" for a token that is already gone.
            if not isinstance(e.__cause__, hvac.exceptions.InvalidRequest):
                raise

    def capabilities(self, token: str, path: str) -> set[str]:
        """What `token` may do on `path` (sys/capabilities-self)."""
        response = self._call(
            "capabilities", f"check capabilities on {path}",
            lambda: self._client(token).adapter.post("/v1/sys/capabilities-self", json={"paths": [path]}),
        )
        return set(response["data"].get(path) or response["data"].get("capabilities") or [])

    def lookup_self(self, token: str) -> IssuedToken:
        response = self._call("lookup_self", "look up the plugin token", lambda: self._client(token).auth.token.lookup_self())
        data = response["data"]
        return IssuedToken(token, data["accessor"], int(data["ttl"]), bool(data.get("renewable")))

    def renew_self(self, token: str) -> IssuedToken:
        response = self._call("renew_token", "renew a token", lambda: self._client(token).auth.token.renew_self())
        return IssuedToken.from_auth(response["auth"])

    def revoke_self(self, token: str) -> None:
        """Revoke `token` and with it its children and leases. A token Vault no longer knows counts as revoked."""
        try:
            self._call("revoke_token", "revoke a token", lambda: self._client(token).auth.token.revoke_self())
        except VaultUnavailableError:
            raise
        except VaultError as e:
            if not isinstance(e.__cause__, hvac.exceptions.Forbidden):
                raise
            log.debug("token already invalid at revocation; nothing left to revoke")

    # -- secrets --------------------------------------------------------------------------------

    def fetch(self, token: str, path: str, params: tuple[tuple[str, str], ...] = ()) -> Fetched:
        """Read `path`, or write `params` to it (dynamic secrets such as pki/issue/...), with what Vault
        said of the answer: its lease, or for KV v2 its version."""
        if params:
            response = self._call("write", f"write to {path}", lambda: self._client(token).write_data(path, data=dict(params)))
        else:
            response = self._call("read", f"read {path}", lambda: self._client(token).read(path))
        if not response or response.get("data") is None:
            raise VaultError(f"Vault has no secret at {path}: check the path (KV v2 paths contain /data/)")
        data, version = response["data"], None
        if _is_kv2(path, data):
            if data["data"] is None:
                raise VaultError(f"the current version of {path} is deleted: write a new version or undelete it")
            data, version = data["data"], data["metadata"].get("version")
        return Fetched(data, response.get("lease_id") or None, int(response.get("lease_duration") or 0),
                       bool(response.get("renewable")), version)

    def fetch_many(self, token: str, requests_: Sequence[tuple[str, tuple[tuple[str, str], ...]]]) -> list[Fetched]:
        """`fetch` each (path, params) concurrently, results in order: a Mount of n independent secrets costs
        about one round trip, not n. The first error is raised once all requests have ended."""
        if len(requests_) <= 1:
            return [self.fetch(token, path, params) for path, params in requests_]
        futures = [self._pool().submit(self.fetch, token, path, params) for path, params in requests_]
        concurrent.futures.wait(futures)
        return [future.result() for future in futures]

    def _pool(self) -> concurrent.futures.ThreadPoolExecutor:
        # Made on first use, so after gunicorn's fork; threads start only as requests need them.
        with self._pool_lock:
            if self._executor is None:
                self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=FETCH_THREADS, thread_name_prefix="vault")
            return self._executor

    def kv2_current_version(self, token: str, path: str) -> int:
        """The newest version of the KV v2 secret at data path `path`, from its metadata (no secret sent)."""
        mount, _, rest = path.partition("/data/")
        response = self._call("kv_metadata", f"read the metadata of {path}", lambda: self._client(token).read(f"{mount}/metadata/{rest}"))
        return int(response["data"]["current_version"])

    # -- leases ---------------------------------------------------------------------------------

    def renew_lease(self, token: str, lease_id: str, increment: int | None = None) -> int:
        """Renew a lease; returns its new duration in seconds (shorter than asked near its max TTL)."""
        response = self._call("renew_lease", "renew a lease", lambda: self._client(token).sys.renew_lease(lease_id, increment=increment))
        return int(response["lease_duration"])

    def revoke_lease(self, token: str, lease_id: str) -> None:
        """Revoke a lease. A lease Vault no longer knows counts as revoked."""
        try:
            self._call("revoke_lease", "revoke a lease", lambda: self._client(token).sys.revoke_lease(lease_id))
        except VaultUnavailableError:
            raise
        except VaultError as e:
            if not isinstance(e.__cause__, (hvac.exceptions.InvalidRequest, hvac.exceptions.Forbidden)):
                raise

    def lease_ttl(self, token: str, lease_id: str) -> int | None:
        """Seconds left on `lease_id`, or None if Vault no longer knows it (sys/leases/lookup, which the
        default policy allows)."""
        try:
            response = self._call("lookup_lease", "look up a lease", lambda: self._client(token).sys.read_lease(lease_id))
        except VaultUnavailableError:
            raise
        except VaultError as e:
            if isinstance(e.__cause__, hvac.exceptions.InvalidRequest):
                return None
            raise
        return int(response["data"].get("ttl") or 0)

    def lease_exists(self, token: str, lease_id: str) -> bool:
        return self.lease_ttl(token, lease_id) is not None

    # -- server ---------------------------------------------------------------------------------

    def health(self) -> Mapping[str, Any]:
        """sys/health (no token): `initialized`, `sealed`, `version`... Raises `VaultUnavailableError`."""
        def read() -> Mapping[str, Any]:
            # Standby, sealed and uninitialised servers answer with other codes: ask for 200 regardless.
            response = self._session.get(f"{self._addr}/v1/sys/health", verify=self._verify, timeout=self._timeout,
                                         params={"standbyok": "true", "sealedcode": "200", "uninitcode": "200"})
            response.raise_for_status()
            return response.json()

        return self._call("health", "check Vault's health", read)

    # -- error translation ----------------------------------------------------------------------

    def _call(self, operation: str, what: str, fn: Callable[[], T]) -> T:
        """Run one Vault request, timing it under `operation` and translating its errors (`what` words them)."""
        started = time.monotonic()
        try:
            return self._translate(what, fn)
        except VaultUnavailableError:
            VAULT_ERRORS.labels(operation, "unavailable").inc()
            raise
        except VaultError:
            VAULT_ERRORS.labels(operation, "refused").inc()
            raise
        finally:
            VAULT_SECONDS.labels(operation).observe(time.monotonic() - started)

    def _translate(self, what: str, fn: Callable[[], T]) -> T:
        try:
            return fn()
        # SSLError is a ConnectionError: catch it first for the more useful message.
        except requests.exceptions.SSLError as e:
            raise VaultUnavailableError(f"TLS to Vault at {self._addr} failed: set VAULT_CACERT to the CA that signed its certificate") from e
        except (requests.ConnectionError, requests.Timeout) as e:
            raise VaultUnavailableError(
                f"Vault at {self._addr} is unreachable (could not {what} within {self._timeout:g}s): "
                "check that it is running and that VAULT_ADDR is right"
            ) from e
        except requests.HTTPError as e:
            raise VaultError(f"Vault refused to {what}: HTTP {e.response.status_code}") from e
        except (hvac.exceptions.VaultDown, hvac.exceptions.BadGateway) as e:
            raise VaultUnavailableError(f"Vault at {self._addr} is sealed or down (could not {what})") from e
        except hvac.exceptions.Forbidden as e:
            raise VaultError(f"Vault denied permission to {what}: {_reasons(e)}") from e
        except hvac.exceptions.InvalidPath as e:
            raise VaultError(f"Vault found nothing to {what} (404): check the path") from e
        except hvac.exceptions.VaultError as e:
            raise VaultError(f"Vault refused to {what}: {_reasons(e)}") from e


def _minting(role: str | None) -> str:
    if role is None:
        return "create a child token (auth/token/create)"
    return f"create a token from token role {role!r} (auth/token/create/{role})"


def _is_kv2(path: str, data: Mapping[str, Any]) -> bool:
    """KV v2 answers `{data, metadata}` under a `<mount>/data/...` path."""
    return "/data/" in f"/{path}" and set(data) == {"data", "metadata"} and isinstance(data["metadata"], dict)


def _reasons(e: hvac.exceptions.VaultError) -> str:
    # Vault's error strings describe the failure ("permission denied", "role not found"); they do not
    # echo the request's token. Bounded in case a server sends something long.
    reasons = "; ".join(str(r) for r in (e.errors or [])) or "no reason given"
    return reasons[:300]
