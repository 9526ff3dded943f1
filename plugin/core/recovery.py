"""Settling mounts the plugin did not see end: at start (a crash left them half-made, a reboot took their
tmpfs), when no container holds them any more (their Unmount never came), and by break-glass. The work of
the driver's recovery verbs, under its locks.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from plugin.core.errors import PluginError, StateError
from plugin.core.metrics import BACKGROUND_ERRORS
from plugin.core.records import MountRecord
from plugin.core.scheduler import token_renewal
from plugin.core.spec import parse_spec

if TYPE_CHECKING:
    from plugin.core.driver import Driver

log = logging.getLogger(__name__)
audit = logging.getLogger("plugin.audit")

# A mount this young may be of a container still starting, which holds its tmpfs only once it runs.
STARTING = 30.0


def reconcile(driver: Driver) -> int:
    """At start: undo mounts a crash left half-made and mounts whose tmpfs is gone (host reboot);
    resume renewing the tokens of the others (at once: how long they have left is not recorded).

    One mount that cannot be settled (its teardown fails, its options no longer parse) is logged with its
    name and counted, and the others are settled all the same. Returns how many could not be."""
    for name, credential in driver._store.volume_credentials().items():
        if not credential.revoked:
            driver._scheduler.schedule(("volume", name), token_renewal(driver._vault, credential.token), 0)
    failed = 0
    for record in driver._store.mounts():
        try:
            _reconcile(driver, record)
        except Exception as e:  # noqa: BLE001  (one bad record must not leave every later mount unrenewed)
            failed += 1
            BACKGROUND_ERRORS.labels("reconcile").inc()
            log.error(
                "could not reconcile mount %s of volume %s: %s",
                record.mount_id,
                record.volume,
                e,
                exc_info=not isinstance(e, PluginError),  # a traceback only for the unexpected
            )
    return failed


def _reconcile(driver: Driver, record: MountRecord) -> None:
    with driver._hold((record.volume, record.mount_id)):
        volume = driver._store.volume(record.volume)
        if record.refcount == 0 or volume is None or not driver._mounter.is_mounted(record.volume, record.mount_id):
            log.info("cleaning up stale mount %s of volume %s", record.mount_id, record.volume)
            driver._teardown(record)
        elif record.unreadable:
            raise StateError(
                f"its token does not open with the seal key (a damaged row), so it is not renewed: the "
                f"container's secrets stop working within the token's TTL; its Unmount revokes it by accessor "
                f"{record.accessor}"
            )
        elif not record.revoked:
            driver._start_upkeep(record, parse_spec(volume.options))


def release_unheld(driver: Driver, starting: float = STARTING) -> int | None:
    """Tear down the active mounts that no container holds any more, as the kernel tells (any runtime, no
    --docker-socket): a container that ended while the plugin was down, or whose Unmount never came.
    A mount younger than `starting` may be of a container still starting, and is left alone. Returns
    how many were released, or None when this host cannot tell (then nothing is released)."""
    records = [r for r in driver._store.mounts() if r.refcount > 0 and time.time() - r.created_at >= starting]
    held = driver._mounter.holders_of([(r.volume, r.mount_id) for r in records])
    if held is None:
        return None
    released = 0
    for record in records:
        if held[(record.volume, record.mount_id)]:
            continue
        with driver._hold((record.volume, record.mount_id)):
            current = driver._store.mount(record.volume, record.mount_id)
            # Looked at again under the lock: a Mount of the same ID may have come meanwhile.
            if current is None or driver._mounter.holders(record.volume, record.mount_id) != []:
                continue
            log.warning(
                "releasing mount %s of volume %s: no container holds its tmpfs any more (its Unmount never came)",
                record.mount_id,
                record.volume,
            )
            driver._teardown(current)
            released += 1
    return released


def release_unused(driver: Driver, running_containers_using: Callable[[str], list[str]], min_age: float = 60.0) -> int:
    """Tear down the mounts of volumes that no running container uses (dockerd restarted without
    live-restore sends no Unmount). Mounts younger than `min_age` may be of a container still
    starting, so a volume is left alone until all its mounts are older. Returns how many were released."""
    by_volume: dict[str, list[MountRecord]] = {}
    for record in driver._store.mounts():
        if record.refcount > 0:
            by_volume.setdefault(record.volume, []).append(record)
    released = 0
    now = time.time()
    for volume, records in by_volume.items():
        if any(now - r.created_at < min_age for r in records) or running_containers_using(volume):
            continue
        for record in records:
            with driver._hold((record.volume, record.mount_id)):
                if driver._store.mount(record.volume, record.mount_id) is None:
                    continue
                log.warning(
                    "releasing mount %s of volume %s: no running container uses the volume "
                    "(dockerd restarted without sending Unmount?)",
                    record.mount_id,
                    volume,
                )
                driver._teardown(record)
                released += 1
    return released


def break_glass(driver: Driver, volume: str | None = None) -> dict[str, int]:
    """Revoke every token (and so lease) issued for `volume`, or for all volumes, and wipe their files.

    Running containers keep an empty volume; their Unmounts clean up later. Mounts of a volume whose
    wrapped credential was revoked are refused from then on. Returns counts of what was revoked.
    """
    mounts = credentials = 0
    for record in driver._store.mounts(volume):
        with driver._hold((record.volume, record.mount_id)):
            driver._revoke_mount(record)
            driver._mounter.wipe(record.volume, record.mount_id)
            driver._store.mark_mount_revoked(record.volume, record.mount_id)
            mounts += 1
    for name, credential in driver._store.volume_credentials().items():
        if volume in (None, name) and not credential.revoked:
            with driver._hold(name):
                driver._scheduler.cancel(("volume", name))
                driver._revoker.revoke(credential.accessor, credential.token, volume=name)
                driver._store.mark_credential_revoked(name)
                credentials += 1
    audit.warning(
        "breakglass.revoke %s",
        volume or "all volumes",
        extra={"event": "breakglass.revoke", "volume": volume or "*", "mounts": mounts, "credentials": credentials},
    )
    return {"mounts": mounts, "credentials": credentials}
