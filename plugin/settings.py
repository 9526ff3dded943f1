"""The plugin's configuration: one frozen object, built once by the CLI and passed in."""

from __future__ import annotations

import dataclasses
from pathlib import Path

# Wrapping tokens accepted for wrapped-token= volumes: made by token roles or auth/token/create, and
# AppRole SecretIDs (plugin/vault/wrapping.py never accepts sys/wrapping/wrap, whatever is configured).
DEFAULT_ALLOWED_PATHS = ("auth/token/create*", "auth/*/role/*/secret-id")


@dataclasses.dataclass(frozen=True)
class Settings:
    """Everything `serve` needs, already resolved from flags and environment.

    `vault_cacert` is a CA bundle path or None (system trust store); `vault_client_cert`/`_key` are for
    mutual TLS. `role_id` is the AppRole RoleID, which is an identifier, not a secret.
    `wrapped_secret_id_file` holds a single-use wrapping token. `mount_timeout` bounds a Mount (and the
    Create of a `wrapped-token=` volume), waiting for the identity and retries of transient Vault errors
    included: keep it well under dockerd's deadline (a managed plugin's calls are cut at 30 s).
    """

    socket: Path
    state_dir: Path
    mount_root: Path
    vault_addr: str
    vault_cacert: str | None = None
    vault_client_cert: str | None = None
    vault_client_key: str | None = None
    vault_namespace: str | None = None
    vault_timeout: float = 5.0
    mount_timeout: float = 20.0
    release_unheld_after: float = 30.0  # 0: never release a mount no container holds
    approle_mount: str = "approle"
    role_id: str | None = None
    wrapped_secret_id_file: Path | None = None
    wrap_allowed_paths: tuple[str, ...] = DEFAULT_ALLOWED_PATHS
    control_socket: Path | None = None
    docker_socket: Path | None = None
    metrics_addr: str | None = None
    hostname: str = ""

    @property
    def control_socket_path(self) -> Path:
        """Root-only socket for operator commands (bootstrap); kept in the state directory by default."""
        return self.control_socket or self.state_dir / "control.sock"

    @property
    def database_path(self) -> Path:
        return self.state_dir / "state.db"

    @property
    def key_path(self) -> Path:
        """The sealing key lives beside, not inside, the database: copying one file is not enough."""
        return self.state_dir / "seal.key"
