"""The plugin's one error family.

Every failure that reaches dockerd is a `PluginError`; the HTTP edge turns its message into
`{"Err": message}`, which the docker CLI shows the user verbatim. Messages therefore say what is wrong
and how to fix it, and never contain a secret value or a token.
"""


class PluginError(Exception):
    """Base of every error the plugin reports to dockerd."""


class InvalidOptionError(PluginError):
    """A volume option is unknown, malformed, or unsafe (raised at Create)."""


class VolumeNotFoundError(PluginError):
    """The named volume is not in the plugin's state."""


class VolumeInUseError(PluginError):
    """The volume still has active mounts (raised by Remove)."""


class VaultError(PluginError):
    """Vault refused for good (permission denied, missing path, bad request): retrying cannot help."""


class VaultTransientError(VaultError):
    """Vault could not answer now: unreachable, timed out, sealed, electing a leader (5xx), rate-limited
    (429) or behind on replication (412). Worth retrying while the caller can wait."""


class PermissionDeniedError(VaultError):
    """Vault denied the token access to a path (403)."""


class CheckAndSetError(VaultError):
    """A KV v2 write with check-and-set found data it was not to replace."""


class TokenInvalidError(VaultError):
    """Vault says the token itself is not valid (expired, revoked, unknown): renewing it cannot help."""


class TLSError(VaultError):
    """The TLS handshake with Vault failed (untrusted certificate, client certificate refused).
    Final: retrying with the same configuration cannot help."""


class AnswerLostError(VaultTransientError):
    """A request that may have taken effect (an unwrap) got no answer: the connection broke or timed out
    after it was sent. Transient for Vault, but whether the request was carried out is unknown."""


class SecretFormatError(PluginError):
    """A secret read from Vault cannot be rendered as the volume asks (missing field, bad env key)."""


class WrappingTokenError(PluginError):
    """A response-wrapping token failed its checks: already used, expired, or from an unexpected path.

    This is a security event: someone else may have unwrapped the token first. Never retried.
    """


class IdentityUnavailableError(PluginError):
    """The plugin has no valid Vault identity yet (still authenticating, or it expired)."""


class MountError(PluginError):
    """The tmpfs for a mount could not be created, filled, or removed."""


class StateError(PluginError):
    """The state directory or database is unusable."""
