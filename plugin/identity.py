"""The plugin's own Vault identity: obtained once from a wrapped AppRole SecretID, kept sealed, renewed.

The identity token can only mint child tokens from the token roles the operator allowed; it reads no
secret itself. Order of preference at start: the sealed token from the state directory (if Vault still
accepts it), else the wrapping token in `--wrapped-secret-id-file`, which is looked up, checked, and
unwrapped exactly once. A wrapping token that fails its checks is a security event, never retried.
"""

from __future__ import annotations

import hashlib
import logging
import random
import threading
import time
from collections.abc import Callable
from pathlib import Path

from plugin.errors import (
    IdentityUnavailableError,
    PluginError,
    VaultError,
    VaultUnavailableError,
    WrappingTokenError,
)
from plugin.leases import renewal_delay
from plugin.store import IdentityRecord, Store
from plugin.vault import IssuedToken, Vault
from plugin.wrapping import unwrap_checked

log = logging.getLogger(__name__)

RETRY_MIN, RETRY_MAX = 1.0, 60.0
RENEW_MAX_SLEEP = 3600.0


class Identity:
    """Holds the plugin token for the driver (`token()`) and keeps it valid (`run()`, one thread)."""

    def __init__(
        self,
        vault: Vault,
        store: Store,
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
        self._problem = "the plugin is still authenticating to Vault; retry in a few seconds"
        self._lock = threading.Lock()

    def token(self) -> str:
        """The plugin token. Raises `IdentityUnavailableError` (saying why) while there is none."""
        with self._lock:
            if self._current is None:
                raise IdentityUnavailableError(f"no Vault identity: {self._problem}")
            return self._current.token

    def establish(self) -> IssuedToken:
        """One attempt to obtain a valid identity; on success it is current and sealed in the store.

        Raises `WrappingTokenError` (security event: stop), `VaultUnavailableError` (retry later), or
        `IdentityUnavailableError` (an operator must deliver a new wrapped SecretID).
        """
        issued = self._resume_sealed() or self._bootstrap_from_wrapped_secret_id()
        self._set_current(issued)
        return issued

    def _resume_sealed(self) -> IssuedToken | None:
        record = self._store.identity()
        if record is None:
            return None
        try:
            issued = self._vault.lookup_self(record.token)
        except VaultUnavailableError:
            raise
        except VaultError:
            log.warning("the sealed plugin identity (accessor %s) is no longer valid in Vault", record.accessor)
            self._store.forget_identity()
            return None
        log.info("resumed the sealed plugin identity (accessor %s, ttl %ss)", issued.accessor, issued.ttl)
        return issued

    def _bootstrap_from_wrapped_secret_id(self) -> IssuedToken:
        return self._login_with(self._read_wrapping_token(), source=f"--wrapped-secret-id-file {self._wrapped_file}")

    def bootstrap(self, wrapping_token: str) -> IssuedToken:
        """Replace the identity with one from a newly delivered wrapped SecretID (no restart needed).

        Raises like `establish`; a refused token leaves the current identity, if any, in place.
        """
        issued = self._login_with(wrapping_token, source="the wrapped SecretID given to bootstrap")
        previous = self._set_current(issued)
        if previous is not None and previous.accessor != issued.accessor:
            log.info("replaced the plugin identity (accessor %s) by bootstrap", previous.accessor)
        return issued

    def _login_with(self, wrapping_token: str, *, source: str) -> IssuedToken:
        digest = hashlib.sha256(wrapping_token.encode()).hexdigest()
        consumed_at = self._store.wrapping_token_consumed_at(digest)
        if consumed_at is not None:
            raise IdentityUnavailableError(
                f"{source} was already used by this plugin "
                f"({time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime(consumed_at))}) and the identity it gave "
                f"is no longer valid; deliver a new one: {self._issue_hint()}"
            )
        try:
            unwrapped = unwrap_checked(
                self._vault, wrapping_token, [f"auth/{self._approle_mount}/role/*/secret-id"], source=source,
                # Recorded before unwrapping: after a crash between the two, a restart must not mistake
                # our own use of the token for someone else's.
                before_unwrap=lambda path: self._store.mark_wrapping_token_consumed(digest),
            )
        except WrappingTokenError as e:
            # Recorded only just before a successful unwrap: any refusal means we did not consume it.
            self._store.forget_wrapping_token(digest)
            raise WrappingTokenError(
                f"{e}. Revoke the AppRole's SecretIDs (auth/{self._approle_mount}/role/<role>/secret-id-accessor/destroy) "
                f"and issue a new wrapped SecretID: {self._issue_hint()}"
            ) from e
        issued = self._vault.approle_login(self._approle_mount, self._require_role_id(), unwrapped.response["data"]["secret_id"])
        self._store.save_identity(IdentityRecord(issued.token, issued.accessor, time.time()))
        log.info("obtained the plugin identity from %s (accessor %s, ttl %ss)", source, issued.accessor, issued.ttl)
        return issued

    def _read_wrapping_token(self) -> str:
        if self._wrapped_file is None:
            raise IdentityUnavailableError("no sealed identity and no --wrapped-secret-id-file: " + self._issue_hint())
        try:
            token = self._wrapped_file.read_text().strip()
        except OSError as e:
            raise IdentityUnavailableError(f"cannot read --wrapped-secret-id-file {self._wrapped_file}: {e.strerror}") from e
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

    def run(self, stop: threading.Event, on_fatal: Callable[[PluginError], None], sleep=None) -> None:
        """Establish the identity (retrying with backoff) and keep it renewed until `stop` is set.

        A `WrappingTokenError` is passed to `on_fatal` and ends the loop: it must not be retried.
        """
        wait = sleep or stop.wait
        delay = RETRY_MIN
        while not stop.is_set():
            try:
                issued = self._renew_or_establish()
                delay = RETRY_MIN
                wait(_renewal_delay(issued.ttl))
            except WrappingTokenError as e:
                on_fatal(e)
                return
            except PluginError as e:
                with self._lock:
                    self._problem = str(e)
                log.warning("plugin identity not available (retrying in %.0fs): %s", delay, e)
                wait(delay * random.uniform(0.8, 1.2))
                delay = min(delay * 2, RETRY_MAX)

    def _renew_or_establish(self) -> IssuedToken:
        with self._lock:
            current = self._current
        if current is None:
            return self.establish()
        try:
            renewed = self._vault.renew_self(current.token) if current.renewable else self._vault.lookup_self(current.token)
        except VaultUnavailableError:
            raise
        except VaultError:
            log.warning("the plugin identity (accessor %s) could not be renewed; authenticating again", current.accessor)
            self._set_current(None)
            self._store.forget_identity()
            return self.establish()
        self._set_current(renewed)
        return renewed

    def _set_current(self, issued: IssuedToken | None) -> IssuedToken | None:
        """Make `issued` the identity; returns the one it replaces."""
        with self._lock:
            previous, self._current = self._current, issued
            self._expires_at = time.monotonic() + issued.ttl if issued else 0.0
        return previous

    def seconds_left(self) -> float:
        """Until the identity's token expires (0 with none; a periodic token is renewed long before)."""
        with self._lock:
            return max(self._expires_at - time.monotonic(), 0.0) if self._current else 0.0


def _renewal_delay(ttl: int) -> float:
    """The shared renewal policy, capped: periodic and non-expiring tokens are checked at least hourly."""
    return min(renewal_delay(ttl), RENEW_MAX_SLEEP) if ttl > 0 else RENEW_MAX_SLEEP
