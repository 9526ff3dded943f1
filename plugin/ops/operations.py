"""What operators ask a running plugin over the control socket: `status` and `doctor`.

Both report names, ages, TTLs and pass/fail checks, never a secret or a token. `doctor` proves a
volume would mount: it mints a short-lived token the way a Mount does, asks Vault what that token may
do on every path (sys/capabilities-self, so no secret is read), and revokes it.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable
from typing import Any

from plugin.core.errors import PluginError
from plugin.core.spec import Spec, parse_spec
from plugin.host.store import Store
from plugin.vault.client import Vault
from plugin.vault.identity import Identity

DOCTOR_TOKEN_TTL = 60
_WRITING = {"create", "update", "sudo", "root"}
_READING = {"read", "sudo", "root"}


@dataclasses.dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str
    fix: str = ""


class Operations:
    def __init__(self, vault: Vault, store: Store, identity: Identity, *, vault_addr: str):
        self._vault, self._store, self._identity, self._vault_addr = vault, store, identity, vault_addr

    # -- status ---------------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        """Volumes (options hold no secrets), mounts with ages and TTLs, the identity and Vault's health."""
        now = time.time()
        try:
            identity: dict[str, Any] = {
                "accessor": self._vault.lookup_self(self._identity.token()).accessor,
                "ttl": round(self._identity.seconds_left()),
            }
        except PluginError as e:
            identity = {"error": str(e)}
        volumes = []
        for volume in self._store.volumes():
            mounts = []
            for record in self._store.mounts(volume.name):
                if record.unreadable:
                    token_ttl: int | str = "unknown (its token does not open with the seal key)"
                else:
                    token_ttl = self._ttl(lambda: self._vault.lookup_self(record.token).ttl)
                mounts.append(
                    {
                        "mount_id": record.mount_id,
                        "age": round(now - record.created_at),
                        "refcount": record.refcount,
                        "token_ttl": token_ttl,
                        "leases": [
                            {
                                "source": source,
                                "lease_id": lease_id,
                                "ttl": self._ttl(functools.partial(self._vault.lease_ttl, record.token, lease_id)),
                            }
                            for source, lease_id in self._store.leases(record.volume, record.mount_id).items()
                        ],
                    }
                )
            volumes.append(
                {"name": volume.name, "options": volume.options, "created_at": volume.created_at, "mounts": mounts}
            )
        return {"vault": self._health(), "identity": identity, "volumes": volumes}

    @staticmethod
    def _ttl(read: Callable[[], int | None]) -> int | str:
        try:
            ttl = read()
        except PluginError as e:
            return f"unknown ({type(e).__name__})"
        return "gone" if ttl is None else ttl

    def _health(self) -> dict[str, Any]:
        try:
            health = self._vault.health()
        except PluginError as e:
            return {"address": self._vault_addr, "reachable": False, "error": str(e)}
        return {
            "address": self._vault_addr,
            "reachable": True,
            "sealed": health.get("sealed"),
            "version": health.get("version"),
        }

    # -- doctor ---------------------------------------------------------------------------------

    def doctor(self, names: list[str] | None = None) -> list[Check]:
        """Every check, in order; a failed prerequisite stops the checks that need it."""
        health = self._health()
        if not health["reachable"]:
            return [
                Check(
                    "vault",
                    False,
                    health["error"],
                    "check VAULT_ADDR, that Vault is up and reachable from the plugin, and VAULT_CACERT for TLS",
                )
            ]
        checks = [
            Check(
                "vault",
                not health["sealed"],
                f"Vault {health['version']} at {self._vault_addr}, " + ("sealed" if health["sealed"] else "unsealed"),
                "unseal Vault" if health["sealed"] else "",
            )
        ]
        try:
            issued = self._vault.lookup_self(self._identity.token())
            checks.append(Check("identity", True, f"plugin token {issued.accessor}, ttl {issued.ttl}s"))
        except PluginError as e:
            checks.append(
                Check(
                    "identity",
                    False,
                    str(e),
                    "deliver a new wrapped SecretID: vault-secrets-plugin bootstrap --wrapped-secret-id-file F",
                )
            )
        volumes = self._store.volumes()
        known = {v.name for v in volumes}
        for name in names or []:
            if name not in known:
                checks.append(
                    Check(f"volume {name}", False, "no such vault-secrets volume", "docker volume ls -f driver=...")
                )
        for volume in volumes:
            if not names or volume.name in names:
                checks.extend(self._check_volume(volume.name, parse_spec(volume.options)))
        return checks

    def _check_volume(self, name: str, spec: Spec) -> list[Check]:
        credential = self._store.volume_credential(name)
        try:
            parent = credential.token if credential else self._identity.token()
        except PluginError as e:
            return [Check(f"volume {name}", False, str(e), "fix the plugin identity first")]
        role = spec.role if credential is None else None
        origin = f"token role {role}" if role else "the volume's wrapped credential"
        if credential is not None and not credential.can_mint:
            token, minted = credential.token, False
            checks = [Check(f"volume {name}: token", True, "mounts share the volume's credential")]
        else:
            try:
                token = self._vault.mint_child(
                    parent,
                    role,
                    DOCTOR_TOKEN_TTL,
                    {"volume": name, "purpose": "doctor"},
                    display_name=f"vault-secrets-doctor-{name}"[:100],
                ).token
            except PluginError as e:
                fix = (
                    (
                        f'allow the plugin policy: path "auth/token/create/{role}" {{ capabilities = ["update"] }}, '
                        f"and check that the token role exists (vault read auth/token/roles/{role})"
                    )
                    if role
                    else "give the volume a credential that may create child tokens"
                )
                return [Check(f"volume {name}: token", False, f"cannot mint a token from {origin}: {e}", fix)]
            minted = True
            checks = [Check(f"volume {name}: token", True, f"can mint tokens from {origin}")]
        try:
            for source in spec.sources:
                needed, verb = (_WRITING, "update") if source.params else (_READING, "read")
                capabilities = self._vault.capabilities(token, source.path)
                ok = bool(capabilities & needed)
                checks.append(
                    Check(
                        f"volume {name}: {source.path}",
                        ok,
                        f"{verb} allowed"
                        if ok
                        else f"{verb} denied (capabilities: {', '.join(sorted(capabilities)) or 'none'})",
                        ""
                        if ok
                        else f'add path "{source.path}" {{ capabilities = ["{verb}"] }} to a policy of {origin}',
                    )
                )
            if spec.token_file:
                ok = bool(self._vault.capabilities(parent, "auth/token/revoke-accessor") & _WRITING)
                checks.append(
                    Check(
                        f"volume {name}: token-file",
                        ok,
                        "container tokens can be revoked by accessor"
                        if ok
                        else "the plugin cannot revoke container tokens by accessor",
                        ""
                        if ok
                        else 'add path "auth/token/revoke-accessor" { capabilities = ["update"] } to the plugin policy',
                    )
                )
        finally:
            if minted:
                self._vault.revoke_self(token)
        return checks
