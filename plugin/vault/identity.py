"""The plugin's own Vault identity: obtained once from a wrapped AppRole SecretID, kept sealed, renewed.

The identity token can only mint child tokens from the token roles the operator allowed; it reads no
secret itself. Order of preference at start: the sealed token from the state directory (if Vault still
accepts it), else a SecretID already unwrapped whose login has not succeeded yet, else the wrapping
token in `--wrapped-secret-id-file`, which is looked up, checked, and unwrapped exactly once.

Only Vault's word that a token is invalid drops it; a transient error (a 500 during an election, a 429)
is retried while the token still lives. A wrapping token that fails its checks is a security event,
never retried; a transient error on its lookup or unwrap is not one.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path

from plugin.core import retry
from plugin.core.errors import (
    AnswerLostError,
    IdentityUnavailableError,
    PluginError,
    TokenInvalidError,
    VaultError,
    VaultTransientError,
    WrappingTokenError,
)
from plugin.core.metrics import BACKGROUND_ERRORS
from plugin.core.ports import IdentityStore, TokenSource
from plugin.core.records import IdentityRecord, IssuedToken
from plugin.core.scheduler import renewal_delay
from plugin.vault.client import Vault
from plugin.vault.wrapping import unwrap_checked

log = logging.getLogger(__name__)

RETRY_FIRST, RETRY_CAP = 1.0, 60.0
RENEW_MAX_SLEEP = 3600.0
BOOTSTRAP_TIMEOUT = 30.0


class Identity(TokenSource):
    """Holds the plugin token for the driver (`token()`) and keeps it valid (`run()`, one thread)."""

    def __init__(
        self,
        vault: Vault,
        store: IdentityStore,
        *,
        approle_mount: str,
        role_id: str | None,
        wrapped_secret_id_file: Path | None,
    ):
        self._vault, self._store = vault, store
        self._approle_mount = approle_mount
        self._role_id = role_id
        self._wrapped_file = wrapped_secret_id_file
        self._current: IssuedToken | None = None
        self._expires_at = 0.0  # monotonic; when the current token's TTL runs out
        self._problem = "the plugin is still authenticating to Vault"
        # False once only an operator can help (a new wrapped SecretID): then nobody waits for it.
        self._may_recover = True
        self._changed = threading.Condition()
        # Held by one renewal (or establishment) at a time and by bootstrap: a renewal of the old identity
        # must not put it back (or forget the new one) after bootstrap replaced it.
        self._rotating = threading.Lock()

    def token(self) -> str:
        """The plugin token. While there is none but one may come (the plugin is still authenticating, or
        Vault is failing over), waits for it as long as the caller's budget (`plugin.core.retry`) lasts.

        Raises `IdentityUnavailableError` (saying why) when there is none in time."""
        with self._changed:
            while self._current is None and self._may_recover:
                left = retry.remaining()
                if not left:
                    break
                self._changed.wait(left)
            if self._current is None:
                suffix = "; retry in a few seconds" if self._may_recover else ""
                raise IdentityUnavailableError(f"no Vault identity: {self._problem}{suffix}")
            return self._current.token

    def establish(self) -> IssuedToken:
        """One attempt to obtain a valid identity; on success it is current and sealed in the store.

        Raises `WrappingTokenError` (security event: stop), `VaultTransientError` (retry later), or
        `IdentityUnavailableError` (an operator must deliver a new wrapped SecretID).
        """
        issued = self._resume_sealed() or self._login_pending() or self._bootstrap_from_wrapped_secret_id()
        self._set_current(issued)
        return issued

    def _resume_sealed(self) -> IssuedToken | None:
        record = self._store.identity()
        if record is None:
            return None
        try:
            issued = self._vault.lookup_self(record.token)
        except TokenInvalidError:
            log.warning("the sealed plugin identity (accessor %s) is no longer valid in Vault", record.accessor)
            self._store.forget_identity()
            return None
        log.info("resumed the sealed plugin identity (accessor %s, ttl %ss)", issued.accessor, issued.ttl)
        return issued

    def _login_pending(self) -> IssuedToken | None:
        """Log in with the SecretID unwrapped earlier, if one awaits its login. It is kept until Vault
        answers: dropped when Vault refuses it, kept (for the next attempt) when Vault cannot answer."""
        pending = self._store.pending_secret_id()
        return self._login(*pending) if pending else None

    def _login(self, secret_id: str, source: str) -> IssuedToken:
        """Log in with the SecretID kept in the store (unwrapped from `source`); the token replaces it there."""
        try:
            issued = self._vault.approle_login(self._approle_mount, self._require_role_id(), secret_id)
        except VaultTransientError:
            raise
        except VaultError as e:
            self._store.forget_pending_secret_id()
            raise IdentityUnavailableError(
                f"the SecretID unwrapped from {source} was refused at login ({e}); deliver a new one: {self._issue_hint()}"
            ) from e
        self._store.save_identity_from_secret_id(IdentityRecord(issued.token, issued.accessor, time.time()))
        log.info("obtained the plugin identity from %s (accessor %s, ttl %ss)", source, issued.accessor, issued.ttl)
        return issued

    def _bootstrap_from_wrapped_secret_id(self) -> IssuedToken:
        source = f"--wrapped-secret-id-file {self._wrapped_file}"
        return self._login(self._unwrap_secret_id(self._read_wrapping_token(), source=source), source)

    def bootstrap(self, wrapping_token: str) -> tuple[IssuedToken, IssuedToken | None]:
        """Replace the identity with one from a newly delivered wrapped SecretID (no restart needed).
        Returns the new identity and the one it replaced (if any), which the caller retires: it is neither
        renewed nor revoked here (the running mounts' tokens descend from it).

        Serialised with the renewal thread, which could otherwise put the old identity back. Raises like
        `establish`; a refused token leaves the current identity, if any, in place. Vault's transient
        errors are retried for up to BOOTSTRAP_TIMEOUT seconds.
        """
        source = "the wrapped SecretID given to bootstrap"
        with self._rotating, retry.budget(BOOTSTRAP_TIMEOUT):
            issued = self._login(self._unwrap_secret_id(wrapping_token, source=source), source)
            previous = self._set_current(issued)
        if previous is not None and previous.accessor != issued.accessor:
            log.info("replaced the plugin identity (accessor %s) by bootstrap", previous.accessor)
            return issued, previous
        return issued, None

    def _unwrap_secret_id(self, wrapping_token: str, *, source: str) -> str:
        """Check and unwrap `wrapping_token`; returns the SecretID, kept sealed in the store until its login
        succeeds."""
        digest = hashlib.sha256(wrapping_token.encode()).hexdigest()
        consumed_at = self._store.wrapping_token_consumed_at(digest)
        if consumed_at is not None:
            # An unwrap of ours began before. If the token is still valid, it never reached Vault.
            try:
                self._vault.lookup_wrapping(wrapping_token)
            except WrappingTokenError:
                raise IdentityUnavailableError(
                    f"{source} was already used by this plugin "
                    f"({time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime(consumed_at))}) and the identity it gave "
                    f"is no longer valid, or its answer was lost; deliver a new one: {self._issue_hint()}"
                ) from None
            self._store.forget_wrapping_token(digest)
        try:
            unwrapped = unwrap_checked(
                self._vault,
                wrapping_token,
                [f"auth/{self._approle_mount}/role/*/secret-id"],
                source=source,
                # Recorded before unwrapping: after a crash or a lost answer, the next attempt must not
                # mistake our own use of the token for someone else's.
                before_unwrap=lambda path: self._store.mark_wrapping_token_consumed(digest),
            )
        except AnswerLostError:
            log.warning(
                "%s: the unwrap got no answer and may have been carried out; the next attempt looks the token up",
                source,
            )
            raise
        except PluginError as e:
            # Vault answered with an error, or the request never left: the token was not consumed by us.
            self._store.forget_wrapping_token(digest)
            if isinstance(e, WrappingTokenError):
                raise WrappingTokenError(
                    f"{e}. Revoke the AppRole's SecretIDs (auth/{self._approle_mount}/role/<role>/secret-id-accessor/destroy) "
                    f"and issue a new wrapped SecretID: {self._issue_hint()}"
                ) from e
            raise
        # The consumption mark stays: the same file offered again is recognised as ours, not as tamper.
        secret_id = str(unwrapped.field("data", "secret_id"))
        self._store.save_pending_secret_id(secret_id, source)
        return secret_id

    def _read_wrapping_token(self) -> str:
        if self._wrapped_file is None:
            raise IdentityUnavailableError("no sealed identity and no --wrapped-secret-id-file: " + self._issue_hint())
        try:
            token = self._wrapped_file.read_text().strip()
        except OSError as e:
            raise IdentityUnavailableError(
                f"cannot read --wrapped-secret-id-file {self._wrapped_file}: {e.strerror}"
            ) from e
        if not token:
            raise IdentityUnavailableError(f"{self._wrapped_file} is empty: {self._issue_hint()}")
        return token

    def _require_role_id(self) -> str:
        if not self._role_id:
            raise IdentityUnavailableError("no AppRole RoleID: pass --role-id or --role-id-file")
        return self._role_id

    def _issue_hint(self) -> str:
        target = self._wrapped_file or "<file>"
        return f"bao write -wrap-ttl=10m -f auth/{self._approle_mount}/role/<role>/secret-id > {target}"

    def run(
        self,
        stop: threading.Event,
        on_fatal: Callable[[PluginError], None],
        sleep: Callable[[float], object] | None = None,
    ) -> None:
        """Establish the identity (retrying with backoff) and keep it renewed until `stop` is set.

        A `WrappingTokenError` is passed to `on_fatal` and ends the loop: it must not be retried.
        Transient errors are retried sooner than a renewal would be, and never drop the current token.
        """
        wait = sleep or stop.wait
        attempt = 0
        while not stop.is_set():
            try:
                issued = self._renew_or_establish()
                attempt = 0
                wait(_renewal_delay(issued.ttl))
            except WrappingTokenError as e:
                on_fatal(e)
                return
            except Exception as e:  # noqa: BLE001  (a bug in one attempt must not end the identity's upkeep)
                if not isinstance(e, PluginError):
                    BACKGROUND_ERRORS.labels("identity").inc()
                    log.exception("unexpected error keeping the plugin identity; retrying")
                transient = isinstance(e, VaultTransientError) or not isinstance(e, PluginError)
                with self._changed:
                    if self._current is None:
                        self._problem, self._may_recover = str(e), transient
                        self._changed.notify_all()
                left = self.seconds_left() or float("inf")  # a token that ran out no longer bounds the retries
                delay = retry.backoff(attempt, first=RETRY_FIRST, cap=RETRY_CAP, remaining=left)
                log.warning(
                    "plugin identity %s (retrying in %.0fs): %s",
                    "not renewed" if self._current else "not available",
                    delay,
                    e,
                )
                wait(delay)
                attempt += 1

    def _renew_or_establish(self) -> IssuedToken:
        with self._rotating:
            return self._renew_or_establish_now()

    def _renew_or_establish_now(self) -> IssuedToken:
        with self._changed:
            current = self._current
        if current is None:
            return self.establish()
        try:
            renewed = (
                self._vault.renew_self(current.token) if current.renewable else self._vault.lookup_self(current.token)
            )
        except TokenInvalidError:
            log.warning("the plugin identity (accessor %s) is no longer valid; authenticating again", current.accessor)
            self._set_current(None)
            self._store.forget_identity()
            return self.establish()
        self._set_current(renewed)
        return renewed

    def _set_current(self, issued: IssuedToken | None) -> IssuedToken | None:
        """Make `issued` the identity (waking whoever waits for one); returns the one it replaces."""
        with self._changed:
            previous, self._current = self._current, issued
            self._expires_at = time.monotonic() + issued.ttl if issued else 0.0
            if issued is None:
                self._problem, self._may_recover = "the plugin is authenticating to Vault again", True
            self._changed.notify_all()
        return previous

    def seconds_left(self) -> float:
        """Until the identity's token expires (0 with none; a periodic token is renewed long before)."""
        with self._changed:
            return max(self._expires_at - time.monotonic(), 0.0) if self._current else 0.0


def _renewal_delay(ttl: int) -> float:
    """The shared renewal policy, capped: periodic and non-expiring tokens are checked at least hourly."""
    return min(renewal_delay(ttl), RENEW_MAX_SLEEP) if ttl > 0 else RENEW_MAX_SLEEP
