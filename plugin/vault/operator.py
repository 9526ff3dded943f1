"""Vault with the operator's own token, for `migrate --write`: KV v2 writes, policies and token roles.

Unlike the plugin's adapter (`client`), this one lets hvac find the operator's token as the CLI does
(`VAULT_TOKEN`, `~/.vault-token`) when none is given: it runs as the operator, never as the plugin.
hvac and requests errors are translated here into the plugin's error family.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import Any, cast

import hvac
import hvac.exceptions
import requests

from plugin.core.errors import (
    CheckAndSetError,
    PermissionDeniedError,
    VaultError,
    VaultTransientError,
)


class OperatorVault:
    """One Vault server, with `token` (or the one hvac finds). Each method raises `VaultTransientError`
    (unreachable), `PermissionDeniedError`, `CheckAndSetError` (a write with cas found data) or `VaultError`."""

    def __init__(self, addr: str | None, token: str | None, *, timeout: int = 15):
        self._client = hvac.Client(url=addr, token=token, timeout=timeout)
        self.url: str = self._client.url

    @property
    def has_token(self) -> bool:
        return bool(self._client.token)

    def kv_version(self, mount: str) -> str | None:
        """The KV version of the engine at `mount` ("1", "2"), as the bao CLI tells them apart: any token may
        ask about a mount it can use."""
        with self._translated(f"sys/internal/ui/mounts/{mount}"):
            # A 200 with a JSON body: hvac's JSONAdapter answers it as a dict (None if the path is not found).
            answer = cast(dict[str, Any], self._client.read(f"sys/internal/ui/mounts/{mount}") or {})
        version: str | None = (answer.get("data") or {}).get("options", {}).get("version")
        return version

    def exists(self, path: str) -> bool:
        with self._translated(path):
            return bool(self._client.read(path))

    def write_kv(self, mount: str, path: str, secrets: Mapping[str, str], *, cas: int | None) -> None:
        """Write `secrets` at `<mount>/data/<path>`; `cas=0` refuses to replace existing data."""
        with self._translated(f"{mount}/data/{path}"):
            self._client.secrets.kv.v2.create_or_update_secret(path, dict(secrets), cas=cas, mount_point=mount)

    def write_policy(self, name: str, policy: str) -> None:
        with self._translated(f"sys/policies/acl/{name}"):
            self._client.sys.create_or_update_policy(name, policy)

    def write_token_role(self, name: str, allowed_policy: str) -> None:
        with self._translated(f"auth/token/roles/{name}"):
            self._client.write_data(
                f"auth/token/roles/{name}", data={"allowed_policies": allowed_policy, "renewable": True}
            )

    @contextlib.contextmanager
    def _translated(self, path: str) -> Iterator[None]:
        try:
            yield
        except requests.exceptions.RequestException as e:
            raise VaultTransientError(f"cannot reach Vault at {self.url}: {type(e).__name__}") from e
        except hvac.exceptions.Forbidden as e:
            raise PermissionDeniedError(f"permission denied by Vault on {path}") from e
        except hvac.exceptions.InvalidRequest as e:
            if "check-and-set" in str(e):
                raise CheckAndSetError(f"{path} already exists") from e
            raise VaultError(f"Vault refused {path}: {e}") from e
        except hvac.exceptions.VaultError as e:
            raise VaultError(f"Vault error on {path}: {e}") from e
