"""Keeping one mount's secrets alive and current while its container runs, each on its own clock.

After Mount, the scheduler runs, for each mount:
- the renewal of its token;
- for each leased source, the renewal of the lease. Once Vault caps a renewal (max TTL) or the lease
  is not renewable, a new secret is issued: for a mount with a token of its own, by replacing the whole
  token (`replace`: the old token, and with it its leases, is revoked after `rotate-grace`; a mount's
  token may revoke itself but not a lease); for a mount reading with its volume's shared token, by issuing
  the secret again and revoking the old lease after the grace with that token's right on sys/leases/revoke;
- for each credential without a lease that expires (a PKI certificate), its re-issue at about two
  thirds of its validity, never by `refresh`;
- every `refresh`, a check of its static secrets for new versions.
Files are rewritten only when their bytes change, all of a rewrite or none, and then the container holding
the mount is signalled (`notify=`). A new secret is recorded (and the old one's revocation scheduled) only
once its files are written: a failed rewrite leaves the old files and leases serving, and is retried.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator, Mapping

from plugin.core.errors import PluginError, VaultError
from plugin.core.ports import Mounter, StorePort, VaultPort
from plugin.core.records import Fetched, IssuedToken, MountRecord, OwedRevocation
from plugin.core.render import render_files
from plugin.core.revocation import Revoker
from plugin.core.scheduler import Again, Scheduler, Task, renewal_delay
from plugin.core.spec import Source, Spec

log = logging.getLogger(__name__)
audit = logging.getLogger("plugin.audit")

# A renewal granting less than this share of what it asked for means the max TTL is near (Vault grants what
# is asked, to the second, until then).
CAPPED = 0.95

Notify = Callable[[str, str, str], None]  # (volume, mount ID, signal): signals the containers binding that mount


def fetch_all(vault: VaultPort, token: str, sources: tuple[Source, ...]) -> dict[Source, Fetched]:
    """One request per source, made concurrently."""
    return dict(zip(sources, vault.fetch_many(token, [(s.path, s.params) for s in sources]), strict=True))


def notify_changed(notify: Notify, record: MountRecord, signal: str) -> None:
    """Signal the container of `record` that its files changed; a failure is logged, never raised (the files
    are written, and the upkeep must go on)."""
    try:
        notify(record.volume, record.mount_id, signal)
    except (PluginError, OSError) as e:
        log.warning("could not signal the container of mount %s of volume %s: %s", record.mount_id, record.volume, e)


class MountUpkeep:
    """The scheduled work of one mount. `start()` after Mount or at plugin start, `stop()` at teardown.

    `replace`: replaces the mount's token and every secret under a new one (`Driver.replace_token`); given
    for a mount whose token is its own, which is how its leases at their max TTL are re-issued."""

    def __init__(
        self,
        record: MountRecord,
        spec: Spec,
        *,
        vault: VaultPort,
        store: StorePort,
        mounter: Mounter,
        scheduler: Scheduler,
        revoker: Revoker,
        fetched: Mapping[Source, Fetched] | None = None,
        notify: Notify | None = None,
        token_ttl: int = 0,
        replace: Callable[[], object] | None = None,
    ):
        self._record, self._spec = record, spec
        # As granted by Vault at Mount (a role's period or max TTL may cut the ttl asked for).
        self._token_ttl = token_ttl
        self._vault, self._store, self._mounter, self._scheduler = vault, store, mounter, scheduler
        self._revoker, self._notify, self._replace = revoker, notify, replace
        # In memory only (secrets never touch disk); empty after a plugin restart, filled again on demand.
        self._current: dict[Source, Fetched] = dict(fetched or {})
        self._first_duration = {s: f.lease_duration for s, f in self._current.items() if f.lease_id}
        self._key = ("mount", record.volume, record.mount_id)
        # What `start` scheduled, so `stop` cancels it without scanning every task.
        self._keys: set[tuple[str, ...]] = set()
        self._writing = threading.Lock()  # held while files are rewritten, and by stop()
        self._stopped = False

    def start(self, resumed: bool = False) -> None:
        """Schedule the mount's upkeep. `resumed` (after a plugin restart, when what the secrets were and how
        long they live is not known): renew at once, and read the secrets without a lease once to learn it."""
        token_ttl = 0 if resumed else self._token_ttl
        if self._record.owns_token:
            self._schedule((*self._key, "token"), self._token_task, renewal_delay(token_ttl), token_ttl or None)
        leases = self._store.leases(self._record.volume, self._record.mount_id)
        for source in self._spec.sources:
            if str(source) in leases:
                ttl = 0 if resumed else self._current[source].lease_duration
                self._schedule(
                    (*self._key, "lease", str(source)), self._lease_task(source), renewal_delay(ttl), ttl or None
                )
        unleased = {s for s in self._spec.sources if str(s) not in leases}
        if resumed and unleased:
            self._schedule((*self._key, "relearn"), lambda: self._relearn(unleased), 0)
        for source in unleased:
            self._schedule_expiry(source)
        if self._spec.refresh and unleased:
            self._schedule((*self._key, "refresh"), self._refresh, self._spec.refresh)

    def _schedule(self, key: tuple[str, ...], task: Task, delay: float, lifetime: float | None = None) -> None:
        self._keys.add(key)
        self._scheduler.schedule(key, task, delay, lifetime)

    def stop(self) -> None:
        """No more work for this mount: cancels what is scheduled and waits for a rewrite in progress, so that
        nothing is written once it returns (teardown unmounts the tmpfs next)."""
        with self._writing:
            self._stop()

    def _stop(self) -> None:
        self._stopped = True
        for key in self._keys:
            self._scheduler.cancel(key)

    @contextlib.contextmanager
    def handover(self) -> Iterator[None]:
        """Hand the mount over to a new token's upkeep: this one writes nothing while the block runs (the new
        files are written), and stops if it succeeds. If it fails, this one goes on as if nothing happened,
        and the task that asked for the handover is retried."""
        with self._writing:
            yield
            self._stop()

    # -- the token ------------------------------------------------------------------------------

    def _token_task(self) -> Again | None:
        issued: IssuedToken = self._vault.renew_self(self._record.token)
        audit.info(
            "token.renew %s",
            issued.accessor,
            extra={"event": "token.renew", "accessor": issued.accessor, "ttl": issued.ttl},
        )
        if self._token_ttl and issued.ttl < self._token_ttl * CAPPED and self._replace is not None:
            # Its max TTL is near: a new token takes the mount over now, with its own upkeep.
            self._replace()
            return None
        self._token_ttl = self._token_ttl or issued.ttl
        return Again(renewal_delay(issued.ttl), issued.ttl)

    # -- leases ---------------------------------------------------------------------------------

    def _lease_task(self, source: Source) -> Callable[[], Again | None]:
        def task() -> Again | None:
            lease_id = self._store.leases(self._record.volume, self._record.mount_id)[str(source)]
            if source in self._current and not self._current[source].renewable:
                return self._reissue(source)
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
                # Vault capped it, its max TTL is near: a new secret now, so that the old one's grace ends
                # before its max TTL does (a failure is retried while the old one lives).
                return self._reissue(source)
            return Again(renewal_delay(ttl), ttl)

        return task

    def _reissue(self, source: Source) -> Again | None:
        """A new secret for leased `source`: for a mount with its own token, a new token and every secret
        under it (`replace`: its own upkeep takes over); else the secret issued again with the shared token,
        its files rewritten and the old lease revoked after the grace."""
        if self._replace is not None:
            self._replace()
            return None
        self._rewrite({source})
        fresh = self._current[source]
        self._first_duration[source] = fresh.lease_duration
        return Again(renewal_delay(fresh.lease_duration), fresh.lease_duration)

    def _retire(self, source: Source, old_lease: str | None, new_lease: str) -> None:
        """A new lease replaced `old_lease`: readers get `rotate-grace` to move over before it is revoked."""
        log.info("issued a new secret for %s of volume %s (lease %s)", source, self._record.volume, new_lease)
        where = {"volume": self._record.volume, "mount_id": self._record.mount_id}
        audit.info("secret.rotate %s", source, extra={"event": "secret.rotate", **where, "lease_id": new_lease})
        if old_lease and old_lease != new_lease:
            owed = OwedRevocation(old_lease, self._record.token, "lease")
            self._revoker.revoke_later(owed, self._spec.rotate_grace, **where)

    # -- credentials that expire without a lease ------------------------------------------------

    def _schedule_expiry(self, source: Source) -> None:
        known = self._current.get(source)
        if known is None or known.expires_at is None:
            return
        left = known.expires_at - time.time()
        key = (*self._key, "expiry", str(source))
        self._schedule(key, lambda: self._renew_expiring(source), renewal_delay(left), max(left, 0))

    def _renew_expiring(self, source: Source) -> None:
        """Issue a credential that expires (a certificate) anew, at about two thirds of its validity."""
        self._rewrite({source})
        self._schedule_expiry(source)

    # -- static secrets -------------------------------------------------------------------------

    def _refresh(self) -> Again:
        leases = self._store.leases(self._record.volume, self._record.mount_id)
        changed = {s for s in self._spec.sources if str(s) not in leases and not self._expires(s) and self._changed(s)}
        if changed:
            self._rewrite(changed)
        return Again(self._spec.refresh)

    def _relearn(self, sources: set[Source]) -> None:
        """After a plugin restart: read the secrets without a lease once, so that refresh compares versions
        and certificates are renewed by their expiry (the files change only if the secrets did)."""
        self._rewrite(sources)
        for source in sources:
            self._schedule_expiry(source)

    def _expires(self, source: Source) -> bool:
        known = self._current.get(source)
        return known is not None and known.expires_at is not None

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
        rewrite the files whose bytes changed and signal the container if any did."""
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
                notify_changed(self._notify, self._record, self._spec.notify)
