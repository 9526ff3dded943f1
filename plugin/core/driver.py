"""The volume driver: Docker's eight volume verbs, knowing nothing of HTTP.

Create/Remove/Get/List/Path answer from the store only (dockerd drops a volume whose Get fails, so they
must never depend on Vault). Mount mints a child token for the mount, reads every secret with it, and
only then makes the tmpfs; any failure undoes all of it. Unmount of the last reference revokes the
child token (and with it every lease it created) and removes the tmpfs.

A Mount (and the Create of a `wrapped-token=` volume) runs within one budget (`mount_timeout`): it
waits for the plugin identity and Vault retries transient errors inside it, so a leader election costs
latency, not a failed container start.

The driver holds the state the verbs share (the locks, each mount's upkeep); replacing a running mount's
token (plugin/core/rotation.py) and settling mounts it did not see end (plugin/core/recovery.py) live
beside it and work through it.
"""

from __future__ import annotations

import builtins
import dataclasses
import functools
import hashlib
import logging
import math
import re
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import cast

from plugin.core import recovery, retry, rotation
from plugin.core.errors import (
    InvalidOptionError,
    VaultError,
    VolumeInUseError,
    VolumeNotFoundError,
)
from plugin.core.metrics import MOUNT_FAILURES, MOUNT_OVERHEAD, MOUNT_SECONDS, waiting_on_vault
from plugin.core.ports import (
    Mounter,
    StorePort,
    TokenSource,
    VaultPort,
    VolumeCredentials,
)
from plugin.core.records import (
    Fetched,
    IssuedToken,
    MountRecord,
    VolumeInfo,
    VolumeRecord,
)
from plugin.core.render import render_files
from plugin.core.revocation import Revoker
from plugin.core.scheduler import Scheduler, renewal_delay, token_renewal
from plugin.core.spec import TOKEN_FILE_WRAP_TTL, Source, Spec, parse_spec
from plugin.core.template import check_bounds
from plugin.core.upkeep import MountUpkeep, Notify

log = logging.getLogger(__name__)
audit = logging.getLogger("plugin.audit")

# Docker's own volume name rule; also keeps the name a safe single path component.
_VOLUME_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
_MOUNT_ID = re.compile(r"[A-Za-z0-9]{1,128}")
# A mount's token is first minted to live this much past the Mount's budget, then extended to the volume's
# ttl once it is recorded: a create whose answer was lost (timeout) leaves a token nobody holds, and
# this bounds how long it lives.
PROVISIONAL_MARGIN = 10
# Unmount waits less for Vault than Mount: a revocation it cannot make now is owed and retried.
UNMOUNT_TIMEOUT = 10.0


