"""A running mount's token replaced, and with it every secret: how a lease or token at its max TTL is
re-issued (a mount's token may revoke itself, not a lease), and how bootstrap moves the running mounts to
a new identity. The work of `Driver.replace_token` and `Driver.retire_identity`, under the driver's locks.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from typing import TYPE_CHECKING

from plugin.core import retry
from plugin.core.errors import PluginError
from plugin.core.records import Fetched, IssuedToken, MountRecord, OwedRevocation
from plugin.core.render import render_files
from plugin.core.spec import Source, Spec, parse_spec
from plugin.core.upkeep import notify_changed

if TYPE_CHECKING:
    from plugin.core.driver import Driver

log = logging.getLogger(__name__)
audit = logging.getLogger("plugin.audit")


def replace_token(driver: Driver, volume: str, mount_id: str, *, reason: str, container_token: bool = False) -> bool:
    """Give a running mount a new token from its parent (the volume's credential, or the identity as it is
    now) and its secrets anew under it: the files are swapped, then the old token, and with it every lease
    it created, is revoked after `rotate-grace` (owed durably from then on). With `container_token`, a
    token-file gets a new wrapped token too, and the container's old token goes the same way.

    This is how a lease at its max TTL is re-issued (a mount's token may revoke itself, not a lease), and
    how bootstrap moves running mounts to a new identity. Returns False when there is nothing to replace
    (the mount ended, or its token is its volume's). Raises like Mount; the mount then keeps its old
    token, files and leases, and its upkeep goes on."""
    with driver._hold((volume, mount_id)):
        record = driver._store.mount(volume, mount_id)
        if record is None or not record.refcount or not record.owns_token or record.revoked or record.unreadable:
            return False
        spec = parse_spec(driver._require_volume(volume).options)
        credential = driver._store.volume_credential(volume)
        with retry.budget(driver._mount_timeout):
            parent = credential.token if credential else driver._identity.token()
            new, fetched, token_ttl, written = _reissue(driver, record, parent, spec, container_token)
        driver._start_upkeep(new, spec, fetched, token_ttl)
    where = {"volume": volume, "mount_id": mount_id}
    driver._revoker.revoke_later(OwedRevocation(record.accessor, record.token), spec.rotate_grace, **where)
    if container_token and record.container_token_accessor:
        old = OwedRevocation(record.container_token_accessor, parent, "accessor")
        driver._revoker.revoke_later(old, spec.rotate_grace, **where)
    audit.info(
        "token.replace %s %s (%s)",
        volume,
        mount_id,
        reason,
        extra={"event": "token.replace", **where, "accessor": new.accessor, "replaced": record.accessor},
    )
    if written and spec.notify and driver._notify is not None:
        notify_changed(driver._notify, new, spec.notify)
    return True


def retire_identity(driver: Driver, previous: IssuedToken) -> dict[str, object]:
    """After bootstrap replaced the plugin identity by a new one: move every running mount whose token
    descends from `previous` (volumes without a wrapped credential) to a new token from the new
    identity, its files swapped (`replace_token`, token-files included), then revoke `previous`, and with it
    whatever it issued that is left. If a mount cannot be moved, `previous` is left unrevoked (revoking it
    would revoke that mount's token, and so its container's secrets): the answer names those mounts."""
    moved, failed = 0, []
    for record in driver._store.mounts():
        if not record.owns_token or not record.refcount or record.revoked or record.unreadable:
            continue
        if driver._store.volume_credential(record.volume) is not None:
            continue  # descends from the volume's wrapped credential, not from the identity
        try:
            if replace_token(driver, record.volume, record.mount_id, reason="bootstrap", container_token=True):
                moved += 1
        except PluginError as e:
            failed.append(f"mount {record.mount_id} of volume {record.volume}: {e}")
    if failed:
        log.error(
            "bootstrap: %d mount(s) could not move to the new identity, so the old one (accessor %s) was not "
            "revoked: %s",
            len(failed),
            previous.accessor,
            "; ".join(failed),
        )
    else:
        driver._revoker.revoke(previous.accessor, previous.token, reason="bootstrap")
    return {"Moved": moved, "Failed": failed, "PreviousRevoked": not failed}


def _reissue(
    driver: Driver, record: MountRecord, parent: str, spec: Spec, container_token: bool
) -> tuple[MountRecord, dict[Source, Fetched], int, list[str]]:
    """Mint, fetch, render, then swap the files and the record: the work of `replace_token` (under the
    mount's lock). Returns the new record, the secrets, the new token's TTL and the files rewritten."""
    meta = {"volume": record.volume, "mount_id": record.mount_id, "host": driver._hostname}
    where = {"volume": record.volume, "mount_id": record.mount_id}
    child = driver._mint(parent, spec, meta)
    new = dataclasses.replace(record, token=child.token, accessor=child.accessor)
    try:
        token_ttl, fetched = driver._extend_and_fetch(child, child.token, spec)
        files = render_files(spec, {source: secret.data for source, secret in fetched.items()})
        if container_token and spec.token_file is not None:
            accessor, files[spec.token_file] = driver._container_token(parent, spec, meta)
            new = dataclasses.replace(new, container_token_accessor=accessor)
        old_upkeep = driver._upkeeps.get((record.volume, record.mount_id))
        # The old upkeep writes nothing meanwhile, and stops once the new files and record are in place;
        # if they cannot be, it goes on with the old token and files, and retries what asked for this.
        with old_upkeep.handover() if old_upkeep is not None else contextlib.nullcontext():
            written = driver._mounter.rewrite(
                record.volume, record.mount_id, files, uid=spec.uid, gid=spec.gid, mode=spec.mode
            )
            leases = {str(source): secret.lease_id for source, secret in fetched.items() if secret.lease_id}
            driver._store.replace_mount_token(new, leases)
    except BaseException:
        driver._revoker.revoke(child.accessor, child.token, **where)
        if new.container_token_accessor != record.container_token_accessor and new.container_token_accessor:
            driver._revoker.revoke_by_accessor(new.container_token_accessor, parent, **where)
        raise
    return new, fetched, token_ttl, written
