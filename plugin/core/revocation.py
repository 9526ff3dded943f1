"""Revoking what the plugin issued: at once if Vault answers, otherwise owed (kept sealed) and retried."""

from __future__ import annotations

import logging
from collections.abc import Iterable

from plugin.core.errors import PluginError, VaultTransientError
from plugin.core.ports import StorePort, TokenSource, VaultPort
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
        try:
            self._vault.revoke_self(token)
        except PluginError as e:
            self._store.add_pending_revocation(accessor, token)
            log.warning("could not revoke token %s now, will retry: %s", accessor, e)
            return False
        audit.info("token.revoke %s", accessor, extra={"event": "token.revoke", "accessor": accessor, **where})
        return True

    def revoke_by_accessor(self, accessor: str, parent: str, **where: str) -> None:
        """Revoke a token the plugin never held, using `parent`'s (or the identity's) right to do so."""
        try:
            self._vault.revoke_accessor(parent or self._identity.token(), accessor)
        except PluginError as e:
            self._store.add_pending_revocation(accessor, parent, by_accessor=True)
            log.warning("could not revoke token %s now, will retry: %s", accessor, e)
            return
        audit.info("token.revoke %s", accessor, extra={"event": "token.revoke", "accessor": accessor, **where})

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
        """Try the owed revocations again. Returns how many are still owed."""
        pending = self._store.pending_revocations()
        for accessor, token, by_accessor in pending:
            try:
                if by_accessor:
                    self._vault.revoke_accessor(token or self._identity.token(), accessor)
                else:
                    self._vault.revoke_self(token)
            except VaultTransientError:
                return len(pending)
            except PluginError as e:
                log.warning("revocation of token %s still failing: %s", accessor, e)
                continue
            self._store.remove_pending_revocation(accessor)
            audit.info("token.revoke %s (retried)", accessor, extra={"event": "token.revoke", "accessor": accessor})
        return len(self._store.pending_revocations())
