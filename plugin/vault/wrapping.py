"""Single-use response-wrapping tokens: look up, check where they were made, unwrap exactly once.

A wrapping token that fails these checks was most likely used by someone else first (intercepted), or
was made by an endpoint that lets anyone choose its content. Either way it is refused loudly, with a
`wrap.tamper` audit event, and never retried with something weaker.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from plugin.core.errors import (
    InvalidOptionError,
    VaultError,
    VaultTransientError,
    WrappingTokenError,
)
from plugin.vault.client import Vault

audit = logging.getLogger("plugin.audit")

# Whoever calls sys/wrapping/wrap chooses what is inside: such a token proves nothing about its content.
NEVER_ALLOWED_PATH = "sys/wrapping/wrap"


class PlainTokenError(InvalidOptionError):
    """A plain Vault token was given where a wrapping token was expected."""


@dataclasses.dataclass(frozen=True)
class Unwrapped:
    creation_path: str
    response: Mapping[str, Any] = dataclasses.field(repr=False)

    def field(self, *keys: str) -> Any:
        """`response[k1][k2]...`; a wrapped answer without it is a `VaultError` (it is not what its creation
        path makes), never a KeyError in the caller."""
        value: Any = self.response
        for key in keys:
            if not isinstance(value, Mapping) or key not in value:
                raise VaultError(f"the unwrapped answer (made at {self.creation_path}) has no {'.'.join(keys)}")
            value = value[key]
        return value

    @property
    def is_secret_id(self) -> bool:
        return self.creation_path.endswith("/secret-id")


def unwrap_checked(
    vault: Vault,
    wrapping_token: str,
    allowed_paths: Sequence[str],
    *,
    source: str,
    before_unwrap: Callable[[str], None] = lambda creation_path: None,
) -> Unwrapped:
    """Check and consume `wrapping_token`; `source` says where it came from, for messages and the audit log.

    `allowed_paths` are glob patterns (`*` matches any characters) for the creation path. `before_unwrap`
    gets the creation path between the checks and the unwrap: it may refuse (raise) before the token is
    spent, or record the consumption durably first.
    Raises `WrappingTokenError` (after logging `wrap.tamper`), `PlainTokenError`, or `VaultTransientError`.
    """
    try:
        info = vault.lookup_wrapping(wrapping_token)
    except WrappingTokenError as e:
        if _is_plain_token(vault, wrapping_token):
            raise PlainTokenError(
                f"{source} holds a plain Vault token, not a wrapping token. It is refused because volume options "
                "are shown by docker volume inspect: revoke that token now (it has been exposed) and give a "
                "single-use wrapping token instead (vault token create -wrap-ttl=5m ...)"
            ) from e
        raise _tamper(
            f"{source}: the wrapping token is not valid: it was already unwrapped (possible interception) or it expired"
        ) from e
    path = info.creation_path
    if path == NEVER_ALLOWED_PATH or not any(fnmatch.fnmatchcase(path, p) for p in allowed_paths):
        raise _tamper(
            f"{source}: the wrapping token was created at {path!r}, which is not an allowed creation path "
            f"({', '.join(allowed_paths)}); its content cannot be trusted"
        )
    before_unwrap(path)
    try:
        response = vault.unwrap(wrapping_token)
    except WrappingTokenError as e:
        raise _tamper(
            f"{source}: the wrapping token was unwrapped by someone else between its lookup and its unwrap "
            "(possible interception)"
        ) from e
    return Unwrapped(path, response)


def _is_plain_token(vault: Vault, token: str) -> bool:
    try:
        vault.lookup_self(token)
    except VaultTransientError:
        raise
    except VaultError:
        return False
    return True


def _tamper(message: str) -> WrappingTokenError:
    audit.critical("wrap.tamper: %s", message, extra={"event": "wrap.tamper"})
    return WrappingTokenError(message)
