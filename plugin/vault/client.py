"""The Vault/OpenBao adapter of the plugin (with `operator`, for migrate, the only modules that import hvac).

Every call passes its token explicitly: hvac would otherwise pick up `VAULT_TOKEN`, `~/.vault-token`
or CA variables from the environment. TLS settings live on the shared `requests.Session`, because hvac
takes `verify` and `cert` from a session it is given and ignores its own arguments then.

hvac and requests errors are translated here, once, into the plugin's error family, and classified
once: connection errors, timeouts, 5xx (but 501), 429 and 412 are `VaultTransientError`, retried while
the caller's budget (`plugin.core.retry`) lasts; everything else is final and never retried. Callers never
see an hvac exception. Messages name the operation and path, never a token or a secret value.
"""

from __future__ import annotations

import concurrent.futures
import contextvars
import functools
import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Concatenate, ParamSpec, TypeVar

import hvac
import hvac.adapters
import hvac.exceptions
import requests
import requests.adapters
import urllib3.exceptions

from plugin.core import retry
from plugin.core.errors import (
    AnswerLostError,
    TLSError,
    TokenInvalidError,
    VaultError,
    VaultTransientError,
    WrappingTokenError,
)
from plugin.core.metrics import VAULT_ERRORS, VAULT_RETRIES, VAULT_SECONDS
from plugin.core.ports import VaultPort
from plugin.core.records import Fetched, IssuedToken, WrapInfo

log = logging.getLogger(__name__)
T = TypeVar("T")
R = TypeVar("R")
P = ParamSpec("P")

FETCH_THREADS = 8
MAX_ANSWER = 4 << 20  # bytes: a secret, a certificate chain or a lease list is far smaller; more is not Vault
MIN_ATTEMPT = 0.5  # seconds: a retry is not worth sending with less budget left than this
RETRY_CAP = 2.0  # seconds between retries inside a budget, at most
# Vault's own client (api.DefaultRetryPolicy) retries these and 5xx but 501 (not initialised).
TRANSIENT_STATUSES = {412, 429}
# Said with a 400 for a moment after a KV engine is enabled or upgraded (on a new leader, too).
TRANSIENT_REASONS = ("Waiting for the primary to upgrade from non-versioned to versioned data",)


