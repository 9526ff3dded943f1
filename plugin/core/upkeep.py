"""Keeping one mount's secrets alive and current while its container runs.

After Mount, the scheduler runs, for each mount: the renewal of its token; for each leased source, the
renewal of the lease and, once Vault caps a renewal (max TTL) or the lease is not renewable, the issue
of a new secret whose files replace the old ones atomically, the old lease being revoked after
`rotate-grace`; and, every `refresh`, a check of its static secrets for new versions. Files are rewritten
only when their bytes change, and then the container using the mount is signalled (`notify=`).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping

from plugin.core.errors import PluginError, VaultError
from plugin.core.ports import Mounter, StorePort, VaultPort
from plugin.core.records import Fetched, MountRecord
from plugin.core.render import render_files
from plugin.core.scheduler import Again, Scheduler, Task, renewal_delay, token_renewal
from plugin.core.spec import Source, Spec

log = logging.getLogger(__name__)
audit = logging.getLogger("plugin.audit")

# A renewal granting less than this share of the lease's first duration means the max TTL is near.
CAPPED = 0.9

Notify = Callable[[str, str, str], None]  # (volume, mount ID, signal): signals the containers binding that mount


def fetch_all(vault: VaultPort, token: str, sources: tuple[Source, ...]) -> dict[Source, Fetched]:
    """One request per source, made concurrently."""
    return dict(zip(sources, vault.fetch_many(token, [(s.path, s.params) for s in sources]), strict=True))


class MountUpkeep:
    """The scheduled work of one mount. `start()` after Mount or at plugin start, `stop()` at teardown."""

    def __init__(
        self,
        record: MountRecord,
        spec: Spec,
        *,
        vault: VaultPort,
        store: StorePort,
        mounter: Mounter,
        scheduler: Scheduler,
        fetched: Mapping[Source, Fetched] | None = None,
        notify: Notify | None = None,
        token_ttl: int = 0,
    ):
        self._record, self._spec = record, spec
        self._token_ttl = (
            token_ttl  # as granted by Vault at Mount (a role's period or max TTL may cut the ttl asked for)
        )
        self._vault, self._store, self._mounter, self._scheduler = vault, store, mounter, scheduler
        self._notify = notify
        # In memory only (secrets never touch disk); empty after a plugin restart, filled again on demand.
        self._current: dict[Source, Fetched] = dict(fetched or {})
        self._first_duration = {s: f.lease_duration for s, f in self._current.items() if f.lease_id}
        self._final: set[Source] = set()
        self._key = ("mount", record.volume, record.mount_id)
        # What `start` scheduled, so `stop` cancels it without scanning every task.
        self._keys: list[tuple[str, ...]] = []
        self._writing = threading.Lock()  # held while files are rewritten, and by stop()
        self._stopped = False

    def start(self, resumed: bool = False) -> None:
        """Schedule the mount's renewals; `resumed` (after a restart) renews at once, as lifetimes are unknown."""
        token_ttl = 0 if resumed else self._token_ttl
        if self._record.owns_token:
            self._schedule(
                (*self._key, "token"),
                token_renewal(self._vault, self._record.token),
                renewal_delay(token_ttl),
                token_ttl or None,
            )
        leases = self._store.leases(self._record.volume, self._record.mount_id)
        for source in self._spec.sources:
            if str(source) in leases:
                ttl = 0 if resumed else self._current[source].lease_duration
                self._schedule(
                    (*self._key, "lease", str(source)), self._lease_task(source), renewal_delay(ttl), ttl or None
                )
        if self._spec.refresh and any(str(s) not in leases for s in self._spec.sources):
            self._schedule((*self._key, "refresh"), self._refresh, self._spec.refresh)

    def _schedule(self, key: tuple[str, ...], task: Task, delay: float, lifetime: float | None = None) -> None:
        self._keys.append(key)
        self._scheduler.schedule(key, task, delay, lifetime)

    def stop(self) -> None:
        """No more work for this mount: cancels what is scheduled and waits for a rewrite in progress, so that
        nothing is written once it returns (teardown unmounts the tmpfs next)."""
        with self._writing:
            self._stopped = True
            for key in self._keys:
                self._scheduler.cancel(key)

    # -- leases ---------------------------------------------------------------------------------

    def _lease_task(self, source: Source) -> Callable[[], Again]:
        def task() -> Again:
            lease_id = self._store.leases(self._record.volume, self._record.mount_id)[str(source)]
            if source in self._final or (source in self._current and not self._current[source].renewable):
                return self._reissue({source})
            first = self._first_duration.get(source)
            ttl = self._vault.renew_lease(self._record.token, lease_id, increment=first)
            audit.info(
                "lease.renew %s",
                lease_id,
                extra={
                    "event": "lease.renew",
                    "volume": self._record.volume,
                    "mount_id": self._record.mount_id,
                    "lease_id": lease_id,
                    "ttl": ttl,
                },
            )
            self._first_duration.setdefault(source, ttl)
            if ttl < self._first_duration[source] * CAPPED:
                self._final.add(source)  # Vault capped it: the next run issues a new secret instead
            return Again(renewal_delay(ttl), ttl)

        return task

    def _reissue(self, sources: set[Source]) -> Again:
        """Issue new secrets for leased `sources` and rewrite their files (old leases go after the grace)."""
        self._rewrite(sources)
        for source in sources:
            self._final.discard(source)
            self._first_duration[source] = self._current[source].lease_duration
        first = self._current[next(iter(sources))]
        return Again(renewal_delay(first.lease_duration), first.lease_duration)

    def _retire(self, source: Source, old_lease: str | None, new_lease: str) -> None:
        """A new lease replaced `old_lease`: readers get `rotate-grace` to move over before it is revoked."""
        log.info("issued a new secret for %s of volume %s (lease %s)", source, self._record.volume, new_lease)
        audit.info(
            "secret.rotate %s",
            source,
            extra={
                "event": "secret.rotate",
                "volume": self._record.volume,
                "mount_id": self._record.mount_id,
                "lease_id": new_lease,
            },
        )
        if old_lease and old_lease != new_lease:
            self._scheduler.schedule(
                ("revoke-lease", old_lease), self._revoke_later(old_lease), self._spec.rotate_grace
            )

    def _revoke_later(self, lease_id: str) -> Callable[[], None]:
        def revoke() -> None:
            self._vault.revoke_lease(self._record.token, lease_id)
            audit.info(
                "lease.revoke %s",
                lease_id,
                extra={"event": "lease.revoke", "lease_id": lease_id, "volume": self._record.volume},
            )

        return revoke

    # -- static secrets -------------------------------------------------------------------------

    def _refresh(self) -> Again:
        leases = self._store.leases(self._record.volume, self._record.mount_id)
        changed = {s for s in self._spec.sources if str(s) not in leases and self._changed(s)}
        if changed:
            self._rewrite(changed)
        return Again(self._spec.refresh)

    def _changed(self, source: Source) -> bool:
        """Whether `source` may have changed since it was last fetched (cheap for KV v2: metadata only)."""
        known = self._current.get(source)
        if known is None or known.version is None:
            return True
        try:
            return self._vault.kv2_current_version(self._record.token, source.path) != known.version
        except VaultError:  # no read on metadata/: compare the data itself
            return True

    # -- files ----------------------------------------------------------------------------------

    def _rewrite(self, sources: set[Source]) -> None:
        """Fetch `sources` anew (and whatever their files also need that is not in memory), then
        rewrite the files whose bytes changed and signal the containers if any did."""
        affected = [f for f in self._spec.files if sources & set(f.sources)]
        needed = {s for f in affected for s in f.sources}
        fetched = fetch_all(self._vault, self._record.token, tuple(needed - (set(self._current) - sources)))
        files = render_files(self._spec, {s: f.data for s, f in {**self._current, **fetched}.items()}, only=set(needed))
        with self._writing:  # not while teardown runs: stop() waits for this, and nothing is written after it
            if self._stopped:
                return
            written = self._mounter.rewrite(
                self._record.volume,
                self._record.mount_id,
                files,
                uid=self._spec.uid,
                gid=self._spec.gid,
                mode=self._spec.mode,
            )
        # Only now that the files hold the new secrets: a failure above left the old files and leases serving.
        self._current.update(fetched)
        old = self._store.leases(self._record.volume, self._record.mount_id)
        for source, new in fetched.items():
            if new.lease_id:
                self._store.set_lease(self._record.volume, self._record.mount_id, str(source), new.lease_id)
                self._retire(source, old.get(str(source)), new.lease_id)
        if written:
            log.info("rewrote %s of volume %s", ", ".join(written), self._record.volume)
            if self._spec.notify and self._notify is not None:
                try:
                    self._notify(self._record.volume, self._record.mount_id, self._spec.notify)
                except (PluginError, OSError) as e:  # the files are written: a failed signal must not stop upkeep
                    log.warning(
                        "could not signal the container of mount %s of volume %s: %s",
                        self._record.mount_id,
                        self._record.volume,
                        e,
                    )
