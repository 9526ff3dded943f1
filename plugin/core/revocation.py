"""Revoking what the plugin issued: at once if Vault answers, otherwise owed (kept sealed) and retried.

Revocations due later (an old credential's rotate-grace) are owed from the start, with the time they are
due: a crash during the grace does not lose them. Only Vault's success settles one; a refusal (403) is
reported and retried like an outage, never taken for success.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable

from plugin.core.errors import PluginError, VaultTransientError
from plugin.core.ports import StorePort, TokenSource, VaultPort
from plugin.core.records import OwedRevocation
from plugin.core.scheduler import Again, Scheduler, Task

log = logging.getLogger(__name__)
audit = logging.getLogger("plugin.audit")

CONFIRM_EVERY = 1.0
CONFIRM_CHECKS = 30


class Revoker:
    def __init__(self, vault: VaultPort, store: StorePort, identity: TokenSource, scheduler: Scheduler):
        self._vault, self._store, self._identity, self._scheduler = vault, store, identity, scheduler

    def parent_token(self, volume: str) -> str:
        """The token a volume's mount tokens descend from ("" if the plugin has no identity right now)."""
        credential = self._store.volume_credential(volume)
        if credential is not None:
            return credential.token
        try:
            return self._identity.token()
        except PluginError:
            return ""

    def revoke(self, accessor: str, token: str, **where: str) -> bool:
        """Revoke `token` (and its children and leases); True if done now, False if owed."""
        return self._settle_or_owe(OwedRevocation(accessor, token, "token"), where)

    def revoke_by_accessor(self, accessor: str, parent: str, **where: str) -> bool:
        """Revoke a token the plugin never held, using `parent`'s (or the identity's) right to do so."""
        return self._settle_or_owe(OwedRevocation(accessor, parent, "accessor"), where)

    def revoke_lease(self, lease_id: str, token: str, **where: str) -> bool:
        """Revoke one lease with `token`'s right on sys/leases/revoke (for a token shared by mounts, which
        cannot be revoked whole)."""
        return self._settle_or_owe(OwedRevocation(lease_id, token, "lease"), where)

    def revoke_later(self, owed: OwedRevocation, after: float, **where: str) -> None:
        """Revoke `owed` in `after` seconds (an old credential's grace); owed (durably) from now on."""
        owed = OwedRevocation(owed.key, owed.token, owed.kind, time.time() + after)
        self._store.add_pending_revocation(owed)
        self._scheduler.schedule(("revoke", owed.key), self._due(owed, where), after)

    def _due(self, owed: OwedRevocation, where: dict[str, str]) -> Task:
        def revoke() -> None:
            if self._settle(owed, where):
                self._store.remove_pending_revocation(owed.key)
            # else: still owed; retry_pending takes it from here

        return revoke

    def _settle_or_owe(self, owed: OwedRevocation, where: dict[str, str]) -> bool:
        if self._settle(owed, where):
            return True
        self._store.add_pending_revocation(owed)
        return False

    def _settle(self, owed: OwedRevocation, where: dict[str, str]) -> bool:
        """Make one revocation; False (logged) if Vault did not take it."""
        try:
            self._call(owed)
        except PluginError as e:
            log.warning("could not revoke %s %s now, will retry: %s", _noun(owed), owed.key, e)
            return False
        _audit(owed, where)
        return True

    def _call(self, owed: OwedRevocation) -> None:
        if owed.kind == "token":
            self._vault.revoke_self(owed.token)
        elif owed.kind == "accessor":
            self._vault.revoke_accessor(owed.token or self._identity.token(), owed.key)
        else:
            self._vault.revoke_lease(owed.token, owed.key)

    def confirm_leases_gone(self, lease_ids: Iterable[str], parent: str, **where: str) -> None:
        """Revoking a token revokes its leases, but Vault may finish that a moment later: check each lease
        in the background (off the Unmount path) and report one that outlives its token."""
        for lease_id in lease_ids:
            self._scheduler.schedule(("confirm-lease", lease_id), self._confirm(lease_id, parent, where), CONFIRM_EVERY)

    def _confirm(self, lease_id: str, parent: str, where: dict[str, str]) -> Task:
        checks = iter(range(CONFIRM_CHECKS))

        def check() -> Again | None:
            if not self._vault.lease_exists(parent, lease_id):
                audit.info("lease.revoke %s", lease_id, extra={"event": "lease.revoke", "lease_id": lease_id, **where})
                return None
            if next(checks, None) is None:
                log.error(
                    "lease %s outlived the revocation of its token: revoke it by hand (sys/leases/revoke)", lease_id
                )
                return None
            return Again(CONFIRM_EVERY)

        return check

    def retry_pending(self) -> int:
        """Make the owed revocations that are due. Returns how many are still owed (due or not)."""
        pending = self._store.pending_revocations()
        now = time.time()
        for owed in pending:
            if owed.not_before > now:
                continue
            try:
                self._call(owed)
            except VaultTransientError:
                return len(pending)
            except PluginError as e:
                log.warning("revocation of %s %s still failing: %s", _noun(owed), owed.key, e)
                continue
            self._store.remove_pending_revocation(owed.key)
            _audit(owed, {}, retried=True)
        return len(self._store.pending_revocations())


def _noun(owed: OwedRevocation) -> str:
    return "lease" if owed.kind == "lease" else "token"


def _audit(owed: OwedRevocation, where: dict[str, str], *, retried: bool = False) -> None:
    suffix = " (retried)" if retried else ""
    if owed.kind == "lease":
        audit.info(
            "lease.revoke %s%s", owed.key, suffix, extra={"event": "lease.revoke", "lease_id": owed.key, **where}
        )
    else:
        audit.info(
            "token.revoke %s%s", owed.key, suffix, extra={"event": "token.revoke", "accessor": owed.key, **where}
        )