def _answer_read(method: Callable[Concatenate[Vault, P], R]) -> Callable[Concatenate[Vault, P], R]:
    """For a method that reads fields of Vault's answer: an answer without them (a proxy's JSON, another
    server) is a `VaultError` naming the method's request, not a KeyError or TypeError deep in the plugin."""

    def read(self: Vault, /, *args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return method(self, *args, **kwargs)
        except (KeyError, TypeError, AttributeError, ValueError) as e:
            raise VaultError(
                f"Vault at {self._addr} answered {method.__name__.replace('_', ' ')} without what such an answer "
                f"holds ({type(e).__name__} {e}): check that VAULT_ADDR points at Vault, not a proxy or another server"
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
        self._addr = addr.rstrip("/")
        self._cacert = cacert
        self._client_cert = client_cert
        self._namespace = namespace or None
        self._timeout = timeout
        self._session = requests.Session()
        # Configuration is explicit: no proxy, CA bundle or .netrc credentials picked up from the environment.
        self._session.trust_env = False
        # Here, not as hvac.Client arguments: hvac replaces those with the session's values (DESIGN 8).
        self._session.verify = cacert or True
        if client_cert:
            self._session.cert = (client_cert, client_key) if client_key else client_cert
        self._session.hooks["response"].append(_read_bounded)
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._pool_lock = threading.Lock()
        adapter = requests.adapters.HTTPAdapter(pool_connections=4, pool_maxsize=32)
        self._session.mount("http://", adapter)
        self._session.mount("https://", adapter)

    def _client(self, token: str, timeout: float) -> hvac.Client:
        # token="" rather than None: None makes hvac read VAULT_TOKEN / ~/.vault-token.
        return hvac.Client(
            url=self._addr,
            token=token,
            verify=self._session.verify,
            # ignore: hvac's stubs say cert is a (cert, key) pair and timeout an int; hvac hands both to
            # requests, which also takes one combined PEM file and float seconds (retry budgets cut them).
            cert=self._session.cert,  # type: ignore[arg-type]
            timeout=timeout,  # type: ignore[arg-type]
            namespace=self._namespace,
            session=self._session,
            adapter=_StatusAdapter,
        )

    # -- response wrapping ----------------------------------------------------------------------

    @_answer_read
    def lookup_wrapping(self, wrapping_token: str) -> WrapInfo:
        """Inspect a wrapping token without consuming it.

        Raises `WrappingTokenError` if Vault says it is not valid (used or expired), `VaultTransientError`
        if Vault could not answer (that says nothing about the token)."""
        try:
            response = self._json(
                "lookup_wrapping",
                "look up the wrapping token",
                lambda t: self._client("", t).adapter.post("/v1/sys/wrapping/lookup", json={"token": wrapping_token}),
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
            return self._json(
                "unwrap",
                "unwrap the wrapping token",
                lambda t: self._client(wrapping_token, t).sys.unwrap(),
                repeatable=False,
            )
        except (VaultTransientError, TLSError):
            raise
        except VaultError as e:
            raise WrappingTokenError("the wrapping token was refused at unwrap: someone else unwrapped it first") from e

    # -- tokens ---------------------------------------------------------------------------------

    @_answer_read
    def approle_login(self, mount: str, role_id: str, secret_id: str) -> IssuedToken:
        response = self._json(
            "login",
            f"log in with AppRole at auth/{mount}",
            lambda t: self._client("", t).auth.approle.login(role_id=role_id, secret_id=secret_id, mount_point=mount),
        )
        return issued_from_auth(response["auth"])

    @_answer_read
    def mint_child(
        self, parent: str, role: str | None, ttl: int, meta: Mapping[str, str], display_name: str
    ) -> IssuedToken:
        """Create a child token of `parent`: from token role `role`, or with the parent's policies if None.

        The TTL granted (`IssuedToken.ttl`) may differ from `ttl`: a role's period or max TTL wins. A
        retried create whose first answer was lost leaves a token nobody holds: keep `ttl` short."""
        response = self._json(
            "mint",
            _minting(role),
            lambda t: self._client(parent, t).auth.token.create(
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
        response = self._json(
            "mint",
            _minting(role),
            lambda t: self._client(parent, t).auth.token.create(
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
            self._call(
                "revoke_accessor",
                "revoke a token by accessor",
                lambda t: self._client(token, t).adapter.post(
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
        response = self._json(
            "capabilities",
            f"check capabilities on {path}",
            lambda t: self._client(token, t).adapter.post("/v1/sys/capabilities-self", json={"paths": [path]}),
        )
        return set(response["data"].get(path) or response["data"].get("capabilities") or [])

    @_answer_read
    def lookup_self(self, token: str) -> IssuedToken:
        """What Vault says of `token` now. Raises `TokenInvalidError` if it is not valid any more."""
        response = self._token_call(
            "lookup_self", "look up the plugin token", lambda t: self._client(token, t).auth.token.lookup_self()
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
            lambda t: self._client(token, t).auth.token.renew_self(increment=f"{increment}s" if increment else None),
        )
        return issued_from_auth(response["auth"])

    def revoke_self(self, token: str) -> None:
        """Revoke `token` and with it its children and leases. A token Vault no longer knows counts as revoked."""
        try:
            self._call("revoke_token", "revoke a token", lambda t: self._client(token, t).auth.token.revoke_self())
        except (VaultTransientError, TLSError):
            raise
        except VaultError as e:
            if not isinstance(e.__cause__, hvac.exceptions.Forbidden):
                raise
            log.debug("token already invalid at revocation; nothing left to revoke")

    def _token_call(self, operation: str, what: str, fn: Callable[[float], object]) -> dict[str, Any]:
        """A call on the token itself (`*-self`): Vault's 403, or 400 "invalid/bad token", says the token is gone."""
        try:
            return self._json(operation, what, fn)
        except (VaultTransientError, TLSError):
            raise
        except VaultError as e:
            cause = e.__cause__
            if isinstance(cause, hvac.exceptions.Forbidden) or (
                isinstance(cause, hvac.exceptions.InvalidRequest) and _says(cause, "invalid token", "bad token")
            ):
                raise TokenInvalidError(
                    f"Vault says the token is not valid (could not {what}): {_reasons(cause)}"
                ) from cause
            raise

    # -- secrets --------------------------------------------------------------------------------

    @_answer_read
    def fetch(self, token: str, path: str, params: tuple[tuple[str, str], ...] = ()) -> Fetched:
        """Read `path`, or write `params` to it (dynamic secrets such as pki/issue/...), with what Vault
        said of the answer: its lease, or for KV v2 its version."""
        if params:
            response = self._json(
                "write",
                f"write to {path}",
                lambda t: self._client(token, t).write_data(path, data=dict(params)),
                empty_ok=True,
            )
        else:
            response = self._json("read", f"read {path}", lambda t: self._client(token, t).read(path), empty_ok=True)
        if not response or response.get("data") is None:
            raise VaultError(f"Vault has no secret at {path}: check the path (KV v2 paths contain /data/)")
        data, version = response["data"], None
        if _is_kv2(path, data):
            if data["data"] is None:
                raise VaultError(f"the current version of {path} is deleted: write a new version or undelete it")
            data, version = data["data"], data["metadata"].get("version")
        return Fetched(
            data,
            response.get("lease_id") or None,
            int(response.get("lease_duration") or 0),
            bool(response.get("renewable")),
            version,
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
        futures = [self._pool().submit(retry.run_in_context(call)) for call in calls]
        concurrent.futures.wait(futures)
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
        response = self._json(
            "kv_metadata",
            f"read the metadata of {path}",
            lambda t: self._client(token, t).read(f"{mount}/metadata/{rest}"),
        )
        return int(response["data"]["current_version"])

    # -- leases ---------------------------------------------------------------------------------

    @_answer_read
    def renew_lease(self, token: str, lease_id: str, increment: int | None = None) -> int:
        """Renew a lease; returns its new duration in seconds (shorter than asked near its max TTL)."""
        response = self._json(
            "renew_lease",
            "renew a lease",
            lambda t: self._client(token, t).sys.renew_lease(lease_id, increment=increment),
        )
        return int(response["lease_duration"])

    def revoke_lease(self, token: str, lease_id: str) -> None:
        """Revoke a lease. A lease Vault no longer knows counts as revoked."""
        try:
            self._call("revoke_lease", "revoke a lease", lambda t: self._client(token, t).sys.revoke_lease(lease_id))
        except (VaultTransientError, TLSError):
            raise
        except VaultError as e:
            if not isinstance(e.__cause__, (hvac.exceptions.InvalidRequest, hvac.exceptions.Forbidden)):
                raise

    @_answer_read
    def lease_ttl(self, token: str, lease_id: str) -> int | None:
        """Seconds left on `lease_id`, or None if Vault no longer knows it (sys/leases/lookup, which the
        default policy allows)."""
        try:
            response = self._json(
                "lookup_lease", "look up a lease", lambda t: self._client(token, t).sys.read_lease(lease_id)
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
            response = self._session.get(
                f"{self._addr}/v1/sys/health",
                timeout=timeout,
                params={"standbyok": "true", "sealedcode": "200", "uninitcode": "200"},
            )
            response.raise_for_status()
            health: Mapping[str, Any] = response.json()
            return health

        return self._call("health", "check Vault's health", read)

    # -- retries and error translation ----------------------------------------------------------

    def _json(
        self,
        operation: str,
        what: str,
        fn: Callable[[float], object],
        *,
        repeatable: bool = True,
        empty_ok: bool = False,
    ) -> dict[str, Any]:
        """`_call` for an hvac request whose answer is read as Vault's JSON object.

        hvac's JSONAdapter (`_StatusAdapter`) returns that object for a 200 with a JSON body; it returns the
        `requests.Response` for any other success (a 204 has no body), and `Client.read` returns None for a
        404. Those are `{}` when `empty_ok` (the caller says what is missing), else a `VaultError`."""
        answer = self._call(operation, what, fn, repeatable=repeatable)
        if isinstance(answer, dict):
            return answer
        if isinstance(answer, requests.Response) and answer.status_code == 200:  # hvac's JSON decoding failed
            raise VaultError(_not_json(self._addr, what))
        if empty_ok:
            return {}
        raise VaultError(f"Vault answered without the data expected (could not {what})")

    def _call(self, operation: str, what: str, fn: Callable[[float], T], *, repeatable: bool = True) -> T:
        """Run one Vault request, `fn(timeout)`, timing it under `operation` and translating its errors
        (`what` words them). Transient errors are retried with backoff while the caller's budget lasts,
        each attempt's timeout cut to fit; `repeatable=False` requests are not sent again once they may
        have reached Vault. Without a budget, one attempt."""
        attempt, first_started, delay = 0, time.monotonic(), 0.0
        while True:
            time.sleep(delay)
            left = retry.remaining()
            timeout = self._timeout if left is None else max(min(self._timeout, left), MIN_ATTEMPT)
            started = time.monotonic()
            deadline = _attempt_deadline.set(started + timeout)  # the whole answer, not each read (_read_bounded)
            try:
                return self._translate(what, lambda: fn(timeout), timeout, repeatable)
            except VaultTransientError as e:
                VAULT_ERRORS.labels(operation, "transient").inc()
                left = retry.remaining()
                delay = retry.backoff(attempt, first=retry.BACKOFF_MIN, cap=RETRY_CAP, remaining=left or 0.0)
                if left is None or isinstance(e, AnswerLostError) or left - delay < MIN_ATTEMPT:
                    if attempt:
                        raise type(e)(
                            f"{e} (gave up after {attempt + 1} attempts in {time.monotonic() - first_started:.0f}s)"
                        ) from e.__cause__
                    raise
                log.info("%s failed, retrying in %.2fs: %s", operation, delay, e)
                VAULT_RETRIES.labels(operation).inc()
                attempt += 1
            except VaultError:
                VAULT_ERRORS.labels(operation, "refused").inc()
                raise
            finally:
                _attempt_deadline.reset(deadline)
                VAULT_SECONDS.labels(operation).observe(time.monotonic() - started)

    def _translate(self, what: str, fn: Callable[[], T], timeout: float, repeatable: bool) -> T:
        try:
            return fn()
        # SSLError is a ConnectionError: caught first, for the more useful message.
        except requests.exceptions.SSLError as e:
            if _tls_refused(e):
                raise TLSError(self._tls_message(e)) from e
            # Under TLS 1.3 a refused client certificate often shows only as a cut connection (EOF), which a
            # server going down mid-handshake also gives: transient, but the message names the likely cause.
            raise VaultTransientError(
                f"the TLS connection to Vault at {self._addr} was cut off (could not {what}): {_ssl_reason(e)}; "
                + (
                    "if its listener requires client certificates, give --vault-client-cert and --vault-client-key"
                    if self._client_cert is None
                    else f"check that Vault accepts the client certificate {self._client_cert} (its tls_client_ca_file)"
                )
            ) from e
        except (requests.ConnectionError, requests.Timeout) as e:
            if not repeatable and _may_have_arrived(e):
                raise AnswerLostError(
                    f"Vault at {self._addr} did not answer (could not {what} within {timeout:g}s) after the request was "
                    "sent: it may have been carried out"
                ) from e
            raise VaultTransientError(
                f"Vault at {self._addr} is unreachable (could not {what} within {timeout:g}s): "
                "check that it is running and that VAULT_ADDR is right"
            ) from e
        except _AnswerTooLargeError as e:
            raise VaultError(
                f"Vault at {self._addr} answered more than {MAX_ANSWER >> 20} MiB (could not {what}): that is no Vault "
                "answer; check that VAULT_ADDR points at Vault, not a proxy or a web server"
            ) from e
        except requests.HTTPError as e:
            status = e.response.status_code
            if _transient_status(status, e.response.text):
                raise VaultTransientError(f"Vault at {self._addr} could not {what} now: HTTP {status}") from e
            raise VaultError(f"Vault refused to {what}: HTTP {status}") from e
        except hvac.exceptions.VaultError as e:
            status = getattr(e, "status_code", None)
            if status is not None and _transient_status(status, _reasons(e)):
                raise VaultTransientError(
                    f"Vault at {self._addr} could not {what} now (HTTP {status}: {_reasons(e)})"
                ) from e
            if isinstance(e, hvac.exceptions.Forbidden):
                raise VaultError(f"Vault denied permission to {what}: {_reasons(e)}") from e
            if isinstance(e, hvac.exceptions.InvalidPath):
                raise VaultError(f"Vault found nothing to {what} (404): check the path") from e
            raise VaultError(f"Vault refused to {what}: {_reasons(e)}") from e
        except ValueError as e:  # requests' JSONDecodeError (health): HTML, an empty or cut body, not JSON at all
            raise VaultError(_not_json(self._addr, what)) from e

    def _tls_message(self, e: requests.exceptions.SSLError) -> str:
        reason = _ssl_reason(e)
        if "CERTIFICATE_VERIFY_FAILED" in str(e) or "certificate verify failed" in str(e):
            trusted = (
                f"the CA bundle {self._cacert}"
                if self._cacert
                else "the system's trusted CAs (no --vault-cacert given)"
            )
            return (
                f"TLS to Vault at {self._addr} failed: its certificate could not be verified against {trusted} "
                f"({reason}): give the CA that signed it with --vault-cacert (VAULT_CACERT), and check that the "
                "address's host name is in the certificate"
            )
        if self._client_cert is None:
            return (
                f"TLS to Vault at {self._addr} failed ({reason}): if Vault's listener requires client certificates, "
                "give --vault-client-cert and --vault-client-key (VAULT_CLIENT_CERT, VAULT_CLIENT_KEY)"
            )
        return (
            f"TLS to Vault at {self._addr} failed ({reason}): Vault refused the client certificate "
            f"{self._client_cert}: it must be signed by a CA in the listener's tls_client_ca_file"
        )


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


class _StatusAdapter(hvac.adapters.JSONAdapter):
    """hvac's JSON adapter, keeping the HTTP status on the exception: hvac maps some statuses (412, 504...)
    to one `UnexpectedError`, and the status is what says whether a retry can help."""

    # ignore: hvac's stubs do not declare the adapters' _raise_for_error, which RawAdapter.request calls.
    def _raise_for_error(self, method: str, url: str, response: requests.Response) -> None:
        try:
            super()._raise_for_error(method, url, response)  # type: ignore[misc]
        except hvac.exceptions.VaultError as e:
            e.status_code = response.status_code  # type: ignore[attr-defined]
            raise


_attempt_deadline: contextvars.ContextVar[float | None] = contextvars.ContextVar("attempt_deadline", default=None)


class _AnswerTooLargeError(requests.RequestException):
    """The answer's body is over MAX_ANSWER bytes (raised while reading it, by `_read_bounded`)."""


def _read_bounded(response: requests.Response, *args: object, **kwargs: object) -> requests.Response:
    """A requests response hook: it runs once the headers are in and reads the body itself, with two bounds a
    plain read lacks. At most MAX_ANSWER bytes, and the whole within the attempt's deadline: requests'
    timeout is per read, and restarts with every byte a trickling server sends."""
    length = response.headers.get("Content-Length", "")
    if length.isdigit() and int(length) > MAX_ANSWER:
        response.close()
        raise _AnswerTooLargeError(f"Content-Length {length}")
    deadline, chunks, size = _attempt_deadline.get(), [], 0
    while chunk := response.raw.read1(1 << 16, decode_content=True):
        size += len(chunk)
        if size > MAX_ANSWER:
            response.close()
            raise _AnswerTooLargeError(f"over {MAX_ANSWER} bytes")
        if deadline is not None and time.monotonic() > deadline:
            response.close()
            raise requests.exceptions.ReadTimeout("the answer did not arrive whole within the request's timeout")
        chunks.append(chunk)
    response._content = b"".join(chunks)  # what `response.content` returns from now on: read once, here
    return response


def _not_json(addr: str, what: str) -> str:
    return (
        f"Vault at {addr} answered something that is not Vault's JSON (could not {what}): check that VAULT_ADDR "
        "points at Vault, not a proxy or a web server"
    )


def _transient_status(status: int, reasons: str) -> bool:
    return (
        status in TRANSIENT_STATUSES
        or (500 <= status <= 599 and status != 501)
        or (status == 400 and any(r in reasons for r in TRANSIENT_REASONS))
    )


def _may_have_arrived(e: requests.RequestException) -> bool:
    """Whether a failed request may have reached Vault (and been carried out): all but a refused or timed
    out connection."""
    if isinstance(e, requests.ConnectTimeout):
        return False
    reason = getattr(e.args[0], "reason", None) if e.args else None
    return not isinstance(reason, (urllib3.exceptions.NewConnectionError, urllib3.exceptions.ConnectTimeoutError))


def _tls_refused(e: requests.exceptions.SSLError) -> bool:
    """A certificate problem (final), not a connection that broke mid-handshake (transient)."""
    text = str(e)
    return "certificate" in text.lower() or "alert" in text.lower()


def _ssl_reason(e: BaseException) -> str:
    """The innermost SSL reason ("self-signed certificate in certificate chain", "tlsv13 alert certificate required")."""
    seen: set[int] = set()
    queue: list[object] = [e]
    found = ""
    while queue:
        current = queue.pop(0)
        if id(current) in seen or not isinstance(current, BaseException):
            continue
        seen.add(id(current))
        verify_message = getattr(current, "verify_message", None)
        if verify_message:
            return str(verify_message)
        reason = getattr(current, "reason", None)  # ssl.SSLError's, and urllib3's wrapping errors'
        if isinstance(current, OSError) and reason and not found:
            found = str(reason).replace("_", " ").lower()
        queue += [*current.args, reason, current.__cause__, current.__context__]
    return found or "TLS handshake failed"


def _minting(role: str | None) -> str:
    if role is None:
        return "create a child token (auth/token/create)"
    return f"create a token from token role {role!r} (auth/token/create/{role})"


def _is_kv2(path: str, data: Mapping[str, Any]) -> bool:
    """KV v2 answers `{data, metadata}` under a `<mount>/data/...` path."""
    return "/data/" in f"/{path}" and set(data) == {"data", "metadata"} and isinstance(data["metadata"], dict)


def _says(e: hvac.exceptions.VaultError, *texts: str) -> bool:
    reasons = _reasons(e).lower()
    return any(t in reasons for t in texts)


def _reasons(e: hvac.exceptions.VaultError) -> str:
    # Vault's error strings describe the failure ("permission denied", "role not found"); they do not
    # echo the request's token. Bounded in case a server sends something long.
    reasons = "; ".join(str(r) for r in (e.errors or [])) or "no reason given"
    return reasons[:300]
