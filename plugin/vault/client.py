"""The Vault/OpenBao adapter of the plugin: the Vault API the core's `VaultPort` needs, over `transport`
(HTTP, TLS, the one classification of failures and the retries).

Every call passes its token explicitly: hvac would otherwise pick up `VAULT_TOKEN`, `~/.vault-token` or
CA variables from the environment. Each method reads Vault's answer into the core's records; an answer
without the fields it should hold is a `VaultError` naming the request. Errors are classified and
retried in `transport`, once; callers never see an hvac exception.
"""

from __future__ import annotations

import concurrent.futures
import functools
import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Concatenate, ParamSpec, TypeVar

import hvac.exceptions

from plugin.core import retry
from plugin.core.errors import (
    PermissionDeniedError,
    TLSError,
    TokenInvalidError,
    VaultError,
    VaultTransientError,
    WrappingTokenError,
)
from plugin.core.metrics import uncounted, waited_on_vault
from plugin.core.ports import VaultPort
from plugin.core.records import Fetched, IssuedToken, WrapInfo
from plugin.vault.transport import Transport, reasons, says

log = logging.getLogger(__name__)
T = TypeVar("T")
R = TypeVar("R")
P = ParamSpec("P")

FETCH_THREADS = 8


def _answer_read(method: Callable[Concatenate[Vault, P], R]) -> Callable[Concatenate[Vault, P], R]:
    """For a method that reads fields of Vault's answer: an answer without them (a proxy's JSON, another
    server) is a `VaultError` naming the method's request, not a KeyError or TypeError deep in the plugin."""

    def read(self: Vault, /, *args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return method(self, *args, **kwargs)
        except (KeyError, TypeError, AttributeError, ValueError) as e:
            raise VaultError(
                f"Vault at {self._http.addr} answered {method.__name__.replace('_', ' ')} without what such an answer "
                # Only the kind and, for a missing field, its name: a ValueError's text quotes the value it met.
                f"holds ({type(e).__name__}{f' {e}' if isinstance(e, KeyError) else ''}): check that VAULT_ADDR "
                "points at Vault, not a proxy or another server"
            ) from e

    functools.update_wrapper(read, method)
    return read


class Vault(VaultPort):
    """A connection to one Vault server (or cluster address). Thread-safe: HTTP connections are pooled.

    `cacert`: CA bundle (file or directory) that signed Vault's certificate; None trusts the system's
    CAs. `client_cert`/`client_key`: for a listener that requires client certificates. Verification
    cannot be turned off.
    """

    def __init__(
        self,
        addr: str,
        *,
        cacert: str | None = None,
        client_cert: str | None = None,
        client_key: str | None = None,
        namespace: str | None = None,
        timeout: float = 5.0,
    ):
        self._http = Transport(
            addr, cacert=cacert, client_cert=client_cert, client_key=client_key, namespace=namespace, timeout=timeout
        )
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._pool_lock = threading.Lock()

    # -- response wrapping ----------------------------------------------------------------------

    @_answer_read
    def lookup_wrapping(self, wrapping_token: str) -> WrapInfo:
        """Inspect a wrapping token without consuming it.

        Raises `WrappingTokenError` if Vault says it is not valid (used or expired), `VaultTransientError`
        if Vault could not answer (that says nothing about the token)."""
        try:
            response = self._http.json(
                "lookup_wrapping",
                "look up the wrapping token",
                lambda t: self._http.client("", t).adapter.post(
                    "/v1/sys/wrapping/lookup", json={"token": wrapping_token}
                ),
            )
        except (VaultTransientError, TLSError):
            raise
        except VaultError as e:
            raise WrappingTokenError("the wrapping token is not valid: it was already unwrapped, or it expired") from e
        data = response["data"]
        return WrapInfo(data["creation_path"], data["creation_time"], int(data["creation_ttl"]))

    def unwrap(self, wrapping_token: str) -> Mapping[str, Any]:
        """Consume a wrapping token and return the wrapped response.

        Retried only while the token cannot have been consumed (Vault answered with an error, or the
        request never left). Raises `WrappingTokenError` if refused, `AnswerLostError` if the request
        was sent but no answer came back (the token may be spent), `VaultTransientError` otherwise."""
        try:
            # hvac sends the wrapping token as X-Vault-Token and nothing in the body.
            return self._http.json(
                "unwrap",
                "unwrap the wrapping token",
                lambda t: self._http.client(wrapping_token, t).sys.unwrap(),
                repeatable=False,
            )
        except (VaultTransientError, TLSError):
            raise
        except VaultError as e:
            raise WrappingTokenError("the wrapping token was refused at unwrap: someone else unwrapped it first") from e

    # -- tokens ---------------------------------------------------------------------------------

    @_answer_read
    def approle_login(self, mount: str, role_id: str, secret_id: str) -> IssuedToken:
        response = self._http.json(
            "login",
            f"log in with AppRole at auth/{mount}",
            lambda t: self._http.client("", t).auth.approle.login(
                role_id=role_id, secret_id=secret_id, mount_point=mount
            ),
        )
        return issued_from_auth(response["auth"])

    @_answer_read
    def mint_child(
        self, parent: str, role: str | None, ttl: int, meta: Mapping[str, str], display_name: str
    ) -> IssuedToken:
        """Create a child token of `parent`: from token role `role`, or with the parent's policies if None.

        The TTL granted (`IssuedToken.ttl`) may differ from `ttl`: a role's period or max TTL wins. A
        retried create whose first answer was lost leaves a token nobody holds: keep `ttl` short."""
        response = self._http.json(
            "mint",
            _minting(role),
            lambda t: self._http.client(parent, t).auth.token.create(
                role_name=role, ttl=f"{ttl}s", meta=dict(meta), renewable=True, display_name=display_name
            ),
        )
        return issued_from_auth(response["auth"])

    @_answer_read
    def mint_wrapped_child(
        self, parent: str, role: str | None, ttl: int, meta: Mapping[str, str], display_name: str, wrap_ttl: int
    ) -> tuple[str, str]:
        """Like `mint_child`, but Vault answers with a single-use wrapping token around the new token.

        Returns (wrapping token, accessor of the wrapped token); the plugin never sees the inner token.
        """
        response = self._http.json(
            "mint",
            _minting(role),
            lambda t: self._http.client(parent, t).auth.token.create(
                role_name=role,
                ttl=f"{ttl}s",
                meta=dict(meta),
                renewable=True,
                display_name=display_name,
                wrap_ttl=f"{wrap_ttl}s",
            ),
        )
        return response["wrap_info"]["token"], response["wrap_info"]["wrapped_accessor"]

    def revoke_accessor(self, token: str, accessor: str) -> None:
        """Revoke the token behind `accessor` (and its children) using `token`'s rights on auth/token/revoke-accessor."""
        try:
            self._http.call(
                "revoke_accessor",
                "revoke a token by accessor",
                lambda t: self._http.client(token, t).adapter.post(
                    "/v1/auth/token/revoke-accessor", json={"accessor": accessor}
                ),
            )
        except (VaultTransientError, TLSError):
            raise
        except VaultError as e:
            # Vault answers 400 "invalid accessor" for a token that is already gone.
            if not isinstance(e.__cause__, hvac.exceptions.InvalidRequest):
                raise

    @_answer_read
    def capabilities(self, token: str, path: str) -> set[str]:
        """What `token` may do on `path` (sys/capabilities-self)."""
        response = self._http.json(
            "capabilities",
            f"check capabilities on {path}",
            lambda t: self._http.client(token, t).adapter.post("/v1/sys/capabilities-self", json={"paths": [path]}),
        )
        return set(response["data"].get(path) or response["data"].get("capabilities") or [])

    @_answer_read
    def lookup_self(self, token: str) -> IssuedToken:
        """What Vault says of `token` now. Raises `TokenInvalidError` if it is not valid any more."""
        response = self._token_call(
            "lookup_self", "look up the plugin token", lambda t: self._http.client(token, t).auth.token.lookup_self()
        )
        data = response["data"]
        return IssuedToken(token, data["accessor"], int(data["ttl"]), bool(data.get("renewable")))

    @_answer_read
    def renew_self(self, token: str, increment: int | None = None) -> IssuedToken:
        """Renew `token` (by `increment` seconds if given; Vault may grant less). Raises `TokenInvalidError`
        if it is not valid any more."""
        response = self._token_call(
            "renew_token",
            "renew a token",
            lambda t: self._http.client(token, t).auth.token.renew_self(
                increment=f"{increment}s" if increment else None
            ),
        )
        return issued_from_auth(response["auth"])

    def revoke_self(self, token: str) -> None:
        """Revoke `token` and with it its children and leases. A token Vault no longer knows counts as revoked."""
        try:
            self._http.call(
                "revoke_token", "revoke a token", lambda t: self._http.client(token, t).auth.token.revoke_self()
            )
        except (VaultTransientError, TLSError):
            raise
        except VaultError as e:
            if not isinstance(e.__cause__, hvac.exceptions.Forbidden):
                raise
            log.debug("token already invalid at revocation; nothing left to revoke")

    def _token_call(self, operation: str, what: str, fn: Callable[[float], object]) -> dict[str, Any]:
        """A call on the token itself (`*-self`): Vault's 403, or 400 "invalid/bad token", says the token is gone."""
        try:
            return self._http.json(operation, what, fn)
        except (VaultTransientError, TLSError):
            raise
        except VaultError as e:
            cause = e.__cause__
            if isinstance(cause, hvac.exceptions.Forbidden) or (
                isinstance(cause, hvac.exceptions.InvalidRequest) and says(cause, "invalid token", "bad token")
            ):
                raise TokenInvalidError(
                    f"Vault says the token is not valid (could not {what}): {reasons(cause)}"
                ) from cause
            raise

    # -- secrets --------------------------------------------------------------------------------

    @_answer_read
    def fetch(self, token: str, path: str, params: tuple[tuple[str, str], ...] = ()) -> Fetched:
        """Read `path`, or write `params` to it (dynamic secrets such as pki/issue/...), with what Vault
        said of the answer: its lease, or for KV v2 its version."""
        if params:
            response = self._http.json(
                "write",
                f"write to {path}",
                lambda t: self._http.client(token, t).write_data(path, data=dict(params)),
                empty_ok=True,
            )
        else:
            response = self._http.json(
                "read", f"read {path}", lambda t: self._http.client(token, t).read(path), empty_ok=True
            )
        if not response or response.get("data") is None:
            raise VaultError(f"Vault has no secret at {path}: check the path (KV v2 paths contain /data/)")
        data, version = response["data"], None
        if _is_kv2(path, data):
            if data["data"] is None:
                raise VaultError(f"the current version of {path} is deleted: write a new version or undelete it")
            data, version = data["data"], data["metadata"].get("version")
        lease_id = response.get("lease_id") or None
        return Fetched(
            data,
            lease_id,
            int(response.get("lease_duration") or 0),
            bool(response.get("renewable")),
            version,
            None if lease_id else _expiration(data),
        )

    def fetch_many(self, token: str, requests_: Sequence[tuple[str, tuple[tuple[str, str], ...]]]) -> list[Fetched]:
        """`fetch` each (path, params) concurrently, results in order (see `concurrently`)."""
        return self.concurrently([functools.partial(self.fetch, token, path, params) for path, params in requests_])

    def concurrently(self, calls: Sequence[Callable[[], T]]) -> list[T]:
        """Run independent calls of this adapter concurrently, results in order: a Mount of n secrets costs
        about one round trip, not n. Each runs within the caller's budget. The first error is raised once
        all have ended. Calls must not themselves use `concurrently` (the pool is shared)."""
        if len(calls) <= 1:
            return [call() for call in calls]
        started = time.monotonic()
        # The caller waits for all at once: that wait is what it spent on Vault, not the sum of the calls.
        futures = [self._pool().submit(retry.run_in_context(uncounted(call))) for call in calls]
        concurrent.futures.wait(futures)
        waited_on_vault(time.monotonic() - started)
        return [future.result() for future in futures]

    def _pool(self) -> concurrent.futures.ThreadPoolExecutor:
        # Made on first use, so after gunicorn's fork; threads start only as requests need them.
        with self._pool_lock:
            if self._executor is None:
                self._executor = concurrent.futures.ThreadPoolExecutor(
                    max_workers=FETCH_THREADS, thread_name_prefix="vault"
                )
            return self._executor

    @_answer_read
    def kv2_current_version(self, token: str, path: str) -> int:
        """The newest version of the KV v2 secret at data path `path`, from its metadata (no secret sent)."""
        mount, _, rest = path.partition("/data/")
        response = self._http.json(
            "kv_metadata",
            f"read the metadata of {path}",
            lambda t: self._http.client(token, t).read(f"{mount}/metadata/{rest}"),
        )
        return int(response["data"]["current_version"])

    # -- leases ---------------------------------------------------------------------------------

    @_answer_read
    def renew_lease(self, token: str, lease_id: str, increment: int | None = None) -> int:
        """Renew a lease; returns its new duration in seconds (shorter than asked near its max TTL)."""
        response = self._http.json(
            "renew_lease",
            "renew a lease",
            lambda t: self._http.client(token, t).sys.renew_lease(lease_id, increment=increment),
        )
        return int(response["lease_duration"])

    def revoke_lease(self, token: str, lease_id: str) -> None:
        """Revoke a lease (Vault takes an unknown lease ID as revoked). Raises `PermissionDeniedError` when
        `token` may not: a refusal is never taken for success."""
        try:
            self._http.call(
                "revoke_lease", "revoke a lease", lambda t: self._http.client(token, t).sys.revoke_lease(lease_id)
            )
        except (VaultTransientError, TLSError):
            raise
        except VaultError as e:
            if isinstance(e.__cause__, hvac.exceptions.Forbidden):
                raise PermissionDeniedError(
                    f"Vault denied revoking lease {lease_id}: the token's policy needs "
                    'path "sys/leases/revoke" { capabilities = ["update"] }'
                ) from e
            raise

    @_answer_read
    def lease_ttl(self, token: str, lease_id: str) -> int | None:
        """Seconds left on `lease_id`, or None if Vault no longer knows it (sys/leases/lookup, which the
        default policy allows)."""
        try:
            response = self._http.json(
                "lookup_lease", "look up a lease", lambda t: self._http.client(token, t).sys.read_lease(lease_id)
            )
        except (VaultTransientError, TLSError):
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
        """sys/health (no token): `initialized`, `sealed`, `version`... Over the same TLS settings as every
        other call. Raises `VaultTransientError` or `TLSError`."""

        def read(timeout: float) -> Mapping[str, Any]:
            # Standby, sealed and uninitialised servers answer with other codes: ask for 200 regardless.
            response = self._http.session.get(
                f"{self._http.addr}/v1/sys/health",
                timeout=timeout,
                params={"standbyok": "true", "sealedcode": "200", "uninitcode": "200"},
            )
            response.raise_for_status()
            health: Mapping[str, Any] = response.json()
            return health

        return self._http.call("health", "check Vault's health", read)


def issued_from_auth(auth: object) -> IssuedToken:
    """An `IssuedToken` from the `auth` block of a Vault answer (login, token create, unwrapped token).
    Raises `VaultError` for a block without a token, accessor or duration."""
    unusable = "Vault's answer holds no usable token (auth without client_token, accessor or lease_duration)"
    if not isinstance(auth, Mapping) or not isinstance(auth.get("client_token"), str) or not auth["client_token"]:
        raise VaultError(unusable)
    try:
        return IssuedToken(auth["client_token"], auth["accessor"], int(auth["lease_duration"]), bool(auth["renewable"]))
    except (KeyError, TypeError, ValueError) as e:
        raise VaultError(unusable) from e


def _minting(role: str | None) -> str:
    if role is None:
        return "create a child token (auth/token/create)"
    return f"create a token from token role {role!r} (auth/token/create/{role})"


def _is_kv2(path: str, data: Mapping[str, Any]) -> bool:
    """KV v2 answers `{data, metadata}` under a `<mount>/data/...` path."""
    return "/data/" in f"/{path}" and set(data) == {"data", "metadata"} and isinstance(data["metadata"], dict)


def _expiration(data: Mapping[str, Any]) -> float | None:
    """When a credential without a lease stops being valid, if its answer says (PKI issue/sign: `expiration`,
    seconds since the epoch)."""
    expiration = data.get("expiration")
    return float(expiration) if isinstance(expiration, int | float) and not isinstance(expiration, bool) else None
