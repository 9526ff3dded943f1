"""How the plugin's Vault adapter talks HTTP: one `requests.Session` with its TLS settings, the one
classification of failures and the retries within the caller's budget, and bounded answers.

TLS settings live on the session because hvac takes `verify` and `cert` from a session it is given and
ignores its own arguments then. hvac and requests errors are translated here, once, into the plugin's
error family: connection errors, timeouts, 5xx (but 501), 429 and 412 are `VaultTransientError`, retried
while the caller's budget (`plugin.core.retry`) lasts; everything else is final and never retried.
Messages name the operation and path, never a token or a secret value.
"""

from __future__ import annotations

import contextvars
import logging
import time
from collections.abc import Callable
from typing import Any, TypeVar

import hvac
import hvac.adapters
import hvac.exceptions
import requests
import requests.adapters
import urllib3.exceptions

from plugin.core import retry
from plugin.core.errors import AnswerLostError, TLSError, VaultError, VaultTransientError
from plugin.core.metrics import VAULT_ERRORS, VAULT_RETRIES, VAULT_SECONDS, waited_on_vault

log = logging.getLogger(__name__)
T = TypeVar("T")

MAX_ANSWER = 4 << 20  # bytes: a secret, a certificate chain or a lease list is far smaller; more is not Vault
MIN_ATTEMPT = 0.5  # seconds: a retry is not worth sending with less budget left than this
RETRY_CAP = 2.0  # seconds between retries inside a budget, at most
# Vault's own client (api.DefaultRetryPolicy) retries these and 5xx but 501 (not initialised).
TRANSIENT_STATUSES = {412, 429}
# Said with a 400 for a moment after a KV engine is enabled or upgraded (on a new leader, too).
TRANSIENT_REASONS = ("Waiting for the primary to upgrade from non-versioned to versioned data",)