class Driver:
    """Implements the volume verbs over the store, Vault, the plugin identity and the tmpfs mounter."""

    def __init__(
        self,
        store: StorePort,
        vault: VaultPort,
        identity: TokenSource,
        mounter: Mounter,
        scheduler: Scheduler,
        *,
        credentials: VolumeCredentials,
        wrap_allowed_paths: Sequence[str],
        hostname: str,
        notify: Notify | None = None,
        mount_timeout: float = 20.0,
    ):
        self._store, self._vault, self._identity, self._mounter = store, vault, identity, mounter
        self._credentials = credentials
        self._scheduler = scheduler
        self._notify = notify
        self._upkeeps: dict[tuple[str, str], MountUpkeep] = {}
        self._revoker = Revoker(vault, store, identity, scheduler)
        self._wrap_allowed_paths = tuple(wrap_allowed_paths)
        self._hostname = hostname
        self._mount_timeout = mount_timeout
        self._locks: dict[object, _Held] = {}
        self._locks_guard = threading.Lock()

    # -- verbs answered from local state --------------------------------------------------------

    def create(self, name: str, options: dict[str, str] | None) -> None:
        """Validate and record a volume. Idempotent for identical options.

        A `role=` volume needs no Vault here; a `wrapped-token=` volume's token is checked and unwrapped
        now, exactly once, and its credential kept sealed (only a digest of the spent token is stored).
        """
        _check_volume_name(name)
        options = dict(options or {})
        spec = parse_spec(options)
        if spec.notify and self._notify is None:
            raise InvalidOptionError(
                f"option notify={spec.notify}: this plugin cannot signal containers, as it does not see the "
                "host's processes (it runs in a PID namespace of its own): drop notify=, or run the plugin as "
                "the host service"
            )
        stored = _stored_options(options)
        with self._hold(name):
            existing = self._store.volume(name)
            if existing is not None:
                if existing.options != stored:
                    raise InvalidOptionError(
                        f"volume {name} already exists with other options: remove it first (docker volume rm {name})"
                    )
                return
            for file in spec.files:  # a render each: only for a volume not already recorded (Create repeats)
                if file.template is not None:
                    check_bounds(file.name, file.template)
            credential = None
            if spec.wrapped_token is not None:
                with retry.budget(self._mount_timeout):
                    credential, ttl = self._credentials.unwrap(name, spec, self._wrap_allowed_paths)
            try:
                self._store.add_volume(name, stored, credential)
            except BaseException:
                if credential is not None:
                    self._revoker.revoke(credential.accessor, credential.token, volume=name)
                raise
            if credential is not None:
                self._scheduler.schedule(
                    ("volume", name), token_renewal(self._vault, credential.token), renewal_delay(ttl), ttl
                )
        audit.info("volume.create %s", name, extra={"event": "volume.create", "volume": name})

    def remove(self, name: str) -> None:
        """Forget a volume (revoking its credential, if any). Refused while mounted; unknown volumes succeed."""
        with self._hold(name):
            active = self._store.active_mountpoints(name)
            if active:
                raise VolumeInUseError(
                    f"volume {name} is mounted by {len(active)} container(s): stop them before removing it"
                )
            if self._store.mount_ids(name):  # recorded at refcount 0: a first Mount in progress (see _record_mount)
                raise VolumeInUseError(
                    f"volume {name} is being mounted by a container that is starting: try again once it runs"
                )
            credential = self._store.volume_credential(name)
            self._store.remove_volume(name)
            if credential is not None:
                self._scheduler.cancel(("volume", name))
                self._revoker.revoke(credential.accessor, credential.token, volume=name)
        audit.info("volume.remove %s", name, extra={"event": "volume.remove", "volume": name})

    def get(self, name: str) -> VolumeInfo:
        volume = self._require_volume(name)
        return self._describe(volume)

    # `list` is one of Docker's verbs: below it, the builtin is `builtins.list` in this class's annotations.
    def list(self) -> builtins.list[VolumeInfo]:
        return [self._describe(v) for v in self._store.volumes()]

    def path(self, name: str) -> str:
        """The mountpoint of one active mount of the volume, or "" when none (each mount has its own)."""
        self._require_volume(name)
        return next(iter(self._store.active_mountpoints(name)), "")

    def capabilities(self) -> str:
        """The volumes' scope: "local", each host has its own (mounts, tokens and tmpfs are per host)."""
        return "local"

    def _describe(self, volume: VolumeRecord) -> VolumeInfo:
        active = self._store.active_mountpoints(volume.name)
        return VolumeInfo(volume.name, active[0] if active else "", volume.created_at, len(active))

    # -- mount and unmount ----------------------------------------------------------------------

    def mount(self, name: str, mount_id: str) -> str:
        """Give mount `mount_id` of volume `name` its tmpfs of secrets; return the path dockerd binds.

        A second Mount of the same ID only counts a reference. Fails closed: on any error no token,
        tmpfs or state of this mount remains, and the raised `PluginError` says what failed.
        """
        _check_volume_name(name)
        _check_mount_id(mount_id)
        with self._hold((name, mount_id)):
            record = self._store.mount(name, mount_id)
            if record is not None and record.refcount > 0:
                self._store.set_refcount(name, mount_id, self._references_after_remount(record))
                return record.mountpoint
            if record is not None:  # left half-made by a crash: finish undoing it first
                self._teardown(record)
            started = time.monotonic()
            try:
                with retry.budget(self._mount_timeout), waiting_on_vault() as waited:
                    view = self._mount_new(name, mount_id)
            except BaseException:
                MOUNT_FAILURES.inc()
                raise
            finally:
                MOUNT_SECONDS.observe(time.monotonic() - started)
            MOUNT_OVERHEAD.observe(max(time.monotonic() - started - waited.seconds, 0.0))
        return str(view)

    def _references_after_remount(self, record: MountRecord) -> int:
        """The refcount after another Mount of an ID that is mounted. dockerd sends one for `docker cp` into a
        running container (one more reference), and, after it crashed, for a container it restarts with its old
        mount ID: then no Unmount will ever come for the earlier references. Told apart by whether a container
        holds the tmpfs now: dockerd mounts an ID again only for a running container (which holds it) or for
        one it restarts (which does not yet); a container that is not running has no mount ID."""
        if self._mounter.holders(record.volume, record.mount_id) == []:
            log.warning(
                "mount %s of volume %s was mounted again while no container holds it: its %d earlier reference(s) "
                "are stale (dockerd restarted after a crash?), counting one",
                record.mount_id,
                record.volume,
                record.refcount,
            )
            return 1
        return record.refcount + 1

    def _mount_new(self, name: str, mount_id: str) -> Path:
        """Mint, fetch, render, mount: the work of a first Mount of an ID (under its lock)."""
        spec = parse_spec(self._require_volume(name).options)
        credential = self._store.volume_credential(name)
        if credential is not None and credential.revoked:
            raise VaultError(
                f"the credential of volume {name} was revoked by break-glass: remove the volume and "
                "create it again with a new wrapped token"
            )
        parent = credential.token if credential else self._identity.token()
        meta = {"volume": name, "mount_id": mount_id, "host": self._hostname}
        view = self._mounter.view_path(name, mount_id)
        child: IssuedToken | None = None
        if credential is not None and not credential.can_mint:
            record = MountRecord(
                name, mount_id, 0, str(view), credential.token, credential.accessor, time.time(), owns_token=False
            )
        else:
            child = self._mint(parent, spec, meta)
            record = MountRecord(name, mount_id, 0, str(view), child.token, child.accessor, time.time())
        self._record_mount(record)
        try:
            # Each lease recorded as it comes: if another read fails, teardown still knows what to revoke.
            token_ttl, fetched = self._extend_and_fetch(child, record.token, spec, record=record)
            if not record.owns_token and any(secret.lease_id for secret in fetched.values()):
                self._check_may_revoke_leases(record.token, name)
            files = render_files(spec, {source: secret.data for source, secret in fetched.items()})
            if spec.token_file is not None:
                accessor, files[spec.token_file] = self._container_token(parent, spec, meta)
                record = dataclasses.replace(record, container_token_accessor=accessor)
                self._store.set_container_token_accessor(name, mount_id, accessor)
            self._mounter.mount(name, mount_id, files, uid=spec.uid, gid=spec.gid, mode=spec.mode, size=spec.size)
            self._store.set_refcount(name, mount_id, 1)
        except BaseException:
            self._teardown(record)
            raise
        self._start_upkeep(record, spec, fetched, token_ttl)
        audit.info(
            "mount %s %s",
            name,
            mount_id,
            extra={"event": "mount", "volume": name, "mount_id": mount_id, "accessor": record.accessor},
        )
        return view

    def _record_mount(self, record: MountRecord) -> None:
        """Record a new mount (refcount 0) before anything else can fail, so a crash leaves a trace to undo.

        Under the volume's lock, as Remove holds it: the volume cannot be removed between this check and the
        record, and Remove refuses while the record exists. A token minted for a mount that cannot be
        recorded is revoked at once: nothing minted is left without a record."""
        try:
            with self._hold(record.volume):
                self._require_volume(record.volume)  # Remove may have run while the token was minted
                self._store.add_mount(record)
        except BaseException:
            if record.owns_token:
                self._revoker.revoke(record.accessor, record.token, volume=record.volume, mount_id=record.mount_id)
            raise

    def _mint(self, parent: str, spec: Spec, meta: dict[str, str]) -> IssuedToken:
        """The mount's token, minted to live a little past the Mount's budget (see PROVISIONAL_MARGIN)."""
        display_name = f"vault-secrets-{meta['volume']}"[:100]
        provisional = min(spec.ttl, math.ceil(self._mount_timeout) + PROVISIONAL_MARGIN)
        child = self._vault.mint_child(parent, spec.role, provisional, meta, display_name=display_name)
        if child.ttl < spec.ttl and not child.renewable:
            # The role's tokens cannot be renewed, so a short one could not be extended: mint at the full
            # ttl instead (for such roles a lost answer leaves a token for the volume's ttl).
            self._revoker.revoke(child.accessor, child.token, volume=meta["volume"], mount_id=meta["mount_id"])
            child = self._vault.mint_child(parent, spec.role, spec.ttl, meta, display_name=display_name)
        audit.info(
            "token.mint %s %s",
            meta["volume"],
            meta["mount_id"],
            extra={
                "event": "token.mint",
                "volume": meta["volume"],
                "mount_id": meta["mount_id"],
                "accessor": child.accessor,
            },
        )
        return child

    def _extend_and_fetch(
        self, child: IssuedToken | None, token: str, spec: Spec, *, record: MountRecord | None = None
    ) -> tuple[int, dict[Source, Fetched]]:
        """Read every source with `token` while extending it (when it is the mount's own, `child`): the
        extension costs no round trip of its own. Returns the token's TTL and the secrets. With `record`,
        each lease is recorded for that mount as soon as its read returns."""
        calls: list[Callable[[], object]] = [functools.partial(self._fetch, token, s, record) for s in spec.sources]
        if child is not None:
            calls.append(functools.partial(self._extend, child, spec.ttl))
        results = self._vault.concurrently(calls)
        # The calls are the fetches (Fetched), then the extension (its TTL, an int) when there is one.
        token_ttl = cast(int, results.pop()) if child is not None else spec.ttl
        return token_ttl, dict(zip(spec.sources, cast(builtins.list[Fetched], results), strict=True))

    def _fetch(self, token: str, source: Source, record: MountRecord | None) -> Fetched:
        fetched = self._vault.fetch(token, source.path, source.params)
        if record is not None and fetched.lease_id:
            self._store.set_lease(record.volume, record.mount_id, str(source), fetched.lease_id)
        return fetched

    def _check_may_revoke_leases(self, token: str, volume: str) -> None:
        """A token shared by a volume's mounts cannot be revoked at Unmount: each of a mount's leases is, with
        that token's right on sys/leases/revoke. Without it, the leases would outlive the container."""
        if not self._vault.capabilities(token, "sys/leases/revoke") & {"update", "sudo", "root"}:
            raise VaultError(
                f"volume {volume} reads dynamic secrets with a token shared by its mounts, which may not revoke "
                "their leases when a container stops: give the wrapped token the right to mint child tokens "
                '(path "auth/token/create" { capabilities = ["update"] }), or to revoke leases '
                '(path "sys/leases/revoke" { capabilities = ["update"] })'
            )

    def _extend(self, child: IssuedToken, ttl: int) -> int:
        """Extend a provisional token (now recorded, so revoked if the Mount fails) to the volume's `ttl`.
        Returns the TTL Vault granted, which renewals follow: a role's period or max TTL may cut it."""
        if child.ttl >= ttl or not child.renewable:
            return child.ttl
        return self._vault.renew_self(child.token, increment=ttl).ttl

    def _container_token(self, parent: str, spec: Spec, meta: dict[str, str]) -> tuple[str, bytes]:
        """Mint a token for the container itself, wrapped: the plugin only ever holds the wrapping token.
        Returns its accessor and the token-file's content.

        The inner token is revoked by accessor at Unmount, which needs that right on the parent.
        """
        if not self._vault.capabilities(parent, "auth/token/revoke-accessor") & {"update", "sudo", "root"}:
            raise VaultError(
                "token-file needs the plugin's token to be allowed to revoke the container's token at unmount: add "
                'path "auth/token/revoke-accessor" { capabilities = ["update"] } to its policy'
            )
        wrapping, accessor = self._vault.mint_wrapped_child(
            parent,
            spec.role,
            spec.ttl,
            {**meta, "purpose": "token-file"},
            display_name=f"vault-secrets-{meta['volume']}-container"[:100],
            wrap_ttl=TOKEN_FILE_WRAP_TTL,
        )
        audit.info(
            "token.mint %s %s (token-file)",
            meta["volume"],
            meta["mount_id"],
            extra={"event": "token.mint", "volume": meta["volume"], "mount_id": meta["mount_id"], "accessor": accessor},
        )
        return accessor, wrapping.encode()

    def unmount(self, name: str, mount_id: str) -> None:
        """Drop one reference; the last one revokes the mount's tokens and removes the tmpfs. Unknown IDs are fine."""
        with self._hold((name, mount_id)):
            record = self._store.mount(name, mount_id)
            if record is None:
                log.info("unmount of unknown mount %s of volume %s: nothing to do", mount_id, name)
                return
            if record.refcount > 1:
                self._store.set_refcount(name, mount_id, record.refcount - 1)
                return
            with retry.budget(UNMOUNT_TIMEOUT):
                self._teardown(record)
        audit.info("unmount %s %s", name, mount_id, extra={"event": "unmount", "volume": name, "mount_id": mount_id})

    # -- a running mount's token replaced (plugin/core/rotation.py) -------------------------------

    def replace_token(self, volume: str, mount_id: str, *, reason: str, container_token: bool = False) -> bool:
        """See `rotation.replace_token`: a new token and every secret under it, the old revoked after the grace."""
        return rotation.replace_token(self, volume, mount_id, reason=reason, container_token=container_token)

    def retire_identity(self, previous: IssuedToken) -> dict[str, object]:
        """See `rotation.retire_identity`: after bootstrap, the running mounts moved, then `previous` revoked."""
        return rotation.retire_identity(self, previous)

    def _replace_expiring(self, volume: str, mount_id: str) -> None:
        """For the upkeep: a lease (or the token) reached its max TTL; runs in the scheduler's thread."""
        self.replace_token(volume, mount_id, reason="a lease or the token reached its max TTL")

    def _stop_upkeep(self, record: MountRecord) -> None:
        upkeep = self._upkeeps.pop((record.volume, record.mount_id), None)
        if upkeep is not None:
            upkeep.stop()

    def _start_upkeep(
        self, record: MountRecord, spec: Spec, fetched: dict[Source, Fetched] | None = None, token_ttl: int = 0
    ) -> None:
        """Schedule the mount's renewals and refreshes; without `fetched` (after a restart) they start at once.
        `token_ttl`: what Vault granted the mount's token (renewals follow it, not the ttl asked for)."""
        upkeep = MountUpkeep(
            record,
            spec,
            vault=self._vault,
            store=self._store,
            mounter=self._mounter,
            scheduler=self._scheduler,
            revoker=self._revoker,
            fetched=fetched,
            notify=self._notify,
            token_ttl=token_ttl,
            replace=functools.partial(self._replace_expiring, record.volume, record.mount_id)
            if record.owns_token
            else None,
        )
        self._upkeeps[(record.volume, record.mount_id)] = upkeep
        upkeep.start(resumed=fetched is None)

    def _teardown(self, record: MountRecord) -> None:
        """Revoke the mount's tokens (and so its leases), remove its tmpfs, forget it.
        Revocations Vault cannot take now are kept and retried."""
        self._revoke_mount(record)
        self._mounter.unmount(record.volume, record.mount_id)
        self._store.remove_mount(record.volume, record.mount_id)

    def _revoke_mount(self, record: MountRecord) -> None:
        """Stop the mount's upkeep and revoke its tokens (the container's too), and so its leases."""
        self._stop_upkeep(record)
        where = {"volume": record.volume, "mount_id": record.mount_id}
        leases = self._store.leases(record.volume, record.mount_id).values()
        # The parent (an unsealed credential, or the identity) is needed only to revoke the container's
        # token or to confirm leases: not looked up on the common Unmount path.
        parent = self._revoker.parent_token(record.volume) if record.container_token_accessor or leases else ""
        if record.container_token_accessor is not None:
            self._revoker.revoke_by_accessor(record.container_token_accessor, parent, **where)
        if record.owns_token and record.unreadable:  # only its accessor is known: revoke with the parent's right
            self._revoker.revoke_by_accessor(
                record.accessor, parent or self._revoker.parent_token(record.volume), **where
            )
        elif record.owns_token and self._revoker.revoke(record.accessor, record.token, **where):
            self._revoker.confirm_leases_gone(leases, parent, **where)
        elif not record.owns_token:  # the volume's token lives on: each lease goes on its own
            for lease_id in leases:
                self._revoker.revoke_lease(lease_id, record.token, **where)

    # -- recovery (plugin/core/recovery.py) -------------------------------------------------------

    def reconcile(self) -> int:
        """See `recovery.reconcile`: at start, undo what a crash left and resume the rest; how many failed."""
        return recovery.reconcile(self)

    def release_unheld(self, starting: float = recovery.STARTING) -> int | None:
        """See `recovery.release_unheld`: tear down mounts no container holds; None when it cannot tell."""
        return recovery.release_unheld(self, starting)

    def release_unused(
        self, running_containers_using: Callable[[str], builtins.list[str]], min_age: float = 60.0
    ) -> int:
        """See `recovery.release_unused`: the same, asking dockerd which containers run."""
        return recovery.release_unused(self, running_containers_using, min_age)

    def break_glass(self, volume: str | None = None) -> dict[str, int]:
        """See `recovery.break_glass`: revoke every token of `volume` (or all) and wipe their files."""
        return recovery.break_glass(self, volume)

    def retry_pending_revocations(self) -> int:
        """Revoke what could not be revoked earlier. Returns how many revocations are still owed."""
        return self._revoker.retry_pending()

    # -- helpers --------------------------------------------------------------------------------

    def _require_volume(self, name: str) -> VolumeRecord:
        volume = self._store.volume(name)
        if volume is None:
            # Bounded: a volume name is at most 128 characters, but a request may carry any string.
            raise VolumeNotFoundError(
                f"no vault-secrets volume named {name[:128]!r}: create it with docker volume create -d vault-secrets"
            )
        return volume

    @contextmanager
    def _hold(self, key: object) -> Iterator[None]:
        """Serialise work on one volume (Create/Remove) or one mount (Mount/Unmount).

        The one order: a mount's lock may be held while taking its volume's (a first Mount records itself so),
        never the other way round.

        Entries are dropped when no thread holds or waits for them: mount IDs are never reused.
        """
        with self._locks_guard:
            entry = self._locks.setdefault(key, _Held())
            entry.users += 1
        try:
            with entry.lock:
                yield
        finally:
            with self._locks_guard:
                entry.users -= 1
                if entry.users == 0:
                    del self._locks[key]


@dataclasses.dataclass(eq=False)
class _Held:
    """One lock of `Driver._hold`, with how many threads hold or wait for it."""

    lock: threading.Lock = dataclasses.field(default_factory=threading.Lock)
    users: int = 0


def _stored_options(options: dict[str, str]) -> dict[str, str]:
    """Options as kept in state: a wrapping token only as its digest (spent, but still a token string)."""
    if "wrapped-token" not in options:
        return options
    digest = hashlib.sha256(options["wrapped-token"].encode()).hexdigest()
    return {**options, "wrapped-token": f"sha256:{digest}"}


def _check_volume_name(name: str) -> None:
    if not isinstance(name, str) or not _VOLUME_NAME.fullmatch(name):
        raise InvalidOptionError(
            "invalid volume name: use letters, digits, '_', '.' and '-', starting with a letter or digit"
        )


def _check_mount_id(mount_id: str) -> None:
    if not isinstance(mount_id, str) or not _MOUNT_ID.fullmatch(mount_id):
        raise InvalidOptionError("invalid mount ID: dockerd sends a hex string")
