"""Per-volume credentials: the token a `wrapped-token=` volume's mounts descend from.

The wrapping token is checked and unwrapped once, at Create. It wraps either a Vault token (created at
`auth/token/create...`) or an AppRole SecretID (then `role-id=` logs in). If the resulting token may
create child tokens, each mount gets its own child, as with `role=`; if not, every mount of the volume
reads with the volume's token itself (less isolation: containers of the volume share one token, which
lives until the volume is removed).
"""

from __future__ import annotations

from collections.abc import Sequence

from plugin.core.errors import InvalidOptionError, PluginError
from plugin.core.ports import VolumeCredentials
from plugin.core.records import VolumeCredential
from plugin.core.spec import Spec
from plugin.vault.client import Vault, issued_from_auth
from plugin.vault.wrapping import unwrap_checked

_MINTING_CAPABILITIES = {"create", "update", "sudo", "root"}


class CredentialUnwrapper(VolumeCredentials):
    """`unwrap_volume_credential` as the driver's port."""

    def __init__(self, vault: Vault):
        self._vault = vault

    def unwrap(self, name: str, spec: Spec, allowed_paths: Sequence[str]) -> tuple[VolumeCredential, int]:
        return unwrap_volume_credential(self._vault, name, spec, allowed_paths)


def unwrap_volume_credential(
    vault: Vault, name: str, spec: Spec, allowed_paths: Sequence[str]
) -> tuple[VolumeCredential, int]:
    """Consume `spec.wrapped_token` and return the volume's credential and its TTL in seconds.

    Raises `WrappingTokenError` (tamper), `InvalidOptionError` (wrong kind of content, or missing
    role-id, checked before the token is spent), or a Vault error.
    """
    source = f"option wrapped-token of volume {name}"

    def refuse_before_unwrap(creation_path: str) -> None:
        if creation_path.endswith("/secret-id") and not spec.role_id:
            raise InvalidOptionError(f"{source} wraps an AppRole SecretID: also give role-id=<the AppRole's RoleID>")

    # The driver asks for a credential only for a wrapped-token= volume.
    assert spec.wrapped_token is not None, "a volume without wrapped-token= has no credential to unwrap"
    unwrapped = unwrap_checked(
        vault, spec.wrapped_token, allowed_paths, source=source, before_unwrap=refuse_before_unwrap
    )
    if unwrapped.is_secret_id:
        assert spec.role_id, "refuse_before_unwrap refused a SecretID without role-id"
        issued = vault.approle_login(spec.approle_mount, spec.role_id, str(unwrapped.field("data", "secret_id")))
    elif unwrapped.response.get("auth"):
        issued = issued_from_auth(unwrapped.field("auth"))
    else:
        raise InvalidOptionError(
            f"{source} wraps neither a token nor an AppRole SecretID (it was made at {unwrapped.creation_path})"
        )
    try:
        can_mint = bool(vault.capabilities(issued.token, "auth/token/create") & _MINTING_CAPABILITIES)
        if spec.token_file and not can_mint:
            raise InvalidOptionError(
                f"volume {name}: token-file needs a credential that can create child tokens (auth/token/create), "
                "so that each container's token can be revoked on its own"
            )
    except PluginError:
        vault.revoke_self(issued.token)
        raise
    return VolumeCredential(issued.token, issued.accessor, can_mint), issued.ttl