class Transport:
    """HTTP to one Vault address for the adapter. Thread-safe: connections are pooled and kept alive."""

    def __init__(
        self,
        addr: str,
        *,
        cacert: str | None,
        client_cert: str | None,
        client_key: str | None,
        namespace: str | None,
        timeout: float,
    ):
        self.addr = addr.rstrip("/")
        self._cacert = cacert
        self._client_cert = client_cert
        self._namespace = namespace or None
        self._timeout = timeout
        self.session = requests.Session()
        # Configuration is explicit: no proxy, CA bundle or .netrc credentials picked up from the environment.
        self.session.trust_env = False
        # Here, not as hvac.Client arguments: hvac replaces those with the session's values (DESIGN 8).
        self.session.verify = cacert or True
        if client_cert:
            self.session.cert = (client_cert, client_key) if client_key else client_cert
        self.session.hooks["response"].append(_read_bounded)
        adapter = requests.adapters.HTTPAdapter(pool_connections=4, pool_maxsize=32)
        self.session.mount("http://", adapter)
        self.session.mount("https://", adapter)

    def client(self, token: str, timeout: float) -> hvac.Client:
        # token="" rather than None: None makes hvac read VAULT_TOKEN / ~/.vault-token.
        return hvac.Client(
            url=self.addr,
            token=token,
            verify=self.session.verify,
            # ignore: hvac's stubs say cert is a (cert, key) pair and timeout an int; hvac hands both to
            # requests, which also takes one combined PEM file and float seconds (retry budgets cut them).
            cert=self.session.cert,  # type: ignore[arg-type]
            timeout=timeout,  # type: ignore[arg-type]
            namespace=self._namespace,
            session=self.session,
            adapter=_StatusAdapter,
        )

    def json(
        self,
        operation: str,
        what: str,
        fn: Callable[[float], object],
        *,
        repeatable: bool = True,
        empty_ok: bool = False,
    ) -> dict[str, Any]:
        """`call` for an hvac request whose answer is read as Vault's JSON object.

        hvac's JSONAdapter (`_StatusAdapter`) returns that object for a 200 with a JSON body; it returns the
        `requests.Response` for any other success (a 204 has no body), and `Client.read` returns None for a
        404. Those are `{}` when `empty_ok` (the caller says what is missing), else a `VaultError`."""
        answer = self.call(operation, what, fn, repeatable=repeatable)
        if isinstance(answer, dict):
            return answer
        if isinstance(answer, requests.Response) and answer.status_code == 200:  # hvac's JSON decoding failed
            raise VaultError(_not_json(self.addr, what))
        if empty_ok:
            return {}
        raise VaultError(f"Vault answered without the data expected (could not {what})")

    def call(self, operation: str, what: str, fn: Callable[[float], T], *, repeatable: bool = True) -> T:
        """Run one Vault request, `fn(timeout)`, timing it under `operation` and translating its errors
        (`what` words them). Transient errors are retried with backoff while the caller's budget lasts,
        each attempt's timeout cut to fit; `repeatable=False` requests are not sent again once they may
        have reached Vault. Without a budget, one attempt."""
        first_started = time.monotonic()
        try:
            return self._call(operation, what, fn, repeatable, first_started)
        finally:
            waited_on_vault(time.monotonic() - first_started)

    def _call(self, operation: str, what: str, fn: Callable[[float], T], repeatable: bool, first_started: float) -> T:
        attempt, delay = 0, 0.0
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
                f"the TLS connection to Vault at {self.addr} was cut off (could not {what}): {_ssl_reason(e)}; "
                + (
                    "if its listener requires client certificates, give --vault-client-cert and --vault-client-key"
                    if self._client_cert is None
                    else f"check that Vault accepts the client certificate {self._client_cert} (its tls_client_ca_file)"
                )
            ) from e
        except (requests.ConnectionError, requests.Timeout) as e:
            if not repeatable and _may_have_arrived(e):
                raise AnswerLostError(
                    f"Vault at {self.addr} did not answer (could not {what} within {timeout:g}s) after the request was "
                    "sent: it may have been carried out"
                ) from e
            raise VaultTransientError(
                f"Vault at {self.addr} is unreachable (could not {what} within {timeout:g}s): "
                "check that it is running and that VAULT_ADDR is right"
            ) from e
        except _AnswerTooLargeError as e:
            raise VaultError(
                f"Vault at {self.addr} answered more than {MAX_ANSWER >> 20} MiB (could not {what}): that is no Vault "
                "answer; check that VAULT_ADDR points at Vault, not a proxy or a web server"
            ) from e
        except requests.HTTPError as e:
            status = e.response.status_code
            if _transient_status(status, e.response.text):
                raise VaultTransientError(f"Vault at {self.addr} could not {what} now: HTTP {status}") from e
            raise VaultError(f"Vault refused to {what}: HTTP {status}") from e
        except hvac.exceptions.VaultError as e:
            status = getattr(e, "status_code", None)
            if status is not None and _transient_status(status, reasons(e)):
                raise VaultTransientError(
                    f"Vault at {self.addr} could not {what} now (HTTP {status}: {reasons(e)})"
                ) from e
            if isinstance(e, hvac.exceptions.Forbidden):
                raise VaultError(f"Vault denied permission to {what}: {reasons(e)}") from e
            if isinstance(e, hvac.exceptions.InvalidPath):
                raise VaultError(f"Vault found nothing to {what} (404): check the path") from e
            raise VaultError(f"Vault refused to {what}: {reasons(e)}") from e
        except ValueError as e:  # requests' JSONDecodeError (health): HTML, an empty or cut body, not JSON at all
            raise VaultError(_not_json(self.addr, what)) from e

    def _tls_message(self, e: requests.exceptions.SSLError) -> str:
        reason = _ssl_reason(e)
        if "CERTIFICATE_VERIFY_FAILED" in str(e) or "certificate verify failed" in str(e):
            trusted = (
                f"the CA bundle {self._cacert}"
                if self._cacert
                else "the system's trusted CAs (no --vault-cacert given)"
            )
            return (
                f"TLS to Vault at {self.addr} failed: its certificate could not be verified against {trusted} "
                f"({reason}): give the CA that signed it with --vault-cacert (VAULT_CACERT), and check that the "
                "address's host name is in the certificate"
            )
        if self._client_cert is None:
            return (
                f"TLS to Vault at {self.addr} failed ({reason}): if Vault's listener requires client certificates, "
                "give --vault-client-cert and --vault-client-key (VAULT_CLIENT_CERT, VAULT_CLIENT_KEY)"
            )
        return (
            f"TLS to Vault at {self.addr} failed ({reason}): Vault refused the client certificate "
            f"{self._client_cert}: it must be signed by a CA in the listener's tls_client_ca_file"
        )


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


def says(e: hvac.exceptions.VaultError, *texts: str) -> bool:
    """Whether Vault's reasons for `e` contain one of `texts` (case-insensitive)."""
    said = reasons(e).lower()
    return any(t in said for t in texts)


def reasons(e: hvac.exceptions.VaultError) -> str:
    # Vault's error strings describe the failure ("permission denied", "role not found"); they do not
    # echo the request's token. Bounded in case a server sends something long.
    reasons = "; ".join(str(r) for r in (e.errors or [])) or "no reason given"
    return reasons[:300]
